"""Tiny books for stage unit tests.

``build_scenario(...)`` (fixture ``scenario``) turns Python literals into a Book via ``make_book`` and ``Stages`` runs
the engine's stage functions one after another, exactly as ``dpm_vec.pipeline.run``
wires them, so a test can look at the output of the one stage it is about.

Literals: numbers are given as strings (or ints) and become exact Decimals; list rows are
tuples in the column order below or dicts with column names.
"""
from __future__ import annotations

from decimal import Decimal
from functools import cached_property

import polars as pl
import pytest
from dpm_vec import pipeline
from dpm_vec.book import make_book, table_schema
from dpm_vec.numeric import DEC, QTY
from dpm_vec.stages import dq
from dpm_vec.stages.checks import input_faults
from dpm_vec.stages.fx import plan_fx
from dpm_vec.stages.prepare import prepare
from dpm_vec.stages.settlement import cash_ladder
from dpm_vec.stages.targets import build_targets
from dpm_vec.stages.trades import apply_turnover_cap, translate, within_quantity_range
from dpm_vec.stages.universe import build_universe
from dpm_vec.stages.valuation import value_state

D = Decimal

TUPLE_COLUMNS = {
    "positions": ("instrument_id", "quantity", "market_value", "market_value_currency"),
    "cash": ("currency", "amount", "settled", "pending"),
    "prices": ("instrument_id", "price", "currency"),
    "fx_rates": ("pair", "rate"),
    "shelf": ("instrument_id", "status", "asset_class"),
    "shelf_attributes": ("instrument_id", "attribute", "value"),
    "models": ("instrument_id", "weight"),
    "lots": ("instrument_id", "lot_id", "quantity", "unit_cost", "cost_currency", "purchase_date"),
}


def _value(dtype: pl.DataType, v):
    if v is None:
        return None
    if dtype in (DEC, QTY) or isinstance(dtype, pl.Decimal):
        return D(str(v))
    return v


def frame(table: str, rows) -> pl.DataFrame:
    """A raw frame of ``table`` from tuples/dicts; only the columns given are created."""
    schema = table_schema(table)
    dicts = []
    for row in rows:
        if isinstance(row, dict):
            dicts.append(row)
        else:
            dicts.append(dict(zip(TUPLE_COLUMNS[table], row)))
    cols: list[str] = []
    for d in dicts:
        for k in d:
            if k not in cols:
                cols.append(k)
    if not dicts:
        return pl.DataFrame(schema=schema)
    return pl.DataFrame(
        {c: pl.Series(c, [_value(schema[c], d.get(c)) for d in dicts], dtype=schema[c]) for c in cols}
    )


def build_scenario(
    *,
    base: str = "USD",
    positions=(),
    cash=(),
    prices=(),
    fx=(),
    shelf=(),
    model=(),
    lots=(),
    attributes=(),
    groups: dict | None = None,
    overdrafts: dict | None = None,
    runs: list[dict] | None = None,
    **policy,
):
    """One portfolio snapshot ``P1`` with model ``M1``, run once with ``policy`` or once per
    entry of ``runs`` (each a policy dict, optionally with its own ``base``, ``groups`` /
    ``overdrafts``; run keys R0, R1, ...). ``min_trade_notional=(amount, ccy)``."""
    if runs is None:
        runs = [dict(policy, groups=groups, overdrafts=overdrafts)]
    portfolio_rows, group_rows, overdraft_rows = [], [], []
    for i, r in enumerate(runs):
        r = dict(r)
        g = r.pop("groups", None) or {}
        o = r.pop("overdrafts", None) or {}
        key = f"R{i}"
        run_base = r.pop("base", base)
        mtn = r.pop("min_trade_notional", None)
        if mtn is not None:
            r["min_trade_notional_amount"], r["min_trade_notional_currency"] = mtn
        portfolio_rows.append(
            dict(run_key=key, portfolio_id="P1", portfolio_snapshot_id="P1", base_currency=run_base, model_id="M1", **r)
        )
        group_rows += [dict(run_key=key, constraint_key=k, max_weight=v) for k, v in g.items()]
        overdraft_rows += [dict(run_key=key, currency=k, max_overdraft=v) for k, v in o.items()]

    def snap(table, rows, **extra):
        out = []
        for row in rows:
            d = row if isinstance(row, dict) else dict(zip(TUPLE_COLUMNS[table], row))
            out.append({**extra, **{k: v for k, v in d.items()}})
        return out

    frames = dict(
        portfolios=frame("portfolios", portfolio_rows),
        positions=frame("positions", snap("positions", positions, portfolio_snapshot_id="P1")),
        cash=frame("cash", snap("cash", cash, portfolio_snapshot_id="P1")),
        prices=frame("prices", prices),
        fx_rates=frame("fx_rates", fx),
        shelf=frame("shelf", shelf),
        models=frame("models", snap("models", model, model_id="M1")),
        lots=frame("lots", snap("lots", lots, portfolio_snapshot_id="P1")),
        shelf_attributes=frame("shelf_attributes", attributes),
        group_constraints=frame("group_constraints", group_rows),
        overdraft_limits=frame("overdraft_limits", overdraft_rows),
    )
    return Stages(make_book(**frames))


