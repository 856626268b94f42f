"""dpm_vec.dec28 agrees exactly with Python's decimal at 28 significant digits, half-even
(the reference's arithmetic, spec §1.1)."""
from __future__ import annotations

import decimal
from decimal import Decimal

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpm_vec import dec28
from dpm_vec.numeric import DEC

CTX = decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)
SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMIT = Decimal(10) ** 9


def _scaled(mantissa: int, places: int) -> Decimal:
    return Decimal(mantissa).scaleb(-places)


# values within ±1e9 with up to 12 decimal places: uniform draws plus short mantissas at
# every scale (0.000000000001, 123.4, …), which hit the normalisation boundaries
decimals_12 = st.one_of(
    st.decimals(min_value=-LIMIT, max_value=LIMIT, places=12, allow_nan=False, allow_infinity=False),
    st.builds(_scaled, st.integers(-10**6, 10**6), st.integers(0, 12)),
    st.builds(_scaled, st.integers(-10**21, 10**21), st.integers(12, 12)).filter(lambda x: abs(x) <= LIMIT),
    st.sampled_from([Decimal(0), Decimal(1), Decimal(-1), Decimal("0.1"), Decimal("0.3"), Decimal("999999999.999999999999"),
                     Decimal("0.000000000001"), Decimal("1000000000"), Decimal("-0.5")]),
)
pairs = st.lists(st.tuples(decimals_12, decimals_12), min_size=1, max_size=40)


def _frame(values: dict[str, list[Decimal]]) -> pl.DataFrame:
    return pl.DataFrame({k: pl.Series(k, v, dtype=DEC) for k, v in values.items()})


def _exact(v: dict | None) -> Decimal | None:
    """F28 struct {z, k} → exact Decimal z × 10^k."""
    if v is None:
        return None
    return v["z"].scaleb(v["k"])


@SETTINGS
@given(pairs)
def test_arithmetic_matches_python_decimal(rows):
    a = [x for x, _ in rows]
    b = [y for _, y in rows]
    df = _frame({"a": a, "b": b})
    df = dec28.from_dec(df, "a", "af")
    df = dec28.from_dec(df, "b", "bf")
    df = dec28.mul(df, "af", "bf", "mul")
    df = dec28.div(df, "af", "bf", "div")
    df = dec28.add(df, "af", "bf", "add")
    df = dec28.sub(df, "af", "bf", "sub")
    out = {c: [_exact(v) for v in df[c].to_list()] for c in ("mul", "div", "add", "sub")}
    for i, (x, y) in enumerate(rows):
        assert out["mul"][i] == CTX.multiply(x, y), ("mul", x, y)
        assert out["add"][i] == CTX.add(x, y), ("add", x, y)
        assert out["sub"][i] == CTX.subtract(x, y), ("sub", x, y)
        if y == 0:
            assert out["div"][i] is None
        else:
            assert out["div"][i] == CTX.divide(x, y), ("div", x, y)


@SETTINGS
@given(pairs)
def test_chained_operations_round_once_per_step(rows):
    """(a × b) / b − a and (a + b) × a: each intermediate rounded to 28 digits like Python."""
    a = [x for x, _ in rows]
    b = [y for _, y in rows]
    df = dec28.from_dec(dec28.from_dec(_frame({"a": a, "b": b}), "a", "af"), "b", "bf")
    df = dec28.mul(df, "af", "bf", "p")
    df = dec28.div(df, "p", "bf", "q")
    df = dec28.add(df, "af", "bf", "s")
    df = dec28.mul(df, "s", "af", "t")
    q = [_exact(v) for v in df["q"].to_list()]
    t = [_exact(v) for v in df["t"].to_list()]
    for i, (x, y) in enumerate(rows):
        assert t[i] == CTX.multiply(CTX.add(x, y), x)
        if y != 0:
            assert q[i] == CTX.divide(CTX.multiply(x, y), y)


@SETTINGS
@given(st.lists(decimals_12, min_size=1, max_size=40))
def test_from_dec_round_trips(values):
    df = dec28.from_dec(_frame({"x": values}), "x", "f")
    df = df.with_columns(dec28.to_dec("f").alias("back"), dec28.sign("f").alias("sgn"))
    assert [_exact(v) for v in df["f"].to_list()] == values
    assert df["back"].to_list() == values
    assert df["sgn"].to_list() == [(v > 0) - (v < 0) for v in values]


@SETTINGS
@given(st.lists(decimals_12.filter(lambda x: abs(x) < LIMIT), min_size=1, max_size=40))
def test_to_d28_round_trips_below_1e9(values):
    df = dec28.from_dec(_frame({"x": values}), "x", "f").with_columns(dec28.to_d28("f").alias("back28"))
    assert df["back28"].to_list() == values


