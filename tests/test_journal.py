"""The journal: a passive observer that derives each transaction's status, in virtual time.

Each scenario runs over the in-memory, the SQLite and the PostgreSQL journal store (a private
schema per test; skipped when PostgreSQL is unreachable, failed under CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from choreograph import (
    FAILED,
    App,
    Event,
    Failure,
    Publisher,
    Reject,
    Service,
    TimedOut,
    Worker,
    derive_id,
    failed,
    timed_out,
)
from choreograph._envelope import Envelope, decode, encode
from choreograph._journal_model import JournalEntry, TransactionSummary, format_time
from choreograph._journal_sqlite import SQLiteJournalStore
from choreograph._journal_store import MemoryJournalStore
from choreograph.errors import ConfigurationError, StoreError
from choreograph.journal import JOURNAL_GROUP, TIMEDOUT, Journal, JournalStore, open_journal_store
from choreograph.runtime.records import dead_letter_record, failure_envelope, first_envelope
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports.base import Delivery, Message, Subscription
from tests.stores._databases import backend_url


class Requested(Event, type="test.journal.requested"):
    order: str
    mode: str = "ok"  # ok | decline | crash | stall | nobody


class Charged(Event, type="test.journal.charged"):
    order: str
    mode: str


class Declined(Event, type="test.journal.declined"):
    order: str


class Delivered(Event, type="test.journal.delivered"):
    order: str


class Cancelled(Event, type="test.journal.cancelled"):
    order: str


class SpyBus(MemoryTransport):
    """A memory bus that remembers everything published on it."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.published: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.published.extend(messages)
        await super().publish(messages)

    def of_type(self, type_: str) -> list[Message]:
        return [m for m in self.published if m.type == type_]


async def charge(req: Requested) -> Charged | Declined | None:
    """payment's handler (in tests/test_watch.py's app too): charges, declines, stalls or rejects, by ``mode``."""
    if req.mode == "decline":
        return Declined(order=req.order)
    if req.mode == "stall":
        return None
    if req.mode == "nobody":
        raise Reject("cannot charge")
    return Charged(order=req.order, mode=req.mode)


def delivery_app() -> App:
    """payment charges (or declines, or rejects); drone delivers (or crashes); payment refunds on a drone crash."""
    payment, drone = Service("payment"), Service("drone")

    payment.on(Requested)(charge)

    @drone.on(Charged)
    async def fly(charged: Charged) -> Delivered:
        if charged.mode in ("crash", "crash-twice"):
            raise Reject("drone lost")
        return Delivered(order=charged.order)

    @payment.on_failure(Charged)
    async def refund(failure: Failure) -> Cancelled:
        if isinstance(failure.event, Charged) and failure.event.mode == "crash-twice":
            raise Reject("refund refused too")
        return Cancelled(order="refunded")

    return App(
        "delivery",
        [payment, drone],
        ingress=[Requested],
        terminal={Delivered: "completed", Cancelled: "failed", Declined: "failed"},
    )


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def bus(clock: VirtualClock) -> SpyBus:
    return SpyBus(clock)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with backend_url(request.param, tmp_path, "journal.db") as url:
        yield url


@pytest.fixture
def app() -> App:
    return delivery_app()


@pytest.fixture
async def journal(app: App, store_url: str, bus: SpyBus) -> AsyncIterator[Journal]:
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=60, scan_interval=3600) as journal:
        yield journal


async def start(app: App, bus: SpyBus, mode: str = "ok") -> str:
    """Run the app until settled on one request; return its correlation id."""
    async with Worker(app.services, bus):
        [env] = await Publisher(bus, source="/gateway").publish(Requested(order="o-1", mode=mode))
        await settled(bus)
    return env.id


async def test_a_transaction_is_running_until_its_terminal_completed_event(
    journal: Journal, app: App, bus: SpyBus
) -> None:
    async with Worker(app.services, bus):
        pass  # registers the services' groups; they consume later
    [env] = await Publisher(bus, source="/gateway").publish(Requested(order="o-1"))
    await settled(bus)
    tx = await journal.transaction(env.id)
    assert tx is not None and tx.status == "running"
    async with Worker(app.services, bus):
        await settled(bus)
    tx = await journal.transaction(env.id)
    assert tx is not None and tx.status == "completed"
    assert tx.summary.terminal_type == Delivered.event_type()


async def test_the_timeline_is_ordered_and_names_service_and_outcome(journal: Journal, app: App, bus: SpyBus) -> None:
    cid = await start(app, bus)
    tx = await journal.transaction(cid)
    assert tx is not None and tx.timeline is not None
    rows = [(e.type, e.service, e.outcome) for e in tx.timeline]
    assert rows == [
        ("test.journal.requested", "gateway", "ok"),
        ("test.journal.charged", "payment", "ok"),
        ("test.journal.delivered", "drone", "completed"),
    ]
    first, second, third = tx.timeline
    assert (second.causation_id, third.causation_id) == (first.event_id, second.event_id)
    assert all(e.correlation_id == cid for e in tx.timeline)


async def test_a_terminal_failed_event_without_runtime_failure_is_failed(journal: Journal, app: App, bus: SpyBus) -> None:
    cid = await start(app, bus, mode="decline")
    tx = await journal.transaction(cid)
    assert tx is not None and tx.status == "failed"


async def test_a_runtime_failure_followed_by_a_terminal_failed_event_is_compensated(
    journal: Journal, app: App, bus: SpyBus
) -> None:
    cid = await start(app, bus, mode="crash")
    tx = await journal.transaction(cid)
    assert tx is not None and tx.timeline is not None
    assert tx.status == "compensated"
    assert [e.type for e in tx.timeline] == [
        "test.journal.requested", "test.journal.charged", FAILED, "test.journal.cancelled",
    ]
    failure = tx.timeline[2]
    assert (failure.service, failure.outcome, failure.attempt) == ("drone", "gave up: rejected", 1)
    assert failure.failed_type == Charged.event_type()
    assert failure.error == "Reject: drone lost"
    assert failure.record is not None and "envelope" not in failure.record


