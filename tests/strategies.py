"""Hypothesis strategies for valid reference-contract simulate requests.

The shapes and option mix follow the random goldens in
``shared/goldens/reference-random`` (1-3 currencies and the goldens' four base
currencies, direct/inverse/missing FX pairs including JPY-per-major rates up to 250,
positions with market values and tax lots, every shelf status and asset class, group
constraints, tax and settlement awareness, turnover caps, dust thresholds ...).

Every request is valid for dpm_vec's stricter door (§9.1): no duplicate ids, strictly
positive 2-dp prices, non-negative integer quantities, non-negative FX rates.
Instrument ids come from a small fixed pool (``I0``..``I11``) and portfolio ids from a
small fixed set, so independently drawn requests in one batch share ids on purpose.
"""
from __future__ import annotations

import copy
import json
import random
from datetime import datetime, timedelta, timezone
from decimal import ROUND_DOWN, Context, Decimal
from pathlib import Path

from hypothesis import strategies as st

BASES = ("SGD", "USD", "EUR", "GBP")
FOREIGN = ("USD", "SGD", "EUR", "GBP", "JPY", "CHF")
STATUSES = ("APPROVED", "RESTRICTED", "BANNED", "SUSPENDED", "SELL_ONLY")
SECTORS = ("TECH", "FIN", "HEALTH", "ENERGY")
# the goldens' four, and CASH: a shelf class literally CASH shares the cash bucket (§6.2)
ASSET_CLASSES = ("EQUITY", "FIXED_INCOME", "FUND", "ALTERNATIVE", "CASH")
POOL = tuple(f"I{i}" for i in range(12))
PORTFOLIO_IDS = ("pf_A", "pf_B", "pf_C")


def dec_text(units: int, dp: int) -> str:
    """units / 10**dp as plain decimal text with exactly dp places."""
    return str(Decimal(units).scaleb(-dp))


def money2(draw, lo: int, hi: int) -> str:
    """A 2-dp amount in [lo, hi] (in units of 0.01)."""
    return dec_text(draw(st.integers(lo, hi)), 2)


def weighted(choices: list[tuple[object, int]]):
    """Pick from (value, weight) pairs; shrinks towards the first choice."""
    flat = [v for v, w in choices for _ in range(w)]
    return st.sampled_from(flat)


status_st = weighted([("APPROVED", 12), ("RESTRICTED", 2), ("BANNED", 1), ("SUSPENDED", 1), ("SELL_ONLY", 2)])


@st.composite
def fx_rate_text(draw) -> str:
    kind = draw(weighted([("normal", 20), ("small", 3), ("big", 4), ("zero", 1)]))
    if kind == "big":  # JPY per major, as the goldens quote it (e.g. GBP/JPY 193.852609)
        return dec_text(draw(st.integers(50_000_000, 250_000_000)), 6)
    if kind == "zero":
        return "0"
    if kind == "small":  # JPY-like
        return dec_text(draw(st.integers(1_000, 20_000)), 6)
    return dec_text(draw(st.integers(500_000, 2_000_000)), 6)


@st.composite
def requests(draw, portfolio_id: str | None = None, base: str | None = None) -> dict:
    """One valid simulate request."""
    base = base or draw(st.sampled_from(BASES))
    foreign_pool = [c for c in FOREIGN if c != base]
    n_foreign = draw(weighted([(0, 3), (1, 4), (2, 3)]))
    foreign = draw(st.permutations(foreign_pool))[:n_foreign]
    ccys = [base, *foreign]

    # FX: each foreign currency quoted direct (F/B), inverse (B/F), or (rarely) missing
    fx_rates = []
    for c in foreign:
        how = draw(weighted([("direct", 6), ("inverse", 4), ("missing", 1)]))
        if how == "missing":
            continue
        pair = f"{c}/{base}" if how == "direct" else f"{base}/{c}"
        fx_rates.append({"pair": pair, "rate": draw(fx_rate_text())})
    if draw(st.integers(0, 9)) == 0:  # an irrelevant extra pair
        extra = [c for c in FOREIGN if c not in ccys]
        if extra:
            fx_rates.append({"pair": f"{extra[0]}/{base}", "rate": draw(fx_rate_text())})
    fx_rates = draw(st.permutations(fx_rates))

    n_inst = draw(st.integers(1, 10))
    ids = list(draw(st.permutations(POOL))[:n_inst])
    inst_ccy = {i: draw(st.sampled_from(ccys)) if draw(st.integers(0, 2)) else base for i in ids}

    # prices: strictly positive, 2 dp; occasionally missing
    prices = []
    for i in ids:
        if draw(st.integers(0, 24)) == 0:
            continue
        prices.append({"instrument_id": i, "price": money2(draw, 1, 100_000), "currency": inst_ccy[i]})
    prices = draw(st.permutations(prices))

    # shelf: usually present, every status
    shelf = []
    for i in ids:
        if draw(st.integers(0, 19)) == 0:
            continue
        entry = {
            "instrument_id": i,
            "status": draw(status_st),
            "asset_class": draw(st.sampled_from(ASSET_CLASSES)),
            "attributes": {"sector": draw(st.sampled_from(SECTORS))},
        }
        if draw(st.booleans()):
            entry["settlement_days"] = draw(st.integers(0, 5))
        if draw(st.integers(0, 6)) == 0:
            entry["min_notional"] = {"amount": money2(draw, 100, 500_000), "currency": inst_ccy[i]}
        shelf.append(entry)

    # positions: 0-10, some off-model, some with market_value, some with lots
    n_pos = draw(st.integers(0, n_inst))
    held = draw(st.permutations(ids))[:n_pos]
    positions = []
    for i in held:
        qty = draw(weighted([("zero", 1), ("small", 3), ("big", 6)]))
        q = 0 if qty == "zero" else draw(st.integers(1, 50) if qty == "small" else st.integers(1, 5000))
        pos: dict = {"instrument_id": i, "quantity": str(q)}
        if draw(st.integers(0, 7)) == 0:
            mv_ccy = inst_ccy[i] if draw(st.integers(0, 3)) else draw(st.sampled_from(ccys))
            pos["market_value"] = {"amount": money2(draw, 0, 10_000_000), "currency": mv_ccy}
        if q > 0 and draw(st.integers(0, 3)) == 0:
            n_lots = draw(st.integers(1, min(3, q)))
            cuts = sorted(draw(st.lists(st.integers(1, q - 1), min_size=n_lots - 1, max_size=n_lots - 1, unique=True))) if q > 1 else []
            bounds = [0, *cuts, q]
            lots = []
            for k in range(len(bounds) - 1):
                cost_ccy = inst_ccy[i] if draw(st.integers(0, 5)) else draw(st.sampled_from(ccys))
                lots.append({
                    "lot_id": f"L{i}_{draw(st.integers(0, 3))}{k}",
                    "quantity": str(bounds[k + 1] - bounds[k]),
                    "unit_cost": {"amount": money2(draw, 1, 100_000), "currency": cost_ccy},
                    "purchase_date": f"202{draw(st.integers(0, 5))}-0{draw(st.integers(1, 9))}-1{draw(st.integers(0, 9))}",
                })
            pos["lots"] = lots
        positions.append(pos)

    # cash: distinct currencies (settled occasionally)
    cash = []
    for c in draw(st.permutations(ccys))[: draw(st.integers(0, len(ccys)))]:
        row: dict = {"currency": c, "amount": money2(draw, 0, 50_000_000)}
        if draw(st.integers(0, 9)) == 0:
            row["settled"] = money2(draw, 0, 50_000_000)
        cash.append(row)

    # model: 1-8 targets from the pool, 2-4 dp weights, sum <= ~1.1
    n_model = draw(st.integers(1, min(8, n_inst)))
    model_ids = draw(st.permutations(ids))[:n_model]
    dp = draw(st.integers(2, 4))
    total = draw(weighted([(1.0, 5), (0.9, 2), (0.6, 1), (1.1, 1)]))
    raw = [draw(st.integers(1, 100)) for _ in model_ids]
    scale = 10 ** dp
    targets = [
        {"instrument_id": i, "weight": dec_text(int(total * scale * r / sum(raw)), dp)}
        for i, r in zip(model_ids, raw)
    ]
    if draw(st.integers(0, 14)) == 0:  # an unshelved or unpriced extra target
        extra = [i for i in POOL if i not in ids]
        if extra:
            targets.append({"instrument_id": extra[0], "weight": "0.05"})
            if draw(st.booleans()):
                prices.append({"instrument_id": extra[0], "price": "10.00", "currency": base})

    options = draw(engine_options(base, ccys))
    return {
        "portfolio_snapshot": {
            "portfolio_id": portfolio_id or draw(st.sampled_from(PORTFOLIO_IDS)),
            "base_currency": base,
            "positions": positions,
            "cash_balances": cash,
        },
        "market_data_snapshot": {"prices": prices, "fx_rates": fx_rates},
        "model_portfolio": {"targets": targets},
        "shelf_entries": shelf,
        "options": options,
    }