def test_to_d28_round_trips_up_to_1e10():
    values = [Decimal("1000000000"), Decimal("5000000000.5"), Decimal("-9999999999.25")]
    df = dec28.from_dec(_frame({"x": values}), "x", "f").with_columns(dec28.to_d28("f").alias("back28"))
    assert df["back28"].to_list() == values


def test_to_f64_estimates_a_value_to_dec_cannot_hold():
    """A product past DEC's range overflows ``to_dec`` but still has its estimate."""
    df = dec28.from_dec(_frame({"x": [Decimal("9e17"), Decimal("-0.00000000000000000003"), Decimal("0")]}), "x", "f")
    df = dec28.mul(df, "f", "f", "sq")
    estimates = df.select(dec28.to_f64("sq")).to_series().to_list()
    assert [round(v / e, 12) for v, e in zip(estimates[:2], (8.1e35, 9e-40))] == [1.0, 1.0] and estimates[2] == 0.0
    with pytest.raises(pl.exceptions.ComputeError, match="overflow"):
        df.select(dec28.to_dec("sq"))


big = st.builds(_scaled, st.integers(-10**23, 10**23), st.integers(0, 6)).filter(lambda x: abs(x) < Decimal(10) ** 17)


@SETTINGS
@given(st.lists(big, min_size=1, max_size=40))
def test_from_dec_exact_for_large_values(values):
    """Values above 1e9 take from_dec's second path; 24 significant digits are kept exactly."""
    df = dec28.from_dec(_frame({"x": values}), "x", "f")
    assert [_exact(v) for v in df["f"].to_list()] == values


def test_to_dec_keeps_20_decimals_above_1e9():
    values = [Decimal("1234567890.123456789012345678"), Decimal("10000000000000000.0001")]
    df = dec28.from_dec(_frame({"x": values}), "x", "f").with_columns(dec28.to_dec("f").alias("back"))
    assert df["back"].to_list() == values


def test_powers_of_ten_and_their_neighbours():
    """The digit count starts from a float log10, which can land either side of an exact
    power of ten; the exact correction must give every 10^j, and the values one unit of
    the last place either side, their true 28-digit form (DEC in, and sums of D28)."""
    values = []
    for j in range(-12, 18):
        p = Decimal(10) ** j
        values += [p, -p, p - Decimal("1e-20"), p + Decimal("1e-20")]
    values = [v for v in values if abs(v) < Decimal(10) ** 18]
    df = dec28.from_dec(_frame({"x": values}), "x", "f")
    assert [_exact(v) for v in df["f"].to_list()] == [CTX.plus(v) for v in values]
    # sums whose exact value is a power of ten, or one unit of the 28th digit below it
    a = [Decimal("0.5"), Decimal("999999999.5"), Decimal("0.05"), Decimal("0.0999999999999999999999999999")]
    b = [Decimal("0.5"), Decimal("0.5"), Decimal("0.05"), Decimal("0.0000000000000000000000000001")]
    df = dec28.add(dec28.from_dec(dec28.from_dec(_frame({"a": a, "b": b}), "a", "af"), "b", "bf"), "af", "bf", "s")
    assert [_exact(v) for v in df["s"].to_list()] == [CTX.add(x, y) for x, y in zip(a, b)]


def test_null_operands_give_null_results():
    """A null operand (a missing FX rate, say) gives a null result, never a number."""
    df = pl.DataFrame({"a": [Decimal("2.5"), None], "b": [None, Decimal("4")]}, schema={"a": DEC, "b": DEC})
    df = dec28.from_dec(dec28.from_dec(df, "a", "af"), "b", "bf")
    for op in (dec28.mul, dec28.div, dec28.add, dec28.sub):
        out = op(df, "af", "bf", "r").with_columns(dec28.to_dec("r").alias("v"))
        assert out["v"].to_list() == [None, None], op.__name__


def test_known_boundary_cases():
    """§1.1: 0.3 × (0.2 / 0.3) is exactly 0.2 at 28 digits; 100/90 has 28 ones."""
    df = _frame({"a": [Decimal("0.2"), Decimal("100")], "b": [Decimal("0.3"), Decimal("90")]})
    df = dec28.from_dec(dec28.from_dec(df, "a", "af"), "b", "bf")
    df = dec28.div(df, "af", "bf", "q")
    df = dec28.mul(df, "q", "bf", "back")
    q = [_exact(v) for v in df["q"].to_list()]
    assert q == [Decimal("0.6666666666666666666666666667"), Decimal("1.111111111111111111111111111")]
    assert _exact(df["back"][0]) == Decimal("0.2000000000000000000000000000")
    assert dec28.F28 == df.schema["q"]


