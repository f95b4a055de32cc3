"""A private RabbitMQ node for tests that must stop and start a broker (never the shared one).

Runs the distribution's ``rabbitmq-server`` as its own Erlang node (own node name,
AMQP port, distribution port, data directory, config and cookie) on free loopback
ports, so killing it never touches the shared broker on 5672::

    node = RabbitNode.start_new()   # management=True: also the HTTP API, node.management_url
    ...node.url...
    node.kill(); node.start()   # same ports, same data
    node.destroy()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

#: ``dead_letter_worker_publisher_confirm_timeout`` of a private node (see ``RabbitNode``).
DLX_RESEND_MS = 2000
#: ``collect_statistics_interval`` of a private node with the management plugin: how stale its
#: queue counts may be.
STATS_INTERVAL_MS = 500
#: ``quorum_tick_interval`` of a node with the management plugin (see ``RabbitNode``).
QUORUM_TICK_MS = 1000

_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/lib/rabbitmq/sbin/rabbitmq-server")


def binary() -> str | None:
    """The real rabbitmq-server script (not Debian's wrapper, which switches user), or None."""
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def require_binary() -> str:
    """The script, or skip (fail under CI=true) with how to get it."""
    path = binary()
    if path is None:
        message = "rabbitmq-server not found; apt-get install rabbitmq-server"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RabbitNode:
    """One private RabbitMQ node; ``start``/``kill`` keep its ports and data."""

    def __init__(self, path: str, port: int, dist_port: int, home: str, management_port: int | None = None) -> None:
        self.path = path
        self.port = port
        self.dist_port = dist_port
        self.home = home
        self.management_port = management_port
        self.process: subprocess.Popen[bytes] | None = None
        with open(os.path.join(home, "rabbitmq.conf"), "w") as conf:
            conf.write(f"listeners.tcp.local = 127.0.0.1:{port}\n")
            if management_port is not None:
                # Queue counts in the HTTP API are sampled at this interval (default 5 s).
                conf.write(f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management_port}\n"
                           f"collect_statistics_interval = {STATS_INTERVAL_MS}\n")
        # A quorum queue's at-least-once dead-letter worker can start, after a crash, before the
        # vhost's exchanges are recovered: what it holds then (a retry copy in transit from its
        # retry queue back to the group at the kill) waits this long before it is sent again -
        # 180 s by default on 3.10, longer than a restart test or a chaos run waits.
        # With the management plugin, a quorum queue's counts reach the HTTP API at its tick
        # (5 s by default), sampled every STATS_INTERVAL_MS: a 1 s tick keeps them near to date.
        tick = f", {{quorum_tick_interval, {QUORUM_TICK_MS}}}" if management_port is not None else ""
        advanced = f"[{{rabbit, [{{dead_letter_worker_publisher_confirm_timeout, {DLX_RESEND_MS}}}{tick}]}}].\n"
        for name, text in (
            ("rabbitmq-env.conf", ""),
            ("enabled_plugins", "[rabbitmq_management].\n" if management_port is not None else "[].\n"),
            ("advanced.config", advanced),
        ):
            with open(os.path.join(home, name), "w") as file:
                file.write(text)

    @classmethod
    def start_new(cls, *, management: bool = False) -> RabbitNode:
        """A node on free ports; ``management``: with the management plugin's HTTP API too."""
        node = cls(
            require_binary(), _free_port(), _free_port(), tempfile.mkdtemp(prefix="choreograph-rabbit-"),
            _free_port() if management else None,
        )
        node.start()
        return node

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str | None:
        """The HTTP API's base URL (guest's credentials in it), or None without the plugin."""
        if self.management_port is None:
            return None
        return f"http://guest:guest@127.0.0.1:{self.management_port}/api"

    def _env(self) -> dict[str, str]:
        home = self.home
        return {
            **os.environ,
            "HOME": home,  # its own Erlang cookie
            "RABBITMQ_NODENAME": f"choreograph-test-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": os.path.join(home, "rabbitmq"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(home, "rabbitmq-env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(home, "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(home, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.join(home, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(home, "log"),
            "RABBITMQ_PID_FILE": os.path.join(home, "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and return once it accepts AMQP connections (it opens the port last)."""
        assert self.process is None, "already running"
        log = open(os.path.join(self.home, "server.log"), "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [self.path], env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"rabbitmq-server exited with {code}; see {self.home}/server.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"rabbitmq-server did not open port {self.port} within {timeout} s"
                    ) from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the node's whole process group: data confirmed so far must survive it."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.process = None
            # the listening socket goes with the process; wait until the port is really free
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        time.sleep(0.05)
                except OSError:
                    return

    def restart(self) -> None:
        self.kill()
        self.start()

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.home, ignore_errors=True)
