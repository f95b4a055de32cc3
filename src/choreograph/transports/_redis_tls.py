"""A ``rediss://`` URL pointed at a plain (non-TLS) Redis port: told apart at once.

A plain Redis reads a TLS ClientHello as the start of an inline command and waits for the
rest, so the handshake neither fails nor completes: redis-py times it out (5 s a try, five
tries), which looks like a server too slow to answer, and ``--connect-timeout`` tried again
for the better part of a minute before the one error line said "Timeout connecting to
server". When the first command over TLS has not answered within :data:`PROBE_AFTER`, the
port is asked ``PING`` in plain text: a RESP line back (``+PONG``, ``-NOAUTH ...``) is proof
that it speaks plain Redis, not TLS, and the connect fails then, saying so. A TLS port
answers a plain ``PING`` with an alert or by closing; a port that answers nothing proves
nothing: the connect goes on as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

from choreograph.errors import TransportError

#: How long the first command over TLS may take before the port is asked in plain text (a TLS
#: handshake takes milliseconds; a slow one only costs a probe).
PROBE_AFTER = 1.0
#: How long the plain-text probe may take, connection and answer.
PROBE_TIMEOUT = 2.0


async def speaks_plain_redis(host: str, port: int) -> bool:
    """Whether the server at ``host:port`` answers a plain-text ``PING`` with a RESP line."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT)
    except (OSError, TimeoutError, ValueError):  # ValueError: a line past the reader's limit
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return reply[:1] in (b"+", b"-") and reply.endswith(b"\r\n")


async def first_ping_over_tls(ping: Awaitable[Any], host: str, port: int, url: str) -> None:
    """Await ``ping``, a client's first command to ``url`` (redacted) over TLS; if it has not
    answered within :data:`PROBE_AFTER` and the port speaks plain Redis, cancel it and raise
    :class:`TransportError` saying so (from nothing: no socket error in its chain makes the
    CLI's ``--connect-timeout`` try it again)."""
    task = asyncio.ensure_future(ping)
    try:
        done, _ = await asyncio.wait({task}, timeout=PROBE_AFTER)
        if not done and await speaks_plain_redis(host, port):
            raise TransportError(
                f"redis connect failed: {url} did not complete a TLS handshake, but the port answers "
                f"plain-text Redis: it is not a TLS port; use redis:// for it, or the server's tls-port"
            ) from None
        await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
