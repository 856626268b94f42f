"""Book-wide sweeps: sharded, resumable, exactly-once, optionally on a Dask cluster.

    holdings   each shard reads its positions / cash / lots in place, from the row span
               its snapshots occupy, when the book keeps them together (a book sorted
               by portfolio, as `generate` and `import-requests` write them); a book whose
               holdings are scattered is split once into one file per shard instead
    shards     each shard (a slice of the portfolios table) is read, run through the
               engine and its output tables written to a staging dir that is renamed
               into ``shards/shard-NNNNN`` — the rename is the commit
    finalise   committed shard files become ``OUT/<table>/part-NNNNN.parquet`` plus
               ``manifest.json``, staged beside OUT and renamed into place

All work lives in ``.<OUT>.work-<fingerprint>`` next to OUT; a killed sweep restarted
with the same arguments finds it, skips committed shards and ends with the same output
as an uninterrupted run. Peak memory follows the shard size times the shards computed
at once (threads, or local workers), not the book size.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from dpm_vec import __version__
from dpm_vec.book import POLICY_COLUMNS, Book, conform, empty_table
from dpm_vec.defaults import (DEFAULT_SHARD_ROWS, PARQUET_COMPRESSION, PROCESSES_FROM_ROWS, PROCESSES_FROM_SHARDS, RUN_ROWS,
                              default_shard_size,
                              default_threads, even_shard_size, usable_cores)
from dpm_vec.errors import ENGINE_FAILURES, RESUMES, BookError, DpmVecError, failure_summary, first_line, named_failures
from dpm_vec.io import (PORTFOLIO_ROWS, REFERENCE_TABLES, _path, collect, plain_columns, publish_dir, read_portfolio_rows, read_reference,
                        read_shard, row_faults_by_run, scan_table, with_fault_details, write_book, write_json_atomic)
from dpm_vec.numeric import lit
from dpm_vec.outdir import SWEEP_MARKER, check_replaceable, discard, exclusive, remove_stale_work
from dpm_vec.outputs import OUTPUT_TABLES, options_hashes, output_tables
from dpm_vec.pipeline import StageTimer, run
from dpm_vec.scenarios import comparison_table, expand, load_scenarios

log = logging.getLogger("dpm_vec.sweep")
HOLDING_TABLES = ("positions", "cash", "lots")
# the engine's tables, and the rows a shard's reader set aside (io.read_shard), by run
SWEEP_TABLES = (*OUTPUT_TABLES, "input_faults")
# written by every sweep: one record per portfolio, and the input values that blocked one
ALWAYS_WRITTEN = ("runs", "input_faults")
# Dask's sampling profiler reads every thread's stack each 10 ms, taking the GIL from the
# shard's own Python: off, local workers are ~5% faster (benchmarks/HISTORY.md, "Forty-fifth session")
LOCAL_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
BOOK_FILES = ("portfolios", "positions", "cash", "lots", "prices", "fx_rates", "shelf", "shelf_attributes",
              "models", "group_constraints", "overdraft_limits", "snapshots")


@dataclass(frozen=True)
class SweepPlan:
    book_dir: str
    work_dir: str
    shard_size: int
    n_portfolios: int
    fingerprint: str
    scenarios: bool = False
    tables: tuple[str, ...] = SWEEP_TABLES  # the datasets this sweep writes, in SWEEP_TABLES order
    # per holdings table, each shard's (first row, row count) in the book's file; None
    # when the holdings are split into per-shard files (or read whole: one shard)
    spans: dict[str, list[tuple[int, int]]] | None = None
    engine_source: str = ""  # engine_source_digest() of the code that planned it: a worker must run the same

    def table_files(self) -> dict[str, Path]:
        """Tables a what-if sweep derives (portfolios × scenarios) live in the work dir."""
        if not self.scenarios:
            return {}
        derived = Path(self.work_dir) / "derived"
        return {t: derived / f"{t}.parquet" for t in ("portfolios", "group_constraints", "overdraft_limits")}

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_portfolios // self.shard_size))

    @property
    def partitioned(self) -> bool:
        """Whether shards read their holdings from a per-shard split. Otherwise they read
        the book's own files, filtered to their snapshots as the split would be: whole
        (one shard) or their row span."""
        return self.n_shards > 1 and self.spans is None

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.n_portfolios, (shard + 1) * self.shard_size)

    @property
    def partition_dir(self) -> Path:
        """Where the per-shard split of the holdings lives once it is complete."""
        return Path(self.work_dir) / "partition"

    def shard_dir(self, shard: int) -> Path:
        return Path(self.work_dir) / "shards" / f"shard-{shard:05d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """A file as the file system sees it (inode, size, modification time; None when it
    does not exist): a file replaced or rewritten changes its stamp."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def book_stamps(book_dir: Path) -> dict[str, tuple[int, int, int]]:
    """``file_stamp`` of each file the book has."""
    stamps = {f"{table}.parquet": file_stamp(_path(book_dir, table)) for table in BOOK_FILES}
    return {name: stamp for name, stamp in stamps.items() if stamp is not None}


def input_hashes(book_dir: Path) -> dict[str, str]:
    return {f"{t}.parquet": file_sha256(_path(book_dir, t)) for t in BOOK_FILES if _path(book_dir, t).exists()}


