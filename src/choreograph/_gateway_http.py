"""The HTTP edge of the gateway: problem responses, bearer auth, content type, bounded body, payload errors.

Every error is an RFC 9457 problem document (``application/problem+json``) with a
``detail`` a person can act on; a payload error also lists each bad field as
``{"path": "$.items[0].qty", "reason": "...", "type": "..."}``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import pydantic
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from choreograph._event_wire import alias_keys, by_alias, field_path, not_carried
from choreograph._http_binding import BATCH, STRUCTURED
from choreograph._json_pairs import first_infinite, first_misread

if TYPE_CHECKING:
    from choreograph.events import Event

EventT = TypeVar("EventT", bound="Event")

PROBLEM_JSON = "application/problem+json"
IDEMPOTENCY_KEY_MAX = 255
INT_OUT_OF_RANGE = "integer out of range: events carry integers of at most 64 bits"
#: Arrays and objects one inside another a body may hold, itself counted: what pydantic's JSON
#: parser reads of an object (deeper, the strict check answered "not valid JSON", and from 255
#: serialising the event raised: a 500), well within orjson's 1024 (a consumer's read).
MAX_DEPTH = 200
TOO_DEEP = f"nested too deep: a body holds arrays and objects at most {MAX_DEPTH} levels deep"


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=dict(headers or {}), media_type="application/json")


class Problem(Exception):
    """An HTTP error answered as a problem document; raised anywhere in a request, turned into a response.

    ``status`` and ``detail`` say what was wrong; :meth:`response` is the RFC 9457 answer.
    Public as :class:`choreograph.push.Problem` (what :func:`~choreograph.push.read_event` raises).
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        type: str = "about:blank",
    ) -> None:
        super().__init__(detail)
        self.type = type
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})

    def response(self) -> Response:
        body: dict[str, Any] = {
            "type": self.type,
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        return Response(orjson.dumps(body), status_code=self.status, headers=self.headers, media_type=PROBLEM_JSON)


def check_bearer(request: Request, token: str | None) -> None:
    """401 unless ``Authorization: Bearer <token>`` matches (no check when ``token`` is ``None``)."""
    if token is None:
        return
    header = request.headers.get("authorization")
    if header is None:
        raise Problem(401, "missing bearer token", headers={"WWW-Authenticate": 'Bearer realm="choreograph"'})
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Problem(
            401, "invalid bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="choreograph", error="invalid_token"'},
        )


def check_json_content_type(request: Request) -> None:
    """415 unless the body is declared JSON (``application/json`` or ``application/*+json``, UTF-8 if a
    charset is given) and is not compressed (a gzip body would otherwise read as malformed JSON)."""
    given = request.headers.getlist("content-type")
    if len(given) > 1:  # read as the first here, perhaps as the last by a proxy in front
        raise Problem(400, "Content-Type: given more than once; which type is meant is undefined, send it once")
    header = given[0] if given else None
    if not header:
        raise Problem(415, "missing Content-Type; send application/json")
    media_type, *params = (part.strip() for part in header.split(";"))
    media_type = media_type.lower()
    if media_type == STRUCTURED:  # JSON, but the attributes where the route's model expects data
        raise Problem(415, f"unsupported Content-Type {media_type!r} (a CloudEvent in structured content mode): "
                           "send its data as an application/json body and its attributes as ce- headers "
                           "(binary content mode)")
    if media_type == BATCH:
        raise Problem(415, f"unsupported Content-Type {media_type!r} (a batch of CloudEvents): send one request "
                           "per event, its data as an application/json body and its attributes as ce- headers "
                           "(binary content mode)")
    if media_type != "application/json" and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise Problem(415, f"unsupported Content-Type {media_type!r}; send application/json")
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise Problem(415, f"unsupported charset {value.strip()!r}; send UTF-8 JSON")
    # every coding of every line (RFC 9110 8.4: a list, lines combined): the first line only
    # let "identity" then "gzip" through as an uncompressed body
    codings = [coding.strip().lower() for line in request.headers.getlist("content-encoding")
               for coding in line.split(",")]
    applied = [coding for coding in codings if coding not in ("", "identity")]
    if applied:
        raise Problem(415, f"unsupported Content-Encoding {', '.join(applied)!r}; send the body uncompressed")


async def read_body(request: Request, max_body: int) -> bytes:
    """The request body, refusing (413) one whose Content-Length or streamed size exceeds ``max_body`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.strip().isascii() and declared.strip().isdigit()):  # "²".isdigit(), int() refuses it
            raise Problem(400, f"Content-Length {declared!r} is not a number of bytes")
        digits = declared.strip().lstrip("0") or "0"
        # compared by length first: int() refuses a string of over 4,300 digits (a ValueError: a 500)
        if len(digits) > len(str(max_body)) or int(digits) > max_body:
            shown = digits if len(digits) <= 30 else f"a {len(digits)}-digit number of"
            raise Problem(413, f"body of {shown} bytes exceeds the limit of {max_body} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise Problem(413, f"body exceeds the limit of {max_body} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Problem(400, "client disconnected before sending the whole body") from None
    return b"".join(chunks)


def parse_payload(model: type[EventT], body: bytes) -> EventT:
    """``body`` validated as ``model`` the way a consumer will read it off the bus, or a 400/422 Problem.

    A worker reads an envelope with orjson and validates its ``data`` as Python objects, so
    the gateway does the same rather than let pydantic parse the JSON itself: what pydantic's
    own parser accepts but a consumer refuses (an integer beyond 64 bits, which orjson reads as
    a float) is a 422 here, not a 202 for an event every consumer dead-letters.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # valid JSON, but deeper than orjson reads (1024)
            raise Problem(422, f"invalid {model.__name__}: $: {TOO_DEEP} ({exc})",
                          errors=[{"path": "$", "reason": TOO_DEEP, "type": "too_deep"}]) from None
        infinite = first_infinite(body)  # valid JSON, but a number orjson reads as no float
        if infinite is None:
            raise Problem(400, f"body is not valid JSON: {exc}") from None
        path, integer = infinite
        reason = (INT_OUT_OF_RANGE if integer else
                  "number out of range: events carry numbers within a 64-bit float's (about 1.8e308)")
        raise Problem(422, f"invalid {model.__name__}: {path}: {reason}",
                      errors=[{"path": path, "reason": reason, "type": "number_out_of_range"}]) from None
    deep = too_deep(data) if body.count(b"[") + body.count(b"{") > MAX_DEPTH else None  # fewer: none is
    if deep is not None:
        raise Problem(422, f"invalid {model.__name__}: {deep}: {TOO_DEEP}",
                      errors=[{"path": deep, "reason": TOO_DEEP, "type": "too_deep"}])
    duplicate = duplicate_key(body)
    if duplicate is not None:
        reason = "the key is given twice in one object: which value is meant is undefined; send it once"
        raise Problem(422, f"invalid {model.__name__}: {duplicate}: {reason}",
                      errors=[{"path": duplicate, "reason": reason, "type": "duplicate_key"}])
    try:
        event: EventT = model.__pydantic_validator__.validate_python(data)
    except pydantic.ValidationError as exc:
        raise validation_problem(exc) from None
    # The bus carries the event serialised to JSON: a value that does not survive it (the
    # strings "inf" and "nan" pydantic reads as floats are published as null) reaches
    # every consumer invalid. Read it back as they will, and refuse it now.
    wire = orjson.loads(event.__pydantic_serializer__.to_json(event, by_alias=by_alias(model)))
    try:
        model.__pydantic_validator__.validate_python(wire)
    except pydantic.ValidationError as exc:
        raise _not_carried(event, wire, exc) from None
    # What the OpenAPI document promises: JSON types as its schema gives them. Lax validation
    # took ``true`` or ``"2"`` for an integer and ``1`` for a boolean, which a client written
    # from the schema never sends and never expects to read back. Strict JSON mode still reads
    # ISO dates, UUIDs, enums' values and object keys as the model's types; a number with a
    # zero fraction (``2.0``) is an integer to JSON Schema, so that refusal is not one.
    try:
        model.__pydantic_validator__.validate_json(body, strict=True)
    except pydantic.ValidationError as exc:
        wrong = [e for e in exc.errors(include_url=False, include_context=False) if not _integral(e)]
        if wrong:
            raise validation_problem(exc, wrong) from None
    collapsed = collapsed_set(event, data)
    if collapsed is not None:
        reason = ("an item (or key) is given more than once, or two are equal as the model reads them; "
                  "a set holds each item once, a mapping each key")
        raise Problem(422, f"invalid {model.__name__}: {collapsed}: {reason}",
                      errors=[{"path": collapsed, "reason": reason, "type": "duplicate_item"}])
    return event


def too_deep(data: Any) -> str | None:
    """The path of the first array or object of ``data`` (JSON read) at a depth beyond :data:`MAX_DEPTH`."""
    stack: list[tuple[Any, str, int]] = [(data, "$", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            items: Any = ((f"{path}.{key}", item) for key, item in value.items())
        elif isinstance(value, list):
            items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
        else:
            continue
        if depth > MAX_DEPTH:
            return path
        stack.extend(reversed([(item, sub, depth + 1) for sub, item in items if isinstance(item, (dict, list))]))
    return None


def collapsed_set(value: Any, sent: Any, path: str = "$") -> str | None:
    """The path of the first set of ``value`` (a validated model) with fewer items than the JSON
    array ``sent`` gave it: items dropped as duplicates, which the schema (``uniqueItems``) forbids;
    or of a mapping with fewer keys than the object sent (two keys one once read: ``"1"``, ``"01"``)."""
    if isinstance(value, (set, frozenset)):
        return path if isinstance(sent, list) and len(value) < len(sent) else None
    if isinstance(value, pydantic.BaseModel) and isinstance(sent, dict):
        fields = field_names_by_key(type(value))
        for key, item in sent.items():
            name = fields.get(key)
            if name is not None:  # by its name or by an alias the model reads it by
                found = collapsed_set(getattr(value, name), item, f"{path}.{key}")
                if found is not None:
                    return found
    elif isinstance(value, dict) and isinstance(sent, dict):
        if len(value) < len(sent):  # keys equal as the model reads them ("1" and "01" for an int)
            return path
        for key, v, item in zip(sent, value.values(), sent.values(), strict=False):
            found = collapsed_set(v, item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)) and isinstance(sent, list):
        for index, (v, item) in enumerate(zip(value, sent, strict=False)):
            found = collapsed_set(v, item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


_FIELD_NAMES: dict[type, dict[str, str]] = {}


def field_names_by_key(model: type[pydantic.BaseModel]) -> dict[str, str]:
    """The field name of each top-level key ``model`` reads a value from (an alias, a name)."""
    found = _FIELD_NAMES.get(model)
    if found is None:
        found = {}
        config = model.model_config
        by_name = bool(config.get("validate_by_name") or config.get("populate_by_name"))
        by_alias = config.get("validate_by_alias", True) is not False
        for name, field in model.__pydantic_fields__.items():
            keys = {name} if by_name else set()
            if by_alias:
                keys |= {field.alias or name} if field.validation_alias is None else alias_keys(field.validation_alias)
            for key in keys:
                found.setdefault(key, name)
        _FIELD_NAMES[model] = found
    return found


def duplicate_key(body: bytes) -> str | None:
    """The path (``$.items[0].qty``) of the first key given twice in one object of ``body``, if any.

    orjson keeps the last of the two values, silently (:func:`~choreograph._json_pairs.first_misread`).
    ``body`` is JSON orjson has read.
    """
    found = first_misread(body, ints=False)
    return None if found is None else found[0]


def _reason(error: Any) -> str:
    if error["type"] == "int_parsing_size":  # an integer orjson could not read as one
        return INT_OUT_OF_RANGE
    return str(error["msg"])


def _integral(error: Any) -> bool:
    """Whether a strict validation ``error`` is only a JSON number with a zero fraction given for
    an integer (JSON Schema counts ``2.0`` as one)."""
    value = error.get("input")
    return error["type"] == "int_type" and isinstance(value, float) and value.is_integer()


def validation_problem(exc: pydantic.ValidationError, errors: list[Any] | None = None) -> Problem:
    """400 for a body that is not JSON at all, else 422 naming every bad field (of ``errors``
    if given, a selection of ``exc``'s)."""
    if errors is None:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if errors and errors[0]["type"] == "json_invalid":
        return Problem(400, f"body is not valid JSON: {errors[0]['msg']}")
    items = [{"path": field_path(tuple(e["loc"])), "reason": _reason(e), "type": e["type"]} for e in errors]
    summary = "; ".join(f"{item['path']}: {item['reason']}" for item in items[:5])
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    return Problem(422, f"invalid {exc.title}: {summary}{more}", errors=items)


def _not_carried(event: Event, wire: Any, exc: pydantic.ValidationError) -> Problem:
    """422 for a payload that is valid as sent but not once published (read back off the bus)."""
    items = [
        {"path": path, "reason": f"not representable on the bus: {reason}", "type": "not_representable"}
        for path, reason in not_carried(event, wire, exc).items()
    ]
    summary = "; ".join(f"{item['path']}: {item['reason']}" for item in items[:5])
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    return Problem(422, f"invalid {exc.title}: {summary}{more}", errors=items)


def sent_json(event: Event) -> str:
    """What the client sent, as validated (key order and ``1`` vs ``1.0`` do not matter), for an
    idempotent request's fingerprint: not the defaults the model filled in (a ``default_factory``,
    a uuid or a time, differs per retry), and every set listed in one order. The model's JSON
    lists a set in its iteration order, which for strings changes with the process's hash seed:
    the same retry at a restarted gateway would be a 409."""
    sent = event.model_dump_json(exclude_unset=True)
    if not _holds_a_set(event):
        return sent  # unchanged: a key claimed before sets were sorted still replays
    return orjson.dumps(_sorted_sets(event, orjson.loads(sent))).decode()


def _holds_a_set(value: Any) -> bool:
    if isinstance(value, (set, frozenset)):
        return True
    if isinstance(value, pydantic.BaseModel):
        return any(_holds_a_set(getattr(value, name, None)) for name in type(value).model_fields)
    if isinstance(value, dict):
        return any(_holds_a_set(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_a_set(item) for item in value)
    return False


def _sorted_sets(value: Any, wire: Any) -> Any:
    """``wire``, the JSON of ``value``, with each set's items in sorted order. Both are walked
    together: the JSON lists a set's items, and a dict's keys, in the order ``value`` iterates them."""
    if isinstance(value, (set, frozenset)) and isinstance(wire, list):
        items = [_sorted_sets(v, w) for v, w in zip(value, wire, strict=False)]
        return sorted(items, key=lambda item: orjson.dumps(item, option=orjson.OPT_SORT_KEYS))
    if isinstance(value, pydantic.BaseModel) and isinstance(wire, dict):
        return {key: _sorted_sets(getattr(value, key, None), w) for key, w in wire.items()}
    if isinstance(value, dict) and isinstance(wire, dict):
        return {key: _sorted_sets(v, w) for key, v, w in zip(wire, value.values(), wire.values(), strict=False)}
    if isinstance(value, (list, tuple)) and isinstance(wire, list):
        return [_sorted_sets(v, w) for v, w in zip(value, wire, strict=False)]
    return wire


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header: 1-255 printable ASCII characters, given once, or 400."""
    keys = request.headers.getlist("idempotency-key")
    if not keys:
        return None
    if len(keys) > 1:  # one request, two keys: whichever were claimed, a retry sending the other is not matched
        raise Problem(400, "Idempotency-Key: given more than once; which key is meant is undefined, send it once")
    key = keys[0]
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not all(" " <= ch <= "~" for ch in key):
        raise Problem(400, f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters")
    return key
