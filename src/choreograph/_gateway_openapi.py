"""The gateway's OpenAPI 3.1 document, built from its routes' pydantic models.

OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what pydantic emits, so each
event model is used as is (its ``$defs`` hoisted to ``components/schemas``). Every
error response is documented as the problem document the gateway really sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic.json_schema import models_json_schema

from choreograph._gateway_cloudevents import openapi_parameters
from choreograph._gateway_http import IDEMPOTENCY_KEY_MAX, PROBLEM_JSON
from choreograph._journal_model import STATUSES
from choreograph.errors import ConfigurationError

if TYPE_CHECKING:
    from choreograph.gateway import Route

_REF = "#/components/schemas/{model}"
_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}

_COMMON_SCHEMAS: dict[str, Any] = {
    "FieldError": {
        "type": "object",
        "required": ["path", "reason", "type"],
        "properties": {"path": _STR, "reason": _STR, "type": _STR},
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": _STR,
            "title": _STR,
            "status": {"type": "integer"},
            "detail": _STR,
            "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldError"}},
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["correlation_id", "status_url"],
        "properties": {
            "correlation_id": {**_STR, "description": "Correlation id of the transaction (= the event id)"},
            "status_url": {**_OPT_STR, "description": "Where to follow the transaction (null without a journal)"},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Readiness": {
        "type": "object", "required": ["status"],
        "properties": {"status": {"enum": ["ready", "unavailable"]}, "reason": {"type": "string"}},
    },
}

_SUMMARY_PROPERTIES: dict[str, Any] = {
    "correlation_id": _STR,
    "status": {"enum": list(STATUSES)},
    "root_type": _OPT_STR,
    "started_at": _STR,
    "first_seen": _STR,
    "last_seen": _STR,
    "deadline": _OPT_STR,
    "terminal_type": _OPT_STR,
    "event_count": {"type": "integer"},
    "failures": {"type": "integer"},
    "compensation_failures": {"type": "integer"},
    "timed_out": {"type": "boolean"},
}

_JOURNAL_SCHEMAS: dict[str, Any] = {
    "TransactionSummary": {
        "type": "object", "required": list(_SUMMARY_PROPERTIES), "properties": _SUMMARY_PROPERTIES,
    },
    "TimelineEntry": {
        "type": "object",
        "required": ["event_id", "type", "service", "time", "kind", "outcome", "offset_ms"],
        "properties": {
            "event_id": _STR, "type": _STR, "service": _STR, "source": _STR, "causation_id": _OPT_STR,
            "time": _STR, "recorded_at": _STR, "attempt": {"type": ["integer", "null"]},
            "kind": {"enum": ["event", "completed", "failed", "failure", "timedout"]},
            "outcome": _STR, "error": _OPT_STR, "failed_type": _OPT_STR,
            "record": {"type": ["object", "null"]}, "traceparent": _OPT_STR, "tracestate": _OPT_STR,
            "offset_ms": {"type": "number"},
        },
    },
    "Transaction": {
        "type": "object",
        "required": [*_SUMMARY_PROPERTIES, "timeline"],
        "properties": {
            **_SUMMARY_PROPERTIES,
            "timeline": {"type": "array", "items": {"$ref": "#/components/schemas/TimelineEntry"}},
        },
    },
    "TransactionList": {
        "type": "object",
        "required": ["transactions"],
        "properties": {"transactions": {"type": "array", "items": {"$ref": "#/components/schemas/TransactionSummary"}}},
    },
}


#: What an integer on the bus may be: orjson, which consumers read envelopes with, reads any
#: other as a float (and the gateway answers 422).
INT_MIN, INT_MAX = -(2**63), 2**64 - 1


def _bound_integers(schema: Any) -> None:
    """Give every integer schema the bounds the bus can carry (tightening its own, if any)."""
    if isinstance(schema, list):
        for item in schema:
            _bound_integers(item)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        if "exclusiveMinimum" not in schema:
            schema["minimum"] = max(schema.get("minimum", INT_MIN), INT_MIN)
        if "exclusiveMaximum" not in schema:
            schema["maximum"] = min(schema.get("maximum", INT_MAX), INT_MAX)
    for value in schema.values():
        _bound_integers(value)


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _json(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if headers:
        out["headers"] = headers
    return out


def build_openapi(
    routes: Sequence[Route], *, title: str, version: str, auth: bool, journal: bool
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway with these routes."""
    events = list(dict.fromkeys(route.event for route in routes))
    refs, top = models_json_schema([(cls, "validation") for cls in events], ref_template=_REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    _bound_integers(schemas)
    clash = sorted(set(schemas) & (set(_COMMON_SCHEMAS) | set(_JOURNAL_SCHEMAS)))
    if clash:
        raise ConfigurationError(f"Gateway: event model name(s) {clash} clash with the gateway's own OpenAPI schemas")
    schemas.update(_COMMON_SCHEMAS)
    security: list[dict[str, list[str]]] | None = [{"bearer": []}] if auth else None
    unauthorized = {"401": _problem("Missing or invalid bearer token")} if auth else {}
    paths: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.name,
            "summary": route.summary or f"Publish {route.event.event_type()}",
            "description": (route.event.__doc__ or "").strip() or f"Starts a transaction with a {route.event.__name__} event.",
            "parameters": [{
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Retry safely: the same key and body return the first answer and publish nothing.",
                "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX, "pattern": "^[ -~]+$"},
            }, *openapi_parameters(route.event)],
            "requestBody": {"required": True, "content": {"application/json": {"schema": refs[(route.event, "validation")]}}},
            "responses": {
                "202": _json(
                    "Accepted: the event is durably on the bus", "Accepted",
                    {"Location": {"description": "The status URL (with a journal)", "schema": _STR}},
                ),
                "400": _problem("Malformed request (not JSON, bad header)"),
                **unauthorized,
                "409": _problem("Idempotency-Key (or ce-id) conflict: the first request is in flight, or used "
                                "another body"),
                "413": _problem("Body too large"),
                "415": _problem("Body is not JSON"),
                "422": _problem("Payload invalid (each bad field named by its path)"),
                "503": _problem("Broker (or, with an Idempotency-Key or ce-id, the idempotency store) unavailable: "
                                "nothing was published, retry"),
            },
        }
        if security:
            operation["security"] = security
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    if journal:
        schemas.update(_JOURNAL_SCHEMAS)
        guarded = {"security": security} if security else {}
        paths["/transactions"] = {"get": {
            "operationId": "list_transactions",
            "summary": "Transactions, most recent first",
            "parameters": [
                {"name": "status", "in": "query", "required": False, "schema": {"enum": list(STATUSES)}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
            ],
            "responses": {
                "200": _json("Transactions", "TransactionList"), **unauthorized,
                "422": _problem("Bad status or limit"),
                "503": _problem("Journal unavailable, retry"),
            },
            **guarded,
        }}
        paths["/transactions/{correlation_id}"] = {"get": {
            "operationId": "get_transaction",
            "summary": "Status and timeline of one transaction",
            "parameters": [{"name": "correlation_id", "in": "path", "required": True, "schema": _STR}],
            "responses": {
                "200": _json("The transaction", "Transaction"), **unauthorized,
                "404": _problem("The journal has not seen this correlation id"),
                "503": _problem("Journal unavailable, retry"),
            },
            **guarded,
        }}
    paths["/healthz"] = {"get": {"operationId": "healthz", "summary": "Liveness", "responses": {"200": _json("Alive", "Health")}}}
    paths["/readyz"] = {"get": {
        "operationId": "readyz",
        "summary": "Readiness: the broker answers, the idempotency store is open",
        "responses": {
            "200": _json("The broker answered and the stores are open", "Readiness"),
            "503": _json("The broker did not answer, or the idempotency store could not be opened; the reason "
                         "names which (retry after Retry-After)", "Readiness"),
        },
    }}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
