"""Trade translation (spec §6.9), dust suppression and the turnover cap (§6.12)."""
from __future__ import annotations

import decimal
from decimal import Decimal as D

from tests.stages.conftest import GOLDEN_03_FX_FUNDING, SINGLE_STOCK_WITH_ZERO_ALTERNATIVE, SUSPENDED_HOLDING_ABOVE_CAP  # noqa: F401
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpm_vec.errors import QuantityRangeError, ValueRangeError
from dpm_vec.numeric import DEC
from dpm_vec import dec28 as f28
from dpm_vec.stages import trades
from dpm_vec.stages.trades import _walk_exact, _walk_ranked_exactly, _walk_turnover_budget


def _intents(s, run=0):
    i = s.translation.intents.filter(pl.col("run") == run).sort("intent_no")
    return [(r["instrument_id"], r["side"], r["quantity"], r["notional"]) for r in i.to_dicts()]


def _suppressed(s, run=0):
    x = s.translation.suppressed.filter(pl.col("run") == run).sort("trace_order")
    return [(r["instrument_id"], r["intended_notional"], r["threshold_amount"]) for r in x.to_dicts()]


# ---- sizing ------------------------------------------------------------------------------------


def test_foreign_currency_sizing_golden_03(scenario):
    """tv 10000 SGD, w 0.5, r 1.35: 5000/1.35 = 3703.70… → 37 units, 3700 USD, 4995 SGD."""
    s = scenario(
        **GOLDEN_03_FX_FUNDING,
    )
    row = s.translation.intents.to_dicts()[0]
    assert (row["side"], row["quantity"], row["notional"], row["notional_base"]) == ("BUY", D(37), D("3700"), D("4995"))
    assert row["intent_no"] == 1


def test_floor_at_28_digit_boundary_golden_08(scenario):
    """§1.1: 0.3 × (0.2/0.3) is exactly 0.2 at 28 digits, so floor(200/100) = 2, not 1."""
    s = scenario(
        cash=[("USD", "1000.00")],
        prices=[("Tech_A", "100.00", "USD"), ("Bond_B", "100.00", "USD")],
        shelf=[("Tech_A", "APPROVED"), ("Bond_B", "APPROVED")],
        attributes=[("Tech_A", "sector", "TECH"), ("Bond_B", "sector", "FI")],
        model=[("Tech_A", "0.3"), ("Bond_B", "0.7")],
        groups={"sector:TECH": "0.2"},
    )
    assert _intents(s) == [("Tech_A", "BUY", D(2), D("200")), ("Bond_B", "BUY", D(8), D("800"))]


def test_floor_exact_quotient_and_just_below(scenario):
    """An exact quotient is not stepped back; a hair below an integer floors down."""
    s = scenario(
        cash=[("USD", "999.99")],
        prices=[("A", "3", "USD"), ("B", "33.333", "USD")],
        shelf=[("A", "APPROVED"), ("B", "APPROVED")],
        model=[("A", "0.3"), ("B", "0.5")],
    )
    # A: 299.997 / 3 = 99.999 → 99 ; B: 499.995 / 33.333 = 15.0000…  → 15
    assert _intents(s) == [("A", "BUY", D(99), D("297")), ("B", "BUY", D(15), D("499.995"))]


@given(st.lists(st.tuples(st.integers(0, 10**10), st.integers(-3, 3), st.sampled_from(["above", "below", "anywhere"]),
                          st.integers(-10**19, 10**19)), min_size=1, max_size=30))
@settings(max_examples=200, deadline=None)
def test_near_an_integer_in_integer_units_is_the_decimal_window(rows):
    """The near-integer window, tested on DEC's 128-bit integers, picks exactly the rows the
    decimal form |q − n| < 1e-9 + n × 1e-12 picks: quotients on either edge of the window
    (a few units of 1e-20 either side) and anywhere within a tenth of n."""
    unit = D("1e-20")
    quotients = []
    with decimal.localcontext(prec=60):  # every digit down to 1e-20 of a quotient up to 1e10
        for n, step, where, offset in rows:
            edge = D("1e-9") + n * D("1e-12")
            q = {"above": n + edge + step * unit, "below": n - edge + step * unit, "anywhere": n + offset * unit}[where]
            quotients.append(abs(q))  # a quotient is |delta| / price
    frame = pl.DataFrame({"q": quotients}, schema={"q": DEC}).with_columns(pl.col("q").round(0).alias("n"))
    decimal_form = (pl.col("q") - pl.col("n")).abs() < trades.NEAR_INTEGER + pl.col("n") * trades.NEAR_INTEGER_SHARE
    got = frame.select(trades.near_an_integer(pl.col("q"), pl.col("n")).alias("got"), decimal_form.alias("want"))
    assert got["got"].to_list() == got["want"].to_list()
    assert got["got"].to_list() == [abs(q - round(q)) < D("1e-9") + round(q) * D("1e-12") for q in quotients]


