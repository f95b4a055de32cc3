"""The NATS JetStream transport: behaviour specific to it (naming, URLs, server restarts, limits).

The contract itself is asserted by tests/conformance against the shared server
(``nats``) and a private one (``nats-private``); these tests cover what only NATS has.
Tests that restart a broker start their own nats-server on a free port.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib.metadata import version
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from choreograph.errors import ConfigurationError, TransportClosed, TransportError
from choreograph.transports import _nats_codec as codec
from choreograph.transports import _nats_consumers as consumers
from choreograph.transports import _nats_pull, open_transport
from choreograph.transports._nats_pull import NatsDelivery
from choreograph.transports._nats_routing import Binding, settled
from choreograph.transports.base import Delivery, Message, Subscription
from choreograph.transports.nats import NatsTransport
from tests._brokers import require_broker
from tests._nats_server import NatsServer
from tests.conformance._support import quiet
from tests.conformance.brokers import nats as broker
from tests.transports import _second_call as second_call
from tests.transports._close_race import close_during_connect

WAIT = 15.0  # a ceiling for a loaded machine, never a speed assertion


def msg(n: int | str, type_: str = "order.placed", body: bytes | None = None) -> Message:
    return Message(id=f"m{n}", type=type_, body=f"body-{n}".encode() if body is None else body)


def bus_on(server_url: str, **params: object) -> str:
    query = {"prefix": f"choreograph-test-{uuid.uuid4().hex[:12]}", "lease": 30, **params}
    return server_url + ("&" if "?" in server_url else "?") + "&".join(f"{k}={v}" for k, v in query.items())


async def collect(subscription: Subscription, count: int, within: float = WAIT) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        got += await subscription.fetch(count - len(got), timeout=left)
    return got


def ids(deliveries: list[Delivery]) -> list[str]:
    return sorted(d.message.id for d in deliveries)


@pytest.fixture
def server() -> Iterator[NatsServer]:
    """A private nats-server (free port, own store): these tests kill and restart it."""
    running = NatsServer.start_new()
    yield running
    running.destroy()


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[NatsTransport]:
    transport = NatsTransport(url)
    try:
        async with transport:
            yield transport
    finally:
        await broker.cleanup(url)


# -- URL ---------------------------------------------------------------------------------


def test_url_parameters_configure_lease_prefix_and_replicas() -> None:
    transport = NatsTransport("nats://127.0.0.1:4222?lease=7.5&prefix=shop&replicas=3")
    assert (transport.lease, transport.prefix, transport.replicas) == (7.5, "shop", 3)
    assert transport.streams == ("shop_EVENTS", "shop_DLQ", "shop_DEFER")


def test_defaults_are_prefix_choreograph_one_replica_and_the_default_lease() -> None:
    transport = NatsTransport("nats://127.0.0.1:4222")
    assert (transport.prefix, transport.replicas, transport.lease) == ("choreograph", 1, 30.0)


def test_several_servers_may_be_listed_comma_separated() -> None:
    transport = NatsTransport("nats://a:4222,b:4223?prefix=x")
    assert transport._servers == ["nats://a:4222", "nats://b:4223"]


@pytest.mark.parametrize(
    "query",
    ["prefix=a.b", "prefix=a%20b", "prefix=", "replicas=0", "replicas=two", "lease=0", "leese=3"],
)
def test_bad_url_parameters_are_configuration_errors(query: str) -> None:
    with pytest.raises(ConfigurationError):
        NatsTransport(f"nats://127.0.0.1:4222?{query}")


@pytest.mark.parametrize(
    ("netloc", "needle"),
    [
        ("127.0.0.1:abc", "broker URL: the port is not a number from 0 to 65535"),
        ("127.0.0.1:99999", "broker URL: the port is not a number from 0 to 65535"),
        ("a:4222,b:4x", "broker URL: the port is not a number from 0 to 65535"),
        ("a:4222,,b:4222", "broker URL: server 2 of 3: no host"),
    ],
)
def test_a_bad_server_is_a_configuration_error_naming_what(netloc: str, needle: str) -> None:
    """nats-py refused these at the first connect with "invalid connect url option", naming nothing."""
    with pytest.raises(ConfigurationError) as raised:
        NatsTransport(f"nats://{netloc}?prefix=x")
    assert needle in str(raised.value)


@pytest.mark.parametrize("lease", ["1e10", "9223372037", "1e300"])
def test_a_lease_longer_than_jetstream_takes_is_a_configuration_error(lease: str) -> None:
    """Its ack_wait (an int64 of nanoseconds) overflowed: the subscribe failed with JetStream's
    "invalid JSON", or an OverflowError from a lease of 1e300."""
    with pytest.raises(ConfigurationError, match="is over 9223372036 s, the longest ack_wait JetStream takes"):
        NatsTransport(f"nats://127.0.0.1:4222?lease={lease}")
    assert NatsTransport("nats://127.0.0.1:4222?lease=9223372036").lease == 9223372036


def test_open_transport_selects_nats_for_nats_urls() -> None:
    assert isinstance(open_transport("nats://127.0.0.1:4222"), NatsTransport)


# -- naming ------------------------------------------------------------------------------


@given(st.text())
def test_message_ids_map_to_one_subject_token_and_back(message_id: str) -> None:
    token = codec.name_token(message_id, hash_long=False)
    assert token and not set(token) & set(". *>\t\r\n%")
    assert codec.from_name_token(token) == message_id


@given(st.text(), st.text())
def test_different_group_names_never_share_a_consumer_name(a: str, b: str) -> None:
    if a != b:
        assert codec.name_token(a) != codec.name_token(b)


def test_very_long_group_names_are_cut_and_hashed_to_a_bounded_consumer_name() -> None:
    long_a, long_b = "g" * 500, "g" * 499 + "h"
    assert len(codec.name_token(long_a)) < 200
    assert codec.name_token(long_a) != codec.name_token(long_b)


@given(st.text(max_size=300))
def test_a_group_is_named_back_from_its_consumer_unless_hashed_where_the_description_names_it(group: str) -> None:
    consumer = codec.name_token(group)
    hashed = "~~" in consumer
    written = consumers.config(prefix="p", lease=30, multi_filter=True, group=group, consumer=consumer, binding=Binding(None))
    assert consumers.group_name(consumer, written) == group  # >= 2.10: the description names it
    before_2_10 = consumers.config(prefix="p", lease=30, multi_filter=False, group=group, consumer=consumer, binding=Binding(None))
    assert consumers.group_name(consumer, before_2_10) == (None if hashed else group)


@given(st.text(min_size=1), st.text())
def test_a_subject_carries_type_and_id_exactly(event_type: str, message_id: str) -> None:
    subject = codec.message_subject("p.ev", event_type, message_id)
    assert not any(token in ("", "*", ">") for token in subject.split("."))
    assert codec.split_subject(subject[len("p.ev.") :]) == (event_type, message_id)


def test_plain_dotted_types_stay_readable_in_subjects() -> None:
    assert codec.message_subject("p.ev", "shop.order.placed", "abc-1") == "p.ev.shop.order.placed.abc-1"


@given(st.text(min_size=1), st.text(min_size=1))
def test_an_event_subject_without_id_leaves_the_id_to_the_msg_id_header(event_type: str, message_id: str) -> None:
    """Events share one subject per type (a subject per message costs the server dearly)."""
    subject = codec.message_subject("p.ev", event_type, None)
    assert subject == f"p.ev.{codec.type_tokens(event_type)}.~h"
    headers = {codec.H_MSG_ID: codec.name_token(message_id, hash_long=False)}
    assert codec.split_subject(subject[len("p.ev.") :], headers) == (event_type, message_id)


def test_the_delivery_count_stream_sequence_and_pending_come_from_either_ack_subject_form() -> None:
    v1 = "$JS.ACK.S_EVENTS.g.3.42.17.1700000000000000000.5"
    v2 = "$JS.ACK.dom.ACCHASH.S_EVENTS.g.3.42.17.1700000000000000000.5.rnd"
    assert codec.ack_metadata(v1) == codec.ack_metadata(v2) == (3, 42, 5)
    assert codec.ack_metadata("_INBOX.abc") is None


def test_a_header_form_subject_without_its_header_is_not_ours() -> None:
    assert codec.split_subject("shop.order.placed.~h", None) is None
    assert codec.split_subject("shop.order.placed.~h", {"Other": "x"}) is None


# -- connecting --------------------------------------------------------------------------


async def test_connecting_to_a_server_that_is_not_there_fails_with_transport_error() -> None:
    from tests._nats_server import free_port

    transport = NatsTransport(f"nats://127.0.0.1:{free_port()}")
    with pytest.raises(TransportError):
        await transport.connect()


async def test_a_refused_first_connect_is_one_error_naming_the_reason_and_no_warnings_before_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """nats-py reports each failed attempt to error_cb; logged as warnings, they said it twice before the error."""
    from tests._nats_server import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(TransportError) as raised:
        await NatsTransport(url).connect()
    assert str(raised.value).startswith(f"nats: connect to {url} failed: ")
    assert f"[Errno {errno.ECONNREFUSED}]" in str(raised.value)  # the OS's reason
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_refused_first_connect_is_raised_from_the_sockets_own_error() -> None:
    """Not from nats-py's NoServersError: the CLI's --connect-timeout tries again only what the cause
    says cannot be reached (a refused login must fail at once)."""
    from tests._nats_server import free_port

    with pytest.raises(TransportError) as raised:
        await NatsTransport(f"nats://127.0.0.1:{free_port()}").connect()
    assert isinstance(raised.value.__cause__, ConnectionRefusedError), repr(raised.value.__cause__)


async def test_a_connect_cancelled_while_the_server_is_silent_closes_its_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled (Ctrl-C, SIGTERM) while the server held the handshake, nats-py left the socket open."""
    from nats.aio.transport import TcpTransport

    waiting, peers = asyncio.Event(), asyncio.Queue[asyncio.StreamReader]()
    real_readline = TcpTransport.readline

    async def readline(self: TcpTransport) -> bytes:
        waiting.set()  # the client waits for the server's INFO: it holds the socket now
        return await real_readline(self)

    monkeypatch.setattr(TcpTransport, "readline", readline)
    writers: list[asyncio.StreamWriter] = []

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:  # and never answer
        writers.append(writer)
        peers.put_nowait(reader)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    transport = NatsTransport(f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    connecting = asyncio.ensure_future(transport.connect())
    try:
        await asyncio.wait_for(waiting.wait(), WAIT)
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        assert connecting.cancelled()
        peer = await asyncio.wait_for(peers.get(), WAIT)
        assert await asyncio.wait_for(peer.read(), WAIT) == b""  # the client closed its end
    finally:
        await transport.close()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_connect_that_finishes_after_close_closes_its_connection() -> None:
    """``close()`` while a connect was under way found no connection to close; the connect then
    installed its connection on the closed transport, open, with nobody left to close it."""
    url = bus_on(require_broker("nats"))
    transport = NatsTransport(url)
    clients: list[Any] = []
    try:
        await close_during_connect(transport, "_first_connect", clients)
        [nc] = clients
        assert nc.is_closed
        assert transport._nc is None
    finally:
        for nc in clients:
            await nc.close()
        await broker.cleanup(url)


async def test_using_the_transport_before_connect_is_a_transport_error() -> None:
    with pytest.raises(TransportError):
        await NatsTransport("nats://127.0.0.1:4222").publish([msg(1)])


async def test_more_replicas_than_servers_is_reported_on_connect() -> None:
    url = bus_on(require_broker("nats"), replicas=3)
    transport = NatsTransport(url)
    try:
        with pytest.raises(TransportError, match="replica"):
            await transport.connect()
    finally:
        await transport.close()
        await broker.cleanup(url)


async def test_connect_creates_the_streams_and_is_idempotent() -> None:
    url = bus_on(require_broker("nats"))
    async with opened(url) as bus:
        await bus.connect()
        async with NatsTransport(url) as second:  # a second transport on an existing bus
            await second.publish([msg(1)])
        assert bus._nc is not None
        for stream in bus.streams:
            reply = await bus._nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
            assert "error" not in json.loads(reply.data)


async def test_connect_without_create_refuses_a_bus_the_server_lacks_creates_nothing_and_opens_one_it_has() -> None:
    from tests.cli.test_existing_bus_cli import nats_streams

    url = bus_on(require_broker("nats"))
    missing = NatsTransport(url)
    with pytest.raises(ConfigurationError, match=r"^no NATS bus with prefix 'choreograph-test-\w+' at broker URL"):
        await missing.connect(create=False)
    await missing.close()
    assert await nats_streams(url) == []
    async with opened(url):
        existing = NatsTransport(url)
        await existing.connect(create=False)
        await existing.publish([msg(1)])
        await existing.close()


async def test_connect_without_create_writes_no_stream_and_reads_a_missing_dead_letter_stream_as_empty() -> None:
    """An inspection (``choreograph dlq``) of a bus whose _DLQ and _DEFER streams are gone
    neither creates them nor fails: the bus holds no dead letters."""
    from tests.cli.test_existing_bus_cli import nats_streams

    url = bus_on(require_broker("nats"))
    async with opened(url) as bus:
        assert bus._nc is not None
        for stream in (bus.dead_letter_stream, bus.deferral_stream):
            reply = await bus._nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=5)
            assert json.loads(reply.data).get("success") is True
        inspecting = NatsTransport(url)
        await inspecting.connect(create=False)
        try:
            assert await inspecting.dead_letters() == []
            assert await inspecting.dead_letter("billing", "m1") is None
            assert await inspecting.replay("billing", ["m1"]) == 0
            assert await inspecting.purge("billing") == 0
        finally:
            await inspecting.close()
        assert await nats_streams(url) == [bus.events_stream]


