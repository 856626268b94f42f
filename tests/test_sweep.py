"""The book door end to end: generated books on disk, real sweeps, real Parquet."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from decimal import Decimal
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpm_vec.book import POLICY_COLUMNS
from dpm_vec.codes import ENGINE_BLOCKS
from dpm_vec.defaults import DEFAULT_SHARD_ROWS, DEFAULT_SHARD_SIZE
from dpm_vec.errors import BookError, DpmVecError, InfeasibleConstraintError, QuantityRangeError, RequestError, fault
from dpm_vec.export import book_to_requests
from dpm_vec.generate import generate_book_frames
from dpm_vec.inspect import query
from dpm_vec.io import read_book, write_book
from dpm_vec.numeric import AMOUNT_28
from dpm_vec.oracle import simulate as oracle_simulate
from dpm_vec.sweep import SWEEP_TABLES, sweep
from tests.test_contract import REQUEST
from tests.durability import assert_published_durably, needs_proc, record_publishing


def _book(tmp_path: Path, n: int = 60, seed: int = 3, bad_data: bool = True, name: str = "book") -> Path:
    return write_book(generate_book_frames(n, seed, bad_data=bad_data, holdings=(5, 12)), tmp_path / name)


def _read(out: Path, table: str) -> pl.DataFrame:
    return pl.read_parquet(out / table / "*.parquet")


def _same_outputs(a: Path, b: Path) -> None:
    for table in SWEEP_TABLES:
        assert _read(a, table).equals(_read(b, table), null_equal=True), table


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    return _book(tmp_path_factory.mktemp("sweep"), n=80)


@pytest.fixture(scope="module")
def swept(book, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out") / "result"
    manifest = sweep(book, out, shard_size=30, progress=False)
    return out, manifest


def test_one_run_record_per_portfolio(book, swept):
    out, manifest = swept
    runs = _read(out, "runs")
    portfolios = pl.read_parquet(book / "portfolios.parquet")
    assert runs["run_key"].to_list() == portfolios["portfolio_id"].to_list()
    assert runs["status"].is_in(["READY", "PENDING_REVIEW", "BLOCKED"]).all()
    assert manifest["portfolios"] == 80 and sum(manifest["counts_by_status"].values()) == 80
    assert manifest["tables"]["runs"]["rows"] == 80 and manifest["shards"] == 3


def test_manifest_records_inputs_and_is_written_last(book, swept):
    out, manifest = swept
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["input_hashes"].keys() >= {"portfolios.parquet", "positions.parquet", "prices.parquet"}
    assert on_disk["engine_version"] and on_disk["wall_time_s"] > 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "work or staging dirs left behind"


def test_bad_data_blocks_only_its_portfolio(book, swept, tmp_path):
    """The generator's faults (missing price, missing FX, unshelved target) block exactly
    the portfolios that have them, by DQ; every other portfolio sweeps as in the same book
    without the faults."""
    from tests.test_generate import _faults

    out, _ = swept
    runs = _read(out, "runs")
    frames = {name: pl.read_parquet(book / f"{name}.parquet") for name in ("portfolios", "positions", "cash", "prices", "fx_rates", "models", "shelf")}
    faulty = set().union(*_faults(frames).values())
    dq_blocked = runs.filter(pl.col("dq_count") > 0)
    assert faulty and set(dq_blocked["run_key"]) == faulty
    assert (dq_blocked["status"] == "BLOCKED").all()
    clean_out = tmp_path / "clean_result"
    sweep(_book(tmp_path, n=80, bad_data=False, name="clean"), clean_out, shard_size=30, progress=False)
    for table in ("runs", "intents", "rule_results"):
        others, clean = (_read(o, table).filter(~pl.col("run_key").is_in(sorted(faulty))) for o in (out, clean_out))
        assert others.height > 0 and others.equals(clean, null_equal=True), table


@pytest.mark.parametrize("shard_size", [1000, 25])
def test_outputs_do_not_depend_on_shard_size(book, swept, tmp_path, monkeypatch, shard_size):
    """Three shards, four shards and one shard give the same tables; a book sorted by
    portfolio is never split (shards read their holdings in place)."""
    import dpm_vec.sweep as sweep_module

    def no_split(*_):
        raise AssertionError("a book sorted by portfolio must not split its holdings")

    monkeypatch.setattr(sweep_module, "partition_holdings", no_split)
    out, _ = swept
    other = tmp_path / f"shards_of_{shard_size}"
    sweep(book, other, shard_size=shard_size, progress=False)
    _same_outputs(out, other)


def _scattered_copy(book: Path, target: Path) -> Path:
    """The book with each holdings table's snapshots in a scrambled order (rows of one
    snapshot kept together and in order, so every portfolio's input is unchanged)."""
    shutil.copytree(book, target)
    for table in ("positions", "cash", "lots"):
        frame = pl.read_parquet(book / f"{table}.parquet")
        frame.with_row_index("_r").sort(pl.col("portfolio_snapshot_id").hash(7), "_r").drop("_r").write_parquet(target / f"{table}.parquet")
    return target


def test_grouped_holdings_are_read_in_place_by_row_span(book, swept):
    """A book sorted by portfolio (the generator's) is never split: every shard reads the
    span of rows its snapshots occupy, and each span holds exactly those rows' range."""
    import dpm_vec.sweep as sweep_module

    out, manifest = swept
    plan = sweep_module.plan_sweep(book, out, 30, {}, manifest["portfolios"])
    portfolios = pl.read_parquet(book / "portfolios.parquet")
    spans = sweep_module.holding_spans(plan, portfolios)
    assert spans is not None
    for table in ("positions", "cash", "lots"):
        rows = pl.read_parquet(book / f"{table}.parquet").with_row_index("_row")
        for shard in range(plan.n_shards):
            start, stop = plan.shard_range(shard)
            snapshots = portfolios.slice(start, stop - start)["portfolio_snapshot_id"].implode()
            mine = rows.filter(pl.col("portfolio_snapshot_id").is_in(snapshots))["_row"]
            assert spans[table][shard] == (mine.min(), mine.max() + 1 - mine.min()), (table, shard)


def test_scattered_holdings_are_split_with_the_same_outputs(book, swept, tmp_path, monkeypatch):
    """Holdings scattered across the file are split once per shard instead (a span per
    shard would read the file three times); the outputs are those of the sorted book."""
    import dpm_vec.sweep as sweep_module

    scattered = _scattered_copy(book, tmp_path / "scattered")
    split, splits = sweep_module.partition_holdings, []

    def counted_split(*args):
        splits.append(args)
        return split(*args)

    monkeypatch.setattr(sweep_module, "partition_holdings", counted_split)
    out, _ = swept
    other = tmp_path / "from_scattered"
    sweep(scattered, other, shard_size=30, progress=False)
    assert len(splits) == 1
    _same_outputs(out, other)


def test_a_book_without_lots_sweeps_by_span_as_in_one_shard(book, tmp_path):
    """lots.parquet is optional: shards that read spans get no lots, as one shard does."""
    import dpm_vec.sweep as sweep_module

    no_lots = tmp_path / "no_lots"
    shutil.copytree(book, no_lots)
    (no_lots / "lots.parquet").unlink()
    plan = sweep_module.plan_sweep(no_lots, tmp_path / "x", 30, {}, pl.read_parquet(no_lots / "portfolios.parquet").height)
    assert sweep_module.holding_spans(plan, pl.read_parquet(no_lots / "portfolios.parquet"))["lots"] == [(0, 0)] * plan.n_shards
    sweep(no_lots, tmp_path / "three", shard_size=30, progress=False)
    sweep(no_lots, tmp_path / "one", shard_size=1000, progress=False)
    _same_outputs(tmp_path / "three", tmp_path / "one")


def test_a_misshapen_holdings_file_is_named_before_any_shard_runs(book, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(book, bad)
    pl.read_parquet(book / "positions.parquet").rename({"portfolio_snapshot_id": "snapshot"}).write_parquet(bad / "positions.parquet")
    with pytest.raises(BookError) as err:
        sweep(bad, tmp_path / "out", shard_size=30, progress=False)
    assert "positions.parquet" in str(err.value) and "portfolio_snapshot_id" in str(err.value)
    assert not (tmp_path / "out").exists()


def _documented_columns() -> dict[str, list[tuple[str, str]]]:
    """Each dataset's (column, type) rows in docs/outputs.md, in table order."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## `"):
            current = line.split("`")[1]
            tables[current] = []
        elif current and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[current].append((cells[0].strip("`"), cells[1]))
    return tables


def _doc_type(dtype: pl.DataType) -> str:
    return f"decimal({dtype.precision},{dtype.scale})" if isinstance(dtype, pl.Decimal) else str(dtype)


def test_docs_list_every_dataset_column_in_order_with_its_type(swept):
    """docs/outputs.md is what BI users build on: every column of every dataset a sweep
    writes, in file order, with its Parquet type."""
    out, manifest = swept
    documented = _documented_columns()
    for table in manifest["tables"]:
        schema = pl.read_parquet_schema(sorted((out / table).glob("*.parquet"))[0])
        assert documented[table] == [(name, _doc_type(dtype)) for name, dtype in schema.items()], table


def test_output_files_are_copied_where_they_cannot_be_linked(book, swept, tmp_path, monkeypatch):
    """Committed shard files are hard-linked into the output; across file systems (a
    link fails) they are copied, with the same result."""
    import dpm_vec.sweep as sweep_module

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(sweep_module.os, "link", cross_device)
    out, _ = swept
    other = tmp_path / "copied"
    sweep(book, other, shard_size=30, progress=False)
    _same_outputs(out, other)
    assert all(f.stat().st_nlink == 1 for f in (other / "runs").glob("*.parquet"))


def test_duckdb_views_over_outputs(swept):
    out, manifest = swept
    columns, rows = query(out, "select status, count(*) as n from runs group by status order by status")
    assert columns == ["status", "n"]
    assert dict(rows) == manifest["counts_by_status"]
    # the manifest counts the blocked runs by reason, over all shards (the sample's are many and mixed)
    _, reasons = query(out, "select block_reason, count(*) from runs where status = 'BLOCKED' group by 1 order by 1")
    assert dict(reasons) == manifest["blocked_by_reason"] and len(reasons) > 1
    assert sum(manifest["blocked_by_reason"].values()) == manifest["counts_by_status"]["BLOCKED"]
    _, intents = query(out, "select count(*) from intents i join runs r using (run_key)")
    assert intents[0][0] == manifest["tables"]["intents"]["rows"]


def test_book_faults_block_with_named_reason(tmp_path):
    frames = generate_book_frames(6, 5, holdings=(3, 5))
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(pl.int_range(pl.len()) == 1).then(pl.lit("NO_SUCH_MODEL")).otherwise(pl.col("model_id")).alias("model_id")
    )
    victim = frames["portfolios"]["portfolio_snapshot_id"][2]
    frames["positions"] = frames["positions"].with_columns(
        pl.when((pl.col("portfolio_snapshot_id") == victim) & (pl.int_range(pl.len()).over("portfolio_snapshot_id") == 0))
        .then(-pl.col("quantity")).otherwise(pl.col("quantity")).alias("quantity")
    )
    book = write_book(frames, tmp_path / "book")
    sweep(book, tmp_path / "out", progress=False)
    runs = _read(tmp_path / "out", "runs")
    assert runs.height == 6
    reasons = dict(zip(runs["run_key"], runs["block_reason"]))
    ids = frames["portfolios"]["run_key"].to_list()
    assert reasons[ids[1]] == "UNKNOWN_MODEL"
    assert reasons[ids[2]] == "NEGATIVE_QUANTITY"
    # the others have none of dpm_vec's own faults; any of them blocked says by which rule
    others = runs.filter(~pl.col("run_key").is_in(ids[1:3]))
    assert not set(others["block_reason"].drop_nulls()) & ENGINE_BLOCKS
    assert (runs["status"] == "BLOCKED").to_list() == runs["block_reason"].is_not_null().to_list()


def test_unknown_references_block_unless_declared_in_snapshots(tmp_path):
    """A model, shelf or market snapshot with no rows blocks its portfolio as UNKNOWN_*
    (a typo must not liquidate a portfolio against an empty model), unless the
    ``snapshots`` table declares it: then the portfolio runs against the empty one."""
    frames = generate_book_frames(4, 5, holdings=(3, 5))
    broken = {1: ("model_id", "EMPTY_MODEL"), 2: ("shelf_id", "EMPTY_SHELF"), 3: ("market_snapshot_id", "EMPTY_MD")}
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(pl.int_range(pl.len()) == row).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)
        for row, (column, value) in broken.items()
    )
    ids = frames["portfolios"]["run_key"].to_list()
    write_book(frames, tmp_path / "undeclared")
    sweep(tmp_path / "undeclared", tmp_path / "out1", progress=False)
    reasons = dict(zip(*_read(tmp_path / "out1", "runs").select("run_key", "block_reason")))
    assert [reasons[k] for k in ids] == [None, "UNKNOWN_MODEL", "UNKNOWN_SHELF", "UNKNOWN_MARKET_SNAPSHOT"]
    details = dict(zip(*_read(tmp_path / "out1", "runs").select("run_key", "block_detail")))
    assert [details[k] for k in ids[1:]] == [
        "model_id EMPTY_MODEL has no rows in models, and snapshots does not declare it",
        "shelf_id EMPTY_SHELF has no rows in shelf, and snapshots does not declare it",
        "market_snapshot_id EMPTY_MD has no prices or FX rates, and snapshots does not declare it",
    ]

    frames["snapshots"] = pl.DataFrame({"kind": ["MODEL", "SHELF", "MARKET"], "snapshot_id": ["EMPTY_MODEL", "EMPTY_SHELF", "EMPTY_MD"]})
    write_book(frames, tmp_path / "declared")
    sweep(tmp_path / "declared", tmp_path / "out2", progress=False)
    runs = _read(tmp_path / "out2", "runs").select("run_key", "status", "block_reason", "block_detail", "n_shelf_missing", "n_price_missing")
    by_key = {r["run_key"]: r for r in runs.iter_rows(named=True)}
    assert not any(str(by_key[k]["block_reason"]).startswith("UNKNOWN_") for k in ids)
    # an empty shelf or market blocks on the reference's DATA_QUALITY rule, which names what is missing
    assert by_key[ids[2]]["block_reason"] == by_key[ids[3]]["block_reason"] == "DATA_QUALITY"
    assert by_key[ids[2]]["block_detail"].startswith("missing data: no shelf entry for ")
    assert by_key[ids[3]]["block_detail"].startswith("missing data: no price for ")
    intents = _read(tmp_path / "out2", "intents")
    sells = intents.filter((pl.col("run_key") == ids[1]) & (pl.col("intent_type") == "SECURITY_TRADE"))
    assert sells.height and set(sells["side"]) == {"SELL"}  # an empty model liquidates the approved holdings
    assert by_key[ids[2]]["status"] == "BLOCKED" and by_key[ids[2]]["n_shelf_missing"] > 0  # unshelved model targets
    assert by_key[ids[3]]["status"] == "BLOCKED" and by_key[ids[3]]["n_price_missing"] > 0


def test_a_null_or_empty_reference_id_blocks_its_portfolio_not_the_book(tmp_path):
    """A portfolio row with no snapshot, shelf or model id runs against nothing: it is
    BLOCKED INVALID_PORTFOLIO, named in input_faults, and the other portfolios run as
    they would without it (the whole book used to be refused)."""
    frames = generate_book_frames(9, 5, holdings=(3, 5))
    columns = ("portfolio_snapshot_id", "market_snapshot_id", "shelf_id", "model_id")
    broken = {1 + 2 * i + j: (column, value) for i, column in enumerate(columns) for j, value in enumerate((None, ""))}
    row = pl.int_range(pl.len())
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(row == 1 + 2 * i).then(pl.lit(None, dtype=pl.String)).when(row == 2 + 2 * i).then(pl.lit("")).otherwise(pl.col(column)).alias(column)
        for i, column in enumerate(columns)
    )
    ids = frames["portfolios"]["run_key"].to_list()
    write_book({**frames, "portfolios": frames["portfolios"].head(1)}, tmp_path / "alone")
    sweep(tmp_path / "alone", tmp_path / "out_alone", progress=False)
    write_book(frames, tmp_path / "book")
    sweep(tmp_path / "book", tmp_path / "out", progress=False, shard_size=4)
    runs = _read(tmp_path / "out", "runs").sort("run_key")
    assert runs["run_key"].to_list() == sorted(ids)
    by_key = {r["run_key"]: r for r in runs.iter_rows(named=True)}
    assert [by_key[ids[row]]["block_reason"] for row in broken] == ["INVALID_PORTFOLIO"] * len(broken)
    faults = _read(tmp_path / "out", "input_faults").sort("run_key")
    assert faults.select("run_key", "input_column", "failed_check").rows() == sorted(
        (ids[row], column, "not_nullable" if value is None else "str_length(1, None)") for row, (column, value) in broken.items())
    assert _read(tmp_path / "out", "intents").filter(pl.col("run_key").is_in([ids[row] for row in broken])).is_empty()
    alone = _read(tmp_path / "out_alone", "runs")
    assert runs.filter(pl.col("run_key") == ids[0]).equals(alone)


def test_a_bad_snapshot_declaration_names_the_file(tmp_path):
    frames = generate_book_frames(2, 5, holdings=(3, 5))
    frames["snapshots"] = pl.DataFrame({"kind": ["MODEL", "HOLDINGS"], "snapshot_id": ["m", "x"]})
    write_book(frames, tmp_path / "book")
    with pytest.raises(BookError, match=r"snapshots\.parquet.*'kind'"):
        sweep(tmp_path / "book", tmp_path / "out", progress=False)


def test_a_zero_price_blocks_the_portfolios_that_hold_or_target_it(tmp_path):
    """A zero price is bad data only where it is read (§9.1): every portfolio holding the
    instrument or targeting it is BLOCKED with NON_POSITIVE_PRICE, the rest run, and a zero
    price nobody reads changes nothing."""
    frames = generate_book_frames(8, 5, holdings=(3, 5))
    held = frames["positions"]["instrument_id"][0]
    unused = frames["prices"].filter(~pl.col("instrument_id").is_in(
        pl.concat([frames["positions"]["instrument_id"], frames["models"]["instrument_id"]]).implode()))["instrument_id"][0]
    clean = write_book(frames, tmp_path / "clean")
    frames["prices"] = frames["prices"].with_columns(
        pl.when(pl.col("instrument_id").is_in([held, unused])).then(pl.lit(0, dtype=pl.Decimal(38, 20))).otherwise(pl.col("price")).alias("price"))
    sweep(write_book(frames, tmp_path / "book"), tmp_path / "out", progress=False)
    sweep(clean, tmp_path / "clean_out", progress=False)
    runs, before = _read(tmp_path / "out", "runs"), _read(tmp_path / "clean_out", "runs")
    snapshots = frames["portfolios"].select("run_key", "portfolio_snapshot_id", "model_id")
    readers = set(snapshots.join(frames["positions"].filter(pl.col("instrument_id") == held), on="portfolio_snapshot_id", how="semi")["run_key"])
    readers |= set(snapshots.join(frames["models"].filter(pl.col("instrument_id") == held), on="model_id", how="semi")["run_key"])
    assert readers
    blocked = runs.filter(pl.col("block_reason") == "NON_POSITIVE_PRICE")
    assert set(blocked["run_key"]) == readers and set(blocked["status"]) == {"BLOCKED"}
    others = runs.filter(~pl.col("run_key").is_in(list(readers))).sort("run_key").select("run_key", "status", "after_total_value")
    assert others.equals(before.filter(~pl.col("run_key").is_in(list(readers))).sort("run_key").select("run_key", "status", "after_total_value"))


@pytest.mark.parametrize(
    ("table", "change", "expected"),
    [
        ("prices", lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(-pl.col("price")).otherwise(pl.col("price")).alias("price")), "greater_than_or_equal_to(0)"),
        ("cash", lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("usd")).otherwise(pl.col("currency")).alias("currency")), "str_matches"),
        ("positions", lambda f: pl.concat([f, f.head(1)]), "uniqueness"),
        ("shelf", lambda f: f.rename({"status": "statuss"}), "did you mean 'status'"),
        # text that is no number: the file's fault, with its rows (once only Polars' cast message)
        ("models", lambda f: f.with_columns(pl.col("weight").cast(pl.String) + "x"), "that are no decimal number (written like 1234.56)"),
        ("prices", lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("12,50")).otherwise(pl.col("price").cast(pl.String))
                                            .alias("price")), "example rows: row 3 (0-based): price 12,50 fails castable"),
        # text in an integer column (a CSV export's settlement days): named, not a traceback
        ("shelf", lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("two")).otherwise(pl.col("settlement_days").cast(pl.String))
                                           .alias("settlement_days")),
         "1 value(s) that are no whole number (written like 2) within Int32's range; example rows: row 3 (0-based): settlement_days two fails castable"),
        # a minimum notional with no currency is no Money (the JSON door's 422): named, with null as JSON writes it
        ("shelf", lambda f: f.with_columns(
            pl.when(pl.int_range(pl.len()) == 2).then(pl.lit(Decimal(1000), dtype=pl.Decimal(38, 20))).otherwise(pl.col("min_notional_amount"))
            .alias("min_notional_amount"), pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col("min_notional_currency"))
            .alias("min_notional_currency")),
         "column 'min_notional_currency': 1 failed check(s): not_null_where_min_notional_amount_is; example rows: row 2 (0-based): "
         "min_notional_currency null fails"),
        # model weights carry 28 decimals (Decimal(38, 28)): 10^10 does not fit
        ("models", lambda f: f.with_columns(pl.col("weight").cast(pl.Decimal(38, 20))).with_columns(
            pl.when(pl.int_range(pl.len()) == 2).then(pl.lit(10**10, dtype=pl.Decimal(38, 20))).otherwise(pl.col("weight")).alias("weight"),
        ), "outside the range its column holds (Decimal(precision=38, scale=28): below 1E10, and 0 or at least 1E-28); example rows: row 2"),
        # an integer too large for its column, stored as a wider integer: named with its row too (once only Polars' message)
        ("shelf", lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit(2**40)).otherwise(pl.col("settlement_days").cast(pl.Int64))
                                           .alias("settlement_days")),
         "1 value(s) outside the range its column holds (Int32); example rows: row 3 (0-based): settlement_days 1099511627776 fails castable"),
        ("prices", lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(pl.lit(5 * 10**18)).otherwise(pl.col("price").cast(pl.Int64))
                                            .alias("price")), "example rows: row 2 (0-based): price 5000000000000000000 fails castable"),
        # an FX rate that is not 0 but below 1E-20 would be read as 0, a missing rate: the file's fault too
        ("fx_rates", lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(7e-25).otherwise(pl.col("rate").cast(pl.Float64))
                                              .alias("rate")),
         "1 value(s) outside the range its column holds (Decimal(precision=38, scale=20): below 1E18, and 0 or at least 1E-20); "
         "example rows: row 1 (0-based): rate 7e-25 fails castable"),
        ("prices", lambda f: f.with_columns(pl.col("price").cast(pl.Decimal(38, 28))).with_columns(
            pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("0.000000000000000000000001", dtype=pl.Decimal(38, 28))).otherwise(pl.col("price"))
            .alias("price")), "row 0 (0-based): price 0.0000000000000000000000010000 fails castable"),
        # the reader's verdict column, set by the file: it would block (or name) a run for no fault of its own
        ("portfolios", lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(pl.lit("HELLO")).alias("input_fault")),
         "column 'input_fault': 1 row(s) set input_fault, which the book reader sets"),
    ],
)
def test_structural_faults_name_file_column_and_rows(tmp_path, table, change, expected):
    frames = generate_book_frames(4, 9, holdings=(3, 4))
    frames[table] = change(frames[table])
    book = write_book(frames, tmp_path / "book")
    with pytest.raises(BookError) as err:
        read_book(book)
    message = str(err.value)
    assert f"{table}.parquet" in message
    assert expected in message


def test_a_shard_read_names_a_set_input_fault_by_its_row_in_the_file(tmp_path):
    """A shard reads a slice of portfolios.parquet: the rows it names are the file's, not
    the slice's (row 7, not row 2 of the shard that starts at row 5)."""
    from dpm_vec.io import read_portfolio_rows

    frames = generate_book_frames(10, 9, holdings=(3, 4))
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(pl.lit("HELLO")).alias("input_fault"))
    book = write_book(frames, tmp_path / "book")
    with pytest.raises(BookError, match=r"row 7 \(0-based\): input_fault 'HELLO'"):
        read_portfolio_rows(book, rows=(5, 5))
    assert read_portfolio_rows(book, rows=(0, 5))[0].height == 5  # a shard without it reads


