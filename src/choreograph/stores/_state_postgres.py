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

* **Round trips.** A transaction is ``BEGIN``, your statements, then one simple-query
  string that writes the inbox record, the outbox rows and the ``NOTIFY`` and
  commits: the values are inlined as escaped literals (``standard_conforming_strings``
  is forced on) because a simple query is the only way to send several statements in
  one round trip. If the event was already processed the inbox insert violates its
  primary key, PostgreSQL skips the rest (no ``COMMIT``) and the transaction is
  rolled back: a concurrent duplicate waits for the first to commit, then vanishes.

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
from choreograph.stores.postgres import PostgresStore
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

_INBOX_PKEY = "choreograph_inbox_pkey"


def _text(value: str) -> str:
    """A SQL string literal (with ``standard_conforming_strings=on``, only quotes need doubling)."""
    if "\x00" in value:
        raise StoreError("a NUL character cannot be stored in PostgreSQL text")
    return "'" + value.replace("'", "''") + "'"


def _bytea(value: bytes) -> str:
    return "'\\x" + value.hex() + "'::bytea"


def commit_script(
    *,
    inbox: tuple[str, str] | None,
    service: str,
    messages: Sequence[Message],
    now: float,
    channel: str,
    forget_failures: bool,
) -> str:
    """The statements that end a transaction: inbox record, outbox rows, NOTIFY, COMMIT."""
    statements = []
    if inbox is not None:
        group, event_id = _text(inbox[0]), _text(inbox[1])
        if forget_failures:
            statements.append(f"DELETE FROM choreograph_failures WHERE grp = {group} AND event_id = {event_id}")
        statements.append(
            f"INSERT INTO choreograph_inbox (grp, event_id, processed_at) VALUES ({group}, {event_id}, {now!r})"
        )
    if messages:
        svc = _text(service)
        rows = ", ".join(
            f"({svc}, {_text(m.id)}, {_text(m.type)}, {_bytea(m.body)}, {now!r})" for m in messages
        )
        statements.append(f"INSERT INTO choreograph_outbox (service, event_id, type, body, created_at) VALUES {rows}")
        statements.append(f"SELECT pg_notify({_text(channel)}, {svc})")
    statements.append("COMMIT")
    return ";\n".join(statements)


class _Tx(TxConnection):
    """One user transaction on one pooled connection, begun with its first statement."""

    def __init__(self, store: PostgresStateStore) -> None:
        self.store = store
        self.conn: Any = None
        self.done = False

    async def _ensure(self) -> Any:
        if self.done:
            raise StoreError(f"database {self.store.url}: the transaction is already finished")
        if self.conn is None:
            pool = self.store._pool()
            with _pg.translate(f"database {self.store.url}"):
                conn = await pool.acquire()
                try:
                    await conn.execute("BEGIN")
                except BaseException:
                    await self.store._release(conn)
                    raise
            self.conn = conn
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

    async def commit(
        self,
        *,
        inbox: tuple[str, str] | None,
        service: str,
        messages: Sequence[Message],
        forget_failures: bool = True,
    ) -> bool:
        conn = await self._ensure()
        script = commit_script(inbox=inbox, service=service, messages=messages, now=time.time(),
                               channel=self.store.channel, forget_failures=forget_failures)
        try:
            try:
                status = await conn.execute(script)
            except Exception as exc:
                if getattr(exc, "constraint_name", None) == _INBOX_PKEY:
                    return False  # another consumer committed this event first: roll ours back
                with _pg.translate(f"database {self.store.url}"):
                    raise
            if status != "COMMIT":  # PostgreSQL answers ROLLBACK to COMMIT in an aborted transaction
                raise StoreError(f"database {self.store.url}: the transaction was rolled back ({status})")
            self.done = True  # committed: nothing to roll back
        finally:
            await self._close()
        if messages:
            self.store.wake(service)  # the NOTIFY reaches other processes; this wakes our own relay sooner
        return True

    async def rollback(self) -> None:
        await self._close()

    async def _close(self) -> None:
        """Roll back unless committed, and give the connection back to the pool."""
        conn, self.conn = self.conn, None
        rolled_back = not self.done
        self.done = True
        if conn is None:
            return
        try:
            if rolled_back:
                await conn.execute("ROLLBACK")
        except Exception:  # a broken connection: the pool discards it below
            conn.terminate()
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

    def _session_settings(self) -> dict[str, str]:
        return {"standard_conforming_strings": "on"}  # commit_script's literals rely on it

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
