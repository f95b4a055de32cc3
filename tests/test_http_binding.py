"""The CloudEvents HTTP binding: the official conformance scenarios and YAML events, run against the
sender's encoder and the receiver helper's decoder (over a real socket), plus the binding's edge cases."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest
import yaml

from choreograph import Envelope, Event, MalformedEnvelope, decode
from choreograph._http_binding import (
    STRUCTURED,
    decode_http,
    decode_http_batch,
    is_cloudevent,
    media_type,
    to_batch,
    to_binary,
    to_http,
    to_structured,
)
from choreograph.gateway import Gateway, Route
from choreograph.push import receiver
from choreograph.testing import MemoryTransport
from choreograph.transports.base import Message
from tests._push_support import serve

CONFORMANCE = Path("/work/shared/conformance/cloudevents-conformance")
FEATURE = CONFORMANCE / "features" / "http-protocol-binding.feature"
YAML_FILES = [CONFORMANCE / "yaml" / "v1.yaml", CONFORMANCE / "yaml" / "v1.0" / "v1_minimum.yaml"]



def require_conformance_data() -> None:
    """Fail under CI=true, skip elsewhere, when the conformance copy is missing: a missing kit
    must not pass as a green run. (Only the tests that read it: the rest of this module runs.)"""
    if not FEATURE.exists() or not all(path.exists() for path in YAML_FILES):
        message = f"conformance data not found at {CONFORMANCE}"
        pytest.fail(message) if os.environ.get("CI", "").lower() == "true" else pytest.skip(message)


# -- a tiny Gherkin reader: scenario outlines, steps, doc strings, tables, examples ----------


@dataclasses.dataclass
class Step:
    keyword: str
    text: str
    doc: str | None = None
    table: list[list[str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Scenario:
    name: str
    steps: list[Step]


def parse_feature(text: str) -> list[Scenario]:
    """Scenarios of a feature file, outlines expanded once per Examples row (Background skipped)."""
    outlines: list[tuple[str, list[Step], list[list[str]]]] = []
    lines = text.splitlines()
    in_examples = False
    i = 0
    while i < len(lines):
        raw, line = lines[i], lines[i].strip()
        if line.startswith(("Scenario Outline:", "Scenario:")):
            outlines.append((line.partition(":")[2].strip(), [], []))
            in_examples = False
        elif line.startswith("Examples:"):
            in_examples = True
        elif outlines and line.split(" ", 1)[0] in ("Given", "When", "Then", "And", "But"):
            keyword, _, rest = line.partition(" ")
            outlines[-1][1].append(Step(keyword, rest))
        elif outlines and line == '"""':
            indent = len(raw) - len(raw.lstrip())
            body = []
            i += 1
            while lines[i].strip() != '"""':
                body.append(lines[i][indent:])
                i += 1
            outlines[-1][1][-1].doc = "\n".join(body)
        elif outlines and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            (outlines[-1][2] if in_examples else outlines[-1][1][-1].table).append(cells)
        i += 1

    scenarios = []
    for name, steps, examples in outlines:
        header, rows = (examples[0], examples[1:]) if examples else ([], [[]])
        for row in rows:
            values = dict(zip(header, row, strict=True))

            def fill(text: str, values: dict[str, str] = values) -> str:
                return re.sub(r"<([^<>]+)>", lambda m: values.get(m.group(1), m.group(0)), text)

            scenarios.append(Scenario(fill(name), [
                Step(s.keyword, fill(s.text), fill(s.doc) if s.doc is not None else None,
                     [[fill(cell) for cell in r] for r in s.table])
                for s in steps
            ]))
    return scenarios


@dataclasses.dataclass
class Case:
    """One conformance scenario: a raw HTTP request and what it must parse to."""

    name: str
    raw: str
    attributes: dict[str, str]
    data: Any

    @property
    def head_and_body(self) -> tuple[list[tuple[str, str]], bytes]:
        head, _, body = self.raw.partition("\n\n")
        headers = [(name.strip(), value.strip()) for name, _, value in
                   (line.partition(":") for line in head.splitlines()[1:])]
        return headers, body.encode()

    @property
    def headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.head_and_body[0]}

    @property
    def body(self) -> bytes:
        return self.head_and_body[1]


