"""Scalar reference oracle for the DPM ``simulate`` path.

A small, plain, one-portfolio-at-a-time implementation of the reference service's
``POST /rebalance/simulate`` written straight from ``shared/spec/reference-semantics.md``
(section numbers below refer to that document).  It exists to be obviously right, not
fast: it is the oracle for differential tests against the vectorised engine and the
baseline for benchmarks.

Arithmetic (§1.1): every operation runs in a decimal context of 28 significant digits,
ROUND_HALF_EVEN, in the order the spec's formulas give; inputs are parsed exactly
(``Decimal(str(x))``); quantities are floored with exact integer division.

Public API:
    simulate(request: dict, request_hash: str | None = None) -> dict
    main(argv) / ``python -m dpm_vec.oracle REQUEST.json``

Not covered: request validation (input is assumed valid) and ``/rebalance/analyze``.

RFC-0001 options the reference lacks (``docs/features.md``, "RFC-0001 options the reference
lacks"; ``shared/spec/RFC-0001-rebalance-simulation-mvp.md`` §6 and Appendix A) are
implemented here too, written from those documents alone as a second, independent
implementation: ``single_position_cap_mode: RFC_ASSET_CLASS``, ``notional_sizing`` (shelf
``trade_by: NOTIONAL``), ``max_staleness_minutes`` / ``stale_price_action``,
``missing_shelf_action``, ``max_skew_minutes``, ``require_base_currency_fx``,
``fx_sweep_threshold``, ``rfc_rationale_codes``, ``rfc_fx_dependencies``,
``delta_from_valuation``, ``held_banned_action``, ``allow_restricted_holdings`` and
``rfc_domain_errors`` (the RFC asset-class cap's block as RFC §7's 422 problem instead of
a result). Every one defaults to the reference's behaviour (off; ``max_skew_minutes`` acts only when set and both snapshots carry
``as_of``, a key the reference ignores).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from fractions import Fraction
from typing import Any

__all__ = ["simulate", "main", "CONTEXT"]

#: §1.1 — Python's default decimal context: 28 digits, half-even.
CONTEXT = Context(prec=28, rounding=ROUND_HALF_EVEN)

RUN_ID = "rr_oracle"
ZERO = Decimal("0")
ONE = Decimal("1")
FOUR_DP = Decimal("0.0001")
CENT = Decimal("0.01")


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def D(x: Any) -> Decimal | None:
    """Parse a JSON number/string exactly (§1.3); None stays None."""
    if x is None:
        return None
    if isinstance(x, Decimal):
        return x
    return Decimal(str(x).strip())


def _bool(x: Any, default: bool) -> bool:
    """Lax boolean parsing (§3)."""
    if x is None:
        return default
    if isinstance(x, str):
        return x.strip().lower() in ("true", "1", "yes", "y", "on", "t")
    return bool(x)


def _int(x: Any, default: int) -> int:
    """An integer field (§3: integral strings and numbers, so 3, "3", 3.0 and "3.0" alike)."""
    if x is None:
        return default
    value = D(x)
    if value != value.to_integral_value():
        raise ValueError(f"not an integer: {x!r}")
    return int(value)


def s(d: Decimal | None) -> str | None:
    """Decimal -> JSON string in Python's decimal text form (§1.3)."""
    return None if d is None else str(d)


def money(amount: Decimal, ccy: str) -> dict:
    return {"amount": s(amount), "currency": ccy}


def w4(w: Decimal) -> str:
    """Weights are printed at 4 dp half-even, only on output (§1.2)."""
    try:
        return str(w.quantize(FOUR_DP, rounding=ROUND_HALF_EVEN))
    except Exception:  # absurdly large weight (tiny tv): print as is
        return str(w)


def _money_in(m: Any) -> dict | None:
    if not m:
        return None
    return {"amount": D(m["amount"]), "currency": m["currency"]}


def _timestamp(x: Any) -> datetime | None:
    """An ISO-8601 ``as_of`` (docs/book.md: timestamp, UTC); a time without offset is UTC."""
    if x is None:
        return None
    t = datetime.fromisoformat(str(x).strip())
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t


# ---------------------------------------------------------------------------
# parsed request
# ---------------------------------------------------------------------------

@dataclass
class Options:
    """EngineOptions with their defaults (§4)."""
    valuation_mode: str = "CALCULATED"
    target_method: str = "HEURISTIC"
    compare_target_methods: bool = False
    compare_target_methods_tolerance: Decimal = Decimal("0.0001")
    cash_band_min_weight: Decimal = Decimal("0.00")
    cash_band_max_weight: Decimal = Decimal("1.00")
    single_position_max_weight: Decimal | None = None
    min_trade_notional: dict | None = None
    allow_restricted: bool = False
    suppress_dust_trades: bool = True
    fx_buffer_pct: Decimal = Decimal("0.01")
    block_on_missing_prices: bool = True
    block_on_missing_fx: bool = True
    min_cash_buffer_pct: Decimal = Decimal("0.0")
    max_turnover_pct: Decimal | None = None
    enable_tax_awareness: bool = False
    max_realized_capital_gains: Decimal | None = None
    enable_settlement_awareness: bool = False
    settlement_horizon_days: int = 5
    fx_settlement_days: int = 2
    max_overdraft_by_ccy: dict = field(default_factory=dict)
    group_constraints: dict = field(default_factory=dict)
    enable_workflow_gates: bool = True
    workflow_requires_client_consent: bool = False
    client_consent_already_obtained: bool = False
    # RFC-0001 options (docs/features.md, "RFC-0001 options the reference lacks"; docs/book.md)
    single_position_cap_mode: str = "REFERENCE"
    notional_sizing: bool = False
    max_staleness_minutes: int | None = None
    stale_price_action: str = "BLOCK"
    missing_shelf_action: str = "BLOCK"
    held_banned_action: str = "LOCK"
    allow_restricted_holdings: bool = False
    max_skew_minutes: int | None = None
    require_base_currency_fx: bool = False
    fx_sweep_threshold: Decimal | None = None
    rfc_rationale_codes: bool = False
    rfc_fx_dependencies: bool = False
    delta_from_valuation: bool = False
    rfc_domain_errors: bool = False

    @classmethod
    def parse(cls, o: dict) -> "Options":
        o = o or {}
        r = cls()
        for name in ("valuation_mode", "target_method", "single_position_cap_mode", "stale_price_action",
                     "missing_shelf_action", "held_banned_action"):
            if o.get(name) is not None:
                setattr(r, name, str(o[name]))
        for name in ("compare_target_methods", "allow_restricted", "suppress_dust_trades",
                     "block_on_missing_prices", "block_on_missing_fx", "enable_tax_awareness",
                     "enable_settlement_awareness", "enable_workflow_gates",
                     "workflow_requires_client_consent", "client_consent_already_obtained",
                     "notional_sizing", "rfc_rationale_codes", "require_base_currency_fx",
                     "rfc_fx_dependencies", "delta_from_valuation", "rfc_domain_errors", "allow_restricted_holdings"):
            setattr(r, name, _bool(o.get(name), getattr(r, name)))
        for name in ("compare_target_methods_tolerance", "cash_band_min_weight",
                     "cash_band_max_weight", "fx_buffer_pct", "min_cash_buffer_pct"):
            if o.get(name) is not None:
                setattr(r, name, D(o[name]))
        for name in ("single_position_max_weight", "max_turnover_pct", "max_realized_capital_gains", "fx_sweep_threshold"):
            setattr(r, name, D(o.get(name)))
        r.min_trade_notional = _money_in(o.get("min_trade_notional"))
        r.settlement_horizon_days = _int(o.get("settlement_horizon_days"), 5)
        r.fx_settlement_days = _int(o.get("fx_settlement_days"), 2)
        if o.get("max_staleness_minutes") is not None:
            r.max_staleness_minutes = _int(o["max_staleness_minutes"], 0)
        if o.get("max_skew_minutes") is not None:
            r.max_skew_minutes = _int(o["max_skew_minutes"], 0)
        r.max_overdraft_by_ccy = {k: D(v) for k, v in (o.get("max_overdraft_by_ccy") or {}).items()}
        r.group_constraints = {k: D(v["max_weight"]) for k, v in (o.get("group_constraints") or {}).items()}
        return r


class Market:
    """Price / shelf / FX look-ups, first match wins (§1.4, §6.1)."""

    def __init__(self, request: dict):
        md = request.get("market_data_snapshot") or {}
        # RFC: reference time for staleness and skew; read only where an option asks (§9: a key the reference ignores)
        self.as_of_text = md.get("as_of")
        self.prices: dict[str, dict] = {}
        for p in md.get("prices") or []:
            self.prices.setdefault(p["instrument_id"], {"price": D(p["price"]), "currency": p["currency"],
                                                        "as_of": p.get("as_of")})
        self.fx: dict[str, Decimal] = {}
        for f in md.get("fx_rates") or []:
            self.fx.setdefault(f["pair"], D(f["rate"]))
        self.shelf: dict[str, dict] = {}
        self.settlement_days: dict[str, int] = {}  # §6.15: last shelf entry wins
        self.attribute_keys: set[str] = set()
        for e in request.get("shelf_entries") or []:
            entry = {
                "status": e["status"],
                "asset_class": "UNKNOWN" if e.get("asset_class") is None else e["asset_class"],
                "settlement_days": _int(e.get("settlement_days"), 2),
                "min_notional": _money_in(e.get("min_notional")),
                "attributes": dict(e.get("attributes") or {}),
                "trade_by": e.get("trade_by") or "UNITS",  # RFC Step 4: UNITS or NOTIONAL
            }
            self.shelf.setdefault(e["instrument_id"], entry)
            self.settlement_days[e["instrument_id"]] = entry["settlement_days"]
            self.attribute_keys.update(entry["attributes"].keys())

    def in_group(self, instrument: str, key: str) -> bool:
        """Whether the instrument's shelf attributes put it in group ``attribute:value``."""
        attribute, value = key.split(":", 1)
        return (self.shelf.get(instrument) or {}).get("attributes", {}).get(attribute) == value

    def known_groups(self, opts: Options, diag: dict):
        """(key, max_weight) of the run's group constraints in key order; a constraint on
        an attribute no shelf entry carries is skipped with a warning (§6.4 step 2)."""
        for key in sorted(opts.group_constraints):
            attribute = key.split(":", 1)[0]
            if attribute not in self.attribute_keys:
                diag["warnings"].append(f"UNKNOWN_CONSTRAINT_ATTRIBUTE_{attribute}")
                continue
            yield key, opts.group_constraints[key]

    def rate(self, a: str, b: str) -> Decimal | None:
        """§6.1: identity 1.0, direct pair, inverse pair; zero counts as missing."""
        if a == b:
            return Decimal("1.0")
        r = self.fx.get(f"{a}/{b}")
        if r is not None and r != 0:
            return r
        r = self.fx.get(f"{b}/{a}")
        if r is not None and r != 0:
            return Decimal("1.0") / r
        return None


