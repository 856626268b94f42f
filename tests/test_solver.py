"""SOLVER target generation (spec §6.6) and method comparison (§6.7): dpm_vec.stages.solver.

Frames are built from real requests through prepare → valuation → universe, then the
SELL_ONLY step (§6.4 step 1) as build_targets applies it, then solve_targets.
"""

from __future__ import annotations

import json
import math
import random
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.optimize import linprog, minimize

from dpm_vec import oracle
from dpm_vec.contract import requests_to_book
from dpm_vec.numeric import DEC, WEIGHT, lit
from dpm_vec.pipeline import _by_run
from dpm_vec.stages import dq
from dpm_vec.stages.checks import input_faults
from dpm_vec.stages.prepare import prepare
from dpm_vec.stages.solver import (
    COMPARISON_SCHEMA, WEIGHT_DP, _project_scaled, _round_units, _solve_grouped, _solve_linear, compare_methods, solve_targets,
)
from dpm_vec.stages.universe import build_universe
from dpm_vec.stages.valuation import value_state


def round4(x: Fraction) -> Decimal:
    """Exact value → 4 dp half-even (Fraction rounding is half-even), negative → 0."""
    if x < 0:
        x = Fraction(0)
    return Decimal(round(x * 10**WEIGHT_DP)).scaleb(-WEIGHT_DP)


def project_exact(
    c: list[Fraction], lo: Fraction, hi: Fraction, m: Fraction | None,
    groups: list[tuple[list[int], Fraction]],
) -> list[Fraction] | None:
    """The exact projection of ``c`` onto {0 <= w (<= m), lo <= Σw <= hi, Σ_{idx} w <= limit};
    None when the set is empty. The engine's path (``_project_scaled``) over any exact
    inputs, brought to one common denominator."""
    values = [*c, lo, hi, *(lim for _, lim in groups)] + ([] if m is None else [m])
    scale = math.lcm(*(Fraction(x).denominator for x in values))
    up = lambda x: int(x * scale)  # noqa: E731  (exact: scale is a multiple of every denominator)
    sol = _project_scaled(
        [up(x) for x in c], up(lo), up(hi), None if m is None else up(m), [(idx, up(lim)) for idx, lim in groups], scale,
    )
    if sol is None:
        return None
    numerators, denominator = sol
    return [Fraction(x, denominator) for x in numerators]


GOLDENS = Path(__file__).resolve().parent / "data" / "goldens" / "reference-service"  # a copy of ../shared/goldens


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def request(model: dict, *, shelf: dict | None = None, held: dict | None = None, options: dict | None = None,
            attrs: dict | None = None, cash: str = "10000") -> dict:
    """Prices 100 USD; ``held`` = {id: quantity}; ``shelf`` = {id: status} (APPROVED by
    default for model ids); ``attrs`` = {id: {attribute: value}}; total value = cash + held."""
    shelf = dict(shelf or {})
    held = held or {}
    attrs = attrs or {}
    ids = list(dict.fromkeys([*model, *held, *shelf]))
    for i in model:
        shelf.setdefault(i, "APPROVED")
    return {
        "portfolio_snapshot": {
            "portfolio_id": "pf", "base_currency": "USD",
            "positions": [{"instrument_id": i, "quantity": str(q)} for i, q in held.items()],
            "cash_balances": [{"currency": "USD", "amount": cash}],
        },
        "market_data_snapshot": {
            "prices": [{"instrument_id": i, "price": "100", "currency": "USD"} for i in ids], "fx_rates": [],
        },
        "model_portfolio": {"targets": [{"instrument_id": i, "weight": w} for i, w in model.items()]},
        "shelf_entries": [
            {"instrument_id": i, "status": st, "asset_class": "EQUITY", "attributes": attrs.get(i, {})}
            for i, st in shelf.items() if st is not None
        ],
        "options": {"target_method": "SOLVER", **(options or {})},
    }


def frames(requests: list[dict]):
    book, _ = requests_to_book(requests)
    p = prepare(book)
    runs, market = p.runs, p.market
    before = value_state(market, runs, p.positions, p.cash,
                         trust_snapshot=pl.col("valuation_mode") == "TRUST_SNAPSHOT", stage=dq.VALUATION_BEFORE)
    _, stale = input_faults(market, runs, p.positions, p.model)
    u = build_universe(market, runs, p.model, before.positions, stale)
    wm = _sell_only_step(u.weight_map, u.sell_only_excess)
    return market, runs, wm, p.model, _by_run(book.group_constraints, runs)


def _sell_only_step(wm: pl.DataFrame, excess: pl.DataFrame) -> pl.DataFrame:
    buy = pl.col("kind") == "BUYABLE"
    return (
        wm.join(excess, on="run", how="left")
        .with_columns(pl.col("sell_only_excess").fill_null(lit(0)),
                      pl.when(buy).then(pl.col("weight")).otherwise(lit(0)).sum().over("run").alias("_S"))
        .with_columns(
            pl.when(buy & (pl.col("sell_only_excess") > 0) & (pl.col("_S") > 0))
            .then(pl.col("weight") + pl.col("sell_only_excess") * (pl.col("weight") / pl.col("_S")))
            .otherwise(pl.col("weight")).alias("weight")
        ).select(wm.columns)
    )


