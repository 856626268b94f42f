"""Tax-aware sell limiting (spec §6.10): HIFO lots under a run-wide realised-gains budget.

The budget is consumed in trace order across instruments, lot by lot, so the walk is
sequential inside a run; it iterates over the lot's *step* inside its run, each step one
columnar pass over every run that still has lots to walk.
"""

from __future__ import annotations

import polars as pl

from dpm_vec.numeric import DEC, dmin, lit
from dpm_vec.stages import dq
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.targets import WARNINGS_SCHEMA, warnings_frame

TAX_ORDER = 300
EVENT_SCHEMA = {
    "run": pl.UInt32, "instrument_id": pl.String, "trace_order": pl.Int64,
    "requested_quantity": DEC, "allowed_quantity": DEC,
}
TOTALS_SCHEMA = {"run": pl.UInt32, "realized_gain": DEC, "realized_loss": DEC, "gains_budget_used": DEC}


def limit_sells_by_tax_lots(market: Market, t: pl.DataFrame, lots: pl.DataFrame, runs: pl.DataFrame):
    """Return ``t`` with ``quantity`` (tax-limited where it applies), the constraint
    events, per-run realised totals, warnings, and fx_missing findings (folded into the
    frame's dq by the caller through ``t``'s ``_tax_dq`` attribute-free return)."""
    eligible = pl.col("enable_tax_awareness") & (pl.col("side") == "SELL") & (pl.col("requested_quantity") > 0)
    sells = t.filter(eligible).select(
        "run", "instrument_id", "trace_order", "requested_quantity", "price", "price_currency", "rate",
        "max_realized_capital_gains",
    )
    lot_rows = sells.join(lots, on=["run", "instrument_id"], how="inner")
    empty = (
        t.with_columns(pl.col("requested_quantity").alias("quantity")),
        pl.DataFrame(schema=EVENT_SCHEMA),
        pl.DataFrame(schema=TOTALS_SCHEMA),
        pl.DataFrame(schema=WARNINGS_SCHEMA),
        dq.empty(),
    )
    if lot_rows.height == 0:
        return empty
    lot_rows = market.with_rate(lot_rows, "cost_currency", "price_currency", "_cost_rate")
    lot_rows = lot_rows.with_columns(
        pl.when(pl.col("cost_currency") == pl.col("price_currency")).then(pl.col("unit_cost"))
        .otherwise(pl.col("unit_cost") * pl.col("_cost_rate")).alias("cost"),
    )
    first_missing = (
        lot_rows.filter(pl.col("_cost_rate").is_null()).sort("lot_seq")
        .group_by("run", "instrument_id", maintain_order=True).first()
    )
    fx_missing = dq.findings(
        first_missing, pl.lit(True), "fx_missing", pl.col("cost_currency") + "/" + pl.col("price_currency"),
        dq.TRANSLATION, pl.col("trace_order") * 2 + 1,
    )
    walk = lot_rows.join(first_missing.select("run", "instrument_id"), on=["run", "instrument_id"], how="anti")
    walk = walk.sort(
        ["run", "trace_order", "cost", "purchase_date", "lot_id"], descending=[False, False, True, True, True]
    ).with_columns(
        pl.int_range(pl.len()).over("run").alias("step"),
        (pl.int_range(pl.len()).over("run", "instrument_id") == 0).alias("first_lot"),
        ((pl.col("price") - pl.col("cost")) * pl.col("rate")).alias("gain_per_unit"),
    )
    state = walk.select("run").unique().with_columns(
        lit(0).alias("used"), lit(0).alias("gains"), lit(0).alias("losses"),
        lit(0).alias("remaining"), pl.lit(True).alias("stopped"),
    )
    takes = []
    budget = pl.col("max_realized_capital_gains")
    for step in range(int(walk["step"].max()) + 1):
        s = walk.filter(pl.col("step") == step).join(state, on="run")
        s = s.with_columns(
            pl.when(pl.col("first_lot")).then(pl.col("requested_quantity")).otherwise(pl.col("remaining")).alias("remaining"),
            pl.when(pl.col("first_lot")).then(pl.lit(False)).otherwise(pl.col("stopped")).alias("stopped"),
        )
        active = ~pl.col("stopped") & (pl.col("remaining") > 0) & (pl.col("quantity") > 0)
        s = s.with_columns(dmin(pl.col("remaining"), pl.col("quantity")).alias("_share"))
        g = pl.col("gain_per_unit")
        s = s.with_columns(
            pl.when(budget.is_not_null() & (g > 0))
            .then(pl.when(pl.col("used") < budget).then(dmin(pl.col("_share"), (budget - pl.col("used")) / g)).otherwise(lit(0)))
            .otherwise(pl.col("_share")).alias("_take"),
        )
        taking = active & (pl.col("_take") > 0)
        s = s.with_columns((g * pl.col("_take")).alias("_realised"))
        s = s.with_columns(
            pl.when(taking).then(pl.col("_take")).otherwise(lit(0)).alias("take"),
            pl.when(taking & (pl.col("_realised") >= 0)).then(pl.col("gains") + pl.col("_realised")).otherwise(pl.col("gains")).alias("gains"),
            pl.when(taking & (pl.col("_realised") >= 0)).then(pl.col("used") + pl.col("_realised")).otherwise(pl.col("used")).alias("used"),
            pl.when(taking & (pl.col("_realised") < 0)).then(pl.col("losses") - pl.col("_realised")).otherwise(pl.col("losses")).alias("losses"),
            pl.when(taking).then(pl.col("remaining") - pl.col("_take")).otherwise(pl.col("remaining")).alias("remaining"),
            (
                pl.col("stopped")
                | (pl.col("remaining") <= 0)
                | (active & ~taking)
                | (taking & (pl.col("_take") < pl.col("_share")))
            ).alias("stopped"),
        )
        takes.append(s.select("run", "instrument_id", "take"))
        state = pl.concat([
            state.join(s.select("run"), on="run", how="anti"),
            s.select("run", "used", "gains", "losses", "remaining", "stopped"),
        ])
    allowed = pl.concat(takes).group_by("run", "instrument_id").agg(pl.col("take").sum().alias("_allowed"))
    t = t.join(allowed, on=["run", "instrument_id"], how="left").with_columns(
        pl.when(pl.col("_allowed").is_not_null()).then(pl.col("_allowed")).otherwise(pl.col("requested_quantity")).alias("quantity")
    ).drop("_allowed")
    events = (
        t.filter(pl.col("quantity") < pl.col("requested_quantity"))
        .select("run", "instrument_id", "trace_order", "requested_quantity", pl.col("quantity").alias("allowed_quantity"))
        .sort("run", "trace_order")
    )
    totals = state.select(
        "run", pl.col("gains").alias("realized_gain"), pl.col("losses").alias("realized_loss"),
        pl.col("used").alias("gains_budget_used"),
    )
    warnings = warnings_frame(events.select("run").unique(), pl.lit("TAX_BUDGET_LIMIT_REACHED"), pl.lit(TAX_ORDER))
    return t, events, totals, warnings, fx_missing
