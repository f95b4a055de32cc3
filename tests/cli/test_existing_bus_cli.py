"""``dlq`` and ``groups`` on a broker: they look at a bus that exists, and create none.

A mistyped prefix on NATS or RabbitMQ listed "dead letters (0)" and left new streams, or
an exchange and queues, on the server. Each test has a prefix of its own on the shared
servers (tests/_brokers.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from choreograph.transports import open_transport
from tests._brokers import require_broker
from tests.cli.test_core_cli import cli
from tests.conformance.brokers import amqp as amqp_broker
from tests.conformance.brokers import nats as nats_broker
from tests.conformance.brokers import redis as redis_broker

COMMANDS = [["dlq", "list"], ["dlq", "show", "some-id", "--group", "payment"], ["dlq", "replay", "--group", "payment"],
            ["dlq", "purge", "--group", "payment", "--all"], ["groups", "list"],
            ["groups", "unbind", "payment", "chain.order.placed"]]
IDS = ["dlq-list", "dlq-show", "dlq-replay", "dlq-purge", "groups-list", "groups-unbind"]


def bus_url(broker: str) -> str:
    """A bus of a prefix no other test uses, on the shared server of ``broker``."""
    base = require_broker(broker)
    return f"{base}{'&' if '?' in base else '?'}prefix=choreograph-test-{uuid.uuid4().hex[:12]}"


async def nats_streams(url: str) -> list[str]:
    """Which of the bus's streams (events, dead letters, deferral counts) the server has."""
    import nats

    from choreograph.transports.nats import NatsTransport

    transport = NatsTransport(url)
    client = await nats.connect(transport._servers, max_reconnect_attempts=1, connect_timeout=2)
    try:
        found = []
        for stream in transport.streams:
            reply = json.loads((await client.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)).data)
            if "error" not in reply:
                found.append(stream)
            elif reply["error"].get("err_code") != 10059:  # 10059: no such stream
                raise AssertionError(f"stream info of {stream}: {reply['error']}")
        return found
    finally:
        await client.close()


async def amqp_names(url: str) -> list[str]:
    """Which of the bus's exchange and queues (registry, the payment group's) the broker has,
    each declared passively on a channel of its own (a failed passive declare closes it)."""
    import aio_pika
    import aiormq.exceptions

    from choreograph.transports.amqp import AmqpTransport

    names = AmqpTransport(url).names
    connection = await aio_pika.connect(AmqpTransport(url)._client_url)
    found = []
    try:
        for kind, name in [("exchange", names.exchange), ("queue", names.registry),
                           ("queue", names.group("payment")), ("queue", names.dlq("payment"))]:
            channel = await connection.channel()
            try:
                if kind == "exchange":
                    await channel.declare_exchange(name, passive=True)
                else:
                    await channel.declare_queue(name, passive=True)
                found.append(name)
            except aiormq.exceptions.ChannelNotFoundEntity:
                pass
    finally:
        await connection.close()
    return found


async def redis_keys(url: str) -> list[str]:
    """Every key of the bus's prefix."""
    import redis.asyncio as aioredis

    from choreograph.transports.redis import RedisTransport

    transport = RedisTransport(url)
    client = aioredis.Redis.from_url(transport._client_url)
    try:
        return [key.decode() async for key in client.scan_iter(match=f"{transport.prefix}:*")]
    finally:
        await client.aclose()


ON_THE_BROKER: dict[str, Callable[[str], Awaitable[list[str]]]] = {"nats": nats_streams, "amqp": amqp_names}
CLEANUP = {"nats": nats_broker.cleanup, "amqp": amqp_broker.cleanup}
WHAT = {"nats": "no NATS bus with prefix {prefix!r} at broker URL {url!r} (no stream {prefix}_EVENTS there)",
        "amqp": "no RabbitMQ bus with prefix {prefix!r} at broker URL {url!r} (no exchange {prefix}.events there)"}


@pytest.mark.parametrize("broker", ["nats", "amqp"])
@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_a_command_on_a_bus_the_broker_does_not_have_is_an_error_and_creates_nothing(
    broker: str, command: list[str]
) -> None:
    url = bus_url(broker)
    prefix = url.rpartition("prefix=")[2]
    shown = url.replace("guest:guest@", "guest:***@")  # the password masked, as every CLI error does
    try:
        result = cli(*command, "--broker", url)
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert result.stderr == "error: " + WHAT[broker].format(prefix=prefix, url=shown) + "\n"
        assert asyncio.run(ON_THE_BROKER[broker](url)) == []
    finally:
        asyncio.run(CLEANUP[broker](url))


@pytest.mark.parametrize("broker", ["nats", "amqp"])
def test_dlq_and_groups_still_read_a_bus_the_broker_has(broker: str) -> None:
    url = bus_url(broker)

    async def subscribe() -> None:
        async with open_transport(url) as bus:
            await (await bus.subscribe("payment", ["chain.order.placed"])).close()

    try:
        asyncio.run(subscribe())
        listed = cli("dlq", "list", "--json", "--broker", url)
        assert (listed.returncode, json.loads(listed.stdout), listed.stderr) == (0, [], "")
        groups = cli("groups", "list", "--json", "--broker", url)
        assert (groups.returncode, groups.stderr) == (0, "")
        assert json.loads(groups.stdout) == [{"group": "payment", "types": ["chain.order.placed"]}]
    finally:
        asyncio.run(CLEANUP[broker](url))


def test_on_redis_a_bus_of_an_unknown_prefix_reads_as_empty_and_nothing_is_created() -> None:
    """Redis creates a bus's keys on its first write, and these commands only read (or find no
    group to write to): a mistyped prefix lists nothing, and leaves nothing behind."""
    url = bus_url("redis")
    try:
        for command in COMMANDS:
            result = cli(*command, "--broker", url)
            expected = 0 if command[1] == "list" else 2  # the others name a group or dead letter it has not
            assert result.returncode == expected and "Traceback" not in result.stderr, (command, result.stderr)
        assert asyncio.run(redis_keys(url)) == []
    finally:
        asyncio.run(redis_broker.cleanup(url))


@pytest.mark.parametrize("command", [["dlq", "list"], ["groups", "list"], ["dlq", "purge", "--group", "g", "--all"]])
def test_a_sqlite_file_that_is_no_bus_is_named_as_such_and_left_unwritten(tmp_path: Path, command: list[str]) -> None:
    """Connecting created the bus's tables: in an empty file, or in the application's own
    database given by mistake, `dlq list` wrote a bus and listed no dead letters."""
    import contextlib
    import sqlite3

    empty = tmp_path / "empty.db"
    empty.touch()
    app_db = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(app_db)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
        db.commit()
    folder = tmp_path / "folder"
    folder.mkdir()
    for path, reason in ((empty, "an empty file, not a SQLite bus"), (app_db, "not a choreograph bus"),
                         (folder, "a folder, not a SQLite bus")):
        result = cli(*command, "--broker", f"sqlite:///{path}")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {path}: {reason}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert empty.stat().st_size == 0
    with contextlib.closing(sqlite3.connect(app_db)) as db:
        assert [row[0] for row in db.execute("SELECT name FROM sqlite_master")] == ["invoices"]