# -- routing on subjects -----------------------------------------------------------------


async def test_names_types_and_ids_that_are_not_subject_tokens_round_trip(server_url: str) -> None:
    """Dots, blanks, wildcards, '%', '~' and non-ASCII in group, type and id survive the trip."""
    group, event_type = "billing.v2 eu*>%~ü", "shop order.*.>.placed~%"
    odd = Message(id="id with.dots *> %41 ~7E ü", type=event_type, body=b"x")
    async with opened(bus_on(server_url)) as bus:
        subscription = await bus.subscribe(group, [event_type])
        other = await bus.subscribe("other", ["shop.order.placed"])
        await bus.publish([odd, msg(1, "shop.order.placed")])
        (delivery,) = await collect(subscription, 1)
        assert (delivery.message, delivery.group) == (odd, group)
        await delivery.dead_letter({"why": "test"})
        (letter,) = await bus.dead_letters(group)
        assert (letter.group, letter.message) == (group, odd)
        assert await bus.replay(group) == 1
        (again,) = await collect(subscription, 1)
        assert (again.message, again.attempt) == (odd, 1)
        await again.ack()
        assert ids(await collect(other, 1)) == ["m1"]


async def _two_dead_letters(bus: Any) -> Any:
    """Group ``g`` subscribed, m1 and m2 published and dead-lettered (reason ``first``): its subscription."""
    subscription = await bus.subscribe("g", None)
    await bus.publish([msg(1), msg(2)])
    for delivery in await collect(subscription, 2):
        await delivery.dead_letter({"reason": "first"})
    return subscription


async def test_a_replay_whose_messages_are_dead_lettered_again_before_it_ends_succeeds(server_url: str) -> None:
    """A consumer running during a replay may fail the replayed message again before the
    replay removed the old dead letter: the replay still succeeds and the new one stays."""
    async with opened(bus_on(server_url)) as bus:
        subscription = await _two_dead_letters(bus)
        js = bus._jetstream()
        publish = js.publish

        async def publish_then_fail_them_again(items: Any) -> int:
            stored = await publish(items)
            if any(".rp." in subject for subject, _, _ in items):  # the replay's republish
                js.publish = publish  # type: ignore[method-assign]
                for delivery in await collect(subscription, 2):
                    await delivery.dead_letter({"reason": "again"})
            return stored

        js.publish = publish_then_fail_them_again  # type: ignore[method-assign]
        assert await bus.replay("g") == 2
        letters = await bus.dead_letters("g")
        assert sorted((letter.message.id, letter.record["reason"]) for letter in letters) == [
            ("m1", "again"), ("m2", "again")
        ]
        assert await bus.replay("g") == 2
        assert ids(await collect(subscription, 2)) == ["m1", "m2"]


