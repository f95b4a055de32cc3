"""One AsyncAPI 3.0 document for a whole App: every event type, who sends it, who receives it.

>>> doc = asyncapi_document(app)                      # doctest: +SKIP
>>> doc["channels"]["shop.order.placed"]["address"]   # doctest: +SKIP
'shop.order.placed'

How choreograph maps onto AsyncAPI, and why:

* **A channel per event type**, addressed by the CloudEvents ``type``: every transport
  routes by type, so the type is the address (subject, routing key, stream key).
* **A message per event type**: the payload is the JSON Schema of the pydantic model
  (the CloudEvent ``data``), kept in ``components/schemas`` so models shared between
  events are described once (written for an AsyncAPI Schema Object, a superset of JSON
  Schema draft 07, where pydantic's draft 2020-12 differs: ``discriminator``, ``prefixItems``).
  The CloudEvents context attributes (``id``, ``source``,
  ``type``, ``correlationid``, ...) are described as the message ``headers``: on the bus
  they travel beside ``data`` in one structured-mode JSON object, on HTTP push as
  ``ce-*`` headers (binary mode); the attributes are the same either way.
* A type no Event class of this process defines (one a push subscriber in another language
  consumes or emits) has its channel and message too, with the CloudEvents headers and an
  undescribed payload: the document lists every type the flow graph draws.
* **Operations per service**: ``receive`` for what it subscribes to, ``send`` for what
  it declares it emits. The push subscribers of a graph built with ``push=`` (the CLI's
  ``--push CONFIG``) have theirs too: they consume from the bus like a service (the push
  ambassador delivers to them over HTTP and publishes what they answer with). ``choreograph.failed`` (published by the runtime of a service
  that gives up on an event: any handler can, an ``on_failure`` handler or a compensation
  too, so every service sends it) and ``choreograph.timedout`` (published by the journal)
  appear when the flow uses them.

The document is derived from the same :class:`~choreograph.flow.FlowGraph` as the
flow diagrams, so the two never disagree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pydantic
from pydantic.errors import PydanticInvalidForJsonSchema, PydanticUserError
from pydantic.json_schema import models_json_schema

from choreograph.errors import ConfigurationError
from choreograph.events import Event
from choreograph.flow import RUNTIME_PREFIX, FlowGraph, build
from choreograph.joins import Failed
from choreograph.sagas import TIMEDOUT, TimedOut
from choreograph.service import FAILED, App, Service

__all__ = ["ASYNCAPI_VERSION", "CLOUDEVENTS_CONTEXT", "asyncapi_document"]

ASYNCAPI_VERSION = "3.0.0"

#: The CloudEvents 1.0 context attributes choreograph writes, as a JSON Schema.
CLOUDEVENTS_CONTEXT: dict[str, Any] = {
    "type": "object",
    "title": "CloudEvents context attributes",
    "description": "CloudEvents 1.0 attributes of every event (structured mode: beside `data` in one JSON object).",
    "required": ["id", "source", "specversion", "type"],
    "properties": {
        "id": {
            "type": "string",
            "minLength": 1,
            "description": "Unique per source; outputs derive it from their input.",
        },
        "source": {
            "type": "string",
            "format": "uri-reference",
            "minLength": 1,
            "description": "The service that published it.",
        },
        "specversion": {"type": "string", "const": "1.0"},
        "type": {
            "type": "string",
            "minLength": 1,
            "description": "The event type (also the channel address).",
        },
        "time": {"type": "string", "format": "date-time"},
        "subject": {"type": "string", "minLength": 1},
        "datacontenttype": {"type": "string", "const": "application/json"},
        "dataschema": {
            "type": "string",
            "format": "uri",
            "description": "urn:choreograph:schema:TYPE:vVERSION",
        },
        "correlationid": {
            "type": "string",
            "description": "The transaction: the id of the event that started it.",
        },
        "causationid": {
            "type": "string",
            "description": "The id of the event whose handler published this one.",
        },
        "traceparent": {"type": "string", "description": "W3C trace context."},
        "tracestate": {"type": "string", "description": "W3C trace context."},
        "hops": {
            "type": "integer",
            "minimum": 0,
            "description": "Handlers passed since the transaction began (loop guard).",
        },
        "partitionkey": {"type": "string"},
        "deadline": {
            "type": "string",
            "format": "date-time",
            "description": "When the transaction times out.",
        },
    },
}

_DESCRIPTION = (
    "Event-driven services run by choreography (no orchestrator): each service receives the event types it "
    "consumes and sends the ones it declares. Every message is a CloudEvent: the headers below are its context "
    "attributes, the payload its `data`. On the bus a message travels in CloudEvents structured mode "
    "(one JSON object, `application/cloudevents+json`); pushed over HTTP it uses binary mode (`ce-*` headers)."
)


def _key(text: str) -> str:
    """A component/channel/operation key: AsyncAPI allows ``[\\w.-]``, where ``\\w`` is ASCII
    (JSON Schema patterns are ECMA-262 regexes), so any other character becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)


