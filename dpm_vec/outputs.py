"""Result frames → the public Parquet output tables (documented in docs/outputs.md).

These tables are an interface for BI users: stable column names, one row grain each,
keyed by ``run_key``; money in Decimal(38, 20), quantities in Decimal(38, 28).
"""

from __future__ import annotations

import hashlib
import json

import polars as pl

from dpm_vec import __version__
from dpm_vec.book import POLICY_COLUMNS
from dpm_vec.codes import BEFORE_TRADES, ENGINE_BLOCKS, with_code_lists
from dpm_vec.frames import join_runs, position_in_run, sort_rows
from dpm_vec.numeric import lit
from dpm_vec.pipeline import Result

OUTPUT_TABLES = (
    "runs", "intents", "positions_after", "cash_after", "rule_results", "exclusions", "targets", "events", "cash_ladder",
)


def options_hashes(runs: pl.DataFrame) -> pl.DataFrame:
    """SHA-256 of each run's policy (canonical JSON), computed once per distinct policy."""
    names = [name for name, _, _ in POLICY_COLUMNS]
    distinct = runs.select(names).unique(maintain_order=True)
    hashes = [
        hashlib.sha256(json.dumps(row, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()
        for row in distinct.iter_rows(named=True)
    ]
    return distinct.with_columns(pl.Series("options_hash", hashes, dtype=pl.String))


def output_tables(result: Result, tables: tuple[str, ...] = OUTPUT_TABLES) -> dict[str, pl.DataFrame]:
    """The public tables named in ``tables`` (default all), built from one Result; a
    table nobody asked for is not built."""
    unknown = sorted(set(tables) - set(OUTPUT_TABLES))
    if unknown:
        raise ValueError(f"unknown output table(s) {unknown}; expected some of {list(OUTPUT_TABLES)}")
    keys = result.runs.select("run", "run_key")

    def keyed(frame: pl.DataFrame, *sort: str, sequence: bool = True) -> pl.DataFrame:
        """Rows keyed by run_key in list order; the last sort key, when it is an internal
        sequence number (which depends on how the book was sliced), becomes the row's
        0-based position within the run."""
        out = sort_rows(join_runs(frame, keys), "run", *sort)
        out = out.select("run", "run_key", pl.exclude("run", "run_key"))
        if sequence:
            out = out.with_columns(position_in_run().alias(sort[-1]))
        return out.drop("run")

    builders = {
        "runs": lambda: _runs_table(result),
        "intents": lambda: keyed(with_code_lists(
            result.intents,
            pl.col("min_notional_applied").fill_null(False).cast(pl.UInt8) + 2 * pl.col("tax_budget_applied").fill_null(False).cast(pl.UInt8),
            [[], ["MIN_NOTIONAL"], ["TAX_BUDGET"], ["MIN_NOTIONAL", "TAX_BUDGET"]], "constraints_applied",
        ).drop("min_notional_applied", "tax_budget_applied", "quantity_f28", "quantity_sig"), "exec_order"),
        "positions_after": lambda: keyed(result.positions_after.drop("market_value", "market_value_currency", "quantity_f28", strict=False), "pos_seq").rename({"pos_seq": "position_order"}),
        "cash_after": lambda: keyed(result.cash_after.drop("amount_exact", strict=False), "cash_seq").rename({"cash_seq": "cash_order"}),
        "rule_results": lambda: keyed(result.rule_results, "rule_order"),
        "exclusions": lambda: keyed(result.exclusions, "excl_order"),
        "targets": lambda: keyed(result.targets.drop("in_model"), "trace_order"),
        "events": lambda: _events_table(result, keys),
        "cash_ladder": lambda: keyed(result.cash_ladder.with_columns(pl.col("date_offset").cast(pl.Int64)), "currency", "date_offset",
                                     sequence=False),
    }
    return {name: builders[name]() for name in OUTPUT_TABLES if name in tables}


def _runs_table(result: Result) -> pl.DataFrame:
    """One row per run: verdict, totals, counts, warnings and the hashes that identify it."""
    names = [name for name, _, _ in POLICY_COLUMNS]
    intents = result.intents
    counts = intents.group_by("run").agg(
        (pl.col("intent_type") == "SECURITY_TRADE").sum().cast(pl.Int64).alias("security_intent_count"),
        (pl.col("intent_type") == "FX_SPOT").sum().cast(pl.Int64).alias("fx_intent_count"),
        pl.col("notional_base").filter(pl.col("intent_type") == "SECURITY_TRADE").sum().alias("gross_turnover_notional_base"),
    )
    warnings = _warning_codes(result).group_by("run", maintain_order=True).agg(pl.col("code").alias("warnings"))
    # the JSON door's tax_impact: a run that asked for tax awareness and reached its trades
    taxed = pl.col("enable_tax_awareness") & ~pl.col("exit_path").is_in(BEFORE_TRADES)
    comparison = result.method_comparison.select(
        "run", pl.col("alternate_method"), pl.col("alternate_status"), pl.col("differing_instruments"),
    )
    return (
        result.runs.join(counts, on="run", how="left").join(warnings, on="run", how="left")
        .join(comparison, on="run", how="left")
        .join(options_hashes(result.runs), on=names, how="left", nulls_equal=True)
        .with_columns(
            pl.col("security_intent_count", "fx_intent_count").fill_null(0),
            pl.col("gross_turnover_notional_base").fill_null(lit(0)),
            *(pl.when(taxed).then(pl.col(c).fill_null(lit(0))).alias(c) for c in ("realized_gain", "realized_loss")),
            pl.col("warnings").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            pl.lit(__version__).alias("engine_version"),
        )
        .sort("run")
        .select(
            "run_key", "portfolio_id", "scenario_id", "base_currency", "portfolio_snapshot_id", "market_snapshot_id", "shelf_id", "model_id",
            "status", "exit_path", "block_reason", "block_detail", "target_method", "target_status", "alternate_method", "alternate_status",
            "differing_instruments", "before_total_value", "after_total_value",
            "reconciliation_status", pl.col("delta").alias("reconciliation_delta"), "security_intent_count", "fx_intent_count",
            "gross_turnover_notional_base", "dq_count", "n_price_missing", "n_fx_missing", "n_shelf_missing",
            "realized_gain", "realized_loss", "gate", "recommended_next_step", "hard_fail_count", "soft_fail_count",
            "warnings", "request_hash", "options_hash", "engine_version",
        )
    )


def _warning_codes(result: Result) -> pl.DataFrame:
    """(run, code, w_order): each run's warnings as the JSON door lists them, dpm_vec's own
    block code (codes.md) first."""
    blocks = result.runs.filter(pl.col("block_reason").is_in(sorted(ENGINE_BLOCKS))).select(
        "run", pl.col("block_reason").alias("code"), pl.lit(-1, dtype=pl.Int64).alias("w_order"))
    return pl.concat([blocks, result.warnings.select("run", "code", "w_order")]).sort("run", "w_order", maintain_order=True)


def _events_table(result: Result, keys: pl.DataFrame) -> pl.DataFrame:
    """Warnings, data-quality findings and the constraint events of every run, one row each."""
    events = pl.concat([
        _warning_codes(result).select("run", pl.lit("warning").alias("category"), "code", pl.lit(None, dtype=pl.String).alias("instrument_id"),
                               pl.lit(None, dtype=pl.String).alias("currency"), pl.lit(None, dtype=pl.Decimal(38, 20)).alias("amount"),
                               pl.col("w_order").alias("event_order")),
        result.data_quality.select("run", pl.lit("data_quality").alias("category"), pl.col("bucket").str.to_uppercase().alias("code"),
                                   pl.when(pl.col("bucket") == "fx_missing").then(None).otherwise(pl.col("item")).alias("instrument_id"),
                                   pl.when(pl.col("bucket") == "fx_missing").then(pl.col("item")).alias("currency"),
                                   pl.lit(None, dtype=pl.Decimal(38, 20)).alias("amount"),
                                   pl.int_range(pl.len()).over("run").alias("event_order")),  # in (run, stage, seq) order
        result.suppressed.select("run", pl.lit("suppressed_intent").alias("category"), pl.lit("BELOW_MIN_NOTIONAL").alias("code"),
                                 "instrument_id", "currency", pl.col("intended_notional").alias("amount"), pl.col("trace_order").alias("event_order")),
        result.dropped.select("run", pl.lit("dropped_intent").alias("category"), pl.lit("TURNOVER_LIMIT").alias("code"),
                              "instrument_id", pl.col("base_currency").alias("currency"), pl.col("potential_notional").alias("amount"),
                              pl.col("drop_order").alias("event_order")),
        result.group_events.select("run", pl.lit("group_constraint").alias("category"), ("GROUP_" + pl.col("status")).alias("code"),
                                   pl.col("constraint_key").alias("instrument_id"), pl.lit(None, dtype=pl.String).alias("currency"),
                                   pl.col("released_weight").cast(pl.Decimal(38, 20)).alias("amount"), pl.col("event_order")),
        result.tax_events.select("run", pl.lit("tax_budget").alias("category"), pl.lit("TAX_BUDGET_LIMIT_REACHED").alias("code"),
                                 "instrument_id", pl.lit(None, dtype=pl.String).alias("currency"),
                                 pl.col("allowed_quantity").cast(pl.Decimal(38, 20)).alias("amount"), pl.col("trace_order").alias("event_order")),  # noqa: E501
        result.cash_ladder_breaches.select("run", pl.lit("settlement").alias("category"), "reason_code", pl.lit(None, dtype=pl.String).alias("instrument_id"),
                                           "currency", pl.col("projected_balance").alias("amount"),
                                           pl.col("breach_order").alias("event_order")).rename({"reason_code": "code"}),
    ], how="vertical_relaxed")
    return (
        keys.join(events, on="run").sort("run", "category", "event_order")
        .with_columns(pl.int_range(pl.len()).over("run", "category").cast(pl.Int64).alias("event_order")).drop("run")
    )
