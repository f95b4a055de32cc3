"""``choreograph gateway MODULE:ATTR``: serve an HTTP ingestion gateway with uvicorn."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pydantic
import typer

from choreograph.cli._common import (
    HOST_ERRNOS,
    MetricsHostOption,
    MetricsPortOption,
    address,
    check_host,
    kind_of,
    load_object,
    otel_option,
)
from choreograph.cli._run import telemetry_options
from choreograph.errors import ConfigurationError
from choreograph.logs import configure_logging
from choreograph.telemetry import Telemetry


def asgi_app(spec: str, telemetry: Telemetry | None = None) -> Any:
    """The ASGI app named by ``spec``: a :class:`~choreograph.gateway.Gateway` or any ASGI callable.

    ``telemetry`` instruments a Gateway built without its own; a plain ASGI app cannot take it.
    """
    from choreograph.gateway import Gateway

    obj = gateway_object(spec)
    if isinstance(obj, Gateway):
        if telemetry is not None and obj.telemetry is None:
            obj.instrument(telemetry)
        return obj.asgi()
    if telemetry is not None:
        raise ConfigurationError(f"{spec!r} is not a Gateway: --otel and --metrics-port need a choreograph Gateway")
    return obj


def gateway_object(spec: str) -> Any:
    """The object ``spec`` names if it is a :class:`~choreograph.gateway.Gateway` or an ASGI app
    (a callable), else a :class:`ConfigurationError`. ``dev`` checks its ``--gateway`` with it
    before starting anything."""
    from choreograph.gateway import Gateway

    obj = load_object(spec)
    # A model class is callable too: uvicorn would instantiate it per request and fail on
    # validation, an error about the wrong thing.
    if isinstance(obj, Gateway) or (
        callable(obj) and not (isinstance(obj, type) and issubclass(obj, pydantic.BaseModel))
    ):
        return obj
    raise ConfigurationError(f"{spec!r} is {kind_of(obj)}, not a Gateway or an ASGI app")


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on ``host:port``, one per address ``host`` resolves to, as uvicorn would
    bind them (``SO_REUSEADDR``, an IPv6 socket for IPv6 only); what fails is one line naming
    ``--port`` or ``--host``, the address and the OS's reason.

    The gateway serves on exactly these sockets (uvicorn's ``Server.run(sockets=...)``; from
    ``dev``, the gateway process inherits them: ``--fd``). Binding once, rather than checking
    the address and letting uvicorn bind it again after the app's startup, leaves no moment
    where another process can take the port: ``--port 0`` names the port served on, a taken
    port is a configuration error before anything starts, and a gateway that ``dev`` restarts
    keeps its port (connections meanwhile wait in the backlog instead of being refused).
    With ``--port 0`` every address gets the port the first one was given.
    """
    def refused(option: str, reason: str | None) -> ConfigurationError:
        return ConfigurationError(f"{option}: cannot listen on {address(host, port)}: {reason}")

    check_host(host, "--host")

    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise refused("--host", exc.strerror) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in addresses:
            sock = socket.socket(family, kind, proto)  # no IPv6 here: EAFNOSUPPORT
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((sockaddr[0], port, *sockaddr[2:]))
            sock.listen(_BACKLOG)  # taken from now on: a bound socket that does not listen can be shared
            port = sock.getsockname()[1]  # 0: the port the first address got, taken on the others
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise refused("--host" if exc.errno in HOST_ERRNOS else "--port", exc.strerror or str(exc)) from None
    return sockets


#: The levels uvicorn's ``log_level`` takes (``uvicorn.config.LOG_LEVELS``), in any case.
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")

#: uvicorn's default backlog (it listens again with its own when it starts serving).
_BACKLOG = 2048


def inherited(fds: list[int]) -> list[socket.socket]:
    """The listening sockets ``dev`` opened (:func:`listen`) and passed down as these file descriptors."""
    sockets = []
    for fd in fds:
        try:
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            raise ConfigurationError(f"--fd {fd}: not an open socket: {exc.strerror or exc}") from None
    return sockets


def gateway(
    target: str = typer.Argument(
        ..., metavar="MODULE:GATEWAY", help="MODULE:ATTR of a Gateway (or its .asgi() app)"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on"),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    otel: bool = otel_option("each publish (a PRODUCER span continuing the request's traceparent)"),
    metrics_port: int | None = MetricsPortOption,
    metrics_host: str = MetricsHostOption,
    fds: list[int] = typer.Option(
        None, "--fd", hidden=True, min=0,  # -1: socket()'s ValueError, a traceback
        help="Serve on this listening socket, already bound to --host and --port "
        "(repeatable; how `choreograph dev` hands over the sockets it bound)",
    ),
) -> None:
    """Serve the gateway: POST events in, GET /transactions out, /openapi.json, /healthz."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError("choreograph gateway needs uvicorn, part of choreograph's install: "
                                 "reinstall choreograph (pip install --force-reinstall choreograph)") from None
    if log_level.lower() not in _LOG_LEVELS:  # uvicorn's KeyError, with a traceback, once the port was bound
        raise ConfigurationError(f"--log-level {log_level!r}: expected {', '.join(_LOG_LEVELS[:-1])} or {_LOG_LEVELS[-1]}")
    sockets = inherited(fds) if fds else listen(host, port)
    try:
        if log_level.lower() in ("debug", "trace"):
            # choreograph's and the broker client's own lines too, as `run --log-level debug` shows them
            # (a user module failing to import: its traceback); uvicorn logs through its own handlers
            configure_logging("DEBUG")
        telemetry, provider = telemetry_options("gateway", otel, metrics_port, metrics_host)
        app = asgi_app(target, telemetry)
        url = f"http://{address(host, sockets[0].getsockname()[1])}"  # the port bound, for --port 0 too

        class Server(uvicorn.Server):
            """uvicorn's server, with its `running on` line (it has none for sockets given to it; ``dev`` waits for it)."""

            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets=sockets)
                if self.started:
                    logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)", url)

        server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), lifespan="on"))
        try:  # what uvicorn.run does, on the sockets already listening
            server.run(sockets=sockets)
        except KeyboardInterrupt:  # the SIGINT uvicorn caught, raised again once it has shut down
            pass
        finally:
            if provider is not None:
                provider.shutdown()  # export the spans still buffered
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:  # the app's startup failed: uvicorn has logged why
        raise typer.Exit(_STARTUP_FAILURE)


#: uvicorn's exit status for an app that failed to start (its lifespan startup raised).
_STARTUP_FAILURE = 3


def register(app: typer.Typer) -> None:
    app.command("gateway")(gateway)
