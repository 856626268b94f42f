"""Differential tests: the vectorised engine against the scalar oracle on random requests.

Property 1: every slot of one ``simulate_many`` call agrees with ``oracle.simulate`` on
the business facts (status, intents with exact quantities, dependencies, after-state,
rules, data quality, diagnostics, target weights).

Property 2 (batch isolation): requests that share portfolio and instrument ids but
differ in prices, shelf statuses, FX or options give, in one ``simulate_many`` call,
exactly the JSON each gives alone (ignoring the random/run-key fields), and agree with
the oracle.

Minimal reproductions of disagreements found while developing these properties (or by
``python -m tests.fuzz``, which feeds them new random requests for as long as it is
given) live in ``tests/data/differential_failures/*.json`` and are replayed by
``test_known_failure``.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dpm_vec.codes import ENGINE_BLOCKS
from dpm_vec.contract import requests_to_book
from dpm_vec.errors import QuantityRangeError
from dpm_vec.numeric import TRADE_UNITS_LIMIT
from dpm_vec.oracle import simulate as oracle_simulate
from dpm_vec.pipeline import run
from dpm_vec.simulate import simulate_many

from tests.golden_compare import strip_random
from tests.strategies import (
    domain_error_requests, fed_back, golden_mutations, isolation_batches, printed_midpoint_requests, reconciliation_boundary_requests, requests, rfc_option_requests,
    round_inverse_requests, small_notional_tax_requests, sweep_threshold_requests, tax_residue_requests,
)

CENT = Decimal("0.01")
WEIGHT_TOL = Decimal("1e-9")
DOCUMENT_TOL = Decimal("1e-12")
NETTED_TOL = Decimal("1e-16")
FAILURES = Path(__file__).parent / "data" / "differential_failures"

COMMON = dict(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    # no shrinking: a list of up to 25 requests shrinks very slowly, and the failure
    # message already names each failing request; minimal reproductions are kept in
    # tests/data/differential_failures (shrink them by hand / with a reducer)
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# ---------------------------------------------------------------------------------------
# comparison


def _d(x) -> Decimal:
    if isinstance(x, dict):
        x = x["amount"]
    return Decimal(str(x))


def _close(a, b, tol=CENT) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(_d(a) - _d(b)) <= tol


def _key(it: dict) -> tuple:
    if it["intent_type"] == "FX_SPOT":
        return ("FX_SPOT", it["pair"], it["buy_currency"])
    return ("SECURITY_TRADE", it["instrument_id"], it["side"])


def _multiset(xs) -> Counter:
    return Counter(json.dumps(x, sort_keys=True) if isinstance(x, (dict, list)) else x for x in xs)


def compare(exp: dict, act: dict) -> list[str]:
    """Differences between the oracle's result ``exp`` and the engine's ``act``."""
    errs: list[str] = []
    if "status" not in act or act.get("status") not in ("READY", "PENDING_REVIEW", "BLOCKED"):
        return [f"engine returned no result: {json.dumps(act)[:400]}"]
    if exp["status"] != act["status"]:
        errs.append(f"status {exp['status']} != {act['status']}")

    # intents: keyed multiset, exact quantities, money within a cent, dependencies by key
    e_ids = {i["intent_id"]: _key(i) for i in exp["intents"]}
    a_ids = {i["intent_id"]: _key(i) for i in act["intents"]}
    ek = Counter(_key(i) for i in exp["intents"])
    ak = Counter(_key(i) for i in act["intents"])
    if ek != ak:
        errs.append(f"intent keys {sorted(ek.elements())} != {sorted(ak.elements())}")
    em = {_key(i): i for i in exp["intents"]}
    am = {_key(i): i for i in act["intents"]}
    for k in sorted(set(em) & set(am)):
        e, a = em[k], am[k]
        if "quantity" in e and _d(e["quantity"]) != _d(a["quantity"]):
            errs.append(f"{k} quantity {e['quantity']} != {a['quantity']}")
        for f in ("notional", "notional_base", "buy_amount", "sell_amount_estimated"):
            if f in e and not _close(e[f], a.get(f)):
                errs.append(f"{k} {f} {e[f]} != {a.get(f)}")
        edeps = sorted(e_ids.get(d, ("?", d)) for d in e.get("dependencies", []))
        adeps = sorted(a_ids.get(d, ("?", d)) for d in a.get("dependencies", []))
        if edeps != adeps:
            errs.append(f"{k} dependencies {edeps} != {adeps}")
        if sorted(e.get("constraints_applied") or []) != sorted(a.get("constraints_applied") or []):
            errs.append(f"{k} constraints_applied {e.get('constraints_applied')} != {a.get('constraints_applied')}")
    if [_key(i) for i in exp["intents"]] != [_key(i) for i in act["intents"]] and ek == ak:
        errs.append("intent order differs")

    # after-state: quantities exact, money within a cent
    ea, aa = exp["after_simulated"], act["after_simulated"]
    if not _close(ea["total_value"], aa["total_value"]):
        errs.append(f"after total {ea['total_value']['amount']} != {aa['total_value']['amount']}")
    epos = [(p["instrument_id"], _d(p["quantity"])) for p in ea["positions"]]
    apos = [(p["instrument_id"], _d(p["quantity"])) for p in aa["positions"]]
    if sorted(epos) != sorted(apos):
        errs.append(f"after positions {sorted(epos)} != {sorted(apos)}")
    elif epos != apos:
        errs.append(f"after positions in order {[i for i, _ in epos]} != {[i for i, _ in apos]}")
    ecash = {c["currency"]: c["amount"] for c in ea["cash_balances"]}
    acash = {c["currency"]: c["amount"] for c in aa["cash_balances"]}
    if set(ecash) != set(acash) or any(not _close(ecash[c], acash[c]) for c in ecash):
        errs.append(f"after cash {ecash} != {acash}")

    for state in ("before", "after_simulated"):
        errs += _allocation_differences(state, exp[state], act[state])

    # rules, data quality, diagnostics
    er = [(r["rule_id"], r["status"]) for r in exp["rule_results"]]
    ar = [(r["rule_id"], r["status"]) for r in act["rule_results"]]
    if er != ar:
        errs.append(f"rules {er} != {ar}")
    edq, adq = exp["diagnostics"]["data_quality"], act["diagnostics"]["data_quality"]
    for bucket in ("price_missing", "fx_missing", "shelf_missing"):
        if Counter(edq.get(bucket, [])) != Counter(adq.get(bucket, [])):
            errs.append(f"data_quality.{bucket} {edq.get(bucket)} != {adq.get(bucket)}")
    ed, ad = exp["diagnostics"], act["diagnostics"]
    if Counter(ed["warnings"]) != Counter(ad["warnings"]):
        errs.append(f"warnings {ed['warnings']} != {ad['warnings']}")
    es = sorted((s["instrument_id"], _d(s["intended_notional"])) for s in ed["suppressed_intents"])
    as_ = sorted((s["instrument_id"], _d(s["intended_notional"])) for s in ad["suppressed_intents"])
    if [i for i, _ in es] != [i for i, _ in as_] or any(abs(x[1] - y[1]) > CENT for x, y in zip(es, as_)):
        errs.append(f"suppressed {es} != {as_}")
    edr = [d["instrument_id"] for d in ed["dropped_intents"]]
    adr = [d["instrument_id"] for d in ad["dropped_intents"]]
    if edr != adr:
        errs.append(f"dropped {edr} != {adr}")
    etx = [(t["instrument_id"], _d(t["requested_quantity"]), _d(t["allowed_quantity"])) for t in ed["tax_budget_constraint_events"]]
    atx = [(t["instrument_id"], _d(t["requested_quantity"]), _d(t["allowed_quantity"])) for t in ad["tax_budget_constraint_events"]]
    if etx != atx:
        errs.append(f"tax events {etx} != {atx}")
    eb = [(b["date_offset"], b["currency"]) for b in ed["cash_ladder_breaches"]]
    ab = [(b["date_offset"], b["currency"]) for b in ad["cash_ladder_breaches"]]
    if eb != ab:
        errs.append(f"ladder breaches {eb} != {ab}")

    # universe and target trace
    ex = [(x["instrument_id"], x["reason_code"]) for x in exp["universe"]["excluded"]]
    ax = [(x["instrument_id"], x["reason_code"]) for x in act["universe"]["excluded"]]
    if ex != ax:
        errs.append(f"excluded {ex} != {ax}")
    et = [(t["instrument_id"], _d(t["final_weight"])) for t in exp["target"]["targets"]]
    at = [(t["instrument_id"], _d(t["final_weight"])) for t in act["target"]["targets"]]
    if [i for i, _ in et] != [i for i, _ in at] or any(abs(x[1] - y[1]) > WEIGHT_TOL for x, y in zip(et, at)):
        errs.append(f"target weights {et} != {at}")
    etags = [(t["instrument_id"], tuple(t["tags"])) for t in exp["target"]["targets"]]
    atags = [(t["instrument_id"], tuple(t["tags"])) for t in act["target"]["targets"]]
    if etags != atags:
        errs.append(f"target tags {etags} != {atags}")

    # tax impact
    eti, ati = exp.get("tax_impact"), act.get("tax_impact")
    if (eti is None) != (ati is None):
        errs.append(f"tax_impact {eti} != {ati}")
    elif eti is not None:
        for f in ("total_realized_gain", "total_realized_loss", "budget_used"):
            if not _close(eti[f], ati[f]):
                errs.append(f"tax_impact.{f} {eti[f]} != {ati[f]}")
    eg, ag = exp.get("gate_decision"), act.get("gate_decision")
    if (eg or {}).get("gate") != (ag or {}).get("gate"):
        errs.append(f"gate {(eg or {}).get('gate')} != {(ag or {}).get('gate')}")
    # where the fields above agree, every other field must too (explanation, reconciliation,
    # rule measures, gate reasons, eligible lists, ladder rows ...): a differing field found
    # above explains what follows from it, so this runs only on a clean comparison
    if errs or _total_a_last_digit_from_zero(exp["after_simulated"]):
        return errs
    return document_differences(strip_random(exp), strip_random(act))


def _total_a_last_digit_from_zero(state: dict) -> bool:
    """The documented after-state total a last digit from zero (docs/features.md): within
    1e-20 of zero and not zero in the reference's 28 digits, so its weights (value / total)
    pass 1e20 where the fixed point's total is 0 and its weights divide by 1."""
    total = _d(state["total_value"])
    return total != 0 and abs(total) < Decimal("1e-20")


