"""``choreograph run``: one long-lived worker process for one service (or every service of an App).

Telemetry is off unless asked for: ``--otel`` (env ``CHOREOGRAPH_OTEL=1``) traces every
handler attempt, setting up the OpenTelemetry SDK from the standard ``OTEL_*`` variables;
``--metrics-port N`` (env ``CHOREOGRAPH_METRICS_PORT``) serves Prometheus ``/metrics``.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer

from choreograph._redact import redact
from choreograph.cli._common import (
    HOST_ERRNOS,
    MAX_CONCURRENCY,
    BrokerOption,
    LogFormatOption,
    MetricsHostOption,
    MetricsPortOption,
    address,
    broker_url,
    check_host,
    given_url,
    load_services,
    otel_option,
    run_async,
    seconds,
)
from choreograph.cli._connect import ConnectTimeoutOption, Patience, unless_stopped
from choreograph.errors import ConfigurationError
from choreograph.faults import load_faults
from choreograph.logs import announce, configure_logging
from choreograph.runtime import Worker
from choreograph.runtime.gc_tuning import DEFAULT_GC_THRESHOLD, tune_gc
from choreograph.runtime.worker import DEFAULT_ACK_DELAY
from choreograph.stores import InboxStore, open_store
from choreograph.telemetry import Telemetry, configure_tracing, serve_metrics
from choreograph.transports import Transport, open_transport


def default_store_url(broker: str, name: str) -> str:
    """Where a service keeps its inbox unless told: beside a sqlite bus, else ./var/."""
    parts = urlsplit(broker)
    if parts.scheme == "memory":
        return "memory://"
    if parts.scheme == "sqlite":
        bus = Path(parts.path[1:])
        return f"sqlite:///{bus.parent / (bus.stem + '.stores') / (name + '.db')}"
    return f"sqlite:///var/stores/{name}.db"


def run(
    target: str = typer.Argument(
        ..., metavar="MODULE:ATTR", help="MODULE:ATTR naming a Service, a list of Services or an App"
    ),
    broker: str | None = BrokerOption,
    service: list[str] = typer.Option(None, "--service", "-s", help="Run only these services of an App"),
    concurrency: int = typer.Option(
        64, "--concurrency", "-c", min=1, max=MAX_CONCURRENCY, help="Handlers running at once per service"
    ),
    store: str | None = typer.Option(None, "--store", help="Inbox store URL (default: beside the sqlite bus)"),
    drain_timeout: float = typer.Option(
        10.0, "--drain-timeout", callback=seconds(forever=True),
        help="Seconds to let in-flight handlers finish on stop (inf: until they finish)",
    ),
    ack_delay: float = typer.Option(
        DEFAULT_ACK_DELAY, "--ack-delay", envvar="CHOREOGRAPH_ACK_DELAY", callback=seconds(most=1),
        help="Seconds from publishing a batch's outputs to marking and acking its inputs: what is published "
        "meanwhile shares one inbox commit and one ack (0 to 1)",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR"),
    log_format: str = LogFormatOption,
    retention: float = typer.Option(
        7 * 86400, "--retention", callback=seconds(forever=True),
        help="Seconds the inbox remembers processed event ids (0 or inf: forever)",
    ),
    otel: bool = otel_option("handler attempts"),
    metrics_port: int | None = MetricsPortOption,
    metrics_host: str = MetricsHostOption,
    gc_threshold: int = typer.Option(
        DEFAULT_GC_THRESHOLD, "--gc-threshold", envvar="CHOREOGRAPH_GC_THRESHOLD", min=0,
        max=2**31 - 1,  # what gc.set_threshold takes: more was an OverflowError once the bus was open
        help="Young-generation GC threshold set as the worker starts, after freezing what start-up "
        "allocated (0: Python's defaults; see choreograph.runtime.gc_tuning)",
    ),
    connect_timeout: float = ConnectTimeoutOption,
) -> None:
    """Run a service as a worker until SIGTERM or Ctrl-C (in-flight work is drained or released)."""
    configure_logging(log_level, log_format)
    load_faults()  # handlers read CHOREOGRAPH_FAULTS on their first step: a mistake in it stops us here instead
    services, _ = load_services(target, service)
    url = broker_url(broker)
    store = given_url(store, "--store", "a store URL")
    transport = open_transport(url)
    names = "+".join(s.name for s in services)
    store_url = store or default_store_url(url, names)
    inbox = open_store(store_url)
    telemetry, provider = telemetry_options(names, otel, metrics_port, metrics_host)

    async def main() -> None:
        worker = Worker(services, transport, store=inbox, concurrency=concurrency, drain_timeout=drain_timeout,
                        ack_delay=ack_delay,
                        retention=retention if 0 < retention < math.inf else None, telemetry=telemetry)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        release = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            # A second Ctrl-C releases what is still running (nothing is lost: the broker hands it
            # out again); a repeated SIGTERM (process managers, `timeout`) waits for the drain under way.
            if stop.is_set() and sig == signal.SIGINT and not release.is_set():
                release.set()
                announce(f"stopping {names}: second interrupt, releasing in-flight work now", colour="yellow")
                worker.release_in_flight()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        if not await unless_stopped(connect_at_start(transport, url, inbox, store_url, connect_timeout), stop):
            announce(f"stopping {names}: stopped while waiting to connect", colour="yellow")
            await inbox.close()
            await transport.close()
            return
        tune_gc(gc_threshold)  # before the worker starts: nothing in flight gets frozen
        await worker.start()
        announce(f"running {names} on {redact(url)} (pid {os.getpid()})")
        await stop.wait()
        limit = "until it finishes" if math.isinf(drain_timeout) else f"up to {drain_timeout:g}s"
        announce(f"stopping {names}: draining in-flight work ({limit}; Ctrl-C again releases it now)",
                 colour="yellow")
        await worker.stop()
        await inbox.close()
        await transport.close()

    try:
        run_async(main())
    finally:
        if provider is not None:
            provider.shutdown()  # export the spans still buffered


async def connect_at_start(transport: Transport, url: str, inbox: InboxStore, store_url: str, timeout: float) -> None:
    """Connect to the broker, then open the inbox, each tried again while it cannot be reached
    (``--connect-timeout``): :meth:`Worker.start` (or the push ambassador's) then finds both open.

    Shared by ``run`` and ``push``."""
    patience = Patience(timeout)
    await patience.connect(transport.connect, f"the broker {redact(url)}")
    await patience.connect(inbox.open, f"the inbox store {redact(store_url)}")


def telemetry_options(
    names: str, otel: bool, metrics_port: int | None, metrics_host: str
) -> tuple[Telemetry | None, Any]:
    """Telemetry from ``--otel`` / ``--metrics-port`` (``None``: off), and the tracer provider to flush at exit.

    Shared by ``run`` and ``gateway``: ``names`` is the default OpenTelemetry service name.
    """
    traces = otel and os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
    if not traces and metrics_port is None:
        return None, None
    provider = configure_tracing(names) if traces else None
    telemetry = Telemetry(traces=traces, metrics=metrics_port is not None)
    if metrics_port is not None:
        port = _serve_metrics(metrics_port, metrics_host)
        announce(f"metrics on http://{address(metrics_host, port)}/metrics")
    return telemetry, provider


def _serve_metrics(port: int, host: str) -> int:
    """:func:`serve_metrics`, with a port taken or a host that cannot be bound as one line naming the option."""
    check_host(host, "--metrics-host")
    try:
        return serve_metrics(port, host)
    except OSError as exc:
        option = (f"--metrics-host {host!r}" if isinstance(exc, socket.gaierror) or exc.errno in HOST_ERRNOS
                  else f"--metrics-port {port}")
        reason = exc.strerror or str(exc)
        raise ConfigurationError(f"{option}: cannot serve metrics on {address(host, port)}: {reason}") from None
