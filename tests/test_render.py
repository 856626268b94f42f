"""The JSON door's result rendering: the RFC rationale messages (rfc_rationale_codes)
against the oracle's, and the parts of a result no golden shows."""

from __future__ import annotations

import copy
import re
from decimal import Decimal as D

import pytest

from dpm_vec.contract import request_hash
from dpm_vec.oracle import simulate as oracle_simulate
from dpm_vec.oracle import with_rfc_messages
from dpm_vec.render import _rfc_message
from dpm_vec.simulate import simulate_many
from tests.test_contract import REQUEST


def _oracle_message(code: str, current: str, target: str, cap: str | None) -> str:
    out = {"before": {"positions": [{"instrument_id": "I", "weight": current}]},
           "target": {"targets": [{"instrument_id": "I", "final_weight": target}]},
           "intents": [{"intent_type": "SECURITY_TRADE", "instrument_id": "I", "rationale": {"code": code, "message": "Align"}}]}
    with_rfc_messages(out, None if cap is None else D(cap))
    return out["intents"][0]["rationale"]["message"]


@pytest.mark.parametrize(("code", "current", "target", "cap", "message"), [
    ("REBALANCE_DRIFT", "0.15", "0.2", None, "Allocation 15% < Target 20%"),  # RFC §5.2's example
    ("REBALANCE_DRIFT", "0.25", "0.2", None, "Allocation 25% > Target 20%"),
    # a trade whose weights print alike (a drift below the 4th decimal) says so
    ("REBALANCE_DRIFT", "0.2", "0.20004", None, "Allocation 20% = Target 20%"),
    # 4-dp half-even first: 0.33335 → 0.3334 (33.34%), 0.33325 → 0.3332
    ("REBALANCE_DRIFT", "0.1", "0.33335", None, "Allocation 10% < Target 33.34%"),
    ("REBALANCE_DRIFT", "0.1", "0.33325", None, "Allocation 10% < Target 33.32%"),
    ("REBALANCE_DRIFT", "0.1", "0.3333333333333333333333333333", None, "Allocation 10% < Target 33.33%"),
    # a last digit from the midpoint counts as on it, whichever side the 28th digit fell
    ("CASH_INVESTMENT", "0", "0.08674999999999999999999999999", None, "Investing cash: Allocation 0% < Target 8.68%"),
    ("CASH_INVESTMENT", "0", "0.08675", None, "Investing cash: Allocation 0% < Target 8.68%"),
    ("CASH_INVESTMENT", "0", "0.08674999999999999999999", None, "Investing cash: Allocation 0% < Target 8.67%"),
    ("CASH_INVESTMENT", "0", "1", None, "Investing cash: Allocation 0% < Target 100%"),
    ("LIQUIDATION", "0.0005", "0", None, "Liquidation: Allocation 0.05% > Target 0%"),
    ("CONSTRAINT_CAP", "0", "0.1", "0.1", "Capped at max 10%: Allocation 0% < Target 10%"),
])
def test_rfc_message(code, current, target, cap, message):
    assert _rfc_message(code, D(current), D(target), None if cap is None else D(cap)) == message
    assert _oracle_message(code, current, target, cap) == message


def test_a_run_id_off_the_server_is_rr_and_the_request_hashs_first_8_hex():
    """The CLI's results carry ``rr_`` + 8 lowercase hex as the reference's do (spec §5),
    taken from the request's own hash so that the same request prints the same id."""
    result = simulate_many([REQUEST])[0]
    assert re.fullmatch(r"rr_[0-9a-f]{8}", result["rebalance_run_id"])
    assert result["rebalance_run_id"] == "rr_" + request_hash(REQUEST)[:8] == "rr_" + result["lineage"]["request_hash"][:8]


def test_a_run_blocked_before_the_trades_has_no_tax_impact_even_with_tax_awareness_on():
    """A data-quality block stops the run before any sell is sized: tax_impact is null,
    not a zero-gain summary, as the oracle (and the reference) print it."""
    request = copy.deepcopy(REQUEST)
    request["options"].update(enable_tax_awareness=True, max_realized_capital_gains="100")
    request["model_portfolio"]["targets"].append({"instrument_id": "NO_PRICE", "weight": "0.1"})
    request["shelf_entries"].append({"instrument_id": "NO_PRICE", "status": "APPROVED"})
    result, expected = simulate_many([request])[0], oracle_simulate(request)
    assert result["status"] == expected["status"] == "BLOCKED"
    assert result["tax_impact"] is None and expected["tax_impact"] is None


def test_intents_the_turnover_cap_drops_are_listed_in_the_order_they_were_dropped():
    """Five equal-weight buys under a 30% turnover cap: one fits, four are dropped, and
    dropped_intents lists them in the order the cap met them (E2, E1, E3, E4 here), as
    the oracle does."""
    request = copy.deepcopy(REQUEST)
    ids = [f"E{i}" for i in range(5)]
    request["market_data_snapshot"]["prices"] = [{"instrument_id": e, "price": str(10 + i), "currency": "SGD"} for i, e in enumerate(ids)]
    request["model_portfolio"]["targets"] = [{"instrument_id": e, "weight": "0.2"} for e in ids]
    request["shelf_entries"] = [{"instrument_id": e, "status": "APPROVED"} for e in ids]
    request["options"]["max_turnover_pct"] = "0.3"

    def dropped(result: dict) -> list[tuple]:  # numbers compared as decimals (spec §1.3)
        return [(d["instrument_id"], D(d["potential_notional"]["amount"]), D(d["score"])) for d in result["diagnostics"]["dropped_intents"]]

    engine = dropped(simulate_many([request])[0])
    assert engine == dropped(oracle_simulate(request))
    assert [instrument for instrument, _, _ in engine] == ["E2", "E1", "E3", "E4"]
