"""Virtual time: a clock that moves only when told, and ``settled()``, which moves it.

Public through :mod:`choreograph.testing`; a module of its own so that the scenario
helper (:mod:`choreograph._scenario`) can build on it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from choreograph.transports.memory import MemoryTransport


class VirtualClock:
    """A clock that moves only when told (``advance``) or when ``settled()`` jumps it."""

    def __init__(self, start: float = 1_000_000.0, *, epoch: float = 1_767_225_600.0) -> None:
        self._now = start
        self._epoch_offset = epoch - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._epoch_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    def next_due(self) -> float | None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper now due."""
        if seconds < 0:
            raise ValueError("seconds: time does not go backwards")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


async def _quiesce(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def settled(bus: MemoryTransport, *, timeout: float = 10.0, max_jump: float | None = None) -> None:
    """Return once nothing is ready or in flight on ``bus`` and no retry is pending.

    With a :class:`VirtualClock`, pending retries and lease expiries are fast-forwarded;
    with the real clock this waits for them. Raises ``TimeoutError`` (real seconds)
    if the system does not settle, e.g. a group with a backlog but no consumer.
    """
    clock = bus.clock
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        await _quiesce()
        count, due = bus.pending()
        if count == 0 and due is None:
            await _quiesce()
            count, due = bus.pending()
            if count == 0 and due is None:
                return
        if loop.time() > give_up:
            raise TimeoutError(f"not settled after {timeout}s: {count} ready or in flight, next due at {due}")
        if isinstance(clock, VirtualClock) and count == 0:
            # Jump to the earliest time still in the future. A retry already due may not be
            # picked up until a consumer's timer fires: that timer is then the target (a
            # timer registered just after a jump would otherwise leave nothing to jump to).
            now = clock.monotonic()
            future = [t for t in (due, clock.next_due()) if t is not None and t > now]
            if not future:
                await asyncio.sleep(0.001)
                continue
            jump = min(future) - now
            if max_jump is not None:
                jump = min(jump, max_jump)
            clock.advance(jump)
        else:
            await asyncio.sleep(0.001)
