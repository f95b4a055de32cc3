"""Leases and timeouts: :class:`Timing`, a mixin of the worker's runner (``_runner``).

What a runner holds is kept: the touch loop extends the leases of the deliveries it handles
(and of those handled but not yet settled), and a handler runs under its timeout - a
watchdog that cancels the handlers past their deadline on the real clock, and on a test's
clock (a VirtualClock) a timer per handler on that clock, whose waits for its database
connection do not count (:meth:`Timing._waiting`). The state is the runner's (its slots).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from choreograph._clock import handler_task
from choreograph.runtime._outcomes import _Call
from choreograph.transports.base import Delivery

if TYPE_CHECKING:
    from choreograph.runtime.worker import Worker

log = logging.getLogger("choreograph.worker")  # the worker's: one logger for the user to tune


class HandlerTimeout(Exception):
    """A handler ran longer than its timeout; counted as a failed (transient) attempt."""


HandlerTimeout.__module__ = "choreograph.runtime.worker"  # public there: tracebacks and records name it so


class Timing:
    """The leases and the handlers' timeouts of one service (a mixin of the runner, whose
    state it shares; see the module's docstring)."""

    if not TYPE_CHECKING:  # the runner's slots hold the state (mypy would check assignments against ())
        __slots__ = ()

    worker: Worker
    group: str
    loop: asyncio.AbstractEventLoop
    stopping: bool
    virtual_clock: bool
    active: dict[asyncio.Task[None], Delivery]
    active_ids: dict[str, Delivery]
    touch_wake: asyncio.Event
    deadlines: dict[Delivery, float]
    timed_out: set[Delivery]
    waiting: set[Delivery]
    clock_due: dict[Delivery, float]
    clock_timers: dict[Delivery, asyncio.Task[None]]
    wait_from: dict[Delivery, float]

    async def _touch_loop(self) -> None:
        """Extend the leases of what this worker holds, every third of a lease: the deliveries
        whose handlers run, and those handled but not settled for a whole tick already - their
        outputs, inbox mark or ack wait for a broker or store that refuses them for now (a
        Redis ``maxlen`` backlog, a store that cannot write). Without that touch the lease ran
        out and another replica ran the handler again. What settles within a tick, nearly
        everything, is not touched.

        On a test's clock (a VirtualClock) the ticks are on that clock, where leases run out:
        ``settled()`` jumping it past a lease while a handler hangs in virtual time (a fault's
        hang) expired the lease of a delivery still being handled, and it was handled again.
        With nothing in hand the loop waits for the fetch loop instead of ticking, so that its
        ticks are not stops for every jump of the clock to a retry due far away."""
        interval = max(0.05, self.worker.transport.lease / 3)
        clock = self.worker.clock
        before: dict[str, Delivery] = {}
        while True:  # through a stop's drain too: stop() cancels it once what is in hand settled
            if self.virtual_clock:
                if not self.active_ids:
                    self.touch_wake.clear()
                    await self.touch_wake.wait()
                await clock.sleep(interval)
            else:
                await asyncio.sleep(interval)
            running = list(self.active.values())
            ids = {id(d) for d in running}
            held = dict(self.active_ids)
            waiting = [d for message_id, d in held.items() if before.get(message_id) is d and id(d) not in ids]
            before = held
            await self._touch(running + waiting)

    async def _drain_on_clock(self, drained_by: float) -> float:
        """On a test's clock (a VirtualClock): wait for the handlers still running while one of
        them works (``busy()``), up to ``drained_by``; the drain's end, now if what is left only
        waits on the clock. Nothing moves the clock while the worker stops, so a handler in a hang
        or a ``ctx.clock.sleep`` would never end: the drain waited ``drain_timeout`` in real time
        for it (a Scenario left with such a handler took 10 s to exit)."""
        busy = getattr(self.worker.clock, "busy", None)
        if busy is None:
            return drained_by
        loop = asyncio.get_running_loop()
        while self.active and loop.time() < drained_by:
            if not busy():
                return loop.time()
            await asyncio.wait(list(self.active), timeout=0.001)
        return drained_by

    async def _touch(self, deliveries: list[Delivery]) -> None:
        """Touch ``deliveries``, 64 at a time concurrently (a backlog of a thousand in hand
        during an outage was a thousand round trips one after the other), and log the
        failures once per tick, not once per delivery."""
        failed, first = 0, None
        for start in range(0, len(deliveries), 64):
            chunk = deliveries[start:start + 64]
            for delivery, result in zip(chunk, await asyncio.gather(*(d.touch() for d in chunk),
                                                                    return_exceptions=True), strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result  # a cancellation: the worker is stopping
                    failed += 1
                    first = first or f"{delivery!r}: {result}"
        if failed:
            log.warning("could not extend the leases of %d of %d deliveries of %s (%s); they return "
                        "after their lease if it runs out", failed, len(deliveries), self.group, first)

    async def _watchdog_loop(self, tick: float) -> None:
        """Cancel handlers past their timeout (checked every ``tick`` seconds).

        Cheaper than ``asyncio.timeout`` around every handler call, which schedules and
        cancels a timer per delivery; the price is up to ``tick`` of lateness.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for task, delivery in list(self.active.items()):
                deadline = self.deadlines.get(delivery)
                if (deadline is not None and deadline <= now and delivery not in self.timed_out
                        and delivery not in self.waiting):
                    self.timed_out.add(delivery)
                    task.cancel()

    def _busy(self, running: bool) -> None:
        """Tell a VirtualClock that the current task works (or no longer does): see its ``busy()``."""
        handling = getattr(self.worker.clock, "handling", None)
        task = asyncio.current_task()
        if handling is not None and task is not None:
            handling(task, running)

    def _arm_clock_timeout(self, task: asyncio.Task[Any], delivery: Delivery) -> None:
        """Start :meth:`_clock_timeout` for ``task``, its first wait already on the clock: in a
        task's first step it came a loop turn late, and ``settled()`` looking meanwhile (the
        handler already waiting on the clock) jumped to a later timer - the timeout of 2 s cut
        a handler at the lease touch 10 s on."""
        clock = self.worker.clock
        timer = getattr(clock, "timer", None)
        first = None
        if timer is not None:
            now = clock.monotonic()
            first = timer(self.clock_due.get(delivery, now) - now)
        # not a task the handler started: its sleep on the clock is no wait of the handler's
        context = contextvars.copy_context()
        context.run(handler_task.set, None)
        armed = self.loop.create_task(self._clock_timeout(task, delivery, first), context=context)
        if first is not None:
            armed.add_done_callback(lambda _: first.cancel())  # cancelled before its first step too
        self.clock_timers[delivery] = armed

    async def _clock_timeout(
        self, task: asyncio.Task[Any], delivery: Delivery, first: asyncio.Future[None] | None = None
    ) -> None:
        """Cancel ``task``, the handler of ``delivery``, once its timeout passed on the worker's clock
        (not the real one: see :meth:`_guarded`), unless the watchdog did. Due at ``clock_due``,
        which a wait for its database connection pushes on (:meth:`_waiting`); one that falls due
        during such a wait ends here, and the end of the wait arms a new one for the time left."""
        clock = self.worker.clock
        if first is not None:
            await first
        while True:
            now = clock.monotonic()
            due = self.clock_due.get(delivery, now)
            if now + (due - now) <= now:  # due (or too close to move the clock: as good as due)
                break
            await clock.sleep(due - now)
        if delivery in self.deadlines and delivery not in self.timed_out and delivery not in self.waiting:
            self.timed_out.add(delivery)
            task.cancel()

    def _waiting(self, delivery: Delivery, waited: float | None) -> None:
        """A handler waits for its database connection (``None``) or got it after ``waited``
        seconds: that time does not count against its timeout - a handler holding the SQLite
        writer too long must not time out the ones queued behind it.

        On a test's clock the wait is kept out of the timeout on that clock too, and the clock is
        told the handler waits on another's work (``VirtualClock.waiting``): not work of its own
        that holds the clock still - else a handler hanging on the clock in its transaction, with
        one queued behind it for the writer, was cut by the real-time watchdog, not at its timeout
        on the clock."""
        clock = self.worker.clock
        if waited is None:
            self.waiting.add(delivery)
            if self.virtual_clock:
                self.wait_from[delivery] = clock.monotonic()
                self._clock_waits(True)
            return
        self.waiting.discard(delivery)
        if delivery in self.deadlines:
            self.deadlines[delivery] += waited
        if self.virtual_clock:
            self._clock_waits(False)
            since = self.wait_from.pop(delivery, None)
            if since is not None and delivery in self.clock_due:
                self.clock_due[delivery] += clock.monotonic() - since
                timer = self.clock_timers.get(delivery)
                task = asyncio.current_task()
                if timer is not None and timer.done() and task is not None:  # it fell due during the wait
                    self._arm_clock_timeout(task, delivery)

    def _clock_waits(self, waiting: bool) -> None:
        """Tell a VirtualClock the current task waits on another's work (or no longer does)."""
        tell = getattr(self.worker.clock, "waiting", None)
        task = asyncio.current_task()
        if tell is not None and task is not None:
            tell(task, waiting)

    async def _guarded(self, call: _Call, handler: Awaitable[Any]) -> Any:
        """Await the rest of a handler under its timeout (the watchdog cancels it, we say why)."""
        delivery = call.delivery
        self.deadlines[delivery] = call.started + call.handler.timeout
        late = False
        # On a clock of a test's own (a VirtualClock) the timeout runs on that clock too: a
        # handler waiting on it (a fault's hang, ``ctx.clock.sleep``) times out when the clock
        # passes its timeout, at once in real time. The watchdog still measures real time, so a
        # handler stuck on something else times out as it would in production.
        if self.virtual_clock:
            task = asyncio.current_task()
            assert task is not None
            # a rerun in place (_rerun) has what is left of the attempt's timeout on the clock too
            since = self.worker.clock.monotonic() if call.clock_started is None else call.clock_started
            self.clock_due[delivery] = since + call.handler.timeout
            self._arm_clock_timeout(task, delivery)
            handler_task.set(task)  # inherited by the tasks it starts: see VirtualClock.sleep
        try:
            result = await handler
        except asyncio.CancelledError:
            if delivery in self.timed_out:  # the watchdog, not a shutdown
                raise HandlerTimeout(f"handler exceeded its timeout of {call.handler.timeout}s") from None
            raise
        finally:
            if self.virtual_clock:
                timer = self.clock_timers.pop(delivery, None)
                if timer is not None:
                    timer.cancel()
                due = self.clock_due.pop(delivery, None)
                if due is not None:
                    call.clock_started = due - call.handler.timeout
                self.wait_from.pop(delivery, None)
            call.ctx._sealed = True  # a publish() from now on would be lost: it raises instead
            # its waits for the database excluded (see _waiting): what a rerun in place starts from
            call.started = self.deadlines.pop(delivery) - call.handler.timeout
            if delivery in self.timed_out:
                self.timed_out.discard(delivery)
                task = asyncio.current_task()
                assert task is not None  # only a handler running in a task can be cancelled
                task.uncancel()
                late = True
        if late:  # it caught the watchdog's cancellation and returned: a timed-out attempt all the same
            raise HandlerTimeout(f"handler exceeded its timeout of {call.handler.timeout}s "
                                 "(it returned after its cancellation; its result is dropped)")
        return result
