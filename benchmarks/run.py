"""dpm_vec benchmarks: one command, ratios against the scalar oracle measured in the same run.

    .venv/bin/python benchmarks/run.py                       # 1k, 10k, 100k, 1M portfolios
    .venv/bin/python benchmarks/run.py --sizes 1000,10000    # a quick subset

For each book size it generates a deterministic book (cached under benchmarks/_books),
sweeps it with ``dpm-vec sweep`` in a subprocess (wall time, and peak RSS summed over
the process tree) as the command does by default, from 100k portfolios up also with two
shard threads, with one, with two Dask worker processes and writing only the runs and
intents datasets, and
times the scalar oracle (dpm_vec/oracle.py) on a sample of the same book's portfolios.
It also measures cost per holding row across portfolio sizes, the peak memory of a
book of large portfolios (16,000 of 500 holdings), the
batch JSON door against single calls, concurrent single calls over HTTP with and without
coalescing, and what each extended feature costs. Results go
to benchmarks/results.json and are printed as Markdown tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402
import psutil  # noqa: E402

from dpm_vec import oracle  # noqa: E402
from dpm_vec.export import book_to_requests  # noqa: E402
from dpm_vec.generate import write_generated_book  # noqa: E402
from dpm_vec.io import read_book, read_portfolios, read_reference  # noqa: E402
from dpm_vec.simulate import simulate_many  # noqa: E402
from dpm_vec.sweep import holding_rows  # noqa: E402

BOOKS = ROOT / "benchmarks" / "_books"
OUT = ROOT / "benchmarks" / "_out"
DPM = [sys.executable, "-m", "dpm_vec.cli"]


def generator_fingerprint(n: int, seed: int, holdings: tuple[int, int]) -> str:
    """What a cached book was generated from: the generator's source and the arguments.
    A book cached by an older generator (another model-weight dtype, no snapshots table)
    would otherwise be timed as if it were this one."""
    source = (ROOT / "dpm_vec" / "generate.py").read_bytes()
    return hashlib.sha256(source + f"|{n}|{seed}|{holdings}".encode()).hexdigest()


def book(n: int, seed: int = 7, holdings: tuple[int, int] = (30, 80), name: str | None = None) -> Path:
    """The generated book, from the cache under benchmarks/_books when the same generator
    and arguments wrote it (``<book>.generator`` beside it), else written afresh."""
    path = BOOKS / (name or f"book_{n}_{seed}_{holdings[0]}_{holdings[1]}")
    stamp, fingerprint = path.with_name(path.name + ".generator"), generator_fingerprint(n, seed, holdings)
    if not (path / "portfolios.parquet").exists() or not stamp.exists() or stamp.read_text() != fingerprint:
        started = time.perf_counter()
        shutil.rmtree(path, ignore_errors=True)
        write_generated_book(path, n, seed, holdings=holdings)
        stamp.write_text(fingerprint)
        print(f"  generated {path.name} in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# what a timing measures: the engine, its dependencies and the harness; not the harness's
# own results file or the docs a run's figures are copied into
MEASURED_PATHS = ("dpm_vec", "pyproject.toml", "benchmarks/run.py", "benchmarks/shard_pass.py", "benchmarks/oracle_book.py")


def engine_revision() -> str:
    """The commit the engine ran at (``+dirty`` with uncommitted changes to ``MEASURED_PATHS``,
    new engine files included), or the package version outside git."""
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        from dpm_vec import __version__
        return f"dpm_vec {__version__}"
    return commit + ("+dirty" if _git("status", "--porcelain", "--", *MEASURED_PATHS) else "")


def machine() -> str:
    """This machine: host, CPU model, cores, memory, Python and Polars (hosts differ by 20% or more)."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = models[0] if models else platform.processor() or "unknown CPU"
    return (f"{platform.node()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, polars {pl.__version__}")


ENGINE, MACHINE = engine_revision(), machine()


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def stamped(row: dict) -> dict:
    """``row`` with when it was measured, on what and with which engine: a results file
    merges runs, so every row says where it came from."""
    return {**row, "measured_at": utc_now(), "engine": ENGINE, "machine": MACHINE}