def solve(requests: list[dict]):
    return solve_targets(*frames(requests))


def weights_of(weights: pl.DataFrame, run: int = 0) -> dict[str, Decimal]:
    return {r["instrument_id"]: r["weight"] for r in weights.filter(pl.col("run") == run).iter_rows(named=True)}


def warnings_of(warnings: pl.DataFrame, run: int = 0) -> list[str]:
    return warnings.filter(pl.col("run") == run).sort("w_order", maintain_order=True)["code"].to_list()


def status_of(status: pl.DataFrame, run: int = 0) -> str:
    return status.filter(pl.col("run") == run)["solver_status"].item()


def D(x: str) -> Decimal:
    return Decimal(x)


# ---------------------------------------------------------------------------
# the spec's observed cases (§6.6)
# ---------------------------------------------------------------------------

def test_locked_weight_shrinks_the_band():
    # 0.8 / 0.4 with a locked 0.3 → 0.5500 / 0.1500
    req = request({"A": "0.8", "B": "0.4"}, held={"L": 30}, shelf={"L": "SUSPENDED"}, cash="7000")
    w, st, warn = solve([req])
    got = weights_of(w)
    assert got["A"] == D("0.55") and got["B"] == D("0.15")
    assert got["L"] == D("0.3")  # locked unchanged
    assert status_of(st) == "READY" and warnings_of(warn) == []


def test_three_halves_project_to_thirds():
    w, st, _ = solve([request({"A": "0.5", "B": "0.5", "C": "0.5"})])
    assert weights_of(w) == {"A": D("0.3333"), "B": D("0.3333"), "C": D("0.3333")}
    assert status_of(st) == "READY"


def test_cash_band_lower_edge():
    w, _, _ = solve([request({"A": "0.7", "B": "0.3"}, options={"cash_band_min_weight": "0.1", "cash_band_max_weight": "0.2"})])
    assert weights_of(w) == {"A": D("0.65"), "B": D("0.25")}


def test_sell_only_weight_stays_in_cash():
    w, st, _ = solve([request({"X": "0.2", "A": "0.5", "B": "0.3"}, shelf={"X": "SELL_ONLY"})])
    got = weights_of(w)
    assert got["A"] == D("0.5") and got["B"] == D("0.3") and got["X"] == 0
    assert status_of(st) == "READY"


def test_cap_and_band_raise_small_weights():
    # model sums to 0.5, band demands ≥ 0.9 invested, cap 0.4: λ < 0 with A capped
    w, _, _ = solve([request({"A": "0.35", "B": "0.1", "C": "0.05"},
                             options={"cash_band_max_weight": "0.1", "single_position_max_weight": "0.4"})])
    # clip(c - λ, 0, 0.4): A capped at 0.4, B + C = 0.5 → λ = -0.175 → B 0.275, C 0.225
    got = weights_of(w)
    assert got == {"A": D("0.4"), "B": D("0.275"), "C": D("0.225")}


@pytest.mark.parametrize("name", ["scenario_12_solver_ready_feasible", "scenario_12_solver_infeasible"])
def test_goldens(name):
    doc = json.loads((GOLDENS / f"{name}.json").read_text())
    w, st, warn = solve([doc["inputs"]])
    exp = doc["expected_output"]
    if exp["status"] == "BLOCKED":
        assert status_of(st) == "BLOCKED"
        assert warnings_of(warn) == exp["diagnostics"]["warnings"]
        assert w.height == 0
    else:
        assert status_of(st) == "READY" and warnings_of(warn) == []
        assert weights_of(w) == {"EQ_A": D("0.6"), "EQ_B": D("0.4")}  # spec §6.6: 0.6000/0.4000


def test_infeasible_hints_in_order():
    # cash band contradiction can only reach the engine through options passed around
    # validation, so exercise the hint frame directly: capacity + locked group weight
    req = request({"A": "0.6", "B": "0.4"}, held={"L": 40}, shelf={"L": "SUSPENDED"}, cash="6000",
                  attrs={"L": {"sector": "TECH"}, "A": {"sector": "TECH"}},
                  options={"single_position_max_weight": "0.1", "cash_band_max_weight": "0.3",
                           "group_constraints": {"sector:TECH": {"max_weight": "0.35"}, "zzz:Q": {"max_weight": "0.5"}}})
    w, st, warn = solve([req])
    assert status_of(st) == "BLOCKED" and w.height == 0
    assert warnings_of(warn) == [
        "UNKNOWN_CONSTRAINT_ATTRIBUTE_zzz", "INFEASIBLE_INFEASIBLE",
        "INFEASIBILITY_HINT_SINGLE_POSITION_CAPACITY", "INFEASIBILITY_HINT_LOCKED_GROUP_WEIGHT_sector:TECH",
    ]
    assert oracle.simulate(req)["diagnostics"]["warnings"] == warnings_of(warn)


