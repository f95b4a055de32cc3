"""Join instances in a SQLite file (WAL; a commit survives a process crash).

The file may be the service's inbox file (the tables do not clash) and may be shared
by the replicas of a service on one host: ``arrive`` runs in one ``BEGIN IMMEDIATE``
transaction, so two processes recording the last two arrivals of a join at once
cannot both complete it. Calls run on a dedicated thread so the event loop never
blocks on disk or on another process's lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from choreograph._sqlite import connect_wal
from choreograph.errors import StoreError
from choreograph.stores.joins_base import Arrival, JoinKey, JoinState, JoinStore
from choreograph.stores.sqlite import sqlite_store_path

T = TypeVar("T")

def join_tables(prefix: str = "") -> str:
    """The join tables (``<prefix>join_instances``, ``<prefix>join_arrivals``) for SQLite.

    The join store's own file uses no prefix; a service database (``joins_database``) uses
    ``choreograph_`` beside the service's tables.
    """
    return _SCHEMA_TEMPLATE.replace("join_", prefix + "join_")


_SCHEMA_TEMPLATE = """
CREATE TABLE IF NOT EXISTS join_instances (
    grp TEXT NOT NULL, name TEXT NOT NULL, correlation TEXT NOT NULL,
    slots INTEGER NOT NULL, created_by TEXT NOT NULL, created_at REAL NOT NULL, deadline REAL,
    fired_by TEXT, timed_out INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, name, correlation)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS join_instances_age ON join_instances (created_at);
CREATE TABLE IF NOT EXISTS join_arrivals (
    grp TEXT NOT NULL, name TEXT NOT NULL, correlation TEXT NOT NULL, slot INTEGER NOT NULL,
    event_id TEXT NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (grp, name, correlation, slot)
) WITHOUT ROWID;
"""
_SCHEMA = join_tables()

EXPIRED = "created_at < $1 AND (deadline IS NULL OR deadline < $1)"
"""The instances ``expire(older_than)`` drops (``$1``): created before it, and past their deadline
if they have one (an instance still waiting for its deadline is kept whatever its age: its timer
must find it to announce the timeout)."""


def _state(db: sqlite3.Connection, key: JoinKey) -> JoinState | None:
    row: Any = db.execute(
        "SELECT slots, created_by, created_at, deadline, fired_by, timed_out FROM join_instances "
        "WHERE grp=? AND name=? AND correlation=?",
        (key.group, key.join, key.correlation),
    ).fetchone()
    if row is None:
        return None
    arrivals = {
        int(slot): Arrival(event_id, bytes(body))
        for slot, event_id, body in db.execute(
            "SELECT slot, event_id, body FROM join_arrivals WHERE grp=? AND name=? AND correlation=?",
            (key.group, key.join, key.correlation),
        )
    }
    slots, created_by, created_at, deadline, fired_by, timed_out = row
    return JoinState(int(slots), arrivals, created_by, float(created_at),
                     None if deadline is None else float(deadline), fired_by, bool(timed_out))


def _transaction(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        db.execute("COMMIT")
        return result
    except BaseException:
        db.execute("ROLLBACK")
        raise


class SQLiteJoinStore(JoinStore):
    """``SQLiteJoinStore("sqlite:///var/shipping.db")``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = sqlite_store_path(url, "join store URL")
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-joins")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._db is None:
                raise StoreError(f"join store {self.url} is not open")
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"join store {self.url}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        if self._db is not None:
            return

        def connect() -> sqlite3.Connection:
            return connect_wal(self.path, schema=_SCHEMA)

        try:
            self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        except sqlite3.Error as exc:
            raise StoreError(f"join store {self.url}: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=False)

    async def arrive(
        self, key: JoinKey, slot: int, arrival: Arrival, *, slots: int, now: float, deadline: float | None
    ) -> JoinState:
        ident = (key.group, key.join, key.correlation)

        def write(db: sqlite3.Connection) -> JoinState:
            def body() -> JoinState:
                db.execute(
                    "INSERT OR IGNORE INTO join_instances (grp, name, correlation, slots, created_by, created_at, "
                    "deadline) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*ident, slots, arrival.event_id, now, deadline),
                )
                row: Any = db.execute(
                    "SELECT slots, fired_by, timed_out FROM join_instances WHERE grp=? AND name=? AND correlation=?",
                    ident,
                ).fetchone()
                if row[1] is None and not row[2]:
                    stored = db.execute(
                        "INSERT OR IGNORE INTO join_arrivals VALUES (?, ?, ?, ?, ?, ?)",
                        (*ident, slot, arrival.event_id, arrival.body),
                    ).rowcount
                    if stored:
                        (count,) = db.execute(
                            "SELECT count(*) FROM join_arrivals WHERE grp=? AND name=? AND correlation=?", ident
                        ).fetchone()
                        if count == row[0]:
                            db.execute(
                                "UPDATE join_instances SET fired_by=? WHERE grp=? AND name=? AND correlation=?",
                                (arrival.event_id, *ident),
                            )
                state = _state(db, key)
                assert state is not None
                return state

            return _transaction(db, body)

        return await self._run(write)

    async def get(self, key: JoinKey) -> JoinState | None:
        def read(db: sqlite3.Connection) -> JoinState | None:
            # One read transaction: the instance and its arrivals from one snapshot (autocommit
            # would read them in two, and another process's arrival or expiry between them
            # would give a full instance that has not fired, or arrivals without their instance).
            db.execute("BEGIN")
            try:
                return _state(db, key)
            finally:
                db.execute("COMMIT")

        return await self._run(read)

    async def time_out(self, key: JoinKey) -> JoinState | None:
        def write(db: sqlite3.Connection) -> JoinState | None:
            def body() -> JoinState | None:
                db.execute(
                    "UPDATE join_instances SET timed_out=1 WHERE grp=? AND name=? AND correlation=? "
                    "AND fired_by IS NULL",
                    (key.group, key.join, key.correlation),
                )
                return _state(db, key)

            return _transaction(db, body)

        return await self._run(write)

    async def expire(self, older_than: float) -> int:
        def write(db: sqlite3.Connection) -> int:
            def body() -> int:
                db.execute(
                    "DELETE FROM join_arrivals WHERE (grp, name, correlation) IN "
                    f"(SELECT grp, name, correlation FROM join_instances WHERE {EXPIRED.replace('$1', '?')})",
                    (older_than, older_than),
                )
                return db.execute(f"DELETE FROM join_instances WHERE {EXPIRED.replace('$1', '?')}",
                                  (older_than, older_than)).rowcount

            return _transaction(db, body)

        return await self._run(write)
