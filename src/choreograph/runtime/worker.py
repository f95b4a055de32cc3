"""The worker: pulls deliveries, runs handlers, publishes outputs, then settles.

Per service (one consumer group) a worker runs three tasks:

* the **fetch loop** pulls as many deliveries as there are free handler slots
  (``concurrency``), drops those the inbox has already seen, decodes and validates
  each, and starts a task per delivery (eagerly on Python 3.12+);
* each **handler task** runs the handler under its timeout and turns the result into
  an *outcome* (done with outputs / retry after / dead-letter);
* the **settler** takes every outcome that accumulated while it was busy and settles
  them together: one ``publish`` for all outputs, one inbox commit, one batched ack.
  An idle worker settles a lone event at once; a busy one amortises round trips
  over whatever piled up (group commit). Outputs are always durable before the
  input is acked, so a crash anywhere re-runs the handler, which republishes the
  same deterministic ids, and downstream inboxes drop the duplicates. It runs two
  stages deep: batch N+1 publishes while batch N is marked and acked;
* the **finisher** does that marking and acking, ``ack_delay`` (5 ms by default) after
  the outputs are published: whatever is published within that window is marked in one
  inbox commit and acked in one call, and the next service, which can act on the outputs
  as soon as they are published, competes less with this one's bookkeeping on a shared
  host (measured with all hops on one 2-core host: see the README).

Shutdown (``stop()``) stops fetching, lets in-flight handlers finish within
``drain_timeout``, releases the rest back to the broker, settles what finished and
closes the subscription: nothing is lost. Those last steps get :data:`STOP_GRACE` seconds,
so a worker whose broker is unreachable still exits; what it could not settle is
redelivered after the lease, and the inbox makes the re-run harmless downstream.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import dis
import functools
import logging
import sys
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any, cast

import pydantic

from choreograph._clock import SYSTEM_CLOCK, Clock, SystemClock, backoff
from choreograph._envelope import Envelope, decode, from_dict
from choreograph.context import Context, _set_current
from choreograph.errors import (
    ConfigurationError,
    EmitError,
    MalformedEnvelope,
    Reject,
    Retry,
    StoreError,
    TransportClosed,
)
from choreograph.events import Event
from choreograph.joins import Defer
from choreograph.runtime.outbox import HandlerUnit, Outboxes
from choreograph.runtime.records import (
    DeadLetterReason,
    dead_letter_record,
    failure_envelope,
    handover_delay,
    handover_warning,
    internal_error_retry,
    original_envelope,
    output_message,
    to_message,
    unhandled_error,
)
from choreograph.service import FAILED, Failure, Handler, Service
from choreograph.stores.base import ErrorInfo, InboxStore
from choreograph.stores.joins_base import JoinStore, join_store_beside
from choreograph.stores.memory import MemoryStore
from choreograph.transports.base import Delivery, Message, Subscription, Transport

if TYPE_CHECKING:
    from choreograph.telemetry import Telemetry

log = logging.getLogger("choreograph.worker")

DEFAULT_MAX_HOPS = 64
#: How long the inbox remembers a processed event id (and joins keep their arrivals):
#: a duplicate arriving later than this runs again. Seven days by default.
DEFAULT_RETENTION = 7 * 86400.0
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
#: Seconds from publishing a batch's outputs to marking and acking its inputs (see the
#: finisher above). Only what is already durable waits; ``stop()`` does not.
DEFAULT_ACK_DELAY = 0.005


class HandlerTimeout(Exception):
    """A handler ran longer than its timeout; counted as a failed (transient) attempt."""


@dataclasses.dataclass(slots=True)
class _Done:
    delivery: Delivery
    messages: list[Message]
    mark: bool  # record in the inbox (False for events this service ignores)


@dataclasses.dataclass(slots=True)
class _Again:
    delivery: Delivery
    after: float


@dataclasses.dataclass(slots=True)
class _Dead:
    delivery: Delivery
    record: dict[str, Any]
    failure: Message | None


_Outcome = _Done | _Again | _Dead

#: Python 3.12+ can start a task eagerly (run it at once until it first suspends).
_EAGER_TASKS = sys.version_info >= (3, 12)


@dataclasses.dataclass(slots=True)
class _Call:
    """One handler run: what it handles and the coroutine that runs it."""

    delivery: Delivery
    envelope: Envelope
    handler: Handler
    ctx: Context
    unit: HandlerUnit | None
    now: float  # clock time when handling began (records)
    coro: Coroutine[Any, Any, Any]
    started: float = 0.0  # loop time when its task began (timeout): set by _start for a task only
    outcome: _Outcome | None = None  # a success, left by _run for its task to settle (see _handle)


@dataclasses.dataclass
class Stats:
    """Counters of one service's worker (for tests, reports and metrics)."""

    handled: int = 0
    duplicates: int = 0
    deferred: int = 0
    ignored: int = 0
    handed_back: int = 0  # of a type this version does not subscribe to: left for a replica that does
    filtered: int = 0  # acked unhandled: the handler's where= did not match
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0


