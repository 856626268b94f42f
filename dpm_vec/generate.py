"""Deterministic synthetic books that look like a private bank's DPM book.

``generate_book_frames(n, seed)`` returns raw frames keyed by table name (see
``dpm_vec.book.TABLES``). Everything is vectorised in Polars: every random draw is a
counter-based hash (splitmix64) of ``(seed, stream, portfolio index, slot...)``, so a
portfolio's content depends only on the seed and its own index. Generating portfolios
[0, 1000) in one call therefore equals generating [0, 500) and [500, 1000) and
concatenating the per-portfolio tables; the shared tables (prices, fx_rates, shelf,
shelf_attributes, models) depend on the seed alone.

The market ("md"), the shelf ("default") and the models are small and built once per
seed in plain Python (cached); portfolios, positions, cash, lots, group constraints and
overdraft limits are built with Polars expressions over the whole block at once.

``bad_data=True`` puts one per-portfolio data fault into about 1% of portfolios: a holding
of an instrument without a price row (ids ``NP...``), a foreign cash balance in a currency
without any FX rate (AUD or NOK), or a model with an unshelved target
(``M_BAD_UNSHELVED``, whose extra target ``UN...`` is priced but not on the shelf). The
frames stay structurally valid.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
import zlib
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import polars as pl

from dpm_vec.book import POLICY_COLUMNS, TABLES, empty_table
from dpm_vec.errors import DpmVecError
from dpm_vec.numeric import DEC, WEIGHT

# ---------------------------------------------------------------------------------------
# counter-based randomness (splitmix64), identical in Python and in Polars expressions

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_U64 = pl.UInt64


def _mix_py(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _stream_key(seed: int, stream: str) -> int:
    return _mix_py(_mix_py(seed * _GOLDEN + 1) ^ zlib.crc32(stream.encode()))


def _hash_py(seed: int, stream: str, *counters: int) -> int:
    z = _stream_key(seed, stream)
    for c in counters:
        z = (z * _GOLDEN + c) & _M64
    return _mix_py(z)


def _u_py(seed: int, stream: str, *counters: int) -> float:
    return (_hash_py(seed, stream, *counters) >> 11) * 2.0**-53


def _ulit(value: int) -> pl.Expr:
    return pl.lit(value & _M64, dtype=_U64)


def _mix_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """splitmix64 finaliser of column ``z``, one column reference per step (an expression
    tree would duplicate ``z`` at every xor-shift and grow exponentially)."""
    z = pl.col("z")
    frame = frame.select(z=(z ^ (z // _ulit(1 << 30))) * _ulit(_C1))
    frame = frame.select(z=(z ^ (z // _ulit(1 << 27))) * _ulit(_C2))
    return frame.select(z=z ^ (z // _ulit(1 << 31)))


def _hash(seed: int, stream: str, *counters: pl.Expr | str) -> pl.Expr:
    """splitmix64 finaliser of ``key * G^n + c1 * G^(n-1) + ... + cn`` (wrapping): a UInt64
    hash of (seed, stream, counters...), equal to ``_hash_py``."""
    z = _ulit(_stream_key(seed, stream))
    for c in counters:
        c = pl.col(c) if isinstance(c, str) else c
        z = z * _ulit(_GOLDEN) + c.cast(_U64)
    return z.map_batches(lambda series: _mix_frame(series.alias("z").to_frame())["z"], return_dtype=_U64,
                         is_elementwise=True)


def _u(seed: int, stream: str, *counters: pl.Expr | str) -> pl.Expr:
    """Uniform float in [0, 1)."""
    return (_hash(seed, stream, *counters) // _ulit(1 << 11)).cast(pl.Float64) * 2.0**-53


def _randint(seed: int, stream: str, lo: int, hi: int, *counters: pl.Expr | str) -> pl.Expr:
    """Uniform integer in [lo, hi] (Int64)."""
    return (_hash(seed, stream, *counters) % _ulit(hi - lo + 1)).cast(pl.Int64) + lo


def _pick(u: pl.Expr, choices: list[tuple[object, float]]) -> pl.Expr:
    """Categorical draw: ``choices`` are (value, probability); the last takes the rest."""
    expr = None
    acc = 0.0
    for value, prob in choices[:-1]:
        acc += prob
        expr = (pl.when(u < acc) if expr is None else expr.when(u < acc)).then(pl.lit(value))
    last = pl.lit(choices[-1][0])
    return last if expr is None else expr.otherwise(last)


def _pick_py(u: float, choices: list[tuple[object, float]]) -> object:
    acc = 0.0
    for value, prob in choices[:-1]:
        acc += prob
        if u < acc:
            return value
    return choices[-1][0]


def _dec_from_units(units: pl.Expr, scale: int | pl.Expr) -> pl.Expr:
    """Exact DEC value of an integer number of 10^-scale units."""
    d = units.cast(DEC)
    if isinstance(scale, int):
        return d if scale == 0 else d * pl.lit(Decimal(1).scaleb(-scale), dtype=DEC)
    factor = (
        pl.when(scale == 0)
        .then(pl.lit(Decimal(1), dtype=DEC))
        .when(scale == 2)
        .then(pl.lit(Decimal("0.01"), dtype=DEC))
        .otherwise(pl.lit(Decimal("0.0001"), dtype=DEC))
    )
    return d * factor


# ---------------------------------------------------------------------------------------
# the market, the shelf and the models (shared, seed only)

CURRENCIES = ("USD", "EUR", "GBP", "CHF", "SGD", "HKD", "JPY")
BASE_CURRENCIES = (("SGD", 0.30), ("USD", 0.30), ("EUR", 0.15), ("CHF", 0.15), ("GBP", 0.10))
# market quoting order: the earlier currency is FROM (EUR/USD, USD/JPY, GBP/CHF, ...)
_QUOTE_ORDER = ("EUR", "GBP", "USD", "CHF", "SGD", "HKD", "JPY")
_USD_PER_UNIT = {
    "USD": 1.0,
    "EUR": 1.085,
    "GBP": 1.272,
    "CHF": 1.118,
    "SGD": 0.741,
    "HKD": 0.1281,
    "JPY": 0.00641,
}
_MINOR_DP = {c: (0 if c == "JPY" else 2) for c in CURRENCIES}
# currencies that never have an FX rate (bad-data foreign cash)
NO_FX_CURRENCIES = ("AUD", "NOK")

MARKET_SNAPSHOT_ID = "md"
SHELF_ID = "default"
MARKET_AS_OF = datetime(2025, 6, 30, 21, 0, tzinfo=timezone.utc)
PORTFOLIO_AS_OF = datetime(2025, 6, 30, 21, 5, tzinfo=timezone.utc)
FUND_NAV_AS_OF = datetime(2025, 6, 29, 21, 0, tzinfo=timezone.utc)

N_INSTRUMENTS = 4000
N_NO_PRICE = 20  # shelved, never priced: NP00001..
N_UNSHELVED = 5  # priced, never shelved: UN00001..
BAD_PORTFOLIO_RATE = 0.01
BAD_MODEL_ID = "M_BAD_UNSHELVED"

_ASSET_CLASSES = (
    ("EQUITY", "EQ", 0.45),
    ("FIXED_INCOME", "BD", 0.30),
    ("FUND", "FD", 0.18),
    ("ALTERNATIVE", "AL", 0.07),
)
_CCY_MIX = {
    "EQUITY": [("USD", .35), ("EUR", .18), ("GBP", .10), ("CHF", .08), ("SGD", .09), ("HKD", .12), ("JPY", .08)],
    "FIXED_INCOME": [("USD", .45), ("EUR", .25), ("GBP", .10), ("CHF", .08), ("SGD", .08), ("HKD", .02), ("JPY", .02)],
    "FUND": [("USD", .40), ("EUR", .30), ("GBP", .08), ("CHF", .08), ("SGD", .08), ("HKD", .04), ("JPY", .02)],
    "ALTERNATIVE": [("USD", .70), ("EUR", .15), ("GBP", .05), ("CHF", .05), ("SGD", .05)],
}
_PRICE_RANGE = {"EQUITY": (5.0, 400.0), "FIXED_INCOME": (85.0, 115.0), "FUND": (8.0, 300.0), "ALTERNATIVE": (50.0, 5000.0)}
_PRICE_SCALE = {"JPY": 100.0, "HKD": 5.0}
_SECTORS = {
    "EQUITY": [("TECHNOLOGY", .20), ("FINANCIALS", .14), ("HEALTH_CARE", .12), ("CONSUMER_DISCRETIONARY", .10),
               ("INDUSTRIALS", .10), ("COMMUNICATION_SERVICES", .08), ("CONSUMER_STAPLES", .07), ("ENERGY", .05),
               ("MATERIALS", .05), ("UTILITIES", .04), ("REAL_ESTATE", .05)],
    "FIXED_INCOME": [("GOVERNMENT", .35), ("FINANCIALS", .25), ("CORPORATE", .35), ("SUPRANATIONAL", .05)],
    "FUND": [("MULTI_ASSET", .30), ("EQUITY_FUND", .35), ("BOND_FUND", .25), ("MONEY_MARKET", .10)],
    "ALTERNATIVE": [("HEDGE_FUND", .40), ("PRIVATE_EQUITY", .25), ("REAL_ESTATE", .15), ("COMMODITIES", .20)],
}
_REGION = {"USD": "NORTH_AMERICA", "EUR": "EUROPE", "GBP": "UK", "CHF": "SWITZERLAND",
           "SGD": "ASIA_EX_JAPAN", "HKD": "ASIA_EX_JAPAN", "JPY": "JAPAN"}
_RATINGS = [("AAA", .15), ("AA", .25), ("A", .30), ("BBB", .22), ("BB", .08)]
_STATUSES = [("APPROVED", .86), ("RESTRICTED", .04), ("BANNED", .03), ("SUSPENDED", .03), ("SELL_ONLY", .04)]

RISK_PROFILES = ("CONS", "BAL", "GROW", "AGGR")
_RISK_MIX = {
    "CONS": {"EQUITY": .20, "FIXED_INCOME": .60, "FUND": .15, "ALTERNATIVE": .05},
    "BAL": {"EQUITY": .40, "FIXED_INCOME": .40, "FUND": .15, "ALTERNATIVE": .05},
    "GROW": {"EQUITY": .60, "FIXED_INCOME": .20, "FUND": .12, "ALTERNATIVE": .08},
    "AGGR": {"EQUITY": .80, "FIXED_INCOME": .05, "FUND": .10, "ALTERNATIVE": .05},
}
_RISK_WEIGHTS = [("CONS", .20), ("BAL", .40), ("GROW", .30), ("AGGR", .10)]
# a few models carry a target whose shelf status is not APPROVED (ordinary engine cases)
_MODEL_ODD_STATUS = {1: "RESTRICTED", 6: "SUSPENDED", 11: "SELL_ONLY", 16: "BANNED"}


def model_ids() -> list[str]:
    return [f"M_{risk}_{base}" for risk in RISK_PROFILES for base, _ in BASE_CURRENCIES]


def _round_sig(x: float, dp: int) -> Decimal:
    return Decimal(f"{x:.{dp}f}")


def _largest_prime_le(n: int) -> int:
    def is_prime(p: int) -> bool:
        if p < 2:
            return False
        return all(p % d for d in range(2, int(math.isqrt(p)) + 1))

    while not is_prime(n):
        n -= 1
    return n


class _Market:
    """Everything shared by every portfolio of one seed."""

    def __init__(self, seed: int):
        self.seed = seed
        s = seed
        # FX mids: each currency's USD value moves a little with the seed, so rates are
        # triangularly consistent up to rounding.
        self.usd_per = {
            c: (1.0 if c == "USD" else v * (1 + 0.04 * (_u_py(s, "fxmid", i) - 0.5)))
            for i, (c, v) in enumerate(_USD_PER_UNIT.items())
        }
        base_set = {b for b, _ in BASE_CURRENCIES}
        fx_rows = []
        for i, a in enumerate(_QUOTE_ORDER):
            for b in _QUOTE_ORDER[i + 1:]:
                if a not in base_set and b not in base_set:
                    continue
                rate = self.usd_per[a] / self.usd_per[b]
                dp = 6 if rate < 10 else 4
                fx_rows.append((MARKET_SNAPSHOT_ID, f"{a}/{b}", _round_sig(rate, dp)))
        self.fx_rates = pl.DataFrame(
            fx_rows, schema={"market_snapshot_id": pl.String, "pair": pl.String, "rate": DEC}, orient="row"
        )

        inst = []  # dicts
        counts = {}
        for n_no in range(N_INSTRUMENTS):
            ac, prefix = _pick_py(_u_py(s, "ac", n_no), [((a, p), w) for a, p, w in _ASSET_CLASSES])
            counts[prefix] = counts.get(prefix, 0) + 1
            ccy = _pick_py(_u_py(s, "ccy", n_no), _CCY_MIX[ac])
            lo, hi = _PRICE_RANGE[ac]
            u = _u_py(s, "px", n_no)
            px = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
            if ac != "FIXED_INCOME":
                px *= _PRICE_SCALE.get(ccy, 1.0)
            dp = _MINOR_DP[ccy]
            units = max(1, round(px * 10**dp))
            is_etf = ac == "FUND" and _u_py(s, "etf", n_no) < 0.4
            inst.append({
                "inst_no": n_no,
                "instrument_id": f"{prefix}{counts[prefix]:05d}",
                "asset_class": ac,
                "currency": ccy,
                "price_units": units,
                "price_dp": dp,
                "price_f": units / 10**dp,
                "is_etf": is_etf,
                "status": _pick_py(_u_py(s, "status", n_no), _STATUSES),
                "priced": True,
                "shelved": True,
            })
        for k in range(N_NO_PRICE):
            ccy = CURRENCIES[k % len(CURRENCIES)]
            inst.append({"inst_no": len(inst), "instrument_id": f"NP{k + 1:05d}", "asset_class": "EQUITY",
                         "currency": ccy, "price_units": 0, "price_dp": _MINOR_DP[ccy], "price_f": 0.0,
                         "is_etf": False, "status": "APPROVED", "priced": False, "shelved": True})
        for k in range(N_UNSHELVED):
            units = 10_000 + int(_u_py(s, "unpx", k) * 90_000)
            inst.append({"inst_no": len(inst), "instrument_id": f"UN{k + 1:05d}", "asset_class": "EQUITY",
                         "currency": "USD", "price_units": units, "price_dp": 2, "price_f": units / 100,
                         "is_etf": False, "status": None, "priced": True, "shelved": False})
        self.inst = inst

        self.prices = self._prices()
        self.shelf, self.shelf_attributes = self._shelf()
        self.models, self.model_slots = self._models()
        model_insts = set(self.model_slots["inst_no"].to_list())
        pool = [r["inst_no"] for r in inst if r["priced"] and r["shelved"] and r["inst_no"] not in model_insts]
        self.legacy_pool = pool[: _largest_prime_le(len(pool))]
        self.no_price_pool = [r["inst_no"] for r in inst if not r["priced"]]
        self.inst_frame = pl.DataFrame(
            {
                "inst_no": [r["inst_no"] for r in inst],
                "instrument_id": [r["instrument_id"] for r in inst],
                "inst_ccy": [r["currency"] for r in inst],
                "price_f": [r["price_f"] for r in inst],
            },
            schema={"inst_no": pl.Int64, "instrument_id": pl.String, "inst_ccy": pl.String, "price_f": pl.Float64},
        )

    def _prices(self) -> pl.DataFrame:
        rows = [r for r in self.inst if r["priced"]]
        return pl.DataFrame(
            {
                "market_snapshot_id": [MARKET_SNAPSHOT_ID] * len(rows),
                "instrument_id": [r["instrument_id"] for r in rows],
                "price": [Decimal(r["price_units"]).scaleb(-r["price_dp"]) for r in rows],
                "currency": [r["currency"] for r in rows],
                "as_of": [FUND_NAV_AS_OF if r["asset_class"] == "FUND" and not r["is_etf"] else MARKET_AS_OF
                          for r in rows],
            },
            schema={"market_snapshot_id": pl.String, "instrument_id": pl.String, "price": DEC,
                    "currency": pl.String, "as_of": pl.Datetime("us", "UTC")},
        )

    def _shelf(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        s = self.seed
        shelf_rows, attr_rows = [], []
        n_issuers = 600
        for r in self.inst:
            if not r["shelved"]:
                continue
            n, ac, ccy = r["inst_no"], r["asset_class"], r["currency"]
            if ac == "EQUITY":
                issuer = f"ISS{n:05d}"
                tier = "L1" if _u_py(s, "tier", n) < 0.7 else "L2"
                sdays = 1 if ccy == "USD" else 2
                min_amt = None
                trade_by = "UNITS"
            elif ac == "FIXED_INCOME":
                issuer = f"ISS{int(_u_py(s, 'issuer', n) * n_issuers):05d}"
                tier = "L2" if _u_py(s, "tier", n) < 0.6 else "L3"
                sdays = 1 if _u_py(s, "sd", n) < 0.2 else 2
                min_amt = 1000 if _u_py(s, "minn", n) < 0.2 else None
                trade_by = "UNITS"
            elif ac == "FUND":
                issuer = f"MGR{int(_u_py(s, 'issuer', n) * 80):03d}"
                tier = "L1" if r["is_etf"] else ("L2" if _u_py(s, "tier", n) < 0.7 else "L3")
                sdays = 2 if r["is_etf"] else (3 if _u_py(s, "sd", n) < 0.7 else 1)
                min_amt = None if r["is_etf"] else (1000 if _u_py(s, "minn", n) < 0.5 else 5000)
                trade_by = "UNITS" if r["is_etf"] or _u_py(s, "tby", n) < 0.5 else "NOTIONAL"
            else:
                issuer = f"MGR{80 + int(_u_py(s, 'issuer', n) * 40):03d}"
                tier = "L4" if _u_py(s, "tier", n) < 0.6 else "L5"
                sdays = 3
                min_amt = 10000
                trade_by = "UNITS"
            min_notional = None
            if min_amt is not None:
                min_notional = Decimal(min_amt * (100 if ccy == "JPY" else 1))
            shelf_rows.append((SHELF_ID, r["instrument_id"], r["status"], ac, issuer, tier, sdays,
                               min_notional, ccy if min_notional is not None else None, trade_by))
            sector = _pick_py(_u_py(s, "sector", n), _SECTORS[ac])
            region = _REGION[ccy]
            if ac in ("FUND", "ALTERNATIVE") and _u_py(s, "glob", n) < 0.35:
                region = "GLOBAL"
            attr_rows.append((SHELF_ID, r["instrument_id"], "sector", sector))
            attr_rows.append((SHELF_ID, r["instrument_id"], "region", region))
            if ac == "FIXED_INCOME":
                attr_rows.append((SHELF_ID, r["instrument_id"], "rating", _pick_py(_u_py(s, "rating", n), _RATINGS)))
            if ac == "FUND":
                attr_rows.append((SHELF_ID, r["instrument_id"], "product_type", "ETF" if r["is_etf"] else "MUTUAL_FUND"))
        shelf_schema = {name: dtype for name, dtype, _ in TABLES["shelf"]}
        attr_schema = {name: dtype for name, dtype, _ in TABLES["shelf_attributes"]}
        return (
            pl.DataFrame(shelf_rows, schema=shelf_schema, orient="row"),
            pl.DataFrame(attr_rows, schema=attr_schema, orient="row"),
        )

    def _models(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        s = self.seed
        approved = {}
        odd = {}
        for r in self.inst:
            if r["priced"] and r["shelved"]:
                if r["status"] == "APPROVED":
                    approved.setdefault(r["asset_class"], []).append(r)
                else:
                    odd.setdefault(r["status"], []).append(r)
        rows = []  # (model_id, slot, inst_no, bps)
        for m_no, model_id in enumerate(model_ids()):
            _, risk, base = model_id.split("_")
            size = 15 + int(_u_py(s, "msize", m_no) * 26)  # 15..40
            cash_bps = 0 if _u_py(s, "mcash", m_no) < 0.6 else 100 * (1 + int(_u_py(s, "mcashp", m_no) * 5))
            mix = _RISK_MIX[risk]
            chosen = []  # (inst row, class bps budget share)
            for ac, share in mix.items():
                n_ac = max(1, round(size * share))
                pool = approved[ac]
                home = [r for r in pool if r["currency"] == base]
                away = [r for r in pool if r["currency"] != base]
                key = lambda r: _hash_py(s, "mpick", m_no, r["inst_no"])  # noqa: E731
                n_home = min(len(home), (n_ac + 1) // 2)
                picks = sorted(home, key=key)[:n_home] + sorted(away, key=key)[: n_ac - n_home]
                raw = [0.5 + _u_py(s, "mw", m_no, r["inst_no"]) for r in picks]
                tot = sum(raw)
                chosen += [(r, share * w / tot) for r, w in zip(picks, raw)]
            if m_no in _MODEL_ODD_STATUS:
                pool = odd[_MODEL_ODD_STATUS[m_no]]
                r = sorted(pool, key=lambda r: _hash_py(s, "modd", m_no, r["inst_no"]))[0]
                chosen[-1] = (r, chosen[-1][1])
            total_bps = 10_000 - cash_bps
            bps = [int(math.floor(w * total_bps)) for _, w in chosen]
            big = max(range(len(bps)), key=lambda i: bps[i])
            bps[big] += total_bps - sum(bps)
            order = sorted(range(len(chosen)), key=lambda i: _hash_py(s, "morder", m_no, i))
            for slot, i in enumerate(order):
                rows.append((model_id, slot, chosen[i][0]["inst_no"], bps[i]))
        # the bad-data model: a balanced USD model whose last target is not on the shelf
        src = [r for r in rows if r[0] == "M_BAL_USD"]
        unshelved = [r["inst_no"] for r in self.inst if not r["shelved"]][0]
        for _model_id, slot, inst_no, bps in src:
            rows.append((BAD_MODEL_ID, slot, unshelved if slot == len(src) - 1 else inst_no, bps))
        slots = pl.DataFrame(rows, schema={"model_id": pl.String, "slot": pl.Int64, "inst_no": pl.Int64,
                                           "bps": pl.Int64}, orient="row")
        by_no = {r["inst_no"]: r["instrument_id"] for r in self.inst}
        models = pl.DataFrame(
            {
                "model_id": slots["model_id"],
                "instrument_id": [by_no[i] for i in slots["inst_no"].to_list()],
                "weight": [Decimal(b).scaleb(-4) for b in slots["bps"].to_list()],
            },
            schema={"model_id": pl.String, "instrument_id": pl.String, "weight": WEIGHT},
        )
        return models, slots


@lru_cache(maxsize=8)
def _market(seed: int) -> _Market:
    return _Market(seed)


# ---------------------------------------------------------------------------------------
# per-portfolio tables (vectorised over the block)

_CCY_IDX = {c: i for i, c in enumerate(CURRENCIES)}


def _policy_columns(seed: int) -> dict[str, pl.Expr]:
    """Per-portfolio policy overrides; null means "take the default"."""
    S = seed

    def flag(stream: str, p: float) -> pl.Expr:
        return _u(S, stream, "pidx") < p

    def when(stream: str, p: float, value: object, dtype: pl.DataType) -> pl.Expr:
        return pl.when(flag(stream, p)).then(pl.lit(value, dtype=dtype)).otherwise(pl.lit(None, dtype=dtype))

    band = _u(S, "pol_band", "pidx")
    tax = flag("pol_tax", 0.10)
    return {
        "valuation_mode": when("pol_val", 0.02, "TRUST_SNAPSHOT", pl.String),
        "cash_band_min_weight": pl.when(band < 0.10).then(pl.lit(Decimal("0.01"), dtype=DEC))
        .when(band < 0.15).then(pl.lit(Decimal("0.00"), dtype=DEC)).otherwise(pl.lit(None, dtype=DEC)),
        "cash_band_max_weight": pl.when(band < 0.10).then(pl.lit(Decimal("0.05"), dtype=DEC))
        .when(band < 0.15).then(pl.lit(Decimal("0.10"), dtype=DEC)).otherwise(pl.lit(None, dtype=DEC)),
        "single_position_max_weight": pl.when(_u(S, "pol_cap", "pidx") < 0.10).then(pl.lit(Decimal("0.1"), dtype=DEC))
        .when(_u(S, "pol_cap", "pidx") < 0.13).then(pl.lit(Decimal("0.15"), dtype=DEC))
        .otherwise(pl.lit(None, dtype=DEC)),
        "min_trade_notional_amount": when("pol_mtn", 0.08, Decimal("1000"), DEC),
        "min_trade_notional_currency": pl.when(flag("pol_mtn", 0.08)).then(pl.col("base_currency"))
        .otherwise(pl.lit(None, dtype=pl.String)),
        "allow_restricted": when("pol_restr", 0.05, True, pl.Boolean),
        "suppress_dust_trades": when("pol_dust", 0.05, False, pl.Boolean),
        "fx_buffer_pct": pl.lit(Decimal("0.01"), dtype=DEC),
        # most mandates keep a cash buffer: without one, FX funding buffers overdraw base cash
        "min_cash_buffer_pct": when("pol_buf", 0.85, Decimal("0.02"), DEC),
        "max_turnover_pct": when("pol_turn", 0.05, Decimal("0.25"), DEC),
        "enable_tax_awareness": pl.when(tax).then(pl.lit(True)).otherwise(pl.lit(None, dtype=pl.Boolean)),
        "max_realized_capital_gains": pl.when(tax & (_u(S, "pol_gains", "pidx") < 0.5))
        .then(pl.lit(Decimal("50000"), dtype=DEC)).otherwise(pl.lit(None, dtype=DEC)),
        "enable_settlement_awareness": when("pol_settle", 0.10, True, pl.Boolean),
        "workflow_requires_client_consent": when("pol_consent", 0.10, True, pl.Boolean),
        "client_consent_already_obtained": pl.when(flag("pol_consent", 0.10) & (_u(S, "pol_cons2", "pidx") < 0.3))
        .then(pl.lit(True)).otherwise(pl.lit(None, dtype=pl.Boolean)),
        "notional_sizing": when("pol_notional", 0.05, True, pl.Boolean),
    }


def _portfolio_block(seed: int, start: int, n: int, bad_data: bool, holdings: tuple[int, int]) -> pl.DataFrame:
    """One row per portfolio with the internal draws (pidx, k, value, ...)."""
    S = seed
    lo, hi = holdings
    base = _pick(_u(S, "base", "pidx"), list(BASE_CURRENCIES))
    risk = _pick(_u(S, "risk", "pidx"), _RISK_WEIGHTS)
    bad = (_u(S, "bad", "pidx") < BAD_PORTFOLIO_RATE) if bad_data else pl.lit(False)
    lv_lo, lv_hi = math.log(1e5), math.log(2e7)
    frame = pl.DataFrame({"pidx": pl.int_range(start, start + n, dtype=pl.Int64, eager=True)})
    frame = frame.with_columns(
        portfolio_id=pl.lit("PF") + pl.col("pidx").cast(pl.String).str.zfill(7),
        base_currency=base,
        risk=risk,
        k=_randint(S, "k", lo, hi, "pidx"),
        total_value=(pl.lit(lv_lo) + _u(S, "value", "pidx") * (lv_hi - lv_lo)).exp(),
        cash_frac=pl.when(_u(S, "cashbig", "pidx") < 0.1)
        .then(0.10 + 0.20 * _u(S, "cashf", "pidx"))
        .otherwise(0.005 + 0.06 * _u(S, "cashf", "pidx")),
        fault=pl.when(bad).then(_randint(S, "fault", 0, 2, "pidx")).otherwise(pl.lit(-1, dtype=pl.Int64)),
    )
    return frame.with_columns(
        hold_model_id=pl.lit("M_") + pl.col("risk") + pl.lit("_") + pl.col("base_currency"),
    ).with_columns(
        model_id=pl.when(pl.col("fault") == 2).then(pl.lit(BAD_MODEL_ID)).otherwise(pl.col("hold_model_id")),
    )


def _portfolios(block: pl.DataFrame, seed: int) -> pl.DataFrame:
    policy = _policy_columns(seed)
    exprs = {
        "run_key": pl.col("portfolio_id"),
        "portfolio_id": pl.col("portfolio_id"),
        "base_currency": pl.col("base_currency"),
        "portfolio_snapshot_id": pl.col("portfolio_id"),
        "market_snapshot_id": pl.lit(MARKET_SNAPSHOT_ID),
        "shelf_id": pl.lit(SHELF_ID),
        "model_id": pl.col("model_id"),
        "portfolio_as_of": pl.lit(PORTFOLIO_AS_OF, dtype=pl.Datetime("us", "UTC")),
        "market_as_of": pl.lit(MARKET_AS_OF, dtype=pl.Datetime("us", "UTC")),
        "request_hash": pl.lit(None, dtype=pl.String),
        "input_fault": pl.lit(None, dtype=pl.String),
        "scenario_id": pl.lit(None, dtype=pl.String),
    }
    for name, dtype, _default in POLICY_COLUMNS:
        exprs[name] = policy.get(name, pl.lit(None, dtype=dtype))
    schema = {name: dtype for name, dtype, _ in TABLES["portfolios"]}
    return block.select([exprs[name].cast(schema[name]).alias(name) for name in schema])


def _usd_per_expr(m: _Market, col: str) -> pl.Expr:
    return pl.col(col).replace_strict(list(m.usd_per), list(m.usd_per.values()), return_dtype=pl.Float64)


def _from_block(block: pl.DataFrame, name: str, start: int) -> pl.Expr:
    """Column ``name`` of the portfolio block, looked up by ``pidx`` (block row = pidx - start)."""
    return pl.lit(block[name]).gather(pl.col("pidx") - start)


def _from_inst(m: _Market, name: str) -> pl.Expr:
    """Column ``name`` of the instrument master, looked up by ``inst_no`` (its row index)."""
    return pl.lit(m.inst_frame[name]).gather(pl.col("inst_no"))


def _positions_raw(block: pl.DataFrame, m: _Market, seed: int, start: int) -> pl.DataFrame:
    """Internal position rows (pidx, pos_key, inst_no, qty, instrument columns), in output order."""
    S = seed
    slots = m.model_slots
    offsets, sizes = {}, {}
    for i, model_id in enumerate(slots["model_id"].to_list()):
        offsets.setdefault(model_id, i)
        sizes[model_id] = sizes.get(model_id, 0) + 1
    # model holdings: each model slot held with 90% probability; only slots < k - 1 so
    # that at least one off-model holding remains
    mrows = (
        block.select(
            "pidx",
            "k",
            off=pl.col("hold_model_id").replace_strict(offsets, return_dtype=pl.Int64),
            slot=pl.int_ranges(0, pl.col("hold_model_id").replace_strict(sizes, return_dtype=pl.Int64)),
        )
        .explode("slot")
        .filter((pl.col("slot") < pl.max_horizontal(pl.col("k") - 1, pl.lit(1))) & (_u(S, "hold", "pidx", "slot") < 0.9))
        .select(
            "pidx",
            pos_key=pl.col("slot"),
            inst_no=pl.lit(slots["inst_no"]).gather(pl.col("off") + pl.col("slot")),
            raw_w=pl.lit(slots["bps"]).gather(pl.col("off") + pl.col("slot")).cast(pl.Float64)
            * (0.6 + 0.8 * _u(S, "drift", "pidx", "slot")),
        )
    )
    n_model = mrows.group_by("pidx").agg(n_model=pl.len())
    # legacy (off-model) holdings: a random affine walk through a prime-sized pool, so
    # they are distinct within a portfolio and never on any model
    P = len(m.legacy_pool)
    legacy_pool = pl.Series(m.legacy_pool, dtype=pl.Int64)
    no_price_pool = pl.Series(m.no_price_pool, dtype=pl.Int64)
    walk = (_randint(S, "walk_a", 0, P - 1, "pidx") + pl.col("j") * _randint(S, "walk_b", 1, P - 1, "pidx")) % P
    no_price = pl.lit(no_price_pool).gather(_randint(S, "np", 0, len(no_price_pool) - 1, "pidx"))
    lrows = (
        block.select("pidx", "k", "fault")
        .join(n_model, on="pidx", how="left", maintain_order="left")
        .with_columns(n_legacy=pl.col("k") - pl.col("n_model").fill_null(0))
        .filter(pl.col("n_legacy") > 0)
        .with_columns(j=pl.int_ranges(0, pl.col("n_legacy")))
        .explode("j")
        .select(
            "pidx",
            pos_key=pl.col("j") + 1000,
            inst_no=pl.when((pl.col("fault") == 0) & (pl.col("j") == 0))
            .then(no_price)
            .otherwise(pl.lit(legacy_pool).gather(walk)),
            raw_w=(0.002 + 0.012 * _u(S, "lw", "pidx", "j")) * 10_000,
        )
    )
    rows = pl.concat([mrows, lrows])
    order = _hash(S, "order", "pidx", "pos_key")
    if start + block.height < (1 << 24):
        rows = rows.sort((pl.col("pidx").cast(_U64) * _ulit(1 << 40)) + order // _ulit(1 << 24), maintain_order=True)
    else:
        rows = rows.with_columns(okey=order).sort("pidx", "okey", maintain_order=True).drop("okey")
    rows = rows.with_columns(
        instrument_id=_from_inst(m, "instrument_id"),
        inst_ccy=_from_inst(m, "inst_ccy"),
        price_f=_from_inst(m, "price_f"),
        base_currency=_from_block(block, "base_currency", start),
        invested=_from_block(block, "total_value", start) * (1 - _from_block(block, "cash_frac", start)),
    )
    value_base = pl.col("invested") * pl.col("raw_w") / pl.col("raw_w").sum().over("pidx")
    value_ccy = value_base * _usd_per_expr(m, "base_currency") / _usd_per_expr(m, "inst_ccy")
    # unpriced instruments (bad data) get a plausible quantity
    price = pl.when(pl.col("price_f") > 0).then(pl.col("price_f")).otherwise(100.0)
    return rows.with_columns(
        qty=pl.max_horizontal((value_ccy / price).floor().cast(pl.Int64), pl.lit(1, dtype=pl.Int64)),
    ).drop("raw_w", "invested")


def _positions(raw: pl.DataFrame, block: pl.DataFrame, seed: int, start: int) -> pl.DataFrame:
    S = seed
    has_mv = (_u(S, "mv", "pidx", "pos_key") < 0.03) & (pl.col("price_f") > 0)
    jpy = pl.col("inst_ccy") == "JPY"
    mv_minor = (
        pl.col("qty").cast(pl.Float64) * pl.col("price_f") * (1 + 0.01 * (_u(S, "mvn", "pidx", "pos_key") - 0.5))
        * pl.when(jpy).then(1.0).otherwise(100.0)
    ).round(0).cast(pl.Int64)
    mv_dp = pl.when(jpy).then(pl.lit(0)).otherwise(pl.lit(2))
    return raw.select(
        portfolio_snapshot_id=_from_block(block, "portfolio_id", start),
        instrument_id=pl.col("instrument_id"),
        quantity=pl.col("qty").cast(DEC),
        market_value=pl.when(has_mv).then(_dec_from_units(mv_minor, mv_dp)).otherwise(pl.lit(None, dtype=DEC)),
        market_value_currency=pl.when(has_mv).then(pl.col("inst_ccy")).otherwise(pl.lit(None, dtype=pl.String)),
    )


_FIRST_PURCHASE = datetime(2010, 1, 4).date()
_MAX_PURCHASE_DAY = 4000 + 3 * 400  # first_day + (lots - 1) * gap


def _lots(raw: pl.DataFrame, block: pl.DataFrame, m: _Market, seed: int, start: int) -> pl.DataFrame:
    S = seed
    lots = raw.filter((_u(S, "haslots", "pidx", "pos_key") < 0.2) & (pl.col("price_f") > 0))
    lots = lots.with_columns(
        n_lots=pl.max_horizontal(
            pl.min_horizontal(_randint(S, "nlots", 1, 4, "pidx", "pos_key"), pl.col("qty") // 3), pl.lit(1)
        ),
        first_day=_randint(S, "lotd0", 0, 4000, "pidx", "pos_key"),
        gap=_randint(S, "lotgap", 30, 400, "pidx", "pos_key"),
        foreign_cost=(_u(S, "costccy", "pidx", "pos_key") < 0.05) & (pl.col("inst_ccy") != pl.col("base_currency")),
    ).with_columns(lot=pl.int_ranges(0, pl.col("n_lots"))).explode("lot")

    def cut(lot: pl.Expr) -> pl.Expr:
        # cumulative split point where lot `lot` starts: exactly 0 and qty at the ends, so
        # lot quantities sum exactly to the position quantity; lots are >= 1 as qty >= 3 * n_lots
        jitter = 0.6 * (_u(S, "lotcut", "pidx", "pos_key", lot) - 0.5)
        frac = (lot.cast(pl.Float64) + jitter) / pl.col("n_lots").cast(pl.Float64)
        inner = (pl.col("qty").cast(pl.Float64) * frac).floor().cast(pl.Int64)
        return pl.when(lot == 0).then(0).when(lot == pl.col("n_lots")).then(pl.col("qty")).otherwise(inner)

    cost_ccy = pl.when(pl.col("foreign_cost")).then(pl.col("base_currency")).otherwise(pl.col("inst_ccy"))
    cost_f = (
        pl.col("price_f") * (0.4 + 1.2 * _u(S, "cost", "pidx", "pos_key", "lot"))
        * pl.when(pl.col("foreign_cost"))
        .then(_usd_per_expr(m, "inst_ccy") / _usd_per_expr(m, "base_currency"))
        .otherwise(1.0)
    )
    # purchase dates as text via a small day -> 'YYYY-MM-DD' table (cheaper than strftime per row)
    day_text = pl.select(
        (pl.lit(_FIRST_PURCHASE) + pl.duration(days=pl.int_range(0, _MAX_PURCHASE_DAY + 1))).dt.strftime("%Y-%m-%d")
    ).to_series()
    purchase = pl.lit(day_text).gather(pl.col("first_day") + pl.col("lot") * pl.col("gap"))
    portfolio_id = _from_block(block, "portfolio_id", start)
    return lots.select(
        portfolio_snapshot_id=portfolio_id,
        instrument_id=pl.col("instrument_id"),
        lot_id=pl.concat_str(
            [pl.lit("LOT-"), portfolio_id, pl.lit("-"), pl.col("pos_key").cast(pl.String), pl.lit("-"),
             (pl.col("lot") + 1).cast(pl.String)]
        ),
        quantity=(cut(pl.col("lot") + 1) - cut(pl.col("lot"))).cast(DEC),
        unit_cost=_dec_from_units((cost_f * 10_000).round(0).cast(pl.Int64), 4),
        cost_currency=cost_ccy,
        purchase_date=purchase,
    )


def _cash(block: pl.DataFrame, m: _Market, seed: int) -> pl.DataFrame:
    S = seed
    base_idx = pl.col("base_currency").replace_strict(_CCY_IDX, return_dtype=pl.Int64)
    r1 = _randint(S, "cash_f1", 0, 5, "pidx")
    r2 = _randint(S, "cash_f2", 0, 4, "pidx")
    ccys = pl.Series(CURRENCIES)

    def ccy_at(i: pl.Expr) -> pl.Expr:
        return pl.lit(ccys).gather(i)

    b = block.with_columns(
        f1=ccy_at((base_idx + 1 + r1) % 7),
        f2=ccy_at((base_idx + 1 + (r1 + 1 + r2) % 6) % 7),
        has_f1=_u(S, "has_f1", "pidx") < 0.30,
        has_f2=_u(S, "has_f2", "pidx") < 0.33,
        f1_base=pl.col("total_value") * (0.002 + 0.02 * _u(S, "amt_f1", "pidx")),
        f2_base=pl.col("total_value") * (0.001 + 0.01 * _u(S, "amt_f2", "pidx")),
        overdrawn=_u(S, "overdrawn", "pidx") < 0.01,
        has_settle=_u(S, "settle", "pidx") < 0.2,
    ).with_columns(
        has_f2=pl.col("has_f1") & pl.col("has_f2"),
    )
    foreign_base = (
        pl.when(pl.col("has_f1")).then(pl.col("f1_base")).otherwise(0.0)
        + pl.when(pl.col("has_f2")).then(pl.col("f2_base")).otherwise(0.0)
    )
    base_amt = pl.when(pl.col("overdrawn")).then(
        -pl.col("total_value") * (0.001 + 0.01 * _u(S, "od_amt", "pidx"))
    ).otherwise(pl.col("total_value") * pl.col("cash_frac") - foreign_base)

    def in_ccy(value_base: pl.Expr, ccy: str) -> pl.Expr:
        return value_base * _usd_per_expr(m, "base_currency") / _usd_per_expr(m, ccy)

    common = ["pidx", "portfolio_id", "has_settle"]
    parts = [
        b.select(*common, slot=pl.lit(0), currency=pl.col("base_currency"), amount_f=base_amt),
        b.filter("has_f1").select(*common, slot=pl.lit(1), currency=pl.col("f1"), amount_f=in_ccy(pl.col("f1_base"), "f1")),
        b.filter("has_f2").select(*common, slot=pl.lit(2), currency=pl.col("f2"), amount_f=in_ccy(pl.col("f2_base"), "f2")),
        b.filter(pl.col("fault") == 1).select(
            *common,
            slot=pl.lit(3),
            currency=_pick(_u(S, "noccy", "pidx"), [(c, 1 / len(NO_FX_CURRENCIES)) for c in NO_FX_CURRENCIES]),
            amount_f=1000.0 + 49_000.0 * _u(S, "noccy_amt", "pidx"),
        ),
    ]
    rows = pl.concat(parts).sort("pidx", "slot", maintain_order=True)
    scale = pl.when(pl.col("currency") == "JPY").then(pl.lit(0)).otherwise(pl.lit(2))
    minor = (pl.col("amount_f") * pl.when(pl.col("currency") == "JPY").then(1.0).otherwise(100.0)).round(0)
    pending_minor = (minor * 0.2 * _u(S, "pending", "pidx", "slot")).round(0)
    return rows.select(
        portfolio_snapshot_id=pl.col("portfolio_id"),
        currency=pl.col("currency"),
        amount=_dec_from_units(minor.cast(pl.Int64), scale),
        settled=pl.when(pl.col("has_settle"))
        .then(_dec_from_units((minor - pending_minor).cast(pl.Int64), scale))
        .otherwise(pl.lit(None, dtype=DEC)),
        pending=pl.when(pl.col("has_settle"))
        .then(_dec_from_units(pending_minor.cast(pl.Int64), scale))
        .otherwise(pl.lit(None, dtype=DEC)),
    )


_GROUP_CONSTRAINTS = [
    ("sector:TECHNOLOGY", Decimal("0.25")),
    ("sector:FINANCIALS", Decimal("0.20")),
    ("region:ASIA_EX_JAPAN", Decimal("0.30")),
    ("region:NORTH_AMERICA", Decimal("0.50")),
    ("sector:HEDGE_FUND", Decimal("0.05")),
]


def _group_constraints(block: pl.DataFrame, seed: int) -> pl.DataFrame:
    S = seed
    n = len(_GROUP_CONSTRAINTS)
    keys = pl.Series([k for k, _ in _GROUP_CONSTRAINTS])
    caps = pl.Series([v for _, v in _GROUP_CONSTRAINTS], dtype=DEC)
    b = block.filter(_u(S, "gc", "pidx") < 0.03).with_columns(
        g1=_randint(S, "gc1", 0, n - 1, "pidx"),
        g2=_randint(S, "gc2", 1, n - 1, "pidx"),
        two=_u(S, "gc_two", "pidx") < 0.5,
    )
    parts = [
        b.select("pidx", "portfolio_id", slot=pl.lit(0), g=pl.col("g1")),
        b.filter("two").select("pidx", "portfolio_id", slot=pl.lit(1), g=(pl.col("g1") + pl.col("g2")) % n),
    ]
    rows = pl.concat(parts).sort("pidx", "slot", maintain_order=True)
    return rows.select(
        run_key=pl.col("portfolio_id"),
        constraint_key=pl.lit(keys).gather(pl.col("g")),
        max_weight=pl.lit(caps).gather(pl.col("g")),
    )


def _overdraft_limits(block: pl.DataFrame, seed: int) -> pl.DataFrame:
    S = seed
    b = block.filter(_u(S, "od", "pidx") < 0.02)
    amount = pl.when(_u(S, "od_size", "pidx") < 0.5).then(pl.lit(Decimal("10000"), dtype=DEC)).otherwise(
        pl.lit(Decimal("50000"), dtype=DEC)
    )
    return b.select(run_key=pl.col("portfolio_id"), currency=pl.col("base_currency"), max_overdraft=amount)


def _conform_dtypes(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` as the book's columns and dtypes; an optional column it does not make
    (cash ``amount_exact``: every generated amount has two decimals) is left out."""
    return frame.select([pl.col(name).cast(dtype) for name, dtype, required in TABLES[table] if required or name in frame.columns])