def _decimal(text) -> Decimal | None:
    if not isinstance(text, str):
        return None
    try:
        value = Decimal(text)
    except ArithmeticError:
        return None
    return value if value.is_finite() else None


def _numbers(doc):
    """Every decimal written as text in a result."""
    if isinstance(doc, dict):
        doc = list(doc.values())
    if isinstance(doc, list):
        for item in doc:
            yield from _numbers(item)
    elif (value := _decimal(doc)) is not None:
        yield value


def document_differences(exp, act, path: str = "", floor: Decimal | None = None) -> list[str]:
    """Every key (in order), list item and value of two results, everything else exactly
    and numbers as decimals to 1e-12 of their size or ``floor``, 1e-16 of the largest
    number of ``exp``, whichever is larger. The fixed point's 20 decimals against the
    reference's 28 digits stay far below both (docs/features.md: up to ~6e-19 of an amount
    converted over an inverse quote); the floor is for an amount that nets large ones, a
    cash balance or an asset-class bucket of a few units left from millions, which keeps
    their error rather than one of its own size."""
    if floor is None:
        floor = NETTED_TOL * max(map(abs, _numbers(exp)), default=Decimal(0))
    if isinstance(exp, dict) and isinstance(act, dict):
        errs = [] if list(exp) == list(act) else [f"doc {path or '.'} keys {list(exp)} != {list(act)}"]
        for k in exp.keys() & act.keys():
            errs += document_differences(exp[k], act[k], f"{path}.{k}", floor)
        return errs
    if isinstance(exp, list) and isinstance(act, list):
        if len(exp) != len(act):
            return [f"doc {path} has {len(exp)} items != {len(act)}"]
        return [e for i, (x, y) in enumerate(zip(exp, act)) for e in document_differences(x, y, f"{path}[{i}]", floor)]
    x, y = _decimal(exp), _decimal(act)
    if x is not None and y is not None:
        return [] if abs(x - y) <= max(DOCUMENT_TOL * max(1, abs(x)), floor) else [f"doc {path} {exp} != {act}"]
    return [] if exp == act else [f"doc {path} {exp!r} != {act!r}"]


