"""Market look-ups: the single-snapshot fast paths give what the general joins give."""
from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from dpm_vec.io import read_book
from dpm_vec.oracle import simulate as oracle_simulate
from dpm_vec.simulate import simulate_outcomes
from dpm_vec.stages.prepare import _quoted_pairs, prepare

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_book"


@pytest.fixture(scope="module")
def prepared():
    p = prepare(read_book(SAMPLE))
    assert p.market.one_market and p.market.one_shelf  # the sample book reads one of each
    return p


def _same(fast: pl.DataFrame, general: pl.DataFrame) -> None:
    assert fast.columns == general.columns
    key = [c for c in ("run", "pos_seq", "model_seq", "cash_seq") if c in fast.columns]
    assert fast.sort(key).equals(general.sort(key))


def test_fast_and_general_lookups_agree(prepared):
    fast = prepared.market
    general = replace(fast, one_market=False, one_shelf=False)
    positions, model = prepared.positions, prepared.model
    _same(fast.with_price(positions), general.with_price(positions))
    _same(fast.with_shelf(model), general.with_shelf(model))
    _same(fast.with_shelf(positions, ("status",)), general.with_shelf(positions, ("status",)))
    held = fast.with_price(positions).join(fast.run_keys.select("run", "base_currency"), on="run")
    _same(fast.with_rate(held, "price_currency", "base_currency", "rate"), general.with_rate(held, "price_currency", "base_currency", "rate"))
    _same(fast.with_attributes(model).sort("run", "model_seq", "attribute"), general.with_attributes(model).sort("run", "model_seq", "attribute"))


def test_fast_path_ignores_other_snapshots(prepared):
    """Prices of a snapshot no run reads must not leak into the instrument-only join."""
    market = prepared.market
    decoy = market.prices.with_columns(pl.lit("OTHER_SNAPSHOT").alias("market_snapshot_id"), pl.col("price") * 2)
    polluted = replace(market, prices=pl.concat([decoy, market.prices]))
    priced = polluted.with_price(prepared.positions)
    assert priced.height == prepared.positions.height
    _same(priced, market.with_price(prepared.positions))


def test_rates_cover_direct_inverse_and_same_currency(prepared):
    market = prepared.market
    snapshot = market.run_keys["market_snapshot_id"][0]
    pairs = market.fx.filter(pl.col("market_snapshot_id") == snapshot).head(1)
    src, dst, rate = pairs.row(0)[1:4]
    frame = pl.DataFrame({"run": [0, 0, 0], "a": [src, dst, src], "b": [dst, src, src]}, schema={"run": pl.UInt32, "a": pl.String, "b": pl.String})
    out = market.with_rate(frame, "a", "b", "r")["r"].to_list()
    assert out[0] == rate and out[2] == 1
    reverse = market.fx.filter((pl.col("market_snapshot_id") == snapshot) & (pl.col("fx_from") == dst) & (pl.col("fx_to") == src))
    if reverse.height:  # quoted both ways: the direct quote wins
        assert out[1] == reverse["fx_rate"][0]
    else:  # 1 / rate, to DEC precision
        assert abs(out[1] * rate - 1) < Decimal("1e-15")


def test_rates_per_pair_match_rates_per_row(prepared):
    """One snapshot: each distinct pair is rated once and joined back. Every row (repeated
    pairs, same currency, a currency without quotes, null) gets what rating it alone gives,
    in its own place, and a stale ``out`` column is replaced, not duplicated. An unquoted
    currency against itself is 1.0, against a quoted one null."""
    fast = prepared.market
    general = replace(fast, one_market=False)
    snapshot = fast.run_keys["market_snapshot_id"][0]
    quoted = fast.fx.filter(pl.col("market_snapshot_id") == snapshot)
    src, dst = quoted["fx_from"][0], quoted["fx_to"][0]
    a = [src, dst, src, "XXX", None, dst, src, None, "ZZZ", src]
    b = [dst, src, src, src, dst, dst, dst, None, "ZZZ", "ZZZ"]
    frame = pl.DataFrame({"run": [0] * len(a), "a": a, "b": b, "r": [Decimal(7)] * len(a)},
                         schema={"run": pl.UInt32, "a": pl.String, "b": pl.String, "r": pl.Decimal(38, 20)})
    fast_rates, row_rates = fast.with_rate(frame, "a", "b", "r"), general.with_rate(frame, "a", "b", "r")
    assert fast_rates.columns == ["run", "a", "b", "r"] and fast_rates.equals(row_rates)
    assert fast_rates["r"].null_count() == 4  # XXX and ZZZ against quoted currencies, and both null pairs
    assert fast_rates["r"][8] == 1
    assert fast.with_rate_f28(frame, "a", "b", "f").equals(general.with_rate_f28(frame, "a", "b", "f"))


