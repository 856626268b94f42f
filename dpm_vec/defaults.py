"""Operational defaults shared by the CLI and the library (no heavy imports here: the
CLI reads them while it builds its argument parser)."""

import os

# portfolios a sweep holds in memory at once, over all the shards it computes at the same
# time (threads of one process, or worker processes of a local cluster): peak memory
# follows it, about 2.4 GiB at ~55 holdings per portfolio (benchmarks/README.md)
DEFAULT_SHARD_SIZE = 16_000

# shards computed at once in one process: most Polars kernels run on the calling thread
# with the GIL released, so one thread keeps ~1.2 of two cores busy and two keep both;
# more threads than that contend for the GIL (the engine issues ~3,000 operations a shard)
MAX_DEFAULT_THREADS = 2


def default_threads() -> int:
    """Shard threads of an in-process sweep when none is given: one per core, at most two."""
    return max(1, min(MAX_DEFAULT_THREADS, os.cpu_count() or 1))


def default_shard_size(concurrent_shards: int | None = None) -> int:
    """Portfolios per shard when none is given. Shards computed at the same time on this
    machine (threads, or local worker processes) share its memory, so each gets its share
    of the default: peak memory stays about that of one shard of the default size. Smaller
    shards are also faster on the benchmark machine, down to ~5,000 portfolios (100k book,
    two threads: 38-41 s with 8,000-portfolio shards, 43-47 s with 12,500)."""
    return max(1, DEFAULT_SHARD_SIZE // concurrent_shards) if concurrent_shards else DEFAULT_SHARD_SIZE

# Parquet outputs: zstd at level 1 writes ~30% faster than the default level for ~3% more
# bytes on sweep outputs; every Parquet reader (DuckDB, Spark, Arrow, pandas) reads zstd
PARQUET_COMPRESSION = {"compression": "zstd", "compression_level": 1}
