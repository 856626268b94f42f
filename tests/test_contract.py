"""The JSON door's request contract (§3, §3.6): what is a 422, and what a field's absence,
null or empty value means."""

from __future__ import annotations

import copy
import enum
from decimal import Decimal
import json
from pathlib import Path

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from dpm_vec.book import SHELF_STATUSES
from dpm_vec.contract import JSON_DOOR_OPTION, NOT_NULL_OPTIONS, parse_request, rows_to_book
from dpm_vec.errors import RequestError
from dpm_vec.oracle import simulate as oracle_simulate
from dpm_vec.simulate import simulate_many
from tests.golden_compare import strip_random

REQUEST = json.loads((Path(__file__).resolve().parents[1] / "data" / "requests" / "fx_funding.json").read_text())


def _errors(request: dict) -> list[tuple[str, str]]:
    with pytest.raises(RequestError) as caught:
        parse_request(request, "r0")
    return [(e["field"], e["message"]) for e in caught.value.errors]


def _node(request: dict, path: tuple) -> dict | list:
    """The object or list at ``path``."""
    node = request
    for part in path:
        node = node[part]
    return node


def _parent(request: dict, path: tuple) -> dict | list:
    """The object or list that holds ``path``'s last part."""
    return _node(request, path[:-1])


def _with(path: tuple, value) -> dict:
    request = copy.deepcopy(REQUEST)
    _parent(request, path)[path[-1]] = value
    return request


@pytest.mark.parametrize("path", [
    ("options", "allow_restricted"),
    ("options", "fx_buffer_pct"),
    ("options", "settlement_horizon_days"),
    ("options", "group_constraints"),
    ("options", "suitability_thresholds"),
    ("options", "notional_sizing"),
    ("portfolio_snapshot", "positions"),
    ("market_data_snapshot", "fx_rates"),
    ("shelf_entries", 0, "asset_class"),
    ("shelf_entries", 0, "settlement_days"),
])
def test_null_where_the_contract_has_none_is_a_wrong_type(path):
    field = ".".join(str(p) for p in path).replace(".0.", "[0].")
    assert _errors(_with(path, None)) == [(field, "must not be null")]


@pytest.mark.parametrize("name", [*NOT_NULL_OPTIONS, JSON_DOOR_OPTION])
def test_every_option_without_a_null_names_a_null_by_its_type(name):
    """A null option with no null in the contract is one fault, its type error: a name read
    by no reader would pass as absent."""
    request = _with(("options", name), None)
    with pytest.raises(RequestError) as caught:
        parse_request(request, "r0")
    ((kind, loc),) = [(e["type"], e["loc"]) for e in caught.value.validation_detail()["detail"]]
    assert loc == ["body", "options", name] and (kind.endswith("_type") or kind == "enum"), kind


class _Model(BaseModel):
    """Any of the contract's objects (a snapshot, an entry, Money, the options)."""


# each field's type as §3 declares it (``| None`` where null means "not given"); FastAPI
# validates a body with ``from_attributes``, so an object that is no object is
# model_attributes_type, a free map's dict_type
CONTRACT_TYPES = {
    ("portfolio_snapshot",): _Model,
    ("portfolio_snapshot", "portfolio_id"): str,
    ("portfolio_snapshot", "positions"): list,
    ("portfolio_snapshot", "positions", 0): _Model,
    ("portfolio_snapshot", "positions", 0, "quantity"): Decimal,
    ("portfolio_snapshot", "positions", 0, "lots"): list,
    ("portfolio_snapshot", "positions", 0, "market_value"): _Model | None,
    ("portfolio_snapshot", "cash_balances", 0, "amount"): Decimal,
    ("market_data_snapshot", "prices", 0, "price"): Decimal,
    ("market_data_snapshot", "fx_rates"): list,
    ("model_portfolio",): _Model,
    ("model_portfolio", "targets", 0, "weight"): Decimal,
    ("shelf_entries",): list,
    ("shelf_entries", 0, "status"): enum.Enum("ShelfStatus", {s: s for s in SHELF_STATUSES}, type=str),
    ("shelf_entries", 0, "settlement_days"): int,
    ("shelf_entries", 0, "attributes"): dict[str, str],
    ("shelf_entries", 0, "min_notional"): _Model | None,
    ("options",): _Model,
    ("options", "allow_restricted"): bool,
    ("options", "settlement_horizon_days"): int,
    ("options", "valuation_mode"): enum.Enum("ValuationMode", {"CALCULATED": "CALCULATED", "TRUST_SNAPSHOT": "TRUST_SNAPSHOT"}, type=str),
    ("options", "fx_buffer_pct"): Decimal,
    ("options", "max_turnover_pct"): Decimal | None,
    ("options", "max_overdraft_by_ccy"): dict[str, Decimal],
    ("options", "group_constraints"): dict[str, _Model],
}
# bounds, not types: what a value pydantic's type takes may still fail
BOUND_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "value_error"}


@pytest.mark.parametrize("path", CONTRACT_TYPES, ids=lambda path: ".".join(map(str, path)))
@pytest.mark.parametrize("value", [None, [], {}, "x", 1.5, 7.0, 2, True, float("inf"), 1e19,
                                   # the 64-bit edges, where pydantic's error type for an integer or a flag changes
                                   -2**63, 2**63, float(2**63), -float(2**63)], ids=repr)
def test_a_wrong_type_is_the_error_pydantic_names(path, value):
    """Spec §2.4: the 422's ``type`` is pydantic's. Each field gets values of every JSON
    type, and pydantic's own validator of the field's declared type says which error each
    is, or that the value is of the right type (then only a bound of the contract can fail)."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "10"}]
    _parent(request, path)[path[-1]] = value
    try:
        TypeAdapter(CONTRACT_TYPES[path]).validate_python(value, from_attributes=True)
        expected = None
    except ValidationError as error:
        expected = next(e["type"] for e in error.errors() if e["loc"] == ())
    try:
        parse_request(request, "r0")
        detail = []
    except RequestError as error:
        detail = error.validation_detail()["detail"]
    found = [e["type"] for e in detail if e["loc"] == ["body", *path]]
    if expected is None:
        assert set(found) <= BOUND_ERRORS, (value, found)
    else:
        assert found == [expected], (value, found)


@pytest.mark.parametrize("path", [
    ("options", "single_position_max_weight"),
    ("options", "max_turnover_pct"),
    ("options", "max_realized_capital_gains"),
    ("options", "min_trade_notional"),
    ("options", "dust_trade_threshold"),
    ("options", "max_staleness_minutes"),
    ("options", "an_option_the_contract_does_not_know"),
    ("shelf_entries", 0, "issuer_id"),
    ("shelf_entries", 0, "liquidity_tier"),
    ("shelf_entries", 0, "min_notional"),
])
def test_null_is_accepted_where_it_means_none(path):
    """A null reads as the field left out: the same book rows, except the request's hash."""
    absent = copy.deepcopy(REQUEST)
    _parent(absent, path).pop(path[-1], None)

    def rows(request: dict) -> dict:
        parsed = parse_request(request, "r0")
        return {table: [{k: v for k, v in row.items() if k != "request_hash"} for row in table_rows]
                for table, table_rows in parsed.items()}

    assert rows(_with(path, None)) == rows(absent)


def test_an_empty_asset_class_is_kept_not_defaulted():
    """Only an absent asset class is UNKNOWN (§3.5); an empty string is a class of its own."""
    result = simulate_many([_with(("shelf_entries", 0, "asset_class"), "")])[0]
    assert [a["key"] for a in result["after_simulated"]["allocation_by_asset_class"]] == ["", "CASH"]
    request = copy.deepcopy(REQUEST)
    request["shelf_entries"][0].pop("asset_class", None)
    result = simulate_many([request])[0]
    assert [a["key"] for a in result["after_simulated"]["allocation_by_asset_class"]] == ["UNKNOWN", "CASH"]


