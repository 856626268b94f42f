"""What-if scenarios over a whole book: every portfolio under every option set.

A scenario file is ``{"scenarios": {name: {"options": {...}}}}`` (the analyze request's
``scenarios`` shape) or just the inner map. Each portfolio row becomes one run per
scenario, keyed ``<run_key>|<scenario>``; a scenario's options override only the policy
columns it names, so each portfolio keeps the rest of its own mandate. An option name
that is no EngineOptions field (a misspelt ``max_turnover_pc``) is an error, as is a
scenario key other than ``options`` and ``description``: either would run the scenario
as the baseline without a word.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import polars as pl

from dpm_vec.analyze import SCENARIO_NAME
from dpm_vec.book import POLICY_COLUMNS, table_schema
from dpm_vec.contract import OPTION_NAMES, _Reader, parse_options
from dpm_vec.errors import DpmVecError
from dpm_vec.io import flag_row_faults
from dpm_vec.schemas import failure_cases

MAP_OPTIONS = {"group_constraints": "group_constraints", "max_overdraft_by_ccy": "overdraft_limits"}
POLICY_DTYPES = {name: dtype for name, dtype, _ in POLICY_COLUMNS}
SCENARIO_KEYS = ("options", "description")


def _unknown(names, known, what: str) -> str | None:
    """``what`` naming the first of ``names`` not in ``known``, with a did-you-mean hint."""
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(str(name), sorted(known), n=1)
            return f"unknown {what} {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
    return None


def load_scenarios(path: str | Path) -> dict[str, dict]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DpmVecError(f"{path}: cannot read scenarios: {exc}") from None
    scenarios = doc.get("scenarios", doc) if isinstance(doc, dict) else None
    beside = sorted(k for k in doc if k != "scenarios") if isinstance(doc, dict) and "scenarios" in doc else []
    if beside and not {"inputs", "portfolio_snapshot"} & set(doc):  # an analyze request's scenarios are welcome
        raise DpmVecError(f"{path}: {', '.join(map(repr, beside))} beside \"scenarios\": a scenarios file holds only "
                          f"{{\"scenarios\": {{name: {{\"options\": {{...}}}}}}}}; move each scenario inside it")
    if isinstance(doc, dict) and "scenarios" not in doc and {"inputs", "portfolio_snapshot"} & set(doc):
        raise DpmVecError(f"{path}: this is a rebalance request (or a golden file), not a scenarios file: expected "
                          f"{{\"scenarios\": {{name: {{\"options\": {{...}}}}}}}} (data/scenarios.json is one)")
    if not isinstance(scenarios, dict) or not scenarios:
        raise DpmVecError(f"{path}: expected {{\"scenarios\": {{name: {{\"options\": {{...}}}}}}}}")
    for name, spec in scenarios.items():
        if not SCENARIO_NAME.fullmatch(name):
            raise DpmVecError(f"{path}: scenario name {name!r} must match ^[a-z0-9_-]{{1,64}}$")
        options = spec.get("options", {}) if isinstance(spec, dict) else None
        if not isinstance(options, dict):
            raise DpmVecError(f"{path}: scenarios.{name}.options must be an object")
        unknown = _unknown(spec, SCENARIO_KEYS, "key")
        if unknown:
            raise DpmVecError(f"{path}: scenarios.{name}: {unknown}; a scenario has {' and '.join(SCENARIO_KEYS)}")
        if spec.get("description") is not None and not isinstance(spec["description"], str):
            raise DpmVecError(f"{path}: scenarios.{name}.description: expected a string, got {spec['description']!r}")
        unknown = _unknown(options, OPTION_NAMES, "option")
        if unknown:
            raise DpmVecError(f"{path}: scenarios.{name}.options: {unknown}; the options are the EngineOptions fields "
                              f"(see docs/features.md)")
        reader, rows = _Reader(), {"group_constraints": [], "overdraft_limits": []}
        policy = parse_options(reader, options, name, rows)
        if reader.errors:
            first = reader.errors[0]
            raise DpmVecError(f"{path}: scenarios.{name}: {first['field']}: {first['message']}")
        _refuse_unholdable(path, name, options, policy, rows)
    return scenarios


# where a book column of a scenario's value comes from, in the analyze request's terms
_OPTION_OF = {("portfolios", "min_trade_notional_amount"): "min_trade_notional.amount",
              ("portfolios", "min_trade_notional_currency"): "min_trade_notional.currency",
              ("overdraft_limits", "currency"): "max_overdraft_by_ccy key", ("overdraft_limits", "max_overdraft"): "max_overdraft_by_ccy",
              ("group_constraints", "constraint_key"): "group_constraints key", ("group_constraints", "max_weight"): "group_constraints"}


def _refuse_unholdable(path, name: str, options: dict, policy: dict, rows: dict[str, list[dict]]) -> None:
    """A value the analyze door takes, as the reference does, but a book's column refuses
    (a currency code that is not three capital letters) stops the sweep, naming the
    scenario and option: the shards would block every run of that scenario."""
    columns = sorted(_overridden_columns(options))
    frames = {"portfolios": pl.DataFrame({column: [policy[column]] for column in columns}, schema={c: POLICY_DTYPES[c] for c in columns})}
    frames.update({table: pl.DataFrame(rows[table], schema=table_schema(table), orient="row") for table in MAP_OPTIONS.values()})
    for table, frame in frames.items():
        cases = failure_cases(table, frame, columns if table == "portfolios" else None)
        if cases is not None:
            case = cases.row(0, named=True)
            option = _OPTION_OF.get((table, case["column"]), case["column"])
            raise DpmVecError(f"{path}: scenarios.{name}.options: {option} {case['failure_case']!r} fails {case['check']}: the "
                              "analyze door takes it, as the reference does, but a book's column cannot hold it (docs/book.md)")


def _overridden_columns(options: dict) -> set[str]:
    """The portfolios table's policy columns a scenario's options set."""
    named = {name for name, _, _ in POLICY_COLUMNS if name in options}
    if "min_trade_notional" in options:
        named |= {"min_trade_notional_amount", "min_trade_notional_currency"}
    return named


def expand(portfolios: pl.DataFrame, group_constraints: pl.DataFrame, overdrafts: pl.DataFrame,
           scenarios: dict[str, dict], portfolio_faults: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Portfolios × scenarios (scenario order = name order, portfolios in book order).
    ``portfolio_faults`` (``read_portfolio_rows``) go under each scenario's run key, less
    those of a column the scenario sets (its value replaces the failed one), and a run
    blocks (input_fault) only on the faults it keeps. The limit tables' book values are
    kept as the book gives them: each shard checks them row by row, as without scenarios,
    so a bad value blocks only its portfolio's runs."""
    out = {"portfolios": [], "group_constraints": [], "overdraft_limits": [], "portfolio_faults": []}
    numbered_faults = portfolio_faults.with_row_index("_fault")
    for index, name in enumerate(sorted(scenarios)):
        options = scenarios[name].get("options", {})
        reader, rows = _Reader(), {"group_constraints": [], "overdraft_limits": []}
        policy = parse_options(reader, options, "_", rows)
        named = _overridden_columns(options)
        overrides = [pl.lit(policy[k], dtype=POLICY_DTYPES[k]).alias(k) for k in sorted(named)]
        faults = numbered_faults.filter(~pl.col("input_column").is_in(sorted(named))).with_columns(
            pl.col("key") + "|" + name, pl.lit(index).alias("_scenario"))
        out["portfolio_faults"].append(faults)
        runs = flag_row_faults(portfolios.with_columns(
            *overrides,
            (pl.col("run_key") + "|" + name).alias("run_key"),
            pl.lit(name).alias("scenario_id"),
            (pl.col("seq") * len(scenarios) + index).alias("seq"),
            pl.lit(None, dtype=pl.String).alias("input_fault"),
        ), faults)
        out["portfolios"].append(runs)
        keys = portfolios.select("run_key", (pl.col("run_key") + "|" + name).alias("_scenario_key"))
        for option, table in MAP_OPTIONS.items():
            source = group_constraints if table == "group_constraints" else overdrafts
            if option in options:
                given = pl.DataFrame(rows[table], schema=table_schema(table), orient="row").drop("run_key")
                out[table].append(keys.join(given, how="cross").drop("run_key").rename({"_scenario_key": "run_key"}))
            else:
                out[table].append(keys.join(source.drop("seq", strict=False), on="run_key").drop("run_key").rename({"_scenario_key": "run_key"}))
    portfolios_out = pl.concat(out["portfolios"]).sort("seq").drop("seq")
    faults_out = pl.concat(out.pop("portfolio_faults")).sort("_fault", "_scenario").drop("_fault", "_scenario")
    return {
        "portfolios": portfolios_out,
        "portfolio_faults": faults_out,
        **{t: pl.concat(frames, how="diagonal_relaxed") if frames else None for t, frames in out.items() if t != "portfolios"},
    }


def comparison_table(runs: pl.DataFrame) -> pl.DataFrame:
    """Per scenario: how many runs ended in each status, intents and gross turnover."""
    return (
        runs.group_by("scenario_id")
        .agg(
            pl.len().alias("portfolios"),
            (pl.col("status") == "READY").sum().alias("ready"),
            (pl.col("status") == "PENDING_REVIEW").sum().alias("pending_review"),
            (pl.col("status") == "BLOCKED").sum().alias("blocked"),
            pl.col("security_intent_count").sum().alias("security_intents"),
            pl.col("gross_turnover_notional_base").sum().alias("gross_turnover_notional_base_sum"),
        )
        .sort("scenario_id")
    )
