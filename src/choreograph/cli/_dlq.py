"""``choreograph dlq``: list, show, replay and purge dead letters.

Every subcommand opens the bus with :func:`open_existing_bus`: none has a reason to
create one. An id the group has no dead letter for is an error (exit 2), reported after
the ids it does have were acted on: a script learns that a letter it meant to replay or
purge was not there (replayed already, mistyped, in another group) instead of reading
"replayed 0". So is one found but gone by the time it was acted on (a ``purge`` or another
``replay`` racing this one): the count says how many this command did, the error how many
it did not.
"""

from __future__ import annotations

import json as stdjson
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

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
from choreograph.transports import DeadLetter, Transport

app = typer.Typer(help="Inspect and act on dead letters.", no_args_is_help=True)

GroupOption = typer.Option(None, "--group", "-g", help="Consumer group (service name)")
JsonOption = typer.Option(False, "--json", help="Machine-readable output")

_Verb = Callable[[str, Collection[str] | None], Awaitable[int]]

#: The largest ``--limit`` passed on: more than any bus holds, and within every broker's integers.
_MOST = 2**62


def _as_dict(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as JSON: its record, and the envelope once, beside the record.

    The record keeps its own copy of the original envelope (the failure event carries it);
    printed there too, every envelope appeared twice. The one kept is the message's body:
    what ``dlq replay`` delivers again.

    Parsed by the standard library, not orjson: an integer beyond 64 bits (a big id, an amount
    in the smallest unit) stays exact, where orjson read it as a float (and could not write one
    at all: a record holding one failed ``dlq show`` with a traceback). ``NaN`` and ``Infinity``
    are not JSON: a body holding them is shown as text.
    """
    try:
        body: Any = stdjson.loads(letter.message.body, parse_constant=_not_json)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, and _not_json's
        body = letter.message.body.decode("utf-8", "replace")
    record = {key: value for key, value in letter.record.items() if key != "envelope"}
    return {"group": letter.group, "id": letter.message.id, "type": letter.message.type,
            "dead_at": letter.dead_at, "record": record, "envelope": body}


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _print_json(obj: Any) -> None:
    """``obj`` as indented JSON, its integers as they are (:func:`_as_dict`: orjson has no integers beyond 64 bits)."""
    console.print_json(stdjson.dumps(obj, ensure_ascii=False))


def _one_line(text: str, limit: int = 120) -> str:
    """An error for a table cell: its lines joined (a validation error names the field on its
    second line, which a cut at the first newline lost), at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _with_bus(url: str, action: Any) -> Any:
    async with open_existing_bus(url) as bus:
        return await action(bus)


def _missing_error(group: str, missing: Sequence[str]) -> ConfigurationError:
    if len(missing) == 1:
        return ConfigurationError(f"no dead letter {missing[0]!r} in group {group!r}")
    return ConfigurationError(f"no dead letters {', '.join(map(repr, missing))} in group {group!r}")


async def _check_group(bus: Transport, group: str) -> None:
    """A group the bus has never seen is an error (a typo listed as "no dead letters"), where
    the broker can tell (``groups()`` is not ``None``: see ``NatsTransport.groups``)."""
    groups = await bus.groups()
    if groups is not None and group not in groups:
        known = ", ".join(map(repr, sorted(groups))) or "none"
        raise ConfigurationError(f"--group: no group {group!r} on this bus (its groups: {known})")


async def _act_on(bus: Transport, group: str, ids: list[str], verb: _Verb) -> tuple[int, list[str], int]:
    """Apply ``verb`` (replay or purge) to the ids the group has (all: none given); also return
    those it has not, and how many of those it had were gone when ``verb`` ran.

    The transports skip unknown ids without a word, so each id is looked up first; a group the
    bus does not have is an error (``purge --all`` of a typo said "purged 0"). Another process
    can still take a letter between the look-up and ``verb`` (a ``purge`` racing a ``replay``):
    the shortfall of ``verb``'s count is reported too, where it read as done ("replayed 0", exit 0).
    """
    await _check_group(bus, group)
    if not ids:
        return await verb(group, None), [], 0
    wanted = list(dict.fromkeys(ids))
    missing = [message_id for message_id in wanted if await bus.dead_letter(group, message_id) is None]
    found = [message_id for message_id in wanted if message_id not in missing]
    count = await verb(group, found) if found else 0
    return count, missing, max(0, len(found) - count)


def _gone_error(group: str, missing: Sequence[str], gone: int, verb: str) -> ConfigurationError:
    """The error for ids not acted on: ``missing`` (never there) and ``gone`` more (there when looked up, not when acted on)."""
    parts = [str(_missing_error(group, missing))] if missing else []
    if gone:
        parts.append(f"{gone} dead letter(s) of {group!r} found were gone when {verb}: "
                     "replayed or purged meanwhile by another command")
    return ConfigurationError("; ".join(parts))


@app.command("list")
def list_(group: str | None = GroupOption, broker: str | None = BrokerOption, json: bool = JsonOption,
          limit: int = typer.Option(100, "--limit", min=1, help="Show at most N, oldest first")) -> None:
    """List dead letters, oldest first."""

    async def listed(bus: Transport) -> list[DeadLetter]:
        if group is not None:
            await _check_group(bus, group)
        # one more: whether there are more than shown; at most 2**62 (a "--limit 99999999999999999999",
        # meaning all, overflowed SQLite's integers: a traceback)
        return await bus.dead_letters(group, min(limit, _MOST) + 1)

    letters = run_async(_with_bus(broker_url(broker), listed))
    more = len(letters) > limit
    letters = letters[:limit]
    if more:  # the count alone read as "that is all of them"
        err_console.print(f"note: showing the oldest {limit} dead letters; there are more (--limit N shows more)",
                          markup=False, highlight=False)
    if json:
        _print_json([_as_dict(letter) for letter in letters])
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"dead letters (the oldest {limit}; more not shown)" if more else f"dead letters ({len(letters)})")
    for column in ("group", "id", "type", "reason", "attempts", "last error", "dead at"):
        # an id is pasted into `dlq show`: other columns give way first, and it folds rather than lose characters
        table.add_column(column, no_wrap=column == "id", overflow="fold" if column == "id" else "ellipsis")
    for letter in letters:
        record = letter.record
        error = record.get("last_error") or {}
        # Text, not str: a str cell is read as Rich markup and emoji codes, so pydantic's
        # "[type=missing, ...]" vanished from an error and an id with ":ok:" or "[b]" in it
        # was shown as one `dlq show` does not know
        cells = (letter.group, letter.message.id, letter.message.type, str(record.get("reason", "")),
                 str(record.get("attempts", "")), _one_line(f"{error.get('type', '')}: {error.get('message', '')}"),
                 _when(letter.dead_at))
        table.add_row(*(Text(cell) for cell in cells))
    console.print(table)


