"""Join deadline timers on real transports: re-deferring a timer is not a failed attempt.

The timer of a join (``within=``) is redelivered until due, in hops of at most
``MAX_DEFER``; each hop settles it with ``Delivery.defer``, which keeps its attempt (on
NATS, whose attempt is JetStream's delivery count, by counting the deferrals beside it:
``_nats_deferrals``). Shrunk here to hops of 0.1 s, a deadline of a second is eight
deferrals: under a policy of three attempts, a timer that counted one per deferral was
dead-lettered on the first failure of its time-out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from types import ModuleType

import pytest

from choreograph import Context, Event, Failure, Publisher, RetryPolicy, Service, Worker, joins
from choreograph.stores.memory import MemoryStore
from choreograph.transports import Transport, open_transport
from tests.conformance.brokers import amqp, nats, redis, sqlite
from tests.test_joins import TimesOutOnTheSecondTry


class Paid(Event, type="test.joins.transports.paid"):
    order: str


class Reserved(Event, type="test.joins.transports.reserved"):
    order: str


@pytest.fixture(params=[sqlite, redis, amqp, nats], ids=lambda module: module.NAME)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    broker: ModuleType = request.param
    broker.require()
    url = broker.url(f"joins-{uuid.uuid4().hex[:12]}", lease=30.0)
    transport = open_transport(url)
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()
        await broker.cleanup(url)


async def test_a_timer_deferred_many_times_keeps_its_retries_for_a_real_failure(
    bus: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(joins, "MAX_DEFER", 0.1)
    shipping = Service("shipping", retry=RetryPolicy(max_attempts=3, base=0.1, jitter=False))

    @shipping.on_all(Paid, Reserved, within=1.0)
    async def ship(paid: Paid, reserved: Reserved) -> None: ...

    watcher = Service("watcher")
    announced = asyncio.Event()

    @watcher.on_failure(Paid)
    async def undo(failure: Failure, ctx: Context) -> None:
        if failure.reason == "join_timeout":
            announced.set()

    store = TimesOutOnTheSecondTry()
    async with Worker([shipping, watcher], bus, store=MemoryStore(), joins=store):
        await Publisher(bus).publish(Paid(order="o"), correlation_id="tx")
        await asyncio.wait_for(announced.wait(), 10)
    assert store.failed == 1
    assert await bus.dead_letters("shipping") == []
