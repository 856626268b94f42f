"""Trade translation (spec §6.9), tax-lot limiting hook (§6.10) and the turnover cap (§6.12).

Every trace instrument with a price and an FX rate gets a delta against its current value,
floored to whole units (or, with the RFC ``notional_sizing`` option, an amount rounded to
cents for instruments the shelf trades by NOTIONAL). Dust below the threshold is
suppressed, and what survives becomes a security intent numbered in trace order.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import polars as pl

from dpm_vec import dec28 as f28
from dpm_vec.frames import join_on_index, join_runs, position_in_run, put_rows, rows_where, sort_rows
from dpm_vec.numeric import (DEC, DEC_UNIT, HAIR, QTY, SCALE, TRADE_UNITS_LIMIT, as_f64, beyond_dec_decimals, dabs, lit, naming_overflows,
                             name_sums_beyond_range, positive_or_null, quantity_range_error, scientific_text, times_price, units_text,
                             within)
from dpm_vec.stages import dq
from dpm_vec.stages.cash28 import DUST, exact_notionals
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.targets import WARNINGS_SCHEMA, Replay, replayed_weights, warnings_frame
from dpm_vec.stages.tax import limit_sells_by_tax_lots, limited_by_the_walk
from dpm_vec.stages.universe import ExactLocked, valued_in_28_digits

TURNOVER_ORDER = 400_000_000


@dataclass(frozen=True)
class Translation:
    # run, instrument_id, intent_no, side, quantity, price, price_currency, rate, notional, notional_base, ..., slot, and
    # _units_beyond_range (a trade beyond the quantity range: quantity null) until within_quantity_range
    intents: pl.DataFrame
    suppressed: pl.DataFrame  # run, instrument_id, trace_order, intended_notional, currency, threshold_amount, threshold_currency
    dq: pl.DataFrame
    warnings: pl.DataFrame
    tax_events: pl.DataFrame
    tax_totals: pl.DataFrame  # run, realized_gain, realized_loss, budget_used_raw


def translate(
    market: Market,
    runs: pl.DataFrame,
    trace: pl.DataFrame,
    positions_input: pl.DataFrame,
    lots: pl.DataFrame,
    totals: pl.DataFrame,
    exact: ExactLocked | None = None,
    valued: tuple[pl.DataFrame, pl.DataFrame] | None = None,
    replay: Replay | None = None,
    locked: pl.DataFrame | None = None,
) -> Translation:
    """Size every target's trade; ``valued`` (the before-state's valued positions and cash)
    lets a trade whose unit quotient is near an integer be sized over its run's 28-digit tv,
    and with ``replay`` over its target weight as the reference's 28-digit steps leave it."""
    policy = runs.select(
        "run", "base_currency", "min_trade_notional_amount", "min_trade_notional_currency",
        "suppress_dust_trades", "notional_sizing", "rfc_rationale_codes", "enable_tax_awareness", "max_realized_capital_gains",
        "single_position_max_weight", "valuation_mode", "delta_from_valuation",
    )
    t = market.with_price(
        join_runs(trace.select("run", "instrument_id", "trace_order", "model_weight", "final_weight", "in_model", "slot"), policy)
    )
    price_missing = dq.findings(t, pl.col("price").is_null(), "price_missing", pl.col("instrument_id"), dq.TRANSLATION, pl.col("trace_order") * 2)
    t = _drop_nulls(t, "price")
    t = market.with_rate(t, "price_currency", "base_currency", "rate")
    fx_missing = dq.findings(
        t, pl.col("rate").is_null(), "fx_missing", pl.col("price_currency") + "/" + pl.col("base_currency"),
        dq.TRANSLATION, pl.col("trace_order") * 2 + 1,
    )
    t = _drop_nulls(t, "rate")
    t = market.with_shelf(t, ("min_notional_amount", "min_notional_currency", "trade_by"))
    held = positions_input.select("slot", pl.col("quantity").alias("held_quantity"), "market_value", "market_value_currency")
    t = _market_value_for_delta(market, join_on_index(join_runs(t, totals.select("run", "total_value")), held, "slot"))
    target_estimate = as_f64("total_value") * as_f64("final_weight") / as_f64("rate")
    t = naming_overflows(lambda: t.with_columns(
        ((pl.col("total_value") * pl.col("final_weight").cast(DEC)) / pl.col("rate")).alias("target_value_instr"),
        pl.when(pl.col("_mv_for_delta").is_not_null()).then(pl.col("_mv_for_delta"))
        .when(pl.col("held_quantity").is_not_null()).then(times_price(t, "held_quantity", pl.col("price")))
        .otherwise(lit(0)).alias("current_value_instr"),
    ), t, runs, target_estimate,
        pl.format("the target value of {} in {} ({} {} × weight {} at {} {}/{})", "instrument_id", "price_currency", units_text("total_value"),
                  "base_currency", units_text("final_weight"), units_text("rate"), "price_currency", "base_currency"))
    t = t.with_columns(
        (pl.col("target_value_instr") - pl.col("current_value_instr")).alias("delta_value_instr"),
    ).with_columns(
        pl.when(pl.col("delta_value_instr") > 0).then(pl.lit("BUY")).otherwise(pl.lit("SELL")).alias("side"),
        dabs(pl.col("delta_value_instr")).alias("_abs_delta"),
        # an unshelved instrument (null trade_by) trades in units: never a null flag, which a
        # negation would carry on and a filter drop (the near-integer floor check below)
        (pl.col("notional_sizing") & pl.col("trade_by").eq_missing("NOTIONAL")).alias("by_notional"),
    )
    t = naming_overflows(
        lambda: t.with_columns((pl.col("_abs_delta") / pl.col("price")).alias("_quotient")), t, runs,
        as_f64("_abs_delta") / as_f64("price"),
        pl.format("the units of a {} of {} ({} {} at {} {} each)", "side", "instrument_id", units_text("_abs_delta"),
                  "price_currency", units_text("price"), "price_currency"))
    t = t.with_columns(pl.col("_quotient").floor().alias("_units"))  # once: an eager expression repeats its parts
    units = pl.col("_units")
    # the quotient is rounded before the floor; step back when that rounding crossed an integer
    t = t.with_columns(pl.when(units * pl.col("price") > pl.col("_abs_delta")).then(units - 1).otherwise(units).alias("_units"))
    t = _exact_near_integer_floors(market, t, exact, valued, replay, locked)
    if (t["_units"].max() or 0) < TRADE_UNITS_LIMIT:  # the usual case: nothing is that large
        t = t.with_columns(pl.col("_units").cast(QTY).alias("requested_quantity"), pl.lit(None, dtype=DEC).alias("_units_beyond_range"))
    else:
        # a trade beyond QTY's range waits for the tax, dust and turnover steps, which may
        # shrink or drop it (the reference trades the rest); notional sizing sizes its own
        beyond = pl.col("_units") >= TRADE_UNITS_LIMIT
        t = t.with_columns(
            pl.when(beyond).then(None).otherwise(pl.col("_units")).cast(QTY).alias("requested_quantity"),
            pl.when(beyond & ~pl.col("by_notional")).then(pl.col("_units")).alias("_units_beyond_range"),
        )
    t = t.with_columns(pl.lit(False).alias("_oversell"))
    t = _notional_sizing(_notional_amounts(market, t, exact, valued, replay, locked))
    t, tax_events, tax_totals, tax_warnings, tax_fx_missing = limit_sells_by_tax_lots(market, t, lots, runs)
    # still beyond QTY's range after the tax-lot walk (which sizes a sell it limits within it)
    still_beyond = pl.col("quantity").is_null() & pl.col("_units_beyond_range").is_not_null()
    # sized by its amount, and neither capped at the holding nor limited by the tax walk
    sized_whole = pl.col("by_notional") & ~pl.col("_oversell") & (pl.col("quantity") == pl.col("requested_quantity"))

    def notional(amount: pl.Expr, units_beyond_value: pl.Expr, quantity_value: pl.Expr) -> pl.Expr:
        return (pl.when(still_beyond).then(pl.when("by_notional").then(amount).otherwise(units_beyond_value))
                .when(sized_whole).then(amount).otherwise(quantity_value))

    estimate = notional(as_f64("_amount"), as_f64("_units_beyond_range") * as_f64("price"), as_f64("quantity") * as_f64("price"))
    t = naming_overflows(lambda: t.with_columns(
        notional(pl.col("_amount"), pl.col("_units_beyond_range") * pl.col("price"), times_price(t, "quantity", pl.col("price"))).alias("notional"),
    ).with_columns(
        (pl.col("notional") * pl.col("rate")).alias("notional_base"),
        pl.when(pl.col("min_trade_notional_amount").is_not_null()).then(pl.col("min_trade_notional_amount"))
        .otherwise(pl.col("min_notional_amount")).alias("threshold_amount"),
        pl.when(pl.col("min_trade_notional_amount").is_not_null()).then(pl.col("min_trade_notional_currency"))
        .otherwise(pl.col("min_notional_currency")).alias("threshold_currency"),
    ), t, runs, pl.max_horizontal(estimate.abs(), (estimate * as_f64("rate")).abs()),
        pl.format("the notional of a {} of {} (in {}, or at {} {}/{} in {})", "side", "instrument_id", "price_currency",
                  units_text("rate"), "price_currency", "base_currency", "base_currency"))
    t = _exact_dust_tests(t)
    below = pl.coalesce("_below_exact", pl.col("notional") < pl.col("threshold_amount"))
    t = t.with_columns((pl.col("suppress_dust_trades") & pl.col("threshold_amount").is_not_null() & below).alias("_suppress"))
    suppress = pl.col("_suppress")
    suppressed = rows_where(
        t, suppress, "run", "instrument_id", "trace_order", pl.col("notional").alias("intended_notional"),
        pl.col("price_currency").alias("currency"), "threshold_amount", "threshold_currency",
    )
    # numbered in trace order (FX planning then puts intents in execution order)
    kept = t.select(
        "run", "instrument_id", "trace_order", "side", "quantity", "requested_quantity", "price",
        "price_currency", "rate", "notional", "notional_base", "base_currency",
        pl.col("threshold_amount").is_not_null().alias("min_notional_applied"),
        limited_by_the_walk().fill_null(False).alias("tax_budget_applied"),
        "final_weight", "held_quantity", "by_notional", _rationale().alias("rationale_code"), "quantity_f28", "slot",
        # a notional-sized quantity the tax walk left whole: its 28 significant digits (_notional_sizing)
        *([pl.when(sized_whole).then(pl.col("_units_sig")).alias("quantity_sig")] if "_units_sig" in t.columns else []),
        pl.when(still_beyond).then(pl.col("_units_beyond_range")).alias("_units_beyond_range"),
        # a budget-limited quantity below Decimal(38, 28)'s unit is 0 there but kept by its 28-digit value
        (~suppress & ((pl.col("quantity") > 0) | (f28.sign("quantity_f28") > 0) | still_beyond)).alias("_kept"),
    ).filter("_kept").pipe(sort_rows, "run", "trace_order")
    intents = kept.select(
        "run", "instrument_id", "trace_order", (position_in_run() + 1).alias("intent_no"),
        pl.exclude("run", "instrument_id", "trace_order", "_kept"),
    )
    return Translation(
        intents=intents,
        suppressed=suppressed,
        dq=dq.concat(price_missing, fx_missing, tax_fx_missing),
        warnings=tax_warnings,
        tax_events=tax_events,
        tax_totals=tax_totals,
    )


