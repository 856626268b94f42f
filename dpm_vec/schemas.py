"""Pandera schemas: every input table of a book, and the engine's stage boundaries.

Input schemas catch structural faults — a wrong type, a duplicate key, a negative price,
a currency code that is not three capital letters — and ``check_table`` turns Pandera's
failure cases into one ``BookError`` that names the file, the column and example rows.
Per-portfolio data faults (a missing price, FX rate or shelf entry) are not structural:
the engine blocks that portfolio and runs the others.
"""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

from dpm_vec.book import SHELF_STATUSES, TABLES, TRADE_BY, LIQUIDITY_TIERS, POLICY_COLUMNS
from dpm_vec.codes import ExitPath, RunStatus
from dpm_vec.dec28 import F28, sign
from dpm_vec.errors import BookError
from dpm_vec.numeric import DEC, QTY

CCY = r"^[A-Z]{3}$"
PAIR = r"^[A-Z]{3}/[A-Z]{3}$"


def _ccy(nullable: bool = False) -> pa.Column:
    return pa.Column(pl.String, checks=pa.Check.str_matches(CCY), nullable=nullable)


def _id() -> pa.Column:
    return pa.Column(pl.String, checks=pa.Check.str_length(min_value=1), nullable=False)


INPUT_SCHEMAS: dict[str, pa.DataFrameSchema] = {
    "portfolios": pa.DataFrameSchema(
        {
            "run_key": _id(), "portfolio_id": _id(), "base_currency": _ccy(), "portfolio_snapshot_id": _id(),
            "market_snapshot_id": _id(), "shelf_id": _id(), "model_id": _id(),
            "valuation_mode": pa.Column(pl.String, checks=pa.Check.isin(["CALCULATED", "TRUST_SNAPSHOT"])),
            "target_method": pa.Column(pl.String, checks=pa.Check.isin(["HEURISTIC", "SOLVER"])),
            "single_position_cap_mode": pa.Column(pl.String, checks=pa.Check.isin(["REFERENCE", "RFC_ASSET_CLASS"])),
            "stale_price_action": pa.Column(pl.String, checks=pa.Check.isin(["BLOCK", "EXCLUDE"])),
            "max_turnover_pct": pa.Column(DEC, checks=pa.Check.in_range(0, 1), nullable=True),
            "max_realized_capital_gains": pa.Column(DEC, checks=pa.Check.ge(0), nullable=True),
            "settlement_horizon_days": pa.Column(pl.Int32, checks=pa.Check.in_range(0, 10)),
            "fx_settlement_days": pa.Column(pl.Int32, checks=pa.Check.in_range(0, 10)),
            "min_trade_notional_currency": _ccy(nullable=True),
        },
        unique=["run_key"],
    ),
    "positions": pa.DataFrameSchema(
        {"portfolio_snapshot_id": _id(), "instrument_id": _id(),
         "quantity": pa.Column(QTY, checks=pa.Check.lt(10**9), nullable=False),
         "market_value": pa.Column(DEC, nullable=True), "market_value_currency": _ccy(nullable=True)},
        unique=["portfolio_snapshot_id", "instrument_id"],
    ),
    "cash": pa.DataFrameSchema(
        {"portfolio_snapshot_id": _id(), "currency": _ccy(), "amount": pa.Column(DEC, nullable=False)},
        unique=["portfolio_snapshot_id", "currency"],
    ),
    "lots": pa.DataFrameSchema(
        {"portfolio_snapshot_id": _id(), "instrument_id": _id(), "lot_id": _id(),
         "quantity": pa.Column(QTY, checks=pa.Check.ge(0)), "unit_cost": pa.Column(DEC, nullable=False),
         "cost_currency": _ccy(), "purchase_date": pa.Column(pl.String, nullable=False)},
        unique=["portfolio_snapshot_id", "instrument_id", "lot_id"],
    ),
    "prices": pa.DataFrameSchema(
        {"market_snapshot_id": _id(), "instrument_id": _id(), "price": pa.Column(DEC, checks=pa.Check.gt(0)),
         "currency": _ccy()},
        unique=["market_snapshot_id", "instrument_id"],
    ),
    "fx_rates": pa.DataFrameSchema(
        {"market_snapshot_id": _id(), "pair": pa.Column(pl.String, checks=pa.Check.str_matches(PAIR)),
         "rate": pa.Column(DEC, checks=pa.Check.ge(0))},
        unique=["market_snapshot_id", "pair"],
    ),
    "shelf": pa.DataFrameSchema(
        {"shelf_id": _id(), "instrument_id": _id(), "status": pa.Column(pl.String, checks=pa.Check.isin(list(SHELF_STATUSES))),
         "asset_class": pa.Column(pl.String, nullable=False),
         "liquidity_tier": pa.Column(pl.String, checks=pa.Check.isin(list(LIQUIDITY_TIERS)), nullable=True),
         "settlement_days": pa.Column(pl.Int32, checks=pa.Check.in_range(0, 10)),
         "min_notional_currency": _ccy(nullable=True),
         "trade_by": pa.Column(pl.String, checks=pa.Check.isin(list(TRADE_BY)))},
        unique=["shelf_id", "instrument_id"],
    ),
    "shelf_attributes": pa.DataFrameSchema(
        {"shelf_id": _id(), "instrument_id": _id(), "attribute": _id(), "value": pa.Column(pl.String, nullable=False)},
        unique=["shelf_id", "instrument_id", "attribute"],
    ),
    "models": pa.DataFrameSchema(
        {"model_id": _id(), "instrument_id": _id(), "weight": pa.Column(DEC, nullable=False)},
        unique=["model_id", "instrument_id"],
    ),
    "group_constraints": pa.DataFrameSchema(
        {"run_key": _id(), "constraint_key": pa.Column(pl.String, checks=pa.Check.str_matches(r"^[^:]+:[^:]+$")),
         "max_weight": pa.Column(DEC, checks=pa.Check.in_range(0, 1))},
        unique=["run_key", "constraint_key"],
    ),
    "overdraft_limits": pa.DataFrameSchema(
        {"run_key": _id(), "currency": _ccy(), "max_overdraft": pa.Column(DEC, checks=pa.Check.ge(0))},
        unique=["run_key", "currency"],
    ),
}
assert set(INPUT_SCHEMAS) == set(TABLES)
assert {name for name, _, _ in POLICY_COLUMNS} >= {"valuation_mode", "target_method"}


