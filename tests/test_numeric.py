"""The fixed point's range guards: values the engine cannot hold are named by portfolio."""
from __future__ import annotations

from decimal import Decimal

import polars as pl
import pytest

from dpm_vec.errors import ValueRangeError
from dpm_vec.numeric import (DEC, largest_magnitude, name_weight_sums_beyond_range, naming_overflows, scientific_text, sums_may_leave_range, units_text,
                             value_range_error, within)

RUNS = pl.DataFrame({"run": [0, 1, 2], "run_key": ["PF_A", "PF_B", "PF_C"]})


def _values(runs: list[int], values: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"run": runs, "value": [Decimal(v) for v in values], "rate": [Decimal("1e6")] * len(runs)},
                        schema={"run": pl.Int64, "value": DEC, "rate": DEC})


def _estimate() -> pl.Expr:
    return pl.col("value").cast(pl.Float64) * pl.col("rate").cast(pl.Float64)


def test_scientific_text_keeps_four_significant_digits():
    values = pl.DataFrame({"x": [1.0549999999999999e18, 9.9996e20, 2.5e-7, -3e18]})
    assert values.select(scientific_text(pl.col("x"))).to_series().to_list() == ["1.055E+18", "1.0E+21", "2.5E-7", "-3.0E+18"]


@pytest.mark.parametrize("dtype, values, expected", [
    (DEC, ["100", "0", "-2500", "100.5", "-12.3400", "0.001"], ["100", "0", "-2500", "100.5", "-12.34", "0.001"]),
    (pl.Decimal(10, 3), ["100", "0", "-2500", "100.5", "0.001"], ["100", "0", "-2500", "100.5", "0.001"]),
    (pl.Decimal(38, 0), ["100", "0", "-2500", "10"], ["100", "0", "-2500", "10"]),  # no point: every zero is a digit
])
def test_units_text_drops_only_the_zeros_after_the_decimal_point(dtype, values, expected):
    frame = pl.DataFrame({"q": [Decimal(v) for v in values]}, schema={"q": dtype})
    assert frame.select(units_text("q"))["q"].to_list() == expected


def test_an_overflow_names_each_run_beyond_the_range_with_its_own_first_value():
    frame = _values([0, 1, 1, 2], ["5", "2e12", "3e12", "7e12"])
    with pytest.raises(ValueRangeError) as caught:
        naming_overflows(lambda: frame.with_columns(pl.col("value") * pl.col("rate")), frame, RUNS, _estimate(),
                         pl.format("the value {}", pl.col("run")))
    assert caught.value.by_run_key == {
        "PF_B": "the value 1 is about 2.0E+18, beyond the engine's fixed-point range (values under 1E18)",
        "PF_C": "the value 2 is about 7.0E+18, beyond the engine's fixed-point range (values under 1E18)",
    }
    assert str(caught.value) == caught.value.by_run_key["PF_B"]
    assert isinstance(caught.value.__cause__, pl.exceptions.ComputeError)


def test_a_failure_no_value_explains_is_left_as_it_was():
    frame = _values([0], ["50"])
    with pytest.raises(pl.exceptions.ComputeError, match="overflow"):  # an overflow the estimate does not see
        naming_overflows(lambda: frame.with_columns(pl.col("value") * pl.lit(Decimal("1e17"), dtype=DEC)), frame, RUNS,
                         _estimate(), pl.lit("x"))
    with pytest.raises(ZeroDivisionError):  # not an overflow at all
        naming_overflows(lambda: 1 / 0, frame, RUNS, pl.lit(1e30), pl.lit("x"))
    assert naming_overflows(lambda: "fits", frame, RUNS, pl.lit(1e30), pl.lit("x")) == "fits"  # checked only on failure


def test_only_a_value_surely_beyond_the_range_is_named():
    assert value_range_error(_values([0], ["999999999999"]), RUNS, _estimate(), pl.lit("x")) is None  # 9.99999999999e17
    assert value_range_error(_values([0], ["1000000000000.001"]), RUNS, _estimate(), pl.lit("x")) is None  # within Float64's doubt
    assert value_range_error(_values([0], ["1000000002000"]), RUNS, _estimate(), pl.lit("x")).by_run_key.keys() == {"PF_A"}


def test_sums_are_checked_only_where_rows_times_the_largest_magnitude_reach_the_range():
    small = _values([0, 1], ["-4e8", "3e8"])
    assert not sums_may_leave_range("value", small, small.head(0))
    assert sums_may_leave_range("value", small, _values([2, 2], ["-5e17", "1"]))  # 4 rows × 5e17
    assert not sums_may_leave_range("value", small.head(0))


