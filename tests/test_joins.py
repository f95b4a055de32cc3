"""Joins (``@service.on_all``): once per transaction, when all have arrived, in virtual time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from choreograph import (
    FAILED,
    ConfigurationError,
    Context,
    Envelope,
    Event,
    Failure,
    Publisher,
    RetryPolicy,
    Service,
    Worker,
)
from choreograph._envelope import decode
from choreograph.joins import DEADLINE, joins_of
from choreograph.stores.joins_base import JoinKey, JoinState
from choreograph.stores.joins_memory import MemoryJoinStore
from choreograph.stores.joins_sqlite import SQLiteJoinStore
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports.base import DeadLetter, Message


class Paid(Event, type="test.joins.paid"):
    order: str
    amount: int = 10


class Reserved(Event, type="test.joins.reserved"):
    order: str
    sku: str = "sku-1"


class Packed(Event, type="test.joins.packed"):
    order: str


class Shipped(Event, type="test.joins.shipped"):
    order: str
    amount: int
    sku: str


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


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def bus(clock: VirtualClock) -> SpyBus:
    return SpyBus(clock)


def shipping(calls: list[tuple[Paid, Reserved]], *, within: float | None = None, fail_until: int = 0,
             retry: RetryPolicy | None = None) -> Service:
    svc = Service("shipping", retry=retry or RetryPolicy(max_attempts=5, base=1.0, jitter=False))

    @svc.on_all(Paid, Reserved, within=within)
    async def ship(paid: Paid, reserved: Reserved, ctx: Context) -> Shipped:
        calls.append((paid, reserved))
        if ctx.attempt <= fail_until:
            raise RuntimeError(f"courier down (attempt {ctx.attempt})")
        return Shipped(order=paid.order, amount=paid.amount, sku=reserved.sku)

    return svc


class Watcher(Service):
    """Records the failure events announced for Paid and Reserved."""

    def __init__(self) -> None:
        super().__init__("watcher")
        self.failures: list[tuple[str, Failure, float]] = []

    def watch(self, clock: VirtualClock) -> Watcher:
        for cls in (Paid, Reserved):
            async def seen(failure: Failure, ctx: Context) -> None:
                self.failures.append((failure.envelope.type, failure, clock.monotonic()))
            self.on_failure(cls)(seen)
        return self


def shipped(bus: SpyBus) -> list[dict[str, object]]:
    return [decode(m.body).data for m in bus.of_type(Shipped.event_type())]


async def test_a_join_runs_once_with_every_event_in_declared_order_whatever_the_arrival_order(bus: SpyBus) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    async with Worker([shipping(calls)], bus):
        publisher = Publisher(bus)
        await publisher.publish(Reserved(order="o-1", sku="blue"), correlation_id="tx-1")
        await settled(bus)
        assert calls == []  # half a join does nothing
        await publisher.publish(Paid(order="o-1", amount=30), correlation_id="tx-1")
        await settled(bus)
    assert calls == [(Paid(order="o-1", amount=30), Reserved(order="o-1", sku="blue"))]
    [out] = bus.of_type(Shipped.event_type())
    envelope = decode(out.body)
    assert envelope.data == {"order": "o-1", "amount": 30, "sku": "blue"}
    assert envelope.correlationid == "tx-1"


async def test_each_correlation_id_is_its_own_join(bus: SpyBus) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    async with Worker([shipping(calls)], bus):
        publisher = Publisher(bus)
        await publisher.publish(Paid(order="a"), correlation_id="tx-a")
        await publisher.publish(Reserved(order="b"), correlation_id="tx-b")
        await publisher.publish(Reserved(order="a"), correlation_id="tx-a")
        await settled(bus)
    assert [(p.order, r.order) for p, r in calls] == [("a", "a")]


async def test_duplicates_never_fire_a_join_twice(bus: SpyBus) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    async with Worker([shipping(calls)], bus):
        publisher = Publisher(bus)
        await publisher.publish(Paid(order="o", amount=1), correlation_id="tx", ids=["paid-1"])
        await publisher.publish(Paid(order="o", amount=1), correlation_id="tx", ids=["paid-1"])  # same id
        await publisher.publish(Paid(order="o", amount=2), correlation_id="tx", ids=["paid-2"])  # same type
        await publisher.publish(Reserved(order="o"), correlation_id="tx", ids=["res-1"])
        await settled(bus)
        await publisher.publish(Reserved(order="o"), correlation_id="tx", ids=["res-2"])  # after firing
        await publisher.publish(Paid(order="o", amount=3), correlation_id="tx", ids=["paid-3"])
        await settled(bus)
    assert len(calls) == 1
    assert calls[0][0].amount == 1  # a slot keeps its first arrival
    assert len(bus.of_type(Shipped.event_type())) == 1


async def test_arrivals_handled_concurrently_fire_the_join_once(bus: SpyBus) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    async with Worker([shipping(calls)], bus, concurrency=64):
        publisher = Publisher(bus)
        for n in range(20):
            await publisher.publish(Paid(order=f"o-{n}"), Reserved(order=f"o-{n}"), correlation_id=f"tx-{n}")
        await settled(bus)
    assert sorted(p.order for p, _ in calls) == sorted(f"o-{n}" for n in range(20))
    assert len(bus.of_type(Shipped.event_type())) == 20


async def test_a_failing_join_handler_is_retried_and_its_outputs_keep_their_ids(
    bus: SpyBus, clock: VirtualClock
) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    async with Worker([shipping(calls, fail_until=2)], bus) as worker:
        await Publisher(bus).publish(Paid(order="o"), Reserved(order="o"), correlation_id="tx")
        await settled(bus)
    assert len(calls) == 3  # attempts 1 and 2 failed, 3 succeeded
    assert worker.stats("shipping").retried == 2
    assert len(bus.of_type(Shipped.event_type())) == 1


async def test_a_join_that_is_not_complete_by_its_deadline_announces_each_arrival_as_failed(
    bus: SpyBus, clock: VirtualClock
) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    watcher = Watcher().watch(clock)
    async with Worker([shipping(calls, within=30), watcher], bus):
        start = clock.monotonic()
        [paid] = await Publisher(bus).publish(Paid(order="o"), correlation_id="tx")
        await settled(bus)
        [(failed_type, failure, at)] = watcher.failures
        assert failed_type == Paid.event_type() and at - start == pytest.approx(30.0)
        assert failure.envelope.id == paid.id and failure.event == Paid(order="o")
        assert failure.reason == "join_timeout"
        assert failure.record["service"] == "shipping" and failure.record["handler"].endswith("ship")
        assert failure.record["missing"] == ["Reserved"] and failure.record["arrived"] == [Paid.event_type()]
        [reserved] = await Publisher(bus).publish(Reserved(order="o"), correlation_id="tx")  # too late
        await settled(bus)
    assert calls == []
    assert shipped(bus) == []
    # The late arrival is announced as failed too, so the step that produced it can be undone.
    first, late = bus.of_type(FAILED)
    assert {decode(first.body).correlationid, decode(late.body).correlationid} == {"tx"}
    (_, late_failure, _) = watcher.failures[1]
    assert late_failure.envelope.id == reserved.id and late_failure.reason == "join_timeout"
    assert late_failure.record["late"] is True


async def test_a_join_complete_before_its_deadline_announces_nothing(bus: SpyBus, clock: VirtualClock) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    watcher = Watcher().watch(clock)
    async with Worker([shipping(calls, within=30), watcher], bus):
        publisher = Publisher(bus)
        await publisher.publish(Paid(order="o"), correlation_id="tx")
        clock.advance(29)
        await publisher.publish(Reserved(order="o"), correlation_id="tx")
        await settled(bus)  # runs past the deadline: the timer finds the join fired
    assert len(calls) == 1
    assert watcher.failures == []
    assert len(bus.of_type(DEADLINE)) == 1


async def test_a_join_handler_that_gives_up_announces_the_failure_of_every_arrival(
    bus: SpyBus, clock: VirtualClock
) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    watcher = Watcher().watch(clock)
    svc = shipping(calls, fail_until=99, retry=RetryPolicy(max_attempts=2, base=1.0, jitter=False))
    async with Worker([svc, watcher], bus):
        [paid, reserved] = await Publisher(bus).publish(Paid(order="o"), Reserved(order="o"), correlation_id="tx")
        await settled(bus)
    [letter] = await bus.dead_letters("shipping")
    assert letter.message.id == reserved.id  # the arrival that completed the join
    by_type = {t: f for t, f, _ in watcher.failures}
    assert sorted(by_type) == sorted([Paid.event_type(), Reserved.event_type()])
    assert by_type[Paid.event_type()].envelope.id == paid.id
    assert by_type[Reserved.event_type()].envelope.id == reserved.id
    assert {f.reason for f in by_type.values()} == {"max_attempts"}
    assert len(calls) == 2


async def test_join_arrivals_survive_a_restart_on_a_sqlite_join_store(clock: VirtualClock, tmp_path: Path) -> None:
    bus = SpyBus(clock)
    url = f"sqlite:///{tmp_path / 'shipping.db'}"
    calls: list[tuple[Paid, Reserved]] = []
    first = SQLiteJoinStore(url)
    async with Worker([shipping(calls)], bus, joins=first):
        await Publisher(bus).publish(Paid(order="o", amount=7), correlation_id="tx")
        await settled(bus)
    await first.close()
    second = SQLiteJoinStore(url)
    async with Worker([shipping(calls)], bus, joins=second):
        await Publisher(bus).publish(Reserved(order="o"), correlation_id="tx")
        await settled(bus)
    await second.close()
    assert calls == [(Paid(order="o", amount=7), Reserved(order="o"))]


async def test_a_join_deadline_survives_a_restart(clock: VirtualClock, tmp_path: Path) -> None:
    bus = SpyBus(clock)
    url = f"sqlite:///{tmp_path / 'shipping.db'}"
    calls: list[tuple[Paid, Reserved]] = []
    first = SQLiteJoinStore(url)
    worker = Worker([shipping(calls, within=60)], bus, joins=first)
    await worker.start()
    await Publisher(bus).publish(Paid(order="o"), correlation_id="tx")
    for _ in range(50):  # let the first arrival be handled, not the timer
        if bus.of_type(DEADLINE):
            break
        await clock.sleep(0)
    await worker.stop()
    await first.close()
    watcher = Watcher().watch(clock)
    second = SQLiteJoinStore(url)
    async with Worker([shipping(calls, within=60), watcher], bus, joins=second):
        await settled(bus)
    await second.close()
    assert [(t, f.reason) for t, f, _ in watcher.failures] == [(Paid.event_type(), "join_timeout")]


async def test_a_join_may_leave_out_the_context() -> None:
    svc = Service("s")

    @svc.on_all(Paid, Reserved)
    async def both(paid: Paid, reserved: Reserved) -> None: ...

    [spec] = joins_of(svc)
    assert not spec.takes_context and spec.kind == "join"
    assert {Paid.event_type(), Reserved.event_type(), FAILED} <= svc.subscriptions


@pytest.mark.parametrize(
    "declare",
    [
        pytest.param(lambda svc: svc.on_all(Paid), id="one event"),
        pytest.param(lambda svc: svc.on_all(Paid, Paid), id="same type twice"),
        pytest.param(lambda svc: svc.on_all(Paid, Reserved, within=0), id="within not positive"),
        pytest.param(lambda svc: svc.on_all(Paid, Packed), id="type already handled by on()"),
        pytest.param(lambda svc: svc.on_all(Paid, "x"), id="not an event"),
    ],
)
def test_joins_are_checked_when_declared(declare) -> None:  # type: ignore[no-untyped-def]
    svc = Service("s")

    @svc.on(Packed)
    async def pack(packed: Packed) -> None: ...

    with pytest.raises(ConfigurationError):
        @declare(svc)
        async def join(a: Event, b: Event) -> None: ...


def test_a_join_function_takes_one_parameter_per_event_and_maybe_the_context() -> None:
    svc = Service("s")
    with pytest.raises(ConfigurationError, match="positional parameters"):
        @svc.on_all(Paid, Reserved)
        async def short(paid: Paid) -> None: ...
    assert svc.handlers == {}  # nothing half-registered


async def test_a_worker_keeps_its_joins_in_its_sqlite_inbox_file_by_default(
    clock: VirtualClock, tmp_path: Path
) -> None:
    from choreograph.stores.sqlite import SQLiteStore

    bus = SpyBus(clock)
    url = f"sqlite:///{tmp_path / 'shipping.db'}"
    calls: list[tuple[Paid, Reserved]] = []
    for event in (Paid(order="o"), Reserved(order="o")):  # one arrival per worker lifetime
        inbox = SQLiteStore(url)
        async with Worker([shipping(calls)], bus, store=inbox) as worker:
            assert isinstance(worker.joins, SQLiteJoinStore) and worker.joins.path == inbox.path
            await Publisher(bus).publish(event, correlation_id="tx")
            await settled(bus)
        await inbox.close()
    assert len(calls) == 1


async def test_a_deadline_hours_away_is_re_deferred_and_fires_exactly_on_time(
    bus: SpyBus, clock: VirtualClock
) -> None:
    calls: list[tuple[Paid, Reserved]] = []
    watcher = Watcher().watch(clock)
    # (a long poll interval only keeps settled() from stepping through hours in 0.25 s hops)
    async with Worker([shipping(calls, within=2 * 3600 + 5), watcher], bus, poll_interval=900):
        start = clock.monotonic()
        await Publisher(bus).publish(Paid(order="o"), correlation_id="tx")
        await settled(bus)
    [(_, failure, at)] = watcher.failures
    assert failure.reason == "join_timeout" and at - start == pytest.approx(2 * 3600 + 5)
    assert len(bus.of_type(DEADLINE)) == 1  # one timer, re-deferred in hops of at most MAX_DEFER


class TimesOutOnTheSecondTry(MemoryJoinStore):
    """A join store whose first time-out fails (a store briefly out of reach)."""

    failed = 0

    async def time_out(self, key: JoinKey) -> JoinState | None:
        if not self.failed:
            self.failed += 1
            raise RuntimeError("join store unreachable")
        return await super().time_out(key)


async def test_a_timer_re_deferred_for_hours_keeps_its_retries_for_a_real_failure(
    bus: SpyBus, clock: VirtualClock
) -> None:
    """Waiting is not failing: a timer re-deferred six times (hops of at most MAX_DEFER) whose
    time-out then fails once is retried by the policy, not dead-lettered ``max_attempts`` on its
    first failure (each deferral counted an attempt: the join never timed out, nothing was undone)."""
    calls: list[tuple[Paid, Reserved]] = []
    watcher = Watcher().watch(clock)
    joins = TimesOutOnTheSecondTry()
    svc = shipping(calls, within=6 * 3600 + 5, retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False))
    async with Worker([svc, watcher], bus, joins=joins, poll_interval=900):
        start = clock.monotonic()
        await Publisher(bus).publish(Paid(order="o"), correlation_id="tx")
        await settled(bus)
    assert joins.failed == 1
    assert await bus.dead_letters("shipping") == []
    [(_, failure, at)] = watcher.failures
    assert failure.reason == "join_timeout" and at - start == pytest.approx(6 * 3600 + 5 + 1.0)  # + the backoff


_ONCE = RetryPolicy(max_attempts=1, base=1.0, jitter=False)


def _stock_check_down() -> Service:
    """A stock service whose check of every Reserved fails, given up at once: a failed(Reserved)."""
    stock = Service("stock", retry=_ONCE)

    @stock.on(Reserved)
    async def check(reserved: Reserved) -> None:
        raise RuntimeError("stock check down")

    return stock


async def _paid_then_reserved_fails(
    services: list[Service], bus: SpyBus, clock: VirtualClock
) -> tuple[Envelope, DeadLetter, list[Failure]]:
    """Paid, then a Reserved whose check fails, in one transaction through ``services``: the Paid
    published, shipping's one dead letter, and the failures of Paid a watcher saw."""
    watcher = Watcher().watch(clock)
    async with Worker([*services, watcher], bus):
        [paid] = await Publisher(bus).publish(Paid(order="o"), correlation_id="tx")
        await settled(bus)
        await Publisher(bus).publish(Reserved(order="o"), correlation_id="tx")
        await settled(bus)
    [letter] = await bus.dead_letters("shipping")
    return paid, letter, [f for t, f, _ in watcher.failures if t == Paid.event_type()]


