"""Compensations (``@service.compensate``), transaction timeouts and deadlines, in virtual time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from choreograph import (
    FAILED,
    App,
    ConfigurationError,
    Context,
    Event,
    Failure,
    Publisher,
    Reject,
    RetryPolicy,
    Service,
    Worker,
)
from choreograph._envelope import decode
from choreograph.journal import TIMEDOUT as JOURNAL_TIMEDOUT
from choreograph.journal import Journal
from choreograph.sagas import (
    TIMEDOUT,
    TimedOut,
    deadline_of,
    deadline_text,
    failed,
    is_compensation,
    is_rollback,
    timed_out,
)
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports.base import Message


class Placed(Event, type="test.sagas.placed"):
    order: str
    qty: int = 1


class Reserved(Event, type="test.sagas.reserved"):
    order: str
    qty: int


class OutOfStock(Event, type="test.sagas.out_of_stock"):
    order: str


class Declined(Event, type="test.sagas.declined"):
    order: str


class Released(Event, type="test.sagas.released"):
    order: str
    qty: int
    because: str


class SpyBus(MemoryTransport):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.published: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.published.extend(messages)
        await super().publish(messages)

    def data_of(self, cls: type[Event]) -> list[object]:
        return [decode(m.body).data for m in self.published if m.type == cls.event_type()]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def bus(clock: VirtualClock) -> SpyBus:
    return SpyBus(clock)


class Inventory(Service):
    """Reserves stock for an order (up to 5 items) and releases it when the order fails."""

    def __init__(self, *, fail_release: int = 0) -> None:
        super().__init__("inventory", retry=RetryPolicy(max_attempts=4, base=1.0, jitter=False))
        self.released: list[tuple[Reserved, object]] = []
        self.attempts: list[int] = []

        @self.on(Placed)
        async def reserve(order: Placed) -> Reserved | OutOfStock:
            if order.qty > 5:
                return OutOfStock(order=order.order)
            return Reserved(order=order.order, qty=order.qty)

        @self.compensate(Reserved, on=[Declined, failed(Reserved), timed_out()])
        async def release(reserved: Reserved, cause: Declined | Failure | TimedOut, ctx: Context) -> Released:
            self.attempts.append(ctx.attempt)
            if ctx.attempt <= fail_release:
                raise RuntimeError(f"stock database locked (attempt {ctx.attempt})")
            self.released.append((reserved, cause))
            because = cause.reason if isinstance(cause, Failure) else type(cause).__name__
            return Released(order=reserved.order, qty=reserved.qty, because=because)


async def test_a_compensation_undoes_the_step_with_the_step_s_own_data(bus: SpyBus) -> None:
    inventory = Inventory()
    async with Worker([inventory], bus):
        publisher = Publisher(bus)
        await publisher.publish(Placed(order="o", qty=3), correlation_id="tx")
        await settled(bus)
        assert inventory.released == []  # a step alone is not undone
        await publisher.publish(Declined(order="o"), correlation_id="tx")
        await settled(bus)
    assert inventory.released == [(Reserved(order="o", qty=3), Declined(order="o"))]
    assert bus.data_of(Released) == [{"order": "o", "qty": 3, "because": "Declined"}]


async def test_a_trigger_that_overtakes_the_step_runs_the_compensation_once_the_step_is_done(bus: SpyBus) -> None:
    inventory = Inventory()
    async with Worker([inventory], bus):
        publisher = Publisher(bus)
        await publisher.publish(Declined(order="o"), correlation_id="tx")
        await settled(bus)
        assert inventory.released == []
        await publisher.publish(Placed(order="o", qty=2), correlation_id="tx")
        await settled(bus)
    assert inventory.released == [(Reserved(order="o", qty=2), Declined(order="o"))]


async def test_a_trigger_in_a_transaction_where_the_step_never_happened_undoes_nothing(bus: SpyBus) -> None:
    inventory = Inventory()
    async with Worker([inventory], bus):
        publisher = Publisher(bus)
        await publisher.publish(Placed(order="o", qty=50), correlation_id="tx")  # out of stock
        await publisher.publish(Declined(order="o"), correlation_id="tx")
        await settled(bus)
    assert inventory.released == []
    assert bus.data_of(Released) == []


async def test_a_compensation_runs_once_however_many_triggers_arrive(bus: SpyBus) -> None:
    inventory = Inventory()
    async with Worker([inventory], bus):
        publisher = Publisher(bus)
        await publisher.publish(Placed(order="o"), correlation_id="tx")
        await publisher.publish(Declined(order="o"), correlation_id="tx")
        await publisher.publish(TimedOut(correlation_id="tx", deadline="2026-01-01T00:00:00Z"), correlation_id="tx")
        await publisher.publish(Declined(order="o"), correlation_id="tx")
        await settled(bus)
    assert len(inventory.released) == 1
    assert len(bus.data_of(Released)) == 1


async def test_a_consumer_giving_up_on_the_step_triggers_failed_of_the_step(bus: SpyBus) -> None:
    inventory = Inventory()
    shipping = Service("shipping")

    @shipping.on(Reserved)
    async def ship(reserved: Reserved) -> None:
        raise Reject("no courier for this address")

    async with Worker([inventory, shipping], bus):
        [placed] = await Publisher(bus).publish(Placed(order="o", qty=4))
        await settled(bus)
    [(reserved, cause)] = inventory.released
    assert reserved == Reserved(order="o", qty=4)
    assert isinstance(cause, Failure)
    assert cause.event == reserved and cause.reason == "rejected" and cause.record["service"] == "shipping"
    assert decode(bus.published[-1].body).correlationid == placed.id


async def test_the_journal_s_timeout_of_a_transaction_past_its_deadline_triggers_timed_out(
    bus: SpyBus, clock: VirtualClock
) -> None:
    inventory = Inventory()
    app = App("shop", [inventory], ingress=[Placed], terminal={Released: "failed"})
    async with Journal.from_app(app, "memory://", transport=bus, scan_interval=3600) as journal:
        async with Worker(app.services, bus):
            [placed] = await Publisher(bus).publish(Placed(order="o"), deadline=timedelta(seconds=30))
            await settled(bus)
            assert await journal.check_deadlines() == []
            clock.advance(31)
            assert await journal.check_deadlines() == [placed.id]
            await settled(bus)
        tx = await journal.transaction(placed.id)
    [(reserved, cause)] = inventory.released
    assert isinstance(cause, TimedOut)
    assert cause.correlation_id == placed.id and cause.deadline == placed.deadline
    assert tx is not None and tx.status == "compensated"


async def test_a_failing_compensation_is_retried_until_it_succeeds(bus: SpyBus, clock: VirtualClock) -> None:
    inventory = Inventory(fail_release=2)
    async with Worker([inventory], bus) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Placed(order="o"), correlation_id="tx")
        await publisher.publish(Declined(order="o"), correlation_id="tx")
        await settled(bus)
    assert inventory.attempts == [1, 2, 3]
    assert len(inventory.released) == 1 and len(bus.data_of(Released)) == 1
    assert worker.stats("inventory").retried == 2
    assert await bus.dead_letters("inventory") == []


async def test_a_compensation_that_gives_up_is_dead_lettered_and_announced(bus: SpyBus) -> None:
    inventory = Inventory(fail_release=99)
    watcher = Service("watcher")
    seen: list[Failure] = []

    @watcher.on_failure(Declined)
    async def note(failure: Failure) -> None:
        seen.append(failure)

    async with Worker([inventory, watcher], bus):
        publisher = Publisher(bus)
        await publisher.publish(Placed(order="o"), correlation_id="tx")
        await settled(bus)
        [declined] = await publisher.publish(Declined(order="o"), correlation_id="tx")
        await settled(bus)
    assert inventory.attempts == [1, 2, 3, 4]
    [letter] = await bus.dead_letters("inventory")
    assert letter.message.id == declined.id and letter.record["reason"] == "max_attempts"
    [failure] = seen
    assert failure.envelope.id == declined.id and failure.record["handler"].endswith("release")
    handler = inventory.failure_handlers[Reserved.event_type()]
    assert is_compensation(handler) and is_compensation(inventory.handlers[Declined.event_type()])
    # what tells the journal a compensation gave up, though the failed type is a business event's
    assert letter.record["compensation"] is True and failure.record["compensation"] is True


def test_the_flow_s_compensations_are_rollbacks_and_nothing_else() -> None:
    """``compensate(...)``, ``on_failure`` and handlers of the timeout; not steps, not plain joins."""
    inventory, other = Inventory(), Service("other")

    @other.on_failure(Placed)
    async def undo(failure: Failure) -> None: ...

    @other.on(TimedOut)
    async def expire(timeout: TimedOut) -> None: ...

    @other.on_all(Reserved, failed(Declined))
    async def both(reserved: Reserved, failure: Failure) -> None: ...

    rollbacks = {(h.name.rpartition(".")[2], h.consumes.__name__)
                 for s in (inventory, other) for h in s.all_handlers() if is_rollback(h)}
    assert rollbacks == {("release", "Reserved"), ("release", "Declined"), ("release", "TimedOut"),
                         ("undo", "Placed"), ("expire", "TimedOut")}


async def test_a_deadline_set_at_ingress_travels_to_every_output(bus: SpyBus, clock: VirtualClock) -> None:
    seen: list[datetime | None] = []
    inventory = Inventory()
    sink = Service("sink")

    @sink.on(Reserved)
    async def look(reserved: Reserved, ctx: Context) -> None:
        seen.append(deadline_of(ctx.envelope))

    async with Worker([inventory, sink], bus):
        [placed] = await Publisher(bus).publish(Placed(order="o"), deadline=timedelta(minutes=2))
        await settled(bus)
    expected = datetime.fromtimestamp(clock.time() + 120, UTC)
    assert deadline_of(placed) == expected
    assert seen == [expected]


def test_deadlines_are_given_as_text_datetimes_timedeltas_or_seconds() -> None:
    assert deadline_text(90, now=0.0) == "1970-01-01T00:01:30.000000Z"
    assert deadline_text(timedelta(seconds=1.5), now=10.0) == "1970-01-01T00:00:11.500000Z"
    assert deadline_text(datetime(2030, 1, 1, tzinfo=UTC), now=0.0) == "2030-01-01T00:00:00.000000Z"
    assert deadline_text("2030-01-01T00:00:00Z", now=0.0) == "2030-01-01T00:00:00Z"
    for bad in ("next tuesday", datetime(2030, 1, 1), True):
        with pytest.raises(ConfigurationError):
            deadline_text(bad, now=0.0)  # type: ignore[arg-type]


def test_a_deadline_with_rfc3339s_lowercase_z_is_taken_and_read() -> None:
    """RFC 3339 allows ``z`` for ``Z``; Python 3.11's ``fromisoformat`` does not: a publisher
    refused such a deadline and a handler read another producer's as none."""
    assert deadline_text("2030-01-01T00:00:00z", now=0.0) == "2030-01-01T00:00:00z"
    envelope = decode(b'{"specversion":"1.0","id":"1","source":"/s","type":"t","deadline":"2030-01-01T00:00:00z"}')
    assert deadline_of(envelope) == datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("text", ["next tuesday", "", "2030-01-01", "2030-01-01T00:00:00", "2030-13-01T00:00:00Z"])
