"""Target generation, HEURISTIC (spec §6.4) and the target trace (§6.5)."""
from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.stages.conftest import GOLDEN_03_FX_FUNDING, SINGLE_STOCK_WITH_ZERO_ALTERNATIVE, SUSPENDED_HOLDING_ABOVE_CAP  # noqa: F401
import polars as pl
import pytest


def _three(scenario, weights, **policy):
    ids = list(weights)
    return scenario(
        cash=[("USD", "10000")],
        prices=[(i, "100", "USD") for i in ids],
        shelf=[(i, "APPROVED") for i in ids],
        model=list(weights.items()),
        **policy,
    )


# ---- step 4: single-position cap ----------------------------------------------------------


def test_cap_worked_example_uses_remaining_excess(scenario):
    """§6.4 step 4 worked example: A 0.5, B 0.1, C 0.1, cap 0.3 → 0.3 / 0.20 / 0.150."""
    s = _three(scenario, {"A": "0.5", "B": "0.1", "C": "0.1"}, single_position_max_weight="0.3")
    assert s.weights() == {"A": D("0.3"), "B": D("0.20"), "C": D("0.150")}
    # rem 0.05 > 0.001 → PENDING_REVIEW, no warning
    assert s.target_status() == "PENDING_REVIEW"
    assert s.target_warnings() == []
    assert s.tags() == {"A": ["CAPPED_BY_MAX_WEIGHT"], "B": ["REDISTRIBUTED_RECIPIENT"], "C": ["REDISTRIBUTED_RECIPIENT"]}


def test_cap_full_redistribution_is_ready(scenario):
    """Goldens scenario_02/07: 0.6/0.4 with cap 0.5 → 0.5/0.5, READY."""
    s = _three(scenario, {"EQ_1": "0.6", "EQ_2": "0.4"}, single_position_max_weight="0.5")
    assert s.weights() == {"EQ_1": D("0.5"), "EQ_2": D("0.5")}
    assert s.target_status() == "READY"


def test_cap_without_candidate_is_pending_review(scenario):
    """Golden scenario_05: a single 100% target, cap 0.5 → 0.5, PENDING_REVIEW."""
    s = _three(scenario, {"EQ_1": "1.0"}, single_position_max_weight="0.5")
    assert s.weights() == {"EQ_1": D("0.5")}
    assert s.target_status() == "PENDING_REVIEW"


def test_cap_leftover_within_tolerance_is_ready(scenario):
    """A 0.3005, B 0.2, cap 0.3: excess 0.0005 all placed on B (rem 0 ≤ 0.001) → READY."""
    s = _three(scenario, {"A": "0.3005", "B": "0.2"}, single_position_max_weight="0.3")
    assert s.weights() == {"A": D("0.3"), "B": D("0.2005")}
    assert s.target_status() == "READY"


def test_cap_candidate_just_below_the_cap_at_28_significant_digits(scenario):
    """A TECH group of 0.2856 capped at 0.2 scales I10's 0.1428 by 0.2 / 0.2856: exactly 0.1
    in exact arithmetic and at 28 decimals, but 0.09999999999999999999999999999 at 28
    significant digits (the reference, replayed here with Python's decimal). Under a cap of
    0.1 that makes I10 a candidate for I5's excess (strictly below m), which dilutes every
    later share: I3 ends at 0.09995 and I1 at 0.0874625, not both at the cap."""
    import decimal

    ctx = decimal.Context(prec=28)
    i10 = ctx.multiply(D("0.1428"), ctx.divide(D("0.2"), D("0.2856")))
    assert i10 < D("0.1") and i10.quantize(D(10) ** -28) == D("0.1")
    ids = ("I10", "I3", "I5", "I1")
    s = scenario(
        cash=[("EUR", "100000")],
        base="EUR",
        prices=[(i, "10", "EUR") for i in ids],
        shelf=[(i, "APPROVED") for i in ids],
        attributes=[("I10", "sector", "TECH"), ("I3", "sector", "TECH"), ("I5", "sector", "ENERGY"), ("I1", "sector", "TECH")],
        model=[("I10", "0.1428"), ("I3", "0.0714"), ("I5", "0.2142"), ("I1", "0.0714")],
        groups={"sector:TECH": "0.2"},
        single_position_max_weight="0.1",
    )
    w = s.weights()
    assert (w["I10"], w["I5"], w["I3"], w["I1"]) == (D("0.1"), D("0.1"), D("0.09995"), D("0.0874625"))
    assert s.target_status() == "PENDING_REVIEW"  # 0.1123375 of I5's excess stays unplaced


def test_cap_applies_to_locked_positions(scenario):
    """§6.4 step 4 / §8 item 10: a held SUSPENDED off-model position above the cap is capped too,
    and its excess flows to buyable targets below the cap."""
    s = scenario(
        **SUSPENDED_HOLDING_ABOVE_CAP,
    )
    w = s.weights()
    assert w["LOCK"] == D("0.5")  # capped from 0.6
    assert w["A"] == D("0.3")  # 0.2 + min(0.1 × 1, 0.3)
    assert s.tags()["LOCK"] == ["LOCKED_POSITION"]
    assert s.target_status() == "READY"


# ---- step 1: SELL_ONLY redistribution --------------------------------------------------------


def test_sell_only_redistribution_proportional(scenario):
    """X 0.2 SELL_ONLY, A 0.5, B 0.3: A += 0.2 × 0.5/0.8, B += 0.2 × 0.3/0.8."""
    s = scenario(
        cash=[("USD", "10000")],
        prices=[(i, "100", "USD") for i in ("X", "A", "B")],
        shelf=[("X", "SELL_ONLY"), ("A", "APPROVED"), ("B", "APPROVED")],
        model=[("X", "0.2"), ("A", "0.5"), ("B", "0.3")],
    )
    assert s.weights() == {"X": D(0), "A": D("0.625"), "B": D("0.375")}
    assert s.target_status() == "READY"
    assert s.tags() == {"X": ["CAPPED_BY_MAX_WEIGHT"], "A": ["REDISTRIBUTED_RECIPIENT"], "B": ["REDISTRIBUTED_RECIPIENT"]}


def test_sell_only_without_recipient_is_pending_review(scenario):
    """Golden scenario_305: SELL_ONLY target, no buyable instrument → nothing moves, PENDING_REVIEW."""
    s = scenario(
        cash=[("USD", "10000")],
        prices=[("X", "100", "USD")],
        shelf=[("X", "SELL_ONLY")],
        model=[("X", "1.0")],
    )
    assert s.weights() == {"X": D(0)}
    assert s.target_status() == "PENDING_REVIEW"


def test_sell_only_with_zero_weight_recipients_is_pending_review(scenario):
    """S = 0 (buyable targets all at weight 0) also means no redistribution."""
    s = scenario(
        cash=[("USD", "10000")],
        prices=[("X", "100", "USD"), ("A", "100", "USD")],
        shelf=[("X", "SELL_ONLY"), ("A", "APPROVED")],
        model=[("X", "0.4"), ("A", "0")],
    )
    assert s.weights() == {"X": D(0), "A": D(0)}
    assert s.target_status() == "PENDING_REVIEW"


