"""``choreograph groups list`` and ``groups unbind``, as a user types them (real processes, a sqlite bus)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from choreograph.transports import Message, open_transport
from tests.cli.test_core_cli import cli


def bus_with_groups(tmp_path: Path) -> str:
    """A sqlite bus where billing handles two types, journal every type and idle none."""
    url = f"sqlite:///{tmp_path}/bus.db"

    async def subscribe() -> None:
        async with open_transport(url) as bus:
            await bus.subscribe("billing", ["order.placed", "order.cancelled"])
            await bus.subscribe("journal", None)
            await bus.subscribe("idle", [])

    asyncio.run(subscribe())
    return url


def test_groups_list_shows_each_group_and_its_types(tmp_path: Path) -> None:
    result = cli("groups", "list", "--broker", bus_with_groups(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = [" ".join(line.strip("│ ").split()) for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows == [
        "billing │ order.cancelled, order.placed",
        "idle │ no type",
        "journal │ every type",
    ]


def test_groups_list_prints_names_and_types_as_they_are_not_as_rich_markup(tmp_path: Path) -> None:
    """A str cell is Rich markup and emoji codes: "[b]" vanished and ":ok:" became an emoji."""
    url = f"sqlite:///{tmp_path}/bus.db"

    async def subscribe() -> None:
        async with open_transport(url) as bus:
            await bus.subscribe("ops:ok:", ["order[b]placed"])

    asyncio.run(subscribe())
    result = cli("groups", "list", "--broker", url)
    assert result.returncode == 0, result.stderr
    rows = [" ".join(line.strip("│ ").split()) for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows == ["ops:ok: │ order[b]placed"]


def test_groups_list_json_gives_types_as_a_list_and_null_for_every_type(tmp_path: Path) -> None:
    result = cli("groups", "list", "--json", "--broker", bus_with_groups(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"group": "billing", "types": ["order.cancelled", "order.placed"]},
        {"group": "idle", "types": []},
        {"group": "journal", "types": None},
    ]


def test_groups_unbind_prints_the_binding_afterwards_and_later_events_of_the_type_skip_the_group(
    tmp_path: Path,
) -> None:
    url = bus_with_groups(tmp_path)
    result = cli("groups", "unbind", "billing", "order.cancelled", "--broker", url)
    assert (result.returncode, result.stdout, result.stderr) == (0, "billing is bound to order.placed\n", "")
    listed = json.loads(cli("groups", "list", "--json", "--broker", url).stdout)
    assert listed[0] == {"group": "billing", "types": ["order.placed"]}

    async def delivered() -> list[str]:
        async with open_transport(url) as bus:
            await bus.publish([Message("m1", "order.cancelled", b"{}"), Message("m2", "order.placed", b"{}")])
            subscription = await bus.subscribe("billing", ["order.placed"])
            return [d.message.id for d in await subscription.fetch(10, timeout=1.0)]

    assert asyncio.run(delivered()) == ["m2"]


def test_groups_unbind_of_a_type_the_group_is_not_bound_to_notes_it_and_succeeds(tmp_path: Path) -> None:
    url = bus_with_groups(tmp_path)
    result = cli("groups", "unbind", "billing", "order.cancelled", "order.canceled", "--json", "--broker", url)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "note: billing was not bound to order.canceled\n"
    assert json.loads(result.stdout) == {"group": "billing", "types": ["order.placed"]}


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["billing2", "order.placed"], "error: no group 'billing2' on this bus (choreograph groups list shows them)"),
        (["journal", "order.placed"],
         "error: group 'journal' is bound to every type (a wildcard group): it cannot be unbound from some"),
    ],
)
def test_groups_unbind_of_an_unknown_or_wildcard_group_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], error: str
) -> None:
    url = bus_with_groups(tmp_path)
    result = cli("groups", "unbind", *args, "--broker", url)
    assert (result.returncode, result.stdout) == (2, "")
    assert " ".join(result.stderr.split()) == error
    assert json.loads(cli("groups", "list", "--json", "--broker", url).stdout)[0]["types"] == [
        "order.cancelled",
        "order.placed",
    ]


def test_groups_unbind_without_a_type_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("groups", "unbind", "billing", "--broker", bus_with_groups(tmp_path))
    assert result.returncode == 2 and "Missing argument 'TYPE...'" in result.stderr


@pytest.mark.parametrize("command", [["list"], ["unbind", "billing", "order.placed"]])
def test_groups_on_a_sqlite_bus_that_does_not_exist_is_an_error_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    result = cli("groups", *command, "--broker", f"sqlite:///{tmp_path}/var/typo.db")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: no SQLite bus at {tmp_path}/var/typo.db")
    assert not (tmp_path / "var").exists()


def test_groups_unbind_and_publish_print_names_as_they_are_not_as_emoji_codes(tmp_path: Path) -> None:
    """Printed without emoji=False, "pay:ok:" came out as "pay🆗": a name no command takes."""
    url = f"sqlite:///{tmp_path}/bus.db"

    async def subscribe() -> None:
        async with open_transport(url) as bus:
            await bus.subscribe("pay:ok:", ["t.a", "t:ok:"])

    asyncio.run(subscribe())
    done = cli("groups", "unbind", "pay:ok:", "t:ok:", "x:ok:", "--broker", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "pay:ok: is bound to t.a\n"
    assert done.stderr == "note: pay:ok: was not bound to x:ok:\n"
    published = cli("publish", "x:ok:", "--broker", url)
    assert published.returncode == 0, published.stderr
    assert "subscribes to 'x:ok:'" in published.stderr, published.stderr