def test_locked_group_without_tradeable_member_is_a_constant_constraint():
    base = dict(held={"L": 40}, shelf={"L": "SUSPENDED"}, cash="6000", attrs={"L": {"sector": "TECH"}})
    w, st, warn = solve([
        request({"A": "0.6"}, **base, options={"group_constraints": {"sector:TECH": {"max_weight": "0.3"}}}),
        request({"A": "0.6"}, **base, options={"group_constraints": {"sector:TECH": {"max_weight": "0.5"}}}),
    ])
    assert status_of(st, 0) == "BLOCKED"
    assert warnings_of(warn, 0) == ["INFEASIBLE_INFEASIBLE", "INFEASIBILITY_HINT_LOCKED_GROUP_WEIGHT_sector:TECH"]
    assert status_of(st, 1) == "READY" and weights_of(w, 1)["A"] == D("0.6")


def test_only_runs_whose_caps_bind_reach_the_grouped_solve(monkeypatch):
    """A cap the box ∩ band projection already meets (including one met with equality)
    leaves that projection as the answer, without the per-run solve; a cap it breaks is
    solved exactly. Both as project_exact answers them."""
    import dpm_vec.stages.solver as solver_stage

    seen = []
    real_solve = solver_stage._solve_grouped

    def spy(tradeable, grouped, real):
        seen.extend(grouped["run"].to_list())
        return real_solve(tradeable, grouped, real)

    monkeypatch.setattr(solver_stage, "_solve_grouped", spy)
    attrs = {"A": {"sector": "TECH"}, "B": {"sector": "TECH"}}
    model = {"A": "0.3", "B": "0.2", "C": "0.4"}
    caps = ["0.9", "0.5", "0.4999", "0.1"]
    w, st, _ = solve([
        request(model, attrs=attrs, options={"group_constraints": {"sector:TECH": {"max_weight": cap}}}) for cap in caps
    ])
    assert sorted(seen) == [2, 3]
    for run, cap in enumerate(caps):
        exact = project_exact([Fraction(model[i]) for i in "ABC"], Fraction(0), Fraction(1), None, [([0, 1], Fraction(cap))])
        assert status_of(st, run) == "READY"
        assert [weights_of(w, run)[i] for i in "ABC"] == [round4(x) for x in exact], run
    assert weights_of(w, 3) == {"A": D("0.1"), "B": D("0"), "C": D("0.4")}


def test_no_tradeable_instrument_keeps_map():
    w, st, warn = solve([request({"X": "0.5"}, shelf={"X": "SELL_ONLY"}, held={"X": 10, "L": 20}, cash="7000",
                                 options={"group_constraints": {"zzz:Q": {"max_weight": "0.1"}}})])
    assert status_of(st) == "READY" and warnings_of(warn) == []
    assert weights_of(w) == {"X": 0, "L": D("0.2")}


def test_cash_band_contradiction_hint():
    # the contract rejects min > max, so build the frames and then widen the policy
    market, runs, wm, model, gc = frames([request({"A": "0.6", "B": "0.4"})])
    runs = runs.with_columns(lit("0.3").alias("cash_band_min_weight"), lit("0.2").alias("cash_band_max_weight"))
    w, st, warn = solve_targets(market, runs, wm, model, gc)
    assert status_of(st) == "BLOCKED"
    assert warnings_of(warn) == ["INFEASIBLE_INFEASIBLE", "INFEASIBILITY_HINT_CASH_BAND_CONTRADICTION"]


# ---------------------------------------------------------------------------
# group constraints, against the oracle
# ---------------------------------------------------------------------------

GROUP_CASES = [
    # (model, attrs, options, held, shelf)
    ({"A": "0.6", "B": "0.4"}, {"A": {"sector": "TECH"}},
     {"group_constraints": {"sector:TECH": {"max_weight": "0.3"}}}, {}, {}),
    ({"A": "0.5", "B": "0.3", "C": "0.2"}, {"A": {"sector": "TECH"}, "B": {"sector": "TECH"}},
     {"group_constraints": {"sector:TECH": {"max_weight": "0.6"}}, "single_position_max_weight": "0.45",
      "cash_band_max_weight": "0.0"}, {}, {}),
    ({"A": "0.4", "B": "0.3", "C": "0.3"}, {"A": {"sector": "TECH"}, "B": {"sector": "FIN"}, "L": {"sector": "TECH"}},
     {"group_constraints": {"sector:TECH": {"max_weight": "0.35"}, "sector:FIN": {"max_weight": "0.2"}},
      "cash_band_max_weight": "0.05"}, {"L": 15}, {"L": "SUSPENDED"}),
    ({"A": "0.25", "B": "0.25", "C": "0.25", "D": "0.25"},
     {"A": {"sector": "TECH", "region": "EU"}, "B": {"sector": "TECH", "region": "US"}, "C": {"region": "EU"}},
     {"group_constraints": {"sector:TECH": {"max_weight": "0.3"}, "region:EU": {"max_weight": "0.3"}},
      "single_position_max_weight": "0.35"}, {}, {}),
    ({"A": "0.5", "B": "0.5"}, {"A": {"sector": "TECH"}, "B": {"sector": "TECH"}},
     {"group_constraints": {"sector:TECH": {"max_weight": "0.3"}}, "cash_band_max_weight": "0.5"}, {}, {}),
]


