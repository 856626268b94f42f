"""28-significant-digit decimal arithmetic as Polars expressions.

Every operation takes and returns a DataFrame or a LazyFrame (scratch columns are added
and dropped); on a LazyFrame a whole chain of operations becomes one query plan.

The reference computes in Python's default decimal context: every result rounded to 28
significant digits, half-even (spec §1.1). Fixed-point ``DEC`` agrees with it to far below
a cent, which is all money and weights need. Tax-limited sells are different: their
quantities are quotients like ``(budget − used) / gain`` that the reference emits with
all 28 digits, and quantities must agree exactly. For that walk (and the after-state
quantities it feeds) dpm_vec uses this floating decimal: a struct ``{z, k}`` meaning
``z × 10^k`` with ``z`` a Decimal(38, 28) normalised into [0.1, 1) — exactly 28
significant digits — so each product, quotient and sum is rounded once, as the reference
rounds it.
"""

from __future__ import annotations

from decimal import Decimal

import polars as pl

from dpm_vec.numeric import DEC

D28 = pl.Decimal(38, 28)
F28 = pl.Struct({"z": D28, "k": pl.Int32})
# powers of ten as lookup tables, built once: a dict literal costs ~2 ms per use to convert
_POW_D28 = pl.Series("pow", [Decimal(10) ** j for j in range(-28, 10)], dtype=D28)
_POW_DEC = pl.Series("pow", [Decimal(10) ** j for j in range(-20, 18)], dtype=DEC)
_T = "__f28_"  # prefix of scratch columns
# literals built once: each pl.lit of a Decimal builds a Series (~25 µs), and the tax walk
# builds its expressions anew at every step
_POW_D28_LIT, _POW_DEC_LIT = pl.lit(_POW_D28), pl.lit(_POW_DEC)
_D28_0, _D28_1, _D28_10 = pl.lit(0, dtype=D28), pl.lit(1, dtype=D28), pl.lit(10, dtype=D28)
_D28_TENTH, _D28_1E9, _D28_1E_9 = (pl.lit(Decimal(v), dtype=D28) for v in ("0.1", "1e9", "1e-9"))
_DEC_0, _DEC_1, _DEC_1E9 = pl.lit(0, dtype=DEC), pl.lit(1, dtype=DEC), pl.lit(Decimal("1e9"), dtype=DEC)
_I32_0 = pl.lit(0, dtype=pl.Int32)


def _pow_d28(j: pl.Expr) -> pl.Expr:
    return _POW_D28_LIT.gather(j.clip(-28, 9) + 28)


def _pow_dec(j: pl.Expr) -> pl.Expr:
    return _POW_DEC_LIT.gather(j.clip(-20, 17) + 20)


def _with_magnitude(df: pl.DataFrame, src: str, out: str, pow_fn, top: int) -> pl.DataFrame:
    """``out`` = floor(log10|src|) + 1 (integer digits; ≤ 0 below 0.1; 0 for zero)."""
    a = pl.col(src).abs()
    guess = f"{out}_guess"
    df = df.with_columns(
        (pl.when(a == 0).then(1.0).otherwise(a.cast(pl.Float64)).log10().floor().cast(pl.Int32) + 1).alias(guess)
    )
    m0 = pl.col(guess)
    return df.with_columns(
        pl.when(a == 0).then(0)
        .when((m0 <= top) & (a >= pow_fn(m0))).then(m0 + 1)
        .when(a < pow_fn(m0 - 1)).then(m0 - 1)
        .otherwise(m0).cast(pl.Int32).alias(out)
    ).drop(guess)


def zero() -> pl.Expr:
    return pl.struct(_D28_0.alias("z"), _I32_0.alias("k"))


def _pack(z: pl.Expr, k: pl.Expr) -> pl.Expr:
    zero = z == 0
    return pl.struct(
        pl.when(zero).then(_D28_0).otherwise(z).alias("z"),
        pl.when(zero).then(_I32_0).otherwise(k).cast(pl.Int32).alias("k"),
    )


def _normalise(df: pl.DataFrame, src: str, out: str, k_offset: pl.Expr | int = 0) -> pl.DataFrame:
    """D28 column ``src`` (|x| < 1e10) → F28 column ``out`` rounded to 28 significant
    digits, with ``k_offset`` added to the exponent.

    Scaling by 10^-m into [0.1, 1) leaves exactly 28 significant digits at scale 28, so
    the one half-even rounding of that product *is* the 28-digit rounding."""
    m, z = f"{_T}m", f"{_T}z"
    df = _with_magnitude(df, src, m, _pow_d28, 9)
    shift = -pl.col(m)
    # up to 10^27 (|src| can be as small as 1e-28, the unit of scale 28) in exact steps of
    # at most 10^9: a nine-digit step keeps every digit of a value at scale 28
    df = df.with_columns(
        (pl.col(src) * _pow_d28(shift.clip(upper_bound=9)) * _pow_d28((shift - 9).clip(0, 9))
         * _pow_d28((shift - 18).clip(0, 9))).alias(z)
    )
    # rounding can carry into the next power of ten (0.99…95 → 1.00…0)
    carry = pl.col(z).abs() >= _D28_1
    k_off = pl.lit(k_offset) if isinstance(k_offset, int) else k_offset
    return df.with_columns(
        _pack(pl.when(carry).then(pl.col(z) * _D28_TENTH).otherwise(pl.col(z)),
              pl.when(carry).then(pl.col(m) + 1).otherwise(pl.col(m)) + k_off).alias(out)
    ).drop(m, z)


