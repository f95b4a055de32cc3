"""The chaos harness per broker: real duplicate copies, what a group still holds, cleanup.

"Is any event still pending?" is asked of each group (the shop's services and the
observer) once every order has ended, until three polls in a row say no. What a group
holds, per broker:

* **SQLite**: the bus file's ``deliveries`` rows of the group, delivered or not.
* **NATS**: the group's consumer ``num_pending + num_ack_pending``.
* **Redis Streams**: the group's pending entries list (``XPENDING``: delivered, not
  acknowledged), the entries of its stream after its ``last-delivered-id`` (not yet
  delivered: counted, since ``XINFO GROUPS`` ``lag`` is nil once an entry the group has
  not read was deleted, and the transport deletes entries) and its delayed retries (the
  sorted set ``P:d:<group>``), read in one Lua script (one snapshot).
* **RabbitMQ**: the group's queue and its retry holding queues (``P.retry.<group>.<ms>``,
  every bucket) by a passive declare, which gives the messages *ready*. Messages a
  consumer holds unacknowledged are counted nowhere over AMQP 0-9-1 (only the management
  plugin's HTTP API has them, and a server need not run it): so the harness waits longer
  for quiet (no new event seen by the observer for longer than a handler may run), stops
  the consumers, and checks the count taken after they stopped, when the broker has put
  every unacknowledged message back in its queue (``Harness.run`` has the order).

A join deadline timer that is not yet due is *scheduled*, not pending (it can only find
its join fired or already compensated). SQLite and Redis read each held message's type
and the timer's due time. NATS cannot look inside without consuming, so the groups that
take timers are allowed as many as the observer knows are not yet due. RabbitMQ cannot
either, but a timer waits for its due time in a holding queue whose delay is longer than
any retry backoff of the shop's policy, where nothing else goes: those queues are
scheduled timers (and copies of them: a kill between the copy and the ack of a deferral
leaves two, which no count by the observer could allow for); what a timer-taking group
holds elsewhere is allowed the timers due around then (see ``AmqpBus.timers_allowed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench._chaos_bus import TIMER_SLACK, Observer, timer_scheduled
from choreograph.joins import DEADLINE
from choreograph.runtime.worker import IN_FLIGHT_DEFER
from choreograph.transports.base import Message, Transport

Groups = Mapping[str, bool]
"""Group name -> whether it takes join deadline timers."""


class Bus:
    """What the harness needs from a broker beyond the transport contract."""

    #: The backlog counts messages consumers hold unacknowledged (False: ready ones only,
    #: so the settle waits longer and ``final_backlog`` has the count to check).
    sees_unacked = True
    #: How the pending check counts, for its detail line.
    how = ""

    def __init__(self, url: str, transport: Transport) -> None:
        self.url = url
        self.transport = transport
        self.kind = urlsplit(url).scheme
        self.detail: dict[str, str] = {}  # group -> what it held at the last poll, when it held anything

    async def start(self) -> None:
        pass

    async def republish(self, message: Message) -> None:
        await self.transport.publish([message])

    async def backlog(self, groups: Groups, observer: Observer,
                      as_of: float | None = None) -> dict[str, int] | None:
        """Events still pending per group; None: cannot tell on this broker.

        ``as_of``: when the consumers of the timer-taking groups stopped (None: they run), so
        timers falling due since then are still scheduled."""
        return None

    async def final_backlog(self, groups: Groups, observer: Observer, as_of: float) -> dict[str, int] | None:
        """Pending per group once every consumer has stopped; None: the last ``backlog`` stands."""
        return None

    async def close(self, *, keep: bool) -> None:
        pass


class SQLiteBus(Bus):
    how = "the bus file's deliveries"

    def __init__(self, url: str, transport: Transport) -> None:
        super().__init__(url, transport)
        self.path = Path(urlsplit(url).path[1:])

    async def backlog(self, groups: Groups, observer: Observer,
                      as_of: float | None = None) -> dict[str, int] | None:
        return await asyncio.to_thread(self._backlog, list(groups), as_of or time.time())

    def _backlog(self, groups: list[str], now: float) -> dict[str, int]:
        pending = dict.fromkeys(groups, 0)
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = conn.execute(
                "SELECT d.grp, m.type, m.body FROM deliveries d JOIN messages m ON m.seq = d.seq"
            ).fetchall()
        finally:
            conn.close()
        for group, type_, body in rows:
            if type_ == DEADLINE and timer_scheduled(body, now):
                continue
            pending[group] = pending.get(group, 0) + 1
        return pending


class NatsBus(Bus):
    how = "num_pending + num_ack_pending"

    def __init__(self, url: str, transport: Transport) -> None:
        super().__init__(url, transport)
        from choreograph.transports.nats import NatsTransport

        assert isinstance(transport, NatsTransport)
        self.nats = transport
        self._nc: Any = None
        self._js: Any = None

    async def start(self) -> None:
        import nats

        self._nc = await nats.connect(self.nats._servers, connect_timeout=2, max_reconnect_attempts=-1)
        self._js = self._nc.jetstream()

    async def republish(self, message: Message) -> None:
        from choreograph.transports._nats_codec import message_subject

        subject = message_subject(f"{self.nats.prefix}.ev", message.type, message.id)  # id in the subject
        await self._js.publish(subject, message.body)  # no Nats-Msg-Id: the broker keeps both copies

    async def backlog(self, groups: Groups, observer: Observer,
                      as_of: float | None = None) -> dict[str, int] | None:
        from choreograph.transports._nats_codec import name_token

        timers_not_due = observer.timers_not_due(as_of or time.time())
        pending: dict[str, int] = {}
        for group, takes_timers in groups.items():
            info = await self._js.consumer_info(self.nats.events_stream, name_token(group))
            waiting = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            pending[group] = max(0, waiting - timers_not_due) if takes_timers else waiting
        return pending

    async def close(self, *, keep: bool) -> None:
        if self._nc is None:
            return
        if not keep:
            for stream in self.nats.streams:
                reply = await self._nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=5)
                error = json.loads(reply.data).get("error")
                if error and error.get("err_code") != 10059:  # no such stream
                    raise RuntimeError(f"deleting NATS stream {stream}: {error}")
        with contextlib.suppress(Exception):
            await self._nc.close()


REDIS_HELD = """
local stream, delayed, group, timer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local function fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
local last = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local f = fields(g)
  if f['name'] == group then last = f['last-delivered-id'] end