def test_floor_over_a_normalised_weight_below_0_1_at_28_significant_digits(scenario):
    """An unshelved (locked) holding of 686 in a portfolio of 786 leaves room 100/786 for
    a model of 0.45, so step 3 scales both targets by (1 − L) / 0.45. In exact arithmetic
    I11's target is 20 and I1's 80: trades of 80 and 8,000 units on integer boundaries.
    The reference's weights (replayed here with Python's decimal) are below 0.1 and carry
    28 significant digits, more decimals than Decimal(38, 28): its I11 target is exactly 20
    (sell 80) and I1's a hair below 80 (buy 7,999). Fixed point sized over the
    28-decimal weights sold 79 and bought 8,000, a unit of cash short (BLOCKED)."""
    s = scenario(
        positions=[("I11", "100"), ("I10", "49")],
        prices=[("I11", "1", "USD"), ("I1", "0.01", "USD"), ("I10", "14", "USD")],
        shelf=[("I11", "APPROVED"), ("I1", "APPROVED")],
        model=[("I11", "0.09"), ("I1", "0.36")],
    )
    ctx = decimal.Context(prec=28)
    tv = ctx.add(D(100), D(686))
    factor = ctx.divide(ctx.subtract(D(1), ctx.divide(D(686), tv)), D("0.45"))
    target = {i: ctx.multiply(tv, ctx.multiply(D(w), factor)) for i, w in (("I11", "0.09"), ("I1", "0.36"))}
    assert ctx.subtract(D(100), target["I11"]) == D(80) and ctx.divide(target["I1"], D("0.01")) < D(8000)
    assert [(i, side, q) for i, side, q, _ in _intents(s)] == [("I11", "SELL", D(80)), ("I1", "BUY", D(7999))]


def test_sell_floors_too_and_zero_delta_is_no_intent(scenario):
    s = scenario(
        positions=[("A", "10"), ("B", "5")],
        cash=[("USD", "0")],
        prices=[("A", "100", "USD"), ("B", "200", "USD")],
        shelf=[("A", "APPROVED"), ("B", "APPROVED")],
        model=[("A", "0.455"), ("B", "0.5")],  # tv 2000: A target 910 → sell 0.9 → floor 0; B on target
    )
    assert _intents(s) == []
    assert _suppressed(s) == []


def test_market_value_drives_current_value_even_when_calculated(scenario):
    """§8 item 3: 10 units worth 100 by price but 10000 by market value, target 0 → SELL 100."""
    s = scenario(
        positions=[{"instrument_id": "A", "quantity": "10", "market_value": "10000", "market_value_currency": "USD"}],
        cash=[("USD", "0")],
        prices=[("A", "100", "USD"), ("B", "100", "USD")],
        shelf=[("A", "APPROVED"), ("B", "APPROVED")],
        model=[("B", "1.0")],
    )
    assert _intents(s) == [("B", "BUY", D(10), D("1000")), ("A", "SELL", D(100), D("10000"))]
    r = s.run_row()
    assert (r["status"], r["exit_path"]) == ("BLOCKED", "E4")
    shorting = [x for x in s.rules() if x["rule_id"] == "NO_SHORTING"][0]
    assert shorting["status"] == "FAIL" and shorting["measured"] == D(-90)


def test_delta_from_valuation_takes_the_current_value_as_the_valuation_values_it(scenario):
    """RFC delta_from_valuation: 10 US_EQ at 100 USD, market value 900 EUR, liquidated (off
    the model). The reference sells floor(900 / 100) = 9 in either mode (§8 item 3). Under
    the option CALCULATED values it 10 × 100 = 1000 USD (SELL 10), and TRUST_SNAPSHOT at
    its base value over the USD rate, 900 × 1.5 / 1.35 = 1000 USD (SELL 10), where 900 EUR
    read as USD would sell 9."""
    s = scenario(
        runs=[dict(), dict(delta_from_valuation=True), dict(valuation_mode="TRUST_SNAPSHOT"),
              dict(valuation_mode="TRUST_SNAPSHOT", delta_from_valuation=True)],
        base="SGD",
        positions=[{"instrument_id": "US_EQ", "quantity": "10", "market_value": "900", "market_value_currency": "EUR"}],
        cash=[("SGD", "10000")],
        prices=[("US_EQ", "100", "USD"), ("SG_EQ", "10", "SGD")],
        fx=[("USD/SGD", "1.35"), ("EUR/SGD", "1.5")],
        shelf=[("US_EQ", "APPROVED"), ("SG_EQ", "APPROVED")],
        model=[("SG_EQ", "0.5")],
    )
    sells = s.translation.intents.filter(pl.col("side") == "SELL").sort("run")
    assert sells.select("run", "quantity").rows() == [(0, D(9)), (1, D(10)), (2, D(9)), (3, D(10))]


def test_capped_locked_position_is_sold(scenario):
    """§8 item 10: the single-position cap rescales a held SUSPENDED position, which then
    gets a SELL intent even though it is locked."""
    s = scenario(
        **SUSPENDED_HOLDING_ABOVE_CAP,
    )
    assert _intents(s) == [("A", "BUY", D(30), D("3000")), ("LOCK", "SELL", D(10), D("1000"))]


def test_price_and_fx_missing_in_translation(scenario):
    """Every trace instrument without a price (including excluded targets at weight 0) is
    flagged; an instrument whose price currency has no rate is flagged fx_missing."""
    s = scenario(
        cash=[("USD", "1000")],
        prices=[("J", "100", "JPY")],
        shelf=[("NP", "APPROVED"), ("BAN", "BANNED"), ("J", "APPROVED")],
        model=[("NP", "0.3"), ("BAN", "0.3"), ("J", "0.3")],
    )
    assert s.dq_items(s.translation.dq, "price_missing") == ["NP", "BAN"]
    assert s.dq_items(s.translation.dq, "fx_missing") == ["JPY/USD"]
    assert s.translation.intents.height == 0
    r = s.run_row()
    assert r["exit_path"] == "E2"