async def test_a_replay_run_again_after_one_interrupted_before_its_deletes_counts_the_letters(
    server_url: str,
) -> None:
    """Interrupted between republishing and deleting, a replay reports nothing; run again
    (within the duplicate window) its republishes are duplicates, but it deletes the
    leftovers and says so: "replayed 2", not 0. The events are delivered once."""
    async with opened(bus_on(server_url)) as bus:
        subscription = await _two_dead_letters(bus)
        js = bus._jetstream()
        api = js.api

        async def fail_the_deletes(action: str, subject: str, request: Any = None) -> dict[str, Any]:
            if action == "delete a replayed dead letter":
                raise TransportError("nats: connection lost")
            return await api(action, subject, request)

        js.api = fail_the_deletes  # type: ignore[method-assign]
        with pytest.raises(TransportError):
            await bus.replay("g")
        js.api = api  # type: ignore[method-assign]
        assert await bus.replay("g") == 2
        assert await bus.dead_letters("g") == []
        assert ids(await collect(subscription, 2)) == ["m1", "m2"]
        assert await subscription.fetch(10, timeout=0.5) == []


async def test_two_replays_at_once_of_a_letter_failed_again_meanwhile_count_it_once(server_url: str) -> None:
    """Two admins replay the same letter at once and a consumer fails the replayed message
    again before the slower replay deletes it: one deleted the record, the other found it
    replaced by the new dead letter, and both counted it ("replayed 1" twice for one letter)."""
    url = bus_on(server_url)
    async with opened(url) as bus, opened(url) as other:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        (delivery,) = await collect(subscription, 1)
        await delivery.dead_letter({"reason": "first"})
        js = bus._jetstream()
        api = js.api
        counts: list[int] = []

        async def the_other_replay_and_a_failure_first(action: str, subject: str, request: Any = None) -> Any:
            if action == "delete a replayed dead letter" and not counts:
                counts.append(await other.replay("g"))  # it deletes the letter the first one read
                (again,) = await collect(subscription, 1)
                await again.dead_letter({"reason": "again"})  # a new letter of the id
            return await api(action, subject, request)

        js.api = the_other_replay_and_a_failure_first  # type: ignore[method-assign]
        counts.append(await bus.replay("g"))
        js.api = api  # type: ignore[method-assign]
        assert sum(counts) == 1, counts
        (letter,) = await bus.dead_letters("g")
        assert letter.record["reason"] == "again"
        assert await bus.replay("g") == 1  # the new letter is one of its own


