"""The book reader's fault isolation on tiny frames: which rows a sweep shard sets aside,
and what it says about them."""

from __future__ import annotations

import errno
import json
import os
from decimal import Decimal
from pathlib import Path

import pandera.polars as pa
import polars as pl
import pyarrow as pa_arrow
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpm_vec.book import conform
from dpm_vec.contract import OPTION_NAMES, _Reader, parse_options
from dpm_vec.errors import BookError, DpmVecError
from dpm_vec.generate import generate_book_frames, write_generated_book
from dpm_vec.io import _conformed, _isolate_row_faults, read_book, read_portfolio_rows, row_faults_by_run, write_book
from dpm_vec.scenarios import load_scenarios
from dpm_vec.schemas import unique_rows
from tests.durability import assert_published_durably, needs_proc, record_publishing


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
    with pytest.raises(BookError, match=r"2 rows share a key \(run_key\), which must be unique .* row 3 \(0-based\): run_key 'P1'"):
        read_portfolio_rows(book)


def test_a_repeated_key_is_named_by_its_key_columns(tmp_path):
    """Two prices for one instrument: the message names the key's columns and each row's
    key values, not a row's JSON cut at 120 characters."""
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    prices = frames["prices"]
    write_book({**frames, "prices": pl.concat([prices, prices.head(1).with_columns(pl.col("price") * 2)])}, tmp_path / "book")
    with pytest.raises(BookError) as caught:
        read_book(tmp_path / "book")
    first = prices.row(0, named=True)
    assert str(caught.value) == (
        f"{tmp_path / 'book' / 'prices.parquet'}: 2 rows share a key (market_snapshot_id, instrument_id), which must be unique "
        "(multiple_fields_uniqueness): a repeated row, or two values for one key; example rows: "
        f"row 0 (0-based): market_snapshot_id {first['market_snapshot_id']!r}, instrument_id {first['instrument_id']!r}; "
        f"row {prices.height} (0-based): market_snapshot_id {first['market_snapshot_id']!r}, instrument_id {first['instrument_id']!r}"
    )


@pytest.mark.parametrize("column", ["max_staleness_minutes", "max_skew_minutes"])
def test_a_negative_time_limit_blocks_its_portfolio_as_at_the_json_door(tmp_path, column):
    """-5 minutes is a 422 at the JSON door; in a book it used to block the portfolio as
    stale or skewed ("more than -5 minutes") with no input fault."""
    book = tmp_path / "book"
    book.mkdir()
    pl.DataFrame({
        "portfolio_id": ["P1", "P2", "P3"], "base_currency": ["SGD"] * 3, "model_id": ["M"] * 3,
        column: [-5, 10**7, 10**7 + 1],
    }, schema_overrides={column: pl.Int32}).write_parquet(book / "portfolios.parquet")
    rows, failed = read_portfolio_rows(book)
    assert rows["input_fault"].to_list() == ["INVALID_PORTFOLIO", None, "INVALID_PORTFOLIO"]
    assert failed.select("key", "input_column", "failed_check", "value").rows() == [
        ("P1", column, "in_range(0, 10000000)", "-5"), ("P3", column, "in_range(0, 10000000)", "10000001")]


def test_a_column_repeated_in_a_file_is_named(tmp_path):
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    write_book(frames, tmp_path / "book")
    file = tmp_path / "book" / "positions.parquet"
    table = pq.read_table(file)
    pq.write_table(pa_arrow.Table.from_arrays([*table.columns, table.column("instrument_id")],
                                              names=[*table.column_names, "instrument_id"]), file)
    with pytest.raises(BookError, match="positions.parquet: column\\(s\\) 'instrument_id' appear more than once; each column may appear once"):
        read_book(tmp_path / "book")


def test_keys_written_as_categories_read_as_text(tmp_path):
    """pandas writes a category column as dictionary-encoded text, Polars a Categorical as
    the same: the book reads as if written as plain text (a holdings table's snapshot ids
    used to fail the shard's join with "datatypes of join keys don't match")."""
    frames = generate_book_frames(20, 5, holdings=(2, 3))
    write_book(frames, tmp_path / "plain")
    coded = {table: frame.with_columns(pl.col(pl.String).cast(pl.Categorical)) for table, frame in frames.items()}
    write_book(coded, tmp_path / "coded")
    assert pq.read_schema(tmp_path / "coded" / "positions.parquet").field("portfolio_snapshot_id").type.value_type == "string"
    expected, got = read_book(tmp_path / "plain").tables(), read_book(tmp_path / "coded").tables()
    for table, frame in expected.items():
        assert got[table].equals(frame, null_equal=True), table
    from dpm_vec.sweep import sweep

    sweep(tmp_path / "coded", tmp_path / "out", shard_size=7, progress=False)
    sweep(tmp_path / "plain", tmp_path / "out_plain", shard_size=7, progress=False)
    for table in ("runs", "intents"):
        assert pl.read_parquet(tmp_path / "out" / table / "*.parquet").equals(pl.read_parquet(tmp_path / "out_plain" / table / "*.parquet"))


