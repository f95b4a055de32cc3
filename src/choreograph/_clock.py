"""Clocks. The runtime and the in-memory transport read time only through a :class:`Clock`,
so tests can swap in :class:`choreograph.testing.VirtualClock` and fast-forward backoffs.

The runtime waits in three ways. A *timer* (a retry's due time on the bus, a lease) is just
time passing. A *backoff* (:func:`backoff`: a store or broker failed, try again later)
is work the runtime owes: a virtual clock counts it as pending, so ``settled()`` neither
returns while one runs nor waits it out in real time. A *poll* (:func:`poll`: a memory fetch
waiting for the bus) only looks at the bus again: ``settled()`` may jump past it."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from typing import Any, Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for delays and leases)."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (for records shown to people)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()

#: Set by the worker in a handler's task on a test's clock (a VirtualClock): told ``True`` when
#: the task starts waiting for another's work - the SQLite writer's turn, a group commit - and
#: ``False`` when that wait ends, so that the clock does not count the wait as work of its own
#: (see ``VirtualClock.waiting``). ``None`` (the real clock, any other task): nobody to tell.
waits_on_others: contextvars.ContextVar[Callable[[bool], None] | None] = contextvars.ContextVar(
    "choreograph_waits_on_others", default=None)

#: Set by the worker in a handler's task on a test's clock (a VirtualClock): that task. The tasks
#: the handler starts (``asyncio.create_task``, ``gather``, a ``TaskGroup``) inherit it, so that
#: the clock counts their sleeps as the handler's own (see ``VirtualClock.sleep``). ``None``: the
#: real clock, or a task no handler started.
handler_task: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar(
    "choreograph_handler_task", default=None)


#: Set by a worker (and a push ambassador) in its tasks when it runs on a clock other than the real
#: one (a test's VirtualClock): that clock, on which the inbox stores date what they record
#: (:func:`stamp_time`). ``Worker.expire`` compares those dates with the clock's time less the
#: retention; dated in real time, an inbox entry never expired on a clock behind the wall, and all
#: did at a worker's start on one ahead of it (their copies were then handled again).
stamp_clock: contextvars.ContextVar[Clock | None] = contextvars.ContextVar("choreograph_stamp_clock", default=None)


def stamp_time() -> float:
    """Epoch seconds on the clock of the worker this task runs for (:data:`stamp_clock`): when an
    inbox store records an event as processed. The real time outside a worker on another clock."""
    clock = stamp_clock.get()
    return time.time() if clock is None else clock.time()


async def backoff(clock: Clock, seconds: float) -> None:
    """Wait ``seconds`` on ``clock`` before trying again what failed (a store or broker down).

    A clock with a ``backoff`` method of its own (:class:`~choreograph.testing.VirtualClock`)
    is told it is a backoff, not a timer; any other clock just sleeps.
    """
    wait = getattr(clock, "backoff", None)
    if wait is None:
        await clock.sleep(seconds)
    else:
        await wait(seconds)


async def poll(clock: Clock, seconds: float) -> None:
    """Wait ``seconds`` on ``clock`` before looking at the bus again (a fetch waiting for messages).

    A clock with a ``poll`` method of its own (:class:`~choreograph.testing.VirtualClock`) is
    told the wait only re-checks the bus, so ``settled()`` can jump past it to the next due
    retry; any other clock just sleeps.
    """
    wait = getattr(clock, "poll", None)
    if wait is None:
        await clock.sleep(seconds)
    else:
        await wait(seconds)