def _exact_dust_tests(t: pl.DataFrame) -> pl.DataFrame:
    """``t`` with ``_below_exact``: for a tax-limited sell whose notional lies within a hair
    of its dust threshold, whether the reference's 28-digit notional (quantity × price, §1.1,
    §6.9 step 7) is below it; null elsewhere, where the fixed-point notional decides. The
    fixed point rounds the 28-decimal quantity to 20 decimals first (off by up to half a
    ``DEC_UNIT``), so a notional met exactly (3.333…3 units at 90.00 against 300.00) comes
    out a hair below."""
    near = (
        pl.col("suppress_dust_trades") & pl.col("threshold_amount").is_not_null()
        & ((pl.col("notional") - pl.col("threshold_amount")).abs() <= lit(DUST) + pl.col("price") * lit(DEC_UNIT))
    )
    # the tax-limited rows are few: the DEC product is taken on them alone
    limited = t.select(pl.arg_where(~f28.is_null("quantity_f28"))).to_series()
    rows = limited.filter(t[limited].select(near.fill_null(False)).to_series())
    below = pl.repeat(None, t.height, dtype=pl.Boolean, eager=True).alias("_below_exact")
    if rows.len():
        exact = f28.from_dec(t[rows].select("quantity_f28", "price", "threshold_amount"), "price", "_price_f")
        exact = f28.from_dec(f28.mul(exact, "quantity_f28", "_price_f", "_notional_f"), "threshold_amount", "_threshold_f")
        exact = f28.sub(exact, "_notional_f", "_threshold_f", "_over_f").select(f28.sign("_over_f") < 0).to_series()
        below = below.scatter(rows, exact)
    return t.with_columns(below)