def from_dec(df: pl.DataFrame, src: str, out: str) -> pl.DataFrame:
    """DEC (or D28) column → F28 column (values up to 1e18)."""
    x, small, n, sm, big = f"{_T}x", f"{_T}small", f"{_T}n", f"{_T}sm", f"{_T}big"
    df = df.with_columns(pl.col(src).cast(DEC).alias(x))
    df = df.with_columns((pl.col(x).abs() < _DEC_1E9).alias(small))
    src_dtype = df.collect_schema()[src] if isinstance(df, pl.LazyFrame) else df.schema[src]
    exact, zero = (pl.col(src), _D28_0) if src_dtype == D28 else (pl.col(x), _DEC_0)
    df = df.with_columns(
        pl.when(pl.col(small)).then(exact).otherwise(zero).cast(D28).alias(sm),
        pl.when(pl.col(small)).then(_DEC_1).otherwise(pl.col(x)).alias(big),
    )
    df = _normalise(df, sm, f"{_T}small_f")
    df = _with_magnitude(df, big, n, _pow_dec, 17)
    b, nc = pl.col(big), pl.col(n)
    rounded = pl.when(nc <= 10).then(b.round(18))
    for j in range(11, 19):
        rounded = rounded.when(nc == j).then(b.round(28 - j))
    df = df.with_columns((rounded.otherwise(b) * _pow_dec(9 - nc)).cast(D28).alias(big))
    df = df.with_columns(
        pl.when(pl.col(small)).then(pl.col(f"{_T}small_f"))
        .otherwise(_pack(pl.col(big) * _D28_1E_9, nc)).alias(out)
    )
    return df.drop(x, small, n, sm, big, f"{_T}small_f")


def _z(name: str) -> pl.Expr:
    return pl.col(name).struct.field("z")


def _k(name: str) -> pl.Expr:
    return pl.col(name).struct.field("k")


def mul(df: pl.DataFrame, a: str, b: str, out: str) -> pl.DataFrame:
    """a × b. The product of two mantissas lies in [0.01, 1): at or above 0.1 it has 28
    significant digits at scale 28, below it the mantissa product ×10 has. Which case
    holds is decided on the ×10 product, whose rounding cannot cross 1 unless the exact
    product rounds to 0.1 anyway; the rounded product itself can cross 0.1 (0.0…9997 → 0.1)."""
    s = f"{_T}s"
    df = df.with_columns(((_z(a) * _D28_10) * _z(b)).alias(s))
    k = _k(a) + _k(b)
    return df.with_columns(
        pl.when(pl.col(s).abs() >= _D28_1).then(_pack(_z(a) * _z(b), k))
        .otherwise(_pack(pl.col(s), k - 1)).alias(out)
    ).drop(s)


def div(df: pl.DataFrame, a: str, b: str, out: str) -> pl.DataFrame:
    """a / b; null where b is zero."""
    sb = f"{_T}sb"
    df = df.with_columns(pl.when(_z(b) == 0).then(_D28_1).otherwise(_z(b)).alias(sb))
    k = _k(a) - _k(b)
    direct = _pack(_z(a) / pl.col(sb), k)
    shifted = _pack(_z(a) / (pl.col(sb) * _D28_10), k + 1)
    return df.with_columns(
        pl.when(_z(b) == 0).then(None)
        .when(_z(a).abs() < pl.col(sb).abs()).then(direct)
        .otherwise(shifted).alias(out)
    ).drop(sb)


def neg(df: pl.DataFrame, a: str, out: str) -> pl.DataFrame:
    return df.with_columns(_pack(-_z(a), _k(a)).alias(out))


def add(df: pl.DataFrame, a: str, b: str, out: str) -> pl.DataFrame:
    big, small, s = f"{_T}big", f"{_T}small", f"{_T}s"
    a_big = (_k(a) >= _k(b)) | (_z(b) == 0)
    df = df.with_columns(
        pl.when(a_big).then(pl.col(a)).otherwise(pl.col(b)).alias(big),
        pl.when(a_big).then(pl.col(b)).otherwise(pl.col(a)).alias(small),
    )
    d = (_k(big) - _k(small)).clip(0, 40)
    df = df.with_columns((_z(big) * _D28_1E9 + _z(small) * _pow_d28(9 - d)).alias(s))
    df = _normalise(df, s, f"{_T}sum", _k(big) - 9)
    return df.with_columns(
        pl.when(_z(a) == 0).then(pl.col(b)).when(_z(b) == 0).then(pl.col(a)).otherwise(pl.col(f"{_T}sum")).alias(out)
    ).drop(big, small, s, f"{_T}sum")


def sub(df: pl.DataFrame, a: str, b: str, out: str) -> pl.DataFrame:
    nb = f"{_T}nb"
    return add(neg(df, b, nb), a, nb, out).drop(nb)


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


def absolute(name: str) -> pl.Expr:
    return _pack(_z(name).abs(), _k(name))


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