def test_a_pair_text_of_several_slashes_names_each_conversion_it_spells():
    """Currency codes are free text (§3) and a conversion is looked up as "FROM/TO"
    (§6.1): "USD/S/GD" is both USD → S/GD and USD/S → GD; "USDEUR" names none; the first
    quote of a pair text wins."""
    quotes = pl.DataFrame({
        "market_snapshot_id": ["md"] * 5,
        "pair": ["EUR/USD", "USD/S/GD", "USDEUR", "A/B/C/D", "EUR/USD"],
        "rate": [Decimal("1.1"), Decimal("1.35"), Decimal("9"), Decimal("2"), Decimal("1.2")],
    }, schema_overrides={"rate": pl.Decimal(38, 20)})
    pairs = _quoted_pairs(quotes.unique(["market_snapshot_id", "pair"], keep="first", maintain_order=True))
    assert sorted((f, t, float(r)) for _, f, t, r in pairs.rows()) == [
        ("A", "B/C/D", 2.0), ("A/B", "C/D", 2.0), ("A/B/C", "D", 2.0), ("EUR", "USD", 1.1), ("USD", "S/GD", 1.35), ("USD/S", "GD", 1.35)]


def _one_instrument_request(base: str, price_currency: str, pair: str, rate: str) -> dict:
    """10 units of US_EQ at 100 ``price_currency`` and 1000 ``base`` of cash, half of it to
    US_EQ by the model; one FX quote, ``pair`` at ``rate``."""
    return {
        "portfolio_snapshot": {"portfolio_id": "pf", "base_currency": base, "positions": [{"instrument_id": "US_EQ", "quantity": "10"}],
                               "cash_balances": [{"currency": base, "amount": "1000"}]},
        "market_data_snapshot": {"prices": [{"instrument_id": "US_EQ", "price": "100", "currency": price_currency}],
                                 "fx_rates": [{"pair": pair, "rate": rate}]},
        "model_portfolio": {"targets": [{"instrument_id": "US_EQ", "weight": "0.5"}]},
        "shelf_entries": [{"instrument_id": "US_EQ", "status": "APPROVED"}],
        "options": {},
    }


def test_a_slashed_currency_is_rated_as_the_reference_looks_it_up():
    request = _one_instrument_request("S/GD", "USD", "USD/S/GD", "1.35")
    engine, oracle = simulate_outcomes([request])[0], oracle_simulate(request)
    assert engine["status"] == oracle["status"] == "READY"
    assert engine["diagnostics"]["data_quality"]["fx_missing"] == []
    assert [(i["intent_type"], i.get("pair")) for i in engine["intents"]] == [(i["intent_type"], i.get("pair")) for i in oracle["intents"]]


def test_currencies_with_any_character_are_told_apart_in_a_batch():
    """A batch reads one market snapshot per request, so its rates are looked up by
    (snapshot, from, to). Currencies are free text (§3): X → Y\x1fZ must not take the
    quote of the pair X\x1fY/Z, which spells the same text with a separator between."""
    request = _one_instrument_request("Y\x1fZ", "X", "X\x1fY/Z", "2")
    alone, oracle = simulate_outcomes([request])[0], oracle_simulate(request)
    in_batch = simulate_outcomes([request, request])
    for engine in (alone, *in_batch):
        assert engine["status"] == oracle["status"] == "BLOCKED"
        assert engine["diagnostics"]["data_quality"]["fx_missing"] == oracle["diagnostics"]["data_quality"]["fx_missing"] == ["X/Y\x1fZ"]