def _allocation_differences(state: str, exp: dict, act: dict) -> list[str]:
    """§5.1's buckets: keys (and attribute names) in first-appearance order, 4-dp weights
    exact, values within a cent."""
    def buckets(doc: dict) -> dict[str, list]:
        out = {dim: doc.get(dim) or [] for dim in ("allocation_by_asset_class", "allocation_by_instrument")}
        for attribute, rows in (doc.get("allocation_by_attribute") or {}).items():
            out[f"attribute:{attribute}"] = rows
        return out

    e, a = buckets(exp), buckets(act)
    if list(e) != list(a):
        return [f"{state} allocation dimensions {list(e)} != {list(a)}"]
    weight = (lambda b: None) if _total_a_last_digit_from_zero(exp) else (lambda b: _d(b["weight"]))
    errs = []
    for dim in e:
        ek = [(b["key"], weight(b)) for b in e[dim]]
        ak = [(b["key"], weight(b)) for b in a[dim]]
        if ek != ak:
            errs.append(f"{state} {dim} {ek} != {ak}")
        elif any(not _close(x["value"], y["value"]) for x, y in zip(e[dim], a[dim])):
            errs.append(f"{state} {dim} values {[x['value'] for x in e[dim]]} != {[y['value'] for y in a[dim]]}")
    return errs


def _report(req: dict, errs: list[str]) -> str:
    return "\n".join(errs) + "\nrequest:\n" + json.dumps(req, sort_keys=True)


# ---------------------------------------------------------------------------------------
# property 1: engine == oracle, many requests in one engine pass


# requests checked against the oracle, and those that fell in a documented class
CHECKED = {"requests": 0, "flips": 0, "beyond_range": 0}
# requests of test_engine_matches_oracle and of test_golden_mutations_match_oracle, and
# those whose result trades a security (the properties check agreement; these, that they
# reached the trades)
TRADED = {"requests": 0, "with_trades": 0}
MUTATED = {"requests": 0, "with_trades": 0}


def _count_trades(counter: dict, result: dict) -> None:
    counter["requests"] += 1
    counter["with_trades"] += any(i.get("intent_type") == "SECURITY_TRADE" for i in result.get("intents", []))
TAX_WALK = {"requests": 0, "limited": 0}
RESIDUES = {"requests": 0, "below_20_decimals": 0}


# what a one-unit trade can change downstream: its notional and FX funding, the after-state,
# the rules read from it (and so the status), a gains budget it spends, a settlement ladder
_FOLLOWS_A_FLIP = (
    "status ", "after total ", "after positions ", "after cash ", "rules ", "tax events ", "tax_impact.",
    "ladder breaches ",
)
_FOLLOWS_A_FLIP_IN_AN_INTENT = (" notional ", " notional_base ", " buy_amount ", " sell_amount_estimated ")


def _floor_boundary_flip(errs: list[str]) -> bool:
    """A documented class of disagreement (docs/features.md, "Arithmetic"): a floored
    quantity one unit apart because the engine's fixed-point and the reference's
    28-significant-digit rounding land on different sides of an exact integer. What follows
    from it (notional, FX amounts, cash, a rule that then fails) differs as well; but every
    quantity that differs must differ by exactly one unit, and nothing a unit cannot move
    (the universe, the targets, which intents exist, their dependencies, data quality,
    warnings) may differ, or a real disagreement beside a flip would pass as one."""
    flips = 0
    for err in errs:
        if " quantity " in err and "SECURITY_TRADE" in err and " != " in err and not err.startswith("after "):
            left, right = err.rsplit(" quantity ", 1)[1].split(" != ")
            try:
                if abs(Decimal(left) - Decimal(right)) != 1:
                    return False
            except ArithmeticError:
                return False
            flips += 1
        elif not (err.startswith(_FOLLOWS_A_FLIP) or (err.startswith("('") and any(f in err for f in _FOLLOWS_A_FLIP_IN_AN_INTENT))):
            return False
    return flips > 0


def _beyond_quantity_range(exp: dict, act: dict) -> bool:
    """The documented quantity-range limit (docs/features.md, "Arithmetic"): the engine
    answers a 422 quantity-out-of-range problem, and only where the oracle's result has a
    trade of at least ``TRADE_UNITS_LIMIT`` units."""
    if act.get("type") != QuantityRangeError.TYPE:
        return False
    return any(Decimal(i["quantity"]) >= TRADE_UNITS_LIMIT for i in exp["intents"] if i.get("quantity") is not None)


def _check(req: dict, act: dict, failures: list[str]) -> None:
    CHECKED["requests"] += 1
    exp = oracle_simulate(req)
    if _beyond_quantity_range(exp, act):
        CHECKED["beyond_range"] += 1
        return
    errs = compare(exp, act)
    if errs and _floor_boundary_flip(errs):
        CHECKED["flips"] += 1
    elif errs:
        failures.append(_report(req, errs))


def _assert_all_match(reqs: list[dict], tally: Callable[[dict], None] | None = None) -> None:
    """``reqs`` through one engine pass, every slot checked against the oracle (``_check``);
    ``tally(slot)`` sees each slot first."""
    slots = simulate_many(reqs)
    assert len(slots) == len(reqs)
    failures: list[str] = []
    for req, act in zip(reqs, slots):
        if tally is not None:
            tally(act)
        _check(req, act, failures)
    assert not failures, f"{len(failures)} of {len(reqs)} requests differ:\n\n" + "\n\n".join(failures[:3])


@settings(max_examples=60, **COMMON)
@given(st.lists(requests(), min_size=1, max_size=25))
def test_engine_matches_oracle(reqs):
    _assert_all_match(reqs, lambda act: _count_trades(TRADED, act))


MISSING = {"price_missing": "no price for", "fx_missing": "no FX rate for", "shelf_missing": "no shelf entry for"}


