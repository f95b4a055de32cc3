"""``where=``: a handler's CESQL filter, compiled at registration and checked before the handler runs.

:func:`filtered` wraps the decorated function: an event whose CloudEvents attributes do
not match returns ``None`` before user code runs, which the worker acks like any handled
event with no outputs (not retried, not dead-lettered). Handlers without ``where=`` are
not wrapped, so they pay nothing. The payload is validated by the worker before the
wrapper is called, so an invalid payload is dead-lettered even if it would not match.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from choreograph import cesql
from choreograph._envelope import Envelope
from choreograph.errors import ConfigurationError

if TYPE_CHECKING:
    from choreograph.context import Context
    from choreograph.events import Event
    from choreograph.service import Failure

_log = logging.getLogger("choreograph.service")

#: Envelope fields a filter reads as CloudEvents attributes (any other name is an extension).
_CONTEXT_FIELDS = frozenset({
    "specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema",
    "correlationid", "causationid", "traceparent", "tracestate", "hops", "partitionkey", "deadline",
})


def compile_where(where: str, service: str, func: Callable[..., Any]) -> cesql.Expression:
    """Compile a handler's ``where=`` at registration; a bad filter is a :class:`ConfigurationError`."""
    owner = f"Service {service!r}, handler {func.__qualname__}"
    if not isinstance(where, str):
        raise ConfigurationError(f"{owner}: where= takes a CESQL expression (a str), got {type(where).__name__}")
    try:
        expression = cesql.compile(where, strict=True)
    except cesql.CESQLParseError as exc:
        raise ConfigurationError(f"{owner}: where= is not a valid CESQL filter: {exc}") from None
    if expression.type not in ("Boolean", None):
        raise ConfigurationError(
            f"{owner}: where={where!r} is {'an' if expression.type == 'Integer' else 'a'} {expression.type} "
            "expression; a filter must be a condition (a Boolean), e.g. \"subject = 'eu'\""
        )
    return expression


def filtered(
    func: Callable[..., Awaitable[Any]], kind: Literal["event", "failure"], takes_context: bool, where: cesql.Expression
) -> tuple[Callable[..., Awaitable[Any]], bool]:
    """Wrap ``func`` so that an event ``where`` does not match returns ``None`` (acked, no outputs)
    before ``func`` runs. Returns the wrapper and whether the worker must pass it the context.

    A handler of events needs the context (its envelope holds the attributes); a failure
    handler reads those of the failed event from its :class:`Failure`. Only the attributes
    the expression names are read from the envelope.
    """
    fields = [name for name in where.references if name in _CONTEXT_FIELDS]
    extensions = [name for name in where.references if name not in _CONTEXT_FIELDS]

    def matches(envelope: Envelope) -> bool:
        attributes = {name: getattr(envelope, name) for name in fields}
        for name in extensions:
            attributes[name] = envelope.extensions.get(name)
        if where.matches(attributes):
            return True
        if _log.isEnabledFor(logging.DEBUG):
            _, errors = where.evaluate(attributes)
            _log.debug("%s: event %s does not match where=%r%s; acked unhandled", func.__qualname__, envelope.id,
                       where.source, f" ({'; '.join(map(str, errors))})" if errors else "")
        return False

    if kind == "event":
        @functools.wraps(func)
        async def filtered_event(event: Event, ctx: Context) -> Any:
            if not matches(ctx.envelope):
                return None
            return await (func(event, ctx) if takes_context else func(event))
        return filtered_event, True

    if takes_context:
        @functools.wraps(func)
        async def filtered_failure_ctx(failure: Failure, ctx: Context) -> Any:
            return await func(failure, ctx) if matches(failure.envelope) else None
        return filtered_failure_ctx, True

    @functools.wraps(func)
    async def filtered_failure(failure: Failure) -> Any:
        return await func(failure) if matches(failure.envelope) else None
    return filtered_failure, False
