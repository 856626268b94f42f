"""Operational defaults shared by the CLI and the library (no heavy imports here: the
CLI reads them while it builds its argument parser)."""

import os

# rows a sweep holds in memory at once, over all the shards it computes at the same time
# (threads of one process, or worker processes of a local cluster), each run counted as its
# holdings plus its model's targets (a shard's frames follow its target rows, model ∪
# holdings) plus RUN_ROWS for the frames it has one row in: peak memory follows them
# (RUN_ROWS fitted so that two shards in flight peak at about 0.6 GiB + 2.2 GiB per
# million such rows in one of them, from 2 to ~55 holdings a portfolio: two shards of
# 8,000 portfolios of ~55 holdings and ~28 targets 2.3-2.4 GiB; of 12,500 portfolios of 10
# holdings 1.9 GiB; of 16,667 and 25,000 portfolios of 2 holdings 2.3 and 3.2 GiB;
# benchmarks/HISTORY.md, "Forty-sixth session"; portfolios of 500 holdings take more a
# row, 4.1-4.2 GiB for shards of 1,334). So a shard holds as many portfolios as
# its rows allow: the benchmarks' ~55-holding books get 16,000 / the shards computed at
# once, books of small portfolios larger shards (a shard pass has ~0.8 s of fixed cost),
# books of large ones smaller (two shards of 8,000 portfolios of 500 holdings, 4M rows
# each, peaked at 15.7 GiB).
DEFAULT_SHARD_ROWS = 1_600_000
RUN_ROWS = 16
# portfolios per shard, over all the shards at once, where a caller does not count the
# book's rows (a sweep of one portfolio): DEFAULT_SHARD_ROWS over ~100 rows a run, as in
# the benchmarks' books
DEFAULT_SHARD_SIZE = 16_000

# shards computed at once in one process: most Polars kernels run on the calling thread
# with the GIL released, so one thread keeps ~1.2 of two cores busy and two keep both;
# more threads than that contend for the GIL (the engine issues ~3,000 operations a shard)
MAX_DEFAULT_THREADS = 2

# a sweep of at least this many shards runs them in worker processes (one per core, at
# most MAX_DEFAULT_THREADS) instead of threads when none is chosen: two processes, each
# running Polars on one core, finished the 1M book in 295 s against 366 s for two shard
# threads sharing one process's Polars pool; below it the workers' start-up (~0.6 s each:
# a fresh interpreter importing Polars) can cost more than they gain on a small book
PROCESSES_FROM_SHARDS = 5
# and so does a sweep of two or more shards over a book of at least this many rows, counted
# as DEFAULT_SHARD_ROWS counts them: there two shard threads lose more to the GIL (their
# stage seconds 30-45% above two processes') than the workers' start costs. Two processes,
# three alternated pairs against threads: the 10k book (547k holding rows, 996k counted)
# 3.53-3.75 s against 3.75-3.93, 5,000 portfolios of 100 holdings 3.28-3.35 s against
# 3.39-3.66; the 1k book (99k counted) 1.85-1.96 s against 1.70-1.88 (benchmarks/HISTORY.md,
# "Forty-fifth session"); 100,000 portfolios of 2 holdings (200k holding rows, 4.4M counted)
# in four shards 9.1-9.3 s against 11.5-11.9 ("Forty-sixth session"). The threshold is the
# forty-fifth session's 250,000 holding rows for the books it was measured on (~55 holdings).
PROCESSES_FROM_ROWS = 450_000


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """Shard threads of an in-process sweep when none is given: one per core, at most two."""
    return max(1, min(MAX_DEFAULT_THREADS, usable_cores()))


def default_shard_size(concurrent_shards: int | None = None, portfolios: int | None = None,
                       rows_per_portfolio: float | None = None) -> int:
    """Portfolios per shard when none is given. Shards computed at the same time on this
    machine (threads, or local worker processes) share its memory, so each gets its share
    of ``DEFAULT_SHARD_ROWS``, in portfolios of ``rows_per_portfolio`` rows (the book's
    mean, counted as ``sweep.run_rows`` counts them; ``DEFAULT_SHARD_SIZE`` portfolios
    for all the shards at once where it is not known). The book is then cut into a multiple
    of ``concurrent_shards`` shards (``even_shard_size``), so that no thread or worker
    waits for another at the end. Smaller shards also spend less time in the kernel's page
    faults on the benchmark machine (100k book, two threads, in a noisy spell: 38-41 s with
    8,334-portfolio shards, 42-47 s with 12,500, 41-43 s with 5,000)."""
    at_once = concurrent_shards or 1  # a remote cluster: its workers have machines of their own
    if rows_per_portfolio is None:
        size = DEFAULT_SHARD_SIZE // at_once
    else:
        size = int(DEFAULT_SHARD_ROWS / at_once / max(rows_per_portfolio, RUN_ROWS))
    size = max(1, size)
    if concurrent_shards and portfolios:
        size = even_shard_size(portfolios, size, concurrent_shards)
    return size


def even_shard_size(portfolios: int, size: int, concurrent_shards: int) -> int:
    """The shard size, at most ``size``, that cuts ``portfolios`` into the same number of
    rounds of ``concurrent_shards`` shards with every round full (as near as whole
    portfolios allow): a last round of fewer shards leaves threads or workers idle while
    the others finish it. The 100k book on two processes: 13 shards of 8,000 took
    18.8-19.4 s, 14 of 7,143 18.0-18.6 s (benchmarks/HISTORY.md, "Twenty-first session")."""
    if concurrent_shards <= 1:  # one shard at a time: nothing waits
        return max(1, min(size, portfolios))
    shards = -(-portfolios // max(1, size))
    rounds = -(-shards // concurrent_shards)
    return max(1, -(-portfolios // (rounds * concurrent_shards)))

# Parquet outputs: zstd at level 1 writes ~30% faster than the default level for ~3% more
# bytes on sweep outputs; every Parquet reader (DuckDB, Spark, Arrow, pandas) reads zstd
PARQUET_COMPRESSION = {"compression": "zstd", "compression_level": 1}