def load_cases() -> list[Case]:
    if not FEATURE.exists():
        return []
    cases = []
    for scenario in parse_feature(FEATURE.read_text()):
        raw = attributes = data = None
        for step in scenario.steps:
            if step.text == "an HTTP request":
                raw = step.doc
            elif step.text == "parsed as HTTP request":
                pass
            elif step.text == "the attributes are:":
                attributes = {key: value for key, value in step.table[1:]}
            elif step.text == "the data is equal to the following JSON:":
                data = orjson.loads(step.doc or "")
            else:
                raise AssertionError(f"{scenario.name}: unknown step {step.keyword} {step.text!r}")
        assert raw is not None and attributes is not None, scenario.name
        cases.append(Case(scenario.name, raw, attributes, data))
    return cases


CASES = load_cases()
_case_ids = [case.name for case in CASES]


def test_the_feature_file_yields_the_four_documented_scenarios() -> None:
    """The Gherkin reader finds 2 outlines x 2 examples, each with a self-consistent Content-Length."""
    require_conformance_data()
    assert len(CASES) == 4
    for case in CASES:
        assert int(case.headers["content-length"]) == len(case.body), case.name


def attributes_of(envelope: Envelope) -> dict[str, str]:
    return {key: value for key, value in envelope.to_dict().items() if key not in ("data", "hops")}


@pytest.mark.parametrize("case", CASES, ids=_case_ids)
def test_decoder_parses_the_conformance_request(case: Case) -> None:
    """decode_http reads exactly the scenario's attributes and JSON data."""
    envelope = decode_http(case.headers, case.body)
    assert attributes_of(envelope) == case.attributes
    assert envelope.data == case.data


@pytest.mark.parametrize("case", CASES, ids=_case_ids)
async def test_receiver_helper_decodes_the_raw_request_from_a_socket(case: Case) -> None:
    """The scenario's bytes, written verbatim to a TCP socket, reach the receiver's handler as that event."""
    received: list[Envelope] = []

    async def handle(event: Envelope) -> None:
        received.append(event)

    async with serve(receiver(handle, path="/someresource")) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head, body = case.head_and_body
        request_line = case.raw.splitlines()[0]
        wire = "\r\n".join([request_line, *(f"{n}: {v}" for n, v in head), "Connection: close", "", ""])
        writer.write(wire.encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        await reader.read()
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"204", status_line
    [envelope] = received
    assert attributes_of(envelope) == case.attributes
    assert envelope.data == case.data


class SomeEvent(Event, type="com.example.someevent"):
    message: str


class RecordingBus(MemoryTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.sent.extend(messages)
        await super().publish(messages)


@pytest.mark.parametrize("case", CASES, ids=_case_ids)
async def test_the_gateway_publishes_the_conformance_request_or_refuses_it_saying_how_to_send_it(
    case: Case,
) -> None:
    """Binary mode: the gateway publishes the scenario's event with its attributes (they were
    dropped: another id, source and time). Structured mode carries the attributes in the body,
    where the route's model expects the data: a 415 saying to send binary mode, not a 422 for
    fields named specversion and id."""
    bus = RecordingBus()
    gateway = Gateway([Route("POST", "/someresource", SomeEvent)], broker=bus)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.asgi()), base_url="http://gw") as client:
        head, body = case.head_and_body
        response = await client.post("/someresource", content=body, headers=[
            (name, value) for name, value in head if name.lower() not in ("host", "content-length")
        ])
    await gateway.close()
    if case.headers.get("ce-specversion") is None:
        assert response.status_code == 415, response.text
        assert "binary content mode" in response.json()["detail"]
        return
    assert response.status_code == 202, response.text
    [message] = bus.sent
    envelope = decode(message.body)
    published = attributes_of(envelope)
    assert {k: published[k] for k in ("id", "specversion", "type", "source", "time")} == {
        k: case.attributes[k] for k in ("id", "specversion", "type", "source", "time")
    }
    assert envelope.data == case.data
    assert response.json()["correlation_id"] == case.attributes["id"]


