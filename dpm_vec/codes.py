"""Reason, rationale and warning codes: the one enum shared by engine, API and docs."""

from __future__ import annotations

from enum import StrEnum

import polars as pl

from dpm_vec.frames import join_on_index


class RunStatus(StrEnum):
    READY = "READY"
    PENDING_REVIEW = "PENDING_REVIEW"
    BLOCKED = "BLOCKED"


class ExitPath(StrEnum):
    """How a run left the pipeline (spec §5.9)."""

    EARLY_BLOCK = "E1"
    DQ_GATE_2 = "E2"
    SETTLEMENT = "E3"
    HARD_RULE = "E4"
    RECONCILIATION = "E5"
    NORMAL = "E6"


# the exits that stop a run before its trades: no intents, no tax impact
BEFORE_TRADES = (ExitPath.EARLY_BLOCK.value, ExitPath.DQ_GATE_2.value)


class InputFault(StrEnum):
    """Run-level block reasons dpm_vec adds to the reference (§9.1, RFC-0001)."""

    NEGATIVE_QUANTITY = "NEGATIVE_QUANTITY"
    NON_POSITIVE_PRICE = "NON_POSITIVE_PRICE"
    PRICE_STALE = "PRICE_STALE"
    SNAPSHOT_SKEW = "SNAPSHOT_SKEW"
    BASE_CURRENCY_FX_MISSING = "BASE_CURRENCY_FX_MISSING"
    INFEASIBLE_CONCENTRATION = "INFEASIBLE_CONCENTRATION"
    ENGINE_ERROR = "ENGINE_ERROR"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    UNKNOWN_SHELF = "UNKNOWN_SHELF"
    UNKNOWN_MARKET_SNAPSHOT = "UNKNOWN_MARKET_SNAPSHOT"
    UNKNOWN_PORTFOLIO_SNAPSHOT = "UNKNOWN_PORTFOLIO_SNAPSHOT"
    INVALID_PORTFOLIO = "INVALID_PORTFOLIO"
    INVALID_HOLDINGS = "INVALID_HOLDINGS"
    INVALID_LIMITS = "INVALID_LIMITS"


# block reasons that head a JSON result's warnings; the reference tells its own blocks itself (warnings, rule_results)
ENGINE_BLOCKS = frozenset(InputFault)


class ReferenceBlock(StrEnum):
    """Why the reference blocks a run: its target stage's stops and its HARD rules. A
    blocked run's block_reason when dpm_vec found no fault of its own (of failed rules,
    the first in rule order)."""

    NO_ELIGIBLE_REDISTRIBUTION_DESTINATION = "NO_ELIGIBLE_REDISTRIBUTION_DESTINATION"
    INFEASIBLE_INFEASIBLE = "INFEASIBLE_INFEASIBLE"
    SOLVER_ERROR = "SOLVER_ERROR"
    SETTLEMENT_CASH_LADDER = "SETTLEMENT_CASH_LADDER"
    SINGLE_POSITION_MAX = "SINGLE_POSITION_MAX"
    DATA_QUALITY = "DATA_QUALITY"
    NO_SHORTING = "NO_SHORTING"
    INSUFFICIENT_CASH = "INSUFFICIENT_CASH"
    RECONCILIATION = "RECONCILIATION"


