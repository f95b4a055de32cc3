"""``choreograph gateway MODULE:ATTR``: serve an HTTP ingestion gateway with uvicorn."""

from __future__ import annotations

from typing import Any

import pydantic
import typer

from choreograph.cli._common import MetricsHostOption, MetricsPortOption, kind_of, load_object, otel_option
from choreograph.cli._run import telemetry_options
from choreograph.errors import ConfigurationError
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
    telemetry, provider = telemetry_options("gateway", otel, metrics_port, metrics_host)
    app = asgi_app(target, telemetry)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="on")
    finally:
        if provider is not None:
            provider.shutdown()  # export the spans still buffered


def register(app: typer.Typer) -> None:
    app.command("gateway")(gateway)