def _oracle_weights(req: dict) -> tuple[str, dict, list]:
    out = oracle.simulate(req)
    ws = {t["instrument_id"]: Decimal(t["final_weight"]) for t in out["target"]["targets"]}
    return out["status"], ws, out["diagnostics"]["warnings"]


@pytest.mark.parametrize("case", range(len(GROUP_CASES)))
def test_group_cases_match_oracle(case):
    model, attrs, options, held, shelf = GROUP_CASES[case]
    cash = str(10000 - 100 * sum(held.values()))
    req = request(model, attrs=attrs, options=options, held=held, shelf=shelf, cash=cash)
    w, st, warn = solve([req])
    o_status, o_w, o_warn = _oracle_weights(req)
    if o_status == "BLOCKED" and not o_w:
        assert status_of(st) == "BLOCKED" and warnings_of(warn) == o_warn
    else:
        assert status_of(st) == "READY"
        got = weights_of(w)
        assert {i: got[i] for i in o_w} == o_w
        assert [x for x in o_warn if x.startswith(("INFEAS", "UNKNOWN", "SOLVER"))] == warnings_of(warn)


def test_group_case_exact_values():
    # overlapping groups (case 3): sector TECH = {A, B} ≤ 0.3, region EU = {A, C} ≤ 0.3
    model, attrs, options, _, _ = GROUP_CASES[3]
    w, _, _ = solve([request(model, attrs=attrs, options=options)])
    got = weights_of(w)
    assert got["A"] + got["B"] <= D("0.3") and got["A"] + got["C"] <= D("0.3")
    # both groups bind with equal multipliers ν = 1/15: A = 0.25 - 2ν, B = C = 0.25 - ν
    assert got == {"A": D("0.1167"), "B": D("0.1833"), "C": D("0.1833"), "D": D("0.25")}


def _random_case(rng: random.Random):
    n = rng.randint(2, 6)
    ids = [f"I{k}" for k in range(n)]
    raw = [rng.randint(0, 60) for _ in ids]
    model = {i: str(Decimal(x) / 100) for i, x in zip(ids, raw)}
    sectors = ["TECH", "FIN", "HC"]
    attrs = {i: {"sector": rng.choice(sectors)} for i in ids}
    held, shelf = {}, {}
    if rng.random() < 0.5:
        held["L"] = rng.randint(1, 30)
        shelf["L"] = "SUSPENDED"
        attrs["L"] = {"sector": rng.choice(sectors)}
    gc = {f"sector:{s}": {"max_weight": str(Decimal(rng.randint(5, 60)) / 100)} for s in rng.sample(sectors, rng.randint(1, 3))}
    options = {"group_constraints": gc}
    if rng.random() < 0.6:
        options["single_position_max_weight"] = str(Decimal(rng.randint(10, 50)) / 100)
    if rng.random() < 0.6:
        hi = rng.randint(0, 40)
        lo = rng.randint(0, hi)
        options["cash_band_min_weight"] = str(Decimal(lo) / 100)
        options["cash_band_max_weight"] = str(Decimal(hi) / 100)
    cash = str(10000 - 100 * sum(held.values()))
    return request(model, attrs=attrs, options=options, held=held, shelf=shelf, cash=cash)


