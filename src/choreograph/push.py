"""Push delivery: HTTP subscribers in any language, and the Python side of receiving.

A *push ambassador* stands in for an HTTP service on the bus. It consumes a consumer
group like any service, POSTs each event to the subscriber's URL as a CloudEvent
(HTTP binding, binary or structured mode), signed in the Standard Webhooks format,
and settles the delivery by the answer (DESIGN.md §5):

* 2xx: done. A CloudEvent in the response body (any content mode; a batch for
  several) is the subscriber's *output*: the ambassador publishes it with a
  deterministic id (``derive_id(input, group, "push", index)``), the input's
  correlation and causation, *before* acking the input. The subscriber never needs
  credentials to the bus, and a redelivery republishes the same ids. An answer carrying
  events is read up to the subscription's ``max_response_body`` (1 MiB by default); a
  larger one is a failed attempt, retried and then dead-lettered, never truncated.
* 400, 413, 415, 422 (and any other 3xx/4xx): permanent, dead-lettered at once.
* 404, 408, 409, 429, 5xx, timeouts, connection errors: retried by the subscription's
  :class:`~choreograph.RetryPolicy`; ``Retry-After`` (seconds or an HTTP date) is
  honoured up to ``max_retry_after``.
* Giving up dead-letters the event with the runtime's record (plus the HTTP ``status``
  and ``url``, its password and token masked by :func:`~choreograph._redact.redact` as in
  every log line and error) and publishes ``choreograph.failed``, so ``on_failure``
  compensations run exactly as for a Python service.

Before the first delivery to a URL the ambassador performs the CloudEvents webhook
handshake (``OPTIONS`` + ``WebHook-Request-Origin``). A receiver that answers without
granting our origin *refuses*: its deliveries are dead-lettered at once (reason
``rejected``, the refusal in the record), never sent, and can be replayed once the
receiver is fixed. A handshake that fails transiently (unreachable, 5xx, 429) is
retried like a delivery. A receiver that does not implement it (``OPTIONS`` answered
405 or 501) refuses too; pass ``handshake=False`` for those.

>>> ambassador = PushAmbassador(
...     [PushSubscription("delivery-node", ["drone.drone.assigned"], "http://127.0.0.1:8090/",
...                       secret=os.environ["WEBHOOK_SECRET"], emits=["drone.delivery.scheduled"])],
...     open_transport("sqlite:///./var/bus.db"),
... )                                                                  # doctest: +SKIP
>>> async with ambassador:                                             # doctest: +SKIP
...     await ambassador.wait()

The receiving side in Python is :func:`receiver` (an ASGI app) or :func:`read_event`
inside an existing endpoint (it verifies when given the secret, and refuses a body over
``max_body`` with a 413 :class:`Problem`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import socket
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from choreograph._clock import SYSTEM_CLOCK, Clock
from choreograph._gateway_http import Problem
from choreograph._http_binding import MODES, Mode, decode_http, decode_http_batch, to_batch, to_http
from choreograph._push_answer import HANDLER
from choreograph._push_filters import FilterError, Filters, compile_filters
from choreograph._push_http import REDACTED_URLS, Handshakes, classify, retry_after
from choreograph._push_runner import PushRunner, PushStats
from choreograph._receiver import read_event, receiver
from choreograph._redact import redact
from choreograph._webhook import (
    MAX_KEY_BYTES,
    MIN_KEY_BYTES,
    SignatureError,
    generate_secret,
    secret_key,
    sign,
    signature_headers,
    verify,
)
from choreograph.errors import ConfigurationError
from choreograph.policy import DEFAULT_RETRY, MAX_RETRY_DELAY, RetryPolicy
from choreograph.stores.base import InboxStore
from choreograph.stores.memory import MemoryStore
from choreograph.transports.base import Transport

if TYPE_CHECKING:
    from choreograph.telemetry import Telemetry

__all__ = [
    "HANDLER",
    "MAX_RESPONSE_BODY",
    "Problem",
    "PushAmbassador",
    "PushStats",
    "PushSubscription",
    "SignatureError",
    "classify",
    "decode_http",
    "decode_http_batch",
    "generate_secret",
    "read_event",
    "receiver",
    "retry_after",
    "sign",
    "signature_headers",
    "to_batch",
    "to_http",
    "verify",
]

_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

#: An HTTP header name (RFC 9110 token), and the characters a header value may not hold.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NOT_IN_VALUES = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Headers the ambassador (or httpx) sets on every request: a second copy from a subscription
#: would go out beside it (a receiver reads one of the two) or make a request servers refuse.
_SET_BY_THE_AMBASSADOR = ("content-type", "content-length", "transfer-encoding", "content-encoding",
                          "user-agent", "traceparent", "tracestate")


def _value_refused(value: object) -> str | None:
    """Why ``value`` cannot be sent as a header value (``None``: it can)."""
    if not isinstance(value, str) or _NOT_IN_VALUES.search(value):
        return "the value must be text without control characters (no line breaks)"
    if not value.isascii():  # httpx sends header values as ASCII (UnicodeEncodeError at every push)
        return "the value must be printable ASCII (percent-encode or base64 the rest)"
    if value != value.strip(" \t"):  # RFC 9110 5.5; h11 refuses to send it ("Illegal header value")
        return "the value must not begin or end with whitespace"
    return None


def _header_refused(name: str, value: object) -> str | None:
    """Why a subscription may not add header ``name: value`` (``None``: it may)."""
    if not isinstance(name, str) or not _TOKEN.match(name):
        return "not an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)"
    why = _value_refused(value)
    if why is not None:
        return why
    lowered = name.lower()
    if lowered in _SET_BY_THE_AMBASSADOR or lowered.startswith(("ce-", "webhook-")):
        return ("the ambassador sets it on every request (the CloudEvents binding, the Standard Webhooks "
                "signature, the trace context); a second copy would go out beside it")
    return None


MAX_RESPONSE_BODY = 1 << 20
"""Bytes of a subscriber's answer the ambassador reads by default (the most :func:`receiver` accepts)."""


