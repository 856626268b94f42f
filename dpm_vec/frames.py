"""Frame helpers the stages share that are about row order, not arithmetic."""

from __future__ import annotations

from functools import reduce

import polars as pl


def is_ordered(frame: pl.DataFrame, *by: str) -> bool:
    """Whether the rows are already in ascending (``by``) order (keys without nulls)."""
    if frame.height < 2:
        return True

    def step(later: pl.Expr, key: str) -> pl.Expr:
        col, prev = pl.col(key), pl.col(key).shift(1)
        return (col > prev) | ((col == prev) & later)

    ascending = reduce(step, reversed(by[:-1]), pl.col(by[-1]) >= pl.col(by[-1]).shift(1))
    return bool(frame.select(ascending.slice(1).all()).item())


def ordered(frame: pl.DataFrame, *by: str) -> pl.DataFrame:
    """``frame`` sorted by ``by``; frames that come out of an order-keeping join already
    are, and a check of the keys is much cheaper than gathering every column again."""
    return frame if is_ordered(frame, *by) else frame.sort(*by)
