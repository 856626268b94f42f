"""SOLVER target generation (spec §6.6) and the method comparison (§6.7).

The SOLVER target is the Euclidean projection of the model weights of the tradeable
(BUYABLE) instruments onto

    0 <= w_i (<= m),   lo <= Σ w <= hi,   Σ_{group} w <= max_weight - locked group weight

with ``lo = 1 - cash_band_max_weight - L`` and ``hi = 1 - cash_band_min_weight - L``
(``L`` = locked weight). The projection is unique, so any exact method reproduces the
reference's cvxpy/OSQP answer once rounded to 4 dp.

* Every feasible run: ``w_i = clip(model_i - λ, 0, m)``, with ``λ`` found exactly over
  the breakpoints of the piecewise-linear ``Σ clip(·)``, in Decimal columns, for every
  run at once (no Python per run). A run without a binding-capable group constraint, or
  whose caps this projection already meets, has its answer.
* Runs whose caps it breaks: per run, scipy's Lawson-Hanson NNLS solves the
  least-distance dual (LDP) — it also certifies infeasibility — and the active set it
  finds is then re-solved exactly (integers over a common denominator) and checked
  against the KKT conditions; only when that check fails is the float optimum used as is.

Feasibility without groups is decided exactly (Decimal comparisons), never by a solver
tolerance. Output weights are rounded to 4 dp half-even (§1.2); with exact values this
equals the reference's float → text → 4 dp except at exact rounding midpoints, where the
reference's own float noise decides.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import polars as pl

from dpm_vec.numeric import DEC, WEIGHT, dabs, lit, positive_or_null, units_text
from dpm_vec.stages.prepare import Market
from dpm_vec.stages.targets import TARGET_STAGE_ORDER, WARNINGS_SCHEMA, warnings_frame

# w_order layout inside the target stage (same base as the HEURISTIC group warnings):
#   UNKNOWN_CONSTRAINT_ATTRIBUTE_<k>   base + 10·rank                (rank = key position, 1-based)
#   INFEASIBLE_* / SOLVER_ERROR        base + 10·(R+1)               (R = number of keys of the run)
#   HINT_CASH_BAND_CONTRADICTION       base + 10·(R+1) + 1
#   HINT_SINGLE_POSITION_CAPACITY      base + 10·(R+1) + 2
#   HINT_LOCKED_GROUP_WEIGHT_<key>     base + 10·(R+1+rank) + 3
#   TARGET_METHOD_*_DIVERGENCE         COMPARE_ORDER, COMPARE_ORDER + 1 (after every target warning)
SOLVER_ORDER = TARGET_STAGE_ORDER * 1000
COMPARE_ORDER = SOLVER_ORDER + 99_000

COMPARISON_SCHEMA = {
    "run": pl.UInt32, "primary_method": pl.String, "primary_status": pl.String, "alternate_method": pl.String,
    "alternate_status": pl.String, "tolerance": pl.String, "differing_instruments": pl.List(pl.String),
    "alternate_warnings": pl.List(pl.String),
}
WEIGHT_DP = 4


def solve_targets(
    market: Market,
    runs: pl.DataFrame,
    weight_map: pl.DataFrame,
    model: pl.DataFrame,
    group_constraints: pl.DataFrame,
    which: pl.Expr | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """§6.6 steps 2-6 for the runs selected by ``which`` (default: target_method == SOLVER).

    ``weight_map`` is the universe weight map *after* the SELL_ONLY step (§6.4 step 1):
    run, instrument_id, map_order, kind, weight. ``model``: run, model_seq, instrument_id,
    model_weight. ``group_constraints``: run, constraint_key, max_weight.

    Returns
    * weights: the weight map rows (same columns as ``weight_map``) of every selected run
      whose solve did not fail, tradeable weights replaced by the 4-dp solver weights,
      other entries unchanged (a run without tradeable instrument keeps its map);
    * status: run, solver_status — READY or BLOCKED, one row per selected run (the
      SELL_ONLY PENDING_REVIEW of step 1 is the caller's to merge);
    * warnings: run, code, w_order.
    """
    if which is None:
        which = pl.col("target_method") == "SOLVER"
    pol = runs.filter(which).select(
        pl.col("run"),
        pl.col("cash_band_min_weight").cast(DEC).alias("_cmin"),
        pl.col("cash_band_max_weight").cast(DEC).alias("_cmax"),
        pl.col("single_position_max_weight").cast(DEC).alias("_m"),
    )
    wm = weight_map.join(pol.select("run"), on="run", how="semi").with_columns(
        (pl.col("kind") == "BUYABLE").alias("_buy")
    )
    per_run = (
        pol.join(
            wm.group_by("run").agg(
                pl.col("_buy").sum().cast(pl.Int64).alias("_n"),
                pl.when(~pl.col("_buy")).then(pl.col("weight")).otherwise(lit(0)).sum().cast(DEC).alias("_L"),
            ),
            on="run", how="left",
        )
        .with_columns(pl.col("_n").fill_null(0), pl.col("_L").fill_null(lit(0)))
        .with_columns(
            (lit(1) - pl.col("_cmax") - pl.col("_L")).alias("_lo"),
            (lit(1) - pl.col("_cmin") - pl.col("_L")).alias("_hi"),
        )
    )
    # step 2: no tradeable instrument → the map as it is, status untouched
    solving = per_run.filter(pl.col("_n") > 0)

    # tradeable rows with their model weight (last duplicate wins)
    model_w = (
        model.join(solving.select("run"), on="run", how="semi")
        .sort("run", "model_seq")
        .group_by("run", "instrument_id")
        .agg(pl.col("model_weight").last().cast(DEC).alias("_c"))
    )
    tradeable = (
        wm.filter(pl.col("_buy")).join(solving.select("run"), on="run", how="semi")
        .join(model_w, on=["run", "instrument_id"], how="left")
        .with_columns(pl.col("_c").fill_null(pl.col("weight")))
        .sort("run", "map_order")
    )

    cons, real, warnings = _constraints(market, wm, solving, group_constraints)

    # exact infeasibility tests that need no solver
    m = pl.col("_m")
    n_dec = pl.col("_n").cast(DEC)
    const_violation = cons.filter(
        pl.col("_known") & (pl.col("_gt") == 0) & (pl.col("_gl") != 0) & (pl.col("_gl") > pl.col("max_weight"))
    ).select("run")
    negative_limit = real.filter(pl.col("_limit") < 0).select("run")
    flagged = pl.concat([const_violation, negative_limit]).unique()
    solving = solving.with_columns(
        (
            (pl.col("_lo") > pl.col("_hi"))
            | (pl.col("_hi") < 0)
            | (m.is_not_null() & ((m < 0) | (pl.col("_lo") > m * n_dec)))
            | pl.col("run").is_in(flagged["run"].implode())
        ).alias("_infeasible"),
        pl.col("run").is_in(real["run"].unique().implode()).alias("_grouped"),
    )
    feasible = solving.filter(~pl.col("_infeasible"))
    grouped = feasible.filter(pl.col("_grouped"))

    # every feasible run projected onto box ∩ band; for a grouped run that projection is
    # the answer too when it already meets every cap (optimal for a relaxation, and feasible)
    relaxed = _project_box_band(tradeable.join(feasible.select("run", "_lo", "_hi", "_m"), on="run", how="inner"))
    binding = _caps_broken(relaxed.join(grouped.select("run"), on="run", how="semi"), real)
    solved = [relaxed.join(binding, on="run", how="anti").select("run", "instrument_id", "_w")]
    group_weights, group_fail = _solve_grouped(tradeable, grouped.join(binding, on="run", how="semi"), real)
    solved.append(group_weights)
    failures = pl.concat([
        solving.filter(pl.col("_infeasible")).select("run", pl.lit("INFEASIBLE_INFEASIBLE").alias("_failure")),
        group_fail,
    ])

    warnings.append(_failure_warnings(failures, solving, cons))

    new_w = pl.concat(solved)
    weights = (
        wm.join(failures.select("run"), on="run", how="anti")
        .join(new_w, on=["run", "instrument_id"], how="left")
        .with_columns(pl.coalesce("_w", "weight").alias("weight"))
        .select(weight_map.columns)
        .sort("run", "map_order")
    )
    status = pol.select(
        pl.col("run").cast(pl.UInt32),
        pl.when(pl.col("run").is_in(failures["run"].implode())).then(pl.lit("BLOCKED"))
        .otherwise(pl.lit("READY")).alias("solver_status"),
    )
    warn = pl.concat([pl.DataFrame(schema=WARNINGS_SCHEMA), *warnings]).sort("run", "w_order", maintain_order=True)
    return weights, status, warn


# ---------------------------------------------------------------------------
# group constraints (§6.6 step 3, last bullet)
# ---------------------------------------------------------------------------

def _constraints(market: Market, wm: pl.DataFrame, solving: pl.DataFrame, constraints: pl.DataFrame):
    """Per (run, key): rank, known attribute, tradeable member count _gt, locked member
    weight _gl; ``real`` = the constraints that bind tradeable weights (_gt > 0) with
    their member map_orders and ``_limit = max_weight - _gl``."""
    cons = (
        constraints.join(solving.select("run"), on="run", how="semi")
        .sort("run", "constraint_key")
        .with_columns(
            pl.col("constraint_key").rank("ordinal").over("run").cast(pl.Int64).alias("_rank"),
            pl.col("constraint_key").str.split_exact(":", 1).struct.field("field_0").alias("_attr"),
            pl.col("constraint_key").str.split_exact(":", 1).struct.field("field_1").alias("_value"),
            pl.col("max_weight").cast(DEC),
        )
    )
    # attributes of the instruments in each run's map only (not the whole shelf per run)
    shelf_attrs = market.with_attributes(wm.select("run", "instrument_id").join(solving.select("run"), on="run", how="semi"))
    shelf_names = market.attribute_names(solving).rename({"attribute": "_attr"})
    known = (
        cons.join(shelf_names, on=["run", "_attr"], how="semi")
        .select("run", "_rank", pl.lit(True).alias("_known"))
    )
    cons = cons.join(known, on=["run", "_rank"], how="left").with_columns(pl.col("_known").fill_null(False))
    warnings = [warnings_frame(
        cons.filter(~pl.col("_known")),
        pl.lit("UNKNOWN_CONSTRAINT_ATTRIBUTE_") + pl.col("_attr"),
        SOLVER_ORDER + 10 * pl.col("_rank"),
    )]
    members = (
        cons.filter(pl.col("_known"))
        .select("run", "_rank", "_attr", "_value")
        .join(
            shelf_attrs.select("run", "instrument_id", pl.col("attribute").alias("_attr"), pl.col("value").alias("_value")).unique(),
            on=["run", "_attr", "_value"], how="inner",
        )
        .join(wm.select("run", "instrument_id", "map_order", "_buy", "weight"), on=["run", "instrument_id"], how="inner")
    )
    stats = members.group_by("run", "_rank").agg(
        pl.col("_buy").sum().cast(pl.Int64).alias("_gt"),
        pl.when(~pl.col("_buy")).then(pl.col("weight")).otherwise(lit(0)).sum().cast(DEC).alias("_gl"),
        pl.col("map_order").filter(pl.col("_buy")).sort().alias("_members"),
    )
    cons = cons.join(stats, on=["run", "_rank"], how="left").with_columns(
        pl.col("_gt").fill_null(0), pl.col("_gl").fill_null(lit(0)),
    )
    real = cons.filter(pl.col("_known") & (pl.col("_gt") > 0)).with_columns(
        (pl.col("max_weight") - pl.col("_gl")).alias("_limit")
    )
    return cons, real, warnings


def _failure_warnings(failures: pl.DataFrame, solving: pl.DataFrame, cons: pl.DataFrame) -> pl.DataFrame:
    """§6.6 step 5: the failure code, then the hints in the spec's order."""
    if failures.height == 0:
        return pl.DataFrame(schema=WARNINGS_SCHEMA)
    n_keys = cons.group_by("run").agg(pl.len().cast(pl.Int64).alias("_R"))
    f = (
        failures.join(solving, on="run", how="left")
        .join(n_keys, on="run", how="left")
        .with_columns(pl.col("_R").fill_null(0))
        .with_columns((SOLVER_ORDER + 10 * (pl.col("_R") + 1)).alias("_base"))
    )
    infeasible = f.filter(pl.col("_failure").str.starts_with("INFEASIBLE_"))
    m = pl.col("_m")
    out = [
        warnings_frame(f, pl.col("_failure"), pl.col("_base")),
        warnings_frame(
            infeasible.filter(pl.col("_cmin") > pl.col("_cmax")),
            pl.lit("INFEASIBILITY_HINT_CASH_BAND_CONTRADICTION"), pl.col("_base") + 1,
        ),
        warnings_frame(
            infeasible.filter(m.is_not_null() & (m * pl.col("_n").cast(DEC) < lit(1) - pl.col("_cmax") - pl.col("_L"))),
            pl.lit("INFEASIBILITY_HINT_SINGLE_POSITION_CAPACITY"), pl.col("_base") + 2,
        ),
    ]
    locked = cons.join(infeasible.select("run", "_R"), on="run", how="inner").filter(pl.col("_gl") > pl.col("max_weight"))
    out.append(warnings_frame(
        locked, pl.lit("INFEASIBILITY_HINT_LOCKED_GROUP_WEIGHT_") + pl.col("constraint_key"),
        SOLVER_ORDER + 10 * (pl.col("_R") + 1 + pl.col("_rank")) + 3,
    ))
    return pl.concat(out)


# ---------------------------------------------------------------------------
# exact projection onto box ∩ band, vectorised over runs
# ---------------------------------------------------------------------------

def _clip(x: pl.Expr) -> pl.Expr:
    m = pl.col("_m")
    return pl.when(x < 0).then(lit(0)).when(m.is_not_null() & (x > m)).then(m).otherwise(x)


def _project_box_band(tr: pl.DataFrame) -> pl.DataFrame:
    """``w_i = clip(c_i - λ, 0, m)``; λ = 0 if the clipped model already sits in
    [lo, hi], else the λ putting Σ w on the violated edge. Σ clip(c - λ) is piecewise
    linear in λ with breakpoints c_i and c_i - m; walking them downwards with running
    (free count F, free sum S, capped count K) gives f(λ) = S - F·λ + K·m exactly."""
    empty = pl.DataFrame(schema={"run": pl.UInt32, "instrument_id": pl.String, "map_order": pl.Int64, "_x": DEC, "_w": DEC})
    if tr.height == 0:
        return empty
    tr = tr.with_columns(_clip(pl.col("_c")).alias("_w0"))
    tr = tr.with_columns(pl.col("_w0").sum().over("run").alias("_f0"))
    tr = tr.with_columns(
        pl.when(pl.col("_f0") > pl.col("_hi")).then(pl.col("_hi"))
        .when(pl.col("_f0") < pl.col("_lo")).then(pl.col("_lo"))
        .otherwise(None).alias("_T")
    )
    need = tr.filter(pl.col("_T").is_not_null())
    lam = pl.DataFrame(schema={"run": pl.UInt32, "_lam": DEC})
    if need.height:
        events = pl.concat([
            need.select("run", pl.col("_c").alias("_bp"), pl.lit(1, pl.Int64).alias("_dF"),
                        pl.col("_c").alias("_dS"), pl.lit(0, pl.Int64).alias("_dK")),
            need.filter(pl.col("_m").is_not_null()).select(
                "run", (pl.col("_c") - pl.col("_m")).alias("_bp"), pl.lit(-1, pl.Int64).alias("_dF"),
                (-pl.col("_c")).alias("_dS"), pl.lit(1, pl.Int64).alias("_dK")),
        ])
        per = need.group_by("run").agg(pl.col("_T").first(), pl.col("_m").first())
        ev = (
            events.group_by("run", "_bp").agg(pl.col("_dF").sum(), pl.col("_dS").sum().cast(DEC), pl.col("_dK").sum())
            .sort(["run", "_bp"], descending=[False, True])
            .with_columns(
                pl.col("_dF").cum_sum().over("run").alias("_F"),
                pl.col("_dS").cum_sum().over("run").cast(DEC).alias("_S"),
                pl.col("_dK").cum_sum().over("run").alias("_K"),
            )
            .join(per, on="run", how="left")
            .with_columns(pl.col("_m").fill_null(lit(0)).alias("_m0"))
        )

        def f_at(S, F, K, x):
            return S - F.cast(DEC) * x + K.cast(DEC) * pl.col("_m0")

        ev = ev.with_columns(
            f_at(pl.col("_S"), pl.col("_F"), pl.col("_K"), pl.col("_bp")).alias("_f"),
            pl.col("_F").shift(1).over("run").fill_null(0).alias("_pF"),
            pl.col("_S").shift(1).over("run").fill_null(lit(0)).alias("_pS"),
            pl.col("_K").shift(1).over("run").fill_null(0).alias("_pK"),
        ).with_columns((pl.col("_f") >= pl.col("_T")).alias("_reached"))
        ev = ev.with_columns(
            (pl.col("_reached") & ~pl.col("_reached").shift(1).over("run").fill_null(False)).alias("_first"),
            pl.col("_reached").any().over("run").alias("_any"),
            (pl.int_range(pl.len()).over("run") == pl.len().over("run") - 1).alias("_last"),
        )
        crossing = ev.filter(pl.col("_first")).select(
            "run",
            pl.when(pl.col("_f") == pl.col("_T")).then(pl.col("_bp"))
            .when(pl.col("_pF") > 0)
            .then((pl.col("_pS") + pl.col("_pK").cast(DEC) * pl.col("_m0") - pl.col("_T")) / positive_or_null("_pF").cast(DEC))
            .otherwise(pl.col("_bp")).cast(DEC).alias("_lam"),
        )
        beyond = ev.filter(~pl.col("_any") & pl.col("_last")).select(
            "run",
            pl.when(pl.col("_F") > 0)
            .then((pl.col("_S") + pl.col("_K").cast(DEC) * pl.col("_m0") - pl.col("_T")) / positive_or_null("_F").cast(DEC))
            .otherwise(pl.col("_bp")).cast(DEC).alias("_lam"),
        )
        lam = pl.concat([lam, crossing, beyond])
    out = tr.join(lam, on="run", how="left").with_columns(pl.col("_lam").fill_null(lit(0)))
    return out.select(
        "run", "instrument_id", pl.col("map_order").cast(pl.Int64),
        _clip(pl.col("_c") - pl.col("_lam")).alias("_x"),
    ).with_columns(pl.col("_x").round(WEIGHT_DP, mode="half_to_even").cast(DEC).alias("_w"))


def _caps_broken(relaxed: pl.DataFrame, real: pl.DataFrame) -> pl.DataFrame:
    """The runs whose box ∩ band projection (``_x``) exceeds one of their group caps:
    Σ over a cap's tradeable members > ``_limit``. Only these need the grouped solve."""
    members = (
        real.select("run", "_rank", "_limit", pl.col("_members").alias("map_order"))
        .explode("map_order")
        .with_columns(pl.col("map_order").cast(pl.Int64))
    )
    return (
        members.join(relaxed.select("run", "map_order", "_x"), on=["run", "map_order"], how="inner")
        .group_by("run", "_rank")
        .agg(pl.col("_x").sum(), pl.col("_limit").first())
        .filter(pl.col("_x") > pl.col("_limit"))
        .select("run")
        .unique()
    )


# ---------------------------------------------------------------------------
# runs whose group caps bind: one small QP each
# ---------------------------------------------------------------------------

def _solve_grouped(tradeable: pl.DataFrame, grouped: pl.DataFrame, real: pl.DataFrame):
    empty_w = pl.DataFrame(schema={"run": pl.UInt32, "instrument_id": pl.String, "_w": DEC})
    empty_f = pl.DataFrame(schema={"run": pl.UInt32, "_failure": pl.String})
    if grouped.height == 0:
        return empty_w, empty_f
    # every value as an integer count of 10^-28 (WEIGHT's physical i128): the finest
    # scale among the inputs (model weights and limits are DEC, SELL_ONLY-redistributed
    # map weights WEIGHT), so no digit is lost
    units = lambda name: pl.col(name).cast(WEIGHT).to_physical()  # noqa: E731
    items = (
        tradeable.join(grouped.select("run"), on="run", how="semi")
        .group_by("run", maintain_order=True)
        .agg(pl.col("instrument_id"), pl.col("map_order"), units("_c"))
    )
    groups = (
        real.join(grouped.select("run"), on="run", how="semi").sort("run", "_rank")
        .group_by("run", maintain_order=True).agg(pl.col("_members"), units("_limit"))
    )
    problems = (
        grouped.select("run", units("_lo"), units("_hi"), units("_m"))
        .join(items, on="run").join(groups, on="run", how="left").sort("run")
    )
    runs_w, ids_w, units_w, fails = [], [], [], []
    for run, lo, hi, m, ids, map_order, c, members, limits in problems.select(
        "run", "_lo", "_hi", "_m", "instrument_id", "map_order", "_c", "_members", "_limit",
    ).iter_rows():
        pos = {mo: k for k, mo in enumerate(map_order)}
        gl = [([pos[mo] for mo in idx], limit) for idx, limit in zip(members or [], limits or [])]
        try:
            sol = _project_scaled(c, lo, hi, m, gl, 10 ** WEIGHT.scale)
        except (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError):
            fails.append((run, "SOLVER_ERROR"))
            continue
        if sol is None:
            fails.append((run, "INFEASIBLE_INFEASIBLE"))
            continue
        numerators, denominator = sol
        runs_w.extend([run] * len(ids))
        ids_w.extend(ids)
        units_w.extend(_round_units(x, denominator) for x in numerators)
    weights = pl.DataFrame(
        {"run": runs_w, "instrument_id": ids_w, "_w": units_w},
        schema={"run": pl.UInt32, "instrument_id": pl.String, "_w": pl.Int64},
    ).with_columns((pl.col("_w").cast(DEC) / 10 ** WEIGHT_DP).cast(DEC))
    failed = pl.DataFrame(fails, schema={"run": pl.UInt32, "_failure": pl.String}, orient="row")
    return weights, failed


def _round_units(numerator: int, denominator: int) -> int:
    """numerator / denominator (denominator > 0) in 10^-4 units, half-even; negative → 0."""
    if numerator <= 0:
        return 0
    q, r = divmod(numerator * 10 ** WEIGHT_DP, denominator)
    return q + 1 if 2 * r > denominator or (2 * r == denominator and q % 2) else q


def _project_scaled(
    c: list[int], lo: int, hi: int, m: int | None, groups: list[tuple[list[int], int]], scale: int,
) -> tuple[list[int], int] | None:
    """The projection of ``c`` onto {0 <= w (<= m), lo <= Σw <= hi, Σ_{idx} w <= limit}, on
    integers: every input is its value times ``scale``; the answer is (numerators,
    denominator), w_i = numerators[i] / denominator exactly.

    Float stage: the least-distance problem min ||x|| s.t. G x >= h (x = w - c) is solved
    through Lawson-Hanson NNLS (scipy.optimize.nnls) on [Gᵀ; hᵀ] u ≈ e_{n+1}; a zero
    residual certifies infeasibility. Exact stage: the aggregate constraints (band,
    groups) the float optimum shows active give multipliers ν from a small linear system,
    solved exactly in integers (``_solve_linear``); w = clip(c - Aᵀν, 0, m) is accepted
    when it satisfies every KKT condition exactly. Otherwise the float optimum is returned (as the shortest text of each float).
    """
    n = len(c)
    if lo > hi or hi < 0 or (m is not None and (m < 0 or lo > m * n)) or any(lim < 0 for _, lim in groups):
        return None
    # aggregate rows a·w <= b, with a as (indices, sign)
    agg: list[tuple[list[int], int, int]] = [(list(range(n)), 1, hi), (list(range(n)), -1, -lo)]
    agg += [(idx, 1, lim) for idx, lim in groups]
    # box rows first, per variable (-w_i <= 0, then w_i <= m), then the aggregate rows
    per_var = 1 if m is None else 2
    k0 = per_var * n
    A = np.zeros((k0 + len(agg), n))
    A[np.arange(0, k0, per_var), np.arange(n)] = -1.0
    b = np.zeros(k0 + len(agg))
    if m is not None:
        A[np.arange(1, k0, 2), np.arange(n)] = 1.0
        b[1:k0:2] = m / scale
    for j, (idx, sign, bound) in enumerate(agg):
        A[k0 + j, idx] = float(sign)
        b[k0 + j] = bound / scale  # int / int: correctly rounded, as float(Fraction) is
    cf = np.array([x / scale for x in c])
    G, h = -A, A @ cf - b
    # the least-distance problem scales: x solves it for h exactly when x / s does for h / s,
    # so h is brought to magnitude 1 (model weights of 1e6 left NNLS a wrong optimum)
    s = max(1.0, float(np.abs(h).max(initial=0.0)))
    E = np.vstack([G.T, h[None, :] / s])
    f = np.zeros(n + 1)
    f[n] = 1.0
    from scipy.optimize import nnls  # imported here: only portfolios with group caps need it

    u, rnorm = nnls(E, f, maxiter=50 * E.shape[1])
    if not np.isfinite(rnorm):
        raise ArithmeticError("NNLS failed")
    if rnorm <= 1e-9:
        return None
    r = E @ u - f
    wf = cf - s * r[:n] / r[n]
    ua = u[k0:]
    slack = np.array([bound / scale - sign * wf[idx].sum() for idx, sign, bound in agg])
    scale_u = max(1.0, float(np.abs(ua).max(initial=0.0)))
    guesses = []
    for s in (
        [j for j in range(len(agg)) if ua[j] > 1e-12 * scale_u],
        [j for j in range(len(agg)) if abs(slack[j]) <= 1e-9],
        [j for j in range(len(agg)) if ua[j] > 1e-12 * scale_u and abs(slack[j]) <= 1e-9],
    ):
        if s not in guesses:
            guesses.append(s)
    for s in guesses:
        w = _kkt_exact(c, lo, hi, m, agg, s, wf, scale)
        if w is not None:
            return w
    # fallback: the float optimum, clipped into the box
    ub = m / scale if m is not None else np.inf
    fallback = [Fraction(Decimal(repr(float(min(max(x, 0.0), ub))))) for x in wf]
    denominator = math.lcm(*(x.denominator for x in fallback))
    return [int(x * denominator) for x in fallback], denominator


def _kkt_exact(c, lo, hi, m, agg, active, wf, scale) -> tuple[list[int], int] | None:
    """Exact point on the face the float optimum shows: box-bound variables fixed at 0 or
    m, the guessed active aggregate rows as equalities (dependent rows dropped), the rest
    from the normal equations. Accepted when it satisfies every KKT condition exactly,
    or — degenerate faces, where multipliers are not unique — when it is exactly
    feasible and within 1e-9 of the float optimum (then it is the projection onto the
    face's affine hull, which contains the optimum).

    Integers throughout (inputs times ``scale``): with q the common denominator of the
    scaled multipliers, every w_i is W_i / (scale·q) and every test compares integers."""
    n = len(c)
    eq_band = lo == hi and 0 in active and 1 in active
    act = [j for j in active if not (eq_band and j == 1)]  # Σw = lo = hi: one row, free sign
    fixed = dict.fromkeys(np.flatnonzero(wf <= 1e-9).tolist(), 0)
    if m is not None:
        fixed.update(dict.fromkeys(np.flatnonzero((wf > 1e-9) & (wf >= m / scale - 1e-9)).tolist(), m))
    free = set(range(n)).difference(fixed)
    members = [set(idx) for idx, _, _ in agg]

    def row_sums(x: list[int]) -> list[int]:
        """sign · Σ x over each aggregate row's members (rows 0 and 1 are the band: all)."""
        total = sum(x)
        return [total, -total] + [sign * sum(x[i] for i in idx) for idx, sign, _ in agg[2:]]

    M = [[agg[r][1] * agg[s][1] * len(free & members[r] & members[s]) for s in act] for r in act]
    at_bounds = [fixed.get(i, x) for i, x in enumerate(c)]
    sums = row_sums(at_bounds)
    solved = _solve_linear(M, [sums[r] - agg[r][2] for r in act])  # the multipliers times scale
    if solved is None:
        return None
    numerators, q = solved
    nus = dict(zip(act, numerators))
    shift = [0] * n
    for j, val in nus.items():
        if val:
            idx, sign, _ = agg[j]
            for i in idx:
                shift[i] += sign * val
    # U_i = (c_i - shift_i)·scale·q; w_i = U_i for a free variable, its bound otherwise
    u = [x * q - sh for x, sh in zip(c, shift)]
    w = [fixed[i] * q if i in fixed else u[i] for i in range(n)]
    mq = None if m is None else m * q
    if any(x < 0 or (mq is not None and x > mq) for x in w):
        return None
    lhs = row_sums(w)
    if any(lhs[j] > agg[j][2] * q for j in range(len(agg))):
        return None

    def bound_ok(i: int) -> bool:  # sign of the box multiplier of a fixed variable
        if m is not None and m == 0:
            return True
        return u[i] <= 0 if fixed[i] == 0 else u[i] >= mq

    kkt = (
        all(val >= 0 or (eq_band and j == 0) for j, val in nus.items())
        and all(val == 0 or lhs[j] == agg[j][2] * q for j, val in nus.items())
        and all(bound_ok(i) for i in fixed)
    )
    denominator = scale * q
    if kkt or max((abs(w[i] / denominator - wf[i]) for i in range(n)), default=0.0) <= 1e-9:
        return w, denominator
    return None


def _solve_linear(M: list[list[int]], v: list[int]) -> tuple[list[int], int] | None:
    """Exact Gauss-Jordan on a (possibly singular) integer system, fraction-free: rows are
    combined by cross-multiplication, so each stays a nonzero multiple of its rational
    counterpart and pivots fall where rational elimination puts them. Unknowns without a
    pivot are 0. Returns (numerators, denominator > 0) with x = numerators / denominator,
    or None if the system is inconsistent."""
    k = len(v)
    aug = [row[:] + [v[r]] for r, row in enumerate(M)]
    pivots: list[tuple[int, int]] = []
    row = 0
    for col in range(k):
        piv = next((r for r in range(row, k) if aug[r][col] != 0), None)
        if piv is None:
            continue
        aug[row], aug[piv] = aug[piv], aug[row]
        p = aug[row][col]
        for r in range(k):
            if r != row and aug[r][col] != 0:
                fct = aug[r][col]
                combined = [p * x - fct * y for x, y in zip(aug[r], aug[row])]
                g = math.gcd(*combined)
                aug[r] = [x // g for x in combined] if g > 1 else combined
        pivots.append((row, col))
        row += 1
    if any(aug[r][k] != 0 for r in range(row, k)):
        return None
    denominator = math.lcm(*(abs(aug[r][col]) for r, col in pivots)) if pivots else 1
    out = [0] * k
    for r, col in pivots:
        out[col] = aug[r][k] * (denominator // aug[r][col])
    return out, denominator


# ---------------------------------------------------------------------------
# §6.7 method comparison
# ---------------------------------------------------------------------------

def compare_methods(
    runs: pl.DataFrame,
    primary_status: pl.DataFrame,
    primary_trace: pl.DataFrame,
    alternate_status: pl.DataFrame,
    alternate_trace: pl.DataFrame,
    alternate_warnings: pl.DataFrame,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Compare the primary and the alternate method of every run with
    ``compare_target_methods``.

    runs: run, target_method, compare_target_methods, compare_target_methods_tolerance.
    *_status: run, target_status (final status of the target stage for that method).
    *_trace: run, instrument_id, final_weight (the method's trace; rows of a BLOCKED
    method are ignored, a blocked method having an empty trace).
    alternate_warnings: run, code (the alternate method's target-stage warnings).

    Returns (comparison, warnings): comparison has COMPARISON_SCHEMA, one row per compared
    run; warnings (run, code, w_order) holds TARGET_METHOD_STATUS_DIVERGENCE then
    TARGET_METHOD_WEIGHT_DIVERGENCE for the main warnings list.
    """
    cmp = runs.filter(pl.col("compare_target_methods").fill_null(False)).select(
        pl.col("run").cast(pl.UInt32),
        pl.col("target_method").alias("primary_method"),
        pl.when(pl.col("target_method") == "SOLVER").then(pl.lit("HEURISTIC")).otherwise(pl.lit("SOLVER")).alias("alternate_method"),
        pl.col("compare_target_methods_tolerance").cast(DEC).alias("_tol"),
    )
    if cmp.height == 0:
        return pl.DataFrame(schema=COMPARISON_SCHEMA), pl.DataFrame(schema=WARNINGS_SCHEMA)

    def weights(trace: pl.DataFrame, status: pl.DataFrame, name: str) -> pl.DataFrame:
        blocked = status.filter(pl.col("target_status") == "BLOCKED").select("run")
        return (
            trace.join(cmp.select("run"), on="run", how="semi").join(blocked, on="run", how="anti")
            .select("run", "instrument_id", pl.col("final_weight").cast(DEC).alias(name))
            .unique(["run", "instrument_id"], keep="first")
        )

    both = (
        weights(primary_trace, primary_status, "_p")
        .join(weights(alternate_trace, alternate_status, "_a"), on=["run", "instrument_id"], how="full", coalesce=True)
        .join(cmp.select("run", "_tol"), on="run", how="inner")
    )
    differing = (
        both.filter(dabs(pl.col("_p").fill_null(lit(0)) - pl.col("_a").fill_null(lit(0))) > pl.col("_tol"))
        .sort("run", "instrument_id")
        .group_by("run", maintain_order=True)
        .agg(pl.col("instrument_id").alias("differing_instruments"))
    )
    alt_warn = (
        alternate_warnings.join(cmp.select("run"), on="run", how="semi")
        .select("run", "code").unique().sort("run", "code")
        .group_by("run", maintain_order=True)
        .agg(pl.col("code").alias("alternate_warnings"))
    )
    comparison = (
        cmp.join(primary_status.select("run", pl.col("target_status").alias("primary_status")), on="run", how="left")
        .join(alternate_status.select("run", pl.col("target_status").alias("alternate_status")), on="run", how="left")
        .join(differing, on="run", how="left")
        .join(alt_warn, on="run", how="left")
        .with_columns(
            units_text(pl.col("_tol")).alias("tolerance"),
            pl.col("differing_instruments").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            pl.col("alternate_warnings").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        )
        .select(list(COMPARISON_SCHEMA))
        .sort("run")
    )
    warnings = pl.concat([
        warnings_frame(
            comparison.filter(pl.col("primary_status").ne_missing(pl.col("alternate_status"))),
            pl.lit("TARGET_METHOD_STATUS_DIVERGENCE"), pl.lit(COMPARE_ORDER),
        ),
        warnings_frame(
            comparison.filter(pl.col("differing_instruments").list.len() > 0),
            pl.lit("TARGET_METHOD_WEIGHT_DIVERGENCE"), pl.lit(COMPARE_ORDER + 1),
        ),
    ]).sort("run", "w_order")
    return comparison, warnings