def source_digest(package: Path) -> str:
    """SHA-256 of the Python sources under ``package`` (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def engine_source_digest() -> str:
    """The engine's own source digest: a sweep never resumes shards that other code
    computed, even when the version number was not bumped (a checkout between runs)."""
    return source_digest(Path(__file__).resolve().parent)


def plan_sweep(book_dir: Path, out_dir: Path, shard_size: int, hashes: dict[str, str], n_portfolios: int,
               scenarios: dict | None = None, tables: tuple[str, ...] = SWEEP_TABLES) -> SweepPlan:
    fingerprint = hashlib.sha256(
        json.dumps({"inputs": hashes, "shard_size": shard_size, "engine": __version__, "engine_source": engine_source_digest(),
                    "scenarios": scenarios, "tables": list(tables)}, sort_keys=True).encode()
    ).hexdigest()
    work = out_dir.parent / f".{out_dir.name}.work-{fingerprint[:16]}"
    return SweepPlan(str(book_dir), str(work), shard_size, n_portfolios, fingerprint, scenarios is not None, tables,
                     engine_source=engine_source_digest())


def sweep_tables(requested: Iterable[str] | str | None) -> tuple[str, ...]:
    """The datasets a sweep writes: every one by default, else the requested ones (names,
    or one comma-separated string) plus ``ALWAYS_WRITTEN``, in ``SWEEP_TABLES`` order
    whatever the order asked."""
    if requested is None:
        return SWEEP_TABLES
    if isinstance(requested, str):
        requested = requested.split(",")
    requested = [name.strip() for name in requested if name.strip()]
    unknown = [name for name in requested if name not in SWEEP_TABLES]
    if unknown:
        raise DpmVecError(f"--tables: unknown dataset(s) {', '.join(unknown)}; expected some of {', '.join(SWEEP_TABLES)}")
    return tuple(name for name in SWEEP_TABLES if name in requested or name in ALWAYS_WRITTEN)


# a book whose shards' row spans add up to more than this many times the rows is split
SPAN_READ_LIMIT = 1.25


def holding_counts(book_dir: str | Path) -> dict[str, pl.DataFrame | None]:
    """Per holdings table, (portfolio_snapshot_id, rows, first, stop): each snapshot's row
    count and the span of rows it occupies in the file (None: an optional table the book
    does not have). One streamed pass over each file's snapshot ids, about 1 s for the
    1M-portfolio book's three files; the shards' sizes and read spans both come from it."""
    counts = {}
    for table in HOLDING_TABLES:
        lf = scan_table(Path(book_dir), table)  # a missing or misshapen file is a BookError naming it
        counts[table] = None if lf is None else collect(
            lf.select("portfolio_snapshot_id").with_row_index("_row")
            .group_by("portfolio_snapshot_id")
            .agg(pl.len().alias("rows"), pl.col("_row").min().alias("first"), (pl.col("_row").max() + 1).alias("stop")),
            _path(Path(book_dir), table), engine="streaming",
        )
    return counts


def unread_holdings(counts: dict[str, pl.DataFrame | None], portfolios: pl.DataFrame) -> dict[str, dict]:
    """Per holdings table, its rows under a portfolio_snapshot_id that no portfolio of the
    book names (a typo, a stray space, another book's rows): {table: {rows, snapshots,
    examples}}, tables without such rows left out. No run reads them, so the sweep says so."""
    unread = {}
    for table, per_snapshot in counts.items():
        if per_snapshot is None:
            continue
        orphans = per_snapshot.join(portfolios.select("portfolio_snapshot_id").unique(), on="portfolio_snapshot_id", how="anti")
        if orphans.height:
            unread[table] = {"rows": int(orphans["rows"].sum()), "snapshots": orphans.height,
                             "examples": orphans.sort("first")["portfolio_snapshot_id"].head(5).to_list()}
    return unread


def unread_limits(book_dir: Path, scanned: dict[str, pl.LazyFrame | None], run_keys: pl.Series) -> dict[str, dict]:
    """Per limits table (group_constraints, overdraft_limits; of ``scanned``, the per-portfolio
    tables as ``scan_table`` gave them), its rows under a run_key no portfolio of the book
    has: a mandate limit that applies to no run (a typo, a stray space) leaves its portfolio
    unlimited, so the sweep says so. {table: {rows, run_keys, examples}}, tables without
    such rows left out."""
    unread = {}
    for table, lf in scanned.items():
        if lf is None or PORTFOLIO_ROWS[table][0] != "run_key":
            continue
        orphans = collect(lf.select(pl.col("run_key").cast(pl.String)), _path(book_dir, table)).join(
            run_keys.cast(pl.String).unique().to_frame("run_key"), on="run_key", how="anti", maintain_order="left")
        if orphans.height:
            named = orphans["run_key"].unique(maintain_order=True)
            unread[table] = {"rows": orphans.height, "run_keys": named.len(), "examples": named.head(5).to_list()}
    return unread


def holding_spans(plan: SweepPlan, portfolios: pl.DataFrame,
                  counts: dict[str, pl.DataFrame | None] | None = None) -> dict[str, list[tuple[int, int]]] | None:
    """Each shard's (first row, row count) span in each holdings file: the rows of its
    snapshots and whatever lies between them. None when the spans would together read
    more than ``SPAN_READ_LIMIT`` times the rows (holdings scattered across the file),
    where splitting the holdings once is cheaper (55 s or more for the 1M-portfolio
    book). From ``holding_counts`` (computed here when not given)."""
    counts = holding_counts(plan.book_dir) if counts is None else counts
    shard_of = _shard_of(plan, portfolios)
    spans = {}
    for table in HOLDING_TABLES:
        per_snapshot = counts[table]
        if per_snapshot is None:  # an optional table the book does not have
            spans[table] = [(0, 0)] * plan.n_shards
            continue
        found = shard_of.join(per_snapshot, on="portfolio_snapshot_id", how="inner").group_by("_shard").agg(
            pl.col("first").min(), pl.col("stop").max()
        )
        if (found["stop"] - found["first"]).sum() > SPAN_READ_LIMIT * per_snapshot["rows"].sum():
            return None
        by_shard = {shard: (first, stop - first) for shard, first, stop in found.select("_shard", "first", "stop").iter_rows()}
        spans[table] = [by_shard.get(shard, (0, 0)) for shard in range(plan.n_shards)]
    return spans


def run_rows(portfolios: pl.DataFrame, positions: pl.DataFrame | None, models: pl.DataFrame,
             lots: pl.DataFrame | None = None) -> pl.Series:
    """Each run's rows as the default shard size counts them, in run order: its holding
    rows plus its model's targets (a shard's frames follow its target rows, model ∪
    holdings, so its memory does), its tax lots where tax awareness is on (the lot walk
    holds a row per lot; each counted as a row, a little more than it costs) plus
    ``RUN_ROWS`` for the frames it has one row in. ``positions`` and ``lots``:
    (portfolio_snapshot_id, rows), as ``holding_counts`` gives them."""
    def per_snapshot(counts: pl.DataFrame | None, name: str) -> pl.DataFrame:
        if counts is None:
            return pl.DataFrame(schema={"portfolio_snapshot_id": pl.String, name: pl.UInt32})
        return counts.select("portfolio_snapshot_id", pl.col("rows").alias(name))

    model_sizes = models.group_by("model_id").agg(pl.len().alias("_targets"))
    taxed = pl.col("enable_tax_awareness").fill_null(False) if "enable_tax_awareness" in portfolios.columns else pl.lit(False)
    return portfolios.select("portfolio_snapshot_id", "model_id", taxed.alias("_taxed")).join(
        per_snapshot(positions, "_positions"), on="portfolio_snapshot_id", how="left", maintain_order="left"
    ).join(per_snapshot(lots, "_lots"), on="portfolio_snapshot_id", how="left", maintain_order="left"
    ).join(model_sizes, on="model_id", how="left", maintain_order="left").select(
        (pl.col("_positions").fill_null(0).cast(pl.Int64) + pl.col("_targets").fill_null(0).cast(pl.Int64)
         + pl.when(pl.col("_taxed")).then(pl.col("_lots").fill_null(0).cast(pl.Int64)).otherwise(0) + RUN_ROWS).alias("rows")
    ).to_series()


def fit_shard_rows(rows: pl.Series, size: int, budget: int) -> int:
    """A shard size, at most ``size``, whose heaviest shard of consecutive runs (``rows``
    each, ``run_rows``) holds at most ``budget`` rows. Large portfolios that sit together
    in the book shrink every shard, not only theirs. A run that alone holds more than
    ``budget`` fits no shard size: it is left out of its shard's count (shrinking every
    shard of the book to one portfolio for it would only multiply the shards), and the
    size keeps two such runs in different shards, so a shard holds at most one of them
    and ``budget`` rows besides."""
    oversized = rows > budget
    counted = rows.to_frame().with_columns(pl.when(oversized).then(0).otherwise(pl.col("rows")).alias("rows"))
    if oversized.sum() > 1:  # shards of at most the smallest gap between two oversized runs never hold both
        size = min(size, int(oversized.arg_true().diff().min()))
    while size > 1:
        heaviest = counted.with_row_index("_i").group_by(pl.col("_i") // size).agg(pl.col("rows").sum())["rows"].max() or 0
        if heaviest <= budget:
            break
        size = max(1, min(size - 1, int(size * budget / heaviest)))
    return size


def _shard_of(plan: SweepPlan, portfolios: pl.DataFrame) -> pl.DataFrame:
    """(portfolio_snapshot_id, _shard) for every shard that runs a snapshot."""
    return portfolios.with_row_index("_i").select(
        "portfolio_snapshot_id", (pl.col("_i") // plan.shard_size).cast(pl.Int32).alias("_shard")
    ).unique()


def partition_holdings(plan: SweepPlan, portfolios: pl.DataFrame, batch_rows: int = 1_000_000) -> None:
    """Split positions, cash and lots into one file per shard, streaming in batches.
    A holdings snapshot shared by runs of several shards goes to each of them."""
    if plan.partition_dir.exists():
        return
    staging = Path(plan.work_dir) / f".partition.tmp-{uuid.uuid4().hex[:8]}"
    shard_of = _shard_of(plan, portfolios)
    book_dir = Path(plan.book_dir)
    try:
        for table in HOLDING_TABLES:
            source = _path(book_dir, table)
            (staging / table).mkdir(parents=True)
            if not source.exists():
                continue
            writers: dict[int, pq.ParquetWriter] = {}
            try:
                for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows):
                    # rows keep their file order inside each shard (order-keeping join and split)
                    frame = pl.from_arrow(batch)  # read as scan_table reads the file: its key joins the portfolios'
                    routed = frame.with_columns(plain_columns(table, batch.schema)).join(
                        shard_of, on="portfolio_snapshot_id", how="inner", maintain_order="left")
                    for (shard,), part in routed.partition_by("_shard", as_dict=True, maintain_order=True).items():
                        arrow = part.drop("_shard").to_arrow()
                        if shard not in writers:
                            writers[shard] = pq.ParquetWriter(staging / table / f"shard-{shard:05d}.parquet", arrow.schema)
                        writers[shard].write_table(arrow)
            finally:
                _close_all(writers.values())
        os.replace(staging, plan.partition_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk's half split would only take room from the rerun
        raise


def _clear_unfinished_writes(plan: SweepPlan) -> None:
    """Remove the staging folders of shards and of the holdings split that a killed or
    failed run left in the work dir: never read, only taking room (a full disk's rerun
    needs it)."""
    pattern = re.compile(r"^\.(partition|shard-[0-9]+)\.tmp-[0-9a-f]+$")
    for folder in (Path(plan.work_dir), plan.shard_dir(0).parent):
        for leftover in sorted(folder.iterdir()) if folder.is_dir() else ():
            if pattern.match(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)


def committed_shards(plan: SweepPlan) -> dict[int, dict]:
    """The commit markers of the shards already done, each read once. A marker whose
    files do not read whole (a marker that is no JSON or names no row counts, a table whose
    Parquet footer does not read, or one of another row count than the marker's) is no
    commit: a kill never leaves one (a shard is renamed into place whole), but a machine
    that lost power after the rename, before its files reached the disk, can. Such a shard
    is renamed out of the way (a staging name, cleared like any other, so a kill meanwhile
    leaves it whole or uncommitted), removed, and runs again."""
    committed = {}
    for shard in range(plan.n_shards):
        folder = plan.shard_dir(shard)
        if not (folder / "_SUCCESS").exists():
            continue
        try:
            counts = json.loads((folder / "_SUCCESS").read_text())
            whole = {name: pq.read_metadata(folder / f"{name}.parquet").num_rows for name in plan.tables} == counts["_rows"]
        except (OSError, ValueError, KeyError, TypeError):  # pyarrow's ArrowInvalid is a ValueError
            whole = False
        if whole:
            committed[shard] = counts
            continue
        log.warning("%s was committed but its files do not read whole (lost after the commit: a power cut or a disk "
                    "fault); the shard runs again", folder)
        aside = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    return committed


def _close_all(writers: Iterable[pq.ParquetWriter]) -> None:
    """Close every writer even when one fails (a full disk flushing its last page), so
    none is left for the garbage collector to close, and fail with the first failure."""
    failure = None
    for writer in writers:
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError or ArrowException
            failure = failure or exc
    if failure is not None:
        raise failure


# book dir -> (its shared tables' file stamps, the tables): one book's at a time, per process
_REFERENCE_CACHE: dict[str, tuple[tuple, dict[str, pl.DataFrame]]] = {}


def _reference_stamp(book_dir: str) -> tuple:
    """The shared tables' files as the file system sees them (inode, size, modification
    time): a long-lived Dask worker reads them again once the book is rewritten."""
    return tuple(file_stamp(_path(Path(book_dir), table)) for table in REFERENCE_TABLES)


def _reference(book_dir: str) -> dict[str, pl.DataFrame]:
    stamp = _reference_stamp(book_dir)
    cached = _REFERENCE_CACHE.get(book_dir)
    if cached is None or cached[0] != stamp:
        _REFERENCE_CACHE.clear()
        _REFERENCE_CACHE[book_dir] = (stamp, read_reference(book_dir))
    return _REFERENCE_CACHE[book_dir][1]


def run_shard(plan: SweepPlan, shard: int) -> dict[str, int]:
    """Run one shard and commit its outputs; returns its status counts. Idempotent. A
    worker whose engine is other code than the planner's (a Dask worker left on another
    checkout) refuses: its shards would differ from the rest without a word."""
    target = plan.shard_dir(shard)
    if (target / "_SUCCESS").exists():
        return json.loads((target / "_SUCCESS").read_text())
    if plan.engine_source and plan.engine_source != engine_source_digest():
        raise DpmVecError(f"a sweep worker runs other dpm_vec code ({Path(__file__).resolve().parent}, version {__version__}) "
                          "than the sweep that planned it: install the same checkout on every Dask worker and restart it "
                          f"(docs/operations.md); {RESUMES}")
    return commit_shard(plan, shard, *compute_shard(plan, shard))


def compute_shard(plan: SweepPlan, shard: int) -> tuple[dict[str, pl.DataFrame], StageTimer]:
    """The output tables of one shard (nothing written)."""
    start, stop = plan.shard_range(shard)
    book_dir = Path(plan.book_dir)
    derived = plan.table_files()
    portfolios, portfolio_faults = read_portfolio_rows(book_dir, derived.get("portfolios"), rows=(start, stop - start))
    files = {table: plan.partition_dir / table / f"shard-{shard:05d}.parquet" for table in HOLDING_TABLES} if plan.partitioned else {}
    files.update({t: f for t, f in derived.items() if t != "portfolios"})
    spans = {table: plan.spans[table][shard] for table in HOLDING_TABLES} if plan.spans else None
    book, faults = read_shard(book_dir, portfolios, _reference(plan.book_dir), files=files, spans=spans)
    if plan.scenarios:
        # the book's faults, and any the scenario's own values meet here: a flagged run names each
        derived_faults = pl.read_parquet(Path(plan.work_dir) / "derived" / "portfolio_faults.parquet", glob=False)
        portfolio_faults = pl.concat([derived_faults.filter(pl.col("key").is_in(portfolios["run_key"].implode())),
                                      portfolio_faults]).unique(maintain_order=True)
    faults = pl.concat([portfolio_faults, faults])
    timer = StageTimer()
    tables = run_isolating(book, timer, tuple(t for t in plan.tables if t in OUTPUT_TABLES))
    tables["input_faults"] = row_faults_by_run(book.portfolios, faults)
    tables["runs"] = with_fault_details(tables["runs"], tables["input_faults"])
    if faults.height:
        first = faults.row(0, named=True)
        log.warning("shard-%05d (portfolios %d-%d of the book): %d portfolio(s) blocked by %d input value(s) that fail their "
                    "checks (block_reason INVALID_PORTFOLIO, INVALID_HOLDINGS or INVALID_LIMITS; each in the input_faults "
                    "dataset), e.g. %s.parquet, key %s, row %s, column %s: %s fails %s", shard, start + 1, stop,
                    tables["input_faults"]["run_key"].n_unique(), faults.height,
                    first["input_table"], first["key"], first["row_key"] or "-", first["input_column"], first["value"], first["failed_check"])
    timer.lap("outputs")
    return tables, timer


def commit_shard(plan: SweepPlan, shard: int, tables: dict[str, pl.DataFrame], timer: StageTimer) -> dict[str, int]:
    """Write a shard's tables to a staging dir and rename it into place: the commit."""
    target = plan.shard_dir(shard)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        for name in plan.tables:
            tables[name].write_parquet(staging / f"{name}.parquet", **PARQUET_COMPRESSION)
        timer.lap("write")
        counts = dict(tables["runs"].group_by("status").len().iter_rows())
        counts["_rows"] = {name: tables[name].height for name in plan.tables}  # runs: one a portfolio
        counts["_blocked_by"] = dict(tables["runs"].filter(pl.col("block_reason").is_not_null()).group_by("block_reason").len().iter_rows())
        counts["_polars_threads"] = pl.thread_pool_size()
        counts["_stage_seconds"] = {k: round(v, 4) for k, v in timer.seconds.items() if not k.startswith("_")}
        (staging / "_SUCCESS").write_text(json.dumps(counts))
    except (OSError, pl.exceptions.ComputeError) as exc:  # a full disk, a quota, a file size limit
        shutil.rmtree(staging, ignore_errors=True)  # half a shard would only take room from the rerun
        raise DpmVecError(f"cannot write shard {shard} under {target.parent}: {first_line(exc)}; {RESUMES}") from None
    try:
        os.replace(staging, target)
    except OSError:  # another worker committed the same shard first
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "_SUCCESS").exists():
            raise DpmVecError(f"{target} holds files of no committed shard; nothing else writes there: delete "
                              f"{plan.work_dir} and run the sweep again") from None
    return counts


