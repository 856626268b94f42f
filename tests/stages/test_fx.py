"""FX rate look-up (spec §6.1), FX funding and sweep (§6.13), dependencies and order (§6.14)."""
from __future__ import annotations

from decimal import Decimal as D

from tests.stages.conftest import GOLDEN_03_FX_FUNDING, SINGLE_STOCK_WITH_ZERO_ALTERNATIVE  # noqa: F401
import polars as pl



# ---- §6.1 rate(A→B) ------------------------------------------------------------------------------


def _rates(scenario, fx, pairs):
    s = scenario(fx=fx)
    frame = pl.DataFrame({
        "run": pl.Series([0] * len(pairs), dtype=pl.UInt32),
        "a": [p[0] for p in pairs],
        "b": [p[1] for p in pairs],
    })
    out = s.market.with_rate(frame, "a", "b", "r")
    f28 = s.market.with_rate_f28(frame, "a", "b", "r28")
    # F28 {z, k} = z × 10^k, back to an exact Python Decimal
    r28 = [None if v is None else v["z"].scaleb(v["k"]) for v in f28["r28"].to_list()]
    return out["r"].to_list(), r28


def test_rate_same_direct_inverse_missing(scenario):
    fx = [("EUR/USD", "1.1"), ("USD/JPY", "150"), ("GBP/USD", "0"), ("USD/GBP", "0.8"), ("CHF/USD", "0"), ("USD/CAD", "0")]
    pairs = [("USD", "USD"), ("EUR", "USD"), ("JPY", "USD"), ("GBP", "USD"), ("CHF", "USD"), ("CAD", "USD"), ("EUR", "JPY")]
    r, r28 = _rates(scenario, fx, pairs)
    assert r[0] == D("1.0")  # same currency
    assert r[1] == D("1.1")  # direct
    assert abs(r[2] - D(1) / D(150)) < D("1e-20")  # inverse
    assert r28[2] == D("0.006666666666666666666666666667")  # 28-digit rounding of 1.0/150
    assert r[3] == D("1.25") and r28[3] == D("1.25")
    assert r28[1] == D("1.1") and r28[0] == D(1)  # zero direct rate counts as missing → inverse
    assert r[4] is None  # only a zero direct rate
    assert r[5] is None  # only a zero inverse rate
    assert r[6] is None and r28[6] is None  # no triangulation through USD


def test_rate_of_currencies_the_snapshot_does_not_quote(scenario):
    """Rates are gathered from a table of the quoted currencies' pairs by Enum code; a
    currency outside it (none of the snapshot's pairs names it) takes the join on the
    currency texts instead: equal currencies rate 1.0, others and nulls have no rate.
    Frames with only quoted currencies and frames with an unquoted one agree."""
    fx = [("EUR/USD", "1.1"), ("USD/JPY", "150")]
    quoted_only = [("USD", "EUR"), ("JPY", "EUR"), ("EUR", "EUR"), ("USD", None)]
    r, r28 = _rates(scenario, fx, quoted_only)
    assert abs(r[0] - D(1) / D("1.1")) < D("1e-20")  # inverse of EUR/USD
    assert r[1] is None  # no JPY/EUR pair, no triangulation
    assert r[2] == D("1.0") and r[3] is None and r28[3] is None
    mixed = [*quoted_only, ("SEK", "SEK"), ("SEK", "USD"), ("USD", "SEK")]
    m, m28 = _rates(scenario, fx, mixed)
    assert m[:4] == r and m28[:4] == r28
    assert m[4] == D("1.0") and m28[4] == D(1)
    assert m[5:] == [None, None] and m28[5:] == [None, None]


def test_rate_first_pair_wins(scenario):
    r, _ = _rates(scenario, [("EUR/USD", "1.1"), ("EUR/USD", "1.2")], [("EUR", "USD")])
    assert r == [D("1.1")]


# ---- §6.13 FX funding and sweep ----------------------------------------------------------------------


def _fx_rows(s, run=0):
    return s.intents.filter((pl.col("run") == run) & (pl.col("intent_type") == "FX_SPOT")).to_dicts()


