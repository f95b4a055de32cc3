"""A ``rediss://`` URL pointed at a plain Redis port fails at once, saying so; nothing else does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import pytest

from choreograph._redact import redact
from choreograph.cli._connect import unreachable
from choreograph.errors import TransportError
from choreograph.transports import _redis_tls
from choreograph.transports.redis import RedisTransport
from tests._brokers import require_broker
from tests._nats_server import free_port


def as_tls(url: str) -> str:
    """``url``, a plain Redis's, with the TLS scheme: the mistake under test."""
    return "rediss" + url[url.index("://"):]


async def test_tls_to_a_plain_redis_port_fails_within_seconds_naming_the_url_and_why() -> None:
    """A plain Redis holds a TLS handshake without answering: redis-py timed it out five times
    (26 s) as a slow server, and --connect-timeout tried again (55 s in all) before saying
    "Timeout connecting to server". The port answers a plain-text PING: it is not a TLS port."""
    url = as_tls(require_broker("redis"))
    transport = RedisTransport(url)
    began = time.monotonic()
    with pytest.raises(TransportError) as raised:
        await transport.connect()
    assert time.monotonic() - began < _redis_tls.PROBE_AFTER + _redis_tls.PROBE_TIMEOUT
    assert str(raised.value) == (
        f"redis connect failed: {redact(url)} did not complete a TLS handshake, but the port answers "
        "plain-text Redis: it is not a TLS port; use redis:// for it, or the server's tls-port")
    assert not unreachable(raised.value)  # not tried again by --connect-timeout
    await transport.close()


@pytest.fixture
async def listener() -> AsyncIterator[Callable[[Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                          Awaitable[None]]], Awaitable[int]]]:
    """Start a loopback server answering connections with a handler; yields its port."""
    servers: list[asyncio.Server] = []

    async def start(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> int:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_only_a_resp_answer_to_a_plain_ping_says_the_port_speaks_plain_redis(
    listener: Callable[[Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]], Awaitable[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a TLS port (an alert, or closing), a silent port or nothing listening answers proves
    nothing: the connect goes on as before (a slow TLS server is still waited for)."""
    monkeypatch.setattr(_redis_tls, "PROBE_TIMEOUT", 0.3)
    hold = asyncio.Event()

    def answering(reply: bytes | None) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            if reply is None:
                await hold.wait()  # silent
            else:
                writer.write(reply)
                await writer.drain()
            writer.close()

        return handle

    plain = urlsplit(require_broker("redis"))
    assert await _redis_tls.speaks_plain_redis(plain.hostname or "127.0.0.1", plain.port or 6379)
    assert await _redis_tls.speaks_plain_redis("127.0.0.1", await listener(answering(b"-NOAUTH Authentication "
                                                                                      b"required.\r\n")))
    for reply in (b"\x15\x03\x01\x00\x02\x02\x46", b"", None, b"+PONG"):  # a TLS alert, closed, silent, no CRLF
        assert not await _redis_tls.speaks_plain_redis("127.0.0.1", await listener(answering(reply))), reply
    hold.set()
    assert not await _redis_tls.speaks_plain_redis("127.0.0.1", free_port())  # nothing listens
