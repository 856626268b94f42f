"""The book reader's fault isolation on tiny frames: which rows a sweep shard sets aside,
and what it says about them."""

from __future__ import annotations

from decimal import Decimal

import pandera.polars as pa
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpm_vec.errors import BookError
from dpm_vec.io import _isolate_row_faults, read_portfolio_rows, row_faults_by_run
from dpm_vec.schemas import unique_rows


def _positions(**changes) -> pl.DataFrame:
    frame = pl.DataFrame({
        "portfolio_snapshot_id": ["S1", "S1", "S2", "S3"],
        "instrument_id": ["A", "B", "A", "C"],
        "quantity": [Decimal("10"), Decimal("5"), Decimal("7"), Decimal("1")],
    }, schema_overrides={"quantity": pl.Decimal(38, 28)})
    return frame.with_columns(**changes) if changes else frame


def test_a_clean_table_passes_whole():
    clean, failed = _isolate_row_faults("positions", _positions(), "positions.parquet")
    assert failed.height == 0
    assert clean.select("portfolio_snapshot_id", "instrument_id").rows() == [("S1", "A"), ("S1", "B"), ("S2", "A"), ("S3", "C")]


def test_a_failing_row_takes_its_whole_snapshot_out():
    """One bad row of S1 removes both of S1's rows (a partial portfolio would trade on
    half its holdings); S2 and S3 stay, in file order."""
    bad = _positions(quantity=pl.when(pl.int_range(pl.len()) == 1).then(Decimal(10**9)).otherwise(pl.col("quantity")))
    clean, failed = _isolate_row_faults("positions", bad, "positions.parquet")
    assert clean["portfolio_snapshot_id"].to_list() == ["S2", "S3"]
    assert failed.select("key", "row_key", "input_column", "failed_check").rows() == [("S1", "B", "quantity", "less_than(1000000000)")]


def test_text_that_is_not_a_number_fails_its_cast_and_names_the_value():
    bad = _positions(quantity=pl.Series(["10", "5", "seven", "1"]))
    clean, failed = _isolate_row_faults("positions", bad, "positions.parquet")
    assert clean["portfolio_snapshot_id"].to_list() == ["S1", "S1", "S3"]
    assert clean.schema["quantity"] == pl.Decimal(38, 28)
    assert failed.select("key", "row_key", "failed_check", "value").rows() == [
        ("S2", "A", "castable to Decimal(precision=38, scale=28)", "seven")]


def test_conflicting_duplicates_name_both_rows():
    bad = pl.concat([_positions(), _positions().slice(2, 1).with_columns(pl.col("quantity") + 1)])
    clean, failed = _isolate_row_faults("positions", bad, "positions.parquet")
    assert set(clean["portfolio_snapshot_id"]) == {"S1", "S3"}
    assert failed["input_column"].to_list() == ["(row)", "(row)"] and set(failed["key"]) == {"S2"}


def test_faults_are_listed_once_per_run_that_shares_the_snapshot():
    portfolios = pl.DataFrame({"run_key": ["R1", "R2", "R3"], "portfolio_snapshot_id": ["S2", "S1", "S2"]})
    _, failed = _isolate_row_faults("positions", _positions(quantity=pl.lit(None, dtype=pl.Decimal(38, 28))), "p.parquet")
    by_run = row_faults_by_run(portfolios, failed)
    assert by_run["run_key"].to_list() == ["R1", "R2", "R2", "R3"]  # portfolio order, then row key
    assert by_run.columns == ["run_key", "input_table", "row_key", "input_column", "failed_check", "value"]