#: Opcodes at which a coroutine's own frame can suspend: ``await``, ``async for``, ``async with``.
_SUSPENDING = frozenset({"YIELD_VALUE", "SEND", "GET_AWAITABLE", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT",
                         "END_ASYNC_FOR"})
#: id(code) -> (code, whether it can suspend); the code is kept so that its id is never reused.
_CODE_SUSPENDS: dict[int, tuple[types.CodeType, bool]] = {}


def _suspends(code: types.CodeType) -> bool:
    known = _CODE_SUSPENDS.get(id(code))
    if known is None:
        known = _CODE_SUSPENDS[id(code)] = (code, any(i.opname in _SUSPENDING for i in dis.get_instructions(code)))
    return known[1]


def never_suspends(coro: object) -> bool:
    """Whether ``coro`` is a coroutine of an ``async def`` whose body has no ``await``,
    ``async for`` or ``async with`` (read off the bytecode it runs): it runs to its end in
    one step. Only its own frame can suspend it, and this one has nowhere to; what it
    calls can be anything. The coroutine is judged, not the function: a decorator's
    wrapper (also one that reports the original's ``__code__``, as wrapt's do) is what
    runs, and a compiled coroutine (Cython) has no bytecode to read, so it answers ``False``.
    """
    return type(coro) is types.CoroutineType and not _suspends(coro.cr_code)