def test_mul_decides_the_shift_on_the_exact_product():
    """Two 28-digit mantissas whose exact product lies just below 0.1 (…9997 in the 29th
    significant digit's place): rounding it at 28 decimals first would give 0.1 and lose
    a digit; the reference rounds the exact product to 28 significant digits."""
    pairs = [
        (Decimal("0.5000000000000000000000000001"), Decimal("0.1999999999999999999999999999")),
        (Decimal("-0.5000000000000000000000000001"), Decimal("0.1999999999999999999999999999")),
        (Decimal("0.3162277660168379332007330557"), Decimal("0.3162277660168379332007330551")),
    ]
    df = pl.DataFrame({
        "af": [{"z": a, "k": 0} for a, _ in pairs], "bf": [{"z": b, "k": 0} for _, b in pairs],
    }, schema={"af": dec28.F28, "bf": dec28.F28})
    out = [_exact(v) for v in dec28.mul(df, "af", "bf", "p")["p"].to_list()]
    assert out == [CTX.multiply(a, b) for a, b in pairs]
    assert out[0] == Decimal("0.09999999999999999999999999997")


def test_add_keeps_a_tiny_difference_of_near_equal_values():
    """Budget − used after a budget-limited lot: the operands agree in 27 digits, so the
    difference is far below 1e-18 and must still be normalised to its exact value."""
    pairs = [
        (Decimal("1234.567890123456789012345678"), Decimal("-1234.567890123456789012345677")),
        (Decimal("0.1000000000000000000000000001"), Decimal("-0.1")),
        (Decimal("0.5000000000000000000000000003"), Decimal("-0.5000000000000000000000000001")),
        (Decimal("1"), Decimal("-0.9999999999999999999999999999")),  # exponents differ: 1E-28
    ]
    df = pl.DataFrame({
        "af": [{"z": a.scaleb(-a.adjusted() - 1), "k": a.adjusted() + 1} for a, _ in pairs],
        "bf": [{"z": b.scaleb(-b.adjusted() - 1), "k": b.adjusted() + 1} for _, b in pairs],
    }, schema={"af": dec28.F28, "bf": dec28.F28})
    out = [_exact(v) for v in dec28.add(df, "af", "bf", "s")["s"].to_list()]
    assert out == [CTX.add(a, b) for a, b in pairs]
    assert out[1] == Decimal("1E-28")


def _f28(x: Decimal) -> dict:
    return {"z": x.scaleb(-x.adjusted() - 1), "k": x.adjusted() + 1}


# a 28-digit mantissa and an addend 9-40 decades below it whose digits sit at, just past or
# just short of half a unit of the sum's 28th digit: where a cut before the sum's rounding
# would make a tie that the exact sum does not have
far_pairs = st.builds(
    lambda head, sign, gap, tail, below: (
        Decimal(head).scaleb(-27),
        sign * (Decimal(5) + Decimal(tail).scaleb(-below)).scaleb(-gap),
    ),
    # a gap of 28: the addend's 5 is half a unit of the 1-10 mantissa's 28th digit
    st.integers(10**27, 10**28 - 1), st.sampled_from([1, -1]), st.one_of(st.sampled_from([27, 28, 29]), st.integers(9, 40)),
    st.sampled_from([0, 1, -1, 7, 10**27 - 1]), st.integers(1, 27),
)


@SETTINGS
@given(st.lists(far_pairs, min_size=1, max_size=30))
def test_add_rounds_once_across_a_wide_exponent_gap(pairs):
    pairs = [(a, CTX.plus(b)) for a, b in pairs]  # the addend as the reference holds it: 28 digits
    df = pl.DataFrame({"af": [_f28(a) for a, _ in pairs], "bf": [_f28(b) for _, b in pairs]}, schema={"af": dec28.F28, "bf": dec28.F28})
    out = [_exact(v) for v in dec28.add(df, "af", "bf", "s")["s"].to_list()]
    assert out == [CTX.add(a, b) for a, b in pairs]
    flipped = [_exact(v) for v in dec28.add(df, "bf", "af", "s")["s"].to_list()]
    assert flipped == out