@pytest.mark.parametrize("value, expected", [
    (True, True), (0, False), (1.0, True), (0.0, False), ("yes", True), ("Off", False), ("T", True),
])
def test_booleans_take_the_lax_spellings(value, expected):
    result = simulate_many([_with(("options", "enable_workflow_gates"), value)])[0]
    assert (result["gate_decision"] is not None) is expected


# pydantic reads a flag's words unstripped, so a padded "yes" is no boolean
@pytest.mark.parametrize("value", [2, 0.5, "maybe", [], {}, " yes", "true ", "1.0"])
def test_other_booleans_are_422(value):
    assert _errors(_with(("options", "allow_restricted"), value))[0][0] == "options.allow_restricted"


# pydantic's integral text: digits with single underscores and an all-zero fraction, no
# exponent, no leading or trailing point, ASCII digits only
@pytest.mark.parametrize("value, valid", [("3", True), (" 3 ", True), ("3.0", True), ("3.00", True), ("+3", True),
                                          ("0_3", True), ("03", True), (3.0, True), (True, True),
                                          (3.5, False), ("3.5", False), ("three", False), (11, False), ("3e0", False),
                                          ("3.", False), ("_3", False), ("0__3", False), ("３", False), ("0x3", False)])
def test_integers_take_integral_spellings(value, valid):
    request = _with(("shelf_entries", 0, "settlement_days"), value)
    if valid:
        assert [row["settlement_days"] for row in parse_request(request, "r0")["shelf"]][0] == (1 if value is True else 3)
    else:
        assert _errors(request)[0][0] == "shelf_entries[0].settlement_days"


def test_currency_codes_are_text_not_checked_for_format():
    """§3: currencies are not checked for format or case, so a request in lower-case codes
    gets the upper-case request's result in lower case (it was a 500 from a stage check)."""
    upper = simulate_many([REQUEST])[0]
    text = json.dumps(REQUEST).replace('"SGD"', '"sgd"').replace('"USD"', '"usd"').replace('"USD/SGD"', '"usd/sgd"')
    lower = simulate_many([json.loads(text)])[0]
    assert lower["status"] == upper["status"] == "READY"
    assert [i.get("pair") for i in lower["intents"]] == ["usd/sgd", None]
    relabelled = json.dumps(upper["intents"]).replace('"SGD"', '"sgd"').replace('"USD"', '"usd"').replace('"USD/SGD"', '"usd/sgd"')
    assert lower["intents"] == json.loads(relabelled)


def test_model_weights_keep_28_decimals():
    """A model weight of 1E-26 is a positive weight, a cap's recipient (the reference keeps
    28 significant digits); read at 20 decimals it was 0 and took nothing."""
    request = copy.deepcopy(REQUEST)
    request["model_portfolio"]["targets"] = [{"instrument_id": "US_EQ", "weight": "0.6"},
                                             {"instrument_id": "EU_EQ", "weight": "0.00000000000000000000000001"}]
    request["market_data_snapshot"]["prices"].append({"instrument_id": "EU_EQ", "price": "10", "currency": "SGD"})
    request["shelf_entries"].append({"instrument_id": "EU_EQ", "status": "APPROVED"})
    request["options"]["single_position_max_weight"] = "0.5"
    targets = {t["instrument_id"]: t for t in simulate_many([request])[0]["target"]["targets"]}
    assert targets["EU_EQ"]["model_weight"] == "0.00000000000000000000000001"
    assert targets["EU_EQ"]["final_weight"] == "0.10000000000000000000000001"
    assert targets["EU_EQ"]["tags"] == ["REDISTRIBUTED_RECIPIENT"]