def test_sell_only_redistribution_touches_only_the_runs_with_excess():
    """Step 1 over several runs at once, rows unordered: a run without SELL_ONLY excess
    keeps its weights, a run with excess spreads it over its buyables in proportion, a run
    whose buyables sum to 0 or less (negative model weights) and a run without buyables are
    pending and keep theirs; the map comes back in (run, map_order) order, and the
    caller's frame is left as it was (step 1's inputs are replayed in 28 digits later)."""
    from dpm_vec.numeric import WEIGHT
    from dpm_vec.stages.targets import _sell_only_redistribution

    rows = [  # run, map_order, kind, weight
        (3, 1, "BUYABLE", "-0.1"), (0, 2, "BUYABLE", "0.4"), (1, 1, "BUYABLE", "0.5"), (2, 1, "SELL_ONLY", "0"),
        (1, 2, "SELL_ONLY", "0"), (0, 1, "BUYABLE", "0.6"), (1, 3, "BUYABLE", "0.3"), (3, 2, "BUYABLE", "0.1"),
        (1, 9, "LOCKED", "0.2"), (2, 2, "LOCKED", "0.5"),
    ]
    weight_map = pl.DataFrame(
        {"run": [r[0] for r in rows], "instrument_id": [f"I{r[0]}{r[1]}" for r in rows], "map_order": [r[1] for r in rows],
         "kind": [r[2] for r in rows], "weight": [D(r[3]) for r in rows], "slot": list(range(len(rows)))},
        schema={"run": pl.UInt32, "instrument_id": pl.String, "map_order": pl.Int64, "kind": pl.String, "weight": WEIGHT, "slot": pl.UInt32},
    )
    before = weight_map.clone()
    excess = pl.DataFrame({"run": [1, 2, 3], "sell_only_excess": [D("0.2"), D("0.5"), D("0.3")]},
                          schema={"run": pl.UInt32, "sell_only_excess": WEIGHT})
    wm, pending = _sell_only_redistribution(pl.DataFrame({"run": [0, 1, 2, 3], "run_key": ["P0", "P1", "P2", "P3"]}), weight_map, excess)
    assert weight_map.equals(before)
    assert wm.columns == [*weight_map.columns, "buy"]
    assert [(r, o) for r, o in wm.select("run", "map_order").iter_rows()] == sorted((r[0], r[1]) for r in rows)
    assert {(r, o): w for r, o, w in wm.select("run", "map_order", "weight").iter_rows()} == {
        (0, 1): D("0.6"), (0, 2): D("0.4"),
        (1, 1): D("0.625"), (1, 2): D(0), (1, 3): D("0.375"), (1, 9): D("0.2"),
        (2, 1): D(0), (2, 2): D("0.5"),
        (3, 1): D("-0.1"), (3, 2): D("0.1"),
    }
    assert set(pending["run"].to_list()) == {2, 3}


# ---- step 3: normalisation ---------------------------------------------------------------------


def test_normalisation_above_threshold_scales_buyables_only(scenario):
    """Sum 1.3 > 1.0001 with a locked 0.2: avail 0.8, buyables × 0.8/1.1, locked untouched."""
    s = scenario(
        positions=[("L", "20")],
        cash=[("USD", "8000")],
        prices=[("A", "100", "USD"), ("B", "100", "USD"), ("L", "100", "USD")],
        shelf=[("A", "APPROVED"), ("B", "APPROVED"), ("L", "BANNED")],
        model=[("A", "0.55"), ("B", "0.55")],
    )
    w = s.weights()
    assert w["L"] == D("0.2")
    assert w["A"] == w["B"]
    assert abs(w["A"] - D("0.4")) < D("1e-18")
    assert s.target_status() == "PENDING_REVIEW"


def test_normalisation_not_triggered_at_threshold(scenario):
    """A total of exactly 1.0001 is not 'above 1.0001': weights unchanged, READY."""
    s = _three(scenario, {"A": "0.5001", "B": "0.5"})
    assert s.weights() == {"A": D("0.5001"), "B": D("0.5")}
    assert s.target_status() == "READY"


def test_normalisation_just_above_threshold(scenario):
    """A total of 1.0002 scales every weight by 1 / 1.0002, each to within its last digits."""
    s = _three(scenario, {"A": "0.6", "B": "0.4002"})
    w = s.weights()
    assert abs(w["A"] - D("0.6") / D("1.0002")) < D("1e-18")
    assert abs(w["B"] - D("0.4002") / D("1.0002")) < D("1e-18")
    assert sum(w.values()) <= D(1)
    assert abs(sum(w.values()) - D(1)) < D("1e-18")
    assert s.target_status() == "PENDING_REVIEW"


# ---- step 5: minimum cash buffer -----------------------------------------------------------------


def test_min_cash_buffer_scales_buyables(scenario):
    """p 0.1, B 1.0, L 0 → allowed 0.9: 0.6/0.4 → 0.54/0.36, PENDING_REVIEW."""
    s = _three(scenario, {"A": "0.6", "B": "0.4"}, min_cash_buffer_pct="0.1")
    assert s.weights() == {"A": D("0.54"), "B": D("0.36")}
    assert s.target_status() == "PENDING_REVIEW"


def test_min_cash_buffer_already_met_is_ready(scenario):
    s = _three(scenario, {"A": "0.5", "B": "0.3"}, min_cash_buffer_pct="0.2")
    assert s.weights() == {"A": D("0.5"), "B": D("0.3")}
    assert s.target_status() == "READY"


def test_min_cash_buffer_counts_locked_weight(scenario):
    """allowed = 1 − p − L: locked 0.3, p 0.1 → buyables scaled to 0.6 in total."""
    s = scenario(
        positions=[("L", "30")],
        cash=[("USD", "7000")],
        prices=[("A", "100", "USD"), ("L", "100", "USD")],
        shelf=[("A", "APPROVED"), ("L", "RESTRICTED")],
        model=[("A", "0.7")],
        min_cash_buffer_pct="0.1",
    )
    w = s.weights()
    assert w["L"] == D("0.3")
    assert abs(w["A"] - D("0.6")) < D("1e-18")
    assert s.target_status() == "PENDING_REVIEW"


# ---- step 2: group constraints ------------------------------------------------------------------


def _sector(scenario, **policy):
    """Golden scenario_08: Tech_A 0.3, Bond_B 0.7, sector:TECH ≤ 0.2, tv 1000."""
    return scenario(
        cash=[("USD", "1000.00")],
        prices=[("Tech_A", "100.00", "USD"), ("Bond_B", "100.00", "USD")],
        shelf=[("Tech_A", "APPROVED", "EQUITY"), ("Bond_B", "APPROVED", "FIXED_INCOME")],
        attributes=[("Tech_A", "sector", "TECH"), ("Bond_B", "sector", "FI")],
        model=[("Tech_A", "0.3"), ("Bond_B", "0.7")],
        **policy,
    )


