"""Command line: ``dpm-vec simulate | sweep | generate | import-requests | analyze | query | serve``."""

from __future__ import annotations

import argparse
import codecs
import io
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

from dpm_vec.defaults import DEFAULT_SHARD_ROWS, MAX_DEFAULT_THREADS, PROCESSES_FROM_ROWS, PROCESSES_FROM_SHARDS, RUN_ROWS
from dpm_vec.errors import RESUMES, DpmVecError, problem

UNREADABLE = "https://dpm-vec.dev/problems/unreadable-request"

# what `dpm-vec --help` says above its commands (plain text: the module docstring is markup)
DESCRIPTION = ("Rebalance simulation, one JSON request at a time or a whole book of portfolios at once. "
               "Run 'dpm-vec COMMAND --help' for a command's options; README.md says where to start.")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, ``kill``) or SIGHUP (a closed terminal or ssh
    session), handled as Ctrl-C is: a sweep stops taking shards and the running ones
    commit, so the same command resumes. ``args[0]``: the signal's number."""


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def _read_text(path: str) -> str:
    """A JSON file's text, or standard input's for ``-``; a UTF-8 byte-order mark (a Windows
    editor's) is dropped, as the HTTP door reads the same bytes."""
    return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")


def _load_json(path: str):
    data = json.loads(_read_text(path))
    if isinstance(data, dict) and "inputs" in data and any(key.startswith("expected_") for key in data):
        return data["inputs"]  # a golden file (expected_output(s) or expected_problem): its request
    return data


def _read_requests(paths: list[str], names: list[str] | None = None) -> tuple[list, dict[int, dict]]:
    """Requests from files, directories (their *.json, sorted) or '-' (JSON lines on
    stdin); unreadable ones become RFC 7807 problems in their slot. ``names``, when given,
    receives where each slot came from (a file, or ``<stdin>:LINE``)."""
    requests, problems = [], {}
    names = [] if names is None else names
    for path in _expand(paths):
        if path == "-":
            before = len(requests)
            for n, line in enumerate(sys.stdin, start=1):
                if line.strip():
                    names.append(f"<stdin>:{n}")
                    _parse_into(requests, problems, f"<stdin>:{n}", lambda line=line: _json_line(line))
            if len(requests) == before:
                raise DpmVecError("stdin (-): no requests; it takes JSON Lines, one compact request per line")
        else:
            names.append(path)
            _parse_into(requests, problems, path, lambda path=path: _load_json(path))
    return requests, problems


