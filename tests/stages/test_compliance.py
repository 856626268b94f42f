"""After-state (spec §6.16), rules (§6.17), reconciliation (§6.18), status (§6.19) and the
workflow gate (§6.20)."""
from __future__ import annotations

from decimal import Decimal as D

import pytest

from tests.stages.conftest import GOLDEN_03_FX_FUNDING, SINGLE_STOCK_WITH_ZERO_ALTERNATIVE, SLOW_FUND_INTO_FAST_STOCK  # noqa: F401
import polars as pl

from dpm_vec.numeric import DEC
from dpm_vec.stages import compliance, dq

RULE_IDS = ["CASH_BAND", "SINGLE_POSITION_MAX", "DATA_QUALITY", "MIN_TRADE_SIZE", "NO_SHORTING", "INSUFFICIENT_CASH"]


def _rule(s, rule_id, run=0):
    return [r for r in s.rules(run) if r["rule_id"] == rule_id]


# ---- rules on whole runs -------------------------------------------------------------------------------


def test_clean_run_has_six_passing_rules_in_order(scenario):
    s = scenario(
        cash=[("USD", "10000")],
        prices=[("A", "100", "USD")],
        shelf=[("A", "APPROVED")],
        model=[("A", "0.5")],
    )
    rules = s.rules()
    assert [r["rule_id"] for r in rules] == RULE_IDS
    assert all(r["status"] == "PASS" for r in rules)
    spm = rules[1]
    assert (spm["measured"], spm["threshold_max"], spm["reason_code"]) == (D(0), D(-1), "NO_LIMIT_SET")
    assert rules[0]["measured"] == D("0.5")
    assert s.run_row()["status"] == "READY"
    assert s.run_row()["reconciliation_status"] == "OK"


def test_single_position_max_one_fail_entry_per_breach(scenario):
    """§6.17: every instrument above m + 0.001 gives its own FAIL entry, in allocation order.
    On an early-blocked run (shelf missing) the rules see the before-state."""
    s = scenario(
        positions=[("A", "40"), ("B", "30"), ("C", "30")],
        cash=[("USD", "0")],
        prices=[(i, "100", "USD") for i in ("A", "B", "C", "X")],
        shelf=[(i, "APPROVED") for i in ("A", "B", "C")],
        model=[("X", "1.0")],  # X not on the shelf → E1
        single_position_max_weight="0.29",
    )
    assert s.run_row()["exit_path"] == "E1"
    spm = _rule(s, "SINGLE_POSITION_MAX")
    assert [(r["status"], r["measured"], r["threshold_max"]) for r in spm] == [
        ("FAIL", D("0.4"), D("0.29")),
        ("FAIL", D("0.3"), D("0.29")),
        ("FAIL", D("0.3"), D("0.29")),
    ]
    assert {r["remediation_hint"] for r in spm} == {"Instrument A exceeds max weight.", "Instrument B exceeds max weight.", "Instrument C exceeds max weight."}
    assert [r["rule_id"] for r in s.rules()] == RULE_IDS[:2] + ["SINGLE_POSITION_MAX"] * 2 + RULE_IDS[2:]
    dq = _rule(s, "DATA_QUALITY")[0]
    assert (dq["status"], dq["measured"]) == ("FAIL", D(1))
    assert [r["detail"] for r in spm] == ["A at weight 0.4 over the cap 0.29", "B at weight 0.3 over the cap 0.29", "C at weight 0.3 over the cap 0.29"]
    # the run stopped on the missing shelf entry: that is its reason, whatever its before-state breaches
    assert (s.run_row()["block_reason"], s.run_row()["block_detail"]) == ("DATA_QUALITY", "; ".join(
        ["missing data: no shelf entry for X"] + [r["detail"] for r in spm]))


def test_single_position_max_tolerance_and_pass_measure(scenario):
    s = scenario(
        positions=[("A", "30"), ("B", "30")],
        cash=[("USD", "4000")],
        prices=[(i, "100", "USD") for i in ("A", "B", "X")],
        shelf=[("A", "APPROVED"), ("B", "APPROVED")],
        model=[("X", "1.0")],
        single_position_max_weight="0.299",  # 0.3 ≤ 0.299 + 0.001 → PASS
    )
    (spm,) = _rule(s, "SINGLE_POSITION_MAX")
    assert (spm["status"], spm["measured"], spm["threshold_max"], spm["reason_code"]) == ("PASS", D("0.3"), D("0.299"), "OK")
    assert spm["detail"] is None  # a detail says what failed: a pass has none
    assert [r["rule_id"] for r in s.rules() if r["detail"] is not None] == ["DATA_QUALITY"]  # X is not on the shelf


