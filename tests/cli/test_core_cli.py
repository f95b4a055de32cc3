"""The core CLI: run, publish and dlq, as a user types them (real processes, a sqlite bus; NATS once)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from examples.chain import OrderPlaced

from choreograph import Publisher, Reject, Service, Worker
from choreograph.journal import JOURNAL_GROUP
from choreograph.transports import Message, open_transport
from tests._brokers import require_broker
from tests._procs import stop
from tests.conformance.brokers import nats as nats_broker

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 60, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The command's output to pipes, whatever the width of the terminal running the tests."""
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    return subprocess.run([sys.executable, "-m", "choreograph", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**env, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "no_such_module:svc", "--broker", "memory://"], "no module named 'no_such_module'"),
        (["run", "examples.chain:nope", "--broker", "memory://"], "has no attribute 'nope'"),
        (["run", "examples.chain", "--broker", "memory://"], "expected MODULE:ATTRIBUTE"),
        (["run", "examples.chain:OrderPlaced", "--broker", "memory://"],
         "'examples.chain:OrderPlaced' is the Event class OrderPlaced, not a Service"),
        (["run", "examples.chain:FAILURE_RATE", "--broker", "memory://"], "is a float, not a Service"),
        (["publish", "x.y", "--schema", "choreograph:Context", "--broker", "memory://"],
         "--schema: 'choreograph:Context' is the class Context, not an Event class"),
        (["run", "examples.chain:payment", "--broker", "kafka://x"], "unknown scheme 'kafka'"),
        (["run", "examples.chain:payment", "--broker", "sqlite:///x.db?lease=soon"], "lease"),
        (["dlq", "list", "--broker", "redis://127.0.0.1:1/0?prefix=x&bogus=1"], "unknown parameter(s) bogus"),
        (["dlq", "list", "--broker", "amqp://guest:guest@127.0.0.1:1/?prefx=shop"], "unknown parameter(s) prefx"),
        (["dlq", "list", "--broker", "nats://127.0.0.1:1?prefx=shop"],
         "unknown parameter(s) prefx (did you mean prefix?); nats:// takes lease, prefix, replicas"),
        # an amqp:// URL without a host: aio-pika tried to connect to nothing every second, for ever
        (["dlq", "list", "--broker", "amqp://"], "broker URL 'amqp://': no host"),
        (["run", "examples.chain:payment", "--broker", "amqp:///vhost", "--store", "memory://", "--connect-timeout", "0"],
         "broker URL 'amqp:///vhost': no host"),
        (["publish", "chain.order.placed", "--broker", "amqps://guest:guest@:5671/"], "no host"),
        (["trace", "abc", "--journal", "postgresql://127.0.0.1:abc/x"], "PostgreSQL URL: the port is not a number"),
        (["run", "examples.chain:payment", "--broker", "memory://", "--store", "postgresql://127.0.0.1:abc/x"],
         "PostgreSQL URL: the port is not a number"),
        # more than a fetch can ask for (RabbitMQ's prefetch is 16 bits): taken, then every fetch failed for ever
        (["run", "examples.chain:payment", "--broker", "memory://", "--concurrency", "65536"],
         "Invalid value for '--concurrency' / '-c': Input should be less than or equal to 65535"),
        (["push", "--group", "g", "--type", "t", "--url", "http://127.0.0.1:1/", "--broker", "memory://",
          "--concurrency", "99999999999999999999999"], "Invalid value for '--concurrency' / '-c'"),
        (["run", "examples.chain:payment", "--broker", "memory://", "--store", "sqlite:///x.db?synchronous=FULL"],
         "inbox store URL 'sqlite:///x.db?synchronous=FULL': unknown parameter(s) synchronous"),
        (["journal", "examples.chain:app", "--broker", "memory://", "--store", "sqlite:///x.db?mode=ro"],
         "journal store URL 'sqlite:///x.db?mode=ro': unknown parameter(s) mode"),
        (["gateway", "examples.drone_delivery.gateway:gateway", "--fd", "-1"],
         "Invalid value for '--fd': Input should be greater than or equal to 0"),
        (["gateway", "examples.drone_delivery.gateway:gateway", "--fd", "999"], "--fd 999: not an open socket"),
        # what the object is, not its metaclass ("is a ModelMetaclass")
        (["journal", "examples.chain:OrderPlaced", "--broker", "memory://", "--store", "memory://"],
         "'examples.chain:OrderPlaced' is the Event class OrderPlaced, not an App, a Service or a list of Services"),
        (["dev", "examples.chain:OrderPlaced"], "'examples.chain:OrderPlaced' is the Event class OrderPlaced; choreograph dev needs an App"),
        (["run", "examples.chain:payment", "--broker", "sqlite:///x.db?synchronus=FULL"],
         "unknown parameter(s) synchronus (did you mean synchronous?); sqlite:// takes lease, synchronous, busy_timeout"),
        (["publish", "chain.order.placed", "--correlation-id", "", "--broker", "memory://"],
         "--correlation-id '': empty; give the transaction's correlation id"),
        (["publish", "chain.order.placed", "--data", "{oops", "--broker", "memory://"], "--data: not valid JSON"),
        (["publish", "chain.order.placed", "--data", '{"order_id": 5}', "--schema", "examples.chain",
          "--broker", "memory://"], "$.amount: Field required"),
        (["publish", "chain.nope", "--data", "{}", "--schema", "examples.chain", "--broker", "memory://"],
         "unknown event type 'chain.nope'"),
    ],
)
def test_bad_input_prints_one_clear_line_and_exits_2(args: list[str], needle: str) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["shop.order.placed", "--data", "[1, 2]"], "--data: an event's data is a JSON object, got an array"),
        (["shop.order.placed", "--data", '"str"'], "--data: an event's data is a JSON object, got a string"),
        (["shop.order.placed", "--data", "null"], "--data: an event's data is a JSON object, got null"),
        (["shop.order.placed", "--source", ""], "--source: must be a non-empty string"),
        (["shop.order.placed", "--source", "/cli\x7f"], "--source: '/cli\\x7f' contains a control character (U+007F"),
        (["shop.order.placed", "--correlation-id", "c\n1"],
         "--correlation-id: 'c\\n1' contains a control character (U+000A at index 1)"),
        (["shop.order.placed", "--correlation-id", "c\ufdd0"], "contains a Unicode noncharacter (U+FDD0 at index 1)"),
        (["", "--data", "{}"], "TYPE: '' is empty"),
        (["shop.order placed"], "TYPE: 'shop.order placed' contains whitespace"),
        (["shop.order.placed\t"], "contains whitespace"),
        (["choreograph.failed", "--data", "{}"], "TYPE: 'choreograph.failed' is reserved"),
        (["chain.order.placed", "--schema", "examples.chain:payment"],
         "--schema: 'examples.chain:payment' is a Service, not an Event class"),
        (["chain.order.paid", "--data", '{"order_id": "o", "amount": 1}', "--schema", "examples.chain:OrderPlaced"],
         "--schema: 'examples.chain:OrderPlaced' is the Event of type 'chain.order.placed', not of 'chain.order.paid'"),
        (["chain.order.placed", "--schema", "examples.chain:Nope"], "--schema: 'examples.chain:Nope': module"),
        (["chain.order.placed", "--data", '{"order_id": 5}', "--schema", ""], "--schema '': empty; give MODULE[:CLASS]"),
        (["chain.order.placed", "--data", '{"order_id": 5}', "--schema", "examples.chain:OrderPlaced"],
         "--data: OrderPlaced: $.order_id: Input should be a valid string"),
    ],
    ids=["array", "string", "null", "empty-source", "control-in-source", "control-in-correlation-id",
         "noncharacter-in-correlation-id", "empty-type", "space-in-type", "tab-in-type", "reserved-type",
         "schema-not-an-event", "schema-of-another-type", "schema-missing", "schema-empty", "data-invalid-for-schema"],
)
def test_publish_refuses_an_event_a_worker_would_dead_letter_before_opening_the_bus(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    result = cli("publish", *args, "--broker", f"sqlite:///{tmp_path}/bus.db")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and needle in " ".join(result.stderr.split())
    assert not (tmp_path / "bus.db").exists()


async def first_message(url: str, group: str) -> Message | None:
    """The first message waiting for ``group`` (subscribing registers the group: ``None`` then)."""
    async with open_transport(url) as bus:
        subscription = await bus.subscribe(group, None)
        deliveries = await subscription.fetch(1, timeout=0.5)
        return deliveries[0].message if deliveries else None


def test_publish_with_the_event_class_as_schema_validates_the_data_and_names_its_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    assert asyncio.run(first_message(url, "reader")) is None
    result = cli("publish", "chain.order.placed", "--data", '{"order_id": "o-1", "amount": 3}',
                 "--schema", "examples.chain:OrderPlaced", "--broker", url)
    assert result.returncode == 0, result.stderr
    message = asyncio.run(first_message(url, "reader"))
    assert message is not None and message.id == json.loads(result.stdout)["id"]
    assert json.loads(message.body)["dataschema"] == OrderPlaced.schema_uri()


def seed_dead_letters(url: str) -> list[str]:
    svc = Service("payment")

    @svc.on(OrderPlaced)
    async def refuse(order: OrderPlaced) -> None:
        raise Reject(f"no {order.order_id}")

    async def go() -> list[str]:
        async with open_transport(url) as bus:
            async with Worker([svc], bus):
                envs = await Publisher(bus).publish(OrderPlaced(order_id="a", amount=1),
                                                    OrderPlaced(order_id="b", amount=2))
                for _ in range(200):
                    if len(await bus.dead_letters("payment")) == 2:
                        break
                    await asyncio.sleep(0.02)
            return [env.id for env in envs]

    return asyncio.run(go())


def test_dlq_list_shows_an_invalid_payloads_error_with_the_field_it_names(tmp_path: Path) -> None:
    """A validation error names the field on its second line; the table showed the first only."""
    url = f"sqlite:///{tmp_path}/bus.db"

    async def dead_letter_an_order_without_amount() -> None:
        async with open_transport(url) as bus:
            svc = Service("payment")

            @svc.on(OrderPlaced)
            async def never(order: OrderPlaced) -> None:
                raise AssertionError("an invalid payload never reaches the handler")

            async with Worker([svc], bus):
                body = b'{"specversion":"1.0","id":"e-1","source":"/t","type":"chain.order.placed","data":{"order_id":"o"}}'
                await bus.publish([Message("e-1", "chain.order.placed", body)])
                for _ in range(200):
                    if await bus.dead_letters("payment"):
                        break
                    await asyncio.sleep(0.02)

    asyncio.run(dead_letter_an_order_without_amount())
    table = cli("dlq", "list", "--broker", url)
    assert table.returncode == 0, table.stderr
    assert "1 validation error for OrderPlaced amount Field required" in " ".join(
        cell.strip() for line in table.stdout.splitlines() for cell in line.split("│")
    )


def test_dlq_list_prints_ids_groups_and_errors_as_they_are_not_as_rich_markup(tmp_path: Path) -> None:
    """A table cell given as a str is Rich markup: pydantic's "[type=missing, ...]" vanished from
    the error, and an id with ":ok:" (an emoji code) or "[b]" in it could not be pasted into dlq show."""
    url = f"sqlite:///{tmp_path}/bus.db"
    error = "Field required [type=missing, input_value={}, input_type=dict] in list[str]"

    async def dead_letter_one() -> None:
        async with open_transport(url) as bus:
            subscription = await bus.subscribe("pay:ok:", ["t.a"])
            await bus.publish([Message("id[b]x:ok:", "t.a", b"{}")])
            (delivery,) = await subscription.fetch(1, timeout=5)
            await delivery.dead_letter({"reason": "rejected", "attempts": 1,
                                        "last_error": {"type": "ValidationError", "message": error}})

    asyncio.run(dead_letter_one())
    table = cli("dlq", "list", "--broker", url)
    assert table.returncode == 0, table.stderr
    cells = [cell.strip() for line in table.stdout.splitlines() for cell in line.split("│")]
    assert {"pay:ok:", "id[b]x:ok:", f"ValidationError: {error}"} <= set(cells)
    replayed = cli("dlq", "replay", "id[b]x:ok:", "--group", "pay:ok:", "--broker", url)
    assert replayed.stdout == "replayed 1 dead letter(s) to pay:ok:\n", replayed.stderr


def test_dlq_list_show_replay_and_purge(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    ids = seed_dead_letters(url)
    listed = json.loads(cli("dlq", "list", "--broker", url, "--json").stdout)
    assert sorted(item["id"] for item in listed) == sorted(ids)
    assert {item["record"]["reason"] for item in listed} == {"rejected"}
    table = cli("dlq", "list", "--broker", url)
    assert "rejected" in table.stdout and "payment" in table.stdout

    shown = json.loads(cli("dlq", "show", ids[0], "--group", "payment", "--broker", url).stdout)
    assert shown["envelope"]["id"] == ids[0]
    assert shown["record"]["last_error"]["message"] == "no a"
    missing = cli("dlq", "show", "nope", "--group", "payment", "--broker", url)
    assert missing.returncode == 2 and "no dead letter 'nope'" in missing.stderr

    replayed = json.loads(cli("dlq", "replay", ids[0], "--group", "payment", "--broker", url, "--json").stdout)
    assert replayed == {"replayed": 1}
    remaining = json.loads(cli("dlq", "list", "--broker", url, "--json").stdout)
    assert [item["id"] for item in remaining] == [ids[1]]

    purged = json.loads(cli("dlq", "purge", "--group", "payment", "--all", "--broker", url, "--json").stdout)
    assert purged == {"purged": 1}
    assert json.loads(cli("dlq", "list", "--broker", url, "--json").stdout) == []


def test_dlq_show_and_list_print_the_envelope_once(tmp_path: Path) -> None:
    """The record keeps a copy of the original envelope: shown inside it as well, it appeared twice."""
    url = f"sqlite:///{tmp_path}/bus.db"
    ids = seed_dead_letters(url)
    shown = cli("dlq", "show", ids[0], "--group", "payment", "--broker", url)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count('"envelope"') == 1 and shown.stdout.count('"order_id"') == 1
    letter = json.loads(shown.stdout)
    assert letter["envelope"]["data"] == {"order_id": "a", "amount": 1}
    assert letter["record"]["reason"] == "rejected" and "envelope" not in letter["record"]
    listed = cli("dlq", "list", "--broker", url, "--json").stdout
    assert listed.count('"envelope"') == len(ids) == 2


def test_dlq_replay_and_purge_act_on_the_ids_the_group_has_and_name_the_others_with_exit_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    first, second = seed_dead_letters(url)

    replayed = cli("dlq", "replay", first, "nosuch", "--group", "payment", "--broker", url)
    assert replayed.returncode == 2
    assert "replayed 1 dead letter(s) to payment" in replayed.stdout
    assert replayed.stderr == "error: no dead letter 'nosuch' in group 'payment'\n"

    purged = cli("dlq", "purge", first, second, "--group", "payment", "--broker", url, "--json")
    assert purged.returncode == 2 and json.loads(purged.stdout) == {"purged": 1}
    assert f"no dead letter '{first}' in group 'payment'" in purged.stderr  # replayed above: no longer dead

    elsewhere = cli("dlq", "replay", "a", "b", "--group", "payment", "--broker", url)
    assert elsewhere.returncode == 2 and "no dead letters 'a', 'b' in group 'payment'" in elsewhere.stderr


def test_dlq_purge_without_ids_deletes_nothing_unless_told_all(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    seed_dead_letters(url)
    refused = cli("dlq", "purge", "--group", "payment", "--broker", url)
    assert refused.returncode == 2 and "--all" in refused.stderr and "Traceback" not in refused.stderr
    assert len(json.loads(cli("dlq", "list", "--broker", url, "--json").stdout)) == 2
    purged = cli("dlq", "purge", "--group", "payment", "--all", "--broker", url, "--json")
    assert json.loads(purged.stdout) == {"purged": 2}


def test_a_sqlite_path_with_a_hash_is_refused_instead_of_opening_another_file(tmp_path: Path) -> None:
    """``#`` starts a URL fragment: ``sqlite:///…/proj#2/bus.db`` opened (and created) ``…/proj``, a bus
    no tool pointed at ``proj#2/bus.db`` would see."""
    folder = tmp_path / "proj#2"
    commands = [
        ["publish", "x.y", "--broker", f"sqlite:///{folder}/bus.db"],
        ["dlq", "list", "--broker", f"sqlite:///{folder}/bus.db"],
        ["run", "examples.chain:payment", "--broker", "memory://", "--store", f"sqlite:///{folder}/inbox.db"],
        ["trace", "x", "--journal", f"sqlite:///{folder}/journal.db"],
        ["dev", "examples.chain:app", "--port", "0", "--data-dir", str(folder)],
    ]
    for args in commands:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and "'#'" in result.stderr, (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither proj nor proj#2 made


def test_dlq_list_says_when_limit_hides_dead_letters(tmp_path: Path) -> None:
    """The table's title counted the letters shown: with more than --limit (100 by default) on the
    bus, "dead letters (100)" read as all of them, and --json gave no hint at all."""
    url = f"sqlite:///{tmp_path}/bus.db"
    first, second = seed_dead_letters(url)
    table = cli("dlq", "list", "--limit", "1", "--broker", url)
    assert table.returncode == 0, table.stderr
    assert "dead letters (1)" not in table.stdout and "more not shown" in table.stdout
    assert "there are more (--limit N shows more)" in table.stderr
    listed = cli("dlq", "list", "--limit", "1", "--broker", url, "--json")
    assert len(json.loads(listed.stdout)) == 1 and "--limit" in listed.stderr
    whole = cli("dlq", "list", "--limit", "2", "--broker", url)
    assert "dead letters (2)" in whole.stdout and whole.stderr == ""


def test_dlq_list_into_a_pipe_prints_whole_ids_that_dlq_show_takes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    ids = seed_dead_letters(url)
    table = cli("dlq", "list", "--broker", url).stdout
    assert all(message_id in table for message_id in ids) and "…" not in table
    assert cli("dlq", "show", ids[0], "--group", "payment", "--broker", url).returncode == 0


@pytest.mark.parametrize(
    ("args", "lines"),
    [
        (["dlq", "show"], ["error: Missing argument 'ID'. (see {} dlq show --help)"]),
        (["run", "examples.chain:app", "--concurrency", "0"], [  # Typer's reason: 0.29 and later, 0.28
            "error: Invalid value for '--concurrency' / '-c': Input should be greater than or equal to 1 "
            "(see {} run --help)",
            "error: Invalid value for '--concurrency' / '-c': 0 is not in the range x>=1. (see {} run --help)",
        ]),
        (["nosuch"], ["error: No such command 'nosuch'. (see {} --help)"]),
    ],
    ids=["missing-argument", "out-of-range", "unknown-command"],
)
def test_a_usage_error_is_one_line_saying_where_the_help_is_and_exits_2(args: list[str], lines: list[str]) -> None:
    """Typer printed these as a boxed panel under the usage line."""
    result = cli(*args)
    assert result.returncode == 2
    # (`choreograph` from the script)
    assert result.stderr in [line.format("python -m choreograph") + "\n" for line in lines]


def test_an_error_into_a_pipe_is_one_line_however_long_and_prints_brackets_as_typed() -> None:
    group = "[red]" + "g" * 100
    result = cli("dlq", "show", "x" * 100, "--group", group, "--broker", "memory://")
    assert result.returncode == 2
    assert result.stderr == f"error: --group: no group {group!r} on this bus (its groups: none)\n"


@pytest.mark.parametrize("command", [["list"], ["show", "some-id", "--group", "payment"],
                                     ["replay", "--group", "payment"], ["purge", "--group", "payment", "--all"]])
def test_dlq_on_a_sqlite_bus_that_does_not_exist_is_an_error_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    result = cli("dlq", *command, "--broker", f"sqlite:///{tmp_path}/var/typo.db")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: no SQLite bus at {tmp_path}/var/typo.db")
    assert not (tmp_path / "var").exists()


def test_publish_to_a_sqlite_bus_that_does_not_exist_creates_it(tmp_path: Path) -> None:
    result = cli("publish", "chain.order.placed", "--broker", f"sqlite:///{tmp_path}/var/bus.db")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "var" / "bus.db").exists()


def test_publish_warns_when_no_group_on_the_bus_would_receive_the_event(tmp_path: Path) -> None:
    """Published before any consumer subscribed, an event reaches nobody: said on stderr, exit 0."""
    url = f"sqlite:///{tmp_path}/bus.db"
    alone = cli("publish", "chain.order.placed", "--broker", url)
    assert alone.returncode == 0, alone.stderr
    assert " ".join(alone.stderr.split()) == (
        "warning: no group on this bus subscribes to 'chain.order.placed': nobody receives this event "
        "(a group receives what is published after it first subscribed: start its consumers first)"
    )

    async def subscribe(group: str, types: list[str] | None) -> None:
        async with open_transport(url) as bus:
            await (await bus.subscribe(group, types)).close()

    asyncio.run(subscribe("shipping", ["chain.payment.captured"]))  # another type: still nobody
    assert "warning: no group" in cli("publish", "chain.order.placed", "--broker", url).stderr
    asyncio.run(subscribe("payment", ["chain.order.placed"]))
    heard = cli("publish", "chain.order.placed", "--broker", url)
    assert heard.returncode == 0 and heard.stderr == ""


def test_publish_warns_that_no_service_receives_the_event_while_the_journal_records_every_type(tmp_path: Path) -> None:
    """The journal's group subscribes to every type; it records an event, nobody handles it."""
    url = f"sqlite:///{tmp_path}/bus.db"

    async def subscribe(group: str, types: list[str] | None) -> None:
        async with open_transport(url) as bus:
            await (await bus.subscribe(group, types)).close()

    asyncio.run(subscribe(JOURNAL_GROUP, None))
    recorded = cli("publish", "chain.order.placed", "--broker", url)
    assert recorded.returncode == 0, recorded.stderr
    assert "warning: no group on this bus subscribes to 'chain.order.placed'" in " ".join(recorded.stderr.split())
    asyncio.run(subscribe("payment", ["chain.order.placed"]))
    assert cli("publish", "chain.order.placed", "--broker", url).stderr == ""


def test_dlq_list_of_a_group_the_bus_does_not_have_is_an_error_naming_the_groups_it_has(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    seed_dead_letters(url)
    typo = cli("dlq", "list", "--group", "paymnet", "--broker", url)
    assert typo.returncode == 2
    assert typo.stderr == "error: --group: no group 'paymnet' on this bus (its groups: 'payment')\n"
    assert json.loads(cli("dlq", "list", "--group", "payment", "--broker", url, "--json").stdout) != []
    for verb in (["replay"], ["purge", "--all"]):
        acted = cli("dlq", *verb, "--group", "paymnet", "--broker", url)
        assert acted.returncode == 2 and "no group 'paymnet' on this bus" in acted.stderr


def test_dlq_show_in_a_group_the_bus_does_not_have_names_the_groups_it_has(tmp_path: Path) -> None:
    """Not "no dead letter ID in group 'paymnet'", which reads as a letter already replayed or purged."""
    url = f"sqlite:///{tmp_path}/bus.db"
    first, _ = seed_dead_letters(url)
    typo = cli("dlq", "show", first, "--group", "paymnet", "--broker", url)
    assert (typo.returncode, typo.stderr) == (2, "error: --group: no group 'paymnet' on this bus (its groups: 'payment')\n")
    gone = cli("dlq", "show", "nope", "--group", "payment", "--broker", url)
    assert (gone.returncode, gone.stderr) == (2, "error: no dead letter 'nope' in group 'payment'\n")
    assert json.loads(cli("dlq", "show", first, "--group", "payment", "--broker", url).stdout)["id"] == first


def test_on_nats_dlq_list_of_an_unknown_group_is_an_error_and_groups_list_shows_the_groups() -> None:
    """NATS reads its groups back from the consumers (on the shared server: before 2.10, the
    types in their descriptions), so the CLI checks a group there as on the other brokers."""
    url = f"{require_broker('nats')}?prefix=choreograph-test-{uuid.uuid4().hex[:12]}"

    async def subscribe() -> None:
        async with open_transport(url) as bus:
            await (await bus.subscribe("payment", ["chain.order.placed"])).close()

    try:
        asyncio.run(subscribe())
        typo = cli("dlq", "list", "--group", "paymnet", "--broker", url)
        assert (typo.returncode, typo.stderr) == (2, "error: --group: no group 'paymnet' on this bus (its groups: 'payment')\n")
        assert json.loads(cli("dlq", "list", "--group", "payment", "--broker", url, "--json").stdout) == []
        listed = json.loads(cli("groups", "list", "--json", "--broker", url).stdout)
        assert listed == [{"group": "payment", "types": ["chain.order.placed"]}]
    finally:
        asyncio.run(nats_broker.cleanup(url))


UNREACHABLE = {"nats": "nats://127.0.0.1:1", "amqp": "amqp://guest:guest@127.0.0.1:1/"}


@pytest.mark.parametrize("scheme", sorted(UNREACHABLE))
@pytest.mark.parametrize("command", [["publish", "chain.order.placed"], ["dlq", "list"],
                                     ["run", "examples.chain:app", "--store", "memory://", "--connect-timeout", "0"]],
                         ids=["publish", "dlq", "run"])
def test_an_unreachable_broker_is_one_error_line_without_the_clients_own_lines(scheme: str, command: list[str]) -> None:
    """nats-py's errors (relayed as warnings) and aiormq's (an ERROR per attempt) came first.
    (``run`` tries once with ``--connect-timeout 0``; tests/cli/test_connect.py has the waiting.)"""
    result = cli(*command, "--broker", UNREACHABLE[scheme])
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {scheme}: connect to ") and result.stderr.count("\n") == 1, result.stderr
    assert f"[Errno {errno.ECONNREFUSED}]" in result.stderr  # the reason, said once


@pytest.mark.parametrize("command", [["dlq", "list"], ["publish", "chain.order.placed"]], ids=["dlq", "publish"])
def test_ctrl_c_while_connecting_to_a_silent_amqp_server_stops_the_command(command: list[str]) -> None:
    """The connect's cancellation was taken by aio-pika for a failed try: it tried again every second
    and the command never ended (a second Ctrl-C neither)."""
    import signal
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts, never answers
        server.settimeout(30)
        url = f"amqp://guest:guest@127.0.0.1:{server.getsockname()[1]}/"
        env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
        proc = subprocess.Popen([sys.executable, "-m", "choreograph", *command, "--broker", url], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**env, "PYTHONPATH": str(ROOT)})
        try:
            connection, _ = server.accept()  # the command is connecting
            with connection:
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
        finally:
            stop(proc, timeout=5)  # not needed unless it hangs
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_run_with_log_level_debug_keeps_the_client_libraries_lines() -> None:
    result = cli("run", "examples.chain:app", "--store", "memory://", "--log-level", "debug",
                 "--broker", UNREACHABLE["amqp"], "--connect-timeout", "0")
    assert result.returncode == 2
    assert "aiormq.connection: error when creating transport" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: amqp: connect to 127.0.0.1:1")


def test_run_processes_events_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "choreograph", "run", "examples.chain:app", "--broker", url],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "running payment+shipping+notify" in line
        published = json.loads(cli("publish", "chain.order.placed", "--data", '{"order_id": "o-9", "amount": 5}',
                                   "--schema", "examples.chain", "--broker", url).stdout)
        inbox = tmp_path / "bus.stores" / "payment+shipping+notify.db"
        deadline = time.monotonic() + 30
        import sqlite3

        while time.monotonic() < deadline:
            if inbox.exists():
                db = sqlite3.connect(inbox)
                groups = {row[0] for row in db.execute("SELECT grp FROM inbox")}
                db.close()
                if groups == {"payment", "shipping", "notify"}:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the chain did not complete")
        assert published["id"] == published["correlation_id"]
    finally:
        out, _ = stop(proc, 30)
        assert proc.returncode == 0, out


def test_dlq_show_and_list_print_integers_beyond_64_bits_exactly(tmp_path: Path) -> None:
    """orjson read an integer beyond 64 bits in the body as a float, and could not write one in the
    record at all (a traceback): JSON has no such limit, and an id or amount must come out as it went in."""
    url = f"sqlite:///{tmp_path}/bus.db"
    big = 123456789012345678901234567890

    async def dead_letter_one() -> None:
        async with open_transport(url) as bus:
            subscription = await bus.subscribe("pay", ["t.a"])
            await bus.publish([Message("m1", "t.a", json.dumps({"data": {"n": big}}).encode())])
            (delivery,) = await subscription.fetch(1, timeout=5)
            await delivery.dead_letter({"reason": "rejected", "attempts": 1, "order": big + 1})

    asyncio.run(dead_letter_one())
    shown = cli("dlq", "show", "m1", "--group", "pay", "--broker", url)
    assert shown.returncode == 0, shown.stderr
    letter = json.loads(shown.stdout)
    assert letter["envelope"] == {"data": {"n": big}}
    assert letter["record"]["order"] == big + 1
    listed = cli("dlq", "list", "--json", "--broker", url)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["envelope"] == {"data": {"n": big}}



@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", '{"n": 123456789012345678901234567890}'],
         "--data: $.n: integer out of range: events carry integers of at most 64 bits"),
        (["--data", '{"a": {"b": [1, -9223372036854775809]}}'], "--data: $.a.b[1]: integer out of range"),
        (["--data", '{"a": 1, "a": 2}'], "--data: $.a: the key is given twice in one object"),
        (["--data", '{"a": {"k": 1, "k": 1}}'], "--data: $.a.k: the key is given twice in one object"),
    ],
    ids=["big-int", "big-negative-int-deep", "duplicate-key", "duplicate-key-deep"],
)
def test_publish_refuses_data_it_would_not_publish_as_typed(tmp_path: Path, args: list[str], needle: str) -> None:
    """orjson read an integer beyond 64 bits as a float and kept the last of a key given twice: each
    was published, silently, as something else than typed (the gateway answers 422 to both). An
    empty --correlation-id is refused too (test_bad_input_prints_one_clear_line_and_exits_2)."""
    result = cli("publish", "chain.order.placed", *args, "--broker", f"sqlite:///{tmp_path}/bus.db")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and needle in " ".join(result.stderr.split()), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bus.db").exists()