def failure_cases(table: str, frame: pl.DataFrame) -> pl.DataFrame | None:
    """Pandera's failure cases of a conformed table (``index``: the failing row, null for
    a fault of a whole column), or None when every check passes."""
    try:
        INPUT_SCHEMAS[table].validate(frame.drop("seq", strict=False), lazy=True)
    except pa.errors.SchemaErrors as exc:
        return exc.failure_cases
    return None


def raise_failures(cases: pl.DataFrame, file: str) -> None:
    """One ``BookError`` describing every failed check, with example rows."""
    first = cases.row(0, named=True)
    checks = sorted(set(cases["check"].cast(pl.String).to_list()))
    column = first.get("column") or "(row)"
    examples = []
    for row in cases.head(5).iter_rows(named=True):
        index = row.get("index")
        examples.append(f"row {index} (0-based): {row.get('column') or ''} {row['failure_case']!s:.120} fails {row['check']}")
    raise BookError(file, f"{cases.height} failed check(s): {', '.join(checks)}", column=column, examples=examples)


def check_table(table: str, frame: pl.DataFrame, file: str) -> None:
    """Validate a conformed table; raise one BookError describing every failed check."""
    cases = failure_cases(table, frame)
    if cases is not None:
        raise_failures(cases, file)


# Stage boundary schemas: what the engine promises its outputs look like.
INTENTS_SCHEMA = pa.DataFrameSchema(
    {
        "run": pa.Column(pl.UInt32), "intent_id": _id(),
        "intent_type": pa.Column(pl.String, checks=pa.Check.isin(["SECURITY_TRADE", "FX_SPOT"])),
        "side": pa.Column(pl.String, checks=pa.Check.isin(["BUY", "SELL"]), nullable=True),
        "quantity": pa.Column(QTY, checks=pa.Check.ge(0), nullable=True),
        "quantity_f28": pa.Column(F28, nullable=True),
        "notional": pa.Column(DEC, checks=pa.Check.ge(0), nullable=True),
        "buy_amount": pa.Column(DEC, checks=pa.Check.gt(0), nullable=True),
        "sell_amount_estimated": pa.Column(DEC, checks=pa.Check.gt(0), nullable=True),
    },
    # a security trade moves a positive quantity; one below 1e-28 units (tax-limited) is 0
    # at Decimal(38, 28) and positive only in its 28-digit value
    checks=[pa.Check(
        lambda data: data.lazyframe.select(pl.col("quantity").is_null() | (pl.col("quantity") > 0) | (sign("quantity_f28") > 0)),
        name="positive_quantity",
    )],
    unique=["run", "intent_id"],
)
RUNS_SCHEMA = pa.DataFrameSchema(
    {
        "run": pa.Column(pl.UInt32), "run_key": _id(),
        "status": pa.Column(pl.String, checks=pa.Check.isin([s.value for s in RunStatus])),
        "exit_path": pa.Column(pl.String, checks=pa.Check.isin([e.value for e in ExitPath])),
    },
    unique=["run"],
)
RULES_SCHEMA = pa.DataFrameSchema(
    {
        "run": pa.Column(pl.UInt32), "rule_id": _id(),
        "severity": pa.Column(pl.String, checks=pa.Check.isin(["HARD", "SOFT"])),
        "status": pa.Column(pl.String, checks=pa.Check.isin(["PASS", "FAIL"])),
    },
)
