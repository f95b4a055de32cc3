"""RabbitMQ transport (AMQP 0-9-1 via aio-pika).

``amqp://user:pass@host:5672/vhost?lease=30&prefix=choreograph&queue_type=quorum``

* ``prefix`` isolates independent buses on one server (every name starts with it;
  see :mod:`choreograph.transports._amqp_wire` for the layout).
* ``queue_type`` is ``quorum`` (default: replicated, counts redeliveries) or ``classic``.
* Other query parameters go to aio-pika (``heartbeat``, ``reconnect_interval``, ...); one it
  does not read is a :class:`ConfigurationError`, not silently ignored (``?prefx=shop``
  would have published into the default namespace).

How the contract maps onto RabbitMQ:

* ``publish`` sends the batch on a publisher-confirms channel and awaits all confirms
  together (one round trip per batch), persistent messages, routing key = event type.
* A group is a durable queue bound to its types on the ``<prefix>.events`` topic
  exchange (``#`` for all types); subscribing again adds bindings, never removes one
  (the contract widens a group's types); only ``unbind`` removes some. AMQP cannot list
  bindings or queues, so each group's types are also kept as a message in
  ``<prefix>.registry`` (read the same way as dead letters): that is how ``groups()``
  and ``dead_letters()`` find every group.
  Two subscribes racing may each write an entry; the group's types are their union.
* Consumers of a group compete on its queue with manual acks and a prefetch sized to
  ``fetch``. The lease is kept by the consuming process, since RabbitMQ has none; see
  :mod:`choreograph.transports._amqp_consumer` for exactly what it covers. Nothing of it
  is declared on the broker (no queue argument or policy): a changed ``?lease=`` applies
  to what each process holds as it restarts with it, whatever other replicas run with.
* ``retry(after)`` publishes a copy with attempt + 1 to a holding queue whose TTL
  dead-letters it back into the group's queue (no plugin needed). Delays are rounded up
  to one of ~90 buckets (at most 25% late, never early). ``defer(after)`` is the same
  with the attempt unchanged.
* Dead letters live in ``<prefix>.dlq.<group>``: body = record as one JSON line, a
  newline, then the original body. One per (group, message id): a queue cannot replace
  a message, so a second failed copy of an event published twice is stored beside the
  first, and every read (list, show, replay, purge) drops the older letters of an id
  while it holds them all (see ``_browsing``). Listing reads them with ``basic.get`` and returns
  them to the queue by closing the channel, so two admins listing the same group at the
  same instant each see only part of it. A quorum queue does not keep returned messages
  in their place, so the queue's order is not the letters' age once some were listed:
  listing reads them all and sorts them by the time each was dead-lettered.
* The connection is robust: after a broker restart or network loss it reconnects, the
  consumers resume, and operations wait up to ``ready_timeout`` seconds for it.
  Deliveries received on the lost connection are void (the broker took them back and
  redelivers them): their verbs return without doing anything but log it (see
  ``_amqp_consumer``), and unfetched ones are dropped from the buffer.
* A consumer the broker cancels itself (``basic.cancel`` from the server: its queue was
  deleted, a quorum queue lost its leader) is consumed again by aio-pika, which needs
  10.2 or later (before that it only logged "cancelled by the broker" and the group
  received nothing more). A deleted group queue comes back declared by that recovery but
  without its bindings: events reach it again once the group subscribes again.
* RabbitMQ 3.10 loses what the most recently created quorum queue holds - confirmed
  messages included - when the node is killed (SIGKILL, power loss): a retry into a retry
  queue the retry had just created, or a dead letter in the dead-letter queue the group's
  subscribe had just created, was gone after the restart. So after declaring queues a
  subscribe or a retry (re)declare creates and deletes a throwaway quorum queue, which makes
  them durable (see ``_settle_declares``); a broker killed during the declares themselves,
  before anything is published into them, loses nothing.
* RabbitMQ 4 quorum queues get ``x-delivery-limit: -1`` (its default limit of 20 would
  drop messages that keep coming back); untested here, where the server is 3.10.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
import orjson
from aio_pika.connection import make_url

from choreograph._redact import redact
from choreograph.errors import ConfigurationError, TransportClosed, TransportError
from choreograph.transports import lease_from_url, refuse_repeated, refuse_unreadable
from choreograph.transports._amqp_connect import (
    OUR_PARAMS,
    QUEUE_TYPES,
    check_client_params,
    check_client_values,
    open_refusal,
    server_major,
)
from choreograph.transports._amqp_consumer import AmqpSubscription
from choreograph.transports._amqp_wire import (
    CONTENT_TYPE,
    RETRY_REDECLARE_S,
    Names,
    Raw,
    check_binding_type,
    dead_letter_id,
    outgoing,
    queue_arguments,
    read_dead_letter,
    retry_bucket_ms,
    retry_queue_arguments,
    translated,
)
from choreograph.transports.base import (
    DeadLetter,
    Message,
    Subscription,
    Transport,
    narrowed,
    no_such_group,
    widened,
)

log = logging.getLogger("choreograph.transports.amqp")

__all__ = ["AmqpTransport"]

_UNKNOWN: Any = object()


class AmqpTransport(Transport):
    """RabbitMQ. ``async with AmqpTransport("amqp://guest:guest@localhost/") as bus: ...``"""

    #: How long an operation waits for a lost connection to come back before failing.
    ready_timeout = 10.0
    #: How long one try to connect (TCP, TLS, the AMQP handshake) may take: aio-pika and aiormq
    #: set no limit, so a server that accepts but never speaks held ``connect()`` for ever.
    connect_timeout = 10.0

    def __init__(self, url: str) -> None:
        self.url = url
        refuse_unreadable(url)
        refuse_repeated(url)
        self.lease = lease_from_url(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {key: value for key, value in query if key in OUR_PARAMS}
        self.names = Names(ours.get("prefix", "choreograph"))
        self.queue_type = ours.get("queue_type", "quorum")
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigurationError(f"amqp URL: queue_type={self.queue_type!r}; expected quorum or classic")
        rest = [(key, value) for key, value in query if key not in OUR_PARAMS]
        check_client_params({key for key, _ in rest})
        check_client_values(rest)
        if not any(key == "reconnect_interval" for key, _ in rest):
            rest.append(("reconnect_interval", "1"))
        self._client_url = urlunsplit(parts._replace(query=urlencode(rest)))
        try:
            port = parts.port
        except ValueError as exc:  # out of range or not a number: was a bare ValueError
            raise ConfigurationError(f"amqp URL: port: {exc}") from None
        if not parts.hostname:  # aio-pika tried to connect to no host, again every second, for ever
            raise ConfigurationError(f"broker URL {redact(url)!r}: no host (e.g. amqp://guest:guest@localhost/)")
        self._where = f"{parts.hostname}:{port or 5672}"
        self.closed = False
        self._server_major = 3
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._pub: aio_pika.abc.AbstractRobustChannel | None = None
        self._admin: aio_pika.abc.AbstractRobustChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._connect_lock = asyncio.Lock()
        self._registry_lock = asyncio.Lock()
        self._retry_declared: dict[str, float] = {}
        self._subscriptions: list[AmqpSubscription] = []

    # -- connection -----------------------------------------------------------------------

    def _check(self) -> None:
        if self.closed:
            raise TransportClosed("amqp transport is closed")

    async def connect(self, *, create: bool = True) -> None:
        """Connect, and declare the bus's exchange and registry queue.

        ``create=False`` is for a bus that must exist already (``choreograph dlq``): if its
        exchange is not on the broker (a mistyped ``prefix``) the connect raises
        :class:`ConfigurationError` and declares nothing.
        """
        self._check()
        async with self._connect_lock:
            if self._connection is not None:
                return
            with translated(f"connect to {self._where}"):
                connection = await self._open()
                self._server_major = server_major(connection)
                try:
                    if not create:
                        await self._check_exists(connection)
                    self._pub = connection.channel(publisher_confirms=True, on_return_raises=True)
                    await self._pub
                    self._admin = connection.channel(publisher_confirms=False)
                    await self._admin
                    self._exchange = await self._pub.declare_exchange(
                        self.names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                    )
                    await self._pub.declare_queue(
                        self.names.registry, durable=True, arguments=self._queue_args()
                    )
                except BaseException:
                    await connection.close()
                    raise
            if self.closed:  # close() ran meanwhile and found no connection: nobody else would close this one
                with contextlib.suppress(Exception):
                    await connection.close()
                raise TransportClosed("amqp transport is closed")
            self._connection = connection
            # aio-pika logs its reconnects itself, but the CLI keeps the clients quiet
            # (choreograph.logs.quiet_client_loggers): say it here, as the other transports do.
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)

    async def _check_exists(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        """The bus is on the broker: its exchange declared passively (which creates nothing), on
        a channel of its own, since a passive declare that fails closes its channel."""
        channel = connection.channel(publisher_confirms=False)
        await channel
        try:
            underlay = await channel.get_underlay_channel()
            await underlay.exchange_declare(self.names.exchange, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ConfigurationError(
                f"no RabbitMQ bus with prefix {self.names.prefix!r} at broker URL {redact(self.url)!r}"
                f" (no exchange {self.names.exchange} there)"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    def _on_connection_lost(self, _connection: object, exc: BaseException | None) -> None:
        if not self.closed:
            log.warning("amqp: lost the connection to %s (%s); reconnecting", self._where,
                        exc or "closed by the broker")

    def _on_reconnected(self, _connection: object) -> None:
        log.info("amqp: reconnected to %s", self._where)

    async def _connect(self) -> aio_pika.abc.AbstractRobustConnection:
        """The connection.

        What ``aio_pika.connect_robust`` does, but closing the connection when the connect does not
        succeed: cancelled (Ctrl-C, or SIGTERM while ``run`` waits for the broker), its reconnecting
        task lived on, taking the cancellation for a failed try and trying again every second, and
        ``asyncio.run`` waited for it at exit, for ever (a server that accepts but never answers)."""
        connection = aio_pika.RobustConnection(make_url(self._client_url))
        try:
            await connection.connect(timeout=self.connect_timeout)
            return connection
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise

    async def _open(self) -> aio_pika.abc.AbstractRobustConnection:
        """:meth:`_connect`, or a :class:`TransportError` that says why the broker refused it."""
        try:
            return await self._connect()
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            user = unquote(urlsplit(self._client_url).username or "guest")
            raise TransportError(
                f"amqp: connect to {self._where}: the broker refused the login of user {user!r}"
                f" (check the URL's user and password): {exc}"
            ) from exc
        except aiormq.exceptions.InvalidFrameError as exc:
            refusal = await open_refusal(self._client_url, self.ready_timeout)
            if refusal is None:
                raise
            raise TransportError(f"amqp: connect to {self._where}: {refusal}") from exc

    async def close(self) -> None:
        if self.closed:
            return
        await asyncio.gather(*(sub.close() for sub in self._subscriptions), return_exceptions=True)
        self.closed = True
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _ready(self) -> aio_pika.abc.AbstractRobustChannel:
        """The publishing channel, once the (possibly reconnecting) connection is up."""
        self._check()
        if self._pub is None:
            await self.connect()
        assert self._pub is not None
        with translated(f"wait for the broker at {self._where}"):
            await asyncio.wait_for(self._pub.ready(), self.ready_timeout)
        return self._pub

    @contextlib.asynccontextmanager
    async def _temp_channel(self, what: str) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A short-lived channel: an error on it (a missing queue) does not disturb the others."""
        await self._ready()
        assert self._connection is not None
        with translated(what):
            channel = self._connection.channel(publisher_confirms=False)
            await channel
            try:
                yield await channel.get_underlay_channel()
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()

    def _queue_args(self, **extra: Any) -> dict[str, Any]:
        return queue_arguments(self.queue_type, self._server_major, **extra)

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        for message in messages:
            if not message.type or len(message.type.encode()) > 255:
                raise ConfigurationError(f"amqp: event type {message.type[:60]!r} must be 1..255 bytes")
        await self._ready()
        if not messages:
            return
        exchange = self._exchange
        assert exchange is not None
        with translated(f"publish {len(messages)} message(s) to {self.names.exchange}"):
            await asyncio.gather(
                *(
                    exchange.publish(outgoing(m.body, m.id, m.type), routing_key=m.type, mandatory=False)
                    for m in messages
                )
            )

    async def _send(self, queue: str, messages: Sequence[aio_pika.Message]) -> None:
        """Publish straight into ``queue`` (default exchange), confirmed; a missing queue is an error."""
        channel = await self._ready()
        with translated(f"publish to queue {queue}"):
            await asyncio.gather(
                *(channel.default_exchange.publish(m, routing_key=queue, mandatory=True) for m in messages)
            )

    async def _retry_queue(self, group: str, after: float) -> str:
        """The queue a retry of ``group`` after ``after`` seconds goes to (declared if need be)."""
        target = self.names.group(group)
        delay_ms = retry_bucket_ms(after)
        if delay_ms == 0:
            return target
        name = self.names.retry(group, delay_ms)
        now = time.monotonic()
        if now - self._retry_declared.get(name, float("-inf")) > RETRY_REDECLARE_S:
            await self._ready()
            assert self._admin is not None
            with translated(f"declare retry queue {name}"):
                await asyncio.wait_for(self._admin.ready(), self.ready_timeout)
                channel = await self._admin.get_underlay_channel()
                await channel.queue_declare(
                    name,
                    durable=True,
                    arguments=retry_queue_arguments(self.queue_type, self._server_major, delay_ms, target),
                )
                await self._settle_declares(channel)
            self._retry_declared[name] = now
        return name

    async def _settle_declares(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Make the quorum queues just declared on ``channel`` survive a hard kill of the broker.

        RabbitMQ 3.10 loses what a quorum queue holds - publisher-confirmed messages included -
        if the node is killed (SIGKILL, power loss) while that queue is still the most recently
        created one: a retry published into a retry queue created for it, or a dead letter in a
        group's dead-letter queue created by its subscribe, was gone after the restart (or the
        queue answered every read with an internal error). Creating one more quorum queue after
        it makes it durable, so a throwaway one is created and deleted at once (``x-expires``
        removes it should we die in between). Only when a queue may have been created: a
        subscribe, a retry queue's (re)declare - not per message.
        """
        if self.queue_type != "quorum":
            return
        name = self.names.throwaway(uuid.uuid4().hex)
        await channel.queue_declare(name, durable=True, arguments=self._queue_args(**{"x-expires": 60_000}))
        await channel.queue_delete(name)

    # -- groups ---------------------------------------------------------------------------

    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        wanted = None if types is None else frozenset(types)
        for event_type in wanted or ():
            check_binding_type(event_type)
        queue_name, exchange = self.names.group(group), self.names.exchange
        async with self._registry_lock, self._temp_channel(f"subscribe group {group!r}") as channel:
            await channel.queue_declare(queue_name, durable=True, arguments=self._queue_args())
            await channel.queue_declare(self.names.dlq(group), durable=True, arguments=self._queue_args())
            await self._settle_declares(channel)
            registered, held = await self._read_registry(channel)
            known = registered.get(group, _UNKNOWN)
            bound = wanted if known is _UNKNOWN else widened(known, wanted)
            # Bindings are only ever added (the contract widens, never narrows); all of the
            # union, so a queue recreated without its bindings gets them all back.
            for key in sorted({"#"} if bound is None else bound):
                await channel.queue_bind(queue_name, exchange, routing_key=key)
            if known != bound or len(held.get(group, ())) > 1:
                await self._replace_entries(group, bound, held.get(group, []))
        assert self._connection is not None
        with translated(f"consume group {group!r}"):
            consumer_channel = self._connection.channel(publisher_confirms=False)
            await consumer_channel
            # declared through the robust channel so that it (and the consumer) is restored
            queue = await consumer_channel.declare_queue(
                queue_name, durable=True, arguments=self._queue_args()
            )
        sub = AmqpSubscription(self, group, consumer_channel, queue)
        self._subscriptions.append(sub)
        return sub

    async def unbind(self, group: str, types: Collection[str]) -> frozenset[str] | None:
        """Remove the bindings of ``types`` from the group's queue and write its narrowed entry.

        What the queue holds stays. A subscribe of the group racing this one in another
        process may bind a removed type again, as any later subscribe asking for it does.
        """
        removed = frozenset(types)
        async with self._registry_lock, self._temp_channel(f"unbind group {group!r}") as channel:
            registered, held = await self._read_registry(channel)
            if group not in registered:
                raise no_such_group(group)
            known = registered[group]
            bound = narrowed(group, known, removed)
            for key in sorted(removed & (known or frozenset())):
                await channel.queue_unbind(self.names.group(group), self.names.exchange, routing_key=key)
            if known != bound or len(held[group]) > 1:
                await self._replace_entries(group, bound, held[group])
        return bound

    async def _replace_entries(self, group: str, bound: frozenset[str] | None, held: list[Raw]) -> None:
        """Write the group's registry entry for ``bound``, then ack the entries it replaces."""
        entry = {"group": group, "types": None if bound is None else sorted(bound), "at": time.time()}
        await self._send(self.names.registry, [outgoing(orjson.dumps(entry), "", "choreograph.group")])
        for raw in held:  # the new entry covers them all
            await raw.ack()

    async def ping(self) -> None:
        """The registry queue, declared passively on a channel of its own: round trips to the
        broker. (A passive ``declare_exchange`` on the publishing channel is answered from
        aio-pika's cache, so it said "ready" to a stalled broker.)"""
        async with self._temp_channel(f"ping {self._where}") as channel:
            await channel.queue_declare(self.names.registry, passive=True)

    async def groups(self) -> dict[str, frozenset[str] | None]:
        """Every group registered on this bus and its types (``None``: all types)."""
        async with self._registry_lock, self._temp_channel("read the group registry") as channel:
            registered, _ = await self._read_registry(channel)
        return registered

    async def _read_registry(
        self, channel: aiormq.abc.AbstractChannel
    ) -> tuple[dict[str, frozenset[str] | None], dict[str, list[Raw]]]:
        """Groups and types from the registry queue, its entries held unacked on ``channel``.

        A group's types are the union of its entries: two subscribes racing each write one
        (neither sees the entry the other holds), and neither loses the other's types. A
        subscribe replaces all of its group's entries with one; nothing else acks them.
        """
        bound: dict[str, frozenset[str] | None] = {}
        held: dict[str, list[Raw]] = {}
        for raw in await _browse(channel, self.names.registry, None):
            try:
                entry = orjson.loads(raw.body)
                group = str(entry["group"])
                types = None if entry["types"] is None else frozenset(map(str, entry["types"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                await raw.ack()  # not ours: drop it
                continue
            bound[group] = widened(bound[group], types) if group in bound else types
            held.setdefault(group, []).append(raw)
        return bound, held

    # -- dead letters ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _browsing(self, group: str, limit: int | None) -> AsyncIterator[list[Raw]]:
        """Up to ``limit`` dead letters of ``group``, held, one per message id; those not
        acked go back on exit.

        One dead letter per (group, message id): a queue cannot replace a message, so a
        second failed copy of an event published twice is stored beside the first, and the
        older letters of an id are dropped here, as they are read. That is safe because every
        letter read is held (``basic.get`` unacked) on this channel until the end: the newest
        is in hand when the older ones are acked, and goes back to the queue however this
        channel ends - a crash in between loses nothing, at worst leaves a stale copy for the
        next reader to drop. (Two readers at once each hold part of the queue; one holding
        only an id's older letter shows it until a later read drops it.)
        """
        async with self._temp_channel(f"read dead letters of {group!r}") as channel:
            raws = await _browse(channel, self.names.dlq(group), limit)
            latest: dict[str, tuple[float, int]] = {}  # message id -> (dead_at, index in raws)
            for n, raw in enumerate(raws):
                at = (read_dead_letter(group, raw).dead_at, n)
                message_id = dead_letter_id(raw)  # letters published without an id: one per body
                latest[message_id] = max(latest.get(message_id, at), at)
            kept = {n for _, n in latest.values()}
            if len(kept) < len(raws):
                with translated(f"drop superseded dead letters of {group!r}"):
                    for n, raw in enumerate(raws):
                        if n not in kept:
                            await raw.ack()
            yield [raw for n, raw in enumerate(raws) if n in kept]

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:  # a negative slice dropped the newest
            return []
        # Every letter is read, then the oldest ``limit`` kept: a quorum queue puts the letters
        # a listing returned behind the others, so its first ``limit`` were the oldest only
        # until the first listing (``dlq list --limit 2`` twice showed other letters).
        groups = [group] if group is not None else sorted(await self.groups())
        letters: list[DeadLetter] = []
        for name in groups:
            async with self._browsing(name, None) as raws:
                letters.extend(read_dead_letter(name, raw) for raw in raws)
        letters.sort(key=lambda letter: letter.dead_at)
        return letters[:limit]

    async def dead_letter(self, group: str, message_id: str) -> DeadLetter | None:
        async with self._browsing(group, None) as raws:
            for raw in raws:
                if dead_letter_id(raw) == message_id:
                    return read_dead_letter(group, raw)
        return None

    async def replay(self, group: str, message_ids: Collection[str] | None = None) -> int:
        ids = None if message_ids is None else set(message_ids)
        async with self._browsing(group, None) as raws:
            chosen = [raw for raw in raws if ids is None or dead_letter_id(raw) in ids]
            if chosen:
                copies = []
                for raw in chosen:
                    letter = read_dead_letter(group, raw)
                    copies.append(
                        outgoing(
                            letter.message.body,
                            letter.message.id,
                            letter.message.type,
                            content_type=CONTENT_TYPE,
                        )
                    )
                await self._send(self.names.group(group), copies)
                with translated(f"remove replayed dead letters of {group!r}"):
                    for raw in chosen:
                        await raw.ack()
        return len(chosen)

    async def purge(self, group: str, message_ids: Collection[str] | None = None) -> int:
        ids = None if message_ids is None else set(message_ids)
        async with self._browsing(group, None) as raws:
            chosen = [raw for raw in raws if ids is None or dead_letter_id(raw) in ids]
            with translated(f"purge dead letters of {group!r}"):
                for raw in chosen:
                    await raw.ack()
        return len(chosen)


async def _browse(channel: aiormq.abc.AbstractChannel, queue: str, limit: int | None) -> list[Raw]:
    """Up to ``limit`` messages of ``queue`` via ``basic.get``, held unacked on ``channel``.

    A missing queue reads as empty (the error closes ``channel``, which is short-lived).
    """
    out: list[Raw] = []
    while limit is None or len(out) < limit:
        try:
            got = await channel.basic_get(queue, no_ack=False)
        except aiormq.exceptions.ChannelNotFoundEntity:
            break
        if not isinstance(got.delivery, aiormq.spec.Basic.GetOk):
            break
        out.append(aio_pika.IncomingMessage(got, no_ack=False))
    return out
