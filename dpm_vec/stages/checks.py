"""Input checks dpm_vec adds to the reference (spec §9.1 and RFC-0001 Step 1-2).

* NEGATIVE_QUANTITY — a held quantity below zero (the reference accepts it);
* NON_POSITIVE_PRICE — a zero price for a held or model instrument (the reference
  crashes with a division error);
* SNAPSHOT_SKEW — portfolio and market ``as_of`` further apart than ``max_skew_minutes``;
* BASE_CURRENCY_FX_MISSING — with ``require_base_currency_fx``, no FX rate of the run's
  market data has the base currency on either side (RFC Step 1);
* PRICE_STALE — a price older than ``max_staleness_minutes`` (block, or with
  ``stale_price_action = EXCLUDE`` the instrument is excluded instead).

The skew and staleness checks only run when the timestamps are given.
"""

from __future__ import annotations

import polars as pl

from dpm_vec.codes import InputFault
from dpm_vec.stages.prepare import Market

FAULT_SCHEMA = {"run": pl.UInt32, "fault_code": pl.String, "fault_detail": pl.String}
_ISO = "%Y-%m-%dT%H:%M:%S%.fZ"


def _named(ids: pl.Expr) -> pl.Expr:
    """The instrument ids of a run's faulty rows, in row order, each once: "A, B"."""
    return ids.unique(maintain_order=True).str.join(", ")


def input_faults(market: Market, runs: pl.DataFrame, positions: pl.DataFrame, model: pl.DataFrame):
    """Return (faults: run → first fault_code with its fault_detail, a sentence naming what
    failed, excluded: run, instrument_id, reason — the instruments RFC Step 2's check takes
    out of the universe under stale_price_action EXCLUDE: PRICE_STALE for a price older than
    the limit, PRICE_MISSING for none). Of the book reader's faults (``input_fault``), an
    UNKNOWN_* one's detail is written here; an INVALID_* one's names a value only the sweep's
    reader has (``io.with_fault_details``)."""
    instruments = pl.concat([positions.select("run", "instrument_id"), model.select("run", "instrument_id")])
    # a non-positive price faults the run whichever row names it: no need to de-duplicate,
    # and only instruments quoted at or below zero need a look-up; staleness is per run
    # and instrument, but only runs with a staleness limit check it, and only runs that
    # exclude (stale_price_action EXCLUDE) look for missing prices
    bad_ids = market.prices.filter(pl.col("price") <= 0)["instrument_id"].implode()
    non_positive = market.with_price(instruments.filter(pl.col("instrument_id").is_in(bad_ids))).filter(
        pl.col("price").is_not_null() & (pl.col("price") <= 0)
    )
    watched = runs.filter(pl.col("max_staleness_minutes").is_not_null() | (pl.col("stale_price_action") == "EXCLUDE"))
    priced = market.with_price(instruments.filter(pl.col("run").is_in(watched["run"].implode())).unique()).join(
        watched.select("run", "portfolio_as_of", "market_as_of", "max_staleness_minutes", "stale_price_action"), on="run", how="left"
    )
    reference_time = pl.coalesce("market_as_of", "portfolio_as_of")
    is_stale = (
        pl.col("max_staleness_minutes").is_not_null() & pl.col("price_as_of").is_not_null() & reference_time.is_not_null()
        & ((reference_time - pl.col("price_as_of")) > pl.duration(minutes=pl.col("max_staleness_minutes")))
    )
    priced = priced.with_columns(is_stale.alias("_stale"))
    skew = runs.filter(
        pl.col("max_skew_minutes").is_not_null() & pl.col("portfolio_as_of").is_not_null() & pl.col("market_as_of").is_not_null()
        & ((pl.col("portfolio_as_of") - pl.col("market_as_of")).abs() > pl.duration(minutes=pl.col("max_skew_minutes")))
    )
    stale = priced.filter(pl.col("_stale") & (pl.col("stale_price_action") == "BLOCK"))
    faults = pl.concat([
        pl.DataFrame(schema=FAULT_SCHEMA),
        runs.filter(pl.col("input_fault").is_not_null()).select("run", pl.col("input_fault").alias("fault_code"), _reader_fault_detail()),
        _per_run(positions.filter(pl.col("quantity") < 0), InputFault.NEGATIVE_QUANTITY,
                 pl.format("held quantity below zero: {}", _named(pl.col("instrument_id")))),
        _per_run(non_positive, InputFault.NON_POSITIVE_PRICE, pl.format("price at or below zero: {}", _named(pl.col("instrument_id")))),
        skew.select("run", pl.lit(InputFault.SNAPSHOT_SKEW.value).alias("fault_code"), pl.format(
            "portfolio as_of {} and market as_of {} are {} minutes apart, more than max_skew_minutes {}",
            pl.col("portfolio_as_of").dt.to_string(_ISO), pl.col("market_as_of").dt.to_string(_ISO),
            _minutes((pl.col("portfolio_as_of") - pl.col("market_as_of")).abs()), "max_skew_minutes",
        ).alias("fault_detail")),
        _without_base_currency_fx(market, runs).select(
            "run", pl.lit(InputFault.BASE_CURRENCY_FX_MISSING.value).alias("fault_code"),
            pl.format("no FX rate of the market data quotes the base currency {}", "base_currency").alias("fault_detail")),
        _per_run(stale.sort("run", "price_as_of", "instrument_id"), InputFault.PRICE_STALE, pl.format(
            "prices more than {} minutes (max_staleness_minutes) older than {}: {}", pl.col("max_staleness_minutes").first(),
            reference_time.first().dt.to_string(_ISO), _named(pl.col("instrument_id")))),
    ]).unique("run", keep="first", maintain_order=True)
    excluded = priced.filter((pl.col("stale_price_action") == "EXCLUDE") & (pl.col("_stale") | pl.col("price").is_null())).select(
        "run", "instrument_id", pl.when(pl.col("_stale")).then(pl.lit("PRICE_STALE")).otherwise(pl.lit("PRICE_MISSING")).alias("reason"),
    )
    return faults, excluded