def test_group_cap_scales_members_and_redistributes(scenario):
    s = _sector(scenario, groups={"sector:TECH": "0.2"})
    w = s.weights()
    assert w["Tech_A"] == D("0.2")  # 0.3 × (0.2 / 0.3), not 0.1999…
    assert w["Bond_B"] == D("0.8")
    assert s.target_status() == "READY"
    assert s.target_warnings() == ["CAPPED_BY_GROUP_LIMIT_sector:TECH"]
    ev = s.targets.group_events.to_dicts()
    assert len(ev) == 1 and ev[0]["status"] == "CAPPED"
    assert ev[0]["group_weight_before"] == D("0.3") and ev[0]["released_weight"] == D("0.1")
    rec = s.targets.group_recipients.to_dicts()
    assert [(r["instrument_id"], r["share"]) for r in rec] == [("Bond_B", D("0.1"))]


def test_group_caps_change_only_their_own_runs(scenario):
    """Runs with and without group constraints side by side: each constrained run is capped
    at its own limit, the run between them keeps the model's weights."""
    s = _sector(scenario, runs=[dict(groups={"sector:TECH": "0.2"}), dict(), dict(groups={"sector:TECH": "0.25"})])
    assert s.weights(0) == {"Tech_A": D("0.2"), "Bond_B": D("0.8")}
    assert s.weights(1) == {"Tech_A": D("0.3"), "Bond_B": D("0.7")}
    assert s.weights(2) == {"Tech_A": D("0.25"), "Bond_B": D("0.75")}
    assert sorted(s.targets.group_events["run"].to_list()) == [0, 2]


def test_group_events_come_in_run_order(scenario):
    """One event per capped run, in run order whatever the hash order of a group-by."""
    s = _sector(scenario, runs=[dict(groups={"sector:TECH": f"0.{20 + i % 7}"}) for i in range(300)])
    assert s.targets.group_events["run"].to_list() == list(range(300))


def test_group_cap_recipients_include_zero_shares(scenario):
    """Recipients are every buyable outside the group, in map order, zero shares included."""
    s = scenario(
        cash=[("USD", "1000")],
        prices=[(i, "100", "USD") for i in ("T", "Z", "F")],
        shelf=[("T", "APPROVED"), ("Z", "APPROVED"), ("F", "APPROVED")],
        attributes=[("T", "sector", "TECH")],
        model=[("T", "0.6"), ("Z", "0"), ("F", "0.2")],
        groups={"sector:TECH": "0.3"},
    )
    assert s.weights() == {"T": D("0.3"), "Z": D("0"), "F": D("0.5")}
    rec = s.targets.group_recipients.sort("recipient_order")
    assert list(zip(rec["instrument_id"], rec["share"])) == [("Z", D(0)), ("F", D("0.3"))]


def test_group_cap_within_tolerance_is_silent(scenario):
    """G ≤ max_weight + 0.0001 is skipped silently."""
    s = _sector(scenario, groups={"sector:TECH": "0.2999"})
    assert s.weights() == {"Tech_A": D("0.3"), "Bond_B": D("0.7")}
    assert s.target_warnings() == []
    assert s.targets.group_events.height == 0


def test_group_cap_unknown_attribute_warns_and_skips(scenario):
    s = _sector(scenario, groups={"region:EU": "0.1"})
    assert s.weights() == {"Tech_A": D("0.3"), "Bond_B": D("0.7")}
    assert s.target_warnings() == ["UNKNOWN_CONSTRAINT_ATTRIBUTE_region"]
    assert s.target_status() == "READY"


def test_group_cap_no_members_is_silent(scenario):
    s = _sector(scenario, groups={"sector:ENERGY": "0.1"})
    assert s.weights() == {"Tech_A": D("0.3"), "Bond_B": D("0.7")}
    assert s.target_warnings() == []


def test_group_cap_blocks_without_destination(scenario):
    """§6.4 step 2.6: a 100% single stock with only zero-weight alternatives blocks."""
    s = scenario(
        **SINGLE_STOCK_WITH_ZERO_ALTERNATIVE,
        groups={"sector:TECH": "0.5", "sector:ZZZ": "0.1", "aaa:x": "0.1"},
    )
    assert s.target_status() == "BLOCKED"
    assert s.targets.trace.height == 0
    # keys in ascending text order; processing stops at the blocking key, so sector:ZZZ
    # (after sector:TECH) is never examined
    assert s.target_warnings() == [
        "UNKNOWN_CONSTRAINT_ATTRIBUTE_aaa",
        "CAPPED_BY_GROUP_LIMIT_sector:TECH",
        "NO_ELIGIBLE_REDISTRIBUTION_DESTINATION",
    ]
    ev = s.targets.group_events.to_dicts()
    assert [e["status"] for e in ev] == ["BLOCKED"]
    assert s.targets.group_recipients.height == 0


def test_group_cap_scales_locked_members(scenario):
    """Locked members are scaled by max_weight / G as well (§8 item 10)."""
    s = scenario(
        positions=[("LOCKT", "40")],
        cash=[("USD", "6000")],
        prices=[("LOCKT", "100", "USD"), ("T", "100", "USD"), ("F", "100", "USD")],
        shelf=[("LOCKT", "BANNED"), ("T", "APPROVED"), ("F", "APPROVED")],
        attributes=[("LOCKT", "sector", "TECH"), ("T", "sector", "TECH"), ("F", "sector", "FI")],
        model=[("T", "0.2"), ("F", "0.4")],
        groups={"sector:TECH": "0.3"},
    )
    w = s.weights()
    # G = 0.2 + 0.4 = 0.6 → factor 0.5; excess 0.3 goes to F (the only buyable outside)
    assert w["T"] == D("0.1")
    assert w["LOCKT"] == D("0.2")
    assert w["F"] == D("0.7")
    assert s.tags()["LOCKT"] == ["LOCKED_POSITION"]


def test_group_caps_are_single_pass_in_key_order(scenario):
    """A recipient pushed over an earlier constraint is not re-checked."""
    s = scenario(
        cash=[("USD", "1000")],
        prices=[(i, "100", "USD") for i in ("A", "B")],
        shelf=[("A", "APPROVED"), ("B", "APPROVED")],
        attributes=[("A", "s", "X"), ("B", "s", "Y")],
        model=[("A", "0.5"), ("B", "0.5")],
        groups={"s:X": "0.6", "s:Y": "0.3"},  # s:X is fine first; s:Y then pushes A to 0.7
    )
    assert s.weights() == {"A": D("0.7"), "B": D("0.3")}
    assert s.target_warnings() == ["CAPPED_BY_GROUP_LIMIT_s:Y"]


# ---- trace ---------------------------------------------------------------------------------------


