"""Scenario tests: given these events, expect these events, compensations and dead letters.

>>> async with Scenario(app) as s:                                             # doctest: +SKIP
...     await s.given(OrderPlaced(order_id="o-1", customer="bob", sku="widget", qty=1, amount=50_00))
...     s.expect(PaymentDeclined, StockReserved, StockReleased, OrderCancelled)
...     s.expect_compensated(StockReserved)
...     s.expect_not(OrderShipped, PaymentRefunded)

A scenario runs the services in this process as in production, on a private memory bus,
with a :class:`~choreograph.testing.VirtualClock`, a :class:`~choreograph.Worker` and the
journal (which announces transaction deadlines). Services with ``database=`` run on a
fresh SQLite file each (their outbox relays included), so their state changes are real.

Time moves only on purpose. ``given()`` runs until nothing is left to do, jumping the
clock to whatever waits on the bus (a retry's backoff, a join's ``within=`` timer):
the eventual outcome, in microseconds. ``given(..., within=s)`` and ``advance(s)`` let
at most ``s`` virtual seconds pass, to observe the moments before and after a timeout.
The clock never jumps just to reach a transaction deadline, but a deadline passed on
the way is announced at its time, as the journal would.

Expectations look at the transactions the latest ``given()`` started. A failed one
raises ``AssertionError`` listing what was emitted, in order (time, event, who emitted
it, id, cause), and the dead letters: the failure says why, not only what.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import NoReturn, TypeVar

from choreograph._envelope import Envelope, decode
from choreograph._scenario_log import (
    Emitted,
    EventLog,
    Expected,
    correlation_of,
    failure_record,
    found_in_order,
    matches,
    missing,
    name_of,
    names,
    short,
)
from choreograph._virtual_time import VirtualClock, _quiesce
from choreograph.errors import ConfigurationError, MalformedEnvelope
from choreograph.events import Event
from choreograph.journal import Journal, Status
from choreograph.runtime.publisher import Publisher
from choreograph.runtime.worker import Worker
from choreograph.service import App, Service
from choreograph.transports.base import DeadLetter, Subscription
from choreograph.transports.memory import MemoryTransport

E = TypeVar("E", bound=Event)

#: The recorder's consumer group (every type), and the source of the events ``given()`` publishes.
RECORDER_GROUP = "choreograph.scenario"
GIVEN_SOURCE = "/choreograph/scenario"
#: How far past a transaction deadline the clock lands, so the journal sees it passed (float rounding).
_PAST = 1e-6


class Scenario:
    """Run ``system`` (an :class:`~choreograph.App` or a list of services) in one process, in virtual time.

    >>> async with Scenario([payment, shipping]) as s:                     # doctest: +SKIP
    ...     await s.given(OrderPlaced(order_id="o-1", amount=30))
    ...     s.expect(PaymentCaptured, OrderShipped)

    ``clock`` defaults to a fresh :class:`~choreograph.testing.VirtualClock`. The services
    with ``database=`` run on ``<data_dir>/<service>.db`` (a temporary directory, removed
    at exit, unless ``data_dir`` is given), or on the URL ``databases`` maps their name to;
    the :class:`~choreograph.Service` objects passed in are not changed (the scenario runs
    copies of those). ``timeout`` bounds, in real seconds, how long one ``given()`` or
    ``advance()`` may take to settle.
    """

    def __init__(
        self,
        system: App | Sequence[Service],
        *,
        clock: VirtualClock | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        databases: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not timeout >= 0:  # NaN: never past it, so a run that never settles hung the test
            raise ValueError(f"timeout: real seconds, not negative, got {timeout!r}")
        originals = list(system.services if isinstance(system, App) else system)
        unknown = sorted(set(databases or {}) - {s.name for s in originals if s.database})
        if unknown:
            raise ConfigurationError(
                f"Scenario: databases= names {unknown}, which are not services with a database= here"
            )
        self.clock = clock or VirtualClock()
        self.bus = MemoryTransport(clock=self.clock)
        self._own_dir = data_dir is None
        self.data_dir: Path | None = None if data_dir is None else Path(data_dir)
        self.services = [self._isolated(service, databases or {}) for service in originals]
        self.timeout = timeout
        self.worker = Worker(self.services, self.bus)
        self.journal = (
            Journal.from_app(system, "memory://", transport=self.bus) if isinstance(system, App)
            else Journal("memory://", transport=self.bus)
        )
        self._publisher = Publisher(self.bus, source=GIVEN_SOURCE)
        self._log = EventLog(self.services, given_source=GIVEN_SOURCE, journal_source=self.journal.source)
        self._scope: tuple[str, ...] = ()
        self._letters: list[tuple[DeadLetter, str | None]] = []  # (letter, its correlation id)
        self._recorder: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._start = self.clock.monotonic()
        self._entered = False
        self._ended = False
        self._worker_started = False

    def _isolated(self, service: Service, databases: Mapping[str, str]) -> Service:
        if not service.database:
            return service
        url = databases.get(service.name)
        if url is None:
            if self.data_dir is None:  # created on entry, removed on exit
                self.data_dir = Path(tempfile.gettempdir()) / f"choreograph-scenario-{uuid.uuid4().hex[:12]}"
            url = f"sqlite:///{self.data_dir.resolve() / service.name}.db"
        twin = copy.copy(service)
        twin.database = url
        return twin

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Scenario:
        if self._entered:
            raise RuntimeError("a Scenario runs once: make a new one")
        self._entered = True
        self.clock._own()  # a clock another running loop uses: say so now
        try:
            if self.data_dir is not None:
                self.data_dir.mkdir(parents=True, exist_ok=True)
            await self.bus.connect()
            await self.journal.open()
            # subscribed before the worker starts, so the recorder sees every event
            self._subscription = await self.bus.subscribe(RECORDER_GROUP, None)
            self._recorder = asyncio.create_task(self._record(self._subscription), name="choreograph-scenario")
            self._worker_started = True
            await self.worker.start()
        except BaseException:
            with contextlib.suppress(Exception):  # the error that matters is the one being raised
                await self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _close(self) -> None:
        self._ended = True
        try:
            if self._worker_started:
                await self.worker.stop()
        finally:
            if self._recorder is not None:
                self._recorder.cancel()
                await asyncio.gather(self._recorder, return_exceptions=True)
            if self._subscription is not None:
                await self._subscription.close()
            await self.journal.close()
            await self.bus.close()
            if self._own_dir and self.data_dir is not None:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    async def _record(self, subscription: Subscription) -> None:
        while True:
            batch = await subscription.fetch(256)
            fresh = []
            for delivery in batch:
                try:
                    envelope = decode(delivery.message.body)
                except MalformedEnvelope:
                    continue  # never from given(): only a hand-made message on self.bus
                if self._log.add(envelope, self.clock.monotonic() - self._start):
                    fresh.append(envelope)
            if fresh:
                await self.journal.record(fresh)
            await subscription.ack_many(batch)

    # -- driving --------------------------------------------------------------------------

    async def given(
        self,
        *events: Event,
        correlation_id: str | None = None,
        deadline: str | float | timedelta | datetime | None = None,
        subject: str | None = None,
        within: float | None = None,
    ) -> list[Envelope]:
        """Publish ``events`` and run until nothing is left to do (at most ``within`` virtual seconds).

        Each event starts its own transaction unless ``correlation_id`` is given;
        ``deadline`` is the transaction deadline (as in :meth:`~choreograph.Publisher.publish`).
        From now on the expectations look at these transactions. Returns the envelopes.
        """
        self._check_running("given")
        if not events:
            raise ValueError("given(): name at least one event")
        if within is not None:  # NaN: the run never reached its end; inf: the clock read inf
            self.clock.check_move(within, "within")
        self._log.learn(type(event) for event in events)
        envelopes = await self._publisher.publish(
            *events, correlation_id=correlation_id, deadline=deadline, subject=subject
        )
        self._scope = tuple(dict.fromkeys(env.correlationid or env.id for env in envelopes))
        await self._run(None if within is None else self.clock.monotonic() + within)
        return envelopes

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, running whatever falls due (join timers, deadlines, retries)."""
        self._check_running("advance")
        self.clock.check_move(seconds)  # NaN: the run never reached its end; inf: the clock read inf
        await self._run(self.clock.monotonic() + seconds)

    def _check_running(self, what: str) -> None:
        """Before its ``async with`` block nothing runs (``advance()`` moved the clock with no worker,
        in silence); after it, the recorder is cancelled (``CancelledError`` came out of its result)."""
        if not self._entered:
            raise RuntimeError(f"use the scenario as `async with Scenario(...) as s:` before {what}()")
        if self._ended:
            raise RuntimeError(f"{what}(): the scenario has ended (its `async with` block was left); "
                               "its expectations still look at its last run; make a new Scenario to run again")

    async def _run(self, until: float | None) -> None:
        """Settle; move the clock to the next thing due on the bus (never past ``until``, stopping at
        any transaction deadline on the way); repeat until nothing waits or ``until`` is reached."""
        clock = self.clock
        give_up = asyncio.get_running_loop().time() + self.timeout
        stalled = 0
        while True:
            await self._quiet(give_up, until)
            if await self.journal.check_deadlines():
                continue  # the timeouts it published run first
            now = clock.monotonic()
            count, due = self.bus.pending()
            if self._held_past(until):
                break  # what is in flight waits on the clock past ``until`` (see _quiet)
            if count or (due is not None and due <= now):
                # Arrived meanwhile, or due but not taken: its consumer may sleep on a timer it set
                # just after the last jump (as settled() does, that timer is then the next stop).
                stalled += 1
                wake = clock.next_due()
                if (not count and stalled > 3 and wake is not None and (until is None or wake <= until)
                        and not clock.busy()):
                    clock.advance(max(0.0, wake - now))
                else:
                    await self._pause(give_up, until)
                continue
            stalled = 0
            if (until is not None and now >= until) or (until is None and due is None):
                break
            if clock.busy():  # a handler at work for another bus on this clock (see settled())
                await self._pause(give_up, until)
                continue
            target = min(t for t in (due, until) if t is not None)
            deadline = await self._next_deadline()
            if deadline is not None and now + deadline + _PAST < target:
                clock.advance(deadline + _PAST)
            else:
                clock.advance(target - now)
        self._letters = [(letter, correlation_of(letter)) for letter in await self.bus.dead_letters(None, 1_000_000)]

    async def _quiet(self, give_up: float, until: float | None) -> None:
        """Until nothing is ready or in flight, no outbox row is unsent, and nothing moved meanwhile;
        or, the clock at ``until``, until what is in flight only waits on it past ``until``."""
        while True:
            if self._recorder is not None and self._recorder.done():
                self._recorder.result()  # a crashed recorder: raise its error rather than hang
                raise RuntimeError("the scenario's recorder stopped")
            await _quiesce()
            if self.bus.pending()[0] == 0 and not await self._unsent():
                before = self._progress()
                await _quiesce()
                if self.bus.pending()[0] == 0 and self._progress() == before:
                    return
            elif self._held_past(until):
                # A handler hangs (an injected hang) or the runtime backs off beyond ``until``:
                # the time asked for has passed, with it still in flight, as it would be then.
                before = self._progress()
                await _quiesce()
                if self._held_past(until) and self._progress() == before:
                    return
            await self._pause(give_up, until)

    async def _only_waits(self) -> bool:
        """What is in flight only waits on the clock: no handler runs that is not in a backoff (a
        fault's hang), no outbox row is unsent, nothing moved meanwhile. A jump
        of the clock before made the work still under way look as if it took the jump (its events
        were stamped with the later time, and a handler could time out on it)."""
        before = self._progress()
        await _quiesce()
        return not self.clock.busy() and not await self._unsent() and self._progress() == before

    def _held_past(self, until: float | None) -> bool:
        """The clock is at ``until`` and a backoff (or a fault's hang) runs beyond it."""
        backoff = self.clock.backoff_due()
        return (until is not None and self.clock.monotonic() >= until and backoff is not None and backoff > until
                and not self.clock.busy())

    async def _pause(self, give_up: float, until: float | None) -> None:
        if asyncio.get_running_loop().time() > give_up:
            count, due = self.bus.pending()
            retry = "none" if due is None else f"in {due - self.clock.monotonic():.3f}s"
            # its dead letters so far too (the listing said "dead letters: none" whatever there was)
            letters = [letter for letter in await self.bus.dead_letters(None, 1_000_000)
                       if correlation_of(letter) in self._scope]
            raise TimeoutError(
                f"the scenario did not settle within {self.timeout}s (real time): {count} events ready or "
                f"in flight, {await self._unsent()} unsent in outboxes, next retry due: {retry}\n"
                + self._log.listing(self._scope, letters)
            )
        clock = self.clock
        wake = clock.next_due() if clock.backoff_due() is not None and await self._only_waits() else None
        if wake is not None and until is not None and wake > until > clock.monotonic():
            wake = until  # the backoff ends later: let the time asked for pass (see _quiet)
        if wake is not None and (until is None or wake <= until):
            # A backoff of the runtime (its store or broker failed) or a fault's hang holds events
            # in flight: it waits on this clock, so move it on (never past ``until``), as settled() does.
            clock.advance(max(0.0, wake - clock.monotonic()))
            return
        await asyncio.sleep(0.001)

    async def _unsent(self) -> int:
        return sum([(await relay.lag()).pending for relay in self.worker.outbox.relays.values()])

    def _progress(self) -> tuple[object, ...]:
        relays = self.worker.outbox.relays.values()
        return (*dataclasses.astuple(self.worker.stats()), *(r.published for r in relays), len(self._log.emitted))

    async def _next_deadline(self) -> float | None:
        """Seconds until the earliest deadline of a running transaction not yet announced."""
        now = self.clock.time()
        waits = []
        for correlation_id in self._log.correlation_ids:
            summary = await self.journal.store.summary(correlation_id)
            if summary is not None and summary.base_status == "running" and not summary.timed_out:
                waits.append(summary.deadline - now)
        return min((w for w in waits if w > 0), default=None)

    # -- what happened --------------------------------------------------------------------

    @property
    def emitted(self) -> list[Emitted]:
        """Every event of the latest ``given()``'s transactions, in publish order (each id once)."""
        return self._log.of(self._scope)

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """Dead letters of the latest ``given()``'s transactions, as of the end of the last run."""
        return [letter for letter, correlation_id in self._letters if correlation_id in self._scope]

    def events(self, cls: type[E]) -> list[E]:
        """The events of type ``cls`` emitted in the latest ``given()``'s transactions, parsed."""
        return [cls.model_validate(e.envelope.data) for e in self.emitted if e.type == cls.event_type()]

    async def status(self) -> Status:
        """The journal's status of the (first) transaction the latest ``given()`` started."""
        self._check_given()
        transaction = await self.journal.transaction(self._scope[0])
        assert transaction is not None  # the recorder recorded its first event
        return transaction.status

    def database_url(self, service: str) -> str:
        """The database the scenario runs ``service`` on (to look at its state)."""
        for candidate in self.services:
            if candidate.name == service and candidate.database:
                return candidate.database
        raise ConfigurationError(f"Scenario: no service {service!r} with a database")

    # -- expectations ---------------------------------------------------------------------

    def expect(self, *events: Expected, ordered: bool = False) -> None:
        """Each of ``events`` was emitted (as often as it is listed; ``ordered``: in this order).

        Names are event classes, ``failed(X)`` (a failure event for an ``X``: a give-up or
        a join timeout) or ``timed_out()``.
        """
        __tracebackhide__ = True
        if not events:  # it passed whatever happened
            raise TypeError("expect(): name the events expected")
        envelopes = [e.envelope for e in self._checked()]
        if ordered:
            found = found_in_order(events, envelopes)
            if found < len(events):
                head = f"found {names(events[:found])} in that order, then" if found else "found"
                self._fail(f"expected, in this order: {names(events)}; {head} no {name_of(events[found])}")
        else:
            absent = missing(events, envelopes)
            if absent:
                self._fail(f"expected {names(events)}; not emitted: {names(absent)}")

    def expect_not(self, *events: Expected) -> None:
        """None of ``events`` was emitted."""
        __tracebackhide__ = True
        if not events:  # it passed whatever happened
            raise TypeError("expect_not(): name the events that must not be emitted")
        found = [e for e in self._checked() if any(matches(expected, e.envelope) for expected in events)]
        if found:
            seen = ", ".join(f"{self._log.label(e.envelope)} (id {short(e.envelope.id)})" for e in found)
            self._fail(f"expected no {names(events)}; emitted: {seen}")

    def expect_compensated(self, *steps: type[Event]) -> None:
        """The compensation of each of ``steps`` ran (``@service.compensate(step, ...)``).

        A compensation is seen by the events it emits: one that emits nothing cannot be
        told from one that did not run; check its effect instead.
        """
        __tracebackhide__ = True
        if not steps:
            raise TypeError("expect_compensated(): name the steps (use expect_not_compensated() for none)")
        emitted = self._checked()
        undone = {e.undoes for e in emitted}
        absent = [step for step in steps if step not in undone]
        if absent:
            gave_up = self._gave_up(emitted)
            why = ", ".join(step.__name__ + "".join(
                f" (its compensation {by} gave up: {reason})" for undid, by, reason in gave_up if undid is step
            ) for step in absent)
            self._fail(f"expected the compensation of {names(steps)}; not compensated: {why}")

    def expect_not_compensated(self, *steps: type[Event]) -> None:
        """No compensation of ``steps`` ran (no steps: no compensation at all), not even one that gave up."""
        __tracebackhide__ = True
        emitted = self._checked()
        seen = [f"{e.undoes.__name__} by {e.service}.{e.handler}" for e in emitted
                if e.undoes is not None and (not steps or e.undoes in steps)]
        seen += [f"{step.__name__} by {by} (gave up: {reason})" for step, by, reason in self._gave_up(emitted)
                 if not steps or step in steps]
        if seen:
            self._fail(f"expected no compensation{' of ' + names(steps) if steps else ''}; "
                       f"compensated: {', '.join(seen)}")

    def _gave_up(self, emitted: list[Emitted]) -> list[tuple[type[Event], str, object]]:
        """(step, service.handler, reason) of each compensation among ``emitted`` that gave up."""
        return [(self._log.gave_up[e.envelope.id], f"{e.service}.{e.handler}", failure_record(e.envelope).get("reason"))
                for e in emitted if e.envelope.id in self._log.gave_up]

    def expect_dead_letter(
        self, event: type[Event] | None = None, *, reason: str | None = None, service: str | None = None
    ) -> DeadLetter:
        """An event (of type ``event``) was dead-lettered (by ``service``, for ``reason``); returns the letter.

        ``reason`` is the record's (``rejected``, ``max_attempts``, ``invalid_payload``, ...).
        """
        __tracebackhide__ = True
        self._checked()
        for letter in self.dead_letters:
            if ((event is None or letter.message.type == event.event_type())
                    and (reason is None or letter.record.get("reason") == reason)
                    and (service is None or letter.group == service)):
                return letter
        wanted = " ".join(part for part in (
            "of " + event.__name__ if event else "", f"by {service}" if service else "",
            f"for {reason!r}" if reason else "") if part)
        self._fail(f"expected a dead letter{' ' + wanted if wanted else ''}")

    def expect_no_dead_letters(self) -> None:
        """Nothing in the latest ``given()``'s transactions was dead-lettered."""
        __tracebackhide__ = True
        self._checked()
        if self.dead_letters:
            self._fail(f"expected no dead letters; found {len(self.dead_letters)}")

    def _check_given(self) -> None:
        if not self._scope:
            raise RuntimeError("nothing to expect yet: call `await s.given(...)` first")

    def _checked(self) -> list[Emitted]:
        self._check_given()
        return self.emitted

    def _fail(self, message: str) -> NoReturn:
        __tracebackhide__ = True
        raise AssertionError(f"{message}\n\n{self._log.listing(self._scope, self.dead_letters)}")