async def test_a_failure_nobody_compensates_fails_the_transaction_at_once(
    journal: Journal, app: App, bus: SpyBus
) -> None:
    cid = await start(app, bus, mode="nobody")
    tx = await journal.transaction(cid)
    assert tx is not None and tx.status == "failed"
    assert tx.summary.terminal_type is None


async def test_a_failing_compensation_is_compensation_failed(journal: Journal, app: App, bus: SpyBus) -> None:
    cid = await start(app, bus, mode="crash-twice")
    tx = await journal.transaction(cid)
    assert tx is not None and tx.timeline is not None
    assert tx.status == "compensation_failed" and tx.summary.compensation_failures == 1
    assert [(e.type, e.failed_type) for e in tx.timeline if e.kind == "failure"] == [
        (FAILED, Charged.event_type()), (FAILED, FAILED),
    ]
    fly, refund = (e.record or {} for e in tx.timeline if e.kind == "failure")
    assert "compensation" not in fly and refund["compensation"] is True  # what the worker marks


def gave_up(cause: Envelope, service: str, handler: str) -> Envelope:
    """The ``choreograph.failed`` a worker publishes when ``service``'s ``handler`` gives up on ``cause``."""
    record = dead_letter_record(
        reason="max_attempts", service=service, handler=handler, group=service, attempts=3, first_error=None,
        last_error=None, first_attempt_at=None, last_attempt_at=0.0, envelope=cause.to_dict(),
    )
    return failure_envelope(cause, record, service=service, handler=handler, source=f"/choreograph/{service}")


def rolled_back_halfway(cid: str, end: Event) -> list[Envelope]:
    """A drone crash with two compensations: one gives up (its ``choreograph.failed`` handler was
    dead-lettered), the other ends the transaction with ``end``."""
    root = first_envelope(Requested(order=cid), source="/gateway", id=cid)
    charged = first_envelope(Charged(order=cid, mode="crash"), source="/choreograph/payment", id=f"{cid}-charged",
                             correlation_id=cid)
    crashed = gave_up(charged, "drone", "fly")
    refund_gave_up = gave_up(crashed, "payment", "refund")
    ended = first_envelope(end, source="/choreograph/stock", id=f"{cid}-end", correlation_id=cid)
    return [root, charged, crashed, refund_gave_up, ended]


async def test_a_compensation_that_gave_up_is_compensation_failed_whatever_the_order_and_the_end(
    journal: Journal,
) -> None:
    """The other compensation's terminal ``failed`` event made it ``compensated``: the rollback
    read as finished while the refund was dead-lettered and the money never came back."""
    orders = list(itertools.permutations(range(5)))[::4]  # 30 of the 120 orders, each envelope alone
    for n, order in enumerate(orders):
        envelopes = rolled_back_halfway(f"tx-{n}", Cancelled(order="o"))
        for i in order:
            await journal.record([envelopes[i]])
        tx = await journal.transaction(f"tx-{n}")
        assert tx is not None and tx.status == "compensation_failed", order
        assert tx.summary.terminal_type == Cancelled.event_type() and tx.summary.compensation_failures == 1
    await journal.record(rolled_back_halfway("tx-delivered", Delivered(order="o")))  # a completed end neither
    tx = await journal.transaction("tx-delivered")
    assert tx is not None and tx.status == "compensation_failed"

    cids = {f"tx-{n}" for n in range(len(orders))} | {"tx-delivered"}
    listed = await journal.transactions(status="compensation_failed", limit=100)
    assert {t.correlation_id for t in listed} == cids and {t.status for t in listed} == {"compensation_failed"}
    assert await journal.transactions(status="compensated") == []
    assert await journal.transactions(status="completed") == []
    activity = await journal.store.activity(since=0.0, now=journal.now())
    assert activity.statuses["compensation_failed"] == len(cids) and activity.statuses["compensated"] == 0

    intact = rolled_back_halfway("tx-intact", Cancelled(order="o"))
    await journal.record(intact[:3] + intact[4:])  # the refund did not give up: compensated, as before
    tx = await journal.transaction("tx-intact")
    assert tx is not None and tx.status == "compensated"


async def test_a_compensation_replayed_after_it_gave_up_is_no_longer_compensation_failed(
    store_url: str, bus: SpyBus
) -> None:
    """The README's advice: replay the dead letter once the cause is fixed. The refund then ran
    and ended the transaction, but the journal went on showing ``compensation_failed``."""
    payment, drone = Service("payment"), Service("drone")
    broken = [True]
    payment.on(Requested)(charge)

    @drone.on(Charged)
    async def fly(charged: Charged) -> Delivered:
        raise Reject("drone lost")

    @payment.on_failure(Charged)
    async def refund(failure: Failure) -> Cancelled:
        if broken[0]:
            raise Reject("bank offline")
        return Cancelled(order="refunded")

    app = App("delivery", [payment, drone], ingress=[Requested],
              terminal={Delivered: "completed", Cancelled: "failed"})
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=60, scan_interval=3600) as journal:
        cid = await start(app, bus, mode="crash")
        tx = await journal.transaction(cid)
        assert tx is not None and tx.status == "compensation_failed"
        broken[0] = False  # the cause fixed, the dead letter replayed
        assert await bus.replay("payment") == 1
        async with Worker(app.services, bus):
            await settled(bus)
        tx = await journal.transaction(cid)
        assert tx is not None and tx.timeline is not None
        assert [e.type for e in tx.timeline][-1] == Cancelled.event_type()
        assert (tx.status, tx.summary.compensation_failures) == ("compensated", 0)
        assert [t.correlation_id for t in await journal.transactions(status="compensated")] == [cid]
        assert await journal.transactions(status="compensation_failed") == []