async def test_services_sharing_the_timer_type_only_time_out_their_own_joins(
    bus: SpyBus, clock: VirtualClock
) -> None:
    other = Service("packing")

    @other.on_all(Reserved, Packed, within=10)
    async def pack(reserved: Reserved, packed: Packed) -> None: ...

    calls: list[tuple[Paid, Reserved]] = []
    watcher = Watcher().watch(clock)
    async with Worker([shipping(calls, within=30), other, watcher], bus):
        await Publisher(bus).publish(Reserved(order="o"), correlation_id="tx")
        await settled(bus)
    failures = sorted((f.record["service"], at - 1_000_000.0) for _, f, at in watcher.failures)
    assert failures == [("packing", pytest.approx(10.0)), ("shipping", pytest.approx(30.0))]


async def test_a_join_completed_by_its_failure_slot_announces_the_other_arrivals_when_it_gives_up(
    bus: SpyBus, clock: VirtualClock
) -> None:
    # The completing arrival is itself a choreograph.failed event: the runtime's announcement
    # that the join gave up is a failure *of a failure*; the join must still fan it out to the
    # other arrivals, so the upstream step of Paid can compensate.
    from choreograph import failed

    stock = _stock_check_down()

    svc = Service("shipping", retry=_ONCE)

    @svc.on_all(Paid, failed(Reserved))
    async def refund_later(paid: Paid, failure: Failure) -> None:
        raise RuntimeError("refund desk down")

    paid, letter, paid_failures = await _paid_then_reserved_fails([stock, svc], bus, clock)
    assert letter.message.type == FAILED  # the failure arrival completed the join and gave up
    assert [f.envelope.id for f in paid_failures] == [paid.id]
    assert paid_failures[0].record["handler"] == "test_a_join_completed_by_its_failure_slot_announces_the_other_arrivals_when_it_gives_up.<locals>.refund_later"