def generate_book_frames(
    n_portfolios: int,
    seed: int,
    *,
    bad_data: bool = False,
    start: int = 0,
    holdings: tuple[int, int] = (30, 80),
) -> dict[str, pl.DataFrame]:
    """A deterministic synthetic book of portfolios ``start .. start + n_portfolios - 1``.

    Returns raw frames keyed by table name, columns named and typed as in
    ``dpm_vec.book.TABLES``. Per-portfolio tables depend only on (seed, portfolio index,
    bad_data, holdings); shared tables only on the seed.
    """
    if n_portfolios < 0 or start < 0:
        raise ValueError("n_portfolios and start must be non-negative")
    lo, hi = holdings
    if not 1 <= lo <= hi:
        raise ValueError(f"holdings must satisfy 1 <= lo <= hi, got {holdings}")
    seed = int(seed) & _M64
    if hi > (most := max_holdings(seed)):
        raise ValueError(f"holdings must be at most {most} for seed {seed}, got {holdings}")
    m = _market(seed)
    block = _portfolio_block(seed, start, n_portfolios, bad_data, holdings)
    raw = _positions_raw(block, m, seed, start)
    frames = {
        "portfolios": _portfolios(block, seed),
        "positions": _positions(raw, block, seed, start),
        "cash": _cash(block, m, seed),
        "lots": _lots(raw, block, m, seed, start),
        "prices": m.prices.clone(),
        "fx_rates": m.fx_rates.clone(),
        "shelf": m.shelf.clone(),
        "shelf_attributes": m.shelf_attributes.clone(),
        "models": m.models.clone(),
        "group_constraints": _group_constraints(block, seed),
        "overdraft_limits": _overdraft_limits(block, seed),
        "snapshots": empty_table("snapshots"),  # every model, shelf and market snapshot has rows
    }
    return {table: _conform_dtypes(table, frame) for table, frame in frames.items()}


