"""Redis Streams for the conformance suite: each test gets its own key prefix.

The restart clauses need a server this module may kill, and the shared one must never be
restarted. So when ``redis-server`` is on PATH and ``CHOREOGRAPH_REDIS_URL`` is not set,
the suite runs against a private server started on a free port for this test session
(append-only file on, in a temporary directory), killed with SIGKILL by ``restart`` and
started again on the same port and directory. Otherwise it uses the shared server (from
the environment or the local default), and ``restart`` is unavailable there.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from tests._brokers import broker_url, require_broker

NAME = "redis"


class _PrivateServer:
    """A redis-server of our own: AOF on and fsynced per write, no RDB snapshots, loopback only.

    ``appendfsync always``: with the default ``everysec`` Redis may hold back the AOF write
    itself for up to 2 s while a slow fsync runs, and a kill then loses acknowledged writes
    (a run of the conformance suite here lost both messages of the restart test that way).
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="choreograph-redis-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")  # not "-LOADING": the data is back
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a crash, not a shutdown: only what the AOF holds survives
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


_server: _PrivateServer | None = None


def _private() -> _PrivateServer | None:
    """The session's private server (started on first use), or ``None`` to use the shared one."""
    global _server
    if os.environ.get("CHOREOGRAPH_REDIS_URL") or shutil.which("redis-server") is None:
        return None
    if _server is None:
        server = _PrivateServer()
        server.start()
        atexit.register(server.stop)
        deadline = time.monotonic() + 10
        while not server.answers():
            if time.monotonic() > deadline:
                pytest.fail("the private redis-server for the conformance suite did not start")
            time.sleep(0.02)
        _server = server
    return _server


def require() -> None:
    if _private() is None:
        require_broker("redis")


def url(unique: str, *, lease: float) -> str:
    """A fresh, isolated bus: every key starts with a prefix holding ``unique``."""
    server = _private()
    parts = urlsplit(server.url if server is not None else broker_url("redis"))
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("lease", "prefix")]
    query += [("lease", repr(lease)), ("prefix", f"choreograph-test-{unique}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def cleanup(url: str) -> None:
    """Delete every key of the bus at ``url``."""
    import redis.asyncio as aioredis

    from choreograph.transports.redis import RedisTransport

    transport = RedisTransport(url)  # parses the URL: the client URL without our parameters, the prefix
    client = aioredis.Redis.from_url(transport._client_url)
    try:
        keys = [key async for key in client.scan_iter(match=_glob_escape(transport.prefix) + ":*", count=500)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def restart(url: str) -> None:
    """Kill the private server behind ``url`` and start it again on the same port and data."""
    server = _private()
    if server is None or urlsplit(url).port != server.port:
        pytest.fail(
            f"redis restart needs the private server (redis-server on PATH, no CHOREOGRAPH_REDIS_URL): {url}"
        )
    server.kill()
    server.start()
    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(server.answers):
        if time.monotonic() > deadline:
            pytest.fail("the private redis-server did not come back")
        await asyncio.sleep(0.05)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
