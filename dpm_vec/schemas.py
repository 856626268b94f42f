"""Pandera schemas: every input table of a book, and the engine's stage boundaries.

Input schemas catch structural faults — a wrong type, a duplicate key, a negative price,
a currency code that is not three capital letters — and ``check_table`` turns Pandera's
failure cases into one ``BookError`` that names the file, the column and example rows.
Per-portfolio data faults (a missing price, FX rate or shelf entry) are not structural:
the engine blocks that portfolio and runs the others.
"""

from __future__ import annotations

import json

import pandera.polars as pa
import polars as pl

from dpm_vec.book import (
    CAP_MODES, HELD_BANNED_ACTIONS, LIQUIDITY_TIERS, POLICY_COLUMNS, SHELF_STATUSES, SNAPSHOT_KINDS, STALE_ACTIONS, TABLES, TARGET_METHODS,
    TRADE_BY, VALUATION_MODES,
)
from dpm_vec.codes import ExitPath, RunStatus
from dpm_vec.dec28 import F28, sign
from dpm_vec.errors import BookError
from dpm_vec.numeric import AMOUNT_28, AMOUNT_28_LIMIT, DEC, HALF_DEC_UNIT, MAX_MINUTES, MAX_WEIGHT, QTY, WEIGHT

CCY = r"^[A-Z]{3}$"
PAIR = r"^[A-Z]{3}/[A-Z]{3}$"


def _ccy(nullable: bool = False) -> pa.Column:
    return pa.Column(pl.String, checks=pa.Check.str_matches(CCY), nullable=nullable)


def _currency_of(amount: str) -> pa.Column:
    """A money column's currency: a three-letter code wherever ``amount`` is set (a Money
    needs both, as the JSON door's 422 says, spec §3.6); null beside a null amount."""
    def check(data) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(data.key).is_not_null() | pl.col(amount).is_null())

    return pa.Column(pl.String, checks=[pa.Check.str_matches(CCY), pa.Check(check, name=f"not_null_where_{amount}_is", ignore_na=False)],
                     nullable=True)


def _id() -> pa.Column:
    return pa.Column(pl.String, checks=pa.Check.str_length(min_value=1), nullable=False)


def unique_rows(key: list[str]) -> pa.Check:
    """Pandera's ``unique=key`` check (same name, same failure cases), cheaper on the
    clean frames a sweep nearly always sees: distinct 64-bit row hashes prove the keys
    distinct (~9 ms on 440,000 holdings of two string keys, where ``is_duplicated`` takes
    ~40 ms); only a repeated hash (a duplicate, or a collision) pays for the exact test."""
    def check(data) -> pl.LazyFrame:
        keys = data.lazyframe.select(key).collect()
        if keys.hash_rows().n_unique() == keys.height:
            return pl.LazyFrame({"unique": pl.repeat(True, keys.height, eager=True)})
        return pl.LazyFrame({"unique": ~keys.is_duplicated()})

    return pa.Check(check, name="multiple_fields_uniqueness", ignore_na=False)


def _rounds_to_amount(data) -> pl.LazyFrame:
    """``amount_exact`` is ``amount`` with more digits: within half a unit of its 20th
    decimal (a fed-back balance's 28 decimals), or null. Another number would have the
    28-digit decisions over cash start from a balance that the outputs do not show."""
    exact = pl.col("amount_exact")
    # AMOUNT_28 holds balances below 1E+10, as amount_exact is: a larger amount is another balance
    amount = pl.when(pl.col("amount").abs() < AMOUNT_28_LIMIT).then(pl.col("amount")).cast(AMOUNT_28)
    return data.lazyframe.select(exact.is_null() | ((exact - amount).abs() <= pl.lit(HALF_DEC_UNIT, dtype=AMOUNT_28)).fill_null(False))


def _keyed(columns: dict[str, pa.Column], key: list[str]) -> pa.DataFrameSchema:
    """An input table's schema: its columns, and ``key`` unique (Pandera's own check for
    one column, ``unique_rows`` for several)."""
    if len(key) == 1:
        return pa.DataFrameSchema(columns, unique=key, metadata={"key": key})
    return pa.DataFrameSchema(columns, checks=[unique_rows(key)], metadata={"key": key})