def test_add_sees_digits_past_the_sum_at_a_would_be_tie():
    """1 + 5.000000000000000000000000001E-28: past half a unit of the sum's last digit, so
    it rounds up; cutting the addend at 28 decimals first made it a tie, which rounded down."""
    a, b = Decimal(1), Decimal("5.000000000000000000000000001E-28")
    df = pl.DataFrame({"af": [_f28(a)], "bf": [_f28(b)]}, schema={"af": dec28.F28, "bf": dec28.F28})
    assert _exact(dec28.add(df, "af", "bf", "s")["s"][0]) == Decimal("1.000000000000000000000000001") == CTX.add(a, b)


def test_empty_columns_stay_empty():
    """Constants broadcast against the operands: an empty column must not become one row."""
    df = pl.DataFrame({"a": [], "b": []}, schema={"a": DEC, "b": DEC})
    df = dec28.from_dec(dec28.from_dec(df, "a", "af"), "b", "bf")
    for op in (dec28.mul, dec28.div, dec28.add, dec28.sub):
        out = op(df, "af", "bf", "r")
        assert out.height == 0 and out.schema["r"] == dec28.F28, op.__name__


def test_group_sums_round_each_addition_like_pythons_sum():
    """0.6…01 + 0.4 is 1.000…0001 exactly (29 digits) but 1 in 28 digits: the sum of a
    group is the reference's left-to-right sum, not the exact one; groups come out sorted."""
    values = [("b", "0.6000000000000000000000000001"), ("a", "5"), ("b", "0.4"), ("b", "0.0000000000000000000000000004"),
              ("a", "-0.25"), ("c", "0")]
    df = pl.DataFrame({"g": [g for g, _ in values], "v": pl.Series([Decimal(v) for _, v in values], dtype=dec28.D28)})
    out = dec28.group_sums(dec28.from_dec(df, "v", "vf"), "g", "vf", "s")
    assert out["g"].to_list() == ["a", "b", "c"]
    assert [_exact(v) for v in out["s"].to_list()] == [Decimal("4.75"), Decimal(1), Decimal(0)]


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 5), decimals_12), min_size=1, max_size=60))
def test_group_sums_match_a_sequential_decimal_sum(rows):
    df = pl.DataFrame({"g": [g for g, _ in rows], "v": pl.Series([v for _, v in rows], dtype=DEC)})
    df = dec28.from_dec(df, "v", "vf")
    expected: dict[int, Decimal] = {}
    for g, f in zip(df["g"], df["vf"].to_list()):
        expected[g] = CTX.add(expected.get(g, Decimal(0)), _exact(f))
    out = dec28.group_sums(df, "g", "vf", "s")
    assert dict(zip(out["g"], (_exact(v) for v in out["s"].to_list()))) == expected


def _f28_column(values: list[Decimal | None]) -> pl.Series:
    """28-digit Decimals (or None) as an F28 column, normalised like dec28 builds them."""
    def struct(v: Decimal | None) -> dict | None:
        if v is None:
            return None
        if v == 0:
            return {"z": Decimal(0), "k": 0}
        return {"z": v.scaleb(-v.adjusted() - 1), "k": v.adjusted() + 1}
    return pl.Series("vf", [struct(v) for v in values], dtype=dec28.F28)


# 28-digit values of any magnitude and sign (products through inverse rates look like
# this), values exactly half a grid unit of a 1e9-sized sum (half-even ties, decided by
# the sum's last digit), values that carry a sum into the next decade or cancel it
full_28 = st.builds(lambda m, e: CTX.plus(Decimal(m).scaleb(e)), st.integers(-(10**28) + 1, 10**28 - 1), st.integers(-45, 5))
ties_and_edges = st.sampled_from([Decimal(v) for v in (
    "1234567890.123456789012345678", "1234567890.123456789012345677", "5E-19", "-5E-19", "1.5E-18", "2.5E-18",
    "9999999999.999999999999999999", "0.0000000000000000000000000001", "-1234567890.123456789012345678", "0", "1", "-1",
    "0.5", "4.999999999999999999999999999", "99999.99999999999999999999999",
)])
long_groups = st.lists(st.tuples(st.integers(0, 2), st.one_of(full_28, ties_and_edges, decimals_12)), min_size=1, max_size=300)


@SETTINGS
@given(long_groups)
def test_group_sums_of_28_digit_values_match_a_sequential_decimal_sum(rows):
    """Long groups of full 28-digit values: the sums cross decades, tie at half a grid unit
    and cancel to 0, where a pass of whole-grid additions must stop and add one row alone."""
    df = pl.DataFrame([pl.Series("g", [g for g, _ in rows]), _f28_column([v for _, v in rows])])
    expected: dict[int, Decimal] = {}
    for g, v in rows:
        expected[g] = CTX.add(expected.get(g, Decimal(0)), v)
    out = dec28.group_sums(df, "g", "vf", "s")
    assert out["g"].to_list() == sorted(expected)
    assert dict(zip(out["g"], (_exact(v) for v in out["s"].to_list()))) == expected


