"""Receiving pushed events in Python: an ASGI endpoint that verifies, decodes and answers by outcome.

A complete subscriber (run it with ``uvicorn module:app``)::

    from choreograph.push import receiver
    from examples.drone_delivery.events import DeliveryScheduled, DroneAssigned

    async def schedule(assigned: DroneAssigned) -> DeliveryScheduled:
        return DeliveryScheduled(delivery_id=assigned.delivery_id, ...)

    app = receiver(schedule, event=DroneAssigned, secret=os.environ["WEBHOOK_SECRET"])

The answer follows the push outcome table, so the ambassador does the right thing:
a returned event (or list) goes back as a CloudEvent in the response (200), ``None``
is 204, ``Reject`` and invalid payloads are 422, a malformed CloudEvent 400 (one this
would misread too: a ``ce-`` header given twice, with raw non-ASCII bytes or holding what no
CloudEvents String may, a control character or noncharacter, raw or percent-encoded; a JSON
key given twice, a ``Content-Type`` given twice; the message names it), JSON declared in a charset other than UTF-8 415
(it was read as UTF-8, mangled), a bad signature 401, ``Retry(after=)`` 503 with ``Retry-After``, any other exception 500 - an
event that cannot be sent as JSON too (a float ``inf`` or ``nan`` would go as ``null``,
which the ambassador's consumers refuse: :class:`~choreograph.EmitError`).
The ``OPTIONS`` handshake is answered for ``allowed_origins``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import orjson
import pydantic
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from choreograph._envelope import Envelope, derive_id, now_rfc3339
from choreograph._gateway_http import Problem, duplicate_key, read_body
from choreograph._http_binding import (
    BATCH,
    STRUCTURED,
    Mode,
    check_ce_headers,
    decode_http,
    is_json,
    json_charset_problem,
    media_type,
    to_batch,
    to_http,
)
from choreograph._webhook import (
    ALLOWED_ORIGIN,
    ALLOWED_RATE,
    DEFAULT_TOLERANCE,
    REQUEST_ORIGIN,
    REQUEST_RATE,
    SignatureError,
    secret_key,
    verify,
)
from choreograph.errors import ConfigurationError, MalformedEnvelope, Reject, Retry
from choreograph.events import Event, event_json, format_validation_error

log = logging.getLogger("choreograph.push.receiver")

MAX_BODY = 1 << 20
ReceiverHandler = Callable[..., Awaitable[Any]]


async def read_event(
    request: Request,
    *,
    secret: str | Sequence[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    max_body: int = MAX_BODY,
) -> Envelope:
    """The CloudEvent of a pushed request (binary or structured mode), signature checked if ``secret``.

    For use inside an existing Starlette or FastAPI endpoint. The body is read as
    :func:`receiver` reads it: streamed, and never more than ``max_body`` bytes (1 MiB by
    default) - a Content-Length over it is refused before reading, a chunked body once it
    passes the limit. The body is consumed: ``request.body()`` cannot read it again.

    Raises :class:`~choreograph.push.Problem` with ``status`` 413 for a body over
    ``max_body`` (its ``detail`` names the limit), 400 for a Content-Length that is not a
    number or a client that disconnects mid-body, 415 for JSON declared in a charset other than
    UTF-8 (``exc.response()`` is the answer :func:`receiver` would give); :class:`~choreograph.push.SignatureError` (401) or
    :class:`~choreograph.MalformedEnvelope` (400) for the event itself, one it would misread
    included (a ``ce-`` header given twice or with raw bytes beyond ASCII, a ``Content-Type`` or
    a JSON key given twice: which value is meant is undefined; a ``ce-`` header holding a control character or
    noncharacter, raw or percent-encoded), the message naming the header or key::

        try:
            envelope = await read_event(request, secret=SECRET, max_body=64 * 1024)
        except Problem as exc:
            return exc.response()
    """
    body = await read_body(request, max_body)
    if secret is not None:
        verify(request.headers, body, secret, tolerance=tolerance)
    return _decode(request.headers, body)


def _decode(headers: Headers, body: bytes) -> Envelope:
    """The CloudEvent of a request, held to what the gateway holds a client to: a ``ce-`` header
    given twice, with raw bytes beyond ASCII or whose value is no CloudEvents String, and a JSON
    key given twice (the data's, or the structured envelope's), and a ``Content-Type`` given twice
    are a :class:`MalformedEnvelope` naming it, not one value kept (or a control character handed to the handler). JSON declared in
    a charset other than UTF-8 is a 415 :class:`Problem` naming the header (it was read as UTF-8)."""
    types = headers.getlist("content-type")
    if len(types) > 1:  # the checks here read the first, decode_http the last: JSON went unchecked
        raise MalformedEnvelope("Content-Type: given more than once; which type is meant is undefined, send it once")
    content_type = types[0] if types else None
    charset_problem = json_charset_problem(content_type)
    if charset_problem is not None:  # JSON in latin-1 was read as UTF-8: mangled, or a misleading 400
        raise Problem(415, f"Content-Type: {charset_problem}")
    structured = media_type(content_type) in (STRUCTURED, BATCH)
    if not structured:
        check_ce_headers(headers.items())  # Starlette's items(): every header as received
    envelope = decode_http(headers, body)
    if body and (structured or is_json(content_type)):
        duplicate = duplicate_key(body)
        if duplicate is not None:
            where = duplicate if structured else f"data: {duplicate}"
            raise MalformedEnvelope(f"{where}: the key is given twice in one object; which value is meant "
                                    "is undefined, send it once", event_id=envelope.id)
    return envelope


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _takes_envelope(handler: ReceiverHandler) -> bool:
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


def _as_envelopes(result: Any, cause: Envelope, source: str) -> list[Envelope]:
    """The events ``result`` answers with; :class:`~choreograph.EmitError` for one whose JSON
    would not read back as valid (a float inf or nan, sent as null): a 500, as any handler bug."""
    items = [] if result is None else list(result) if isinstance(result, (list, tuple)) else [result]
    out = []
    for index, item in enumerate(items):
        if isinstance(item, Envelope):
            out.append(item)
        elif isinstance(item, Event):
            cls = type(item)
            out.append(Envelope(
                id=derive_id(cause.id, source, "receiver", index), source=source, type=cls.event_type(),
                data=orjson.loads(event_json(item)), time=now_rfc3339(), dataschema=cls.schema_uri(),
                correlationid=cause.correlationid or cause.id, causationid=cause.id,
            ))
        else:
            raise TypeError(f"receiver handler returned {type(item).__name__}; expected None, Event or Envelope")
    return out


def _check_secrets(secret: str | Sequence[str] | None) -> None:
    """:class:`~choreograph.errors.ConfigurationError` for a ``secret`` no signature can be checked
    with: one that is not ``whsec_`` and base64 (every delivery was a 500 its sender retried, as
    verifying read the key only then), or an empty list (every delivery a 401). Any key length
    is taken: a receiver verifies with whatever its sender chose."""
    if secret is None:
        return
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets:
        raise ConfigurationError("receiver: secret is an empty list; give at least one, or None to "
                                 "disable signature checks")
    for index, one in enumerate(secrets):
        try:
            secret_key(one)
        except ConfigurationError as exc:
            where = "" if isinstance(secret, str) else f"[{index}]"
            raise ConfigurationError(f"receiver: secret{where}: {exc}") from None


def receiver(
    handler: ReceiverHandler,
    *,
    secret: str | Sequence[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    event: type[Event] | None = None,
    allowed_origins: Collection[str] = ("*",),
    path: str = "/",
    source: str = "/choreograph/receiver",
    response_mode: Mode = "binary",
    max_body: int = MAX_BODY,
) -> Starlette:
    """An ASGI app receiving pushed CloudEvents at ``path`` and calling ``handler``.

    ``handler`` receives the payload parsed into ``event`` (a choreograph Event class),
    or the :class:`~choreograph.Envelope` when ``event`` is ``None``; if it takes a
    second positional parameter it also receives the envelope. ``secret=None``
    disables signature checks (only for trusted networks); a secret that is not one
    (``whsec_`` and base64), or an empty list, is a :class:`~choreograph.errors.ConfigurationError` here. A body over ``max_body``
    bytes is answered 413, whether its Content-Length says so or it arrives chunked.
    """
    _check_secrets(secret)
    with_envelope = _takes_envelope(handler)
    allow_any = "*" in allowed_origins

    async def handshake(request: Request) -> Response:
        headers = {"Allow": "POST, OPTIONS"}
        origin = request.headers.get(REQUEST_ORIGIN)
        if origin is None:
            return Response(status_code=204, headers=headers)
        if not (allow_any or origin in allowed_origins):
            return _error(403, f"origin {origin!r} may not deliver here", headers)
        headers[ALLOWED_ORIGIN] = origin
        if REQUEST_RATE in request.headers:
            headers[ALLOWED_RATE] = "*"
        return Response(status_code=200, headers=headers)

    async def deliver(request: Request) -> Response:
        try:  # streamed: a chunked body stops being read at the limit, it is not held whole first
            body = await read_body(request, max_body)
        except Problem as exc:
            return _error(exc.status, exc.detail)
        try:
            if secret is not None:
                verify(request.headers, body, secret, tolerance=tolerance)
            envelope = _decode(request.headers, body)
        except Problem as exc:
            return _error(exc.status, exc.detail)
        except SignatureError as exc:
            return _error(401, str(exc))
        except MalformedEnvelope as exc:
            return _error(400, str(exc))
        payload: Any = envelope
        if event is not None:
            if envelope.type != event.event_type():
                return _error(400, f"type {envelope.type!r}: this endpoint receives {event.event_type()!r}")
            try:
                payload = event.model_validate(envelope.data)
            except pydantic.ValidationError as exc:
                return _error(422, format_validation_error(exc))
        try:
            result = await (handler(payload, envelope) if with_envelope else handler(payload))
            outputs = _as_envelopes(result, envelope, source)
        except Reject as exc:
            return _error(422, exc.reason)
        except Retry as exc:
            headers = {"Retry-After": str(math.ceil(exc.after))} if exc.after is not None else None
            return _error(503, exc.message, headers)
        except Exception as exc:
            log.exception("receiver handler failed on %s", envelope.id)
            return _error(500, f"{type(exc).__name__}: {exc}")
        if not outputs:
            return Response(status_code=204)
        headers, content = to_http(outputs[0], response_mode) if len(outputs) == 1 else to_batch(outputs)
        return Response(content, status_code=200, headers=headers)

    async def endpoint(request: Request) -> Response:
        return await (handshake(request) if request.method == "OPTIONS" else deliver(request))

    return Starlette(routes=[Route(path, endpoint, methods=["POST", "OPTIONS"])])
