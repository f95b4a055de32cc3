"""``choreograph push``: a push ambassador process delivering events to HTTP subscribers.

One subscription from the options, or several from ``--config`` (TOML/YAML, see
:mod:`choreograph._push_config`); both may be combined. Runs until SIGTERM or Ctrl-C,
then drains pushes in flight (or releases them to the broker) like ``choreograph run``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from choreograph._redact import redact
from choreograph.cli._common import (
    BROKER_ENV,
    DEFAULT_BROKER,
    MAX_CONCURRENCY,
    BrokerOption,
    LogFormatOption,
    MetricsHostOption,
    MetricsPortOption,
    env_url,
    given_broker,
    given_url,
    run_async,
    seconds,
)
from choreograph.cli._connect import DEFAULT_CONNECT_TIMEOUT, ConnectTimeoutOption, unless_stopped
from choreograph.cli._run import connect_at_start, default_store_url, telemetry_options
from choreograph.errors import ConfigurationError
from choreograph.logs import announce, configure_logging
from choreograph.stores import open_store
from choreograph.transports import open_transport

if TYPE_CHECKING:
    from choreograph._push_config import PushConfig
    from choreograph.push import PushSubscription

SECRET_ENV = "CHOREOGRAPH_PUSH_SECRET"


def push(
    broker: str | None = BrokerOption,
    config: Annotated[Path | None, typer.Option("--config", "-f", help="TOML or YAML file of subscriptions")] = None,
    group: Annotated[str | None, typer.Option("--group", "-g", help="Consumer group to deliver as")] = None,
    types: Annotated[list[str] | None, typer.Option("--type", "-t", help="Event type to deliver (repeatable)")] = None,
    url: Annotated[str | None, typer.Option("--url", help="The subscriber's URL")] = None,
    mode: Annotated[str, typer.Option("--mode", help="binary or structured")] = "binary",
    secret: Annotated[str | None, typer.Option("--secret", envvar=SECRET_ENV,
                                               help=f"whsec_... signing secret (env {SECRET_ENV})")] = None,
    timeout: Annotated[float, typer.Option("--timeout", callback=seconds(positive=True),
                                           help="Seconds to wait for an answer")] = 10.0,
    max_attempts: Annotated[int, typer.Option("--max-attempts", min=1, help="Attempts before giving up")] = 5,
    max_retry_after: Annotated[float, typer.Option("--max-retry-after", callback=seconds(),
                                                   help="Cap on Retry-After")] = 300.0,
    emits: Annotated[list[str] | None, typer.Option("--emit", help="Event type the subscriber may answer with")] = None,
    where: Annotated[str | None, typer.Option("--where", help="Deliver only events matching this CESQL filter")] = None,
    no_handshake: Annotated[bool, typer.Option("--no-handshake", help="Skip the OPTIONS handshake")] = False,
    origin: Annotated[str | None, typer.Option("--origin", help="Origin announced in the handshake")] = None,
    store: Annotated[str | None, typer.Option("--store", help="Inbox store URL (default: beside the bus)")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-c", min=1, max=MAX_CONCURRENCY,
                                                    help="Requests in flight per subscription")] = None,
    drain_timeout: Annotated[float | None, typer.Option("--drain-timeout", callback=seconds(forever=True),
                                                        help="Seconds to drain on stop (inf: until done)")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
    log_format: str = LogFormatOption,
    metrics_port: int | None = MetricsPortOption,
    metrics_host: str = MetricsHostOption,
    connect_timeout: float = ConnectTimeoutOption,
) -> None:
    """Deliver events to HTTP subscribers (CloudEvents over HTTP, signed) until SIGTERM or Ctrl-C."""
    from choreograph._push_config import PushConfig, load_config, subscription_from_mapping

    configure_logging(log_level, log_format)
    if log_level.upper() != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    settings = load_config(config) if config is not None else PushConfig(subscriptions=[])
    if group is not None or types or url is not None:  # given empty: refused below for what it is, not as missing
        # "$SECRET" of an unset variable is not "deliver unsigned" (a config file's empty secret is refused too);
        # Typer takes the variable set empty for not set, as it does the option given empty. Only here, where
        # they sign: a --config file's subscriptions never read them (an empty variable there refused the file)
        for name, value in (("--secret", secret), (SECRET_ENV, os.environ.get(SECRET_ENV) if secret is None else None)):
            if value is not None and not value.strip():
                raise ConfigurationError(f"{name} {value!r}: empty; give the whsec_... signing secret, "
                                         "or leave it out to deliver unsigned")
        item: dict[str, object] = {
            "group": group, "types": types or [], "url": url, "mode": mode, "timeout": timeout,
            "max_attempts": max_attempts, "max_retry_after": max_retry_after, "handshake": not no_handshake,
        }
        if secret:
            item["secret"] = secret
        if emits:
            item["emits"] = emits
        if where is not None:
            item["where"] = where
        missing = [option for option, value in (("--group", group), ("--type", types), ("--url", url)) if not value and value != ""]
        if missing:
            raise ConfigurationError(f"push: {', '.join(missing)} missing (give --group, --type and --url together)")
        settings.subscriptions.append(subscription_from_mapping(item, "options"))
    if not settings.subscriptions:
        raise ConfigurationError("push: nothing to deliver; give --group, --type and --url, or --config FILE")
    serve(settings, broker=broker, store=store, origin=origin, concurrency=concurrency, drain_timeout=drain_timeout,
          metrics_port=metrics_port, metrics_host=metrics_host, connect_timeout=connect_timeout)


#: Seconds a stopping ambassador waits for pushes in flight, unless the option or the file says.
DEFAULT_DRAIN_TIMEOUT = 10.0


def first_given(*values: float | None) -> float:
    """The first value given (not None): the option, then the file, then the default - a
    0 given is 0 (no wait), not "unset"."""
    return next(value for value in values if value is not None)


def serve(
    settings: PushConfig,
    *,
    broker: str | None,
    store: str | None,
    origin: str | None,
    concurrency: int | None,
    drain_timeout: float | None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> None:
    from choreograph.push import PushAmbassador

    # --broker, then CHOREOGRAPH_BROKER, then the file's, then the default (the file's documented
    # order). `broker or settings.broker` took an empty --broker for "not given" (the default bus,
    # silently) and read the file's broker before the variable.
    url = given_broker(broker) or env_url(BROKER_ENV, "a broker URL") or settings.broker or DEFAULT_BROKER
    store = given_url(store, "--store", "a store URL")
    subscriptions: list[PushSubscription] = settings.subscriptions
    names = "+".join(s.group for s in subscriptions)
    transport = open_transport(url)
    store_url = store or settings.store or default_store_url(url, names)
    inbox = open_store(store_url)
    telemetry, _ = telemetry_options(names, False, metrics_port, metrics_host)  # metrics only: no push spans yet
    ambassador = PushAmbassador(
        subscriptions, transport, store=inbox,
        concurrency=concurrency or settings.concurrency or 16,
        origin=origin or settings.origin,
        drain_timeout=first_given(drain_timeout, settings.drain_timeout, DEFAULT_DRAIN_TIMEOUT),
        telemetry=telemetry,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        release = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            # as `choreograph run`: a second Ctrl-C releases the pushes still in flight (the group
            # gets them again); a repeated SIGTERM waits for the drain under way
            if stop.is_set() and sig == signal.SIGINT and not release.is_set():
                release.set()
                announce(f"stopping {names}: second interrupt, releasing pushes in flight now",
                         label="choreograph push", colour="yellow")
                ambassador.release_in_flight()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        if not await unless_stopped(connect_at_start(transport, url, inbox, store_url, connect_timeout), stop):
            announce(f"stopping {names}: stopped while waiting to connect", label="choreograph push", colour="yellow")
            await inbox.close()
            await transport.close()
            return
        await ambassador.start()
        for sub in subscriptions:
            announce(
                f"{sub.group}: {', '.join(sorted(sub.types))} → {redact(sub.url)} "
                f"({sub.mode}{', signed' if sub.secret else ''}"
                f"{f', only where {sub.filter.text}' if sub.filter is not None else ''})",
                label="choreograph push",
            )
        announce(f"running on {redact(url)} (pid {os.getpid()})", label="choreograph push")
        await stop.wait()
        drain = ambassador.drain_timeout
        limit = "until they finish" if math.isinf(drain) else f"up to {drain:g}s"
        announce(f"stopping {names}: draining pushes in flight ({limit}; Ctrl-C again releases them now)",
                 label="choreograph push", colour="yellow")
        await ambassador.stop()
        await inbox.close()
        await transport.close()

    run_async(main())


def register(app: typer.Typer) -> None:
    app.command("push")(push)