def test_no_shorting_and_insufficient_cash_safety_failures(scenario):
    """Both safety rules fail: the sale sized on a market value twice the price value
    overshoots the holding (NO_SHORTING), and the 5% FX buffer drives base cash negative
    (INSUFFICIENT_CASH); SIMULATION_SAFETY_CHECK_FAILED appears once per failed rule."""
    s = scenario(
        base="SGD",
        positions=[{"instrument_id": "OLD", "quantity": "1", "market_value": "2", "market_value_currency": "SGD"}],
        cash=[("SGD", "94")],
        prices=[("OLD", "1", "SGD"), ("U", "1", "USD")],
        fx=[("USD/SGD", "1")],
        shelf=[("OLD", "APPROVED"), ("U", "APPROVED")],
        model=[("U", "1.0")],
        fx_buffer_pct="0.05",
    )
    # tv 95: BUY 95 U → FUNDING 99.75 USD for 99.75 SGD; SELL 2 OLD (+2 SGD) → OLD −1, SGD −3.75
    r = s.run_row()
    assert (r["status"], r["exit_path"]) == ("BLOCKED", "E4")
    (ns,) = _rule(s, "NO_SHORTING")
    assert (ns["status"], ns["measured"], ns["reason_code"]) == ("FAIL", D(-1), "SELL_EXCEEDS_HOLDINGS")
    assert ns["remediation_hint"] == "Reduce sell quantity."
    (ic,) = _rule(s, "INSUFFICIENT_CASH")
    assert (ic["status"], ic["measured"], ic["reason_code"]) == ("FAIL", D("-3.75"), "CASH_BALANCE_NEGATIVE")
    assert s.warnings() == ["SIMULATION_SAFETY_CHECK_FAILED", "SIMULATION_SAFETY_CHECK_FAILED"]
    assert (ns["detail"], ic["detail"]) == ("quantity below zero: OLD at -1", "cash below zero: SGD at -3.75")
    # the first failed HARD rule is the run's reason; its detail names both
    assert (r["block_reason"], r["block_detail"]) == ("NO_SHORTING", "quantity below zero: OLD at -1; cash below zero: SGD at -3.75")
    assert r["reconciliation_status"] is None  # E4: no reconciliation
    assert _rule(s, "RECONCILIATION") == []


def test_insufficient_cash_golden_quirk_21(scenario):
    s = scenario(
        base="SGD",
        cash=[("SGD", "100")],
        prices=[("U", "1", "USD")],
        fx=[("USD/SGD", "1")],
        shelf=[("U", "APPROVED")],
        model=[("U", "1.0")],
        fx_buffer_pct="0.05",
    )
    (ic,) = _rule(s, "INSUFFICIENT_CASH")
    assert (ic["status"], ic["measured"]) == ("FAIL", D("-5"))
    assert s.warnings() == ["SIMULATION_SAFETY_CHECK_FAILED"]
    assert s.run_row()["exit_path"] == "E4"


def test_data_quality_count_respects_block_flags_and_duplicates(scenario):
    """A held instrument without price appears three times when prices do not block;
    the DATA_QUALITY rule then ignores them and the gate still reports them."""
    s = scenario(
        runs=[dict(block_on_missing_prices=False), dict()],
        positions=[("NOP", "1")],
        cash=[("USD", "1000")],
        prices=[("A", "100", "USD")],
        shelf=[("NOP", "APPROVED"), ("A", "APPROVED")],
        model=[("A", "0.5")],
    )
    r0, r1 = s.run_row(0), s.run_row(1)
    assert r0["n_price_missing"] == 3 and r0["dq_count"] == 0
    # the detail names what the count counts, each item once: run 0 does not block on prices
    assert (r0["block_reason"], r1["block_reason"]) == (None, "DATA_QUALITY")
    assert r1["block_detail"] == _rule(s, "DATA_QUALITY", 1)[0]["detail"] == "missing data: no price for NOP"
    assert (r0["status"], r0["gate"]) == ("READY", "EXECUTION_READY")
    assert _rule(s, "DATA_QUALITY", 0)[0]["status"] == "PASS"
    reasons0 = s.result.gate_reasons.filter(pl.col("run") == 0).to_dicts()
    assert [(x["reason_code"], x["severity"], x["detail_count"]) for x in reasons0] == [("DATA_QUALITY_MISSING_PRICE", "HIGH", "3")]
    assert r1["exit_path"] == "E1" and r1["status"] == "BLOCKED"
    assert _rule(s, "DATA_QUALITY", 1)[0]["measured"] == D(1)


def test_data_quality_detail_names_each_missing_item_once_by_kind(scenario):
    """Prices, then FX rates, then shelf entries, each item once in the order found, though
    valuation and universe find the same item more than once."""
    s = scenario(
        positions=[("NOP", "1"), ("E", "2"), ("NOP2", "1")],
        cash=[("USD", "1000"), ("JPY", "5")],
        prices=[("A", "100", "USD"), ("E", "10", "EUR")],
        shelf=[("NOP", "APPROVED"), ("E", "APPROVED"), ("NOP2", "APPROVED"), ("A", "APPROVED")],
        model=[("A", "0.5"), ("X", "0.2")],
    )
    r = s.run_row()
    assert (r["exit_path"], r["block_reason"]) == ("E1", "DATA_QUALITY")
    assert r["block_detail"] == "missing data: no price for NOP, NOP2; no FX rate for EUR/USD, JPY/USD; no shelf entry for X"


