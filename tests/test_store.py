"""The DuckDB run store (RFC-0001 §8) against a real database file."""
from __future__ import annotations

import threading
from datetime import datetime

import duckdb
import pytest

from dpm_vec.store import DuplicateRunId, IdempotencyConflict, RunStore, StoreError

PAYLOAD = {"rebalance_run_id": "rr_00000001", "status": "READY", "intents": [{"quantity": "37"}], "z": None, "a": 1}


def test_save_lookup_get_and_persistence_across_reopen(tmp_path):
    path = tmp_path / "runs" / "store.duckdb"
    store = RunStore(path)
    run, inserted = store.save("key-1", "h1", "READY", PAYLOAD)
    assert inserted and run.id == "rr_00000001" and run.payload == PAYLOAD
    assert store.lookup("key-1") == ("h1", PAYLOAD)
    assert store.lookup("other") is None
    store.close()
    with pytest.raises(StoreError):
        store.lookup("key-1")

    with RunStore(str(path)) as again:
        assert again.lookup("key-1") == ("h1", PAYLOAD)
        got = again.get("rr_00000001")
        assert got.idempotency_key == "key-1" and got.request_hash == "h1" and got.status == "READY"
        assert list(got.payload) == list(PAYLOAD)  # key order kept: replay is byte-identical
        assert isinstance(got.created_at, datetime)
        assert again.get("rr_missing") is None
        assert again.count() == 1

    con = duckdb.connect(str(path), read_only=True)
    cols = [r[0] for r in con.execute("DESCRIBE rebalance_runs").fetchall()]
    con.close()
    assert cols == ["id", "idempotency_key", "request_hash", "status", "payload", "created_at"]


def test_same_key_same_hash_is_a_replay_of_the_first_run(tmp_path):
    store = RunStore(tmp_path / "s.duckdb")
    first, inserted = store.save("k", "h", "READY", {"v": 1}, run_id="rr_a")
    assert inserted
    second, inserted = store.save("k", "h", "BLOCKED", {"v": 2}, run_id="rr_b")
    assert not inserted
    assert second.id == "rr_a" and second.payload == {"v": 1} and second.status == "READY"
    assert store.get("rr_b") is None and store.count() == 1
    store.close()


def test_same_key_other_hash_is_a_conflict(tmp_path):
    store = RunStore(tmp_path / "s.duckdb")
    store.save("k", "h1", "READY", {"v": 1}, run_id="rr_a")
    with pytest.raises(IdempotencyConflict) as info:
        store.save("k", "h2", "READY", {"v": 2}, run_id="rr_b")
    assert info.value.stored_hash == "h1" and info.value.request_hash == "h2"
    assert store.count() == 1
    store.close()


def test_a_run_is_stored_under_the_given_id_else_its_payloads_else_a_fresh_one(tmp_path):
    """The id a replay answers with is the one stored: a given ``run_id`` wins over the
    payload's ``rebalance_run_id``, which wins over a fresh id."""
    store = RunStore(tmp_path / "s.duckdb")
    given, _ = store.save("k1", "h", "READY", {"rebalance_run_id": "rr_payload1"}, run_id="rr_given01")
    from_payload, _ = store.save("k2", "h", "READY", {"rebalance_run_id": "rr_payload2"})
    fresh, _ = store.save("k3", "h", "READY", {"v": 3})
    assert (given.id, from_payload.id) == ("rr_given01", "rr_payload2")
    assert fresh.id.startswith("rr_") and fresh.id not in ("rr_given01", "rr_payload2")
    assert [store.lookup_run(k).id for k in ("k1", "k2", "k3")] == ["rr_given01", "rr_payload2", fresh.id]
    store.close()


def test_keys_and_ids_are_unique(tmp_path):
    store = RunStore(tmp_path / "s.duckdb")
    store.save("k1", "h", "READY", {}, run_id="rr_a")
    with pytest.raises(DuplicateRunId):
        store.save("k2", "h", "READY", {}, run_id="rr_a")
    run, inserted = store.save("k2", "h", "READY", {})  # no id given: a fresh one
    assert inserted and run.id.startswith("rr_") and len(run.id) == 11
    # the database itself enforces the unique key, not only the store's check
    with pytest.raises(duckdb.ConstraintException):
        store._con.execute("INSERT INTO rebalance_runs VALUES ('rr_z', 'k1', 'h', 'READY', '{}', now())")
    store.close()