@dataclasses.dataclass(frozen=True)
class PushSubscription:
    """One HTTP subscriber: the group it consumes as, the event types, and how to reach it.

    ``secret`` signs every request (``whsec_...``; several during a rotation). ``emits``
    lists the event types the subscriber may answer with (``None``: any, except
    ``choreograph.*``); answering another type dead-letters the input as ``rejected``.
    ``headers`` are added to every request, the handshake's ``OPTIONS`` included (e.g. an
    ``Authorization``); not those the
    ambassador sets itself (``Content-Type``, ``ce-*``, ``webhook-*``, ``traceparent``, ...):
    a second copy would go out beside its own.

    ``max_response_body`` bounds the answer the ambassador reads (bytes, after any
    ``Content-Encoding``): an answer carrying CloudEvents over it is a failed attempt,
    retried by ``retry`` and then dead-lettered naming the limit; it is never truncated
    into events. Answers without events are not read beyond an excerpt for the record.

    ``filters`` (a list of filter objects in the CloudEvents Subscriptions API's shape,
    all of which must hold) and ``where`` (a CESQL condition, the same as one more
    ``{"sql": where}``) narrow what is delivered: an event of one of ``types`` that does
    not match is acked without a request (see :mod:`choreograph._push_filters`)::

        PushSubscription("eu-audit", ["shop.order.placed"], "https://audit.example/hook",
                         filters=[{"prefix": {"subject": "eu-"}}], where="hops < 10")
    """

    group: str
    types: Collection[str]
    url: str
    mode: Mode = "binary"
    retry: RetryPolicy = DEFAULT_RETRY
    timeout: float = 10.0
    secret: str | Sequence[str] | None = dataclasses.field(default=None, repr=False)  # kept out of logs and tracebacks
    max_retry_after: float = 300.0
    handshake: bool = True
    emits: Collection[str] | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)  # an Authorization, say
    filters: Sequence[Mapping[str, Any]] = ()
    where: str | None = None
    max_response_body: int = MAX_RESPONSE_BODY
    filter: Filters | None = dataclasses.field(init=False, repr=False, compare=False, default=None)
    """``filters`` and ``where`` compiled to one predicate (``None``: every event is delivered)."""

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not _GROUP.match(self.group):
            raise ConfigurationError(f"push subscription group {self.group!r}: use letters, digits, '_', '.', '-'")
        types = [self.types] if isinstance(self.types, str) else list(self.types)
        if not types or not all(isinstance(t, str) and t for t in types):
            raise ConfigurationError(f"push subscription {self.group!r}: types must list at least one event type")
        fix("types", frozenset(types))
        try:
            parts = urlsplit(self.url)
        except ValueError as exc:  # an unclosed "[", a bracketed host that is no IP address
            raise ConfigurationError(
                f"push subscription {self.group!r}: url {redact(self.url)!r} is not an http(s) URL ({exc})"
            ) from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(f"push subscription {self.group!r}: url {redact(self.url)!r} is not an http(s) URL")
        if self.mode not in MODES:
            raise ConfigurationError(f"push subscription {self.group!r}: mode must be 'binary' or 'structured'")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigurationError(f"push subscription {self.group!r}: timeout must be > 0 seconds")
        if not 0 <= self.max_retry_after <= MAX_RETRY_DELAY:  # refuses nan (no cap at all: min(x, nan) is x)
            # A wait past MAX_RETRY_DELAY is one a transport may not hold (Retry(after=) refuses it too).
            raise ConfigurationError(f"push subscription {self.group!r}: max_retry_after must be between 0 and "
                                     f"{MAX_RETRY_DELAY:.0f} seconds (14 days), got {self.max_retry_after!r}")
        limit = self.max_response_body
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigurationError(
                f"push subscription {self.group!r}: max_response_body must be a whole number of bytes >= 1, "
                f"got {limit!r}"
            )
        if self.secret is not None:
            secrets = (self.secret,) if isinstance(self.secret, str) else tuple(self.secret)
            for secret in secrets:
                # Standard Webhooks: a key of 24 to 64 bytes. A short one is most likely not a
                # key at all (``--secret nope`` decodes as base64 to 3 bytes, and signed with it).
                size = len(secret_key(secret))
                if not MIN_KEY_BYTES <= size <= MAX_KEY_BYTES:
                    raise ConfigurationError(
                        f"push subscription {self.group!r}: the secret's key is {size} bytes; Standard Webhooks "
                        f"keys are {MIN_KEY_BYTES} to {MAX_KEY_BYTES} (generate one with "
                        "choreograph.push.generate_secret())"
                    )
            fix("secret", secrets[0] if len(secrets) == 1 else secrets)
        if self.emits is not None:
            fix("emits", frozenset([self.emits] if isinstance(self.emits, str) else self.emits))
        for name, value in dict(self.headers).items():
            why = _header_refused(name, value)
            if why is not None:
                raise ConfigurationError(f"push subscription {self.group!r}: header {name!r}: {why}")
        fix("headers", dict(self.headers))
        try:
            compiled = compile_filters(self.filters, self.where)
        except FilterError as exc:
            raise FilterError(exc.path, exc.reason, owner=f"push subscription {self.group!r}") from None
        fix("filters", tuple(compiled.source[: len(self.filters or ())]) if compiled is not None else ())
        fix("filter", compiled)


