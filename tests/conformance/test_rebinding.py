"""Subscribing a group again: its binding widens to the union, never narrows.

Old and new replicas of a service share its group during a rolling deploy and subscribe
in any order; the last one to subscribe must not unbind what the others handle.
"""

from __future__ import annotations

from choreograph.transports import Transport
from tests.conformance._support import TYPE_A, TYPE_B, bound, collect, ids, message, quiet
from tests.conformance.conftest import Buses

TYPE_C = "conformance.c"



async def test_a_replica_subscribing_with_fewer_types_does_not_unbind_the_others(
    buses: Buses, bus_url: str
) -> None:
    new, old, publisher = await buses.open(bus_url), await buses.open(bus_url), await buses.open(bus_url)
    await new.subscribe("billing", [TYPE_A, TYPE_B])
    later = await old.subscribe("billing", [TYPE_A])  # an old replica restarts after the new one
    await publisher.publish([message(1, TYPE_A), message(2, TYPE_B), message(3, TYPE_C)])
    got = await collect(later, 2)  # the group's deliveries, whichever consumer asked for them
    assert sorted((d.message.id, d.message.type) for d in got) == [("m1", TYPE_A), ("m2", TYPE_B)]
    assert await quiet(later, 0.3) == []
    assert await bound(publisher, "billing") == frozenset({TYPE_A, TYPE_B})


async def test_a_group_subscribed_with_other_types_is_bound_to_both(buses: Buses, bus_url: str) -> None:
    first, second = await buses.open(bus_url), await buses.open(bus_url)
    await (await first.subscribe("shipping", [TYPE_A])).close()
    subscription = await second.subscribe("shipping", [TYPE_B])
    await second.publish([message(1, TYPE_A), message(2, TYPE_B), message(3, TYPE_C)])
    assert sorted(ids(await collect(subscription, 2))) == ["m1", "m2"]
    assert await quiet(subscription, 0.3) == []
    assert await bound(first, "shipping") == frozenset({TYPE_A, TYPE_B})


async def test_a_wildcard_group_stays_wildcard_when_subscribed_for_some_types(
    buses: Buses, bus_url: str
) -> None:
    first, second = await buses.open(bus_url), await buses.open(bus_url)
    await first.subscribe("journal", None)
    subscription = await second.subscribe("journal", [TYPE_A])
    await second.publish([message(1, TYPE_A), message(2, "some.other.type")])
    assert sorted(ids(await collect(subscription, 2))) == ["m1", "m2"]
    assert await bound(first, "journal") is None


async def test_a_group_subscribed_for_every_type_becomes_wildcard(buses: Buses, bus_url: str) -> None:
    first, second = await buses.open(bus_url), await buses.open(bus_url)
    await first.subscribe("audit", [TYPE_A])
    subscription = await second.subscribe("audit", None)
    await second.publish([message(1, TYPE_B), message(2, "some.other.type")])
    assert sorted(ids(await collect(subscription, 2))) == ["m1", "m2"]
    assert await bound(first, "audit") is None


async def test_subscribing_again_with_the_same_types_changes_nothing(bus: Transport) -> None:
    await bus.subscribe("orders", [TYPE_A, TYPE_B])
    subscription = await bus.subscribe("orders", [TYPE_B, TYPE_A])
    await bus.publish([message(1, TYPE_A), message(2, TYPE_C)])
    assert ids(await collect(subscription, 1)) == ["m1"]
    assert await quiet(subscription, 0.3) == []
    assert await bound(bus, "orders") == frozenset({TYPE_A, TYPE_B})


async def test_a_consumer_that_subscribed_before_the_group_widened_receives_the_new_types(
    buses: Buses, bus_url: str
) -> None:
    """Any consumer of a group may get any of its deliveries: one running since before a
    newer replica widened the group must not drop (or skip) the types it did not ask for."""
    old, new = await buses.open(bus_url), await buses.open(bus_url)
    running = await old.subscribe("billing", [TYPE_A])
    await new.subscribe("billing", [TYPE_A, TYPE_B])
    await new.publish([message(1, TYPE_B), message(2, TYPE_A), message(3, TYPE_C)])
    assert sorted(ids(await collect(running, 2))) == ["m1", "m2"]
    assert await quiet(running, 0.3) == []