# ---- dust suppression -----------------------------------------------------------------------------


def _dust(scenario, **policy):
    return scenario(
        cash=[("USD", "90000")],  # + FLAT 10000 → tv 100000
        prices=[("BIG", "100", "USD"), ("DUST", "100", "USD"), ("FLAT", "100", "USD")],
        shelf=[
            {"instrument_id": "BIG", "status": "APPROVED"},
            {"instrument_id": "DUST", "status": "APPROVED", "min_notional_amount": "500", "min_notional_currency": "USD"},
            {"instrument_id": "FLAT", "status": "APPROVED", "min_notional_amount": "1", "min_notional_currency": "USD"},
        ],
        positions=[("FLAT", "100")],
        model=[("BIG", "0.5"), ("DUST", "0.001"), ("FLAT", "0.1")],
        **policy,
    )


def test_shelf_threshold_suppresses_and_records_zero_trades(scenario):
    """DUST 100 < 500 suppressed; FLAT (already on target) is a zero SELL recorded with 0."""
    s = _dust(scenario)
    assert _suppressed(s) == [("DUST", D("100"), D("500")), ("FLAT", D("0"), D("1"))]
    assert _intents(s) == [("BIG", "BUY", D(500), D("50000"))]
    assert s.translation.intents["min_notional_applied"].to_list() == [False]
    assert s.translation.intents["intent_no"].to_list() == [1]


def test_request_threshold_overrides_shelf(scenario):
    """min_trade_notional wholly replaces the shelf threshold (no currency conversion)."""
    s = _dust(scenario, min_trade_notional=("50", "EUR"))
    assert _suppressed(s) == [("FLAT", D("0"), D("50"))]  # DUST 100 ≥ 50 now passes
    assert [i[0] for i in _intents(s)] == ["BIG", "DUST"]
    assert s.translation.intents["min_notional_applied"].to_list() == [True, True]
    high = _dust(scenario, min_trade_notional=("60000", "USD"))
    assert [x[0] for x in _suppressed(high)] == ["BIG", "DUST", "FLAT"]
    assert high.translation.intents.height == 0


def test_notional_equal_to_threshold_is_not_dust(scenario):
    s = _dust(scenario, min_trade_notional=("100", "USD"))
    assert [x[0] for x in _suppressed(s)] == ["FLAT"]
    assert [i[0] for i in _intents(s)] == ["BIG", "DUST"]


def test_suppress_dust_false_keeps_trade_but_labels_it(scenario):
    s = _dust(scenario, suppress_dust_trades=False)
    assert _suppressed(s) == []
    assert [(i[0], i[2]) for i in _intents(s)] == [("BIG", D(500)), ("DUST", D(1))]
    assert s.translation.intents["min_notional_applied"].to_list() == [False, True]


def test_intent_ids_count_only_emitted_intents(scenario):
    s = scenario(
        cash=[("USD", "10000")],
        prices=[(i, "100", "USD") for i in ("A", "B", "C")],
        shelf=[
            ("A", "APPROVED"),
            {"instrument_id": "B", "status": "APPROVED", "min_notional_amount": "5000", "min_notional_currency": "USD"},
            ("C", "APPROVED"),
        ],
        model=[("A", "0.1"), ("B", "0.1"), ("C", "0.1")],
    )
    i = s.translation.intents.sort("intent_no")
    assert list(zip(i["instrument_id"], i["intent_no"])) == [("A", 1), ("C", 2)]


def test_notional_sizing_resizes_only_its_own_runs_notional_instruments(scenario):
    """Two runs of one snapshot, only the first with notional sizing: its NOTIONAL fund is
    sized by amount (round(|delta|, 2) / price, fractional), everything else keeps floored
    units, and the run without the option is untouched by the first run's rows."""
    s = scenario(
        cash=[("USD", "10000")],
        positions=[("FUND", "100"), ("EQ", "10")],
        prices=[("FUND", "30", "USD"), ("EQ", "33", "USD")],
        shelf=[{"instrument_id": "FUND", "status": "APPROVED", "trade_by": "NOTIONAL"}, ("EQ", "APPROVED")],
        model=[("FUND", "0.5"), ("EQ", "0.3")],  # tv 13330: FUND 6665 → buy 3665; EQ 3999 → buy 3669
        runs=[dict(notional_sizing=True), dict()],
    )
    by_run = {
        (r["run"], r["instrument_id"]): r
        for r in s.translation.intents.select("run", "instrument_id", "requested_quantity", "notional").to_dicts()
    }
    fund_amount = by_run[(0, "FUND")]
    assert fund_amount["notional"] == D("3665.00")
    assert fund_amount["requested_quantity"] == D("122.1666666666666666666666667")  # 3665 / 30 to 28 significant digits (§1.1)
    assert by_run[(1, "FUND")]["requested_quantity"] == 122  # floor(3665 / 30)
    assert by_run[(0, "EQ")]["requested_quantity"] == by_run[(1, "EQ")]["requested_quantity"] == 111  # floor(3669 / 33)