def test_sums_by_keeps_apart_keys_whose_texts_join_alike():
    """("a|b", "c") and ("a", "b|c") are two attribute buckets, however their texts join."""
    df = pl.DataFrame({"run": [0, 0, 0, 1], "attribute": ["a|b", "a", "a|b", "a|b"], "value": ["c", "b|c", "c", "c"],
                       "x": [Decimal("1"), Decimal("2"), Decimal("4"), Decimal("8")]}, schema_overrides={"x": DEC})
    out = dec28.sums_by(dec28.from_dec(df, "x", "xf"), ["run", "attribute", "value"], "xf", "s")
    assert sorted((r["run"], r["attribute"], r["value"], _exact(r["s"])) for r in out.iter_rows(named=True)) == [
        (0, "a", "b|c", Decimal(2)), (0, "a|b", "c", Decimal(5)), (1, "a|b", "c", Decimal(8))]


def test_group_sums_tie_is_broken_by_the_running_sum():
    """…678 + 5E-19 ties between …678 and …679 (grid 1E-18): half-even keeps …678; the
    sum one unit higher, …679, goes up to …680. Adding the rounded value alone would give
    …679 or …680 for both. A sum that falls out of its decade rounds on the finer grid
    below it (1.0…01 − 1.3E-27 is 0.9…97, not 1). A null value makes only its own group's
    sum null."""
    rows = [(0, "1234567890.123456789012345678"), (0, "5E-19"), (1, "1234567890.123456789012345679"), (1, "5E-19"),
            (2, "1"), (2, None), (3, "1.000000000000000000000000001"), (3, "-1.3E-27")]
    df = pl.DataFrame([pl.Series("g", [g for g, _ in rows]), _f28_column([None if v is None else Decimal(v) for _, v in rows])])
    out = dec28.group_sums(df, "g", "vf", "s")
    assert [_exact(v) for v in out["s"].to_list()] == [
        Decimal("1234567890.123456789012345678"), Decimal("1234567890.123456789012345680"), None,
        Decimal("0.9999999999999999999999999997"),
    ]


def test_group_sums_of_a_long_group_round_where_the_sum_grows():
    """500 values of 28 digits (an inverse rate's products): the sum's grid coarsens as it
    grows a decade, and each later addition rounds there, as Python's sum does."""
    values = [CTX.multiply(Decimal(1000 + 37 * i), CTX.divide(Decimal(1), Decimal("1.0873"))) for i in range(500)]
    df = pl.DataFrame([pl.Series("g", [0] * 500), _f28_column(values)])
    expected = Decimal(0)
    for v in values:
        expected = CTX.add(expected, v)
    exact = Decimal(0)
    for v in values:
        exact = decimal.Context(prec=100).add(exact, v)
    assert CTX.plus(exact) != expected  # the exact sum, rounded once, differs in its last digit
    assert _exact(dec28.group_sums(df, "g", "vf", "s")["s"][0]) == expected


def test_null_tests_see_an_unmatched_row_of_a_left_join_against_a_chunked_column():
    """Polars 2.1's left join against an F28 column held in two chunks (a concat) leaves
    an unmatched row's fields null under a struct that is not: ``pl.coalesce`` kept that
    empty value and a near-integer trade lost its target weight in a batch of requests
    (golden scenario_01 run beside 429 others had no intents). ``dec28`` tests the value."""
    def part(slots, value):
        frame = dec28.from_dec(pl.DataFrame({"slot": slots, "v": [Decimal(value)] * len(slots)}, schema={"slot": pl.UInt32, "v": DEC}), "v", "w")
        return frame.select("slot", "w")
    table = pl.concat([part([2, 5], "0.2"), part([6], "0.6")])
    rows = dec28.from_dec(pl.DataFrame({"slot": [1, 2, 7], "v": [Decimal("0.9")] * 3}, schema={"slot": pl.UInt32, "v": DEC}), "v", "own")
    joined = rows.join(table, on="slot", how="left", maintain_order="left")
    assert joined.select(dec28.is_null("w")).to_series().to_list() == [True, False, True]
    coalesced = joined.with_columns(dec28.coalesce("w", "own"))
    assert coalesced.select(dec28.to_dec("w")).to_series().to_list() == [Decimal("0.9"), Decimal("0.2"), Decimal("0.9")]
    filled = joined.with_columns(dec28.fill_null("w", dec28.zero()))
    assert filled.select(dec28.to_dec("w")).to_series().to_list() == [0, Decimal("0.2"), 0]


