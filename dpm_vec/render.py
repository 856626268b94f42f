"""Result frames → the reference service's RebalanceResult JSON (spec §5).

This is the edge of the JSON door: it walks each run's rows (already computed by the
engine) and shapes them; it computes nothing but the 4-dp display rounding of weights and,
under RFC ``rfc_rationale_codes``, the intents' messages written from those weights.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

import polars as pl

from dpm_vec.book import amount_as_given
from dpm_vec.codes import BEFORE_TRADES, ENGINE_BLOCKS
from dpm_vec.numeric import to_text
from dpm_vec.pipeline import Result

FOUR_DP = Decimal("0.0001")
DISPLAY_GUARD = Decimal("1e-26")


def _weight(value: Decimal | None) -> str | None:
    return None if value is None else to_text(value.quantize(FOUR_DP, rounding=ROUND_HALF_EVEN))


def _percent(weight: Decimal) -> str:
    """A weight as a percentage of its 4-dp display rounding: 0.1500 → "15", 0.33335 → "33.34".
    Rounded at 26 decimals first, so that a weight a last digit from a 4-dp midpoint (a final
    weight whose 28th digit the fixed point and the reference's arithmetic may set apart)
    counts as on it: 0.08674999999999999999999999999 → "8.68", as 0.08675."""
    with localcontext(Context(prec=60)):
        near = weight.quantize(DISPLAY_GUARD, rounding=ROUND_HALF_EVEN)
        return f"{(near.quantize(FOUR_DP, rounding=ROUND_HALF_EVEN) * 100).normalize():f}"


RFC_MESSAGE_PREFIX = {"REBALANCE_DRIFT": "", "CASH_INVESTMENT": "Investing cash: ", "LIQUIDATION": "Liquidation: "}


def _rfc_message(code: str, current: Decimal, target: Decimal, cap: Decimal | None) -> str:
    """RFC §5.2's descriptive rationale ("Allocation 15% < Target 20%"): the instrument's
    before-state weight against its final target weight, as percentages of their 4-dp
    display values, compared as displayed; CONSTRAINT_CAP names the cap."""
    now, then = _percent(current), _percent(target)
    sign = "<" if Decimal(now) < Decimal(then) else ">" if Decimal(now) > Decimal(then) else "="
    prefix = f"Capped at max {_percent(cap)}%: " if code == "CONSTRAINT_CAP" else RFC_MESSAGE_PREFIX[code]
    return f"{prefix}Allocation {now}% {sign} Target {then}%"


def _rfc_messages(parts: dict, cap: Decimal | None) -> dict[str, str]:
    """Each security intent's RFC message by intent id: its instrument's first before-state
    position's weight (0 if not held) against the last trace row's final weight (§6.9)."""
    held_weight: dict[str, Decimal] = {}
    for p in sorted(parts["positions_before"], key=lambda p: p["pos_seq"]):
        held_weight.setdefault(p["instrument_id"], p["weight"])
    final_weight = {t["instrument_id"]: t["final_weight"] for t in parts["targets"]}
    return {it["intent_id"]: _rfc_message(it["rationale_code"], held_weight.get(it["instrument_id"], Decimal(0)),
                                          final_weight[it["instrument_id"]], cap)
            for it in parts["intents"] if it["intent_type"] == "SECURITY_TRADE"}


def _quantity(row: dict) -> str:
    """Quantities walked in 28-digit arithmetic print every digit (z × 10^k): a notional-sized
    one below 0.1 unit (``quantity_sig``), a tax-limited one, an after-state they changed."""
    # a null F28 can come as a struct of null fields (dec28.is_null): its exponent says
    exact = next((v for v in (row.get("quantity_sig"), row.get("quantity_f28")) if v is not None and v["k"] is not None), None)
    if exact is not None:
        return to_text(Decimal(exact["z"]).scaleb(exact["k"]))
    return to_text(row["quantity"])


def _money(amount, currency) -> dict | None:
    if amount is None:
        return None
    return {"amount": to_text(amount), "currency": currency}


def _by_run(frame: pl.DataFrame) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = defaultdict(list)
    for row in frame.iter_rows(named=True):
        grouped[row["run"]].append(row)
    return grouped


def render_results(result: Result, run_ids: dict[int, str] | None = None) -> list[dict]:
    """One RebalanceResult dict per run, in run order."""
    parts = {name: _by_run(frame) for name, frame in result.tables().items() if name != "runs"}
    out = []
    for run in result.runs.iter_rows(named=True):
        rid = (run_ids or {}).get(run["run"]) or f"rr_{(run.get('request_hash') or run['run_key'])[:8]}"
        out.append(_render_run(run, {name: rows.get(run["run"], []) for name, rows in parts.items()}, rid))
    return out


def _state(run: dict, parts: dict, state: str, total_value) -> dict:
    base = run["base_currency"]
    positions = sorted(parts[f"positions_{state}"], key=lambda p: p["pos_seq"])
    cash = sorted(parts[f"cash_{state}"], key=lambda c: c["cash_seq"])
    alloc = sorted(parts[f"allocations_{state}"], key=lambda a: (a["dimension"], a["attribute_order"], a["bucket_order"]))

    def bucket(a):
        return {"key": a["key"], "weight": _weight(a["weight"]), "value": _money(a["value"], base)}

    by_instrument = [bucket(a) for a in alloc if a["dimension"] == "instrument"]
    by_attribute: dict[str, list] = {}
    attr_rows = sorted((a for a in alloc if a["dimension"].startswith("attribute:")), key=lambda a: (a["attribute_order"], a["bucket_order"]))
    for a in attr_rows:
        by_attribute.setdefault(a["dimension"].split(":", 1)[1], []).append(bucket(a))
    return {
        "total_value": _money(total_value, base),
        "cash_balances": [
            {"currency": c["currency"], "amount": to_text(amount_as_given(c)), "settled": to_text(c["settled"]), "pending": to_text(c["pending"])}
            for c in cash
        ],
        "positions": [
            {
                "instrument_id": p["instrument_id"], "quantity": _quantity(p),
                "instrument_currency": p["instrument_currency"], "asset_class": p["asset_class"],
                "price": _money(p["price"], p["instrument_currency"]),
                "value_in_instrument_ccy": _money(p["value_instr"], p["instrument_currency"]),
                "value_in_base_ccy": _money(p["value_base"], base), "weight": _weight(p["weight"]),
            }
            for p in positions
        ],
        "allocation_by_asset_class": [bucket(a) for a in alloc if a["dimension"] == "asset_class"],
        "allocation_by_instrument": by_instrument,
        "allocation": [dict(b) for b in by_instrument],
        "allocation_by_attribute": by_attribute,
    }


def _threshold(rule: dict) -> dict:
    out = {}
    if rule["threshold_min"] is not None:
        out["min"] = to_text(rule["threshold_min"])
    if rule["threshold_max"] is not None:
        out["max"] = to_text(rule["threshold_max"])
    return out


def _render_run(run: dict, parts: dict, run_id: str) -> dict:
    base = run["base_currency"]
    path = run["exit_path"]
    early = path in BEFORE_TRADES
    intents = []
    messages = _rfc_messages(parts, run["single_position_max_weight"]) if run["rfc_rationale_codes"] else {}
    for it in sorted(parts["intents"], key=lambda i: i["exec_order"]):
        if it["intent_type"] == "FX_SPOT":
            intents.append({
                "intent_type": "FX_SPOT", "intent_id": it["intent_id"], "pair": it["pair"],
                "buy_currency": it["buy_currency"], "buy_amount": to_text(it["buy_amount"]),
                "sell_currency": it["sell_currency"], "sell_amount_estimated": to_text(it["sell_amount_estimated"]),
                "dependencies": [], "rationale": {"code": it["rationale_code"], "message": "Fund" if it["rationale_code"] == "FUNDING" else "Sweep"},
            })
        else:
            intents.append({
                "intent_type": "SECURITY_TRADE", "intent_id": it["intent_id"], "instrument_id": it["instrument_id"],
                "side": it["side"], "quantity": _quantity(it),
                "notional": _money(it["notional"], it["notional_currency"]),
                "notional_base": _money(it["notional_base"], base),
                "dependencies": list(it["dependencies"] or []),
                "rationale": {"code": it["rationale_code"], "message": messages.get(it["intent_id"], "Align")},
                "constraints_applied": (["MIN_NOTIONAL"] if it["min_notional_applied"] else []) + (["TAX_BUDGET"] if it["tax_budget_applied"] else []),
            })
    dq_lists = {"price_missing": [], "fx_missing": [], "shelf_missing": []}
    for f in parts["data_quality"]:
        dq_lists[f["bucket"]].append(f["item"])
    rules = [
        {
            "rule_id": r["rule_id"], "severity": r["severity"], "status": r["status"], "measured": to_text(r["measured"]),
            "threshold": _threshold(r), "reason_code": r["reason_code"], "remediation_hint": r["remediation_hint"],
        }
        for r in parts["rule_results"]
    ]
    warnings = [w["code"] for w in parts["warnings"]]
    if run.get("block_reason") in ENGINE_BLOCKS:  # the reference's own blocks are in its rule_results
        warnings.insert(0, run["block_reason"])
    recipients = defaultdict(dict)
    for rec in sorted(parts["group_recipients"], key=lambda x: x["recipient_order"]):
        recipients[rec["constraint_key"]][rec["instrument_id"]] = to_text(rec["share"])
    tax_on = run["enable_tax_awareness"] and not early
    budget = run["max_realized_capital_gains"]
    used = run["gains_budget_used"] or Decimal(0)
    if budget is not None and abs(budget - used) <= Decimal("1e-10"):
        used = budget
    coverage = "0" if early else "1"
    eligible = sorted(parts["eligible"], key=lambda e: e["list_order"])
    comparison = None
    for c in parts["method_comparison"]:
        comparison = {
            "primary_method": c["primary_method"], "primary_status": c["primary_status"],
            "alternate_method": c["alternate_method"], "alternate_status": c["alternate_status"],
            "tolerance": c["tolerance"], "differing_instruments": list(c["differing_instruments"] or []),
            "alternate_warnings": list(c["alternate_warnings"] or []),
        }
    explanation = {"summary": "Blocked"} if early else {"summary": run["status"], "target_method_comparison": comparison}
    gate = None
    if run["enable_workflow_gates"]:
        gate = {
            "gate": run["gate"], "recommended_next_step": run["recommended_next_step"],
            "reasons": [
                {"reason_code": g["reason_code"], "severity": g["severity"], "source": g["source"],
                 "details": {"reason_code": g["detail_reason_code"]} if g["detail_count"] is None else {"count": g["detail_count"]}}
                for g in parts["gate_reasons"]
            ],
            "summary": {"hard_fail_count": run["hard_fail_count"], "soft_fail_count": run["soft_fail_count"],
                        "new_high_suitability_count": 0, "new_medium_suitability_count": 0},
        }
    before_state = _state(run, parts, "before", run["before_total_value"])
    return {
        "rebalance_run_id": run_id,
        "correlation_id": "c_none",
        "status": run["status"],
        "before": before_state,
        "universe": {
            "universe_id": f"u_{run_id}",
            "eligible_for_buy": [e["instrument_id"] for e in eligible if e["list"] == "buy"],
            "eligible_for_sell": [e["instrument_id"] for e in eligible if e["list"] == "sell"],
            "excluded": [{"instrument_id": e["instrument_id"], "reason_code": e["reason_code"], "details": None} for e in parts["exclusions"]],
            "coverage": {"price_coverage_pct": coverage, "fx_coverage_pct": coverage},
        },
        "target": {
            "target_id": f"t_{run_id}", "strategy": {},
            "targets": [
                {"instrument_id": t["instrument_id"], "model_weight": to_text(t["model_weight"]), "final_weight": to_text(t["final_weight"]),
                 "final_value": _money(t["final_value"], base), "tags": list(t["tags"])}
                for t in parts["targets"]
            ],
        },
        "intents": intents,
        "after_simulated": _state(run, parts, "after", run["after_total_value"]),
        "reconciliation": None if run["reconciliation_status"] is None else {
            "before_total_value": _money(run["before_total_value"], base), "after_total_value": _money(run["after_total_value"], base),
            "delta": _money(run["delta"], base), "tolerance": _money(run["tolerance"], base), "status": run["reconciliation_status"],
        },
        "tax_impact": {
            "total_realized_gain": _money(run["realized_gain"] or Decimal(0), base),
            "total_realized_loss": _money(run["realized_loss"] or Decimal(0), base),
            "budget_limit": _money(budget, base),
            "budget_used": None if budget is None else _money(min(used, budget), base),
        } if tax_on else None,
        "rule_results": rules,
        "explanation": explanation,
        "diagnostics": {
            "warnings": warnings,
            "suppressed_intents": [
                {"instrument_id": s["instrument_id"], "reason": "BELOW_MIN_NOTIONAL",
                 "intended_notional": _money(s["intended_notional"], s["currency"]),
                 "threshold": _money(s["threshold_amount"], s["threshold_currency"])}
                for s in parts["suppressed"]
            ],
            "dropped_intents": [
                {"instrument_id": d["instrument_id"], "reason": "TURNOVER_LIMIT",
                 "potential_notional": _money(d["potential_notional"], base), "score": to_text(d["score"])}
                for d in sorted(parts["dropped"], key=lambda d: d["drop_order"])
            ],
            "group_constraint_events": [
                {"constraint_key": e["constraint_key"], "group_weight_before": to_text(e["group_weight_before"]),
                 "max_weight": to_text(e["max_weight"]), "released_weight": to_text(e["released_weight"]),
                 "recipients": recipients.get(e["constraint_key"], {}), "status": e["status"]}
                for e in sorted(parts["group_events"], key=lambda e: e["event_order"])
            ],
            "tax_budget_constraint_events": [
                {"instrument_id": t["instrument_id"],
                 "requested_quantity": _quantity({"quantity": t["requested_quantity"] if t["requested_quantity"] is not None
                                                  else t["requested_units_beyond_range"], "quantity_sig": t["requested_sig"]}),
                 "allowed_quantity": _quantity({"quantity": t["allowed_quantity"], "quantity_f28": t["quantity_f28"]}),
                 "reason_code": "TAX_BUDGET_LIMIT_REACHED"}
                for t in parts["tax_events"]
            ],
            "cash_ladder": [
                {"date_offset": c["date_offset"], "currency": c["currency"], "projected_balance": to_text(c["projected_balance"])}
                for c in parts["cash_ladder"]
            ],
            "cash_ladder_breaches": [
                {"date_offset": b["date_offset"], "currency": b["currency"], "projected_balance": to_text(b["projected_balance"]),
                 "allowed_floor": to_text(b["allowed_floor"]), "reason_code": b["reason_code"]}
                for b in parts["cash_ladder_breaches"]
            ],
            "missing_fx_pairs": [], "funding_plan": [], "insufficient_cash": [],
            "data_quality": dq_lists,
        },
        "gate_decision": gate,
        "lineage": {
            "portfolio_snapshot_id": run["portfolio_id"], "market_data_snapshot_id": run["market_snapshot_id"],
            # as the reference's (§5.8); the version is in the runs table, the logs and /health
            "request_hash": run.get("request_hash"), "idempotency_key": None, "engine_version": None,
        },
    }
