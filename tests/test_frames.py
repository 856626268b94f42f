"""Row-order and code-list helpers the stages share."""
from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpm_vec.codes import with_code_lists
from dpm_vec.frames import (concat_by_run, is_ordered, join_on_index, join_runs, position_in_run, put_rows, rows_of_runs, rows_where, sort_rows,
                            without_runs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from(["a", "b", "c"])), max_size=12))
def test_is_ordered_matches_a_real_sort(rows):
    frame = pl.DataFrame(rows, schema={"run": pl.UInt32, "seq": pl.Int64, "key": pl.String}, orient="row")
    for by in (("run",), ("run", "seq"), ("run", "key"), ("run", "seq", "key")):
        assert is_ordered(frame, *by) == frame.select(*by).equals(frame.select(*by).sort(*by)), (rows, by)


def test_sort_rows_sorts_only_when_needed():
    frame = pl.DataFrame({"run": [1, 0, 0], "seq": [0, 2, 1], "v": ["x", "y", "z"]})
    assert sort_rows(frame, "run", "seq")["v"].to_list() == ["z", "y", "x"]
    done = sort_rows(frame, "run", "seq")
    assert sort_rows(done, "run", "seq") is done
    # the first key is flagged sorted, so group-bys over it slice instead of hashing
    assert done["run"].flags["SORTED_ASC"] and not frame["run"].flags["SORTED_ASC"]
    ordered = pl.DataFrame({"run": [0, 0, 1], "seq": [1, 2, 0]})
    assert sort_rows(ordered, "run", "seq")["run"].flags["SORTED_ASC"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=20), st.lists(st.integers(0, 7), max_size=4))
def test_without_runs_is_the_anti_join_in_row_order(frame_runs, dropped):
    """The rows of every run but the dropped ones (repeated runs among them allowed), in
    the frame's order; with none dropped, the frame itself."""
    frame = pl.DataFrame({"run": frame_runs, "i": list(range(len(frame_runs)))}, schema={"run": pl.UInt32, "i": pl.Int64})
    runs = pl.DataFrame({"run": dropped, "other": [0] * len(dropped)}, schema={"run": pl.UInt32, "other": pl.Int64})
    kept = without_runs(frame, runs)
    assert kept["i"].to_list() == [i for i, run in enumerate(frame_runs) if run not in dropped]
    assert kept.columns == frame.columns
    if not dropped:
        assert kept is frame


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(-3, 3)), max_size=20))
def test_rows_where_is_the_filter_of_the_chosen_columns(values):
    """The chosen columns (names and expressions) of the rows where the predicate holds, in
    order: a null predicate drops its row, as a filter does, and no helper column is left."""
    frame = pl.DataFrame({"v": values, "i": list(range(len(values))), "wide": ["x"] * len(values)},
                         schema={"v": pl.Int64, "i": pl.Int64, "wide": pl.String})
    picked = rows_where(frame, pl.col("v") > 0, "i", (pl.col("v") * 2).alias("twice"))
    assert picked.columns == ["i", "twice"]
    assert picked.rows() == [(i, 2 * v) for i, v in enumerate(values) if v is not None and v > 0]


def test_code_lists_keep_row_order_and_pick_by_case():
    frame = pl.DataFrame({"i": [3, 1, 2, 0], "case": [1, 0, 1, 2]})
    out = with_code_lists(frame, pl.col("case"), [[], ["A"], ["A", "B"]], "codes")
    assert out["i"].to_list() == [3, 1, 2, 0]
    assert out["codes"].to_list() == [["A"], [], ["A"], ["A", "B"]]
    assert out.columns == ["i", "case", "codes"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.integers(0, 8)), max_size=15),
    st.lists(st.integers(0, 5), unique=True, max_size=6),
    st.sampled_from(["dense", "sorted", "any", "repeated", "sparse"]),
)
def test_join_on_index_is_the_order_keeping_join(frame_slots, table_slots, order):
    """Tables of keys 0..k-1 in order take the gather path, other tables of distinct keys
    the index look-up, tables with a repeated key or very sparse keys Polars' join; all
    must give exactly Polars' order-keeping join. Holding slots of model targets not held
    lie beyond the positions table and FX intents have none: those rows come back
    unmatched (left) or dropped (inner), never gathered out of range. ``join_runs`` is the
    same join on ``run``."""
    if order == "dense":
        table_slots = list(range(len(table_slots)))
    elif order == "sorted":
        table_slots = sorted(table_slots)
    elif order == "repeated" and table_slots:
        table_slots = table_slots + table_slots[:1]
    elif order == "sparse":
        table_slots = [slot * 100_000 for slot in table_slots]
    frame = pl.DataFrame({"slot": pl.Series(frame_slots, dtype=pl.UInt32), "row": list(range(len(frame_slots)))})
    table = pl.DataFrame({"slot": pl.Series(table_slots, dtype=pl.UInt32), "value": [f"v{r}" for r in table_slots]})
    for how in ("left", "inner"):
        expected = frame.join(table, on="slot", how=how, maintain_order="left")
        assert join_on_index(frame, table, "slot", how).equals(expected), (how, frame_slots, table_slots)
        by_run = join_runs(frame.rename({"slot": "run"}), table.rename({"slot": "run"}), how)
        assert by_run.equals(expected.rename({"slot": "run"})), (how, frame_slots, table_slots)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=20).map(sorted))
