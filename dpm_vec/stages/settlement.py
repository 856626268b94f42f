"""Settlement-aware cash ladder (spec §6.15): projected balance per currency and day."""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl

from dpm_vec import dec28 as f28
from dpm_vec.numeric import DEC, lit
from dpm_vec.stages.cash28 import DUST, account_sums, exact_flows, fx_margins, inexact_fx_runs, long_digit_runs, movements, wide_at_edge
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.targets import WARNINGS_SCHEMA, warnings_frame

SETTLEMENT_ORDER = 500_000_000


@dataclass(frozen=True)
class Ladder:
    points: pl.DataFrame  # run, date_offset, currency, projected_balance
    breaches: pl.DataFrame  # run, date_offset, currency, projected_balance, allowed_floor, reason_code
    first_breach: pl.DataFrame  # run, currency, date_offset, projected_balance, allowed_floor, reason_code
    warnings: pl.DataFrame


def cash_ladder(market: Market, runs: pl.DataFrame, intents: pl.DataFrame, cash_input: pl.DataFrame, overdrafts: pl.DataFrame) -> Ladder:
    """Ladder of every run with ``enable_settlement_awareness``; other runs get none."""
    on = runs.filter(pl.col("enable_settlement_awareness")).select("run", "settlement_horizon_days", "fx_settlement_days")
    intents = intents.filter(pl.col("run").is_in(on["run"].implode()))
    sec = intents.filter(pl.col("intent_type") == "SECURITY_TRADE")
    sec = market.with_shelf(
        sec.select("run", "intent_id", "instrument_id", "side", "notional", "notional_currency", "quantity_f28", "list_order"),
        ("settlement_days",),
    )
    sec = sec.with_columns(pl.col("settlement_days").fill_null(2).cast(pl.Int32))
    horizon = on.join(sec.group_by("run").agg(pl.col("settlement_days").max().alias("_max_sd")), on="run", how="left").select(
        "run", "fx_settlement_days",
        pl.max_horizontal("settlement_horizon_days", "fx_settlement_days", pl.col("_max_sd").fill_null(0)).alias("horizon"),
    )
    fx = intents.filter(pl.col("intent_type") == "FX_SPOT").join(horizon, on="run", how="inner")
    # ``_touch``: the flow moves its balance in the reference's arithmetic. A cash row does
    # when it is not 0; an intent always does, even one whose amount is 0 at 20 decimals (a
    # tax-limited sell of a few 1E-27 units, and the FX sweep of its proceeds)
    intent = pl.lit(True).alias("_touch")
    flows = pl.concat([
        cash_input.join(on.select("run"), on="run", how="semi").select(
            "run", pl.lit(0, dtype=pl.Int32).alias("day"), "currency", pl.coalesce("settled", "amount").alias("flow"),
        ).with_columns((pl.col("flow") != 0).alias("_touch")),
        sec.select("run", pl.col("settlement_days").alias("day"), pl.col("notional_currency").alias("currency"),
                   pl.when(pl.col("side") == "SELL").then(pl.col("notional")).otherwise(-pl.col("notional")).alias("flow"), intent),
        fx.select("run", pl.col("fx_settlement_days").cast(pl.Int32).alias("day"), pl.col("sell_currency").alias("currency"),
                  (-pl.col("sell_amount_estimated")).alias("flow"), intent),
        fx.select("run", pl.col("fx_settlement_days").cast(pl.Int32).alias("day"), pl.col("buy_currency").alias("currency"),
                  pl.col("buy_amount").alias("flow"), intent),
    ])
    currencies = flows.select("run", "currency").unique()
    grid = (
        currencies.join(horizon.select("run", "horizon"), on="run")
        .with_columns(pl.int_ranges(0, pl.col("horizon") + 1).alias("date_offset"))
        .explode("date_offset")
        .with_columns(pl.col("date_offset").cast(pl.Int32))
    )
    daily = flows.group_by("run", "currency", "day").agg(pl.col("flow").sum(), pl.col("_touch").any())
    points = (
        grid.join(daily, left_on=["run", "currency", "date_offset"], right_on=["run", "currency", "day"], how="left")
        .with_columns(pl.col("flow").fill_null(lit(0)), pl.col("_touch").fill_null(False))
        .sort("run", "currency", "date_offset")
        .with_columns(pl.col("flow").cum_sum().over("run", "currency").alias("projected_balance"))
        .join(overdrafts.select("run", "currency", "max_overdraft"), on=["run", "currency"], how="left", maintain_order="left")
        .with_columns((-pl.col("max_overdraft").fill_null(lit(0))).alias("allowed_floor"))
    )
    # where a tax-limited sell's 28-digit notional or an FX amount over an inexact rate takes
    # part and a balance sits at 0 or at its floor to within far less than a cent, the signs
    # of the reference's balances decide
    moved = pl.col("_touch").cum_max().over("run", "currency")  # a balance nothing has touched yet is 0 in any arithmetic
    # a base-currency balance takes FX amounts over possibly inexact rates: a wider margin (cash28.fx_margins)
    margin = points.join(runs.select("run", "base_currency"), on="run", how="left", maintain_order="left").join(
        fx_margins(intents), on="run", how="left", maintain_order="left",
    ).select(
        pl.when(pl.col("currency") == pl.col("base_currency")).then(pl.col("_margin")).otherwise(None).fill_null(lit(DUST)).alias("_margin"),
    ).to_series()
    at_edge = points.with_columns(margin).filter(
        moved & ((pl.col("projected_balance").abs() <= pl.col("_margin"))
                 | ((pl.col("projected_balance") - pl.col("allowed_floor")).abs() <= pl.col("_margin")))
    ).select("run", "currency").unique()
    # a sum of more than 28 digits (cash28.wide_sums) can sit farther from 0 or the floor, by its own margin
    wide, _ = wide_at_edge(points.filter(moved).with_columns((pl.col("projected_balance") - pl.col("allowed_floor")).alias("_over_floor")),
                           cash_input, intents, "projected_balance", "_over_floor")
    at_edge = pl.concat([at_edge, wide]).unique()
    keys = ["run", "currency", "date_offset"]
    exact = _exact_balances(market, runs, at_edge, horizon, intents, sec, cash_input, wide.select("run"))
    if exact.height:
        exact = f28.from_dec(exact.join(points.select(*keys, "allowed_floor"), on=keys, how="inner"), "allowed_floor", "_floor_f")
        exact = f28.sub(exact, "_balance_f", "_floor_f", "_margin_f").select(
            *keys, (f28.sign("_balance_f") < 0).alias("_negative"), (f28.sign("_margin_f") < 0).alias("_below_floor"),
        )
        points = points.join(exact, on=keys, how="left", maintain_order="left")
    else:
        points = points.with_columns(pl.lit(None, dtype=pl.Boolean).alias("_negative"), pl.lit(None, dtype=pl.Boolean).alias("_below_floor"))
    points = points.with_columns(
        pl.coalesce("_negative", pl.col("projected_balance") < 0).alias("_negative"),
        pl.coalesce("_below_floor", pl.col("projected_balance") < pl.col("allowed_floor")).alias("_below_floor"),
    )
    utilised = points.filter(pl.col("_negative") & (pl.col("max_overdraft").fill_null(lit(0)) > 0)).select("run").unique()
    breaches = points.filter("_below_floor").select(
        "run", "date_offset", "currency", "projected_balance", "allowed_floor",
        (pl.lit("OVERDRAFT_ON_T_PLUS_") + pl.col("date_offset").cast(pl.String)).alias("reason_code"),
    ).with_columns(pl.int_range(pl.len()).over("run").cast(pl.Int64).alias("breach_order"))
    first = breaches.group_by("run", maintain_order=True).first().select("run", "currency", "date_offset", "projected_balance", "allowed_floor", "reason_code")
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