@st.composite
def engine_options(draw, base: str, ccys: list[str]) -> dict:
    o: dict = {
        "fx_buffer_pct": draw(st.sampled_from(["0.0", "0.01", "0.02"])),
        "allow_restricted": draw(weighted([(False, 4), (True, 1)])),
        "suppress_dust_trades": draw(weighted([(True, 4), (False, 1)])),
    }
    maybe = lambda p: draw(st.integers(0, 99)) < p  # noqa: E731
    if maybe(45):
        o["single_position_max_weight"] = draw(st.sampled_from(["0.1", "0.2", "0.3", "0.5"]))
    if maybe(30):
        o["cash_band_min_weight"] = draw(st.sampled_from(["0.0", "0.01", "0.02"]))
        o["cash_band_max_weight"] = draw(st.sampled_from(["0.05", "0.1", "1.0"]))
    if maybe(20):
        o["min_cash_buffer_pct"] = draw(st.sampled_from(["0.02", "0.05"]))
    if maybe(20):
        o["valuation_mode"] = draw(st.sampled_from(["CALCULATED", "TRUST_SNAPSHOT"]))
    if maybe(20):
        o["min_trade_notional"] = {"amount": money2(draw, 100, 300_000), "currency": draw(st.sampled_from(ccys))}
    if maybe(15):
        o["group_constraints"] = {
            f"sector:{s}": {"max_weight": draw(st.sampled_from(["0.2", "0.3", "0.4"]))}
            for s in draw(st.lists(st.sampled_from(SECTORS + ("REGION",)), min_size=1, max_size=2, unique=True))
        }
        if maybe(10):
            o["group_constraints"]["region:EU"] = {"max_weight": "0.3"}  # unknown attribute
    if maybe(25):
        o["enable_tax_awareness"] = True
        if maybe(80):
            o["max_realized_capital_gains"] = money2(draw, 0, 1_000_000)
    if maybe(20):
        o["enable_settlement_awareness"] = True
        o["settlement_horizon_days"] = draw(st.sampled_from([0, 3, 5]))
        if maybe(50):
            o["max_overdraft_by_ccy"] = {draw(st.sampled_from(ccys)): money2(draw, 0, 10_000_000)}
    if maybe(15):
        o["max_turnover_pct"] = draw(st.sampled_from(["0", "0.05", "0.1", "0.2", "0.5", "1"]))
    if maybe(10):
        o["block_on_missing_prices"] = False
    if maybe(10):
        o["block_on_missing_fx"] = False
    if maybe(10):
        o["target_method"] = "SOLVER"  # the oracle projects exactly, with or without group caps
        if maybe(30):
            o["cash_band_min_weight"], o["cash_band_max_weight"] = "0.02", "0.3"
    if maybe(10):
        o["compare_target_methods"] = True
    return o


# -------------------------------------------------------------------------------------
# batch isolation: variants of one request sharing portfolio and instrument ids

@st.composite
def variant(draw, req: dict) -> dict:
    """A copy of req with different prices / shelf statuses / FX / options."""
    import copy

    v = copy.deepcopy(req)
    md = v["market_data_snapshot"]
    for p in md["prices"]:
        if draw(st.booleans()):
            p["price"] = money2(draw, 1, 100_000)
    for f in md["fx_rates"]:
        if draw(st.booleans()):
            f["rate"] = draw(fx_rate_text())
    for s in v["shelf_entries"]:
        if draw(st.integers(0, 2)) == 0:
            s["status"] = draw(status_st)
    base = v["portfolio_snapshot"]["base_currency"]
    ccys = sorted({base, *(c["currency"] for c in v["portfolio_snapshot"]["cash_balances"])})
    if draw(st.booleans()):
        v["options"] = draw(engine_options(base, ccys))
    if draw(st.integers(0, 3)) == 0 and v["portfolio_snapshot"]["positions"]:
        v["portfolio_snapshot"]["positions"].pop(draw(st.integers(0, len(v["portfolio_snapshot"]["positions"]) - 1)))
    return v


@st.composite
def isolation_batches(draw) -> list[dict]:
    """2-6 requests, mostly sharing portfolio_id and instrument ids with a first one."""
    first = draw(requests(portfolio_id="pf_shared"))
    batch = [first]
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)):
            batch.append(draw(variant(first)))
        else:
            batch.append(draw(requests(portfolio_id="pf_shared")))
    return draw(st.permutations(batch))


