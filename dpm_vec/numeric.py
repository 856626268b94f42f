"""Fixed-point arithmetic conventions shared by every stage.

The reference service computes in 28-significant-digit half-even decimals. dpm_vec keeps
every amount, quantity, price, rate and weight in one fixed-point type, ``DEC`` =
Decimal(38, 20): Polars rounds each product and quotient half-even at scale 20, so a
chain like ``0.3 * (0.2 / 0.3)`` lands back on exactly ``0.2`` (spec §1.1), and values up
to 10^18 fit. Integer quantities are floored exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TypeVar

import polars as pl

from dpm_vec.errors import ENGINE_FAILURES, QuantityRangeError, ValueRangeError, is_overflow

T = TypeVar("T")

SCALE = 20
DEC = pl.Decimal(38, SCALE)
# quantities: 28 decimals so that tax-limited fractional quantities keep every digit the
# reference prints (see dpm_vec.dec28); holds up to 10^10 units
QTY = pl.Decimal(38, 28)
# trades of this many units or more are beyond QTY: it holds under 10^10 units, and a
# trade adds to (or takes from) a holding of up to 10^9, the contract's limit
TRADE_UNITS_LIMIT = 9 * 10**9
# weights in the target stage: 28 decimals, which is the reference's own precision for
# weights in [0.1, 1), so redistributions like 0.2571…+0.2428… land where the reference's do
WEIGHT = pl.Decimal(38, 28)
# the magnitude model weights and the weight options (single_position_max_weight,
# min_cash_buffer_pct) stay within, at the JSON door and in a book: the target stage sums
# and compares them in WEIGHT; the reference takes any value, and this range is far beyond
# every meaningful one
MAX_WEIGHT = Decimal(10) ** 9
# the range of the staleness and skew limits (minutes), at the JSON door and in a book: 10^7
# minutes is 19 years, past any meaningful limit
MAX_MINUTES = 10**7
# an amount's own 28 decimals where it has more than DEC keeps (a result's cash balance fed
# back as the next snapshot's, below 1e10): the 28-digit sums start from every digit of it
AMOUNT_28 = pl.Decimal(38, 28)
AMOUNT_28_LIMIT = Decimal(10) ** (38 - AMOUNT_28.scale)  # the balances AMOUNT_28 holds lie below this
# one unit of DEC's last place: a 28-decimal figure held in DEC is off by up to half of it
DEC_UNIT = "0.00000000000000000001"
HALF_DEC_UNIT = Decimal(DEC_UNIT) / 2
# a share of a figure within which its fixed-point value and the reference's 28 digits may
# fall on different sides of a limit (an inverse quote's 20-decimal rate is off by up to
# ~1e-17 of itself): decisions that close are made again in 28 digits (dpm_vec.dec28)
HAIR = "0.000000000001"
# DEC holds values of magnitude under 10^18; a value estimated in floating point this far
# beyond it (a part in 10^9, far above Float64's error) cannot fit whatever its digits
DEC_RANGE = 10.0**18
DEC_RANGE_MARGIN = 1 + 1e-9
DEC_RANGE_TEXT = "the engine's fixed-point range (values under 1E18)"
# WEIGHT holds values under 10^10, and the target stage sums a run's weights (and a
# single-position cap's excess over every entry), so their magnitudes must add up to less
WEIGHT_RANGE = 1e10
WEIGHT_RANGE_TEXT = "the engine's weight range (weights under 1E+10)"
WEIGHT_SUMS_TEXT = "the engine's weight range (weights adding up to under 1E+10)"


def lit(value: str | int | Decimal) -> pl.Expr:
    """A DEC literal; strings keep their exact decimal value."""
    return pl.lit(Decimal(str(value)), dtype=DEC)


# magnitude pairs (|a| below, |b| below) whose product WEIGHT holds (it holds below 1e10),
# each costing ~4 ms on 460,000 rows: a portfolio's value × a weight (below 1, or below 10
# up to a billion), and quantities × prices up to 1e5 × 1e5, 1e8 × 1e2 or 1e2 × 1e8; a
# larger pair keeps DEC's product
VALUE_TIMES_WEIGHT = (("1e10", "1"), ("1e9", "10"))
QUANTITY_TIMES_PRICE = (("1e10", "1"), ("1e8", "1e2"), ("1e5", "1e5"), ("1e2", "1e8"))


def product_of_all_digits(a: pl.Expr, b: pl.Expr, bounds: tuple[tuple[str, str], ...], frame: pl.DataFrame | None = None) -> pl.Expr:
    """a × b in DEC from every digit of both factors. A QTY quantity or WEIGHT weight can
    carry 28 decimals; read at DEC's 20 first, its product misses the reference's 28-digit
    one by up to 1e-20 × the other factor (a notional-sized 664.5044112006137322593018796
    units × 26.07 gave 17323.62999999999999999995 for the reference's 17323.63). Where the
    factors' magnitudes keep the product inside WEIGHT, it is taken at WEIGHT's 28
    decimals, then rounded half-even to DEC; elsewhere DEC's product stands. ``bounds``:
    the magnitude pairs tried (``VALUE_TIMES_WEIGHT``, ``QUANTITY_TIMES_PRICE``). With the
    ``frame`` the expression is for, where every row fits (the usual case), the product is
    the WEIGHT one alone (the DEC product of every row is not taken to be discarded)."""
    fits = pl.any_horizontal(
        (a.abs() < pl.lit(Decimal(x), dtype=DEC)) & (b.abs() < pl.lit(Decimal(y), dtype=DEC)) for x, y in bounds
    )
    if frame is not None and frame.height and frame.select(fits.all()).item():
        return (a.cast(WEIGHT) * b.cast(WEIGHT)).cast(DEC)
    # both branches are computed for every row: zeros keep the other rows' product in range
    at_28 = (pl.when(fits).then(a).otherwise(0).cast(WEIGHT) * pl.when(fits).then(b).otherwise(0).cast(WEIGHT)).cast(DEC)
    return pl.when(fits).then(at_28).otherwise(a.cast(DEC) * b.cast(DEC))


def times_price(frame: pl.DataFrame, quantity: str, price: pl.Expr) -> pl.Expr:
    """``frame``'s QTY column ``quantity`` × ``price`` in DEC. Whole and short quantities
    are exact at DEC's 20 decimals, so only the rows holding a quantity with more (a
    notional-sized or tax-limited one) take ``product_of_all_digits``; to be evaluated on
    ``frame`` itself (``exact_where``)."""
    q = pl.col(quantity)
    plain = q.cast(DEC) * price
    more_digits = beyond_dec_decimals(frame, quantity)
    if more_digits is None:
        return plain
    return exact_where(frame, more_digits, product_of_all_digits(q, price, QUANTITY_TIMES_PRICE), plain)


def beyond_dec_decimals(frame: pl.DataFrame, column: str) -> pl.Expr | None:
    """Whether a value of ``frame``'s decimal ``column`` has digits past DEC's 20 decimals
    (a notional-sized or tax-limited quantity); None where its type holds no more."""
    dtype = frame.schema[column]
    if not (isinstance(dtype, pl.Decimal) and dtype.scale > SCALE):
        return None
    return pl.col(column).to_physical() % pl.lit(10 ** (dtype.scale - SCALE), dtype=pl.Int128) != 0


def exact_where(frame: pl.DataFrame, needs: pl.Expr, exact: pl.Expr, plain: pl.Expr) -> pl.Expr:
    """``plain`` over ``frame``, and ``exact`` on the rows where ``needs`` holds. The exact
    form's casts and 28-decimal products cost several times the plain product on every
    row it is evaluated on (~90 ms on a shard's 460,000 after-state positions, for the few
    tax-limited quantities among them), so where few rows need it, it is evaluated on
    those rows alone and the result comes back as a column of ``frame``'s height: the
    expression returned must be evaluated on ``frame`` itself."""
    rows = frame.select(pl.arg_where(needs)).to_series()
    if rows.len() == 0:
        return plain
    if rows.len() * 4 > frame.height:
        return pl.when(needs).then(exact).otherwise(plain)
    values = frame.select(plain).to_series()
    return pl.lit(values.scatter(rows, frame[rows].select(exact).to_series()))


def dmax(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.when(a >= b).then(a).otherwise(b)


def dmin(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.when(a <= b).then(a).otherwise(b)


def positive_or_null(column: str) -> pl.Expr:
    """``column`` where it is above zero, else null: the divisor of a division that a
    when() guards. Polars 2.2 evaluates such a division on the rows the condition
    excludes too, and raises on a zero Decimal divisor there; a null divisor gives null."""
    return pl.when(pl.col(column) > 0).then(pl.col(column))


def as_f64(column: str) -> pl.Expr:
    """``column`` in floating point: an estimate of a value the fixed point cannot hold."""
    return pl.col(column).cast(pl.Float64)


def within(a: pl.Expr, b: pl.Expr, eps: pl.Expr) -> pl.Expr:
    """|a − b| ≤ eps, without subtracting values half of DEC's range apart (which are not
    within any hair of each other, and whose difference can leave the range): null there."""
    apart = (a.cast(pl.Float64) - b.cast(pl.Float64)).abs() >= DEC_RANGE / 2
    return dabs(a - pl.when(~apart).then(b)) <= eps


def dabs(a: pl.Expr) -> pl.Expr:
    return pl.when(a < 0).then(-a).otherwise(a)


def to_text(value: Decimal | None) -> str | None:
    """Canonical decimal text for JSON: no exponent, no trailing zeros."""
    if value is None:
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def units_text(units: pl.Expr | str) -> pl.Expr:
    """A decimal number of units (an expression or a column's name) as text without
    trailing zeros after its decimal point (25000000000, 100.5, 0)."""
    return (pl.col(units) if isinstance(units, str) else units).cast(pl.String).str.replace(r"(\.[0-9]*[1-9])0+$|\.0+$", "${1}")


def quantity_range_error(trades: pl.DataFrame, runs: pl.DataFrame, units: str, tail: pl.Expr | None = None) -> QuantityRangeError:
    """The QuantityRangeError for ``trades`` (run, side, instrument_id, ``units``; each
    run's first row is the trade its message names, the first row the one the error names),
    with every failing run's message by run key (``runs``: run, run_key). ``tail`` adds
    to each message."""
    message = pl.format(
        "a {} of {} units of {} is outside the engine's quantity range (trades under {} units)",
        "side", units_text(units), "instrument_id", pl.lit(f"{TRADE_UNITS_LIMIT:,}"),
    )
    first, by_run_key = _messages_by_run_key(trades, runs, message if tail is None else pl.concat_str(message, tail))
    return QuantityRangeError(first, by_run_key)


def _messages_by_run_key(rows: pl.DataFrame, runs: pl.DataFrame, message: pl.Expr) -> tuple[str, dict[str, str]]:
    """(the first row's ``message``; each run's first row's ``message`` by its run key),
    for a range error naming every run of ``rows`` (run, ...; ``runs``: run, run_key)."""
    named = (
        rows.unique("run", keep="first", maintain_order=True).join(runs.select("run", "run_key"), on="run", maintain_order="left")
        .select("run_key", message.alias("_message"))
    )
    return named["_message"][0], dict(zip(named["run_key"].to_list(), named["_message"].to_list()))


def naming_overflows(compute: Callable[[], T], frame: pl.DataFrame, runs: pl.DataFrame, estimate: pl.Expr, what: pl.Expr,
                     limit: float = DEC_RANGE, range_text: str = DEC_RANGE_TEXT) -> T:
    """``compute()``; if its arithmetic leaves DEC's range (or ``limit``'s, WEIGHT's for
    weights), the ValueRangeError naming every run of ``frame`` with a row whose
    ``estimate`` lies beyond it (``value_range_error``), so that a sweep blocks those
    portfolios alone instead of halving its shard until it finds them. If no value can be
    named, the original failure stands. Costs nothing unless ``compute`` fails."""
    try:
        return compute()
    except ENGINE_FAILURES as exc:
        if not is_overflow(exc):
            raise
        error = value_range_error(frame, runs, estimate, what, limit, range_text)
        if error is None:
            raise
        raise error from exc


def sums_may_leave_range(column: str, *frames: pl.DataFrame) -> bool:
    """Whether some sum of ``column``'s values over the rows of ``frames`` could reach
    DEC's range: their count times their largest magnitude does. Almost never true, so a
    stage checks its sums per run only then."""
    return sum(frame.height for frame in frames) * largest_magnitude(column, *frames) >= DEC_RANGE


def largest_magnitude(column: str, *frames: pl.DataFrame) -> float:
    """The largest magnitude of decimal ``column`` over ``frames`` (0.0 where none holds a
    value), from each frame's two ends: under a millisecond on a shard's weight map, where
    casting every row to Float64 first takes ~50 ms."""
    ends = pl.concat([frame.select(pl.col(column).min().alias("_least"), pl.col(column).max().alias("_most")) for frame in frames])
    return ends.select(pl.max_horizontal(pl.col("_least").abs(), pl.col("_most").abs()).cast(pl.Float64).max()).item() or 0.0


def name_sums_beyond_range(column: str, frames: list[pl.DataFrame], runs: pl.DataFrame, what: str) -> None:
    """Raise the ValueRangeError naming every run whose absolute ``column`` values over
    ``frames`` (run, ``column``) add up past DEC's range (``what`` names that sum), before
    a stage sums them: Polars' grouped decimal sum wraps silently past its 128 bits (about
    1.7E18) and holds a sum past 38 digits unchecked. Per run only where
    ``sums_may_leave_range``, so almost never."""
    if sums_may_leave_range(column, *frames):
        magnitudes = pl.concat([frame.select("run", as_f64(column).abs().alias("_magnitude")) for frame in frames])
        _name_run_sums(magnitudes, runs, pl.col("_magnitude"), pl.lit(what), DEC_RANGE, DEC_RANGE_TEXT)


def name_weight_sums_beyond_range(frame: pl.DataFrame, runs: pl.DataFrame, magnitude: pl.Expr, what: pl.Expr) -> None:
    """Raise the ValueRangeError naming every run whose ``magnitude`` (a non-negative
    Float64 expression over ``frame``'s rows: run, ...) adds up to ``WEIGHT_RANGE`` or
    more; ``what`` (text over the run's first row) names the sum. The caller checks first
    that the row count times the largest magnitude can reach the limit (almost never)."""
    _name_run_sums(frame, runs, magnitude, what, WEIGHT_RANGE, WEIGHT_SUMS_TEXT)


def _name_run_sums(frame: pl.DataFrame, runs: pl.DataFrame, magnitude: pl.Expr, what: pl.Expr, limit: float, range_text: str) -> None:
    """Raise the ValueRangeError naming every run (in ``runs`` order) whose ``magnitude``
    over ``frame``'s rows adds up to ``limit`` or more, ``what`` over its first row."""
    sums = frame.group_by("run", maintain_order=True).agg(magnitude.sum().alias("_sum"), what.first().alias("_what"))
    beyond = value_range_error(runs.select("run").join(sums, on="run", how="inner", maintain_order="left"), runs, pl.col("_sum"),
                               pl.col("_what"), limit, range_text)
    if beyond is not None:
        raise beyond


def value_range_error(frame: pl.DataFrame, runs: pl.DataFrame, estimate: pl.Expr, what: pl.Expr,
                      limit: float = DEC_RANGE, range_text: str = DEC_RANGE_TEXT) -> ValueRangeError | None:
    """The ValueRangeError naming every run of ``frame`` (run, ...) with a row whose
    ``estimate`` (a Float64 expression of a value) lies beyond ``limit`` (DEC's range
    unless said; ``range_text`` names it), each with its first such row's message
    (``what``, text naming the value, then the estimate); None if no row's does.
    ``runs``: run, run_key."""
    beyond = frame.with_columns(estimate.alias("_estimate")).filter(pl.col("_estimate").abs() >= limit * DEC_RANGE_MARGIN)
    if beyond.is_empty():
        return None
    first, by_run_key = _messages_by_run_key(beyond, runs, pl.format(
        "{} is about {}, beyond {}", what, scientific_text(pl.col("_estimate")), pl.lit(range_text)))
    return ValueRangeError(first, by_run_key)


def scientific_text(value: pl.Expr) -> pl.Expr:
    """A non-zero Float64 as text in four significant digits: 1.055E+18."""
    exponent = value.abs().log10().floor()
    exponent = exponent + ((value / pl.lit(10.0).pow(exponent)).round(3).abs() >= 10).cast(pl.Float64)  # 9.9996 rounds up to 10
    return pl.format("{}E{}{}", (value / pl.lit(10.0).pow(exponent)).round(3),
                     pl.when(exponent < 0).then(pl.lit("-")).otherwise(pl.lit("+")), exponent.abs().cast(pl.Int64))
