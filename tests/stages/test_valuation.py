"""Valuation (spec §6.2): values, weights, totals, allocations and data-quality findings."""
from __future__ import annotations

import decimal
from decimal import Decimal as D

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from dpm_vec.numeric import DEC, QTY, times_price
from dpm_vec.stages.valuation import at_printed_midpoints, near_printed_midpoint


def _pos(s, run=0):
    p = s.before.positions.filter(pl.col("run") == run).sort("pos_seq")
    return {r["instrument_id"]: r for r in p.to_dicts()}


def _total(s, run=0):
    return s.before.totals.filter(pl.col("run") == run)["total_value"].item()


def _alloc(s, dimension, run=0):
    a = s.before.allocations.filter((pl.col("run") == run) & (pl.col("dimension") == dimension))
    return {k: (v, w) for k, v, w in zip(a["key"], a["value"], a["weight"])}


def test_calculated_values_weights_and_total(scenario):
    s = scenario(
        base="SGD",
        positions=[("US", "10"), ("SG", "5")],
        cash=[("SGD", "1000"), ("USD", "100")],
        prices=[("US", "100", "USD"), ("SG", "20", "SGD")],
        fx=[("USD/SGD", "1.35")],
        shelf=[("US", "APPROVED", "EQUITY")],
    )
    p = _pos(s)
    assert p["US"]["value_instr"] == D("1000") and p["US"]["value_base"] == D("1350")
    assert p["US"]["instrument_currency"] == "USD"
    assert p["SG"]["value_base"] == D("100")
    # positions 1350 + 100, cash 1000 + 100 × 1.35
    assert _total(s) == D("2585")
    assert abs(p["US"]["weight"] - D("1350") / D("2585")) < D("1e-19")
    assert p["US"]["asset_class"] == "EQUITY"
    assert p["SG"]["asset_class"] == "UNKNOWN"  # not on the shelf
    ac = _alloc(s, "asset_class")
    assert ac["CASH"][0] == D("1135")
    assert ac["EQUITY"][0] == D("1350")
    assert ac["UNKNOWN"][0] == D("100")
    assert s.before.dq.height == 0


def test_trust_snapshot_uses_market_value_and_its_currency(scenario):
    s = scenario(
        runs=[dict(valuation_mode="TRUST_SNAPSHOT"), dict()],
        positions=[{"instrument_id": "A", "quantity": "10", "market_value": "2000", "market_value_currency": "EUR"}],
        cash=[("USD", "0")],
        prices=[("A", "100", "USD")],
        fx=[("EUR/USD", "1.1")],
    )
    trusted, calc = _pos(s, 0)["A"], _pos(s, 1)["A"]
    assert trusted["instrument_currency"] == "EUR"
    assert trusted["value_instr"] == D("2000") and trusted["value_base"] == D("2200")
    assert calc["instrument_currency"] == "USD"
    assert calc["value_instr"] == D("1000") and calc["value_base"] == D("1000")
    assert _total(s, 0) == D("2200") and _total(s, 1) == D("1000")


def test_missing_price_flagged_even_with_trusted_value_and_zero_quantity(scenario):
    """§6.2 step 1 / §8 item 5."""
    s = scenario(
        valuation_mode="TRUST_SNAPSHOT",
        positions=[
            {"instrument_id": "MV", "quantity": "10", "market_value": "500", "market_value_currency": "USD"},
            ("Z", "0"),
            ("P", "1"),
        ],
        cash=[("USD", "500")],
        prices=[("P", "100", "USD")],
    )
    assert s.dq_items(s.before.dq, "price_missing") == ["MV", "Z"]
    p = _pos(s)
    assert p["MV"]["value_base"] == D("500")  # trusted value still counts
    assert p["MV"]["price"] is None
    assert p["Z"]["value_base"] == D("0")
    assert _total(s) == D("1100")


def test_missing_price_values_at_zero_in_base_currency(scenario):
    s = scenario(positions=[("X", "10")], cash=[("USD", "100")])
    p = _pos(s)["X"]
    assert p["value_base"] == D("0")
    assert p["instrument_currency"] == "USD"
    assert s.dq_items(s.before.dq, "price_missing") == ["X"]
    assert s.dq_items(s.before.dq, "fx_missing") == []