def replayed(cid: str) -> list[Envelope]:
    """:func:`rolled_back_halfway` without its other compensation's end, and the refund that gave
    up replayed with success: its first output, whose id only that handler makes from that event."""
    root, charged, crashed, refund_gave_up, _ = rolled_back_halfway(cid, Cancelled(order="o"))
    refunded = first_envelope(Cancelled(order="o"), source="/choreograph/payment", correlation_id=cid,
                              id=derive_id(crashed.id, "payment", "refund", 0))
    return [root, charged, crashed, refund_gave_up, msgspec.structs.replace(refunded, causationid=crashed.id)]


async def test_a_compensation_that_gave_up_and_then_ran_is_cleared_whatever_the_order(journal: Journal) -> None:
    """Brokers do not order events across services: the replay's output may be recorded before the
    give-up, or in one batch with it. Another handler's output on the same event clears nothing."""
    for n, order in enumerate(list(itertools.permutations(range(5)))[::8]):
        envelopes = replayed(f"tx-{n}")
        for i in order:
            await journal.record([envelopes[i]])
        tx = await journal.transaction(f"tx-{n}")
        assert tx is not None and (tx.status, tx.summary.compensation_failures) == ("compensated", 0), order
    await journal.record(replayed("tx-batch"))
    tx = await journal.transaction("tx-batch")
    assert tx is not None and tx.status == "compensated"

    root, charged, crashed, refund_gave_up, _ = rolled_back_halfway("tx-other", Cancelled(order="o"))
    other = first_envelope(Cancelled(order="o"), source="/choreograph/stock", correlation_id="tx-other",
                           id=derive_id(crashed.id, "stock", "release", 0))
    await journal.record([root, charged, crashed, refund_gave_up, msgspec.structs.replace(other, causationid=crashed.id)])
    tx = await journal.transaction("tx-other")
    assert tx is not None and (tx.status, tx.summary.compensation_failures) == ("compensation_failed", 1)


class Reserved(Event, type="test.journal.reserved"):
    order: str


class Released(Event, type="test.journal.released"):
    order: str


def stock_app() -> App:
    """stock reserves for every request; its compensation (``release``, triggered by a decline,
    a failed charge or the transaction's timeout) and its timeout handler (``alert``) refuse."""
    payment, stock = Service("payment"), Service("stock")
    payment.on(Requested)(charge)

    @stock.on(Requested)
    async def reserve(req: Requested) -> Reserved:
        return Reserved(order=req.order)

    @stock.compensate(Reserved, on=[Declined, failed(Charged), timed_out()])
    async def release(reserved: Reserved, cause: Declined | Failure | TimedOut) -> Released:
        raise Reject("stock ledger closed")

    return App("stock", [payment, stock], ingress=[Requested],
               terminal={Delivered: "completed", Declined: "failed", Released: "failed"})


async def test_a_compensation_that_gave_up_is_compensation_failed_whichever_event_completed_it(
    store_url: str, bus: SpyBus, clock: VirtualClock
) -> None:
    """A ``compensate(...)`` handler gives up on whichever event completed its join: the business
    trigger (the decline after the reservation), its own step (the decline first) or the timeout.
    The journal showed ``compensated`` or ``failed``: the failed type is the trigger's, the step's or the timeout's."""
    app = stock_app()
    publisher = Publisher(bus, source="/gateway")
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=60, scan_interval=3600) as journal:
        async with Worker(app.services, bus):
            await publisher.publish(Requested(order="o", mode="stall"), correlation_id="by-trigger")
            await settled(bus)
            await publisher.publish(Declined(order="o"), correlation_id="by-trigger")
            await publisher.publish(Declined(order="o"), correlation_id="by-step")
            await settled(bus)
            await publisher.publish(Requested(order="o", mode="stall"), correlation_id="by-step")
            await settled(bus)
            await publisher.publish(Requested(order="o", mode="stall"), correlation_id="by-timeout")
            await settled(bus)
            clock.advance(61)
            assert await journal.check_deadlines() == ["by-timeout"]
            await settled(bus)
        for cid, gave_up_on in [("by-trigger", Declined.event_type()), ("by-step", Reserved.event_type()),
                                ("by-timeout", TIMEDOUT)]:
            tx = await journal.transaction(cid)
            assert tx is not None and tx.timeline is not None
            [failure] = [e for e in tx.timeline if e.kind == "failure"]
            assert failure.failed_type == gave_up_on and failure.service == "stock", cid
            assert tx.status == "compensation_failed" and tx.summary.compensation_failures == 1, cid
            assert failure.record is not None and failure.record["compensation"] is True
        listed = await journal.transactions(status="compensation_failed")
        assert {t.correlation_id for t in listed} == {"by-trigger", "by-step", "by-timeout"}


async def test_a_handler_of_the_timeout_that_gave_up_is_compensation_failed(
    app: App, store_url: str, bus: SpyBus, clock: VirtualClock
) -> None:
    """It undoes what a stuck transaction left behind; the journal showed ``failed`` (nobody
    compensates failures of ``choreograph.timedout``), as if an ordinary step had given up."""
    alerts = Service("alerts")

    @alerts.on(TimedOut)
    async def page(timeout: TimedOut) -> None:
        raise Reject("pager down")

    app = App("delivery", [*app.services, alerts], ingress=app.ingress, terminal=app.terminal)
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=60, scan_interval=3600) as journal:
        cid = await start(app, bus, mode="stall")
        clock.advance(61)
        async with Worker(app.services, bus):
            assert await journal.check_deadlines() == [cid]
            await settled(bus)
        tx = await journal.transaction(cid)
    assert tx is not None and tx.timeline is not None
    [failure] = [e for e in tx.timeline if e.kind == "failure"]
    assert (failure.service, failure.failed_type) == ("alerts", TIMEDOUT)
    assert tx.status == "compensation_failed"
    assert failure.record is not None and failure.record["compensation"] is True


