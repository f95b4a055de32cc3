"""A service database on a SQLite file: state, inbox and outbox in one file.

``sqlite:///var/pkg.db?relay_lease=10&synchronous=NORMAL``

Two connections:

* the **writer** (:mod:`choreograph.stores._sqlite_writer`) runs every write of this
  process one turn at a time, inline on the event loop, with group commit: user
  transactions, inbox records, relay leases, marking rows sent;
* the **reader**, on its own thread, serves lookups that must not wait for the
  writer's turn (WAL readers never block): inbox ``seen``, unsent outbox rows, lag;
  and it checkpoints the WAL now and then.

Relay claims (:mod:`choreograph.stores._sqlite_relay`): the holder of a service's
claim keeps an OS file lock beside the database for as long as it holds it, and a
lease row (``choreograph_relay``) that it renews when half of ``relay_lease`` seconds
is left. A standby takes over as soon as the holder's process dies (the kernel drops
its lock) and never from a live holder; an owner without the lock (an older version,
no ``flock``) still has to let its lease lapse first. A watcher thread wakes a waiting
claim holder when another process commits outbox rows, and a waiting standby when the
lock comes free. Writers are serialised, so ``seq`` order is commit order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import orjson

from choreograph._clock import stamp_time
from choreograph._redact import redact
from choreograph._schemes import query_params
from choreograph._sqlite import connect_wal, make_folder
from choreograph.errors import ConfigurationError, StoreError
from choreograph.stores._sqlite_relay import LOCKED, OutboxWatcher, RelayLock, lock_path
from choreograph.stores._sqlite_tx import SQLiteTx
from choreograph.stores._sqlite_writer import SQLiteWriter
from choreograph.stores.base import ErrorInfo
from choreograph.stores.sqlite import sqlite_path
from choreograph.stores.state import OutboxLag, RelayPublish, StateStore, TxConnection
from choreograph.transports.base import Message

T = TypeVar("T")

log = logging.getLogger("choreograph.outbox")

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
            seq INTEGER PRIMARY KEY, service TEXT NOT NULL, event_id TEXT NOT NULL,
            type TEXT NOT NULL, body BLOB NOT NULL, created_at REAL NOT NULL, sent_at REAL)""",
        "CREATE INDEX IF NOT EXISTS choreograph_outbox_pending ON choreograph_outbox (service, seq)"
        " WHERE sent_at IS NULL",
        "CREATE INDEX IF NOT EXISTS choreograph_outbox_sent ON choreograph_outbox (sent_at)"
        " WHERE sent_at IS NOT NULL",
        """CREATE TABLE IF NOT EXISTS choreograph_relay (
            service TEXT PRIMARY KEY, owner TEXT NOT NULL, lease_until REAL NOT NULL)""",
    ],
    # seq AUTOINCREMENT: without it SQLite gives a new row the seq after the largest left, so
    # once a purge deleted the rows of the largest seqs a seq was used again. A relay reads
    # past the last seq it published (``seq > published_upto``): it then published a later
    # row first and the earlier ones after it - out of commit order.
    [
        """CREATE TABLE choreograph_outbox_v2 (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, event_id TEXT NOT NULL,
            type TEXT NOT NULL, body BLOB NOT NULL, created_at REAL NOT NULL, sent_at REAL)""",
        "INSERT INTO choreograph_outbox_v2 (seq, service, event_id, type, body, created_at, sent_at)"
        " SELECT seq, service, event_id, type, body, created_at, sent_at FROM choreograph_outbox ORDER BY seq",
        "DROP TABLE choreograph_outbox",
        "ALTER TABLE choreograph_outbox_v2 RENAME TO choreograph_outbox",
        "CREATE INDEX choreograph_outbox_pending ON choreograph_outbox (service, seq) WHERE sent_at IS NULL",
        "CREATE INDEX choreograph_outbox_sent ON choreograph_outbox (sent_at) WHERE sent_at IS NOT NULL",
    ],
]