# quotes whose inverse has no finite decimal, or more than 20 decimals: the fixed point
# holds 1 / q rounded, the reference 28 significant digits of it
INVERSE_QUOTES = ("1.3", "150", "83", "7", "1.35", "3", "0.7", "1.1", "6", "9", "0.9", "12")


@st.composite
def round_inverse_requests(draw) -> dict:
    """Requests of round amounts over one inverse quote ``BASE/F`` (F → base is 1 / q),
    with prices and foreign cash in multiples of q, so that converted values, FX amounts,
    weights and turnover figures land exactly on round numbers in the reference's 28
    digits, and on its limits: cash at 0 after a FUNDING or SWEEP, a cash weight at its
    band, a notional at its turnover budget, a locked weight at its model weight or cap, a
    trade on an integer number of units."""
    q = Decimal(draw(st.sampled_from(INVERSE_QUOTES)))
    base, foreign = draw(st.sampled_from([("USD", "JPY"), ("SGD", "USD"), ("EUR", "CHF")]))
    prices, positions, shelf, targets = [], [], [], []
    for i in range(draw(st.integers(1, 4))):
        iid = POOL[i]
        ccy = draw(st.sampled_from([base, foreign]))
        unit = q if ccy == foreign and draw(st.booleans()) else 1
        prices.append({"instrument_id": iid, "price": str(Decimal(draw(st.sampled_from([1, 2, 5, 10, 20, 100]))) * unit), "currency": ccy})
        if draw(st.booleans()):
            quantity = draw(st.sampled_from([0, 1, 10, 50, 100, 500, 2107]))
            position = {"instrument_id": iid, "quantity": str(quantity)}
            if draw(st.integers(0, 4)) == 0:  # a market value in either currency, read as is in sizing (§6.9)
                mv_ccy = draw(st.sampled_from([base, foreign]))
                mv = Decimal(quantity * draw(st.sampled_from([1, 2, 10]))) * (q if mv_ccy == foreign else 1)
                position["market_value"] = {"amount": str(mv), "currency": mv_ccy}
            positions.append(position)
        shelf.append({"instrument_id": iid, "status": draw(weighted(
            [("APPROVED", 8), ("SUSPENDED", 1), ("SELL_ONLY", 1), ("BANNED", 1), ("RESTRICTED", 1)]))})
        if draw(st.integers(0, 9)) < 7:
            targets.append({"instrument_id": iid, "weight": draw(st.sampled_from(["0.1", "0.2", "0.25", "0.5", "0.3", "0.05"]))})
    cash = [{"currency": base, "amount": str(draw(st.sampled_from([0, 100, 500, 699, 1000, 10000])))}]
    if draw(st.booleans()):
        cash.append({"currency": foreign, "amount": str(q * draw(st.sampled_from([0, 100, 500, 1000, 10000])))})
    options: dict = {"fx_buffer_pct": draw(st.sampled_from(["0", "0", "0.01"]))}
    if draw(st.booleans()):
        options["max_turnover_pct"] = draw(st.sampled_from(["0.05", "0.1", "0.11", "0.15", "0.2", "0.5"]))
    if draw(st.booleans()):
        options["cash_band_min_weight"] = draw(st.sampled_from(["0", "0.1", "0.5"]))
        options["cash_band_max_weight"] = draw(st.sampled_from(["0.5", "1"]))
    if draw(st.booleans()):
        options["single_position_max_weight"] = draw(st.sampled_from(["0.1", "0.2", "0.3", "0.5"]))
    if draw(st.integers(0, 4)) == 0:
        options["valuation_mode"] = "TRUST_SNAPSHOT"
    if draw(st.integers(0, 4)) == 0:
        options["min_cash_buffer_pct"] = draw(st.sampled_from(["0.05", "0.1"]))
    if draw(st.booleans()):
        options.update(enable_settlement_awareness=True, settlement_horizon_days=3,
                       max_overdraft_by_ccy={base: draw(st.sampled_from(["0", "100", "1000"]))})
    return {
        "portfolio_snapshot": {"portfolio_id": draw(st.sampled_from(PORTFOLIO_IDS)), "base_currency": base,
                               "positions": positions, "cash_balances": cash},
        "market_data_snapshot": {"prices": prices, "fx_rates": [{"pair": f"{base}/{foreign}", "rate": str(q)}]},
        "model_portfolio": {"targets": targets}, "shelf_entries": shelf, "options": options,
    }


@st.composite
def reconciliation_boundary_requests(draw) -> dict:
    """One holding trusted at a foreign market value over a direct or an inverse quote,
    valued at market after (price 1 in base; nothing trades), whose quantity puts the
    after-state's total at the before-state's ± the tolerance in the reference's 28 digits
    (§6.18), or 1E-20 to either side: over an inverse quote the fixed point's before-state
    total is off by up to ~1e-17 of itself, so only a decision in 28 digits meets the
    reference's."""
    c = Context(prec=28)  # the reference's: 28 significant digits, half-even
    foreign = draw(st.sampled_from(["EUR", "JPY", "CHF"]))
    rate = Decimal(draw(st.integers(100, 10_000))).scaleb(-draw(st.integers(2, 4)))
    inverse = draw(st.booleans())
    market_value = Decimal(draw(st.integers(1_000, 10_000_000))).scaleb(-draw(st.integers(0, 2)))
    before = c.multiply(market_value, c.divide(1, rate) if inverse else rate)
    tolerance = c.add(Decimal("0.5"), c.multiply(before, Decimal("0.0005")))
    after = c.add(before, tolerance) if draw(st.booleans()) else c.subtract(before, tolerance)
    quantity = after + Decimal(draw(st.sampled_from([-1, 0, 0, 1]))).scaleb(-20)
    if not 0 < quantity < 10**9:  # beyond the quantity range (features.md), or a short
        quantity = Decimal(1)
    return {
        "portfolio_snapshot": {"portfolio_id": "pf_A", "base_currency": "USD", "cash_balances": [], "positions": [{
            "instrument_id": "L", "quantity": str(quantity), "market_value": {"amount": str(market_value), "currency": foreign}}]},
        "market_data_snapshot": {"prices": [{"instrument_id": "L", "price": "1", "currency": "USD"}],
                                 "fx_rates": [{"pair": f"USD/{foreign}" if inverse else f"{foreign}/USD", "rate": str(rate)}]},
        "model_portfolio": {"targets": []}, "shelf_entries": [],
        "options": {"valuation_mode": "TRUST_SNAPSHOT", "min_trade_notional": {"amount": "1000000000000", "currency": "USD"}},
    }


