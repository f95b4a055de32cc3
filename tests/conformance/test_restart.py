"""Broker restarts: durability across a restart, and a live transport reconnecting.

The place for the restart and reconnect clauses. A broker module opts in by defining
``async def restart(url: str) -> None``: stop and start the broker serving ``url``,
keeping its data, returning once it accepts connections again. Never restart the
shared brokers: a module that supports this points ``url()`` at a private server it
started on a free port (or restarts only such a server). Brokers without the hook
(embedded ones: there is no broker process) are not parametrised here at all, so a CI
run reports no skips: durability across reopening is asserted for every transport in
test_publish.py.

Broker helpers: add clauses here (parametrised over every broker like the rest of
the suite), not in per-broker files.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conformance._support import TYPE_A, WAIT, collect, ids, message, quiet
from tests.conformance.conftest import BROKERS, Buses

#: The lease of the buses whose deliveries come back after a restart only when it runs out.
LEASE = 5.0

RESTARTABLE = [module for module in BROKERS if hasattr(module, "restart")]
pytestmark = pytest.mark.parametrize("broker", RESTARTABLE, ids=[m.NAME for m in RESTARTABLE], indirect=True)


def _restart_hook(broker: Any) -> Callable[[str], Awaitable[None]]:
    return broker.restart  # type: ignore[no-any-return]


async def test_published_messages_survive_a_broker_restart(broker: Any, buses: Buses, bus_url: str) -> None:
    restart = _restart_hook(broker)
    before = await buses.open(bus_url)
    await before.subscribe("g", [TYPE_A])
    await before.publish([message(1), message(2)])
    await before.close()
    await restart(bus_url)
    after = await buses.open(bus_url)
    assert sorted(ids(await collect(await after.subscribe("g", [TYPE_A]), 2))) == ["m1", "m2"]


async def test_a_transport_keeps_working_after_the_broker_comes_back(
    broker: Any, buses: Buses, bus_url: str
) -> None:
    """Publish and fetch on a transport opened before the restart succeed once the broker is back."""
    restart = _restart_hook(broker)
    bus = await buses.open(bus_url)
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    await restart(bus_url)
    await bus.publish([message(2)])
    got = await collect(subscription, 2, within=2 * WAIT)
    assert sorted(ids(got)) == ["m1", "m2"]


async def test_a_delayed_retry_survives_a_broker_restart(broker: Any, buses: Buses) -> None:
    """retry(after), then the broker restarts (the hooks SIGKILL it at once): the delivery
    comes back to the group afterwards, attempt + 1, and not before its delay.

    "Comes back" is bounded generously, by the lease plus WAIT: on NATS it is the lease that
    brings it back - JetStream keeps a NAK's delay in consumer state it writes lazily, and a
    kill right after the NAK loses it, so the message is redelivered once the lease of the
    delivery that was retried runs out (a kill later than that keeps the delay). RabbitMQ
    keeps the retry as a message in a retry queue (created by this very retry: the case its
    quorum queues lost on a kill, see ``AmqpTransport._settle_declares``); Redis in a sorted set.
    """
    restart = _restart_hook(broker)
    url = buses.url(lease=LEASE)
    before = await buses.open(url)
    subscription = await before.subscribe("g", [TYPE_A])
    await before.publish([message(1)])
    (first,) = await collect(subscription, 1)
    after = 1.0
    retried_at = time.monotonic()
    await first.retry(after)
    await before.close()
    await restart(url)
    again = await collect(await (await buses.open(url)).subscribe("g", [TYPE_A]), 1, within=LEASE + WAIT)
    waited = time.monotonic() - retried_at
    assert ids(again) == ["m1"], "the delayed retry did not come back after the restart"
    assert again[0].attempt == first.attempt + 1
    assert waited >= after - 0.05  # small allowance for clock granularity, never for early delivery


async def test_a_dead_letter_survives_a_broker_restart(broker: Any, buses: Buses, bus_url: str) -> None:
    """dead_letter(record), then the broker restarts (SIGKILL): it is listed with its record
    afterwards, and not delivered to the group again. (RabbitMQ lost it when the group's
    dead-letter queue was the most recently created quorum queue: see ``_settle_declares``.)"""
    restart = _restart_hook(broker)
    before = await buses.open(bus_url)
    subscription = await before.subscribe("g", [TYPE_A])
    await before.publish([message(1)])
    (first,) = await collect(subscription, 1)
    await first.dead_letter({"reason": "rejected", "attempts": first.attempt})
    await before.close()
    await restart(bus_url)
    after = await buses.open(bus_url)
    subscription = await after.subscribe("g", [TYPE_A])
    (letter,) = await after.dead_letters("g")
    assert (letter.message.id, dict(letter.record)) == ("m1", {"reason": "rejected", "attempts": first.attempt})
    assert await quiet(subscription, 2.0) == []
