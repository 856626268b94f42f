"""Settlement ladder (spec §6.15)."""
from __future__ import annotations

from decimal import Decimal as D

import polars as pl

from tests.stages.conftest import SLOW_FUND_INTO_FAST_STOCK


def _slow_fast(scenario, **policy):
    """Golden scenario_11: sell 1000 of SLOW_FUND at T+3 funds a 1000 buy at T+1, cash 0."""
    policy.setdefault("enable_settlement_awareness", True)
    policy.setdefault("settlement_horizon_days", 3)
    return scenario(positions=[("SLOW_FUND", "10")], **SLOW_FUND_INTO_FAST_STOCK, **policy)


def _ladder(s, run=0, currency="USD"):
    p = s.ladder.points.filter((pl.col("run") == run) & (pl.col("currency") == currency)).sort("date_offset")
    return list(zip(p["date_offset"], p["projected_balance"]))


def test_settlement_fail_golden_11(scenario):
    s = _slow_fast(scenario)
    assert _ladder(s) == [(0, D(0)), (1, D(-1000)), (2, D(-1000)), (3, D(0))]
    b = s.ladder.breaches.sort("date_offset")
    assert b["date_offset"].to_list() == [1, 2]
    assert b["reason_code"].to_list() == ["OVERDRAFT_ON_T_PLUS_1", "OVERDRAFT_ON_T_PLUS_2"]
    assert s.ladder.warnings["code"].to_list() == ["OVERDRAFT_ON_T_PLUS_1"]
    r = s.run_row()
    assert (r["status"], r["exit_path"]) == ("BLOCKED", "E3")
    rules = s.rules()
    assert [x["rule_id"] for x in rules] == ["SETTLEMENT_CASH_LADDER"]
    assert rules[0]["measured"] == D(1000) and rules[0]["threshold_min"] == D(0)
    assert rules[0]["reason_code"] == "OVERDRAFT_ON_T_PLUS_1"
    # the run's reason names the first breach: currency, day, balance and floor
    assert rules[0]["detail"] == r["block_detail"] == "USD projected at -1000 on T+1, below its floor 0"
    assert r["block_reason"] == "SETTLEMENT_CASH_LADDER"
    # the settlement-blocked response still lists every intent
    assert s.result.intents.filter(pl.col("run") == 0).height == 2


def test_overdraft_allowance_utilised_but_not_breached(scenario):
    s = _slow_fast(scenario, overdrafts={"USD": "1000"})
    assert s.ladder.breaches.height == 0
    assert s.ladder.warnings["code"].to_list() == ["SETTLEMENT_OVERDRAFT_UTILIZED"]
    r = s.run_row()
    assert (r["status"], r["exit_path"]) == ("READY", "E6")
    assert s.warnings() == ["SETTLEMENT_OVERDRAFT_UTILIZED"]


def test_small_overdraft_breaches_below_floor(scenario):
    s = _slow_fast(scenario, overdrafts={"USD": "999.99"})
    b = s.ladder.breaches.sort("date_offset").to_dicts()
    assert [(x["date_offset"], x["allowed_floor"]) for x in b] == [(1, D("-999.99")), (2, D("-999.99"))]
    assert s.ladder.warnings["code"].to_list() == ["SETTLEMENT_OVERDRAFT_UTILIZED", "OVERDRAFT_ON_T_PLUS_1"]
    rule = s.rules()[0]
    assert rule["measured"] == D("0.01")
    assert rule["detail"] == "USD projected at -1000 on T+1, below its floor -999.99"


def test_ladder_off_means_no_ladder(scenario):
    s = _slow_fast(scenario, enable_settlement_awareness=False)
    assert s.ladder.points.height == 0
    assert s.run_row()["status"] == "READY"


def test_horizon_is_max_of_options_and_settlement_days(scenario):
    s = _slow_fast(scenario, settlement_horizon_days=0, fx_settlement_days=5)
    assert [d for d, _ in _ladder(s)] == [0, 1, 2, 3, 4, 5]
    s2 = _slow_fast(scenario, settlement_horizon_days=0, fx_settlement_days=0)
    assert [d for d, _ in _ladder(s2)] == [0, 1, 2, 3]  # max settlement day 3


def test_day_zero_seeded_with_settled_else_amount(scenario):
    """§8 item 22: the ladder seeds day 0 with ``settled``; FX netting uses ``amount``."""
    s = scenario(
        enable_settlement_awareness=True,
        settlement_horizon_days=1,
        fx_settlement_days=1,
        cash=[{"currency": "USD", "amount": "500", "settled": "200"}, ("EUR", "100")],
        fx=[("EUR/USD", "2")],
    )
    assert _ladder(s, currency="USD") == [(0, D(200)), (1, D(400))]  # + swept 200 USD on day 1
    assert _ladder(s, currency="EUR") == [(0, D(100)), (1, D(0))]
    assert s.ladder.breaches.height == 0