def test_min_trade_size_counts_suppressed_and_passes(scenario):
    s = scenario(
        cash=[("USD", "10000")],
        prices=[("A", "100", "USD"), ("B", "100", "USD")],
        shelf=[("A", "APPROVED"), ("B", "APPROVED")],
        model=[("A", "0.5"), ("B", "0.01")],
        min_trade_notional=("500", "USD"),
    )
    (mts,) = _rule(s, "MIN_TRADE_SIZE")
    assert (mts["status"], mts["measured"], mts["reason_code"]) == ("PASS", D(1), "INTENTS_SUPPRESSED")
    assert s.run_row()["status"] == "READY"


def test_cash_band_soft_fail_is_pending_review_and_risk_review(scenario):
    s = scenario(
        cash=[("USD", "10000")],
        prices=[("A", "100", "USD")],
        shelf=[("A", "APPROVED")],
        model=[("A", "0.5")],
        cash_band_max_weight="0.4",
    )
    (cb,) = _rule(s, "CASH_BAND")
    assert (cb["status"], cb["measured"], cb["reason_code"]) == ("FAIL", D("0.5"), "THRESHOLD_BREACH")
    assert cb["detail"] == "cash weight 0.5 outside the band 0 to 0.4"
    r = s.run_row()
    assert (r["block_reason"], r["block_detail"]) == (None, None)  # a SOFT rule does not block
    assert (r["status"], r["gate"], r["recommended_next_step"]) == ("PENDING_REVIEW", "RISK_REVIEW_REQUIRED", "RISK_REVIEW")
    reasons = s.result.gate_reasons.to_dicts()
    assert [(x["reason_code"], x["severity"], x["detail_reason_code"]) for x in reasons] == [
        ("SOFT_RULE_FAIL:CASH_BAND", "MEDIUM", "THRESHOLD_BREACH")
    ]


# ---- reconciliation -----------------------------------------------------------------------------------


def test_trust_snapshot_value_mismatch_blocks(scenario):
    """§6.18: trusted 2000 vs 10 × 100 after-state → delta −1000, tolerance 1.5 → E5."""
    s = scenario(
        valuation_mode="TRUST_SNAPSHOT",
        positions=[{"instrument_id": "A", "quantity": "10", "market_value": "2000", "market_value_currency": "USD"}],
        cash=[("USD", "0")],
        prices=[("A", "100", "USD")],
        shelf=[("A", "APPROVED")],
        model=[("A", "1.0")],
    )
    r = s.run_row()
    assert (r["status"], r["exit_path"], r["reconciliation_status"]) == ("BLOCKED", "E5", "MISMATCH")
    assert r["delta"] == D(-1000) and r["tolerance"] == D("1.5")
    (rec,) = _rule(s, "RECONCILIATION")
    assert (rec["measured"], rec["threshold_max"], rec["reason_code"]) == (D(1000), D("1.5"), "VALUE_MISMATCH")
    assert (r["block_reason"], r["block_detail"]) == (
        "RECONCILIATION", "after-state value 1000 against 2000 before: 1000 apart, over the tolerance 1.5")


def _totals(values):
    return pl.DataFrame({
        "run": pl.Series(list(range(len(values))), dtype=pl.UInt32),
        "total_value": pl.Series([D(v) for v in values], dtype=DEC),
    })


def test_reconciliation_tolerance_boundary():
    before = _totals(["1000", "1000", "1000", "-2000", "0"])
    after = _totals(["1001", "1001.00000001", "998.99999999", "-2000", "0.5"])
    rec = compliance.reconcile(before, after).sort("run")
    assert rec["tolerance"].to_list()[:3] == [D("1.0")] * 3
    # |Δ| = tolerance is OK; a negative total has a negative tolerance → always MISMATCH
    assert rec["reconciliation_status"].to_list() == ["OK", "MISMATCH", "MISMATCH", "MISMATCH", "OK"]
    rule = compliance.reconciliation_rule(rec).sort("run")
    assert rule["run"].to_list() == [1, 2, 3]
    assert rule["measured"].to_list()[:2] == [D("1.00000001"), D("1.00000001")]