@dataclass
class DQ:
    """data_quality buckets; every occurrence appends (§6.8)."""
    price_missing: list = field(default_factory=list)
    fx_missing: list = field(default_factory=list)
    shelf_missing: list = field(default_factory=list)
    # features.md: instruments that stale_price_action EXCLUDE takes out of the universe for
    # want of a price (PRICE_MISSING): their missing price is no finding
    excused_prices: frozenset = frozenset()

    def missing_price(self, iid: str) -> None:
        if iid not in self.excused_prices:
            self.price_missing.append(iid)

    def blocks(self, opts: Options) -> bool:
        """The DQ gate test of §6.8 / §6.11 (without the target-status part)."""
        return bool(self.shelf_missing
                    or (self.price_missing and opts.block_on_missing_prices)
                    or (self.fx_missing and opts.block_on_missing_fx))

    def count(self, opts: Options) -> int:
        """DATA_QUALITY rule count (§6.17)."""
        return ((len(self.price_missing) if opts.block_on_missing_prices else 0)
                + (len(self.fx_missing) if opts.block_on_missing_fx else 0)
                + len(self.shelf_missing))

    def out(self) -> dict:
        return {"price_missing": list(self.price_missing), "fx_missing": list(self.fx_missing),
                "shelf_missing": list(self.shelf_missing)}


def _parse_positions(pf: dict) -> list[dict]:
    out = []
    for p in pf.get("positions") or []:
        out.append({
            "instrument_id": p["instrument_id"],
            "quantity": D(p["quantity"]),
            "market_value": _money_in(p.get("market_value")),
            "lots": [{"lot_id": l["lot_id"], "quantity": D(l["quantity"]),
                      "unit_cost": _money_in(l["unit_cost"]), "purchase_date": str(l["purchase_date"])}
                     for l in (p.get("lots") or [])],
        })
    return out


def _parse_cash(pf: dict) -> list[dict]:
    return [{"currency": c["currency"], "amount": D(c["amount"]),
             "settled": D(c.get("settled")), "pending": D(c.get("pending"))}
            for c in pf.get("cash_balances") or []]


def _first_position(positions: list[dict], iid: str) -> dict | None:
    for p in positions:
        if p["instrument_id"] == iid:
            return p
    return None


# ---------------------------------------------------------------------------
# §6.2 valuation
# ---------------------------------------------------------------------------

def value_state(positions: list[dict], cash: list[dict], base: str, mkt: Market,
                mode: str, dq: DQ) -> dict:
    """§6.2: value positions and cash in base; weights are raw here (rounded on output)."""
    rows = []
    for p in positions:
        iid = p["instrument_id"]
        pe = mkt.prices.get(iid)
        if pe is None:
            dq.missing_price(iid)
        price = pe["price"] if pe else ZERO
        ccy = pe["currency"] if pe else base
        mv = p["market_value"]
        if mode == "TRUST_SNAPSHOT" and mv is not None:
            value_instr = mv["amount"]
            ccy = mv["currency"]
        else:
            value_instr = p["quantity"] * price
        r = mkt.rate(ccy, base)
        if r is None:
            value_base = ZERO
            if ccy != base:
                dq.fx_missing.append(f"{ccy}/{base}")
        else:
            value_base = value_instr * r
        shelf = mkt.shelf.get(iid)
        rows.append({"instrument_id": iid, "quantity": p["quantity"], "ccy": ccy,
                     "asset_class": shelf["asset_class"] if shelf else "UNKNOWN",
                     "price": price if pe else None, "value_instr": value_instr,
                     "value_base": value_base,
                     "attributes": shelf["attributes"] if shelf else {}})
    cash_values = []
    for c in cash:
        if c["currency"] == base:
            cash_values.append(c["amount"])
            continue
        r = mkt.rate(c["currency"], base)
        if r is None:
            dq.fx_missing.append(f"{c['currency']}/{base}")
            continue
        cash_values.append(c["amount"] * r)
    cash_total = _sum(cash_values)
    # one running sum, positions then cash (the golden after-states' last digits show it)
    tv = _sum([row["value_base"] for row in rows] + cash_values)
    T = ONE if tv == 0 else tv
    for row in rows:
        row["weight"] = row["value_base"] / T
    by_class: dict[str, Decimal] = {}
    for row in rows:
        by_class[row["asset_class"]] = by_class.get(row["asset_class"], ZERO) + row["value_base"]
    by_class["CASH"] = by_class.get("CASH", ZERO) + cash_total
    by_attr: dict[str, dict[str, Decimal]] = {}
    for row in rows:
        for k, v in row["attributes"].items():
            bucket = by_attr.setdefault(k, {})
            bucket[v] = bucket.get(v, ZERO) + row["value_base"]
    return {"base": base, "tv": tv, "T": T, "rows": rows, "cash": cash,
            "positions": positions, "cash_total": cash_total,
            "cash_weight": by_class["CASH"] / T,
            "by_class": by_class, "by_attr": by_attr}


def state_out(st: dict) -> dict:
    """SimulatedState JSON (§5.1)."""
    base, T = st["base"], st["T"]
    positions = [{
        "instrument_id": r["instrument_id"], "quantity": s(r["quantity"]),
        "instrument_currency": r["ccy"], "asset_class": r["asset_class"],
        "price": money(r["price"], r["ccy"]) if r["price"] is not None else None,
        "value_in_instrument_ccy": money(r["value_instr"], r["ccy"]),
        "value_in_base_ccy": money(r["value_base"], base),
        "weight": w4(r["weight"]),
    } for r in st["rows"]]
    by_inst = [{"key": r["instrument_id"], "weight": w4(r["weight"]), "value": money(r["value_base"], base)}
               for r in st["rows"]]
    return {
        "total_value": money(st["tv"], base),
        "cash_balances": [{"currency": c["currency"], "amount": s(c["amount"]),
                           "settled": s(c["settled"]), "pending": s(c["pending"])} for c in st["cash"]],
        "positions": positions,
        "allocation_by_asset_class": [{"key": k, "weight": w4(v / T), "value": money(v, base)}
                                      for k, v in st["by_class"].items()],
        "allocation_by_instrument": by_inst,
        "allocation": [dict(x) for x in by_inst],
        "allocation_by_attribute": {k: [{"key": v, "weight": w4(a / T), "value": money(a, base)}
                                        for v, a in b.items()] for k, b in st["by_attr"].items()},
    }


# ---------------------------------------------------------------------------
# RFC-0001 Step 1 (snapshot skew) and Step 2 (price staleness)
# ---------------------------------------------------------------------------

def snapshot_skew(pf: dict, mkt: Market, opts: Options) -> bool:
    """RFC §6 Step 1 / features.md: "when both snapshots carry as_of, a larger skew
    [than max_skew_minutes] blocks the run (SNAPSHOT_SKEW)"; the limit itself is allowed."""
    if opts.max_skew_minutes is None:
        return False
    p_as_of, m_as_of = _timestamp(pf.get("as_of")), _timestamp(mkt.as_of_text)
    if p_as_of is None or m_as_of is None:
        return False
    return abs(p_as_of - m_as_of) > timedelta(minutes=opts.max_skew_minutes)


def base_currency_fx_missing(base: str, mkt: Market, opts: Options) -> bool:
    """RFC §6 Step 1: "Verify BaseCurrency exists in Market Data FX rates"; features.md:
    with require_base_currency_fx, no FX rate's "FROM/TO" pair names the base currency on
    either side of one of its slashes, as a conversion reads it (§6.1: the text "FROM/TO"),
    so that "USD/S/GD" names USD, USD/S, S/GD and GD: the run blocks (BASE_CURRENCY_FX_MISSING)."""
    if not opts.require_base_currency_fx:
        return False
    sides = {side for pair in mkt.fx for at, c in enumerate(pair) if c == "/" for side in (pair[:at], pair[at + 1:])}
    return base not in sides


def stale_instruments(pf: dict, positions: list[dict], targets: list[dict], mkt: Market,
                      opts: Options) -> list[str]:
    """RFC §6 Step 2 / features.md: the model targets and holdings whose price is older than
    max_staleness_minutes, against market_data_snapshot.as_of, else the portfolio's as_of
    (no reference time, or a price without as_of: nothing is stale). "Older than": a price
    exactly at the limit is fresh."""
    if opts.max_staleness_minutes is None:
        return []
    ref = _timestamp(mkt.as_of_text) or _timestamp(pf.get("as_of"))
    if ref is None:
        return []
    limit = timedelta(minutes=opts.max_staleness_minutes)
    out: list[str] = []
    for iid in [t["instrument_id"] for t in targets] + [p["instrument_id"] for p in positions]:
        pe = mkt.prices.get(iid)
        if pe is not None and pe["as_of"] is not None and ref - _timestamp(pe["as_of"]) > limit and iid not in out:
            out.append(iid)
    return out