def test_position_in_run_counts_from_zero_in_each_run(runs):
    frame = pl.DataFrame({"run": pl.Series(runs, dtype=pl.UInt32)})
    expected = [sum(1 for earlier in runs[:i] if earlier == r) for i, r in enumerate(runs)]
    assert frame.select(position_in_run().alias("pos"))["pos"].to_list() == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=8).map(sorted), min_size=1, max_size=4))
def test_concat_by_run_merges_run_ordered_parts_keeping_part_order(part_runs):
    """Parts in run order come out in run order, and inside a run the rows keep their
    part's order, left part first (what pl.merge_sorted with maintain_order gives)."""
    parts = [pl.DataFrame({"run": runs, "part": [i] * len(runs), "row": list(range(len(runs)))},
                          schema={"run": pl.UInt32, "part": pl.Int64, "row": pl.Int64})
             for i, runs in enumerate(part_runs)]
    merged = concat_by_run(parts)
    expected = sorted(((r, i, j) for i, runs in enumerate(part_runs) for j, r in enumerate(runs)))
    assert list(merged.iter_rows()) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(-3, 3), st.integers(0, 2**40), st.integers(0, 1)), max_size=25),
    st.sampled_from([("run", "a"), ("run", "a", "tag"), ("run", "big", "a"), ("a", "run")]),
)
def test_sort_rows_is_a_stable_sort_by_the_keys(rows, by):
    """Packed integer keys (negative, wide, several) and the fallbacks give exactly the
    stable sort: rows with equal keys keep their input order (``tag`` is not a key unless
    named, ``row`` never is)."""
    frame = pl.DataFrame(
        [(*r, i) for i, r in enumerate(rows)],
        schema={"run": pl.UInt32, "a": pl.Int8, "big": pl.Int64, "tag": pl.Int32, "row": pl.Int64}, orient="row",
    )
    position = {"run": 0, "a": 1, "big": 2, "tag": 3}
    expected = sorted(frame.iter_rows(), key=lambda r: tuple(r[position[k]] for k in by))
    assert list(sort_rows(frame, *by).iter_rows()) == expected


def test_sort_rows_falls_back_for_nulls_strings_and_ranges_beyond_63_bits():
    frame = pl.DataFrame({"run": [2, 1, None, 1], "key": ["b", "a", "c", "a"], "wide": [2**62, -(2**62), 0, 5], "row": [0, 1, 2, 3]})
    assert sort_rows(frame, "run", "row")["row"].to_list() == [2, 1, 3, 0]  # nulls first, as Polars sorts
    assert sort_rows(frame, "key", "row")["row"].to_list() == [1, 3, 0, 2]
    assert sort_rows(frame, "wide", "row")["row"].to_list() == [1, 2, 3, 0]
    # the full Int64 range needs 64 bits, beyond packing: the fallback sorts it, no overflow
    extremes = pl.DataFrame({"run": [7, 7, 7], "wide": [2**63 - 1, -(2**63), 0], "row": [0, 1, 2]})
    assert sort_rows(extremes, "run", "wide")["row"].to_list() == [1, 2, 0]
    assert sort_rows(extremes, "run", "run")["row"].to_list() == [0, 1, 2]  # no key varies


def test_sort_rows_fallbacks_are_stable_on_large_frames():
    """Keys with nulls or of text take Polars' own sort, which must keep equal keys in
    input order however many rows tie (an unstable sort only shows past a few dozen rows):
    catches a fallback sort that drops ``maintain_order``."""
    n = 4000
    frame = pl.DataFrame({
        "run": [(i * 7919) % 5 for i in range(n)],
        "key": [["b", "a", "c"][(i * 31) % 3] for i in range(n)],
        "seq": [None if i % 11 == 0 else (i * 13) % 3 for i in range(n)],
        "row": list(range(n)),
    }, schema={"run": pl.UInt32, "key": pl.String, "seq": pl.Int64, "row": pl.Int64})
    for by in (("run", "key"), ("run", "seq")):
        position = {"run": 0, "key": 1, "seq": 2}
        expected = sorted(frame.iter_rows(), key=lambda r: tuple((r[position[k]] is not None, r[position[k]] or 0) for k in by))
        assert list(sort_rows(frame, *by).iter_rows()) == expected, by