CODE_DESCRIPTIONS: dict[str, str] = {
    # universe exclusions
    "SHELF_STATUS_BANNED": "model target is BANNED on the shelf; not bought",
    "SHELF_STATUS_SUSPENDED": "model target is SUSPENDED on the shelf; not bought",
    "SHELF_STATUS_RESTRICTED": "model target is RESTRICTED and allow_restricted is off",
    "SHELF_STATUS_SELL_ONLY": "model target is SELL_ONLY: sold to zero, weight redistributed",
    "LOCKED_DUE_TO_BANNED": "held BANNED instrument kept at its current weight",
    "LOCKED_DUE_TO_SUSPENDED": "held SUSPENDED instrument kept at its current weight",
    "LOCKED_DUE_TO_RESTRICTED": "held RESTRICTED non-model instrument kept at its current weight",
    "LOCKED_DUE_TO_MISSING_SHELF": "held instrument without shelf entry kept at its current weight",
    "PRICE_STALE": "price older than max_staleness_minutes: blocks the run, or (stale_price_action EXCLUDE) excludes the instrument",
    "PRICE_MISSING": "RFC: no price, and stale_price_action EXCLUDE: the instrument is excluded (a held one locked), not a data-quality block",
    "SHELF_ENTRY_MISSING": "RFC: model target without a shelf entry, and missing_shelf_action EXCLUDE: not bought (a held one also locked), not a data-quality block",
    # intent rationales
    "DRIFT_REBALANCE": "reference rationale of every security trade",
    "REBALANCE_DRIFT": "RFC: trade closes a weight deviation of a held instrument",
    "CASH_INVESTMENT": "RFC: buy of an instrument not held before (investing cash)",
    "CONSTRAINT_CAP": "RFC: trade sized by a target capped at the single-position max (its model weight is above it)",
    "LIQUIDATION": "RFC: sale of a holding that is not in the model, or down to a final weight of 0",
    "FUNDING": "FX buy of a currency that security buys leave short",
    "SWEEP": "FX sale of surplus foreign cash into base currency",
    # trimmed or dropped trades
    "BELOW_MIN_NOTIONAL": "trade notional below the dust threshold; suppressed",
    "TURNOVER_LIMIT": "trade dropped to keep turnover within max_turnover_pct",
    "TAX_BUDGET_LIMIT_REACHED": "sell reduced by the realised-gains budget or lot coverage",
    # run-level blocks dpm_vec adds (runs table: block_reason; JSON: first warning)
    "NEGATIVE_QUANTITY": "a held quantity below zero (the reference would accept it)",
    "NON_POSITIVE_PRICE": "a zero price for a held or model instrument (the reference fails with a division error)",
    "SNAPSHOT_SKEW": "portfolio and market as_of further apart than max_skew_minutes",
    "BASE_CURRENCY_FX_MISSING": "RFC: require_base_currency_fx, and no FX rate of the market data names the base currency",
    "INFEASIBLE_CONCENTRATION": "RFC cap mode: redistribution pushed a recipient over single_position_max_weight",
    "UNKNOWN_MODEL": "the portfolio's model_id is not in models.parquet (nor declared in snapshots.parquet)",
    "UNKNOWN_SHELF": "the portfolio's shelf_id is not in shelf.parquet (nor declared in snapshots.parquet)",
    "UNKNOWN_MARKET_SNAPSHOT": "the portfolio's market_snapshot_id has no prices or FX rates (nor is declared in snapshots.parquet)",
    "UNKNOWN_PORTFOLIO_SNAPSHOT": "the portfolio's portfolio_snapshot_id has no positions or cash rows (nor is declared in snapshots.parquet)",
    "INVALID_PORTFOLIO": "a value of the portfolio's options, base currency, timestamps or snapshot, shelf or model id fails its checks (sweep: named in input_faults)",
    "INVALID_HOLDINGS": "a row of the portfolio's positions, cash or lots fails its checks (sweep: named in input_faults)",
    "INVALID_LIMITS": "a row of the portfolio's group_constraints or overdraft_limits fails its checks (sweep: named in input_faults)",
    "ENGINE_ERROR": "the engine could not compute this portfolio (e.g. an arithmetic overflow); the sweep went on",
    # run-level blocks the reference decides (runs table: block_reason and block_detail; JSON: its own warnings and rule_results)
    "NO_ELIGIBLE_REDISTRIBUTION_DESTINATION": "HEURISTIC: a group over its max_weight, and no buyable instrument outside it to take the excess",
    "INFEASIBLE_INFEASIBLE": "SOLVER: no target weights meet the model's bounds, the cash band and the caps (the INFEASIBILITY_HINT_* warnings say which)",
    "SOLVER_ERROR": "SOLVER: the solver gave no status",
    "SETTLEMENT_CASH_LADDER": "a currency's projected balance falls below its overdraft floor on a settlement day (exit E3)",
    "SINGLE_POSITION_MAX": "an after-state position weighs more than single_position_max_weight + 0.001",
    "DATA_QUALITY": "a price, FX rate or shelf entry the run needs is missing (exit E1 or E2)",
    "NO_SHORTING": "an after-state quantity is below zero: a sell exceeds the holding",
    "INSUFFICIENT_CASH": "an after-state cash balance is below zero",
    "RECONCILIATION": "the after-state value differs from the before-state by more than 0.5 + 0.05% (exit E5)",
}
assert {f.value for f in InputFault} | {r.value for r in ReferenceBlock} <= CODE_DESCRIPTIONS.keys()


def markdown_table() -> str:
    """The code table of docs/codes.md (generated: ``python -m dpm_vec.codes``)."""
    rows = "\n".join(f"| `{code}` | {text} |" for code, text in CODE_DESCRIPTIONS.items())
    return f"# Reason codes\n\nGenerated from `dpm_vec/codes.py` by `.venv/bin/python -m dpm_vec.codes`.\n\n| code | meaning |\n| --- | --- |\n{rows}\n"


def with_code_lists(frame: pl.DataFrame, case: pl.Expr, lists: list[list[str]], out: str) -> pl.DataFrame:
    """Add ``out`` = ``lists[case]``: a list-of-codes column (tags, constraints applied)
    picked by a small integer case. A join on a lookup table of the distinct lists is an
    order of magnitude cheaper than building list literals row by row with when/then."""
    table = pl.DataFrame({"_case": range(len(lists)), out: lists}, schema={"_case": pl.UInt8, out: pl.List(pl.String)})
    keyed = frame.with_columns(case.cast(pl.UInt8).alias("_case"))
    return join_on_index(keyed, table, "_case").drop("_case")


if __name__ == "__main__":
    print(markdown_table(), end="")
