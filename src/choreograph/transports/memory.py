"""The in-process transport: the whole contract, no broker, no disk.

It is how choreograph's own tests and its users' tests run a system in one process:
fan-out, competing consumers, attempts, delayed retries, leases and dead letters all
behave as on a real broker, on whatever :class:`~choreograph._clock.Clock` it is given
(a :class:`~choreograph.testing.VirtualClock` makes backoffs and lease expiry instant).

Two ``MemoryTransport`` objects opened on the same ``memory://name`` URL in one process
share one bus, so "reopen" works as it does for durable brokers, unless the second is given
a clock of its own: a bus keeps the clock it was made with, so a transport given another
clock gets a new bus (a bus lives until nothing refers to it, and the garbage collector
may not have freed an earlier test's yet), or a :class:`ConfigurationError` while the old
one still has consumers. Order within a group is publish order, except for retried and
redelivered messages.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from choreograph._clock import SYSTEM_CLOCK, Clock, poll
from choreograph.errors import ConfigurationError, TransportClosed
from choreograph.transports import did_you_mean, lease_from_url, refuse_repeated, refuse_unreadable
from choreograph.transports.base import (
    DeadLetter,
    Delivery,
    Message,
    Subscription,
    Transport,
    bad_batch,
    closed_delivery,
    matches,
    narrowed,
    no_such_group,
    widened,
)

_BUSES: weakref.WeakValueDictionary[str, _Bus] = weakref.WeakValueDictionary()


class _Entry:
    __slots__ = ("message", "attempt", "token")

    def __init__(self, message: Message, attempt: int) -> None:
        self.message = message
        self.attempt = attempt
        self.token = 0  # changes whenever the entry is (re)delivered; stale settles are ignored


class _Group:
    def __init__(self, name: str, types: frozenset[str] | None) -> None:
        self.name = name
        self.types = types
        self.ready: deque[_Entry] = deque()
        self.delayed: list[tuple[float, int, _Entry]] = []  # (due, seq, entry)
        self.inflight: dict[int, tuple[float, _Entry]] = {}  # token -> (lease deadline, entry)
        # No lease in ``inflight`` ends before this (it may have ended already: a lower bound).
        self.leases_from = math.inf
        # id -> (the bus's count when it died, letter): oldest first also among letters of one
        # instant, as a virtual clock's are (by dead_at alone they came by group)
        self.dead: dict[str, tuple[int, DeadLetter]] = {}
        self.consumers = 0
        self.wakeup = asyncio.Event()
        # The subscriptions with a fetch waiting for messages. Of those, the one served least
        # recently takes first, as a broker spreads messages over its consumers. Else the one
        # whose fetch happened to run first took every message each time: a replica that
        # hands an event back (a type it does not handle) got it again, and again.
        self.waiting: list[MemorySubscription] = []
        self.served = itertools.count(1)


class _Bus:
    """Shared state of one named in-memory bus."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.groups: dict[str, _Group] = {}
        self.routes: dict[str, list[_Group]] = {}  # event type -> the groups that receive it; reset when a binding changes
        self.tokens = itertools.count(1)
        self.seq = itertools.count()

    def wake(self, group: _Group) -> None:
        group.wakeup.set()

    def promote(self, group: _Group, lease: float) -> float | None:
        """Move due retries and expired leases to ready; return when the next one is due."""
        now = self.clock.monotonic()
        while group.delayed and group.delayed[0][0] <= now:
            group.ready.append(heapq.heappop(group.delayed)[2])
        leases_from = group.leases_from
        if leases_from <= now:  # a lease may have run out: look (else none has, and no scan)
            expired = [token for token, (deadline, _) in group.inflight.items() if deadline <= now]
            for token in expired:
                _, entry = group.inflight.pop(token)
                entry.attempt += 1
                group.ready.append(entry)
            leases_from = group.leases_from = min((d for d, _ in group.inflight.values()), default=math.inf)
        due = group.delayed[0][0] if group.delayed else math.inf
        due = min(due, leases_from)  # at worst early (a lease settled since): the caller looks again
        return None if due == math.inf else due

    def pending(self, *, active_only: bool = True) -> tuple[int, float | None]:
        """(messages ready or in flight, earliest due delayed/lease time) over groups with consumers."""
        count = 0
        due: float | None = None
        for group in self.groups.values():
            if active_only and group.consumers == 0:
                continue
            count += len(group.ready) + len(group.inflight)
            times = [group.delayed[0][0]] if group.delayed else []
            times.extend(deadline for deadline, _ in group.inflight.values())
            if times:
                due = min(times) if due is None else min(due, *times)
        return count, due


