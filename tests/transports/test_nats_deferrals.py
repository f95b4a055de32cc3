"""NATS: ``defer`` keeps the attempt although JetStream counts every delivery (``_nats_deferrals``).

The conformance suite asserts the clause itself (tests/conformance/test_settlement.py); these
tests cover how NATS meets it: the count lives on the server, so another process of the group
reads it; a first delivery reads nothing; a failed write or read counts the attempt rather
than hold the message; an entry goes once its message is settled.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from choreograph.errors import TransportError
from choreograph.transports._nats_client import JetStream
from choreograph.transports._nats_deferrals import Deferrals
from choreograph.transports.nats import NatsTransport
from tests._nats_server import NatsServer
from tests.transports.test_nats import WAIT, bus_on, collect, msg, opened


async def entries(bus: NatsTransport) -> int:
    """How many deferral counts the bus keeps."""
    info = await bus._jetstream().api("info", f"STREAM.INFO.{bus.deferral_stream}")
    return int(info["state"]["messages"])


async def eventually_no_entries(bus: NatsTransport) -> None:
    for _ in range(100):  # deleted in the background
        if await entries(bus) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{await entries(bus)} deferral count(s) left after the message was settled")


async def test_another_process_of_the_group_gets_the_deferred_message_with_its_attempt(server_url: str) -> None:
    url = bus_on(server_url)
    async with opened(url) as first, NatsTransport(url) as second:
        mine = await first.subscribe("g", None)
        theirs = await second.subscribe("g", None)
        await first.publish([msg(1)])
        (got,) = await collect(mine, 1)
        await got.retry(0)  # a real failure: attempt 2
        (got,) = await collect(mine, 1)
        assert got.attempt == 2
        for _ in range(3):  # each time the other process takes it
            await got.defer(0.2)
            (got,) = await collect(theirs, 1)
            assert got.attempt == 2
            mine, theirs = theirs, mine
        await got.retry(0)
        (got,) = await collect(mine, 1)
        assert got.attempt == 3


async def test_a_first_delivery_reads_no_count_and_its_ack_deletes_none(
    server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The throughput path: fetching and acking first deliveries makes no JetStream API call."""
    async with opened(bus_on(server_url)) as bus:
        subscription = await bus.subscribe("g", None)
        calls: list[str] = []
        real = JetStream.api

        async def spied(self: JetStream, action: str, subject: str, request: Any = None) -> dict[str, Any]:
            calls.append(subject)
            return await real(self, action, subject, request)

        monkeypatch.setattr(JetStream, "api", spied)
        await bus.publish([msg(n) for n in range(20)])
        got = await collect(subscription, 20)
        assert [d.attempt for d in got] == [1] * 20
        await subscription.ack_many(got[:10])
        for delivery in got[10:]:
            await delivery.ack()
        await asyncio.sleep(0.2)  # a background deletion would have been asked by now
        assert [c for c in calls if not c.startswith("CONSUMER.INFO.")] == []  # (the binding checks)


async def test_the_count_is_deleted_once_the_message_is_acked_or_dead_lettered(server_url: str) -> None:
    async with opened(bus_on(server_url)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1), msg(2), msg(3)])
        got = await collect(subscription, 3)
        for delivery in got:
            await delivery.defer(0)
        assert await entries(bus) == 3
        again = {d.message.id: d for d in await collect(subscription, 3)}
        assert [again[f"m{n}"].attempt for n in (1, 2, 3)] == [1, 1, 1]
        await again["m1"].ack()
        await subscription.ack_many([again["m2"]])
        await again["m3"].dead_letter({"reason": "rejected"})
        await eventually_no_entries(bus)
        assert [letter.message.id for letter in await bus.dead_letters("g")] == ["m3"]