class PushAmbassador:
    """Runs push subscriptions against a transport until stopped (like a :class:`~choreograph.Worker`).

    ``concurrency`` bounds the requests in flight per subscription; one pooled
    ``httpx.AsyncClient`` serves them all (pass ``client`` to configure TLS or proxies).
    ``store`` is the inbox (dedupe and failure history across processes; give a
    durable one in production). ``origin`` is what the handshake announces (default:
    this host's name). ``telemetry`` with metrics counts attempts by outcome and times
    requests (see :mod:`choreograph.telemetry`).
    """

    def __init__(
        self,
        subscriptions: Sequence[PushSubscription],
        transport: Transport,
        *,
        store: InboxStore | None = None,
        concurrency: int = 16,
        origin: str | None = None,
        client: httpx.AsyncClient | None = None,
        clock: Clock | None = None,
        max_hops: int = 64,
        drain_timeout: float = 10.0,
        poll_interval: float = 0.25,
        handshake_ttl: float = 3600.0,
        rng: Any = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency: must be >= 1")
        groups = [s.group for s in subscriptions]
        duplicated = sorted({g for g in groups if groups.count(g) > 1})
        if duplicated:
            raise ConfigurationError(f"push subscriptions: group {duplicated[0]!r} is used twice; one URL per group")
        self.subscriptions = list(subscriptions)
        self.transport = transport
        self.store = store or MemoryStore()
        self.concurrency = concurrency
        self.origin = origin or socket.gethostname() or "choreograph"
        why = _value_refused(self.origin) if any(sub.handshake for sub in subscriptions) else None
        if why is not None:  # sent in every handshake: it failed them all, each event retried to its end
            raise ConfigurationError(f"push ambassador: origin {self.origin!r}: {why}")
        self.clock = clock or getattr(transport, "clock", None) or SYSTEM_CLOCK
        self.max_hops = max_hops
        self.drain_timeout = drain_timeout
        self.poll_interval = poll_interval
        self.rng = rng
        self.telemetry = telemetry
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=concurrency * max(1, len(subscriptions)),
                                max_keepalive_connections=concurrency * max(1, len(subscriptions))),
            follow_redirects=False,
        )
        # httpx logs each request's URL whole (at INFO): its secrets masked, as in our own lines
        logging.getLogger("httpx").addFilter(REDACTED_URLS)
        self.handshakes = Handshakes(self.client, self.origin, self.clock, ttl=handshake_ttl)
        self.runners = [PushRunner(self, sub) for sub in self.subscriptions]
        self._started = False
        self._stopped = False
        self._release_now = False  # release_in_flight() was called: stop() drains nothing more
        self._lifecycle = asyncio.Lock()
        self._done = asyncio.Event()

    def stats(self, group: str | None = None) -> PushStats:
        """Counters of one subscription (or the sum over all)."""
        total = PushStats()
        for runner in self.runners:
            if group is None or runner.group == group:
                for field in dataclasses.fields(PushStats):
                    setattr(total, field.name, getattr(total, field.name) + getattr(runner.stats, field.name))
        return total

    async def start(self) -> None:
        # start() and stop() one at a time: a stop() during a start found a runner still subscribing
        # with nothing to stop, and the start went on pushing after it; a second stop() during a
        # stop returned before the pushes in flight had drained
        async with self._lifecycle:
            if self._started:
                return
            self._started = True
            try:
                await self.transport.connect()
                await self.store.open()
                for runner in self.runners:
                    await runner.start()
            except BaseException:
                # the runners started already would push on, unowned: ``async with`` calls no
                # ``__aexit__`` when ``__aenter__`` raises, and the caller saw the start fail
                await self._stop()
                raise

    async def wait(self) -> None:
        """Until ``stop()`` is called."""
        await self._done.wait()

    async def stop(self) -> None:
        """Drain (or release) pushes in flight, settle them, close the subscriptions and the client.

        Called during ``start()`` or another ``stop()``, it waits for that to finish first."""
        async with self._lifecycle:
            await self._stop()

    async def _stop(self) -> None:
        if self._stopped or not self._started:
            return
        self._stopped = True
        drain = 0.0 if self._release_now else self.drain_timeout
        await asyncio.gather(*(runner.stop(drain) for runner in self.runners))
        await self.handshakes.cancel()  # one its deliveries, all released, no longer wait for
        if self._own_client:
            await self.client.aclose()
        self._done.set()

    def release_in_flight(self) -> None:
        """Cut a drain short (a second Ctrl-C): the pushes still in flight are cancelled and their
        events released to the group at once, as when ``drain_timeout`` runs out; ``stop()`` then
        returns. Called before ``stop()``, it makes that stop drain nothing."""
        self._release_now = True
        for runner in self.runners:
            if runner.stopping:
                for task in list(runner.active):
                    task.cancel()

    async def __aenter__(self) -> PushAmbassador:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
