"""The worker's own backoffs (its store or broker failed: try again later) run on its clock.

Under a VirtualClock, ``settled()`` sees such a backoff as pending work and jumps the clock
to its end: an outage that would take tens of real seconds passes in virtual time. Each
outage below backs off longer, in total, than ``settled()``'s timeout (10 real seconds),
so waiting it out for real fails the test rather than slowing it down.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import pytest

from choreograph import Context, Publisher, RetryPolicy, Service, Worker
from choreograph.errors import StoreError, TransportError
from choreograph.events import Event
from choreograph.stores.memory import MemoryStore
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports.base import Message
from choreograph.transports.memory import MemorySubscription

pytestmark = pytest.mark.timeout(60)  # a ceiling for a stuck test, not a speed assertion


class Placed(Event, type="test.backoff.placed"):
    order_id: str


class Charged(Event, type="test.backoff.charged"):
    order_id: str


def _charging(runs: list[str]) -> Service:
    payment = Service("payment")

    @payment.on(Placed)
    async def charge(order: Placed) -> Charged:
        runs.append(order.order_id)
        return Charged(order_id=order.order_id)

    return payment


class _Outputs(Service):
    def __init__(self) -> None:
        super().__init__("sink")
        self.received: list[str] = []

        @self.on(Charged)
        async def record(charged: Charged) -> None:
            self.received.append(charged.order_id)


class FailingStore(MemoryStore):
    """A MemoryStore whose ``seen`` or ``mark`` raises StoreError the first ``times`` calls
    for the group ``payment`` (its other groups share it, and it never fails them)."""

    def __init__(self, method: str, times: int) -> None:
        super().__init__()
        self.method = method
        self.left = times

    def _fail(self, method: str, group: str) -> None:
        if method == self.method and group == "payment" and self.left:
            self.left -= 1
            raise StoreError("inbox unavailable")

    async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
        self._fail("seen", group)
        return await super().seen(group, event_ids)

    async def mark(self, group: str, event_ids: Collection[str]) -> None:
        self._fail("mark", group)
        await super().mark(group, event_ids)


async def test_an_inbox_that_cannot_look_ids_up_is_waited_for_in_virtual_time() -> None:
    """The fetch loop holds the batch and backs off a second per failure; settled() jumps
    over each backoff, and the event is handled once when the inbox answers."""
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    runs: list[str] = []
    sink = _Outputs()
    store = FailingStore("seen", times=20)
    async with Worker([_charging(runs), sink], bus, store=store) as worker:
        start = clock.monotonic()
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
        elapsed = clock.monotonic() - start
    assert store.left == 0
    assert runs == ["a"] and sink.received == ["a"]
    assert worker.stats("payment").handled == 1
    assert elapsed == pytest.approx(20.0)  # 20 backoffs of 1 s


async def test_an_inbox_outage_before_the_handler_runs_spends_no_attempt() -> None:
    """The fetch loop holds the batch while the inbox cannot look ids up: releasing it counted
    an attempt on the broker per failed lookup, so six seconds of outage spent a five-attempt
    budget and the handler's first transient failure was dead-lettered ``max_attempts``."""
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    attempts: list[int] = []
    payment = Service("payment", retry=RetryPolicy(max_attempts=5, base=1.0, jitter=False))

    @payment.on(Placed)
    async def charge(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("flaky")

    store = FailingStore("seen", times=6)
    async with Worker([payment], bus, store=store) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert store.left == 0
    assert attempts == [1, 2]
    assert worker.stats("payment").handled == 1 and await bus.dead_letters("payment") == []


async def test_a_batch_held_through_an_inbox_outage_longer_than_its_lease_keeps_its_lease() -> None:
    """Held, not released: its leases are touched between lookups, so the broker does not hand
    it to another consumer (a second run) while the inbox is down."""
    clock = VirtualClock()
    bus = MemoryTransport("memory://?lease=1", clock=clock)
    attempts: list[int] = []
    payment = Service("payment")

    @payment.on(Placed)
    async def charge(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)

    store = FailingStore("seen", times=10)
    async with Worker([payment], bus, store=store) as worker:
        start = clock.monotonic()
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
        elapsed = clock.monotonic() - start
    assert store.left == 0 and attempts == [1]
    stats = worker.stats("payment")
    assert (stats.handled, stats.duplicates, stats.deferred) == (1, 0, 0)  # no copy came back
    assert elapsed == pytest.approx(10 / 3)  # ten lookups a third of the lease apart


async def test_an_inbox_that_cannot_record_a_handled_event_is_retried_in_virtual_time() -> None:
    """The outputs are out; marking the input fails, so the worker holds it in flight and
    backs off 0.05 s, 0.1 s, ... up to 5 s (11.35 s over 8 failures): settled() advances the clock
    over those backoffs although an event is in flight, and the input is acked once."""
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    runs: list[str] = []
    sink = _Outputs()
    store = FailingStore("mark", times=8)
    async with Worker([_charging(runs), sink], bus, store=store) as worker:
        start = clock.monotonic()
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
        elapsed = clock.monotonic() - start
    assert store.left == 0
    assert runs == ["a"] and sink.received == ["a"]
    assert worker.stats("payment").handled == 1 and worker.stats().duplicates == 0
    assert elapsed == pytest.approx(sum(min(0.05 * 2**n, 5.0) for n in range(8)))  # 11.35 s


async def test_outputs_the_broker_refuses_are_published_again_after_a_backoff_in_virtual_time() -> None:
    """Publishing the handler's outputs fails 8 times: the same backoffs, on the clock."""
    refusals = 8

    class Refusing(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            nonlocal refusals
            if refusals and any(m.type == Charged.event_type() for m in messages):
                refusals -= 1
                raise TransportError("broker unavailable")
            await super().publish(messages)

    clock = VirtualClock()
    bus = Refusing(clock=clock)
    runs: list[str] = []
    sink = _Outputs()
    async with Worker([_charging(runs), sink], bus) as worker:
        start = clock.monotonic()
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
        elapsed = clock.monotonic() - start
    assert refusals == 0
    assert runs == ["a"] and sink.received == ["a"]
    assert worker.stats("payment").handled == 1
    assert elapsed == pytest.approx(sum(min(0.05 * 2**n, 5.0) for n in range(8)))  # 11.35 s


async def test_a_fetch_that_fails_is_tried_again_after_a_backoff_in_virtual_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker refuses 30 fetches: the fetch loop backs off 0.5 s after each (15 s)."""
    failures = 30
    fetch = MemorySubscription.fetch

    async def flaky(self: MemorySubscription, max_messages: int, timeout: float | None = None) -> list:  # type: ignore[type-arg]
        nonlocal failures
        if failures and self.group == "payment":
            failures -= 1
            raise TransportError("broker unavailable")
        return await fetch(self, max_messages, timeout)

    monkeypatch.setattr(MemorySubscription, "fetch", flaky)
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    runs: list[str] = []
    async with Worker([_charging(runs)], bus) as worker:
        start = clock.monotonic()
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
        elapsed = clock.monotonic() - start
    assert failures == 0
    assert runs == ["a"] and worker.stats("payment").handled == 1
    assert elapsed >= 30 * 0.5


async def test_settled_does_not_return_while_the_worker_backs_off_with_nothing_on_the_bus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backoff is pending work even when the bus holds nothing: settled() waits for the
    failing fetch to be tried again (it returned at once, with the fetch loop asleep)."""
    failures = 1
    fetch = MemorySubscription.fetch

    async def flaky(self: MemorySubscription, max_messages: int, timeout: float | None = None) -> list:  # type: ignore[type-arg]
        nonlocal failures
        if failures:
            failures -= 1
            raise TransportError("broker unavailable")
        return await fetch(self, max_messages, timeout)

    monkeypatch.setattr(MemorySubscription, "fetch", flaky)
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    async with Worker([_charging([])], bus):
        start = clock.monotonic()
        await settled(bus)
        assert failures == 0
        assert clock.monotonic() - start >= 0.5

