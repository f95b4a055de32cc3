"""The Redis Streams transport: behaviour specific to it, plus the contract clauses it implements itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS

from choreograph.errors import ConfigurationError, TransportClosed, TransportError
from choreograph.transports import _redis_consumer, open_transport
from choreograph.transports._redis_consumer import RedisDelivery, RedisSubscription
from choreograph.transports.base import Delivery, Message, Subscription
from choreograph.transports.redis import RedisTransport
from tests._brokers import require_broker
from tests.conformance.brokers import redis as broker
from tests.transports import _second_call as second_call


def msg(n: int, type_: str = "order.placed", body: bytes = b"{}") -> Message:
    return Message(id=f"m{n}", type=type_, body=body)


def shared_bus_url() -> str:
    """A fresh bus (its own key prefix) on the shared server."""
    base = require_broker("redis")
    return f"{base}{'&' if '?' in base else '?'}lease=30&prefix=choreograph-test-{uuid.uuid4().hex}"


@pytest.fixture
async def bus_url() -> AsyncIterator[str]:
    url = shared_bus_url()
    yield url
    await broker.cleanup(url)


@contextlib.asynccontextmanager
async def opened(url: str, **params: str) -> AsyncIterator[RedisTransport]:
    if params:  # replacing the URL's own (a parameter given twice is refused)
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params] + list(params.items())
        url = urlunsplit(parts._replace(query=urlencode(query)))
    transport = RedisTransport(url)
    async with transport:
        yield transport


async def fetch_all(sub: Subscription, expected: int, wait: float = 5.0) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < expected:
        batch = await sub.fetch(expected - len(got), timeout=wait)
        if not batch:
            break
        got += batch
    return got


# -- URL ---------------------------------------------------------------------------------


def test_url_parameters_configure_the_transport_and_are_hidden_from_redis_py() -> None:
    transport = RedisTransport("redis://127.0.0.1:6379/2?lease=7.5&prefix=shop&maxlen=10&client_name=x")
    assert (transport.lease, transport.prefix, transport.maxlen) == (7.5, "shop", 10)
    assert transport._client_url == "redis://127.0.0.1:6379/2?client_name=x"


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("lease=0.0004", "lease=0.0004 is under 1 ms"),  # rounded to 0 ms: every fetch claimed every delivery
        ("lease=0.0009", "lease=0.0009 is under 1 ms"),
        ("lease=1e16", "lease=1e+16 is over 9223372036854774 s"),  # the first fetch failed at XAUTOCLAIM
        ("lease=1e300", "lease=1e+300 is over 9223372036854774 s"),
        ("socket_keepalive=maybe", "socket_keepalive='maybe' is not true or false"),  # read as true
        ("retry_on_timeout=nope", "retry_on_timeout='nope' is not true or false"),
        ("socket_keepalive=", "socket_keepalive='' is not true or false"),  # ignored: the default applied
        ("prefix=", "prefix is empty"),  # the default prefix's keys: the default bus
        ("prefix=shop&prefix=", "parameter 'prefix' is given more than once"),  # the last one was read: empty
        ("maxlen=", "maxlen='' is not an integer"),  # read as 0: unbounded
        ("protocol=3", "protocol='3': the transport speaks RESP2 only"),  # dropped: RESP2 all the same
        ("socket_timeout=nan", "socket_timeout='nan' must be > 0"),  # a ValueError traceback at connect
        ("socket_timeout=0", "socket_timeout='0' must be > 0"),  # "Timeout reading from 127.0.0.1:6379"
        ("socket_connect_timeout=-1", "socket_connect_timeout='-1' must be > 0"),
        ("socket_read_size=0", "socket_read_size='0' must be > 0"),  # "Connection closed by server"
        ("health_check_interval=-5", "health_check_interval='-5' must be >= 0"),  # "unknown subcommand 'SETINFO'"
        ("db=-1", "db='-1' must be >= 0"),
        ("protocol=", "protocol='': the transport speaks RESP2 only"),
        ("socket_timeout=", "socket_timeout is empty"),  # dropped by redis-py: no timeout
        ("client_name=", "client_name is empty"),
    ],
)
def test_a_url_parameter_redis_would_misread_is_refused_naming_it(query: str, needle: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        RedisTransport(f"redis://127.0.0.1:6379/0?{query}")
    assert needle in str(raised.value)


@pytest.mark.parametrize("word", ["true", "False", "1", "0", "yes", "NO", "on", "off"])
def test_a_switch_redis_py_reads_is_accepted(word: str) -> None:
    RedisTransport(f"redis://127.0.0.1:6379/0?socket_keepalive={word}&retry_on_timeout={word}")


@pytest.mark.parametrize(
    "query", ["socket_timeout=0.5", "socket_timeout=inf", "health_check_interval=0", "max_connections=0", "db=0"],
)
def test_numbers_redis_py_reads_are_accepted(query: str) -> None:
    RedisTransport(f"redis://127.0.0.1:6379/0?{query}")


def test_protocol_2_is_accepted() -> None:
    assert RedisTransport("redis://127.0.0.1:6379/0?protocol=2")._client_url == "redis://127.0.0.1:6379/0"


def test_a_lease_of_one_millisecond_is_kept_in_milliseconds() -> None:
    assert RedisTransport("redis://127.0.0.1:6379/0?lease=0.001").lease == 0.001


def test_the_default_prefix_is_choreograph() -> None:
    assert RedisTransport("redis://127.0.0.1:6379/0").prefix == "choreograph"


@pytest.mark.parametrize("query", ["maxlen=lots", "maxlen=-1", "lease=0"])
def test_bad_url_parameters_are_configuration_errors(query: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisTransport(f"redis://127.0.0.1:6379/0?{query}")


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("prefix=x&bogus=1", "unknown parameter(s) bogus;"),
        ("prefx=shop", "prefx (did you mean prefix?)"),
        ("db=two", "Invalid value for 'db'"),
    ],
)
def test_a_url_parameter_redis_py_would_not_take_is_a_configuration_error_at_construction(
    query: str, needle: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        RedisTransport(f"redis://127.0.0.1:6379/0?{query}")
    assert needle in str(raised.value)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://127.0.0.1:6379/1O", "database '1O'"),  # redis-py used database 0
        ("rediss://127.0.0.1:6379/x?prefix=p", "database 'x'"),
        ("redis://127.0.0.1:6379/0?decode_responses=true", "decode_responses"),  # deliveries came empty
        ("redis://127.0.0.1:6379/0?decode_responses=false", "decode_responses"),  # read as "false": on
    ],
)
def test_a_url_redis_py_would_misread_is_a_configuration_error_naming_what(url: str, needle: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        RedisTransport(url)
    assert needle in str(raised.value)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/x?db=2"],
)
def test_database_paths_redis_py_reads_are_accepted(url: str) -> None:
    RedisTransport(url)


@pytest.mark.parametrize("base", ["redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6379/0", "unix:///tmp/r.sock"])
def test_a_url_parameter_is_refused_exactly_when_redis_py_would_refuse_it(base: str) -> None:
    """Every name redis-py parses from a URL, plus a few plain keyword arguments and a typo:
    ours refuses one iff redis-py's connection class raises TypeError for it."""
    values = {"ssl_cert_reqs": "none", "ssl_include_verify_flags": "VERIFY_X509_STRICT",
              "ssl_exclude_verify_flags": "VERIFY_X509_STRICT", "retry_on_error": "ConnectionError"}
    names = {*URL_QUERY_ARGUMENT_PARSERS, "client_name", "ssl_cert_reqs", "path", "bogus"} - {"protocol"}
    for name in sorted(names):
        url = f"{base}?{name}={values.get(name, '1')}"
        try:
            aioredis.Redis.from_url(url).connection_pool.make_connection()
            redis_py_refuses = False
        except (TypeError, ValueError):  # a name it does not take, or a value it cannot parse
            redis_py_refuses = True
        try:
            RedisTransport(url)
            we_refuse = False
        except ConfigurationError:
            we_refuse = True
        assert we_refuse == redis_py_refuses, url