def _run_in_process(plan: SweepPlan, pending: list[int], reporter, threads: int = 1) -> None:
    """Shards on ``threads`` threads of this process, each computing a shard and then
    writing it, so at most ``threads`` shards are in memory. Polars runs most kernels on
    the calling thread with the GIL released, so two threads keep two cores busy (one kept
    ~1.2) and one thread's Parquet encoding overlaps the other's compute."""
    queue = iter(pending)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dpm-vec-shard") as pool:
        running = {pool.submit(run_shard, plan, shard) for shard in islice(queue, threads)}
        _run_as_they_finish(pool, plan, queue, running, reporter)


def _run_in_processes(plan: SweepPlan, pending: list[int], reporter, processes: int,
                      pool: ProcessPoolExecutor | None = None) -> None:
    """Shards in ``processes`` fresh worker processes (``pool``'s, when they were started
    before the plan: ``_early_workers``), each computing a shard, writing it and taking the
    next; at most ``processes`` shards are in memory. Each process runs Polars on its share
    of the cores: two processes of one Polars thread keep two cores busier than two shard
    threads sharing one process's Polars thread pool (benchmarks/HISTORY.md, "Fifteenth
    session")."""
    processes = min(processes, len(pending))
    if processes == 0:
        return
    queue = iter(pending)

    def first(workers: ProcessPoolExecutor) -> set:
        return {workers.submit(run_shard, plan, shard) for shard in islice(queue, processes)}

    running = None
    if pool is None:
        pool, running = _worker_pool(processes, first)
    with pool:
        try:  # a worker started early that died already breaks the pool at the first submission
            _run_as_they_finish(pool, plan, queue, first(pool) if running is None else running, reporter)
        except BrokenProcessPool as exc:
            raise DpmVecError(
                f"a sweep worker process ended without finishing its shard (killed, or out of memory?); {RESUMES} "
                "(a smaller --shard-size needs less memory)"
            ) from exc