def test_within_compares_values_whose_difference_leaves_the_range():
    """|a − b| ≤ eps without the subtraction 9E17 − (−9E17), which overflows DEC: values
    that far apart are simply not within the hair."""
    frame = pl.DataFrame({"a": [Decimal("9e17"), Decimal("1"), Decimal("-4e17")], "b": [Decimal("-9e17"), Decimal("1.00000000000000000001"), Decimal("-4e17")]},
                         schema={"a": DEC, "b": DEC})
    with pytest.raises(pl.exceptions.ComputeError, match="overflow"):
        frame.select(pl.col("a") - pl.col("b"))
    eps = pl.lit(Decimal("0.0000000001"), dtype=DEC)
    assert frame.select(within(pl.col("a"), pl.col("b"), eps).fill_null(False)).to_series().to_list() == [False, True, True]


def test_weights_are_named_by_run_where_their_magnitudes_add_up_to_the_weight_range():
    """WEIGHT holds under 1e10: a run whose weights add up to that in magnitude, negative ones
    too, is named; a run just under it (9.9e9) and the others are not."""
    weights = pl.DataFrame({"run": [0, 0, 1, 1, 2], "weight": [6e9, 3.9e9, 6e9, -4.1e9, 5e9]})
    with pytest.raises(ValueRangeError) as caught:
        name_weight_sums_beyond_range(weights, RUNS, pl.col("weight").abs(), pl.format("the weights of run {}", "run"))
    assert caught.value.by_run_key == {
        "PF_B": "the weights of run 1 is about 1.01E+10, beyond the engine's weight range (weights adding up to under 1E+10)"}
    name_weight_sums_beyond_range(weights.filter(pl.col("run") != 1), RUNS, pl.col("weight").abs(), pl.lit("x"))


def test_the_largest_magnitude_is_read_from_either_end_and_is_zero_without_values():
    assert largest_magnitude("value", _values([0, 1, 2], ["-7e9", "3", "6e9"])) == 7e9
    assert largest_magnitude("value", _values([0], ["5"]), _values([1], ["-2e10"])) == 2e10
    assert largest_magnitude("value", _values([0], ["5"]).clear(), _values([0], ["1"]).with_columns(pl.lit(None, dtype=DEC).alias("value"))) == 0.0



@pytest.mark.parametrize("bounds_name", ["VALUE_TIMES_WEIGHT", "QUANTITY_TIMES_PRICE"])
def test_a_product_past_the_weight_range_keeps_decs_product(bounds_name):
    """Each magnitude pair's product stays under WEIGHT's 1e10: factors just outside a pair
    (5x × y/2, x/2 × 5y for the documented pairs, products of 2.5e10) fit no pair and take
    DEC's product. A bound one decade too wide takes them at 28 decimals, which overflows."""
    from dpm_vec import numeric
    from dpm_vec.numeric import product_of_all_digits

    bounds = getattr(numeric, bounds_name)
    pairs = {"VALUE_TIMES_WEIGHT": [(10**10, 1), (10**9, 10)],
             "QUANTITY_TIMES_PRICE": [(10**10, 1), (10**8, 10**2), (10**5, 10**5), (10**2, 10**8)]}[bounds_name]
    rows = [(Decimal(x) * 5, Decimal(y) / 2) for x, y in pairs] + [(Decimal(x) / 2, Decimal(y) * 5) for x, y in pairs]
    frame = pl.DataFrame({"a": [a for a, _ in rows], "b": [b for _, b in rows]}, schema={"a": DEC, "b": DEC})
    expected = [a * b for a, b in rows]
    assert frame.select(product_of_all_digits(pl.col("a"), pl.col("b"), bounds)).to_series().to_list() == expected
    assert frame.select(product_of_all_digits(pl.col("a"), pl.col("b"), bounds, frame)).to_series().to_list() == expected


