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

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conformance._support import TYPE_A, WAIT, collect, ids, message
from tests.conformance.conftest import BROKERS, Buses

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