def test_cash_past_20_decimals_keeps_its_28_decimals_beside_the_amount():
    """A result's after-state cash fed back carries the reference's 28 significant digits:
    ``amount`` holds it at DEC's 20 decimals and the book's ``amount_exact`` at 28, so the
    28-digit sums start from the balance sent. An amount DEC holds whole, or one of 1e10 or
    more (whose 28 significant digits are all within 20 decimals), has no ``amount_exact``."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["cash_balances"] = [
        {"currency": "EUR", "amount": "-375243.638427202880380621725"},
        {"currency": "SGD", "amount": "12.50"},
        {"currency": "USD", "amount": "12345678901.123456789012345678901"},
        {"currency": "CHF", "amount": "0.10000000000000000000000000009"},
    ]
    cash = rows_to_book(parse_request(request, "r0")).cash.sort("seq")
    assert cash["amount"].to_list() == [Decimal("-375243.63842720288038062172"), Decimal("12.5"),
                                        Decimal("12345678901.1234567890123456789"), Decimal("0.1")]
    assert cash["amount_exact"].to_list() == [Decimal("-375243.638427202880380621725"), None, None,
                                              Decimal("0.1000000000000000000000000001")]


def test_decimals_past_38_digits_are_rounded_to_the_engines_decimals_not_a_500():
    """Polars refuses a Python Decimal of more than 38 digits ("Decimal is too large to fit
    in Decimal128", a 500 for any field): such a value is rounded half-even to the decimals
    its column keeps, as Polars rounds a shorter one, and answers as that value would."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "10.0000000000000000000000000000000000000004"}]
    request["portfolio_snapshot"]["cash_balances"].append({"currency": "USD", "amount": "10000000000.000000000000000000005000000000001"})
    request["market_data_snapshot"]["prices"][0]["price"] = "12.3400000000000000000050000000000000000000001"
    # exactly half a unit of the 20th decimal: half-even keeps the even 0, as Polars rounds
    request["market_data_snapshot"]["prices"].append({"instrument_id": "UNHELD", "price": "1.000000000000000000005000000000000000000000",
                                                      "currency": "USD"})
    request["model_portfolio"]["targets"][0]["weight"] = "0.40000000000000000000000000015000000000000001"
    rounded = copy.deepcopy(request)
    rounded["portfolio_snapshot"]["positions"][0]["quantity"] = "10"
    rounded["portfolio_snapshot"]["cash_balances"][-1]["amount"] = "10000000000.00000000000000000001"
    rounded["market_data_snapshot"]["prices"][0]["price"] = "12.34000000000000000001"
    rounded["market_data_snapshot"]["prices"][1]["price"] = "1"
    rounded["model_portfolio"]["targets"][0]["weight"] = "0.4000000000000000000000000002"
    book = rows_to_book(parse_request(request, "r0"))
    assert book.cash.sort("seq")["amount"].to_list()[-1] == Decimal("10000000000.00000000000000000001")
    assert book.prices["price"].to_list() == [Decimal("12.34000000000000000001"), Decimal(1)]
    assert book.models["weight"].to_list()[0] == Decimal("0.4000000000000000000000000002")
    long, short = simulate_many([request, rounded])
    assert "status" in long and long["status"] != 500
    assert strip_random(long)["intents"] == strip_random(short)["intents"]
    assert strip_random(long)["after_simulated"] == strip_random(short)["after_simulated"]


def test_a_fed_back_balance_prints_as_it_came():
    """The before-state echoes a balance with the digits it was sent with, as the reference
    does, and so does an after-state whose balance no trade or FX moved."""
    request = copy.deepcopy(REQUEST)
    kept = "0.123456789012345678901234567"
    request["portfolio_snapshot"]["cash_balances"].append({"currency": "CHF", "amount": kept})
    request["market_data_snapshot"]["fx_rates"].append({"pair": "CHF/SGD", "rate": "1.5"})
    request["options"]["fx_sweep_threshold"] = "1"
    result, oracle = simulate_many([request])[0], oracle_simulate(request)
    assert oracle["before"]["cash_balances"][-1]["amount"] == kept
    assert [c["amount"] for c in oracle["after_simulated"]["cash_balances"] if c["currency"] == "CHF"] == [kept]
    assert result["before"]["cash_balances"][-1] == {"currency": "CHF", "amount": kept, "settled": None, "pending": None}
    assert [c["amount"] for c in result["after_simulated"]["cash_balances"] if c["currency"] == "CHF"] == [kept]


@pytest.mark.parametrize("path, value", [
    (("model_portfolio", "targets", 0, "weight"), "1000000001"),
    (("model_portfolio", "targets", 0, "weight"), "-1E10"),
    # weight options the target stage computes with at 28 decimals: beyond 10^10 they were a 500
    (("options", "single_position_max_weight"), "1E11"),
    (("options", "min_cash_buffer_pct"), "-1E15"),
])
def test_weights_beyond_the_engine_range_are_422(path, value):
    field = ".".join(str(p) for p in path).replace(".0.", "[0].")
    assert _errors(_with(path, value))[0][0] == field


@pytest.mark.parametrize("path", [
    ("options", "max_turnover_pct"),
    ("market_data_snapshot", "prices", 0, "price"),
    ("portfolio_snapshot", "cash_balances", 0, "amount"),
    ("model_portfolio", "targets", 0, "weight"),
])
def test_an_exponent_beyond_decimals_context_is_422_not_a_traceback(path):
    """1e1000000 is a finite Decimal that ``abs()`` cannot hold (decimal.Overflow, a 500 at
    every door); it is a value beyond the engine's range like 9e999999, and a batch's other
    requests still run."""
    field = ".".join(str(p) for p in path).replace(".0.", "[0].")
    for huge in ("1e1000000", "-1E+9999999999"):
        assert _errors(_with(path, huge)) == [(field, "magnitude must be below 1e17")]
    assert _errors(_with(path, "1e-1000000"))[0][1].startswith("must be 0 or at least 1E-")
    bad, good = simulate_many([_with(path, "1e1000000"), REQUEST])
    assert bad["status"] == 422 and field in bad["detail"]
    assert strip_random(good) == strip_random(simulate_many([REQUEST])[0])


def test_a_snapshot_time_is_iso_8601_text_as_a_book_reads_it():
    """The JSON door reads the ISO 8601 forms a book's text column does, each alone, and
    refuses the others (a day-first date, a number) where a check reads the time."""
    def request_with(as_of):
        request = _with(("portfolio_snapshot", "as_of"), as_of)
        request["options"]["max_skew_minutes"] = 10
        return request

    for good in ("2025-06-30T21:00:00Z", "2025-06-30T21:00:00", "2025-06-30T23:00:00+02:00", "20250630T210000Z"):
        (row,) = parse_request(request_with(good), "r0")["portfolios"]
        assert row["portfolio_as_of"].isoformat() == "2025-06-30T21:00:00+00:00", good
    for bad in ("30/06/2025", 12345, "2025-13-30"):
        assert _errors(request_with(bad)) == [("portfolio_snapshot.as_of", f"expected an ISO-8601 timestamp, got {bad!r}")]


@pytest.mark.parametrize("path, tiny, scale", [
    (("market_data_snapshot", "fx_rates", 0, "rate"), "7E-25", 20),
    (("market_data_snapshot", "prices", 0, "price"), "0.000000000000000000009", 20),
    (("portfolio_snapshot", "cash_balances", 0, "amount"), "-4E-29", 28),  # a balance keeps 28 decimals (amount_exact)
    (("options", "fx_buffer_pct"), "1E-21", 20),
    (("portfolio_snapshot", "positions", 0, "quantity"), "1E-29", 28),
    (("model_portfolio", "targets", 0, "weight"), "5E-29", 28),
])
def test_a_value_below_the_engines_smallest_unit_is_422_not_read_as_0(path, tiny, scale):
    """A non-zero value the engine's fixed point would read as 0 (an FX rate of 7E-25 was
    an FX rate missing, and the run BLOCKED) is a 422 naming it; the smallest unit
    itself is a value (1E-20, or 1E-28 for a quantity or model weight)."""
    def request_with(value):
        request = copy.deepcopy(REQUEST)
        request["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "10"}]
        _parent(request, path)[path[-1]] = value
        return request

    field = ".".join(str(p) for p in path).replace(".0.", "[0].")
    assert _errors(request_with(tiny)) == [(field, f"must be 0 or at least 1E-{scale} in magnitude (the engine keeps {scale} decimals), got {tiny}")]
    parse_request(request_with(f"1E-{scale}"), "r0")


def test_weight_options_far_outside_their_meaning_still_run():
    """The reference validates neither (§3.6): a cap of 2 and a buffer of -5 are simulated."""
    request = _with(("options", "single_position_max_weight"), "2")
    request["options"]["min_cash_buffer_pct"] = "-5"
    result, expected = simulate_many([request])[0], oracle_simulate(request)
    assert result["status"] == expected["status"]
    assert [(i["instrument_id"], i["side"], Decimal(i["quantity"])) for i in result["intents"] if i["intent_type"] == "SECURITY_TRADE"] == \
        [(i["instrument_id"], i["side"], Decimal(i["quantity"])) for i in expected["intents"] if i["intent_type"] == "SECURITY_TRADE"]
    assert [(t["instrument_id"], Decimal(t["final_weight"])) for t in result["target"]["targets"]] == \
        [(t["instrument_id"], Decimal(t["final_weight"])) for t in expected["target"]["targets"]]


@pytest.mark.parametrize("path", [("market_data_snapshot", "prices"), ("market_data_snapshot", "fx_rates"), ("shelf_entries",)])
def test_an_exact_repeat_in_a_lookup_list_changes_nothing(path):
    """The reference only looks prices, FX rates and shelf entries up (first match wins,
    §1.4), so an exact repeat is the same request, not bad data (§9.1)."""
    request = copy.deepcopy(REQUEST)
    node = _node(request, path)
    node.append(copy.deepcopy(node[0]))
    repeated, once = simulate_many([request, REQUEST])
    for key in ("status", "intents", "after_simulated", "rule_results"):
        assert repeated[key] == once[key]
    assert repeated["target"]["targets"] == once["target"]["targets"]


@pytest.mark.parametrize("path, change", [
    (("market_data_snapshot", "prices"), {"price": 100}),  # "100.0" first
    (("market_data_snapshot", "prices"), {"price": "1E+2"}),
    (("market_data_snapshot", "prices"), {"vendor": "BBG"}),  # a key the reference ignores
    (("market_data_snapshot", "prices"), {"as_of": "2020-01-01T00:00:00Z"}),  # read by no option here
    (("market_data_snapshot", "prices"), {"as_of": "not a time"}),  # invalid, but read by no option
    (("shelf_entries",), {"trade_by": "LOTS"}),  # likewise, without notional_sizing
    (("market_data_snapshot", "fx_rates"), {"rate": "1.350"}),  # "1.35" first
    (("shelf_entries",), {"asset_class": "UNKNOWN", "settlement_days": 2}),  # the defaults, written out
    (("shelf_entries",), {"attributes": {}}),
])
def test_a_repeat_that_reads_the_same_is_exact(path, change):
    """A repeat is exact when it reads the same, not only when its JSON text is the same:
    "100.0" and 100 are one price to the reference, which looks the first one up (§1.4);
    these were 422s "with different values"."""
    request = copy.deepcopy(REQUEST)
    node = _node(request, path)
    node.append({**copy.deepcopy(node[0]), **change})
    rows = parse_request(request, "r0")
    assert len(rows[path[-1] if path[-1] != "shelf_entries" else "shelf"]) == 1


def test_a_repeat_differing_in_what_an_option_reads_is_422():
    """A price's as_of is read once a staleness limit is set: then two as_of differ."""
    request = copy.deepcopy(REQUEST)
    request["options"] = {**request.get("options", {}), "max_staleness_minutes": 60}
    prices = request["market_data_snapshot"]["prices"]
    prices.append({**prices[0], "as_of": "2020-01-01T00:00:00Z"})
    assert _errors(request) == [("market_data_snapshot.prices[1]", "duplicate instrument_id 'US_EQ' (first at [0]) with different values")]


@pytest.mark.parametrize("path, field", [
    (("market_data_snapshot", "prices"), "market_data_snapshot.prices[1]"),
    (("shelf_entries",), "shelf_entries[1]"),
])
def test_a_conflicting_repeat_is_422(path, field):
    request = copy.deepcopy(REQUEST)
    node = _node(request, path)
    repeat = copy.deepcopy(node[0])
    repeat["price" if "price" in repeat else "status"] = "99" if "price" in repeat else "BANNED"
    node.append(repeat)
    assert _errors(request) == [(field, "duplicate instrument_id 'US_EQ' (first at [0]) with different values")]


@pytest.mark.parametrize("path, item", [
    (("portfolio_snapshot", "cash_balances"), 0),
    (("model_portfolio", "targets"), 0),
])
def test_an_exact_repeat_the_reference_would_count_twice_is_422(path, item):
    """Repeated positions, cash rows and model targets change the reference's answer by
    list position (§1.4): dpm_vec rejects them even when they are identical."""
    request = copy.deepcopy(REQUEST)
    node = _node(request, path)
    node.append(copy.deepcopy(node[item]))
    assert _errors(request)[0][0] == ".".join(path) + "[1]"
    # alike however written: counted twice all the same, and never called "different values"
    key = "currency" if "cash_balances" in path else "instrument_id"
    node[1] = ({k: v for k, v in node[0].items() if k != "pending"} if "cash_balances" in path
               else {**node[0], "weight": str(node[0]["weight"]) + "0"})
    assert _errors(request)[0] == (".".join(path) + "[1]", f"duplicate {key} {node[0][key]!r} (first at [0])")


@pytest.mark.parametrize("path, field", [
    (("portfolio_snapshot", "positions"), "quantity"), (("portfolio_snapshot", "cash_balances"), "amount"),
    (("market_data_snapshot", "prices"), "price"), (("market_data_snapshot", "fx_rates"), "rate"),
    (("model_portfolio", "targets"), "weight"), (("shelf_entries",), "settlement_days"),
])
def test_a_lists_errors_name_its_repeats_then_each_item_in_order(path, field):
    """A 422 names a list's repeated keys first, then each item's errors in item order:
    item 0's bad field before item 1, which is not an object."""
    request = copy.deepcopy(REQUEST)
    node = _node(request, path)
    node[:] = node[:1] or [{"instrument_id": "US_EQ", "quantity": "10"}]  # the request holds no position
    node[1:] = ["not an object", copy.deepcopy(node[0])]  # [2] repeats [0]'s key, and differs from it below
    node[0][field] = [1]
    at = ".".join(path)
    errors = [name for name, _ in _errors(request) if name.startswith(f"{at}[")]
    assert errors == [f"{at}[2]", f"{at}[0].{field}", f"{at}[1]"]


@pytest.mark.parametrize("pair", ["USDSGD", "USD/SGD/X", "", "USD-SGD"])
def test_a_pair_that_is_not_from_slash_to_text_matches_nothing(pair):
    """§6.1 looks "FROM/TO" up as text: a pair of other text is never the one wanted, so
    the USD price has no rate (it was a 500 from a null currency in the rate table)."""
    request = _with(("market_data_snapshot", "fx_rates", 0, "pair"), pair)
    result = simulate_many([request])[0]
    assert result["status"] == "BLOCKED" and result["diagnostics"]["data_quality"]["fx_missing"] == ["USD/SGD"]


@pytest.mark.parametrize("path", [("model_portfolio", "targets", 0, "instrument_id"), ("shelf_entries", 0, "instrument_id"),
                                  ("market_data_snapshot", "fx_rates", 0, "pair"), ("portfolio_snapshot", "snapshot_id"),
                                  ("market_data_snapshot", "snapshot_id")])
@pytest.mark.parametrize("value", [["US_EQ"], {"id": "US_EQ"}, 7])
def test_a_key_of_the_wrong_type_is_422_naming_it(path, value):
    field = ".".join(str(p) for p in path).replace(".0.", "[0].")
    assert (field, "expected a string") in _errors(_with(path, value))


def test_a_scenario_fails_on_its_first_invalid_option_in_declaration_order():
    """§7: the first validation error in option declaration order, in the reference's words
    where the spec quotes them, whatever order the scenario lists its options in."""
    from dpm_vec.analyze import analyze
    batch = {k: copy.deepcopy(REQUEST[k]) for k in ("portfolio_snapshot", "market_data_snapshot", "model_portfolio", "shelf_entries")}
    batch["scenarios"] = {
        "late_first": {"options": {"settlement_horizon_days": 11, "max_turnover_pct": "1.5"}},
        "compare_first": {"options": {"max_turnover_pct": "1.5", "compare_target_methods": "maybe"}},
        "group_only": {"options": {"group_constraints": {"no-colon": {"max_weight": "0.2"}}}},
        "not_a_number": {"options": {"max_turnover_pct": "abc"}},  # §3.6 item 4, not the quoted bound
        # §4's advisory row, in the order it lists them, after every DPM option
        "advisory_drift_first": {"options": {"funding_mode": "BAD", "enable_drift_analytics": "maybe"}},
        "advisory_limit_first": {"options": {"fx_generation_policy": "BAD", "drift_top_contributors_limit": 99}},
        "dpm_before_advisory": {"options": {"auto_funding": "maybe", "fx_settlement_days": 11}},
        "fine": {"options": {}},
    }
    body = analyze(batch)
    assert set(body["results"]) == {"fine"}
    assert body["failed_scenarios"] == {
        "advisory_drift_first": "INVALID_OPTIONS: options.enable_drift_analytics: expected a boolean, got 'maybe'",
        "advisory_limit_first": "INVALID_OPTIONS: options.drift_top_contributors_limit: must be between 1 and 20, got 99",
        "compare_first": "INVALID_OPTIONS: options.compare_target_methods: expected a boolean, got 'maybe'",
        "dpm_before_advisory": "INVALID_OPTIONS: options.fx_settlement_days: must be between 0 and 10, got 11",
        "group_only": "INVALID_OPTIONS: options.group_constraints['no-colon']: group constraint keys must be 'attribute:value' with exactly one ':'",
        "late_first": "INVALID_OPTIONS: Value error, max_turnover_pct must be between 0 and 1 inclusive",
        "not_a_number": "INVALID_OPTIONS: options.max_turnover_pct: not a decimal number: 'abc'",
    }


def _batch(**scenarios) -> dict:
    batch = {k: copy.deepcopy(REQUEST[k]) for k in ("portfolio_snapshot", "market_data_snapshot", "model_portfolio", "shelf_entries")}
    return {**batch, "scenarios": scenarios}


def test_a_scenario_beyond_the_quantity_range_fails_alone_and_names_the_trade():
    """§7 step 2 and §9.1: a scenario whose trade the engine cannot hold goes to
    failed_scenarios with what it is, and the other scenarios still answer."""
    from dpm_vec.analyze import analyze
    batch = _batch(plain={"options": {}}, capped={"options": {"max_turnover_pct": "0"}})
    batch["portfolio_snapshot"].update(positions=[], cash_balances=[{"currency": "SGD", "amount": "10000000000"}])
    batch["market_data_snapshot"]["prices"] = [{"instrument_id": "A", "price": "0.5", "currency": "SGD"}]
    batch["model_portfolio"]["targets"] = [{"instrument_id": "A", "weight": "1"}]
    batch["shelf_entries"] = [{"instrument_id": "A", "status": "APPROVED"}]
    body = analyze(batch)
    assert list(body["results"]) == list(body["comparison_metrics"]) == ["capped"]
    assert body["results"]["capped"]["status"] == "READY" and body["results"]["capped"]["intents"] == []
    assert body["failed_scenarios"] == {"plain": "SCENARIO_EXECUTION_ERROR: QuantityRangeError: a BUY of 20000000000 units of A "
                                                 "is outside the engine's quantity range (trades under 9,000,000,000 units)"}
    assert body["warnings"] == ["PARTIAL_BATCH_FAILURE"]


def test_a_scenario_asking_for_rfc_domain_errors_fails_with_the_problem_detail():
    """A what-if scenario under the RFC asset-class cap that blocks its run: with
    ``rfc_domain_errors`` it fails (RFC §7's detail, naming the instruments); without, it
    answers its BLOCKED result, as every scenario of the reference does."""
    from dpm_vec.analyze import analyze
    rfc_cap = {"single_position_max_weight": "0.4", "single_position_cap_mode": "RFC_ASSET_CLASS"}
    batch = _batch(blocked={"options": rfc_cap}, told={"options": {**rfc_cap, "rfc_domain_errors": True}})
    batch["portfolio_snapshot"].update(positions=[], cash_balances=[{"currency": "SGD", "amount": "10000"}])
    batch["market_data_snapshot"]["prices"] = [{"instrument_id": i, "price": "100", "currency": "SGD"} for i in "AB"]
    batch["model_portfolio"]["targets"] = [{"instrument_id": "A", "weight": "0.6"}, {"instrument_id": "B", "weight": "0.35"}]
    batch["shelf_entries"] = [{"instrument_id": i, "status": "APPROVED", "asset_class": "EQUITY"} for i in "AB"]
    body = analyze(batch)
    assert body["results"]["blocked"]["status"] == "BLOCKED"
    assert body["failed_scenarios"] == {"told": "SCENARIO_EXECUTION_ERROR: InfeasibleConstraintError: "
                                                "Redistributing excess weight from A caused B to exceed the 40% cap."}


def test_an_unexpected_engine_failure_fails_its_scenario_by_exception_class(monkeypatch):
    """§7 step 2: ``SCENARIO_EXECUTION_ERROR: <exception class name>``, and the rest run."""
    from dpm_vec import simulate
    from dpm_vec.analyze import analyze
    real = simulate._simulate

    def failing(parsed):
        if any(rows["portfolios"][0]["fx_buffer_pct"] == Decimal("0.07") for rows in parsed):
            raise ZeroDivisionError("division by zero")
        return real(parsed)

    monkeypatch.setattr(simulate, "_simulate", failing)
    body = analyze(_batch(a_fine={"options": {}}, b_broken={"options": {"fx_buffer_pct": "0.07"}}, c_fine={"options": {"fx_buffer_pct": "0.02"}},
                          d_invalid={"options": {"max_turnover_pct": "2"}}))
    assert list(body["results"]) == ["a_fine", "c_fine"]
    # in name order, though invalid options are found before any scenario runs
    assert list(body["failed_scenarios"].items()) == [("b_broken", "SCENARIO_EXECUTION_ERROR: ZeroDivisionError"),
                                                      ("d_invalid", body["failed_scenarios"]["d_invalid"])]
    assert body["failed_scenarios"]["d_invalid"].startswith("INVALID_OPTIONS: ")


@pytest.mark.parametrize("count, names, error", [
    (20, None, None), (21, None, ("scenarios", "too_long")),
    (1, ["n" * 64], None), (1, ["n" * 65], ("scenarios['" + "n" * 65 + "']", "value_error")),
    (0, None, ("scenarios", "too_short")),
], ids=["20-scenarios", "21-scenarios", "64-char-name", "65-char-name", "none"])
def test_analyze_takes_up_to_20_scenarios_named_in_up_to_64_characters(count, names, error):
    """§7: a whole-request 422 for no scenario, more than 20, or a name past 64 characters;
    20 scenarios and a 64-character name run."""
    from dpm_vec.analyze import analyze
    names = names or [f"s{i:02d}" for i in range(count)]
    batch = _batch(**{name: {"options": {}} for name in names})
    if error is None:
        assert sorted(analyze(batch)["results"]) == sorted(names)
        return
    with pytest.raises(RequestError) as caught:
        analyze(batch)
    assert [(e["field"], e["type"]) for e in caught.value.errors] == [error]


def test_analyze_scenarios_that_are_not_an_object_are_a_dict_type_422():
    from dpm_vec.analyze import analyze
    with pytest.raises(RequestError) as caught:
        analyze({**_batch(), "scenarios": []})
    assert [e["type"] for e in caught.value.validation_detail()["detail"]] == ["dict_type"]


def test_analyze_answers_in_name_order_and_names_its_base_snapshots():
    """§7: scenarios run and answer in ascending name order, results and failures alike
    (whatever order the request lists them); base_snapshot_ids take the snapshots'
    snapshot_id where given, else the portfolio id and "md"."""
    from dpm_vec.analyze import analyze
    batch = _batch(zeta={"options": {}}, b_bad={"options": {"max_turnover_pct": "2"}}, alpha={"description": None, "options": {}},
                   a_bad={"options": {"fx_buffer_pct": "abc"}})
    body = analyze(batch)
    assert list(body["results"]) == list(body["comparison_metrics"]) == ["alpha", "zeta"]
    assert list(body["failed_scenarios"]) == ["a_bad", "b_bad"] and body["warnings"] == ["PARTIAL_BATCH_FAILURE"]
    assert body["base_snapshot_ids"] == {"portfolio_snapshot_id": "pf_003", "market_data_snapshot_id": "md"}
    batch["portfolio_snapshot"]["snapshot_id"], batch["market_data_snapshot"]["snapshot_id"] = "ps_123", "md_456"
    assert analyze(batch)["base_snapshot_ids"] == {"portfolio_snapshot_id": "ps_123", "market_data_snapshot_id": "md_456"}


@pytest.mark.parametrize("name, spec, field, loc", [
    ("trailing_newline\n", {"options": {}}, "scenarios['trailing_newline\\n']", ["scenarios", "trailing_newline\n"]),
    ("Upper", {"options": {}}, "scenarios['Upper']", ["scenarios", "Upper"]),
    ("dotted.name", {"options": {}}, "scenarios['dotted.name']", ["scenarios", "dotted.name"]),
    ("numbered_description", {"description": 7, "options": {}}, "scenarios['numbered_description'].description",
     ["scenarios", "numbered_description", "description"]),
    ("null_options", {"options": None}, "scenarios['null_options'].options", ["scenarios", "null_options", "options"]),
])
def test_a_bad_scenario_name_or_shape_is_a_whole_request_422(name, spec, field, loc):
    """A scenario is named by its key in brackets, so that a name holding a dot or a
    newline is one step of the reference-shaped body's ``loc``."""
    from dpm_vec.analyze import analyze
    with pytest.raises(RequestError) as caught:
        analyze(_batch(**{name: spec, "fine": {"description": "unused", "options": {}}}))
    assert [e["field"] for e in caught.value.errors] == [field]
    assert [e["loc"] for e in caught.value.validation_detail()["detail"]] == [["body", *loc]]


def test_the_reference_shaped_422_names_each_fault_by_loc_type_and_input():
    """Spec §2.4: FastAPI's ``{"detail": [{"type", "loc", "msg", "input"}]}``, every error
    listed; a map key holding a dot or a bracket is one step of ``loc``, list items are
    integers."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "abc"}]
    del request["market_data_snapshot"]["prices"][0]["currency"]
    request["shelf_entries"][0]["status"] = "NOPE"
    request["shelf_entries"][0]["attributes"] = {"sector.gics[1]": 7}
    request["options"] = {"max_turnover_pct": "1.5", "settlement_horizon_days": -1, "allow_restricted": "maybe",
                          "group_constraints": {"a.b": {"max_weight": "0.2"}, "sector:it": {"max_weight": "2"}},
                          "max_overdraft_by_ccy": {"US.D": "-1"}}
    with pytest.raises(RequestError) as caught:
        parse_request(request, "r0")
    detail = caught.value.validation_detail()["detail"]
    assert all(set(e) == {"type", "loc", "msg", "input"} for e in detail)
    found = {tuple(e["loc"]): (e["type"], e["input"]) for e in detail}
    assert found == {
        ("body", "portfolio_snapshot", "positions", 0, "quantity"): ("decimal_parsing", "abc"),
        # a missing field's input is the object it is missing from, as pydantic reports it
        ("body", "market_data_snapshot", "prices", 0, "currency"): ("missing", {"instrument_id": "US_EQ", "price": "100.0"}),
        ("body", "shelf_entries", 0, "status"): ("enum", "NOPE"),
        ("body", "shelf_entries", 0, "attributes", "sector.gics[1]"): ("string_type", 7),
        ("body", "options", "max_turnover_pct"): ("less_than_equal", "1.5"),
        ("body", "options", "settlement_horizon_days"): ("greater_than_equal", -1),
        ("body", "options", "allow_restricted"): ("bool_parsing", "maybe"),
        ("body", "options", "group_constraints", "a.b"): ("value_error", "a.b"),
        ("body", "options", "group_constraints", "sector:it", "max_weight"): ("less_than_equal", "2"),
        ("body", "options", "max_overdraft_by_ccy", "US.D"): ("greater_than_equal", "-1"),
    }, found
    # the problem body names the same faults by path, without the reference's extras
    problem = caught.value.problem("/rebalance/simulate")
    assert [set(e) for e in problem["errors"]] == [{"field", "message"}] * len(detail)
    assert "options.group_constraints['a.b']" in [e["field"] for e in problem["errors"]]


@pytest.mark.parametrize("balances, total", [(12, "1.188E+18"), (30, "2.97E+18")])
def test_a_cash_total_past_the_fixed_point_is_a_422_and_fails_alone(balances, total):
    """Balances of 9.9e16 (each within the contract) sum past Decimal(38, 20): Polars
    would panic building that sum (the panic is no Exception, and took the batch down), or
    alone wrap it silently (30 of them wrap past 128 bits to -4.3e17, a total that fits).
    The request gets a value-out-of-range problem naming the sum, alone or beside a request
    that answers."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["cash_balances"] = [{"currency": f"C{i:02d}", "amount": "99000000000000000"} for i in range(balances)]
    request["market_data_snapshot"]["fx_rates"] += [{"pair": f"C{i:02d}/SGD", "rate": "1"} for i in range(balances)]
    huge, plain = simulate_many([request, REQUEST])
    assert (huge["status"], huge["type"]) == (422, "https://dpm-vec.dev/problems/value-out-of-range")
    assert huge["detail"] == (f"request 1: the sum of the portfolio's absolute values in base currency is about {total}, "
                              "beyond the engine's fixed-point range (values under 1E18)")
    assert plain["status"] == "READY"
    assert simulate_many([request])[0]["detail"] == huge["detail"]


def _locked_holding_over_a_total_near_zero(request: dict) -> None:
    """A suspended holding worth 13,500 SGD beside cash that cancels it to 1e-7."""
    request["portfolio_snapshot"]["positions"] = [{"instrument_id": "HELD", "quantity": "100"}]
    request["portfolio_snapshot"]["cash_balances"][0]["amount"] = "-13499.9999999"
    request["market_data_snapshot"]["prices"].append({"instrument_id": "HELD", "price": "100", "currency": "USD"})
    request["shelf_entries"].append({"instrument_id": "HELD", "status": "SUSPENDED", "min_notional": None})


def _eleven_targets_under_a_cap_of_minus_a_billion(request: dict) -> None:
    """Step 4 sums max(0, w − m) over the map: eleven entries under m = −1e9 add up to 1.1e10."""
    request["model_portfolio"]["targets"] = [{"instrument_id": f"E{i:02d}", "weight": "0.05"} for i in range(11)]
    request["market_data_snapshot"]["prices"] += [{"instrument_id": f"E{i:02d}", "price": "10", "currency": "SGD"} for i in range(11)]
    request["shelf_entries"] += [{"instrument_id": f"E{i:02d}", "status": "APPROVED", "min_notional": None} for i in range(11)]
    request["options"]["single_position_max_weight"] = "-1000000000"


@pytest.mark.parametrize("edit, detail", [
    (_locked_holding_over_a_total_near_zero,
     "the sum of the portfolio's locked weights (its locked holdings' values over its total value) is about 1.35E+11"),
    (_eleven_targets_under_a_cap_of_minus_a_billion,
     "the sum of the weights the target stage adds up for the portfolio (its model and locked weights, its SELL_ONLY excess, "
     "its cash buffer and its single-position cap once per entry) is about 1.1E+10"),
])
def test_weights_adding_up_past_the_weight_range_are_a_422_naming_the_sum(edit, detail):
    """The target stage holds weights in Decimal(38, 28), under 1e10. A locked holding's
    weight over a total near zero, or a cap's excess summed over many entries, used to
    overflow there unnamed ("an intermediate value left the engine's fixed-point range"),
    and a sweep halved its shard down to each such portfolio. The request gets a
    value-out-of-range problem naming the sum, alone or beside a request that answers
    (a SELL_ONLY proportion past the range: tests/test_cli.py)."""
    request = copy.deepcopy(REQUEST)
    edit(request)
    weighty, plain = simulate_many([request, REQUEST])
    assert (weighty["status"], weighty["type"]) == (422, "https://dpm-vec.dev/problems/value-out-of-range")
    assert weighty["detail"] == f"request 1: {detail}, beyond the engine's weight range (weights adding up to under 1E+10)"
    assert plain["status"] == "READY"


def test_a_zero_price_nothing_reads_runs_as_the_reference():
    """§9.1 rejects a zero price of a held or model instrument (the reference divides by
    it); a zero price of an instrument neither held nor in the model is never read, so the
    request runs as it does without that row."""
    plain = simulate_many([REQUEST])[0]
    request = copy.deepcopy(REQUEST)
    request["market_data_snapshot"]["prices"].append({"instrument_id": "UNUSED", "price": "0", "currency": "SGD"})
    unused = simulate_many([request])[0]
    assert unused["status"] == plain["status"] == "READY"
    assert unused["intents"] == plain["intents"]


@pytest.mark.parametrize("where", ["held", "model"])
def test_a_zero_price_of_a_held_or_model_instrument_is_422(where):
    request = copy.deepcopy(REQUEST)
    request["market_data_snapshot"]["prices"].append({"instrument_id": "Z", "price": "0.00", "currency": "SGD"})
    if where == "held":
        request["portfolio_snapshot"]["positions"].append({"instrument_id": "Z", "quantity": "10"})
    else:
        request["model_portfolio"]["targets"].append({"instrument_id": "Z", "weight": "0.1"})
    at = len(request["market_data_snapshot"]["prices"]) - 1
    assert _errors(request) == [(f"market_data_snapshot.prices[{at}].price",
                                 "must be greater than 0 for an instrument held or in the model, got 0.00")]


def test_a_negative_price_is_422_even_unused():
    """§9.1: negative prices are rejected, read or not."""
    request = copy.deepcopy(REQUEST)
    request["market_data_snapshot"]["prices"].append({"instrument_id": "UNUSED", "price": "-1", "currency": "SGD"})
    assert _errors(request) == [("market_data_snapshot.prices[1].price", "must be greater than 0, got -1")]


def test_a_negative_fx_rate_is_422_naming_it():
    """§9.1: a negative rate is refused at the door; read by the trade stages it would end
    as a 500 on a broken stage contract."""
    assert _errors(_with(("market_data_snapshot", "fx_rates", 0, "rate"), "-1.35")) == [
        ("market_data_snapshot.fx_rates[0].rate", "must be >= 0, got -1.35")]


@pytest.mark.parametrize("path, at_limit, past_limit, field", [
    (("market_data_snapshot", "prices", 0, "price"), "99999999999999999.99999999999999999999", "100000000000000000",
     "market_data_snapshot.prices[0].price"),
    (("options", "max_turnover_pct"), "1", "1.00000000000000000001", "options.max_turnover_pct"),
    (("options", "group_constraints"), {"sector:TECH": {"max_weight": "1"}}, {"sector:TECH": {"max_weight": "1.01"}},
     "options.group_constraints['sector:TECH'].max_weight"),
    (("shelf_entries", 0, "settlement_days"), 10, 11, "shelf_entries[0].settlement_days"),
    (("options", "fx_settlement_days"), 0, -1, "options.fx_settlement_days"),
    (("options", "suitability_thresholds"), {"cash_band_min_weight": "0.1", "cash_band_max_weight": "0.1"},
     {"cash_band_min_weight": "0.1", "cash_band_max_weight": "0.09999"}, "options.suitability_thresholds"),
], ids=["magnitude", "turnover", "group-cap", "settlement-days", "fx-settlement-days", "cash-band"])
def test_a_limit_is_met_at_its_bound_and_missed_past_it(path, at_limit, past_limit, field):
    """The contract's bounds are inclusive (§3.6: a weight in [0, 1], settlement days in
    [0, 10], a cash band whose min does not exceed its max) but for the magnitude, which
    must be below 1e17: the value at the bound runs, the one just past it is a 422
    naming the field."""
    parse_request(_with(path, at_limit), "r0")
    assert [f for f, _ in _errors(_with(path, past_limit))] == [field]


@pytest.mark.parametrize("lots_sum_short_by, valid", [("0.0001", True), ("0.0002", False)])
def test_lots_may_fall_short_of_their_position_by_a_ten_thousandth(lots_sum_short_by, valid):
    """§3.6: a position's lots add up to its quantity within 0.0001 (lot quantities an
    export rounded); further apart, the request is a 422 naming the lots."""
    request = copy.deepcopy(REQUEST)
    quantity = str(Decimal(5) + Decimal(lots_sum_short_by))
    request["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": quantity, "lots": [
        {"lot_id": "L1", "quantity": "5", "unit_cost": {"amount": "90", "currency": "USD"}, "purchase_date": "2024-01-02"}]}]
    if valid:
        parse_request(request, "r0")
    else:
        assert _errors(request) == [("portfolio_snapshot.positions[0].lots", f"lot quantities sum to 5, position quantity is {quantity}")]


@pytest.mark.parametrize("lots", [
    [{"lot_id": "L1", "quantity": "x", "unit_cost": {"amount": "90", "currency": "USD"}, "purchase_date": "2024-01-02"}],
    ["not a lot"],
])
def test_a_lot_that_fails_its_own_check_is_not_also_summed(lots):
    """The lot-sum check is a model validator: pydantic runs it only once every lot passed
    its own checks, so the 422 lists the bad lot alone (it added "lot quantities sum to 0")."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "5", "lots": lots}]
    assert [field for field, _ in _errors(request)] == [
        "portfolio_snapshot.positions[0].lots[0]" + (".quantity" if isinstance(lots[0], dict) else "")]


@pytest.mark.parametrize("band, fields", [
    ({"cash_band_min_weight": "2", "cash_band_max_weight": "1.5"},
     ["options.suitability_thresholds.cash_band_min_weight", "options.suitability_thresholds.cash_band_max_weight"]),
    ({"cash_band_min_weight": "0.6", "cash_band_max_weight": "0.4"}, ["options.suitability_thresholds"]),
])
def test_a_cash_band_bound_out_of_range_is_not_also_compared(band, fields):
    """min above max is a fault only between two bounds that passed their own range checks."""
    request = copy.deepcopy(REQUEST)
    request["options"] = {**request["options"], "suitability_thresholds": band}
    assert [field for field, _ in _errors(request)] == fields


@pytest.mark.parametrize("path, value, field", [
    (("options", "group_constraints"), {"sector:": {"max_weight": "0.5"}}, "options.group_constraints['sector:']"),
    (("options", "group_constraints"), {":TECH": {"max_weight": "0.5"}}, "options.group_constraints[':TECH']"),
    (("options", "max_overdraft_by_ccy"), {"": "1"}, "options.max_overdraft_by_ccy"),
], ids=["no-value", "no-attribute", "no-currency"])
def test_a_key_with_an_empty_part_is_422(path, value, field):
    """A group key is attribute:value, both parts non-empty, and an overdraft limit names a
    currency: an empty part would match nothing and the limit would silently not apply."""
    assert [f for f, _ in _errors(_with(path, value))][0] == field


def test_a_lot_without_its_unit_cost_is_422():
    """A lot's unit cost is what its gain is measured from (§3.6): without it the tax
    stage has nothing to measure, so the request is refused, naming the lot's field."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["positions"] = [{"instrument_id": "US_EQ", "quantity": "5", "lots": [
        {"lot_id": "L1", "quantity": "5", "purchase_date": "2024-01-02"}]}]
    assert [f for f, _ in _errors(request)] == ["portfolio_snapshot.positions[0].lots[0].unit_cost"]


