"""The inbox on a SQLite file (WAL, synchronous=NORMAL: a commit survives a process crash).

One file may be shared by the replicas of a service on one host. Calls run on a
dedicated thread so the event loop never blocks on disk or on another process's lock —
except small lookups and marks (a lone event's, at most :data:`INLINE_MAX` ids), which run
on the loop's thread when SQLite can do them without waiting: a WAL reader never waits,
and a writer is refused at once (busy timeout 0) when another process holds the write
lock, and then goes to the thread like the rest. The thread hop was most of a lone
event's inbox cost. That connection never checkpoints on its own; the thread does it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import orjson

from choreograph._clock import stamp_time
from choreograph._redact import redact
from choreograph._sqlite import connect_wal
from choreograph.errors import ConfigurationError, StoreError
from choreograph.stores.base import ErrorInfo, InboxStore

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    grp TEXT NOT NULL, event_id TEXT NOT NULL, processed_at REAL NOT NULL,
    PRIMARY KEY (grp, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_age ON inbox (processed_at);
CREATE TABLE IF NOT EXISTS failures (
    grp TEXT NOT NULL, event_id TEXT NOT NULL, first_error TEXT NOT NULL, first_at REAL NOT NULL,
    PRIMARY KEY (grp, event_id)
) WITHOUT ROWID;
"""


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///path`` URL (``sqlite:///:memory:`` for in-memory)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # sqlite://[x: an unclosed "[" read as an IPv6 host
        raise ConfigurationError(f"sqlite URL {redact(url)!r}: {exc}") from None
    path = parts.path
    if parts.netloc:
        raise ConfigurationError(f"sqlite URL {redact(url)!r}: use sqlite:///relative/path or sqlite:////absolute/path")
    if path.startswith("/"):
        path = path[1:]
    if not path:
        raise ConfigurationError(f"sqlite URL {redact(url)!r}: no file path")
    if "#" in url:  # everything after it is a fragment: the file opened would be another one
        raise ConfigurationError(f"sqlite URL {redact(url)!r}: a '#' in a URL starts a fragment, which cut the "
                                 f"file's path to {path!r}; a sqlite:// path cannot contain '#'")
    return path


def sqlite_store_path(url: str, what: str) -> str:
    """:func:`sqlite_path` for a store that reads no query parameter (the inbox, journal, join and
    idempotency stores): one given is a :class:`ConfigurationError` naming it (and ``what``), as on
    a broker URL. It was ignored without a word: ``?synchronous=FULL`` ran with ``NORMAL``, and
    ``?schema=a&schema=b`` was taken. A service's ``database=`` takes its own (``relay_lease``,
    ``synchronous``)."""
    path = sqlite_path(url)
    names = sorted({name for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)})
    if names:
        raise ConfigurationError(
            f"{what} {redact(url)!r}: unknown parameter(s) {', '.join(names)}; a sqlite:// {what.split()[0]} store "
            "takes none"
        )
    return path


#: Lookups and marks of up to this many ids try the loop's thread first (see the module doc).
INLINE_MAX = 16
#: Inline marks between two checkpoints (run on the store's thread, never on the loop's).
CHECKPOINT_EVERY = 500


_SEEN_ONE = "SELECT 1 FROM inbox WHERE grp=? AND event_id=?"


def _busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc)
    return "locked" in message or "busy" in message


def _seen(db: sqlite3.Connection, group: str, ids: list[str]) -> set[str]:
    if len(ids) == 1:  # a lone event's lookup: one cached statement, no string building
        return set(ids) if db.execute(_SEEN_ONE, (group, ids[0])).fetchone() is not None else set()
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(f"SELECT event_id FROM inbox WHERE grp=? AND event_id IN ({marks})", [group, *chunk])
        found.update(row[0] for row in rows)
    return found


