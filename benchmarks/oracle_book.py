"""Run the scalar oracle over every portfolio of a book (the baseline next to a sweep).

    /usr/bin/time -f "%e s, %M KiB" .venv/bin/python benchmarks/oracle_book.py BOOK_DIR

Each portfolio is exported as a reference request carrying only the market data and
shelf entries it needs, then simulated by dpm_vec/oracle.py, one at a time, the way a
per-portfolio service would run them. Prints portfolios, the oracle's own seconds and
portfolios/second, and apart from them the seconds of building the requests (dpm_vec's
Polars-to-JSON export, which a per-portfolio service would not pay: it is given JSON).
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
    export_s = oracle_s = 0.0
    statuses: dict[str, int] = {}
    for offset in range(0, portfolios.height, chunk):
        started = time.perf_counter()
        requests = book_to_requests(read_book(book_dir, portfolios=portfolios.slice(offset, chunk), reference=reference))
        exported = time.perf_counter()
        for request in requests:
            status = oracle.simulate(request)["status"]
            statuses[status] = statuses.get(status, 0) + 1
        export_s, oracle_s = export_s + exported - started, oracle_s + time.perf_counter() - exported
    print(f"{portfolios.height} portfolios through the oracle in {oracle_s:.1f} s: {portfolios.height / oracle_s:.1f} portfolios/s "
          f"(building the requests took {export_s:.1f} s more); {dict(sorted(statuses.items()))}")


if __name__ == "__main__":
    main(sys.argv[1])
