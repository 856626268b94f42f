"""Book directories in, Parquet result datasets out (the storage edge of the engine)."""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dpm_vec.book import (COLUMN_DEFAULTS, LOT_SUM_TOLERANCE, OPTIONAL_TABLES, POLICY_COLUMNS, TABLES, Book, cast_column, conform, empty_table,
                          finer_than, finest_unit, table_schema)
from dpm_vec.codes import InputFault
from dpm_vec.errors import BookError, first_line
from dpm_vec.numeric import units_text
from dpm_vec.outdir import remove_tree
from dpm_vec.schemas import check_table, failure_cases, raise_failures

REFERENCE_TABLES = ("prices", "fx_rates", "shelf", "shelf_attributes", "models", "snapshots")

# Tables whose every row belongs to portfolios: by holdings snapshot or by run key. When a
# sweep reads a shard, a row that fails its checks blocks the portfolios it belongs to
# (with this block_reason) and the others run; the row is named in ROW_FAULT_SCHEMA form.
PORTFOLIO_ROWS: dict[str, tuple[str, str | None, InputFault]] = {
    # table: (portfolio key, column naming the row within the portfolio, block reason)
    "portfolios": ("run_key", None, InputFault.INVALID_PORTFOLIO),
    "positions": ("portfolio_snapshot_id", "instrument_id", InputFault.INVALID_HOLDINGS),
    "cash": ("portfolio_snapshot_id", "currency", InputFault.INVALID_HOLDINGS),
    "lots": ("portfolio_snapshot_id", "lot_id", InputFault.INVALID_HOLDINGS),
    "group_constraints": ("run_key", "constraint_key", InputFault.INVALID_LIMITS),
    "overdraft_limits": ("run_key", "currency", InputFault.INVALID_LIMITS),
}
ROW_FAULT_SCHEMA = {"input_table": pl.String, "key": pl.String, "row_key": pl.String, "input_column": pl.String, "failed_check": pl.String,
                    "value": pl.String}


def _path(book_dir: Path, table: str) -> Path:
    return book_dir / f"{table}.parquet"


_PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")


def _check_columns(table: str, file: Path, columns: list[str]) -> None:
    """Every required column present and no unknown one, in every table: a misspelt
    optional column (a policy column of ``portfolios`` such as ``max_turnover_percent``)
    would otherwise be dropped and its default silently take its place."""
    known = {name for name, _, _ in TABLES[table]}
    for name, _, required in TABLES[table]:
        if required and name not in columns:
            near = difflib.get_close_matches(name, columns, n=1)
            hint = f" (the file has {near[0]!r}: did you mean {name!r}?)" if near else ""
            raise BookError(str(file), f"missing required column{hint}; the file has {sorted(columns)}", column=name)
    unknown = [c for c in columns if c not in known]
    if unknown:
        def hint(column: str) -> str:
            if _PANDAS_INDEX.match(column):
                return " (a pandas index: write the frame with index=False)"
            near = difflib.get_close_matches(column, sorted(known), n=1)
            return f" (did you mean {near[0]!r}?)" if near else ""

        described = ", ".join(f"{c!r}{hint(c)}" for c in unknown)
        raise BookError(str(file), f"unknown column(s) {described}; expected columns: {sorted(known)}")


def book_files(book_dir: Path) -> list[Path]:
    """The ``*.parquet`` entries of a book directory (hidden ones aside)."""
    if not book_dir.is_dir():
        return []
    return sorted(p for p in book_dir.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))


def check_book_files(book_dir: Path) -> None:
    """A ``.parquet`` file in a book that is no table of a book is an error, not ignored:
    ``group_constraint.parquet`` (a misspelt ``group_constraints.parquet``) would otherwise
    run every portfolio without its limits. Other files (a README, a manifest) are fine."""
    tables = sorted(TABLES)
    for file in book_files(book_dir):
        if file.stem not in TABLES:
            near = difflib.get_close_matches(file.stem, tables, n=1)
            hint = f" (did you mean {near[0] + '.parquet'!r}?)" if near else ""
            raise BookError(str(file), f"not a table of a book{hint}; a book's tables are "
                                       f"{', '.join(t + '.parquet' for t in tables)} (see docs/book.md)")