def _minutes(duration: pl.Expr) -> pl.Expr:
    """A duration in minutes as text: 20 when whole, else to two decimals (15.5)."""
    seconds = duration.dt.total_seconds()
    return pl.when(seconds % 60 == 0).then((seconds // 60).cast(pl.String)).otherwise((seconds / 60).round(2).cast(pl.String))


# what the book reader found for UNKNOWN_*: the snapshot id and the tables without its rows;
# an INVALID_* run's detail names its first failed value (the sweep's input_faults)
_UNKNOWN = {
    InputFault.UNKNOWN_MODEL: ("model_id", "no rows in models"),
    InputFault.UNKNOWN_SHELF: ("shelf_id", "no rows in shelf"),
    InputFault.UNKNOWN_MARKET_SNAPSHOT: ("market_snapshot_id", "no prices or FX rates"),
    InputFault.UNKNOWN_PORTFOLIO_SNAPSHOT: ("portfolio_snapshot_id", "no positions or cash rows"),
}


def _reader_fault_detail() -> pl.Expr:
    detail = pl.lit(None, dtype=pl.String)
    for code, (column, missing) in _UNKNOWN.items():
        detail = pl.when(pl.col("input_fault") == code.value).then(
            pl.format(f"{column} {{}} has {missing}, and snapshots does not declare it", column)).otherwise(detail)
    return detail.alias("fault_detail")


def _per_run(rows: pl.DataFrame, code: InputFault, detail: pl.Expr) -> pl.DataFrame:
    """(run, fault_code, fault_detail) for each run of the faulty ``rows``, in first-row order;
    ``detail`` aggregates a run's rows."""
    return rows.group_by("run", maintain_order=True).agg(detail.alias("fault_detail")).select(
        "run", pl.lit(code.value).alias("fault_code"), "fault_detail")


def _without_base_currency_fx(market: Market, runs: pl.DataFrame) -> pl.DataFrame:
    """(run, base_currency) of the runs that require it (RFC Step 1: "Verify BaseCurrency exists in
    Market Data FX rates") whose market data quotes no pair with the base currency on
    either side."""
    checked = runs.filter(pl.col("require_base_currency_fx")).select("run", "base_currency")
    if checked.height == 0:
        return checked
    legs = pl.concat([
        market.fx.select("market_snapshot_id", pl.col(side).alias("base_currency")) for side in ("fx_from", "fx_to")
    ]).unique()
    return (
        market.run_keys.join(checked.select("run"), on="run", how="semi")
        .join(legs, on=["market_snapshot_id", "base_currency"], how="anti")
        .select("run", "base_currency")
    )