def _worker_pool(processes: int, first: Callable[[ProcessPoolExecutor], set]) -> tuple[ProcessPoolExecutor, set]:
    """A pool of ``processes`` spawned workers and the futures of ``first(pool)``, its first
    submissions: the workers start as they are submitted, and read POLARS_MAX_THREADS (their
    share of the cores) as they import Polars; this process's Polars has sized its pool
    already. A fork would copy this process's Polars threads' state."""
    context = multiprocessing.get_context("spawn")
    with _environment(POLARS_MAX_THREADS=str(_cores_each(processes))), _spawning_without_ctrl_c():
        pool = ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_start_worker,
                                   initargs=(logging.getLogger().level, os.getpid()))
        return pool, first(pool)


@contextlib.contextmanager
def _spawning_without_ctrl_c():
    """Processes spawned in here start with Ctrl-C ignored. A worker imports for ~0.6 s
    before its initializer (``_start_worker``) can ignore it, and a Ctrl-C then, which a
    terminal sends to every process of the sweep, printed a KeyboardInterrupt traceback
    from each worker still importing. An ignored signal stays ignored across the exec, and
    Python leaves SIGINT as it finds it. The sweep's own process ignores Ctrl-C only while
    it forks and execs its workers (milliseconds). Off the main thread, where Python
    cannot change a handler, nothing changes: the workers ignore Ctrl-C from their
    initializer on, as before."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def early_processes(book_dir: Path, *, shard_size: int | None, scheduler: str | None, workers: int | None,
                    threads: int | None, processes: int | None, scenarios: str | Path | None) -> int | None:
    """The worker processes a sweep will run its shards in, when that is certain before its
    plan: ``processes`` when chosen, or, with no mode chosen, what ``_default_processes``
    gives for the fewest shards and rows the plan can count, from the portfolios and
    positions files' footers: the plan counts the positions rows and ``RUN_ROWS`` a run
    and adds the model targets (``mode_rows``); its default shard holds at most as many
    portfolios as ``RUN_ROWS`` each allow (the positions may belong to no portfolio), and
    it cuts at least one full round of shards. None when not certain: the plan decides, as
    for a scenarios sweep, whose runs the scenarios multiply."""
    if processes is not None:
        return processes
    if scheduler or workers or threads is not None or scenarios:
        return None
    portfolios = _footer_rows(book_dir, "portfolios")
    if not portfolios:
        return None
    rows = holding_rows(book_dir) + RUN_ROWS * portfolios
    if shard_size is None:
        largest = default_shard_size(default_threads(), None, RUN_ROWS)
        shards = max(-(-portfolios // largest), min(portfolios, default_threads()))
    else:
        shards = -(-portfolios // shard_size)
    return _default_processes(shards, rows)


def mode_rows(book_dir: Path, portfolios: pl.DataFrame) -> int:
    """The rows the default mode is chosen by: the positions file's (``holding_rows``) plus
    each run's model targets and ``RUN_ROWS``, at least what ``early_processes`` counts."""
    return holding_rows(book_dir) + int(run_rows(portfolios, None, _reference(str(book_dir))["models"]).sum())


