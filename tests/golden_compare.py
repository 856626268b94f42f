"""A small comparator for golden results: what the reference's expected output states
must hold in ours. Numbers compare as decimals (money to 0.01, weights to 1e-4,
quantities exactly); keyed lists match item by item; random ids are ignored."""

from __future__ import annotations

import copy
from decimal import Decimal, InvalidOperation

SKIP = {"rebalance_run_id", "universe_id", "target_id", "intent_id", "rationale",
        "constraints_applied", "coverage", "message", "correlation_id", "lineage", "explanation",
        "remediation_hint", "gate_decision"}
MONEY = {"amount", "buy_amount", "sell_amount_estimated"}
WEIGHTS = {"weight", "final_weight", "score", "measured"}


# what differs from pass to pass for the same request: run ids and lineage
RANDOM_FIELDS = ("rebalance_run_id", "lineage")


def strip_random(result: dict) -> dict:
    """``result`` without the fields that differ between two runs of the same request, so
    a batch slot compares whole with its solo run."""
    r = copy.deepcopy(result)
    for f in RANDOM_FIELDS:
        r.pop(f, None)
    if isinstance(r.get("universe"), dict):
        r["universe"].pop("universe_id", None)
    if isinstance(r.get("target"), dict):
        r["target"].pop("target_id", None)
    return r


def intent_key(item: dict):
    if item.get("intent_type") == "FX_SPOT":
        return ("FX_SPOT", item.get("pair"), item.get("buy_currency"))
    return (item.get("intent_type"), item.get("instrument_id"), item.get("side"))


KEYS = {
    "intents": intent_key,
    "positions": lambda x: x.get("instrument_id"),
    "cash_balances": lambda x: x.get("currency"),
    "excluded": lambda x: x.get("instrument_id"),
    "suppressed_intents": lambda x: x.get("instrument_id"),
    "dropped_intents": lambda x: x.get("instrument_id"),
    "targets": lambda x: x.get("instrument_id"),
    "rule_results": lambda x: x.get("rule_id"),
    "group_constraint_events": lambda x: x.get("constraint_key"),
    "tax_budget_constraint_events": lambda x: x.get("instrument_id"),
    "cash_ladder": lambda x: (x.get("currency"), x.get("date_offset")),
    "cash_ladder_breaches": lambda x: (x.get("currency"), x.get("date_offset")),
}


def _number(value):
    if isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def _default_key(item: dict):
    for k in ("key", "instrument_id", "currency", "rule_id"):
        if k in item:
            return item[k]
    return repr(sorted(item.items()))


def _resolve(doc: dict) -> dict:
    ids = {i.get("intent_id"): intent_key(i) for i in doc.get("intents") or []}
    for i in doc.get("intents") or []:
        if "dependencies" in i:
            i["dependencies"] = sorted(repr(ids.get(d, d)) for d in i["dependencies"])
    return doc


def differences(expected: dict, actual: dict) -> list[str]:
    import copy

    errors: list[str] = []
    _compare(_resolve(copy.deepcopy(expected)), _resolve(copy.deepcopy(actual)), "$", "", errors)
    return errors


def _compare(exp, act, path, field, errors):
    if field in SKIP:
        return
    if isinstance(exp, dict):
        if not isinstance(act, dict):
            errors.append(f"{path}: expected object")
            return
        for k, v in exp.items():
            if k in SKIP:
                continue
            if k not in act:
                if v not in (None, [], {}):
                    errors.append(f"{path}.{k}: missing")
                continue
            _compare(v, act[k], f"{path}.{k}", k, errors)
    elif isinstance(exp, list):
        if not isinstance(act, list):
            errors.append(f"{path}: expected list")
        elif exp and isinstance(exp[0], dict):
            key = KEYS.get(field, _default_key)
            have: dict = {}
            for x in act:
                have.setdefault(key(x), []).append(x)
            for item in exp:
                candidates = have.get(key(item), [])
                if not candidates:
                    errors.append(f"{path}[{key(item)}]: missing")
                    continue
                # an id may repeat (a held excluded target is excluded twice): any match will do
                attempts = []
                for candidate in candidates:
                    found: list[str] = []
                    _compare(item, candidate, f"{path}[{key(item)}]", field, found)
                    attempts.append(found)
                if all(attempts):
                    errors.extend(attempts[0])
            if field in KEYS:
                extra = set(have) - {key(x) for x in exp}
                if extra:
                    errors.append(f"{path}: unexpected {sorted(map(str, extra))}")
        elif sorted(map(str, exp)) != sorted(map(str, act)) and field not in ("eligible_for_buy", "eligible_for_sell", "price_missing", "fx_missing", "shelf_missing", "dependencies"):
            errors.append(f"{path}: expected {exp} got {act}")
        elif sorted(set(map(str, exp))) != sorted(set(map(str, act))):
            errors.append(f"{path}: expected {exp} got {act}")
    elif exp is None:
        if act not in (None, "", [], {}):
            errors.append(f"{path}: expected null got {act!r}")
    else:
        e, a = _number(exp), _number(act)
        if e is not None and a is not None:
            tol = Decimal("0.01") if field in MONEY else Decimal("0.0001") if field in WEIGHTS else Decimal(0)
            if abs(e - a) > tol:
                errors.append(f"{path}: expected {exp} got {act}")
        elif str(exp) != str(act):
            errors.append(f"{path}: expected {exp!r} got {act!r}")
