"""A service database on a SQLite file: state, inbox and outbox in one file, one writer at a time.

``sqlite:///var/pkg.db?relay_lease=10&synchronous=NORMAL``

Two connections, each on its own thread so the event loop never blocks on disk or
on another process's lock:

* the **transaction connection** runs user transactions one at a time per process
  (an asyncio lock: SQLite has a single writer anyway). ``BEGIN IMMEDIATE`` is sent
  with the first statement, so the write lock is taken up front and two processes
  never deadlock upgrading a read lock;
* the **auxiliary connection** serves the worker: inbox lookups, failure history,
  relay claims and marking rows sent.

Relay claims are a lease row per service (``choreograph_relay``): the holder renews
it when half of ``relay_lease`` seconds is left; a killed holder's lease lapses and a
standby relay takes over. Because writers are serialised, ``seq`` order is commit order.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import orjson

from choreograph.errors import ConfigurationError, StoreError
from choreograph.stores.base import ErrorInfo
from choreograph.stores.sqlite import sqlite_path
from choreograph.stores.state import OutboxLag, RelayPublish, Row, StateStore, TxConnection
from choreograph.transports.base import Message

T = TypeVar("T")

#: Versioned, append-only: step i is version i + 1 of component "state" (statements run in one transaction).
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE IF NOT EXISTS choreograph_inbox (
            grp TEXT NOT NULL, event_id TEXT NOT NULL, processed_at REAL NOT NULL,
            PRIMARY KEY (grp, event_id)) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS choreograph_inbox_age ON choreograph_inbox (processed_at)",
        """CREATE TABLE IF NOT EXISTS choreograph_failures (
            grp TEXT NOT NULL, event_id TEXT NOT NULL, first_error TEXT NOT NULL, first_at REAL NOT NULL,
            PRIMARY KEY (grp, event_id)) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS choreograph_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, event_id TEXT NOT NULL,
            type TEXT NOT NULL, body BLOB NOT NULL, created_at REAL NOT NULL, sent_at REAL)""",
        "CREATE INDEX IF NOT EXISTS choreograph_outbox_pending ON choreograph_outbox (service, seq)"
        " WHERE sent_at IS NULL",
        "CREATE INDEX IF NOT EXISTS choreograph_outbox_sent ON choreograph_outbox (sent_at)"
        " WHERE sent_at IS NOT NULL",
        """CREATE TABLE IF NOT EXISTS choreograph_relay (
            service TEXT PRIMARY KEY, owner TEXT NOT NULL, lease_until REAL NOT NULL)""",
    ],
]

_INSERT_OUTBOX = "INSERT INTO choreograph_outbox (service, event_id, type, body, created_at) VALUES (?, ?, ?, ?, ?)"


def _params(args: Sequence[Any]) -> dict[str, Any]:
    """``$1, $2`` are SQLite named parameters called ``1``, ``2``."""
    return {str(i): value for i, value in enumerate(args, start=1)}


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def _migrate(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS choreograph_migrations (component TEXT NOT NULL, version INTEGER NOT NULL,"
            " applied_at REAL NOT NULL, PRIMARY KEY (component, version))"
        )
        done = db.execute("SELECT coalesce(max(version), 0) FROM choreograph_migrations WHERE component='state'")
        current = int(done.fetchone()[0])
        for version, statements in enumerate(MIGRATIONS, start=1):
            if version > current:
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO choreograph_migrations VALUES ('state', ?, ?)", (version, time.time()))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class _Tx(TxConnection):
    """One user transaction on the transaction connection; holds the store's writer turn."""

    def __init__(self, store: SQLiteStateStore) -> None:
        self.store = store
        self.begun = False
        self.done = False

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self.done:
            raise StoreError(f"database {self.store.url}: the transaction is already finished")

        def call(db: sqlite3.Connection) -> T:
            if not self.begun:
                db.execute("BEGIN IMMEDIATE")
                self.begun = True
            return fn(db)

        return await self.store._run(self.store._tx_exec, lambda: self.store._tx_db, call)

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        return await self._call(lambda db: max(0, db.execute(sql, _params(args)).rowcount))

    async def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        await self._call(lambda db: db.executemany(sql, [_params(r) for r in rows]))

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Row]:
        return await self._call(lambda db: db.execute(sql, _params(args)).fetchall())

    async def fetchone(self, sql: str, args: Sequence[Any]) -> Row | None:
        def first(db: sqlite3.Connection) -> Row | None:
            cursor = db.execute(sql, _params(args))
            try:
                return cursor.fetchone()
            finally:
                cursor.close()  # finish the statement (an UPDATE ... RETURNING must not stay open)

        return await self._call(first)

    async def commit(self, *, inbox: tuple[str, str] | None, service: str, messages: Sequence[Message]) -> bool:
        now = time.time()
        rows = [(service, m.id, m.type, m.body, now) for m in messages]

        def write(db: sqlite3.Connection) -> bool:
            try:
                if inbox is not None:
                    if db.execute("INSERT OR IGNORE INTO choreograph_inbox VALUES (?, ?, ?)", (*inbox, now)).rowcount == 0:
                        db.execute("ROLLBACK")
                        return False
                    db.execute("DELETE FROM choreograph_failures WHERE grp=? AND event_id=?", inbox)
                if rows:
                    db.executemany(_INSERT_OUTBOX, rows)
                db.execute("COMMIT")
                return True
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        try:
            committed = await self._call(write)
        finally:
            self._finish()
        if committed and rows:
            self.store.wake(service)
        return committed

    async def rollback(self) -> None:
        if self.done:
            return

        def undo(db: sqlite3.Connection) -> None:
            if db.in_transaction:
                db.execute("ROLLBACK")

        future = self.store._run(self.store._tx_exec, lambda: self.store._tx_db, undo)
        self._finish()  # the executor is FIFO: the next transaction's statements run after this rollback
        await future

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.store._turn.release()