def _summary(cls: type[Event]) -> str | None:
    doc = cls.__dict__.get("__doc__")
    return doc.strip().splitlines()[0] if doc and doc.strip() else None


def asyncapi_document(
    target: App | FlowGraph | Service | Iterable[Service], *, version: str = "1.0.0", title: str | None = None
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document (a JSON-ready dict) of an App, a flow graph, or services."""
    graph = target if isinstance(target, FlowGraph) else build(target)
    classes: dict[str, type[Event]] = {t: graph.classes[t] for t in graph.events if t in graph.classes}
    if TIMEDOUT in graph.events:
        classes[TIMEDOUT] = TimedOut
    if graph.steps:  # any handler can give up: its runtime then publishes choreograph.failed
        classes[FAILED] = Failed

    try:
        refs, defs = (
            models_json_schema(
                [(cls, "validation") for cls in classes.values()], ref_template="#/components/schemas/{model}"
            )
            if classes
            else ({}, {})
        )
    except PydanticUserError as exc:  # no JSON Schema for a type, or a forward reference never defined
        raise _no_schema(classes, exc) from None
    payloads: dict[str, Any] = _asyncapi_schema(defs.get("$defs", {}))
    # The headers' schema beside the payloads', under a key none of them has (a payload model
    # may be named CloudEventsContext too: every message's headers would then be that model).
    context = _unique("CloudEventsContext", payloads)
    schemas: dict[str, Any] = {context: CLOUDEVENTS_CONTEXT, **payloads}

    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    channel_of: dict[str, str] = {}
    # A type no Event class of this process defines (one a push subscriber consumes or emits,
    # served in another language) has its channel too, its payload undescribed.
    untyped = [t for t in graph.events if t not in classes and not t.startswith(RUNTIME_PREFIX)]
    for type_ in [*classes, *untyped]:
        key = _unique(_key(type_), channels)
        channel_of[type_] = key
        cls = classes.get(type_)
        messages[key] = (
            _message(type_, cls, refs[(cls, "validation")], context) if cls is not None
            else _untyped_message(type_, context)
        )
        channels[key] = {
            "address": type_,
            "title": type_,
            "description": _channel_description(graph, type_),
            "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        }

    operations: dict[str, Any] = {}
    op_ids: dict[tuple[str, str, str], str] = {}

    def operation(service: str, action: str, type_: str, summary: str) -> None:
        verb = "receive" if action == "receive" else "send"
        if (service, verb, type_) in op_ids or type_ not in channel_of:
            return  # (runtime plumbing, e.g. a push subscriber of choreograph.join.deadline: no channel)
        # Two types may give one key ("a b", "a_b"): each keeps its own operation.
        op_id = op_ids[(service, verb, type_)] = _unique(_key(f"{service}.{verb}.{type_}"), operations)
        key = channel_of[type_]
        operations[op_id] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
            "summary": summary,
            "tags": [{"name": service}],
        }

    for step in graph.steps:
        pushed = graph.push.get(step.service) if step.role == "push" else None
        # A push subscriber (its group) is delivered to over HTTP by the push ambassador, which
        # publishes what it answers with, and choreograph.failed when it gives up.
        handler = f"{step.service}.{step.handler}" if pushed is None else f"push subscriber {step.service}"
        over = "" if pushed is None else f" over HTTP ({pushed.host})"
        runtime = "the runtime" if pushed is None else "the push ambassador"
        where = f" where {step.where}" if step.where else ""  # its CESQL filter (a subscription's filters)
        if step.via == "failure":
            operation(step.service, "receive", FAILED, f"{handler} handles failures of {step.trigger}{over}{where}")
        else:
            operation(step.service, "receive", step.trigger, f"{handler} receives {step.trigger}{over}{where}")
        # Every handler can give up (an on_failure handler, a compensation too), and then its
        # service's runtime publishes choreograph.failed.
        operation(step.service, "send", FAILED, f"{runtime} announces that {step.service} gave up on an event")
        for out in step.emits:
            operation(step.service, "send", out, f"{handler} may emit {out}")

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {"title": title or graph.name, "version": version, "description": _DESCRIPTION},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": dict(sorted(operations.items())),
        "components": {"schemas": schemas, "messages": messages},
    }


def _no_schema(classes: dict[str, type[Event]], exc: PydanticUserError) -> ConfigurationError:
    """The error naming the event, and the field, whose payload pydantic cannot describe (a type it
    only checks with ``isinstance``: ``arbitrary_types_allowed``; a forward reference to a class
    never defined, e.g. one imported only under ``TYPE_CHECKING``), rather than pydantic's traceback."""
    for type_, cls in classes.items():
        try:
            cls.model_json_schema()
        except PydanticInvalidForJsonSchema as own:
            field = _field_without_schema(cls)
            at = f" at $.{field}" if field is not None else ""
            return ConfigurationError(
                f"{type_} ({cls.__module__}.{cls.__qualname__}): its payload has no JSON Schema{at}, so the "
                f"AsyncAPI document cannot describe it: {str(own).splitlines()[0]}"
            )
        except PydanticUserError as own:
            return ConfigurationError(
                f"{type_} ({cls.__module__}.{cls.__qualname__}): its payload is not fully defined, so the "
                f"AsyncAPI document cannot describe it: {str(own).splitlines()[0]}"
            )
    return ConfigurationError(f"no JSON Schema for an event's payload: {str(exc).splitlines()[0]}")


def _field_without_schema(cls: type[Event]) -> str | None:
    """The first field of ``cls`` that has no JSON Schema on its own (its alias, as in the payload)."""
    for name, field in cls.model_fields.items():
        definition: dict[str, Any] = {name: (field.annotation, field)}
        try:
            probe = pydantic.create_model(
                "Probe", __config__=pydantic.ConfigDict(arbitrary_types_allowed=True), **definition
            )
            probe.model_json_schema()
        except PydanticInvalidForJsonSchema:
            return field.alias or name
        except Exception:  # a field the probe cannot rebuild on its own: not the one to name
            continue
    return None


def _asyncapi_schema(node: Any) -> Any:
    """pydantic's JSON Schema (draft 2020-12) as an AsyncAPI Schema Object (a superset of draft 07).

    A discriminated union's ``discriminator`` is OpenAPI's object (``propertyName`` and
    ``mapping``), where AsyncAPI's is the property name alone (a document with the object does
    not validate); the mapping adds nothing, each variant's property holds its ``const``. A
    tuple's ``prefixItems`` is unknown to draft 07, so its items were left unchecked: it is
    draft 07's ``items`` list (and ``items``, the rest, ``additionalItems``).
    """
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _asyncapi_schema(value) for key, value in node.items()}
    # Keywords only where the node is a schema (not the "properties" map of a model with a field
    # of that name): a discriminator goes with a union, prefixItems with an array.
    discriminator = node.get("discriminator")
    if (isinstance(discriminator, dict) and isinstance(discriminator.get("propertyName"), str)
            and ("oneOf" in node or "anyOf" in node)):
        out["discriminator"] = discriminator["propertyName"]
    if isinstance(node.get("prefixItems"), list) and node.get("type") == "array":
        out["items"] = out.pop("prefixItems")
        if "items" in node:
            out["additionalItems"] = _asyncapi_schema(node["items"])
    return out