def test_trace_order_values_and_tags(scenario):
    """Model rows first (model order), then non-model map entries (position order) with
    IMPLICIT_SELL_TO_ZERO / LOCKED_POSITION; final_value = tv × final_weight."""
    s = scenario(
        positions=[("OFF", "10"), ("LCK", "10")],
        cash=[("USD", "8000")],
        prices=[(i, "100", "USD") for i in ("A", "B", "OFF", "LCK")],
        shelf=[("A", "APPROVED"), ("B", "BANNED"), ("OFF", "APPROVED")],  # LCK has no shelf entry
        model=[("A", "0.5"), ("B", "0.2")],
    )
    t = s.targets.trace.sort("trace_order")
    assert t["instrument_id"].to_list() == ["A", "B", "OFF", "LCK"]
    assert s.tags() == {"A": [], "B": ["CAPPED_BY_MAX_WEIGHT"], "OFF": ["IMPLICIT_SELL_TO_ZERO"], "LCK": ["LOCKED_POSITION"]}
    assert dict(zip(t["instrument_id"], t["final_value"])) == {
        "A": D("5000"), "B": D("0"), "OFF": D("0"), "LCK": D("1000"),
    }
    assert dict(zip(t["instrument_id"], t["model_weight"]))["OFF"] == D("0")


def _locked_third(scenario, units: str, cash: str):
    """A SUSPENDED holding of ``units`` at 10 beside ``cash``: a third of the portfolio."""
    return scenario(
        positions=[("LCK", units)],
        cash=[("USD", cash)],
        prices=[("A", "10", "USD"), ("LCK", "10", "USD")],
        shelf=[("A", "APPROVED"), ("LCK", "SUSPENDED")],
        model=[("A", "0.5")],
    )


def test_final_value_reads_every_digit_of_the_weight(scenario):
    """A locked third of 15,000 has weight 0.3333…3 (28 decimals): the reference's
    tv × final_weight rounds to exactly 5000, where the weight read at 20 decimals gives
    4999.99999999999999995. A weight with 20 decimals or fewer keeps the fixed-point product."""
    t = _locked_third(scenario, "500", "10000").targets.trace
    assert dict(zip(t["instrument_id"], t["final_weight"]))["LCK"] == D("0.3333333333333333333333333333")
    assert dict(zip(t["instrument_id"], t["final_value"])) == {"A": D("7500"), "LCK": D("5000")}


def test_final_value_reads_every_digit_of_the_weight_up_to_ten_billion(scenario):
    """The same locked third of 1.5 billion: tv × the weight read at 20 decimals misses the
    reference's 500,000,000 by 5e-12; at 28 decimals by 5e-20, below DEC's last digit."""
    t = _locked_third(scenario, "50000000", "1000000000").targets.trace
    values = dict(zip(t["instrument_id"], t["final_value"]))
    assert values["A"] == D("750000000")
    assert abs(values["LCK"] - D("500000000")) <= D("1e-19")


# ---- isolation of runs in one book -----------------------------------------------------------------


def test_runs_with_different_policies_do_not_interact(scenario):
    """Same frames, three runs: cap / no cap / cash buffer. Each equals its solo result."""
    policies = [
        dict(single_position_max_weight="0.3"),
        dict(),
        dict(min_cash_buffer_pct="0.1", groups={"s:X": "0.2"}),
    ]
    common = dict(
        cash=[("USD", "10000")],
        prices=[(i, "100", "USD") for i in ("A", "B", "C")],
        shelf=[(i, "APPROVED") for i in ("A", "B", "C")],
        attributes=[("A", "s", "X")],
        model=[("A", "0.5"), ("B", "0.1"), ("C", "0.1")],
    )
    multi = scenario(runs=policies, **common)
    assert multi.weights(0) == {"A": D("0.3"), "B": D("0.20"), "C": D("0.150")}
    assert multi.target_status(0) == "PENDING_REVIEW"
    assert multi.weights(1) == {"A": D("0.5"), "B": D("0.1"), "C": D("0.1")}
    assert multi.target_status(1) == "READY"
    assert multi.target_warnings(1) == []
    for i, pol in enumerate(policies):
        pol = dict(pol)
        solo = scenario(groups=pol.pop("groups", None), **pol, **common)
        assert multi.weights(i) == solo.weights(), i
        assert multi.target_status(i) == solo.target_status(), i
        assert multi.target_warnings(i) == solo.target_warnings(), i


def test_a_cash_buffer_decided_in_28_digits_keeps_other_runs_replayable(scenario):
    """Run 0's cap hands excess on, so its weights are replayed in 28 digits wherever a trade
    size needs their last digit. Run 1's buyable sum lies exactly on its cash buffer's bound
    (0.5 + 0.3 + 0.15 = 1 − 0.05), which is decided in 28 digits. That decision once
    reused the name of step 4's capped runs for its own, and dropped run 0 from the runs
    the replay may redo: run 0's trades then depended on which other portfolios shared its
    pass (the fuzz found a BUY of 44 units for 45)."""
    common = dict(
        cash=[("USD", "10000")],
        prices=[(i, "100", "USD") for i in ("A", "B", "C")],
        shelf=[(i, "APPROVED") for i in ("A", "B", "C")],
        attributes=[("A", "s", "X")],
        model=[("A", "0.5"), ("B", "0.3"), ("C", "0.15")],
    )
    multi = scenario(runs=[dict(single_position_max_weight="0.3"), dict(min_cash_buffer_pct="0.05", groups={"s:X": "0.9"})], **common)
    solo = scenario(single_position_max_weight="0.3", **common)
    assert multi.weights(0) == solo.weights() == {"A": D("0.3"), "B": D("0.3"), "C": D("0.3")}
    assert set(solo.targets.replay.policy["run"]) == {0}
    assert set(multi.targets.replay.policy["run"]) == {0}


def test_blocked_run_does_not_block_its_neighbour(scenario):
    common = dict(
        cash=[("USD", "1000")],
        prices=[("T", "100", "USD"), ("F", "100", "USD")],
        shelf=[("T", "APPROVED"), ("F", "APPROVED")],
        attributes=[("T", "sector", "TECH")],
        model=[("T", "1.0"), ("F", "0")],
    )
    s = scenario(runs=[dict(groups={"sector:TECH": "0.5"}), dict()], **common)
    status = dict(zip(s.targets.status["run"], s.targets.status["target_status"]))
    assert status == {0: "BLOCKED", 1: "READY"}
    assert s.targets.trace.filter(pl.col("run") == 0).height == 0
    assert s.weights(1) == {"T": D("1.0"), "F": D("0")}