def test_fx_flows_on_fx_settlement_day_and_breach_in_foreign_currency(scenario):
    """The USD buy settles T+1, its FUNDING FX only on T+2 → USD breach on day 1."""
    s = scenario(
        base="SGD",
        enable_settlement_awareness=True,
        settlement_horizon_days=0,
        fx_settlement_days=2,
        fx_buffer_pct="0",
        cash=[("SGD", "1000")],
        prices=[("U", "100", "USD")],
        fx=[("USD/SGD", "1")],
        shelf=[{"instrument_id": "U", "status": "APPROVED", "settlement_days": 1}],
        model=[("U", "0.5")],
    )
    assert _ladder(s, currency="USD") == [(0, D(0)), (1, D(-500)), (2, D(0))]
    assert _ladder(s, currency="SGD") == [(0, D(1000)), (1, D(1000)), (2, D(500))]
    assert s.ladder.breaches["reason_code"].to_list() == ["OVERDRAFT_ON_T_PLUS_1"]


def test_ladder_runs_isolated(scenario):
    s = _slow_fast(scenario, runs=[
        dict(enable_settlement_awareness=True, settlement_horizon_days=3),
        dict(enable_settlement_awareness=True, settlement_horizon_days=3, overdrafts={"USD": "1000"}),
        dict(),
    ])
    status = s.result.runs.sort("run")["status"].to_list()
    assert status == ["BLOCKED", "READY", "READY"]
    assert sorted(s.ladder.points["run"].unique().to_list()) == [0, 1]
    assert s.ladder.breaches["run"].unique().to_list() == [0]


def test_ladder_breach_by_a_sell_too_small_for_20_decimals(scenario):
    """A's sell spends the gains budget to within 1E-24, so B's sell is 1.48E-27 units
    (notional 1.48E-25 USD) and its USD proceeds are swept on T+2 while the sell settles on
    T+3: USD is 1.48E-25 below 0 on T+2 in 28 digits (§6.10, §6.15), an overdraft breach.
    At 20 decimals every USD flow is 0; the ladder must still take the currency as moved
    and decide its sign in 28 digits."""
    s = scenario(
        base="SGD",
        positions=[("A", "100"), ("B", "10")],
        cash=[("SGD", "10000.00")],
        prices=[("A", "100.00", "SGD"), ("B", "100.00", "USD"), ("C", "10.00", "SGD")],
        fx=[("USD/SGD", "1.350000")],
        shelf=[{"instrument_id": "A", "status": "APPROVED", "settlement_days": 2},
               {"instrument_id": "B", "status": "APPROVED", "settlement_days": 3},
               {"instrument_id": "C", "status": "APPROVED", "settlement_days": 2}],
        model=[("C", "0.5")],
        lots=[("A", "L0", "100", "70.00", "SGD", "2020-01-01"), ("B", "L0", "10", "50.00", "USD", "2020-01-01")],
        enable_tax_awareness=True,
        max_realized_capital_gains="1000.00",
        enable_settlement_awareness=True,
        settlement_horizon_days=3,
    )
    b = s.ladder.breaches.filter(pl.col("currency") == "USD").sort("date_offset")
    assert b["date_offset"].to_list() == [2]
    assert s.run_row()["status"] == "BLOCKED"
    assert [x["rule_id"] for x in s.rules()] == ["SETTLEMENT_CASH_LADDER"]


def test_ladder_breach_by_a_fed_back_balance_past_20_decimals(scenario):
    """575.46888393286039271620497 CHF (a result's balance fed back) and the sale of 246 X
    at 802.54 CHF settle on T+2, the day the FX SWEEP sells their sum: the reference rounds
    that sum to 28 digits (198000.3088839328603927162050) and the ladder adds the day's
    flows before the balance, leaving CHF at -3E-23 from T+2 (§6.15), an overdraft breach.
    At 20 decimals the flows cancel to 0."""
    chf = "575.46888393286039271620497"
    s = scenario(
        base="SGD",
        positions=[("X", "246")],
        cash=[{"currency": "CHF", "amount": chf, "amount_exact": chf}, ("SGD", "10000.00")],
        prices=[("X", "802.54", "CHF"), ("Y", "100.00", "SGD")],
        fx=[("CHF/SGD", "1.478045")],
        shelf=[{"instrument_id": "X", "status": "APPROVED", "settlement_days": 2},
               {"instrument_id": "Y", "status": "APPROVED", "settlement_days": 2}],
        model=[("Y", "0.5")],
        enable_settlement_awareness=True,
    )
    b = s.ladder.breaches.filter(pl.col("currency") == "CHF").sort("date_offset")
    assert b["date_offset"].to_list() == [2, 3, 4, 5]
    assert s.run_row()["status"] == "BLOCKED"
    assert [x["rule_id"] for x in s.rules()] == ["SETTLEMENT_CASH_LADDER"]
