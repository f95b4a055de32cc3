"""The HTTP ingestion gateway: typed events in over HTTP, onto the bus, nothing lost.

>>> gateway = Gateway(
...     routes=[Route("POST", "/deliveries", DeliveryRequested, name="request_delivery", deadline=600)],
...     broker="sqlite:///./var/bus.db",
...     journal="sqlite:///./var/journal.db",      # enables GET /transactions/...
...     idempotency="sqlite:///./var/gateway.db",  # durable Idempotency-Key handling
... )                                                # doctest: +SKIP
>>> asgi_app = gateway.asgi()                        # doctest: +SKIP  (serve with uvicorn, or `choreograph gateway`)

``POST /deliveries`` validates the JSON body against the event's model, publishes the
event under a fresh id (which is the transaction's correlation id) and answers ``202``
with ``{"correlation_id", "status_url"}`` and a ``Location`` header, only once the
broker holds the event. Errors are problem documents: ``400`` not JSON, ``401`` bad
bearer token, ``409`` an ``Idempotency-Key`` conflict (problem ``type``
:data:`KEY_IN_FLIGHT`: the first request is still running, retry; :data:`KEY_REUSED`:
the key was used with a different body), ``413`` body over ``max_body``, ``415`` not
JSON, ``422`` invalid payload (every bad field named by its path, e.g.
``$.items[0].qty``; a key given twice, a set item given twice, a number JSON cannot carry, arrays and objects nested over 200 deep), ``503`` broker unavailable (retry; with an ``Idempotency-Key``
the retry is safe), or idempotency store unavailable (only a request with a key needs it;
the ``detail`` names which). The journal is opened only by ``/transactions``: a journal
that cannot be opened is their ``503``, never a POST's.

A CloudEvents SDK client may send the body in binary content mode: its ``ce-*`` headers are
published with the event (``ce-id`` is the event id and is idempotent as an
``Idempotency-Key`` is; see :mod:`choreograph._gateway_cloudevents`), or are a ``400`` naming
the header; the OpenAPI document lists them as header parameters. Structured mode
(``application/cloudevents+json``) is a ``415``.

A key reused with a different body is a ``409``, not the ``422`` the IETF
idempotency-key draft suggests: the body itself is valid, it conflicts with the
server's state, and a client that reads ``422`` as "fix your payload" would be misled.
``GET /openapi.json`` is the OpenAPI 3.1 document; ``GET /healthz`` says it is alive,
``GET /readyz`` whether the broker answers and the idempotency store is open (503 naming what
is not; not the journal, which only ``/transactions`` needs).

With ``telemetry=`` each published event gets a PRODUCER span continuing the request's
W3C ``traceparent`` header (or a new trace) and carries it on; without, no ``traceparent``
is set. See :mod:`choreograph.telemetry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send

from choreograph._clock import SYSTEM_CLOCK, Clock, SystemClock
from choreograph._envelope import attribute_problem, new_id
from choreograph._gateway_cloudevents import cloudevent_attributes
from choreograph._gateway_http import (
    Problem,
    check_bearer,
    check_json_content_type,
    idempotency_key,
    json_response,
    parse_payload,
    read_body,
    sent_json,
)
from choreograph._gateway_idempotency import IdempotencyStore, MemoryIdempotencyStore, open_idempotency_store
from choreograph._gateway_openapi import build_openapi
from choreograph._journal_model import STATUSES, Status, format_time
from choreograph.errors import ConfigurationError, StoreError
from choreograph.events import Event, is_event_class
from choreograph.journal import Journal, open_journal_store
from choreograph.runtime.publisher import Publisher
from choreograph.runtime.records import first_envelope
from choreograph.transports import open_transport
from choreograph.transports.base import Transport

if TYPE_CHECKING:
    from choreograph.telemetry import Telemetry

__all__ = ["KEY_IN_FLIGHT", "KEY_REUSED", "Gateway", "Route"]

log = logging.getLogger("choreograph.gateway")

DEFAULT_BROKER = "sqlite:///./var/bus.db"
_PATH = re.compile(r"^/[A-Za-z0-9._~\-/]*$")
_RESERVED = ("/healthz", "/readyz", "/openapi.json", "/transactions")
#: Seconds ``/readyz`` waits for the broker's answer (and the stores', probed at the same time).
READY_TIMEOUT = 2.0
_METHODS = ("POST", "PUT", "PATCH")

#: The idempotency scope of ``ce-id``s: one for every route (an event id is unique across them).
CE_ID_SCOPE = " ce-id"
_Part = Literal["broker", "idempotency store", "journal"]

KEY_REUSED = "urn:choreograph:problem:idempotency-key-reused"
"""Problem type of a 409: the Idempotency-Key was first used with another body (do not retry)."""
KEY_IN_FLIGHT = "urn:choreograph:problem:idempotency-key-in-flight"
"""Problem type of a 409: the first request with this key has not finished (retry after Retry-After)."""


@dataclasses.dataclass(frozen=True)
class Route:
    """``METHOD path`` publishes an ``event`` built from the JSON body.

    ``name`` is the OpenAPI operationId (default: ``publish_<event class>``).
    ``deadline`` (seconds) stamps the envelope's ``deadline`` extension: the journal
    calls the transaction stuck, and announces ``choreograph.timedout``, if it has not
    ended by then.
    """

    method: str
    path: str
    event: type[Event]
    name: str | None = None
    deadline: float | None = None
    summary: str | None = None

    def __post_init__(self) -> None:
        method = self.method.upper()
        if method not in _METHODS:
            raise ConfigurationError(f"Route {self.path!r}: method {self.method!r} must be one of {', '.join(_METHODS)}")
        if not _PATH.match(self.path) or "//" in self.path:
            raise ConfigurationError(f"Route {self.path!r}: a path is '/' then letters, digits, '-._~/' (no parameters)")
        if any(self.path == r or self.path.startswith(r + "/") for r in _RESERVED):
            raise ConfigurationError(f"Route {self.path!r}: the gateway serves {', '.join(_RESERVED)} itself")
        if not is_event_class(self.event):
            raise ConfigurationError(f"Route {self.path!r}: event must be an Event subclass, got {self.event!r}")
        if self.deadline is not None and self.deadline <= 0:
            raise ConfigurationError(f"Route {self.path!r}: deadline must be > 0 seconds")
        object.__setattr__(self, "method", method)
        if self.name is None:
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", self.event.__name__).lower()
            object.__setattr__(self, "name", f"publish_{snake}")


class Gateway:
    """An ASGI app (Starlette) that turns HTTP requests into events on the bus.

    ``broker`` is a URL or a :class:`Transport` (the gateway closes only what it opened).
    ``journal`` (a URL or a :class:`Journal`) enables ``GET /transactions`` and
    ``GET /transactions/{correlation_id}``; a URL is opened read-only (the journal process
    creates and writes it). ``auth_token`` requires
    ``Authorization: Bearer <token>`` on every route but ``/healthz``, ``/readyz`` and
    ``/openapi.json``. ``idempotency`` is where ``Idempotency-Key``s are kept (a
    ``sqlite:///`` URL for durability; default: this process's memory). ``telemetry``
    traces each publish (see :mod:`choreograph.telemetry`).
    """

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        broker: str | Transport = DEFAULT_BROKER,
        journal: str | Journal | None = None,
        auth_token: str | None = None,
        max_body: int = 64 * 1024,
        idempotency: str | IdempotencyStore | None = None,
        source: str = "/gateway",
        title: str = "choreograph gateway",
        version: str = "1.0.0",
        clock: Clock | None = None,
        idempotency_ttl: float = 24 * 3600.0,
        idempotency_lease: float = 30.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.routes = list(routes)
        if not self.routes:
            raise ConfigurationError("Gateway: give at least one Route")
        seen: set[tuple[str, str]] = set()
        names: set[str | None] = set()
        for route in self.routes:
            if (route.method, route.path) in seen or route.name in names:
                raise ConfigurationError(f"Gateway: duplicate route {route.method} {route.path} ({route.name})")
            seen.add((route.method, route.path))
            names.add(route.name)
        if max_body < 1:
            raise ConfigurationError("Gateway: max_body must be >= 1 byte")
        if auth_token is not None and not auth_token:
            raise ConfigurationError("Gateway: auth_token must not be empty (None disables auth)")
        problem = attribute_problem("source", source)
        if problem is not None:  # every event published here carries it (unless a ce-source header overrides it)
            raise ConfigurationError(f"Gateway: {problem}")
        self._owns_transport = isinstance(broker, str)
        self.transport = open_transport(broker) if isinstance(broker, str) else broker
        self._owns_journal = isinstance(journal, str)
        # Read-only: the gateway only answers /transactions from what the journal records. Opened
        # for writing, it created a journal file at a mistyped URL (answering 404 for ever rather
        # than saying there is none), migrated a journal under its writer, and could not read a
        # journal it may not write (a read-only volume).
        self.journal = (
            Journal(open_journal_store(journal, read_only=True), clock=clock) if isinstance(journal, str) else journal
        )
        if idempotency is None:
            idempotency = MemoryIdempotencyStore()
        self.idempotency = open_idempotency_store(idempotency) if isinstance(idempotency, str) else idempotency
        self.auth_token = auth_token
        self.max_body = max_body
        self.source = source
        self.clock = clock or SYSTEM_CLOCK
        self.idempotency_ttl = idempotency_ttl
        self.idempotency_lease = idempotency_lease
        self.telemetry = telemetry
        self.publisher = Publisher(self.transport, source=source, telemetry=telemetry)
        self._openapi = build_openapi(
            self.routes, title=title, version=version, auth=auth_token is not None, journal=self.journal is not None
        )
        self._opened: set[_Part] = set()
        self._locks: dict[_Part, asyncio.Lock] = {}
        self._app: Starlette | None = None
        self._unready: frozenset[_Part] = frozenset()  # what /readyz last found unavailable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The gateway is itself an ASGI app (``uvicorn module:gateway`` works on the object)."""
        await self.asgi()(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document served at ``/openapi.json``."""
        return self._openapi

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the broker and open the stores (requests do this lazily if it failed)."""
        await self._open("broker")
        await self._open("idempotency store")
        if self.journal is not None:
            await self._open("journal")

    async def _open(self, part: _Part) -> None:
        """Connect to the broker or open a store, once. Each on its own: a request opens only what
        it needs (a POST without an Idempotency-Key needs no idempotency store, none the journal)."""
        if part in self._opened:
            return
        async with self._locks.setdefault(part, asyncio.Lock()):  # one each: a hung broker holds up no store
            if part in self._opened:
                return
            if part == "broker":
                await self.transport.connect()
            elif part == "idempotency store":
                await self.idempotency.open()
            elif self.journal is not None:
                await self.journal.open()
            self._opened.add(part)

    async def close(self) -> None:
        """Close what the gateway opened."""
        self._opened.clear()
        if self._owns_transport:
            await self.transport.close()
        await self.idempotency.close()
        if self.journal is not None and self._owns_journal:
            await self.journal.close()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            await self.start()
        except Exception as exc:  # serve anyway: requests answer 503 and retry the connection
            log.error("gateway could not connect at startup: %s", exc)
        try:
            yield
        finally:
            await self.close()

    async def _ensure_started(self, *parts: _Part) -> None:
        """503 naming the part (broker, idempotency store, journal) that cannot be reached."""
        for part in parts:
            try:
                await self._open(part)
            except Exception as exc:
                raise Problem(503, f"{part} unavailable: {exc}; retry", headers={"Retry-After": "1"}) from exc

    # -- the ASGI app -------------------------------------------------------------------

    def instrument(self, telemetry: Telemetry | None) -> None:
        """Trace (and count) what this gateway publishes from now on: what ``choreograph gateway
        --otel`` / ``--metrics-port`` call on a gateway built without ``telemetry=``."""
        self.telemetry = self.publisher.telemetry = telemetry

    def asgi(self) -> Starlette:
        """The Starlette application (built once)."""
        if self._app is None:
            # One Starlette route per path, whatever its methods: one per Route answered a method
            # the path lacks with a 405 whose Allow named the first Route's method only.
            by_path: dict[str, dict[str, Route]] = {}
            for route in self.routes:
                by_path.setdefault(route.path, {})[route.method] = route
            routes = [
                StarletteRoute(path, self._endpoint(methods), methods=list(methods),
                               name="|".join(str(route.name) for route in methods.values()))
                for path, methods in by_path.items()
            ]
            routes.append(StarletteRoute("/openapi.json", self._openapi_endpoint, methods=["GET"]))
            routes.append(StarletteRoute("/healthz", self._healthz, methods=["GET"]))
            routes.append(StarletteRoute("/readyz", self._readyz, methods=["GET"]))
            if self.journal is not None:
                routes.append(StarletteRoute("/transactions", self._list_transactions, methods=["GET"]))
                routes.append(StarletteRoute("/transactions/{correlation_id}", self._get_transaction, methods=["GET"]))
            self._app = Starlette(
                routes=routes,
                lifespan=self._lifespan,
                exception_handlers={Problem: _problem_handler, HTTPException: _http_exception_handler},
            )
        return self._app

    def _endpoint(self, methods: dict[str, Route]) -> Any:
        """The endpoint of one path: the Route of the request's method (Starlette let only these in)."""
        async def endpoint(request: Request) -> Response:
            return await self._publish(request, methods[request.method])

        endpoint.__name__ = "_".join(str(route.name) for route in methods.values()) or "publish"
        return endpoint

    async def _publish(self, request: Request, route: Route) -> Response:
        check_bearer(request, self.auth_token)
        check_json_content_type(request)
        key = idempotency_key(request)
        attributes = cloudevent_attributes(request.headers.items(), route.event)
        ce_id = attributes.id if attributes is not None else None
        if ce_id is not None and key is not None:
            raise Problem(400, "ce-id: send it or an Idempotency-Key, not both (the event id makes retries "
                               "idempotent itself)")
        body = await read_body(request, self.max_body)
        event = parse_payload(route.event, body)
        # An Idempotency-Key is claimed per route; a ce-id across routes: it is the event id.
        scope, header = (route.name or route.path, "Idempotency-Key") if ce_id is None else (CE_ID_SCOPE, "ce-id")
        key = key if ce_id is None else ce_id
        await self._ensure_started("broker", *(("idempotency store",) if key is not None else ()))
        now = self.clock.time()
        correlation_id = ce_id or new_id()
        if key is not None:
            sent = sent_json(event)
            also = "\0".join(filter(None, [
                attributes.fingerprint() if attributes is not None else "", route.name if ce_id is not None else "",
            ]))
            fingerprint = hashlib.sha256(f"{sent}\0{also}".encode() if also else sent.encode()).hexdigest()
            try:
                claim = await self.idempotency.claim(
                    scope, key, fingerprint, correlation_id, now, lease=self.idempotency_lease, ttl=self.idempotency_ttl
                )
            except Exception as exc:
                raise Problem(503, f"idempotency store unavailable: {exc}; retry", headers={"Retry-After": "1"}) from exc
            if claim.outcome == "mismatch":
                if ce_id is not None:
                    raise Problem(409, f"ce-id {ce_id!r} was already used for another event (another body, attributes "
                                       "or route); consumers would drop this one as a duplicate: use a new id",
                                  type=KEY_REUSED)
                raise Problem(409, "Idempotency-Key was already used with a different body; use a new key",
                              type=KEY_REUSED)
            if claim.outcome == "in_flight":
                raise Problem(409, f"a request with this {header} is in flight; retry later",
                              headers={"Retry-After": "1"}, type=KEY_IN_FLIGHT)
            if claim.outcome == "replay":
                return self._accepted(request, claim.correlation_id, replayed=True)
            correlation_id = claim.correlation_id
        deadline = format_time(now + route.deadline) if route.deadline is not None else None
        envelope = first_envelope(
            event, source=self.source, id=correlation_id, deadline=deadline,
            subject=attributes.subject if attributes is not None else None,
            time=None if type(self.clock) is SystemClock else now,  # a test's clock's time (None: now)
        )
        if attributes is not None:
            attributes.apply(envelope)
        try:
            if self.telemetry is None:
                await self.publisher.publish_envelopes([envelope])
            else:
                with self.telemetry.incoming(request.headers):
                    await self.publisher.publish_envelopes([envelope])
        except Exception as exc:
            log.error("publishing %s failed: %s", route.event.event_type(), exc)
            if key is not None:
                with contextlib.suppress(Exception):
                    await self.idempotency.release(scope, key)
            raise Problem(
                503, f"could not publish to the broker ({exc}); retry (with an Idempotency-Key a retry is safe)",
                headers={"Retry-After": "1"},
            ) from exc
        if key is not None:
            try:
                await self.idempotency.complete(scope, key)
            except Exception as exc:  # published: answer 202; a retry after the lease republishes the same id
                log.error("could not record Idempotency-Key as done: %s", exc)
        return self._accepted(request, correlation_id, replayed=False)

    def _accepted(self, request: Request, correlation_id: str, *, replayed: bool) -> Response:
        headers: dict[str, str] = {}
        status_url = None
        if self.journal is not None:
            status_url = f"{request.scope.get('root_path', '')}/transactions/{correlation_id}"
            headers["Location"] = status_url
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return json_response({"correlation_id": correlation_id, "status_url": status_url}, 202, headers)

    async def _openapi_endpoint(self, request: Request) -> Response:
        try:
            return json_response(self._openapi)
        except TypeError:  # an integer beyond 64 bits in an event's schema (Field(lt=10**20)): orjson has none
            import json

            return Response(json.dumps(self._openapi, ensure_ascii=False), media_type="application/json")

    async def _healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        """Ready when the broker answers now (``Transport.ping``) and the idempotency store is open,
        both probed at once within ``READY_TIMEOUT``: ``/healthz`` says the process lives, this
        whether an event can be taken in. A load balancer that probes it stops sending POSTs an
        outage would answer 503. A store already open costs nothing to probe; one that cannot be
        opened is named, as the 503 of a request that needs it names it (the broker alone was
        probed: a gateway whose idempotency store could not be opened said it was ready and
        answered every keyed POST 503). The journal is not probed: it serves only
        ``/transactions``, whose own 503 names it, and its outage must not take every replica's
        intake out of rotation."""
        parts: list[_Part] = ["broker", "idempotency store"]
        # shielded: a timeout must not cancel a start() half way through connecting
        probes = [asyncio.shield(self._probe(part)) for part in parts]
        try:
            await asyncio.wait(probes, timeout=READY_TIMEOUT)
        finally:
            for probe in probes:
                probe.cancel()  # the shield only (what it guards runs on); a late error is not logged as unseen
        reasons: dict[_Part, str] = {}
        for part, probe in zip(parts, probes, strict=True):
            error = None if probe.cancelled() else probe.exception()
            if probe.cancelled() or error is not None:
                reasons[part] = f"no answer within {READY_TIMEOUT:g}s" if error is None else str(error)
        unready = frozenset(reasons)
        if unready and unready != self._unready:  # logged when it changes, not at every probe
            log.warning("gateway not ready: %s", "; ".join(f"{part}: {why}" for part, why in reasons.items()))
        elif self._unready and not unready:
            log.info("gateway ready: %s answer%s again", ", ".join(sorted(self._unready)),
                     "s" if len(self._unready) == 1 else "")
        self._unready = unready
        if unready:  # the probe needs no token: the reasons stay in the log (they may name hosts and paths)
            reason = "; ".join(f"{part} unavailable" for part in reasons)
            return json_response({"status": "unavailable", "reason": reason}, 503, {"Retry-After": "1"})
        return json_response({"status": "ready"})

    async def _probe(self, part: _Part) -> None:
        await self._open(part)
        if part == "broker":
            await self.transport.ping()

    async def _list_transactions(self, request: Request) -> Response:
        check_bearer(request, self.auth_token)
        assert self.journal is not None
        await self._ensure_started("journal")
        status = request.query_params.get("status")
        if status is not None and status not in STATUSES:
            raise Problem(422, f"status {status!r}: expected one of {', '.join(STATUSES)}",
                          errors=[{"path": "$.status", "reason": "unknown status", "type": "enum"}])
        raw_limit = request.query_params.get("limit", "100")
        digits = raw_limit.lstrip("0")  # "²".isdigit(); and int() refuses over 4,300 digits (a ValueError)
        limit = int(digits or "0") if raw_limit.isascii() and raw_limit.isdigit() and len(digits) <= 4 else 0
        if not 1 <= limit <= 1000:
            shown = raw_limit if len(raw_limit) <= 40 else f"{raw_limit[:20]}... ({len(raw_limit)} characters)"
            raise Problem(422, f"limit {shown!r}: expected an integer from 1 to 1000",
                          errors=[{"path": "$.limit", "reason": "out of range", "type": "range"}])
        try:
            found = await self.journal.transactions(status=_status(status), limit=limit)
        except StoreError as exc:
            raise Problem(503, f"journal unavailable: {exc}", headers={"Retry-After": "1"}) from exc
        return json_response({"transactions": [tx.to_dict() for tx in found]})

    async def _get_transaction(self, request: Request) -> Response:
        check_bearer(request, self.auth_token)
        assert self.journal is not None
        await self._ensure_started("journal")
        correlation_id = request.path_params["correlation_id"]
        try:
            tx = await self.journal.transaction(correlation_id)
        except StoreError as exc:
            raise Problem(503, f"journal unavailable: {exc}", headers={"Retry-After": "1"}) from exc
        if tx is None:
            raise Problem(404, f"no transaction {correlation_id!r} in the journal (yet)")
        return json_response(tx.to_dict())


def _status(value: str | None) -> Status | None:
    for status in STATUSES:
        if value == status:
            return status
    return None


async def _problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return Problem(exc.status_code, exc.detail, headers=exc.headers).response()
