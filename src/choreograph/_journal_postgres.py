"""The journal on PostgreSQL: several journal replicas may record into one database.

``postgresql://user@host:5432/db?schema=journal`` (see :mod:`choreograph.stores._pg`
for the URL, ``docs/stores.md`` for the schema). Unlike the SQLite file, the database
may be written by every replica of the ``choreograph.journal`` group at once, so
:meth:`PostgresJournalStore.record` must not lose a fold when two replicas record
events of one transaction together:

* the summaries it folds into are read ``SELECT ... FOR UPDATE`` (in correlation-id
  order, so two writers never wait for each other in a cycle) and written back in the
  same transaction;
* a transaction seen for the first time has no row to lock yet, so every writer first
  takes a transaction-scoped advisory lock per correlation id (in key order); the
  second writer then finds the row the first one created. The same locks make the
  "which event ids are new" decision race-free.

``base_status`` and ``deadline`` are columns: ``stuck`` is ``running`` past the
deadline, filtered at query time (:func:`~choreograph._journal_model.TransactionSummary.status`
is never stored).

PostgreSQL text (and jsonb) cannot hold U+0000, which JSON, so an event, can: it is stored
as the noncharacter U+FFFE and read back as U+0000. An event or correlation id over 2,000
bytes cannot be a btree key: it is keyed as the inbox keys such event ids
(:func:`~choreograph.stores.postgres.stored_id`), so such an event id reads back as its
digest (its children's ``causation_id`` too, so the tree still links them); a correlation id
keeps its full text in ``correlation_full`` and reads back as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
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
from choreograph._redact import redact
from choreograph.errors import StoreError
from choreograph.stores import _pg
from choreograph.stores.postgres import NUL_STAND_IN, stored_id, text_in, text_out

JOURNAL_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS choreograph_journal_events (
        seq bigserial PRIMARY KEY,
        event_id text NOT NULL UNIQUE,
        correlation_id text NOT NULL,
        type text NOT NULL, source text NOT NULL, service text NOT NULL, kind text NOT NULL,
        at double precision NOT NULL, recorded_at double precision NOT NULL,
        causation_id text, time text, attempt integer, deadline double precision,
        failed_type text, compensable boolean NOT NULL, record jsonb
    );
    CREATE INDEX IF NOT EXISTS choreograph_journal_events_cid ON choreograph_journal_events (correlation_id, seq);
    CREATE TABLE IF NOT EXISTS choreograph_journal_transactions (
        correlation_id text PRIMARY KEY,
        base_status text NOT NULL,
        first_seen double precision NOT NULL, last_seen double precision NOT NULL,
        started_at double precision NOT NULL, deadline double precision NOT NULL,
        deadline_explicit boolean NOT NULL, root_type text, event_count integer NOT NULL,
        terminal_type text, terminal_kind text, failures integer NOT NULL, uncompensated integer NOT NULL,
        timed_out boolean NOT NULL
    );
    CREATE INDEX IF NOT EXISTS choreograph_journal_tx_started
        ON choreograph_journal_transactions (started_at DESC, first_seen DESC);
    CREATE INDEX IF NOT EXISTS choreograph_journal_tx_status
        ON choreograph_journal_transactions (base_status, started_at DESC);
    CREATE INDEX IF NOT EXISTS choreograph_journal_tx_due
        ON choreograph_journal_transactions (deadline) WHERE base_status = 'running' AND NOT timed_out;
    """,
    # activity(): the entries of a recent window without reading the whole history. Not covering:
    # an index-only scan needs all-visible pages, and the newest pages of an appended table are not.
    """
    CREATE INDEX IF NOT EXISTS choreograph_journal_events_recorded ON choreograph_journal_events (recorded_at);
    """,
    # A correlation id too long to be the key is keyed by its digest; its text is kept here.
    """
    ALTER TABLE choreograph_journal_transactions ADD COLUMN IF NOT EXISTS correlation_full text;
    """,
    # Each event's trace context (choreograph.timedout carries the transaction's), and the
    # compensations that gave up per transaction, counted from what is already recorded.
    f"""
    ALTER TABLE choreograph_journal_events ADD COLUMN IF NOT EXISTS traceparent text;
    ALTER TABLE choreograph_journal_events ADD COLUMN IF NOT EXISTS tracestate text;
    ALTER TABLE choreograph_journal_transactions
        ADD COLUMN IF NOT EXISTS compensation_failures integer NOT NULL DEFAULT 0;
    UPDATE choreograph_journal_transactions AS t
    SET compensation_failures = f.n, base_status = 'compensation_failed'
    FROM (
        SELECT correlation_id, count(*) AS n FROM choreograph_journal_events
        WHERE kind = 'failure' AND failed_type = '{FAILED}' GROUP BY correlation_id
    ) AS f
    WHERE t.correlation_id = f.correlation_id;
    """,
    # The compensations that gave up, counted again by the journal's current rule
    # (JournalEntry.compensation_failure): also a failure of choreograph.timedout, and one whose
    # record a worker marked "compensation": true (a compensate(...) giving up on its step or
    # a business trigger).
    f"""
    UPDATE choreograph_journal_transactions AS t
    SET compensation_failures = f.n, base_status = 'compensation_failed'
    FROM (
        SELECT correlation_id, count(*) AS n FROM choreograph_journal_events
        WHERE kind = 'failure' AND (failed_type IN ('{FAILED}', '{TIMEDOUT}')
                                    OR record -> '{COMPENSATION_MARK}' = 'true'::jsonb)
        GROUP BY correlation_id
    ) AS f
    WHERE t.correlation_id = f.correlation_id AND t.compensation_failures <> f.n;
    """,
]

