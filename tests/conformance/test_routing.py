"""Routing: fan-out across groups, type filters, wildcards, competition within a group."""

from __future__ import annotations

import asyncio

from choreograph.transports import Delivery, Subscription, Transport
from tests.conformance._support import TYPE_A, TYPE_B, WAIT, collect, ids, message, quiet
from tests.conformance.conftest import Buses


async def test_every_group_receives_every_matching_message(bus: Transport) -> None:
    subscriptions = [await bus.subscribe(name, [TYPE_A]) for name in ("billing", "shipping", "audit")]
    await bus.publish([message(1), message(2)])
    for subscription in subscriptions:
        got = await collect(subscription, 2)
        assert sorted(ids(got)) == ["m1", "m2"], subscription.group
        assert all(d.group == subscription.group and d.attempt == 1 for d in got)


async def test_a_group_registered_on_one_transport_receives_what_another_publishes(
    buses: Buses, bus_url: str
) -> None:
    consumer, producer = await buses.open(bus_url), await buses.open(bus_url)
    subscription = await consumer.subscribe("g", [TYPE_A])
    await producer.publish([message(1)])
    assert ids(await collect(subscription, 1)) == ["m1"]


async def test_a_group_stays_registered_while_it_has_no_consumer(buses: Buses, bus_url: str) -> None:
    """subscribe() registers the group durably: what is published while nobody consumes waits for it."""
    first = await buses.open(bus_url)
    await (await first.subscribe("g", [TYPE_A])).close()
    await first.close()
    await (await buses.open(bus_url)).publish([message(1)])
    later = await buses.open(bus_url)
    assert ids(await collect(await later.subscribe("g", [TYPE_A]), 1)) == ["m1"]


async def test_a_group_that_joins_later_receives_what_is_published_from_then_on(bus: Transport) -> None:
    early = await bus.subscribe("early", [TYPE_A])
    await bus.publish([message(1)])  # routed while only "early" takes TYPE_A
    late = await bus.subscribe("late", [TYPE_A, TYPE_B])
    await bus.publish([message(2), message(3, type=TYPE_B)])
    assert sorted(ids(await collect(early, 2))) == ["m1", "m2"]
    assert sorted(ids(await collect(late, 2))) == ["m2", "m3"]
    assert await quiet(early, 0.3) == [] and await quiet(late, 0.3) == []


async def test_a_group_receives_only_the_types_it_subscribed_to(bus: Transport) -> None:
    only_a = await bus.subscribe("only-a", [TYPE_A])
    only_b = await bus.subscribe("only-b", [TYPE_B])
    await bus.publish([message(1, TYPE_A), message(2, TYPE_B), message(3, "conformance.other")])
    assert ids(await collect(only_a, 1)) == ["m1"]
    assert ids(await collect(only_b, 1)) == ["m2"]
    assert await quiet(only_a, 0.3) == []
    assert await quiet(only_b, 0.3) == []


async def test_a_group_may_subscribe_to_several_types(bus: Transport) -> None:
    both = await bus.subscribe("both", [TYPE_A, TYPE_B])
    await bus.publish([message(1, TYPE_A), message(2, TYPE_B), message(3, "conformance.other")])
    assert sorted(ids(await collect(both, 2))) == ["m1", "m2"]
    assert await quiet(both, 0.3) == []


async def test_a_wildcard_group_receives_every_type(bus: Transport) -> None:
    everything = await bus.subscribe("journal", None)
    await bus.publish([message(1, TYPE_A), message(2, TYPE_B), message(3, "some.other.type")])
    got = await collect(everything, 3)
    assert sorted((d.message.id, d.message.type) for d in got) == [
        ("m1", TYPE_A),
        ("m2", TYPE_B),
        ("m3", "some.other.type"),
    ]


async def test_consumers_of_one_group_compete_for_its_messages(buses: Buses, bus_url: str) -> None:
    """While one consumer holds deliveries, another gets the others; no message goes to both."""
    first = await (await buses.open(bus_url)).subscribe("workers", [TYPE_A])
    second = await (await buses.open(bus_url)).subscribe("workers", [TYPE_A])
    publisher = await buses.open(bus_url)
    await publisher.publish([message(n) for n in range(20)])

    held = await collect(first, 10)
    rest = await collect(second, 10)
    assert len(held) == 10 and len(rest) == 10
    assert set(ids(held)).isdisjoint(ids(rest))
    assert set(ids(held)) | set(ids(rest)) == {f"m{n}" for n in range(20)}
    assert await quiet(second, 0.3) == []


async def test_concurrent_fetches_in_one_group_never_share_a_delivery(buses: Buses, bus_url: str) -> None:
    transports = [await buses.open(bus_url) for _ in range(2)]
    subscriptions = [await t.subscribe("workers", [TYPE_A]) for t in transports for _ in range(3)]
    await transports[0].publish([message(n) for n in range(60)])

    async def take(subscription: Subscription) -> list[Delivery]:
        return await subscription.fetch(60, timeout=0.5)

    batches: list[list[Delivery]] = []
    while sum(map(len, batches)) < 60:
        round_ = await asyncio.wait_for(asyncio.gather(*(take(s) for s in subscriptions)), WAIT)
        assert any(round_), "deliveries went missing"
        batches.extend(round_)
    got = [i for batch in batches for i in ids(batch)]
    assert sorted(got) == sorted(f"m{n}" for n in range(60))


async def test_groups_lists_each_group_with_its_types(buses: Buses, bus_url: str) -> None:
    """What ``choreograph publish`` and ``dlq list --group`` check a type and a group against."""
    first, second = await buses.open(bus_url), await buses.open(bus_url)
    await first.subscribe("billing", [TYPE_A, TYPE_B])
    await (await first.subscribe("audit", None)).close()
    listed = await second.groups()  # another connection: what the bus keeps, not this process
    assert listed is not None
    assert {name: listed[name] for name in ("billing", "audit")} == {
        "billing": frozenset({TYPE_A, TYPE_B}), "audit": None,
    }