def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    return connect_wal(path, synchronous=synchronous)


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


class SQLiteStateStore(StateStore):
    backend = "sqlite"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.path = sqlite_path(url)
        if self.path == ":memory:":
            raise ConfigurationError(f"database URL {redact(url)!r}: a service database needs a file")
        params = query_params(url, "database URL")
        unknown = set(params) - {"relay_lease", "synchronous"}
        if unknown:  # a misspelt synchronous=FULL silently ran with NORMAL's durability
            raise ConfigurationError(
                f"database URL {redact(url)!r}: unknown parameter(s) {', '.join(sorted(unknown))}"
                " (a SQLite service database takes relay_lease and synchronous)"
            )
        try:
            self.relay_lease = float(params.get("relay_lease", "10"))
        except ValueError:
            raise ConfigurationError(f"database URL {redact(url)!r}: relay_lease must be seconds") from None
        self.synchronous = params.get("synchronous", "NORMAL").upper()
        if self.synchronous not in ("NORMAL", "FULL", "EXTRA") or not 0 < self.relay_lease < math.inf:
            raise ConfigurationError(f"database URL {redact(url)!r}: synchronous=NORMAL|FULL|EXTRA, relay_lease > 0")
        self.writer = SQLiteWriter(url, self.synchronous, self._on_commit)
        self._reader: sqlite3.Connection | None = None
        self._writer_exec: ThreadPoolExecutor | None = None
        self._reader_exec: ThreadPoolExecutor | None = None
        self._commits = 0
        self._leases: dict[tuple[str, str], float] = {}  # (service, owner) -> until when owner holds the lease
        self._locks: dict[tuple[str, str], RelayLock] = {}  # (service, owner) -> its claim's lock
        self._waiting: dict[str, int] = {}  # service -> relays of this store waiting for rows
        self._watcher = OutboxWatcher(self.path, self.wake)
        self._published_upto: dict[tuple[str, str], int] = {}  # (service, owner) -> last seq published
        self._marking: dict[tuple[str, str], asyncio.Task[None]] = {}  # (service, owner) -> last mark in flight

    # -- plumbing ---------------------------------------------------------------------

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """``fn`` on the reader's thread (never waits for the writer's turn)."""
        executor, db = self._reader_exec, self._reader
        if executor is None or db is None:
            raise StoreError(f"database {self.url} is not open")

        def call() -> T:
            try:
                return fn(db)
            except sqlite3.Error as exc:
                raise StoreError(f"database {self.url}: {type(exc).__name__}: {exc}") from exc

        return asyncio.get_running_loop().run_in_executor(executor, call)

    def _on_commit(self, woken: set[str]) -> None:
        if woken:
            now, committed = time.monotonic(), self._watcher.committed_at
            for service in woken:
                committed[service] = now
        for service in woken:
            self.wake(service)
        self._commits += 1
        if self._commits % 1000 == 0:  # the writer never checkpoints: do it off the loop, best effort
            self._read(lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()).add_done_callback(
                lambda f: f.cancelled() or f.exception()
            )

    async def _connect(self) -> None:
        make_folder(self.path)  # a folder that cannot be created is one clear error, before any thread starts
        self._writer_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-state-writer")
        self._reader_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-state-reader")
        loop = asyncio.get_running_loop()
        try:
            self._reader = await loop.run_in_executor(self._reader_exec, _connect, self.path, self.synchronous)
            await self._read(_migrate)
            writer = await loop.run_in_executor(self._writer_exec, _connect, self.path, self.synchronous)
            self.writer.attach(writer, self._writer_exec)
        except sqlite3.Error as exc:
            await self._disconnect()
            raise StoreError(f"database {self.url}: {exc}") from exc
        except BaseException:
            await self._disconnect()
            raise

    async def _disconnect(self) -> None:
        for key in list(self._marking):
            await self._marks_done(key)
        await self._watcher.close()
        self._watcher = OutboxWatcher(self.path, self.wake)
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()
        self._published_upto.clear()
        loop = asyncio.get_running_loop()
        writer = self.writer.db
        if writer is not None:
            await self.writer.detach()
        for db, executor in ((writer, self._writer_exec), (self._reader, self._reader_exec)):
            if db is not None and executor is not None:
                await loop.run_in_executor(executor, db.close)
            if executor is not None:
                executor.shutdown(wait=False)
        self._reader = None
        self._writer_exec = self._reader_exec = None
        self._leases.clear()

    # -- transactions -----------------------------------------------------------------

    async def begin(self) -> TxConnection:
        self.writer.connection()
        await self.writer.acquire()
        return SQLiteTx(self.writer)

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

        return await self._read(query)

    async def mark(self, group: str, event_ids: Collection[str]) -> None:
        pairs = [(group, i) for i in event_ids]
        if not pairs:
            return
        now = stamp_time()  # on the worker's clock, as Worker.expire reads it

        def write(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR IGNORE INTO choreograph_inbox VALUES (?, ?, ?)", [(*p, now) for p in pairs])
            db.executemany("DELETE FROM choreograph_failures WHERE grp=? AND event_id=?", pairs)

        await self.writer.write(write)

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

        return await self.writer.write(write)

    async def clear_failures(self, group: str, event_ids: Collection[str]) -> None:
        pairs = [(group, i) for i in event_ids]
        if pairs:
            await self.writer.write(lambda db: db.executemany("DELETE FROM choreograph_failures WHERE grp=? AND event_id=?", pairs))

    async def expire(self, older_than: float) -> int:
        return await self.writer.write(
            lambda db: db.execute("DELETE FROM choreograph_inbox WHERE processed_at < ?", (older_than,)).rowcount
        )

    # -- outbox -----------------------------------------------------------------------

    def _claim(self, db: sqlite3.Connection, service: str, owner: str, locked: bool) -> bool:
        """Take or renew the relay lease of ``service`` (inside a write transaction).

        Free when its lease lapsed, or when its owner is a locked one and ``locked``
        says this relay now holds that lock: the owner is gone (dead or released).
        """
        now = time.time()
        me = owner + LOCKED if locked else owner
        row = db.execute("SELECT owner, lease_until FROM choreograph_relay WHERE service=?", (service,)).fetchone()
        got = row is None or row[0] == me or row[1] < now or (locked and row[0].endswith(LOCKED))
        if got:
            db.execute("INSERT OR REPLACE INTO choreograph_relay VALUES (?, ?, ?)", (service, me, now + self.relay_lease))
            self._leases[(service, owner)] = now + self.relay_lease
        else:
            self._leases.pop((service, owner), None)
        return got

    async def relay_pass(self, service: str, owner: str, limit: int, publish: RelayPublish) -> int | None:
        """Claim, read, publish; marking the rows sent overlaps the next pass.

        The claim is the lock of ``service``'s claim (held from here until released,
        lost or the process ends) and the lease row, renewed at half-time. Writers are
        serialised, so ``seq`` order is commit order and a relay can read past the rows
        it has published but not yet marked (``seq > published_upto``) while their mark
        waits for the writer. If a mark fails, the rows are read and published again
        (same ids). A pass that finds nothing waits for pending marks, so an idle relay
        has marked everything it sent.
        """
        key = (service, owner)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = RelayLock(lock_path(self.path, service))
        if not lock.acquire():  # a live relay, in this process or another, holds the claim
            self._leases.pop(key, None)
            self._published_upto.pop(key, None)
            return None
        if self._leases.get(key, 0.0) - time.time() <= self.relay_lease / 2:
            try:
                claimed = await self.writer.write(lambda db: self._claim(db, service, owner, lock.enforced))
            except BaseException:
                if key not in self._leases:
                    lock.release()
                raise
            if not claimed:  # an owner without the lock (an older version) holds a live lease
                lock.release()
                self._published_upto.pop(key, None)
                return None
        rows = await self._unsent(service, self._published_upto.get(key, 0), limit)
        if not rows and key in self._published_upto:
            # Everything published is marked now: read from the start again.
            await self._marks_done(key)
            if self._published_upto.pop(key, 0):
                rows = await self._unsent(service, 0, limit)
        if not rows:
            await self._marks_done(key)
            return 0
        await publish([Message(row[1], row[2], bytes(row[3])) for row in rows])
        seqs = [row[0] for row in rows]
        self._published_upto[key] = seqs[-1]
        self._marking[key] = asyncio.create_task(self._mark_sent(key, seqs, self._marking.get(key)))
        return len(rows)

    def _unsent(self, service: str, after: int, limit: int) -> asyncio.Future[list[tuple[int, str, str, bytes]]]:
        return self._read(
            lambda db: db.execute(
                "SELECT seq, event_id, type, body FROM choreograph_outbox"
                " WHERE service=? AND sent_at IS NULL AND seq > ? ORDER BY seq LIMIT ?",
                (service, after, limit),
            ).fetchall()
        )

    async def _mark_sent(self, key: tuple[str, str], seqs: list[int], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        now = time.time()

        def mark(db: sqlite3.Connection) -> None:
            for start in range(0, len(seqs), 500):
                chunk = seqs[start:start + 500]
                db.execute(
                    f"UPDATE choreograph_outbox SET sent_at=? WHERE seq IN ({','.join('?' * len(chunk))})",
                    [now, *chunk],
                )

        try:
            await self.writer.write(mark)
        except Exception as exc:
            log.warning("could not mark %d outbox rows sent (they will be sent again): %s", len(seqs), exc)
            self._published_upto.pop(key, None)
            raise

    async def _marks_done(self, key: tuple[str, str]) -> None:
        task = self._marking.pop(key, None)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def release_relay(self, service: str, owner: str) -> None:
        """End the lease (if held), then give the lock up; a standby's lock is just closed."""
        key = (service, owner)
        lock = self._locks.pop(key, None)
        try:
            await self._marks_done(key)
            self._published_upto.pop(key, None)
            if self._leases.pop(key, None) is not None:
                await self.writer.write(
                    lambda db: db.execute(
                        "UPDATE choreograph_relay SET lease_until=0 WHERE service=? AND owner IN (?, ?)",
                        (service, owner, owner + LOCKED),
                    )
                )
        finally:
            if lock is not None:
                lock.release()

    async def wait_outbox(self, service: str, within: float, owner: str | None = None) -> None:
        """As :meth:`StateStore.wait_outbox`, and also until another process commits outbox rows
        of a database whose claim this store's relay holds, or the claim's lock comes free."""
        self._waiting[service] = self._waiting.get(service, 0) + 1
        self._watch()
        try:
            await super().wait_outbox(service, within, owner)
        finally:
            left = self._waiting.pop(service) - 1
            if left:
                self._waiting[service] = left
            self._watch()

    def _watch(self) -> None:
        holders = {service for service, _ in self._leases}
        self._watcher.watch({service: service in holders for service in self._waiting})

    async def outbox_lag(self, service: str) -> OutboxLag:
        count, oldest = await self._read(
            lambda db: db.execute(
                "SELECT count(*), min(created_at) FROM choreograph_outbox WHERE service=? AND sent_at IS NULL",
                (service,),
            ).fetchone()
        )
        return OutboxLag(int(count), max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    async def purge_sent(self, older_than: float) -> int:
        return await self.writer.write(
            lambda db: db.execute(
                "DELETE FROM choreograph_outbox WHERE sent_at IS NOT NULL AND sent_at < ?", (older_than,)
            ).rowcount
        )