async def test_without_compensation_knowledge_a_failure_waits_for_a_terminal_event(
    app: App, store_url: str, bus: SpyBus, clock: VirtualClock
) -> None:
    async with Journal(store_url, transport=bus, stuck_after=60, scan_interval=3600) as journal:
        cid = await start(app, bus, mode="nobody")
        tx = await journal.transaction(cid)
        assert tx is not None and tx.status == "running"
        clock.advance(61)
        tx = await journal.transaction(cid)
        assert tx is not None and tx.status == "stuck"


async def test_a_stuck_transaction_is_announced_once_with_a_deterministic_id(
    journal: Journal, app: App, bus: SpyBus, clock: VirtualClock
) -> None:
    cid = await start(app, bus, mode="stall")
    assert await journal.check_deadlines() == []
    clock.advance(59)
    assert await journal.check_deadlines() == []
    clock.advance(2)
    assert await journal.check_deadlines() == [cid]
    await settled(bus)
    assert await journal.check_deadlines() == []
    clock.advance(3600)
    assert await journal.check_deadlines() == []

    [message] = bus.of_type(TIMEDOUT)
    envelope = decode(message.body)
    assert envelope.id == derive_id(cid, JOURNAL_GROUP, "timedout", 0)
    assert envelope.correlationid == cid
    assert envelope.data["root_type"] == Requested.event_type()
    tx = await journal.transaction(cid)
    assert tx is not None and tx.timeline is not None
    assert tx.status == "stuck" and tx.summary.timed_out
    assert tx.timeline[-1].type == TIMEDOUT and tx.timeline[-1].outcome == "timed out"


async def test_the_deadline_watcher_announces_a_stuck_transaction_by_itself(
    app: App, store_url: str, bus: SpyBus, clock: VirtualClock
) -> None:
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=60, scan_interval=5):
        cid = await start(app, bus, mode="stall")
        clock.advance(65)
        for _ in range(1000):  # the watcher wakes on the virtual clock; wait for its publish
            if bus.of_type(TIMEDOUT):
                break
            await asyncio.sleep(0.001)
        await settled(bus)
        clock.advance(60)
        await settled(bus)
    assert [decode(m.body).correlationid for m in bus.of_type(TIMEDOUT)] == [cid]


async def test_a_terminal_failed_event_after_the_timeout_is_compensated(
    journal: Journal, app: App, bus: SpyBus, clock: VirtualClock
) -> None:
    cid = await start(app, bus, mode="stall")
    clock.advance(61)
    await journal.check_deadlines()
    await Publisher(bus, source="/choreograph/payment").publish(Cancelled(order="o-1"), correlation_id=cid)
    await settled(bus)
    tx = await journal.transaction(cid)
    assert tx is not None and tx.status == "compensated"


async def test_a_late_terminal_completed_event_moves_a_stuck_transaction_to_completed(
    journal: Journal, app: App, bus: SpyBus, clock: VirtualClock
) -> None:
    cid = await start(app, bus, mode="stall")
    clock.advance(61)
    tx = await journal.transaction(cid)
    assert tx is not None and tx.status == "stuck"
    await Publisher(bus).publish(Delivered(order="o-1"), correlation_id=cid)
    await settled(bus)
    tx = await journal.transaction(cid)
    assert tx is not None and tx.status == "completed"
    assert await journal.check_deadlines() == []


async def test_the_envelope_deadline_overrides_stuck_after(
    app: App, store_url: str, bus: SpyBus, clock: VirtualClock
) -> None:
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=3600, scan_interval=3600) as journal:
        deadline = format_time(clock.time() + 5)
        [env] = await Publisher(bus).publish(Requested(order="o-1", mode="stall"), deadline=deadline)
        await settled(bus)
        clock.advance(4)
        assert await journal.check_deadlines() == []
        clock.advance(2)
        assert await journal.check_deadlines() == [env.id]


async def test_a_deadline_no_timestamp_can_show_does_not_stop_every_other_timeout(
    app: App, store_url: str, bus: SpyBus, clock: VirtualClock
) -> None:
    """A producer's deadline of year 1 with a positive offset parses, but is before anything
    ``choreograph.timedout`` can state; it counts as unreadable (stuck_after applies), so the
    scan still announces every transaction that is due, its own included."""
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=60, scan_interval=3600) as journal:
        [odd] = await Publisher(bus).publish(Requested(order="o-1", mode="stall"), deadline="0001-01-01T00:00:00+01:00")
        [plain] = await Publisher(bus).publish(Requested(order="o-2", mode="stall"))
        await settled(bus)
        clock.advance(61)
        assert sorted(await journal.check_deadlines()) == sorted([odd.id, plain.id])


async def test_a_lowercase_z_time_and_deadline_are_read(journal: Journal, clock: VirtualClock) -> None:
    """RFC 3339 allows ``z`` for ``Z`` (and the envelope accepts it), but Python 3.11's
    ``fromisoformat`` does not: an event from a producer that writes it lost its time (shown at
    the recording time) and its deadline (the transaction fell back to ``stuck_after``)."""
    at, deadline = clock.time() - 2.5, clock.time() + 5
    env = Envelope(
        id="tx-z", source="/elsewhere", type=Requested.event_type(), data={"order": "o-1"},
        time=format_time(at).replace("Z", "z"), deadline=format_time(deadline).replace("Z", "z"),
    )
    assert decode(encode(env)) == env  # a well-formed event
    await journal.record([env])
    tx = await journal.transaction("tx-z")
    assert tx is not None and tx.timeline is not None
    assert tx.timeline[0].at == pytest.approx(at, abs=1e-3) and tx.summary.started_at == pytest.approx(at, abs=1e-3)
    assert tx.summary.deadline == pytest.approx(deadline, abs=1e-3) and tx.summary.deadline_explicit