@pytest.mark.parametrize("own_handler_first", [True, False])
async def test_a_failure_slot_join_and_the_services_own_handler_of_failed_failures_both_run(
    bus: SpyBus, clock: VirtualClock, own_handler_first: bool
) -> None:
    # A service with its own on_failure handler of choreograph.failed events (a compensation
    # that gave up somewhere) may also have a join with a failed(X) slot, whose give-up is
    # announced as such a failure: the fan-out to the other arrivals and the service's own
    # handler both see it (it was a ConfigurationError, in either order).
    from choreograph import failed
    from choreograph.joins import Failed

    stock = _stock_check_down()

    svc = Service("shipping", retry=_ONCE)
    seen: list[tuple[str | None, str]] = []

    def own() -> None:
        @svc.on_failure(Failed)
        async def alert(failure: Failure) -> None:
            seen.append((failure.record.get("handler"), failure.envelope.id))

    def join() -> None:
        @svc.on_all(Paid, failed(Reserved))
        async def refund_later(paid: Paid, failure: Failure) -> None:
            raise RuntimeError("refund desk down")

    for register in (own, join) if own_handler_first else (join, own):
        register()
    from choreograph.flow import build
    from choreograph.sagas import is_rollback

    assert is_rollback(svc.failure_handlers[FAILED])  # alert is a compensation: its give-up is marked
    assert [s.handler.rsplit(".", 1)[-1] for s in build(svc).steps if s.trigger == FAILED] == ["alert"]
    paid, letter, paid_failures = await _paid_then_reserved_fails([stock, svc], bus, clock)
    assert [f.envelope.id for f in paid_failures] == [paid.id]  # the fan-out ran
    assert seen == [(paid_failures[0].record["handler"], decode(letter.message.body).id)]  # and so did alert


