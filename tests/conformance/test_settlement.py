"""Settling deliveries: ack, retry(after), leases, touch, and the attempt counter."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from choreograph.errors import TransportClosed
from choreograph.transports import Transport
from tests.conformance._support import TYPE_A, WAIT, collect, ids, message, quiet
from tests.conformance.conftest import Buses

#: A short lease for the tests that wait for one to expire.
LEASE = 1.0


async def test_an_acked_message_is_never_delivered_again(buses: Buses) -> None:
    bus = await buses.open(buses.url(lease=LEASE))
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    (delivery,) = await collect(subscription, 1)
    await delivery.ack()
    assert await quiet(subscription, 2.5 * LEASE) == []


async def test_ack_many_acks_every_delivery(buses: Buses) -> None:
    bus = await buses.open(buses.url(lease=LEASE))
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(10)])
    got = await collect(subscription, 10)
    await subscription.ack_many(got)
    assert all(d.settled for d in got)
    assert await quiet(subscription, 2.5 * LEASE) == []


async def test_settling_twice_is_a_no_op(buses: Buses) -> None:
    """The first verb settles the delivery; a second ack, a retry or a dead letter change nothing."""
    bus = await buses.open(buses.url(lease=LEASE))
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    (delivery,) = await collect(subscription, 1)
    await delivery.ack()
    await delivery.ack()
    await delivery.retry(0)
    await delivery.dead_letter({"reason": "too late"})
    await subscription.ack_many([delivery])
    assert await quiet(subscription, 2.5 * LEASE) == []
    assert await bus.dead_letters("g") == []


async def test_retry_redelivers_with_the_next_attempt(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    (first,) = await collect(subscription, 1)
    await first.retry(0)
    (second,) = await collect(subscription, 1)
    await second.retry()
    (third,) = await collect(subscription, 1)
    assert (first.attempt, second.attempt, third.attempt) == (1, 2, 3)
    assert third.message == first.message


async def test_retry_after_is_not_delivered_before_its_delay(bus: Transport) -> None:
    """retry(after) redelivers no sooner than ``after`` seconds, and then does redeliver."""
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    (first,) = await collect(subscription, 1)
    after = 1.5
    retried_at = time.monotonic()
    await first.retry(after)
    (again,) = await collect(subscription, 1, within=after + WAIT)
    waited = time.monotonic() - retried_at
    assert waited >= after - 0.05  # small allowance for clock granularity, never for early delivery
    assert again.attempt == 2
    assert again.message.id == "m1"


@pytest.mark.parametrize("after", [1e12, math.inf], ids=["1e12-seconds", "inf"])
async def test_a_retry_or_defer_after_an_endless_delay_is_not_delivered_now(bus: Transport, after: float) -> None:
    """NATS sent a NAK delay past 2^63 ns for ``retry(1e12)``, which the server read as none:
    redelivered at once; ``inf`` was an OverflowError on Redis, NATS and RabbitMQ."""
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(2)])
    retried, deferred = sorted(await collect(subscription, 2), key=lambda d: d.message.id)
    await retried.retry(after)
    await deferred.defer(after)
    assert retried.settled and deferred.settled
    assert await subscription.fetch(10, timeout=0.5) == []


async def test_defer_redelivers_after_its_delay_with_the_attempt_unchanged(bus: Transport) -> None:
    """defer(after) is a retry that is not a failed attempt: delivered again no sooner than
    ``after`` seconds with the attempt it had; a retry after it counts from there."""
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    (first,) = await collect(subscription, 1)
    after = 1.5
    deferred_at = time.monotonic()
    await first.defer(after)
    assert first.settled
    (again,) = await collect(subscription, 1, within=after + WAIT)
    assert time.monotonic() - deferred_at >= after - 0.05  # never early
    await again.defer(0)
    (third,) = await collect(subscription, 1)
    await third.retry(0)
    (fourth,) = await collect(subscription, 1)
    assert fourth.message == first.message
    attempts = (first.attempt, again.attempt, third.attempt, fourth.attempt)
    assert attempts == (1, 1, 1, 2)


async def test_a_delayed_retry_does_not_hold_back_other_messages(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    (first,) = await collect(subscription, 1)
    await first.retry(60)
    await bus.publish([message(2)])
    assert ids(await collect(subscription, 1)) == ["m2"]


async def test_an_unsettled_delivery_is_redelivered_to_the_group_after_its_lease(buses: Buses) -> None:
    """A consumer that hangs (fetches, never settles) loses nothing: another gets it, attempt + 1."""
    url = buses.url(lease=LEASE)
    hung = await (await buses.open(url)).subscribe("g", [TYPE_A])
    healthy = await (await buses.open(url)).subscribe("g", [TYPE_A])
    publisher = await buses.open(url)
    await publisher.publish([message(1)])
    (held,) = await collect(hung, 1)
    (redelivered,) = await collect(healthy, 1, within=LEASE + WAIT)
    assert redelivered.message == held.message
    assert (held.attempt, redelivered.attempt) == (1, 2)


async def test_the_deliveries_of_a_consumer_that_went_away_are_redelivered(buses: Buses) -> None:
    """A consumer whose transport closes while holding deliveries: another consumer gets them."""
    url = buses.url(lease=LEASE)
    dying_bus = await buses.open(url)
    dying = await dying_bus.subscribe("g", [TYPE_A])
    survivor = await (await buses.open(url)).subscribe("g", [TYPE_A])
    await dying_bus.publish([message(1), message(2)])
    held = await collect(dying, 2)
    await dying_bus.close()
    got = await collect(survivor, 2, within=LEASE + WAIT)
    assert sorted(ids(got)) == sorted(ids(held))
    assert [d.attempt for d in got] == [2, 2]


async def test_closing_a_subscription_returns_its_unsettled_deliveries(buses: Buses) -> None:
    bus = await buses.open(buses.url(lease=LEASE))
    closing = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    await collect(closing, 1)
    await closing.close()
    (again,) = await collect(await bus.subscribe("g", [TYPE_A]), 1, within=LEASE + WAIT)
    assert (again.message.id, again.attempt) == ("m1", 2)


@pytest.mark.parametrize("closing", ["subscription", "transport"])
async def test_a_verb_after_close_raises_transport_closed_and_the_message_comes_back(
    buses: Buses, closing: str
) -> None:
    """Once its subscription (or transport) is closed, a delivery's ack, retry, defer, dead
    letter, ``ack_many`` and touch raise TransportClosed and leave it unsettled; the message
    comes back to the group (at once or after the lease), and no dead letter is stored.
    Redis and RabbitMQ returned as if done (``close()`` had handed the delivery on: a dead
    letter's record was dropped, a retry's delay ignored); the others settled it."""
    url = buses.url(lease=LEASE)
    bus = await buses.open(url)
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(6)])
    held = sorted(await collect(subscription, 6), key=lambda d: d.message.id)
    assert len(held) == 6
    await (subscription.close() if closing == "subscription" else bus.close())
    acked, retried, deferred, dead, batched, touched = held
    calls = [
        acked.ack, lambda: retried.retry(60), lambda: deferred.defer(60),
        lambda: dead.dead_letter({"reason": "late"}), lambda: subscription.ack_many([batched]), touched.touch,
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(TransportClosed):
            await call()
    assert [d for d in held if d.settled] == []
    other = await buses.open(url)
    again = await collect(await other.subscribe("g", [TYPE_A]), 6, within=LEASE + WAIT)
    assert sorted((d.message.id, d.attempt) for d in again) == [(f"m{n}", 2) for n in range(6)]
    assert await other.dead_letters("g") == []


async def test_touch_extends_the_lease(buses: Buses) -> None:
    """A handler that keeps touching its delivery keeps it, well past the original lease."""
    lease = 2.0
    url = buses.url(lease=lease)
    worker = await (await buses.open(url)).subscribe("g", [TYPE_A])
    rival = await (await buses.open(url)).subscribe("g", [TYPE_A])
    await (await buses.open(url)).publish([message(1)])
    (delivery,) = await collect(worker, 1)
    stolen = asyncio.ensure_future(rival.fetch(1, timeout=2 * lease))
    for _ in range(int(2 * lease / 0.25)):
        await asyncio.sleep(0.25)
        await delivery.touch()
    await delivery.ack()
    assert await stolen == []
    assert await quiet(rival, 1.5 * lease) == []


async def test_the_attempt_count_survives_reopening_the_bus(buses: Buses, bus_url: str) -> None:
    """The attempt counter lives in the broker, not in the process that saw the failure."""
    first = await buses.open(bus_url)
    subscription = await first.subscribe("g", [TYPE_A])
    await first.publish([message(1)])
    (delivery,) = await collect(subscription, 1)
    await delivery.retry(0)
    (delivery,) = await collect(subscription, 1)
    await delivery.retry(0)
    await first.close()

    second = await buses.open(bus_url)
    (delivery,) = await collect(await second.subscribe("g", [TYPE_A]), 1)
    assert delivery.attempt == 3
