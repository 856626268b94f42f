"""Every golden scenario of the reference service (copied from ../shared/goldens) and
our own RFC-option scenarios, through the JSON door in one batch, as a shadow run would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpm_vec.simulate import simulate_many
from tests.golden_compare import differences

DATA = Path(__file__).parent / "data"
GOLDEN_FILES = sorted((DATA / "goldens").rglob("*.json")) + sorted((DATA / "scenarios").glob("*.json"))
SHARED = Path(__file__).resolve().parents[2] / "shared"


def _expected(doc: dict) -> dict:
    return doc.get("expected_outputs") or doc.get("expected_output")


@pytest.fixture(scope="module")
def batch_results() -> dict[str, dict]:
    docs = [json.loads(p.read_text()) for p in GOLDEN_FILES]
    results = simulate_many([d["inputs"] for d in docs])
    return {str(p): r for p, r in zip(GOLDEN_FILES, results)}


def test_goldens_are_present():
    assert len([p for p in GOLDEN_FILES if "reference-service" in str(p)]) == 30
    assert len([p for p in GOLDEN_FILES if "reference-random" in str(p)]) == 400
    assert len(list((DATA / "scenarios").glob("*.json"))) >= 10


def test_the_comparator_flags_what_a_golden_does_not_state():
    """The comparator the goldens use: warnings compare as a multiset, and an item of a
    keyed list that the golden does not state (a rule, a position) is flagged."""
    docs = [json.loads((DATA / "goldens" / name).read_text())
            for name in ("reference-random/core/rand_11_0000.json", "reference-service/scenario_08_sector_cap.json")]
    (random_doc, warned_doc), results = docs, simulate_many([d["inputs"] for d in docs])
    assert differences(_expected(random_doc), results[0]) == [] and differences(_expected(warned_doc), results[1]) == []
    extra_rule = json.loads(json.dumps(results[0]))
    extra_rule["rule_results"].append({**extra_rule["rule_results"][0], "rule_id": "NOT_A_RULE"})
    assert any("unexpected" in e and "NOT_A_RULE" in e for e in differences(_expected(random_doc), extra_rule))
    extra_position = json.loads(json.dumps(results[0]))
    extra_position["after_simulated"]["positions"].append({**extra_position["after_simulated"]["positions"][0], "instrument_id": "ZZ"})
    assert any("unexpected" in e and "ZZ" in e for e in differences(_expected(random_doc), extra_position))
    warned = _expected(warned_doc)["diagnostics"]["warnings"]
    assert warned
    twice = json.loads(json.dumps(results[1]))
    twice["diagnostics"]["warnings"] = [*twice["diagnostics"]["warnings"], warned[0]]
    assert any("warnings" in e for e in differences(_expected(warned_doc), twice))


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden(path: Path, batch_results):
    doc = json.loads(path.read_text())
    result = batch_results[str(path)]
    if "expected_problem" in doc:
        assert result["status"] == 422 and result["type"].startswith("https://")
        if "field" in doc["expected_problem"]:  # an invalid request: the field it names
            assert doc["expected_problem"]["field"] in [e["field"] for e in result["errors"]]
        else:  # a domain problem (rfc_domain_errors): the whole body
            assert result == doc["expected_problem"]
        return
    assert "status" in result and isinstance(result["status"], str), result
    assert differences(_expected(doc), result) == []
    if "expected_rationales" in doc:
        codes = {i["instrument_id"]: i["rationale"]["code"] for i in result["intents"] if i["intent_type"] == "SECURITY_TRADE"}
        assert codes == doc["expected_rationales"]
    if "expected_rationale_messages" in doc:  # RFC §5.2's descriptive message, as rfc_rationale_codes writes it
        messages = {i["instrument_id"]: i["rationale"]["message"] for i in result["intents"] if i["intent_type"] == "SECURITY_TRADE"}
        assert messages == doc["expected_rationale_messages"]
    for code in doc.get("expected_warnings", []):
        assert code in result["diagnostics"]["warnings"]


def test_single_and_batch_results_agree(batch_results):
    """A request run alone gives exactly what it gives inside the batch (isolation)."""
    for path in GOLDEN_FILES[::37]:
        alone = simulate_many([json.loads(path.read_text())["inputs"]])[0]
        assert alone == batch_results[str(path)], path.name


@pytest.mark.skipif(not (SHARED / "conformance" / "check_goldens.py").exists(), reason="../shared not beside the checkout")
def test_shared_conformance_checker_batch_mode():
    """The project's yardstick: the shared checker, batch mode, on every shared golden."""
    goldens = sorted(str(p) for p in (SHARED / "goldens").rglob("*.json"))
    engine = f"{sys.executable} -m dpm_vec.cli simulate"
    proc = subprocess.run([sys.executable, str(SHARED / "conformance" / "check_goldens.py"), "--batch", "--engine", engine, *goldens],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"{len(goldens)} passed, 0 failed" in proc.stdout


def test_exact_turnover_path_agrees_on_every_capped_golden(monkeypatch):
    """The 28-digit turnover path (``trades._exact_turnover``) normally decides only runs
    the fixed point cannot call; forced onto every run with a cap, each golden with one
    still gives the reference's result (ranking, walk, dropped intents and their scores)."""
    from dpm_vec.stages import trades

    forced = []

    def every_run(frame, ranked):
        forced.append(frame["run"].n_unique())
        return frame.select("run").unique()

    monkeypatch.setattr(trades, "_fragile_turnover_runs", every_run)
    docs = [d for d in (json.loads(p.read_text()) for p in GOLDEN_FILES)
            if (d["inputs"].get("options") or {}).get("max_turnover_pct") is not None and "expected_problem" not in d]
    assert len(docs) >= 50
    for doc, result in zip(docs, simulate_many([d["inputs"] for d in docs])):
        assert differences(_expected(doc), result) == [], doc["inputs"]["portfolio_snapshot"]["portfolio_id"]
    assert sum(forced) >= 30  # runs that reached the cap with intents (39 of the shared goldens)
