"""The RabbitMQ transport: behaviour specific to it (the contract itself is in tests/conformance)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import aiormq.channel
import aiormq.connection
import aiormq.exceptions
import orjson
import pamqp.commands
import pytest

from choreograph import Context, Event, Publisher, Retry, Service, Worker
from choreograph.errors import ConfigurationError, TransportError
from choreograph.transports import open_transport
from choreograph.transports._amqp_consumer import AmqpSubscription, live_channel
from choreograph.transports._amqp_wire import RETRY_BUCKETS_MS, attempt_of, outgoing, retry_bucket_ms
from choreograph.transports.amqp import AmqpTransport
from choreograph.transports.base import Delivery, Message, Subscription
from tests._brokers import require_broker
from tests._waiting import until as _until
from tests.conformance.brokers import amqp as broker
from tests.transports import _second_call as second_call
from tests.transports._close_race import close_during_connect

WAIT = 15.0


def msg(n: int, type_: str = "order.placed", body: bytes = b"{}") -> Message:
    return Message(id=f"m{n}", type=type_, body=body)


def new_url(**params: str) -> str:
    """A fresh bus (its own name prefix) on the shared server."""
    url = broker.url(uuid.uuid4().hex[:12], lease=30.0)
    return url + "".join(f"&{k}={v}" for k, v in params.items())


@pytest.fixture
async def bus_url() -> AsyncIterator[str]:
    require_broker("amqp")
    url = new_url()
    yield url
    await broker.cleanup(url)


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[AmqpTransport]:
    transport = AmqpTransport(url)
    async with transport:
        yield transport


async def fetch_all(sub: Subscription, expected: int, wait: float = WAIT) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < expected:
        batch = await sub.fetch(expected - len(got), timeout=wait)
        if not batch:
            break
        got += batch
    return got


# -- URL and wire format (no broker) --------------------------------------------------------


def test_url_parameters_configure_the_transport_and_are_hidden_from_aio_pika() -> None:
    transport = AmqpTransport("amqp://u:p@h:5673/vh?lease=7.5&prefix=shop&queue_type=classic&heartbeat=5")
    assert (transport.lease, transport.names.prefix, transport.queue_type) == (7.5, "shop", "classic")
    assert transport._client_url == "amqp://u:p@h:5673/vh?heartbeat=5&reconnect_interval=1"


def test_the_default_prefix_is_choreograph_and_queues_are_quorum() -> None:
    transport = AmqpTransport("amqp://guest:guest@localhost/")
    assert (transport.names.prefix, transport.queue_type) == ("choreograph", "quorum")
    assert transport.names.exchange == "choreograph.events"
    assert transport.names.group("billing") == "choreograph.group.billing"
    assert transport.names.dlq("billing") == "choreograph.dlq.billing"


@pytest.mark.parametrize("netloc", ["localhost:99999", "localhost:x"])
def test_a_bad_port_is_a_configuration_error_naming_it(netloc: str) -> None:
    with pytest.raises(ConfigurationError, match="port"):
        AmqpTransport(f"amqp://guest:guest@{netloc}/")


@pytest.mark.parametrize("url", ["amqp://", "amqp:///vhost", "amqps://guest:guest@:5671/", "amqp://?prefix=shop"])
def test_a_url_without_a_host_is_a_configuration_error(url: str) -> None:
    """aio-pika took it, then tried to connect to no host every second, for ever (``dlq list`` hung)."""
    with pytest.raises(ConfigurationError, match="no host"):
        AmqpTransport(url)


async def test_a_connect_cancelled_while_the_server_is_silent_leaves_no_task_trying_again() -> None:
    """aio-pika's reconnecting task took the cancellation (Ctrl-C, SIGTERM while ``run`` waits) for a
    failed try and tried again every second, for ever: ``asyncio.run`` waited for it at exit."""
    accepted = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:  # and never answer
        writers.append(writer)
        accepted.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = AmqpTransport(f"amqp://guest:guest@127.0.0.1:{port}/")
    before = asyncio.all_tasks()
    connecting = asyncio.ensure_future(transport.connect())
    try:
        await asyncio.wait_for(accepted.wait(), 10)
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        assert connecting.cancelled()
        assert asyncio.all_tasks() - before - {connecting} == set()
    finally:
        await transport.close()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_connect_that_finishes_after_close_closes_its_connection(bus_url: str) -> None:
    """``close()`` while a connect was under way found no connection to close; the connect then
    installed its connection on the closed transport, open, with nobody left to close it."""
    transport = AmqpTransport(bus_url)
    connections: list[aio_pika.abc.AbstractRobustConnection] = []
    try:
        await close_during_connect(transport, "_open", connections)
        [connection] = connections
        assert connection.is_closed
        assert transport._connection is None
    finally:
        for connection in connections:
            await connection.close()


@pytest.mark.parametrize("query", ["queue_type=lazy", "lease=0", "prefix="])
def test_bad_url_parameters_are_configuration_errors(query: str) -> None:
    with pytest.raises(ConfigurationError):
        AmqpTransport(f"amqp://localhost/?{query}")


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("prefx=shop", "unknown parameter(s) prefx (did you mean prefix?)"),
        ("prefix=shop&bogus=1&ca_certs=ca.pem", "unknown parameter(s) bogus, ca_certs"),
    ],
)
def test_an_unknown_url_parameter_is_a_configuration_error_naming_it(query: str, needle: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        AmqpTransport(f"amqp://guest:guest@localhost/?{query}")
    assert needle in str(raised.value)


@pytest.mark.parametrize(
    "query",
    [
        "timeout=30s",  # aiormq read it as 0
        "heartbeat=x",  # heartbeats silently off
        "heartbeat=70000",
        "reconnect_interval=1e3",  # reconnect in a tight loop
        "interleave=two",
        "no_verify_ssl=false",  # TLS verification silently off
        "fail_fast=maybe",
        "auth=bogus",  # an AuthenticationError at connect naming no parameter
        "auth=",
    ],
)
def test_a_client_parameter_value_the_client_would_misread_is_a_configuration_error(query: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        AmqpTransport(f"amqp://guest:guest@localhost/?{query}")
    assert f"{query.split('=')[0]}=" in str(raised.value)


@pytest.mark.parametrize(
    "query",
    ["timeout=30", "heartbeat=0", "reconnect_interval=0.5", "no_verify_ssl=0", "fail_fast=false", "auth=plain",
     "auth=EXTERNAL"],
)
def test_good_client_parameter_values_are_accepted(query: str) -> None:
    AmqpTransport(f"amqp://guest:guest@localhost/?{query}")


def test_every_url_parameter_aio_pika_and_aiormq_read_is_accepted() -> None:
    read = set(re.findall(r"url\.query\.get\(\s*[\"'](\w+)[\"']", inspect.getsource(aiormq.connection)))
    assert {"heartbeat", "name", "cafile"} <= read  # the pattern still finds them
    read |= {parameter.name for parameter in aio_pika.RobustConnection.PARAMETERS}
    values = {"auth": "plain"}  # a mechanism's name, not a number
    for name in sorted(read):
        AmqpTransport(f"amqp://guest:guest@localhost/?{name}={values.get(name, '1')}")


@pytest.mark.parametrize("scheme", ["amqp", "amqps"])
def test_open_transport_selects_amqp_for_amqp_and_amqps_urls(scheme: str) -> None:
    assert isinstance(open_transport(f"{scheme}://localhost/"), AmqpTransport)


def test_retry_delays_round_up_to_a_bucket_never_early_and_at_most_a_quarter_late() -> None:
    assert retry_bucket_ms(0) == 0
    for ms in [1, 9, 10, 11, 99, 200, 1_000, 1_234, 30_000, 86_400_000]:
        bucket = retry_bucket_ms(ms / 1000)
        assert ms <= bucket <= max(10, ms * 1.25 + 1)
    assert len(RETRY_BUCKETS_MS) < 100


def test_the_attempt_is_the_header_plus_the_returns_the_broker_counted() -> None:
    assert attempt_of(None, False) == 1
    assert attempt_of({"x-choreograph-attempt": 3}, False) == 3
    assert attempt_of({"x-choreograph-attempt": 3, "x-delivery-count": 2}, True) == 5  # quorum
    assert attempt_of({"x-choreograph-attempt": 3}, True) == 4  # classic: redelivered at least once


async def test_event_types_with_wildcard_words_cannot_be_subscribed() -> None:
    transport = AmqpTransport("amqp://localhost/")
    for bad in ["order.*", "#", "a.#.b"]:
        with pytest.raises(ConfigurationError):
            await transport.subscribe("g", [bad])


async def test_a_group_name_rabbitmq_refuses_in_a_queue_name_is_a_configuration_error(bus_url: str) -> None:
    """pamqp refused it with a bare ValueError ("Invalid value for queue") on subscribe, listing,
    replay and purge; a name it takes is still taken."""
    async with opened(bus_url) as bus:
        for bad in ["billing*", "façade", "a>b", "tab\there"]:
            with pytest.raises(ConfigurationError, match="has characters RabbitMQ does not take"):
                await bus.subscribe(bad, None)
            with pytest.raises(ConfigurationError, match="has characters RabbitMQ does not take"):
                await bus.dead_letters(bad)
        await bus.subscribe("billing v2:eu/1+a@b,c#d", None)


@pytest.mark.parametrize("prefix", ["shop*", "fa%C3%A7ade", "a%3Eb"])
def test_a_prefix_rabbitmq_refuses_in_a_name_is_a_configuration_error(prefix: str) -> None:
    """It starts every exchange and queue name: the connect failed with pamqp's bare
    ValueError ("Invalid value for exchange") before any queue name was checked."""
    with pytest.raises(ConfigurationError, match="has characters RabbitMQ does not take"):
        AmqpTransport(f"amqp://guest:guest@localhost/?prefix={prefix}")
    AmqpTransport("amqp://guest:guest@localhost/?prefix=shop:eu/1%2Ba@b,c%23d")


async def test_an_unreachable_broker_is_a_transport_error() -> None:
    with pytest.raises(TransportError):
        async with opened("amqp://guest:guest@127.0.0.1:1/"):
            pass


async def test_a_vhost_the_broker_does_not_have_is_a_transport_error_naming_it_and_the_brokers_reply() -> None:
    require_broker("amqp")
    vhost = f"choreograph-test-nosuch-{uuid.uuid4().hex[:12]}"
    url = urlunsplit(urlsplit(new_url())._replace(path=f"/{vhost}"))
    with pytest.raises(TransportError) as raised:
        await AmqpTransport(url).connect()
    message = str(raised.value)
    assert f"vhost {vhost!r}: 530 NOT_ALLOWED" in message, message
    assert "InvalidFrameError" not in message


async def test_a_wrong_password_is_a_transport_error_naming_the_user() -> None:
    require_broker("amqp")
    parts = urlsplit(new_url())
    user = parts.username or "guest"
    url = urlunsplit(parts._replace(netloc=f"{user}:not-{uuid.uuid4().hex}@{parts.hostname}:{parts.port or 5672}"))
    with pytest.raises(TransportError) as raised:
        await AmqpTransport(url).connect()
    message = str(raised.value)
    assert f"refused the login of user {unquote(user)!r}" in message and "ACCESS_REFUSED" in message, message


# -- queues and bindings ------------------------------------------------------------------------


async def _declare(url: str, queue: str, queue_type: str) -> None:
    connection = await aio_pika.connect(AmqpTransport(url)._client_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": queue_type})
    finally:
        await connection.close()


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_group_queues_have_the_queue_type_of_the_url(queue_type: str) -> None:
    """Re-declaring with the other type is refused by RabbitMQ: proof of the type it has."""
    require_broker("amqp")
    url = new_url(queue_type=queue_type)
    try:
        async with opened(url) as bus:
            await bus.subscribe("g", ["t"])
            await _declare(url, bus.names.group("g"), queue_type)
            other = "classic" if queue_type == "quorum" else "quorum"
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await _declare(url, bus.names.group("g"), other)
    finally:
        await broker.cleanup(url)


async def test_opening_a_bus_with_the_other_queue_type_is_a_transport_error_naming_it(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        await bus.subscribe("g", ["t"])
    with pytest.raises(TransportError, match="queue_type"):
        async with opened(bus_url + "&queue_type=classic"):
            pass


async def test_a_groups_types_are_the_union_of_its_registry_entries(bus_url: str) -> None:
    """Two subscribes racing (neither sees the entry the other holds) each write an entry;
    neither loses the other's types, and the next subscribe folds them into one."""
    async with opened(bus_url) as bus:
        await bus.subscribe("g", ["a"])
        raced = {"group": "g", "types": ["b"], "at": 0.0}  # older, as a racer's may be
        await bus._send(bus.names.registry, [outgoing(orjson.dumps(raced), "", "choreograph.group")])
        assert (await bus.groups())["g"] == frozenset({"a", "b"})
        await bus.subscribe("g", ["c"])
        async with bus._temp_channel("read the registry") as channel:
            _, held = await bus._read_registry(channel)
            assert len(held["g"]) == 1
        assert (await bus.groups())["g"] == frozenset({"a", "b", "c"})