def test_group_weight_at_its_cap_tolerance_after_step_1_is_decided_in_28_digits(scenario):
    """Three buyable TECH-like members weigh 0.1557 and SELL_ONLY S0 0.6444: after step 1
    spreads S0's weight over them the group weighs exactly 0.8001 in exact arithmetic, its
    cap 0.8 plus the 0.0001 tolerance. The reference's 28-digit shares (replayed here with
    Python's decimal) sum a unit of the 28th digit above it: the cap binds and, with no
    buyable instrument outside the group, the run is BLOCKED. The fixed-point sum sat on
    the bound: READY (found by fuzzing, 49 of 1,500 requests built for it)."""
    import decimal

    s = scenario(
        cash=[("USD", "100000")],
        prices=[("G0", "10", "USD"), ("G1", "100", "USD"), ("G2", "10", "USD"), ("S0", "10", "USD")],
        shelf=[("G0", "APPROVED"), ("G1", "APPROVED"), ("G2", "APPROVED"), ("S0", "SELL_ONLY")],
        attributes=[("G0", "sector", "G"), ("G1", "sector", "G"), ("G2", "sector", "G"), ("S0", "sector", "X")],
        model=[("S0", "0.6444"), ("G2", "0.0008"), ("G1", "0.1326"), ("G0", "0.0223")],
        groups={"sector:G": "0.8"},
    )
    ctx = decimal.Context(prec=28)
    members = [D("0.0008"), D("0.1326"), D("0.0223")]
    total = D(0)
    for w in members:
        total = ctx.add(total, w)
    group = D(0)
    for w in members:
        group = ctx.add(group, ctx.add(w, ctx.multiply(D("0.6444"), ctx.divide(w, total))))
    assert group > D("0.8001")  # the reference's cap binds
    assert s.target_status() == "BLOCKED"
    assert "NO_ELIGIBLE_REDISTRIBUTION_DESTINATION" in set(s.targets.warnings["code"].to_list())


def test_group_cap_total_at_threshold_is_decided_in_28_digits(scenario):
    """A model of 4-decimal weights summing to 1.0001 with a binding group cap: in exact
    arithmetic the cap keeps the total at 1.0001 (not above: no normalisation); the
    reference's 28-digit scaling and redistribution land at or below it as well (replayed
    here with Python's decimal), while the engine's fixed-point weights summed above it and
    normalised the run to PENDING_REVIEW (found by fuzzing, 1 in 10,000 requests)."""
    import decimal

    model = {"A": "0.0442", "B": "0.1413", "T1": "0.1404", "C": "0.2323", "E": "0.1768", "T2": "0.0568", "T3": "0.2083"}
    sector = {"T1": "TECH", "T2": "TECH", "T3": "TECH"}
    s = scenario(
        cash=[("USD", "100000")],
        prices=[(i, "100", "USD") for i in model],
        shelf=[(i, "APPROVED") for i in model],
        attributes=[(i, "sector", sector.get(i, "OTHER")) for i in model],
        model=list(model.items()),
        groups={"sector:TECH": "0.3"},
    )
    ctx = decimal.Context(prec=28)
    w = {i: D(v) for i, v in model.items()}
    g = ctx.add(ctx.add(w["T1"], w["T2"]), w["T3"])
    ratio, excess = ctx.divide(D("0.3"), g), ctx.subtract(g, D("0.3"))
    c = ctx.add(ctx.add(ctx.add(w["A"], w["B"]), w["C"]), w["E"])
    ref = {i: ctx.multiply(v, ratio) if i in sector else ctx.add(v, ctx.multiply(excess, ctx.divide(v, c))) for i, v in w.items()}
    total = D(0)
    for v in ref.values():
        total = ctx.add(total, v)
    assert total <= D("1.0001")  # the reference does not normalise
    assert s.target_status() == "READY"
    assert all(abs(s.weights()[i] - ref[i]) < D("1e-27") for i in model)


def test_total_at_threshold_with_a_locked_weight_is_decided_in_28_digits(scenario):
    """An unshelved holding locked at 2,288 / 40,000 = 0.0572 and a model summing to 0.9429
    put the map total at exactly 1.0001 once step 1 spreads the SELL_ONLY M0's 0.0046 over
    the buyables. The reference's 28-digit shares (replayed here with Python's decimal,
    in map order: the model's targets, then the holding) leave it at 1.0001, not above: no
    normalisation, READY. The fixed-point shares summed 1E-28 above it, and a run with a
    locked weight kept the fixed-point total (found by fuzzing, 331 of 7,500 requests built
    for it)."""
    import decimal

    model = {"M2": "0.1609", "M3": "0.3587", "M1": "0.034", "M4": "0.129", "M5": "0.0068", "M0": "0.0046", "M6": "0.2489"}
    prices = {"L0": "4", "M0": "12.34", "M1": "100", "M2": "7", "M3": "10", "M4": "3.7", "M5": "12.34", "M6": "7"}
    s = scenario(
        positions=[("L0", "572"), ("M0", "45"), ("M4", "194")],
        cash=[("USD", "36438.90")],
        prices=[(i, p, "USD") for i, p in prices.items()],
        shelf=[(i, "SELL_ONLY" if i == "M0" else "APPROVED") for i in model],
        model=list(model.items()),
    )
    ctx = decimal.Context(prec=28)
    buyable = {i: D(w) for i, w in model.items() if i != "M0"}
    total_buyable = D(0)
    for w in buyable.values():
        total_buyable = ctx.add(total_buyable, w)
    spread = {i: ctx.add(w, ctx.multiply(D("0.0046"), ctx.divide(w, total_buyable))) for i, w in buyable.items()}
    total = D(0)
    for w in [*spread.values(), D("0.0572")]:
        total = ctx.add(total, w)
    assert total == D("1.0001")  # not above the threshold: the reference does not normalise
    assert s.target_status() == "READY"
    assert all(abs(s.weights()[i] - spread[i]) < D("1e-27") for i in buyable)
    assert s.weights()["L0"] == D("0.0572")


def test_cash_buffer_at_its_bound_with_a_locked_weight_is_decided_in_28_digits(scenario):
    """A locked holding of 0.0251 and a 1% buffer leave room 0.9649 for the buyables; the
    model sums to exactly that, with SELL_ONLY M2 and M0 spread over M3 and M1 by step 1.
    The reference's 28-digit shares (replayed here with Python's decimal) sum a unit of
    the 28th digit above the bound: the buffer binds, PENDING_REVIEW. The fixed-point B
    did not, and a run with a locked weight kept the fixed-point sums (found by fuzzing,
    56 of 1,000 requests built for it)."""
    import decimal

    s = scenario(
        positions=[("L0", "200.8")],
        cash=[("USD", "38996.0")],
        prices=[("L0", "5", "USD"), ("M0", "10", "USD"), ("M1", "3.7", "USD"), ("M2", "3.7", "USD"), ("M3", "100", "USD")],
        shelf=[("L0", "RESTRICTED"), ("M0", "SELL_ONLY"), ("M1", "APPROVED"), ("M2", "SELL_ONLY"), ("M3", "APPROVED")],
        model=[("M2", "0.17"), ("M3", "0.5037"), ("M1", "0.0694"), ("M0", "0.2218")],
        min_cash_buffer_pct="0.01",
    )
    ctx = decimal.Context(prec=28)
    total = ctx.add(D("0.5037"), D("0.0694"))
    m3 = ctx.add(D("0.5037"), ctx.multiply(D("0.3918"), ctx.divide(D("0.5037"), total)))
    m1 = ctx.add(D("0.0694"), ctx.multiply(D("0.3918"), ctx.divide(D("0.0694"), total)))
    assert ctx.add(m3, m1) > ctx.subtract(ctx.subtract(D(1), D("0.01")), D("0.0251"))  # the reference's buffer binds
    assert s.target_status() == "PENDING_REVIEW"
    assert s.weights()["L0"] == D("0.0251")
    assert s.weights()["M3"] + s.weights()["M1"] <= D("0.9649")


