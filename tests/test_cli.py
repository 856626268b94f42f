"""The command line as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
from decimal import Decimal
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from dpm_vec.codes import ENGINE_BLOCKS
from dpm_vec.inspect import query
from tests.golden_compare import strip_random

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDENS = Path(__file__).parent / "data" / "goldens" / "reference-service"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpm_vec.cli", *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_simulate_one_file_prints_one_object():
    proc = cli("simulate", str(DATA / "requests" / "fx_funding.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "READY"
    fx = [i for i in result["intents"] if i["intent_type"] == "FX_SPOT"]
    assert fx and fx[0]["pair"] == "USD/SGD" and fx[0]["intent_id"] == "oi_fx_2"


def test_simulate_batch_keeps_argument_order_and_isolates_invalid_slots(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"portfolio_snapshot": {"portfolio_id": "x"}}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    files = [DATA / "requests" / "fx_funding.json", bad, DATA / "requests" / "missing_price_block.json", broken]
    proc = cli("simulate", *map(str, files))
    assert proc.returncode == 2  # some slot failed
    slots = json.loads(proc.stdout)
    assert [s.get("status") for s in slots] == ["READY", 422, "BLOCKED", 422]
    fields = {e["field"] for e in slots[1]["errors"]}
    assert {"portfolio_snapshot.base_currency", "market_data_snapshot", "options"} <= fields
    assert "broken.json" in slots[3]["detail"]
    alone = json.loads(cli("simulate", str(files[2])).stdout)
    assert slots[2]["intents"] == alone["intents"] and slots[2]["rule_results"] == alone["rule_results"]


def test_simulate_directory_and_json_lines(tmp_path):
    requests = sorted((DATA / "requests").glob("*.json"))
    by_dir = json.loads(cli("simulate", str(DATA / "requests")).stdout)
    lines = "\n".join(json.dumps(json.loads(p.read_text())) for p in requests)
    by_stdin = json.loads(cli("simulate", "-", stdin=lines).stdout)
    assert len(by_dir) == len(requests) == len(by_stdin)
    # the same results, in file-name order, each as that file alone gives it
    assert [strip_random(r) for r in by_dir] == [strip_random(r) for r in by_stdin]
    alone = [json.loads(cli("simulate", str(p)).stdout) for p in requests]
    assert [strip_random(r) for r in by_dir] == [strip_random(r) for r in alone]


def _with_empty_references(request: dict) -> list[dict]:
    """The request with no model targets, with no shelf entries, and with no market data:
    a request may carry any of them empty, and the reference runs it."""
    empty = {"model_portfolio": {"targets": []}, "shelf_entries": [], "market_data_snapshot": {"prices": [], "fx_rates": []}}
    return [{**json.loads(json.dumps(request)), key: value} for key, value in empty.items()]


def test_import_requests_then_sweep_matches_the_batch(tmp_path):
    goldens = sorted(GOLDENS.glob("scenario_*.json"))
    requests = [json.loads(p.read_text())["inputs"] for p in goldens]
    requests += [json.loads(p.read_text()) for p in sorted((DATA / "requests").glob("*.json"))]
    # the extended features and the RFC options (as_of, trade_by) through the book's own columns
    scenarios = Path(__file__).parent / "data" / "scenarios"
    requests += [json.loads(p.read_text())["inputs"] for p in sorted([*scenarios.glob("ext_*.json"), *scenarios.glob("rfc_*.json")])]
    requests += _with_empty_references(requests[0])
    files = []
    for i, request in enumerate(requests):
        files.append(tmp_path / f"req{i:03d}.json")
        files[-1].write_text(json.dumps(request))
    batch = json.loads(cli("simulate", *map(str, files)).stdout)
    assert cli("import-requests", *map(str, files), "--out", str(tmp_path / "book")).returncode == 0
    swept = cli("sweep", str(tmp_path / "book"), "--out", str(tmp_path / "out"), "--quiet", "--threads", "2", "--shard-size", "7")
    assert swept.returncode == 0, swept.stderr
    n = len(files)
    printed = " ".join(swept.stderr.split())
    assert f"{-(-n // 7)} shard(s) of 7 on 2 thread(s), 0 resumed" in printed
    runs = pl.read_parquet(tmp_path / "out" / "runs" / "*.parquet")
    assert not runs["block_reason"].str.starts_with("UNKNOWN_").any()  # no request's reference is unknown, even an empty one
    # the summary counts the blocked runs by reason, most frequent first
    by_reason = runs.filter(pl.col("status") == "BLOCKED").group_by("block_reason").len().sort("len", "block_reason", descending=[True, False])
    assert by_reason.height > 3 and "blocked by: " + ", ".join(f"{r} {n:,}" for r, n in by_reason.iter_rows()) + ";" in printed
    # a request asking for RFC §7's problem (rfc_22) got one; the book has no such option: its run is
    # BLOCKED there, with the problem's code and detail
    problems = {i: slot for i, slot in enumerate(batch) if isinstance(slot["status"], int)}
    assert [slot["code"] for slot in problems.values()] == ["INFEASIBLE_CONCENTRATION"]
    for i, slot in problems.items():
        assert runs.row(i, named=True)["block_reason"] == slot["code"] and runs.row(i, named=True)["block_detail"] == slot["detail"]
    runs, batch = runs.filter(~pl.int_range(pl.len()).is_in(list(problems))), [r for i, r in enumerate(batch) if i not in problems]
    # every blocked run names why: a run dpm_vec's own checks or the reference's target stage
    # block, among the batch's warnings; one a rule blocks, by its first failed HARD rule
    assert runs.filter(pl.col("status") == "BLOCKED")["block_reason"].null_count() == 0
    assert runs.filter(pl.col("status") != "BLOCKED")["block_reason"].null_count() == runs.filter(pl.col("status") != "BLOCKED").height
    for reason, result in zip(runs["block_reason"], batch):
        failed = [r["rule_id"] for r in result["rule_results"] if (r["severity"], r["status"]) == ("HARD", "FAIL")]
        if reason in ENGINE_BLOCKS or (failed == [] and reason is not None):
            assert reason in result["diagnostics"]["warnings"], (reason, result["diagnostics"]["warnings"])
        elif reason is not None:
            assert reason == failed[0] and reason not in result["diagnostics"]["warnings"], (reason, failed)
    assert runs["status"].to_list() == [r["status"] for r in batch]
    assert runs["portfolio_id"].to_list() == [r["lineage"]["portfolio_snapshot_id"] for r in batch]
    assert runs["request_hash"].to_list() == [r["lineage"]["request_hash"] for r in batch]  # the request's own hash, kept
    assert runs["dq_count"].to_list() == [sum(map(len, r["diagnostics"]["data_quality"].values())) for r in batch]
    assert runs["security_intent_count"].to_list() == [sum(i["intent_type"] == "SECURITY_TRADE" for i in r["intents"]) for r in batch]
    assert runs["fx_intent_count"].to_list() == [sum(i["intent_type"] == "FX_SPOT" for i in r["intents"]) for r in batch]
    # the settlement ladder's points are the JSON's, day for day (two currencies in ext_06)
    ladder = pl.read_parquet(tmp_path / "out" / "cash_ladder" / "*.parquet")
    points = {key: [] for key in runs["run_key"]}
    for row in ladder.iter_rows(named=True):
        points.setdefault(row["run_key"], []).append((row["currency"], row["date_offset"], round(row["projected_balance"], 2)))
    printed = [sorted((p["currency"], p["date_offset"], round(Decimal(str(p["projected_balance"])), 2)) for p in r["diagnostics"]["cash_ladder"])
               for r in batch]
    assert [points[key] for key in runs["run_key"]] == printed
    assert max(len({c for c, _, _ in p}) for p in printed) == 2
    # warnings (dpm_vec's own block code first), tax totals and data-quality lists are the JSON's
    assert runs["warnings"].to_list() == [r["diagnostics"]["warnings"] for r in batch]
    assert any(r["diagnostics"]["warnings"][:1] == [code] for r, code in zip(batch, runs["block_reason"]) if code in ENGINE_BLOCKS)
    for column, key in (("realized_gain", "total_realized_gain"), ("realized_loss", "total_realized_loss")):
        assert [None if v is None else round(v, 2) for v in runs[column]] == [
            None if r["tax_impact"] is None else round(Decimal(str(r["tax_impact"][key]["amount"])), 2) for r in batch]
    assert runs["gross_turnover_notional_base"].null_count() == 0
    events = pl.read_parquet(tmp_path / "out" / "events" / "*.parquet").sort("run_key", "category", "event_order")
    listed = {key: {"warning": [], "PRICE_MISSING": [], "FX_MISSING": [], "SHELF_MISSING": []} for key in runs["run_key"]}
    for row in events.filter(pl.col("category").is_in(["warning", "data_quality"])).iter_rows(named=True):
        if row["run_key"] in listed:
            code = "warning" if row["category"] == "warning" else row["code"]
            listed[row["run_key"]][code].append(row["code"] if code == "warning" else row["instrument_id"] or row["currency"])
    assert [listed[key] for key in runs["run_key"]] == [
        {"warning": r["diagnostics"]["warnings"], **{k.upper(): items for k, items in r["diagnostics"]["data_quality"].items()}} for r in batch]


def test_generate_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert cli("generate", "--portfolios", "25", "--seed", "4", "--out", str(tmp_path / name)).returncode == 0
    for table in ("portfolios", "positions", "prices", "models"):
        assert pl.read_parquet(tmp_path / "a" / f"{table}.parquet").equals(pl.read_parquet(tmp_path / "b" / f"{table}.parquet"))


def test_analyze_prints_the_batch_response():
    golden = GOLDENS / "scenario_13_what_if_analysis.json"
    proc = cli("analyze", str(golden))
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert set(body["results"]) == {"ignore_checks"} and "invalid_case" in body["failed_scenarios"]


@pytest.mark.parametrize("args, says", [
    (["sweep", "/nonexistent/book", "--out", "/tmp/never"], "/nonexistent/book"),
    (["sweep", str(DATA / "sample_book"), "--out", "/tmp/never", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["sweep", str(DATA / "sample_book"), "--out", "/tmp/never", "--threads", "2", "--workers", "2"], "--threads applies to a sweep in this process"),
    (["sweep", str(DATA / "sample_book"), "--out", "/tmp/never", "--tables", "runs,trades"], "--tables: unknown dataset(s) trades"),
    (["sweep", str(DATA / "sample_book"), "--out", "/tmp/never", "--scheduler", "http://127.0.0.1:8786"],
     "--scheduler 'http://127.0.0.1:8786': unknown address scheme 'http'"),  # the dashboard's address, copied
    (["sweep", str(DATA / "sample_book"), "--out", "/tmp/never", "--scheduler", "tcp://127.0.0.1:8786", "--workers", "2"],
     "--workers starts a local Dask cluster and --scheduler uses an existing one: choose one"),
    (["query", "/nonexistent", "select 1"], "/nonexistent"),
    (["query", str(DATA / "sample_book"), " "], "no SQL given"),
    (["generate", "--portfolios", "-1", "--out", "/tmp/never"], "--portfolios must be 0 or more, got -1"),
    (["generate", "--portfolios", "5", "--min-holdings", "10", "--max-holdings", "2", "--out", "/tmp/never"],
     "need 1 <= --min-holdings <= --max-holdings, got 10 and 2"),
    (["serve", "--store", "/tmp/never/runs.duckdb"], "--store keeps the RFC idempotency mode's runs"),
    (["serve", "--store", "/tmp/never/runs.duckdb", "--idempotency", "rfc"], "--store /tmp/never/runs.duckdb: /tmp/never does not exist"),
    (["serve", "--store", "", "--idempotency", "rfc"], "--store: an empty path"),  # not a store in memory without a word
    (["serve", "--store", str(DATA / "sample_book" / "portfolios.parquet" / "runs.duckdb"), "--idempotency", "rfc"],
     "portfolios.parquet is not a directory"),
])
def test_errors_are_one_line_without_traceback(args, says):
    proc = cli(*args)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dpm-vec: error:") and says in last
    assert "Traceback" not in proc.stderr
    assert not Path("/tmp/never").exists()


def test_query_names_a_damaged_dataset_file_in_one_line(tmp_path):
    """DuckDB reads every dataset's footers when query makes its views: a damaged part
    file of any dataset is one error line naming it, not a traceback."""
    out = tmp_path / "out"
    assert cli("sweep", str(DATA / "sample_book"), "--out", str(out), "--quiet", "--tables", "runs,intents").returncode == 0
    (out / "intents" / "part-00000.parquet").write_text("garbage")
    proc = cli("query", str(out), "select count(*) from runs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"dpm-vec: error: {out / 'intents'}: cannot read dataset 'intents': Invalid Input Error: File '{out / 'intents' / 'part-00000.parquet'}'")


def test_query_printed_to_a_pipe_keeps_every_column_and_digit(tmp_path):
    """A pipe has no width: a wide result printed as a table must not squeeze its
    columns empty or cut 28-digit values to an ellipsis (--csv aside)."""
    out = tmp_path / "out"
    assert cli("sweep", str(DATA / "sample_book"), "--out", str(out), "--quiet", "--tables", "runs").returncode == 0
    sql = "select * from runs order by run_key limit 2"
    printed = cli("query", str(out), sql)
    assert printed.returncode == 0, printed.stderr
    columns, rows = query(out, sql)
    header = next(line for line in printed.stdout.splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == columns
    for row in rows:
        assert str(row[columns.index("before_total_value")]) in printed.stdout and row[0] in printed.stdout


@pytest.fixture(scope="module")
def runs_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs_only") / "out"
    assert cli("sweep", str(DATA / "sample_book"), "--out", str(out), "--quiet", "--tables", "runs").returncode == 0
    return out


def test_query_reads_only_its_own_folder_whatever_its_name(runs_out, tmp_path):
    """The folder's name is SQL and glob text to DuckDB: an apostrophe must not end the
    string, ``[1]`` must not match a sibling ``1`` (whose runs would be read instead), and a
    folder without Parquet files is no dataset (an empty view would fail every query)."""
    import duckdb

    from dpm_vec.inspect import connect

    (own_runs,) = query(runs_out, "select count(*) from runs")[1][0]
    out = tmp_path / "o'brien [1]"
    shutil.copytree(runs_out, out)
    sibling = shutil.copytree(runs_out, tmp_path / "o'brien 1")
    for part in sorted((sibling / "runs").glob("*.parquet")):  # the sibling's count differs from OUT's
        shutil.copy(part, part.with_name(f"again-{part.name}"))
    (out / "scratch").mkdir()
    assert query(out, "select count(*) from runs")[1] == [(own_runs,)]
    with pytest.raises(duckdb.CatalogException):
        connect(out).execute("select * from scratch")


@pytest.mark.parametrize("width", [20, 80])
def test_query_on_a_narrow_terminal_prints_a_block_per_row_with_every_value(runs_out, width):
    """Rich squeezes 38 columns into 80 characters by giving them no width at all: every
    value vanished from the table, silently. Too narrow a terminal gets one block of
    ``column  value`` lines per row instead, each value whole or folded."""
    import io

    from rich.console import Console

    from dpm_vec.printout import print_rows

    columns, rows = query(runs_out, "select * from runs order by run_key limit 2")
    screen = io.StringIO()
    print_rows(Console(file=screen, force_terminal=True, width=width, color_system=None), columns, rows)
    printed = screen.getvalue()
    assert printed.count("row 1 of 2") == printed.count("row 2 of 2") == 1
    if width == 80:  # a value of up to 40 characters on one line, beside its column
        for row in rows:
            for column, value in zip(columns, row):
                if value is not None and len(str(value)) <= 40:
                    assert any(column in line and str(value) in line for line in printed.splitlines()), (column, value)
    # folded or not, each value's characters are all there, in order, in the value column
    values = "".join(line.split("│")[2].strip() for line in printed.splitlines() if line.count("│") == 3)
    assert values == "".join("" if v is None else str(v) for row in rows for v in row)


def test_query_on_a_terminal_wide_enough_keeps_the_table(runs_out):
    import io

    from rich.console import Console

    from dpm_vec.printout import print_rows

    columns, rows = query(runs_out, "select run_key, status, before_total_value from runs order by run_key limit 3")
    screen = io.StringIO()
    print_rows(Console(file=screen, force_terminal=True, width=80, color_system=None), columns, rows)
    header = next(line for line in screen.getvalue().splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == columns
    assert all(str(row[2]) in screen.getvalue() for row in rows)


def test_query_table_drawn_line_by_line_is_richs_table(runs_out):
    """A query's table is drawn without Rich (Rich took 50 s for 26,000 rows): to a pipe
    it must be exactly the table Rich draws, wide characters included, and a line break
    in a value is an escape, not a broken row."""
    import io

    from rich.console import Console

    from dpm_vec.printout import _print_with_rich, print_rows

    for limit in (4, 0):
        columns, rows = query(runs_out, f"select run_key, status, before_total_value, '株式 Ø' as name, null as empty from runs order by run_key limit {limit}")
        fast, rich = io.StringIO(), io.StringIO()
        print_rows(Console(file=fast, width=80), columns, rows)
        _print_with_rich(Console(file=rich, width=80), columns, [["" if v is None else str(v) for v in row] for row in rows])
        assert fast.getvalue() == rich.getvalue() and ("6294278.42599437909139898929" in fast.getvalue()) == (limit > 0)
    broken = io.StringIO()
    print_rows(Console(file=broken, width=80), ["detail"], [("line one\nline two\t!",)])
    assert "│ line one\\nline two\\t! │" in broken.getvalue() and len(broken.getvalue().splitlines()) == 5


def _printed(rows: list[tuple], columns: list[str], width: int, encoding: str = "utf-8") -> str:
    """What ``print_rows`` shows on a terminal of ``width`` cells whose encoding is ``encoding``."""
    import io

    from rich.console import Console

    from dpm_vec.printout import print_rows

    class Screen(io.StringIO):
        @property
        def encoding(self) -> str:
            return encoding

    screen = Screen()
    print_rows(Console(file=screen, force_terminal=True, width=width, color_system=None), columns, rows)
    return screen.getvalue()


def test_printout_chooses_table_folded_table_or_blocks_by_width_and_length(monkeypatch):
    """A table that fits is drawn whole; one that fits only with its columns folded to a
    readable width is Rich's folded table, its values taken as text, never markup; a
    longer result (Rich takes seconds) or a narrower terminal gets blocks, whose name
    column takes at most half the width; no rows says which columns there were."""
    import dpm_vec.printout
    from rich.cells import cell_len

    columns = ["instrument_id", "note", "value"]
    rows = [("FUND_" + "A" * 25, "[bold]kept[/bold] as written", "1234567890.123456789012345678"),
            ("FUND_" + "B" * 25, "second", "-1")]
    whole = _printed(rows, columns, 120)
    assert whole.splitlines()[1].startswith("┃ instrument_id") and len(whole.splitlines()) == 6
    folded = _printed(rows, columns, 60)
    assert "row 1 of" not in folded and folded.startswith("┏") and max(map(cell_len, folded.splitlines())) <= 60
    assert "[bold]kept[/bold]" in "".join(line.split("│")[2].strip() for line in folded.splitlines() if line.count("│") == 4)
    monkeypatch.setattr(dpm_vec.printout, "RICH_FOLDED_ROWS", 1)
    assert _printed(rows, columns, 60).startswith("row 1 of 2\n")
    long_names = _printed(rows, ["a_column_name_much_longer_than_half_the_terminal", "b"], 40)
    assert long_names.startswith("row 1 of 2\n") and max(map(cell_len, long_names.splitlines())) == 40
    assert _printed([], columns, 20) == "0 rows; columns: instrument_id, note, value\n"


def test_printout_draws_ascii_and_escapes_names_for_an_encoding_without_box_characters():
    """A terminal in ASCII (a Windows code page, LANG=C) gets +-| lines, and a column name
    or value it cannot show as a backslash escape, never a UnicodeEncodeError."""
    printed = _printed([("Zürich €",)], ["naïve\tname"], 80, encoding="ascii")
    assert printed.splitlines() == ["+------------------+", "| na\\xefve\\tname   |", "|------------------|",
                                    "| Z\\xfcrich \\u20ac |", "+------------------+"]
    printed.encode("ascii")


def test_query_streams_csv_and_bounds_a_table(runs_out, monkeypatch, capsys):
    """A sweep of a large book has tens of millions of intents: --csv streams them batch
    by batch, and a table (whose widths need every row held) refuses past its bound with
    a way out, instead of exhausting memory."""
    import dpm_vec.printout
    from dpm_vec.cli import main
    from dpm_vec.inspect import query_batches

    sql = "select run_key, status, before_total_value from runs order by run_key"
    columns, batches = query_batches(runs_out, sql, size=7)
    sizes = [len(batch) for batch in batches]
    assert sizes == [7] * 71 + [3] and columns == ["run_key", "status", "before_total_value"]
    assert main(["query", str(runs_out), sql, "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 501 and lines[1].startswith("PF0000000,")
    monkeypatch.setattr(dpm_vec.printout, "TABLE_ROWS", 499)
    assert main(["query", str(runs_out), sql]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and "more than 499 rows" in printed.err and "--csv" in printed.err
    monkeypatch.setattr(dpm_vec.printout, "TABLE_ROWS", 500)
    assert main(["query", str(runs_out), sql]) == 0
    assert capsys.readouterr().out.count("│ PF0") == 500


def test_query_prints_what_the_terminal_cannot_encode_as_escapes(runs_out, monkeypatch):
    """An id the output encoding cannot show used to stop the CSV after its header with a
    UnicodeEncodeError traceback; it now prints as a backslash escape."""
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")
    for form in (["--csv"], []):
        printed = cli("query", str(runs_out), "select 'FONDS_\u00d8_\U0001f4b6' as instrument_id, count(*) as n from runs", *form)
        assert printed.returncode == 0 and "Traceback" not in printed.stderr, printed.stderr
        assert "FONDS_\\xd8_\\U0001f4b6" in printed.stdout and "500" in printed.stdout, printed.stdout


def test_query_csv_lines_end_as_unix_lines_do(runs_out):
    """csv's default CRLF left a carriage return in the last field of every line a shell
    tool read (``cut -d, -f2`` printed ``500\\r``)."""
    printed = subprocess.run([sys.executable, "-m", "dpm_vec.cli", "query", str(runs_out), "select 1 as a, count(*) as n from runs", "--csv"],
                             capture_output=True, timeout=300)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == b"a,n\n1,500\n"


def test_the_sweep_summary_folds_on_a_narrow_terminal(tmp_path):
    """At 20 columns the summary cut statuses and shares to an ellipsis ("PE…", "52…")."""
    code, stdout, drawn = _on_a_terminal("sweep", str(DATA / "sample_book"), "--out", str(tmp_path / "out"), "--quiet", "--tables", "runs",
                                         columns=20)
    assert code == 0, drawn
    assert "…" not in drawn
    lines = drawn.splitlines()
    assert max(len(line) for line in lines if "│" in line) <= 20
    cells = "".join(line.split("│")[1].strip() for line in lines if line.count("│") == 4)
    assert "PENDING_REVIEW" in cells and "READY" in cells
    shares = "".join(line.split("│")[3].strip() for line in lines if line.count("│") == 4)
    assert "52.8%" in shares and "100.0%" in shares


def test_the_sweep_summary_in_a_log_keeps_each_line_whole(tmp_path):
    """stderr to a file or a pipe (a batch job's log) has no width: the summary was wrapped
    at 80 columns, breaking the query command to paste, and the what-if table folded its
    turnover sums mid-digits ("794,010,256." over "38")."""
    out = tmp_path / "out"
    swept = cli("sweep", str(DATA / "sample_book"), "--out", str(out), "--quiet", "--scenarios", str(DATA / "scenarios.json"))
    assert swept.returncode == 0, swept.stderr
    lines = swept.stderr.splitlines()
    command = f"dpm-vec query {out} \"select run_key, block_reason, block_detail from runs where status = 'BLOCKED'\""
    assert any(line.startswith("blocked by: ") and line.endswith(command) for line in lines)
    assert any(line.startswith("2 shard(s) of ") and line.endswith(" portfolios/s); intents: 80,778") for line in lines)
    comparison = json.loads((out / "manifest.json").read_text())["scenario_comparison"]
    assert len(comparison) == 4
    for scenario in comparison:
        row = [line for line in lines if line.startswith(f"│ {scenario['scenario_id']} ")]
        assert len(row) == 1
        cells = [cell.strip() for cell in row[0].split("│")[1:-1]]
        assert cells == [scenario["scenario_id"], f"{scenario['portfolios']:,}", f"{scenario['ready']:,}", f"{scenario['pending_review']:,}",
                         f"{scenario['blocked']:,}", f"{scenario['security_intents']:,}", f"{Decimal(scenario['gross_turnover_notional_base_sum']):,.2f}"]


def test_the_progress_bar_is_drawn_on_the_terminal_not_into_redirected_output(tmp_path):
    """stderr on a terminal turns the bar on; it was drawn on stdout, so `sweep ... >
    file` showed no bar and left its last frame in the file."""
    code, stdout, drawn = _on_a_terminal("sweep", str(DATA / "sample_book"), "--out", str(tmp_path / "out"), "--tables", "runs")
    assert code == 0, drawn
    assert stdout == ""
    assert "500/500" in drawn and "PENDING_REVIEW" in drawn


def _on_a_terminal(*args: str, columns: int = 100) -> tuple[int, str, str]:
    """The command with stderr on a pseudo-terminal of ``columns`` columns and stdout piped:
    its exit code, stdout, and what the terminal showed (colours stripped)."""
    import fcntl
    import os
    import pty
    import re
    import select
    import struct
    import termios
    import time

    terminal, stderr = pty.openpty()
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    unset = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    proc = subprocess.Popen([sys.executable, "-m", "dpm_vec.cli", *args], stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                            env={**{k: v for k, v in os.environ.items() if k not in unset}, "TERM": "xterm"})
    os.close(stderr)
    drawn, deadline = b"", time.monotonic() + 300
    while select.select([terminal], [], [], max(0.0, deadline - time.monotonic()))[0]:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # Linux: EIO once the program has closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(terminal)
    if proc.poll() is None and time.monotonic() > deadline:
        proc.kill()
    code = proc.wait(timeout=10)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.decode()).replace("\r\n", "\n")
    return code, proc.stdout.read().decode(), text


def test_paths_that_are_not_ascii_work_under_a_locale_that_is_not_utf8(tmp_path, monkeypatch):
    """Python encodes paths in the locale's encoding, Polars and DuckDB in UTF-8: under
    ``LC_ALL=C PYTHONUTF8=0`` (or a Latin-1 locale) a book named ``böök_€`` was refused as
    "not UTF-8 text", and a Latin-1 locale read and wrote other files than it named. The
    command now restarts in Python's UTF-8 mode."""
    book = tmp_path / "böök_€"
    shutil.copytree(DATA / "sample_book", book)
    monkeypatch.setenv("LC_ALL", "C")
    monkeypatch.setenv("PYTHONUTF8", "0")
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    out = tmp_path / "out_Ø"
    swept = cli("sweep", str(book), "--out", str(out), "--quiet", "--tables", "runs")
    assert swept.returncode == 0, swept.stderr
    printed = cli("query", str(out), "select count(*) as n from runs", "--csv")
    assert printed.returncode == 0 and printed.stdout.split() == ["n", "500"], printed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["böök_€", "out_Ø"])  # no other folder written


