"""RabbitMQ on a private node (its own name, ports and data): restartable.

The shared broker (``brokers/amqp.py``) must never be restarted, so the restart clauses
run here, against a node this module starts on free loopback ports for the test
session and kills at exit. Every other clause runs here too, which is cheap.
"""

from __future__ import annotations

import asyncio
import atexit
from urllib.parse import urlencode

from tests._rabbitmq_server import RabbitNode, require_binary
from tests.conformance.brokers import amqp as shared

NAME = "amqp-private"

_node: RabbitNode | None = None


def _running() -> RabbitNode:
    global _node
    if _node is None:
        _node = RabbitNode.start_new()
        atexit.register(_node.destroy)
    return _node


def require() -> None:
    require_binary()


def url(unique: str, *, lease: float) -> str:
    query = urlencode([("lease", repr(lease)), ("prefix", f"choreograph-test-{unique}")])
    return f"{_running().url}?{query}"


async def cleanup(url: str) -> None:
    await shared.cleanup(url)


async def restart(url: str) -> None:
    """SIGKILL the node and start it again on the same ports and data directory."""
    await asyncio.to_thread(_running().restart)