def holding_rows(book_dir: Path) -> int:
    """The rows of the book's positions file, from its footer (0 without a readable one)."""
    return _footer_rows(book_dir, "positions") or 0


def _footer_rows(book_dir: Path, table: str) -> int | None:
    """The rows of one of the book's files, from its Parquet footer; None for a missing or
    unreadable file, whose fault the plan's read names."""
    try:
        return pq.ParquetFile(_path(book_dir, table)).metadata.num_rows
    except Exception:
        return None


def _default_processes(shards: int, rows: int) -> int | None:
    """The worker processes a sweep of ``shards`` shards over a book of ``rows`` rows
    (counted as ``run_rows`` counts them) runs in when no mode is chosen: one per core (at
    most two) from ``PROCESSES_FROM_SHARDS`` shards, or from two shards of a book of
    ``PROCESSES_FROM_ROWS`` rows, on a machine of several cores; None (threads)
    otherwise."""
    many = shards >= PROCESSES_FROM_SHARDS or (shards >= 2 and rows >= PROCESSES_FROM_ROWS)
    return default_threads() if many and default_threads() > 1 else None


@contextlib.contextmanager
def _early_workers(book_dir: Path, processes: int | None):
    """Worker processes started before the sweep plans (None without ``processes``), each
    warmed with the engine's imports and the book's reference tables: their start (~0.6 s
    each) overlaps the plan's reads, checks and hashes instead of following them (the 100k
    book, five alternated pairs: 21.5-22.4 s against 22.2-22.9 s; benchmarks/HISTORY.md,
    "Forty-fourth session"). A sweep that stops before its shards shuts them down and
    waits for them."""
    if not processes:
        yield None
        return
    pool, _ = _worker_pool(processes, lambda workers: {workers.submit(_warm_worker, str(book_dir)) for _ in range(processes)})
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _warm_worker(book_dir: str) -> None:
    """A worker's first task: the reference tables a shard reads, read now. A table the
    sweep's own checks reject is left to them (they name its fault)."""
    with contextlib.suppress(DpmVecError):
        _reference(book_dir)


def _run_as_they_finish(pool, plan: SweepPlan, queue, running: set, reporter) -> None:
    """Wait for the ``running`` shards, submitting the next one from ``queue`` as each
    finishes. A failed shard raises here: no further shard starts, the running ones commit."""
    while running:
        done, running = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            reporter.advance(1, future.result()["_rows"]["runs"])
            running |= {pool.submit(run_shard, plan, shard) for shard in islice(queue, 1)}


