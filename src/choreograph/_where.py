"""``where=``: a handler's CESQL filter, compiled at registration and checked by the worker.

:func:`matcher` turns the expression into a test of an envelope. The worker applies it
right after finding the handler and before validating the payload: an event whose
CloudEvents attributes do not match is acked without running anything (not retried,
not dead-lettered, not recorded in the inbox: a redelivered copy is filtered the same
way) and counted in ``Stats.filtered``. A failure handler's filter reads the attributes
of the *failed* event. Handlers without ``where=`` pay one ``is None`` test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from choreograph import cesql
from choreograph._envelope import Envelope
from choreograph.errors import ConfigurationError

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


def matcher(where: cesql.Expression, handler: str) -> Callable[[Envelope], bool]:
    """``where`` as a test of an envelope's attributes (reads only the attributes it names).

    The worker applies it before the payload is validated: an event a handler filters
    out is acked whatever its payload (it is not this handler's business).
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
            try:
                _, errors = where.evaluate(attributes)
            except Exception as exc:  # matches() never raises; neither may its log line
                errors = [exc]  # type: ignore[list-item]
            _log.debug("%s: event %s does not match where=%r%s; acked unhandled", handler, envelope.id,
                       where.source, f" ({'; '.join(map(str, errors))})" if errors else "")
        return False

    return matches