async def test_a_count_that_cannot_be_written_makes_the_deferral_a_retry_not_a_lost_message(
    server_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(bus_on(server_url)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        (got,) = await collect(subscription, 1)

        async def failing(*args: object) -> None:
            raise TransportError("nats: publish: no stream answered")

        monkeypatch.setattr(Deferrals, "write", failing)
        with caplog.at_level(logging.WARNING, logger="choreograph.transports.nats"):
            await got.defer(0)
        assert got.settled
        (again,) = await collect(subscription, 1)
        assert (again.message.id, again.attempt) == ("m1", 2)
        assert "could not record the deferral of 'm1'" in caplog.text


async def test_a_count_that_cannot_be_read_counts_the_deliveries(
    server_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(bus_on(server_url)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        (got,) = await collect(subscription, 1)
        await got.defer(0)

        async def failing(*args: object) -> int:
            raise TransportError("nats: read a deferral count failed: timeout")

        monkeypatch.setattr(Deferrals, "count", failing)
        with caplog.at_level(logging.WARNING, logger="choreograph.transports.nats"):
            (again,) = await collect(subscription, 1)
        assert again.attempt == 2
        assert "could not read the deferrals of 1 redelivered message(s)" in caplog.text


async def test_a_fetch_cancelled_while_it_reads_counts_loses_nothing(
    server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(bus_on(server_url)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1), msg(2)])
        got = await collect(subscription, 2)
        for delivery in got:
            await delivery.defer(0)
        reading = asyncio.Event()
        real = Deferrals.count

        async def stuck(*args: object) -> int:
            reading.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        monkeypatch.setattr(Deferrals, "count", stuck)
        fetch = asyncio.ensure_future(subscription.fetch(10, timeout=WAIT))
        await asyncio.wait_for(reading.wait(), WAIT)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        monkeypatch.setattr(Deferrals, "count", real)
        again = await collect(subscription, 2, within=1.0)  # not after the lease (30 s): at once
        assert sorted((d.message.id, d.attempt) for d in again) == [("m1", 1), ("m2", 1)]


async def test_a_count_applies_only_to_deliveries_after_the_one_that_wrote_it(server_url: str) -> None:
    async with opened(bus_on(server_url)) as bus:
        counts = bus._deferral_counts()
        await counts.write("g", 99, 5, 6)  # of its first 6 deliveries, 5 were deferred
        assert await counts.count("g", 99, 7) == 5
        assert await counts.count("g", 99, 6) == 0  # not this message's (its stream made again)
        assert await counts.count("g", 98, 7) == 0  # never deferred


async def test_a_count_of_an_events_stream_deleted_since_does_not_apply(server_url: str) -> None:
    """Its sequences start over: the count of the old message 1 is not the new message 1's."""
    url = bus_on(server_url)
    async with NatsTransport(url) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        (got,) = await collect(subscription, 1)
        await got.defer(60)  # never settled: its count stays
        assert await entries(bus) == 1
        await subscription.close()
        await bus._jetstream().api("delete", f"STREAM.DELETE.{bus.events_stream}")
    async with opened(url) as bus:  # makes the events stream again
        assert await entries(bus) == 1  # the old count is there (until its max age), not used
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(2)])
        (got,) = await collect(subscription, 1)
        await got.retry(0)
        (again,) = await collect(subscription, 1)
        assert (again.message.id, again.attempt) == ("m2", 2)


async def test_the_deferral_stream_has_the_bus_replicas_and_a_max_age(server_url: str) -> None:
    async with opened(bus_on(server_url)) as bus:
        info = await bus._jetstream().api("info", f"STREAM.INFO.{bus.deferral_stream}")
        config = info["config"]
        assert (config["num_replicas"], config["max_msgs_per_subject"]) == (bus.replicas, 1)
        assert config["max_age"] == 30 * 24 * 3600 * 1_000_000_000
    assert Deferrals.config("p", 3)["num_replicas"] == 3



async def test_a_deferral_is_counted_across_a_restart_of_the_server() -> None:
    """The count is in a file-backed stream, and the events stream keeps its creation time."""
    server = NatsServer.start_new()
    try:
        async with opened(bus_on(server.url, lease=1)) as bus:
            subscription = await bus.subscribe("g", None)
            await bus.publish([msg(1)])
            (got,) = await collect(subscription, 1)
            await got.defer(0.5)
            await asyncio.to_thread(server.restart)  # SIGKILL: the NAK's delay may be lost, the lease is not
            (again,) = await collect(subscription, 1)
            assert (again.message.id, again.attempt) == ("m1", 1)
    finally:
        server.destroy()
