"""Transports: the seam to brokers, selected by URL scheme.

========================  ===========================================================
``memory://[name]``       in-process; the whole contract (tests, demos in one process)
``sqlite:///path/bus.db`` embedded default: a SQLite file shared by processes on a host
``nats://host:4222``      NATS JetStream
``redis://host:6379/0``   Redis Streams (``rediss://`` over TLS, ``unix:///path/r.sock?db=0``)
``amqp://u:p@host/vhost`` RabbitMQ
========================  ===========================================================

Every URL accepts ``?lease=SECONDS`` (the ack deadline). Broker client libraries are
imported only when their scheme is used.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Iterable
from urllib.parse import parse_qs, parse_qsl, urlsplit

from choreograph._redact import redact
from choreograph._schemes import scheme_of
from choreograph.errors import ConfigurationError
from choreograph.transports.base import DEFAULT_LEASE, DeadLetter, Delivery, Message, Subscription, Transport

__all__ = ["DeadLetter", "Delivery", "Message", "Subscription", "Transport", "open_transport", "schemes"]

# scheme -> (module, class, pip extra that provides its client library)
_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("choreograph.transports.memory", "MemoryTransport", None),
    "sqlite": ("choreograph.transports.sqlite", "SQLiteTransport", None),
    "nats": ("choreograph.transports.nats", "NatsTransport", "nats"),
    "redis": ("choreograph.transports.redis", "RedisTransport", "redis"),
    "rediss": ("choreograph.transports.redis", "RedisTransport", "redis"),
    "unix": ("choreograph.transports.redis", "RedisTransport", "redis"),  # redis-py's unix socket URL
    "amqp": ("choreograph.transports.amqp", "AmqpTransport", "amqp"),
    "amqps": ("choreograph.transports.amqp", "AmqpTransport", "amqp"),
}


def schemes() -> list[str]:
    """The URL schemes choreograph knows."""
    return sorted(_SCHEMES)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``name``, with the closest of ``known`` as a hint when one is close: for the error that
    names an unknown URL parameter (``prefx (did you mean prefix?)``)."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


_IN_A_PASSWORD = "in a password, write '/' as %2F, '?' as %3F and '#' as %23"


def refuse_unreadable(url: str) -> None:
    """Refuse a broker URL whose host part cannot be read as written, without quoting the URL.

    Everything after a ``#`` is a fragment, which no broker reads: ``?prefix=a#b`` was the bus
    ``a``. A password with a ``#``, ``/`` or ``?`` ends the host part early, so the port is read
    from the password: the error that followed (``Port could not be cast to integer value as
    'pa'``, an unknown parameter ``ss@host``) quoted part of the password, which
    :func:`~choreograph._redact.redact` cannot find in a URL read that way."""
    if "#" in url:
        raise ConfigurationError(
            f"broker URL: a '#' starts a URL fragment, which no broker reads (what follows it was dropped);"
            f" {_IN_A_PASSWORD}, and in a prefix or another value as %23"
        )
    hosts = urlsplit(url).netloc.rpartition("@")[2]
    try:
        for host in hosts.split(","):  # nats:// lists servers comma-separated
            _ = urlsplit(f"//{host}").port  # reading it is the check
    except ValueError:
        raise ConfigurationError(f"broker URL: the port is not a number from 0 to 65535 ({_IN_A_PASSWORD})") from None


def refuse_repeated(url: str) -> None:
    """Refuse a broker URL that gives a query parameter twice (``?db=1&db=2``), naming it.

    choreograph read the last value and the client libraries (redis-py, aiormq) the first:
    the bus the URL was checked for was not the bus connected to. No value is quoted (it may
    be a secret)."""
    seen: set[str] = set()
    for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name in seen:
            raise ConfigurationError(f"broker URL: parameter {name!r} is given more than once; give it once")
        seen.add(name)


def lease_from_url(url: str, default: float = DEFAULT_LEASE) -> float:
    """The ``?lease=`` query parameter of ``url`` in seconds, validated."""
    values = parse_qs(urlsplit(url).query, keep_blank_values=True).get("lease")  # an empty one meant 30 s
    if not values:
        return default
    try:
        lease = float(values[-1])
    except ValueError:
        raise ConfigurationError(f"broker URL: lease={values[-1]!r} is not a number of seconds") from None
    if not 0 < lease < math.inf:  # nan passed `lease <= 0`: Redis failed on its first fetch
        raise ConfigurationError("broker URL: lease must be > 0 seconds (and finite)")
    return lease


def open_transport(url: str) -> Transport:
    """A transport for ``url`` (not yet connected: ``async with`` it or call ``connect()``)."""
    scheme = scheme_of(url, "broker URL")
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"broker URL {redact(url)!r}: unknown scheme {scheme!r}; expected one of "
            + ", ".join(f"{s}://" for s in schemes())
        )
    module_name, class_name, extra = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" (pip install 'choreograph[{extra}]')" if extra else ""
        raise ConfigurationError(f"broker URL {redact(url)!r}: {scheme}:// needs {exc.name}{hint}") from exc
    transport: Transport = getattr(module, class_name)(url)
    return transport
