"""Universe construction (spec §6.3): weight map, exclusions and locking rules."""
from __future__ import annotations

import decimal
from decimal import Decimal as D

import polars as pl

from dpm_vec import dec28
from dpm_vec.stages.universe import base_value_f28, exact_cash_bucket


def _map(s, run=0):
    m = s.universe.weight_map.filter(pl.col("run") == run).sort("map_order")
    return {i: (k, w) for i, k, w in zip(m["instrument_id"], m["kind"], m["weight"])}


def _eligible(s, which, run=0):
    e = s.universe.eligible.filter((pl.col("run") == run) & (pl.col("list") == which)).sort("list_order")
    return e["instrument_id"].to_list()


def test_held_suspended_model_target_excluded_twice_and_locked(scenario):
    """Golden scenario_307: SHELF_STATUS_SUSPENDED then LOCKED_DUE_TO_SUSPENDED; held at 0.5."""
    s = scenario(
        positions=[("SUS", "50")],
        cash=[("USD", "5000")],
        prices=[("SUS", "100", "USD"), ("OK", "100", "USD")],
        shelf=[("SUS", "SUSPENDED"), ("OK", "APPROVED")],
        model=[("SUS", "0.3"), ("OK", "0.7")],
    )
    assert s.excluded() == [("SUS", "SHELF_STATUS_SUSPENDED"), ("SUS", "LOCKED_DUE_TO_SUSPENDED")]
    assert _map(s)["SUS"] == ("LOCKED", D("0.5"))
    assert s.tags()["SUS"] == ["REDISTRIBUTED_RECIPIENT"]  # locked above its model weight
    assert _eligible(s, "buy") == ["OK"]
    assert _eligible(s, "sell") == ["OK"]


def test_held_restricted_non_model_locked_even_with_allow_restricted(scenario):
    s = scenario(
        positions=[("R", "20")],
        cash=[("USD", "8000")],
        prices=[("R", "100", "USD"), ("A", "100", "USD")],
        shelf=[("R", "RESTRICTED"), ("A", "APPROVED")],
        model=[("A", "0.5")],
        allow_restricted=True,
    )
    assert s.excluded() == [("R", "LOCKED_DUE_TO_RESTRICTED")]
    assert _map(s)["R"] == ("LOCKED", D("0.2"))


def test_restricted_model_target_depends_on_allow_restricted(scenario):
    common = dict(
        cash=[("USD", "1000")],
        prices=[("R", "100", "USD")],
        shelf=[("R", "RESTRICTED")],
        model=[("R", "0.4")],
    )
    s = scenario(runs=[dict(allow_restricted=False), dict(allow_restricted=True)], **common)
    assert s.excluded(0) == [("R", "SHELF_STATUS_RESTRICTED")]
    assert "R" not in _map(s, 0)
    assert s.excluded(1) == []
    assert _map(s, 1)["R"] == ("BUYABLE", D("0.4"))
    assert _eligible(s, "buy", 1) == ["R"]


def test_held_without_shelf_is_locked_without_data_quality(scenario):
    s = scenario(
        positions=[("NOSHELF", "10")],
        cash=[("USD", "9000")],
        prices=[("NOSHELF", "100", "USD"), ("A", "100", "USD")],
        shelf=[("A", "APPROVED")],
        model=[("A", "0.5")],
    )
    assert s.excluded() == [("NOSHELF", "LOCKED_DUE_TO_MISSING_SHELF")]
    assert _map(s)["NOSHELF"] == ("LOCKED", D("0.1"))
    assert s.universe.dq.height == 0


def test_model_target_without_shelf_is_shelf_missing(scenario):
    s = scenario(
        cash=[("USD", "1000")],
        prices=[("X", "100", "USD"), ("A", "100", "USD")],
        shelf=[("A", "APPROVED")],
        model=[("X", "0.5"), ("A", "0.5")],
    )
    assert s.dq_items(s.universe.dq, "shelf_missing") == ["X"]
    assert "X" not in _map(s)
    assert s.excluded() == []
    # DQ gate #1 blocks the run whatever the options say (§6.8)
    assert s.run_row()["exit_path"] == "E1"
    assert s.run_row()["status"] == "BLOCKED"