@st.composite
def printed_midpoint_requests(draw) -> dict:
    """Requests whose before-state puts a weight exactly on a 4-dp midpoint (m / 20000, m
    odd) of a total that a foreign holding reaches through an inverse quote ``EUR/F`` (§6.1:
    1 / q in 28 digits, so F's value in EUR is a hair off the integer it is rationally).
    The printed weight (§6.2, 4 dp half-even) then falls on the reference's side of the
    midpoint only if computed as it computes; trades move the after-state's weights
    near other midpoints now and then."""
    q = Decimal(draw(st.sampled_from(INVERSE_QUOTES)))
    foreign = draw(st.sampled_from(["CHF", "JPY", "USD"]))
    scale = draw(st.sampled_from([1, 2, 5, 10]))
    m = 2 * draw(st.integers(0, 9998)) + 1  # odd: m / 20000 is a 4-dp midpoint
    rest = (20000 - m) * scale
    foreign_units = draw(st.integers(1, rest - 1)) if rest > 1 else 1
    values = {"F": foreign_units, "X": rest - foreign_units, "cash": 0}
    holder = draw(st.sampled_from(["F", "X", "cash"]))  # whose weight is the midpoint
    values[holder] += m * scale
    if draw(st.booleans()):  # part of the rest in cash
        moved = draw(st.integers(0, values["X"]))
        values["X"], values["cash"] = values["X"] - moved, values["cash"] + moved
    f_class, x_class = draw(st.sampled_from([("EQUITY", "EQUITY"), ("EQUITY", "FI"), ("FI", "CASH")]))
    shelf = [
        {"instrument_id": "F", "status": "APPROVED", "asset_class": f_class, "attributes": {"sector": "TECH"}},
        {"instrument_id": "X", "status": draw(weighted([("APPROVED", 4), ("SELL_ONLY", 1), ("SUSPENDED", 1)])),
         "asset_class": x_class, "attributes": {"sector": draw(st.sampled_from(["TECH", "FIN"]))}},
        {"instrument_id": "Z", "status": "APPROVED", "asset_class": "FI"},
    ]
    targets = [{"instrument_id": iid, "weight": draw(st.sampled_from(["0", "0.05", "0.1", "0.2", "0.3", "0.5"]))}
               for iid in ("F", "X", "Z") if draw(st.integers(0, 3))]
    options: dict = {"fx_buffer_pct": draw(st.sampled_from(["0", "0.01"]))}
    if draw(st.booleans()):
        options["cash_band_min_weight"], options["cash_band_max_weight"] = "0", draw(st.sampled_from(["0.5", "0.9", "1"]))
    if draw(st.booleans()):
        options["single_position_max_weight"] = draw(st.sampled_from(["0.3", "0.5", "0.9"]))
    if draw(st.integers(0, 3)) == 0:
        options["max_turnover_pct"] = draw(st.sampled_from(["0.05", "0.2"]))
    return {
        "portfolio_snapshot": {
            "portfolio_id": draw(st.sampled_from(PORTFOLIO_IDS)), "base_currency": "EUR",
            "positions": [{"instrument_id": "F", "quantity": str(values["F"])}, {"instrument_id": "X", "quantity": str(values["X"])}],
            "cash_balances": [{"currency": "EUR", "amount": str(values["cash"])}],
        },
        "market_data_snapshot": {
            # F at q units of F: 1 EUR a unit, rationally
            "prices": [{"instrument_id": "F", "price": str(q), "currency": foreign},
                       {"instrument_id": "X", "price": "1", "currency": "EUR"},
                       {"instrument_id": "Z", "price": "10", "currency": "EUR"}],
            "fx_rates": [{"pair": f"EUR/{foreign}", "rate": str(q)}],
        },
        "model_portfolio": {"targets": targets}, "shelf_entries": shelf, "options": options,
    }


@st.composite
def small_notional_tax_requests(draw) -> dict:
    """Tax-aware requests whose notional-sized sells are below 0.1 unit: instruments held
    with a market value of a few cents (the delta's current value, sold off by notional),
    over one to three lots of which some are smaller still, so the walk's min(remaining,
    lot) takes a lot whole and then the 28-significant-digit rest, or stops part-way under
    a small gains budget; a unit-traded holding sold after them spends what they left."""
    rng = random.Random(draw(st.integers(0, 2**64 - 1)))  # one draw: a list of 25 stays within Hypothesis' buffer

    def amount(lo: float, hi: float, dp: int) -> str:
        return f"{rng.uniform(lo, hi):.{dp}f}"

    def lot(lot_id: str, quantity: str, cost: str) -> dict:
        day = f"202{rng.randint(0, 3)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
        return {"lot_id": lot_id, "quantity": quantity, "unit_cost": {"amount": cost, "currency": "SGD"}, "purchase_date": day}

    positions, prices, shelf = [], [], []
    for k in range(rng.randint(1, 4)):
        iid = f"S{k}"
        lots = [lot(f"L{k}{j}", rng.choice(["0.0005", "0.001", "0.003", "0.02", "0.05", "1", "2", amount(0.0001, 0.09, 4)]),
                    amount(0.01, 150, 2)) for j in range(rng.randint(1, 3))]
        position = {"instrument_id": iid, "quantity": str(sum(Decimal(x["quantity"]) for x in lots)), "lots": lots}
        if rng.random() < 0.8:
            position["market_value"] = {"amount": amount(0.01, 0.6, 2), "currency": "SGD"}
        positions.append(position)
        prices.append({"instrument_id": iid, "price": amount(0.5, 120, 2), "currency": "SGD"})
        shelf.append({"instrument_id": iid, "status": "APPROVED", "asset_class": "EQUITY", "trade_by": rng.choice(["NOTIONAL", "NOTIONAL", "UNITS"])})
    positions.insert(rng.randrange(len(positions) + 1),
                     {"instrument_id": "BIG", "quantity": "7", "lots": [lot("LB", "7", amount(0.1, 1.5, 2))]})
    prices += [{"instrument_id": "BIG", "price": amount(0.5, 3, 2), "currency": "SGD"}, {"instrument_id": "FUND", "price": "1", "currency": "SGD"}]
    shelf += [{"instrument_id": i, "status": "APPROVED", "asset_class": "EQUITY"} for i in ("BIG", "FUND")]
    targets = [{"instrument_id": "FUND", "weight": rng.choice(["0.3", "0.5", "0.9"])}]
    if rng.random() < 0.3:
        targets.append({"instrument_id": "S0", "weight": rng.choice(["0.0001", "0.001", "0.01"])})
    options = {"notional_sizing": True, "enable_tax_awareness": True, "suppress_dust_trades": rng.random() < 0.3}
    budget = rng.choice([None, "0", "0.001", "0.005", "0.01", "0.03", "0.1", "1"])
    if budget is not None:
        options["max_realized_capital_gains"] = budget
    return {
        "portfolio_snapshot": {"portfolio_id": draw(st.sampled_from(PORTFOLIO_IDS)), "base_currency": "SGD", "positions": positions,
                               "cash_balances": [{"currency": "SGD", "amount": amount(0, 50, 2)}]},
        "market_data_snapshot": {"prices": prices, "fx_rates": []},
        "model_portfolio": {"targets": targets}, "shelf_entries": shelf, "options": options,
    }