def test_notional_delta_at_a_half_cent_values_a_long_held_quantity_in_28_digits(scenario):
    """A held quantity with more than 20 decimals (a fed-back notional-sized one) is worth
    511190.5700000000000000000002 in the reference's 28 digits and 511190.57 at 20 decimals;
    its target of 0.3 × 1,703,968.55 = 511190.565 leaves a delta of -0.0050000000000000000002,
    which rounds to a cent (§1.1), where -0.005 rounds half-even to no trade at all."""
    s = scenario(
        base="SGD",
        cash=[("SGD", "1192777.98")],
        positions=[("FUND", "883.785843951522276585812832")],
        prices=[("FUND", "578.41", "SGD")],
        shelf=[{"instrument_id": "FUND", "status": "APPROVED", "trade_by": "NOTIONAL"}],
        model=[("FUND", "0.3")],
        runs=[dict(notional_sizing=True)],
    )
    [(instrument, side, quantity, notional)] = _intents(s)
    assert (instrument, side, notional) == ("FUND", "SELL", D("0.01"))
    assert quantity == D("0.0000172887743987828702823257")  # 0.01 / 578.41 at Decimal(38, 28)


def test_a_liquidated_holding_past_20_decimals_sells_the_units_its_28_digit_value_holds(scenario):
    """A zero target makes delta = −current value, exact in DEC for a quantity DEC holds;
    44.999999999999999999999999 units (fed back) at 367.37 are worth
    16531.64999999999999999999963 in 28 digits, which DEC rounds to 45 units' 16531.65:
    the reference floors 44.999… to 44 units and keeps the fraction, where 45 sold more than
    is held and failed NO_SHORTING."""
    s = scenario(
        cash=[("USD", "1000")],
        positions=[("S", "44.999999999999999999999999"), ("T", "10")],
        prices=[("S", "367.37", "USD"), ("T", "100", "USD")],
        shelf=[("S", "APPROVED"), ("T", "APPROVED")],
        model=[("T", "0.5"), ("S", "0")],
    )
    assert [(i, side, q) for i, side, q, _ in _intents(s)] == [("T", "BUY", D(82)), ("S", "SELL", D(44))]
    assert s.run_row()["status"] == "READY"


# ---- turnover cap ---------------------------------------------------------------------------------


def _turnover(scenario, pct, **kw):
    """Golden scenario_10: tv 100000; A 0.10, B 0.10, C 0.02."""
    return scenario(
        cash=[("USD", "100000")],
        prices=[(i, "100", "USD") for i in ("A", "B", "C")],
        shelf=[(i, "APPROVED", "EQUITY") for i in ("A", "B", "C")],
        model=[("A", "0.10"), ("B", "0.10"), ("C", "0.02")],
        max_turnover_pct=pct,
        **kw,
    )


def test_turnover_skip_and_continue_golden_10(scenario):
    s = _turnover(scenario, "0.15")
    kept, dropped, warnings = s.turnover
    assert kept.sort("list_order")["intent_no"].to_list() == [1, 3]  # oi_1, oi_3 (gap kept)
    d = dropped.to_dicts()
    assert [(x["instrument_id"], x["potential_notional"], x["score"]) for x in d] == [("B", D("10000"), D("0.1"))]
    assert warnings["code"].to_list() == ["PARTIAL_REBALANCE_TURNOVER_LIMIT"]


def test_turnover_zero_budget_drops_all_in_ranking_order(scenario):
    s = _turnover(scenario, "0")
    kept, dropped, warnings = s.turnover
    assert kept.height == 0
    assert dropped.sort("drop_order")["instrument_id"].to_list() == ["A", "B", "C"]
    assert warnings["code"].to_list() == ["PARTIAL_REBALANCE_TURNOVER_LIMIT"]


def test_a_turnover_score_past_the_range_names_its_portfolio(scenario):
    """A total value a hair above zero (1E-17: holdings of 100,000 against cash a hair
    less negative) makes a sell's §6.12 score about 1E22, which the Parquet score column
    cannot hold: the portfolio is named with that score (ValueRangeError, which a sweep
    blocks alone), not left to a bare Polars overflow that halves the shard."""
    s = scenario(positions=[("A", "1000", None, None)], cash=[("USD", "-99999.99999999999999999")],
                 prices=[("A", "100", "USD"), ("B", "100", "USD")], shelf=[(i, "APPROVED", "EQUITY") for i in "AB"],
                 model=[("A", "0.5"), ("B", "0.5")], max_turnover_pct="0.1")
    with pytest.raises(ValueRangeError) as caught:
        _ = s.turnover
    assert caught.value.by_run_key == {"R0": (
        "the turnover score of a SELL of A (its base notional over a total value of about 1.0E-17 USD) is about 9.99E+21, "
        "beyond the engine's fixed-point range (values under 1E18)")}


def test_turnover_within_budget_keeps_original_order(scenario):
    s = _turnover(scenario, "0.22")
    kept, dropped, warnings = s.turnover
    assert kept.sort("list_order")["instrument_id"].to_list() == ["A", "B", "C"]
    assert dropped.height == 0 and warnings.height == 0


