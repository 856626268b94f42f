"""After-state (§6.16), rule engine (§6.17), reconciliation (§6.18) and gate (§6.20).

Rules are pure expressions over per-run aggregates; every rule is evaluated for every run
and the results collected into one table, never stopping at the first breach.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from dpm_vec import dec28
from dpm_vec.frames import concat_by_run, join_on_index, join_runs, put_rows, rows_where, sort_rows
from dpm_vec.numeric import DEC, HAIR, dabs, lit, units_text
from dpm_vec.stages.cash28 import DUST, account_sums, exact_flows, fx_margins, inexact_fx_runs, long_cash, movements, wide_at_edge
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.universe import exact_cash_bucket, valued_in_28_digits

SAFETY_ORDER = 600_000_000  # warning order: after every earlier stage (see targets.TARGET_STAGE_ORDER)
APPENDED = 1 << 50  # order of positions / cash rows the after-state appends

RULE_SCHEMA = {
    "run": pl.UInt32, "rule_order": pl.Int64, "rule_id": pl.String, "severity": pl.String, "status": pl.String,
    "measured": DEC, "threshold_min": DEC, "threshold_max": DEC, "reason_code": pl.String, "remediation_hint": pl.String,
    "detail": pl.String,  # dpm_vec's: what failed, named (null on PASS); the JSON door does not print it
}


_SECURITY_MOVES = (
    "intent_type", "run", "instrument_id", "side", "quantity", "quantity_f28", "exec_order", "notional", "notional_currency", "slot",
)
_FX_MOVES = ("intent_type", "run", "exec_order", "buy_currency", "buy_amount", "sell_currency", "sell_amount_estimated")


def apply_intents(positions: pl.DataFrame, cash: pl.DataFrame, intents: pl.DataFrame, runs: pl.DataFrame):
    """Apply the intents of ``runs`` in execution order to their input holdings; the rows
    of other runs in ``positions`` and ``cash`` come back as they were. New rows get
    sequence numbers after the held ones, in the order they are first touched. Positions
    come back in (run, sequence) order when the held ones came in it; cash rows unordered
    (valuation orders what is not)."""
    of_runs = pl.col("run").is_in(runs["run"].implode())
    # every digit of a notional-sized quantity below 0.1 unit (rare: looked at only where a
    # shard has one), or of a tax-limited sell's
    small_notional = "quantity_sig" in intents.columns and not intents.select(dec28.is_null("quantity_sig").all()).item()
    exact_quantity = dec28.coalesce("quantity_sig", "quantity_f28") if small_notional else pl.col("quantity_f28")
    sec = rows_where(intents, (pl.col("intent_type") == "SECURITY_TRADE") & of_runs, *_SECURITY_MOVES,
                     *(["quantity_sig"] if small_notional else []))
    # one security intent per (run, instrument): trace instruments are unique in a run
    qty_moves = sec.select(
        "run", "instrument_id", "slot",
        pl.when(pl.col("side") == "BUY").then(pl.col("quantity")).otherwise(-pl.col("quantity")).alias("_dq"),
        pl.col("exec_order").alias("_first"), pl.col("side").alias("_side"), exact_quantity.alias("_f28"),
    )
    # where each move lands: the held row it changes (_row), or none (a new position); the
    # held rows are then updated in place by row number, so they keep their (run, pos_seq) order
    landing = join_on_index(qty_moves, positions.select("slot").with_row_index("_row"), "slot")
    onto_held = landing.filter(pl.col("_row").is_not_null())
    moved = pl.repeat(lit(0), positions.height, eager=True).cast(positions.schema["quantity"])
    pos = positions.with_columns(
        (pl.col("quantity") + moved.scatter(onto_held["_row"], onto_held["_dq"])).alias("quantity"),
        pl.lit(None, dtype=dec28.F28).alias("quantity_f28"),
        pl.col("pos_seq").cast(pl.Int64),
    )
    # tax-limited sells and small notional-sized trades carry 28-digit quantities: applied as
    # the reference applies them, one 28-digit rounding
    exact = onto_held.filter(~dec28.is_null("_f28"))
    if exact.height:
        exact = exact.with_columns(
            positions["quantity"].gather(exact["_row"]).alias("_held"),
            pl.when(pl.col("_side") == "BUY").then(pl.col("_f28")).otherwise(dec28.negate("_f28")).alias("_f28"),
        )
        exact = dec28.add(dec28.from_dec(exact, "_held", "_held_f"), "_held_f", "_f28", "_exact_f28")
        pos = put_rows(pos, exact["_row"], exact.select(dec28.to_d28("_exact_f28").alias("quantity")))
        pos = dec28.scatter(pos, "quantity_f28", exact["_row"], exact["_exact_f28"])
    new_pos = landing.filter(pl.col("_row").is_null()).select(
        "run", (pl.lit(APPENDED, dtype=pl.Int64) + pl.col("_first")).alias("pos_seq"), "instrument_id",
        pl.col("_dq").alias("quantity"), pl.col("_f28").alias("quantity_f28"), "slot",
    ).pipe(sort_rows, "run", "pos_seq")
    # appended rows follow a run's held ones: merged by run, the rows are in (run, pos_seq) order
    pos = concat_by_run([pos, pl.concat([pos.head(0), new_pos], how="diagonal_relaxed")])
    fx = rows_where(intents, (pl.col("intent_type") == "FX_SPOT") & of_runs, *_FX_MOVES)
    cash_moves = pl.concat([
        sec.select("run", pl.col("notional_currency").alias("currency"),
                   pl.when(pl.col("side") == "BUY").then(-pl.col("notional")).otherwise(pl.col("notional")).alias("_move"),
                   (pl.col("exec_order") * 2).alias("_touch")),
        fx.select("run", pl.col("sell_currency").alias("currency"), (-pl.col("sell_amount_estimated")).alias("_move"),
                  (pl.col("exec_order") * 2).alias("_touch")),
        fx.select("run", pl.col("buy_currency").alias("currency"), pl.col("buy_amount").alias("_move"),
                  (pl.col("exec_order") * 2 + 1).alias("_touch")),
    ]).group_by("run", "currency").agg(pl.col("_move").sum(), pl.col("_touch").min())
    cash_after = cash.join(cash_moves, on=["run", "currency"], how="left").with_columns(
        (pl.col("amount") + pl.col("_move").fill_null(lit(0))).alias("amount"),
        # a moved balance's 28 digits are exact_after_cash's sum, no longer the input's
        *([pl.when(pl.col("_move").is_null()).then(pl.col("amount_exact")).alias("amount_exact")] if "amount_exact" in cash.columns else []),
    ).drop("_move", "_touch")
    new_cash = cash_moves.join(cash.select("run", "currency"), on=["run", "currency"], how="anti").select(
        "run", (pl.lit(APPENDED, dtype=pl.Int64) + pl.col("_touch")).alias("cash_seq"), "currency", pl.col("_move").alias("amount"),
    )
    cash_after = pl.concat([cash_after.with_columns(pl.col("cash_seq").cast(pl.Int64)), new_cash], how="diagonal_relaxed")
    return pos, cash_after


def exact_cash_signs(market: Market, runs: pl.DataFrame, intents: pl.DataFrame, cash_input: pl.DataFrame,
                     cash_after: pl.DataFrame) -> pl.DataFrame:
    """(run, currency, _negative, _exact_amount): whether each after-state cash balance is
    negative as the reference sums it (§6.16: the input amount, then the intents'
    movements in execution order, each addition rounded to 28 digits), and for a balance
    at the edge that sum at the fixed point's scale, for the runs where a tax-limited sell's
    28-digit notional (``cash28``) can tip the sign of a balance within dust of 0: the
    fixed-point sum can be exactly 0 where the reference's is -1E-23, which fails
    INSUFFICIENT_CASH. That takes a balance in the sell's currency with a BUY there too
    (with sells only, the after-state adds them in the order FX planning summed them, and
    the SWEEP cancels the sum exactly; in a run with an ``fx_sweep_threshold`` a surplus
    may stay, so there the sell's currency alone), or the base currency, where FX amounts
    land; a balance that came with digits past 20 decimals (``cash28.long_cash``), and its
    run's base currency; a balance whose sum spans more than 28 digits, within its margin
    (``cash28.wide_sums``: -1E-16 plus a sale and a purchase of 1E+13 is 0 there, and
    READY), and its run's base currency within dust; and the base currency of runs whose
    FX amounts come from an inexact rate, which the fixed point can leave at -1E-17 (or,
    over a large amount, -1E-15) where the reference's sum is exactly 0
    (``cash28.fx_margins``)."""
    schema = {"run": pl.UInt32, "currency": pl.String, "_negative": pl.Boolean, "_exact_amount": DEC}
    limited = intents.filter(~dec28.is_null("quantity_f28")).select("run", pl.col("notional_currency").alias("currency")).unique()
    bought = intents.filter((pl.col("side") == "BUY") & pl.col("run").is_in(limited["run"].implode())).select(
        "run", pl.col("notional_currency").alias("currency"),
    ).unique()
    base_cash = runs.select("run", pl.col("base_currency").alias("currency"))
    thresholds = runs.filter(pl.col("fx_sweep_threshold").is_not_null()).select("run")
    fed_back = long_cash(cash_input)
    wide_edge, wide = wide_at_edge(cash_after, cash_input, intents, "amount")
    touched = pl.concat([
        limited.join(bought, on=["run", "currency"], how="semi"),
        limited.join(thresholds, on="run", how="semi"),
        base_cash.join(limited.select("run").unique(), on="run", how="semi"),
        fed_back, base_cash.join(fed_back.select("run").unique(), on="run", how="semi"),
        base_cash.join(wide.select("run").unique(), on="run", how="semi"),
    ])
    near = pl.concat([
        cash_after.filter(pl.col("amount").abs() < lit(DUST)).join(touched, on=["run", "currency"], how="semi").select("run", "currency"),
        wide_edge,
    ])
    # an FX intent's base amount over an inexact rate (cash28.inexact_fx_runs) lands in the base currency
    base_near = cash_after.join(base_cash, on=["run", "currency"], how="semi").join(fx_margins(intents), on="run", how="inner").filter(
        pl.col("amount").abs() <= pl.col("_margin")
    )
    inexact = inexact_fx_runs(market, intents.join(base_near.select("run").unique(), on="run", how="semi"))
    at_edge = pl.concat([near.select("run", "currency"), base_near.join(inexact, on="run", how="semi").select("run", "currency")]).unique()
    chosen = runs.join(at_edge.select("run").unique(), on="run", how="semi")
    if chosen.height == 0:
        return pl.DataFrame(schema=schema)
    # the 28-digit sum stands in for the balance only at the edge: elsewhere the two agree to far below a cent
    return exact_after_cash(market, chosen, intents, cash_input).join(
        at_edge.with_columns(pl.lit(True).alias("_at_edge")), on=["run", "currency"], how="left",
    ).select(
        "run", "currency", (dec28.sign("_amount_f") < 0).alias("_negative"),
        pl.when(pl.col("_at_edge")).then(dec28.to_dec("_amount_f")).alias("_exact_amount"),
    )


def exact_after_cash(market: Market, runs: pl.DataFrame, intents: pl.DataFrame, cash_input: pl.DataFrame) -> pl.DataFrame:
    """(run, currency, _amount_f): the after-state cash balances of ``runs`` (run,
    fx_buffer_pct) as the reference sums them (§6.16): the input amount, then the intents'
    movements in execution order (FX amounts over 28-digit rates), each addition rounded
    to 28 digits."""
    intents = intents.filter(pl.col("run").is_in(runs["run"].implode()))
    sec = intents.filter(pl.col("intent_type") == "SECURITY_TRADE").select(
        "run", "exec_order", "instrument_id", "side", "notional", "notional_currency", "quantity_f28", "list_order",
    )
    flows = exact_flows(market, runs.select("run", "fx_buffer_pct"), intents, sec, cash_input)
    return account_sums(movements(flows, pl.lit(1 << 40) + 2 * pl.col("exec_order")), "_amount_f")


def with_exact_amounts(cash_after: pl.DataFrame, cash_signs: pl.DataFrame) -> pl.DataFrame:
    """``cash_after`` with each balance that ``exact_cash_signs`` found at the edge (within
    dust of 0) taken from the 28-digit sum, rounded to the fixed point: where the
    reference's balance is exactly 0 the after-state shows 0, not the fixed point's -5E-17."""
    if cash_signs.height == 0:
        return cash_after
    return cash_after.join(cash_signs.select("run", "currency", "_exact_amount"), on=["run", "currency"], how="left",
                           maintain_order="left").with_columns(pl.coalesce("_exact_amount", "amount").alias("amount")).drop("_exact_amount")


def evaluate_rules(runs: pl.DataFrame, positions: pl.DataFrame, cash: pl.DataFrame, allocations: pl.DataFrame,
                   dq_counts: pl.DataFrame, suppressed_counts: pl.DataFrame, cash_signs: pl.DataFrame | None = None,
                   market: Market | None = None, exact_cash: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
                   dq_detail: pl.DataFrame | None = None, totals: pl.DataFrame | None = None) -> pl.DataFrame:
    """The six core rules for each run of ``runs`` on the given state (§6.17); ``cash_signs``
    (``exact_cash_signs``) decides which cash balances are negative where it has a row;
    ``dq_detail`` (``dq.missing_detail``) is a failed DATA_QUALITY rule's detail.
    With ``market``, a cash weight or position weight within a hair (1e-12) of its band or cap is
    measured again in 28 digits (``_exact_weight_breaches``), over the cash balances
    ``exact_cash`` gives for those runs (run, currency, _amount_f; an after-state's
    ``exact_after_cash``) or else over the state's own; so is every weight of a run whose
    ``totals`` (run, total_value) are 0 (weights divided by 1), where the 28-digit total
    may be a few units of its last digit."""
    cash_weight = allocations.filter((pl.col("dimension") == "asset_class") & (pl.col("key") == "CASH")).select("run", pl.col("weight").alias("_cash_w"))
    pos_stats = positions.group_by("run").agg(
        pl.col("quantity").filter(pl.col("quantity") < 0).min().alias("_min_qty"),
    )
    # a position's weight is its instrument bucket's: value_base / divisor, computed once in valuation
    inst = positions.select("run", pl.col("instrument_id").alias("key"), pl.col("pos_seq").cast(pl.Int64).alias("bucket_order"), "weight")
    max_w = inst.group_by("run").agg(pl.col("weight").max().alias("_max_w"))
    negative = pl.col("amount") < 0
    if cash_signs is not None and cash_signs.height:
        cash = cash.join(cash_signs.select("run", "currency", "_negative"), on=["run", "currency"], how="left", maintain_order="left")
        negative = pl.coalesce("_negative", negative)
    cash_stats = cash.group_by("run").agg(pl.col("amount").filter(negative).min().alias("_min_cash"))
    if dq_detail is None:
        dq_detail = pl.DataFrame(schema={"run": pl.UInt32, "dq_detail": pl.String})
    shorts = _texts_by_run(positions.filter(pl.col("quantity") < 0), "pos_seq", pl.format("{} at {}", "instrument_id", units_text("quantity")), "_shorts")
    overdrawn = _texts_by_run(cash.filter(negative), "cash_seq", pl.format("{} at {}", "currency", units_text("amount")), "_overdrawn")
    r = (
        runs.select("run", "cash_band_min_weight", "cash_band_max_weight", "single_position_max_weight")
        .join(cash_weight, on="run", how="left").join(pos_stats, on="run", how="left").join(max_w, on="run", how="left")
        .join(cash_stats, on="run", how="left").join(dq_counts.select("run", "dq_count"), on="run", how="left")
        .join(dq_detail, on="run", how="left")
        .join(shorts, on="run", how="left").join(overdrawn, on="run", how="left")
        .join(suppressed_counts, on="run", how="left")
        .with_columns(
            pl.col("_cash_w").fill_null(lit(0)), pl.col("dq_count").fill_null(0), pl.col("n_suppressed").fill_null(0),
        )
    )

    def rule(order, rule_id, severity, fail, measured, tmin, tmax, reason_fail, reason_pass, hint, detail=None):
        judged = r.with_columns(fail.alias("_fail"))

        def rows(frame: pl.DataFrame, text: pl.Expr) -> pl.DataFrame:
            failed = pl.col("_fail")
            return frame.select(
                "run", pl.lit(order, dtype=pl.Int64).alias("rule_order"), pl.lit(rule_id).alias("rule_id"),
                pl.lit(severity).alias("severity"),
                pl.when(failed).then(pl.lit("FAIL")).otherwise(pl.lit("PASS")).alias("status"),
                measured.cast(DEC).alias("measured"), tmin.cast(DEC).alias("threshold_min"), tmax.cast(DEC).alias("threshold_max"),
                pl.when(failed).then(pl.lit(reason_fail)).otherwise(reason_pass).alias("reason_code"),
                pl.when(failed).then(pl.lit(hint)).otherwise(pl.lit(None, dtype=pl.String)).alias("remediation_hint"),
                text.cast(pl.String).alias("detail"),
            )

        nothing = pl.lit(None, dtype=pl.String)
        if detail is None:
            return rows(judged, nothing)
        # the detail's text is formatted for the failed rows only: most runs pass
        return pl.concat([rows(judged.filter(~pl.col("_fail")), nothing), rows(judged.filter("_fail"), detail)])

    none = pl.lit(None, dtype=DEC)
    m = pl.col("single_position_max_weight")
    band_fail = (pl.col("_cash_w") < pl.col("cash_band_min_weight")) | (pl.col("_cash_w") > pl.col("cash_band_max_weight"))
    over_cap = m.is_not_null() & (pl.col("weight") > m + lit("0.001"))
    weighed = join_runs(inst, runs.select("run", "single_position_max_weight"), how="inner")
    if market is not None:
        exact_band, exact_cap = _exact_weight_breaches(market, runs, positions, cash, r, weighed, exact_cash, totals)
        if exact_band.height:
            r = r.join(exact_band, on="run", how="left")
            band_fail = pl.coalesce("_band_fail", band_fail)
        if exact_cap.height:
            weighed = weighed.join(exact_cap, on=["run", "bucket_order"], how="left")
            over_cap = pl.coalesce("_over_cap", over_cap)
    cash_band = rule(
        0, "CASH_BAND", "SOFT", band_fail,
        pl.col("_cash_w"), pl.col("cash_band_min_weight"), pl.col("cash_band_max_weight"),
        "THRESHOLD_BREACH", pl.lit("OK"), "Portfolio cash is outside policy bands.",
        pl.format("cash weight {} outside the band {} to {}", *(units_text(c) for c in ("_cash_w", "cash_band_min_weight", "cash_band_max_weight"))),
    )
    breaches = weighed.filter(over_cap).pipe(sort_rows, "run", "bucket_order")
    spm_pass = r.join(breaches.select("run").unique(), on="run", how="anti").select(
        "run", pl.lit(1, dtype=pl.Int64).alias("rule_order"), pl.lit("SINGLE_POSITION_MAX").alias("rule_id"),
        pl.lit("HARD").alias("severity"), pl.lit("PASS").alias("status"),
        pl.when(m.is_null()).then(lit(0)).otherwise(pl.when(pl.col("_max_w") > 0).then(pl.col("_max_w")).otherwise(lit(0))).alias("measured"),
        none.alias("threshold_min"),
        pl.when(m.is_null()).then(lit(-1)).otherwise(m).alias("threshold_max"),
        pl.when(m.is_null()).then(pl.lit("NO_LIMIT_SET")).otherwise(pl.lit("OK")).alias("reason_code"),
        pl.lit(None, dtype=pl.String).alias("remediation_hint"), pl.lit(None, dtype=pl.String).alias("detail"),
    )
    spm_fail = (
        breaches.select(
            "run", pl.lit(1, dtype=pl.Int64).alias("rule_order"),
            pl.lit("SINGLE_POSITION_MAX").alias("rule_id"), pl.lit("HARD").alias("severity"), pl.lit("FAIL").alias("status"),
            pl.col("weight").alias("measured"), none.alias("threshold_min"), pl.col("single_position_max_weight").alias("threshold_max"),
            pl.lit("LIMIT_BREACH").alias("reason_code"),
            (pl.lit("Instrument ") + pl.col("key") + pl.lit(" exceeds max weight.")).alias("remediation_hint"),
            pl.format("{} at weight {} over the cap {}", "key", units_text("weight"), units_text("single_position_max_weight")).alias("detail"),
        )
    )
    data_quality = rule(2, "DATA_QUALITY", "HARD", pl.col("dq_count") > 0, pl.col("dq_count"), none, lit(0),
                        "MISSING_DATA", pl.lit("OK"), "Check diagnostics for missing prices/FX.", pl.col("dq_detail"))
    min_trade = rule(3, "MIN_TRADE_SIZE", "SOFT", pl.lit(False), pl.col("n_suppressed"), lit(0), none, "",
                     pl.when(pl.col("n_suppressed") > 0).then(pl.lit("INTENTS_SUPPRESSED")).otherwise(pl.lit("OK")), "")
    no_short = rule(4, "NO_SHORTING", "HARD", pl.col("_min_qty").is_not_null(), pl.col("_min_qty").fill_null(lit(0)), lit(0), none,
                    "SELL_EXCEEDS_HOLDINGS", pl.lit("OK"), "Reduce sell quantity.", "quantity below zero: " + pl.col("_shorts"))
    cash_rule = rule(5, "INSUFFICIENT_CASH", "HARD", pl.col("_min_cash").is_not_null(), pl.col("_min_cash").fill_null(lit(0)), lit(0), none,
                     "CASH_BALANCE_NEGATIVE", pl.lit("OK"), "Ensure sufficient funding.", "cash below zero: " + pl.col("_overdrawn"))
    out = pl.concat([cash_band, spm_pass, spm_fail, data_quality, min_trade, no_short, cash_rule], how="vertical_relaxed")
    return out.select([pl.col(c).cast(t) for c, t in RULE_SCHEMA.items()]).pipe(sort_rows, "run", "rule_order")


def _texts_by_run(rows: pl.DataFrame, order: str, item: pl.Expr, out: str) -> pl.DataFrame:
    """(run, ``out``): each run's ``item`` texts in ``order``, comma-separated."""
    return rows.sort("run", order).group_by("run", maintain_order=True).agg(item.str.join(", ").alias(out))


# within this of a band or cap, a fixed-point weight may fall on the other side in the
# reference's 28 digits (an inverse quote's 20-decimal rate moves a weight by up to ~1e-17)
WEIGHT_EPS = lit(HAIR)


def _exact_weight_breaches(market: Market, runs: pl.DataFrame, positions: pl.DataFrame, cash: pl.DataFrame,
                           r: pl.DataFrame, weighed: pl.DataFrame,
                           exact_cash: Callable[[pl.DataFrame], pl.DataFrame] | None,
                           totals: pl.DataFrame | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """((run, _band_fail), (run, bucket_order, _over_cap)) for the runs whose cash weight
    lies within ``WEIGHT_EPS`` of a CASH_BAND limit, or a position's weight within it of
    the SINGLE_POSITION_MAX cap + 0.001, and for those whose fixed-point total is 0 (or
    was taken as 0; 28 digits may leave a few units of the last digit to divide by, and
    weights of about 1e28 on either side of the cap): the weights measured
    as §6.2 measures them, value / T over tv summed in 28 digits, the cash weight over
    ``exact_cash_bucket`` (which adds the positions of a literal CASH asset class, where
    there are any)."""
    cap = pl.col("single_position_max_weight") + lit("0.001")
    near_band = r.filter(
        (dabs(pl.col("_cash_w") - pl.col("cash_band_min_weight")) <= WEIGHT_EPS)
        | (dabs(pl.col("_cash_w") - pl.col("cash_band_max_weight")) <= WEIGHT_EPS)
    ).select("run")
    near_cap = weighed.filter(pl.col("single_position_max_weight").is_not_null() & (dabs(pl.col("weight") - cap) <= WEIGHT_EPS))
    empty = pl.DataFrame(schema={"run": pl.UInt32, "_band_fail": pl.Boolean}), pl.DataFrame(
        schema={"run": pl.UInt32, "bucket_order": pl.Int64, "_over_cap": pl.Boolean})
    zero_total = [] if totals is None else [totals.filter(pl.col("total_value") == 0).select("run").join(runs, on="run", how="semi")]
    chosen = pl.concat([near_band, near_cap.select("run"), *zero_total]).unique()
    if chosen.height == 0:
        return empty
    held, tv = _valued_exactly(market, runs.join(chosen, on="run", how="semi"), positions, cash, exact_cash)
    tv = tv.select("run", "_divisor_f", "_cash_f")
    band = exact_cash_bucket(held, tv).join(tv, on="run").join(r.select("run", "cash_band_min_weight", "cash_band_max_weight"), on="run")
    band = dec28.div(band, "_bucket_f", "_divisor_f", "_w_f")
    band = dec28.from_dec(dec28.from_dec(band, "cash_band_min_weight", "_min_f"), "cash_band_max_weight", "_max_f")
    band = dec28.sub(dec28.sub(band, "_w_f", "_min_f", "_below_f"), "_w_f", "_max_f", "_above_f").select(
        "run", ((dec28.sign("_below_f") < 0) | (dec28.sign("_above_f") > 0)).alias("_band_fail"),
    )
    weights = held.select("run", pl.col("pos_seq").cast(pl.Int64).alias("bucket_order"), "_base_f").join(tv, on="run")
    weights = dec28.div(weights, "_base_f", "_divisor_f", "_w_f").join(
        weighed.select("run", "bucket_order", cap.alias("_cap")), on=["run", "bucket_order"], how="inner"
    ).filter(pl.col("_cap").is_not_null())
    weights = dec28.sub(dec28.from_dec(weights, "_cap", "_cap_f"), "_w_f", "_cap_f", "_excess_f")
    return band, weights.select("run", "bucket_order", (dec28.sign("_excess_f") > 0).alias("_over_cap"))


def _valued_exactly(market: Market, runs: pl.DataFrame, positions: pl.DataFrame, cash: pl.DataFrame,
                    exact_cash: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``valued_in_28_digits`` of a valued state's ``runs``, over the cash balances
    ``exact_cash`` sums for them (run, currency, _amount_f; ``exact_after_cash``) where given."""
    bases = runs.select("run", "base_currency")
    cash = cash.join(bases, on="run", how="semi")
    if exact_cash is not None:
        cash = cash.join(exact_cash(runs), on=["run", "currency"], how="left")
    return valued_in_28_digits(market, bases, positions, cash)


def reconcile(before_totals: pl.DataFrame, after_totals: pl.DataFrame,
              exact_totals: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> pl.DataFrame:
    """§6.18: after vs before total value with tolerance 0.5 + before × 0.0005. With
    ``exact_totals`` (``exact_reconciliation_totals`` for the runs given), a run whose
    |delta| lies within a hair of its tolerance is decided again as the reference decides
    it, delta and tolerance each taken in 28 digits: over an inverse quote a fixed-point
    total is off by up to ~1e-17 of itself, enough to fall on the other side."""
    recon = (
        before_totals.select("run", pl.col("total_value").alias("before_total_value"))
        .join(after_totals.select("run", pl.col("total_value").alias("after_total_value")), on="run")
        .with_columns(
            (pl.col("after_total_value") - pl.col("before_total_value")).alias("delta"),
            (lit("0.5") + pl.col("before_total_value") * lit("0.0005")).alias("tolerance"),
        )
        .with_columns(
            pl.when(dabs(pl.col("delta")) <= pl.col("tolerance")).then(pl.lit("OK")).otherwise(pl.lit("MISMATCH")).alias("reconciliation_status"),
        )
    )
    if exact_totals is None:
        return recon
    scale = dabs(pl.col("before_total_value")) + dabs(pl.col("after_total_value")) + lit(1)
    near = recon.filter(dabs(dabs(pl.col("delta")) - pl.col("tolerance")) <= lit(HAIR) * scale).select("run")
    if near.height == 0:
        return recon
    exact = exact_totals(near).with_columns(lit("0.5").alias("_half"), lit("0.0005").alias("_share"))
    exact = dec28.from_dec(dec28.from_dec(exact, "_half", "_half_f"), "_share", "_share_f")
    exact = dec28.add(dec28.mul(exact, "_before_f", "_share_f", "_part_f"), "_half_f", "_part_f", "_tol_f")
    exact = dec28.sub(exact, "_after_f", "_before_f", "_delta_f").with_columns(dec28.absolute("_delta_f").alias("_abs_f"))
    exact = dec28.sub(exact, "_abs_f", "_tol_f", "_over_f").select(
        "run", pl.when(dec28.sign("_over_f") <= 0).then(pl.lit("OK")).otherwise(pl.lit("MISMATCH")).alias("_exact_status"),
    )
    return recon.join(exact, on="run", how="left", maintain_order="left").with_columns(
        pl.coalesce("_exact_status", "reconciliation_status").alias("reconciliation_status"),
    ).drop("_exact_status")


def exact_reconciliation_totals(market: Market, runs: pl.DataFrame, before: tuple[pl.DataFrame, pl.DataFrame],
                                after: tuple[pl.DataFrame, pl.DataFrame],
                                exact_cash: Callable[[pl.DataFrame], pl.DataFrame]) -> pl.DataFrame:
    """(run, _before_f, _after_f): §6.2's tv of each of ``runs`` before and after, in 28
    digits, from (positions, cash) valued states; the after-state's cash balances as
    ``exact_cash`` sums them (run, currency, _amount_f; ``exact_after_cash``)."""
    _, tv_before = _valued_exactly(market, runs, *before)
    _, tv_after = _valued_exactly(market, runs, *after, exact_cash)
    return tv_before.select("run", pl.col("_tv_f").alias("_before_f")).join(
        tv_after.select("run", pl.col("_tv_f").alias("_after_f")), on="run")


def reconciliation_rule(recon: pl.DataFrame) -> pl.DataFrame:
    return recon.filter(pl.col("reconciliation_status") == "MISMATCH").select(
        "run", pl.lit(7, dtype=pl.Int64).alias("rule_order"), pl.lit("RECONCILIATION").alias("rule_id"),
        pl.lit("HARD").alias("severity"), pl.lit("FAIL").alias("status"), dabs(pl.col("delta")).alias("measured"),
        pl.lit(None, dtype=DEC).alias("threshold_min"), pl.col("tolerance").alias("threshold_max"),
        pl.lit("VALUE_MISMATCH").alias("reason_code"), pl.lit("Check pricing/FX or engine logic.").alias("remediation_hint"),
        pl.format("after-state value {} against {} before: {} apart, over the tolerance {}",
                  *(units_text(c) for c in (pl.col("after_total_value"), pl.col("before_total_value"), dabs(pl.col("delta")), pl.col("tolerance")))).alias("detail"),
    )


def settlement_rule(first_breach: pl.DataFrame) -> pl.DataFrame:
    return first_breach.select(
        "run", pl.lit(0, dtype=pl.Int64).alias("rule_order"), pl.lit("SETTLEMENT_CASH_LADDER").alias("rule_id"),
        pl.lit("HARD").alias("severity"), pl.lit("FAIL").alias("status"),
        (pl.col("allowed_floor") - pl.col("projected_balance")).alias("measured"), pl.col("allowed_floor").alias("threshold_min"),
        pl.lit(None, dtype=DEC).alias("threshold_max"), "reason_code",
        pl.lit("Adjust timing, funding, or overdraft settings.").alias("remediation_hint"),
        pl.format("{} projected at {} on T+{}, below its floor {}", "currency", units_text("projected_balance"), "date_offset",
                  units_text("allowed_floor")).alias("detail"),
    )


def rule_blocks(rule_results: pl.DataFrame) -> pl.DataFrame:
    """(run, rule_block, rule_block_detail) for each run with a failed HARD rule, so a
    blocked run says why without a join to rule_results: DATA_QUALITY if it failed (it
    stops a run before its trades, whatever the before-state breaches), else the first
    failed rule in rule order; then the details of every failed HARD rule, that one first."""
    failed = rule_results.filter((pl.col("severity") == "HARD") & (pl.col("status") == "FAIL")).sort(
        "run", pl.col("rule_id") != "DATA_QUALITY", "rule_order", maintain_order=True)
    return failed.group_by("run", maintain_order=True).agg(
        pl.col("rule_id").first().alias("rule_block"), pl.col("detail").str.join("; ").alias("rule_block_detail"),
    )


SEVERITY_RANK = {"HIGH": 0, "MEDIUM": 1, "LOW": 2}


def gate_decisions(runs: pl.DataFrame, rule_results: pl.DataFrame, dq_counts: pl.DataFrame):
    """§6.20: workflow gate per run and its sorted reasons."""
    fails = rule_results.filter(pl.col("status") == "FAIL")
    reasons = pl.concat([
        fails.select(
            "run",
            pl.when(pl.col("severity") == "HARD").then(pl.lit("HARD_RULE_FAIL:")).otherwise(pl.lit("SOFT_RULE_FAIL:")).add(pl.col("rule_id")).alias("reason_code"),
            pl.when(pl.col("severity") == "HARD").then(pl.lit("HIGH")).otherwise(pl.lit("MEDIUM")).alias("severity"),
            pl.lit("RULE_ENGINE").alias("source"), pl.col("reason_code").alias("detail_reason_code"),
            pl.lit(None, dtype=pl.String).alias("detail_count"),
        ),
        dq_counts.filter(pl.col("n_price_missing") > 0).select(
            "run", pl.lit("DATA_QUALITY_MISSING_PRICE").alias("reason_code"), pl.lit("HIGH").alias("severity"),
            pl.lit("DATA_QUALITY").alias("source"), pl.lit(None, dtype=pl.String).alias("detail_reason_code"),
            pl.col("n_price_missing").cast(pl.String).alias("detail_count"),
        ),
        dq_counts.filter(pl.col("n_fx_missing") > 0).select(
            "run", pl.lit("DATA_QUALITY_MISSING_FX").alias("reason_code"), pl.lit("HIGH").alias("severity"),
            pl.lit("DATA_QUALITY").alias("source"), pl.lit(None, dtype=pl.String).alias("detail_reason_code"),
            pl.col("n_fx_missing").cast(pl.String).alias("detail_count"),
        ),
    ]).join(runs.filter(pl.col("enable_workflow_gates")).select("run"), on="run", how="semi")
    reasons = reasons.with_columns(
        pl.col("severity").replace_strict(SEVERITY_RANK, return_dtype=pl.Int8).alias("_sev")
    ).sort("run", "_sev", "source", "reason_code", pl.col("detail_reason_code").fill_null("")).drop("_sev")
    counts = fails.group_by("run").agg(
        (pl.col("severity") == "HARD").sum().cast(pl.Int64).alias("hard_fail_count"),
        (pl.col("severity") == "SOFT").sum().cast(pl.Int64).alias("soft_fail_count"),
    )
    g = runs.select("run", "status", "enable_workflow_gates", "workflow_requires_client_consent", "client_consent_already_obtained").join(
        counts, on="run", how="left"
    ).with_columns(pl.col("hard_fail_count", "soft_fail_count").fill_null(0))
    gate = (
        pl.when((pl.col("status") == "BLOCKED") | (pl.col("hard_fail_count") > 0)).then(pl.lit("BLOCKED|FIX_INPUT"))
        .when(pl.col("soft_fail_count") > 0).then(pl.lit("RISK_REVIEW_REQUIRED|RISK_REVIEW"))
        .when(pl.col("client_consent_already_obtained")).then(pl.lit("EXECUTION_READY|EXECUTE"))
        .when(pl.col("workflow_requires_client_consent")).then(pl.lit("CLIENT_CONSENT_REQUIRED|REQUEST_CLIENT_CONSENT"))
        .otherwise(pl.lit("EXECUTION_READY|EXECUTE"))
        .str.split_exact("|", 1)
    )
    g = g.with_columns(gate.alias("_g")).select(
        "run",
        pl.when(pl.col("enable_workflow_gates")).then(pl.col("_g").struct.field("field_0")).alias("gate"),
        pl.when(pl.col("enable_workflow_gates")).then(pl.col("_g").struct.field("field_1")).alias("recommended_next_step"),
        "hard_fail_count", "soft_fail_count",
    )
    return g, reasons