def _cores_each(workers: int) -> int:
    """Polars threads for each of ``workers`` processes sharing this machine's cores
    (oversubscription costs ~10%)."""
    return max(1, usable_cores() // workers)


@contextlib.contextmanager
def _environment(**values: str):
    """``values`` in os.environ for the block (what processes started in it inherit),
    then the environment as it was."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_worker(log_level: int, sweep_pid: int) -> None:
    """A shard process logs as the sweep's own process does, and leaves Ctrl-C to it: the
    sweep stops taking shards, the running ones commit (as with threads) and no worker
    prints a traceback. It dies with the sweep: a sweep killed outright (``kill -9``, a
    job scheduler's timeout) leaves no worker computing, holding a shard's memory, for
    nobody (the shard it had not committed is computed again on resume)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(sweep_pid)
    logging.basicConfig(level=log_level or logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when the process that started it ends
    (``PR_SET_PDEATHSIG``; elsewhere nothing is asked), and end now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the sweep ended before the request took hold
        os._exit(1)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A committed shard file into the output: a hard link (no bytes copied; the shard
    keeps its own link until the work dir goes), a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def finalise(plan: SweepPlan, out_dir: Path, manifest: dict) -> None:
    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    for name in plan.tables:
        (staging / name).mkdir(parents=True)
    rows = {name: 0 for name in plan.tables}
    for shard in range(plan.n_shards):
        for name in plan.tables:
            src = plan.shard_dir(shard) / f"{name}.parquet"
            rows[name] += pq.ParquetFile(src).metadata.num_rows
            _link_or_copy(src, staging / name / f"part-{shard:05d}.parquet")
    manifest["tables"] = {name: {"rows": rows[name], "files": plan.n_shards, "path": f"{name}/"} for name in plan.tables}
    if plan.scenarios:
        table = comparison_table(pl.read_parquet(staging / "runs", glob=False))
        (staging / "scenario_comparison").mkdir()
        table.write_parquet(staging / "scenario_comparison" / "part-00000.parquet", **PARQUET_COMPRESSION)
        manifest["tables"]["scenario_comparison"] = {"rows": table.height, "files": 1, "path": "scenario_comparison/"}
        manifest["scenario_comparison"] = table.to_dicts()
    write_json_atomic(staging / "manifest.json", manifest)
    # on disk before the work dir goes: a power cut leaves the earlier OUT (and the
    # committed shards to resume from) or the whole new one
    publish_dir(staging, out_dir)
    try:
        discard(Path(plan.work_dir), out_dir)
        for stale in remove_stale_work(out_dir):  # killed runs' leftovers: work under other arguments, staging copies
            log.info("removed %s, left by an earlier sweep to %s that did not finish", stale.name, out_dir.name)
    except KeyboardInterrupt as exc:  # OUT is whole: only the clean-up was cut short (the next sweep to OUT ends it)
        exc.output_complete = True
        raise


def sweep(book_dir: str | Path, out_dir: str | Path, *, shard_size: int | None = None, scheduler: str | None = None,
          workers: int | None = None, threads: int | None = None, progress: bool | None = None,
          scenarios: str | Path | None = None, tables: Iterable[str] | str | None = None,
          processes: int | None = None) -> dict:
    """Run every portfolio of the book (under every scenario, when a scenarios file is
    given); write the output datasets and manifest. In this process, ``threads`` shards
    at a time; in ``processes`` worker processes of this machine; on a Dask cluster with
    ``scheduler`` or ``workers``. When none is chosen: one thread or process per core, at
    most two (``defaults.default_threads``), processes once the sweep has
    ``defaults.PROCESSES_FROM_SHARDS`` shards, or two over a book of
    ``defaults.PROCESSES_FROM_ROWS`` rows (``mode_rows``). Without ``shard_size``, the default
    rows divided among the shards computed at once on this machine, with the book cut into
    full rounds of them (``defaults.default_shard_size``)."""
    if workers is not None and workers < 1:
        raise DpmVecError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise DpmVecError(f"--threads must be at least 1, got {threads}")
    if processes is not None and processes < 1:
        raise DpmVecError(f"--processes must be at least 1, got {processes}")
    if threads is not None and (scheduler or workers):
        raise DpmVecError("--threads applies to a sweep in this process; with --workers or --scheduler each Dask worker "
                          "runs one shard at a time (start more workers instead)")
    if processes is not None and (scheduler or workers or threads):
        raise DpmVecError("--processes is one way to run the shards; --threads, --workers and --scheduler are the others: "
                          "choose one")
    if scheduler and workers:
        raise DpmVecError("--workers starts a local Dask cluster and --scheduler uses an existing one: choose one")
    if scheduler:
        _check_scheduler_address(scheduler)
    if scheduler or workers:  # Dask's INFO lines are not the sweep's log; importing it sets its level, so import first
        import distributed  # noqa: F401
        logging.getLogger("distributed").setLevel(logging.WARNING)
    written = sweep_tables(tables)
    if shard_size is not None and shard_size < 1:
        raise DpmVecError(f"--shard-size must be at least 1, got {shard_size}")
    started = time.perf_counter()
    book_dir, out_dir = Path(book_dir).resolve(), Path(out_dir).resolve()
    for name, path in (("BOOK", book_dir), ("--out", out_dir)):
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:  # Polars and DuckDB take paths as UTF-8 text only
            raise DpmVecError(f"{name} {os.fsencode(path)!r}: a path with bytes that are not UTF-8 text; "
                              f"rename the folder (or use another)") from None
    if not book_dir.is_dir():
        raise DpmVecError(f"book directory not found: {book_dir}" if not book_dir.exists()
                          else f"{book_dir} is a file; a book is a directory of Parquet tables (docs/book.md)")
    check_replaceable(out_dir, SWEEP_MARKER, "sweep output", (book_dir, *([Path(scenarios)] if scenarios else [])),
                      written=frozenset({*SWEEP_TABLES, "scenario_comparison", SWEEP_MARKER}))
    early = early_processes(book_dir, shard_size=shard_size, scheduler=scheduler, workers=workers, threads=threads,
                            processes=processes, scenarios=scenarios)
    with exclusive(out_dir), _early_workers(book_dir, early) as pool, _early_cluster(book_dir, None if scheduler else workers) as cluster:
        return _sweep_locked(book_dir, out_dir, started, shard_size=shard_size, scheduler=scheduler, workers=workers,
                             threads=threads, processes=processes, progress=progress, scenarios=scenarios, written=written,
                             pool=pool, cluster=cluster)


def _sweep_locked(book_dir: Path, out_dir: Path, started: float, *, shard_size: int | None, scheduler: str | None,
                  workers: int | None, threads: int | None, processes: int | None, progress: bool | None,
                  scenarios: str | Path | None, written: tuple[str, ...], pool: ProcessPoolExecutor | None = None,
                  cluster: Future | None = None) -> dict:
    """``sweep`` once its arguments are checked and it holds OUT's lock; ``pool``: the worker
    processes started for it already (``early_processes``); ``cluster``: the local Dask
    cluster being started for it (``_early_cluster``)."""
    on_dask = bool(scheduler or workers)
    chosen = on_dask or threads is not None or processes is not None
    stamps = book_stamps(book_dir)  # before anything reads the book
    portfolios, portfolio_faults = read_portfolio_rows(book_dir)
    if portfolios.height == 0:
        raise BookError(str(_path(Path(book_dir), "portfolios")), "no rows: a book with no portfolio has nothing to sweep")
    if portfolio_faults.height:
        log.warning("%d portfolio(s) of portfolios.parquet have values that fail their checks and will be BLOCKED "
                    "(INVALID_PORTFOLIO), e.g. run_key %s, %s: %s fails %s", portfolio_faults["key"].n_unique(),
                    *portfolio_faults.select("key", "input_column", "value", "failed_check").row(0))
    _reference(str(book_dir))  # structural faults of shared tables surface before any work; shards reuse it
    # and a missing column, impossible type or row of no portfolio of the per-portfolio ones, once for all shards
    scanned = {table: scan_table(book_dir, table) for table in PORTFOLIO_ROWS if table != "portfolios"}  # portfolios: read above
    limits_unread = unread_limits(book_dir, scanned, portfolios["run_key"])
    for table, found in limits_unread.items():
        log.warning("%s.parquet: %d row(s) under %d run_key(s) that no portfolio has (e.g. %s): no run is limited by them",
                    table, found["rows"], found["run_keys"], ", ".join(repr(e) for e in found["examples"]))
    hashes = input_hashes(book_dir)
    scenario_map = load_scenarios(scenarios) if scenarios else None
    if scenario_map:
        def optional(table: str) -> pl.DataFrame:
            return pl.read_parquet(_path(book_dir, table), glob=False) if _path(book_dir, table).exists() else empty_table(table)

        # the derived rows carry the options' defaults where the book's values failed: the
        # shards take the failed values from derived_tables["portfolio_faults"]
        derived_tables = expand(portfolios, optional("group_constraints"), optional("overdraft_limits"), scenario_map,
                                portfolio_faults)
        portfolios = conform("portfolios", derived_tables["portfolios"])
    counts = None  # holding_counts, when the shard size or the shards' read spans need them
    if shard_size is None:
        counts = holding_counts(book_dir) if portfolios.height > 1 else None
        # the shards computed at once on this machine share the default; a remote cluster's workers do not
        at_once = None if scheduler else workers or processes or threads or default_threads()
        rows = run_rows(portfolios, counts["positions"], _reference(str(book_dir))["models"], counts["lots"]) if counts else None
        budget = DEFAULT_SHARD_ROWS // (at_once or 1)
        # a run over the budget alone takes its shard whatever the size: the others set it
        typical = rows.filter(rows <= budget).mean() if rows is not None else None
        shard_size = default_shard_size(at_once, portfolios.height, typical)
        if rows is not None:  # and where large portfolios sit together, no shard holds more than its share of rows
            fitted = fit_shard_rows(rows, shard_size, budget)
            if fitted != shard_size and at_once:  # shrunk for its rows: full rounds again, if the evened size still fits
                fitted = fit_shard_rows(rows, even_shard_size(portfolios.height, fitted, at_once), budget)
            shard_size = fitted
    plan = plan_sweep(book_dir, out_dir, shard_size, hashes, portfolios.height, scenario_map, written)
    counts = holding_counts(book_dir) if counts is None else counts
    unread = unread_holdings(counts, portfolios)
    for table, found in unread.items():
        log.warning("%s.parquet: %d row(s) under %d portfolio_snapshot_id(s) that no portfolio names (e.g. %s): no run reads them",
                    table, found["rows"], found["snapshots"], ", ".join(repr(e) for e in found["examples"]))
    if not chosen:  # threads for a few shards, worker processes for many or large ones (defaults.PROCESSES_FROM_*)
        processes = _default_processes(plan.n_shards, mode_rows(book_dir, portfolios))
        threads = None if processes else default_threads()
    if pool is not None and not processes:  # early_processes promised what the plan must agree with
        raise AssertionError(f"worker processes were started for a sweep of {plan.n_shards} shard(s) on threads")
    Path(plan.work_dir).mkdir(parents=True, exist_ok=True)
    if scenario_map and not (Path(plan.work_dir) / "derived").exists():
        write_book(derived_tables, Path(plan.work_dir) / "derived")
    if plan.n_shards > 1 and not plan.partition_dir.exists():
        plan = replace(plan, spans=holding_spans(plan, portfolios, counts))
    write_json_atomic(Path(plan.work_dir) / "plan.json", plan.__dict__)
    if not on_dask:  # this machine's processes of an earlier run are gone; a remote worker may still be writing
        _clear_unfinished_writes(plan)
    if plan.partitioned:
        partition_holdings(plan, portfolios)
    committed = committed_shards(plan)
    pending = [s for s in range(plan.n_shards) if s not in committed]
    resumed = len(committed)
    reporter = _Progress(plan.n_shards, plan.n_portfolios, enabled=sys.stderr.isatty() if progress is None else progress)
    reporter.resume(resumed, sum(counts["_rows"]["runs"] for counts in committed.values()))
    if on_dask:
        _run_on_dask(plan, pending, scheduler, cluster, reporter)
    elif processes:
        _run_in_processes(plan, pending, reporter, processes, pool)
    else:
        _run_in_process(plan, pending, reporter, threads)
    reporter.close()
    totals: dict[str, int] = {}
    blocked_by: dict[str, int] = {}
    stage_seconds: dict[str, float] = {}
    polars_threads: set[int] = set()
    markers = {**committed, **{s: json.loads((plan.shard_dir(s) / "_SUCCESS").read_text()) for s in pending}}
    for shard in range(plan.n_shards):
        for status, n in markers[shard].items():
            if status == "_polars_threads":
                polars_threads.add(n)
            elif status == "_stage_seconds":
                for stage, seconds in n.items():
                    stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
            elif status == "_blocked_by":
                for reason, count in n.items():
                    blocked_by[reason] = blocked_by.get(reason, 0) + count
            elif not status.startswith("_"):
                totals[status] = totals.get(status, 0) + n
    wall = time.perf_counter() - started
    manifest = {
        "engine_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "book_dir": str(book_dir),
        "input_hashes": hashes,
        "fingerprint": plan.fingerprint,
        "portfolios": plan.n_portfolios,
        "counts_by_status": dict(sorted(totals.items())),
        "blocked_by_reason": dict(sorted(blocked_by.items())),  # the BLOCKED runs by runs.block_reason
        "shards": plan.n_shards,
        "shard_size": shard_size,
        "threads": threads,
        "processes": processes,
        "workers": None if scheduler else workers,
        "polars_threads": sorted(polars_threads),  # the Polars thread pool each shard ran on
        "scheduler": scheduler,
        "resumed_shards": resumed,
        "wall_time_s": round(wall, 3),
        "portfolios_per_second": round(plan.n_portfolios / wall, 1) if wall else None,
        "stage_seconds": {k: round(v, 3) for k, v in sorted(stage_seconds.items(), key=lambda kv: -kv[1])},
        "unread_holdings": unread,
        "unread_limits": limits_unread,
    }
    if scenario_map:
        manifest["scenarios"] = sorted(scenario_map)
    now = book_stamps(book_dir)
    changed = sorted(name for name in stamps.keys() | now.keys() if stamps.get(name) != now.get(name))
    if changed:
        raise DpmVecError(f"{book_dir}: {', '.join(changed)} changed while the sweep ran, so its shards may have read "
                          f"different data and {out_dir} was not written; run the same command once the book is complete "
                          f"(shards of other data are never reused)")
    finalise(plan, out_dir, manifest)
    return manifest


def _check_scheduler_address(scheduler: str) -> None:
    """A scheduler address Dask cannot parse (the dashboard's ``http://`` one, say) is named
    before the sweep plans, not met as a traceback after."""
    from distributed.comm import parse_address
    from distributed.comm.registry import get_backend

    try:
        get_backend(parse_address(scheduler)[0])
    except ValueError as exc:
        raise DpmVecError(f"--scheduler {scheduler!r}: {exc}; a scheduler's address looks like tcp://HOST:8786 "
                          "(the dashboard's http:// address is another)") from None


# how long the shards a worker committed may take to show on this machine: a shared file
# system's attribute cache (NFS's acdirmax is 60 s) can hide a new file that long
SHARED_FS_GRACE_S = 60


def _run_on_dask(plan: SweepPlan, pending: list[int], scheduler: str | None, cluster: Future | None, reporter) -> None:
    """The pending shards as tasks on the Dask cluster at ``scheduler``, or on the local
    one whose client ``cluster`` will give (``_early_cluster``). Dask's own failures — a
    shard that killed each worker it ran on, a lost scheduler — and paths the workers and
    this machine do not share end the sweep with one line saying so."""
    from dask.distributed import Client, as_completed

    client = Client(scheduler) if scheduler else cluster.result()
    if scheduler and not client.scheduler_info().get("workers"):
        log.warning("the Dask scheduler %s has no workers: the shards wait until one joins (dask worker %s)", scheduler, scheduler)
    try:
        shards = {client.submit(run_shard, plan, shard, key=f"dpm-vec-shard-{plan.fingerprint[:12]}-{shard}", pure=False): shard
                  for shard in pending}
        for future in as_completed(shards):
            counts = _shard_result(future, shards[future], scheduler)
            reporter.advance(1, counts["_rows"]["runs"])
    finally:
        if scheduler:
            client.close()
    _wait_for_shared_commits(plan, pending)


def _shard_result(future, shard: int, scheduler: str | None) -> dict[str, int]:
    """A Dask task's shard counts; Dask's own failures as a DpmVecError saying what to do."""
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        raise DpmVecError(f"shard {shard} ended each Dask worker that ran it (a worker's memory limit or the OOM killer, most "
                          f"likely): give the workers more memory or use a smaller --shard-size; {RESUMES}") from None
    except (FutureCancelledError, CommClosedError) as exc:
        raise DpmVecError(f"lost the Dask scheduler {scheduler or '(local cluster)'} during the sweep ({exc}); {RESUMES}") from None
    except BookError as exc:
        if exc.message.startswith("missing file") and Path(exc.file).exists():
            raise DpmVecError(f"{exc}; this machine has it, a Dask worker does not: BOOK and OUT's folder must be on a file "
                              "system the workers share, at the same path (docs/operations.md)") from None
        raise


def _wait_for_shared_commits(plan: SweepPlan, pending: list[int], grace_s: float | None = None) -> None:
    """The shards the workers committed, as this machine sees them; a worker that wrote
    to a folder of its own is named, after a grace period for a shared file system."""
    deadline = time.monotonic() + (SHARED_FS_GRACE_S if grace_s is None else grace_s)
    while unseen := [s for s in pending if not (plan.shard_dir(s) / "_SUCCESS").exists()]:
        if time.monotonic() >= deadline:
            raise DpmVecError(f"the Dask workers committed {len(unseen)} shard(s) that this machine does not see "
                              f"(e.g. {plan.shard_dir(unseen[0])}): BOOK and OUT's folder must be on a file system the "
                              f"workers share, at the same path (docs/operations.md); {RESUMES} once they do")
        time.sleep(1)


@contextlib.contextmanager
def _early_cluster(book_dir: Path, workers: int | None):
    """A local Dask cluster of ``workers`` worker processes (None without ``workers``),
    started on a thread while the sweep plans and warmed as ``_early_workers``' processes
    are: the future of its client. Closed when the sweep ends, however it ends.
    A remote scheduler is connected to after the plan: a connection that hangs until its
    timeout must not hold up a sweep stopped before its shards."""
    if not workers:
        yield None
        return
    starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpm-vec-cluster")
    starting = starter.submit(_start_cluster, str(book_dir), workers)
    starter.shutdown(wait=False)
    try:
        yield starting
    finally:
        if starting.exception() is None:  # one that failed to start closed itself (_start_cluster)
            _close_cluster(starting.result())


def _start_cluster(book_dir: str, workers: int):
    """The client of a local cluster of ``workers`` processes sharing this machine's cores,
    each with the engine imported and the book's reference tables read."""
    import dask
    from dask.distributed import Client, LocalCluster

    # inherited, not LocalCluster's env=, which reaches a worker after its spawn has imported
    # dpm_vec (the main module) and with it Polars, whose pool is sized then
    with dask.config.set(LOCAL_WORKER_CONFIG), _environment(POLARS_MAX_THREADS=str(_cores_each(workers))):
        # no dashboard; Dask's HTTP routes on a free local port, not 8787 (in use: a warning)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                               scheduler_kwargs={"dashboard": False})
    client = Client(cluster)
    try:
        client.run(_warm_worker, book_dir)
    except BaseException:
        _close_cluster(client)
        raise
    return client


def _close_cluster(client) -> None:
    """Close a local cluster's client, then the cluster (a client given a cluster does not
    own it)."""
    client.close()
    client.cluster.close()


def run_isolating(book: Book, timer: StageTimer | None = None, tables: tuple[str, ...] = OUTPUT_TABLES) -> dict[str, pl.DataFrame]:
    """The output tables of ``book``. If the engine fails on the shard, the portfolios it
    cannot compute are isolated, by name where the error names them (trades outside the
    quantity range, values outside the fixed point), else by halving the shard; each of
    those gets one BLOCKED run record (block_reason ENGINE_ERROR) and every other
    portfolio its result."""
    try:
        return output_tables(run(book, allocations=False, timer=timer), tables)
    except ENGINE_FAILURES as exc:  # a failed portfolio is a row, not a crash
        named = named_failures(exc)
        failing = book.portfolios["run_key"].is_in(pl.Series(list(named), dtype=pl.String).implode())
        if failing.any():
            return _without_named(book, exc, named, failing, timer, tables)
        n = book.portfolios.height
        if n <= 1:
            log.error("portfolio %s could not be computed: %s", book.portfolios["run_key"].to_list(), exc)
            return _engine_error_tables(book, exc, _empty_tables(book, tables))
        halves = [book.portfolios.slice(0, n // 2), book.portfolios.slice(n // 2)]
        parts = [run_isolating(replace(book, portfolios=half), timer, tables) for half in halves]
        return {name: pl.concat([part[name] for part in parts], how="vertical_relaxed") for name in parts[0]}


def _without_named(book: Book, exc: BaseException, named: dict[str, str], failing: pl.Series, timer: StageTimer | None,
                   tables: tuple[str, ...]) -> dict[str, pl.DataFrame]:
    """The output tables of ``book`` whose ``failing`` portfolios the engine's error named:
    each gets its record with its own failure (``named``, by run key), and the others one
    more pass together, back in the shard's order."""
    blocked = book.portfolios.filter(failing)
    for key in blocked["run_key"]:
        log.error("portfolio %s could not be computed: %s", key, named[key])
    details = pl.concat_str(pl.lit(f"{type(exc).__name__}: "), pl.col("run_key").replace_strict(named, return_dtype=pl.String))
    parts = [_engine_error_tables(replace(book, portfolios=blocked), exc, _empty_tables(book, tables), details)]
    if not failing.all():
        parts.append(run_isolating(replace(book, portfolios=book.portfolios.filter(~failing)), timer, tables))
    order = book.portfolios.select("run_key", pl.int_range(pl.len(), dtype=pl.UInt32).alias("_shard_order"))
    return {name: pl.concat([part[name] for part in parts], how="vertical_relaxed")
            .join(order, on="run_key", how="left", maintain_order="left").sort("_shard_order", maintain_order=True).drop("_shard_order")
            for name in parts[0]}


def _empty_tables(book: Book, tables: tuple[str, ...]) -> dict[str, pl.DataFrame]:
    """The output tables of no portfolio of ``book``: every table's columns and types."""
    return output_tables(run(replace(book, portfolios=book.portfolios.head(0)), allocations=False), tables)


def _engine_error_tables(book: Book, exc: BaseException, empty: dict[str, pl.DataFrame],
                         detail: pl.Expr | None = None) -> dict[str, pl.DataFrame]:
    """One BLOCKED ENGINE_ERROR run record per portfolio of ``book``, in ``empty``'s
    tables (``_empty_tables``) and columns; its detail is ``detail`` (an expression over
    the portfolio's row), or the error's summary. It has no intents (counts and turnover
    0) and its options hash; what was not computed (values, rule counts, gate) is null."""
    p = book.portfolios
    policy = [name for name, _, _ in POLICY_COLUMNS]
    runs = p.join(options_hashes(p), on=policy, how="left", nulls_equal=True, maintain_order="left").select(
        "run_key", "portfolio_id", "scenario_id", "base_currency", "portfolio_snapshot_id", "market_snapshot_id",
        "shelf_id", "model_id", "target_method", "request_hash", "options_hash",
        pl.lit("BLOCKED").alias("status"), pl.lit("E1").alias("exit_path"), pl.lit("ENGINE_ERROR").alias("block_reason"),
        (pl.lit(failure_summary(exc)) if detail is None else detail).alias("block_detail"),
        pl.lit(0, dtype=pl.Int64).alias("security_intent_count"), pl.lit(0, dtype=pl.Int64).alias("fx_intent_count"),
        lit(0).alias("gross_turnover_notional_base"),
        pl.lit([f"ENGINE_ERROR:{type(exc).__name__}"], dtype=pl.List(pl.String)).alias("warnings"),
        pl.lit(__version__).alias("engine_version"),
    )
    return {**empty, "runs": pl.concat([empty["runs"], runs], how="diagonal_relaxed").select(empty["runs"].columns)}


def _duration(seconds: float) -> str:
    """Seconds as an operator reads them: 42 s, 3 min 05 s, 2 h 07 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _Progress:
    """A rich progress bar on a terminal; otherwise (a batch job's log) one line per shard
    with the portfolios done, the time so far and an estimate of the time left. Shards an
    earlier run finished (``resume``) count as done but not toward the pace."""

    def __init__(self, shards: int, portfolios: int, enabled: bool, clock: Callable[[], float] = time.monotonic):
        self.shards, self.done, self.portfolios, self.enabled = shards, 0, 0, enabled
        self.total, self._clock, self._start, self._resumed = portfolios, clock, clock(), 0
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            # on stderr, the terminal that enabled it: stdout may be a file (`> summary.txt`)
            self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=False, console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task("portfolios", total=portfolios)

    def resume(self, shards: int, portfolios: int) -> None:
        """Shards an interrupted run of the same sweep already committed."""
        self.done += shards
        self.portfolios += portfolios
        self._resumed += portfolios
        if self._bar is not None:  # as done, without a jump in the bar's pace samples
            self._bar.reset(self._task, completed=self.portfolios)
        elif shards:
            log.info("resuming: %d of %d shards already done (%s of %s portfolios)", self.done, self.shards,
                     f"{self.portfolios:,}", f"{self.total:,}")

    def advance(self, shards: int, portfolios: int) -> None:
        self.done += shards
        self.portfolios += portfolios
        if self._bar is not None:
            self._bar.update(self._task, advance=portfolios)
        elif shards:
            elapsed = self._clock() - self._start
            computed = self.portfolios - self._resumed
            left = self.total - self.portfolios
            pace = f", about {_duration(elapsed / computed * left)} left" if computed and left else ""
            share = f"{self.portfolios / self.total:.0%}" if self.total else "100%"
            log.info("%d of %d shards done (%s of %s portfolios, %s); %s elapsed%s", self.done, self.shards,
                     f"{self.portfolios:,}", f"{self.total:,}", share, _duration(elapsed), pace)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