def test_a_dust_room_recipient_pushed_over_the_rfc_cap_blocks_the_run(scenario):
    """Three locked holdings of a third each fill the portfolio: the reference's 28-digit
    weights leave a dust room of 1E-28 that the two model targets share. With the RFC
    asset-class cap at 0.15 each holding's excess (0.1833...) goes to those dust
    candidates of its class, each then weighs 0.275 > 0.15: INFEASIBLE_CONCENTRATION, as
    the 28-digit replay finds; at 0.2 each lands on the cap and the run goes on. Before,
    the fixed point saw no candidate, raised no fault and the run blocked later on an
    unfunded buy (found by fuzzing the RFC options)."""
    def run(cap):
        return scenario(
            positions=[("A", "10"), ("B", "10"), ("E", "10")],
            prices=[(i, "100", "USD") for i in ("A", "B", "E", "C", "D")],
            shelf=[("A", "SUSPENDED"), ("B", "SUSPENDED"), ("E", "SUSPENDED"), ("C", "APPROVED"), ("D", "APPROVED")],
            model=[("C", "0.5"), ("D", "0.5")],
            single_position_max_weight=cap, single_position_cap_mode="RFC_ASSET_CLASS",
        )
    over = run("0.15")
    assert over.target_status() == "BLOCKED"
    assert over.run_row()["block_reason"] == "INFEASIBLE_CONCENTRATION" and over.run_row()["exit_path"] == "E1"
    # RFC-0001 §7's detail, from the replay's roles: no shelf asset class, so one class (UNKNOWN)
    assert over.run_row()["block_detail"] == "Redistributing excess weight from A, B and E caused C and D to exceed the 15% cap."
    at_cap = run("0.2")
    assert at_cap.target_status() == "PENDING_REVIEW"
    assert at_cap.weights()["C"] == at_cap.weights()["D"] == D("0.2")


def test_rfc_cap_fault_names_the_capped_and_the_over_cap_instruments_of_its_class(scenario):
    """RFC-0001 §7's detail for INFEASIBLE_CONCENTRATION (the runs table's block_detail):
    at a 0.2 cap, equity A's excess 0.25 lifts C and F to 0.225 each, over it; bond B's
    0.1 lifts D to 0.15, under it. So the detail names A, C and F in model order, and not
    the bond class, whose redistribution was feasible; a cap of 0.125 reads 12.5%."""
    def run(cap):
        return scenario(
            prices=[(i, "10", "USD") for i in "ABCDF"],
            shelf=[("A", "APPROVED", "EQUITY"), ("B", "APPROVED", "BOND"), ("C", "APPROVED", "EQUITY"),
                   ("D", "APPROVED", "BOND"), ("F", "APPROVED", "EQUITY")],
            model=[("A", "0.45"), ("B", "0.3"), ("C", "0.1"), ("D", "0.05"), ("F", "0.1")],
            single_position_max_weight=cap, single_position_cap_mode="RFC_ASSET_CLASS",
        )
    s = run("0.2")
    assert s.run_row()["block_reason"] == "INFEASIBLE_CONCENTRATION"
    assert s.run_row()["block_detail"] == "Redistributing excess weight from A caused C and F to exceed the 20% cap."
    assert run("0.125").run_row()["block_detail"] == \
        "Redistributing excess weight from A and B caused C, D and F to exceed the 12.5% cap."
    feasible = run("0.5")
    assert feasible.run_row()["block_reason"] is None and feasible.run_row()["block_detail"] is None


def test_locked_weights_leaving_a_dust_room_hand_the_cap_excess_on(scenario):
    """Three locked holdings fill the portfolio (no cash). Their weights, each rounded to
    28 digits and summed in map order as the reference sums them (replayed here with
    Python's decimal), come to 1 − 1E-28: step 3 leaves a dust room, the buyables scaled
    into it are candidates with a positive sum, and the 0.5 cap hands L0's excess to
    them in proportion (M0 first, 0.2055...). Decimal(38, 28) cannot hold those dust
    weights, so the run's weights are taken from the 28-digit replay; before, the
    engine found no candidate and bought nothing (found by fuzzing, 10 in 1,000 requests)."""
    import decimal

    s = scenario(
        positions=[("L0", "4974"), ("L1", "2621"), ("L2", "2983")],
        prices=[("L0", "7.13", "USD"), ("L1", "1.7", "USD"), ("L2", "0.37", "USD"), ("M0", "10", "USD"), ("M1", "12.34", "USD"),
                ("M2", "100", "USD")],
        shelf=[("M0", "APPROVED"), ("M1", "APPROVED"), ("M2", "APPROVED")],
        attributes=[("M0", "sector", "O"), ("M1", "sector", "T"), ("M2", "sector", "T")],
        model=[("M0", "0.0963"), ("M1", "0.2186"), ("M2", "0.3731")],
        groups={"sector:T": "0.3"},
        single_position_max_weight="0.5",
    )
    ctx = decimal.Context(prec=28)
    values = [ctx.multiply(D(q), D(p)) for q, p in (("4974", "7.13"), ("2621", "1.7"), ("2983", "0.37"))]
    tv = D(0)
    for v in values:
        tv = ctx.add(tv, v)
    locked = D(0)
    for v in values:
        locked = ctx.add(locked, ctx.divide(v, tv))
    assert ctx.subtract(D(1), locked) == D("1E-28")  # the reference's room
    w = s.weights()
    assert w["L0"] == D("0.5")
    expected = {"M0": D("0.2055520569285855143924182974"), "M1": D("0.02560311229346444677776221557"),
                "M2": D("0.03665901244379458986312589980")}
    assert all(abs(w[i] - v) < D("1e-27") for i, v in expected.items())
    assert s.target_status() == "PENDING_REVIEW"


