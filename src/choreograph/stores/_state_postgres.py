"""A service database on PostgreSQL: state, inbox and outbox in one transaction (asyncpg).

``postgresql://user@host:5432/db?schema=package`` — the inbox tables are those of
:class:`~choreograph.stores.postgres.PostgresStore`; this adds the outbox and the
relay claim row. Transactions run concurrently (one pooled connection each, READ
COMMITTED) on a :class:`~choreograph.stores._pg_pool.HandoffPool`. Two properties matter
for the outbox:

* **Order.** Outbox rows are inserted at commit time, last in the transaction, so a
  transaction that read or overwrote another's rows got its ``seq`` after that one
  committed: ``seq`` order is a valid commit order per service.
* **Claims.** A relay publishes a service's rows only while holding that service's
  ``choreograph_relay`` row (``FOR UPDATE SKIP LOCKED``) in an open transaction; a
  standby skips it. A killed relay's session ends, PostgreSQL releases the lock and a
  standby republishes whatever was not marked sent — with the same ids.
* **U+0000.** PostgreSQL text cannot hold it: a row's event id and type keep theirs as
  U+FFFE, a genuine U+FFFE or U+FFFF escaped (as join arrivals do,
  :func:`~choreograph.stores.postgres.text_in`), and the relay publishes them as they
  were committed.

* **Round trips.** A transaction is ``BEGIN``, your statements, then one simple-query
  string that writes the inbox record and the outbox rows and commits: the values are
  inlined as escaped literals (``standard_conforming_strings`` is forced on) because a
  simple query is the only way to send several statements in one round trip. If
  another transaction is waiting for a connection, the string ends with its ``BEGIN``
  and the connection is handed over begun, so under load a transaction costs one
  round trip plus one per statement. If the event was already processed the inbox
  insert violates its primary key, PostgreSQL skips the rest (no ``COMMIT``) and the
  transaction is rolled back: a concurrent duplicate waits for the first to commit,
  then vanishes.

**Wake-ups.** A commit that wrote outbox rows wakes this process's relay of the
service directly. Only when none runs here does it ``NOTIFY`` the channel
``choreograph_outbox_<schema>`` (payload: the service), which relays ``LISTEN`` to on
a dedicated connection: a ``NOTIFY`` takes a database-wide lock at commit that
serialises every notifying commit, fsync included. A relay woken by such quiet
commits that finds another process's relay holding the claim sends one ``NOTIFY``
itself, so the holder passes again and sees them; a pass that fails before it could
(the database busy, a connection lost) leaves that ``NOTIFY`` owed to the next pass. Relays still poll slowly in case a
notification is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from choreograph._clock import stamp_time
from choreograph._redact import redact
from choreograph.errors import StoreError
from choreograph.stores import _pg
from choreograph.stores._pg_pool import HandoffPool, closed_if_interrupted
from choreograph.stores.joins_postgres import event_id_in, event_id_out
from choreograph.stores.postgres import PostgresStore, stored_id
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
    channel: str | None,
    forget_failures: bool,
    begin_next: bool = False,
    processed_at: float | None = None,
) -> str:
    """The statements that end a transaction: inbox record, outbox rows, NOTIFY (if ``channel``), COMMIT.

    ``begin_next`` appends a ``BEGIN`` for the connection's next user; it needs a
    statement before the ``COMMIT`` (one fails in an aborted transaction, where a bare
    ``COMMIT`` would answer ``ROLLBACK`` without an error). ``now`` dates the outbox rows,
    ``processed_at`` (by default ``now``) the inbox record.
    """
    statements = []
    if inbox is not None:
        group, event_id = _text(inbox[0]), _text(stored_id(inbox[1]))
        marked = now if processed_at is None else processed_at
        if forget_failures:
            statements.append(f"DELETE FROM choreograph_failures WHERE grp = {group} AND event_id = {event_id}")
        statements.append(
            f"INSERT INTO choreograph_inbox (grp, event_id, processed_at) VALUES ({group}, {event_id}, {marked!r})"
        )
    if messages:
        svc = _text(service)
        rows = ", ".join(
            f"({svc}, {_text(event_id_in(m.id))}, {_text(event_id_in(m.type))}, {_bytea(m.body)}, {now!r})"
            for m in messages
        )
        statements.append(f"INSERT INTO choreograph_outbox (service, event_id, type, body, created_at) VALUES {rows}")
        if channel is not None:
            statements.append(f"SELECT pg_notify({_text(channel)}, {svc})")
    statements.append("COMMIT")
    if begin_next and len(statements) > 1:
        statements.append("BEGIN")
    return ";\n".join(statements)


async def _one_statement(conn: Any, sql: str) -> str:
    """Run ``sql`` (no arguments) by the extended protocol; its command status.

    asyncpg's ``execute`` without arguments sends a simple query, which runs every
    statement of the string: ``"INSERT ...; COMMIT"`` would commit the handler's
    transaction half-way, before its inbox record and outbox rows. A prepared statement
    holds exactly one (PostgreSQL refuses more: "cannot insert multiple commands into
    a prepared statement"), as SQLite's ``execute`` does. asyncpg's ``execute`` with
    arguments takes this path (``_execute``, its statement cache); without that private
    method, a public prepared statement does the same in one more round trip.
    """
    run = getattr(conn, "_execute", None)
    if run is not None:
        _, status, _ = await run(sql, (), 0, None, return_status=True)
        return str(status.decode())
    statement = await conn.prepare(sql)
    await statement.fetch()
    return str(statement.get_statusmsg() or "")


class _Tx(TxConnection):
    """One user transaction on one pooled connection, begun with its first statement."""

    def __init__(self, store: PostgresStateStore) -> None:
        self.store = store
        self.conn: Any = None
        self.done = False
        self.ahead = False  # the pool wants this connection's commit to end with BEGIN
        self.begun_next = False  # it did: the connection goes to the next user begun

    async def _ensure(self) -> Any:
        if self.done:
            raise StoreError(f"database {redact(self.store.url)}: the transaction is already finished")
        if self.conn is None:
            pool = self.store._pool()
            with _pg.translate(f"database {redact(self.store.url)}"):
                conn = await pool.acquire(transaction=True)
                if not conn.is_in_transaction():  # else handed over begun by the previous commit
                    try:
                        with closed_if_interrupted(conn):
                            await conn.execute("BEGIN")
                    except BaseException:
                        await pool.release(conn)
                        raise
            self.conn = conn
        return self.conn

    async def connect(self) -> None:
        await self._ensure()

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        conn = await self._ensure()
        with _pg.translate(f"database {redact(self.store.url)}"), closed_if_interrupted(conn):
            if args:
                return _pg.rowcount(await conn.execute(sql, *args))
            return _pg.rowcount(await _one_statement(conn, sql))

    async def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        conn = await self._ensure()
        with _pg.translate(f"database {redact(self.store.url)}"), closed_if_interrupted(conn):
            await conn.executemany(sql, rows)

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Row]:
        conn = await self._ensure()
        with _pg.translate(f"database {redact(self.store.url)}"), closed_if_interrupted(conn):
            return list(await conn.fetch(sql, *args))

    async def fetchone(self, sql: str, args: Sequence[Any]) -> Row | None:
        conn = await self._ensure()
        with _pg.translate(f"database {redact(self.store.url)}"), closed_if_interrupted(conn):
            return await conn.fetchrow(sql, *args)

    async def commit(
        self,
        *,
        inbox: tuple[str, str] | None,
        service: str,
        messages: Sequence[Message],
        forget_failures: bool = True,
    ) -> bool:
        store = self.store
        conn = await self._ensure()
        quiet = bool(messages) and store.relay_here(service)  # our relay is woken below: no NOTIFY
        try:
            # BEGIN ahead needs a statement before the COMMIT (see commit_script)
            self.ahead = (inbox is not None or bool(messages)) and store._pool().begin_ahead()
            script = commit_script(
                inbox=inbox, service=service, messages=messages, now=time.time(), processed_at=stamp_time(),
                channel=None if quiet else store.channel, forget_failures=forget_failures, begin_next=self.ahead,
            )
            try:
                with closed_if_interrupted(conn):
                    status = await conn.execute(script)
            except Exception as exc:
                if getattr(exc, "constraint_name", None) == _INBOX_PKEY:
                    return False  # another consumer committed this event first: roll ours back
                with _pg.translate(f"database {redact(store.url)}"):
                    raise
            # PostgreSQL answers ROLLBACK to COMMIT in an aborted transaction (a script that
            # ends with BEGIN has statements before its COMMIT, which would have failed).
            if status != ("BEGIN" if self.ahead else "COMMIT"):
                raise StoreError(f"database {redact(store.url)}: the transaction was rolled back ({status})")
            self.done = True  # committed: nothing to roll back
            self.begun_next = self.ahead
        finally:
            await self._close()
        if messages:
            if quiet:
                store._quiet_commits.add(service)
                if not store.relay_here(service):  # our relay stopped meanwhile: tell the others
                    with _pg.translate(f"database {redact(store.url)}"):
                        await store._pool().execute("SELECT pg_notify($1, $2)", store.channel, service)
            store.wake(service)  # the NOTIFY (if any) reaches other processes; this wakes our own relay sooner
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
                with closed_if_interrupted(conn):
                    await conn.execute("ROLLBACK")
        except Exception:  # a broken connection: the pool drops it below
            conn.terminate()
        finally:
            await self.store._pool().release(conn, ahead=self.ahead, begun=self.begun_next)


class PostgresStateStore(StateStore, PostgresStore):
    backend = "postgresql"

    def __init__(self, url: str) -> None:
        StateStore.__init__(self, url)
        PostgresStore.__init__(self, url)
        self.channel = f"choreograph_outbox_{self.config.schema}"[:63]
        self._listener: Any = None
        self._listen_retry_at = 0.0
        self._relay_rows: set[str] = set()
        self._quiet_commits: set[str] = set()  # services with rows committed without NOTIFY since their last pass

    def _migrations(self) -> list[tuple[str, list[str]]]:
        return [*super()._migrations(), ("outbox", OUTBOX_MIGRATIONS)]

    def _session_settings(self) -> dict[str, str]:
        return {"standard_conforming_strings": "on"}  # commit_script's literals rely on it

    async def _connect(self) -> None:
        if self.pool is not None:
            return
        pool = HandoffPool(self.config, self._session_settings())
        try:
            await pool.open()
            conn = await pool.acquire()
            try:
                for component, steps in self._migrations():
                    await _pg.migrate_connection(conn, self.config, component, steps)
            finally:
                await pool.release(conn)
        except BaseException:
            await pool.close()
            raise
        self.pool = pool

    async def _disconnect(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await listener.close(timeout=2)
            except Exception:
                listener.terminate()
        self._relay_rows.clear()
        self._quiet_commits.clear()
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()

    async def begin(self) -> TxConnection:
        self._pool()
        return _Tx(self)

    # -- outbox -----------------------------------------------------------------------

    async def relay_pass(self, service: str, owner: str, limit: int, publish: RelayPublish) -> int | None:
        """Three round trips: ``BEGIN`` + claim, read the rows, mark them + ``COMMIT``.

        The rows are read by a statement of their own, after the claim: its snapshot
        then sees the marks of the relay that held the claim before (one statement
        claiming and reading would read with a snapshot taken before that relay
        committed, and publish its rows a second time).
        """
        quiet = service in self._quiet_commits
        self._quiet_commits.discard(service)
        try:
            return await self._pass(service, limit, publish, quiet)
        except BaseException:
            if quiet:  # the NOTIFY another process's relay may be owed is still owed: next pass
                self._quiet_commits.add(service)
            raise

    async def _pass(self, service: str, limit: int, publish: RelayPublish, quiet: bool) -> int | None:
        pool = self._pool()
        what = f"outbox {redact(self.url)}"
        svc = _text(service)
        if service not in self._relay_rows:
            with _pg.translate(what):
                await pool.execute("INSERT INTO choreograph_relay (service) VALUES ($1) ON CONFLICT DO NOTHING", service)
            self._relay_rows.add(service)
        with _pg.translate(what):
            conn = await pool.acquire()
        try:
            with _pg.translate(what), closed_if_interrupted(conn):
                claimed = await conn.execute(
                    f"BEGIN; SELECT 1 FROM choreograph_relay WHERE service = {svc} FOR UPDATE SKIP LOCKED"
                )
                if claimed != "SELECT 1":  # another relay is in a pass
                    # Rows committed here without NOTIFY may have missed its read: make it pass again.
                    notify = f"; SELECT pg_notify({_text(self.channel)}, {svc})" if quiet else ""
                    await conn.execute("ROLLBACK" + notify)
                    return None
                rows = await conn.fetch(
                    "SELECT seq, event_id, type, body FROM choreograph_outbox"
                    " WHERE service = $1 AND sent_at IS NULL ORDER BY seq LIMIT $2",
                    service, limit,
                )
            if rows:
                with closed_if_interrupted(conn):
                    await publish([Message(str(event_id_out(row[1])), str(event_id_out(row[2])), bytes(row[3]))
                                   for row in rows])
            mark = ""
            if rows:
                seqs = ",".join(str(int(row[0])) for row in rows)
                mark = f"UPDATE choreograph_outbox SET sent_at = {time.time()!r} WHERE seq IN ({seqs}); "
            with _pg.translate(what), closed_if_interrupted(conn):
                await conn.execute(mark + "COMMIT")
            return len(rows)
        finally:
            await pool.release(conn)  # rolled back there if the pass did not commit

    async def outbox_lag(self, service: str) -> OutboxLag:
        with _pg.translate(f"outbox {redact(self.url)}"):
            row = await self._pool().fetchrow(
                "SELECT count(*), min(created_at) FROM choreograph_outbox WHERE service = $1 AND sent_at IS NULL",
                service,
            )
        oldest = row[1]
        return OutboxLag(int(row[0]), max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    async def purge_sent(self, older_than: float) -> int:
        with _pg.translate(f"outbox {redact(self.url)}"):
            status = await self._pool().execute(
                "DELETE FROM choreograph_outbox WHERE sent_at IS NOT NULL AND sent_at < $1", older_than
            )
        return _pg.rowcount(status)

    # -- wake-ups ---------------------------------------------------------------------

    async def wait_outbox(self, service: str, within: float, owner: str | None = None) -> None:
        await self._listen()
        await super().wait_outbox(service, within, owner)

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
            log.warning("cannot LISTEN on %s (%s): relays poll instead", redact(self.url), exc)
            return
        self._listener = conn
        for service in self.waited_services():  # catch up with commits made while nobody listened
            self.wake(service)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.wake(payload)
