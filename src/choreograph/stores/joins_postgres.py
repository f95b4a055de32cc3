"""Join instances on PostgreSQL: every replica of a service, on any host, shares them.

``postgresql://user@host/db?schema=shipping`` — usually the service's inbox URL
(:func:`~choreograph.stores.joins_base.join_store_beside`), so joins live in the same
schema as the inbox; the tables do not clash.

Which arrival completes a join is decided under the instance's row lock: ``arrive``
creates the instance (``INSERT ... ON CONFLICT DO NOTHING``: a second creator waits for
the first to commit, then finds its row), locks it ``FOR UPDATE``, and only then
stores its arrival and counts the slots. Two replicas recording the last two arrivals
at once therefore run one after the other, and the second sees the first's arrival:
exactly one of them fills the last slot. A slot keeps its first arrival (its primary
key); a timed-out or fired instance stores nothing more.

The correlation id is keyed as the inbox keys event ids (:func:`~choreograph.stores.postgres.stored_id`):
one holding U+0000 or longer than 2,000 bytes cannot be a primary key as it is. An arrival's
event id (also ``created_by`` and ``fired_by``) is not a key, so a long one is kept as it is,
but its U+0000 is stored as ``stored_id`` stores it (:data:`~choreograph.stores.postgres.NUL_STAND_IN`)
and read back as U+0000: the runtime compares these ids with the arriving event's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from choreograph._redact import redact
from choreograph.errors import StoreError
from choreograph.stores import _pg
from choreograph.stores.joins_base import Arrival, JoinKey, JoinState, JoinStore
from choreograph.stores.joins_sqlite import EXPIRED
from choreograph.stores.postgres import stored_id, text_in, text_out

JOINS_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS choreograph_join_instances (
        grp text NOT NULL, name text NOT NULL, correlation text NOT NULL,
        slots integer NOT NULL, created_by text NOT NULL, created_at double precision NOT NULL,
        deadline double precision, fired_by text, timed_out boolean NOT NULL DEFAULT false,
        PRIMARY KEY (grp, name, correlation)
    );
    CREATE INDEX IF NOT EXISTS choreograph_join_instances_age ON choreograph_join_instances (created_at);
    CREATE TABLE IF NOT EXISTS choreograph_join_arrivals (
        grp text NOT NULL, name text NOT NULL, correlation text NOT NULL, slot integer NOT NULL,
        event_id text NOT NULL, body bytea NOT NULL,
        PRIMARY KEY (grp, name, correlation, slot),
        FOREIGN KEY (grp, name, correlation) REFERENCES choreograph_join_instances ON DELETE CASCADE
    );
    """,
]

_KEY = "grp = $1 AND name = $2 AND correlation = $3"

_CREATE = (
    "INSERT INTO choreograph_join_instances (grp, name, correlation, slots, created_by, created_at, deadline) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
)
_LOCK = f"SELECT fired_by IS NULL AND NOT timed_out FROM choreograph_join_instances WHERE {_KEY} FOR UPDATE"
# One statement: store the arrival in its slot if free; if that filled the last slot, this arrival fires.
# The count reads the statement's snapshot (without the row being inserted), hence "+ stored".
_STORE = f"""
WITH stored AS (
    INSERT INTO choreograph_join_arrivals (grp, name, correlation, slot, event_id, body)
    VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1
)
UPDATE choreograph_join_instances SET fired_by = $5
WHERE {_KEY} AND EXISTS (SELECT 1 FROM stored)
  AND slots = (SELECT count(*) FROM choreograph_join_arrivals WHERE {_KEY}) + 1
"""
_STATE = """
SELECT i.slots, i.created_by, i.created_at, i.deadline, i.fired_by, i.timed_out, a.slot, a.event_id, a.body
FROM choreograph_join_instances AS i
LEFT JOIN choreograph_join_arrivals AS a USING (grp, name, correlation)
WHERE i.grp = $1 AND i.name = $2 AND i.correlation = $3
"""
_TIME_OUT = f"UPDATE choreograph_join_instances SET timed_out = true WHERE {_KEY} AND fired_by IS NULL"


def event_id_in(event_id: str) -> str:
    """An arrival's event id as stored (PostgreSQL text cannot hold U+0000: see :func:`stored_id`)."""
    return text_in(event_id)


def event_id_out(stored: str | None) -> str | None:
    """A stored event id as it arrived (the inverse of :func:`event_id_in`)."""
    return text_out(stored) if stored is not None else None


def ident(key: JoinKey) -> tuple[str, str, str]:
    """The primary key of ``key``'s instance (see :func:`~choreograph.stores.postgres.stored_id`)."""
    return key.group, key.join, stored_id(key.correlation)


def state_of(rows: Sequence[Any]) -> JoinState | None:
    """The instance from its rows joined with its arrivals (one row per arrival, one if none), its
    event ids as they arrived (also :class:`~choreograph.stores.joins_database.DatabaseJoins`')."""
    if not rows:
        return None
    slots, created_by, created_at, deadline, fired_by, timed_out = tuple(rows[0])[:6]
    arrivals = {int(row[6]): Arrival(str(event_id_out(row[7])), bytes(row[8])) for row in rows if row[6] is not None}
    return JoinState(int(slots), arrivals, str(event_id_out(created_by)), float(created_at),
                     None if deadline is None else float(deadline), event_id_out(fired_by), bool(timed_out))


class PostgresJoinStore(_pg.PooledStore, JoinStore):
    """``PostgresJoinStore("postgresql://user@host/db?schema=shipping")``; tables are created on open."""

    WHAT = "join store"
    COMPONENT = "joins"
    MIGRATIONS = JOINS_MIGRATIONS

    async def arrive(
        self, key: JoinKey, slot: int, arrival: Arrival, *, slots: int, now: float, deadline: float | None
    ) -> JoinState:
        row = ident(key)
        event_id = event_id_in(arrival.event_id)
        with _pg.translate(f"join store {redact(self.url)}"):
            async with self._open_pool().acquire() as conn, conn.transaction():
                is_open: bool | None = None
                for _ in range(3):  # no row to lock: expire() deleted it after our INSERT found it; create again
                    await conn.execute(_CREATE, *row, slots, event_id, now, deadline)
                    is_open = await conn.fetchval(_LOCK, *row)
                    if is_open is not None:
                        break
                if is_open:
                    await conn.execute(_STORE, *row, slot, event_id, arrival.body)
                state = state_of(await conn.fetch(_STATE, *row))
        if state is None:
            raise StoreError(f"join store {redact(self.url)}: join {key} vanished while recording {arrival.event_id}")
        return state

    async def get(self, key: JoinKey) -> JoinState | None:
        with _pg.translate(f"join store {redact(self.url)}"):
            return state_of(await self._open_pool().fetch(_STATE, *ident(key)))

    async def time_out(self, key: JoinKey) -> JoinState | None:
        row = ident(key)
        with _pg.translate(f"join store {redact(self.url)}"):
            async with self._open_pool().acquire() as conn, conn.transaction():
                await conn.execute(_TIME_OUT, *row)
                return state_of(await conn.fetch(_STATE, *row))

    async def expire(self, older_than: float) -> int:
        with _pg.translate(f"join store {redact(self.url)}"):
            status = await self._open_pool().execute(
                f"DELETE FROM choreograph_join_instances WHERE {EXPIRED}", older_than  # arrivals cascade
            )
        return _pg.rowcount(status)
