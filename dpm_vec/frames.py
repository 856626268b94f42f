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


def join_runs(frame: pl.DataFrame, per_run: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the columns of ``per_run`` (one row per run) beside each row: a left
    join on ``run``. Runs are numbered 0..n-1 (``prepare``), so when ``per_run`` holds
    runs 0..k-1 in order and ``frame`` no other run, row ``r`` of ``per_run`` is run
    ``r`` and the join is a gather, several times cheaper than hashing the keys."""
    runs = per_run["run"]
    dense = (
        per_run.height > 0 and runs.is_sorted() and runs[0] == 0 and runs[-1] == per_run.height - 1
        and frame["run"].null_count() == 0 and (frame.height == 0 or frame["run"].max() < per_run.height)
        and not set(per_run.columns).intersection(frame.columns) - {"run"}
    )
    if not dense:
        return frame.join(per_run, on="run", how="left", maintain_order="left")
    return frame.hstack(per_run.drop("run")[frame["run"]].get_columns())
