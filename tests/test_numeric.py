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

