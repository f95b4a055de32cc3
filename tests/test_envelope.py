"""The envelope is CloudEvents 1.0 structured JSON: checked against the spec's JSON Schema,
the conformance events, and the CloudEvents Python SDK in both directions."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from dateutil.parser import isoparse
from hypothesis import assume, given
from hypothesis import strategies as st

from choreograph import Envelope, Event, MalformedEnvelope, decode, derive_id, encode
from choreograph._envelope import CORE_ATTRIBUTES, KNOWN_EXTENSIONS, _decode_general, from_dict
from choreograph.runtime.records import dead_letter_record, failure_envelope, first_envelope, output_envelope

CONFORMANCE = Path("/work/shared/conformance")
SCHEMA_PATH = CONFORMANCE / "cloudevents-spec/cloudevents/formats/cloudevents.json"
MINIMUM_PATH = CONFORMANCE / "cloudevents-conformance/yaml/v1.0/v1_minimum.yaml"

pytestmark = pytest.mark.skipif(not SCHEMA_PATH.exists(), reason=f"conformance data missing: {SCHEMA_PATH}")


# --- the spec's JSON Schema, with the formats it names actually checked ---------------------------

_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


def _checker() -> jsonschema.FormatChecker:
    """jsonschema checks ``date-time``/``uri`` only with optional packages; these are small equivalents."""
    checker = jsonschema.FormatChecker()

    @checker.checks("date-time")
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not re.fullmatch(
            r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", value, re.ASCII
        ):
            return False
        isoparse(value.upper())  # raises on 31 February and friends
        return True

    @checker.checks("uri-reference")
    def _uri_reference(value: object) -> bool:
        return not isinstance(value, str) or bool(_URI_CHARS.fullmatch(value))

    @checker.checks("uri")
    def _uri(value: object) -> bool:
        return not isinstance(value, str) or bool(_URI_CHARS.fullmatch(value) and _SCHEME.match(value))

    return checker


VALIDATOR = jsonschema.Draft7Validator(json.loads(SCHEMA_PATH.read_text()), format_checker=_checker())


def assert_conforms(body: bytes) -> dict[str, Any]:
    obj = json.loads(body)
    errors = [f"{'/'.join(map(str, e.path)) or '$'}: {e.message}" for e in VALIDATOR.iter_errors(obj)]
    assert not errors, errors
    return obj  # type: ignore[no-any-return]


# --- strategies -----------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)  # JSON text: no lone surrogates
_non_empty = _text.filter(bool)
_uri_ref = st.from_regex(r"\A/[a-z0-9._~\-]{1,20}(/[a-z0-9._~\-]{1,10}){0,3}\Z")
_json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
_datetimes = st.datetimes(
    min_value=datetime(1000, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC) | _offsets
)
_times = _datetimes.map(lambda d: d.isoformat().replace("+00:00", "Z"))
_extension_names = st.from_regex(r"\A[a-z0-9]{1,20}\Z").filter(
    lambda n: n not in CORE_ATTRIBUTES and n not in KNOWN_EXTENSIONS
)
_extension_values = _text | st.integers(-(2**31), 2**31 - 1) | st.booleans()


@st.composite
def envelopes(draw: st.DrawFn, *, source: st.SearchStrategy[str] = _non_empty) -> Envelope:
    optional = lambda strategy: draw(st.none() | strategy)  # noqa: E731
    return Envelope(
        id=draw(_non_empty),
        source=draw(source),
        type=draw(_non_empty),
        data=optional(_json),
        time=optional(_times),
        subject=optional(_non_empty),
        datacontenttype=optional(st.sampled_from(["application/json", "application/json; charset=utf-8"])),
        dataschema=optional(st.just("urn:choreograph:schema:x:v1") | st.just("https://example.com/s.json")),
        correlationid=optional(_non_empty),
        causationid=optional(_non_empty),
        traceparent=optional(st.just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")),
        tracestate=optional(_text),
        hops=draw(st.integers(0, 1000)),
        partitionkey=optional(_non_empty),
        deadline=optional(_times),
        extensions=draw(st.dictionaries(_extension_names, _extension_values, max_size=3)),
    )


# --- encode / decode ------------------------------------------------------------------------------


@given(envelopes())
def test_decode_inverts_encode(env: Envelope) -> None:
    assert decode(encode(env)) == env


@given(envelopes(source=_uri_ref))
def test_every_encoded_envelope_conforms_to_the_cloudevents_json_schema(env: Envelope) -> None:
    assert_conforms(encode(env))


@given(
    st.dictionaries(
        st.sampled_from(sorted(CORE_ATTRIBUTES | KNOWN_EXTENSIONS | {"x", "Bad"})), _json, max_size=8
    )
)
def test_decoding_any_json_object_gives_an_envelope_or_malformed_envelope(obj: dict[str, Any]) -> None:
    """Nothing else escapes decode: the worker dead-letters MalformedEnvelope and moves on."""
    body = orjson.dumps(obj)
    try:
        env = decode(body)
    except MalformedEnvelope:
        return
    assert decode(encode(env)) == env


def _outcome(decoder: Any, body: bytes) -> Envelope | str:
    try:
        return decoder(body)
    except MalformedEnvelope as exc:
        return f"MalformedEnvelope: {exc}"


_near_envelopes = st.one_of(
    envelopes().map(lambda env: orjson.loads(encode(env))),
    st.dictionaries(st.sampled_from(sorted(CORE_ATTRIBUTES | KNOWN_EXTENSIONS | {"x", "Bad", "data_base64"})),
                    _json, max_size=8),
)


@given(_near_envelopes, st.dictionaries(st.sampled_from(sorted(CORE_ATTRIBUTES | KNOWN_EXTENSIONS)),
                                        _json_scalar | st.just(""), max_size=2))
def test_the_one_pass_path_and_the_general_path_decode_alike(obj: dict[str, Any], changes: dict[str, Any]) -> None:
    """decode() parses the common shape in one pass (msgspec) and the rest like from_dict: same result."""
    body = orjson.dumps({**obj, **changes})
    assert _outcome(decode, body) == _outcome(_decode_general, body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":{"big":18446744073709551616}}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":{"n":123456789012345678901234567890}}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":[1e400]}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","type":"u"}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","id":""}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","hops":true}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","hops":1.0}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","hops":"3"}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","hops":-1}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","correlationid":""}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","time":"2026-02-30T00:00:00Z"}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","time":"2024-02-29T00:00:00Z"}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","time":"yesterday"}',
        b'{"specversion":"0.3","id":"a","source":"/s","type":"t"}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data_base64":"AAE="}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","region":"eu"}',
        b'{"specversion":"1.0","id":null,"source":"/s","type":"t"}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":null}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t"} trailing',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":"\xff"}',
        b'{"specversion":"1.0","id":"\\ud800","source":"/s","type":"t"}',
        b"[]",
        b"",
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","hops":18446744073709551616}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","hops":9223372036854775808}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","hops":9223372036854775807}',
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":' + b"[" * 1000 + b"]" * 1000 + b"}",
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":' + b"[" * 1100 + b"]" * 1100 + b"}",
        b' \n{"specversion":"1.0","id":"a","source":"/s","type":"t"} ',
        b'{"specversion":"1.0","\\u0069d":"a","source":"/s","type":"t"}',
    ],
)
@pytest.mark.parametrize("recursion_limit", [None, 20_000])
def test_edge_cases_decode_alike_on_both_paths(body: bytes, recursion_limit: int | None) -> None:
    """Whatever Python's recursion limit (msgspec's nesting limit follows it; orjson's does not)."""
    text = body.decode("utf-8", errors="replace")
    with _recursion_limit(recursion_limit):
        outcomes = [(_outcome(decode, b), _outcome(_decode_general, b)) for b in (body, text)]
    with _recursion_limit(20_000):  # comparing data nested 1,000 deep recurses as deep
        assert all(fast == general for fast, general in outcomes)