class MemoryDelivery(Delivery):
    __slots__ = ("_bus", "_group", "_entry", "_token", "_lease", "_sub")

    def __init__(self, bus: _Bus, group: _Group, entry: _Entry, lease: float, sub: MemorySubscription) -> None:
        # Delivery.__init__ written out: one of these is made per message handed out
        self.message = entry.message
        self.attempt = entry.attempt
        self.group = group.name
        self.settled = False
        self._bus = bus
        self._group = group
        self._entry = entry
        self._token = entry.token
        self._lease = lease
        self._sub = sub

    def _check_open(self) -> None:
        """A verb after its subscription closed: refused, as on every transport (see base.Delivery)."""
        sub = self._sub
        if sub._closed or sub._transport.closed:
            raise closed_delivery(self, "memory transport")

    def _take(self) -> _Entry | None:
        held = self._group.inflight.pop(self._token, None)
        return held[1] if held is not None else None

    async def _ack(self) -> None:
        self._check_open()
        self._take()

    async def _retry(self, after: float) -> None:
        await self._again(after, 1)

    async def _defer(self, after: float) -> None:
        await self._again(after, 0)

    async def _again(self, after: float, counted: int) -> None:
        self._check_open()
        entry = self._take()
        if entry is None:
            return  # lease expired meanwhile: already redelivered
        entry.attempt += counted
        group = self._group
        if after <= 0:
            group.ready.append(entry)
        else:
            heapq.heappush(group.delayed, (self._bus.clock.monotonic() + after, next(self._bus.seq), entry))
        self._bus.wake(group)

    async def _dead_letter(self, record: Mapping[str, Any]) -> None:
        self._check_open()
        entry = self._take()
        if entry is None:
            return
        self._group.dead[entry.message.id] = next(self._bus.seq), DeadLetter(
            self.group, entry.message, dict(record), self._bus.clock.time()
        )

    async def touch(self) -> None:
        if self.settled:
            return
        self._check_open()
        held = self._group.inflight.get(self._token)
        if held is not None:
            self._group.inflight[self._token] = (self._bus.clock.monotonic() + self._lease, held[1])
            # a later deadline: leases_from stays a lower bound


async def _sleep_until(clock: Clock, until: float) -> None:
    """Sleep until ``until`` on ``clock``: the time left is read when this task starts (a loop turn
    after it is created), not before - a VirtualClock may have jumped in between."""
    await poll(clock, until - clock.monotonic())


