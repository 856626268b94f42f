"""The benchmark harness's results file: a partial or repeated run merges into it
without mixing rows of one book size from different runs."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import polars as pl

_SPEC = importlib.util.spec_from_file_location("bench_run", Path(__file__).resolve().parents[1] / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _row(portfolios: int, mode: str, wall: float) -> dict:
    return {"portfolios": portfolios, "mode": mode, "wall_s": wall}


def test_a_remeasured_size_replaces_all_its_rows_and_keeps_other_sizes():
    old = {"when": "old", "machine": "m", "scaling": [
        _row(1_000, "2 threads", 1.0), _row(1_000, "default: 2 threads", 1.1), _row(100_000, "2 threads", 30.0),
    ], "features": [{"feature": "baseline", "wall_s": 5.0}, {"feature": "solver", "wall_s": 7.0}]}
    new = {"when": "new", "machine": "m", "scaling": [_row(1_000, "default: 2 threads", 0.9), _row(10_000, "default: 2 threads", 5.0)],
           "features": [{"feature": "solver", "wall_s": 6.0}]}
    merged = bench.merge_results(old, new)
    assert [(r["portfolios"], r["mode"], r["wall_s"]) for r in merged["scaling"]] == [
        (1_000, "default: 2 threads", 0.9),  # the old "2 threads" row of 1k is gone: not measured by this run
        (10_000, "default: 2 threads", 5.0),
        (100_000, "2 threads", 30.0),  # a size this run did not measure keeps its rows
    ]
    assert [r.get("measured_at") for r in merged["scaling"]] == ["new", "new", None]
    assert [(r["feature"], r["wall_s"]) for r in merged["features"]] == [("baseline", 5.0), ("solver", 6.0)]
    assert merged["when"] == "new"


def test_the_large_portfolio_row_merges_by_book_and_renders_its_shards():
    large = {"portfolios": 16_000, "holdings_per_portfolio": 500, "holding_rows": 8_000_000, "shard_size": 1_520, "shards": 11,
             "mode": "2 processes", "wall_s": 26.9, "peak_rss_mib": 4443.0}
    merged = bench.merge_results({"when": "old", "machine": "m", "large": [{**large, "wall_s": 51.3}]},
                                 {"when": "new", "machine": "m", "large": [large]})
    assert [(r["wall_s"], r["measured_at"]) for r in merged["large"]] == [(26.9, "new")]
    table = bench.markdown({**merged, "machine": "m"})
    assert "| 16,000 × 500 holdings | 8,000,000 | 2 processes (11 × 1,520) | 26.9 | 4,443 |" in table


def test_cost_per_row_rows_render_the_mode_they_ran_in():
    """Rows measured as the command runs by default name their mode and shards; rows from
    before they were recorded (two shard threads) say so instead of failing the table."""
    new = {"holdings_per_portfolio": 10, "portfolios": 50_000, "holding_rows": 500_000, "target_rows": 1_395_521,
           "mode": "2 processes", "shards": 8, "shard_size": 6_250, "wall_s": 7.9, "us_per_holding_row": 15.8,
           "us_per_target_row": 5.7, "peak_rss_mib": 1287.0}
    old = {key: value for key, value in {**new, "holdings_per_portfolio": 50, "portfolios": 10_000}.items()
           if key not in ("mode", "shards", "shard_size")}
    table = bench.markdown({"when": "new", "machine": "m", "holdings": [new, old]})
    assert "| 10 | 50,000 | 500,000 | 1,395,521 | 2 processes (8 × 6,250) | 7.9 | 15.8 | 5.7 | 1,287 |" in table
    assert "| 50 | 10,000 | 500,000 | 1,395,521 | 2 threads | 7.9 | 15.8 | 5.7 | 1,287 |" in table


def test_a_cached_book_from_another_generator_or_arguments_is_written_afresh(tmp_path, monkeypatch):
    """Books were cached by name alone: one written by an older generator (another weight
    dtype, no snapshots table), or a smaller one under the name, was timed as this one."""
    monkeypatch.setattr(bench, "BOOKS", tmp_path)
    path = bench.book(12, seed=3, holdings=(2, 3))
    stamp = path.with_name(path.name + ".generator")
    assert stamp.read_text() == bench.generator_fingerprint(12, 3, (2, 3)) != bench.generator_fingerprint(12, 3, (2, 4))
    marker = path / "portfolios.parquet"
    before = marker.stat().st_mtime_ns
    assert bench.book(12, seed=3, holdings=(2, 3)) == path and marker.stat().st_mtime_ns == before
    stamp.write_text("an older generator")
    bench.book(12, seed=3, holdings=(2, 3))
    assert stamp.read_text() == bench.generator_fingerprint(12, 3, (2, 3))
    assert marker.stat().st_mtime_ns != before and pl.read_parquet(marker).height == 12


def test_a_timed_sweep_is_checked_against_the_book_and_its_rows_are_stamped(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BOOKS", tmp_path / "books")
    monkeypatch.setattr(bench, "OUT", tmp_path / "out")
    path = bench.book(12, seed=3, holdings=(2, 3))
    sweep = bench.timed_sweep(path)
    assert sweep["manifest"]["portfolios"] == 12 and sweep["peak_rss_mib"] > 0
    row = bench.stamped({"portfolios": 12})
    assert set(row) == {"portfolios", "measured_at", "engine", "machine"} and "cores" in row["machine"]
    merged = bench.merge_results({}, {"when": "run start", "machine": "m", "scaling": [{**row, "mode": "default"}]})
    assert merged["scaling"][0]["measured_at"] == row["measured_at"]  # its own time, not the run's start


def test_the_engine_stamp_is_dirty_for_engine_changes_not_for_the_results_it_writes(tmp_path, monkeypatch):
    """A second run of the harness must not stamp its rows ``+dirty`` because the first
    rewrote results.json; a changed or new engine file must."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.email=b@example.com", "-c", "user.name=bench", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "dpm_vec").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "dpm_vec" / "engine.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results.json").write_text("{}\n")
    (tmp_path / "benchmarks" / "README.md").write_text("figures\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "base")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    commit = bench.engine_revision()
    assert commit and not commit.endswith("+dirty")
    (tmp_path / "benchmarks" / "results.json").write_text('{"when": "now"}\n')
    (tmp_path / "benchmarks" / "README.md").write_text("new figures\n")
    assert bench.engine_revision() == commit
    (tmp_path / "dpm_vec" / "new_stage.py").write_text("y = 2\n")
    assert bench.engine_revision() == commit + "+dirty"
    (tmp_path / "dpm_vec" / "new_stage.py").unlink()
    (tmp_path / "dpm_vec" / "engine.py").write_text("x = 2\n")
    assert bench.engine_revision() == commit + "+dirty"