def test_missing_shelf_action_exclude_leaves_unshelved_model_targets_out(scenario):
    """RFC Appendix A's SHELF_ENTRY_MISSING: under EXCLUDE an unshelved model target is
    excluded, not a finding, and one that is held is also locked; BLOCK (the default) is
    the reference's shelf_missing finding, run by run in one pass."""
    common = dict(
        positions=[("HELD_X", "10")],
        cash=[("USD", "9000")],
        prices=[("X", "100", "USD"), ("HELD_X", "100", "USD"), ("A", "100", "USD")],
        shelf=[("A", "APPROVED")],
        model=[("X", "0.3"), ("A", "0.5"), ("HELD_X", "0.2")],
    )
    s = scenario(runs=[dict(missing_shelf_action="BLOCK"), dict(missing_shelf_action="EXCLUDE")], **common)
    assert s.dq_items(s.universe.dq, "shelf_missing", run=0) == ["X", "HELD_X"]
    assert s.excluded(0) == [("HELD_X", "LOCKED_DUE_TO_MISSING_SHELF")]
    assert s.run_row(0)["status"] == "BLOCKED"
    assert s.universe.dq.filter(pl.col("run") == 1).height == 0
    assert s.excluded(1) == [("X", "SHELF_ENTRY_MISSING"), ("HELD_X", "SHELF_ENTRY_MISSING"),
                             ("HELD_X", "LOCKED_DUE_TO_MISSING_SHELF")]
    assert "X" not in _map(s, 1) and _map(s, 1)["HELD_X"] == ("LOCKED", D("0.1"))
    assert _eligible(s, "buy", 1) == ["A"]
    assert s.run_row(1)["status"] == "READY"


def test_approved_and_sell_only_off_model_holdings_are_liquidated(scenario):
    s = scenario(
        positions=[("APP", "10"), ("SO", "10"), ("ZERO", "0")],
        cash=[("USD", "8000")],
        prices=[(i, "100", "USD") for i in ("APP", "SO", "ZERO", "A")],
        shelf=[("APP", "APPROVED"), ("SO", "SELL_ONLY"), ("ZERO", "BANNED"), ("A", "APPROVED")],
        model=[("A", "1.0")],
    )
    m = _map(s)
    assert m["APP"] == ("LIQUIDATION", D(0))
    assert m["SO"] == ("LIQUIDATION", D(0))
    assert "ZERO" not in m  # zero-quantity holdings are not in loop 2
    assert s.excluded() == []
    assert _eligible(s, "sell") == ["A", "APP", "SO"]
    assert _eligible(s, "buy") == ["A"]
    assert s.tags()["APP"] == ["IMPLICIT_SELL_TO_ZERO"]


def test_sell_only_model_target_both_excluded_and_sell_eligible(scenario):
    s = scenario(
        positions=[("BAD", "100")],
        cash=[("USD", "0")],
        prices=[("BAD", "10", "USD"), ("GOOD", "1", "USD")],
        shelf=[("BAD", "SELL_ONLY"), ("GOOD", "APPROVED")],
        model=[("BAD", "0.5"), ("GOOD", "0.5")],
    )
    assert s.excluded() == [("BAD", "SHELF_STATUS_SELL_ONLY")]
    assert _map(s)["BAD"] == ("SELL_ONLY", D(0))
    assert s.universe.sell_only_excess["sell_only_excess"].to_list() == [D("0.5")]
    assert _eligible(s, "sell") == ["BAD", "GOOD"]
    assert _eligible(s, "buy") == ["GOOD"]
    assert s.weights() == {"BAD": D(0), "GOOD": D("1.0")}