def scan_table(book_dir: Path, table: str, file: Path | None = None, check_owned: bool = True) -> pl.LazyFrame | None:
    """``table``'s file as a lazy frame after its whole-file checks (None: an optional table
    the book lacks). ``check_owned=False`` skips the rows-of-no-portfolio check, which may
    read the key column: a sweep's shards, whose book the sweep checked once at its start."""
    file = file or _path(book_dir, table)
    if not file.exists():
        if table in OPTIONAL_TABLES:
            return None
        raise BookError(str(file), f"missing file{_missing_hint(file, table)}: a book needs {table}.parquet (see docs/book.md)")
    try:
        parquet = pq.ParquetFile(file)
        schema, metadata = parquet.schema_arrow, parquet.metadata
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise BookError(str(file), f"not a readable Parquet file: {exc}") from None
    repeated = sorted({name for name in schema.names if schema.names.count(name) > 1})
    if repeated:
        raise BookError(str(file), f"column(s) {', '.join(map(repr, repeated))} appear more than once; each column may appear once")
    _check_columns(table, file, schema.names)
    _check_types(table, file, schema)
    if check_owned and table in PORTFOLIO_ROWS and table != "portfolios":
        _check_owned(table, file, metadata)
    casts = plain_columns(table, schema)
    scan = _scan_parquet(file, schema)
    return scan.with_columns(casts) if casts else scan


def plain_columns(table: str, schema: pa.Schema) -> list[pl.Expr]:
    """The casts that let a file's columns (Arrow ``schema``) join and compare with the
    other tables' keys: dictionary-encoded text (pandas' category, Polars' Categorical) as
    plain text, and a column of Arrow's null type (an empty pandas frame's) as its book dtype."""
    book = table_schema(table)
    return [pl.col(field.name).cast(pl.String) for field in schema
            if pa.types.is_dictionary(field.type) and _is_text(field.type.value_type)] + \
           [pl.col(field.name).cast(book[field.name]) for field in schema if pa.types.is_null(field.type) and field.name in book]


_FIXED_OFFSET = re.compile(r"^[+-][0-9]{2}(:?[0-9]{2})?$")


