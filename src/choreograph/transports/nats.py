"""NATS JetStream transport: ``nats://host:4222?lease=30&prefix=choreograph&replicas=1``.

Layout on the server, for ``prefix=P`` (``prefix`` isolates independent buses on one
server; it must be ``[A-Za-z0-9_-]+``)::

    stream P_EVENTS  P.ev.<type>.~h           events (P.ev.shop.order.placed.~h), the id in
                                              the Nats-Msg-Id header (P.ev.<type>.<id> when
                                              the body leaves no room for the header)
                     P.rp.<group>.<type>.<id> replays of a group's dead letters (.~h
                                              and a Choreograph-Id header for a long id)
                     interest retention: a message is kept until every group it
                     matched has settled it
      consumer <group>   durable pull consumer, one per group, shared by the group's
                         competing consumers; filters: P.ev.<type>.* per type (P.ev.>
                         for every type) + P.rp.<group>.>; deliver policy NEW; explicit
                         ack, ack_wait = the lease of the URL the group was last
                         subscribed with; max_deliver unlimited and no backoff
                         (the runtime owns retries: retry(after) is a NAK with a delay);
                         description "choreograph group <group>" (before 2.10: the
                         group's types, see _nats_consumers); metadata
                         choreograph.removed: types being unbound (see _nats_routing),
                         choreograph.lineage: stamps of its last writes
                         (written and read back by _nats_bindings)
    stream P_DLQ     P.dlr.<group>.<id>       dead-letter record (see _nats_dead_letters)
                     P.dlb.<group>.<id>       dead-letter body
                     P.dlb.<group>.<id>.<n>   further parts of a record past max_payload
                     P.dlb._claims            a replay's claims on the letters it counts
    stream P_DEFER   P.df.<group>.<seq>       how many of the group's deliveries of stream
                                              message <seq> were deferrals (see _nats_deferrals)

The type travels in the subject, the id in the ``Nats-Msg-Id`` header (which also makes
the server drop a republished duplicate). Putting the id in the subject too would give
every message a subject of its own, and the server pays several times the CPU per
message to track them; only a body too large to leave room for the header has its id
in the subject instead, so a body may use the whole of the server's ``max_payload``
(1 MiB by default). A dead letter's record is a message of its own for the same reason.
Names that are not plain ``[A-Za-z0-9_-]`` are escaped (see ``_nats_codec``).

Consequences worth knowing:

* **Deliver policy NEW**: a group receives messages published after it was first
  registered (``subscribe``); earlier messages are not replayed to a new group.
* **Dedupe**: ``publish`` sets ``Nats-Msg-Id`` to the message id, so republishing an id
  within the stream's duplicate window (2 minutes) stores it once - the deterministic
  output ids of the runtime make a crashed handler's re-run harmless. (Not for a body
  so large that the header would push it past ``max_payload``: it is sent without. Nor
  for ``choreograph.failed``: a replayed event given up again announces it under the same
  id, which the groups that never took the first announcement must receive.)
* **Replay** republishes a dead letter to ``P.rp.<group>...``, which only that group's
  consumer filters on, as a new stream message: the group gets it with attempt 1 and
  no other group sees it.
* **Servers before 2.10** lack multi-subject consumer filters: there a group's consumer
  takes the whole stream and the subscription acks the types it does not want. Correct,
  but every group then reads every event: use NATS >= 2.10 in production.
* ``unbind`` keeps a removed type in the consumer's filter until what the group held of
  it is settled, and the subscriptions skip its events published after the unbind (see
  ``_nats_routing``): JetStream delivers nothing outside a consumer's filter.
* **The lease lives on the server**, as the group's consumer's ``ack_wait``: a ``subscribe``
  with another ``?lease=`` than the consumer's rewrites it (before, only a change of the
  group's types did, so a group kept the lease it was created with). Unbinds, narrowings
  and ``choreograph groups unbind`` keep the consumer's. During a rolling change of the
  lease the last replica to subscribe wins; one still running on a lease more than three
  times the consumer's touches what it holds too rarely for it, and a handler of its running
  past the consumer's lease is redelivered: lengthen the lease freely, shorten it much once
  the old replicas are gone (see ``_nats_bindings``).
* A consumer's config has no compare-and-set: racing writes of a group's consumer can undo
  one another. A subscription binds its types again when a write computed from an older
  read dropped them (``_nats_routing`` says what is left).
* ``groups()`` reads the groups back from the events stream's consumers: a group whose
  name is past 120 characters escaped has a hashed consumer name, and before 2.10 nothing
  else records its name: ``groups()`` then cannot tell (``None``).
* The ``attempt`` of a delivery is JetStream's delivery count, so it survives process
  crashes and broker restarts - less the deliveries that were deferred: ``defer(after)`` is
  a NAK with a delay, which JetStream counts, so before it the delivery writes the
  message's deferral count to ``P_DEFER``, and a redelivery (delivery count > 1; a first
  delivery reads nothing) reads it back (see ``_nats_deferrals``). If that write fails the
  NAK goes anyway, and the deferral counts an attempt.
* A delayed retry (NAK with a delay) survives a restart of the server, but its delay lives
  in consumer state the server writes lazily (within a fraction of a second): a server
  killed right after the NAK (SIGKILL, power loss) comes back without it, and redelivers
  the message, attempt + 1, once the lease of the delivery that was retried runs out - late
  by up to the lease, or early if the delay was longer than the lease. A clean shutdown
  keeps the delay (the server stores the time in whole seconds: redelivered up to a second
  early). tests/conformance/test_restart.py holds the kill case to "comes back".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import nats
import nats.errors
from nats.aio.client import Client

from choreograph._redact import redact
from choreograph.errors import ConfigurationError, TransportClosed, TransportError
from choreograph.transports import _nats_codec as codec
from choreograph.transports import did_you_mean, lease_from_url, refuse_repeated, refuse_unreadable
from choreograph.transports._nats_bindings import GroupBindings
from choreograph.transports._nats_client import DIRECT_SUPPORTED, DirectClient, Item, JetStream
from choreograph.transports._nats_consumers import LONGEST_LEASE
from choreograph.transports._nats_dead_letters import DeadLetterStream
from choreograph.transports._nats_deferrals import Deferrals
from choreograph.transports._nats_pull import NatsSubscription
from choreograph.transports._nats_routing import BIND_CONFIRM
from choreograph.transports.base import DeadLetter, Message, Subscription, Transport

__all__ = ["NatsTransport"]

log = logging.getLogger("choreograph.transports.nats")

_SECOND = 1_000_000_000  # JetStream durations are nanoseconds
_RECONNECT_WAIT = 0.5  # seconds between reconnect attempts (nats-py waits this long per server)
_CLOSE_TIMEOUT = 5.0  # seconds close() may spend flushing to a server that does not read
_MSG_ID_HEADER_SIZE = codec.header_size({codec.H_MSG_ID: ""})  # plus the id's length
_ID_HEADER_SIZE = codec.header_size({codec.H_ID: ""})  # plus the id's length
#: The runtime's failure events: published without broker dedupe (see ``publish``).
_FAILED = "choreograph.failed"
_SUBJECT_CACHE = 10_000  # event types whose subject publish remembers


def _message(exc: Exception) -> str:
    """What nats-py reported to ``error_cb``, as a line: its text, else its class."""
    return str(exc) or type(exc).__name__


class NatsTransport(GroupBindings, Transport):
    """Choreograph's bus on NATS JetStream.

    >>> async with NatsTransport("nats://127.0.0.1:4222?prefix=shop") as bus:  # doctest: +SKIP
    ...     await bus.publish([Message(id="1", type="shop.order.placed", body=b"{}")])
    """

    def __init__(self, url: str) -> None:
        self.url = url
        refuse_unreadable(url)
        refuse_repeated(url)
        self.lease = lease_from_url(url)
        if self.lease > LONGEST_LEASE:  # the subscribe failed: "invalid JSON", or an OverflowError
            raise ConfigurationError(
                f"broker URL {redact(url)!r}: lease={self.lease!r} is over {LONGEST_LEASE:.0f} s,"
                " the longest ack_wait JetStream takes (2^63 - 1 ns)"
            )
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        known = ("lease", "prefix", "replicas")
        unknown = set(query) - set(known)
        if unknown:
            raise ConfigurationError(
                f"broker URL {redact(url)!r}: unknown parameter(s) "
                f"{', '.join(did_you_mean(name, known) for name in sorted(unknown))}; nats:// takes {', '.join(known)}"
            )
        self.prefix = query.get("prefix", ["choreograph"])[-1]
        if not self.prefix or codec.name_token(self.prefix) != self.prefix:
            raise ConfigurationError(f"broker URL {redact(url)!r}: prefix must match [A-Za-z0-9_-]+")
        try:
            self.replicas = int(query.get("replicas", ["1"])[-1])
        except ValueError:
            raise ConfigurationError(f"broker URL {redact(url)!r}: replicas must be an integer") from None
        if not 1 <= self.replicas <= 5:
            raise ConfigurationError(f"broker URL {redact(url)!r}: replicas must be between 1 and 5")
        if not parts.netloc:
            raise ConfigurationError(f"broker URL {redact(url)!r}: no host")
        self._servers = [f"nats://{server}" for server in parts.netloc.split(",")]
        for n, server in enumerate(self._servers, 1):  # nats-py said only "invalid connect url option"
            which = f"server {n} of {len(self._servers)}" if len(self._servers) > 1 else "the server"
            try:
                host, _ = urlsplit(server).hostname, urlsplit(server).port
            except ValueError:  # the value is not quoted: it may be part of a password
                raise ConfigurationError(
                    f"broker URL: {which}: the port is not a number from 0 to 65535"
                ) from None
            if not host:
                raise ConfigurationError(f"broker URL: {which}: no host")
        self.events_stream = f"{self.prefix}_EVENTS"
        self.dead_letter_stream = f"{self.prefix}_DLQ"
        self.deferral_stream = f"{self.prefix}_DEFER"
        self._nc: Client | None = None
        self._js: JetStream | None = None
        self._letters: DeadLetterStream | None = None
        self._deferrals: Deferrals | None = None
        self._closed = False
        self._multi_filter = True
        self._connecting = asyncio.Lock()
        self._connect_errors: list[Exception] | None = None  # during a first connect: what error_cb reported
        self._subscriptions: set[NatsSubscription] = set()
        self._subjects: dict[str, str] = {}  # event type -> its subject (ids in the header)

    # -- connection ---------------------------------------------------------------------

    async def connect(self, *, create: bool = True) -> None:
        """Connect, and create the bus's streams or bring them to this URL's settings.

        ``create=False`` is for a bus that must exist already (``choreograph dlq``): if its
        events stream is not on the server (a mistyped ``prefix``) the connect raises
        :class:`ConfigurationError` and creates nothing. It never writes a stream: a bus
        whose dead-letter stream is missing then holds no dead letters, and its deferral
        counts are not there for subscribing (an inspection does not subscribe).
        """
        async with self._connecting:
            if self._closed:
                raise TransportClosed("nats: transport is closed")
            if self._nc is not None:
                return
            # nats-py reports each failed attempt to error_cb: kept until the connect is over,
            # they become its error's reason, or warnings if a later server of the list answered.
            self._connect_errors = []
            try:
                nc = await self._first_connect()
            finally:
                errors, self._connect_errors = self._connect_errors, None
            for error in errors:
                log.warning("nats: while connecting: %s", _message(error))
            await self._set_up(nc, create)

    async def _first_connect(self) -> DirectClient:
        where = redact(", ".join(self._servers))
        try:
            with codec.translated(f"connect to {where}"):
                return await self._connect_client()
        except TransportError:
            if not self._connect_errors:
                raise
            last = self._connect_errors[-1]
            self._connect_errors.clear()  # said here: not again as warnings
            # chained from the attempt's own error (a refused socket, a login refused), not from
            # nats-py's NoServersError: what went wrong decides whether trying again can help
            raise TransportError(f"nats: connect to {where} failed: {_message(last)}") from last

    async def _connect_client(self) -> DirectClient:
        """nats-py's connect, closing the client when it ends otherwise than by an attempt's
        failure (nats-py closes its socket then): cancelled (Ctrl-C, SIGTERM) while a server was
        holding the handshake, its socket was left open."""
        nc = DirectClient()
        try:
            await nc.connect(
                self._servers,
                name=f"choreograph:{self.prefix}",
                connect_timeout=2,
                reconnect_time_wait=_RECONNECT_WAIT,  # type: ignore[arg-type]  # typed int; a float works
                max_reconnect_attempts=1,  # for the first connect: fail fast if nobody answers
                ping_interval=10,  # notice a silently dead server within ~30 s
                max_outstanding_pings=3,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        except (OSError, TimeoutError, nats.errors.Error):
            raise
        except BaseException:
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.close()
            raise
        return nc

    async def _set_up(self, nc: DirectClient, create: bool) -> None:
        """Once connected: JetStream and the streams (``create=False``: only if the events stream
        is there already); the connection closed if they fail."""
        # Once connected, never give up: nats-py reconnects (and re-subscribes) forever,
        # and every subscription re-issues its pull requests when it is back.
        nc.options["max_reconnect_attempts"] = -1
        try:
            version = nc.connected_server_version
            self._multi_filter = (version.major, version.minor) >= (2, 10)
            js = JetStream(nc)
            if not (js.bulk and DIRECT_SUPPORTED):
                log.info("nats: this nats-py lacks the client internals choreograph's fast paths use; "
                         "publishing and receiving through its public API instead (slower)")
            await js.start()
            if create:
                events = await self._ensure_stream(js, self._events_config())
                await self._ensure_stream(js, DeadLetterStream.config(self.prefix, self.replicas))
                await self._ensure_stream(js, Deferrals.config(self.prefix, self.replicas))
                letters_stored = True
            else:  # an inspection writes nothing: no stream created, none brought to this URL
                events = await self._check_exists(js)
                letters_stored = await self._stream_info(js, self.dead_letter_stream) is not None
            if self._closed:  # close() ran meanwhile and found no connection: nobody else would close this one
                raise TransportClosed("nats: transport is closed")
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js
        self._letters = DeadLetterStream(js, self.prefix, self.events_stream, exists=letters_stored)
        # The events stream's creation time tells a count of its messages from one of an events
        # stream deleted since, whose sequences the new one hands out again.
        self._deferrals = Deferrals(js, self.prefix, str(events.get("created", "")))

    async def _check_exists(self, js: JetStream) -> dict[str, Any]:
        """The bus is on the server: its events stream's info, a read that creates nothing."""
        info = await self._stream_info(js, self.events_stream)
        if info is None:
            raise ConfigurationError(
                f"no NATS bus with prefix {self.prefix!r} at broker URL {redact(self.url)!r}"
                f" (no stream {self.events_stream} there)"
            )
        return info

    @staticmethod
    async def _stream_info(js: JetStream, name: str) -> dict[str, Any] | None:
        """The info of stream ``name``; None if the server has no such stream."""
        try:
            return await js.api(f"read stream {name}", f"STREAM.INFO.{name}")
        except codec.JetStreamError as exc:
            if exc.err_code != codec.ERR_STREAM_NOT_FOUND:
                raise
            return None

    async def close(self) -> None:
        self._closed = True
        for subscription in list(self._subscriptions):
            try:
                await subscription.close()
            except TransportError as exc:
                log.debug("closing a subscription: %s", exc)
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await nc.close()  # flushes what is still buffered (acks, NAKs)
            except (RuntimeError, OSError, TimeoutError, nats.errors.Error) as exc:
                # Closing while the server is gone (reconnecting): nats-py fails to flush to the
                # dead socket, after it has stopped reconnecting. Nothing is lost: what was not
                # settled returns to its group after the lease.
                log.debug("nats: closing: %s", exc or type(exc).__name__)
        if self._js is not None:
            self._js.cancel()

    async def _on_error(self, exc: Exception) -> None:
        if self._connect_errors is not None:
            self._connect_errors.append(exc)
        else:
            log.warning("nats: %s", _message(exc))

    async def _on_disconnected(self) -> None:
        # Not while connecting: a set-up that failed (no such bus, JetStream off) closes the
        # connection itself, and its error says why; "reconnecting" would be untrue.
        if not self._closed and self._nc is not None:
            log.warning("nats: disconnected from %s; reconnecting", redact(", ".join(self._servers)))

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected")
        for subscription in self._subscriptions:
            subscription.reconnected()

    async def ping(self) -> None:
        """JetStream's account info: a round trip to a server with JetStream up."""
        await self._jetstream().api("ping", "INFO")

    def _jetstream(self) -> JetStream:
        if self._closed:
            raise TransportClosed("nats: transport is closed")
        if self._js is None:
            raise TransportError("nats: not connected (use `async with` or call connect())")
        return self._js

    def _deferral_counts(self) -> Deferrals:
        self._jetstream()
        assert self._deferrals is not None
        return self._deferrals

    def _dead_letter_stream(self) -> DeadLetterStream:
        self._jetstream()
        assert self._letters is not None
        return self._letters

    def _events_config(self) -> dict[str, Any]:
        return {
            "name": self.events_stream,
            "subjects": [f"{self.prefix}.ev.>", f"{self.prefix}.rp.>"],
            "retention": "interest",
            "duplicate_window": 120 * _SECOND,
            "storage": "file",
            "num_replicas": self.replicas,
        }

    @property
    def streams(self) -> tuple[str, ...]:
        """The names of the bus's streams (events, dead letters, deferral counts)."""
        return self.events_stream, self.dead_letter_stream, self.deferral_stream

    @staticmethod
    async def _ensure_stream(js: JetStream, config: dict[str, Any]) -> dict[str, Any]:
        """Create or update the stream of ``config``; its info (config, ``created``, state)."""
        name = config["name"]
        try:
            return await js.api(f"create stream {name}", f"STREAM.CREATE.{name}", config)
        except codec.JetStreamError as exc:
            if exc.err_code != codec.ERR_STREAM_NAME_IN_USE:
                raise
            return await js.api(f"update stream {name}", f"STREAM.UPDATE.{name}", config)

    # -- the contract -------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        js = self._jetstream()
        base, room, subjects = f"{self.prefix}.ev", js.nc.max_payload, self._subjects
        items: list[Item] = []
        for m in messages:
            msg_id = codec.name_token(m.id, hash_long=False)
            # A failure event's id is derived from the event given up on, so a replayed event
            # given up again announces it under the same id: the server would drop that
            # announcement within its duplicate window, and a group that did not take the first
            # one (an old replica acked it as ignored during a rolling deploy) would never see
            # it, as it would on every other broker. Its id rides in Choreograph-Id instead;
            # the inboxes still drop a copy a group already handled.
            dedupe = m.type != _FAILED
            if len(m.body) + len(msg_id) + (_MSG_ID_HEADER_SIZE if dedupe else _ID_HEADER_SIZE) <= room:
                subject = subjects.get(m.type)
                if subject is None:
                    subject = subjects[m.type] = codec.message_subject(base, m.type)
                    if len(subjects) > _SUBJECT_CACHE:
                        subjects.clear()
                header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" if dedupe else b"NATS/1.0\r\nChoreograph-Id: %s\r\n\r\n"
                items.append((subject, m.body, header % msg_id.encode()))
            else:  # no room for the header: the id travels in the subject (and no broker dedupe)
                items.append((codec.message_subject(base, m.type, m.id), m.body, None))
        await js.publish(items)

    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        js = self._jetstream()
        consumer = codec.name_token(group)
        wanted = None if types is None else frozenset(types)
        bound, mark, wrote = await self._register(js, group, consumer, wanted)
        subscription = NatsSubscription(
            js.nc,
            group=group,
            stream=self.events_stream,
            consumer=consumer,
            event_prefix=f"{self.prefix}.ev.",
            replay_prefix=f"{self.prefix}.rp.{consumer}.",
            binding=bound,
            store_dead_letter=self._store_dead_letter,
            deferrals=self._deferral_counts(),
            on_close=self._subscriptions.discard,
            # A wildcard group stays one (subscribing only widens; unbind refuses it): no lines
            # to learn of, nothing to narrow, so no reading of its consumer every second - but
            # for BIND_CONFIRM seconds after writing it, in case a racing write undid that.
            read_binding=(
                None if bound.types is None and not wrote else self._checker(js, group, consumer, wanted, mark)
            ),
            watch_until=None if bound.types is not None else asyncio.get_running_loop().time() + BIND_CONFIRM,
            lease=self.lease,
        )
        await subscription.start()
        self._subscriptions.add(subscription)
        return subscription

    async def _store_dead_letter(self, group: str, message: Message, record: Mapping[str, Any]) -> None:
        await self._dead_letter_stream().store(group, message, record)

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        return await self._dead_letter_stream().letters(group, limit)

    async def dead_letter(self, group: str, message_id: str) -> DeadLetter | None:
        return await self._dead_letter_stream().show(group, message_id)

    async def replay(self, group: str, message_ids: Collection[str] | None = None) -> int:
        return await self._dead_letter_stream().replay(group, message_ids)

    async def purge(self, group: str, message_ids: Collection[str] | None = None) -> int:
        return await self._dead_letter_stream().purge(group, message_ids)
