"""FX funding and sweep (spec §6.13), dependencies and execution order (§6.14).

Cash is projected per currency from the input balances and the surviving security
intents; every foreign shortfall is funded from base with a buffer (FUNDING) and every
foreign surplus swept into base (SWEEP), or under the RFC's ``fx_sweep_threshold`` only a
surplus worth more than the threshold in base. Buys then depend on their funding FX and on the
last sell in their currency (under the RFC's ``rfc_fx_dependencies`` on their funding FX
alone), and the list is ordered sells, FX, buys.
"""

from __future__ import annotations

import polars as pl

from dpm_vec import dec28 as f28
from dpm_vec.dec28 import F28
from dpm_vec.frames import position_in_run, rows_where, sort_rows
from dpm_vec.numeric import DEC, HAIR, QTY, as_f64, dabs, lit, name_sums_beyond_range, naming_overflows, units_text
from dpm_vec.stages import dq
from dpm_vec.stages.cash28 import DUST, exact_notionals, long_digit_runs, projected_balances, wide_at_edge
from dpm_vec.stages.prepare import Market

INTENT_COLUMNS = {
    "run": pl.UInt32, "exec_order": pl.Int64, "intent_id": pl.String, "intent_type": pl.String,
    "instrument_id": pl.String, "side": pl.String, "quantity": QTY, "quantity_f28": F28,
    "quantity_sig": F28,  # of a notional-sized quantity below 0.1 unit: its 28 significant digits (trades.py)
    "notional": DEC,
    "notional_currency": pl.String, "notional_base": DEC, "base_currency": pl.String,
    "dependencies": pl.List(pl.String), "rationale_code": pl.String,
    "min_notional_applied": pl.Boolean, "tax_budget_applied": pl.Boolean,
    "pair": pl.String, "buy_currency": pl.String, "buy_amount": DEC,
    "sell_currency": pl.String, "sell_amount_estimated": DEC,
    "slot": pl.UInt32,  # of security intents: the holding slot the after-state applies them to
    "list_order": pl.Int64,  # of security intents: their order in the list FX planning sums (§6.13; the ladder redoes that sum)
}