@pytest.mark.parametrize("message_id", ["i" * 3_000, "ü" * 1_000], ids=["3000-chars", "6000-chars-escaped"])
async def test_an_event_with_a_very_long_id_is_dead_lettered_shown_replayed_and_purged(
    server_url: str, message_id: str
) -> None:
    """An id travels in a header, so any length is published and delivered; its dead letter's
    subjects must stay under the server's control line (past it the server drops the whole
    connection) and its replay's subject under the longest choreograph writes."""
    long = Message(id=message_id, type="order.placed", body=b"x")
    async with opened(bus_on(server_url)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([long, msg(1)])
        for delivery in await collect(subscription, 2):
            await asyncio.wait_for(delivery.dead_letter({"reason": "rejected"}), WAIT)
        assert sorted(letter.message.id for letter in await bus.dead_letters("g")) == sorted([message_id, "m1"])
        shown = await bus.dead_letter("g", message_id)
        assert shown is not None and shown.message == long
        assert await bus.replay("g", [message_id]) == 1
        (again,) = await collect(subscription, 1)
        assert (again.message, again.attempt) == (long, 1)
        await again.dead_letter({"reason": "again"})
        assert await bus.purge("g", [message_id]) == 1
        assert [letter.message.id for letter in await bus.dead_letters("g")] == ["m1"]


async def test_a_long_id_dead_lettered_under_its_unhashed_subject_before_is_still_shown_and_purged() -> None:
    """An id past MAX_LETTER_ID whose subject the server took was stored unhashed before."""
    message_id = "i" * 2_000
    async with opened(bus_on(require_broker("nats"))) as bus:
        letters = bus._dead_letter_stream()
        hashed, unhashed = codec.letter_id_tokens(message_id)
        assert unhashed == message_id and "~~" in hashed
        document = {"group": "g", "id": message_id, "type": "t", "record": {}, "dead_at": 0.0}
        await bus._jetstream().publish([
            (f"{bus.prefix}.dlb.g.{unhashed}", b"old", {}),
            (f"{bus.prefix}.dlr.g.{unhashed}", json.dumps(document).encode(), {}),
        ])
        shown = await letters.show("g", message_id)
        assert shown is not None and shown.message.body == b"old"
        assert await bus.purge("g", [message_id]) == 1
        assert await bus.dead_letters("g") == []


async def test_a_type_that_extends_another_type_is_not_delivered_to_the_shorter_ones_group(
    server_url: str,
) -> None:
    async with opened(bus_on(server_url)) as bus:
        short = await bus.subscribe("short", ["order"])
        await bus.publish([msg(1, "order.placed"), msg(2, "order")])
        got = await collect(short, 2, within=1.0)
        assert ids(got) == ["m2"]


async def test_buses_with_different_prefixes_on_one_server_are_independent(server_url: str) -> None:
    """Even when one prefix starts with the other, neither bus sees the other's messages."""
    tag = uuid.uuid4().hex[:8]
    async with (
        opened(bus_on(server_url, prefix=f"t{tag}")) as a,
        opened(bus_on(server_url, prefix=f"t{tag}-b")) as b,
    ):
        in_a, in_b = await a.subscribe("g", None), await b.subscribe("g", None)
        await a.publish([msg("a")])
        await b.publish([msg("b")])
        assert ids(await collect(in_a, 2, within=1.0)) == ["ma"]
        assert ids(await collect(in_b, 2, within=1.0)) == ["mb"]


async def test_without_multi_subject_filters_a_group_still_gets_only_its_types() -> None:
    """The fallback for nats-server < 2.10 (consumer takes the stream, subscription skips
    other types and other groups' replays), forced on whatever server is running."""
    async with opened(bus_on(require_broker("nats"))) as bus:
        bus._multi_filter = False
        mine = await bus.subscribe("mine", ["a"])
        theirs = await bus.subscribe("theirs", ["a", "b"])
        await bus.publish([msg(1, "a"), msg(2, "b"), msg(3, "a")])
        got = await collect(theirs, 3)
        await got[0].dead_letter({})
        await bus.replay("theirs")
        assert ids(await collect(mine, 3, within=1.0)) == ["m1", "m3"]


async def test_republishing_an_id_within_the_duplicate_window_stores_it_once() -> None:
    async with opened(bus_on(require_broker("nats"))) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        await bus.publish([msg(1), msg(2)])
        assert ids(await collect(subscription, 3, within=1.0)) == ["m1", "m2"]


async def test_a_failure_event_announced_again_under_its_id_is_not_dropped_as_a_duplicate() -> None:
    """A replayed event given up again announces it under the same (derived) id: a group
    that never took the first announcement must get the second, as on every other broker
    (the inboxes drop a copy a group already handled); its id reads back from the header."""
    async with opened(bus_on(require_broker("nats"))) as bus:
        subscription = await bus.subscribe("refund", ["choreograph.failed", "order.placed"])
        failure = Message(id="f-1", type="choreograph.failed", body=b'{"give-up": 1}')
        await bus.publish([failure])
        await bus.publish([failure._replace(body=b'{"give-up": 2}'), msg(2)])
        got = await collect(subscription, 3)
        assert [d.message for d in got] == [failure, failure._replace(body=b'{"give-up": 2}'), msg(2)]


# -- groups read back from the consumers -------------------------------------------------


async def _create_consumer(bus: NatsTransport, name: str, config: dict[str, Any]) -> None:
    """A consumer on the bus's events stream written by hand (not by this choreograph)."""
    assert bus._nc is not None
    request = {"stream_name": bus.events_stream, "config": {"durable_name": name, **config}}
    reply = await bus._nc.request(
        f"$JS.API.CONSUMER.CREATE.{bus.events_stream}.{name}", json.dumps(request).encode(), timeout=5
    )
    assert "error" not in json.loads(reply.data)


async def test_groups_are_read_back_from_the_consumers_with_their_types(server_url: str) -> None:
    """From another connection, so from the server: odd names, a wildcard group, an unbound
    type; on the shared server (2.9 without filters, types in the description) as on a current one."""
    url = bus_on(server_url)
    async with opened(url) as bus, NatsTransport(url) as other:
        await (await bus.subscribe("billing", ["shop.order.placed", "shop order.*"])).close()
        await (await bus.subscribe("billing.v2 eu*>%~ü", ["a"])).close()
        await (await bus.subscribe("audit", None)).close()
        await bus.unbind("billing", ["shop order.*"])
        assert await other.groups() == {
            "billing": frozenset({"shop.order.placed"}), "billing.v2 eu*>%~ü": frozenset({"a"}), "audit": None,
        }


# -- unbinding: what the group held of a removed type (see _nats_routing) ------------------


async def _consumer_info(bus: NatsTransport, group: str) -> dict[str, Any]:
    consumer = codec.name_token(group)
    return await bus._jetstream().api("read", f"CONSUMER.INFO.{bus.events_stream}.{consumer}")


async def _binding(bus: NatsTransport, group: str) -> Binding:
    read = consumers.binding(
        (await _consumer_info(bus, group))["config"], bus.prefix, multi_filter=bus._multi_filter
    )
    assert isinstance(read, Binding)
    return read


async def _acked_all(bus: NatsTransport, group: str) -> bool:
    return bool((await _consumer_info(bus, group))["num_ack_pending"] == 0)


async def _pending(bus: NatsTransport, group: str, count: int) -> bool:
    return bool((await _consumer_info(bus, group))["num_pending"] == count)


async def _pull_parked(bus: NatsTransport, group: str) -> bool:
    """The server holds a pull request of the group's (a fetch waiting for messages)."""
    return bool((await _consumer_info(bus, group))["num_waiting"] >= 1)


async def _wait_for(condition: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + WAIT
    while not await condition():
        assert time.monotonic() < deadline, "not within WAIT"
        await asyncio.sleep(0.02)


@given(
    st.frozensets(st.text(max_size=20), max_size=4),
    st.dictionaries(st.text(max_size=20), st.integers(0, 2**63), max_size=4),
    st.lists(st.text("0123456789abcdef", min_size=8, max_size=8), max_size=10),
    st.booleans(),
)
def test_a_binding_with_the_lines_of_removed_types_and_its_lineage_is_read_back_as_written(
    types: frozenset[str], lines: dict[str, int], lineage: list[str], multi_filter: bool
) -> None:
    written = Binding(types - lines.keys(), lines)
    config = consumers.config(
        prefix="p", lease=30, multi_filter=multi_filter, group="g", consumer="g", binding=written, lineage=lineage
    )
    assert consumers.binding(config, "p", multi_filter=multi_filter) == written
    assert consumers.bound_types(config, "p", multi_filter=multi_filter) == written.types
    assert consumers.lineage(config, multi_filter=multi_filter) == tuple(lineage[: consumers.LINEAGE])


def test_subscribing_for_a_removed_type_again_drops_its_line() -> None:
    binding = Binding(frozenset({"a", "b"})).unbound("g", ["b", "c"], 7)
    assert binding == Binding(frozenset({"a"}), {"b": 7})
    assert binding.widened(frozenset({"b"})) == Binding(frozenset({"a", "b"}))
    assert binding.widened(None) == Binding(None)


async def test_a_subscription_of_the_process_that_unbinds_skips_at_once_what_is_published_afterwards(
    server_url: str,
) -> None:
    """And what it held of the type still comes back, for the runtime to hand on."""
    async with opened(bus_on(server_url)) as bus:
        subscription = await bus.subscribe("billing", ["a", "b"])
        await bus.publish([msg(1, "b")])
        [held] = await collect(subscription, 1)
        await bus.unbind("billing", ["b"])
        await bus.publish([msg(2, "b"), msg(3, "a")])
        await held.retry(0)
        assert ids(await collect(subscription, 3, within=1.0)) == ["m1", "m3"]


@contextlib.asynccontextmanager
async def unbound_while_held(server_url: str) -> AsyncIterator[tuple[NatsTransport, Subscription, Delivery]]:
    """Group billing (types a and b) subscribed in one process, its subscription holding m1
    (type b, delivered and unsettled), when another process unbinds b: yields that other
    process's transport, the subscription and m1."""
    url = bus_on(server_url)
    async with opened(url) as bus, NatsTransport(url) as admin:
        subscription = await bus.subscribe("billing", ["a", "b"])
        await bus.publish([msg(1, "b")])
        [held] = await collect(subscription, 1)
        await admin.unbind("billing", ["b"])
        yield admin, subscription, held


async def test_a_subscription_of_another_process_learns_of_an_unbind_and_skips_what_is_published_afterwards(
    server_url: str,
) -> None:
    """Until its next check it may take such an event: handed back, it comes back and is skipped.
    m1, held below the line, stays unsettled: the filter cannot narrow, only the line skips m2."""
    async with unbound_while_held(server_url) as (admin, subscription, held):
        await admin.publish([msg(2, "b"), msg(3, "a")])
        seen: list[str] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for delivery in await subscription.fetch(10, timeout=0.2):
                seen.append(delivery.message.id)
                await (delivery.ack() if delivery.message.type == "a" else delivery.retry(0))
            info = await _consumer_info(admin, "billing")
            if "m3" in seen and info["num_pending"] == 0 and info["num_ack_pending"] == 1:
                break
        assert "m3" in seen
        assert (info["num_pending"], info["num_ack_pending"]) == (0, 1)  # m2 settled: skipped; m1 held
        assert (await _binding(admin, "billing")).removed.keys() == {"b"}
        assert held.message.id == "m1" and not held.settled


async def test_the_consumer_narrows_once_what_the_group_held_of_an_unbound_type_is_settled(
    server_url: str,
) -> None:
    """By a subscription's periodic check: here one of another process than the unbind."""
    async with unbound_while_held(server_url) as (admin, subscription, held):
        holding = await _binding(admin, "billing")
        assert holding.types == frozenset({"a"})
        assert set(holding.removed) == {"b"}
        assert await admin.groups() == {"billing": frozenset({"a"})}
        await held.dead_letter({"reason": "unhandled"})
        deadline = time.monotonic() + WAIT
        while (binding := await _binding(admin, "billing")).removed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert binding == Binding(frozenset({"a"}))
        if admin._multi_filter:
            filters = (await _consumer_info(admin, "billing"))["config"]["filter_subjects"]
            assert not any(".ev.b." in subject for subject in filters)


async def test_an_event_above_a_line_handed_back_before_the_line_is_dropped_is_skipped_when_it_comes_back(
    server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscription of another process takes m2 (b, published after the unbind) before its
    check and hands it back with a delay; m1, held below the line, is settled, and the check
    drops b's line and narrows the filter. Group shipping still holds m2, so the stream keeps
    it, and JetStream redelivers it to billing all the same (from 2.10: a message a consumer
    sent stays its own, filter or not): it is skipped, not delivered as an event of a bound type."""
    monkeypatch.setattr(_nats_pull, "REMOVAL_CHECK", 3600.0)  # its check made by hand, below
    async with unbound_while_held(server_url) as (admin, subscription, held):
        assert isinstance(subscription, _nats_pull.NatsSubscription)
        await (await admin.subscribe("shipping", ["b"])).close()
        await admin.publish([msg(2, "b"), msg(3, "a")])
        taken = await collect(subscription, 2)
        assert ids(taken) == ["m2", "m3"]  # it does not know of the unbind yet
        for delivery in taken:
            await (delivery.ack() if delivery.message.type == "a" else delivery.retry(2.0))
        await held.ack()

        async def floor_passed_the_line() -> bool:
            info = await _consumer_info(admin, "billing")
            return bool(info["ack_floor"]["stream_seq"] >= 1 and info["num_ack_pending"] == 1)

        await _wait_for(floor_passed_the_line)  # m1 and m3 settled, m2 handed back
        subscription.rebind(await subscription._read_binding())  # the check
        assert await _binding(admin, "billing") == Binding(frozenset({"a"}))
        assert await quiet(subscription, 4.0) == []  # m2 came back meanwhile
        assert (await _consumer_info(admin, "billing"))["num_ack_pending"] == 0  # skipped: acked


@pytest.mark.parametrize("types", [["a", "b"], None], ids=["b", "every-type"])
async def test_a_narrowing_read_before_a_subscribe_bound_the_type_again_and_written_after_it_is_repaired(
    server_url: str, types: list[str] | None
) -> None:
    """JetStream has no compare-and-set for a consumer's config: a narrowing decided on a read
    from before the subscribe undoes it. Interleaved here by hand; the subscription's next
    check finds a config that does not descend from its subscribe's write, and binds b (or
    every type) again."""
    url = bus_on(server_url)
    wanted = None if types is None else frozenset(types)
    async with opened(url) as bus, NatsTransport(url) as narrower:
        js, consumer = narrower._jetstream(), codec.name_token("billing")
        if types is None and not bus._multi_filter:
            # The documented gap: before 2.10 a wildcard group's description (types: null) keeps
            # no lineage, so its subscription has nothing to tell a racing write by.
            await bus.subscribe("billing", None)
            wildcard = await narrower._read_info(js, consumer)
            assert isinstance(wildcard, dict)
            assert narrower._lineage_of(wildcard) == ()
            assert await narrower.groups() == {"billing": None}
            return
        # b unbound, nothing held at or below its line: a check narrows it. One reads the consumer ...
        await narrower._write_consumer(js, "by hand", "billing", consumer, Binding(frozenset({"a"}), {"b": 0}), ())
        info = await narrower._read_info(js, consumer)
        assert isinstance(info, dict)
        # ... a replica subscribes for b, and its second read sees it bound ...
        subscription = await bus.subscribe("billing", types)
        assert await narrower.groups() == {"billing": wanted}
        # ... then the narrowing, computed from the first read, lands.
        stale = settled(narrower._binding_of(info), info)
        await narrower._write_consumer(js, "narrow", "billing", consumer, stale, narrower._lineage_of(info))
        assert await narrower.groups() == {"billing": frozenset({"a"})}

        async def bound_again() -> bool:
            return await narrower.groups() == {"billing": wanted}

        await _wait_for(bound_again)
        await narrower.publish([msg(1, "b")])
        assert ids(await collect(subscription, 1)) == ["m1"]


async def test_a_run_of_single_type_unbinds_in_one_process_stands(server_url: str) -> None:
    """Ten writes of the consumer between two checks of the subscription (one a second): its
    mark must still be in the lineage, or it takes the last unbind for a race and binds all
    ten types again (it did with a lineage of 8 stamps)."""
    async with opened(bus_on(server_url)) as bus:
        types = [f"t{i}" for i in range(10)]
        subscription = await bus.subscribe("billing", [*types, "keep"])
        for event_type in types:
            await bus.unbind("billing", [event_type])
        assert await bus.groups() == {"billing": frozenset({"keep"})}
        await asyncio.sleep(2.5 * _nats_pull.REMOVAL_CHECK)  # the subscription checks at least twice
        assert await bus.groups() == {"billing": frozenset({"keep"})}
        await subscription.close()


def test_before_2_10_a_description_short_of_room_drops_the_lineage_before_the_types() -> None:
    """The description (4,096 bytes) keeps the types; the lineage goes first, then the list."""
    lineage = tuple(f"{i:08x}" for i in range(consumers.LINEAGE))

    def written(types: int) -> Any:
        binding = Binding(frozenset(f"shop.order.type{i:04d}" for i in range(types)))
        config = consumers.config(prefix="p", lease=30.0, multi_filter=False, group="g", consumer="g",
                                  binding=binding, lineage=lineage)
        return config, consumers.binding(config, "p", multi_filter=False)

    config, bound = written(20)
    assert consumers.lineage(config, multi_filter=False) == lineage
    config, bound = written(173)  # fits without the lineage only
    assert consumers.lineage(config, multi_filter=False) == ()
    assert isinstance(bound, Binding) and bound.types is not None and len(bound.types) == 173
    config, bound = written(400)
    assert isinstance(bound, Binding) and bound.types is None  # every type rather than miss one


@pytest.mark.parametrize("holds", ["nothing", "an event of another type"])
async def test_unbinding_a_type_the_group_holds_nothing_of_narrows_its_consumer_at_once(
    server_url: str, holds: str
) -> None:
    """Without a running subscription nobody would narrow it later. Nothing held at all: the
    consumer says so (another group still holds an event of b). An event of type a held: no
    event of b is left in the stream."""
    async with opened(bus_on(server_url)) as bus:
        billing = await bus.subscribe("billing", ["a", "b"])
        shipping = await bus.subscribe("shipping", ["b"])
        await bus.publish([msg(1, "b")])
        await (await collect(billing, 1))[0].ack()
        await billing.close()  # no subscription of the group runs
        await _wait_for(lambda: _acked_all(bus, "billing"))
        if holds == "an event of another type":
            await (await collect(shipping, 1))[0].ack()
            await _wait_for(lambda: _acked_all(bus, "shipping"))
            await bus.publish([msg(2, "a")])
            # The server counts it into the consumer's num_pending after acking the publish
            # (a read at once said 0 under load): wait for it to say the group holds it.
            await _wait_for(lambda: _pending(bus, "billing", 1))
        assert await bus.unbind("billing", ["b"]) == frozenset({"a"})
        assert await _binding(bus, "billing") == Binding(frozenset({"a"}))
        if bus._multi_filter:
            filters = (await _consumer_info(bus, "billing"))["config"]["filter_subjects"]
            assert not any(".ev.b." in subject for subject in filters)


async def test_a_subscription_that_cannot_read_its_consumer_warns_once_and_says_when_it_can_again(
    server_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its group's consumer deleted under it: a warning after a few checks in a row fail, not
    one every check; once the group is registered again, one info line."""
    monkeypatch.setattr(_nats_pull, "REMOVAL_CHECK", 0.02)
    caplog.set_level(logging.DEBUG, logger="choreograph.transports.nats")
    url = bus_on(server_url)

    def said(level: int, text: str) -> int:
        return sum(r.levelno == level and text in r.getMessage() for r in caplog.records)

    async def failed_checks(count: int) -> bool:
        return said(logging.DEBUG, "reading the binding of group 'billing'") >= count

    async with opened(url) as bus, NatsTransport(url) as admin:
        await bus.subscribe("billing", ["a"])
        await admin._jetstream().api("delete", f"CONSUMER.DELETE.{admin.events_stream}.billing")
        await _wait_for(lambda: failed_checks(3 * _nats_pull.WARN_AFTER))
        assert said(logging.WARNING, "cannot read the consumer of group 'billing'") == 1
        assert "no longer exists" in caplog.text
        await (await admin.subscribe("billing", ["a"])).close()

        async def read_again() -> bool:
            return said(logging.INFO, "the consumer of group 'billing' can be read again") > 0

        await _wait_for(read_again)
        checks = said(logging.DEBUG, "reading the binding of group 'billing'")
        await asyncio.sleep(0.2)  # more checks, all reading it
        assert said(logging.DEBUG, "reading the binding of group 'billing'") == checks
        assert said(logging.INFO, "can be read again") == 1
        assert said(logging.WARNING, "cannot read the consumer of group 'billing'") == 1


# -- the lease: the consumer's ack_wait ---------------------------------------------------


def _with_lease(url: str, lease: float | None) -> str:
    """``url`` (the same bus: the same prefix) with ``lease`` instead (``None``: no ``?lease=``)."""
    return re.sub(r"[?&]lease=[^&]*", "", url) + ("" if lease is None else f"&lease={lease}")


async def _ack_wait(bus: NatsTransport, group: str) -> float:
    return int((await _consumer_info(bus, group))["config"]["ack_wait"]) / 1e9


@pytest.mark.parametrize("types", [["a"], None], ids=["typed", "every-type"])
async def test_a_group_subscribed_again_with_another_lease_takes_it_on_the_server(
    server_url: str, types: list[str] | None
) -> None:
    """The consumer's ack_wait is the lease of the URL the group was last subscribed with, not
    the one it was created with (it was only rewritten when its types changed): a delivery held
    past the old lease, within the new one, is not redelivered to another replica. And back."""
    short = bus_on(server_url, lease=1)
    long = _with_lease(short, 4)
    async with opened(short) as bus:
        await (await bus.subscribe("billing", types)).close()
        assert await _ack_wait(bus, "billing") == 1
        async with NatsTransport(long) as replica, NatsTransport(long) as other:
            holder = await replica.subscribe("billing", types)
            assert await _ack_wait(bus, "billing") == 4
            waiting = await other.subscribe("billing", types)
            await bus.publish([msg(1, "a")])
            [held] = await collect(holder, 1)
            # 2.5 s: past the old lease (1 s), within the new one (4 s); nobody touches it
            assert await asyncio.gather(holder.fetch(10, timeout=2.5), waiting.fetch(10, timeout=2.5)) == [[], []]
            assert (await _consumer_info(bus, "billing"))["num_redelivered"] == 0
            await held.ack()
            await _wait_for(lambda: _acked_all(bus, "billing"))
        again = await bus.subscribe("billing", types)
        assert await _ack_wait(bus, "billing") == 1
        await bus.publish([msg(2, "a")])
        [first, second] = await collect(again, 2)  # the second: the first, its 1 s lease run out
        assert (first.message.id, first.attempt, second.message.id, second.attempt) == ("m2", 1, "m2", 2)
        await again.close()


async def test_unbinding_and_narrowing_keep_the_lease_the_group_was_last_subscribed_with(server_url: str) -> None:
    """During a rolling change of the lease (1 s to 4 s): a replica still on the old lease
    narrowing the group's consumer, and ``choreograph groups unbind`` with a URL without
    ``?lease=`` (30 s), rewrite the consumer but keep its ack_wait."""
    old = bus_on(server_url, lease=1)
    async with opened(old) as bus, NatsTransport(_with_lease(old, 4)) as new, NatsTransport(
        _with_lease(old, None)
    ) as admin:
        subscription = await bus.subscribe("billing", ["a", "b"])  # the old replica, still running
        await (await new.subscribe("billing", ["a", "b"])).close()  # a new one started (and stopped)
        assert await _ack_wait(bus, "billing") == 4
        await bus.publish([msg(1, "b")])
        [held] = await collect(subscription, 1)
        await admin.unbind("billing", ["b"])
        assert (await _binding(admin, "billing")).removed.keys() == {"b"}  # written: m1 is held under the line
        assert await _ack_wait(bus, "billing") == 4
        await held.dead_letter({"reason": "unhandled"})

        async def narrowed() -> bool:  # by the old replica's subscription: the only one running
            return await _binding(admin, "billing") == Binding(frozenset({"a"}))

        await _wait_for(narrowed)
        assert await _ack_wait(bus, "billing") == 4
        await subscription.close()


async def test_a_consumer_choreograph_did_not_create_is_not_a_group(server_url: str) -> None:
    async with opened(bus_on(server_url)) as bus:
        await (await bus.subscribe("billing", ["a"])).close()
        await _create_consumer(bus, "someone-else", {"ack_policy": "explicit"})
        await _create_consumer(bus, "described", {"ack_policy": "explicit", "description": "a tap"})
        assert await bus.groups() == {"billing": frozenset({"a"})}


async def test_a_bus_without_groups_lists_none() -> None:
    async with opened(bus_on(require_broker("nats"))) as bus:
        assert await bus.groups() == {}


async def test_groups_pages_through_more_consumers_than_one_answer_of_the_server_holds(
    server: NatsServer,
) -> None:
    """The server lists 256 consumers at a time."""
    async with opened(bus_on(server.url)) as bus:
        names = [f"g{n:03}" for n in range(260)]
        for name in names:
            await (await bus.subscribe(name, [name])).close()
        listed = await bus.groups()
        assert listed is not None and sorted(listed) == names
        assert all(listed[name] == frozenset({name}) for name in names)


async def test_a_group_whose_consumer_name_is_hashed_is_named_by_its_description_on_2_10(
    server: NatsServer,
) -> None:
    long = "billing." * 30
    async with opened(bus_on(server.url)) as bus:
        assert bus._multi_filter
        await (await bus.subscribe(long, ["a"])).close()
        assert "~~" in codec.name_token(long)
        assert await bus.groups() == {long: frozenset({"a"})}


async def test_before_2_10_a_group_whose_consumer_name_is_hashed_makes_groups_say_it_cannot_tell() -> None:
    """Its description holds its types, its consumer name a digest: leaving it out would make
    `choreograph dlq` refuse it as an unknown group. (The fallback forced on whatever server runs.)"""
    async with opened(bus_on(require_broker("nats"))) as bus:
        bus._multi_filter = False
        await (await bus.subscribe("billing", ["a"])).close()
        assert await bus.groups() == {"billing": frozenset({"a"})}
        await (await bus.subscribe("billing." * 30, ["a"])).close()
        assert await bus.groups() is None


async def test_before_2_10_a_group_an_older_choreograph_made_without_its_types_takes_every_type() -> None:
    """Its consumer has no filter and only the group's name in its description: every event
    reaches the group, whose subscriptions skipped the types they did not handle."""
    async with opened(bus_on(require_broker("nats"))) as bus:
        bus._multi_filter = False
        await _create_consumer(
            bus, "legacy", {"ack_policy": "explicit", "deliver_policy": "new", "description": "choreograph group legacy"}
        )
        assert await bus.groups() == {"legacy": None}


async def test_before_2_10_a_subscription_whose_group_an_older_choreograph_rewrote_skips_nothing() -> None:
    """Its types are then recorded nowhere: reading them again finds every type, not none."""
    async with opened(bus_on(require_broker("nats"))) as bus:
        bus._multi_filter = False
        subscription = await bus.subscribe("legacy", ["a"])
        await _create_consumer(
            bus, "legacy", {"ack_policy": "explicit", "deliver_policy": "new", "description": "choreograph group legacy"}
        )
        await bus.publish([msg(1, "b"), msg(2, "a")])  # b: a type it does not know, so it reads them again
        assert ids(await collect(subscription, 2)) == ["m1", "m2"]


# -- limits ------------------------------------------------------------------------------


async def test_a_body_larger_than_max_payload_is_refused_and_the_connection_survives() -> None:
    async with opened(bus_on(require_broker("nats"))) as bus:
        subscription = await bus.subscribe("g", None)
        assert bus._nc is not None
        with pytest.raises(TransportError, match="max_payload"):
            await bus.publish([msg(1, body=b"x" * (bus._nc.max_payload + 1))])
        await bus.publish([msg(2)])
        assert ids(await collect(subscription, 1)) == ["m2"]


async def test_a_body_of_exactly_max_payload_can_be_dead_lettered_and_replayed() -> None:
    async with opened(bus_on(require_broker("nats"))) as bus:
        assert bus._nc is not None
        body = b"\x01" * bus._nc.max_payload
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1, body=body)])
        (delivery,) = await collect(subscription, 1)
        await delivery.dead_letter({"reason": "rejected", "traceback": "x" * 10_000})
        letter = await bus.dead_letter("g", "m1")
        assert letter is not None and letter.message.body == body
        assert await bus.replay("g", ["m1"]) == 1
        (again,) = await collect(subscription, 1)
        assert again.message.body == body


