"""Effectively-once steps: handler transactions, the outbox relay, publishing from outside.

A service with a database (``Service("package", database="sqlite:///var/pkg.db")``)
can change its own state and emit events atomically::

    @package.on(PackageRequested)
    async def create(req: PackageRequested, ctx: Context) -> PackageCreated:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (id, weight) VALUES ($1, $2)", req.id, req.weight)
        return PackageCreated(id=req.id)

**Inside a handler the transaction commits when the handler returns**, not when the
``async with`` block ends: the commit writes the handler's state changes, the inbox
record of the event and *every* event the handler emits — returned, ``ctx.publish``-ed
or ``tx.publish``-ed — into the outbox, all or nothing. The block only delimits where
you use the connection; an exception escaping it rolls back at once (with the events
``tx.publish``-ed in the transaction), and an exception anywhere in the handler rolls
back everything (the event is retried as usual). Keep
slow calls out of a handler after its block: on SQLite the writer turn is held until
the handler returns.

After the commit the worker only acks the delivery; the **relay** (a task in the
same worker, one per service) publishes outbox rows in commit order and marks them
sent. Every crash point is covered: before commit nothing happened and the event is
redelivered; after commit the redelivered event finds its inbox record and is acked
without running the handler, while the relay publishes the rows; between publish and
mark the rows go out again with the same deterministic ids, which downstream inboxes drop.

A handler that never opens a transaction in such a service takes the ordinary path
(publish, then record in the service database's inbox, then ack).

**Outside a handler** (an HTTP endpoint, a script) the same guarantee is one block;
there the transaction commits when the block ends::

    async with transaction(package) as tx:
        await tx.execute("INSERT INTO packages (id) VALUES ($1)", pid)
        envelope = tx.publish(PackageRequested(id=pid))   # sent by package's relay
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from choreograph._clock import Clock, SystemClock, stamp_clock
from choreograph._envelope import Envelope, new_id
from choreograph.context import current_context
from choreograph.errors import ConfigurationError
from choreograph.events import Event
from choreograph.runtime.records import first_envelope, to_message
from choreograph.stores.state import OutboxLag, StateStore, Transaction, TxConnection, open_database
from choreograph.transports.base import Message, Transport

if TYPE_CHECKING:
    from choreograph.context import Context
    from choreograph.service import Service
    from choreograph.telemetry import Telemetry

log = logging.getLogger("choreograph.outbox")

class _Holding:
    """An open :func:`transaction` on a SQLite store: it holds the store's writer turn."""

    __slots__ = ("store", "open")

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.open = True


#: The open :func:`transaction` on a SQLite store of this task (or of the task that created
#: it: ``asyncio.wait_for`` on 3.11 and ``gather`` run their coroutines in tasks of their own,
#: which the block then awaits), if any: another transaction begun on that store inside it
#: would wait for its writer turn for ever. ``open`` turns false when the block ends.
_HOLDING: contextvars.ContextVar[_Holding | None] = contextvars.ContextVar("choreograph_holding", default=None)


def _holds_writer(store: StateStore) -> bool:
    """Whether this task is inside an open :func:`transaction` holding ``store``'s SQLite writer turn."""
    holding = _HOLDING.get()
    return holding is not None and holding.open and holding.store is store

__all__ = ["HandlerUnit", "OutboxLag", "OutboxRelay", "Outboxes", "Transaction", "open_database", "transaction"]