def _scipy_reference(problem) -> list[float] | None:
    """Independent float reference: HiGHS LP for feasibility, SLSQP for the projection."""
    c, lo, hi, m, groups = problem
    n = len(c)
    A = [[1.0] * n, [-1.0] * n] + [[1.0 if j in idx else 0.0 for j in range(n)] for idx, _ in groups]
    b = [float(hi), -float(lo)] + [float(lim) for _, lim in groups]
    bounds = [(0.0, None if m is None else float(m))] * n
    lp = linprog(np.zeros(n), A_ub=np.array(A), b_ub=np.array(b), bounds=bounds, method="highs")
    if lp.status == 2:
        return None
    assert lp.status == 0
    cf = np.array([float(x) for x in c])
    res = minimize(lambda w: float(((w - cf) ** 2).sum()), lp.x, jac=lambda w: 2 * (w - cf), method="SLSQP",
                   bounds=bounds, constraints=[{"type": "ineq", "fun": lambda w, A=np.array(A), b=np.array(b): b - A @ w,
                                                "jac": lambda w, A=np.array(A): -A}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    return list(res.x)


def _problem(req: dict):
    """(c, lo, hi, m, groups) rebuilt from the request (model order = map order here);
    None when a locked-only group is violated."""
    opts = req["options"]
    model = {t["instrument_id"]: Fraction(t["weight"]) for t in req["model_portfolio"]["targets"]}
    ids = list(model)
    positions = req["portfolio_snapshot"]["positions"]
    L = sum((Fraction(p["quantity"]) / 100 for p in positions), Fraction(0))
    lo = 1 - Fraction(opts.get("cash_band_max_weight", "1")) - L
    hi = 1 - Fraction(opts.get("cash_band_min_weight", "0")) - L
    m = Fraction(opts["single_position_max_weight"]) if "single_position_max_weight" in opts else None
    attrs = {e["instrument_id"]: e["attributes"] for e in req["shelf_entries"]}
    groups = []
    for key in sorted(opts.get("group_constraints", {})):
        k, v = key.split(":")
        idx = [j for j, i in enumerate(ids) if attrs[i].get(k) == v]
        gl = sum((Fraction(p["quantity"]) / 100 for p in positions if attrs[p["instrument_id"]].get(k) == v), Fraction(0))
        lim = Fraction(opts["group_constraints"][key]["max_weight"]) - gl
        if idx:
            groups.append((idx, lim))
        elif gl > 0 and lim < 0:
            return None
    return [model[i] for i in ids], lo, hi, m, groups


def test_random_group_problems():
    """120 random group-constrained problems: the engine's exact answer against an
    independent scipy reference (HiGHS feasibility + SLSQP) and against the oracle's own
    exact projection (a dual active-set method, not the engine's float-then-KKT path):
    weights, and the warnings of blocked runs."""
    rng = random.Random(20250630)
    reqs = [_random_case(rng) for _ in range(120)]
    w, st, warn = solve(reqs)
    blocked = 0
    for run, req in enumerate(reqs):
        problem = _problem(req)
        exact = None if problem is None else project_exact(*problem)
        ref = None if problem is None else _scipy_reference(problem)
        assert (exact is None) == (ref is None), run
        _, o_w, o_warn = _oracle_weights(req)
        if exact is None:
            blocked += 1
            assert status_of(st, run) == "BLOCKED"
            assert warnings_of(warn, run) == o_warn, run
            continue
        assert status_of(st, run) == "READY", run
        got = weights_of(w, run)
        model_ids = [t["instrument_id"] for t in req["model_portfolio"]["targets"]]
        for j, i in enumerate(model_ids):
            assert got[i] == round4(exact[j]) == o_w[i], (run, i)
            assert abs(float(exact[j]) - ref[j]) < 1e-6, (run, i)
    assert 0 < blocked < len(reqs)


def test_round_units_is_half_even_on_exact_midpoints():
    """The grouped path rounds W / D to 4 dp in integers: half-even at exact midpoints,
    up just past them, negative to 0 (what round4 does on Fractions)."""
    cases = [(Fraction(5, 100_000), 0), (Fraction(15, 100_000), 2), (Fraction(25, 100_000), 2),
             (Fraction(5, 100_000) + Fraction(1, 10**28), 1), (Fraction(1, 3), 3333), (Fraction(2, 3), 6667),
             (Fraction(-1, 7), 0), (Fraction(0), 0), (Fraction(12345, 10_000), 12345)]
    for x, units in cases:
        assert _round_units(x.numerator, x.denominator) == units, x
        assert Decimal(units).scaleb(-4) == round4(x), x


def test_solve_linear_in_integers():
    """The multipliers' system, fraction-free: a regular system with a fractional answer,
    a singular consistent one (the unknown without a pivot is 0), a column of zeros, an
    inconsistent one."""
    def solve(M, v):
        out = _solve_linear(M, v)
        return None if out is None else [Fraction(x, out[1]) for x in out[0]]

    assert solve([[2, 1], [1, 3]], [3, 5]) == [Fraction(4, 5), Fraction(7, 5)]
    assert solve([[-3, 1, 0], [1, 2, 1], [0, 1, 4]], [1, 0, 2]) == [Fraction(-9, 25), Fraction(-2, 25), Fraction(13, 25)]
    assert solve([[1, 1], [2, 2]], [2, 4]) == [2, 0]
    assert solve([[0, 1], [0, 2]], [3, 6]) == [0, 3]
    assert solve([[1, 1], [2, 2]], [2, 5]) is None
    assert _solve_linear([[2, 1], [1, 3]], [3, 5])[1] > 0


def test_project_exact_on_non_decimal_inputs():
    """Inputs with denominators that are not powers of ten (the scaled path takes the lcm):
    three equal thirds, the first two capped together at 1/5, band at exactly 1."""
    third = Fraction(1, 3)
    w = project_exact([third, third, third], Fraction(1), Fraction(1), None, [([0, 1], Fraction(1, 5))])
    assert w == [Fraction(1, 10), Fraction(1, 10), Fraction(4, 5)]


@pytest.mark.parametrize("model", [10**3, 10**6, 10**9])
def test_large_model_weights_project_onto_the_group_cap(model):
    """Model weights are not validated (the reference takes 1e6): one of 1e6 under a group
    cap of 0.2 projects to 0.2, as for 1e3. NNLS on the unscaled least-distance problem
    returned a wrong float optimum from 1e6 on, and the run got 0 and no trade."""
    assert project_exact([Fraction(model)], Fraction(0), Fraction(1), None, [([0], Fraction(1, 5))]) == [Fraction(1, 5)]
    assert project_exact([Fraction(model), Fraction(model), Fraction(1, 2)], Fraction(0), Fraction(1), None,
                         [([0, 1], Fraction(1, 5))]) == [Fraction(1, 10), Fraction(1, 10), Fraction(1, 2)]
    req = request({"A": str(model)}, attrs={"A": {"sector": "TECH"}}, options={"group_constraints": {"sector:TECH": {"max_weight": "0.2"}}})
    market, runs, wm, model_frame, gc = frames([req])
    w, st, _ = solve_targets(market, runs, wm, model_frame, gc)
    assert status_of(st) == "READY" and weights_of(w) == {"A": D("0.2")}
    assert [t["final_weight"] for t in oracle.simulate(req)["target"]["targets"]] == ["0.2000"]


def test_grouped_solve_keeps_every_digit_of_28_dp_weights():
    """A SELL_ONLY-redistributed map weight carries 28 decimals; the grouped path must not
    round it to DEC's 20 first: 0.12345 + 1e-28 rounds up to 0.1235, 0.12345 to 0.1234."""
    c = [Decimal("0.1234500000000000000000000001"), Decimal("0.1234500000000000000000000000")]
    tradeable = pl.DataFrame(
        {"run": [0, 1], "instrument_id": ["A", "A"], "map_order": [0, 0], "_c": c},
        schema={"run": pl.UInt32, "instrument_id": pl.String, "map_order": pl.Int64, "_c": WEIGHT},
    )
    grouped = pl.DataFrame(
        {"run": [0, 1], "_lo": [Decimal(0)] * 2, "_hi": [Decimal(1)] * 2, "_m": [None, None]},
        schema={"run": pl.UInt32, "_lo": DEC, "_hi": DEC, "_m": DEC},
    )
    real = pl.DataFrame(
        {"run": [0, 1], "_rank": [1, 1], "_members": [[0], [0]], "_limit": [Decimal("0.5")] * 2},
        schema={"run": pl.UInt32, "_rank": pl.Int64, "_members": pl.List(pl.Int64), "_limit": DEC},
    )
    weights, failed = _solve_grouped(tradeable, grouped, real)
    assert failed.height == 0
    assert weights.sort("run")["_w"].to_list() == [Decimal("0.1235"), Decimal("0.1234")]
    assert weights.schema["_w"] == DEC


def test_plain_path_agrees_with_exact_projection():
    """Random box/band problems (no groups): vectorised λ vs project_exact."""
    rng = random.Random(7)
    reqs = []
    for _ in range(150):
        n = rng.randint(1, 7)
        model = {f"I{k}": str(Decimal(rng.randint(0, 700)) / 1000) for k in range(n)}
        options = {}
        if rng.random() < 0.6:
            options["single_position_max_weight"] = str(Decimal(rng.randint(5, 60)) / 100)
        hi = rng.randint(0, 100)
        lo = rng.randint(0, hi)
        options["cash_band_min_weight"] = str(Decimal(lo) / 100)
        options["cash_band_max_weight"] = str(Decimal(hi) / 100)
        reqs.append(request(model, options=options))
    w, st, warn = solve(reqs)
    for run, req in enumerate(reqs):
        opts = req["options"]
        c = [Fraction(t["weight"]) for t in req["model_portfolio"]["targets"]]
        m = Fraction(opts["single_position_max_weight"]) if "single_position_max_weight" in opts else None
        exact = project_exact(c, 1 - Fraction(opts["cash_band_max_weight"]), 1 - Fraction(opts["cash_band_min_weight"]), m, [])
        if exact is None:
            assert status_of(st, run) == "BLOCKED"
            assert warnings_of(warn, run)[0] == "INFEASIBLE_INFEASIBLE"
            continue
        got = weights_of(w, run)
        assert [got[t["instrument_id"]] for t in req["model_portfolio"]["targets"]] == [round4(x) for x in exact], run


# ---------------------------------------------------------------------------
# mixed books
# ---------------------------------------------------------------------------

def test_multi_run_book_mixes_solver_and_heuristic_runs():
    reqs = [
        request({"A": "0.8", "B": "0.4"}, held={"L": 30}, shelf={"L": "SUSPENDED"}, cash="7000"),
        {**request({"A": "0.5", "B": "0.5"}), "options": {"target_method": "HEURISTIC"}},
        request({"A": "0.5", "B": "0.5", "C": "0.5"}),
        json.loads((GOLDENS / "scenario_12_solver_infeasible.json").read_text())["inputs"],
        {**request({"A": "0.9"}), "options": {}},
        request({"A": "0.6", "B": "0.4"}, attrs={"A": {"sector": "TECH"}},
                options={"group_constraints": {"sector:TECH": {"max_weight": "0.3"}}}),
    ]
    w, st, warn = solve(reqs)
    assert st.sort("run").rows() == [(0, "READY"), (2, "READY"), (3, "BLOCKED"), (5, "READY")]
    assert set(w["run"].unique()) == {0, 2, 5}
    assert weights_of(w, 0) == {"A": D("0.55"), "B": D("0.15"), "L": D("0.3")}
    assert weights_of(w, 2) == {"A": D("0.3333"), "B": D("0.3333"), "C": D("0.3333")}
    assert weights_of(w, 5) == {"A": D("0.3"), "B": D("0.4")}
    assert warnings_of(warn, 3) == ["INFEASIBLE_INFEASIBLE", "INFEASIBILITY_HINT_SINGLE_POSITION_CAPACITY"]
    assert set(warn["run"]) == {3}
    assert isinstance(w.schema["weight"], pl.Decimal) and w.columns == ["run", "instrument_id", "map_order", "kind", "weight", "slot"]


def test_which_selects_alternate_runs():
    reqs = [{**request({"A": "0.5", "B": "0.5", "C": "0.5"}), "options": {"compare_target_methods": True}}]
    market, runs, wm, model, gc = frames(reqs)
    w, st, _ = solve_targets(market, runs, wm, model, gc)
    assert st.height == 0 and w.height == 0
    w, st, _ = solve_targets(market, runs, wm, model, gc, which=pl.col("compare_target_methods"))
    assert status_of(st) == "READY" and weights_of(w)["A"] == D("0.3333")


def test_deterministic():
    rng = random.Random(3)
    reqs = [_random_case(rng) for _ in range(30)]
    a = solve(reqs)
    b = solve(reqs)
    for x, y in zip(a, b):
        assert x.equals(y)


# ---------------------------------------------------------------------------
# §6.7 comparison
# ---------------------------------------------------------------------------

def _trace(rows):
    return pl.DataFrame(rows, schema={"run": pl.UInt32, "instrument_id": pl.String, "final_weight": DEC}, orient="row")


def _status(rows):
    return pl.DataFrame(rows, schema={"run": pl.UInt32, "target_status": pl.String}, orient="row")


def test_compare_methods():
    runs = pl.DataFrame(
        {"run": [0, 1, 2, 3], "target_method": ["SOLVER", "HEURISTIC", "SOLVER", "HEURISTIC"],
         "compare_target_methods": [True, True, True, False],
         "compare_target_methods_tolerance": [D("0.0001"), D("0.01"), D("0.0001"), D("0.0001")]},
        schema={"run": pl.UInt32, "target_method": pl.String, "compare_target_methods": pl.Boolean,
                "compare_target_methods_tolerance": DEC},
    )
    p_trace = _trace([(0, "A", D("0.55")), (0, "B", D("0.15")), (1, "A", D("0.5")), (1, "A", D("0.5")),
                      (1, "B", D("0.5")), (3, "A", D("1"))])
    a_trace = _trace([(0, "A", D("0.6")), (0, "B", D("0.15")), (0, "C", D("0.00005")),
                      (1, "A", D("0.495")), (1, "B", D("0.49")), (2, "A", D("0.3")), (3, "A", D("0"))])
    p_status = _status([(0, "READY"), (1, "READY"), (2, "BLOCKED"), (3, "READY")])
    a_status = _status([(0, "PENDING_REVIEW"), (1, "READY"), (2, "READY"), (3, "READY")])
    a_warn = pl.DataFrame({"run": [0, 0, 0, 2], "code": ["Z", "CAPPED_BY_GROUP_LIMIT_x:y", "Z", "W"],
                           "w_order": [1, 2, 3, 4]}, schema={"run": pl.UInt32, "code": pl.String, "w_order": pl.Int64})
    cmp, warn = compare_methods(runs, p_status, p_trace, a_status, a_trace, a_warn)
    assert cmp.schema == pl.Schema(COMPARISON_SCHEMA)
    assert cmp.rows() == [
        (0, "SOLVER", "READY", "HEURISTIC", "PENDING_REVIEW", "0.0001", ["A"], ["CAPPED_BY_GROUP_LIMIT_x:y", "Z"]),
        (1, "HEURISTIC", "READY", "SOLVER", "READY", "0.01", [], []),
        (2, "SOLVER", "BLOCKED", "HEURISTIC", "READY", "0.0001", ["A"], ["W"]),
    ]
    assert warn.select("run", "code").rows() == [
        (0, "TARGET_METHOD_STATUS_DIVERGENCE"), (0, "TARGET_METHOD_WEIGHT_DIVERGENCE"),
        (2, "TARGET_METHOD_STATUS_DIVERGENCE"), (2, "TARGET_METHOD_WEIGHT_DIVERGENCE"),
    ]


def test_compare_methods_end_to_end_against_oracle():
    """SOLVER primary vs the oracle's comparison, using this module's solver output and the
    oracle's HEURISTIC trace as the alternate."""
    req = request({"A": "0.6", "B": "0.4"}, attrs={"A": {"sector": "TECH"}},
                  options={"compare_target_methods": True, "single_position_max_weight": "0.5",
                           "group_constraints": {"sector:TECH": {"max_weight": "0.3"}}})
    market, runs, wm, model, gc = frames([req])
    w, st, _ = solve_targets(market, runs, wm, model, gc)
    expected = oracle.simulate(req)["explanation"]["target_method_comparison"]
    heur = oracle.simulate({**req, "options": {**req["options"], "target_method": "HEURISTIC", "compare_target_methods": False}})
    a_trace = _trace([(0, t["instrument_id"], Decimal(t["final_weight"])) for t in heur["target"]["targets"]])
    a_warn = pl.DataFrame({"run": [0] * len(heur["diagnostics"]["warnings"]), "code": heur["diagnostics"]["warnings"]},
                          schema={"run": pl.UInt32, "code": pl.String})
    cmp, warn = compare_methods(
        runs, st.rename({"solver_status": "target_status"}), w.rename({"weight": "final_weight"}),
        _status([(0, expected["alternate_status"])]), a_trace, a_warn,
    )
    row = cmp.row(0, named=True)
    for key in ("primary_method", "primary_status", "alternate_method", "differing_instruments", "alternate_warnings", "tolerance"):
        assert row[key] == expected[key], key


def test_duplicate_model_target_last_weight_wins():
    # the contract rejects conflicting duplicates (§9.1); feed one to the stage directly
    market, runs, wm, model, gc = frames([request({"A": "0.3", "B": "0.5"})])
    model = pl.concat([model, model.filter(pl.col("instrument_id") == "A").with_columns(
        pl.col("model_seq") + 10, lit("0.7").alias("model_weight"))])
    w, st, _ = solve_targets(market, runs, wm, model, gc)
    # model A = 0.7 (last), B = 0.5: Σ 1.2 > 1 → λ = 0.1
    assert status_of(st) == "READY"
    assert weights_of(w) == {"A": D("0.6"), "B": D("0.4")}


# ---------------------------------------------------------------------------
# the oracle's exact projections (dpm_vec.oracle), which the differential tests trust
# ---------------------------------------------------------------------------

def test_oracle_projections_agree_with_the_engines_on_band_problems():
    """Three exact algorithms on 300 random box/band problems: the oracle's breakpoint
    search, its active-set method with no group, and the engine's project_exact, equal
    to the last digit (or all None)."""
    rng = random.Random(11)
    for case in range(300):
        n = rng.randint(1, 7)
        c = [Fraction(rng.randint(0, 700), rng.choice([1000, 3000, 7000])) for _ in range(n)]
        m = Fraction(rng.randint(0, 60), 100) if rng.random() < 0.6 else None
        hi = Fraction(rng.randint(-5, 100), 100)
        lo = Fraction(rng.randint(-5, 100), 100)
        expected = project_exact(c, lo, hi, m, [])
        assert oracle._band_projection(c, lo, hi, m) == expected, case
        assert oracle._grouped_projection(c, lo, hi, m, []) == expected, case


def test_oracle_grouped_projection_on_worked_cases():
    f = Fraction
    # one group over everything capped at 0.1: only the largest weight stays (ν = 0.4)
    assert oracle._grouped_projection([f(1, 2), f(34, 100), f(33, 100)], f(0), f(1), None,
                                      [([0, 1, 2], f(1, 10))]) == [f(1, 10), 0, 0]
    # overlapping groups {A, B} <= 0.3 and {A, C} <= 0.3, both binding with ν = 1/15
    assert oracle._grouped_projection([f(1, 4)] * 4, f(0), f(1), f(35, 100),
                                      [([0, 1], f(3, 10)), ([0, 2], f(3, 10))]) == [f(7, 60), f(11, 60), f(11, 60), f(1, 4)]
    # the band asks at least 0.9 invested, one group over everything allows 0.5: empty
    assert oracle._grouped_projection([f(1, 2), f(1, 2)], f(9, 10), f(1), None, [([0, 1], f(1, 2))]) is None
    # a cap of 0 on a group member fixes it; the band then lifts the other to 0.9 (cap 1)
    assert oracle._grouped_projection([f(1, 2), f(1, 5)], f(9, 10), f(1), f(1), [([0], f(0))]) == [0, f(9, 10)]


def test_an_exact_rounding_midpoint_rounds_half_even_in_engine_and_oracle():
    """A cash floor of 0.0001 takes 0.00005 off each of two weights: 0.60005 and 0.39985
    are exact midpoints, which half-even rounds down to an even last digit (half-up would
    give 0.6001 / 0.3999). A float solver lands either side of them; both exact paths
    must agree, with a group cap that does not bind and without one."""
    for groups in ({}, {"group_constraints": {"sector:TECH": {"max_weight": "0.9"}}}):
        req = request({"A": "0.6001", "B": "0.3999"}, attrs={"A": {"sector": "TECH"}},
                      options={"cash_band_min_weight": "0.0001", **groups})
        w, st, _ = solve([req])
        assert weights_of(w) == {"A": D("0.6000"), "B": D("0.3998")}
        assert _oracle_weights(req)[1] == {"A": D("0.6000"), "B": D("0.3998")}