def plan_fx(market: Market, runs: pl.DataFrame, security: pl.DataFrame, cash_input: pl.DataFrame):
    """Return (all intents in execution order, fx_missing findings)."""
    policy = runs.select("run", "base_currency", "fx_buffer_pct", "fx_sweep_threshold")
    flows = security.select(
        "run", pl.col("price_currency").alias("currency"),
        pl.when(pl.col("side") == "SELL").then(pl.col("notional")).otherwise(-pl.col("notional")).alias("flow"),
        (pl.lit(1 << 40, dtype=pl.Int64) + pl.col("list_order")).alias("ccy_order"),
    )
    opening = cash_input.select("run", "currency", pl.col("amount").alias("flow"), pl.col("cash_seq").cast(pl.Int64).alias("ccy_order"))
    # a trade sized at a tiny rate, in units of a currency, can take a run's flows past DEC
    name_sums_beyond_range("flow", [opening, flows], runs,
                           "the sum of the portfolio's absolute cash flows (its opening cash and trades, in their currencies)")
    projected = (
        pl.concat([opening, flows]).group_by("run", "currency")
        .agg(pl.col("flow").sum().alias("balance"), pl.col("ccy_order").min())
        .join(policy, on="run", how="left")
        .filter(pl.col("currency") != pl.col("base_currency"))
        .sort("run", "ccy_order")  # the order a range error names them in
    )
    projected = market.with_rate(projected, "currency", "base_currency", "rate")
    fx_missing = dq.findings(
        projected, pl.col("rate").is_null(), "fx_missing", pl.col("currency") + "/" + pl.col("base_currency"),
        dq.FX, pl.col("ccy_order"),
    )
    # a balance's base value, and a funding buy with its buffer, and that at the rate
    estimate = (as_f64("balance").abs() * (1 + as_f64("fx_buffer_pct").fill_null(0.0))
                * pl.max_horizontal(as_f64("rate"), pl.lit(1.0)))
    what = pl.format("the FX spot of a {} balance of {} in {} at {} {}/{}", "currency", units_text("balance"), "base_currency",
                     units_text("rate"), "currency", "base_currency")
    projected = naming_overflows(
        lambda: _kept_surpluses(market, _exact_signs(market, runs, security, cash_input, projected)).drop("_exact_balance_f"),
        projected, runs, estimate, what)
    fx = naming_overflows(lambda: _spot_intents(projected, security), projected, runs, estimate, what)
    sec = security.with_columns(
        _security_intent_ids(security.get_column("intent_no")),
        pl.when(pl.col("side") == "SELL").then(pl.lit(1, dtype=pl.Int8)).otherwise(pl.lit(3, dtype=pl.Int8)).alias("_group"),
        pl.col("list_order").alias("_within"),
    )
    funding_ids = fx.filter(pl.col("rationale_code") == "FUNDING").select(
        "run", pl.col("buy_currency").alias("price_currency"), pl.col("intent_id").alias("_fx_dep")
    )
    last_sell = (
        sec.select("run", "price_currency", "side", "list_order", "intent_id").filter(pl.col("side") == "SELL")
        .group_by("run", "price_currency").agg(pl.col("intent_id").get(pl.col("list_order").arg_max()).alias("_sell_dep"))
    )
    fx_only = runs.filter("rfc_fx_dependencies").select("run")  # RFC Step 5: "dependent on the generated FX Buys" only
    if fx_only.height:
        last_sell = last_sell.join(fx_only, on="run", how="anti")
    # a BUY depends on its currency's funding FX, then on that currency's last SELL: the
    # list is the same for every BUY of a (run, currency), so it is built once per pair
    buy_deps = (
        rows_where(sec, pl.col("side") == "BUY", "run", "price_currency").unique()
        .join(funding_ids, on=["run", "price_currency"], how="left")
        .join(last_sell, on=["run", "price_currency"], how="left")
        .select(
            "run", "price_currency",
            pl.concat_list(
                pl.when(pl.col("_fx_dep").is_not_null()).then(pl.concat_list("_fx_dep")).otherwise(pl.lit([], dtype=pl.List(pl.String))),
                pl.when(pl.col("_sell_dep").is_not_null()).then(pl.concat_list("_sell_dep")).otherwise(pl.lit([], dtype=pl.List(pl.String))),
            ).alias("dependencies"),
        )
    )
    sec = sec.select(
        "run", "_group", "_within", "intent_id", pl.lit("SECURITY_TRADE").alias("intent_type"), "instrument_id", "side", "quantity",
        "quantity_f28", *(["quantity_sig"] if "quantity_sig" in sec.columns else []), "notional", "price_currency", "notional_base",
        "base_currency", "rationale_code", "min_notional_applied", "tax_budget_applied", "slot", "list_order",
    )
    # in execution order first, and the lists joined on after: a list column costs far more
    # to move in a sort than the join's gather of it
    intents = sort_rows(pl.concat([sec, fx], how="diagonal_relaxed"), "run", "_group", "_within")
    intents = intents.join(buy_deps, on=["run", "price_currency"], how="left", maintain_order="left").with_columns(
        pl.when(pl.col("side") == "BUY").then(pl.col("dependencies")).otherwise(pl.lit([], dtype=pl.List(pl.String))).alias("dependencies"),
        pl.col("price_currency").alias("notional_currency"),
        position_in_run().alias("exec_order"),
    )
    if "quantity_sig" not in intents.columns:  # carried only by a shard that has one
        intents = intents.with_columns(pl.lit(None, dtype=F28).alias("quantity_sig"))
    return intents.select([pl.col(c).cast(t) for c, t in INTENT_COLUMNS.items()]), fx_missing


def _spot_intents(projected: pl.DataFrame, security: pl.DataFrame) -> pl.DataFrame:
    """The FX spot intents of the ``projected`` balances that trade: a FUNDING buy of a
    short currency (its deficit and buffer), a SWEEP of a surplus back to base."""
    funding = pl.col("_sign") < 0
    buy_amount = dabs(pl.col("balance")) * (lit(1) + pl.col("fx_buffer_pct"))
    return (
        projected.filter(pl.col("rate").is_not_null() & (pl.col("_sign") != 0) & ~pl.col("_kept"))
        .pipe(sort_rows, "run", "ccy_order")
        .join(security.group_by("run").agg(pl.len().alias("_n_sec")), on="run", how="left")
        .with_columns(
            (pl.col("_n_sec").fill_null(0) + pl.int_range(1, pl.len() + 1).over("run")).cast(pl.Int64).alias("_k"),
            pl.when(funding).then(buy_amount).otherwise(pl.col("balance") * pl.col("rate")).alias("buy_amount"),
        )
        .with_columns(
            pl.when(funding).then(pl.col("buy_amount") * pl.col("rate")).otherwise(pl.col("balance")).alias("sell_amount_estimated"),
        )
        .select(
            "run", pl.lit(2, dtype=pl.Int8).alias("_group"), pl.col("_k").alias("_within"),
            (pl.lit("oi_fx_") + pl.col("_k").cast(pl.String)).alias("intent_id"),
            pl.lit("FX_SPOT").alias("intent_type"),
            (pl.col("currency") + "/" + pl.col("base_currency")).alias("pair"),
            pl.when(funding).then(pl.col("currency")).otherwise(pl.col("base_currency")).alias("buy_currency"),
            "buy_amount",
            pl.when(funding).then(pl.col("base_currency")).otherwise(pl.col("currency")).alias("sell_currency"),
            "sell_amount_estimated",
            pl.when(funding).then(pl.lit("FUNDING")).otherwise(pl.lit("SWEEP")).alias("rationale_code"),
            "base_currency",
        )
    )