async def test_a_dead_letter_whose_record_exceeds_max_payload_is_kept_shown_replayed_and_purged(
    server_url: str,
) -> None:
    """The runtime's record holds the original envelope, so an event near max_payload (or
    one of non-ASCII text, which JSON escapes) has a record past it: it must still be kept."""
    async with opened(bus_on(server_url)) as bus:
        assert bus._nc is not None
        room = bus._nc.max_payload
        body = b"\x02" * (room - 100)
        record = {"reason": "rejected", "envelope": "\u4e2d" * room, "traceback": "t" * 10_000}
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1, body=body), msg(2)])
        for delivery in await collect(subscription, 2):
            await delivery.dead_letter({**record, "id": delivery.message.id})
        letters = await bus.dead_letters("g")
        assert [(letter.message.id, dict(letter.record)) for letter in letters] == [
            ("m1", {**record, "id": "m1"}), ("m2", {**record, "id": "m2"})
        ]
        shown = await bus.dead_letter("g", "m1")
        assert shown is not None and shown.message.body == body and dict(shown.record) == {**record, "id": "m1"}
        assert await bus.replay("g", ["m1"]) == 1
        (again,) = await collect(subscription, 1)
        assert (again.message.body, again.attempt) == (body, 1)
        await again.ack()
        assert await bus.purge("g", ["m2"]) == 1
        assert await bus.dead_letters("g") == []
        state = (await bus._jetstream().api("info", f"STREAM.INFO.{bus.dead_letter_stream}"))["state"]
        assert state["messages"] == 0  # no part of a record left behind


