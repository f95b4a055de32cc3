"""How the worker settles outcomes: :class:`Settling`, a mixin of the worker's runner (``_runner``).

The settle loop publishes the outputs of every outcome that piled up in one call, then hands
the batch to the finisher, which marks and acks it ``ack_delay`` later together with
whatever else was published meanwhile (see :mod:`choreograph.runtime.worker`); a lone
success at a light load takes the lane instead (its handler's task, or the fetch loop,
publishes it). Every step is retried until it succeeds, or until the transport is closed.
A batch is sorted for that once (:class:`_Settlement`): its outputs, marks, acks and the rest.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from choreograph._clock import backoff
from choreograph.errors import TransportClosed
from choreograph.runtime._outcomes import _Again, _Dead, _Done, _Outcome
from choreograph.stores.base import InboxStore
from choreograph.transports.base import Delivery, Message, Subscription

if TYPE_CHECKING:
    from choreograph.runtime.worker import Worker

log = logging.getLogger("choreograph.worker")  # the worker's: one logger for the user to tune


class Settling:
    """The settle loop, the lane and the finisher of one service (a mixin of the runner,
    whose state it shares; see the module's docstring)."""

    if not TYPE_CHECKING:  # the runner's slots hold the state (mypy would check assignments against ())
        __slots__ = ()

    worker: Worker
    group: str
    loop: asyncio.AbstractEventLoop
    sub: Subscription | None
    store: InboxStore
    stopping: bool
    active: dict[asyncio.Task[None], Delivery]
    active_ids: dict[str, Delivery]
    max_unsettled: int
    slot_free: asyncio.Event
    outcomes: list[_Outcome]
    outcome_ready: asyncio.Event
    settle_waiting: bool
    lane: asyncio.Task[Any] | None
    published: list[tuple[Sequence[_Outcome], _Settlement]]
    unfinished: int
    finish_due: asyncio.Event
    finisher_idle: bool
    finishing: bool
    finished: asyncio.Event
    settle_ended: bool

    @abc.abstractmethod
    def _release_id(self, delivery: Delivery) -> None:
        """Forget ``delivery``'s id as in hand (the runner's)."""

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
                if outcome.deferred:
                    await outcome.delivery.defer(outcome.after)
                else:
                    await outcome.delivery.retry(outcome.after)
            else:
                await outcome.delivery.dead_letter(outcome.record)


# Defined where its methods are called per batch: on CPython 3.11 ``_Settlement.of(...)`` on an
# imported name compiles to a plain attribute load, which is not specialised on a class.
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