def _drop_nulls(t: pl.DataFrame, column: str) -> pl.DataFrame:
    """Rows with ``column`` set (the usual case, every row, costs no copy)."""
    return t.filter(pl.col(column).is_not_null()) if t[column].null_count() else t


def _notional_sizing(t: pl.DataFrame) -> pl.DataFrame:
    """RFC notional sizing: the amount rounded to cents, in units, as the reference's
    arithmetic gives the quotient (28 significant digits, §1.1); a sell never exceeds the
    holding. Only the rows it applies to (a few runs' NOTIONAL instruments) are sized and
    written back in place: a decimal division over every trade row costs far more."""
    rows = t.select(pl.arg_where("by_notional")).to_series()
    if rows.len() == 0:
        return t
    held = pl.col("held_quantity").fill_null(pl.lit(0, dtype=QTY)).alias("_held")
    sized = f28.from_dec(f28.from_dec(t[rows].select("slot", "side", "instrument_id", "_amount", "price", held), "_amount", "_amount_f"), "price", "_price_f")
    sized = f28.div(sized, "_amount_f", "_price_f", "_units_f").with_columns(f28.to_dec("_units_f").alias("_amount_units"))
    # a quotient beyond QTY's range: a sell is capped at the holding; a buy waits with its
    # units in _units_beyond_range, as a whole-unit one does
    beyond = pl.col("_amount_units") >= TRADE_UNITS_LIMIT
    units = f28.to_d28("_units_in_range").cast(QTY)
    oversell = (pl.col("side") == "SELL") & (beyond | (units > pl.col("_held")))
    sized = sized.with_columns(pl.when(beyond).then(f28.zero()).otherwise(pl.col("_units_f")).alias("_units_in_range"))
    # below 0.1 unit the quotient's 28 significant digits run past QTY's 28 decimals: kept
    # beside it, to print and to apply to the after-state (its notional stays the amount)
    sig = sized.filter(~oversell & ~beyond & f28.below_a_tenth("_units_f")).select("slot", pl.col("_units_f").alias("_units_sig"))
    sized = sized.select(
        pl.when(oversell).then("_held").when(~beyond).then(units).alias("requested_quantity"),
        oversell.alias("_oversell"),
        pl.when(beyond & ~oversell).then(pl.col("_amount_units")).alias("_units_beyond_range"),
    )
    t = put_rows(t, rows, sized)
    return join_on_index(t, sig, "slot") if sig.height else t  # _units_sig only where a shard has one (rare)


def _notional_amounts(market: Market, t: pl.DataFrame, exact: ExactLocked | None, valued: tuple[pl.DataFrame, pl.DataFrame] | None,
                      replay: Replay | None, locked: pl.DataFrame | None) -> pl.DataFrame:
    """``t`` with ``_amount``: the notional-sized rows' round(|delta|, 2), half-even (null
    elsewhere). An |delta| within a hair of a half cent is rounded from the reference's
    28-digit delta (§1.1): an inverse quote's 20-decimal rate or a normalised locked weight
    can put the fixed point on the other side of the midpoint (x.xx5 against x.xx4999…)."""
    amount = pl.when("by_notional").then(pl.col("_abs_delta").round(2))
    # the cents of |delta|'s fraction (a product of |delta| itself could leave DEC's range)
    cents = (pl.col("_abs_delta") - pl.col("_abs_delta").floor()) * 100
    midpoint = ((cents - cents.floor()) - lit("0.5")).abs() < NEAR_INTEGER + pl.col("_abs_delta") * (NEAR_INTEGER_SHARE * 100)
    near = t.filter("by_notional").filter(midpoint)  # the notional-sized rows are few: test only them
    if near.height == 0:
        return t.with_columns(amount.alias("_amount"))
    near = _deltas_in_28_digits(market, near, exact, valued, replay, locked)
    exact_amounts = f28.rounded(near, "_abs_delta_f", 2, "_exact_amount").select("slot", "_exact_amount")
    return join_on_index(t, exact_amounts, "slot").with_columns(pl.coalesce("_exact_amount", amount).alias("_amount")).drop("_exact_amount")


