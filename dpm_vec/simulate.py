"""Simulate JSON requests through the engine: one request, or many as one book."""

from __future__ import annotations

import logging

import polars as pl

from dpm_vec.book import TABLES
from dpm_vec.contract import parse_request, request_hash, rows_to_book
from dpm_vec.errors import QuantityRangeError, RequestError, ValueRangeError, problem
from dpm_vec.pipeline import run
from dpm_vec.render import render_results

log = logging.getLogger("dpm_vec.simulate")


def simulate_many(requests: list) -> list[dict]:
    """Run every valid request in one engine pass; invalid ones get an RFC 7807 problem.

    Each slot is independent: a request's data is keyed by its own run key, so requests
    that share portfolio or instrument ids cannot affect each other. If the shared pass
    fails, each request runs alone, and one that cannot be computed gets a problem in its
    slot (422 for a trade outside the engine's quantity range, else 500) while the
    others still answer.
    """
    slots: list[dict | None] = [None] * len(requests)
    parsed: dict[int, dict[str, list[dict]]] = {}
    for index, request in enumerate(requests):
        try:
            rows = parse_request(request, f"r{index:07d}")
        except RequestError as exc:
            slots[index] = exc.problem()
            continue
        rows["portfolios"][0]["request_hash"] = request_hash(request)
        parsed[index] = rows
    if parsed:
        try:
            results = dict(zip(parsed, _simulate(list(parsed.values()))))
        except Exception as exc:  # noqa: BLE001 - isolate the request that breaks the pass
            if len(parsed) > 1:
                log.warning("one engine pass over %d requests failed (%s); simulating them one at a time", len(parsed), _summary(exc))
            results = {index: _alone(rows, index) for index, rows in parsed.items()}
        for index, result in results.items():
            slots[index] = result
    return slots  # type: ignore[return-value]


def _simulate(parsed: list[dict[str, list[dict]]]) -> list[dict]:
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    for one in parsed:
        for table, table_rows in one.items():
            rows[table].extend(table_rows)
    results = render_results(run(rows_to_book(rows)))
    for result in results:
        # each request is its own market snapshot inside the book; the contract names it "md" (§5.8)
        result["lineage"]["market_data_snapshot_id"] = "md"
    return results


def _alone(rows: dict[str, list[dict]], index: int) -> dict:
    try:
        return _simulate([rows])[0]
    except QuantityRangeError as exc:
        return QuantityRangeError(f"request {index + 1}: {exc}").problem()
    except Exception as exc:  # noqa: BLE001 - reported in the slot, never as a traceback
        if isinstance(exc, pl.exceptions.ComputeError) and "overflow" in str(exc):
            return ValueRangeError(f"request {index + 1}: an intermediate value left the engine's fixed-point range "
                                   f"({_summary(exc)})").problem()
        return problem("about:blank", "Internal Server Error", 500,
                       f"request {index + 1} could not be simulated ({_summary(exc)})")


def _summary(exc: Exception) -> str:
    """The exception's type and the first line of its message (at most 200 characters)."""
    return f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')[:200]}"


def simulate_one(request) -> dict:
    """Simulate one request; raises RequestError when it is invalid."""
    if not isinstance(request, dict):
        raise RequestError([{"field": "$", "message": "request body must be a JSON object"}])
    result = simulate_many([request])[0]
    if result.get("status") == 422 and "errors" in result:
        raise RequestError(result["errors"])
    return result