class _Resumed:
    """The rest of a coroutine that already took its first step and yielded ``first``:
    awaited in a task, it hands the task what the coroutine yields and passes back what
    the task sends or throws."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                thrown: BaseException | None = exc
            else:
                thrown = None
            try:
                value = coro.send(sent) if thrown is None else coro.throw(thrown)
            except StopIteration as done:
                return done.value


def _outputs_of(result: Any) -> list[Event]:
    if result is None:
        return []
    if isinstance(result, Event):
        return [result]
    if isinstance(result, (list, tuple)):
        out = []
        for item in result:
            if not isinstance(item, Event):
                raise EmitError(f"handler returned {type(item).__name__} in its list; expected Event instances")
            out.append(item)
        return out
    raise EmitError(f"handler returned {type(result).__name__}; expected None, an Event or a list of Events")


class _Runner:
    """The worker loop of one service."""

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
        self.stopping = False
        self.fetching = False
        self.tasks: list[asyncio.Task[None]] = []
        # Handler timeouts: one watchdog per service instead of a timer per delivery.
        self.deadlines: dict[Delivery, float] = {}
        self.timed_out: set[Delivery] = set()
        self.waiting: set[Delivery] = set()  # handlers waiting for their database connection
        self.watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        database = self.worker.outbox.store_for(self.service)
        self.has_database = database is not None
        self.store = database or self.worker.store
        self.sub = await self.worker.transport.subscribe(self.group, sorted(self.service.subscriptions))
        self.tasks = [
            asyncio.create_task(self._fetch_loop(), name=f"choreograph-fetch-{self.group}"),
            asyncio.create_task(self._settle_loop(), name=f"choreograph-settle-{self.group}"),
            asyncio.create_task(self._touch_loop(), name=f"choreograph-touch-{self.group}"),
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
            try:
                # Every id, also those in hand now: one may be settled while this awaits, and
                # its copy must then be found a duplicate (it ran again when only the ids not
                # in hand were looked up).
                seen = await self.store.seen(self.group, [d.message.id for d in batch])
            except Exception as exc:
                log.error("inbox unavailable for %s: %s; releasing %d deliveries", self.group, exc, len(batch))
                for delivery in batch:
                    try:
                        await delivery.retry(1.0)
                    except Exception as again:  # the broker too: its lease hands the delivery on
                        log.warning("releasing %r failed: %s; it comes back after its lease", delivery, again)
                await backoff(worker.clock, 1.0)
                continue
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
                        self.stats.deferred += 1
                        self._emit(_Again(delivery, IN_FLIGHT_DEFER))
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
                        message = output_message(result, call.envelope, handler.id_suffix0, self.service.source)
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

    def _lane_open(self) -> bool:
        """Whether a success may take the fast lane now: nobody in it, the settle loop idle,
        the worker not stopping."""
        return self.lane is None and self.settle_waiting and not self.stopping

    async def _lane(self, task: asyncio.Task[Any], outcome: _Outcome) -> None:
        """Publish ``outcome``'s outputs here in ``task`` (a handler's, or the fetch loop's),
        with the settle loop's retries, and hand it to the finisher (see :meth:`_handle`)."""
        self.lane = task
        try:
            plan = _Settlement.of((outcome,))
            if not plan.messages or await self._retrying((outcome,), functools.partial(self.worker.transport.publish, plan.messages)):
                self._published((outcome,), plan)
        finally:
            self.lane = None
            if self.stopping:  # a stopping settle loop waits for the lane before it ends
                self.outcome_ready.set()

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
            call.outcome = self._returned(call, result)

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

    def _internal_error(self, delivery: Delivery, exc: Exception) -> _Outcome:
        """Preparing ``delivery`` raised where nothing should (no outcome was emitted for it):
        a failed attempt under the service's retry policy, then a dead letter ``internal_error``
        with the original body - a message that always trips it is not redelivered forever."""
        self._release_id(delivery)
        log.error("internal error handling %r (attempt %d)", delivery, delivery.attempt, exc_info=exc)
        after = internal_error_retry(self.service.retry, delivery.attempt, self.worker.rng)
        if after is not None:
            self.stats.retried += 1
            return _Again(delivery, after)
        return self._dead(delivery, None, "internal_error", None, ErrorInfo.from_exception(exc),
                          self.worker.clock.time(), original_envelope(delivery.message.body))

    def _release_id(self, delivery: Delivery) -> None:
        if self.active_ids.get(delivery.message.id) is delivery:
            del self.active_ids[delivery.message.id]
            self.slot_free.set()

    def _emit(self, outcome: _Outcome) -> None:
        self.outcomes.append(outcome)
        if not self.hold_wake:  # else the fetch loop wakes the settle loop after its batch
            self.outcome_ready.set()

    async def _touch_loop(self) -> None:
        """Extend the leases of what this worker holds, every third of a lease: the deliveries
        whose handlers run, and those handled but not settled for a whole tick already - their
        outputs, inbox mark or ack wait for a broker or store that refuses them for now (a
        Redis ``maxlen`` backlog, a store that cannot write). Without that touch the lease ran
        out and another replica ran the handler again. What settles within a tick, nearly
        everything, is not touched."""
        interval = max(0.05, self.worker.transport.lease / 3)
        before: dict[str, Delivery] = {}
        while not self.stopping:
            await asyncio.sleep(interval)
            running = list(self.active.values())
            ids = {id(d) for d in running}
            held = dict(self.active_ids)
            waiting = [d for message_id, d in held.items() if before.get(message_id) is d and id(d) not in ids]
            before = held
            await self._touch(running + waiting)

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

    def _waiting(self, delivery: Delivery, waited: float | None) -> None:
        """A handler waits for its database connection (``None``) or got it after ``waited``
        seconds: that time does not count against its timeout - a handler holding the SQLite
        writer too long must not time out the ones queued behind it."""
        if waited is None:
            self.waiting.add(delivery)
            return
        self.waiting.discard(delivery)
        if delivery in self.deadlines:
            self.deadlines[delivery] += waited

    # -- handling ---------------------------------------------------------------------

    async def _release(self, delivery: Delivery) -> None:
        """Give an unfinished delivery back at once (shutdown ran out of drain time)."""
        self.stats.released += 1
        try:
            await asyncio.shield(delivery.retry(0.0))
        except Exception as exc:  # broker unreachable: the lease gives it back instead
            log.warning("could not release %r: %s; it returns after its lease", delivery, exc)

    def _prepare(self, delivery: Delivery) -> _Call | _Outcome:
        """Decode and validate ``delivery`` and create its handler call, or say at once what to do."""
        worker = self.worker
        now = self.clock_time()
        try:
            envelope = decode(delivery.message.body)
        except MalformedEnvelope as exc:
            return self._dead(delivery, None, "malformed", None, ErrorInfo.from_exception(exc), now,
                              original_envelope(delivery.message.body))
        if envelope.hops > worker.max_hops:
            error = ErrorInfo("LoopDetected", f"hops={envelope.hops} exceeds the limit of {worker.max_hops}")
            return self._dead(delivery, envelope, "loop_detected", None, error, now, publish_failure=False)
        handler = self.handlers.get(envelope.type) if envelope.type != FAILED else self._failure_handler(envelope)
        if handler is None:
            if envelope.type != FAILED and envelope.type not in self.service.subscriptions:
                return self._unsubscribed(delivery, envelope, now)
            self.stats.ignored += 1  # a failure of a type this service has no failure handler for
            return _Done(delivery, [], mark=False)
        try:
            if handler.kind == "event":
                if handler.accepts is not None and not handler.accepts(envelope):
                    return self._filtered(delivery)  # before validation: not this handler's business
                argument = handler.consumes.__pydantic_validator__.validate_python(envelope.data)
            else:
                argument = self._failure_argument(handler, envelope)
                if handler.accepts is not None and not handler.accepts(argument.envelope):
                    return self._filtered(delivery)  # a failure handler filters on the failed event
        except (pydantic.ValidationError, MalformedEnvelope) as exc:
            return self._dead(delivery, envelope, "invalid_payload", handler, ErrorInfo.from_exception(exc, limit=0), now)
        ctx = Context(envelope, self.service.name, handler.name, delivery.attempt)
        unit = None
        if self.has_database:
            ctx._unit = unit = worker.outbox.unit(self.service, ctx)
            if unit is not None:
                unit.on_wait = functools.partial(self._waiting, delivery)
        if handler.join is None:
            # an ``async def`` (checked at registration), so a coroutine
            coro = cast(Coroutine[Any, Any, Any],
                        handler.func(argument, ctx) if handler.takes_context else handler.func(argument))
        else:  # a join or compensation: records the arrival, calls func once all arrived
            coro = handler.join.run(argument, ctx, worker.joins, worker.clock)
        return _Call(delivery, envelope, handler, ctx, unit, now, coro)

    async def _guarded(self, call: _Call, handler: Awaitable[Any]) -> Any:
        """Await the rest of a handler under its timeout (the watchdog cancels it, we say why)."""
        delivery = call.delivery
        self.deadlines[delivery] = call.started + call.handler.timeout
        try:
            return await handler
        except asyncio.CancelledError:
            if delivery in self.timed_out:  # the watchdog, not a shutdown
                raise HandlerTimeout(f"handler exceeded its timeout of {call.handler.timeout}s") from None
            raise
        finally:
            call.ctx._sealed = True  # a publish() from now on would be lost: it raises instead
            del self.deadlines[delivery]
            if delivery in self.timed_out:
                self.timed_out.discard(delivery)
                task = asyncio.current_task()
                assert task is not None  # only a handler running in a task can be cancelled
                task.uncancel()

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

    def _returned(self, call: _Call, result: Any) -> _Outcome:
        """The outcome of a handler that returned ``result`` (a service without a database)."""
        try:
            messages = self._outputs(call.handler, call.envelope, _outputs_of(result), call.ctx)
        except EmitError as exc:
            outcome = self._raised(call, exc)
            assert outcome is not None
            return outcome
        self.stats.handled += 1
        return _Done(call.delivery, messages, mark=True)

    def _raised(self, call: _Call, exc: BaseException) -> _Outcome | None:
        """The outcome of a handler that raised ``exc``; ``None`` for a failed attempt (see ``_failed``)."""
        delivery, envelope, handler = call.delivery, call.envelope, call.handler
        if isinstance(exc, Defer):  # a join deadline timer not due yet: not a failure
            return _Again(delivery, exc.after)
        if isinstance(exc, EmitError):
            exc.event_id, exc.service, exc.handler = envelope.id, self.service.name, handler.name
        if isinstance(exc, (Reject, EmitError, ConfigurationError)):  # the same on every attempt: no retries
            return self._dead(delivery, envelope, "rejected", handler, ErrorInfo.from_exception(exc), call.now)
        return None

    async def _transactional(self, call: _Call) -> None:
        """A handler of a service with a database: its state, the inbox record and its outputs
        commit together when it returns (then the relay publishes the outputs)."""
        delivery, unit = call.delivery, call.unit
        assert unit is not None
        try:
            try:
                _set_current(call.ctx)  # this task's own context
                result = await self._guarded(call, call.coro)
                messages = self._outputs(call.handler, call.envelope, _outputs_of(result), call.ctx)
                mark = True
                if unit.used:
                    if not await unit.commit(self.group, call.envelope.id, messages):
                        self._emit(self._duplicate(delivery))  # another consumer committed this event first
                        return
                    messages, mark = [], False  # in the outbox now: the relay publishes them
            except BaseException as exc:
                if not _own_failure(exc):
                    raise
                await unit.rollback()  # before touching the store: on SQLite it waits for the writer
                await self._settle_raised(call, exc)
                return
            finally:
                await unit.rollback()  # no-op once committed
        except asyncio.CancelledError:  # shutdown ran out of drain time
            await self._release(delivery)
            raise
        self._emit(self._committed(call, messages, mark))

    def _committed(self, call: _Call, messages: list[Message], mark: bool) -> _Done:
        """The outcome of a handler of a service with a database that returned and committed."""
        self.stats.handled += 1
        return _Done(call.delivery, messages, mark=mark)

    def _filtered(self, delivery: Delivery) -> _Done:
        """The outcome of a delivery its handler's ``where=`` filters out: ack it, record nothing
        (a redelivered copy is filtered the same way)."""
        self.stats.filtered += 1
        return _Done(delivery, [], mark=False)

    def _duplicate(self, delivery: Delivery) -> _Done:
        """The outcome of a delivery the inbox says was processed already: ack it, run nothing."""
        self.stats.duplicates += 1
        return _Done(delivery, [], mark=False)

    def _unsubscribed(self, delivery: Delivery, envelope: Envelope, now: float) -> _Outcome:
        """``delivery`` is of a type this version of the service does not subscribe to: the
        group is bound to it because another version subscribed (see ``records.HANDOVER_ATTEMPTS``).
        Acking it would lose it for the replicas that handle it; it goes back for them."""
        after = handover_delay(delivery.attempt)
        consumer = f"this version of {self.service.name!r}"
        if after is not None:
            if envelope.type not in self.handed_back_types:
                self.handed_back_types.add(envelope.type)
                log.warning("%s", handover_warning(self.group, envelope.type, consumer))
            self.stats.handed_back += 1
            return _Again(delivery, after)
        error = unhandled_error(self.group, envelope.type, delivery.attempt, consumer, self.service.subscriptions)
        return self._dead(delivery, envelope, "unhandled", None, error, now, publish_failure=False)

    def _failure_handler(self, envelope: Envelope) -> Handler | None:
        failed_type = envelope.data.get("type") if isinstance(envelope.data, dict) else None
        return self.service.failure_handlers.get(failed_type) if isinstance(failed_type, str) else None

    @staticmethod
    def _failure_argument(handler: Handler, envelope: Envelope) -> Failure:
        data = envelope.data
        original = from_dict(data.get("envelope"))
        try:
            event: Event | None = handler.consumes.model_validate(original.data)
        except pydantic.ValidationError:
            event = None
        record = data.get("record") or {}
        if not isinstance(record, dict):
            raise MalformedEnvelope(f"data.record: expected an object, got {type(record).__name__}",
                                    event_id=envelope.id)
        return Failure(event=event, envelope=original, record=dict(record))

    def _outputs(self, handler: Handler, cause: Envelope, returned: list[Event], ctx: Context) -> list[Message]:
        """The messages of what the handler emitted; :class:`EmitError` (dead letter ``rejected``)
        for an undeclared type or an event that cannot be encoded - not a bug to redeliver."""
        try:
            if not ctx.outputs and len(returned) == 1 and type(returned[0]) in handler.emits:  # the common case
                return [output_message(returned[0], cause, handler.id_suffix0, self.service.source)]
            events = [(event, subject) for event, subject in ctx.outputs] + [(event, None) for event in returned]
            messages = []
            for index, (event, subject) in enumerate(events):
                if type(event) not in handler.emits:
                    declared = sorted(cls.event_type() for cls in handler.emits) or "nothing"
                    raise EmitError(
                        f"{handler.name} emitted {type(event).event_type()!r} but declares {declared}; "
                        "add it to the return annotation or emits=[...]"
                    )
                messages.append(output_message(event, cause, handler.id_suffix(index), self.service.source, subject))
            return messages
        except EmitError:
            raise
        except Exception as exc:  # e.g. a field pydantic cannot serialise: the same on every run
            raise EmitError(f"{handler.name} emitted an event that cannot be encoded as JSON: "
                            f"{type(exc).__name__}: {exc}") from exc

    async def _failed(self, call: _Call, exc: BaseException) -> _Outcome:
        """A failed attempt: retry by the handler's policy, or dead-letter once it gives up."""
        delivery, envelope, handler, now = call.delivery, call.envelope, call.handler, call.now
        error = ErrorInfo.from_exception(exc)
        first_error, first_at = await self.store.record_failure(self.group, envelope.id, error, now)
        give_up = handler.retry.give_up(delivery.attempt, age=now - first_at)
        if give_up is not None:
            return self._dead(delivery, envelope, give_up, handler, error, now, first=(first_error, first_at))
        after = exc.after if isinstance(exc, Retry) and exc.after is not None else None
        if after is None:
            after = handler.retry.backoff(delivery.attempt, self.worker.rng)
        self.stats.retried += 1
        log.warning(
            "%s.%s failed on %s (attempt %d), retrying in %.2fs: %s: %s",
            self.service.name, handler.name, envelope.id, delivery.attempt, after, error.type, error.message,
        )
        return _Again(delivery, after)

    def _dead(
        self,
        delivery: Delivery,
        envelope: Envelope | None,
        reason: DeadLetterReason,
        handler: Handler | None,
        error: ErrorInfo,
        now: float,
        raw: Any = None,
        *,
        first: tuple[ErrorInfo, float] | None = None,
        publish_failure: bool = True,
    ) -> _Dead:
        first_error, first_at = first or (error, now)
        record = dead_letter_record(
            reason=reason, service=self.service.name, handler=handler.name if handler else None, group=self.group,
            attempts=delivery.attempt, first_error=first_error, last_error=error, first_attempt_at=first_at,
            last_attempt_at=now, envelope=raw if envelope is None else original_envelope(delivery.message.body),
        )
        failure = None
        if envelope is not None and publish_failure and handler is not None:
            failure = to_message(failure_envelope(envelope, record, service=self.service.name,
                                                  handler=handler.name, source=self.service.source))
        self.stats.dead_lettered += 1
        log.error(
            "dead-lettering %s in %s: %s after %d attempt(s): %s: %s",
            delivery.message.id, self.group, reason, delivery.attempt, error.type, error.message,
        )
        return _Dead(delivery, record, failure)

    # -- settling ---------------------------------------------------------------------

    async def _settle_loop(self) -> None:
        """Settle outcomes in batches, two stages deep: while batch N is recorded in the inbox
        and acked (by the finisher), the outputs of batch N+1 are already being published.
        Each batch's outputs are durable before its own marks and acks."""
        finisher = asyncio.create_task(self._finish_loop(), name=f"choreograph-finish-{self.group}")
        try:
            while True:
                if not self.outcomes:
                    # Checked before every wait, not only after an empty wake-up: once stopping,
                    # nobody sets outcome_ready again after the last batch is settled.
                    if self.stopping and not self.active and self.lane is None:
                        break
                    self.outcome_ready.clear()
                    self.settle_waiting = True
                    try:
                        await self.outcome_ready.wait()
                    finally:
                        self.settle_waiting = False
                    continue
                batch, self.outcomes = self.outcomes, []
                self.slot_free.set()  # room in hand for the fetch loop (see max_unsettled)
                plan = _Settlement.of(batch)
                if plan.messages and not await self._retrying(
                        batch, functools.partial(self.worker.transport.publish, plan.messages)):
                    continue  # unpublished: nothing of the batch may be marked or acked
                # Not past a finisher that is still marking and acking: a copy (deferred, or a
                # duplicate) has no id in hand, so only outcomes this loop has not taken count
                # for it against the bound on deliveries in hand - without this wait a stalled
                # mark or ack let the fetch loop take every copy the broker had.
                while self.finishing:
                    self.finished.clear()
                    await self.finished.wait()
                self._published(batch, plan)
            self.settle_ended = True
            self.finish_due.set()
            await finisher
        finally:
            finisher.cancel()  # a no-op once it ended; else it must not outlive this loop

    def _published(self, batch: Sequence[_Outcome], plan: _Settlement) -> None:
        """Hand ``batch``, its outputs published, to the finisher."""
        self.published.append((batch, plan))
        self.unfinished += len(batch)
        # An idle finisher starts its delay now; a busy one finishes this too when it is done.
        # Past half the bound on deliveries in hand, at once: the fetch loop needs the room.
        if self.finisher_idle or self.unfinished * 2 >= self.max_unsettled:
            self.finish_due.set()

    async def _finish_loop(self) -> None:
        """Mark and ack what the settle loop and the lane published, ``ack_delay`` after the
        first of it was published: everything published meanwhile goes in the same inbox
        commit and the same ack call. One finish at a time; once the worker is stopping there
        is no delay (the settle loop's end cuts one short)."""
        loop = self.loop
        while True:
            if not self.published:
                if self.settle_ended:
                    return
                self.finish_due.clear()
                self.finisher_idle = True
                try:
                    await self.finish_due.wait()
                finally:
                    self.finisher_idle = False
                continue
            # Never wait a good part of the lease: the touch loop only reaches what stays a tick.
            delay = min(self.worker.ack_delay, self.worker.transport.lease / 4)
            if delay > 0 and not self.stopping and self.unfinished * 2 < self.max_unsettled:
                self.finish_due.clear()
                timer = loop.call_later(delay, self.finish_due.set)
                try:
                    await self.finish_due.wait()
                finally:
                    timer.cancel()
            batches, self.published, self.unfinished = self.published, [], 0
            if len(batches) == 1:
                outcomes, plan = batches[0]
            else:
                outcomes = [outcome for batch, _ in batches for outcome in batch]
                plan = _Settlement.joined([plan for _, plan in batches])
            self.finishing = True
            try:
                await self._retrying(outcomes, functools.partial(self._finish, plan))
            finally:
                self.finishing = False
                self.finished.set()

    async def _retrying(self, outcomes: Sequence[_Outcome], step: Callable[[], Awaitable[None]]) -> bool:
        """Run ``step`` until it succeeds (True). False if the transport was closed under the
        worker: that never heals, so the outcomes are left unsettled - their ids no longer in
        flight, or a copy handed on would be deferred for ever - and the broker hands their
        deliveries on after the lease (the handler runs again unless the inbox mark landed)."""
        delay = 0.05
        while True:
            try:
                await step()
                return True
            except TransportClosed as exc:
                log.error("cannot settle %s of %s: %s; they come back after their lease",
                          _describe(outcomes), self.group, exc)
                for outcome in outcomes:
                    self._release_id(outcome.delivery)
                return False
            except Exception as exc:  # broker or store down: keep the outcomes, try again
                log.error("settling %s of %s failed: %s; retrying in %.2fs",
                          _describe(outcomes), self.group, exc, delay)
                await backoff(self.worker.clock, delay)
                delay = min(delay * 2, 5.0)

    async def _finish(self, plan: _Settlement) -> None:
        """After the batch's outputs are published: inbox marks, acks, retries and dead letters."""
        assert self.sub is not None
        if plan.marks:
            await self.store.mark(self.group, plan.marks)
        dead = [o.delivery.message.id for o in plan.others if isinstance(o, _Dead)]
        if dead:
            await self.store.clear_failures(self.group, dead)
        if plan.done:
            await self.sub.ack_many(plan.done)
            active_ids = self.active_ids
            for delivery in plan.done:
                if active_ids.get(delivery.message.id) is delivery:
                    del active_ids[delivery.message.id]
            self.slot_free.set()
        for outcome in plan.others:
            self._release_id(outcome.delivery)  # before the copy can come back
            if isinstance(outcome, _Again):
                await outcome.delivery.retry(outcome.after)
            else:
                await outcome.delivery.dead_letter(outcome.record)

    # -- stopping ---------------------------------------------------------------------

    async def stop(self, drain_timeout: float) -> None:
        self.stopping = True
        self.slot_free.set()
        fetch, settle, touch = self.tasks
        touch.cancel()
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.fetching:
            fetch.cancel()
        loop = asyncio.get_running_loop()
        drained_by = loop.time() + drain_timeout
        if self.lane is not fetch:  # the fetch loop in the lane is settle work: it gets the grace below
            await asyncio.wait([fetch], timeout=drain_timeout)  # a client ignoring cancellation must not hang us
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
        await asyncio.gather(settle, touch, *([self.watchdog] if self.watchdog else []), *([lane] if lane else []),
                             return_exceptions=True)
        if self.sub is not None:
            try:
                async with asyncio.timeout(max(1.0, grace_by - loop.time())):
                    await self.sub.close()
            except TimeoutError:
                log.warning("%s: closing the subscription timed out; unsettled deliveries return after their lease",
                            self.group)


