"""``choreograph gateway MODULE:ATTR``: serve an HTTP ingestion gateway with uvicorn."""

from __future__ import annotations

import socket
from typing import Any

import pydantic
import typer

from choreograph.cli._common import (
    HOST_ERRNOS,
    MetricsHostOption,
    MetricsPortOption,
    address,
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

    obj = load_object(spec)
    if isinstance(obj, Gateway):
        if telemetry is not None and obj.telemetry is None:
            obj.instrument(telemetry)
        return obj.asgi()
    # A model class is callable too: uvicorn would instantiate it per request and fail on
    # validation, an error about the wrong thing.
    if callable(obj) and not (isinstance(obj, type) and issubclass(obj, pydantic.BaseModel)):
        if telemetry is not None:
            raise ConfigurationError(f"{spec!r} is not a Gateway: --otel and --metrics-port need a choreograph Gateway")
        return obj
    raise ConfigurationError(f"{spec!r} is {kind_of(obj)}, not a Gateway or an ASGI app")


def check_listen(host: str, port: int) -> int:
    """Fail with one line (``--port`` or ``--host``, the address, the OS's reason) if ``host:port`` cannot be listened on.

    uvicorn binds after the app's startup and reports a taken port as a log record between
    its startup and shutdown lines, then exits 3. Binding once first, as uvicorn will (every
    address ``host`` resolves to, ``SO_REUSEADDR``), reports it as a configuration error,
    before anything starts. A port taken between this check and uvicorn's bind still gets
    uvicorn's report.

    Returns the port: for 0, one free on every address now (the first address picks it), so
    ``dev --port 0`` can name the gateway's URL before the gateway binds it.
    """
    def refused(option: str, reason: str | None) -> ConfigurationError:
        return ConfigurationError(f"{option}: cannot listen on {address(host, port)}: {reason}")

    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise refused("--host", exc.strerror) from None
    for family, kind, proto, _, sockaddr in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:  # no IPv6 here: EAFNOSUPPORT
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((sockaddr[0], port, *sockaddr[2:]))
                port = probe.getsockname()[1]  # 0: the port the first address got, tried on the others
        except OSError as exc:
            raise refused("--host" if exc.errno in HOST_ERRNOS else "--port", exc.strerror or str(exc)) from None
    return port


def gateway(
    target: str = typer.Argument(..., help="MODULE:ATTR of a Gateway (or its .asgi() app)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on"),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    otel: bool = otel_option("each publish (a PRODUCER span continuing the request's traceparent)"),
    metrics_port: int | None = MetricsPortOption,
    metrics_host: str = MetricsHostOption,
) -> None:
    """Serve the gateway: POST events in, GET /transactions out, /openapi.json, /healthz."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError("choreograph gateway needs uvicorn (pip install 'choreograph[http]')") from None
    check_listen(host, port)
    if log_level.lower() in ("debug", "trace"):
        # choreograph's and the broker client's own lines too, as `run --log-level debug` shows them
        # (a user module failing to import: its traceback); uvicorn logs through its own handlers
        configure_logging("DEBUG")
    telemetry, provider = telemetry_options("gateway", otel, metrics_port, metrics_host)
    app = asgi_app(target, telemetry)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="on")
    finally:
        if provider is not None:
            provider.shutdown()  # export the spans still buffered


def register(app: typer.Typer) -> None:
    app.command("gateway")(gateway)