def _same_sweep(book: Path, expected: Path, out: Path) -> None:
    from dpm_vec.sweep import sweep

    sweep(book, out, shard_size=7, progress=False)
    for table in ("runs", "intents", "positions_after", "events"):
        assert pl.read_parquet(out / table / "*.parquet").equals(pl.read_parquet(expected / table / "*.parquet")), table


def test_holdings_of_other_encodings_sweep_as_plain_ones(tmp_path):
    """Encodings a bank's own tooling writes give the plain book's answers: holdings whose
    snapshots are interleaved, as dictionary-encoded text (the shards' split joined a
    Categorical key with text); an empty lots table whose columns are Arrow's null type
    (pandas' empty frame; its key joined as null), as the file absent; and as_of
    timestamps labelled with a fixed offset (pandas' ``timezone(timedelta(...))``, on
    which Polars panicked), as the same instants in UTC."""
    from dpm_vec.sweep import sweep

    frames = generate_book_frames(20, 5, holdings=(2, 3))
    write_book(frames, tmp_path / "plain")
    sweep(tmp_path / "plain", tmp_path / "out_plain", shard_size=7, progress=False)

    def interleaved(frame: pl.DataFrame) -> pl.DataFrame:  # each snapshot's own rows keep their order
        return frame.with_columns(pl.int_range(pl.len()).over("portfolio_snapshot_id").alias("_k")).sort(
            "_k", "portfolio_snapshot_id", descending=[False, True], maintain_order=True).drop("_k")

    coded = {table: interleaved(frame) if table in ("positions", "cash", "lots") else frame for table, frame in frames.items()}
    coded = {table: frame.with_columns(pl.col(pl.String).cast(pl.Categorical)) for table, frame in coded.items()}
    write_book(coded, tmp_path / "coded")
    _same_sweep(tmp_path / "coded", tmp_path / "out_plain", tmp_path / "out_coded")

    write_book({table: frame for table, frame in frames.items() if table != "lots"}, tmp_path / "no_lots")
    sweep(tmp_path / "no_lots", tmp_path / "out_no_lots", shard_size=7, progress=False)
    write_book(frames, tmp_path / "null_lots")
    lots = tmp_path / "null_lots" / "lots.parquet"
    pq.write_table(pa_arrow.table({name: pa_arrow.array([], pa_arrow.null()) for name in pq.read_schema(lots).names}), lots)
    _same_sweep(tmp_path / "null_lots", tmp_path / "out_no_lots", tmp_path / "out_null_lots")

    write_book(frames, tmp_path / "offset")
    for table in ("portfolios", "prices"):
        file = tmp_path / "offset" / f"{table}.parquet"
        arrow = pq.read_table(file)
        for index, field in enumerate(arrow.schema):
            if pa_arrow.types.is_timestamp(field.type):
                arrow = arrow.set_column(index, field.name, arrow.column(index).cast(pa_arrow.timestamp("us", "+05:30")))
        pq.write_table(arrow, file)
    assert pq.read_schema(tmp_path / "offset" / "prices.parquet").field("as_of").type.tz == "+05:30"
    assert read_book(tmp_path / "offset").prices.equals(read_book(tmp_path / "plain").prices)
    _same_sweep(tmp_path / "offset", tmp_path / "out_plain", tmp_path / "out_offset")


def test_timestamp_texts_of_mixed_iso_forms_read_as_their_instants(tmp_path):
    """Each ISO 8601 form the docs allow reads as its instant, whatever the column's first
    value: Polars infers one format from it, so a first value without a zone (or a bare
    date) made every later ``...Z`` null, a fault that blocked its portfolio, in the
    shards whose first row it was (a different set of portfolios for each shard size)."""
    from dpm_vec.sweep import sweep

    frames = generate_book_frames(20, 5, holdings=(2, 3))
    write_book(frames, tmp_path / "plain")
    sweep(tmp_path / "plain", tmp_path / "out_plain", shard_size=7, progress=False)
    forms = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S%.3f+00:00", "%Y-%m-%d %H:%M:%S")
    mixed = {}
    for table, frame in frames.items():
        stamps = [name for name, dtype in frame.schema.items() if isinstance(dtype, pl.Datetime)]
        mixed[table] = frame.with_columns(
            pl.coalesce(*(pl.when(pl.int_range(pl.len()) % len(forms) == k).then(pl.col(name).dt.strftime(form)) for k, form in enumerate(forms)))
            .alias(name) for name in stamps)
    assert mixed["portfolios"].schema["portfolio_as_of"] == pl.String and mixed["prices"]["as_of"][1].endswith("Z")
    write_book(mixed, tmp_path / "mixed")
    for table in ("portfolios", "prices"):
        assert getattr(read_book(tmp_path / "mixed"), table).equals(getattr(read_book(tmp_path / "plain"), table)), table
    _same_sweep(tmp_path / "mixed", tmp_path / "out_plain", tmp_path / "out_mixed")