def test_dust_trades_are_suppressed_unless_asked_not_to():
    """suppress_dust_trades defaults to true (§4): a buy below the minimum notional is
    suppressed, not proposed, when the option is not sent at all."""
    request = copy.deepcopy(REQUEST)
    del request["options"]["suppress_dust_trades"]
    request["options"]["min_trade_notional"] = {"amount": "100000", "currency": "SGD"}
    result = simulate_many([request])[0]
    assert [i for i in result["intents"] if i["intent_type"] == "SECURITY_TRADE"] == []
    assert [s["instrument_id"] for s in result["diagnostics"]["suppressed_intents"]] == ["US_EQ"]
    request["options"]["suppress_dust_trades"] = False
    assert [i["instrument_id"] for i in simulate_many([request])[0]["intents"] if i["intent_type"] == "SECURITY_TRADE"] == ["US_EQ"]


def test_as_of_keys_change_nothing_unless_an_rfc_option_reads_them():
    """The reference ignores ``as_of`` (§9): snapshots a day apart and prices a year old
    run as they would there, until ``max_skew_minutes`` or ``max_staleness_minutes`` asks
    for the RFC-0001 check."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["as_of"] = "2026-11-26T10:00:00Z"
    request["market_data_snapshot"]["as_of"] = "2026-11-25T10:00:00Z"
    for price in request["market_data_snapshot"]["prices"]:
        price["as_of"] = "2025-11-25T10:00:00Z"
    skew, stale = (_with(("options",), {**request["options"], name: 15}) for name in ("max_skew_minutes", "max_staleness_minutes"))
    for r in (skew, stale):
        r["portfolio_snapshot"], r["market_data_snapshot"] = request["portfolio_snapshot"], request["market_data_snapshot"]
    with_keys, plain, skewed, staled = simulate_many([request, REQUEST, skew, stale])
    for key in ("status", "intents", "after_simulated", "rule_results"):
        assert with_keys[key] == plain[key]
    assert plain["status"] == "READY" and plain["intents"]
    assert (skewed["status"], skewed["diagnostics"]["warnings"]) == ("BLOCKED", ["SNAPSHOT_SKEW"])
    assert (staled["status"], staled["diagnostics"]["warnings"]) == ("BLOCKED", ["PRICE_STALE"])


def test_as_of_and_trade_by_are_checked_only_where_an_rfc_option_reads_them():
    """Text the reference would ignore is not a 422 while no option reads it (it is dropped,
    as if never sent); with the option that reads it, it is."""
    request = copy.deepcopy(REQUEST)
    request["portfolio_snapshot"]["as_of"] = "yesterday"
    request["market_data_snapshot"]["as_of"] = 12345
    request["market_data_snapshot"]["prices"][0]["as_of"] = "garbage"
    request["shelf_entries"][0]["trade_by"] = "WHATEVER"
    rows = parse_request(request, "r0")
    assert rows["portfolios"][0]["portfolio_as_of"] is None and rows["portfolios"][0]["market_as_of"] is None
    assert rows["prices"][0]["as_of"] is None and rows["shelf"][0]["trade_by"] == "UNITS"
    assert simulate_many([request])[0]["status"] == simulate_many([REQUEST])[0]["status"] == "READY"
    assert parse_request(_with(("shelf_entries", 0, "trade_by"), None), "r0")["shelf"][0]["trade_by"] == "UNITS"

    for option, minutes in (("max_skew_minutes", 15), ("max_staleness_minutes", 60)):
        reading = _with(("options", option), minutes)
        reading["portfolio_snapshot"], reading["market_data_snapshot"] = request["portfolio_snapshot"], request["market_data_snapshot"]
        assert [f for f, _ in _errors(reading)] == [
            "market_data_snapshot.prices[0].as_of", "portfolio_snapshot.as_of", "market_data_snapshot.as_of",
        ], option
    for value in ("WHATEVER", None):
        notional = _with(("options", "notional_sizing"), "true")
        notional["shelf_entries"][0]["trade_by"] = value
        assert [f for f, _ in _errors(notional)] == ["shelf_entries[0].trade_by"]


@pytest.mark.parametrize("thresholds, field", [
    ({"note": "hello", "reviewed_by": 7, "flags": ["x"]}, None),  # not the reference's keys: ignored (§3)
    ({"issuer_max_weight": "0.2", "cash_band_min_weight": None}, None),
    ({"issuer_max_weight": "1.5"}, "options.suitability_thresholds.issuer_max_weight"),
    ({"issuer_max_weight": "abc"}, "options.suitability_thresholds.issuer_max_weight"),
    ({"max_weight_by_tier": {"L6": "0.1"}}, "options.suitability_thresholds.max_weight_by_tier"),
    ({"cash_band_min_weight": "0.3", "cash_band_max_weight": "0.2"}, "options.suitability_thresholds"),
])
def test_suitability_thresholds_check_weights_and_ignore_other_keys(thresholds, field):
    """§3.6 item 8: weights outside [0, 1], tier keys other than L1..L5 and a cash band with
    min > max are 422; a key that is no weight of the reference's is ignored, as anywhere."""
    request = _with(("options", "suitability_thresholds"), thresholds)
    if field is None:
        parse_request(request, "r0")
    else:
        assert [f for f, _ in _errors(request)] == [field]


