"""Helpers shared by the subcommands: loading user objects, opening the bus, running asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import math
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.text import Text

from choreograph._redact import redact
from choreograph.errors import ConfigurationError
from choreograph.service import App, Service
from choreograph.transports import Transport, open_transport
from choreograph.transports.base import MAX_FETCH

T = TypeVar("T")

_log = logging.getLogger("choreograph.cli")

DEFAULT_BROKER = "sqlite:///./var/bus.db"
BROKER_ENV = "CHOREOGRAPH_BROKER"

#: The width of a console that is not a terminal: wide enough that nothing is wrapped or cut.
_UNBOUNDED_WIDTH = 1_000_000


def _console(*, stderr: bool = False) -> Console:
    """A Rich console that fits a terminal, and does not pretend a pipe is one.

    Rich lays out for 80 columns when the output is not a terminal: table cells are cut
    (``01a23ce7…``, an id that can no longer be pasted into ``dlq show``) and long lines
    wrapped. A pipe or a file has no width, so there nothing is cut or wrapped, unless
    ``COLUMNS`` asks for a width.
    """
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = _UNBOUNDED_WIDTH
    return console


err_console = _console(stderr=True)
console = _console()

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(value: str) -> str:
    """``value`` with its control characters (C0, DEL, C1) written as Python escapes (``\\x1b``,
    ``\\n``), for a terminal. What came off the bus (ids, types, sources, error messages) may hold
    any: decoding refuses none, and a terminal obeys them (Rich strips only a few)."""
    if value.isprintable():
        return value
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], value)

BrokerOption = typer.Option(
    None, "--broker", "-b", help=f"Broker URL (env {BROKER_ENV}; default {DEFAULT_BROKER})", show_default=False
)


def broker_url(value: str | None) -> str:
    """``--broker``, else ``CHOREOGRAPH_BROKER``, else the default; an empty ``--broker`` or
    ``CHOREOGRAPH_BROKER`` is refused (a variable left empty in a script would otherwise be the
    default bus, silently). The variable is read only when the option is not given."""
    return given_broker(value) or env_url(BROKER_ENV, "a broker URL") or DEFAULT_BROKER


def given_broker(value: str | None) -> str | None:
    """``--broker`` as given (``None``: not given); empty or blank raises :class:`ConfigurationError`."""
    return given_url(value, "--broker", "a broker URL")


def given_url(value: str | None, option: str, what: str) -> str | None:
    """A URL option as given (``None``: not given); empty or blank raises :class:`ConfigurationError`
    naming ``option`` (``--store``, ``--journal``): a script passing ``--store "$STORE"`` with the
    variable unset would otherwise get the default, silently.

        inbox = given_url(store, "--store", "a store URL") or default_store_url(url, names)
    """
    if value is not None and not value.strip():
        raise ConfigurationError(f"{option} {value!r}: empty; give {what}, or leave the option out")
    return value


def env_url(name: str, what: str) -> str | None:
    """Environment variable ``name`` holding a URL (``None``: not set); set but empty or blank raises
    :class:`ConfigurationError` naming the variable, rather than being taken for "not set"."""
    value = os.environ.get(name)
    if value is not None and not value.strip():
        raise ConfigurationError(f"{name} {value!r}: empty; give {what}, or unset the variable")
    return value


def open_existing_bus(url: str) -> contextlib.AbstractAsyncContextManager[Transport]:
    """A transport for a bus that must exist already, to ``async with``: connected, or an error
    (:class:`ConfigurationError`) if the bus is not there, with nothing created.

    For the commands that look at what a bus holds (``dlq``, ``groups``): a mistyped URL
    would otherwise be a new, empty bus reporting no dead letters, left behind. Connecting
    to a SQLite URL creates the file, so the file must be there; NATS and RabbitMQ connect
    with ``create=False``, which reads whether the bus's events stream or exchange is on the
    server first. Redis needs no check: it creates nothing until a write, and an unknown
    prefix reads as a bus without groups. ``run`` and ``publish`` create the bus on purpose
    (that is how a first deploy starts) and open it with ``open_transport``.

        async with open_existing_bus(url) as bus:
            letters = await bus.dead_letters()
    """
    transport = open_transport(url)
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":  # the SQLite transport stays unimported for the other schemes
        from choreograph.transports.sqlite import SQLiteTransport

        if isinstance(transport, SQLiteTransport):
            if not os.path.exists(transport.path):
                raise ConfigurationError(
                    f"no SQLite bus at {transport.path} (broker URL {redact(url)!r}; run or publish creates one)"
                )
            problem = _not_a_bus(transport.path)
            if problem is not None:
                raise ConfigurationError(f"{transport.path}: {problem} (broker URL {redact(url)!r})")
    return _connected(transport, scheme)


#: The tables of a SQLite bus (``transports/_sqlite_ops.py``): a file with none of them is no bus.
_BUS_TABLES = frozenset({"messages", "groups", "deliveries", "dead_letters"})


def _not_a_bus(path: str) -> str | None:
    """Why the existing file ``path`` is no SQLite bus (a folder, an empty file, another program's
    database), or ``None``. Connecting creates the bus's tables: in an empty file, or in the
    application's own database given by mistake, ``dlq list`` wrote a bus. Read ``mode=ro``; a
    file that cannot be read so is left to the transport, whose error says why."""
    import sqlite3
    from pathlib import Path

    if os.path.isdir(path):
        return "a folder, not a SQLite bus"
    if os.path.getsize(path) == 0:
        return "an empty file, not a SQLite bus (run or publish creates one)"
    try:
        with contextlib.closing(sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True)) as db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    except sqlite3.Error:
        return None
    if not tables:
        return "an SQLite database without tables, not a bus (run or publish creates one)"
    if _BUS_TABLES.isdisjoint(tables):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        return f"not a choreograph bus (an SQLite database with the tables {shown}, none of a bus's)"
    return None


@contextlib.asynccontextmanager
async def _connected(transport: Transport, scheme: str) -> AsyncIterator[Transport]:
    """``transport`` connected without creating its bus (see :func:`open_existing_bus`), then closed."""
    try:
        if scheme == "nats":
            from choreograph.transports.nats import NatsTransport

            assert isinstance(transport, NatsTransport)
            await transport.connect(create=False)
        elif scheme in ("amqp", "amqps"):
            from choreograph.transports.amqp import AmqpTransport

            assert isinstance(transport, AmqpTransport)
            await transport.connect(create=False)
        else:
            await transport.connect()
        yield transport
    finally:
        await transport.close()


#: Why binding fails because of the interface rather than the port (an address this host does not have):
#: ``--host`` or ``--metrics-host`` is named, not the port.
HOST_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL})  # EINVAL: fe80::1, no scope


def check_host(host: str, option: str) -> None:
    """Refuse an empty or blank ``--host`` / ``--metrics-host`` (:class:`ConfigurationError`):
    bound as given, it listened on every interface (``0.0.0.0`` and ``::``), so a script passing
    ``--host "$HOST"`` with the variable unset served to the whole network."""
    if not host.strip():
        raise ConfigurationError(
            f"{option} {host!r}: empty; give an interface (127.0.0.1; 0.0.0.0 or :: for every one), "
            "or leave the option out"
        )


def address(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets (``[::1]:8000``), or
    ``http://::1:8000`` would be a URL no client can use; a scoped one's zone separator
    escaped (``[fe80::1%25eth0]:8000``, RFC 6874), or the ``%`` starts a bad escape."""
    if ":" not in host:
        return f"{host}:{port}"
    return f"[{host.replace('%', '%25')}]:{port}"