def test_a_timestamp_text_that_is_no_timestamp_names_its_row(tmp_path):
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    prices = frames["prices"].with_columns(pl.col("as_of").cast(pl.String))
    prices = prices.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(pl.lit("yesterday")).otherwise("as_of").alias("as_of"))
    write_book({**frames, "prices": prices}, tmp_path / "book")
    with pytest.raises(BookError) as caught:
        read_book(tmp_path / "book")
    assert str(caught.value) == (
        f"{tmp_path / 'book' / 'prices.parquet'}, column 'as_of': 1 value(s) that are no timestamp (ISO 8601 text such as "
        "2025-06-30T21:00:00Z, with an offset, or none for UTC); example rows: row 1 (0-based): as_of 'yesterday' fails "
        "castable to Datetime(time_unit='us', time_zone='UTC')"
    )


def test_weight_options_beyond_the_weight_range_block_their_portfolio_as_at_the_json_door(tmp_path):
    """single_position_max_weight and min_cash_buffer_pct beyond 10^9 in magnitude are a
    422 at the JSON door (10^9 itself passes); in a book they used to reach the target stage, whose 28-decimal
    weights overflowed, and the sweep halved its shard down to each such portfolio."""
    book = tmp_path / "book"
    book.mkdir()
    pl.DataFrame({
        "portfolio_id": ["P1", "P2", "P3", "P4"], "base_currency": ["SGD"] * 4, "model_id": ["M"] * 4,
        "single_position_max_weight": [Decimal("1000000000"), Decimal("-9E+17"), None, Decimal("0.2")],
        "min_cash_buffer_pct": [Decimal("-1000000000"), Decimal("0"), Decimal("1000000000.5"), Decimal("0.05")],
    }, schema_overrides={c: pl.Decimal(38, 20) for c in ("single_position_max_weight", "min_cash_buffer_pct")}).write_parquet(book / "portfolios.parquet")
    rows, failed = read_portfolio_rows(book)
    assert rows["input_fault"].to_list() == [None, "INVALID_PORTFOLIO", "INVALID_PORTFOLIO", None]
    assert sorted(failed.select("key", "input_column").rows()) == [("P2", "single_position_max_weight"), ("P3", "min_cash_buffer_pct")]
    assert rows["single_position_max_weight"].to_list()[1] is None and rows["min_cash_buffer_pct"].to_list()[2] == 0


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


# --- floats in decimal columns: cast by their shortest text, not their binary expansion

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_book"


def test_a_float_becomes_the_decimal_its_text_shows():
    """88.0 is 88 units (Polars' own cast makes it 87.99999999999999105…, which floors to
    87), 0.1 is 0.1 and 1e-05 is 0.00001 — at 28 decimals and at 20; text the same value
    would be written as casts alike."""
    floats = pl.DataFrame({"portfolio_snapshot_id": ["S"] * 6, "instrument_id": list("ABCDEF"),
                           "quantity": [88.0, 0.1, 1e-05, 2.5e-12, 123456789.123, -0.0],
                           "market_value": [88.0, 0.1, 1e-05, 1e16, 0.30000000000000004, 5e-21]})
    out = conform("positions", floats)
    assert out["quantity"].to_list() == [Decimal(t) for t in ("88", "0.1", "0.00001", "0.0000000000025", "123456789.123", "0")]
    assert out["market_value"].to_list() == [Decimal(t) for t in ("88", "0.1", "0.00001", "1E+16", "0.30000000000000004", "0")]
    as_text = conform("positions", floats.with_columns(pl.col("quantity", "market_value").map_batches(
        lambda s: pl.Series([repr(v) for v in s.to_list()]), return_dtype=pl.String)))
    assert out.equals(as_text)


@pytest.mark.parametrize("source", [pl.String, pl.Decimal(38, 28)])
def test_a_cash_amount_past_20_decimals_keeps_them_in_amount_exact(source):
    """A book whose cash amounts have more decimals than DEC keeps (text, or a finer
    decimal) reads them into ``amount_exact`` at 28 decimals, as the JSON door does; an
    amount DEC holds whole has none, and a book that gives ``amount_exact`` keeps its own."""
    cash = pl.DataFrame({"portfolio_snapshot_id": ["S", "S", "T"], "currency": ["EUR", "USD", "EUR"],
                         "amount": ["-375243.638427202880380621725", "12.5", "0.10000000000000000000000000009"]})
    out = conform("cash", cash.with_columns(pl.col("amount").cast(source)))
    assert out["amount"].to_list() == [Decimal("-375243.63842720288038062172"), Decimal("12.5"), Decimal("0.1")]
    assert out["amount_exact"].to_list() == [Decimal("-375243.638427202880380621725"), None, Decimal("0.1000000000000000000000000001")]
    given = conform("cash", cash.with_columns(pl.lit(None, dtype=pl.Decimal(38, 28)).alias("amount_exact")))
    assert given["amount_exact"].null_count() == 3


