"""Redis Streams transport: ``redis://host:6379/0?lease=30&prefix=choreograph&maxlen=0``.

Design, and why:

* **One stream per group.** ``publish`` routes each message to the stream of every group
  bound to its type (``P:s:<group>``, ``P`` = ``prefix``). The alternative, one stream
  per type read by consumer groups, shares storage across groups but needs a wildcard
  group to discover new type streams and to exist on each before its first message, and
  ties every group's retention to the slowest one. Per-group streams make fan-out plain,
  let each group delete what it acked, and give ``maxlen`` a per-group meaning. The price
  is one copy of a message per matching group.
* **Routing is server-side and atomic.** The group registry (``P:groups``, group -> types)
  is read by the publish Lua script itself, so a group registered before a publish
  receives it, with no client cache to go stale. A batch is one script: one round trip,
  all or nothing.
* **Attempts live in Redis.** An entry carries the attempt of its first delivery; the
  pending list's delivery count adds lease expiries (``XAUTOCLAIM`` increments it,
  ``touch`` = ``XCLAIM ... JUSTID`` does not). Retry and dead-letter move the entry and
  ``XACK`` + ``XDEL`` it in one script that first checks this consumer still holds it, so
  a verb that arrives after the lease expired is a no-op.
* **No daemon.** Consumers do the housekeeping in ``fetch``: one script moves due retries
  (``P:d:<group>``, a sorted set scored by server time) back into the stream, reclaims
  lease-expired entries and reads fresh ones. Only when nothing is ready does ``fetch``
  block in ``XREADGROUP``, for at most :data:`POLL` seconds at a time, so retries become
  due, leases are noticed and task cancellation / ``close()`` stay prompt (a long
  blocking read in redis-py can hold up cancellation).
* **Memory is bounded by the backlog.** Settling deletes the entry (``XDEL``), so a
  stream holds only unsettled messages; nothing is ever trimmed unread. ``maxlen=N``
  makes ``publish`` fail with :class:`TransportError` rather than grow a group's backlog
  (stream + delayed) past ``N``: back-pressure, never silent loss (``XADD MAXLEN`` would
  drop unacked events). Dead letters (``P:dl:<group>``) stay until purged.
* **Durability** is Redis's: ``publish`` returns on the server's reply; run Redis with
  ``appendonly yes`` to keep the bus across a restart. Connection errors are retried with
  backoff; ``fetch`` keeps waiting through an outage (until its timeout) and resumes.

All keys of a bus share the prefix: standalone Redis (or one cluster slot) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from choreograph.errors import ConfigurationError, TransportClosed, TransportError
from choreograph.transports import _redis_lua as lua
from choreograph.transports import lease_from_url
from choreograph.transports.base import DeadLetter, Delivery, Message, Subscription, Transport

log = logging.getLogger(__name__)

#: Longest single blocking read, in seconds (also bounds retry and lease-expiry latency).
POLL = 0.5
_OUR_PARAMS = ("lease", "prefix", "maxlen", "protocol")  # protocol: pinned to RESP2
_RELEASE_IDLE_MS = 10 * 365 * 86_400_000  # "idle for ten years": reclaimable at once
_CHUNK = 100


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisDelivery(Delivery):
    __slots__ = ("_sub", "_entry", "_count")

    def __init__(
        self, sub: RedisSubscription, entry: bytes, fields: Mapping[bytes, bytes], count: int
    ) -> None:
        message = Message(
            id=_str(fields.get(b"id") or entry),
            type=_str(fields.get(b"type", b"")),
            body=fields.get(b"body", b""),
        )
        try:
            first = int(fields.get(b"attempt", b"1"))
        except ValueError:
            first = 1
        super().__init__(message, first + count - 1, sub.group)
        self._sub = sub
        self._entry = entry
        self._count = count  # the pending list's delivery count when handed out

    async def _ack(self) -> None:
        await self._sub._ack([self])

    async def _retry(self, after: float) -> None:
        await self._sub._settle(self, "retry", str(round(after * 1000)), self.attempt + 1)

    async def _dead_letter(self, record: Mapping[str, Any]) -> None:
        body = orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)
        await self._sub._settle(self, "dead", body, self.attempt)

    async def touch(self) -> None:
        if not self.settled:
            await self._sub._hold([self], idle_ms=0)


class RedisSubscription(Subscription):
    def __init__(self, transport: RedisTransport, group: str, types_json: bytes) -> None:
        self.group = group
        self._transport = transport
        self._types_json = types_json
        self._stream, self._delayed, self._dead = transport._keys(group)
        self._cursor: bytes | str = "0-0"
        self._unsettled: dict[bytes, RedisDelivery] = {}
        self._closed = False

    # -- consuming ---------------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float | None = None) -> list[Delivery]:  # noqa: ASYNC109
        if max_messages < 1:
            raise ValueError("max_messages: must be >= 1")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        transport, failures = self._transport, 0
        while True:
            if self._closed:
                raise TransportClosed(f"redis transport: subscription {self.group!r} is closed")
            try:
                with transport._using():
                    deliveries, wait_ms = await self._sweep(max_messages)
                    if not deliveries:
                        block = POLL if wait_ms < 0 else min(POLL, wait_ms / 1000)
                        block = min(block, max(0.01, transport.lease / 4))
                        if deadline is not None:
                            block = min(block, deadline - loop.time())
                        if block >= 0.001:
                            deliveries = await self._read(max_messages, round(block * 1000))
                    if deliveries and self._closed:  # closed while we waited: hand them on
                        await self._release(deliveries)
                        deliveries = []
                if failures:
                    log.info("redis transport: group %r reconnected", self.group)
                failures = 0
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise TransportError(f"redis fetch for group {self.group!r} failed: {exc}") from exc
                log.warning(
                    "redis transport: group %r vanished from the server; registering it again", self.group
                )
                await transport._register(self.group, self._types_json)
                continue
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self._closed or transport._closed:
                    raise TransportClosed(f"redis transport: subscription {self.group!r} is closed") from exc
                failures += 1
                if failures == 1:
                    log.warning("redis transport: group %r lost the server (%s); retrying", self.group, exc)
                pause = min(2.0, 0.05 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - loop.time()))
                await asyncio.sleep(pause)
                deliveries = []
            except RedisError as exc:
                raise TransportError(f"redis fetch for group {self.group!r} failed: {exc}") from exc
            if deliveries:
                return list(deliveries)
            if deadline is not None and loop.time() >= deadline:
                return []

    async def _sweep(self, max_messages: int) -> tuple[list[RedisDelivery], int]:
        cursor, claimed, fresh, wait_ms = await self._transport._script(
            "sweep",
            [self._stream, self._delayed],
            [
                self.group,
                self._transport.consumer,
                round(self._transport.lease * 1000),
                self._cursor,
                max_messages,
            ],
        )
        self._cursor = cursor
        out = [self._deliver(entry, _pairs(flat), int(count)) for entry, flat, count in claimed]
        out += [self._deliver(entry, _pairs(flat), 1) for entry, flat in fresh]
        return out, int(wait_ms)

    async def _read(self, max_messages: int, block_ms: int) -> list[RedisDelivery]:
        reply: Any = await self._transport._redis.xreadgroup(
            self.group, self._transport.consumer, {self._stream: ">"}, count=max_messages, block=block_ms
        )
        # RESP2 (the client is pinned to it): [[stream, [(entry id, {field: value}), ...]]] or None
        return [self._deliver(entry, fields, 1) for _, entries in reply or () for entry, fields in entries]

    def _deliver(self, entry: bytes, fields: Mapping[bytes, bytes], count: int) -> RedisDelivery:
        delivery = RedisDelivery(self, entry, fields, count)
        self._unsettled[entry] = delivery
        return delivery

    # -- settling ----------------------------------------------------------------------

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        ours = [d for d in deliveries if isinstance(d, RedisDelivery) and d._sub is self and not d.settled]
        for delivery in ours:
            delivery.settled = True
        await self._ack(ours)
        for other in deliveries:
            if not (isinstance(other, RedisDelivery) and other._sub is self):
                await other.ack()

    async def _ack(self, deliveries: Sequence[RedisDelivery]) -> None:
        if not deliveries:
            return
        entries = [d._entry for d in deliveries]
        for entry in entries:
            self._unsettled.pop(entry, None)
        with self._transport._errors("ack"):
            pipe = self._transport._redis.pipeline(transaction=True)
            pipe.xack(self._stream, self.group, *entries)
            pipe.xdel(self._stream, *entries)
            await pipe.execute()

    async def _settle(self, delivery: RedisDelivery, verb: str, arg: str | bytes, attempt: int) -> None:
        self._unsettled.pop(delivery._entry, None)
        with self._transport._errors(verb):
            await self._transport._script(
                "settle",
                [self._stream, self._delayed, self._dead],
                [self.group, self._transport.consumer, delivery._entry, delivery._count, verb, arg, attempt],
            )

    async def _hold(self, deliveries: Sequence[RedisDelivery], idle_ms: int) -> int:
        pairs = [x for d in deliveries for x in (d._entry, d._count)]
        if not pairs:
            return 0
        with self._transport._errors("touch"):
            held: int = await self._transport._script(
                "hold", [self._stream], [self.group, self._transport.consumer, idle_ms, *pairs]
            )
        return held

    async def _release(self, deliveries: Sequence[RedisDelivery]) -> None:
        """Hand unsettled deliveries to the group's next fetch now, not at lease expiry."""
        for delivery in deliveries:
            delivery.settled = True
            self._unsettled.pop(delivery._entry, None)
        with contextlib.suppress(TransportError):
            await self._hold(deliveries, _RELEASE_IDLE_MS)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport._subscriptions.discard(self)
        await self._release(list(self._unsettled.values()))


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


