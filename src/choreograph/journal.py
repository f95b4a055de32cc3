"""The journal: a passive observer that records every event by correlation id.

It consumes as its own group (``choreograph.journal``) with a wildcard subscription,
through the ordinary transport API, so it sees every event every service sees and
never routes anything. From what it records it derives each transaction's status
(running, completed, failed, compensated, compensation_failed, stuck: defined in
:mod:`choreograph._journal_model`; ``compensation_failed`` says a compensation gave up, so
the rollback did not finish), and when a transaction passes its deadline without
a terminal event it publishes ``choreograph.timedout`` once, with the transaction's
correlation id, a deterministic id and the transaction's trace context (the ``traceparent``
of its most recent event that had one, so a tracing backend links the timeout to the
transaction's trace), so services can compensate.

>>> journal = Journal.from_app(app, "sqlite:///./var/journal.db", transport=bus)   # doctest: +SKIP
>>> async with journal:                                                            # doctest: +SKIP
...     ...
...     tx = await journal.transaction(correlation_id)
...     tx.status, [entry.type for entry in tx.timeline]

A journal without a transport only answers queries (the gateway's ``/transactions``,
``choreograph trace``): it reads what a running journal wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Literal

from choreograph._clock import SYSTEM_CLOCK, Clock, backoff
from choreograph._envelope import Envelope, attribute_problem, decode, derive_id
from choreograph._journal_model import (
    DEFAULT_JOURNAL,
    DEFAULT_STUCK_AFTER,
    JOURNAL_GROUP,
    STATUSES,
    TIMEDOUT,
    EntryKind,
    JournalEntry,
    Status,
    Transaction,
    TransactionSummary,
    format_time,
    parse_time,
    service_of,
)
from choreograph._journal_store import JournalStore, MemoryJournalStore, open_journal_store
from choreograph.errors import ConfigurationError, MalformedEnvelope, TransportClosed
from choreograph.events import Event
from choreograph.runtime.records import to_message
from choreograph.service import FAILED, App
from choreograph.transports import open_transport
from choreograph.transports.base import Delivery, Subscription, Transport

__all__ = [
    "DEFAULT_JOURNAL",
    "DEFAULT_STUCK_AFTER",
    "JOURNAL_GROUP",
    "STATUSES",
    "TIMEDOUT",
    "Journal",
    "JournalEntry",
    "JournalStats",
    "JournalStore",
    "MemoryJournalStore",
    "Status",
    "Transaction",
    "TransactionSummary",
    "open_journal_store",
]

log = logging.getLogger("choreograph.journal")


TerminalKind = Literal["completed", "failed"]


def _type_name(value: str | type[Event]) -> str:
    return value if isinstance(value, str) else value.event_type()


@dataclasses.dataclass
class JournalStats:
    """Counters of a running journal."""

    received: int = 0  # events handed to the store (redeliveries included; the store drops known ids)
    malformed: int = 0
    timed_out: int = 0


class Journal:
    """Records every event by correlation id; answers "what happened to transaction X?".

    ``terminal`` maps event types (classes or type strings) that end a transaction to
    ``"completed"`` or ``"failed"``. ``compensated`` lists the event types whose runtime
    failures some service compensates (an ``on_failure`` handler, a ``failed(X)`` slot:
    :func:`~choreograph.joins.compensated_failures`; a join's own fan-out is none); a failure of
    any other type fails the transaction at once. ``None`` (the default without an app)
    assumes every failure may be compensated, so such a transaction waits for a terminal
    event or its deadline. ``stuck_after`` is the deadline, in seconds after the journal
    first sees a transaction, of transactions whose events carry no ``deadline``.
    """

    def __init__(
        self,
        store: str | JournalStore = DEFAULT_JOURNAL,
        *,
        transport: Transport | str | None = None,
        terminal: Mapping[str | type[Event], TerminalKind] | None = None,
        compensated: Collection[str | type[Event]] | None = None,
        stuck_after: float = DEFAULT_STUCK_AFTER,
        clock: Clock | None = None,
        scan_interval: float = 1.0,
        batch_size: int = 256,
        group: str = JOURNAL_GROUP,
        source: str = "/choreograph/journal",
    ) -> None:
        if stuck_after <= 0:
            raise ConfigurationError("Journal: stuck_after must be > 0 seconds")
        if scan_interval <= 0 or batch_size < 1:
            raise ConfigurationError("Journal: scan_interval must be > 0 and batch_size >= 1")
        problem = attribute_problem("source", source)
        if problem is not None:  # the choreograph.timedout events it publishes carry it
            raise ConfigurationError(f"Journal: {problem}")
        self.store = open_journal_store(store) if isinstance(store, str) else store
        self._owns_transport = isinstance(transport, str)
        self.transport = open_transport(transport) if isinstance(transport, str) else transport
        self.terminal: dict[str, TerminalKind] = {_type_name(k): v for k, v in (terminal or {}).items()}
        for type_name, kind in self.terminal.items():
            if kind not in ("completed", "failed"):
                raise ConfigurationError(f"Journal: terminal[{type_name!r}] must be 'completed' or 'failed', not {kind!r}")
        self.compensated = None if compensated is None else frozenset(_type_name(t) for t in compensated)
        self.stuck_after = stuck_after
        self.clock = clock or getattr(self.transport, "clock", None) or SYSTEM_CLOCK
        self.scan_interval = scan_interval
        self.batch_size = batch_size
        self.group = group
        self.source = source
        self._stats = JournalStats()
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._opened = False
        self._lifecycle = asyncio.Lock()
        self._deadline_lock = asyncio.Lock()

    @classmethod
    def from_app(
        cls, app: App, store: str | JournalStore = DEFAULT_JOURNAL, **options: Any
    ) -> Journal:
        """A journal that knows ``app``'s terminal events and which failures its services compensate."""
        from choreograph.joins import compensated_failures

        compensated = compensated_failures(app.services)
        terminal: dict[str | type[Event], TerminalKind] = {cls: kind for cls, kind in app.terminal.items()}
        return cls(store, terminal=terminal, compensated=compensated, **options)

    def stats(self) -> JournalStats:
        return dataclasses.replace(self._stats)

    def now(self) -> float:
        """The journal's notion of now (epoch seconds): statuses and deadlines are relative to it."""
        return self.clock.time()

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store (queries call this themselves)."""
        if not self._opened:
            await self.store.open()
            self._opened = True

    async def start(self) -> None:
        """Subscribe as ``choreograph.journal`` (every type) and start recording and watching deadlines."""
        async with self._lifecycle:  # one start() or stop() at a time (see stop())
            if self._tasks:
                return
            if self.transport is None:
                raise ConfigurationError("Journal.start(): give the journal a transport (broker) to observe")
            try:
                await self.open()
                await self.transport.connect()
                self._sub = await self.transport.subscribe(self.group, None)
            except BaseException:
                # No stop() follows a failed start (``async with``): close what it opened
                try:
                    await self._close_all()
                except Exception as exc:
                    log.warning("could not undo a failed journal start cleanly: %s", exc)
                raise
            self._stopped.clear()
            self._tasks = [
                asyncio.create_task(self._consume(self._sub), name="choreograph-journal-consume"),
                asyncio.create_task(self._watch_deadlines(), name="choreograph-journal-deadlines"),
            ]

    async def stop(self) -> None:
        """Stop consuming (unacked deliveries return to the group), then close what the journal opened.

        Called during ``start()``, it waits for the start to finish (or fail), then stops it: it
        found no tasks and no subscription yet, and the start went on after it."""
        async with self._lifecycle:
            tasks, self._tasks = self._tasks, []
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_all()
            self._stopped.set()

    async def _close_all(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.close()
        if self._owns_transport and self.transport is not None:
            await self.transport.close()
        await self.close()

    async def close(self) -> None:
        """Close the store."""
        if self._opened:
            self._opened = False
            await self.store.close()

    async def wait(self) -> None:
        """Until ``stop()``."""
        await self._stopped.wait()

    async def __aenter__(self) -> Journal:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- recording ----------------------------------------------------------------------

    def entry(self, envelope: Envelope, recorded_at: float) -> JournalEntry:
        """What the journal records for ``envelope`` (classified as event, terminal, failure or timeout)."""
        kind: EntryKind = "event"
        service = service_of(envelope.source)
        attempt = envelope.extensions.get("attempt")
        attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None
        failed_type: str | None = None
        record: dict[str, Any] | None = None
        compensable = True
        if envelope.type == FAILED:
            kind = "failure"
            data = envelope.data if isinstance(envelope.data, dict) else {}
            raw_type = data.get("type") or envelope.extensions.get("failedtype")
            failed_type = raw_type if isinstance(raw_type, str) else None
            raw_record = data.get("record")
            record = {k: v for k, v in raw_record.items() if k != "envelope"} if isinstance(raw_record, dict) else {}
            service = str(record.get("service") or service)
            attempts = record.get("attempts")
            attempt = attempts if isinstance(attempts, int) else attempt
            compensable = self.compensated is None or failed_type in self.compensated
        elif envelope.type == TIMEDOUT:
            kind = "timedout"
        elif envelope.type in self.terminal:
            kind = self.terminal[envelope.type]
        return JournalEntry(
            event_id=envelope.id,
            correlation_id=envelope.correlationid or envelope.id,
            type=envelope.type,
            source=envelope.source,
            service=service,
            kind=kind,
            at=parse_time(envelope.time) or recorded_at,
            recorded_at=recorded_at,
            causation_id=envelope.causationid,
            time=envelope.time,
            attempt=attempt,
            deadline=parse_time(envelope.deadline),
            failed_type=failed_type,
            compensable=compensable,
            record=record,
            traceparent=envelope.traceparent,
            tracestate=envelope.tracestate,
        )

    async def record(self, envelopes: Collection[Envelope]) -> list[TransactionSummary]:
        """Record envelopes directly (the consumer does this for every delivery); returns changed summaries."""
        await self.open()
        now = self.now()
        entries = [self.entry(envelope, now) for envelope in envelopes]
        changed = await self.store.record(entries, stuck_after=self.stuck_after)
        self._stats.received += len(entries)
        return changed

    async def _consume(self, sub: Subscription) -> None:
        while True:
            try:
                batch = await sub.fetch(self.batch_size, timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker down: the client reconnects
                log.warning("journal fetch failed: %s; retrying", exc)
                await backoff(self.clock, 0.5)
                continue
            await self._handle_batch(sub, batch)

    async def _handle_batch(self, sub: Subscription, batch: list[Delivery]) -> None:
        envelopes: list[Envelope] = []
        for delivery in batch:
            try:
                envelopes.append(decode(delivery.message.body))
            except MalformedEnvelope as exc:
                # The services dead-letter it; the journal only notes it never understood it.
                self._stats.malformed += 1
                log.warning("journal skips malformed message %s: %s", delivery.message.id, exc)
        try:
            await self.record(envelopes)
        except Exception as exc:
            log.error("journal store failed: %s; returning %d deliveries", exc, len(batch))
            pending = list(batch)

            async def retry() -> None:
                while pending:  # those returned already are not returned twice
                    await pending[0].retry(1.0)
                    pending.pop(0)

            await self._settle(retry, batch, "return")
            await backoff(self.clock, 1.0)
            return
        await self._settle(lambda: sub.ack_many(batch), batch, "ack")

    async def _settle(self, step: Callable[[], Awaitable[None]], batch: list[Delivery], what: str) -> None:
        """Ack or return a batch, tried again while the broker is away (a failure here ended the
        consumer's task: the journal went on running and recorded nothing more). A closed
        transport never heals: the deliveries are left to come back after their lease."""
        delay = 0.05
        while True:
            try:
                await step()
                return
            except TransportClosed as exc:
                log.error("journal cannot %s %d deliveries: %s; they come back after their lease", what, len(batch), exc)
                return
            except Exception as exc:
                log.warning("journal could not %s %d deliveries: %s; retrying in %.2fs", what, len(batch), exc, delay)
                await backoff(self.clock, delay)
                delay = min(delay * 2, 5.0)

    # -- deadlines ----------------------------------------------------------------------

    async def _watch_deadlines(self) -> None:
        while True:
            await self.clock.sleep(self.scan_interval)
            try:
                await self.check_deadlines()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("journal deadline check failed: %s", exc)

    async def check_deadlines(self, limit: int = 500) -> list[str]:
        """Publish ``choreograph.timedout`` for every running transaction past its deadline not yet announced.

        Returns their correlation ids. Checks in one process never overlap, so each
        transaction is announced once; the event id is derived from the correlation id,
        so a repeat (a crash between publishing and marking, or a second journal
        replica) is dropped by every inbox.
        """
        if self.transport is None:
            raise ConfigurationError("Journal.check_deadlines(): the journal has no transport to publish on")
        async with self._deadline_lock:
            return await self._check_deadlines(limit)

    async def _check_deadlines(self, limit: int) -> list[str]:
        assert self.transport is not None
        await self.open()
        now = self.now()
        due = await self.store.due(now, limit)
        if not due:
            return []
        envelopes = [await self._timedout(summary, now) for summary in due]
        await self.transport.publish([to_message(env) for env in envelopes])
        ids = [summary.correlation_id for summary in due]
        await self.store.mark_timed_out(ids)
        self._stats.timed_out += len(ids)
        log.warning("transactions stuck past their deadline: %s", ", ".join(ids))
        return ids

    async def _timedout(self, summary: TransactionSummary, now: float) -> Envelope:
        timeline = await self.store.timeline(summary.correlation_id)
        # The timeline is in recording order; entries of one batch share their recorded_at (a
        # max() by it picked the batch's first), so the last is the last in the timeline.
        last = timeline[-1] if timeline else None
        # The trace context of the latest recorded event that carried one (the last may come from
        # outside any trace): the timeout joins the transaction's trace, after what happened last.
        traced = next((e for e in reversed(timeline) if e.traceparent), None)
        # Every attribute but the source (checked in __init__) and the derived id is the
        # transaction's, recorded as its events carried it: carried as is, as a worker carries
        # what an output inherits (a correlation id with a control character stays one).
        cid = summary.correlation_id
        return Envelope(
            id=derive_id(cid, self.group, "timedout", 0),
            source=self.source,
            type=TIMEDOUT,
            data={
                "correlation_id": cid,
                "deadline": format_time(summary.deadline),
                "root_type": summary.root_type,
                "last_type": last.type if last else None,
                "last_event_id": last.event_id if last else None,
            },
            time=format_time(now),
            subject=summary.root_type,
            correlationid=cid,
            causationid=last.event_id if last else None,
            traceparent=traced.traceparent if traced else None,
            tracestate=traced.tracestate if traced else None,
        )

    # -- queries ------------------------------------------------------------------------

    async def transaction(self, correlation_id: str) -> Transaction | None:
        """The status and ordered timeline of one transaction, or ``None`` if never seen."""
        await self.open()
        found = await self.store.snapshot(correlation_id)  # one read: the summary agrees with the timeline
        if found is None:
            return None
        summary, timeline = found
        return Transaction(summary=summary, status=summary.status(self.now()), timeline=timeline)

    async def transactions(self, status: Status | None = None, limit: int = 100) -> list[Transaction]:
        """Transactions (without timelines) with ``status`` now (``None``: any), most recent first."""
        if status is not None and status not in STATUSES:
            raise ConfigurationError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        if limit < 1:
            raise ConfigurationError("limit: must be >= 1")
        await self.open()
        now = self.now()
        found = await self.store.summaries(status=status, now=now, limit=limit)
        return [Transaction(summary=s, status=s.status(now), timeline=None) for s in found]