def _security_intent_ids(intent_no: pl.Series) -> pl.Series:
    """"oi_" and each security intent's number (§6.14), gathered from a table of the ids up
    to the largest number: building the text row by row costs ~10x more (18 ms for a
    shard's 430,000 intents)."""
    top = int(intent_no.max() or 0)
    return pl.Series("intent_id", [f"oi_{k}" for k in range(top + 1)], dtype=pl.String).gather(intent_no)


def _kept_surpluses(market: Market, projected: pl.DataFrame) -> pl.DataFrame:
    """``projected`` with ``_kept``: a surplus that RFC Step 5's ``fx_sweep_threshold``
    leaves in its currency, its base value (balance × rate, the SWEEP's buy amount) at or
    below the threshold. A value within a hair of the threshold is decided in the
    reference's 28 digits: over an inexact rate (an inverse quote's 1 / 1.3) the fixed
    point's product can land a unit of the 20th decimal on the other side, and a tax-limited
    sell's dust balance (``_exact_balance_f``) is above a threshold of 0 where its
    20-decimal balance is 0."""
    value = pl.col("balance") * pl.col("rate")
    limited = (pl.col("_sign") > 0) & pl.col("fx_sweep_threshold").is_not_null() & pl.col("rate").is_not_null()
    projected = projected.with_columns((limited & (value <= pl.col("fx_sweep_threshold"))).alias("_kept"))
    tie = limited & ((value - pl.col("fx_sweep_threshold")).abs() < lit(HAIR))
    if not projected.select(tie.any()).item():  # the usual case: no threshold, or none within a hair
        return projected
    projected = projected.with_row_index("_row")
    near = projected.filter(tie)
    near = f28.from_dec(f28.from_dec(market.with_rate_f28(near, "currency", "base_currency", "_rate_f"), "balance", "_balance_f"),
                        "fx_sweep_threshold", "_threshold_f").with_columns(f28.coalesce("_exact_balance_f", "_balance_f").alias("_balance_f"))
    near = f28.sub(f28.mul(near, "_balance_f", "_rate_f", "_value_f"), "_value_f", "_threshold_f", "_over_f")
    exact = near.select("_row", (f28.sign("_over_f") <= 0).alias("_kept_exact"))
    return projected.join(exact, on="_row", how="left", maintain_order="left").with_columns(
        pl.coalesce("_kept_exact", "_kept").alias("_kept")).drop("_row", "_kept_exact")


def _exact_signs(market: Market, runs: pl.DataFrame, security: pl.DataFrame, cash_input: pl.DataFrame,
                 projected: pl.DataFrame) -> pl.DataFrame:
    """``projected`` with ``_sign``, the sign of each balance that decides FUNDING, SWEEP or
    no FX: the balance's own, or, in runs with a tax-limited sell or a cash balance past 20
    decimals (``cash28.long_cash``) whose balance lies within dust of 0, and for a balance
    whose sum spans more than 28 digits within its margin (``cash28.wide_at_edge``), the
    sign of the reference's 28-digit sum (``cash28``): a sell of a few 1E-28 units leaves a
    dust balance the reference sweeps where the 20-decimal notional is 0.
    There the 28-digit balance itself is kept too (``_exact_balance_f``, null elsewhere)."""
    sign = pl.when(pl.col("balance") > 0).then(1).when(pl.col("balance") < 0).then(-1).otherwise(0).cast(pl.Int8)
    near = projected.filter(pl.col("balance").abs() < lit(DUST)).select("run").unique()
    wide, _ = wide_at_edge(projected, cash_input, security.select("run", pl.col("price_currency").alias("notional_currency"), "notional"), "balance")
    chosen = pl.concat([long_digit_runs(security, cash_input).join(near, on="run", how="semi"), wide.select("run")]).unique()
    if chosen.height == 0:
        return projected.with_columns(sign.alias("_sign"), pl.lit(None, dtype=F28).alias("_exact_balance_f"))
    sec = exact_notionals(market, chosen, security.select(
        "run", "instrument_id", "side", "notional", pl.col("price_currency").alias("notional_currency"), "quantity_f28", "list_order",
    ))
    exact = projected_balances(sec, cash_input.join(chosen, on="run", how="semi")).select(
        "run", "currency", f28.sign("_balance_f").cast(pl.Int8).alias("_exact_sign"), pl.col("_balance_f").alias("_exact_balance_f"),
    )
    return projected.join(exact, on=["run", "currency"], how="left", maintain_order="left").with_columns(
        pl.coalesce("_exact_sign", sign).alias("_sign"),
    ).drop("_exact_sign")
