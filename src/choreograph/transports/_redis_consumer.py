"""The consuming side of the Redis transport: subscriptions and their deliveries.

See :mod:`choreograph.transports.redis` for the design; the scripts these call are in
:mod:`choreograph.transports._redis_lua`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from choreograph.errors import TransportClosed, TransportError
from choreograph.transports.base import Delivery, Message, Subscription, bad_batch, closed_delivery

if TYPE_CHECKING:
    from choreograph.transports.redis import RedisTransport

log = logging.getLogger("choreograph.transports.redis")

#: Longest single blocking read, in seconds (also bounds retry and lease-expiry latency).
POLL = 0.5
#: While messages keep coming, how often a consumer runs the housekeeping script (due
#: retries back into the stream, lease-expired entries claimed); the fetches in between
#: are plain ``XREADGROUP`` calls, which cost the server a fraction of the script.
SWEEP_EVERY = 0.1
_RELEASE_IDLE_MS = 10 * 365 * 86_400_000  # "idle for ten years": reclaimable at once


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_new_message = tuple.__new__  # Message is a named tuple: built without its __new__ wrapper


class RedisDelivery(Delivery):
    __slots__ = ("_sub", "_entry", "_count")

    def __init__(self, sub: RedisSubscription, entry: bytes, flat: Sequence[bytes], count: int) -> None:
        """``flat``: the entry's fields as the server sends them, ``[f1, v1, f2, v2, ...]``."""
        # Delivery.__init__ written out: one of these is made per message handed out.
        if len(flat) == 6 and flat[0] == b"id" and flat[2] == b"type" and flat[4] == b"body":
            # The entry exactly as publish writes it (attempt 1 on its first delivery):
            # read in place, without a field dict.
            self.message = _new_message(Message, ((flat[1] or entry).decode(), flat[3].decode(), flat[5]))
            self.attempt = count
        else:
            fields = _pairs(flat)
            self.message = Message(
                id=_str(fields.get(b"id") or entry),
                type=_str(fields.get(b"type", b"")),
                body=fields.get(b"body", b""),
            )
            try:
                first = int(fields.get(b"attempt", b"1"))
            except ValueError:
                first = 1
            self.attempt = first + count - 1
        self.group = sub.group
        self.settled = False
        self._sub = sub
        self._entry = entry
        self._count = count  # the pending list's delivery count when handed out

    async def _ack(self) -> None:
        await self._sub._ack([self])

    async def _retry(self, after: float) -> None:
        await self._sub._settle(self, "retry", str(math.ceil(after * 1000)), self.attempt + 1)

    async def _defer(self, after: float) -> None:
        await self._sub._settle(self, "retry", str(math.ceil(after * 1000)), self.attempt)

    async def _dead_letter(self, record: Mapping[str, Any]) -> None:
        body = orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)
        await self._sub._settle(self, "dead", body, self.attempt)

    async def touch(self) -> None:
        if not self.settled:
            self._sub._check_settle(self)  # else it took back what close() handed on, for a lease
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
        self._next_sweep = 0.0  # loop time of the next housekeeping sweep
        self._retry_due: float | None = None  # loop time the earliest known delayed retry is due
        self._conn: Any = None  # the connection its blocking reads go on (see _read)
        self._reading = False
        self._reads = 0  # sweeps and reads of this subscription under way
        self._unread = False  # one ended without its reply read: entries may be ours, unseen (see _adopt)

    # -- consuming ---------------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float | None = None) -> list[Delivery]:  # noqa: ASYNC109
        if max_messages < 1:
            raise bad_batch(max_messages)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        transport, failures = self._transport, 0
        while True:
            if self._closed:
                raise TransportClosed(f"redis transport: subscription {self.group!r} is closed")
            try:
                with transport._using():
                    adopting = transport._adopting
                    while adopting and self.group in adopting:  # no read while one runs (see _adopt)
                        await adopting[self.group].wait()
                    deliveries: list[RedisDelivery] = []
                    if self._unread and self._quiet():
                        deliveries = await self._adopt(max_messages)
                    now = loop.time()
                    if not deliveries and (
                        now >= self._next_sweep or (self._retry_due is not None and now >= self._retry_due)
                    ):
                        deliveries, wait_ms = await self._sweep(max_messages)
                        now = loop.time()
                        self._next_sweep = now + min(SWEEP_EVERY, transport.lease / 4)
                        self._retry_due = None if wait_ms < 0 else now + wait_ms / 1000
                    if not deliveries:
                        # Straight to the blocking read (it returns at once when entries are
                        # there), no plain read before it: one round trip per fetch of a group
                        # that is not busy, where there were three (sweep script, read, block).
                        block = min(POLL, max(0.01, transport.lease / 4))
                        if self._retry_due is not None:
                            block = min(block, self._retry_due - now)
                        if deadline is not None:
                            block = min(block, deadline - now)
                        deliveries = await self._read(
                            max_messages, round(block * 1000) if block >= 0.001 else None
                        )
                        if not deliveries:
                            self._next_sweep = 0.0  # it waited in vain: look after leases and retries next
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
        self._reads += 1
        try:
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
            out = [self._deliver(entry, flat, int(count)) for entry, flat, count in claimed]
            out += [self._deliver(entry, flat, 1) for entry, flat in fresh]  # in hand before _leave
        except BaseException:
            self._unread = True  # it may have claimed or read entries whose reply is lost
            raise
        finally:
            self._reads -= 1
            if self._closed:  # not a call per read on the path of every event
                self._leave()
        return out, int(wait_ms)

    async def _read(self, max_messages: int, block_ms: int | None) -> list[RedisDelivery]:
        """``XREADGROUP`` of fresh entries; ``block_ms=None``: do not wait.

        On a connection of the subscription's own, written and read directly rather than
        through the client's ``execute_command``: its pool checkout and release, retry
        wrapper and metrics hooks ran between the reply's arrival and the deliveries being
        handed out - on the path of every event at a light load. A connection error is the
        fetch's to retry (with backoff); a read that does not end normally (an error, a
        cancellation) closes the connection, whose reply may be half read, and the next read
        opens another."""
        transport = self._transport
        block = () if block_ms is None else ("BLOCK", block_ms)
        command = (
            "XREADGROUP", "GROUP", self.group, transport.consumer, "COUNT", max_messages, *block,
            "STREAMS", self._stream, ">",
        )  # fmt: skip
        reply: Any
        self._reads += 1
        try:
            if self._reading:
                # Another fetch of this subscription is reading on its connection (fetches may run
                # side by side): a second command there had two readers on one socket, one of them
                # failing with a RuntimeError. This one goes through the client's pool.
                reply = await transport._redis.execute_command(*command)  # type: ignore[no-untyped-call]
            else:
                conn = self._conn
                if conn is None:
                    conn = self._conn = transport._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
                elif conn._reader is not None and conn._reader.at_eof():
                    # The server closed it while no read was under way (idle past its timeout, a
                    # client kill, a restart): as the pool would, connect again rather than write to
                    # it and take its end for a lost server (a warning and a pause).
                    await _disconnect(conn, nowait=True)
                self._reading = True
                try:
                    await conn.send_command(*command)
                    reply = await conn.read_response()
                except BaseException:
                    self._conn = None
                    await _disconnect(conn, nowait=True)
                    raise
                finally:
                    self._reading = False
                if self._closed:  # closed while it read: close() left the connection to us
                    self._conn = None
                    await _disconnect(conn)
            # The reply as the server sends it (RESP2, parsed no further):
            # [[stream, [[entry id, [field, value, ...]], ...]]] or None. In hand before _leave.
            if not reply:
                return []
            unsettled, out = self._unsettled, []
            for entry, flat in reply[0][1]:
                delivery = unsettled[entry] = RedisDelivery(self, entry, flat, 1)
                out.append(delivery)
            return out
        except BaseException:
            # Cancelled (a worker stopping, a caller's timeout) or cut off while it blocked: the
            # server may have handed this consumer entries that no one will see until the lease
            # expires. The next fetch hands them out, or close() hands them on (see _adopt).
            self._unread = True
            raise
        finally:
            self._reads -= 1
            if self._closed:  # not a call per read on the path of every event
                self._leave()

    async def _adopt(self, max_messages: int, verb: str = "adopt") -> list[RedisDelivery]:
        """Hand out again the entries this consumer was handed by a read whose reply it never
        read (:attr:`_unread`): pending under it, in no one's hands, they waited out the lease
        and were then delivered as one attempt more than any handler saw.

        Run only when no read of the group's subscriptions on this transport is under way
        (:meth:`_quiet`: they read as one consumer), and their fetches wait for it to end
        (``transport._adopting``): an entry a read under way was handed is not in hand yet
        either, and would be handed out twice. ``verb="requeue"`` (``close``) puts them back on
        the stream instead, under the same exclusion: a sibling's read served meanwhile was put
        back as well as handed to it."""
        transport = self._transport
        self._unread = False
        adopting = transport._adopting[self.group] = asyncio.Event()
        self._reads += 1  # as a read: a subscription closed meanwhile stays one of the group's (_leave)
        try:
            more, adopted = await transport._script(
                "adopt",
                [self._stream],
                [
                    self.group, transport.consumer, verb, round(transport.lease * 1000), max_messages,
                    *self._in_hand(),
                ],
            )  # fmt: skip
            if more:
                self._unread = True
            return [self._deliver(entry, flat, int(count)) for entry, flat, count in adopted]
        except BaseException:
            self._unread = True  # its reply lost too: they are still ours, with their counts
            raise
        finally:
            self._reads -= 1
            self._leave()
            del transport._adopting[self.group]
            adopting.set()

    def _siblings(self) -> set[RedisSubscription]:
        """This subscription and the transport's others of its group (open, or closed and not
        done with: see :meth:`_leave`): they read as one consumer (the transport's name), so
        what one holds is in hand for the pending list."""
        return {self, *(s for s in self._transport._subscriptions if s.group == self.group)}

    def _leave(self) -> None:
        """Leave the group's subscriptions on the transport once closed and done with: no read
        under way and nothing in hand (``close``, and a fetch closed while it read, hand that on
        first). Until then what it reads or holds is in hand for its siblings' :meth:`_adopt`,
        which took what a closing one held for entries no one saw (handed out twice)."""
        if self._closed and not self._reads and not self._unsettled:
            self._transport._subscriptions.discard(self)

    def _quiet(self) -> bool:
        """Whether no read (or :meth:`_adopt`) of this consumer's in the group is under way."""
        return self.group not in self._transport._adopting and not any(s._reads for s in self._siblings())

    def _in_hand(self) -> list[bytes]:
        return [entry for sub in self._siblings() for entry in sub._unsettled]

    def _deliver(self, entry: bytes, flat: Sequence[bytes], count: int) -> RedisDelivery:
        delivery = RedisDelivery(self, entry, flat, count)
        self._unsettled[entry] = delivery
        return delivery

    # -- settling ----------------------------------------------------------------------

    def _check_settle(self, delivery: RedisDelivery) -> None:
        """A verb after the subscription closed: refused, as on every transport (see
        base.Delivery). close() made the entry reclaimable at once: the group's next fetch
        has it, and a settlement from here would find the claim gone and do nothing."""
        if self._closed or self._transport._closed:
            raise closed_delivery(delivery, "redis transport")

    def _forget(self, delivery: RedisDelivery) -> None:
        if self._unsettled.get(delivery._entry) is delivery:  # not a later redelivery of the entry
            del self._unsettled[delivery._entry]

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        ours: list[RedisDelivery] = []
        others: list[Delivery] = []
        for d in deliveries:
            if isinstance(d, RedisDelivery) and d._sub is self:
                if not d.settled:
                    ours.append(d)
            else:
                others.append(d)
        await self._ack(ours)  # settled only once acked: the worker retries a failed settle step
        for d in ours:
            d.settled = True
        for other in others:
            await other.ack()

    async def _ack(self, deliveries: Sequence[RedisDelivery]) -> None:
        if not deliveries:
            return
        self._check_settle(deliveries[0])
        entries = [delivery._entry for delivery in deliveries]
        with self._transport._errors("ack"):
            await self._transport._script("ack", [self._stream], [self.group, *entries])
        unsettled = self._unsettled
        for delivery in deliveries:  # _forget, written out; after the ack: if it failed, they stay ours
            entry = delivery._entry
            if unsettled.get(entry) is delivery:
                del unsettled[entry]

    async def _settle(self, delivery: RedisDelivery, verb: str, arg: str | bytes, attempt: int) -> None:
        """Retry or dead-letter ``delivery`` (one script: a no-op unless this consumer still
        holds that claim, so a second call after a failed one is safe)."""
        self._check_settle(delivery)
        if verb == "retry":  # this consumer knows when its own retry is due without asking
            due = asyncio.get_running_loop().time() + int(arg) / 1000
            self._retry_due = due if self._retry_due is None else min(self._retry_due, due)
        with self._transport._errors(verb):
            await self._transport._script(
                "settle",
                [self._stream, self._delayed, self._dead, self._transport._letter_index(self.group)],
                [self.group, self._transport.consumer, delivery._entry, delivery._count, verb, arg, attempt],
            )
        self._forget(delivery)  # after the script: if it failed, close() still hands the entry on

    async def _hold(self, deliveries: Sequence[RedisDelivery], idle_ms: int, *, closing: bool = False) -> int:
        pairs = [x for d in deliveries for x in (d._entry, d._count)]
        if not pairs:
            return 0
        with self._transport._errors("touch", closing=closing):
            held: int = await self._transport._script(
                "hold", [self._stream], [self.group, self._transport.consumer, idle_ms, *pairs]
            )
        return held

    async def _release(self, deliveries: Sequence[RedisDelivery]) -> None:
        """Hand unsettled deliveries to the group's next fetch now, not at lease expiry.

        They are not marked settled: a verb called on one afterwards raises TransportClosed
        (see _check_settle). Marked, it returned as if done - an ack, a retry's delay, a
        dead letter and its record dropped without a word."""
        released = False
        try:
            with contextlib.suppress(TransportError):
                # closing=True: a fetch whose read returned while the transport was closing hands
                # on what it read; refused, that waited on a consumer that is gone for the lease.
                await self._hold(deliveries, _RELEASE_IDLE_MS, closing=True)
                released = True
        finally:
            # Forgotten after, not before: until then they are in hand (see _adopt). Not at all
            # if that failed: pending under the consumer until the lease, their handler may have
            # run, and a sibling's _adopt would hand them out again as the same attempt.
            if released:
                for delivery in deliveries:
                    self._forget(delivery)
            self._leave()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # it stays one of the group's until it has handed on what it holds (_leave)
        conn = self._conn
        if conn is not None and not self._reading:  # else the read under way closes it when it ends
            self._conn = None
            await _disconnect(conn)
        if self._unread and self._quiet():
            # A fetch cancelled in its read (a worker stopping cancels it, then closes): what
            # the server handed it goes back to the stream as the attempt it was read for.
            with contextlib.suppress(TransportError), self._transport._errors("close", closing=True):
                await self._adopt(2**31, "requeue")
        await self._release(list(self._unsettled.values()))


async def _disconnect(conn: Any, *, nowait: bool = False) -> None:
    """Close a connection of our own (a subscription's reads, the transport's scripts), quietly."""
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=nowait)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}