def _expected_block(req: dict, result: dict) -> tuple[str | None, str | None]:
    """(block_reason, how block_detail starts) as docs/outputs.md derives them from what
    the reference says: dpm_vec's own fault heads the warnings; else the target stage's
    stop (an empty trace and its warning); else DATA_QUALITY, naming each missing item
    the run blocks on once; else the first failed HARD rule, naming what failed first."""
    if result["status"] != "BLOCKED":
        return None, None
    warnings = result["diagnostics"]["warnings"]
    if warnings and warnings[0] in ENGINE_BLOCKS:
        return warnings[0], ""
    stops = [w for w in warnings if w in ("NO_ELIGIBLE_REDISTRIBUTION_DESTINATION", "SOLVER_ERROR") or w.startswith("INFEASIBLE_")]
    if stops:
        return stops[0], {"NO_ELIGIBLE_REDISTRIBUTION_DESTINATION": "group ", "SOLVER_ERROR": "the solver"}.get(stops[0], "no target weights")
    failed = [r for r in result["rule_results"] if (r["severity"], r["status"]) == ("HARD", "FAIL")]
    if "DATA_QUALITY" not in [r["rule_id"] for r in failed]:
        after = result["after_simulated"]
        first = failed[0]["rule_id"]
        if first == "SETTLEMENT_CASH_LADDER":
            breach = result["diagnostics"]["cash_ladder_breaches"][0]
            return first, f"{breach['currency']} projected at "
        if first == "SINGLE_POSITION_MAX":
            return first, failed[0]["remediation_hint"].removeprefix("Instrument ").removesuffix(" exceeds max weight.") + " at weight "
        if first == "NO_SHORTING":
            return first, "quantity below zero: " + next(p["instrument_id"] for p in after["positions"] if Decimal(p["quantity"]) < 0) + " at "
        if first == "INSUFFICIENT_CASH":
            return first, "cash below zero: "
        return first, "after-state value "  # RECONCILIATION
    options, dq = req.get("options", {}), result["diagnostics"]["data_quality"]
    blocking = {"price_missing": options.get("block_on_missing_prices", True) is not False,
                "fx_missing": options.get("block_on_missing_fx", True) is not False, "shelf_missing": True}
    named = [f"{MISSING[b]} {', '.join(dict.fromkeys(dq[b]))}" for b in MISSING if blocking[b] and dq[b]]
    return "DATA_QUALITY", "missing data: " + "; ".join(named)


@settings(max_examples=25, **COMMON)
@given(st.lists(requests(), min_size=1, max_size=25))
def test_every_blocked_run_names_the_reason_the_oracle_gives(reqs):
    """The runs table's block_reason and block_detail against the oracle's result: a
    reason exactly for the BLOCKED runs, the one its status, warnings and rules imply."""
    try:
        book, _ = requests_to_book(reqs)
        runs = run(book).runs
    except QuantityRangeError:
        return  # told instead of a run row (test_trades_beyond_the_quantity_range_*)
    for req, row in zip(reqs, runs.iter_rows(named=True)):
        reason, detail_start = _expected_block(req, oracle_simulate(req))
        assert row["block_reason"] == reason, (reason, row["block_reason"], row["block_detail"])
        assert (row["block_detail"] is None) == (reason is None)
        if reason is not None:
            assert row["block_detail"].startswith(detail_start), (row["block_detail"], detail_start)
        BLOCKS[reason] += 1


BLOCKS: Counter = Counter()


def test_block_reasons_were_exercised():
    """The property above met runs blocked by data quality and by other rules, and runs that were not blocked."""
    if not BLOCKS:
        pytest.skip("runs only after test_every_blocked_run_names_the_reason_the_oracle_gives")
    assert BLOCKS[None] and BLOCKS["DATA_QUALITY"] and sum(n for r, n in BLOCKS.items() if r not in (None, "DATA_QUALITY")), BLOCKS


@settings(max_examples=30, **COMMON)
@given(st.lists(round_inverse_requests(), min_size=10, max_size=25))
def test_round_amounts_over_inverse_quotes_match_oracle(reqs):
    """Round amounts over inverse quotes meet limits exactly in the reference's 28 digits
    and a hair off in the fixed point's: every such boundary must be decided as the
    reference decides it (the fixed point's last digits are within a cent, not its verdicts)."""
    _assert_all_match(reqs)


RECONCILED = Counter()


@settings(max_examples=15, **COMMON)
@given(st.lists(reconciliation_boundary_requests(), min_size=15, max_size=25))
def test_reconciliation_at_its_tolerance_matches_oracle(reqs):
    """A total after exactly at, or a last digit beyond, the before-state's ± its tolerance
    in the reference's 28 digits is OK or a MISMATCH as the reference decides it."""
    _assert_all_match(reqs, lambda act: RECONCILED.update([act["reconciliation"]["status"]]))


def test_reconciliation_at_its_tolerance_was_exercised():
    """Runs after the reconciliation property: both verdicts must have come up often."""
    if not RECONCILED:
        pytest.skip("run together with the reconciliation property")
    assert min(RECONCILED["OK"], RECONCILED["MISMATCH"]) >= 0.2 * sum(RECONCILED.values()), RECONCILED


SWEEPS = {"requests": 0, "kept": 0}


@settings(max_examples=15, **COMMON)
@given(st.lists(sweep_threshold_requests(), min_size=15, max_size=20))
def test_fx_sweep_threshold_matches_oracle(reqs):
    """RFC Step 5's repatriation threshold (``fx_sweep_threshold``, base currency): a
    surplus at or below it stays as foreign cash, one above it is swept whole, and the
    after-state, ladder and rules see what stays."""
    def tally(slot):
        """A kept surplus: foreign cash left in an after-state that FX planning reached (it
        has intents) with no FX intent in its currency (a FUNDING's buffer leaves some too,
        but with its intent)."""
        SWEEPS["requests"] += 1
        base = slot["before"]["total_value"]["currency"]
        traded = {i["pair"].split("/")[0] for i in slot["intents"] if i["intent_type"] == "FX_SPOT"}
        SWEEPS["kept"] += bool(slot["intents"]) and any(c["currency"] not in (base, *traded) and Decimal(c["amount"]) > 0
                                                        for c in slot["after_simulated"]["cash_balances"])
    _assert_all_match(reqs, tally)


def test_fx_sweep_threshold_was_exercised():
    """Runs after the sweep property: foreign cash must have stayed in a fair share of the
    after-states, or the property proved nothing about the threshold."""
    if SWEEPS["requests"] == 0:
        pytest.skip("run together with the sweep property")
    assert SWEEPS["kept"] >= 0.1 * SWEEPS["requests"], str(SWEEPS)