def _inject_row_faults(frames: dict[str, pl.DataFrame]) -> dict[str, str]:
    """Break one row of each per-portfolio table, each for a different portfolio (the
    last ones, so the sweep has committed shards before it meets them); returns
    run_key -> the block reason expected."""
    ids = frames["portfolios"]["run_key"].to_list()
    snap = dict(zip(ids, frames["portfolios"]["portfolio_snapshot_id"]))
    with_lots = set(frames["lots"]["portfolio_snapshot_id"])
    lot_victim = next(r for r in reversed(ids[:-5]) if snap[r] in with_lots)
    exact_victim = ids[-6] if ids[-6] != lot_victim else ids[-7]
    victims = {ids[-1]: "dup", ids[-2]: "ccy", ids[-3]: "text", ids[-4]: "limit", lot_victim: "lot", exact_victim: "exact"}
    by = {v: k for k, v in victims.items()}
    first = pl.int_range(pl.len()).over("portfolio_snapshot_id") == 0

    positions = frames["positions"]
    conflicting = positions.filter(pl.col("portfolio_snapshot_id") == snap[by["dup"]]).head(1).with_columns(
        pl.col("quantity") + 1)
    positions = pl.concat([positions, conflicting]).with_columns(pl.col("quantity").cast(pl.String))
    frames["positions"] = positions.with_columns(
        pl.when((pl.col("portfolio_snapshot_id") == snap[by["text"]]) & first).then(pl.lit("12 units"))
        .otherwise(pl.col("quantity")).alias("quantity"))
    frames["cash"] = frames["cash"].with_columns(
        pl.when((pl.col("portfolio_snapshot_id") == snap[by["ccy"]]) & first).then(pl.lit("usd"))
        .otherwise(pl.col("currency")).alias("currency"))
    # a balance's own digits (amount_exact) that are another number than its amount
    frames["cash"] = frames["cash"].with_columns(
        pl.when((pl.col("portfolio_snapshot_id") == snap[by["exact"]]) & first).then(pl.col("amount") + 1).cast(AMOUNT_28).alias("amount_exact"))
    frames["lots"] = frames["lots"].with_columns(
        pl.when((pl.col("portfolio_snapshot_id") == snap[by["lot"]]) & first).then(-pl.col("quantity"))
        .otherwise(pl.col("quantity")).alias("quantity"))
    frames["group_constraints"] = pl.concat([frames["group_constraints"], pl.DataFrame(
        {"run_key": [by["limit"]], "constraint_key": ["sector:TECH"], "max_weight": [Decimal("1.5")]},
        schema=frames["group_constraints"].schema)])
    return {r: "INVALID_LIMITS" if kind == "limit" else "INVALID_HOLDINGS" for r, kind in victims.items()}


def test_bad_rows_block_their_portfolios_and_the_sweep_goes_on(tmp_path, caplog):
    """A row of a portfolio's own data that fails its checks (a conflicting duplicate, a
    quantity that is not a number, a bad currency code, a negative lot, a weight limit
    above 1) blocks the portfolios it belongs to with a named reason; every other
    portfolio gets exactly the result it gets from the clean book, whatever the sharding."""
    frames = generate_book_frames(40, 3, holdings=(5, 12))
    clean = write_book(frames, tmp_path / "clean")
    expected = _inject_row_faults(frames)
    broken = write_book(frames, tmp_path / "broken")
    sweep(clean, tmp_path / "clean_out", shard_size=10, progress=False)
    with caplog.at_level(logging.WARNING, logger="dpm_vec.sweep"):
        sweep(broken, tmp_path / "broken_out", shard_size=10, progress=False)
    # the warning names the shard as its directory is named, and the book's portfolios in it
    assert [r.getMessage().split(" blocked")[0] for r in caplog.records if "blocked by" in r.getMessage()] == [
        f"shard-00003 (portfolios 31-40 of the book): {len(expected)} portfolio(s)"]  # every victim is among the last ten
    sweep(broken, tmp_path / "one_shard", shard_size=1000, progress=False)
    _same_outputs(tmp_path / "broken_out", tmp_path / "one_shard")

    runs = _read(tmp_path / "broken_out", "runs")
    assert runs["run_key"].to_list() == frames["portfolios"]["run_key"].to_list()
    blocked = runs.filter(pl.col("block_reason").is_in(["INVALID_HOLDINGS", "INVALID_LIMITS"]))
    assert dict(zip(blocked["run_key"], blocked["block_reason"])) == expected
    assert (blocked["status"] == "BLOCKED").all() and (blocked["exit_path"] == "E1").all()
    assert _read(tmp_path / "broken_out", "intents").filter(pl.col("run_key").is_in(list(expected))).height == 0

    faults = _read(tmp_path / "broken_out", "input_faults")
    named = {(r["run_key"], r["input_table"], r["input_column"], r["failed_check"]) for r in faults.iter_rows(named=True)}
    ids = frames["portfolios"]["run_key"].to_list()
    assert (ids[-1], "positions", "(row)", "multiple_fields_uniqueness") in named
    assert (ids[-2], "cash", "currency", "str_matches('^[A-Z]{3}$')") in named
    assert (ids[-3], "positions", "quantity", "castable to Decimal(precision=38, scale=28)") in named
    # each blocked run's detail names its first failed value, and counts the rest
    for key, detail in blocked.select("run_key", "block_detail").iter_rows():
        own = faults.filter(pl.col("run_key") == key).row(0, named=True)
        more = faults.filter(pl.col("run_key") == key).height - 1
        assert detail.startswith(f"{own['input_table']}{' row ' + own['row_key'] if own['row_key'] else ''}: {own['input_column']} ")
        assert f" fails {own['failed_check']}" in detail and detail.endswith(f" (and {more} more in input_faults)" if more else own["failed_check"])
    assert (ids[-4], "group_constraints", "max_weight", "in_range(0, 1)") in named
    # the lot's victim and the one whose balance's own digits (amount_exact) are another number
    others = {(t, c, f) for k, t, c, f in named if k not in ids[-4:]}
    assert len(set(expected) - set(ids[-4:])) == 2 and others == {
        ("lots", "quantity", "greater_than_or_equal_to(0)"), ("cash", "amount_exact", "rounds_to_amount")}
    assert {r[0] for r in named} == set(expected)
    assert faults.filter(pl.col("input_column") == "quantity", pl.col("input_table") == "positions")["value"].to_list() == ["12 units"]
    # the documented DuckDB query: no column name that SQL reserves
    _, rows = query(tmp_path / "broken_out", "select run_key, block_reason, input_table, row_key, input_column, failed_check, value "
                                             "from runs join input_faults using (run_key)")
    assert len(rows) == faults.height and {r[1] for r in rows} == {"INVALID_HOLDINGS", "INVALID_LIMITS"}

    for table in ("runs", "intents", "positions_after", "targets"):
        others = [_read(out, table).filter(~pl.col("run_key").is_in(list(expected)))
                  for out in (tmp_path / "clean_out", tmp_path / "broken_out")]
        assert others[0].equals(others[1]), table
    assert _read(tmp_path / "clean_out", "input_faults").height == 0


def test_a_money_amount_without_its_currency_blocks_its_portfolio(tmp_path):
    """A market value or a minimum trade notional with no currency is no Money (the JSON
    door's 422, spec §3.6): it blocks its portfolio, named in input_faults, where it was
    once planned with (a trade sized over a market value of unknown currency)."""
    frames = generate_book_frames(6, 2, holdings=(3, 6))
    ids = frames["portfolios"]["run_key"].to_list()
    snapshot = frames["portfolios"]["portfolio_snapshot_id"][0]
    held = (pl.col("portfolio_snapshot_id") == snapshot) & (pl.int_range(pl.len()).over("portfolio_snapshot_id") == 0)
    frames["positions"] = frames["positions"].with_columns(
        pl.when(held).then(pl.lit(Decimal(1000), dtype=pl.Decimal(38, 20))).otherwise(pl.col("market_value")).alias("market_value"),
        pl.when(held).then(None).otherwise(pl.col("market_value_currency")).alias("market_value_currency"))
    instrument = frames["positions"].filter(held)["instrument_id"][0]
    second = pl.col("run_key") == ids[1]
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(second).then(pl.lit(Decimal(10**9), dtype=pl.Decimal(38, 20))).otherwise(pl.col("min_trade_notional_amount"))
        .alias("min_trade_notional_amount"),
        pl.when(second).then(None).otherwise(pl.col("min_trade_notional_currency")).alias("min_trade_notional_currency"))
    sweep(write_book(frames, tmp_path / "book"), tmp_path / "out", progress=False)
    runs = _read(tmp_path / "out", "runs")
    assert runs["run_key"].to_list() == ids
    blocked = runs.filter(pl.col("block_reason").is_in(["INVALID_HOLDINGS", "INVALID_PORTFOLIO"]))
    assert blocked.select("run_key", "block_reason", "block_detail").rows() == [
        (ids[0], "INVALID_HOLDINGS", f"positions row {instrument}: market_value_currency null fails not_null_where_market_value_is"),
        (ids[1], "INVALID_PORTFOLIO",
         "portfolios: min_trade_notional_currency null fails not_null_where_min_trade_notional_amount_is"),
    ]
    assert _read(tmp_path / "out", "intents").filter(pl.col("run_key").is_in(ids[:2])).height == 0


def test_faults_in_several_tables_block_by_the_first_table_and_say_so_consistently(tmp_path):
    """One reason per run: a portfolio whose rows fail in several tables is blocked by the
    first table's reason (holdings before limits), its block_detail names a row of that
    same table, and input_faults lists every failed row in table order (not by row key,
    where the overdraft limit's 'aud' sorts before the group limit's 'sector:TECH'). A
    reference fault found before the rows are read (UNKNOWN_MODEL) keeps its reason."""
    frames = generate_book_frames(6, 5, holdings=(3, 5))
    ids = frames["portfolios"]["run_key"].to_list()
    snap = dict(zip(ids, frames["portfolios"]["portfolio_snapshot_id"]))
    victim, unknown_model = ids[1], ids[3]
    duplicated = frames["positions"].filter(pl.col("portfolio_snapshot_id").is_in([snap[victim], snap[unknown_model]]))
    frames["positions"] = pl.concat([frames["positions"], duplicated.group_by("portfolio_snapshot_id", maintain_order=True).first()
                                     .select(frames["positions"].columns).with_columns(pl.col("quantity") + 1)])
    frames["overdraft_limits"] = pl.DataFrame({"run_key": [victim], "currency": ["aud"], "max_overdraft": [Decimal(100)]},
                                              schema=frames["overdraft_limits"].schema)
    frames["group_constraints"] = pl.concat([frames["group_constraints"], pl.DataFrame(
        {"run_key": [victim], "constraint_key": ["sector:TECH"], "max_weight": [Decimal("1.5")]}, schema=frames["group_constraints"].schema)])
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(pl.col("run_key") == unknown_model).then(pl.lit("NO_SUCH_MODEL")).otherwise(pl.col("model_id")).alias("model_id"))
    sweep(write_book(frames, tmp_path / "book"), tmp_path / "out", progress=False)

    runs = {r["run_key"]: r for r in _read(tmp_path / "out", "runs").iter_rows(named=True)}
    faults = _read(tmp_path / "out", "input_faults")
    mine = faults.filter(pl.col("run_key") == victim)
    assert mine["input_table"].unique(maintain_order=True).to_list() == ["positions", "group_constraints", "overdraft_limits"]
    assert runs[victim]["block_reason"] == "INVALID_HOLDINGS"
    assert runs[victim]["block_detail"].startswith("positions row ")
    assert runs[victim]["block_detail"].endswith(f" (and {mine.height - 1} more in input_faults)")
    assert runs[unknown_model]["block_reason"] == "UNKNOWN_MODEL" and "NO_SUCH_MODEL" in runs[unknown_model]["block_detail"]
    assert faults.filter(pl.col("run_key") == unknown_model)["input_table"].unique().to_list() == ["positions"]
    assert {k for k, r in runs.items() if r["block_reason"] in ("INVALID_HOLDINGS", "INVALID_LIMITS", "UNKNOWN_MODEL")} == {
        victim, unknown_model}


def test_lots_that_do_not_add_up_to_their_position_block_it_as_the_json_door_refuses_it(tmp_path):
    """Spec §3.6 item 6: lots summing to more or less than their position (beyond 0.0001),
    or lots of an instrument not held, make the request a 422; in a sweep that portfolio is
    INVALID_HOLDINGS, named in input_faults, and the others run as before. read_book raises."""
    frames = generate_book_frames(8, 31, holdings=(3, 6), bad_data=False)
    lotted = frames["lots"].group_by("portfolio_snapshot_id", maintain_order=True).first().head(2)
    (over_snapshot, over_instrument), (orphan_snapshot, _) = lotted.select("portfolio_snapshot_id", "instrument_id").rows()
    over = (pl.col("portfolio_snapshot_id") == over_snapshot) & (pl.col("instrument_id") == over_instrument)
    position = frames["positions"].filter(over)["quantity"][0]
    lots = frames["lots"].with_columns(pl.when(over & (pl.int_range(pl.len()).over(over) == 0))
                                       .then(pl.col("quantity") + Decimal("0.0002")).otherwise(pl.col("quantity")).alias("quantity"))
    stray = lots.filter(pl.col("portfolio_snapshot_id") == orphan_snapshot).head(1).with_columns(pl.lit("NOT_HELD").alias("instrument_id"),
                                                                                               pl.lit("L_STRAY").alias("lot_id"))
    clean = write_book(frames, tmp_path / "clean")
    frames["lots"] = pl.concat([lots, stray])
    bad = write_book(frames, tmp_path / "bad")
    sweep(clean, tmp_path / "clean_out", progress=False)
    sweep(bad, tmp_path / "bad_out", progress=False)
    runs, before = _read(tmp_path / "bad_out", "runs"), _read(tmp_path / "clean_out", "runs")
    blocked = runs.filter(pl.col("block_reason") == "INVALID_HOLDINGS")
    snapshot_of = dict(frames["portfolios"].select("run_key", "portfolio_snapshot_id").rows())
    assert sorted(snapshot_of[k] for k in blocked["run_key"]) == sorted([over_snapshot, orphan_snapshot])
    faults = {row_key: (table, column, value) for table, row_key, column, value in
              _read(tmp_path / "bad_out", "input_faults").select("input_table", "row_key", "input_column", "value").rows()}
    assert faults == {"NOT_HELD": ("lots", "quantity", f"{stray['quantity'][0].normalize():f} (the position holds none)"),
                      over_instrument: ("lots", "quantity", f"{(position + Decimal('0.0002')).normalize():f} (the position holds "
                                                            f"{position.normalize():f})")}
    others = ~pl.col("run_key").is_in(blocked["run_key"].implode())
    assert runs.filter(others).drop("run_id", strict=False).equals(before.filter(others).drop("run_id", strict=False))
    with pytest.raises(BookError, match="whose lots do not add up"):
        read_book(bad)
    # a difference within the tolerance is no fault, as in the JSON door
    frames["lots"] = frames["lots"].filter(pl.col("lot_id") != "L_STRAY").with_columns(
        pl.when(over & (pl.int_range(pl.len()).over(over) == 0)).then(pl.col("quantity") - Decimal("0.0001")).otherwise(pl.col("quantity"))
        .alias("quantity"))
    read_book(write_book(frames, tmp_path / "within"))
    # a lotted position whose own quantity is no number is that one fault: its lots are not
    # also told as lots of a position it does not hold
    frames["positions"] = frames["positions"].with_columns(pl.col("quantity").cast(pl.String)).with_columns(
        pl.when(over).then(pl.lit("abc")).otherwise(pl.col("quantity")).alias("quantity"))
    sweep(write_book(frames, tmp_path / "unreadable"), tmp_path / "unreadable_out", progress=False)
    faults = _read(tmp_path / "unreadable_out", "input_faults")
    assert faults.select("input_table", "row_key", "input_column", "value").rows() == [("positions", over_instrument, "quantity", "abc")]
    detail = _read(tmp_path / "unreadable_out", "runs").filter(pl.col("block_reason") == "INVALID_HOLDINGS")["block_detail"].to_list()
    assert len(detail) == 1 and "more in input_faults" not in detail[0]


def test_bad_option_values_block_their_portfolio(tmp_path):
    """A portfolio's own bad value (an option out of range or not in its enum, a number
    that is not one, a lower-case base currency) blocks that portfolio only; a repeated
    run_key, which would leave two portfolios one record, still stops before any work."""
    frames = generate_book_frames(30, 4, holdings=(4, 8))
    clean = write_book(frames, tmp_path / "clean")
    ids = frames["portfolios"]["run_key"].to_list()
    row = pl.int_range(pl.len())
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(row == 3).then(Decimal("1.5")).otherwise(pl.col("max_turnover_pct")).alias("max_turnover_pct"),
        pl.when(row == 11).then(pl.lit("CALC")).otherwise(pl.col("valuation_mode")).alias("valuation_mode"),
        pl.when(row == 17).then(pl.lit("five")).otherwise(pl.col("settlement_horizon_days").cast(pl.String)).alias("settlement_horizon_days"),
        pl.when(row == 29).then(pl.lit("usd")).otherwise(pl.col("base_currency")).alias("base_currency"),
    )
    broken = write_book(frames, tmp_path / "broken")
    sweep(clean, tmp_path / "clean_out", shard_size=8, progress=False)
    manifest = sweep(broken, tmp_path / "broken_out", shard_size=8, progress=False)
    assert manifest["portfolios"] == 30

    runs = _read(tmp_path / "broken_out", "runs")
    blocked = runs.filter(pl.col("block_reason") == "INVALID_PORTFOLIO")
    assert sorted(blocked["run_key"]) == sorted([ids[3], ids[11], ids[17], ids[29]])
    assert (blocked["status"] == "BLOCKED").all()
    faults = _read(tmp_path / "broken_out", "input_faults")
    assert {(r["run_key"], r["input_column"], r["value"]) for r in faults.iter_rows(named=True)} == {
        (ids[3], "max_turnover_pct", "1.50000000000000000000"), (ids[11], "valuation_mode", "CALC"),
        (ids[17], "settlement_horizon_days", "five"), (ids[29], "base_currency", "usd"),
    }
    assert set(faults["input_table"]) == {"portfolios"}
    assert dict(zip(blocked["run_key"], blocked["block_detail"]))[ids[11]] == \
        "portfolios: valuation_mode CALC fails isin(['CALCULATED', 'TRUST_SNAPSHOT'])"
    others = [_read(out, "intents").filter(~pl.col("run_key").is_in(blocked["run_key"].implode()))
              for out in (tmp_path / "clean_out", tmp_path / "broken_out")]
    assert others[0].equals(others[1])

    # a what-if sweep names the failed values under every scenario's run that keeps them:
    # "cap" sets max_turnover_pct itself, so ids[3] runs under it
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps({"scenarios": {"base": {"options": {}}, "cap": {"options": {"max_turnover_pct": "0.1"}}}}))
    sweep(broken, tmp_path / "what_if", shard_size=8, progress=False, scenarios=scenarios)
    what_if = _read(tmp_path / "what_if", "input_faults")
    assert sorted(what_if["run_key"]) == sorted(f"{k}|{s}" for k in blocked["run_key"] for s in ("base", "cap")
                                                if (k, s) != (ids[3], "cap"))
    assert _read(tmp_path / "what_if", "runs").filter(pl.col("run_key").is_in(what_if["run_key"].implode()))["block_reason"].unique().to_list() == ["INVALID_PORTFOLIO"]

    frames["portfolios"] = pl.concat([frames["portfolios"], frames["portfolios"].head(1)])
    repeated = write_book(frames, tmp_path / "repeated")
    with pytest.raises(BookError, match="portfolios.parquet.*uniqueness"):
        sweep(repeated, tmp_path / "repeated_out", shard_size=8, progress=False)
    assert not (tmp_path / "repeated_out").exists()