# ---------------------------------------------------------------------------
# §6.3 universe
# ---------------------------------------------------------------------------

def build_universe(targets: list[dict], positions: list[dict], before: dict, mkt: Market,
                   opts: Options, dq: DQ, price_excluded: dict | None = None) -> dict:
    """§6.3: weight map, buy/sell lists, exclusions, SELL_ONLY excess. ``price_excluded``: the
    instruments that stale_price_action EXCLUDE takes out of the universe (RFC Step 2),
    each with its reason, PRICE_STALE or PRICE_MISSING."""
    price_excluded = price_excluded or {}
    wmap: dict[str, Decimal] = {}
    buy, sell, excluded = [], [], []
    sell_only_excess = ZERO
    for t in targets:
        iid, w = t["instrument_id"], t["weight"]
        e = mkt.shelf.get(iid)
        if e is None:
            if opts.missing_shelf_action == "EXCLUDE":
                # RFC Appendix A's SHELF_ENTRY_MISSING; features.md: excluded like a BANNED
                # target (not bought, no data-quality finding; a held one locked below)
                excluded.append((iid, "SHELF_ENTRY_MISSING"))
            else:
                dq.shelf_missing.append(iid)
            continue
        st = e["status"]
        if iid in price_excluded:
            # features.md: with EXCLUDE a stale instrument is excluded (PRICE_STALE). Docs
            # silent on a stale instrument that the shelf excludes too: as the engine, the
            # stale price decides, whatever the shelf status (a missing one likewise)
            excluded.append((iid, price_excluded[iid]))
        elif st in ("BANNED", "SUSPENDED") or (st == "RESTRICTED" and not opts.allow_restricted):
            excluded.append((iid, f"SHELF_STATUS_{st}"))
        elif st == "SELL_ONLY":
            sell_only_excess = sell_only_excess + w
            wmap[iid] = ZERO
            sell.append(iid)
            excluded.append((iid, "SHELF_STATUS_SELL_ONLY"))
        else:  # APPROVED, or RESTRICTED with allow_restricted
            wmap[iid] = w
            buy.append(iid)
            sell.append(iid)
    for p, row in zip(positions, before["rows"]):
        iid = p["instrument_id"]
        if p["quantity"] == 0 or iid in wmap:
            continue
        e = mkt.shelf.get(iid)
        if e is None:
            wmap[iid] = row["weight"]
            excluded.append((iid, "LOCKED_DUE_TO_MISSING_SHELF"))
        elif iid in price_excluded:
            # features.md: "with EXCLUDE the instrument is excluded (held ones locked)"; like
            # a shelf-excluded held model target (§6.3), a stale one is listed twice (engine)
            wmap[iid] = row["weight"]
            excluded.append((iid, price_excluded[iid]))
        elif e["status"] == "RESTRICTED" and opts.allow_restricted and opts.allow_restricted_holdings:
            # RFC Step 2 iterates "model and holdings": RESTRICTED is excluded "unless
            # options.allow_restricted = true", so a held one outside the model is then an
            # eligible holding with no model weight, sold like an off-model APPROVED one
            wmap[iid] = ZERO
            sell.append(iid)
        elif e["status"] == "BANNED" and opts.held_banned_action == "LIQUIDATE":
            # features.md (reference-semantics §9, RFC-0002: "BANNED → sell to 0%"): sold like
            # an off-model APPROVED holding; a BANNED model target stays excluded in loop 1
            wmap[iid] = ZERO
            sell.append(iid)
        elif e["status"] in ("SUSPENDED", "BANNED", "RESTRICTED"):
            wmap[iid] = row["weight"]
            excluded.append((iid, f"LOCKED_DUE_TO_{e['status']}"))
        else:  # APPROVED / SELL_ONLY held outside the model: liquidate
            wmap[iid] = ZERO
            sell.append(iid)
    return {"wmap": wmap, "buy": buy, "buyset": set(buy), "sell": sell, "excluded": excluded,
            "sell_only_excess": sell_only_excess}


def universe_out(u: dict, coverage: str) -> dict:
    return {"universe_id": "u_" + RUN_ID, "eligible_for_buy": list(u["buy"]),
            "eligible_for_sell": list(u["sell"]),
            "excluded": [{"instrument_id": i, "reason_code": c, "details": None} for i, c in u["excluded"]],
            "coverage": {"price_coverage_pct": coverage, "fx_coverage_pct": coverage}}


# ---------------------------------------------------------------------------
# §6.4 / §6.5 target generation (HEURISTIC) and trace
# ---------------------------------------------------------------------------

def _sum(values) -> Decimal:
    total = ZERO
    for v in values:
        total = total + v
    return total


def sell_only_redistribution(wmap: dict, buyset: set, excess: Decimal) -> str:
    """§6.4 step 1: spread SELL_ONLY model weight over buyable weights pro rata."""
    if not excess > 0:
        return "READY"
    R = [i for i in wmap if i in buyset]
    S = _sum(wmap[i] for i in R)
    if S > 0:
        for i in R:
            wmap[i] = wmap[i] + excess * (wmap[i] / S)
        return "READY"
    return "PENDING_REVIEW"


def apply_group_constraints(wmap: dict, buyset: set, mkt: Market, opts: Options, diag: dict) -> str:
    """§6.4 step 2: single pass over group caps in key order; BLOCKED if nothing can receive."""
    for key, mx in mkt.known_groups(opts, diag):
        members = [i for i in wmap if mkt.in_group(i, key)]
        if not members:
            continue
        G = _sum(wmap[i] for i in members)
        if G <= mx + Decimal("0.0001"):
            continue
        factor = mx / G
        for i in members:
            wmap[i] = wmap[i] * factor
        excess = G - mx
        memberset = set(members)
        cands = [i for i in wmap if i in buyset and i not in memberset]
        C = _sum(wmap[i] for i in cands)
        if C > 0:
            recipients = {}
            for c in cands:
                share = excess * (wmap[c] / C)
                wmap[c] = wmap[c] + share
                recipients[c] = s(share)
            diag["warnings"].append(f"CAPPED_BY_GROUP_LIMIT_{key}")
            diag["group_constraint_events"].append({
                "constraint_key": key, "group_weight_before": s(G), "max_weight": s(mx),
                "released_weight": s(excess), "recipients": recipients, "status": "CAPPED"})
        else:
            diag["warnings"].append(f"CAPPED_BY_GROUP_LIMIT_{key}")
            diag["warnings"].append("NO_ELIGIBLE_REDISTRIBUTION_DESTINATION")
            diag["group_constraint_events"].append({
                "constraint_key": key, "group_weight_before": s(G), "max_weight": s(mx),
                "released_weight": s(excess), "recipients": {}, "status": "BLOCKED"})
            return "BLOCKED"
    return "READY"


def normalise_above_one(wmap: dict, buyset: set) -> str:
    """§6.4 step 3: only above 1.0001, only buyable weights are scaled."""
    status = "READY"
    if not _sum(wmap.values()) > Decimal("1.0001"):
        return status
    L = _sum(w for i, w in wmap.items() if i not in buyset)
    avail = max(ZERO, ONE - L)
    if L > 1:
        status = "PENDING_REVIEW"
    B = _sum(w for i, w in wmap.items() if i in buyset)
    if B > avail:
        if B > 0:
            factor = avail / B
            for i in wmap:
                if i in buyset:
                    wmap[i] = wmap[i] * factor
        status = "PENDING_REVIEW"
    return status


def single_position_cap(wmap: dict, buyset: set, m: Decimal) -> str:
    """§6.4 step 4: cap every entry (locked too), hand the excess out from the remainder."""
    excess = _sum(max(ZERO, w - m) for w in wmap.values())
    for i in wmap:
        if wmap[i] > m:
            wmap[i] = m
    if not excess > 0:
        return "READY"
    cands = [i for i in wmap if i in buyset and wmap[i] < m]
    C = _sum(wmap[i] for i in cands)
    if C > 0:
        rem = excess
        for c in cands:
            share = min(rem * (wmap[c] / C), m - wmap[c])
            wmap[c] = wmap[c] + share
            rem = rem - share
        return "PENDING_REVIEW" if rem > Decimal("0.001") else "READY"
    return "PENDING_REVIEW"


def single_position_cap_rfc(wmap: dict, buyset: set, m: Decimal, mkt: Market, diag: dict) -> str:
    """RFC-0001 §6 Step 3 (single_position_cap_mode RFC_ASSET_CLASS), in place of step 4:
    cap every entry at m, and distribute each capped entry's excess "proportionally to other
    eligible instruments in the *same* Asset Class" (features.md: buyable instruments of the
    same asset class); "if a redistribution recipient now exceeds MaxWeight, the run is
    BLOCKED with error INFEASIBLE_CONCENTRATION (no recursive looping)"; features.md: "no
    recipient -> excess stays in cash, PENDING_REVIEW"."""
    def asset_class(i):
        e = mkt.shelf.get(i)
        return e["asset_class"] if e else "UNKNOWN"
    excess_by_class: dict[str, Decimal] = {}
    sources = [i for i, w in wmap.items() if w > m]  # in map order
    for i in sources:
        excess_by_class[asset_class(i)] = excess_by_class.get(asset_class(i), ZERO) + (wmap[i] - m)
        wmap[i] = m
    status = "READY"
    recipients = []
    for cls, excess in excess_by_class.items():
        # other eligible instruments: buyable, of the class, below the cap after capping
        cands = [i for i in wmap if i in buyset and asset_class(i) == cls and wmap[i] < m]
        C = _sum(wmap[i] for i in cands)
        if not C > 0:
            status = "PENDING_REVIEW"  # the excess stays in cash
            continue
        for c in cands:
            wmap[c] = wmap[c] + excess * (wmap[c] / C)
        recipients.extend(cands)
    over = [c for c in wmap if c in recipients and wmap[c] > m]  # in map order, as the detail names them
    if over:
        # a block reason dpm_vec adds leads the warnings (dpm_vec/codes.py), as SNAPSHOT_SKEW does
        diag["warnings"].insert(0, "INFEASIBLE_CONCENTRATION")
        # RFC §7's problem detail (features.md): the capped entries of each class a recipient
        # ended over the cap in, and those recipients, in map order
        classes = {asset_class(c) for c in over}
        named = [i for i in sources if asset_class(i) in classes]
        diag["_concentration"] = (f"Redistributing excess weight from {_listed(named)} caused {_listed(over)} "
                                  f"to exceed the {format((m * 100).normalize(), 'f')}% cap.")
        return "BLOCKED"
    return status