def test_held_banned_liquidated_only_in_runs_that_ask(scenario):
    """RFC held_banned_action LIQUIDATE (run 1): held BANNED instruments, a model target and
    an off-model one, are sold to 0 like an off-model APPROVED holding; the model target is
    still excluded once as SHELF_STATUS_BANNED, and a held SUSPENDED one stays locked. The
    reference (run 0) locks every one of them."""
    s = scenario(
        runs=[dict(), dict(held_banned_action="LIQUIDATE")],
        positions=[("BAN_M", "10"), ("BAN_X", "10"), ("SUS", "10")],
        cash=[("USD", "7000")],
        prices=[(i, "100", "USD") for i in ("BAN_M", "BAN_X", "SUS", "A")],
        shelf=[("BAN_M", "BANNED"), ("BAN_X", "BANNED"), ("SUS", "SUSPENDED"), ("A", "APPROVED")],
        model=[("BAN_M", "0.2"), ("A", "0.5")],
    )
    assert _map(s, 0)["BAN_M"] == ("LOCKED", D("0.1")) and _map(s, 0)["BAN_X"] == ("LOCKED", D("0.1"))
    assert s.excluded(0) == [("BAN_M", "SHELF_STATUS_BANNED"), ("BAN_M", "LOCKED_DUE_TO_BANNED"),
                             ("BAN_X", "LOCKED_DUE_TO_BANNED"), ("SUS", "LOCKED_DUE_TO_SUSPENDED")]
    m = _map(s, 1)
    assert (m["BAN_M"], m["BAN_X"], m["SUS"]) == (("LIQUIDATION", D(0)), ("LIQUIDATION", D(0)), ("LOCKED", D("0.1")))
    assert s.excluded(1) == [("BAN_M", "SHELF_STATUS_BANNED"), ("SUS", "LOCKED_DUE_TO_SUSPENDED")]
    assert _eligible(s, "sell", 1) == ["A", "BAN_M", "BAN_X"]


def test_held_restricted_freed_only_with_allow_restricted_and_the_rfc_option(scenario):
    """RFC Step 2 over holdings: a held RESTRICTED instrument outside the model is sold to 0
    (LIQUIDATION, in eligible_for_sell) only where allow_restricted and
    allow_restricted_holdings both hold (run 2); the reference locks it even with
    allow_restricted (run 1), and the option alone frees nothing (run 0). A RESTRICTED
    model target is buyable under allow_restricted either way."""
    s = scenario(
        runs=[dict(allow_restricted_holdings=True), dict(allow_restricted=True),
              dict(allow_restricted=True, allow_restricted_holdings=True)],
        positions=[("RES_X", "10")],
        cash=[("USD", "9000")],
        prices=[(i, "100", "USD") for i in ("RES_X", "RES_M")],
        shelf=[("RES_X", "RESTRICTED"), ("RES_M", "RESTRICTED")],
        model=[("RES_M", "0.5")],
    )
    for run in (0, 1):
        assert _map(s, run)["RES_X"] == ("LOCKED", D("0.1"))
        assert ("RES_X", "LOCKED_DUE_TO_RESTRICTED") in s.excluded(run)
    assert _map(s, 2)["RES_X"] == ("LIQUIDATION", D(0)) and s.excluded(2) == []
    assert _eligible(s, "sell", 2) == ["RES_M", "RES_X"] and _eligible(s, "buy", 2) == ["RES_M"]
    assert "RES_M" not in _map(s, 0) and _map(s, 1)["RES_M"][0] == "BUYABLE"


def test_banned_model_target_not_held_is_excluded_only_once(scenario):
    s = scenario(
        cash=[("USD", "1000")],
        prices=[("B", "100", "USD")],
        shelf=[("B", "BANNED")],
        model=[("B", "0.5")],
    )
    assert s.excluded() == [("B", "SHELF_STATUS_BANNED")]
    assert _map(s) == {}
    assert s.weights() == {"B": D(0)}  # excluded model targets stay in the trace at 0


def test_exclusion_order_model_loop_then_positions(scenario):
    s = scenario(
        positions=[("H2", "1"), ("M1", "1"), ("H1", "1")],
        cash=[("USD", "100")],
        prices=[(i, "10", "USD") for i in ("H1", "H2", "M1", "M2")],
        shelf=[("H1", "BANNED"), ("H2", "SUSPENDED"), ("M1", "BANNED"), ("M2", "SUSPENDED")],
        model=[("M2", "0.1"), ("M1", "0.1")],
    )
    assert s.excluded() == [
        ("M2", "SHELF_STATUS_SUSPENDED"),
        ("M1", "SHELF_STATUS_BANNED"),
        ("H2", "LOCKED_DUE_TO_SUSPENDED"),
        ("M1", "LOCKED_DUE_TO_BANNED"),
        ("H1", "LOCKED_DUE_TO_BANNED"),
    ]


