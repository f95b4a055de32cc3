"""The AsyncAPI 3.0 document of an App: valid against the spec's JSON Schema, self-consistent,
and describing what actually travels on the bus."""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import orjson
import pydantic
import pytest

from choreograph import FAILED, App, Event, Failure, Service
from choreograph.asyncapi import asyncapi_document
from choreograph.errors import ConfigurationError
from choreograph.runtime.records import first_envelope, output_envelope
from choreograph.sagas import TIMEDOUT, failed, timed_out

SCHEMA_PATH = Path("/work/shared/conformance/asyncapi-spec-json-schemas/schemas/3.0.0-without-$id.json")


class Size(enum.StrEnum):
    small = "small"
    large = "large"


class Line(pydantic.BaseModel):
    sku: str
    qty: int = pydantic.Field(gt=0)
    size: Size = Size.small


class Placed(Event, type="test.asyncapi.placed"):
    """An order was placed by a customer."""

    order: str
    lines: list[Line]


class Paid(Event, type="test.asyncapi.paid"):
    order: str
    amount: float


class Declined(Event, type="test.asyncapi.declined"):
    order: str
    reason: str | None = None


class Packed(Event, type="test.asyncapi.packed"):
    order: str
    lines: list[Line]


class Released(Event, type="test.asyncapi.released"):
    order: str


def shop() -> App:
    payment, warehouse = Service("payment"), Service("warehouse")

    @payment.on(Placed)
    async def charge(order: Placed) -> Paid | Declined: ...

    @warehouse.on(Paid)
    async def pack(paid: Paid) -> Packed: ...

    @payment.on_failure(Paid)
    async def refund(failure: Failure) -> Declined: ...

    @warehouse.compensate(Packed, on=[timed_out(), failed(Packed)])
    async def unpack(packed: Packed, cause: object) -> Released: ...

    return App(
        "shop",
        [payment, warehouse],
        ingress=[Placed],
        terminal={Packed: "completed", Declined: "failed", Released: "failed"},
    )


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi_document(shop(), version="2.1.0")


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs_in(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs_in(v)]
    return []


def validator(doc: dict[str, Any], ref: str) -> jsonschema.Draft7Validator:
    """A validator for the schema at ``ref``, resolving its ``#/components/...`` references in ``doc``."""
    return jsonschema.Draft7Validator({"$ref": ref, "components": doc["components"]})


@pytest.mark.skipif(not SCHEMA_PATH.exists(), reason=f"conformance data missing: {SCHEMA_PATH}")
@pytest.mark.parametrize("target", ["shop", "chain", "services"])
def test_the_document_is_valid_asyncapi_3(target: str) -> None:
    from examples.chain import app as chain

    subject = {"shop": shop(), "chain": chain, "services": shop().services}[target]
    schema = json.loads(SCHEMA_PATH.read_text())
    errors = [
        f"{list(e.path)}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(asyncapi_document(subject))
    ]
    assert errors == []


def test_it_survives_json_serialisation(doc: dict[str, Any]) -> None:
    assert orjson.loads(orjson.dumps(doc)) == doc


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = refs_in(doc)
    assert refs
    for ref in refs:
        assert resolve(doc, ref) is not None


