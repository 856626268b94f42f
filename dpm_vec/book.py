"""The Book: every input of a rebalance sweep as Polars frames.

A Book is the one source interface of the engine: a Parquet directory, a JSON request and
a test fixture all become a Book. Each table is keyed so that several market snapshots,
shelves, models and holdings snapshots can live side by side; ``portfolios`` has one row
per run (a portfolio, a portfolio under a scenario, or one JSON request of a batch).

Row order inside each key group is meaningful (it is the list order of the reference
contract: model order drives the target trace, position order the after-state), so the
readers add an explicit ``seq`` column and every later stage sorts by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from decimal import Decimal

import polars as pl

from dpm_vec.numeric import AMOUNT_28, DEC, QTY, WEIGHT

STR = pl.String
BOOL = pl.Boolean
INT = pl.Int32

SHELF_STATUSES = ("APPROVED", "RESTRICTED", "BANNED", "SUSPENDED", "SELL_ONLY")
VALUATION_MODES = ("CALCULATED", "TRUST_SNAPSHOT")
TARGET_METHODS = ("HEURISTIC", "SOLVER")
CAP_MODES = ("REFERENCE", "RFC_ASSET_CLASS")
STALE_ACTIONS = ("BLOCK", "EXCLUDE")  # stale_price_action and missing_shelf_action
HELD_BANNED_ACTIONS = ("LOCK", "LIQUIDATE")
TRADE_BY = ("UNITS", "NOTIONAL")
LIQUIDITY_TIERS = ("L1", "L2", "L3", "L4", "L5")
SNAPSHOT_KINDS = ("MODEL", "SHELF", "MARKET", "PORTFOLIO")
# how far a position's lots may sum from its quantity (spec §3.6 item 6): the JSON door's
# 422 and a book's INVALID_HOLDINGS
LOT_SUM_TOLERANCE = Decimal("0.0001")

# (column, dtype, required, default). Defaults are the reference service's option defaults
# (spec §4) or, for RFC-0001 options the reference lacks, values that keep reference
# behaviour.
POLICY_COLUMNS: list[tuple[str, pl.DataType, object]] = [
    ("valuation_mode", STR, "CALCULATED"),
    ("target_method", STR, "HEURISTIC"),
    ("cash_band_min_weight", DEC, Decimal("0.00")),
    ("cash_band_max_weight", DEC, Decimal("1.00")),
    ("single_position_max_weight", DEC, None),
    ("single_position_cap_mode", STR, "REFERENCE"),
    ("min_trade_notional_amount", DEC, None),
    ("min_trade_notional_currency", STR, None),
    ("allow_restricted", BOOL, False),
    ("suppress_dust_trades", BOOL, True),
    ("fx_buffer_pct", DEC, Decimal("0.01")),
    ("block_on_missing_prices", BOOL, True),
    ("block_on_missing_fx", BOOL, True),
    ("min_cash_buffer_pct", DEC, Decimal("0.0")),
    ("max_turnover_pct", DEC, None),
    ("enable_tax_awareness", BOOL, False),
    ("max_realized_capital_gains", DEC, None),
    ("enable_settlement_awareness", BOOL, False),
    ("settlement_horizon_days", INT, 5),
    ("fx_settlement_days", INT, 2),
    ("enable_workflow_gates", BOOL, True),
    ("workflow_requires_client_consent", BOOL, False),
    ("client_consent_already_obtained", BOOL, False),
    ("notional_sizing", BOOL, False),
    ("max_staleness_minutes", INT, None),
    ("max_skew_minutes", INT, None),
    ("require_base_currency_fx", BOOL, False),
    ("fx_sweep_threshold", DEC, None),
    ("stale_price_action", STR, "BLOCK"),
    ("missing_shelf_action", STR, "BLOCK"),
    ("held_banned_action", STR, "LOCK"),
    ("allow_restricted_holdings", BOOL, False),
    ("rfc_rationale_codes", BOOL, False),
    ("rfc_fx_dependencies", BOOL, False),
    ("delta_from_valuation", BOOL, False),
    ("compare_target_methods", BOOL, False),
    ("compare_target_methods_tolerance", DEC, Decimal("0.0001")),
]

TABLES: dict[str, list[tuple[str, pl.DataType, bool]]] = {
    # (column, dtype, required)
    "portfolios": [
        ("run_key", STR, False),  # defaults to portfolio_id
        ("portfolio_id", STR, True),
        ("base_currency", STR, True),
        ("portfolio_snapshot_id", STR, False),  # defaults to portfolio_id
        ("market_snapshot_id", STR, False),  # defaults to "md"
        ("shelf_id", STR, False),  # defaults to "default"
        ("model_id", STR, True),
        ("portfolio_as_of", pl.Datetime("us", "UTC"), False),
        ("market_as_of", pl.Datetime("us", "UTC"), False),
        ("request_hash", STR, False),
        ("input_fault", STR, False),  # set by the book reader: a broken reference blocks the run
        ("scenario_id", STR, False),  # set by a what-if sweep: the scenario this run applies
    ]
    + [(name, dtype, False) for name, dtype, _ in POLICY_COLUMNS],
    "positions": [
        ("portfolio_snapshot_id", STR, True),
        ("instrument_id", STR, True),
        ("quantity", QTY, True),
        ("market_value", DEC, False),
        ("market_value_currency", STR, False),
    ],
    "cash": [
        ("portfolio_snapshot_id", STR, True),
        ("currency", STR, True),
        ("amount", DEC, True),
        ("amount_exact", AMOUNT_28, False),  # set by the readers where amount has more than DEC's decimals
        ("settled", DEC, False),
        ("pending", DEC, False),
    ],
    "lots": [
        ("portfolio_snapshot_id", STR, True),
        ("instrument_id", STR, True),
        ("lot_id", STR, True),
        ("quantity", QTY, True),
        ("unit_cost", DEC, True),
        ("cost_currency", STR, True),
        ("purchase_date", STR, True),
    ],
    "prices": [
        ("market_snapshot_id", STR, False),  # defaults to "md"
        ("instrument_id", STR, True),
        ("price", DEC, True),
        ("currency", STR, True),
        ("as_of", pl.Datetime("us", "UTC"), False),
    ],
    "fx_rates": [
        ("market_snapshot_id", STR, False),
        ("pair", STR, True),  # "FROM/TO": one unit of FROM is worth `rate` units of TO
        ("rate", DEC, True),
    ],
    "shelf": [
        ("shelf_id", STR, False),  # defaults to "default"
        ("instrument_id", STR, True),
        ("status", STR, True),
        ("asset_class", STR, False),  # defaults to "UNKNOWN"
        ("issuer_id", STR, False),
        ("liquidity_tier", STR, False),
        ("settlement_days", INT, False),  # defaults to 2
        ("min_notional_amount", DEC, False),
        ("min_notional_currency", STR, False),
        ("trade_by", STR, False),  # UNITS (default) or NOTIONAL (RFC fund sizing)
    ],
    "shelf_attributes": [
        ("shelf_id", STR, False),
        ("instrument_id", STR, True),
        ("attribute", STR, True),
        ("value", STR, True),
    ],
    "models": [
        ("model_id", STR, True),
        ("instrument_id", STR, True),
        ("weight", WEIGHT, True),  # all 28 decimals the target stage computes in (numeric.WEIGHT)
    ],
    "group_constraints": [
        ("run_key", STR, True),
        ("constraint_key", STR, True),  # "attribute:value"
        ("max_weight", DEC, True),
    ],
    "overdraft_limits": [
        ("run_key", STR, True),
        ("currency", STR, True),
        ("max_overdraft", DEC, True),
    ],
    # declares a model, shelf, market or holdings snapshot that exists although it may have
    # no rows (an empty model, shelf, market data, or a portfolio with no positions and no
    # cash): its portfolios run instead of being blocked as UNKNOWN_MODEL / UNKNOWN_SHELF /
    # UNKNOWN_MARKET_SNAPSHOT / UNKNOWN_PORTFOLIO_SNAPSHOT (import-requests writes it)
    "snapshots": [
        ("kind", STR, True),  # MODEL, SHELF, MARKET or PORTFOLIO
        ("snapshot_id", STR, True),
    ],
}

OPTIONAL_TABLES = ("lots", "shelf_attributes", "group_constraints", "overdraft_limits", "snapshots")

COLUMN_DEFAULTS: dict[tuple[str, str], object] = {
    ("portfolios", "market_snapshot_id"): "md",
    ("portfolios", "shelf_id"): "default",
    ("prices", "market_snapshot_id"): "md",
    ("fx_rates", "market_snapshot_id"): "md",
    ("shelf", "shelf_id"): "default",
    ("shelf", "asset_class"): "UNKNOWN",
    ("shelf", "settlement_days"): 2,
    ("shelf", "trade_by"): "UNITS",
    ("shelf_attributes", "shelf_id"): "default",
    **{("portfolios", name): default for name, _, default in POLICY_COLUMNS},
}


def table_schema(table: str) -> dict[str, pl.DataType]:
    return {name: dtype for name, dtype, _ in TABLES[table]}


def empty_table(table: str) -> pl.DataFrame:
    return pl.DataFrame(schema=table_schema(table))


@dataclass(frozen=True)
class Book:
    """Every input frame of one engine pass, already conformed (see ``conform``)."""

    portfolios: pl.DataFrame
    positions: pl.DataFrame
    cash: pl.DataFrame
    prices: pl.DataFrame
    fx_rates: pl.DataFrame
    shelf: pl.DataFrame
    models: pl.DataFrame
    lots: pl.DataFrame = field(default_factory=lambda: empty_table("lots"))
    shelf_attributes: pl.DataFrame = field(default_factory=lambda: empty_table("shelf_attributes"))
    group_constraints: pl.DataFrame = field(default_factory=lambda: empty_table("group_constraints"))
    overdraft_limits: pl.DataFrame = field(default_factory=lambda: empty_table("overdraft_limits"))
    snapshots: pl.DataFrame = field(default_factory=lambda: empty_table("snapshots"))

    def tables(self) -> dict[str, pl.DataFrame]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def finer_than(source: pl.DataType, dtype: pl.Decimal) -> bool:
    """Whether values of ``source`` may hold digits below ``dtype``'s smallest unit: a
    float, text, or a decimal of a larger scale."""
    return source.is_float() or source == STR or (isinstance(source, pl.Decimal) and (source.scale or 0) > (dtype.scale or 0))


# a column whose values may be smaller than its dtype's unit: a cash balance fed back from
# a result can be 2E-22; its ``amount`` reads 0 and ``amount_exact`` keeps it (``conform``)
FINEST_UNIT = {("cash", "amount"): AMOUNT_28}


def finest_unit(table: str, name: str, dtype: pl.DataType) -> pl.DataType:
    """The dtype whose smallest unit a value of column ``name`` that is not 0 must reach."""
    return FINEST_UNIT.get((table, name), dtype)


def cast_column(name: str, source: pl.DataType, dtype: pl.DataType, strict: bool = True,
                finest: pl.DataType | None = None) -> pl.Expr:
    """Column ``name`` of type ``source`` cast to the book dtype ``dtype``.

    A float becomes a decimal by its shortest round-trip text (88.0 -> 88, 0.1 -> 0.1,
    1e-05 -> 0.00001), cast as that text would be, not by its binary expansion: Polars
    casts the float 88.0 to 87.99999999999999105... at 28 decimals, which floors to 87
    units. A file written by pandas holds float64 by default. NaN and infinities have no
    decimal value: like text that is no number, they fail the cast (null when not
    ``strict``). A timestamp may be ISO 8601 text (``2025-06-30T21:00:00Z``, an offset, or
    none for UTC). A value that is not 0 must reach the smallest unit of ``finest``
    (default ``dtype``). An integer column may be floats of whole numbers; any other
    float (2.5, NaN, one beyond the type's range) is null, for the reader to name. A flag
    may be the integers 0 and 1; any other integer is null."""
    column = pl.col(name)
    if dtype.is_integer() and source.is_float():  # pandas writes an integer column with missing values as float64
        return pl.when(column.is_finite() & (column == column.floor())).then(column.cast(dtype, strict=False))
    if dtype == BOOL and source.is_integer():  # a flag exported as 0/1 (a database's bit column)
        return pl.when(column.is_in([0, 1])).then(column == 1)
    if isinstance(dtype, pl.Decimal) and source.is_float():
        column = column.cast(STR)  # Polars writes the shortest text that reads back as the same float
    if isinstance(dtype, pl.Datetime) and source == STR:  # ISO 8601 text, an offset or Z, else UTC
        return column.map_batches(lambda text: iso_timestamps(text, dtype, strict), return_dtype=dtype)
    cast = column.cast(dtype, strict=strict)
    if isinstance(dtype, pl.Decimal) and not strict and finer_than(source, dtype):
        # a value that is not 0 but below the column's smallest unit would be read as 0, a
        # different number: like one beyond its range, it has no value of the column
        given = pl.col(name).cast(pl.Float64, strict=False) if source == STR else pl.col(name)
        finest_cast = cast if finest is None or finest == dtype else column.cast(finest, strict=False)
        return pl.when((finest_cast == 0) & (given != 0)).then(None).otherwise(cast)
    return cast


# ISO 8601's extended and basic forms: a date, a time to the minute, second or a fraction, a Z or an offset
ISO_8601 = r"^\d{4}-?\d{2}-?\d{2}([T ]\d{2}:?\d{2}(:?\d{2}([.,]\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$"


def iso_timestamps(text: pl.Series, dtype: pl.Datetime, strict: bool = True) -> pl.Series:
    """ISO 8601 text as ``dtype``, each value read alone, as the JSON door reads one.
    Polars infers a column's format from its first value, so ``2025-06-30T21:00:00``
    first made every later ``...Z`` null (and which values those were depended on where a
    shard began): the values are parsed shape by shape (their text with every digit as
    0), each shape's own format inferred, however many shapes a column mixes. Text in no
    ISO 8601 form (``30/06/2025``, whose day and month another export would swap) is
    null, as is a value its shape's format does not read; ``strict``, either is an error
    naming it."""
    shapes = pl.select(pl.when(text.str.contains(ISO_8601)).then(text.str.replace_all(r"\d", "0"))).to_series()
    groups = (pl.DataFrame({"shape": shapes}).with_row_index("row").drop_nulls("shape")
              .group_by("shape", maintain_order=True).agg("row")["row"])
    parsed = pl.repeat(None, text.len(), dtype=dtype, eager=True).alias(text.name)
    if groups.len():
        rows = groups.explode()
        values = [text.gather(group).str.to_datetime(time_unit=dtype.time_unit, time_zone=dtype.time_zone, strict=False).cast(dtype)
                  for group in groups]
        parsed = parsed.scatter(rows, pl.concat(values))
    failed = parsed.is_null() & text.is_not_null()
    if strict and failed.any():
        raise pl.exceptions.InvalidOperationError(f"conversion from `str` to `{dtype}` failed for value {text.filter(failed)[0]!r}")
    return parsed


def amount_as_given(cash_row: dict) -> Decimal:
    """A cash row's balance with every digit it came with: ``amount_exact`` where the input
    had digits past DEC's 20 decimals (and no trade has moved it since), else ``amount``."""
    exact = cash_row.get("amount_exact")
    return exact if exact is not None else cash_row["amount"]


def _digits_past_dec(name: str, source: pl.DataType) -> pl.Expr:
    """Column ``name`` at AMOUNT_28's 28 decimals where it has digits past DEC's 20 and
    fits (below 1e10); null elsewhere, where DEC holds it whole or it is too large to have
    such digits among its 28 significant ones."""
    exact = cast_column(name, source, AMOUNT_28, strict=False)
    return pl.when(exact != cast_column(name, source, DEC, strict=False, finest=AMOUNT_28)).then(exact)


def conform(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """Fill optional columns with their defaults, cast to the book dtypes, add ``seq``.

    ``seq`` is the row's position in the table as given; it carries list order (§1.5).
    Structural checks (missing required columns, wrong types) are done by
    ``dpm_vec.schemas`` before this is called.
    """
    exprs = []
    for name, dtype, _required in TABLES[table]:
        if name in frame.columns:
            exprs.append(cast_column(name, frame.schema[name], dtype))
        elif (table, name) == ("cash", "amount_exact") and "amount" in frame.columns and finer_than(frame.schema["amount"], DEC):
            exprs.append(_digits_past_dec("amount", frame.schema["amount"]).alias(name))
        elif table == "portfolios" and name in ("run_key", "portfolio_snapshot_id"):
            exprs.append(pl.col("portfolio_id").cast(STR).alias(name))
        else:
            default = COLUMN_DEFAULTS.get((table, name))
            exprs.append(pl.lit(default, dtype=dtype).alias(name))
    if table == "portfolios":
        # a null policy cell means "this portfolio takes the default"
        fills = [
            pl.col(name).fill_null(pl.lit(default, dtype=dtype))
            for name, dtype, default in POLICY_COLUMNS
            if default is not None
        ]
        out = frame.select(exprs).with_columns(fills)
    else:
        out = frame.select(exprs)
        for (tname, cname), default in COLUMN_DEFAULTS.items():
            if tname == table and cname in out.columns and default is not None:
                out = out.with_columns(pl.col(cname).fill_null(default))
    return out.with_row_index("seq").with_columns(pl.col("seq").cast(pl.Int64))


def make_book(**frames: pl.DataFrame) -> Book:
    """Build a Book from raw frames (missing optional tables become empty)."""
    conformed = {}
    for table in TABLES:
        frame = frames.get(table)
        if frame is None:
            frame = empty_table(table)
        conformed[table] = conform(table, frame)
    return Book(**conformed)