def _counting_passes(monkeypatch) -> list[int]:
    """The number of requests in each engine pass the JSON door makes from now on."""
    import dpm_vec.simulate as sim

    passes: list[int] = []
    real = sim._simulate

    def counted(parsed):
        passes.append(len(parsed))
        return real(parsed)

    monkeypatch.setattr(sim, "_simulate", counted)
    return passes


def test_requests_named_beyond_the_quantity_range_are_set_aside_in_one_more_pass(monkeypatch):
    """Three requests of sixteen buy beyond the quantity range: the failed pass names them,
    they get their 422s and the thirteen others one more pass (not a halving search),
    each slot exactly its solo result."""
    penny = _with(("market_data_snapshot", "prices", 0, "price"), "0.0000001")
    requests = [penny if i in (2, 5, 11) else REQUEST for i in range(16)]
    solo = simulate_many([REQUEST])[0]
    passes = _counting_passes(monkeypatch)
    slots = simulate_many(requests)
    assert passes == [16, 13]
    for i in (2, 5, 11):
        assert slots[i]["status"] == 422 and slots[i]["detail"].startswith(f"request {i + 1}: a BUY of 37037037037 units")
    assert all(strip_random(s) == strip_random(solo) for i, s in enumerate(slots) if i not in (2, 5, 11))


