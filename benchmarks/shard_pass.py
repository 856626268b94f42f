"""Time one sweep shard, pass after pass, in one process: the unit a sweep's worker runs.

    POLARS_MAX_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/shard_pass.py benchmarks/_books/book_100000_7_30_80 5
    POLARS_MAX_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/shard_pass.py BOOK 5 --tables runs,intents --shard-size 8000

Each pass computes and writes one shard of the book's sweep plan (shards 1, 2, 3 in
turn; in a book of three shards or fewer, each of its shards in turn; under a scratch
directory) and prints its wall time and stage seconds; the first
pass pays imports and the reference tables' read, so compare the later ones. To A/B two
engines, run this script with the other tree's root on ``PYTHONPATH``, alternating (the
script's own folder holds no ``dpm_vec``, so the ``PYTHONPATH`` tree is imported first). ``taskset`` keeps
the pass on one core, as in a sweep's busy worker; unpinned, each Polars operation also
wakes the idle core (about 9% of a pass on a 2-core VM). Profilers attach
to it directly (``py-spy record --idle``, ``perf record``, ``python -m cProfile``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from dpm_vec import sweep as sw
from dpm_vec.io import read_portfolio_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("book", type=Path)
    parser.add_argument("passes", type=int)
    parser.add_argument("--shard-size", type=int, default=8000)
    parser.add_argument("--tables", default=None, help="as dpm-vec sweep --tables")
    args = parser.parse_args()
    book = args.book.resolve()
    portfolios, _ = read_portfolio_rows(book)
    with tempfile.TemporaryDirectory(prefix="dpm-vec-shard-pass-") as scratch:
        plan = sw.plan_sweep(book, Path(scratch) / "out", args.shard_size, sw.input_hashes(book), portfolios.height,
                             None, sw.sweep_tables(args.tables))
        Path(plan.work_dir).mkdir(parents=True)
        plan = replace(plan, spans=sw.holding_spans(plan, portfolios))
        for i in range(args.passes):
            shard = 1 + i % 3 if plan.n_shards > 3 else i % plan.n_shards
            started = time.perf_counter()
            tables, timer = sw.compute_shard(plan, shard)
            shutil.rmtree(plan.shard_dir(shard), ignore_errors=True)
            sw.commit_shard(plan, shard, tables, timer)
            stages = ", ".join(f"{k} {v:.2f}" for k, v in timer.seconds.items() if not k.startswith("_"))
            print(f"pass {i} (shard {shard}): {time.perf_counter() - started:.3f} s; {stages}", flush=True)


if __name__ == "__main__":
    main()