@contextlib.contextmanager
def _recursion_limit(limit: int | None) -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit or old)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def test_a_str_body_with_a_lone_surrogate_is_malformed_on_both_paths() -> None:
    body = '{"specversion":"1.0","id":"\ud800","source":"/s","type":"t"}'
    assert _outcome(decode, body) == _outcome(_decode_general, body)
    assert str(_outcome(decode, body)).startswith("MalformedEnvelope")


@pytest.mark.parametrize("depth", [300, 900, 1022, 1023, 1024, 1100])
def test_deep_data_decodes_alike_however_deep_the_callers_stack(depth: int) -> None:
    """msgspec's nesting limit shrinks with the caller's stack; the result must not."""
    body = b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":' + b"[" * depth + b"]" * depth + b"}"

    def nested(frames: int) -> Envelope | str:
        return nested(frames - 1) if frames else _outcome(decode, body)

    with _recursion_limit(20_000):
        fast, general = nested(300), _outcome(_decode_general, body)
        assert fast == general
    assert isinstance(fast, Envelope) == (depth < 1024)  # orjson's limit: 1,024 levels in all


@given(
    st.fixed_dictionaries(
        {"specversion": st.just("1.0"), "id": _non_empty, "source": _uri_ref, "type": _non_empty}
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "time": _json_scalar | _times,
            "subject": _json_scalar,
            "datacontenttype": _json_scalar,
            "dataschema": _json_scalar.filter(lambda v: v == "" or not isinstance(v, str))
            | st.just("urn:x:1"),
            "hops": _json_scalar,
        },
    ),
)
def test_what_decode_accepts_is_a_conforming_cloudevent(
    required: dict[str, Any], optional: dict[str, Any]
) -> None:
    """Types, emptiness and timestamps are checked; URI syntax (source, dataschema) is not (see below)."""
    try:
        env = from_dict({**required, **optional})
    except MalformedEnvelope:
        return
    assert_conforms(encode(env))


def test_unknown_extensions_survive_a_round_trip_untouched() -> None:
    body = b'{"specversion":"1.0","id":"1","source":"/s","type":"t","region":"eu","priority":3,"beta":true}'
    env = decode(body)
    assert env.extensions == {"region": "eu", "priority": 3, "beta": True}
    assert orjson.loads(encode(env)) | {"hops": 0} == orjson.loads(body) | {"hops": 0}


@pytest.mark.parametrize(
    "time", ["2024-02-29T00:00:00Z", "2024-12-31t23:59:59.123456789+05:30", "0001-01-01T00:00:00-00:00"]
)
def test_any_rfc_3339_time_is_accepted(time: str) -> None:
    assert from_dict({**VALID, "time": time}).time == time


def test_decode_does_not_police_uri_syntax() -> None:
    """Like the SDK, decode accepts any non-empty source/dataschema: refusing a producer's odd but
    harmless source would dead-letter real business events over a formality."""
    env = decode(b'{"specversion":"1.0","id":"1","source":"my service","type":"t","dataschema":"v1"}')
    assert (env.source, env.dataschema) == ("my service", "v1")


def test_hops_sent_as_a_string_of_digits_is_read_as_an_integer() -> None:
    """Binary-mode bindings carry extensions as strings."""
    assert decode(b'{"specversion":"1.0","id":"1","source":"/s","type":"t","hops":"7"}').hops == 7


@pytest.mark.parametrize("digits", [20, 5000])
def test_hops_as_a_string_of_too_many_digits_is_malformed_not_a_value_error(digits: int) -> None:
    """``int()`` refuses a string of over 4,300 digits: a ValueError, which no consumer handles as a
    malformed envelope (it dead-letters only MalformedEnvelope) and a receiver answered 500."""
    body = orjson.dumps({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "hops": "9" * digits})
    with pytest.raises(MalformedEnvelope, match=f"^hops: expected a non-negative 64-bit integer, got a string of "
                                                 f"{digits} digits"):
        decode(body)
    padded = b'{"specversion":"1.0","id":"1","source":"/s","type":"t","hops":"' + b"0" * 30 + b'7"}'
    assert decode(padded).hops == 7  # leading zeros are no count


def test_hops_as_a_string_of_over_4300_leading_zeros_is_read_not_a_value_error() -> None:
    """Leading zeros pass the check of the digits that count, but ``int()`` counts them all: a
    string of 5,000 zeros and a 7 raised its ValueError (no MalformedEnvelope, no hops)."""
    body = b'{"specversion":"1.0","id":"1","source":"/s","type":"t","hops":"' + b"0" * 5000 + b'7"}'
    assert decode(body).hops == 7
    assert decode(body.replace(b'7"}', b'"}')).hops == 0