@pytest.mark.parametrize("case", CASES, ids=_case_ids)
def test_encoder_produces_the_conformance_request(case: Case) -> None:
    """Encoding the scenario's event yields its headers and body (plus only choreograph's hops extension)."""
    envelope = Envelope(data=case.data, **{k: v for k, v in case.attributes.items() if k != "specversion"})
    structured = media_type(case.headers["content-type"]) == "application/cloudevents+json"
    headers, body = to_http(envelope, "structured" if structured else "binary")
    if structured:
        assert media_type(headers["content-type"]) == "application/cloudevents+json"
        sent, expected = orjson.loads(body), orjson.loads(case.body)
        assert {k: v for k, v in sent.items() if k != "hops"} == expected
    else:
        expected_ce = {k: v for k, v in case.headers.items() if k.startswith("ce-")}
        sent_ce = {k: v for k, v in headers.items() if k.startswith("ce-")}
        assert {k: v for k, v in sent_ce.items() if k != "ce-hops"} == expected_ce
        assert headers["content-type"] == case.headers["content-type"]
        assert orjson.loads(body) == case.data
    assert attributes_of(decode_http(headers, body)) == case.attributes


# -- the conformance YAML events, encoded by the sender and decoded by the receiver over HTTP --


def yaml_events() -> list[tuple[str, dict[str, Any]]]:
    events = []
    for path in YAML_FILES:
        if path.exists():
            for index, doc in enumerate(yaml.load_all(path.read_text(), Loader=yaml.BaseLoader)):
                if doc:
                    events.append((f"{path.name}[{index}]", doc))
    return events


YAML_EVENTS = yaml_events()


def envelope_from_yaml(doc: dict[str, Any]) -> Envelope:
    attrs = dict(doc["ContextAttributes"])
    # v1.yaml writes an extension as a `|` block, which keeps its final newline: no CloudEvents
    # String holds a control character (the receiver answers 400 naming the header), and the
    # value meant is the JSON text without it.
    extensions = {name: value.rstrip("\n") if isinstance(value, str) else value
                  for name, value in (attrs.pop("Extensions", {}) or {}).items()}
    attrs.pop("specversion")
    content_type = attrs.get("datacontenttype")
    raw = doc.get("Data", "")
    if content_type is None or media_type(content_type).endswith("json"):
        data = orjson.loads(raw)
    else:
        data = raw
    return Envelope(data=data, datacontenttype=content_type, extensions=dict(extensions),
                    **{k: v for k, v in attrs.items() if k != "datacontenttype"})


def test_the_yaml_files_yield_eight_events() -> None:
    """v1.yaml (binary and structured) and v1_minimum.yaml (six content types) are all read."""
    require_conformance_data()
    assert len(YAML_EVENTS) == 8


@pytest.mark.parametrize(("name", "doc"), YAML_EVENTS, ids=[name for name, _ in YAML_EVENTS])
async def test_yaml_event_round_trips_through_http(name: str, doc: dict[str, Any]) -> None:
    """Each event, encoded in its Mode and POSTed with its transport headers, reaches the receiver intact."""
    sent = envelope_from_yaml(doc)
    mode = doc.get("Mode", "binary")
    headers, body = to_http(sent, mode)
    received: list[Envelope] = []

    async def handle(event: Envelope) -> None:
        received.append(event)

    async with serve(receiver(handle)) as base, httpx.AsyncClient() as client:
        response = await client.post(base + "/", content=body,
                                     headers={**headers, **(doc.get("TransportExtensions") or {})})
    assert response.status_code == 204, response.text
    [got] = received
    # An absent datacontenttype means JSON; binary mode states it in Content-Type.
    expected_type = sent.datacontenttype or ("application/json" if mode == "binary" else None)
    assert (got.id, got.source, got.type, got.time, got.datacontenttype) == (
        sent.id, sent.source, sent.type, sent.time, expected_type)
    assert got.extensions == sent.extensions  # user-agent is a transport header, not an extension
    assert got.data == sent.data


def test_text_data_in_binary_mode_is_the_exact_body() -> None:
    """A text/plain event's body is its text in the declared charset, byte for byte."""
    require_conformance_data()
    [(_, doc)] = [(n, d) for n, d in YAML_EVENTS if d["ContextAttributes"]["id"] == "conformance-0002"]
    headers, body = to_binary(envelope_from_yaml(doc))
    assert body == doc["Data"].encode("utf-8")
    assert headers["content-type"] == "text/plain; charset=utf-8"


# -- edge cases of the binding ----------------------------------------------------------------