def test_missing_fx_for_position_and_each_cash_row(scenario):
    s = scenario(
        positions=[("JP", "10")],
        cash=[("USD", "100"), ("JPY", "5000"), ("EUR", "10")],
        prices=[("JP", "1000", "JPY")],
        # no JPY/USD or USD/JPY; EUR only via a zero rate (= missing); no triangulation via EUR
        fx=[("EUR/USD", "0"), ("JPY/EUR", "0.006")],
    )
    assert _pos(s)["JP"]["value_base"] == D("0")
    assert s.dq_items(s.before.dq, "fx_missing") == ["JPY/USD", "JPY/USD", "EUR/USD"]
    assert _total(s) == D("100")  # foreign cash with a missing rate is left out


def test_zero_total_uses_divisor_one(scenario):
    s = scenario(positions=[("A", "0")], cash=[("USD", "0")], prices=[("A", "100", "USD")])
    t = s.before.totals.to_dicts()[0]
    assert t["total_value"] == D(0) and t["divisor"] == D(1)
    assert _pos(s)["A"]["weight"] == D(0)


def test_a_total_too_small_to_divide_by_uses_divisor_one(scenario):
    """3 USD at SGD/USD 1.5 is 2.00000000000000000001 SGD in fixed point (1 / 1.5 rounds
    up at 20 decimals) and exactly 2 in the reference's 28 digits: against cash of -2 SGD
    the total is 1E-20 here and 0 there. Divided by it, a weight would be 2E+20, outside
    Decimal(38, 20) (the pass failed); it is taken as the 0 it is in 28 digits, and weights
    divide by 1."""
    s = scenario(base="SGD", positions=[("L", "3")], cash=[("SGD", "-2")], prices=[("L", "1", "USD")], fx=[("SGD/USD", "1.5")])
    t = s.before.totals.to_dicts()[0]
    assert t["total_value"] == 0 and t["divisor"] == D(1)
    assert _pos(s)["L"]["weight"] == D("2.00000000000000000001")
    assert _alloc(s, "asset_class")["CASH"] == (D(-2), D(-2))


def test_a_small_total_that_weights_fit_still_divides(scenario):
    """A total of 0.5 against values of 1.5 and -1: weights 3 and -2, as §6.2 has them."""
    s = scenario(positions=[("A", "1.5")], cash=[("USD", "-1")], prices=[("A", "1", "USD")])
    t = s.before.totals.to_dicts()[0]
    assert t["total_value"] == D("0.5") and t["divisor"] == D("0.5")
    assert _pos(s)["A"]["weight"] == D(3)


def test_attribute_allocation_and_shared_cash_bucket(scenario):
    s = scenario(
        positions=[("A", "10"), ("B", "30"), ("MM", "10")],
        cash=[("USD", "500")],
        prices=[("A", "10", "USD"), ("B", "10", "USD"), ("MM", "10", "USD")],
        shelf=[("A", "APPROVED", "EQUITY"), ("B", "APPROVED", "EQUITY"), ("MM", "APPROVED", "CASH")],
        attributes=[("A", "sector", "TECH"), ("B", "sector", "FI"), ("A", "region", "EU")],
    )
    ac = _alloc(s, "asset_class")
    assert ac["EQUITY"] == (D("400"), D("0.4"))
    assert ac["CASH"] == (D("600"), D("0.6"))  # shelf class "CASH" shares the cash bucket
    sector = _alloc(s, "attribute:sector")
    assert sector == {"TECH": (D("100"), D("0.1")), "FI": (D("300"), D("0.3"))}
    assert _alloc(s, "attribute:region") == {"EU": (D("100"), D("0.1"))}
    inst = _alloc(s, "instrument")
    assert list(inst) == ["A", "B", "MM"]


def test_weights_are_not_rounded(scenario):
    """Golden scenario_304: the CASH weight feeds the rules unrounded (0.50044…)."""
    s = scenario(
        base="SGD",
        positions=[("US_STK", "42")],
        cash=[("SGD", "5636.80000"), ("USD", "32.000")],
        prices=[("US_STK", "100.0", "USD")],
        fx=[("USD/SGD", "1.35")],
    )
    ac = _alloc(s, "asset_class")
    w = ac["CASH"][1]
    assert abs(w - D("0.5004405286343612334801762115")) < D("1e-19")


