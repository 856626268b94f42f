"""Target generation (spec §6.4-6.5): model weights → constrained final weights → trace.

HEURISTIC steps run in the reference's order over the whole book at once: SELL_ONLY
redistribution, group caps, normalisation above 100%, single-position cap, minimum cash
buffer. Steps that are sequential by nature (group caps in key order, the cap's
redistribution over the remaining excess) iterate over the *rank* of the item inside a
run, each iteration being one columnar pass over every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from dpm_vec import dec28 as f28
from dpm_vec.codes import ReferenceBlock, with_code_lists
from dpm_vec.frames import join_on_index, join_runs, put_rows, rows_of_runs, rows_where, sort_rows, without_runs
from dpm_vec.numeric import (DEC_UNIT, VALUE_TIMES_WEIGHT, WEIGHT, WEIGHT_RANGE, WEIGHT_RANGE_TEXT, as_f64, dmax, dmin,
                             largest_magnitude, lit, name_weight_sums_beyond_range, naming_overflows, positive_or_null, product_of_all_digits,
                             units_text)
from dpm_vec.stages.prepare import SLOT, Market
from dpm_vec.stages.universe import ExactLocked, valued_in_28_digits

WARNINGS_SCHEMA = {"run": pl.UInt32, "code": pl.String, "w_order": pl.Int64}
# warnings sort by w_order: the target stage uses 100_000.., comparison ..199_999, then tax
# 300_000_000, turnover 400_000_000, settlement 500_000_000, safety 600_000_000 (§6.19)
TARGET_STAGE_ORDER = 100
TAG_LISTS = [["IMPLICIT_SELL_TO_ZERO"], ["LOCKED_POSITION"], ["CAPPED_BY_MAX_WEIGHT"], ["REDISTRIBUTED_RECIPIENT"], []]
# a run's RFC asset-class cap fault, and the entries its problem detail names (``_concentration_faults``)
FAULTS_SCHEMA = {"run": pl.UInt32, "target_fault": pl.String, "target_fault_detail": pl.String}
ROLES_SCHEMA = {"run": pl.UInt32, "slot": SLOT, "_role": pl.String}


@dataclass(frozen=True)
class Targets:
    trace: pl.DataFrame  # run, instrument_id, trace_order, model_weight, final_weight, final_value, tags, in_model, slot
    status: pl.DataFrame  # run, target_status (READY | PENDING_REVIEW | BLOCKED), target_fault, target_fault_detail
    warnings: pl.DataFrame  # run, code, w_order
    group_events: pl.DataFrame
    group_recipients: pl.DataFrame
    blocks: pl.DataFrame  # run, target_block, target_block_detail: the reference's own target-stage blocks
    comparison: pl.DataFrame | None = None  # §6.7 target_method_comparison, one row per compared run
    replay: Replay | None = None  # what redoes a HEURISTIC run's weights in 28 digits (``replayed_weights``)


def warnings_frame(frame: pl.DataFrame, code: pl.Expr, order: pl.Expr) -> pl.DataFrame:
    return frame.select(pl.col("run"), code.cast(pl.String).alias("code"), order.cast(pl.Int64).alias("w_order"))


def _agg_where(cond: pl.Expr) -> pl.Expr:
    return pl.when(cond).then(pl.col("weight")).otherwise(lit(0)).sum()


def _sum_where(cond: pl.Expr) -> pl.Expr:
    return _agg_where(cond).over("run")


def _scale_buys(wm: pl.DataFrame, scale: pl.DataFrame) -> pl.DataFrame:
    """Multiply the buyable weights of the runs in ``scale`` (run, _scale) by their factor."""
    if scale.height == 0:
        return wm
    return join_runs(wm, scale).with_columns(
        pl.when(pl.col("buy") & pl.col("_scale").is_not_null()).then(pl.col("weight") * pl.col("_scale"))
        .otherwise(pl.col("weight")).alias("weight")
    ).drop("_scale")


def build_targets(
    market: Market,
    runs: pl.DataFrame,
    weight_map: pl.DataFrame,
    sell_only_excess: pl.DataFrame,
    model: pl.DataFrame,
    totals: pl.DataFrame,
    group_constraints: pl.DataFrame,
    exact: ExactLocked | None = None,
    valued: tuple[pl.DataFrame, pl.DataFrame] | None = None,
) -> Targets:
    """Step 1 for every run, then HEURISTIC steps 2-5 or the SOLVER (§6.6) by the run's
    ``target_method``; with ``compare_target_methods`` the other method runs too (§6.7).
    ``exact``: the universe's 28-digit locked weights, where their last digit can decide;
    ``valued`` (the before-state's valued positions and cash) lets a HEURISTIC target that
    lands within a last digit of its model weight be tagged, and a weight within a last
    digit of the single-position cap be a candidate or not, as the reference's 28-digit
    steps leave it (``_tags_in_28_digits``, ``_candidates_in_28_digits``)."""
    from dpm_vec.stages.solver import compare_methods, solve_targets

    weight_map = weight_map.with_columns(pl.col("weight").cast(WEIGHT))
    sell_only_excess = sell_only_excess.with_columns(pl.col("sell_only_excess").cast(WEIGHT))
    model = model.with_columns(pl.col("model_weight").cast(WEIGHT))
    group_constraints = group_constraints.with_columns(pl.col("max_weight").cast(WEIGHT))
    runs = runs.with_columns(pl.col("single_position_max_weight", "min_cash_buffer_pct").cast(WEIGHT))
    _name_weight_sums_beyond_range(runs, weight_map, sell_only_excess)
    wm, step1_pending = _sell_only_redistribution(runs, weight_map, sell_only_excess)
    solver = pl.col("target_method") == "SOLVER"
    compare = pl.col("compare_target_methods")

    def pick(frame: pl.DataFrame, chosen: pl.DataFrame) -> pl.DataFrame:
        """The rows of ``frame`` of the ``chosen`` runs; every run chosen (a shard without
        SOLVER runs): nothing to drop, no join."""
        return frame if chosen.height == runs.height else frame.join(chosen.select("run"), on="run", how="semi")

    heuristic_runs = runs.filter(~solver | compare)
    step1 = _Step1(pick(weight_map, heuristic_runs), sell_only_excess)
    h = _heuristic(market, heuristic_runs, pick(wm, heuristic_runs), group_constraints, step1_pending, step1, exact, valued)
    solver_runs = runs.filter(solver | compare)
    if solver_runs.height:
        s_weights, s_status, s_warnings = solve_targets(market, runs, wm, model, group_constraints, which=solver | compare)
        s_status = s_status.join(step1_pending.unique().with_columns(pl.lit(True).alias("_p")), on="run", how="left").select(
            "run",
            pl.when(pl.col("solver_status") == "BLOCKED").then(pl.lit("BLOCKED"))
            .when(pl.col("_p").is_not_null()).then(pl.lit("PENDING_REVIEW")).otherwise(pl.lit("READY")).alias("target_status"),
            pl.lit(None, dtype=pl.String).alias("target_fault"), pl.lit(None, dtype=pl.String).alias("target_fault_detail"),
        )
        s_weights = s_weights.join(s_status.filter(pl.col("target_status") == "BLOCKED"), on="run", how="anti").with_columns(
            pl.col("weight").cast(WEIGHT)
        )
    else:
        s_weights = wm.clear()
        s_status = pl.DataFrame(schema={"run": pl.UInt32, "target_status": pl.String, "target_fault": pl.String,
                                        "target_fault_detail": pl.String})
        s_warnings = pl.DataFrame(schema=WARNINGS_SCHEMA)
    primary_solver = runs.filter(solver).select("run")
    primary_heuristic = runs.filter(~solver).select("run")

    status = pl.concat([pick(h.status, primary_heuristic), pick(s_status, primary_solver)]).sort("run")
    weights = pl.concat([pick(h.weights, primary_heuristic).select(wm.columns), pick(s_weights, primary_solver).select(wm.columns)])
    trace = _trace(weights, without_runs(model, status.filter(pl.col("target_status") == "BLOCKED")), totals)
    replayable = runs.join(pick(h.touched, primary_heuristic), on="run", how="semi").filter(_replayable_cap())
    replay = Replay(step1, group_constraints, replayable.select(
        "run", "base_currency", "single_position_max_weight", "single_position_cap_mode", "min_cash_buffer_pct",
    ))
    if valued is not None and replay.policy.height:
        trace = _tags_in_28_digits(market, trace, replay, totals, valued)
    warnings = [pick(h.warnings, primary_heuristic), pick(s_warnings, primary_solver)]
    comparison = None
    if runs.filter(compare).height:
        alt_is_solver = runs.filter(compare & ~solver).select("run")
        alt_is_heuristic = runs.filter(compare & solver).select("run")
        h_trace = _trace(h.weights, model, totals)
        s_trace = _trace(s_weights, model, totals)
        comparison, cmp_warnings = compare_methods(
            runs,
            status,
            trace,
            pl.concat([pick(s_status, alt_is_solver), pick(h.status, alt_is_heuristic)]),
            pl.concat([pick(s_trace, alt_is_solver), pick(h_trace, alt_is_heuristic)]),
            pl.concat([
                pick(s_warnings, alt_is_solver).select("run", "code"),
                pick(h.warnings, alt_is_heuristic).select("run", "code"),
                # the RFC cap's block reason is among a run's warnings (codes.py): the alternate's too
                pick(h.status, alt_is_heuristic).filter(pl.col("target_fault").is_not_null())
                .select("run", pl.col("target_fault").alias("code")),
            ]),
        )
        warnings.append(cmp_warnings)
    return Targets(
        trace=trace,
        status=status,
        warnings=pl.concat(warnings).pipe(sort_rows, "run", "w_order"),
        group_events=pick(h.group_events, primary_heuristic),
        group_recipients=pick(h.group_recipients, primary_heuristic),
        blocks=pl.concat([_group_blocks(pick(h.group_events, primary_heuristic)), _solver_blocks(pick(s_warnings, primary_solver))]),
        comparison=comparison,
        replay=replay,
    )


def _group_blocks(group_events: pl.DataFrame) -> pl.DataFrame:
    """The HEURISTIC runs a group cap stopped (§6.4 step 2.6), saying which group and why."""
    return group_events.filter(pl.col("status") == "BLOCKED").select(
        "run", pl.lit(ReferenceBlock.NO_ELIGIBLE_REDISTRIBUTION_DESTINATION.value).alias("target_block"),
        pl.format("group {} at weight {} over its cap {}, and no buyable instrument outside it to take the excess",
                  "constraint_key", units_text("group_weight_before"), units_text("max_weight")).alias("target_block_detail"),
    )


def _solver_blocks(solver_warnings: pl.DataFrame) -> pl.DataFrame:
    """The SOLVER runs whose solve failed (§6.6 step 5): the failure code, and its hints."""
    failed = solver_warnings.filter((pl.col("code") == "SOLVER_ERROR") | pl.col("code").str.starts_with("INFEASIBLE_"))
    hints = solver_warnings.filter(pl.col("code").str.starts_with("INFEASIBILITY_HINT_")).sort("run", "w_order").group_by("run").agg(
        pl.col("code").str.join(", ").alias("_hints"))
    return failed.join(hints, on="run", how="left").select(
        "run", pl.col("code").alias("target_block"),
        pl.when(pl.col("code") == "SOLVER_ERROR").then(pl.lit("the solver gave no status"))
        .otherwise(pl.lit("no target weights meet the model's bounds, the cash band and the caps")
                   + pl.when(pl.col("_hints").is_not_null()).then(" (" + pl.col("_hints") + ")").otherwise(pl.lit("")))
        .alias("target_block_detail"),
    )


def _name_weight_sums_beyond_range(runs: pl.DataFrame, weight_map: pl.DataFrame, sell_only_excess: pl.DataFrame) -> None:
    """Name the runs whose weights the steps below could add up to beyond WEIGHT: the map's
    weights, SELL_ONLY excess, the cash buffer, and the single-position cap once per entry
    (step 4 sums max(0, w − m) over every entry, 10^10 for ten entries under a cap of
    −10^9). Weights and options are bounded one by one (10^9 at the JSON door and in a
    book's options, 10^10 in a book's models), not their sums."""
    largest = (largest_magnitude("weight", weight_map) + largest_magnitude("sell_only_excess", sell_only_excess)
               + largest_magnitude("single_position_max_weight", runs) + largest_magnitude("min_cash_buffer_pct", runs))
    if (weight_map.height + sell_only_excess.height + runs.height) * largest < WEIGHT_RANGE:
        return
    m, p = as_f64("single_position_max_weight").abs().fill_null(0.0), as_f64("min_cash_buffer_pct").abs()
    terms = pl.concat([
        join_runs(weight_map.select("run", "weight"), runs.select("run", m.alias("_m"))).select("run", (as_f64("weight").abs() + pl.col("_m")).alias("_magnitude")),
        sell_only_excess.select("run", as_f64("sell_only_excess").abs().alias("_magnitude")),
        runs.select("run", p.alias("_magnitude")),
    ])
    name_weight_sums_beyond_range(terms, runs, pl.col("_magnitude"), pl.lit(
        "the sum of the weights the target stage adds up for the portfolio (its model and locked weights, its SELL_ONLY excess, "
        "its cash buffer and its single-position cap once per entry)"))


def _sell_only_redistribution(runs: pl.DataFrame, weight_map: pl.DataFrame, sell_only_excess: pl.DataFrame):
    """§6.4 step 1 (both methods): spread SELL_ONLY model weight over buyable targets in
    proportion; with nothing to receive it, the run needs review. A proportion past WEIGHT
    (negative model weights, unvalidated, leaving a buyable sum near 0) names its run."""
    wm = weight_map.with_columns((pl.col("kind") == "BUYABLE").alias("buy")).pipe(sort_rows, "run", "map_order")
    excess = sell_only_excess.filter(pl.col("sell_only_excess") > 0)
    # the runs with SELL_ONLY excess are few: their rows alone take the sums and shares
    rows = rows_of_runs(wm, excess)
    spread = join_runs(wm[rows], excess).with_columns(_sum_where(pl.col("buy")).alias("_S"))
    pending = pl.concat([
        spread.filter(pl.col("_S") <= 0).select("run"),  # not S > 0: negative model weights pass unvalidated
        excess.join(spread.filter(pl.col("buy")).select("run").unique(), on="run", how="anti").select("run"),
    ])
    receives = pl.col("buy") & (pl.col("_S") > 0)
    proportion = as_f64("weight") / as_f64("_S")
    shared = naming_overflows(
        lambda: spread.select(
            pl.when(receives).then(pl.col("weight") + pl.col("sell_only_excess") * (pl.col("weight") / positive_or_null("_S")))
            .otherwise(pl.col("weight")).alias("weight")
        ),
        spread, runs,
        pl.when(receives).then(pl.max_horizontal(proportion.abs(), (as_f64("weight") + as_f64("sell_only_excess") * proportion).abs())),
        pl.format("the SELL_ONLY redistribution to {} (its weight {} over a buyable sum of {}, then times {})", "instrument_id",
                  *(units_text(c) for c in ("weight", "_S", "sell_only_excess"))),
        WEIGHT_RANGE, WEIGHT_RANGE_TEXT,
    )
    return put_rows(wm, rows, shared), pending


NORMALISATION_THRESHOLD = "1.0001"


@dataclass(frozen=True)
class _Step1:
    """Step 1's inputs, kept for ``_steps_1_2_in_28_digits``: the weight map before it and
    each run's SELL_ONLY excess."""
    weight_map: pl.DataFrame
    sell_only_excess: pl.DataFrame


# within this of a bound, the last digit of the reference's 28-digit steps can decide a side
_LAST_DIGITS = lit(DEC_UNIT)


def _replayable_cap() -> pl.Expr:
    """Runs whose step 4 the 28-digit replays can redo, in either cap mode: no cap, or a
    cap above 0 (a cap at or below 0 leaves no candidate)."""
    m = pl.col("single_position_max_weight")
    return m.is_null() | (m > 0)


@dataclass(frozen=True)
class Replay:
    """What ``replayed_weights`` needs to redo a HEURISTIC run's five steps in 28 digits:
    step 1's inputs, the group constraints, and the runs it can redo (``policy``: run,
    base_currency, single_position_max_weight, single_position_cap_mode,
    min_cash_buffer_pct), those whose weights a step changed, in either cap mode."""
    step1: _Step1
    group_constraints: pl.DataFrame
    policy: pl.DataFrame


def replayed_weights(market: Market, replay: Replay, runs: pl.DataFrame, valued: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    """(slot, weight_f28): the final map weights of the ``runs`` (run) that ``replay`` can
    redo, as the reference's 28-digit steps leave them (``_heuristic_in_28_digits``), from
    the locked weights over tv summed in 28 digits (``valued``: the before-state's valued
    positions and cash). A weight below 0.1 has 28 significant digits there, more decimals
    than Decimal(38, 28) keeps, and the fixed-point steps can differ in the last one."""
    policy = replay.policy.join(runs, on="run", how="semi")
    if policy.height == 0:
        return pl.DataFrame(schema={"slot": SLOT, "weight_f28": f28.F28})
    locked = _locked_in_28_digits(market, policy.select("run", "base_currency"), replay.step1.weight_map, valued)
    rows, _ = _heuristic_in_28_digits(market, replay.step1, replay.group_constraints, policy, locked)
    return rows.select("slot", pl.col("_w_f").alias("weight_f28"))


def _steps_1_2_in_28_digits(market: Market, step1: _Step1, gc: pl.DataFrame, near: pl.DataFrame,
                            locked: pl.DataFrame | None = None, bindings: list[pl.DataFrame] | None = None) -> pl.DataFrame:
    """The map rows of the ``near`` runs (run, map_order, buy, ``_w_f``) with their weights
    as the reference's steps 1-2 leave them: every product, quotient and sum rounded to 28
    significant digits (spec §1.1), in F28, from the model weights, in map order:
    w + e × (w / S) for step 1; for each group cap in key order, members × (max / G) and
    candidates + (G − max) × (w / C) for step 2. Where a total after these steps lands
    exactly on a threshold in exact arithmetic (models of 4-decimal weights do, often
    enough), the reference's rounding decides the side; the fixed-point steps can differ
    from it in the last digit. ``locked`` (slot, weight_f28): the locked weights with all
    their 28 digits (``_locked_in_28_digits``), else their Decimal(38, 28) copies.
    ``bindings``, if given, receives each rank's (run, rank) of the group caps that bind."""
    rows = sort_rows(step1.weight_map.join(near, on="run", how="semi"), "run", "map_order")
    rows = f28.from_dec(rows.with_columns((pl.col("kind") == "BUYABLE").alias("buy")), "weight", "_w_f")
    if locked is not None:
        rows = rows.join(locked, on="slot", how="left", maintain_order="left").with_columns(
            pl.when(pl.col("kind") == "LOCKED").then(f28.fill_null("weight_f28", f28.zero())).otherwise(pl.col("_w_f")).alias("_w_f")
        ).drop("weight_f28")
    # step 1: runs with SELL_ONLY excess and buyable weight to take it
    excess = step1.sell_only_excess.join(near, on="run", how="semi").filter(pl.col("sell_only_excess") > 0)
    if excess.height:
        buy = f28.from_dec(join_runs(rows.filter("buy"), excess, how="inner"), "sell_only_excess", "_e_f")
        buy = join_runs(buy, f28.group_sums(buy, "run", "_w_f", "_S_f").filter(f28.sign("_S_f") > 0), how="inner")
        buy = _step1_shares(buy)
        rows = _put_weights(rows, buy.select("run", "map_order", pl.col("_w1_f").alias("_new_f")))
    # step 2: each run's group caps in key order
    constraints = _ranked_constraints(gc.join(near, on="run", how="semi"))
    attributes = market.with_attributes(rows.select("run", "instrument_id").unique()).select("run", "instrument_id", "attribute", "value")
    for rank in range(1, int(constraints["rank"].max() or 0) + 1):
        cap = constraints.filter(pl.col("rank") == rank).select("run", "attribute", "value", "max_weight")
        members = attributes.join(cap, on=["run", "attribute", "value"], how="inner").select("run", "instrument_id", "max_weight")
        step = rows.join(members, on=["run", "instrument_id"], how="left", maintain_order="left").with_columns(
            pl.col("max_weight").is_not_null().alias("_member")
        )
        g = f28.group_sums(step.filter("_member"), "run", "_w_f", "_G_f")
        limits = f28.from_dec(cap.select("run", "max_weight"), "max_weight", "_max_f")
        g = join_runs(g, limits, how="inner").filter(f28.to_d28("_G_f") > pl.col("max_weight") + lit("0.0001"))
        if bindings is not None:
            bindings.append(g.select("run", pl.lit(rank, dtype=pl.Int64).alias("rank")))
        if g.height == 0:
            continue
        g = f28.sub(f28.div(g, "_max_f", "_G_f", "_ratio_f"), "_G_f", "_max_f", "_excess_f")
        step = join_runs(step, g.select("run", "_ratio_f", "_excess_f"), how="inner")
        scaled = f28.mul(step.filter("_member"), "_w_f", "_ratio_f", "_new_f")
        candidates = step.filter(pl.col("buy") & ~pl.col("_member"))
        c = f28.group_sums(candidates, "run", "_w_f", "_C_f").filter(f28.sign("_C_f") > 0)
        candidates = f28.div(join_runs(candidates, c, how="inner"), "_w_f", "_C_f", "_r_f")
        candidates = f28.add(f28.mul(candidates, "_excess_f", "_r_f", "_share_f"), "_w_f", "_share_f", "_new_f")
        rows = _put_weights(rows, pl.concat([scaled.select("run", "map_order", "_new_f"), candidates.select("run", "map_order", "_new_f")]))
    return rows


def _threshold_in_28_digits(market: Market, step1: _Step1, gc: pl.DataFrame, near: pl.DataFrame,
                            locked: pl.DataFrame | None = None) -> pl.DataFrame:
    """(run, _above) for the ``near`` runs, whose map total after steps 1-2 lies within
    1e-20 of step 3's threshold: whether the reference's total exceeds 1.0001. In exact
    arithmetic a SELL_ONLY redistribution and a group cap keep the model's total, and
    models of 4-decimal weights sum to 1.0001 (or to 1.0001 less a locked holding's weight)
    often enough (``_steps_1_2_in_28_digits``; ``locked``: the runs' locked weights in 28
    digits, where any is not 0)."""
    rows = _steps_1_2_in_28_digits(market, step1, gc, near, locked)
    total = f28.group_sums(rows, "run", "_w_f", "_total_f")
    # near 1.0001, 28 significant digits are 27 decimals: the Decimal(38, 28) copy is exact
    return total.select("run", (f28.to_d28("_total_f") > lit(NORMALISATION_THRESHOLD)).alias("_above"))


def _buffer_in_28_digits(market: Market, step1: _Step1, gc: pl.DataFrame, near: pl.DataFrame, caps: pl.DataFrame,
                         locked: pl.DataFrame | None = None) -> pl.DataFrame:
    """(run, _binds) for the ``near`` runs (run, min_cash_buffer_pct), whose buyable sum B
    lies within 1e-20 of step 5's allowed 1 − p − L and that step 3 left as steps 1-2 made
    them (no normalisation): whether the reference's B exceeds its max(0, 1 − p − L), both
    summed in map order over the weights of its 28-digit steps 1-2 and, for the runs of
    ``caps`` (run, single_position_max_weight, single_position_cap_mode), of its 28-digit
    step 4 (``_step4_in_28_digits``; a model of 4-decimal weights that sums to 1 − p − L,
    with a SELL_ONLY weight spread over the others or a capped weight's excess handed on,
    lands on either side). ``locked``: the runs' locked weights in 28 digits, where any is
    not 0."""
    rows, _ = _step4_in_28_digits(market, _steps_1_2_in_28_digits(market, step1, gc, near.select("run"), locked), caps)
    sums = join_runs(_sums_in_28_digits(rows), near.select("run", "min_cash_buffer_pct"), how="inner")
    sums = f28.from_dec(sums.with_columns(f28.one().alias("_one_f")), "min_cash_buffer_pct", "_p_f")
    sums = f28.sub(f28.sub(sums, "_one_f", "_p_f", "_room_f"), "_room_f", "_L_f", "_bound_f").with_columns(_floor_at_zero("_bound_f"))
    return f28.sub(sums, "_B_f", "_bound_f", "_over_f").select("run", (f28.sign("_over_f") > 0).alias("_binds"))


def _step4_in_28_digits(market: Market, rows: pl.DataFrame, caps: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(``rows``, roles): ``rows`` (run, map_order, slot, instrument_id, buy, ``_w_f``, in
    run and map order) after step 4 in F28 for the runs of ``caps`` (run,
    single_position_max_weight m > 0, single_position_cap_mode): the reference's cap
    (``_cap_in_28_digits``), or in RFC_ASSET_CLASS mode the asset-class cap
    (``_class_cap_rows_in_28_digits``), and the roles (``_concentration_faults``) of the
    RFC runs where it pushes a recipient over m."""
    rfc = caps.filter(pl.col("single_position_cap_mode") == "RFC_ASSET_CLASS")
    rows = _cap_in_28_digits(rows, caps.join(rfc, on="run", how="anti").select("run", "single_position_max_weight"))
    if rfc.height == 0:
        return rows, pl.DataFrame(schema=ROLES_SCHEMA)
    classed = market.with_shelf(rows.join(rfc, on="run", how="semi"), ("asset_class",)).with_columns(pl.col("asset_class").fill_null("UNKNOWN"))
    classed, over = _class_cap_rows_in_28_digits(join_runs(classed, rfc.select("run", "single_position_max_weight")))
    return pl.concat([rows.join(rfc, on="run", how="anti"), classed.select(rows.columns)]).pipe(sort_rows, "run", "map_order"), over


def _cap_in_28_digits(rows: pl.DataFrame, caps: pl.DataFrame) -> pl.DataFrame:
    """``rows`` (run, map_order, buy, ``_w_f``, in run and map order) after the reference's
    step 4 in F28 for the runs of ``caps`` (run, single_position_max_weight m > 0): excess
    Σ max(0, w − m) in map order, every weight capped at m, then each buyable candidate
    below m in map order takes min(rem × (w / C), m − w) of the remaining excess ``rem``,
    every operation rounded to 28 digits. The last candidate's share is the rounded
    remainder, so the weights can sum a unit of the 28th digit above the exact total."""
    capped = rows.join(caps, on="run", how="inner", maintain_order="left")  # the sums below run in map order
    if capped.height == 0:
        return rows
    capped = f28.from_dec(capped, "single_position_max_weight", "_m_f")
    capped = f28.sub(capped, "_w_f", "_m_f", "_d_f").with_columns(
        pl.when(f28.sign("_d_f") > 0).then(pl.col("_d_f")).otherwise(f28.zero()).alias("_over_f"),
        (pl.col("buy") & (f28.sign("_d_f") < 0)).alias("_candidate"),
        pl.when(f28.sign("_d_f") > 0).then(pl.col("_m_f")).otherwise(pl.col("_w_f")).alias("_w_f"),
    )
    excess = f28.group_sums(capped, "run", "_over_f", "_rem_f").filter(f28.sign("_rem_f") > 0)
    c = f28.group_sums(capped.filter("_candidate"), "run", "_w_f", "_C_f").filter(f28.sign("_C_f") > 0)
    cands = join_runs(capped.filter("_candidate"), c, how="inner").join(excess.select("run"), on="run", how="semi")
    cands = f28.sub(f28.div(cands, "_w_f", "_C_f", "_a_f"), "_m_f", "_w_f", "_h_f").with_columns(
        pl.col("map_order").rank("ordinal").over("run").alias("_rank"),
    )
    state, new = excess, []
    for rank in range(1, int(cands["_rank"].max() or 0) + 1):
        step = f28.mul(join_runs(cands.filter(pl.col("_rank") == rank), state, how="inner"), "_rem_f", "_a_f", "_x_f")
        step = f28.sub(step, "_x_f", "_h_f", "_x_minus_h_f").with_columns(
            pl.when(f28.sign("_x_minus_h_f") > 0).then(pl.col("_h_f")).otherwise(pl.col("_x_f")).alias("_share_f"),
        )
        step = f28.sub(f28.add(step, "_w_f", "_share_f", "_new_f"), "_rem_f", "_share_f", "_left_f")
        new.append(step.select("run", "map_order", "_new_f"))
        state = step.select("run", pl.col("_left_f").alias("_rem_f"))
    capped = capped.select(rows.columns)
    if new:
        capped = _put_weights(capped, pl.concat(new))
    return pl.concat([rows.join(caps, on="run", how="anti"), capped]).pipe(sort_rows, "run", "map_order")


def _sums_in_28_digits(rows: pl.DataFrame) -> pl.DataFrame:
    """(run, _B_f, _L_f): each run's buyable and non-buyable weights of ``rows`` (in map
    order) summed as the reference sums them; 0 where a run has none."""
    b = f28.group_sums(rows.filter("buy"), "run", "_w_f", "_B_f")
    locked = f28.group_sums(rows.filter(~pl.col("buy")), "run", "_w_f", "_L_f")
    return (
        rows.select("run").unique().join(b, on="run", how="left").join(locked, on="run", how="left")
        .with_columns(f28.fill_null("_B_f", f28.zero()), f28.fill_null("_L_f", f28.zero()))
    )


def _scale_in_28_digits(rows: pl.DataFrame, bounds: pl.DataFrame) -> pl.DataFrame:
    """``rows`` with the buyable weights of each run of ``bounds`` (run, _B_f, _bound_f)
    whose buyable sum B exceeds the bound b multiplied by b / B (steps 3 and 5)."""
    bounds = f28.sub(bounds, "_B_f", "_bound_f", "_over_f").filter((f28.sign("_over_f") > 0) & (f28.sign("_B_f") > 0))
    if bounds.height == 0:
        return rows
    bounds = f28.div(bounds, "_bound_f", "_B_f", "_ratio_f")
    scaled = f28.mul(rows.filter("buy").join(bounds.select("run", "_ratio_f"), on="run", how="inner"), "_w_f", "_ratio_f", "_new_f")
    return _put_weights(rows, scaled.select("run", "map_order", "_new_f"))


def _floor_at_zero(name: str) -> pl.Expr:
    return pl.when(f28.sign(name) > 0).then(pl.col(name)).otherwise(f28.zero()).alias(name)


def _steps_1_3_in_28_digits(market: Market, step1: _Step1, gc: pl.DataFrame, runs: pl.DataFrame,
                            locked: pl.DataFrame | None) -> pl.DataFrame:
    """The map rows of ``runs`` (run) with their weights (``_w_f``) as the reference's
    steps 1-3 leave them: steps 1-2 as in ``_steps_1_2_in_28_digits``, then step 3 scales
    the buyable weights by (1 − L) / B where the map total exceeds 1.0001."""
    rows = _steps_1_2_in_28_digits(market, step1, gc, runs, locked)
    total = f28.group_sums(rows, "run", "_w_f", "_total_f").with_columns(lit(NORMALISATION_THRESHOLD).cast(WEIGHT).alias("_threshold"))
    total = f28.sub(f28.from_dec(total, "_threshold", "_threshold_f"), "_total_f", "_threshold_f", "_above_f")
    above = total.filter(f28.sign("_above_f") > 0).select("run")
    if above.height:
        sums = _sums_in_28_digits(rows.join(above, on="run", how="semi")).with_columns(f28.one().alias("_one_f"))
        rows = _scale_in_28_digits(rows, f28.sub(sums, "_one_f", "_L_f", "_bound_f").with_columns(_floor_at_zero("_bound_f")))
    return rows


def _group_bindings_in_28_digits(market: Market, step1: _Step1, gc: pl.DataFrame, runs: pl.DataFrame,
                                 locked: pl.DataFrame | None) -> pl.DataFrame:
    """(run, rank): the group caps of ``runs`` (run) that bind as the reference's 28-digit
    steps 1-2 leave their group weights (``_steps_1_2_in_28_digits``). A SELL_ONLY weight
    spread over a group whose model weights sum to its cap + 0.0001 leaves it exactly
    there in exact arithmetic, and a unit of the 28th digit decides whether the cap binds
    (and, with no candidate outside the group, whether the run is BLOCKED)."""
    bindings: list[pl.DataFrame] = [pl.DataFrame(schema={"run": pl.UInt32, "rank": pl.Int64})]
    _steps_1_2_in_28_digits(market, step1, gc, runs, locked, bindings)
    return pl.concat(bindings)


def _unreceived_excess_in_28_digits(market: Market, step1: _Step1, gc: pl.DataFrame, policy: pl.DataFrame,
                                    locked_for: Callable[[pl.DataFrame], pl.DataFrame | None]) -> pl.DataFrame:
    """(run): the runs of ``policy`` (run, single_position_max_weight, single_position_cap_mode;
    no weight over the cap in fixed point) whose step 4 takes excess in the reference's 28
    digits, a weight over the cap by a last digit, with no candidate to take it: no buyable
    weight below the cap (in RFC_ASSET_CLASS mode, none in an over-cap weight's asset
    class), or only weights summing to 0. The excess stays in cash: PENDING_REVIEW (§6.4
    step 4). ``locked_for``: runs (run) → their locked weights in 28 digits, or None."""
    if policy.height == 0:
        return policy.select("run")
    rows = _steps_1_3_in_28_digits(market, step1, gc, policy.select("run"), locked_for(policy.select("run")))
    rows = market.with_shelf(join_runs(rows, policy.select("run", "single_position_max_weight", "single_position_cap_mode")),
                             ("asset_class",))
    rows = f28.sub(f28.from_dec(rows, "single_position_max_weight", "_m_f"), "_w_f", "_m_f", "_d_f")
    # the reference's cap hands excess to any candidate, the RFC cap within an asset class
    pool = pl.when(pl.col("single_position_cap_mode") == "RFC_ASSET_CLASS").then(pl.col("asset_class").fill_null("UNKNOWN")).otherwise(pl.lit(""))
    rows = rows.with_columns(pool.alias("_pool"))
    over = rows.filter(f28.sign("_d_f") > 0).select("run", "_pool").unique()
    if over.height == 0:
        return over.select("run")
    candidates = rows.filter(pl.col("buy") & (f28.sign("_d_f") < 0)).join(over, on=["run", "_pool"], how="semi")
    received = f28.sums_by(candidates, ["run", "_pool"], "_w_f", "_C_f").filter(f28.sign("_C_f") > 0)
    return over.join(received, on=["run", "_pool"], how="anti").select("run").unique()


def _candidates_in_28_digits(market: Market, wm: pl.DataFrame, step1: _Step1, gc: pl.DataFrame,
                             locked_for: Callable[[pl.DataFrame], pl.DataFrame | None]) -> pl.DataFrame:
    """(slot, _below_cap): for the buyable weights within 1e-20 of the cap ``m`` in runs
    where step 4 takes excess, in either cap mode (``wm``: the map after step 3 with the
    run's policy), whether the weight lies strictly below ``m`` as the reference's 28-digit
    steps 1-3 leave it: a group cap's scaling gives 0.1428 × (0.2 / 0.2856) =
    0.09999999999999999999999999999 there (28 significant digits, a candidate under a cap
    of 0.1) and 0.1 at 28 decimals here (no candidate), and the candidates share all the
    excess. ``locked_for``: runs (run) → their locked weights in 28 digits, or None."""
    m = pl.col("single_position_max_weight")
    # the cheap tests first: most runs have no cap, or no excess over it
    near = wm.filter(pl.col("_excess") > 0).filter(
        m.is_not_null() & (m > 0) & pl.col("buy") & ((pl.col("weight") - m).abs() < _LAST_DIGITS)
    )
    if near.height == 0:
        return pl.DataFrame(schema={"slot": SLOT, "_below_cap": pl.Boolean})
    runs = near.select("run").unique()
    rows = _steps_1_3_in_28_digits(market, step1, gc, runs, locked_for(runs)).select("slot", "_w_f")
    near = f28.from_dec(join_on_index(near.select("slot", "single_position_max_weight"), rows, "slot", how="inner"),
                        "single_position_max_weight", "_m_f")
    return f28.sub(near, "_w_f", "_m_f", "_d_f").select("slot", (f28.sign("_d_f") < 0).alias("_below_cap"))


def _class_cap_in_28_digits(market: Market, near: pl.DataFrame, step1: _Step1, gc: pl.DataFrame,
                            locked_for: Callable[[pl.DataFrame], pl.DataFrame | None]
                            ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """((run, _fault), (slot, _exact), roles): for the runs of ``near`` (their map rows: run, slot,
    asset_class, single_position_max_weight), the RFC-0001 asset-class cap as the 28-digit
    steps 1-3 (``_steps_1_3_in_28_digits``) and the cap in 28 digits
    (``_class_cap_rows_in_28_digits``) leave the map: whether a recipient is over the cap,
    and every map weight. (0.1 / 1.5 has 28 significant digits at 29 decimals, so a
    recipient's weight + excess can be the cap there and a unit of the 28th decimal above
    it in fixed point.) roles: those of the faulted runs (``_concentration_faults``).
    ``locked_for``: runs (run) → their locked weights in 28 digits, or None."""
    runs = near.select("run").unique()
    rows = _steps_1_3_in_28_digits(market, step1, gc, runs, locked_for(runs))
    rows = rows.join(near.select("slot", "asset_class", "single_position_max_weight"), on="slot", how="inner", maintain_order="left")
    rows, roles = _class_cap_rows_in_28_digits(rows)
    weights = rows.select("slot", f28.to_d28("_w_f").alias("_exact"))
    return runs.with_columns(pl.col("run").is_in(roles["run"].implode()).alias("_fault")), weights, roles


def _class_cap_rows_in_28_digits(rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(``rows``, roles): the map ``rows`` (run, map_order, slot, buy, asset_class,
    single_position_max_weight m, ``_w_f``; in run and map order) after the RFC-0001
    asset-class cap in F28, and where it pushes a recipient over m, the roles
    (``_concentration_faults``) of that class's entries: each entry
    above m is cut to it, its class's excess Σ (w − m), summed in map order, goes to the
    class's buyable entries below m as w + excess × (w / C), C their sum, every operation
    rounded to 28 digits."""
    capped = f28.sub(f28.from_dec(rows, "single_position_max_weight", "_m_f"), "_w_f", "_m_f", "_d_f").with_columns(
        pl.when(f28.sign("_d_f") > 0).then(pl.col("_d_f")).otherwise(f28.zero()).alias("_over_f"),
        pl.when(f28.sign("_d_f") > 0).then(pl.col("_m_f")).otherwise(pl.col("_w_f")).alias("_w_f"),
        (pl.col("buy") & (f28.sign("_d_f") < 0)).alias("_candidate"),
        pl.format("{}|{}", "run", "asset_class").alias("_class"),
    )
    excess = f28.group_sums(capped, "_class", "_over_f", "_excess_f").filter(f28.sign("_excess_f") > 0)
    total = f28.group_sums(capped.filter("_candidate"), "_class", "_w_f", "_C_f").filter(f28.sign("_C_f") > 0)
    recipients = capped.filter("_candidate").join(excess, on="_class", how="inner").join(total, on="_class", how="inner")
    recipients = f28.mul(f28.div(recipients, "_w_f", "_C_f", "_share_f"), "_excess_f", "_share_f", "_x_f")
    recipients = f28.sub(f28.add(recipients, "_w_f", "_x_f", "_new_f"), "_new_f", "_m_f", "_above_f")
    over = recipients.filter(f28.sign("_above_f") > 0)
    sources = capped.filter(f28.sign("_over_f") > 0).join(over.select("_class").unique(), on="_class", how="semi")
    roles = pl.concat([sources.select("run", "slot", pl.lit("source").alias("_role")),
                       over.select("run", "slot", pl.lit("over").alias("_role"))])
    return _put_weights(capped, recipients.select("run", "map_order", "_new_f")).select(rows.columns), roles


def _heuristic_in_28_digits(market: Market, step1: _Step1, gc: pl.DataFrame, policy: pl.DataFrame,
                            locked: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The map rows of the runs of ``policy`` (run, single_position_max_weight,
    single_position_cap_mode, min_cash_buffer_pct; a cap above 0 or none)
    with their weights (``_w_f``) as the reference's five steps leave them, every
    operation rounded to 28 digits, from the model weights and the ``locked`` weights
    (slot, weight_f28) with all their digits: steps 1-2 and 4 as in
    ``_steps_1_2_in_28_digits`` and ``_step4_in_28_digits``; step 3 scales the buyable
    weights by (1 − L) / B where the map total exceeds 1.0001, step 5 by (1 − p − L) / B
    where B exceeds 1 − p − L; and the roles (``_concentration_faults``) of the
    RFC_ASSET_CLASS runs whose step 4 pushes a recipient over the cap."""
    rows = _steps_1_3_in_28_digits(market, step1, gc, policy.select("run"), locked)
    # step 4: single-position cap
    m = pl.col("single_position_max_weight")
    rows, over = _step4_in_28_digits(market, rows, policy.filter(m > 0))
    # step 5: minimum cash buffer
    buffered = policy.filter(pl.col("min_cash_buffer_pct") > 0).select("run", "min_cash_buffer_pct")
    if buffered.height:
        sums = join_runs(_sums_in_28_digits(rows.join(buffered, on="run", how="semi")), buffered, how="inner")
        sums = f28.from_dec(sums.with_columns(f28.one().alias("_one_f")), "min_cash_buffer_pct", "_p_f")
        sums = f28.sub(f28.sub(sums, "_one_f", "_p_f", "_room_f"), "_room_f", "_L_f", "_bound_f").with_columns(_floor_at_zero("_bound_f"))
        rows = _scale_in_28_digits(rows, sums)
    return rows, over


def _locked_in_28_digits(market: Market, runs: pl.DataFrame, weight_map: pl.DataFrame,
                         valued: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    """(slot, weight_f28): the locked weights of ``runs`` (run, base_currency) as the
    reference computes them, value_base / T, over tv summed in 28 digits (``valued``: the
    before-state's valued positions and cash)."""
    held, tv = valued_in_28_digits(market, runs, *valued)
    slots = weight_map.filter(pl.col("kind") == "LOCKED").join(runs, on="run", how="semi").select("slot")
    locked = join_on_index(slots, held.select("slot", "run", "_base_f"), "slot", how="inner")
    locked = f28.div(join_runs(locked, tv.select("run", "_divisor_f"), how="inner"), "_base_f", "_divisor_f", "weight_f28")
    return locked.select("slot", "weight_f28")




def _tags_in_28_digits(market: Market, trace: pl.DataFrame, replay: Replay, totals: pl.DataFrame,
                       valued: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    """``trace`` with the model targets of the runs ``replay`` can redo whose final weight
    lies within 1e-20 of the model weight re-tagged, and their final weight and value
    redone, as the reference's 28-digit steps leave them (``replayed_weights``): there the
    last digit decides between CAPPED_BY_MAX_WEIGHT,
    REDISTRIBUTED_RECIPIENT and no tag (a capped holding's excess handed back to the target
    that normalisation scaled down can land exactly on its model weight in the reference
    and a unit of the 28th decimal off in fixed point, or the other way round)."""
    near = trace.filter(
        pl.col("run").is_in(replay.policy["run"].implode()) & pl.col("in_model") & (pl.col("model_weight") != 0)
        & ((pl.col("final_weight") - pl.col("model_weight")).abs() < _LAST_DIGITS)
    )
    if near.height == 0:
        return trace
    redone = replayed_weights(market, replay, near.select("run").unique(), valued).rename({"weight_f28": "_w_f"})
    near = join_on_index(near.select("run", "slot", "model_weight"), redone, "slot")
    near = f28.from_dec(near.with_columns(f28.fill_null("_w_f", f28.zero())), "model_weight", "_model_f")
    near = f28.sub(near, "_w_f", "_model_f", "_diff_f").select(
        "run", "slot", f28.to_d28("_w_f").cast(WEIGHT).alias("_final"),
        pl.when(f28.sign("_diff_f") < 0).then(2).when(f28.sign("_diff_f") > 0).then(3).otherwise(4).alias("_case"),
    )
    near = join_runs(near, totals.select("run", "total_value")).select("slot", "_final", final_value("_final").alias("_value"), "_case")
    near = with_code_lists(near, pl.col("_case"), TAG_LISTS, "_tags")
    return join_on_index(trace, near, "slot").with_columns(
        pl.coalesce("_final", "final_weight").alias("final_weight"), pl.coalesce("_value", "final_value").alias("final_value"),
        pl.coalesce("_tags", "tags").alias("tags"),
    ).drop("_final", "_value", "_tags")


def _room_in_28_digits(market: Market, step1: _Step1, sums: pl.DataFrame, wm: pl.DataFrame, exact: ExactLocked,
                       gc: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``sums`` with step 3's room ``_avail`` = max(0, 1 − L) taken from L summed in 28
    digits, for the runs whose locked weights come with all 28 digits (``ExactLocked``: they
    fill the portfolio, or nearly). Several locked weights whose exact sum is 1 add up, each
    rounded and in map order, to exactly 1 in the reference, or a unit of the 28th digit on
    either side: no room, or dust room that its buyable targets and then the
    single-position cap's candidates take. Their Decimal(38, 28) copies can sum to the
    other. Where a group cap took part, L is summed over the weights its 28-digit steps 1-2
    leave (``_steps_1_2_in_28_digits``: a member's locked weight is rescaled too). Also
    (run) of the runs left a dust room, 0 < 1 − L < 1e-20 (``_dust_room_weights``)."""
    locked = wm.filter(pl.col("kind") == "LOCKED").join(exact.totals.select("run"), on="run", how="semi")
    if locked.height == 0:
        return sums, sums.clear().select("run")
    grouped = locked.select("run").unique().join(gc.select("run").unique(), on="run", how="semi")
    plain = sort_rows(locked.join(grouped, on="run", how="anti"), "run", "map_order")
    plain = plain.join(exact.weights, on="slot", how="left", maintain_order="left").with_columns(
        f28.fill_null("weight_f28", f28.zero())  # no rate: the weight is 0 (universe)
    )
    totals = [f28.group_sums(plain, "run", "weight_f28", "_L_f")]
    if grouped.height:
        rows = _steps_1_2_in_28_digits(market, step1, gc, grouped, exact.weights)
        totals.append(f28.group_sums(rows.filter(~pl.col("buy")), "run", "_w_f", "_L_f"))
    room = pl.concat(totals).with_columns(f28.one().alias("_one_f"))
    room = f28.sub(room, "_one_f", "_L_f", "_room_f").select(
        "run", pl.when(f28.sign("_room_f") > 0).then(f28.to_d28("_room_f")).otherwise(pl.lit(0, dtype=WEIGHT))
        .cast(sums.schema["_avail"]).alias("_avail_exact"),
        ((f28.sign("_room_f") > 0) & (f28.to_d28("_room_f") < _LAST_DIGITS)).alias("_dust_room"),
    )
    sums = join_runs(sums, room.drop("_dust_room")).with_columns(pl.coalesce("_avail_exact", "_avail").alias("_avail")).drop("_avail_exact")
    return sums, room.filter("_dust_room").select("run")


def _dust_room_weights(market: Market, step1: _Step1, gc: pl.DataFrame, wm: pl.DataFrame, policy: pl.DataFrame,
                       exact: ExactLocked) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``wm`` with the weights of the runs of ``policy`` (run, single_position_max_weight,
    single_position_cap_mode, min_cash_buffer_pct) as the reference's 28-digit steps leave
    them (``_heuristic_in_28_digits``), and the roles (``_concentration_faults``) of those
    whose RFC asset-class cap pushes a recipient over the cap there
    (INFEASIBLE_CONCENTRATION): locked weights that fill the
    portfolio to within 1e-20 leave step 3 a dust room, and the buyable weights scaled into
    it lie below Decimal(38, 28)'s last digit, 0 here. In the reference they are candidates
    with a positive sum, so the single-position cap hands them the locked excess in
    proportion to their model weights; here the cap found no candidate weight."""
    rows, over = _heuristic_in_28_digits(market, step1, gc, policy, exact.weights)
    rows = rows.select("slot", f28.to_d28("_w_f").cast(wm.schema["weight"]).alias("_redone"))
    return join_on_index(wm, rows, "slot").with_columns(pl.coalesce("_redone", "weight").alias("weight")).drop("_redone"), over


def _step1_shares(buy: pl.DataFrame) -> pl.DataFrame:
    """Step 1 in F28 on the buyable rows: w + e × (w / S)."""
    buy = f28.div(buy, "_w_f", "_S_f", "_r_f")
    buy = f28.mul(buy, "_e_f", "_r_f", "_share_f")
    return f28.add(buy, "_w_f", "_share_f", "_w1_f")


def _put_weights(rows: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """``rows`` with ``_w_f`` replaced by ``new``'s ``_new_f`` where (run, map_order) match."""
    return rows.join(new, on=["run", "map_order"], how="left", maintain_order="left").with_columns(
        f28.coalesce("_new_f", "_w_f").alias("_w_f")
    ).drop("_new_f")


@dataclass(frozen=True)
class _Heuristic:
    weights: pl.DataFrame
    status: pl.DataFrame
    warnings: pl.DataFrame
    group_events: pl.DataFrame
    group_recipients: pl.DataFrame
    touched: pl.DataFrame  # run: the runs whose weights one of steps 1-5 changed


def _heuristic(market: Market, runs: pl.DataFrame, wm: pl.DataFrame, group_constraints: pl.DataFrame, step1_pending: pl.DataFrame,
               step1: _Step1, exact: ExactLocked | None = None, valued: tuple[pl.DataFrame, pl.DataFrame] | None = None) -> _Heuristic:
    """§6.4 steps 2-5 on the map after step 1."""
    policy = runs.select("run", "single_position_max_weight", "single_position_cap_mode", "min_cash_buffer_pct", "base_currency")
    pending = [step1_pending.join(runs.select("run"), on="run", how="semi")]
    warnings = [pl.DataFrame(schema=WARNINGS_SCHEMA)]

    def locked_in_28_digits(with_locked: pl.DataFrame) -> pl.DataFrame | None:
        """The locked weights of the runs ``with_locked`` (run) over tv summed in 28 digits;
        None without ``valued`` or runs."""
        if valued is None or with_locked.height == 0:
            return None
        bases = join_runs(with_locked.select("run"), policy.select("run", "base_currency"), how="inner")
        return _locked_in_28_digits(market, bases, step1.weight_map, valued)

    # Step 2: group constraints
    gc = group_constraints.join(runs.select("run"), on="run", how="semi")
    wm, group_warnings, group_events, recipients, blocked = _group_constraints(
        market, wm, gc, lambda near: _group_bindings_in_28_digits(market, step1, gc, near, locked_in_28_digits(near)),
    )
    warnings.append(group_warnings)
    # a group with nowhere to put its excess stops the stage for its run (§6.4 step 2.6):
    # no later step may add a finding (the RFC cap's INFEASIBLE_CONCENTRATION) to it
    wm = without_runs(wm, blocked)

    # Step 3: normalisation above 100% (per-run sums; only the runs above 100% change)
    sums = wm.group_by("run").agg(
        _agg_where(pl.lit(True)).alias("_total"), _agg_where(~pl.col("buy")).alias("_L"), _agg_where(pl.col("buy")).alias("_B"),
        (~pl.col("buy") & (pl.col("weight") != 0)).any().alias("_locked_weight"),
    ).with_columns(dmax(lit(1) - pl.col("_L"), lit(0)).alias("_avail"), (pl.col("_total") > lit(NORMALISATION_THRESHOLD)).alias("_above"))
    # a total at the threshold is decided as the reference's 28-digit steps 1-2 leave it,
    # with the locked weights over tv summed in 28 digits (without ``valued``, runs with a
    # locked weight keep the fixed-point total)
    near = sums.filter(
        ((pl.col("_total") - lit(NORMALISATION_THRESHOLD)).abs() < _LAST_DIGITS)
        & (~pl.col("_locked_weight") | (valued is not None))
    ).join(blocked, on="run", how="anti").select("run")
    if near.height:
        locked = locked_in_28_digits(near.join(sums.filter("_locked_weight"), on="run", how="semi"))
        decided = _threshold_in_28_digits(market, step1, gc, near, locked).rename({"_above": "_above_exact"})
        sums = join_runs(sums, decided).with_columns(pl.coalesce("_above_exact", "_above").alias("_above"))
    dust = sums.clear().select("run")
    if exact is not None:  # locked weights that fill the portfolio: the room 1 − L as the reference leaves it
        sums, dust = _room_in_28_digits(market, step1, sums, wm, exact, gc)
    sums = sums.filter("_above")
    above = sums.select("run")
    dust = dust.join(above, on="run", how="semi")
    pending.append(sums.filter((pl.col("_L") > 1) | (pl.col("_B") > pl.col("_avail"))).select("run"))
    normalised = sums.filter((pl.col("_B") > pl.col("_avail")) & (pl.col("_B") > 0))
    wm = _scale_buys(wm, normalised.select("run", (pl.col("_avail") / pl.col("_B")).alias("_scale")))

    # Step 4: single-position cap
    wm = join_runs(wm, policy.drop("base_currency"))
    # a weight a last digit from the cap can be a unit of the 28th digit over it in the
    # reference (a locked holding's value_base / tv over a fed-back quantity past 20
    # decimals), whose step 4 then takes that excess: such a run is replayed, and where
    # no excess was taken here, its step 4 is decided in 28 digits too
    m = pl.col("single_position_max_weight")
    near_cap = rows_where(wm, (m > 0) & ((pl.col("weight") - m).abs() < _LAST_DIGITS), "run").unique()
    if near_cap.height and valued is not None:
        uncapped = near_cap.join(rows_where(wm, m.is_not_null() & (pl.col("weight") > m), "run"), on="run", how="anti")
        pending.append(_unreceived_excess_in_28_digits(market, step1, gc, policy.join(uncapped, on="run", how="semi"),
                                                       locked_in_28_digits))
    wm, cap_pending, cap_faults, capped = _single_position_cap(
        market, wm, lambda capped_map: _candidates_in_28_digits(market, capped_map, step1, gc, locked_in_28_digits),
        lambda near: _class_cap_in_28_digits(market, near, step1, gc, locked_in_28_digits),
    )
    pending.append(cap_pending)

    # Step 5: minimum cash buffer, for the runs that keep one
    buffered = policy.filter(pl.col("min_cash_buffer_pct") > 0).select("run", "min_cash_buffer_pct")
    sums = (
        rows_where(wm, pl.col("run").is_in(buffered["run"].implode()), "run", "buy", "weight")
        .group_by("run").agg(_agg_where(pl.col("buy")).alias("_B"), _agg_where(~pl.col("buy")).alias("_L"))
        .join(buffered, on="run")
        .with_columns(dmax(lit(1) - pl.col("min_cash_buffer_pct") - pl.col("_L"), lit(0)).alias("_allowed"))
        .with_columns((pl.col("_B") > pl.col("_allowed")).alias("_binds"))
    )
    # B at 1 − p − L is decided as the reference's 28-digit steps 1-2 and 4 leave it, where
    # step 3 changed nothing, with the locked weights over tv summed in 28 digits (without
    # ``valued``, runs with a locked weight keep the fixed-point sums)
    near = sums.filter(
        ((pl.col("_B") - pl.col("_allowed")).abs() < _LAST_DIGITS) & ((pl.col("_L") == 0) | (valued is not None))
    ).join(pl.concat([above, blocked]), on="run", how="anti")
    if near.height:
        m = pl.col("single_position_max_weight")
        rows = wm.join(near, on="run", how="semi")
        # a cap that took excess leaves a weight at m: below it (by more than a last digit) none was above
        at_cap = rows.filter(m.is_not_null() & (pl.col("weight") > m - _LAST_DIGITS)).select("run")
        # where steps 1-2 kept model weights of 20 decimals or fewer and no cap handed excess on, the sums are exact either way
        rounded = pl.concat([
            step1.sell_only_excess.filter(pl.col("sell_only_excess") > 0).select("run"), gc.select("run"), at_cap,
            rows.filter(pl.col("weight") != pl.col("weight").round(20)).select("run"), near.filter(pl.col("_L") != 0).select("run"),
        ])
        # step 4 is replayed where a cap above 0 takes part (``_replayable_cap``): other capped runs keep their sums
        caps = policy.join(near, on="run", how="semi").filter(m > 0).select(
            "run", "single_position_max_weight", "single_position_cap_mode",
        )
        near = near.join(rounded, on="run", how="semi").join(at_cap.join(caps, on="run", how="anti"), on="run", how="anti")
    if near.height:
        locked = locked_in_28_digits(near.filter(pl.col("_L") != 0).select("run"))
        decided = _buffer_in_28_digits(market, step1, gc, near, caps, locked).rename({"_binds": "_binds_exact"})
        sums = join_runs(sums, decided).with_columns(pl.coalesce("_binds_exact", "_binds").alias("_binds"))
    sums = sums.filter("_binds")
    pending.append(sums.select("run"))
    wm = _scale_buys(wm, sums.filter(pl.col("_B") > 0).select("run", (pl.col("_allowed") / pl.col("_B")).alias("_scale")))
    wm = wm.drop("single_position_max_weight", "single_position_cap_mode", "min_cash_buffer_pct")

    dust = policy.join(dust.join(blocked, on="run", how="anti"), on="run", how="semi").filter(_replayable_cap())
    if dust.height:  # only ExactLocked runs have a dust room; there the replay decides the RFC cap's fault
        wm, over = _dust_room_weights(market, step1, gc, wm, dust.select(
            "run", "single_position_max_weight", "single_position_cap_mode", "min_cash_buffer_pct",
        ), exact)
        named = join_runs(wm.select("run", "slot", "instrument_id", "map_order"), policy.select("run", "single_position_max_weight"))
        cap_faults = pl.concat([cap_faults.join(dust, on="run", how="anti"), _concentration_faults(over, named)])
    blocked_runs = pl.concat([blocked, cap_faults.select("run")]).unique()
    touched = pl.concat([
        step1.sell_only_excess.filter(pl.col("sell_only_excess") > 0).select("run"), group_events.select("run"),
        normalised.select("run"), capped, near_cap, sums.select("run"),  # sums: the runs whose cash buffer binds
    ]).unique()
    status = (
        runs.select("run")
        .join(pl.concat(pending).unique().with_columns(pl.lit(True).alias("_pending")), on="run", how="left")
        .join(blocked.with_columns(pl.lit(True).alias("_blocked")), on="run", how="left")
        .join(cap_faults, on="run", how="left")
        .select(
            "run",
            pl.when(pl.col("_blocked").is_not_null() | pl.col("target_fault").is_not_null()).then(pl.lit("BLOCKED"))
            .when(pl.col("_pending").is_not_null()).then(pl.lit("PENDING_REVIEW"))
            .otherwise(pl.lit("READY")).alias("target_status"),
            "target_fault", "target_fault_detail",
        )
    )
    return _Heuristic(
        weights=without_runs(wm, blocked_runs),
        status=status,
        warnings=pl.concat(warnings),
        group_events=group_events,
        group_recipients=recipients,
        touched=touched,
    )


def _group_constraints(market: Market, wm: pl.DataFrame, constraints: pl.DataFrame,
                       bindings: Callable[[pl.DataFrame], pl.DataFrame] | None = None):
    """§6.4 step 2: cap each attribute group in key order, pushing the excess to buyable
    instruments outside the group in proportion to their weights; block when none can.
    ``bindings``: runs (run) → (run, rank) of the group caps that bind in the reference's
    28-digit steps (``_group_bindings_in_28_digits``), for a group weight within 1e-20 of
    its bound, where the last digit decides."""
    events, recipients, warnings, blocked = [], [], [], []
    if constraints.height == 0:
        return (
            wm,
            pl.DataFrame(schema=WARNINGS_SCHEMA),
            _empty_group_events(),
            _empty_recipients(),
            pl.DataFrame(schema={"run": pl.UInt32}),
        )
    cons = _ranked_constraints(constraints)
    known = (
        cons.join(market.attribute_names(cons.select("run").unique()), on=["run", "attribute"], how="semi")
        .select("run", "rank")
        .with_columns(pl.lit(True).alias("known"))
    )
    cons = cons.join(known, on=["run", "rank"], how="left").with_columns(pl.col("known").fill_null(False))
    # only runs with constraints take part (a few): their rows are taken out, capped, and put
    # back in place; the others' weights pass through untouched
    rows = rows_of_runs(wm, cons)
    constrained = wm[rows]
    member_attr = market.with_attributes(constrained.select("run", "instrument_id")).select("run", "instrument_id", "attribute", "value")
    for rank in range(1, int(cons["rank"].max()) + 1):
        stopped = pl.concat([pl.DataFrame(schema={"run": pl.UInt32}), *blocked])
        step = cons.filter(pl.col("rank") == rank).join(stopped, on="run", how="anti")
        order = TARGET_STAGE_ORDER * 1000 + rank * 10  # warnings of constraint `rank` sort by (rank, sub)
        warnings.append(warnings_frame(
            step.filter(~pl.col("known")),
            pl.lit("UNKNOWN_CONSTRAINT_ATTRIBUTE_") + pl.col("attribute"), pl.lit(order),
        ))
        step = step.filter(pl.col("known"))
        members = member_attr.join(step.select("run", "attribute", "value"), on=["run", "attribute", "value"], how="semi")
        w = (
            constrained.join(step.select("run", "constraint_key", "max_weight"), on="run", how="inner")
            .join(members.select("run", "instrument_id", pl.lit(True).alias("member")), on=["run", "instrument_id"], how="left")
            .with_columns(pl.col("member").fill_null(False) & pl.col("max_weight").is_not_null())
        )
        w = w.with_columns(
            _sum_where(pl.col("member")).alias("_G"),
            pl.col("member").any().over("run").alias("_has_members"),
        )
        active = pl.col("_has_members") & (pl.col("_G") > pl.col("max_weight") + lit("0.0001"))
        if bindings is not None:
            at_bound = pl.col("_has_members") & ((pl.col("_G") - pl.col("max_weight") - lit("0.0001")).abs() < _LAST_DIGITS)
            near = w.filter(at_bound).select("run").unique()
            if near.height:
                bound = bindings(near).filter(pl.col("rank") == rank).select("run")
                active = pl.when(pl.col("run").is_in(near["run"].implode())).then(pl.col("run").is_in(bound["run"].implode())).otherwise(active)
        w = w.with_columns(
            (pl.col("_G") - pl.col("max_weight")).alias("_excess"),
            _sum_where(pl.col("buy") & ~pl.col("member")).alias("_C"),
        )
        w = w.with_columns(
            pl.when(active & pl.col("member")).then(pl.col("weight") * (pl.col("max_weight") / positive_or_null("_G")))
            .when(active & pl.col("buy") & ~pl.col("member") & (pl.col("_C") > 0))
            .then(pl.col("weight") + pl.col("_excess") * (pl.col("weight") / positive_or_null("_C")))
            .otherwise(pl.col("weight")).alias("_new"),
        )
        act = w.filter(active)
        per_run = act.group_by("run", maintain_order=True).agg(
            pl.col("constraint_key").first(), pl.col("_G").first(), pl.col("max_weight").first(),
            pl.col("_excess").first(), pl.col("_C").first(),
        )
        capped_runs = per_run.filter(pl.col("_C") > 0)
        blocked_now = per_run.filter(~(pl.col("_C") > 0))
        events.append(per_run.select(
            "run", "constraint_key", pl.col("_G").alias("group_weight_before"), "max_weight",
            pl.col("_excess").alias("released_weight"),
            pl.when(pl.col("_C") > 0).then(pl.lit("CAPPED")).otherwise(pl.lit("BLOCKED")).alias("status"),
            pl.lit(rank, dtype=pl.Int64).alias("event_order"),
        ))
        recipients.append(act.filter(pl.col("buy") & ~pl.col("member") & (pl.col("_C") > 0)).select(
            "run", "constraint_key", "instrument_id", (pl.col("_new") - pl.col("weight")).alias("share"),
            pl.col("map_order").alias("recipient_order"),
        ))
        warnings.append(warnings_frame(per_run, pl.lit("CAPPED_BY_GROUP_LIMIT_") + pl.col("constraint_key"), pl.lit(order + 1)))
        warnings.append(warnings_frame(blocked_now, pl.lit(ReferenceBlock.NO_ELIGIBLE_REDISTRIBUTION_DESTINATION.value), pl.lit(order + 2)))
        blocked.append(blocked_now.select("run"))
        capped = w.filter(pl.col("run").is_in(capped_runs["run"].implode())).select("run", "map_order", "_new")
        constrained = constrained.join(capped, on=["run", "map_order"], how="left", maintain_order="left").with_columns(
            pl.coalesce("_new", "weight").alias("weight")
        ).select(wm.columns)
    # each step kept constrained's rows and their order (a left join on unique keys)
    wm = put_rows(wm, rows, constrained.select("weight"))
    return (
        wm,
        pl.concat([pl.DataFrame(schema=WARNINGS_SCHEMA), *warnings]),
        pl.concat([_empty_group_events(), *events]),
        pl.concat([_empty_recipients(), *recipients]),
        pl.concat([pl.DataFrame(schema={"run": pl.UInt32}), *blocked]),
    )


def _ranked_constraints(constraints: pl.DataFrame) -> pl.DataFrame:
    """Each run's group constraints in key order (``rank`` from 1), their keys split into
    ``attribute`` and ``value`` at the colon (§6.4 step 2)."""
    key = pl.col("constraint_key").str.split_exact(":", 1)
    return constraints.sort("run", "constraint_key").with_columns(
        pl.col("constraint_key").rank("ordinal").over("run").cast(pl.Int64).alias("rank"),
        key.struct.field("field_0").alias("attribute"),
        key.struct.field("field_1").alias("value"),
    )


def _empty_group_events() -> pl.DataFrame:
    return pl.DataFrame(schema={
        "run": pl.UInt32, "constraint_key": pl.String, "group_weight_before": WEIGHT, "max_weight": WEIGHT,
        "released_weight": WEIGHT, "status": pl.String, "event_order": pl.Int64,
    })


def _empty_recipients() -> pl.DataFrame:
    return pl.DataFrame(schema={
        "run": pl.UInt32, "constraint_key": pl.String, "instrument_id": pl.String, "share": WEIGHT, "recipient_order": pl.Int64,
    })


def _single_position_cap(market: Market, wm: pl.DataFrame, below_cap: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
                         class_cap: Callable[[pl.DataFrame], tuple[pl.DataFrame, pl.DataFrame]] | None = None):
    """§6.4 step 4 (reference) or RFC-0001 Step 3 (same-asset-class redistribution).
    ``below_cap``: the map with ``_excess`` → (slot, _below_cap), the candidates decided
    in 28 digits (``_candidates_in_28_digits``); ``class_cap``: the map rows (with
    asset_class) of RFC runs → their faults and weights in 28 digits
    (``_class_cap_in_28_digits``)."""
    m = pl.col("single_position_max_weight")
    has_cap = m.is_not_null()
    wm = wm.with_columns(
        pl.when(has_cap).then(dmax(pl.col("weight") - m, lit(0))).otherwise(lit(0)).sum().over("run").alias("_excess"),
        pl.when(has_cap & (pl.col("weight") > m)).then(m).otherwise(pl.col("weight")).alias("_capped"),
    )
    rfc = pl.col("single_position_cap_mode") == "RFC_ASSET_CLASS"
    ref = wm.filter(~rfc | ~has_cap)
    rfc_frame = wm.filter(rfc & has_cap)
    ref, ref_pending, capped = _cap_reference(ref, below_cap(ref) if below_cap is not None else None)
    rfc_frame, rfc_pending, rfc_faults = _cap_rfc(market, rfc_frame, below_cap(rfc_frame) if below_cap is not None else None, class_cap)
    out = pl.concat([ref, rfc_frame]).pipe(sort_rows, "run", "map_order")
    return out, pl.concat([ref_pending, rfc_pending]), rfc_faults, capped


def _cap_reference(wm: pl.DataFrame, below_cap: pl.DataFrame | None = None):
    m = pl.col("single_position_max_weight")
    below = pl.col("weight") < m
    if below_cap is not None and below_cap.height:
        wm = join_on_index(wm, below_cap, "slot")
        below = pl.coalesce("_below_cap", below)
    wm = wm.with_columns(pl.col("_capped").alias("weight"))
    cand = pl.col("buy") & below & (pl.col("_excess") > 0)
    wm = wm.with_columns(_sum_where(cand).alias("_C"))
    cands = (
        wm.filter(cand & (pl.col("_C") > 0))
        .with_columns(pl.col("map_order").rank("ordinal").over("run").alias("_rank"))
        .select("run", "slot", "_rank", (pl.col("weight") / pl.col("_C")).alias("_a"),
                (m - pl.col("weight")).alias("_h"))
    )
    state = wm.filter((pl.col("_excess") > 0) & (pl.col("_C") > 0)).group_by("run").agg(pl.col("_excess").first().alias("_rem"))
    shares = []
    max_rank = int(cands["_rank"].max() or 0)
    for rank in range(1, max_rank + 1):
        step = cands.filter(pl.col("_rank") == rank).join(state, on="run", how="inner")
        step = step.with_columns(_cap_share().alias("_share"))
        shares.append(step.select("slot", "_share"))
        state = state.join(step.select("run", "_share"), on="run", how="left").with_columns(
            (pl.col("_rem") - pl.col("_share").fill_null(lit(0))).alias("_rem")
        ).drop("_share")
    share = pl.concat([pl.DataFrame(schema={"slot": SLOT, "_share": WEIGHT}), *shares])
    if share.height:  # most books have no capped position: skip joining nothing onto every row
        wm = join_on_index(wm, share, "slot").with_columns(
            (pl.col("weight") + pl.col("_share").fill_null(lit(0))).alias("weight")
        ).drop("_share")
    pending = pl.concat([
        state.filter(pl.col("_rem") > lit("0.001")).select("run"),
        wm.filter((pl.col("_excess") > 0) & ~(pl.col("_C") > 0)).select("run").unique(),
    ])
    return wm.drop("_excess", "_capped", "_C", "_below_cap", strict=False), pending, state.select("run")


def _cap_share() -> pl.Expr:
    """min(rem × (w / C), m − w), computing the product only where min() can keep it:
    negative model weights (accepted unvalidated) can leave C near 0 and the product far
    outside Decimal(38, 28)'s range (|x| < 1e10), and min() is then m − w wherever the
    product is above it (a float estimate decides, with a margin of ten)."""
    above = (pl.col("_rem").cast(pl.Float64) * pl.col("_a").cast(pl.Float64) > 1e9) & (pl.col("_h") < lit("100000000"))
    return pl.when(above).then(pl.col("_h")).otherwise(
        dmin(pl.when(above).then(lit(0)).otherwise(pl.col("_rem")) * pl.col("_a"), pl.col("_h"))
    )


def _cap_rfc(market: Market, wm: pl.DataFrame, below_cap: pl.DataFrame | None = None,
             in_28_digits: Callable[[pl.DataFrame], tuple[pl.DataFrame, pl.DataFrame]] | None = None):
    """RFC-0001 §6 Step 3: excess of each capped instrument goes to buyable instruments of
    the same asset class below the cap; a recipient pushed over the cap blocks the run.
    Where a recipient lands within a last digit of the cap, the run's weights and whether
    one is over are those of ``in_28_digits`` (``_class_cap_in_28_digits``): a recipient
    that takes all of its class's excess lands exactly on the cap in exact arithmetic, and
    a unit of the 28th digit decides."""
    if wm.height == 0:
        return wm.drop("_excess", "_capped"), pl.DataFrame(schema={"run": pl.UInt32}), pl.DataFrame(schema=FAULTS_SCHEMA)
    m = pl.col("single_position_max_weight")
    wm = market.with_shelf(wm, ("asset_class",)).with_columns(pl.col("asset_class").fill_null("UNKNOWN"))
    wm = wm.with_columns(
        dmax(pl.col("weight") - m, lit(0)).sum().over("run", "asset_class").alias("_class_excess"),
        (pl.col("weight") > m).alias("_source"),
        pl.col("_capped").alias("weight"),
    )
    below = pl.col("weight") < m
    if below_cap is not None and below_cap.height:  # a weight within a last digit of the cap, decided in 28 digits
        wm = join_on_index(wm, below_cap, "slot")
        below = pl.coalesce("_below_cap", below)
    cand = pl.col("buy") & below
    wm = wm.with_columns(
        pl.when(cand).then(pl.col("weight")).otherwise(lit(0)).sum().over("run", "asset_class").alias("_C"),
    )
    recipient = cand & (pl.col("_class_excess") > 0) & (pl.col("_C") > 0)
    wm = wm.with_columns(
        pl.when(recipient).then(pl.col("weight") + pl.col("_class_excess") * (pl.col("weight") / positive_or_null("_C")))
        .otherwise(pl.col("weight")).alias("weight"),
        recipient.alias("_recipient"),
    )
    # only recipients can be above the cap now: every other weight was cut to it
    over = wm.filter(pl.col("weight") > m)
    sources = wm.filter("_source").join(over.select("run", "asset_class").unique(), on=["run", "asset_class"], how="semi")
    roles = pl.concat([sources.select("run", "slot", pl.lit("source").alias("_role")),
                       over.select("run", "slot", pl.lit("over").alias("_role"))])
    near = wm.filter(pl.col("_recipient") & ((pl.col("weight") - m).abs() < _LAST_DIGITS)).select("run").unique()
    if in_28_digits is not None and near.height:
        decided, weights, exact_roles = in_28_digits(wm.join(near, on="run", how="semi"))
        roles = pl.concat([roles.join(decided, on="run", how="anti"), exact_roles])
        wm = join_on_index(wm, weights, "slot").with_columns(pl.coalesce("_exact", "weight").alias("weight")).drop("_exact")
    faults = _concentration_faults(roles, wm)
    pending = wm.filter((pl.col("_class_excess") > 0) & ~(pl.col("_C") > 0)).select("run").unique()
    return wm.drop("_excess", "_capped", "_class_excess", "_C", "asset_class", "_below_cap", "_recipient", "_source",
                   strict=False), pending, faults


def _concentration_faults(roles: pl.DataFrame, wm: pl.DataFrame) -> pl.DataFrame:
    """(run, target_fault, target_fault_detail): INFEASIBLE_CONCENTRATION for each run of
    ``roles`` (run, slot, _role: ``source`` for an entry above the cap in a class where a
    recipient ends over it, ``over`` for such a recipient), with RFC-0001 §7's problem
    detail naming them in map order, e.g. "Redistributing excess weight from EQ_A caused
    EQ_B to exceed the 10% cap." (``wm``: run, slot, instrument_id, map_order,
    single_position_max_weight)."""
    named = join_on_index(roles, wm.select("slot", "instrument_id", "map_order", "single_position_max_weight"), "slot", how="inner")

    def listed(role: str) -> pl.Expr:
        """The role's instruments as "A", "A and B" or "A, B and C"."""
        ids = pl.col(role)
        return pl.when(ids.list.len() < 2).then(ids.list.first()).otherwise(
            ids.list.head(ids.list.len() - 1).list.join(", ") + " and " + ids.list.last()
        )

    cap = units_text(pl.col("single_position_max_weight").cast(WEIGHT) * 100)
    return named.sort("run", "map_order").group_by("run", maintain_order=True).agg(
        *(pl.col("instrument_id").filter(pl.col("_role") == role).alias(role) for role in ("source", "over")),
        pl.col("single_position_max_weight").first(),
    ).select(
        "run", pl.lit("INFEASIBLE_CONCENTRATION").alias("target_fault"),
        pl.format("Redistributing excess weight from {} caused {} to exceed the {}% cap.", listed("source"), listed("over"), cap)
        .alias("target_fault_detail"),
    )


def _trace(wm: pl.DataFrame, model: pl.DataFrame, totals: pl.DataFrame) -> pl.DataFrame:
    """§6.5: model targets in model order, then non-model map entries in map order."""
    # a slot names one (run, instrument): joins on it are joins on (run, instrument_id)
    weights = wm.select("slot", pl.col("weight").alias("final_weight"))
    model_rows = join_on_index(model, weights, "slot").select(
        "run", "instrument_id", pl.col("model_seq").cast(pl.Int64).alias("trace_order"),
        pl.col("model_weight"), pl.col("final_weight").fill_null(lit(0)), pl.lit(True).alias("in_model"), "slot",
    )
    others = wm.filter(~pl.col("slot").is_in(model["slot"].implode())).select(
        "run", "instrument_id", pl.col("map_order").alias("trace_order"), lit("0.0").cast(WEIGHT).alias("model_weight"),
        pl.col("weight").alias("final_weight"), pl.lit(False).alias("in_model"), "slot",
    )
    # ordered before the tags and values are added (row-wise both), so the sort moves two fewer columns
    trace = join_runs(pl.concat([model_rows, others]).pipe(sort_rows, "run", "trace_order"), totals.select("run", "total_value"))
    tag_case = (
        pl.when(~pl.col("in_model")).then(pl.when(pl.col("final_weight") == 0).then(0).otherwise(1))
        .when(pl.col("model_weight") > pl.col("final_weight")).then(2)
        .when(pl.col("final_weight") > pl.col("model_weight")).then(3)
        .otherwise(4)
    )
    trace = with_code_lists(trace, tag_case, TAG_LISTS, "tags")
    return trace.with_columns(final_value("final_weight", trace).alias("final_value")).drop("total_value")


def final_value(weight: str, frame: pl.DataFrame | None = None) -> pl.Expr:
    """total_value × ``weight`` (§6.5) from every digit of the weight: 15000 × 0.3333…3 at
    28 decimals is the reference's 5000, where the weight read at 20 decimals gives
    4999.99999999999999995 (``product_of_all_digits``, for ``frame``; every weight carries
    28 decimals)."""
    return product_of_all_digits(pl.col("total_value"), pl.col(weight), VALUE_TIMES_WEIGHT, frame)
