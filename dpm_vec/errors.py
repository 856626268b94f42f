"""Exceptions for bad input: each names where the fault is and what was expected."""

from __future__ import annotations

import ast
import json
import re

import polars as pl

# what a failed engine pass may raise: Polars reports a Rust panic (a decimal sum past 38
# digits, say) as PanicException, which derives from BaseException, not Exception
ENGINE_FAILURES: tuple[type[BaseException], ...] = (Exception, pl.exceptions.PanicException)


def is_overflow(exc: BaseException) -> bool:
    """Whether an engine failure is a value leaving the fixed point: an overflowing
    operation (ComputeError) or a result Polars cannot build at 38 digits (a panic)."""
    return (isinstance(exc, pl.exceptions.ComputeError) and "overflow" in str(exc)) or (
        isinstance(exc, pl.exceptions.PanicException) and "can't fit" in str(exc))


def first_line(exc: BaseException) -> str:
    """The first line of the exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def failure_summary(exc: BaseException) -> str:
    """The exception's type and the first line of its message (at most 200 characters); of
    a Polars panic, the messages inside its Rust error (``ErrString("...")``)."""
    text = str(exc)
    if isinstance(exc, pl.exceptions.PanicException):
        text = ", ".join(re.findall(r'ErrString\("([^"]*)"\)', text)) or text
    return f"{type(exc).__name__}: {next(iter(text.splitlines()), '')[:200]}"


# what an ended sweep leaves: said by each way it can end short
RESUMES = "committed shards are kept: the same command resumes"


class DpmVecError(Exception):
    """Base class of every error dpm_vec raises on purpose."""


def problem(type_: str, title: str, status: int, detail: str, instance: str | None = None, **extra) -> dict:
    """An RFC 7807 problem details body (``instance`` left out when not given)."""
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    if instance:
        body["instance"] = instance
    return body


class BookError(DpmVecError):
    """A structural fault in a book: missing file or column, wrong type, duplicate key."""

    def __init__(self, file: str, message: str, column: str | None = None, examples: list | None = None):
        self.file, self.message, self.column, self.examples = file, message, column, examples or []
        where = f"{file}" + (f", column {column!r}" if column else "")
        text = f"{where}: {message}"
        if self.examples:
            text += "; example rows: " + "; ".join(str(e) for e in self.examples[:5])
        super().__init__(text)

    def __reduce__(self):  # a worker process's error reaches the sweep whole
        return type(self), (self.file, self.message, self.column, self.examples)


# one step of an error path: ``.name``, ``[index]`` or a map key ``['key']`` (Python's repr)
_PATH_STEP = re.compile(r"""\.?([^.\[\]'"]+)|\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""")


def error_loc(field: str) -> list:
    """An error's path as FastAPI's ``loc``: ``header.Idempotency-Key`` →
    ``["header", "Idempotency-Key"]``, ``$`` (the whole body) → ``["body"]``,
    ``options.group_constraints['a.b'].max_weight`` →
    ``["body", "options", "group_constraints", "a.b", "max_weight"]``, a list item by its
    index. A path it cannot read stays one step after ``"body"``, not a guess."""
    if field.startswith("header."):
        return ["header", field.removeprefix("header.")]
    if field == "$":
        return ["body"]
    if field.startswith("."):
        return ["body", field]
    loc: list = ["body"]
    at = 0
    while at < len(field):
        step = _PATH_STEP.match(field, at)
        if step is None:
            return ["body", field]
        name, index, key = step.groups()
        loc.append(name if name is not None else int(index) if index is not None else ast.literal_eval(key))
        at = step.end()
    return loc


def fault(field: str, message: str, kind: str = "value_error", value=None, loc: list | None = None) -> dict:
    """One invalid field of a request: its path, what was expected, the check's
    pydantic-style type (the reference's 422 names it, spec §2.4), the input it failed on
    and, where the path alone does not give it, FastAPI's ``loc``."""
    error = {"field": field, "message": message, "type": kind, "input": value}
    if loc is not None:
        error["loc"] = loc
    return error


def not_an_object(body) -> dict:
    """The fault of a request body that is valid JSON but no object."""
    return fault("$", "request body must be a JSON object", "model_attributes_type", body)


class RequestError(DpmVecError):
    """An invalid JSON request; ``errors`` lists every invalid field: its path
    (``field``), what was expected (``message``) and, where known, the check's
    pydantic-style ``type``, the ``input`` it failed on and a ``loc`` where the path alone
    does not give it."""

    TYPE = "https://dpm-vec.dev/problems/invalid-request"

    def __init__(self, errors: list[dict]):
        self.errors = errors
        first = errors[0] if errors else {"field": "$", "message": "invalid request"}
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{first['field']}: {first['message']}{more}")

    def __reduce__(self):
        return type(self), (self.errors,)

    def problem(self, instance: str | None = None) -> dict:
        """RFC 7807 problem details, each error named by its path."""
        errors = [{"field": e["field"], "message": e["message"]} for e in self.errors]
        return problem(self.TYPE, "Invalid rebalance request", 422, str(self), instance, errors=errors)

    def validation_detail(self) -> dict:
        """The reference's 422 body (spec §2.4), FastAPI's validation shape:
        ``{"detail": [{"type", "loc", "msg", "input"}, ...]}``, every error listed."""
        return {"detail": [{"type": e.get("type", "value_error"),
                            "loc": [step if _utf8_or_none(step) is not None else ascii(step)
                                    for step in e.get("loc") or error_loc(e["field"])],
                            "msg": e["message"], "input": _utf8_or_none(e.get("input"))} for e in self.errors]}


def _utf8_or_none(value):
    """``value`` where strict JSON in UTF-8 can carry it; None for one holding a lone
    surrogate (JSON's \\ud800 escape) or a bare NaN or Infinity (which Python's parser
    takes, and no JSON body can echo)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError):
        return None
    return value


class RangeError(DpmVecError):
    """A valid request or portfolio the engine's fixed point cannot hold. Where the engine
    knows them, ``by_run_key`` holds every failing portfolio's run key and its own
    message, so a shared pass can block those alone instead of halving its way to them."""

    TYPE = ""
    TITLE = ""

    def __init__(self, message: str, by_run_key: dict[str, str] | None = None):
        super().__init__(message)
        self.by_run_key = by_run_key or {}

    def __reduce__(self):
        return type(self), (str(self), self.by_run_key)

    def problem(self, instance: str | None = None) -> dict:
        return problem(self.TYPE, self.TITLE, 422, str(self), instance)


class ValueRangeError(RangeError):
    """A valid request whose arithmetic leaves the engine's fixed-point range: money and
    weights are ``Decimal(38, 20)`` and ``Decimal(38, 28)``, so a value of 10^18 or more
    (a market value at an absurd FX rate), or of 10^10 or more at 28 decimals (a weight
    divided by a sum near 0, which negative model weights can make), overflows where the
    reference's floating decimals go on."""

    TYPE = "https://dpm-vec.dev/problems/value-out-of-range"
    TITLE = "Value outside the engine's fixed-point range"


class QuantityRangeError(RangeError):
    """A valid request whose trade the engine cannot hold: quantities are fixed-point
    ``Decimal(38, 28)``, under 10^10 units, and a trade may add to a holding of up to 10^9
    (the contract's limit), so trades stop short of 9 × 10^9 units."""

    TYPE = "https://dpm-vec.dev/problems/quantity-out-of-range"
    TITLE = "Trade outside the engine's quantity range"


class InfeasibleConstraintError(DpmVecError):
    """A valid request whose run the RFC-0001 asset-class cap blocks (INFEASIBLE_CONCENTRATION),
    told as RFC-0001 §7's problem when the request asks (``options.rfc_domain_errors``);
    otherwise it is a BLOCKED result, as in the reference."""

    TYPE = "https://api.dpm.com/errors/infeasible-constraint"  # RFC-0001 §7's example, verbatim

    def __init__(self, detail: str, portfolio_id: str):
        super().__init__(detail)
        self.portfolio_id = portfolio_id

    def __reduce__(self):
        return type(self), (str(self), self.portfolio_id)

    def problem(self, instance: str | None = None) -> dict:
        return problem(self.TYPE, "Constraint Redistribution Failed", 422, str(self), instance,
                       code="INFEASIBLE_CONCENTRATION", portfolio_id=self.portfolio_id)


def named_failures(exc: BaseException) -> dict[str, str]:
    """The portfolios ``exc`` names as failing, by run key, each with its own message
    (a RangeError may know them); empty for any other error."""
    return exc.by_run_key if isinstance(exc, RangeError) else {}
