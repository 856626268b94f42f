"""The reference's 28-digit cash sums (stages/cash28.py): where their figures come from."""
from __future__ import annotations

from decimal import Decimal as D

import polars as pl

from dpm_vec import dec28
from dpm_vec.numeric import AMOUNT_28, DEC
from dpm_vec.stages.cash28 import cash_amounts_f28

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