# -- consuming ------------------------------------------------------------------------------------


async def test_prefetch_is_sized_to_the_fetch_so_a_competing_consumer_gets_the_rest(bus_url: str) -> None:
    async with opened(bus_url) as one, opened(bus_url) as two:
        small = await one.subscribe("g", ["t"])
        other = await two.subscribe("g", ["t"])
        await one.publish([msg(n, "t") for n in range(10)])
        held = await fetch_all(small, 2)
        rest = await fetch_all(other, 8)
        assert len(held) == 2 and len(rest) == 8
        assert {d.message.id for d in held + rest} == {f"m{n}" for n in range(10)}


async def test_ack_many_of_everything_outstanding_is_one_multiple_ack(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[int, bool]] = []
    original = aiormq.channel.Channel.basic_ack

    async def spy(
        self: aiormq.channel.Channel, delivery_tag: int, multiple: bool = False, wait: bool = True
    ) -> None:
        sent.append((delivery_tag, multiple))
        await original(self, delivery_tag, multiple=multiple, wait=wait)

    monkeypatch.setattr(aiormq.channel.Channel, "basic_ack", spy)
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(n, "t") for n in range(5)])
        got = await fetch_all(sub, 5)
        sent.clear()
        await sub.ack_many(got)
        assert sent == [(max(d.raw.delivery_tag or 0 for d in got), True)]  # type: ignore[attr-defined]
        assert await sub.fetch(10, timeout=0.5) == []


