"""Data-quality findings: one row per occurrence (duplicates are meaningful, §6.8)."""

from __future__ import annotations

import polars as pl

DQ_SCHEMA = {"run": pl.UInt32, "bucket": pl.String, "item": pl.String, "stage": pl.Int32, "seq": pl.Int64}

# stage numbers order the findings the way the reference appends them
VALUATION_BEFORE, UNIVERSE, TRANSLATION, FX, VALUATION_AFTER = 10, 20, 30, 40, 50


def findings(frame: pl.DataFrame, when: pl.Expr, bucket: str, item: pl.Expr, stage: int, seq: pl.Expr) -> pl.DataFrame:
    """Rows of ``frame`` where ``when`` holds, as data-quality findings."""
    return frame.filter(when).select(
        pl.col("run"),
        pl.lit(bucket).alias("bucket"),
        item.cast(pl.String).alias("item"),
        pl.lit(stage, dtype=pl.Int32).alias("stage"),
        seq.cast(pl.Int64).alias("seq"),
    )


def empty() -> pl.DataFrame:
    return pl.DataFrame(schema=DQ_SCHEMA)


def concat(*frames: pl.DataFrame) -> pl.DataFrame:
    return pl.concat([empty(), *frames], how="vertical")


def excuse_prices(findings: pl.DataFrame, excluded: pl.DataFrame) -> pl.DataFrame:
    """``findings`` without the price_missing rows of the instruments ``excluded`` (run,
    instrument_id) lists: RFC Step 2's EXCLUDE takes an unpriced instrument out of the
    universe instead of blocking the run on it."""
    if excluded.height == 0:
        return findings
    return findings.join(
        excluded.select("run", pl.col("instrument_id").alias("item"), pl.lit("price_missing").alias("bucket")),
        on=["run", "bucket", "item"], how="anti",
    )


# how a DATA_QUALITY detail names each bucket's items, in this order
_MISSING = {"price_missing": "no price for", "fx_missing": "no FX rate for", "shelf_missing": "no shelf entry for"}


def blocking_counts(dq: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """Per run: the DATA_QUALITY rule's count (§6.17) and the list lengths.

    ``runs`` needs run, block_on_missing_prices, block_on_missing_fx.
    """
    counts = dq.group_by("run").agg(
        (pl.col("bucket") == "price_missing").sum().alias("n_price_missing"),
        (pl.col("bucket") == "fx_missing").sum().alias("n_fx_missing"),
        (pl.col("bucket") == "shelf_missing").sum().alias("n_shelf_missing"),
    )
    out = runs.select("run", "block_on_missing_prices", "block_on_missing_fx").join(counts, on="run", how="left")
    out = out.with_columns(pl.col("n_price_missing", "n_fx_missing", "n_shelf_missing").fill_null(0).cast(pl.Int64))
    return out.with_columns(
        (
            pl.when(pl.col("block_on_missing_prices")).then(pl.col("n_price_missing")).otherwise(0)
            + pl.when(pl.col("block_on_missing_fx")).then(pl.col("n_fx_missing")).otherwise(0)
            + pl.col("n_shelf_missing")
        ).alias("dq_count")
    ).select("run", "n_price_missing", "n_fx_missing", "n_shelf_missing", "dq_count")


def missing_detail(dq: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """(run, dq_detail): the items the DATA_QUALITY count counts, named (``missing data: no
    price for A, B; no FX rate for JPY/USD``), each once, in the order they were found;
    ``runs`` as for ``blocking_counts``."""
    blocking = (
        (pl.col("bucket") == "shelf_missing")
        | ((pl.col("bucket") == "price_missing") & pl.col("block_on_missing_prices"))
        | ((pl.col("bucket") == "fx_missing") & pl.col("block_on_missing_fx"))
    )
    rank = pl.col("bucket").replace_strict(list(_MISSING), list(range(len(_MISSING))), return_dtype=pl.Int8)
    parts = (
        dq.join(runs.select("run", "block_on_missing_prices", "block_on_missing_fx"), on="run").filter(blocking)
        .sort("run", rank, "stage", "seq")
        .group_by("run", "bucket", maintain_order=True).agg(pl.col("item").unique(maintain_order=True).str.join(", "))
    )
    return parts.group_by("run", maintain_order=True).agg(
        (pl.col("bucket").replace_strict(_MISSING, return_dtype=pl.String) + " " + pl.col("item")).str.join("; ").alias("dq_detail")
    ).select("run", ("missing data: " + pl.col("dq_detail")).alias("dq_detail"))