def test_turnover_kept_intents_follow_ranking_order(scenario):
    """When the cap bites, survivors continue in ranking order: score desc, |notional| asc,
    instrument id asc."""
    s = scenario(
        cash=[("USD", "100000")],
        prices=[(i, "100", "USD") for i in ("Z", "Y", "X", "W")],
        shelf=[(i, "APPROVED") for i in ("Z", "Y", "X", "W")],
        model=[("Z", "0.01"), ("Y", "0.05"), ("X", "0.05"), ("W", "0.5")],
        max_turnover_pct="0.12",
    )
    kept, dropped, _ = s.turnover
    # ranking W (0.5), X (0.05), Y (0.05, id after X), Z (0.01): W dropped, X+Y+Z = 11000 ≤ 12000
    assert kept.sort("list_order")["instrument_id"].to_list() == ["X", "Y", "Z"]
    assert dropped["instrument_id"].to_list() == ["W"]


def test_turnover_policies_isolated_between_runs(scenario):
    s = scenario(
        runs=[dict(max_turnover_pct="0.15"), dict(), dict(max_turnover_pct="0")],
        cash=[("USD", "100000")],
        prices=[(i, "100", "USD") for i in ("A", "B", "C")],
        shelf=[(i, "APPROVED") for i in ("A", "B", "C")],
        model=[("A", "0.10"), ("B", "0.10"), ("C", "0.02")],
    )
    kept, dropped, warnings = s.turnover
    by_run = {r: kept.filter(pl.col("run") == r).sort("list_order")["instrument_id"].to_list() for r in (0, 1, 2)}
    assert by_run == {0: ["A", "C"], 1: ["A", "B", "C"], 2: []}
    assert sorted(warnings["run"].to_list()) == [0, 2]
    assert dropped.filter(pl.col("run") == 0)["instrument_id"].to_list() == ["B"]


def _sequential_turnover_walk(budget: D, sizes: list[D]) -> list[bool]:
    """§6.12 as written: one intent at a time, keep if used + |nb| ≤ budget."""
    used, keep = D(0), []
    for size in sizes:
        keep.append(used + size <= budget)
        used += size if keep[-1] else 0
    return keep


@settings(max_examples=300, deadline=None)
@given(st.lists(
    st.tuples(st.integers(0, 40), st.lists(st.integers(0, 30), max_size=12)),
    min_size=1, max_size=6,
))
def test_turnover_walk_in_rounds_matches_the_sequential_walk(books):
    """The round-based walk decides every intent as the one-at-a-time walk does, for any
    budget and ranking (ties, zero sizes, zero budgets, skips a later intent fills)."""
    rows = [(run, rank, D(size) / 4, D(budget) / 4)
            for run, (budget, sizes) in enumerate(books) for rank, size in enumerate(sizes)]
    ranked = pl.DataFrame(rows, schema={"run": pl.UInt32, "list_order": pl.Int64, "_abs_nb": DEC, "_budget": DEC}, orient="row")
    flags = _walk_turnover_budget(ranked).sort("run", "list_order")
    expected = [k for budget, sizes in books for k in _sequential_turnover_walk(D(budget) / 4, [D(s) / 4 for s in sizes])]
    assert flags["_keep"].to_list() == expected


def test_turnover_budget_met_exactly_through_an_inverse_quote(scenario):
    """143 × 100 USD at SGD/USD 1.3 is 14300 × 0.7692307692307692307692307692 → exactly 11000
    SGD in the reference's 28 digits, the budget 100000 × 0.11 itself: §6.12 keeps it. The
    fixed point's 1 / 1.3 (0.76923076923076923077) makes it 11000.000000000000000011, over
    the budget; the run is decided again in 28 digits."""
    s = scenario(
        base="SGD", cash=[("SGD", "100000")], prices=[("US_EQ", "100", "USD")], fx=[("SGD/USD", "1.3")],
        shelf=[("US_EQ", "APPROVED")], model=[("US_EQ", "0.11")], max_turnover_pct="0.11",
    )
    assert s.translation.intents["notional_base"].to_list() == [D("11000.000000000000000011")]
    kept, dropped, warnings = s.turnover
    assert kept["instrument_id"].to_list() == ["US_EQ"]
    assert dropped.height == 0 and warnings.height == 0


def test_turnover_tie_through_an_inverse_quote_breaks_on_instrument_id(scenario):
    """A (100 USD) and J (1500 JPY at USD/JPY 150: exactly 100 USD in 28 digits) tie on
    score and size, so A ranks first by id and J is the one the 150 budget cannot take; in
    the fixed point J's 100.00000000000000005 ranked it first."""
    s = scenario(
        base="USD", cash=[("USD", "1000")], prices=[("A", "1", "USD"), ("J", "1500", "JPY")], fx=[("USD/JPY", "150")],
        shelf=[("A", "APPROVED"), ("J", "APPROVED")], model=[("A", "0.1"), ("J", "0.1")], max_turnover_pct="0.15",
    )
    kept, dropped, _ = s.turnover
    assert kept["instrument_id"].to_list() == ["A"]
    assert [(d["instrument_id"], d["potential_notional"], d["score"]) for d in dropped.to_dicts()] == [("J", D(100), D("0.1"))]


