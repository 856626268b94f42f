"""The engine: one pass of every stage over a whole Book.

    prepare → input checks → valuation → universe → targets → DQ gate #1 → translation
    → DQ gate #2 → turnover → FX → settlement → after-state → rules → reconciliation
    → status → gate

Each run leaves on one exit path (spec §5.9); the frames of the Result hold every run's
rows, keyed by ``run`` (and ``run_key`` in ``runs``). At each stage boundary the frames
that carry the run's money and weights forward (valued positions and cash, the weight map
and target trace, security intents, all intents, the after-state, runs and rule results)
are checked against their Pandera schemas (``dpm_vec.schemas``); a failed check raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import pandera.polars as pa
import polars as pl

from dpm_vec.book import Book
from dpm_vec.frames import only_runs, sort_rows, without_runs
from dpm_vec.schemas import (
    AFTER_POSITIONS_SCHEMA, INTENTS_SCHEMA, RULES_SCHEMA, RUNS_SCHEMA, SECURITY_INTENTS_SCHEMA, TARGET_TRACE_SCHEMA,
    VALUED_CASH_SCHEMA, VALUED_POSITIONS_SCHEMA, WEIGHT_MAP_SCHEMA, check_stage,
)
from dpm_vec.stages import compliance, dq
from dpm_vec.stages.checks import input_faults
from dpm_vec.stages.fx import plan_fx
from dpm_vec.stages.prepare import prepare
from dpm_vec.stages.settlement import cash_ladder
from dpm_vec.stages.solver import COMPARISON_SCHEMA
from dpm_vec.stages.targets import build_targets, warnings_frame
from dpm_vec.stages.trades import apply_turnover_cap, translate, within_quantity_range
from dpm_vec.stages.universe import build_universe
from dpm_vec.stages.valuation import ValuedState, at_printed_midpoints, value_state


@dataclass(frozen=True)
class Result:
    runs: pl.DataFrame
    intents: pl.DataFrame
    positions_before: pl.DataFrame
    positions_after: pl.DataFrame
    cash_before: pl.DataFrame
    cash_after: pl.DataFrame
    allocations_before: pl.DataFrame
    allocations_after: pl.DataFrame
    targets: pl.DataFrame
    exclusions: pl.DataFrame
    eligible: pl.DataFrame
    rule_results: pl.DataFrame
    data_quality: pl.DataFrame
    warnings: pl.DataFrame
    suppressed: pl.DataFrame
    dropped: pl.DataFrame
    group_events: pl.DataFrame
    group_recipients: pl.DataFrame
    tax_events: pl.DataFrame
    cash_ladder: pl.DataFrame
    cash_ladder_breaches: pl.DataFrame
    gate_reasons: pl.DataFrame
    method_comparison: pl.DataFrame

    def tables(self) -> dict[str, pl.DataFrame]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class StageTimer:
    """Wall time per pipeline stage, accumulated across calls (benchmarks, manifest)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def run(book: Book, *, allocations: bool = True, timer: StageTimer | None = None) -> Result:
    """Run every portfolio of ``book``. ``allocations=False`` skips the asset-class and
    attribute allocation buckets, which only the JSON door prints (sweeps do not); the
    Result's ``allocations`` is then empty. With them, a state weight within a hair of a
    4-dp midpoint holds the reference's 4-dp rounding of it (``at_printed_midpoints``)."""
    timer = timer or StageTimer()
    timer.lap("_idle")

    def boundary(stage: str, *contracts: tuple[pa.DataFrameSchema, pl.DataFrame]) -> None:
        """End ``stage``'s lap, then check its outputs against their schemas."""
        timer.lap(stage)
        for schema, frame in contracts:
            check_stage(schema, frame)
        timer.lap("stage_checks")

    p = prepare(book)
    timer.lap("prepare")
    runs, market = p.runs, p.market
    trust = pl.col("valuation_mode") == "TRUST_SNAPSHOT"
    before = value_state(market, runs, p.positions, p.cash, trust_snapshot=trust, stage=dq.VALUATION_BEFORE, allocations=allocations)
    boundary("valuation", *_valued(before))
    faults, price_excluded = input_faults(market, runs, p.positions, p.model)
    unpriced = price_excluded.filter(pl.col("reason") == "PRICE_MISSING")  # excluded, not blocked on
    timer.lap("checks")

    universe = build_universe(market, runs, p.model, before.positions, price_excluded, before.totals, before.cash)
    targets = build_targets(market, runs, universe.weight_map, universe.sell_only_excess, p.model, before.totals,
                            _by_run(book.group_constraints, runs), universe.exact, (before.positions, before.cash))
    boundary("universe+targets", (WEIGHT_MAP_SCHEMA, universe.weight_map), (TARGET_TRACE_SCHEMA, targets.trace))
    findings = dq.concat(dq.excuse_prices(before.dq, unpriced), universe.dq)

    # DQ gate #1 (§6.8), plus dpm_vec's own input faults and RFC-mode target faults
    counts1 = dq.blocking_counts(findings, runs)
    early = pl.concat([
        counts1.filter(pl.col("dq_count") > 0).select("run"),
        targets.status.filter(pl.col("target_status") == "BLOCKED").select("run"),
        faults.select("run"),
    ]).unique()
    live = without_runs(runs, early)

    tr = translate(market, live, only_runs(targets.trace, live), p.positions, p.lots, before.totals, universe.exact,
                   (before.positions, before.cash), targets.replay, universe.locked)
    boundary("translation+tax", (SECURITY_INTENTS_SCHEMA, tr.intents))
    findings = dq.concat(findings, dq.excuse_prices(tr.dq, unpriced))
    counts2 = dq.blocking_counts(findings, live)
    gate2 = counts2.filter(pl.col("dq_count") > 0).select("run")
    live = without_runs(live, gate2)

    kept, dropped, turnover_warnings = apply_turnover_cap(only_runs(tr.intents, live), live, before.totals, market,
                                                          (before.positions, before.cash))
    intents, fx_missing = plan_fx(market, live, within_quantity_range(kept, live), only_runs(p.cash, live))
    findings = dq.concat(findings, fx_missing)
    boundary("turnover+fx", (INTENTS_SCHEMA, intents))
    ladder = cash_ladder(market, live, intents, p.cash, _by_run(book.overdraft_limits, runs))
    timer.lap("settlement")
    settled_block = ladder.first_breach.select("run")

    # the after-state of every run, valued in one pass and so in (run, sequence) order: the
    # runs that did not block on the ladder trade (their intents applied, valued at market);
    # E3 revalues the before-state under its valuation mode, and a run stopped before trading
    # (E1, E2) keeps its before-state, which the same valuation gives again
    traded = without_runs(live, settled_block)
    stopped = pl.concat([early, gate2])
    pos_after, cash_after = compliance.apply_intents(p.positions, p.cash, intents, traded)
    cash_signs = compliance.exact_cash_signs(market, traded, intents, p.cash, cash_after)
    cash_after = compliance.with_exact_amounts(cash_after, cash_signs)
    after = value_state(market, runs, pos_after, cash_after, trust_snapshot=trust & ~pl.col("run").is_in(traded["run"].implode()),
                        stage=dq.VALUATION_AFTER, allocations=allocations)
    boundary("after_state", *_valued(after, AFTER_POSITIONS_SCHEMA))
    # a stopped run's findings are its before-state's, already counted
    findings = dq.concat(findings, dq.excuse_prices(without_runs(after.dq, stopped), unpriced))
    counts_final = dq.blocking_counts(findings, runs)

    def exact_after_cash(chosen: pl.DataFrame) -> pl.DataFrame:
        return compliance.exact_after_cash(market, chosen, intents, p.cash)

    n_suppressed = tr.suppressed.group_by("run").agg(pl.len().cast(pl.Int64).alias("n_suppressed"))
    missing = dq.missing_detail(findings, runs)
    rules_before = compliance.evaluate_rules(
        only_runs(runs, stopped), only_runs(before.positions, stopped), only_runs(p.cash, stopped), only_runs(before.allocations, stopped),
        counts_final, n_suppressed, market=market, dq_detail=missing, totals=before.totals,
    )
    rules_after = compliance.evaluate_rules(
        traded, after.positions, after.cash, after.allocations, counts_final, n_suppressed, cash_signs, market=market,
        exact_cash=exact_after_cash, dq_detail=missing, totals=after.totals,
    )
    hard_fail = rules_after.filter((pl.col("severity") == "HARD") & (pl.col("status") == "FAIL")).select("run").unique()
    recon = compliance.reconcile(
        only_runs(before.totals, without_runs(traded, hard_fail)), after.totals,
        exact_totals=lambda chosen: compliance.exact_reconciliation_totals(
            market, runs.join(chosen, on="run", how="semi"), (before.positions, p.cash), (after.positions, after.cash), exact_after_cash),
    )
    rule_results = pl.concat([
        rules_before, rules_after, compliance.reconciliation_rule(recon), compliance.settlement_rule(ladder.first_breach),
    ]).pipe(sort_rows, "run", "rule_order")
    mismatch = recon.filter(pl.col("reconciliation_status") == "MISMATCH").select("run")

    safety = rules_after.filter(pl.col("rule_id").is_in(["NO_SHORTING", "INSUFFICIENT_CASH"]) & (pl.col("status") == "FAIL"))
    warnings = pl.concat([
        targets.warnings, tr.warnings, turnover_warnings, ladder.warnings,
        warnings_frame(safety, pl.lit("SIMULATION_SAFETY_CHECK_FAILED"), compliance.SAFETY_ORDER + pl.col("rule_order")),
    ]).pipe(sort_rows, "run", "w_order")

    exit_path = (
        pl.when(pl.col("run").is_in(early["run"].implode())).then(pl.lit("E1"))
        .when(pl.col("run").is_in(gate2["run"].implode())).then(pl.lit("E2"))
        .when(pl.col("run").is_in(settled_block["run"].implode())).then(pl.lit("E3"))
        .when(pl.col("run").is_in(hard_fail["run"].implode())).then(pl.lit("E4"))
        .when(pl.col("run").is_in(mismatch["run"].implode())).then(pl.lit("E5"))
        .otherwise(pl.lit("E6"))
    )
    soft_fail = rule_results.filter((pl.col("severity") == "SOFT") & (pl.col("status") == "FAIL")).select("run").unique()
    out_runs = (
        runs.with_columns(exit_path.alias("exit_path"))
        .join(targets.status, on="run", how="left")
        .join(faults, on="run", how="left")
        .join(targets.blocks, on="run", how="left")
        .join(compliance.rule_blocks(rule_results), on="run", how="left")
        .with_columns(
            pl.when(pl.col("exit_path") != "E6").then(pl.lit("BLOCKED"))
            .when(pl.col("run").is_in(soft_fail["run"].implode())).then(pl.lit("PENDING_REVIEW"))
            .when(pl.col("target_status") == "PENDING_REVIEW").then(pl.lit("PENDING_REVIEW"))
            .otherwise(pl.lit("READY")).alias("status"),
        )
        .with_columns(  # dpm_vec's own fault first; else the reference's target-stage block or failed HARD rules
            pl.coalesce("fault_code", "target_fault", "target_block", pl.when(pl.col("status") == "BLOCKED").then("rule_block")).alias("block_reason"),
            # the detail of the reason chosen (an INVALID_* input fault's is the sweep's to add)
            pl.when(pl.col("fault_code").is_not_null()).then("fault_detail")
            .when(pl.col("target_fault").is_not_null()).then("target_fault_detail")
            .when(pl.col("target_block").is_not_null()).then("target_block_detail")
            .when(pl.col("status") == "BLOCKED").then("rule_block_detail").alias("block_detail"),
        )
        .join(before.totals.select("run", pl.col("total_value").alias("before_total_value")), on="run", how="left")
        .join(after.totals.select("run", pl.col("total_value").alias("after_total_value")), on="run", how="left")
        .join(recon.select("run", "delta", "tolerance", "reconciliation_status"), on="run", how="left")
        .join(tr.tax_totals, on="run", how="left")
    )
    gate, gate_reasons = compliance.gate_decisions(out_runs, rule_results, counts_final)
    out_runs = out_runs.join(gate, on="run", how="left").join(
        counts_final.select("run", "n_price_missing", "n_fx_missing", "n_shelf_missing", "dq_count"), on="run", how="left"
    ).sort("run")

    if allocations:  # the JSON door prints state weights at 4 dp; rules and gate above read the fixed point
        before = at_printed_midpoints(market, runs, before)
        after = at_printed_midpoints(market, traded, after, exact_after_cash)
        after = at_printed_midpoints(market, without_runs(runs, traded), after)
    boundary("rules+status", (RUNS_SCHEMA, out_runs), (RULES_SCHEMA, rule_results))
    return Result(
        runs=out_runs,
        intents=intents.drop("slot", "list_order"),  # holding slots number one shard's rows; list order: internal
        positions_before=before.positions.drop("slot"),
        positions_after=after.positions.drop("slot"),
        cash_before=before.cash,
        cash_after=after.cash,
        # without allocations the buckets were built for the rules only; nobody prints them
        allocations_before=before.allocations if allocations else before.allocations.head(0),
        allocations_after=after.allocations if allocations else after.allocations.head(0),
        targets=targets.trace.drop("slot"),
        exclusions=universe.excluded,
        eligible=universe.eligible,
        rule_results=rule_results,
        data_quality=findings.sort("run", "stage", "seq"),
        warnings=warnings,
        suppressed=tr.suppressed,
        dropped=dropped,
        group_events=targets.group_events,
        group_recipients=targets.group_recipients,
        tax_events=only_runs(tr.tax_events, runs),
        cash_ladder=ladder.points,
        cash_ladder_breaches=ladder.breaches,
        gate_reasons=gate_reasons,
        method_comparison=targets.comparison if targets.comparison is not None else pl.DataFrame(schema=COMPARISON_SCHEMA),
    )


def _valued(state: ValuedState, positions: pa.DataFrameSchema = VALUED_POSITIONS_SCHEMA) -> tuple[tuple[pa.DataFrameSchema, pl.DataFrame], ...]:
    """A valued state's frames with their schemas (the after-state's positions are checked
    under that boundary's name). Totals are joined onto the runs, whose check would see a
    repeated run."""
    return (positions, state.positions), (VALUED_CASH_SCHEMA, state.cash)


def _by_run(table: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """A per-portfolio option table (keyed by run_key) keyed by run instead."""
    return runs.select("run", "run_key").join(table.drop("seq"), on="run_key", how="inner").drop("run_key")
