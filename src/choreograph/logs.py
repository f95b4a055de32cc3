"""Structured logs: one JSON object per line, with the ids of the event being handled.

``choreograph run --log-format json`` (env ``CHOREOGRAPH_LOG_FORMAT=json``; also ``push``
and ``journal``) writes every log record as one JSON line on stderr::

    {"time": "2026-12-02T07:30:01.123456Z", "level": "WARNING", "logger": "choreograph.worker",
     "message": "payment.charge failed on 6f1c... (attempt 1), retrying in 0.42s: ...",
     "service": "payment", "handler": "charge", "event_id": "6f1c...", "event_type": "order.placed",
     "correlation_id": "...", "causation_id": null, "attempt": 1,
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}

The event's fields come from the handler context (:func:`~choreograph.context.current_context`),
so the runtime's own records (retries, dead letters) carry them as well as ``ctx.logger``'s
and any ``logging`` call made while a handler runs; ``trace_id`` / ``span_id`` appear when
OpenTelemetry has a span current (``--otel``). Fields given with ``extra=`` are kept (an
``Envelope`` or a ``Context`` as an object of its fields); a value JSON cannot hold is written
as its ``repr``. In code::

    from choreograph.logs import configure_logging
    configure_logging("INFO", "json")
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import orjson

from choreograph.context import current_context
from choreograph.errors import ConfigurationError

if TYPE_CHECKING:
    from choreograph._envelope import Envelope

__all__ = ["ContextFilter", "JsonFormatter", "configure_logging"]

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has: anything else on a record came from ``extra=`` (or a filter).
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def event_fields(envelope: Envelope, service: str, handler: str | None, attempt: int) -> dict[str, Any]:
    """The fields a line about handling ``envelope`` carries (those :class:`ContextFilter` adds
    inside a handler's context), for a line written outside one: give them with ``extra=``."""
    return {
        "service": service, "handler": handler, "event_id": envelope.id, "event_type": envelope.type,
        "correlation_id": envelope.correlationid or envelope.id, "causation_id": envelope.causationid,
        "attempt": attempt,
    }


def _span_ids() -> tuple[str, str] | None:
    """The current OpenTelemetry span's (trace id, span id) in hex, if OpenTelemetry is loaded."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # never imported: no span can be current
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class ContextFilter(logging.Filter):
    """Adds the handled event's fields (and the current span's ids) to every record.

    Fields already on the record (``ctx.logger``'s, or the caller's ``extra=``) win.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_context()
        if ctx is not None:
            fields = {
                "service": ctx.service, "handler": ctx.handler, "event_id": ctx.event_id,
                "event_type": ctx.envelope.type, "correlation_id": ctx.correlation_id,
                "causation_id": ctx.causation_id, "attempt": ctx.attempt,
            }
            for key, value in fields.items():
                if key not in record.__dict__:
                    setattr(record, key, value)
        ids = _span_ids()
        if ids is not None and "trace_id" not in record.__dict__:
            record.trace_id, record.span_id = ids
        return True


def _default(value: Any) -> Any:
    """What orjson writes for a value it has no type for: a msgspec Struct (an ``Envelope``, a
    ``Context``) as an object of its public fields, as orjson writes a dataclass; else its repr."""
    if isinstance(value, msgspec.Struct):
        return {name: getattr(value, name) for name in value.__struct_fields__ if not name.startswith("_")}
    return repr(value)


def _encodable(value: Any) -> Any:
    try:
        orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return repr(value)
    return value


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time (UTC, RFC 3339), level, logger, message, its extra fields,
    and ``exception`` (the formatted traceback) when it has one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(out, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # an int wider than 64 bits, a key orjson cannot write: that value as its repr
            return orjson.dumps({key: _encodable(value) for key, value in out.items()}, default=_default,
                                option=orjson.OPT_NON_STR_KEYS).decode()


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at ``level``, as text or JSON lines (what the CLI's ``--log-format`` sets).

    Replaces the root logger's handlers, so calling it again switches format.
    """
    name = fmt.lower()
    if name not in ("text", "json"):
        raise ConfigurationError(f"--log-format {fmt!r}: expected text or json")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigurationError(f"--log-level {level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if name == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    if numeric <= logging.DEBUG:
        unquiet_client_loggers()
    global _format
    _format = name


_format = "text"

#: The loggers of the broker and database clients under the transports and stores. On a
#: refused connection each says so in its own words (aiormq at ERROR on every attempt,
#: aio-pika that it reconnects), before choreograph's error says it once, naming the URL.
CLIENT_LOGGERS = ("aio_pika", "aiormq", "asyncpg", "nats", "redis")

_quieted: dict[str, int] = {}
"""Client logger -> its level before :func:`quiet_client_loggers`."""


class _BrokerBlocking(logging.Filter):
    """aiormq's lines on RabbitMQ blocking the connection (a disk or memory alarm: every
    publish waits) and unblocking it: the one outage the AMQP transport cannot see itself
    (aiormq offers no hook), so they pass the quieting."""

    LINES = ("Connection %r was blocked by: %r", "Connection %r was unblocked")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg in self.LINES


_BLOCKING_LOGGER = "aiormq.connection"
_blocking = _BrokerBlocking()


def quiet_client_loggers() -> None:
    """Silence the client libraries' own log lines (below CRITICAL): what the CLI does.

    A command's user gets choreograph's one line for a broker that cannot be reached, not
    the clients' lines (some with a traceback) before it; once connected, the transports
    log losing and regaining their broker themselves (RabbitMQ blocking publishers on an
    alarm: aiormq's lines, see :class:`_BrokerBlocking`). :func:`configure_logging` at DEBUG
    (``--log-level debug``) gives the clients their levels back.
    """
    for name in CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        _quieted.setdefault(name, logger.level)
        logger.setLevel(logging.CRITICAL)
    blocking = logging.getLogger(_BLOCKING_LOGGER)
    _quieted.setdefault(_BLOCKING_LOGGER, blocking.level)
    blocking.setLevel(logging.WARNING)
    blocking.addFilter(_blocking)


def unquiet_client_loggers() -> None:
    """Give the client loggers back the levels :func:`quiet_client_loggers` took (``--log-level debug``)."""
    logging.getLogger(_BLOCKING_LOGGER).removeFilter(_blocking)
    while _quieted:
        name, level = _quieted.popitem()
        logging.getLogger(name).setLevel(level)


def announce(message: str, *, label: str = "choreograph", colour: str = "green") -> None:
    """Write a long-running command's status line to stderr ("choreograph running ... (pid N)").

    Printed whatever the log level: supervisors (``choreograph dev``, scripts) wait for
    these lines. With ``--log-format json`` it is a JSON line like every log record, so a
    pipeline that reads stderr as JSON lines gets nothing else; as text it is one line
    (never wrapped at the terminal's width), coloured on a terminal.
    """
    if _format == "json":
        record = logging.LogRecord("choreograph.cli", logging.INFO, __file__, 0, "%s %s", (label, message), None)
        line = JsonFormatter().format(record)  # the same shape as every other JSON log line
    elif sys.stderr.isatty():
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[{colour}]{escape(label)}[/] {escape(message)}")
        return
    else:
        line = f"{label} {message}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