# (price, lot cost) pairs whose gain per unit divides round budgets into endless decimals
GAIN_PAIRS = (("100.00", "70.00"), ("90.00", "60.00"), ("100.00", "50.00"), ("10.00", "3.00"), ("21.00", "14.00"), ("45.50", "42.50"))


@st.composite
def tax_residue_requests(draw) -> dict:
    """Requests whose gains budget runs out part-way through a sell, at a gain per unit that
    divides it into endless decimals (§6.10): that sell's quantity has 28 significant
    digits, and a later sell gets the 28-digit remainder of the budget, often 1E-24 or
    less, whose proceeds are 0 at 20 decimals but not in the reference. They meet the
    settlement ladder (FX sweeps settling before the sell), dust thresholds set to a
    limited sell's exact notional, the turnover cap and overdraft allowances."""
    base = draw(st.sampled_from(BASES))
    foreign = draw(st.sampled_from([c for c in FOREIGN if c != base and c != "JPY"]))
    rate = draw(st.sampled_from(["1.350000", "0.740000", "1.100000", "1.250000"]))
    prices, positions, shelf, gains = [], [], [], []
    for i in range(draw(st.integers(2, 4))):
        iid = POOL[i]
        ccy = draw(st.sampled_from([base, foreign]))
        price, cost = draw(st.sampled_from(GAIN_PAIRS))
        quantity = draw(st.sampled_from([10, 50, 100, 300]))
        prices.append({"instrument_id": iid, "price": price, "currency": ccy})
        lots = [{"lot_id": "L0", "quantity": str(quantity), "unit_cost": {"amount": cost, "currency": ccy}, "purchase_date": "2020-01-01"}]
        positions.append({"instrument_id": iid, "quantity": str(quantity), "lots": lots})
        shelf.append({"instrument_id": iid, "status": "APPROVED", "settlement_days": draw(st.integers(1, 3))})
        gains.append((Decimal(price), Decimal(price) - Decimal(cost)))
    buy = POOL[len(prices)]
    prices.append({"instrument_id": buy, "price": "10.00", "currency": base})
    shelf.append({"instrument_id": buy, "status": "APPROVED", "settlement_days": 2})
    targets = [{"instrument_id": buy, "weight": draw(st.sampled_from(["0.5", "0.3", "0.9"]))}]
    if draw(st.booleans()):  # a held instrument kept in part
        targets.append({"instrument_id": POOL[0], "weight": draw(st.sampled_from(["0.05", "0.1"]))})
    budget = draw(st.sampled_from([Decimal("100.00"), Decimal("1000.00"), Decimal("250.00"), Decimal("77.00")]))
    options: dict = {"enable_tax_awareness": True, "max_realized_capital_gains": str(budget),
                     "fx_buffer_pct": draw(st.sampled_from(["0.0", "0.01"]))}
    if draw(st.integers(0, 2)) == 0:  # a limited sell's exact notional, where it has 2 decimals
        price, gain = draw(st.sampled_from(gains))
        notional = budget * price / gain
        if notional == notional.quantize(Decimal("0.01")):
            options["min_trade_notional"] = {"amount": str(notional.quantize(Decimal("0.01"))), "currency": base}
    if draw(st.integers(0, 3)) > 0:
        options.update(enable_settlement_awareness=True, settlement_horizon_days=draw(st.sampled_from([3, 5])))
        if draw(st.booleans()):
            options["max_overdraft_by_ccy"] = {foreign: draw(st.sampled_from(["0.00", "100.00"]))}
    if draw(st.integers(0, 3)) == 0:
        options["max_turnover_pct"] = draw(st.sampled_from(["0.1", "0.2", "0.5"]))
    cash = [{"currency": base, "amount": draw(st.sampled_from(["0.00", "1000.00", "10000.00"]))}]
    return {
        "portfolio_snapshot": {"portfolio_id": draw(st.sampled_from(PORTFOLIO_IDS)), "base_currency": base,
                               "positions": positions, "cash_balances": cash},
        "market_data_snapshot": {"prices": prices, "fx_rates": [{"pair": f"{foreign}/{base}", "rate": rate}]},
        "model_portfolio": {"targets": targets}, "shelf_entries": shelf, "options": options,
    }


# -------------------------------------------------------------------------------------
# RFC-0001 options the reference lacks (docs/features.md, "RFC-0001 options the reference lacks")

AS_OF_T0 = datetime(2024, 10, 4, 9, 30, tzinfo=timezone.utc)


def _as_of(minutes: float, tz: str = "Z") -> str:
    """AS_OF_T0 + minutes as ISO-8601 text: in UTC with ``Z``, with no offset (read as UTC),
    or as the same instant at an offset such as ``+08:00``."""
    t = AS_OF_T0 + timedelta(minutes=minutes)
    if tz == "Z":
        return t.strftime("%Y-%m-%dT%H:%M:%S") + "Z"
    if tz == "":
        return t.strftime("%Y-%m-%dT%H:%M:%S")
    sign, hh, mm = tz[0], int(tz[1:3]), int(tz[4:6])
    off = timedelta(hours=hh, minutes=mm) * (1 if sign == "+" else -1)
    return (t + off).replace(tzinfo=timezone(off)).isoformat()


def _complete(req: dict, draw) -> None:
    """Give every held or model instrument a price and a shelf entry, and every currency a
    non-zero FX quote to base."""
    base = req["portfolio_snapshot"]["base_currency"]
    md = req["market_data_snapshot"]
    priced = {p["instrument_id"]: p["currency"] for p in md["prices"]}
    shelved = {e["instrument_id"] for e in req["shelf_entries"]}
    used = [t["instrument_id"] for t in req["model_portfolio"]["targets"]]
    used += [p["instrument_id"] for p in req["portfolio_snapshot"]["positions"] if p["instrument_id"] not in used]
    for i in used:
        if i not in priced:
            md["prices"].append({"instrument_id": i, "price": money2(draw, 1, 100_000), "currency": base})
            priced[i] = base
        if i not in shelved:
            req["shelf_entries"].append({"instrument_id": i, "status": "APPROVED", "asset_class": draw(st.sampled_from(ASSET_CLASSES)),
                                         "attributes": {"sector": draw(st.sampled_from(SECTORS))}})
    md["fx_rates"] = [f for f in md["fx_rates"] if Decimal(f["rate"]) != 0]
    quoted = {c for f in md["fx_rates"] for c in f["pair"].split("/")}
    ccys = set(priced.values()) | {c["currency"] for c in req["portfolio_snapshot"]["cash_balances"]}
    ccys |= {p["market_value"]["currency"] for p in req["portfolio_snapshot"]["positions"] if p.get("market_value")}
    ccys |= {lot["unit_cost"]["currency"] for p in req["portfolio_snapshot"]["positions"] for lot in p.get("lots") or []}
    for c in sorted(ccys - quoted - {base}):
        md["fx_rates"].append({"pair": f"{c}/{base}", "rate": dec_text(draw(st.integers(500_000, 2_000_000)), 6)})