INPUT_SCHEMAS: dict[str, pa.DataFrameSchema] = {
    "portfolios": _keyed(
        {
            "run_key": _id(), "portfolio_id": _id(), "base_currency": _ccy(), "portfolio_snapshot_id": _id(),
            "market_snapshot_id": _id(), "shelf_id": _id(), "model_id": _id(),
            "valuation_mode": pa.Column(pl.String, checks=pa.Check.isin(list(VALUATION_MODES))),
            "target_method": pa.Column(pl.String, checks=pa.Check.isin(list(TARGET_METHODS))),
            "single_position_cap_mode": pa.Column(pl.String, checks=pa.Check.isin(list(CAP_MODES))),
            "stale_price_action": pa.Column(pl.String, checks=pa.Check.isin(list(STALE_ACTIONS))),
            "missing_shelf_action": pa.Column(pl.String, checks=pa.Check.isin(list(STALE_ACTIONS))),
            "held_banned_action": pa.Column(pl.String, checks=pa.Check.isin(list(HELD_BANNED_ACTIONS))),
            "max_turnover_pct": pa.Column(DEC, checks=pa.Check.in_range(0, 1), nullable=True),
            "single_position_max_weight": pa.Column(DEC, checks=pa.Check.in_range(-MAX_WEIGHT, MAX_WEIGHT), nullable=True),
            "min_cash_buffer_pct": pa.Column(DEC, checks=pa.Check.in_range(-MAX_WEIGHT, MAX_WEIGHT)),
            "max_realized_capital_gains": pa.Column(DEC, checks=pa.Check.ge(0), nullable=True),
            "fx_sweep_threshold": pa.Column(DEC, checks=pa.Check.ge(0), nullable=True),
            "settlement_horizon_days": pa.Column(pl.Int32, checks=pa.Check.in_range(0, 10)),
            "fx_settlement_days": pa.Column(pl.Int32, checks=pa.Check.in_range(0, 10)),
            "max_staleness_minutes": pa.Column(pl.Int32, checks=pa.Check.in_range(0, MAX_MINUTES), nullable=True),
            "max_skew_minutes": pa.Column(pl.Int32, checks=pa.Check.in_range(0, MAX_MINUTES), nullable=True),
            "min_trade_notional_currency": _currency_of("min_trade_notional_amount"),
        },
        ["run_key"],
    ),
    "positions": _keyed(
        {"portfolio_snapshot_id": _id(), "instrument_id": _id(),
         "quantity": pa.Column(QTY, checks=pa.Check.lt(10**9), nullable=False),
         "market_value": pa.Column(DEC, nullable=True), "market_value_currency": _currency_of("market_value")},
        ["portfolio_snapshot_id", "instrument_id"],
    ),
    "cash": _keyed(
        {"portfolio_snapshot_id": _id(), "currency": _ccy(), "amount": pa.Column(DEC, nullable=False),
         # the balance's own digits, where it has more than DEC's 20 decimals: the same balance
         "amount_exact": pa.Column(AMOUNT_28, nullable=True, checks=pa.Check(_rounds_to_amount, name="rounds_to_amount"), required=False)},
        ["portfolio_snapshot_id", "currency"],
    ),
    "lots": _keyed(
        {"portfolio_snapshot_id": _id(), "instrument_id": _id(), "lot_id": _id(),
         "quantity": pa.Column(QTY, checks=pa.Check.ge(0)), "unit_cost": pa.Column(DEC, nullable=False),
         "cost_currency": _ccy(), "purchase_date": pa.Column(pl.String, nullable=False)},
        ["portfolio_snapshot_id", "instrument_id", "lot_id"],
    ),
    "prices": _keyed(
        {"market_snapshot_id": _id(), "instrument_id": _id(), "price": pa.Column(DEC, checks=pa.Check.ge(0)),
         "currency": _ccy()},
        ["market_snapshot_id", "instrument_id"],
    ),
    "fx_rates": _keyed(
        {"market_snapshot_id": _id(), "pair": pa.Column(pl.String, checks=pa.Check.str_matches(PAIR)),
         "rate": pa.Column(DEC, checks=pa.Check.ge(0))},
        ["market_snapshot_id", "pair"],
    ),
    "shelf": _keyed(
        {"shelf_id": _id(), "instrument_id": _id(), "status": pa.Column(pl.String, checks=pa.Check.isin(list(SHELF_STATUSES))),
         "asset_class": pa.Column(pl.String, nullable=False),
         "liquidity_tier": pa.Column(pl.String, checks=pa.Check.isin(list(LIQUIDITY_TIERS)), nullable=True),
         "settlement_days": pa.Column(pl.Int32, checks=pa.Check.in_range(0, 10)),
         "min_notional_currency": _currency_of("min_notional_amount"),
         "trade_by": pa.Column(pl.String, checks=pa.Check.isin(list(TRADE_BY)))},
        ["shelf_id", "instrument_id"],
    ),
    "shelf_attributes": _keyed(
        {"shelf_id": _id(), "instrument_id": _id(), "attribute": _id(), "value": pa.Column(pl.String, nullable=False)},
        ["shelf_id", "instrument_id", "attribute"],
    ),
    "models": _keyed(
        {"model_id": _id(), "instrument_id": _id(), "weight": pa.Column(WEIGHT, nullable=False)},
        ["model_id", "instrument_id"],
    ),
    "group_constraints": _keyed(
        {"run_key": _id(), "constraint_key": pa.Column(pl.String, checks=pa.Check.str_matches(r"^[^:]+:[^:]+$")),
         "max_weight": pa.Column(DEC, checks=pa.Check.in_range(0, 1))},
        ["run_key", "constraint_key"],
    ),
    "overdraft_limits": _keyed(
        {"run_key": _id(), "currency": _ccy(), "max_overdraft": pa.Column(DEC, checks=pa.Check.ge(0))},
        ["run_key", "currency"],
    ),
    "snapshots": _keyed(
        {"kind": pa.Column(pl.String, checks=pa.Check.isin(list(SNAPSHOT_KINDS))), "snapshot_id": _id()},
        ["kind", "snapshot_id"],
    ),
}
assert set(INPUT_SCHEMAS) == set(TABLES)
assert {name for name, _, _ in POLICY_COLUMNS} >= {"valuation_mode", "target_method"}


