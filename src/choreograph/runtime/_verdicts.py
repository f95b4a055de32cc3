"""What a delivery comes to: :class:`Verdicts`, a mixin of the worker's runner (``_runner``).

Decoding and validating a delivery into its handler call, or at once into an outcome
(malformed, loop detected, invalid payload, unsubscribed, filtered, ignored); a handler's
return into its output messages, and its raise into a retry or a dead letter (with the
record, and the ``choreograph.failed`` event compensations run on). Each verdict counts
itself in the service's :class:`~choreograph.runtime.worker.Stats`. Where the handler
runs, and when the outcome is settled, is the runner's and the settle loop's.
"""

from __future__ import annotations

import abc
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import pydantic

from choreograph._envelope import Envelope, decode, from_dict
from choreograph.context import Context, current_context
from choreograph.errors import ConfigurationError, EmitError, MalformedEnvelope, Reject, Retry
from choreograph.events import Event
from choreograph.joins import Defer
from choreograph.logs import event_fields
from choreograph.runtime._outcomes import Stats, _Again, _Call, _Dead, _Done, _Outcome
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
from choreograph.sagas import is_rollback
from choreograph.service import FAILED, Failure, Handler, Service
from choreograph.stores.base import ErrorInfo, InboxStore
from choreograph.transports.base import Delivery, Message

if TYPE_CHECKING:
    from choreograph.runtime.worker import Worker

log = logging.getLogger("choreograph.worker")  # the worker's: one logger for the user to tune


#: What a handler raises (or emits) that fails the same way on every attempt: dead-lettered
#: ``rejected`` at once, not retried.
_PERMANENT = (Reject, EmitError, ConfigurationError)


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