def _cap_figures(proposed: str, budget: str, ranked: list[tuple[str, str, bool]] = (),
                 total: str = "100000") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(frame, ranked) as ``_fragile_turnover_runs`` reads them, for one run: its proposed,
    budget and total, and its ranked intents (score, |notional_base|, kept) in ranking order."""
    frame = pl.DataFrame({"run": [0], "_proposed": [D(proposed)], "_budget": [D(budget)], "total_value": [D(total)]},
                         schema={"run": pl.UInt32, "_proposed": DEC, "_budget": DEC, "total_value": DEC})
    rows = [(0, i, D(score), D(size), keep, D(budget)) for i, (score, size, keep) in enumerate(ranked)]
    return frame, pl.DataFrame(rows, orient="row", schema={
        "run": pl.UInt32, "list_order": pl.Int64, "score": DEC, "_abs_nb": DEC, "_keep": pl.Boolean, "_budget": DEC,
    })


def test_turnover_exact_path_only_for_runs_the_fixed_point_cannot_call():
    """Clear-cut decisions stay on the fixed-point path; a proposed total, a tie or a fit
    within a hair of its boundary sends the run to the 28-digit one."""
    assert trades._fragile_turnover_runs(*_cap_figures("22000", "15000", [("0.1", "10000", True), ("0.09", "9000", False)])).height == 0
    assert trades._fragile_turnover_runs(*_cap_figures("15000.0000000000000001", "15000")).height == 1
    near_tie = [("0.1", "10000", True), ("0.10000000000000000001", "10000.000000000000000011", False)]
    assert trades._fragile_turnover_runs(*_cap_figures("20000", "15000", near_tie)).height == 1
    near_fit = [("0.1", "10000", True), ("0.05", "5000.00000000000000001", False)]
    assert trades._fragile_turnover_runs(*_cap_figures("20000", "15000", near_fit)).height == 1
    # a total of 0 (or one valuation took as 0) is scored in 28 digits, which may leave a few units of the last digit
    assert trades._fragile_turnover_runs(*_cap_figures("2", "0", [("0", "2", False)], total="0")).height == 1


def _decimal28_walk(budget: D, sizes: list[D]) -> list[bool]:
    """§6.12's walk in Python's default 28-digit context."""
    with decimal.localcontext(decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)):
        used, keep = D(0), []
        for size in sizes:
            candidate = used + size
            keep.append(candidate <= budget)
            used = candidate if keep[-1] else used
    return keep


def _ranked_f28(rows: list[tuple[int, int, D, D]]) -> pl.DataFrame:
    """(run, list_order, _nb, _budget, _nb_f, _budget_f) in (run, list_order) order, as the
    28-digit walks read a ranking."""
    ranked = pl.DataFrame(rows, schema={"run": pl.UInt32, "list_order": pl.Int64, "_nb": pl.Decimal(38, 28), "_budget": DEC}, orient="row")
    return f28.from_dec(f28.from_dec(ranked, "_nb", "_nb_f"), "_budget", "_budget_f").sort("run", "list_order")


@settings(max_examples=200, deadline=None)
@given(st.lists(
    st.tuples(st.integers(0, 10**6), st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 30)), max_size=10)),
    min_size=1, max_size=5,
))
def test_exact_turnover_walk_matches_a_28_digit_walk(books):
    """The 28-digit walk, run over all runs at once in lanes, and the walk that sends only
    the runs with a step within a hair to it, decide each intent as a one-at-a-time walk in
    Python's 28-digit decimals does (sizes of mixed magnitudes, so the running sums round)."""
    ranked = _ranked_f28([(run, rank, D(m) / D(3) ** e, D(budget))
                          for run, (budget, sizes) in enumerate(books) for rank, (m, e) in enumerate(sizes)])
    expected = [k for run, (budget, _) in enumerate(books)  # the sizes as the frame holds them (28 decimals)
                for k in _decimal28_walk(D(budget), ranked.filter(pl.col("run") == run)["_nb"].to_list())]
    assert _walk_exact(ranked).sort("run", "list_order")["_keep"].to_list() == expected
    assert _walk_ranked_exactly(ranked).sort("run", "list_order")["_keep"].to_list() == expected


def test_exact_turnover_walk_steps_in_28_digits_only_runs_with_a_step_within_a_hair(monkeypatch):
    """Run 0's second intent misses the budget of 1 by 1e-27 in 28 digits, where its size
    read to 20 decimals (…43211) would fit it exactly: that run walks in 28 digits and drops
    it. Run 1 is golden scenario_10's clear-cut 10000, 10000, 2000 under 15000: decided by
    the rounds walk alone, B dropped and C kept."""
    stepped = []

    def recording_walk(ranked):
        stepped.extend(ranked["run"].unique().to_list())
        return _walk_exact(ranked)

    monkeypatch.setattr(trades, "_walk_exact", recording_walk)
    ranked = _ranked_f28([
        (0, 0, D("0.1234567890123456789012345678"), D(1)), (0, 1, D("0.8765432109876543210987654332"), D(1)),
        (1, 0, D(10000), D(15000)), (1, 1, D(10000), D(15000)), (1, 2, D(2000), D(15000)),
    ])
    flags = _walk_ranked_exactly(ranked).sort("run", "list_order")
    assert flags["_keep"].to_list() == [True, False, True, False, True]
    assert stepped == [0]
    read_to_20 = ranked.select("run", "list_order", f28.to_dec("_nb_f").alias("_abs_nb"), f28.to_dec("_budget_f").alias("_budget"))
    assert _walk_turnover_budget(read_to_20).sort("run", "list_order")["_keep"].to_list()[:2] == [True, True]  # what 20 decimals decide