async def test_fetch_fails_instead_of_hanging_when_the_bus_is_deleted() -> None:
    url = bus_on(require_broker("nats"))
    async with opened(url) as bus:
        subscription = await bus.subscribe("g", None)
        await broker.cleanup(url)
        with pytest.raises(TransportError):
            await subscription.fetch(10, timeout=WAIT)


async def test_publish_to_a_deleted_bus_fails_with_transport_error() -> None:
    url = bus_on(require_broker("nats"))
    async with opened(url) as bus:
        await broker.cleanup(url)
        with pytest.raises(TransportError):
            await bus.publish([msg(1)])


async def test_replay_to_a_group_whose_consumer_is_gone_fails_and_keeps_the_dead_letter() -> None:
    """Interest retention would drop a replay nobody consumes: refuse instead of losing it."""
    async with opened(bus_on(require_broker("nats"))) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        (delivery,) = await collect(subscription, 1)
        await delivery.dead_letter({"reason": "rejected"})
        await subscription.close()
        assert bus._nc is not None
        await bus._nc.request(f"$JS.API.CONSUMER.DELETE.{bus.events_stream}.g", b"", timeout=5)
        with pytest.raises(TransportError, match="consumer not found"):
            await bus.replay("g")
        assert [letter.message.id for letter in await bus.dead_letters("g")] == ["m1"]


