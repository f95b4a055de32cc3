"""The chaos harness on the bus: an observer that duplicates deliveries, and backlog probes.

The observer is a consumer group of its own with a wildcard subscription (like the
journal): it sees every event every service sees, records per order which event ids
of each type were published (two different ids of ``OrderShipped`` for one order would
mean it shipped twice, whatever the stores say), keeps the due time of every join
deadline timer, and publishes a fraction of what it sees a second time, **same id, same
body**, after a random delay of up to a second. The copy reaches every group again:
sometimes after the original was handled (the inbox drops it), sometimes while the
original is being handled by the same or another replica (the worker defers it, or two
replicas race and idempotent steps must hold).

On NATS the transport sets ``Nats-Msg-Id`` to the event id, and JetStream drops a
republished id within its two-minute duplicate window; that is the broker's dedupe
working, not a duplicate delivery. To get a real second delivery there the observer
publishes the copy with the nats-py client directly, in the form the transport uses for
bodies too large for a header (type and id in the subject, ``P.ev.<type>.<id>``) and so
without the dedupe header: what a publisher retrying after the window would produce.

What the harness needs from each broker beyond the transport contract (how to publish a
real copy, how to count what a group still holds, how to clean up) is in
``bench/_chaos_brokers.py``.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from choreograph.joins import DEADLINE
from choreograph.service import FAILED
from choreograph.transports.base import Message, Subscription, Transport

OBSERVER_GROUP = "chaos-observer"
PLACED = "shop.order.placed"
TERMINAL = ("shop.order.shipped", "shop.order.cancelled")
TIMER_SLACK = 5.0
"""Seconds past its due time a join deadline timer may still be waiting (redelivery precision)."""

Republish = Callable[[Message], Awaitable[None]]


def timer_due(body: bytes | str) -> float:
    """When the join deadline timer whose envelope is ``body`` is due (epoch seconds; 0 if unreadable)."""
    try:
        data = orjson.loads(body).get("data")
        return float(data.get("due", 0.0)) if isinstance(data, dict) else 0.0
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0.0


def timer_scheduled(body: bytes | str, now: float) -> bool:
    """A join deadline timer not yet due (within ``TIMER_SLACK``) is *scheduled*, not pending."""
    return timer_due(body) > now - TIMER_SLACK


def order_of(data: Any) -> str | None:
    """The order an event is about: ``data.order_id``, or that of the failed event's envelope."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("order_id"), str):
        return str(data["order_id"])
    envelope = data.get("envelope")
    if isinstance(envelope, dict):
        return order_of(envelope.get("data"))
    return None


class Observer:
    """Records every event per order and duplicates ``duplicate_rate`` of the deliveries."""

    def __init__(self, transport: Transport, republish: Republish, *, duplicate_rate: float,
                 rng: random.Random) -> None:
        self.transport = transport
        self.republish = republish
        self.duplicate_rate = duplicate_rate
        self.rng = rng
        self.ids: dict[str, dict[str, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
        self.types: collections.Counter[str] = collections.Counter()
        self.timers: dict[str, float] = {}  # timer event id -> due (epoch seconds)
        self.timer_seen: dict[str, float] = {}  # timer event id -> when the observer first saw it
        self.timer_copies: collections.Counter[str] = collections.Counter()  # timer id -> copies published
        self.seen: set[str] = set()
        self.placed_at: dict[str, float] = {}  # order -> when the observer first saw it placed
        self.ended_at: dict[str, float] = {}  # order -> when the observer first saw its terminal event
        self.observed = 0
        self.duplicated = 0
        self.duplicate_failures = 0
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._copies: set[asyncio.Task[None]] = set()
        self.failures = 0  # fetches or acks that failed (and were tried again)
        self.last_failure = ""

    async def register(self) -> None:
        """Register the group (before anything is published: groups get what follows)."""
        self._sub = await self.transport.subscribe(OBSERVER_GROUP, None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        """Record and ack what the group gets. A failed fetch or ack (a broker restarting) is tried
        again, as a worker does: what was not acked comes back and is recognised by its id."""
        assert self._sub is not None
        while True:
            try:
                batch = await self._sub.fetch(256, timeout=0.5)
                for delivery in batch:
                    self._record(delivery.message)
                if batch:
                    await self._sub.ack_many(batch)
            except Exception as exc:
                self.failures += 1
                self.last_failure = repr(exc)[:200]
                await asyncio.sleep(0.5)

    def _record(self, message: Message) -> None:
        self.observed += 1
        if message.id in self.seen:
            return  # a redelivery, or one of our copies: recorded (and maybe copied) already
        self.seen.add(message.id)
        self.types[message.type] += 1
        try:
            envelope = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return
        data = envelope.get("data")
        if message.type == DEADLINE and isinstance(data, dict):
            self.timers[message.id] = float(data.get("due", 0.0))
            self.timer_seen[message.id] = time.time()
        order = order_of(data)
        if order is not None:
            kind = f"{FAILED}:{data.get('type')}" if message.type == FAILED else message.type
            self.ids[order][kind].add(message.id)
            if kind in TERMINAL:
                self.ended_at.setdefault(order, time.time())
            elif kind == PLACED:
                self.placed_at.setdefault(order, time.time())
        if self.duplicate_rate and self.rng.random() < self.duplicate_rate:
            delay = self.rng.uniform(0.0, 1.0)
            task = asyncio.create_task(self._copy(message, delay))
            self._copies.add(task)
            task.add_done_callback(self._copies.discard)

    async def _copy(self, message: Message, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.republish(message)
            self.duplicated += 1
            if message.type == DEADLINE:
                self.timer_copies[message.id] += 1
        except Exception:  # a copy is a fault we inject; failing to inject one is not a finding
            self.duplicate_failures += 1

    def latencies(self) -> dict[str, float]:
        """Seconds from an order's placement to its end, as the observer saw them: p50, p99, max."""
        spans = sorted(self.ended_at[o] - self.placed_at[o] for o in self.ended_at if o in self.placed_at)
        if not spans:
            return {}
        def pick(q: float) -> float:
            return round(spans[min(len(spans) - 1, int(q * len(spans)))], 2)

        return {"p50": pick(0.5), "p99": pick(0.99), "max": round(spans[-1], 2)}

    def timers_not_due(self, now: float) -> int:
        """Timer deliveries (copies included) a group taking timers may still hold, unacknowledged."""
        return sum(1 + self.timer_copies[id_] for id_, due in self.timers.items() if due > now - TIMER_SLACK)

    def timers_due_between(self, start: float, end: float) -> int:
        """Timer deliveries (copies included) due after ``start`` and by ``end``."""
        return sum(1 + self.timer_copies[id_] for id_, due in self.timers.items() if start < due <= end)

    def longest_timer_wait(self) -> float:
        """The longest a timer had to wait for its due time when first seen (seconds; 0 without timers)."""
        return max((due - self.timer_seen[id_] for id_, due in self.timers.items()), default=0.0)

    async def copies_done(self) -> None:
        while self._copies:
            await asyncio.gather(*list(self._copies), return_exceptions=True)

    async def stop(self) -> None:
        await self.copies_done()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.close()