def choreograph_envelope() -> Envelope:
    return Envelope(
        id="e-1", source="/shop", type="shop.order.placed", data={"order_id": "o-1"}, subject='café "ô" 100%',
        correlationid="c-1", causationid="p-1", traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        hops=3, partitionkey="o-1", time="2026-01-01T00:00:00Z",
    )


def test_choreograph_extensions_survive_binary_mode() -> None:
    """Correlation, causation, trace context, hops and partition key round-trip through ce- headers."""
    envelope = choreograph_envelope()
    headers, body = to_binary(envelope)
    assert decode_http(headers, body) == envelope
    assert headers["traceparent"] == envelope.traceparent  # W3C header for HTTP-level tracing too


def test_header_values_are_percent_encoded_printable_ascii() -> None:
    """Space, double quote, percent and non-ASCII characters are percent-encoded (binding §3.1.3.2)."""
    headers, _ = to_binary(choreograph_envelope())
    assert headers["ce-subject"] == "caf%C3%A9%20%22%C3%B4%22%20100%25"
    assert all(value.isascii() and " " not in value for name, value in headers.items() if name.startswith("ce-"))


@pytest.mark.parametrize(
    ("value", "attribute"),
    [
        ('"caf%C3%A9 100%25"', "caf\u00e9 100%"),
        ('"a \\"quoted\\" b"', 'a "quoted" b'),
        ('"back\\\\slash"', "back\\slash"),
        ('x"y z"w', "xy zw"),
        ('""', ""),
        ("a\\b", "a\\b"),
    ],
    ids=["percent-in-quotes", "escaped-quote", "escaped-backslash", "quoted-part", "empty", "backslash-outside"],
)
def test_a_double_quoted_header_value_is_unescaped_then_percent_decoded(value: str, attribute: str) -> None:
    """Binding 3.1.3.2: a receiver unescapes double-quoted strings (RFC 7230 3.2.6, a backslash
    escaping the next character), then percent-decodes once, for senders of older versions that
    quoted rather than percent-encoded. The quotes were kept as part of the value."""
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-note": value}
    assert decode_http(headers, b"").extensions["note"] == attribute


def test_structured_mode_sends_the_bus_bytes_unchanged() -> None:
    """Given the encoded envelope, structured mode sends those very bytes."""
    bus_bytes = b'{"specversion":"1.0","id":"1","source":"/s","type":"t","hops":0}'
    headers, body = to_structured(Envelope(id="1", source="/s", type="t"), bus_bytes)
    assert body is bus_bytes
    assert is_cloudevent(headers)


def test_binary_data_without_a_text_type_travels_as_raw_bytes() -> None:
    """An octet-stream event is sent as its raw bytes and comes back as data_base64."""
    envelope = Envelope(id="1", source="/s", type="t", datacontenttype="application/octet-stream",
                        extensions={"data_base64": base64.b64encode(b"\x00\xffpng").decode()})
    headers, body = to_binary(envelope)
    assert body == b"\x00\xffpng"
    assert decode_http(headers, body).extensions["data_base64"] == envelope.extensions["data_base64"]


def test_a_batch_round_trips_and_names_the_bad_item() -> None:
    """Batch mode carries several events; an invalid one is reported by its index."""
    first, second = choreograph_envelope(), Envelope(id="2", source="/s", type="t", data=[1, 2])
    headers, body = to_batch([first, second])
    assert decode_http_batch(headers, body) == [first, second]
    bad = orjson.dumps([first.to_dict(), {"specversion": "1.0", "id": "3", "type": "t"}])
    with pytest.raises(MalformedEnvelope, match=r"\$\[1\]\.source: required attribute is missing"):
        decode_http_batch(headers, bad)
    with pytest.raises(MalformedEnvelope, match="several events"):
        decode_http(headers, body)