def _exact_balances(market: Market, runs: pl.DataFrame, at_edge: pl.DataFrame, horizon: pl.DataFrame, intents: pl.DataFrame,
                    sec: pl.DataFrame, cash_input: pl.DataFrame, wide: pl.DataFrame) -> pl.DataFrame:
    """(run, currency, date_offset, _balance_f): the ladder's balances as the reference
    computes them, for the runs of ``at_edge`` (run, currency: a balance within dust of 0
    or of its floor) with a tax-limited sell or a cash balance past 20 decimals
    (``cash28.long_cash``), for the ``wide`` runs (run: a sum of more than 28 digits within
    its margin, ``cash28.wide_sums``), or with an FX intent over an inexact rate
    (``cash28.inexact_fx_runs``) and a base-currency balance at the edge: each day's flows
    (cash, then the intents in intent-id text order, §6.15) and the running balances are
    redone in F28 over the 28-digit notionals and FX amounts."""
    schema = {"run": pl.UInt32, "currency": pl.String, "date_offset": pl.Int32, "_balance_f": f28.F28}
    # an inexact rate moves only the base currency's balances; a tax-limited notional or a
    # fed-back balance, its own currency's and the base's
    long_digits = long_digit_runs(sec, cash_input).join(at_edge, on="run", how="semi")
    base_edge = at_edge.join(runs.select("run", pl.col("base_currency").alias("currency")), on=["run", "currency"], how="semi")
    inexact = inexact_fx_runs(market, intents.join(base_edge.select("run").unique(), on="run", how="semi"))
    chosen = pl.concat([long_digits, inexact, wide]).unique().join(runs.select("run", "fx_buffer_pct"), on="run", how="inner").join(
        horizon, on="run", how="inner"
    )
    if chosen.height == 0:
        return pl.DataFrame(schema=schema)
    flows = exact_flows(market, chosen, intents, sec, cash_input)
    # §6.15: each day's flows, cash first, then the intents in intent-id text order (an FX: its sell, then its buy)
    order = pl.concat([flows.security.select("run", "intent_id"), flows.fx.select("run", "intent_id")]).with_columns(
        pl.col("intent_id").rank("ordinal").over("run").cast(pl.Int64).alias("_text")
    )
    flows = replace(
        flows,
        security=flows.security.join(order, on=["run", "intent_id"]),
        fx=flows.fx.join(horizon.select("run", "fx_settlement_days"), on="run", how="inner").join(order, on=["run", "intent_id"]),
    )
    cells = account_sums(
        movements(flows, pl.lit(1 << 40) + 2 * pl.col("_text"), settled=True,
                  sec_day=pl.col("settlement_days"), fx_day=pl.col("fx_settlement_days")),
        "_cell_f", "day",
    )
    # the running balance: each day's cell added in turn, one rounding each (a day without flows adds 0)
    accounts = cells.select("run", "currency").unique().sort("run", "currency")
    days = range(int(chosen["horizon"].max()) + 1)
    grid = accounts.join(pl.DataFrame({"day": pl.Series(list(days), dtype=pl.Int32)}), how="cross").join(
        cells.select("run", "currency", "day", "_cell_f"), on=["run", "currency", "day"], how="left"
    ).with_columns(f28.fill_null("_cell_f", f28.zero())).sort("day", "run", "currency")
    value = f28.parts(grid, "_cell_f")
    running, balances = f28.zeros(accounts.height), []
    for day in days:
        running = f28.add_parts(running, value.slice(day * accounts.height, accounts.height))
        balances.append(accounts.with_columns(pl.lit(day, dtype=pl.Int32).alias("date_offset")).hstack([f28.struct("_balance_f", running)]))
    return pl.concat(balances).select("run", "currency", "date_offset", "_balance_f")