def test_cash_buffer_at_its_bound_after_a_capped_weight_is_decided_in_28_digits(scenario):
    """Model weights summing to 0.97 with a 3% cash buffer, a SELL_ONLY target whose weight
    step 1 spreads over the other two, and a cap of 0.5 that the larger one then exceeds:
    step 4 hands its excess to the smaller one, whose 28-digit sum lands a unit above 0.47
    in the reference (replayed here with Python's decimal), so B is a unit above 0.97 and
    step 5 scales and reviews; the fixed-point steps kept B at exactly 0.97, READY (found by
    fuzzing, 1 in 60,000 requests biased to cash buffers and caps)."""
    import decimal

    model = {"S": "0.5353", "B2": "0.0648", "B4": "0.3699"}
    s = scenario(
        cash=[("USD", "100000")],
        prices=[(i, "100", "USD") for i in model],
        shelf=[("S", "SELL_ONLY"), ("B2", "APPROVED"), ("B4", "APPROVED")],
        model=list(model.items()),
        runs=[dict(min_cash_buffer_pct="0.03", single_position_max_weight="0.5")],
    )
    ctx = decimal.Context(prec=28)
    w = {i: D(v) for i, v in model.items()}
    buyable = ctx.add(w["B2"], w["B4"])
    step1 = {i: ctx.add(w[i], ctx.multiply(w["S"], ctx.divide(w[i], buyable))) for i in ("B2", "B4")}
    excess = ctx.subtract(step1["B4"], D("0.5"))
    b2 = ctx.add(step1["B2"], min(ctx.multiply(excess, ctx.divide(step1["B2"], step1["B2"])), ctx.subtract(D("0.5"), step1["B2"])))
    assert ctx.add(b2, D("0.5")) > D("0.97")  # the reference's step 5 binds; exactly, B is 0.97
    ratio = ctx.divide(D("0.97"), ctx.add(b2, D("0.5")))
    assert s.target_status() == "PENDING_REVIEW"
    assert abs(s.weights()["B2"] - ctx.multiply(b2, ratio)) <= D("1e-27")
    assert abs(s.weights()["B4"] - ctx.multiply(D("0.5"), ratio)) <= D("1e-27")


def test_cash_buffer_at_its_bound_is_decided_in_28_digits(scenario):
    """Model weights summing to exactly 0.95 with a 5% cash buffer and a SELL_ONLY target:
    in exact arithmetic step 1 keeps the buyable sum at 0.95, which does not exceed step
    5's allowed 1 − 0.05. The reference's 28-digit redistribution (replayed here with
    Python's decimal) sums a unit above it, so it scales and reviews; the fixed-point
    weights summed to exactly 0.95 and the run was READY (found by fuzzing, 2 in 7,500
    option-recombined requests, one each way)."""
    import decimal

    model = {"B2": "0.5447", "S": "0.2382", "B0": "0.1671"}
    s = scenario(
        cash=[("USD", "100000")],
        prices=[(i, "100", "USD") for i in model],
        shelf=[("B0", "APPROVED"), ("S", "SELL_ONLY"), ("B2", "APPROVED")],
        model=list(model.items()),
        # a single-position cap no weight reaches changes nothing: the same decision
        runs=[dict(min_cash_buffer_pct="0.05"), dict(min_cash_buffer_pct="0.05", single_position_max_weight="0.9")],
    )
    ctx = decimal.Context(prec=28)
    w = {i: D(v) for i, v in model.items()}
    total = ctx.add(w["B2"], w["B0"])
    ref = {i: ctx.add(w[i], ctx.multiply(w["S"], ctx.divide(w[i], total))) for i in ("B2", "B0")}
    assert ctx.add(ref["B2"], ref["B0"]) > D("0.95")  # the reference's step 5 binds
    ratio = ctx.divide(D("0.95"), ctx.add(ref["B2"], ref["B0"]))
    for run in (0, 1):
        assert s.target_status(run) == "PENDING_REVIEW"
        assert all(abs(s.weights(run)[i] - ctx.multiply(ref[i], ratio)) <= D("1e-27") for i in ("B2", "B0"))


def test_target_back_at_its_model_weight_after_a_locked_excess_is_tagged_in_28_digits(scenario):
    """Two unshelved (locked) holdings fill most of the portfolio, so step 3 scales the
    model's 0.6 down to the room they leave; the cap of 0.2 then hands their excess to the
    targets in map order, and the first one's share brings it back to its model weight
    exactly: (1 − L) + (L − 0.4) = 0.6. The reference's 28-digit steps (replayed here with
    Python's decimal) land on 0.0018 exactly, no tag; the fixed-point steps, over locked
    weights whose last digits follow the fixed-point tv, landed 2E-28 above it and tagged
    the target REDISTRIBUTED_RECIPIENT (found by fuzzing, 3 in ~100,000 requests biased to
    caps)."""
    import decimal

    model = {"A": "0.0018", "B": "0.0071", "C": "0.1880", "E": "0.2436", "F": "0.1595"}
    s = scenario(
        base="SGD",
        positions=[("L2", "1039"), ("L6", "348")],
        cash=[("USD", "88412.57")],
        prices=[("L2", "678.27", "SGD"), ("L6", "770.97", "CHF"), *[(i, "100", "SGD") for i in model]],
        fx=[("CHF/SGD", "1.493553"), ("USD/SGD", "1.309114")],
        shelf=[(i, "APPROVED") for i in model],
        model=list(model.items()),
        single_position_max_weight="0.2",
    )
    ctx = decimal.Context(prec=28)

    def total(values):
        acc = D(0)
        for v in values:
            acc = ctx.add(acc, v)
        return acc

    held = [ctx.multiply(D("1039"), D("678.27")), ctx.multiply(ctx.multiply(D("348"), D("770.97")), D("1.493553"))]
    tv = total([*held, ctx.multiply(D("88412.57"), D("1.309114"))])
    locked = [ctx.divide(v, tv) for v in held]
    factor = ctx.divide(ctx.subtract(D(1), total(locked)), total(D(w) for w in model.values()))
    scaled = [ctx.multiply(D(w), factor) for w in model.values()]
    excess = total(ctx.subtract(w, D("0.2")) for w in locked)
    first = ctx.add(scaled[0], min(ctx.multiply(excess, ctx.divide(scaled[0], total(scaled))), ctx.subtract(D("0.2"), scaled[0])))
    assert first == D("0.0018")  # the reference: back on the model weight, so no tag
    assert s.weights()["A"] == D("0.0018")
    assert s.tags()["A"] == []
    assert all(s.tags()[i] == ["CAPPED_BY_MAX_WEIGHT"] for i in ("B", "C", "E", "F"))
    assert s.tags()["L2"] == s.tags()["L6"] == ["LOCKED_POSITION"]


@pytest.mark.parametrize("cap_mode", ["REFERENCE", "RFC_ASSET_CLASS"])
def test_a_locked_weight_a_last_digit_over_the_cap_hands_its_excess_on_in_28_digits(scenario, cap_mode):
    """A held quantity past 20 decimals (fed back) makes a locked holding worth
    604165.9300000000000000000001 in 28 digits, exactly half of the 28-digit tv: its
    weight 0.5000000000000000000000000001 is over the cap of 0.5 there and the reference
    hands that excess to the targets, which then carry REDISTRIBUTED_RECIPIENT. At 20
    decimals the weight is 0.5, step 4 takes nothing, and no target was tagged."""
    import decimal

    s = scenario(
        cash=[("USD", "24573.81")],
        positions=[("L", "1926.058180311145116041826065"), ("A", "37"), ("B", "5158")],
        prices=[("L", "313.68", "USD"), ("A", "502.92", "USD"), ("B", "108.76", "USD")],
        shelf=[("L", "RESTRICTED"), ("A", "APPROVED"), ("B", "APPROVED")],
        model=[("A", "0.008"), ("B", "0.237")],
        single_position_max_weight="0.5", single_position_cap_mode=cap_mode,
    )
    ctx = decimal.Context(prec=28)
    held = ctx.multiply(D("1926.058180311145116041826065"), D("313.68"))
    tv = ctx.add(ctx.add(ctx.add(held, ctx.multiply(D(37), D("502.92"))), ctx.multiply(D(5158), D("108.76"))), D("24573.81"))
    assert ctx.divide(held, tv) == D("0.5000000000000000000000000001")
    assert s.tags() == {"A": ["REDISTRIBUTED_RECIPIENT"], "B": ["REDISTRIBUTED_RECIPIENT"], "L": ["LOCKED_POSITION"]}


