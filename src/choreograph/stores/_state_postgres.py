"""A service database on PostgreSQL: state, inbox and outbox in one transaction (asyncpg).

``postgresql://user@host:5432/db?schema=package`` — the inbox tables are those of
:class:`~choreograph.stores.postgres.PostgresStore`; this adds the outbox and the
relay claim row. Transactions run concurrently (one pooled connection each, READ
COMMITTED). Two properties matter for the outbox:

* **Order.** Outbox rows are inserted at commit time, last in the transaction, so a
  transaction that read or overwrote another's rows got its ``seq`` after that one
  committed: ``seq`` order is a valid commit order per service.
* **Claims.** A relay publishes a service's rows only while holding that service's
  ``choreograph_relay`` row (``FOR UPDATE SKIP LOCKED``) in an open transaction; a
  standby skips it. A killed relay's session ends, PostgreSQL releases the lock and a
  standby republishes whatever was not marked sent — with the same ids.

Commits that wrote outbox rows ``NOTIFY`` the channel ``choreograph_outbox_<schema>``
with the service name; relays ``LISTEN`` on a dedicated connection, so they wake in
any process without polling (they still poll slowly in case a notification is lost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from choreograph.errors import StoreError
from choreograph.stores import _pg
from choreograph.stores.postgres import MARK_ONE, PostgresStore
from choreograph.stores.state import OutboxLag, RelayPublish, Row, StateStore, TxConnection
from choreograph.transports.base import Message

log = logging.getLogger("choreograph.outbox")

OUTBOX_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS choreograph_outbox (
        seq bigserial PRIMARY KEY,
        service text NOT NULL,
        event_id text NOT NULL,
        type text NOT NULL,
        body bytea NOT NULL,
        created_at double precision NOT NULL,
        sent_at double precision
    );
    CREATE INDEX IF NOT EXISTS choreograph_outbox_pending ON choreograph_outbox (service, seq)
        WHERE sent_at IS NULL;
    CREATE INDEX IF NOT EXISTS choreograph_outbox_sent ON choreograph_outbox (sent_at)
        WHERE sent_at IS NOT NULL;
    CREATE TABLE IF NOT EXISTS choreograph_relay (service text PRIMARY KEY);
    """,
]

_INSERT_OUTBOX = """
WITH rows AS (
    INSERT INTO choreograph_outbox (service, event_id, type, body, created_at)
    SELECT $1, u.event_id, u.type, u.body, $5
    FROM unnest($2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY AS u(event_id, type, body, n)
    ORDER BY u.n
    RETURNING 1
)
SELECT pg_notify($6, $1) FROM (SELECT 1 FROM rows LIMIT 1) AS inserted
"""


class _Tx(TxConnection):
    """One user transaction on one pooled connection, begun with its first statement."""

    def __init__(self, store: PostgresStateStore) -> None:
        self.store = store
        self.conn: Any = None
        self.tr: Any = None
        self.done = False

    async def _ensure(self) -> Any:
        if self.done:
            raise StoreError(f"database {self.store.url}: the transaction is already finished")
        if self.conn is None:
            pool = self.store._pool()
            with _pg.translate(f"database {self.store.url}"):
                conn = await pool.acquire()
                try:
                    tr = conn.transaction()
                    await tr.start()
                except BaseException:
                    await self.store._release(conn)
                    raise
            self.conn, self.tr = conn, tr
        return self.conn

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        conn = await self._ensure()
        with _pg.translate(f"database {self.store.url}"):
            return _pg.rowcount(await conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        conn = await self._ensure()
        with _pg.translate(f"database {self.store.url}"):
            await conn.executemany(sql, rows)

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Row]:
        conn = await self._ensure()
        with _pg.translate(f"database {self.store.url}"):
            return list(await conn.fetch(sql, *args))

    async def fetchone(self, sql: str, args: Sequence[Any]) -> Row | None:
        conn = await self._ensure()
        with _pg.translate(f"database {self.store.url}"):
            return await conn.fetchrow(sql, *args)

    async def commit(self, *, inbox: tuple[str, str] | None, service: str, messages: Sequence[Message]) -> bool:
        conn = await self._ensure()
        now = time.time()
        try:
            with _pg.translate(f"database {self.store.url}"):
                if inbox is not None and _pg.rowcount(await conn.execute(MARK_ONE, *inbox, now)) == 0:
                    await self._end(commit=False)
                    return False
                if messages:
                    await conn.execute(
                        _INSERT_OUTBOX, service, [m.id for m in messages], [m.type for m in messages],
                        [m.body for m in messages], now, self.store.channel,
                    )
                await self._end(commit=True)
        finally:
            await self._end(commit=False)  # no-op after a successful commit
        if messages:
            self.store.wake(service)  # the NOTIFY reaches other processes; this wakes our own relay sooner
        return True

    async def rollback(self) -> None:
        with _pg.translate(f"database {self.store.url}"):
            await self._end(commit=False)

    async def _end(self, *, commit: bool) -> None:
        if self.done:
            return
        self.done = True
        conn, tr, self.conn, self.tr = self.conn, self.tr, None, None
        if conn is None:
            return
        try:
            if commit:
                await tr.commit()
            else:
                await tr.rollback()
        finally:
            await self.store._release(conn)


