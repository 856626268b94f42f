"""The reference's 28-digit cash sums (stages/cash28.py): where their figures come from."""
from __future__ import annotations

from decimal import Decimal as D

import polars as pl
import pytest

from dpm_vec import dec28
from dpm_vec.numeric import AMOUNT_28, DEC
from dpm_vec.stages.cash28 import cash_amounts_f28, wide_sums

CASH = pl.DataFrame({
    "amount": [D("-375243.63842720288038062172"), D("12.5"), D("7.00000000000000000001"), D("3")],
    "amount_exact": [D("-375243.638427202880380621725"), None, D("7.000000000000000000005"), None],
    "settled": [None, D("10"), D("6"), None],
}, schema={"amount": DEC, "amount_exact": AMOUNT_28, "settled": DEC})


def _values(frame: pl.DataFrame, name: str) -> list[D]:
    return [v["z"].scaleb(v["k"]) for v in frame[name]]


def test_a_cash_row_starts_from_the_digits_its_input_had():
    """A fed-back balance's 21st decimal is part of the reference's sums: the F28 amount
    is ``amount_exact`` where the input had it, the DEC amount elsewhere."""
    got = _values(cash_amounts_f28(CASH, "_f"), "_f")
    assert got == [D("-375243.638427202880380621725"), D("12.5"), D("7.000000000000000000005"), D(3)]


def test_the_ladder_takes_a_settled_figure_before_the_amount_digits():
    """§6.15's day 0 is the settled figure where one is given, whatever digits the amount
    had; the amount's own 28 decimals stand where none is."""
    got = _values(cash_amounts_f28(CASH, "_f", settled=True), "_f")
    assert got == [D("-375243.638427202880380621725"), D(10), D(6), D(3)]


def test_cash_without_amount_exact_reads_the_amount():
    got = _values(cash_amounts_f28(CASH.drop("amount_exact"), "_f"), "_f")
    assert got == [D("-375243.63842720288038062172"), D("12.5"), D("7.00000000000000000001"), D(3)]
    assert dec28.F28 == cash_amounts_f28(CASH, "_f").schema["_f"]


def _wide(cash: list[tuple], notionals: list[tuple]) -> dict[tuple, float]:
    cash_rows = pl.DataFrame(cash, schema={"run": pl.UInt32, "currency": pl.String, "amount": DEC}, orient="row")
    intents = pl.DataFrame(notionals, schema={"run": pl.UInt32, "notional_currency": pl.String, "notional": DEC}, orient="row")
    return {(r, c): m for r, c, m in wide_sums(cash_rows, intents).iter_rows()}


def test_a_sum_is_wide_where_its_magnitude_and_finest_digit_span_more_than_28_digits():
    """Cash of -1E-16 beside trades of 1E+13 needs 30 digits (the reference's sum rounds the
    tail away); the same trades beside cents need 16, and 1E+12 with a 16th decimal
    exactly 28 (taken as wide: the bound is kept in hand). Each run's currencies apart."""
    got = _wide(
        [(0, "JPY", D("-1E-16")), (1, "JPY", D("0.01")), (2, "USD", D("1E-16")), (2, "EUR", D("-1E-16")), (3, "USD", D("1E-16"))],
        [(0, "JPY", D("1E13")), (0, "JPY", D("1E13")), (1, "JPY", D("1E13")), (1, "JPY", D("1E13")),
         (2, "USD", D("5E11")), (2, "USD", D("5E11")), (2, "EUR", D("4E11")), (3, "USD", D("9.9E10"))],
    )
    assert set(got) == {(0, "JPY"), (2, "USD")}
    # n additions, each off by at most half a unit of S's 28th digit: n × S × 1E-27
    assert got[(0, "JPY")] == pytest.approx(3 * 2e13 * 1e-27, rel=1e-9)
