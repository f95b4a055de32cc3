"""Drone Delivery with its last step in Node.js: ``python -m examples.polyglot.demo``.

Processes (each its own OS process, one SQLite bus in ``var/polyglot_demo/``):

* ``choreograph run examples.drone_delivery.app:app -s package -s drone-scheduler``:
  the Python services;
* ``node examples/polyglot/delivery_service.mjs``: the Delivery step, answering 503
  to the first attempt of every delivery (``FAIL_FIRST=1``) so retries show;
* ``choreograph push --config examples/polyglot/push.toml``: the ambassador that
  feeds ``drone.drone.assigned`` to Node and publishes its answers.

The demo publishes delivery requests (a few too heavy for any drone, which are
cancelled by the Package service's compensation), waits for every transaction to
reach ``drone.delivery.scheduled`` or ``drone.delivery.cancelled``, prints a summary
and stops everything with SIGTERM. Logs: ``var/polyglot_demo/*.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from choreograph import Publisher, decode
from choreograph.push import generate_secret
from choreograph.transports import open_transport
from examples.drone_delivery.events import DeliveryRequested

HERE = Path(__file__).resolve().parent
TERMINAL = ["drone.delivery.scheduled", "drone.delivery.cancelled"]
PLACES = ["Harbour", "Old Town", "Station", "Campus", "Airport", "Market"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Child processes with their output in ``<dir>/<name>.log``; stopped with SIGTERM."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Path:
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        self.children.append((name, proc))
        return log

    def wait_for(self, log: Path, text: str, timeout: float = 30.0) -> str:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            content = log.read_text(errors="replace")
            if text in content:
                return content
            if any(proc.poll() is not None for _, proc in self.children):
                break
            time.sleep(0.1)
        raise RuntimeError(f"{text!r} did not appear in {log}:\n{log.read_text(errors='replace')}")

    def stop(self) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.children:
            try:
                code = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            print(f"  {name}: exited {code}")


async def run_transactions(broker: str, count: int, wait_s: float) -> dict[str, str]:
    """Publish ``count`` requests (+2 too heavy); return delivery id → terminal event type."""
    requests = [
        DeliveryRequested(
            delivery_id=f"dlv-{i:03d}",
            package_id=f"pkg-{i:03d}",
            weight_kg=1.0 + i % 8,
            pickup=PLACES[i % len(PLACES)],
            dropoff=PLACES[(i + 2) % len(PLACES)],
            owner="demo",
        )
        for i in range(count)
    ] + [
        DeliveryRequested(
            delivery_id=f"dlv-huge-{i}",
            package_id=f"pkg-huge-{i}",
            weight_kg=45.0,
            pickup="Docks",
            dropoff="Mill",
            owner="demo",
        )
        for i in range(2)
    ]
    outcome: dict[str, str] = {}
    async with open_transport(broker) as bus:
        observer = await bus.subscribe("polyglot-demo-observer", TERMINAL)
        await Publisher(bus, source="/polyglot/demo").publish(*requests)
        give_up = time.monotonic() + wait_s
        while len(outcome) < len(requests) and time.monotonic() < give_up:
            deliveries = await observer.fetch(100, timeout=0.5)
            for delivery in deliveries:
                envelope = decode(delivery.message.body)
                outcome[envelope.data["delivery_id"]] = envelope.type
            await observer.ack_many(deliveries)
        await observer.close()
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="ordinary delivery requests")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every transaction")
    args = parser.parse_args()
    if shutil.which("node") is None:
        sys.exit("node is not installed (Node.js >= 20.15 runs the Delivery service)")

    directory = Path("var/polyglot_demo").resolve()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    broker = f"sqlite:///{directory / 'bus.db'}"
    secret = generate_secret()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    common = {"CHOREOGRAPH_BROKER": broker, "CHOREOGRAPH_DATA_DIR": str(directory), "PYTHONUNBUFFERED": "1"}

    procs = Processes(directory)
    try:
        node_log = procs.start(
            "delivery-node",
            ["node", str(HERE / "delivery_service.mjs")],
            {
                "PORT": str(port),
                "WEBHOOK_SECRET": secret,
                "STORE_PATH": str(directory / "deliveries.json"),
                "FAIL_FIRST": "1",
            },
        )
        procs.wait_for(node_log, "listening on")
        services_log = procs.start(
            "services",
            [
                sys.executable,
                "-m",
                "choreograph",
                "run",
                "examples.drone_delivery.app:app",
                "-s",
                "package",
                "-s",
                "drone-scheduler",
            ],
            common,
        )
        push_log = procs.start(
            "push",
            [sys.executable, "-m", "choreograph", "push", "--config", str(HERE / "push.toml")],
            {**common, "DELIVERY_NODE_URL": url, "DELIVERY_WEBHOOK_SECRET": secret},
        )
        procs.wait_for(services_log, "running")
        procs.wait_for(push_log, "running on")
        print(f"services, push ambassador and Node.js Delivery running on {broker}")
        started = time.monotonic()
        outcome = asyncio.run(run_transactions(broker, args.count, args.timeout))
        elapsed = time.monotonic() - started
    finally:
        print("stopping:")
        procs.stop()
    scheduled = sum(1 for t in outcome.values() if t == TERMINAL[0])
    cancelled = sum(1 for t in outcome.values() if t == TERMINAL[1])
    print(
        f"{len(outcome)} of {args.count + 2} transactions finished in {elapsed:.1f}s: "
        f"{scheduled} scheduled by Node.js, {cancelled} cancelled (too heavy, compensated by Package)"
    )
    print(f"Node's store: {directory / 'deliveries.json'}; logs: {directory}/*.log")
    if len(outcome) != args.count + 2:
        sys.exit(1)


if __name__ == "__main__":
    main()