async def test_transactions_are_listed_by_status(journal: Journal, app: App, bus: SpyBus, clock: VirtualClock) -> None:
    ids = {mode: await start(app, bus, mode=mode) for mode in ("ok", "decline", "crash", "stall")}
    assert [t.correlation_id for t in await journal.transactions(status="completed")] == [ids["ok"]]
    assert [t.correlation_id for t in await journal.transactions(status="failed")] == [ids["decline"]]
    assert [t.correlation_id for t in await journal.transactions(status="compensated")] == [ids["crash"]]
    assert [t.correlation_id for t in await journal.transactions(status="running")] == [ids["stall"]]
    assert await journal.transactions(status="stuck") == []
    clock.advance(61)
    assert [t.correlation_id for t in await journal.transactions(status="stuck")] == [ids["stall"]]
    assert len(await journal.transactions()) == 4
    assert len(await journal.transactions(limit=2)) == 2
    with pytest.raises(ConfigurationError):
        await journal.transactions(status="lost")  # type: ignore[arg-type]


class Scanned(Event, type="test.journal.scanned"):
    """An event from outside that joins a running transaction (a courier's scan)."""

    order: str


async def test_an_event_joining_from_outside_does_not_replace_the_root_whatever_the_order(
    journal: Journal, app: App, bus: SpyBus, clock: VirtualClock
) -> None:
    """An uncaused event published into a running transaction (its correlation id given) is not
    what started it: ``root_type`` (``transactions``' "started by", ``choreograph.timedout``'s
    ``root_type`` and subject) stays the root's, also when the root is recorded after its effects."""
    cid = await start(app, bus, mode="stall")
    clock.advance(1)
    await Publisher(bus, source="/gateway").publish(Scanned(order="o-1"), correlation_id=cid)
    await settled(bus)
    tx = await journal.transaction(cid)
    assert tx is not None and tx.summary.event_count == 2
    assert tx.summary.root_type == Requested.event_type()
    clock.advance(60)
    await journal.check_deadlines()
    [message] = bus.of_type(TIMEDOUT)
    assert decode(message.body).data["root_type"] == Requested.event_type()

    root = first_envelope(Requested(order="o-2", mode="stall"), source="/gateway", id="root-2")
    clock.advance(1)  # (the envelopes' times are the system clock's: the root's is earlier)
    joined = first_envelope(Scanned(order="o-2"), source="/gateway", id="scan-2", correlation_id="root-2")
    await journal.record([joined])  # not on the bus: recorded in this order
    await journal.record([root])
    tx = await journal.transaction("root-2")
    assert tx is not None and tx.summary.root_type == Requested.event_type()


async def test_a_timeout_carries_the_trace_context_of_the_transaction(
    journal: Journal, bus: SpyBus, clock: VirtualClock
) -> None:
    """``choreograph.timedout`` went out with no ``traceparent``: a tracing backend showed the
    timeout (and every compensation it triggered) as a trace of its own, unlinked to the
    transaction. It carries the trace context of the latest event that had one."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    root = first_envelope(Requested(order="o-1", mode="stall"), source="/gateway", id="tx-traced",
                          traceparent=f"00-{trace}-00f067aa0ba902b7-01")
    charged = msgspec.structs.replace(
        first_envelope(Charged(order="o-1", mode="stall"), source="/choreograph/payment", id="tx-traced-charged",
                       correlation_id="tx-traced", traceparent=f"00-{trace}-b7ad6b7169203331-01"),
        causationid="tx-traced", tracestate="vendor=opaque",
    )
    scanned = first_envelope(Scanned(order="o-1"), source="/courier", id="tx-traced-scan", correlation_id="tx-traced")
    for envelope in (root, charged, scanned):  # the last from outside any trace
        await journal.record([envelope])
    clock.advance(61)
    assert await journal.check_deadlines() == ["tx-traced"]
    [message] = bus.of_type(TIMEDOUT)
    timedout = decode(message.body)
    assert (timedout.traceparent, timedout.tracestate) == (charged.traceparent, "vendor=opaque")
    assert timedout.causationid == "tx-traced-scan"
    tx = await journal.transaction("tx-traced")
    assert tx is not None and tx.timeline is not None
    assert [e.traceparent for e in tx.timeline[:3]] == [root.traceparent, charged.traceparent, None]


async def test_a_redelivered_event_is_recorded_once(journal: Journal, bus: SpyBus) -> None:
    [env] = await Publisher(bus).publish(Requested(order="o-1"), ids=["same-id"])
    await Publisher(bus).publish(Requested(order="o-1"), ids=["same-id"])
    await settled(bus)
    await journal.record([env, env])
    tx = await journal.transaction("same-id")
    assert tx is not None and tx.timeline is not None
    assert tx.summary.event_count == 1 and len(tx.timeline) == 1


async def test_the_journal_publishes_nothing_but_timeouts(journal: Journal, app: App, bus: SpyBus) -> None:
    await start(app, bus, mode="crash")
    assert not [m for m in bus.published if decode(m.body).source == journal.source]


async def test_a_malformed_message_is_skipped_not_blocking(journal: Journal, bus: SpyBus) -> None:
    await bus.publish([Message("bad", "x.y", b"not json")])
    [env] = await Publisher(bus).publish(Requested(order="o-1"))
    await settled(bus)
    assert journal.stats().malformed == 1
    assert await journal.transaction(env.id) is not None


async def test_an_unknown_correlation_id_has_no_transaction(journal: Journal) -> None:
    assert await journal.transaction("nope") is None


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_a_durable_journal_is_readable_by_another_journal_after_restart(
    app: App, bus: SpyBus, store_url: str
) -> None:
    async with Journal.from_app(app, store_url, transport=bus):
        cid = await start(app, bus, mode="crash")
    reader = Journal(store_url)  # no transport: queries only
    try:
        tx = await reader.transaction(cid)
        assert tx is not None and tx.timeline is not None
        assert tx.status == "compensated" and len(tx.timeline) == 4
    finally:
        await reader.close()


class _ReadHook:
    """A PostgreSQL pool (or one of its connections) that runs ``hook`` before the first query of
    the journal's entries: what another process records while the reader reads."""

    def __init__(self, target: Any, hook: Callable[[], Awaitable[None]]) -> None:
        self._target, self._hook = target, hook

    def __getattr__(self, name: str) -> object:
        return getattr(self._target, name)

    async def _before(self, sql: str) -> None:
        if "choreograph_journal_events" in sql:
            await self._hook()

    async def fetch(self, sql: str, *args: object) -> object:
        await self._before(sql)
        return await self._target.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> object:
        await self._before(sql)
        return await self._target.fetchrow(sql, *args)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_ReadHook]:
        async with self._target.acquire() as conn:
            yield _ReadHook(conn, self._hook)


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_a_transaction_is_one_read_its_summary_and_timeline_agree(app: App, store_url: str) -> None:
    """The summary and the timeline were two queries: the journal (another process, for ``trace``
    or the gateway) recording the terminal event between them gave a ``running`` transaction of
    one event over a timeline of two ending in ``completed``."""
    root = first_envelope(Requested(order="o"), source="/gateway", id="tx-read")
    end = first_envelope(Delivered(order="o"), source="/choreograph/drone", id="tx-read-end", correlation_id="tx-read")
    writer, reader = Journal.from_app(app, store_url), Journal(open_journal_store(store_url, read_only=True))
    recorded: list[str] = []

    async def record_the_end() -> None:
        if not recorded:
            recorded.append(end.id)
            await writer.record([end])

    try:
        await writer.record([root])
        await reader.open()
        loop = asyncio.get_running_loop()
        store = reader.store
        if isinstance(store, SQLiteJournalStore):
            def trace(sql: str) -> None:  # on the reader's thread, as a statement starts
                if "FROM journal_events" in sql:
                    asyncio.run_coroutine_threadsafe(record_the_end(), loop).result()

            assert store._db is not None
            store._db.set_trace_callback(trace)
        else:
            store._pool = _ReadHook(store._pool, record_the_end)
        tx = await reader.transaction("tx-read")
        assert recorded == [end.id]  # the end was recorded while the reader read
        assert tx is not None and tx.timeline is not None
        assert (tx.status, tx.summary.event_count, [e.event_id for e in tx.timeline]) == ("running", 1, ["tx-read"])
        tx = await reader.transaction("tx-read")  # a read after it sees it
        assert tx is not None and tx.timeline is not None
        assert (tx.status, tx.summary.event_count, len(tx.timeline)) == ("completed", 2, 2)
    finally:
        await reader.close()
        await writer.close()