@pytest.mark.parametrize(("quantity", "status"), [
    ("1000.999999999999999995", "OK"),  # 0.9999999999999999950000001 after, where the fixed point read 1.000000000000000005
    ("998.99999999999999999999", "MISMATCH"),  # 1.0000000000000000000099999 below, where it read 0.99999999999999999001
    ("999.00000000000000000001", "OK"),  # 0.9999999999999999999899999 below
])
def test_reconciliation_within_a_hair_through_an_inverse_quote_is_decided_in_28_digits(scenario, quantity, status):
    """A holding trusted at 3000 EUR over the inverse quote USD/EUR 3 is worth
    999.9999999999999999999999999 USD before in 28 digits, and its tolerance 0.5 + that ×
    0.0005 rounds to exactly 1 (§6.18); the fixed point's 1 / 3 made it 999.99999999999999999.
    Valued at market after (price 1 USD), its quantity is the after-state's total."""
    s = scenario(
        valuation_mode="TRUST_SNAPSHOT",
        positions=[{"instrument_id": "L", "quantity": quantity, "market_value": "3000", "market_value_currency": "EUR"}],
        cash=[], prices=[("L", "1", "USD")], fx=[("USD/EUR", "3")], shelf=[], model=[],
        min_trade_notional=("1000000000000", "USD"),  # the after-state holds what the before-state did
    )
    r = s.run_row()
    assert (r["reconciliation_status"], r["status"]) == (status, "READY" if status == "OK" else "BLOCKED")
    assert [rule["rule_id"] for rule in _rule(s, "RECONCILIATION")] == ([] if status == "OK" else ["RECONCILIATION"])


# ---- after-state ---------------------------------------------------------------------------------------


def test_apply_intents_updates_first_rows_and_appends_new(scenario):
    s = scenario(
        base="SGD",
        positions=[("S", "10")],
        cash=[("SGD", "1000")],
        prices=[("S", "100", "SGD"), ("U", "100", "USD")],
        fx=[("USD/SGD", "2")],
        shelf=[("S", "APPROVED"), ("U", "APPROVED")],
        model=[("U", "0.5")],
        fx_buffer_pct="0",
    )
    pos = s.result.positions_after.sort("pos_seq")
    assert list(zip(pos["instrument_id"], pos["quantity"])) == [("S", D(0)), ("U", D(5))]
    cash = s.result.cash_after.sort("cash_seq")
    # SELL S +1000 SGD; FX sells 1000 SGD for 500 USD; BUY U −500 USD
    assert list(zip(cash["currency"], cash["amount"])) == [("SGD", D(1000)), ("USD", D(0))]
    assert s.run_row()["after_total_value"] == D(2000)


def test_a_moved_balance_leaves_the_input_digits_behind(scenario):
    """A fed-back balance's 28 decimals (``amount_exact``) describe the input amount only:
    once trades move the balance, the after-state's 28-digit sums are exact_after_cash's,
    so the moved row drops them; a balance no trade touches keeps them (the reference's
    after-state holds that input amount as it was)."""
    sgd, chf = "1000.000000000000000000001", "5.000000000000000000003"
    s = scenario(
        base="SGD",
        positions=[("S", "10")],
        cash=[{"currency": "SGD", "amount": sgd, "amount_exact": sgd}, {"currency": "CHF", "amount": chf, "amount_exact": chf}],
        prices=[("S", "100", "SGD"), ("U", "100", "USD")],
        fx=[("USD/SGD", "2"), ("CHF/SGD", "1")],
        shelf=[("S", "APPROVED"), ("U", "APPROVED")],
        model=[("U", "0.5")],
        fx_buffer_pct="0",
        fx_sweep_threshold="100",  # the CHF surplus stays unswept
    )
    cash = s.result.cash_after.sort("cash_seq")
    assert cash["currency"].to_list() == ["SGD", "CHF", "USD"]
    assert cash["amount_exact"].to_list() == [None, D(chf), None]


def test_a_fed_back_balance_spent_to_a_last_digit_below_zero_is_insufficient_cash(scenario):
    """99.999999999999999999999 USD (a balance fed back, 21 decimals) buys a notional 100.00
    of Y: the reference's after-state holds -1E-21 USD, INSUFFICIENT_CASH (§6.16), where
    the balance read at 20 decimals (100) is spent to exactly 0."""
    usd = "99.999999999999999999999"
    s = scenario(
        cash=[{"currency": "USD", "amount": usd, "amount_exact": usd}],
        prices=[("Y", "100", "USD")],
        shelf=[{"instrument_id": "Y", "status": "APPROVED", "trade_by": "NOTIONAL"}],
        model=[("Y", "1.0")],
        notional_sizing=True,
    )
    assert [(i["instrument_id"], i["side"], i["notional"]) for i in s.result.intents.to_dicts()] == [("Y", "BUY", D(100))]
    assert {r["rule_id"]: r["status"] for r in s.rules()}["INSUFFICIENT_CASH"] == "FAIL"