@st.composite
def sweep_threshold_requests(draw) -> dict:
    """A completed ``requests()`` draw holding foreign cash, under an RFC
    ``fx_sweep_threshold`` (base currency) from 0 to above any surplus, and now and then
    exactly at a foreign cash balance's base value (kept: only a surplus above the
    threshold is swept), over a direct quote or an inverse one, whose 1 / q the reference
    rounds to 28 digits."""
    req = draw(requests())
    _complete(req, draw)
    base = req["portfolio_snapshot"]["base_currency"]
    quotes = [(*f["pair"].split("/"), Decimal(f["rate"])) for f in req["market_data_snapshot"]["fx_rates"]
              if f["pair"].count("/") == 1 and base in f["pair"].split("/") and Decimal(f["rate"]) > 0]
    o = req["options"]
    o["fx_sweep_threshold"] = draw(st.sampled_from(["0", "0.01", "100", "1000", "10000", "100000", "10000000"]))
    if quotes:
        a, b, q = draw(st.sampled_from(quotes))
        ccy = a if b == base else b
        amount = Decimal(money2(draw, 1, 200_000))
        tie = draw(st.integers(0, 4)) == 0
        if tie and ccy == b:  # BASE/CCY at q: CCY amount = threshold × q is worth the threshold in exact arithmetic
            amount = Decimal(draw(st.integers(1, 100_000))) * q
        cash = [c for c in req["portfolio_snapshot"]["cash_balances"] if c["currency"] != ccy]
        req["portfolio_snapshot"]["cash_balances"] = [*cash, {"currency": ccy, "amount": str(amount)}]
        if tie:
            o["fx_sweep_threshold"] = str(amount * q if ccy == a else amount / q)
    return req


@st.composite
def rfc_option_requests(draw) -> dict:
    """A ``requests()`` draw plus the RFC-0001 options: the asset-class cap (with caps that
    bind and few asset classes, so the excess has same-class recipients, too many, or none),
    notional sizing of shelf entries traded by NOTIONAL, ``as_of`` on both snapshots and on
    prices around the staleness and skew limits (exact limits included), BLOCK or EXCLUDE of
    stale or missing prices and of model targets without a shelf entry, the base currency
    required among the FX rates' currencies, a threshold on FX sweeps (more of it in
    ``sweep_threshold_requests``), the Appendix A rationale codes and messages, buys that
    depend on their funding FX alone, the delta's current value from the valuation (with
    market values to read), held BANNED instruments sold, and held RESTRICTED ones outside
    the model freed by ``allow_restricted``."""
    req = draw(requests())
    o = req["options"]
    maybe = lambda p: draw(st.integers(0, 99)) < p  # noqa: E731
    if maybe(70):  # complete the market data and shelf, so fewer runs stop at a data-quality block
        _complete(req, draw)

    # asset-class cap: caps that bind, and one or two classes so recipients share the class
    if maybe(80):
        o["single_position_max_weight"] = draw(st.sampled_from(["0.1", "0.15", "0.2", "0.25", "0.3", "0.4", "0.5"]))
        if maybe(85):
            o["single_position_cap_mode"] = "RFC_ASSET_CLASS"
            if maybe(60):
                classes = draw(st.lists(st.sampled_from(ASSET_CLASSES), min_size=1, max_size=2, unique=True))
                for e in req["shelf_entries"]:
                    e["asset_class"] = draw(st.sampled_from(classes))
        elif maybe(20):
            o["single_position_cap_mode"] = "REFERENCE"

    # notional sizing: some shelf entries trade by NOTIONAL; one-decimal model weights put
    # round(|delta|, 2) on exact half cents (0.5 x an odd number of cents)
    if maybe(30):
        for t in req["model_portfolio"]["targets"]:
            t["weight"] = draw(st.sampled_from(["0.1", "0.2", "0.3", "0.5", "0.5"]))
    if maybe(75):
        o["notional_sizing"] = draw(weighted([(True, 4), ("true", 1)]))
    for e in req["shelf_entries"]:
        if maybe(65):
            e["trade_by"] = draw(weighted([("NOTIONAL", 3), ("UNITS", 1)]))

    # as_of on the snapshots and prices: ages and skews around the limits
    tz = draw(weighted([("Z", 8), ("+00:00", 1), ("+08:00", 1), ("", 1)]))
    if maybe(80):
        req["market_data_snapshot"]["as_of"] = _as_of(0, tz)
    if maybe(80):
        skew = draw(weighted([(0, 4), (5, 3), (-10, 3), (15, 2), (-15, 1), (16, 1), (-16, 1), (15.5, 1), (30, 1), (-90, 1)]))
        req["portfolio_snapshot"]["as_of"] = _as_of(skew, draw(weighted([("Z", 8), ("+08:00", 1), ("-05:30", 1)])))
    stale_rate = draw(st.sampled_from([0, 10, 30, 60]))
    for p in req["market_data_snapshot"]["prices"]:
        if maybe(70):
            age = draw(weighted([(0, 6), (30, 2), (59, 1), (60, 2), (61, 1), (-5, 1)])) if not maybe(stale_rate) else \
                draw(st.sampled_from([61, 120, 1440, 60.5]))
            p["as_of"] = _as_of(-age, draw(weighted([("Z", 8), ("+01:00", 1)])))
    if maybe(55):
        o["max_staleness_minutes"] = draw(st.sampled_from([0, 30, 60, 60, 120]))
    if maybe(45):  # with or without a staleness limit: EXCLUDE also takes out instruments without a price
        o["stale_price_action"] = draw(weighted([("EXCLUDE", 3), ("BLOCK", 1)]))
    if maybe(30):  # the shelf check's exclude mode: SHELF_ENTRY_MISSING instead of a shelf_missing block
        o["missing_shelf_action"] = draw(weighted([("EXCLUDE", 3), ("BLOCK", 1)]))
        targets = [t["instrument_id"] for t in req["model_portfolio"]["targets"]]
        if targets and o["missing_shelf_action"] == "EXCLUDE" and maybe(75):  # a model target (held or not) the shelf lacks
            gone = draw(st.sampled_from(targets))
            req["shelf_entries"] = [e for e in req["shelf_entries"] if e["instrument_id"] != gone]
    if maybe(75):
        o["max_skew_minutes"] = draw(st.sampled_from([0, 5, 15, 15, 16, 30, 120]))
    if maybe(15):  # RFC Step 5: repatriate a foreign surplus only above a threshold (base currency)
        o["fx_sweep_threshold"] = draw(st.sampled_from(["0", "50", "5000", "1000000"]))
    if maybe(25):  # RFC Step 1: the base currency among the FX rates' currencies
        o["require_base_currency_fx"] = True
        if maybe(50):
            base = req["portfolio_snapshot"]["base_currency"]
            req["market_data_snapshot"]["fx_rates"] = [
                f for f in req["market_data_snapshot"]["fx_rates"] if base not in f["pair"].split("/")]

    if maybe(55):
        o["rfc_rationale_codes"] = True
    if maybe(85):  # RFC Step 5.3: buys depend on their funding FX alone
        o["rfc_fx_dependencies"] = True
        prices = {p["instrument_id"]: p for p in req["market_data_snapshot"]["prices"]}
        priced_targets = [t["instrument_id"] for t in req["model_portfolio"]["targets"] if t["instrument_id"] in prices]
        if priced_targets and maybe(60):  # an off-model holding sold in a target's currency: a SELL its BUY may depend on
            currency = prices[draw(st.sampled_from(priced_targets))]["currency"]
            req["portfolio_snapshot"]["positions"].append({"instrument_id": "LIQ_RFC", "quantity": str(draw(st.integers(1, 500)))})
            req["market_data_snapshot"]["prices"].append({"instrument_id": "LIQ_RFC", "price": money2(draw, 1, 1000), "currency": currency})
            req["shelf_entries"].append({"instrument_id": "LIQ_RFC", "status": "APPROVED"})
    if maybe(40):  # RFC-0002 (reference-semantics §9): a held BANNED instrument sold to 0
        o["held_banned_action"] = draw(weighted([("LIQUIDATE", 4), ("LOCK", 1)]))
        held = [p["instrument_id"] for p in req["portfolio_snapshot"]["positions"] if Decimal(p["quantity"]) != 0]
        if held and maybe(80):
            banned = draw(st.sampled_from(held))
            for e in req["shelf_entries"]:
                if e["instrument_id"] == banned:
                    e["status"] = "BANNED"
    if maybe(85):  # RFC Step 4: the current value in the delta as the valuation values it
        o["delta_from_valuation"] = True
        _market_values(req, draw)
    if maybe(35):  # RFC Step 2 over holdings: allow_restricted also frees a held RESTRICTED instrument outside the model
        o["allow_restricted_holdings"] = True
        o["allow_restricted"] = draw(weighted([(True, 4), (False, 1)]))
        model = {t["instrument_id"] for t in req["model_portfolio"]["targets"]}
        off_model = [p["instrument_id"] for p in req["portfolio_snapshot"]["positions"]
                     if p["instrument_id"] not in model and Decimal(p["quantity"]) != 0]
        if off_model and maybe(85):
            restricted = draw(st.sampled_from(off_model))
            for e in req["shelf_entries"]:
                if e["instrument_id"] == restricted:
                    e["status"] = "RESTRICTED"
    return req


