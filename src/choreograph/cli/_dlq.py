"""``choreograph dlq``: list, show, replay and purge dead letters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import typer
from rich.table import Table

from choreograph.cli._common import BrokerOption, broker_url, console, run_async
from choreograph.errors import ConfigurationError
from choreograph.transports import DeadLetter, open_transport

app = typer.Typer(help="Inspect and act on dead letters.", no_args_is_help=True)

GroupOption = typer.Option(None, "--group", "-g", help="Consumer group (service name)")
JsonOption = typer.Option(False, "--json", help="Machine-readable output")


def _as_dict(letter: DeadLetter) -> dict[str, Any]:
    try:
        body: Any = orjson.loads(letter.message.body)
    except orjson.JSONDecodeError:
        body = letter.message.body.decode("utf-8", "replace")
    return {"group": letter.group, "id": letter.message.id, "type": letter.message.type,
            "dead_at": letter.dead_at, "record": dict(letter.record), "envelope": body}


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _with_bus(url: str, action: Any) -> Any:
    async with open_transport(url) as bus:
        return await action(bus)


@app.command("list")
def list_(group: str | None = GroupOption, broker: str | None = BrokerOption, json: bool = JsonOption,
          limit: int = typer.Option(100, "--limit", min=1)) -> None:
    """List dead letters, oldest first."""
    letters = run_async(_with_bus(broker_url(broker), lambda bus: bus.dead_letters(group, limit)))
    if json:
        console.print_json(orjson.dumps([_as_dict(letter) for letter in letters]).decode())
        return
    table = Table(title=f"dead letters ({len(letters)})")
    for column in ("group", "id", "type", "reason", "attempts", "last error", "dead at"):
        table.add_column(column)
    for letter in letters:
        record = letter.record
        error = record.get("last_error") or {}
        table.add_row(letter.group, letter.message.id, letter.message.type, str(record.get("reason", "")),
                      str(record.get("attempts", "")), f"{error.get('type', '')}: {error.get('message', '')}"[:60],
                      _when(letter.dead_at))
    console.print(table)


@app.command("show")
def show(message_id: str, group: str = typer.Option(..., "--group", "-g"), broker: str | None = BrokerOption) -> None:
    """Show one dead letter with its full record and original envelope (JSON)."""
    letter = run_async(_with_bus(broker_url(broker), lambda bus: bus.dead_letter(group, message_id)))
    if letter is None:
        raise ConfigurationError(f"no dead letter {message_id!r} in group {group!r}")
    console.print_json(orjson.dumps(_as_dict(letter)).decode())


@app.command("replay")
def replay(message_id: list[str] = typer.Argument(None, help="Ids to replay (default: all of the group)"),
           group: str = typer.Option(..., "--group", "-g"), broker: str | None = BrokerOption,
           json: bool = JsonOption) -> None:
    """Deliver dead letters to their group again, with a fresh attempt count."""
    count = run_async(_with_bus(broker_url(broker), lambda bus: bus.replay(group, message_id or None)))
    if json:
        console.print_json(orjson.dumps({"replayed": count}).decode())
    else:
        console.print(f"replayed {count} dead letter(s) to {group}")


@app.command("purge")
def purge(message_id: list[str] = typer.Argument(None, help="Ids to delete (default: all of the group)"),
          group: str = typer.Option(..., "--group", "-g"), broker: str | None = BrokerOption,
          json: bool = JsonOption) -> None:
    """Delete dead letters for good."""
    count = run_async(_with_bus(broker_url(broker), lambda bus: bus.purge(group, message_id or None)))
    if json:
        console.print_json(orjson.dumps({"purged": count}).decode())
    else:
        console.print(f"purged {count} dead letter(s) from {group}")