async def test_a_publisher_refuses_deadline_text_that_is_not_an_rfc3339_timestamp(text: str) -> None:
    """Text is checked as a datetime or a delay is converted: nothing is published with a deadline
    no journal can read, and the error names ``deadline``."""
    bus = MemoryTransport()
    observer = await bus.subscribe("observer", [Placed.event_type()])
    with pytest.raises(ConfigurationError, match=r"^deadline .*RFC 3339"):
        await Publisher(bus).publish(Placed(order="o"), deadline=text)
    assert await observer.fetch(10, timeout=0) == []


async def test_a_publisher_keeps_rfc3339_deadline_text_as_given() -> None:
    bus = MemoryTransport()
    [placed] = await Publisher(bus).publish(Placed(order="o"), deadline="2030-01-01T12:00:00+02:00")
    assert placed.deadline == "2030-01-01T12:00:00+02:00"


def test_timed_out_is_the_journal_s_event_and_tolerates_fields_it_adds() -> None:
    assert TIMEDOUT == JOURNAL_TIMEDOUT == TimedOut.event_type()
    event = TimedOut.model_validate({"correlation_id": "c", "deadline": "2030-01-01T00:00:00Z",
                                     "root_type": "x", "last_type": "y", "last_event_id": "z", "new": 1})
    assert event.correlation_id == "c"


def test_a_compensation_subscribes_to_its_step_and_every_trigger() -> None:
    inventory = Inventory()
    assert {Reserved.event_type(), Declined.event_type(), TIMEDOUT, FAILED} <= inventory.subscriptions
    assert Reserved.event_type() in inventory.failure_handlers


@pytest.mark.parametrize(
    ("step", "on", "message"),
    [
        pytest.param(Reserved, [Reserved], "its own trigger", id="step as trigger"),
        pytest.param(Reserved, [], "no trigger", id="no trigger"),
        pytest.param("Reserved", [Declined], "Event subclass", id="step not an event"),
        pytest.param(Reserved, [Placed], "already has", id="trigger already handled"),
    ],
)
def test_compensations_are_checked_when_declared(step: object, on: list[object], message: str) -> None:
    svc = Service("s")

    @svc.on(Placed)
    async def take(placed: Placed) -> Reserved:
        return Reserved(order=placed.order, qty=placed.qty)

    with pytest.raises(ConfigurationError, match=message):
        @svc.compensate(step, on=on)  # type: ignore[arg-type]
        async def undo(step: Event, cause: Event) -> None: ...
