"""The CloudEvents 1.0 HTTP protocol binding: an :class:`Envelope` to and from an HTTP message.

Three content modes (CloudEvents HTTP binding §3), chosen by the sender:

* **binary**: every attribute in a ``ce-<name>`` header (values percent-encoded as
  §3.1.3.2 requires, and read back as it has a receiver read them: double-quoted strings
  unescaped first, as older senders quote), ``datacontenttype`` as ``Content-Type``
  (when absent, ``application/json`` as the JSON format implies, or
  ``application/octet-stream`` for ``data_base64`` bytes), the data alone as the body. What most receivers want: the body is the business payload. Extension values
  arrive as strings.
* **structured**: the whole event as ``application/cloudevents+json`` (the bytes that
  travel on the bus, unchanged).
* **batch**: a JSON array of structured events as ``application/cloudevents-batch+json``
  (used for a response that carries several output events).

A receiver never has to be told the mode: :func:`decode_http` recognises it from the
headers. Decoding raises :class:`~choreograph.errors.MalformedEnvelope` naming what is
wrong, so an HTTP endpoint can answer 400 with that message.

In binary mode the body is interpreted by its ``Content-Type``: JSON media types
(``application/json``, ``*/*+json``, or none at all) are parsed into ``data`` (JSON is UTF-8:
one declared in another charset is refused, in every mode, not misread); text
(``text/*``, XML, or any type with a ``charset``) becomes a string; anything else is
kept as ``data_base64`` so no byte is lost.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import quote, unquote

import orjson

from choreograph._envelope import Envelope, decode, encode, from_dict, string_problem
from choreograph.errors import MalformedEnvelope

Mode = Literal["binary", "structured"]
MODES: tuple[Mode, ...] = ("binary", "structured")

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
#: What binary-mode data without a datacontenttype is sent as (RFC 2046: bytes of no known type).
OCTET_STREAM = "application/octet-stream"
HEADER_PREFIX = "ce-"

#: Printable ASCII minus space, '"' and '%': what a ce- header value may carry unencoded.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
#: What a Content-Type header value may hold: printable ASCII, space and tab inside (RFC 9110
#: field-value without obs-text, as h11 checks it; a media type and its parameters are ASCII, RFC 2046/6838).
_CONTENT_TYPE_SAFE = re.compile(r"[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?")
#: Attributes that are not ce- headers in binary mode.
_NOT_HEADERS = frozenset({"data", "data_base64", "datacontenttype"})

Headers = dict[str, str]


def media_type(content_type: str | None) -> str:
    """``"Application/JSON; charset=utf-8"`` → ``"application/json"`` (``""`` for none)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _charset(content_type: str | None) -> str | None:
    for param in (content_type or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


def is_json(content_type: str | None) -> bool:
    """Whether data of this content type is JSON (CloudEvents: absent means JSON)."""
    mt = media_type(content_type)
    return mt in ("", "application/json", "text/json") or mt.endswith("+json")


def json_charset_problem(content_type: str | None) -> str | None:
    """Why a body of ``content_type`` cannot be read as JSON for its ``charset``, or ``None``.

    JSON exchanged between systems is UTF-8 (RFC 8259 8.1, which defines no ``charset`` for
    ``application/json``), and orjson reads bytes as UTF-8 whatever the header says: the Latin-1
    bytes of ``"Ã©"`` read back as ``"é"`` (mangled, not refused), UTF-16 as "not valid JSON".
    So a JSON type (binary mode's ``application/json``, structured and batch mode's ``+json``)
    declared in any other charset is refused; UTF-8 under any name Python knows it by is read.
    """
    charset = _charset(content_type)
    if charset is None or not is_json(content_type):
        return None
    try:
        if codecs.lookup(charset).name == "utf-8":
            return None
    except LookupError:
        pass
    return f"charset {charset!r}: JSON is UTF-8 (RFC 8259 8.1); send the body as UTF-8, or leave the charset out"


def _check_json_charset(content_type: str | None, event_id: str | None = None) -> None:
    problem = json_charset_problem(content_type)
    if problem is not None:
        raise MalformedEnvelope(f"Content-Type: {problem}", event_id=event_id)


def _is_text(content_type: str | None) -> bool:
    mt = media_type(content_type)
    return (
        mt.startswith("text/") or mt in ("application/xml", "application/javascript")
        or mt.endswith("+xml") or _charset(content_type) is not None
    )


def _lower(headers: Mapping[str, str]) -> Headers:
    return {name.lower(): value for name, value in headers.items()}


def is_cloudevent(headers: Mapping[str, str]) -> bool:
    """Whether an HTTP message with these headers claims to carry CloudEvents (any mode).

    Any ``ce-`` header claims binary mode, as in :func:`decode_http`: a message that
    carries ``ce-type`` but forgot ``ce-specversion`` is an invalid event to report, not
    a plain answer to ignore.
    """
    lowered = _lower(headers)
    return (
        any(name.startswith(HEADER_PREFIX) and len(name) > len(HEADER_PREFIX) for name in lowered)
        or media_type(lowered.get("content-type")) in (STRUCTURED, BATCH)
    )


# -- encoding -------------------------------------------------------------------------


def header_value(value: Any) -> str:
    """``value`` as a ``ce-`` header carries it (3.1.3.2: percent-encoded beyond printable ASCII,
    space, ``"`` and ``%``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return quote(value if isinstance(value, str) else str(value), safe=_SAFE)


def _data_bytes(envelope: Envelope) -> bytes:
    if "data_base64" in envelope.extensions:
        try:
            return base64.b64decode(str(envelope.extensions["data_base64"]), validate=True)
        except binascii.Error as exc:
            raise MalformedEnvelope(f"data_base64: not valid base64 ({exc})", event_id=envelope.id) from None
    data = envelope.data
    if data is None:
        return b""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str) and not is_json(envelope.datacontenttype):
        charset = _charset(envelope.datacontenttype) or "utf-8"
        try:
            return data.encode(charset)
        except LookupError:
            raise MalformedEnvelope(f"datacontenttype: unknown charset {charset!r}", event_id=envelope.id) from None
        except UnicodeError as exc:  # UnicodeEncodeError, or its base (the undefined and idna codecs)
            raise MalformedEnvelope(f"datacontenttype: the data is not encodable in {charset} ({exc})",
                                    event_id=envelope.id) from None
    problem = json_charset_problem(envelope.datacontenttype)
    if problem is not None:  # an outside producer's: the body goes as UTF-8, which the header denies
        raise MalformedEnvelope(f"datacontenttype: {problem}: binary mode cannot carry the event, structured "
                                "mode can", event_id=envelope.id)
    try:
        return orjson.dumps(data)
    except TypeError as exc:
        raise MalformedEnvelope(f"data: not JSON-serialisable ({exc})", event_id=envelope.id) from exc


def to_binary(envelope: Envelope) -> tuple[Headers, bytes]:
    """Headers and body of ``envelope`` in binary content mode.

    The W3C ``traceparent``/``tracestate`` headers are set too, so an HTTP-instrumented
    receiver joins the event's trace without knowing about CloudEvents.
    """
    content_type = envelope.datacontenttype
    if content_type is not None:
        content_type = content_type.strip(" \t")  # optional whitespace around a field value (RFC 9110 5.5)
        # An outside producer's value, carried as it is on the bus (decode is lenient): httpx refused
        # to send it (UnicodeEncodeError, or h11's "Illegal header value"), on every attempt.
        problem = content_type_problem(content_type)
        if problem is not None:
            raise MalformedEnvelope(f"datacontenttype: {content_type!r} {problem}: binary mode cannot carry "
                                    "the event, structured mode can", event_id=envelope.id)
    headers: Headers = {}
    for name, value in envelope.to_dict().items():
        if name in _NOT_HEADERS or value is None:
            continue
        headers[HEADER_PREFIX + name] = header_value(value)
    body = _data_bytes(envelope)
    if content_type is not None:
        headers["content-type"] = content_type
    elif body:
        # On the bus (JSON format) an absent datacontenttype means JSON, and data_base64 bytes;
        # in binary mode the body stands alone, so say which, or the receiver cannot know (the
        # bytes b"123" were read back as the number 123, b"hi" as the string "hi").
        headers["content-type"] = OCTET_STREAM if "data_base64" in envelope.extensions else "application/json"
    _trace_headers(envelope, headers)
    return headers, body


def content_type_problem(value: str) -> str | None:
    """Why ``value`` (a ``datacontenttype``, whitespace around it aside) cannot be sent as an HTTP
    ``Content-Type``, or ``None`` if it can."""
    if _CONTENT_TYPE_SAFE.fullmatch(value.strip(" \t")):
        return None
    return "cannot be an HTTP Content-Type (a media type is printable ASCII, RFC 2046 and RFC 9110)"


def to_structured(envelope: Envelope, body: bytes | None = None) -> tuple[Headers, bytes]:
    """Headers and body of ``envelope`` in structured content mode.

    ``body`` is the envelope already encoded (the bytes from the bus), sent as is.
    """
    headers: Headers = {"content-type": f"{STRUCTURED}; charset=utf-8"}
    _trace_headers(envelope, headers)
    return headers, body if body is not None else encode(envelope)


def to_batch(envelopes: Sequence[Envelope]) -> tuple[Headers, bytes]:
    """Headers and body of several events in batch content mode."""
    body = orjson.dumps([envelope.to_dict() for envelope in envelopes])
    return {"content-type": f"{BATCH}; charset=utf-8"}, body


def to_http(envelope: Envelope, mode: Mode = "binary", body: bytes | None = None) -> tuple[Headers, bytes]:
    """Headers and body of ``envelope`` in ``mode`` (``body``: its structured encoding, if at hand)."""
    if mode == "binary":
        return to_binary(envelope)
    if mode == "structured":
        return to_structured(envelope, body)
    raise ValueError(f"mode: expected 'binary' or 'structured', got {mode!r}")


#: A W3C Trace Context ``traceparent``: version-trace id-parent id-flags, lower-case hex; a later
#: version than 00 may append ``-`` and more (section 3.2.4).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)

#: The longest ``traceparent`` or ``tracestate`` sent as a W3C header: 512 characters, what
#: OpenTelemetry's propagator reads (W3C asks a vendor to propagate at least 512 of a tracestate).
TRACE_HEADER_MAX = 512


def w3c_traceparent(value: str) -> bool:
    """Whether ``value`` is a valid W3C ``traceparent`` a receiver would continue (section 3.2):
    no version ``ff``, nothing after the flags in version 00, no all-zero id, at most 512 characters."""
    if len(value) > TRACE_HEADER_MAX:
        return False
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return False
    version, trace_id, parent_id, _, rest = match.groups()
    return (version != "ff" and not (version == "00" and rest) and trace_id != "0" * 32
            and parent_id != "0" * 16)


def _trace_headers(envelope: Envelope, headers: Headers) -> None:
    """The W3C headers of the event's trace context, if it is one: a valid ``traceparent`` (and
    its ``tracestate``, if header-safe and at most 512 characters). An outside producer's value
    beyond printable ASCII went raw into a header httpx refuses to send, and the push failed on
    every attempt; one of any length went as it was, so a structured-mode push of an event with
    an oversized one was turned away by a receiver's header limit (nginx answers 400 over 8 KiB)
    and dead-lettered, for a header no receiver would read. Binary mode still carries the value,
    percent-encoded, in ``ce-traceparent``, structured mode in the event."""
    if envelope.traceparent and w3c_traceparent(envelope.traceparent) and _header_safe(envelope.traceparent):
        headers["traceparent"] = envelope.traceparent
        tracestate = envelope.tracestate
        if tracestate and len(tracestate) <= TRACE_HEADER_MAX and _header_safe(tracestate):
            headers["tracestate"] = tracestate


def _header_safe(value: str) -> bool:
    """Whether ``value`` can go into a header as it is: printable ASCII, no space at either end
    (RFC 9110 5.5: h11 refuses to send it, and every attempt failed as a connection error)."""
    return value.isascii() and value.isprintable() and value == value.strip(" ")


# -- decoding -------------------------------------------------------------------------


def _data_from_body(body: bytes, content_type: str | None, event_id: str | None) -> dict[str, Any]:
    """The ``data`` (or ``data_base64``) attribute for a binary-mode body."""
    if not body:
        return {}
    _check_json_charset(content_type, event_id)
    if is_json(content_type):
        try:
            return {"data": orjson.loads(body)}
        except orjson.JSONDecodeError as exc:
            if content_type:  # declared JSON: it must be JSON
                raise MalformedEnvelope(f"data: body is not valid JSON ({exc})", event_id=event_id) from None
            # no Content-Type at all: fall through to text or bytes
    if _is_text(content_type) or not content_type:
        charset = _charset(content_type) or "utf-8"
        try:
            codecs.lookup(charset)
            # LookupError here too: a codec that is no text encoding (base64, rot13, zlib...)
            return {"data": body.decode(charset)}
        except LookupError:
            raise MalformedEnvelope(f"datacontenttype: unknown charset {charset!r}", event_id=event_id) from None
        except UnicodeError as exc:  # not only UnicodeDecodeError: punycode, idna, undefined raise its base
            if content_type:
                raise MalformedEnvelope(f"data: body is not valid {charset} ({exc})", event_id=event_id) from None
    return {"data_base64": base64.b64encode(body).decode("ascii")}


def check_ce_headers(headers: Iterable[tuple[str, str]]) -> None:
    """Raise :class:`MalformedEnvelope` naming the first ``ce-`` header of ``headers`` (the
    ``(name, value)`` pairs as received, duplicates kept) given more than once, holding raw
    bytes beyond ASCII, or whose value, decoded, is no CloudEvents String (a control character,
    raw or percent-encoded, or a noncharacter). A mapping keeps one of two values, silently; an
    HTTP server reads raw UTF-8 as Latin-1 (``é`` as ``Ã©``), where the binding (3.1.3.2) has the
    sender percent-encode UTF-8. What the gateway and :func:`~choreograph.push.receiver` check
    before :func:`binary_attributes`, which stays lenient (the push ambassador reads a
    subscriber's answer with it)."""
    seen: set[str] = set()
    for raw_name, value in headers:
        name = raw_name.lower()
        if not name.startswith(HEADER_PREFIX):
            continue
        if name in seen:
            raise MalformedEnvelope(f"{name}: given more than once; which value is meant is undefined, send it once")
        seen.add(name)
        if not value.isascii():
            raise MalformedEnvelope(f"{name}: characters beyond ASCII must be percent-encoded as UTF-8 "
                                    "(CloudEvents HTTP binding 3.1.3.2)")
        problem = string_problem(_header_text(name, value))
        if problem is not None:
            raise MalformedEnvelope(f"{name}: {problem}")


def _unquote_strings(name: str, value: str) -> str:
    """``value`` with each double-quoted string (RFC 7230 3.2.6) replaced by its content, a
    backslash escaping the character after it; :class:`MalformedEnvelope` for one left open."""
    out: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            out.append(char)
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        else:
            out.append(char)
    if quoted:
        raise MalformedEnvelope(f"{name}: a double-quoted string is not closed (a '\"' in a value is sent "
                                "percent-encoded, %22)")
    return "".join(out)


def _header_text(name: str, value: str) -> str:
    """The attribute value a ``ce-`` header ``name`` carries: double-quoted strings unescaped, then
    one round of percent-decoding, as the binding (3.1.3.2) has a receiver do (we send neither
    quotes nor spaces, but older senders quote); :class:`MalformedEnvelope` naming the header if
    a quoted string is left open or the percent-encoded bytes are not UTF-8."""
    if '"' in value:
        value = _unquote_strings(name, value)
    if "%" not in value:
        return value
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise MalformedEnvelope(f"{name}: percent-encoded value is not valid UTF-8") from None


def binary_attributes(headers: Mapping[str, str]) -> dict[str, Any]:
    """The attributes of a binary-mode message's ``ce-*`` headers (names without the prefix,
    values decoded by :func:`_header_text`); :class:`MalformedEnvelope` naming the header if one is
    invalid or ``ce-specversion`` is missing. What :func:`decode_binary` and the gateway read."""
    attributes: dict[str, Any] = {}
    for name, value in _lower(headers).items():
        if name.startswith(HEADER_PREFIX) and len(name) > len(HEADER_PREFIX):
            attributes[name[len(HEADER_PREFIX):]] = _header_text(name, value)
    if "specversion" not in attributes:
        raise MalformedEnvelope("ce-specversion: header is missing (binary content mode)")
    for name in sorted(_NOT_HEADERS):
        if name in attributes:
            raise MalformedEnvelope(f"ce-{name}: not allowed as a header (binary content mode)")
    return attributes


def decode_binary(headers: Mapping[str, str], body: bytes) -> Envelope:
    """The event of a binary-mode HTTP message (``ce-*`` headers + body)."""
    lowered = _lower(headers)
    attributes = binary_attributes(lowered)
    content_type = lowered.get("content-type")
    attributes["datacontenttype"] = content_type  # absent stays absent (None), not the JSON default
    event_id = attributes.get("id") if isinstance(attributes.get("id"), str) else None
    attributes.update(_data_from_body(body, content_type, event_id))
    return from_dict(attributes)


def decode_http(headers: Mapping[str, str], body: bytes) -> Envelope:
    """The one event of an HTTP message in binary or structured mode.

    Raises :class:`MalformedEnvelope` if the message is not a CloudEvent, is a batch, or
    is an invalid one.
    """
    lowered = _lower(headers)
    mt = media_type(lowered.get("content-type"))
    if mt == STRUCTURED:
        _check_json_charset(lowered.get("content-type"))
        return decode(body)
    if mt == BATCH:
        raise MalformedEnvelope(f"Content-Type: {BATCH} carries several events; expected one")
    if any(name.startswith(HEADER_PREFIX) for name in lowered):
        return decode_binary(lowered, body)
    raise MalformedEnvelope(
        "not a CloudEvent: no ce-specversion header (binary mode) and Content-Type "
        f"{lowered.get('content-type')!r} is not {STRUCTURED} (structured mode)"
    )


def decode_http_batch(headers: Mapping[str, str], body: bytes) -> list[Envelope]:
    """Every event of an HTTP message in any content mode (batch included)."""
    lowered = _lower(headers)
    if media_type(lowered.get("content-type")) != BATCH:
        return [decode_http(lowered, body)]
    _check_json_charset(lowered.get("content-type"))
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedEnvelope(f"$: not valid JSON ({exc})") from None
    if not isinstance(items, list):
        raise MalformedEnvelope(f"$: a batch must be a JSON array, got {type(items).__name__}")
    envelopes = []
    for index, item in enumerate(items):
        try:
            envelopes.append(from_dict(item))
        except MalformedEnvelope as exc:
            raise MalformedEnvelope(f"$[{index}].{exc.message}", event_id=exc.event_id) from None
    return envelopes