class MemorySubscription(Subscription):
    def __init__(self, transport: MemoryTransport, group: _Group) -> None:
        self.group = group.name
        self._transport = transport
        self._group = group
        self._closed = False
        self._served = 0  # when it last took messages (group.served): 0, never
        group.consumers += 1

    async def fetch(self, max_messages: int, timeout: float | None = None) -> list[Delivery]:
        if max_messages < 1:
            raise bad_batch(max_messages)
        bus, group, lease = self._transport.bus, self._group, self._transport.lease
        clock = bus.clock
        deadline = None if timeout is None else clock.monotonic() + timeout
        waiting = group.waiting
        try:
            return await self._fetch(bus, group, lease, clock, max_messages, deadline)
        finally:
            if waiting and self in waiting:
                waiting.remove(self)
                if waiting and group.ready:
                    bus.wake(group)  # what is left is another one's

    def _my_turn(self, waiting: list[MemorySubscription]) -> bool:
        served = self._served
        return not waiting or all(other._served >= served for other in waiting)

    async def _fetch(self, bus: _Bus, group: _Group, lease: float, clock: Clock, max_messages: int,
                     deadline: float | None) -> list[Delivery]:
        waiting = group.waiting
        while True:
            if self._closed or self._transport.closed:
                raise TransportClosed("memory transport: subscription is closed")
            next_due = bus.promote(group, lease)
            if group.ready and self._my_turn(waiting):
                self._served = next(group.served)
                out: list[Delivery] = []
                now = clock.monotonic()
                while group.ready and len(out) < max_messages:
                    entry = group.ready.popleft()
                    entry.token = next(bus.tokens)
                    group.inflight[entry.token] = (now + lease, entry)
                    out.append(MemoryDelivery(bus, group, entry, lease, self))
                if now + lease < group.leases_from:
                    group.leases_from = now + lease
                return out
            now = clock.monotonic()
            if deadline is not None and now >= deadline:
                return []
            wait_until = (
                min(t for t in (next_due, deadline) if t is not None) if (next_due or deadline) else None
            )
            if self not in waiting:
                waiting.append(self)
            if not group.ready:
                group.wakeup.clear()  # else it is set for the fetch whose turn it is
            waiter = asyncio.ensure_future(group.wakeup.wait())
            sleeper = asyncio.ensure_future(_sleep_until(clock, wait_until)) if wait_until is not None else None
            try:
                await asyncio.wait(
                    [f for f in (waiter, sleeper) if f is not None], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
                if sleeper is not None:
                    sleeper.cancel()

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        # Delivery.ack for each, without a coroutine per delivery: an in-memory ack fails only once closed.
        for delivery in deliveries:
            if not delivery.settled:
                assert isinstance(delivery, MemoryDelivery)
                delivery._check_open()
                delivery.settled = True
                delivery._take()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._group.consumers -= 1
            self._group.wakeup.set()


class MemoryTransport(Transport):
    """In-process transport. ``MemoryTransport("memory://orders?lease=5", clock=VirtualClock())``."""

    def __init__(self, url: str = "memory://", *, clock: Clock | None = None) -> None:
        self.url = url
        refuse_unreadable(url)
        refuse_repeated(url)
        self.lease = lease_from_url(url)
        unknown = set(parse_qs(urlsplit(url).query, keep_blank_values=True)) - {"lease"}
        if unknown:  # ?leese=5 ran on the default lease without a word
            raise ConfigurationError(
                f"broker URL {url!r}: unknown parameter(s) "
                f"{', '.join(did_you_mean(name, ['lease']) for name in sorted(unknown))}; memory:// takes lease"
            )
        name = urlsplit(url).netloc or urlsplit(url).path.strip("/")
        bus = _BUSES.get(name) if name else None
        if bus is not None and clock is not None and clock is not bus.clock:
            if any(group.consumers for group in bus.groups.values()):
                raise ConfigurationError(
                    f"memory://{name}: this bus is in use on another clock; open it with the same clock "
                    "(or none), or give this one a name of its own"
                )
            bus = None  # another timeline: a bus of its own, not one an earlier test left behind
        if bus is None:
            bus = _Bus(clock or SYSTEM_CLOCK)
            if name:
                _BUSES[name] = bus
        self.bus = bus
        self.closed = False
        self._subscriptions: list[MemorySubscription] = []

    @property
    def clock(self) -> Clock:
        return self.bus.clock

    def _check(self) -> None:
        if self.closed:
            raise TransportClosed("memory transport is closed")

    async def close(self) -> None:
        self.closed = True
        for sub in self._subscriptions:
            await sub.close()

    async def publish(self, messages: Sequence[Message]) -> None:
        self._check()
        bus = self.bus
        routes = bus.routes
        for message in messages:
            groups = routes.get(message.type)
            if groups is None:
                groups = routes[message.type] = [g for g in bus.groups.values() if matches(g.types, message.type)]
            for group in groups:
                group.ready.append(_Entry(message, 1))
                group.wakeup.set()

    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        self._check()
        wanted = None if types is None else frozenset(types)
        state = self.bus.groups.get(group)
        if state is None:
            state = self.bus.groups[group] = _Group(group, wanted)
            self.bus.routes.clear()
        elif (bound := widened(state.types, wanted)) != state.types:  # widen, never narrow
            state.types = bound
            self.bus.routes.clear()
        sub = MemorySubscription(self, state)
        self._subscriptions.append(sub)
        return sub

    async def unbind(self, group: str, types: Collection[str]) -> frozenset[str] | None:
        self._check()
        state = self.bus.groups.get(group)
        if state is None:
            raise no_such_group(group)
        bound = narrowed(group, state.types, types)
        if bound != state.types:
            state.types = bound  # what the group holds stays: only routing changes
            self.bus.routes.clear()
        return bound

    def pending(self) -> tuple[int, float | None]:
        """(messages ready or in flight in groups with consumers, next due retry/lease time)."""
        return self.bus.pending()

    async def ping(self) -> None:
        if self.closed:
            raise TransportClosed("memory transport is closed")

    async def groups(self) -> dict[str, frozenset[str] | None]:
        return {name: state.types for name, state in self.bus.groups.items()}

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:  # a negative slice dropped the newest
            return []
        letters = [
            (letter.dead_at, seq, letter)
            for name, state in self.bus.groups.items()
            if group is None or name == group
            for seq, letter in state.dead.values()
        ]
        letters.sort(key=lambda item: item[:2])
        return [letter for _, _, letter in letters[:limit]]

    async def replay(self, group: str, message_ids: Collection[str] | None = None) -> int:
        state = self.bus.groups.get(group)
        if state is None:
            return 0
        ids = _chosen(state.dead, message_ids)
        for message_id in ids:
            state.ready.append(_Entry(state.dead.pop(message_id)[1].message, 1))
        if ids:
            state.wakeup.set()
        return len(ids)

    async def purge(self, group: str, message_ids: Collection[str] | None = None) -> int:
        state = self.bus.groups.get(group)
        if state is None:
            return 0
        ids = _chosen(state.dead, message_ids)
        for message_id in ids:
            del state.dead[message_id]
        return len(ids)


def _chosen(dead: dict[str, tuple[int, DeadLetter]], message_ids: Collection[str] | None) -> list[str]:
    """The ids of ``dead`` among ``message_ids`` (``None``: all), each once, oldest letter first.

    Each once: an id given twice was popped twice (``KeyError``). Oldest first, as every
    transport replays: not in the order the caller happened to list them."""
    wanted = None if message_ids is None else set(message_ids)
    letters = sorted(dead.values(), key=lambda item: (item[1].dead_at, item[0]))
    return [letter.message.id for _, letter in letters if wanted is None or letter.message.id in wanted]