OLD_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    correlation_id TEXT NOT NULL,
    type TEXT NOT NULL, source TEXT NOT NULL, service TEXT NOT NULL, kind TEXT NOT NULL,
    at REAL NOT NULL, recorded_at REAL NOT NULL, causation_id TEXT, time TEXT, attempt INTEGER,
    deadline REAL, failed_type TEXT, compensable INTEGER NOT NULL, record TEXT
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
    timed_out INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_tx_status ON journal_transactions (base_status, deadline);
CREATE INDEX IF NOT EXISTS journal_tx_started ON journal_transactions (started_at);
"""


def old_rows(db: sqlite3.Connection, journal: Journal, envelopes: Sequence[Envelope], base_status: str) -> None:
    """What a journal before ``compensation_failed`` (and stored trace contexts) wrote for ``envelopes``."""
    entries = [journal.entry(env, 1_000.0) for env in envelopes]
    for e in entries:
        db.execute(
            "INSERT INTO journal_events (event_id, correlation_id, type, source, service, kind, at, recorded_at, "
            "causation_id, time, attempt, deadline, failed_type, compensable, record) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL)",
            (e.event_id, e.correlation_id, e.type, e.source, e.service, e.kind, e.at, e.recorded_at,
             e.causation_id, e.time, e.attempt, e.deadline, e.failed_type, int(e.compensable)),
        )
    s = TransactionSummary.first(entries[0], 60.0)
    for e in entries[1:]:
        s.fold(e)
    db.execute(
        "INSERT INTO journal_transactions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (s.correlation_id, base_status, s.first_seen, s.last_seen, s.started_at, s.deadline,
         int(s.deadline_explicit), s.root_type, s.event_count, s.terminal_type, s.terminal_kind, s.failures,
         s.uncompensated, int(s.timed_out)),
    )


async def test_a_journal_file_written_before_compensation_failed_opens_and_shows_it(
    app: App, bus: SpyBus, tmp_path: Path
) -> None:
    """A new column in a file that has the table: ``CREATE TABLE IF NOT EXISTS`` left the old table
    as it was, so every read and write of the new column failed; and a transaction recorded before
    must read ``compensation_failed`` too, not the ``compensated`` it was stored as."""
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_SQLITE_SCHEMA)
        writer = Journal.from_app(app, "memory://")
        old_rows(db, writer, rolled_back_halfway("tx-old", Cancelled(order="o")), "compensated")
        intact = rolled_back_halfway("tx-intact", Cancelled(order="o"))
        old_rows(db, writer, intact[:3] + intact[4:], "compensated")
        db.commit()
    url = f"sqlite:///{path}"
    reader = Journal(url)  # no transport: queries only (gateway, trace)
    try:
        tx = await reader.transaction("tx-old")
        assert tx is not None and tx.status == "compensation_failed" and tx.timeline is not None
        assert len(tx.timeline) == 5 and all(e.traceparent is None for e in tx.timeline)
        assert [t.correlation_id for t in await reader.transactions(status="compensation_failed")] == ["tx-old"]
        assert [t.correlation_id for t in await reader.transactions(status="compensated")] == ["tx-intact"]
    finally:
        await reader.close()
    async with Journal.from_app(app, url, transport=bus) as journal:  # and records into it
        traceparent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        late = first_envelope(Scanned(order="o"), source="/courier", id="late", correlation_id="tx-intact",
                              traceparent=traceparent)
        await journal.record([late])
        tx = await journal.transaction("tx-intact")
        assert tx is not None and tx.timeline is not None and tx.summary.event_count == 5
        assert tx.status == "compensated" and tx.timeline[-1].traceparent == traceparent


def gave_up_marked(cause: Envelope, service: str, handler: str) -> Envelope:
    """:func:`gave_up` by a compensation: the worker marks its record ``"compensation": true``."""
    envelope = gave_up(cause, service, handler)
    envelope.data["record"]["compensation"] = True
    return envelope


async def test_a_journal_file_counted_by_the_previous_rule_is_counted_again_once(
    app: App, bus: SpyBus, tmp_path: Path
) -> None:
    """A journal before the compensation mark stored a timeout handler's or a marked
    compensation's give-up as ``failed`` or ``compensated``; the file reads ``compensation_failed``."""
    url = f"sqlite:///{tmp_path / 'counted.db'}"
    cid = "tx-timeout"
    root = first_envelope(Requested(order="o", mode="stall"), source="/gateway", id=cid)
    timedout = first_envelope(Requested(order="o"), source="/choreograph/journal", id=f"{cid}-t", correlation_id=cid)
    timedout = msgspec.structs.replace(timedout, type=TIMEDOUT)
    released = first_envelope(Charged(order="o", mode="ok"), source="/choreograph/stock", id="tx-step-c",
                              correlation_id="tx-step")
    intact = rolled_back_halfway("tx-intact", Cancelled(order="o"))
    async with Journal.from_app(app, url, transport=bus) as journal:
        await journal.record([root, timedout, gave_up(timedout, "alerts", "page")])
        await journal.record([first_envelope(Requested(order="o"), source="/gateway", id="tx-step"), released,
                              gave_up_marked(released, "stock", "release"),
                              first_envelope(Cancelled(order="o"), source="/s", id="tx-step-e",
                                             correlation_id="tx-step")])
        await journal.record(intact[:3] + intact[4:])
    with contextlib.closing(sqlite3.connect(tmp_path / "counted.db")) as db:  # as the previous journal stored them
        db.execute("UPDATE journal_transactions SET compensation_failures = 0, base_status = 'failed' "
                   "WHERE correlation_id = 'tx-timeout'")
        db.execute("UPDATE journal_transactions SET compensation_failures = 0, base_status = 'compensated' "
                   "WHERE correlation_id = 'tx-step'")
        db.execute("PRAGMA user_version = 0")
        db.commit()
    reader = Journal(url)
    try:
        listed = await reader.transactions(status="compensation_failed")
        assert sorted(t.correlation_id for t in listed) == ["tx-step", "tx-timeout"]
        assert all(t.summary.compensation_failures == 1 for t in listed)
        assert [t.correlation_id for t in await reader.transactions(status="compensated")] == ["tx-intact"]
    finally:
        await reader.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "counted.db")) as db:  # once: not on every open
        assert db.execute("PRAGMA user_version").fetchone() == (1,)