def test_tax_limited_sell_meeting_the_threshold_exactly_is_not_dust(scenario):
    """A gains budget of 100 over lot cost 60 at price 90 allows 3.333…3 units (28 digits),
    whose 28-digit notional is exactly 300.00 (§1.1, §6.9 step 8: dust only below the
    threshold). At 20 decimals the quantity times the price is 299.99…97 and was suppressed."""
    book = dict(
        base="SGD", positions=[("A", "100")], cash=[("SGD", "10000")],
        prices=[("A", "90.00", "SGD"), ("C", "10.00", "SGD")], shelf=[("A", "APPROVED"), ("C", "APPROVED")],
        model=[("C", "0.5")], lots=[("A", "L0", "100", "60.00", "SGD", "2020-01-01")],
        enable_tax_awareness=True, max_realized_capital_gains="100.00",
    )
    s = scenario(**book, min_trade_notional=("300.00", "SGD"))
    assert [x[0] for x in _suppressed(s)] == []
    sells = s.translation.intents.filter(pl.col("side") == "SELL")
    assert sells["instrument_id"].to_list() == ["A"]
    assert sells["quantity"].to_list() == [D("3.333333333333333333333333333")]
    # a hair more threshold makes it dust again: the exact test decides both ways
    higher = scenario(**book, min_trade_notional=("300.00000000000000000001", "SGD"))
    assert [x[0] for x in _suppressed(higher)] == ["A"]


# ---- quantity range ---------------------------------------------------------------------------


def _half_a_billion_in_cents(scenario, **policy):
    """tv 500,000,000 USD: I0 at 0.01 weighs 0.5 (a BUY of 2.5e10 units, beyond QTY's
    range), I1 at 100 weighs 0.005 (a BUY of 25,000)."""
    return scenario(
        cash=[("USD", "500000000.00")],
        prices=[("I0", "0.01", "USD"), ("I1", "100.00", "USD")],
        shelf=[("I0", "APPROVED"), ("I1", "APPROVED")],
        model=[("I0", "0.5"), ("I1", "0.005")],
        **policy,
    )


def test_a_buy_beyond_the_quantity_range_reaches_the_turnover_step_with_its_notional(scenario):
    """Translation does not fail on a candidate that later steps may drop: the BUY keeps no
    quantity, its units in ``_units_beyond_range`` and its notional (units × price)."""
    s = _half_a_billion_in_cents(scenario)
    rows = {r["instrument_id"]: r for r in s.translation.intents.to_dicts()}
    assert rows["I0"]["quantity"] is None and rows["I0"]["_units_beyond_range"] == D("25000000000")
    assert (rows["I0"]["notional"], rows["I0"]["notional_base"]) == (D("250000000"), D("250000000"))
    assert rows["I0"]["tax_budget_applied"] is False
    assert (rows["I1"]["quantity"], rows["I1"]["_units_beyond_range"]) == (D(25000), None)


def test_a_buy_beyond_the_quantity_range_that_the_turnover_cap_drops_is_no_error(scenario):
    s = _half_a_billion_in_cents(scenario, max_turnover_pct="0.01")
    kept, dropped, _ = s.turnover
    assert dropped.select("instrument_id", "potential_notional").rows() == [("I0", D("250000000"))]
    intents = trades.within_quantity_range(kept, s.runs)
    assert intents["instrument_id"].to_list() == ["I1"] and "_units_beyond_range" not in intents.columns


def test_a_buy_beyond_the_quantity_range_that_survives_is_named_with_its_run(scenario):
    """The error names the first such trade, and each failing run by its key with its own
    first trade (the capped run R1 is not among them)."""
    s = _half_a_billion_in_cents(scenario, runs=[dict(), dict(max_turnover_pct="0.01"), dict(min_cash_buffer_pct="0.5")])
    with pytest.raises(QuantityRangeError, match="a BUY of 25000000000 units of I0 is outside the engine's quantity range") as caught:
        trades.within_quantity_range(s.turnover[0], s.runs)
    assert caught.value.by_run_key == {
        "R0": "a BUY of 25000000000 units of I0 is outside the engine's quantity range (trades under 9,000,000,000 units)",
        # the cash buffer scales the model's 0.505 to 0.5: I0 weighs 0.5 × 0.5 / 0.505
        "R2": "a BUY of 24752475247 units of I0 is outside the engine's quantity range (trades under 9,000,000,000 units)",
    }


def test_a_buy_beyond_the_quantity_range_suppressed_as_dust_is_no_error(scenario):
    s = _half_a_billion_in_cents(scenario, min_trade_notional=("300000000", "USD"))
    assert [row[0] for row in _suppressed(s)] == ["I0", "I1"]
    assert s.translation.intents.height == 0 and s.result.runs["status"].to_list() == ["READY"]


