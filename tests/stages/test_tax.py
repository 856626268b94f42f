"""Tax-aware sell limiting, HIFO with a run-wide gains budget (spec §6.10)."""
from __future__ import annotations

from decimal import Decimal as D, localcontext

import polars as pl


def _hifo(scenario, *, target="0", budget="100", lots=None, **policy):
    return scenario(
        positions=[("X", "100")],
        cash=[("USD", "0")],
        prices=[("X", "100", "USD")],
        shelf=[("X", "APPROVED")],
        model=[("X", target)],
        lots=lots if lots is not None else [("X", "L_LOW", "50", "10", "USD", "2020-01-01"), ("X", "L_HIGH", "50", "100", "USD", "2021-01-01")],
        enable_tax_awareness=True,
        max_realized_capital_gains=budget,
        **policy,
    )


def _qty(s, run=0):
    i = s.translation.intents.filter(pl.col("run") == run)
    return dict(zip(i["instrument_id"], i["quantity"]))


def _totals(s, run=0):
    return s.translation.tax_totals.filter(pl.col("run") == run).to_dicts()[0]


def test_hifo_budget_example_exact_28_digits(scenario):
    """100 @ 100, lots 50 @ 10 and 50 @ 100, target 0, budget 100 → 51.111…1 (28 digits)."""
    s = _hifo(scenario)
    assert _qty(s) == {"X": D("51.11111111111111111111111111")}
    t = _totals(s)
    # money is fixed-point DEC (20 dp, dpm_vec.numeric): the reference's 99.99…99 (28 digits)
    # is held to 1e-19, not digit for digit
    assert abs(t["realized_gain"] - D("99.99999999999999999999999999")) < D("1e-19")
    assert abs(t["gains_budget_used"] - D(100)) < D("1e-19")
    assert t["realized_loss"] == D(0)
    assert s.translation.warnings["code"].to_list() == ["TAX_BUDGET_LIMIT_REACHED"]
    ev = s.translation.tax_events.to_dicts()
    assert [(e["instrument_id"], e["requested_quantity"], e["allowed_quantity"]) for e in ev] == [
        ("X", D(100), D("51.11111111111111111111111111"))
    ]
    intent = s.translation.intents.to_dicts()[0]
    assert intent["tax_budget_applied"] is True
    assert abs(intent["notional"] - D("5111.111111111111111111111111")) < D("1e-17")


def test_hifo_high_cost_lot_first_golden_09(scenario):
    """Target 0.5 → sell 50 from the 100-cost lot at zero gain."""
    s = _hifo(scenario, target="0.5")
    assert _qty(s) == {"X": D(50)}
    t = _totals(s)
    assert t["realized_gain"] == D(0) and t["gains_budget_used"] == D(0)
    assert s.translation.warnings.height == 0
    assert s.translation.intents["tax_budget_applied"].to_list() == [False]


def test_tax_awareness_off_ignores_lots(scenario):
    s = _hifo(scenario, runs=[dict(enable_tax_awareness=False, max_realized_capital_gains="100")])
    assert _qty(s) == {"X": D(100)}
    assert s.translation.warnings.height == 0


def test_lots_not_covering_request_limit_without_budget(scenario):
    s = _hifo(scenario, budget=None, lots=[("X", "L1", "30", "50", "USD", "2020-01-01")])
    assert _qty(s) == {"X": D(30)}
    assert s.translation.warnings["code"].to_list() == ["TAX_BUDGET_LIMIT_REACHED"]
    assert _totals(s)["realized_gain"] == D(1500)


def test_losses_do_not_free_budget_and_tie_break_descending(scenario):
    """Highest cost first: the loss lot (cost 150) is taken first and its loss does not add
    headroom for the gain lots that follow (tied gain lots are interchangeable here)."""
    lots = [
        ("X", "A", "10", "50", "USD", "2020-01-01"),
        ("X", "B", "10", "50", "USD", "2020-01-01"),
        ("X", "C", "10", "50", "USD", "2019-01-01"),
        ("X", "LOSS", "70", "150", "USD", "2018-01-01"),
    ]
    s = _hifo(scenario, budget="750", lots=lots)
    # LOSS: 70 units at −50 → loss 3500; B (later id) then A: 10 × 50 = 500 gain each;
    # after B used = 500, A allows (750 − 500) / 50 = 5 → stop
    assert _qty(s) == {"X": D(85)}
    t = _totals(s)
    assert t["realized_loss"] == D(3500)
    assert t["realized_gain"] == D(750)