def _listed(names: list[str]) -> str:
    """A, B and C."""
    return names[0] if len(names) < 2 else ", ".join(names[:-1]) + " and " + names[-1]


def min_cash_buffer(wmap: dict, buyset: set, p: Decimal) -> str:
    """§6.4 step 5: scale buyable weights so that cash >= p."""
    if not p > 0:
        return "READY"
    B = _sum(w for i, w in wmap.items() if i in buyset)
    L = _sum(w for i, w in wmap.items() if i not in buyset)
    allowed = max(ZERO, ONE - p - L)
    if B > allowed:
        if B > 0:
            factor = allowed / B
            for i in wmap:
                if i in buyset:
                    wmap[i] = wmap[i] * factor
        return "PENDING_REVIEW"
    return "READY"


def _worse(a: str, b: str) -> str:
    order = {"READY": 0, "PENDING_REVIEW": 1, "BLOCKED": 2}
    return a if order[a] >= order[b] else b


def targets_heuristic(u: dict, mkt: Market, opts: Options, diag: dict) -> tuple[str, dict]:
    """§6.4: the five HEURISTIC steps on a copy of the weight map."""
    wmap = dict(u["wmap"])
    buyset = u["buyset"]
    status = sell_only_redistribution(wmap, buyset, u["sell_only_excess"])
    if opts.group_constraints:
        if apply_group_constraints(wmap, buyset, mkt, opts, diag) == "BLOCKED":
            return "BLOCKED", wmap
    status = _worse(status, normalise_above_one(wmap, buyset))
    if opts.single_position_max_weight is not None and opts.single_position_cap_mode == "RFC_ASSET_CLASS":
        rfc = single_position_cap_rfc(wmap, buyset, opts.single_position_max_weight, mkt, diag)
        if rfc == "BLOCKED":
            return "BLOCKED", wmap
        status = _worse(status, rfc)
    elif opts.single_position_max_weight is not None:
        status = _worse(status, single_position_cap(wmap, buyset, opts.single_position_max_weight))
    status = _worse(status, min_cash_buffer(wmap, buyset, opts.min_cash_buffer_pct))
    return status, wmap


def build_trace(targets: list[dict], wmap: dict, tv: Decimal) -> list[dict]:
    """§6.5: model rows (duplicates kept) then non-model map entries, with tags."""
    trace = []
    model_ids = {t["instrument_id"] for t in targets}
    for t in targets:
        fw = wmap.get(t["instrument_id"], ZERO)
        mw = t["weight"]
        tags = []
        if mw > fw:
            tags.append("CAPPED_BY_MAX_WEIGHT")
        if fw > mw:
            tags.append("REDISTRIBUTED_RECIPIENT")
        trace.append({"instrument_id": t["instrument_id"], "model_weight": mw, "final_weight": fw,
                      "final_value": tv * fw, "tags": tags})
    for iid, fw in wmap.items():
        if iid in model_ids:
            continue
        trace.append({"instrument_id": iid, "model_weight": Decimal("0.0"), "final_weight": fw,
                      "final_value": tv * fw,
                      "tags": ["IMPLICIT_SELL_TO_ZERO" if fw == 0 else "LOCKED_POSITION"]})
    return trace


# ---------------------------------------------------------------------------
# §6.6 target generation (SOLVER) and §6.7 method comparison
# ---------------------------------------------------------------------------

def _band_projection(model: list[Fraction], lo: Fraction, hi: Fraction,
                     cap: Fraction | None) -> list[Fraction] | None:
    """Projection of ``model`` onto {0 <= w (<= cap), lo <= Σw <= hi} in exact rationals:
    ``w_i = clip(model_i - λ, 0, cap)`` with ``λ = 0`` when the clipped model's sum lies in
    the band, else the ``λ`` that puts the sum on the violated edge (§6.6). The sum
    ``S(λ)`` is piecewise linear and non-increasing with kinks at ``model_i`` and
    ``model_i - cap``, so ``λ`` is found on the segment between two kinks. None when the
    set is empty."""
    n = len(model)
    if lo > hi or hi < 0 or (cap is not None and (cap < 0 or lo > n * cap)):
        return None

    def clipped(lam: Fraction) -> list[Fraction]:
        return [min(max(x - lam, Fraction(0)), cap) if cap is not None else max(x - lam, Fraction(0)) for x in model]

    total = sum(clipped(Fraction(0)), Fraction(0))
    if lo <= total <= hi:
        return clipped(Fraction(0))
    target = hi if total > hi else lo
    kinks = sorted(set(model) | ({x - cap for x in model} if cap is not None else set()))
    sums = [sum(clipped(k), Fraction(0)) for k in kinks]
    if target > sums[0]:
        # left of every kink: at the cap (flat, unreachable) or, uncapped, all free
        if cap is not None:
            return None
        return clipped(kinks[0] - (target - sums[0]) / n)
    for a, b, sa, sb in zip(kinks, kinks[1:], sums, sums[1:]):
        if sa >= target >= sb:
            return clipped(a if sa == sb else a + (sa - target) / (sa - sb) * (b - a))
    return clipped(kinks[-1])  # target 0, reached at the last kink


def _grouped_projection(model: list[Fraction], lo: Fraction, hi: Fraction, cap: Fraction | None,
                        groups: list[tuple[list[int], Fraction]]) -> list[Fraction] | None:
    """Projection of ``model`` onto {0 <= w (<= cap), lo <= Σw <= hi, Σ_group w <= limit}
    in exact rationals (§6.6: "solve the small QP exactly"); None when the set is empty.

    Goldfarb and Idnani's dual active-set method with the identity Hessian, each
    constraint written ``normal · w >= bound``: start at the model, take the most violated
    constraint, and move along the part of its normal that keeps the active constraints
    tight, dropping an active constraint whose multiplier would turn negative. A violated
    constraint that admits neither move proves the set empty. Exact arithmetic settles
    ties and midpoints; the answer is checked against the KKT conditions before use."""
    n = len(model)
    rows: list[tuple[list[int], Fraction]] = []
    for i in range(n):
        rows.append(([int(j == i) for j in range(n)], Fraction(0)))
        if cap is not None:
            rows.append(([-int(j == i) for j in range(n)], -cap))
    rows.append(([1] * n, lo))
    rows.append(([-1] * n, -hi))
    for idx, limit in groups:
        rows.append(([-int(j in idx) for j in range(n)], -limit))

    def dot(a: list, v: list) -> Fraction:
        return sum((x * y for x, y in zip(a, v) if x), Fraction(0))

    w = list(model)
    active: list[int] = []
    mult: list[Fraction] = []
    while True:
        slack, p = min(((dot(rows[j][0], w) - rows[j][1], j) for j in range(len(rows)) if j not in active),
                       default=(Fraction(0), -1))
        if slack >= 0:
            break
        normal = rows[p][0]
        mult_p = Fraction(0)
        while True:
            # r: normal's coordinates on the active normals (least squares), z: the rest
            gram = [[dot(rows[a][0], rows[b][0]) for b in active] for a in active]
            r = _solve_exact(gram, [dot(rows[a][0], normal) for a in active])
            z = [normal[i] - sum((rk * rows[a][0][i] for rk, a in zip(r, active)), Fraction(0)) for i in range(n)]
            zz = dot(z, normal)
            full = -(dot(normal, w) - rows[p][1]) / zz if zz else None
            drops = [(mult[k] / r[k], k) for k in range(len(active)) if r[k] > 0]
            partial, k = min(drops) if drops else (None, -1)
            if full is None and partial is None:
                return None
            t = full if partial is None or (full is not None and full <= partial) else partial
            if full is not None:
                w = [wi + t * zi for wi, zi in zip(w, z)]
            mult = [mk - t * rk for mk, rk in zip(mult, r)]
            mult_p += t
            if t == full:
                active.append(p)
                mult.append(mult_p)
                break
            del active[k]
            del mult[k]
    gradient = [wi - ci for wi, ci in zip(w, model)]
    combination = [sum((mk * rows[a][0][i] for mk, a in zip(mult, active)), Fraction(0)) for i in range(n)]
    if gradient != combination or any(mk < 0 for mk in mult):
        raise ArithmeticError(f"SOLVER oracle: the grouped projection of {model} breaks its KKT conditions")
    return w


