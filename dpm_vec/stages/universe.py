"""Universe construction (spec §6.3): which instruments may be bought, sold, or are locked.

The output is the ordered weight map as a frame: one row per instrument that the target
stage may weigh, with its ``kind``:

* BUYABLE — approved (or restricted with allow_restricted) model target;
* SELL_ONLY — SELL_ONLY model target, weight 0, its model weight to redistribute;
* LOCKED — held instrument that may not be traded, kept at its before-state weight;
* LIQUIDATION — held off-model (or model-excluded) approved/sell-only instrument, target 0
  (and a held BANNED one under the RFC's ``held_banned_action`` LIQUIDATE, a held
  RESTRICTED one under ``allow_restricted`` with the RFC's ``allow_restricted_holdings``).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from dpm_vec import dec28 as f28
from dpm_vec.frames import join_on_index, join_runs, rows_where, sort_rows
from dpm_vec.numeric import DEC, DEC_RANGE, HAIR, WEIGHT, WEIGHT_RANGE, as_f64, lit, name_weight_sums_beyond_range
from dpm_vec.stages import dq
from dpm_vec.stages.cash28 import cash_amounts_f28
from dpm_vec.stages.prepare import Market

LOOP2_OFFSET = 1 << 40  # map order of held-position entries: after every model target
# statuses RFC Step 2's price check gives under stale_price_action EXCLUDE (a reason code as they are)
PRICE_EXCLUSIONS = ("PRICE_STALE", "PRICE_MISSING")
# RFC Appendix A: a model target without a shelf entry, under missing_shelf_action EXCLUDE
SHELF_ENTRY_MISSING = "SHELF_ENTRY_MISSING"


@dataclass(frozen=True)
class Universe:
    weight_map: pl.DataFrame  # run, instrument_id, map_order, kind, weight, slot
    excluded: pl.DataFrame  # run, instrument_id, reason_code, excl_order
    eligible: pl.DataFrame  # run, list (buy|sell), instrument_id, list_order
    sell_only_excess: pl.DataFrame  # run, sell_only_excess
    dq: pl.DataFrame
    exact: ExactLocked | None = None  # given totals and cash: locked weights in 28 digits
    locked: pl.DataFrame | None = None  # given totals and cash: run, slot, _base_f, map_weight of every locked holding


@dataclass(frozen=True)
class ExactLocked:
    """Locked weights and their runs' tv as the reference computes them (F28). The weight
    map keeps them in Decimal(38, 28), which drops the 29th decimal of a weight below 0.1;
    trade sizing at an integer boundary needs every digit."""
    weights: pl.DataFrame  # slot, weight_f28
    totals: pl.DataFrame  # run, total_f28


def build_universe(
    market: Market, runs: pl.DataFrame, model: pl.DataFrame, positions_before: pl.DataFrame, price_excluded: pl.DataFrame,
    totals: pl.DataFrame | None = None, cash_before: pl.DataFrame | None = None,
) -> Universe:
    """Loop 1 over model targets, loop 2 over held positions, as columnar passes.

    ``price_excluded`` (run, instrument_id, reason) lists instruments whose price is too old or
    missing under the RFC's exclude mode: they are treated like a SUSPENDED instrument (not
    bought; held ones locked), reason PRICE_STALE or PRICE_MISSING. A model target without a
    shelf entry is a shelf_missing finding, or under the RFC's ``missing_shelf_action``
    EXCLUDE an exclusion (SHELF_ENTRY_MISSING) treated like a BANNED target (held: also
    locked, as any held instrument without a shelf entry). A held BANNED instrument is
    locked as in the reference, or under the RFC's ``held_banned_action`` LIQUIDATE sold to
    0 like an off-model APPROVED one (a BANNED model target is still excluded as
    SHELF_STATUS_BANNED; a price the RFC's exclude mode took out keeps it locked). A held
    RESTRICTED instrument outside the model is locked as in the reference, or, where both
    ``allow_restricted`` and the RFC's ``allow_restricted_holdings`` hold, sold to 0 the
    same way. With the before-state
    ``totals`` and valued ``cash_before``, locked weights are recomputed in 28 digits as the
    reference computes them; without them they are the before-state weights.
    """
    policy = runs.select("run", "allow_restricted", (pl.col("missing_shelf_action") == "EXCLUDE").alias("_exclude_unshelved"))
    price_flags = price_excluded.rename({"reason": "_price_check"})
    m = market.with_shelf(join_runs(model, policy), ("status",))
    m = _price_check_as_status(m, price_flags)
    buyable = (pl.col("status") == "APPROVED") | ((pl.col("status") == "RESTRICTED") & pl.col("allow_restricted"))
    m = m.with_columns(
        pl.when(pl.col("status").is_null()).then(pl.when(pl.col("_exclude_unshelved")).then(pl.lit("EXCLUDED")))
        .when(buyable).then(pl.lit("BUYABLE"))
        .when(pl.col("status") == "SELL_ONLY").then(pl.lit("SELL_ONLY"))
        .otherwise(pl.lit("EXCLUDED")).alias("kind"),
    )
    price_check = pl.col("status").is_in(PRICE_EXCLUSIONS)
    reason = (pl.when(pl.col("status").is_null()).then(pl.lit(SHELF_ENTRY_MISSING))
              .when(price_check).then(pl.col("status")).otherwise(pl.lit("SHELF_STATUS_") + pl.col("status")))
    shelf_missing = dq.findings(m, pl.col("status").is_null() & ~pl.col("_exclude_unshelved"), "shelf_missing", pl.col("instrument_id"), dq.UNIVERSE, pl.col("model_seq"))
    loop1_excluded = m.filter(pl.col("kind").is_in(["EXCLUDED", "SELL_ONLY"])).select(
        "run", "instrument_id", reason.alias("reason_code"),
        pl.col("model_seq").cast(pl.Int64).alias("excl_order"),
    )
    in_map1 = m.filter(pl.col("kind").is_in(["BUYABLE", "SELL_ONLY"]))
    sell_only_excess = (
        in_map1.filter(pl.col("kind") == "SELL_ONLY").group_by("run").agg(pl.col("model_weight").sum().alias("sell_only_excess"))
    )
    # duplicate model rows are rejected upstream, so one map entry per model target
    map1 = in_map1.select(
        "run", "instrument_id", pl.col("model_seq").cast(pl.Int64).alias("map_order"), "kind",
        pl.when(pl.col("kind") == "BUYABLE").then(pl.col("model_weight")).otherwise(lit(0)).alias("weight"), "slot",
    )
    # a held instrument that is a map entry already shares its slot with that model row
    held = rows_where(positions_before, (pl.col("quantity") != 0) & ~pl.col("slot").is_in(map1["slot"].implode()),
                      "run", "pos_seq", "instrument_id", "weight", "slot")
    held = market.with_shelf(held, ("status",))
    held = _price_check_as_status(held, price_flags)
    locked = pl.col("status").is_null() | pl.col("status").is_in(["SUSPENDED", "BANNED", "RESTRICTED", *PRICE_EXCLUSIONS])
    # the RFC's holdings sold to 0 instead of locked: BANNED under held_banned_action LIQUIDATE
    # (RFC-0002), RESTRICTED under allow_restricted with allow_restricted_holdings (RFC Step 2
    # over "model and holdings")
    for status, sold in (("BANNED", pl.col("held_banned_action") == "LIQUIDATE"),
                         ("RESTRICTED", pl.col("allow_restricted") & pl.col("allow_restricted_holdings"))):
        sold_runs = runs.filter(sold)["run"]
        if sold_runs.len():
            locked = locked & ~(pl.col("status").eq_missing(status) & pl.col("run").is_in(sold_runs.implode()))
    map2 = held.select(
        "run", "instrument_id", (pl.col("pos_seq").cast(pl.Int64) + LOOP2_OFFSET).alias("map_order"),
        pl.when(locked).then(pl.lit("LOCKED")).otherwise(pl.lit("LIQUIDATION")).alias("kind"),
        pl.when(locked).then(pl.col("weight")).otherwise(lit(0)).cast(DEC).alias("weight"), "slot",
    )
    loop2_excluded = held.filter(locked).select(
        "run", "instrument_id",
        pl.when(price_check).then(pl.col("status"))
        .otherwise(pl.lit("LOCKED_DUE_TO_") + pl.col("status").fill_null("MISSING_SHELF")).alias("reason_code"),
        (pl.col("pos_seq").cast(pl.Int64) + LOOP2_OFFSET).alias("excl_order"),
    )
    exact, locked_base = None, None
    if totals is not None and cash_before is not None:
        map2, exact, locked_base = _exact_locked_weights(market, runs, map2, positions_before, totals, cash_before,
                                                         m.filter(pl.col("kind") == "EXCLUDED").select("slot", "model_weight"))
    # unordered: the target stage orders the map by (run, map_order)
    weight_map = pl.concat([map1.with_columns(pl.col("weight").cast(WEIGHT)), map2.with_columns(pl.col("weight").cast(WEIGHT))])
    eligible = pl.concat([
        map1.filter(pl.col("kind") == "BUYABLE").select("run", pl.lit("buy").alias("list"), "instrument_id", pl.col("map_order").alias("list_order")),
        map1.select("run", pl.lit("sell").alias("list"), "instrument_id", pl.col("map_order").alias("list_order")),
        map2.filter(pl.col("kind") == "LIQUIDATION").select("run", pl.lit("sell").alias("list"), "instrument_id", pl.col("map_order").alias("list_order")),
    ])  # unordered: only the JSON door prints these lists, in list_order
    return Universe(
        weight_map=weight_map,
        excluded=pl.concat([loop1_excluded, loop2_excluded]).pipe(sort_rows, "run", "excl_order"),
        eligible=eligible,
        sell_only_excess=sell_only_excess,
        dq=shelf_missing,
        exact=exact,
        locked=locked_base,
    )


def _price_check_as_status(frame: pl.DataFrame, price_flags: pl.DataFrame) -> pl.DataFrame:
    """A shelved instrument whose price is too old or missing (exclude mode) reads as
    status PRICE_STALE or PRICE_MISSING; an unshelved one stays unshelved (a shelf_missing
    finding)."""
    if price_flags.height == 0:  # the usual case: no stale or missing prices, or stale_price_action BLOCK
        return frame
    return frame.join(price_flags, on=["run", "instrument_id"], how="left").with_columns(
        pl.when(pl.col("_price_check").is_not_null() & pl.col("status").is_not_null()).then(pl.col("_price_check")).otherwise(pl.col("status")).alias("status")
    )


def _exact_locked_weights(market: Market, runs: pl.DataFrame, map2: pl.DataFrame, positions: pl.DataFrame,
                          totals: pl.DataFrame, cash: pl.DataFrame,
                          excluded_targets: pl.DataFrame) -> tuple[pl.DataFrame, ExactLocked | None, pl.DataFrame | None]:
    """A locked position keeps its before-state weight, value_base / tv, which the reference
    computes in 28 digits; recompute it that way (F28) so the locked target lands where the
    reference's does. Over the fixed-point tv that is right to ~1e-20; where the last digit
    can decide (``_LAST_DIGIT_RUNS``), tv is summed in 28 digits too: a lone locked holding
    then weighs exactly 1, and the buyable weights scaled to the room it leaves are exactly
    0, not dust that the single-position cap would hand its excess to; a locked weight at
    the single-position cap to within 1e-12 has excess (and the status that follows) by
    the last digit; and a locked model target (``excluded_targets``: slot, model_weight)
    at its model weight to within 1e-12 is tagged by the last digit (§6.5:
    REDISTRIBUTED_RECIPIENT, CAPPED_BY_MAX_WEIGHT or neither)."""
    locked = map2.filter(pl.col("kind") == "LOCKED")
    if locked.height == 0:
        return map2.with_columns(pl.col("weight").cast(WEIGHT)), None, None
    bases = runs.select("run", "base_currency")
    # every locked entry is a held position (map2 is built from them): inner is left here
    locked = join_on_index(locked.select("run", "slot"), positions.select("slot", "value_instr", "instrument_currency", "market_value", "price"),
                           "slot", how="inner")
    locked = base_value_f28(market, join_runs(locked, bases))
    locked = f28.from_dec(join_runs(locked, totals.select("run", "divisor")), "divisor", "_divisor_f")
    locked = f28.div(locked, "_base_f", "_divisor_f", "_weight_f")
    _name_locked_weights_beyond_range(locked, runs)
    last_digit = locked.filter(~f28.is_null("_rate_f")).group_by("run").agg(_LAST_DIGIT_RUNS).filter(pl.col("_last_digit")).select("run")
    near = lit(HAIR)
    at_cap = join_runs(locked.select("run", "_weight_f"), runs.select("run", "single_position_max_weight"), how="inner").filter(
        (f28.to_d28("_weight_f") - pl.col("single_position_max_weight")).abs() < near
    )
    last_digit = pl.concat([last_digit, at_cap.select("run")])
    if excluded_targets.height:
        at_model = join_on_index(locked.select("run", "slot", "_weight_f"), excluded_targets, "slot", how="inner").filter(
            (f28.to_d28("_weight_f") - pl.col("model_weight")).abs() < near
        )
        last_digit = pl.concat([last_digit, at_model.select("run")])
    last_digit = last_digit.unique()
    exact = None
    if last_digit.height:
        chosen = bases.join(last_digit, on="run", how="semi")
        _, tv = valued_in_28_digits(market, chosen, positions, cash)
        redo = f28.div(join_runs(locked.join(chosen, on="run", how="semi").drop("_divisor_f"), tv.drop("_tv_f")), "_base_f", "_divisor_f", "_weight_f")
        _name_locked_weights_beyond_range(redo, runs)
        locked = pl.concat([locked.join(chosen, on="run", how="anti"), redo.select(locked.columns)])
        exact = ExactLocked(
            weights=redo.filter(~f28.is_null("_rate_f")).select("slot", pl.col("_weight_f").alias("weight_f28")),
            totals=tv.select("run", pl.col("_tv_f").alias("total_f28")),
        )
    locked = locked.filter(~f28.is_null("_rate_f")).with_columns(f28.to_d28("_weight_f").alias("_exact"))
    map2 = join_on_index(map2.with_columns(pl.col("weight").cast(WEIGHT)), locked.select("slot", "_exact"), "slot").with_columns(
        pl.when(pl.col("kind") == "LOCKED").then(pl.col("_exact").fill_null(pl.lit(0, dtype=WEIGHT))).otherwise(pl.col("weight")).alias("weight")
    ).drop("_exact")
    return map2, exact, locked.select("run", "slot", "_base_f", pl.col("_exact").alias("map_weight"))


def _name_locked_weights_beyond_range(locked: pl.DataFrame, runs: pl.DataFrame) -> None:
    """Name the runs whose locked weights (``_weight_f``) add up to beyond what the target
    stage's weights hold: a holding's value over a total near zero, where negative cash
    cancels the holdings, weighs 1e11 where the total is 1e-7 of it."""
    largest = locked.select(f28.exponent("_weight_f").max()).item()
    if largest is None or locked.height * 10.0**largest < WEIGHT_RANGE:
        return
    name_weight_sums_beyond_range(locked, runs, f28.to_f64("_weight_f").abs(),
                                  pl.lit("the sum of the portfolio's locked weights (its locked holdings' values over its total value)"))


# Runs whose locked weights need tv's last digit: locked weights that fill the portfolio
# (step 3's room 1 − L is then 0 or dust), or a locked holding whose market_value is a
# whole number of its price (0.00 above all): sizing reads the market value instead of
# quantity × price (spec §8), so the target lies exactly that many units away. Elsewhere
# the fixed-point tv decides nothing, and revaluing every holding in 28 digits to sum
# them is not worth its time. A count of units beyond DEC's range (a price near zero) is no
# whole number the fixed point could hold: left null rather than overflowing the division.
_UNITS_OF_PRICE = pl.col("market_value") / pl.when(
    (pl.col("price") != 0) & ((as_f64("market_value") / as_f64("price")).abs() < DEC_RANGE)
).then(pl.col("price"))
_LAST_DIGIT_RUNS = (
    ((f28.to_d28("_weight_f").sum() - lit(1)).abs() < lit(HAIR))
    | ((_UNITS_OF_PRICE - _UNITS_OF_PRICE.round(0)).abs() < lit("0.000000001")).any()
).alias("_last_digit")


def base_value_f28(market: Market, held: pl.DataFrame) -> pl.DataFrame:
    """Positions' value_base = value_instr × rate in 28 digits (``_base_f``; 0 without a
    rate, whose ``_rate_f`` is then null). An after-state position whose quantity a
    tax-limited sell left with 28 significant digits (``quantity_f28``) is valued from
    them, quantity × price as the reference multiplies (§6.2), not from its 20-decimal
    value_instr."""
    held = market.with_rate_f28(held, "instrument_currency", "base_currency", "_rate_f")
    held = f28.from_dec(held, "value_instr", "_value_f")
    if "quantity_f28" in held.columns and held.select((~f28.is_null("quantity_f28")).any()).item():
        exact = f28.from_dec(held.select("quantity_f28", pl.col("price").fill_null(lit(0)).alias("_price")), "_price", "_price_f")
        exact = f28.mul(exact, "quantity_f28", "_price_f", "_value_f")
        held = held.with_columns(
            pl.when(~f28.is_null("quantity_f28")).then(exact.get_column("_value_f")).otherwise(pl.col("_value_f")).alias("_value_f")
        )
    held = f28.mul(held, "_value_f", "_rate_f", "_base_f")
    return held.with_columns(pl.when(f28.is_null("_rate_f")).then(f28.zero()).otherwise(pl.col("_base_f")).alias("_base_f"))


def valued_in_28_digits(market: Market, bases: pl.DataFrame, positions: pl.DataFrame,
                        cash: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(held, tv): the valued ``positions`` of ``bases`` (run, base_currency) with their
    28-digit value_base (``base_value_f28``), and ``exact_total`` over them and ``cash``."""
    held = base_value_f28(market, join_runs(positions.join(bases, on="run", how="semi"), bases))
    return held, exact_total(market, bases, held, cash)