def console_error(message: str) -> None:
    """``error: message`` on stderr, as one line whatever its length.

    Soft-wrapped, so a terminal folds it but no newline is written into it (a script
    reading stderr gets one line per error); a Text, so brackets in the message (a
    group or id the user typed) are printed, not read as markup. Passwords in URLs are
    masked: a driver's error may quote the URL it was given.
    """
    err_console.print(Text.assemble(("error:", "bold red"), " ", redact(message)), soft_wrap=True)


def load_module(module_name: str) -> Any:
    """Import ``module_name`` with the current directory importable (as uvicorn does).

    A module that is not there, or that raises while it is imported (a syntax error, a
    missing dependency, its own code failing), is a :class:`ConfigurationError`: one line
    with the exception and where it was raised, instead of a traceback through importlib
    (logged at DEBUG before it: ``--log-level debug`` shows it).
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigurationError(f"{module_name!r}: no module named {exc.name!r}") from None
        raise _import_error(module_name, exc) from exc
    except Exception as exc:
        raise _import_error(module_name, exc) from exc


def _import_error(module_name: str, exc: Exception) -> ConfigurationError:
    """The one line of :func:`_import_failure`, after logging the whole traceback at DEBUG: with
    ``--log-level debug`` the user sees where in their code, and through what, the import failed."""
    _log.debug("importing %r failed", module_name, exc_info=exc)
    return ConfigurationError(_import_failure(module_name, exc))


def _import_failure(module_name: str, exc: Exception) -> str:
    """``'app': importing it raised ValueError: boom (at app.py:3)``.

    The line is the innermost one of the user's code (outside importlib, the standard
    library and installed packages: ``json.loads`` failing names the line that called it),
    else the innermost one; for a syntax error, the line it names.
    """
    if isinstance(exc, SyntaxError):
        what = f"{type(exc).__name__}: {exc.msg}"
        where: tuple[str | None, int | None] = (exc.filename, exc.lineno)
    else:
        message = " ".join(str(exc).split())  # one line, whatever the exception's own layout
        what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen ")]
        libraries = tuple({sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")})
        own = [f for f in frames if not f.filename.startswith(libraries)] or frames
        where = (own[-1].filename, own[-1].lineno) if own else (None, None)
    filename, line = where
    if filename is None:
        return f"{module_name!r}: importing it raised {what}"
    relative = os.path.relpath(filename)
    shown = filename if relative.startswith("..") else relative
    return f"{module_name!r}: importing it raised {what} (at {shown}:{line})"


def load_object(spec: str) -> Any:
    """Import ``module.path:attribute``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"{spec!r}: expected MODULE:ATTRIBUTE, e.g. examples.chain:app")
    module = load_module(module_name)
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigurationError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def load_services(spec: str, only: list[str] | None = None) -> tuple[list[Service], App | None]:
    """The services named by ``spec`` (a Service, a list of them, or an App), optionally filtered."""
    obj = load_object(spec)
    app = obj if isinstance(obj, App) else None
    if isinstance(obj, App):
        services = list(obj.services)
    elif isinstance(obj, Service):
        services = [obj]
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(s, Service) for s in obj):
        services = list(obj)
    else:
        raise ConfigurationError(f"{spec!r} is {kind_of(obj)}, not a Service, a list of Services or an App")
    if only:
        names = {s.name for s in services}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigurationError(f"{spec!r} has no service {unknown[0]!r}; it has {sorted(names)}")
        services = [s for s in services if s.name in only]
    return services, app


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _log_format(value: str) -> str:
    """``--log-format``'s callback: a usage error naming the option, and the variable when it
    came from ``CHOREOGRAPH_LOG_FORMAT`` (``configure_logging`` would name only the option)."""
    if value.lower() not in ("text", "json"):
        raise typer.BadParameter(f"expected text or json, got {value!r}")
    return value