@pytest.mark.parametrize("bad_data", [False, True])
def test_holding_slots_name_one_run_and_instrument(bad_data):
    """A model row shares its slot with the run's position in the same instrument (found
    through the book's few model rows, not by hashing every (run, instrument)), and every
    other model row gets a slot no position has: slot joins must equal (run,
    instrument_id) joins. The bad-data book has runs with unknown models."""
    from dpm_vec.book import make_book
    from dpm_vec.generate import generate_book_frames

    frames = generate_book_frames(300, 11, bad_data=bad_data, holdings=(3, 12))
    # reverse the book's model rows: a model's targets are then not contiguous in file order
    frames["models"] = frames["models"].reverse()
    p = prepare(make_book(**frames))
    assert p.positions["slot"].to_list() == list(range(p.positions.height))
    by_pair = p.model.join(p.positions.select("run", "instrument_id", pl.col("slot").alias("_held")),
                           on=["run", "instrument_id"], how="left", maintain_order="left")
    held = by_pair.filter(pl.col("_held").is_not_null())
    assert held.height > 0 and (held["slot"] == held["_held"]).all()
    unheld = by_pair.filter(pl.col("_held").is_null())["slot"]
    assert unheld.len() > 0 and unheld.min() >= p.positions.height and unheld.n_unique() == unheld.len()


@pytest.mark.parametrize("shuffled", [False, True])
def test_holdings_fan_out_to_runs_as_the_join_gives_them(shuffled):
    """Each run's holding rows, found once per block of equal snapshot ids, are the rows a
    join on the id gives, in (run, sequence) order: rows of one snapshot split into several
    blocks (a shuffled file), ids of no run and null ids drop out, and a snapshot read
    by several runs (scenarios) fans its rows out to each."""
    from dpm_vec.book import make_book
    from dpm_vec.generate import generate_book_frames
    from dpm_vec.stages.prepare import _with_run_by_block

    frames = generate_book_frames(120, 5, holdings=(2, 9))
    positions = frames["positions"]
    positions = positions.with_columns(  # a snapshot no portfolio reads, and a row with no snapshot
        pl.when(pl.int_range(pl.len()) % 17 == 3).then(pl.lit("NO_SUCH_SNAPSHOT"))
        .when(pl.int_range(pl.len()) == 5).then(None).otherwise(pl.col("portfolio_snapshot_id")).alias("portfolio_snapshot_id"))
    frames["positions"] = positions.sample(fraction=1.0, shuffle=True, seed=7) if shuffled else positions
    book = make_book(**frames)
    runs = book.portfolios.sort("seq").with_row_index("run").with_columns(pl.col("run").cast(pl.UInt32))
    snap = runs.select("run", "portfolio_snapshot_id")
    joined = snap.join(book.positions, on="portfolio_snapshot_id", how="inner").drop("portfolio_snapshot_id").sort("run", "seq")
    by_block = _with_run_by_block(book.positions, snap).sort("run", "seq")
    assert by_block.equals(joined) and 0 < joined.height < book.positions.height
    if shuffled:  # several blocks per snapshot
        assert book.positions["portfolio_snapshot_id"].rle_id().max() + 1 > book.positions["portfolio_snapshot_id"].n_unique()

    p = prepare(book)
    assert p.positions.drop("slot").equals(joined.rename({"seq": "pos_seq"}).select(p.positions.drop("slot").columns))
    # two runs of one snapshot (scenarios): the join fans the rows out to both
    twice = make_book(**{**frames, "portfolios": pl.concat([frames["portfolios"], frames["portfolios"].head(1).with_columns(
        pl.lit("RUN_TWICE").alias("run_key"))])})
    fanned = prepare(twice).positions
    first = twice.portfolios["portfolio_snapshot_id"][0]
    n_rows = twice.positions.filter(pl.col("portfolio_snapshot_id") == first).height
    assert n_rows > 0 and fanned.height == p.positions.height + n_rows