class SQLiteStateStore(StateStore):
    backend = "sqlite"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.path = sqlite_path(url)
        if self.path == ":memory:":
            raise ConfigurationError(f"database URL {url!r}: a service database needs a file")
        params = dict(parse_qsl(urlsplit(url).query))
        try:
            self.relay_lease = float(params.get("relay_lease", "10"))
        except ValueError:
            raise ConfigurationError(f"database URL {url!r}: relay_lease must be seconds") from None
        self.synchronous = params.get("synchronous", "NORMAL").upper()
        if self.synchronous not in ("NORMAL", "FULL", "EXTRA") or self.relay_lease <= 0:
            raise ConfigurationError(f"database URL {url!r}: synchronous=NORMAL|FULL|EXTRA, relay_lease > 0")
        self._tx_db: sqlite3.Connection | None = None
        self._aux_db: sqlite3.Connection | None = None
        self._tx_exec: ThreadPoolExecutor | None = None
        self._aux_exec: ThreadPoolExecutor | None = None
        self._turn = asyncio.Lock()
        self._leases: dict[tuple[str, str], float] = {}  # (service, owner) -> until when owner holds the lease

    # -- plumbing ---------------------------------------------------------------------

    def _run(
        self,
        executor: ThreadPoolExecutor | None,
        db_of: Callable[[], sqlite3.Connection | None],
        fn: Callable[[sqlite3.Connection], T],
    ) -> asyncio.Future[T]:
        if executor is None:
            raise StoreError(f"database {self.url} is not open")

        def call() -> T:
            db = db_of()
            if db is None:
                raise StoreError(f"database {self.url} is not open")
            try:
                return fn(db)
            except sqlite3.Error as exc:
                raise StoreError(f"database {self.url}: {type(exc).__name__}: {exc}") from exc

        return asyncio.get_running_loop().run_in_executor(executor, call)

    def _aux(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        return self._run(self._aux_exec, lambda: self._aux_db, fn)

    async def _connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._tx_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-state-tx")
        self._aux_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-state-aux")
        loop = asyncio.get_running_loop()
        try:
            self._aux_db = await loop.run_in_executor(self._aux_exec, _connect, self.path, self.synchronous)
            await self._aux(_migrate)
            self._tx_db = await loop.run_in_executor(self._tx_exec, _connect, self.path, self.synchronous)
            self._tx_db.row_factory = sqlite3.Row
        except sqlite3.Error as exc:
            await self._disconnect()
            raise StoreError(f"database {self.url}: {exc}") from exc
        except BaseException:
            await self._disconnect()
            raise

    async def _disconnect(self) -> None:
        loop = asyncio.get_running_loop()
        for db, executor in ((self._tx_db, self._tx_exec), (self._aux_db, self._aux_exec)):
            if db is not None and executor is not None:
                await loop.run_in_executor(executor, db.close)
            if executor is not None:
                executor.shutdown(wait=False)
        self._tx_db = self._aux_db = None
        self._tx_exec = self._aux_exec = None
        self._leases.clear()

    # -- transactions -----------------------------------------------------------------

    async def begin(self) -> TxConnection:
        if self._tx_exec is None:
            raise StoreError(f"database {self.url} is not open")
        await self._turn.acquire()
        return _Tx(self)

    # -- inbox ------------------------------------------------------------------------

    async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
        ids = list(event_ids)
        if not ids:
            return set()

        def query(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT event_id FROM choreograph_inbox WHERE grp=? AND event_id IN ({marks})", [group, *chunk]
                )
                found.update(row[0] for row in rows)
            return found

        return await self._aux(query)

    async def mark(self, group: str, event_ids: Collection[str]) -> None:
        pairs = [(group, i) for i in event_ids]
        if not pairs:
            return
        now = time.time()

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR IGNORE INTO choreograph_inbox VALUES (?, ?, ?)", [(*p, now) for p in pairs])
                db.executemany("DELETE FROM choreograph_failures WHERE grp=? AND event_id=?", pairs)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._aux(write)

    async def record_failure(self, group: str, event_id: str, error: ErrorInfo, at: float) -> tuple[ErrorInfo, float]:
        def write(db: sqlite3.Connection) -> tuple[ErrorInfo, float]:
            db.execute(
                "INSERT OR IGNORE INTO choreograph_failures VALUES (?, ?, ?, ?)",
                (group, event_id, orjson.dumps(error.to_dict()).decode(), at),
            )
            row = db.execute(
                "SELECT first_error, first_at FROM choreograph_failures WHERE grp=? AND event_id=?", (group, event_id)
            ).fetchone()
            return ErrorInfo.from_dict(orjson.loads(row[0])), float(row[1])

        return await self._aux(write)

    async def clear_failures(self, group: str, event_ids: Collection[str]) -> None:
        pairs = [(group, i) for i in event_ids]
        if pairs:
            await self._aux(lambda db: db.executemany("DELETE FROM choreograph_failures WHERE grp=? AND event_id=?", pairs))

    async def expire(self, older_than: float) -> int:
        return await self._aux(
            lambda db: db.execute("DELETE FROM choreograph_inbox WHERE processed_at < ?", (older_than,)).rowcount
        )

    # -- outbox -----------------------------------------------------------------------

    def _claim(self, db: sqlite3.Connection, service: str, owner: str) -> bool:
        """Take or renew the relay lease of ``service`` (runs on the auxiliary thread)."""
        now = time.time()
        if self._leases.get((service, owner), 0.0) - now > self.relay_lease / 2:
            return True
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR IGNORE INTO choreograph_relay VALUES (?, '', 0)", (service,))
            got = db.execute(
                "UPDATE choreograph_relay SET owner=?, lease_until=? WHERE service=? AND (owner=? OR lease_until<?)",
                (owner, now + self.relay_lease, service, owner, now),
            ).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if got:
            self._leases[(service, owner)] = now + self.relay_lease
        else:
            self._leases.pop((service, owner), None)
        return bool(got)

    async def relay_pass(self, service: str, owner: str, limit: int, publish: RelayPublish) -> int | None:
        def claim_and_read(db: sqlite3.Connection) -> list[Any] | None:
            if not self._claim(db, service, owner):
                return None
            return db.execute(
                "SELECT seq, event_id, type, body FROM choreograph_outbox WHERE service=? AND sent_at IS NULL"
                " ORDER BY seq LIMIT ?",
                (service, limit),
            ).fetchall()

        rows = await self._aux(claim_and_read)
        if rows is None:
            return None
        if not rows:
            return 0
        await publish([Message(row[1], row[2], bytes(row[3])) for row in rows])
        seqs = [row[0] for row in rows]
        now = time.time()

        def mark_sent(db: sqlite3.Connection) -> None:
            for start in range(0, len(seqs), 500):
                chunk = seqs[start:start + 500]
                db.execute(
                    f"UPDATE choreograph_outbox SET sent_at=? WHERE seq IN ({','.join('?' * len(chunk))})",
                    [now, *chunk],
                )

        await self._aux(mark_sent)
        return len(rows)

    async def release_relay(self, service: str, owner: str) -> None:
        self._leases.pop((service, owner), None)
        await self._aux(
            lambda db: db.execute(
                "UPDATE choreograph_relay SET lease_until=0 WHERE service=? AND owner=?", (service, owner)
            )
        )

    async def outbox_lag(self, service: str) -> OutboxLag:
        count, oldest = await self._aux(
            lambda db: db.execute(
                "SELECT count(*), min(created_at) FROM choreograph_outbox WHERE service=? AND sent_at IS NULL",
                (service,),
            ).fetchone()
        )
        return OutboxLag(int(count), max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    async def purge_sent(self, older_than: float) -> int:
        return await self._aux(
            lambda db: db.execute(
                "DELETE FROM choreograph_outbox WHERE sent_at IS NOT NULL AND sent_at < ?", (older_than,)
            ).rowcount
        )