async def test_ack_many_of_a_scattered_batch_acks_only_those(bus_url: str) -> None:
    """A ``multiple`` ack is used only for a contiguous prefix: the others stay unacked."""
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(n, "t") for n in range(5)])
        got = await fetch_all(sub, 5)
        await sub.ack_many([got[1], got[3]])
        await sub.close()
        again = await fetch_all(await bus.subscribe("g", ["t"]), 3)
        assert sorted(d.message.id for d in again) == ["m0", "m2", "m4"]


async def test_a_late_ack_after_the_lease_expired_is_a_no_op_and_one_copy_remains(bus_url: str) -> None:
    async with opened(bus_url.replace("lease=30.0", "lease=0.5")) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t")])
        (first,) = await fetch_all(sub, 1)
        (second,) = await fetch_all(sub, 1)
        await first.ack()
        assert (first.attempt, second.attempt) == (1, 2)
        await second.ack()
        assert await sub.fetch(10, timeout=1.0) == []


async def test_a_consumer_that_stops_fetching_hands_back_even_what_it_never_handed_out(bus_url: str) -> None:
    """Pushed-but-unfetched messages have a lease too (attempt unchanged); handed-out ones get + 1."""
    url = bus_url.replace("lease=30.0", "lease=1.0")
    async with opened(url) as one, opened(url) as two:
        stalled = await one.subscribe("g", ["t"])
        await one.publish([msg(1, "t")])
        assert len(await fetch_all(stalled, 1)) == 1  # consuming with prefetch 2 from here on
        await stalled.fetch(2, timeout=0.01)
        await one.publish([msg(2, "t")])
        await _until(lambda: stalled._buffer.qsize() == 1, within=WAIT)  # m2 pushed to it, never fetched
        got = await fetch_all(await two.subscribe("g", ["t"]), 2)
        assert {d.message.id: d.attempt for d in got} == {"m1": 2, "m2": 1}