def machine_steal_s() -> float:
    """CPU seconds the hypervisor gave to other guests since boot (``steal`` in
    /proc/stat, all CPUs); 0.0 where the kernel does not report it."""
    try:
        return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def timed_sweep(book_dir: Path, extra: list[str] | None = None) -> dict:
    """``dpm-vec sweep BOOK ...extra`` in a subprocess (its default shard size unless
    ``extra`` sets one): wall time, peak RSS summed over the process tree (a sweep with
    --workers runs its shards in Dask worker processes), the tree's user and system CPU
    seconds, and the machine's steal seconds while it ran."""
    out = OUT / book_dir.name
    shutil.rmtree(out, ignore_errors=True)
    for stale in OUT.glob(f".{book_dir.name}.*"):  # an interrupted sweep's work dir would be resumed, not timed
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [*DPM, "sweep", str(book_dir), "--out", str(out), "--quiet", *(extra or [])]
    cpu_before, steal_before = resource.getrusage(resource.RUSAGE_CHILDREN), machine_steal_s()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - started
    # the sweep and every process it waited for (its Dask workers), now that it is reaped
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = cpu.ru_utime - cpu_before.ru_utime, cpu.ru_stime - cpu_before.ru_stime
    steal = machine_steal_s() - steal_before
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read()[-2000:])
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["resumed_shards"]:
        raise RuntimeError(f"{book_dir.name}: {manifest['resumed_shards']} shard(s) resumed, not computed: not a timing")
    expected = pl.scan_parquet(book_dir / "portfolios.parquet").select(pl.len()).collect().item()
    if manifest["portfolios"] != expected * max(len(manifest.get("scenarios") or ()), 1):
        raise RuntimeError(f"{book_dir.name}: the sweep ran {manifest['portfolios']:,} portfolios of the book's {expected:,}")
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "peak_rss_mib": peak / 2**20, "cpu_user_s": user, "cpu_sys_s": system, "steal_s": steal, "manifest": manifest}


def oracle_throughput(book_dir: Path, sample: int, seed: int = 1) -> dict:
    """Portfolios/second of the scalar oracle on a random sample of the book's portfolios."""
    portfolios = read_portfolios(book_dir)
    rows = sorted(random.Random(seed).sample(range(portfolios.height), min(sample, portfolios.height)))
    subset = portfolios[rows]
    requests = book_to_requests(read_book(book_dir, portfolios=subset, reference=read_reference(book_dir)))
    started = time.perf_counter()
    for request in requests:
        oracle.simulate(request)
    seconds = time.perf_counter() - started
    return {"sample": len(requests), "seconds": seconds, "portfolios_per_s": len(requests) / seconds}


WORKERS = THREADS = 2  # one Dask worker process, or one shard thread, per core of the benchmark machine
PARALLEL_FROM = 100_000  # books this large are also swept with one thread, with --workers and with FEW_TABLES
FEW_TABLES = "runs,intents"  # what an order-staging consumer reads: the verdicts and the proposed orders


