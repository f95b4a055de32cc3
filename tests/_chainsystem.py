"""Worker processes of :mod:`tests._chainapp` on a real broker, for the multi-process tests.

Each worker is a ``python -m choreograph run tests._chainapp:<hop>`` process; replicas
of one hop share an inbox file (that is what makes a redelivery to another replica a
duplicate rather than a second run).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from choreograph import Publisher
from choreograph.errors import TransportError
from choreograph.transports import open_transport
from tests import _chainapp
from tests._chainapp import Order

ROOT = Path(__file__).resolve().parents[1]
HOPS = ("hop1", "hop2", "hop3")


def wait_for(
    predicate: Callable[[], bool], timeout: float, message: str | Callable[[], str] = "timed out"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(message() if callable(message) else message)


class ChainSystem:
    """The chain's worker processes on ``url``, their logs, inboxes and the effects file."""

    def __init__(self, tmp: Path, url: str, *, concurrency: int = 16, drain_timeout: float = 5.0) -> None:
        self.tmp = tmp
        self.url = url
        self.concurrency = concurrency
        self.drain_timeout = drain_timeout
        self.db = str(tmp / "chain.db")
        _chainapp.setup(self.db)
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._running = 0  # procs[:_running] were seen running

    def spawn(self, hop: str, url: str | None = None) -> subprocess.Popen[bytes]:
        """Start a replica of ``hop`` on ``url`` (default: the system's; see :meth:`wait_running`)."""
        log = self.tmp / f"{hop}-{len(self.procs)}.log"
        env = {**os.environ, "CHAINAPP_DB": self.db, "PYTHONPATH": str(ROOT)}
        cmd = [
            sys.executable,
            "-m",
            "choreograph",
            "run",
            f"tests._chainapp:{hop}",
            "--broker",
            url or self.url,
            "--concurrency",
            str(self.concurrency),
            "--drain-timeout",
            str(self.drain_timeout),
            "--store",
            f"sqlite:///{self.tmp}/{hop}-inbox.db",
            "--log-level",
            "WARNING",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        return proc

    def wait_running(self, timeout: float = 60) -> None:
        """Until every process spawned since the last call says it is running (its group is registered)."""
        for proc, log in self.procs[self._running :]:

            def up(proc: subprocess.Popen[bytes] = proc, log: Path = log) -> bool:
                return "running" in log.read_text() or proc.poll() is not None

            wait_for(up, timeout, f"{log.name} did not start within {timeout} s")
            assert proc.poll() is None, f"{log.name} exited: {log.read_text()}"
        self._running = len(self.procs)

    def start(self, replicas: int = 1) -> None:
        """``replicas`` processes of every hop, running."""
        for _ in range(replicas):
            for hop in HOPS:
                self.spawn(hop)
        self.wait_running()

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        db = sqlite3.connect(self.db, timeout=30)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def delivered(self) -> int:
        """How many orders reached the end of the chain."""
        return int(self.query("SELECT count(*) FROM effects WHERE hop = 'hop3'")[0][0])

    def runs_per_event(self) -> dict[tuple[str, str], int]:
        rows = self.query("SELECT hop, event_id, count(*) FROM runs GROUP BY hop, event_id")
        return {(hop, event_id): count for hop, event_id, count in rows}

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in self.procs)

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


async def publish(publisher: Publisher, orders: Sequence[Order], *, give_up_after: float = 30.0) -> None:
    """Publish ``orders`` with ids ``order-<n>``, retrying through broker outages (same ids:
    the broker's dedupe window or the consumers' inboxes absorb a batch sent twice)."""
    deadline = time.monotonic() + give_up_after
    ids = [f"order-{order.n}" for order in orders]
    while True:
        try:
            await publisher.publish(*orders, ids=ids)
            return
        except TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def publish_all(url: str, orders: Sequence[Order]) -> None:
    """Open the bus at ``url`` and :func:`publish` ``orders`` there."""
    async with open_transport(url) as bus:
        await publish(Publisher(bus, source="/tests"), orders)