async def test_a_delayed_retry_waits_in_a_ttl_queue_named_for_its_bucket(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t")])
        (delivery,) = await fetch_all(sub, 1)
        await delivery.retry(0.3)
        connection = await aio_pika.connect(bus._client_url)
        try:
            channel = await connection.channel()
            await channel.get_queue(bus.names.retry("g", retry_bucket_ms(0.3)), ensure=True)
        finally:
            await connection.close()
        (again,) = await fetch_all(sub, 1)
        assert (again.message, again.attempt) == (delivery.message, 2)


async def test_dead_letters_keep_binary_bodies_and_records_of_any_value(bus_url: str) -> None:
    body = b"\n\x00binary\nwith newlines\xff"
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t", body)])
        (delivery,) = await fetch_all(sub, 1)
        await delivery.dead_letter({"reason": "rejected", "error": ValueError("bad\nline"), 3: "x" * 100_000})
        (letter,) = await bus.dead_letters("g")
        assert letter.message.body == body
        assert letter.record["reason"] == "rejected"
        assert letter.record["error"] == "bad\nline"
        assert len(letter.record["3"]) == 100_000


async def test_dead_letters_of_every_registered_group_are_listed(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        subs = [await bus.subscribe(group, ["t"]) for group in ("a", "b", "c")]
        await bus.publish([msg(1, "t")])
        for sub in subs[:2]:
            (delivery,) = await fetch_all(sub, 1)
            await delivery.dead_letter({"reason": "rejected"})
        assert sorted(letter.group for letter in await bus.dead_letters()) == ["a", "b"]
        assert sorted(await bus.groups()) == ["a", "b", "c"]


async def test_a_read_of_the_dead_letters_drops_an_ids_older_letters_from_the_queue(bus_url: str) -> None:
    """Both failed copies of an event published twice are stored (a queue cannot replace a
    message); the next read keeps the newer one and acks the older one away."""
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t")])
        await bus.publish([msg(1, "t"), msg(2, "t")])
        for n, delivery in enumerate(sorted(await fetch_all(sub, 3), key=lambda d: d.message.id), 1):
            await delivery.dead_letter({"reason": f"copy {n}"})
            await asyncio.sleep(0.01)
        assert await _queue_depth(bus, bus.names.dlq("g")) == 3
        letter = await bus.dead_letter("g", "m1")
        assert letter is not None and letter.record["reason"] == "copy 2"
        assert await _queue_depth(bus, bus.names.dlq("g")) == 2
        assert sorted((x.message.id, x.record["reason"]) for x in await bus.dead_letters("g")) == [
            ("m1", "copy 2"),
            ("m2", "copy 3"),
        ]


# -- losing consumers and connections -------------------------------------------------------------

_HOLDER = """
import asyncio, sys
from choreograph.transports.amqp import AmqpTransport

async def main():
    bus = AmqpTransport(sys.argv[1])
    await bus.connect()
    sub = await bus.subscribe("g", ["t"])
    (delivery,) = await sub.fetch(1, timeout=30)
    print(delivery.message.id, delivery.attempt, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _held_by_a_killed_process(url: str) -> tuple[str, int]:
    """Run a consumer process until it holds one delivery, SIGKILL it, return what it held."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER,
        url,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), WAIT)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    message_id, attempt = line.decode().split()
    return message_id, int(attempt)


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_a_killed_consumer_process_returns_its_delivery_at_once_with_the_next_attempt(
    queue_type: str,
) -> None:
    """No lease wait: RabbitMQ requeues when the socket closes; the attempt counts the lost one."""
    require_broker("amqp")
    url = new_url(queue_type=queue_type).replace("lease=30.0", "lease=600")
    try:
        async with opened(url) as bus:
            await bus.subscribe("g", ["t"])
            await bus.publish([msg(1, "t")])
            assert await _held_by_a_killed_process(url) == ("m1", 1)
            sub = await bus.subscribe("g", ["t"])
            (delivery,) = await fetch_all(sub, 1, wait=WAIT)
            assert (delivery.message.id, delivery.attempt) == ("m1", 2)
            await delivery.retry(0)
        if queue_type == "quorum":  # quorum queues count every loss, on top of the header
            assert await _held_by_a_killed_process(url) == ("m1", 3)
            async with opened(url) as bus:
                (delivery,) = await fetch_all(await bus.subscribe("g", ["t"]), 1)
                assert delivery.attempt == 4
    finally:
        await broker.cleanup(url)