def test_a_given_amount_exact_lies_within_half_a_unit_of_amounts_20th_decimal():
    """``amount_exact`` is ``amount`` with more digits: half a unit of the 20th decimal
    either way still rounds to it; a hair more, or a whole unit, is another balance, and
    its row is a fault (the 28-digit cash decisions would start from a number the outputs
    do not show)."""
    cash = pl.DataFrame({
        "portfolio_snapshot_id": ["S1", "S2", "S3", "S4"], "currency": ["EUR"] * 4,
        "amount": pl.Series([Decimal(1), Decimal(1), Decimal(-1), Decimal(1)], dtype=pl.Decimal(38, 20)),
        "amount_exact": pl.Series([Decimal("1.000000000000000000005"), Decimal("0.999999999999999999995"),
                                   Decimal("-1.0000000000000000000050000001"), Decimal("1.00000000000000000001")],
                                  dtype=pl.Decimal(38, 28))})
    clean, failed = _isolate_row_faults("cash", cash, "cash.parquet")
    assert clean["portfolio_snapshot_id"].to_list() == ["S1", "S2"]
    assert failed.select("key", "input_column", "failed_check").rows() == [
        ("S3", "amount_exact", "rounds_to_amount"), ("S4", "amount_exact", "rounds_to_amount")]


@pytest.mark.parametrize("source", [pl.String, pl.Float64])
def test_a_cash_amount_may_be_as_small_as_1e_28(source):
    """A cash balance below DEC's 1E-20 (a result's -2E-22 fed back) is a value, as at the
    JSON door: ``amount`` reads 0 and ``amount_exact`` keeps it; one below 1E-28 would
    be read as 0, a different number, and is a row fault; a price below 1E-20 still is."""
    cash = pl.DataFrame({"portfolio_snapshot_id": ["S1", "S2", "S3"], "currency": ["GBP", "EUR", "USD"],
                         "amount": pl.Series(["-2E-22", "1E-28", "1E-29"]).cast(source)})
    clean, failed = _isolate_row_faults("cash", cash, "cash.parquet")
    assert failed.select("key", "row_key", "value").rows() == [("S3", "USD", "1E-29" if source == pl.String else "1e-29")]
    out = conform("cash", clean)
    assert out["amount"].to_list() == [Decimal(0), Decimal(0)]
    assert out["amount_exact"].to_list() == [Decimal("-2E-22"), Decimal("1E-28")]
    prices = pl.DataFrame({"instrument_id": ["A"], "price": pl.Series(["2E-22"]).cast(source), "currency": ["USD"]})
    with pytest.raises(BookError, match="0 or at least 1E-20"):
        _conformed("prices", prices, "prices.parquet")


def test_a_book_written_with_floats_reads_as_the_decimal_book(tmp_path):
    """Every decimal and integer column of every table stored as float64 (what pandas
    writes, for an integer column with missing values too): the sample book reads to the
    very same frames."""
    floats = tmp_path / "floats"
    floats.mkdir()
    for file in SAMPLE.glob("*.parquet"):
        frame = pl.read_parquet(file)
        frame.with_columns(pl.col(pl.Decimal, pl.Int32).cast(pl.Float64)).write_parquet(floats / file.name)
    assert pl.read_parquet(floats / "positions.parquet").schema["quantity"] == pl.Float64
    assert pl.read_parquet(floats / "shelf.parquet").schema["settlement_days"] == pl.Float64
    expected, got = read_book(SAMPLE).tables(), read_book(floats).tables()
    for table, frame in expected.items():
        assert got[table].equals(frame, null_equal=True), table


