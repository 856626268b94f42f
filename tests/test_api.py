"""The HTTP service against a real uvicorn server on a loopback port.

Two servers per module (reference and rfc idempotency modes), started once; a third, short-lived
pair checks that rfc-mode runs survive a restart.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "data" / "goldens"  # a copy of ../shared/goldens
GOLDEN = GOLDENS / "reference-service" / "scenario_03_fx_funding.json"
RANDOM_GOLDENS = GOLDENS / "reference-random" / "core"
SIM = "/rebalance/simulate"
BATCH = "/rebalance/simulate/batch"
PROBLEM = "application/problem+json"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dpm_vec.api", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # uvicorn's own lines
        return out

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def ref_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("ref"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rfc_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rfc")
    server = Server(tmp, "--idempotency", "rfc", "--store", str(tmp / "runs.duckdb"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())["inputs"]


def _post(server: Server, body, key: str | None = "key-1", path: str = SIM, **headers) -> httpx.Response:
    hdrs = dict(headers)
    if key is not None:
        hdrs["Idempotency-Key"] = key
    if isinstance(body, (bytes, str)):
        return server.client.post(path, content=body, headers={"Content-Type": "application/json", **hdrs})
    return server.client.post(path, json=body, headers=hdrs)


def _path(loc: list) -> str:
    """A reference-shaped error's ``loc`` written as dpm_vec's error path."""
    if loc[0] == "header":
        return f"header.{loc[1]}"
    steps = [f"[{step}]" if isinstance(step, int) else f".{step}" for step in loc[1:]]
    return "".join(steps).removeprefix(".") or "$"


def _fields(body: dict) -> list[str]:
    """Each error's path: a problem's ``field``, or a reference-shaped body's ``loc``."""
    if "errors" in body:
        return [e["field"] for e in body["errors"]]
    return [_path(e["loc"]) for e in body["detail"]]


def _assert_invalid(resp: httpx.Response) -> dict:
    """The reference's 422 for an invalid request (spec §2.4): FastAPI's validation body,
    ``application/json``, every error with its type, loc, msg and input."""
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert list(body) == ["detail"] and body["detail"]
    for error in body["detail"]:
        assert list(error) == ["type", "loc", "msg", "input"], error
        assert error["loc"][0] in ("body", "header") and error["type"] and error["msg"]
    return body


def _assert_problem(resp: httpx.Response, status: int = 422) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    for key in ("type", "title", "status", "detail", "instance"):
        assert key in body
    assert body["status"] == status
    return body


def _check_fx_golden(result: dict) -> None:
    assert result["status"] == "READY"
    sec = [i for i in result["intents"] if i["intent_type"] == "SECURITY_TRADE"]
    fx = [i for i in result["intents"] if i["intent_type"] == "FX_SPOT"]
    # decimals compare numerically (spec §1.3), not as text
    assert [(i["side"], i["instrument_id"], Decimal(i["quantity"])) for i in sec] == [("BUY", "US_EQ", Decimal(37))]
    assert [(i["buy_currency"], Decimal(i["buy_amount"]), i["sell_currency"]) for i in fx] == \
        [("USD", Decimal("3737.000"), "SGD")]
    assert sec[0]["dependencies"] == [fx[0]["intent_id"]]


# -- reference mode ---------------------------------------------------------------------------
def test_health(ref_server):
    from dpm_vec import __version__

    assert ref_server.client.get("/health").json() == {"status": "ok", "engine_version": __version__}