def test_after_state_of_runs_that_did_not_trade_is_their_before_state(scenario):
    """One valuation gives every run's after-state: a traded run at market (its trusted
    market value no longer applies), a run blocked on the settlement ladder (E3) revalued
    under its own TRUST_SNAPSHOT mode, a run stopped by missing data (E1) as it was, with
    no after-state finding counted twice. Rows come in (run, sequence) order."""
    ladder = dict(enable_settlement_awareness=True, settlement_horizon_days=3)
    s = scenario(
        positions=[{"instrument_id": "SLOW_FUND", "quantity": "10", "market_value": "1500", "market_value_currency": "USD"}],
        **SLOW_FUND_INTO_FAST_STOCK,
        runs=[
            dict(ladder, valuation_mode="TRUST_SNAPSHOT"),  # R0: the ladder breaches on T+1
            dict(valuation_mode="TRUST_SNAPSHOT"),  # R1: trades
            dict(base="EUR"),  # R2: no USD/EUR rate
        ],
    )
    res = s.result
    assert [s.run_row(r)["exit_path"] for r in range(3)] == ["E3", "E4", "E1"]

    def state(table: pl.DataFrame, run: int) -> list[tuple]:
        rows = table.filter(pl.col("run") == run).sort("pos_seq")
        return list(zip(rows["instrument_id"], rows["quantity"], rows["value_base"], rows["weight"]))

    assert state(res.positions_after, 0) == state(res.positions_before, 0) == [("SLOW_FUND", D(10), D(1500), D(1))]
    assert state(res.positions_after, 2) == state(res.positions_before, 2) == [("SLOW_FUND", D(10), D(0), D(0))]
    # R1 sized its sell of SLOW_FUND from the trusted 1500 (15 units of 10 held: NO_SHORTING)
    # and bought 15 FAST_STOCK; its after-state is valued at market, 1000 in all
    assert state(res.positions_after, 1) == [("SLOW_FUND", D(-5), D(-500), D("-0.5")), ("FAST_STOCK", D(15), D(1500), D("1.5"))]
    assert [s.run_row(r)["after_total_value"] for r in range(3)] == [D(1500), D(1000), D(0)]
    pos_after = res.positions_after
    assert pos_after.equals(pos_after.sort("run", "pos_seq"))
    # R2's missing rate is counted in its before-state (and translation) only
    r2 = res.data_quality.filter(pl.col("run") == 2)
    assert r2.height and r2.filter(pl.col("stage") == dq.VALUATION_AFTER).height == 0
    assert s.run_row(2)["n_fx_missing"] == r2.filter(pl.col("bucket") == "fx_missing").height


def test_after_state_attribute_buckets_keep_first_appearance_with_appended_positions(scenario):
    """§5.1 / §6.16: the held S (sector FI, region EU) comes first, its sell to 0 keeps it in
    the list, and the bought U (sector TECH) is appended: FI before TECH, and the region
    attribute, first seen on S's entry after its sector, after sector. Appended positions
    are numbered from 2^50, which once overflowed the packed order and put TECH first."""
    s = scenario(
        positions=[("S", "10")],
        cash=[("USD", "0")],
        prices=[("S", "100", "USD"), ("U", "100", "USD")],
        shelf=[("S", "APPROVED"), ("U", "APPROVED")],
        attributes=[("S", "sector", "FI"), ("U", "sector", "TECH"), ("S", "region", "EU")],
        model=[("U", "1.0")],
    )
    after = (s.result.allocations_after.filter(pl.col("dimension").str.starts_with("attribute:"))
             .sort("attribute_order", "bucket_order"))  # the order the JSON door prints
    assert list(zip(after["dimension"], after["key"], after["value"])) == [
        ("attribute:sector", "FI", D(0)), ("attribute:sector", "TECH", D(1000)), ("attribute:region", "EU", D(0)),
    ]


# ---- gate ------------------------------------------------------------------------------------------------


def test_gate_consent_options(scenario):
    common = dict(
        cash=[("USD", "1000")],
        prices=[("A", "100", "USD")],
        shelf=[("A", "APPROVED")],
        model=[("A", "0.5")],
    )
    s = scenario(
        runs=[
            dict(),
            dict(workflow_requires_client_consent=True),
            dict(workflow_requires_client_consent=True, client_consent_already_obtained=True),
            dict(enable_workflow_gates=False),
            dict(single_position_max_weight="0.25"),  # target-stage PENDING_REVIEW only
        ],
        **common,
    )
    rows = s.result.runs.sort("run").to_dicts()
    assert [(r["status"], r["gate"], r["recommended_next_step"]) for r in rows] == [
        ("READY", "EXECUTION_READY", "EXECUTE"),
        ("READY", "CLIENT_CONSENT_REQUIRED", "REQUEST_CLIENT_CONSENT"),
        ("READY", "EXECUTION_READY", "EXECUTE"),
        ("READY", None, None),
        ("PENDING_REVIEW", "EXECUTION_READY", "EXECUTE"),
    ]


