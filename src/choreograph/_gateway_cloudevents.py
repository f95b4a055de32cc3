"""CloudEvents binary content mode on a gateway request: what ``ce-*`` headers the event carries.

A CloudEvents SDK client POSTs the event's data as the body and its attributes as ``ce-*``
headers (the HTTP binding's binary mode, read as :func:`~choreograph._http_binding.binary_attributes`
reads it for a receiver). The gateway publishes them rather than drop them silently:

* ``ce-id`` is the event id, hence the correlation id, and is claimed as an
  ``Idempotency-Key`` is (consumers drop an event whose id they have seen, so an id reused for
  another body would be a 202 for an event no one handles: it is a 409 instead);
* ``ce-source``, ``ce-time``, ``ce-subject`` and extensions of the client's own go onto the
  envelope as sent;
* ``ce-specversion`` must be ``1.0``, ``ce-type`` and ``ce-dataschema`` those of the route's
  event (the route decides what is published);
* the extensions choreograph sets itself (correlation, causation, deadline, hops, partition
  key, trace context) are refused, naming the header: the gateway would overwrite them.

Every refusal is a 400 whose ``detail`` starts with the header's name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from choreograph._envelope import KNOWN_EXTENSIONS, SPECVERSION, Envelope, is_rfc3339
from choreograph._gateway_http import Problem
from choreograph._http_binding import HEADER_PREFIX, binary_attributes, check_ce_headers, header_value
from choreograph.errors import MalformedEnvelope
from choreograph.events import Event

#: A ``ce-id`` character: the id is the correlation id, a path segment of ``/transactions/{id}``
#: (RFC 3986 pchar but ``%``).
_ID_CHAR = "[A-Za-z0-9._~:@!$&'()*+,;=-]"
#: The percent-encoding of an :data:`_ID_CHAR` (either case of hex digit).
_ID_CHAR_ENCODED = "%(?:2[146-9A-Ea-e]|3[0-9ABDabd]|4[0-9A-Fa-f]|5[0-9AFaf]|6[1-9A-Fa-f]|7[0-9AEae])"
_ID_UNITS = f"(?:{_ID_CHAR}|{_ID_CHAR_ENCODED}){{1,255}}"
#: A ``ce-id`` header value as *sent* (ECMA-262 and Python alike): 1-255 id characters, each as it
#: is or percent-encoded (3.1.3.2 lets a sender encode any character; a receiver decodes), the
#: whole value possibly double-quoted (older SDKs quote). The gateway checks this and the OpenAPI
#: document gives it: a client generator checks a header against its pattern, then sends it as it
#: is, and a pattern of the decoded id turned away ``urn%3Aorder%3A42`` (``urn:order:42``).
_WIRE_ID = re.compile(f'^(?:{_ID_UNITS}|"{_ID_UNITS}")$')
_EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
_SET_BY_THE_GATEWAY = {
    "correlationid": "the gateway starts a transaction: its correlation id is the event id (send ce-id)",
    "causationid": "an event published at the gateway is caused by no other",
    "deadline": "the route's deadline is the transaction's",
    "hops": "the gateway counts hops itself",
    "partitionkey": "the gateway does not take a partition key from a client",
    "traceparent": "send the W3C traceparent header instead",
    "tracestate": "send the W3C tracestate header instead",
}


@dataclasses.dataclass(frozen=True)
class CloudEventAttributes:
    """What a request's ``ce-*`` headers give the envelope (``None``: the gateway's own)."""

    id: str | None = None
    source: str | None = None
    time: str | None = None
    subject: str | None = None
    extensions: dict[str, str] = dataclasses.field(default_factory=dict)

    def apply(self, envelope: Envelope) -> None:
        """Set these attributes on ``envelope`` (built with :attr:`id` as its id, if given)."""
        if self.source is not None:
            envelope.source = self.source
        if self.time is not None:
            envelope.time = self.time
        envelope.extensions.update(self.extensions)

    def fingerprint(self) -> str:
        """The attributes as part of an idempotent request's fingerprint (``""`` for none). Not
        ``time``: an SDK may stamp a retry anew, and the first event's time stands (the replay)."""
        parts = [self.source, self.subject, *sorted(self.extensions.items())]
        return repr(parts) if any(p is not None for p in parts) else ""


def _problem(header: str, reason: str) -> Problem:
    return Problem(400, f"{header}: {reason}")


def _sent(headers: Sequence[tuple[str, str]], name: str) -> str:
    """The value of header ``name`` as sent (given once: :func:`check_ce_headers` saw to it)."""
    return next(value for key, value in headers if key.lower() == name)