@SETTINGS
@given(pairs)
def test_rounded_rounds_the_28_digit_value_once(rows):
    """rounded(x / y, 2) is Python's 28-digit quotient quantized to cents, half-even."""
    rows = [(x, y) for x, y in rows if y != 0 and abs(CTX.divide(x, y)) < Decimal(10) ** 17]
    if not rows:
        return
    df = dec28.from_dec(dec28.from_dec(_frame({"x": [x for x, _ in rows], "y": [y for _, y in rows]}), "x", "xf"), "y", "yf")
    df = dec28.rounded(dec28.div(df, "xf", "yf", "q"), "q", 2, "cents")
    expected = [CTX.divide(x, y).quantize(Decimal("0.01"), rounding=decimal.ROUND_HALF_EVEN) for x, y in rows]
    assert df["cents"].to_list() == expected


def test_rounded_does_not_round_twice():
    """3 / 200.00000000000000000001 is 0.014999…99925 in 28 digits: 0.01. Rounded to 20
    decimals first it becomes 0.015, which half-even takes to 0.02."""
    df = dec28.from_dec(dec28.from_dec(_frame({"x": [Decimal(3)], "y": [Decimal("200.00000000000000000001")]}), "x", "xf"), "y", "yf")
    df = dec28.rounded(dec28.div(df, "xf", "yf", "q"), "q", 2, "once").with_columns(dec28.to_dec("q").round(2).alias("twice"))
    assert df["once"].to_list() == [Decimal("0.01")] and df["twice"].to_list() == [Decimal("0.02")]


def _f28_frame(values: list[Decimal | None]) -> pl.DataFrame:
    """An F28 column ``v`` holding exactly ``values`` (28 significant digits each)."""
    rows = [None if v is None else {"z": v.scaleb(-v.adjusted() - 1), "k": v.adjusted() + 1} if v else {"z": Decimal(0), "k": 0}
            for v in values]
    return pl.DataFrame({"v": rows}, schema={"v": dec28.F28})


def _near_ties(draw_units: int, places: int, exponent: int, offset: int) -> Decimal:
    """A 28-significant-digit value ``offset`` units of its last digit from the tie
    (units + ½) × 10^-places, scaled by 10^exponent (0 or below: the tie at ``places``)."""
    tie = (Decimal(draw_units) + Decimal("0.5")).scaleb(-places)
    last = Decimal(1).scaleb(tie.adjusted() - 27)
    return CTX.plus(tie + offset * last).scaleb(exponent) if exponent else CTX.plus(tie + offset * last)


@SETTINGS
@given(st.lists(st.one_of(
    st.builds(_near_ties, st.integers(0, 999), st.integers(0, 8), st.just(0), st.integers(-3, 3)),
    st.builds(lambda m, e: CTX.plus(Decimal(m).scaleb(e)), st.integers(-10**28 + 1, 10**28 - 1), st.integers(-40, -16)),
), min_size=1, max_size=30), st.sampled_from([0, 2, 4, 8]))
def test_rounded_matches_quantize_at_every_magnitude(values, places):
    """Every 28-digit value, most of them a few last-digit units either side of a tie and
    many below 0.1 (where the 28 digits run past D28's 28 decimals), rounds as Python's
    ``quantize`` rounds it, half-even."""
    values = [v for v in values if abs(v) < Decimal(10) ** 12]
    if not values:
        return
    got = dec28.rounded(_f28_frame(values), "v", places, "r")["r"].to_list()
    unit = Decimal(1).scaleb(-places)
    assert got == [v.quantize(unit, rounding=decimal.ROUND_HALF_EVEN) for v in values]


def test_rounded_below_a_tenth_decides_a_tie_by_the_digits_past_28_decimals():
    values = [Decimal("0.005000000000000000000000000001"), Decimal("0.004999999999999999999999999999"),
              Decimal("0.05625000000000000000000000002"), Decimal("-0.05625000000000000000000000002"),
              Decimal("0.005"), Decimal("0.015"), None]
    got = dec28.rounded(_f28_frame(values), "v", 2, "cents")["cents"].to_list()
    assert got == [Decimal("0.01"), Decimal("0.00"), Decimal("0.06"), Decimal("-0.06"), Decimal("0.00"), Decimal("0.02"), None]
    four = dec28.rounded(_f28_frame(values[2:4]), "v", 4, "w")["w"].to_list()
    assert four == [Decimal("0.0563"), Decimal("-0.0563")]


