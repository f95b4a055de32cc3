"""The journal on a SQLite file (WAL): one journal process writes, any number read.

The gateway's ``GET /transactions`` and ``choreograph trace`` open the same file from
other processes; WAL lets them read while the journal writes. Calls run on a dedicated
thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from choreograph._journal_model import (
    COMPENSATION_MARK,
    FAILED,
    TIMEDOUT,
    JournalEntry,
    Status,
    TransactionSummary,
)
from choreograph._journal_store import (
    Activity,
    EdgeCount,
    JournalStore,
    count_statuses,
    fold_entries,
    recoveries,
)
from choreograph._sqlite import connect_wal
from choreograph.errors import StoreError
from choreograph.stores.sqlite import sqlite_store_path

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    correlation_id TEXT NOT NULL,
    type TEXT NOT NULL, source TEXT NOT NULL, service TEXT NOT NULL, kind TEXT NOT NULL,
    at REAL NOT NULL, recorded_at REAL NOT NULL, causation_id TEXT, time TEXT, attempt INTEGER,
    deadline REAL, failed_type TEXT, compensable INTEGER NOT NULL, record TEXT,
    traceparent TEXT, tracestate TEXT
);
CREATE INDEX IF NOT EXISTS journal_events_cid ON journal_events (correlation_id, seq);
-- activity(): the window's entries counted from the index alone (covering), not the table
CREATE INDEX IF NOT EXISTS journal_events_window ON journal_events (recorded_at, service, type, kind, failed_type);
CREATE TABLE IF NOT EXISTS journal_transactions (
    correlation_id TEXT PRIMARY KEY,
    base_status TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, started_at REAL NOT NULL,
    deadline REAL NOT NULL, deadline_explicit INTEGER NOT NULL, root_type TEXT, event_count INTEGER NOT NULL,
    terminal_type TEXT, terminal_kind TEXT, failures INTEGER NOT NULL, uncompensated INTEGER NOT NULL,
    timed_out INTEGER NOT NULL, compensation_failures INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_tx_status ON journal_transactions (base_status, deadline);
CREATE INDEX IF NOT EXISTS journal_tx_started ON journal_transactions (started_at);
"""

# The compensations that gave up (JournalEntry.compensation_failure) of each transaction.
_COMPENSATION_FAILURES = (
    "SELECT correlation_id, count(*) FROM journal_events "
    f"WHERE kind = 'failure' AND (failed_type IN ('{FAILED}', '{TIMEDOUT}') "
    f"OR json_type(record, '$.{COMPENSATION_MARK}') = 'true') GROUP BY correlation_id"
)
# PRAGMA user_version once the summaries' compensation_failures were counted by that rule (a
# journal before it counted only failures of choreograph.failed events).
_COUNTED = 1


def _missing(db: sqlite3.Connection) -> tuple[set[str], set[str]]:
    """The columns of the current schema that the journal file lacks (events, transactions)."""
    events = {row[1] for row in db.execute("PRAGMA table_info(journal_events)")}
    txs = {row[1] for row in db.execute("PRAGMA table_info(journal_transactions)")}
    return {"traceparent", "tracestate"} - events, {"compensation_failures"} - txs


def _counted(db: sqlite3.Connection) -> bool:
    return int(db.execute("PRAGMA user_version").fetchone()[0]) >= _COUNTED


def _read_only_file_system(path: str) -> bool:
    """Whether the folder of ``path`` is on a file system mounted read-only (a read-only volume)."""
    try:
        return bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _connect_read_only(path: str) -> tuple[sqlite3.Connection, bool]:
    """A connection that never writes ``path`` (``mode=ro``), for the commands that only read;
    and whether it is ``immutable=1`` (a snapshot: see :meth:`SQLiteJournalStore._run`).

    A WAL file whose ``-shm`` cannot be created (a read-only folder with no writer at work, such
    as a copy from production, or a read-only volume, where SQLite says "unable to open database
    file" rather than "readonly") cannot be opened ``mode=ro``; it is opened ``immutable=1`` then.
    A file older than the current schema is refused: migrating it is a write, and reading it as
    it is would show compensation failures counted by the old rule.
    """
    if not os.path.exists(path):  # SQLite's "unable to open database file" says neither which nor why
        raise StoreError(f"journal store {path}: no such file (yet); the journal (`choreograph journal`) creates it")
    if os.path.isdir(path):  # SQLite's "disk I/O error"
        raise StoreError(f"journal store {path}: a folder, not a journal file")
    uri = Path(path).absolute().as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            db.close()
            raise
    except sqlite3.OperationalError as exc:
        # its -shm cannot be made; anything else is an error
        if "readonly" not in str(exc) and not ("unable to open" in str(exc) and _read_only_file_system(path)):
            raise
        db = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False)
        immutable = True
    else:
        immutable = False
    try:
        problem = _read_only_problem(db, path)
    except BaseException:
        db.close()
        raise
    if problem is not None:
        db.close()
        raise StoreError(f"journal store {path}: {problem}")
    return db, immutable


