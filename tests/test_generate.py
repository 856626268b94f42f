"""Synthetic book generator: determinism, shard invariance, realism and data faults."""

from __future__ import annotations

from decimal import Decimal

import polars as pl
import pytest

from dpm_vec.book import OPTIONAL_TABLES, SHELF_STATUSES, TABLES, make_book, table_schema
from dpm_vec.generate import BAD_MODEL_ID, generate_book_frames, max_holdings, write_generated_book
from dpm_vec.io import write_book

SEED = 20250630
PER_PORTFOLIO = ("portfolios", "positions", "cash", "lots", "group_constraints", "overdraft_limits")
SHARED = ("prices", "fx_rates", "shelf", "shelf_attributes", "models")


@pytest.fixture(scope="module")
def book() -> dict[str, pl.DataFrame]:
    return generate_book_frames(400, SEED)


@pytest.fixture(scope="module")
def bad_book() -> dict[str, pl.DataFrame]:
    return generate_book_frames(3000, SEED, bad_data=True)


def _rates_to_base(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """(currency, base_currency, rate_f) for every pair quoted either way (no triangulation)."""
    fx = frames["fx_rates"].select(
        pl.col("pair").str.split("/").list.get(0).alias("currency"),
        pl.col("pair").str.split("/").list.get(1).alias("base_currency"),
        pl.col("rate").cast(pl.Float64).alias("rate_f"),
    )
    inverse = fx.select(
        pl.col("base_currency").alias("currency"), pl.col("currency").alias("base_currency"), (1 / pl.col("rate_f")).alias("rate_f")
    )
    return pl.concat([fx, inverse])


def _faults(frames: dict[str, pl.DataFrame]) -> dict[str, set[str]]:
    """Portfolio ids showing each kind of per-portfolio data fault."""
    pf = frames["portfolios"].select("portfolio_id", "base_currency", "model_id")
    priced = frames["prices"].select("instrument_id")
    no_price = frames["positions"].join(priced, on="instrument_id", how="anti")
    rates = _rates_to_base(frames).select("currency", "base_currency")
    cash = frames["cash"].join(pf, left_on="portfolio_snapshot_id", right_on="portfolio_id")
    no_fx = cash.filter(pl.col("currency") != pl.col("base_currency")).join(
        rates, on=["currency", "base_currency"], how="anti"
    )
    unshelved_targets = frames["models"].join(frames["shelf"].select("instrument_id"), on="instrument_id", how="anti")
    unshelved = pf.join(unshelved_targets.select("model_id").unique(), on="model_id", how="semi")
    return {
        "no_price": set(no_price["portfolio_snapshot_id"]),
        "no_fx": set(no_fx["portfolio_snapshot_id"]),
        "unshelved_target": set(unshelved["portfolio_id"]),
    }


def test_columns_and_dtypes_follow_book_tables(book):
    """Every book column in its dtype, but cash ``amount_exact``, which only an amount past
    20 decimals fills (every generated amount has two)."""
    assert set(book) == set(TABLES)
    for table, frame in book.items():
        expected = {k: v for k, v in table_schema(table).items() if (table, k) != ("cash", "amount_exact")}
        assert dict(frame.schema) == expected, table
    assert make_book(**book).cash["amount_exact"].null_count() == book["cash"].height


def test_deterministic(book):
    again = generate_book_frames(400, SEED)
    for table in TABLES:
        assert book[table].equals(again[table]), table
    other = generate_book_frames(400, SEED + 1)
    assert not book["positions"].equals(other["positions"])
    assert not book["prices"].equals(other["prices"])


def test_shard_invariance():
    whole = generate_book_frames(200, SEED, bad_data=True)
    first = generate_book_frames(100, SEED, bad_data=True)
    second = generate_book_frames(100, SEED, bad_data=True, start=100)
    for table in PER_PORTFOLIO:
        assert whole[table].equals(pl.concat([first[table], second[table]])), table
    for table in SHARED:
        assert whole[table].equals(first[table]) and whole[table].equals(second[table]), table
    ids = whole["portfolios"]["portfolio_id"]
    assert ids[0] == "PF0000000" and ids[-1] == "PF0000199"
    assert second["portfolios"]["portfolio_id"][0] == "PF0000100"


def test_shelf_has_every_status_and_realistic_universe(book):
    shelf = book["shelf"]
    assert set(shelf["status"]) == set(SHELF_STATUSES)
    approved = (shelf["status"] == "APPROVED").mean()
    assert 0.75 < approved < 0.95
    assert set(shelf["asset_class"]) == {"EQUITY", "FIXED_INCOME", "FUND", "ALTERNATIVE"}
    assert "NOTIONAL" in set(shelf["trade_by"])
    assert shelf["settlement_days"].is_between(1, 3).all()
    assert shelf["min_notional_amount"].is_not_null().any()
    assert shelf["instrument_id"].is_unique().all()
    prices = book["prices"]
    assert prices.height > 2000
    assert set(prices["currency"]) == {"USD", "EUR", "GBP", "CHF", "SGD", "HKD", "JPY"}
    scale = prices.select(
        (pl.col("price") * 100 == (pl.col("price") * 100).cast(pl.Int64).cast(pl.Decimal(38, 20))).all()
    ).item()
    assert scale  # at most 2 dp
    jpy = prices.filter(pl.col("currency") == "JPY")
    assert (jpy["price"] == jpy["price"].cast(pl.Int64).cast(pl.Decimal(38, 20))).all()
    attrs = set(book["shelf_attributes"]["attribute"])
    assert {"sector", "region"} <= attrs


def test_holdings_count_in_range(book):
    counts = book["positions"].group_by("portfolio_snapshot_id").len()
    assert counts.height == book["portfolios"].height
    assert counts["len"].min() >= 30 and counts["len"].max() <= 80
    small = generate_book_frames(50, SEED, holdings=(5, 10))
    counts = small["positions"].group_by("portfolio_snapshot_id").len()["len"]
    assert counts.min() >= 5 and counts.max() <= 10
    positions = book["positions"]
    assert positions.select(pl.struct("portfolio_snapshot_id", "instrument_id").is_unique().all()).item()
    assert (positions["quantity"] == positions["quantity"].cast(pl.Int64).cast(pl.Decimal(38, 20))).all()
    assert (positions["quantity"] >= 1).all()


def test_holdings_mostly_from_model(book):
    pos = book["positions"].join(
        book["portfolios"].select("portfolio_id", "model_id"), left_on="portfolio_snapshot_id", right_on="portfolio_id"
    )
    on_model = pos.join(book["models"], on=["model_id", "instrument_id"], how="semi").height
    assert 0.3 < on_model / pos.height < 0.8


def test_total_values_in_range(book):
    rates = _rates_to_base(book)
    pf = book["portfolios"].select(pl.col("portfolio_id").alias("portfolio_snapshot_id"), "base_currency")
    pos = (
        book["positions"]
        .join(book["prices"].select("instrument_id", "price", "currency"), on="instrument_id")
        .join(pf, on="portfolio_snapshot_id")
        .join(rates, on=["currency", "base_currency"], how="left")
        .select(
            "portfolio_snapshot_id",
            value=pl.col("quantity").cast(pl.Float64)
            * pl.col("price").cast(pl.Float64)
            * pl.col("rate_f").fill_null(1.0),
        )
    )
    cash = (
        book["cash"]
        .join(pf, on="portfolio_snapshot_id")
        .join(rates, on=["currency", "base_currency"], how="left")
        .select("portfolio_snapshot_id", value=pl.col("amount").cast(pl.Float64) * pl.col("rate_f").fill_null(1.0))
    )
    totals = pl.concat([pos, cash]).group_by("portfolio_snapshot_id").agg(pl.col("value").sum())["value"]
    assert totals.min() > 80_000 and totals.max() < 25_000_000
    assert totals.max() > 5_000_000  # spread over the whole range


def test_lots_sum_to_position_quantity(book):
    lots = book["lots"]
    positions = book["positions"]
    share = lots.select("portfolio_snapshot_id", "instrument_id").unique().height / positions.height
    assert 0.12 < share < 0.3
    sums = lots.group_by("portfolio_snapshot_id", "instrument_id").agg(pl.col("quantity").sum().alias("lot_qty"))
    joined = sums.join(positions, on=["portfolio_snapshot_id", "instrument_id"], how="left")
    assert joined["quantity"].null_count() == 0
    assert (joined["lot_qty"] == joined["quantity"]).all()
    assert (lots["quantity"] > 0).all()
    assert lots["lot_id"].is_unique().all()
    assert lots["purchase_date"].str.contains(r"^\d{4}-\d{2}-\d{2}$").all()
    assert (lots["unit_cost"] > 0).all()


def test_models(book):
    models = book["models"]
    sums = models.group_by("model_id").agg(pl.col("weight").sum().alias("total"), pl.len().alias("n"))
    assert (sums["total"] <= Decimal(1)).all()
    assert (sums["total"] == Decimal(1)).any() and (sums["total"] < Decimal(1)).any()
    regular = sums.filter(pl.col("model_id") != BAD_MODEL_ID)
    assert regular["n"].min() >= 15 and regular["n"].max() <= 40
    bps = models["weight"] * 10_000
    assert (bps == bps.cast(pl.Int64).cast(pl.Decimal(38, 20))).all()  # 4 dp
    assert set(book["portfolios"]["model_id"]) <= set(models["model_id"])


def test_fx_coverage_for_good_portfolios(book):
    assert not any(_faults(book).values())
    rates = _rates_to_base(book).select("currency", "base_currency")
    pf = book["portfolios"].select(pl.col("portfolio_id").alias("portfolio_snapshot_id"), "base_currency")
    inst_ccy = book["positions"].join(book["prices"], on="instrument_id").select("portfolio_snapshot_id", "currency")
    used = pl.concat([inst_ccy, book["cash"].select("portfolio_snapshot_id", "currency")]).join(
        pf, on="portfolio_snapshot_id"
    )
    foreign = used.filter(pl.col("currency") != pl.col("base_currency"))
    assert foreign.height > 0
    assert foreign.join(rates, on=["currency", "base_currency"], how="anti").height == 0
    pairs = book["fx_rates"]["pair"].to_list()
    assert "EUR/USD" in pairs and "USD/JPY" in pairs  # quoted both ways from a USD base
    assert set(book["portfolios"]["base_currency"]) == {"SGD", "USD", "EUR", "CHF", "GBP"}
    assert book["cash"]["portfolio_snapshot_id"].n_unique() == book["portfolios"].height


def test_bad_data_faults(bad_book):
    faults = _faults(bad_book)
    n = bad_book["portfolios"].height
    for kind, ids in faults.items():
        assert len(ids) >= 1, kind
    bad = set().union(*faults.values())
    assert 0.002 * n <= len(bad) <= 0.03 * n
    clean = generate_book_frames(3000, SEED)
    assert not any(_faults(clean).values())
    # everything else about a good portfolio is unchanged by bad_data
    good = bad_book["portfolios"].filter(~pl.col("portfolio_id").is_in(list(bad)))
    assert good.equals(clean["portfolios"].filter(~pl.col("portfolio_id").is_in(list(bad))))


def test_policy_columns_vary(book):
    pf = book["portfolios"]
    assert pf["single_position_max_weight"].is_not_null().any()
    assert pf["single_position_max_weight"].is_null().any()
    assert pf["cash_band_min_weight"].is_not_null().any()
    assert pf["min_cash_buffer_pct"].is_not_null().any()
    assert (pf["suppress_dust_trades"] == False).any()  # noqa: E712
    assert (pf["run_key"] == pf["portfolio_id"]).all()
    assert book["group_constraints"].height > 0 and book["overdraft_limits"].height > 0
    keys = book["group_constraints"]["constraint_key"]
    assert keys.str.contains(r"^[^:]+:[^:]+$").all()


def test_write_book_roundtrip(tmp_path, book):
    out = tmp_path / "books" / "b1"
    write_book(book, out)
    for table, frame in book.items():
        path = out / f"{table}.parquet"
        if frame.height == 0 and table in OPTIONAL_TABLES:  # an empty optional table is not written
            assert not path.exists(), table
            continue
        assert path.exists(), table
        assert pl.read_parquet(path).equals(frame), table
    smaller = generate_book_frames(5, SEED)
    write_book(smaller, out)  # replaces the directory as a whole
    assert pl.read_parquet(out / "portfolios.parquet").height == 5
    assert sorted(p.name for p in (tmp_path / "books").iterdir()) == ["b1"]


def test_vectorised_hash_matches_python_reference():
    from dpm_vec.generate import _hash, _hash_py

    frame = pl.DataFrame({"a": [0, 1, 12345, 999_999], "b": [5, 6, 7, 80]})
    got = frame.select(h=_hash(SEED, "stream", "a", "b"))["h"].to_list()
    assert got == [_hash_py(SEED, "stream", a, b) for a, b in frame.iter_rows()]
    assert len(set(got)) == 4


def test_chunked_writer_equals_one_shot(tmp_path):
    """The bounded-memory writer gives the same tables as generating all at once."""
    write_generated_book(tmp_path / "chunked", 25, 7, holdings=(3, 6), chunk=7)
    whole = generate_book_frames(25, 7, holdings=(3, 6))
    for table in ("portfolios", "positions", "cash", "lots", "prices", "models"):
        assert pl.read_parquet(tmp_path / "chunked" / f"{table}.parquet").equals(whole[table]), table


def test_per_portfolio_rows_are_unique_and_cash_adds_up(book):
    """A portfolio's cash has one row per currency, none in its base currency twice; a
    run's group constraints name each key once; settled + pending is the amount; JPY cash
    is whole yen. Catches a foreign balance drawn in the base or the other foreign
    currency, a constraint drawn twice, and a cash column on the wrong scale."""
    cash = book["cash"]
    assert cash.select(pl.struct("portfolio_snapshot_id", "currency").is_unique().all()).item()
    foreign = cash.join(book["portfolios"].select("portfolio_id", "base_currency"), left_on="portfolio_snapshot_id",
                        right_on="portfolio_id").filter(pl.col("currency") != pl.col("base_currency"))
    assert foreign.height > 0 and foreign["portfolio_snapshot_id"].n_unique() < book["portfolios"].height
    constraints = book["group_constraints"]
    assert constraints.select(pl.struct("run_key", "constraint_key").is_unique().all()).item()
    assert constraints["run_key"].n_unique() < constraints.height  # some run has two constraints
    settled = cash.filter(pl.col("settled").is_not_null())
    assert settled.height > 0 and (settled["settled"] + settled["pending"] == settled["amount"]).all()
    jpy = cash.filter(pl.col("currency") == "JPY")
    assert jpy.height > 0 and (jpy["amount"] == jpy["amount"].cast(pl.Int64).cast(pl.Decimal(38, 20))).all()


def test_every_portfolio_holds_an_instrument_off_its_model():
    """Model targets fill at most k - 1 of a portfolio's k holdings: one is always off the
    model (the slot a no-price fault takes). Small portfolios would otherwise often hold
    only model targets."""
    frames = generate_book_frames(200, SEED, holdings=(2, 4))
    pos = frames["positions"].join(frames["portfolios"].select("portfolio_id", "model_id"),
                                   left_on="portfolio_snapshot_id", right_on="portfolio_id")
    off = pos.join(frames["models"], on=["model_id", "instrument_id"], how="anti")
    assert off["portfolio_snapshot_id"].n_unique() == frames["portfolios"].height


def test_bad_data_marks_about_one_portfolio_in_a_hundred(bad_book):
    """--bad-data puts a fault into ~1% of portfolios (BAD_PORTFOLIO_RATE), not 2 or 3%."""
    n = bad_book["portfolios"].height
    bad = set().union(*_faults(bad_book).values())
    assert 0.005 * n <= len(bad) <= 0.015 * n


def test_shard_invariance_across_the_fast_sort_bound():
    """Positions are ordered by a packed key while every portfolio index is below 2**24,
    by two keys above: a block that crosses the bound equals its two halves."""
    start = (1 << 24) - 1
    whole = generate_book_frames(2, SEED, start=start, holdings=(3, 6))
    halves = [generate_book_frames(1, SEED, start=start + i, holdings=(3, 6)) for i in (0, 1)]
    for table in PER_PORTFOLIO:
        assert whole[table].equals(pl.concat([h[table] for h in halves])), table


def test_negative_count_or_start_is_refused():
    """A negative start would hash negative portfolio indices; it is refused up front."""
    for n, start in ((-1, 0), (1, -1)):
        with pytest.raises(ValueError, match="non-negative"):
            generate_book_frames(n, SEED, start=start)
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        generate_book_frames(1, SEED, holdings=(0, 3))


def test_book_covers_the_engine_cases_it_is_meant_to(book):
    """The generator's documented variety reaches the book: ETFs beside mutual funds (with
    an older NAV date), broker market values, lots costed in the base currency, overdrawn
    cash, TRUST_SNAPSHOT valuation, consent only where required, model targets that are not
    APPROVED, home-currency model targets, JPY minimum notionals in yen, USD equities at
    T+1, and FX rates below 10 quoted to 6 decimals."""
    assert set(book["shelf_attributes"].filter(pl.col("attribute") == "product_type")["value"]) == {"ETF", "MUTUAL_FUND"}
    assert book["prices"]["as_of"].n_unique() == 2
    assert book["positions"]["market_value"].is_not_null().any()
    lots = book["lots"].join(book["prices"].select("instrument_id", "currency"), on="instrument_id")
    assert (lots["cost_currency"] != lots["currency"]).any()
    assert (book["cash"]["amount"] < 0).any()
    pf = book["portfolios"]
    assert (pf["valuation_mode"] == "TRUST_SNAPSHOT").any()
    consent = pf.filter(pl.col("client_consent_already_obtained"))
    assert consent.height > 0 and consent["workflow_requires_client_consent"].fill_null(False).all()
    shelf = book["shelf"]
    targets = book["models"].join(shelf.select("instrument_id", "status"), on="instrument_id")
    assert set(targets["status"]) == set(SHELF_STATUSES)
    home = (book["models"].filter(pl.col("model_id") != BAD_MODEL_ID)
            .join(book["prices"].select("instrument_id", "currency"), on="instrument_id")
            .group_by("model_id").agg(home=(pl.col("currency") == pl.col("model_id").str.split("_").list.get(2)).sum()))
    assert (home["home"] > 0).all()
    assert (shelf.filter(pl.col("min_notional_currency") == "JPY")["min_notional_amount"] >= 100_000).all()
    equities = shelf.filter(pl.col("asset_class") == "EQUITY").join(book["prices"].select("instrument_id", "currency"), on="instrument_id")
    assert equities.select((pl.col("settlement_days") == pl.when(pl.col("currency") == "USD").then(1).otherwise(2)).all()).item()
    small = book["fx_rates"].filter(pl.col("rate") < 10)
    assert ((small["rate"] * 10**6).cast(pl.Int64) % 100 != 0).any()


def test_a_book_of_no_portfolios_has_every_table(tmp_path):
    """--portfolios 0 (allowed) writes the shared tables and empty per-portfolio ones."""
    write_generated_book(tmp_path / "empty", 0, 7, holdings=(3, 6), chunk=7)
    whole = generate_book_frames(0, 7, holdings=(3, 6))
    for table in PER_PORTFOLIO + SHARED:
        assert pl.read_parquet(tmp_path / "empty" / f"{table}.parquet").equals(whole[table]), table
    assert whole["portfolios"].height == 0 and whole["prices"].height > 0


def test_holdings_are_distinct_over_a_large_book():
    """Off-model holdings walk a prime-sized pool with a step of 1..P-1: a step of 0 (one
    portfolio in a few thousand) would hold the same instrument again and again. 20,000
    small portfolios draw enough steps to see one."""
    positions = generate_book_frames(20_000, SEED, holdings=(6, 8))["positions"]
    assert positions.select(pl.struct("portfolio_snapshot_id", "instrument_id").is_unique().all()).item()


def test_an_unpriced_holding_gets_a_plausible_quantity(bad_book):
    """A no-price holding (NP...) is sized as if priced at 100, not left at the floor of 1."""
    unpriced = bad_book["positions"].filter(pl.col("instrument_id").str.starts_with("NP"))
    assert unpriced.height > 0 and (unpriced["quantity"] > 1).all()


def test_holdings_up_to_the_pool_are_distinct_and_more_are_refused(tmp_path):
    """Off-model holdings walk a pool of ``max_holdings(seed)`` instruments: portfolios of
    that many hold each instrument once; one more would hold one twice, and every
    portfolio of such a book was blocked INVALID_HOLDINGS without a word, so it is refused
    up front, by the CLI in one line and before any folder is made."""
    from dpm_vec.cli import main
    from dpm_vec.errors import DpmVecError

    most = max_holdings(SEED)
    assert 1_000 < most < 10_000
    positions = generate_book_frames(3, SEED, holdings=(most, most))["positions"]
    assert positions.group_by("portfolio_snapshot_id").len()["len"].to_list() == [most] * 3
    assert positions.select(pl.struct("portfolio_snapshot_id", "instrument_id").is_unique().all()).item()
    with pytest.raises(ValueError, match=f"at most {most} for seed {SEED}"):
        generate_book_frames(1, SEED, holdings=(1, most + 1))
    with pytest.raises(DpmVecError, match=f"--max-holdings can be at most {most:,} for seed {SEED}"):
        write_generated_book(tmp_path / "book", 2, SEED, holdings=(most + 1, most + 1))
    assert main(["generate", "--portfolios", "2", "--max-holdings", "100000", "--out", str(tmp_path / "book")]) == 2
    assert not (tmp_path / "book").exists()
