"""Simulate JSON requests through the engine: one request, or many as one book."""

from __future__ import annotations

from dpm_vec.contract import parse_request, request_hash, rows_to_book
from dpm_vec.book import TABLES
from dpm_vec.errors import RequestError
from dpm_vec.pipeline import run
from dpm_vec.render import render_results


def simulate_many(requests: list) -> list[dict]:
    """Run every valid request in one engine pass; invalid ones get an RFC 7807 problem.

    Each slot is independent: a request's data is keyed by its own run key, so requests
    that share portfolio or instrument ids cannot affect each other.
    """
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    slots: list[dict | None] = [None] * len(requests)
    valid: list[int] = []
    for index, request in enumerate(requests):
        key = f"r{index:07d}"
        try:
            parsed = parse_request(request, key)
        except RequestError as exc:
            slots[index] = exc.problem()
            continue
        parsed["portfolios"][0]["request_hash"] = request_hash(request)
        for table, table_rows in parsed.items():
            rows[table].extend(table_rows)
        valid.append(index)
    if valid:
        results = render_results(run(rows_to_book(rows)))
        for index, result in zip(valid, results):
            # each request is its own market snapshot inside the book; the contract names it "md" (§5.8)
            result["lineage"]["market_data_snapshot_id"] = "md"
            slots[index] = result
    return slots  # type: ignore[return-value]


def simulate_one(request) -> dict:
    """Simulate one request; raises RequestError when it is invalid."""
    if not isinstance(request, dict):
        raise RequestError([{"field": "$", "message": "request body must be a JSON object"}])
    result = simulate_many([request])[0]
    if result.get("status") == 422 and "errors" in result:
        raise RequestError(result["errors"])
    return result