def test_a_bad_limit_under_scenarios_blocks_only_the_runs_that_read_it(tmp_path):
    """A group constraint that does not cast blocks its portfolio under every scenario that
    reads the book's limits, as without scenarios; a scenario giving its own limits does not
    read it. Before, the whole what-if sweep stopped with a bare Polars cast error."""
    frames = generate_book_frames(30, 5, holdings=(4, 8))
    limits = frames["group_constraints"]
    victim = limits["run_key"][0]
    frames["group_constraints"] = limits.with_columns(
        pl.when(pl.col("run_key") == victim).then(pl.lit("0,05")).otherwise(pl.col("max_weight").cast(pl.String)).alias("max_weight"))
    book = write_book(frames, tmp_path / "book")
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps({"scenarios": {
        "base": {"options": {}}, "own": {"options": {"group_constraints": {"sector:TECH": {"max_weight": "0.3"}}}},
    }}))
    manifest = sweep(book, tmp_path / "out", shard_size=8, progress=False, scenarios=scenarios)
    assert manifest["portfolios"] == 60
    runs = _read(tmp_path / "out", "runs")
    blocked = runs.filter(pl.col("block_reason") == "INVALID_LIMITS")
    assert blocked["run_key"].to_list() == [f"{victim}|base"]
    faults = _read(tmp_path / "out", "input_faults")
    assert faults.select("run_key", "input_table", "input_column", "value").rows() == [
        (f"{victim}|base", "group_constraints", "max_weight", "0,05")]
    assert runs.filter(pl.col("run_key") == f"{victim}|own")["block_reason"].to_list() != ["INVALID_LIMITS"]


def test_a_scenario_setting_an_option_the_book_has_wrong_runs_with_its_own_value(tmp_path):
    """A book value that fails its checks blocks the portfolio (INVALID_PORTFOLIO) under
    every scenario that keeps it; a scenario that sets that option runs with its own value,
    as a plain sweep of the book with that value does."""
    frames = generate_book_frames(12, 5, holdings=(4, 8))
    victim = frames["portfolios"]["run_key"][3]
    wrong = frames["portfolios"].with_columns(
        pl.when(pl.col("run_key") == victim).then(pl.lit("2")).otherwise(pl.col("max_turnover_pct").cast(pl.String))
        .alias("max_turnover_pct"))
    book = write_book({**frames, "portfolios": wrong}, tmp_path / "book")
    fixed = write_book({**frames, "portfolios": frames["portfolios"].with_columns(
        pl.lit(Decimal("0.5")).cast(frames["portfolios"].schema["max_turnover_pct"]).alias("max_turnover_pct"))}, tmp_path / "fixed")
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps({"scenarios": {"base": {"options": {}}, "half": {"options": {"max_turnover_pct": "0.5"}}}}))
    sweep(book, tmp_path / "out", shard_size=5, progress=False, scenarios=scenarios)
    sweep(fixed, tmp_path / "plain", shard_size=5, progress=False)
    runs = _read(tmp_path / "out", "runs")
    assert runs.filter(pl.col("block_reason") == "INVALID_PORTFOLIO")["run_key"].to_list() == [f"{victim}|base"]
    assert _read(tmp_path / "out", "input_faults")["run_key"].to_list() == [f"{victim}|base"]
    half = runs.filter(pl.col("scenario_id") == "half").sort("portfolio_id").select("portfolio_id", "status", "block_reason")
    assert half.equals(_read(tmp_path / "plain", "runs").sort("portfolio_id").select("portfolio_id", "status", "block_reason"))
    intents = _read(tmp_path / "out", "intents").filter(pl.col("run_key").str.ends_with("|half"))
    assert intents.height == _read(tmp_path / "plain", "intents").height > 0


def test_a_scenario_value_failing_in_the_shards_is_named_by_each_run_it_blocks(tmp_path, monkeypatch):
    """A scenario value that only the shards' read of its rows finds bad (here one the
    scenario check is made to let through) blocks its runs with the fault named in
    input_faults and block_detail, never a bare INVALID_PORTFOLIO."""
    import dpm_vec.scenarios as scenarios_module

    monkeypatch.setattr(scenarios_module, "_refuse_unholdable", lambda *args: None)
    book = _book(tmp_path, n=6, seed=5, bad_data=False)
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps({"scenarios": {"base": {"options": {}},
                                                   "odd": {"options": {"min_trade_notional": {"amount": "10", "currency": "usd"}}}}}))
    sweep(book, tmp_path / "out", shard_size=4, progress=False, scenarios=scenarios)
    runs = _read(tmp_path / "out", "runs")
    odd = runs.filter(pl.col("scenario_id") == "odd")
    assert odd["block_reason"].to_list() == ["INVALID_PORTFOLIO"] * 6
    assert odd["block_detail"].to_list() == ["portfolios: min_trade_notional_currency usd fails str_matches('^[A-Z]{3}$')"] * 6
    faults = _read(tmp_path / "out", "input_faults")
    assert sorted(faults["run_key"]) == sorted(odd["run_key"]) and set(faults["value"]) == {"usd"}
    assert runs.filter(pl.col("scenario_id") == "base")["block_reason"].is_null().all()


@pytest.mark.parametrize(
    ("table", "column", "change", "found"),
    [
        ("cash", "amount", pl.col("amount") > 0, "bool"),
        # text is read as ISO 8601 (test_timestamps_written_as_iso_text_read_as_timestamps); a flag is no time
        ("portfolios", "portfolio_as_of", pl.col("portfolio_as_of").is_null(), "bool"),
        # a decimal past 38 digits, which Polars cannot read: named, not Polars' bare "precision must be between 1 and 38"
        ("prices", "price", None, "decimal256(40, 20), expected Decimal(precision=38, scale=20) (or a type that casts to it: text"),
    ],
)
def test_a_column_of_an_impossible_type_stops_before_any_shard(book, tmp_path, table, column, change, found):
    bad = tmp_path / "bad"
    shutil.copytree(book, bad)
    if found.startswith("decimal256"):  # Polars writes no decimal wider than 38 digits
        import pyarrow.parquet as pq

        frame = pq.read_table(book / f"{table}.parquet")
        at = frame.schema.get_field_index(column)
        pq.write_table(frame.set_column(at, column, frame[column].cast(pa.decimal256(40, 20))), bad / f"{table}.parquet")
    else:
        pl.read_parquet(book / f"{table}.parquet").with_columns(change.alias(column)).write_parquet(bad / f"{table}.parquet")
    with pytest.raises(BookError) as err:
        sweep(bad, tmp_path / "out", shard_size=30, progress=False)
    assert f"{table}.parquet" in str(err.value) and f"'{column}'" in str(err.value) and f"wrong type: {found}" in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.work-*"))