def _json_line(line: str):
    """One JSON Lines request; a line that opens a pretty-printed document says so."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        if line.strip() in ("{", "["):
            raise json.JSONDecodeError(f"{exc.msg} (stdin takes JSON Lines, one compact request per line: "
                                       f"pass a pretty-printed request as a file)", exc.doc, exc.pos) from None
        raise


def _parse_into(requests: list, problems: dict, where: str, load) -> None:
    try:
        requests.append(load())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # a CSV or a Parquet file passed by mistake: say what was expected, then the parser's words
        said = (f"not UTF-8 text, so no JSON request ({exc})" if isinstance(exc, UnicodeDecodeError)
                else f"not a JSON request ({exc})" if isinstance(exc, json.JSONDecodeError) else str(exc))
        problems[len(requests)] = problem(UNREADABLE, "Unreadable request", 422, f"{where}: {said}",
                                          errors=[{"field": "$", "message": f"{where}: {said}"}])
        requests.append(None)


def cmd_simulate(args) -> int:
    from dpm_vec.simulate import simulate_many

    requests, problems = _read_requests(args.requests)
    results = iter(simulate_many([r for i, r in enumerate(requests) if i not in problems]))
    slots = [problems[i] if i in problems else next(results) for i in range(len(requests))]
    failed = any(isinstance(s.get("status"), int) for s in slots)  # problem objects carry an HTTP status
    single = len(args.requests) == 1 and args.requests[0] != "-" and not Path(args.requests[0]).is_dir()
    json.dump(slots[0] if single else slots, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
    return 2 if failed else 0


def cmd_sweep(args) -> int:
    from dpm_vec.sweep import sweep

    manifest = sweep(args.book, args.out, shard_size=args.shard_size, scheduler=args.scheduler, workers=args.workers,
                     threads=args.threads, progress=None if not args.quiet else False, scenarios=args.scenarios,
                     tables=args.tables or None, processes=args.processes)
    _print_summary(manifest, args.out)
    if manifest.get("scenario_comparison"):
        _print_scenarios(manifest["scenario_comparison"])
    return 0


def _print_summary(manifest: dict, out: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dpm_vec.printout import print_unbroken

    console = Console(stderr=True)
    # OUT is text, not Rich markup ("x[/]"); the commands below paste into a shell as printed
    title, command_out = escape(out), escape(shlex.quote(out))
    table = Table(title=f"dpm-vec sweep → {title}")
    # a narrow terminal folds a cell onto more lines, never cuts it to an ellipsis
    table.add_column("status", overflow="fold")
    table.add_column("portfolios", justify="right", overflow="fold")
    table.add_column("share", justify="right", overflow="fold")
    total = manifest["portfolios"] or 1
    for status, n in manifest["counts_by_status"].items():
        table.add_row(status, f"{n:,}", f"{100 * n / total:.1f}%")
    table.add_row("[bold]all[/bold]", f"[bold]{manifest['portfolios']:,}[/bold]", "100.0%")
    print_unbroken(console, table)
    print_unbroken(
        console,
        f"{manifest['shards']} shard(s) of {manifest['shard_size']:,} on {_sweep_engines(manifest)}, {manifest['resumed_shards']} resumed; wall time {manifest['wall_time_s']:.2f} s "
        f"({manifest['portfolios_per_second']:,} portfolios/s)"
        + (f"; intents: {manifest['tables']['intents']['rows']:,}" if "intents" in manifest["tables"] else "")
    )
    blocked_by = manifest.get("blocked_by_reason") or {}
    if blocked_by:
        print_unbroken(
            console,
            "blocked by: " + ", ".join(f"{reason} {n:,}" for reason, n in sorted(blocked_by.items(), key=lambda kv: (-kv[1], kv[0])))
            + f"; each run's detail: dpm-vec query {command_out} \"select run_key, block_reason, block_detail from runs where status = 'BLOCKED'\""
        )
    faults = manifest["tables"].get("input_faults", {}).get("rows", 0)
    if faults:
        print_unbroken(
            console,
            f"[bold]{faults:,} input fault(s)[/bold] (values or rows that fail their checks) blocked the portfolios they belong to "
            f"(block_reason INVALID_PORTFOLIO / INVALID_HOLDINGS / INVALID_LIMITS); each one: "
            f"dpm-vec query {command_out} \"select * from input_faults\""
        )


def _sweep_engines(manifest: dict) -> str:
    if manifest.get("processes"):
        return f"{manifest['processes']} process(es)"
    if manifest.get("threads"):
        return f"{manifest['threads']} thread(s)"
    return f"{manifest['workers']} local Dask worker(s)" if manifest.get("workers") else "a Dask cluster"


def _print_scenarios(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from dpm_vec.printout import print_unbroken

    table = Table(title="scenarios side by side")
    for column in ("scenario", "runs", "READY", "PENDING", "BLOCKED", "security intents", "turnover (Σ base)"):
        table.add_column(column, justify="left" if column == "scenario" else "right", overflow="fold")
    for r in rows:
        table.add_row(r["scenario_id"], f"{r['portfolios']:,}", f"{r['ready']:,}", f"{r['pending_review']:,}", f"{r['blocked']:,}",
                      f"{r['security_intents']:,}", f"{r['gross_turnover_notional_base_sum']:,.2f}")
    print_unbroken(Console(stderr=True), table)


def cmd_generate(args) -> int:
    from dpm_vec.generate import write_generated_book

    write_generated_book(args.out, args.portfolios, args.seed, bad_data=args.bad_data,
                         holdings=(args.min_holdings, args.max_holdings))
    print(f"wrote a {args.portfolios:,}-portfolio book (seed {args.seed}) to {args.out}", file=sys.stderr)
    return 0


def cmd_import_requests(args) -> int:
    from dpm_vec.importer import import_requests
    from dpm_vec.outdir import BOOK_MARKER, check_replaceable

    check_replaceable(Path(args.out), BOOK_MARKER, "book", tuple(Path(p) for p in args.requests if p != "-"))
    names: list[str] = []
    requests, problems = _read_requests(args.requests, names)
    if problems:
        raise DpmVecError(next(iter(problems.values()))["detail"])
    count = import_requests(requests, args.out, names)
    print(f"wrote a book of {count} run(s) to {args.out}", file=sys.stderr)
    return 0


def cmd_analyze(args) -> int:
    from dpm_vec.analyze import analyze
    from dpm_vec.errors import RequestError

    try:
        batch = json.loads(_read_text(args.batch))
        if isinstance(batch, dict) and "batch_inputs" in batch:
            batch = batch["batch_inputs"]  # a golden file: its analyze request
        result = analyze(batch)
    except (OSError, json.JSONDecodeError) as exc:
        result, code = problem(UNREADABLE, "Unreadable request", 422, f"{args.batch}: {exc}"), 2
    except RequestError as exc:
        result, code = exc.problem(), 2
    else:
        code = 0
    json.dump(result, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
    return code


def cmd_query(args) -> int:
    from rich.console import Console

    from dpm_vec.inspect import query_batches
    from dpm_vec.printout import TABLE_ROWS, print_rows

    columns, batches = query_batches(args.out, args.sql)
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")  # a Unix line: `cut`, `awk` and `read` see no trailing \r
        writer.writerow(columns)
        for batch in batches:
            writer.writerows(batch)
        return 0
    rows = []
    for batch in batches:  # a table's widths need every row: held, up to a bound
        rows.extend(batch)
        if len(rows) > TABLE_ROWS:
            batches.close()
            raise DpmVecError(f"the result has more than {TABLE_ROWS:,} rows, too many to lay out as a table: "
                              "print it with --csv (streamed, any length), or add a LIMIT or a WHERE")
    print_rows(Console(), columns, rows)
    return 0


def cmd_serve(args) -> int:
    from dpm_vec.api import serve

    if args.store and args.idempotency != "rfc":
        raise DpmVecError("--store keeps the RFC idempotency mode's runs: add --idempotency rfc (the default "
                          "reference mode recomputes every call and stores nothing)")
    if args.store is not None and not args.store.strip():
        raise DpmVecError("--store: an empty path; give a file (--store runs.duckdb), or leave --store out for a store in memory")
    if args.store and not Path(args.store).resolve().parent.is_dir():
        parent = Path(args.store).resolve().parent
        raise DpmVecError(f"--store {args.store}: {parent} " + ("is not a directory" if parent.exists() else "does not exist"))
    serve(host=args.host, port=args.port, store_path=args.store, idempotency=args.idempotency,
          log_level=args.log_level, max_coalesce=args.max_coalesce, max_body_bytes=args.max_body_mb * 2**20)
    return 0


def _integer(text: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, None, "an integer >= 1")


def _port(text: str) -> int:
    return _integer(text, 0, 65535, "a TCP port, an integer from 0 to 65535")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``dpm-vec serve``'s options (``python -m dpm_vec.api`` runs that command)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--store", default=None, metavar="PATH",
                        help="DuckDB run store file for --idempotency rfc (default: in memory)")
    parser.add_argument("--idempotency", choices=("reference", "rfc"), default="reference",
                        help="reference: the reference service (every call recomputed, FastAPI's 422 bodies); "
                             "rfc: RFC-0001 §7-8 (UUID keys, replay/409, RFC 7807 problems for invalid requests)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--max-coalesce", type=_positive_int, default=64, metavar="N",
                        help="most concurrent simulate requests one engine pass computes (default 64; "
                             "1 = one engine pass per request)")
    parser.add_argument("--max-body-mb", type=_positive_int, default=64, metavar="MB",
                        help="largest request body accepted, in MiB; a larger one gets 413 (default 64)")


def _expand(paths: list[str]) -> list[str]:
    """Directories expand to their *.json files (sorted); '-' stays as stdin."""
    out = []
    for path in paths:
        p = Path(path)
        if path != "-" and p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise DpmVecError(f"{path}: a directory with no *.json request files")
            out.extend(str(f) for f in found)
        else:
            out.append(path)
    return out


_RESTARTED = "DPM_VEC_UTF8_RESTARTED"  # set once the command has restarted itself


def _restart_in_utf8_mode() -> None:
    """Polars, pyarrow and DuckDB take paths as UTF-8 text, where Python encodes them in the
    locale's encoding: under a locale that is not UTF-8 (de_DE.ISO-8859-1, or C with
    PYTHONUTF8=0) a folder named ``böök`` would be two different folders to the two sides.
    Python's UTF-8 mode (PEP 540) makes them agree, so the command starts again in it
    (same process id, arguments and standard streams)."""
    if _is_utf8(sys.getfilesystemencoding()) or os.environ.get(_RESTARTED) or not sys.executable:
        return
    os.environ.update({"PYTHONUTF8": "1", _RESTARTED: "1"})
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"  # "UTF-8", "utf8", "U8" alike


def _printable_streams() -> None:
    """An id or path that the terminal's encoding cannot show (``PYTHONIOENCODING=ascii``)
    prints as a backslash escape instead of stopping the output midway with a traceback."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and not _is_utf8(stream.encoding):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _restart_in_utf8_mode()
    _printable_streams()
    parser = argparse.ArgumentParser(prog="dpm-vec", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="simulate reference-contract JSON requests; prints the result JSON")
    sim.add_argument("requests", nargs="+", help="request files, directories of them, or - for JSON lines on stdin (a golden file's inputs are used)")
    sim.set_defaults(func=cmd_simulate)
    sw = sub.add_parser("sweep", help="run every portfolio of a book directory; write Parquet datasets + manifest.json")
    sw.add_argument("book", help="book directory (see docs/book.md)")
    sw.add_argument("--out", required=True,
                    help="output directory, replaced atomically when the sweep ends; it must be new, empty or an earlier "
                         "sweep's output (one holding manifest.json), and not the book or a folder holding it")
    sw.add_argument("--shard-size", type=int,
                    help=f"portfolios per shard; bounds memory (default: as many as {DEFAULT_SHARD_ROWS:,} rows / the "
                         f"shards computed at once (--threads, --processes or --workers N) allow, each portfolio counted as "
                         f"its holdings, its model's targets and {RUN_ROWS}: 16,000 / N at ~55 holdings, 2.2-3.7 GiB in all; "
                         f"more for books of small portfolios, fewer for books of large ones)")
    sw.add_argument("--threads", type=int,
                    help=f"shards computed at once in this process (by default, a book of fewer than "
                         f"{PROCESSES_FROM_SHARDS} shards and {PROCESSES_FROM_ROWS:,} rows, counted as for --shard-size, runs "
                         f"on threads, one per core, at most {MAX_DEFAULT_THREADS}, and a larger one on as many worker processes)")
    sw.add_argument("--processes", type=int,
                    help="shards computed at once in this many worker processes of this machine, each running "
                         "Polars on its share of the cores")
    sw.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    sw.add_argument("--workers", type=int, help="start a local Dask cluster with this many worker processes")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.add_argument("--scenarios", help="what-if scenarios JSON: every portfolio runs under every scenario")
    sw.add_argument("--tables", help="comma-separated datasets to write, e.g. runs,intents (default: all of them, listed in "
                                     "docs/outputs.md); runs and input_faults are always written. Fewer datasets: less time and disk")
    sw.set_defaults(func=cmd_sweep)
    gen = sub.add_parser("generate", help="write a deterministic synthetic book")
    gen.add_argument("--portfolios", type=int, required=True, help="how many portfolios (one run each)")
    gen.add_argument("--seed", type=int, default=7, help="the same seed writes the same book (default 7)")
    gen.add_argument("--out", required=True,
                     help="book directory to write; it must be new, empty or an earlier book (holding portfolios.parquet)")
    gen.add_argument("--bad-data", action="store_true", help="sprinkle per-portfolio data faults (a missing price, FX rate or shelf entry) into ~1%% of portfolios, "
                          "drawn per portfolio: a book of a few dozen may have none")
    gen.add_argument("--min-holdings", type=int, default=30, help="fewest positions per portfolio (default 30)")
    gen.add_argument("--max-holdings", type=int, default=80,
                     help="most positions per portfolio (default 80; at most the ~3,400 instruments a generated portfolio can hold)")
    gen.set_defaults(func=cmd_generate)
    imp = sub.add_parser("import-requests", help="write JSON requests as a book directory (one run per request)")
    imp.add_argument("requests", nargs="+", help="request files, directories of them, or - for JSON lines on stdin")
    imp.add_argument("--out", required=True,
                     help="book directory to write; it must be new, empty or an earlier book (holding portfolios.parquet)")
    imp.set_defaults(func=cmd_import_requests)
    ana = sub.add_parser("analyze", help="what-if: one snapshot under several option sets (reference analyze request)")
    ana.add_argument("batch", help="analyze request JSON (a golden file's batch_inputs are used)")
    ana.set_defaults(func=cmd_analyze)
    qry = sub.add_parser("query", help="SQL over a sweep's output with DuckDB (a view per dataset: runs, intents, ...)")
    qry.add_argument("out", help="sweep output directory")
    qry.add_argument("sql", help='e.g. "select status, count(*) from runs group by 1"')
    qry.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    qry.set_defaults(func=cmd_query)
    srv = sub.add_parser("serve", help="serve the JSON door over HTTP (POST /rebalance/simulate, its batch and analyze "
                                       "routes, GET /health, GET /metrics; docs/operations.md)")
    add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        return args.func(args)
    except DpmVecError as exc:
        print(f"dpm-vec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        resume = ""
        if getattr(exc, "output_complete", False):
            resume = f" after {args.out} was written whole (the next sweep to it removes what its clean-up left)"
        elif args.command == "sweep":
            resume = f" ({RESUMES})"
        terminated = isinstance(exc, Terminated)
        print(f"dpm-vec: {'terminated' if terminated else 'interrupted'}{resume}", file=sys.stderr)
        _forget_unhandled_interrupt()
        return 128 + int(exc.args[0] if terminated else signal.SIGINT)  # _terminate gives its signal
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, as Unix tools do, and keep the
        # interpreter's final flush of stdout from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a full disk, a missing or unwritable path, an unreachable Dask scheduler
        print(f"dpm-vec: error: {exc}{_resumes(args)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "polars":
            raise
        # what reaches here from Polars is a file it could not read or write (a corrupt
        # Parquet page, a full disk): engine faults of a sweep are isolated per portfolio
        print(f"dpm-vec: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{_resumes(args)}", file=sys.stderr)
        return 2


def _forget_unhandled_interrupt() -> None:
    """Clear CPython's "unhandled KeyboardInterrupt" flag, which a Ctrl-C leaves set when
    it lands in code run by ``exec`` of a string (dataclasses generate their methods so,
    while a command still imports), caught or not: under ``python -m`` the interpreter
    would then kill itself with SIGINT after exiting, status -2 instead of 128 + the
    signal. Every ``exec`` of a string clears the flag before it runs (CPython 3.11-3.13)."""
    exec("")


def _resumes(args) -> str:
    """What a sweep that failed on a file keeps (every shard commits whole, or not at all)."""
    return f"; {RESUMES}" if args.command == "sweep" else ""


if __name__ == "__main__":
    sys.exit(main())
