"""The worker loop of one service: :class:`_Runner`, what :class:`~choreograph.runtime.worker.Worker`
runs per service (how, and why so: :mod:`choreograph.runtime.worker`).

The runner fetches, starts each handler (in a task, or inline if it cannot suspend), and
stops. What a delivery comes to is decided by :class:`~choreograph.runtime._verdicts.Verdicts`,
its outcome is settled by :class:`~choreograph.runtime._settling.Settling`, and the leases of
what it holds and the handlers' timeouts are kept by :class:`~choreograph.runtime._timing.Timing`:
mixins of the runner.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
import sys
import time
import types
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, cast

from choreograph._clock import SystemClock, backoff, stamp_clock, waits_on_others
from choreograph.context import _set_current
from choreograph.errors import EmitError, StoreError, TransactionConflict, TransportClosed
from choreograph.runtime._coroutines import _Resumed, _suspends
from choreograph.runtime._outcomes import Stats, _Again, _Call, _Done, _Outcome
from choreograph.runtime._settling import Settling, _Settlement
from choreograph.runtime._timing import Timing
from choreograph.runtime._verdicts import Verdicts, _outputs_of
from choreograph.runtime.records import output_message
from choreograph.service import Service
from choreograph.stores.base import InboxStore
from choreograph.transports.base import Delivery, Subscription

if TYPE_CHECKING:
    from choreograph.runtime.worker import Worker

log = logging.getLogger("choreograph.worker")  # the worker's: one logger for the user to tune

#: Deliveries a service holds unsettled (handling, or waiting for the settle loop): at most
#: ``max(UNSETTLED_FLOOR, UNSETTLED_PER_SLOT * concurrency)``. Generous on purpose: settle
#: batches grow with the backlog and share the broker's round trips (a bound near
#: ``concurrency`` made ``concurrency=1`` settle an event or two per round trip); what it
#: stops is a stalled publish letting the fetch loop take the whole backlog.
UNSETTLED_FLOOR = 1024
UNSETTLED_PER_SLOT = 4
#: Seconds to put back a copy of an event whose other copy is being handled right now.
IN_FLIGHT_DEFER = 1.0
#: Seconds ``stop()`` spends after the drain releasing, settling and closing before it gives
#: up on an unreachable broker: what is still unsettled then comes back after its lease.
STOP_GRACE = 5.0
#: A handler whose transaction PostgreSQL aborted for a concurrent one (TransactionConflict:
#: a serialization failure or a deadlock) is run again in place, in the same attempt and
#: under the same timeout, up to this many times; then it is a failed attempt as before.
CONFLICT_RERUNS = 3
#: The pause before the first such rerun, doubled for each next one (with jitter: the
#: transactions that conflicted should not meet again).
CONFLICT_PAUSE = 0.01


#: Python 3.12+ can start a task eagerly (run it at once until it first suspends).
_EAGER_TASKS = sys.version_info >= (3, 12)


class _Runner(Timing, Verdicts, Settling):
    """The worker loop of one service."""

    # Slots, not a __dict__: more than 30 attributes make CPython 3.11 give an instance a
    # plain dict (its shared-key layout stops at 30), so that no ``self.x`` and no
    # ``self._method()`` on the hot path could be specialised. The mixins have none.
    __slots__ = (
        "active",
        "active_ids",
        "clock_due",
        "clock_time",
        "clock_timers",
        "deadlines",
        "fetching",
        "finish_due",
        "finished",
        "finisher_idle",
        "finishing",
        "group",
        "handed_back_types",
        "handlers",
        "has_database",
        "hold_wake",
        "lane",
        "loop",
        "max_unsettled",
        "outcome_ready",
        "outcomes",
        "published",
        "service",
        "settle_ended",
        "settle_waiting",
        "slot_free",
        "stats",
        "stopping",
        "store",
        "sub",
        "tasks",
        "timed_out",
        "touch_wake",
        "unfinished",
        "virtual_clock",
        "wait_from",
        "waiting",
        "watchdog",
        "worker",
    )

    #: Whether handlers that cannot suspend run inline in the fetch loop (see :meth:`_inline`);
    #: off where a subclass wraps every attempt (spans and metrics).
    INLINE = True

    def __init__(self, worker: Worker, service: Service) -> None:
        self.worker = worker
        self.service = service
        self.group = service.group
        self.stats = Stats()
        self.store: InboxStore = worker.store  # replaced by the service database's inbox if it has one
        self.handlers = service.handlers
        self.handed_back_types: set[str] = set()  # types _unsubscribed has warned about
        # the clock's time(); time.time itself for the real clock (a Python call less per event)
        self.clock_time = time.time if type(worker.clock) is SystemClock else worker.clock.time
        self.virtual_clock = type(worker.clock) is not SystemClock
        self.has_database = False  # set by start(): whether the service keeps state in its own database
        self.sub: Subscription | None = None
        self.active: dict[asyncio.Task[None], Delivery] = {}
        self.active_ids: dict[str, Delivery] = {}  # event id -> the delivery handling it, until settled
        self.max_unsettled = max(UNSETTLED_FLOOR, UNSETTLED_PER_SLOT * worker.concurrency)  # in hand, at most
        self.outcomes: list[_Outcome] = []
        self.outcome_ready = asyncio.Event()
        self.settle_waiting = False  # the settle loop waits for outcomes
        self.hold_wake = False  # the fetch loop wakes the settle loop itself after a lone event (see _emit)
        self.lane: asyncio.Task[Any] | None = None  # a task publishing its own outcome's outputs (see _handle)
        # Outcomes whose outputs are published, waiting for the finisher to mark and ack them.
        self.published: list[tuple[Sequence[_Outcome], _Settlement]] = []
        self.unfinished = 0  # outcomes in self.published
        self.finish_due = asyncio.Event()  # wakes the finisher: work while it is idle, or finish now
        self.finisher_idle = False
        self.finishing = False  # the finisher is marking and acking (with its retries)
        self.finished = asyncio.Event()  # set each time it is done with that
        self.settle_ended = False  # the settle loop is done: the finisher finishes what is left and ends
        self.slot_free = asyncio.Event()
        self.touch_wake = asyncio.Event()  # on a test's clock: the touch loop has something to touch
        self.stopping = False
        self.fetching = False
        self.tasks: list[asyncio.Task[None]] = []
        # Handler timeouts: one watchdog per service instead of a timer per delivery.
        self.deadlines: dict[Delivery, float] = {}
        self.timed_out: set[Delivery] = set()
        self.waiting: set[Delivery] = set()  # handlers waiting for their database connection
        # On a test's clock (a VirtualClock): each handler's timeout on that clock - when it is due
        # (pushed on by its waits for its database connection), its timer, and since when it waits.
        self.clock_due: dict[Delivery, float] = {}
        self.clock_timers: dict[Delivery, asyncio.Task[None]] = {}
        self.wait_from: dict[Delivery, float] = {}
        self.watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        database = self.worker.outbox.store_for(self.service)
        self.has_database = database is not None
        self.store = database or self.worker.store
        self.sub = await self.worker.transport.subscribe(self.group, sorted(self.service.subscriptions))
        # On a test's clock the stores date what they record on it (see _clock.stamp_clock): the
        # loops' context, which the handlers' tasks and the finisher inherit.
        context = contextvars.copy_context()
        if self.virtual_clock:
            context.run(stamp_clock.set, self.worker.clock)
        self.tasks = [
            asyncio.create_task(self._fetch_loop(), name=f"choreograph-fetch-{self.group}", context=context),
            asyncio.create_task(self._settle_loop(), name=f"choreograph-settle-{self.group}", context=context),
            asyncio.create_task(self._touch_loop(), name=f"choreograph-touch-{self.group}", context=context),
        ]
        timeouts = [h.timeout for h in self.service.all_handlers()] or [1.0]
        tick = min(0.5, max(0.005, min(timeouts) / 10))
        self.watchdog = asyncio.create_task(self._watchdog_loop(tick), name=f"choreograph-timeouts-{self.group}")

    # -- fetching ---------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self.sub is not None
        worker = self.worker
        while not self.stopping:
            # Slots for handlers, and room for deliveries in hand: fetched but not settled yet
            # (handlers that ran inline, and outcomes the settle loop has not got to, hold
            # no slot; without this bound a stalled publish let the fetch loop take the
            # backlog). Outcomes count too: a duplicate or deferred copy has no id in hand.
            free = min(worker.concurrency - len(self.active),
                       self.max_unsettled - len(self.active_ids) - len(self.outcomes))
            if free <= 0:
                self.slot_free.clear()
                await self.slot_free.wait()
                continue
            self.fetching = True
            try:
                batch = await self.sub.fetch(free, timeout=worker.poll_interval)
            except asyncio.CancelledError:
                if self.stopping:
                    break  # stop() interrupts an idle fetch; fetch is cancel-safe
                raise
            except TransportClosed as exc:  # closed under the worker: nothing to come back for
                if not self.stopping:
                    log.error("fetch failed for %s: %s; no longer fetching", self.group, exc)
                break
            except Exception as exc:  # broker down: back off, the client reconnects
                if self.stopping:
                    break
                log.warning("fetch failed for %s: %s; retrying", self.group, exc)
                await backoff(worker.clock, 0.5)
                continue
            finally:
                self.fetching = False
            if not batch:
                continue
            if self.virtual_clock:
                self._busy(True)  # until the batch's handlers started: the lookup is work too
            try:
                try:
                    # Every id, also those in hand now: one may be settled while this awaits, and
                    # its copy must then be found a duplicate (it ran again when only the ids not
                    # in hand were looked up).
                    seen = await self.store.seen(self.group, [d.message.id for d in batch])
                except Exception as exc:
                    held = await self._inbox_down(batch, exc)
                    if held is None:  # stopping while the inbox was down: the batch is released
                        continue
                    seen = held
            except asyncio.CancelledError:
                if not self.stopping:
                    raise
                # stop() gave the fetch loop no more time (a drain cut short): nothing of the
                # batch has started, so none of it runs after stop() returned
                for delivery in batch:
                    await self._release(delivery)
                break
            # A lone event's outcome may take the lane below: the settle loop is woken after
            # this batch only if it does not (a wake-up for nothing per event otherwise).
            self.hold_wake = len(batch) == 1
            try:
                for delivery in batch:
                    message_id = delivery.message.id
                    if message_id in self.active_ids:
                        # Another copy is being handled (published twice, or redelivered after its lease
                        # ran out). Acking this one could settle the message while the handler may still
                        # fail, so put it back: by then the inbox says whether it was processed.
                        # Deferred, not retried: this copy was not tried, and should its original
                        # fail, its own attempts are the policy's to count.
                        self.stats.deferred += 1
                        self._emit(_Again(delivery, IN_FLIGHT_DEFER, deferred=True))
                        continue
                    if message_id in seen:
                        self._emit(self._duplicate(delivery))
                        continue
                    self.active_ids[message_id] = delivery
                    self._start(delivery)
            except BaseException:  # a KeyboardInterrupt out of a handler: nothing is held back
                self.hold_wake = False
                self.outcome_ready.set()
                raise
            self.hold_wake = False  # no await since it was set: nobody else emitted meanwhile
            if self.virtual_clock:
                self.touch_wake.set()
                self._busy(False)
            outcomes = self.outcomes
            if (len(batch) == 1 and len(outcomes) == 1 and type(outcomes[0]) is _Done
                    and outcomes[0].delivery is batch[0] and not self.active and worker.concurrency > 1
                    and self._lane_open()):
                # A lone event at a light load, handled inline (or, on 3.12, by a task that
                # finished in its eager first step): this loop publishes its outputs before
                # its next fetch, as a handler's task would (see _handle), instead of issuing
                # that fetch first and leaving the publish to the settle loop's next turn.
                # A batch of one while there are slots to spare means nothing else was
                # waiting; what arrives meanwhile waits for this publish (a batch then, not a
                # lane). With concurrency 1 every batch is one: the lane would serialise them.
                task = asyncio.current_task()
                assert task is not None
                await self._lane(task, outcomes.pop())
            elif outcomes:
                self.outcome_ready.set()

    async def _inbox_down(self, batch: list[Delivery], exc: Exception) -> set[str] | None:
        """The inbox could not look ``batch`` up (``exc``): hold the batch (its leases touched)
        and look again every second (every third of the lease, if shorter) until it answers -
        the ids it has processed. Releasing it
        counted an attempt on the broker per failure, so an outage of a few seconds spent an
        event's whole retry budget before its handler ran. ``None`` once stopping: released."""
        ids = [d.message.id for d in batch]
        wait = min(1.0, self.worker.transport.lease / 3)
        while True:
            log.error("inbox unavailable for %s: %s; holding %d deliveries, trying again in %.2fs",
                      self.group, exc, len(batch), wait)
            await backoff(self.worker.clock, wait)
            if self.stopping:
                for delivery in batch:
                    try:
                        await delivery.retry(0.0)
                    except Exception as again:  # the broker too: its lease hands the delivery on
                        log.warning("releasing %r failed: %s; it comes back after its lease", delivery, again)
                return None
            await self._touch(batch)
            try:
                return await self.store.seen(self.group, ids)
            except Exception as again:
                exc = again

    def _start(self, delivery: Delivery) -> None:
        """Decode and validate ``delivery`` here, then run its handler in a task of its own -
        or inline, right here, if it cannot suspend (see :meth:`_inline`).

        The handler gets a real task (``asyncio.timeout``, ``TaskGroup`` and cancellation act
        on "the current task"). On Python 3.12+ the task starts eagerly: a handler that
        returns without suspending runs to the end right here, with no loop round trip.
        """
        try:
            call = self._prepare(delivery)
        except Exception as exc:  # a bug in us, or in a library under us
            self._emit(self._internal_error(delivery, exc))
            return
        if not isinstance(call, _Call):
            self._emit(call)
            return
        task: asyncio.Task[None]
        coro = call.coro
        if self.INLINE and call.unit is None and type(coro) is types.CoroutineType and not _suspends(coro.cr_code):
            context = contextvars.copy_context()
            left = context.run(self._inline, call)
            if left is None:
                return
            # created out here: a task that starts eagerly (a 3.12 eager task factory) enters
            # its context, which must not be entered already
            call.started = self.loop.time()
            task = self.loop.create_task(
                self._settle_raised(call, left) if isinstance(left, BaseException) else self._handle(call),
                context=context)
        else:
            call.started = self.loop.time()
            coro = self._transactional(call) if call.unit is not None else self._handle(call)
            if _EAGER_TASKS:
                task = asyncio.Task(coro, loop=self.loop, eager_start=True)  # type: ignore[call-arg]
                if task.done():
                    self._ended(task, delivery)
                    return
            else:
                task = self.loop.create_task(coro)
        self.active[task] = delivery
        task.add_done_callback(self._finished)
        if self.virtual_clock:
            # Work from its creation on, not from its first step (_guarded): on 3.11 that step
            # comes a loop turn after the fetch loop stopped counting as busy, and a busy() read
            # in between let settled() or a Scenario jump the clock over the handler's work.
            handling = getattr(self.worker.clock, "handling", None)  # a VirtualClock's: see its busy()
            if handling is not None:  # until the task ends: its commit and its lane are work too
                handling(task, True)
                task.add_done_callback(functools.partial(handling, running=False))

    def _inline(self, call: _Call) -> BaseException | _Resumed | None:
        """Run a handler that cannot suspend (:func:`never_suspends`) to its end right here, in
        the fetch loop (in a copy of its context), and emit its outcome: no task, no loop
        round trip. What is left for a task: a failure to record (that needs the inbox
        store), or - should the handler suspend after all - the rest of its run.

        A task buys a handler what it can use only at an ``await``: cancellation by the
        watchdog or ``stop()``, ``asyncio.timeout``, a ``TaskGroup``. This one has no
        ``await``; nothing could interrupt it inside a task either. In its own context
        copy, as a task's, what it sets in a context variable stays its own and what the
        runtime logs about it carries its ids.
        """
        delivery = call.delivery
        _set_current(call.ctx)
        try:
            first = call.coro.send(None)
        except StopIteration as done:
            ctx = call.ctx
            ctx._sealed = True  # a publish() from now on would be lost: it raises instead
            result, handler = done.value, call.handler
            try:
                try:
                    declared = type(result) in handler.emits
                except TypeError:  # not an Event (its type is not even hashable): _returned says so
                    declared = False
                if declared and not ctx.outputs:  # one event out: _returned's common case
                    try:
                        message = output_message(result, call.envelope, handler.id_suffix0, self.service.source, None,
                                                 self.clock_time() if self.virtual_clock else None)
                    except Exception:  # not encodable: _returned says so (a dead letter ``rejected``)
                        outcome: _Outcome = self._returned(call, result)
                    else:
                        self.stats.handled += 1
                        outcome = _Done(delivery, [message], True)
                elif result is None and not ctx.outputs:  # nothing out
                    self.stats.handled += 1
                    outcome = _Done(delivery, [], True)
                else:
                    outcome = self._returned(call, result)
            except EmitError as exc:  # after failed attempts: a task records it with their history
                return exc
            except Exception as exc:  # a bug in us
                outcome = self._internal_error(delivery, exc)
            self._emit(outcome)
            return None
        except BaseException as exc:
            call.ctx._sealed = True
            if not _own_failure(exc):
                self._release_id(delivery)
                raise
            return exc
        # It suspended after all (its code object swapped under us?): a task runs the rest.
        log.warning("handler %s suspended although its code has no await; it goes on in a task", call.handler.name)
        resumed = _Resumed(call.coro, first)
        call.coro = cast(Coroutine[Any, Any, Any], resumed)
        return resumed

    async def _handle(self, call: _Call) -> None:
        """The task of a handler of a service without a database: run it, then settle a success.

        A success's outputs are published right here - the fast lane - when it is the only
        delivery in hand and the settle loop is idle (a lone event at a light load), instead of
        waking the settle loop: a loop iteration less on every hop's path; the finisher marks
        and acks it. Otherwise it goes to the settle loop, which batches (counted on a memory://
        chain of 20,000 events and on the brokers, the lane is taken for well under 1% of them
        under load). The lane keeps the order of one outcome (outputs durable before mark and
        ack) and the settle loop's retries; what arrives meanwhile the settle loop publishes at
        once, and the finisher marks and acks both.

        Once in the lane the task is settle work, not a handler: it leaves ``active`` (its slot
        is free for the next fetch; ``stop`` does not count it against the drain time nor cancel
        it with the unfinished handlers) and ``stop`` gives it the settle loop's grace instead.
        Not taken during an eager first step (3.12): the fetch loop is still going through the
        batch, and a copy of the same event later in it must find the id in ``active_ids``.
        """
        await self._run(call)
        outcome, call.outcome = call.outcome, None
        if outcome is None:
            return
        task = asyncio.current_task()
        if len(self.active) > 1 or task not in self.active or self.outcomes or not self._lane_open():
            self._emit(outcome)
            return
        assert task is not None
        del self.active[task]
        self.slot_free.set()
        await self._lane(task, outcome)

    async def _run(self, call: _Call) -> None:
        """A handler of a service without a database, from its first step to its outcome
        (a success is left in ``call.outcome`` for :meth:`_handle`)."""
        _set_current(call.ctx)  # this task's own context
        try:
            result = await self._guarded(call, call.coro)
        except BaseException as exc:
            if not _own_failure(exc):
                if isinstance(exc, asyncio.CancelledError):  # shutdown ran out of drain time
                    await self._release(call.delivery)
                raise
            await self._settle_raised(call, exc)
        else:
            try:
                call.outcome = self._returned(call, result)
            except EmitError as exc:  # after failed attempts: recorded with their history
                await self._settle_raised(call, exc)

    def _finished(self, task: asyncio.Task[None]) -> None:
        delivery = self.active.pop(task, None)
        self.slot_free.set()
        if delivery is not None:
            self._ended(task, delivery)

    def _ended(self, task: asyncio.Task[None], delivery: Delivery) -> None:
        # The id stays in active_ids until its outcome is settled (inbox marked): a copy of
        # the same event fetched meanwhile is a duplicate, not a second run.
        if task.cancelled() or task.exception() is not None:
            self._release_id(delivery)
        if not task.cancelled() and task.exception() is not None:  # a bug in us: the lease redelivers it
            log.error("internal error handling %r", delivery, exc_info=task.exception())

    def _release_id(self, delivery: Delivery) -> None:
        if self.active_ids.get(delivery.message.id) is delivery:
            del self.active_ids[delivery.message.id]
            self.slot_free.set()

    def _emit(self, outcome: _Outcome) -> None:
        self.outcomes.append(outcome)
        if not self.hold_wake:  # else the fetch loop wakes the settle loop after its batch
            self.outcome_ready.set()

    # -- handling ---------------------------------------------------------------------

    async def _release(self, delivery: Delivery) -> None:
        """Give an unfinished delivery back at once (shutdown ran out of drain time)."""
        self.stats.released += 1
        try:
            await asyncio.shield(delivery.retry(0.0))
        except Exception as exc:  # broker unreachable: the lease gives it back instead
            log.warning("could not release %r: %s; it returns after its lease", delivery, exc)

    async def _settle_raised(self, call: _Call, exc: BaseException) -> None:
        try:
            outcome = self._raised(call, exc)
            if outcome is None:
                outcome = await self._failed(call, exc)
        except StoreError:
            raise  # the failure cannot be recorded now: the lease brings the delivery back later
        except Exception as err:  # building the record failed: a bug, not the handler's
            outcome = self._internal_error(call.delivery, err)
        self._emit(outcome)

    async def _transactional(self, call: _Call) -> None:
        """A handler of a service with a database: its state, the inbox record and its outputs
        commit together when it returns (then the relay publishes the outputs)."""
        delivery = call.delivery
        reruns = 0
        try:
            while True:
                unit = call.unit
                assert unit is not None
                try:
                    _set_current(call.ctx)  # this task's own context
                    if self.virtual_clock:  # its waits for the SQLite writer are no work of its own
                        waits_on_others.set(self._clock_waits)
                    result = await self._guarded(call, call.coro)
                    messages = self._outputs(call.handler, call.envelope, _outputs_of(result), call.ctx)
                    mark = True
                    if unit.used:
                        if not await unit.commit(self.group, call.envelope.id, messages):
                            self._emit(self._duplicate(delivery))  # another consumer committed this event first
                            return
                        messages, mark = [], False  # in the outbox now: the relay publishes them
                    break
                except BaseException as exc:
                    if not _own_failure(exc):
                        raise
                    await unit.rollback()  # before touching the store: on SQLite it waits for the writer
                    if reruns < CONFLICT_RERUNS and _conflict(exc):
                        reruns += 1
                        again = await self._rerun(call, exc, reruns)
                        if isinstance(again, _Call):
                            call = again
                            continue
                        self._emit(again)
                        return
                    await self._settle_raised(call, exc)
                    return
                finally:
                    await unit.rollback()  # no-op once committed
        except asyncio.CancelledError:  # shutdown ran out of drain time
            await self._release(delivery)
            raise
        self._emit(self._committed(call, messages, mark))

    async def _rerun(self, call: _Call, exc: BaseException, rerun: int) -> _Call | _Outcome:
        """The handler's transaction conflicted with a concurrent one (``exc``): after a short
        pause, a fresh call of the handler for the same delivery and attempt (a new context and
        unit of work), under what is left of the attempt's timeout (its waits for the database
        not counted). Not a failed attempt: a conflict says nothing about the event, and the
        attempts are the policy's to count."""
        rng = self.worker.rng
        jitter = rng.random() if rng is not None else random.random()
        pause = CONFLICT_PAUSE * 2 ** (rerun - 1) * (0.5 + jitter)
        log.info("%s.%s: the transaction of %s conflicted with a concurrent one (%s); running it again "
                 "in %.3fs (%d of %d)", self.service.name, call.handler.name, call.envelope.id, exc, pause,
                 rerun, CONFLICT_RERUNS)
        await backoff(self.worker.clock, pause)
        again = self._prepare(call.delivery)
        if isinstance(again, _Call):
            again.started = call.started
            again.clock_started = call.clock_started  # on a test's clock (see _guarded)
            again.envelope = call.envelope  # as the attempt's span left it (its outputs are its children)
        return again

    # -- stopping ---------------------------------------------------------------------

    async def stop(self, drain_timeout: float) -> None:
        self.stopping = True
        self.slot_free.set()
        fetch, settle, touch = self.tasks
        # The lease touches and the watchdog go on through the drain, until what is in hand
        # settled: stopped first, a handler outliving its lease in the drain was run again by
        # another replica, and one past its timeout held the drain to its end.
        try:
            if self.fetching:
                fetch.cancel()
            loop = asyncio.get_running_loop()
            drained_by = loop.time() + drain_timeout
            if self.lane is not fetch:  # the fetch loop in the lane is settle work: it gets the grace below
                await asyncio.wait([fetch], timeout=drain_timeout)  # a client ignoring cancellation must not hang us
                if not fetch.done() and self.lane is not fetch:
                    # still looking a batch up in the inbox (or holding it through an outage): it
                    # must not start handlers after stop() returned; it releases the batch
                    fetch.cancel()
                    await asyncio.wait([fetch], timeout=STOP_GRACE)
            if self.active and self.virtual_clock:
                drained_by = await self._drain_on_clock(drained_by)
            if self.active:
                _, pending = await asyncio.wait(list(self.active), timeout=max(0.0, drained_by - loop.time()))
                for task in pending:
                    task.cancel()
            # Every wait from here on is bounded: with the broker unreachable, settling and
            # releasing cannot succeed, and what stays unsettled returns after its lease anyway.
            grace_by = loop.time() + STOP_GRACE
            if self.active:
                await asyncio.wait(list(self.active), timeout=STOP_GRACE)
            self.outcome_ready.set()
            _, unsettled = await asyncio.wait([settle], timeout=max(0.0, grace_by - loop.time()))
            lane = self.lane
            if unsettled:
                log.warning("%s: outcomes still unsettled %.0fs after the drain (broker unreachable?); "
                            "their deliveries return after the lease", self.group, STOP_GRACE)
                settle.cancel()
                if lane is not None:
                    lane.cancel()
        finally:  # a stop() cancelled in its drain too: they must not go on touching for good
            touch.cancel()
            if self.watchdog is not None:
                self.watchdog.cancel()
        await asyncio.gather(settle, touch, *([self.watchdog] if self.watchdog else []), *([lane] if lane else []),
                             return_exceptions=True)
        if self.sub is not None:
            try:
                async with asyncio.timeout(max(1.0, grace_by - loop.time())):
                    await self.sub.close()
            except TimeoutError:
                log.warning("%s: closing the subscription timed out; unsettled deliveries return after their lease",
                            self.group)



def _conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, a :class:`TransactionConflict`."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            return False
        if isinstance(cause, TransactionConflict):
            return True
        cause = cause.__cause__
    return False


def _own_failure(exc: BaseException) -> bool:
    """Whether ``exc``, out of a handler, is that handler's failed attempt: anything but a
    cancellation of its task (shutdown; the watchdog's is turned into HandlerTimeout before)
    and Ctrl-C. A ``CancelledError``, ``SystemExit`` or other ``BaseException`` the handler
    raises itself counts as a failed attempt: it must neither end the worker nor come back
    at once (a bare re-raise made a tight redelivery loop)."""
    if isinstance(exc, KeyboardInterrupt):
        return False
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and task.cancelling() == 0
    return True