def _order(s, run=0):
    i = s.intents.filter(pl.col("run") == run).sort("exec_order")
    return i["intent_id"].to_list()


def test_funding_golden_03(scenario):
    """USD −3700 → buy 3737.000 USD (1% buffer), sell 3737 × 1.35 = 5044.95 SGD; id oi_fx_2."""
    s = scenario(
        **GOLDEN_03_FX_FUNDING,
    )
    (fx,) = _fx_rows(s)
    assert fx["intent_id"] == "oi_fx_2"
    assert (fx["pair"], fx["rationale_code"]) == ("USD/SGD", "FUNDING")
    assert (fx["buy_currency"], fx["buy_amount"]) == ("USD", D("3737"))
    assert (fx["sell_currency"], fx["sell_amount_estimated"]) == ("SGD", D("5044.95"))
    assert _order(s) == ["oi_fx_2", "oi_1"]
    buy = s.intents.filter(pl.col("intent_id") == "oi_1").to_dicts()[0]
    assert buy["dependencies"] == ["oi_fx_2"]


def test_partial_funding_golden_304(scenario):
    """Existing USD 1000 nets against the 4200 buy → buy 3232 USD, sell 4363.2 SGD."""
    s = scenario(
        base="SGD",
        cash=[("SGD", "10000.0"), ("USD", "1000.0")],
        prices=[("US_STK", "100.0", "USD")],
        fx=[("USD/SGD", "1.35")],
        shelf=[("US_STK", "APPROVED")],
        model=[("US_STK", "0.5")],
    )
    (fx,) = _fx_rows(s)
    assert (fx["buy_amount"], fx["sell_amount_estimated"]) == (D("3232"), D("4363.2"))
    sec = s.intents.filter(pl.col("intent_type") == "SECURITY_TRADE").to_dicts()[0]
    assert (sec["quantity"], sec["notional"], sec["notional_base"]) == (D(42), D("4200"), D("5670"))


def test_idle_foreign_cash_is_swept(scenario):
    """Observed: EUR 100 at 1.1, no trades → SWEEP sell 100 EUR, buy 110 USD, id oi_fx_1."""
    s = scenario(cash=[("USD", "0"), ("EUR", "100")], fx=[("EUR/USD", "1.1")])
    (fx,) = _fx_rows(s)
    assert fx["intent_id"] == "oi_fx_1"
    assert (fx["pair"], fx["rationale_code"]) == ("EUR/USD", "SWEEP")
    assert (fx["sell_currency"], fx["sell_amount_estimated"]) == ("EUR", D("100"))
    assert (fx["buy_currency"], fx["buy_amount"]) == ("USD", D("110"))


def test_sweep_threshold_keeps_a_surplus_at_or_below_it(scenario):
    """RFC Step 5 under fx_sweep_threshold (base currency): EUR 100 at 1.1 is worth 110 USD
    and GBP 200 at 1.25 is worth 250. A threshold of 110 keeps the EUR (110 is not above
    it) and sweeps the GBP whole; the surviving sweep is numbered as the first FX intent,
    and the kept EUR stays in the after-state. No threshold sweeps both (the reference)."""
    common = dict(cash=[("USD", "0"), ("EUR", "100"), ("GBP", "200")], fx=[("EUR/USD", "1.1"), ("GBP/USD", "1.25")])
    s = scenario(runs=[dict(), dict(fx_sweep_threshold="110"), dict(fx_sweep_threshold="250")], **common)
    rows = s.intents.filter(pl.col("intent_type") == "FX_SPOT").sort("run", "exec_order")

    def swept(run):
        return [(f["intent_id"], f["sell_currency"], f["sell_amount_estimated"]) for f in rows.filter(pl.col("run") == run).to_dicts()]
    assert swept(0) == [("oi_fx_1", "EUR", D("100")), ("oi_fx_2", "GBP", D("200"))]
    assert swept(1) == [("oi_fx_1", "GBP", D("200"))]
    assert swept(2) == []
    cash = s.result.cash_after.filter(pl.col("run") == 1)
    assert dict(zip(cash["currency"], cash["amount"])) == {"USD": D("250"), "EUR": D("100"), "GBP": D("0")}


