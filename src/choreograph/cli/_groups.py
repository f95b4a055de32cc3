"""``choreograph groups``: list a bus's consumer groups and unbind types from one.

Subscribing only ever widens a group's binding (old and new replicas share it during a
rolling deploy), so a type no version of a service handles any more stays bound until
someone removes it: ``choreograph groups unbind billing order.cancelled``. Both commands
open the bus with :func:`open_existing_bus`: neither has a reason to create one.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
import typer

from choreograph.cli._common import (
    BrokerOption,
    broker_url,
    console,
    err_console,
    open_existing_bus,
    run_async,
)
from choreograph.errors import ConfigurationError
from choreograph.transports import Transport

app = typer.Typer(help="List consumer groups and unbind types they no longer handle.", no_args_is_help=True)

JsonOption = typer.Option(False, "--json", help="Machine-readable output")

Binding = frozenset[str] | None


def _types(binding: Binding) -> list[str] | None:
    return None if binding is None else sorted(binding)


def _shown(binding: Binding) -> str:
    if binding is None:
        return "every type"
    return ", ".join(sorted(binding)) if binding else "no type"


async def _listed(url: str) -> Mapping[str, Binding]:
    async with open_existing_bus(url) as bus:
        groups = await bus.groups()
    if groups is None:
        raise ConfigurationError(f"this broker cannot list its groups ({url.partition('://')[0]}://)")
    return groups


async def _unbound(url: str, group: str, types: list[str]) -> tuple[Binding, list[str]]:
    """The group's binding after unbinding ``types``, and those of them it was not bound to."""
    async with open_existing_bus(url) as bus:
        before = await _binding(bus, group)
        after = await bus.unbind(group, types)
    absent = [] if before is None else [t for t in dict.fromkeys(types) if t not in before]
    return after, absent


async def _binding(bus: Transport, group: str) -> Binding:
    """The group's binding before the unbind, where the broker can tell (else every type:
    no type is then reported as absent)."""
    groups = await bus.groups()
    return None if groups is None else groups.get(group)


@app.command("list")
def list_(broker: str | None = BrokerOption, json: bool = JsonOption) -> None:
    """List the bus's consumer groups and the event types each is bound to."""
    groups = run_async(_listed(broker_url(broker)))
    if json:
        rows = [{"group": name, "types": _types(groups[name])} for name in sorted(groups)]
        console.print_json(orjson.dumps(rows).decode())
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"groups ({len(groups)})")
    table.add_column("group", no_wrap=True)
    table.add_column("types")
    for name in sorted(groups):
        table.add_row(Text(name), Text(_shown(groups[name])))  # text, not Rich markup or emoji codes
    console.print(table)


@app.command("unbind")
def unbind(group: str = typer.Argument(..., metavar="GROUP", help="Consumer group (service name)"),
           types: list[str] = typer.Argument(..., metavar="TYPE...", help="Event types to stop routing to it"),
           broker: str | None = BrokerOption, json: bool = JsonOption) -> None:
    """Stop routing event types to a group; print what it is bound to afterwards.

    Events of those types the group already holds stay (its services hand them back, then
    dead-letter them as unhandled). A replica that still subscribes for a type binds it
    again: unbind once no running version of the service handles it.
    """
    after, absent = run_async(_unbound(broker_url(broker), group, types))
    if absent:
        err_console.print(f"note: {group} was not bound to {', '.join(absent)}", markup=False, highlight=False,
                          emoji=False)
    if json:
        console.print_json(orjson.dumps({"group": group, "types": _types(after)}).decode())
    else:
        console.print(f"{group} is bound to {_shown(after)}", markup=False, highlight=False, emoji=False)