def test_gate_reasons_sorted_by_severity_source_code():
    runs = pl.DataFrame({
        "run": pl.Series([0], dtype=pl.UInt32), "status": ["BLOCKED"], "enable_workflow_gates": [True],
        "workflow_requires_client_consent": [False], "client_consent_already_obtained": [False],
    })
    rules = pl.DataFrame({
        "run": pl.Series([0, 0, 0, 0], dtype=pl.UInt32),
        "rule_id": ["CASH_BAND", "SINGLE_POSITION_MAX", "SINGLE_POSITION_MAX", "DATA_QUALITY"],
        "severity": ["SOFT", "HARD", "HARD", "HARD"],
        "status": ["FAIL", "FAIL", "FAIL", "FAIL"],
        "reason_code": ["THRESHOLD_BREACH", "LIMIT_BREACH", "LIMIT_BREACH", "MISSING_DATA"],
    })
    counts = pl.DataFrame({
        "run": pl.Series([0], dtype=pl.UInt32), "n_price_missing": [2], "n_fx_missing": [1],
        "n_shelf_missing": [4], "dq_count": [7],
    })
    gate, reasons = compliance.gate_decisions(runs, rules, counts)
    assert [(r["reason_code"], r["severity"], r["source"]) for r in reasons.to_dicts()] == [
        ("DATA_QUALITY_MISSING_FX", "HIGH", "DATA_QUALITY"),
        ("DATA_QUALITY_MISSING_PRICE", "HIGH", "DATA_QUALITY"),
        ("HARD_RULE_FAIL:DATA_QUALITY", "HIGH", "RULE_ENGINE"),
        ("HARD_RULE_FAIL:SINGLE_POSITION_MAX", "HIGH", "RULE_ENGINE"),
        ("HARD_RULE_FAIL:SINGLE_POSITION_MAX", "HIGH", "RULE_ENGINE"),
        ("SOFT_RULE_FAIL:CASH_BAND", "MEDIUM", "RULE_ENGINE"),
    ]
    assert reasons["detail_count"].to_list()[:2] == ["1", "2"]
    g = gate.to_dicts()[0]
    assert (g["gate"], g["recommended_next_step"], g["hard_fail_count"], g["soft_fail_count"]) == ("BLOCKED", "FIX_INPUT", 3, 1)


def test_rules_isolated_between_runs(scenario):
    """Cap on one run only: the capped run reports the cap, the other NO_LIMIT_SET."""
    s = scenario(
        runs=[dict(single_position_max_weight="0.3"), dict()],
        cash=[("USD", "10000")],
        prices=[(i, "100", "USD") for i in ("A", "B", "C")],
        shelf=[(i, "APPROVED") for i in ("A", "B", "C")],
        model=[("A", "0.5"), ("B", "0.1"), ("C", "0.1")],
    )
    (a,) = _rule(s, "SINGLE_POSITION_MAX", 0)
    (b,) = _rule(s, "SINGLE_POSITION_MAX", 1)
    assert (a["status"], a["measured"], a["threshold_max"]) == ("PASS", D("0.3"), D("0.3"))
    assert (b["reason_code"], b["threshold_max"]) == ("NO_LIMIT_SET", D(-1))
    assert [s.run_row(i)["status"] for i in (0, 1)] == ["PENDING_REVIEW", "READY"]


def test_warnings_in_stage_order(scenario):
    """§6.19: target stage (group caps in key order), tax, turnover, settlement."""
    s = scenario(
        positions=[("X", "100"), ("T", "10")],
        cash=[("USD", "0")],
        prices=[(i, "100", "USD") for i in ("X", "T", "F", "G")],
        shelf=[{"instrument_id": "X", "status": "APPROVED", "settlement_days": 3},
               ("T", "APPROVED"), ("F", "APPROVED"), ("G", "APPROVED")],
        attributes=[("T", "sector", "TECH"), ("F", "sector", "FI")],
        model=[("X", "0"), ("T", "0.5"), ("F", "0.3"), ("G", "0.01")],
        lots=[("X", "L1", "100", "10", "USD", "2020-01-01")],
        enable_tax_awareness=True,
        max_realized_capital_gains="900",
        groups={"sector:TECH": "0.4", "zzz:q": "0.1"},
        max_turnover_pct="0.3",
        enable_settlement_awareness=True,
        overdrafts={"USD": "100000"},
    )
    assert s.warnings() == [
        "CAPPED_BY_GROUP_LIMIT_sector:TECH",
        "UNKNOWN_CONSTRAINT_ATTRIBUTE_zzz",
        "TAX_BUDGET_LIMIT_REACHED",
        "PARTIAL_REBALANCE_TURNOVER_LIMIT",
        "SETTLEMENT_OVERDRAFT_UTILIZED",
    ]
    assert s.run_row()["status"] == "READY"


def test_target_stage_block_is_early_exit_on_before_state(scenario):
    s = scenario(
        **SINGLE_STOCK_WITH_ZERO_ALTERNATIVE,
        groups={"sector:TECH": "0.5"},
    )
    r = s.run_row()
    assert (r["status"], r["exit_path"], r["gate"]) == ("BLOCKED", "E1", "BLOCKED")
    assert [x["status"] for x in s.rules()] == ["PASS"] * 6
    assert s.result.intents.height == 0
    # no rule failed: the reason is the reference's own target-stage stop, which names the group
    assert (r["block_reason"], r["block_detail"]) == ("NO_ELIGIBLE_REDISTRIBUTION_DESTINATION",
                                                      "group sector:TECH at weight 1 over its cap 0.5, and no buyable instrument outside it to take the excess")
    assert "NO_ELIGIBLE_REDISTRIBUTION_DESTINATION" in s.warnings() and s.warnings().count("NO_ELIGIBLE_REDISTRIBUTION_DESTINATION") == 1