async def test_fetch_with_a_zero_timeout_returns_what_is_already_there() -> None:
    async with opened(bus_on(require_broker("nats"))) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1), msg(2)])
        assert ids(await subscription.fetch(10, timeout=0)) == ["m1", "m2"]


async def test_a_closed_subscription_refuses_to_fetch() -> None:
    async with opened(bus_on(require_broker("nats"))) as bus:
        subscription = await bus.subscribe("g", None)
        await subscription.close()
        with pytest.raises(TransportClosed):
            await subscription.fetch(1, timeout=0.1)


async def test_closing_a_subscription_ends_a_fetch_that_is_waiting() -> None:
    async with opened(bus_on(require_broker("nats"))) as bus:
        subscription = await bus.subscribe("g", None)
        waiting = asyncio.ensure_future(subscription.fetch(10))
        await asyncio.sleep(0.1)
        await subscription.close()
        assert await asyncio.wait_for(waiting, WAIT) == []


# -- broker restarts (private server) ----------------------------------------------------


async def _settle_some_and_leave_two_in_flight(url: str) -> list[Delivery]:
    """m0 acked, m1 dead-lettered, m2 and m3 delivered and unsettled; the transport closed.

    Under a lease no stall reaches (``url``'s own, short so that m2 and m3 come back soon after
    the restart, is taken on by the group when it subscribes again): a dead letter after its
    delivery's lease is dropped, so a stall of a second before m1's (1.2 s, injected) lost it
    under the 1 s lease these tests used throughout."""
    async with NatsTransport(_with_lease(url, 60)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(n) for n in range(4)])
        first = await collect(subscription, 4)
        assert [d.message.id for d in first] == ["m0", "m1", "m2", "m3"]
        await first[0].ack()
        await first[1].dead_letter({"reason": "rejected"})
    return first


async def _everything_delivered(subscription: Subscription) -> dict[str, int]:
    """message id -> attempt of everything the group gets until it goes quiet (acking it all),
    each message's first delivery here: one whose ack came after a short lease ran out (a stall)
    is handed out again, attempt + 1, before the group goes quiet."""
    seen: dict[str, int] = {}
    while batch := await subscription.fetch(100, timeout=3.0):
        for delivery in batch:
            seen.setdefault(delivery.message.id, delivery.attempt)
        await subscription.ack_many(batch)
    return seen


@pytest.mark.slow
async def test_settlements_delivery_counts_and_dead_letters_survive_a_clean_server_restart(
    server: NatsServer,
) -> None:
    url = bus_on(server.url, lease=1)
    await _settle_some_and_leave_two_in_flight(url)
    server.restart(graceful=True)
    async with opened(url) as bus:
        assert await _everything_delivered(await bus.subscribe("g", None)) == {"m2": 2, "m3": 2}
        assert [letter.message.id for letter in await bus.dead_letters("g")] == ["m1"]


@pytest.mark.slow
async def test_nothing_confirmed_is_lost_when_the_server_is_killed(server: NatsServer) -> None:
    """kill -9: in-flight deliveries come back and dead letters stay (a settlement made just
    before the kill may be redelivered: at least once, never lost)."""
    url = bus_on(server.url, lease=1)
    await _settle_some_and_leave_two_in_flight(url)
    server.restart()
    async with opened(url) as bus:
        assert {"m2", "m3"} <= set(await _everything_delivered(await bus.subscribe("g", None)))
        assert [letter.message.id for letter in await bus.dead_letters("g")] == ["m1"]