def exact_total(market: Market, bases: pl.DataFrame, held: pl.DataFrame, cash: pl.DataFrame) -> pl.DataFrame:
    """(run, _tv_f, _divisor_f, _cash_f): §6.2's tv and T in 28 digits, and Σ cash in base
    (``_cash_f``, the CASH bucket). tv is one running sum, left to right over the positions'
    value_base and then the cash rows in input order, as the reference's after-state totals
    show (summing positions and cash apart and adding the two moves the 28th digit in 12 of
    the 418 golden after-states); T is 1 where tv is 0. ``held`` carries the positions' F28
    ``_base_f``; cash without a rate counts 0, and a cash row's F28 ``_amount_f``, where it
    has one, stands for its amount."""
    cash = market.with_rate_f28(join_runs(cash.join(bases, on="run", how="semi"), bases), "currency", "base_currency", "_rate_f")
    given = cash.get_column("_amount_f") if "_amount_f" in cash.columns else None
    cash = cash_amounts_f28(cash, "_amount_f")
    if given is not None:
        cash = cash.with_columns(given.alias("_given_f")).with_columns(f28.coalesce("_given_f", "_amount_f").alias("_amount_f"))
    cash = f28.mul(cash, "_amount_f", "_rate_f", "_base_f")
    cash = cash.with_columns(
        pl.when(pl.col("currency") == pl.col("base_currency")).then(pl.col("_amount_f"))
        .when(f28.is_null("_rate_f")).then(f28.zero()).otherwise(pl.col("_base_f")).alias("_base_f")
    )
    values = pl.concat([
        held.select("run", pl.lit(0, dtype=pl.UInt8).alias("_part"), pl.col("pos_seq").cast(pl.Int64).alias("_seq"), "_base_f"),
        cash.select("run", pl.lit(1, dtype=pl.UInt8).alias("_part"), pl.col("cash_seq").cast(pl.Int64).alias("_seq"), "_base_f"),
    ])
    tv = (
        bases.select("run")
        .join(f28.group_sums(sort_rows(values, "run", "_part", "_seq"), "run", "_base_f", "_tv_f"), on="run", how="left")
        .join(f28.group_sums(sort_rows(cash, "run", "cash_seq"), "run", "_base_f", "_cash_f"), on="run", how="left")
        .with_columns(f28.fill_null("_tv_f", f28.zero()), f28.fill_null("_cash_f", f28.zero()))  # a run without positions or cash sums 0
    )
    return tv.select("run", "_tv_f", pl.when(f28.sign("_tv_f") == 0).then(f28.one()).otherwise(pl.col("_tv_f")).alias("_divisor_f"),
                     "_cash_f")


def exact_cash_bucket(held: pl.DataFrame, tv: pl.DataFrame) -> pl.DataFrame:
    """(run, _bucket_f): §6.2's CASH bucket in 28 digits, Σ cash in base (``tv``'s
    ``_cash_f``) added to the running sum, in position order, of the positions whose shelf
    asset class is literally CASH (zero where there are none): by_class["CASH"] + Σ cash,
    the order the oracle adds them in. ``held`` carries the positions' F28 ``_base_f``."""
    literal = sort_rows(held.filter(pl.col("asset_class") == "CASH"), "run", "pos_seq")
    bucket = tv.select("run", "_cash_f").join(
        f28.group_sums(literal, "run", "_base_f", "_sum_f"), on="run", how="left",
    ).with_columns(f28.fill_null("_sum_f", f28.zero()))
    return f28.add(bucket, "_sum_f", "_cash_f", "_bucket_f").select("run", "_bucket_f")