class RedisTransport(Transport):
    """Redis Streams. ``async with RedisTransport("redis://localhost:6379/0?prefix=shop") as bus: ...``"""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lease = lease_from_url(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = dict((k, v) for k, v in query if k in _OUR_PARAMS)
        self.prefix = ours.get("prefix") or "choreograph"
        try:
            self.maxlen = int(ours.get("maxlen") or 0)
        except ValueError:
            raise ConfigurationError(f"broker URL: maxlen={ours['maxlen']!r} is not an integer") from None
        if self.maxlen < 0:
            raise ConfigurationError("broker URL: maxlen must be >= 0 (0: unbounded)")
        rest = urlencode([(k, v) for k, v in query if k not in _OUR_PARAMS])
        self._client_url = urlunsplit(parts._replace(query=rest))
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._subscriptions: set[RedisSubscription] = set()
        self._groups: set[str] = set()
        self._closed = False
        self._inflight = 0
        self._drained = asyncio.Event()

    def _keys(self, group: str) -> tuple[str, str, str]:
        """(stream, delayed set, dead-letter stream) of ``group``."""
        return f"{self.prefix}:s:{group}", f"{self.prefix}:d:{group}", f"{self.prefix}:dl:{group}"

    @property
    def _registry(self) -> str:
        return f"{self.prefix}:groups"

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise TransportError("redis transport is not connected: use `async with` or call connect()")
        return self._client

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Count an operation in flight, so ``close`` lets it finish before closing the pool
        (a connection redis-py reopens for a retry after the pool closed would leak)."""
        if self._closed:
            raise TransportClosed("redis transport is closed")
        self._inflight += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._drained.set()

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[str | bytes | int]) -> Any:
        return await self._scripts[name](keys=keys, args=args, client=self._redis)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate redis-py errors into choreograph's at the boundary."""
        try:
            with self._using():
                yield
        except RedisError as exc:
            if self._closed:
                raise TransportClosed("redis transport is closed") from exc
            raise TransportError(f"redis {what} failed: {exc}") from exc

    async def connect(self) -> None:
        if self._closed:
            raise TransportClosed("redis transport is closed")
        if self._client is not None:
            return
        client = aioredis.Redis.from_url(
            self._client_url,
            socket_timeout=max(10.0, 2 * POLL),
            socket_connect_timeout=5.0,
            protocol=2,
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=4),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._scripts = {
            name: client.register_script(getattr(lua, name.upper()))
            for name in ("register", "publish", "sweep", "settle", "hold", "forget", "dead")
        }
        with self._errors("connect"):
            try:
                await client.ping()
            except BaseException:
                await client.aclose()
                raise
        self._client = client

    async def close(self) -> None:
        if self._closed:
            return
        for sub in list(self._subscriptions):
            await sub.close()
        client = self._client
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                for group in self._groups:
                    await self._scripts["forget"](
                        keys=[self._keys(group)[0]], args=[group, self.consumer], client=client
                    )
        self._closed = True
        if self._inflight:  # fetches notice within one POLL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=POLL + 5.0)
        self._client = None
        if client is not None:
            await client.aclose()

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            with self._using():  # still refuse a closed transport
                return
        args: list[str | bytes | int] = [self.prefix, self.maxlen]
        for message in messages:
            args += [message.id, message.type, message.body]
        with self._errors("publish"):
            try:
                await self._script("publish", [self._registry], args)
            except ResponseError as exc:
                if "BACKLOG" in str(exc):
                    raise TransportError(f"redis publish refused: {exc} (the URL's maxlen)") from None
                raise

    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        if not group:
            raise ConfigurationError("subscribe: group must be a non-empty string")
        types_json = orjson.dumps(None if types is None else sorted(set(types)))
        await self._register(group, types_json)
        sub = RedisSubscription(self, group, types_json)
        self._subscriptions.add(sub)
        self._groups.add(group)
        return sub

    async def _register(self, group: str, types_json: bytes) -> None:
        with self._errors("subscribe"):
            await self._script("register", [self._registry, self._keys(group)[0]], [group, types_json])

    # -- dead letters ------------------------------------------------------------------

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        with self._errors("dead_letters"):
            names: Any = [group] if group is not None else await self._redis.hkeys(self._registry)
            groups = sorted(_str(name) for name in names)
            pipe = self._redis.pipeline(transaction=False)
            for name in groups:
                pipe.xrange(self._keys(name)[2], count=limit)
            replies: list[Any] = await pipe.execute()
        letters = [
            _dead_letter(name, fields)
            for name, entries in zip(groups, replies, strict=True)
            for _, fields in entries
        ]
        letters.sort(key=lambda letter: letter.dead_at)
        return letters[:limit]

    async def dead_letter(self, group: str, message_id: str) -> DeadLetter | None:
        start: str = "-"
        with self._errors("dead_letter"):
            while True:
                entries: Any = await self._redis.xrange(self._keys(group)[2], min=start, count=_CHUNK)
                for _, fields in entries:
                    if _str(fields.get(b"id", b"")) == message_id:
                        return _dead_letter(group, fields)
                if len(entries) < _CHUNK:
                    return None
                start = "(" + _str(entries[-1][0])

    async def replay(self, group: str, message_ids: Collection[str] | None = None) -> int:
        return await self._dead("replay", group, message_ids)

    async def purge(self, group: str, message_ids: Collection[str] | None = None) -> int:
        return await self._dead("purge", group, message_ids)

    async def _dead(self, verb: str, group: str, message_ids: Collection[str] | None) -> int:
        if message_ids is not None and not message_ids:
            return 0
        stream, _, dead = self._keys(group)
        ids = [] if message_ids is None else list(message_ids)
        total, start = 0, "-"
        with self._errors(verb):
            while start:
                count, after = await self._script("dead", [dead, stream], [verb, group, start, _CHUNK, *ids])
                total, start = total + int(count), _str(after)
        return total


def _dead_letter(group: str, fields: Mapping[bytes, bytes]) -> DeadLetter:
    message = Message(
        id=_str(fields.get(b"id", b"")), type=_str(fields.get(b"type", b"")), body=fields.get(b"body", b"")
    )
    record = orjson.loads(fields.get(b"record", b"{}"))
    return DeadLetter(
        group=group, message=message, record=record, dead_at=float(fields.get(b"dead_at", b"0"))
    )