def test_binary_data_is_carried_as_data_base64_untouched() -> None:
    env = decode(b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AAE="}')
    assert env.data is None
    assert orjson.loads(encode(env))["data_base64"] == "AAE="


def test_data_that_is_not_json_serialisable_is_refused_at_encode() -> None:
    with pytest.raises(MalformedEnvelope, match=r"^data: "):
        encode(Envelope(id="1", source="/s", type="t", data={"when": object()}))


# --- malformed envelopes name the attribute -------------------------------------------------------

VALID: dict[str, Any] = {"specversion": "1.0", "id": "e-1", "source": "/s", "type": "t", "data": {"n": 1}}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != name}


@pytest.mark.parametrize(
    ("obj", "attribute"),
    [
        pytest.param(without("id"), "id", id="missing id"),
        pytest.param(without("source"), "source", id="missing source"),
        pytest.param(without("type"), "type", id="missing type"),
        pytest.param(without("specversion"), "specversion", id="missing specversion"),
        pytest.param({**VALID, "id": ""}, "id", id="empty id"),
        pytest.param({**VALID, "source": ""}, "source", id="empty source"),
        pytest.param({**VALID, "type": ""}, "type", id="empty type"),
        pytest.param({**VALID, "id": 7}, "id", id="id a number"),
        pytest.param({**VALID, "source": ["/s"]}, "source", id="source a list"),
        pytest.param({**VALID, "type": None}, "type", id="type null"),
        pytest.param({**VALID, "specversion": 1.0}, "specversion", id="specversion a number"),
        pytest.param({**VALID, "specversion": "0.3"}, "specversion", id="specversion 0.3"),
        pytest.param({**VALID, "time": "yesterday"}, "time", id="time not RFC 3339"),
        pytest.param({**VALID, "time": "2024-02-31T00:00:00Z"}, "time", id="time 31 February"),
        pytest.param(
            {**VALID, "time": "2023-02-29T00:00:00Z"}, "time", id="time 29 February of a common year"
        ),
        pytest.param({**VALID, "time": "2024-01-01T23:59:60Z"}, "time", id="time a leap second"),
        pytest.param({**VALID, "time": "2024-01-01T00:00:00"}, "time", id="time without offset"),
        pytest.param({**VALID, "time": "٢٠٢٤-01-01T00:00:00Z"}, "time", id="time in Arabic-Indic digits"),
        pytest.param({**VALID, "time": 1700000000}, "time", id="time a number"),
        pytest.param({**VALID, "subject": ""}, "subject", id="empty subject"),
        pytest.param({**VALID, "datacontenttype": 1}, "datacontenttype", id="datacontenttype a number"),
        pytest.param({**VALID, "dataschema": ""}, "dataschema", id="empty dataschema"),
        pytest.param({**VALID, "correlationid": 5}, "correlationid", id="correlationid a number"),
        pytest.param({**VALID, "hops": -1}, "hops", id="negative hops"),
        pytest.param({**VALID, "hops": True}, "hops", id="hops a boolean"),
        pytest.param({**VALID, "hops": "²"}, "hops", id="hops a superscript digit"),
        pytest.param({**VALID, "hops": 1.5}, "hops", id="hops a fraction"),
        pytest.param({**VALID, "Region": "eu"}, "Region", id="upper-case extension name"),
        pytest.param({**VALID, "x-region": "eu"}, "x-region", id="extension name with a dash"),
        pytest.param({**VALID, "my_ext": "eu"}, "my_ext", id="extension name with an underscore"),
        pytest.param({**VALID, "": "eu"}, "", id="empty extension name"),
        pytest.param({**VALID, "region": {"name": "eu"}}, "region", id="extension value an object"),
        pytest.param({**VALID, "tags": ["a"]}, "tags", id="extension value a list"),
    ],
)
def test_an_invalid_envelope_raises_malformed_envelope_naming_the_attribute(
    obj: dict[str, Any], attribute: str
) -> None:
    with pytest.raises(MalformedEnvelope) as info:
        decode(orjson.dumps(obj))
    assert info.value.message.startswith(f"{attribute}: ")


@pytest.mark.parametrize("body", [b"", b"{", b"\xff", b"[1, 2]", b'"event"', b"null"])
def test_a_body_that_is_not_a_json_object_raises_malformed_envelope_at_the_root(body: bytes) -> None:
    with pytest.raises(MalformedEnvelope, match=r"^\$: "):
        decode(body)


def test_malformed_envelope_carries_the_event_id_when_there_is_one() -> None:
    with pytest.raises(MalformedEnvelope) as info:
        decode(orjson.dumps({**VALID, "id": "e-9", "hops": -1}))
    assert info.value.event_id == "e-9"


# --- agreement with the CloudEvents SDK -----------------------------------------------------------

SDK = JSONFormat()


def _sdk_view(env: Envelope) -> dict[str, Any]:
    """What the SDK should see in our JSON: every attribute present, ``time`` as an aware datetime."""
    attributes = {k: v for k, v in env.to_dict().items() if k != "data"}
    if env.time is not None:
        attributes["time"] = isoparse(env.time)
    return attributes


@given(envelopes())
def test_the_sdk_reads_our_json_as_the_same_event(env: Envelope) -> None:
    event = SDK.read(None, encode(env))
    attributes = dict(event.get_attributes())
    if env.time is None:
        attributes.pop("time")  # the SDK stamps a missing time with "now"
    assert attributes == _sdk_view(env)
    assert event.get_data() == env.data


_sdk_attributes = st.fixed_dictionaries(
    {"id": _non_empty, "source": _non_empty, "type": _non_empty},
    optional={
        "time": _datetimes,
        "subject": _non_empty,
        "dataschema": st.just("https://example.com/schema.json"),
        "correlationid": _non_empty,
        "hops": st.integers(0, 100),
        "region": _text,
        "priority": st.integers(-(2**31), 2**31 - 1),
    },
)
_sdk_data = st.none() | st.dictionaries(_text, _json, max_size=4)