async def test_a_journal_without_transport_cannot_start() -> None:
    with pytest.raises(ConfigurationError, match="transport"):
        await Journal("memory://").start()


def test_from_app_takes_terminal_events_and_compensated_failures(app: App) -> None:
    journal = Journal.from_app(app, "memory://")
    assert journal.terminal == {
        Delivered.event_type(): "completed", Cancelled.event_type(): "failed", Declined.event_type(): "failed",
    }
    assert journal.compensated == {Charged.event_type()}


def test_unknown_journal_url_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown scheme"):
        open_journal_store("mongodb://x")
    assert isinstance(open_journal_store("memory://"), JournalStore)


class FlakyJournalStore(MemoryJournalStore):
    """A memory journal store whose first ``failures`` writes raise, as a database that is down."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def record(self, entries: Sequence[JournalEntry], *, stuck_after: float) -> list[TransactionSummary]:
        if self.failures:
            self.failures -= 1
            raise StoreError("journal store unavailable")
        return await super().record(entries, stuck_after=stuck_after)


async def test_a_journal_store_outage_is_waited_out_on_the_clock(bus: SpyBus, clock: VirtualClock) -> None:
    """The journal backs off on its clock while its store is down, so settled() fast-forwards
    the outage (longer than settled()'s real timeout) and every event is recorded once."""
    store = FlakyJournalStore(failures=15)
    async with Journal(store, transport=bus, scan_interval=3600):
        [env] = await Publisher(bus, source="/gateway").publish(Requested(order="o-1"))
        start = clock.time()
        await settled(bus, timeout=5.0)
        assert store.failures == 0
        assert clock.time() - start >= 15.0  # each failed write: the delivery back after 1 s, the consumer 1 s
        journal_view = Journal(store)
        tx = await journal_view.transaction(env.id)
        assert tx is not None and tx.summary.event_count == 1


async def test_a_failure_only_a_joins_fan_out_takes_is_not_compensated(
    store_url: str, bus: SpyBus, clock: VirtualClock
) -> None:
    """A join registers the runtime's fan-out of its own give-up as a failure handler of each slot's
    type (and of ``choreograph.failed`` for a ``failed(X)`` slot): it passes that give-up on to the
    other arrivals and ignores every other failure. The journal counted those types as compensated,
    so a failure of ``Charged`` that nobody compensates showed ``running``, then ``stuck``, not ``failed``
    (lint said so: ``uncompensated-failure``)."""
    payment, drone, shipping = Service("payment"), Service("drone"), Service("shipping")
    payment.on(Requested)(charge)

    @drone.on(Charged)
    async def fly(charged: Charged) -> Delivered:
        raise Reject("drone lost")

    @shipping.on_all(Charged, Reserved, failed(Declined))
    async def ship(charged: Charged, reserved: Reserved, declined: Failure) -> None:
        return None

    app = App("shipping", [payment, drone, shipping], ingress=[Requested], terminal={Delivered: "completed"})
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=60, scan_interval=3600) as journal:
        assert journal.compensated == {Declined.event_type()}  # the join's failed(Declined) slot takes those up
        cid = await start(app, bus)
        tx = await journal.transaction(cid)
    assert tx is not None and tx.status == "failed"


