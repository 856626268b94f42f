"""dpm_vec's own input checks (spec §9.1 departures; RFC-0001 skew and staleness)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)


def _faults(s):
    faults, stale = s.checks
    code = [c for c in faults.columns if c != "run"][0]  # the fault-code column
    return dict(zip(faults["run"].to_list(), faults[code].to_list())), stale


def _base(scenario, **kw):
    kw.setdefault("cash", [("USD", "1000")])
    kw.setdefault("prices", [("A", "100", "USD")])
    kw.setdefault("shelf", [("A", "APPROVED")])
    kw.setdefault("model", [("A", "0.5")])
    return scenario(**kw)


def test_clean_book_has_no_faults(scenario):
    faults, stale = _faults(_base(scenario))
    assert faults == {} and stale.height == 0


def test_negative_quantity_blocks_that_run(scenario):
    s = _base(scenario, positions=[("A", "-1")])
    faults, _ = _faults(s)
    assert faults == {0: "NEGATIVE_QUANTITY"}
    r = s.run_row()
    assert (r["status"], r["exit_path"], r["block_reason"]) == ("BLOCKED", "E1", "NEGATIVE_QUANTITY")
    assert s.result.intents.height == 0


def test_zero_price_of_model_or_held_instrument(scenario):
    s = _base(scenario, prices=[("A", "0", "USD"), ("H", "0", "USD"), ("UNUSED", "0", "USD")])
    assert _faults(s)[0] == {0: "NON_POSITIVE_PRICE"}
    s2 = _base(scenario, prices=[("A", "100", "USD"), ("UNUSED", "0", "USD")])
    assert _faults(s2)[0] == {}  # a zero price nobody needs is harmless


def test_snapshot_skew(scenario):
    def run(minutes, **policy):
        return _base(scenario, portfolio_as_of=T0, market_as_of=T0 + timedelta(minutes=minutes), **policy)

    # off by default: the reference ignores as_of, so any skew runs as it would there
    assert _faults(run(60 * 24 * 365))[0] == {}
    assert _faults(run(15, max_skew_minutes=15))[0] == {}  # the limit itself is allowed
    assert _faults(run(16, max_skew_minutes=15))[0] == {0: "SNAPSHOT_SKEW"}
    assert _faults(run(-16, max_skew_minutes=15))[0] == {0: "SNAPSHOT_SKEW"}
    assert _faults(run(16, max_skew_minutes=30))[0] == {}


def test_base_currency_in_the_fx_rates(scenario):
    """RFC Step 1 under require_base_currency_fx: a pair naming the base currency on
    either side passes; none (or only a malformed "A/B/C" pair) blocks the run at E1, and
    after a skew (Step 1's order). Off by default: the reference has no such check."""
    def run(fx, **policy):
        return _base(scenario, base="SGD", fx=fx, **policy)

    assert _faults(run([]))[0] == {}
    assert _faults(run([("USD/SGD", "1.35")], require_base_currency_fx=True))[0] == {}
    assert _faults(run([("SGD/USD", "0.74")], require_base_currency_fx=True))[0] == {}
    assert _faults(run([("USD/EUR", "0.9"), ("USD/SGD/X", "1")], require_base_currency_fx=True))[0] == {0: "BASE_CURRENCY_FX_MISSING"}
    blocked = run([], require_base_currency_fx=True)
    assert (blocked.run_row()["status"], blocked.run_row()["exit_path"]) == ("BLOCKED", "E1")
    skewed = _base(scenario, base="SGD", require_base_currency_fx=True, max_skew_minutes=15,
                   portfolio_as_of=T0, market_as_of=T0 + timedelta(minutes=16))
    assert _faults(skewed)[0] == {0: "SNAPSHOT_SKEW"}


def test_no_timestamps_no_time_checks(scenario):
    s = _base(
        scenario,
        prices=[{"instrument_id": "A", "price": "100", "currency": "USD", "as_of": T0 - timedelta(days=30)}],
        max_staleness_minutes=1,
    )
    assert _faults(s)[0] == {}


def _stale(scenario, action, **kw):
    return _base(
        scenario,
        market_as_of=T0,
        positions=[("H", "5")],
        prices=[
            {"instrument_id": "A", "price": "100", "currency": "USD", "as_of": T0 - timedelta(minutes=61)},
            {"instrument_id": "H", "price": "100", "currency": "USD", "as_of": T0 - timedelta(minutes=61)},
            {"instrument_id": "F", "price": "100", "currency": "USD", "as_of": T0 - timedelta(minutes=60)},
        ],
        shelf=[("A", "APPROVED"), ("H", "APPROVED"), ("F", "APPROVED")],
        model=[("A", "0.3"), ("F", "0.3")],
        max_staleness_minutes=60,
        stale_price_action=action,
        **kw,
    )


def test_stale_price_blocks(scenario):
    s = _stale(scenario, "BLOCK")
    faults, stale = _faults(s)
    assert faults == {0: "PRICE_STALE"} and stale.height == 0
    assert s.run_row()["exit_path"] == "E1"


def test_stale_price_excluded_and_held_locked(scenario):
    s = _stale(scenario, "EXCLUDE")
    faults, stale = _faults(s)
    assert faults == {}
    assert sorted(stale["instrument_id"].to_list()) == ["A", "H"]  # F at exactly 60 min is fresh
    assert s.excluded() == [("A", "PRICE_STALE"), ("H", "PRICE_STALE")]
    wm = s.universe.weight_map
    assert wm.filter(pl.col("instrument_id") == "H")["kind"].to_list() == ["LOCKED"]
    assert "A" not in wm["instrument_id"].to_list()


def test_missing_price_excluded_under_exclude_and_no_finding(scenario):
    """RFC Step 2's EXCLUDE covers a missing price as well as a stale one: the unpriced
    model target and holding are excluded as PRICE_MISSING (the holding locked), without a
    staleness limit, and the run is no data-quality block; BLOCK leaves them to the gate."""
    def run(action):
        return _base(scenario, positions=[("H", "5")], shelf=[("A", "APPROVED"), ("N", "APPROVED"), ("H", "APPROVED")],
                     model=[("A", "0.3"), ("N", "0.3")], stale_price_action=action)

    s = run("EXCLUDE")
    faults, excluded = _faults(s)
    assert faults == {}
    assert sorted(excluded.select("instrument_id", "reason").rows()) == [("H", "PRICE_MISSING"), ("N", "PRICE_MISSING")]
    assert s.excluded() == [("N", "PRICE_MISSING"), ("H", "PRICE_MISSING")]
    assert s.universe.weight_map.filter(pl.col("instrument_id") == "H")["kind"].to_list() == ["LOCKED"]
    assert s.run_row()["dq_count"] == 0 and s.run_row()["status"] != "BLOCKED"
    blocked = run("BLOCK")
    assert _faults(blocked)[1].height == 0 and blocked.excluded() == []
    assert (blocked.run_row()["status"], blocked.run_row()["n_price_missing"]) == ("BLOCKED", 1)


def test_each_fault_has_a_block_detail_naming_what_failed(scenario):
    """The runs table's block_detail for dpm_vec's own checks: the instruments, times and
    limits each fault is about, so a sweep's reader need not look them up."""
    def detail(s):
        return s.run_row()["block_detail"]

    assert detail(_base(scenario, positions=[("A", "-1"), ("H", "2"), ("G", "-3")],
                        prices=[("A", "100", "USD"), ("H", "1", "USD"), ("G", "1", "USD")])) == "held quantity below zero: A, G"
    assert detail(_base(scenario, positions=[("H", "1")], prices=[("A", "0", "USD"), ("H", "0", "USD")])) == \
        "price at or below zero: H, A"  # holdings first, then model targets
    skewed = _base(scenario, portfolio_as_of=T0, market_as_of=T0 + timedelta(minutes=15, seconds=30), max_skew_minutes=15)
    assert detail(skewed) == ("portfolio as_of 2026-01-05T12:00:00Z and market as_of 2026-01-05T12:15:30Z are 15.5 minutes apart, "
                              "more than max_skew_minutes 15")
    assert detail(_base(scenario, base="SGD", fx=[("USD/EUR", "0.9")], require_base_currency_fx=True)) == \
        "no FX rate of the market data quotes the base currency SGD"
    assert detail(_stale(scenario, "BLOCK")) == "prices more than 60 minutes (max_staleness_minutes) older than 2026-01-05T12:00:00Z: A, H"
    assert detail(_base(scenario)) is None


def test_faults_isolated_between_runs(scenario):
    s = _base(
        scenario,
        runs=[dict(portfolio_as_of=T0, market_as_of=T0 + timedelta(hours=1), max_skew_minutes=15), dict(), dict(max_skew_minutes=120,
              portfolio_as_of=T0, market_as_of=T0 + timedelta(hours=1))],
    )
    assert _faults(s)[0] == {0: "SNAPSHOT_SKEW"}
    assert [s.run_row(i)["status"] for i in range(3)] == ["BLOCKED", "READY", "READY"]
