"""NATS JetStream transport: ``nats://host:4222?lease=30&prefix=choreograph&replicas=1``.

Layout on the server, for ``prefix=P`` (``prefix`` isolates independent buses on one
server; it must be ``[A-Za-z0-9_-]+``)::

    stream P_EVENTS  P.ev.<type>.<id>         events (P.ev.shop.order.placed.<id>)
                     P.rp.<group>.<type>.<id> replays of a group's dead letters
                     interest retention: a message is kept until every group it
                     matched has settled it
      consumer <group>   durable pull consumer, one per group, shared by the group's
                         competing consumers; filters: P.ev.<type>.* per type (P.ev.>
                         for every type) + P.rp.<group>.>; deliver policy NEW; explicit
                         ack, ack_wait = lease; max_deliver unlimited and no backoff
                         (the runtime owns retries: retry(after) is a NAK with a delay)
    stream P_DLQ     P.dlr.<group>.<id>       the dead-letter record: JSON with group,
                                              id, type, record and time
                     P.dlb.<group>.<id>       the original body, byte for byte
                     one message per subject: dead-lettering an id again replaces it

Type and id travel in the subject rather than in headers so that a body may use the
whole of the server's ``max_payload`` (1 MiB by default); the record is a message of
its own for the same reason. Names that are not plain ``[A-Za-z0-9_-]`` are escaped
(see ``_nats_codec``).

Consequences worth knowing:

* **Deliver policy NEW**: a group receives messages published after it was first
  registered (``subscribe``); earlier messages are not replayed to a new group.
* **Dedupe**: ``publish`` sets ``Nats-Msg-Id`` to the message id, so republishing an id
  within the stream's duplicate window (2 minutes) stores it once - the deterministic
  output ids of the runtime make a crashed handler's re-run harmless. (Not for a body
  so large that the header would push it past ``max_payload``: it is sent bare.)
* **Replay** republishes a dead letter to ``P.rp.<group>...``, which only that group's
  consumer filters on, as a new stream message: the group gets it with attempt 1 and
  no other group sees it.
* **Servers before 2.10** lack multi-subject consumer filters: there a group's consumer
  takes the whole stream and the subscription acks the types it does not want. Correct,
  but every group then reads every event: use NATS >= 2.10 in production.
* The ``attempt`` of a delivery is JetStream's delivery count, so it survives process
  crashes and broker restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from choreograph.errors import ConfigurationError, TransportClosed, TransportError
from choreograph.transports import _nats_codec as codec
from choreograph.transports import lease_from_url
from choreograph.transports._nats_pull import NatsSubscription
from choreograph.transports.base import DeadLetter, Message, Subscription, Transport

__all__ = ["NatsTransport"]

log = logging.getLogger("choreograph.transports.nats")

_SECOND = 1_000_000_000  # JetStream durations are nanoseconds
#: How long publish waits for the broker's acknowledgements, and JetStream API calls for answers.
PUBLISH_TIMEOUT = 10.0
API_TIMEOUT = 5.0
_RECONNECT_WAIT = 0.5  # seconds between reconnect attempts (nats-py waits this long per server)

Headers = dict[str, str]


class NatsTransport(Transport):
    """Choreograph's bus on NATS JetStream.

    >>> async with NatsTransport("nats://127.0.0.1:4222?prefix=shop") as bus:  # doctest: +SKIP
    ...     await bus.publish([Message(id="1", type="shop.order.placed", body=b"{}")])
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.lease = lease_from_url(url)
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"lease", "prefix", "replicas"}
        if unknown:
            raise ConfigurationError(f"broker URL {url!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        self.prefix = query.get("prefix", ["choreograph"])[-1]
        if not self.prefix or codec.name_token(self.prefix) != self.prefix:
            raise ConfigurationError(f"broker URL {url!r}: prefix must match [A-Za-z0-9_-]+")
        try:
            self.replicas = int(query.get("replicas", ["1"])[-1])
        except ValueError:
            raise ConfigurationError(f"broker URL {url!r}: replicas must be an integer") from None
        if not 1 <= self.replicas <= 5:
            raise ConfigurationError(f"broker URL {url!r}: replicas must be between 1 and 5")
        if not parts.netloc:
            raise ConfigurationError(f"broker URL {url!r}: no host")
        self._servers = [f"nats://{server}" for server in parts.netloc.split(",")]
        self.events_stream = f"{self.prefix}_EVENTS"
        self.dead_letter_stream = f"{self.prefix}_DLQ"
        self._nc: Client | None = None
        self._closed = False
        self._multi_filter = True
        self._connecting = asyncio.Lock()
        self._subscriptions: set[NatsSubscription] = set()
        self._puback_prefix = ""
        self._pubacks: dict[str, asyncio.Future[None]] = {}
        self._tokens = itertools.count()

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        async with self._connecting:
            if self._closed:
                raise TransportClosed("nats: transport is closed")
            if self._nc is not None:
                return
            with codec.translated(f"connect to {', '.join(self._servers)}"):
                nc = await nats.connect(
                    self._servers,
                    name=f"choreograph:{self.prefix}",
                    connect_timeout=2,
                    reconnect_time_wait=_RECONNECT_WAIT,  # nats-py types it int; a float works
                    max_reconnect_attempts=1,  # for the first connect: fail fast if nobody answers
                    ping_interval=10,  # notice a silently dead server within ~30 s
                    max_outstanding_pings=3,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
            # Once connected, never give up: nats-py reconnects (and re-subscribes) forever,
            # and every subscription re-issues its pull requests when it is back.
            nc.options["max_reconnect_attempts"] = -1
            try:
                version = nc.connected_server_version
                self._multi_filter = (version.major, version.minor) >= (2, 10)
                with codec.translated("subscribe to publish acks"):
                    self._puback_prefix = nc.new_inbox() + "."
                    await nc.subscribe(self._puback_prefix + "*", cb=self._on_puback)
                self._nc = nc
                await self._ensure_streams()
            except BaseException:
                self._nc = None
                await nc.close()
                raise

    async def close(self) -> None:
        self._closed = True
        for subscription in list(self._subscriptions):
            try:
                await subscription.close()
            except TransportError as exc:
                log.debug("closing a subscription: %s", exc)
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await nc.close()  # flushes what is still buffered (acks, NAKs)
        for future in self._pubacks.values():
            future.cancel()

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats: %s", exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("nats: disconnected from %s; reconnecting", ", ".join(self._servers))

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected")
        for subscription in self._subscriptions:
            subscription.reconnected()

    def _connection(self) -> Client:
        if self._closed or (self._nc is not None and self._nc.is_closed):
            raise TransportClosed("nats: transport is closed")
        if self._nc is None:
            raise TransportError("nats: not connected (use `async with` or call connect())")
        return self._nc

    # -- JetStream API ------------------------------------------------------------------

    async def _api(
        self, action: str, subject: str, request: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Call ``$JS.API.<subject>``; raise :class:`JetStreamError` if it answers an error."""
        nc = self._connection()
        payload = b"" if request is None else json.dumps(request).encode()
        with codec.translated(action):
            try:
                reply = await nc.request(f"$JS.API.{subject}", payload, timeout=API_TIMEOUT)
            except nats.errors.NoRespondersError:
                raise TransportError(
                    f"nats: {action}: JetStream is not enabled on the server (nats-server -js)"
                ) from None
        response: dict[str, Any] = json.loads(reply.data)
        error = response.get("error")
        if error:
            raise codec.JetStreamError(
                action, error.get("code", 0), error.get("err_code", 0), error.get("description", "")
            )
        return response

    async def _ensure_stream(self, config: dict[str, Any]) -> None:
        name = config["name"]
        try:
            await self._api(f"create stream {name}", f"STREAM.CREATE.{name}", config)
        except codec.JetStreamError as exc:
            if exc.err_code != codec.ERR_STREAM_NAME_IN_USE:
                raise
            await self._api(f"update stream {name}", f"STREAM.UPDATE.{name}", config)

    async def _ensure_streams(self) -> None:
        common = {"storage": "file", "num_replicas": self.replicas, "discard": "old"}
        await self._ensure_stream(
            {
                **common,
                "name": self.events_stream,
                "subjects": [f"{self.prefix}.ev.>", f"{self.prefix}.rp.>"],
                "retention": "interest",
                "duplicate_window": 120 * _SECOND,
            }
        )
        await self._ensure_stream(
            {
                **common,
                "name": self.dead_letter_stream,
                "subjects": [f"{self.prefix}.dlr.>", f"{self.prefix}.dlb.>"],
                "retention": "limits",
                "max_msgs_per_subject": 1,
                "allow_direct": True,
            }
        )

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        base = f"{self.prefix}.ev"
        await self._publish(
            [
                (
                    codec.message_subject(base, m.type, m.id),
                    m.body,
                    {codec.H_MSG_ID: codec.name_token(m.id, hash_long=False)},
                )
                for m in messages
            ]
        )

    async def _publish(self, items: Sequence[tuple[str, bytes, Headers]]) -> None:
        """Publish every item at once, then wait for all of their PubAcks (one round trip)."""
        if not items:
            return
        nc = self._connection()
        loop = asyncio.get_running_loop()
        waiting: list[tuple[str, asyncio.Future[None]]] = []
        try:
            with codec.translated("publish"):
                for subject, body, headers in items:
                    if len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12 > nc.max_payload:
                        headers = {}  # only dedupe keys go in headers: drop them rather than fail
                    if len(body) > nc.max_payload:
                        raise TransportError(
                            f"nats: a body of {len(body)} bytes exceeds the server's max_payload ({nc.max_payload})"
                        )
                    token = str(next(self._tokens))
                    future: asyncio.Future[None] = loop.create_future()
                    self._pubacks[token] = future
                    waiting.append((token, future))
                    await nc.publish(
                        subject, body, reply=self._puback_prefix + token, headers=headers or None
                    )
            futures = [future for _, future in waiting]
            done, pending = await asyncio.wait(futures, timeout=PUBLISH_TIMEOUT)
            if any(future.cancelled() for future in done):
                raise TransportClosed("nats: the transport was closed while publishing")
            errors = [exc for future in done if (exc := future.exception()) is not None]
            if errors:
                raise errors[0]
            if pending:
                raise TransportError(
                    f"nats: publish: {len(pending)} of {len(items)} message(s) not confirmed within {PUBLISH_TIMEOUT} s"
                )
        finally:
            for token, future in waiting:
                self._pubacks.pop(token, None)
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: no "never retrieved" noise

    async def _on_puback(self, msg: Msg) -> None:
        future = self._pubacks.get(msg.subject[len(self._puback_prefix) :])
        if future is None or future.done():
            return
        status = (msg.headers or {}).get("Status")
        if status == "503":
            future.set_exception(
                TransportError(f"nats: publish: no stream listens (was {self.events_stream} deleted?)")
            )
            return
        try:
            error = json.loads(msg.data).get("error")
        except ValueError:
            error = {"description": f"unreadable acknowledgement {msg.data[:100]!r}"}
        if error:
            future.set_exception(TransportError(f"nats: publish rejected: {error.get('description', error)}"))
        else:
            future.set_result(None)

    # -- consuming ----------------------------------------------------------------------

    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        nc = self._connection()
        consumer = codec.name_token(group)
        replay_prefix = f"{self.prefix}.rp.{consumer}."
        config: dict[str, Any] = {
            "durable_name": consumer,
            "name": consumer,
            "description": f"choreograph group {group}"[:200],
            "deliver_policy": "new",
            "ack_policy": "explicit",
            "ack_wait": int(self.lease * _SECOND),
            "max_deliver": -1,
            "replay_policy": "instant",
        }
        if self._multi_filter:
            subjects = (
                [f"{self.prefix}.ev.>"]
                if types is None
                else sorted({f"{self.prefix}.ev.{codec.type_tokens(t)}.*" for t in types})
            )
            config["filter_subjects"] = [*subjects, replay_prefix + ">"]
        await self._api(
            f"register group {group!r}",
            f"CONSUMER.CREATE.{self.events_stream}.{consumer}",
            {"stream_name": self.events_stream, "config": config},
        )
        subscription = NatsSubscription(
            nc,
            group=group,
            stream=self.events_stream,
            consumer=consumer,
            event_prefix=f"{self.prefix}.ev.",
            replay_prefix=replay_prefix,
            types=None if types is None else frozenset(types),
            client_filter=not self._multi_filter,
            store_dead_letter=self._store_dead_letter,
            on_close=self._subscriptions.discard,
        )
        await subscription.start()
        self._subscriptions.add(subscription)
        return subscription

    # -- dead letters -------------------------------------------------------------------

    def _letter_subject(self, kind: str, group: str, message_id: str | None = None) -> str:
        """``P.dlr.<group>.<id>`` (record) / ``P.dlb...`` (body); ``None`` id: all of the group."""
        tail = ">" if message_id is None else codec.name_token(message_id, hash_long=False)
        return f"{self.prefix}.{kind}.{codec.name_token(group)}.{tail}"

    async def _store_dead_letter(self, group: str, message: Message, record: Mapping[str, Any]) -> None:
        """Body first, then the record: a letter is visible once its record is stored."""
        document = {
            "group": group,
            "id": message.id,
            "type": message.type,
            "record": record,
            "dead_at": time.time(),
        }
        await self._publish(
            [
                (self._letter_subject("dlb", group, message.id), message.body, {}),
                (
                    self._letter_subject("dlr", group, message.id),
                    json.dumps(document, default=str).encode(),
                    {},
                ),
            ]
        )

    async def _get(self, request: Mapping[str, Any]) -> tuple[int, str, bytes] | None:
        """(sequence, subject, data) of one dead-letter stream message; None if there is none."""
        nc = self._connection()
        with codec.translated("read dead letters"):
            reply = await nc.request(
                f"$JS.API.DIRECT.GET.{self.dead_letter_stream}",
                json.dumps(request).encode(),
                timeout=API_TIMEOUT,
            )
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status:
            raise TransportError(f"nats: read dead letters: {status} {headers.get('Description', '')}")
        return int(headers["Nats-Sequence"]), headers["Nats-Subject"], reply.data

    async def _letter(self, record: tuple[int, str, bytes]) -> _Entry | None:
        """The dead letter whose record message is ``record``, with its body; None if the body is gone."""
        sequence, subject, data = record
        body = await self._get({"last_by_subj": subject.replace(".dlr.", ".dlb.", 1)})
        if body is None:
            return None
        document = json.loads(data)
        message = Message(id=document["id"], type=document["type"], body=body[2])
        letter = DeadLetter(
            group=document["group"], message=message, record=document["record"], dead_at=document["dead_at"]
        )
        return _Entry(letter, sequence, body[0])

    async def _scan(self, group: str | None, limit: int) -> list[_Entry]:
        subject = f"{self.prefix}.dlr.>" if group is None else self._letter_subject("dlr", group)
        records: list[tuple[int, str, bytes]] = []
        sequence = 1
        while len(records) < limit:
            found = await self._get({"seq": sequence, "next_by_subj": subject})
            if found is None:
                break
            records.append(found)
            sequence = found[0] + 1
        return [entry for entry in await asyncio.gather(*map(self._letter, records)) if entry is not None]

    async def _lookup(self, group: str, message_ids: Collection[str]) -> list[_Entry]:
        records = [
            await self._get({"last_by_subj": self._letter_subject("dlr", group, i)}) for i in message_ids
        ]
        entries = await asyncio.gather(*(self._letter(record) for record in records if record is not None))
        return sorted(
            (entry for entry in entries if entry is not None), key=lambda entry: entry.record_sequence
        )

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        return [entry.letter for entry in await self._scan(group, limit)]

    async def dead_letter(self, group: str, message_id: str) -> DeadLetter | None:
        entries = await self._lookup(group, [message_id])
        return entries[0].letter if entries else None

    async def replay(self, group: str, message_ids: Collection[str] | None = None) -> int:
        """Republish to the group's replay subject (a new stream message: attempt 1), then
        delete the dead letter. The replay's ``Nats-Msg-Id`` is derived from the dead
        letter's sequence, so a replay interrupted between the two steps and run again
        does not deliver twice."""
        entries = (
            await self._scan(group, 2**62) if message_ids is None else await self._lookup(group, message_ids)
        )
        if not entries:
            return 0
        # The events stream keeps a message only while some consumer wants it: without the
        # group's consumer the replay would vanish along with the deleted dead letter.
        consumer = codec.name_token(group)
        await self._api(f"find group {group!r}", f"CONSUMER.INFO.{self.events_stream}.{consumer}")
        base = f"{self.prefix}.rp.{consumer}"
        await self._publish(
            [
                (
                    codec.message_subject(base, entry.letter.message.type, entry.letter.message.id),
                    entry.letter.message.body,
                    {codec.H_MSG_ID: f"replay-{self.dead_letter_stream}-{entry.record_sequence}"},
                )
                for entry in entries
            ]
        )
        for entry in entries:
            for sequence in (entry.record_sequence, entry.body_sequence):
                await self._api(
                    "delete a replayed dead letter",
                    f"STREAM.MSG.DELETE.{self.dead_letter_stream}",
                    {"seq": sequence, "no_erase": True},
                )
        return len(entries)

    async def purge(self, group: str, message_ids: Collection[str] | None = None) -> int:
        targets: list[str | None] = [None] if message_ids is None else list(message_ids)
        purged = 0
        for target in targets:
            for kind in ("dlr", "dlb"):  # records first: a letter without its record is invisible
                response = await self._api(
                    "purge dead letters",
                    f"STREAM.PURGE.{self.dead_letter_stream}",
                    {"filter": self._letter_subject(kind, group, target)},
                )
                if kind == "dlr":
                    purged += int(response.get("purged", 0))
        return purged


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    """A dead letter and the stream sequences of its record and body messages."""

    letter: DeadLetter
    record_sequence: int
    body_sequence: int