@pytest.mark.parametrize("cap_mode", ["REFERENCE", "RFC_ASSET_CLASS"])
def test_a_locked_excess_of_a_last_digit_with_no_candidate_stays_in_cash_for_review(scenario, cap_mode):
    """A held banned (locked) holding of a fed-back quantity weighs the cap of 0.5 at 20
    decimals and 0.5000000000000000000000000001 in the reference's 28 digits. There step 4
    takes that excess and, with no buyable target to hand it to, leaves it in cash:
    PENDING_REVIEW (§6.4 step 4), where the fixed point took nothing and was READY."""
    import decimal

    s = scenario(
        base="SGD",
        cash=[("SGD", "754095.44")],
        positions=[("X", "1046.221371292211215627514637")],
        prices=[("X", "720.78", "SGD")],
        shelf=[("X", "BANNED")],
        model=[("X", "0.6")],
        single_position_max_weight="0.5", single_position_cap_mode=cap_mode,
    )
    ctx = decimal.Context(prec=28)
    held = ctx.multiply(D("1046.221371292211215627514637"), D("720.78"))
    assert ctx.divide(held, ctx.add(held, D("754095.44"))) == D("0.5000000000000000000000000001")
    assert s.weights()["X"] == D("0.5")
    assert s.target_status() == "PENDING_REVIEW"


def _class_cap_28(rows: list[tuple[str, bool, D]], m: D) -> tuple[list[D], set[tuple[int, str]]]:
    """The RFC-0001 asset-class cap in Python's 28-digit decimals, as docs/features.md and
    the oracle state it: every weight above m cut to it, each class's excess Σ (w − m) in
    map order handed to the class's buyable weights below m as w + excess × (w / C); and
    the roles its problem detail names: (row, "over") for a recipient that ends above m,
    (row, "source") for a weight cut in that recipient's class."""
    import decimal
    with decimal.localcontext(decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)):
        weights, excess = [w for _, _, w in rows], {}
        for i, (cls, _, w) in enumerate(rows):
            if w > m:
                excess[cls] = excess.get(cls, D(0)) + (w - m)
                weights[i] = m
        recipients = []
        for cls, e in excess.items():
            cands = [i for i, (c, buy, _) in enumerate(rows) if c == cls and buy and weights[i] < m]
            total = D(0)
            for i in cands:
                total += weights[i]
            if total > 0:
                for i in cands:
                    weights[i] = weights[i] + e * (weights[i] / total)
                recipients += cands
        over = {i for i in recipients if weights[i] > m}
        classes = {rows[i][0] for i in over}
        return weights, {(i, "over") for i in over} | {(i, "source") for i, (c, _, w) in enumerate(rows) if w > m and c in classes}


@settings(max_examples=200, deadline=None)
@given(st.lists(
    st.tuples(
        st.sampled_from(["0.1", "0.2", "0.25", "0.3"]),
        st.lists(st.tuples(st.sampled_from(["EQUITY", "FUND"]), st.booleans(), st.integers(0, 10**6), st.integers(0, 4)), min_size=1, max_size=8),
    ),
    min_size=1, max_size=4,
))
def test_class_cap_in_28_digits_matches_python_decimals(books):
    """The F28 asset-class cap gives every weight, and whether a recipient ends over the
    cap, as Python's 28-digit decimals do (weights u / 3^k of mixed magnitudes, so the
    excess sums, the shares and the recipients' new weights round as Python's context
    rounds them; about one run in ten ends with a recipient over the cap)."""
    import decimal

    from dpm_vec import dec28 as f28
    from dpm_vec.numeric import WEIGHT
    from dpm_vec.stages.targets import _class_cap_rows_in_28_digits

    data = [(run, order, cls, buy, D(units) / D(3) ** k / 10**6, D(cap))
            for run, (cap, rows) in enumerate(books) for order, (cls, buy, units, k) in enumerate(rows)]
    frame = pl.DataFrame(data, orient="row", schema={
        "run": pl.UInt32, "map_order": pl.Int64, "asset_class": pl.String, "buy": pl.Boolean, "weight": WEIGHT,
        "single_position_max_weight": WEIGHT,
    }).with_row_index("slot")
    stored = frame["weight"].to_list()  # the weights as the frame holds them (28 decimals)
    rows, roles = _class_cap_rows_in_28_digits(f28.from_dec(frame, "weight", "_w_f"))
    got = rows.select(f28.to_d28("_w_f")).to_series().to_list()
    at = 0
    for run, (cap, members) in enumerate(books):
        expected, named = _class_cap_28([(cls, buy, w) for (cls, buy, _, _), w in zip(members, stored[at:at + len(members)])], D(cap))
        at_28_decimals = decimal.Context(prec=60).quantize  # a recipient can end above 1: 29+ digits
        assert got[at:at + len(members)] == [at_28_decimals(w, D(1).scaleb(-28)) for w in expected], run
        mine = roles.filter(pl.col("run") == run)
        assert {(slot - at, role) for slot, role in mine.select("slot", "_role").iter_rows()} == named, run
        at += len(members)


def test_a_failed_solve_is_the_blocked_runs_reason_with_its_hints(scenario):
    """A SOLVER run with no feasible weights (two instruments capped at 0.1 while the cash
    band asks 70% invested) is blocked by the reference's target stage: the runs table
    names its failure code and hints, and the JSON warnings keep them once."""
    s = scenario(cash=[("USD", "10000")], prices=[("A", "100", "USD"), ("B", "100", "USD")],
                 shelf=[("A", "APPROVED"), ("B", "APPROVED")], model=[("A", "0.5"), ("B", "0.5")],
                 target_method="SOLVER", single_position_max_weight="0.1", cash_band_max_weight="0.3")
    r = s.run_row()
    assert (r["status"], r["exit_path"], r["block_reason"]) == ("BLOCKED", "E1", "INFEASIBLE_INFEASIBLE")
    assert r["block_detail"] == "no target weights meet the model's bounds, the cash band and the caps (INFEASIBILITY_HINT_SINGLE_POSITION_CAPACITY)"
    assert s.warnings() == ["INFEASIBLE_INFEASIBLE", "INFEASIBILITY_HINT_SINGLE_POSITION_CAPACITY"]
