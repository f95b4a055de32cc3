"""Unbinding types from a group: the one way its binding narrows.

Subscribing only ever widens a group (see test_rebinding.py), so a type no version of a
service handles any more stays bound until an operator unbinds it. Only routing changes:
what the group already holds stays, for the runtime to hand back or dead-letter.
"""

from __future__ import annotations

import pytest

from choreograph.errors import ConfigurationError
from choreograph.transports import Transport
from tests.conformance._support import TYPE_A, TYPE_B, bound, collect, ids, message, quiet
from tests.conformance.conftest import Buses

TYPE_C = "conformance.c"


async def test_events_of_an_unbound_type_published_afterwards_no_longer_reach_the_group(
    buses: Buses, bus_url: str
) -> None:
    old, admin, new = await buses.open(bus_url), await buses.open(bus_url), await buses.open(bus_url)
    await (await old.subscribe("billing", [TYPE_A, TYPE_B])).close()
    await old.publish([message(0, TYPE_A)])  # a publisher that routed before the unbind
    assert await admin.unbind("billing", [TYPE_B]) == frozenset({TYPE_A})
    await old.publish([message(1, TYPE_B), message(2, TYPE_A), message(3, TYPE_C)])
    subscription = await new.subscribe("billing", [TYPE_A])  # a replica of the new version
    assert sorted(ids(await collect(subscription, 2))) == ["m0", "m2"]
    assert await quiet(subscription, 0.3) == []
    assert await bound(old, "billing") == frozenset({TYPE_A})


async def test_events_of_an_unbound_type_the_group_held_still_reach_it_and_later_ones_do_not(
    buses: Buses, bus_url: str
) -> None:
    """The line is the unbind: what was published before it is the group's to settle."""
    old, admin, new = await buses.open(bus_url), await buses.open(bus_url), await buses.open(bus_url)
    await (await old.subscribe("billing", [TYPE_A, TYPE_B])).close()
    await old.publish([message(1, TYPE_B)])
    await admin.unbind("billing", [TYPE_B])
    await old.publish([message(2, TYPE_B), message(3, TYPE_A)])
    subscription = await new.subscribe("billing", [TYPE_A])
    assert sorted(ids(await collect(subscription, 2))) == ["m1", "m3"]
    assert await quiet(subscription, 0.3) == []
    assert await bound(admin, "billing") == frozenset({TYPE_A})


async def test_other_groups_bound_to_the_type_still_receive_it(buses: Buses, bus_url: str) -> None:
    first, second = await buses.open(bus_url), await buses.open(bus_url)
    await first.subscribe("billing", [TYPE_A, TYPE_B])
    shipping = await first.subscribe("shipping", [TYPE_B])
    await second.unbind("billing", [TYPE_B])
    await second.publish([message(1, TYPE_B)])
    assert ids(await collect(shipping, 1)) == ["m1"]
    assert await bound(second, "shipping") == frozenset({TYPE_B})


async def test_a_delivery_of_an_unbound_type_handed_back_comes_back_to_the_group(
    buses: Buses, bus_url: str
) -> None:
    """What the group held when its type was unbound stays: the runtime retries it for a
    while (a replica that still handles it may take it), then dead-letters it."""
    bus, admin = await buses.open(bus_url), await buses.open(bus_url)
    subscription = await bus.subscribe("billing", [TYPE_A, TYPE_B])
    await bus.publish([message(1, TYPE_B)])
    [held] = await collect(subscription, 1)
    await admin.unbind("billing", [TYPE_B])
    await held.retry(0)
    [again] = await collect(subscription, 1)
    assert (again.message.id, again.attempt) == ("m1", 2)
    await again.dead_letter({"reason": "unhandled"})
    assert [letter.message.id for letter in await admin.dead_letters("billing")] == ["m1"]


async def test_unbinding_a_type_the_group_is_not_bound_to_changes_nothing(bus: Transport) -> None:
    subscription = await bus.subscribe("billing", [TYPE_A])
    assert await bus.unbind("billing", [TYPE_B]) == frozenset({TYPE_A})
    await bus.publish([message(1, TYPE_A)])
    assert ids(await collect(subscription, 1)) == ["m1"]
    assert await bound(bus, "billing") == frozenset({TYPE_A})


async def test_a_group_unbound_from_every_type_receives_nothing(buses: Buses, bus_url: str) -> None:
    old, admin, new = await buses.open(bus_url), await buses.open(bus_url), await buses.open(bus_url)
    await (await old.subscribe("billing", [TYPE_A, TYPE_B])).close()
    assert await admin.unbind("billing", [TYPE_A, TYPE_B, TYPE_C]) == frozenset()
    subscription = await new.subscribe("billing", [])
    await admin.publish([message(1, TYPE_A), message(2, TYPE_B)])
    assert await quiet(subscription, 0.3) == []
    assert await bound(admin, "billing") == frozenset()


async def test_a_group_subscribed_again_for_an_unbound_type_is_bound_to_it_again(
    buses: Buses, bus_url: str
) -> None:
    """Unbinding is for types nobody asks for: a replica still handling one binds it back."""
    admin, replica = await buses.open(bus_url), await buses.open(bus_url)
    await (await replica.subscribe("billing", [TYPE_A, TYPE_B])).close()
    await admin.unbind("billing", [TYPE_B])
    subscription = await replica.subscribe("billing", [TYPE_B])
    await admin.publish([message(1, TYPE_B)])
    assert ids(await collect(subscription, 1)) == ["m1"]
    assert await bound(admin, "billing") == frozenset({TYPE_A, TYPE_B})


async def test_unbinding_from_a_group_never_registered_is_an_error_naming_it(bus: Transport) -> None:
    await bus.subscribe("billing", [TYPE_A])
    with pytest.raises(ConfigurationError, match="no group 'biling'"):
        await bus.unbind("biling", [TYPE_A])


async def test_a_wildcard_group_cannot_be_unbound_from_a_type(bus: Transport) -> None:
    subscription = await bus.subscribe("journal", None)
    with pytest.raises(ConfigurationError, match="'journal' is bound to every type"):
        await bus.unbind("journal", [TYPE_A])
    await bus.publish([message(1, TYPE_A)])
    assert ids(await collect(subscription, 1)) == ["m1"]
    assert await bound(bus, "journal") is None