def _a_thousand_units_valued_at_four_hundred_million(scenario, **policy):
    """A snapshot market value of 4e8 USD for 1,000 units priced 0.01, out of the model:
    liquidating that value is a SELL of 4e10 units (the reference sizes it so too)."""
    return scenario(
        positions=[{"instrument_id": "I0", "quantity": "1000", "market_value": "400000000", "market_value_currency": "USD"}],
        cash=[("USD", "1000000.00")],
        prices=[("I0", "0.01", "USD"), ("I1", "100.00", "USD")],
        shelf=[("I0", "APPROVED"), ("I1", "APPROVED")],
        model=[("I1", "0.001")],
        **policy,
    )


def test_a_sell_beyond_the_quantity_range_waits_for_the_turnover_step(scenario):
    dropped_by_the_cap = _a_thousand_units_valued_at_four_hundred_million(scenario, max_turnover_pct="0.01")
    assert trades.within_quantity_range(dropped_by_the_cap.turnover[0], dropped_by_the_cap.runs)["instrument_id"].to_list() == ["I1"]
    uncapped = _a_thousand_units_valued_at_four_hundred_million(scenario)
    with pytest.raises(QuantityRangeError, match="a SELL of 40000000000 units of I0"):
        trades.within_quantity_range(uncapped.turnover[0], uncapped.runs)


def test_a_sell_beyond_the_quantity_range_is_sized_by_its_tax_lots(scenario):
    """§6.10: the walk gives every lot to a sell that needs more than they hold, so a
    request beyond QTY's range (4e10 units) comes down to its lots' 1,000 units, with the
    reference's event (requested as asked) and TAX_BUDGET on the intent."""
    lots = [("I0", "L1", "600", "0.02", "USD", "2020-01-01"), ("I0", "L2", "400", "0.005", "USD", "2021-01-01")]
    s = _a_thousand_units_valued_at_four_hundred_million(scenario, enable_tax_awareness=True, lots=lots)
    sell = s.translation.intents.filter(pl.col("instrument_id") == "I0").row(0, named=True)
    assert (sell["quantity"], sell["_units_beyond_range"], sell["tax_budget_applied"], sell["notional"]) == (D(1000), None, True, D(10))
    events = s.translation.tax_events.select("requested_quantity", "requested_units_beyond_range", "allowed_quantity").rows()
    assert events == [(None, D("40000000000"), D(1000))]
    assert sorted(trades.within_quantity_range(s.turnover[0], s.runs)["instrument_id"]) == ["I0", "I1"]


def test_a_sell_beyond_the_quantity_range_whose_lots_hold_as_much_is_named(scenario):
    """The walk sizes such a sell with the range's limit as its request, which is exact only
    while its lots hold less: lots of 9e9 units would allow a trade beyond the range."""
    lots = [("I0", f"L{i}", "1000000000", "0.02", "USD", "2020-01-01") for i in range(9)]
    s = _a_thousand_units_valued_at_four_hundred_million(scenario, enable_tax_awareness=True, lots=lots)
    with pytest.raises(QuantityRangeError, match="a SELL of 40000000000 units of I0 .* the 9000000000 units of its tax lots") as caught:
        _ = s.translation
    assert list(caught.value.by_run_key) == ["R0"]


def test_a_notional_sized_buy_beyond_the_quantity_range_waits_with_its_amount(scenario):
    """RFC notional sizing: a BUY of 250,000,000.00 at 0.003 is 83,333,333,333.33… units;
    the turnover cap drops it (no error), and standing it is named with those units."""
    def sized(**policy):
        return scenario(
            cash=[("USD", "500000000.00")],
            prices=[("I0", "0.003", "USD"), ("I1", "100.00", "USD")],
            shelf=[{"instrument_id": "I0", "status": "APPROVED", "trade_by": "NOTIONAL"}, ("I1", "APPROVED")],
            model=[("I0", "0.5"), ("I1", "0.005")],
            notional_sizing=True,
            **policy,
        )

    row = sized().translation.intents.filter(pl.col("instrument_id") == "I0").row(0, named=True)
    assert (row["quantity"], row["notional"]) == (None, D("250000000.00"))
    assert row["_units_beyond_range"] == D("83333333333.33333333333333333")  # 28 significant digits (§1.1)
    capped = sized(max_turnover_pct="0.01")
    assert trades.within_quantity_range(capped.turnover[0], capped.runs)["instrument_id"].to_list() == ["I1"]
    uncapped = sized()
    with pytest.raises(QuantityRangeError, match="a BUY of 83333333333.33333333333333333 units of I0"):
        trades.within_quantity_range(uncapped.turnover[0], uncapped.runs)


def test_a_notional_sized_sell_beyond_the_quantity_range_sells_the_holding(scenario):
    """A notional sell above the holding sells the holding, however far above."""
    s = scenario(
        positions=[{"instrument_id": "I0", "quantity": "1000", "market_value": "400000000", "market_value_currency": "USD"}],
        cash=[("USD", "1000000.00")],
        prices=[("I0", "0.01", "USD")],
        shelf=[{"instrument_id": "I0", "status": "APPROVED", "trade_by": "NOTIONAL"}],
        model=[],
        notional_sizing=True,
    )
    row = s.translation.intents.row(0, named=True)
    assert (row["side"], row["quantity"], row["_units_beyond_range"], row["notional"]) == ("SELL", D(1000), None, D(10))