def test_lone_locked_holding_weighs_exactly_one_through_an_inverse_quote(scenario):
    """§6.2/§6.3 in 28 digits: value_base / tv is exactly 1 when the locked holding is all
    the value (tv summed as the reference sums it), so step 3 leaves no room and the
    single-position cap has no candidate. A Decimal(38, 20) tv put the weight just below
    1, and the cap handed the whole excess to the dust left on the buyable target."""
    s = scenario(
        base="GBP",
        positions=[("LOCK", "209")],
        cash=[("USD", "0")],
        prices=[("LOCK", "297.84", "USD"), ("A", "212.39", "USD")],
        fx=[("GBP/USD", "1.299488")],  # USD → GBP only through the inverse
        shelf=[("LOCK", "SUSPENDED"), ("A", "APPROVED")],
        model=[("A", "1.0")],
        single_position_max_weight="0.3",
    )
    assert _map(s)["LOCK"] == ("LOCKED", D(1))
    assert s.weights() == {"A": D(0), "LOCK": D("0.3")}
    assert s.intents.filter(pl.col("instrument_id") == "A").height == 0


def test_locked_weight_below_0_1_keeps_every_digit_for_sizing(scenario):
    """A locked weight below 0.1 has more than 28 decimals in the reference. Sizing uses
    market_value (spec §8), so a locked holding marked at 0.00 is bought back to its
    weight: tv × w / rate is exactly 6.56 USD, one unit, only with every digit of w (the
    Decimal(38, 28) copy lands just below and floors to 0)."""
    s = scenario(
        base="SGD",
        positions=[("I10", "5000"), ("I8", "1", "0.00", "USD")],
        prices=[("I8", "6.56", "USD"), ("I10", "999.99", "USD")],
        fx=[("USD/SGD", "0.826908")],
    )
    exact = s.universe.exact.weights.join(s.universe.weight_map.select("slot", "instrument_id"), on="slot")
    assert sorted(exact["instrument_id"]) == ["I10", "I8"]
    buys = s.intents.filter(pl.col("instrument_id") == "I8")
    assert buys["side"].to_list() == ["BUY"] and buys["quantity"].to_list() == [D(1)]


def test_base_value_f28_values_a_28_digit_quantity_from_its_digits(scenario):
    """An after-state position that a tax-limited sell left with 28 significant digits
    (quantity_f28) is worth quantity × price × rate in the reference's arithmetic, not its
    20-decimal value_instr × rate: 83.33333333333333333333333333 × 100.00 × 1.1 is
    9166.666666666666666666666666, where the 20-decimal value gives …6667."""
    s = scenario(base="GBP", positions=[("I0", "100")], cash=[("GBP", "0")], prices=[("I0", "100.00", "USD")],
                 fx=[("USD/GBP", "1.1")], shelf=[("I0", "APPROVED", "EQUITY")])
    quantity = D("83.33333333333333333333333333")
    held = s.before.positions.join(s.runs.select("run", "base_currency"), on="run").with_columns(
        (pl.col("price") * pl.lit(quantity, dtype=pl.Decimal(38, 20))).alias("value_instr"),
    )
    exact = dec28.from_dec(pl.DataFrame({"q": [quantity]}, schema={"q": dec28.D28}), "q", "quantity_f28")["quantity_f28"]
    with_digits = held.with_columns(exact.alias("quantity_f28"))
    with decimal.localcontext(decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)):
        reference = quantity * D("100.00") * D("1.1")
        from_20_decimals = (quantity.quantize(D("1e-20")) * D("100.00")) * D("1.1")
    assert reference != from_20_decimals  # the case tells the two apart

    def value(frame):
        v = base_value_f28(s.market, frame)["_base_f"][0]
        return v["z"].scaleb(v["k"])

    assert value(with_digits) == reference
    assert value(held.drop("quantity_f28").with_columns(pl.lit(None, dtype=dec28.F28).alias("quantity_f28"))) == from_20_decimals