def test_runs_with_different_base_currencies_share_frames(scenario):
    """The same snapshot valued in USD and in EUR in one book: each run uses its own base."""
    s = scenario(
        runs=[dict(), dict(base="EUR")],
        positions=[("A", "10")],
        cash=[("USD", "100"), ("EUR", "50")],
        prices=[("A", "10", "EUR")],
        fx=[("EUR/USD", "2")],
    )
    assert _total(s, 0) == D("400")  # 100 EUR × 2 + 100 + 50 × 2
    assert _total(s, 1) == D("200")  # 100 + 100 × (1.0 / 2) + 50
    assert _pos(s, 0)["A"]["value_base"] == D("200")
    assert _pos(s, 1)["A"]["value_base"] == D("100")
    assert _alloc(s, "asset_class", 1)["CASH"][0] == D("100")


def test_a_quantity_is_valued_from_all_of_its_28_decimals(scenario):
    """A notional-sized holding of 664.5044112006137322593018796 units at 26.07 is worth
    the reference's 17323.63; read at 20 decimals first the product was
    17323.62999999999999999995, and the after-state total a last digit short put a cash
    weight of exactly the band's 0.05 above it (PENDING_REVIEW where the reference passes)."""
    s = scenario(
        positions=[("N", "664.5044112006137322593018796"), ("W", "3")],
        cash=[("USD", "1823.54")],
        prices=[("N", "26.07", "USD"), ("W", "0.10", "USD")],
        shelf=[("N", "APPROVED"), ("W", "APPROVED")],
    )
    p = _pos(s)
    assert p["N"]["value_instr"] == D("17323.63") and p["W"]["value_instr"] == D("0.3")
    assert _total(s) == D("19147.47")


@given(
    st.decimals(min_value=0, max_value=D("99999"), places=28, allow_nan=False, allow_infinity=False),
    st.decimals(min_value=0, max_value=D("99999"), places=20, allow_nan=False, allow_infinity=False),
)
@settings(max_examples=300, deadline=None)
def test_times_price_matches_the_exact_product_to_the_last_digit(quantity, price):
    """Within the magnitudes it serves (here up to 1e5 × 1e5) a 28-decimal quantity times a
    price lands within half a unit of DEC's last place of the exact product, plus the half
    unit of the 28th decimal that rounding first to 28 decimals can add."""
    frame = pl.DataFrame({"quantity": [quantity], "price": [price]}, schema={"quantity": QTY, "price": DEC})
    value = frame.select(times_price(frame, "quantity", pl.col("price"))).item()
    exact = decimal.Context(prec=80).multiply(quantity, price)
    assert abs(value - exact) <= D("1e-20") * D("0.5") + D("1e-28")


_QUANTITIES = st.one_of(
    st.integers(min_value=0, max_value=99999).map(D),
    st.decimals(min_value=0, max_value=D("99999"), places=28, allow_nan=False, allow_infinity=False),
)


@given(st.lists(st.tuples(_QUANTITIES, st.decimals(min_value=0, max_value=D("99999"), places=6)), min_size=1, max_size=12))
@settings(max_examples=200, deadline=None)
def test_times_price_of_a_row_does_not_depend_on_the_other_rows(rows):
    """The exact product is taken on the rows whose quantity has more than 20 decimals
    alone and put back in place (``numeric.exact_where``): each row's value is the one it
    gets in a frame of its own, whether few rows, many or none take the exact product."""
    frame = pl.DataFrame({"quantity": [q for q, _ in rows], "price": [p for _, p in rows]}, schema={"quantity": QTY, "price": DEC})
    together = frame.select(times_price(frame, "quantity", pl.col("price"))).to_series().to_list()
    alone = [row.select(times_price(row, "quantity", pl.col("price"))).item() for row in frame.iter_slices(1)]
    assert together == alone


_VALUES = st.one_of(
    st.decimals(min_value=D("-1e9"), max_value=D("1e9"), places=20, allow_nan=False, allow_infinity=False),
    st.decimals(min_value=D("-1e17"), max_value=D("1e17"), places=2, allow_nan=False, allow_infinity=False),  # beyond the bounds
    st.none(),
)


