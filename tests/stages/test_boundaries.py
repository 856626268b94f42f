"""Stage-boundary schemas: every stage's real output meets its contract, and the breaks a
vectorised engine is prone to (a join that fans out, a lost key, an unknown enumeration,
a negative quantity) are caught at the boundary where they happen, naming it."""
from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest
from dpm_vec import pipeline, schemas
from dpm_vec.stages import dq
from dpm_vec.stages.compliance import apply_intents
from dpm_vec.stages.valuation import value_state


@pytest.fixture
def traded(scenario):
    """Two runs (USD and EUR based) of a portfolio in two currencies: a held position to
    trim, one to liquidate, one to buy."""
    return scenario(
        positions=[("HOLD", "100"), ("GONE", "10")],
        cash=[("USD", "5000"), ("EUR", "200")],
        prices=[("HOLD", "100", "USD"), ("GONE", "50", "EUR"), ("NEW", "20", "EUR")],
        fx=[("EUR/USD", "1.1")],
        shelf=[("HOLD", "APPROVED"), ("GONE", "APPROVED"), ("NEW", "APPROVED")],
        model=[("HOLD", "0.4"), ("NEW", "0.5")],
        runs=[{}, {"base": "EUR"}],
    )


def _after(s):
    pos, cash = apply_intents(s.p.positions, s.p.cash, s.intents, s.runs)
    return value_state(s.market, s.runs, pos, cash, trust_snapshot=False, stage=dq.VALUATION_AFTER)


BOUNDARIES = {
    "valuation: positions": (schemas.VALUED_POSITIONS_SCHEMA, lambda s: s.before.positions),
    "valuation: cash": (schemas.VALUED_CASH_SCHEMA, lambda s: s.before.cash),
    "targets: trace": (schemas.TARGET_TRACE_SCHEMA, lambda s: s.targets.trace),
    "translation: security intents": (schemas.SECURITY_INTENTS_SCHEMA, lambda s: s.translation.intents),
    "engine: intents": (schemas.INTENTS_SCHEMA, lambda s: s.intents),
    "after-state: positions": (schemas.AFTER_POSITIONS_SCHEMA, lambda s: _after(s).positions),
    "engine: runs": (schemas.RUNS_SCHEMA, lambda s: s.result.runs),
}
RULES = {"engine: rule results": (schemas.RULES_SCHEMA, lambda s: s.result.rule_results)}  # per-instrument rules share an order
UNORDERED = {"universe: weight map": (schemas.WEIGHT_MAP_SCHEMA, lambda s: s.universe.weight_map)}


@pytest.mark.parametrize("name", BOUNDARIES)
def test_each_stage_meets_its_contract_and_a_fanned_out_join_breaks_it(traded, name):
    schema, output = BOUNDARIES[name]
    frame = output(traded)
    assert schema.name == name
    assert frame.height >= 2
    schemas.check_stage(schema, frame)
    # a join that matched one row twice repeats that row's key
    with pytest.raises(schemas.StageContractError, match=name):
        schemas.check_stage(schema, pl.concat([frame.head(1), frame]))


@pytest.mark.parametrize("name", {**BOUNDARIES, **RULES})
def test_rows_out_of_their_promised_order_break_the_contract(traded, name):
    """Rows out of order would make the output differ from run to run."""
    schema, output = {**BOUNDARIES, **RULES}[name]
    frame = output(traded)
    schemas.check_stage(schema, frame)
    with pytest.raises(schemas.StageContractError, match=r"(strictly increasing|non-decreasing) \(run"):
        schemas.check_stage(schema, frame.reverse())


def test_the_unordered_weight_map_meets_its_contract_and_its_fan_out_is_caught_in_the_trace(traded, monkeypatch):
    schema, output = UNORDERED["universe: weight map"]
    schemas.check_stage(schema, output(traded).reverse())
    real = pipeline.build_universe

    def fanned_out(*args, **kwargs):
        universe = real(*args, **kwargs)
        return replace(universe, weight_map=pl.concat([universe.weight_map, universe.weight_map.head(1)]))

    monkeypatch.setattr(pipeline, "build_universe", fanned_out)
    with pytest.raises(schemas.StageContractError, match="targets: trace"):
        pipeline.run(traded.book)


def test_the_trades_stage_sized_what_the_contract_checks(traded):
    """The contract's columns are the ones the next stage reads: side and quantity of
    each (run, instrument) the stage trades, here one buy, one trim and one sale. Worked
    by hand: the USD run is worth 10,000 + 10 × 50 × 1.1 + 5,000 + 200 × 1.1 = 15,770 USD;
    HOLD's target 0.4 × 15,770 = 6,308 USD sells floor(3,692 / 100) = 36, NEW's 0.5 × 15,770
    / 1.1 = 7,168.18 EUR buys floor(7,168.18 / 20) = 358, GONE leaves the model and sells
    all 10. The EUR run is the same book valued in EUR, so it trades the same units."""
    intents = traded.translation.intents.sort("run", "instrument_id")
    expected = [("GONE", "SELL", 10), ("HOLD", "SELL", 36), ("NEW", "BUY", 358)]
    for run in (0, 1):
        trades = intents.filter(pl.col("run") == run).select("instrument_id", "side", pl.col("quantity").cast(pl.Int64))
        assert trades.rows() == expected, run


