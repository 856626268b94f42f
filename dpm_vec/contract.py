"""The JSON door: reference-contract requests → Book, and Result → reference-shaped JSON.

A request is a book of one run; a batch of requests is a book with one run per request,
each with its own holdings, market snapshot, shelf and model keyed by the run key, so
requests that reuse portfolio or instrument ids never see each other's data.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation

import polars as pl

from dpm_vec.book import (
    CAP_MODES, HELD_BANNED_ACTIONS, LIQUIDITY_TIERS, LOT_SUM_TOLERANCE, POLICY_COLUMNS, SHELF_STATUSES, STALE_ACTIONS, TABLES,
    TARGET_METHODS, TRADE_BY, VALUATION_MODES, Book, iso_timestamps, make_book, table_schema,
)
from dpm_vec.errors import RequestError, error_loc, fault, not_an_object
from dpm_vec.numeric import AMOUNT_28, AMOUNT_28_LIMIT, MAX_MINUTES, MAX_WEIGHT, QTY, SCALE, WEIGHT

MAX_ABS = Decimal(10) ** (38 - SCALE - 1)
MAX_QUANTITY = Decimal(10) ** 9  # quantities carry 28 decimals in Decimal(38, 28)
# pydantic's lax text for an integer (spec §3: "integers accept integral strings"): ASCII
# digits, single underscores between them, an optional all-zero fraction, no exponent
INTEGER_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?", re.ASCII)
# pydantic reads a whole number as a 64-bit integer: one beyond it is no integer, nor a flag
INT64_LIMIT = 2 ** 63
TRUE_WORDS = {"true", "1", "yes", "y", "on", "t"}
FALSE_WORDS = {"false", "0", "no", "n", "off", "f"}
GROUP_KEY = re.compile(r"^[^:]+:[^:]+$")
# every EngineOptions field but the five "or null" ones (§4) and the RFC staleness limit,
# whose null means "no limit": null is a wrong type for them (§3.6, item 4)
NOT_NULL_OPTIONS = (
    "valuation_mode", "target_method", "compare_target_methods", "compare_target_methods_tolerance", "cash_band_min_weight",
    "cash_band_max_weight", "allow_restricted", "suppress_dust_trades", "fx_buffer_pct", "block_on_missing_prices",
    "block_on_missing_fx", "min_cash_buffer_pct", "enable_tax_awareness", "enable_settlement_awareness", "settlement_horizon_days",
    "fx_settlement_days", "max_overdraft_by_ccy", "group_constraints", "enable_workflow_gates", "workflow_requires_client_consent",
    "client_consent_already_obtained", "enable_proposal_simulation", "proposal_apply_cash_flows_first", "proposal_block_negative_cash",
    "enable_drift_analytics", "enable_suitability_scanner", "suitability_thresholds", "enable_instrument_drift",
    "drift_top_contributors_limit", "drift_unmodeled_exposure_threshold", "auto_funding", "funding_mode",
    "fx_funding_source_currency", "fx_generation_policy",
    # RFC-0001 options
    "single_position_cap_mode", "notional_sizing", "max_skew_minutes", "require_base_currency_fx", "stale_price_action", "missing_shelf_action",
    "rfc_rationale_codes", "rfc_fx_dependencies", "delta_from_valuation", "held_banned_action",
    "allow_restricted_holdings",
)
# RFC-0001 §7: a run the RFC asset-class cap blocks answers a 422 problem instead of a result
JSON_DOOR_OPTION = "rfc_domain_errors"
ADVISORY_ENUMS = {
    "funding_mode": ("AUTO_FX",),
    "fx_funding_source_currency": ("ANY_CASH",),
    "fx_generation_policy": ("ONE_FX_PER_CCY",),
}


def _is_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (a lone surrogate does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Reader:
    """Collects every validation error of one request with its JSON path. ``root`` is the
    request itself: a required field's fault tells a missing key from one sent as null by
    looking the path up in it."""

    def __init__(self, root=None) -> None:
        self.errors: list[dict] = []
        self.root = root
        self._null: set[str] = set()  # paths sent as null where the contract has no null (not_null)

    def fail(self, path: str, message: str, kind: str = "value_error", value=None) -> None:
        """Record a fault: its path, what was expected, the check's pydantic-style type
        (the reference's 422 body names it, spec §2.4) and the value that failed it."""
        self.errors.append(fault(path, message, kind, value))

    def _container(self, path: str) -> tuple[object, object]:
        """(the object or list that holds the field at ``path`` in the request, or None;
        the field's key or index in it)."""
        *steps, last = error_loc(path)[1:]
        node = self.root
        for step in steps:
            try:
                node = node[step]
            except (KeyError, IndexError, TypeError):
                return None, last
        return node, last

    def _absent(self, value, path, required, null_kind) -> bool:
        """Whether the field is absent or null. A required one is a fault: ``missing``
        with its parent object as the input, as pydantic reports it; sent as null, the
        field's own type error (``null_kind``). So is a null that ``not_null`` refused."""
        if value is not None:
            return False
        if path in self._null:
            self.fail(path, "must not be null", null_kind)
        elif required:
            container, last = self._container(path)
            if (isinstance(container, dict) and last in container) or (isinstance(container, list) and isinstance(last, int)):
                self.fail(path, "must not be null", null_kind)  # sent as null (a list item is there: the reader got it)
            else:
                self.fail(path, "field required", "missing", container if isinstance(container, dict) else None)
        return True

    def _typed(self, value, path, required, json_type, expected, empty, type_error):
        if self._absent(value, path, required, type_error):
            return empty
        if not isinstance(value, json_type):
            self.fail(path, f"expected {expected}", type_error, value)
            return empty
        keys = value if isinstance(value, dict) else ()
        if not self.unicode(value, path) or not all(self.unicode(k, f"{path}[{k!r}]") for k in keys):
            return empty
        return value

    def unicode(self, text, path) -> bool:
        """Whether ``text`` (any value) is no string with a lone surrogate, which JSON's
        \ud800-style escapes can spell and no UTF-8 text (nor Polars) holds: a fault of the
        request, named, not an engine failure."""
        if isinstance(text, str) and not _is_unicode(text):
            self.fail(path, f"not valid Unicode text (a lone surrogate): {text!r}", "string_unicode")
            return False
        return True

    def not_null(self, obj: dict, keys, path: str) -> None:
        """Mark the fields of ``obj`` sent as null where the contract has no null for them (a
        list, a map, a flag, a number with a default): a wrong JSON type (§3.6), not an
        absent field, which the field's own reader then reports with its type. Call it
        before those readers."""
        for key in keys:
            if key in obj and obj[key] is None:
                self._null.add(f"{path}.{key}" if path else key)

    def obj(self, value, path, required=True, model=True):
        """An object: one of the contract's models (pydantic's ``model_attributes_type`` when
        it is not one, as FastAPI validates them), or with ``model=False`` a free map
        (``dict_type``)."""
        return self._typed(value, path, required, dict, "an object", None, "model_attributes_type" if model else "dict_type")

    def arr(self, value, path, required=False):
        return self._typed(value, path, required, list, "an array", [], "list_type")

    def text(self, value, path, required=True):
        return self._typed(value, path, required, str, "a string", None, "string_type")

    def decimal(self, value, path, required=True, minimum=None, maximum=None, scale=SCALE):
        """A decimal number; ``scale`` is the decimals the engine keeps of it (20, or 28
        for a quantity or weight): a non-zero value smaller than that unit would be read
        as 0, a different number from the one sent, so it fails instead."""
        if self._absent(value, path, required, "decimal_type"):
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(path, "expected a decimal number (string or number)", "decimal_type", value)
            return None
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            self.fail(path, f"not a decimal number: {value!r}", "decimal_parsing", value)
            return None
        if not number.is_finite():
            self.fail(path, f"must be a finite number, got {value!r}", "finite_number", value)
            return None
        # copy_abs needs no context: abs() of 1e1000000 would raise decimal.Overflow
        if number.copy_abs() >= MAX_ABS:
            self.fail(path, f"magnitude must be below 1e{38 - SCALE - 1}", "value_error", value)
            return None
        if number != 0 and number.copy_abs() < Decimal(1).scaleb(-scale):
            self.fail(path, f"must be 0 or at least 1E-{scale} in magnitude (the engine keeps {scale} decimals), got {value}", "value_error", value)
            return None
        if minimum is not None and number < minimum:
            self.fail(path, f"must be >= {minimum}, got {value}", "greater_than_equal", value)
        if maximum is not None and number > maximum:
            self.fail(path, f"must be <= {maximum}, got {value}", "less_than_equal", value)
        return number

    def boolean(self, value, path, default):
        """A flag, read as pydantic's lax mode reads one: 0 and 1 (and 0.0, 1.0) and the
        words of TRUE_WORDS and FALSE_WORDS, in any case but unstripped."""
        if self._absent(value, path, False, "bool_type"):
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in TRUE_WORDS | FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        # another word or 64-bit whole number cannot be read as a flag; anything else is no flag's type
        # (pydantic takes -2**63 as a 64-bit int, but not as a float)
        lowest = -INT64_LIMIT if isinstance(value, int) else -INT64_LIMIT + 1
        readable = isinstance(value, str) or (isinstance(value, (int, float)) and float(value).is_integer() and lowest <= value < INT64_LIMIT)
        self.fail(path, f"expected a boolean, got {value!r}", "bool_parsing" if readable else "bool_type", value)
        return default

    def integer(self, value, path, default, lo=None, hi=None):
        if self._absent(value, path, False, "int_type"):
            return default
        if not isinstance(value, (str, int, float)):
            self.fail(path, f"expected an integer, got {value!r}", "int_type", value)
            return default
        if isinstance(value, float) and not (value.is_integer() and abs(value) < INT64_LIMIT):
            kind = "int_parsing_size" if value.is_integer() else "int_from_float" if math.isfinite(value) else "finite_number"
            self.fail(path, f"expected an integer, got {value!r}", kind, value)
            return default
        try:
            if isinstance(value, str) and not INTEGER_TEXT.fullmatch(value.strip()):
                raise ValueError
            # true and false are 1 and 0 here, as in pydantic's lax mode
            number = Decimal(int(value)) if isinstance(value, bool) else Decimal(str(value).strip())
            if not number.is_finite() or number != number.to_integral_value():
                raise ValueError
            out = int(number)
        except (InvalidOperation, ValueError):
            self.fail(path, f"expected an integer, got {value!r}", "int_parsing", value)
            return default
        if (lo is not None and out < lo) or (hi is not None and out > hi):
            bound = "greater_than_equal" if lo is not None and out < lo else "less_than_equal"
            self.fail(path, f"must be between {lo} and {hi}, got {out}", bound, value)
        return out

    def enum(self, value, path, allowed, default=None, required=False):
        if self._absent(value, path, required, "enum"):
            return default
        if value not in allowed:
            self.fail(path, f"must be one of {', '.join(allowed)}; got {value!r}", "enum", value)
            return default
        return value

    def money(self, value, path, required=False):
        m = self.obj(value, path, required=required)
        if m is None:
            return None, None
        return self.decimal(m.get("amount"), f"{path}.amount"), self.text(m.get("currency"), f"{path}.currency")

    def timestamp(self, value, path):
        if value is None:
            return None
        parsed = iso_timestamps(pl.Series([value]), pl.Datetime("us", "UTC"), strict=False)[0] if isinstance(value, str) else None
        if parsed is None:  # the book's reader takes the same ISO 8601 forms
            self.fail(path, f"expected an ISO-8601 timestamp, got {value!r}", "datetime_parsing", value)
        return parsed


def _amount_exact(amount: Decimal | None) -> Decimal | None:
    """``amount`` for the book's ``amount_exact`` where it has more decimals than DEC keeps
    and is below 1e10 (a result's cash balance fed back, with the reference's 28 significant
    digits): the 28-digit sums start from those digits; None elsewhere."""
    if amount is None or amount.as_tuple().exponent >= -SCALE or abs(amount) >= AMOUNT_28_LIMIT:
        return None
    return amount


def _entries(reader: _Reader, items: list, path: str, key: str, lookup: Callable[[_Reader, dict], object] | None = None,
             ) -> Iterator[tuple[str, dict]]:
    """The objects of the list at ``path`` with their own paths, once every repeated
    ``key`` has failed (``_duplicates``); an exact repeat in a look-up list, and an item
    that is not an object (which fails), are left out. Lazy, so that each item's errors
    follow the previous item's, as a request's error list reads."""
    repeats = _duplicates(reader, items, path, key, lookup)
    for index, item in enumerate(items):
        item_path = f"{path}[{index}]"
        if index not in repeats and (entry := reader.obj(item, item_path)) is not None:
            yield item_path, entry


def _duplicates(reader: _Reader, items: list, path: str, key: str, lookup: Callable[[_Reader, dict], object] | None = None,
                ) -> set[int]:
    """Fail every repeated ``key`` (§9.1: conflicting duplicates are bad data). In a list the
    reference only looks things up in (prices, FX rates, shelf entries; first match wins,
    §1.4), an exact repeat changes no answer: it is not an error, and its index is returned
    for the caller to skip. ``lookup`` reads such an entry into what the engine takes from
    it, so a repeat is exact when it reads the same: a price of "100.0", "100" or 100, a
    default written out or left to stand, a key the reference ignores."""
    seen: dict = {}
    repeats: set[int] = set()
    for index, item in enumerate(items):
        k = item.get(key) if isinstance(item, dict) else None
        if not isinstance(k, str):  # absent, or not text: its own check names it
            continue
        if k in seen and lookup is not None and not _same_entry(lookup, items[seen[k]], item):
            reader.fail(f"{path}[{index}]", f"duplicate {key} {k!r} (first at [{seen[k]}]) with different values")
        elif k in seen and lookup is not None:
            repeats.add(index)
        elif k in seen:  # counted twice by the reference, however alike (§1.4)
            reader.fail(f"{path}[{index}]", f"duplicate {key} {k!r} (first at [{seen[k]}])")
        else:
            seen[k] = index
    return repeats


def _same_entry(read: Callable[[_Reader, dict], object], first, repeat) -> bool:
    """Whether two entries of a look-up list say the same, as ``read`` (errors dropped)
    reads them; where either fails its own checks, only an identical one does."""
    if first == repeat:
        return True
    if not isinstance(first, dict) or not isinstance(repeat, dict):
        return False
    first_reader, repeat_reader = _Reader(), _Reader()
    read_first, read_repeat = read(first_reader, first), read(repeat_reader, repeat)
    return not first_reader.errors and not repeat_reader.errors and read_first == read_repeat


def parse_request(request, run_key: str) -> dict[str, list[dict]]:
    """Validate one reference-contract request; return its rows per book table.

    Raises RequestError listing every invalid field. Beyond the reference's own checks
    (§3.6) it rejects what §9.1 says dpm_vec must not silently accept: duplicate ids
    (an exact repeat of a price, FX rate or shelf entry, which no answer depends on, is
    dropped instead), negative quantities, negative prices, zero prices of held or model
    instruments and negative FX rates.
    """
    r = _Reader(request)
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    if not isinstance(request, dict):
        raise RequestError([not_an_object(request)])
    ps = r.obj(request.get("portfolio_snapshot"), "portfolio_snapshot") or {}
    md = r.obj(request.get("market_data_snapshot"), "market_data_snapshot") or {}
    mp = r.obj(request.get("model_portfolio"), "model_portfolio") or {}
    shelf = r.arr(request.get("shelf_entries"), "shelf_entries", required=True)
    options = r.obj(request.get("options"), "options") or {}
    # as_of and trade_by are keys the reference ignores (§9): checked only where an RFC-0001
    # option reads them, and otherwise kept when valid, dropped when not, as never sent
    unread = _Reader()  # its errors are dropped
    as_of_reader = r if any(options.get(k) is not None for k in ("max_skew_minutes", "max_staleness_minutes")) else unread
    trade_by_reader = r if unread.boolean(options.get("notional_sizing"), "", False) is True else unread

    # an object's required fields are missing only where the object is there ({} included)
    ps_given = isinstance(request.get("portfolio_snapshot"), dict)
    portfolio_id = r.text(ps.get("portfolio_id"), "portfolio_snapshot.portfolio_id", required=ps_given)
    base = r.text(ps.get("base_currency"), "portfolio_snapshot.base_currency", required=ps_given)
    # the snapshot ids are read only by analyze (§7), but typed in every request (§3.6 item 4)
    r.text(ps.get("snapshot_id"), "portfolio_snapshot.snapshot_id", required=False)
    r.text(md.get("snapshot_id"), "market_data_snapshot.snapshot_id", required=False)
    r.not_null(ps, ("positions", "cash_balances"), "portfolio_snapshot")
    r.not_null(md, ("prices", "fx_rates"), "market_data_snapshot")
    positions = r.arr(ps.get("positions"), "portfolio_snapshot.positions")
    for path, pos in _entries(r, positions, "portfolio_snapshot.positions", "instrument_id"):
        iid = r.text(pos.get("instrument_id"), f"{path}.instrument_id")
        qty = r.decimal(pos.get("quantity"), f"{path}.quantity", minimum=Decimal(0), maximum=MAX_QUANTITY, scale=QTY.scale)
        mv, mv_ccy = r.money(pos.get("market_value"), f"{path}.market_value")
        r.not_null(pos, ("lots",), path)
        lots = r.arr(pos.get("lots"), f"{path}.lots")
        lot_total, lots_read = Decimal(0), len(r.errors)
        for j, lot in enumerate(lots):
            lpath = f"{path}.lots[{j}]"
            lot = r.obj(lot, lpath)
            if lot is None:
                continue
            lq = r.decimal(lot.get("quantity"), f"{lpath}.quantity", minimum=Decimal(0), maximum=MAX_QUANTITY, scale=QTY.scale)
            cost, cost_ccy = r.money(lot.get("unit_cost"), f"{lpath}.unit_cost", required=True)
            row = {
                "portfolio_snapshot_id": run_key, "instrument_id": iid,
                "lot_id": r.text(lot.get("lot_id"), f"{lpath}.lot_id"), "quantity": lq, "unit_cost": cost,
                "cost_currency": cost_ccy, "purchase_date": r.text(lot.get("purchase_date"), f"{lpath}.purchase_date"),
            }
            lot_total += lq or 0
            rows["lots"].append(row)
        # as a pydantic model validator: only over lots that passed their own checks
        if lots and qty is not None and len(r.errors) == lots_read and abs(lot_total - qty) > LOT_SUM_TOLERANCE:
            r.fail(f"{path}.lots", f"lot quantities sum to {lot_total}, position quantity is {qty}")
        rows["positions"].append({
            "portfolio_snapshot_id": run_key, "instrument_id": iid, "quantity": qty,
            "market_value": mv, "market_value_currency": mv_ccy,
        })
    cash = r.arr(ps.get("cash_balances"), "portfolio_snapshot.cash_balances")
    for path, c in _entries(r, cash, "portfolio_snapshot.cash_balances", "currency"):
        amount = r.decimal(c.get("amount"), f"{path}.amount", scale=AMOUNT_28.scale)  # amount_exact keeps 28 decimals
        rows["cash"].append({
            "portfolio_snapshot_id": run_key, "currency": r.text(c.get("currency"), f"{path}.currency"),
            "amount": amount, "amount_exact": _amount_exact(amount),
            "settled": r.decimal(c.get("settled"), f"{path}.settled", required=False),
            "pending": r.decimal(c.get("pending"), f"{path}.pending", required=False),
        })
    # the look-up lists' rows, read by one function each: a repeat that reads the same is exact
    def price_row(rd: _Reader, p: dict, path: str, as_of: _Reader) -> dict:
        iid, price = rd.text(p.get("instrument_id"), f"{path}.instrument_id"), rd.decimal(p.get("price"), f"{path}.price")
        if price is not None and price < 0:
            rd.fail(f"{path}.price", f"must be greater than 0, got {p.get('price')}", "greater_than", p.get("price"))
        return {
            "market_snapshot_id": run_key, "instrument_id": iid, "price": price,
            "currency": rd.text(p.get("currency"), f"{path}.currency"), "as_of": as_of.timestamp(p.get("as_of"), f"{path}.as_of"),
        }

    def fx_row(rd: _Reader, f: dict, path: str) -> dict:
        return {
            "market_snapshot_id": run_key, "pair": rd.text(f.get("pair"), f"{path}.pair"),
            "rate": rd.decimal(f.get("rate"), f"{path}.rate", minimum=Decimal(0)),
        }

    def shelf_row(rd: _Reader, s: dict, path: str, trade_by: _Reader) -> dict:
        iid = rd.text(s.get("instrument_id"), f"{path}.instrument_id")
        mn, mn_ccy = rd.money(s.get("min_notional"), f"{path}.min_notional")
        rd.not_null(s, ("asset_class", "settlement_days", "attributes"), path)
        trade_by.not_null(s, ("trade_by",), path)
        return {
            "shelf_id": run_key, "instrument_id": iid,
            "status": rd.enum(s.get("status"), f"{path}.status", SHELF_STATUSES, required=True),
            "asset_class": _or(rd.text(s.get("asset_class"), f"{path}.asset_class", required=False), "UNKNOWN"),
            "issuer_id": rd.text(s.get("issuer_id"), f"{path}.issuer_id", required=False),
            "liquidity_tier": rd.enum(s.get("liquidity_tier"), f"{path}.liquidity_tier", LIQUIDITY_TIERS),
            "settlement_days": rd.integer(s.get("settlement_days"), f"{path}.settlement_days", 2, 0, 10),
            "min_notional_amount": mn, "min_notional_currency": mn_ccy,
            "trade_by": trade_by.enum(s.get("trade_by"), f"{path}.trade_by", TRADE_BY, default="UNITS"),
        }

    # as a repeat is compared: as_of and trade_by only where an option reads them (else read
    # by ``unread``, whose errors are dropped, and left out)
    def read_price(rd: _Reader, p: dict) -> dict:
        row = price_row(rd, p, "market_data_snapshot.prices[0]", rd if as_of_reader is r else unread)
        return row if as_of_reader is r else {**row, "as_of": None}

    def read_shelf_entry(rd: _Reader, s: dict) -> tuple:
        row = shelf_row(rd, s, "shelf_entries[0]", rd if trade_by_reader is r else unread)
        return row if trade_by_reader is r else {**row, "trade_by": None}, s.get("attributes") or {}

    prices = r.arr(md.get("prices"), "market_data_snapshot.prices")
    zero_prices: list[tuple[str, str, object]] = []  # (path, instrument_id, value): an error only if the instrument is used
    for path, p in _entries(r, prices, "market_data_snapshot.prices", "instrument_id", lookup=read_price):
        row = price_row(r, p, path, as_of_reader)
        if row["price"] == 0:
            zero_prices.append((f"{path}.price", row["instrument_id"], p.get("price")))
        rows["prices"].append(row)
    fx_rates = r.arr(md.get("fx_rates"), "market_data_snapshot.fx_rates")
    for path, f in _entries(r, fx_rates, "market_data_snapshot.fx_rates", "pair",
                            lookup=lambda rd, f: fx_row(rd, f, "market_data_snapshot.fx_rates[0]")):
        rows["fx_rates"].append(fx_row(r, f, path))
    targets = r.arr(mp.get("targets"), "model_portfolio.targets", required=isinstance(request.get("model_portfolio"), dict))
    for path, t in _entries(r, targets, "model_portfolio.targets", "instrument_id"):
        rows["models"].append({
            "model_id": run_key, "instrument_id": r.text(t.get("instrument_id"), f"{path}.instrument_id"),
            "weight": r.decimal(t.get("weight"), f"{path}.weight", minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT, scale=WEIGHT.scale),
        })
    # §9.1: a zero price of a held or model instrument is an error (the reference divides by
    # it); one that nothing reads, as in the reference, is not
    used = {row["instrument_id"] for row in rows["positions"]} | {row["instrument_id"] for row in rows["models"]}
    for path, iid, value in zero_prices:
        if iid in used:
            r.fail(path, f"must be greater than 0 for an instrument held or in the model, got {value}", "greater_than", value)
    for path, s in _entries(r, shelf, "shelf_entries", "instrument_id", lookup=read_shelf_entry):
        row = shelf_row(r, s, path, trade_by_reader)
        iid = row["instrument_id"]
        rows["shelf"].append(row)
        attributes = r.obj(s.get("attributes"), f"{path}.attributes", required=False, model=False) or {}
        for k, v in attributes.items():
            if not isinstance(v, str):
                r.fail(f"{path}.attributes[{k!r}]", "attribute values must be strings", "string_type", v)
                continue
            if not r.unicode(v, f"{path}.attributes[{k!r}]"):
                continue
            rows["shelf_attributes"].append({"shelf_id": run_key, "instrument_id": iid, "attribute": k, "value": v})

    r.not_null(options, (JSON_DOOR_OPTION,), "options")
    policy = parse_options(r, options, run_key, rows)
    rows["portfolios"].append({
        "run_key": run_key, "portfolio_id": portfolio_id, "base_currency": base,
        "portfolio_snapshot_id": run_key, "market_snapshot_id": run_key, "shelf_id": run_key, "model_id": run_key,
        "portfolio_as_of": as_of_reader.timestamp(ps.get("as_of"), "portfolio_snapshot.as_of"),
        "market_as_of": as_of_reader.timestamp(md.get("as_of"), "market_data_snapshot.as_of"),
        **policy,
        # the JSON door's own option (RFC-0001 §7's problem for INFEASIBLE_CONCENTRATION): not a
        # book column, so rows_to_book leaves it out and dpm_vec.simulate reads it here
        JSON_DOOR_OPTION: r.boolean(options.get(JSON_DOOR_OPTION), f"options.{JSON_DOOR_OPTION}", False),
    })
    if r.errors:
        raise RequestError(r.errors)
    return rows


# every option name parse_options reads: the EngineOptions of §4 and the RFC-0001 options
# (a request's other keys are not the reference's and are ignored; a scenarios file of a
# sweep names only these, dpm_vec.scenarios)
OPTION_NAMES = frozenset({
    *(name for name, _, _ in POLICY_COLUMNS if not name.startswith("min_trade_notional_")),
    "min_trade_notional", "dust_trade_threshold", "max_overdraft_by_ccy", "group_constraints", "suitability_thresholds",
    "drift_top_contributors_limit", "drift_unmodeled_exposure_threshold", *NOT_NULL_OPTIONS, *ADVISORY_ENUMS,
})


def parse_options(r: _Reader, o: dict, run_key: str, rows: dict[str, list[dict]]) -> dict:
    """EngineOptions (§4) → policy columns; map-valued options become table rows."""
    p = "options"
    D = Decimal
    r.not_null(o, NOT_NULL_OPTIONS, p)
    policy = {
        "valuation_mode": r.enum(o.get("valuation_mode"), f"{p}.valuation_mode", VALUATION_MODES, "CALCULATED"),
        "target_method": r.enum(o.get("target_method"), f"{p}.target_method", TARGET_METHODS, "HEURISTIC"),
        "cash_band_min_weight": _or(r.decimal(o.get("cash_band_min_weight"), f"{p}.cash_band_min_weight", required=False), D("0.00")),
        "cash_band_max_weight": _or(r.decimal(o.get("cash_band_max_weight"), f"{p}.cash_band_max_weight", required=False), D("1.00")),
        "single_position_max_weight": r.decimal(o.get("single_position_max_weight"), f"{p}.single_position_max_weight", required=False,
                                                minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT),
        "single_position_cap_mode": r.enum(o.get("single_position_cap_mode"), f"{p}.single_position_cap_mode", CAP_MODES, "REFERENCE"),
        "allow_restricted": r.boolean(o.get("allow_restricted"), f"{p}.allow_restricted", False),
        "suppress_dust_trades": r.boolean(o.get("suppress_dust_trades"), f"{p}.suppress_dust_trades", True),
        "fx_buffer_pct": _or(r.decimal(o.get("fx_buffer_pct"), f"{p}.fx_buffer_pct", required=False), D("0.01")),
        "block_on_missing_prices": r.boolean(o.get("block_on_missing_prices"), f"{p}.block_on_missing_prices", True),
        "block_on_missing_fx": r.boolean(o.get("block_on_missing_fx"), f"{p}.block_on_missing_fx", True),
        "min_cash_buffer_pct": _or(r.decimal(o.get("min_cash_buffer_pct"), f"{p}.min_cash_buffer_pct", required=False,
                                             minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT), D("0.0")),
        "max_turnover_pct": r.decimal(o.get("max_turnover_pct"), f"{p}.max_turnover_pct", required=False, minimum=D(0), maximum=D(1)),
        "enable_tax_awareness": r.boolean(o.get("enable_tax_awareness"), f"{p}.enable_tax_awareness", False),
        "max_realized_capital_gains": r.decimal(o.get("max_realized_capital_gains"), f"{p}.max_realized_capital_gains", required=False, minimum=D(0)),
        "enable_settlement_awareness": r.boolean(o.get("enable_settlement_awareness"), f"{p}.enable_settlement_awareness", False),
        "settlement_horizon_days": r.integer(o.get("settlement_horizon_days"), f"{p}.settlement_horizon_days", 5, 0, 10),
        "fx_settlement_days": r.integer(o.get("fx_settlement_days"), f"{p}.fx_settlement_days", 2, 0, 10),
        "enable_workflow_gates": r.boolean(o.get("enable_workflow_gates"), f"{p}.enable_workflow_gates", True),
        "workflow_requires_client_consent": r.boolean(o.get("workflow_requires_client_consent"), f"{p}.workflow_requires_client_consent", False),
        "client_consent_already_obtained": r.boolean(o.get("client_consent_already_obtained"), f"{p}.client_consent_already_obtained", False),
        "notional_sizing": r.boolean(o.get("notional_sizing"), f"{p}.notional_sizing", False),
        "max_staleness_minutes": r.integer(o.get("max_staleness_minutes"), f"{p}.max_staleness_minutes", None, 0, MAX_MINUTES),
        "max_skew_minutes": r.integer(o.get("max_skew_minutes"), f"{p}.max_skew_minutes", None, 0, MAX_MINUTES),
        "require_base_currency_fx": r.boolean(o.get("require_base_currency_fx"), f"{p}.require_base_currency_fx", False),
        "fx_sweep_threshold": r.decimal(o.get("fx_sweep_threshold"), f"{p}.fx_sweep_threshold", required=False, minimum=D(0)),
        "stale_price_action": r.enum(o.get("stale_price_action"), f"{p}.stale_price_action", STALE_ACTIONS, "BLOCK"),
        "missing_shelf_action": r.enum(o.get("missing_shelf_action"), f"{p}.missing_shelf_action", STALE_ACTIONS, "BLOCK"),
        "held_banned_action": r.enum(o.get("held_banned_action"), f"{p}.held_banned_action", HELD_BANNED_ACTIONS, "LOCK"),
        "allow_restricted_holdings": r.boolean(o.get("allow_restricted_holdings"), f"{p}.allow_restricted_holdings", False),
        "rfc_rationale_codes": r.boolean(o.get("rfc_rationale_codes"), f"{p}.rfc_rationale_codes", False),
        "rfc_fx_dependencies": r.boolean(o.get("rfc_fx_dependencies"), f"{p}.rfc_fx_dependencies", False),
        "delta_from_valuation": r.boolean(o.get("delta_from_valuation"), f"{p}.delta_from_valuation", False),
        "compare_target_methods": r.boolean(o.get("compare_target_methods"), f"{p}.compare_target_methods", False),
        "compare_target_methods_tolerance": _or(r.decimal(o.get("compare_target_methods_tolerance"), f"{p}.compare_target_methods_tolerance", required=False), D("0.0001")),
    }
    amount, ccy = r.money(o.get("min_trade_notional"), f"{p}.min_trade_notional")
    policy["min_trade_notional_amount"], policy["min_trade_notional_currency"] = amount, ccy
    r.money(o.get("dust_trade_threshold"), f"{p}.dust_trade_threshold")
    for name, allowed in ADVISORY_ENUMS.items():
        r.enum(o.get(name), f"{p}.{name}", allowed)
    for name in ("enable_proposal_simulation", "proposal_apply_cash_flows_first", "proposal_block_negative_cash",
                 "enable_drift_analytics", "enable_suitability_scanner", "enable_instrument_drift", "auto_funding"):
        r.boolean(o.get(name), f"{p}.{name}", False)
    r.integer(o.get("drift_top_contributors_limit"), f"{p}.drift_top_contributors_limit", 5, 1, 20)
    r.decimal(o.get("drift_unmodeled_exposure_threshold"), f"{p}.drift_unmodeled_exposure_threshold", required=False, minimum=D(0), maximum=D(1))
    _suitability(r, o.get("suitability_thresholds"), f"{p}.suitability_thresholds")
    overdrafts = r.obj(o.get("max_overdraft_by_ccy"), f"{p}.max_overdraft_by_ccy", required=False, model=False) or {}
    for ccy_key, value in overdrafts.items():
        if not ccy_key:
            r.fail(f"{p}.max_overdraft_by_ccy", "currency keys must not be empty")
        amount = r.decimal(value, f"{p}.max_overdraft_by_ccy[{ccy_key!r}]", minimum=D(0))
        rows["overdraft_limits"].append({"run_key": run_key, "currency": ccy_key, "max_overdraft": amount})
    groups = r.obj(o.get("group_constraints"), f"{p}.group_constraints", required=False, model=False) or {}
    for key, spec in groups.items():
        path = f"{p}.group_constraints[{key!r}]"
        if not GROUP_KEY.match(key):
            r.fail(path, "group constraint keys must be 'attribute:value' with exactly one ':'", "value_error", key)
        spec = r.obj(spec, path)
        if spec is None:
            continue
        mw = r.decimal(spec.get("max_weight"), f"{path}.max_weight", minimum=D(0), maximum=D(1))
        rows["group_constraints"].append({"run_key": run_key, "constraint_key": key, "max_weight": mw})
    return policy


def _suitability(r: _Reader, value, path: str) -> None:
    """§3.6 item 8: weights in [0, 1] (a ``…_weight`` key, or a ``…_by_tier`` /
    ``liquidity_tier_max_weights`` map keyed L1..L5), the severity enum, and min ≤ max for
    the cash band. Other keys are not the reference's, so they are ignored (§3)."""
    s = r.obj(value, path, required=False)
    if not s:
        return
    for key, v in s.items():
        if key == "data_quality_issue_severity":
            r.enum(v, f"{path}.{key}", ("HIGH", "MEDIUM", "LOW"))
        elif key.endswith("_by_tier") or key == "liquidity_tier_max_weights":
            for tier, w in (r.obj(v, f"{path}.{key}", required=False, model=False) or {}).items():
                r.enum(tier, f"{path}.{key}", LIQUIDITY_TIERS)
                r.decimal(w, f"{path}.{key}[{tier!r}]", minimum=Decimal(0), maximum=Decimal(1))
        elif key.endswith("_weight"):
            r.decimal(v, f"{path}.{key}", required=False, minimum=Decimal(0), maximum=Decimal(1))
    # as a pydantic model validator: only over bounds that passed their own checks (read
    # again by a reader of their own, their errors already listed above)
    band = _Reader()
    lo, hi = (band.decimal(s.get(key), f"{path}.{key}", required=False, minimum=Decimal(0), maximum=Decimal(1))
              for key in ("cash_band_min_weight", "cash_band_max_weight"))
    if lo is not None and hi is not None and not band.errors and lo > hi:
        r.fail(path, "cash_band_min_weight must not exceed cash_band_max_weight")


def _or(value, default):
    return default if value is None else value


def requests_to_book(requests: list[dict], run_keys: list[str] | None = None) -> tuple[Book, list[str]]:
    """Validated requests → one Book (raises RequestError for the first invalid one)."""
    run_keys = run_keys or [f"r{i:06d}" for i in range(len(requests))]
    return book_of_requests(parse_request(req, key) for req, key in zip(requests, run_keys)), run_keys


def book_of_requests(parsed: Iterable[dict[str, list[dict]]]) -> Book:
    """One Book of several parsed requests' rows, each request under its own run key."""
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    for one in parsed:
        for table, table_rows in one.items():
            rows[table].extend(table_rows)
    return rows_to_book(rows)


def rows_to_book(rows: dict[str, list[dict]]) -> Book:
    """The book of parsed requests' rows: each table's columns, and nothing else (a
    portfolio row's ``rfc_domain_errors`` is the JSON door's, not the engine's)."""
    frames = {}
    for table, table_rows in rows.items():
        schema = table_schema(table)
        if not table_rows:
            frames[table] = pl.DataFrame(schema=schema)
            continue
        try:
            frame = pl.DataFrame(table_rows, schema=schema, orient="row")
        except RuntimeError:  # a decimal of more than 38 digits, which Polars refuses (its BindingsError)
            frame = pl.DataFrame(_within_scale(table_rows, schema), schema=schema, orient="row")
        frames[table] = frame.select(list(schema))
    return make_book(**frames)


_WIDE = Context(prec=80)  # room for any value the reader accepts, at any column's scale


def _within_scale(rows: list[dict], schema: dict[str, pl.DataType]) -> list[dict]:
    """``rows`` with each decimal rounded half-even to the decimals its column keeps, as
    Polars rounds one of up to 38 digits into the column; Polars refuses a longer one
    ("Decimal is too large to fit in Decimal128": 1.000…0001 with 40 zeros). Only for a
    table Polars refused: this per-row pass costs ~65 ms over 1,000 requests' rows."""
    units = {name: Decimal(1).scaleb(-dtype.scale) for name, dtype in schema.items() if isinstance(dtype, pl.Decimal)}
    return [{name: value.quantize(units[name], rounding=ROUND_HALF_EVEN, context=_WIDE) if name in units and isinstance(value, Decimal)
             else value for name, value in row.items()} for row in rows]


def request_hash(request: dict) -> str:
    """SHA-256 of the canonical request (sorted keys, no whitespace)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()