# (column, array type) in insert order; record travels as text and is cast to jsonb.
_EVENT_COLUMNS = (
    ("event_id", "text"), ("correlation_id", "text"), ("type", "text"), ("source", "text"),
    ("service", "text"), ("kind", "text"), ("at", "float8"), ("recorded_at", "float8"),
    ("causation_id", "text"), ("time", "text"), ("attempt", "int4"), ("deadline", "float8"),
    ("failed_type", "text"), ("compensable", "bool"), ("traceparent", "text"), ("tracestate", "text"),
    ("record", "text"),
)
_TX_COLUMNS = (
    ("correlation_id", "text"), ("base_status", "text"), ("first_seen", "float8"), ("last_seen", "float8"),
    ("started_at", "float8"), ("deadline", "float8"), ("deadline_explicit", "bool"), ("root_type", "text"),
    ("event_count", "int4"), ("terminal_type", "text"), ("terminal_kind", "text"), ("failures", "int4"),
    ("uncompensated", "int4"), ("timed_out", "bool"), ("correlation_full", "text"),
    ("compensation_failures", "int4"),
)


def _names(columns: Sequence[tuple[str, str]]) -> str:
    return ", ".join(name for name, _ in columns)


def _unnest(columns: Sequence[tuple[str, str]]) -> str:
    """``unnest($1::text[], ...) WITH ORDINALITY AS u(cols..., n)``: many rows in one parameterised statement."""
    arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(columns, start=1))
    return f"unnest({arrays}) WITH ORDINALITY AS u({_names(columns)}, n)"


_SELECT_EVENT = ", ".join("record::text" if name == "record" else name for name, _ in _EVENT_COLUMNS)
_SELECT_TX = _names(_TX_COLUMNS[:1] + _TX_COLUMNS[2:])  # base_status is derived on load

_INSERT_EVENTS = (
    f"INSERT INTO choreograph_journal_events ({_names(_EVENT_COLUMNS)}) "
    f"SELECT {_names(_EVENT_COLUMNS[:-1])}, record::jsonb FROM {_unnest(_EVENT_COLUMNS)} ORDER BY n "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)
_SAVE_SUMMARIES = (
    f"INSERT INTO choreograph_journal_transactions ({_names(_TX_COLUMNS)}) "
    f"SELECT {_names(_TX_COLUMNS)} FROM {_unnest(_TX_COLUMNS)} "
    "ON CONFLICT (correlation_id) DO UPDATE SET "
    + ", ".join(f"{name} = EXCLUDED.{name}" for name, _ in _TX_COLUMNS[1:])
)
_LOCK_SUMMARIES = (
    f"SELECT {_SELECT_TX} FROM choreograph_journal_transactions WHERE correlation_id = ANY($1::text[]) "
    "ORDER BY correlation_id FOR UPDATE"
)
_RECORDED = "SELECT event_id FROM choreograph_journal_events WHERE event_id = ANY($1::text[])"
_FAILURES = (
    f"SELECT {_SELECT_EVENT} FROM choreograph_journal_events "
    "WHERE correlation_id = ANY($1::text[]) AND kind = 'failure' ORDER BY seq"
)
# Volatile calls in the select list run after the sort, so the locks are taken in key order.
_LOCK_CORRELATIONS = (
    "SELECT pg_advisory_xact_lock(k) FROM "
    "(SELECT DISTINCT hashtextextended('choreograph-journal:' || c, 0) AS k FROM unnest($1::text[]) AS c) AS keys "
    "ORDER BY k"
)


