"""Join instances in a service's own database, written in the transaction of the handler run.

A service with a database (``Service("shipping", database=...)``) keeps its joins and
compensations there, not in the worker's join store: every arrival is recorded by the
same transaction that commits the handler's state, the inbox record of the event and
the events it emits (:mod:`choreograph.runtime.outbox`). So an arrival is recorded if
and only if its event counts as handled, and a join's completion commits together with
what its function did. Whatever point a process dies at, either all of it happened (the
redelivered event finds its inbox record) or none of it did (the redelivered event
arrives again, completes the join again and runs the function again).

Which arrival completes a join is decided as in the other stores: on SQLite writers
are serialised (one writer per process, ``BEGIN IMMEDIATE`` across processes); on
PostgreSQL the instance row is locked ``FOR UPDATE`` until the transaction ends, so
two replicas recording the last two arrivals run one after the other and the second
sees the first.

The join's function does not run under that decision's lock: the arrival that
completes a join is recorded, the record is rolled back (:meth:`DatabaseJoins.undo`,
giving up SQLite's writer turn or PostgreSQL's row lock), the function runs, and the
arrival is recorded again in the same transaction as the function's own statements.
If that second record does not complete the join with the same arrivals (another
trigger of the slot, or the deadline, came first), the run is retried and its effects
are rolled back. So a slow call in a join function before its ``ctx.transaction()``
holds no lock, as in any other handler; on SQLite, where the writer turn is the whole
file's, holding it would stall every handler of the service in every process.

Tables: ``choreograph_join_instances`` and ``choreograph_join_arrivals`` (on PostgreSQL
the same tables as :class:`~choreograph.stores.joins_postgres.PostgresJoinStore`'s,
migrated by it); created by :func:`prepare`, outside any handler's transaction.
Instances older than :data:`RETENTION` (and past their deadline by as much) are dropped by a handler's transaction at most
once an hour per process (:func:`expire_now`), counted as done once that transaction commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from choreograph._redact import redact
from choreograph.errors import StoreError
from choreograph.stores.joins_base import Arrival, JoinKey, JoinState, JoinStore
from choreograph.stores.joins_sqlite import EXPIRED, join_tables

if TYPE_CHECKING:
    from choreograph.stores.state import StateStore, Transaction

RETENTION = 7 * 86400.0
"""Seconds a join instance is kept in a service database (the worker's default retention)."""
EXPIRE_EVERY = 3600.0

_SQLITE_SCHEMA = join_tables("choreograph_")

_KEY = "grp = $1 AND name = $2 AND correlation = $3"
_CREATE = (
    "INSERT INTO choreograph_join_instances (grp, name, correlation, slots, created_by, created_at, deadline) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
)
_INSTANCE = f"SELECT slots, fired_by, timed_out FROM choreograph_join_instances WHERE {_KEY}"
_STORE = (
    "INSERT INTO choreograph_join_arrivals (grp, name, correlation, slot, event_id, body) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
)
_COUNT = f"SELECT count(*) FROM choreograph_join_arrivals WHERE {_KEY}"
_FIRE = f"UPDATE choreograph_join_instances SET fired_by = $4 WHERE {_KEY}"
_STATE = (
    "SELECT i.slots, i.created_by, i.created_at, i.deadline, i.fired_by, i.timed_out, a.slot, a.event_id, a.body "
    "FROM choreograph_join_instances AS i LEFT JOIN choreograph_join_arrivals AS a "
    "ON a.grp = i.grp AND a.name = i.name AND a.correlation = i.correlation "
    "WHERE i.grp = $1 AND i.name = $2 AND i.correlation = $3"
)
_TIME_OUT = f"UPDATE choreograph_join_instances SET timed_out = $4 WHERE {_KEY} AND fired_by IS NULL"


def _ident(key: JoinKey, tx: Transaction) -> tuple[str, str, str]:
    """The instance's primary key: on PostgreSQL, as :class:`~choreograph.stores.joins_postgres.PostgresJoinStore`
    keys it (a correlation id holding U+0000 or over 2,000 bytes cannot be a key as it is)."""
    if tx.backend == "postgresql":
        from choreograph.stores.joins_postgres import ident

        return ident(key)
    return key.group, key.join, key.correlation


def _event_id(event_id: str, tx: Transaction) -> str:
    """An arrival's event id as stored: on PostgreSQL, U+0000 as its stand-in (text cannot hold it)."""
    if tx.backend == "postgresql":
        from choreograph.stores.joins_postgres import event_id_in

        return event_id_in(event_id)
    return event_id


def _state(rows: Sequence[Any], tx: Transaction) -> JoinState | None:
    if tx.backend == "postgresql":
        from choreograph.stores.joins_postgres import state_of

        return state_of(rows)  # the event ids read back as they arrived
    if not rows:
        return None
    slots, created_by, created_at, deadline, fired_by, timed_out = tuple(rows[0])[:6]
    arrivals = {int(row[6]): Arrival(row[7], bytes(row[8])) for row in rows if row[6] is not None}
    return JoinState(int(slots), arrivals, created_by, float(created_at),
                     None if deadline is None else float(deadline), fired_by, bool(timed_out))


class DatabaseJoins(JoinStore):
    """The join store of one handler run: every call runs in ``transaction()``, the run's own.

    ``DatabaseJoins(ctx.transaction)``; nothing is committed here: the worker commits
    (or rolls back) the run's transaction with everything else the handler did.
    """

    def __init__(
        self,
        transaction: Callable[[], AbstractAsyncContextManager[Transaction]],
        url: str = "",
        *,
        undo: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._transaction = transaction
        self._undo = undo
        self.url = url

    async def undo(self) -> None:
        """Roll back what the run wrote so far and end its transaction (the next call begins
        another): on SQLite that gives up the writer turn, on PostgreSQL the instance's row lock."""
        if self._undo is not None:
            await self._undo()

    async def arrive(
        self, key: JoinKey, slot: int, arrival: Arrival, *, slots: int, now: float, deadline: float | None
    ) -> JoinState:
        async with self._transaction() as tx:
            ident = _ident(key, tx)
            event_id = _event_id(arrival.event_id, tx)
            lock = " FOR UPDATE" if tx.backend == "postgresql" else ""
            row = None
            for _ in range(3):
                # On PostgreSQL another handler's transaction may expire the instance (created over
                # RETENTION ago) after our INSERT found it and before we lock it: create it again.
                await tx.execute(_CREATE, *ident, slots, event_id, now, deadline)
                row = await tx.fetchone(_INSTANCE + lock, *ident)
                if row is not None:
                    break
            if row is not None and row["fired_by"] is None and not row["timed_out"]:
                stored = await tx.execute(_STORE, *ident, slot, event_id, arrival.body)
                if stored and await tx.fetchval(_COUNT, *ident) == row["slots"]:
                    await tx.execute(_FIRE, *ident, event_id)
            state = _state(await tx.fetch(_STATE, *ident), tx)
        if state is None:
            raise StoreError(f"join store {redact(self.url)}: join {key} vanished while recording {arrival.event_id}")
        return state

    async def get(self, key: JoinKey) -> JoinState | None:
        async with self._transaction() as tx:
            return _state(await tx.fetch(_STATE, *_ident(key, tx)), tx)

    async def time_out(self, key: JoinKey) -> JoinState | None:
        async with self._transaction() as tx:
            ident = _ident(key, tx)
            await tx.execute(_TIME_OUT, *ident, True)
            return _state(await tx.fetch(_STATE, *ident), tx)

    async def expire(self, older_than: float) -> int:
        async with self._transaction() as tx:
            await tx.execute(
                "DELETE FROM choreograph_join_arrivals WHERE EXISTS (SELECT 1 FROM choreograph_join_instances AS i "
                "WHERE i.grp = choreograph_join_arrivals.grp AND i.name = choreograph_join_arrivals.name "
                "AND i.correlation = choreograph_join_arrivals.correlation AND "
                + EXPIRED.replace("created_at", "i.created_at").replace("deadline", "i.deadline") + ")",
                older_than,
            )
            return await tx.execute(f"DELETE FROM choreograph_join_instances WHERE {EXPIRED}", older_than)


class _Prepared:
    """Per process and database: whether the tables exist, when old instances were last dropped."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.ready = False
        self.expired_at = 0.0


_PREPARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Prepared]] = weakref.WeakKeyDictionary()


def _prepared(url: str) -> _Prepared:
    return _PREPARED.setdefault(asyncio.get_running_loop(), {}).setdefault(url, _Prepared())


async def prepare(store: StateStore) -> None:
    """Create the join tables in ``store`` if they are missing, once per process.

    Runs outside any handler's transaction (its own connection), so a handler that
    rolls back never takes the tables with it. Cheap once they exist: a read on
    SQLite, a migrations check on PostgreSQL; no write lock is taken then.
    """
    prepared = _prepared(store.url)
    if prepared.ready:
        return
    async with prepared.lock:
        if prepared.ready:
            return
        if store.backend == "postgresql":
            from choreograph.stores.joins_postgres import PostgresJoinStore

            joins = PostgresJoinStore(store.url)  # migrates its tables on open, under an advisory lock
            await joins.open()
            await joins.close()
        else:
            await asyncio.to_thread(_prepare_sqlite, store.url)
        prepared.ready = True


async def expire_now(
    joins: JoinStore, url: str, now: float, when_ended: Callable[[Callable[[bool], None]], None] | None = None
) -> None:
    """Drop instances older than :data:`RETENTION` in the caller's transaction, at most once an hour per process.

    ``when_ended`` (:meth:`~choreograph.runtime.outbox.HandlerUnit.when_ended`) tells how that
    transaction ended: a pass rolled back with it (the run failed, or it completed a join, whose
    first record is rolled back before the function runs) is not done, and the next run does it.
    It counted as done, and old instances stayed another hour, or for good while the hour's first
    run was always one rolled back.
    """
    prepared = _prepared(url)
    if now - prepared.expired_at < EXPIRE_EVERY:
        return
    before, prepared.expired_at = prepared.expired_at, now  # the other runs meanwhile leave it to this one

    def ended(committed: bool) -> None:
        if not committed and prepared.expired_at == now:
            prepared.expired_at = before

    try:
        await joins.expire(now - RETENTION)
    except BaseException:
        ended(False)
        raise
    if when_ended is not None:
        when_ended(ended)


def _prepare_sqlite(url: str) -> None:
    import sqlite3

    from choreograph._sqlite import connect_wal, make_folder
    from choreograph.stores.sqlite import sqlite_path

    path = sqlite_path(url)
    make_folder(path)
    with contextlib.closing(sqlite3.connect(path, timeout=30.0)) as db:
        found = db.execute("SELECT count(*) FROM sqlite_master WHERE name IN "
                           "('choreograph_join_instances', 'choreograph_join_arrivals')").fetchone()[0]
    if found < 2:
        connect_wal(path, schema=_SQLITE_SCHEMA).close()
