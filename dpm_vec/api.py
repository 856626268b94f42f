"""HTTP service: the reference's ``POST /rebalance/simulate`` over the dpm_vec engine.

Endpoints (``create_app``):

* ``POST /rebalance/simulate`` - body: one reference request (spec §3); header
  ``Idempotency-Key`` required. 200 + RebalanceResult for every valid request, whatever the
  business status (BLOCKED is still 200); 422 listing every invalid field (missing header,
  malformed JSON, body not an object or not sent as JSON, schema errors): the reference's FastAPI body
  ``{"detail": [{"type", "loc", "msg", "input"}]}`` (spec §2.4), or in ``rfc`` mode an
  ``application/problem+json`` body (the analyze route answers the same way); 422
  RFC-0001 §7 ``infeasible-constraint`` problem for a run the RFC asset-class cap blocks
  when the request asks (``options.rfc_domain_errors``);
  409 problem+json on an idempotency conflict (``rfc`` mode only); 415 problem+json for a
  compressed body, or in ``rfc`` mode one whose Content-Type is not JSON; 500 problem+json on
  an unexpected exception.
* ``POST /rebalance/simulate/batch`` - body: a JSON array of requests; 200 + an array of
  the same length, each slot a RebalanceResult or a 422 problem object. One engine pass.
  Nothing is stored and no Idempotency-Key is needed.
* ``GET /health`` and ``GET /metrics`` (Prometheus text format).

Idempotency modes:

* ``reference`` (default): the reference service at its pinned commit (spec §2.2-2.3).
  Every call recomputes; ``lineage.request_hash`` is the Idempotency-Key verbatim (any
  string, even empty); ``correlation_id`` is always ``"c_none"`` and X-Correlation-Id is
  only logged; a fresh random ``rr_xxxxxxxx`` run id per call.
* ``rfc``: RFC-0001 §8.2 over a DuckDB run store (``store_path``; None = in memory).
  Same key + same request hash → the stored JSON, byte for byte, with header
  ``Idempotent-Replay: true``; same key + another hash → 409. The key must be a UUID.
  ``lineage.request_hash`` is the SHA-256 of the canonical request and
  ``lineage.idempotency_key`` the key. X-Correlation-Id is echoed (generated if missing) in
  the response header of every response and in the body's ``correlation_id``. Invalid
  requests are RFC 7807 problems and are not stored, so a corrected request may reuse its key.

Coalescing (group commit): concurrent ``POST /rebalance/simulate`` calls share engine passes
(``dpm_vec.coalesce``). A call that finds no pass in flight runs at once, alone; calls that
arrive during a pass run together in the next one (at most ``max_coalesce`` requests), so
throughput under load approaches the batch door's with no added delay. Results are those of
each request run alone; ``max_coalesce=1`` gives every request its own pass.

Run the server: ``python -m dpm_vec.api --host 127.0.0.1 --port 8000 [--store runs.duckdb]
[--idempotency rfc] [--max-coalesce 64]`` or ``serve(...)`` (what ``dpm-vec serve`` calls).
"""

from __future__ import annotations

import email.message
import json
import logging
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.concurrency import run_in_threadpool

from dpm_vec import __version__
from dpm_vec.analyze import analyze
from dpm_vec.coalesce import Coalescer
from dpm_vec.contract import parse_request, request_hash
from dpm_vec.errors import ENGINE_FAILURES, InfeasibleConstraintError, RangeError, RequestError, fault, not_an_object, problem
from dpm_vec.simulate import simulate_many, simulate_outcomes
from dpm_vec.store import DuplicateRunId, IdempotencyConflict, RunStore, new_run_id

PROBLEM_JSON = "application/problem+json"
TOO_LARGE = "https://dpm-vec.dev/problems/body-too-large"
UNSUPPORTED_ENCODING = "https://dpm-vec.dev/problems/unsupported-content-encoding"
UNSUPPORTED_MEDIA_TYPE = "https://dpm-vec.dev/problems/unsupported-media-type"
DEFAULT_MAX_BODY_BYTES = 64 * 2**20  # a batch of ~10,000 typical requests
MODES = ("reference", "rfc")
SIMULATE_PATH = "/rebalance/simulate"
BATCH_PATH = "/rebalance/simulate/batch"
ANALYZE_PATH = "/rebalance/analyze"
STATUSES = ("READY", "PENDING_REVIEW", "BLOCKED")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONFLICT_TYPE = "https://dpm-vec.dev/problems/idempotency-conflict"
CLIENT_CLOSED = 499  # nginx's code for a client that closed the connection before the answer

