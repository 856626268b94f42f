"""A book's runs as reference-contract JSON requests (for shadow-running a book through
the reference service, and for replaying one portfolio through the JSON door)."""

from __future__ import annotations

from collections import defaultdict

import polars as pl

from dpm_vec.book import Book, amount_as_given
from dpm_vec.numeric import to_text

OPTION_NAMES = (
    "valuation_mode", "target_method", "cash_band_min_weight", "cash_band_max_weight", "single_position_max_weight",
    "allow_restricted", "suppress_dust_trades", "fx_buffer_pct", "block_on_missing_prices", "block_on_missing_fx",
    "min_cash_buffer_pct", "max_turnover_pct", "enable_tax_awareness", "max_realized_capital_gains",
    "enable_settlement_awareness", "settlement_horizon_days", "fx_settlement_days", "enable_workflow_gates",
    "workflow_requires_client_consent", "client_consent_already_obtained", "compare_target_methods",
    "compare_target_methods_tolerance",
)


def _value(v):
    return to_text(v) if hasattr(v, "as_tuple") else v


def _group(frame: pl.DataFrame, key: str) -> dict:
    out = defaultdict(list)
    for row in frame.sort("seq").iter_rows(named=True):
        out[row[key]].append(row)
    return out


def book_to_requests(book: Book) -> list[dict]:
    """One request per portfolios row, in row order, carrying the market data and shelf
    entries of the instruments the portfolio holds or targets (the reference ignores
    RFC-only options, so only reference options are written)."""
    positions, cash, lots = _group(book.positions, "portfolio_snapshot_id"), _group(book.cash, "portfolio_snapshot_id"), _group(book.lots, "portfolio_snapshot_id")
    prices, fx = _group(book.prices, "market_snapshot_id"), _group(book.fx_rates, "market_snapshot_id")
    shelf, attrs, models = _group(book.shelf, "shelf_id"), _group(book.shelf_attributes, "shelf_id"), _group(book.models, "model_id")
    groups, overdrafts = _group(book.group_constraints, "run_key"), _group(book.overdraft_limits, "run_key")
    requests = []
    for p in book.portfolios.sort("seq").iter_rows(named=True):
        snap = p["portfolio_snapshot_id"]
        # only the instruments this portfolio holds or targets: the request stays small
        wanted = {x["instrument_id"] for x in positions.get(snap, [])} | {m["instrument_id"] for m in models.get(p["model_id"], [])}
        lots_by_instrument = defaultdict(list)
        for lot in lots.get(snap, []):
            lots_by_instrument[lot["instrument_id"]].append({
                "lot_id": lot["lot_id"], "quantity": _value(lot["quantity"]),
                "unit_cost": {"amount": _value(lot["unit_cost"]), "currency": lot["cost_currency"]},
                "purchase_date": lot["purchase_date"],
            })
        attributes = defaultdict(dict)
        for a in attrs.get(p["shelf_id"], []):
            attributes[a["instrument_id"]][a["attribute"]] = a["value"]
        options = {name: _value(p[name]) for name in OPTION_NAMES}
        if p["min_trade_notional_amount"] is not None:
            options["min_trade_notional"] = {"amount": _value(p["min_trade_notional_amount"]), "currency": p["min_trade_notional_currency"]}
        options["group_constraints"] = {g["constraint_key"]: {"max_weight": _value(g["max_weight"])} for g in groups.get(p["run_key"], [])}
        options["max_overdraft_by_ccy"] = {o["currency"]: _value(o["max_overdraft"]) for o in overdrafts.get(p["run_key"], [])}
        requests.append({
            "portfolio_snapshot": {
                "portfolio_id": p["portfolio_id"], "base_currency": p["base_currency"],
                "positions": [
                    {"instrument_id": x["instrument_id"], "quantity": _value(x["quantity"]),
                     **({"market_value": {"amount": _value(x["market_value"]), "currency": x["market_value_currency"]}}
                        if x["market_value"] is not None else {}),
                     "lots": lots_by_instrument.get(x["instrument_id"], [])}
                    for x in positions.get(snap, [])
                ],
                "cash_balances": [
                    {"currency": c["currency"], "amount": _value(amount_as_given(c)),
                     **({"settled": _value(c["settled"])} if c["settled"] is not None else {}),
                     **({"pending": _value(c["pending"])} if c["pending"] is not None else {})}
                    for c in cash.get(snap, [])
                ],
            },
            "market_data_snapshot": {
                "prices": [{"instrument_id": x["instrument_id"], "price": _value(x["price"]), "currency": x["currency"]}
                           for x in prices.get(p["market_snapshot_id"], []) if x["instrument_id"] in wanted],
                "fx_rates": [{"pair": x["pair"], "rate": _value(x["rate"])} for x in fx.get(p["market_snapshot_id"], [])],
            },
            "model_portfolio": {"targets": [{"instrument_id": m["instrument_id"], "weight": _value(m["weight"])}
                                            for m in models.get(p["model_id"], [])]},
            "shelf_entries": [
                {"instrument_id": s["instrument_id"], "status": s["status"], "asset_class": s["asset_class"],
                 "settlement_days": s["settlement_days"],
                 **({"min_notional": {"amount": _value(s["min_notional_amount"]), "currency": s["min_notional_currency"]}}
                    if s["min_notional_amount"] is not None else {}),
                 "attributes": attributes.get(s["instrument_id"], {})}
                for s in shelf.get(p["shelf_id"], []) if s["instrument_id"] in wanted
            ],
            "options": options,
        })
    return requests