def cloudevent_attributes(headers: Sequence[tuple[str, str]], event: type[Event]) -> CloudEventAttributes | None:
    """The ``ce-*`` attributes of a request's ``headers`` (name, value pairs as received) for a route
    publishing ``event``; ``None`` without any ``ce-`` header; a 400 :class:`Problem` naming the header."""
    names = [name.lower() for name, _ in headers if name.lower().startswith(HEADER_PREFIX)]
    if not names:
        return None
    try:
        # given twice, raw UTF-8 read as latin-1, a control character or noncharacter (raw or
        # percent-encoded): the receiver's checks
        check_ce_headers(headers)
        attributes = binary_attributes(dict(headers))
    except MalformedEnvelope as exc:
        header, _, reason = exc.message.partition(": ")
        raise _problem(header, reason) from None
    if attributes.pop("specversion") != SPECVERSION:
        raise _problem("ce-specversion", f"expected {SPECVERSION!r} (CloudEvents 1.0)")
    expected_type = event.event_type()
    if attributes.pop("type", expected_type) != expected_type:
        raise _problem("ce-type", f"this route publishes {expected_type!r}; send that or leave the header out")
    if attributes.pop("dataschema", event.schema_uri()) != event.schema_uri():
        raise _problem("ce-dataschema", f"this route publishes data of {event.schema_uri()!r}; "
                                        "send that or leave the header out")
    found: dict[str, str | None] = {}
    for name in ("id", "source", "time", "subject"):
        value = attributes.pop(name, None)
        if value is not None and not value:
            raise _problem(f"ce-{name}", "must not be empty")
        found[name] = value
    if found["id"] is not None and not _WIRE_ID.fullmatch(_sent(headers, "ce-id")):
        raise _problem("ce-id", "1-255 characters of letters, digits and -._~:@!$&'()*+,;=, each as it is "
                                "or percent-encoded, the whole value possibly double-quoted (it becomes "
                                "the transaction's id, a segment of its /transactions URL)")
    if found["time"] is not None and not is_rfc3339(found["time"]):
        raise _problem("ce-time", f"{found['time']!r} is not an RFC 3339 timestamp")
    for name in sorted(attributes):
        if name in KNOWN_EXTENSIONS:
            why = _SET_BY_THE_GATEWAY.get(name, "choreograph sets it itself")
            raise _problem(f"ce-{name}", f"not taken from a client: {why}")
        if not _EXTENSION_NAME.match(name):
            raise _problem(f"ce-{name}", "an extension name is lower-case letters and digits")
    return CloudEventAttributes(
        id=found["id"], source=found["source"], time=found["time"], subject=found["subject"], extensions=attributes
    )


#: A header value as it is sent: printable ASCII (the binding percent-encodes the rest; a space
#: from older senders, who quote rather than encode).
_PRINTABLE = "^[ -~]+$"
_BINDING = (" Sent as the CloudEvents HTTP binding (3.1.3.2) says, UTF-8 beyond printable ASCII and space, "
            "'\"' and '%' percent-encoded (the schema is of the value sent); read back after unquoting a "
            "double-quoted string, then percent-decoding.")


def _header(name: str, description: str, schema: dict[str, Any], example: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description + _BINDING,
            "schema": schema, "example": example}


def openapi_parameters(event: type[Event]) -> list[dict[str, Any]]:
    """The ``ce-*`` headers :func:`cloudevent_attributes` reads, as OpenAPI header parameters of a
    route publishing ``event`` (each with an ``example`` the route accepts)."""
    own = ", ".join(f"ce-{name}" for name in sorted(KNOWN_EXTENSIONS))
    return [
        _header("ce-specversion", "CloudEvents binary content mode: required with any other ce- header. "
                "Any other ce-<name> header (lower-case letters and digits) is an extension attribute "
                f"published with the event, but choreograph's own ({own}) and ce-datacontenttype, "
                "ce-data_base64 are refused (400).",
                {"type": "string", "const": SPECVERSION}, SPECVERSION),
        _header("ce-id", "The event id, hence the transaction's correlation id; idempotent as an "
                "Idempotency-Key is (send one or the other, not both). Default: a new UUIDv7. 1-255 "
                "characters of letters, digits and -._~:@!$&'()*+,;=, each as it is or percent-encoded "
                "(%3A is read as ':'), the whole value possibly double-quoted: the pattern is of the value "
                "sent. A value quoted in part or holding a backslash escape is refused (400).",
                {"type": "string", "pattern": _WIRE_ID.pattern}, "order-42"),
        _header("ce-source", "The event's source (default: the gateway's).",
                {"type": "string", "minLength": 1, "pattern": _PRINTABLE}, "/shop/web"),
        _header("ce-type", "The event type: this route's, if given.",
                {"type": "string", "const": header_value(event.event_type())}, header_value(event.event_type())),
        _header("ce-dataschema", "The data's schema: this route's, if given.",
                {"type": "string", "const": header_value(event.schema_uri())}, header_value(event.schema_uri())),
        _header("ce-time", "When the event happened, RFC 3339 (no leap second, no year 0000; default: when "
                "published). Not part of an idempotent request's fingerprint.",
                {"type": "string", "format": "date-time"}, "2018-04-05T03:56:24Z"),
        _header("ce-subject", "The event's subject.",
                {"type": "string", "minLength": 1, "pattern": _PRINTABLE}, "cust/7"),
    ]