@pytest.mark.slow
async def test_a_live_transport_resumes_consuming_and_publishing_after_a_server_restart(
    server: NatsServer,
) -> None:
    """A fetch parked across the restart gets what is published after it; an unsettled
    delivery comes back after its lease with the next attempt. The lease outlasts a restart
    on a loaded machine (at 2 s it ran out first and the parked fetch got m1 back instead)."""
    async with opened(bus_on(server.url, lease=10)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        (unsettled,) = await subscription.fetch(1, timeout=WAIT)
        waiting = asyncio.ensure_future(subscription.fetch(10, timeout=3 * WAIT))
        await _wait_for(lambda: _pull_parked(bus, "g"))  # on the old connection, before the restart

        await asyncio.to_thread(server.restart, graceful=True)  # graceful: delivery counts persist
        await bus.publish([msg(2)])  # rides out the reconnect, then is confirmed

        assert [(d.message.id, d.attempt) for d in await waiting] == [("m2", 1)]
        (back,) = await subscription.fetch(10, timeout=WAIT)
        assert (back.message.id, back.attempt) == (unsettled.message.id, 2)


@pytest.mark.slow
async def test_acks_made_after_a_restart_settle_deliveries_fetched_before_it(server: NatsServer) -> None:
    async with opened(bus_on(server.url, lease=5)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        (delivery,) = await collect(subscription, 1)
        await asyncio.to_thread(server.restart, graceful=True)
        await wait_connected(bus)
        await delivery.ack()
        assert await subscription.fetch(10, timeout=6.0) == []  # past the lease: it stayed acked


@pytest.mark.slow
async def test_an_operation_while_the_server_is_down_fails_with_transport_error_not_a_hang(
    server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from choreograph.transports import _nats_client

    monkeypatch.setattr(_nats_client, "PUBLISH_TIMEOUT", 1.0)
    async with opened(bus_on(server.url)) as bus:
        server.kill()
        try:
            with pytest.raises(TransportError):
                await bus.publish([msg(1)])
        finally:
            server.start()


async def wait_connected(bus: NatsTransport) -> None:
    deadline = time.monotonic() + WAIT
    while bus._nc is None or not bus._nc.is_connected:
        assert time.monotonic() < deadline, "did not reconnect"
        await asyncio.sleep(0.05)


# -- the client fast paths (bulk writes, direct delivery) and the paths without them ---------


@pytest.mark.parametrize(
    "raw",
    [
        b"NATS/1.0\r\nNats-Msg-Id: abc-1\r\n\r\n",
        b"NATS/1.0\r\nNats-Msg-Id:  spaced \r\n\r\n",
        b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n",
        b"NATS/1.0\r\nNats-Msg-Id: abc-2\r\nX-Other: y\r\n\r\n",
        pytest.param(
            "NATS/1.0\r\nNats-Msg-Id: ~C3~A9-\u00e9\r\n\r\n".encode(),
            marks=pytest.mark.skipif(
                tuple(map(int, version("nats-py").split(".")[:2])) < (2, 15),
                reason="nats-py before 2.15 reads no headers at all from a block holding non-ASCII",
            ),
        ),
        b"NATS/1.0 404 No Messages\r\n\r\n",
        b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\nNats-Pending-Bytes: 12\r\n\r\n",
        b"NATS/1.0 409 Consumer Deleted\r\n\r\n",
        b"NATS/1.0 503\r\n\r\n",
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\nNats-Last-Stream: 9\r\n\r\n",
        b"NATS/1.0\r\nA: 1\r\nB:  two words \r\n\r\n",
    ],
)
async def test_direct_delivery_reads_header_blocks_as_nats_py_does(raw: bytes) -> None:
    """choreograph's own inboxes skip nats-py's header parsing: what they read must agree."""
    from nats.aio.client import Client

    from choreograph.transports._nats_client import parse_headers

    assert parse_headers(raw) == await Client()._process_headers(raw)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-paths", "nats-py-paths"])
async def test_publish_fetch_ack_and_dead_letters_with_and_without_the_client_fast_paths(
    server_url: str, fast: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Batches written as encoded commands and messages delivered straight from the parser,
    or (a nats-py without those internals) through publish() and subscription callbacks."""
    from choreograph.transports import _nats_client, _nats_pull
    from choreograph.transports import nats as nats_transport

    if not fast:
        monkeypatch.setattr(_nats_client, "DIRECT_SUPPORTED", False)
        monkeypatch.setattr(nats_transport, "DIRECT_SUPPORTED", False)
        monkeypatch.setattr(_nats_client, "bulk_supported", lambda nc: False)
        monkeypatch.setattr(_nats_pull, "bulk_supported", lambda nc: False)
    caplog.set_level("INFO", logger="choreograph.transports.nats")
    async with opened(bus_on(server_url)) as bus:
        assert ("lacks the client internals" in caplog.text) is not fast  # the slow path says so
        assert bus._js is not None and bus._js.bulk is fast
        subscription = await bus.subscribe("g", None)
        assert isinstance(subscription, _nats_pull.NatsSubscription) and subscription._bulk is fast
        assert bool(bus._nc._direct) is fast  # type: ignore[union-attr]
        await bus.publish([msg(n) for n in range(300)])
        got = await collect(subscription, 300)
        assert ids(got) == sorted(f"m{n}" for n in range(300))
        assert {d.message.body for d in got} == {f"body-{n}".encode() for n in range(300)}
        await subscription.ack_many(got[:-1])
        await got[-1].dead_letter({"reason": "test"})
        assert await subscription.fetch(10, timeout=1.0) == []  # acked: nothing comes back
        (letter,) = await bus.dead_letters("g")
        assert letter.message.id == got[-1].message.id and letter.message.body == got[-1].message.body
        # the broker still drops a republished id (the dedupe header went out in the encoded batch)
        await bus.publish([msg(0), msg("new")])
        assert ids(await collect(subscription, 1)) == ["mnew"]
        assert await subscription.fetch(10, timeout=0.5) == []


async def test_commands_go_to_the_socket_at_once_unless_queued_ones_must_go_first(server_url: str) -> None:
    """``send_commands`` writes straight to the socket when nothing waits in the client's write
    queue (no loop turn for the flusher on the path of an output or a pull request); behind
    commands nats-py still holds it queues, so the server reads them in the order sent."""
    from choreograph.transports._nats_client import send_commands

    async with opened(bus_on(server_url)) as bus:
        nc = bus._nc
        assert nc is not None
        subject = f"direct.{uuid.uuid4().hex}"
        got: list[bytes] = []

        async def received(m: Any) -> None:
            got.append(m.data)

        sub = await nc.subscribe(subject, cb=received)
        await nc.flush()
        await send_commands(nc, b"PUB %s 1\r\na\r\n" % subject.encode(), 1)
        assert nc._pending_data_size == 0  # written, not left to the flusher
        await nc.publish(subject, b"b")  # queued for the flusher, which has not run yet
        assert nc._pending_data_size > 0
        await send_commands(nc, b"PUB %s 1\r\nc\r\n" % subject.encode(), 1)
        assert nc._pending_data_size > 0  # queued behind b
        await nc.flush()
        for _ in range(1000):  # bounded: up to 10 s on a loaded machine
            if len(got) == 3:
                break
            await asyncio.sleep(0.01)
        assert got == [b"a", b"b", b"c"]
        await sub.unsubscribe()


async def test_an_ack_batch_whose_write_failed_is_acked_by_the_retry(
    server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker retries a settle step that raised: the deliveries of an ack write that failed
    (a full reconnect buffer, say) must still be unsettled then, or the retry acks nothing and
    the whole batch comes back after the lease."""
    import nats.errors

    from choreograph.transports import _nats_pull

    real = _nats_pull.send_commands
    writes: list[int] = []

    async def failing_once(nc: object, commands: bytes, count: int) -> None:
        if commands.startswith(b"PUB $JS.API."):  # a pull request, not an ack
            await real(nc, commands, count)  # type: ignore[arg-type]
            return
        writes.append(count)
        if len(writes) == 1:
            raise nats.errors.OutboundBufferLimitError
        await real(nc, commands, count)  # type: ignore[arg-type]

    monkeypatch.setattr(_nats_pull, "send_commands", failing_once)
    async with opened(bus_on(server.url, lease=1)) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(n) for n in range(5)])
        got = await collect(subscription, 5)
        with pytest.raises(TransportError):
            await subscription.ack_many(got)
        assert not any(d.settled for d in got)
        await subscription.ack_many(got)  # what the worker's settle retry does
        assert writes == [5, 5] and all(d.settled for d in got)
        await asyncio.sleep(1.5)  # past the lease: an unacked message would be back
        assert await subscription.fetch(10, timeout=1.0) == []


@pytest.mark.parametrize("verb", second_call.VERBS)
async def test_a_verb_whose_write_failed_is_done_by_a_second_call(
    server: NatsServer, verb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The +ACK, -NAK or +TERM of a delivery could not be written (a full reconnect buffer,
    say): the delivery stays unsettled, so the worker's settle retry sends it - a retry back at
    once, an ack that stays, a dead letter stored and terminated - not the message back after
    its ack wait."""
    import nats.errors

    async with opened(bus_on(server.url, lease=second_call.lease_for(verb))) as bus:
        subscription = await bus.subscribe("g", None)
        await bus.publish([msg(1)])
        (delivery,) = await collect(subscription, 1)
        assert isinstance(delivery, NatsDelivery)
        client = bus._nc
        assert client is not None
        real = client.publish
        settlements: list[bytes] = []

        async def failing_once(subject: str, payload: bytes = b"", **options: Any) -> None:
            if subject == delivery._reply:
                settlements.append(payload)
                if len(settlements) == 1:
                    raise nats.errors.OutboundBufferLimitError
            await real(subject, payload, **options)

        monkeypatch.setattr(client, "publish", failing_once)
        await second_call.check_a_second_call_does_the_work(bus, subscription, delivery, verb, TransportError)
        assert len(settlements) == 2


async def test_a_delivery_that_waited_in_the_buffer_past_its_lease_is_not_dead_lettered(server_url: str) -> None:
    """A delivery's lease ran from when the client made it (handed out by a fetch), not from when
    the message arrived: one that waited in the buffer (a reply that came after its fetch gave up
    waits for the next one) had its lease on the server run out unseen, and its late dead letter
    was stored, its TERM settling - by stream sequence - a copy another consumer may have handled."""
    async with opened(bus_on(server_url, lease=1)) as bus:
        subscription = await bus.subscribe("g", ["order.placed"])
        assert isinstance(subscription, _nats_pull.NatsSubscription)
        await bus.publish([msg(1)])
        request = b'{"batch":1,"expires":%d}' % 5_000_000_000
        await subscription._round(request, 1, asyncio.get_running_loop().time() + 10.0, None)
        assert len(subscription._buffer) == 1  # arrived, not yet handed out
        await asyncio.sleep(1.5)  # the lease of 1 s runs out on the server meanwhile
        (late,) = await subscription.fetch(1, timeout=0)
        await late.dead_letter({"reason": "late"})
        assert await bus.dead_letters("g") == []
        (again,) = await collect(subscription, 1)  # the server hands it out again
        assert again.message.id == "m1" and again.attempt == 2


def test_a_message_from_the_parser_reads_no_clock_until_a_pull_subscription_buffers_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every message the parser hands over (a PubAck for each event published, an API reply)
    read the clock for a lease only a pull reply has; the pull subscription stamps its own."""
    from choreograph.transports._nats_client import Raw

    reads: list[None] = []
    real = time.monotonic

    def counted() -> float:
        reads.append(None)
        return real()

    monkeypatch.setattr(time, "monotonic", counted)
    Raw(None, "_INBOX.x.1", "", b'{"stream":"S","seq":1}', None)  # type: ignore[arg-type]
    assert reads == []
    pull = Raw(None, "_INBOX.y", "$JS.ACK.S.g.1.1.1.0.0", b"{}", None)  # type: ignore[arg-type]
    subscription = _nats_pull.NatsSubscription.__new__(_nats_pull.NatsSubscription)
    subscription._buffer, subscription._waiter = collections.deque(), None  # what _reply uses
    subscription._reply(pull)
    assert len(reads) == 1 and pull.arrived <= real()