def scaling(sizes: list[int], oracle_sample: int) -> list[dict]:
    """Each book swept as ``dpm-vec sweep`` does by default on this machine (two shard
    threads for a book of a few shards and rows, two worker processes from
    ``defaults.PROCESSES_FROM_SHARDS`` shards or ``defaults.PROCESSES_FROM_ROWS`` rows;
    shards of up to 8,000 portfolios of these books' ~55 holdings in full rounds of two)
    and, from 100k portfolios up, also with two shard threads, with one thread
    (16,000-portfolio shards: the same portfolios in memory), with two Dask worker
    processes (up to 8,000 each) and writing only the runs and intents datasets (``--tables``).
    Every mode takes the command's default shard size."""
    rows = []
    for n in sizes:
        print(f"scaling: {n:,} portfolios", flush=True)
        path = book(n)
        held = holding_rows(path)
        orc = oracle_throughput(path, oracle_sample)
        modes = [("default", [])]
        if n >= PARALLEL_FROM:
            modes += [(f"{THREADS} threads", ["--threads", str(THREADS)]), ("1 thread", ["--threads", "1"]),
                      (f"{WORKERS} workers", ["--workers", str(WORKERS)]), (f"default, {FEW_TABLES} only", ["--tables", FEW_TABLES])]
        for mode, extra in modes:
            sweep = timed_sweep(path, extra)
            if mode.startswith("default"):  # what the command chose
                chosen = sweep["manifest"]
                how = _mode(chosen)
                mode = mode.replace("default", f"default: {how}", 1)
            shard = sweep["manifest"]["shard_size"]
            pps = sweep["manifest"]["portfolios"] / sweep["wall_s"]
            stages = sweep["manifest"]["stage_seconds"]
            rows.append(stamped({
                "portfolios": n, "holding_rows": held, "mode": mode, "shard_size": shard,
                "wall_s": sweep["wall_s"], "portfolios_per_s": pps, "peak_rss_mib": sweep["peak_rss_mib"],
                "cpu_user_s": sweep["cpu_user_s"], "cpu_sys_s": sweep["cpu_sys_s"], "steal_s": sweep["steal_s"],
                "oracle_portfolios_per_s": orc["portfolios_per_s"], "oracle_sample": orc["sample"],
                "ratio_vs_oracle": pps / orc["portfolios_per_s"], "top_stages": sorted(stages.items(), key=lambda kv: -kv[1])[:3],
                "counts_by_status": sweep["manifest"]["counts_by_status"],
            }))
            print(f"  {rows[-1]}", flush=True)
    return rows


def holdings_cost(rows_per_book: int = 500_000) -> list[dict]:
    """Books of the same number of holding rows, cut into portfolios of 10 to 500
    holdings: how the cost of a holding row depends on the size of its portfolio, each
    book swept as the command does by default.

    Every portfolio also trades toward its model (26 instruments on average), so a
    10-holding portfolio sizes about 28 targets: the engine's work follows the target
    rows (model ∪ holdings, the ``targets`` table), which are reported beside."""
    rows = []
    for h in (10, 50, 100, 500):
        n = rows_per_book // h
        print(f"holdings: {h} per portfolio, {n:,} portfolios", flush=True)
        path = book(n, seed=5, holdings=(h, h))
        sweep = timed_sweep(path)
        chosen = sweep["manifest"]
        held = holding_rows(path)
        target_rows = chosen["tables"]["targets"]["rows"]
        rows.append(stamped({"holdings_per_portfolio": h, "portfolios": n, "holding_rows": held, "target_rows": target_rows,
                             "mode": _mode(chosen), "shards": chosen["shards"], "shard_size": chosen["shard_size"],
                             "wall_s": sweep["wall_s"], "us_per_holding_row": 1e6 * sweep["wall_s"] / held,
                             "us_per_target_row": 1e6 * sweep["wall_s"] / target_rows,
                             # the sweep's own wall (its manifest): no interpreter start, imports or exit, a fixed ~0.75 s
                             "sweep_wall_s": chosen["wall_time_s"], "us_per_holding_row_in_sweep": 1e6 * chosen["wall_time_s"] / held,
                             "peak_rss_mib": sweep["peak_rss_mib"]}))
        print(f"  {rows[-1]}", flush=True)
    return rows


def _holdings_mode(row: dict) -> str:
    """The mode column of a cost-per-row row; rows measured before the forty-fifth session
    ran on two shard threads and did not record their shards."""
    return f"{row['mode']} ({row['shards']} × {row['shard_size']:,})" if "mode" in row else "2 threads"


def _mode(manifest: dict) -> str:
    """How a sweep ran its shards, from its manifest: "2 processes", "2 threads"."""
    return f"{manifest['processes']} processes" if manifest.get("processes") else f"{manifest['threads']} threads"


