"""Stage 0: bind the book's shared reference data (prices, FX, shelf, models) to runs.

Every later stage works on frames keyed by ``run`` (an integer per portfolios row) and
looks reference data up through the ``Market`` helpers here, which implement the
reference's first-match-wins look-ups (§1.4) and the direct-then-inverse FX rule (§6.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from dpm_vec import dec28
from dpm_vec.book import Book
from dpm_vec.frames import join_runs, sort_rows
from dpm_vec.errors import ENGINE_FAILURES, is_overflow
from dpm_vec.numeric import DEC, as_f64, lit, naming_overflows, positive_or_null, units_text

RUN = pl.UInt32
SLOT = pl.UInt32


@dataclass(frozen=True)
class Prepared:
    runs: pl.DataFrame  # one row per run: run, portfolio columns, policy columns
    positions: pl.DataFrame  # run, pos_seq, instrument_id, quantity, market_value, ..., slot
    cash: pl.DataFrame  # run, cash_seq, currency, amount, settled, pending
    lots: pl.DataFrame  # run, instrument_id, lot_id, quantity, unit_cost, ...
    model: pl.DataFrame  # run, model_seq, instrument_id, model_weight, slot
    market: "Market"


@dataclass(frozen=True)
class Market:
    run_keys: pl.DataFrame  # run, run_key, market_snapshot_id, shelf_id, base_currency
    prices: pl.DataFrame  # market_snapshot_id, instrument_id, price, price_currency, price_as_of
    fx: pl.DataFrame  # market_snapshot_id, fx_from, fx_to, fx_rate
    shelf: pl.DataFrame  # shelf_id, instrument_id, status, asset_class, ...
    attributes: pl.DataFrame  # shelf_id, instrument_id, attribute, value, attr_seq

    # When every run of the book reads the same market snapshot (or shelf), look-ups join
    # on the instrument (or currency pair) alone: one join instead of two, on one key.
    one_market: bool = False
    one_shelf: bool = False
    # per rate kind, the rated pairs of the one snapshot (``_pair_rates``); not a field a copy carries
    _pair_rate_cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def _only(self, table: pl.DataFrame, key: str) -> pl.DataFrame:
        """The rows of ``table`` for the one snapshot or shelf (``key``) every run reads."""
        return table.filter(pl.col(key) == self.run_keys[key][0]).drop(key)

    def with_price(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Attach price, price_currency, price_as_of (null when the instrument has no price)."""
        if self.one_market:
            return frame.join(self._only(self.prices, "market_snapshot_id"), on="instrument_id", how="left", maintain_order="left")
        return (
            frame.join(self.run_keys.select("run", "market_snapshot_id"), on="run", how="left", maintain_order="left")
            .join(self.prices, on=["market_snapshot_id", "instrument_id"], how="left", maintain_order="left")
            .drop("market_snapshot_id")
        )

    def with_shelf(self, frame: pl.DataFrame, columns: tuple[str, ...] | None = None) -> pl.DataFrame:
        """Attach the first shelf entry's columns (``status`` null when unshelved)."""
        shelf = self.shelf if columns is None else self.shelf.select("shelf_id", "instrument_id", *columns)
        if self.one_shelf:
            return frame.join(self._only(shelf, "shelf_id"), on="instrument_id", how="left", maintain_order="left")
        return (
            frame.join(self.run_keys.select("run", "shelf_id"), on="run", how="left", maintain_order="left")
            .join(shelf, on=["shelf_id", "instrument_id"], how="left", maintain_order="left")
            .drop("shelf_id")
        )

    def _rate_parts(self, frame: pl.DataFrame, from_col: str, to_col: str) -> pl.DataFrame:
        """Attach the first direct (``_direct``) and inverse (``_inverse``) quote of each
        row's pair, joined on (snapshot, from, to) as separate keys: currencies are free
        text (§3), so no separator joined into one key could keep two pairs apart."""
        if self.one_market:
            snapshot, quotes, keyed = [], self._only(self.fx, "market_snapshot_id"), frame
        else:
            snapshot, quotes = ["market_snapshot_id"], self.fx
            keyed = frame.join(self.run_keys.select("run", "market_snapshot_id"), on="run", how="left", maintain_order="left")
        for quote_from, quote_to, out in (("fx_from", "fx_to", "_direct"), ("fx_to", "fx_from", "_inverse")):
            quote = quotes.select(*snapshot, pl.col(quote_from).alias("_quote_from"), pl.col(quote_to).alias("_quote_to"), pl.col("fx_rate").alias(out))
            keyed = keyed.join(quote, left_on=[*snapshot, from_col, to_col], right_on=[*snapshot, "_quote_from", "_quote_to"],
                               how="left", maintain_order="left", coalesce=True)
        keyed = keyed.drop(snapshot)
        return keyed.with_columns(
            (pl.col(from_col) == pl.col(to_col)).alias("_same"),
            (pl.col("_direct").is_not_null() & (pl.col("_direct") != 0)).alias("_use_direct"),
            (pl.col("_inverse").is_not_null() & (pl.col("_inverse") != 0)).alias("_use_inverse"),
        )

    def with_attributes(self, frame: pl.DataFrame) -> pl.DataFrame:
        """One row per shelf attribute of each (run, instrument) row of ``frame``: attribute,
        value, attr_seq (instruments without attributes drop out)."""
        if self.one_shelf:
            return frame.join(self._only(self.attributes, "shelf_id"), on="instrument_id", how="inner")
        return (
            frame.join(self.run_keys.select("run", "shelf_id"), on="run", how="left", maintain_order="left")
            .join(self.attributes, on=["shelf_id", "instrument_id"], how="inner")
            .drop("shelf_id")
        )

    def attribute_names(self, runs: pl.DataFrame) -> pl.DataFrame:
        """(run, attribute) for every attribute any entry of the run's shelf carries."""
        names = self.attributes.select("shelf_id", "attribute").unique()
        return runs.select("run").join(self.run_keys.select("run", "shelf_id"), on="run").join(names, on="shelf_id").drop("shelf_id")

    def with_rate(self, frame: pl.DataFrame, from_col: str, to_col: str, out: str) -> pl.DataFrame:
        """Attach ``out`` = rate(from → to) per §6.1: 1.0 for equal currencies, else the
        first direct pair if non-zero, else 1.0 / the first inverse pair if non-zero,
        else null (missing)."""
        return self._per_pair(frame, from_col, to_col, out, self._rate_rows)

    def with_rate_f28(self, frame: pl.DataFrame, from_col: str, to_col: str, out: str) -> pl.DataFrame:
        """Like ``with_rate`` but as an exact 28-digit F28 (inverse pairs rounded as the
        reference rounds them)."""
        return self._per_pair(frame, from_col, to_col, out, self._rate_f28_rows)

    def _per_pair(self, frame: pl.DataFrame, from_col: str, to_col: str, out: str, rate) -> pl.DataFrame:
        """With one market snapshot a rate depends on the currency pair alone: look each
        row's pair up in a table of every pair of the snapshot's quoted currencies, rated
        once per shard (``_pair_rates``), instead of building a key and joining quotes
        for every row. The look-up is a gather at (from, to)'s position in that table, the
        currencies read as codes of an Enum of the quoted ones (a two-string join hashes
        both per row, ~1.5x the time). A pair with a currency the snapshot never quotes
        has no rate unless its currencies are equal (1.0); a null currency matches no
        pair: null rate."""
        tables = self._pair_rates(rate) if self.one_market and from_col != to_col else None
        if tables is None:
            return rate(frame, from_col, to_col, out)
        table, one, quoted = tables
        codes = frame.select(
            pl.col(from_col).cast(quoted, strict=False).to_physical().cast(pl.UInt32).alias("_from"),
            pl.col(to_col).cast(quoted, strict=False).to_physical().cast(pl.UInt32).alias("_to"),
        )
        if codes["_from"].null_count() == frame[from_col].null_count() and codes["_to"].null_count() == frame[to_col].null_count():
            n = len(quoted.categories)
            rates = table.get_column("_rate").gather(codes.select(pl.col("_from") * n + pl.col("_to")).to_series())
            rates = codes.select(pl.when(pl.col("_from") == pl.col("_to")).then(pl.lit(one)).otherwise(rates).alias(out))
        else:  # a currency the snapshot does not quote: its pairs have no rate, or 1.0 when equal
            keys = frame.select(pl.col(from_col).alias("_from"), pl.col(to_col).alias("_to"))
            rates = keys.join(table, on=["_from", "_to"], how="left", maintain_order="left").select(
                pl.when(pl.col("_from") == pl.col("_to")).then(pl.lit(one)).otherwise(pl.col("_rate")).alias(out)
            )
        return frame.drop(out, strict=False).hstack(rates.get_columns())

    def _pair_rates(self, rate) -> tuple[pl.DataFrame, pl.Series, pl.Enum] | None:
        """(_from, _to, _rate) for every ordered pair of the one snapshot's quoted
        currencies, rated by ``rate``, row i × n + j holding the pair of the i-th and j-th
        of the ``n`` quoted currencies in text order; the rate of a pair of equal
        currencies; and the Enum of the quoted currencies. Built once per Market and rate
        kind (a shard asks ~11 times, on up to 470,000 rows). None when some pair's rate
        leaves the fixed point (the inverse of a quote below 1e-18): then each look-up
        rates its own rows, and only a portfolio that reads that rate fails."""
        cache = self._pair_rate_cache
        if rate.__name__ not in cache:
            quoted = self._only(self.fx, "market_snapshot_id")
            currencies = pl.concat([quoted["fx_from"], quoted["fx_to"]]).unique().sort().alias("_from")
            enum = pl.Enum(currencies.to_list())
            pairs = currencies.to_frame().join(currencies.alias("_to").to_frame(), how="cross")
            try:
                rated = rate(pairs, "_from", "_to", "_rate")
            except ENGINE_FAILURES as exc:
                if not is_overflow(exc):
                    raise
                cache[rate.__name__] = None
                return None
            table = rated.sort(
                pl.col("_from").cast(enum).to_physical().cast(pl.UInt32) * currencies.len() + pl.col("_to").cast(enum).to_physical().cast(pl.UInt32)
            )
            one = rate(pl.DataFrame({"_from": ["XXX"], "_to": ["XXX"]}), "_from", "_to", "_rate")["_rate"]  # XXX: ISO 4217 "no currency"
            cache[rate.__name__] = (table, one, enum)
        return cache[rate.__name__]

    def _rate_rows(self, frame: pl.DataFrame, from_col: str, to_col: str, out: str) -> pl.DataFrame:
        keyed = self._rate_parts(frame, from_col, to_col)
        rate = (
            pl.when(pl.col("_same")).then(lit("1.0"))
            .when(pl.col("_use_direct")).then(pl.col("_direct"))
            .when(pl.col("_use_inverse")).then(lit("1.0") / positive_or_null("_inverse"))
            .otherwise(None)
            .cast(DEC)
        )

        def rated() -> pl.DataFrame:
            return keyed.with_columns(rate.alias(out)).drop("_direct", "_inverse", "_same", "_use_direct", "_use_inverse")

        if "run" not in keyed.columns:  # the shard's table of pairs: an overflow there falls back to per-row look-ups
            return rated()
        inverted = pl.when(~pl.col("_same") & ~pl.col("_use_direct") & pl.col("_use_inverse")).then(1.0 / as_f64("_inverse"))
        return naming_overflows(rated, keyed, self.run_keys, inverted, pl.format(
            "the rate {} to {}, the inverse of the FX quote {}/{} at {},", from_col, to_col, to_col, from_col, units_text("_inverse")))

    def _rate_f28_rows(self, frame: pl.DataFrame, from_col: str, to_col: str, out: str) -> pl.DataFrame:
        keyed = self._rate_parts(frame, from_col, to_col).with_columns(
            lit(1).alias("_one"), pl.col("_inverse").fill_null(lit(1)), pl.col("_direct").fill_null(lit(1)),
        )
        keyed = dec28.from_dec(keyed, "_one", "_one_f")
        keyed = dec28.from_dec(keyed, "_direct", "_direct_f")
        keyed = dec28.from_dec(keyed, "_inverse", "_inverse_f")
        keyed = dec28.div(keyed, "_one_f", "_inverse_f", "_inverted_f")
        rate = (
            pl.when(pl.col("_same")).then(pl.col("_one_f"))
            .when(pl.col("_use_direct")).then(pl.col("_direct_f"))
            .when(pl.col("_use_inverse")).then(pl.col("_inverted_f"))
            .otherwise(None)
        )
        return keyed.with_columns(rate.alias(out)).drop(
            "_direct", "_inverse", "_same", "_use_direct", "_use_inverse", "_one", "_one_f", "_direct_f", "_inverse_f", "_inverted_f"
        )