class _Proxy:
    """A loopback TCP proxy to the shared broker that can cut every connection through it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.refusing = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy() -> AsyncIterator[_Proxy]:
    require_broker("amqp")
    parts = AmqpTransport(broker.url("x", lease=1))
    assert parts._where
    host, port = parts._where.rsplit(":", 1)
    running = _Proxy(host, int(port))
    await running.start()
    yield running
    await running.stop()


async def test_a_cut_connection_reconnects_and_the_consumer_resumes_without_duplicates(
    proxy: _Proxy, bus_url: str
) -> None:
    proxied = bus_url.replace(":5672/", f":{proxy.port}/")
    async with opened(proxied) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t"), msg(2, "t")])
        (held,) = await fetch_all(sub, 1)  # m2 waits in the client's buffer
        proxy.cut()
        await _until(lambda: live_channel(held.raw) is None, within=WAIT)  # the client noticed
        await held.ack()  # its channel is gone: the broker has already taken it back
        assert held.settled
        await bus.publish([msg(3, "t")])  # waits for the reconnect
        got = await fetch_all(sub, 3)
        assert sorted(d.message.id for d in got) == ["m1", "m2", "m3"]
        assert {d.message.id: d.attempt for d in got}["m1"] == 2
        await sub.ack_many(got)
        assert await sub.fetch(10, timeout=1.0) == []


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_a_consumer_the_broker_cancels_consumes_again_once_its_queue_is_back(queue_type: str) -> None:
    """RabbitMQ cancels a consumer itself (``basic.cancel`` from the server) when its queue is
    deleted or a quorum queue loses its leader. The subscription must consume again, not sit
    idle for ever: aio-pika before 10.2 only logged "cancelled by the broker"."""
    require_broker("amqp")
    url = new_url(queue_type=queue_type)
    try:
        async with opened(url) as bus:
            sub = await bus.subscribe("g", ["t"])
            assert isinstance(sub, AmqpSubscription)
            await bus.publish([msg(1, "t")])
            await sub.ack_many(await fetch_all(sub, 1))  # consuming now
            cancelled = asyncio.Event()
            underlay = await sub._channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda frame: cancelled.set())
            connection = await aio_pika.connect(bus._client_url)
            try:
                channel = await connection.channel()
                await channel.queue_delete(bus.names.group("g"))
                # a quorum queue's cancel comes after the delete-ok; declaring the queue again
                # before it has reached the consumer's channel leaves RabbitMQ 3.10 a ghost consumer
                await asyncio.wait_for(cancelled.wait(), WAIT)
                queue = await channel.declare_queue(
                    bus.names.group("g"), durable=True, arguments=bus._queue_args()
                )
                await queue.bind(bus.names.exchange, "t")  # back as the group subscribing again leaves it
            finally:
                await connection.close()
            await bus.publish([msg(2, "t")])
            got = await fetch_all(sub, 1)  # the same prefetch: no new consumer of its own
            assert [d.message.id for d in got] == ["m2"]
            await sub.ack_many(got)
    finally:
        await broker.cleanup(url)


async def test_operations_wait_for_a_lost_broker_then_fail_with_a_transport_error(
    proxy: _Proxy, bus_url: str
) -> None:
    proxied = bus_url.replace(":5672/", f":{proxy.port}/")
    async with opened(proxied) as bus:
        bus.ready_timeout = 1.0
        sub = await bus.subscribe("g", ["t"])
        proxy.refusing = True
        proxy.cut()
        with pytest.raises(TransportError):
            await bus.publish([msg(1, "t")])
        proxy.refusing = False
        await bus.publish([msg(2, "t")])
        bus.ready_timeout = WAIT
        assert [d.message.id for d in await fetch_all(sub, 1)] == ["m2"]


# -- a verb that failed, called again; a verb that can never succeed -------------------------


async def _queue_depth(bus: AmqpTransport, queue: str) -> int:
    """How many messages ``queue`` holds (0 if it was never declared)."""
    connection = await aio_pika.connect(bus._client_url)
    try:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


def _failing_send_once(bus: AmqpTransport, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the next publish of a copy (retry or dead letter) go unconfirmed; returns the queues sent to."""
    real = bus._send
    sent: list[str] = []

    async def failing_once(queue: str, messages: Sequence[aio_pika.Message]) -> None:
        sent.append(queue)
        if len(sent) == 1:
            raise TransportError(f"amqp: publish to queue {queue}: the broker did not confirm it")
        await real(queue, messages)

    monkeypatch.setattr(bus, "_send", failing_once)
    return sent


