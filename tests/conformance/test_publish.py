"""Publishing: durability, payloads, opacity, order, and how fetch hands messages out."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from choreograph.errors import TransportClosed
from choreograph.transports import Message, Transport
from tests.conformance._support import TYPE_A, WAIT, collect, ids, message, quiet
from tests.conformance.conftest import Buses

MIB = 1024 * 1024


async def test_published_messages_survive_closing_and_reopening_the_bus(buses: Buses, bus_url: str) -> None:
    """publish() returns once the bus holds the messages: a new transport on the URL delivers them."""
    first = await buses.open(bus_url)
    await first.subscribe("g", [TYPE_A])
    await first.publish([message(1), message(2), message(3)])
    await first.close()

    second = await buses.open(bus_url)
    got = await collect(await second.subscribe("g", [TYPE_A]), 3)
    assert sorted(ids(got)) == ["m1", "m2", "m3"]
    assert {d.message.body for d in got} == {b"body-1", b"body-2", b"body-3"}
    assert all(d.attempt == 1 for d in got)


async def test_a_delivery_carries_the_message_id_type_body_and_group(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([Message("evt-1", TYPE_A, b"payload")])
    (delivery,) = await collect(subscription, 1)
    assert delivery.message == Message("evt-1", TYPE_A, b"payload")
    assert delivery.group == "g"
    assert delivery.attempt == 1


async def test_a_one_mebibyte_body_round_trips_byte_exact(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    body = os.urandom(MIB)
    await bus.publish([message(1, body=body)])
    (delivery,) = await collect(subscription, 1)
    assert len(delivery.message.body) == MIB
    assert delivery.message.body == body


@pytest.mark.parametrize(
    "body",
    [b"", b"\x00\xff\xfe\x80 not json {", b'{"looks": "like json"', "é €".encode("utf-16")],
    ids=["empty", "binary", "broken-json", "utf16"],
)
async def test_bodies_are_opaque_bytes_the_transport_never_decodes(bus: Transport, body: bytes) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1, body=body)])
    (delivery,) = await collect(subscription, 1)
    assert type(delivery.message.body) is bytes
    assert delivery.message.body == body


async def test_one_publishers_order_is_kept_within_a_group(broker: Any, bus: Transport) -> None:
    """First deliveries of a group come in publish order, across batches, for a single publisher."""
    if not getattr(broker, "ORDERED", True):
        pytest.skip(f"{broker.NAME} does not promise publish order")
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(20)])
    for n in range(20, 40):
        await bus.publish([message(n)])
    got: list[str] = []
    while len(got) < 40:
        batch = await subscription.fetch(7, timeout=WAIT)
        assert batch, f"only {len(got)} of 40 delivered"
        got.extend(ids(batch))
        for delivery in batch:
            await delivery.ack()
    assert got == [f"m{n}" for n in range(40)]


async def test_publishing_nothing_is_a_no_op(bus: Transport) -> None:
    subscription = await bus.subscribe("g", None)
    await bus.publish([])
    assert await quiet(subscription, 0.3) == []


async def test_fetch_returns_a_partial_batch_without_waiting_to_fill_it(bus: Transport) -> None:
    """fetch(100) with no timeout returns the one available message rather than waiting for 100."""
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    got = await asyncio.wait_for(subscription.fetch(100), WAIT)
    assert ids(got) == ["m1"]


async def test_fetch_waits_for_a_message_published_while_it_waits(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    waiting = asyncio.ensure_future(subscription.fetch(10, timeout=WAIT))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await bus.publish([message(1)])
    assert ids(await waiting) == ["m1"]


async def test_fetch_returns_nothing_once_its_timeout_passes(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    assert await subscription.fetch(10, timeout=0.2) == []


async def test_fetch_never_returns_more_than_asked(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(10)])
    assert len(await subscription.fetch(3, timeout=WAIT)) == 3


@pytest.mark.parametrize("max_messages", [0, -1])
async def test_fetch_of_fewer_than_one_message_raises_value_error_and_takes_nothing(
    bus: Transport, max_messages: int
) -> None:
    """A batch of none is refused on every transport, with a message ready and without: the
    in-memory transport returned ``[]`` at once with one ready (an ``async for`` spun) and
    waited out its timeout with none, where the others raised."""
    subscription = await bus.subscribe("g", [TYPE_A])
    with pytest.raises(ValueError, match="max_messages"):
        await asyncio.wait_for(subscription.fetch(max_messages, timeout=0.2), WAIT)
    await bus.publish([message(1)])
    with pytest.raises(ValueError, match="max_messages"):
        await asyncio.wait_for(subscription.fetch(max_messages, timeout=WAIT), WAIT)
    (delivery,) = await collect(subscription, 1)
    assert (delivery.message.id, delivery.attempt) == ("m1", 1)


async def test_publish_after_close_raises_transport_closed(buses: Buses) -> None:
    transport = await buses.open()
    await transport.close()
    with pytest.raises(TransportClosed):
        await transport.publish([message(1)])


async def test_ping_answers_while_the_bus_is_open_and_raises_transport_closed_after(buses: Buses) -> None:
    """What the gateway's /readyz asks the broker."""
    bus = await buses.open()
    await bus.ping()
    await bus.close()
    with pytest.raises(TransportClosed):
        await bus.ping()
