"""``choreograph publish``: put one event on the bus (for poking a running system)."""

from __future__ import annotations

import orjson
import typer

from choreograph._envelope import Envelope, new_id, now_rfc3339
from choreograph.cli._common import BrokerOption, broker_url, console, load_module, load_object, run_async
from choreograph.errors import ConfigurationError
from choreograph.events import event_class
from choreograph.runtime.records import to_message
from choreograph.transports import open_transport


def publish(
    event_type: str = typer.Argument(..., help="CloudEvents type, e.g. shop.order.placed"),
    data: str = typer.Option("{}", "--data", "-d", help="The event's data as JSON"),
    broker: str | None = BrokerOption,
    schema: str | None = typer.Option(
        None, "--schema", help="MODULE:ATTR of the Event class (or of any module defining it) to validate --data"
    ),
    correlation_id: str | None = typer.Option(None, "--correlation-id", help="Join an existing transaction"),
    source: str = typer.Option("/choreograph/cli", "--source", help="CloudEvents source"),
) -> None:
    """Publish one event; prints its id and correlation id."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConfigurationError(f"--data: not valid JSON ({exc})") from None
    if schema:
        load_object(schema) if ":" in schema else load_module(schema)
    cls = event_class(event_type)
    if schema and cls is None:
        raise ConfigurationError(f"unknown event type {event_type!r}: {schema!r} defines no such Event")
    dataschema = None
    if cls is not None:
        model = cls.model_validate(payload)
        payload = model.model_dump(mode="json")
        dataschema = cls.schema_uri()
    event_id = new_id()
    envelope = Envelope(
        id=event_id, source=source, type=event_type, data=payload, time=now_rfc3339(),
        dataschema=dataschema, correlationid=correlation_id or event_id,
    )

    async def main() -> None:
        async with open_transport(broker_url(broker)) as bus:
            await bus.publish([to_message(envelope)])

    run_async(main())
    console.print_json(orjson.dumps({"id": event_id, "correlation_id": envelope.correlationid}).decode())