async def test_a_dead_letter_whose_copy_was_not_confirmed_is_stored_by_a_second_call(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The original stays held (not handed back to the queue, where the handler would run
    again) until the worker's settle retry stores the dead letter."""
    lease = second_call.lease_for("dead_letter")
    async with opened(bus_url.replace("lease=30.0", f"lease={lease}")) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t")])
        (delivery,) = await fetch_all(sub, 1)
        sent = _failing_send_once(bus, monkeypatch)
        await second_call.check_a_second_call_does_the_work(bus, sub, delivery, "dead_letter", TransportError)
        assert sent == [bus.names.dlq("g")] * 2
        # the lease is the client's: an original never acked would not come back while the
        # channel is open, so look at the books too
        assert isinstance(sub, AmqpSubscription)
        assert not sub._out and not any(sub._unacked.values())


async def test_a_delayed_retry_whose_copy_was_not_confirmed_is_published_by_a_second_call(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The original is not handed back to the queue at once (a retry sooner than asked): the
    worker's settle retry publishes the delayed copy, attempt + 1, and acks the original."""
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t")])
        (delivery,) = await fetch_all(sub, 1)
        sent = _failing_send_once(bus, monkeypatch)
        with pytest.raises(TransportError):
            await delivery.retry(60)
        assert not delivery.settled
        await delivery.retry(60)  # what the worker's settle retry does
        assert delivery.settled
        retry_queue = bus.names.retry("g", retry_bucket_ms(60))
        assert sent == [retry_queue] * 2
        assert await _queue_depth(bus, retry_queue) == 1
        assert await sub.fetch(10, timeout=1.0) == []  # neither handed back nor left unacked
        assert isinstance(sub, AmqpSubscription)
        assert not sub._out and not any(sub._unacked.values())  # the original was acked


@pytest.mark.parametrize("verb", second_call.VERBS)
async def test_a_verb_on_a_delivery_whose_channel_closed_returns_and_the_broker_redelivers_it(
    proxy: _Proxy, bus_url: str, verb: str
) -> None:
    """A delivery tag dies with its channel, and the broker takes the message back: no call can
    settle it any more. So the verb returns (raising, the worker would call it again for ever),
    publishes no copy (that would be a second one), and the broker's redelivery is what comes back."""
    proxied = bus_url.replace(":5672/", f":{proxy.port}/")
    async with opened(proxied) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t")])
        (held,) = await fetch_all(sub, 1)
        proxy.cut()
        await _until(lambda: live_channel(held.raw) is None, within=WAIT)  # the client noticed
        await second_call.call(held, verb)
        assert held.settled
        await second_call.call(held, verb)  # settled: a no-op
        (again,) = await fetch_all(sub, 1)  # after the reconnect
        assert (again.message.id, again.attempt) == ("m1", 2)
        await again.ack()
        assert await sub.fetch(10, timeout=1.0) == []  # no copy in the group's queue
        assert await bus.dead_letters("g") == []


async def test_a_lease_that_runs_out_after_the_connection_dropped_hands_back_no_second_copy(
    proxy: _Proxy, bus_url: str
) -> None:
    """The connection drops while a handler holds a delivery, and the handler outlives the lease.
    The broker already took the message back when the channel closed and redelivers it; the
    lease expiry must not publish a copy of its own as well (two of one message in the queue)."""
    proxied = bus_url.replace(":5672/", f":{proxy.port}/").replace("lease=30.0", "lease=1.0")
    async with opened(proxied) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t")])
        (held,) = await fetch_all(sub, 1)
        proxy.cut()
        await _until(lambda: live_channel(held.raw) is None, within=WAIT)  # the client noticed
        await _until(lambda: held.settled, within=WAIT)  # the lease ran out on the dead delivery
        await bus.publish([])  # waits for the reconnect
        (again,) = await fetch_all(sub, 1)
        assert (again.message.id, again.attempt) == ("m1", 2)
        await again.ack()
        assert await sub.fetch(10, timeout=2.0) == []  # no second copy in the group's queue


class Pinged(Event, type="test.amqp.pinged"):
    n: int


async def test_a_retry_whose_connection_dropped_during_the_handler_does_not_hold_up_the_worker(
    proxy: _Proxy, bus_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection drops while a handler runs and the handler asks for a retry: the worker's
    settle step returns (no error, no retry of it, nothing unsettled at stop) and publishes no
    delayed copy; the broker's redelivery is the next attempt, which succeeds and is acked."""
    proxied = bus_url.replace(":5672/", f":{proxy.port}/")
    attempts: list[int] = []
    service = Service("retrier")
    caplog.set_level("WARNING")
    async with opened(proxied) as bus, opened(bus_url) as direct:  # publishing is not cut

        @service.on(Pinged)
        async def ping(event: Pinged, ctx: Context) -> None:
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                proxy.cut()
                (sub,) = bus._subscriptions
                await _until(lambda: all(live_channel(d.raw) is None for d in sub._out), within=WAIT)
                raise Retry("later", after=60)

        async with Worker([service], bus):
            await Publisher(direct).publish(Pinged(n=1))
            await _until(lambda: attempts == [1, 2], within=WAIT)
        assert await _queue_depth(bus, bus.names.retry("retrier", retry_bucket_ms(60))) == 0
        again = await bus.subscribe("retrier", [Pinged.event_type()])
        assert await again.fetch(10, timeout=1.0) == []  # attempt 2 was acked
    worker_trouble = [r.getMessage() for r in caplog.records if r.name == "choreograph.worker"]
    assert not [line for line in worker_trouble if "settling" in line or "unsettled" in line]


@pytest.mark.parametrize("how", ["ack", "ack_many"])
async def test_an_ack_whose_caller_is_cancelled_still_goes_out(bus_url: str, how: str) -> None:
    """The tags leave the consumer's books before their acks are sent; a caller cancelled in
    between (the worker's stop, say) used to leave the message unacked on its channel, holding
    a prefetch slot and redelivered as a duplicate when the channel closed."""
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([msg(1, "t")])
        (held,) = await fetch_all(sub, 1)
        acking = asyncio.ensure_future(held.ack() if how == "ack" else sub.ack_many([held]))
        await asyncio.sleep(0)  # into the ack, past the books
        acking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acking
        await sub.close()
    async with opened(bus_url) as bus:  # a new connection: anything unacked is back by now
        sub = await bus.subscribe("g", ["t"])
        assert await sub.fetch(10, timeout=1.0) == []


async def test_a_fetch_cancelled_while_it_tops_up_its_batch_hands_back_what_it_took_unchanged(
    bus_url: str,
) -> None:
    """A fetch is cancel-safe: cancelled (the worker's stop cancels its fetch loop) after it took
    messages from the buffer but before it returned them, it delivered nothing, so what it took
    goes back as never handed out - its attempt unchanged - not as a delivery the consumer
    failed to settle (attempt + 1 at close, one attempt of the retry policy spent unseen)."""
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        assert isinstance(sub, AmqpSubscription)
        await sub._ensure_consuming(10)
        await bus.publish([msg(1, "t"), msg(2, "t")])
        await _until(lambda: sub._buffer.qsize() == 2, within=WAIT)
        fetching = asyncio.ensure_future(sub.fetch(10, timeout=5))
        await asyncio.sleep(0)  # the fetch took both and gives the socket a turn to top up the batch
        fetching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fetching
        assert fetching.cancelled()
        got = await fetch_all(sub, 2)  # the same subscription fetches them next, in order
        assert [(d.message.id, d.attempt) for d in got] == [("m1", 1), ("m2", 1)]
        await got[1].ack()
        await sub.close()  # m1 unsettled: back with the next attempt
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        assert [(d.message.id, d.attempt) for d in await fetch_all(sub, 1)] == [("m1", 2)]
        assert await sub.fetch(10, timeout=1.0) == []


async def test_connect_without_create_refuses_a_bus_the_broker_lacks_creates_nothing_and_opens_one_it_has(
    bus_url: str,
) -> None:
    from tests.cli.test_existing_bus_cli import amqp_names

    missing = AmqpTransport(bus_url)
    with pytest.raises(ConfigurationError, match=r"^no RabbitMQ bus with prefix 'choreograph-test-[\w-]+' at broker URL"):
        await missing.connect(create=False)
    await missing.close()
    assert await amqp_names(bus_url) == []
    async with opened(bus_url):
        existing = AmqpTransport(bus_url)
        await existing.connect(create=False)
        await existing.publish([Message("m1", "t", b"{}")])
        await existing.close()


async def test_ping_asks_the_broker_and_fails_once_the_bus_is_deleted(bus_url: str) -> None:
    """A passive declare of the exchange on the publishing channel was answered from aio-pika's
    cache: ping said "ready" to a broker it never asked (the gateway's /readyz relies on it)."""
    async with AmqpTransport(bus_url) as bus:
        await bus.ping()
        async with bus._temp_channel("delete the registry") as channel:
            await channel.queue_delete(bus.names.registry)
        with pytest.raises(TransportError):
            await bus.ping()


async def test_losing_and_regaining_the_broker_is_logged_by_the_transport(
    bus_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aio-pika's own reconnect lines are silenced by the CLI: the transport says it in its own."""
    caplog.set_level(logging.INFO, logger="choreograph.transports.amqp")

    def lines() -> list[tuple[str, str]]:  # (aio-pika's records may fail to format: not read)
        return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "choreograph.transports.amqp"]

    async with opened(bus_url) as bus:
        connection = bus._connection
        assert connection is not None and connection.transport is not None
        await connection.transport.connection.close(ConnectionResetError("dropped by the test"))
        await _until(lambda: any("reconnected to" in message for _, message in lines()), WAIT)
        await bus.publish([msg(1)])  # and it works again
    where = bus._where
    # The reason is aio-pika's: on a loaded machine its close callback sometimes comes without
    # the exception, and the line says "closed by the broker" instead.
    reasons = ("dropped by the test", "closed by the broker")
    assert lines() in ([("WARNING", f"amqp: lost the connection to {where} ({reason}); reconnecting"),
                        ("INFO", f"amqp: reconnected to {where}")] for reason in reasons)  # closing is not a loss


class _WithoutMessageId(pamqp.commands.Basic.Properties):
    """Properties that stay without ``message_id``: aiormq sets a random one on every publish
    that lacks it, other clients do not."""

    @property  # type: ignore[override]
    def message_id(self) -> None:
        return None

    @message_id.setter
    def message_id(self, value: str | None) -> None:
        pass


async def test_dead_letters_of_messages_published_without_an_id_get_a_stable_id_to_show_replay_and_purge(
    bus_url: str,
) -> None:
    """An outside publisher's messages without ``message_id``: each dead letter gets the
    CloudEvents ``id`` of its body, else ``sha256:<hex>`` of the body, on every read."""
    cloud_event = orjson.dumps({"specversion": "1.0", "id": "ce-1", "type": "t", "source": "/x"})
    opaque = b"not json"
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["t"])
        connection = await aio_pika.connect(bus._client_url)
        try:
            channel = await connection.channel()
            for body in (cloud_event, opaque):
                await (await channel.get_underlay_channel()).basic_publish(
                    body, exchange=bus.names.exchange, routing_key="t", properties=_WithoutMessageId(message_type="t")
                )
        finally:
            await connection.close()
        for delivery in await fetch_all(sub, 2):
            await delivery.dead_letter({"why": "test"})
        hashed = "sha256:" + hashlib.sha256(opaque).hexdigest()
        letters = await bus.dead_letters("g")
        assert sorted(letter.message.id for letter in letters) == sorted(["ce-1", hashed])
        assert sorted(letter.message.id for letter in await bus.dead_letters("g")) == ["ce-1", hashed]
        shown = await bus.dead_letter("g", hashed)
        assert shown is not None and shown.message.body == opaque
        assert await bus.replay("g", [hashed]) == 1
        (again,) = await fetch_all(sub, 1)
        assert again.message.body == opaque
        await again.ack()
        assert await bus.purge("g", ["ce-1"]) == 1
        assert await bus.dead_letters("g") == []


async def test_a_dead_letter_stored_without_an_id_is_read_with_the_id_of_its_body(bus_url: str) -> None:
    """A letter in the dead-letter queue without ``message_id`` (stored by a client that
    mints none) is listed, shown and purged by ``sha256:<hex>`` of its original body."""
    async with opened(bus_url) as bus:
        await bus.subscribe("g", ["t"])
        connection = await aio_pika.connect(bus._client_url)
        try:
            channel = await (await connection.channel()).get_underlay_channel()
            for body in (b"first", b"second"):
                await channel.basic_publish(
                    b'{"why": "test"}\n' + body,
                    routing_key=bus.names.dlq("g"),
                    properties=_WithoutMessageId(message_type="t", delivery_mode=2),
                )
        finally:
            await connection.close()
        first, second = ("sha256:" + hashlib.sha256(body).hexdigest() for body in (b"first", b"second"))
        assert sorted(letter.message.id for letter in await bus.dead_letters("g")) == sorted([first, second])
        shown = await bus.dead_letter("g", second)
        assert shown is not None and shown.message.body == b"second"
        assert await bus.purge("g", [first]) == 1
        assert [letter.message.id for letter in await bus.dead_letters("g")] == [second]
