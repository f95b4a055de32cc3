"""The Drone Delivery system under test: ``choreograph dev`` in a child process, driven over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from choreograph.transports import open_transport

APP = "examples.drone_delivery.app:app"
FINAL = ("completed", "failed", "compensated")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def delivery(weight_kg: float = 2.0, **fields: Any) -> dict[str, Any]:
    n = uuid.uuid4().hex[:10]
    body = {
        "delivery_id": f"dlv-{n}",
        "package_id": f"pkg-{n}",
        "weight_kg": weight_kg,
        "pickup": "Harbour",
        "dropoff": "Campus",
    }
    return body | fields


class DevSystem:
    """``choreograph dev`` of ``app`` (Drone Delivery unless given) on a SQLite bus in ``data_dir`` (short lease, so a
    killed process's work returns fast)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        faults: dict[str, Any] | None = None,
        fleet: str | None = None,
        lease: float = 2.0,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        app: str = APP,
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.broker = f"sqlite:///{data_dir / 'bus.db'}?lease={lease:g}"
        environ = {**os.environ, "CHOREOGRAPH_FAULTS": json.dumps(faults or {}), "PYTHONUNBUFFERED": "1"}
        environ.pop("CHOREOGRAPH_BROKER", None)
        environ.pop("CHOREOGRAPH_JOURNAL", None)
        if fleet:
            environ["DRONE_FLEET"] = fleet
        environ.update(env or {})
        argv = [
            sys.executable,
            "-m",
            "choreograph",
            "dev",
            app,
            "--data-dir",
            str(data_dir),
            "--broker",
            self.broker,
            "--port",
            str(self.port),
            "--stop-timeout",
            "10",
            *(args or []),
        ]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10.0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Wait until ``count`` output lines match ``pattern`` (a regex); returns them."""
        regex = re.compile(pattern)
        give_up = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found
                if time.monotonic() > give_up or (
                    self.proc.poll() is not None and not self._reader.is_alive()
                ):
                    raise AssertionError(
                        f"no {count} line(s) matching {pattern!r}; output:\n" + "\n".join(self.lines)
                    )
                self._changed.wait(0.2)

    def start(self) -> DevSystem:
        self.wait_for_line(r"^dev\s+\| ready:")
        return self

    def pids(self) -> dict[str, int]:
        """The latest pid of every process ``choreograph dev`` started."""
        pids = {}
        for line in self.wait_for_line(r"started \S+ \(pid \d+\)"):
            match = re.search(r"started (\S+) \(pid (\d+)\)", line)
            assert match is not None
            pids[match.group(1)] = int(match.group(2))
        return pids

    def request(self, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.http.post("/deliveries", json=body, headers=headers)

    def submit(self, body: dict[str, Any]) -> str:
        response = self.request(body)
        assert response.status_code == 202, response.text
        return str(response.json()["correlation_id"])

    def wait_final(self, correlation_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the journal until the transaction is completed, failed or compensated."""
        give_up = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < give_up:
            response = self.http.get(f"/transactions/{correlation_id}")
            if response.status_code == 200:
                last = response.json()
                if last["status"] in FINAL:
                    return dict(last)
            time.sleep(0.1)
        raise AssertionError(f"transaction {correlation_id} not final after {timeout}s: {last}\n{self.log}")

    def query(self, store: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows from a service's own SQLite store (read-only: the test never creates or changes it)."""
        conn = sqlite3.connect(f"file:{self.data_dir / f'{store}.db'}?mode=ro", uri=True, timeout=10.0)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def dead_letters(self, group: str) -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            async with open_transport(self.broker) as bus:
                return [dict(letter.record) for letter in await bus.dead_letters(group, 1000)]

        return asyncio.run(read())

    def stop(self, timeout: float = 30.0) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                for pid in self._child_pids():
                    _kill(pid)
                raise
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def _child_pids(self) -> list[int]:
        return [int(m) for m in re.findall(r"started \S+ \(pid (\d+)\)", self.log)]


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running either.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