@dataclasses.dataclass(slots=True)
class _Settlement:
    """A batch of outcomes sorted for settling: what to publish, mark, ack, retry or dead-letter."""

    messages: list[Message]
    done: list[Delivery]
    marks: list[str]
    others: list[_Again | _Dead]

    @classmethod
    def of(cls, batch: Sequence[_Outcome]) -> _Settlement:
        plan = cls([], [], [], [])
        for outcome in batch:  # one pass: this runs for every event
            if type(outcome) is _Done:
                delivery = outcome.delivery
                plan.done.append(delivery)
                if outcome.mark:
                    plan.marks.append(delivery.message.id)
                if outcome.messages:
                    plan.messages.extend(outcome.messages)
            else:
                assert isinstance(outcome, (_Again, _Dead))
                plan.others.append(outcome)
                if isinstance(outcome, _Dead) and outcome.failure is not None:
                    plan.messages.append(outcome.failure)
        return plan

    @classmethod
    def joined(cls, plans: Sequence[_Settlement]) -> _Settlement:
        """The marks, acks and the rest of ``plans`` (published already) as one."""
        out = cls([], [], [], [])
        for plan in plans:
            out.done += plan.done
            out.marks += plan.marks
            out.others += plan.others
        return out


def _describe(outcomes: Sequence[_Outcome], show: int = 3) -> str:
    """``outcomes`` for a log line: how many, and the first event ids (to grep for)."""
    ids = [outcome.delivery.message.id for outcome in outcomes[:show]]
    more = f" and {len(outcomes) - show} more" if len(outcomes) > show else ""
    noun = "outcome" if len(outcomes) == 1 else "outcomes"
    return f"{len(outcomes)} {noun} (event {', '.join(ids)}{more})"


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