log = logging.getLogger("dpm_vec.api")


# -- metrics ---------------------------------------------------------------------------------
class Metrics:
    """Hand-rolled Prometheus counters and a latency histogram (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.status = {s: 0 for s in STATUSES}
        self.responses: dict[tuple[str, int], int] = {}
        self.exclusions: dict[str, int] = {}
        self.blocked: dict[str, int] = {}  # BLOCKED runs by block reason (the runs table's block_reason)
        self.replays = 0
        self.conflicts = 0
        self.engine_passes = 0  # engine passes run for the single-request door
        self.coalesced_requests = 0  # requests those passes computed
        self.latency: dict[str, list] = {}  # endpoint -> [bucket counts..., sum, count]

    def run(self, result: dict, block_reason: str | None = None) -> None:
        """Count a computed run: its status, its universe exclusions and, if BLOCKED, why
        (``block_reason``, else the reason a ``simulate.Simulated`` result carries)."""
        with self._lock:
            status = result.get("status")
            self.status[status] = self.status.get(status, 0) + 1
            blocked_by = block_reason or getattr(result, "block_reason", None)
            if status == "BLOCKED" and blocked_by:
                self.blocked[blocked_by] = self.blocked.get(blocked_by, 0) + 1
            for ex in (result.get("universe") or {}).get("excluded") or []:
                excluded_by = ex.get("reason_code") or "UNKNOWN"
                self.exclusions[excluded_by] = self.exclusions.get(excluded_by, 0) + 1

    def response(self, endpoint: str, code: int, seconds: float) -> None:
        with self._lock:
            self.responses[(endpoint, code)] = self.responses.get((endpoint, code), 0) + 1
            h = self.latency.setdefault(endpoint, [0] * len(LATENCY_BUCKETS) + [0.0, 0])
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def engine_pass(self, requests: int) -> None:
        with self._lock:
            self.engine_passes += 1
            self.coalesced_requests += requests

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def render(self) -> str:
        with self._lock:
            out = [
                "# HELP dpm_sim_status_total Simulated runs by final status.",
                "# TYPE dpm_sim_status_total counter",
            ]
            out += [f'dpm_sim_status_total{{status="{_label(s)}"}} {n}' for s, n in self.status.items()]
            out += [
                "# HELP dpm_sim_exclusion_total Universe exclusions by reason code.",
                "# TYPE dpm_sim_exclusion_total counter",
            ]
            out += [f'dpm_sim_exclusion_total{{reason="{_label(r)}"}} {n}' for r, n in sorted(self.exclusions.items())]
            out += [
                "# HELP dpm_sim_blocked_total Blocked runs by block reason (a sweep's runs.block_reason).",
                "# TYPE dpm_sim_blocked_total counter",
            ]
            out += [f'dpm_sim_blocked_total{{reason="{_label(r)}"}} {n}' for r, n in sorted(self.blocked.items())]
            out += [
                "# HELP dpm_sim_replay_total Responses replayed from the run store.",
                "# TYPE dpm_sim_replay_total counter",
                f"dpm_sim_replay_total {self.replays}",
                "# HELP dpm_sim_conflict_total Idempotency-Key conflicts (409).",
                "# TYPE dpm_sim_conflict_total counter",
                f"dpm_sim_conflict_total {self.conflicts}",
                "# HELP dpm_sim_engine_passes_total Engine passes run for POST /rebalance/simulate (each one or more coalesced requests).",
                "# TYPE dpm_sim_engine_passes_total counter",
                f"dpm_sim_engine_passes_total {self.engine_passes}",
                "# HELP dpm_sim_coalesced_requests_total Requests computed by those engine passes.",
                "# TYPE dpm_sim_coalesced_requests_total counter",
                f"dpm_sim_coalesced_requests_total {self.coalesced_requests}",
                "# HELP dpm_http_responses_total HTTP responses by endpoint and code.",
                "# TYPE dpm_http_responses_total counter",
            ]
            out += [
                f'dpm_http_responses_total{{endpoint="{e}",code="{c}"}} {n}'
                for (e, c), n in sorted(self.responses.items())
            ]
            out += [
                "# HELP dpm_sim_latency_seconds Request latency of the simulate endpoints.",
                "# TYPE dpm_sim_latency_seconds histogram",
            ]
            for endpoint, h in sorted(self.latency.items()):
                for bound, n in zip(LATENCY_BUCKETS, h):
                    out.append(f'dpm_sim_latency_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {n}')
                out.append(f'dpm_sim_latency_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {h[-1]}')
                out.append(f'dpm_sim_latency_seconds_sum{{endpoint="{endpoint}"}} {h[-2]:.6f}')
                out.append(f'dpm_sim_latency_seconds_count{{endpoint="{endpoint}"}} {h[-1]}')
            return "\n".join(out) + "\n"


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- helpers ---------------------------------------------------------------------------------
def _json_bytes(body) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _invalid(errors: list[dict], instance: str) -> dict:
    return RequestError(errors).problem(instance)


def _internal_error(instance: str) -> dict:
    return problem("about:blank", "Internal Server Error", 500, "An unexpected error occurred.", instance)


def _is_json_media_type(content_type: str | None) -> bool:
    """Whether a body sent with this ``Content-Type`` is read as JSON, as FastAPI reads it:
    ``application/json`` or ``application/*+json`` (parameters such as a charset aside),
    or no header at all."""
    if not content_type:  # no header, or an empty one: FastAPI tests ``if not content_type``
        return True
    header = email.message.Message()
    header["content-type"] = content_type
    subtype = header.get_content_subtype()
    return header.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _parse_body(raw: bytes, content_type: str | None = None, expected: str = "a JSON object") -> tuple[object, list[dict]]:
    """JSON body → (value, errors). Never raises. A body sent as another media type is
    not parsed: FastAPI hands its bytes to the request model, which finds no object.
    Only a body of no bytes is empty, as for FastAPI: whitespace is malformed JSON."""
    if not raw:
        return None, [fault("$", f"request body is empty; expected {expected}", "missing")]
    if not _is_json_media_type(content_type):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return None, [fault("$", f"the body is sent as {content_type!r}, not as JSON: send it with Content-Type: application/json",
                            "model_attributes_type", text)]
    try:
        return json.loads(raw.decode("utf-8-sig")), []  # RFC 8259: JSON text is UTF-8
    except UnicodeDecodeError as exc:
        return None, [fault("$", f"request body is not valid UTF-8 text: {exc.reason} at byte {exc.start}", "json_invalid")]
    except json.JSONDecodeError as exc:  # FastAPI's loc: the body and the character offset
        return None, [fault("$", f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", "json_invalid",
                            loc=["body", exc.pos])]
    except RecursionError:
        return None, [fault("$", "malformed JSON: nested too deeply", "json_invalid")]
    except ValueError as exc:  # e.g. an integer literal with too many digits
        return None, [fault("$", f"malformed JSON: {exc}", "json_invalid")]


def _portfolio_id(body) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("portfolio_snapshot"), dict):
        pid = body["portfolio_snapshot"].get("portfolio_id")
        return pid if isinstance(pid, str) else None
    return None


def _stamp(result: dict, run_id: str) -> None:
    """Give a result its run id (and the universe/target ids derived from it, spec §5.2-5.3)."""
    result["rebalance_run_id"] = run_id
    if isinstance(result.get("universe"), dict):
        result["universe"]["universe_id"] = f"u_{run_id}"
    if isinstance(result.get("target"), dict):
        result["target"]["target_id"] = f"t_{run_id}"


class _JsonLines(logging.Formatter):
    """The engine's own log records (an isolated pass, a failed scenario) as JSON lines,
    so that the service's log stays one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "logger": record.name, "level": record.levelname,
                           "message": record.getMessage()}, separators=(",", ":"), default=str)


def _to_stderr(logger: logging.Logger, formatter: logging.Formatter) -> None:
    """``logger`` writes to stderr through ``formatter``, and only there, unless it already
    has a handler (a second app in one process, or the host's own logging)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.propagate = False


def _configure_logging() -> None:
    _to_stderr(log, logging.Formatter("%(message)s"))
    log.setLevel(logging.INFO)


def _engine_logs_as_json() -> None:
    """The serving process's engine loggers (``dpm_vec.*``) write JSON lines too; set only
    by ``serve``, so an app built in another process keeps that process's logging."""
    _to_stderr(logging.getLogger("dpm_vec"), _JsonLines())


def _log(level: int, **fields) -> None:
    fields = {"ts": round(time.time(), 3), "logger": "dpm_vec.api", "level": logging.getLevelName(level), **fields}
    log.log(level, json.dumps(fields, separators=(",", ":"), default=str))


class _Outcome:
    """What one request produced: the HTTP answer plus what the log line needs."""

    def __init__(self, code: int, body, *, problem: bool = False, headers: dict | None = None,
                 run_id: str | None = None, status: str | None = None, replay: bool = False, raw: bytes | None = None):
        self.code, self.body, self.problem, self.headers = code, body, problem, dict(headers or {})
        self.run_id, self.status, self.replay, self.raw = run_id, status, replay, raw
        self.portfolio_id: str | None = None
        self.log_fields: dict = {}
        self.log_level: int | None = None  # else INFO for a READY or batch 200, WARNING otherwise

    def response(self) -> Response:
        content = self.raw if self.raw is not None else _json_bytes(self.body)
        media = PROBLEM_JSON if self.problem else "application/json"
        return Response(content=content, status_code=self.code, media_type=media, headers=self.headers)


# RFC-0001 §9.1: a run's log line says how it ended at the level the RFC gives
RUN_LOG_LEVELS = {"READY": logging.INFO, "PENDING_REVIEW": logging.WARNING, "BLOCKED": logging.ERROR}


def _run_log(status: str, block_reason: str | None, block_detail: str | None, universe: dict | None = None) -> dict:
    """A computed run's log fields: RFC-0001 §9.1's message ("Run completed", "Soft
    constraint breach", "Hard constraint breach", "Data quality block"), its universe as
    "N eligible, M excluded", and for a blocked run why (the runs table's block_reason and
    block_detail, which the reference's result has no field for)."""
    messages = {"READY": "Run completed", "PENDING_REVIEW": "Soft constraint breach", "BLOCKED": "Hard constraint breach"}
    fields = {"message": "Data quality block" if block_reason == "DATA_QUALITY" else messages[status]}
    if isinstance(universe, dict):
        eligible = {*(universe.get("eligible_for_buy") or []), *(universe.get("eligible_for_sell") or [])}
        fields["universe"] = f"{len(eligible)} eligible, {len(universe.get('excluded') or [])} excluded"
    if status == "BLOCKED":
        fields |= {"block_reason": block_reason, "block_detail": block_detail}
    return fields


# -- the app ---------------------------------------------------------------------------------
def _canonical_uuid(key: str) -> str | None:
    """RFC-0001 §7's Idempotency-Key, a UUID in any of the forms ``uuid.UUID`` reads
    (capitals, braces), in its one canonical spelling; None if it is no UUID."""
    try:
        return str(uuid.UUID(key))
    except ValueError:
        return None


def create_app(store_path: str | None = None, idempotency: str = "reference", max_coalesce: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The service; ``max_coalesce`` caps the requests one engine pass of the single-request
    door computes (1: every request its own pass, run concurrently as they come); a body
    of more than ``max_body_bytes`` is refused with 413 before it is read whole."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1; got {max_body_bytes}")
    if idempotency not in MODES:
        raise ValueError(f"idempotency must be one of {', '.join(MODES)}; got {idempotency!r}")
    if max_coalesce < 1:
        raise ValueError(f"max_coalesce must be >= 1; got {max_coalesce}")
    _configure_logging()
    rfc = idempotency == "rfc"
    store = RunStore(store_path) if rfc else None
    metrics = Metrics()

    def engine(bodies: list) -> list[dict | BaseException]:
        """Each body's result, or the exception that stands for it (``simulate_outcomes``):
        a single call's problem is its own, not a slot of the pass it shared."""
        return simulate_outcomes(bodies)  # looked up per call: tests replace it

    if max_coalesce > 1:
        coalescer = Coalescer(engine, max_batch=max_coalesce, on_pass=metrics.engine_pass)
        simulate_one = coalescer.submit
    else:
        coalescer = None

        def simulate_one(body: dict) -> dict | BaseException:  # no queue: concurrent requests run concurrent passes
            try:
                return engine([body])[0]
            finally:
                metrics.engine_pass(1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _log(logging.INFO, event="startup", idempotency=idempotency, store=store_path if rfc else None,
             engine_version=__version__)
        try:
            yield
        finally:
            if store is not None:
                store.close()

    app = FastAPI(title="dpm_vec rebalance simulation", version=__version__, lifespan=lifespan)
    app.state.store = store
    app.state.metrics = metrics
    app.state.idempotency = idempotency
    app.state.coalescer = coalescer

    def invalid(errors: list[dict], instance: str, headers: dict) -> _Outcome:
        """An invalid request's 422: the reference's body (FastAPI's ``{"detail": [...]}``,
        spec §2.4), or in ``rfc`` mode an RFC 7807 problem naming every field."""
        if rfc:
            return _Outcome(422, _invalid(errors, instance), problem=True, headers=headers)
        return _Outcome(422, RequestError(errors).validation_detail(), headers=headers)

    def correlation(request: Request) -> tuple[str | None, dict]:
        given = request.headers.get("x-correlation-id")
        if not rfc:
            return given, {}
        cid = given or f"c_{uuid.uuid4().hex[:12]}"
        return cid, {"X-Correlation-Id": cid}

    def simulate_work(raw: bytes, content_type: str | None, cid: str | None, headers: dict, key: str | None) -> _Outcome:
        body, errors = _parse_body(raw, content_type)
        outcome = simulate_sync(body, errors, key, cid, headers)
        outcome.portfolio_id = _portfolio_id(body)
        return outcome

    def simulate_sync(body, errors: list[dict], key: str | None, cid: str | None, headers: dict) -> _Outcome:
        canonical = _canonical_uuid(key) if rfc and key is not None else None
        if not rfc and any(e.get("type") == "json_invalid" for e in errors):
            return invalid(errors, SIMULATE_PATH, headers)  # as FastAPI: the body's JSON fails before any header is read
        if key is None:
            errors.insert(0, fault("header.Idempotency-Key", "field required", "missing"))
        elif rfc and not key.strip():
            errors.insert(0, fault("header.Idempotency-Key", "must not be empty", value=key))
        elif rfc and canonical is None:
            errors.insert(0, fault("header.Idempotency-Key", f"must be a UUID (RFC-0001 §7), got {key[:80]!r}", value=key))
        if body is not None and not isinstance(body, dict):
            errors.append(not_an_object(body))
        if errors:
            if isinstance(body, dict):  # header fault only: still list every body fault
                try:
                    parse_request(body, "r0")
                except RequestError as exc:
                    errors.extend(exc.errors)
            return invalid(errors, SIMULATE_PATH, headers)
        if rfc:  # one key however it is spelt: UUIDs compare without regard to case or braces
            key = canonical

        digest = request_hash(body) if rfc else None
        if rfc:
            stored = store.lookup_run(key)
            if stored is not None:
                return replay_or_conflict(stored, digest, headers)

        try:  # checked here, not in the shared pass: an invalid body takes no pass slot and waits for none
            parse_request(body, "r0")
        except RequestError as exc:
            return invalid(exc.errors, SIMULATE_PATH, headers)
        result = simulate_one(body)  # shares an engine pass with concurrent callers
        if isinstance(result, RangeError):  # valid, but outside the engine's range: say which trade or value
            return _Outcome(422, result.problem(SIMULATE_PATH), problem=True, headers=headers)
        if isinstance(result, InfeasibleConstraintError):  # RFC-0001 §7, asked for by options.rfc_domain_errors
            body = result.problem(SIMULATE_PATH)
            if rfc:  # as a result there carries it (RFC §7's example does)
                body["correlation_id"] = cid
            metrics.run({"status": "BLOCKED"}, "INFEASIBLE_CONCENTRATION")
            blocked = _Outcome(422, body, problem=True, headers=headers, status="BLOCKED")
            blocked.log_level, blocked.log_fields = logging.ERROR, _run_log("BLOCKED", "INFEASIBLE_CONCENTRATION", str(result))
            return blocked
        if isinstance(result, BaseException):  # the engine could not compute this request
            failed = _Outcome(500, _internal_error(SIMULATE_PATH), problem=True, headers=headers)
            failed.log_level, failed.log_fields = logging.ERROR, {"error": f"{type(result).__name__}: {result}"}  # a fault of ours, as any 500
            return failed

        run_id = new_run_id()
        _stamp(result, run_id)
        if rfc:
            result["correlation_id"] = cid
            result["lineage"]["request_hash"] = digest
            result["lineage"]["idempotency_key"] = key
        else:
            result["lineage"]["request_hash"] = key  # spec §2.2: the key, verbatim
        if rfc:
            for _ in range(5):
                try:
                    stored, inserted = store.save(key, digest, result["status"], result, run_id=run_id)
                    break
                except DuplicateRunId:  # 8 random hex digits: a collision is rare, not impossible
                    run_id = new_run_id()
                    _stamp(result, run_id)
                except IdempotencyConflict:  # a concurrent request with this key won the race
                    return replay_or_conflict(store.lookup_run(key), digest, headers)
            else:
                raise RuntimeError("could not allocate a unique run id")
            if not inserted:  # the same request, stored concurrently: serve the stored answer
                return replay_or_conflict(stored, digest, headers)
        metrics.run(result)
        done = _Outcome(200, result, headers=headers, run_id=run_id, status=result["status"])
        done.log_fields = _run_log(result["status"], getattr(result, "block_reason", None), getattr(result, "block_detail", None),
                                   result.get("universe"))
        done.log_level = RUN_LOG_LEVELS[result["status"]]
        return done

    def replay_or_conflict(stored, digest: str, headers: dict) -> _Outcome:
        if stored.request_hash == digest:
            metrics.count("replays")
            return _Outcome(200, stored.payload, headers={**headers, "Idempotent-Replay": "true"},
                            run_id=stored.id, status=stored.status, replay=True)
        metrics.count("conflicts")
        conflict = problem(
            CONFLICT_TYPE, "Idempotency key conflict", 409,
            f"Idempotency-Key {stored.idempotency_key!r} was already used with a different request body.",
            SIMULATE_PATH, code="IDEMPOTENCY_KEY_CONFLICT", rebalance_run_id=stored.id,
        )
        return _Outcome(409, conflict, problem=True, headers=headers, run_id=stored.id)

    def batch_work(raw: bytes, content_type: str | None, cid: str | None, headers: dict, key: str | None) -> _Outcome:
        body, errors = _parse_body(raw, content_type, "a JSON array of requests")
        if body is not None and not isinstance(body, list):
            errors.append(fault("$", "request body must be a JSON array of requests", "list_type", body))
        if errors:
            return _Outcome(422, _invalid(errors, BATCH_PATH), problem=True, headers=headers)
        slots = simulate_many(body)
        for i, slot in enumerate(slots):
            if isinstance(slot.get("status"), int):  # a problem object (422 invalid, 500 not computable)
                slot["instance"] = f"{BATCH_PATH}#/{i}"
                continue
            _stamp(slot, new_run_id())
            if rfc:
                slot["correlation_id"] = cid
            metrics.run(slot)
        counts: dict[str, int] = {}
        for slot in slots:
            s = "INVALID" if slot.get("status") == 422 else slot.get("status")
            counts[s] = counts.get(s, 0) + 1
        outcome = _Outcome(200, slots, headers=headers)
        outcome.log_fields = {"requests": len(slots), "statuses": counts}
        return outcome

    def analyze_work(raw: bytes, content_type: str | None, cid: str | None, headers: dict, key: str | None) -> _Outcome:
        """§7: no header needed; whole-request faults are 422, bad scenarios fail alone."""
        body, errors = _parse_body(raw, content_type)
        if errors:
            return invalid(errors, ANALYZE_PATH, headers)
        try:
            result = analyze(body)
        except RequestError as exc:
            return invalid(exc.errors, ANALYZE_PATH, headers)
        for slot in result["results"].values():
            if rfc:  # each scenario's result echoes the id, as a batch slot's does
                slot["correlation_id"] = cid
            metrics.run(slot)
        outcome = _Outcome(200, result, headers=headers)
        outcome.log_fields = {"scenarios": len(result["results"]), "failed": len(result["failed_scenarios"])}
        return outcome

    async def read_body(request: Request) -> bytes | None:
        """The body, or None once it is known to exceed ``max_body_bytes`` (by its
        Content-Length, or while streaming it): a client cannot make the service hold more."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(request: Request, endpoint: str, work) -> Response:
        started = time.perf_counter()
        cid, headers = correlation(request)
        # a header sent twice: the reference reads the first; in rfc mode it is one comma-separated
        # value (RFC 9110 §5.3), no UUID, so a 422
        keys = request.headers.getlist("idempotency-key")
        key = (", ".join(keys) if rfc else keys[0]) if keys else None
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        content_type = request.headers.get("content-type")
        try:
            if encoding not in ("", "identity"):  # the body is not read: a compressed one is no JSON
                outcome = _Outcome(415, problem(UNSUPPORTED_ENCODING, "Unsupported Content-Encoding", 415,
                                                f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed",
                                                request.url.path), problem=True, headers=headers)
            elif (rfc or endpoint == "batch") and not _is_json_media_type(content_type):
                # the reference's routes answer such a body FastAPI's 422 (the work's); dpm_vec's own say why
                outcome = _Outcome(415, problem(UNSUPPORTED_MEDIA_TYPE, "Unsupported Media Type", 415,
                                                f"Content-Type {content_type!r} is not JSON: send the body as application/json",
                                                request.url.path), problem=True, headers=headers)
            elif (raw := await read_body(request)) is None:
                outcome = _Outcome(413, problem(TOO_LARGE, "Request body too large", 413,
                                                f"the body is larger than {max_body_bytes:,} bytes, this service's limit "
                                                f"(dpm-vec serve --max-body-mb)", request.url.path),
                                   problem=True, headers=headers)
            else:
                outcome = await run_in_threadpool(work, raw, content_type, cid, headers, key)
        except ClientDisconnect:  # the client left before its body arrived: nothing failed here
            seconds = time.perf_counter() - started
            metrics.response(endpoint, CLIENT_CLOSED, seconds)
            _log(logging.INFO, event=endpoint, path=request.url.path, correlation_id=cid, idempotency_key=key,
                 http_status=CLIENT_CLOSED, latency_ms=round(seconds * 1000, 3), error="client disconnected before its body arrived")
            return Response(status_code=CLIENT_CLOSED, headers=headers)
        except ENGINE_FAILURES as exc:  # the 500 contract
            seconds = time.perf_counter() - started
            metrics.response(endpoint, 500, seconds)
            _log(logging.ERROR, event=endpoint, path=request.url.path, correlation_id=cid, idempotency_key=key,
                 http_status=500, latency_ms=round(seconds * 1000, 3), error=f"{type(exc).__name__}: {exc}")
            log.debug("unexpected error", exc_info=True)
            return JSONResponse(_internal_error(request.url.path), status_code=500, media_type=PROBLEM_JSON,
                                headers=headers)
        seconds = time.perf_counter() - started
        metrics.response(endpoint, outcome.code, seconds)
        ok = outcome.code == 200 and (endpoint in ("batch", "analyze") or outcome.status == "READY")
        level = outcome.log_level if outcome.log_level is not None else logging.INFO if ok else logging.WARNING
        fields = dict(event=endpoint, path=request.url.path, correlation_id=cid, portfolio_id=outcome.portfolio_id,
                      run_id=outcome.run_id, status=outcome.status, http_status=outcome.code,
                      latency_ms=round(seconds * 1000, 3), idempotency_key=key)
        fields.update(outcome.log_fields)
        if outcome.replay:
            fields["replay"] = True
        if outcome.code >= 400 and isinstance(outcome.body, dict):
            fields["errors"] = outcome.body.get("errors") or outcome.body.get("detail")
        _log(level, **fields)
        return outcome.response()

    @app.post(SIMULATE_PATH)
    async def simulate(request: Request) -> Response:
        return await handle(request, "simulate", simulate_work)

    @app.post(BATCH_PATH)
    async def simulate_batch(request: Request) -> Response:
        return await handle(request, "batch", batch_work)

    @app.post(ANALYZE_PATH)
    async def analyze_endpoint(request: Request) -> Response:
        return await handle(request, "analyze", analyze_work)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "engine_version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:  # anything outside handle()
        _log(logging.ERROR, event="error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        return JSONResponse(_internal_error(request.url.path), status_code=500, media_type=PROBLEM_JSON)

    return app


# -- running it ------------------------------------------------------------------------------
def serve(host: str = "127.0.0.1", port: int = 8000, store_path: str | None = None,
          idempotency: str = "reference", log_level: str = "info", max_coalesce: int = 64,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Run the service with uvicorn (blocks until stopped)."""
    import uvicorn

    app = create_app(store_path=store_path, idempotency=idempotency, max_coalesce=max_coalesce, max_body_bytes=max_body_bytes)
    _engine_logs_as_json()
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m dpm_vec.api ARGS`` is ``dpm-vec serve ARGS``: the same option checks
    (``--store`` needs ``--idempotency rfc``), errors and exit codes."""
    from dpm_vec.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