@given(_sdk_attributes, _sdk_data)
def test_we_decode_the_sdks_json_as_the_same_event(attributes: dict[str, Any], data: Any) -> None:
    event = CloudEvent(dict(attributes), data)
    env = decode(SDK.write(event))
    seen = {k: v for k, v in env.to_dict().items() if k != "data"}
    expected = dict(event.get_attributes())
    expected.setdefault("hops", 0)  # we always write hops
    assert isoparse(seen.pop("time")) == expected.pop("time")
    assert seen == expected
    assert env.data == data


def test_we_decode_the_sdks_binary_data_as_data_base64() -> None:
    event = CloudEvent({"id": "1", "source": "/s", "type": "t"}, b"\x00\x01\xff")
    env = decode(SDK.write(event))
    assert env.extensions == {"data_base64": "AAH/"}
    assert SDK.read(None, encode(env)).get_data() == b"\x00\x01\xff"


# --- the conformance suite's minimum events, in the JSON format -----------------------------------


def _minimum_events() -> list[dict[str, Any]]:
    with MINIMUM_PATH.open() as f:  # BaseLoader: `specversion: 1.0` stays the string "1.0"
        return [doc for doc in yaml.load_all(f, Loader=yaml.BaseLoader) if doc]


def _as_structured_json(case: dict[str, Any]) -> dict[str, Any]:
    """JSON format §3.1: JSON data is embedded as a JSON value, any other text as a string."""
    attributes = case["ContextAttributes"]
    data: Any = case["Data"]
    if JSONFormat.JSON_CONTENT_TYPE_PATTERN.match(attributes["datacontenttype"]):
        data = json.loads(data)
    return {**attributes, "data": data}


@pytest.mark.parametrize("case", _minimum_events(), ids=lambda c: c["ContextAttributes"]["id"])
def test_conformance_minimum_events_round_trip_and_conform(case: dict[str, Any]) -> None:
    structured = _as_structured_json(case)
    env = from_dict(structured)
    assert (env.id, env.datacontenttype, env.data) == (
        structured["id"],
        structured["datacontenttype"],
        structured["data"],
    )
    body = encode(env)
    assert assert_conforms(body) == {**structured, "hops": 0}
    sdk_event = SDK.read(None, body)
    assert sdk_event.get_id() == env.id and sdk_event.get_data() == env.data


# --- what the runtime writes ----------------------------------------------------------------------


class Placed(Event, type="test.envelope.placed", version=2):
    order_id: str
    amount: int


def _input() -> Envelope:
    return first_envelope(Placed(order_id="o-1", amount=3), source="/choreograph/publisher", id="in-1")


def test_an_ingress_envelope_conforms_and_names_its_schema() -> None:
    obj = assert_conforms(encode(_input()))
    assert obj["dataschema"] == "urn:choreograph:schema:test.envelope.placed:v2"
    assert obj["correlationid"] == "in-1" and obj["data"] == {"order_id": "o-1", "amount": 3}


def test_an_output_envelope_conforms_and_carries_correlation_causation_and_hops() -> None:
    cause = _input()
    out = output_envelope(
        Placed(order_id="o-1", amount=4),
        cause=cause,
        service="svc",
        handler="h",
        index=0,
        source="/choreograph/svc",
    )
    obj = assert_conforms(encode(out))
    assert (obj["id"], obj["correlationid"], obj["causationid"], obj["hops"]) == (
        derive_id("in-1", "svc", "h", 0),
        "in-1",
        "in-1",
        1,
    )
    assert SDK.read(None, encode(out)).get_data() == {"order_id": "o-1", "amount": 4}


def test_a_failure_envelope_conforms_and_embeds_the_original() -> None:
    cause = _input()
    record = dead_letter_record(
        reason="max_attempts",
        service="svc",
        handler="h",
        group="svc",
        attempts=5,
        first_error=None,
        last_error=None,
        first_attempt_at=1.0,
        last_attempt_at=2.0,
        envelope=cause.to_dict(),
    )
    failure = failure_envelope(cause, record, service="svc", handler="h", source="/choreograph/svc")
    obj = assert_conforms(encode(failure))
    assert obj["type"] == "choreograph.failed" and obj["failedtype"] == "test.envelope.placed"
    assert obj["data"]["envelope"]["id"] == "in-1" and obj["data"]["record"]["reason"] == "max_attempts"
    assert decode(encode(failure)).extensions == {"failedtype": "test.envelope.placed"}


# --- deterministic ids ----------------------------------------------------------------------------


@given(_text, _text, _text, st.integers(0, 10**6) | _text)
def test_derive_id_is_the_uuid5_of_its_parts(
    input_id: str, service: str, handler: str, index: int | str
) -> None:
    """Stable across processes and Python versions: it is a standard UUID5, computed by hand
    (for an input id that is not a time-ordered UUID: see the next tests)."""
    assume(not re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[78][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", input_id))
    namespace = uuid.UUID("6f2b1a0e-3c59-4d8e-9a41-2f4c6d8b7e10")
    expected = uuid.uuid5(namespace, f"{input_id}\x1f{service}\x1f{handler}\x1f{index}")
    assert derive_id(input_id, service, handler, index) == str(expected)


def test_derive_id_is_pinned() -> None:
    """A changed derivation would break dedupe of outputs republished by an upgraded worker."""
    assert derive_id("in-1", "payment", "capture", 0) == "a45b8613-a1f4-5651-9290-42913c8b32b5"


#: UUIDv7 texts: any 48-bit time, any random bits.
_timed_id = st.builds(
    lambda ms, a, b: str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (a << 64) | (0b10 << 62) | b)),
    st.integers(0, 2**48 - 1), st.integers(0, 2**12 - 1), st.integers(0, 2**62 - 1),
)


