"""Tax-aware sell limiting (spec §6.10): HIFO lots under a run-wide realised-gains budget.

The budget is consumed in trace order across instruments, lot by lot, so the walk is
sequential inside a run; it iterates over the lot's *step* inside its run, each step one
columnar pass over every run that still has lots to walk. The arithmetic is the
reference's 28-significant-digit decimal (``dpm_vec.dec28``), because the quantities it
produces when the budget binds are fractional and must agree to the last digit.
"""

from __future__ import annotations

import polars as pl

from dpm_vec import dec28 as f
from dpm_vec.numeric import DEC, QTY, lit
from dpm_vec.stages import dq
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.targets import WARNINGS_SCHEMA, warnings_frame

TAX_ORDER = 300
EVENT_SCHEMA = {
    "run": pl.UInt32, "instrument_id": pl.String, "trace_order": pl.Int64,
    "requested_quantity": QTY, "allowed_quantity": QTY,
}
TOTALS_SCHEMA = {"run": pl.UInt32, "realized_gain": DEC, "realized_loss": DEC, "gains_budget_used": DEC}
STATE = ("used", "gains", "losses", "remaining", "allowed")


def limit_sells_by_tax_lots(market: Market, t: pl.DataFrame, lots: pl.DataFrame, runs: pl.DataFrame):
    """Return (t with ``quantity``, constraint events, per-run realised totals, warnings,
    fx_missing findings for lot costs that cannot be converted)."""
    eligible = pl.col("enable_tax_awareness") & (pl.col("side") == "SELL") & (pl.col("requested_quantity") > 0)
    sells = t.filter(eligible).select(
        "run", "instrument_id", "trace_order", "requested_quantity", "price", "price_currency", "base_currency",
        "max_realized_capital_gains",
    )
    lot_rows = sells.join(lots.rename({"quantity": "lot_quantity"}), on=["run", "instrument_id"], how="inner")
    if lot_rows.height == 0:
        return (
            t.with_columns(pl.col("requested_quantity").alias("quantity"), pl.lit(None, dtype=f.F28).alias("quantity_f28")),
            pl.DataFrame(schema=EVENT_SCHEMA),
            pl.DataFrame(schema=TOTALS_SCHEMA),
            pl.DataFrame(schema=WARNINGS_SCHEMA),
            dq.empty(),
        )
    lot_rows = market.with_rate_f28(lot_rows, "cost_currency", "price_currency", "cost_rate_f")
    lot_rows = market.with_rate_f28(lot_rows, "price_currency", "base_currency", "rate_f")
    first_missing = (
        lot_rows.filter(pl.col("cost_rate_f").is_null()).sort("lot_seq")
        .group_by("run", "instrument_id", maintain_order=True).first()
    )
    fx_missing = dq.findings(
        first_missing, pl.lit(True), "fx_missing", pl.col("cost_currency") + "/" + pl.col("price_currency"),
        dq.TRANSLATION, pl.col("trace_order") * 2 + 1,
    )
    walk = lot_rows.join(first_missing.select("run", "instrument_id"), on=["run", "instrument_id"], how="anti")
    for src, out in (("unit_cost", "unit_cost_f"), ("price", "price_f"), ("lot_quantity", "lot_f"),
                     ("requested_quantity", "requested_f"), ("max_realized_capital_gains", "budget_f")):
        walk = f.from_dec(walk.with_columns(pl.col(src).fill_null(lit(0)).alias("_src")), "_src", out).drop("_src")
    walk = f.mul(walk, "unit_cost_f", "cost_rate_f", "_converted")
    walk = walk.with_columns(
        pl.when(pl.col("cost_currency") == pl.col("price_currency")).then(pl.col("unit_cost_f")).otherwise(pl.col("_converted")).alias("cost_f")
    ).with_columns(f.to_dec("cost_f").alias("_cost_sort"))
    walk = f.sub(walk, "price_f", "cost_f", "_spread")
    walk = f.mul(walk, "_spread", "rate_f", "gain_f")
    walk = walk.sort(
        ["run", "trace_order", "_cost_sort", "purchase_date", "lot_id"], descending=[False, False, True, True, True]
    ).with_columns(
        pl.int_range(pl.len()).over("run").alias("step"),
        (pl.int_range(pl.len()).over("run", "instrument_id") == 0).alias("first_lot"),
        pl.col("max_realized_capital_gains").is_not_null().alias("has_budget"),
    )
    state = walk.select("run").unique().select("run", *[f.zero().alias(name) for name in STATE], pl.lit(True).alias("stopped"))
    takes = []
    for step in range(int(walk["step"].max()) + 1):
        s = walk.filter(pl.col("step") == step).join(state, on="run")
        s = s.with_columns(
            pl.when(pl.col("first_lot")).then(pl.col("requested_f")).otherwise(pl.col("remaining")).alias("remaining"),
            pl.when(pl.col("first_lot")).then(f.zero()).otherwise(pl.col("allowed")).alias("allowed"),
            pl.when(pl.col("first_lot")).then(pl.lit(False)).otherwise(pl.col("stopped")).alias("stopped"),
        )
        s = f.sub(s, "remaining", "lot_f", "_rem_minus_lot")
        s = s.with_columns(
            (~pl.col("stopped") & (f.sign("remaining") > 0) & (f.sign("lot_f") > 0)).alias("_active"),
            pl.when(f.sign("_rem_minus_lot") <= 0).then(pl.col("remaining")).otherwise(pl.col("lot_f")).alias("_share"),
        )
        s = f.sub(s, "budget_f", "used", "_headroom")
        s = f.div(s, "_headroom", "gain_f", "_budget_take")
        s = f.sub(s, "_share", "_budget_take", "_share_minus_budget")
        limited = pl.col("has_budget") & (f.sign("gain_f") > 0)
        s = s.with_columns(
            pl.when(limited & (f.sign("_headroom") > 0))
            .then(pl.when(f.sign("_share_minus_budget") <= 0).then(pl.col("_share")).otherwise(pl.col("_budget_take")))
            .when(limited).then(f.zero())
            .otherwise(pl.col("_share")).alias("_take"),
        )
        s = s.with_columns((pl.col("_active") & (f.sign("_take") > 0)).alias("_taking"))
        s = f.mul(s, "gain_f", "_take", "_realised")
        s = f.add(s, "gains", "_realised", "_gains_next")
        s = f.add(s, "used", "_realised", "_used_next")
        s = f.sub(s, "losses", "_realised", "_losses_next")
        s = f.add(s, "allowed", "_take", "_allowed_next")
        s = f.sub(s, "remaining", "_take", "_remaining_next")
        s = f.sub(s, "_take", "_share", "_take_minus_share")
        gain = pl.col("_taking") & (f.sign("_realised") >= 0)
        loss = pl.col("_taking") & (f.sign("_realised") < 0)
        s = s.with_columns(
            pl.when(gain).then(pl.col("_gains_next")).otherwise(pl.col("gains")).alias("gains"),
            pl.when(gain).then(pl.col("_used_next")).otherwise(pl.col("used")).alias("used"),
            pl.when(loss).then(pl.col("_losses_next")).otherwise(pl.col("losses")).alias("losses"),
            pl.when(pl.col("_taking")).then(pl.col("_allowed_next")).otherwise(pl.col("allowed")).alias("allowed"),
            pl.when(pl.col("_taking")).then(pl.col("_remaining_next")).otherwise(pl.col("remaining")).alias("remaining"),
            (
                pl.col("stopped")
                | (f.sign("remaining") <= 0)
                | (pl.col("_active") & ~pl.col("_taking"))
                | (pl.col("_taking") & (f.sign("_take_minus_share") < 0))
            ).alias("stopped"),
        )
        takes.append(s.select("run", "instrument_id", "allowed"))
        state = pl.concat([
            state.join(s.select("run"), on="run", how="anti"),
            s.select("run", *STATE, "stopped"),
        ])
    allowed = (
        pl.concat(takes).group_by("run", "instrument_id", maintain_order=True).last()
        .select("run", "instrument_id", f.to_d28("allowed").cast(QTY).alias("_allowed"), pl.col("allowed").alias("quantity_f28"))
    )
    # quantity_f28 keeps every digit of the walked quantity (it can be far below 1e-20)
    t = t.join(allowed, on=["run", "instrument_id"], how="left").with_columns(
        pl.when(pl.col("_allowed").is_not_null()).then(pl.col("_allowed")).otherwise(pl.col("requested_quantity")).alias("quantity")
    ).drop("_allowed")
    events = (
        t.filter(pl.col("quantity") < pl.col("requested_quantity"))
        .select("run", "instrument_id", "trace_order", "requested_quantity", pl.col("quantity").alias("allowed_quantity"))
        .sort("run", "trace_order")
    )
    totals = state.select(
        "run", f.to_dec("gains").alias("realized_gain"), f.to_dec("losses").alias("realized_loss"),
        f.to_dec("used").alias("gains_budget_used"),
    )
    warnings = warnings_frame(events.select("run").unique(), pl.lit("TAX_BUDGET_LIMIT_REACHED"), pl.lit(TAX_ORDER))
    return t, events, totals, warnings, fx_missing
