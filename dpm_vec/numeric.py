"""Fixed-point arithmetic conventions shared by every stage.

The reference service computes in 28-significant-digit half-even decimals. dpm_vec keeps
every amount, quantity, price, rate and weight in one fixed-point type, ``DEC`` =
Decimal(38, 20): Polars rounds each product and quotient half-even at scale 20, so a
chain like ``0.3 * (0.2 / 0.3)`` lands back on exactly ``0.2`` (spec §1.1), and values up
to 10^18 fit. Integer quantities are floored exactly.
"""

from __future__ import annotations

from decimal import Decimal

import polars as pl

SCALE = 20
DEC = pl.Decimal(38, SCALE)
# quantities: 28 decimals so that tax-limited fractional quantities keep every digit the
# reference prints (see dpm_vec.dec28); holds up to 10^10 units
QTY = pl.Decimal(38, 28)
# weights in the target stage: 28 decimals, which is the reference's own precision for
# weights in [0.1, 1), so redistributions like 0.2571…+0.2428… land where the reference's do
WEIGHT = pl.Decimal(38, 28)
# one unit of DEC's last place: a 28-decimal figure held in DEC is off by up to half of it
DEC_UNIT = "0.00000000000000000001"
# a share of a figure within which its fixed-point value and the reference's 28 digits may
# fall on different sides of a limit (an inverse quote's 20-decimal rate is off by up to
# ~1e-17 of itself): decisions that close are made again in 28 digits (dpm_vec.dec28)
HAIR = "0.000000000001"


def lit(value: str | int | Decimal) -> pl.Expr:
    """A DEC literal; strings keep their exact decimal value."""
    return pl.lit(Decimal(str(value)), dtype=DEC)


def dmax(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.when(a >= b).then(a).otherwise(b)


def dmin(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.when(a <= b).then(a).otherwise(b)


def dabs(a: pl.Expr) -> pl.Expr:
    return pl.when(a < 0).then(-a).otherwise(a)


def to_text(value: Decimal | None) -> str | None:
    """Canonical decimal text for JSON: no exponent, no trailing zeros."""
    if value is None:
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")
