"""``choreograph publish``: put one event on the bus (for poking a running system).

Everything is checked before the bus is opened: an event a worker cannot take (a payload
that is not an object, an empty source, a reserved type) would only come back as a dead
letter, far from the command that sent it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import orjson
import pydantic
import typer

from choreograph._envelope import Envelope, new_id, now_rfc3339, string_problem
from choreograph._event_wire import by_alias
from choreograph._journal_model import JOURNAL_GROUP
from choreograph._json_pairs import first_misread
from choreograph.cli._common import (
    BrokerOption,
    broker_url,
    console,
    err_console,
    kind_of,
    load_module,
    load_object,
    run_async,
)
from choreograph.errors import ConfigurationError, TransportError
from choreograph.events import Event, event_class, event_type_problem, format_validation_error
from choreograph.runtime.records import to_message
from choreograph.transports import open_transport
from choreograph.transports.base import matches

_JSON_KINDS: dict[type, str] = {list: "an array", str: "a string", int: "a number", float: "a number",
                                bool: "a boolean", type(None): "null"}


def _check_type(event_type: str) -> None:
    # Event classes take any other string but a control character, a surrogate or a Unicode
    # noncharacter (event_type_problem); on the command line whitespace or a control character
    # is a quoting slip (``"shop.order.placed --data ..."``), not a type: said so first.
    problem = None
    if not event_type.isprintable() or any(char.isspace() for char in event_type):
        problem = "contains whitespace or control characters"
    problem = problem or event_type_problem(event_type)
    if problem is not None:
        raise ConfigurationError(f"TYPE: {event_type!r} {problem}")


def _parse_data(data: str) -> dict[str, Any]:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConfigurationError(f"--data: not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        kind = _JSON_KINDS.get(type(payload), type(payload).__name__)
        raise ConfigurationError(f"--data: an event's data is a JSON object, got {kind}")
    problem = _not_as_typed(data)
    if problem is not None:
        raise ConfigurationError(f"--data: {problem}")
    return payload


def _not_as_typed(data: str) -> str | None:
    """``$.path: why`` of the first value of ``data`` (JSON orjson has read) that would not be
    published as typed, or ``None``: a key given twice (orjson keeps the last value, silently)
    or an integer beyond 64 bits (orjson reads it as a float: ``12345678901234567890123`` went
    out as ``1.2345678901234568e+22``). The gateway answers 422 to both."""
    found = first_misread(data, ints=True)
    if found is None:
        return None
    path, kind = found
    if kind == "duplicate_key":
        return f"{path}: the key is given twice in one object; give it once"
    return f"{path}: integer out of range: events carry integers of at most 64 bits (send a string)"


def _schema_class(schema: str, event_type: str) -> type[Event]:
    """The Event class ``--schema`` names for ``event_type``: the class itself, or the one a module defines."""
    try:
        obj = load_object(schema) if ":" in schema else load_module(schema)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--schema: {exc}") from None
    if isinstance(obj, ModuleType):
        cls = event_class(event_type)
        if cls is None:
            raise ConfigurationError(f"--schema: unknown event type {event_type!r}: {schema!r} defines no such Event")
        return cls
    if not (isinstance(obj, type) and issubclass(obj, Event)):
        raise ConfigurationError(f"--schema: {schema!r} is {kind_of(obj)}, not an Event class")
    if obj.event_type() != event_type:
        raise ConfigurationError(
            f"--schema: {schema!r} is the Event of type {obj.event_type()!r}, not of {event_type!r}"
        )
    return obj


def publish(
    event_type: str = typer.Argument(..., metavar="TYPE", help="CloudEvents type, e.g. shop.order.placed"),
    data: str = typer.Option("{}", "--data", "-d", help="The event's data as a JSON object"),
    broker: str | None = BrokerOption,
    schema: str | None = typer.Option(
        None, "--schema", help="MODULE:ATTR of the Event class (or of any module defining it) to validate --data"
    ),
    correlation_id: str | None = typer.Option(None, "--correlation-id", help="Join an existing transaction"),
    source: str = typer.Option("/choreograph/cli", "--source", help="CloudEvents source"),
) -> None:
    """Publish one event; prints its id and correlation id."""
    _check_type(event_type)
    if not source:
        raise ConfigurationError("--source: must be a non-empty string (a CloudEvents source)")
    if correlation_id == "":  # "$CID" of an unset variable: not a new transaction without a word
        raise ConfigurationError("--correlation-id '': empty; give the transaction's correlation id, or leave "
                                 "the option out to start a new one")
    for option, value in (("--source", source), ("--correlation-id", correlation_id)):
        problem = None if value is None else string_problem(value)
        if problem is not None:
            raise ConfigurationError(f"{option}: {value!r} {problem}")
    if schema is not None and not schema.strip():  # "$SCHEMA" of an unset variable: not "validate nothing"
        raise ConfigurationError(f"--schema {schema!r}: empty; give MODULE[:CLASS] of the event's class, "
                                 "or leave the option out")
    payload = _parse_data(data)
    dataschema = None
    cls = _schema_class(schema, event_type) if schema is not None else event_class(event_type)
    if cls is not None:
        try:
            model = cls.model_validate(payload)
        except pydantic.ValidationError as exc:
            raise ConfigurationError(f"--data: {format_validation_error(exc)}") from None
        payload = model.model_dump(mode="json", by_alias=by_alias(cls))
        dataschema = cls.schema_uri()
    event_id = new_id()
    envelope = Envelope(
        id=event_id, source=source, type=event_type, data=payload, time=now_rfc3339(),
        dataschema=dataschema, correlationid=correlation_id or event_id,
    )

    async def main() -> None:
        async with open_transport(broker_url(broker)) as bus:
            try:
                groups = await bus.groups()
            except TransportError:  # only for a warning: never in the way of the publish
                groups = None
            await bus.publish([to_message(envelope)])
        # The journal's group takes every type: it records the event, but no service handles it.
        services = None if groups is None else [types for group, types in groups.items() if group != JOURNAL_GROUP]
        if services is not None and not any(matches(types, event_type) for types in services):
            # Published, and gone: a group receives only what is published after it first
            # subscribed. The classic first-deploy surprise, so say it where it happens.
            err_console.print(
                f"warning: no group on this bus subscribes to {event_type!r}: nobody receives this event "
                "(a group receives what is published after it first subscribed: start its consumers first)",
                markup=False, highlight=False, soft_wrap=True, emoji=False,
            )

    run_async(main())
    console.print_json(orjson.dumps({"id": event_id, "correlation_id": envelope.correlationid}).decode())