@pytest.mark.parametrize("raw", [b"123", b"hello", b'{"a": 1}', b"\x00\xff"])
async def test_binary_data_without_a_datacontenttype_is_pushed_as_octet_stream_and_read_back_as_bytes(raw: bytes) -> None:
    """An event carrying ``data_base64`` and no ``datacontenttype`` (an outside producer's, on the
    bus) was POSTed in binary mode without a Content-Type: the receiver, left to guess, read the
    bytes ``b"123"`` as the number 123 and ``b"hello"`` as a string. Sent as
    ``application/octet-stream``, they arrive as the same bytes."""
    envelope = Envelope(id="1", source="/s", type="t", datacontenttype=None,
                        extensions={"data_base64": base64.b64encode(raw).decode()})
    headers, body = to_binary(envelope)
    assert (headers["content-type"], body) == ("application/octet-stream", raw)
    back = decode_http(headers, body)
    assert (back.data, back.extensions) == (None, {"data_base64": envelope.extensions["data_base64"]})
    handled: list[Envelope] = []

    async def handle(received: Envelope) -> None:
        handled.append(received)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver(handle)), base_url="http://r") as client:
        answer = await client.post("/", content=body, headers=headers)
    assert answer.status_code == 204
    assert [base64.b64decode(str(e.extensions["data_base64"])) for e in handled] == [raw]
    assert to_binary(Envelope(id="2", source="/s", type="t", datacontenttype=None, data={"a": 1}))[0][
        "content-type"] == "application/json"  # data: JSON, as before


async def test_a_ce_hops_header_of_thousands_of_digits_is_a_400_naming_hops() -> None:
    """Extensions arrive as strings in binary mode; ``int()`` refused one of over 4,300 digits with a
    ValueError, which ``receiver()`` answered 500 (retried by a sender) rather than 400."""
    handled: list[Envelope] = []

    async def handle(envelope: Envelope) -> None:
        handled.append(envelope)

    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-hops": "9" * 5000}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver(handle)), base_url="http://r") as client:
        answer = await client.post("/", content=b"", headers=headers)
    assert (answer.status_code, handled) == (400, [])
    assert answer.json()["error"].startswith("hops: expected a non-negative 64-bit integer, got a string of 5000 digits")


BASE = {"specversion": "1.0", "id": "b1", "source": "/s", "type": "t"}


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"data_base64": "!!"}, "data_base64: not valid base64"),
        ({"data_base64": "AAE"}, "data_base64: not valid base64"),
        ({"data_base64": 12}, "data_base64: expected a base64 string, got int"),
        ({"data_base64": "AAE=", "data": {"a": 1}}, "data_base64: an event carries data or data_base64, not both"),
    ],
    ids=["not-base64", "bad-padding", "not-a-string", "with-data"],
)
async def test_a_structured_or_batch_event_with_unreadable_data_base64_is_refused_naming_it(
    extra: dict[str, Any], reason: str
) -> None:
    """The JSON format has binary data as one base64 string that the reader MUST decode, and ``data``
    and ``data_base64`` mutually exclusive. Such an event was accepted (a receiver answered 204,
    or a typed one 422 "$: Input should be a valid dictionary") and failed only where it was
    pushed on in binary mode; it is malformed, a 400 naming ``data_base64``."""
    event = orjson.dumps({**BASE, **extra})
    with pytest.raises(MalformedEnvelope, match=re.escape(reason)):
        decode_http({"content-type": "application/cloudevents+json"}, event)
    with pytest.raises(MalformedEnvelope, match=re.escape(f"$[1].{reason}")):
        decode_http_batch({"content-type": "application/cloudevents-batch+json"}, b"[" + orjson.dumps(BASE) + b"," + event + b"]")
    handled: list[Envelope] = []

    async def handle(envelope: Envelope) -> None:
        handled.append(envelope)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver(handle)), base_url="http://r") as client:
        answer = await client.post("/", content=event, headers={"content-type": "application/cloudevents+json"})
    assert (answer.status_code, handled) == (400, [])
    assert answer.json()["error"].startswith(reason)
    assert decode_http({"content-type": "application/cloudevents+json"}, orjson.dumps({**BASE, "data_base64": "AAE="}))
    assert decode(orjson.dumps({**BASE, "data_base64": None})).extensions == {}  # null: absent


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({"content-type": "application/json"}, b"{}", "not a CloudEvent"),
        ({"ce-id": "1", "ce-source": "/s", "ce-type": "t"}, b"", "ce-specversion: header is missing"),
        ({"ce-specversion": "0.3", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}, b"", "unsupported version"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t"}, b"", "source: required attribute is missing"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t",
          "content-type": "application/json"}, b"{oops", "data: body is not valid JSON"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-x": "%FF"}, b"",
         "ce-x: percent-encoded value is not valid UTF-8"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-x": '"a\\"'}, b"",
         "ce-x: a double-quoted string is not closed"),
        ({"content-type": "application/cloudevents+json"}, b'{"specversion":"1.0","id":"1","type":"t"}',
         "source: required attribute is missing"),
    ],
    ids=["no-cloudevent", "no-specversion", "old-specversion", "no-source", "bad-json", "bad-utf8", "open-quote",
         "structured"],
)
def test_invalid_messages_are_rejected_with_the_reason(headers: dict[str, str], body: bytes, message: str) -> None:
    """Anything that is not a valid CloudEvent raises MalformedEnvelope naming what is wrong."""
    with pytest.raises(MalformedEnvelope, match=re.escape(message)):
        decode_http(headers, body)


