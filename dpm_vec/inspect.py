"""Ad-hoc inspection of a sweep's output with DuckDB: one view per Parquet dataset."""

from __future__ import annotations

import re
from pathlib import Path

from dpm_vec.errors import DpmVecError, first_line


def connect(out_dir: str | Path):
    """An in-memory DuckDB connection with a view per dataset directory of ``out_dir``."""
    import duckdb

    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise DpmVecError(f"{out_dir}: no such folder (give a sweep's --out folder)")
    if not (out_dir / "manifest.json").exists():
        raise DpmVecError(f"{out_dir}: not a sweep output (no manifest.json)")
    con = duckdb.connect()
    for dataset in sorted(p for p in out_dir.iterdir() if p.is_dir() and any(p.glob("*.parquet"))):
        pattern = (_literal_glob(str(dataset)) + "/*.parquet").replace("'", "''")
        try:
            con.execute(f"CREATE VIEW \"{dataset.name}\" AS SELECT * FROM read_parquet('{pattern}')")
        except duckdb.Error as exc:  # a damaged or empty part file: DuckDB reads each file's footer here
            con.close()
            raise DpmVecError(f"{dataset}: cannot read dataset {dataset.name!r}: {first_line(exc)}") from None
    return con


def _literal_glob(path: str) -> str:
    """``path`` as a DuckDB glob that matches only itself: ``[``, ``*`` and ``?`` in a
    folder name (``out[1]``) would otherwise match other folders (``out1``)."""
    return re.sub(r"([\[*?])", r"[\1]", path)


def query(out_dir: str | Path, sql: str):
    """Run ``sql`` against the sweep's views; returns (column names, rows)."""
    columns, batches = query_batches(out_dir, sql)
    return columns, [row for batch in batches for row in batch]


def query_batches(out_dir: str | Path, sql: str, size: int = 50_000):
    """``query`` as (column names, an iterator of lists of at most ``size`` rows): DuckDB
    streams the result, so a sweep's 50 million intents print in bounded memory."""
    import duckdb

    if not sql.strip():
        raise DpmVecError('no SQL given: e.g. "select status, count(*) from runs group by 1"')

    con = connect(out_dir)
    try:
        cursor = con.execute(sql)
    except duckdb.Error as exc:
        views = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
        con.close()
        raise DpmVecError(f"query failed: {exc}\navailable views: {', '.join(sorted(views))}") from None

    def batches():
        try:
            while batch := cursor.fetchmany(size):
                yield batch
        except duckdb.Error as exc:  # a fault met while streaming (a damaged page, a failed cast)
            raise DpmVecError(f"query failed: {first_line(exc)}") from None
        finally:
            con.close()

    return [d[0] for d in cursor.description or ()], batches()