@given(_timed_id, _text, _text, st.integers(0, 10**6) | _text)
def test_derive_id_of_a_time_ordered_input_keeps_its_time_and_hashes_the_rest(
    input_id: str, service: str, handler: str, index: int | str
) -> None:
    """Outputs of a UUIDv7 input (new_id's) are UUIDv8s in the v7 layout: the input's 48-bit
    time, then 74 bits of the same SHA-1 as the UUID5 - so they sort with their input, and an
    output of an output too (an inbox then records a transaction's ids in about key order)."""
    namespace = uuid.UUID("6f2b1a0e-3c59-4d8e-9a41-2f4c6d8b7e10")
    hashed = str(uuid.uuid5(namespace, f"{input_id}\x1f{service}\x1f{handler}\x1f{index}"))
    out = derive_id(input_id, service, handler, index)
    parsed = uuid.UUID(out)
    assert (parsed.version, parsed.variant, str(parsed)) == (8, uuid.RFC_4122, out)
    assert out[:13] == input_id[:13]  # the time
    assert out[15:] == hashed[15:] and out[14] == "8"  # the hash's bits, in the UUID5's places
    again = derive_id(out, service, handler, index)
    assert again[:13] == input_id[:13] and uuid.UUID(again).version == 8


def test_derive_id_of_a_time_ordered_input_is_pinned() -> None:
    """A changed derivation would break dedupe of outputs republished by an upgraded worker."""
    assert derive_id("01a23ac6-29d4-7965-8b0d-c3f6bbd3066b", "payment", "capture", 0) == (
        "01a23ac6-29d4-815b-8257-c5fa92e23159"
    )


_name = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=10)  # names hold no \x1f


@given(st.lists(st.tuples(_text, _name, _name, st.integers(0, 5)), min_size=2, max_size=10, unique=True))
def test_derive_id_differs_for_every_distinct_input_service_handler_and_index(
    parts: list[tuple[str, str, str, int]],
) -> None:
    """Service names and handler qualnames cannot contain the separator, so the parts never blur."""
    ids = {derive_id(*p) for p in parts}
    assert len(ids) == len(parts)


def test_the_workers_output_encoder_writes_the_same_envelope_as_the_generic_one() -> None:
    from choreograph._envelope import id_suffix
    from choreograph.runtime.records import output_envelope, output_message

    class Shipped(Event, type="test.envelope.shipped"):
        order_id: str

        @classmethod
        def schema_uri(cls) -> str:  # an override is what both write
            return "https://schemas.example.com/shipped/v1.json"

    cause = Envelope(id="in-1", source="/orders", type="test.envelope.paid", data={}, correlationid="corr",
                     traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", tracestate="k=v",
                     hops=3, partitionkey="p", deadline="2030-01-01T00:00:00Z")
    for c, subject in ((cause, "s-1"), (Envelope(id="in-2", source="/x", type="t"), None)):
        fast = output_message(Shipped(order_id="o"), c, id_suffix("svc", "h", 2), "/svc", subject)
        slow = encode(output_envelope(Shipped(order_id="o"), cause=c, service="svc", handler="h", index=2,
                                      source="/svc", subject=subject))
        got, want = decode(fast.body), decode(slow)
        assert got.time is not None and want.time is not None
        got.time = want.time = "x"
        assert got == want
        assert (fast.id, fast.type) == (want.id, "test.envelope.shipped")
        assert got.dataschema == "https://schemas.example.com/shipped/v1.json"


def test_new_ids_are_distinct_version_7_uuids_in_time_order() -> None:
    import time

    from choreograph._envelope import new_id

    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)
        assert before <= parsed.int >> 80 <= after  # the Unix time in ms, in the top 48 bits
    stamps = [uuid.UUID(text).int >> 80 for text in ids]
    assert stamps == sorted(stamps)