@given(st.lists(st.tuples(_VALUES, st.one_of(
    st.decimals(min_value=-2, max_value=2, places=28, allow_nan=False, allow_infinity=False), st.none())), min_size=1, max_size=12))
@settings(max_examples=200, deadline=None)
def test_product_of_all_digits_for_its_frame_is_the_general_product(rows):
    """Given the frame it is for, the product takes the WEIGHT product alone when every row
    fits the bounds; the values are the general expression's whether all rows fit, some
    do or none (totals beyond 1e10, nulls)."""
    from dpm_vec.numeric import VALUE_TIMES_WEIGHT, WEIGHT, product_of_all_digits

    frame = pl.DataFrame({"a": [a for a, _ in rows], "b": [b for _, b in rows]}, schema={"a": DEC, "b": WEIGHT})
    general = frame.select(product_of_all_digits(pl.col("a"), pl.col("b"), VALUE_TIMES_WEIGHT)).to_series()
    for_frame = frame.select(product_of_all_digits(pl.col("a"), pl.col("b"), VALUE_TIMES_WEIGHT, frame)).to_series()
    assert for_frame.equals(general)


def _four_dp(weight: D) -> D:
    return weight.quantize(D("0.0001"), rounding=decimal.ROUND_HALF_EVEN)


def _midpoint_scenario(scenario, third=("Y", "10", "0", "FI"), cash="935"):
    """A CHF holding at EUR/CHF 6 is worth a third of 1,000 EUR, so the total 1,333.33…
    does not terminate; cash of 935 is exactly 0.70125 of it, X's 65 exactly 0.04875, and
    X with the holding (sector TECH, class EQUITY) exactly 0.29875: three 4-dp midpoints.
    ``third``: a third position (id, quantity, EUR price, asset class)."""
    iid, quantity, price, asset_class = third
    return scenario(
        base="EUR",
        positions=[("CH", "100"), ("X", "65"), (iid, quantity)],
        cash=[("EUR", cash)],
        prices=[("CH", "20", "CHF"), ("X", "1", "EUR"), (iid, price, "EUR")],
        fx=[("EUR/CHF", "6")],
        shelf=[("CH", "APPROVED", "EQUITY"), ("X", "APPROVED", "EQUITY"), (iid, "APPROVED", asset_class)],
        attributes=[("CH", "sector", "TECH"), ("X", "sector", "TECH"), (iid, "sector", "FI")],
    )


def _reference_weights():
    """§6.2 in the reference's arithmetic (28 significant digits, half-even): value_base
    of each position, T one running sum over the positions and then the cash."""
    with decimal.localcontext(decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)):
        chf_to_eur = D(1) / D(6)
        values = {"CH": D(100) * D(20) * chf_to_eur, "X": D(65) * D(1), "Y": D(10) * D(0)}
        total = D(0)
        for v in [*values.values(), D(935)]:
            total += v
        equity = D(0) + values["CH"] + values["X"]
        return {
            "positions": {k: v / total for k, v in values.items()},
            "asset_class": {"EQUITY": equity / total, "FI": values["Y"] / total, "CASH": D(935) / total},
            "attribute:sector": {"TECH": equity / total, "FI": values["Y"] / total},
        }


def test_weights_at_a_printed_midpoint_are_decided_in_28_digits(scenario):
    """The JSON door prints state weights at 4 dp. The 20-decimal total here is 1e-20
    high, which puts the cash weight just below 0.70125 (0.7012), where the reference's
    28-digit total puts it just above (0.7013); ``at_printed_midpoints`` gives every
    position and bucket within a hair of a midpoint the reference's 4-dp rounding."""
    s = _midpoint_scenario(scenario)
    expected = _reference_weights()
    assert _four_dp(expected["asset_class"]["CASH"]) == D("0.7013")
    fixed = _alloc(s, "asset_class")
    assert _four_dp(fixed["CASH"][1]) == D("0.7012")  # the fixed point's side of the midpoint, which this corrects

    state = at_printed_midpoints(s.market, s.runs, s.before)
    positions = {r["instrument_id"]: r["weight"] for r in state.positions.to_dicts()}
    assert {k: _four_dp(w) for k, w in positions.items()} == {k: _four_dp(w) for k, w in expected["positions"].items()}
    allocations = state.allocations
    for dimension in ("asset_class", "attribute:sector"):
        got = allocations.filter(pl.col("dimension") == dimension)
        assert {k: _four_dp(w) for k, w in zip(got["key"], got["weight"])} == {k: _four_dp(w) for k, w in expected[dimension].items()}
    instrument = allocations.filter(pl.col("dimension") == "instrument")
    assert {k: _four_dp(w) for k, w in zip(instrument["key"], instrument["weight"])} == {
        k: _four_dp(w) for k, w in expected["positions"].items()
    }
    # values, totals, order and every other column are the state's own
    assert state.positions.drop("weight").equals(s.before.positions.drop("weight"))
    assert state.allocations.drop("weight").equals(s.before.allocations.drop("weight"))