def test_scatter_sets_the_given_rows_and_keeps_the_rest():
    """Values written at positions (nulls included) come back whole; the other rows and the
    frame the values came from are left as they were (Series.scatter writes in place)."""
    frame = dec28.from_dec(pl.DataFrame({"v": [Decimal("1.5"), None, Decimal("-2"), Decimal("0.001")]}, schema={"v": DEC}), "v", "w")
    values = dec28.from_dec(pl.DataFrame({"v": [Decimal("7.25"), Decimal("0.0003")]}, schema={"v": DEC}), "v", "x").get_column("x")
    placed = dec28.scatter(frame, "w", pl.Series([1, 3], dtype=pl.UInt32), values)
    assert placed.select(dec28.to_dec("w")).to_series().to_list() == [Decimal("1.5"), Decimal("7.25"), Decimal("-2"), Decimal("0.0003")]
    assert frame.select(dec28.is_null("w")).to_series().to_list() == [False, True, False, False]
    assert frame.select(dec28.to_dec("w")).to_series().to_list()[3] == Decimal("0.001")


def _normalised(v: dict | None) -> bool:
    """The F28 form: a mantissa in [0.1, 1) (28 significant digits), zero as {0, 0}."""
    return v is None or (v["z"] == 0 and v["k"] == 0) or Decimal("0.1") <= abs(v["z"]) < 1


def test_results_are_normalised_at_powers_of_ten_and_carries():
    """|x| < 10^k with a mantissa in [0.1, 1) is what ``exponent``, ``below_a_tenth`` and
    the sums' grids rely on: an exact power of ten (1e9, 1e17), a value whose rounding
    carries into the next decade (999999999.99999999999999999999 → 1e9), 0.2 × 0.5, 7 / 7,
    x − x and a group summing to 1 must all come out as {0.1…, k} (zero as {0, 0}), not as
    a mantissa of 1 (or a zero with an exponent)."""
    a = [Decimal(v) for v in ("1e9", "1e17", "1e-12", "999999999.99999999999999999999", "10", "0.2", "7", "-3.5")]
    b = [Decimal(v) for v in ("1e9", "1", "1e-12", "0.00000000000000000001", "10", "0.5", "7", "-3.5")]
    df = dec28.from_dec(dec28.from_dec(_frame({"a": a, "b": b}), "a", "af"), "b", "bf")
    for op in (dec28.mul, dec28.div, dec28.add, dec28.sub):
        df = op(df, "af", "bf", op.__name__)
    for column in ("af", "bf", "mul", "div", "add", "sub"):
        assert all(_normalised(v) for v in df[column].to_list()), (column, df[column].to_list())
    assert _exact(df["af"][3]) == Decimal("1e9") and df["af"][3]["k"] == 10
    assert [_exact(v) for v in df["mul"].to_list()][5] == Decimal("0.1") and df["div"][6] == {"z": Decimal("0.1"), "k": 1}
    assert df["sub"].to_list()[0] == {"z": Decimal(0), "k": 0}
    sums = dec28.group_sums(dec28.from_dec(_frame({"v": [Decimal("0.5"), Decimal("0.5"), Decimal("0.25"), Decimal("0.75")]})
                                           .with_columns(g=pl.Series([0, 0, 1, 1])), "v", "vf"), "g", "vf", "s")
    assert sums["s"].to_list() == [{"z": Decimal("0.1"), "k": 1}] * 2
    one = pl.select(dec28.one().alias("o"))
    assert one["o"].to_list() == [{"z": Decimal("0.1"), "k": 1}] and one.select(dec28.to_dec("o")).item() == 1


def test_from_dec_rounds_a_value_above_1e9_to_28_digits_once():
    """A DEC value of 10-18 integer digits has more than 28 significant digits: it is rounded
    once at its 28th. 10^(n−1) + 1 unit + 0.49 unit (a last kept digit of 1, odd) goes down;
    rounded a digit further first it would become the tie …1|5, which half-even takes up."""
    values = []
    for n in range(10, 19):  # built from text: Decimal arithmetic would round them to 28 digits first
        values += [Decimal(f"{(10**27 + 1) * 100 + 49}E{n - 30}"), Decimal(f"-{10**29 + 351}E{n - 30}")]
    assert all(len(v.as_tuple().digits) == 30 for v in values)
    df = dec28.from_dec(_frame({"x": values}), "x", "f")
    assert [_exact(v) for v in df["f"].to_list()] == [CTX.plus(v) for v in values]