def test_a_forked_child_and_its_parent_never_draw_the_same_random_bits() -> None:
    import os

    from choreograph._envelope import new_id

    new_id()  # the parent holds unused random digits now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then exit at once
        os.write(write, " ".join(new_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split()
    parent = [new_id() for _ in range(50)]
    assert len(child) == 50
    assert not {text[14:] for text in child} & {text[14:] for text in parent}  # the random part


def test_new_ids_stay_distinct_across_threads() -> None:
    import threading

    from choreograph._envelope import new_id

    drawn: list[list[str]] = [[] for _ in range(4)]

    def draw(into: list[str]) -> None:
        for _ in range(5000):
            into.append(new_id())

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [text for into in drawn for text in into]
    assert len(set(every)) == len(every) == 20000


def test_now_is_the_current_utc_time_in_rfc3339_with_microseconds() -> None:
    import time
    from datetime import datetime

    from choreograph._envelope import is_rfc3339, now_rfc3339

    for _ in range(2000):  # crosses second boundaries now and then: the cached date part must follow
        before = time.time()
        stamp = now_rfc3339()
        after = time.time()
        assert is_rfc3339(stamp) and len(stamp) == 27 and stamp.endswith("Z")
        at = datetime.fromisoformat(stamp[:-1] + "+00:00").timestamp()
        assert before - 2e-6 <= at <= after + 2e-6


def test_only_models_that_can_write_a_value_as_null_are_read_back_before_publishing() -> None:
    """The emit-side inf/nan check reads data holding ``null`` back; a model without a float
    (nor a validator of unknown type) has only optional fields' None there and is not read back."""
    import pydantic

    from choreograph._event_config import may_write_null_for_a_value as lossy

    class Inner(pydantic.BaseModel):
        weight: float

    class Plain(Event, type="test.lossy.plain"):
        n: int
        note: str | None = None

    class Nested(Event, type="test.lossy.nested"):
        parts: list[dict[str, Inner]] | None = None

    class Direct(Event, type="test.lossy.direct"):
        value: float | None = None

    class Typed(Event, type="test.lossy.typed"):  # a field named "type": a schema under that key
        type: str
        kind: dict[str, str] | None = None

    assert not lossy(Plain.__pydantic_core_schema__)
    assert lossy(Nested.__pydantic_core_schema__)
    assert lossy(Direct.__pydantic_core_schema__)
    assert not lossy(Typed.__pydantic_core_schema__)


def test_an_inf_in_a_field_of_any_type_is_refused_not_published_as_null() -> None:
    """``Any`` has no float in its schema, yet holds one at run time: without reading it back
    the null it is published as reaches consumers as None."""
    from choreograph.errors import EmitError
    from choreograph.events import event_json

    class Tagged(Event, type="test.lossy.tagged"):
        name: str
        tags: dict[str, Any] = {}

    assert orjson.loads(event_json(Tagged(name="n", tags={"a": None, "b": 1.5}))) == {
        "name": "n", "tags": {"a": None, "b": 1.5}}
    with pytest.raises(EmitError) as raised:
        event_json(Tagged(name="n", tags={"a": None, "b": float("inf")}))
    assert str(raised.value) == ("'test.lossy.tagged' cannot be published: $.tags.b: inf cannot be carried by "
                                 "JSON; it would be published as null, which consumers read as None")


@pytest.mark.parametrize("mode", ["constants", "strings"])
def test_an_event_whose_model_writes_inf_as_other_than_null_is_refused_where_it_is_defined(mode: str) -> None:
    """``ser_json_inf_nan="constants"`` writes ``Infinity``, which is not JSON: no consumer can
    read the envelope, and the emit check (looking for ``null``) never ran. ``"strings"`` writes
    ``"Infinity"``, which a ``float | str`` or ``Any`` field reads back as a str and a strict
    model refuses. Either, on the event or a model in it, is a ConfigurationError."""
    import pydantic

    from choreograph.errors import ConfigurationError
    from choreograph.events import event_class

    with pytest.raises(ConfigurationError) as own:
        class Own(Event, type="test.inf_nan.own"):
            model_config = pydantic.ConfigDict(ser_json_inf_nan=mode)
            value: float

    class Part(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(ser_json_inf_nan=mode)
        value: float | str

    with pytest.raises(ConfigurationError) as nested:
        class Whole(Event, type="test.inf_nan.nested"):
            parts: list[Part]

    assert f".Own: its config sets ser_json_inf_nan={mode!r}, which consumers cannot read" in str(own.value)
    assert f".Whole: Part, a model in it, sets ser_json_inf_nan={mode!r}" in str(nested.value)
    assert event_class("test.inf_nan.own") is None and event_class("test.inf_nan.nested") is None

    class Fine(Event, type="test.inf_nan.default"):
        model_config = pydantic.ConfigDict(ser_json_inf_nan="null")
        value: float


@pytest.mark.parametrize("config", [
    {"ser_json_bytes": "base64"}, {"ser_json_bytes": "hex"}, {"val_json_bytes": "base64"},
    {"ser_json_bytes": "base64", "val_json_bytes": "hex"},
])
def test_an_event_model_writing_bytes_in_another_encoding_than_it_reads_them_is_refused(config: dict[str, str]) -> None:
    """``ser_json_bytes="base64"`` alone writes ``b"abc"`` as ``"YWJj"``, which the consumer's
    model (reading bytes as UTF-8 text) takes as ``b"YWJj"``; ``val_json_bytes="base64"`` alone
    reads the UTF-8 text ``"abcd"`` as the bytes ``b"i\xb7\x1d"``. The value silently changes."""
    import pydantic

    from choreograph.errors import ConfigurationError

    class Blob(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(**config)
        content: bytes

    with pytest.raises(ConfigurationError) as raised:
        class Stored(Event, type="test.bytes.mismatch"):
            blob: Blob

    written, read = config.get("ser_json_bytes", "utf8"), config.get("val_json_bytes", "utf8")
    assert (f".Stored: Blob, a model in it, writes bytes as {written} (ser_json_bytes) but reads them as "
            f"{read} (val_json_bytes)") in str(raised.value)

    from choreograph.events import event_json

    class Both(Event, type=f"test.bytes.{written}"):  # one encoding both ways round-trips: accepted
        model_config = pydantic.ConfigDict(ser_json_bytes=written, val_json_bytes=written)
        content: bytes

    if written != "utf8":
        sent = Both(content=b"\x00\xffabc")
        assert Both.model_validate(orjson.loads(event_json(sent))) == sent


def test_only_models_that_can_write_an_integer_or_an_offset_are_checked_for_them() -> None:
    """What the emitters look for beyond nulls, decided once per model from its schema: nothing
    for a model without an int, a datetime or a time; its top-level int fields' values (compared
    in place) when those are all; else a search of its JSON (check_wire)."""
    import pydantic

    class Inner(pydantic.BaseModel):
        count: int

    class Words(Event, type="test.wire.words"):
        name: str
        weight: float
        tags: list[str] = []

    class Counts(Event, type="test.wire.counts"):
        name: str
        count: int
        spare: int | None = None
        limit: int = 3

    class Nested(Event, type="test.wire.nested"):
        count: int
        parts: list[Inner] = []

    class Loose(Event, type="test.wire.loose"):
        extra: dict[str, Any] = {}

    class Timed(Event, type="test.wire.timed"):
        at: datetime
        opens: time | None = None

    class Open(Event, type="test.wire.open"):
        model_config = pydantic.ConfigDict(extra="allow")
        name: str

    assert Words.__wire_checks__ == ()
    assert Counts.__wire_checks__ == ("count", "spare", "limit")
    assert [cls.__wire_checks__ for cls in (Nested, Loose, Timed, Open)] == [None] * 4


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**400])
def test_an_int_json_consumers_cannot_read_as_one_is_refused_naming_the_field(value: int) -> None:
    """orjson reads an integer outside -2**63..2**64-1 as a float (past a double, not at all)."""
    from choreograph.errors import EmitError
    from choreograph.events import event_json

    class Ledger(Event, type="test.wire.ledger"):
        total: int
        lines: dict[str, Any] = {}

    assert orjson.loads(event_json(Ledger(total=2**64 - 1, lines={"a": -(2**63)}))) == {
        "total": 2**64 - 1, "lines": {"a": -(2**63)}}
    with pytest.raises(EmitError) as top:
        event_json(Ledger(total=value))
    with pytest.raises(EmitError) as deep:
        event_json(Ledger(total=1, lines={"a": [1, value]}))
    assert str(top.value).startswith(f"'test.wire.ledger' cannot be published: $.total: {value} cannot be carried by "
                                     "JSON; consumers read an integer outside the 64-bit range as a float")
    assert f"$.lines.a[1]: {value} cannot be carried" in str(deep.value)


def test_an_int_enum_member_or_literal_int_out_of_range_is_refused_where_it_is_emitted() -> None:
    """An IntEnum member or a Literal's int is written as an int field's value is, and was
    published unchecked: consumers read 2**64 + 1 as a float, which the same enum or Literal
    refuses (``invalid_payload`` one hop on). A member in range is published."""
    import enum
    from typing import Literal

    from choreograph.errors import EmitError
    from choreograph.events import event_json

    class Size(enum.IntEnum):
        SMALL = 1
        HUGE = 2**64 + 1

    class Flag(enum.Enum):  # an Enum of ints, not IntEnum: written as its value too
        WIDE = -(2**63) - 1
        NARROW = "narrow"

    class Parcel(Event, type="test.wire.parcel"):
        size: Size
        code: Literal[1, 2**64 + 1] = 1
        flag: Flag = Flag.NARROW
        tagged: Literal[Size.HUGE, "none"] = "none"
        sizes: list[Size] = []

    fine = Parcel(size=Size.SMALL, sizes=[Size.SMALL])
    assert Parcel.model_validate(orjson.loads(event_json(fine))) == fine
    refused = {
        "$.size": Parcel(size=Size.HUGE),
        "$.code": Parcel.model_construct(size=Size.SMALL, code=2**64 + 1),  # pydantic's own validator refuses it
        "$.flag": Parcel(size=Size.SMALL, flag=Flag.WIDE),
        "$.tagged": Parcel(size=Size.SMALL, tagged=Size.HUGE),
        "$.sizes[1]": Parcel(size=Size.SMALL, sizes=[Size.SMALL, Size.HUGE]),
    }
    for path, event in refused.items():
        with pytest.raises(EmitError) as raised:
            event_json(event)
        assert f"{path}: " in str(raised.value) and "outside the 64-bit range" in str(raised.value), path
    with pytest.raises(EmitError, match=r"\$\.size: 18446744073709551617 cannot be carried"):
        first_envelope(Parcel(size=Size.HUGE), source="/s", id="e-1")


def test_an_int_out_of_range_deep_in_a_model_that_holds_itself_is_refused_by_every_emitter() -> None:
    """A tree's int fields are written at every level, not only the top one: compared in place,
    the top level's values say nothing of its children's."""
    from choreograph._envelope import id_suffix
    from choreograph.errors import EmitError
    from choreograph.events import event_json
    from choreograph.runtime.records import output_message

    class Tree(Event, type="test.wire.tree"):
        size: int
        children: list[Tree] = []

    deep = Tree(size=1, children=[Tree(size=2, children=[Tree(size=2**64)])])
    cause = Envelope(id="in-1", source="/s", type="test.wire.cause")
    emitters = {
        "event_json": lambda: event_json(deep),
        "first_envelope": lambda: first_envelope(deep, source="/s", id="e-1"),
        "output_message": lambda: output_message(deep, cause, id_suffix("svc", "h", 0), "/svc"),
    }
    for emit in emitters.values():
        with pytest.raises(EmitError, match=r"\$\.children\[0\]\.children\[0\]\.size: 18446744073709551616 "):
            emit()
    assert orjson.loads(event_json(Tree(size=1, children=[Tree(size=2**64 - 1)])))["children"][0]["size"] == 2**64 - 1


def test_a_datetime_whose_offset_has_seconds_is_refused_naming_the_field_other_offsets_are_not() -> None:
    """RFC 3339 offsets are hours and minutes: pydantic writes +05:30:15 as +05:30, another instant."""
    from choreograph.errors import EmitError
    from choreograph.events import event_json

    class Stamped(Event, type="test.wire.stamped"):
        at: datetime
        seen: dict[str, Any] = {}

    odd = timezone(timedelta(hours=5, minutes=30, seconds=15))
    for fine in (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-3))),
                 datetime(2026, 1, 1)):
        assert Stamped.model_validate(orjson.loads(event_json(Stamped(at=fine)))).at == fine
    with pytest.raises(EmitError) as top:
        event_json(Stamped(at=datetime(2026, 1, 1, tzinfo=odd)))
    with pytest.raises(EmitError) as deep:
        event_json(Stamped(at=datetime(2026, 1, 1, tzinfo=UTC), seen={"by": [datetime(1900, 1, 1, tzinfo=odd)]}))
    assert str(top.value).startswith("'test.wire.stamped' cannot be published: $.at: 2026-01-01T00:00:00+05:30:15 "
                                     "has a UTC offset with seconds, which RFC 3339 cannot carry")
    assert "$.seen.by[0]: 1900-01-01T00:00:00+05:30:15 has a UTC offset with seconds" in str(deep.value)