def test_zero_quantity_lot_is_skipped_not_a_stop(scenario):
    lots = [
        ("X", "EMPTY", "0", "200", "USD", "2020-01-01"),
        ("X", "HIGH", "40", "100", "USD", "2020-01-01"),
        ("X", "LOW", "60", "90", "USD", "2020-01-01"),
    ]
    s = _hifo(scenario, budget="100", lots=lots)
    # EMPTY skipped; HIGH 40 at zero gain; LOW 100 / 10 = 10 units
    assert _qty(s) == {"X": D(50)}


def test_budget_is_run_wide_in_trace_order(scenario):
    s = scenario(
        positions=[("X", "10"), ("Y", "10")],
        cash=[("USD", "0")],
        prices=[("X", "100", "USD"), ("Y", "100", "USD")],
        shelf=[("X", "APPROVED"), ("Y", "APPROVED")],
        model=[("Y", "0"), ("X", "0")],  # Y comes first in the trace
        lots=[("X", "LX", "10", "50", "USD", "2020-01-01"), ("Y", "LY", "10", "50", "USD", "2020-01-01")],
        enable_tax_awareness=True,
        max_realized_capital_gains="600",
    )
    # Y: 10 × 50 = 500 gain; X: (600 − 500) / 50 = 2 units
    assert _qty(s) == {"Y": D(10), "X": D(2)}
    assert [e["instrument_id"] for e in s.translation.tax_events.to_dicts()] == ["X"]


def test_lot_cost_converted_to_price_currency(scenario):
    """Lot cost in EUR, price in USD: cost × rate(EUR→USD); missing rate → fx_missing and
    the requested quantity stands."""
    lots = [("X", "L1", "100", "50", "EUR", "2020-01-01")]
    s = scenario(
        runs=[dict(enable_tax_awareness=True, max_realized_capital_gains="100")],
        positions=[("X", "100")],
        cash=[("USD", "0")],
        prices=[("X", "100", "USD")],
        fx=[("EUR/USD", "1.5")],
        shelf=[("X", "APPROVED")],
        model=[("X", "0")],
        lots=lots,
    )
    # gain per unit 100 − 75 = 25 → 100 / 25 = 4 units
    assert _qty(s) == {"X": D(4)}
    assert s.translation.dq.height == 0


def test_lot_cost_rate_missing_keeps_requested_quantity(scenario):
    """§6.10 step 1: at the first lot whose cost rate is missing, append fx_missing and use
    the requested quantity unchanged (the run then blocks at DQ gate #2)."""
    lots = [("X", "L1", "100", "50", "EUR", "2020-01-01")]
    missing = scenario(
        enable_tax_awareness=True, max_realized_capital_gains="100",
        positions=[("X", "100")], cash=[("USD", "0")], prices=[("X", "100", "USD")],
        shelf=[("X", "APPROVED")], model=[("X", "0")], lots=lots,
    )
    assert _qty(missing) == {"X": D(100)}
    assert missing.dq_items(missing.translation.dq, "fx_missing") == ["EUR/USD"]
    assert missing.run_row()["exit_path"] == "E2"


def test_tax_runs_isolated(scenario):
    """Tax on / budget differences between runs in the same frames do not leak."""
    s = _hifo(scenario, runs=[
        dict(enable_tax_awareness=True, max_realized_capital_gains="100"),
        dict(enable_tax_awareness=False),
        dict(enable_tax_awareness=True, max_realized_capital_gains="0"),
        dict(enable_tax_awareness=True),
    ])
    assert _qty(s, 0) == {"X": D("51.11111111111111111111111111")}
    assert _qty(s, 1) == {"X": D(100)}
    assert _qty(s, 2) == {"X": D(50)}  # zero budget: only the zero-gain lot
    assert _qty(s, 3) == {"X": D(100)}
    assert sorted(s.translation.warnings["run"].to_list()) == [0, 2]


def test_budget_limited_quantity_above_1e9_units(scenario):
    s = scenario(
        positions=[("X", "2000000000")], cash=[("USD", "0")], prices=[("X", "2", "USD")],
        shelf=[("X", "APPROVED")], model=[("X", "0")],
        lots=[("X", "L1", "2000000000", "1", "USD", "2020-01-01")],
        enable_tax_awareness=True, max_realized_capital_gains="1500000000",
    )
    assert _totals(s)["realized_gain"] == D(1500000000)
    assert _qty(s) == {"X": D(1500000000)}


