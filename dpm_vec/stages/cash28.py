"""Cash movements in the reference's 28-digit arithmetic, for runs with a tax-limited sell
or an FX intent over an inexact rate.

A tax-limited sell's quantity, and so its notional, has 28 significant digits. The reference adds
that notional to the projected balance a SWEEP sells whole or a FUNDING buys back (§6.13),
and again, in other orders, to the settlement ladder (§6.15) and the after-state cash
(§6.16), each addition rounded to 28 digits; the sums can then differ by a unit of the 28th
digit (-1E-23 where fixed-point arithmetic cancels to exactly 0), and the sign decides a
ladder breach, INSUFFICIENT_CASH or whether a dust balance is swept. FX planning reads the
projected balances' signs; the ladder and the after-state redo their sums over these flows.
An FX intent's base amount is its foreign amount times the rate, which the reference holds
with 28 significant digits (an inverse quote's 1 / 1.3 or 1 / 150) where the fixed point
keeps 20 decimals: a base balance the reference leaves at exactly 0 (or at an overdraft
floor) can then be off by 1E-17, enough to fail INSUFFICIENT_CASH or breach the floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from dpm_vec import dec28 as f28
from dpm_vec.frames import only_runs, rows_where
from dpm_vec.numeric import DEC, HAIR, lit
from dpm_vec.stages.prepare import Market

# a balance this close to 0 (or to an overdraft floor) may have the other sign in the reference's 28-digit sums
DUST = "0.000000000000001"


@dataclass(frozen=True)
class ExactFlows:
    security: pl.DataFrame  # the given security intents, with _flow_f: +notional for a SELL, -notional for a BUY
    fx: pl.DataFrame  # the runs' FX intents, with _sell_f and _buy_f (sell and buy amounts)
    cash: pl.DataFrame  # the runs' input cash rows


def cash_amounts_f28(cash: pl.DataFrame, out: str, settled: bool = False) -> pl.DataFrame:
    """``cash`` with ``out``: each row's amount in F28, from the digits past DEC's 20 that
    the input had (``amount_exact``, a fed-back balance) where it had them; with
    ``settled``, the settled figure where one is given (the ladder's day 0, §6.15)."""
    source = pl.coalesce("settled", "amount") if settled else pl.col("amount")
    cash = f28.from_dec(cash.with_columns(source.alias("_amount")), "_amount", out).drop("_amount")
    if "amount_exact" not in cash.columns:
        return cash
    exact = pl.col("amount_exact").is_not_null() & (pl.col("settled").is_null() if settled else pl.lit(True))
    if not cash.select(exact.any()).item():
        return cash
    rows = cash.select(pl.arg_where(exact)).to_series()
    given = f28.from_dec(cash[rows].select("amount_exact"), "amount_exact", "_f")
    return f28.scatter(cash, out, rows, given.get_column("_f"))


def long_cash(cash: pl.DataFrame) -> pl.DataFrame:
    """(run, currency) of the input cash balances with digits past DEC's 20 decimals
    (``amount_exact``, a result's balance fed back): a sum over one can sit a few units of
    the 28th digit from where its fixed-point sum is (575.46888393286039271620497 CHF plus
    a sale, less the SWEEP of both: -3E-23 in the reference, 0 here)."""
    if "amount_exact" not in cash.columns:
        return cash.select("run", "currency").clear()
    return cash.filter(pl.col("amount_exact").is_not_null()).select("run", "currency").unique()


def long_digit_runs(intents: pl.DataFrame, cash: pl.DataFrame) -> pl.DataFrame:
    """(run) of the runs whose cash sums have digits past DEC's 20 decimals: a tax-limited
    sell (a security intent with a 28-digit quantity) or an input balance with them
    (``long_cash``). A balance of such a run within dust of 0 is decided in 28 digits."""
    limited = intents.filter(~f28.is_null("quantity_f28")).select("run")
    return pl.concat([limited, long_cash(cash).select("run")]).unique()


# the decimals a fixed-point term is tested for, coarsest first; a term with digits past 16 has 20
_DECIMALS = (0, 2, 4, 8, 12, 16)
# a balance farther than this from 0 (or from a floor) is beyond any wide sum's rounding:
# n additions of terms under 1E+17 (the contract's bound) move a sum by n² × 1E-10 at most
WIDE_REACH = "0.01"
# the share of a bound that a Float64 sum must reach to be taken as at it: 0.1% kept in hand
# for the float sums that test the bounds, so a sum at a bound is taken as wide
_IN_HAND = 0.999
# no sum below this is wide, whatever its decimals (28 digits ending at DEC's 20th decimal)
_WIDE_FLOOR = _IN_HAND * 10.0 ** (28 - 20)


# the intents' columns wide_sums reads (the FX ones where ``intents`` holds them)
WIDE_INTENT_TERMS = ("run", "intent_type", "notional_currency", "notional", "sell_currency", "sell_amount_estimated",
                     "buy_currency", "buy_amount")


def wide_sums(cash: pl.DataFrame, intents: pl.DataFrame) -> pl.DataFrame:
    """(run, currency, _wide_margin) of the cash sums that may need more than 28
    significant digits at some addition, so that the reference's sum (each addition
    rounded to 28 digits, §1.1) can differ from the fixed point's exact one: those whose
    terms add up, in magnitude (S), to at least 10^(28 − d), d being the most decimals any
    term has. Cash of -1E-16 and a sale and a purchase of 1E+13: the reference's first
    addition is 1E+13, its balance 0, where the exact one is -1E-16. ``_wide_margin``
    (Float64) bounds the difference: each of the n additions rounds by at most half a unit
    of the 28th digit of S, so n × S × 1E-27. The terms: the input balances (and their
    ``settled`` figures, the ladder's day 0), the security intents' notionals
    (``notional_currency``) and, where ``intents`` holds them, the FX intents' sell and buy
    amounts. Below that bound every partial sum is exact in both."""
    terms = [cash.select("run", "currency", pl.col(c).alias("_term")) for c in ("amount", "settled") if c in cash.columns]
    fx = "intent_type" in intents.columns
    security = rows_where(intents, pl.col("intent_type") == "SECURITY_TRADE", "run", "notional_currency", "notional") if fx else intents
    terms.append(security.select("run", pl.col("notional_currency").alias("currency"), pl.col("notional").alias("_term")))
    if fx:
        trades = rows_where(intents, pl.col("intent_type") == "FX_SPOT", "run", "sell_currency", "sell_amount_estimated", "buy_currency", "buy_amount")
        terms += [trades.select("run", pl.col("sell_currency").alias("currency"), pl.col("sell_amount_estimated").alias("_term")),
                  trades.select("run", pl.col("buy_currency").alias("currency"), pl.col("buy_amount").alias("_term"))]
    terms = pl.concat([t.with_columns(pl.col("_term").cast(DEC)) for t in terms]).drop_nulls("_term")
    # |term| in Float64 from DEC's integer mantissa (a Decimal's own cast to Float64 is ten times slower)
    magnitude = pl.col("_term").to_physical().abs().cast(pl.Float64) * 10.0 ** -DEC.scale
    # a run's sum over all its currencies bounds each of its sums: a group-by on the run alone is
    # the cheaper one, and most runs end there
    large = terms.group_by("run").agg(magnitude.sum().alias("_magnitude")).filter(pl.col("_magnitude") >= _WIDE_FLOOR)
    terms = terms.filter(pl.col("run").is_in(large.get_column("run").implode()))
    sums = terms.group_by("run", "currency").agg(magnitude.sum().alias("_magnitude"), pl.len().alias("_terms"))
    sums = sums.filter(pl.col("_magnitude") >= _WIDE_FLOOR)
    if sums.height == 0:
        return sums.select("run", "currency", pl.lit(0.0).alias("_wide_margin"))
    decimals = pl.lit(20)
    for k in reversed(_DECIMALS):
        decimals = pl.when(pl.col("_term") == pl.col("_term").round(k)).then(pl.lit(k)).otherwise(decimals)
    sums = sums.join(terms.join(sums, on=["run", "currency"], how="semi").group_by("run", "currency").agg(decimals.max().alias("_decimals")),
                     on=["run", "currency"])
    return sums.filter(pl.col("_magnitude") >= _IN_HAND * pl.lit(10.0).pow(28 - pl.col("_decimals"))).select(
        "run", "currency", (pl.col("_terms") * pl.col("_magnitude") * 1e-27).alias("_wide_margin"),
    )


def wide_at_edge(balances: pl.DataFrame, cash: pl.DataFrame, intents: pl.DataFrame, *columns: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(run, currency) of ``balances`` whose sum is wide (``wide_sums`` over the ``cash``
    and ``intents`` of their runs) and one of whose ``columns`` lies within its margin of
    0: there the sign is the reference's 28-digit sum's. Also the wide sums themselves
    (run, currency, _wide_margin) of the runs with a balance within ``WIDE_REACH``."""
    reach = balances.filter(pl.any_horizontal(pl.col(c).abs() < lit(WIDE_REACH) for c in columns))
    runs = reach.select("run").unique()
    # only the columns wide_sums reads: a filter copies every column it keeps (most of a
    # shard's runs end with a cash balance near 0, so this is most of its intents)
    terms = intents.select(c for c in WIDE_INTENT_TERMS if c in intents.columns)
    wide = wide_sums(only_runs(cash, runs), only_runs(terms, runs))
    near = pl.any_horizontal(pl.col(c).abs().cast(pl.Float64) <= pl.col("_wide_margin") for c in columns)
    return reach.join(wide, on=["run", "currency"], how="inner").filter(near).select("run", "currency").unique(), wide


# an inexact rate is off by at most half a unit of its 20th decimal, ~1e-17 of the smallest
# rates quoted (1e-4 and up): a base amount it converts is off by far less than this share
INEXACT_SHARE = HAIR


def fx_margins(intents: pl.DataFrame) -> pl.DataFrame:
    """(run, _margin): how far from 0 (or from a floor) a base-currency balance can be in
    the fixed point and still be exactly there in the reference: ``DUST`` plus
    ``INEXACT_SHARE`` of the base amounts the run's FX intents move (each converted over a
    rate that may be inexact)."""
    fx = rows_where(intents, pl.col("intent_type") == "FX_SPOT", "run", "sell_currency", "base_currency", "sell_amount_estimated", "buy_amount")
    return fx.group_by("run").agg(
        (lit(DUST) + lit(INEXACT_SHARE) * pl.when(pl.col("sell_currency") == pl.col("base_currency"))
         .then(pl.col("sell_amount_estimated")).otherwise(pl.col("buy_amount")).abs().sum()).alias("_margin")
    )


def _foreign_currency() -> pl.Expr:
    """``currency``: the foreign side of an FX intent (§6.13), bought by a FUNDING, sold by a SWEEP."""
    return pl.when(pl.col("rationale_code") == "FUNDING").then(pl.col("buy_currency")).otherwise(pl.col("sell_currency")).alias("currency")


def inexact_fx_runs(market: Market, intents: pl.DataFrame) -> pl.DataFrame:
    """(run) of the runs with an FX intent whose rate (foreign → base) the fixed point holds
    only rounded, so that its base amount can differ from the reference's in the last
    digits: an inverse quote whose quotient has more than 20 decimals."""
    fx = intents.filter(pl.col("intent_type") == "FX_SPOT").select("run", "base_currency", _foreign_currency())
    if fx.height == 0:
        return fx.select("run")
    fx = market.with_rate(fx, "currency", "base_currency", "_rate")
    fx = f28.from_dec(market.with_rate_f28(fx, "currency", "base_currency", "_rate_f"), "_rate", "_fixed_f")
    fx = f28.sub(fx, "_rate_f", "_fixed_f", "_error_f")
    return fx.filter(~f28.is_null("_error_f") & (f28.sign("_error_f") != 0)).select("run").unique()


def exact_flows(market: Market, runs: pl.DataFrame, intents: pl.DataFrame, sec: pl.DataFrame, cash_input: pl.DataFrame) -> ExactFlows:
    """The cash flows of ``runs`` (run, fx_buffer_pct) in F28: each security intent of
    ``sec`` (``exact_notionals``), and each FX intent's amounts from the projected balance
    it nets (§6.13)."""
    sec = exact_notionals(market, runs, sec)
    cash = cash_input.join(runs.select("run"), on="run", how="semi")
    projected = projected_balances(sec, cash)
    fx = intents.filter(pl.col("intent_type") == "FX_SPOT").join(runs.select("run", "fx_buffer_pct"), on="run", how="inner")
    fx = fx.with_columns(
        _foreign_currency(), (lit(1) + pl.col("fx_buffer_pct")).alias("_one_plus"),
    )
    fx = fx.join(projected, on=["run", "currency"], how="left", maintain_order="left")
    fx = market.with_rate_f28(fx, "currency", "base_currency", "_rate_f")
    fx = f28.from_dec(fx, "_one_plus", "_one_plus_f")
    fx = f28.mul(fx.with_columns(f28.absolute("_balance_f").alias("_abs_f")), "_abs_f", "_one_plus_f", "_funding_buy_f")
    fx = f28.mul(fx, "_funding_buy_f", "_rate_f", "_funding_sell_f")
    fx = f28.mul(fx, "_balance_f", "_rate_f", "_sweep_buy_f")
    funding = pl.col("rationale_code") == "FUNDING"
    fx = fx.with_columns(
        pl.when(funding).then(pl.col("_funding_buy_f")).otherwise(pl.col("_sweep_buy_f")).alias("_buy_f"),
        pl.when(funding).then(pl.col("_funding_sell_f")).otherwise(pl.col("_balance_f")).alias("_sell_f"),
    )
    return ExactFlows(security=sec, fx=fx, cash=cash)


def exact_notionals(market: Market, runs: pl.DataFrame, sec: pl.DataFrame) -> pl.DataFrame:
    """The security intents of ``sec`` (run, instrument_id, side, notional,
    notional_currency, quantity_f28, ...) that belong to ``runs``, with ``_flow_f``:
    +notional for a SELL, -notional for a BUY, the notional being quantity × price in 28
    digits for a tax-limited sell and the fixed-point notional otherwise."""
    columns = sec.columns
    sec = sec.join(runs.select("run"), on="run", how="semi")
    sec = f28.from_dec(market.with_price(sec).with_columns(pl.col("price").fill_null(lit(0))), "price", "_price_f")
    sec = f28.from_dec(sec, "notional", "_fixed_f")
    sec = f28.mul(sec.with_columns(f28.fill_null("quantity_f28", f28.zero()).alias("_q_f")), "_q_f", "_price_f", "_limited_f")
    return sec.with_columns(
        pl.when(~f28.is_null("quantity_f28")).then(pl.col("_limited_f")).otherwise(pl.col("_fixed_f")).alias("_notional_f"),
    ).with_columns(
        pl.when(pl.col("side") == "SELL").then(pl.col("_notional_f")).otherwise(f28.negate("_notional_f")).alias("_flow_f")
    ).select(*columns, "_flow_f")


def projected_balances(sec: pl.DataFrame, cash: pl.DataFrame) -> pl.DataFrame:
    """(run, currency, _balance_f): each currency's projected balance (§6.13) over the cash
    rows and the ``exact_notionals`` of ``sec``: cash first (input order), then the
    notionals in list order, one 28-digit rounding per addition."""
    flows = pl.concat([
        cash_amounts_f28(cash, "_flow_f").select("run", "currency", pl.col("cash_seq").cast(pl.Int64).alias("_seq"), "_flow_f"),
        sec.select("run", pl.col("notional_currency").alias("currency"), (pl.lit(1 << 40) + pl.col("list_order")).alias("_seq"), "_flow_f"),
    ])
    return account_sums(flows, "_balance_f")


def movements(flows: ExactFlows, seq: pl.Expr, settled: bool = False, sec_day: pl.Expr = pl.lit(0),
              fx_day: pl.Expr = pl.lit(0)) -> pl.DataFrame:
    """(run, currency, day, _seq, _flow_f): every cash movement of ``flows`` — each cash row's
    amount (``cash_amounts_f28``; with ``settled``, its settled figure where given) on day 0
    first (input order), then each intent at its ``seq`` on its
    day: a security intent's flow, an FX intent's sell (negative) then, at ``seq`` + 1,
    its buy. The ladder orders intents by id within days, the after-state by execution."""
    return pl.concat([
        cash_amounts_f28(flows.cash, "_flow_f", settled).select(
            "run", "currency", pl.lit(0, dtype=pl.Int32).alias("day"), pl.col("cash_seq").cast(pl.Int64).alias("_seq"), "_flow_f"),
        flows.security.select("run", pl.col("notional_currency").alias("currency"), sec_day.cast(pl.Int32).alias("day"),
                              seq.alias("_seq"), "_flow_f"),
        flows.fx.select("run", pl.col("sell_currency").alias("currency"), fx_day.cast(pl.Int32).alias("day"),
                        seq.alias("_seq"), f28.negate("_sell_f").alias("_flow_f")),
        flows.fx.select("run", pl.col("buy_currency").alias("currency"), fx_day.cast(pl.Int32).alias("day"),
                        (seq + 1).alias("_seq"), pl.col("_buy_f").alias("_flow_f")),
    ])


def account_sums(flows: pl.DataFrame, out: str, *by: str) -> pl.DataFrame:
    """(run, currency, *by, ``out``): the ``_flow_f`` of each (run, currency, *by) summed in
    ``_seq`` order as the reference sums them, one 28-digit rounding per addition
    (``dec28.sums_by``)."""
    accounts = ["run", "currency", *by]
    return f28.sums_by(flows.sort(*accounts, "_seq"), accounts, "_flow_f", out)