def max_holdings(seed: int) -> int:
    """The most positions a generated portfolio can hold for ``seed``: its off-model holdings
    walk a pool of this many instruments, and a longer walk would hold one of them twice (a
    book whose every portfolio is blocked INVALID_HOLDINGS)."""
    return len(_market(int(seed) & _M64).legacy_pool)


PER_PORTFOLIO_TABLES = ("portfolios", "positions", "cash", "lots", "group_constraints", "overdraft_limits")


def write_generated_book(out_dir: str | os.PathLike, n_portfolios: int, seed: int, *, bad_data: bool = False,
                         holdings: tuple[int, int] = (30, 80), chunk: int = 100_000, progress=None) -> Path:
    """Generate and write a book of any size in bounded memory: portfolios are generated
    ``chunk`` at a time and appended to each table's Parquet file; the directory appears
    atomically when complete."""
    import pyarrow.parquet as pq

    from dpm_vec.io import publish_dir
    from dpm_vec.outdir import BOOK_MARKER, check_replaceable

    if n_portfolios < 0:
        raise DpmVecError(f"--portfolios must be 0 or more, got {n_portfolios}")
    if not 1 <= holdings[0] <= holdings[1]:
        raise DpmVecError(f"holdings per portfolio: need 1 <= --min-holdings <= --max-holdings, got {holdings[0]} and {holdings[1]}")
    most = max_holdings(seed)
    if holdings[1] > most:
        raise DpmVecError(f"holdings per portfolio: --max-holdings can be at most {most:,} for seed {seed} (the "
                          f"instruments a generated portfolio can hold off its model), got {holdings[1]:,}")
    out = Path(out_dir)
    check_replaceable(out, BOOK_MARKER, "book")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for start in range(0, max(n_portfolios, 1), chunk):
            frames = generate_book_frames(min(chunk, n_portfolios - start), seed, bad_data=bad_data, start=start, holdings=holdings)
            for table, frame in frames.items():
                if table not in PER_PORTFOLIO_TABLES:
                    if start == 0:
                        frame.write_parquet(tmp / f"{table}.parquet")
                    continue
                arrow = frame.to_arrow()
                if table not in writers:
                    writers[table] = pq.ParquetWriter(tmp / f"{table}.parquet", arrow.schema)
                writers[table].write_table(arrow)
            if progress:
                progress(min(start + chunk, n_portfolios))
        for writer in writers.values():
            writer.close()
        writers.clear()
        publish_dir(tmp, out)
    finally:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out