def test_zero_budget_with_only_losing_lots_sells_everything(scenario):
    """A zero budget binds (gains 0 ≥ budget 0) yet no lot consumes it: the walk has no
    sequential step at all, and every losing lot is sold in full."""
    s = _hifo(scenario, budget="0", lots=[("X", "L1", "60", "150", "USD", "2020-01-01"), ("X", "L2", "40", "120", "USD", "2021-01-01")])
    assert _qty(s) == {"X": D(100)}
    t = _totals(s)
    assert t["realized_gain"] == D(0) and t["gains_budget_used"] == D(0)
    assert t["realized_loss"] == D(60 * 50 + 40 * 20)
    assert s.translation.warnings.height == 0


def _small_notional_sell(budget: str) -> dict:
    """SMALL, sized by notional, sells its 0.01 market value: 0.01 / 7.90 units, a quotient
    below 0.1 whose 28 significant digits run past Decimal(38, 28); BIG sells 7 after it."""
    lot = lambda lot_id, qty, cost, day: {  # noqa: E731
        "lot_id": lot_id, "quantity": qty, "unit_cost": {"amount": cost, "currency": "SGD"}, "purchase_date": day}
    return {
        "portfolio_snapshot": {
            "portfolio_id": "pf_tax_small", "base_currency": "SGD",
            "positions": [
                {"instrument_id": "SMALL", "quantity": "1", "market_value": {"amount": "0.01", "currency": "SGD"},
                 "lots": [lot("L_SMALL", "1", "0.01", "2020-07-14")]},
                {"instrument_id": "BIG", "quantity": "7", "lots": [lot("L_BIG", "7", "0.80", "2020-01-10")]},
            ],
            "cash_balances": [{"currency": "SGD", "amount": "100"}],
        },
        "market_data_snapshot": {"prices": [
            {"instrument_id": "SMALL", "price": "7.90", "currency": "SGD"},
            {"instrument_id": "BIG", "price": "1.61", "currency": "SGD"},
            {"instrument_id": "FUND", "price": "1", "currency": "SGD"},
        ], "fx_rates": []},
        "model_portfolio": {"targets": [{"instrument_id": "FUND", "weight": "0.5"}]},
        "shelf_entries": [
            {"instrument_id": "SMALL", "status": "APPROVED", "asset_class": "EQUITY", "trade_by": "NOTIONAL"},
            {"instrument_id": "BIG", "status": "APPROVED", "asset_class": "EQUITY"},
            {"instrument_id": "FUND", "status": "APPROVED", "asset_class": "EQUITY"},
        ],
        "options": {"notional_sizing": True, "enable_tax_awareness": True, "max_realized_capital_gains": budget},
    }


def _events(result: dict) -> list[tuple[str, str, str]]:
    return [(e["instrument_id"], e["requested_quantity"], e["allowed_quantity"])
            for e in result["diagnostics"]["tax_budget_constraint_events"]]


def _trades(result: dict) -> dict[str, str]:
    return {i["instrument_id"]: i["quantity"] for i in result["intents"] if i["intent_type"] == "SECURITY_TRADE"}


def test_a_notional_sell_below_a_tenth_walks_its_28_significant_digits():
    """The walk takes the small sell whole from its 28 significant digits (§1.1), so the
    gain it realises (7.89 per unit) leaves the budget BIG's limited quantity is cut from
    to the last digit; at 28 decimals BIG got …3147 instead of …31458."""
    from dpm_vec.simulate import simulate_many

    with localcontext() as ctx:
        ctx.prec = 28
        small = D("0.01") / D("7.90")
        big = (D("0.03") - D("7.89") * small) / D("0.81")
    result = simulate_many([_small_notional_sell("0.03")])[0]
    assert str(small) == "0.001265822784810126582278481013"
    assert _trades(result) == {"SMALL": str(small), "BIG": str(big), "FUND": "59"}
    assert _events(result) == [("BIG", "7", "0.02470698546647913736521331458")]


def test_a_notional_sell_below_a_tenth_limited_by_the_budget_prints_its_request_whole():
    """Limited itself (0.005 / 7.89 units), the small sell's event states the request it
    was cut from with all 28 significant digits, as its intent would have carried them."""
    from dpm_vec.simulate import simulate_many

    result = simulate_many([_small_notional_sell("0.005")])[0]
    assert _events(result) == [
        ("SMALL", "0.001265822784810126582278481013", "0.0006337135614702154626108998733"),
        ("BIG", "7", "0"),
    ]
    assert _trades(result) == {"SMALL": "0.0006337135614702154626108998733", "FUND": "59"}