def test_a_float_without_a_decimal_value_is_a_row_fault_or_the_files_fault(tmp_path):
    """NaN, an infinity or a float beyond the column's range: one portfolio's holding is
    set aside as a row fault naming the value; in a shared table it stops the read, naming
    file, column and row."""
    bad = _positions(quantity=pl.Series([10.0, float("nan"), float("inf"), 1e12]))
    clean, failed = _isolate_row_faults("positions", bad, "positions.parquet")
    assert clean.height == 0
    assert failed.select("key", "row_key", "failed_check", "value").rows() == [
        ("S1", "B", "castable to Decimal(precision=38, scale=28)", "NaN"),
        ("S2", "A", "castable to Decimal(precision=38, scale=28)", "inf"),
        ("S3", "C", "castable to Decimal(precision=38, scale=28)", "1000000000000.0")]
    # a value that is not 0 but below the column's smallest unit would be read as 0: no value
    # of the column either (1E-28 is a quantity's unit, and 0 is 0)
    tiny = _positions(quantity=pl.Series([1e-29, 1e-28, 0.0, 10.0]))
    clean, failed = _isolate_row_faults("positions", tiny, "positions.parquet")
    assert failed.select("row_key", "failed_check", "value").rows() == [("A", "castable to Decimal(precision=38, scale=28)", "1e-29")]

    frames = generate_book_frames(3, 5, holdings=(2, 3))
    frames["prices"] = frames["prices"].with_columns(
        pl.when(pl.int_range(pl.len()) == 2).then(float("nan")).otherwise(pl.col("price").cast(pl.Float64)).alias("price"))
    write_book(frames, tmp_path / "book")
    with pytest.raises(BookError) as caught:
        read_book(tmp_path / "book")
    text = str(caught.value)
    assert "prices.parquet, column 'price': 1 value(s) not a finite number (NaN or an infinity)" in text
    assert "row 2 (0-based): price NaN" in text


# --- unknown columns, unknown files, rows of no portfolio

def test_a_float_of_an_integer_column_must_be_whole(tmp_path):
    """2.5 settlement days: a row fault of the portfolio whose option it is, else the
    file's fault naming the row (it used to refuse any float column, whole or not)."""
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    portfolios = frames["portfolios"].with_columns(pl.Series("settlement_horizon_days", [3.0, 2.5, None]))
    write_book({**frames, "portfolios": portfolios}, tmp_path / "book")
    rows, failed = read_portfolio_rows(tmp_path / "book")
    assert rows["input_fault"].to_list() == [None, "INVALID_PORTFOLIO", None]
    assert rows["settlement_horizon_days"].to_list() == [3, 5, 5]  # the default stands in, and for null
    assert failed.select("input_column", "failed_check", "value").rows() == [("settlement_horizon_days", "castable to Int32", "2.5")]
    shelf = frames["shelf"].with_columns(pl.col("settlement_days").cast(pl.Float64))
    write_book({**frames, "shelf": shelf.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(1e12).otherwise("settlement_days").alias("settlement_days"))},
               tmp_path / "shelf")
    with pytest.raises(BookError) as caught:
        read_book(tmp_path / "shelf")
    assert str(caught.value) == (
        f"{tmp_path / 'shelf' / 'shelf.parquet'}, column 'settlement_days': 1 value(s) that are no whole number within Int32's range "
        "(an integer column stored as floats holds whole numbers); example rows: row 2 (0-based): settlement_days 1000000000000.0 "
        "fails castable to Int32")


def test_flags_exported_as_0_and_1_read_as_booleans(tmp_path):
    """A database's bit column: 1 and 0 read as true and false (they refused the whole
    book); 2 is a row fault of its portfolio, the option's default standing in."""
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    portfolios = frames["portfolios"].with_columns(pl.Series("enable_tax_awareness", [1, 0, 2], dtype=pl.Int8),
                                                   pl.Series("allow_restricted", [None, 1, 0], dtype=pl.Int64))
    write_book({**frames, "portfolios": portfolios}, tmp_path / "book")
    rows, failed = read_portfolio_rows(tmp_path / "book")
    assert rows["enable_tax_awareness"].to_list() == [True, False, False]
    assert rows["allow_restricted"].to_list() == [False, True, False]  # null: the default
    assert rows["input_fault"].to_list() == [None, None, "INVALID_PORTFOLIO"]
    assert failed.select("input_column", "failed_check", "value").rows() == [("enable_tax_awareness", "castable to Boolean", "2")]


def test_an_unknown_portfolios_column_is_an_error_with_a_hint(tmp_path):
    """A misspelt policy column would drop the policy for the whole book: it is named,
    with the column it was meant to be."""
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    for typo, meant in (("max_turnover_percent", "max_turnover_pct"), ("enable_tax_awarness", "enable_tax_awareness")):
        frames_typo = {**frames, "portfolios": frames["portfolios"].rename({meant: typo})}
        write_book(frames_typo, tmp_path / typo)
        with pytest.raises(BookError) as caught:
            read_book(tmp_path / typo)
        assert f"portfolios.parquet: unknown column(s) '{typo}' (did you mean '{meant}'?)" in str(caught.value)
    index = {**frames, "portfolios": frames["portfolios"].with_row_index("__index_level_0__")}
    write_book(index, tmp_path / "index")
    with pytest.raises(BookError, match="'__index_level_0__' \\(a pandas index: write the frame with index=False\\)"):
        read_book(tmp_path / "index")


