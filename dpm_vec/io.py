"""Book directories in, Parquet result datasets out (the storage edge of the engine)."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import uuid
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from dpm_vec.book import OPTIONAL_TABLES, TABLES, Book, conform, empty_table
from dpm_vec.errors import BookError
from dpm_vec.schemas import check_table

REFERENCE_TABLES = ("prices", "fx_rates", "shelf", "shelf_attributes", "models")


def _path(book_dir: Path, table: str) -> Path:
    return book_dir / f"{table}.parquet"


def _check_columns(table: str, file: Path, columns: list[str]) -> None:
    known = {name for name, _, _ in TABLES[table]}
    for name, _, required in TABLES[table]:
        if required and name not in columns:
            near = difflib.get_close_matches(name, columns, n=1)
            hint = f" (the file has {near[0]!r}: did you mean {name!r}?)" if near else ""
            raise BookError(str(file), f"missing required column{hint}; the file has {sorted(columns)}", column=name)
    unknown = [c for c in columns if c not in known]
    if unknown and table != "portfolios":
        near = {c: difflib.get_close_matches(c, sorted(known), n=1) for c in unknown}
        described = ", ".join(f"{c!r}" + (f" (did you mean {n[0]!r}?)" if n else "") for c, n in near.items())
        raise BookError(str(file), f"unknown column(s) {described}; expected columns: {sorted(known)}")


def scan_table(book_dir: Path, table: str, file: Path | None = None) -> pl.LazyFrame | None:
    file = file or _path(book_dir, table)
    if not file.exists():
        if table in OPTIONAL_TABLES:
            return None
        raise BookError(str(file), f"missing file: a book needs {table}.parquet (see docs/book.md)")
    try:
        schema = pq.read_schema(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise BookError(str(file), f"not a readable Parquet file: {exc}") from None
    _check_columns(table, file, schema.names)
    return pl.scan_parquet(file)


def _conform(table: str, frame: pl.DataFrame, file: str) -> pl.DataFrame:
    try:
        out = conform(table, frame)
    except pl.exceptions.PolarsError as exc:
        raise BookError(file, f"a column has the wrong type: {str(exc).splitlines()[0]}") from None
    check_table(table, out, file)
    return out


def read_portfolios(book_dir: str | Path, file: Path | None = None, rows: tuple[int, int] | None = None) -> pl.DataFrame:
    """The portfolios table, or the ``rows = (offset, length)`` slice of it (a shard)."""
    book_dir = Path(book_dir)
    lf = scan_table(book_dir, "portfolios", file)
    if rows is not None:
        lf = lf.slice(*rows)
    return _conform("portfolios", lf.collect(), str(file or _path(book_dir, "portfolios")))


def read_reference(book_dir: str | Path) -> dict[str, pl.DataFrame]:
    """The shared tables (market data, shelf, models): read once per sweep."""
    book_dir = Path(book_dir)
    out = {}
    for table in REFERENCE_TABLES:
        lf = scan_table(book_dir, table)
        frame = empty_table(table) if lf is None else lf.collect()
        out[table] = _conform(table, frame, str(_path(book_dir, table)))
    return out


def read_book(book_dir: str | Path, portfolios: pl.DataFrame | None = None,
              reference: dict[str, pl.DataFrame] | None = None, files: dict[str, Path] | None = None,
              spans: dict[str, tuple[int, int]] | None = None) -> Book:
    """Read a book directory (or the part of it that ``portfolios`` — conformed rows of
    the portfolios table — needs), validate every table, and flag runs whose model,
    shelf or market snapshot does not exist. ``files`` overrides where a table is read
    from (a sweep shard's own slice of the holdings); ``spans`` limits a table to the
    ``(first row, row count)`` span that holds the rows of these portfolios."""
    files = files or {}
    book_dir = Path(book_dir)
    portfolios = read_portfolios(book_dir) if portfolios is None else portfolios
    reference = read_reference(book_dir) if reference is None else reference
    snapshot_ids = portfolios["portfolio_snapshot_id"].unique().implode()
    run_keys = portfolios["run_key"].unique().implode()
    tables: dict[str, pl.DataFrame] = {"portfolios": portfolios.drop("seq")}
    for table, key, ids in (("positions", "portfolio_snapshot_id", snapshot_ids), ("cash", "portfolio_snapshot_id", snapshot_ids),  # noqa: E501
                            ("lots", "portfolio_snapshot_id", snapshot_ids), ("group_constraints", "run_key", run_keys),
                            ("overdraft_limits", "run_key", run_keys)):
        if table in files and not files[table].exists():
            tables[table] = empty_table(table)
            continue
        lf = scan_table(book_dir, table, files.get(table))
        if lf is not None and spans and table in spans:
            lf = lf.slice(*spans[table])
        frame = empty_table(table) if lf is None else lf.filter(pl.col(key).is_in(ids)).collect()
        tables[table] = frame
    conformed = {table: _conform(table, frame, str(_path(book_dir, table))) for table, frame in tables.items() if table != "portfolios"}
    conformed.update(reference)
    conformed["portfolios"] = _flag_broken_references(portfolios, reference)
    return Book(**conformed)


def _flag_broken_references(portfolios: pl.DataFrame, reference: dict[str, pl.DataFrame]) -> pl.DataFrame:
    models = reference["models"]["model_id"].unique().implode()
    shelves = reference["shelf"]["shelf_id"].unique().implode()
    markets = pl.concat([reference["prices"]["market_snapshot_id"], reference["fx_rates"]["market_snapshot_id"]]).unique().implode()
    return portfolios.with_columns(
        pl.coalesce(
            pl.col("input_fault"),
            pl.when(~pl.col("model_id").is_in(models)).then(pl.lit("UNKNOWN_MODEL")),
            pl.when(~pl.col("shelf_id").is_in(shelves)).then(pl.lit("UNKNOWN_SHELF")),
            pl.when(~pl.col("market_snapshot_id").is_in(markets)).then(pl.lit("UNKNOWN_MARKET_SNAPSHOT")),
        ).alias("input_fault")
    )


def write_book(tables: dict[str, pl.DataFrame], out_dir: str | Path) -> Path:
    """Write ``<table>.parquet`` files atomically (a temp dir renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for table, frame in tables.items():
            if frame is None or (frame.height == 0 and table in OPTIONAL_TABLES):
                continue
            frame.drop("seq", strict=False).write_parquet(tmp / f"{table}.parquet")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` (old one removed after)."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