@pytest.mark.parametrize(("name", "column", "bad", "rule"), [
    ("universe: weight map", "kind", pl.lit("BUYABEL"), "kind is one of BUYABLE, SELL_ONLY, LOCKED, LIQUIDATION"),
    ("translation: security intents", "side", pl.lit("HOLD"), "side is one of BUY, SELL"),
    ("translation: security intents", "quantity", -pl.col("quantity"), "quantity >= 0, or a trade beyond the quantity range"),
    ("valuation: positions", "instrument_id", pl.lit(None, dtype=pl.String), "instrument_id, quantity not null"),
    ("valuation: cash", "currency", pl.lit(None, dtype=pl.String), "currency, amount not null"),
    ("targets: trace", "in_model", pl.lit(None, dtype=pl.Boolean), "instrument_id, slot, in_model not null"),
    ("engine: rule results", "severity", pl.lit("MEDIUM"), "severity is one of HARD, SOFT"),
    ("engine: intents", "intent_type",  # the other type, keeping the amounts of this one
     pl.when(pl.col("intent_type") == "FX_SPOT").then(pl.lit("SECURITY_TRADE")).otherwise(pl.lit("FX_SPOT")),
     "buy_amount and sell_amount_estimated set on FX_SPOT intents only"),
    ("engine: intents", "rationale_code", pl.lit("SWEEP"), "a SWEEP's buy_amount and sell_amount_estimated >= 0"),
    ("engine: rule results", "rule_id", pl.lit(""), "rule_id not empty"),
])
def test_a_value_outside_the_contract_names_the_rule_and_the_row(traded, name, column, bad, rule):
    schema, output = {**BOUNDARIES, **UNORDERED, **RULES}[name]
    frame = output(traded)
    broken = frame.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(bad).otherwise(pl.col(column)).alias(column))
    with pytest.raises(schemas.StageContractError) as caught:
        schemas.check_stage(schema, broken)
    message = str(caught.value)
    assert message.startswith(f"{name}: {rule} (e.g. [{{")  # only the rule this row breaks, then the row
    assert message.count(" (e.g. ") == 1
    assert repr(broken.select(list(schema.columns)).row(0, named=True)[column]) in message


def test_the_engine_stops_at_the_boundary_that_broke(traded, monkeypatch):
    """A stage whose output breaks its contract stops the pass there (a sweep then
    isolates the portfolio as ENGINE_ERROR) instead of sizing trades from it."""
    real = pipeline.translate

    def fanned_out(*args, **kwargs):
        tr = real(*args, **kwargs)
        return replace(tr, intents=pl.concat([tr.intents, tr.intents.head(1)]))

    monkeypatch.setattr(pipeline, "translate", fanned_out)
    reached = []
    monkeypatch.setattr(pipeline, "apply_turnover_cap", lambda *a, **k: reached.append(1))
    with pytest.raises(schemas.StageContractError, match="translation: security intents"):
        pipeline.run(traded.book)
    assert reached == []


def test_a_request_whose_pass_breaks_a_contract_gets_a_problem_naming_the_boundary(monkeypatch):
    """The JSON door: the request that breaks a stage's contract answers a 500 problem
    naming the boundary, and a request beside it in the same call still answers."""
    import json
    from pathlib import Path

    from dpm_vec.simulate import simulate_many

    request = json.loads((Path(__file__).resolve().parents[2] / "data" / "requests" / "fx_funding.json").read_text())
    victim = json.loads(json.dumps(request))
    victim["portfolio_snapshot"]["portfolio_id"] = "VICTIM"
    real = pipeline.translate

    def fan_out_victim(market, live, *args, **kwargs):
        tr = real(market, live, *args, **kwargs)
        twice = tr.intents.join(live.filter(pl.col("portfolio_id") == "VICTIM").select("run"), on="run", how="semi").head(1)
        return replace(tr, intents=pl.concat([tr.intents, twice]).sort("run", "intent_no", maintain_order=True))

    monkeypatch.setattr(pipeline, "translate", fan_out_victim)
    good, bad = simulate_many([request, victim])
    assert good["status"] == "READY"
    assert bad["status"] == 500
    assert "StageContractError: translation: security intents: rows in strictly increasing (run, intent_no) order" in bad["detail"]
