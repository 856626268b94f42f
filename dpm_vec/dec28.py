"""28-significant-digit decimal arithmetic on Polars columns.

The reference computes in Python's default decimal context: every result rounded to 28
significant digits, half-even (spec §1.1). Fixed-point ``DEC`` agrees with it to far below
a cent, which is all money and weights need. Tax-limited sells are different: their
quantities are quotients like ``(budget − used) / gain`` that the reference emits with
all 28 digits, and quantities must agree exactly. For that walk (and the after-state
quantities it feeds) dpm_vec uses this floating decimal: a struct ``{z, k}`` meaning
``z × 10^k`` with ``z`` a Decimal(38, 28) normalised into [0.1, 1) — exactly 28
significant digits — so each product, quotient and sum is rounded once, as the reference
rounds it.

The operations run as Series kernels on the value's two parts (``Parts``): the frames
they serve are small (the tax-lot walk takes one step per lot, on a few hundred rows), and
a Series operation costs ~5-15 µs where an eager frame operation costs ~200 µs in Polars'
query engine. Nulls propagate as in the equivalent ``when/then`` expressions: a null
operand gives a null result; test, fill or coalesce a null value through ``is_null``,
``fill_null`` and ``coalesce`` here, never the struct's own methods (a Polars join can
leave a missing value as null fields under a valid struct). Read-outs (``to_dec``,
``sign``, …) are expressions.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import polars as pl

from dpm_vec.numeric import DEC

D28 = pl.Decimal(38, 28)
F28 = pl.Struct({"z": D28, "k": pl.Int32})
# powers of ten as lookup tables, built once: a dict literal costs ~2 ms per use to convert
_POW_D28 = pl.Series("pow", [Decimal(10) ** j for j in range(-28, 10)], dtype=D28)
_POW_DEC = pl.Series("pow", [Decimal(10) ** j for j in range(-20, 18)], dtype=DEC)
# literals built once: each pl.lit of a Decimal builds a Series (~25 µs)
_POW_D28_LIT, _POW_DEC_LIT = pl.lit(_POW_D28), pl.lit(_POW_DEC)
_D28_0, _D28_1E9 = pl.lit(0, dtype=D28), pl.lit(Decimal("1e9"), dtype=D28)
_DEC_0 = pl.lit(0, dtype=DEC)
_I32_0 = pl.lit(0, dtype=pl.Int32)
# one-element Series: arithmetic and comparisons broadcast them without building a literal
_ONE = {v: pl.Series([Decimal(v)], dtype=D28) for v in ("0", "1", "10", "0.1", "1e9", "1e-9")}
_DEC_ONE = {v: pl.Series([Decimal(v)], dtype=DEC) for v in ("0", "1e9")}


def _pow_d28(j: pl.Expr) -> pl.Expr:
    return _POW_D28_LIT.gather(j.clip(-28, 9) + 28)


def _pow_dec(j: pl.Expr) -> pl.Expr:
    return _POW_DEC_LIT.gather(j.clip(-20, 17) + 20)


def zero() -> pl.Expr:
    return pl.struct(_D28_0.alias("z"), _I32_0.alias("k"))


def one() -> pl.Expr:
    return pl.struct(pl.lit(Decimal("0.1"), dtype=D28).alias("z"), pl.lit(1, dtype=pl.Int32).alias("k"))


def _z(name: str) -> pl.Expr:
    return pl.col(name).struct.field("z")


def _k(name: str) -> pl.Expr:
    return pl.col(name).struct.field("k")


class Parts(NamedTuple):
    """An F28 column as its two Series: mantissa ``z`` (D28) and exponent ``k`` (Int32).
    Parts share their Series (constants are cached): never write into them in place."""

    z: pl.Series
    k: pl.Series

    def slice(self, offset: int, length: int | None = None) -> Parts:
        return Parts(self.z.slice(offset, length), self.k.slice(offset, length))

    def filter(self, mask: pl.Series) -> Parts:
        return Parts(self.z.filter(mask), self.k.filter(mask))

    @staticmethod
    def concat(values: list[Parts]) -> Parts:
        return Parts(pl.concat([v.z for v in values]), pl.concat([v.k for v in values]))


def _where(cond: pl.Series, yes: pl.Series, no: pl.Series) -> pl.Series:
    """``when(cond).then(yes).otherwise(no)`` on Series: a null ``cond`` takes ``no``."""
    return yes.zip_with(cond, no)


def where(cond: pl.Series, yes: Parts, no: Parts) -> Parts:
    return Parts(_where(cond, yes.z, no.z), _where(cond, yes.k, no.k))


def _full(n: int, value: int, dtype: pl.DataType) -> pl.Series:
    """n copies of ``value``. Short ones are cached: a walk step asks for the same few
    constants again and again (nothing writes into a Series here: operations return new ones)."""
    return _full_short(n, value, dtype) if n <= 4096 else _new_full(n, value, dtype)


def _new_full(n: int, value: int, dtype: pl.DataType) -> pl.Series:
    return pl.Series(np.full(n, value, dtype=np.int64)).cast(dtype)


_full_short = lru_cache(maxsize=64)(_new_full)


def zeros(n: int) -> Parts:
    return Parts(_full(n, 0, D28), _full(n, 0, pl.Int32))


def _pow(table: pl.Series, offset: int, j: pl.Series, lo: int, hi: int) -> pl.Series:
    """10^clip(j, lo, hi) from ``table`` (row i holds 10^(i − offset)). A null ``j``
    gives some power: the operand it scales is null there too."""
    at = j.to_numpy()
    if at.dtype.kind == "f":  # nulls come back as NaN
        at = np.nan_to_num(at, nan=0.0)
    # np.clip and a NumPy index cost ~2x this in their argument checks
    return table[pl.Series((np.minimum(np.maximum(at, lo), hi) + offset).astype(np.uint32))]


def _pow28(j: pl.Series, lo: int = -28, hi: int = 9) -> pl.Series:
    return _pow(_POW_D28, 28, j, lo, hi)


def _zero_for(x: pl.Series) -> pl.Series:
    return _ONE["0"] if x.dtype == D28 else _DEC_ONE["0"]


def _abs(x: pl.Series) -> pl.Series:
    zero = _zero_for(x)
    return _where(x < zero, zero - x, x)


def _magnitude(a: pl.Series, table: pl.Series, offset: int, top: int) -> pl.Series:
    """floor(log10 a) + 1 of ``a`` ≥ 0 (integer digits; ≤ 0 below 0.1; 0 for zero), Int32:
    a float guess, corrected exactly against the powers of ten (it is off by one at most)."""
    f = a.cast(pl.Float64).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        guess = np.floor(np.log10(np.where(f == 0, 1.0, f))) + 1
    m0 = pl.Series(guess, nan_to_null=True).cast(pl.Int32)
    lo = -offset
    up = (m0 <= top) & (a >= _pow(table, offset, m0, lo, top))
    down = a < _pow(table, offset, m0 - 1, lo, top)
    return _where(a == _zero_for(a), _full(a.len(), 0, pl.Int32), _where(up, m0 + 1, _where(down, m0 - 1, m0))).cast(pl.Int32)


def _pack(z: pl.Series, k: pl.Series) -> Parts:
    """Zero is {0, 0}."""
    return Parts(z, _where(z == _ONE["0"], _full(z.len(), 0, pl.Int32), k.cast(pl.Int32)))


def _normalise(x: pl.Series, k_offset: pl.Series | int = 0) -> Parts:
    """D28 ``x`` (|x| < 1e10) rounded to 28 significant digits, ``k_offset`` added to the
    exponent. Scaling by 10^-m into [0.1, 1) leaves exactly 28 significant digits at scale
    28, so the one half-even rounding of that product *is* the 28-digit rounding."""
    m = _magnitude(_abs(x), _POW_D28, 28, 9)
    shift = _full(x.len(), 0, pl.Int32) - m
    # up to 10^27 (|x| can be as small as 1e-28, the unit of scale 28) in exact steps of
    # at most 10^9: a nine-digit step keeps every digit of a value at scale 28
    z = x * _pow28(shift, hi=9) * _pow28(shift - 9, 0, 9) * _pow28(shift - 18, 0, 9)
    # rounding can carry into the next power of ten (0.99…95 → 1.00…0)
    carry = _abs(z) >= _ONE["1"]
    return _pack(_where(carry, z * _ONE["0.1"], z), _where(carry, m + 1, m) + k_offset)


def from_dec_parts(x: pl.Series) -> Parts:
    """DEC (or D28) values up to 1e18 → F28."""
    xd = x.cast(DEC)
    small = _abs(xd) < _DEC_ONE["1e9"]
    exact = x if x.dtype == D28 else xd
    small_f = _normalise(_where(small, exact, exact - exact).cast(D28))
    if x.null_count() == 0 and small.all():
        return small_f
    # a D28 value (below 1e10) is rounded at its 18th decimal from its own digits: cast to
    # DEC first it would be rounded twice, at the 20th and then the 18th (…1|4999… → …2)
    big = _where(small, _full(x.len(), 1, DEC), x.round(18).cast(DEC) if x.dtype == D28 else xd)
    n = _magnitude(_abs(big), _POW_DEC, 20, 17)
    # above 1e9 a DEC keeps 20 decimals: round to 28 significant digits at the value's scale
    rounded = _where(n <= 10, big.round(18), big)
    for j in np.unique(n.drop_nulls().to_numpy()):
        if 11 <= j <= 18:
            rounded = _where(n == int(j), big.round(28 - int(j)), rounded)
    scaled = (rounded * _pow(_POW_DEC, 20, _full(x.len(), 9, pl.Int32) - n, -20, 17)).cast(D28)
    return where(small, small_f, _pack(scaled * _ONE["1e-9"], n))


def mul_parts(a: Parts, b: Parts) -> Parts:
    """a × b. The product of two mantissas lies in [0.01, 1): at or above 0.1 it has 28
    significant digits at scale 28, below it the mantissa product ×10 has. Which case
    holds is decided on the ×10 product, whose rounding cannot cross 1 unless the exact
    product rounds to 0.1 anyway; the rounded product itself can cross 0.1 (0.0…9997 → 0.1)."""
    s = (a.z * _ONE["10"]) * b.z
    k = a.k + b.k
    big = _abs(s) >= _ONE["1"]
    return _pack(_where(big, a.z * b.z, s), _where(big, k, k - 1))


def div_parts(a: Parts, b: Parts) -> Parts:
    """a / b; where b is zero the parts are meaningless (``div`` makes those rows null)."""
    sb = _where(b.z == _ONE["0"], _full(b.z.len(), 1, D28), b.z)
    k = a.k - b.k
    direct = _abs(a.z) < _abs(sb)
    return _pack(_where(direct, a.z / sb, a.z / (sb * _ONE["10"])), _where(direct, k, k + 1))


def neg_parts(a: Parts) -> Parts:
    return _pack(_ONE["0"] - a.z, a.k)


def add_parts(a: Parts, b: Parts) -> Parts:
    """a + b, rounded once. The larger operand's mantissa is scaled by 10^9, the smaller's
    by 10^(9 − d) for the exponent gap d: exact up to d = 9. Beyond, the smaller one's digits
    past scale 28 are cut and its last kept digit made odd where any was cut (rounding to
    odd): with the nine guard digits that leaves, the one 28-digit rounding of the sum
    sees the same side of a tie as the exact sum would (1 + 5.0…01E-28 rounds up)."""
    a_big = (a.k >= b.k) | (b.z == _ONE["0"])
    big, small = where(a_big, a, b), where(a_big, b, a)
    gap = big.k - small.k
    near = gap <= 9
    shifted = small.z * _pow28(_full(a.z.len(), 9, pl.Int32) - gap, 0, 9)
    if not near.all():
        shifted = _where(near, shifted, _from_mantissa(_to_odd(small.z.to_physical(), (gap - 9).clip(0, 29))))
    summed = _normalise(big.z * _ONE["1e9"] + shifted, big.k - 9)
    return where(a.z == _ONE["0"], b, where(b.z == _ONE["0"], a, summed))


def _to_odd(m: pl.Series, digits: pl.Series) -> pl.Series:
    """Int128 ``m`` with its last ``digits`` (0-29) digits cut, towards zero, and the last
    digit kept made odd where a cut digit was not 0."""
    negative = m < _I128_0
    size = _where(negative, _I128_0 - m, m)
    unit = _POW_I128.gather(digits)
    whole = size // unit
    inexact = (size != whole * unit) & (whole - (whole // _I128_2) * _I128_2 == _I128_0)
    odd = whole + inexact.cast(pl.Int128)
    return _where(negative, _I128_0 - odd, odd)


def sub_parts(a: Parts, b: Parts) -> Parts:
    return add_parts(a, neg_parts(b))


def group_sums(df: pl.DataFrame, group: str, value: str, out: str) -> pl.DataFrame:
    """(``group``, ``out``): each group's F28 ``value`` summed as Python's ``sum`` sums it,
    left to right in row order with every addition rounded to 28 digits (not the exact
    sum, which can differ in the last digit); a null value makes its group's sum null.
    Sorted by ``group``.

    While a running sum stays inside one decade, every addition rounds to the same grid
    (the unit of the sum's 28th digit), and rounding sum + v to that grid is the sum plus v
    rounded to it, unless v sits exactly half a unit between two grid points (half-even then
    looks at the sum). So each pass adds a group's following values as an exact integer
    cumulative sum of grid units, up to the first row where that does not hold — the sum
    would leave its decade, or is 0, or the value ties — and adds that row on its own with
    ``add_parts``. Passes follow the decade changes of the sums, not their row counts (a
    500-row group: about ten, against 500 steps of one row each)."""
    keys = df.get_column(group)
    groups = keys.unique().sort()
    values = parts(df, value)
    rows = pl.DataFrame([
        (keys.rank("dense") - 1).cast(pl.UInt32).alias("g"), values.z.to_physical().alias("m"), values.k.alias("k"),
    ]).sort("g", maintain_order=True)
    null_groups = rows.filter(pl.col("m").is_null())["g"].unique()
    rows = rows.filter(pl.col("m").is_not_null())
    # each group's sum as an integer mantissa (sum = mantissa × 10^(k − 28), |mantissa| in [1e27, 1e28) or 0),
    # from its first value: 0 + v is v, already 28 digits
    acc_m, acc_k = pl.zeros(groups.len(), pl.Int128, eager=True), pl.zeros(groups.len(), pl.Int32, eager=True)
    first = _group_starts(rows.get_column("g"))
    starts = rows.filter(first)
    acc_m.scatter(starts.get_column("g"), starts.get_column("m"))
    acc_k.scatter(starts.get_column("g"), starts.get_column("k"))
    rows = rows.filter(~first)
    while rows.height:
        g, m, k = rows.get_column("g"), rows.get_column("m"), rows.get_column("k")
        sum_m = acc_m.gather(g)
        first = _group_starts(g)
        # the value in grid units of its group's sum: m × 10^(k − K), rounded half-even
        shift = k - acc_k.gather(g)
        unit = _POW_I128.gather((-shift).clip(0, 29))
        negative = m < _I128_0
        size = _where(negative, _I128_0 - m, m)
        whole = size // unit
        rest = size - whole * unit
        twice_rest = rest + rest
        rounded = whole + (twice_rest > unit).cast(pl.Int128)
        steps = _where(negative, _I128_0 - rounded, rounded)
        candidate = sum_m + _group_cum_sum(steps, first)
        size = _where(candidate < _I128_0, _I128_0 - candidate, candidate)
        holds = (
            (sum_m != _I128_0) & ((shift <= 0) | (m == _I128_0)) & (twice_rest != unit)
            & (size > _MANTISSA_LOW) & (size < _MANTISSA_HIGH)  # inside the decade by a unit: so is the exact sum
        )
        fails = _group_cum_sum((~holds).cast(pl.UInt32), first)
        taken = fails == 0
        last_taken = taken & (first.shift(-1, fill_value=True) | ~taken.shift(-1, fill_value=False))
        acc_m.scatter(g.filter(last_taken), candidate.filter(last_taken))
        alone = (fails == 1) & ~holds  # each group's first row the pass cannot take
        if alone.any():
            at = g.filter(alone)
            summed = add_parts(Parts(_from_mantissa(acc_m.gather(at)), acc_k.gather(at)), Parts(_from_mantissa(m.filter(alone)), k.filter(alone)))
            acc_m.scatter(at, summed.z.to_physical())
            acc_k.scatter(at, summed.k)
        rows = rows.filter((fails > 0) & ~alone)
    sums = Parts(_from_mantissa(acc_m), acc_k)
    null = pl.int_range(groups.len(), dtype=pl.UInt32, eager=True).is_in(null_groups.implode()) if null_groups.len() else None
    return _put(pl.DataFrame([groups]), out, sums, null=null)


_POW_I128 = pl.Series("pow", [10**j for j in range(30)], dtype=pl.Int128)
_I128_0, _I128_2 = pl.Series([0], dtype=pl.Int128), pl.Series([2], dtype=pl.Int128)
_MANTISSA_LOW, _MANTISSA_HIGH = pl.Series([10**27], dtype=pl.Int128), pl.Series([10**28], dtype=pl.Int128)
_D28_UNIT = pl.Series([Decimal("1e-28")], dtype=D28)


def sums_by(df: pl.DataFrame, keys: list[str], value: str, out: str) -> pl.DataFrame:
    """(*``keys``, ``out``): ``group_sums`` of the F28 ``value`` per combination of
    ``keys``, each group summed in ``df``'s row order (sort it first to fix that order)."""
    keyed = df.with_columns(pl.struct(keys).rank("dense").alias("_key"))  # text joined by a separator could collide
    return group_sums(keyed, "_key", value, out).join(keyed.select("_key", *keys).unique("_key"), on="_key").select(*keys, out)


def _from_mantissa(m: pl.Series) -> pl.Series:
    """Int128 mantissas (|m| < 1e28) → the D28 values m × 10^-28 (exact)."""
    return m.cast(pl.Decimal(38, 0)) * _D28_UNIT


def _group_starts(g: pl.Series) -> pl.Series:
    """Whether each row of group-sorted keys ``g`` is its group's first."""
    return (g != g.shift(1)).fill_null(True)


def _group_cum_sum(x: pl.Series, first: pl.Series) -> pl.Series:
    """Running sum of ``x`` inside each group of consecutive rows (``first`` marks a group's
    first row): one cumulative sum less its value before the group."""
    total = x.cum_sum()
    return total - pl.select(pl.when(first).then(total - x).forward_fill()).to_series()


def parts(df: pl.DataFrame, name: str) -> Parts:
    """The F28 column ``name`` of ``df`` as its parts (a null value has null parts)."""
    fields = df.get_column(name).struct.unnest()
    return Parts(fields.get_column("z"), fields.get_column("k"))


def struct(name: str, value: Parts) -> pl.Series:
    return pl.DataFrame([value.z.alias("z"), value.k.cast(pl.Int32).alias("k")]).to_struct(name)


def _put(df: pl.DataFrame, out: str, value: Parts, null: pl.Series | None = None) -> pl.DataFrame:
    column = struct(out, value)
    if null is not None and null.any():
        column = pl.select(pl.when(null).then(None).otherwise(column).alias(out)).to_series()
    if out in df.columns:
        df = df.clone()
        df.replace_column(df.get_column_index(out), column)
        return df
    return df.hstack([column])


def scatter(df: pl.DataFrame, name: str, rows: pl.Series, values: pl.Series) -> pl.DataFrame:
    """``df`` with F28 column ``name`` set to ``values`` (an F28 Series, one per position of
    ``rows``) at those positions, the rest as it was (Polars cannot scatter into a struct)."""
    whole = parts(df, name)
    given = values.struct.unnest()
    placed = Parts(whole.z.clone().scatter(rows, given.get_column("z")), whole.k.clone().scatter(rows, given.get_column("k")))
    return df.with_columns(struct(name, placed))


def from_dec(df: pl.DataFrame, src: str, out: str) -> pl.DataFrame:
    """DEC (or D28) column → F28 column (values up to 1e18)."""
    return _put(df, out, from_dec_parts(df.get_column(src)))


def mul(df: pl.DataFrame, a: str, b: str, out: str) -> pl.DataFrame:
    return _put(df, out, mul_parts(parts(df, a), parts(df, b)))


def div(df: pl.DataFrame, a: str, b: str, out: str) -> pl.DataFrame:
    """a / b; null where b is zero."""
    pb = parts(df, b)
    return _put(df, out, div_parts(parts(df, a), pb), null=pb.z == _ONE["0"])


def add(df: pl.DataFrame, a: str, b: str, out: str) -> pl.DataFrame:
    return _put(df, out, add_parts(parts(df, a), parts(df, b)))


def sub(df: pl.DataFrame, a: str, b: str, out: str) -> pl.DataFrame:
    return _put(df, out, sub_parts(parts(df, a), parts(df, b)))


def is_null(name: str) -> pl.Expr:
    """A null F28 value, read from its exponent. Polars 2.1's left join against a struct
    column held in several chunks gives an unmatched row null fields under a struct that
    is not itself null, so the struct's own ``is_null``, ``fill_null`` and ``coalesce``
    miss it; every null test of an F28 column goes through here."""
    return _k(name).is_null()


def fill_null(name: str, value: pl.Expr) -> pl.Expr:
    """``name`` with its null values (``is_null``) replaced by ``value``, named ``name``."""
    return pl.when(is_null(name)).then(value).otherwise(pl.col(name)).alias(name)


def coalesce(first: str, second: str) -> pl.Expr:
    """``first`` where it has a value (``is_null``), else ``second``, named ``first``."""
    return pl.when(is_null(first)).then(pl.col(second)).otherwise(pl.col(first)).alias(first)


def below_a_tenth(name: str) -> pl.Expr:
    """|value| < 0.1: where its 28 significant digits run past D28's 28 decimals."""
    return _k(name) < 0


def sign(name: str) -> pl.Expr:
    z = _z(name)
    return pl.when(z > 0).then(1).when(z < 0).then(-1).otherwise(0)


def to_dec(name: str) -> pl.Expr:
    """F28 → DEC (rounded at 20 decimals)."""
    z, k = _z(name), _k(name)
    low = (z * _pow_d28(pl.when(k <= 9).then(k).otherwise(0))).cast(DEC)
    # above 1e9: shift by 1e9 while still in D28 (exact, 19 decimals left), then by k − 9 in DEC
    high = (z * _D28_1E9).cast(DEC) * _pow_dec(pl.when(k > 9).then(k - 9).otherwise(0))
    return pl.when(k <= 9).then(low).otherwise(high)


def exponent(name: str) -> pl.Expr:
    """k, with |x| < 10^k: a bound on a value's magnitude that reads no digits."""
    return _k(name)


def to_f64(name: str) -> pl.Expr:
    """F28 → Float64: an estimate of a value ``to_dec`` cannot hold."""
    return _z(name).cast(pl.Float64) * pl.lit(10.0).pow(_k(name).cast(pl.Float64))


def _round_28_decimals(name: str, decimals: int) -> pl.Expr:
    """F28 → DEC rounded half-even at ``decimals`` places from the value's first 28
    decimals: all its digits from 0.1 up (below 1e9 every digit fits D28; from 1e9 up at
    most 19 decimals remain, which DEC holds exactly), not below (``rounded``)."""
    z, k = _z(name), _k(name)
    # both branches are computed for every row: the D28 one with k clipped to fit
    low = (z * _pow_d28(k.clip(upper_bound=9))).round(decimals).cast(DEC)
    return pl.when(k <= 9).then(low).otherwise(to_dec(name).round(decimals))


def rounded(df: pl.DataFrame, name: str, decimals: int, out: str) -> pl.DataFrame:
    """``df`` with DEC column ``out``: F28 ``name`` rounded half-even at ``decimals`` (≤ 18)
    places from all its 28 significant digits, as the reference quantizes. ``to_dec`` first
    would round twice (x.xx4999… to x.xx5 at 20 decimals, then up). Below 0.1 the 28 digits
    run past D28's 28 decimals (0.005000000000000000000000000001 is 30 long, and read at 28
    it is the tie 0.005, which half-even takes down to 0.00): there the side of the tie is
    the sign of the exact difference."""
    if not 0 <= decimals <= 18:
        raise ValueError(f"rounded: decimals must be 0-18, not {decimals}")
    unit = Decimal(1).scaleb(-decimals)
    small = below_a_tenth(name)  # so value × 10^decimals stays inside DEC
    scaled = pl.when(small).then(to_dec(name)).otherwise(_DEC_0) * pl.lit(Decimal(10) ** decimals, dtype=DEC)
    below = scaled.floor() / pl.lit(Decimal(10) ** decimals, dtype=DEC)
    work = df.select(
        pl.col(name), small.fill_null(False).alias("_small"), below.alias("_below"),
        (below + pl.lit(unit / 2, dtype=DEC)).alias("_tie"), _round_28_decimals(name, decimals).alias("_at_28"),
    )
    work = sub(from_dec(work, "_tie", "_tie_f"), name, "_tie_f", "_side_f")
    side = sign("_side_f")
    result = (
        pl.when(pl.col("_small") & (side > 0)).then(pl.col("_below") + pl.lit(unit, dtype=DEC))
        .when(pl.col("_small") & (side < 0)).then(pl.col("_below"))
        .otherwise(pl.col("_at_28"))  # 0.1 and up, or exactly the tie (D28 holds it): half-even there
    )
    return df.with_columns(work.select(result.alias(out)).to_series())


def negate(name: str) -> pl.Expr:
    z = _z(name)
    return pl.struct((_D28_0 - z).alias("z"), _k(name).alias("k"))


def absolute(name: str) -> pl.Expr:
    return pl.struct(_z(name).abs().alias("z"), _k(name).alias("k"))


def floor(name: str) -> pl.Expr:
    """floor(x) of a non-negative F28 as a DEC integer (exact up to 1e18)."""
    z, k = _z(name), _k(name)
    low = (z * _pow_d28(k.clip(0, 9))).floor().cast(DEC)
    high = ((z * _D28_1E9).cast(DEC) * _pow_dec((k - 9).clip(0, 9))).floor()
    return pl.when(k <= 0).then(_DEC_0).when(k <= 9).then(low).otherwise(high)


def to_d28(name: str) -> pl.Expr:
    """F28 → D28 (quantities; |x| < 1e10)."""
    k = _k(name)
    return _z(name) * _pow_d28(k.clip(upper_bound=9)) * _pow_d28((k - 9).clip(lower_bound=0))