def _with_run_by_block(frame: pl.DataFrame, snap: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``frame`` whose ``portfolio_snapshot_id`` one run of ``snap`` (run,
    portfolio_snapshot_id; each id once) reads, that run's number first in place of the
    id. A book keeps each portfolio's rows together, so the id is looked up once per block
    of equal ids and spread over the block: a join of every row on the string key costs
    several times more (a shard's 438,000 positions: ~19 ms against ~5 ms, sorted)."""
    block = frame.select(pl.col("portfolio_snapshot_id").rle_id()).to_series()
    ids = frame.get_column("portfolio_snapshot_id").filter(block.ne_missing(block.shift(1))).to_frame()
    run = ids.join(snap, on="portfolio_snapshot_id", how="left", maintain_order="left").get_column("run").gather(block)
    out = frame.drop("portfolio_snapshot_id").insert_column(0, run)
    return out.filter(pl.col("run").is_not_null()) if run.null_count() else out


def prepare(book: Book) -> Prepared:
    """Number the runs and fan each run's holdings and model out to it."""
    runs = (
        book.portfolios.sort("seq")
        .with_row_index("run")
        .with_columns(pl.col("run").cast(RUN))
    )
    snap = runs.select("run", "portfolio_snapshot_id")
    one_run_each = snap["portfolio_snapshot_id"].n_unique() == snap.height

    def per_run(frame: pl.DataFrame, seq_name: str) -> pl.DataFrame:
        frame = frame.rename({"seq": seq_name})
        if one_run_each:
            return _with_run_by_block(frame, snap).pipe(sort_rows, "run", seq_name)
        return (  # a snapshot that several runs read: its rows fan out to each
            snap.join(frame, on="portfolio_snapshot_id", how="inner")
            .drop("portfolio_snapshot_id")
            .pipe(sort_rows, "run", seq_name)
        )

    positions = per_run(book.positions, "pos_seq")
    positions = positions.with_columns(pl.int_range(positions.height, dtype=SLOT, eager=True).alias("slot"))
    cash = per_run(book.cash, "cash_seq")
    lots = per_run(book.lots, "lot_seq")
    model = (
        runs.select("run", "model_id")
        .join(book.models.rename({"seq": "model_seq", "weight": "model_weight"}), on="model_id", how="inner")
        .drop("model_id")
        .pipe(sort_rows, "run", "model_seq")
    )
    model = model.with_columns(_model_slots(runs, positions, book.models, model).alias("slot"))
    prices = (
        book.prices.sort("seq")
        .unique(["market_snapshot_id", "instrument_id"], keep="first", maintain_order=True)
        .select(
            "market_snapshot_id", "instrument_id", "price",
            pl.col("currency").alias("price_currency"), pl.col("as_of").alias("price_as_of"),
        )
    )
    fx = _quoted_pairs(book.fx_rates.sort("seq").unique(["market_snapshot_id", "pair"], keep="first", maintain_order=True))
    shelf = (
        book.shelf.sort("seq")
        .unique(["shelf_id", "instrument_id"], keep="first", maintain_order=True)
        .drop("seq")
    )
    market = Market(
        run_keys=runs.select("run", "run_key", "market_snapshot_id", "shelf_id", "base_currency"),
        one_market=runs["market_snapshot_id"].n_unique() == 1,
        one_shelf=runs["shelf_id"].n_unique() == 1,
        prices=prices,
        fx=fx,
        shelf=shelf,
        attributes=book.shelf_attributes.sort("seq").with_columns(
            pl.col("seq").rank("ordinal").over("shelf_id", "instrument_id").cast(pl.Int64).alias("attr_seq")
        ).drop("seq"),
    )
    return Prepared(runs=runs, positions=positions, cash=cash, lots=lots, model=model, market=market)


def _quoted_pairs(quotes: pl.DataFrame) -> pl.DataFrame:
    """(market_snapshot_id, fx_from, fx_to, fx_rate): the conversions each quote's pair
    text names. The reference looks a conversion up as the text "FROM/TO" (§6.1), and
    currency codes are not checked for their format (§3): a pair of two slashes is the
    text of two conversions ("USD/S/GD": USD to S/GD and USD/S to GD), a pair without a
    slash of none. Two quotes of one snapshot never name the same conversion: their
    texts differ. (A snapshot's quotes are a few hundred rows: one split per slash costs
    nothing a shard notices.)"""
    parts = pl.col("pair").str.split("/")
    return quotes.with_columns(pl.int_ranges(1, pl.col("pair").str.count_matches("/", literal=True) + 1).alias("_at")).explode(
        "_at", empty_as_null=False).select(
        "market_snapshot_id",
        parts.list.head(pl.col("_at")).list.join("/").alias("fx_from"),
        parts.list.slice(pl.col("_at")).list.join("/").alias("fx_to"),
        pl.col("rate").alias("fx_rate"),
    )


def _model_slots(runs: pl.DataFrame, positions: pl.DataFrame, models: pl.DataFrame, model: pl.DataFrame) -> pl.Series:
    """The holding slot of each row of ``model``: the slot of the run's position in the
    same instrument, else a slot of its own after every position's.

    A slot names one (run, instrument) of the shard, so later stages join holdings,
    weights, trades and after-state moves on one integer instead of hashing (run,
    instrument_id) again and again. The position of each model row is found by looking
    each position up in the book's models (a few hundred rows, not one row per run and
    target): ``model`` holds each run's targets as one block in model order, so a target's
    row is its run's first model row plus its rank within the model."""
    base = positions.height
    slots = pl.int_range(base, base + model.height, dtype=SLOT, eager=True)
    if model.height == 0 or positions.height == 0:
        return slots
    rank = models.select(
        "model_id", "instrument_id", (pl.col("seq").rank("ordinal").over("model_id") - 1).cast(SLOT).alias("_rank")
    )
    starts = model.with_row_index("_first").filter((pl.col("run") != pl.col("run").shift(1)).fill_null(True)).select("run", "_first")
    held = (
        positions.select("run", "instrument_id", "slot")
        .pipe(join_runs, runs.select("run", "model_id"))
        .join(rank, on=["model_id", "instrument_id"], how="inner")
        .pipe(join_runs, starts, how="inner")
    )
    return slots.scatter(held["_first"] + held["_rank"], held["slot"])