def _market_value_for_delta(market: Market, t: pl.DataFrame) -> pl.DataFrame:
    """``t`` with ``_mv_for_delta``, the market value that stands for a held trade's current
    value (null: quantity × price), and ``_mv_converted``. The reference takes a position's
    market value whatever the valuation mode and its currency (§6.9 step 3). Under RFC
    ``delta_from_valuation`` the current value is the valuation's: quantity × price unless
    the run trusts the snapshot (TRUST_SNAPSHOT), and a trusted market value in another
    currency than the price's is its base value over the target's rate, (market value ×
    rate to base) / rate of the price currency, 0 without a rate to base as in the
    valuation (whose fx_missing finding then stands)."""
    mv = pl.col("market_value")
    if not t["delta_from_valuation"].any():  # the reference's answer: no conversion
        return t.with_columns(mv.alias("_mv_for_delta"), pl.lit(False).alias("_mv_converted"))
    rfc = pl.col("delta_from_valuation")
    trusted = mv.is_not_null() & (pl.col("valuation_mode") == "TRUST_SNAPSHOT")
    converted = rfc & trusted & (pl.col("market_value_currency") != pl.col("price_currency"))
    t = market.with_rate(t, "market_value_currency", "base_currency", "_mv_rate")
    in_price_currency = pl.when(pl.col("_mv_rate").is_null()).then(lit(0)).otherwise((mv * pl.col("_mv_rate")) / pl.col("rate"))
    return t.with_columns(
        pl.when(converted).then(in_price_currency).when(~rfc | trusted).then(mv).alias("_mv_for_delta"),
        converted.alias("_mv_converted"),
    ).drop("_mv_rate")