def test_every_operation_uses_messages_of_its_own_channel(doc: dict[str, Any]) -> None:
    """An AsyncAPI 3 rule that its JSON Schema cannot express."""
    for op_id, op in doc["operations"].items():
        channel_ref = op["channel"]["$ref"]
        for message in op["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), op_id


def test_there_is_a_channel_per_event_type_addressed_by_the_type(doc: dict[str, Any]) -> None:
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert addresses == {
        "test.asyncapi.placed",
        "test.asyncapi.paid",
        "test.asyncapi.declined",
        "test.asyncapi.packed",
        "test.asyncapi.released",
        FAILED,
        TIMEDOUT,
    }


def test_info_names_the_app_and_the_requested_version(doc: dict[str, Any]) -> None:
    assert (doc["asyncapi"], doc["info"]["title"], doc["info"]["version"]) == ("3.0.0", "shop", "2.1.0")


def test_operations_say_which_service_sends_and_receives_what(doc: dict[str, Any]) -> None:
    def ops(service: str, action: str) -> set[str]:
        return {
            resolve(doc, op["channel"]["$ref"])["address"]
            for op in doc["operations"].values()
            if op["action"] == action and op["tags"] == [{"name": service}]
        }

    assert ops("payment", "receive") == {"test.asyncapi.placed", FAILED}
    assert ops("payment", "send") == {"test.asyncapi.paid", "test.asyncapi.declined", FAILED}
    assert ops("warehouse", "receive") == {"test.asyncapi.paid", "test.asyncapi.packed", TIMEDOUT, FAILED}
    assert ops("warehouse", "send") == {"test.asyncapi.packed", "test.asyncapi.released", FAILED}


def test_a_service_whose_only_handlers_undo_still_sends_failures() -> None:
    """Any handler can give up, an ``on_failure`` handler and a compensation too: its runtime then
    publishes ``choreograph.failed``, so the document says the service sends it (a broker ACL
    drawn from it must let it)."""
    shop_, audit, undo = shop(), Service("audit"), Service("undo")

    @audit.on_failure(Placed)
    async def note(failure: Failure) -> None: ...

    @undo.compensate(Packed, on=[Declined])
    async def unpack(packed: Packed, cause: object) -> Released: ...

    doc = asyncapi_document(App("shop", [*shop_.services, audit, undo], ingress=[Placed], terminal=shop_.terminal))
    sends = {
        (op["tags"][0]["name"], resolve(doc, op["channel"]["$ref"])["address"])
        for op in doc["operations"].values() if op["action"] == "send"
    }
    assert ("audit", FAILED) in sends and ("undo", FAILED) in sends


def test_the_payload_is_the_pydantic_schema_of_the_event(doc: dict[str, Any]) -> None:
    message = doc["components"]["messages"]["test.asyncapi.placed"]
    assert (message["name"], message["title"], message["summary"]) == (
        "Placed",
        "test.asyncapi.placed",
        "An order was placed by a customer.",
    )
    payload = validator(doc, message["payload"]["$ref"])
    good = Placed(order="o-1", lines=[Line(sku="a", qty=2, size=Size.large)]).model_dump(mode="json")
    assert list(payload.iter_errors(good)) == []
    assert not payload.is_valid({"order": "o-1", "lines": [{"sku": "a", "qty": 0}]})  # qty > 0
    assert not payload.is_valid({"order": "o-1", "lines": [{"sku": "a", "qty": 1, "size": "huge"}]})
    assert not payload.is_valid({"order": "o-1", "lines": [], "extra": 1})  # extra="forbid"


def test_a_model_shared_by_two_events_is_described_once(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert "Line" in schemas and "Size" in schemas
    line_refs = [r for r in refs_in(doc) if r == "#/components/schemas/Line"]
    assert len(line_refs) == 2  # from Placed and from Packed


def test_the_headers_describe_the_cloudevents_attributes_the_runtime_writes(doc: dict[str, Any]) -> None:
    placed = first_envelope(Placed(order="o-1", lines=[]), source="/choreograph/gateway", id="e-1")
    paid = output_envelope(
        Paid(order="o-1", amount=3.5),
        cause=placed,
        service="payment",
        handler="charge",
        index=0,
        source="/choreograph/payment",
    )
    for envelope in (placed, paid):
        attributes = {k: v for k, v in orjson.loads(orjson.dumps(envelope.to_dict())).items() if k != "data"}
        headers = validator(doc, f"#/components/messages/{envelope.type}/headers")
        assert list(headers.iter_errors(attributes)) == []
    wrong_type = {**{k: v for k, v in paid.to_dict().items() if k != "data"}, "type": "test.asyncapi.placed"}
    assert not validator(doc, "#/components/messages/test.asyncapi.paid/headers").is_valid(wrong_type)
    message = doc["components"]["messages"]["test.asyncapi.paid"]
    assert message["correlationId"]["location"] == "$message.header#/correlationid"


class CloudEventsContext(pydantic.BaseModel):
    """A payload model that happens to carry the name of the headers' schema."""

    forwarded_id: str


class Forwarded(Event, type="test.asyncapi.forwarded"):
    original: CloudEventsContext


def test_a_payload_model_named_like_the_headers_schema_leaves_both_described() -> None:
    relay = Service("relay")

    @relay.on(Forwarded)
    async def relay_it(event: Forwarded) -> None: ...

    doc = asyncapi_document(App("relay", [relay], ingress=[Forwarded], terminal={Forwarded: "completed"}))
    placed = first_envelope(Forwarded(original=CloudEventsContext(forwarded_id="x")), source="/gw", id="e-1")
    attributes = {k: v for k, v in orjson.loads(orjson.dumps(placed.to_dict())).items() if k != "data"}
    assert list(validator(doc, "#/components/messages/test.asyncapi.forwarded/headers").iter_errors(attributes)) == []
    payload = validator(doc, doc["components"]["messages"]["test.asyncapi.forwarded"]["payload"]["$ref"])
    assert payload.is_valid({"original": {"forwarded_id": "x"}})
    assert not payload.is_valid({"original": attributes})


def test_failure_and_timeout_channels_carry_the_runtime_s_payloads(doc: dict[str, Any]) -> None:
    failed_payload = validator(doc, doc["components"]["messages"][FAILED]["payload"]["$ref"])
    assert failed_payload.is_valid(
        {"type": "test.asyncapi.paid", "envelope": {"id": "e"}, "record": {"reason": "x"}}
    )
    timedout_payload = validator(doc, doc["components"]["messages"][TIMEDOUT]["payload"]["$ref"])
    assert timedout_payload.is_valid({"correlation_id": "c", "deadline": "2024-01-01T00:00:00Z"})


def test_channel_descriptions_mark_ingress_and_terminal_events(doc: dict[str, Any]) -> None:
    assert doc["channels"]["test.asyncapi.placed"]["description"].startswith("Ingress:")
    assert "ends a transaction as completed" in doc["channels"]["test.asyncapi.packed"]["description"]


def test_an_app_without_handlers_is_still_a_valid_document() -> None:
    doc = asyncapi_document(App("empty", []))
    assert (doc["channels"], doc["operations"]) == ({}, {})
    schema = json.loads(SCHEMA_PATH.read_text())
    assert jsonschema.Draft7Validator(schema).is_valid(doc)


@pytest.mark.skipif(not SCHEMA_PATH.exists(), reason=f"conformance data missing: {SCHEMA_PATH}")
def test_a_type_no_event_class_defines_has_its_channel_and_the_push_subscriber_its_operations() -> None:
    """Subscribers in another language may consume and emit types no Python class defines: the
    graph draws them, so the document has them too (their payload undescribed)."""
    from choreograph.flow import build
    from choreograph.push import PushSubscription

    subscription = PushSubscription("x", ["other.type"], "http://h/", emits=["other.answer"])
    doc = asyncapi_document(build([Service("lonely")], push=[subscription]))
    assert jsonschema.Draft7Validator(json.loads(SCHEMA_PATH.read_text())).is_valid(doc)
    by_address = {channel["address"]: key for key, channel in doc["channels"].items()}
    assert {"other.type", "other.answer"} <= set(by_address)
    ops = {(op["action"], resolve(doc, op["channel"]["$ref"])["address"]) for op in doc["operations"].values()}
    assert {("receive", "other.type"), ("send", "other.answer")} <= ops
    message = doc["components"]["messages"][by_address["other.type"]]
    headers = validator(doc, "#/components/messages/other.type/headers")
    assert headers.is_valid({"id": "1", "source": "/x", "specversion": "1.0", "type": "other.type"})
    assert not headers.is_valid({"id": "1", "source": "/x", "specversion": "1.0", "type": "other.answer"})
    assert "$ref" not in message["payload"]


class Créée(Event, type="test.asyncapi.commande.créée"):
    order: str


class CreeeSpaced(Event, type="test.asyncapi.commande cree"):
    order: str


class CreeeUnderscored(Event, type="test.asyncapi.commande_cree"):
    order: str


def test_keys_are_ascii_and_types_that_sanitise_alike_keep_every_operation() -> None:
    """The spec's key patterns are ECMA-262 regexes, where ``\\w`` is ASCII only (Python's
    ``re`` matches any letter, so the spec's own schema passes here either way); and two types
    whose keys come out the same must not lose one of their operations."""
    notes = Service("notes")

    @notes.on(Créée)
    async def first(event: Créée) -> None: ...

    @notes.on(CreeeSpaced)
    async def second(event: CreeeSpaced) -> None: ...

    @notes.on(CreeeUnderscored)
    async def third(event: CreeeUnderscored) -> None: ...

    doc = asyncapi_document(App("notes", [notes], ingress=[Créée, CreeeSpaced, CreeeUnderscored]))
    ascii_key = "^[A-Za-z0-9_.\\-]+$"
    for section in (doc["channels"], doc["operations"], doc["components"]["messages"], doc["components"]["schemas"]):
        for key in section:
            assert re.fullmatch(ascii_key, key, flags=re.ASCII), key
    received = {
        resolve(doc, op["channel"]["$ref"])["address"] for op in doc["operations"].values() if op["action"] == "receive"
    }
    assert received == {Créée.event_type(), CreeeSpaced.event_type(), CreeeUnderscored.event_type()}
    for op_id, op in doc["operations"].items():
        channel_ref = op["channel"]["$ref"]
        assert all(m["$ref"].startswith(channel_ref + "/messages/") for m in op["messages"]), op_id


class Card(pydantic.BaseModel):
    method: Literal["card"] = "card"
    last4: str


class Wire(pydantic.BaseModel):
    method: Literal["wire"] = "wire"
    iban: str


class Charged(Event, type="test.asyncapi.charged"):
    order: str
    means: Annotated[Card | Wire, pydantic.Field(discriminator="method")]
    discriminator: str = "a field of that name is no keyword"


@pytest.mark.skipif(not SCHEMA_PATH.exists(), reason=f"conformance data missing: {SCHEMA_PATH}")
def test_a_discriminated_union_in_a_payload_is_valid_asyncapi() -> None:
    """pydantic writes OpenAPI's ``discriminator`` object; AsyncAPI's is the property name."""
    billing = Service("billing")

    @billing.on(Charged)
    async def book(event: Charged) -> None: ...

    doc = asyncapi_document(App("billing", [billing], ingress=[Charged], terminal={}))
    schema = json.loads(SCHEMA_PATH.read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert errors == []
    properties = doc["components"]["schemas"]["Charged"]["properties"]
    assert properties["means"]["discriminator"] == "method"
    assert properties["discriminator"] == {"default": "a field of that name is no keyword",
                                           "title": "Discriminator", "type": "string"}
    payload = validator(doc, "#/components/schemas/Charged")
    assert payload.is_valid(Charged(order="o", means=Wire(iban="x")).model_dump(mode="json"))
    assert not payload.is_valid({"order": "o", "means": {"method": "wire", "last4": "1234"}})


class Located(Event, type="test.asyncapi.located"):
    position: tuple[float, float, str]


@pytest.mark.skipif(not SCHEMA_PATH.exists(), reason=f"conformance data missing: {SCHEMA_PATH}")
def test_a_tuple_in_a_payload_describes_each_item_as_draft_07_does() -> None:
    """pydantic's ``prefixItems`` (draft 2020-12) means nothing to an AsyncAPI Schema Object (draft 07):
    the items went unchecked. They are draft 07's ``items`` list."""
    tracker = Service("tracker")

    @tracker.on(Located)
    async def track(event: Located) -> None: ...

    doc = asyncapi_document(App("tracking", [tracker], ingress=[Located]))
    assert jsonschema.Draft7Validator(json.loads(SCHEMA_PATH.read_text())).is_valid(doc)
    assert "prefixItems" not in doc["components"]["schemas"]["Located"]["properties"]["position"]
    payload = validator(doc, "#/components/schemas/Located")
    assert payload.is_valid(Located(position=(1.5, 2.0, "hangar")).model_dump(mode="json"))
    assert not payload.is_valid({"position": ["hangar", 1.5, 2.0]})
    assert not payload.is_valid({"position": [1.5, 2.0]})


class Sensor:
    """A Python object pydantic checks with isinstance: it has no JSON Schema."""


class Wired(Event, type="test.asyncapi.wired"):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True, frozen=True)
    label: str
    sensor: Sensor | None = pydantic.Field(default=None, alias="probe")


def test_a_payload_without_a_json_schema_is_a_configuration_error_naming_the_event_and_field() -> None:
    lab = Service("lab")

    @lab.on(Wired)
    async def read(event: Wired) -> None: ...

    with pytest.raises(ConfigurationError) as caught:
        asyncapi_document(App("lab", [lab], ingress=[Wired]))
    message = str(caught.value)
    assert message.startswith("test.asyncapi.wired (tests.test_asyncapi.Wired): its payload has no JSON Schema "
                              "at $.probe, so the AsyncAPI document cannot describe it: ")
    assert "Sensor" in message and "\n" not in message


class Unfinished(Event, type="test.asyncapi.unfinished"):
    """Refers to a class never defined here (as one imported only under TYPE_CHECKING is)."""

    part: NeverDefined | None = None  # noqa: F821


def test_a_payload_with_an_undefined_forward_reference_is_a_configuration_error_naming_the_event() -> None:
    lab = Service("lab")

    @lab.on(Unfinished)
    async def read(event: Unfinished) -> None: ...

    with pytest.raises(ConfigurationError) as caught:
        asyncapi_document(App("lab", [lab], ingress=[Unfinished]))
    message = str(caught.value)
    assert message.startswith("test.asyncapi.unfinished (tests.test_asyncapi.Unfinished): its payload is not "
                              "fully defined, so the AsyncAPI document cannot describe it: ")
    assert "NeverDefined" in message and "\n" not in message