@st.composite
def domain_error_requests(draw) -> dict:
    """An ``rfc_option_requests()`` draw under the RFC asset-class cap, with caps that bind
    and one or two asset classes, asking for RFC §7's problem where the cap blocks the run
    (``rfc_domain_errors``)."""
    req = draw(rfc_option_requests())
    o = req["options"]
    o["single_position_max_weight"] = draw(st.sampled_from(["0.1", "0.15", "0.2", "0.25", "0.3", "0.4", "0.125"]))
    o["single_position_cap_mode"] = "RFC_ASSET_CLASS"
    o["target_method"] = draw(weighted([("HEURISTIC", 9), ("SOLVER", 1)]))  # SOLVER ignores the mode: never a problem
    classes = draw(st.lists(st.sampled_from(ASSET_CLASSES), min_size=1, max_size=2, unique=True))
    for e in req["shelf_entries"]:
        e["asset_class"] = draw(st.sampled_from(classes))
    targets = req["model_portfolio"]["targets"]
    if len(targets) >= 2 and draw(st.integers(0, 99)) < 75:  # one target far above the cap, the others just below it
        cap = Decimal(o["single_position_max_weight"])
        targets[0]["weight"] = draw(st.sampled_from(["0.45", "0.5", "0.6"]))
        for t in targets[1:]:
            t["weight"] = str(cap * Decimal(draw(st.sampled_from(["0.5", "0.8", "0.9", "0.95"]))))
    for option in ("max_skew_minutes", "max_staleness_minutes", "require_base_currency_fx"):  # fewer blocks before the cap
        if draw(st.booleans()):
            o.pop(option, None)
    o["rfc_domain_errors"] = draw(weighted([(True, 8), ("true", 1), (False, 1)]))
    return req


def _market_values(req: dict, draw) -> None:
    """Market values on some positions near their quantity × price, in the price's currency
    or another priced one (whose rate ``_complete`` has quoted), and now and then the
    snapshot trusted: the current value the delta reads then differs by mode and option."""
    prices = {p["instrument_id"]: p for p in req["market_data_snapshot"]["prices"]}
    currencies = sorted({p["currency"] for p in prices.values()} | {req["portfolio_snapshot"]["base_currency"]})
    if draw(st.integers(0, 99)) < 50:
        req["options"]["valuation_mode"] = draw(st.sampled_from(["CALCULATED", "TRUST_SNAPSHOT"]))
    for position in req["portfolio_snapshot"]["positions"]:
        price = prices.get(position["instrument_id"])
        if price is None or position.get("market_value") or draw(st.integers(0, 99)) >= 70:
            continue
        factor = draw(st.sampled_from(["0.5", "0.9", "1", "1.1", "1.37"]))
        amount = (Decimal(position["quantity"]) * Decimal(price["price"]) * Decimal(factor)).quantize(Decimal("0.01"))
        currency = price["currency"] if draw(st.integers(0, 99)) < 60 else draw(st.sampled_from(currencies))
        position["market_value"] = {"amount": str(amount), "currency": currency}


# ---------------------------------------------------------------------------------------
# mutations of the shared random goldens: the reference's own request shapes, perturbed

_GOLDENS = Path(__file__).parent / "data" / "goldens" / "reference-random"
GOLDEN_REQUESTS = [json.loads(p.read_text())["inputs"] for p in sorted(_GOLDENS.rglob("rand_*.json"))]


