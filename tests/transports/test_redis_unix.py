"""``unix://`` Redis URLs (redis-py's socket URL) through ``open_transport`` and the CLI, on a
private redis-server listening on a unix socket (the shared one has none)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from choreograph.telemetry import messaging_system
from choreograph.transports import Message, open_transport
from choreograph.transports.redis import RedisTransport
from tests.cli.test_core_cli import cli


def _answers(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(path)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def socket_path() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH; apt-get install redis-server")
    folder = tempfile.mkdtemp(prefix="cg-rs-")  # short: a socket path has at most 107 bytes
    path = f"{folder}/r.sock"
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no", "--dir", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _answers(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the private redis-server on a unix socket did not start")
            time.sleep(0.05)
        yield path
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_open_transport_takes_a_unix_socket_url_and_carries_messages(socket_path: str) -> None:
    """The CHANGELOG said ``unix://`` Redis URLs work; ``open_transport`` refused the scheme."""
    url = f"unix://{socket_path}?db=1&prefix=unix-{uuid.uuid4().hex[:8]}&lease=5"
    transport = open_transport(url)
    assert isinstance(transport, RedisTransport)
    assert messaging_system(url) == "redis"

    async def round_trip() -> list[bytes]:
        async with transport as bus:
            sub = await bus.subscribe("billing", ["order.placed"])
            await bus.publish([Message(id="m1", type="order.placed", body=b'{"n": 1}')])
            got = await sub.fetch(10, timeout=5.0)
            for delivery in got:
                await delivery.ack()
            await sub.close()
            return [delivery.message.body for delivery in got]

    assert asyncio.run(round_trip()) == [b'{"n": 1}']


def test_the_cli_takes_a_unix_socket_broker_url(socket_path: str, tmp_path: Path) -> None:
    url = f"unix://{socket_path}?prefix=unix-{uuid.uuid4().hex[:8]}"

    async def subscribe() -> None:
        async with open_transport(url) as bus:
            await bus.subscribe("billing", ["order.placed"])

    asyncio.run(subscribe())
    result = cli("groups", "list", "--json", "--broker", url)
    assert result.returncode == 0, result.stderr
    assert '"billing"' in result.stdout