@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["dlq", "list", "--broker", "redis://[::1"], "broker URL 'redis://[::1': Invalid IPv6 URL"),
        (["groups", "list", "--broker", "nats://[::1/x"], "broker URL 'nats://[::1/x': Invalid IPv6 URL"),
        (["publish", "a.b", "--broker", "amqp://[zz]:5672/"],
         "broker URL 'amqp://[zz]:5672/': 'zz' does not appear to be an IPv4 or IPv6 address"),
        (["run", "examples.chain:payment", "--broker", "memory://", "--store", "sqlite://[x"],
         "store URL 'sqlite://[x': Invalid IPv6 URL"),
        (["trace", "tx", "--journal", "postgresql://[::1"], "journal URL 'postgresql://[::1': Invalid IPv6 URL"),
        (["watch", "--once", "--journal", "sqlite://[x"], "sqlite URL 'sqlite://[x': Invalid IPv6 URL"),
        (["push", "--broker", "memory://", "--group", "g", "--type", "a.b", "--url", "http://[::1"],
         "url 'http://[::1' is not an http(s) URL (Invalid IPv6 URL)"),
    ],
    ids=["dlq", "groups", "publish", "run-store", "trace", "watch", "push-url"],
)
def test_a_url_urllib_cannot_split_is_one_line_naming_it(args: list[str], needle: str) -> None:
    """An unclosed "[" (or a bracketed host that is no IP address) raised urlsplit's ValueError: a traceback."""
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_dlq_list_with_a_limit_beyond_sqlites_integers_lists_them_all(tmp_path: Path) -> None:
    """--limit 99999999999999999999 (all of them) overflowed SQLite's integers: a traceback."""
    url = f"sqlite:///{tmp_path}/bus.db"
    ids = seed_dead_letters(url)
    listed = cli("dlq", "list", "--limit", "9" * 20, "--json", "--broker", url)
    assert listed.returncode == 0, listed.stderr
    assert sorted(letter["id"] for letter in json.loads(listed.stdout)) == sorted(ids)