class PostgresStateStore(StateStore, PostgresStore):
    backend = "postgresql"

    def __init__(self, url: str) -> None:
        StateStore.__init__(self, url)
        PostgresStore.__init__(self, url)
        self.channel = f"choreograph_outbox_{self.config.schema}"[:63]
        self._listener: Any = None
        self._listen_retry_at = 0.0
        self._relay_rows: set[str] = set()

    def _migrations(self) -> list[tuple[str, list[str]]]:
        return [*super()._migrations(), ("outbox", OUTBOX_MIGRATIONS)]

    async def _connect(self) -> None:
        await PostgresStore.open(self)

    async def _disconnect(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await listener.close(timeout=2)
            except Exception:
                listener.terminate()
        self._relay_rows.clear()
        await PostgresStore.close(self)

    async def _release(self, conn: Any) -> None:
        try:
            await self._pool().release(conn)
        except Exception:  # a broken connection: drop it rather than return it to the pool
            conn.terminate()

    async def begin(self) -> TxConnection:
        self._pool()
        return _Tx(self)

    # -- outbox -----------------------------------------------------------------------

    async def relay_pass(self, service: str, owner: str, limit: int, publish: RelayPublish) -> int | None:
        pool = self._pool()
        what = f"outbox {self.url}"
        if service not in self._relay_rows:
            with _pg.translate(what):
                await pool.execute("INSERT INTO choreograph_relay (service) VALUES ($1) ON CONFLICT DO NOTHING", service)
            self._relay_rows.add(service)
        with _pg.translate(what):
            conn = await pool.acquire()
        try:
            with _pg.translate(what):
                tr = conn.transaction()
                await tr.start()
            finished = False
            try:
                with _pg.translate(what):
                    claimed = await conn.fetchval(
                        "SELECT 1 FROM choreograph_relay WHERE service = $1 FOR UPDATE SKIP LOCKED", service
                    )
                    if claimed is None:
                        return None
                    rows = await conn.fetch(
                        "SELECT seq, event_id, type, body FROM choreograph_outbox"
                        " WHERE service = $1 AND sent_at IS NULL ORDER BY seq LIMIT $2",
                        service, limit,
                    )
                if rows:
                    await publish([Message(row[1], row[2], bytes(row[3])) for row in rows])
                    with _pg.translate(what):
                        await conn.execute(
                            "UPDATE choreograph_outbox SET sent_at = $2 WHERE seq = ANY($1::bigint[])",
                            [row[0] for row in rows], time.time(),
                        )
                with _pg.translate(what):
                    await tr.commit()
                finished = True
                return len(rows)
            finally:
                if not finished:
                    try:
                        await tr.rollback()
                    except Exception:  # the connection broke; releasing it below discards it
                        pass
        finally:
            await self._release(conn)

    async def outbox_lag(self, service: str) -> OutboxLag:
        with _pg.translate(f"outbox {self.url}"):
            row = await self._pool().fetchrow(
                "SELECT count(*), min(created_at) FROM choreograph_outbox WHERE service = $1 AND sent_at IS NULL",
                service,
            )
        oldest = row[1]
        return OutboxLag(int(row[0]), max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    async def purge_sent(self, older_than: float) -> int:
        with _pg.translate(f"outbox {self.url}"):
            status = await self._pool().execute(
                "DELETE FROM choreograph_outbox WHERE sent_at IS NOT NULL AND sent_at < $1", older_than
            )
        return _pg.rowcount(status)

    # -- wake-ups ---------------------------------------------------------------------

    async def wait_outbox(self, service: str, within: float) -> None:
        await self._listen()
        await super().wait_outbox(service, within)

    async def _listen(self) -> None:
        """LISTEN on a dedicated connection; on failure fall back to polling and retry later."""
        if self._listener is not None and not self._listener.is_closed():
            return
        now = time.monotonic()
        if now < self._listen_retry_at:
            return
        self._listen_retry_at = now + 5.0
        try:
            conn = await _pg.connect(self.config)
            await conn.add_listener(self.channel, self._notified)
        except Exception as exc:
            log.warning("cannot LISTEN on %s (%s): relays poll instead", self.url, exc)
            return
        self._listener = conn
        for service in list(self._wakers):  # catch up with commits made while nobody listened
            self.wake(service)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.wake(payload)