def test_a_datetime_with_seconds_in_its_offset_that_the_models_json_serializer_converts_is_published() -> None:
    """What is checked is what is written: a serializer used for JSON only (converting to UTC)
    does not show in the Python dump the values are read from."""
    import pydantic

    from choreograph.errors import EmitError
    from choreograph.events import event_json

    class Converted(Event, type="test.wire.converted"):
        at: datetime
        seen: datetime | None = None

        @pydantic.field_serializer("at", when_used="json")
        def _in_utc(self, value: datetime) -> str:
            return value.astimezone(UTC).isoformat()

    odd = timezone(timedelta(hours=5, minutes=30, seconds=15))
    at = datetime(2026, 1, 1, tzinfo=odd)
    sent = orjson.loads(event_json(Converted(at=at, seen=datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2))))))
    assert datetime.fromisoformat(sent["at"]) == at  # the same instant
    with pytest.raises(EmitError, match=r"\$\.seen: 2026-01-01T00:00:00\+05:30:15 has a UTC offset with seconds"):
        event_json(Converted(at=at, seen=at))  # the field it does not convert is still refused


@pytest.mark.parametrize("unit", ["seconds", "milliseconds"])
def test_an_event_model_writing_temporal_values_as_numbers_is_refused_where_it_is_defined(unit: str) -> None:
    """``ser_json_temporal="seconds"`` writes datetimes and times as numbers, which the consumer's
    model reads back as UTC: a naive value becomes aware, an aware one loses its offset; with
    ``"milliseconds"`` a time is refused (a number over 86,399). Pydantic before 2.12 has no such
    option (the key is ignored there)."""
    import pydantic

    from choreograph.errors import ConfigurationError

    if tuple(int(part) for part in pydantic.VERSION.split(".")[:2]) < (2, 12):
        pytest.skip("ser_json_temporal is pydantic >= 2.12")

    class Slot(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(ser_json_temporal=unit)
        opens: datetime

    with pytest.raises(ConfigurationError) as own:
        class Booked(Event, type="test.temporal.own"):
            model_config = pydantic.ConfigDict(ser_json_temporal=unit)
            at: datetime

    with pytest.raises(ConfigurationError) as nested:
        class Planned(Event, type="test.temporal.nested"):
            slots: list[Slot]

    assert f".Booked: its config sets ser_json_temporal={unit!r}, which consumers cannot read back" in str(own.value)
    assert f".Planned: Slot, a model in it, sets ser_json_temporal={unit!r}" in str(nested.value)

    class Default(Event, type="test.temporal.default"):
        model_config = pydantic.ConfigDict(ser_json_temporal="iso8601")
        at: datetime


@pytest.mark.parametrize("unit", ["seconds", "milliseconds"])
def test_a_temporal_config_that_writes_no_temporal_value_is_not_refused(unit: str) -> None:
    """A shared base config setting ``ser_json_temporal`` refused every event holding a model
    built on it, though pydantic writes by it only that model's own datetime, date, time and
    duration fields (a model in it has its own config) and, for the event's config, values typed
    at run time (``Any``). Where it writes none, the event is published and read back as sent;
    where it may, it is still refused."""
    import pydantic

    from choreograph.errors import ConfigurationError
    from choreograph.events import event_json

    if tuple(int(part) for part in pydantic.VERSION.split(".")[:2]) < (2, 12):
        pytest.skip("ser_json_temporal is pydantic >= 2.12")

    class Base(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(ser_json_temporal=unit)

    class Window(pydantic.BaseModel):  # the default config: its datetime is written as ISO 8601
        opens: datetime

    class Address(Base):
        street: str
        floor: int = 0
        window: Window | None = None

    class Moved(Event, type="test.temporal.harmless"):
        address: Address

    class Counted(Event, type="test.temporal.harmless-own"):
        model_config = pydantic.ConfigDict(ser_json_temporal=unit)
        count: int
        address: Address  # a datetime in it is written by Window's config, not this one

    naive = datetime(2026, 1, 1, 12, 30)
    moved = Moved(address=Address(street="1 Main St", window=Window(opens=naive)))
    counted = Counted(count=1, address=moved.address)
    assert Moved.model_validate(orjson.loads(event_json(moved))) == moved
    assert Counted.model_validate(orjson.loads(event_json(counted))) == counted

    class Loose(Base):
        note: Any = None

    class Extra(Base):
        model_config = pydantic.ConfigDict(extra="allow")

    for holds in (datetime, date, time, timedelta, list[datetime] | None, Loose, Extra):
        with pytest.raises(ConfigurationError, match=f"a model in it, sets ser_json_temporal={unit!r}"):
            class Holder(Base):
                value: holds  # type: ignore[valid-type]

            class Sent(Event, type="test.temporal.harmful"):
                holder: Holder

    class Open(pydantic.BaseModel):  # the default config, but an Any is written by the event's
        note: Any = None

    with pytest.raises(ConfigurationError, match=f"its config sets ser_json_temporal={unit!r}"):
        class Noted(Event, type="test.temporal.inferred"):
            model_config = pydantic.ConfigDict(ser_json_temporal=unit)
            address: Address
            open: list[Open]


@pytest.mark.parametrize("config", [
    {"ser_json_inf_nan": "constants"}, {"ser_json_inf_nan": "strings"}, {"ser_json_bytes": "base64"},
    {"val_json_bytes": "hex"},
])
def test_an_inf_nan_or_bytes_config_that_writes_no_such_value_is_not_refused(config: dict[str, str]) -> None:
    """A shared base config setting ``ser_json_inf_nan`` or ``ser_json_bytes`` refused every event
    holding a model built on it, though pydantic writes (and reads) by it only that model's own
    float or bytes fields (a model in it has its own config) and, for the event's config, values
    typed at run time (``Any``). Where it writes none, the event is published and read back as
    sent; where it may, it is still refused."""
    import pydantic

    from choreograph.errors import ConfigurationError
    from choreograph.events import event_json

    class Base(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(**config)

    class Reading(pydantic.BaseModel):  # the default config: its float and bytes round-trip
        value: float
        raw: bytes

    class Address(Base):
        street: str
        floor: int = 0
        reading: Reading | None = None

    class Moved(Event, type="test.lossy_config.harmless"):
        address: Address

    class Counted(Event, type="test.lossy_config.harmless-own"):
        model_config = pydantic.ConfigDict(**config)
        count: int
        address: Address  # a float or bytes in it is written by Reading's config, not this one

    moved = Moved(address=Address(street="1 Main St", reading=Reading(value=1.5, raw=b"\x00abc")))
    counted = Counted(count=1, address=moved.address)
    assert Moved.model_validate(orjson.loads(event_json(moved))) == moved
    assert Counted.model_validate(orjson.loads(event_json(counted))) == counted

    class Loose(Base):
        note: Any = None

    class Extra(Base):
        model_config = pydantic.ConfigDict(extra="allow")

    written = float | str if "ser_json_inf_nan" in config else bytes
    for holds in (written, list[written] | None, Loose, Extra):  # type: ignore[valid-type]
        with pytest.raises(ConfigurationError, match="a model in it, (sets ser_json_inf_nan|writes bytes)"):
            class Holder(Base):
                value: holds  # type: ignore[valid-type]

            class Sent(Event, type="test.lossy_config.harmful"):
                holder: Holder

    class Open(pydantic.BaseModel):  # the default config, but an Any is written by the event's
        note: Any = None

    with pytest.raises(ConfigurationError, match="its config (sets ser_json_inf_nan|writes bytes)"):
        class Noted(Event, type="test.lossy_config.inferred"):
            model_config = pydantic.ConfigDict(**config)
            address: Address
            open: list[Open]


def test_a_model_writing_inf_as_constants_is_refused_once_its_forward_reference_resolves() -> None:
    import pydantic

    from choreograph.errors import ConfigurationError

    class Later(Event, type="test.inf_nan.later"):
        part: Part2

    assert not Later.__pydantic_complete__

    class Part2(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(ser_json_inf_nan="constants")
        value: float

    with pytest.raises(ConfigurationError, match="Part2, a model in it, sets ser_json_inf_nan='constants'"):
        Later.model_rebuild()