@settings(max_examples=15, **COMMON)
@given(st.lists(printed_midpoint_requests(), min_size=15, max_size=20))
def test_printed_weights_at_4dp_midpoints_match_oracle(reqs):
    """A weight exactly on a 4-dp midpoint of a total reached through an inverse quote
    prints on the side the reference's 28 digits put it (0.05625000000000000000000000002
    is 0.0563), in both states, every bucket and every position."""
    _assert_all_match(reqs)


@settings(max_examples=25, **COMMON)
@given(st.lists(golden_mutations(), min_size=20, max_size=25))
def test_golden_mutations_match_oracle(reqs):
    """The shared random goldens' requests with options recombined and numbers perturbed:
    the reference generator's own shapes, where an unseen request is most likely to land
    (110,000 such requests, 50,000 of them with structural changes, agreed with the oracle
    when this property was written)."""
    _assert_all_match(reqs, lambda act: _count_trades(MUTATED, act))


def test_golden_mutations_reached_trades():
    """Runs after the mutation property: about half the mutated goldens still trade."""
    if MUTATED["requests"] < 100:
        pytest.skip("run together with the mutation property")
    assert MUTATED["with_trades"] >= 0.4 * MUTATED["requests"], MUTATED


@st.composite
def budget_bound_requests(draw) -> dict:
    """Tax-aware requests with a small gains budget, so the lot-by-lot walk binds."""
    req = draw(requests())
    options = req.setdefault("options", {})
    options["enable_tax_awareness"] = True
    options["max_realized_capital_gains"] = draw(st.sampled_from(["0", "1", "10.5", "100", "1000", "5000.25", "20000"]))
    return req


@settings(max_examples=15, **COMMON)
@given(st.lists(budget_bound_requests(), min_size=10, max_size=25))
def test_tax_budget_walk_matches_oracle(reqs):
    """The budget walk is sequential inside a run; many runs walk it together here."""
    def tally(act: dict) -> None:
        TAX_WALK["requests"] += 1
        TAX_WALK["limited"] += "TAX_BUDGET_LIMIT_REACHED" in act.get("diagnostics", {}).get("warnings", [])

    _assert_all_match(reqs, tally)


@settings(max_examples=12, **COMMON)
@given(st.lists(tax_residue_requests(), min_size=20, max_size=25))
def test_tax_budget_residues_match_oracle(reqs):
    """Sells of the 28-digit remainder of a gains budget (1E-24 units and less: 0 at 20
    decimals, not in the reference) must be decided as the reference decides them in the
    ladder, the dust test, FX funding and the rules."""
    def tally(act: dict) -> None:
        RESIDUES["requests"] += 1
        RESIDUES["below_20_decimals"] += any(
            str(i.get("quantity")).startswith("0.00000000000000000000") for i in act.get("intents", [])
            if i.get("intent_type") == "SECURITY_TRADE"
        )

    _assert_all_match(reqs, tally)


SMALL_NOTIONAL = {"requests": 0, "walked": 0}


@settings(max_examples=8, **COMMON)
@given(st.lists(small_notional_tax_requests(), min_size=20, max_size=25))
def test_notional_sells_below_a_tenth_walk_the_tax_lots_as_the_oracle(reqs):
    """Notional-sized sells below 0.1 unit (28 significant digits, more than Decimal(38, 28)
    holds) through the tax-lot walk: their quantities, the tax events' requested and allowed
    quantities and the after-state positions to every digit (until the forty-eighth session
    the walk took them at 28 decimals, and 28% of these requests differed)."""
    def tally(act: dict) -> None:
        SMALL_NOTIONAL["requests"] += 1
        SMALL_NOTIONAL["walked"] += any(
            Decimal(e["requested_quantity"]) < Decimal("0.1") for e in act.get("diagnostics", {}).get("tax_budget_constraint_events", [])
        )

    _assert_all_match(reqs, tally)


def test_notional_sells_below_a_tenth_were_walked():
    """Runs after the property: small sells must have met the walk's limits, or it proved nothing."""
    if SMALL_NOTIONAL["requests"] == 0:
        pytest.skip("run together with the small-notional property")
    assert SMALL_NOTIONAL["walked"] >= 20, SMALL_NOTIONAL


def test_tax_budget_residues_were_exercised():
    """Runs after the property: sells below 20 decimals must have been met, or it proved nothing."""
    if RESIDUES["requests"] == 0:
        pytest.skip("run together with the residue property")
    assert RESIDUES["below_20_decimals"] >= 20, RESIDUES


def test_tax_budget_walk_was_exercised():
    """Runs after the property: it must have met budgets that bind, or it proved nothing."""
    if TAX_WALK["requests"] == 0:
        pytest.skip("run together with the tax property")
    assert TAX_WALK["limited"] >= 5, TAX_WALK


def test_floor_boundary_flip_tolerates_only_one_unit_differences():
    one = "('SECURITY_TRADE', 'I3', 'BUY') quantity 999 != 1000"
    other = "('SECURITY_TRADE', 'I1', 'BUY') quantity 874 != 1000"
    follow = "after cash {'SGD': '-10.00'} != {'SGD': '0'}"
    assert _floor_boundary_flip([one, follow])
    assert not _floor_boundary_flip([one, other, follow])  # a real difference beside a flip
    assert not _floor_boundary_flip([follow])
    fx = "('FX_SPOT', 'USD/SGD', 'USD') buy_amount 1.00 != 2.00"
    assert _floor_boundary_flip([one, fx, "status READY != PENDING_REVIEW", "rules [('CASH_BAND', 'PASS')] != [('CASH_BAND', 'FAIL')]"])
    for unrelated in ("target weights [('I3', Decimal('0.1'))] != [('I3', Decimal('0.2'))]",
                      "intent keys [('SECURITY_TRADE', 'I3', 'BUY')] != []",
                      "('SECURITY_TRADE', 'I3', 'BUY') dependencies [] != [('FX_SPOT', 'USD/SGD', 'USD')]",
                      "data_quality.price_missing ['I4'] != []", "warnings [] != ['TAX_BUDGET_LIMIT_REACHED']",
                      "excluded [] != [('I4', 'SHELF_STATUS_BANNED')]"):
        assert not _floor_boundary_flip([one, unrelated]), unrelated  # a unit cannot move these