def test_bad_options_block_and_fall_back_to_defaults_but_identity_faults_raise(tmp_path):
    book = tmp_path / "book"
    book.mkdir()
    portfolios = pl.DataFrame({
        "portfolio_id": ["P1", "P2", "P3"], "base_currency": ["SGD", "sgd", "USD"], "model_id": ["M", "M", "M"],
        "max_turnover_pct": [Decimal("0.1"), Decimal("0.2"), Decimal("2")],
        "fx_buffer_pct": ["0.02", "0.01", "lots"],
    }, schema_overrides={"max_turnover_pct": pl.Decimal(38, 20)})
    portfolios.write_parquet(book / "portfolios.parquet")
    rows, failed = read_portfolio_rows(book)
    assert rows["input_fault"].to_list() == [None, "INVALID_PORTFOLIO", "INVALID_PORTFOLIO"]
    assert sorted(failed.select("key", "input_column", "value").rows()) == [
        ("P2", "base_currency", "sgd"), ("P3", "fx_buffer_pct", "lots"), ("P3", "max_turnover_pct", "2.00000000000000000000")]
    assert rows["fx_buffer_pct"].to_list() == [Decimal("0.02"), Decimal("0.01"), Decimal("0.01")]  # the default stands in
    assert rows["max_turnover_pct"].to_list()[2] is None  # no limit: the option's default
    assert rows["base_currency"].to_list()[1] == "sgd"  # not an option: kept as given, the run is blocked

    pl.concat([portfolios, portfolios.head(1)]).write_parquet(book / "portfolios.parquet")
    with pytest.raises(BookError, match="multiple_fields_uniqueness|uniqueness"):
        read_portfolio_rows(book)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["S1", "S2", None]), st.sampled_from(["A", "B", ""]), st.integers(0, 2)), max_size=12),
       st.booleans())
def test_unique_rows_fails_the_rows_pandera_unique_fails(rows, collide):
    """The hashed uniqueness check flags exactly the rows Pandera's own ``unique`` flags,
    with the same check name and failure cases, nulls equal to nulls; a forced hash
    collision (every row hashing alike) takes the exact path and changes nothing."""
    frame = pl.DataFrame(rows, schema={"snap": pl.String, "inst": pl.String, "q": pl.Int64}, orient="row")
    columns = {"snap": pa.Column(pl.String, nullable=True), "inst": pa.Column(pl.String), "q": pa.Column(pl.Int64)}

    def cases(schema: pa.DataFrameSchema):
        try:
            schema.validate(frame, lazy=True)
        except pa.errors.SchemaErrors as exc:
            return exc.failure_cases.select("failure_case", "column", "check", "index").rows()
        return []

    expected = cases(pa.DataFrameSchema(columns, unique=["snap", "inst"]))
    with pytest.MonkeyPatch.context() as patch:
        if collide:
            patch.setattr(pl.DataFrame, "hash_rows", lambda self, *a, **k: pl.repeat(0, self.height, dtype=pl.UInt64, eager=True))
        assert cases(pa.DataFrameSchema(columns, checks=[unique_rows(["snap", "inst"])])) == expected
    assert bool(expected) == frame.select("snap", "inst").is_duplicated().any()


def test_a_shared_table_failing_in_two_columns_names_both(tmp_path):
    """read_book's error names every failing column with its own check, not the first
    column with every check."""
    from dpm_vec.generate import generate_book_frames
    from dpm_vec.io import read_book, write_book

    frames = generate_book_frames(3, 5, holdings=(2, 3))
    row = pl.int_range(pl.len())
    frames["prices"] = frames["prices"].with_columns(
        pl.when(row == 3).then(-pl.col("price")).otherwise(pl.col("price")).alias("price"),
        pl.when(row == 4).then(pl.lit("usd")).otherwise(pl.col("currency")).alias("currency"),
    )
    write_book(frames, tmp_path / "book")
    with pytest.raises(BookError) as caught:
        read_book(tmp_path / "book")
    text = str(caught.value)
    assert "prices.parquet: 2 failed check(s) in columns 'price': greater_than_or_equal_to(0); " \
           "'currency': str_matches('^[A-Z]{3}$')" in text
    assert "row 3 (0-based): price -" in text and "row 4 (0-based): currency usd" in text
