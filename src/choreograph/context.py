"""The handler context: who am I handling, on which attempt, and a way to publish more.

Inside a handler the context is also reachable without passing it around, through
:func:`current_context` (a ``contextvars`` variable), so helper functions and log
records see the correlation and causation ids of the event being handled.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from choreograph._envelope import Envelope

if TYPE_CHECKING:
    from choreograph.events import Event

_CURRENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar("choreograph_context", default=None)

_log = logging.getLogger("choreograph.handler")


@dataclasses.dataclass(slots=True)
class Context:
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
    outputs: list[tuple[Event, str | None]] = dataclasses.field(default_factory=list)

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
        """A logger whose records carry service, handler, event, correlation and attempt."""
        return logging.LoggerAdapter(
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
        """
        self.outputs.append((event, subject))


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