def test_insufficient_cash_on_the_reference_28_digit_after_state(scenario):
    """A tax-limited SELL's 28-digit notional (18664.343094387378317629... USD) is summed
    into the USD balance the SWEEP sells whole and, in execution order, into the
    after-state: the reference ends at -2E-23 USD and fails INSUFFICIENT_CASH. The
    fixed-point after-state cancels to exactly 0, so the rule reads the signs of
    ``exact_cash_signs``, which redoes those sums in 28 digits (the run blocks on E4)."""
    s = scenario(
        base="EUR",
        positions=[("A", "1034"), ("S", "1768")],
        cash=[("USD", "116776.13")],
        prices=[("A", "705.45", "USD"), ("B", "293.46", "USD"), ("C", "183.83", "USD"), ("S", "222.31", "EUR")],
        fx=[("USD/EUR", "0.951086")],
        shelf=[("A", "APPROVED", "ALTERNATIVE"), ("B", "APPROVED", "FIXED_INCOME"), ("C", "APPROVED", "ALTERNATIVE"),
               ("S", "SUSPENDED", "ALTERNATIVE")],
        attributes=[("A", "sector", "ENERGY"), ("B", "sector", "ENERGY"), ("C", "sector", "TECH"), ("S", "sector", "ENERGY")],
        model=[("B", "0.2144"), ("C", "0.2295")],
        lots=[("A", "L0", "820", "538.01", "USD", "2025-04-10"), ("A", "L1", "214", "319.74", "USD", "2020-09-19"),
              ("S", "L0", "424", "178.50", "EUR", "2023-07-10"), ("S", "L1", "1214", "574.45", "EUR", "2021-03-16"),
              ("S", "L2", "130", "647.15", "EUR", "2024-03-16")],
        groups={"sector:ENERGY": "0.2"},
        enable_tax_awareness=True,
        max_realized_capital_gains="4213.33",
        max_turnover_pct="0.5",
    )
    sell = s.intents.filter(pl.col("instrument_id") == "A").row(0, named=True)
    assert sell["quantity_f28"] is not None and sell["quantity"] < 27  # tax-limited, fractional
    r = s.result
    after_usd = r.cash_after.filter(pl.col("currency") == "USD")["amount"]
    assert after_usd.to_list() == [D(0)]  # the fixed-point balance the reference has 2E-23 below 0
    (ic,) = _rule(s, "INSUFFICIENT_CASH")
    assert (ic["status"], ic["reason_code"]) == ("FAIL", "CASH_BALANCE_NEGATIVE")
    assert s.warnings() == ["CAPPED_BY_GROUP_LIMIT_sector:ENERGY", "TAX_BUDGET_LIMIT_REACHED", "PARTIAL_REBALANCE_TURNOVER_LIMIT",
                          "SIMULATION_SAFETY_CHECK_FAILED"]
    assert (s.run_row()["status"], s.run_row()["exit_path"]) == ("BLOCKED", "E4")
    signs = compliance.exact_cash_signs(s.market, s.runs, s.intents, s.p.cash, r.cash_after)
    # the 28-digit sum stands in for the balance only where it sits at the edge (USD, within dust of 0)
    assert sorted(signs.iter_rows()) == [(0, "EUR", False, None), (0, "USD", True, D(0))]


def test_cash_left_at_zero_through_an_inverse_quote_is_zero(scenario):
    """A FUNDING FX over an inverse quote (USD/JPY 150, so JPY → USD is 1 / 150) sells
    15000 × 0.006666666666666666666666666667 = exactly 100 USD in the reference's 28
    digits; the fixed point's 1 / 150 (0.00666666666666666667) sells 100.00000000000000005
    and would leave -5E-17, failing INSUFFICIENT_CASH and the CASH_BAND minimum of 0.
    ``exact_cash_signs`` redoes such a run's base cash in 28 digits and sets the balance."""
    s = scenario(
        base="USD", positions=[], cash=[("USD", "100")], prices=[("J", "1500", "JPY")], fx=[("USD/JPY", "150")],
        shelf=[("J", "APPROVED", "EQUITY")], model=[("J", "1")], fx_buffer_pct="0",
    )
    (fx,) = s.intents.filter(pl.col("intent_type") == "FX_SPOT").iter_rows(named=True)
    assert fx["sell_amount_estimated"] == D("100.00000000000000005")  # the fixed point's amount, printed as computed
    assert s.result.cash_after.select("currency", "amount").sort("currency").rows() == [("JPY", D(0)), ("USD", D(0))]
    assert [(r["rule_id"], r["status"]) for r in s.result.rule_results.iter_rows(named=True) if r["status"] == "FAIL"] == []
    assert s.run_row()["status"] == "READY"
    signs = compliance.exact_cash_signs(s.market, s.runs, s.intents, s.p.cash, s.result.cash_after)
    assert signs.filter(pl.col("currency") == "USD").select("_negative", "_exact_amount").rows() == [(False, D(0))]