class Stages:
    """Runs the stages in pipeline order, lazily; every attribute is one stage's output."""

    def __init__(self, book):
        self.book = book

    @cached_property
    def p(self):
        return prepare(self.book)

    @property
    def runs(self) -> pl.DataFrame:
        return self.p.runs

    @property
    def market(self):
        return self.p.market

    @cached_property
    def before(self):
        trust = pl.col("valuation_mode") == "TRUST_SNAPSHOT"
        return value_state(self.market, self.runs, self.p.positions, self.p.cash, trust_snapshot=trust, stage=dq.VALUATION_BEFORE)

    @cached_property
    def checks(self):
        return input_faults(self.market, self.runs, self.p.positions, self.p.model)

    @cached_property
    def universe(self):
        return build_universe(self.market, self.runs, self.p.model, self.before.positions, self.checks[1], self.before.totals, self.before.cash)

    @cached_property
    def targets(self):
        return build_targets(
            self.market, self.runs, self.universe.weight_map, self.universe.sell_only_excess, self.p.model,
            self.before.totals, pipeline._by_run(self.book.group_constraints, self.runs), self.universe.exact,
            (self.before.positions, self.before.cash),
        )

    @cached_property
    def translation(self):
        return translate(self.market, self.runs, self.targets.trace, self.p.positions, self.p.lots, self.before.totals, self.universe.exact,
                         (self.before.positions, self.before.cash), self.targets.replay, self.universe.locked)

    @cached_property
    def turnover(self):
        """(kept, dropped, warnings)."""
        return apply_turnover_cap(self.translation.intents, self.runs, self.before.totals, self.market,
                                  (self.before.positions, self.before.cash))

    @cached_property
    def fx(self):
        """(intents in execution order, fx_missing findings)."""
        return plan_fx(self.market, self.runs, within_quantity_range(self.turnover[0], self.runs), self.p.cash)

    @property
    def intents(self) -> pl.DataFrame:
        return self.fx[0]

    @cached_property
    def ladder(self):
        return cash_ladder(self.market, self.runs, self.intents, self.p.cash, pipeline._by_run(self.book.overdraft_limits, self.runs))

    @cached_property
    def result(self):
        return pipeline.run(self.book)

    # ---- convenience views -------------------------------------------------------------

    def weights(self, run: int = 0) -> dict[str, Decimal]:
        """Target trace final weights of one run, in trace order."""
        t = self.targets.trace.filter(pl.col("run") == run).sort("trace_order")
        return dict(zip(t["instrument_id"], t["final_weight"]))

    def tags(self, run: int = 0) -> dict[str, list[str]]:
        t = self.targets.trace.filter(pl.col("run") == run).sort("trace_order")
        return {i: list(tags) for i, tags in zip(t["instrument_id"], t["tags"])}

    def target_status(self, run: int = 0) -> str:
        return self.targets.status.filter(pl.col("run") == run)["target_status"].item()

    def target_warnings(self, run: int = 0) -> list[str]:
        return self.targets.warnings.filter(pl.col("run") == run).sort("w_order", maintain_order=True)["code"].to_list()

    def excluded(self, run: int = 0) -> list[tuple[str, str]]:
        e = self.universe.excluded.filter(pl.col("run") == run).sort("excl_order")
        return list(zip(e["instrument_id"], e["reason_code"]))

    def dq_items(self, frame: pl.DataFrame, bucket: str, run: int = 0) -> list[str]:
        return frame.filter((pl.col("run") == run) & (pl.col("bucket") == bucket)).sort("stage", "seq")["item"].to_list()

    def run_row(self, run: int = 0) -> dict:
        return self.result.runs.filter(pl.col("run") == run).row(0, named=True)

    def rules(self, run: int = 0) -> list[dict]:
        return self.result.rule_results.filter(pl.col("run") == run).to_dicts()

    def warnings(self, run: int = 0) -> list[str]:
        return self.result.warnings.filter(pl.col("run") == run)["code"].to_list()


@pytest.fixture
def scenario():
    """The ``build_scenario`` function (a fixture, so tests never import conftest)."""
    return build_scenario


# scenario inputs several stage tests share (golden scenario_03; the §6.4 step 2.6 block)
GOLDEN_03_FX_FUNDING = dict(
    base="SGD",
    cash=[("SGD", "10000.00")],
    prices=[("US_EQ", "100.0", "USD")],
    fx=[("USD/SGD", "1.35")],
    shelf=[("US_EQ", "APPROVED")],
    model=[("US_EQ", "0.5")],
)
# golden scenario_11's market: selling SLOW_FUND (settles T+3) funds FAST_STOCK (T+1) with no cash
SLOW_FUND_INTO_FAST_STOCK = dict(
    cash=[("USD", "0")],
    prices=[("SLOW_FUND", "100", "USD"), ("FAST_STOCK", "100", "USD")],
    shelf=[
        {"instrument_id": "SLOW_FUND", "status": "APPROVED", "settlement_days": 3},
        {"instrument_id": "FAST_STOCK", "status": "APPROVED", "settlement_days": 1},
    ],
    model=[("SLOW_FUND", "0.0"), ("FAST_STOCK", "1.0")],
)
SINGLE_STOCK_WITH_ZERO_ALTERNATIVE = dict(
    cash=[("USD", "1000")],
    prices=[("T", "100", "USD"), ("F", "100", "USD")],
    shelf=[("T", "APPROVED"), ("F", "APPROVED")],
    attributes=[("T", "sector", "TECH"), ("F", "sector", "FI")],
    model=[("T", "1.0"), ("F", "0")],
)
SUSPENDED_HOLDING_ABOVE_CAP = dict(
    positions=[("LOCK", "60")],
    cash=[("USD", "4000")],
    prices=[("LOCK", "100", "USD"), ("A", "100", "USD")],
    shelf=[("LOCK", "SUSPENDED"), ("A", "APPROVED")],
    model=[("A", "0.2")],
    single_position_max_weight="0.5",
)