def large_portfolios(n: int = 16_000, holdings: int = 500) -> list[dict]:
    """A book of large portfolios (8M holding rows by default) swept as the command does
    by default: memory follows the rows in flight, so the default shard shrinks to keep it
    near that of the ~55-holding books' 8,000-portfolio shards."""
    print(f"large portfolios: {n:,} of {holdings} holdings", flush=True)
    path = book(n, seed=5, holdings=(holdings, holdings))
    sweep = timed_sweep(path)
    chosen = sweep["manifest"]
    row = stamped({"portfolios": n, "holdings_per_portfolio": holdings,
                   "holding_rows": holding_rows(path),
                   "shard_size": chosen["shard_size"], "shards": chosen["shards"],
                   "mode": _mode(chosen), "wall_s": sweep["wall_s"], "peak_rss_mib": sweep["peak_rss_mib"]})
    print(f"  {row}", flush=True)
    return [row]


def batch_door(n: int = 1000) -> dict:
    """1,000 JSON requests: one batch call vs 1,000 single calls vs the oracle."""
    requests = json_requests(n)
    started = time.perf_counter()
    simulate_many(requests)
    batch_s = time.perf_counter() - started
    started = time.perf_counter()
    for request in requests:
        simulate_many([request])
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    for request in requests:
        oracle.simulate(request)
    oracle_s = time.perf_counter() - started
    return stamped({"requests": n, "batch_rps": n / batch_s, "single_rps": n / single_s, "oracle_rps": n / oracle_s,
                    "batch_vs_single": single_s / batch_s, "batch_vs_oracle": oracle_s / batch_s})