async def test_a_join_that_timed_out_with_a_failure_among_its_arrivals_is_no_compensation_failure(
    store_url: str, bus: SpyBus, clock: VirtualClock
) -> None:
    """At its deadline a join announces the failure of each arrival, so each upstream step can undo
    its own. An arrival of a ``failed(X)`` slot is itself the runtime's failure of ``X``, already
    announced: it was announced again, as a failure of a ``choreograph.failed`` event - what the
    journal reads as a compensation that gave up (``compensation_failed``, over every other status)
    and what ``on_failure`` handlers of ``choreograph.failed`` take for one. Nothing gave up."""
    payment, stock, ledger, shipping = Service("payment"), Service("stock"), Service("ledger"), Service("shipping")
    payment.on(Requested)(charge)

    @stock.on(Requested)
    async def reserve(req: Requested) -> Reserved:
        return Reserved(order=req.order)

    @ledger.on(Reserved)
    async def book(reserved: Reserved) -> None:
        raise Reject("ledger closed")

    @shipping.on_all(Charged, failed(Reserved), within=30)
    async def refund(charged: Charged, failure: Failure) -> Cancelled:
        return Cancelled(order=charged.order)

    app = App("refunds", [payment, stock, ledger, shipping], ingress=[Requested],
              terminal={Cancelled: "failed", Declined: "failed"})
    async with Journal.from_app(app, store_url, transport=bus, stuck_after=3600, scan_interval=3600) as journal:
        cid = await start(app, bus, mode="decline")  # the charge declined: Charged never comes
        tx = await journal.transaction(cid)
    assert tx is not None and tx.timeline is not None
    assert [e.record["reason"] for e in tx.timeline if e.kind == "failure" and e.record] == ["rejected"]
    assert tx.status == "compensated" and tx.summary.compensation_failures == 0


class BlipBus(SpyBus):
    """A memory bus whose journal subscription fails to settle its first ``blips`` batches (acks
    and retries), as a broker connection lost between a fetch and its ack."""

    def __init__(self, clock: VirtualClock, blips: int) -> None:
        super().__init__(clock)
        self.blips = blips

    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        sub = await super().subscribe(group, types)
        if group != JOURNAL_GROUP:
            return sub
        bus = self
        ack_many = sub.ack_many

        async def blipping_ack_many(deliveries: Sequence[Delivery]) -> None:
            if bus.blips:
                bus.blips -= 1
                raise ConnectionError("connection to the broker lost")
            await ack_many(deliveries)

        sub.ack_many = blipping_ack_many  # type: ignore[method-assign]
        return sub


async def test_a_broker_blip_while_acking_does_not_stop_the_journal(clock: VirtualClock) -> None:
    """The journal's consumer let an ack that failed (the broker went away after the fetch) end
    its task: the process went on saying "journal running" and recorded nothing more. Now it
    logs it and goes on; the unacked deliveries come back after their lease and the store
    drops the ids it already has."""
    bus = BlipBus(clock, blips=1)
    store = MemoryJournalStore()
    async with Journal(store, transport=bus, scan_interval=3600) as journal:
        [first] = await Publisher(bus, source="/gateway").publish(Requested(order="o-1"))
        await settled(bus)
        assert bus.blips == 0
        [second] = await Publisher(bus, source="/gateway").publish(Requested(order="o-2"))
        await settled(bus)
        for env in (first, second):
            tx = await journal.transaction(env.id)
            assert tx is not None and tx.summary.event_count == 1


class _CountingStore(MemoryJournalStore):
    def __init__(self) -> None:
        super().__init__()
        self.opens = self.closes = 0

    async def open(self) -> None:
        self.opens += 1

    async def close(self) -> None:
        self.closes += 1


async def test_a_journal_whose_start_fails_closes_the_store_it_opened() -> None:
    """``async with Journal(...)`` whose subscription is refused: no stop() follows, and the
    store start() had opened stayed open."""

    class Refusing(MemoryTransport):
        async def subscribe(self, group: str, types: Collection[str] | None) -> Any:
            raise ConnectionError("refused")

    store = _CountingStore()
    with pytest.raises(ConnectionError):
        async with Journal(store, transport=Refusing()):
            pass
    assert (store.opens, store.closes) == (1, 1)


class _GatedSubscribe(MemoryTransport):
    def __init__(self) -> None:
        super().__init__()
        self.subscribing, self.gate = asyncio.Event(), asyncio.Event()
        self.subscriptions = 0

    async def subscribe(self, group: str, types: Collection[str] | None) -> Any:
        self.subscriptions += 1
        self.subscribing.set()
        await self.gate.wait()
        return await super().subscribe(group, types)


async def test_a_journal_stopped_while_it_subscribes_is_left_stopped_with_its_store_closed() -> None:
    """stop() while start() was subscribing found no tasks and no subscription, closed the store
    and returned; the start then went on: the journal consumed after stop(), its store closed
    under it and its subscription never closed."""
    store, bus = _CountingStore(), _GatedSubscribe()
    journal = Journal(store, transport=bus)
    starting = asyncio.create_task(journal.start())
    await bus.subscribing.wait()
    stopping = asyncio.create_task(journal.stop())
    await asyncio.sleep(0)  # one turn: stop() runs up to its first suspension, inside the start
    bus.gate.set()
    await starting
    await stopping
    assert journal._tasks == [] and journal._sub is None
    assert store.opens == store.closes == 1


async def test_two_journal_starts_at_once_subscribe_once() -> None:
    """Two start() at once both found no tasks: the journal subscribed twice, and the first start's
    subscription and tasks, replaced by the second's, were never stopped."""
    bus = _GatedSubscribe()
    journal = Journal(_CountingStore(), transport=bus)
    first = asyncio.create_task(journal.start())
    await bus.subscribing.wait()
    second = asyncio.create_task(journal.start())
    await asyncio.sleep(0)  # one turn: the second start runs up to its first suspension
    bus.gate.set()
    await asyncio.gather(first, second)
    tasks = journal._tasks
    await journal.stop()
    assert bus.subscriptions == 1
    assert all(task.done() for task in tasks)