def _option_pool() -> dict[str, list]:
    """Every value each option takes somewhere in the random goldens."""
    pool: dict[str, list] = {}
    for request in GOLDEN_REQUESTS:
        for key, value in (request.get("options") or {}).items():
            pool.setdefault(key, []).append(value)
    return pool


OPTION_POOL = _option_pool()


def _scaled(text, factor: float, dp: int, floor: Decimal | None = None) -> str:
    """``text`` × ``factor``, cut to ``dp`` places (and raised to ``floor``)."""
    value = (Decimal(str(text)) * Decimal(repr(factor))).quantize(Decimal(1).scaleb(-dp), rounding=ROUND_DOWN)
    return str(value if floor is None else max(floor, value))


@st.composite
def golden_mutations(draw) -> dict:
    """A random golden's request with its options recombined from values other goldens use
    and its numbers perturbed: quantities (of positions without lots, which must sum to the
    position), cash, prices, FX rates and model weights, a shelf status changed, now and
    then a price or FX rate left out, and its structure changed (``_mutate_structure``).
    These stay in the reference generator's shapes, where an unseen request is most likely
    to land."""
    rng = random.Random(draw(st.integers(0, 2**64 - 1)))  # one draw: a list of 25 stays within Hypothesis' buffer
    request = copy.deepcopy(rng.choice(GOLDEN_REQUESTS))
    options = request.setdefault("options", {})
    for key, values in OPTION_POOL.items():
        u = rng.random()
        if u < 0.25:
            options[key] = copy.deepcopy(rng.choice(values))
        elif u < 0.32:
            options.pop(key, None)
    snapshot = request["portfolio_snapshot"]
    for position in snapshot.get("positions", []):
        if rng.random() < 0.6 and not position.get("lots"):
            position["quantity"] = _scaled(position["quantity"], rng.uniform(0, 2.5), 0)
            if isinstance(position.get("market_value"), dict) and rng.random() < 0.5:
                position["market_value"]["amount"] = _scaled(position["market_value"]["amount"], rng.uniform(0.5, 2), 2)
    for cash in snapshot.get("cash_balances", []):
        if rng.random() < 0.6:
            cash["amount"] = _scaled(cash["amount"], rng.uniform(-0.2, 3), 2)
    market = request["market_data_snapshot"]
    for price in market.get("prices", []):
        if rng.random() < 0.5:
            price["price"] = _scaled(price["price"], rng.uniform(0.7, 1.3), 2, Decimal("0.01"))
    for rate in market.get("fx_rates", []):
        if rng.random() < 0.5:
            rate["rate"] = _scaled(rate["rate"], rng.uniform(0.9, 1.1), 6)
    for table in ("prices", "fx_rates"):
        if market.get(table) and rng.random() < 0.07:
            market[table].pop(rng.randrange(len(market[table])))
    for target in request["model_portfolio"].get("targets", []):
        if rng.random() < 0.5:
            weight = Decimal(str(target["weight"])) + Decimal(repr(rng.uniform(-0.08, 0.08)))
            target["weight"] = _scaled(max(Decimal(0), weight), 1.0, rng.choice([2, 2, 3, 4]))
    for entry in request.get("shelf_entries", []):
        if rng.random() < 0.15:
            entry["status"] = rng.choice(STATUSES)
    _mutate_structure(request, rng)
    snapshot["portfolio_id"] = draw(st.sampled_from(PORTFOLIO_IDS))
    return request


def _mutate_structure(request: dict, rng: random.Random) -> None:
    """Now and then: a position sold off before the snapshot, a position's lots (and so the
    position) scaled in whole units, a model target dropped, a shelf instrument added to
    the model, and the base currency moved to another currency the request uses."""
    snapshot, market = request["portfolio_snapshot"], request["market_data_snapshot"]
    positions = snapshot.get("positions", [])
    if positions and rng.random() < 0.2:
        positions.pop(rng.randrange(len(positions)))
    for position in positions:
        if position.get("lots") and rng.random() < 0.4:
            factor = rng.choice([Decimal("0.5"), Decimal(2), Decimal(3)])
            for lot in position["lots"]:
                lot["quantity"] = str(int(Decimal(str(lot["quantity"])) * factor))
            position["quantity"] = str(sum(int(Decimal(lot["quantity"])) for lot in position["lots"]))
            position.pop("market_value", None)
    targets = request["model_portfolio"].setdefault("targets", [])
    if targets and rng.random() < 0.2:
        targets.pop(rng.randrange(len(targets)))
    in_model = {target["instrument_id"] for target in targets}
    others = [e["instrument_id"] for e in request.get("shelf_entries", []) if e["instrument_id"] not in in_model]
    if others and rng.random() < 0.3:
        targets.append({"instrument_id": rng.choice(others), "weight": _scaled(rng.uniform(0, 0.2), 1.0, 2)})
    currencies = sorted({c["currency"] for c in snapshot.get("cash_balances", [])} | {p["currency"] for p in market.get("prices", [])})
    if currencies and rng.random() < 0.15:
        snapshot["base_currency"] = rng.choice(currencies)


def fed_back(request: dict, result: dict) -> dict | None:
    """``request`` with its snapshot replaced by ``result``'s after-state, as a desk runs the
    next rebalance on yesterday's executed proposal: the positions' quantities (fractional
    ones from tax limits and notional sizing; those below 0.1 unit cut at 28 decimals, the
    documented input limit, docs/features.md), a held position's market value where its
    quantity did not change, and the cash balances. Tax lots no longer match the quantities,
    so tax awareness is switched off. None where the result has no after-state, or one the
    contract would refuse (a short or a quantity above 10^9)."""
    after = result.get("after_simulated")
    if not after or result.get("status") is None:
        return None
    req = copy.deepcopy(request)
    snapshot = req["portfolio_snapshot"]
    held = {p["instrument_id"]: p for p in snapshot.get("positions", [])}
    positions = []
    for p in after["positions"]:
        quantity = Decimal(p["quantity"]).quantize(Decimal("1e-28"), rounding=ROUND_DOWN, context=Context(prec=60))
        if quantity < 0 or quantity > Decimal(10) ** 9:
            return None
        position = {"instrument_id": p["instrument_id"], "quantity": f"{quantity.normalize(Context(prec=60)):f}"}
        before = held.get(p["instrument_id"])
        if before is not None and before.get("market_value") is not None and Decimal(str(before["quantity"])) == quantity:
            position["market_value"] = before["market_value"]
        positions.append(position)
    snapshot["positions"] = positions
    snapshot["cash_balances"] = [{"currency": c["currency"], "amount": c["amount"]} for c in after["cash_balances"]]
    req["options"] = {k: v for k, v in (req.get("options") or {}).items() if k not in ("enable_tax_awareness", "max_realized_capital_gains")}
    return req
