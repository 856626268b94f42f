"""Simulate JSON requests through the engine: one request, or many as one book."""

from __future__ import annotations

import logging

from dpm_vec.contract import JSON_DOOR_OPTION, book_of_requests, parse_request, request_hash
from dpm_vec.errors import (ENGINE_FAILURES, InfeasibleConstraintError, RangeError, RequestError, ValueRangeError, failure_summary,
                            is_overflow, named_failures, problem)
from dpm_vec.pipeline import run
from dpm_vec.render import render_results

log = logging.getLogger("dpm_vec.simulate")


class Simulated(dict):
    """A reference-shaped result, exactly the JSON a client gets, that also carries why its
    run blocked (the runs table's ``block_reason`` and ``block_detail``; None unless
    BLOCKED) for the service's log line, which the reference's contract has no field for."""

    block_reason: str | None = None
    block_detail: str | None = None


def simulate_many(requests: list) -> list[dict]:
    """Run every valid request in one engine pass; invalid ones get an RFC 7807 problem.

    Each slot is independent: a request's data is keyed by its own run key, so requests
    that share portfolio or instrument ids cannot affect each other. A request the engine
    cannot compute gets a problem in its slot (422 for a value outside the engine's fixed
    point, else 500) while the others still answer (``simulate_outcomes``).
    """
    return [_problem(outcome, index) if isinstance(outcome, BaseException) else outcome
            for index, outcome in enumerate(simulate_outcomes(requests))]


def simulate_outcomes(requests: list) -> list[dict | BaseException]:
    """Each request's result, or the exception that stands for it: a RequestError for an
    invalid request, a QuantityRangeError or ValueRangeError for one outside the engine's
    fixed point, an InfeasibleConstraintError for a run the RFC asset-class cap blocks when
    the request asks for RFC-0001 §7's problem (``options.rfc_domain_errors``), else the
    exception the engine raised on it alone.

    If the shared pass fails on trades outside the quantity range, or on values outside
    the fixed point that the engine can name, the requests it names fail and the others
    get one more pass; on any other failure it is halved until the
    requests that break it run alone (``_isolating``: about 2 log2(n) passes per such
    request, not n).
    """
    slots: list[dict | BaseException | None] = [None] * len(requests)
    parsed: dict[int, dict[str, list[dict]]] = {}
    for index, request in enumerate(requests):
        try:
            rows = parse_request(request, f"r{index:07d}")
        except RequestError as exc:
            slots[index] = exc
            continue
        rows["portfolios"][0]["request_hash"] = request_hash(request)
        parsed[index] = rows
    if parsed:
        for index, result in _isolating(parsed).items():
            slots[index] = result
    return slots  # type: ignore[return-value]


def _problem(exc: BaseException, index: int) -> dict:
    """The RFC 7807 problem for slot ``index``'s failure."""
    if isinstance(exc, RequestError):
        return exc.problem()
    if isinstance(exc, RangeError):
        return type(exc)(f"request {index + 1}: {exc}").problem()
    if isinstance(exc, InfeasibleConstraintError):  # RFC-0001 §7's detail as it stands; portfolio_id names the request
        return exc.problem()
    return problem("about:blank", "Internal Server Error", 500, f"request {index + 1} could not be simulated ({failure_summary(exc)})")


def _isolating(parsed: dict[int, dict[str, list[dict]]]) -> dict[int, dict | BaseException]:
    """The results of the ``parsed`` requests (by slot index) from one engine pass; if
    that pass fails, from each half's, recursively, so a request that breaks a pass ends
    up alone (``_alone``) and the rest share passes."""
    if len(parsed) == 1:
        [(index, rows)] = parsed.items()
        return {index: _alone(rows)}
    try:
        return dict(zip(parsed, _simulate(list(parsed.values()))))
    except ENGINE_FAILURES as exc:  # isolate the request that breaks the pass
        named = _named_in(exc, parsed)
        if named:  # the engine named the requests it cannot compute: the others need one more pass
            log.warning("one engine pass over %d requests failed (%s); running it again without the %d it names",
                        len(parsed), failure_summary(exc), len(named))
            rest = {i: rows for i, rows in parsed.items() if i not in named}
            return {**{i: type(exc)(detail) for i, detail in named.items()},
                    **(_isolating(rest) if rest else {})}
        log.warning("one engine pass over %d requests failed (%s); running each half on its own", len(parsed), failure_summary(exc))
        indexes = list(parsed)
        half = len(indexes) // 2
        return {**_isolating({i: parsed[i] for i in indexes[:half]}), **_isolating({i: parsed[i] for i in indexes[half:]})}


def _named_in(exc: BaseException, parsed: dict[int, dict[str, list[dict]]]) -> dict[int, str]:
    """The slot indexes of ``parsed`` that ``exc`` names as failing, each with its
    message; empty if it names none."""
    by_run_key = named_failures(exc)
    keys = {i: rows["portfolios"][0]["run_key"] for i, rows in parsed.items()}
    return {i: by_run_key[key] for i, key in keys.items() if key in by_run_key}


def _simulate(parsed: list[dict[str, list[dict]]]) -> list[Simulated | InfeasibleConstraintError]:
    outcome = run(book_of_requests(parsed))
    results: list[Simulated | InfeasibleConstraintError] = []
    blocks = outcome.runs.select("block_reason", "block_detail").iter_rows()
    for one, rendered, (reason, detail) in zip(parsed, render_results(outcome), blocks):
        result = Simulated(rendered)
        result.block_reason, result.block_detail = reason, detail
        # each request is its own market snapshot inside the book; the contract names it "md" (§5.8)
        result["lineage"]["market_data_snapshot_id"] = "md"
        asked = one["portfolios"][0][JSON_DOOR_OPTION]
        concentration = asked and result["status"] == "BLOCKED" and reason == "INFEASIBLE_CONCENTRATION"
        results.append(InfeasibleConstraintError(detail, result["lineage"]["portfolio_snapshot_id"]) if concentration else result)
    return results


def _alone(rows: dict[str, list[dict]]) -> dict | BaseException:
    try:
        return _simulate([rows])[0]
    except ENGINE_FAILURES as exc:  # reported in the slot, never as a traceback
        if is_overflow(exc):
            return ValueRangeError(f"an intermediate value left the engine's fixed-point range ({failure_summary(exc)})")
        return exc