def _scan_parquet(file: Path, schema: pa.Schema) -> pl.LazyFrame:
    """``file`` as a lazy frame. Arrow labels a timestamp with a zone name or a fixed offset
    (``+05:30``, what pyarrow writes for pandas' ``timezone(timedelta(...))``), and Polars
    reads names only; the instants are UTC either way, so such a file is read through
    pyarrow with those columns labelled UTC."""
    offsets = [field for field in schema if pa.types.is_timestamp(field.type) and _FIXED_OFFSET.match(field.type.tz or "")]
    if not offsets:
        return pl.scan_parquet(file, glob=False)
    try:
        table = pq.read_table(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise BookError(str(file), f"not a readable Parquet file: {exc}") from None
    for field in offsets:
        index = table.schema.get_field_index(field.name)
        table = table.set_column(index, field.name, table.column(index).cast(pa.timestamp(field.type.unit, "UTC")))
    return pl.from_arrow(table).lazy()


def _missing_hint(file: Path, table: str) -> str:
    """What the folder of a missing table file holds instead, when that says why: the table
    in another format, a sweep's output given as the book, or a misspelt table file (a
    file that is itself a table is no misspelling of another)."""
    folder = file.parent
    if not folder.is_dir():
        return ""
    other_format = sorted(p.name for p in folder.iterdir() if p.stem == table and p.suffix != ".parquet" and p.is_file())
    if other_format:
        return f" (the book has {other_format[0]!r}: a book's tables are Parquet files)"
    if (folder / "manifest.json").is_file() and (folder / "runs").is_dir():
        return " (this folder is a sweep's output, not a book)"
    strays = [p.stem for p in book_files(folder) if p.stem not in TABLES]
    near = difflib.get_close_matches(table, strays, n=1)
    return f" (the book has {near[0] + '.parquet'!r}: did you mean {file.name!r}?)" if near else ""


def _check_owned(table: str, file: Path, metadata: pq.FileMetaData) -> None:
    """Every row of a per-portfolio table names its portfolio key: a row with a null or
    empty ``portfolio_snapshot_id`` (or ``run_key``) belongs to no portfolio, and a reader
    that takes each portfolio's rows would drop it unseen. The file's fault, naming its
    0-based rows. The Parquet statistics (null count, and a minimum of "" for an empty
    key) answer for a clean file without reading a value."""
    key = PORTFOLIO_ROWS[table][0]
    suspect = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        column = next((row_group.column(i) for i in range(row_group.num_columns)
                       if row_group.column(i).path_in_schema == key), None)
        stats = column.statistics if column is not None else None
        if stats is None or not stats.has_null_count or not stats.has_min_max:
            suspect = None  # a writer that kept no statistics (or a group of nulls only): read the keys
            break
        suspect += stats.null_count + (stats.min in ("", b""))
    if suspect == 0:
        return
    missing = pl.col(key).is_null() | (pl.col(key).cast(pl.String) == "")
    rows = pl.scan_parquet(file, glob=False).with_row_index("_row").filter(missing).select("_row", pl.col(key).is_null().alias("_null"))
    found = collect(rows, file)
    if found.height:
        raise BookError(str(file), f"{found.height} row(s) with no {key}: such a row belongs to no portfolio", column=key,
                        examples=[f"row {row} (0-based): {key} {'null' if null else 'empty'} fails not_nullable"
                                  for row, null in found.head(5).iter_rows()])


def collect(lf: pl.LazyFrame, file: Path, **options) -> pl.DataFrame:
    """``lf`` collected, a file whose footer reads but whose data does not (a corrupt
    page, a truncated copy) named as the file's fault instead of Polars' bare message."""
    try:
        return lf.collect(**options)
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise BookError(str(file), f"not a readable Parquet file: {first_line(exc)}") from None


def _is_text(arrow: pa.DataType) -> bool:
    return pa.types.is_string(arrow) or pa.types.is_large_string(arrow) or pa.types.is_string_view(arrow)


def _accepts(dtype: pl.DataType, arrow: pa.DataType) -> bool:
    """Whether a file column of type ``arrow`` can hold values of the book dtype: the
    types ``conform`` casts from (values that still do not cast are row faults)."""
    if pa.types.is_dictionary(arrow):
        arrow = arrow.value_type
    text = _is_text(arrow)
    if pa.types.is_null(arrow):
        return True
    if dtype == pl.String:
        return text
    if isinstance(dtype, pl.Decimal):  # Polars reads decimals of up to 38 digits
        return text or (pa.types.is_decimal(arrow) and arrow.precision <= 38) or pa.types.is_integer(arrow) or pa.types.is_floating(arrow)
    if dtype.is_integer():  # floats of whole numbers too (pandas' integer column with missing values)
        return text or pa.types.is_integer(arrow) or pa.types.is_floating(arrow)
    if dtype == pl.Boolean:  # or 0/1 integers (a database's bit column)
        return pa.types.is_boolean(arrow) or pa.types.is_integer(arrow)
    if isinstance(dtype, pl.Datetime):  # text is read as ISO 8601 (book.cast_column)
        return text or pa.types.is_timestamp(arrow) or pa.types.is_date(arrow)
    return True


def _check_types(table: str, file: Path, schema: pa.Schema) -> None:
    for name, dtype, _ in TABLES[table]:
        if name in schema.names and not _accepts(dtype, schema.field(name).type):
            casts = ": text, an integer, a float, a decimal of up to 38 digits" if isinstance(dtype, pl.Decimal) else ""
            raise BookError(str(file), f"a column has the wrong type: {schema.field(name).type}, expected {dtype} "
                                       f"(or a type that casts to it{casts})", column=name)


def _conformed(table: str, frame: pl.DataFrame, file: str) -> pl.DataFrame:
    """``conform`` with a failed cast named as the file's fault (the checks come after)."""
    _check_casts(table, frame, file)
    try:
        return conform(table, frame)
    except pl.exceptions.PolarsError as exc:
        raise _wrong_type(file, exc) from None


def _check_casts(table: str, frame: pl.DataFrame, file: str) -> None:
    """A value that does not cast to its column, as the file's fault, naming the rows: a
    float or a text of a decimal column with no decimal value in it (NaN, an infinity,
    "12,50", a number beyond the column's range), a float of an integer column that is no
    whole number, an integer of a flag column other than 0 and 1, a text of a timestamp
    column that is no ISO 8601 timestamp, an integer or decimal beyond its column's range
    (``book.cast_column`` casts each; a shard's reader sets such a row of one portfolio's
    data aside first, ``_uncastable``)."""
    for name, dtype in table_schema(table).items():
        source = frame.schema.get(name)
        if source is None or source == dtype:
            continue
        decimal = isinstance(dtype, pl.Decimal) and finer_than(source, dtype)
        whole = dtype.is_integer() and source.is_float()
        flag = dtype == pl.Boolean and source.is_integer()
        stamp = isinstance(dtype, pl.Datetime) and source == pl.String
        finest = finest_unit(table, name, dtype) if decimal else dtype
        failed = frame.select(pl.col(name), cast_column(name, source, dtype, strict=False, finest=finest).alias("_cast")).with_row_index(
            "_row").filter(pl.col(name).is_not_null() & pl.col("_cast").is_null())
        if failed.height == 0:
            continue
        if flag:
            what = "that are no flag (true or false, or the integers 1 and 0)"
        elif whole:
            what = f"that are no whole number within {dtype}'s range (an integer column stored as floats holds whole numbers)"
        elif stamp:
            what = "that are no timestamp (ISO 8601 text such as 2025-06-30T21:00:00Z, with an offset, or none for UTC)"
        elif source == pl.String and isinstance(dtype, pl.Decimal):  # text such as "12,50": no decimal number
            what = f"that are no decimal number (written like 1234.56) or {_held(dtype, finest)}"
        elif source == pl.String and dtype.is_integer():  # text such as "two" or "2.5"
            what = f"that are no whole number (written like 2) within {dtype}'s range"
        elif isinstance(dtype, pl.Decimal) and (isinstance(source, pl.Decimal) or source.is_integer()):
            what = _held(dtype, finest)  # 5E+18 as an integer, or a decimal of more integer digits
        elif dtype.is_integer() and source.is_integer():
            what = f"outside the range its column holds ({dtype})"
        elif not source.is_float():
            what = f"that do not cast to {dtype}"
        else:
            finite = failed.filter(pl.col(name).is_finite()).height
            what = ("not a finite number (NaN or an infinity), which a decimal column cannot hold" if not finite
                    else _held(dtype, finest) if finite == failed.height
                    else f"not a finite number or {_held(dtype, finest)}")
        shown = repr if stamp else str  # a text quoted, a number as written
        raise BookError(file, f"{failed.height} value(s) {what}", column=name,
                        examples=[f"row {row} (0-based): {name} {shown(value)} fails castable to {dtype}"
                                  for row, value in failed.head(5).select("_row", pl.col(name).cast(pl.String)).iter_rows()])


def _held(dtype: pl.Decimal, finest: pl.Decimal) -> str:
    return f"outside the range its column holds ({dtype}: below 1E{38 - dtype.scale}, and 0 or at least 1E-{finest.scale})"


_NUMBER_CAST = re.compile(r"conversion from `(decimal|[iuf]\d+)")


def _wrong_type(file: str, exc: pl.exceptions.PolarsError) -> BookError:
    """A cast Polars refused, as the file's fault: a number that its column's type cannot
    hold (a model weight of 10^10 or more in Decimal(38, 28)), or values of another type."""
    first = str(exc).splitlines()[0]
    if _NUMBER_CAST.match(first):
        return BookError(file, f"a value is outside the range its column holds: {first}")
    return BookError(file, f"a column has the wrong type: {first}")


def _conform(table: str, frame: pl.DataFrame, file: str) -> pl.DataFrame:
    out = _conformed(table, frame, file)
    check_table(table, out, file)
    return out


def _scan_portfolios(book_dir: Path, file: Path | None, rows: tuple[int, int] | None) -> pl.DataFrame:
    path = file or _path(book_dir, "portfolios")
    lf = scan_table(book_dir, "portfolios", file)
    frame = collect(lf if rows is None else lf.slice(*rows), path)
    # the reader's column: a value in the book's file would be taken as its verdict (a what-if
    # sweep's derived portfolios, read from their own file, carry the verdicts read from the book)
    if file is None and "input_fault" in frame.columns:
        given = frame.with_row_index("_row", offset=rows[0] if rows else 0).filter(pl.col("input_fault").is_not_null())
        if given.height:
            raise BookError(str(path), f"{given.height} row(s) set input_fault, which the book reader sets (a run's broken "
                            "reference or bad value); leave the column out or null", column="input_fault",
                            examples=[f"row {row} (0-based): input_fault {value!r}" for row, value in given.select("_row", "input_fault").head(5).rows()])
    return frame


def read_portfolios(book_dir: str | Path, file: Path | None = None, rows: tuple[int, int] | None = None) -> pl.DataFrame:
    """The portfolios table, or the ``rows = (offset, length)`` slice of it (a shard)."""
    book_dir = Path(book_dir)
    return _conform("portfolios", _scan_portfolios(book_dir, file, rows), str(file or _path(book_dir, "portfolios")))


# columns of a portfolio's row that only that portfolio uses: a bad value blocks it (a null or
# empty reference id joins no rows, so the run reaches its block without them)
_REFERENCE_COLUMNS = ("portfolio_snapshot_id", "market_snapshot_id", "shelf_id", "model_id")
_OWN_COLUMNS = ("base_currency", "portfolio_as_of", "market_as_of", *_REFERENCE_COLUMNS, *(name for name, _, _ in POLICY_COLUMNS))


def read_portfolio_rows(book_dir: str | Path, file: Path | None = None,
                        rows: tuple[int, int] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``read_portfolios`` for a sweep: a value of a portfolio's own options, base currency,
    timestamps or snapshot, shelf or model id that fails its checks blocks that portfolio
    (input_fault INVALID_PORTFOLIO; an option's value is replaced by its default so the
    row still runs to its block) instead of stopping the sweep. Returns the rows and the
    failed values (``ROW_FAULT_SCHEMA``). Faults that leave a run without one identity — a
    missing or repeated run_key, an empty portfolio_id — still raise."""
    book_dir = Path(book_dir)
    name = str(file or _path(book_dir, "portfolios"))
    frame = _scan_portfolios(book_dir, file, rows)
    if "run_key" not in frame.columns:
        frame = frame.with_columns(pl.col("portfolio_id").cast(pl.String).alias("run_key"))
    failed = _uncastable("portfolios", frame, _OWN_COLUMNS, name)
    for column, keys in failed.group_by("input_column").agg("key").iter_rows():  # null: the option's default
        frame = _replace_for_runs(frame, keys, column, pl.lit(None))
    out = _conformed("portfolios", frame, name)
    cases = failure_cases("portfolios", out)
    if cases is not None:
        own = (cases["column"].is_in(_OWN_COLUMNS) & cases["index"].is_not_null()).fill_null(False)
        if not own.all():
            raise_failures(cases.filter(~own), name, "portfolios")
        checked = _checked("portfolios", out, cases)
        failed = pl.concat([failed, checked])
        options = [option for option, _, _ in POLICY_COLUMNS]
        for column, keys in checked.filter(pl.col("input_column").is_in(options)).group_by("input_column").agg("key").iter_rows():
            out = _replace_for_runs(out, keys, column, pl.lit(COLUMN_DEFAULTS[("portfolios", column)], dtype=out.schema[column]))
    failed = failed.unique(maintain_order=True)
    return flag_row_faults(out, failed), failed


def _replace_for_runs(frame: pl.DataFrame, run_keys: list[str], column: str, value: pl.Expr) -> pl.DataFrame:
    """``column`` set to ``value`` in the rows of ``run_keys``."""
    return frame.with_columns(pl.when(pl.col("run_key").cast(pl.String).is_in(run_keys)).then(value).otherwise(pl.col(column)).alias(column))


def _uncastable(table: str, frame: pl.DataFrame, columns, file: str) -> pl.DataFrame:
    """The values of ``columns`` that do not cast to the book dtype (``ROW_FAULT_SCHEMA``);
    columns already of that dtype cannot fail."""
    key, row, _ = PORTFOLIO_ROWS[table]
    dtypes = {name: dtype for name, dtype in table_schema(table).items()
              if name in columns and name in frame.columns and frame.schema[name] != dtype}
    try:
        parts = [
            frame.filter(pl.col(name).is_not_null()
                         & cast_column(name, frame.schema[name], dtype, strict=False, finest=finest_unit(table, name, dtype)).is_null()).select(
                pl.lit(table).alias("input_table"), pl.col(key).cast(pl.String).alias("key"),
                (pl.col(row).cast(pl.String) if row else pl.lit(None, dtype=pl.String)).alias("row_key"),
                pl.lit(name).alias("input_column"), pl.lit(f"castable to {dtype}").alias("failed_check"), pl.col(name).cast(pl.String).alias("value"),
            )
            for name, dtype in dtypes.items()
        ]
    except pl.exceptions.PolarsError as exc:  # e.g. a float too large for any decimal
        raise _wrong_type(file, exc) from None
    return pl.concat([pl.DataFrame(schema=ROW_FAULT_SCHEMA), *parts])


def _checked(table: str, frame: pl.DataFrame, cases: pl.DataFrame) -> pl.DataFrame:
    """Pandera's failure cases of rows of ``frame`` (the one validated), in ``ROW_FAULT_SCHEMA``."""
    key, row, _ = PORTFOLIO_ROWS[table]
    at = cases["index"].cast(pl.UInt32)
    return pl.DataFrame([
        pl.repeat(table, cases.height, dtype=pl.String, eager=True).alias("input_table"),
        frame[key].cast(pl.String).gather(at).alias("key"),
        (frame[row].cast(pl.String).gather(at) if row else pl.repeat(None, cases.height, dtype=pl.String, eager=True)).alias("row_key"),
        cases["column"].fill_null("(row)").alias("input_column"),
        cases["check"].cast(pl.String).alias("failed_check"),
        cases["failure_case"].cast(pl.String).alias("value"),
    ])


def read_reference(book_dir: str | Path) -> dict[str, pl.DataFrame]:
    """The shared tables (market data, shelf, models): read once per sweep."""
    book_dir = Path(book_dir)
    check_book_files(book_dir)
    out = {}
    for table in REFERENCE_TABLES:
        lf = scan_table(book_dir, table)
        frame = empty_table(table) if lf is None else collect(lf, _path(book_dir, table))
        out[table] = _conform(table, frame, str(_path(book_dir, table)))
    return out


def read_book(book_dir: str | Path, portfolios: pl.DataFrame | None = None,
              reference: dict[str, pl.DataFrame] | None = None, files: dict[str, Path] | None = None,
              spans: dict[str, tuple[int, int]] | None = None) -> Book:
    """Read a book directory (or the part of it that ``portfolios`` — conformed rows of
    the portfolios table — needs), validate every table, and flag runs whose model,
    shelf or market snapshot does not exist. ``files`` overrides where a table is read
    from (a sweep shard's own slice of the holdings); ``spans`` limits a table to the
    ``(first row, row count)`` span that holds the rows of these portfolios. Any failed
    check raises a ``BookError``."""
    return _read_book(book_dir, portfolios, reference, files, spans, isolate=False)[0]


def read_shard(book_dir: str | Path, portfolios: pl.DataFrame, reference: dict[str, pl.DataFrame],
               files: dict[str, Path] | None = None, spans: dict[str, tuple[int, int]] | None = None) -> tuple[Book, pl.DataFrame]:
    """``read_book`` for one sweep shard: a row of a ``PORTFOLIO_ROWS`` table that fails
    its checks (a value that does not cast, a conflicting duplicate, a bad currency code)
    blocks the portfolios it belongs to instead of stopping the sweep. Returns the book and
    the failed rows (``ROW_FAULT_SCHEMA``); faults of a whole file still raise."""
    return _read_book(book_dir, portfolios, reference, files, spans, isolate=True)


def _read_book(book_dir, portfolios, reference, files, spans, isolate: bool) -> tuple[Book, pl.DataFrame]:
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
        lf = scan_table(book_dir, table, files.get(table), check_owned=not isolate)  # isolate: a sweep's shard
        if lf is not None and spans and table in spans:
            lf = lf.slice(*spans[table])
        frame = empty_table(table) if lf is None else collect(lf.filter(pl.col(key).is_in(ids)), files.get(table) or _path(book_dir, table))
        tables[table] = frame
    conformed, faults = {}, [pl.DataFrame(schema=ROW_FAULT_SCHEMA)]
    for table, frame in tables.items():
        if table == "portfolios":
            continue
        file = str(_path(book_dir, table))
        if isolate and table in PORTFOLIO_ROWS:
            conformed[table], failed = _isolate_row_faults(table, frame, file)
            faults.append(failed)
        else:
            conformed[table] = _conform(table, frame, file)
    conformed.update(reference)
    faults = pl.concat(faults)
    # lots that do not add up to their position (§3.6 item 6), of portfolios no fault blocks already
    blocked = faults.filter(pl.col("input_table").is_in(["positions", "lots"]))["key"].implode()
    unbalanced = lot_sum_faults(conformed["positions"], conformed["lots"].filter(~pl.col("portfolio_snapshot_id").is_in(blocked)))
    if unbalanced.height and not isolate:
        raise BookError(str(_path(book_dir, "lots")), f"{unbalanced.height} position(s) whose lots do not add up to the position's "
                        f"quantity (within {LOT_SUM_TOLERANCE})", column="quantity",
                        examples=[f"portfolio_snapshot_id {key} instrument_id {row}: {value}"
                                  for key, row, value in unbalanced.select("key", "row_key", "value").head(5).rows()])
    faults = pl.concat([faults, unbalanced])
    # the holdings snapshots with rows: every row of the portfolios' own snapshots is read
    # (a shard's span or split holds all rows of its snapshots), the failing ones too
    held = pl.concat([tables[t]["portfolio_snapshot_id"].cast(pl.String) for t in ("positions", "cash")])
    conformed["portfolios"] = flag_row_faults(_flag_broken_references(portfolios, reference, held), faults)
    return Book(**conformed), faults


def lot_sum_faults(positions: pl.DataFrame, lots: pl.DataFrame) -> pl.DataFrame:
    """The positions whose lots do not add up to their quantity within LOT_SUM_TOLERANCE, lots of an
    instrument the portfolio does not hold among them, as failed ``lots`` rows
    (``ROW_FAULT_SCHEMA``): the reference refuses such a request (spec §3.6 item 6), so
    the portfolio is INVALID_HOLDINGS."""
    if not lots.height:
        return pl.DataFrame(schema=ROW_FAULT_SCHEMA)
    keys = ["portfolio_snapshot_id", "instrument_id"]
    sums = lots.group_by(keys, maintain_order=True).agg(pl.col("quantity").sum().alias("_lots"))
    return sums.join(positions.select(*keys, "quantity"), on=keys, how="left", maintain_order="left").filter(
        pl.col("quantity").is_null() | ((pl.col("_lots") - pl.col("quantity")).abs() > LOT_SUM_TOLERANCE)
    ).select(
        pl.lit("lots").alias("input_table"), pl.col("portfolio_snapshot_id").alias("key"), pl.col("instrument_id").alias("row_key"),
        pl.lit("quantity").alias("input_column"),
        pl.lit(f"lots sum to the position's quantity (within {LOT_SUM_TOLERANCE})").alias("failed_check"),
        pl.format("{} (the position holds {})", units_text("_lots"),
                  pl.when(pl.col("quantity").is_null()).then(pl.lit("none")).otherwise(units_text("quantity"))).alias("value"),
    )


def _isolate_row_faults(table: str, frame: pl.DataFrame, file: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(``frame`` conformed, without the rows of every portfolio key that has a failing
    row; the failing rows). Values that do not cast to the book dtype fail first; the rest
    are conformed and checked with the table's Pandera schema. A failure not tied to a row
    (a whole column) raises, as in ``read_book``."""
    key = PORTFOLIO_ROWS[table][0]
    failed = _uncastable(table, frame, frame.columns, file)
    clean = frame.filter(~pl.col(key).cast(pl.String).is_in(failed["key"].implode())) if failed.height else frame
    clean = _conformed(table, clean, file)
    cases = failure_cases(table, clean)
    if cases is not None:
        if cases["index"].null_count():  # not a row: the file itself is wrong
            raise_failures(cases, file, table)
        failed = pl.concat([failed, _checked(table, clean, cases)])
        clean = clean.filter(~pl.col(key).is_in(failed["key"].implode()))
    return clean, failed.unique(maintain_order=True)


def row_faults_by_run(portfolios: pl.DataFrame, faults: pl.DataFrame) -> pl.DataFrame:
    """The failed rows (``read_shard``) beside each run they blocked: one row per run
    and failed check, in portfolio order, so the same whatever the sharding (a holdings
    snapshot shared by several runs is named under each)."""
    if not faults.height:
        return pl.DataFrame(schema={"run_key": pl.String, **ROW_FAULT_SCHEMA}).drop("key")
    numbered = portfolios.with_row_index("_run")
    owners = pl.concat([
        numbered.select("_run", "run_key", pl.lit(table).alias("input_table"), pl.col(key).alias("key"))
        for table, (key, _, _) in PORTFOLIO_ROWS.items()
    ])
    table_order = pl.col("input_table").replace_strict(list(PORTFOLIO_ROWS), list(range(len(PORTFOLIO_ROWS))), return_dtype=pl.Int32)
    return (
        faults.join(owners, on=["input_table", "key"], how="inner")
        .sort([pl.col("_run"), table_order, "row_key", "input_column", "failed_check", "value"], nulls_last=True)
        .select("run_key", "input_table", "row_key", "input_column", "failed_check", "value")
    )


def with_fault_details(runs: pl.DataFrame, faults: pl.DataFrame) -> pl.DataFrame:
    """``runs`` (a shard's runs table) with the block_detail of each run an input value
    blocked (INVALID_*) naming its first failed value from ``faults``
    (``row_faults_by_run``), and how many more the input_faults dataset holds."""
    if not faults.height:
        return runs
    first = faults.group_by("run_key", maintain_order=True).agg(pl.all().first(), pl.len().alias("_n")).select(
        "run_key",
        pl.format("{}{}: {} {} fails {}{}", "input_table",
                  pl.when(pl.col("row_key").is_not_null()).then(" row " + pl.col("row_key")).otherwise(pl.lit("")),
                  "input_column", pl.col("value").fill_null("null"), "failed_check",
                  pl.when(pl.col("_n") > 1).then(pl.format(" (and {} more in input_faults)", pl.col("_n") - 1)).otherwise(pl.lit("")),
                  ).alias("_fault_detail"),
    )
    return runs.join(first, on="run_key", how="left", maintain_order="left").with_columns(
        pl.when(pl.col("block_reason").str.starts_with("INVALID_")).then(pl.coalesce("block_detail", "_fault_detail"))
        .otherwise(pl.col("block_detail")).alias("block_detail")
    ).drop("_fault_detail")


def flag_row_faults(portfolios: pl.DataFrame, faults: pl.DataFrame) -> pl.DataFrame:
    """input_fault (the table's block reason) for the portfolios that own a failed row;
    the first table in ``PORTFOLIO_ROWS`` order wins, and an input_fault already set stays."""
    if not faults.height:
        return portfolios
    reason = pl.lit(None, dtype=pl.String)
    for table, (key, _, fault) in reversed(PORTFOLIO_ROWS.items()):
        owned = pl.col(key).is_in(faults.filter(pl.col("input_table") == table)["key"].implode())
        reason = pl.when(owned).then(pl.lit(fault.value)).otherwise(reason)
    return portfolios.with_columns(pl.coalesce("input_fault", reason).alias("input_fault"))


def _flag_broken_references(portfolios: pl.DataFrame, reference: dict[str, pl.DataFrame], held: pl.Series) -> pl.DataFrame:
    """input_fault UNKNOWN_* for a model, shelf or market snapshot that has no rows, or a
    holdings snapshot with no row in ``held`` (the snapshot ids of the portfolios'
    positions and cash), that the ``snapshots`` table does not declare (a typo would
    otherwise run the portfolio against nothing: an empty model liquidates every holding,
    an empty portfolio runs READY at a total value of 0)."""
    declared = reference["snapshots"]

    def known(kind: str, *ids: pl.Series) -> pl.Series:
        return pl.concat([*ids, declared.filter(pl.col("kind") == kind)["snapshot_id"]]).unique().implode()

    models = known("MODEL", reference["models"]["model_id"])
    shelves = known("SHELF", reference["shelf"]["shelf_id"])
    markets = known("MARKET", reference["prices"]["market_snapshot_id"], reference["fx_rates"]["market_snapshot_id"])
    holdings = known("PORTFOLIO", held)
    return portfolios.with_columns(
        pl.coalesce(
            pl.col("input_fault"),
            pl.when(~pl.col("model_id").is_in(models)).then(pl.lit("UNKNOWN_MODEL")),
            pl.when(~pl.col("shelf_id").is_in(shelves)).then(pl.lit("UNKNOWN_SHELF")),
            pl.when(~pl.col("market_snapshot_id").is_in(markets)).then(pl.lit("UNKNOWN_MARKET_SNAPSHOT")),
            pl.when(~pl.col("portfolio_snapshot_id").is_in(holdings)).then(pl.lit("UNKNOWN_PORTFOLIO_SNAPSHOT")),
        ).alias("input_fault")
    )


def write_book(tables: dict[str, pl.DataFrame], out_dir: str | Path) -> Path:
    """Write ``<table>.parquet`` files atomically and durably (a temp dir forced to disk
    and renamed into place: ``publish_dir``)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for table, frame in tables.items():
            if frame is None or (frame.height == 0 and table in OPTIONAL_TABLES):
                continue
            frame.drop("seq", strict=False).write_parquet(tmp / f"{table}.parquet")
        publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` (old one removed after). Where
    Linux can swap the two in one step, a reader, a signal or a kill sees the old ``dst``
    or the new one, never neither; elsewhere it is two renames."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if _exchange(src, dst):
        remove_tree(src)  # now the old dst
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    os.replace(src, dst)
    remove_tree(old)


def publish_dir(src: Path, dst: Path) -> None:
    """``replace_dir`` made durable: ``src`` is forced to disk before the rename, and the
    folder holding ``dst`` after it, so that a power cut or an operating-system crash at
    any point leaves the old ``dst`` or the whole new one, never names over unwritten bytes."""
    sync_tree(src)
    replace_dir(src, dst)
    sync_path(dst.parent)


def sync_tree(root: Path) -> None:
    """Force every file and folder under ``root`` to disk (fsync), deepest first and
    ``root`` last, so that a rename of ``root`` made after it cannot outlast, in a power
    cut or an operating-system crash, the bytes and names it stands for."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in sorted(files):
            sync_path(Path(folder) / name)
        sync_path(Path(folder))


# a file system that cannot sync a folder says so with one of these: its files still are
_FOLDER_SYNC_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


def sync_path(path: Path) -> None:
    """fsync one file, or one folder (its entries: a rename into it) where the file
    system and the operating system can."""
    folder = path.is_dir()
    if folder and os.name != "posix":  # a folder opens as a file on POSIX only
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno in _FOLDER_SYNC_UNSUPPORTED):
            raise
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False
    where the system or the file system cannot, and the caller renames twice."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a full disk's write names no file: name the one being written
        tmp.unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