class Verdicts:
    """The outcome of a delivery, of its handler's return or of its raise (a mixin of the
    runner, whose state it reads; see the module's docstring)."""

    if not TYPE_CHECKING:  # the runner's slots hold the state (mypy would check assignments against ())
        __slots__ = ()

    worker: Worker
    service: Service
    group: str
    stats: Stats
    store: InboxStore
    handlers: dict[str, Handler]
    handed_back_types: set[str]
    clock_time: Callable[[], float]
    virtual_clock: bool  # the worker's clock is not the real one (a test's VirtualClock)
    has_database: bool

    @abc.abstractmethod
    def _release_id(self, delivery: Delivery) -> None:
        """Forget ``delivery``'s id as in hand (the runner's)."""

    @abc.abstractmethod
    def _waiting(self, delivery: Delivery, waited: float | None) -> None:
        """A handler waits for its database connection, or got it (the runner's)."""

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
        if self.virtual_clock:
            ctx._clock = worker.clock
        unit = None
        if self.has_database:
            ctx._unit = unit = worker.outbox.unit(self.service, ctx)
            if unit is not None:
                unit.on_wait = functools.partial(self._waiting, delivery)
        if handler.join is None:
            # an ``async def`` (checked at registration), so a coroutine (no ``cast()``: a call
            # and a generic alias made per event)
            coro: Coroutine[Any, Any, Any] = (
                handler.func(argument, ctx) if handler.takes_context else handler.func(argument))  # type: ignore[assignment]
        else:  # a join or compensation: records the arrival, calls func once all arrived
            coro = handler.join.run(argument, ctx, worker.joins, worker.clock)
        return _Call(delivery, envelope, handler, ctx, unit, now, coro)

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


    def _returned(self, call: _Call, result: Any) -> _Outcome:
        """The outcome of a handler that returned ``result`` (a service without a database)."""
        try:
            messages = self._outputs(call.handler, call.envelope, _outputs_of(result), call.ctx)
        except EmitError as exc:
            if call.delivery.attempt > 1:
                raise  # earlier attempts failed: the caller settles it by _settle_raised, which keeps their history
            outcome = self._raised(call, exc)
            assert outcome is not None
            return outcome
        self.stats.handled += 1
        return _Done(call.delivery, messages, mark=True)

    def _raised(self, call: _Call, exc: BaseException) -> _Outcome | None:
        """The outcome of a handler that raised ``exc``; ``None`` for a failed attempt (see ``_failed``)."""
        delivery, envelope, handler = call.delivery, call.envelope, call.handler
        if isinstance(exc, Defer):  # a join deadline timer not due yet: not a failure, nor an attempt
            return _Again(delivery, exc.after, deferred=True)
        if isinstance(exc, EmitError):
            exc.event_id, exc.service, exc.handler = envelope.id, self.service.name, handler.name
        if isinstance(exc, _PERMANENT) and delivery.attempt == 1:  # the same on every attempt: no retries
            return self._dead(delivery, envelope, "rejected", handler, ErrorInfo.from_exception(exc), call.now)
        return None  # a permanent error after failed attempts too: _failed keeps their history in the record

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
        """The outcome of a delivery the inbox says was processed already: ack it, run nothing.

        A retry (attempt 2 or more) is marked again, which forgets its copy's failure history:
        another copy committed first, on its first attempt, without looking for any."""
        self.stats.duplicates += 1
        return _Done(delivery, [], mark=delivery.attempt > 1)

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
        # stamped on the worker's clock: a test's VirtualClock's time, not the wall's (None: now)
        stamp = self.clock_time() if self.virtual_clock else None
        try:
            if not ctx.outputs and len(returned) == 1 and type(returned[0]) in handler.emits:  # the common case
                return [output_message(returned[0], cause, handler.id_suffix0, self.service.source, None, stamp)]
            events = [(event, subject) for event, subject in ctx.outputs] + [(event, None) for event in returned]
            messages = []
            for index, (event, subject) in enumerate(events):
                if type(event) not in handler.emits:
                    declared = sorted(cls.event_type() for cls in handler.emits) or "nothing"
                    raise EmitError(
                        f"{handler.name} emitted {type(event).event_type()!r} but declares {declared}; "
                        "add it to the return annotation or emits=[...]"
                    )
                messages.append(output_message(event, cause, handler.id_suffix(index), self.service.source, subject,
                                               stamp))
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
        try:
            first_error, first_at = await self.store.record_failure(self.group, envelope.id, error, now)
        except Exception as store_exc:
            if not isinstance(exc, _PERMANENT):
                raise  # a failed attempt that cannot be recorded comes back after its lease
            # rejected all the same (as it was before the history was looked up for it): only
            # the record's first failure is this attempt's, the history being out of reach
            log.warning("%s: inbox unavailable recording the failure of %s (%s); dead-lettered "
                        "with this attempt's error as its first", self.group, envelope.id, store_exc)
            first_error, first_at = error, now
        after = exc.after if isinstance(exc, Retry) else None
        give_up: DeadLetterReason | None
        if isinstance(exc, _PERMANENT):  # rejected at once, its record with the first failure's error and time
            give_up = "rejected"
        else:
            give_up = handler.retry.give_up(delivery.attempt, age=now - first_at, not_before=after)
        if give_up is not None:
            return self._dead(delivery, envelope, give_up, handler, error, now, first=(first_error, first_at))
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
            compensation=handler is not None and is_rollback(handler),
        )
        failure = None
        if envelope is not None and publish_failure and handler is not None:
            failure = to_message(failure_envelope(envelope, record, service=self.service.name,
                                                  handler=handler.name, source=self.service.source,
                                                  time=self.clock_time() if self.virtual_clock else None))
        self.stats.dead_lettered += 1
        log.error(
            "dead-lettering %s in %s: %s after %d attempt(s): %s: %s",
            delivery.message.id, self.group, reason, delivery.attempt, error.type, error.message,
            extra=None if envelope is None else self._event_fields(envelope, handler, delivery.attempt),
        )
        return _Dead(delivery, record, failure)

    def _event_fields(self, envelope: Envelope, handler: Handler | None, attempt: int) -> dict[str, Any] | None:
        """The handled event's log fields for a line written outside its handler's context: a dead
        letter decided before any handler ran (``loop_detected``, ``invalid_payload``, ``unhandled``)
        must name its transaction as a handler's own lines do (inside one, the context adds them)."""
        if current_context() is not None:
            return None
        return event_fields(envelope, self.service.name, handler.name if handler is not None else None, attempt)