def test_sweep_threshold_tie_over_an_inverse_quote_is_decided_in_28_digits(scenario):
    """EUR 130 over USD/EUR 1.3 is worth 130 × (1 / 1.3) USD: 99.99999999999999999999999999
    in the reference's 28 digits (the inverse rounds down there), so a threshold of 100
    keeps it; the fixed point's 20-decimal inverse rounds up and put it a unit above.
    EUR 130.01 is above the threshold either way and is swept."""
    s = scenario(cash=[("USD", "1000"), ("EUR", "130")], fx=[("USD/EUR", "1.3")], fx_sweep_threshold="100")
    assert s.intents.filter(pl.col("intent_type") == "FX_SPOT").height == 0
    above = scenario(cash=[("USD", "1000"), ("EUR", "130.01")], fx=[("USD/EUR", "1.3")], fx_sweep_threshold="100")
    assert above.intents.filter(pl.col("intent_type") == "FX_SPOT")["rationale_code"].to_list() == ["SWEEP"]


def test_fx_ids_count_every_intent_and_follow_currency_order(scenario):
    """Currencies in cash order, new ones after; k = intents so far + 1; zero balance → none."""
    s = scenario(
        cash=[("USD", "10000"), ("GBP", "0"), ("EUR", "100")],
        prices=[("E1", "10", "EUR"), ("J1", "100", "JPY"), ("U1", "10", "USD")],
        fx=[("EUR/USD", "2"), ("USD/JPY", "100"), ("GBP/USD", "1.25")],
        shelf=[("E1", "APPROVED"), ("J1", "APPROVED"), ("U1", "APPROVED")],
        model=[("U1", "0.1"), ("E1", "0.1"), ("J1", "0.1")],
        fx_buffer_pct="0",
    )
    fx = _fx_rows(s)
    # tv 10200: E1 1020 USD → 510 EUR → 51 units (510 EUR) → EUR 100 − 510 = −410 → FUNDING
    # J1 1020 USD → 102000 JPY → 1020 units → −102000 JPY → FUNDING; GBP 0 → nothing
    assert [(f["intent_id"], f["pair"], f["rationale_code"]) for f in fx] == [
        ("oi_fx_4", "EUR/USD", "FUNDING"),
        ("oi_fx_5", "JPY/USD", "FUNDING"),
    ]
    assert (fx[0]["buy_amount"], fx[0]["sell_amount_estimated"]) == (D("410"), D("820"))
    assert (fx[1]["buy_amount"], fx[1]["sell_amount_estimated"]) == (D("102000"), D("1020"))


def test_fx_id_after_turnover_cap(scenario):
    """Golden-style: turnover keeps 2 of 3 intents → the first FX is oi_fx_3."""
    s = scenario(
        base="SGD",
        cash=[("SGD", "100000")],
        prices=[("A", "100", "SGD"), ("B", "100", "SGD"), ("C", "100", "USD")],
        fx=[("USD/SGD", "1")],
        shelf=[(i, "APPROVED") for i in ("A", "B", "C")],
        model=[("A", "0.10"), ("B", "0.10"), ("C", "0.02")],
        max_turnover_pct="0.15",
    )
    fx = _fx_rows(s)
    assert [f["intent_id"] for f in fx] == ["oi_fx_3"]
    assert _order(s) == ["oi_fx_3", "oi_1", "oi_3"]  # FX group, then buys in ranking order


def test_no_fx_when_no_rate_and_not_blocking(scenario):
    s = scenario(cash=[("USD", "100"), ("XAU", "1")], block_on_missing_fx=False)
    assert _fx_rows(s) == []
    assert s.dq_items(s.fx[1], "fx_missing") == ["XAU/USD"]


# ---- §6.14 dependencies and execution order ------------------------------------------------------------