def test_document_comparison_allows_a_netted_amount_the_error_of_what_it_nets():
    """A bucket of a few units left from millions keeps the millions' 20-decimal error
    (1e-16 of the largest number is allowed), and nothing much above it."""
    exp = {"positions": [{"value": "54323237.93885723623371632979"}], "cash": {"value": "2.83971079114980633463", "weight": "0.0001"}}

    def act(value: str, weight: str = "0.0001") -> dict:
        return {"positions": [{"value": "54323237.93885723624792530929"}], "cash": {"value": value, "weight": weight}}

    assert document_differences(exp, act("2.83971079113559454653")) == []  # 1.4e-11 apart: the session 49 fuzz find
    assert document_differences(exp, act("2.83971080")) == ["doc .cash.value 2.83971079114980633463 != 2.83971080"]  # 8.9e-9
    assert document_differences(exp, act("2.83971079114980633463", "0.0002")) == ["doc .cash.weight 0.0001 != 0.0002"]
    assert document_differences({"a": "2.83971079114980633463"}, {"a": "2.83971079113559454653"}) != []  # nothing large nets here


BEYOND = {"requests": 0, "candidates_dropped": 0, "told": 0, "sized_by_lots": 0, "sells": 0}


@st.composite
def beyond_range_requests(draw) -> dict:
    """A portfolio of 1e8-9e8 USD whose model puts 30-90% in an instrument priced at a cent
    or less (a BUY of 9e9 units or more), or which holds an instrument whose snapshot
    market value far exceeds quantity × price (a liquidating SELL that large, in a
    tax-aware run with lots or not), under a turnover cap or a min_trade_notional that may
    drop the trade, or neither."""
    cash = draw(st.integers(1, 9)) * 10**8
    big_price = draw(st.sampled_from(["0.01", "0.005", "0.002"]))
    prices = [{"instrument_id": "I0", "price": big_price, "currency": "USD"}]
    prices += [{"instrument_id": "I1", "price": draw(st.sampled_from(["12.5", "100.00", "431.07"])), "currency": "USD"},
               {"instrument_id": "I2", "price": draw(st.sampled_from(["0.01", "0.05", "0.1"])), "currency": "USD"}]
    targets = [{"instrument_id": "I1", "weight": draw(st.sampled_from(["0.001", "0.005", "0.02", "0.1"]))}]
    positions = []
    if draw(st.booleans()):
        targets.append({"instrument_id": "I0", "weight": draw(st.sampled_from(["0.3", "0.5", "0.9"]))})
    else:
        value = draw(st.integers(1, 9)) * 10**8
        positions.append({"instrument_id": "I2", "quantity": "1000", "market_value": {"amount": str(value), "currency": "USD"}})
    options = draw(st.sampled_from([
        {}, {"max_turnover_pct": draw(st.sampled_from(["0", "0.001", "0.01", "0.05", "0.3"]))},
        {"min_trade_notional": {"amount": str(draw(st.integers(1, 10)) * 10**8), "currency": "USD"}},
    ]))
    if positions and draw(st.booleans()):  # the tax-lot walk sizes the sell down to its lots
        options = {**options, "enable_tax_awareness": True}
        if draw(st.booleans()):
            options["max_realized_capital_gains"] = draw(st.sampled_from(["0", "5000", "1000000"]))
        positions[0]["lots"] = [  # lots sum to the position's 1,000 units (the contract)
            {"lot_id": f"L{k}", "quantity": quantity,
             "unit_cost": {"amount": draw(st.sampled_from(["1.00", "40.00", "1000.00"])), "currency": "USD"}, "purchase_date": "2020-01-01"}
            for k, quantity in enumerate(draw(st.sampled_from([["1000"], ["400", "600"], ["200", "300", "500"]])))
        ]
    return {
        "portfolio_snapshot": {"portfolio_id": "pf_big", "base_currency": "USD", "positions": positions,
                               "cash_balances": [{"currency": "USD", "amount": f"{cash}.00"}]},
        "market_data_snapshot": {"prices": prices, "fx_rates": []},
        "model_portfolio": {"targets": targets},
        "shelf_entries": [{"instrument_id": f"I{i}", "status": "APPROVED"} for i in range(3)],
        "options": options,
    }


@settings(max_examples=10, **COMMON)
@given(st.lists(beyond_range_requests(), min_size=10, max_size=20))
def test_trades_beyond_the_quantity_range_are_told_only_where_the_reference_makes_them(reqs):
    """A trade of 9e9 units or more is a 422 only if the reference's result holds it; where
    the tax-lot walk, the dust threshold or the turnover cap shrinks or drops it, the engine
    gives the reference's answer."""
    failures: list[str] = []
    for req, act in zip(reqs, simulate_many(reqs)):
        exp = oracle_simulate(req)
        BEYOND["requests"] += 1
        if _beyond_quantity_range(exp, act):
            BEYOND["told"] += 1
            continue
        BEYOND["candidates_dropped"] += bool(exp["diagnostics"]["dropped_intents"] or exp["diagnostics"]["suppressed_intents"])
        BEYOND["sells"] += any(d["instrument_id"] == "I2" for d in exp["diagnostics"]["dropped_intents"] + exp["diagnostics"]["suppressed_intents"])
        BEYOND["sized_by_lots"] += any(Decimal(e["requested_quantity"]) >= TRADE_UNITS_LIMIT for e in exp["diagnostics"]["tax_budget_constraint_events"])
        errs = compare(exp, act)
        if errs:
            failures.append(_report(req, errs))
    assert not failures, f"{len(failures)} of {len(reqs)} requests differ:\n\n" + "\n\n".join(failures[:3])


def test_trades_beyond_the_quantity_range_were_exercised():
    """Runs after the property: both outcomes occurred."""
    if BEYOND["requests"] < 50:
        pytest.skip("run together with the property test")
    assert all(BEYOND[k] > 0 for k in ("told", "candidates_dropped", "sized_by_lots", "sells")), BEYOND