def test_a_parquet_file_that_is_no_table_is_an_error_with_a_hint(tmp_path):
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    book = write_book(frames, tmp_path / "book")
    (book / "README.md").write_text("notes beside the book are fine\n")
    (book / ".positions.parquet.crc").write_text("hidden files too\n")
    (book / "._positions.parquet").write_bytes(b"\x00\x05\x16\x07")  # what macOS leaves on an external drive
    read_book(book)
    (book / "group_constraints.parquet").rename(book / "group_constraint.parquet")
    with pytest.raises(BookError) as caught:
        read_book(book)
    assert "group_constraint.parquet: not a table of a book (did you mean 'group_constraints.parquet'?)" in str(caught.value)
    (book / "group_constraint.parquet").unlink()
    (book / "portfolios.parquet").rename(book / "portfolio.parquet")
    with pytest.raises(BookError, match="portfolios.parquet: missing file \\(the book has 'portfolio.parquet': did you mean"):
        read_book(book)


def test_a_missing_table_says_what_the_folder_holds_instead(tmp_path):
    """No hint that points at another table (prices.parquet missing is no misspelt
    cash.parquet); the table in another format, and a sweep's output given as the book,
    are named."""
    book = write_book(generate_book_frames(3, 5, holdings=(2, 3)), tmp_path / "book")
    (book / "prices.parquet").unlink()
    with pytest.raises(BookError) as caught:
        read_book(book)
    assert str(caught.value).endswith("prices.parquet: missing file: a book needs prices.parquet (see docs/book.md)")
    (book / "prices.csv").write_text("instrument_id,price\n")
    with pytest.raises(BookError, match="prices.parquet: missing file \\(the book has 'prices.csv': a book's tables are Parquet files\\)"):
        read_book(book)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "manifest.json").write_text("{}\n")
    with pytest.raises(BookError, match="portfolios.parquet: missing file \\(this folder is a sweep's output, not a book\\)"):
        read_book(out)


@pytest.mark.parametrize(("table", "key"), [("positions", "portfolio_snapshot_id"), ("cash", "portfolio_snapshot_id"),
                                            ("lots", "portfolio_snapshot_id"), ("overdraft_limits", "run_key")])
@pytest.mark.parametrize("missing", [None, ""], ids=["null", "empty"])
def test_a_row_of_no_portfolio_is_the_files_fault(tmp_path, table, key, missing):
    """A holdings row with a null or empty portfolio_snapshot_id (a limits row with no
    run_key) belongs to no portfolio; it is named, file, column and 0-based row, not dropped."""
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    if table == "overdraft_limits":
        frames[table] = pl.DataFrame({"run_key": frames["portfolios"]["run_key"], "currency": ["SGD", "USD", "EUR"],
                                      "max_overdraft": [Decimal(100)] * 3})
    assert frames[table].height > 2
    frames[table] = frames[table].with_columns(
        pl.when(pl.int_range(pl.len()) == 2).then(pl.lit(missing, dtype=pl.String)).otherwise(pl.col(key)).alias(key))
    write_book(frames, tmp_path / "book")
    with pytest.raises(BookError) as caught:
        read_book(tmp_path / "book")
    text = str(caught.value)
    assert f"{table}.parquet, column '{key}': 1 row(s) with no {key}: such a row belongs to no portfolio" in text
    assert f"row 2 (0-based): {key} {'null' if missing is None else 'empty'}" in text


def test_rows_of_no_portfolio_are_counted_all_and_shown_five(tmp_path):
    """Many such rows: the error counts them all and shows the first five, enough to find
    the pattern without a wall of text."""
    frames = generate_book_frames(3, 5, holdings=(4, 5))
    assert frames["positions"].height >= 7
    frames["positions"] = frames["positions"].with_columns(
        pl.when(pl.int_range(pl.len()) < 7).then(None).otherwise(pl.col("portfolio_snapshot_id")).alias("portfolio_snapshot_id"))
    write_book(frames, tmp_path / "book")
    with pytest.raises(BookError) as caught:
        read_book(tmp_path / "book")
    text = str(caught.value)
    assert "7 row(s) with no portfolio_snapshot_id" in text
    assert text.split("example rows: ")[1].split("; ") == [
        f"row {row} (0-based): portfolio_snapshot_id null fails not_nullable" for row in range(5)]


def test_a_row_of_no_portfolio_is_found_without_statistics(tmp_path):
    """A writer that keeps no column statistics: the null key is found by reading it."""
    import pyarrow.parquet as pq

    frames = generate_book_frames(3, 5, holdings=(2, 3))
    book = write_book(frames, tmp_path / "book")
    cash = frames["cash"].with_columns(pl.when(pl.int_range(pl.len()) == 1).then(None).otherwise(pl.col("portfolio_snapshot_id"))
                                       .alias("portfolio_snapshot_id"))
    pq.write_table(cash.to_arrow(), book / "cash.parquet", write_statistics=False)
    with pytest.raises(BookError, match="cash.parquet, column 'portfolio_snapshot_id': 1 row.*row 1 \\(0-based\\)"):
        read_book(book)