def test_a_request_that_breaks_the_pass_is_isolated_by_halving(monkeypatch):
    """One request of sixteen breaks the shared pass with an error that names no request
    (here an engine fault planted on its run key): halving isolates it in 9 passes instead
    of 1 + 16 one at a time, its slot gets a 500 naming it, and every other slot gets
    exactly its solo result."""
    import dpm_vec.simulate as sim

    real_run = sim.run

    def faulty(book, **kwargs):
        if "r0000005" in book.portfolios["run_key"].to_list():
            raise RuntimeError("planted fault")
        return real_run(book, **kwargs)

    monkeypatch.setattr(sim, "run", faulty)
    solo = simulate_many([REQUEST])[0]
    passes = _counting_passes(monkeypatch)
    slots = simulate_many([REQUEST] * 16)
    assert passes == [16, 8, 4, 4, 2, 1, 1, 2, 8]  # the failing half halved again, the good ones each one pass
    assert slots[5]["status"] == 500 and slots[5]["detail"] == "request 6 could not be simulated (RuntimeError: planted fault)"
    assert all(strip_random(s) == strip_random(solo) for i, s in enumerate(slots) if i != 5)


def test_requests_named_in_one_failed_pass_each_get_their_own_trade():
    """Two requests of one batch buy beyond the quantity range, each a different trade:
    each 422 names its own trade (the engine's message for that run key), not the first
    one the shared pass's error names."""
    requests = [REQUEST, *(_with(("market_data_snapshot", "prices", 0, "price"), price) for price in ("0.0000001", "0.0000002"))]
    plain, first, second = simulate_many(requests)
    assert plain["status"] == "READY"
    assert first["status"] == second["status"] == 422
    assert first["detail"].startswith("request 2: a BUY of 37037037037 units of US_EQ")
    assert second["detail"].startswith("request 3: a BUY of 18518518518 units of US_EQ")


def test_rfc_domain_errors_turn_only_the_concentration_block_into_a_problem():
    """``rfc_domain_errors`` asks for RFC §7's problem for INFEASIBLE_CONCENTRATION alone:
    a run that blocks for any other reason (here a missing price) still answers its
    BLOCKED result."""
    request = json.loads((Path(__file__).resolve().parents[1] / "data" / "requests" / "missing_price_block.json").read_text())
    request["options"][JSON_DOOR_OPTION] = True
    result = simulate_many([request])[0]
    assert result["status"] == "BLOCKED" and "lineage" in result