def test_quantity_range_is_told_only_for_trades_beyond_it():
    """A 422 quantity-out-of-range problem counts as the documented limit only when the
    oracle really trades that many units; any other problem stays a failure."""
    problem = {"type": QuantityRangeError.TYPE, "status": 422, "detail": "a BUY of 9000000000 units of I8 is outside ..."}
    big = {"intents": [{"intent_type": "SECURITY_TRADE", "quantity": "9000000000"}, {"intent_type": "FX_SPOT"}]}
    small = {"intents": [{"intent_type": "SECURITY_TRADE", "quantity": "8999999999"}]}
    assert _beyond_quantity_range(big, problem)
    assert not _beyond_quantity_range(small, problem)
    assert not _beyond_quantity_range(big, {"type": "about:blank", "status": 500})


# ---------------------------------------------------------------------------------------
# property 1b: the RFC-0001 options the reference lacks (docs/features.md), engine == oracle


def compare_rfc(req: dict, exp: dict, act: dict) -> list[str]:
    """``compare`` plus the rationale codes and messages."""
    errs = compare(exp, act)
    if "intents" in act:
        ec = sorted((_key(i), i["rationale"]["code"], i["rationale"]["message"]) for i in exp["intents"])
        ac = sorted((_key(i), i["rationale"]["code"], i["rationale"]["message"]) for i in act["intents"])
        if ec != ac and Counter(_key(i) for i in exp["intents"]) == Counter(_key(i) for i in act["intents"]):
            errs.append(f"rationale codes and messages {ec} != {ac}")
    return errs


def _without(req: dict, option: str) -> dict:
    """The request with one RFC option back at its default (off)."""
    r = copy.deepcopy(req)
    r["options"].pop(option, None)
    return r


def _outcome(result: dict) -> str:
    """The business facts an option may change: status, trades, targets, exclusions, warnings."""
    return json.dumps([result["status"], [(_key(i), i.get("quantity"), i.get("notional")) for i in result["intents"]],
                       [(t["instrument_id"], t["final_weight"]) for t in result["target"]["targets"]],
                       result["universe"]["excluded"], sorted(result["diagnostics"]["warnings"])], default=str)


# per RFC option: requests drawn, and requests in which it changed the oracle's outcome
RFC_OPTIONS = ("single_position_cap_mode", "notional_sizing", "max_staleness_minutes", "max_skew_minutes", "missing_shelf_action",
               "require_base_currency_fx", "rfc_rationale_codes", "rfc_fx_dependencies", "delta_from_valuation", "held_banned_action",
               "allow_restricted_holdings")
RFC_EXERCISED = {"requests": 0, **{k: 0 for k in RFC_OPTIONS}}


def _dependencies(result: dict) -> list:
    """Each intent's dependencies, by intent id (the ids are the same with and without the option)."""
    return [(i["intent_id"], i["dependencies"]) for i in result["intents"]]


def _count_rfc_effects(req: dict, exp: dict) -> None:
    RFC_EXERCISED["requests"] += 1
    for option in RFC_OPTIONS:
        if option == "rfc_rationale_codes":
            changed = any(i["rationale"]["code"] not in ("DRIFT_REBALANCE", "FUNDING", "SWEEP") for i in exp["intents"])
        elif option in req["options"]:
            facts = _dependencies if option == "rfc_fx_dependencies" else _outcome
            changed = facts(oracle_simulate(_without(req, option))) != facts(exp)
        else:
            changed = False
        RFC_EXERCISED[option] += changed


@settings(max_examples=20, **COMMON)
@given(st.lists(rfc_option_requests(), min_size=15, max_size=25))
def test_rfc_options_match_oracle(reqs):
    """The RFC-0001 options (asset-class cap, notional sizing, staleness, skew, base
    currency among the FX rates, unshelved model targets, FX sweep threshold, rationale
    codes, FX-only dependencies, the delta's current value from the valuation, held BANNED
    instruments sold, held RESTRICTED ones freed by allow_restricted) against the oracle's
    independent implementation of docs/features.md and the RFC; the threshold has its own property, ``test_fx_sweep_threshold_matches_oracle``."""
    failures: list[str] = []
    for req, act in zip(reqs, simulate_many(reqs)):
        CHECKED["requests"] += 1
        exp = oracle_simulate(req)
        _count_rfc_effects(req, exp)
        if _beyond_quantity_range(exp, act):
            CHECKED["beyond_range"] += 1
            continue
        errs = compare_rfc(req, exp, act)
        if errs and _floor_boundary_flip(errs):
            CHECKED["flips"] += 1
        elif errs:
            failures.append(_report(req, errs))
    assert not failures, f"{len(failures)} of {len(reqs)} requests differ:\n\n" + "\n\n".join(failures[:3])


FED_BACK = {"requests": 0, "beyond_20_decimals": 0}


@settings(max_examples=8, **COMMON)
@given(st.lists(st.one_of(rfc_option_requests(), golden_mutations()), min_size=15, max_size=25))
def test_an_after_state_fed_back_as_the_next_snapshot_matches_oracle(reqs):
    """Each request's after-state as the next request's snapshot (``fed_back``): holdings
    whose quantities have more decimals than DEC's 20 (tax-limited and notional-sized ones)
    are valued, traded and checked in the before-state as the oracle does."""
    following = [r for r in (fed_back(req, oracle_simulate(req)) for req in reqs) if r is not None]
    failures: list[str] = []
    for req, act in zip(following, simulate_many(following)):
        FED_BACK["requests"] += 1
        FED_BACK["beyond_20_decimals"] += any(
            -Decimal(p["quantity"]).as_tuple().exponent > 20 for p in req["portfolio_snapshot"]["positions"])
        exp = oracle_simulate(req)
        if _beyond_quantity_range(exp, act):
            continue
        errs = compare_rfc(req, exp, act)
        if errs and not _floor_boundary_flip(errs):
            failures.append(_report(req, errs))
    assert not failures, f"{len(failures)} of {len(following)} requests differ:\n\n" + "\n\n".join(failures[:3])


def test_fed_back_snapshots_held_long_quantities():
    """Runs after the property: some snapshots must have held quantities past 20 decimals."""
    if FED_BACK["requests"] == 0:
        pytest.skip("run together with the fed-back property")
    assert FED_BACK["beyond_20_decimals"] >= 5, FED_BACK


