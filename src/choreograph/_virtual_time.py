"""Virtual time: a clock that moves only when told, and ``settled()``, which moves it.

Public through :mod:`choreograph.testing`; a module of its own so that the scenario
helper (:mod:`choreograph._scenario`) can build on it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math

from choreograph._clock import handler_task
from choreograph._envelope import rfc3339
from choreograph.transports.memory import MemoryTransport

_Sleeper = tuple[float, int, "asyncio.Future[None]"]
#: 9999-12-31T23:59:59Z: the latest time an event's RFC 3339 ``time`` can carry (see ``rfc3339``).
_LAST = 253_402_300_799.0


class VirtualClock:
    """A clock that moves only when told (``advance``) or when ``settled()`` jumps it.

    The runtime's backoffs (a store or broker failed: try again after a while) wait on it
    through :meth:`backoff`, which ``settled()`` counts as pending work: it jumps the clock
    to the backoff's end instead of returning early or waiting it out in real time.
    """

    def __init__(self, start: float = 1_000_000.0, *, epoch: float = 1_767_225_600.0) -> None:
        """``start``: what :meth:`monotonic` reads at first; ``epoch``: what :meth:`time` reads
        at first (epoch seconds, 2026-01-01 by default), in the years 0001-9999 that an event's
        RFC 3339 ``time`` can carry: one outside raised only at the first event stamped."""
        if not (math.isfinite(start) and math.isfinite(epoch)):
            raise ValueError(f"VirtualClock: start and epoch are finite seconds, got {start!r} and {epoch!r}")
        try:
            rfc3339(epoch)
        except ValueError as exc:
            raise ValueError(f"VirtualClock: epoch: {exc}") from None
        self._now = start
        self._epoch_offset = epoch - start
        self._sleepers: list[_Sleeper] = []
        self._backoffs: list[_Sleeper] = []  # those of the sleepers that are backoffs
        self._timers: list[_Sleeper] = []  # those of the sleepers that are not polls
        self._seq = itertools.count()
        self._handlers: set[asyncio.Task[object]] = set()  # handler tasks running (see handling())
        self._backing_off: dict[asyncio.Task[object], int] = {}  # tasks in a backoff, how many deep
        self._waiting: dict[asyncio.Task[object], int] = {}  # handler tasks waiting on another's work, how many deep
        # tasks a running handler started that slept on the clock meanwhile -> that handler (see sleep())
        self._started_by: dict[asyncio.Task[object], asyncio.Task[object]] = {}
        # the backoffs of such tasks -> that handler: backoffs only while it runs (see backoff_due())
        self._started_sleeps: dict[asyncio.Future[None], asyncio.Task[object]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop it serves (see _own)

    def _own(self) -> None:
        """Serve the running event loop, if any. One loop at a time: a clock whose loop still runs
        (in another thread) is refused on a second one - its futures and tasks are that loop's, and
        waking them from here is not safe. Once that loop stopped (a test's loop, closed after the
        test) the clock moves on to the new one; what still waited on the old one is never woken."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # advance() outside any loop
            return
        if loop is self._loop:
            return
        if self._loop is not None and self._loop.is_running():
            raise RuntimeError(
                "this VirtualClock is in use on another event loop that is running (in another thread): "
                "a VirtualClock serves one event loop at a time; give each its own clock"
            )
        self._loop = loop

    def handling(self, task: asyncio.Task[object], running: bool) -> None:
        """The worker tells the clock that a handler's ``task`` started (``running``) or ended."""
        self._own()
        if running:
            self._handlers.add(task)
        else:
            self._handlers.discard(task)

    def waiting(self, task: asyncio.Task[object], waiting: bool) -> None:
        """The worker tells the clock that a handler's ``task`` waits for another's work (its
        database connection: the SQLite writer another handler holds), or no longer does. Such a
        task is no work of its own: if whatever it waits for waits on the clock, the clock may jump."""
        if waiting:
            self._waiting[task] = self._waiting.get(task, 0) + 1
        elif self._waiting.get(task, 0) > 1:
            self._waiting[task] -= 1
        else:
            self._waiting.pop(task, None)

    def busy(self) -> bool:
        """Whether a handler runs that does not wait in a backoff (a fault's hang) on this clock,
        nor for another's work (:meth:`waiting`): real work under way, which a jump of the clock
        would make look as if it took that long.

        The tasks a handler started count as its own (see :meth:`sleep`): a handler is busy while
        one of those that slept on the clock runs again, and not while one of them sleeps on the
        clock and the others and the handler itself wait (the handler waits on them, in a
        ``gather`` or a ``TaskGroup``: which of its tasks it awaits is not known to the clock)."""
        # one that ended unannounced, or was left on a closed loop (it never ends)
        self._handlers = {task for task in self._handlers if not task.done() and not task.get_loop().is_closed()}
        self._started_by = {task: handler for task, handler in self._started_by.items()
                            if handler in self._handlers and not task.done()}
        self._waiting = {task: deep for task, deep in self._waiting.items()
                         if task in self._handlers or task in self._started_by}

        def waits(task: asyncio.Task[object]) -> bool:
            return task in self._backing_off or task in self._waiting

        started = {handler: [task for task, by in self._started_by.items() if by is handler]
                   for handler in self._handlers}
        return any(
            not all(map(waits, started[handler]))
            or not (waits(handler) or any(task in self._backing_off for task in started[handler]))
            for handler in self._handlers
        )

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._epoch_offset

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of virtual time. A handler's own sleep (``ctx.clock.sleep`` in a
        handler task, see :meth:`handling`) waits on the clock as a backoff does: pending work
        that ``settled()`` jumps the clock over, not real work that holds the clock still. So
        does the sleep of a task the handler started while it runs (``asyncio.create_task``,
        ``gather``, a ``TaskGroup`` in the handler; the worker marks its tasks, which the tasks
        they start inherit): the handler waiting on such a task was work that held the clock
        still, and ``settled()`` timed out. Once the handler ended, what it left running sleeps
        as any other task does (a timer)."""
        task = asyncio.current_task()
        if task is not None and task not in self._handlers:
            handler = handler_task.get()
            if handler is None or handler not in self._handlers or handler.done():
                await self._wait(seconds, backoff=False)
                return
            self._started_by[task] = handler
            await self._wait(seconds, backoff=True, of=handler)
            return
        await self._wait(seconds, backoff=task is not None)

    async def backoff(self, seconds: float) -> None:
        """Sleep ``seconds`` as a backoff: pending work for ``settled()`` until it ends."""
        await self._wait(seconds, backoff=True)

    async def poll(self, seconds: float) -> None:
        """Sleep ``seconds`` as a fetch waiting for the bus: ``settled()`` may jump past it."""
        await self._wait(seconds, backoff=False, poll=True)

    def timer(self, seconds: float) -> asyncio.Future[None] | None:
        """A sleeper of ``seconds`` registered now, not at the first step of a task that would
        ``sleep()``: the future it sets when the clock passes that time (``None`` if that is now).
        Cancel it to drop it. The runtime arms a handler's timeout with it: armed in a task of
        its own, the timeout was not yet on the clock when ``settled()`` looked, and a jump to a
        later timer cut the handler that much late."""
        if seconds != seconds:
            raise ValueError("seconds: NaN is not a duration")
        self._own()
        due = self._now + seconds
        if due > self._last():  # never (see _wait)
            return asyncio.get_running_loop().create_future()
        return None if due <= self._now else self._register(due, poll=False)[2]

    def _last(self) -> float:
        """The latest :meth:`monotonic` time the clock may reach: its :meth:`time` at 9999-12-31."""
        return _LAST - self._epoch_offset

    def check_move(self, seconds: float, name: str = "seconds") -> None:
        """``ValueError`` unless the clock may move ``seconds`` on (see :meth:`advance`)."""
        if not seconds >= 0:  # NaN too: the clock would read NaN from then on
            raise ValueError(f"{name}: time does not go backwards, got {seconds!r}")
        if self._now + seconds > self._last():  # math.inf too
            raise ValueError(
                f"{name}: {seconds!r} s would take the clock past 9999-12-31T23:59:59Z, the last time an "
                "event's RFC 3339 time can carry"
            )

    def _register(self, due: float, *, poll: bool) -> _Sleeper:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sleeper = (due, next(self._seq), future)
        heapq.heappush(self._sleepers, sleeper)
        if not poll:
            heapq.heappush(self._timers, sleeper)
        return sleeper

    async def _wait(
        self, seconds: float, *, backoff: bool, poll: bool = False, of: asyncio.Task[object] | None = None
    ) -> None:
        if seconds != seconds:  # NaN: at the top of the heap it would hold back every other sleeper
            raise ValueError("seconds: NaN is not a duration")
        self._own()
        due = self._now + seconds
        if due <= self._now:  # not > 0, or too short to move the clock (1e-12 s at a million seconds)
            await asyncio.sleep(0)  # due now: such a sleeper was left for the next advance(), and
            return  # settled(), which jumps only to times ahead of the clock, never woke it
        if due > self._last():
            # Never (``math.inf``: sleep for ever), as the clock never gets there (see advance): on
            # the heap it was a time settled() jumped to, and the clock read inf, or lost the
            # precision a lease needs (at 1e300 s, now + lease == now: a lease ran out as it began).
            sleeper = None
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        else:
            sleeper = self._register(due, poll=poll)
            future = sleeper[2]
        if not backoff:
            await future
            return
        if sleeper is not None:
            heapq.heappush(self._backoffs, sleeper)
            if of is not None:  # a task the handler ``of`` started: its backoff while ``of`` runs
                self._started_sleeps[future] = of
        task = asyncio.current_task()
        assert task is not None
        self._backing_off[task] = self._backing_off.get(task, 0) + 1
        try:
            await future
        finally:
            self._started_sleeps.pop(future, None)
            if self._backing_off[task] == 1:
                del self._backing_off[task]
            else:
                self._backing_off[task] -= 1

    def next_due(self) -> float | None:
        """When the earliest sleeper (timer or backoff) wakes; ``None`` if nobody sleeps."""
        return _earliest(self._sleepers)

    def backoff_due(self) -> float | None:
        """When the earliest backoff still running ends; ``None`` if none runs.

        The sleep of a task a handler started is one only while that handler runs: once it
        ended, that sleep is a timer (see :meth:`sleep`). Begun before the end it stayed a
        backoff, and ``settled()`` jumped the clock to its end (an hour on, for a task left to
        do something an hour later)."""
        backoffs = self._backoffs
        while (due := _earliest(backoffs)) is not None:
            of = self._started_sleeps.get(backoffs[0][2])
            if of is None or (of in self._handlers and not of.done()):
                return due
            heapq.heappop(backoffs)  # still on the timers' heap: a timer from now on
        return None

    def timer_due(self) -> float | None:
        """When the earliest sleeper that is not a fetch's poll of the bus wakes; ``None`` if none sleeps."""
        return _earliest(self._timers)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper now due. Not past the year 9999 (``ValueError``):
        moved to ``math.inf``, or far enough to lose the precision of a lease (at 1e300 s a lease of
        30 s ended as it began), the runtime spun on deliveries whose leases were over at once."""
        self.check_move(seconds)
        self._own()
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done() and not future.get_loop().is_closed():  # a closed loop's: nobody to wake
                future.set_result(None)


def _earliest(sleepers: list[_Sleeper]) -> float | None:
    while sleepers and (sleepers[0][2].done() or sleepers[0][2].get_loop().is_closed()):
        heapq.heappop(sleepers)  # woken, its task cancelled, or left on a closed loop (never woken)
    return sleepers[0][0] if sleepers else None


async def _quiesce(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def settled(bus: MemoryTransport, *, timeout: float = 10.0, max_jump: float | None = None) -> None:
    """Return once nothing is ready or in flight on ``bus``, no retry is pending and no
    backoff of the runtime runs.

    With a :class:`VirtualClock`, pending retries, lease expiries and the runtime's own
    backoffs are fast-forwarded: a worker whose inbox store or broker failed waits on the
    clock before it tries again, and ``settled()`` jumps the clock to the end of that wait
    (also while the worker holds deliveries in flight), so a test of an outage takes no real
    time and the clock shows how long the system backed off. With the real clock this waits
    for them. Raises ``TimeoutError`` (real seconds) if the system does not settle, e.g. a
    group with a backlog but no consumer, or a store that never comes back.

    >>> clock = VirtualClock()
    >>> bus = MemoryTransport(clock=clock)
    >>> async with Worker([payments], bus, store=down_twice) as worker:       # doctest: +SKIP
    ...     await Publisher(bus).publish(OrderPlaced(order_id="o-1", amount=30))
    ...     await settled(bus)                      # the backoffs passed in virtual time
    """
    if not timeout >= 0:  # NaN: never past it, so a system that never settles hung the test
        raise ValueError(f"timeout: real seconds, not negative, got {timeout!r}")
    if max_jump is not None and not max_jump > 0:  # NaN: ignored; 0: jumps of nothing until the timeout
        raise ValueError(f"max_jump: virtual seconds, more than 0, got {max_jump!r}")
    clock = bus.clock
    virtual = clock if isinstance(clock, VirtualClock) else None
    if virtual is not None:
        virtual._own()  # a clock another running loop uses: say so, rather than time out
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        await _quiesce()
        count, due = bus.pending()
        backoff = virtual.backoff_due() if virtual is not None else None
        if count == 0 and due is None and backoff is None:
            await _quiesce()
            count, due = bus.pending()
            backoff = virtual.backoff_due() if virtual is not None else None
            if count == 0 and due is None and backoff is None:
                return
        if loop.time() > give_up:
            raise TimeoutError(
                f"not settled after {timeout}s: {count} ready or in flight, next due at {due}"
                + ("" if backoff is None else f", a backoff of the runtime runs until {backoff}")
            )
        if virtual is not None and (count == 0 or backoff is not None) and not virtual.busy():
            # Jump to the earliest time still in the future. A retry already due may not be
            # picked up until a consumer's timer fires: that timer is then the target (a
            # timer registered just after a jump would otherwise leave nothing to jump to).
            # Events in flight stop the clock (their handlers may still be running) unless a
            # backoff runs: a worker that holds them while its store is down waits on it, as does
            # a handler in a fault's hang - but not while another handler still runs (busy()):
            # its real work would look as if it took the jump, and could time out on it. Nor with
            # nothing in flight here while a handler works for another bus on this clock (two
            # workers, one clock): a retry due here 30 s on made its 0.3 s of work take 30 s.
            # A retry or lease due later is the target itself: the fetches' polls of the bus on
            # the way (every poll_interval) only look at it again, and the jump wakes them all
            # (stepping from poll to poll, a retry a day away took hundreds of thousands of jumps).
            now = virtual.monotonic()
            wakes = (virtual.next_due(),) if due is not None and due <= now else (due, virtual.timer_due())
            future = [t for t in wakes if t is not None and t > now]
            if not future:
                await asyncio.sleep(0.001)
                continue
            jump = min(future) - now
            if max_jump is not None:
                jump = min(jump, max_jump)
            virtual.advance(jump)
        else:
            await asyncio.sleep(0.001)
