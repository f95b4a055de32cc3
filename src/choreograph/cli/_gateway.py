"""``choreograph gateway MODULE:ATTR``: serve an HTTP ingestion gateway with uvicorn."""

from __future__ import annotations

from typing import Any

import typer

from choreograph.cli._common import load_object
from choreograph.errors import ConfigurationError


def asgi_app(spec: str) -> Any:
    """The ASGI app named by ``spec``: a :class:`~choreograph.gateway.Gateway` or any ASGI callable."""
    from choreograph.gateway import Gateway

    obj = load_object(spec)
    if isinstance(obj, Gateway):
        return obj.asgi()
    if callable(obj):
        return obj
    raise ConfigurationError(f"{spec!r} is a {type(obj).__name__}, not a Gateway or an ASGI app")


def gateway(
    target: str = typer.Argument(..., help="MODULE:ATTR of a Gateway (or its .asgi() app)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on"),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
) -> None:
    """Serve the gateway: POST events in, GET /transactions out, /openapi.json, /healthz."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError("choreograph gateway needs uvicorn (pip install 'choreograph[http]')") from None
    app = asgi_app(target)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="on")


def register(app: typer.Typer) -> None:
    app.command("gateway")(gateway)