def _one_position_request(portfolio_id: str, instrument_id: str) -> dict:
    return {
        "portfolio_snapshot": {"portfolio_id": portfolio_id, "base_currency": "USD", "positions": [],
                               "cash_balances": [{"currency": "USD", "amount": "1000"}]},
        "market_data_snapshot": {"prices": [{"instrument_id": instrument_id, "price": "10", "currency": "USD"}], "fx_rates": []},
        "model_portfolio": {"targets": [{"instrument_id": instrument_id, "weight": "0.5"}]},
        "shelf_entries": [{"instrument_id": instrument_id, "status": "APPROVED"}],
        "options": {},
    }


def test_paths_and_ids_are_text_not_patterns_or_markup(tmp_path):
    """A book or OUT named ``x[b]1`` is that folder, not a pattern that also matches a
    neighbour ``xb1`` (Polars and DuckDB expand ``[...]`` in paths); ids and folders that
    look like Rich markup (``[red]``, ``[/]``) print as they are."""
    for name, portfolio_id, instrument_id in (("bkb1", "plain", "EQ_1"), ("bk[b]1", "[red]P1", "X[/]")):
        request = tmp_path / f"{portfolio_id}.json"
        request.write_text(json.dumps(_one_position_request(portfolio_id, instrument_id)))
        assert cli("import-requests", str(request), "--out", str(tmp_path / name)).returncode == 0
    assert cli("sweep", str(tmp_path / "bkb1"), "--out", str(tmp_path / "ob1"), "--quiet").returncode == 0
    out = tmp_path / "o[b]1"
    swept = cli("sweep", str(tmp_path / "bk[b]1"), "--out", str(out), "--quiet")
    assert swept.returncode == 0, swept.stderr
    assert "".join(f"dpm-vec sweep → {out}".split()) in "".join(swept.stderr.split())  # the title wraps on a narrow console
    printed = cli("query", str(out), "select portfolio_id, count(*) as \"[b]n\" from runs group by 1")
    assert printed.returncode == 0, printed.stderr
    assert "[red]P1" in printed.stdout and "[b]n" in printed.stdout and "plain" not in printed.stdout
    printed = cli("query", str(out), "select instrument_id from intents")
    assert printed.returncode == 0 and "Traceback" not in printed.stderr, printed.stderr
    assert "X[/]" in printed.stdout
    assert query(out, "select portfolio_id from runs")[1] == [("[red]P1",)]