def failure_cases(table: str, frame: pl.DataFrame, columns: list[str] | None = None) -> pl.DataFrame | None:
    """Pandera's failure cases of a conformed table (``index``: the failing row, null for
    a fault of a whole column), or None when every check passes; ``columns``: only
    those columns' checks (a column the schema lacks has none), on a frame that may hold
    only them."""
    schema = INPUT_SCHEMAS[table]
    if columns is not None:
        schema = pa.DataFrameSchema({name: schema.columns[name] for name in columns if name in schema.columns})
    try:
        schema.validate(frame.drop("seq", strict=False), lazy=True)
    except pa.errors.SchemaErrors as exc:
        return exc.failure_cases
    return None


_UNIQUENESS = "multiple_fields_uniqueness"


def _example(case: dict, key: list[str]) -> str:
    """A failure case as an example row: a repeated key by its key columns' values (Pandera
    gives the whole row as JSON), another check by the failing value."""
    if case["check"] == _UNIQUENESS:
        try:
            row = json.loads(case["failure_case"])
            return f"row {case.get('index')} (0-based): " + ", ".join(f"{name} {row.get(name)!r}" for name in key)
        except (TypeError, ValueError):
            pass
    value = "null" if case["failure_case"] is None else case["failure_case"]
    return f"row {case.get('index')} (0-based): {case.get('column') or ''} {value!s:.120} fails {case['check']}"


def raise_failures(cases: pl.DataFrame, file: str, table: str) -> None:
    """One ``BookError`` describing every failed check of ``table``, with example rows."""
    key = INPUT_SCHEMAS[table].metadata["key"]
    named = cases.with_columns(pl.col("column").cast(pl.String).fill_null("(row)"), pl.col("check").cast(pl.String))
    by_column = named.group_by("column", maintain_order=True).agg(pl.col("check").unique().sort())
    if by_column.height == 1:
        column = by_column["column"][0]
        column = None if column == "(row)" else column  # a whole row's check: no column to name
        message = f"{cases.height} failed check(s): {', '.join(by_column['check'][0])}"
        if by_column["check"][0].to_list() == [_UNIQUENESS]:
            message = (f"{cases.height} rows share a key ({', '.join(key)}), which must be unique "
                       f"({_UNIQUENESS}): a repeated row, or two values for one key")
    else:  # name every failing column, each with its own checks
        column = None
        message = f"{cases.height} failed check(s) in columns " + "; ".join(
            f"{c!r}: {', '.join(checks)}" for c, checks in by_column.iter_rows()
        )
    examples = [_example(case, key) for case in cases.head(5).iter_rows(named=True)]
    raise BookError(file, message, column=column, examples=examples)