def http_door(n: int = 400, clients: int = 32) -> list[dict]:
    """``n`` single POST /rebalance/simulate calls from ``clients`` concurrent threads
    against a real server on loopback: with coalescing (the default) and with
    ``--max-coalesce 1`` (one engine pass per request), in the same run."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    requests = json_requests(n)
    rows = []
    for label, extra in (("one pass per request", ["--max-coalesce", "1"]), ("coalesced (default 64)", [])):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "dpm_vec.api", "--port", str(port), "--log-level", "warning", *extra],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not _healthy(url):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"server for {label!r} did not start")
                time.sleep(0.1)
            local = threading.local()

            def post(item: tuple[int, dict]) -> int:
                if not hasattr(local, "client"):
                    local.client = httpx.Client(base_url=url, timeout=120)
                i, body = item
                return local.client.post("/rebalance/simulate", json=body, headers={"Idempotency-Key": f"bench-{i}"}).status_code

            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                codes = list(pool.map(post, enumerate(requests)))
            seconds = time.perf_counter() - started
            if set(codes) != {200}:
                raise RuntimeError(f"{label}: unexpected HTTP codes {sorted(set(codes))}")
            metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                       if line.startswith(("dpm_sim_engine_passes_total", "dpm_sim_coalesced_requests_total"))}
        finally:
            server.terminate()
            server.wait(timeout=30)
        passes = metrics["dpm_sim_engine_passes_total"]
        rows.append(stamped({"mode": label, "requests": n, "clients": clients, "rps": n / seconds, "engine_passes": int(passes),
                             "mean_batch": metrics["dpm_sim_coalesced_requests_total"] / passes}))
        print(f"  {rows[-1]}", flush=True)
    return rows


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


def json_requests(n: int) -> list[dict]:
    """Shared golden requests (core and extended), cycled to n, each with its own portfolio id."""
    goldens = sorted((ROOT / "tests" / "data" / "goldens").rglob("rand_*.json"))
    out = []
    for i in range(n):
        request = json.loads(goldens[i % len(goldens)].read_text())["inputs"]
        request["portfolio_snapshot"]["portfolio_id"] = f"bench_{i}"
        out.append(request)
    return out


# attribute values the generated shelf has (dpm_vec.generate), capped below what the
# generated models hold, so the caps bind and the grouped paths do their work
BINDING_GROUPS = {"sector:TECHNOLOGY": {"max_weight": "0.10"}, "region:NORTH_AMERICA": {"max_weight": "0.30"}}
FEATURES = {
    "baseline": {},
    "group_constraints": {"group_constraints": BINDING_GROUPS},
    "tax_lots_budget": {"enable_tax_awareness": True, "max_realized_capital_gains": "5000"},
    "turnover_cap": {"max_turnover_pct": "0.05"},
    "settlement_ladder": {"enable_settlement_awareness": True, "settlement_horizon_days": 5},
    "solver": {"target_method": "SOLVER"},
    "solver_groups": {"target_method": "SOLVER", "group_constraints": BINDING_GROUPS},
    # the RFC-0001 options that reshape a plan (trades, codes, dependencies), at once
    "rfc_options": {"single_position_cap_mode": "RFC_ASSET_CLASS", "single_position_max_weight": "0.1", "notional_sizing": True,
                    "fx_sweep_threshold": "1000", "rfc_rationale_codes": True, "rfc_fx_dependencies": True,
                    "delta_from_valuation": True, "held_banned_action": "LIQUIDATE",
                    "allow_restricted": True, "allow_restricted_holdings": True},
}


def feature_costs(n: int) -> list[dict]:
    """The same book swept with each feature switched on for every portfolio (a scenario)."""
    path = book(n)
    rows = []
    base = None
    for name, options in FEATURES.items():
        scenario = OUT / f"feature_{name}.json"
        scenario.parent.mkdir(parents=True, exist_ok=True)
        scenario.write_text(json.dumps({"scenarios": {name.replace("_", "-"): {"options": options}}}))
        print(f"feature: {name}", flush=True)
        sweep = timed_sweep(path, ["--threads", str(THREADS), "--scenarios", str(scenario)])
        base = base or sweep["wall_s"]
        rows.append(stamped({"feature": name, "wall_s": sweep["wall_s"], "ratio_to_baseline": sweep["wall_s"] / base,
                             "peak_rss_mib": sweep["peak_rss_mib"]}))
        print(f"  {rows[-1]}", flush=True)
    return rows


ROW_KEYS = {"scaling": ("portfolios", "mode"), "holdings": ("holdings_per_portfolio",), "large": ("portfolios",), "http": ("mode",),
            "features": ("feature",)}


def merge_results(old: dict, new: dict) -> dict:
    """``old`` updated with ``new``: a row of a table section replaces the old row with the
    same key (book size and mode, holdings, feature...) in its place, new keys follow,
    and sizes stay in ascending order; each measured row carries its own ``measured_at``.
    A book size measured again drops its old rows of modes the run no longer measures, so
    a size's rows all come from one run."""
    merged = {**old, **{k: v for k, v in new.items() if k not in ROW_KEYS}}
    for section, key in ROW_KEYS.items():
        remeasured = {r.get(key[0]) for r in new.get(section, [])}
        rows = {tuple(r.get(k) for k in key): r for r in old.get(section, []) if r.get(key[0]) not in remeasured}
        for r in new.get(section, []):
            rows[tuple(r.get(k) for k in key)] = {"measured_at": new["when"], **r}  # a row's own stamp, if it has one
        if rows:  # a stable sort on the numeric key parts only: modes and features keep their order
            merged[section] = sorted(rows.values(), key=lambda r: tuple(r[k] for k in key if isinstance(r.get(k), int)))
    return merged


def _table(rows: list[dict] | None, header: str, align: str, line) -> list[str]:
    """A Markdown table of ``rows`` (``line`` renders one), after a blank line; none without rows."""
    return ["", header, align, *(line(r) for r in rows)] if rows else []