_BINARY_HEADERS = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}
_STRUCTURED_BODY = '{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"name":"\u00c3\u00a9"}}'


@pytest.mark.parametrize("charset", ["latin-1", "utf-16", "no-such-charset"])
@pytest.mark.parametrize("mode", ["binary", "structured", "batch"])
def test_json_declared_in_a_charset_other_than_utf8_is_refused_not_misread(mode: str, charset: str) -> None:
    """JSON is UTF-8 (RFC 8259 8.1). A body declared ``application/json; charset=latin-1`` was
    read as UTF-8 whatever it said: the Latin-1 bytes of ``"Ã©"`` became ``"é"`` (mangled data
    handed on), UTF-16 was "not valid JSON". It is refused, naming the header and the charset."""
    encoding = "latin-1" if charset == "no-such-charset" else charset
    if mode == "binary":
        headers = {**_BINARY_HEADERS, "content-type": f"application/json; charset={charset}"}
        body = '{"name":"\u00c3\u00a9"}'.encode(encoding)
    else:
        media = STRUCTURED if mode == "structured" else "application/cloudevents-batch+json"
        headers = {"content-type": f"{media}; charset={charset}"}
        body = (_STRUCTURED_BODY if mode == "structured" else f"[{_STRUCTURED_BODY}]").encode(encoding)
    with pytest.raises(MalformedEnvelope, match=re.escape(f"Content-Type: charset {charset!r}: JSON is UTF-8")):
        decode_http_batch(headers, body)


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", '"utf8"', "utf_8"])
def test_json_declared_utf8_by_any_name_of_it_is_read(charset: str) -> None:
    """UTF-8 under any name Python knows it by is still read, in binary and structured mode."""
    binary = decode_http({**_BINARY_HEADERS, "content-type": f"application/json; charset={charset}"},
                         '{"name":"caf\u00e9"}'.encode())
    structured = decode_http({"content-type": f"{STRUCTURED}; charset={charset}"}, _STRUCTURED_BODY.encode())
    assert (binary.data, structured.data) == ({"name": "caf\u00e9"}, {"name": "\u00c3\u00a9"})


def test_header_names_are_case_insensitive() -> None:
    """CE-Type and ce-type are the same header (HTTP header names are case-insensitive)."""
    envelope = decode_http({"CE-SpecVersion": "1.0", "Ce-Id": "1", "CE-SOURCE": "/s", "ce-type": "t"}, b"")
    assert (envelope.id, envelope.source, envelope.type, envelope.data) == ("1", "/s", "t", None)


def test_binary_mode_sends_a_datacontenttype_without_its_surrounding_whitespace() -> None:
    """Whitespace around a header value is no part of it (RFC 9110 5.5) and h11 refuses to send it:
    a ``datacontenttype`` of ``" text/plain "`` goes as ``text/plain``; one no Content-Type can
    hold (a line break, a character beyond ASCII, blank) is a MalformedEnvelope naming it."""
    envelope = Envelope(id="w-1", source="/s", type="t", data="hi", datacontenttype=" text/plain\t")
    headers, body = to_binary(envelope)
    assert (headers["content-type"], body) == ("text/plain", b"hi")
    for value in ("text/plain\nx: 1", "text/plainé", "  "):
        with pytest.raises(MalformedEnvelope, match="^datacontenttype: .* cannot be an HTTP Content-Type"):
            to_binary(msgspec.structs.replace(envelope, datacontenttype=value))
