"""The long-run fuzz driver (tests/fuzz.py): it runs the properties it is given, records
each failing example with the property's report, and refuses a selection that names none."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import fuzz


@settings(database=None)
@given(st.integers(min_value=0, max_value=9))
def _fails_on_seven(n):
    assert n != 7, "seven drawn"


@settings(database=None)
@given(st.integers())
def _passes(n):
    assert isinstance(n, int)


def test_failing_examples_are_written_with_the_property_report(tmp_path):
    out = tmp_path / "failures.jsonl"
    counts = fuzz.fuzz({"fails_on_seven": _fails_on_seven, "passes": _passes}, seconds=1.0, seed=11, out=out, report=lambda *a, **k: None)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["fails_on_seven failed"] == len(lines) > 0
    assert counts["fails_on_seven run"] > 0 and counts["passes run"] > 0 and counts["passes failed"] == 0
    assert {line["property"] for line in lines} == {"fails_on_seven"}
    assert all(line["seed"] == 11 and "seven drawn" in line["report"] for line in lines)


def test_the_same_seed_draws_the_same_examples(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        fuzz.fuzz({"fails_on_seven": _fails_on_seven}, seconds=0.5, seed=5, out=out, report=lambda *a, **k: None)
        runs.append([json.loads(line)["example"] for line in out.read_text().splitlines()])
    shorter = min(len(runs[0]), len(runs[1]))
    assert shorter > 0 and runs[0][:shorter] == runs[1][:shorter]


def test_properties_are_chosen_by_parts_of_their_names():
    chosen = fuzz.properties("rfc_options,sweep_threshold")
    assert sorted(chosen) == ["test_fx_sweep_threshold_matches_oracle", "test_rfc_options_match_oracle"]
    assert len(fuzz.properties(None)) >= 14
    with pytest.raises(SystemExit, match="names none of: .*test_engine_matches_oracle"):
        fuzz.properties("no_such_property")