def _solve_exact(matrix: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """Gauss-Jordan in rationals for a non-singular system (the active normals' Gram
    matrix: Goldfarb-Idnani keeps those normals linearly independent)."""
    size = len(rhs)
    rows = [[Fraction(x) for x in row] + [Fraction(b)] for row, b in zip(matrix, rhs)]
    for col in range(size):
        pivot = next(r for r in range(col, size) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        head = rows[col][col]
        rows[col] = [x / head for x in rows[col]]
        for r in range(size):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [x - factor * y for x, y in zip(rows[r], rows[col])]
    return [row[size] for row in rows]


def targets_solver(u: dict, targets: list[dict], mkt: Market, opts: Options, diag: dict) -> tuple[str, dict]:
    """§6.6: SELL_ONLY step, then the projection of model weights onto the feasible set."""
    wmap = dict(u["wmap"])
    buyset = u["buyset"]
    status = sell_only_redistribution(wmap, buyset, u["sell_only_excess"])
    tradeable = [i for i in wmap if i in buyset]
    locked = [i for i in wmap if i not in buyset]
    L = _sum(wmap[i] for i in locked)
    if not tradeable:
        return status, wmap
    model_w = {}
    for t in targets:
        model_w[t["instrument_id"]] = t["weight"]
    lo = ONE - opts.cash_band_max_weight - L
    hi = ONE - opts.cash_band_min_weight - L
    m = opts.single_position_max_weight
    groups = []
    infeasible = False
    for key, mx in mkt.known_groups(opts, diag):
        Gt = [j for j, i in enumerate(tradeable) if mkt.in_group(i, key)]
        Gl = _sum(wmap[i] for i in locked if mkt.in_group(i, key))
        if not Gt:
            infeasible |= Gl > mx  # a constant constraint: locked weight alone over the cap
            continue
        groups.append((Gt, Fraction(mx - Gl)))
    c = [Fraction(model_w[i]) for i in tradeable]
    bound = None if m is None else Fraction(m)
    if infeasible:
        sol = None
    elif groups:
        sol = _grouped_projection(c, Fraction(lo), Fraction(hi), bound, groups)
    else:
        sol = _band_projection(c, Fraction(lo), Fraction(hi), bound)
    if sol is None:
        diag["warnings"].append("INFEASIBLE_INFEASIBLE")
        if opts.cash_band_min_weight > opts.cash_band_max_weight:
            diag["warnings"].append("INFEASIBILITY_HINT_CASH_BAND_CONTRADICTION")
        if m is not None and m * Decimal(len(tradeable)) < ONE - opts.cash_band_max_weight - L:
            diag["warnings"].append("INFEASIBILITY_HINT_SINGLE_POSITION_CAPACITY")
        for key in sorted(opts.group_constraints):
            Gl = _sum(wmap[i] for i in locked if mkt.in_group(i, key))
            if Gl > opts.group_constraints[key]:
                diag["warnings"].append(f"INFEASIBILITY_HINT_LOCKED_GROUP_WEIGHT_{key}")
        return "BLOCKED", wmap
    for i, w in zip(tradeable, sol):
        wmap[i] = Decimal(round(w * 10_000)).scaleb(-4)  # round() on a Fraction is half-even
    return status, wmap


def generate_targets(method: str, u: dict, targets: list[dict], mkt: Market, opts: Options,
                     diag: dict) -> tuple[str, dict]:
    if method == "SOLVER":
        return targets_solver(u, targets, mkt, opts, diag)
    return targets_heuristic(u, mkt, opts, diag)


def compare_methods(primary: str, p_status: str, p_trace: list, u: dict, targets: list[dict],
                    mkt: Market, opts: Options, tv: Decimal, diag: dict) -> dict:
    """§6.7: run the other method on a fresh map, report divergence."""
    alt = "HEURISTIC" if primary == "SOLVER" else "SOLVER"
    alt_diag = _new_diag()
    a_status, a_map = generate_targets(alt, u, targets, mkt, opts, alt_diag)
    a_trace = [] if a_status == "BLOCKED" else build_trace(targets, a_map, tv)
    pw = {r["instrument_id"]: r["final_weight"] for r in p_trace}
    aw = {r["instrument_id"]: r["final_weight"] for r in a_trace}
    tol = opts.compare_target_methods_tolerance
    differing = sorted(i for i in set(pw) | set(aw) if abs(pw.get(i, ZERO) - aw.get(i, ZERO)) > tol)
    if p_status != a_status:
        diag["warnings"].append("TARGET_METHOD_STATUS_DIVERGENCE")
    if differing:
        diag["warnings"].append("TARGET_METHOD_WEIGHT_DIVERGENCE")
    return {"primary_method": primary, "primary_status": p_status, "alternate_method": alt,
            "alternate_status": a_status, "tolerance": s(tol), "differing_instruments": differing,
            "alternate_warnings": sorted(set(alt_diag["warnings"]))}


# ---------------------------------------------------------------------------
# §6.9 / §6.10 trade translation with tax limiting and dust suppression
# ---------------------------------------------------------------------------

@dataclass
class TaxState:
    """Run-level HIFO accumulators (§6.10 step 3)."""
    gains: Decimal = ZERO
    losses: Decimal = ZERO
    used: Decimal = ZERO
    warned: bool = False


def tax_limit_sell(iid: str, requested: Decimal, pos: dict, price: Decimal, pccy: str, r: Decimal,
                   mkt: Market, opts: Options, tax: TaxState, diag: dict, dq: DQ) -> tuple[Decimal, bool]:
    """§6.10: HIFO lot walk under the run-wide gains budget. Returns (quantity, limited)."""
    lots = []
    for lot in pos["lots"]:
        uc = lot["unit_cost"]
        if uc["currency"] == pccy:
            cost = uc["amount"]
        else:
            fx = mkt.rate(uc["currency"], pccy)
            if fx is None:
                dq.fx_missing.append(f"{uc['currency']}/{pccy}")
                return requested, False
            cost = uc["amount"] * fx
        lots.append((cost, lot["purchase_date"], lot["lot_id"], lot["quantity"]))
    lots.sort(key=lambda x: (x[0], x[1], x[2]), reverse=True)
    B = opts.max_realized_capital_gains
    remaining, allowed = requested, ZERO
    for cost, _date, _lid, lq in lots:
        if remaining <= 0:
            break
        if lq <= 0:
            continue
        share = min(remaining, lq)
        take = share
        g = (price - cost) * r
        if B is not None and g > 0:
            take = min(take, (B - tax.used) / g) if tax.used < B else ZERO
        if take <= 0:
            break
        realised = g * take
        if realised >= 0:
            tax.gains = tax.gains + realised
            tax.used = tax.used + realised
        else:
            tax.losses = tax.losses + abs(realised)
        allowed = allowed + take
        remaining = remaining - take
        if take < share:
            break
    if allowed < requested:
        if not tax.warned:
            diag["warnings"].append("TAX_BUDGET_LIMIT_REACHED")
            tax.warned = True
        diag["tax_budget_constraint_events"].append({
            "instrument_id": iid, "requested_quantity": s(requested), "allowed_quantity": s(allowed),
            "reason_code": "TAX_BUDGET_LIMIT_REACHED"})
        return allowed, True
    return allowed, False


def rationale_code(iid: str, side: str, fw: Decimal, pos: dict | None, model_weight: Decimal, cap: Decimal | None,
                   model_ids: set) -> str:
    """RFC Appendix A codes (rfc_rationale_codes; features.md, in this order): LIQUIDATION
    (off-model sells; RFC: "Selling excluded asset", so, as the engine, also a sell of a model
    target whose final weight is 0), CONSTRAINT_CAP ("Capped at max": a model weight above
    the single-position max, the RFC's condition for capping a target, §6 step 3),
    CASH_INVESTMENT (buys of instruments not held), REBALANCE_DRIFT (others)."""
    if side == "SELL" and (iid not in model_ids or fw == 0):
        return "LIQUIDATION"
    if cap is not None and model_weight > cap:
        return "CONSTRAINT_CAP"
    if side == "BUY" and (pos is None or pos["quantity"] == 0):
        return "CASH_INVESTMENT"
    return "REBALANCE_DRIFT"


def translate_trades(trace: list[dict], positions: list[dict], tv: Decimal, base: str, mkt: Market,
                     opts: Options, tax: TaxState, diag: dict, dq: DQ, model_ids: set = frozenset()) -> list[dict]:
    """§6.9: size each trace instrument in floored units; tax-limit sells; suppress dust."""
    weights: dict[str, Decimal] = {}
    model_weights: dict[str, Decimal] = {}
    for row in trace:  # first occurrence keeps position, last duplicate's weight applies
        weights[row["instrument_id"]] = row["final_weight"]
        model_weights[row["instrument_id"]] = row["model_weight"]
    intents = []
    for iid, fw in weights.items():
        pe = mkt.prices.get(iid)
        if pe is None:
            dq.missing_price(iid)
            continue
        price, pccy = pe["price"], pe["currency"]
        r = mkt.rate(pccy, base)
        if r is None:
            dq.fx_missing.append(f"{pccy}/{base}")
            continue
        target_instr = (tv * fw) / r
        pos = _first_position(positions, iid)
        mv = pos["market_value"] if pos is not None else None
        if opts.delta_from_valuation and opts.valuation_mode != "TRUST_SNAPSHOT":
            mv = None  # RFC "DeltaValue = TargetValue - CurrentValue", valued as Step 1's valuation values it
        if pos is None:
            current = ZERO
        elif mv is not None and opts.delta_from_valuation and mv["currency"] != pccy:
            mv_rate = mkt.rate(mv["currency"], base)  # the valuation's base value, over the target's rate
            current = ZERO if mv_rate is None else (mv["amount"] * mv_rate) / r
        elif mv is not None:
            current = mv["amount"]  # the reference: the market value as is, whatever the mode and currency
        else:
            current = pos["quantity"] * price
        delta = target_instr - current
        side = "BUY" if delta > 0 else "SELL"
        shelf = mkt.shelf.get(iid)
        amount = None
        if opts.notional_sizing and shelf is not None and shelf["trade_by"] == "NOTIONAL":
            # RFC Step 4 "Notional (Funds): Amount = round(abs(DeltaValue), 2)"; features.md:
            # "quantity is amount / price; a sell is capped at the holding"
            amount = abs(delta).quantize(CENT, rounding=ROUND_HALF_EVEN)
            qty = amount / price
            if side == "SELL" and pos is not None and qty > pos["quantity"]:
                qty, amount = pos["quantity"], None  # capped: notional = quantity x price below
        else:
            qty = abs(delta) // price  # exact integer part (§1.1)
        limited = False
        if side == "SELL" and qty > 0 and opts.enable_tax_awareness and pos is not None and pos["lots"]:
            qty, limited = tax_limit_sell(iid, qty, pos, price, pccy, r, mkt, opts, tax, diag, dq)
        # a notional-sized trade's notional is its amount; a sell capped at the holding or
        # limited by the tax budget (docs silent; as the engine) is quantity x price
        notional = amount if amount is not None and not limited else qty * price
        notional_base = notional * r
        threshold = opts.min_trade_notional or (shelf["min_notional"] if shelf else None)
        if opts.suppress_dust_trades and threshold is not None and notional < threshold["amount"]:
            diag["suppressed_intents"].append({
                "instrument_id": iid, "reason": "BELOW_MIN_NOTIONAL",
                "intended_notional": money(notional, pccy),
                "threshold": money(threshold["amount"], threshold["currency"])})
            continue
        if qty > 0:
            applied = (["MIN_NOTIONAL"] if threshold is not None else []) + (["TAX_BUDGET"] if limited else [])
            intents.append({
                "intent_type": "SECURITY_TRADE", "intent_id": f"oi_{len(intents) + 1}",
                "instrument_id": iid, "side": side, "quantity": qty,
                "notional": notional, "ccy": pccy, "notional_base": notional_base,
                "dependencies": [], "constraints_applied": applied,
                "code": (rationale_code(iid, side, fw, pos, model_weights[iid], opts.single_position_max_weight, model_ids) if opts.rfc_rationale_codes
                         else "DRIFT_REBALANCE")})
    return intents


# ---------------------------------------------------------------------------
# §6.12 turnover cap
# ---------------------------------------------------------------------------

def apply_turnover_cap(intents: list[dict], tv: Decimal, base: str, opts: Options, diag: dict) -> list[dict]:
    """§6.12: rank by score, keep greedily with skip-and-continue; survivors keep rank order."""
    p = opts.max_turnover_pct
    if p is None:
        return intents
    budget = tv * p
    proposed = _sum(abs(i["notional_base"]) for i in intents)
    if proposed <= budget:
        return intents
    ranked = []
    for it in intents:
        a = abs(it["notional_base"])
        score = a / tv if tv > 0 else ZERO
        ranked.append((score, a, it))
    ranked.sort(key=lambda x: (-x[0], x[1], x[2]["instrument_id"], x[2]["intent_id"]))
    used, kept = ZERO, []
    for score, a, it in ranked:
        if used + a <= budget:
            used = used + a
            kept.append(it)
        else:
            diag["dropped_intents"].append({
                "instrument_id": it["instrument_id"], "reason": "TURNOVER_LIMIT",
                "potential_notional": money(a, base), "score": s(score)})
    if diag["dropped_intents"]:
        diag["warnings"].append("PARTIAL_REBALANCE_TURNOVER_LIMIT")
    return kept


# ---------------------------------------------------------------------------
# §6.13 FX funding / sweep, §6.14 dependencies and ordering
# ---------------------------------------------------------------------------

def fx_funding_and_sweep(intents: list[dict], cash: list[dict], base: str, mkt: Market,
                         opts: Options, dq: DQ) -> tuple[list[dict], bool]:
    """§6.13: net projected cash per currency; FUNDING buys shortfall+buffer, SWEEP the rest."""
    projected: dict[str, Decimal] = {}
    for c in cash:
        projected[c["currency"]] = c["amount"]  # last duplicate row wins, first position kept
    for it in intents:
        cur = projected.get(it["ccy"], ZERO)
        projected[it["ccy"]] = cur + it["notional"] if it["side"] == "SELL" else cur - it["notional"]
    out = list(intents)
    blocked = False
    for ccy, bal in projected.items():
        if ccy == base:
            continue
        r = mkt.rate(ccy, base)
        if r is None:
            dq.fx_missing.append(f"{ccy}/{base}")
            if opts.block_on_missing_fx:
                blocked = True
            continue
        if bal < 0:
            buy_amount = abs(bal) * (ONE + opts.fx_buffer_pct)
            fx = {"buy_currency": ccy, "buy_amount": buy_amount, "sell_currency": base,
                  "sell_amount_estimated": buy_amount * r, "code": "FUNDING", "message": "Fund"}
        elif bal > 0:
            if opts.fx_sweep_threshold is not None and not bal * r > opts.fx_sweep_threshold:
                # RFC Step 5: "If NetFlow + CurrentCash > Threshold (Excess): generate FX SELL";
                # features.md: the threshold is in base currency, the balance stays otherwise
                continue
            fx = {"buy_currency": base, "buy_amount": bal * r, "sell_currency": ccy,
                  "sell_amount_estimated": bal, "code": "SWEEP", "message": "Sweep"}
        else:
            continue
        fx.update({"intent_type": "FX_SPOT", "intent_id": f"oi_fx_{len(out) + 1}",
                   "pair": f"{ccy}/{base}", "dependencies": []})
        out.append(fx)
    return out, blocked


def order_with_dependencies(intents: list[dict], sell_dependencies: bool = True) -> list[dict]:
    """§6.14: BUYs depend on their FUNDING FX and on the last SELL of their currency (RFC
    Step 5 with ``rfc_fx_dependencies``: on their FUNDING FX alone); stable sort SELL, FX, BUY."""
    funding = {it["buy_currency"]: it["intent_id"] for it in intents
               if it["intent_type"] == "FX_SPOT" and it["code"] == "FUNDING"}
    for it in intents:
        if it["intent_type"] == "SECURITY_TRADE" and it["side"] == "BUY" and it["ccy"] in funding:
            it["dependencies"].append(funding[it["ccy"]])
    last_sell: dict[str, str] = {}
    for it in intents:
        if sell_dependencies and it["intent_type"] == "SECURITY_TRADE" and it["side"] == "SELL":
            last_sell[it["ccy"]] = it["intent_id"]
    for it in intents:
        if it["intent_type"] == "SECURITY_TRADE" and it["side"] == "BUY" and it["ccy"] in last_sell:
            if last_sell[it["ccy"]] not in it["dependencies"]:
                it["dependencies"].append(last_sell[it["ccy"]])

    def group(it):
        if it["intent_type"] == "FX_SPOT":
            return 2
        return 1 if it["side"] == "SELL" else 3
    return sorted(intents, key=group)


def with_rfc_messages(out: dict, cap: Decimal | None) -> None:
    """features.md (rfc_rationale_codes), RFC §5.2's "Allocation 15% < Target 20%": each
    security intent's message compares, as printed to 4 dp and shown in percent, the first
    before-state position's weight (0 if not held) with the last target row's final weight;
    CASH_INVESTMENT, LIQUIDATION and CONSTRAINT_CAP ("Capped at max <cap>%") lead with their
    own words."""
    def percent(weight: str | Decimal) -> str:
        # features.md: rounded at 26 decimals first (a last digit from a midpoint is on it)
        with localcontext(Context(prec=60)):
            guarded = Decimal(weight).quantize(Decimal("1e-26"), rounding=ROUND_HALF_EVEN)
            text = format(guarded.quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN) * 100, "f")
        return text.rstrip("0").rstrip(".") if "." in text else text

    current: dict[str, str] = {}
    for p in out["before"]["positions"]:
        current.setdefault(p["instrument_id"], p["weight"])
    final = {t["instrument_id"]: t["final_weight"] for t in out["target"]["targets"]}
    for it in out["intents"]:
        if it["intent_type"] != "SECURITY_TRADE":
            continue
        iid, code = it["instrument_id"], it["rationale"]["code"]
        a, t = percent(current.get(iid, "0")), percent(final[iid])
        relation = "<" if Decimal(a) < Decimal(t) else ">" if Decimal(a) > Decimal(t) else "="
        lead = {"CASH_INVESTMENT": "Investing cash: ", "LIQUIDATION": "Liquidation: "}.get(code, "")
        if code == "CONSTRAINT_CAP":
            lead = f"Capped at max {percent(cap)}%: "
        it["rationale"]["message"] = f"{lead}Allocation {a}% {relation} Target {t}%"


def intent_out(it: dict, base: str) -> dict:
    if it["intent_type"] == "FX_SPOT":
        return {"intent_type": "FX_SPOT", "intent_id": it["intent_id"], "pair": it["pair"],
                "buy_currency": it["buy_currency"], "buy_amount": s(it["buy_amount"]),
                "sell_currency": it["sell_currency"],
                "sell_amount_estimated": s(it["sell_amount_estimated"]),
                "dependencies": list(it["dependencies"]),
                "rationale": {"code": it["code"], "message": it["message"]}}
    return {"intent_type": "SECURITY_TRADE", "intent_id": it["intent_id"],
            "instrument_id": it["instrument_id"], "side": it["side"], "quantity": s(it["quantity"]),
            "notional": money(it["notional"], it["ccy"]), "notional_base": money(it["notional_base"], base),
            "dependencies": list(it["dependencies"]),
            "rationale": {"code": it["code"], "message": "Align"},
            "constraints_applied": list(it["constraints_applied"])}


# ---------------------------------------------------------------------------
# §6.15 settlement ladder
# ---------------------------------------------------------------------------

def settlement_ladder(intents: list[dict], cash: list[dict], mkt: Market, opts: Options,
                      diag: dict) -> dict | None:
    """§6.15: cumulative per-currency cash by settlement day; returns the blocking rule or None."""
    days = {it["intent_id"]: mkt.settlement_days.get(it["instrument_id"], 2)
            for it in intents if it["intent_type"] == "SECURITY_TRADE"}
    horizon = max(opts.settlement_horizon_days, opts.fx_settlement_days, max(days.values(), default=0))
    flows: dict[str, list[Decimal]] = {}

    def add(ccy, day, amount):
        row = flows.setdefault(ccy, [ZERO] * (horizon + 1))
        row[day] = row[day] + amount
    for c in cash:
        add(c["currency"], 0, c["settled"] if c["settled"] is not None else c["amount"])
    for it in sorted(intents, key=lambda x: x["intent_id"]):
        if it["intent_type"] == "SECURITY_TRADE":
            add(it["ccy"], days[it["intent_id"]], it["notional"] if it["side"] == "SELL" else -it["notional"])
        else:
            add(it["sell_currency"], opts.fx_settlement_days, -it["sell_amount_estimated"])
            add(it["buy_currency"], opts.fx_settlement_days, it["buy_amount"])
    utilised = False
    breaches = []
    for ccy in sorted(flows):
        allowance = opts.max_overdraft_by_ccy.get(ccy, ZERO)
        floor = -allowance
        running = ZERO
        for day in range(horizon + 1):
            running = running + flows[ccy][day]
            diag["cash_ladder"].append({"date_offset": day, "currency": ccy, "projected_balance": s(running)})
            if running < 0 and allowance > 0:
                utilised = True
            if running < floor:
                b = {"date_offset": day, "currency": ccy, "projected_balance": s(running),
                     "allowed_floor": s(floor), "reason_code": f"OVERDRAFT_ON_T_PLUS_{day}"}
                diag["cash_ladder_breaches"].append(b)
                breaches.append((b, running, floor))
    if utilised:
        diag["warnings"].append("SETTLEMENT_OVERDRAFT_UTILIZED")
    if not breaches:
        return None
    b, bal, floor = breaches[0]
    diag["warnings"].append(b["reason_code"])
    return {"rule_id": "SETTLEMENT_CASH_LADDER", "severity": "HARD", "status": "FAIL",
            "measured": s(floor - bal), "threshold": {"min": s(floor)}, "reason_code": b["reason_code"],
            "remediation_hint": "Adjust timing, funding, or overdraft settings."}


# ---------------------------------------------------------------------------
# §6.16 after-state
# ---------------------------------------------------------------------------

def apply_intents(positions: list[dict], cash: list[dict], intents: list[dict]) -> tuple[list, list]:
    """§6.16: apply the sorted intents to a copy of the portfolio (first match rows)."""
    pos = [dict(p) for p in positions]
    cash = [dict(c) for c in cash]

    def cash_row(ccy):
        for c in cash:
            if c["currency"] == ccy:
                return c
        c = {"currency": ccy, "amount": ZERO, "settled": None, "pending": None}
        cash.append(c)
        return c
    for it in intents:
        if it["intent_type"] == "SECURITY_TRADE":
            p = _first_position(pos, it["instrument_id"])
            if p is None:
                p = {"instrument_id": it["instrument_id"], "quantity": ZERO, "market_value": None, "lots": []}
                pos.append(p)
            c = cash_row(it["ccy"])
            if it["side"] == "BUY":
                p["quantity"] = p["quantity"] + it["quantity"]
                c["amount"] = c["amount"] - it["notional"]
            else:
                p["quantity"] = p["quantity"] - it["quantity"]
                c["amount"] = c["amount"] + it["notional"]
        else:
            c = cash_row(it["sell_currency"])
            c["amount"] = c["amount"] - it["sell_amount_estimated"]
            c = cash_row(it["buy_currency"])
            c["amount"] = c["amount"] + it["buy_amount"]
    return pos, cash


# ---------------------------------------------------------------------------
# §6.17 rules, §6.18 reconciliation
# ---------------------------------------------------------------------------

def _rule(rule_id, severity, ok, measured, threshold, fail_reason, pass_reason, hint):
    return {"rule_id": rule_id, "severity": severity, "status": "PASS" if ok else "FAIL",
            "measured": s(measured), "threshold": {k: s(v) for k, v in threshold.items()},
            "reason_code": pass_reason if ok else fail_reason, "remediation_hint": None if ok else hint}


def evaluate_rules(st: dict, opts: Options, dq: DQ, suppressed_count: int) -> list[dict]:
    """§6.17: the six core rules (SINGLE_POSITION_MAX may fail several times)."""
    rules = []
    cw = st["cash_weight"]
    lo, hi = opts.cash_band_min_weight, opts.cash_band_max_weight
    rules.append(_rule("CASH_BAND", "SOFT", not (cw < lo or cw > hi), cw, {"min": lo, "max": hi},
                       "THRESHOLD_BREACH", "OK", "Portfolio cash is outside policy bands."))
    m = opts.single_position_max_weight
    if m is None:
        rules.append(_rule("SINGLE_POSITION_MAX", "HARD", True, ZERO, {"max": Decimal(-1)},
                           "LIMIT_BREACH", "NO_LIMIT_SET", None))
    else:
        fails, largest = [], ZERO
        for r in st["rows"]:
            w = r["weight"]
            if w > m + Decimal("0.001"):
                fails.append(_rule("SINGLE_POSITION_MAX", "HARD", False, w, {"max": m}, "LIMIT_BREACH", "OK",
                                   f"Instrument {r['instrument_id']} exceeds max weight."))
            if w > largest:
                largest = w
        rules.extend(fails or [_rule("SINGLE_POSITION_MAX", "HARD", True, largest, {"max": m},
                                     "LIMIT_BREACH", "OK", None)])
    n = dq.count(opts)
    rules.append(_rule("DATA_QUALITY", "HARD", n == 0, Decimal(n), {"max": ZERO}, "MISSING_DATA", "OK",
                       "Check diagnostics for missing prices/FX."))
    rules.append(_rule("MIN_TRADE_SIZE", "SOFT", True, Decimal(suppressed_count), {"min": ZERO}, None,
                       "INTENTS_SUPPRESSED" if suppressed_count > 0 else "OK", None))
    negq = [p["quantity"] for p in st["positions"] if p["quantity"] < 0]
    rules.append(_rule("NO_SHORTING", "HARD", not negq, min(negq) if negq else ZERO, {"min": ZERO},
                       "SELL_EXCEEDS_HOLDINGS", "OK", "Reduce sell quantity."))
    negc = [c["amount"] for c in st["cash"] if c["amount"] < 0]
    rules.append(_rule("INSUFFICIENT_CASH", "HARD", not negc, min(negc) if negc else ZERO, {"min": ZERO},
                       "CASH_BALANCE_NEGATIVE", "OK", "Ensure sufficient funding."))
    return rules


def reconcile(before_tv: Decimal, after_tv: Decimal, base: str) -> tuple[dict, dict | None]:
    """§6.18: OK within 0.5 + before × 0.0005 (signed), else a RECONCILIATION HARD fail."""
    delta = after_tv - before_tv
    tolerance = Decimal("0.5") + before_tv * Decimal("0.0005")
    diff = abs(after_tv - before_tv)
    ok = diff <= tolerance
    rec = {"before_total_value": money(before_tv, base), "after_total_value": money(after_tv, base),
           "delta": money(delta, base), "tolerance": money(tolerance, base),
           "status": "OK" if ok else "MISMATCH"}
    rule = None if ok else {
        "rule_id": "RECONCILIATION", "severity": "HARD", "status": "FAIL", "measured": s(diff),
        "threshold": {"max": s(tolerance)}, "reason_code": "VALUE_MISMATCH",
        "remediation_hint": "Check pricing/FX or engine logic."}
    return rec, rule


# ---------------------------------------------------------------------------
# §6.19 final status, §6.20 gate decision
# ---------------------------------------------------------------------------

def final_status(blocked: bool, rules: list[dict], target_status: str) -> str:
    """§6.19: BLOCKED > any SOFT fail > target-stage PENDING_REVIEW > READY."""
    if blocked:
        return "BLOCKED"
    if any(r["severity"] == "SOFT" and r["status"] == "FAIL" for r in rules):
        return "PENDING_REVIEW"
    if target_status == "PENDING_REVIEW":
        return "PENDING_REVIEW"
    return "READY"


def gate_decision(status: str, rules: list[dict], dq: DQ, opts: Options) -> dict | None:
    """§6.20: workflow gate from status, failed rules and data-quality findings."""
    if not opts.enable_workflow_gates:
        return None
    reasons = []
    hard = soft = 0
    for r in rules:
        if r["status"] != "FAIL":
            continue
        if r["severity"] == "HARD":
            hard += 1
            reasons.append({"reason_code": f"HARD_RULE_FAIL:{r['rule_id']}", "severity": "HIGH",
                            "source": "RULE_ENGINE", "details": {"reason_code": r["reason_code"]}})
        elif r["severity"] == "SOFT":
            soft += 1
            reasons.append({"reason_code": f"SOFT_RULE_FAIL:{r['rule_id']}", "severity": "MEDIUM",
                            "source": "RULE_ENGINE", "details": {"reason_code": r["reason_code"]}})
    if dq.price_missing:
        reasons.append({"reason_code": "DATA_QUALITY_MISSING_PRICE", "severity": "HIGH",
                        "source": "DATA_QUALITY", "details": {"count": str(len(dq.price_missing))}})
    if dq.fx_missing:
        reasons.append({"reason_code": "DATA_QUALITY_MISSING_FX", "severity": "HIGH",
                        "source": "DATA_QUALITY", "details": {"count": str(len(dq.fx_missing))}})
    sev = {"HIGH": 0, "MEDIUM": 1, "LOW": 2}
    reasons.sort(key=lambda x: (sev[x["severity"]], x["source"], x["reason_code"],
                                x["details"].get("reason_code") or ""))
    if status == "BLOCKED" or hard:
        gate, step = "BLOCKED", "FIX_INPUT"
    elif soft:
        gate, step = "RISK_REVIEW_REQUIRED", "RISK_REVIEW"
    elif opts.client_consent_already_obtained:
        gate, step = "EXECUTION_READY", "EXECUTE"
    elif opts.workflow_requires_client_consent:
        gate, step = "CLIENT_CONSENT_REQUIRED", "REQUEST_CLIENT_CONSENT"
    else:
        gate, step = "EXECUTION_READY", "EXECUTE"
    return {"gate": gate, "recommended_next_step": step, "reasons": reasons,
            "summary": {"hard_fail_count": hard, "soft_fail_count": soft,
                        "new_high_suitability_count": 0, "new_medium_suitability_count": 0}}


# ---------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------

def _new_diag() -> dict:
    return {"warnings": [], "suppressed_intents": [], "dropped_intents": [], "group_constraint_events": [],
            "tax_budget_constraint_events": [], "cash_ladder": [], "cash_ladder_breaches": [],
            "missing_fx_pairs": [], "funding_plan": [], "insufficient_cash": []}


def _trace_out(trace: list[dict], base: str) -> list[dict]:
    return [{"instrument_id": r["instrument_id"], "model_weight": s(r["model_weight"]),
             "final_weight": s(r["final_weight"]), "final_value": money(r["final_value"], base),
             "tags": list(r["tags"])} for r in trace]


def _tax_out(opts: Options, tax: TaxState, base: str) -> dict | None:
    """§6.10 step 5."""
    if not opts.enable_tax_awareness:
        return None
    B = opts.max_realized_capital_gains
    used = None
    if B is not None:
        u = B if abs(B - tax.used) <= Decimal("1e-10") else tax.used
        used = money(min(u, B), base)
    return {"total_realized_gain": money(tax.gains, base), "total_realized_loss": money(tax.losses, base),
            "budget_limit": money(B, base) if B is not None else None, "budget_used": used}


def simulate(request: dict, request_hash: str | None = None) -> dict:
    """Run the full DPM simulate pipeline (§6) on one request; returns the RebalanceResult (§5)."""
    with localcontext(CONTEXT):
        return _simulate(request, request_hash)


def _simulate(request: dict, request_hash: str | None) -> dict:
    pf = request["portfolio_snapshot"]
    base = pf["base_currency"]
    positions = _parse_positions(pf)
    cash = _parse_cash(pf)
    targets = [{"instrument_id": t["instrument_id"], "weight": D(t["weight"])}
               for t in (request.get("model_portfolio") or {}).get("targets") or []]
    opts = Options.parse(request.get("options") or {})
    mkt = Market(request)
    dq = DQ()
    diag = _new_diag()

    # RFC Step 1 (snapshot skew, base currency in the FX rates) and Step 2 (stale prices):
    # each blocks at DQ gate #1 (E1)
    skewed = snapshot_skew(pf, mkt, opts)
    no_base_fx = base_currency_fx_missing(base, mkt, opts)
    stale = stale_instruments(pf, positions, targets, mkt, opts)
    stale_blocks = bool(stale) and opts.stale_price_action == "BLOCK"
    # docs silent on a run with several block reasons: as the engine, its warnings name one,
    # the first of SNAPSHOT_SKEW, BASE_CURRENCY_FX_MISSING (RFC Step 1's order), PRICE_STALE,
    # INFEASIBLE_CONCENTRATION
    input_fault = ("SNAPSHOT_SKEW" if skewed else "BASE_CURRENCY_FX_MISSING" if no_base_fx
                   else "PRICE_STALE" if stale_blocks else None)
    if input_fault:
        diag["warnings"].append(input_fault)
    price_excluded: dict[str, str] = {}
    if opts.stale_price_action == "EXCLUDE":
        # RFC Step 2: "If Price is missing or staleness > max -> BLOCK RUN (Configuration: can
        # optionally just exclude instrument)"; features.md: EXCLUDE excludes both
        price_excluded = {iid: "PRICE_STALE" for iid in stale}
        for iid in [t["instrument_id"] for t in targets] + [p["instrument_id"] for p in positions]:
            if iid not in mkt.prices:
                price_excluded[iid] = "PRICE_MISSING"
        dq.excused_prices = frozenset(i for i, reason in price_excluded.items() if reason == "PRICE_MISSING")

    # valuation, universe, targets
    before = value_state(positions, cash, base, mkt, opts.valuation_mode, dq)
    tv = before["tv"]
    u = build_universe(targets, positions, before, mkt, opts, dq, price_excluded)
    t_status, wmap = generate_targets(opts.target_method, u, targets, mkt, opts, diag)
    if input_fault and "INFEASIBLE_CONCENTRATION" in diag["warnings"]:
        diag["warnings"].remove("INFEASIBLE_CONCENTRATION")
        del diag["_concentration"]
    trace = [] if t_status == "BLOCKED" else build_trace(targets, wmap, tv)
    comparison = None
    if opts.compare_target_methods:
        comparison = compare_methods(opts.target_method, t_status, trace, u, targets, mkt, opts, tv, diag)

    def result(status, intents, after, rec, tax_impact, rules, coverage, explanation):
        out = {
            "rebalance_run_id": RUN_ID, "correlation_id": "c_none", "status": status,
            "before": state_out(before), "universe": universe_out(u, coverage),
            "target": {"target_id": "t_" + RUN_ID, "strategy": {}, "targets": _trace_out(trace, base)},
            "intents": [intent_out(i, base) for i in intents], "after_simulated": after,
            "reconciliation": rec, "tax_impact": tax_impact, "rule_results": rules,
            "explanation": explanation,
            "diagnostics": {**{k: v for k, v in diag.items() if not k.startswith("_")}, "data_quality": dq.out()},
            "gate_decision": gate_decision(status, rules, dq, opts),
            "lineage": {"portfolio_snapshot_id": pf["portfolio_id"], "market_data_snapshot_id": "md",
                        "request_hash": request_hash, "idempotency_key": None, "engine_version": None},
        }
        if opts.rfc_rationale_codes:
            with_rfc_messages(out, opts.single_position_max_weight)
        if opts.rfc_domain_errors and status == "BLOCKED" and "_concentration" in diag:
            # RFC §7: the infeasible constraint as a problem, not a BLOCKED result (features.md)
            return {"type": "https://api.dpm.com/errors/infeasible-constraint", "title": "Constraint Redistribution Failed",
                    "status": 422, "detail": diag["_concentration"], "code": "INFEASIBLE_CONCENTRATION",
                    "portfolio_id": pf["portfolio_id"]}
        return out

    def early_block():
        """Paths E1/E2 (§5.9): no intents, after = before, rules on before."""
        rules = evaluate_rules(before, opts, dq, len(diag["suppressed_intents"]))
        return result("BLOCKED", [], state_out(before), None, None, rules, "0", {"summary": "Blocked"})

    # DQ gate #1 (§6.8), with the RFC's skew and staleness blocks
    if t_status == "BLOCKED" or dq.blocks(opts) or input_fault:
        return early_block()

    # trade translation (§6.9, §6.10), DQ gate #2 (§6.11)
    tax = TaxState()
    model_ids = {t["instrument_id"] for t in targets}
    intents = translate_trades(trace, positions, tv, base, mkt, opts, tax, diag, dq, model_ids)
    if dq.blocks(opts):
        return early_block()

    intents = apply_turnover_cap(intents, tv, base, opts, diag)
    intents, fx_blocked = fx_funding_and_sweep(intents, cash, base, mkt, opts, dq)
    if fx_blocked:  # §11: unreachable in practice
        return early_block()
    intents = order_with_dependencies(intents, sell_dependencies=not opts.rfc_fx_dependencies)
    explanation = {"summary": None, "target_method_comparison": comparison}
    tax_impact = _tax_out(opts, tax, base)

    # settlement ladder (§6.15) -> path E3
    if opts.enable_settlement_awareness:
        rule = settlement_ladder(intents, cash, mkt, opts, diag)
        if rule is not None:
            again = value_state(positions, cash, base, mkt, opts.valuation_mode, dq)
            explanation["summary"] = "BLOCKED"
            return result("BLOCKED", intents, state_out(again), None, tax_impact, [rule], "1", explanation)

    # after-state (§6.16) and rules (§6.17) -> path E4
    a_pos, a_cash = apply_intents(positions, cash, intents)
    after = value_state(a_pos, a_cash, base, mkt, "CALCULATED", dq)
    rules = evaluate_rules(after, opts, dq, len(diag["suppressed_intents"]))
    failed = {r["rule_id"] for r in rules if r["severity"] == "HARD" and r["status"] == "FAIL"}
    if failed:
        if "NO_SHORTING" in failed:
            diag["warnings"].append("SIMULATION_SAFETY_CHECK_FAILED")
        if "INSUFFICIENT_CASH" in failed:
            diag["warnings"].append("SIMULATION_SAFETY_CHECK_FAILED")
        explanation["summary"] = "BLOCKED"
        return result("BLOCKED", intents, state_out(after), None, tax_impact, rules, "1", explanation)

    # reconciliation (§6.18) -> path E5; final status (§6.19) -> E6
    rec, rec_rule = reconcile(tv, after["tv"], base)
    if rec_rule is not None:
        rules.append(rec_rule)
        explanation["summary"] = "BLOCKED"
        return result("BLOCKED", intents, state_out(after), rec, tax_impact, rules, "1", explanation)
    status = final_status(False, rules, t_status)
    explanation["summary"] = status
    return result(status, intents, state_out(after), rec, tax_impact, rules, "1", explanation)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m dpm_vec.oracle REQUEST.json [...]``: prints the result JSON (an array for
    several files).  A golden file (with ``inputs``) is accepted too."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m dpm_vec.oracle REQUEST.json [...]", file=sys.stderr)
        return 2
    outs = []
    for path in argv:
        with open(path, encoding="utf-8") as fh:
            req = json.load(fh)
        if "inputs" in req and "portfolio_snapshot" not in req:
            req = req["inputs"]
        outs.append(simulate(req))
    print(json.dumps(outs[0] if len(argv) == 1 else outs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