def _read_only_problem(db: sqlite3.Connection, path: str) -> str | None:
    """Why the file ``db`` reads cannot be read as a journal as it is, or ``None``.

    A file without the journal's tables is not an older journal (every journal has had both):
    an empty file (``touch``, a failed copy) or another program's database, named as such
    rather than sent to be migrated, which would make it a journal.
    """
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    if "journal_events" not in tables and "journal_transactions" not in tables:
        if not tables:
            empty = os.path.getsize(path) == 0
            what = "an empty file" if empty else "an SQLite database without tables"
            return f"{what}, not a journal (is this the file `choreograph journal` records to?)"
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        return f"not a choreograph journal (an SQLite database with the tables {shown}, none of the journal's)"
    if _missing(db) != (set(), set()) or not _counted(db):
        return ("written by an older choreograph and opened read-only; "
                "the journal (`choreograph journal`) must open it once, with write access, to migrate it")
    return None


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns a journal file written before them lacks (``CREATE TABLE IF NOT EXISTS``
    leaves an existing table as it is), and count the summaries' compensation failures from the
    recorded entries, once (``PRAGMA user_version``), by the journal's current rule."""

    if _missing(db) == (set(), set()) and _counted(db):
        return
    db.execute("BEGIN IMMEDIATE")  # another process may be migrating the same file
    try:
        events, txs = _missing(db)
        for column in sorted(events):
            db.execute(f"ALTER TABLE journal_events ADD COLUMN {column} TEXT")
        if txs:
            db.execute("ALTER TABLE journal_transactions ADD COLUMN compensation_failures INTEGER NOT NULL DEFAULT 0")
        if not _counted(db):
            db.executemany(
                "UPDATE journal_transactions SET compensation_failures = ?, base_status = 'compensation_failed' "
                "WHERE correlation_id = ? AND compensation_failures != ?",
                [(count, cid, count) for cid, count in db.execute(_COMPENSATION_FAILURES).fetchall()],
            )
            db.execute(f"PRAGMA user_version = {_COUNTED}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


_EVENT_COLUMNS = (
    "event_id, correlation_id, type, source, service, kind, at, recorded_at, causation_id, time, attempt, "
    "deadline, failed_type, compensable, record, traceparent, tracestate"
)
_TX_COLUMNS = (
    "correlation_id, first_seen, last_seen, started_at, deadline, deadline_explicit, root_type, event_count, "
    "terminal_type, terminal_kind, failures, uncompensated, timed_out, compensation_failures"
)


def _entry_row(entry: JournalEntry) -> tuple[Any, ...]:
    return (
        entry.event_id, entry.correlation_id, entry.type, entry.source, entry.service, entry.kind, entry.at,
        entry.recorded_at, entry.causation_id, entry.time, entry.attempt, entry.deadline, entry.failed_type,
        int(entry.compensable), orjson.dumps(entry.record).decode() if entry.record is not None else None,
        entry.traceparent, entry.tracestate,
    )


def _entry(row: Sequence[Any]) -> JournalEntry:
    return JournalEntry(
        event_id=row[0], correlation_id=row[1], type=row[2], source=row[3], service=row[4], kind=row[5],
        at=row[6], recorded_at=row[7], causation_id=row[8], time=row[9], attempt=row[10], deadline=row[11],
        failed_type=row[12], compensable=bool(row[13]), record=orjson.loads(row[14]) if row[14] else None,
        traceparent=row[15], tracestate=row[16],
    )


def _summary_row(s: TransactionSummary) -> tuple[Any, ...]:
    return (
        s.correlation_id, s.base_status, s.first_seen, s.last_seen, s.started_at, s.deadline,
        int(s.deadline_explicit), s.root_type, s.event_count, s.terminal_type, s.terminal_kind, s.failures,
        s.uncompensated, int(s.timed_out), s.compensation_failures,
    )


def _summary(row: Sequence[Any]) -> TransactionSummary:
    return TransactionSummary(
        correlation_id=row[0], first_seen=row[1], last_seen=row[2], started_at=row[3], deadline=row[4],
        deadline_explicit=bool(row[5]), root_type=row[6], event_count=row[7], terminal_type=row[8],
        terminal_kind=row[9], failures=row[10], uncompensated=row[11], timed_out=bool(row[12]),
        compensation_failures=row[13],
    )


def _save(db: sqlite3.Connection, summaries: Collection[TransactionSummary]) -> None:
    db.executemany(
        "INSERT OR REPLACE INTO journal_transactions (correlation_id, base_status, "
        + _TX_COLUMNS.split(", ", 1)[1] + ") VALUES (" + ",".join("?" * 15) + ")",
        [_summary_row(s) for s in summaries],
    )


class SQLiteJournalStore(JournalStore):
    """``sqlite:///var/journal.db``.

    ``read_only`` (the commands that only read: ``trace``, ``transactions``, ``watch``) opens the
    file ``mode=ro``: it is never created, migrated or written, so a file the user may only read
    works, and a file older than the current schema is a :class:`StoreError` saying to migrate it.
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url
        self.path = sqlite_store_path(url, "journal store URL")
        self.read_only = read_only
        self._db: sqlite3.Connection | None = None
        self._immutable = False  # the connection is an immutable=1 snapshot (see _run)
        self._executor: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None or self._executor is None:
            await self.open()  # readers (gateway, trace) open lazily
        assert self._executor is not None

        def call() -> T:
            if self._db is None:
                raise StoreError(f"journal store {self.url} is closed")
            try:
                if self._immutable:
                    # A snapshot of the file when it was opened: SQLite takes an immutable file to
                    # never change, so a long-lived reader (the gateway, watch) kept showing the
                    # journal as it was at its first query. Opened again for each query instead.
                    db, self._db = self._db, None
                    db.close()
                    self._db, self._immutable = _connect_read_only(self.path)  # failing: opened by the next query
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"journal store {self.url}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        if self._db is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-journal")
        executor = self._executor

        def connect() -> tuple[sqlite3.Connection, bool]:
            if self.read_only and self.path != ":memory:":
                return _connect_read_only(self.path)
            db = connect_wal(self.path, schema=_SCHEMA)
            try:
                _migrate(db)
            except BaseException:
                db.close()
                raise
            return db, False

        try:
            self._db, self._immutable = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except sqlite3.Error as exc:
            raise StoreError(f"journal store {self.url}: {exc}") from exc

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if self._db is not None and executor is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(executor, db.close)
        if executor is not None:
            executor.shutdown(wait=False)

    async def record(self, entries: Sequence[JournalEntry], *, stuck_after: float) -> list[TransactionSummary]:
        def write(db: sqlite3.Connection) -> list[TransactionSummary]:
            db.execute("BEGIN IMMEDIATE")
            try:
                fresh = []
                for entry in entries:
                    cursor = db.execute(
                        f"INSERT OR IGNORE INTO journal_events ({_EVENT_COLUMNS}) VALUES ({','.join('?' * 17)})",
                        _entry_row(entry),
                    )
                    if cursor.rowcount == 1:
                        fresh.append(entry)
                existing = {}
                for cid in {e.correlation_id for e in fresh}:
                    row = db.execute(
                        f"SELECT {_TX_COLUMNS} FROM journal_transactions WHERE correlation_id=?", (cid,)
                    ).fetchone()
                    if row is not None:
                        existing[cid] = _summary(row)
                rids = sorted({rid for e in fresh if (rid := e.recovery_id) is not None})
                recorded = {
                    row[0] for row in db.execute(
                        f"SELECT event_id FROM journal_events WHERE event_id IN ({','.join('?' * len(rids))})", rids
                    )
                } if rids else set()
                earlier = [  # the compensation failures still counted: only those transactions' failures are read
                    entry
                    for cid, summary in existing.items() if summary.compensation_failures
                    for entry in map(_entry, db.execute(
                        f"SELECT {_EVENT_COLUMNS} FROM journal_events WHERE correlation_id=? AND kind='failure' "
                        "ORDER BY seq", (cid,),
                    ))
                    if entry.compensation_failure
                ]
                changed = fold_entries(existing, fresh, stuck_after, recoveries(fresh, recorded, earlier))
                _save(db, changed.values())
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return list(changed.values())

        return await self._run(write)

    async def summary(self, correlation_id: str) -> TransactionSummary | None:
        def read(db: sqlite3.Connection) -> TransactionSummary | None:
            row = db.execute(
                f"SELECT {_TX_COLUMNS} FROM journal_transactions WHERE correlation_id=?", (correlation_id,)
            ).fetchone()
            return _summary(row) if row is not None else None

        return await self._run(read)

    async def timeline(self, correlation_id: str) -> list[JournalEntry]:
        def read(db: sqlite3.Connection) -> list[JournalEntry]:
            rows = db.execute(
                f"SELECT {_EVENT_COLUMNS} FROM journal_events WHERE correlation_id=? ORDER BY seq",
                (correlation_id,),
            )
            return [_entry(row) for row in rows]

        return await self._run(read)

    async def snapshot(self, correlation_id: str) -> tuple[TransactionSummary, list[JournalEntry]] | None:
        def read(db: sqlite3.Connection) -> tuple[TransactionSummary, list[JournalEntry]] | None:
            db.execute("BEGIN")  # one snapshot of the file for both reads (WAL: the journal writes on)
            try:
                row = db.execute(
                    f"SELECT {_TX_COLUMNS} FROM journal_transactions WHERE correlation_id=?", (correlation_id,)
                ).fetchone()
                if row is None:
                    return None
                rows = db.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM journal_events WHERE correlation_id=? ORDER BY seq",
                    (correlation_id,),
                ).fetchall()
            finally:
                db.execute("COMMIT")
            return _summary(row), [_entry(row) for row in rows]

        return await self._run(read)

    async def last_entry(self, correlation_id: str) -> JournalEntry | None:
        def read(db: sqlite3.Connection) -> JournalEntry | None:
            row = db.execute(
                f"SELECT {_EVENT_COLUMNS} FROM journal_events WHERE correlation_id=? ORDER BY seq DESC LIMIT 1",
                (correlation_id,),
            ).fetchone()
            return _entry(row) if row is not None else None

        return await self._run(read)

    async def summaries(self, *, status: Status | None, now: float, limit: int) -> list[TransactionSummary]:
        args: list[Any]
        if status is None:
            where, args = "", []
        elif status == "stuck":
            where, args = "WHERE base_status='running' AND deadline <= ?", [now]
        elif status == "running":
            where, args = "WHERE base_status='running' AND deadline > ?", [now]
        else:
            where, args = "WHERE base_status=?", [status]
        sql = f"SELECT {_TX_COLUMNS} FROM journal_transactions {where} ORDER BY started_at DESC, first_seen DESC LIMIT ?"
        return await self._run(lambda db: [_summary(row) for row in db.execute(sql, [*args, limit])])

    async def activity(self, *, since: float, now: float) -> Activity:
        def read(db: sqlite3.Connection) -> Activity:
            db.execute("BEGIN")  # one snapshot of the file for both counts
            try:
                edges = [
                    EdgeCount(*row) for row in db.execute(
                        "SELECT service, type, kind, failed_type, count(*), max(recorded_at) FROM journal_events "
                        "WHERE recorded_at >= ? GROUP BY service, type, kind, failed_type",
                        (since,),
                    )
                ]
                base = dict(db.execute("SELECT base_status, count(*) FROM journal_transactions GROUP BY base_status"))
                [stuck] = db.execute(
                    "SELECT count(*) FROM journal_transactions WHERE base_status='running' AND deadline <= ?", (now,)
                ).fetchone()
            finally:
                db.execute("COMMIT")
            return Activity(edges=edges, statuses=count_statuses(base, stuck))

        return await self._run(read)

    async def due(self, now: float, limit: int) -> list[TransactionSummary]:
        sql = (
            f"SELECT {_TX_COLUMNS} FROM journal_transactions WHERE base_status='running' AND deadline <= ? "
            "AND timed_out=0 ORDER BY deadline LIMIT ?"
        )
        return await self._run(lambda db: [_summary(row) for row in db.execute(sql, (now, limit))])

    async def mark_timed_out(self, correlation_ids: Collection[str]) -> None:
        ids = list(correlation_ids)

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for cid in ids:
                    row = db.execute(
                        f"SELECT {_TX_COLUMNS} FROM journal_transactions WHERE correlation_id=?", (cid,)
                    ).fetchone()
                    if row is not None:
                        summary = _summary(row)
                        summary.timed_out = True
                        _save(db, [summary])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(write)
