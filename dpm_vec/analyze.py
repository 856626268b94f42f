"""What-if analysis (spec §7): one snapshot under several option sets, run as one book.

Every valid scenario becomes a run keyed by its name, so all scenarios go through the
engine in a single pass; invalid option sets fail their own scenario only.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timezone
from decimal import Decimal

from dpm_vec.contract import parse_request
from dpm_vec.errors import InfeasibleConstraintError, RangeError, RequestError, fault, not_an_object
from dpm_vec.simulate import simulate_outcomes

log = logging.getLogger("dpm_vec.analyze")

SCENARIO_NAME = re.compile(r"[a-z0-9_-]{1,64}")  # fullmatch: a name ending in a newline is no name
MAX_SCENARIOS = 20
SHARED_KEYS = ("portfolio_snapshot", "market_data_snapshot", "model_portfolio", "shelf_entries")
# EngineOptions in declaration order (§4's table): a scenario fails on its first invalid
# option in this order (§7), whatever order the request lists them in
OPTION_ORDER = (
    "valuation_mode", "target_method", "compare_target_methods", "compare_target_methods_tolerance", "cash_band_min_weight",
    "cash_band_max_weight", "single_position_max_weight", "min_trade_notional", "allow_restricted", "suppress_dust_trades",
    "dust_trade_threshold", "fx_buffer_pct", "block_on_missing_prices", "block_on_missing_fx", "min_cash_buffer_pct",
    "max_turnover_pct", "enable_tax_awareness", "max_realized_capital_gains", "enable_settlement_awareness",
    "settlement_horizon_days", "fx_settlement_days", "max_overdraft_by_ccy", "group_constraints", "enable_workflow_gates",
    "workflow_requires_client_consent", "client_consent_already_obtained",
    # the advisory-only row, in the order §4 lists it
    "enable_proposal_simulation", "proposal_apply_cash_flows_first", "proposal_block_negative_cash", "enable_drift_analytics",
    "enable_suitability_scanner", "suitability_thresholds", "enable_instrument_drift", "drift_top_contributors_limit",
    "drift_unmodeled_exposure_threshold", "auto_funding", "funding_mode", "fx_funding_source_currency", "fx_generation_policy",
)
# the reference's own words where the spec quotes them (§7): field -> (the starts of our
# messages they stand for, their words)
REFERENCE_MESSAGES = {
    "options.max_turnover_pct": (("must be >=", "must be <="), "Value error, max_turnover_pct must be between 0 and 1 inclusive"),
}


def invalid_options_reason(errors: list[dict]) -> str:
    """``failed_scenarios``' text for a scenario whose options fail validation: its first
    error in option declaration order (options the table does not list come after), in the
    reference's words where the spec quotes them (a bound of max_turnover_pct: text that is
    no number fails otherwise), else dpm_vec's own, which names the option."""
    def rank(error: dict) -> int:
        name = error["field"].removeprefix("options.").split(".")[0].split("[")[0]
        return OPTION_ORDER.index(name) if name in OPTION_ORDER else len(OPTION_ORDER)
    first = min(errors, key=rank)  # min keeps the earliest of equal rank
    ours, theirs = REFERENCE_MESSAGES.get(first["field"], ((), None))
    return f"INVALID_OPTIONS: {theirs if first['message'].startswith(ours) else first['field'] + ': ' + first['message']}"


def validate_batch(batch) -> dict:
    """Whole-request checks, every fault listed (§2.4): the shared parts as a simulate
    request's, then the scenarios map. Returns the scenarios map or raises RequestError."""
    if not isinstance(batch, dict):
        raise RequestError([not_an_object(batch)])
    errors: list[dict] = []
    shared = {**{k: batch[k] for k in SHARED_KEYS if k in batch}, "options": {}}
    try:
        parse_request(shared, "shared")
    except RequestError as exc:  # a missing shared key is missing from the body the client sent
        errors.extend({**e, "input": batch} if e["input"] is shared else e for e in exc.errors)
    errors.extend(_scenario_errors(batch))
    if errors:
        raise RequestError(errors)
    return batch["scenarios"]


