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


_PACKABLE = {pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32}


def sort_rows(frame: pl.DataFrame, *by: str) -> pl.DataFrame:
    """``frame`` sorted ascending by ``by``, stable (rows with equal keys keep their order).

    A frame already in order comes back unmoved: frames out of an order-keeping join
    usually are, and the check (~2 ms) is much cheaper than gathering every column again
    (~110 ms for the 1.4M rows of a 25k shard's weight map). Integer keys (run, sequence
    and order columns) are sorted as one packed UInt64 (``_packed_key``); others, keys
    with nulls or keys too wide to pack take Polars' own stable sort. Without nulls the
    first key comes back flagged as sorted."""
    if frame.height < 2:
        return frame
    nulls = frame.select(pl.sum_horizontal(pl.col(key).null_count() for key in by)).item()
    if nulls:
        return frame.sort(list(by), maintain_order=True)
    if not is_ordered(frame, *by):
        packed = _packed_key(frame, by)
        frame = frame.sort(packed if packed is not None else list(by), maintain_order=True)
    elif frame[by[0]].flags["SORTED_ASC"]:
        return frame
    # flagged, group-bys and windows over the first key take contiguous slices instead of
    # hashing it (a sum over run on 1.3M rows: 6 ms instead of 26 ms)
    return frame.with_columns(pl.col(by[0]).set_sorted())


def _packed_key(frame: pl.DataFrame, by: tuple[str, ...]) -> pl.Expr | None:
    """Integer keys without nulls as one UInt64 — each key minus its minimum, in as many
    bits as its range needs — or None when they are not that. Polars sorts several columns
    by encoding rows, which on a 25,000-portfolio shard costs 2-3x more than one packed
    key (1.2M intents: 195 ms vs 84 ms when nearly in order, 379 ms vs 166 ms shuffled)."""
    if len(by) < 2 or any(frame.schema[key] not in _PACKABLE for key in by):
        return None
    stats = frame.select(
        *(pl.col(key).min().cast(pl.Int64).alias(f"min{i}") for i, key in enumerate(by)),
        *(pl.col(key).max().cast(pl.Int64).alias(f"max{i}") for i, key in enumerate(by)),
    ).row(0, named=True)
    bits = [(stats[f"max{i}"] - stats[f"min{i}"]).bit_length() for i in range(len(by))]
    if not any(bits) or sum(bits) > 63:  # 63: every offset (key - min) fits in an Int64 too
        return None
    packed, shift = pl.lit(0, dtype=pl.UInt64), 0
    for i in reversed(range(len(by))):
        if bits[i] == 0:  # a key with one value orders nothing
            continue
        offset = (pl.col(by[i]).cast(pl.Int64) - stats[f"min{i}"]).cast(pl.UInt64)
        packed = packed + offset * pl.lit(1 << shift, dtype=pl.UInt64)
        shift += bits[i]
    return packed