@pytest.mark.parametrize(
    "url",
    ["sqlite:///{tmp}/bus.db?lease=nan", "sqlite:///{tmp}/bus.db?busy_timeout=inf", "memory://?lease=nan",
     "redis://127.0.0.1:1/0?lease=nan", "nats://127.0.0.1:1?lease=inf"],
    ids=["sqlite-nan-lease", "sqlite-inf-busy-timeout", "memory-nan-lease", "redis-nan-lease", "nats-inf-lease"],
)
def test_a_lease_that_is_not_a_finite_number_of_seconds_is_refused(tmp_path: Path, url: str) -> None:
    """nan passed `lease <= 0`: the SQLite bus failed its first fetch ("NOT NULL constraint failed"),
    Redis with "cannot convert float NaN to integer"."""
    result = cli("publish", "a.b", "--broker", url.format(tmp=tmp_path))
    assert result.returncode == 2, result.stderr
    assert "must be > 0 seconds (and finite)" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "bus.db").exists()


@pytest.mark.parametrize(
    "url",
    ["redis://:hunter#2xyz@127.0.0.1:1/0", "amqp://guest:hunter#2xyz@127.0.0.1:1/", "nats://u:hunter#2xyz@127.0.0.1:1",
     "redis://127.0.0.1:1/0?prefix=hunter#2xyz", "nats://127.0.0.1:1?prefix=hunter#2xyz", "memory://hunter#2xyz",
     "redis://:hunter/2xyz@127.0.0.1:1/0", "amqp://guest:hunter/2xyz@127.0.0.1:1/", "nats://u:hunter/2xyz@127.0.0.1:1",
     "redis://:hunter?2xyz@127.0.0.1:1/0", "amqp://guest:hunter?2xyz@127.0.0.1:1/", "nats://u:hunter?2xyz@127.0.0.1:1",
     "nats://u:hunter2xyz@a:4222,,b:4222"],
    ids=["redis-hash", "amqp-hash", "nats-hash", "redis-prefix", "nats-prefix", "memory",
         "redis-slash", "amqp-slash", "nats-slash", "redis-question", "amqp-question", "nats-question",
         "nats-no-host"],
)
def test_a_broker_url_read_wrong_as_written_is_refused_without_quoting_it(url: str) -> None:
    """A ``#`` starts a fragment no broker reads: ``?prefix=a#b`` was the bus ``a``. A ``#``, ``/``
    or ``?`` in a password ends the host part early: the port error (or an unknown parameter
    ``2xyz@127.0.0.1``) quoted part of the password, in a URL ``redact`` cannot read (NATS quoted
    all of it), and so did NATS's message about a server without a host."""
    result = cli("dlq", "list", "--broker", url)
    assert result.returncode == 2, result.stderr
    assert "error: broker URL: " in result.stderr, result.stderr
    assert "hunter" not in result.stderr and "2xyz" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("sqlite:///{tmp}/bus.db?lease=", "lease must be a number of seconds"),
        ("sqlite:///{tmp}/bus.db?busy_timeout=", "busy_timeout must be a number of seconds"),
        ("sqlite:///{tmp}/bus.db?synchronus=", "unknown parameter(s) synchronus (did you mean synchronous?)"),
        ("memory://?lease=", "lease='' is not a number of seconds"),
        ("redis://127.0.0.1:1/0?lease=", "lease='' is not a number of seconds"),
        ("nats://127.0.0.1:1?lease=", "lease='' is not a number of seconds"),
        ("amqp://guest:guest@127.0.0.1:1/?lease=", "lease='' is not a number of seconds"),
    ],
    ids=["sqlite", "sqlite-busy-timeout", "sqlite-typo", "memory", "redis", "nats", "amqp"],
)
def test_an_empty_url_parameter_is_refused_naming_it(tmp_path: Path, url: str, needle: str) -> None:
    """``?lease=`` was read as no lease at all (the default 30 s, whatever was meant), and on
    sqlite:// a mistyped parameter with no value passed unnoticed."""
    result = cli("publish", "a.b", "--broker", url.format(tmp=tmp_path))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "bus.db").exists()