class Worker:
    """Runs one or more services against a transport until stopped.

    >>> async with Worker([payments], open_transport("sqlite:///var/bus.db")) as worker:  # doctest: +SKIP
    ...     await worker.wait()

    ``concurrency`` bounds the handlers running at once per service. The inbox store
    defaults to an in-memory one; give a durable store (``SQLiteStore``) for
    deduplication across restarts. ``joins`` keeps the arrivals of joins and
    compensations; by default they live in the inbox's database (the same SQLite file;
    in memory for an in-memory inbox), so they survive restarts when the inbox does.

    ``telemetry`` (a :class:`~choreograph.telemetry.Telemetry`) adds a span per handler
    attempt and Prometheus metrics. Without it the worker runs the uninstrumented path:
    the choice is made here, once, not per event.
    """

    def __init__(
        self,
        services: Sequence[Service],
        transport: Transport,
        *,
        store: InboxStore | None = None,
        joins: JoinStore | None = None,
        concurrency: int = 64,
        clock: Clock | None = None,
        max_hops: int = DEFAULT_MAX_HOPS,
        drain_timeout: float = 10.0,
        poll_interval: float = 0.25,
        ack_delay: float = DEFAULT_ACK_DELAY,
        rng: Any = None,
        retention: float | None = DEFAULT_RETENTION,
        telemetry: Telemetry | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency: must be >= 1")
        if not 0 <= ack_delay <= 1:
            raise ValueError("ack_delay: must be between 0 and 1 second")
        if not drain_timeout >= 0:  # NaN too
            raise ValueError(f"drain_timeout: must be >= 0 seconds, got {drain_timeout!r}")
        self.services = list(services)
        self.transport = transport
        self.store = store or MemoryStore()
        self.joins = joins or join_store_beside(self.store.url)
        self._owns_joins = joins is None
        self.concurrency = concurrency
        self.clock = clock or getattr(transport, "clock", None) or SYSTEM_CLOCK
        self.max_hops = max_hops
        self.drain_timeout = drain_timeout
        self.poll_interval = poll_interval
        self.ack_delay = ack_delay
        self.rng = rng
        self.retention = retention
        self._housekeeping: asyncio.Task[None] | None = None
        self.outbox = Outboxes(self.services, transport)  # service databases and their outbox relays
        self.telemetry = telemetry
        runner: type[_Runner] = _Runner
        if telemetry is not None:
            from choreograph.runtime._instrumented import InstrumentedRunner

            runner = InstrumentedRunner
        self.runners = [runner(self, service) for service in self.services]
        self._stopped = asyncio.Event()
        self._started = False

    def stats(self, service: str | None = None) -> Stats:
        """Counters of one service (or the sum over all)."""
        runners = [r for r in self.runners if service is None or r.service.name == service]
        total = Stats()
        for runner in runners:
            for field in dataclasses.fields(Stats):
                setattr(total, field.name, getattr(total, field.name) + getattr(runner.stats, field.name))
        return total

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.transport.connect()
        await self.store.open()
        await self.outbox.start()
        await self.joins.open()
        for runner in self.runners:
            await runner.start()
        log.debug("worker started: %s; concurrency %d, ack delay %g s", ", ".join(s.name for s in self.services),
                  self.concurrency, self.ack_delay)
        if self.retention is not None:
            await self._expire_pass()  # at start, before any delivery; then every retention / 10
            self._housekeeping = asyncio.create_task(self._expire_loop(self.retention), name="choreograph-expire")

    async def expire(self) -> int:
        """Forget inbox entries and join instances older than ``retention``; returns how many."""
        if self.retention is None:
            return 0
        older_than = self.clock.time() - self.retention
        stores = {id(r.store): r.store for r in self.runners} | {id(self.store): self.store}
        dropped = 0
        for store in stores.values():
            dropped += await store.expire(older_than)
        return dropped + await self.joins.expire(older_than)

    async def _expire_pass(self) -> None:
        try:
            dropped = await self.expire()
            if dropped:
                log.info("expired %d inbox entries and join instances older than %.0fs", dropped, self.retention)
        except Exception as exc:  # housekeeping must never stop the worker
            log.warning("expiring old inbox entries failed: %s", exc)

    async def _expire_loop(self, retention: float) -> None:
        while True:
            await asyncio.sleep(min(retention / 10, 3600.0))
            await self._expire_pass()

    async def wait(self) -> None:
        """Until ``stop()`` is called."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Drain or release in-flight work, settle it, and close the subscriptions."""
        if self._stopped.is_set():
            return
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        await asyncio.gather(*(runner.stop(self.drain_timeout) for runner in self.runners))
        if self._owns_joins:
            await self.joins.close()
        await self.outbox.stop()
        self._stopped.set()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