def only_runs(frame: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``frame`` of the ``runs`` (a frame with a ``run`` column), in order."""
    return _keep(frame, pl.col("run").is_in(runs["run"].implode()))


def without_runs(frame: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``frame`` of every run but the ``runs``, in order."""
    return frame if runs.height == 0 else _keep(frame, ~pl.col("run").is_in(runs["run"].implode()))


def _keep(frame: pl.DataFrame, predicate: pl.Expr) -> pl.DataFrame:
    """``frame`` itself when every row keeps (the usual case): a filter, like an anti join,
    moves every column even then (~13 ms for a shard's weight map)."""
    keep = frame.select(predicate).to_series()
    return frame if keep.all() else frame.filter(keep)


def rows_where(frame: pl.DataFrame, predicate: pl.Expr, *columns: str | pl.Expr) -> pl.DataFrame:
    """The ``columns`` (names or expressions) of ``frame``'s rows where ``predicate`` holds,
    in order. Narrowed before the filter, which moves every column it keeps: a step that
    needs a few columns of a shard's wide frames (20-40 columns) picks them first."""
    return frame.select(*columns, predicate.alias("_where")).filter("_where").drop("_where")


def rows_of_runs(frame: pl.DataFrame, runs: pl.DataFrame) -> pl.Series:
    """The positions of ``frame``'s rows of the ``runs`` (a frame with a ``run`` column),
    ascending: with ``put_rows``, a step that concerns a few runs works on their rows
    alone and writes its results back in place."""
    return frame.select(pl.arg_where(pl.col("run").is_in(runs["run"].implode()))).to_series()


def put_rows(frame: pl.DataFrame, rows: pl.Series, values: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the columns of ``values`` (one row per position in ``rows``) written
    at those positions, each cast to ``frame``'s type for it; ``frame`` itself is left as
    it was (``Series.scatter`` works in place, so each column is copied first)."""
    return frame.with_columns(
        frame.get_column(c).clone().scatter(rows, values.get_column(c).cast(frame.schema[c])) for c in values.columns
    )


def join_runs(frame: pl.DataFrame, per_run: pl.DataFrame, how: str = "left") -> pl.DataFrame:
    """``frame`` with the columns of ``per_run`` (at most one row per run) beside each
    row: an order-keeping ``left`` or ``inner`` join on ``run`` (numbered 0..n-1 by
    ``prepare``), by index look-up where it can (``join_on_index``)."""
    return join_on_index(frame, per_run, "run", how)


def join_on_index(frame: pl.DataFrame, table: pl.DataFrame, key: str, how: str = "left") -> pl.DataFrame:
    """``frame`` with the columns of ``table`` (at most one row per ``key``) beside each
    row: an order-keeping ``left`` or ``inner`` join on the integer ``key``; a null key
    matches nothing. Runs and holding slots are dense numbers, so the join is an index
    look-up — a plain gather when ``table`` holds exactly keys 0..k-1 in order, else through
    an array of the table row of each key — several times cheaper than hashing. Tables
    with repeated keys, or keys so sparse that the array would be mostly holes, take
    Polars' join."""
    def polars_join() -> pl.DataFrame:
        return frame.join(table, on=key, how=how, maintain_order="left")

    index, keys = table[key], frame[key]
    if (
        table.height == 0 or frame.height == 0 or index.null_count() or index.min() < 0
        or set(table.columns).intersection(frame.columns) - {key}
    ):
        return polars_join()
    size = int(index.max()) + 1
    if size > 4 * (frame.height + table.height) + 1024:
        return polars_join()
    values = table.drop(key)
    top = keys.max()
    negative = keys.dtype.is_signed_integer() and (keys.min() or 0) < 0
    if negative or (top is not None and top >= size):  # keys below or beyond the table match nothing
        keys = frame.select(pl.when(pl.col(key).is_between(0, size - 1)).then(pl.col(key))).to_series()
    if size == table.height and index[0] == 0 and (size == 1 or index.cast(pl.Int64).diff().min() > 0):  # row k holds key k
        at = keys
    else:
        rows = pl.repeat(None, size, dtype=pl.UInt32, eager=True).scatter(index, pl.int_range(table.height, dtype=pl.UInt32, eager=True))
        if size - rows.null_count() < table.height:  # a repeated key: scattered rows overwrote each other
            return polars_join()
        at = rows.gather(keys)
    if how == "inner" and at.null_count():
        kept = at.is_not_null()
        frame, at = frame.filter(kept), at.filter(kept)
    return frame.hstack(values.select(pl.all().gather(at)).get_columns())


def position_in_run() -> pl.Expr:
    """0-based position of each row inside its run, for frames whose rows are grouped by
    run (sorted): a linear scan, where ``int_range(len).over("run")`` hashes every key."""
    index = pl.int_range(pl.len(), dtype=pl.Int64)
    return index - pl.when(pl.col("run") != pl.col("run").shift(1)).then(index).forward_fill().fill_null(0)


def concat_by_run(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """The rows of ``parts`` as one frame. Parts that each come in run order are merged
    into run order (rows of one run keep their part's order, left part first): a stable
    sort on the one integer key, which on wide frames is ~5x cheaper than
    ``pl.merge_sorted`` (measured on a 10k book's after-state positions: 21 ms vs 107 ms)."""
    parts = [part for part in parts if part.height] or parts[:1]
    merged = pl.concat(parts, how="diagonal_relaxed")
    if len(parts) > 1 and all(is_ordered(part, "run") for part in parts):
        return merged.sort("run", maintain_order=True)
    return merged
