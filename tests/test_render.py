"""The JSON door's RFC rationale messages (rfc_rationale_codes), against the oracle's."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from dpm_vec.oracle import with_rfc_messages
from dpm_vec.render import _rfc_message


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