def _scenario_errors(batch: dict) -> list[dict]:
    """§7's checks of the scenarios map: present, a non-empty object of at most 20, each
    name matching the pattern and each scenario an object whose ``options`` is one."""
    if "scenarios" not in batch:
        return [fault("scenarios", "field required", "missing", batch)]
    scenarios = batch["scenarios"]
    if not isinstance(scenarios, dict) or not scenarios:
        return [fault("scenarios", "must be a non-empty object", "too_short" if isinstance(scenarios, dict) else "dict_type", scenarios)]
    if len(scenarios) > MAX_SCENARIOS:
        return [fault("scenarios", f"at most {MAX_SCENARIOS} scenarios, got {len(scenarios)}", "too_long", scenarios)]
    errors = []
    for name, spec in scenarios.items():
        if not SCENARIO_NAME.fullmatch(name):
            errors.append(fault(f"scenarios[{name!r}]", "scenario names must match ^[a-z0-9_-]{1,64}$", value=name))
        elif not isinstance(spec, dict):
            errors.append(fault(f"scenarios[{name!r}]", "a scenario must be an object", "model_attributes_type", spec))
        elif not isinstance(spec.get("options", {}), dict):
            errors.append(fault(f"scenarios[{name!r}].options", "options must be an object", "model_attributes_type", spec.get("options")))
        elif not isinstance(spec.get("description", ""), (str, type(None))):
            errors.append(fault(f"scenarios[{name!r}].description", "expected a string", "string_type", spec.get("description")))
    return errors


def analyze(batch) -> dict:
    """The BatchRebalanceResult of an analyze request (§7)."""
    scenarios = validate_batch(batch)
    batch_run_id = f"batch_{uuid.uuid4().hex[:8]}"
    failed: dict[str, str] = {}
    requests, names = [], []
    for name in sorted(scenarios):
        request = {**{k: batch[k] for k in SHARED_KEYS}, "options": scenarios[name].get("options", {})}
        try:
            parse_request(request, name)
        except RequestError as exc:
            failed[name] = invalid_options_reason(exc.errors)
            continue
        requests.append(request)
        names.append(name)
    results = _run(requests, names, failed)
    metrics = {}
    for name in list(results):
        result = results[name]
        result["lineage"]["request_hash"] = f"{batch_run_id}:{name}"
        security = [i for i in result["intents"] if i["intent_type"] == "SECURITY_TRADE"]
        turnover = sum((Decimal(i["notional_base"]["amount"]) for i in security), Decimal(0))
        metrics[name] = {
            "status": result["status"],
            "security_intent_count": len(security),
            "gross_turnover_notional_base": {"amount": str(turnover), "currency": batch["portfolio_snapshot"]["base_currency"]},
        }
    ps, md = batch["portfolio_snapshot"], batch["market_data_snapshot"]
    return {
        "batch_run_id": batch_run_id,
        "run_at_utc": datetime.now(timezone.utc).isoformat(),
        "base_snapshot_ids": {
            "portfolio_snapshot_id": ps.get("snapshot_id") or ps.get("portfolio_id"),
            "market_data_snapshot_id": md.get("snapshot_id") or "md",
        },
        "results": results,
        "comparison_metrics": metrics,
        "failed_scenarios": dict(sorted(failed.items())),
        "warnings": ["PARTIAL_BATCH_FAILURE"] if failed else [],
    }


def _run(requests: list[dict], names: list[str], failed: dict[str, str]) -> dict[str, dict]:
    """All scenarios in one engine pass (a scenario the engine cannot compute fails alone,
    ``simulate_outcomes``), each failure recorded as §7 words it: the exception's class,
    and for a value outside the engine's fixed point (§9.1), or the RFC asset-class cap's
    block that a scenario's ``rfc_domain_errors`` asks to be told as a problem, what it is."""
    results = {}
    for name, outcome in zip(names, simulate_outcomes(requests)):
        if not isinstance(outcome, BaseException):
            results[name] = outcome
        elif isinstance(outcome, (RangeError, InfeasibleConstraintError)):
            failed[name] = f"SCENARIO_EXECUTION_ERROR: {type(outcome).__name__}: {outcome}"
        else:
            log.warning("scenario %s could not be simulated: %s: %s", name, type(outcome).__name__, outcome)
            failed[name] = f"SCENARIO_EXECUTION_ERROR: {type(outcome).__name__}"
    return results