def test_exact_cash_bucket_adds_literal_cash_positions_in_position_order_then_the_cash():
    """§6.2's shared CASH bucket in 28 digits: the literal-CASH positions summed in
    position order (not frame order), then Σ cash added once, as the oracle adds
    by_class["CASH"] + cash_total; other asset classes stay out. Each run's numbers are
    chosen so that another order moves the 28th digit."""
    tiny = D("4E-28")
    held = pl.DataFrame({
        "run": [0, 0, 0, 0, 1, 2],
        "pos_seq": [2, 1, 0, 3, 0, 0],
        "asset_class": ["CASH", "CASH", "CASH", "EQUITY", "CASH", "EQUITY"],
        "v": [tiny, tiny, D(1), D(5), D(1), D(7)],
    }, schema={"run": pl.UInt32, "pos_seq": pl.UInt32, "asset_class": pl.String, "v": dec28.D28})
    held = dec28.from_dec(held, "v", "_base_f")
    tv = dec28.from_dec(pl.DataFrame({"run": [0, 1, 2], "c": [D(0), 2 * tiny, D("3.5")]},
                                     schema={"run": pl.UInt32, "c": dec28.D28}), "c", "_cash_f")
    bucket = exact_cash_bucket(held, tv).sort("run")
    got = [v["z"].scaleb(v["k"]) for v in bucket["_bucket_f"]]
    with decimal.localcontext(decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)):
        in_position_order = (D(1) + tiny) + tiny
        in_frame_order = (tiny + tiny) + D(1)
        cash_added_once = D(1) + 2 * tiny
        cash_added_row_by_row = (D(1) + tiny) + tiny
    assert in_position_order != in_frame_order and cash_added_once != cash_added_row_by_row
    assert got == [in_position_order, cash_added_once, D("3.5")]


def test_a_locked_positions_final_value_is_its_held_value_to_every_digit():
    """A held BANNED position (locked at its weight) has final_value = tv × (value / tv):
    50 exactly, as the reference's 28-digit product prints it. Only LOCKED slots take the
    exact path; sending other held positions through it printed 49.99999999999999999801
    (below the goldens' cent tolerance, so only an exact check sees it; mutation audit)."""
    from dpm_vec.oracle import simulate as oracle_simulate
    from dpm_vec.simulate import simulate_many

    request = {
        "portfolio_snapshot": {"portfolio_id": "pf_A", "base_currency": "SGD",
                               "positions": [{"instrument_id": "I1", "quantity": "2107", "market_value": {"amount": "4214", "currency": "SGD"}},
                                             {"instrument_id": "I2", "quantity": "50"}],
                               "cash_balances": [{"currency": "SGD", "amount": "0"}, {"currency": "USD", "amount": "120000"}]},
        "market_data_snapshot": {"prices": [{"instrument_id": "I0", "price": "20", "currency": "SGD"},
                                            {"instrument_id": "I1", "price": "2", "currency": "USD"},
                                            {"instrument_id": "I2", "price": "1", "currency": "SGD"}],
                                 "fx_rates": [{"pair": "SGD/USD", "rate": "12"}]},
        "model_portfolio": {"targets": [{"instrument_id": "I0", "weight": "0.25"}, {"instrument_id": "I2", "weight": "0.5"}]},
        "shelf_entries": [{"instrument_id": "I0", "status": "RESTRICTED"}, {"instrument_id": "I1", "status": "APPROVED"},
                          {"instrument_id": "I2", "status": "BANNED"}],
        "options": {"fx_buffer_pct": "0", "max_turnover_pct": "0.15", "cash_band_min_weight": "0.1", "cash_band_max_weight": "1"},
    }
    [result] = simulate_many([request])
    expected = oracle_simulate(request)

    def final_values(r):
        return {t["instrument_id"]: D(t["final_value"]["amount"]) for t in r["target"]["targets"]}

    assert result["status"] == expected["status"] == "READY"
    assert final_values(result) == final_values(expected) == {"I0": 0, "I1": 0, "I2": 50}