def check_table(table: str, frame: pl.DataFrame, file: str) -> None:
    """Validate a conformed table; raise one BookError describing every failed check."""
    cases = failure_cases(table, frame)
    if cases is not None:
        raise_failures(cases, file, table)


# Stage boundary schemas: what each stage promises the next, and the engine its users.
# Each boundary checks column types and a few rules every row must meet, all rules in one
# pass: a Pandera check per column costs a couple of milliseconds whatever the frame's
# size, which a one-request pass would pay a dozen times per boundary. Most stage outputs
# are in (run, sequence) order by construction, and a join that fans out or a concat that
# takes a part twice repeats a key, so a strictly increasing key (one pass, no hashing)
# also proves the keys unique. The weight map is unordered; its rows become the trace's.
def _in_key_order(key: list[str], strict: bool = True) -> pl.Expr:
    after, tied = pl.lit(False), pl.lit(True)
    for column in key:
        previous = pl.col(column).shift(1)
        after, tied = after | (tied & (pl.col(column) > previous)), tied & (pl.col(column) == previous)
    return pl.int_range(pl.len()).eq(0) | after | (pl.lit(not strict) & tied)  # the first row has no previous


def _one_of(column: str, values: list[str], nullable: bool = False) -> tuple[str, pl.Expr]:
    allowed = pl.col(column).is_in(values)
    return f"{column} is one of {', '.join(values)}" + (" or null" if nullable else ""), (
        pl.col(column).is_null() | allowed if nullable else allowed)


def _not_empty(column: str) -> tuple[str, pl.Expr]:
    return f"{column} not empty", pl.col(column).str.len_bytes() > 0


def _present(*columns: str) -> tuple[str, pl.Expr]:
    return f"{', '.join(columns)} not null", pl.all_horizontal(pl.col(c).is_not_null() for c in columns)


def _stage(name: str, key: list[str], dtypes: dict[str, pl.DataType], rules: list[tuple[str, pl.Expr]],
           unique: list[str] | None = None, order: str | None = "strictly increasing") -> pa.DataFrameSchema:
    """A boundary: ``run`` and ``key`` present (key columns Int64 unless ``dtypes`` says
    otherwise), rows in (run, key) ``order`` ("strictly increasing", "non-decreasing", or
    None for an unordered frame), the column types, and ``rules`` (what a row must meet,
    in words, and the condition) checked in one pass."""
    keys = ["run", *key]
    columns = {"run": pl.UInt32, **{c: pl.Int64 for c in key}, **dtypes}
    rules = [_present(*keys), *rules]
    if order:
        rules.append((f"rows in {order} ({', '.join(keys)}) order", _in_key_order(keys, strict=order == "strictly increasing")))
    every_rule = pl.all_horizontal(condition.fill_null(False) for _, condition in rules)
    check = pa.Check(lambda data: data.lazyframe.select(every_rule), name="rules", ignore_na=False)
    checks = [check, unique_rows(unique)] if unique else [check]
    return pa.DataFrameSchema({c: pa.Column(t, nullable=True) for c, t in columns.items()}, checks=checks, name=name,
                              metadata={"rules": rules})


HOLDING = {"instrument_id": pl.String, "quantity": QTY}
VALUED_POSITIONS_SCHEMA = _stage("valuation: positions", ["pos_seq"], HOLDING, [_present(*HOLDING)])
VALUED_CASH_SCHEMA = _stage("valuation: cash", ["cash_seq"], {"currency": pl.String, "amount": DEC}, [
    # any currency text: the JSON door takes what the reference takes (§3: not checked for
    # format or case); a book's input schemas hold its own tables to ISO codes
    _present("currency", "amount"),
])
WEIGHT_MAP_SCHEMA = _stage("universe: weight map", ["slot"], {"slot": pl.UInt32, "instrument_id": pl.String, "kind": pl.String},
                           [_present("instrument_id"), _one_of("kind", ["BUYABLE", "SELL_ONLY", "LOCKED", "LIQUIDATION"])], order=None)
TARGET_TRACE_SCHEMA = _stage("targets: trace", ["trace_order"], {"instrument_id": pl.String, "slot": pl.UInt32, "in_model": pl.Boolean},
                             [_present("instrument_id", "slot", "in_model")])
