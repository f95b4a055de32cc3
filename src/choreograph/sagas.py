"""Sagas without an orchestrator: compensations, transaction timeouts and deadlines.

A service that can undo its step says so next to it, naming what triggers the undo::

    @inventory.on(OrderPlaced)
    async def reserve(order: OrderPlaced) -> StockReserved | OutOfStock: ...

    @inventory.compensate(StockReserved, on=[PaymentDeclined, failed(StockReserved), timed_out()])
    async def release(reserved: StockReserved, cause: PaymentDeclined | Failure | TimedOut) -> StockReleased:
        ...

Triggers are business events (``PaymentDeclined``), the runtime's failure events
(``failed(StockReserved)``: a consumer of our step gave up on it, or a join waiting
for it timed out) and transaction timeouts (``timed_out()``: the journal's
``choreograph.timedout``, published once a transaction passes its deadline).

A compensation is a join of two slots, *my step happened* and *one of the triggers
happened*, for one correlation id (see :mod:`choreograph.joins`). So:

* it runs at most once per transaction, however many triggers arrive;
* it runs only if the step happened: a trigger for a transaction in which the
  service did nothing (or emitted another outcome) never runs it;
* order does not matter: in parallel branches a trigger can arrive *before* the
  step it must undo (payment declined while stock is still being reserved); the
  compensation then runs as soon as the step is done;
* the step's data comes from the service's own join store (the service receives its
  own step event for this), not from whatever the trigger happens to carry;
* it is an ordinary handler to the runtime: idempotent (inbox + join store),
  retried by policy, dead-lettered when it gives up, and then announced with a
  ``choreograph.failed`` event whose record names the compensation handler and is marked
  ``"compensation": true``, so the journal marks the transaction ``compensation_failed``
  whichever event completed the join (its own step, a business trigger, a failure or a
  timeout). ``on_failure`` handlers and handlers of ``choreograph.timedout`` are marked
  the same way (:func:`is_rollback`).

Deadlines: ``Publisher.publish(..., deadline=timedelta(seconds=30))`` (or seconds,
a datetime, or RFC 3339 text) puts a ``deadline`` extension on the first event;
every output copies it. :func:`deadline_of` reads it back inside a handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pydantic

from choreograph._envelope import Envelope
from choreograph.errors import ConfigurationError
from choreograph.events import Event, is_event_class
from choreograph.joins import JoinSpec, Route, as_route, install, own_handler
from choreograph.policy import RetryPolicy
from choreograph.service import Handler, Service

__all__ = [
    "TIMEDOUT",
    "TimedOut",
    "deadline_of",
    "deadline_text",
    "failed",
    "install_compensation",
    "is_compensation",
    "is_rollback",
    "timed_out",
]

TIMEDOUT = "choreograph.timedout"
"""The type of the event the journal publishes when a transaction passes its deadline."""


class TimedOut(Event):
    """``choreograph.timedout``: a transaction passed its deadline without a terminal event.

    Published by the journal, once per transaction, with the transaction's correlation
    id. Unknown fields are ignored (not rejected) so the journal may add some.
    """

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)
    __event_type__: ClassVar[str] = TIMEDOUT

    correlation_id: str
    deadline: str
    root_type: str | None = None
    last_type: str | None = None
    last_event_id: str | None = None


def failed(event: type[Event]) -> Route:
    """Trigger: the runtime's ``choreograph.failed`` for an event of type ``event``.

    Some consumer of that event gave up on it, or a join waiting for it timed out
    (record ``reason`` ``join_timeout``). The handler receives a :class:`~choreograph.Failure`.
    """
    if not is_event_class(event):
        raise ConfigurationError(f"failed({event!r}): expected an Event subclass")
    return Route(event, failure=True)


def timed_out() -> Route:
    """Trigger: the transaction passed its deadline (``choreograph.timedout``); the handler receives a :class:`TimedOut`."""
    return Route(TimedOut)


def install_compensation(
    service: Service,
    func: Callable[..., Awaitable[Any]],
    step: type[Event],
    on: Iterable[type[Event] | Route],
    *,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    emits: Iterable[type[Event]] | None = None,
) -> JoinSpec:
    """What ``@service.compensate(step, on=[...])`` does: a join of the step with any of the triggers."""
    if not is_event_class(step):
        raise ConfigurationError(f"Service {service.name!r}: compensate({step!r}): the step must be an Event subclass")
    triggers = [as_route(trigger, service.name) for trigger in on]
    if not triggers:
        raise ConfigurationError(f"Service {service.name!r}: compensate({step.__name__}): on= names no trigger")
    if Route(step) in triggers:
        raise ConfigurationError(
            f"Service {service.name!r}: compensate({step.__name__}): the step cannot also be its own trigger"
        )
    return install(service, func, [[Route(step)], triggers], kind="compensation", retry=retry, timeout=timeout,
                   emits=emits)


def is_compensation(handler: Handler) -> bool:
    """Whether ``handler`` belongs to a compensation (e.g. to label a failure record's handler)."""
    return isinstance(handler.join, JoinSpec) and handler.join.kind == "compensation"


def is_rollback(handler: Handler) -> bool:
    """Whether ``handler`` is one of the flow's compensations: a ``compensate(...)`` handler, an
    ``on_failure`` handler, or a handler of ``choreograph.timedout`` (the roles lint's
    ``compensation-can-fail`` names). When it gives up, the worker marks its dead-letter record
    ``"compensation": true``, and the journal marks the transaction ``compensation_failed``.

    A plain join (``on_all``) is not one, even with a ``failed(...)`` slot, nor its
    internal fan-out of failures (but the service's own ``on_failure`` handler it runs is)."""
    if handler.join is not None:
        own = own_handler(handler)
        return is_rollback(own) if own is not None else is_compensation(handler)
    return handler.kind == "failure" or handler.consumes.event_type() == TIMEDOUT


def deadline_text(value: str | float | timedelta | datetime, *, now: float) -> str:
    """An envelope ``deadline`` (RFC 3339, UTC) from text, a datetime, or a delay from ``now`` (epoch s).

    >>> deadline_text(90, now=0.0)
    '1970-01-01T00:01:30.000000Z'
    """
    if isinstance(value, str):
        try:
            parsed = _from_rfc3339(value)
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:  # RFC 3339 has a time and an offset, always
            raise ConfigurationError(
                f"deadline {value!r}: not an RFC 3339 timestamp (a date, a time and an offset, "
                "e.g. 2030-01-01T12:00:00Z)"
            )
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigurationError(f"deadline {value!r}: give a timezone-aware datetime")
        moment = value
    elif isinstance(value, timedelta):
        moment = datetime.fromtimestamp(now, UTC) + value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(now + float(value), UTC)
    else:
        raise ConfigurationError(f"deadline {value!r}: expected RFC 3339 text, a datetime, a timedelta or seconds")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def deadline_of(envelope: Envelope) -> datetime | None:
    """The transaction deadline an envelope carries (``None`` if it has none or it is unreadable)."""
    if not envelope.deadline:
        return None
    try:
        moment = _from_rfc3339(envelope.deadline)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _from_rfc3339(text: str) -> datetime:
    """``datetime.fromisoformat``, taking RFC 3339's lowercase ``z`` for UTC too (3.11 refuses it)."""
    return datetime.fromisoformat(text[:-1] + "Z" if text.endswith("z") else text)