class HandlerUnit:
    """The unit of work of one handler run: at most one transaction, committed by the worker.

    ``ctx.transaction()`` opens (or re-enters) it; the worker calls :meth:`commit` with
    the handler's output messages once the handler returned, and :meth:`rollback` on
    every other path (a no-op once committed).
    """

    __slots__ = (
        "store", "ctx", "used", "conn", "_after_commit", "on_wait", "_published", "_on_end", "_inside", "_depth",
        "_open",
    )

    def __init__(self, store: StateStore, ctx: Context) -> None:
        self.store = store
        self.ctx = ctx
        self.used = False
        self.conn: TxConnection | None = None
        self._after_commit: list[Callable[[], None]] | None = None
        self._published: list[int] | None = None  # where in ctx.outputs the open transaction's tx.publish went
        self._on_end: list[Callable[[bool], None]] | None = None  # told how the open transaction ended
        self._inside: asyncio.Task[Any] | None = None  # the task inside a block of the unit (PostgreSQL)
        self._depth = 0  # how deep it is
        self._open = 0  # blocks entered and not yet left, by any task (any backend)
        #: Told ``None`` when the unit starts waiting for its connection (the SQLite writer,
        #: a pooled PostgreSQL connection) and the seconds waited when it has it: the worker
        #: keeps that time out of the handler's timeout.
        self.on_wait: Callable[[float | None], None] | None = None

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` as soon as this unit's commit returns: before the worker acks
        the delivery and before the relay, woken by the commit on the loop, has published
        the rows; not at all if the unit rolls back or another consumer committed first.

        For fault injection (``choreograph.faults`` crashes here, in the window the outbox
        closes). The callback must not raise: the commit stands either way.
        """
        if self._after_commit is None:
            self._after_commit = []
        self._after_commit.append(callback)

    def when_ended(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(committed)`` when the open transaction ends: ``True`` once it commits,
        ``False`` when it is rolled back (by :meth:`rollback`, a commit that fails, or another
        consumer having committed the event first). For work done in the run's transaction on
        behalf of the process (the hourly expiry of join instances): undone with a rolled-back
        run, it is not done. The callback must not raise."""
        if self._on_end is None:
            self._on_end = []
        self._on_end.append(callback)

    def _ended(self, committed: bool) -> None:
        callbacks, self._on_end = self._on_end, None
        for callback in callbacks or ():
            callback(committed)

    def block(self) -> HandlerUnit:
        """``async with ctx.transaction() as tx``: begin (or re-enter); an exception rolls back.

        The unit is its own context manager (one object fewer per event).
        """
        return self

    async def __aenter__(self) -> Transaction:
        if self.conn is None and _holds_writer(self.store):
            raise ConfigurationError(
                f"{self.ctx.handler}: ctx.transaction() inside transaction() on the same SQLite file would wait "
                "for the writer turn that transaction holds; open ctx.transaction() first, or use it alone"
            )
        if self.ctx._sealed:
            # A task the handler left running: its block would begin a transaction nobody
            # commits or rolls back, holding a pooled connection - on SQLite the writer turn,
            # so every later write of the process waited for ever.
            raise ConfigurationError(
                f"{self.ctx.handler}: ctx.transaction() after the handler returned (event {self.ctx.envelope.id}): "
                "its transaction was committed or rolled back then; use the database before returning"
            )
        task = asyncio.current_task() if self.store.backend != "sqlite" else None
        if task is not None and self._inside is not None and self._inside is not task:
            # An asyncpg connection runs one operation at a time: the second task's statements
            # failed ("another operation is in progress"), and its block's rollback closed the
            # connection under the first one's ("connection was closed in the middle of
            # operation"), failing the handler's attempt - every attempt.
            raise ConfigurationError(
                f"{self.ctx.handler}: ctx.transaction() in another task while the handler's transaction is in use "
                f"in its block (event {self.ctx.envelope.id}): a PostgreSQL transaction runs on one connection, one "
                "statement at a time; pass the block's tx to that work and await it inside the block, or enter "
                "ctx.transaction() in one task at a time"
            )
        self.used = True
        if self.conn is None:
            on_wait = self.on_wait
            if on_wait is None:
                self.conn = await self.store.begin()
            else:
                loop = asyncio.get_running_loop()
                started = loop.time()
                on_wait(None)
                try:
                    conn = await self.store.begin()
                    try:
                        await conn.connect()  # a pooled connection, another process's SQLite lock: here, not at the first statement
                    except BaseException:
                        await conn.rollback()
                        raise
                    self.conn = conn
                finally:
                    on_wait(loop.time() - started)
        if task is not None:
            self._inside = task
            self._depth += 1
        self._open += 1
        return Transaction(self.conn, self.store.backend, self._publish)

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._open -= 1
        if self._inside is not None and self._inside is asyncio.current_task():
            self._depth -= 1
            if self._depth == 0:
                self._inside = None
        if exc_type is not None:
            await self.rollback()

    def _publish(self, event: Event, subject: str | None) -> None:
        at = len(self.ctx.outputs)
        self.ctx.publish(event, subject=subject)
        if self._published is None:
            self._published = []
        self._published.append(at)

    async def commit(self, group: str, event_id: str, messages: Sequence[Message]) -> bool:
        """Commit state + inbox record + outbox rows; ``False`` if another consumer committed this event first."""
        if self._open:
            # A task the handler started is still in its block. On PostgreSQL the commit would run
            # on the connection under the task's statements: one of them failed, and the rollback
            # after it closed the connection under the other. On SQLite (and PostgreSQL) the commit
            # took the half of the block done so far.
            raise ConfigurationError(
                f"{self.ctx.handler}: returned while a task it started is still inside ctx.transaction() "
                f"(event {self.ctx.envelope.id}): the commit would take its block half done; await the task "
                "before returning"
            )
        conn, self.conn = self.conn, None
        self._published = None  # its events are in ``messages`` now: nothing left to undo
        if conn is None:  # the handler's block rolled back and it carried on: record the rest alone
            conn = await self.store.begin()
        fresh = False
        try:
            fresh = await conn.commit(
                inbox=(group, event_id), service=self.ctx.service, messages=messages,
                # a first attempt failed nowhere (a copy that failed before it forgets its history
                # when its retry is acked as a duplicate: Verdicts._duplicate)
                forget_failures=self.ctx.attempt > 1,
            )
            if fresh and self._after_commit:
                for callback in self._after_commit:  # no await in between: still before the relay
                    callback()
            return fresh
        finally:
            try:
                await conn.rollback()  # no-op after commit; releases the writer turn if commit failed early
            finally:
                self._ended(fresh)

    async def rollback(self) -> None:
        """Undo the open transaction, and the events ``tx.publish``-ed in it (sent only if it
        commits): a handler that catches the block's exception and returns must not send them."""
        published, self._published = self._published, None
        if published:
            outputs = self.ctx.outputs
            for at in reversed(published):
                del outputs[at]
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                await conn.rollback()
            finally:
                self._ended(False)


#: ``messaging.system`` of a PRODUCER span of :func:`transaction`: the event goes to the outbox,
#: and which broker the relay sends it on is not known there.
OUTBOX_SYSTEM = "choreograph"


@contextlib.asynccontextmanager
async def transaction(
    service: Service, *, correlation_id: str | None = None, clock: Clock | None = None,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[Transaction]:
    """Change ``service``'s state and publish events atomically, outside a handler.

    Commits when the block ends (rolls back if it raises). ``tx.publish`` returns the
    envelope, with a fresh id fixed at once; each event starts its own transaction
    unless ``correlation_id`` is given. The service's relay (in its worker, in this or
    another process) publishes the rows. Keep the database open for the life of your
    app (``async with open_database(service.database):``) to avoid reconnecting per call.
    The events' ``time`` is ``clock``'s (a test's :class:`~choreograph.testing.VirtualClock`,
    as ``Publisher`` stamps on its transport's); by default the real time, or, in a task of a
    worker on another clock (a handler of another service), that worker's clock's.

    With ``telemetry`` each event committed gets a PRODUCER span ``publish <event type>`` (a
    child of the current span, else a new trace) and a ``traceparent`` naming it, as
    :class:`~choreograph.Publisher` gives the events it publishes: the relay sends the row as
    written, so the first hop joins the caller's trace. The spans cover the commit (the durable
    write; the broker is the relay's), so ``traceparent`` is set when the block ends; a block
    that rolls back makes none. Without, the events carry no ``traceparent``, as a publisher's.
    """
    if correlation_id == "":  # an unset variable: each event would start a transaction of its own
        raise ValueError("correlation_id: '' is empty; pass None for events that start their own transactions")
    if not service.database:
        raise ConfigurationError(f"Service {service.name!r} has no database=; transaction() needs one")
    ctx = current_context()
    if ctx is not None and ctx._unit is not None and ctx.service == service.name:
        # A second transaction on the handler's own database would not be atomic with it,
        # and on SQLite would wait forever for the writer turn the handler holds.
        raise ConfigurationError(f"inside a handler of {service.name!r}, use ctx.transaction()")
    store = open_database(service.database)
    if _holds_writer(store):
        raise ConfigurationError(
            f"transaction({service.name!r}) inside another transaction() on the same SQLite file would wait "
            "for the writer turn the outer one holds; use one transaction"
        )
    if ctx is not None and ctx._unit is not None and ctx._unit.store is store and ctx._unit.conn is not None \
            and store.backend == "sqlite":
        # Another service on the handler's SQLite file: its begin() would queue for the writer
        # turn the handler's open transaction holds until the handler returns - a wait only
        # the handler's timeout ended, on every attempt.
        raise ConfigurationError(
            f"inside a handler of {ctx.service!r}, transaction({service.name!r}) would wait for the "
            "SQLite writer its own transaction holds; use ctx.transaction()"
        )
    envelopes: list[Envelope] = []
    if clock is None:
        clock = stamp_clock.get()  # None: the real clock

    def publish(event: Event, subject: str | None) -> Envelope:
        if subject == "":  # as ctx.publish and Publisher.publish: a CloudEvents subject is non-empty
            raise ValueError("subject: '' is empty; a CloudEvents subject must be non-empty (pass None for none)")
        envelope = first_envelope(
            event, source=service.source, id=new_id(), correlation_id=correlation_id, subject=subject,
            time=None if clock is None or type(clock) is SystemClock else clock.time(),
        )
        envelopes.append(envelope)
        return envelope

    async with store:
        conn = await store.begin()
        holding = _Holding(store) if store.backend == "sqlite" else None
        token = _HOLDING.set(holding) if holding is not None else None
        try:
            yield Transaction(conn, store.backend, publish)
            if telemetry is None:
                await conn.commit(inbox=None, service=service.name, messages=[to_message(e) for e in envelopes])
            else:
                # The rows are encoded inside producing(): it sets each envelope's traceparent first.
                with telemetry.producing(envelopes, system=OUTBOX_SYSTEM):
                    await conn.commit(inbox=None, service=service.name,
                                      messages=[to_message(e) for e in envelopes])
        finally:
            if holding is not None:
                holding.open = False
            if token is not None:
                with contextlib.suppress(ValueError):  # (exited in another context: nothing to undo there)
                    _HOLDING.reset(token)
            await conn.rollback()


class OutboxRelay:
    """Publishes one service's outbox rows in commit order, then marks them sent.

    Runs as a task in the service's worker. Several relays (replicas) may run on one
    database: only the one holding the service's claim publishes. ``published`` counts
    rows sent by this relay; :meth:`lag` reads the backlog for metrics.
    """

    def __init__(
        self,
        store: StateStore,
        service: str,
        transport: Transport,
        *,
        batch: int = 256,
        poll_interval: float = 0.5,
        retention: float = 3600.0,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.transport = transport
        self.batch = batch
        self.poll_interval = poll_interval
        self.retention = retention
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.published = 0
        self.active = False  # whether this relay held the claim on its last pass
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self.store.relay_started(self.service)
            self._task = asyncio.create_task(self._run(), name=f"choreograph-relay-{self.service}")

    async def stop(self) -> None:
        """Stop after the current pass; give up the claim so a standby takes over at once."""
        self._stopping = True
        self.store.wake(self.service)
        if self._task is not None:
            self.store.relay_stopped(self.service)  # commits from now on notify other processes' relays
            self.store.forget_waiter(self.service, self.owner)
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            try:  # flush what the last handlers committed, rather than leave it to the next start
                while await self.run_once() == self.batch:
                    pass
            except Exception as exc:
                log.warning("outbox relay of %s stopped with rows pending: %s", self.service, exc)
        try:  # a standby's too: it may hold resources for its next claim (SQLite: the lock file)
            await self.store.release_relay(self.service, self.owner)
        except Exception as exc:
            log.warning("could not release the relay claim of %s: %s", self.service, exc)
        self.active = False

    async def run_once(self) -> int | None:
        """One pass: publish up to ``batch`` rows; ``None`` if another relay holds the claim."""
        sent = await self.store.relay_pass(self.service, self.owner, self.batch, self.transport.publish)
        self.active = sent is not None
        if sent:
            self.published += sent
        return sent

    async def lag(self) -> OutboxLag:
        """Unsent rows of this service and the age of the oldest, in seconds."""
        return await self.store.outbox_lag(self.service)

    async def _run(self) -> None:
        delay = 0.05
        purge_at = time.monotonic() + 60.0
        while not self._stopping:
            try:
                sent = await self.run_once()
                delay = 0.05
                if time.monotonic() >= purge_at:
                    purge_at = time.monotonic() + 60.0
                    await self.store.purge_sent(time.time() - self.retention)
            except Exception as exc:  # broker or database down: keep the rows, try again
                log.error("outbox relay of %s failed: %s; retrying in %.2fs", self.service, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if sent == self.batch:
                continue  # more waiting
            await self.store.wait_outbox(self.service, self.poll_interval, self.owner)


class Outboxes:
    """The worker's side of service databases: open them, run one relay per service, close them."""

    def __init__(self, services: Sequence[Service], transport: Transport, **relay_options: Any) -> None:
        self.services = [s for s in services if getattr(s, "database", None)]
        self.transport = transport
        self.relay_options = relay_options
        self.stores: dict[str, StateStore] = {}  # service name -> its database
        self.relays: dict[str, OutboxRelay] = {}

    async def start(self) -> None:
        for service in self.services:
            store = open_database(service.database)  # type: ignore[arg-type]
            await store.open()
            self.stores[service.name] = store
            relay = OutboxRelay(store, service.name, self.transport, **self.relay_options)
            self.relays[service.name] = relay
            await relay.start()

    async def stop(self) -> None:
        """Stop every relay, then close every database, even after one fails to close (one left
        open keeps its connections, or on SQLite its file lock); the first failure is raised."""
        await asyncio.gather(*(relay.stop() for relay in self.relays.values()))
        stores = list(self.stores.items())
        self.relays.clear()
        self.stores.clear()
        failure: Exception | None = None
        for name, store in stores:
            try:
                await store.close()
            except Exception as exc:
                if failure is None:
                    failure = exc
                else:
                    log.warning("could not close the database of %s: %s", name, exc)
        if failure is not None:
            raise failure

    def store_for(self, service: Service) -> StateStore | None:
        return self.stores.get(service.name)

    def unit(self, service: Service, ctx: Context) -> HandlerUnit | None:
        """A unit of work for one handler run of ``service`` (``None`` if it has no database)."""
        store = self.stores.get(service.name)
        return None if store is None else HandlerUnit(store, ctx)

    async def lag(self, service: str) -> OutboxLag:
        """Outbox backlog of ``service`` (for metrics and tests)."""
        return await self.relays[service].lag()