def _unique(key: str, taken: dict[str, Any]) -> str:
    candidate, n = key, 2
    while candidate in taken:
        candidate, n = f"{key}_{n}", n + 1
    return candidate


def _message(type_: str, cls: type[Event], payload_ref: dict[str, Any], context: str) -> dict[str, Any]:
    fixed: dict[str, Any] = {"type": {"const": type_}}
    if type_ not in (FAILED, TIMEDOUT):
        fixed["dataschema"] = {"const": cls.schema_uri()}
    message: dict[str, Any] = {
        "name": cls.__name__,
        "title": type_,
        "contentType": "application/json",
        "headers": {
            "allOf": [
                {"$ref": f"#/components/schemas/{context}"},
                {"type": "object", "properties": fixed},
            ]
        },
        "payload": payload_ref,
        "correlationId": {
            "description": "The transaction this event belongs to (CloudEvents extension `correlationid`).",
            "location": "$message.header#/correlationid",
        },
    }
    summary = _summary(cls)
    if summary:
        message["summary"] = summary
    return message


def _untyped_message(type_: str, context: str) -> dict[str, Any]:
    """The message of a type no Event class here defines: its CloudEvent attributes, any JSON ``data``."""
    return {
        "name": _key(type_),
        "title": type_,
        "contentType": "application/json",
        "headers": {
            "allOf": [
                {"$ref": f"#/components/schemas/{context}"},
                {"type": "object", "properties": {"type": {"const": type_}}},
            ]
        },
        "payload": {
            "description": "Not described here: no Event class of this app defines this type (a subscriber "
            "in another language consumes or emits it)."
        },
        "correlationId": {
            "description": "The transaction this event belongs to (CloudEvents extension `correlationid`).",
            "location": "$message.header#/correlationid",
        },
    }


def _channel_description(graph: FlowGraph, type_: str) -> str:
    if type_ == FAILED:
        return "Published by a service's runtime when it gives up on an event: the event, and why (dead-letter record)."
    if type_ == TIMEDOUT:
        return "Published by the journal when a transaction passes its deadline without a terminal event."
    node = graph.events[type_]
    notes = []
    if node.ingress:
        notes.append(
            "Ingress: published from outside (a gateway, a script) and starts or joins a transaction."
        )
    if node.terminal:
        notes.append(f"Terminal: ends a transaction as {node.terminal}.")
    senders = sorted({s.service for s in graph.producers(type_)})
    receivers = sorted({s.service for s in graph.consumers(type_)})
    notes.append(f"Sent by: {', '.join(senders) or 'nobody in this app'}.")
    notes.append(f"Received by: {', '.join(receivers) or 'nobody in this app'}.")
    return " ".join(notes)