LogFormatOption = typer.Option(
    "text", "--log-format", envvar="CHOREOGRAPH_LOG_FORMAT", callback=_log_format,
    help="text, or json: one JSON object per line with the handled event's ids (see choreograph.logs)",
)


def otel_option(what: str) -> Any:
    """``--otel/--no-otel`` (env ``CHOREOGRAPH_OTEL``): trace ``what`` with OpenTelemetry."""
    return typer.Option(
        False, "--otel/--no-otel", envvar="CHOREOGRAPH_OTEL",
        help=f"Trace {what} with OpenTelemetry (exporter from OTEL_TRACES_EXPORTER: otlp, console, none)",
    )


def seconds(
    *, positive: bool = False, forever: bool = False, most: float | None = None
) -> Callable[[float | None], float | None]:
    """The ``callback`` of an option taking seconds: a number >= 0 (``positive``: > 0; ``most``:
    at most that), or ``inf`` if ``forever`` (no limit); anything else is a usage error, one
    line naming the option (exit 2).

    Rather than Typer's ``min`` and ``max``: whether those refuse ``nan`` depends on Typer's
    version (click's ranges let it through, to a ``ValueError`` in the Worker or the event
    loop), and "should be greater than or equal to 0" is the wrong reason for ``nan``.

        typer.Option(10.0, "--drain-timeout", callback=seconds(forever=True), help=...)
    """
    expected = "a number of seconds " + ("> 0" if positive else ">= 0")
    expected += f" and <= {most:g}" if most is not None else ""
    expected += ", or inf (no limit)" if forever else ""

    def check(value: float | None) -> float | None:
        if value is None:  # not given, and no default
            return None
        above = value > 0 if positive else value >= 0  # False for nan
        if not (above and (forever or math.isfinite(value)) and (most is None or value <= most)):
            raise typer.BadParameter(f"expected {expected}, got {value:g}")
        return value

    return check


#: The most ``--concurrency`` takes (``run``, ``push``): a worker fetches up to that many messages
#: at once (see :data:`~choreograph.transports.base.MAX_FETCH`).
MAX_CONCURRENCY = MAX_FETCH

MetricsPortOption = typer.Option(
    None, "--metrics-port", envvar="CHOREOGRAPH_METRICS_PORT", min=0, max=65535,
    help="Serve Prometheus metrics on this port at /metrics (0: any free port)",
)
MetricsHostOption = typer.Option("127.0.0.1", "--metrics-host", help="Interface for --metrics-port")


def kind_of(obj: Any) -> str:
    """What ``obj`` is, for an error message: "the Event class OrderPlaced", "a function"."""
    if isinstance(obj, type):
        from choreograph.events import Event

        return f"the Event class {obj.__name__}" if issubclass(obj, Event) else f"the class {obj.__name__}"
    kind = type(obj).__name__
    return f"an {kind}" if kind[:1].lower() in "aeiou" else f"a {kind}"
