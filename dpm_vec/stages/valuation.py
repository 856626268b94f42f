"""Valuation of a portfolio state in base currency (spec §6.2), before and after trading."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import polars as pl

from dpm_vec import dec28 as f28
from dpm_vec.dec28 import F28
from dpm_vec.frames import join_runs, sort_rows
from dpm_vec.numeric import HAIR, as_f64, beyond_dec_decimals, dabs, lit, name_sums_beyond_range, naming_overflows, times_price, units_text
from dpm_vec.stages import dq
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.universe import exact_cash_bucket, valued_in_28_digits


@dataclass(frozen=True)
class ValuedState:
    positions: pl.DataFrame  # run, pos_seq, instrument_id, quantity, instrument_currency,
    #                          asset_class, price, value_instr, value_base, weight, slot
    cash: pl.DataFrame  # run, cash_seq, currency, amount, settled, pending, value_base
    totals: pl.DataFrame  # run, total_value, cash_value, divisor
    allocations: pl.DataFrame  # run, dimension, key, bucket_order, value, weight
    dq: pl.DataFrame


def value_state(
    market: Market,
    runs: pl.DataFrame,
    positions: pl.DataFrame,
    cash: pl.DataFrame,
    *,
    trust_snapshot: bool | pl.Expr,
    stage: int,
    allocations: bool = True,
) -> ValuedState:
    """Value ``positions`` and ``cash`` of every run.

    ``runs`` needs run, base_currency (and valuation_mode when ``trust_snapshot`` is an
    expression over it). Trusted market values apply only when ``trust_snapshot`` holds.
    """
    base = runs.select("run", "base_currency", (pl.lit(trust_snapshot) if isinstance(trust_snapshot, bool) else trust_snapshot).alias("_trust"))
    pos = market.with_price(join_runs(positions, base))
    pos = market.with_shelf(pos, ("asset_class",))
    use_mv = pl.col("_trust") & pl.col("market_value").is_not_null()
    pos = naming_overflows(lambda: pos.with_columns(
        pl.when(use_mv).then(pl.col("market_value_currency"))
        .otherwise(pl.coalesce("price_currency", "base_currency")).alias("instrument_currency"),
        pl.when(use_mv).then(pl.col("market_value"))
        .otherwise(times_price(pos, "quantity", pl.col("price").fill_null(lit(0)))).alias("value_instr"),
        pl.col("asset_class").fill_null("UNKNOWN"),
    ), pos, runs, pl.when(use_mv).then(as_f64("market_value")).otherwise(as_f64("quantity") * as_f64("price")),
        pl.format("the value of {} units of {} at {}", units_text("quantity"), "instrument_id", units_text("price")))
    pos = _exact_quantities(pos, ~use_mv & pl.col("price").is_not_null())
    pos = market.with_rate(pos, "instrument_currency", "base_currency", "_rate")
    pos = naming_overflows(lambda: pos.with_columns(
        pl.when(pl.col("_rate").is_null()).then(lit(0))
        .otherwise(pl.col("value_instr") * pl.col("_rate")).alias("value_base")
    ), pos, runs, as_f64("value_instr") * as_f64("_rate"),
        pl.format("the value of {} in {} ({} {} at {} {}/{})", "instrument_id", "base_currency", units_text("value_instr"), "instrument_currency",
                  units_text("_rate"), "instrument_currency", "base_currency"))
    price_missing = dq.findings(
        pos, pl.col("price").is_null(), "price_missing", pl.col("instrument_id"), stage, pl.col("pos_seq") * 2
    )
    pos_fx_missing = dq.findings(
        pos, pl.col("_rate").is_null(), "fx_missing",
        pl.col("instrument_currency") + "/" + pl.col("base_currency"), stage, pl.col("pos_seq") * 2 + 1,
    )
    cash = market.with_rate(join_runs(cash, base.select("run", "base_currency")), "currency", "base_currency", "_rate")
    cash = naming_overflows(lambda: cash.with_columns(
        pl.when(pl.col("currency") == pl.col("base_currency")).then(pl.col("amount"))
        .when(pl.col("_rate").is_null()).then(lit(0))
        .otherwise(pl.col("amount") * pl.col("_rate")).alias("value_base")
    ), cash, runs, as_f64("amount") * as_f64("_rate"),
        pl.format("the value of cash {} {} in {} at {} {}/{}", units_text("amount"), "currency", "base_currency", units_text("_rate"), "currency", "base_currency"))
    cash_fx_missing = dq.findings(
        cash, pl.col("_rate").is_null(), "fx_missing",
        pl.col("currency") + "/" + pl.col("base_currency"), stage + 1, pl.col("cash_seq"),
    )
    name_sums_beyond_range("value_base", [pos, cash], runs, "the sum of the portfolio's absolute values in base currency")
    totals = _totals(runs, pos, cash)
    totals = totals.with_columns(_total_taken_as_zero(totals, pos, cash)).with_columns(
        pl.when(pl.col("total_value") == 0).then(lit(1)).otherwise(pl.col("total_value")).alias("divisor")
    )
    pos = join_runs(pos, totals.select("run", "divisor")).with_columns(
        (pl.col("value_base") / pl.col("divisor")).alias("weight")
    )
    positions_out = pos.select(
        "run", "pos_seq", "instrument_id", "quantity", "quantity_f28", "instrument_currency", "asset_class",
        "price", "value_instr", "value_base", "weight", "market_value", "market_value_currency", "slot",
    )
    positions_out = sort_rows(positions_out, "run", "pos_seq")
    cash_out = sort_rows(cash.select("run", "cash_seq", "currency", "amount", "amount_exact", "settled", "pending", "value_base"), "run", "cash_seq")
    allocations = _allocations(market, pos, cash, totals, full=allocations)
    return ValuedState(
        positions=positions_out,
        cash=cash_out,
        totals=totals,
        allocations=allocations,
        dq=dq.concat(price_missing, pos_fx_missing, cash_fx_missing),
    )


def _totals(runs: pl.DataFrame, pos: pl.DataFrame, cash: pl.DataFrame) -> pl.DataFrame:
    """Each run's total_value and cash_value: the sums of the value_base of its holdings
    (``pos``) and its ``cash``."""
    return (
        runs.select("run")
        .join(pos.group_by("run").agg(pl.col("value_base").sum().alias("_pv")), on="run", how="left", maintain_order="left")
        .join(cash.group_by("run").agg(pl.col("value_base").sum().alias("cash_value")), on="run", how="left", maintain_order="left")
        .with_columns(pl.col("_pv", "cash_value").fill_null(lit(0)))
        .with_columns((pl.col("_pv") + pl.col("cash_value")).alias("total_value"))
        .select("run", "total_value", "cash_value")
    )


def _exact_quantities(pos: pl.DataFrame, by_price: pl.Expr) -> pl.DataFrame:
    """``pos`` with ``quantity_f28`` (the 28 significant digits a 28-digit check values a
    position from, ``universe.base_value_f28``) also where a quantity valued at its price
    has more decimals than DEC's 20: its value_instr holds quantity × price rounded there
    (68.75 for 3.684351554126473740621650589 units at 18.66, 68.74999999999999999999999999
    in the reference's 28 digits, §6.2), and a CASH bucket or weight at a band's bound
    can depend on the difference. A tax-limited quantity's own digits stay, and one of
    more than 28 significant digits, which F28 would round (a book's Decimal(38, 28) can
    hold 445.00000000000000000000000001; the JSON door rounds it on input), is left as it
    was: it prints as given."""
    if "quantity_f28" not in pos.columns:
        pos = pos.with_columns(pl.lit(None, dtype=F28).alias("quantity_f28"))
    more_digits = beyond_dec_decimals(pos, "quantity")
    if more_digits is None:
        return pos
    rows = pos.select(pl.arg_where(by_price & more_digits & f28.is_null("quantity_f28"))).to_series()
    if rows.len() == 0:
        return pos
    exact = f28.from_dec(pos[rows].select("quantity"), "quantity", "_quantity_f")
    whole = exact.select(f28.to_d28("_quantity_f") == pl.col("quantity")).to_series()
    return f28.scatter(pos, "quantity_f28", rows.filter(whole), exact.get_column("_quantity_f").filter(whole))


def near_printed_midpoint(weight: pl.Expr) -> pl.Expr:
    """Whether a weight lies within a hair (1e-12) of a 4-dp midpoint such as 0.70125. A
    weight beyond ±1e9 (a total of nearly 0) is clipped first: × 10^4 would leave DEC."""
    scaled = weight.clip(lit(-10**9), lit(10**9)) * lit(10_000)
    return (scaled - scaled.floor() - lit("0.5")).abs() <= lit(HAIR) * lit(10_000)


def at_printed_midpoints(market: Market, runs: pl.DataFrame, state: ValuedState,
                         exact_cash: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> ValuedState:
    """``state`` with each position and bucket weight that lies within a hair of a 4-dp
    midpoint replaced by its 4-dp rounding from the reference's 28 digits (§1.1, §6.2):
    value_base / T with T one running sum over the positions and then the cash. The
    JSON door prints state weights at 4 dp, and a fixed-point weight there can fall on
    the other side of the midpoint (cash of 935 over a CHF holding at EUR/CHF 6 is
    exactly 0.70125 of the total: 0.7013 from the reference's 28-digit total, 0.7012 from
    the 20-decimal one). ``exact_cash(chosen runs)`` gives the after-state's 28-digit cash
    balances (run, currency, _amount_f). Where a literal CASH asset class shares the cash
    bucket, the bucket is its positions' sum plus the cash's, as the fixed point adds them."""
    near = near_printed_midpoint(pl.col("weight"))
    chosen = pl.concat([state.positions.filter(near).select("run"), state.allocations.filter(near).select("run")]).unique()
    if chosen.height == 0:
        return state
    bases = runs.select("run", "base_currency").join(chosen, on="run", how="semi")
    cash = state.cash.join(bases, on="run", how="semi")
    if exact_cash is not None:
        cash = cash.join(exact_cash(runs.join(chosen, on="run", how="semi")), on=["run", "currency"], how="left")
    held, tv = valued_in_28_digits(market, bases, state.positions, cash)
    held = sort_rows(held, "run", "pos_seq")
    weights = tv.select("run", "_divisor_f", "_cash_f")

    def weighed(values: pl.DataFrame, value: str) -> pl.DataFrame:
        quotients = f28.div(values.join(weights, on="run"), value, "_divisor_f", "_w_f")
        return f28.rounded(quotients, "_w_f", 4, "_printed").drop("_divisor_f", "_cash_f", "_w_f")

    by_position = weighed(held.select("run", "pos_seq", "instrument_id", "_base_f"), "_base_f")
    # Σ value_base per bucket in position order (held is), each addition rounded to 28 digits;
    # a literal CASH class is summed into the cash bucket (exact_cash_bucket)
    class_sums = f28.sums_by(held.filter(pl.col("asset_class") != "CASH"), ["run", "asset_class"], "_base_f", "_sum_f")
    by_class = weighed(class_sums, "_sum_f").select(
        "run", pl.lit("asset_class").alias("dimension"), pl.col("asset_class").alias("key"), "_printed",
    )
    cash_bucket = weighed(exact_cash_bucket(held, tv), "_bucket_f").select(
        "run", pl.lit("asset_class").alias("dimension"), pl.lit("CASH").alias("key"), "_printed",
    )
    attrs = market.with_attributes(held.select("run", "pos_seq", "instrument_id", "_base_f"))
    by_attribute = weighed(f28.sums_by(sort_rows(attrs, "run", "pos_seq"), ["run", "attribute", "value"], "_base_f", "_sum_f"), "_sum_f").select(
        "run", pl.concat_str(pl.lit("attribute:"), pl.col("attribute")).alias("dimension"), pl.col("value").alias("key"), "_printed",
    )
    exact_buckets = pl.concat([by_class, cash_bucket, by_attribute])
    printed = pl.when(near & pl.col("_printed").is_not_null()).then(pl.col("_printed")).otherwise(pl.col("weight")).alias("weight")
    positions = state.positions.join(
        by_position.select("run", pl.col("pos_seq").cast(state.positions.schema["pos_seq"]), "_printed"),
        on=["run", "pos_seq"], how="left", maintain_order="left",
    ).with_columns(printed).drop("_printed")
    instrument = state.allocations.join(
        by_position.select("run", pl.lit("instrument").alias("dimension"), pl.col("pos_seq").cast(pl.Int64).alias("bucket_order"),
                           pl.col("_printed").alias("_by_position")),
        on=["run", "dimension", "bucket_order"], how="left", maintain_order="left",
    )
    allocations = instrument.join(exact_buckets, on=["run", "dimension", "key"], how="left", maintain_order="left").with_columns(
        pl.coalesce("_by_position", "_printed").alias("_printed"),
    ).with_columns(printed).drop("_by_position", "_printed")
    return replace(state, positions=positions, allocations=allocations)


def _allocations(market: Market, pos: pl.DataFrame, cash: pl.DataFrame, totals: pl.DataFrame, full: bool) -> pl.DataFrame:
    """Asset-class, instrument and shelf-attribute buckets (§5.1), in first-appearance order.
    Without ``full`` only the bucket the rules read is built: CASH."""
    # only a literal CASH asset class shares the cash bucket, so that is all the rules need
    class_pos = pos if full else pos.filter(pl.col("asset_class") == "CASH")
    by_class = (
        class_pos.group_by("run", "asset_class")
        .agg(pl.col("value_base").sum().alias("value"), pl.col("pos_seq").min().alias("bucket_order"))
        .rename({"asset_class": "key"})
    )
    cash_bucket = (
        totals.select("run", pl.lit("CASH").alias("key"), pl.col("cash_value").alias("value"),
                      pl.lit(2**62, dtype=pl.Int64).alias("bucket_order"))
    )
    by_class = (
        pl.concat([by_class.with_columns(pl.col("bucket_order").cast(pl.Int64)), cash_bucket])
        .group_by("run", "key")
        .agg(pl.col("value").sum(), pl.col("bucket_order").min())
        .with_columns(pl.lit("asset_class").alias("dimension"))
    )
    if not full:
        # only the rules read the buckets, and of them only CASH (instrument weights they
        # take from the positions): no order to establish
        return _finish(_frame(by_class), totals, sort=False)
    by_instrument = pos.select(
        "run", pl.lit("instrument").alias("dimension"), pl.col("instrument_id").alias("key"),
        pl.col("pos_seq").cast(pl.Int64).alias("bucket_order"), pl.col("value_base").alias("value"),
    )
    # first appearance: position, then the attribute's place on its shelf entry. The
    # after-state numbers appended positions from 2^50, so the position is ranked within
    # its run before it is packed with the attribute's place (2^50 x 2^32 overflows Int64)
    ranked = pos.select("run", pl.col("pos_seq").rank("dense").over("run").cast(pl.Int64).alias("position_rank"),
                        "instrument_id", "value_base")
    attrs = market.with_attributes(ranked)
    by_attribute = (
        attrs.group_by("run", "attribute", "value")
        .agg(
            pl.col("value_base").sum().alias("amount"),
            (pl.col("position_rank") * 2**32 + pl.col("attr_seq")).min().alias("bucket_order"),
        )
        .with_columns(
            pl.col("bucket_order").min().over("run", "attribute").alias("attribute_order"),
        )
        .select(
            "run", pl.concat_str(pl.lit("attribute:"), pl.col("attribute")).alias("dimension"),
            pl.col("value").alias("key"), "bucket_order", pl.col("amount").alias("value"), "attribute_order",
        )
    )
    frames = [_frame(by_class), _frame(by_instrument)]
    frames.append(by_attribute.select("run", "dimension", "key", "bucket_order", "value", pl.col("attribute_order").cast(pl.Int64)))
    return _finish(pl.concat(frames), totals)


# a weight's magnitude stays under this, inside Decimal(38, 20)
_DEC_WEIGHT_RANGE = lit(10**17)


def _total_taken_as_zero(totals: pl.DataFrame, positions: pl.DataFrame, cash: pl.DataFrame) -> pl.Expr:
    """§6.2's tv, 0 where it is so small against the run's values that a weight (value /
    tv) would leave ``Decimal(38, 20)``: such a total is the error of the fixed point's last
    digits (holdings and negative cash cancelling), and the reference's 28 digits may take
    it as 0 (if they leave a few units instead, its weights, about 1e20, are beyond any
    fixed point). Weights then divide by 1, as for any zero total, and compliance decides
    the run's weight rules over the 28-digit total (``compliance.evaluate_rules``)."""
    total = pl.col("total_value")
    small = totals.filter(dabs(total) < 1).select("run", "total_value")
    if small.height == 0:
        return total
    values = pl.concat([positions.select("run", "value_base"), cash.select("run", "value_base")]).join(small, on="run", how="semi")
    spread = values.group_by("run").agg(dabs(pl.col("value_base")).sum().alias("_spread")).join(small, on="run")
    tiny = spread.filter(pl.col("_spread") >= dabs(pl.col("total_value")) * _DEC_WEIGHT_RANGE).get_column("run")
    return pl.when(pl.col("run").is_in(tiny.implode())).then(lit(0)).otherwise(total).alias("total_value")


def _frame(f: pl.DataFrame) -> pl.DataFrame:
    return f.select("run", "dimension", "key", pl.col("bucket_order").cast(pl.Int64), "value", pl.lit(0, dtype=pl.Int64).alias("attribute_order"))


def _finish(buckets: pl.DataFrame, totals: pl.DataFrame, sort: bool = True) -> pl.DataFrame:
    out = join_runs(buckets, totals.select("run", "divisor"))
    out = out.with_columns((pl.col("value") / pl.col("divisor")).alias("weight")).drop("divisor")
    return out.sort("run", "dimension", "attribute_order", "bucket_order") if sort else out