def test_sort_rows_with_unsigned_64_bit_keys_beyond_int64():
    """UInt64 keys are not packed (their minimum and range need not fit an Int64): keys past
    2**63 sort as numbers, stably, with no cast error."""
    frame = pl.DataFrame({"run": [1, 0, 1, 0], "big": [2**64 - 1, 5, 0, 2**63], "row": [0, 1, 2, 3]},
                         schema={"run": pl.UInt32, "big": pl.UInt64, "row": pl.Int64})
    assert sort_rows(frame, "run", "big")["row"].to_list() == [1, 3, 2, 0]
    assert sort_rows(frame, "big", "run")["row"].to_list() == [2, 1, 3, 0]


def test_put_rows_writes_in_place_in_the_frames_types_and_refuses_what_does_not_fit():
    """The values land at the positions, each column keeps the frame's type, the input frame
    is left as it was, and a value its column's type cannot hold is an error, never a
    silent null (a non-strict cast, or none, would write null)."""
    frame = pl.DataFrame({"run": [0, 0, 1, 2], "qty": [1, 2, 3, 4], "tag": ["a", "b", "c", "d"]},
                         schema={"run": pl.UInt32, "qty": pl.Int32, "tag": pl.String})
    rows = rows_of_runs(frame, pl.DataFrame({"run": [2, 0]}, schema={"run": pl.UInt32}))
    assert rows.to_list() == [0, 1, 3]
    out = put_rows(frame, rows, pl.DataFrame({"qty": [10, 20, 40]}, schema={"qty": pl.Int64}))
    assert out.schema == frame.schema
    assert out["qty"].to_list() == [10, 20, 3, 40] and out["tag"].to_list() == ["a", "b", "c", "d"]
    assert frame["qty"].to_list() == [1, 2, 3, 4]
    with pytest.raises(pl.exceptions.InvalidOperationError):
        put_rows(frame, rows, pl.DataFrame({"qty": [10, 2**40, 40]}, schema={"qty": pl.Int64}))


@pytest.mark.parametrize("table_keys", [[0, 0, 2], [0, 1, 1], [-2, 0, 3], [-1, 2]])
def test_join_on_index_with_repeated_sorted_or_negative_table_keys_is_polars_join(table_keys):
    """A table with a repeated key, even in sorted order, fans a row out as Polars' join
    does (never the plain gather of keys 0..k-1), and a table with negative keys never
    takes the index look-up (a negative key would land in another key's place)."""
    frame = pl.DataFrame({"k": [0, 1, 2, 3, None, 2]}, schema={"k": pl.Int64}).with_row_index("row")
    table = pl.DataFrame({"k": table_keys, "value": [f"v{i}" for i in range(len(table_keys))]}, schema={"k": pl.Int64, "value": pl.String})
    for how in ("left", "inner"):
        expected = frame.join(table, on="k", how=how, maintain_order="left")
        assert join_on_index(frame, table, "k", how).equals(expected), (how, table_keys)


def test_join_on_index_with_a_shared_column_is_polars_join():
    """A column both sides carry (besides the key) comes back as Polars names it (the
    table's with ``_right``), not as a clash of two columns of one name."""
    frame = pl.DataFrame({"slot": [1, 0, 2], "value": ["f1", "f0", "f2"]}, schema={"slot": pl.UInt32, "value": pl.String})
    table = pl.DataFrame({"slot": [0, 1], "value": ["t0", "t1"]}, schema={"slot": pl.UInt32, "value": pl.String})
    for how in ("left", "inner"):
        assert join_on_index(frame, table, "slot", how).equals(frame.join(table, on="slot", how=how, maintain_order="left")), how


def test_concat_by_run_takes_nothing_from_empty_parts():
    """An empty part adds no rows, and neither its extra columns nor its wider types: the
    merge of one frame with empty ones is that frame."""
    part = pl.DataFrame({"run": [0, 1], "qty": [1, 2]}, schema={"run": pl.UInt32, "qty": pl.Int32})
    empty = pl.DataFrame(schema={"run": pl.UInt32, "qty": pl.Int64, "extra": pl.String})
    assert concat_by_run([empty, part, empty]).equals(part)
    assert concat_by_run([empty, empty]).equals(empty)


def test_join_on_index_matches_no_table_row_for_a_negative_frame_key():
    """A negative key of a signed frame is no table row: used as a gather index it wrapped
    around and matched the table's last row."""
    frame = pl.DataFrame({"k": [-1, 0, 1, -2, None]}, schema={"k": pl.Int64})
    table = pl.DataFrame({"k": [0, 1], "v": ["a", "b"]}, schema={"k": pl.Int64, "v": pl.String})
    for how in ("left", "inner"):
        assert join_on_index(frame, table, "k", how).rows() == frame.join(table, on="k", how=how, maintain_order="left").rows()
    assert join_on_index(frame, table, "k", "left")["v"].to_list() == [None, "a", "b", None, None]