def test_open_transport_selects_redis_for_redis_and_rediss_urls() -> None:
    assert isinstance(open_transport("redis://127.0.0.1/0"), RedisTransport)
    assert isinstance(open_transport("rediss://127.0.0.1/0"), RedisTransport)


async def test_an_unreachable_server_is_a_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once the socket closes
    with pytest.raises(TransportError):
        await RedisTransport(f"redis://127.0.0.1:{port}/0").connect()


async def test_a_connect_that_finishes_after_close_closes_its_client(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close()`` while a connect was under way found no client to close; the connect then
    installed its client on the closed transport, its connection open, nobody left to close it."""
    import redis.asyncio as aioredis

    transport = RedisTransport(bus_url)
    pinged, closing, go_on = asyncio.Event(), asyncio.Event(), asyncio.Event()
    clients: list[aioredis.Redis] = []
    real_ping = aioredis.Redis.ping

    async def held_ping(self: aioredis.Redis, **kwargs: Any) -> Any:
        answer = await real_ping(self, **kwargs)
        clients.append(self)
        pinged.set()
        await go_on.wait()  # close() runs here, while the connect is under way
        return answer

    class Drained(asyncio.Event):
        async def wait(self) -> Literal[True]:
            closing.set()  # close() waits for the connect's ping, the operation in flight
            return await super().wait()

    monkeypatch.setattr(aioredis.Redis, "ping", held_ping)
    transport._drained = Drained()
    connecting = asyncio.ensure_future(transport.connect())
    closed = None
    try:
        await asyncio.wait_for(pinged.wait(), 10)
        closed = asyncio.ensure_future(transport.close())
        await asyncio.wait_for(closing.wait(), 10)
        go_on.set()
        with pytest.raises(TransportClosed):
            await connecting
        await closed
        [client] = clients
        pool = client.connection_pool
        assert not any(conn.is_connected for conn in [*pool._available_connections, *pool._in_use_connections])
        assert transport._client is None
    finally:
        go_on.set()
        await asyncio.gather(connecting, *([closed] if closed else []), return_exceptions=True)
        for client in clients:
            await client.aclose()


async def test_two_connects_at_once_keep_one_client_and_close_the_other(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both found no client and made one; the second installed replaced the first, which
    ``close()`` never closed (its connection open until the process ended)."""
    import redis.asyncio as aioredis

    transport = RedisTransport(bus_url)
    both_pinged, go_on = asyncio.Event(), asyncio.Event()
    clients: list[aioredis.Redis] = []
    real_ping = aioredis.Redis.ping

    async def held_ping(self: aioredis.Redis, **kwargs: Any) -> Any:
        answer = await real_ping(self, **kwargs)
        clients.append(self)
        if len(clients) == 2:
            both_pinged.set()
        await go_on.wait()  # both connects are under way
        return answer

    monkeypatch.setattr(aioredis.Redis, "ping", held_ping)
    connects = [asyncio.ensure_future(transport.connect()) for _ in range(2)]
    try:
        await asyncio.wait_for(both_pinged.wait(), 10)
        go_on.set()
        await asyncio.gather(*connects)
        await transport.close()
        for client in clients:
            pool = client.connection_pool
            assert not any(conn.is_connected for conn in [*pool._available_connections, *pool._in_use_connections])
    finally:
        go_on.set()
        await asyncio.gather(*connects, return_exceptions=True)
        await transport.close()
        for client in clients:
            await client.aclose()


async def test_a_closed_transport_refuses_to_publish(bus_url: str) -> None:
    transport = RedisTransport(bus_url)
    await transport.connect()
    await transport.close()
    with pytest.raises(TransportClosed):
        await transport.publish([msg(1)])


# -- routing and consuming ---------------------------------------------------------------


async def test_prefixes_isolate_buses_on_one_server(bus_url: str) -> None:
    other = shared_bus_url()
    try:
        async with opened(bus_url) as one, opened(other) as two:
            mine = await one.subscribe("billing", None)
            theirs = await two.subscribe("billing", None)
            await one.publish([msg(1)])
            assert [d.message.id for d in await mine.fetch(10, timeout=5)] == ["m1"]
            assert await theirs.fetch(10, timeout=0.2) == []
    finally:
        await broker.cleanup(other)


async def test_each_group_gets_its_own_copy_and_only_of_its_types(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        orders = await bus.subscribe("orders", ["order.placed"])
        everything = await bus.subscribe("journal", None)
        await bus.publish([msg(1), msg(2, "payment.done")])
        assert [d.message.id for d in await fetch_all(orders, 1)] == ["m1"]
        assert sorted(d.message.id for d in await fetch_all(everything, 2)) == ["m1", "m2"]
        assert await orders.fetch(10, timeout=0.2) == []


async def test_consumers_of_one_group_in_different_processes_split_the_messages(bus_url: str) -> None:
    async with opened(bus_url) as one, opened(bus_url) as two:
        first = await one.subscribe("workers", None)
        second = await two.subscribe("workers", None)
        await one.publish([msg(n) for n in range(10)])
        a = await first.fetch(4, timeout=5)
        b = await fetch_all(second, 10 - len(a))
        ids = [d.message.id for d in a + b]
        assert sorted(ids) == sorted(f"m{n}" for n in range(10))  # each exactly once


async def test_fetch_returns_the_first_message_without_waiting_to_fill_the_batch(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        waiting = asyncio.create_task(sub.fetch(100, timeout=None))
        await asyncio.sleep(0.1)
        await bus.publish([msg(1)])
        got = await asyncio.wait_for(waiting, timeout=10)
        assert [(d.message.id, d.attempt) for d in got] == [("m1", 1)]


async def test_a_message_survives_byte_for_byte_up_to_one_mebibyte(bus_url: str) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, every byte value
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        await bus.publish([Message(id="big", type="blob", body=body)])
        [delivery] = await sub.fetch(1, timeout=5)
        assert delivery.message == Message(id="big", type="blob", body=body)


async def test_an_entry_without_our_fields_is_still_delivered_so_the_runtime_can_dead_letter_it(
    bus_url: str,
) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        entry = await bus._redis.xadd(bus._keys("g")[0], {"junk": "1"})
        [delivery] = await sub.fetch(1, timeout=5)
        assert (delivery.message.id, delivery.message.body, delivery.attempt) == (entry.decode(), b"", 1)
        await delivery.dead_letter({"reason": "malformed"})
        assert [d.record for d in await bus.dead_letters("g")] == [{"reason": "malformed"}]


async def test_a_group_whose_keys_vanished_is_registered_again_and_keeps_consuming(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        await bus._redis.delete(bus._keys("g")[0])
        await bus.publish([msg(1)])  # the registry survives: routed to a stream with no group yet
        assert [d.message.id for d in await sub.fetch(1, timeout=5)] == ["m1"]


# -- settling ----------------------------------------------------------------------------


async def test_ack_deletes_the_entry_so_the_stream_holds_only_the_backlog(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        await bus.publish([msg(n) for n in range(5)])
        got = await fetch_all(sub, 5)
        await sub.ack_many(got[:4])
        assert await bus._redis.xlen(bus._keys("g")[0]) == 1
        await got[4].ack()
        assert await bus._redis.xlen(bus._keys("g")[0]) == 0


async def test_retry_redelivers_with_the_next_attempt_no_sooner_than_asked(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        [first] = await sub.fetch(1, timeout=5)
        await first.retry(after=60)
        assert await sub.fetch(1, timeout=0.3) == []  # parked in the delayed set
        await bus._redis.zadd(
            bus._keys("g")[1], {m: 0 for m in await bus._redis.zrange(bus._keys("g")[1], 0, -1)}
        )
        [second] = await sub.fetch(1, timeout=5)  # due now: moved back by the consumer itself
        assert (second.message, second.attempt) == (first.message, 2)
        await second.retry(after=0)
        [third] = await sub.fetch(1, timeout=5)
        assert third.attempt == 3


async def test_an_expired_lease_redelivers_to_another_consumer_and_voids_the_late_verb(bus_url: str) -> None:
    async with opened(bus_url, lease="0.5") as crashed, opened(bus_url, lease="0.5") as survivor:
        slow = await crashed.subscribe("g", None)
        other = await survivor.subscribe("g", None)
        await crashed.publish([msg(1)])
        [lost] = await slow.fetch(1, timeout=5)
        [again] = await other.fetch(1, timeout=5)
        assert (again.message.id, again.attempt) == ("m1", 2)
        await lost.retry(after=0)  # too late: the lease moved on, so this must not duplicate
        await lost.dead_letter({"reason": "late"})
        assert await crashed.dead_letters("g") == []
        await again.ack()
        assert await other.fetch(1, timeout=1.0) == []


async def test_subscribing_forgets_consumer_names_that_crashed_processes_left_empty(bus_url: str) -> None:
    async with opened(bus_url, lease="0.5") as crashed, opened(bus_url, lease="0.5") as survivor:
        await survivor.publish([msg(1)])  # nobody subscribed yet: routed nowhere
        lost_sub = await crashed.subscribe("g", None)
        await survivor.publish([msg(2)])
        await lost_sub.fetch(1, timeout=5)  # held and never settled: the process "crashed"
        [taken] = await (await survivor.subscribe("g", None)).fetch(1, timeout=5)  # after the lease
        await taken.ack()

        async def consumers() -> set[str]:
            info = await survivor._redis.xinfo_consumers(survivor._keys("g")[0], "g")
            return {c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in info}

        assert crashed.consumer in await consumers()
        await asyncio.sleep(0.6)  # the crashed name, holding nothing, idles past a lease
        await survivor.subscribe("g", None)
        assert crashed.consumer not in await consumers()


async def test_touch_keeps_a_delivery_from_being_redelivered(bus_url: str) -> None:
    async with opened(bus_url, lease="2") as busy, opened(bus_url, lease="2") as idle:
        working = await busy.subscribe("g", None)
        waiting = await idle.subscribe("g", None)
        await busy.publish([msg(1)])
        [delivery] = await working.fetch(1, timeout=5)

        async def keep_touching() -> None:
            for _ in range(12):
                await asyncio.sleep(0.3)
                await delivery.touch()

        toucher = asyncio.create_task(keep_touching())
        assert await waiting.fetch(1, timeout=3.0) == []  # 3 s > lease: only touch kept it
        await toucher
        [redelivered] = await waiting.fetch(1, timeout=10)  # touching stopped: the lease runs out
        assert redelivered.attempt == 2


async def test_closing_a_subscription_hands_its_unsettled_deliveries_on_at_once(bus_url: str) -> None:
    async with opened(bus_url) as leaving, opened(bus_url) as staying:  # lease 30 s
        going = await leaving.subscribe("g", None)
        other = await staying.subscribe("g", None)
        await leaving.publish([msg(1), msg(2)])
        taken = await fetch_all(going, 2)
        await taken[0].ack()
        await going.close()
        [handed_on] = await other.fetch(10, timeout=5)
        assert (handed_on.message.id, handed_on.attempt) == (taken[1].message.id, 2)
        with pytest.raises(TransportClosed):
            await going.fetch(1, timeout=0)


async def test_cancelling_a_waiting_fetch_is_prompt(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        task = asyncio.create_task(sub.fetch(10, timeout=None))
        await asyncio.sleep(0.2)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=3)  # generous bound; a blocking read is <= 0.5 s
        assert done and task.cancelled()


async def test_closing_the_transport_ends_a_waiting_fetch(bus_url: str) -> None:
    bus = RedisTransport(bus_url)
    await bus.connect()
    sub = await bus.subscribe("g", None)
    task = asyncio.create_task(sub.fetch(10, timeout=None))
    await asyncio.sleep(0.2)
    await bus.close()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(task, timeout=3)


async def test_what_a_waiting_fetch_reads_while_the_transport_closes_is_handed_on_at_once(
    bus_url: str,
) -> None:
    """A message that reaches a fetch blocked in its read while the transport is closing: the
    fetch hands it on (as ``close`` does with what it holds), not leave it pending on a
    consumer that is gone until the lease (30 s here) runs out."""
    async with opened(bus_url) as staying:
        other = await staying.subscribe("g", None)
        leaving = RedisTransport(bus_url)
        await leaving.connect()
        sub = await leaving.subscribe("g", None)
        fetching = asyncio.create_task(sub.fetch(10, timeout=None))
        await asyncio.sleep(0.2)  # blocked in XREADGROUP
        closing = asyncio.create_task(leaving.close())
        while not leaving._closed:  # closed, waiting for the fetch to notice
            await asyncio.sleep(0)
        await staying.publish([msg(1)])  # reaches the blocked read of the leaving consumer
        await closing
        with pytest.raises(TransportClosed):
            await fetching
        [handed_on] = await other.fetch(10, timeout=5)
        assert (handed_on.message.id, handed_on.attempt) == ("m1", 2)


async def test_maxlen_refuses_a_publish_that_would_overflow_a_backlog_and_writes_nothing(
    bus_url: str,
) -> None:
    async with opened(bus_url, maxlen="3") as bus:
        small = await bus.subscribe("small", ["order.placed"])
        other = await bus.subscribe("other", ["order.placed"])
        await bus.publish([msg(1), msg(2)])
        with pytest.raises(TransportError, match="maxlen"):
            await bus.publish([msg(3), msg(4)])
        assert await bus._redis.xlen(bus._keys("other")[0]) == 2  # the whole batch was refused
        await bus.publish([msg(3)])
        await small.ack_many(await fetch_all(small, 3))
        await other.ack_many(await fetch_all(other, 3))
        await bus.publish([msg(4)])  # acked entries no longer count


# -- dead letters ------------------------------------------------------------------------


async def test_showing_one_dead_letter_reads_it_by_the_index_not_the_whole_stream(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        a = await bus.subscribe("a", None)
        await bus.publish([msg(n) for n in range(250)])
        for delivery in await fetch_all(a, 250):
            await delivery.dead_letter({"n": delivery.message.id})
        walked: list[object] = []
        real = bus._redis.xrange

        async def xrange(*args: object, **kwargs: object) -> object:
            walked.append(args)
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        bus._redis.xrange = xrange  # type: ignore[method-assign]
        shown = await bus.dead_letter("a", "m249")
        assert shown is not None and shown.record == {"n": "m249"} and shown.message == msg(249)
        assert await bus.dead_letter("a", "nope") is None
        assert walked == []  # it took three chunks of 100 (and all 250 letters) for m249


async def test_dead_letters_are_listed_shown_replayed_to_their_group_only_and_purged(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        a = await bus.subscribe("a", None)
        b = await bus.subscribe("b", None)
        await bus.publish([msg(1), msg(2), msg(3)])
        for delivery in await fetch_all(a, 3):
            await delivery.dead_letter({"reason": "rejected", "id": delivery.message.id})
        await b.ack_many(await fetch_all(b, 3))

        letters = await bus.dead_letters()
        assert [(x.group, x.message.id) for x in letters] == [("a", "m1"), ("a", "m2"), ("a", "m3")]
        assert letters[0].dead_at <= letters[1].dead_at <= letters[2].dead_at
        shown = await bus.dead_letter("a", "m2")
        assert shown is not None and shown.record == {"reason": "rejected", "id": "m2"}
        assert await bus.dead_letter("a", "nope") is None

        assert await bus.replay("a", ["m2"]) == 1
        [replayed] = await a.fetch(10, timeout=5)
        assert (replayed.message, replayed.attempt) == (msg(2), 1)
        assert await b.fetch(10, timeout=0.2) == []

        assert await bus.purge("a", ["m1"]) == 1
        assert await bus.purge("a") == 1
        assert await bus.dead_letters("a") == []


async def test_replay_and_purge_of_all_cover_more_than_one_chunk(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        await bus.publish([msg(n) for n in range(250)])
        for delivery in await fetch_all(sub, 250):
            await delivery.dead_letter({"reason": "rejected"})
        assert len(await bus.dead_letters("g", limit=1000)) == 250
        assert await bus.replay("g") == 250
        for delivery in await fetch_all(sub, 250):
            await delivery.dead_letter({"reason": "rejected"})
        assert await bus.purge("g") == 250


async def test_a_replay_stops_at_the_dead_letters_it_found_while_consumers_dead_letter_again(
    bus_url: str,
) -> None:
    """Replay walks the dead letters a chunk at a time while the group's consumers run. A
    replayed message they dead-letter again lands behind the walk, which used to reach it and
    replay it once more in the same call (and, with a group that keeps failing, walk on for as
    long as the consumers kept up): a replay acts on the dead letters there when it began."""
    async with opened(bus_url) as bus, opened(bus_url) as worker:
        sub = await worker.subscribe("g", None)
        await bus.publish([msg(n) for n in range(150)])
        for delivery in await fetch_all(sub, 150):
            await delivery.dead_letter({"reason": "rejected"})
        script, chunks = bus._script, 0

        async def consumers_run_between_chunks(name: str, keys: Any, args: Any) -> Any:
            nonlocal chunks
            reply = await script(name, keys, args)
            if name == "dead":
                chunks += 1
                if chunks == 1:  # the consumers get the first chunk's copies and fail again
                    for delivery in await fetch_all(sub, 100):
                        await delivery.dead_letter({"reason": "rejected again"})
            return reply

        bus._script = consumers_run_between_chunks  # type: ignore[method-assign]
        assert await bus.replay("g") == 150
        bus._script = script  # type: ignore[method-assign]
        letters = await bus.dead_letters("g", limit=1000)
        assert sorted(x.record["reason"] for x in letters) == ["rejected again"] * 100
        again = await fetch_all(sub, 150, wait=1.0)
        assert sorted(d.message.id for d in again) == sorted(f"m{n}" for n in range(100, 150))


# -- surviving a server restart ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _OwnRedis:
    """A redis-server of this test's own (AOF on), so it can be killed without touching the shared one."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        client = aioredis.Redis(port=self.port)
        try:
            for _ in range(200):
                with contextlib.suppress(Exception):
                    if await client.ping():
                        return
                await asyncio.sleep(0.05)
            raise AssertionError("own redis-server did not start")
        finally:
            await client.aclose()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown save, only what the AOF already holds
        self.proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[_OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    server = _OwnRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


class _Checkouts:
    """Counts the connections the transport's client checks out of its pool from now on."""

    def __init__(self, bus: RedisTransport) -> None:
        self.count = 0
        pool: Any = bus._redis.connection_pool
        real = pool.get_connection

        async def counting(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await real(*args, **kwargs)

        pool.get_connection = counting


async def test_scripts_run_on_the_transports_own_connection_and_what_it_cannot_do_goes_the_clients_way(
    own_redis: _OwnRedis,
) -> None:
    """Publish and ack scripts go on a connection of the transport's own, written and read
    directly (no pool checkout per call); a script the server no longer holds (``SCRIPT
    FLUSH``, a restart) is loaded by the client's way, and a call cancelled mid-way closes
    that connection (its reply may be half read): the next call opens another."""
    await own_redis.ready()
    async with opened(f"redis://127.0.0.1:{own_redis.port}/0?prefix=line-{uuid.uuid4().hex}") as bus:
        sub = await bus.subscribe("g", None)
        checkouts = _Checkouts(bus)
        await bus.publish([msg(0)])  # a fresh server holds no script: loaded by the client's way
        assert checkouts.count > 0
        checkouts.count = 0
        await bus.publish([msg(1)])
        assert checkouts.count == 0 and bus._line is not None and bus._line.is_connected
        await bus._redis.script_flush()
        checkouts.count = 0
        await bus.publish([msg(2)])  # NOSCRIPT on the line: the client's way loads it again
        assert checkouts.count > 0
        got = await fetch_all(sub, 3)
        assert sorted(d.message.id for d in got) == ["m0", "m1", "m2"]
        await sub.ack_many(got[:1])  # (loads the ack script)
        checkouts.count = 0
        await sub.ack_many(got[1:])
        assert checkouts.count == 0
        line = bus._line
        never = asyncio.Event()
        send = line.send_command

        async def stalled(*args: Any, **kwargs: Any) -> None:
            await send(*args, **kwargs)
            await never.wait()  # cancelled here: the reply is left unread

        line.send_command = stalled
        publishing = asyncio.ensure_future(bus.publish([msg(3)]))
        while not bus._line_busy:
            await asyncio.sleep(0.01)
        publishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing
        assert not line.is_connected
        del line.send_command
        await bus.publish([msg(4)])  # the same connection object, connected afresh: no stale reply read
        assert [d.message.id for d in await fetch_all(sub, 2)] in (["m3", "m4"], ["m4", "m3"])


@pytest.mark.slow
async def test_consumers_resume_after_the_server_restarts_and_get_what_was_pending(
    own_redis: _OwnRedis,
) -> None:
    await own_redis.ready()
    url = f"redis://127.0.0.1:{own_redis.port}/0?lease=1&prefix=restart"
    async with RedisTransport(url) as bus:
        sub = await bus.subscribe("g", None)
        await bus.publish([msg(1), msg(2), msg(3)])
        [held] = await sub.fetch(1, timeout=5)  # taken but never settled: its lease must survive too

        own_redis.kill()
        waiting = asyncio.create_task(fetch_all(sub, 3, wait=30))  # keeps trying through the outage
        with pytest.raises(TransportError):
            await bus.publish([msg(9)])  # a publisher learns the server did not take it
        assert not waiting.done()
        own_redis.start()

        got = await asyncio.wait_for(waiting, timeout=60)
        assert sorted((d.message.id, d.attempt) for d in got) == [(held.message.id, 2), ("m2", 1), ("m3", 1)]
        await sub.ack_many(got)
        await bus.publish([msg(4)])  # the publisher reconnects as well
        assert [d.message.id for d in await sub.fetch(10, timeout=10)] == ["m4"]


# -- command packing ---------------------------------------------------------------------


def test_commands_are_packed_to_the_same_bytes_as_redis_py_packs_them() -> None:
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from choreograph.transports import redis as transport_module

    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    transport_module._fast_connections(client)
    fast: Any = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    plain = Connection()
    if transport_module._hiredis_pack is not None:
        assert type(fast) is not Connection and isinstance(fast, Connection)
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "0" * 40, 1, "p:groups", "p", 0, "m1", "order.placed", b"{}", "é", b"x" * 70_000),
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT SETNAME", b"x"),
        ("XADD", "k", "*", "f", 1.5, 10**30, -3, 1e100, memoryview(b"mv"), bytearray(b"ba"), ""),
    ]

    def packed(connection: Any, command: tuple[Any, ...]) -> bytes | type[DataError]:
        try:
            return b"".join(connection.pack_command(*command))
        except DataError:  # redis-py before 8.0 refuses a bytearray
            return DataError

    for command in commands:
        assert packed(fast, command) == packed(plain, command)
    for bad in (True, None, object()):
        with pytest.raises(DataError):
            fast.pack_command("SET", "k", bad)


async def test_a_small_command_is_written_at_once_and_a_large_one_as_redis_py_writes_it() -> None:
    """With a socket timeout (the transport sets one) redis-py times each write with
    ``asyncio.wait_for``, a task of its own on 3.11: the command would reach the socket a loop
    turn later. The transport's connections write a small one in the caller's step - sending
    it completes without suspending - and leave a large one to redis-py."""
    from choreograph.transports import redis as transport_module

    client = aioredis.Redis.from_url(require_broker("redis"), socket_timeout=10.0, protocol=2)
    transport_module._fast_connections(client)
    conn: Any = await client.connection_pool.get_connection()
    try:
        sending = conn.send_command("PING")
        with pytest.raises(StopIteration):
            sending.send(None)  # done in one step: nothing awaited
        assert await conn.read_response() in (b"PONG", "PONG")
        key = f"big-{uuid.uuid4().hex}"
        big = b"x" * (transport_module._AT_ONCE_MAX + 1)
        await conn.send_command("SET", key, big)
        assert await conn.read_response() in (b"OK", "OK", True)
        await conn.send_command("GET", key)
        assert await conn.read_response() == big
        await conn.send_command("DEL", key)
        assert await conn.read_response() == 1
    finally:
        await client.connection_pool.release(conn)
        await client.aclose()


async def test_reads_go_on_the_subscriptions_own_connection_and_a_cancelled_one_is_replaced(bus_url: str) -> None:
    """A fetch's XREADGROUP is written and read on a connection of the subscription's own, not
    checked out of the client's pool per read (its checkout, release and retry wrapper ran
    between the reply's arrival and the hand-out). A read cancelled while it blocks leaves a
    reply it never read: that connection is closed, and the next read opens another."""
    async with opened(bus_url) as bus:
        sub: Any = await bus.subscribe("g", None)
        checkouts = _Checkouts(bus)
        await bus.publish([msg(1)])  # (a publish checks one out: counted from here)
        checkouts.count = 0
        assert [d.message.id for d in await sub._read(10, None)] == ["m1"]
        first = sub._conn
        assert checkouts.count == 0 and first is not None
        blocked = asyncio.ensure_future(sub._read(10, 5_000))
        while not sub._reading:
            await asyncio.sleep(0.01)
        host, port = sub._conn._writer.get_extra_info("sockname")[:2]
        while not blocked.done() and not any(  # until the server holds the XREADGROUP ... BLOCK
            c["addr"] == f"{host}:{port}" and c["cmd"] == "xreadgroup" and "b" in c["flags"]
            for c in await bus._redis.client_list()
        ):
            await asyncio.sleep(0.01)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert sub._conn is None and not first.is_connected
        # Until the server has dropped the closed connection: a blocked client it has not yet
        # seen close would be served the next entry, which would wait out the lease.
        while any(c["addr"] == f"{host}:{port}" for c in await bus._redis.client_list()):
            await asyncio.sleep(0.01)
        await bus.publish([msg(2)])
        checkouts.count = 0
        assert [d.message.id for d in await sub._read(10, 1_000)] == ["m2"]
        assert checkouts.count == 0 and sub._conn is not None and sub._conn is not first
        await sub.close()
        assert sub._conn is None


async def _hold_a_read(bus: RedisTransport, sub: Any) -> tuple[asyncio.Future[Any], asyncio.Event]:
    """Start a fetch of ``sub`` whose read's reply is held back (as a reply still on the wire
    is) until the event returned is set; return once the server holds its ``XREADGROUP ...
    BLOCK`` (or the fetch ended), with the fetch's future."""
    if sub._conn is None:
        assert await sub._read(10, None) == []  # its own connection, opened
    conn, reply_read = sub._conn, asyncio.Event()
    real = conn.read_response

    async def held_back(*args: Any, **kwargs: Any) -> Any:
        await reply_read.wait()
        return await real(*args, **kwargs)

    conn.read_response = held_back
    fetching = asyncio.ensure_future(sub.fetch(10, timeout=None))
    host, port = conn._writer.get_extra_info("sockname")[:2]
    while not fetching.done() and not any(  # until the server holds the XREADGROUP ... BLOCK
        c["addr"] == f"{host}:{port}" and c["cmd"] == "xreadgroup" and "b" in c["flags"]
        for c in await bus._redis.client_list()
    ):
        await asyncio.sleep(0.01)
    return fetching, reply_read


async def _lose_a_read(bus: RedisTransport, sub: Any) -> None:
    """Have ``sub``'s fetch cancelled while the server has handed it an entry (the next one
    published) whose reply it never read: its read is held before the reply (as a reply
    still on the wire is), the entry is published and shows pending under the consumer, and
    the fetch is cancelled - as a worker stopping or a caller's timeout cancels it. The read
    blocks for a minute (``POLL``, a lease of 600 s), not half a second: it must still be
    waiting when the entry is published, however slow the machine."""
    assert bus.lease >= 240 and _redis_consumer.POLL >= 60
    fetching, _ = await _hold_a_read(bus, sub)
    assert not fetching.done(), "the fetch did not block"
    stream = bus._keys(sub.group)[0]
    before = (await bus._redis.xpending(stream, sub.group))["pending"]
    await bus.publish([msg(99)])
    while (await bus._redis.xpending(stream, sub.group))["pending"] == before:
        await asyncio.sleep(0.01)
    fetching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetching


async def test_a_fetch_cancelled_with_entries_read_for_it_hands_them_out_next(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch cancelled while its XREADGROUP was served left the entries it was handed in
    the pending list under this consumer, in no one's hands, until the lease expired (600 s
    here). The next fetch hands them out, as the attempt they were read for; what is in
    hand is left as it is (an ``XREADGROUP`` of the consumer's history would add a delivery
    to it as well, and its settling would find it no longer held)."""
    monkeypatch.setattr(_redis_consumer, "POLL", 60)
    async with opened(bus_url, lease="600") as bus:
        sub: Any = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        [in_hand] = await sub.fetch(10, timeout=5)
        await _lose_a_read(bus, sub)
        [lost] = await sub.fetch(10, timeout=2)
        assert (lost.message.id, lost.attempt) == ("m99", 1)
        assert await sub._hold([in_hand], idle_ms=0) == 1  # still held with the count it was handed out with
        await lost.retry(after=0)
        [again] = await sub.fetch(10, timeout=5)
        assert (again.message.id, again.attempt) == ("m99", 2)
        await sub.ack_many([in_hand, again])
        assert (await bus._redis.xpending(bus._keys("g")[0], "g"))["pending"] == 0


async def test_what_a_cancelled_fetch_hands_out_next_is_only_what_no_one_holds(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscriptions of a group on one transport read as one consumer: the entries
    pending under it that a cancelled fetch's next fetch hands out are neither those another
    of them holds nor those a closed one handed on (they are the next ``XAUTOCLAIM``'s, one
    attempt more)."""
    monkeypatch.setattr(_redis_consumer, "POLL", 60)
    async with opened(bus_url, lease="600") as bus, opened(bus_url) as elsewhere:
        a: Any = await bus.subscribe("g", None)
        b: Any = await bus.subscribe("g", None)
        c: Any = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        [held] = await b.fetch(10, timeout=5)
        await bus.publish([msg(2)])
        [_] = await c.fetch(10, timeout=5)
        await _lose_a_read(bus, a)
        await c.close()  # m2 handed on: pending under the consumer until claimed
        [lost] = await a.fetch(10, timeout=2)
        assert (lost.message.id, lost.attempt) == ("m99", 1)
        other = await elsewhere.subscribe("g", None)
        [handed_on] = await other.fetch(10, timeout=2)
        assert (handed_on.message.id, handed_on.attempt) == ("m2", 2)
        assert await b._hold([held], idle_ms=0) == 1
        await a.ack_many([lost])
        await held.ack()
        await handed_on.ack()
        assert (await bus._redis.xpending(bus._keys("g")[0], "g"))["pending"] == 0


async def test_a_subscription_closed_after_a_cancelled_fetch_hands_its_entries_on_at_once(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entries a cancelled fetch never read are handed on when the subscription closes
    (a worker stopping cancels its fetch, then closes), not after the lease; as the attempt
    they were read for, since no handler saw them. What was in hand is handed on as before
    (one attempt more: its handler may have run), once."""
    monkeypatch.setattr(_redis_consumer, "POLL", 60)
    async with opened(bus_url, lease="600") as leaving, opened(bus_url) as staying:
        going: Any = await leaving.subscribe("g", None)
        other = await staying.subscribe("g", None)
        await leaving.publish([msg(1)])
        [_] = await going.fetch(10, timeout=5)  # in hand
        await _lose_a_read(leaving, going)
        await going.close()
        handed_on = await fetch_all(other, 2, wait=2)
        assert sorted((d.message.id, d.attempt) for d in handed_on) == [("m1", 2), ("m99", 1)]
        assert await other.fetch(10, timeout=0) == []
        await other.ack_many(handed_on)
        assert (await staying._redis.xpending(staying._keys("g")[0], "g"))["pending"] == 0


def _hold_up(obj: Any, name: str, when: Callable[..., bool] = lambda *args: True) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``obj``'s coroutine method ``name`` wait before it runs, on the calls whose
    positional arguments ``when`` accepts: returns (set once one waits, set to let them go
    on). ``del obj.<name>`` puts the method back."""
    waiting, go_on = asyncio.Event(), asyncio.Event()
    real = getattr(obj, name)

    async def held(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            waiting.set()
            await go_on.wait()
        return await real(*args, **kwargs)

    setattr(obj, name, held)
    return waiting, go_on


async def test_what_a_closing_subscription_holds_is_not_handed_out_by_a_sibling_while_it_hands_it_on(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscription closing hands on what it holds (``XCLAIM ... IDLE``); until that is done
    the entries are in its hand. It left the group's subscriptions on the transport first, so
    a sibling's fetch after a cancelled one took them for entries no one saw and handed them
    out again as the same attempt - and the release then handed them on a third time."""
    monkeypatch.setattr(_redis_consumer, "POLL", 60)
    async with opened(bus_url, lease="600") as bus:
        a: Any = await bus.subscribe("g", None)
        b: Any = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        [held] = await b.fetch(10, timeout=5)
        await _lose_a_read(bus, a)
        handing, go_on = _hold_up(b, "_hold")
        closing = asyncio.ensure_future(b.close())
        await handing.wait()
        try:
            got = await a.fetch(10, timeout=2)
        finally:
            go_on.set()
            await closing
        assert [(d.message.id, d.attempt) for d in got] == [("m99", 1)]
        assert held.message.id == "m1"
        await a.ack_many(got)


async def test_what_a_fetch_closed_while_it_read_hands_on_is_not_handed_out_by_a_sibling_meanwhile(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch whose subscription closed while it read hands on what the read brought; until
    that is done the entries are in its hand. The read's end took the subscription out of the
    group's before they were, so a sibling's fetch after a cancelled one handed them out too."""
    monkeypatch.setattr(_redis_consumer, "POLL", 60)
    async with opened(bus_url, lease="600") as bus:
        a: Any = await bus.subscribe("g", None)
        b: Any = await bus.subscribe("g", None)
        await _lose_a_read(bus, a)  # m99
        fetching, reply_read = await _hold_a_read(bus, b)
        stream = bus._keys("g")[0]
        await bus.publish([msg(1)])
        while (await bus._redis.xpending(stream, "g"))["pending"] < 2:
            await asyncio.sleep(0.01)
        await b.close()  # its read under way: what it brings is handed on by the fetch
        handing, go_on = _hold_up(b, "_hold")
        reply_read.set()
        await handing.wait()
        try:
            got = await a.fetch(10, timeout=2)
        finally:
            go_on.set()
            await asyncio.gather(fetching, return_exceptions=True)
        assert [(d.message.id, d.attempt) for d in got] == [("m99", 1)]
        await a.ack_many(got)


async def test_what_a_fetch_closed_while_it_adopted_hands_on_is_not_handed_out_by_a_sibling_meanwhile(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a read: a subscription closed while its fetch hands out what a cancelled one
    was handed stays one of the group's until it has handed that on."""
    monkeypatch.setattr(_redis_consumer, "POLL", 60)
    async with opened(bus_url, lease="600") as bus:
        a: Any = await bus.subscribe("g", None)
        b: Any = await bus.subscribe("g", None)
        await _lose_a_read(bus, a)
        await _lose_a_read(bus, b)  # two entries pending under the consumer, no one's
        adopting, adopt_on = _hold_up(bus, "_script", lambda name, *_: name == "adopt")
        fetching = asyncio.ensure_future(a.fetch(10, timeout=None))
        await adopting.wait()
        await a.close()  # while its fetch adopts: what that brings is handed on by the fetch
        handing, go_on = _hold_up(a, "_hold")
        adopt_on.set()
        await handing.wait()
        try:
            got = await b.fetch(10, timeout=0)
        finally:
            go_on.set()
            await asyncio.gather(fetching, return_exceptions=True)
        assert got == []


async def test_what_a_subscription_failed_to_hand_on_is_not_handed_out_by_a_sibling_as_the_same_attempt(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close whose release fails (the server unreachable) leaves what it held pending under
    the consumer until the lease: its handler may have run, so it comes back one attempt
    more. A sibling's fetch after a cancelled one took it for an entry no one saw and handed
    it out again as the same attempt, the lease not out."""
    monkeypatch.setattr(_redis_consumer, "POLL", 60)
    async with opened(bus_url, lease="600") as bus:
        a: Any = await bus.subscribe("g", None)
        b: Any = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        [held] = await b.fetch(10, timeout=5)
        await _lose_a_read(bus, a)

        async def unreachable(*args: Any, **kwargs: Any) -> Any:
            raise TransportError("redis touch failed: Connection refused")

        b._hold = unreachable
        await b.close()
        got = await a.fetch(10, timeout=2)
        assert [(d.message.id, d.attempt) for d in got] == [("m99", 1)]
        assert held.message.id == "m1"
        await a.ack_many(got)


async def test_what_a_sibling_reads_while_a_subscription_closes_is_not_put_back_as_well(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing after a cancelled fetch puts back on the stream the consumer's entries no one
    holds; a sibling's read served meanwhile holds entries not yet in its hand. They were put
    back (a copy) and handed to the sibling as well: the message handled twice."""
    monkeypatch.setattr(_redis_consumer, "POLL", 60)
    async with opened(bus_url, lease="600") as bus:
        a: Any = await bus.subscribe("g", None)
        b: Any = await bus.subscribe("g", None)
        await _lose_a_read(bus, a)  # m99: pending under the consumer, no one's
        requeueing, go_on = _hold_up(bus, "_script", lambda name, *_: name == "adopt")
        closing = asyncio.ensure_future(a.close())
        await requeueing.wait()
        await bus.publish([msg(5)])
        fetching = asyncio.ensure_future(b.fetch(10, timeout=5))
        try:
            while not fetching.done() and not (  # it read m5, or it waits for the put-back to end
                "g" in bus._adopting and bus._adopting["g"]._waiters  # type: ignore[attr-defined]
            ):
                await asyncio.sleep(0.01)
        finally:
            go_on.set()
            await closing
        got = await fetching
        del bus._script
        after = await fetch_all(b, 2, wait=1)
        ids = sorted(d.message.id for d in got + after)
        assert ids == ["m5", "m99"]
        await b.ack_many(got + after)


async def test_two_fetches_of_one_subscription_at_once_each_get_an_entry(bus_url: str) -> None:
    """Fetches of one subscription may run side by side (as they did through the client's
    pool). With its reads on a connection of the subscription's own, the second wrote its
    XREADGROUP on the connection the first was reading: two readers on one socket, a
    RuntimeError out of fetch and a 'lost the server' warning. The second reads through
    the pool."""
    async with opened(bus_url) as bus:
        sub: Any = await bus.subscribe("g", None)
        reads = 0
        real = sub._read

        async def counting(*args: Any) -> Any:
            nonlocal reads
            reads += 1
            return await real(*args)

        sub._read = counting
        first = asyncio.ensure_future(sub.fetch(1, timeout=10))
        while not sub._reading:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(sub.fetch(1, timeout=10))
        while reads < 2:
            await asyncio.sleep(0.01)
        await bus.publish([msg(1), msg(2)])
        got = await asyncio.gather(first, second)
        assert sorted(d.message.id for batch in got for d in batch) == ["m1", "m2"]


async def test_a_read_connection_the_server_closed_while_idle_is_replaced_without_a_warning(
    bus_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server closes a connection idle past its ``timeout`` (or an operator kills it) while
    the consumer is not fetching (its handlers busy). The pool checks a connection before
    handing it out; the subscription's own read connection was written to regardless, and the
    next fetch logged 'lost the server' and paused before reading again."""
    async with opened(bus_url) as bus:
        sub: Any = await bus.subscribe("g", None)
        assert await sub.fetch(1, timeout=0.01) == []
        conn = sub._conn
        await conn.send_command("CLIENT", "ID")
        await bus._redis.client_kill_filter(_id=await conn.read_response())
        while not conn._reader.at_eof():
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.INFO, logger="choreograph.transports.redis"):
            assert await sub.fetch(1, timeout=0.1) == []  # (its read: on the connection killed)
            await bus.publish([msg(1)])
            assert [d.message.id for d in await sub.fetch(1, timeout=5)] == ["m1"]
        assert [r.getMessage() for r in caplog.records if r.name == "choreograph.transports.redis"] == []


def test_deliveries_read_the_entry_fields_the_same_whatever_their_layout() -> None:
    from types import SimpleNamespace


    sub: Any = SimpleNamespace(group="g")
    cases: list[tuple[list[bytes], int, tuple[str, str, bytes, int]]] = [
        ([b"id", b"m1", b"type", b"t", b"body", b"{}"], 1, ("m1", "t", b"{}", 1)),  # as publish writes it
        ([b"id", b"m1", b"type", b"t", b"body", b"{}"], 3, ("m1", "t", b"{}", 3)),  # lease expired twice
        ([b"id", b"", b"type", b"t", b"body", b"{}"], 1, ("1-0", "t", b"{}", 1)),  # empty id: the entry id
        ([b"body", b"{}", b"type", b"t", b"id", b"m1"], 1, ("m1", "t", b"{}", 1)),  # another order
        (
            [b"id", b"m1", b"type", b"t", b"body", b"{}", b"attempt", b"4"],
            2,
            ("m1", "t", b"{}", 5),
        ),  # a retry
        ([b"id", b"m1", b"type", b"t", b"body", b"{}", b"attempt", b"x"], 1, ("m1", "t", b"{}", 1)),
        ([b"junk", b"1"], 1, ("1-0", "", b"", 1)),
    ]
    for flat, count, (id_, type_, body, attempt) in cases:
        delivery = RedisDelivery(sub, b"1-0", flat, count)
        assert type(delivery.message) is Message
        assert (delivery.message, delivery.attempt) == (Message(id_, type_, body), attempt)
        assert (delivery.group, delivery.settled, delivery._entry, delivery._count) == (
            "g",
            False,
            b"1-0",
            count,
        )


async def test_ack_many_acks_and_deletes_batches_larger_than_the_script_slices(bus_url: str) -> None:
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", None)
        await bus.publish([msg(n) for n in range(2500)])
        got = await fetch_all(sub, 2500)
        assert len(got) == 2500
        await sub.ack_many(got)
        stream = bus._keys("g")[0]
        assert await bus._redis.xlen(stream) == 0
        assert (await bus._redis.xpending(stream, "g"))["pending"] == 0


async def test_an_ack_batch_whose_script_failed_is_acked_by_the_retry(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker retries a settle step that raised: the deliveries of an ack that failed must
    still be unsettled then, or the retry acks nothing and the batch comes back after the lease."""
    async with opened(bus_url, lease="1") as bus:
        sub = await bus.subscribe("g", ["order.placed"])
        await bus.publish([msg(n) for n in range(5)])
        got = await fetch_all(sub, 5)
        assert len(got) == 5
        real = bus._script
        calls: list[str] = []

        async def failing_ack_once(name: str, keys: list[Any], args: list[Any]) -> Any:
            calls.append(name)
            if name == "ack" and calls.count("ack") == 1:
                raise ConnectionError("the server went away")
            return await real(name, keys, args)

        monkeypatch.setattr(bus, "_script", failing_ack_once)
        with pytest.raises((TransportError, ConnectionError)):
            await sub.ack_many(got)
        assert not any(d.settled for d in got)
        await sub.ack_many(got)  # what the worker's settle retry does
        assert calls.count("ack") == 2 and all(d.settled for d in got)
        await asyncio.sleep(1.5)  # past the lease: an unacked entry would be claimed again
        assert await sub.fetch(10, timeout=1.0) == []


@pytest.mark.parametrize("verb", second_call.VERBS)
async def test_a_verb_whose_script_failed_is_done_by_a_second_call(
    bus_url: str, verb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ack, retry and dead_letter leave the delivery unsettled (and in the unsettled set close()
    hands on) when their script fails, so the worker's settle retry runs it: a retry back at
    once, an ack that stays, a dead letter stored - not the entry claimed again after its lease."""
    async with opened(bus_url, lease=str(second_call.lease_for(verb))) as bus:
        sub = await bus.subscribe("g", ["order.placed"])
        await bus.publish([msg(1)])
        (delivery,) = await fetch_all(sub, 1)
        real = bus._script
        settling: list[str] = []

        async def failing_once(name: str, keys: list[Any], args: list[Any]) -> Any:
            if name in ("ack", "settle"):
                settling.append(name)
                if len(settling) == 1:
                    raise redis.exceptions.ConnectionError("Connection closed by server.")
            return await real(name, keys, args)

        monkeypatch.setattr(bus, "_script", failing_once)
        assert isinstance(sub, RedisSubscription) and isinstance(delivery, RedisDelivery)
        await second_call.check_a_second_call_does_the_work(
            bus, sub, delivery, verb, TransportError,
            held=lambda: sub._unsettled.get(delivery._entry) is delivery,
        )
        assert sub._unsettled == {}


@pytest.mark.parametrize("first", ["list", "show", "replay", "dead_letter"])
async def test_dead_letters_from_before_the_index_are_one_per_id_the_latest_kept(bus_url: str, first: str) -> None:
    """A bus written before P:dlx:<group> may hold two letters of one id (two failed
    copies of an event published twice); whatever touches the letters first indexes
    them, keeping each id's newest letter."""
    async with opened(bus_url) as bus:
        sub = await bus.subscribe("g", ["order.placed"])
        await bus.publish([msg(1), msg(2)])
        for delivery in await fetch_all(sub, 2):
            await delivery.dead_letter({"reason": "first"})
        dead = bus._keys("g")[2]
        (old,) = [entry for entry, fields in await bus._redis.xrange(dead) if fields[b"id"] == b"m1"]
        fields = dict((await bus._redis.xrange(dead, min=old, max=old))[0][1])
        await bus._redis.xadd(dead, {**fields, b"record": b'{"reason": "second"}'})
        await bus._redis.delete(bus._letter_index("g"))  # as before the index
        if first == "list":
            letters = await bus.dead_letters("g")
            assert sorted((x.message.id, x.record["reason"]) for x in letters) == [("m1", "second"), ("m2", "first")]
        elif first == "show":
            letter = await bus.dead_letter("g", "m1")
            assert letter is not None and letter.record["reason"] == "second"
        elif first == "replay":
            assert await bus.replay("g", ["m1"]) == 1
            assert [d.message.id for d in await fetch_all(sub, 2, wait=1.0)] == ["m1"]
        else:
            await bus.publish([msg(1)])
            (delivery,) = await fetch_all(sub, 1)
            await delivery.dead_letter({"reason": "third"})
        latest = {"list": "second", "show": "second", "dead_letter": "third"}
        if first in latest:
            assert [x.record["reason"] for x in await bus.dead_letters("g") if x.message.id == "m1"] == [latest[first]]
            assert await bus.replay("g", ["m1"]) == 1
        assert await bus.replay("g") == 1  # m2
        assert await bus.dead_letters("g") == []
        assert await bus._redis.exists(bus._letter_index("g")) == 0
