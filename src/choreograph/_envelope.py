"""CloudEvents 1.0 structured-JSON envelopes: the only thing that travels on the bus.

An :class:`Envelope` is plain data. ``encode`` turns it into the bytes a transport
stores; ``decode`` turns bytes back and raises :class:`MalformedEnvelope` (naming the
attribute and the reason) for anything that is not a valid CloudEvent, so the
runtime can dead-letter it instead of crashing.

Output ids are deterministic (:func:`derive_id`): the same input handled by the same
handler always yields the same output ids, which is what makes a re-run after a
crash harmless downstream (the consumer's inbox drops the duplicate).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

import msgspec
import orjson

from choreograph.errors import MalformedEnvelope

SPECVERSION = "1.0"
DEFAULT_CONTENT_TYPE = "application/json"

#: Context attributes that are not extensions (CloudEvents 1.0 core).
CORE_ATTRIBUTES = frozenset(
    {"id", "source", "type", "specversion", "time", "subject", "datacontenttype", "dataschema", "data"}
)
#: Extensions choreograph reads and writes itself.
KNOWN_EXTENSIONS = frozenset(
    {"correlationid", "causationid", "traceparent", "tracestate", "hops", "partitionkey", "deadline"}
)
_EXTENSION_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
#: An RFC 3339 ``date-time`` with its field ranges ([0-9], not \d, which also matches non-ASCII digits).
_RFC3339 = re.compile(
    r"(?!0000)[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
#: Optional core attributes: when present they must be non-empty strings (CloudEvents 1.0).
_NON_EMPTY_OPTIONAL = ("time", "subject", "datacontenttype", "dataschema")

#: What a CloudEvents String must not hold (the 1.0.2 type system): control characters
#: (U+0000-U+001F, U+007F-U+009F), surrogate code points, and Unicode noncharacters
#: (U+FDD0-U+FDEF and the last two code points of every plane).
_NOT_IN_A_STRING = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
    + "]"
)


def string_problem(value: str) -> str | None:
    """Why ``value`` cannot be a CloudEvents String attribute, or ``None`` if it can.

    Checked where choreograph *makes* an attribute (a handler's subject, a publisher's
    correlation id, a service's source...), never on decode: an event another producer sent
    with such a character is still handled as it is, and what an output inherits from its
    input (correlation id, trace context, partition key, deadline) is carried as is. The HTTP
    edges are the exception: the gateway and ``receiver()`` answer 400 to a ``ce-`` header
    holding one (``_http_binding.check_ce_headers``), as a client can send it again.

    >>> string_problem("a\\nb")
    'contains a control character (U+000A at index 1), which a CloudEvents String must not'
    """
    if value.isprintable():  # in C, and what nearly every value is: none of those is printable
        return None
    found = _NOT_IN_A_STRING.search(value)  # whitespace, format characters...: printable or not, allowed
    if found is None:
        return None
    code = ord(found.group())
    kind = ("a control character" if code <= 0x9F else
            "a surrogate code point" if 0xD800 <= code <= 0xDFFF else "a Unicode noncharacter")
    return f"contains {kind} (U+{code:04X} at index {found.start()}), which a CloudEvents String must not"


def attribute_problem(name: str, value: object) -> str | None:
    """``"<name>: <why>"`` if ``value`` (a string, or anything else a caller passed) cannot be
    the CloudEvents attribute ``name``; ``None`` if it can (``None`` itself: not set)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return f"{name}: expected a string, got {type(value).__name__}"
    if not value:
        return f"{name}: must be a non-empty string"
    problem = string_problem(value)
    return None if problem is None else f"{name}: {value!r} {problem}"


_NAMESPACE = uuid.UUID("6f2b1a0e-3c59-4d8e-9a41-2f4c6d8b7e10")
_NAMESPACE_BYTES = _NAMESPACE.bytes


def new_id() -> str:
    """A fresh event id: a UUIDv7 (RFC 9562) - the Unix time in milliseconds, then 74 random bits.

    Time-ordered on purpose: the ids an inbox records arrive in about key order, so its
    B-tree inserts land on the same few pages instead of a random page each (bench/ids.py:
    on the SQLite inbox with 200,000 ids retained, 16.7 µs of CPU per recorded id with
    random ids, 5.1 with time-ordered ones). Outputs keep their input's time (:func:`derive_id`).
    """
    t = f"{time.time_ns() // 1_000_000:012x}"
    try:
        h = _RANDOM.pop()
    except IndexError:
        h = _refill()
    return f"{t[:8]}-{t[8:12]}-7{h[:3]}-{_VARIANT[h[3]]}{h[4:7]}-{h[7:19]}"


#: Random hex for new ids, 20 digits each, drawn from ``os.urandom`` 256 ids at a time: a
#: system call per id cost more than the rest of ``new_id``. ``list.pop`` is atomic, so two
#: threads never get the same digits; a forked child drops its parent's (``_forget``).
_RANDOM: list[str] = []


def _refill() -> str:
    digits = os.urandom(2560).hex()
    _RANDOM.extend([digits[i:i + 20] for i in range(20, 5120, 20)])
    return digits[:20]


def _forget() -> None:
    _RANDOM.clear()


os.register_at_fork(after_in_child=_forget)


#: A canonical time-ordered UUID (version 7, or 8 as derive_id makes them): its first 48 bits are a time.
_TIMED_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[78][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def derive_id(input_id: str, service: str, handler: str, index: int | str) -> str:
    """The id of output ``index`` of ``handler`` in ``service`` handling event ``input_id``.

    Stable across processes and re-runs, distinct for every (input, service, handler,
    index): the SHA-1 of the four parts under a fixed namespace, as a UUID5. When the input
    id is time-ordered (a UUIDv7 from :func:`new_id`, or one derived here from such an id)
    the output keeps the input's 48-bit time and takes 74 bits of that hash: a UUIDv8 with
    the UUIDv7 layout, so a whole transaction's ids stay time-ordered for the inboxes that
    record them. Computed by hand (equal to ``uuid.uuid5`` in the plain case) because it
    runs once per output on the hot path.
    """
    return derive_id_with(input_id, id_suffix(service, handler, index))


def id_suffix(service: str, handler: str, index: int | str) -> bytes:
    """What :func:`derive_id` hashes after the input id: the same for every input of a handler's
    output ``index``, so the worker makes it once (``Handler.id_suffix0``)."""
    return f"\x1f{service}\x1f{handler}\x1f{index}".encode()


def derive_id_with(input_id: str, suffix: bytes) -> str:
    """``derive_id(input_id, service, handler, index)`` given ``id_suffix(service, handler, index)``."""
    h = hashlib.sha1(_NAMESPACE_BYTES + input_id.encode() + suffix).hexdigest()
    if len(input_id) == 36 and _TIMED_ID.fullmatch(input_id):
        return f"{input_id[:13]}-8{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
    # version 5 in the 13th hex digit; the variant (10xx) in the top bits of the 17th
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_VARIANT = {digit: "89ab"[int(digit, 16) & 0x3] for digit in "0123456789abcdef"}
_second_stamp: tuple[int, str] = (-1, "")


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with microseconds (``2026-01-01T12:00:00.000001Z``).

    Runs for every event emitted, so the date-and-seconds part is formatted once a second
    and the microseconds by concatenation (several times cheaper than a format spec).
    """
    global _second_stamp
    ns = time.time_ns()
    second = ns // 1_000_000_000
    if second != _second_stamp[0]:
        _second_stamp = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return _second_stamp[1] + str(1_000_000 + ns // 1000 % 1_000_000)[1:] + "Z"


def rfc3339(epoch: float) -> str:
    """Epoch seconds as :func:`now_rfc3339` writes the current time (``2026-01-01T12:00:00.000001Z``):
    the ``time`` of an event stamped on a clock other than the real one (a test's VirtualClock).

    The year has four digits (``0999-...``: ``%Y`` wrote ``999-...``, which no reader takes for
    RFC 3339, and the event was dead-lettered as malformed). A time outside the years 0001-9999
    raises ``ValueError`` saying so."""
    try:
        second, micro = divmod(round(epoch * 1_000_000), 1_000_000)
        t = datetime.fromtimestamp(second, UTC)
    except (ValueError, OverflowError, OSError):
        raise ValueError(
            f"time {epoch!r} (epoch seconds) is not in the years 0001-9999, which an RFC 3339 timestamp "
            "(a CloudEvent's time) can carry here"
        ) from None
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{micro:06d}Z"


class Envelope(msgspec.Struct):
    """One CloudEvent as choreograph sees it.

    ``data`` is any JSON value. Unknown extensions are kept in ``extensions`` and
    written back unchanged, so an envelope survives a round trip through any
    service untouched.

    >>> env = Envelope(id="1", source="/demo", type="demo.ping", data={"n": 1})
    >>> decode(encode(env)).data
    {'n': 1}
    """

    id: str
    source: str
    type: str
    data: Any = None
    time: str | None = None
    subject: str | None = None
    datacontenttype: str | None = DEFAULT_CONTENT_TYPE
    dataschema: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    hops: int = 0
    partitionkey: str | None = None
    deadline: str | None = None
    extensions: dict[str, Any] = msgspec.field(default_factory=dict)
    specversion: str = SPECVERSION

    def to_dict(self) -> dict[str, Any]:
        """The structured-mode JSON object (CloudEvents JSON format)."""
        out: dict[str, Any] = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
        }
        # written out (not a loop over the names): this runs for every event published
        if self.time is not None:
            out["time"] = self.time
        if self.subject is not None:
            out["subject"] = self.subject
        if self.datacontenttype is not None:
            out["datacontenttype"] = self.datacontenttype
        if self.dataschema is not None:
            out["dataschema"] = self.dataschema
        if self.correlationid is not None:
            out["correlationid"] = self.correlationid
        if self.causationid is not None:
            out["causationid"] = self.causationid
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        if self.tracestate is not None:
            out["tracestate"] = self.tracestate
        if self.partitionkey is not None:
            out["partitionkey"] = self.partitionkey
        if self.deadline is not None:
            out["deadline"] = self.deadline
        out["hops"] = self.hops
        out.update(self.extensions)
        if self.data is not None:
            out["data"] = self.data
        return out


def encode(envelope: Envelope) -> bytes:
    """Serialise to CloudEvents structured JSON (UTF-8 bytes)."""
    try:
        return orjson.dumps(envelope.to_dict())
    except TypeError as exc:
        raise MalformedEnvelope(f"data: not JSON-serialisable ({exc})", event_id=envelope.id) from exc


def is_rfc3339(value: str) -> bool:
    """Whether ``value`` is an RFC 3339 timestamp (what the CloudEvents ``time`` attribute must be).

    Shape and field ranges by pattern; days past the 28th against the calendar (31 February).
    Leap seconds (``:60``) and year 0000 are refused: no Python datetime, and few consumers,
    can hold them. Runs for every event decoded, hence the cheap common case.
    """
    if _RFC3339.fullmatch(value) is None:
        return False
    if value[8:10] <= "28":  # every month has 28 days
        return True
    try:
        date(int(value[:4]), int(value[5:7]), int(value[8:10]))
    except ValueError:
        return False
    return True


def _require_str(obj: Mapping[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = obj.get(name)
    if value is None:
        if optional:
            return None
        raise MalformedEnvelope(f"{name}: required attribute is missing", event_id=_id_of(obj))
    if not isinstance(value, str):
        raise MalformedEnvelope(f"{name}: expected a string, got {type(value).__name__}", event_id=_id_of(obj))
    if not value and (not optional or name in _NON_EMPTY_OPTIONAL):
        raise MalformedEnvelope(f"{name}: must be a non-empty string", event_id=_id_of(obj))
    if name == "time" and not is_rfc3339(value):
        raise MalformedEnvelope(f"time: expected an RFC 3339 timestamp, got {value!r}", event_id=_id_of(obj))
    return value


def _id_of(obj: Mapping[str, Any]) -> str | None:
    value = obj.get("id")
    return value if isinstance(value, str) else None


_OPTIONAL_STRINGS = ("time", "subject", "datacontenttype", "dataschema", "correlationid", "causationid",
                     "traceparent", "tracestate", "partitionkey", "deadline")
_ALL_KNOWN = CORE_ATTRIBUTES | KNOWN_EXTENSIONS


_STR_OR_NONE = frozenset({str, type(None)})
_fullmatch_rfc3339 = _RFC3339.fullmatch


def from_dict(obj: Any) -> Envelope:
    """Build an envelope from a decoded structured-mode JSON object, validating it."""
    # Fast path (every event on the hot path): well-formed, no unknown extensions, a day of
    # month up to 28. Written for speed: the checks run in C (map, set) where they can.
    if type(obj) is dict and obj.get("specversion") == SPECVERSION and obj.keys() <= _ALL_KNOWN:
        get = obj.get
        id_, source, type_, hops = get("id"), get("source"), get("type"), get("hops", 0)
        strings = tuple(map(get, _OPTIONAL_STRINGS))  # time first
        time_ = strings[0]
        if (
            type(id_) is str and id_ and type(source) is str and source and type(type_) is str and type_
            and type(hops) is int and hops >= 0
            and set(map(type, strings)) <= _STR_OR_NONE and "" not in strings
            and (time_ is None or (_fullmatch_rfc3339(time_) is not None and time_[8:10] <= "28"))
        ):
            t = strings
            return Envelope(id_, source, type_, get("data"), t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], hops,
                            t[8], t[9])
    return _from_dict_checked(obj)


def _from_dict_checked(obj: Any) -> Envelope:
    if not isinstance(obj, dict):
        raise MalformedEnvelope(f"$: expected a JSON object, got {type(obj).__name__}")
    spec = _require_str(obj, "specversion")
    if spec != SPECVERSION:
        raise MalformedEnvelope(f"specversion: unsupported version {spec!r} (expected '1.0')", event_id=_id_of(obj))
    hops = obj.get("hops", 0)
    if isinstance(hops, str) and hops.isascii() and hops.isdigit():  # may arrive as a string (HTTP binary mode)
        # int() refuses over 4,300 digits (a ValueError: no MalformedEnvelope, the consumer's
        # loop or a receiver's 500); over 19 is past any count of hops a 64-bit integer holds
        if len(hops.lstrip("0")) > 19:
            raise MalformedEnvelope(f"hops: expected a non-negative 64-bit integer, got a string of "
                                    f"{len(hops)} digits", event_id=_id_of(obj))
        hops = int(hops.lstrip("0") or "0")  # int() counts leading zeros against its 4,300 digits
    if not isinstance(hops, int) or isinstance(hops, bool) or hops < 0:
        raise MalformedEnvelope(f"hops: expected a non-negative integer, got {hops!r}", event_id=_id_of(obj))
    extensions: dict[str, Any] = {}
    for key, value in obj.items():
        if key in CORE_ATTRIBUTES or key in KNOWN_EXTENSIONS or key == "data_base64":
            continue
        if not key or not set(key) <= _EXTENSION_NAME_CHARS:
            raise MalformedEnvelope(
                f"{key}: extension names must be lower-case letters and digits", event_id=_id_of(obj)
            )
        if isinstance(value, (dict, list)):  # not in the CloudEvents type system
            raise MalformedEnvelope(
                f"{key}: extension values must be strings, numbers or booleans, got {type(value).__name__}",
                event_id=_id_of(obj),
            )
        extensions[key] = value
    if obj.get("data_base64") is not None:  # null: absent, as for any optional attribute
        problem = _data_base64_problem(obj["data_base64"], obj.get("data"))
        if problem is not None:
            raise MalformedEnvelope(f"data_base64: {problem}", event_id=_id_of(obj))
        extensions["data_base64"] = obj["data_base64"]
    return Envelope(
        id=_require_str(obj, "id"),  # type: ignore[arg-type]
        source=_require_str(obj, "source"),  # type: ignore[arg-type]
        type=_require_str(obj, "type"),  # type: ignore[arg-type]
        data=obj.get("data"),
        time=_require_str(obj, "time", optional=True),
        subject=_require_str(obj, "subject", optional=True),
        datacontenttype=_require_str(obj, "datacontenttype", optional=True),
        dataschema=_require_str(obj, "dataschema", optional=True),
        correlationid=_require_str(obj, "correlationid", optional=True),
        causationid=_require_str(obj, "causationid", optional=True),
        traceparent=_require_str(obj, "traceparent", optional=True),
        tracestate=_require_str(obj, "tracestate", optional=True),
        hops=hops,
        partitionkey=_require_str(obj, "partitionkey", optional=True),
        deadline=_require_str(obj, "deadline", optional=True),
        extensions=extensions,
    )


def _data_base64_problem(value: Any, data: Any) -> str | None:
    """Why ``value`` cannot be an event's ``data_base64`` beside its ``data``, or ``None``. The JSON
    format (3.1) has binary data as a base64 JSON string, which the reader MUST decode, and the
    two members mutually exclusive: one whose bytes cannot be told, or two payloads, is
    malformed (it was carried, and failed only where pushed, or reached a handler as is)."""
    if not isinstance(value, str):
        return f"expected a base64 string, got {type(value).__name__}"
    if data is not None:
        return "an event carries data or data_base64, not both (CloudEvents JSON format 3.1)"
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        return f"not valid base64 ({exc})"
    return None


_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _Common(msgspec.Struct, forbid_unknown_fields=True):
    """The shape nearly every envelope on the bus has: CloudEvents 1.0, choreograph's own
    extensions only, every string present non-empty. msgspec checks all of that while it
    parses (in C); anything else takes the general path of :func:`from_dict`."""

    specversion: Literal["1.0"]
    id: _NonEmpty
    source: _NonEmpty
    type: _NonEmpty
    data: msgspec.Raw = msgspec.Raw(b"null")  # parsed by orjson, as on the general path
    time: _NonEmpty | None = None
    subject: _NonEmpty | None = None
    datacontenttype: _NonEmpty | None = None
    dataschema: _NonEmpty | None = None
    correlationid: _NonEmpty | None = None
    causationid: _NonEmpty | None = None
    traceparent: _NonEmpty | None = None
    tracestate: _NonEmpty | None = None
    hops: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0  # orjson reads larger ones as floats
    partitionkey: _NonEmpty | None = None
    deadline: _NonEmpty | None = None


_decode_common = msgspec.json.Decoder(_Common).decode
_loads = orjson.loads


def decode(body: bytes | str) -> Envelope:
    """Parse structured-mode JSON into an :class:`Envelope` or raise :class:`MalformedEnvelope`.

    Two paths, one result: the common shape (:class:`_Common`) is parsed and checked in one
    pass; whatever it does not accept - unknown extensions, empty strings, errors of any
    kind - is parsed by orjson and checked by :func:`from_dict`, which names what is wrong.
    ``data`` is parsed by orjson on both paths, so its values are the same either way.
    """
    try:
        c = _decode_common(body)
        t = c.time
        raw = c.data
        if (t is None or (_fullmatch_rfc3339(t) is not None and t[8:10] <= "28")) and (
            len(raw) < 2048 or _shallow(bytes(raw))
        ):
            return Envelope(c.id, c.source, c.type, _loads(memoryview(raw)), t, c.subject, c.datacontenttype,
                            c.dataschema, c.correlationid, c.causationid, c.traceparent, c.tracestate, c.hops,
                            c.partitionkey, c.deadline)
    except (msgspec.DecodeError, orjson.JSONDecodeError, RecursionError, UnicodeEncodeError):
        # RecursionError: msgspec's nesting limit follows the stack (orjson's is 1024 levels);
        # UnicodeEncodeError: a str body holding a lone surrogate.
        pass
    return _decode_general(body)


def _shallow(data: bytes) -> bool:
    """Whether ``data`` surely nests less than 1,000 deep: parsed on its own, orjson's limit
    (1,024 levels) would count from ``data`` rather than from the envelope around it."""
    return data.count(b"[") + data.count(b"{") < 1000


def _decode_general(body: bytes | str) -> Envelope:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedEnvelope(f"$: not valid JSON ({exc})") from exc
    return from_dict(obj)