def test_dependencies_observed_example(scenario):
    """B1, S1, B2, S2, S3 (all USD) → order oi_2, oi_4, oi_5, oi_1, oi_3; both buys depend on oi_5."""
    s = scenario(
        positions=[("S1", "10"), ("S2", "10"), ("S3", "10")],
        cash=[("USD", "7000")],
        prices=[(i, "100", "USD") for i in ("B1", "S1", "B2", "S2", "S3")],
        shelf=[(i, "APPROVED") for i in ("B1", "S1", "B2", "S2", "S3")],
        model=[("B1", "0.1"), ("S1", "0.05"), ("B2", "0.1"), ("S2", "0.05"), ("S3", "0.05")],
    )
    i = s.intents.sort("exec_order")
    assert i["intent_id"].to_list() == ["oi_2", "oi_4", "oi_5", "oi_1", "oi_3"]
    assert i["side"].to_list() == ["SELL", "SELL", "SELL", "BUY", "BUY"]
    deps = dict(zip(i["intent_id"], i["dependencies"].to_list()))
    assert deps == {"oi_2": [], "oi_4": [], "oi_5": [], "oi_1": ["oi_5"], "oi_3": ["oi_5"]}


# a sell and a buy in USD and in SGD (base): the USD buy needs funding
SELLS_AND_BUYS_IN_TWO_CURRENCIES = dict(
    positions=[("USELL", "10"), ("BSELL", "10")],
    cash=[("USD", "0")],
    base="SGD",
    prices=[("USELL", "100", "USD"), ("BSELL", "100", "SGD"), ("UBUY", "100", "USD"), ("BBUY", "100", "SGD")],
    fx=[("USD/SGD", "1")],
    shelf=[(i, "APPROVED") for i in ("USELL", "BSELL", "UBUY", "BBUY")],
    model=[("UBUY", "0.8"), ("BBUY", "0.2")],
)


def test_foreign_buy_depends_on_fx_then_last_sell_base_buy_on_neither(scenario):
    s = scenario(**SELLS_AND_BUYS_IN_TWO_CURRENCIES)
    i = s.intents.sort("exec_order")
    ids = i["intent_id"].to_list()
    deps = dict(zip(ids, i["dependencies"].to_list()))
    types = dict(zip(ids, i["intent_type"].to_list()))
    by_inst = dict(zip(i["instrument_id"].to_list(), ids))
    fx_ids = [k for k, t in types.items() if t == "FX_SPOT"]
    assert len(fx_ids) == 1
    assert deps[by_inst["UBUY"]] == [fx_ids[0], by_inst["USELL"]]
    assert deps[by_inst["BBUY"]] == [by_inst["BSELL"]]  # a base-currency buy never depends on FX
    assert [types[x] for x in ids] == ["SECURITY_TRADE", "SECURITY_TRADE", "FX_SPOT", "SECURITY_TRADE", "SECURITY_TRADE"]


def test_rfc_fx_dependencies_leave_buys_on_their_funding_fx_alone(scenario):
    """RFC Step 5.3 under rfc_fx_dependencies: a BUY depends on its currency's FUNDING FX
    only; the last-SELL dependency is the reference's (run 0). Runs of one pass keep their
    own mode."""
    s = scenario(runs=[dict(), dict(rfc_fx_dependencies=True)], **SELLS_AND_BUYS_IN_TWO_CURRENCIES)

    def deps(run):
        i = s.intents.filter(pl.col("run") == run).sort("exec_order")
        return {(r["instrument_id"] or r["intent_type"]): r["dependencies"] for r in i.to_dicts()}
    reference, rfc = deps(0), deps(1)
    fx_id = s.intents.filter((pl.col("run") == 1) & (pl.col("intent_type") == "FX_SPOT"))["intent_id"].item()
    assert rfc == {"USELL": [], "BSELL": [], "FX_SPOT": [], "UBUY": [fx_id], "BBUY": []}
    assert reference["UBUY"] == [fx_id, "oi_3"] and reference["BBUY"] == ["oi_4"]


