"""Settlement-aware cash ladder (spec §6.15): projected balance per currency and day."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from dpm_vec.numeric import DEC, lit
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.targets import WARNINGS_SCHEMA, warnings_frame

SETTLEMENT_ORDER = 500_000_000


@dataclass(frozen=True)
class Ladder:
    points: pl.DataFrame  # run, date_offset, currency, projected_balance
    breaches: pl.DataFrame  # run, date_offset, currency, projected_balance, allowed_floor, reason_code
    first_breach: pl.DataFrame  # run, projected_balance, allowed_floor, reason_code
    warnings: pl.DataFrame


def cash_ladder(market: Market, runs: pl.DataFrame, intents: pl.DataFrame, cash_input: pl.DataFrame, overdrafts: pl.DataFrame) -> Ladder:
    """Ladder of every run with ``enable_settlement_awareness``; other runs get none."""
    on = runs.filter(pl.col("enable_settlement_awareness")).select("run", "settlement_horizon_days", "fx_settlement_days")
    intents = intents.filter(pl.col("run").is_in(on["run"].implode()))
    sec = intents.filter(pl.col("intent_type") == "SECURITY_TRADE")
    sec = market.with_shelf(sec.select("run", "instrument_id", "side", "notional", "notional_currency"), ("settlement_days",))
    sec = sec.with_columns(pl.col("settlement_days").fill_null(2).cast(pl.Int32))
    horizon = on.join(sec.group_by("run").agg(pl.col("settlement_days").max().alias("_max_sd")), on="run", how="left").select(
        "run", "fx_settlement_days",
        pl.max_horizontal("settlement_horizon_days", "fx_settlement_days", pl.col("_max_sd").fill_null(0)).alias("horizon"),
    )
    fx = intents.filter(pl.col("intent_type") == "FX_SPOT").join(horizon, on="run", how="inner")
    flows = pl.concat([
        cash_input.join(on.select("run"), on="run", how="semi").select(
            "run", pl.lit(0, dtype=pl.Int32).alias("day"), "currency", pl.coalesce("settled", "amount").alias("flow")),
        sec.select("run", pl.col("settlement_days").alias("day"), pl.col("notional_currency").alias("currency"),
                   pl.when(pl.col("side") == "SELL").then(pl.col("notional")).otherwise(-pl.col("notional")).alias("flow")),
        fx.select("run", pl.col("fx_settlement_days").cast(pl.Int32).alias("day"), pl.col("sell_currency").alias("currency"),
                  (-pl.col("sell_amount_estimated")).alias("flow")),
        fx.select("run", pl.col("fx_settlement_days").cast(pl.Int32).alias("day"), pl.col("buy_currency").alias("currency"),
                  pl.col("buy_amount").alias("flow")),
    ])
    currencies = flows.select("run", "currency").unique()
    grid = (
        currencies.join(horizon.select("run", "horizon"), on="run")
        .with_columns(pl.int_ranges(0, pl.col("horizon") + 1).alias("date_offset"))
        .explode("date_offset")
        .with_columns(pl.col("date_offset").cast(pl.Int32))
    )
    daily = flows.group_by("run", "currency", "day").agg(pl.col("flow").sum())
    points = (
        grid.join(daily, left_on=["run", "currency", "date_offset"], right_on=["run", "currency", "day"], how="left")
        .with_columns(pl.col("flow").fill_null(lit(0)))
        .sort("run", "currency", "date_offset")
        .with_columns(pl.col("flow").cum_sum().over("run", "currency").alias("projected_balance"))
        .join(overdrafts.select("run", "currency", "max_overdraft"), on=["run", "currency"], how="left")
        .with_columns((-pl.col("max_overdraft").fill_null(lit(0))).alias("allowed_floor"))
    )
    utilised = points.filter((pl.col("projected_balance") < 0) & (pl.col("max_overdraft").fill_null(lit(0)) > 0)).select("run").unique()
    breaches = points.filter(pl.col("projected_balance") < pl.col("allowed_floor")).select(
        "run", "date_offset", "currency", "projected_balance", "allowed_floor",
        (pl.lit("OVERDRAFT_ON_T_PLUS_") + pl.col("date_offset").cast(pl.String)).alias("reason_code"),
    ).with_columns(pl.int_range(pl.len()).over("run").cast(pl.Int64).alias("breach_order"))
    first = breaches.group_by("run", maintain_order=True).first().select("run", "projected_balance", "allowed_floor", "reason_code")
    warnings = pl.concat([
        pl.DataFrame(schema=WARNINGS_SCHEMA),
        warnings_frame(utilised, pl.lit("SETTLEMENT_OVERDRAFT_UTILIZED"), pl.lit(SETTLEMENT_ORDER)),
        warnings_frame(first, pl.col("reason_code"), pl.lit(SETTLEMENT_ORDER + 1)),
    ])
    return Ladder(
        points=points.select("run", "date_offset", "currency", pl.col("projected_balance").cast(DEC)),
        breaches=breaches,
        first_breach=first,
        warnings=warnings,
    )