def test_missing_file_is_a_clear_error(tmp_path):
    book = _book(tmp_path, n=3)
    (book / "fx_rates.parquet").unlink()
    proc = subprocess.run([sys.executable, "-m", "dpm_vec.cli", "sweep", str(book), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "fx_rates.parquet" in proc.stderr and "missing file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _sweep_command(book: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "dpm_vec.cli", "sweep", str(book), "--out", str(out), "--shard-size", "10", "--quiet", *options]


def _wait_for_commits(proc: subprocess.Popen, out: Path, shards: int) -> None:
    """Return once ``shards`` shards of the sweep writing ``out`` have committed; the
    process must still be running then, so that stopping it interrupts real work."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.parent.glob(f".{out.name}.work-*/shards/shard-*/_SUCCESS"))) >= shards:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "sweep finished before it could be stopped; make the book bigger"


@pytest.fixture(scope="module")
def kill_book(tmp_path_factory) -> tuple[Path, Path]:
    """A book of 24 shards of 10, enough to stop a sweep mid-way, and its uninterrupted
    one-thread sweep in one shard (outputs do not depend on the shard size): every kill
    test resumes to that."""
    root = tmp_path_factory.mktemp("kill")
    book = _book(root, n=240, seed=21)
    sweep(book, root / "reference", shard_size=240, threads=1, progress=False)
    return book, root / "reference"


def _resumes_to_identical_output(cmd: list[str], out: Path, reference: Path, committed: int) -> None:
    """The same command finishes the rest, reusing the committed shards, with the outputs
    of an uninterrupted sweep (``reference``)."""
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_shards"] >= committed
    # the log (no terminal: one line a shard) says what was resumed, and ends at the whole book
    n = manifest["portfolios"]
    assert f"resuming: {manifest['resumed_shards']} of {manifest['shards']} shards already done" in resumed.stderr
    assert f"{manifest['shards']} of {manifest['shards']} shards done ({n:,} of {n:,} portfolios, 100%)" in resumed.stderr
    _same_outputs(out, reference)


def test_progress_log_estimates_time_left_from_this_runs_pace_only(caplog):
    """A batch job's log gets one line a shard with the time left at this run's pace:
    shards resumed from an earlier run are done but took no time now, so they must not
    count toward it (here they would make the minute left look like 20 s)."""
    from dpm_vec.sweep import _Progress

    now = [100.0]
    progress = _Progress(5, 500, enabled=False, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="dpm_vec.sweep"):
        progress.resume(2, 200)
        now[0] += 30
        progress.advance(1, 100)  # 100 portfolios in 30 s; 200 left
        now[0] += 3725
        progress.advance(2, 200)
    assert [r.getMessage() for r in caplog.records] == [
        "resuming: 2 of 5 shards already done (200 of 500 portfolios)",
        "3 of 5 shards done (300 of 500 portfolios, 60%); 30 s elapsed, about 1 min 00 s left",
        "5 of 5 shards done (500 of 500 portfolios, 100%); 1 h 02 min elapsed",
    ]


@pytest.mark.parametrize("options", [("--threads", "2"), ("--processes", "2")], ids=["threads", "processes"])
def test_killed_sweep_resumes_to_identical_output(tmp_path, kill_book, options):
    """Kill a real sweep process (and its worker processes, if any) after some shards
    committed; the rerun finishes the rest."""
    book, reference = kill_book
    out = tmp_path / "out"
    cmd = _sweep_command(book, out, *options)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_commits(proc, out, 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "an interrupted sweep must not leave a complete-looking output"
    _resumes_to_identical_output(cmd, out, reference, committed=3)
    runs = _read(out, "runs")
    assert runs["run_key"].n_unique() == runs.height == 240


def test_a_worker_process_killed_ends_the_sweep_with_a_clear_error(tmp_path, kill_book):
    """A worker that dies mid-shard (the OOM killer, say) ends the sweep with one line
    saying so and exit code 2, not a traceback; the same command then resumes."""
    import psutil

    book, reference = kill_book
    out = tmp_path / "out"
    cmd = _sweep_command(book, out, "--processes", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_commits(proc, out, 2)
    workers = _sweep_workers(proc.pid)
    assert len(workers) == 2, [p.cmdline() for p in psutil.Process(proc.pid).children()]
    workers[0].kill()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines()[-1].startswith("dpm-vec: error: a sweep worker process ended without finishing its shard")
    assert "Traceback" not in stderr and not out.exists()
    _resumes_to_identical_output(cmd, out, reference, committed=2)


def test_a_bad_file_found_in_a_worker_process_is_named_not_blamed_on_memory(tmp_path):
    """A holdings file whose last row group is corrupt reads fine until a worker process
    reaches that group: its BookError must come back whole (errors pickle with their
    fields), naming the file, not as a worker that died."""
    import pyarrow.parquet as pq

    book = _book(tmp_path, n=60, seed=26, bad_data=False)
    positions = book / "positions.parquet"
    pq.write_table(pq.read_table(positions), positions, row_group_size=100, compression="snappy", use_dictionary=False)
    meta = pq.ParquetFile(positions).metadata
    last = meta.row_group(meta.num_row_groups - 1)
    (chunk,) = [last.column(i) for i in range(last.num_columns) if last.column(i).path_in_schema == "quantity"]
    data = bytearray(positions.read_bytes())
    for i in range(chunk.data_page_offset + 40, chunk.data_page_offset + chunk.total_compressed_size - 2):
        data[i] = (data[i] * 31 + 17) % 256  # the page's values, not its header
    positions.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = subprocess.run(_sweep_command(book, out, "--processes", "2", "--shard-size", "5"), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"dpm-vec: error: {positions}: not a readable Parquet file"), last_line
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_worker_process_whose_sweep_already_ended_exits_at_once():
    """A worker started just as its sweep died (the parent gone before the kill-with-parent
    request took hold) ends at once, printing nothing, instead of running on unowned."""
    code = "from dpm_vec.sweep import _die_with_parent; _die_with_parent(1); print('still running')"
    gone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (gone.returncode, gone.stdout) == (1, "")
    mine = code.replace("(1)", "(__import__('os').getppid())")
    assert subprocess.run([sys.executable, "-c", mine], capture_output=True, text=True, timeout=120).stdout == "still running\n"


@pytest.mark.parametrize("error", [
    BookError("positions.parquet", "wrong type", column="quantity", examples=["row 3"]),
    RequestError([fault("options.max_turnover_pct", "must be <= 1", "less_than_equal", "2")]),
    QuantityRangeError("a BUY of 1E10 units", {"PF1": "a BUY of 1E10 units of X"}),
    InfeasibleConstraintError("no room", "PF1"),
], ids=lambda e: type(e).__name__)
def test_errors_cross_a_process_boundary_whole(error):
    """A worker process's error is pickled back to the sweep: every field survives."""
    import pickle

    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)


def test_ctrl_c_on_a_process_sweep_says_so_once(tmp_path, kill_book):
    """Ctrl-C reaches the whole process group on a terminal: the workers leave it to the
    sweep, which says how to go on in one line, exit code 130, no traceback."""
    book, reference = kill_book
    out = tmp_path / "out"
    cmd = _sweep_command(book, out, "--processes", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_commits(proc, out, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "dpm-vec: interrupted (committed shards are kept: the same command resumes)"
    assert stderr.count("dpm-vec: interrupted") == 1
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and not out.exists()
    _resumes_to_identical_output(cmd, out, reference, committed=2)


def _sweep_workers(pid: int) -> list:
    """The worker processes (``psutil.Process``) that the sweep process ``pid`` spawned."""
    import psutil

    return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]


def _catches_sigint(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGINT now (Linux: /proc's SigCgt mask)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGINT - 1) & 1)


def _imports_polars(pid: int) -> bool:
    """Whether process ``pid`` has loaded Polars' compiled library (Linux: /proc's maps)."""
    return "polars" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the processes' signal handlers and libraries in /proc")
def test_ctrl_c_while_the_workers_still_import_prints_no_traceback(tmp_path, kill_book):
    """A Ctrl-C in a sweep's first second, while its worker processes still import the
    engine (before their initializer can ignore it), reaches them too: none may print a
    KeyboardInterrupt traceback, and the sweep says it was interrupted, once."""
    import psutil

    book, _ = kill_book
    out = tmp_path / "out"
    proc = subprocess.Popen(_sweep_command(book, out, "--processes", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline, workers = time.monotonic() + 60, []
    while time.monotonic() < deadline and proc.poll() is None and len(workers) < 2:
        with contextlib.suppress(psutil.Error):
            workers = _sweep_workers(proc.pid)
        time.sleep(0.005)
    assert len(workers) == 2, "the sweep never started its two worker processes"
    # past the interpreter's start (a SIGINT before Python's handler kills a worker silently)
    # and into its imports: Polars' library is loaded
    while time.monotonic() < deadline and not all(_imports_polars(worker.pid) for worker in workers):
        time.sleep(0.002)
    while time.monotonic() < deadline and not _catches_sigint(proc.pid):  # the sweep ignores it while it spawns
        time.sleep(0.001)
    assert not list(out.parent.glob(f".{out.name}.work-*/shards/shard-*/_SUCCESS")), "a shard committed already: too late"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    # 130 even when the Ctrl-C landed in a dataclass's generated code while the sweep still
    # imported (cli._forget_unhandled_interrupt: else, under python -m, ended by SIGINT)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert stderr.strip().splitlines()[-1].startswith("dpm-vec: interrupted"), stderr
    assert stderr.count("dpm-vec: interrupted") == 1, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.parametrize("stop, options, code, said", [
    (signal.SIGINT, ("--threads", "2"), 130, "interrupted"),
    (signal.SIGTERM, ("--processes", "2"), 143, "terminated"),  # a job scheduler's stop, plain kill
    (signal.SIGHUP, ("--processes", "2"), 129, "terminated"),  # the terminal or ssh session closed
], ids=["ctrl-c-threads", "sigterm-processes", "sighup-processes"])
def test_interrupted_sweep_says_so_and_resumes(tmp_path, kill_book, stop, options, code, said):
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP to the sweep's own process: one line saying how to go on,
    its exit code, no traceback, no output dir; the same command then finishes the rest."""
    book, reference = kill_book
    out = tmp_path / "out"
    cmd = _sweep_command(book, out, *options)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_commits(proc, out, 2)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"dpm-vec: {said} (committed shards are kept: the same command resumes)"
    assert "Traceback" not in stderr and not out.exists()
    _resumes_to_identical_output(cmd, out, reference, committed=2)


def test_a_full_disk_leaves_no_half_shard_and_the_rerun_resumes(book, swept, tmp_path, monkeypatch):
    """A shard whose write fails (a full disk) is named with where it was written and how
    to go on, and leaves no half-written staging folder; staging folders a killed run left
    are cleared before the rerun computes, so retries do not fill the disk further."""
    import errno

    import dpm_vec.sweep as sweep_module

    real_write = pl.DataFrame.write_parquet

    def full_disk(frame, path, *args, **kwargs):
        if ".shard-00001.tmp-" in str(path) and Path(path).name == "intents.parquet":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(frame, path, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full_disk)
    out = tmp_path / "out"
    with pytest.raises(DpmVecError, match=r"^cannot write shard 1 under .*/shards: \[Errno 28\] No space left on device; "
                                          r"committed shards are kept: the same command resumes$"):
        sweep(book, out, shard_size=30, threads=1, progress=False)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", real_write)
    work = next(tmp_path.glob(".out.work-*"))
    assert [p.parent.name for p in work.glob("shards/*/_SUCCESS")] == ["shard-00000"]
    assert not list(work.rglob("*.tmp-*"))
    planted = work / "shards" / ".shard-00002.tmp-0123abcd"  # what a killed run leaves
    planted.mkdir()
    (planted / "runs.parquet").write_bytes(b"half")
    real_run = sweep_module._run_in_process

    def run(plan, pending, reporter, threads=1):
        assert not planted.exists() and pending == [1, 2]
        return real_run(plan, pending, reporter, threads)

    monkeypatch.setattr(sweep_module, "_run_in_process", run)
    assert sweep(book, out, shard_size=30, threads=1, progress=False)["resumed_shards"] == 1
    _same_outputs(swept[0], out)


def test_a_full_disk_while_holdings_are_split_closes_every_file(book, tmp_path, monkeypatch):
    """The split of a scattered book's holdings writes a file per shard at once; a full
    disk closing them fails each: every one is still closed (none left for the garbage
    collector to fail on with a traceback) and the half split is removed."""
    import errno
    import gc

    import pyarrow.parquet as pq

    scattered = _scattered_copy(book, tmp_path / "scattered")
    real_close = pq.ParquetWriter.close

    def full_disk(writer):
        real_close(writer)
        raise OSError(errno.ENOSPC, "No space left on device")

    unraisable = []
    monkeypatch.setattr(pq.ParquetWriter, "close", full_disk)
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(OSError, match="No space left on device"):
        sweep(scattered, tmp_path / "out", shard_size=20, threads=1, progress=False)
    gc.collect()
    assert unraisable == []
    work = next(tmp_path.glob(".out.work-*"))
    assert not list(work.glob(".partition.tmp-*")) and not (work / "partition").exists()


def _stopped_at_shard(monkeypatch, shard: int):
    """Make every sweep stop as shard ``shard`` would commit, the shards before it
    committed (a kill, in process); returns the function that lets sweeps finish again."""
    import dpm_vec.sweep as sweep_module

    real_commit = sweep_module.commit_shard

    def stop(plan, at, tables, timer):
        if at == shard:
            raise DpmVecError(f"stopped at shard {shard}")
        return real_commit(plan, at, tables, timer)

    monkeypatch.setattr(sweep_module, "commit_shard", stop)
    return lambda: monkeypatch.setattr(sweep_module, "commit_shard", real_commit)


def test_a_resumed_sweep_starts_no_more_worker_processes_than_it_has_shards_left(book, tmp_path, monkeypatch):
    """A scenarios sweep on worker processes, stopped with one shard left, runs that shard
    in one worker process on its rerun, which takes all the cores (not two, one idle
    and each with half the cores), and ends with the outputs of an uninterrupted sweep."""
    import dpm_vec.sweep as sweep_module

    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps({"scenarios": {"base": {"options": {}}, "cash_5": {"options": {"min_cash_buffer_pct": "0.05"}}}}))
    monkeypatch.setattr(sweep_module, "default_threads", lambda: 2)
    started: list[int] = []
    real_pool = sweep_module._worker_pool

    def recorded(processes, first):
        started.append(processes)
        return real_pool(processes, first)

    monkeypatch.setattr(sweep_module, "_worker_pool", recorded)
    whole = sweep(book, tmp_path / "whole", shard_size=32, progress=False, scenarios=scenarios)
    assert (whole["shards"], whole["processes"], started) == (5, 2, [2])
    resume = _stopped_at_shard(monkeypatch, 4)
    with pytest.raises(DpmVecError, match="stopped at shard 4"):
        sweep(book, tmp_path / "out", shard_size=32, threads=1, progress=False, scenarios=scenarios)
    resume()
    started.clear()
    manifest = sweep(book, tmp_path / "out", shard_size=32, progress=False, scenarios=scenarios)
    assert (manifest["resumed_shards"], started) == (4, [1])
    _same_outputs(tmp_path / "whole", tmp_path / "out")


def test_a_rerun_with_another_shard_size_never_reuses_shards_cut_at_the_old_size(book, swept, tmp_path, monkeypatch):
    """Shards are numbered within one shard size: shard 0 of 20 portfolios is not shard 0
    of 30. A sweep stopped midway and run again with another --shard-size starts afresh,
    or portfolios 21-30 would be missing; the old size's work is removed at the end."""
    resume = _stopped_at_shard(monkeypatch, 1)
    out = tmp_path / "out"
    with pytest.raises(DpmVecError, match="stopped at shard 1"):
        sweep(book, out, shard_size=20, threads=1, progress=False)
    assert len(list(tmp_path.glob(".out.work-*/shards/shard-00000/_SUCCESS"))) == 1
    resume()
    manifest = sweep(book, out, shard_size=30, threads=1, progress=False)
    assert manifest["resumed_shards"] == 0
    _same_outputs(swept[0], out)
    assert not list(tmp_path.glob(".out.work-*"))


def test_a_split_book_stopped_midway_resumes_from_its_split(book, swept, tmp_path, monkeypatch):
    """A scattered book's holdings are split into files per shard before any shard runs;
    stopped after that, the rerun reuses the split and the committed shards, and ends with
    the outputs of an uninterrupted sweep."""
    scattered = _scattered_copy(book, tmp_path / "scattered")
    resume = _stopped_at_shard(monkeypatch, 1)
    out = tmp_path / "out"
    with pytest.raises(DpmVecError, match="stopped at shard 1"):
        sweep(scattered, out, shard_size=30, threads=1, progress=False)
    assert list(tmp_path.glob(".out.work-*/partition"))
    resume()
    assert sweep(scattered, out, shard_size=30, threads=1, progress=False)["resumed_shards"] == 1
    _same_outputs(swept[0], out)


def test_a_shard_folder_that_lost_its_commit_marker_is_named_not_reused(book, tmp_path, monkeypatch):
    """A committed shard whose _SUCCESS marker is gone (deleted by hand, a disk fault) is
    no committed shard: the rerun does not read it, and says which folder to delete."""
    resume = _stopped_at_shard(monkeypatch, 1)
    out = tmp_path / "out"
    with pytest.raises(DpmVecError, match="stopped at shard 1"):
        sweep(book, out, shard_size=30, threads=1, progress=False)
    work = next(tmp_path.glob(".out.work-*"))
    (work / "shards" / "shard-00000" / "_SUCCESS").unlink()
    resume()
    with pytest.raises(DpmVecError, match=rf"^{re.escape(str(work / 'shards' / 'shard-00000'))} holds files of no committed "
                                          rf"shard; nothing else writes there: delete {re.escape(str(work))} and run"):
        sweep(book, out, shard_size=30, threads=1, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["empty_marker", "marker_of_no_counts", "marker_of_a_list", "empty_table", "truncated_runs",
                                    "short_intents"])
def test_a_committed_shard_whose_files_were_lost_runs_again(book, swept, tmp_path, monkeypatch, caplog, damage):
    """A power cut after a shard's rename, before its files reached the disk, can leave
    its marker or tables empty or cut short: the rerun names the shard, runs it again and
    ends with the outputs of an uninterrupted sweep, instead of failing on the marker or
    copying broken files into OUT."""
    resume = _stopped_at_shard(monkeypatch, 1)
    out = tmp_path / "out"
    with pytest.raises(DpmVecError, match="stopped at shard 1"):
        sweep(book, out, shard_size=30, threads=1, progress=False)
    shard = next(tmp_path.glob(".out.work-*/shards/shard-00000"))
    if damage.endswith("marker"):
        (shard / "_SUCCESS").write_text("")
    elif damage.startswith("marker_of"):
        (shard / "_SUCCESS").write_text("{}" if damage == "marker_of_no_counts" else "[]")
    elif damage == "empty_table":
        (shard / "intents.parquet").write_bytes(b"")
    elif damage == "truncated_runs":
        runs = (shard / "runs.parquet").read_bytes()
        (shard / "runs.parquet").write_bytes(runs[: len(runs) // 2])
    else:  # a file that reads, with fewer rows than the shard wrote
        intents = pl.read_parquet(shard / "intents.parquet")
        assert intents.height > 5
        intents.head(5).write_parquet(shard / "intents.parquet")
    resume()
    with caplog.at_level(logging.WARNING, logger="dpm_vec.sweep"):
        manifest = sweep(book, out, shard_size=30, threads=1, progress=False)
    assert manifest["resumed_shards"] == 0
    assert [r.getMessage() for r in caplog.records if "do not read whole" in r.getMessage()] == [
        f"{shard} was committed but its files do not read whole (lost after the commit: a power cut or a disk fault); "
        "the shard runs again"]
    _same_outputs(swept[0], out)


def test_a_book_rewritten_during_the_sweep_is_refused_not_mixed(tmp_path, monkeypatch):
    """Shards read the book's files as they run: a file replaced after some shards have
    committed would mix old and new prices in one output under the old file's hash. The
    sweep refuses to write OUT, naming the file; the rerun sweeps the book as it is."""
    import dpm_vec.sweep as sweep_module

    book = _book(tmp_path, n=60, seed=5)
    real_commit = sweep_module.commit_shard

    def commit_then_edit(plan, shard, tables, timer):
        counts = real_commit(plan, shard, tables, timer)
        if shard == 0:
            prices = pl.read_parquet(book / "prices.parquet")
            prices.with_columns(pl.col("price") * 2).write_parquet(book / "prices.new")
            os.replace(book / "prices.new", book / "prices.parquet")
        return counts

    monkeypatch.setattr(sweep_module, "commit_shard", commit_then_edit)
    out = tmp_path / "out"
    with pytest.raises(DpmVecError, match=r"prices\.parquet changed while the sweep ran, .* was not written; run the same command"):
        sweep(book, out, shard_size=20, threads=1, progress=False)
    assert not out.exists()
    monkeypatch.setattr(sweep_module, "commit_shard", real_commit)
    manifest = sweep(book, out, shard_size=20, threads=1, progress=False)
    assert manifest["resumed_shards"] == 0  # shards of the old prices are never reused
    assert manifest["input_hashes"]["prices.parquet"] == sweep_module.file_sha256(book / "prices.parquet")


def test_an_interrupt_after_out_is_whole_says_so(book, swept, tmp_path, monkeypatch, capsys):
    """A signal while the sweep removes its work dir, after OUT is in place, must not say
    the sweep can resume (nothing of it is left to resume): it says OUT was written."""
    import dpm_vec.sweep as sweep_module
    from dpm_vec.cli import main

    def interrupted(path, out_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "discard", interrupted)
    out = tmp_path / "out"
    assert main(["sweep", str(book), "--out", str(out), "--shard-size", "30", "--threads", "1", "--quiet"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"dpm-vec: interrupted after {out} was written whole (the next sweep to it removes what its clean-up left)")
    _same_outputs(swept[0], out)


@needs_proc
def test_out_is_on_disk_before_it_is_renamed_into_place_and_the_work_dir_goes(book, swept, tmp_path, monkeypatch):
    """A power cut after the sweep must leave the earlier OUT or the whole new one, not
    renamed names over unwritten bytes with the work dir to redo them gone: every file
    and folder of the staged OUT is fsync'd before the rename, the folder holding OUT
    after it, and only then is the work dir removed."""
    import dpm_vec.sweep as sweep_module

    events = record_publishing(monkeypatch)
    discard = sweep_module.discard

    def discarded(work: Path, out_dir: Path) -> None:
        events.append(("discard", Path(work)))
        discard(work, out_dir)

    monkeypatch.setattr(sweep_module, "discard", discarded)
    out = tmp_path / "out"
    sweep(book, out, shard_size=30, threads=1, progress=False)
    _same_outputs(swept[0], out)
    assert [kind for kind, _ in assert_published_durably(events, out)] == ["discard"]


def test_a_path_that_is_not_utf8_is_named(book, tmp_path):
    folder = tmp_path / os.fsdecode(b"lat\xe9")
    with pytest.raises(DpmVecError, match=r"^--out b'.*/lat\\xe9/out': a path with bytes that are not UTF-8 text"):
        sweep(book, folder / "out", progress=False)


def test_changed_engine_code_never_resumes_old_shards(tmp_path, monkeypatch):
    """The work dir (what a rerun resumes) is keyed by the engine's source as well as its
    version: shards computed by other code, same version number, are never reused."""
    import dpm_vec.sweep as sweep_module

    package = tmp_path / "pkg"
    (package / "stages").mkdir(parents=True)
    (package / "stages" / "fx.py").write_text("RATE = 1\n")
    before = sweep_module.source_digest(package)
    assert sweep_module.source_digest(package) == before
    (package / "stages" / "fx.py").write_text("RATE = 2\n")
    assert sweep_module.source_digest(package) != before

    book, out = tmp_path / "book", tmp_path / "out"
    plan_a = sweep_module.plan_sweep(book, out, 10, {"portfolios.parquet": "abc"}, 40)
    monkeypatch.setattr(sweep_module, "engine_source_digest", lambda: "other code")
    plan_b = sweep_module.plan_sweep(book, out, 10, {"portfolios.parquet": "abc"}, 40)
    assert plan_a.fingerprint != plan_b.fingerprint and plan_a.work_dir != plan_b.work_dir


def test_chosen_tables_are_the_full_sweeps_tables_and_nothing_else(book, swept, tmp_path):
    """--tables writes the datasets asked for, plus runs and input_faults (every portfolio
    keeps its run record), each equal to the full sweep's; no other dataset exists."""
    out, _ = swept
    chosen = tmp_path / "chosen"
    manifest = sweep(book, chosen, shard_size=30, progress=False, tables=["targets", "intents"])
    written = ("runs", "intents", "targets", "input_faults")
    assert sorted(p.name for p in chosen.iterdir() if p.is_dir()) == sorted(written)
    assert list(manifest["tables"]) == ["runs", "intents", "targets", "input_faults"]
    for table in written:
        assert _read(chosen, table).equals(_read(out, table), null_equal=True), table
    assert manifest["tables"]["intents"]["rows"] == _read(out, "intents").height > 0


def test_unknown_table_is_refused_before_any_work(book, tmp_path):
    with pytest.raises(DpmVecError, match=r"--tables: unknown dataset\(s\) trades; expected some of runs, intents, "):
        sweep(book, tmp_path / "out", progress=False, tables=["intents", "trades"])
    assert not list(tmp_path.iterdir()), "a refused sweep must leave nothing behind"


def test_table_choice_keys_the_work_dir_but_not_its_order(tmp_path):
    """A rerun asking for other tables never resumes shards written without them; the same
    tables in another order (or with spaces) resume."""
    from dpm_vec.sweep import plan_sweep, sweep_tables

    def plan(tables):
        return plan_sweep(tmp_path / "book", tmp_path / "out", 10, {"portfolios.parquet": "abc"}, 40, None, sweep_tables(tables))

    assert sweep_tables(None) == SWEEP_TABLES
    assert sweep_tables(["intents", " runs"]) == sweep_tables("runs,intents") == ("runs", "intents", "input_faults")
    assert plan(["intents", "runs"]).work_dir == plan(["intents"]).work_dir
    assert plan(["intents"]).work_dir != plan(["intents", "targets"]).work_dir != plan(None).work_dir


def test_dask_local_cluster_gives_identical_output(book, swept, tmp_path):
    """Two local workers from the command, each running Polars on its share of the cores
    (as worker processes do: two pools of all cores contend for them). A worker's spawn
    imports the command's module, and Polars with it, before LocalCluster's env= applies,
    so only an inherited POLARS_MAX_THREADS sizes its pool."""
    pytest.importorskip("dask.distributed")
    from dpm_vec.defaults import usable_cores

    out, _ = swept
    other = tmp_path / "dask"
    env = {k: v for k, v in os.environ.items() if k != "POLARS_MAX_THREADS"}
    done = subprocess.run([sys.executable, "-m", "dpm_vec.cli", "sweep", str(book), "--out", str(other), "--shard-size", "30",
                           "--workers", "2", "--quiet"], check=True, capture_output=True, text=True, env=env)
    # the sweep's log is its own: not Dask's INFO lines (~34), nor a warning that port 8787 is taken
    assert " distributed." not in done.stderr and "8787" not in done.stderr, done.stderr
    manifest = json.loads((other / "manifest.json").read_text())
    assert manifest["portfolios"] == 80 and manifest["workers"] == 2
    assert manifest["polars_threads"] == [max(1, usable_cores() // 2)]
    _same_outputs(out, other)


def test_an_existing_cluster_reads_a_rewritten_book_again(tmp_path):
    """A long-lived cluster's workers keep a book's shared tables between sweeps; once the
    book's prices are rewritten, the next sweep on the same cluster prices with the new
    ones, as a sweep in this process does."""
    pytest.importorskip("dask.distributed")
    from distributed import LocalCluster

    book = _book(tmp_path, n=40, bad_data=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        sweep(book, tmp_path / "before", shard_size=20, scheduler=cluster.scheduler_address, progress=False)
        prices = pl.read_parquet(book / "prices.parquet")
        prices.with_columns(pl.col("price") * 2).write_parquet(book / "prices.parquet")
        sweep(book, tmp_path / "after", shard_size=20, scheduler=cluster.scheduler_address, progress=False)
    sweep(book, tmp_path / "here", shard_size=20, threads=1, progress=False)
    _same_outputs(tmp_path / "after", tmp_path / "here")
    assert not _read(tmp_path / "after", "positions_after").equals(_read(tmp_path / "before", "positions_after"))


class _FailingClient:
    """A Dask client whose every task fails with ``exc``."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def submit(self, *args, **kwargs):
        return self

    def result(self):
        raise self.exc

    def close(self):
        pass

    def scheduler_info(self, **kwargs):
        return {"workers": {"tcp://worker:1": {}}}


def _dask_failures():
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    book = str(Path(__file__).parent.parent / "data" / "sample_book" / "portfolios.parquet")
    return [
        (KilledWorker("dpm-vec-shard-0", None, 3), "shard 0 ended each Dask worker that ran it (a worker's memory limit or the OOM killer"),
        (FutureCancelledError("dpm-vec-shard-0", "scheduler-connection-lost"),
         "lost the Dask scheduler tcp://cluster:8786 during the sweep (dpm-vec-shard-0 cancelled for reason: scheduler-connection-lost.)"),
        (CommClosedError("in <TCP ...>: Stream is closed"), "lost the Dask scheduler tcp://cluster:8786 during the sweep"),
        (BookError(book, "missing file: a book needs portfolios.parquet (see docs/book.md)"),
         "; this machine has it, a Dask worker does not: BOOK and OUT's folder must be on a file system the workers share"),
    ]


@pytest.mark.parametrize("exc, says", _dask_failures(), ids=["killed-worker", "scheduler-lost", "comm-closed", "unseen-book"])
def test_dask_failures_end_the_sweep_with_one_line(tmp_path, monkeypatch, exc, says):
    """Dask's own failures reached the user as tracebacks (exit 1): a shard that ended
    every worker it ran on (a memory limit), a lost scheduler, a book a worker cannot
    see. Each is now a DpmVecError (one line, exit 2) saying what to do."""
    import dask.distributed

    import dpm_vec.sweep as sweep_module

    monkeypatch.setattr(dask.distributed, "Client", lambda address: _FailingClient(exc))
    monkeypatch.setattr(dask.distributed, "as_completed", list)
    plan = sweep_module.plan_sweep(tmp_path / "book", tmp_path / "out", 10, {"portfolios.parquet": "abc"}, 10)
    with pytest.raises(DpmVecError) as caught:
        sweep_module._run_on_dask(plan, [0], "tcp://cluster:8786", None, None)
    assert says in str(caught.value) and str(caught.value).endswith("the same command resumes") == (not isinstance(exc, BookError))


def test_a_scheduler_with_no_workers_is_said_not_waited_on_silently(tmp_path, monkeypatch, caplog):
    """A --scheduler sweep on a cluster with no workers waited without a word."""
    import dask.distributed
    from distributed.scheduler import KilledWorker

    import dpm_vec.sweep as sweep_module

    class Empty(_FailingClient):
        def scheduler_info(self, **kwargs):
            return {"workers": {}}

    monkeypatch.setattr(dask.distributed, "Client", lambda address: Empty(KilledWorker("k", None, 3)))
    monkeypatch.setattr(dask.distributed, "as_completed", list)
    plan = sweep_module.plan_sweep(tmp_path / "book", tmp_path / "out", 10, {"portfolios.parquet": "abc"}, 10)
    with caplog.at_level(logging.WARNING, logger="dpm_vec.sweep"), pytest.raises(DpmVecError):
        sweep_module._run_on_dask(plan, [0], "tcp://cluster:8786", None, None)
    assert "the Dask scheduler tcp://cluster:8786 has no workers: the shards wait until one joins" in caplog.text


def test_a_worker_on_other_engine_code_refuses_its_shard(book, tmp_path):
    """A Dask worker left on another checkout would compute its shards with other code
    and the sweep would mix them without a word: the plan carries the planner's source
    digest and a worker whose own differs refuses, saying what to do."""
    from dataclasses import replace

    import dpm_vec.sweep as sweep_module

    plan = sweep_module.plan_sweep(book, tmp_path / "out", 80, sweep_module.input_hashes(book), 80)
    assert plan.engine_source == sweep_module.engine_source_digest()
    with pytest.raises(DpmVecError, match="a sweep worker runs other dpm_vec code .* than the sweep that planned it: install the same checkout"):
        sweep_module.run_shard(replace(plan, engine_source="another checkout"), 0)
    assert not plan.shard_dir(0).exists()


def test_shards_a_worker_committed_out_of_sight_are_named(tmp_path):
    """A worker whose OUT folder is not this machine's: the finished sweep found no
    _SUCCESS and said only "No such file or directory"."""
    import dpm_vec.sweep as sweep_module

    plan = sweep_module.plan_sweep(tmp_path / "book", tmp_path / "out", 10, {"portfolios.parquet": "abc"}, 20)
    plan.shard_dir(0).mkdir(parents=True)
    (plan.shard_dir(0) / "_SUCCESS").write_text("{}")
    sweep_module._wait_for_shared_commits(plan, [0], grace_s=0)  # seen: nothing to say
    with pytest.raises(DpmVecError, match=r"the Dask workers committed 1 shard\(s\) that this machine does not see \(e.g. .*shard-00001\)"):
        sweep_module._wait_for_shared_commits(plan, [0, 1], grace_s=0)


def test_dask_workers_write_the_chosen_tables(book, swept, tmp_path):
    """The choice travels with the plan to the worker processes."""
    pytest.importorskip("dask.distributed")
    out, _ = swept
    other = tmp_path / "dask"
    manifest = sweep(book, other, shard_size=30, workers=2, progress=False, tables="intents")
    assert list(manifest["tables"]) == ["runs", "intents", "input_faults"]
    assert sorted(p.name for p in other.iterdir() if p.is_dir()) == ["input_faults", "intents", "runs"]
    for table in manifest["tables"]:
        assert _read(other, table).equals(_read(out, table), null_equal=True), table


def test_scenarios_run_side_by_side(book, tmp_path):
    """Every portfolio under every scenario: runs portfolio by portfolio, each portfolio's
    scenarios in name order (whatever order the file lists them), and a comparison row a
    scenario, in name order, whose status counts are its runs'."""
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps({"scenarios": {
        "no_trades": {"options": {"max_turnover_pct": "0"}},
        "base": {"options": {}},
        "tight_cap": {"options": {"single_position_max_weight": "0.05"}},
        "cash_5": {"options": {"min_cash_buffer_pct": "0.05"}},
    }}))
    names = ["base", "cash_5", "no_trades", "tight_cap"]
    manifest = sweep(book, tmp_path / "out", shard_size=50, progress=False, scenarios=scenarios)
    runs = _read(tmp_path / "out", "runs")
    assert runs.height == 320 and manifest["scenarios"] == names
    assert runs["scenario_id"].to_list() == names * 80
    assert runs["portfolio_id"].to_list() == [p for p in pl.read_parquet(book / "portfolios.parquet")["portfolio_id"] for _ in names]
    assert runs.filter(pl.col("scenario_id") == "no_trades")["security_intent_count"].sum() == 0
    comparison = _read(tmp_path / "out", "scenario_comparison")
    assert comparison["scenario_id"].to_list() == names
    assert comparison["portfolios"].to_list() == [80] * 4
    for row in comparison.iter_rows(named=True):
        statuses = dict(runs.filter(pl.col("scenario_id") == row["scenario_id"]).group_by("status").len().iter_rows())
        assert (row["ready"], row["pending_review"], row["blocked"]) == tuple(statuses.get(s, 0) for s in ("READY", "PENDING_REVIEW", "BLOCKED"))
    base = runs.filter(pl.col("scenario_id") == "base").select("portfolio_id", "status")
    plain = sweep(book, tmp_path / "plain", progress=False)
    assert plain["counts_by_status"] == dict(base.group_by("status").len().iter_rows())


def test_a_portfolio_the_engine_cannot_compute_is_blocked_alone(tmp_path):
    """Nothing is lost: a portfolio whose arithmetic overflows gets one BLOCKED run record
    (ENGINE_ERROR) and the rest of its shard is computed as usual."""
    frames = generate_book_frames(8, 13, holdings=(3, 5))
    victim = frames["portfolios"]["portfolio_snapshot_id"][5]
    frames["positions"] = frames["positions"].with_columns(
        pl.when(pl.col("portfolio_snapshot_id") == victim).then(pl.lit(999_999_999)).otherwise(pl.col("quantity")).cast(pl.Decimal(38, 20)).alias("quantity")
    )
    held = frames["positions"].filter(pl.col("portfolio_snapshot_id") == victim)["instrument_id"].to_list()
    frames["prices"] = frames["prices"].with_columns(
        pl.when(pl.col("instrument_id").is_in(held)).then(pl.lit(Decimal("99999999999"))).otherwise(pl.col("price")).cast(pl.Decimal(38, 20)).alias("price")
    )
    book = write_book(frames, tmp_path / "book")
    sweep(book, tmp_path / "out", progress=False)
    runs = _read(tmp_path / "out", "runs")
    assert runs["run_key"].to_list() == frames["portfolios"]["run_key"].to_list()
    failed = runs.filter(pl.col("block_reason") == "ENGINE_ERROR")
    assert failed["run_key"].to_list() == [frames["portfolios"]["run_key"][5]]
    assert failed["status"].to_list() == ["BLOCKED"]
    # the value is named in block_detail; the others ran: a detail only if blocked
    held_first = frames["positions"].filter(pl.col("portfolio_snapshot_id") == victim)["instrument_id"][0]
    assert failed["block_detail"].to_list() == [f"ValueRangeError: the value of 999999999 units of {held_first} at 99999999999 is about 1.0E+20, "
                                                "beyond the engine's fixed-point range (values under 1E18)"]
    assert failed["warnings"].to_list() == [["ENGINE_ERROR:ValueRangeError"]]
    others = runs.filter(pl.col("block_reason").ne_missing("ENGINE_ERROR"))
    assert others["exit_path"].is_not_null().all() and others.height == runs.height - 1
    assert (others["status"] == "BLOCKED").to_list() == others["block_detail"].is_not_null().to_list()
    # no intents, as the intents table says; the policy it ran under, as every run records
    assert failed.select("security_intent_count", "fx_intent_count").row(0) == (0, 0)
    assert failed["gross_turnover_notional_base"].to_list() == [Decimal(0)]
    policy = [name for name, _, _ in POLICY_COLUMNS if name in frames["portfolios"].columns]
    assert frames["portfolios"].select(policy).row(4) == frames["portfolios"].select(policy).row(5)
    assert failed["options_hash"][0] == runs["options_hash"][4] is not None


def _passes_as_one_portfolio_per_shard(book: Path, tmp_path: Path, monkeypatch) -> list[int]:
    """Sweep ``book`` into tmp_path / "shared" by default, counting the shard's passes (the
    portfolio count of each non-empty ``run`` call, returned), and into tmp_path / "alone"
    one portfolio per shard, on two worker processes (outputs do not depend on the workers,
    and the two cores halve the wait); assert the two sweeps' outputs are equal."""
    from dpm_vec import sweep as sweep_module

    passes: list[int] = []
    real_run = sweep_module.run

    def counted(book, **kwargs):
        if book.portfolios.height:
            passes.append(book.portfolios.height)
        return real_run(book, **kwargs)

    monkeypatch.setattr(sweep_module, "run", counted)
    sweep(book, tmp_path / "shared", progress=False, threads=1)
    monkeypatch.undo()
    sweep(book, tmp_path / "alone", progress=False, processes=2, shard_size=1)
    for table in SWEEP_TABLES:
        assert _read(tmp_path / "shared", table).equals(_read(tmp_path / "alone", table)), table
    return passes


def test_an_absurd_fx_rate_blocks_each_portfolio_it_breaks_by_name_without_halving_the_shard(tmp_path, monkeypatch):
    """A EUR/USD rate of 1e12 breaks most USD and EUR portfolios at different stages: a holding's
    value, a target value at the inverse rate, trades beyond the quantity range. Each
    failed pass names the portfolios it cannot compute, so the shard takes a pass per
    stage that fails, not one per portfolio (the shard halved down to each of them took
    98 s for a 500-portfolio book; 6 s now), each blocked run names its own value, and the
    outputs are those of a sweep of one portfolio per shard."""
    frames = generate_book_frames(40, 7, holdings=(5, 12))
    frames["fx_rates"] = frames["fx_rates"].with_columns(
        pl.when(pl.col("pair") == "EUR/USD").then(pl.lit(Decimal("1e12"))).otherwise(pl.col("rate")).cast(pl.Decimal(38, 20)).alias("rate"))
    passes = _passes_as_one_portfolio_per_shard(write_book(frames, tmp_path / "book"), tmp_path, monkeypatch)
    assert len(passes) <= 5
    failed = _read(tmp_path / "shared", "runs").filter(pl.col("block_reason") == "ENGINE_ERROR")
    assert set(failed["base_currency"]) <= {"USD", "EUR"} and failed.height >= 10  # the two sides of the pair
    kinds = set(failed["block_detail"].str.extract(r"^(\w+: (?:the \w+ value|the value|a BUY))"))
    assert kinds == {"ValueRangeError: the value", "ValueRangeError: the target value", "QuantityRangeError: a BUY"}, kinds
    assert failed["block_detail"].str.ends_with("beyond the engine's fixed-point range (values under 1E18)").sum() == (
        failed["block_detail"].str.starts_with("ValueRangeError").sum())


def _every(n: int, column: str, value: str, where: pl.Expr | None = None):
    """A table edit: ``column`` set to ``value`` on every ``n``-th row (of those ``where`` holds)."""
    def edit(frame: pl.DataFrame) -> pl.DataFrame:
        chosen = pl.int_range(pl.len()) % n == 0
        return frame.with_columns(pl.when(chosen if where is None else chosen & where).then(pl.lit(Decimal(value)))
                                  .otherwise(pl.col(column)).cast(frame.schema[column]).alias(column))
    return edit


@pytest.mark.parametrize("table, edit, kinds", [
    # a target value over a price near zero: a unit count past 1E18 (and a locked holding's
    # market value over that price, which the universe's last-digit test divides)
    ("prices", _every(5, "price", "1e-15"), {"ValueRangeError: the units"}),
    # lots bought at 2E15 a unit: a gain the tax walk computes, and a run's gains together
    ("lots", _every(1, "unit_cost", "2e15"), {"ValueRangeError: the gain", "ValueRangeError: the sum"}),
    # a market value near the range's end: the sell's notional in base currency
    ("positions", _every(2, "market_value", "9.9e17", pl.col("market_value").is_not_null()), {"ValueRangeError: the notional"}),
])
def test_values_beyond_the_fixed_point_in_trades_and_tax_block_each_portfolio_by_name(tmp_path, monkeypatch, table, edit, kinds):
    """Each stage that can leave the fixed point's range names the portfolios it cannot
    compute, so the shard takes a pass per failing stage, not one per portfolio (a price
    of 1E-15 on every seventh instrument took 204 s for the 500-portfolio sample book by
    halving; market values of 9E17 246 s), no record keeps Polars' bare overflow, and the
    outputs are those of a sweep of one portfolio per shard."""
    frames = generate_book_frames(30, 12, holdings=(5, 12))
    frames[table] = edit(frames[table])
    passes = _passes_as_one_portfolio_per_shard(write_book(frames, tmp_path / "book"), tmp_path, monkeypatch)
    assert len(passes) <= 6, passes
    failed = _read(tmp_path / "shared", "runs").filter(pl.col("block_reason") == "ENGINE_ERROR")
    assert failed.height and failed["block_detail"].str.contains("RangeError: ").all(), failed["block_detail"].to_list()
    seen = set(failed["block_detail"].str.extract(r"^(\w+: (?:the \w+|a \w+))"))
    assert kinds <= seen, seen


def test_model_weights_adding_up_past_the_weight_range_block_their_portfolios_by_name(tmp_path, monkeypatch):
    """A book's model weights may each reach 10^10; two of 9.9E9 in one model overflowed the
    target stage's 28-decimal sums unnamed, and the sweep halved its shard down to each
    portfolio of that model (178 s for the 500-portfolio sample book with every third
    model row at 9.9E9). The portfolios whose map carries them are named before any step
    sums them, in the shard's first pass, and the outputs are those of a sweep of one
    portfolio per shard (one such weight alone still computes, as before)."""
    frames = generate_book_frames(30, 12, holdings=(5, 12))
    big = frames["portfolios"]["model_id"][0]
    frames["models"] = _every(1, "weight", "9.9e9", (pl.col("model_id") == big) & (pl.int_range(pl.len()).over("model_id") < 2))(frames["models"])
    passes = _passes_as_one_portfolio_per_shard(write_book(frames, tmp_path / "book"), tmp_path, monkeypatch)
    assert len(passes) == 2, passes
    runs = _read(tmp_path / "shared", "runs")
    failed = runs.filter(pl.col("block_reason") == "ENGINE_ERROR")
    assert failed.height and set(failed["model_id"]) == {big}, failed.select("run_key", "model_id", "block_detail").rows()
    assert failed["block_detail"].str.ends_with("beyond the engine's weight range (weights adding up to under 1E+10)").all()


def test_timestamps_written_as_iso_text_read_as_timestamps(tmp_path):
    """A book whose snapshot and price times are ISO 8601 text (as a CSV export writes
    them) sweeps as the one with typed timestamps; a time that does not parse blocks its
    portfolio alone (INVALID_PORTFOLIO), naming the value."""
    frames = generate_book_frames(6, 4, holdings=(3, 5))
    first, odd = pl.int_range(pl.len()) == 0, pl.int_range(pl.len()) % 2 == 1
    frames["portfolios"] = frames["portfolios"].with_columns(  # snapshots 5 minutes apart, prices up to a day old
        max_skew_minutes=pl.when(first).then(2).otherwise(10).cast(pl.Int32), max_staleness_minutes=pl.lit(60, dtype=pl.Int32),
        stale_price_action=pl.when(odd).then(pl.lit("EXCLUDE")).otherwise(pl.lit("BLOCK")))
    typed = write_book(frames, tmp_path / "typed")
    as_text = {**frames, "portfolios": frames["portfolios"].with_columns(
        pl.col("portfolio_as_of").dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        pl.col("market_as_of").dt.convert_time_zone("Asia/Singapore").dt.strftime("%Y-%m-%dT%H:%M:%S%:z"),
    ), "prices": frames["prices"].with_columns(pl.col("as_of").dt.strftime("%Y-%m-%d %H:%M:%S"))}
    sweep(typed, tmp_path / "typed_out", progress=False)
    sweep(write_book(as_text, tmp_path / "text"), tmp_path / "text_out", progress=False)
    _same_outputs(tmp_path / "typed_out", tmp_path / "text_out")
    # the times are read: a skew past 2 minutes, stale prices that block or are excluded
    reasons = _read(tmp_path / "typed_out", "runs")["block_reason"].to_list()
    assert reasons[0] == "SNAPSHOT_SKEW" and "PRICE_STALE" in reasons[1:]
    assert "PRICE_STALE" in _read(tmp_path / "typed_out", "exclusions")["reason_code"].to_list()

    bad = {**as_text, "portfolios": as_text["portfolios"].with_columns(
        pl.when(pl.int_range(pl.len()) == 2).then(pl.lit("30/06/2025")).otherwise(pl.col("market_as_of")).alias("market_as_of"))}
    sweep(write_book(bad, tmp_path / "bad"), tmp_path / "bad_out", progress=False)
    runs = _read(tmp_path / "bad_out", "runs")
    assert runs.filter(pl.col("block_reason") == "INVALID_PORTFOLIO")["run_key"].to_list() == [frames["portfolios"]["run_key"][2]]
    faults = _read(tmp_path / "bad_out", "input_faults")
    assert faults.select("input_column", "value").rows() == [("market_as_of", "30/06/2025")]


def test_holdings_no_portfolio_names_are_reported_not_silently_dropped(tmp_path, caplog):
    """A stray space in a snapshot id leaves that portfolio's positions unread: the sweep
    runs (the portfolio on what it has), and the manifest and a warning say which rows no
    run read."""
    frames = generate_book_frames(6, 5, holdings=(3, 5))
    stray = frames["portfolios"]["portfolio_snapshot_id"][1]
    rows = frames["positions"].filter(pl.col("portfolio_snapshot_id") == stray).height
    frames["positions"] = frames["positions"].with_columns(
        pl.when(pl.col("portfolio_snapshot_id") == stray).then(pl.lit(stray + " ")).otherwise(pl.col("portfolio_snapshot_id"))
        .alias("portfolio_snapshot_id")
    )
    with caplog.at_level(logging.WARNING, logger="dpm_vec.sweep"):
        manifest = sweep(write_book(frames, tmp_path / "book"), tmp_path / "out", progress=False)
    assert manifest["unread_holdings"] == {"positions": {"rows": rows, "snapshots": 1, "examples": [stray + " "]}}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["unread_holdings"] == manifest["unread_holdings"]
    assert f"positions.parquet: {rows} row(s) under 1 portfolio_snapshot_id(s) that no portfolio names (e.g. '{stray} ')" in caplog.text
    assert _read(tmp_path / "out", "runs").height == 6
    clean = sweep(_book(tmp_path, n=6, seed=5, bad_data=False, name="clean"), tmp_path / "clean_out", progress=False)
    assert clean["unread_holdings"] == {}


def test_limits_no_portfolio_has_are_reported_not_silently_dropped(tmp_path, caplog):
    """A group cap or overdraft limit under a run_key with a stray space limits no run, so
    its portfolio runs unlimited: the manifest and a warning name those rows, a what-if
    sweep's as well (its run keys are the book's, each scenario's own)."""
    frames = generate_book_frames(6, 5, holdings=(3, 5))
    run_key = frames["portfolios"]["run_key"][2]
    frames["group_constraints"] = pl.DataFrame(
        {"run_key": [run_key, run_key + " ", run_key + " "], "constraint_key": ["sector:IT", "sector:IT", "sector:FIN"],
         "max_weight": [Decimal("0.2")] * 3}, schema={"run_key": pl.String, "constraint_key": pl.String, "max_weight": pl.Decimal(38, 20)})
    frames["overdraft_limits"] = pl.DataFrame({"run_key": ["nobody"], "currency": ["USD"], "max_overdraft": [Decimal("100")]},
                                              schema={"run_key": pl.String, "currency": pl.String, "max_overdraft": pl.Decimal(38, 20)})
    book = write_book(frames, tmp_path / "book")
    with caplog.at_level(logging.WARNING, logger="dpm_vec.sweep"):
        manifest = sweep(book, tmp_path / "out", progress=False)
    assert manifest["unread_limits"] == {"group_constraints": {"rows": 2, "run_keys": 1, "examples": [run_key + " "]},
                                         "overdraft_limits": {"rows": 1, "run_keys": 1, "examples": ["nobody"]}}
    assert f"group_constraints.parquet: 2 row(s) under 1 run_key(s) that no portfolio has (e.g. '{run_key} ')" in caplog.text
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps({"scenarios": {"base": {"options": {}}, "tight": {"options": {"max_turnover_pct": "0.1"}}}}))
    what_if = sweep(book, tmp_path / "what_if", progress=False, scenarios=scenarios)
    assert what_if["unread_limits"] == manifest["unread_limits"]
    frames.pop("overdraft_limits")
    frames["group_constraints"] = frames["group_constraints"].head(1)
    assert sweep(write_book(frames, tmp_path / "clean"), tmp_path / "clean_out", progress=False)["unread_limits"] == {}


def test_a_cash_total_past_38_digits_blocks_its_portfolio_alone(tmp_path):
    """A sum of cash that cannot be built at 38 digits (Polars panicked building it, or
    wrapped it silently) is named before it is taken: one BLOCKED ENGINE_ERROR record
    naming the sum, the rest as without it."""
    frames = generate_book_frames(8, 13, holdings=(3, 5))
    victim = frames["portfolios"]["portfolio_snapshot_id"][0]  # USD and CHF cash: 6e17 each is 1.3e18 USD
    assert frames["cash"].filter(pl.col("portfolio_snapshot_id") == victim).height == 2
    clean = write_book(frames, tmp_path / "clean")
    frames["cash"] = frames["cash"].with_columns(
        pl.when(pl.col("portfolio_snapshot_id") == victim).then(pl.lit(Decimal("600000000000000000"))).otherwise(pl.col("amount"))
        .cast(pl.Decimal(38, 20)).alias("amount")
    )
    sweep(write_book(frames, tmp_path / "book"), tmp_path / "out", progress=False)
    sweep(clean, tmp_path / "clean_out", progress=False)
    runs, expected = _read(tmp_path / "out", "runs"), _read(tmp_path / "clean_out", "runs")
    failed = runs.filter(pl.col("block_reason") == "ENGINE_ERROR")
    assert failed["run_key"].to_list() == [frames["portfolios"]["run_key"][0]]
    assert failed["warnings"].to_list() == [["ENGINE_ERROR:ValueRangeError"]]
    assert failed["block_detail"].str.starts_with("ValueRangeError: the sum of the portfolio's absolute values in base currency is about 1.").all()
    others = pl.col("run_key") != frames["portfolios"]["run_key"][0]
    assert runs.filter(others).select("run_key", "status").equals(expected.filter(others).select("run_key", "status"))


def test_an_fx_quote_whose_inverse_leaves_the_fixed_point_fails_only_who_reads_it(tmp_path):
    """A quote of 1e-20 has an inverse of 1e20, past Decimal(38, 20): a book that never
    reads that inverse sweeps as without the quote (it did block every portfolio, one pass
    each), and a portfolio that reads it is BLOCKED alone."""
    frames = generate_book_frames(8, 13, holdings=(3, 5))
    clean = write_book(frames, tmp_path / "clean")
    tiny = frames["fx_rates"].head(1).with_columns(pl.lit("AAA/BBB").alias("pair"), pl.lit(Decimal("1E-20")).cast(pl.Decimal(38, 20)).alias("rate"))
    frames["fx_rates"] = pl.concat([frames["fx_rates"], tiny])
    sweep(write_book(frames, tmp_path / "unused"), tmp_path / "unused_out", progress=False)
    sweep(clean, tmp_path / "clean_out", progress=False)
    _same_outputs(tmp_path / "unused_out", tmp_path / "clean_out")

    victim = frames["portfolios"]["run_key"][4]  # AAA-based, holding BBB cash: rate(BBB → AAA) = 1 / 1e-20
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(pl.col("run_key") == victim).then(pl.lit("AAA")).otherwise(pl.col("base_currency")).alias("base_currency")
    )
    snapshot = frames["portfolios"]["portfolio_snapshot_id"][4]
    frames["cash"] = pl.concat([frames["cash"], frames["cash"].filter(pl.col("portfolio_snapshot_id") == snapshot).head(1)
                                .with_columns(pl.lit("BBB").alias("currency"))])
    sweep(write_book(frames, tmp_path / "read"), tmp_path / "read_out", progress=False)
    runs = _read(tmp_path / "read_out", "runs")
    assert runs.filter(pl.col("block_reason") == "ENGINE_ERROR")["run_key"].to_list() == [victim]
    assert runs.height == frames["portfolios"].height
    # named since the fifty-ninth session (until then "an intermediate value left the engine's fixed-point range")
    assert runs.filter(pl.col("run_key") == victim)["block_detail"].item() == (
        "ValueRangeError: the rate BBB to AAA, the inverse of the FX quote AAA/BBB at 0.00000000000000000001, is about 1.0E+20, "
        "beyond the engine's fixed-point range (values under 1E18)")


def test_a_trade_beyond_the_quantity_range_blocks_its_portfolio_only_if_it_survives_the_turnover_cap(tmp_path, monkeypatch):
    """Two portfolios of 1e14 in cash size trades of 1e10 units and more: the one whose
    turnover cap drops them gets its result, the other one BLOCKED run record
    (ENGINE_ERROR:QuantityRangeError), and every other portfolio its result. The failed
    pass names the portfolio, so the shard is not halved: the other five take one more
    pass together."""
    from dpm_vec import sweep as sweep_module

    passes: list[int] = []
    real_run = sweep_module.run

    def counted(book, **kwargs):
        passes.append(book.portfolios.height)
        return real_run(book, **kwargs)

    monkeypatch.setattr(sweep_module, "run", counted)
    frames = generate_book_frames(6, 13, holdings=(3, 5))
    ids = frames["portfolios"]["portfolio_snapshot_id"]
    rich = [ids[1], ids[4]]
    cash = frames["cash"].filter(~pl.col("portfolio_snapshot_id").is_in(rich))
    rich_cash = frames["portfolios"].filter(pl.col("portfolio_snapshot_id").is_in(rich)).select(
        "portfolio_snapshot_id", pl.col("base_currency").alias("currency"), pl.lit(Decimal("1e14")).cast(pl.Decimal(38, 20)).alias("amount"),
    )
    frames["cash"] = pl.concat([cash, rich_cash], how="diagonal_relaxed")
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(pl.col("portfolio_snapshot_id") == ids[4]).then(pl.lit(Decimal("0.0001"))).otherwise(pl.col("max_turnover_pct"))
        .cast(pl.Decimal(38, 20)).alias("max_turnover_pct")
    )
    book = write_book(frames, tmp_path / "book")
    sweep(book, tmp_path / "out", progress=False, threads=1)
    assert passes == [6, 0, 5]  # the shard, the error record's empty tables, the five others
    runs = _read(tmp_path / "out", "runs")
    assert runs["run_key"].to_list() == frames["portfolios"]["run_key"].to_list()
    failed = runs.filter(pl.col("block_reason") == "ENGINE_ERROR")
    assert failed["portfolio_id"].to_list() == [frames["portfolios"]["portfolio_id"][1]]
    assert failed["warnings"].to_list() == [["ENGINE_ERROR:QuantityRangeError"]]
    # its detail names its own trade: one of its instruments
    own = frames["positions"].filter(pl.col("portfolio_snapshot_id") == ids[1])["instrument_id"].to_list() + frames["models"].filter(
        pl.col("model_id") == frames["portfolios"]["model_id"][1])["instrument_id"].to_list()
    assert re.fullmatch(r"QuantityRangeError: a (BUY|SELL) of \d+ units of (\S+) is outside .*", failed["block_detail"][0])
    assert re.search(r"units of (\S+) ", failed["block_detail"][0])[1] in own
    capped = frames["portfolios"]["run_key"][4]
    dropped = _read(tmp_path / "out", "events").filter((pl.col("run_key") == capped) & (pl.col("category") == "dropped_intent"))
    assert dropped.height > 0 and dropped["amount"].min() > Decimal("1e10")  # trades sized from 1e14, beyond the 1e10 budget
    assert runs.filter(pl.col("run_key") == capped).select("status", "exit_path", "block_reason").rows() == [("READY", "E6", None)]


def test_each_portfolio_the_engine_names_is_blocked_with_its_own_failure(tmp_path):
    """Two portfolios of one shard whose trades leave the quantity range: each record's
    detail names that portfolio's trade, not the first the error names."""
    frames = generate_book_frames(6, 13, holdings=(3, 5))
    ids = frames["portfolios"]["portfolio_snapshot_id"]
    rich = [ids[1], ids[3]]
    frames["cash"] = pl.concat([frames["cash"].filter(~pl.col("portfolio_snapshot_id").is_in(rich)),
                                frames["portfolios"].filter(pl.col("portfolio_snapshot_id").is_in(rich)).select(
        "portfolio_snapshot_id", pl.col("base_currency").alias("currency"),
        pl.lit(Decimal("1e14")).cast(pl.Decimal(38, 20)).alias("amount"))], how="diagonal_relaxed")
    book = write_book(frames, tmp_path / "book")
    sweep(book, tmp_path / "out", progress=False, threads=1)
    failed = _read(tmp_path / "out", "runs").filter(pl.col("block_reason") == "ENGINE_ERROR").sort("run_key")
    assert failed["portfolio_snapshot_id"].to_list() == sorted(rich)
    for snapshot, detail in failed.select("portfolio_snapshot_id", "block_detail").rows():
        model = frames["portfolios"].filter(pl.col("portfolio_snapshot_id") == snapshot)["model_id"][0]
        own = set(frames["models"].filter(pl.col("model_id") == model)["instrument_id"]) | set(
            frames["positions"].filter(pl.col("portfolio_snapshot_id") == snapshot)["instrument_id"])
        assert re.search(r"units of (\S+) ", detail)[1] in own, (snapshot, detail)


def test_a_stage_contract_break_blocks_only_the_portfolio_it_comes_from(tmp_path, monkeypatch):
    """A stage whose output breaks its schema for one portfolio (here the trade stage
    emitting one of its intents twice, as a fanned-out join would) blocks that portfolio
    as ENGINE_ERROR, naming the fault; the other portfolios of its shard get their results,
    equal to a sweep without the fault."""
    from dataclasses import replace

    from dpm_vec import pipeline

    frames = generate_book_frames(12, 29, holdings=(3, 6))
    book = write_book(frames, tmp_path / "book")
    sweep(book, tmp_path / "clean", progress=False, threads=1)
    clean = _read(tmp_path / "clean", "runs")
    victim = clean.filter(pl.col("security_intent_count") > 0)["run_key"][3]
    real = pipeline.translate

    def fan_out_victim(market, live, *args, **kwargs):
        tr = real(market, live, *args, **kwargs)
        victim_runs = live.filter(pl.col("run_key") == victim).select("run")
        twice = tr.intents.join(victim_runs, on="run", how="semi").head(1)
        return replace(tr, intents=pl.concat([tr.intents, twice]).sort("run", "intent_no", maintain_order=True))

    monkeypatch.setattr(pipeline, "translate", fan_out_victim)
    sweep(book, tmp_path / "out", progress=False, threads=1)
    runs = _read(tmp_path / "out", "runs")
    assert runs["run_key"].to_list() == clean["run_key"].to_list()
    failed = runs.filter(pl.col("block_reason") == "ENGINE_ERROR")
    assert failed["run_key"].to_list() == [victim]
    assert failed["warnings"].to_list() == [["ENGINE_ERROR:StageContractError"]]
    others = pl.col("run_key") != victim
    for table in ("runs", "intents", "positions_after"):
        assert _read(tmp_path / "out", table).filter(others).equals(_read(tmp_path / "clean", table).filter(others)), table
    assert _read(tmp_path / "out", "intents").filter(~others).height == 0


def test_default_shard_size_shares_memory_and_cuts_books_into_full_rounds():
    from dpm_vec.defaults import default_shard_size

    # 126 shards of at most 7,937 (63 rounds of two), not 125 of 8,000 whose last runs alone
    assert default_shard_size(2, 1_000_000) == 7_937 and -(-1_000_000 // 7_937) == 126
    assert default_shard_size(2, 1_008_000) == DEFAULT_SHARD_SIZE // 2 == 8_000  # 126 full shards already
    assert default_shard_size(1, 1_000_000) == DEFAULT_SHARD_SIZE
    assert default_shard_size(2, 10_000) == 5_000  # two even shards, not 8,000 + 2,000
    assert default_shard_size(3, 10_001) == 3_334 and default_shard_size(4, 3) == 1
    assert default_shard_size(None, 10) == DEFAULT_SHARD_SIZE  # a remote cluster's workers: the whole default each


def test_default_shard_size_bounds_the_rows_of_large_portfolios():
    """Memory follows a shard's rows: portfolios of ~55 holdings and ~28 model targets
    (~100 rows with RUN_ROWS) keep the portfolio default, 500-holding ones get shards of
    as many rows, not 6x more, and 10-holding ones larger shards."""
    from dpm_vec.defaults import DEFAULT_SHARD_ROWS, RUN_ROWS, default_shard_size

    assert default_shard_size(2, 1_008_000, 100.0) == 8_000  # the benchmarks' portfolios keep the portfolio default
    # small portfolios get shards of as many rows, not the 8,000 of the larger ones: 4 of 12,500, not 8 of 6,250
    assert DEFAULT_SHARD_ROWS // 2 // 52 == 15_384 and default_shard_size(2, 50_000, 52.0) == 12_500
    assert default_shard_size(2, 10_000_000, 0.0) == DEFAULT_SHARD_ROWS // 2 // RUN_ROWS  # empty ones still count RUN_ROWS each
    # 1,520 from the rows, then 66 shards of 1,516 (33 full rounds of two) instead of 65 of 1,520 and one of 1,200
    assert DEFAULT_SHARD_ROWS // 2 // 526 == 1_520 and default_shard_size(2, 100_000, 526.0) == 1_516
    assert default_shard_size(None, 10_000_000, 1_000.0) == DEFAULT_SHARD_ROWS // 1_000  # a remote worker: all the rows
    assert default_shard_size(2, 1_000, 526.0) == 500  # a small book is still cut evenly
    assert default_shard_size(1, 10, 1e9) == 1 and default_shard_size(2, 100, 0.0) == 50


@settings(max_examples=300, deadline=None)
@given(portfolios=st.integers(1, 2_000_000), size=st.integers(1, 20_000), at_once=st.integers(1, 8))
def test_even_shard_size_fills_the_last_round_without_adding_one(portfolios, size, at_once):
    """Never larger than asked and never more rounds; every round full wherever whole
    portfolios allow it (``portfolios`` above n(n-1) for n shards)."""
    from dpm_vec.defaults import even_shard_size

    evened = even_shard_size(portfolios, size, at_once)
    asked = -(-portfolios // size)  # shards at the size asked for
    shards, rounds = -(-portfolios // evened), -(-asked // at_once)
    assert 1 <= evened <= size
    assert -(-shards // at_once) == rounds
    if portfolios > rounds * at_once * (rounds * at_once - 1):
        assert shards == rounds * at_once
    assert even_shard_size(portfolios, evened, at_once) == evened  # evening an even size keeps it


def test_fit_shard_rows_shrinks_shards_where_large_portfolios_sit_together():
    """Ten 1,000-row portfolios after ninety of 10 rows: the mean (109) would allow shards
    of 22 under a 2,500-row budget, but a shard of the large ones would hold 10,000."""
    from dpm_vec.sweep import fit_shard_rows

    rows = pl.Series("rows", [10] * 90 + [1_000] * 10)
    size = fit_shard_rows(rows, 50, 2_500)
    assert size == 2
    heaviest = rows.to_frame().with_row_index("i").group_by(pl.col("i") // size).agg(pl.col("rows").sum())["rows"].max()
    assert heaviest <= 2_500
    assert fit_shard_rows(rows, 50, 100_000) == 50  # fits already: unchanged
    assert fit_shard_rows(rows, 50, 500) == 1  # adjacent portfolios each above the budget: one a shard


def _shards(rows: pl.Series, size: int) -> list[list[int]]:
    return [rows.slice(start, size).to_list() for start in range(0, rows.len(), size)]


def test_fit_shard_rows_gives_a_portfolio_over_the_budget_a_shard_without_shrinking_the_rest():
    """No shard size makes a 900,000-row portfolio fit an 800,000-row budget: its shard
    holds it and at most the budget besides, and the book's other shards keep their size
    (they shrank to one portfolio each: 4,001 shards instead of 2)."""
    from dpm_vec.sweep import fit_shard_rows

    rows = pl.Series("rows", [20] * 2_000 + [900_000] + [20] * 2_000)
    assert fit_shard_rows(rows, 2_001, 800_000) == 2_001
    assert fit_shard_rows(rows, 2_001, 20_000) == 1_000  # the others still fit the budget
    # two such portfolios three runs apart never share a shard, and the rest fits besides them
    rows = pl.Series("rows", [10] * 5 + [1_000] + [10] * 2 + [1_000] + [10] * 40)
    size = fit_shard_rows(rows, 50, 100)
    assert 1 < size <= 3
    for shard in _shards(rows, size):
        assert sum(r > 100 for r in shard) <= 1 and sum(r for r in shard if r <= 100) <= 100


def test_sweep_sizes_default_shards_by_the_books_rows(book, swept, tmp_path, monkeypatch):
    """Without --shard-size, a book whose portfolios carry more rows than the row budget
    allows gets smaller shards (the budget shrunk here to the test book's scale); each
    run's rows are its snapshot's positions plus its model's targets; the outputs are the
    same as with any other shard size."""
    from dpm_vec import defaults
    from dpm_vec import sweep as sweep_module
    from dpm_vec.io import read_portfolio_rows

    portfolios, _ = read_portfolio_rows(book)
    counts = sweep_module.holding_counts(book)
    rows = sweep_module.run_rows(portfolios, counts["positions"], pl.read_parquet(book / "models.parquet"), counts["lots"])
    positions = pl.read_parquet(book / "positions.parquet").group_by("portfolio_snapshot_id").len()
    models = pl.read_parquet(book / "models.parquet").group_by("model_id").len()
    lots = pl.read_parquet(book / "lots.parquet").group_by("portfolio_snapshot_id").len()
    expected = portfolios.join(positions, on="portfolio_snapshot_id", how="left").join(
        models, on="model_id", how="left", suffix="_m").join(lots, on="portfolio_snapshot_id", how="left", suffix="_l")
    taxed_lots = pl.when(expected["enable_tax_awareness"].fill_null(False)).then(expected["len_l"].fill_null(0)).otherwise(0)
    assert expected.select(taxed_lots).to_series().sum() > 0  # the book's tax-aware runs hold lots: they count
    assert rows.to_list() == expected.select(
        pl.col("len").fill_null(0) + pl.col("len_m").fill_null(0) + taxed_lots + defaults.RUN_ROWS).to_series().to_list()
    budget = int(rows.head(20).sum()) + 1  # about 20 portfolios' rows for both shards at once
    monkeypatch.setattr(defaults, "DEFAULT_SHARD_ROWS", budget)
    monkeypatch.setattr(sweep_module, "DEFAULT_SHARD_ROWS", budget)
    manifest = sweep(book, tmp_path / "out", threads=2, progress=False)
    size = manifest["shard_size"]
    assert size == sweep_module.fit_shard_rows(rows, defaults.default_shard_size(2, portfolios.height, rows.mean()), budget // 2)
    assert 1 < size < 20 and manifest["shards"] == -(-portfolios.height // size)
    _same_outputs(swept[0], tmp_path / "out")
    # a size shrunk for its rows is evened again, so both threads have a shard in every round
    monkeypatch.setattr(defaults, "DEFAULT_SHARD_ROWS", 1000)
    monkeypatch.setattr(sweep_module, "DEFAULT_SHARD_ROWS", 1000)
    fitted = sweep_module.fit_shard_rows(rows, defaults.default_shard_size(2, portfolios.height, rows.filter(rows <= 500).mean()), 500)
    evened = sweep_module.fit_shard_rows(rows, defaults.even_shard_size(portfolios.height, fitted, 2), 500)
    assert evened != fitted  # the book's rows make the two differ, or this would test nothing
    manifest = sweep(book, tmp_path / "evened", threads=2, progress=False)
    assert (manifest["shard_size"], manifest["shards"] % 2) == (evened, 0)


def test_default_shard_size_is_shared_by_shards_computed_at_once(book, swept, tmp_path, monkeypatch):
    """Local worker processes and shard threads share this machine's memory: without
    --shard-size each gets its share of the default (here, of the 80-portfolio book)."""
    from dpm_vec import sweep as sweep_module
    from dpm_vec.errors import DpmVecError
    from dpm_vec.io import read_portfolio_rows

    seen = {}

    def in_process(plan, pending, scheduler, cluster, reporter):  # the cluster is not the subject here
        seen["shard_size"] = plan.shard_size
        sweep_module._run_in_process(plan, pending, reporter)

    monkeypatch.setattr(sweep_module, "_run_on_dask", in_process)
    monkeypatch.setattr(sweep_module, "_early_cluster", lambda book_dir, workers: contextlib.nullcontext())
    manifest = sweep(book, tmp_path / "four", workers=4, progress=False)
    assert seen["shard_size"] == manifest["shard_size"] == 20 and manifest["shards"] == 4
    assert manifest["workers"] == 4 and manifest["threads"] is None
    _same_outputs(swept[0], tmp_path / "four")
    remote = sweep(book, tmp_path / "remote", scheduler="tcp://scheduler:8786", progress=False)
    # a remote worker's shard holds all the default rows (~48 a portfolio here: over 33,000 portfolios)
    counts = sweep_module.holding_counts(book)
    rows = sweep_module.run_rows(read_portfolio_rows(book)[0], counts["positions"], pl.read_parquet(book / "models.parquet"), counts["lots"])
    assert (remote["shard_size"], remote["shards"]) == (int(DEFAULT_SHARD_ROWS / rows.mean()), 1)
    assert (remote["scheduler"], remote["workers"], remote["threads"]) == ("tcp://scheduler:8786", None, None)
    one = sweep(book, tmp_path / "one", threads=1, progress=False)
    assert (one["shard_size"], one["shards"], one["threads"]) == (80, 1, 1)
    assert sweep(book, tmp_path / "two", threads=2, progress=False)["shard_size"] == 40
    monkeypatch.setattr(sweep_module, "default_threads", lambda: 3)
    default = sweep(book, tmp_path / "default", progress=False)
    assert (default["threads"], default["shard_size"], default["shards"]) == (3, 27, 3)
    with pytest.raises(DpmVecError, match="--workers must be at least 1"):
        sweep(book, tmp_path / "none", workers=0, progress=False)
    with pytest.raises(DpmVecError, match="--threads must be at least 1"):
        sweep(book, tmp_path / "none", threads=0, progress=False)
    with pytest.raises(DpmVecError, match="--shard-size must be at least 1"):
        sweep(book, tmp_path / "none", shard_size=0, progress=False)
    with pytest.raises(DpmVecError, match="--threads applies to a sweep in this process"):
        sweep(book, tmp_path / "none", threads=2, workers=2, progress=False)
    with pytest.raises(DpmVecError, match="--workers starts a local Dask cluster and --scheduler uses an existing one"):
        sweep(book, tmp_path / "none", scheduler="tcp://scheduler:8786", workers=4, progress=False)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("threads", [1, 3])
def test_outputs_do_not_depend_on_thread_count(book, swept, tmp_path, threads):
    out, _ = swept
    other = tmp_path / f"threads_{threads}"
    manifest = sweep(book, other, shard_size=10, threads=threads, progress=False)
    assert manifest["threads"] == threads and manifest["shards"] == 8
    _same_outputs(out, other)


def test_worker_processes_give_identical_output(book, swept, tmp_path):
    """Shards in two spawned worker processes, each running Polars on its share of the
    cores: the same datasets as in this process, and this process's environment is left
    as it was."""
    from dpm_vec.defaults import usable_cores

    out, _ = swept
    before = os.environ.get("POLARS_MAX_THREADS")
    other = tmp_path / "processes"
    manifest = sweep(book, other, shard_size=10, processes=2, progress=False)
    assert manifest["processes"] == 2 and manifest["threads"] is None and manifest["shards"] == 8
    assert manifest["polars_threads"] == [max(1, usable_cores() // 2)]
    assert os.environ.get("POLARS_MAX_THREADS") == before
    _same_outputs(out, other)


def test_default_runs_few_shards_on_threads_and_many_in_processes(book, swept, tmp_path):
    """Without a choice: threads below PROCESSES_FROM_SHARDS shards, worker processes from
    it on (one per core, at most two; a one-core machine stays on one thread)."""
    from dpm_vec.defaults import PROCESSES_FROM_SHARDS, default_threads

    out, few = swept
    assert few["shards"] < PROCESSES_FROM_SHARDS
    assert few["threads"] == default_threads() and few["processes"] is None
    many = sweep(book, tmp_path / "many", shard_size=80 // PROCESSES_FROM_SHARDS, progress=False)
    assert many["shards"] >= PROCESSES_FROM_SHARDS
    if default_threads() > 1:
        assert many["processes"] == default_threads() and many["threads"] is None
    else:
        assert many["threads"] == 1 and many["processes"] is None
    _same_outputs(out, tmp_path / "many")


def test_worker_processes_start_before_the_plan_only_when_it_must_choose_them(book, tmp_path, monkeypatch):
    """``early_processes`` promises processes only where the plan is bound to choose them
    (explicitly, or a book of more portfolios than PROCESSES_FROM_SHARDS − 1 of its largest
    shards), so no worker is started for a sweep on threads or on Dask."""
    import dpm_vec.sweep as sweep_module
    from dpm_vec.defaults import PROCESSES_FROM_SHARDS

    monkeypatch.setattr(sweep_module, "default_threads", lambda: 2)

    def early(**chosen) -> int | None:
        options = {"shard_size": None, "scheduler": None, "workers": None, "threads": None, "processes": None, "scenarios": None}
        return sweep_module.early_processes(book, **{**options, **chosen})

    assert early(processes=3) == 3
    assert early() is None  # 80 portfolios: one shard of the default size
    assert early(shard_size=80 // PROCESSES_FROM_SHARDS) == 2
    assert early(shard_size=80 // (PROCESSES_FROM_SHARDS - 1)) is None  # one shard fewer than the threshold
    for other in ({"threads": 1}, {"workers": 2}, {"scheduler": "tcp://127.0.0.1:8786"}, {"scenarios": "s.json"}):
        assert early(shard_size=1, **other) is None, other
    assert sweep_module.early_processes(tmp_path, shard_size=1, scheduler=None, workers=None, threads=None, processes=None,
                                        scenarios=None) is None  # no portfolios file: the plan names the fault
    monkeypatch.setattr(sweep_module, "default_threads", lambda: 1)
    assert early(shard_size=1) is None


def _worker_pools_started(monkeypatch, tmp_path) -> list[tuple[int, bool]]:
    """A list that records each worker pool a sweep under ``tmp_path`` starts: its
    processes, and whether the sweep's plan.json existed by then."""
    import dpm_vec.sweep as sweep_module

    started = []
    real = sweep_module._worker_pool

    def spy(processes, first):
        started.append((processes, any(tmp_path.glob(".*.work-*/plan.json"))))
        return real(processes, first)

    monkeypatch.setattr(sweep_module, "_worker_pool", spy)
    return started


def test_a_book_of_many_rows_runs_two_shards_in_processes_started_before_its_plan_when_certain(book, swept, tmp_path, monkeypatch):
    """From PROCESSES_FROM_ROWS rows (positions rows, plus each run's model targets and
    RUN_ROWS) a default sweep of two shards runs in worker processes (two shard threads
    lose more to the GIL than the workers' start costs); one row fewer and it stays on
    threads, as does a sweep of one shard. The workers start before the plan when the
    footers' count (positions rows and RUN_ROWS a portfolio, without the model targets)
    already reaches it, after the plan when only the plan's count does."""
    import dpm_vec.sweep as sweep_module
    from dpm_vec.defaults import RUN_ROWS
    from dpm_vec.io import read_portfolio_rows

    monkeypatch.setattr(sweep_module, "default_threads", lambda: 2)
    positions = pl.read_parquet(Path(book) / "positions.parquet")
    assert sweep_module.holding_rows(book) == positions.height > 0
    assert sweep_module.holding_rows(tmp_path) == 0  # no positions file: the plan names the fault
    portfolios = read_portfolio_rows(book)[0]
    targets = portfolios.join(pl.read_parquet(Path(book) / "models.parquet"), on="model_id").height
    rows = sweep_module.mode_rows(book, portfolios)
    footers = positions.height + RUN_ROWS * portfolios.height
    assert rows == footers + targets and targets > 0
    started = _worker_pools_started(monkeypatch, tmp_path)
    monkeypatch.setattr(sweep_module, "PROCESSES_FROM_ROWS", rows + 1)
    below = sweep(book, tmp_path / "below", progress=False)
    assert (below["shards"], below["threads"], below["processes"], started) == (2, 2, None, [])
    monkeypatch.setattr(sweep_module, "PROCESSES_FROM_ROWS", rows)
    late = sweep(book, tmp_path / "late", progress=False)  # only the plan counts the targets: the workers start after it
    assert (late["shards"], late["threads"], late["processes"], started) == (2, None, 2, [(2, True)])
    monkeypatch.setattr(sweep_module, "PROCESSES_FROM_ROWS", footers)
    early = sweep(book, tmp_path / "early", progress=False)
    assert (early["shards"], early["threads"], early["processes"], started[1:]) == (2, None, 2, [(2, False)])
    one = sweep(book, tmp_path / "one", shard_size=80, progress=False)
    assert (one["shards"], one["threads"], one["processes"], len(started)) == (1, 2, None, 2)
    for out in ("below", "late", "early", "one"):
        _same_outputs(swept[0], tmp_path / out)


def test_early_processes_count_no_more_shards_or_rows_than_the_plan(book, tmp_path, monkeypatch):
    """What ``early_processes`` counts from the footers is a lower bound of what the plan
    counts, also where the positions file holds many more rows that no portfolio names
    than the models have targets: at the highest threshold of rows, and of shards, at which
    it starts workers, the plan chooses them too (it raises if not), and one higher it
    starts none."""
    import dpm_vec.defaults as defaults
    import dpm_vec.sweep as sweep_module
    from dpm_vec.defaults import RUN_ROWS

    def early() -> int | None:
        return sweep_module.early_processes(stray, shard_size=None, scheduler=None, workers=None, threads=None,
                                            processes=None, scenarios=None)

    def highest_shards() -> int:
        n = 1
        while True:
            monkeypatch.setattr(sweep_module, "PROCESSES_FROM_SHARDS", n + 1)
            if not early():
                monkeypatch.setattr(sweep_module, "PROCESSES_FROM_SHARDS", n)
                assert early() == 2
                return n
            n += 1

    monkeypatch.setattr(sweep_module, "default_threads", lambda: 2)
    stray = tmp_path / "stray"
    shutil.copytree(book, stray)
    positions = pl.read_parquet(stray / "positions.parquet")
    orphans = pl.concat([positions] * 10).with_columns(pl.lit("NO-SUCH-SNAPSHOT").alias("portfolio_snapshot_id"))
    pl.concat([positions, orphans]).write_parquet(stray / "positions.parquet")
    portfolios = pl.read_parquet(stray / "portfolios.parquet")
    footers = sweep_module.holding_rows(stray) + RUN_ROWS * portfolios.height
    assert 0 < sweep_module.mode_rows(stray, portfolios) - footers < orphans.height  # models' targets, fewer than the strays

    monkeypatch.setattr(sweep_module, "PROCESSES_FROM_SHARDS", 10**6)
    monkeypatch.setattr(sweep_module, "PROCESSES_FROM_ROWS", footers + 1)
    assert early() is None
    monkeypatch.setattr(sweep_module, "PROCESSES_FROM_ROWS", footers)
    assert early() == 2 and sweep(stray, tmp_path / "rows", progress=False)["processes"] == 2

    for module in (defaults, sweep_module):  # shards of a dozen portfolios or so, two at once
        monkeypatch.setattr(module, "DEFAULT_SHARD_ROWS", 24 * RUN_ROWS)
    monkeypatch.setattr(sweep_module, "PROCESSES_FROM_ROWS", 10**12)
    fewest = highest_shards()
    assert fewest > 2
    manifest = sweep(stray, tmp_path / "shards", progress=False)
    assert manifest["processes"] == 2 and manifest["shards"] >= fewest


def test_a_sweep_starts_its_worker_processes_once_and_before_its_plan(book, tmp_path, monkeypatch):
    """The pool the plan will use starts first (its workers import while the plan reads
    and hashes the book), and is the only one; a sweep on threads starts none."""
    from dpm_vec.defaults import PROCESSES_FROM_SHARDS, default_threads

    started = _worker_pools_started(monkeypatch, tmp_path)
    few = sweep(book, tmp_path / "few", shard_size=80 // (PROCESSES_FROM_SHARDS - 1), progress=False)
    assert few["threads"] is not None and started == []
    many = sweep(book, tmp_path / "many", shard_size=80 // PROCESSES_FROM_SHARDS, progress=False)
    if default_threads() > 1:
        assert many["processes"] == default_threads() and started == [(default_threads(), False)]
    chosen = sweep(book, tmp_path / "chosen", processes=2, progress=False)
    assert chosen["processes"] == 2 and started[-1] == (2, False)
    _same_outputs(tmp_path / "few", tmp_path / "many")
    _same_outputs(tmp_path / "few", tmp_path / "chosen")


def test_a_sweep_stopped_by_its_checks_leaves_no_worker_process(book, tmp_path):
    """Workers started before the plan are shut down, and waited for, when the plan's
    checks stop the sweep: the error names the file and nothing is left running."""
    import multiprocessing

    broken = tmp_path / "broken"
    shutil.copytree(book, broken)
    (broken / "prices.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(BookError, match="prices.parquet"):
        sweep(broken, tmp_path / "out", processes=2, progress=False)
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "out").exists()


def test_a_local_dask_cluster_starts_before_the_plan_and_closes_with_the_sweep(book, swept, tmp_path, monkeypatch):
    """``--workers``: the cluster starts on a thread before the plan reads the book (the
    plan's read waits for that start, and would time out without it), its workers come
    warmed and without Dask's sampling profiler, and it is closed when the sweep ends,
    also when the plan's checks stop the sweep."""
    pytest.importorskip("dask.distributed")
    import multiprocessing
    import threading

    import dask

    import dpm_vec.sweep as sweep_module

    starting = threading.Event()
    seen = {}
    start, read, run_on_dask = sweep_module._start_cluster, sweep_module.read_portfolio_rows, sweep_module._run_on_dask

    def spy_start(book_dir, workers):
        starting.set()
        return start(book_dir, workers)

    def spy_read(book_dir):
        seen["started_before_the_plan"] = starting.wait(timeout=30)
        return read(book_dir)

    def spy_run(plan, pending, scheduler, cluster, reporter):
        client = cluster.result()
        seen["workers"] = client.run(lambda: (dask.config.get("distributed.worker.profile.enabled"),
                                              list(sweep_module._REFERENCE_CACHE)))
        return run_on_dask(plan, pending, scheduler, cluster, reporter)

    monkeypatch.setattr(sweep_module, "_start_cluster", spy_start)
    monkeypatch.setattr(sweep_module, "read_portfolio_rows", spy_read)
    monkeypatch.setattr(sweep_module, "_run_on_dask", spy_run)
    manifest = sweep(book, tmp_path / "dask", shard_size=30, workers=2, progress=False)
    assert seen["started_before_the_plan"] and manifest["workers"] == 2
    assert sorted(seen["workers"].values()) == [(False, [str(Path(book).resolve())])] * 2
    _same_outputs(swept[0], tmp_path / "dask")
    assert multiprocessing.active_children() == []

    starting.clear()
    broken = tmp_path / "broken"
    shutil.copytree(book, broken)
    (broken / "prices.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(BookError, match="prices.parquet"):
        sweep(broken, tmp_path / "out", workers=2, progress=False)
    assert starting.is_set() and multiprocessing.active_children() == []
    assert not (tmp_path / "out").exists()


def test_processes_refuse_bad_counts_and_other_modes(book, tmp_path):
    with pytest.raises(DpmVecError, match="--processes must be at least 1, got 0"):
        sweep(book, tmp_path / "out", processes=0, progress=False)
    with pytest.raises(DpmVecError, match="--processes is one way to run the shards"):
        sweep(book, tmp_path / "out", processes=2, threads=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_shard_threads_compute_shards_at_the_same_time(book, tmp_path, monkeypatch):
    """With two threads, two shards are in the engine at once: each waits at a barrier
    that only opens when the other has arrived (one thread would time out there)."""
    import threading

    from dpm_vec import sweep as sweep_module

    barrier = threading.Barrier(2, timeout=30)
    names = set()
    compute = sweep_module.compute_shard

    def meeting(plan, shard):
        if shard < 2:
            names.add(threading.current_thread().name)
            barrier.wait()
        return compute(plan, shard)

    monkeypatch.setattr(sweep_module, "compute_shard", meeting)
    sweep(book, tmp_path / "out", shard_size=20, threads=2, progress=False)
    assert len(names) == 2 and all(name.startswith("dpm-vec-shard") for name in names)


def test_a_failing_shard_fails_the_sweep_and_starts_no_more(book, tmp_path, monkeypatch):
    """An error outside the engine (here: the shard's write) ends the sweep with that error;
    no shard after it starts, and the rerun resumes from the committed ones."""
    from dpm_vec import sweep as sweep_module

    started = []
    commit = sweep_module.commit_shard

    def failing(plan, shard, tables, timer):
        started.append(shard)
        if shard == 1:
            raise OSError("disk full")
        return commit(plan, shard, tables, timer)

    monkeypatch.setattr(sweep_module, "commit_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        sweep(book, tmp_path / "out", shard_size=10, threads=1, progress=False)
    assert started == [0, 1], "shards after the failed one must not start"
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(sweep_module, "commit_shard", commit)
    manifest = sweep(book, tmp_path / "out", shard_size=10, threads=1, progress=False)
    assert manifest["resumed_shards"] == 1 and manifest["shards"] == 8


def test_the_sample_book_sweeps_to_its_known_counts(tmp_path):
    sample = Path(__file__).resolve().parents[1] / "data" / "sample_book"
    manifest = sweep(sample, tmp_path / "out", progress=False)
    assert manifest["counts_by_status"] == {"BLOCKED": 195, "PENDING_REVIEW": 264, "READY": 41}


def test_a_book_of_floats_sweeps_to_the_decimal_books_outputs(book, swept, tmp_path):
    """quantity, price, amount and weight written as float64 (as pandas writes them):
    the outputs are those of the decimal book, to the byte. Polars' own float cast made
    3131.0 units 3130.99999999999999…, which floors (and trades) a unit short."""
    floats = tmp_path / "floats"
    shutil.copytree(book, floats)
    for table, columns in {"positions": ["quantity", "market_value"], "prices": ["price"], "cash": ["amount", "settled"],
                           "lots": ["quantity", "unit_cost"], "models": ["weight"], "fx_rates": ["rate"]}.items():
        frame = pl.read_parquet(book / f"{table}.parquet")
        frame.with_columns(pl.col(columns).cast(pl.Float64)).write_parquet(floats / f"{table}.parquet")
    out = tmp_path / "from_floats"
    sweep(floats, out, shard_size=30, progress=False)
    _same_outputs(swept[0], out)


@pytest.mark.parametrize(("shard_size", "span_limit"), [(None, 1.25), (3, 1.25), (3, 0.0)])
def test_a_portfolio_snapshot_with_no_holdings_blocks_unless_declared(tmp_path, monkeypatch, shard_size, span_limit):
    """A portfolio_snapshot_id with no positions and no cash (a typo) blocks its portfolio
    as UNKNOWN_PORTFOLIO_SNAPSHOT instead of running an empty portfolio READY, whether the
    shards read their holdings whole, by row span or from a split (span_limit 0); a
    snapshot with only cash or only positions runs; declared in snapshots (kind PORTFOLIO)
    the empty one runs."""
    import dpm_vec.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "SPAN_READ_LIMIT", span_limit)
    frames = generate_book_frames(8, 5, holdings=(3, 5))
    ids = frames["portfolios"]["run_key"].to_list()
    snapshots = frames["portfolios"]["portfolio_snapshot_id"].to_list()
    typo = snapshots[2] + "_TYPO"
    frames["portfolios"] = frames["portfolios"].with_columns(
        pl.when(pl.col("run_key") == ids[2]).then(pl.lit(typo)).otherwise(pl.col("portfolio_snapshot_id")).alias("portfolio_snapshot_id"))
    frames["positions"] = frames["positions"].filter(pl.col("portfolio_snapshot_id") != snapshots[4])  # cash only
    frames["lots"] = frames["lots"].filter(pl.col("portfolio_snapshot_id") != snapshots[4])
    frames["cash"] = frames["cash"].filter(pl.col("portfolio_snapshot_id") != snapshots[6])  # positions only
    sweep(write_book(frames, tmp_path / "undeclared"), tmp_path / "out1", shard_size=shard_size, progress=False)
    runs = _read(tmp_path / "out1", "runs")
    assert runs.filter(pl.col("block_reason") == "UNKNOWN_PORTFOLIO_SNAPSHOT").select("run_key", "status", "block_detail").rows() == [
        (ids[2], "BLOCKED", f"portfolio_snapshot_id {typo} has no positions or cash rows, and snapshots does not declare it")]
    assert runs["run_key"].to_list() == ids

    frames["snapshots"] = pl.DataFrame({"kind": ["PORTFOLIO"], "snapshot_id": [typo]})
    sweep(write_book(frames, tmp_path / "declared"), tmp_path / "out2", shard_size=shard_size, progress=False)
    declared = _read(tmp_path / "out2", "runs").filter(pl.col("run_key") == ids[2])
    assert declared["block_reason"].to_list() == [None] and declared["before_total_value"].to_list() == [Decimal(0)]


def test_an_imported_request_with_no_positions_and_no_cash_runs_as_the_json_door_runs_it(tmp_path):
    """import-requests declares each request's holdings snapshot: a request with empty
    positions and cash runs in a sweep of the imported book as simulate runs it."""
    from dpm_vec.importer import import_requests
    from dpm_vec.simulate import simulate_many

    data = Path(__file__).resolve().parents[1] / "data" / "requests"
    requests = [json.loads(p.read_text()) for p in sorted(data.glob("*.json"))]
    empty = json.loads(json.dumps(requests[0]))
    empty["portfolio_snapshot"]["positions"], empty["portfolio_snapshot"]["cash_balances"] = [], []
    requests.append(empty)
    import_requests(requests, tmp_path / "book")
    assert set(pl.read_parquet(tmp_path / "book" / "snapshots.parquet")["kind"]) == {"MODEL", "SHELF", "MARKET", "PORTFOLIO"}
    sweep(tmp_path / "book", tmp_path / "out", shard_size=2, progress=False)
    runs = _read(tmp_path / "out", "runs")
    assert runs["block_reason"].to_list()[-1] is None
    assert runs["status"].to_list() == [r["status"] for r in simulate_many(requests)]


def test_an_exported_request_carries_only_the_market_data_and_shelf_it_needs(tmp_path):
    """The oracle's benchmark times exported requests: each must carry the prices and shelf
    entries of the instruments its portfolio holds or targets, all of them and no others (a
    whole shelf per request would time the oracle on data the engine never reads), and its
    market's every FX rate."""
    book_dir = _book(tmp_path, 3, seed=11)
    book = read_book(book_dir)
    requests = book_to_requests(book)
    assert [r["portfolio_snapshot"]["portfolio_id"] for r in requests] == book.portfolios.sort("seq")["portfolio_id"].to_list()
    for request, p in zip(requests, book.portfolios.sort("seq").iter_rows(named=True)):
        held = {x["instrument_id"] for x in request["portfolio_snapshot"]["positions"]}
        wanted = held | {t["instrument_id"] for t in request["model_portfolio"]["targets"]}
        shelf = book.shelf.filter(pl.col("shelf_id") == p["shelf_id"])
        prices = book.prices.filter(pl.col("market_snapshot_id") == p["market_snapshot_id"])
        assert len(shelf) > len(wanted) and len(prices) > len(wanted)  # the filter is under test
        assert sorted(s["instrument_id"] for s in request["shelf_entries"]) == \
            sorted(shelf.filter(pl.col("instrument_id").is_in(list(wanted)))["instrument_id"])
        assert sorted(x["instrument_id"] for x in request["market_data_snapshot"]["prices"]) == \
            sorted(prices.filter(pl.col("instrument_id").is_in(list(wanted)))["instrument_id"])
        assert len(request["market_data_snapshot"]["fx_rates"]) == \
            book.fx_rates.filter(pl.col("market_snapshot_id") == p["market_snapshot_id"]).height


def test_a_fed_back_balance_keeps_its_digits_through_an_imported_book(tmp_path):
    """A cash balance past 20 decimals (a result fed back) decides a half cent in the
    reference: imported into a book, its 28 decimals travel in ``amount_exact``, so the
    sweep trades as simulate does (no cent's BUY of I4) and the book exports the balance
    as it was sent."""
    from dpm_vec.importer import import_requests
    from dpm_vec.simulate import simulate_many

    failures = Path(__file__).resolve().parent / "data" / "differential_failures"
    request = json.loads((failures / "fed_back_cash_past_20_decimals_decides_a_half_cent.json").read_text())["request"]
    import_requests([request], tmp_path / "book")
    book = read_book(tmp_path / "book")
    assert book_to_requests(book)[0]["portfolio_snapshot"]["cash_balances"] == request["portfolio_snapshot"]["cash_balances"]
    sweep(tmp_path / "book", tmp_path / "out", progress=False)
    swept = _read(tmp_path / "out", "intents").filter(pl.col("intent_type") == "SECURITY_TRADE")
    expected = [(i["instrument_id"], i["side"]) for i in simulate_many([request])[0]["intents"] if i["intent_type"] == "SECURITY_TRADE"]
    assert expected == [("I6", "SELL")]
    assert list(zip(swept["instrument_id"], swept["side"])) == expected


def test_a_balance_below_20_decimals_written_as_text_runs_as_sent(tmp_path):
    """A book whose cash amounts are text, as a result's after-state prints them: -2E-22
    GBP is below DEC's unit, so ``amount`` reads 0 and ``amount_exact`` keeps it (it was a
    row fault that blocked the run); the sweep's intents are simulate's, and an amount
    below 1E-28 is still a row fault naming it."""
    from dpm_vec.importer import import_requests
    from dpm_vec.simulate import simulate_many

    failures = Path(__file__).resolve().parent / "data" / "differential_failures"
    request = json.loads((failures / "fed_back_balance_below_20_decimals.json").read_text())["request"]
    balances = request["portfolio_snapshot"]["cash_balances"]
    assert "-2E-22" in [c["amount"] for c in balances]
    import_requests([request, request], tmp_path / "book")
    cash = pl.read_parquet(tmp_path / "book" / "cash.parquet").drop("amount_exact")
    texts = [c["amount"] for c in balances] + [("1E-29" if c["amount"] == "-2E-22" else c["amount"]) for c in balances]
    cash.with_columns(pl.Series("amount", texts)).write_parquet(tmp_path / "book" / "cash.parquet")
    sweep(tmp_path / "book", tmp_path / "out", progress=False)
    runs = _read(tmp_path / "out", "runs").sort("run_key")
    expected = simulate_many([request])[0]
    assert runs["status"].to_list() == [expected["status"], "BLOCKED"]
    assert runs["block_reason"].to_list()[0] is None
    faults = _read(tmp_path / "out", "input_faults")
    assert faults.select("input_column", "value").rows() == [("amount", "1E-29")]
    swept = _read(tmp_path / "out", "intents").filter(pl.col("run_key") == runs["run_key"][0])
    assert swept.height == len(expected["intents"])
    trades = [(i["instrument_id"], i["side"], Decimal(i["quantity"])) for i in expected["intents"] if i["intent_type"] == "SECURITY_TRADE"]
    got = swept.filter(pl.col("intent_type") == "SECURITY_TRADE").sort("exec_order")
    assert list(zip(got["instrument_id"], got["side"], got["quantity"])) == trades


@pytest.mark.parametrize("fault", ["null_snapshot", "unknown_file", "unknown_column"])
def test_a_dropped_input_stops_the_sweep_before_any_shard(book, tmp_path, fault):
    """What a reader would otherwise drop unseen — a holdings row with no snapshot id, a
    misspelt table file, a misspelt policy column — stops the sweep before any work,
    naming the file."""
    bad = tmp_path / "bad"
    shutil.copytree(book, bad)
    if fault == "null_snapshot":
        cash = pl.read_parquet(book / "cash.parquet")
        last = cash.height - 1  # in the last shard
        cash.with_columns(pl.when(pl.int_range(pl.len()) == last).then(None).otherwise(pl.col("portfolio_snapshot_id"))
                          .alias("portfolio_snapshot_id")).write_parquet(bad / "cash.parquet")
        says = ["cash.parquet, column 'portfolio_snapshot_id'", f"row {last} (0-based)"]
    elif fault == "unknown_file":
        (bad / "lots.parquet").rename(bad / "lot.parquet")
        says = ["lot.parquet: not a table of a book (did you mean 'lots.parquet'?)"]
    else:
        portfolios = pl.read_parquet(book / "portfolios.parquet")
        portfolios.rename({"max_turnover_pct": "max_turnover_percent"}).write_parquet(bad / "portfolios.parquet")
        says = ["portfolios.parquet: unknown column(s) 'max_turnover_percent' (did you mean 'max_turnover_pct'?)"]
    with pytest.raises(BookError) as err:
        sweep(bad, tmp_path / "out", shard_size=30, progress=False)
    assert all(part in str(err.value) for part in says), str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.work-*"))


def _per_portfolio_option(tmp_path, frames: dict, option: str, *tables: str):
    """Sweep the book ``frames``, whose portfolios carry the RFC ``option`` as a column, and
    yield per portfolio: its request (exported from the book, with the portfolio's
    ``option`` value; a null leaves the default), the oracle's result on that request, its
    ``runs`` row, and its rows of each of ``tables``."""
    book = write_book(frames, tmp_path / "book")
    sweep(book, tmp_path / "out", progress=False)
    runs = _read(tmp_path / "out", "runs")
    outputs = [_read(tmp_path / "out", table) for table in tables]
    for request, value, run in zip(book_to_requests(read_book(book)), frames["portfolios"][option], runs.iter_rows(named=True)):
        if value is not None:
            request["options"][option] = str(value) if isinstance(value, Decimal) else value
        yield request, oracle_simulate(request), run, [out.filter(pl.col("run_key") == run["run_key"]) for out in outputs]


def _without(request: dict, option: str) -> dict:
    """The oracle's result on ``request`` with ``option`` back at its default."""
    return oracle_simulate({**request, "options": {k: v for k, v in request["options"].items() if k != option}})


def _security_trades(intents: list[dict]) -> list[tuple]:
    return [(i["instrument_id"], i["side"], Decimal(i["quantity"])) for i in intents if i["intent_type"] == "SECURITY_TRADE"]


def test_missing_shelf_action_per_portfolio_agrees_with_the_oracle(tmp_path):
    """A model target the shelf lacks blocks BLOCK portfolios (shelf_missing, as the
    reference) and is excluded as SHELF_ENTRY_MISSING in EXCLUDE ones, portfolio by
    portfolio in one sweep; each run's status and exclusions are the oracle's on the same
    request with the same option."""
    frames = generate_book_frames(8, 5, holdings=(3, 6))
    # each model's first target leaves the shelf: every portfolio has an unshelved target
    dropped = set(frames["models"].group_by("model_id", maintain_order=True).first()["instrument_id"])
    frames["shelf"] = frames["shelf"].filter(~pl.col("instrument_id").is_in(list(dropped)))
    odd = pl.int_range(pl.len()) % 2 == 1
    frames["portfolios"] = frames["portfolios"].with_columns(
        missing_shelf_action=pl.when(odd).then(pl.lit("EXCLUDE")).otherwise(pl.lit("BLOCK")))
    affected = 0
    for request, expected, run, (exclusions,) in _per_portfolio_option(tmp_path, frames, "missing_shelf_action", "exclusions"):
        assert run["status"] == expected["status"], run["run_key"]
        mine = exclusions.sort("excl_order")
        assert mine.select("instrument_id", "reason_code").rows() == [
            (e["instrument_id"], e["reason_code"]) for e in expected["universe"]["excluded"]], run["run_key"]
        unshelved = [t["instrument_id"] for t in request["model_portfolio"]["targets"] if t["instrument_id"] in dropped]
        assert unshelved
        if request["options"]["missing_shelf_action"] == "BLOCK":
            assert run["status"] == "BLOCKED" and run["n_shelf_missing"] == len(unshelved)
        else:
            assert run["n_shelf_missing"] == 0
            assert mine.filter(pl.col("reason_code") == "SHELF_ENTRY_MISSING")["instrument_id"].to_list() == unshelved
            affected += run["status"] != "BLOCKED"
    assert affected >= 2  # EXCLUDE portfolios that trade past their unshelved target


def test_base_currency_fx_check_blocks_only_the_portfolios_that_ask_for_it(tmp_path):
    """require_base_currency_fx in a book: with every pair naming SGD gone from the one
    market snapshot, SGD portfolios that ask for the check are BLOCKED at E1
    (BASE_CURRENCY_FX_MISSING); those that do not, and the other base currencies, run as
    without it."""
    frames = generate_book_frames(8, 5, holdings=(3, 6))
    frames["fx_rates"] = frames["fx_rates"].filter(~pl.col("pair").str.contains("SGD"))
    asks = pl.int_range(pl.len()) != 2  # the first SGD portfolio does not ask
    frames["portfolios"] = frames["portfolios"].with_columns(require_base_currency_fx=asks)
    sweep(write_book(frames, tmp_path / "book"), tmp_path / "out", progress=False)
    runs = _read(tmp_path / "out", "runs").with_columns(asks=frames["portfolios"]["require_base_currency_fx"],
                                                        base=frames["portfolios"]["base_currency"])
    blocked = runs.filter(pl.col("block_reason") == "BASE_CURRENCY_FX_MISSING")
    assert blocked["run_key"].to_list() == runs.filter((pl.col("base") == "SGD") & pl.col("asks"))["run_key"].to_list() != []
    assert blocked["exit_path"].to_list() == ["E1"] * blocked.height
    assert runs.filter((pl.col("base") == "SGD") & ~pl.col("asks"))["block_reason"].item() != "BASE_CURRENCY_FX_MISSING"


def test_rfc_fx_dependencies_per_portfolio_agree_with_the_oracle(tmp_path):
    """rfc_fx_dependencies from a book column: every second portfolio's BUYs depend on
    their funding FX alone, the others' also on their currency's last SELL; each run's
    dependencies are the oracle's on the same request with the same option."""
    frames = generate_book_frames(8, 5, holdings=(3, 6))
    frames["portfolios"] = frames["portfolios"].with_columns(rfc_fx_dependencies=pl.int_range(pl.len()) % 2 == 1)
    dropped = 0
    for request, expected, run, (intents,) in _per_portfolio_option(tmp_path, frames, "rfc_fx_dependencies", "intents"):
        mine = intents.sort("exec_order")
        assert mine.select("intent_id", "dependencies").rows() == [
            (i["intent_id"], i["dependencies"]) for i in expected["intents"]], run["run_key"]
        if request["options"]["rfc_fx_dependencies"]:
            funding = set(mine.filter(pl.col("rationale_code") == "FUNDING")["intent_id"])
            assert all(set(d) <= funding for d in mine["dependencies"])
            dropped += [i["dependencies"] for i in _without(request, "rfc_fx_dependencies")["intents"]] != mine["dependencies"].to_list()
    assert dropped >= 1  # an RFC portfolio lost a last-SELL dependency its reference twin has


def test_delta_from_valuation_per_portfolio_agrees_with_the_oracle(tmp_path):
    """delta_from_valuation from a book column, with market values 10% above quantity ×
    price on the positions of a CALCULATED book: the portfolios that ask size their trades
    on quantity × price, the others on the market value; each run's status and trades are
    the oracle's on the same request with the same option."""
    frames = generate_book_frames(8, 5, holdings=(3, 6))
    prices = frames["prices"].select("instrument_id", "price", pl.col("currency").alias("market_value_currency"))
    positions = frames["positions"].drop("market_value", "market_value_currency", strict=False).join(
        prices, on="instrument_id", how="left", maintain_order="left")
    frames["positions"] = positions.with_columns(
        market_value=(pl.col("quantity") * pl.col("price") * Decimal("1.1")).round(2).cast(pl.Decimal(38, 20))).drop("price")
    frames["portfolios"] = frames["portfolios"].with_columns(delta_from_valuation=pl.int_range(pl.len()) % 2 == 1)
    differs = 0
    for request, expected, run, (intents,) in _per_portfolio_option(tmp_path, frames, "delta_from_valuation", "intents"):
        assert run["status"] == expected["status"], run["run_key"]
        trades = _security_trades(expected["intents"])
        mine = intents.filter(pl.col("intent_type") == "SECURITY_TRADE").sort("exec_order")
        assert mine.select("instrument_id", "side", "quantity").rows() == trades, run["run_key"]
        if request["options"]["delta_from_valuation"]:
            differs += _security_trades(_without(request, "delta_from_valuation")["intents"]) != trades
    assert differs >= 2  # the option changed the trades of portfolios that ask for it


def _first_holdings_as(frames: dict, status: str) -> tuple[dict, set[str]]:
    """``frames`` with the shelf giving ``status`` to the first two holdings of every
    portfolio, and those instruments."""
    firsts = set(frames["positions"].group_by("portfolio_snapshot_id", maintain_order=True).head(2)["instrument_id"])
    frames["shelf"] = frames["shelf"].with_columns(
        status=pl.when(pl.col("instrument_id").is_in(list(firsts))).then(pl.lit(status)).otherwise(pl.col("status")))
    return frames, firsts


def _trades_and_exclusions_agree(expected: dict, run: dict, intents: pl.DataFrame, exclusions: pl.DataFrame) -> tuple[list, list]:
    """Assert a swept run's status, security trades and exclusions are the oracle's
    ``expected``; return the trades and the (instrument, reason) exclusions."""
    assert run["status"] == expected["status"], run["run_key"]
    trades = _security_trades(expected["intents"])
    mine = intents.filter(pl.col("intent_type") == "SECURITY_TRADE").sort("exec_order")
    assert mine.select("instrument_id", "side", "quantity").rows() == trades, run["run_key"]
    reasons = exclusions.sort("excl_order").select("instrument_id", "reason_code").rows()
    assert reasons == [(e["instrument_id"], e["reason_code"]) for e in expected["universe"]["excluded"]], run["run_key"]
    return trades, reasons


def test_held_banned_action_per_portfolio_agrees_with_the_oracle(tmp_path):
    """held_banned_action from a book column, with the shelf banning the first two holdings
    of every portfolio: LIQUIDATE portfolios sell them, LOCK ones (the reference) lock them
    (LOCKED_DUE_TO_BANNED; a group or single-position cap may still scale them down, §8 item 10); each run's
    status, trades and exclusions are the oracle's on the same request with the same option."""
    frames, firsts = _first_holdings_as(generate_book_frames(8, 5, holdings=(3, 6)), "BANNED")
    frames["portfolios"] = frames["portfolios"].with_columns(
        held_banned_action=pl.when(pl.int_range(pl.len()) % 2 == 1).then(pl.lit("LIQUIDATE")).otherwise(pl.lit("LOCK")))
    sold = 0
    for request, expected, run, (intents, exclusions) in _per_portfolio_option(tmp_path, frames, "held_banned_action", "intents", "exclusions"):
        trades, reasons = _trades_and_exclusions_agree(expected, run, intents, exclusions)
        held = [p["instrument_id"] for p in request["portfolio_snapshot"]["positions"] if p["instrument_id"] in firsts]
        locked = [i for i, code in reasons if code == "LOCKED_DUE_TO_BANNED"]
        liquidate = request["options"]["held_banned_action"] == "LIQUIDATE"
        assert locked == ([] if liquidate else held), run["run_key"]
        sold += liquidate and any(i in held and side == "SELL" for i, side, _ in trades)
    assert sold >= 2  # LIQUIDATE portfolios sold banned holdings the reference would have kept


def test_allow_restricted_holdings_per_portfolio_agrees_with_the_oracle(tmp_path):
    """allow_restricted_holdings from a book column, every portfolio with allow_restricted
    and the shelf restricting the first two holdings of each: portfolios that ask sell those
    outside their model, the others (the reference) lock them (LOCKED_DUE_TO_RESTRICTED);
    each run's status, trades and exclusions are the oracle's on the same request."""
    frames, firsts = _first_holdings_as(generate_book_frames(8, 5, holdings=(3, 6)), "RESTRICTED")
    frames["portfolios"] = frames["portfolios"].with_columns(allow_restricted=True, allow_restricted_holdings=pl.int_range(pl.len()) % 2 == 1)
    sold = 0
    for request, expected, run, (intents, exclusions) in _per_portfolio_option(tmp_path, frames, "allow_restricted_holdings", "intents", "exclusions"):
        assert request["options"]["allow_restricted"] is True
        trades, reasons = _trades_and_exclusions_agree(expected, run, intents, exclusions)
        model = {t["instrument_id"] for t in request["model_portfolio"]["targets"]}
        held = [p["instrument_id"] for p in request["portfolio_snapshot"]["positions"] if p["instrument_id"] in firsts - model]
        locked = [i for i, code in reasons if code == "LOCKED_DUE_TO_RESTRICTED"]
        freed = request["options"]["allow_restricted_holdings"]
        assert locked == ([] if freed else held), run["run_key"]
        sold += freed and any(i in held and side == "SELL" for i, side, _ in trades)
    assert sold >= 2  # portfolios that ask sold restricted holdings the reference would have kept


def test_fx_sweep_threshold_per_portfolio_agrees_with_the_oracle(tmp_path):
    """fx_sweep_threshold from a book column: portfolios with a threshold of 100,000 (base
    currency) keep the surpluses worth less, the others sweep every one; each run's status
    and FX intents are the oracle's on the same request with the same option."""
    frames = generate_book_frames(8, 5, holdings=(3, 6))
    odd = pl.int_range(pl.len()) % 2 == 1
    frames["portfolios"] = frames["portfolios"].with_columns(
        fx_sweep_threshold=pl.when(odd).then(pl.lit(Decimal("100000"))).otherwise(None).cast(pl.Decimal(38, 20)))
    kept = 0
    for request, expected, run, (intents,) in _per_portfolio_option(tmp_path, frames, "fx_sweep_threshold", "intents"):
        assert run["status"] == expected["status"], run["run_key"]
        fx = intents.filter(pl.col("intent_type") == "FX_SPOT").sort("exec_order")
        want = [(i["intent_id"], i["pair"], i["rationale"]["code"]) for i in expected["intents"] if i["intent_type"] == "FX_SPOT"]
        assert fx.select("intent_id", "pair", "rationale_code").rows() == want, run["run_key"]
        threshold = request["options"].get("fx_sweep_threshold")
        if threshold is not None:
            assert all(i["buy_amount"] > Decimal(threshold) for i in fx.filter(pl.col("rationale_code") == "SWEEP").iter_rows(named=True))
            kept += len(want) < sum(i["intent_type"] == "FX_SPOT" for i in _without(request, "fx_sweep_threshold")["intents"])
    assert kept >= 1  # a threshold portfolio kept a surplus its sweep-all twin would have swept


def _corpus_requests() -> list[dict]:
    """The goldens', the sample requests' and the scenarios' inputs, plus fx_funding without
    its FX rates (an FX_MISSING finding)."""
    here = Path(__file__).parent
    requests = [json.loads(p.read_text())["inputs"] for p in sorted((here / "data" / "goldens" / "reference-service").glob("scenario_*.json"))]
    requests += [json.loads(p.read_text()) for p in sorted((here.parent / "data" / "requests").glob("*.json"))]
    requests += [json.loads(p.read_text())["inputs"] for p in sorted([*(here / "data" / "scenarios").glob("ext_*.json"),
                                                                       *(here / "data" / "scenarios").glob("rfc_*.json")])]
    return [*requests, {**REQUEST, "market_data_snapshot": {**REQUEST["market_data_snapshot"], "fx_rates": []}}]


def _output_result(requests: list[dict]):
    """The engine's Result for ``requests`` as one book, run keys r0000000.. in order (the
    JSON door's)."""
    from dpm_vec.contract import requests_to_book
    from dpm_vec.pipeline import run

    return run(requests_to_book(requests, [f"r{i:07d}" for i in range(len(requests))])[0])


def test_output_tables_agree_with_the_json_door_field_by_field():
    """The intents' constraints_applied and the runs' gross turnover are the JSON results';
    the events table has a row per event only (no null row for a run without any),
    ``event_order`` counts from 0 in each (run, category), FX_MISSING names its currency
    in ``currency`` (no instrument), a dropped intent's currency is the base currency,
    every constraint event carries its amount and group events are GROUP_<status>; only
    the tables asked for are built, and an unknown one is refused."""
    from dpm_vec.outputs import output_tables
    from dpm_vec.simulate import simulate_many

    requests = _corpus_requests()
    result = _output_result(requests)
    with pytest.raises(ValueError, match="unknown output table"):
        output_tables(result, ("runs", "no_such_table"))
    tables = output_tables(result, ("runs", "intents", "events"))
    assert list(tables) == ["runs", "intents", "events"]
    json_results = {f"r{i:07d}": r for i, r in enumerate(simulate_many(requests)) if isinstance(r["status"], str)}
    intents, runs, events = tables["intents"], tables["runs"], tables["events"]
    for key, r in json_results.items():
        mine = intents.filter(pl.col("run_key") == key).sort("exec_order")
        assert [(i, sorted(c)) for i, c in mine.select("intent_id", "constraints_applied").iter_rows()] == [
            (i["intent_id"], sorted(i.get("constraints_applied") or [])) for i in r["intents"]], key
        turnover = sum((Decimal(str(i["notional_base"]["amount"])) for i in r["intents"] if i["intent_type"] == "SECURITY_TRADE"), Decimal(0))
        assert round(runs.filter(pl.col("run_key") == key)["gross_turnover_notional_base"][0], 6) == round(turnover, 6), key
    assert intents["constraints_applied"].list.contains("TAX_BUDGET").any()
    assert events.select(pl.col("run_key", "category", "code").null_count()).row(0) == (0, 0, 0)
    assert events["event_order"].to_list() == events.select(pl.int_range(pl.len()).over("run_key", "category"))["literal"].to_list()
    fx_missing = events.filter(pl.col("code") == "FX_MISSING")
    assert fx_missing.height and fx_missing["instrument_id"].null_count() == fx_missing.height and fx_missing["currency"].null_count() == 0
    base = dict(runs.select("run_key", "base_currency").iter_rows())
    dropped = events.filter(pl.col("category") == "dropped_intent")
    assert dropped.height and all(c == base[k] for k, c in dropped.select("run_key", "currency").iter_rows())
    constraint = events.filter(~pl.col("category").is_in(["warning", "data_quality"]))
    assert set(constraint["category"]) >= {"dropped_intent", "tax_budget", "group_constraint", "settlement"}
    assert constraint["amount"].null_count() == 0
    assert set(events.filter(pl.col("category") == "group_constraint")["code"]) == {"GROUP_CAPPED", "GROUP_BLOCKED"}


def test_data_quality_events_keep_the_json_doors_order_within_a_run():
    """A run's data-quality events count ``event_order`` in the order its JSON result
    lists the findings (model order, not sorted: ZZ_B before AA_A), so a BI view of the
    events reads as the response does."""
    from dpm_vec.outputs import output_tables
    from dpm_vec.simulate import simulate_many

    request = copy.deepcopy(REQUEST)
    request["model_portfolio"]["targets"] = [{"instrument_id": i, "weight": "0.3"} for i in ("ZZ_B", "AA_A", "MM_C")]
    request["market_data_snapshot"]["prices"] = []
    request["shelf_entries"] += [{"instrument_id": i, "status": "APPROVED"} for i in ("ZZ_B", "AA_A", "MM_C")]
    listed = simulate_many([request])[0]["diagnostics"]["data_quality"]["price_missing"]
    assert listed == ["ZZ_B", "AA_A", "MM_C"]
    events = output_tables(_output_result([request]), ("events",))["events"].filter(pl.col("category") == "data_quality")
    assert events.select("code", "instrument_id", "event_order").rows() == [
        ("PRICE_MISSING", instrument, order) for order, instrument in enumerate(listed)]


def test_a_block_of_dpm_vecs_own_heads_its_runs_warning_events_as_in_the_json_door():
    """A run blocked by one of dpm_vec's own checks (a stale price) that the target stage
    also warned about (two group caps) lists the block code first in its warning events,
    as the JSON result's warnings do, then the caps in the reference's order."""
    from dpm_vec.outputs import output_tables
    from dpm_vec.simulate import simulate_many

    request = json.loads((Path(__file__).parent / "data" / "scenarios" / "ext_01_group_cap_two_groups.json").read_text())["inputs"]
    request["options"]["max_staleness_minutes"] = 60
    request["portfolio_snapshot"]["as_of"] = request["market_data_snapshot"]["as_of"] = "2026-01-02T10:00:00Z"
    request["market_data_snapshot"]["prices"][0]["as_of"] = "2026-01-01T10:00:00Z"
    listed = simulate_many([request])[0]["diagnostics"]["warnings"]
    assert listed == ["PRICE_STALE", "CAPPED_BY_GROUP_LIMIT_region:US", "CAPPED_BY_GROUP_LIMIT_sector:TECH"]
    events = output_tables(_output_result([request]), ("events",))["events"].filter(pl.col("category") == "warning")
    assert events.select("code", "event_order").rows() == [(code, order) for order, code in enumerate(listed)]


def test_options_hash_is_the_sha256_of_the_policys_canonical_json():
    """One hash per distinct policy: the SHA-256 of its canonical JSON (keys sorted, no
    spaces, other values as text), so equal policies share it whatever their column order."""
    import hashlib
    from dpm_vec.outputs import options_hashes

    names = [name for name, _, _ in POLICY_COLUMNS]
    runs = _output_result([REQUEST]).runs
    policy = runs.select(names).row(0, named=True)
    expected = hashlib.sha256(json.dumps(policy, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()
    assert options_hashes(runs)["options_hash"].to_list() == [expected]
    assert options_hashes(runs.select(names[::-1]))["options_hash"].to_list() == [expected]