def test_last_sell_dependency_follows_turnover_ranking(scenario):
    """§8 item 19: when the turnover cap bites, survivors keep ranking order, which decides
    the execution order and which SELL is 'last' for the buy's dependency."""
    s = scenario(
        positions=[("S_SMALL", "20"), ("S_BIG", "40")],
        cash=[("USD", "4000")],
        prices=[(i, "100", "USD") for i in ("S_SMALL", "S_BIG", "B", "HUGE")],
        shelf=[(i, "APPROVED") for i in ("S_SMALL", "S_BIG", "B", "HUGE")],
        model=[("S_SMALL", "0.1"), ("S_BIG", "0.1"), ("B", "0.15"), ("HUGE", "0.6")],
        max_turnover_pct="0.55",
    )
    # oi_1 S_SMALL sell 1000, oi_2 S_BIG sell 3000, oi_3 B buy 1500, oi_4 HUGE buy 6000;
    # ranking HUGE, S_BIG, B, S_SMALL: HUGE alone exceeds 5500 → dropped, the rest fit
    assert s.turnover[1]["instrument_id"].to_list() == ["HUGE"]
    i = s.intents.sort("exec_order")
    assert i["intent_id"].to_list() == ["oi_2", "oi_1", "oi_3"]
    assert i.filter(pl.col("intent_id") == "oi_3")["dependencies"].to_list() == [["oi_1"]]


def test_fx_runs_isolated(scenario):
    """Two runs over the same frames with different fx buffers get their own amounts."""
    s = scenario(
        runs=[dict(fx_buffer_pct="0.01"), dict(fx_buffer_pct="0.05"), dict(fx_buffer_pct="0")],
        **GOLDEN_03_FX_FUNDING,
    )
    amounts = [_fx_rows(s, r)[0]["buy_amount"] for r in (0, 1, 2)]
    assert amounts == [D("3737"), D("3885"), D("3700")]


def test_dust_of_a_tax_limited_sell_is_swept_as_the_reference_sums_it(scenario):
    """The tax budget leaves a residue that sells 3E-28 units of a GBP holding: the
    notional is 1.4E-25 GBP in the reference's 28 digits but 0 at 20 decimals. The
    reference's projected GBP balance is that dust and it sweeps it into EUR; FX planning
    takes the 28-digit sign for such a balance, so the SWEEP is planned (its amounts are
    0 at 20 decimals), depends on nothing and sits between the sells and the buys."""
    s = scenario(
        base="EUR",
        positions=[("E", "1650"), ("G", "1022", "60742.29", "GBP")],
        prices=[("E", "813.36", "EUR"), ("G", "474.88", "GBP")],
        fx=[("EUR/GBP", "0.818402")],
        shelf=[("E", "APPROVED", "FIXED_INCOME"), ("G", "SELL_ONLY", "FIXED_INCOME")],
        lots=[("E", "L0", "27", "773.74", "EUR", "2025-07-18"), ("E", "L1", "1548", "852.56", "EUR", "2022-06-19"),
              ("E", "L2", "75", "245.85", "EUR", "2021-02-16"), ("G", "L0", "1022", "203.00", "GBP", "2023-06-12")],
        enable_tax_awareness=True,
        max_realized_capital_gains="777.88",
    )
    sell = s.intents.filter(pl.col("instrument_id") == "G").row(0, named=True)
    assert sell["quantity"] == D("3E-28") and sell["notional"] == 0  # 1.43E-25 GBP in 28 digits
    fx = s.intents.filter(pl.col("intent_type") == "FX_SPOT")
    assert fx.select("pair", "rationale_code", "buy_currency", "sell_currency", "buy_amount", "sell_amount_estimated").rows() == [
        ("GBP/EUR", "SWEEP", "EUR", "GBP", D(0), D(0)),
    ]
    assert s.intents["intent_type"].to_list() == ["SECURITY_TRADE", "SECURITY_TRADE", "FX_SPOT"]
    assert fx["dependencies"].to_list() == [[]]
    assert s.run_row()["status"] == "READY"


def test_security_intent_ids_are_oi_and_the_intent_number():
    """Ids gathered from a table of "oi_k" are the text the reference builds per intent,
    for numbers in any order, past 9 and repeated (intents of several runs)."""
    from dpm_vec.stages.fx import _security_intent_ids

    numbers = pl.Series([3, 1, 12, 10, 1, 2], dtype=pl.Int64)
    assert _security_intent_ids(numbers).to_list() == [f"oi_{n}" for n in numbers.to_list()]
    assert _security_intent_ids(numbers.clear()).to_list() == []