end
if not last then return redis.error_reply('NOGROUP no group ' .. group .. ' on ' .. stream) end
local timers = {}
local function note(flat)
  local f = fields(flat)
  if f['type'] == timer then timers[#timers + 1] = f['body'] or '' end
end
local unacked = tonumber(redis.call('XPENDING', stream, group)[1])
if unacked > 0 then
  for _, p in ipairs(redis.call('XPENDING', stream, group, '-', '+', unacked)) do
    local e = redis.call('XRANGE', stream, p[1], p[1])
    if #e == 1 then note(e[1][2]) end
  end
end
local undelivered = 0
for _, e in ipairs(redis.call('XRANGE', stream, '(' .. last, '+')) do
  undelivered = undelivered + 1
  note(e[2])
end
local waiting = redis.call('ZRANGE', delayed, 0, -1)
for _, member in ipairs(waiting) do
  local m = cmsgpack.unpack(member)
  if m[2] == timer then timers[#timers + 1] = m[3] end
end
return {unacked, undelivered, #waiting, timers}
"""
"""KEYS: a group's stream and delayed set. ARGV: group, timer type. Returns {delivered and
not acknowledged, not yet delivered, delayed retries, bodies of the join timers among them}."""


class RedisBus(Bus):
    """Redis Streams (layout: ``choreograph.transports._redis_lua``)."""

    how = "unacknowledged + undelivered + delayed retries"

    def __init__(self, url: str, transport: Transport) -> None:
        super().__init__(url, transport)
        from choreograph.transports.redis import RedisTransport

        assert isinstance(transport, RedisTransport)
        self.redis = transport
        self._client: Any = None
        self._held: Any = None

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(self.redis._client_url, protocol=2)
        self._held = self._client.register_script(REDIS_HELD)

    async def backlog(self, groups: Groups, observer: Observer,
                      as_of: float | None = None) -> dict[str, int] | None:
        pending: dict[str, int] = {}
        self.detail = {}
        for group in groups:
            stream, delayed, _ = self.redis._keys(group)
            held = await self._held(keys=[stream, delayed], args=[group, DEADLINE])
            unacked, undelivered, waiting, timers = held
            now = as_of or time.time()
            scheduled = sum(timer_scheduled(body, now) for body in timers)
            pending[group] = int(unacked) + int(undelivered) + int(waiting) - scheduled
            if pending[group]:
                self.detail[group] = (f"{unacked} unacknowledged, {undelivered} undelivered, "
                                      f"{waiting} delayed, {scheduled} of them timers not yet due")
        return pending

    async def close(self, *, keep: bool) -> None:
        if self._client is None:
            return
        try:
            if not keep:
                match = _glob_escape(self.redis.prefix) + ":*"
                keys = [key async for key in self._client.scan_iter(match=match, count=500)]
                for start in range(0, len(keys), 500):
                    await self._client.delete(*keys[start : start + 500])
        finally:
            await self._client.aclose()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


WORKER_HAND_BACK_S = max(IN_FLIGHT_DEFER, 1.0)
"""The worker's own delayed hand-backs wait this long: a copy arriving while another is handled
(``IN_FLIGHT_DEFER``), a batch whose inbox could not be read (1 s)."""


class AmqpBus(Bus):
    """RabbitMQ (layout: ``choreograph.transports._amqp_wire``). Counts by passive declares on a
    connection of its own: nothing is consumed, nothing changes.

    ``longest_retry``: the longest backoff of the services' retry policies (seconds); a holding
    queue with a longer delay holds only deferred join timers."""

    sees_unacked = False
    how = ("counted after every consumer stopped: ready in the group's queue and its retry queues; "
           "timers waiting in longer holding queues are scheduled")

    def __init__(self, url: str, transport: Transport, *, longest_retry: float) -> None:
        super().__init__(url, transport)
        from choreograph.transports._amqp_wire import RETRY_BUCKETS_MS, retry_bucket_ms
        from choreograph.transports.amqp import AmqpTransport

        assert isinstance(transport, AmqpTransport)
        self.amqp = transport
        self.longest_retry_ms = retry_bucket_ms(max(longest_retry, WORKER_HAND_BACK_S))
        # A delay is rounded up to the next bucket: a timer leaves its holding queue at most this
        # share of its wait after it fell due.
        buckets = RETRY_BUCKETS_MS
        self.late_fraction = max(b / a for a, b in zip(buckets, buckets[1:], strict=False)) - 1
        self._connection: Any = None
        self._connecting = asyncio.Lock()

    async def start(self) -> None:
        import aiormq

        self._connection = await aiormq.connect(self.amqp._client_url)

    async def _open_connection(self) -> Any:
        """The counting connection, opened again if the broker closed it (a broker restart)."""
        import aiormq

        async with self._connecting:
            if self._connection is None or self._connection.is_closed:
                self._connection = await aiormq.connect(self.amqp._client_url)
            return self._connection

    async def _held(self, group: str) -> tuple[int, int]:
        """(ready in the group's queue and in the holding queues of retries, waiting in the
        longer holding queues). A queue that does not exist holds nothing (the refusal closes
        the channel, so a new one follows)."""
        import aiormq.exceptions

        from choreograph.transports._amqp_wire import RETRY_BUCKETS_MS

        names = self.amqp.names
        queues = [(names.group(group), 0), *((names.retry(group, ms), ms) for ms in RETRY_BUCKETS_MS)]
        connection = await self._open_connection()
        channel = await connection.channel()
        ready = waiting = 0
        try:
            for queue, delay_ms in queues:
                try:
                    declared = await channel.queue_declare(queue, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    channel = await connection.channel()
                    continue
                count = int(declared.message_count or 0)
                if delay_ms > self.longest_retry_ms:
                    waiting += count
                else:
                    ready += count
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return ready, waiting

    def timers_allowed(self, observer: Observer, as_of: float, now: float) -> int:
        """Timers a timer-taking group may hold outside the long holding queues, as scheduled:
        those that left them since ``as_of`` (their consumers stopped then: nobody takes them)
        or were just deferred into a short one (due within the longest retry), copies included.
        A timer leaves its holding queue up to ``late_fraction`` of its wait after its due time."""
        late = self.late_fraction * observer.longest_timer_wait()
        return observer.timers_due_between(as_of - TIMER_SLACK - late, now + self.longest_retry_ms / 1000)

    async def backlog(self, groups: Groups, observer: Observer,
                      as_of: float | None = None) -> dict[str, int] | None:
        held = await asyncio.gather(*(self._held(group) for group in groups))
        now = time.time()
        allowed = self.timers_allowed(observer, as_of or now, now)
        pending = {}
        self.detail = {}
        for (group, takes_timers), (ready, waiting) in zip(groups.items(), held, strict=True):
            pending[group] = max(0, ready - allowed) if takes_timers else ready
            if pending[group]:
                self.detail[group] = f"{ready} ready" + (
                    f", {allowed} timers may be among them, {waiting} timers waiting" if takes_timers else "")
        return pending

    async def final_backlog(self, groups: Groups, observer: Observer, as_of: float) -> dict[str, int] | None:
        """Every consumer has stopped, so the broker has returned what they held: the counts are
        all that is left. Taken when two polls half a second apart agree (a retry leaving its
        holding queue for the group's queue is ready in neither for an instant)."""
        last: dict[str, int] | None = None
        for _ in range(20):
            pending = await self.backlog(groups, observer, as_of) or {}
            if pending == last:
                break
            last = pending
            await asyncio.sleep(0.5)
        return last

    async def close(self, *, keep: bool) -> None:
        if self._connection is None:
            return
        try:
            if not keep:
                await self._delete()
        finally:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _delete(self) -> None:
        """Delete every queue and the exchange of this bus (its groups are read from its registry)."""
        from bench._broker_env import remove_choreograph_bus

        await remove_choreograph_bus("amqp", self.url)


def bus_for(url: str, transport: Transport, *, longest_retry: float) -> Bus:
    kind = urlsplit(url).scheme
    if kind == "sqlite":
        return SQLiteBus(url, transport)
    if kind == "nats":
        return NatsBus(url, transport)
    if kind in ("redis", "rediss"):
        return RedisBus(url, transport)
    if kind in ("amqp", "amqps"):
        return AmqpBus(url, transport, longest_retry=longest_retry)
    return Bus(url, transport)
