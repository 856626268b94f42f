"""A DuckDB-backed run store: RFC-0001 §8 persistence and idempotency.

Table ``rebalance_runs`` (RFC-0001 §8.1)::

    id               VARCHAR PRIMARY KEY   -- the rebalance_run_id
    idempotency_key  VARCHAR NOT NULL UNIQUE
    request_hash     VARCHAR NOT NULL      -- SHA-256 of the canonical request
    status           VARCHAR NOT NULL      -- READY | PENDING_REVIEW | BLOCKED
    payload          JSON NOT NULL         -- the response body, exactly as served
    created_at       TIMESTAMPTZ NOT NULL

Idempotency (RFC-0001 §8.2): :meth:`RunStore.save` is an atomic insert-if-absent keyed by
the idempotency key. When the key is new the run is stored; when it exists with the same
request hash the stored run is returned (a replay: the first writer wins, so two concurrent
requests with one key get one answer); when it exists with another hash
:class:`IdempotencyConflict` is raised.

One DuckDB connection per store, guarded by a lock, so a store may be shared by threads.
A file-backed store can be opened by one process at a time (DuckDB's own file lock).
"""

from __future__ import annotations

import functools
import json
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from dpm_vec.errors import DpmVecError

SCHEMA = """
CREATE TABLE IF NOT EXISTS rebalance_runs (
    id VARCHAR PRIMARY KEY,
    idempotency_key VARCHAR NOT NULL UNIQUE,
    request_hash VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    payload JSON NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
)
"""

_COLUMNS = "id, idempotency_key, request_hash, status, payload, created_at"
_LAYOUT_SQL = ("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'rebalance_runs' "
               "AND table_schema = current_schema() ORDER BY ordinal_position")


@functools.cache
def _layout() -> list[tuple[str, str]]:
    """The columns and types ``SCHEMA`` makes, as DuckDB spells them (from a scratch database)."""
    con = duckdb.connect(":memory:")
    con.execute(SCHEMA)
    return con.execute(_LAYOUT_SQL).fetchall()


class StoreError(DpmVecError):
    """The run store could not do what was asked."""


class IdempotencyConflict(StoreError):
    """The idempotency key is already stored with a different request hash."""

    def __init__(self, idempotency_key: str, stored_hash: str, request_hash: str):
        self.idempotency_key, self.stored_hash, self.request_hash = idempotency_key, stored_hash, request_hash
        super().__init__(
            f"Idempotency-Key {idempotency_key!r} was already used with a different request "
            f"(stored hash {stored_hash[:12]}..., this request {request_hash[:12]}...)"
        )


class DuplicateRunId(StoreError):
    """The run id is already stored (under another idempotency key)."""


@dataclass(frozen=True)
class StoredRun:
    id: str
    idempotency_key: str
    request_hash: str
    status: str
    payload: dict
    created_at: datetime


def new_run_id() -> str:
    """``rr_`` + 8 random lowercase hex digits (the reference's format)."""
    return "rr_" + uuid.uuid4().hex[:8]


class RunStore:
    """Runs keyed by id and by idempotency key. ``path=None`` gives an in-memory store."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(self.path if self.path is not None else ":memory:")
        except duckdb.Error as exc:
            raise StoreError(f"cannot open run store {self.path or ':memory:'}: {exc}") from exc
        self._lock = threading.Lock()
        with self._lock:
            if self.path is not None:
                self._check_file_backed()
            self._con.execute(SCHEMA)
            self._check_layout()

    def _check_file_backed(self) -> None:
        """DuckDB opens an existing Parquet, CSV or JSON file as an in-memory database with
        a view of it: runs stored there would vanish at a restart and no lock would keep a
        second server out."""
        (path,) = self._con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
        if path is None:
            self._con.close()
            raise StoreError(f"cannot open run store {self.path}: not a DuckDB database file (DuckDB reads it as data, in "
                             "memory, so no run would outlive the server); give a new path or a DuckDB file")

    def _check_layout(self) -> None:
        """A ``rebalance_runs`` table of another layout (another tool's, an older one's) is
        refused at start, not met as a 500 on every request."""
        found = self._con.execute(_LAYOUT_SQL).fetchall()
        if found != _layout():
            self._con.close()
            raise StoreError(f"cannot open run store {self.path or ':memory:'}: its table rebalance_runs has columns "
                             f"{', '.join(f'{n} {t}' for n, t in found)}; a run store's are "
                             f"{', '.join(f'{n} {t}' for n, t in _layout())} (RFC-0001 §8.1)")

    # -- reads ---------------------------------------------------------------------------
    def lookup(self, idempotency_key: str) -> tuple[str, dict] | None:
        """``(request_hash, payload)`` stored under the key, or None."""
        run = self._one("WHERE idempotency_key = ?", [idempotency_key])
        return None if run is None else (run.request_hash, run.payload)

    def lookup_run(self, idempotency_key: str) -> StoredRun | None:
        return self._one("WHERE idempotency_key = ?", [idempotency_key])

    def get(self, run_id: str) -> StoredRun | None:
        return self._one("WHERE id = ?", [run_id])

    def count(self) -> int:
        with self._lock:
            return self._con.execute("SELECT count(*) FROM rebalance_runs").fetchone()[0]

    def _one(self, where: str, params: list) -> StoredRun | None:
        with self._lock:
            self._check_open()
            row = self._con.execute(f"SELECT {_COLUMNS} FROM rebalance_runs {where}", params).fetchone()
        return None if row is None else _run(row)

    # -- writes --------------------------------------------------------------------------
    def save(
        self,
        idempotency_key: str,
        request_hash: str,
        status: str,
        payload: dict,
        run_id: str | None = None,
    ) -> tuple[StoredRun, bool]:
        """Insert the run unless the key is stored; returns ``(stored run, inserted)``.

        ``inserted`` is False when the key was already stored with the same request hash
        (the stored run, not this one, is returned: replay). Raises IdempotencyConflict when
        it was stored with another hash, and DuplicateRunId when ``run_id`` is taken.
        ``run_id`` defaults to ``payload["rebalance_run_id"]``, else a fresh id.
        """
        if not isinstance(idempotency_key, str):
            raise StoreError("idempotency_key must be a string")
        run_id = run_id or payload.get("rebalance_run_id") or new_run_id()
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        created = datetime.now(timezone.utc)
        with self._lock:
            self._check_open()
            row = self._con.execute(
                f"SELECT {_COLUMNS} FROM rebalance_runs WHERE idempotency_key = ?", [idempotency_key]
            ).fetchone()
            if row is not None:
                existing = _run(row)
                if existing.request_hash != request_hash:
                    raise IdempotencyConflict(idempotency_key, existing.request_hash, request_hash)
                return existing, False
            if self._con.execute("SELECT 1 FROM rebalance_runs WHERE id = ?", [run_id]).fetchone():
                raise DuplicateRunId(f"run id {run_id!r} is already stored")
            self._con.execute(
                "INSERT INTO rebalance_runs VALUES (?, ?, ?, ?, ?, ?)",
                [run_id, idempotency_key, request_hash, status, text, created],
            )
        return StoredRun(run_id, idempotency_key, request_hash, status, json.loads(text), created), True

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def _check_open(self) -> None:
        if self._con is None:
            raise StoreError("run store is closed")

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run(row) -> StoredRun:
    run_id, key, request_hash, status, payload, created = row
    if isinstance(payload, str):
        payload = json.loads(payload)
    return StoredRun(run_id, key, request_hash, status, payload, created)
