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
  every unacknowledged message back in its queue (``Harness.run`` has the order). A retry
  copy held in at-least-once dead-letter transit (from a retry queue back to the group,
  after a node restart) is neither ready nor unacknowledged: only the HTTP API's
  ``messages`` counts it. Where the harness runs the node itself (``--restart-broker``,
  the only runs that kill a node) it enables the API and counts every queue's ``messages``
  there instead (``bench/_rabbit_management.py``).

A join deadline timer that is not yet due is *scheduled*, not pending (it can only find
its join fired or already compensated). SQLite and Redis read each held message's type
and the timer's due time. NATS cannot look inside without consuming, so the groups that
take timers are allowed as many as the observer knows are not yet due. RabbitMQ cannot
either, but a timer waits for its due time in a holding queue whose delay is longer than
any retry backoff of the shop's policy, where nothing else goes: those queues are
scheduled timers (and copies of them: a kill between the copy and the ack of a deferral
leaves two, which no count by the observer could allow for); what a timer-taking group
holds elsewhere is allowed the timers due around then (see ``bench._chaos_amqp.AmqpBus.timers_allowed``).
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

from bench._chaos_bus import Observer, timer_scheduled
from choreograph.joins import DEADLINE
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


def bus_for(url: str, transport: Transport, *, longest_retry: float, management_url: str | None = None) -> Bus:
    """``management_url``: a RabbitMQ node's management API, counted by ``AmqpBus`` if given."""
    kind = urlsplit(url).scheme
    if kind == "sqlite":
        return SQLiteBus(url, transport)
    if kind == "nats":
        return NatsBus(url, transport)
    if kind in ("redis", "rediss"):
        return RedisBus(url, transport)
    if kind in ("amqp", "amqps"):
        from bench._chaos_amqp import AmqpBus

        return AmqpBus(url, transport, longest_retry=longest_retry, management_url=management_url)
    return Bus(url, transport)