@pytest.mark.parametrize("args, says", [
    (["--port", "70000"], "argument --port: must be a TCP port, an integer from 0 to 65535; got '70000'"),
    (["--port", "http"], "argument --port: must be a TCP port, an integer from 0 to 65535; got 'http'"),
    (["--max-coalesce", "0.5"], "argument --max-coalesce: must be an integer >= 1; got '0.5'"),
    (["--max-body-mb", "0"], "argument --max-body-mb: must be an integer >= 1; got '0'"),
])
def test_serve_options_out_of_range_are_named_before_the_server_starts(args, says):
    proc = cli("serve", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"dpm-vec serve: error: {says}"


def test_reason_code_docs_are_generated_from_the_enum():
    from dpm_vec.codes import markdown_table

    assert (Path(__file__).resolve().parents[1] / "docs" / "codes.md").read_text() == markdown_table()


def _beside_a_good_request(tmp_path, name: str, edit) -> list[dict]:
    """Simulate the fx_funding request and, after it, a copy changed by ``edit`` (written
    as ``name``.json): the call exits 2 with a problem slot, no traceback, and the good
    request still answers."""
    good = json.loads((DATA / "requests" / "fx_funding.json").read_text())
    bad = json.loads(json.dumps(good))
    edit(bad)
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / f"{name}.json").write_text(json.dumps(bad))
    proc = cli("simulate", str(tmp_path / "good.json"), str(tmp_path / f"{name}.json"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "one engine pass over 2 requests failed" in proc.stderr  # the operator sees why the call was slow
    slots = json.loads(proc.stdout)
    assert slots[0]["status"] == "READY"
    return slots


def test_a_request_that_overflows_is_a_422_and_fails_alone(tmp_path):
    """§9.1: a request whose arithmetic the engine's fixed point cannot hold (a 9e25 market
    value) gets a 422 value-out-of-range problem in its slot, never a traceback or a 500;
    the other requests of the call still answer."""
    def huge(req):
        req["market_data_snapshot"]["prices"][0]["price"] = "99999999999999999"
        req["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "900000000"}]

    slots = _beside_a_good_request(tmp_path, "huge", huge)
    assert slots[1]["status"] == 422 and slots[1]["type"].endswith("/value-out-of-range")
    # the value is named from the shared pass, which needs no halving to find it
    assert slots[1]["detail"] == ("request 2: the value of 900000000 units of US_EQ at 99999999999999999 is about 9.0E+25, "
                                  "beyond the engine's fixed-point range (values under 1E18)")
    alone = cli("simulate", str(tmp_path / "huge.json"))
    assert alone.returncode == 2
    assert json.loads(alone.stdout)["detail"] == slots[1]["detail"].replace("request 2", "request 1")


def test_negative_model_weights_that_overflow_a_sum_near_zero_are_a_422(tmp_path):
    """Negative model weights pass unvalidated (as in the reference): SELL_ONLY weight
    spread over buyable weights summing to 1e-15 is a ratio of 5e14, outside Decimal(38, 28):
    a 422 value-out-of-range problem naming the redistribution (until the fifty-eighth
    session only Polars' "overflow in decimal division"), not a 500."""
    def tiny_sum(req):
        req["market_data_snapshot"]["prices"] = [
            {"instrument_id": i, "price": "10", "currency": "USD"} for i in ("A", "B", "C")]
        req["model_portfolio"]["targets"] = [
            {"instrument_id": "A", "weight": "0.3"}, {"instrument_id": "B", "weight": "0.5"},
            {"instrument_id": "C", "weight": "-0.499999999999999"}]
        req["shelf_entries"] = [{"instrument_id": i, "status": s, "asset_class": "EQUITY"}
                                for i, s in (("A", "SELL_ONLY"), ("B", "APPROVED"), ("C", "APPROVED"))]

    slots = _beside_a_good_request(tmp_path, "tiny_sum", tiny_sum)
    assert slots[1]["status"] == 422 and slots[1]["type"].endswith("/value-out-of-range")
    assert slots[1]["detail"] == ("request 2: the SELL_ONLY redistribution to B (its weight 0.5 over a buyable sum of 0.000000000000001, "
                                  "then times 0.3) is about 5.0E+14, beyond the engine's weight range (weights under 1E+10)")


def test_a_trade_beyond_the_quantity_range_is_a_422_naming_it(tmp_path):
    """docs/features.md ("Arithmetic"): a trade of 9 x 10^9 units or more cannot be held in
    Decimal(38, 28) with the position it adds to; its request gets a 422 naming the trade,
    the other requests of the call still answer."""
    def penny(req):  # 5000 SGD / 1.35 / 1e-7: 3.7e10 units
        req["market_data_snapshot"]["prices"][0]["price"] = "0.0000001"

    slots = _beside_a_good_request(tmp_path, "penny", penny)
    assert slots[1]["status"] == 422 and slots[1]["type"].endswith("/quantity-out-of-range")
    assert slots[1]["detail"] == (
        "request 2: a BUY of 37037037037 units of US_EQ is outside the engine's quantity range (trades under 9,000,000,000 units)"
    )


def test_sweep_of_chosen_tables_writes_and_sums_up_those(tmp_path):
    swept = cli("sweep", str(DATA / "sample_book"), "--out", str(tmp_path / "out"), "--quiet", "--tables", "rule_results")
    assert swept.returncode == 0, swept.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["input_faults", "manifest.json", "rule_results", "runs"]
    summary = " ".join(swept.stderr.split())
    assert "portfolios/s)" in summary and "intents:" not in summary


def test_sweep_summary_points_at_input_faults(tmp_path):
    """A sweep over a book with one conflicting duplicate position finishes, and its
    summary says how many input faults blocked portfolios and where to read them."""
    book = tmp_path / "book"
    shutil.copytree(DATA / "sample_book", book)
    positions = pl.read_parquet(book / "positions.parquet")
    conflicting = positions.tail(1).with_columns(pl.col("quantity") + 1)
    pl.concat([positions, conflicting]).write_parquet(book / "positions.parquet")
    swept = cli("sweep", str(book), "--out", str(tmp_path / "out"), "--quiet", "--shard-size", "100")
    assert swept.returncode == 0, swept.stderr
    summary = " ".join(swept.stderr.split())
    assert "2 input fault(s) (values or rows that fail their checks)" in summary  # the two conflicting rows
    assert f'dpm-vec query {tmp_path / "out"} "select * from input_faults"' in summary
    runs = pl.read_parquet(tmp_path / "out" / "runs" / "*.parquet")
    victim = conflicting["portfolio_snapshot_id"][0]
    assert runs.filter(pl.col("portfolio_snapshot_id") == victim)["block_reason"].to_list() == ["INVALID_HOLDINGS"]
    assert runs.height == pl.read_parquet(book / "portfolios.parquet").height


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """``dpm-vec simulate DIR | head``: the closed pipe ends the command with 141 (as a
    Unix tool killed by SIGPIPE reports it), not with a traceback on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "dpm_vec.cli", "simulate", str(GOLDENS.parent / "reference-random" / "core")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100).startswith(b"[{")  # results well beyond the pipe's buffer follow
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


def test_import_requests_names_the_file_of_an_invalid_request(tmp_path):
    (tmp_path / "bad.json").write_text('{"portfolio_snapshot": {}}')
    good = Path(__file__).parent / "data" / "scenarios" / "rfc_05_notional_fund_sizing.json"
    proc = cli("import-requests", str(good), str(tmp_path / "bad.json"),
               "--out", str(tmp_path / "book"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"dpm-vec: error: {tmp_path / 'bad.json'}: market_data_snapshot")
    assert not (tmp_path / "book").exists()


def test_import_requests_refuses_a_value_the_door_takes_but_a_book_cannot_hold(tmp_path):
    """A lower-case cash currency runs at the JSON door, as in the reference; a book holds
    ISO codes and would block the run, so "sweep gives what the batch gives" would break:
    the import stops, naming the request and the value."""
    good = Path(__file__).parent / "data" / "scenarios" / "rfc_05_notional_fund_sizing.json"
    request = json.loads(good.read_text())["inputs"]
    request["portfolio_snapshot"]["cash_balances"][0]["currency"] = "usd"
    (tmp_path / "odd.json").write_text(json.dumps(request))
    assert cli("simulate", str(tmp_path / "odd.json")).returncode == 0
    proc = cli("import-requests", str(good), str(tmp_path / "odd.json"), "--out", str(tmp_path / "book"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"dpm-vec: error: {tmp_path / 'odd.json'}: cash.currency 'usd' fails str_matches('^[A-Z]{{3}}$'): the JSON door takes it")
    assert not (tmp_path / "book").exists()


@pytest.mark.parametrize("args, stdin, says", [
    (("simulate", "{empty}"), None, "{empty}: a directory with no *.json request files"),
    (("import-requests", "{empty}", "--out", "{book}"), None, "{empty}: a directory with no *.json request files"),
    (("simulate", "-"), "\n\n", "stdin (-): no requests; it takes JSON Lines, one compact request per line"),
])
def test_no_requests_at_all_is_an_error_not_an_empty_answer(tmp_path, args, stdin, says):
    """A directory without requests, or empty stdin, is a mistake to report (exit 2), not
    an empty array and success that a script would take for a clean run."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no requests here\n")
    paths = {"empty": str(tmp_path / "empty"), "book": str(tmp_path / "book")}
    proc = cli(*(a.format(**paths) for a in args), stdin=stdin)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == f"dpm-vec: error: {says.format(**paths)}"


def test_pretty_printed_json_on_stdin_says_stdin_takes_json_lines():
    proc = cli("simulate", "-", stdin=json.dumps({"portfolio_snapshot": {}}, indent=2))
    assert proc.returncode == 2
    assert "stdin takes JSON Lines, one compact request per line: pass a pretty-printed request as a file" in json.loads(proc.stdout)[0]["detail"]


def test_a_book_without_portfolios_is_refused(tmp_path):
    book = tmp_path / "book"
    shutil.copytree(DATA / "sample_book", book)
    pl.read_parquet(book / "portfolios.parquet").head(0).write_parquet(book / "portfolios.parquet")
    proc = cli("sweep", str(book), "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dpm-vec: error: {book / 'portfolios.parquet'}: no rows: a book with no portfolio has nothing to sweep")
    assert not (tmp_path / "out").exists()


def test_simulate_takes_a_golden_file_whose_answer_is_a_problem():
    """A scenario file keeps its request under ``inputs`` whether the expected answer is a
    result (``expected_output``) or a problem (``expected_problem``); ``simulate`` runs
    the request in both, as its help says."""
    scenario = Path(__file__).parent / "data" / "scenarios" / "rfc_22_infeasible_concentration_problem.json"
    proc = cli("simulate", str(scenario))
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == json.loads(scenario.read_text())["expected_problem"]


def test_serve_options_take_their_bounds():
    """Port 0 (any free port) and 65535 are TCP ports, 65536 is not; 1 is a count >= 1.
    Catches an off-by-one at either end of the range checks."""
    import argparse

    from dpm_vec.cli import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    for port in ("0", "65535"):
        assert parser.parse_args(["--port", port]).port == int(port)
    args = parser.parse_args(["--max-coalesce", "1", "--max-body-mb", "1"])
    assert (args.max_coalesce, args.max_body_mb) == (1, 1)
    for bad in (["--port", "65536"], ["--port", "-1"], ["--max-coalesce", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_generate_defaults_and_bad_data_reach_the_generator(tmp_path, capsys):
    """``generate`` without --seed or holdings writes generate_book_frames(N, 7) with 30..80
    holdings, as its help says; --bad-data writes the faulty book, not the clean one."""
    from dpm_vec.cli import main
    from dpm_vec.generate import generate_book_frames

    assert main(["generate", "--portfolios", "300", "--out", str(tmp_path / "clean")]) == 0
    assert main(["generate", "--portfolios", "300", "--bad-data", "--out", str(tmp_path / "bad")]) == 0
    assert "wrote a 300-portfolio book (seed 7)" in capsys.readouterr().err
    for name, bad_data in (("clean", False), ("bad", True)):
        frames = generate_book_frames(300, 7, bad_data=bad_data, holdings=(30, 80))
        for table in ("portfolios", "positions", "cash"):
            assert pl.read_parquet(tmp_path / name / f"{table}.parquet").equals(frames[table]), (name, table)
    assert not pl.read_parquet(tmp_path / "bad" / "cash.parquet").equals(pl.read_parquet(tmp_path / "clean" / "cash.parquet"))


def test_generate_refuses_holdings_below_one_in_one_line(tmp_path, capsys):
    from dpm_vec.cli import main

    assert main(["generate", "--portfolios", "3", "--min-holdings", "0", "--out", str(tmp_path / "book")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dpm-vec: error: holdings per portfolio: need 1 <= --min-holdings <= --max-holdings, got 0 and 80")
    assert not (tmp_path / "book").exists()


def test_stdin_problems_name_their_line_and_a_pretty_printed_array(monkeypatch, capsys):
    """A bad JSON line is named ``<stdin>:N`` counting from 1, as an editor does; a
    pretty-printed array (first line ``[``) gets the JSON Lines hint as an object does."""
    import io

    from dpm_vec.cli import main

    good = json.dumps(json.loads((DATA / "requests" / "fx_funding.json").read_text()))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{good}\n{{broken\n"))
    assert main(["simulate", "-"]) == 2
    slots = json.loads(capsys.readouterr().out)
    assert slots[0]["status"] == "READY" and slots[1]["detail"].startswith("<stdin>:2: ")
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([json.loads(good)], indent=2)))
    assert main(["simulate", "-"]) == 2
    assert "stdin takes JSON Lines" in json.loads(capsys.readouterr().out)[0]["detail"]


def test_a_request_file_not_in_utf8_or_nested_too_deep_is_a_422_slot(tmp_path, capsys):
    """A Latin-1 file, a JSON document nested past Python's recursion limit and a CSV file
    are unreadable requests (422 in their slot, naming the file and, for the Latin-1 and
    the CSV, that a JSON request was expected), not a traceback."""
    from dpm_vec.cli import main

    latin = tmp_path / "latin.json"
    latin.write_bytes('{"portfolio_snapshot": {"portfolio_id": "Zürich"}}'.encode("latin-1"))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    csv = tmp_path / "prices.csv"
    csv.write_text("instrument_id,price\nA,1.5\n")
    assert main(["simulate", str(DATA / "requests" / "fx_funding.json"), str(latin), str(deep), str(csv)]) == 2
    slots = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in slots] == ["READY", 422, 422, 422]
    assert slots[1]["detail"].startswith(f"{latin}: not UTF-8 text, so no JSON request ('utf-8' codec can't decode")
    assert slots[2]["detail"].startswith(f"{deep}: ")
    assert slots[3]["detail"] == f"{csv}: not a JSON request (Expecting value: line 1 column 1 (char 0))"


def test_files_saved_with_a_utf8_bom_read_as_json(tmp_path, capsys):
    """A request, an analyze batch and a scenarios file saved by a Windows editor start
    with a UTF-8 byte-order mark, which the HTTP door accepts: the CLI reads them too (it
    answered 422 "Unexpected UTF-8 BOM")."""
    from dpm_vec.cli import main

    def with_bom(source: Path, name: str) -> str:
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
        return str(tmp_path / name)

    assert main(["simulate", with_bom(DATA / "requests" / "fx_funding.json", "req.json")]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "READY"
    assert main(["analyze", with_bom(GOLDENS / "scenario_13_what_if_analysis.json", "batch.json")]) == 0
    assert set(json.loads(capsys.readouterr().out)["results"]) == {"ignore_checks"}
    assert main(["sweep", str(DATA / "sample_book"), "--out", str(tmp_path / "out"), "--quiet",
                 "--scenarios", with_bom(DATA / "scenarios.json", "scenarios.json")]) == 0


def test_import_requests_of_an_unreadable_file_is_one_error_line(tmp_path, capsys):
    from dpm_vec.cli import main

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["import-requests", str(DATA / "requests" / "fx_funding.json"), str(broken), "--out", str(tmp_path / "book")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"dpm-vec: error: {broken}: not a JSON request (Expecting property name")
    assert not (tmp_path / "book").exists()


def test_import_requests_never_replaces_the_book_holding_its_request(tmp_path, capsys):
    """An earlier book may be replaced, but not when a request being imported lies in it:
    the import would delete the file it read."""
    from dpm_vec.cli import main

    book = tmp_path / "book"
    assert main(["import-requests", str(DATA / "requests" / "fx_funding.json"), "--out", str(book)]) == 0
    request = book / "req.json"
    shutil.copy(DATA / "requests" / "fx_funding.json", request)
    assert main(["import-requests", str(request), "--out", str(book)]) == 2
    assert "would replace the input" in capsys.readouterr().err
    assert request.exists()


def test_analyze_failures_exit_2_with_a_problem(tmp_path, capsys):
    """An unreadable or invalid analyze request prints its problem and exits 2, so a
    script does not take it for an answer."""
    from dpm_vec.cli import main

    assert main(["analyze", str(tmp_path / "missing.json")]) == 2
    assert json.loads(capsys.readouterr().out)["status"] == 422
    (tmp_path / "empty.json").write_text("{}")
    assert main(["analyze", str(tmp_path / "empty.json")]) == 2
    assert json.loads(capsys.readouterr().out)["status"] == 422


def test_a_sweep_failing_on_a_file_says_it_resumes(monkeypatch, capsys):
    """An OSError (a full disk) or a Polars read/write error that ends a sweep is one line
    naming it and saying that committed shards are kept; a Polars error is named by type."""
    import dpm_vec.sweep
    from dpm_vec.cli import main
    from dpm_vec.errors import RESUMES

    for exc, says in ((OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
                      (pl.exceptions.ComputeError("parquet: bad page\nmore"), "ComputeError: parquet: bad page")):
        def failing(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(dpm_vec.sweep, "sweep", failing)
        assert main(["sweep", str(DATA / "sample_book"), "--out", "/tmp/never", "--quiet"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"dpm-vec: error: {says}; {RESUMES}"


def test_help_lists_every_command_in_plain_text(capsys):
    """``dpm-vec --help`` names each command and says where to read more, in plain text (no
    docstring markup), and exits 0."""
    from dpm_vec.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in ("simulate", "sweep", "generate", "import-requests", "analyze", "query", "serve"):
        assert f"\n    {command} " in text, command
    assert "'dpm-vec COMMAND --help'" in text and "README.md" in text
    assert "``" not in text


def test_ctrl_c_inside_generated_code_still_exits_130_under_python_m(tmp_path):
    """A Ctrl-C that lands in code run by ``exec`` of a string (dataclasses generate their
    methods that way, so it happens while a command still imports) leaves CPython's
    "unhandled KeyboardInterrupt" flag set even though the command catches it: under
    ``python -m`` the interpreter then kills itself with SIGINT after its exit, status -2
    instead of the documented 130. The command must exit 130 with its one message."""
    (tmp_path / "interrupted_cli.py").write_text(
        "import sys\n"
        "from dpm_vec import cli\n"
        "cli.cmd_query = lambda args: exec('raise KeyboardInterrupt')\n"
        "sys.exit(cli.main(['query', '.', 'select 1']))\n"
    )
    proc = subprocess.run([sys.executable, "-m", "interrupted_cli"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(DATA.parent)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == "dpm-vec: interrupted", proc.stderr
