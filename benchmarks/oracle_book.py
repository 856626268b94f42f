"""Run the scalar oracle over every portfolio of a book (the baseline next to a sweep).

    /usr/bin/time -f "%e s, %M KiB" .venv/bin/python benchmarks/oracle_book.py BOOK_DIR

Each portfolio is exported as a reference request carrying only the market data and
shelf entries it needs, then simulated by dpm_vec/oracle.py, one at a time, the way a
per-portfolio service would run them. Prints portfolios, seconds and portfolios/second.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpm_vec import oracle  # noqa: E402
from dpm_vec.export import book_to_requests  # noqa: E402
from dpm_vec.io import read_book, read_portfolios, read_reference  # noqa: E402


def main(book_dir: str, chunk: int = 2000) -> None:
    portfolios = read_portfolios(book_dir)
    reference = read_reference(book_dir)
    started = time.perf_counter()
    statuses: dict[str, int] = {}
    for offset in range(0, portfolios.height, chunk):
        book = read_book(book_dir, portfolios=portfolios.slice(offset, chunk), reference=reference)
        for request in book_to_requests(book):
            status = oracle.simulate(request)["status"]
            statuses[status] = statuses.get(status, 0) + 1
    seconds = time.perf_counter() - started
    print(f"{portfolios.height} portfolios in {seconds:.1f} s: {portfolios.height / seconds:.1f} portfolios/s; {dict(sorted(statuses.items()))}")


if __name__ == "__main__":
    main(sys.argv[1])