def test_golden_fx_funding(ref_server, golden):
    resp = _post(ref_server, golden, key="my key, verbatim", **{"X-Correlation-Id": "corr-42"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    result = resp.json()
    _check_fx_golden(result)
    assert list(result)[:3] == ["rebalance_run_id", "correlation_id", "status"]
    assert result["correlation_id"] == "c_none"  # spec §2.2: never echoed
    assert "x-correlation-id" not in resp.headers
    assert result["lineage"] == {"portfolio_snapshot_id": "pf_003", "market_data_snapshot_id": "md", "request_hash": "my key, verbatim",
                                 "idempotency_key": None, "engine_version": None}  # §5.8
    rid = result["rebalance_run_id"]
    assert rid.startswith("rr_") and len(rid) == 11
    assert result["universe"]["universe_id"] == f"u_{rid}" and result["target"]["target_id"] == f"t_{rid}"
    # spec §2.3: no replay; the same key recomputes, with a fresh run id, and a different body is fine
    again = _post(ref_server, golden, key="my key, verbatim")
    assert again.status_code == 200 and "idempotent-replay" not in again.headers
    assert again.json()["rebalance_run_id"] != rid
    other = copy.deepcopy(golden)
    other["model_portfolio"]["targets"][0]["weight"] = "0.25"
    assert _post(ref_server, other, key="my key, verbatim").status_code == 200
    # an empty key is a key (spec §2.2)
    assert _post(ref_server, golden, key="").json()["lineage"]["request_hash"] == ""
    # the structured log line carries the ids
    lines = [l for l in ref_server.log_lines() if l.get("correlation_id") == "corr-42"]
    assert lines and lines[-1]["portfolio_id"] == "pf_003" and lines[-1]["run_id"] == rid
    assert lines[-1]["status"] == "READY" and lines[-1]["http_status"] == 200 and lines[-1]["latency_ms"] > 0
    # RFC-0001 §9.1: how the run ended, at the RFC's level, with its universe; a READY run has no block reason
    assert (lines[-1]["level"], lines[-1]["message"]) == ("INFO", "Run completed")
    eligible = {*result["universe"]["eligible_for_buy"], *result["universe"]["eligible_for_sell"]}
    assert lines[-1]["universe"] == f"{len(eligible)} eligible, {len(result['universe']['excluded'])} excluded" and eligible
    assert "block_reason" not in lines[-1]


def test_business_blocked_is_200(ref_server, golden):
    req = copy.deepcopy(golden)
    req["market_data_snapshot"]["prices"] = []  # the model's instrument has no price: data-quality block
    resp = _post(ref_server, req, **{"X-Correlation-Id": "corr-dq-block"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "BLOCKED"
    assert resp.json()["diagnostics"]["data_quality"]["price_missing"] == ["US_EQ"]
    # the body is the reference's; the log line says why at ERROR (RFC-0001 §9.1 "Data quality block")
    assert "block_reason" not in resp.json() and "DATA_QUALITY" not in resp.json()["diagnostics"]["warnings"]
    (line,) = [l for l in ref_server.log_lines() if l.get("correlation_id") == "corr-dq-block"]
    assert (line["level"], line["message"], line["status"]) == ("ERROR", "Data quality block", "BLOCKED")
    assert (line["block_reason"], line["block_detail"]) == ("DATA_QUALITY", "missing data: no price for US_EQ")


def test_missing_idempotency_key_is_422(ref_server, golden):
    body = _assert_invalid(_post(ref_server, golden, key=None))
    assert body["detail"] == [{"type": "missing", "loc": ["header", "Idempotency-Key"], "msg": "field required", "input": None}]


def test_missing_key_and_bad_body_lists_every_error(ref_server, golden):
    req = copy.deepcopy(golden)
    del req["options"]
    body = _assert_invalid(_post(ref_server, req, key=None))
    assert [(e["type"], e["loc"]) for e in body["detail"]] == [("missing", ["header", "Idempotency-Key"]), ("missing", ["body", "options"])]


def test_invalid_requests_are_rfc_7807_problems_in_rfc_mode(rfc_server, golden):
    """``--idempotency rfc`` answers an invalid request as an RFC 7807 problem naming every
    field by its path, where the reference mode answers FastAPI's body."""
    req = copy.deepcopy(golden)
    req["options"]["max_turnover_pct"] = "1.5"
    problem = _assert_problem(_post(rfc_server, req, key="5f0c2a8e-1d3b-4e6f-9a7c-2b4d6e8f0a12"))
    assert problem["errors"] == [{"field": "options.max_turnover_pct", "message": "must be <= 1, got 1.5"}]
    assert problem["instance"] == SIM
    analyzed = _assert_problem(rfc_server.client.post("/rebalance/analyze", json={**req, "scenarios": {}}))
    assert _fields(analyzed) == ["scenarios"] and analyzed["instance"] == "/rebalance/analyze"


@pytest.mark.parametrize("raw, words", [
    (b'{"portfolio_snapshot": ', "malformed JSON"),
    (b"", "empty"),
    (b"\xff\xfe\x00garbage", "UTF-8"),
    (b"[1, 2, 3]", "JSON object"),
    (b'"text"', "JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
])
def test_malformed_body_is_422_naming_the_body(ref_server, raw, words):
    (error,) = _assert_invalid(_post(ref_server, raw))["detail"]
    # FastAPI's loc for JSON that does not parse carries the character offset
    assert error["loc"] == (["body", 23] if words == "malformed JSON" else ["body"]) and words.lower() in error["msg"].lower()
    assert error["type"] == ("json_invalid" if words in ("malformed JSON", "UTF-8", "nested") else
                             "missing" if words == "empty" else "model_attributes_type")


def test_malformed_json_is_the_one_error_as_fastapi_reads_it_first(ref_server, rfc_server):
    """FastAPI parses the body's JSON before it reads any header: a malformed body without
    an Idempotency-Key is one json_invalid error, not also the missing header. The rfc
    mode owes FastAPI nothing and lists every fault of the call."""
    assert _fields(_assert_problem(_post(rfc_server, b'{"a": ', key=None))) == ["header.Idempotency-Key", "$"]
    (error,) = _assert_invalid(_post(ref_server, b'{"a": ', key=None))["detail"]
    assert (error["type"], error["loc"]) == ("json_invalid", ["body", 6])
    # an empty body does not fail to parse: there the missing header is listed too
    assert [e["loc"] for e in _assert_invalid(_post(ref_server, b"", key=None))["detail"]] == [["header", "Idempotency-Key"], ["body"]]
    # only a body of no bytes is empty: FastAPI parses whitespace, which is malformed JSON
    (error,) = _assert_invalid(_post(ref_server, b" \n ", key=None))["detail"]
    assert (error["type"], error["loc"]) == ("json_invalid", ["body", 3])


def test_bare_nan_and_infinity_are_a_422_whose_body_is_json(ref_server, golden):
    """Python's parser takes JSON's non-standard NaN and Infinity: the 422 names the field,
    and its ``input`` is null, since no JSON body can carry the value."""
    raw = json.dumps(golden).replace('"1.35"', "NaN").replace('"100.0"', "1e400")
    resp = _post(ref_server, raw)
    body = json.loads(resp.text, parse_constant=lambda name: pytest.fail(f"{name} in the 422 body"))
    assert resp.status_code == 422 and [(e["type"], e["loc"], e["input"]) for e in body["detail"]] == [
        ("finite_number", ["body", "market_data_snapshot", "prices", 0, "price"], None),
        ("finite_number", ["body", "market_data_snapshot", "fx_rates", 0, "rate"], None)]


def test_an_idempotency_key_sent_twice_is_its_first_value(ref_server, golden):
    """The reference reads a repeated header's first value into lineage.request_hash."""
    resp = ref_server.client.post(SIM, json=golden, headers=[("Idempotency-Key", "first"), ("Idempotency-Key", "second")])
    assert resp.status_code == 200 and resp.json()["lineage"]["request_hash"] == "first"


def test_schema_errors_name_the_field(ref_server, golden):
    req = copy.deepcopy(golden)
    req["model_portfolio"] = {"model_id": "m1"}  # targets missing
    req["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "-5"}]
    req["shelf_entries"][0]["status"] = "NOPE"
    req["options"]["max_turnover_pct"] = "1.5"
    body = _assert_invalid(_post(ref_server, req))
    found = {_path(e["loc"]): (e["type"], e["input"]) for e in body["detail"]}
    assert found == {"model_portfolio.targets": ("missing", {"model_id": "m1"}),
                     "portfolio_snapshot.positions[0].quantity": ("greater_than_equal", "-5"),
                     "shelf_entries[0].status": ("enum", "NOPE"),
                     "options.max_turnover_pct": ("less_than_equal", "1.5")}, found


def test_empty_model_portfolio_needs_targets(ref_server, golden):
    req = copy.deepcopy(golden)
    req["model_portfolio"] = {}
    assert "model_portfolio.targets" in _fields(_assert_invalid(_post(ref_server, req)))


@pytest.mark.parametrize("key, value, fields", [
    # an empty snapshot still lacks its required fields (it used to run, BLOCKED, as a portfolio without an id)
    ("portfolio_snapshot", {}, ["portfolio_snapshot.base_currency", "portfolio_snapshot.portfolio_id"]),
    ("portfolio_snapshot", None, ["portfolio_snapshot"]),
    ("options", None, ["options"]),
    ("shelf_entries", None, ["shelf_entries"]),
    # a wrong type is one error, not also the object's missing fields
    ("model_portfolio", "m1", ["model_portfolio"]),
])
def test_required_top_level_objects_are_422(ref_server, golden, key, value, fields):
    req = copy.deepcopy(golden)
    req[key] = value
    assert sorted(_fields(_assert_invalid(_post(ref_server, req)))) == fields


def test_trade_beyond_quantity_range_is_422_naming_it(ref_server, golden):
    """A valid request whose trade the engine's quantities cannot hold: 422 with the trade
    named (not a bare 500), alone and as a batch slot beside a request that answers."""
    penny = copy.deepcopy(golden)
    penny["market_data_snapshot"]["prices"][0]["price"] = "0.0000001"
    problem = _assert_problem(_post(ref_server, penny))
    assert problem["type"] == "https://dpm-vec.dev/problems/quantity-out-of-range"
    assert "units of US_EQ" in problem["detail"] and problem["instance"] == SIM
    # its place in whatever engine pass it shared means nothing to the client
    assert problem["detail"].startswith("a BUY of ")
    slots = _post(ref_server, [golden, penny], key=None, path=BATCH).json()
    _check_fx_golden(slots[0])
    assert slots[1]["status"] == 422 and slots[1]["type"] == problem["type"] and slots[1]["instance"] == f"{BATCH}#/1"
    # the engine's own warning (a pass rerun without the request it names) is a JSON line too
    engine_lines = [line for line in ref_server.log_path.read_text().splitlines() if "dpm_vec.simulate" in line]
    assert engine_lines and all(json.loads(line)["logger"] == "dpm_vec.simulate" for line in engine_lines)


def test_a_lone_surrogate_is_a_422_naming_the_field(ref_server, golden):
    """JSON's \\ud800 escape spells text no UTF-8 holds: a fault of the request (spec §9.1:
    a clear error), not an engine failure that reruns the pass it shared."""
    raw = json.dumps(golden).replace('"pf_003"', '"pf_\\ud800"')
    body = _assert_invalid(_post(ref_server, raw))
    assert body["detail"] == [{"type": "string_unicode", "loc": ["body", "portfolio_snapshot", "portfolio_id"],
                               "msg": "not valid Unicode text (a lone surrogate): 'pf_\\ud800'", "input": None}]
    # nor where the fault is a value or a key the 422 echoes: written out, not a 500
    bad = copy.deepcopy(golden)
    bad["shelf_entries"][0]["status"] = "PLACEHOLDER"
    bad["options"]["group_constraints"] = {"KEY": {"max_weight": "0.5"}}
    raw = json.dumps(bad).replace('"PLACEHOLDER"', '"\\ud800"').replace('"KEY"', '"\\udc00"')
    body = _assert_invalid(_post(ref_server, raw))
    assert [(e["type"], e["loc"], e["input"]) for e in body["detail"]] == [
        ("enum", ["body", "shelf_entries", 0, "status"], None),
        ("string_unicode", ["body", "options", "group_constraints", "'\\udc00'"], None)]


def test_a_client_that_leaves_mid_body_is_no_server_error(ref_server, golden):
    """A client that closes the connection before its body arrives is counted and logged as
    499 (client closed), not as a 500 that would page whoever watches the 5xx rate."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(ref_server.url)
    before = ref_server.client.get("/metrics").text
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /rebalance/simulate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Idempotency-Key: k\r\nContent-Length: 1000\r\n\r\n{\"portfolio")
    deadline = time.time() + 10
    while 'code="499"' not in ref_server.client.get("/metrics").text and time.time() < deadline:
        time.sleep(0.05)
    after = ref_server.client.get("/metrics").text
    assert 'dpm_http_responses_total{endpoint="simulate",code="499"} 1' in after
    assert [line for line in after.splitlines() if 'code="500"' in line] == [line for line in before.splitlines() if 'code="500"' in line]


def test_a_compressed_body_is_415_not_a_misread_body(ref_server, golden):
    """A gzip body read as JSON text would be a confusing 'not UTF-8' 422: the service says
    it takes uncompressed bodies; the same body uncompressed runs."""
    import gzip

    packed = gzip.compress(json.dumps(golden).encode())
    resp = ref_server.client.post(SIM, content=packed, headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                                                                "Idempotency-Key": "k"})
    problem = _assert_problem(resp, status=415)
    assert problem["detail"] == "Content-Encoding 'gzip' is not supported: send the JSON body uncompressed"
    assert _post(ref_server, golden, **{"Content-Encoding": "identity"}).status_code == 200
    assert _post(ref_server, golden, **{"Content-Encoding": ""}).status_code == 200  # an empty header names no coding
    # a body a Windows tool saved with a UTF-8 byte order mark is JSON all the same, as FastAPI reads it
    assert _post(ref_server, b"\xef\xbb\xbf" + json.dumps(golden).encode()).status_code == 200


def test_a_body_sent_as_another_media_type_is_not_read_as_json(ref_server, rfc_server, golden):
    """FastAPI parses a body as JSON only under application/json or application/*+json (or
    no Content-Type): a form post or text/plain reaches the request model as raw text, so
    the reference answers 422 naming the body, the missing header too. dpm_vec's own doors
    (rfc mode, the batch) answer 415 and say what to send."""
    text = json.dumps(golden)
    form = ref_server.client.post(SIM, content=text, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert [(e["type"], e["loc"], e["input"]) for e in _assert_invalid(form)["detail"]] == [
        ("missing", ["header", "Idempotency-Key"], None), ("model_attributes_type", ["body"], text)]
    plain = ref_server.client.post("/rebalance/analyze", content=text, headers={"Content-Type": "text/plain; charset=utf-8"})
    assert [(e["type"], e["loc"]) for e in _assert_invalid(plain)["detail"]] == [("model_attributes_type", ["body"])]
    for content_type in ("application/json; charset=utf-8", "application/vnd.bank+json", "APPLICATION/JSON", ""):
        resp = ref_server.client.post(SIM, content=text, headers={"Content-Type": content_type, "Idempotency-Key": "k"})
        assert resp.status_code == 200, (content_type, resp.text)
    for server, path in ((rfc_server, SIM), (ref_server, BATCH)):  # an empty header is no header, as in FastAPI
        body = text if path == SIM else f"[{text}]"
        resp = server.client.post(path, content=body, headers={"Content-Type": "", "Idempotency-Key": str(uuid.uuid4())})
        assert resp.status_code == 200, (path, resp.text)
    for server, path in ((rfc_server, SIM), (ref_server, BATCH)):
        resp = server.client.post(path, content=text, headers={"Content-Type": "text/plain", "Idempotency-Key": str(uuid.uuid4())})
        problem = _assert_problem(resp, status=415)
        assert problem["detail"] == "Content-Type 'text/plain' is not JSON: send the body as application/json"


def test_other_paths_and_methods(ref_server):
    assert ref_server.client.get("/nowhere").status_code == 404
    resp = ref_server.client.get(SIM)
    assert resp.status_code == 405 and resp.json() == {"detail": "Method Not Allowed"}


def test_batch_in_order_with_invalid_slot(ref_server, golden):
    blocked = copy.deepcopy(golden)
    blocked["market_data_snapshot"]["prices"] = []
    bad = copy.deepcopy(golden)
    bad["portfolio_snapshot"]["positions"] = [{"instrument_id": "X", "quantity": "-1"}]
    resp = _post(ref_server, [golden, bad, blocked, "not an object", golden], key=None, path=BATCH)
    assert resp.status_code == 200, resp.text
    slots = resp.json()
    assert len(slots) == 5
    _check_fx_golden(slots[0])
    _check_fx_golden(slots[4])
    assert slots[0]["rebalance_run_id"] != slots[4]["rebalance_run_id"]
    assert slots[1]["status"] == 422 and "portfolio_snapshot.positions[0].quantity" in _fields(slots[1])
    assert slots[1]["instance"] == f"{BATCH}#/1"
    assert slots[2]["status"] == "BLOCKED"
    assert slots[3]["status"] == 422 and _fields(slots[3]) == ["$"]
    assert _post(ref_server, [], key=None, path=BATCH).json() == []
    problem = _assert_problem(_post(ref_server, golden, key=None, path=BATCH))
    assert "array" in problem["errors"][0]["message"]
    empty = _assert_problem(_post(ref_server, b"", key=None, path=BATCH))
    assert empty["errors"] == [{"field": "$", "message": "request body is empty; expected a JSON array of requests"}]


def _scrape(server: Server) -> dict[str, float]:
    resp = server.client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out = {}
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_universe_exclusions_by_reason(ref_server, golden):
    """Each excluded instrument of a run counts once under its reason code, and the series
    print in reason order (a scrape's lines must not move with the order runs came in)."""
    req = copy.deepcopy(golden)
    req["portfolio_snapshot"]["positions"] = [{"instrument_id": "A_SUS", "quantity": "10"},
                                              {"instrument_id": "B_BAN", "quantity": "10"}]
    req["market_data_snapshot"]["prices"] += [{"instrument_id": i, "price": "10", "currency": "SGD"}
                                              for i in ("A_SUS", "B_BAN", "C_BAN")]
    req["model_portfolio"]["targets"].append({"instrument_id": "C_BAN", "weight": "0.2"})
    req["shelf_entries"] += [{"instrument_id": "A_SUS", "status": "SUSPENDED"},
                             {"instrument_id": "B_BAN", "status": "BANNED"},
                             {"instrument_id": "C_BAN", "status": "BANNED"}]
    before = _scrape(ref_server)
    resp = _post(ref_server, req)
    assert resp.status_code == 200, resp.text
    excluded = {(e["instrument_id"], e["reason_code"]) for e in resp.json()["universe"]["excluded"]}
    assert excluded == {("A_SUS", "LOCKED_DUE_TO_SUSPENDED"), ("B_BAN", "LOCKED_DUE_TO_BANNED"),
                        ("C_BAN", "SHELF_STATUS_BANNED")}
    after = _scrape(ref_server)
    for reason in ("LOCKED_DUE_TO_SUSPENDED", "LOCKED_DUE_TO_BANNED", "SHELF_STATUS_BANNED"):
        series = f'dpm_sim_exclusion_total{{reason="{reason}"}}'
        assert after[series] - before.get(series, 0) == 1, series

    from dpm_vec.api import Metrics

    metrics = Metrics()
    metrics.run({"status": "READY", "universe": {"excluded": [{"reason_code": "SHELF_STATUS_BANNED"},
                                                              {"reason_code": "LOCKED_DUE_TO_BANNED"},
                                                              {}]}})
    lines = [line for line in metrics.render().splitlines() if line.startswith("dpm_sim_exclusion_total")]
    assert lines == ['dpm_sim_exclusion_total{reason="LOCKED_DUE_TO_BANNED"} 1',
                     'dpm_sim_exclusion_total{reason="SHELF_STATUS_BANNED"} 1',
                     'dpm_sim_exclusion_total{reason="UNKNOWN"} 1']


def _without_run_ids(result: dict) -> dict:
    """A result less the per-call random ids (run id and the universe/target ids made from it)."""
    r = copy.deepcopy(result)
    r.pop("rebalance_run_id", None)
    for part, key in (("universe", "universe_id"), ("target", "target_id")):
        if isinstance(r.get(part), dict):
            r[part].pop(key, None)
    return r


def test_concurrent_requests_answer_as_if_alone_and_reach_the_engine_once(ref_server):
    """Concurrent single requests through a real server: each answer is the one it gets
    alone, and each request reaches the engine exactly once. How many passes they share
    depends on timing here; that waiting requests do share a pass is proven with a held
    pass in tests/test_coalesce.py."""
    files = sorted(RANDOM_GOLDENS.glob("rand_*.json"))[:16]
    assert len(files) == 16
    bodies = []
    for i, f in enumerate(files):
        body = json.loads(f.read_text())["inputs"]
        body["portfolio_snapshot"]["portfolio_id"] = f"pf_coalesce_{i:02d}"
        bodies.append(body)
    bodies[3]["portfolio_snapshot"]["positions"] = [{"instrument_id": "X", "quantity": "-1"}]  # a 422 in the crowd
    alone = [_post(ref_server, body, key=f"k{i}") for i, body in enumerate(bodies)]

    before = _scrape(ref_server)
    barrier = threading.Barrier(len(bodies))
    responses: list[httpx.Response | None] = [None] * len(bodies)

    def call(i: int) -> None:
        with httpx.Client(base_url=ref_server.url, timeout=60) as client:
            client.get("/health")  # connect before the barrier, so the posts start together
            barrier.wait(timeout=60)
            responses[i] = client.post(SIM, json=bodies[i], headers={"Idempotency-Key": f"k{i}"})

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a concurrent request never answered"
    after = _scrape(ref_server)

    assert alone[3].status_code == 422 and "portfolio_snapshot.positions[0].quantity" in _fields(alone[3].json())
    assert sum(r.status_code == 200 for r in alone) == len(bodies) - 1
    for i, (solo, resp) in enumerate(zip(alone, responses)):
        assert resp is not None and resp.status_code == solo.status_code, (i, resp and resp.text)
        if solo.status_code == 200:
            got, want = resp.json(), solo.json()
            assert got["lineage"]["portfolio_snapshot_id"] == f"pf_coalesce_{i:02d}"
            assert got["rebalance_run_id"] != want["rebalance_run_id"]
            assert _without_run_ids(got) == _without_run_ids(want), i
        else:
            assert resp.json() == solo.json()
    passes = after["dpm_sim_engine_passes_total"] - before["dpm_sim_engine_passes_total"]
    coalesced = after["dpm_sim_coalesced_requests_total"] - before["dpm_sim_coalesced_requests_total"]
    assert coalesced == len(bodies) - 1  # every valid request reached the engine exactly once, the invalid one never
    assert 1 <= passes <= len(bodies)  # how many passes depends on timing


def test_max_coalesce_must_be_positive():
    import dpm_vec.api as api

    with pytest.raises(ValueError, match="max_coalesce"):
        api.create_app(max_coalesce=0)
    with pytest.raises(ValueError, match="max_body_bytes"):  # a limit of no bytes would refuse every request
        api.create_app(max_body_bytes=0)


def test_max_coalesce_one_runs_a_pass_per_request(tmp_path, golden):
    server = Server(tmp_path, "--max-coalesce", "1")
    try:
        before = _scrape(server)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            from concurrent.futures import ThreadPoolExecutor

            def call(i: int) -> httpx.Response:
                return client.post(SIM, json=golden, headers={"Idempotency-Key": f"one-{i}"})

            with ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(call, range(4)))
        after = _scrape(server)
    finally:
        server.stop()
    for resp in responses:
        assert resp.status_code == 200, resp.text
        _check_fx_golden(resp.json())
    assert after["dpm_sim_engine_passes_total"] - before.get("dpm_sim_engine_passes_total", 0) == 4
    assert after["dpm_sim_coalesced_requests_total"] - before.get("dpm_sim_coalesced_requests_total", 0) == 4


def test_max_coalesce_one_runs_concurrent_requests_concurrently(monkeypatch, golden):
    """Without a coalescing queue nothing may serialise the engine: two requests in flight
    at once are two passes at once (each waits here until the other has started)."""
    import asyncio

    import dpm_vec.api as api

    both_started = threading.Barrier(2, timeout=30)
    real = api.simulate_outcomes

    def meets_the_other(bodies):
        both_started.wait()
        return real(bodies)

    monkeypatch.setattr(api, "simulate_outcomes", meets_the_other)

    async def post_two() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api.create_app(max_coalesce=1))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await asyncio.gather(*(client.post(SIM, json=golden, headers={"Idempotency-Key": f"two-{i}"})
                                          for i in range(2)))

    for resp in asyncio.run(post_two()):
        assert resp.status_code == 200, resp.text
        _check_fx_golden(resp.json())


def test_metrics_count_statuses(ref_server, golden):
    def scrape() -> dict[str, float]:
        return _scrape(ref_server)

    before = scrape()
    blocked = copy.deepcopy(golden)
    blocked["market_data_snapshot"]["prices"] = []
    assert _post(ref_server, golden).status_code == 200
    assert _post(ref_server, golden).status_code == 200
    assert _post(ref_server, blocked).status_code == 200
    assert _post(ref_server, b"{").status_code == 422
    negative = copy.deepcopy(golden)
    negative["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "-5"}]
    assert _post(ref_server, negative).status_code == 422
    after = scrape()

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta('dpm_sim_status_total{status="READY"}') == 2
    assert delta('dpm_sim_status_total{status="BLOCKED"}') == 1
    assert delta('dpm_sim_blocked_total{reason="DATA_QUALITY"}') == 1  # the unpriced model target: why it blocked
    assert delta('dpm_sim_status_total{status="PENDING_REVIEW"}') == 0
    assert delta('dpm_http_responses_total{endpoint="simulate",code="422"}') == 2
    assert delta('dpm_sim_latency_seconds_count{endpoint="simulate"}') == 5
    # one after another: each valid request is its own engine pass; the malformed and the invalid one never reach it
    assert delta("dpm_sim_coalesced_requests_total") == 3 and delta("dpm_sim_engine_passes_total") == 3
    assert after['dpm_sim_latency_seconds_bucket{endpoint="simulate",le="+Inf"}'] == \
        after['dpm_sim_latency_seconds_count{endpoint="simulate"}']


def _infeasible_concentration() -> dict:
    """rfc_03: A 0.6 and B 0.35, both equity, cap 0.4 in RFC_ASSET_CLASS mode: A's excess
    0.2 goes to B alone, which ends at 0.55, over the cap."""
    return json.loads((REPO / "tests" / "data" / "scenarios" / "rfc_03_cap_infeasible_concentration.json").read_text())["inputs"]


@pytest.mark.parametrize("server", ["ref_server", "rfc_server"])
def test_infeasible_concentration_is_a_422_problem_when_asked(server, request):
    """RFC-0001 §7 under options.rfc_domain_errors: the run the asset-class cap blocks is a
    422 problem naming the instruments and the cap; without the option a 200 BLOCKED result."""
    srv = request.getfixturevalue(server)
    req = _infeasible_concentration()
    blocked = _post(srv, req, key="9d2c0e1a-7b7f-4c55-8f59-3f0b6a4c1d10")
    assert blocked.status_code == 200 and blocked.json()["status"] == "BLOCKED"
    assert blocked.json()["diagnostics"]["warnings"][0] == "INFEASIBLE_CONCENTRATION"

    req["options"]["rfc_domain_errors"] = True
    problem = _assert_problem(_post(srv, req, key="9d2c0e1a-7b7f-4c55-8f59-3f0b6a4c1d11", **{"X-Correlation-Id": "corr-cap"}))
    assert problem["type"] == "https://api.dpm.com/errors/infeasible-constraint"
    assert problem["title"] == "Constraint Redistribution Failed" and problem["instance"] == SIM
    assert problem["detail"] == "Redistributing excess weight from A caused B to exceed the 40% cap."
    assert problem["code"] == "INFEASIBLE_CONCENTRATION" and problem["portfolio_id"] == req["portfolio_snapshot"]["portfolio_id"]
    # the correlation id is echoed where the mode echoes it in results (RFC §7's example carries it)
    assert problem.get("correlation_id") == ("corr-cap" if server == "rfc_server" else None)
    # both, the 200 BLOCKED result and the problem, count as blocked by the cap
    assert _scrape(srv).get('dpm_sim_blocked_total{reason="INFEASIBLE_CONCENTRATION"}', 0) >= 2
    (line,) = [l for l in srv.log_lines() if l.get("correlation_id") == "corr-cap"]
    assert (line["level"], line["message"], line["http_status"]) == ("ERROR", "Hard constraint breach", 422)
    assert (line["block_reason"], line["block_detail"]) == ("INFEASIBLE_CONCENTRATION", problem["detail"])

    # a feasible request asking for the option is a plain 200 result
    req["options"]["single_position_max_weight"] = "0.6"
    assert _post(srv, req, key="9d2c0e1a-7b7f-4c55-8f59-3f0b6a4c1d12").json()["status"] in ("READY", "PENDING_REVIEW")

    # in a batch the slot is the problem, the other slots results
    req["options"]["single_position_max_weight"] = "0.4"
    slots = srv.client.post(BATCH, json=[req, _infeasible_concentration()]).json()
    assert slots[0]["status"] == 422 and slots[0]["detail"] == problem["detail"] and slots[0]["instance"] == f"{BATCH}#/0"
    assert slots[1]["status"] == "BLOCKED"

    req["options"]["rfc_domain_errors"] = None  # a flag has no null (§3.6)
    invalid = _post(srv, req, key="9d2c0e1a-7b7f-4c55-8f59-3f0b6a4c1d13")
    body = _assert_problem(invalid) if server == "rfc_server" else _assert_invalid(invalid)
    assert _fields(body) == ["options.rfc_domain_errors"]


# -- rfc mode ---------------------------------------------------------------------------------
def test_rfc_replay_and_conflict(rfc_server, golden):
    first = _post(rfc_server, golden, key="0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a01", **{"X-Correlation-Id": "corr-rfc"})
    assert first.status_code == 200, first.text
    assert first.headers["x-correlation-id"] == "corr-rfc"
    assert "idempotent-replay" not in first.headers
    result = first.json()
    _check_fx_golden(result)
    assert result["correlation_id"] == "corr-rfc"
    assert result["lineage"]["idempotency_key"] == "0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a01"
    assert len(result["lineage"]["request_hash"]) == 64

    # same key, same body (keys in another order: the canonical hash is the same) → stored JSON
    reordered = dict(reversed(list(golden.items())))
    replay = _post(rfc_server, reordered, key="0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a01")
    assert replay.status_code == 200
    assert replay.headers["idempotent-replay"] == "true"
    assert replay.content == first.content
    assert replay.headers["x-correlation-id"].startswith("c_")  # generated for this call

    # same key, different body → 409
    other = copy.deepcopy(golden)
    other["model_portfolio"]["targets"][0]["weight"] = "0.25"
    problem = _assert_problem(_post(rfc_server, other, key="0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a01"), status=409)
    assert problem["instance"] == SIM and problem["rebalance_run_id"] == result["rebalance_run_id"]

    # the same UUID spelt in capitals or braces is the same key (RFC 9562 compares them alike)
    for spelling in ("0B6F3C36-3A4E-4D51-9A5E-2F1D7C9E8A01", "{0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a01}"):
        again = _post(rfc_server, golden, key=spelling)
        assert again.headers.get("idempotent-replay") == "true" and again.content == first.content

    # a new key computes afresh
    fresh = _post(rfc_server, other, key="0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a02")
    assert fresh.status_code == 200 and fresh.json()["rebalance_run_id"] != result["rebalance_run_id"]

    metrics = rfc_server.client.get("/metrics").text
    assert "dpm_sim_replay_total 3" in metrics and "dpm_sim_conflict_total 1" in metrics


def test_rfc_analyze_results_echo_the_correlation_id(rfc_server):
    """In rfc mode every result in the body carries the call's X-Correlation-Id: a
    simulate result, each batch slot and each analyze scenario alike."""
    batch = json.loads((GOLDENS / "reference-service" / "scenario_13_what_if_analysis.json").read_text())["batch_inputs"]
    resp = rfc_server.client.post("/rebalance/analyze", json=batch, headers={"X-Correlation-Id": "corr-what-if"})
    assert resp.status_code == 200 and resp.headers["x-correlation-id"] == "corr-what-if"
    assert [r["correlation_id"] for r in resp.json()["results"].values()] == ["corr-what-if"]
    # an answered what-if call is a success whatever its scenarios' statuses: INFO, not WARNING
    (line,) = [l for l in rfc_server.log_lines() if l.get("correlation_id") == "corr-what-if"]
    assert (line["level"], line["event"], line["http_status"]) == ("INFO", "analyze", 200)


def test_rfc_invalid_requests_are_not_stored(rfc_server, golden):
    bad = copy.deepcopy(golden)
    del bad["options"]
    assert _post(rfc_server, bad, key="0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a03").status_code == 422
    good = _post(rfc_server, golden, key="0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a03")  # the key is still free
    assert good.status_code == 200 and "idempotent-replay" not in good.headers
    assert _fields(_assert_problem(_post(rfc_server, golden, key=""))) == ["header.Idempotency-Key"]
    not_a_uuid = _assert_problem(_post(rfc_server, golden, key="order-42"))  # RFC-0001 §7: Required (UUID)
    assert not_a_uuid["errors"] == [{"field": "header.Idempotency-Key", "message": "must be a UUID (RFC-0001 §7), got 'order-42'"}]
    # two Idempotency-Key lines are one comma-separated value (RFC 9110), not the first of them
    twice = rfc_server.client.post(SIM, json=golden, headers=[("Idempotency-Key", "0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a06"),
                                                              ("Idempotency-Key", "0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a07")])
    assert _fields(_assert_problem(twice)) == ["header.Idempotency-Key"]
    assert _post(rfc_server, golden, key=None).headers["x-correlation-id"].startswith("c_")


def test_rfc_runs_survive_a_restart(tmp_path, golden):
    store = tmp_path / "runs.duckdb"
    server = Server(tmp_path, "--idempotency", "rfc", "--store", str(store))
    try:
        first = _post(server, golden, key="0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a04")
        assert first.status_code == 200
    finally:
        server.stop()
    server = Server(tmp_path, "--idempotency", "rfc", "--store", str(store))
    try:
        replay = _post(server, golden, key="0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a04")
        assert replay.headers.get("idempotent-replay") == "true" and replay.content == first.content
    finally:
        server.stop()


# -- the 500 contract (in process: a real server cannot be made to fail on purpose) ------------
def _posted_in_process(*calls: tuple[dict, str]) -> list[httpx.Response]:
    """Each (body, Idempotency-Key) posted to SIM, one after another, on one app built in
    this process (so that a test may replace what it calls)."""
    import asyncio

    import dpm_vec.api as api

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api.create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post(SIM, json=body, headers={"Idempotency-Key": key}) for body, key in calls]

    return asyncio.run(post_all())


def test_unexpected_exception_is_500_problem(monkeypatch, golden):
    import dpm_vec.api as api

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(api, "simulate_outcomes", boom)
    (resp,) = _posted_in_process((golden, "k"))
    assert resp.status_code == 500
    assert resp.headers["content-type"].startswith(PROBLEM)
    assert resp.json() == {"type": "about:blank", "title": "Internal Server Error", "status": 500,
                           "detail": "An unexpected error occurred.", "instance": SIM}


def test_a_request_the_engine_cannot_compute_is_a_500_of_its_own(monkeypatch, golden, caplog):
    """The engine failing on one request answers that request 500 (no internals in the
    body, the fault in the operator's log) and keeps serving: the requests before and
    after it answer."""
    import logging

    import dpm_vec.simulate as simulate

    computes = simulate.run

    def fails_on_poison(book):
        if "poison" in book.portfolios["portfolio_id"].to_list():
            raise ZeroDivisionError("the engine's own fault")
        return computes(book)

    monkeypatch.setattr(simulate, "run", fails_on_poison)
    poison = copy.deepcopy(golden)
    poison["portfolio_snapshot"]["portfolio_id"] = "poison"

    service_log = logging.getLogger("dpm_vec.api")  # the app's own JSON lines, which do not propagate
    monkeypatch.setattr(service_log, "propagate", False)
    service_log.addHandler(caplog.handler)
    try:
        before, failed, after = _posted_in_process((golden, "a"), (poison, "b"), (golden, "c"))
    finally:
        service_log.removeHandler(caplog.handler)
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dpm_vec.api"]
    assert [(line["level"], line["error"]) for line in logged if line["http_status"] == 500] == [
        ("ERROR", "ZeroDivisionError: the engine's own fault")]
    assert failed.status_code == 500 and failed.headers["content-type"].startswith(PROBLEM)
    assert failed.json() == {"type": "about:blank", "title": "Internal Server Error", "status": 500,
                             "detail": "An unexpected error occurred.", "instance": SIM}
    assert before.status_code == after.status_code == 200
    assert before.json()["status"] == after.json()["status"] == "READY"


def test_rfc_concurrent_requests_with_one_key_get_one_run(rfc_server, golden):
    from concurrent.futures import ThreadPoolExecutor

    def call(_):
        with httpx.Client(base_url=rfc_server.url, timeout=30) as client:
            return client.post(SIM, json=golden, headers={"Idempotency-Key": "0b6f3c36-3a4e-4d51-9a5e-2f1d7c9e8a05"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert sum("idempotent-replay" not in r.headers for r in responses) == 1


def test_analyze_endpoint_runs_scenarios_and_isolates_bad_ones(ref_server):
    """§7: valid scenarios in one pass, an invalid option set fails alone."""
    golden = GOLDENS / "reference-service" / "scenario_13_what_if_analysis.json"
    batch = json.loads(golden.read_text())["batch_inputs"]
    response = ref_server.client.post("/rebalance/analyze", json=batch)
    assert response.status_code == 200
    body = response.json()
    assert list(body["results"]) == ["ignore_checks"]
    assert body["comparison_metrics"]["ignore_checks"]["security_intent_count"] == 2
    assert Decimal(body["comparison_metrics"]["ignore_checks"]["gross_turnover_notional_base"]["amount"]) == Decimal("20000")
    assert body["failed_scenarios"]["invalid_case"].startswith("INVALID_OPTIONS: ")
    assert body["warnings"] == ["PARTIAL_BATCH_FAILURE"]
    empty = ref_server.client.post("/rebalance/analyze", json={**batch, "scenarios": {}})
    assert _assert_invalid(empty)["detail"][0]["loc"] == ["body", "scenarios"]
    # every fault of the request is listed: a shared part's and the scenarios'
    broken = copy.deepcopy(batch)
    broken["shelf_entries"][0]["status"] = "X"
    broken["scenarios"] = {"ok": 5, "Bad": {}, "fine": {"options": []}}
    assert [(e["type"], e["loc"]) for e in _assert_invalid(ref_server.client.post("/rebalance/analyze", json=broken))["detail"]] == [
        ("enum", ["body", "shelf_entries", 0, "status"]), ("model_attributes_type", ["body", "scenarios", "ok"]),
        ("value_error", ["body", "scenarios", "Bad"]), ("model_attributes_type", ["body", "scenarios", "fine", "options"])]
    del broken["scenarios"]
    assert [e["loc"] for e in _assert_invalid(ref_server.client.post("/rebalance/analyze", json=broken))["detail"]] == [
        ["body", "shelf_entries", 0, "status"], ["body", "scenarios"]]
    # a missing field's input is the object the client sent, not one the server built
    assert [(e["loc"], e["input"]) for e in _assert_invalid(ref_server.client.post("/rebalance/analyze", json={}))["detail"]] == [
        (["body", key], {}) for key in ("portfolio_snapshot", "market_data_snapshot", "model_portfolio", "shelf_entries", "scenarios")]
    # an exponent no decimal context holds fails its scenario alone (it was a 500 for the whole request)
    huge = {**batch, "scenarios": {**batch["scenarios"], "huge": {"options": {"max_turnover_pct": "1e1000000"}}}}
    body = ref_server.client.post("/rebalance/analyze", json=huge).json()
    assert "ignore_checks" in body["results"] and body["failed_scenarios"]["huge"].startswith("INVALID_OPTIONS: ")


def test_a_body_over_the_limit_is_413_before_it_is_read_whole(tmp_path, golden):
    """--max-body-mb: a body declared larger (Content-Length) or streamed larger (chunked,
    no length) is refused with a 413 problem; one within the limit runs as ever."""
    server = Server(tmp_path, "--max-body-mb", "1")
    try:
        big = json.dumps({**golden, "padding": "x" * (2 * 2**20)}).encode()
        body = _assert_problem(_post(server, big), status=413)
        assert body["type"].endswith("/body-too-large") and "1,048,576 bytes" in body["detail"]

        def chunks():
            for start in range(0, len(big), 65536):
                yield big[start:start + 65536]

        streamed = server.client.post(SIM, content=chunks(), headers={"Content-Type": "application/json", "Idempotency-Key": "k"})
        assert "content-length" not in streamed.request.headers
        _assert_problem(streamed, status=413)
        assert _post(server, golden).status_code == 200
        # the limit is inclusive: a body of exactly 1 MiB runs, declared or streamed; a byte more does not
        base = json.dumps({**golden, "padding": ""}).encode()
        exact = base.replace(b'"padding": ""', b'"padding": "' + b"x" * (2**20 - len(base)) + b'"')
        assert len(exact) == 2**20
        assert _post(server, exact).status_code == 200
        one_more = exact.replace(b'"padding": "', b'"padding": "x')

        def chunked(body: bytes):
            return server.client.post(SIM, content=iter([body[:2**19], body[2**19:]]),
                                      headers={"Content-Type": "application/json", "Idempotency-Key": "k"})

        assert chunked(exact).status_code == 200
        _assert_problem(_post(server, one_more), status=413)
        _assert_problem(chunked(one_more), status=413)
    finally:
        server.stop()
