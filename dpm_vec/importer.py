"""Write a batch of JSON requests as a book directory (one run per request).

The book is the one ``simulate_many`` builds in memory, so ``dpm-vec sweep`` over it
gives the same results as the batch, one ``runs`` row per request in order. Each
request's model, shelf, market and holdings snapshot is also declared in the
``snapshots`` table: a request may carry an empty one (no targets, no shelf entries, no
prices, no positions and no cash), which the reference runs and a book reader would
otherwise block as an unknown reference. A value the JSON door takes, as the reference
does, but a book's checks refuse (a currency code that is not three capital letters)
stops the import, named by its request: the sweep would block that run, not answer as
the batch does.
"""

from __future__ import annotations

from pathlib import Path

from dpm_vec.contract import book_of_requests, parse_request, request_hash
from dpm_vec.errors import DpmVecError, RequestError
from dpm_vec.io import write_book
from dpm_vec.schemas import INPUT_SCHEMAS, failure_cases


def import_requests(requests: list, out_dir: str | Path, names: list[str] | None = None) -> int:
    """Write ``requests`` as a book at ``out_dir``; returns how many runs it holds. An
    invalid request stops the import, named by ``names[i]`` (its file) when given."""
    every: list[dict[str, list[dict]]] = []
    for index, request in enumerate(requests):
        key = f"r{index:07d}"
        try:
            parsed = parse_request(request, key)
        except RequestError as exc:
            raise DpmVecError(f"{names[index] if names else f'request {index + 1}'}: {exc}") from None
        portfolio = parsed["portfolios"][0]
        portfolio["request_hash"] = request_hash(request)
        parsed["snapshots"] = [
            {"kind": "MODEL", "snapshot_id": portfolio["model_id"]},
            {"kind": "SHELF", "snapshot_id": portfolio["shelf_id"]},
            {"kind": "MARKET", "snapshot_id": portfolio["market_snapshot_id"]},
            {"kind": "PORTFOLIO", "snapshot_id": portfolio["portfolio_snapshot_id"]},
        ]
        every.append(parsed)
    book = book_of_requests(every)
    _refuse_unholdable(book.tables(), names)
    write_book(book.tables(), out_dir)
    return len(requests)


def _refuse_unholdable(tables: dict, names: list[str] | None) -> None:
    """Stop at the first value a book's checks refuse, naming its request: every id of a
    request's rows is its run key ``r<index>``."""
    for table, frame in tables.items():
        cases = failure_cases(table, frame)
        if cases is None:
            continue
        case = cases.row(0, named=True)
        request = "a request"
        if case["index"] is not None:
            key = next(column for column in INPUT_SCHEMAS[table].metadata["key"] if column == "run_key" or column.endswith("_id"))
            index = int(frame[key][case["index"]][1:])
            request = names[index] if names else f"request {index + 1}"
        raise DpmVecError(f"{request}: {table}.{case['column'] or '(row)'} {case['failure_case']!r} fails {case['check']}: "
                          "the JSON door takes it, as the reference does, but a book's tables cannot hold it "
                          "(docs/book.md), so a sweep would block this run")