def test_in_memory_store():
    store = RunStore(None)
    store.save("", "h", "BLOCKED", {"x": "é"})
    assert store.lookup("") == ("h", {"x": "é"})
    store.close()


def test_concurrent_saves_from_threads(tmp_path):
    """8 threads race on one shared key with the same hash, one more races on it with a
    different hash, and 8 write their own keys: one save of the shared key wins, every
    racer with the winner's hash gets the winner's run, and the others a conflict."""
    store = RunStore(tmp_path / "s.duckdb")
    barrier = threading.Barrier(17)
    outcomes: dict[int, tuple] = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        key = "shared" if i < 8 or i == 16 else f"own-{i}"
        request_hash = "h2" if i == 16 else "h"
        barrier.wait()
        try:
            outcome = ("saved", store.save(key, request_hash, "READY", {"i": i}, run_id=f"rr_{i:08d}"))
        except IdempotencyConflict as exc:
            outcome = ("conflict", exc)
        except Exception as exc:  # noqa: BLE001 - any other failure fails the assertions below
            outcome = ("error", exc)
        with lock:
            outcomes[i] = outcome

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [o for o in outcomes.values() if o[0] == "error"], outcomes
    assert all(outcomes[i][0] == "saved" and outcomes[i][1][1] for i in range(8, 16))  # own keys: each inserted
    racers = {i: outcomes[i] for i in (*range(8), 16)}
    inserted = [i for i, (kind, res) in racers.items() if kind == "saved" and res[1]]
    assert len(inserted) == 1
    winner = inserted[0]
    winner_hash = "h2" if winner == 16 else "h"
    for i, (kind, res) in racers.items():
        if ("h2" if i == 16 else "h") == winner_hash:
            assert kind == "saved" and res[0].id == f"rr_{winner:08d}", (i, racers[i])
        else:
            assert kind == "conflict", (i, racers[i])
    assert store.count() == 1 + 8
    assert store.lookup("shared")[0] == winner_hash
    store.close()


def test_a_file_duckdb_reads_as_data_is_refused_not_kept_in_memory(tmp_path):
    """duckdb.connect opens an existing Parquet (or CSV, JSON) file as an in-memory
    database with a view of it: the runs would vanish at a restart and no file lock would
    keep a second server out, so such a path is refused by name."""
    import polars as pl

    data = tmp_path / "runs.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(data)
    with pytest.raises(StoreError, match=f"cannot open run store {data}: not a DuckDB database file"):
        RunStore(data)
    store = RunStore(tmp_path / "runs.duckdb")  # a new path still becomes a file-backed store
    store.save("k", "h", "READY", {"i": 1})
    store.close()
    assert RunStore(tmp_path / "runs.duckdb").lookup("k") == ("h", {"i": 1})


def test_a_runs_table_of_another_layout_is_refused_at_open(tmp_path):
    """Another tool's rebalance_runs table: named at start, not a 500 on every request."""
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE rebalance_runs (id INTEGER, note VARCHAR)")
    con.close()
    with pytest.raises(StoreError) as caught:
        RunStore(path)
    assert str(caught.value) == (
        f"cannot open run store {path}: its table rebalance_runs has columns id INTEGER, note VARCHAR; a run store's are "
        "id VARCHAR, idempotency_key VARCHAR, request_hash VARCHAR, status VARCHAR, payload JSON, "
        "created_at TIMESTAMP WITH TIME ZONE (RFC-0001 §8.1)")


def test_a_runs_table_with_the_right_names_but_another_type_is_refused_at_open(tmp_path):
    """Names alone are not the layout: a payload kept as VARCHAR or a created_at without a
    time zone would read back as text or naive times, so such a table is refused too."""
    path = tmp_path / "typed.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE rebalance_runs (id VARCHAR PRIMARY KEY, idempotency_key VARCHAR NOT NULL UNIQUE, "
                "request_hash VARCHAR NOT NULL, status VARCHAR NOT NULL, payload VARCHAR NOT NULL, "
                "created_at TIMESTAMP NOT NULL)")
    con.close()
    with pytest.raises(StoreError, match="payload VARCHAR, created_at TIMESTAMP; a run store's are"):
        RunStore(path)