def test_weights_away_from_a_printed_midpoint_are_left_alone(scenario):
    s = scenario(
        base="EUR",
        positions=[("CH", "100")],
        cash=[("EUR", "1000")],
        prices=[("CH", "20", "CHF")],
        fx=[("EUR/CHF", "6")],
        shelf=[("CH", "APPROVED", "EQUITY")],
    )
    assert at_printed_midpoints(s.market, s.runs, s.before) is s.before


def test_a_cash_bucket_shared_with_a_literal_cash_class_is_decided_in_28_digits_too(scenario):
    """Positions of a shelf asset class CASH share the cash bucket (§6.2): their sum plus
    the cash's, here 10 + 925 = 935 of 1,333.33…, the 0.70125 midpoint again."""
    shared = _midpoint_scenario(scenario, third=("MM", "10", "1", "CASH"), cash="925")
    assert _four_dp(_alloc(shared, "asset_class")["CASH"][1]) == D("0.7012")  # the fixed point's side
    state = at_printed_midpoints(shared.market, shared.runs, shared.before)
    classes = state.allocations.filter(pl.col("dimension") == "asset_class")
    weights = {k: _four_dp(w) for k, w in zip(classes["key"], classes["weight"])}
    assert weights == {"EQUITY": _four_dp(_reference_weights()["asset_class"]["EQUITY"]), "CASH": D("0.7013")}


def test_near_printed_midpoint_reads_a_hair_either_side_and_any_size():
    weights = ["0.70125", "0.70124999999999999999", "0.701250000001", "0.7012500000011", "-0.04875", "0.7012", "0.70126",
               "123456789012345678.5", "-99999999999999999.99995"]
    frame = pl.DataFrame({"weight": [D(w) for w in weights]}, schema={"weight": DEC})
    near = frame.select(near_printed_midpoint(pl.col("weight"))).to_series().to_list()
    assert near == [True, True, True, False, True, False, False, False, False]


def test_a_weight_below_a_tenth_is_rounded_from_28_significant_digits(scenario):
    """162 CHF at EUR/CHF 6 is 27.00000000000000000000000001 EUR in the reference's
    arithmetic, 0.05625000000000000000000000002 of 480: just above the midpoint, 0.0563.
    At 28 decimals that weight reads as the midpoint itself, which half-even takes down."""
    s = scenario(
        base="EUR",
        positions=[("CH", "81"), ("X", "52")],
        cash=[("EUR", "193")],
        prices=[("CH", "2", "CHF"), ("X", "5", "EUR")],
        fx=[("EUR/CHF", "6")],
        shelf=[("CH", "APPROVED", "EQUITY"), ("X", "APPROVED", "EQUITY")],
    )
    with decimal.localcontext(decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)):
        reference = D(162) * (D(1) / D(6)) / (D(0) + D(162) * (D(1) / D(6)) + D(260) + D(193))
    assert _four_dp(reference) == D("0.0563")
    state = at_printed_midpoints(s.market, s.runs, s.before)
    weights = {r["instrument_id"]: _four_dp(r["weight"]) for r in state.positions.to_dicts()}
    assert weights["CH"] == D("0.0563")
    instrument = state.allocations.filter(pl.col("dimension") == "instrument")
    assert {k: _four_dp(w) for k, w in zip(instrument["key"], instrument["weight"])}["CH"] == D("0.0563")