def test_rfc_options_were_exercised():
    """Runs after the RFC property: each option must have changed the outcome (status,
    trades, targets, exclusions, warnings; for the rationale codes: an Appendix A code) in a
    meaningful share of the requests drawn, or the property proved nothing about it.

    The share moves with the engine's code, not only with the strategies: Hypothesis mixes
    constants found in the code under test into its draws (tests/conftest.py), so adding
    one constant to dpm_vec took ``rfc_fx_dependencies`` from 57 of 334 requests to 23 of
    314. 5% (15 or more of ~300) still fails an option the draws leave unexercised."""
    n = RFC_EXERCISED["requests"]
    if n == 0:
        pytest.skip("run together with the RFC property")
    assert all(RFC_EXERCISED[k] >= 0.05 * n for k in RFC_OPTIONS), str(RFC_EXERCISED)


DOMAIN_ERRORS = {"requests": 0, "problems": 0, "blocked_results": 0}


@settings(max_examples=15, **COMMON)
@given(st.lists(domain_error_requests(), min_size=15, max_size=25))
def test_rfc_domain_errors_match_oracle(reqs):
    """``rfc_domain_errors`` (RFC-0001 §7): where the asset-class cap blocks a run, the JSON
    door answers the oracle's problem, detail (the capped and the over-cap instruments, in
    map order, and the cap) included; elsewhere the result it would give anyway. Without the
    option such a run is a BLOCKED result."""
    failures: list[str] = []
    for req, act in zip(reqs, simulate_many(reqs)):
        exp = oracle_simulate(req)
        DOMAIN_ERRORS["requests"] += 1
        if isinstance(exp.get("status"), int) or isinstance(act.get("status"), int):  # a problem, not a RebalanceResult
            DOMAIN_ERRORS["problems"] += exp == act
            if exp != act:
                failures.append(_report(req, [f"problem {json.dumps(exp)[:500]} != {json.dumps(act)[:500]}"]))
            continue
        DOMAIN_ERRORS["blocked_results"] += "INFEASIBLE_CONCENTRATION" in exp["diagnostics"]["warnings"][:1]
        errs = compare_rfc(req, exp, act)
        if errs and not _floor_boundary_flip(errs) and not _beyond_quantity_range(exp, act):
            failures.append(_report(req, errs))
    assert not failures, f"{len(failures)} of {len(reqs)} requests differ:\n\n" + "\n\n".join(failures[:3])


def test_rfc_domain_errors_were_exercised():
    """Runs after the property: problems in a meaningful share of the requests, and the
    requests that did not ask still got their BLOCKED result."""
    if DOMAIN_ERRORS["requests"] == 0:
        pytest.skip("run together with the domain-error property")
    assert DOMAIN_ERRORS["problems"] >= 0.08 * DOMAIN_ERRORS["requests"] and DOMAIN_ERRORS["blocked_results"] > 0, str(DOMAIN_ERRORS)


# ---------------------------------------------------------------------------------------
# property 2: batch isolation


@settings(max_examples=25, **COMMON)
@given(isolation_batches())
def test_batch_isolation(batch):
    together = simulate_many(batch)
    for req, slot in zip(batch, together):
        alone = simulate_many([req])[0]
        assert strip_random(slot) == strip_random(alone), "batch slot differs from solo run:\n" + json.dumps(req, sort_keys=True)
        failures: list[str] = []
        _check(req, slot, failures)
        assert not failures, failures[0]


# ---------------------------------------------------------------------------------------
# after every property: the excused classes stay rare, and the properties reached trades


def test_quantity_range_limit_stays_rare():
    """Runs after every property (each adds to ``CHECKED``): requests beyond the documented
    range must stay exceptional."""
    if CHECKED["requests"] < 100:
        pytest.skip("run together with the property tests")
    assert CHECKED["beyond_range"] <= 0.01 * CHECKED["requests"], CHECKED


def test_floor_boundary_flips_stay_rare():
    """Runs after every property (each adds to ``CHECKED``): the documented boundary class
    must stay exceptional."""
    if CHECKED["requests"] < 100:
        pytest.skip("run together with the property tests")
    assert CHECKED["flips"] <= 0.01 * CHECKED["requests"], CHECKED


def test_engine_property_reached_trades():
    """Runs after ``test_engine_matches_oracle``: a share of its requests must trade, or a
    strategy that blocks every request at the data-quality gate would prove nothing."""
    if TRADED["requests"] < 100:
        pytest.skip("run together with the property tests")
    assert TRADED["with_trades"] >= 0.15 * TRADED["requests"], TRADED


# ---------------------------------------------------------------------------------------
# replay of the minimal reproductions saved while developing the properties

KNOWN = sorted(FAILURES.glob("*.json")) if FAILURES.is_dir() else []


def _known_params():
    for path in KNOWN:
        doc = json.loads(path.read_text())
        marks = []
        if doc.get("xfail_reason"):
            marks.append(pytest.mark.xfail(strict=True, reason=doc["xfail_reason"]))
        yield pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", list(_known_params()))
def test_known_failure(path):
    """Each file holds a ``request`` (engine vs oracle) or a ``batch`` (every slot vs its
    solo run and vs the oracle), plus ``differs`` / ``spec_supports`` notes. Compared as the
    RFC property compares (``compare`` plus rationale codes), so ``rfc_*`` files replay too.
    Where engine and oracle once shared a misreading, ``reference_trades`` ("instrument
    side": quantity, worked out from the spec by hand) pins both to the reference's trades."""
    doc = json.loads(path.read_text())
    if "batch" in doc:
        batch = doc["batch"]
        for req, slot in zip(batch, simulate_many(batch)):
            assert strip_random(slot) == strip_random(simulate_many([req])[0]), "batch slot differs from solo run"
            errs = compare_rfc(req, oracle_simulate(req), slot)
            assert not errs, _report(req, errs)
        return
    req = doc["request"]
    exp, act = oracle_simulate(req), simulate_many([req])[0]
    errs = compare_rfc(req, exp, act)
    assert not errs, _report(req, errs)
    if "reference_trades" in doc:
        for result in (exp, act):
            trades = {f"{i['instrument_id']} {i['side']}": i["quantity"] for i in result["intents"] if i["intent_type"] == "SECURITY_TRADE"}
            assert {k: Decimal(v) for k, v in trades.items()} == {k: Decimal(v) for k, v in doc["reference_trades"].items()}