# --- scenario files name only known options

def _scenarios(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "scenarios.json"
    path.write_text(json.dumps(doc))
    return path


def test_an_unknown_scenario_option_is_an_error_naming_scenario_and_option(tmp_path):
    with pytest.raises(DpmVecError) as caught:
        load_scenarios(_scenarios(tmp_path, {"scenarios": {"base": {"options": {}},
                                                           "typo": {"options": {"max_turnover_pc": "0.05"}}}}))
    assert "scenarios.typo.options: unknown option 'max_turnover_pc' (did you mean 'max_turnover_pct'?)" in str(caught.value)
    with pytest.raises(DpmVecError, match="scenarios.typo: unknown key 'option' \\(did you mean 'options'\\?\\)"):
        load_scenarios(_scenarios(tmp_path, {"typo": {"option": {"max_turnover_pct": "0.05"}}}))
    named = {"description": "every option the contract has", "options": {"max_turnover_pct": "0.05", "dust_trade_threshold": None,
                                                                        "min_trade_notional": {"amount": "10", "currency": "SGD"}}}
    assert load_scenarios(_scenarios(tmp_path, {"scenarios": {"all": named}}))["all"] == named
    request = json.loads((Path(__file__).parent / "data" / "scenarios" / "rfc_05_notional_fund_sizing.json").read_text())
    for doc in (request, request["inputs"]):  # a golden file, a bare request: said so, not "options must be an object"
        with pytest.raises(DpmVecError, match="is a rebalance request \\(or a golden file\\), not a scenarios file"):
            load_scenarios(_scenarios(tmp_path, doc))


def test_a_scenarios_file_read_one_way_only(tmp_path):
    """Keys beside "scenarios" would be dropped without a word (a scenario moved out of
    the wrapper, or the wrapper taken for a bare map's scenario named "scenarios"), and a
    description that is no string is refused, as the analyze door refuses it."""
    for doc, says in (
        ({"scenarios": {"base": {"options": {}}}, "tight": {"options": {"max_turnover_pct": "0.05"}}},
         "'tight' beside \"scenarios\": a scenarios file holds only"),
        ({"scenarios": {"options": {}}, "tight": {"options": {}}}, "'tight' beside \"scenarios\""),
        ({"scenarios": {"a": {"description": 5, "options": {}}}}, "scenarios.a.description: expected a string, got 5"),
    ):
        with pytest.raises(DpmVecError) as caught:
            load_scenarios(_scenarios(tmp_path, doc))
        assert says in str(caught.value)
    assert list(load_scenarios(_scenarios(tmp_path, {"a": {"description": None}, "b": {}}))) == ["a", "b"]


def test_a_scenario_value_a_book_cannot_hold_stops_the_sweep_naming_it(tmp_path):
    """The analyze door takes any currency text, as the reference does; a book's columns
    hold three capital letters, so such a scenario would block every one of its runs
    (INVALID_PORTFOLIO with no fault named, or INVALID_LIMITS blaming a book table the
    user never wrote): it is refused up front, by scenario and option."""
    for options, says in (
        ({"min_trade_notional": {"amount": "1000", "currency": "usd"}}, "min_trade_notional.currency 'usd' fails str_matches"),
        ({"enable_settlement_awareness": True, "max_overdraft_by_ccy": {"USDT": "1000"}}, "max_overdraft_by_ccy key 'USDT' fails"),
    ):
        with pytest.raises(DpmVecError) as caught:
            load_scenarios(_scenarios(tmp_path, {"scenarios": {"base": {"options": {}}, "odd-ccy": {"options": options}}}))
        assert f"scenarios.odd-ccy.options: {says}" in str(caught.value)
    fine = {"min_trade_notional": {"amount": "1000", "currency": "USD"}, "max_overdraft_by_ccy": {"USD": "0"}, "max_turnover_pct": "1"}
    assert load_scenarios(_scenarios(tmp_path, {"ok": {"options": fine}}))["ok"]["options"] == fine


def test_option_names_are_every_option_the_contract_reads():
    seen = set()

    class Recording(dict):
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

    parse_options(_Reader(), Recording(), "r", {"group_constraints": [], "overdraft_limits": []})
    assert seen == OPTION_NAMES


def _zero_data_pages(file: Path) -> None:
    """Overwrite a Parquet file's first data page with zeros, keeping its footer: the
    schema reads, the values do not."""
    import pyarrow.parquet as pq

    column = pq.ParquetFile(file).metadata.row_group(0).column(0)
    raw = bytearray(file.read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    raw[start:start + 64] = bytes(64)
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("shard_size", [None, 100])
def test_a_file_whose_data_does_not_read_is_named(tmp_path, shard_size):
    """A copy cut short or a corrupt page below an intact footer: the sweep stops naming
    the file (the shard sizing pass reads it first, a shard's read otherwise)."""
    import shutil

    from dpm_vec.sweep import sweep

    book = tmp_path / "book"
    shutil.copytree(SAMPLE, book)
    _zero_data_pages(book / "positions.parquet")
    with pytest.raises(BookError, match=r"positions\.parquet: not a readable Parquet file"):
        sweep(book, tmp_path / "out", shard_size=shard_size, threads=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_timestamps_of_a_hundred_shapes_in_one_column_each_read_as_alone():
    """An export mixing ISO 8601 shapes (separators, 0-9 fraction digits, offset forms)
    reads every value as the JSON door reads it alone, however many shapes the column
    holds: past 64 shapes the rest were once parsed in one call, in the format of the
    first of them, and valid times came back null (a book's whole sweep failed)."""
    from itertools import product

    from dpm_vec.book import iso_timestamps

    dtype = pl.Datetime("us", "UTC")
    shapes = [f"2025-06-30{sep}21:00:00{'.' + '123456789'[:digits] if digits else ''}{zone}"
              for sep, digits, zone in product("T ", range(10), ("", "Z", "+02:00", "+0200", "+02"))]
    assert len(set(shapes)) == 100
    alone = [iso_timestamps(pl.Series([value]), dtype, strict=False)[0] for value in shapes]
    assert None not in alone
    column = pl.Series("as_of", [*shapes, None, "30/06/2025", *reversed(shapes)])
    assert iso_timestamps(column, dtype, strict=False).to_list() == [*alone, None, None, *reversed(alone)]
    with pytest.raises(pl.exceptions.InvalidOperationError, match="for value '30/06/2025'"):
        iso_timestamps(column, dtype)


def test_a_shelf_without_its_optional_columns_reads_the_documented_defaults(tmp_path):
    """docs/book.md: a shelf file may leave out asset_class (UNKNOWN), settlement_days
    (2) and trade_by (UNITS), as a request may leave out those fields (spec §3.5)."""
    frames = generate_book_frames(3, 5, holdings=(2, 3))
    frames["shelf"] = frames["shelf"].drop("asset_class", "settlement_days", "trade_by")
    shelf = read_book(write_book(frames, tmp_path / "book")).shelf
    assert shelf.height == frames["shelf"].height
    assert set(shelf["asset_class"]) == {"UNKNOWN"} and set(shelf["settlement_days"]) == {2} and set(shelf["trade_by"]) == {"UNITS"}


def test_a_file_gone_between_its_scan_and_its_read_is_named(tmp_path):
    """A book file removed or replaced while a sweep plans (a copy job still running)
    fails reading with the file's name, not a bare FileNotFoundError."""
    from dpm_vec.io import collect

    path = tmp_path / "portfolios.parquet"
    pl.DataFrame({"run_key": ["PF1"]}).write_parquet(path)
    scan = pl.scan_parquet(path)
    path.unlink()
    with pytest.raises(BookError, match=r"portfolios\.parquet: not a readable Parquet file"):
        collect(scan, path)


@needs_proc
@pytest.mark.parametrize("writer", ["write_book", "generate"])
def test_a_book_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch, writer):
    """A power cut after import-requests or generate returns must not leave the book's
    name over unwritten bytes: its files and folder are synced before the rename."""
    events = record_publishing(monkeypatch)
    out = tmp_path / "book"
    if writer == "write_book":
        write_book(generate_book_frames(3, 5, holdings=(2, 3)), out)
    else:
        write_generated_book(out, 3, 5, holdings=(2, 3))
    assert read_book(out).portfolios.height == 3
    assert assert_published_durably(events, out) == []


@needs_proc
def test_a_file_system_that_cannot_sync_a_folder_still_gets_the_book(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a folder (EINVAL): the files are still synced
    and the book written; a file's failing fsync, even with that errno, fails the write."""
    fsync = os.fsync
    synced_files: list[str] = []

    def folders_refused(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_dir():
            raise OSError(errno.EINVAL, "Invalid argument")
        synced_files.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", folders_refused)
    write_book(generate_book_frames(3, 5, holdings=(2, 3)), tmp_path / "book")
    assert read_book(tmp_path / "book").portfolios.height == 3
    assert {Path(path).name for path in synced_files} >= {path.name for path in (tmp_path / "book").iterdir()}

    def files_refused(fd: int) -> None:  # the same errno: only a folder's is forgiven
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", files_refused)
    with pytest.raises(OSError, match="Invalid argument"):
        write_book(generate_book_frames(3, 5, holdings=(2, 3)), tmp_path / "book2")
    assert not (tmp_path / "book2").exists()
