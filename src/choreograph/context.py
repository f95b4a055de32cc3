"""The handler context: who am I handling, on which attempt, and a way to publish more.

Inside a handler the context is also reachable without passing it around, through
:func:`current_context` (a ``contextvars`` variable), so helper functions and log
records see the correlation and causation ids of the event being handled.
"""

from __future__ import annotations

import contextvars
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from choreograph._clock import SYSTEM_CLOCK
from choreograph._envelope import Envelope, string_problem
from choreograph.errors import EmitError
from choreograph.events import Event

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from choreograph._clock import Clock
    from choreograph.runtime.outbox import HandlerUnit
    from choreograph.stores.state import Transaction

_CURRENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar("choreograph_context", default=None)

_log = logging.getLogger("choreograph.handler")


class Context(msgspec.Struct):
    """What a handler knows about the delivery it is handling.

    >>> @service.on(OrderPlaced)                       # doctest: +SKIP
    ... async def charge(order: OrderPlaced, ctx: Context) -> PaymentCaptured:
    ...     ctx.logger.info("charging", extra={"amount": order.amount})
    ...     return PaymentCaptured(order_id=order.order_id)
    """

    envelope: Envelope
    service: str
    handler: str
    attempt: int
    outputs: list[tuple[Event, str | None]] = msgspec.field(default_factory=list)
    _sealed: bool = False  # set when the handler has finished: publish() then raises
    _unit: HandlerUnit | None = None  # set by the worker for a service with a database
    _clock: Clock | None = None  # set by the worker when it runs on a clock other than the real one

    @property
    def clock(self) -> Clock:
        """The worker's clock: the real one, or a test's :class:`~choreograph.testing.VirtualClock`.

        The handler's timeout is measured on it (on a virtual clock, real time too), and an
        injected hang (:mod:`choreograph.faults`) waits on it, so that a test in virtual time
        sees a hang and its timeout pass at once. ``ctx.clock.time()`` is the time a test sees.
        """
        return self._clock or SYSTEM_CLOCK

    @property
    def event_id(self) -> str:
        return self.envelope.id

    @property
    def correlation_id(self) -> str:
        """The business transaction this event belongs to (the first event's id if unset)."""
        return self.envelope.correlationid or self.envelope.id

    @property
    def causation_id(self) -> str | None:
        """The id of the event that caused this one (``None`` for the first event)."""
        return self.envelope.causationid

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry service, handler, event, correlation and attempt
        (and whatever ``extra=`` a call adds: see :mod:`choreograph.logs` for JSON lines)."""
        return _HandlerLogger(
            _log,
            {
                "service": self.service,
                "handler": self.handler,
                "event_id": self.event_id,
                "event_type": self.envelope.type,
                "correlation_id": self.correlation_id,
                "causation_id": self.causation_id,
                "attempt": self.attempt,
            },
        )

    def publish(self, event: Event, *, subject: str | None = None) -> None:
        """Emit ``event`` in addition to the handler's return value.

        It is published with the handler's outputs, before the input is acked, with
        a deterministic id; the type must be declared in the handler's ``emits``.
        Calling it with something other than an event, a subject that is not a non-empty
        string or holds what a CloudEvents String must not (a control character, a surrogate,
        a Unicode noncharacter), or after the handler has returned raises
        :class:`~choreograph.EmitError`: the delivery is rejected (dead-lettered) with its message.
        """
        if not isinstance(event, Event):
            raise EmitError(f"{self.handler}: publish() takes an Event, got {type(event).__name__}")
        if subject is not None:
            if not isinstance(subject, str) or not subject:
                raise EmitError(f"{self.handler}: publish(subject=...): expected a non-empty string, got {subject!r}")
            problem = string_problem(subject)
            if problem is not None:
                raise EmitError(f"{self.handler}: publish(subject=...): {subject!r} {problem}")
        if self._sealed:
            raise EmitError(f"{self.handler}: publish() after the handler returned: {type(event).event_type()!r} "
                            f"for event {self.envelope.id} would be lost; publish before returning")
        self.outputs.append((event, subject))

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """The service database's transaction for this handler run (``Service(..., database=...)``).

        >>> async with ctx.transaction() as tx:                    # doctest: +SKIP
        ...     await tx.execute("INSERT INTO packages (id) VALUES ($1)", req.id)

        It commits when the handler returns, together with the event's inbox record
        and every event the handler emits (returned or published), which then go out
        through the outbox: all or nothing. See :mod:`choreograph.runtime.outbox`.
        """
        if self._unit is None:
            from choreograph.errors import ConfigurationError

            raise ConfigurationError(
                f"Service {self.service!r} has no database: Service({self.service!r}, database='sqlite:///...')"
            )
        return self._unit.block()


#: Names a LogRecord already has: an ``extra=`` key among them would make logging raise.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _HandlerLogger(logging.LoggerAdapter[logging.Logger]):
    """Merges a call's ``extra=`` with the handler's fields (the stock adapter drops the call's).

    A key that names a LogRecord attribute (``filename``, ``name``...) is kept as
    ``extra_<key>`` (logging raises on such a key: a log line must not fail a handler);
    the handler's own fields win over the caller's.
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = kwargs.get("extra")
        if extra:
            merged = {f"extra_{k}" if k in _RECORD_FIELDS else k: v for k, v in extra.items()}
            merged.update(self.extra or {})
            kwargs["extra"] = merged
        else:
            kwargs["extra"] = self.extra
        return msg, kwargs


def current_context() -> Context | None:
    """The context of the handler running in this task, or ``None`` outside handlers."""
    return _CURRENT.get()


def _set_current(ctx: Context | None) -> contextvars.Token[Context | None]:
    return _CURRENT.set(ctx)


def log_fields() -> dict[str, Any]:
    """Correlation fields of the current handler, for structured loggers (empty outside)."""
    ctx = _CURRENT.get()
    if ctx is None:
        return {}
    return {"correlation_id": ctx.correlation_id, "causation_id": ctx.causation_id, "event_id": ctx.event_id}