def _cash_at_half(scenario, ccy: str, amount: str, rate: str, **band):
    """500 USD of A (target 0.5) beside foreign cash worth exactly 500 USD through an
    inverse quote USD/ccy: the SWEEP brings the after-state's cash weight to 0.5 in the
    reference's 28 digits."""
    return scenario(
        base="USD", positions=[("A", "500")], cash=[(ccy, amount)], prices=[("A", "1", "USD")], fx=[(f"USD/{ccy}", rate)],
        shelf=[("A", "APPROVED")], model=[("A", "0.5")], **band,
    )


def test_cash_weight_exactly_at_the_band_through_an_inverse_quote(scenario):
    """75000 JPY at USD/JPY 150 sweeps to exactly 500 USD (0.006666666666666666666666666667
    × 75000 in 28 digits): cash weight 0.5, inside a 0.5 maximum. The fixed point's 1 / 150
    made it 500.00000000000000025 and the weight 0.50000000000000000012, a breach."""
    s = _cash_at_half(scenario, "JPY", "75000", "150", cash_band_max_weight="0.5")
    (band,) = _rule(s, "CASH_BAND")
    assert band["status"] == "PASS" and abs(band["measured"] - D("0.5")) < D("1e-18")
    assert s.run_row()["status"] == "READY"


def test_cash_weight_a_hair_below_the_band_through_an_inverse_quote(scenario):
    """41500 INR at USD/INR 83 is 499.9999999999999999999999999 USD in 28 digits (1 / 83
    rounds down): the cash weight 0.4999999999999999999999999999 is below a 0.5 minimum,
    where the fixed point's weight read exactly 0.5."""
    s = _cash_at_half(scenario, "INR", "41500", "83", cash_band_min_weight="0.5")
    (band,) = _rule(s, "CASH_BAND")
    assert (band["status"], band["reason_code"]) == ("FAIL", "THRESHOLD_BREACH")
    assert s.run_row()["status"] == "PENDING_REVIEW"


def test_position_weight_a_hair_over_the_cap_through_an_inverse_quote(scenario):
    """2107 USD of a locked holding at SGD/USD 7 is 301.0000000000000000000000001 SGD of a
    1000 SGD book in 28 digits: weight 0.3010000000000000000000000001, over the 0.3 cap +
    0.001 (the fixed point's 0.301 was not)."""
    s = scenario(
        base="SGD", positions=[("L", "2107")], cash=[("SGD", "699")], prices=[("L", "1", "USD")], fx=[("SGD/USD", "7")],
        shelf=[("L", "SUSPENDED")], model=[], single_position_max_weight="0.3", max_turnover_pct="0",
    )
    (cap,) = _rule(s, "SINGLE_POSITION_MAX")
    assert (cap["status"], cap["reason_code"]) == ("FAIL", "LIMIT_BREACH")
    assert s.run_row()["status"] == "BLOCKED"


def test_position_weights_over_a_total_a_last_digit_below_zero(scenario):
    """3 USD of a locked holding at SGD/USD 1.5 is 2.00000000000000000001 SGD in fixed point
    (1 / 1.5 rounds up at 20 decimals) and exactly 2 in the reference's 28 digits, so cash
    of -2.00000000000000000001 SGD leaves a total of 0 in fixed point, divided by 1, and
    -1E-20 in the reference, which divides by it: the holding's weight is -2E+20, under the
    0.3 cap (weight 2.00000000000000000001 over 1 breached it). The rules of a run whose
    fixed-point total is 0 are decided over the 28-digit total."""
    s = scenario(
        base="SGD", positions=[("L", "3")], cash=[("SGD", "-2.00000000000000000001")], prices=[("L", "1", "USD")],
        fx=[("SGD/USD", "1.5")], shelf=[("L", "SUSPENDED")], model=[], single_position_max_weight="0.3", max_turnover_pct="0",
    )
    assert s.run_row()["after_total_value"] == 0
    (cap,) = _rule(s, "SINGLE_POSITION_MAX")
    assert (cap["status"], cap["reason_code"]) == ("PASS", "OK")
    (band,) = _rule(s, "CASH_BAND")  # the cash weight, 2E+20 in 28 digits, is over the band's maximum of 1
    assert (band["status"], band["reason_code"]) == ("FAIL", "THRESHOLD_BREACH")
    assert (s.run_row()["status"], s.run_row()["block_reason"]) == ("BLOCKED", "INSUFFICIENT_CASH")
