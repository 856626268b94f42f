"""The scalar oracle (dpm_vec.oracle) against every stored golden.

A small, independent comparator: status, security/FX intents (type, instrument or pair,
side, exact quantity, money within 0.01), after-state money and quantities, cash,
data-quality lists, suppressed/dropped instruments, rule statuses and warnings where the
golden asserts them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from dpm_vec.oracle import simulate

REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "data" / "goldens"  # a copy of ../shared/goldens
FILES = sorted(GOLDENS.rglob("*.json"))
CENT = Decimal("0.01")


def _expected(doc: dict) -> dict:
    return doc.get("expected_outputs") or doc.get("expected_output")


def _dec(x) -> Decimal:
    return Decimal(str(x["amount"] if isinstance(x, dict) else x))


def _close(a, b, tol=CENT) -> bool:
    return abs(_dec(a) - _dec(b)) <= tol


def _intent_key(it: dict) -> tuple:
    if it.get("intent_type") == "FX_SPOT":
        return ("FX_SPOT", it.get("pair"), it.get("buy_currency"))
    return ("SECURITY_TRADE", it.get("instrument_id"), it.get("side"))


def compare(exp: dict, act: dict) -> list[str]:
    """Return a list of human-readable differences on the key facts."""
    errs: list[str] = []
    if exp.get("status") != act["status"]:
        errs.append(f"status {exp.get('status')} != {act['status']}")

    if "intents" in exp:
        em = {_intent_key(i): i for i in exp["intents"]}
        am = {_intent_key(i): i for i in act["intents"]}
        if set(em) != set(am):
            errs.append(f"intent keys {sorted(em)} != {sorted(am)}")
        for k in set(em) & set(am):
            e, a = em[k], am[k]
            if "quantity" in e and Decimal(e["quantity"]) != Decimal(a["quantity"]):
                errs.append(f"{k} quantity {e['quantity']} != {a['quantity']}")
            for f in ("notional", "notional_base", "buy_amount", "sell_amount_estimated"):
                if f in e and not _close(e[f], a[f]):
                    errs.append(f"{k} {f} {e[f]} != {a[f]}")

    after_e, after_a = exp.get("after_simulated"), act["after_simulated"]
    if after_e:
        if "total_value" in after_e and not _close(after_e["total_value"], after_a["total_value"]):
            errs.append(f"after total {after_e['total_value']} != {after_a['total_value']}")
        acash = {}
        for c in after_a["cash_balances"]:
            acash.setdefault(c["currency"], c["amount"])
        for c in after_e.get("cash_balances", []):
            if c["currency"] not in acash or not _close(c["amount"], acash[c["currency"]]):
                errs.append(f"cash {c['currency']} {c['amount']} != {acash.get(c['currency'])}")
        apos = {}
        for p in after_a["positions"]:
            apos.setdefault(p["instrument_id"], p)
        for p in after_e.get("positions", []):
            a = apos.get(p["instrument_id"])
            if a is None:
                errs.append(f"position {p['instrument_id']} missing")
                continue
            if "quantity" in p and Decimal(p["quantity"]) != Decimal(a["quantity"]):
                errs.append(f"position {p['instrument_id']} qty {p['quantity']} != {a['quantity']}")
            for f in ("value_in_base_ccy", "value_in_instrument_ccy"):
                if f in p and not _close(p[f], a[f]):
                    errs.append(f"position {p['instrument_id']} {f} {p[f]} != {a[f]}")

    diag_e, diag_a = exp.get("diagnostics") or {}, act["diagnostics"]
    for bucket, items in (diag_e.get("data_quality") or {}).items():
        if set(items) != set(diag_a["data_quality"][bucket]):
            errs.append(f"data_quality.{bucket} {items} != {diag_a['data_quality'][bucket]}")
    for f in ("suppressed_intents", "dropped_intents"):
        if f in diag_e:
            es = {x["instrument_id"] for x in diag_e[f]}
            as_ = {x["instrument_id"] for x in diag_a[f]}
            if es != as_:
                errs.append(f"{f} {sorted(es)} != {sorted(as_)}")
    if "warnings" in diag_e and set(diag_e["warnings"]) != set(diag_a["warnings"]):
        errs.append(f"warnings {diag_e['warnings']} != {diag_a['warnings']}")

    if "rule_results" in exp:
        astat: dict[str, set] = {}
        for r in act["rule_results"]:
            astat.setdefault(r["rule_id"], set()).add(r["status"])
        for r in exp["rule_results"]:
            if r["status"] not in astat.get(r["rule_id"], set()):
                errs.append(f"rule {r['rule_id']} {r['status']} not in {astat.get(r['rule_id'])}")

    for t in (exp.get("target") or {}).get("targets", []):
        rows = [x for x in act["target"]["targets"] if x["instrument_id"] == t["instrument_id"]]
        if not rows:
            errs.append(f"target {t['instrument_id']} missing")
        elif "final_weight" in t and not _close(t["final_weight"], rows[0]["final_weight"], Decimal("0.0001")):
            errs.append(f"target {t['instrument_id']} {t['final_weight']} != {rows[0]['final_weight']}")
    return errs


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(GOLDENS)) for p in FILES])
def test_oracle_matches_golden(path: Path) -> None:
    doc = json.loads(path.read_text())
    errs = compare(_expected(doc), simulate(doc["inputs"]))
    assert not errs, "\n".join(errs)


def test_result_shape_and_decimal_strings() -> None:
    """§5 key order; decimals are strings; integer fields are ints."""
    req = {
        "portfolio_snapshot": {"portfolio_id": "p", "base_currency": "SGD", "positions": [],
                               "cash_balances": [{"currency": "SGD", "amount": "10000.00"}]},
        "market_data_snapshot": {"prices": [{"instrument_id": "US", "price": 100.0, "currency": "USD"}],
                                 "fx_rates": [{"pair": "USD/SGD", "rate": 1.35}]},
        "model_portfolio": {"targets": [{"instrument_id": "US", "weight": 0.5}]},
        "shelf_entries": [{"instrument_id": "US", "status": "APPROVED", "settlement_days": 2}],
        "options": {"enable_settlement_awareness": True},
    }
    out = simulate(req)
    assert list(out) == ["rebalance_run_id", "correlation_id", "status", "before", "universe", "target",
                         "intents", "after_simulated", "reconciliation", "tax_impact", "rule_results",
                         "explanation", "diagnostics", "gate_decision", "lineage"]
    assert out["status"] == "READY"
    fx, buy = out["intents"]
    assert fx["intent_id"] == "oi_fx_2" and fx["buy_amount"] == "3737.000"
    assert fx["sell_amount_estimated"] == "5044.95000"
    assert buy["quantity"] == "37" and buy["dependencies"] == ["oi_fx_2"]
    assert all(isinstance(p["date_offset"], int) for p in out["diagnostics"]["cash_ladder"])
    assert isinstance(out["gate_decision"]["summary"]["hard_fail_count"], int)
    assert out["after_simulated"]["positions"][0]["weight"] == "0.4995"


def test_tax_hifo_fractional_budget() -> None:
    """§6.10 observed example: 51.111… units, gain 99.99…, budget_used snaps to 100."""
    req = {
        "portfolio_snapshot": {"portfolio_id": "p", "base_currency": "USD", "cash_balances": [],
                               "positions": [{"instrument_id": "A", "quantity": "100", "lots": [
                                   {"lot_id": "L1", "quantity": "50", "unit_cost": {"amount": "10", "currency": "USD"},
                                    "purchase_date": "2020-01-01"},
                                   {"lot_id": "L2", "quantity": "50", "unit_cost": {"amount": "100", "currency": "USD"},
                                    "purchase_date": "2021-01-01"}]}]},
        "market_data_snapshot": {"prices": [{"instrument_id": "A", "price": "100", "currency": "USD"}]},
        "model_portfolio": {"targets": []},
        "shelf_entries": [{"instrument_id": "A", "status": "APPROVED"}],
        "options": {"enable_tax_awareness": True, "max_realized_capital_gains": "100"},
    }
    out = simulate(req)
    (sell,) = out["intents"]
    assert sell["quantity"] == "51.11111111111111111111111111"
    assert sell["constraints_applied"] == ["TAX_BUDGET"]
    assert out["tax_impact"]["total_realized_gain"]["amount"] == "99.99999999999999999999999999"
    assert Decimal(out["tax_impact"]["budget_used"]["amount"]) == 100
    assert out["diagnostics"]["warnings"] == ["TAX_BUDGET_LIMIT_REACHED"]


def test_cap_worked_example() -> None:
    """§6.4 step 4 worked example: A .5, B .1, C .1, cap .3 -> .3/.2/.15, PENDING_REVIEW."""
    req = {
        "portfolio_snapshot": {"portfolio_id": "p", "base_currency": "USD",
                               "cash_balances": [{"currency": "USD", "amount": "100000"}]},
        "market_data_snapshot": {"prices": [{"instrument_id": i, "price": "10", "currency": "USD"} for i in "ABC"]},
        "model_portfolio": {"targets": [{"instrument_id": "A", "weight": "0.5"},
                                        {"instrument_id": "B", "weight": "0.1"},
                                        {"instrument_id": "C", "weight": "0.1"}]},
        "shelf_entries": [{"instrument_id": i, "status": "APPROVED"} for i in "ABC"],
        "options": {"single_position_max_weight": "0.3"},
    }
    out = simulate(req)
    w = {t["instrument_id"]: Decimal(t["final_weight"]) for t in out["target"]["targets"]}
    assert w == {"A": Decimal("0.3"), "B": Decimal("0.2"), "C": Decimal("0.15")}
    assert out["status"] == "PENDING_REVIEW"


def test_cli(tmp_path: Path) -> None:
    src = GOLDENS / "reference-service" / "scenario_01_cash_inflow.json"
    req = tmp_path / "req.json"
    req.write_text(json.dumps(json.loads(src.read_text())["inputs"]))
    proc = subprocess.run([sys.executable, "-m", "dpm_vec.oracle", str(req)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["status"] == "READY"


@pytest.mark.parametrize("written", [3.0, "3.0", " 3 ", "3"])
def test_integer_fields_take_integral_numbers_and_strings(written) -> None:
    """§3: an integer field accepts integral strings and numbers. The oracle used to read
    3.0 as int("3.0") and fail; it must answer as for 3, and as the engine does."""
    from dpm_vec.simulate import simulate_many

    base = json.loads((REPO / "data" / "requests" / "settlement_ladder.json").read_text())
    req = json.loads(json.dumps(base))
    req["options"]["settlement_horizon_days"] = written
    req["shelf_entries"][0]["settlement_days"] = written
    req["options"]["fx_settlement_days"] = written
    expected = json.loads(json.dumps(base))
    expected["shelf_entries"][0]["settlement_days"] = 3
    expected["options"]["fx_settlement_days"] = 3
    oracle, same = simulate(req), simulate(expected)
    assert oracle["diagnostics"]["cash_ladder"] == same["diagnostics"]["cash_ladder"]
    assert len(oracle["diagnostics"]["cash_ladder"]) == 4 * len({c["currency"] for c in oracle["diagnostics"]["cash_ladder"]})  # days 0-3
    engine = simulate_many([req])[0]
    assert engine["status"] == oracle["status"]
    assert [(c["date_offset"], c["currency"], Decimal(c["projected_balance"])) for c in engine["diagnostics"]["cash_ladder"]] == [
        (c["date_offset"], c["currency"], Decimal(c["projected_balance"])) for c in oracle["diagnostics"]["cash_ladder"]]


def test_a_fractional_integer_field_is_refused() -> None:
    req = json.loads((REPO / "data" / "requests" / "settlement_ladder.json").read_text())
    req["options"]["settlement_horizon_days"] = "2.5"
    with pytest.raises(ValueError, match="not an integer"):
        simulate(req)


def _slashed(fx_pair: str, **options) -> dict:
    return {
        "portfolio_snapshot": {"portfolio_id": "p", "base_currency": "S/GD", "positions": [{"instrument_id": "US", "quantity": "10"}],
                               "cash_balances": [{"currency": "S/GD", "amount": "1000"}]},
        "market_data_snapshot": {"prices": [{"instrument_id": "US", "price": "100", "currency": "USD", "as_of": "not a date"}],
                                 "fx_rates": [{"pair": fx_pair, "rate": "1.35"}], "as_of": "yesterday"},
        "model_portfolio": {"targets": [{"instrument_id": "US", "weight": "0.5"}]},
        "shelf_entries": [{"instrument_id": "US", "status": "APPROVED"}],
        "options": options,
    }


def test_an_as_of_no_option_reads_is_ignored_whatever_its_text() -> None:
    """§9: as_of is a key the reference ignores; only the RFC staleness and skew options
    read it (the JSON door then refuses text that is no timestamp)."""
    from dpm_vec.simulate import simulate_outcomes

    request = _slashed("USD/S/GD")
    assert simulate(request)["status"] == simulate_outcomes([request])[0]["status"] == "READY"


@pytest.mark.parametrize("pair, blocked", [("USD/S/GD", False), ("S/GD/USD", False), ("USDS/GD", True), ("USD-SGD", True)])
def test_a_base_currency_with_a_slash_is_found_as_a_conversion_reads_the_pair(pair, blocked) -> None:
    from dpm_vec.simulate import simulate_outcomes

    request = _slashed(pair, require_base_currency_fx=True)
    oracle, engine = simulate(request), simulate_outcomes([request])[0]
    assert ("BASE_CURRENCY_FX_MISSING" in oracle["diagnostics"]["warnings"]) == blocked
    assert (oracle["status"], oracle["diagnostics"]["warnings"]) == (engine["status"], engine["diagnostics"]["warnings"])