@pytest.mark.parametrize("case", ["gives up", "arrives late"])
async def test_the_arrival_of_a_failure_slot_is_not_announced_as_failed_again(
    bus: SpyBus, clock: VirtualClock, case: str
) -> None:
    # The arrival of failed(Reserved) is the runtime's failure of Reserved, announced already. When
    # the join gives up after a plain arrival completed it, or the failure arrives after the deadline,
    # it was announced again: a failure of a choreograph.failed event, which says a compensation gave
    # up (the journal's compensation_failed; on_failure handlers of that type) where none did.
    from choreograph import failed

    stock = _stock_check_down()

    svc = Service("shipping", retry=_ONCE)

    @svc.on_all(Paid, failed(Reserved), within=30 if case == "arrives late" else None)
    async def refund_later(paid: Paid, failure: Failure) -> None:
        raise RuntimeError("refund desk down")

    async with Worker([stock, svc], bus):
        if case == "gives up":
            await Publisher(bus).publish(Reserved(order="o"), correlation_id="tx")
            await settled(bus)
            await Publisher(bus).publish(Paid(order="o"), correlation_id="tx")
        else:
            await Publisher(bus).publish(Paid(order="o"), correlation_id="tx")
            await settled(bus)
            clock.advance(60)
            await Publisher(bus).publish(Reserved(order="o"), correlation_id="tx")
        await settled(bus)
    announced = [decode(m.body) for m in bus.of_type(FAILED) if decode(m.body).source == svc.source]
    assert sorted(e.data["type"] for e in announced) == [Paid.event_type()]