def within_quantity_range(intents: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """``intents`` without ``_units_beyond_range``, once the dust and turnover steps have
    dropped what they drop. A trade still beyond QTY's range (which a cast would fail on
    with only a column name) raises QuantityRangeError naming the first in (run,
    intent_no) order, with each such portfolio's first trade by run key (``runs``: run,
    run_key), so that callers can set those portfolios aside without searching."""
    if intents["_units_beyond_range"].null_count() < intents.height:
        beyond = intents.filter(pl.col("_units_beyond_range").is_not_null()).sort("run", "intent_no")
        raise quantity_range_error(beyond, runs, "_units_beyond_range")
    return intents.drop("_units_beyond_range")


_NEAR_INTEGER = Decimal("0.000000001")
NEAR_INTEGER = lit(_NEAR_INTEGER)
# plus this share of the quotient: an inverse quote's 20-decimal rate is off by up to ~1e-17
# of itself, and a locked weight of 1e-7 held at 28 decimals by ~1e-14, which move a
# quotient of 10^5 units or more by more than NEAR_INTEGER
NEAR_INTEGER_SHARE = lit(HAIR)


def near_an_integer(quotient: pl.Expr, nearest: pl.Expr) -> pl.Expr:
    """|quotient − nearest| < NEAR_INTEGER + nearest × NEAR_INTEGER_SHARE for DEC columns,
    ``nearest`` a whole number, compared as DEC's 128-bit integers (units of 1e-20) with
    both sides over the share: |q − n| / share < NEAR_INTEGER / share + n. Every term is
    exact in both forms (n × 1e-12 has 12 decimals), so they agree row for row; the
    integer form spares a DEC product over every trade row (~20 ms of 460,000)."""
    over_share = int(1 / Decimal(HAIR))
    bound = int(_NEAR_INTEGER * 10**SCALE) * over_share
    distance = (quotient.to_physical() - nearest.to_physical()).abs()
    return distance * pl.lit(over_share, dtype=pl.Int128) < pl.lit(bound, dtype=pl.Int128) + nearest.to_physical()


def _exact_near_integer_floors(market: Market, t: pl.DataFrame, exact: ExactLocked | None = None,
                               valued: tuple[pl.DataFrame, pl.DataFrame] | None = None, replay: Replay | None = None,
                               locked: pl.DataFrame | None = None) -> pl.DataFrame:
    """Redo the sizing of trades whose unit quotient lies within 1e-9 (plus 1e-12 of itself)
    of an integer in the reference's 28-digit arithmetic (spec §1.1): there the fixed-point and the reference's
    rounding can fall on different sides of the integer. Elsewhere fixed-point is exact
    enough by many orders of magnitude, so only these rows pay for the exact chain. In
    the runs whose last digit can decide (``ExactLocked``), tv and a locked weight that no
    target step changed come with all 28 digits; with ``valued``, every other run with such a
    trade has its tv summed in 28 digits here (tv's last digits decide the side of the
    integer when the rate is an inverse quote's rounded quotient), and so is, with
    ``locked`` (the universe's locked holdings: run, slot, _base_f, map_weight), the weight
    of a locked holding that no target step changed, value_base over that tv; and with
    ``replay`` a target weight that a target step changed is taken as the reference's
    28-digit steps leave it (below 0.1 it has more decimals than Decimal(38, 28) keeps)."""
    nearest = pl.col("_nearest")
    # a quotient near zero floors to zero whichever way it rounds, and a zero target makes
    # delta = −current exactly (liquidations), so neither needs the exact chain; but a
    # held quantity past DEC's 20 decimals (fed back) is worth quantity × price in 28
    # digits, which DEC rounds (44.999999999999999999999999 units at 367.37 are worth 45
    # units' 16531.65 in DEC), and a converted market value (delta_from_valuation) is
    # 20-decimal even for a zero target
    inexact_delta = (pl.col("final_weight") != 0) | _valued_past_dec(t)
    near = t.with_row_index("_row").with_columns(pl.col("_quotient").round(0).alias("_nearest")).filter(
        ~pl.col("by_notional") & (nearest >= 1)
        & (near_an_integer(pl.col("_quotient"), nearest) & inexact_delta | pl.col("_mv_converted"))
    )
    if near.height == 0:
        return t
    near = _deltas_in_28_digits(market, near, exact, valued, replay, locked)
    near = f28.div(near, "_abs_delta_f", "_price_f", "_quotient_f")
    near = near.with_columns(f28.floor("_quotient_f").alias("_units"))
    near = f28.from_dec(near, "_units", "_units_f")
    near = f28.mul(near, "_units_f", "_price_f", "_units_notional_f")
    near = f28.sub(near, "_units_notional_f", "_abs_delta_f", "_overshoot_f")
    near = near.with_columns(
        pl.when(f28.sign("_overshoot_f") > 0).then(pl.col("_units") - 1).otherwise(pl.col("_units")).alias("_units"),
        pl.when(f28.sign("_delta_f") > 0).then(pl.lit("BUY")).otherwise(pl.lit("SELL")).alias("side"),
        f28.to_dec("_abs_delta_f").alias("_abs_delta"),
    )
    # written back in place, so t keeps its (run, trace_order) order: a merge by filter,
    # concat and sort moved every column of every row
    return put_rows(t, near["_row"], near.select("_units", "side", "_abs_delta"))


def _deltas_in_28_digits(market: Market, near: pl.DataFrame, exact: ExactLocked | None, valued: tuple[pl.DataFrame, pl.DataFrame] | None,
                         replay: Replay | None, locked: pl.DataFrame | None) -> pl.DataFrame:
    """``near`` with ``_delta_f`` (target value − current value in the instrument's currency),
    ``_abs_delta_f`` and ``_price_f`` as the reference's 28-digit steps leave them; see
    ``_exact_near_integer_floors`` for where tv and the weight come from."""
    near = market.with_rate_f28(near, "price_currency", "base_currency", "_rate_f")
    for src, out in (("total_value", "_tv_f"), ("final_weight", "_fw_f"), ("current_value_instr", "_cur_f"), ("price", "_price_f")):
        near = f28.from_dec(near, src, out)
    exact_totals = exact.totals if exact is not None else pl.DataFrame(schema={"run": pl.UInt32, "total_f28": f28.F28})
    if valued is not None:
        bases = near.select("run", "base_currency").unique("run").join(exact_totals, on="run", how="anti")
        if bases.height:
            _, tv = valued_in_28_digits(market, bases, *valued)
            exact_totals = pl.concat([exact_totals, tv.select("run", pl.col("_tv_f").alias("total_f28"))])
    near = near.join(exact_totals, on="run", how="left").with_columns(f28.coalesce("total_f28", "_tv_f").alias("_tv_f")).drop("total_f28")
    if exact is not None:
        near = near.join(exact.weights, on="slot", how="left")
        unchanged = ~f28.is_null("weight_f28") & (f28.to_d28("weight_f28") == pl.col("final_weight"))
        near = near.with_columns(
            pl.when(unchanged).then(pl.col("weight_f28")).otherwise(pl.col("_fw_f")).alias("_fw_f"),
        ).drop("weight_f28")
    if locked is not None and valued is not None:
        # a locked weight still as the universe set it (over the fixed-point tv): redone over the 28-digit tv
        ours = near.select("run", "slot", "final_weight").join(exact_totals, on="run", how="inner").join(
            locked.select("slot", "_base_f", "map_weight"), on="slot", how="inner",
        ).filter(pl.col("map_weight") == pl.col("final_weight"))
        if exact is not None:
            ours = ours.join(exact.totals, on="run", how="anti")  # their locked weights came exact from the universe
        if ours.height:
            ours = ours.with_columns(pl.when(f28.sign("total_f28") == 0).then(f28.one()).otherwise(pl.col("total_f28")).alias("_divisor_f"))
            ours = f28.div(ours, "_base_f", "_divisor_f", "_locked_f").select("slot", "_locked_f")
            near = near.join(ours, on="slot", how="left").with_columns(f28.coalesce("_locked_f", "_fw_f").alias("_fw_f")).drop("_locked_f")
    if replay is not None and valued is not None:
        redone = replayed_weights(market, replay, near.select("run").unique(), valued).rename({"weight_f28": "_redone_f"})
        if redone.height:
            near = near.join(redone, on="slot", how="left").with_columns(f28.coalesce("_redone_f", "_fw_f").alias("_fw_f")).drop("_redone_f")
    near = f28.mul(near, "_tv_f", "_fw_f", "_tv_w_f")
    near = f28.div(near, "_tv_w_f", "_rate_f", "_target_f")
    if near["_mv_converted"].any():  # delta_from_valuation: a market value converted as the valuation converts it, in 28 digits
        near = market.with_rate_f28(f28.from_dec(near, "market_value", "_mv_f"), "market_value_currency", "base_currency", "_mv_rate_f")
        near = f28.div(f28.mul(near, "_mv_f", "_mv_rate_f", "_mv_base_f"), "_mv_base_f", "_rate_f", "_mv_cur_f")
        near = near.with_columns(
            pl.when(pl.col("_mv_converted") & f28.is_null("_mv_rate_f")).then(f28.zero())
            .when(pl.col("_mv_converted")).then(pl.col("_mv_cur_f")).otherwise(pl.col("_cur_f")).alias("_cur_f"),
        ).drop("_mv_f", "_mv_rate_f", "_mv_base_f", "_mv_cur_f")
    near = _held_values_in_28_digits(near, valued)
    near = f28.sub(near, "_target_f", "_cur_f", "_delta_f")
    return near.with_columns(f28.absolute("_delta_f").alias("_abs_delta_f"))


def _valued_past_dec(t: pl.DataFrame) -> pl.Expr:
    """Whether a row's current value is quantity × price over a held quantity with digits
    past DEC's 20 decimals (fed back), which DEC's product rounds."""
    held_long = beyond_dec_decimals(t, "held_quantity")
    return pl.lit(False) if held_long is None else held_long.fill_null(False) & pl.col("_mv_for_delta").is_null()


def _held_values_in_28_digits(near: pl.DataFrame, valued: tuple[pl.DataFrame, pl.DataFrame] | None) -> pl.DataFrame:
    """``near`` with ``_cur_f`` the reference's 28-digit quantity × price where the current
    value is that product and the held quantity has digits past DEC's 20 decimals (a
    notional-sized or tax-limited quantity fed back as a holding): 883.785843951522276585812832
    units at 578.41 are worth 511190.5700000000000000000002, not DEC's 511190.57, which puts
    a delta of a half cent on the other side of the midpoint. The quantity's 28 digits are
    the valuation's (``quantity_f28``, set by ``valuation._exact_quantities`` where F28
    holds the quantity whole)."""
    held_long = _valued_past_dec(near)
    if valued is None or not near.select(held_long.any()).item():
        return near
    near = near.join(valued[0].select("slot", pl.col("quantity_f28").alias("_held_f")), on="slot", how="left", maintain_order="left")
    near = near.with_columns((held_long & ~f28.is_null("_held_f")).alias("_exact_held"), f28.fill_null("_held_f", f28.zero()).alias("_held_f"))
    near = f28.mul(near, "_held_f", "_price_f", "_held_value_f")
    return near.with_columns(pl.when("_exact_held").then(pl.col("_held_value_f")).otherwise(pl.col("_cur_f")).alias("_cur_f")).drop(
        "_held_f", "_exact_held", "_held_value_f")


def _rationale() -> pl.Expr:
    """Reference code DRIFT_REBALANCE, or with ``rfc_rationale_codes`` the RFC Appendix A code.
    CONSTRAINT_CAP ("Capped at max") is a model weight above the single-position max, the
    RFC's condition for capping a target (§6 step 3), not the trace tags, which the reference
    sets for any scaling (a cash buffer, normalisation)."""
    capped = pl.col("single_position_max_weight").is_not_null() & (pl.col("model_weight") > pl.col("single_position_max_weight"))
    rfc = (
        pl.when((~pl.col("in_model") | (pl.col("final_weight") == 0)) & (pl.col("side") == "SELL")).then(pl.lit("LIQUIDATION"))
        .when(capped).then(pl.lit("CONSTRAINT_CAP"))
        .when((pl.col("side") == "BUY") & pl.col("held_quantity").fill_null(lit(0)).eq(0)).then(pl.lit("CASH_INVESTMENT"))
        .otherwise(pl.lit("REBALANCE_DRIFT"))
    )
    return pl.when(pl.col("rfc_rationale_codes")).then(rfc).otherwise(pl.lit("DRIFT_REBALANCE"))


def apply_turnover_cap(intents: pl.DataFrame, runs: pl.DataFrame, totals: pl.DataFrame, market: Market | None = None,
                       valued: tuple[pl.DataFrame, pl.DataFrame] | None = None):
    """§6.12: keep the highest-scoring intents that fit ``tv × max_turnover_pct``,
    skipping (not stopping at) those that do not fit. Adds ``list_order``: original order
    when nothing is dropped, ranking order otherwise (rows themselves stay unordered).
    With ``market`` and ``valued`` (the before-state's valued positions and cash), a run
    whose decision rests on a comparison or a tie too close for the fixed point to call is
    decided again in the reference's 28 digits (``_exact_turnover``)."""
    # only runs with a turnover limit can be capped; the others' intents pass straight through
    limited = runs.filter(pl.col("max_turnover_pct").is_not_null())
    is_limited = pl.col("run").is_in(limited["run"].implode())
    untouched = intents.filter(~is_limited).with_columns(pl.col("intent_no").alias("list_order"))
    frame = (
        intents.filter(is_limited).join(limited.select("run", "max_turnover_pct"), on="run", how="left")
        .join(totals.select("run", "total_value"), on="run", how="left")
        .with_columns(
            dabs(pl.col("notional_base")).alias("_abs_nb"),
            (pl.col("total_value") * pl.col("max_turnover_pct")).alias("_budget"),
        )
    )
    # the proposed sum and the walk's running sums must stay in DEC
    name_sums_beyond_range("_abs_nb", [frame], runs, "the sum of the portfolio's trade notionals in base currency")
    frame = frame.with_columns(pl.col("_abs_nb").sum().over("run").alias("_proposed"))
    capped = pl.col("max_turnover_pct").is_not_null() & (pl.col("_proposed") > pl.col("_budget"))
    free, ranked = frame.filter(~capped), frame.filter(capped)
    ranked = naming_overflows(lambda: ranked.with_columns(
        pl.when(pl.col("total_value") <= 0).then(lit(0)).otherwise(pl.col("_abs_nb") / positive_or_null("total_value")).alias("score"),
        (pl.lit("oi_") + pl.col("intent_no").cast(pl.String)).alias("_intent_id"),
    ), ranked, runs, pl.when(as_f64("total_value") <= 0).then(0.0).otherwise(as_f64("_abs_nb") / as_f64("total_value")),
        _score_text(units_text("total_value")))
    ranked = ranked.sort(
        ["run", "score", "_abs_nb", "instrument_id", "_intent_id"], descending=[False, True, False, False, False]
    ).with_columns(pl.int_range(pl.len()).over("run").cast(pl.Int64).alias("list_order"))
    flags = _walk_turnover_budget(ranked.select("run", "list_order", "_abs_nb", "_budget"))
    ranked = ranked.join(flags, on=["run", "list_order"], how="left")
    decisions = pl.concat([
        free.select("run", "intent_no", pl.col("intent_no").alias("list_order"), pl.lit(True).alias("_keep"), "_abs_nb",
                    pl.lit(None, dtype=DEC).alias("score")),
        ranked.select("run", "intent_no", "list_order", "_keep", "_abs_nb", pl.col("score").cast(DEC)),
    ])
    if market is not None and valued is not None:
        fragile = _fragile_turnover_runs(frame, ranked)
        if fragile.height:
            exact = _exact_turnover(market, frame.join(fragile, on="run", how="semi"), valued, runs)
            decisions = pl.concat([decisions.join(fragile, on="run", how="anti"), exact])
    decided = frame.select(*intents.columns).join(decisions, on=["run", "intent_no"], how="inner")
    dropped = decided.filter(~pl.col("_keep")).select(
        "run", "instrument_id", pl.col("_abs_nb").alias("potential_notional"), "base_currency", "score",
        pl.col("list_order").alias("drop_order"),
    ).pipe(sort_rows, "run", "drop_order")
    warnings = warnings_frame(dropped.select("run").unique(), pl.lit("PARTIAL_REBALANCE_TURNOVER_LIMIT"), pl.lit(TURNOVER_ORDER))
    # one chunk per column: the parts' chunks differ by column (a constant column comes back
    # whole), and an eager select on a frame whose columns are chunked differently first
    # copies every column into one chunk (~14 ms for a shard's 390,000 intents, each time,
    # and the range check and FX planning operate on this frame nine times)
    kept = pl.concat([untouched, decided.filter(pl.col("_keep")).select(intents.columns + ["list_order"])], rechunk=True)
    return kept, dropped, pl.concat([pl.DataFrame(schema=WARNINGS_SCHEMA), warnings])


# within this share of each other, two fixed-point turnover figures may compare the other
# way in the reference's 28 digits: an inverse quote's 20-decimal rate is off by up to ~1e-17
# of itself for the smallest rates quoted
TURNOVER_EPS_RELATIVE = lit(HAIR)


def _hair_of_budget() -> pl.Expr:
    """A hair of the run's turnover budget (``_budget``), at least a hair of 1."""
    return TURNOVER_EPS_RELATIVE * (lit(1) + dabs(pl.col("_budget")))


def _fragile_turnover_runs(frame: pl.DataFrame, ranked: pl.DataFrame) -> pl.DataFrame:
    """(run) of the limited runs whose cap decision the fixed point cannot be trusted to
    make as the reference does: ``proposed`` within a hair of the budget, two adjacent
    ranked intents whose scores or sizes (nearly) tie, an intent that fits the room left
    for it (or misses it) by a hair, or a total of 0 (or one valuation took as 0), which
    scores 0 where 28 digits may score over a few units of the last digit."""
    eps = _hair_of_budget()
    near_cap = frame.filter(within(pl.col("_proposed"), pl.col("_budget"), eps)).select("run")
    steps = ranked.sort("run", "list_order").with_columns(
        dabs(pl.col("score") - pl.col("score").shift(1).over("run")).alias("_score_gap"),
        dabs(pl.col("_abs_nb") - pl.col("_abs_nb").shift(1).over("run")).alias("_size_gap"),
    )
    near_tie = steps.filter((pl.col("_score_gap") <= TURNOVER_EPS_RELATIVE) | (pl.col("_size_gap") <= eps)).select("run")
    return pl.concat([near_cap, near_tie, _near_fit_runs(steps), frame.filter(pl.col("total_value") == 0).select("run")]).unique()


def _near_fit_runs(walked: pl.DataFrame) -> pl.DataFrame:
    """(run) of the runs in ``walked`` (run, list_order, _abs_nb, _budget, _keep; rows in
    (run, list_order) order) where an intent fits the room left for it, or misses it, by
    a hair."""
    eps = _hair_of_budget()
    kept_size = pl.when(pl.col("_keep")).then(pl.col("_abs_nb")).otherwise(lit(0))
    used_before = kept_size.cum_sum().over("run") - kept_size
    return walked.filter(within(pl.col("_budget") - used_before, pl.col("_abs_nb"), eps)).select("run").unique()


def _score_text(total_value: pl.Expr) -> pl.Expr:
    """Names a §6.12 score, |notional_base| / tv, for a ValueRangeError (tv near zero)."""
    return pl.format("the turnover score of a {} of {} (its base notional over a total value of {} {})", "side", "instrument_id",
                     total_value, "base_currency")


def _exact_turnover(market: Market, frame: pl.DataFrame, valued: tuple[pl.DataFrame, pl.DataFrame], runs: pl.DataFrame) -> pl.DataFrame:
    """(run, intent_no, list_order, _keep, _abs_nb, score) of every intent of ``frame``'s
    runs, the §6.12 cap decided in 28 digits: tv summed as §6.2 sums it, each
    notional_base = notional × rate (a tax-limited sell's notional = its 28-digit quantity
    × price), proposed summed in list order, the ranking on the 28-digit scores and sizes,
    and the walk's ``used + |notional_base| ≤ budget`` with every addition rounded."""
    bases = frame.select("run", "base_currency").unique("run")
    _, tv = valued_in_28_digits(market, bases, *valued)
    t = frame.select("run", "intent_no", "instrument_id", "side", "notional", pl.col("price_currency").alias("notional_currency"),
                     "base_currency", "quantity_f28", "max_turnover_pct").sort("run", "intent_no")
    t = market.with_rate_f28(exact_notionals(market, bases, t), "notional_currency", "base_currency", "_rate_f")
    t = f28.mul(t.with_columns(f28.absolute("_flow_f").alias("_notional_f")), "_notional_f", "_rate_f", "_nb_f")
    budgets = f28.group_sums(t, "run", "_nb_f", "_proposed_f").join(
        t.select("run", "max_turnover_pct").unique("run"), on="run"
    ).join(tv, on="run")
    budgets = f28.mul(f28.from_dec(budgets, "max_turnover_pct", "_pct_f"), "_tv_f", "_pct_f", "_budget_f")
    budgets = f28.sub(budgets, "_proposed_f", "_budget_f", "_over_f").with_columns((f28.sign("_over_f") > 0).alias("_capped"))
    t = t.join(budgets.select("run", "_tv_f", "_budget_f", "_capped"), on="run")
    free = t.filter(~pl.col("_capped")).select(
        "run", "intent_no", pl.col("intent_no").alias("list_order"), pl.lit(True).alias("_keep"), f28.to_dec("_nb_f").alias("_abs_nb"),
        pl.lit(None, dtype=DEC).alias("score"),
    )
    ranked = f28.div(t.filter("_capped"), "_nb_f", "_tv_f", "_score_f").with_columns(
        pl.when(f28.sign("_tv_f") <= 0).then(f28.zero()).otherwise(pl.col("_score_f")).alias("_score_f"),
        (pl.lit("oi_") + pl.col("intent_no").cast(pl.String)).alias("_intent_id"),
    )
    # non-negative F28 values order as (non-zero, exponent, mantissa)
    ranked = ranked.sort(
        [pl.col("run"), pl.col("_score_f").struct.field("z") > 0, pl.col("_score_f").struct.field("k"), pl.col("_score_f").struct.field("z"),
         pl.col("_nb_f").struct.field("z") > 0, pl.col("_nb_f").struct.field("k"), pl.col("_nb_f").struct.field("z"),
         pl.col("instrument_id"), pl.col("_intent_id")],
        descending=[False, True, True, True, False, False, False, False, False],
    ).with_columns(pl.int_range(pl.len()).over("run").cast(pl.Int64).alias("list_order"))
    keep = _walk_ranked_exactly(ranked)
    return naming_overflows(lambda: pl.concat([free, ranked.join(keep, on=["run", "list_order"]).select(
        "run", "intent_no", "list_order", "_keep", f28.to_dec("_nb_f").alias("_abs_nb"), f28.to_dec("_score_f").alias("score"),
    )]), ranked, runs, f28.to_f64("_score_f"), _score_text(pl.format("about {}", scientific_text(f28.to_f64("_tv_f")))))


def _walk_ranked_exactly(ranked: pl.DataFrame) -> pl.DataFrame:
    """(run, list_order, _keep): §6.12's walk over ``ranked`` (run, list_order, _nb_f,
    _budget_f; rows in (run, list_order) order) as the reference's 28 digits decide it.
    The rounds walk on the sizes and budgets read to 20 decimals makes every decision
    that clears or misses its room by more than a hair (the two walks' running sums differ
    by ~1e-20 a step); only the runs with a step within a hair take the 28-digit walk, one
    ranking position at a time, which costs a step per intent of the longest run."""
    fixed = ranked.select("run", "list_order", f28.to_dec("_nb_f").alias("_abs_nb"), f28.to_dec("_budget_f").alias("_budget"))
    flags = _walk_turnover_budget(fixed)
    close = _near_fit_runs(fixed.join(flags, on=["run", "list_order"], how="left", maintain_order="left"))
    if close.height == 0:
        return flags
    return pl.concat([flags.join(close, on="run", how="anti"), _walk_exact(ranked.join(close, on="run", how="semi"))])


def _walk_exact(ranked: pl.DataFrame) -> pl.DataFrame:
    """(run, list_order, _keep): §6.12's walk over ``ranked`` (run, list_order, _nb_f,
    _budget_f) in 28 digits, one ranking position of every run per step, the runs with the
    most intents first so that the runs still walking are a prefix."""
    lanes = ranked.group_by("run").len().sort(["len", "run"], descending=[True, False]).with_row_index("lane")
    steps = ranked.join(lanes.select("run", "lane"), on="run").sort("list_order", "lane")
    walking = steps.group_by("list_order").len().sort("list_order")["len"].to_list()
    nb = f28.parts(steps, "_nb_f")
    budget = f28.parts(lanes.join(ranked.select("run", "_budget_f").unique("run"), on="run", how="left").sort("lane"), "_budget_f")
    used, kept, at = f28.zeros(lanes.height), [], 0
    for n in walking:
        candidate = f28.add_parts(used.slice(0, n), nb.slice(at, n))
        fits = f28.sub_parts(budget.slice(0, n), candidate).z >= 0
        used = f28.Parts.concat([f28.where(fits, candidate, used.slice(0, n)), used.slice(n)])
        kept.append(fits)
        at += n
    return steps.select("run", "list_order").with_columns(pl.concat(kept).alias("_keep") if kept else pl.lit(True).alias("_keep"))


def _walk_turnover_budget(ranked: pl.DataFrame) -> pl.DataFrame:
    """``_keep`` for each ranked intent (rows in (run, list_order) order): the §6.12 walk
    ``keep if used + |nb| ≤ budget``, decided in rounds instead of one rank at a time.

    With ``room`` = budget − used at the start of a round, an intent larger than ``room``
    is dropped wherever it ranks (``used`` only grows); of the others, those whose running
    sum stays within ``room`` are kept, and the first whose running sum exceeds it is
    dropped. Every round decides at least one intent of each run, usually all of them:
    sizes fall along the ranking, so a run needs another round only after a skip that a
    smaller intent further down can still fill. Fixed-point sums are exact, so each
    decision is the sequential one."""
    flags = []
    room = ranked.group_by("run").agg(pl.col("_budget").first().alias("_room"))
    pending = ranked.select("run", "list_order", "_abs_nb")
    while pending.height:
        fits = pl.col("_abs_nb") <= pl.col("_room")
        step = pending.join(room, on="run", how="left", maintain_order="left").with_columns(
            fits.alias("_fits"),
            pl.when(fits).then(pl.col("_abs_nb")).otherwise(lit(0)).cum_sum().over("run").alias("_running"),
        ).with_columns(
            (pl.col("_fits") & (pl.col("_running") <= pl.col("_room"))).alias("_keep"),
            (pl.col("_fits") & (pl.col("_running") > pl.col("_room"))).cast(pl.Int32).alias("_overflow"),
        ).with_columns(
            # overflows ranked before this intent: after a run's first one, room is not yet known
            (pl.col("_overflow").cum_sum().over("run") - pl.col("_overflow")).alias("_overflows_before"),
        )
        settled = ~pl.col("_fits") | (pl.col("_overflows_before") == 0)
        flags.append(step.filter(settled).select("run", "list_order", "_keep"))
        room = room.join(
            step.filter(pl.col("_keep")).group_by("run").agg(pl.col("_abs_nb").sum().alias("_kept")), on="run", how="left"
        ).select("run", (pl.col("_room") - pl.col("_kept").fill_null(lit(0))).alias("_room"))
        pending = step.filter(~settled).select("run", "list_order", "_abs_nb")
    return pl.concat([pl.DataFrame(schema={"run": pl.UInt32, "list_order": pl.Int64, "_keep": pl.Boolean}), *flags])