def test_from_dec_keeps_d28_values_down_to_its_last_decimal():
    """A D28 value as small as 1e-28 (a fed-back balance's last digit) takes the whole
    scaling into [0.1, 1): 10^27 in exact steps of 10^9, the last one too."""
    values = [Decimal(v) for v in ("1e-28", "-7e-28", "1.5e-27", "1.23e-26", "0.0000000000000000000123456789", "0.5")]
    df = dec28.from_dec(pl.DataFrame({"x": pl.Series(values, dtype=dec28.D28)}), "x", "f")
    assert [_exact(v) for v in df["f"].to_list()] == values
    assert all(_normalised(v) for v in df["f"].to_list())


def test_adding_zero_keeps_every_digit_of_the_other_operand():
    """0 + x is x however far below 1 x lies: an exponent gap past 9 must not cut the
    non-zero operand's digits as if it were the smaller one."""
    xs = [Decimal("1.234567890123456789012345678E-15"), Decimal("-9.876543210987654321098765431E-25"),
          Decimal("1.111111111111111111111111111E-11")]
    zero = {"z": Decimal(0), "k": 0}
    df = pl.DataFrame({"af": [zero] * 3 + [_f28(x) for x in xs], "bf": [_f28(x) for x in xs] + [zero] * 3},
                      schema={"af": dec28.F28, "bf": dec28.F28})
    assert [_exact(v) for v in dec28.add(df, "af", "bf", "s")["s"].to_list()] == xs + xs


def test_add_rounds_a_cut_addend_to_odd_only_where_its_kept_digit_is_even():
    """1.000000000000000000000000001 + 1.000000000000000004999999993E-10: the addend's last
    digit is cut (gap 10) and the kept guard digits end …499999999, already odd: making them
    …500000000 would turn the sum into a tie, which half-even takes up to …002."""
    pairs = [(Decimal("1.000000000000000000000000001"), Decimal("1.000000000000000004999999993E-10")),
             (Decimal("-1.000000000000000000000000001"), Decimal("-1.000000000000000004999999993E-10"))]
    df = pl.DataFrame({"af": [_f28(a) for a, _ in pairs], "bf": [_f28(b) for _, b in pairs]}, schema={"af": dec28.F28, "bf": dec28.F28})
    out = [_exact(v) for v in dec28.add(df, "af", "bf", "s")["s"].to_list()]
    assert out == [CTX.add(a, b) for a, b in pairs] == [Decimal("1.000000000100000000000000001"), Decimal("-1.000000000100000000000000001")]


def test_rounded_accepts_only_0_to_18_places():
    df = _f28_frame([Decimal("1.5")])
    for places in (-1, 19):
        with pytest.raises(ValueError, match="0-18"):
            dec28.rounded(df, "v", places, "r")


def test_floor_absolute_and_below_a_tenth_read_every_magnitude():
    """floor of a non-negative value up to 1e18 (18 integer digits take 10^9 in DEC after
    the 10^9 in D28), |x|, and |x| < 0.1 from the exponent alone."""
    values = [Decimal(v) for v in ("0", "0.5", "1.5", "0.0999", "0.1", "123456789.9", "1000000000.5", "123456789012345678.25",
                                   "999999999999999999.5")]
    df = _f28_frame(values)
    assert df.select(dec28.floor("v")).to_series().to_list() == [Decimal(int(v)) for v in values]
    assert df.select(dec28.below_a_tenth("v")).to_series().to_list() == [False, False, False, True, False, False, False, False, False]
    signed = _f28_frame([Decimal("-2.5"), Decimal("2.5"), Decimal(0), Decimal("-0.05")]).with_columns(dec28.absolute("v").alias("a"))
    assert signed.select(dec28.to_dec("a")).to_series().to_list() == [Decimal("2.5"), Decimal("2.5"), 0, Decimal("0.05")]
    assert signed.select(dec28.below_a_tenth("v")).to_series().to_list() == [False, False, False, True]


def test_from_dec_rounds_a_d28_value_above_1e9_once_from_its_own_digits():
    """A D28 value of 10 integer digits and more than 20 decimals (a hand-written cash
    balance in ``amount_exact``) is rounded once, at its 18th decimal: cast to DEC first it
    was rounded at the 20th and then the 18th, so …001|4999999999 became …002."""
    values = [Decimal(v) for v in ("1000000000.0000000000000000014999999999", "-1000000000.0000000000000000014999999999",
                                   "9999999999.9999999999999999994999999999", "1234567890.1234567890123456785000000001",
                                   "999999999.9999999999999999999500000001", "1000000000.0000000000000000025000000000")]
    df = dec28.from_dec(pl.DataFrame({"x": pl.Series(values, dtype=dec28.D28)}), "x", "f")
    assert [_exact(v) for v in df["f"].to_list()] == [CTX.plus(v) for v in values]
    assert _exact(df["f"][0]) == Decimal("1000000000.000000000000000001")