_DIGEST = NUL_STAND_IN + "sha256:"  # how stored_id() begins a long id's digest
T = TypeVar("T")


def _in(value: T) -> T:
    """Text as stored: U+0000 as U+FFFE (PostgreSQL text cannot hold it; see :func:`text_in`)."""
    if isinstance(value, str):
        return text_in(value)  # type: ignore[return-value]
    return value


def _out(value: T) -> T:
    """Stored text as it was (the inverse of :func:`_in`); a long id's digest stays a digest."""
    if isinstance(value, str) and not value.startswith(_DIGEST):
        return text_out(value)  # type: ignore[return-value]
    return value


def _key(value: str | None) -> str | None:
    """An event or correlation id as the key it is stored under."""
    return stored_id(value) if value is not None else None


def _walk(value: Any, text: Callable[[str], str]) -> Any:
    """A JSON value with ``text`` applied to every string in it, keys included."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {text(k): _walk(v, text) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, text) for v in value]
    return value


def _entry_row(entry: JournalEntry) -> tuple[Any, ...]:
    record = orjson.dumps(_walk(entry.record, _in)).decode() if entry.record is not None else None
    return (
        _key(entry.event_id), _key(entry.correlation_id), _in(entry.type), _in(entry.source), _in(entry.service),
        entry.kind, entry.at, entry.recorded_at, _key(entry.causation_id), _in(entry.time), entry.attempt,
        entry.deadline, _in(entry.failed_type), entry.compensable, _in(entry.traceparent), _in(entry.tracestate),
        record,
    )


def _entry(row: Sequence[Any], correlation_id: str) -> JournalEntry:
    return JournalEntry(
        event_id=_out(row[0]), correlation_id=correlation_id, type=_out(row[2]), source=_out(row[3]),
        service=_out(row[4]), kind=row[5], at=row[6], recorded_at=row[7], causation_id=_out(row[8]),
        time=_out(row[9]), attempt=row[10], deadline=row[11], failed_type=_out(row[12]), compensable=row[13],
        traceparent=_out(row[14]), tracestate=_out(row[15]),
        record=_walk(orjson.loads(row[16]), _out) if row[16] is not None else None,
    )


def _summary_row(s: TransactionSummary) -> tuple[Any, ...]:
    key = stored_id(s.correlation_id)
    return (
        key, s.base_status, s.first_seen, s.last_seen, s.started_at, s.deadline, s.deadline_explicit,
        _in(s.root_type), s.event_count, _in(s.terminal_type), s.terminal_kind, s.failures, s.uncompensated,
        s.timed_out, _in(s.correlation_id) if key.startswith(_DIGEST) else None, s.compensation_failures,
    )


def _summary(row: Sequence[Any]) -> TransactionSummary:
    return TransactionSummary(
        correlation_id=_out(row[13] if row[13] is not None else row[0]), first_seen=row[1], last_seen=row[2],
        started_at=row[3], deadline=row[4], deadline_explicit=row[5], root_type=_out(row[6]), event_count=row[7],
        terminal_type=_out(row[8]), terminal_kind=row[9], failures=row[10], uncompensated=row[11],
        timed_out=row[12], compensation_failures=row[14],
    )


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows turned into one list per column (the arrays ``unnest`` takes)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


async def _save(conn: Any, summaries: Collection[TransactionSummary]) -> None:
    if summaries:
        await conn.execute(_SAVE_SUMMARIES, *_columns([_summary_row(s) for s in summaries], len(_TX_COLUMNS)))


class PostgresJournalStore(_pg.PooledStore, JournalStore):
    """``PostgresJournalStore("postgresql://user@host/db?schema=journal")``; tables are created on open.

    ``read_only`` (``trace``, ``transactions``, ``watch``, the gateway) creates and migrates
    nothing: a schema without a journal (a mistyped ``?schema=``) or with an older one is a
    :class:`StoreError` saying so. Opened as the journal opens it, a mistyped schema became a
    new, empty journal that listed no transactions, and a reader needed the rights to create one.
    """

    WHAT = "journal store"
    COMPONENT = "journal"
    MIGRATIONS = JOURNAL_MIGRATIONS
    read_only = False

    async def open(self) -> None:
        if not self.read_only:
            await super().open()
            return
        if self._pool is not None:
            return
        closes = self._closes
        pool = await _pg.create_pool(self.config)
        try:
            await self._check_version(pool)
            self._refuse_if_closed_since(closes)
        except BaseException:
            await pool.close()
            raise
        if self._pool is not None:  # another open finished meanwhile: its pool is the one kept
            await pool.close()
            return
        self._pool = pool

    async def _check_version(self, pool: Any) -> None:
        """Raise :class:`StoreError` unless the schema holds a journal of the current version."""
        where = f"journal store {redact(self.url)}"
        with _pg.translate(where):
            table = await pool.fetchval(
                "SELECT to_regclass(format('%I.choreograph_migrations', $1::text)) IS NOT NULL", self.config.schema
            )
            version = 0 if not table else await pool.fetchval(
                "SELECT coalesce(max(version), 0) FROM choreograph_migrations WHERE component = $1", self.COMPONENT
            )
        if not version:
            raise StoreError(
                f"{where}: no journal in schema {self.config.schema!r} (check ?schema=; "
                "the journal, `choreograph journal`, creates it)"
            )
        if version < len(self.MIGRATIONS):
            raise StoreError(
                f"{where}: written by an older choreograph and opened read-only; "
                "the journal (`choreograph journal`) must open it once to migrate it"
            )

    async def record(self, entries: Sequence[JournalEntry], *, stuck_after: float) -> list[TransactionSummary]:
        unique: dict[str, JournalEntry] = {}
        for entry in entries:
            unique.setdefault(stored_id(entry.event_id), entry)
        if not unique:
            return []
        rows = [_entry_row(entry) for entry in unique.values()]
        cids = sorted({stored_id(entry.correlation_id) for entry in unique.values()})
        pool = self._open_pool()
        with _pg.translate(f"journal store {redact(self.url)}"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(_LOCK_CORRELATIONS, cids)
                inserted = {row[0] for row in await conn.fetch(_INSERT_EVENTS, *_columns(rows, len(_EVENT_COLUMNS)))}
                fresh = [entry for key, entry in unique.items() if key in inserted]
                touched = sorted({stored_id(entry.correlation_id) for entry in fresh})
                existing = {
                    summary.correlation_id: summary
                    for summary in map(_summary, await conn.fetch(_LOCK_SUMMARIES, touched))
                } if touched else {}
                rids = sorted({rid for entry in fresh if (rid := entry.recovery_id) is not None})
                held = {row[0] for row in await conn.fetch(_RECORDED, [stored_id(rid) for rid in rids])} if rids else set()
                # the compensation failures still counted: only those transactions' failures are read
                pending = {stored_id(cid): cid for cid, summary in existing.items() if summary.compensation_failures}
                earlier = [
                    entry
                    for entry in (_entry(row, pending[row[1]]) for row in await conn.fetch(_FAILURES, list(pending)))
                    if entry.compensation_failure
                ] if pending else []
                recorded = {rid for rid in rids if stored_id(rid) in held}
                changed = fold_entries(existing, fresh, stuck_after, recoveries(fresh, recorded, earlier))
                await _save(conn, changed.values())
        return list(changed.values())

    async def summary(self, correlation_id: str) -> TransactionSummary | None:
        with _pg.translate(f"journal store {redact(self.url)}"):
            row = await self._open_pool().fetchrow(
                f"SELECT {_SELECT_TX} FROM choreograph_journal_transactions WHERE correlation_id = $1",
                stored_id(correlation_id),
            )
        return _summary(row) if row is not None else None

    async def timeline(self, correlation_id: str) -> list[JournalEntry]:
        with _pg.translate(f"journal store {redact(self.url)}"):
            rows = await self._open_pool().fetch(
                f"SELECT {_SELECT_EVENT} FROM choreograph_journal_events WHERE correlation_id = $1 ORDER BY seq",
                stored_id(correlation_id),
            )
        return [_entry(row, correlation_id) for row in rows]

    async def snapshot(self, correlation_id: str) -> tuple[TransactionSummary, list[JournalEntry]] | None:
        pool = self._open_pool()
        key = stored_id(correlation_id)
        with _pg.translate(f"journal store {redact(self.url)}"):
            # one snapshot for both reads: replicas record on while the gateway or trace reads
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(
                    f"SELECT {_SELECT_TX} FROM choreograph_journal_transactions WHERE correlation_id = $1", key
                )
                if row is None:
                    return None
                rows = await conn.fetch(
                    f"SELECT {_SELECT_EVENT} FROM choreograph_journal_events WHERE correlation_id = $1 ORDER BY seq",
                    key,
                )
        return _summary(row), [_entry(row, correlation_id) for row in rows]

    async def last_entry(self, correlation_id: str) -> JournalEntry | None:
        with _pg.translate(f"journal store {redact(self.url)}"):
            row = await self._open_pool().fetchrow(
                f"SELECT {_SELECT_EVENT} FROM choreograph_journal_events WHERE correlation_id = $1 "
                "ORDER BY seq DESC LIMIT 1",
                stored_id(correlation_id),
            )
        return _entry(row, correlation_id) if row is not None else None

    async def summaries(self, *, status: Status | None, now: float, limit: int) -> list[TransactionSummary]:
        args: list[Any]
        if status is None:
            where, args = "", []
        elif status == "stuck":
            where, args = "WHERE base_status = 'running' AND deadline <= $1", [now]
        elif status == "running":
            where, args = "WHERE base_status = 'running' AND deadline > $1", [now]
        else:
            where, args = "WHERE base_status = $1", [status]
        sql = (
            f"SELECT {_SELECT_TX} FROM choreograph_journal_transactions {where} "
            f"ORDER BY started_at DESC, first_seen DESC LIMIT ${len(args) + 1}"
        )
        with _pg.translate(f"journal store {redact(self.url)}"):
            rows = await self._open_pool().fetch(sql, *args, limit)
        return [_summary(row) for row in rows]

    async def activity(self, *, since: float, now: float) -> Activity:
        pool = self._open_pool()
        with _pg.translate(f"journal store {redact(self.url)}"):
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                edge_rows = await conn.fetch(
                    "SELECT service, type, kind, failed_type, count(*), max(recorded_at) "
                    "FROM choreograph_journal_events WHERE recorded_at >= $1 "
                    "GROUP BY service, type, kind, failed_type",
                    since,
                )
                status_rows = await conn.fetch(
                    "SELECT base_status, count(*), "
                    "count(*) FILTER (WHERE base_status = 'running' AND deadline <= $1) "
                    "FROM choreograph_journal_transactions GROUP BY base_status",
                    now,
                )
        return Activity(
            edges=[EdgeCount(_out(row[0]), _out(row[1]), row[2], _out(row[3]), row[4], row[5]) for row in edge_rows],
            statuses=count_statuses({row[0]: row[1] for row in status_rows}, sum(row[2] for row in status_rows)),
        )

    async def due(self, now: float, limit: int) -> list[TransactionSummary]:
        with _pg.translate(f"journal store {redact(self.url)}"):
            rows = await self._open_pool().fetch(
                f"SELECT {_SELECT_TX} FROM choreograph_journal_transactions "
                "WHERE base_status = 'running' AND NOT timed_out AND deadline <= $1 ORDER BY deadline LIMIT $2",
                now, limit,
            )
        return [_summary(row) for row in rows]

    async def mark_timed_out(self, correlation_ids: Collection[str]) -> None:
        ids = sorted({stored_id(cid) for cid in correlation_ids})
        if not ids:
            return
        pool = self._open_pool()
        with _pg.translate(f"journal store {redact(self.url)}"):
            async with pool.acquire() as conn, conn.transaction():
                summaries = [_summary(row) for row in await conn.fetch(_LOCK_SUMMARIES, ids)]
                for summary in summaries:
                    summary.timed_out = True  # may turn a failed end into compensated: base_status is re-derived
                await _save(conn, summaries)
