"""Tax-aware sell limiting (spec §6.10): HIFO lots under a run-wide realised-gains budget.

The budget is consumed in trace order across instruments, lot by lot, so the walk is
sequential inside a run; it iterates over the lot's *step* inside its run, each step one
columnar pass over every run that still has lots to walk. The arithmetic is the
reference's 28-significant-digit decimal (``dpm_vec.dec28``), because the quantities it
produces when the budget binds are fractional and must agree to the last digit.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from dpm_vec import dec28 as f
from dpm_vec.frames import join_on_index, rows_where, sort_rows
from dpm_vec.numeric import DEC, QTY, TRADE_UNITS_LIMIT, as_f64, lit, name_sums_beyond_range, naming_overflows, quantity_range_error, units_text
from dpm_vec.stages import dq
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.targets import WARNINGS_SCHEMA, warnings_frame

TAX_ORDER = 300_000_000
EVENT_SCHEMA = {
    "run": pl.UInt32, "instrument_id": pl.String, "trace_order": pl.Int64,
    # a requested quantity beyond QTY's range is in requested_units_beyond_range instead
    "requested_quantity": QTY, "requested_units_beyond_range": DEC, "allowed_quantity": QTY, "quantity_f28": f.F28,
    "requested_sig": f.F28,  # a notional-sized request below 0.1 unit: its 28 significant digits
}
_STOP_DTYPES = (pl.UInt32, pl.Int64, pl.Boolean, pl.Boolean, f.D28, pl.Int32)
TOTALS_SCHEMA = {"run": pl.UInt32, "realized_gain": DEC, "realized_loss": DEC, "gains_budget_used": DEC}


def limit_sells_by_tax_lots(market: Market, t: pl.DataFrame, lots: pl.DataFrame, runs: pl.DataFrame):
    """Return (t with ``quantity``, constraint events, per-run realised totals, warnings,
    fx_missing findings for lot costs that cannot be converted). A sell requested beyond
    QTY's range (``_units_beyond_range``, requested_quantity null) that the walk sizes
    gets its allowed quantity; one the walk leaves alone keeps a null quantity."""
    beyond = pl.col("_units_beyond_range").is_not_null()
    eligible = pl.col("enable_tax_awareness") & (pl.col("side") == "SELL") & ((pl.col("requested_quantity") > 0) | beyond)
    sells = rows_where(
        t, eligible,
        "run", "instrument_id", "trace_order", "price", "price_currency", "base_currency", "max_realized_capital_gains", "slot",
        # the walk gives each lot min(what the sell still needs, the lot): a request of the
        # range's limit needs every lot, as the larger one does, while the lots stay below it
        pl.when(beyond).then(pl.lit(TRADE_UNITS_LIMIT, dtype=QTY)).otherwise(pl.col("requested_quantity")).alias("requested_quantity"),
        pl.col("_units_beyond_range"),
        *(["_units_sig"] if "_units_sig" in t.columns else []),
    )
    lot_rows = sells.join(lots.rename({"quantity": "lot_quantity"}), on=["run", "instrument_id"], how="inner")
    _check_lots_below_the_range(lot_rows, runs)
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
        lot_rows.filter(f.is_null("cost_rate_f")).sort("lot_seq")
        .group_by("run", "instrument_id", maintain_order=True).first()
    )
    fx_missing = dq.findings(
        first_missing, pl.lit(True), "fx_missing", pl.col("cost_currency") + "/" + pl.col("price_currency"),
        dq.TRANSLATION, pl.col("trace_order") * 2 + 1,
    )
    walk = lot_rows.join(first_missing.select("run", "instrument_id"), on=["run", "instrument_id"], how="anti")
    for src, out in (("unit_cost", "unit_cost_f"), ("price", "price_f"), ("max_realized_capital_gains", "budget_f")):
        walk = f.from_dec(walk.with_columns(pl.col(src).fill_null(lit(0)).alias("_src")), "_src", out).drop("_src")
    walk = f.mul(walk, "unit_cost_f", "cost_rate_f", "_converted")
    walk = walk.with_columns(
        pl.when(pl.col("cost_currency") == pl.col("price_currency")).then(pl.col("unit_cost_f")).otherwise(pl.col("_converted")).alias("cost_f")
    )
    walk = naming_overflows(lambda: walk.with_columns(f.to_dec("cost_f").alias("_cost_sort")), walk, runs, f.to_f64("cost_f"),
                            pl.format("the unit cost of lot {} of {} in {}", "lot_id", "instrument_id", "price_currency"))
    walk = f.sub(walk, "price_f", "cost_f", "_spread")
    walk = f.mul(walk, "_spread", "rate_f", "gain_f")
    walk = walk.sort(
        ["run", "trace_order", "_cost_sort", "purchase_date", "lot_id"], descending=[False, False, True, True, True]
    ).with_columns(
        pl.int_range(pl.len()).over("run").alias("step"),
        (pl.int_range(pl.len()).over("run", "instrument_id") == 0).alias("first_lot"),
        pl.col("max_realized_capital_gains").is_not_null().alias("has_budget"),
    )
    free, bound = _split_unbound(walk, runs)
    free_allowed, free_totals = _take_all(free)
    walk_allowed, walk_totals = _walk_budget(bound)
    allowed = pl.concat([free_allowed, walk_allowed], how="vertical_relaxed")
    # quantity_f28 keeps every digit of a budget-limited quantity (it can be far below 1e-20);
    # each sell is one slot of t, so its allowed quantity attaches by index
    t = join_on_index(t, allowed, "slot").with_columns(
        pl.when(pl.col("_allowed").is_not_null()).then(pl.col("_allowed")).otherwise(pl.col("requested_quantity")).alias("quantity")
    ).drop("_allowed")
    events = (
        t.filter(limited_by_the_walk())
        .select("run", "instrument_id", "trace_order", "requested_quantity", pl.col("_units_beyond_range").alias("requested_units_beyond_range"),
                pl.col("quantity").alias("allowed_quantity"), pl.col("quantity_f28"),
                pl.col("_units_sig").alias("requested_sig") if "_units_sig" in t.columns else pl.lit(None, dtype=f.F28).alias("requested_sig"))
        .pipe(sort_rows, "run", "trace_order")
    )
    totals = pl.concat([free_totals, walk_totals])
    warnings = warnings_frame(events.select("run").unique(), pl.lit("TAX_BUDGET_LIMIT_REACHED"), pl.lit(TAX_ORDER))
    return t, events, totals, warnings, fx_missing


def _check_lots_below_the_range(lot_rows: pl.DataFrame, runs: pl.DataFrame) -> None:
    """Raise QuantityRangeError for a sell requested beyond QTY's range whose lots hold
    ``TRADE_UNITS_LIMIT`` units or more (the walk could allow it that many), naming each
    such portfolio by run key (``runs``: run, run_key) as ``within_quantity_range`` does."""
    if lot_rows["_units_beyond_range"].null_count() == lot_rows.height:
        return
    held = (
        lot_rows.filter(pl.col("_units_beyond_range").is_not_null() & (pl.col("lot_quantity") > 0))
        .group_by("run", "instrument_id", maintain_order=True)
        .agg(pl.col("lot_quantity").cast(DEC).sum().alias("_lots"), pl.col("_units_beyond_range").first(), pl.col("trace_order").first())
        .filter(pl.col("_lots") >= TRADE_UNITS_LIMIT)
        .sort("run", "trace_order")
    )
    if held.height:
        raise quantity_range_error(held.with_columns(pl.lit("SELL").alias("side")), runs, "_units_beyond_range",
                                   pl.format(", and so are the {} units of its tax lots", units_text("_lots")))


def limited_by_the_walk() -> pl.Expr:
    """§6.10 step 4: the walk allowed a sell less than requested (always, for a request
    beyond QTY's range that the walk sized); null where a quantity is unknown."""
    return (pl.col("quantity") < pl.col("requested_quantity")) | (pl.col("quantity").is_not_null() & pl.col("_units_beyond_range").is_not_null())


def _split_unbound(walk: pl.DataFrame, runs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Runs whose budget cannot bind (none set, or every full HIFO take realises less)
    need no sequential walk: each lot simply gives what the sell still needs. A gain, or
    a run's gains together, beyond DEC's range names its portfolio (ValueRangeError)."""
    walk = walk.with_columns(
        pl.when(pl.col("lot_quantity") > 0).then(pl.col("lot_quantity")).otherwise(pl.lit(0, dtype=QTY)).alias("_positive_lot")
    ).with_columns(
        (pl.col("_positive_lot").cum_sum().over("run", "instrument_id") - pl.col("_positive_lot")).alias("_before"),
    ).with_columns(
        pl.min_horizontal(pl.max_horizontal(pl.col("requested_quantity") - pl.col("_before"), pl.lit(0, dtype=QTY)), pl.col("_positive_lot"))
        .cast(QTY).alias("_share"),
    )
    walk = naming_overflows(lambda: walk.with_columns(f.to_dec("gain_f").alias("_gain")), walk, runs, f.to_f64("gain_f"),
                            pl.format("the gain a unit of {} from lot {} realises in {}", "instrument_id", "lot_id", "base_currency"))
    walk = naming_overflows(lambda: walk.with_columns((pl.col("_gain") * pl.col("_share").cast(DEC)).alias("_realised")), walk, runs,
                            as_f64("_gain") * as_f64("_share"), _GAIN_TEXT)
    # the run sums below, and the walks' totals
    name_sums_beyond_range("_realised", [walk], runs, "the sum of the portfolio's realised gains and losses in base currency")
    gains = walk.group_by("run").agg(
        pl.col("_realised").filter(pl.col("_realised") > 0).sum().alias("_gains"),
        pl.col("max_realized_capital_gains").first().alias("_budget"),
    )
    # a margin far above DEC's rounding keeps every run that might bind on the exact walk
    bound_runs = gains.filter(pl.col("_budget").is_not_null() & (pl.col("_gains") >= pl.col("_budget") - lit("0.000001"))).select("run")
    return walk.join(bound_runs, on="run", how="anti"), walk.join(bound_runs, on="run", how="semi")


_GAIN_TEXT = pl.format("the gain of selling {} units of {} from lot {} ({} {} a unit)", units_text("_share"), "instrument_id", "lot_id",
                       units_text("_gain"), "base_currency")


def _exact_small_shares(walk: pl.DataFrame) -> pl.DataFrame:
    """``walk`` with the shares of a notional-sized sell below 0.1 unit taken from its 28
    significant digits (``_units_sig``; ``requested_quantity`` has only 28 decimals), as
    the reference's walk takes min(remaining, lot) in that arithmetic: the gain such a
    share realises consumes the budget a later sell is limited by."""
    rows = walk.select(pl.arg_where(~f.is_null("_units_sig"))).to_series()
    if rows.len() == 0:
        return walk
    small = f.from_dec(f.from_dec(walk[rows].select("_units_sig", "_before", "_positive_lot"), "_before", "_before_f"),
                       "_positive_lot", "_lot_f")
    small = f.sub(f.sub(small, "_units_sig", "_before_f", "_remaining_f"), "_remaining_f", "_lot_f", "_beyond_lot_f")
    share = (
        pl.when(f.sign("_remaining_f") <= 0).then(f.zero())
        .when(f.sign("_beyond_lot_f") >= 0).then(pl.col("_lot_f"))
        .otherwise(pl.col("_remaining_f"))
    )
    return f.scatter(walk, "share_f", rows, small.select(share).to_series())


def _take_all(walk: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    # a sell is one slot: (run, instrument_id)
    allowed = walk.group_by("slot").agg(pl.col("_share").sum().cast(QTY).alias("_allowed")).with_columns(
        pl.lit(None, dtype=f.F28).alias("quantity_f28")
    )
    totals = walk.group_by("run").agg(
        pl.col("_realised").filter(pl.col("_realised") > 0).sum().alias("realized_gain"),
        (-pl.col("_realised").filter(pl.col("_realised") < 0)).sum().alias("realized_loss"),
    ).with_columns(pl.col("realized_gain").alias("gains_budget_used"))
    return allowed, totals.select([pl.col(c).cast(t) for c, t in TOTALS_SCHEMA.items()])


def _walk_budget(walk: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The reference's lot-by-lot walk (§6.10 step 3) in 28-digit arithmetic, for runs
    whose gains budget binds.

    Until a sell stops, every lot gives its whole share (``_share``, computed up front),
    so only the lots that can consume budget — positive gain, non-zero share — need the
    sequential pass over ``used``; lots at a loss or at zero gain just follow whether an
    earlier lot of their instrument stopped it. Step g takes the g-th consuming lot of
    every run that has one, as Series operations on a few hundred values (``dec28.Parts``):
    the walk's cost is its number of steps, so each must be cheap."""
    if walk.height == 0:
        return (
            pl.DataFrame(schema={"slot": pl.UInt32, "_allowed": QTY, "quantity_f28": f.F28}),
            pl.DataFrame(schema=TOTALS_SCHEMA),
        )
    walk = f.from_dec(walk, "_share", "share_f")
    if "_units_sig" in walk.columns:
        walk = _exact_small_shares(walk)
    walk = f.mul(walk, "gain_f", "share_f", "full_realised_f")
    consuming = pl.col("has_budget") & (f.sign("gain_f") > 0) & (pl.col("_share") > 0)
    # each run is a lane, the runs with the most budget-consuming lots first: the runs still
    # walking at step g are then lanes 0..n_g-1, so a step's state is a prefix, not a join
    gain_rows = walk.filter(consuming).select(
        "run", "trace_order", "step", "gain_f", "budget_f", "share_f", "full_realised_f",
        pl.int_range(pl.len()).over("run").alias("gstep"),
    )
    lanes = gain_rows.group_by("run").len().sort(["len", "run"], descending=[True, False]).with_row_index("lane")
    gain_rows = gain_rows.join(lanes.select("run", "lane"), on="run").sort("gstep", "lane")
    walking = gain_rows.group_by("gstep").len().sort("gstep")["len"].to_list()
    gain, budget, share, full = (f.parts(gain_rows, c) for c in ("gain_f", "budget_f", "share_f", "full_realised_f"))
    trace, runs, steps = gain_rows["trace_order"], gain_rows["run"], gain_rows["step"]
    used = f.zeros(lanes.height)
    stopped = pl.Series(np.full(lanes.height, -1, dtype=np.int64))
    finished: list[f.Parts] = []  # the used budget of lanes that leave the walk, last leavers first
    stops: list[tuple[pl.Series, ...]] = []  # run, step, _reduced, _refused, take z, take k of each stop
    at = 0
    for n in walking:
        finished.insert(0, used.slice(n))
        used, stopped = used.slice(0, n), stopped.slice(0, n)
        g_trace, g_gain, g_share = trace.slice(at, n), gain.slice(at, n), share.slice(at, n)
        headroom = f.sub_parts(budget.slice(at, n), used)
        take = f.div_parts(headroom, g_gain)
        active = g_trace != stopped
        exhausted = headroom.z <= 0
        share_above = (g_share.k > take.k) | ((g_share.k == take.k) & (g_share.z > take.z))
        reduced, refused = active & ~exhausted & share_above, active & exhausted
        realised = f.where(reduced, f.mul_parts(g_gain, take), f.where(refused | ~active, f.zeros(n), full.slice(at, n)))
        used = f.add_parts(used, realised)
        stop = reduced | refused
        stopped = stopped.zip_with(~stop, g_trace)
        stops.append(tuple(column.filter(stop) for column in (runs.slice(at, n), steps.slice(at, n), reduced, refused, *take)))
        at += n
    finished.insert(0, used)
    state = pl.DataFrame([lanes["run"], f.struct("used", f.Parts.concat(finished))])
    # bound runs with no lot that consumes budget (budget 0, every lot at a loss) use none
    idle = walk.select("run").unique().join(state, on="run", how="anti").select("run", f.zero().alias("used"))
    state = pl.concat([state, idle]).sort("run")
    stops = pl.DataFrame(
        [pl.concat([stop[i] for stop in stops]) if stops else pl.Series(dtype=t) for i, t in enumerate(_STOP_DTYPES)],
        schema=["run", "step", "_reduced", "_refused", "z", "k"],
    ).select("run", "step", "_reduced", "_refused", pl.struct("z", "k").alias("_budget_take"))
    walk = walk.join(stops, on=["run", "step"], how="left", maintain_order="left").with_columns(
        pl.col("_reduced").fill_null(False), pl.col("_refused").fill_null(False)
    ).with_columns(
        # a stopping lot ends its instrument: later lots of that sell give nothing
        (pl.col("_reduced") | pl.col("_refused")).cast(pl.Int32).cum_sum().over("run", "instrument_id").alias("_stops_so_far"),
    ).with_columns(
        ((pl.col("_stops_so_far") == 0) & (pl.col("_share") > 0)).alias("_full"),
    )
    per_sell = walk.group_by("slot").agg(
        pl.col("_share").filter(pl.col("_full")).sum().cast(QTY).alias("_full_sum"),
        pl.col("_budget_take").filter(pl.col("_reduced")).first().alias("_limited_take"),
    )
    per_sell = f.from_dec(per_sell, "_full_sum", "_full_f")
    per_sell = f.add(per_sell.with_columns(f.fill_null("_limited_take", f.zero())), "_full_f", "_limited_take", "quantity_f28")
    allowed = per_sell.select("slot", f.to_d28("quantity_f28").cast(QTY).alias("_allowed"), "quantity_f28")
    losses = walk.filter(pl.col("_full") & (f.sign("full_realised_f") < 0)).group_by("run").agg(
        (-f.to_dec("full_realised_f")).sum().alias("realized_loss")
    )
    # gains and budget use grow together: only gains consume the budget (§6.10)
    totals = state.join(losses, on="run", how="left").select(
        "run", f.to_dec("used").alias("realized_gain"), pl.col("realized_loss").fill_null(pl.lit(0, dtype=DEC)).cast(DEC),
        f.to_dec("used").alias("gains_budget_used"),
    )
    return allowed, totals