def test_times_price_reads_a_quantitys_21st_decimal():
    """A quantity whose only digit past DEC's 20 decimals is the 21st (1.000000000000000000005)
    takes the exact product: 3 × it is 3.000000000000000000015, which rounds half-even to
    …02; read at 20 decimals first the quantity is the tie 1.0 and the value 3. The 28th
    decimal alone (3e-28 × 5e7 = 1.5e-20, half-even 2e-20) counts too."""
    from dpm_vec.numeric import QTY, times_price

    frame = pl.DataFrame({"quantity": [Decimal("1.000000000000000000005"), Decimal("3e-28"), Decimal("7")],
                          "price": [Decimal(3), Decimal("5e7"), Decimal("2.5")]}, schema={"quantity": QTY, "price": DEC})
    assert frame.select(times_price(frame, "quantity", pl.col("price"))).to_series().to_list() == [
        Decimal("3.00000000000000000002"), Decimal("2E-20"), Decimal("17.5")]


def test_within_includes_a_difference_of_exactly_eps():
    """|a − b| ≤ eps, not <: a difference equal to the hair is within it (either order)."""
    frame = pl.DataFrame({"a": [Decimal("1.0000000001"), Decimal("1"), Decimal("1.00000000011")],
                          "b": [Decimal("1"), Decimal("1.0000000001"), Decimal("1")]}, schema={"a": DEC, "b": DEC})
    eps = pl.lit(Decimal("0.0000000001"), dtype=DEC)
    assert frame.select(within(pl.col("a"), pl.col("b"), eps)).to_series().to_list() == [True, True, False]


def test_to_text_is_canonical():
    """JSON decimal text: no exponent, no trailing zeros, and a zero of any sign or scale is
    "0" (a weight of -0.00001 quantized to four places is Decimal("-0.0000"): not "-0")."""
    from dpm_vec.numeric import to_text

    assert [to_text(Decimal(v)) for v in ["1.500", "1E+3", "-0.0000", "0E-20", "-12.340", "0.00010"]] == [
        "1.5", "1000", "0", "0", "-12.34", "0.0001"]
    assert to_text(None) is None


def test_sums_count_the_rows_of_every_frame_and_reach_the_range_at_exactly_1e18():
    """Rows of several frames add up: one row of 6e17 in each of two frames can sum past
    1E18 (neither frame alone can); 2 rows × 5e17 is exactly the range, which counts."""
    assert sums_may_leave_range("value", _values([0], ["6e17"]), _values([1], ["-1"]))
    assert not sums_may_leave_range("value", _values([0], ["6e17"]))
    assert sums_may_leave_range("value", _values([0, 0], ["5e17", "1"]))
    assert not sums_may_leave_range("value", _values([0, 0], ["4.99e17", "1"]))


def test_sums_beyond_the_range_are_named_by_magnitude_against_decs_range():
    """A run of negative values adds up past the range in magnitude (-6e17 twice) and is
    named; a run whose sum is past WEIGHT's 1e10 but far inside DEC's is not."""
    from dpm_vec.numeric import name_sums_beyond_range

    frame = _values([0, 0, 1, 1], ["-6e17", "-6e17", "3e10", "4e10"])
    with pytest.raises(ValueRangeError) as caught:
        name_sums_beyond_range("value", [frame], RUNS, "the sum")
    assert caught.value.by_run_key == {
        "PF_A": "the sum is about 1.2E+18, beyond the engine's fixed-point range (values under 1E18)"}


def test_a_negative_value_beyond_the_range_is_named_too():
    """The estimate's magnitude is compared: -2e12 × 1e6 is -2E18, past the range."""
    error = value_range_error(_values([0, 1], ["-2e12", "5"]), RUNS, _estimate(), pl.format("the value {}", pl.col("run")))
    assert error.by_run_key == {"PF_A": "the value 0 is about -2.0E+18, beyond the engine's fixed-point range (values under 1E18)"}


def test_a_run_sum_is_named_by_its_first_row():
    """``what`` names a run's sum from its first row, not another row of the run."""
    weights = pl.DataFrame({"run": [1, 1, 1], "i": [10, 11, 12], "weight": [6e9, 3e9, 2e9]})
    with pytest.raises(ValueRangeError) as caught:
        name_weight_sums_beyond_range(weights, RUNS, pl.col("weight"), pl.format("the weights from row {}", "i"))
    assert caught.value.by_run_key == {
        "PF_B": "the weights from row 10 is about 1.1E+10, beyond the engine's weight range (weights adding up to under 1E+10)"}


def test_scientific_text_writes_a_zero_exponent_with_a_plus_sign():
    values = pl.DataFrame({"x": [5.0, -9.99949, 0.5]})
    assert values.select(scientific_text(pl.col("x"))).to_series().to_list() == ["5.0E+0", "-9.999E+0", "5.0E-1"]