SECURITY_INTENTS_SCHEMA = _stage(
    "translation: security intents", ["intent_no"],
    {"instrument_id": pl.String, "slot": pl.UInt32, "side": pl.String, "quantity": QTY, "_units_beyond_range": DEC},
    [
        _present("instrument_id", "slot"), _one_of("side", ["BUY", "SELL"]),
        # a trade beyond QTY's range has no quantity until the turnover step has decided it
        ("quantity >= 0, or a trade beyond the quantity range",
         (pl.col("quantity") >= 0) | (pl.col("quantity").is_null() & (pl.col("_units_beyond_range") > 0))),
    ],
)
AFTER_POSITIONS_SCHEMA = _stage("after-state: positions", ["pos_seq"], HOLDING, [_present(*HOLDING)])
INTENTS_SCHEMA = _stage(
    "engine: intents", ["exec_order"],
    {"intent_id": pl.String, "intent_type": pl.String, "side": pl.String, "quantity": QTY, "quantity_f28": F28, "notional": DEC,
     "rationale_code": pl.String, "buy_amount": DEC, "sell_amount_estimated": DEC},
    [
        _not_empty("intent_id"),
        _one_of("intent_type", ["SECURITY_TRADE", "FX_SPOT"]),
        _one_of("side", ["BUY", "SELL"], nullable=True),
        # a security trade moves a positive quantity; one below 1e-28 units (tax-limited) is 0
        # at Decimal(38, 28) and positive only in its 28-digit value
        ("quantity > 0 or null", pl.col("quantity").is_null() | (pl.col("quantity") > 0) | (sign("quantity_f28") > 0)),
        ("notional >= 0 or null", pl.col("notional").is_null() | (pl.col("notional") >= 0)),
        ("buy_amount and sell_amount_estimated set on FX_SPOT intents only",
         (pl.col("intent_type") == "FX_SPOT") == (pl.col("buy_amount").is_not_null() & pl.col("sell_amount_estimated").is_not_null())),
        # a FUNDING buy is the shortfall times (1 + fx_buffer_pct), which the reference
        # accepts unvalidated: at -1 or below it is zero or negative. A SWEEP sells a surplus,
        # 0 at 20 decimals where it is the 28-digit dust of a tax-limited sell (stages/cash28.py)
        ("a SWEEP's buy_amount and sell_amount_estimated >= 0",
         (pl.col("rationale_code") != "SWEEP") | ((pl.col("buy_amount") >= 0) & (pl.col("sell_amount_estimated") >= 0))),
    ],
    unique=["run", "intent_id"],  # dependencies name intents by id
)
RUNS_SCHEMA = _stage("engine: runs", [], {"run_key": pl.String, "status": pl.String, "exit_path": pl.String}, [
    _not_empty("run_key"),
    _one_of("status", [s.value for s in RunStatus]),
    _one_of("exit_path", [e.value for e in ExitPath]),
])
# a rule checked per instrument or group has one row each, in rule order
RULES_SCHEMA = _stage("engine: rule results", ["rule_order"], {"rule_id": pl.String, "severity": pl.String, "status": pl.String}, [
    _not_empty("rule_id"),
    _one_of("severity", ["HARD", "SOFT"]), _one_of("status", ["PASS", "FAIL"]),
], order="non-decreasing")


class StageContractError(RuntimeError):
    """A stage's output broke its contract: a fault of the engine, never of the input."""


def check_stage(schema: pa.DataFrameSchema, frame: pl.DataFrame) -> None:
    """Validate the columns ``schema`` names. A break raises StageContractError naming
    the boundary, the rules broken and example rows; a sweep isolates it to the
    portfolios it comes from (ENGINE_ERROR) instead of writing their results."""
    frame = frame.select(list(schema.columns))
    if frame.is_empty():  # no row to break a rule; Pandera's fixed cost is most of a small pass's checks
        return
    try:
        schema.validate(frame)
    except pa.errors.SchemaError as exc:
        broken = [(what, frame.filter(~condition.fill_null(False))) for what, condition in schema.metadata["rules"]]
        broken = [f"{what} (e.g. {rows.head(2).to_dicts()})" for what, rows in broken if rows.height]
        raise StageContractError(f"{schema.name}: {'; '.join(broken) or str(exc).splitlines()[0]}") from exc