def markdown(results: dict) -> str:
    lines = [f"Latest run: {results.get('when')}, engine {results.get('engine', 'unrecorded')}, on {results['machine']}; allocator "
             f"(_RJEM_MALLOC_CONF): {results.get('allocator')}; a row from another run says so in results.json (measured_at, engine, machine)", "",
             "| portfolios | holding rows | mode (shard) | wall (s) | CPU user / system (s) | steal (s) | portfolios/s | peak RSS (MiB) "
             "| oracle portfolios/s | ratio | top stages (s) |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results.get("scaling", []):
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["top_stages"])
        lines.append(f"| {r['portfolios']:,} | {r['holding_rows']:,} | {r['mode']} ({r['shard_size']:,}) | {r['wall_s']:.1f} | "
                     f"{r['cpu_user_s']:.0f} / {r['cpu_sys_s']:.0f} | {r['steal_s']:.0f} | {r['portfolios_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} | {r['oracle_portfolios_per_s']:,.1f} | "
                     f"{r['ratio_vs_oracle']:,.1f}x | {stages} |")
    lines += _table(results.get("holdings"), "| holdings/portfolio | portfolios | holding rows | target rows | mode (shards × size) | wall (s) "
                    "| µs per holding row | µs per target row | peak RSS (MiB) |", "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
                    lambda r: f"| {r['holdings_per_portfolio']} | {r['portfolios']:,} | {r['holding_rows']:,} | {r['target_rows']:,} | "
                              f"{_holdings_mode(r)} | {r['wall_s']:.1f} | {r['us_per_holding_row']:.1f} | {r['us_per_target_row']:.1f} | "
                              f"{r['peak_rss_mib']:,.0f} |")
    lines += _table(results.get("large"), "| large portfolios | holding rows | default mode (shards × size) | wall (s) | peak RSS (MiB) |",
                    "| --- | ---: | --- | ---: | ---: |",
                    lambda r: f"| {r['portfolios']:,} × {r['holdings_per_portfolio']} holdings | {r['holding_rows']:,} | {r['mode']} "
                              f"({r['shards']} × {r['shard_size']:,}) | {r['wall_s']:.1f} | {r['peak_rss_mib']:,.0f} |")
    if results.get("batch"):
        b = results["batch"]
        lines += ["", "| JSON door, 1,000 requests | requests/s |", "| --- | ---: |",
                  f"| one batch call (one engine pass) | {b['batch_rps']:,.0f} |", f"| 1,000 single calls | {b['single_rps']:,.1f} |",
                  f"| scalar oracle | {b['oracle_rps']:,.1f} |", f"| batch vs single | {b['batch_vs_single']:,.1f}x |",
                  f"| batch vs oracle | {b['batch_vs_oracle']:,.1f}x |"]
    if results.get("http"):
        lines += ["", "| HTTP door: single requests, concurrent clients | requests/s | engine passes | mean requests per pass |",
                  "| --- | ---: | ---: | ---: |"]
        for r in results["http"]:
            lines.append(f"| {r['mode']}: {r['requests']} requests, {r['clients']} clients | {r['rps']:,.1f} | {r['engine_passes']} | {r['mean_batch']:.1f} |")
    if results.get("features"):
        lines += ["", "| feature (every portfolio) | wall (s) | ratio to baseline | peak RSS (MiB) |", "| --- | ---: | ---: | ---: |"]
        for r in results["features"]:
            lines.append(f"| {r['feature']} | {r['wall_s']:.1f} | {r['ratio_to_baseline']:.2f} | {r['peak_rss_mib']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--oracle-sample", type=int, default=200, help="portfolios per book timed through the oracle")
    parser.add_argument("--skip", default="", help="comma list of: scaling,holdings,large,batch,http,features")
    parser.add_argument("--feature-book", type=int, default=10_000)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results = {"machine": MACHINE, "engine": ENGINE,  # of the latest run; each row carries its own
               "when": utc_now(),
               # what every sweep subprocess inherits (dpm_vec/__init__.py): it moves a sweep by ~20%
               "allocator": os.environ.get("_RJEM_MALLOC_CONF")}
    if "scaling" not in skip:
        results["scaling"] = scaling([int(s) for s in args.sizes.split(",")], args.oracle_sample)
    if "holdings" not in skip:
        results["holdings"] = holdings_cost()
    if "large" not in skip:
        results["large"] = large_portfolios()
    if "batch" not in skip:
        print("batch JSON door", flush=True)
        results["batch"] = batch_door()
    if "http" not in skip:
        print("HTTP door, concurrent clients", flush=True)
        results["http"] = http_door()
    if "features" not in skip:
        results["features"] = feature_costs(args.feature_book)
    path = ROOT / "benchmarks" / "results.json"
    if path.exists():  # a partial run (--skip, --sizes) replaces only the sizes and rows it measured
        results = merge_results(json.loads(path.read_text()), results)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))


if __name__ == "__main__":
    main()