@app.command("show")
def show(message_id: str = typer.Argument(..., metavar="ID"), group: str = typer.Option(..., "--group", "-g"),
         broker: str | None = BrokerOption) -> None:
    """Show one dead letter with its full record and original envelope (JSON)."""

    async def shown(bus: Transport) -> DeadLetter | None:
        letter = await bus.dead_letter(group, message_id)
        if letter is None:  # a typo in --group is named as one, not as a letter that is gone
            await _check_group(bus, group)
        return letter

    letter = run_async(_with_bus(broker_url(broker), shown))
    if letter is None:
        raise _missing_error(group, [message_id])
    _print_json(_as_dict(letter))


@app.command("replay")
def replay(message_id: list[str] = typer.Argument(None, metavar="ID...",
                                                  help="Ids to replay (default: all of the group)"),
           group: str = typer.Option(..., "--group", "-g"), broker: str | None = BrokerOption,
           json: bool = JsonOption) -> None:
    """Deliver dead letters to their group again, with a fresh attempt count."""
    count, missing, gone = run_async(
        _with_bus(broker_url(broker), lambda bus: _act_on(bus, group, message_id or [], bus.replay))
    )
    if json:
        console.print_json(orjson.dumps({"replayed": count}).decode())
    else:
        console.print(f"replayed {count} dead letter(s) to {group}", markup=False, highlight=False, emoji=False)
    if missing or gone:
        raise _gone_error(group, missing, gone, "replayed")


@app.command("purge")
def purge(message_id: list[str] = typer.Argument(None, metavar="ID...", help="Ids to delete"),
          group: str = typer.Option(..., "--group", "-g"), broker: str | None = BrokerOption,
          all_: bool = typer.Option(False, "--all", help="Delete every dead letter of the group"),
          json: bool = JsonOption) -> None:
    """Delete dead letters for good: the ids given, or with --all every one of the group."""
    # Deleting a whole group's letters is not undoable: it takes a flag, not forgotten ids.
    if not message_id and not all_:
        raise ConfigurationError(f"dlq purge: give the ids to delete, or --all to delete every dead letter of {group!r}")
    if message_id and all_:
        raise ConfigurationError("dlq purge: give ids or --all, not both")
    count, missing, gone = run_async(
        _with_bus(broker_url(broker), lambda bus: _act_on(bus, group, message_id or [], bus.purge))
    )
    if json:
        console.print_json(orjson.dumps({"purged": count}).decode())
    else:
        console.print(f"purged {count} dead letter(s) from {group}", markup=False, highlight=False, emoji=False)
    if missing or gone:
        raise _gone_error(group, missing, gone, "purged")