def test_dlq_replay_names_letters_another_command_took_between_its_look_up_and_its_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge (another connection, as another process has) taking a letter after ``dlq replay``
    looked it up and before it replayed it: "replayed 1" and exit 0 read as both done; the
    shortfall is an error (exit 2), after the replay of the other."""
    from typer.testing import CliRunner

    from choreograph.cli import _dlq
    from choreograph.errors import ConfigurationError

    url = f"sqlite:///{tmp_path}/bus.db"
    first, second = seed_dead_letters(url)

    async def racing_bus(bus_url: str, action: Any) -> Any:
        async with open_transport(bus_url) as bus, open_transport(bus_url) as other:
            replay = bus.replay

            async def purged_first(group: str, ids: Any = None) -> int:
                assert await other.purge(group, [first]) == 1  # lands between the look-up and the replay
                return await replay(group, ids)

            bus.replay = purged_first  # type: ignore[method-assign]
            return await action(bus)

    monkeypatch.setattr(_dlq, "_with_bus", racing_bus)
    result = CliRunner().invoke(_dlq.app, ["replay", first, second, "--group", "payment", "--broker", url])
    assert result.stdout.endswith("replayed 1 dead letter(s) to payment\n")
    assert isinstance(result.exception, ConfigurationError), result.stdout
    assert "1 dead letter(s) of 'payment' found were gone when replayed" in str(result.exception)
    assert json.loads(cli("dlq", "list", "--broker", url, "--json").stdout) == []