def _mark(db: sqlite3.Connection, group: str, ids: list[str], now: float) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("INSERT OR IGNORE INTO inbox VALUES (?, ?, ?)", [(group, i, now) for i in ids])
        if db.execute("SELECT 1 FROM failures WHERE grp=? LIMIT 1", (group,)).fetchone() is not None:
            # usually nothing failed: one lookup instead of a delete per id
            db.executemany("DELETE FROM failures WHERE grp=? AND event_id=?", [(group, i) for i in ids])
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SQLiteStore(InboxStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.path = sqlite_store_path(url, "inbox store URL")
        self._db: sqlite3.Connection | None = None
        self._inline: sqlite3.Connection | None = None  # used on the event loop's thread only
        self._inline_marks = 0
        self._checkpoint: asyncio.Future[Any] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-inbox")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()

        def call() -> T:
            if self._db is None:
                raise StoreError(f"inbox store {self.url} is not open")
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"inbox store {self.url}: {exc}") from exc

        return await loop.run_in_executor(self._executor, call)

    async def open(self) -> None:
        if self._db is not None:
            return
        loop = asyncio.get_running_loop()

        def connect() -> tuple[sqlite3.Connection, sqlite3.Connection | None]:
            db = connect_wal(self.path, schema=_SCHEMA)
            if self.path == ":memory:":
                return db, None  # a second connection would be a second database
            inline = connect_wal(self.path)
            inline.execute("PRAGMA busy_timeout=0")
            inline.execute("PRAGMA wal_autocheckpoint=0")
            return db, inline

        try:
            self._db, self._inline = await loop.run_in_executor(self._executor, connect)
        except sqlite3.Error as exc:
            raise StoreError(f"inbox store {self.url}: {exc}") from exc

    async def close(self) -> None:
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=False)

    def _checkpoint_later(self) -> None:
        """Fold the WAL into the file on the store's thread (PASSIVE: never blocks a writer)."""
        self._inline_marks += 1
        if self._inline_marks < CHECKPOINT_EVERY or (self._checkpoint is not None and not self._checkpoint.done()):
            return
        self._inline_marks = 0

        def checkpoint(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")

        self._checkpoint = asyncio.ensure_future(self._run(checkpoint))
        self._checkpoint.add_done_callback(lambda f: f.cancelled() or f.exception())  # retried next time

    async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
        ids = list(event_ids)
        if not ids:
            return set()
        if self._inline is not None and len(ids) <= INLINE_MAX:
            try:
                return _seen(self._inline, group, ids)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise StoreError(f"inbox store {self.url}: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"inbox store {self.url}: {exc}") from exc
        return await self._run(lambda db: _seen(db, group, ids))

    async def mark(self, group: str, event_ids: Collection[str]) -> None:
        ids = list(event_ids)
        if not ids:
            return
        now = stamp_time()  # on the worker's clock, as Worker.expire reads it
        if self._inline is not None and len(ids) <= INLINE_MAX:
            try:
                _mark(self._inline, group, ids, now)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise StoreError(f"inbox store {self.url}: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"inbox store {self.url}: {exc}") from exc
            else:
                self._checkpoint_later()
                return
        await self._run(lambda db: _mark(db, group, ids, now))

    async def record_failure(self, group: str, event_id: str, error: ErrorInfo, at: float) -> tuple[ErrorInfo, float]:
        def write(db: sqlite3.Connection) -> tuple[ErrorInfo, float]:
            db.execute(
                "INSERT OR IGNORE INTO failures VALUES (?, ?, ?, ?)",
                (group, event_id, orjson.dumps(error.to_dict()).decode(), at),
            )
            row: Any = db.execute(
                "SELECT first_error, first_at FROM failures WHERE grp=? AND event_id=?", (group, event_id)
            ).fetchone()
            return ErrorInfo.from_dict(orjson.loads(row[0])), float(row[1])

        return await self._run(write)

    async def clear_failures(self, group: str, event_ids: Collection[str]) -> None:
        ids = [(group, i) for i in event_ids]
        await self._run(lambda db: db.executemany("DELETE FROM failures WHERE grp=? AND event_id=?", ids))

    async def expire(self, older_than: float) -> int:
        return await self._run(lambda db: db.execute("DELETE FROM inbox WHERE processed_at < ?", (older_than,)).rowcount)
