"""``make demo``: the Drone Delivery system end to end, in under a minute.

1. starts the whole system with ``choreograph dev`` (each service its own process, the
   gateway, the journal) on a fresh SQLite bus in ``var/drone_delivery_demo/``, with a
   transient fault rate injected into the Drone Scheduler (so retries happen);
2. sends a batch of delivery requests over HTTP: ordinary ones, a few too heavy for
   any drone (rejected → dead letter → Package compensates), a few heavy ones competing
   for the only three heavy drones (no drone free after the retries → dead letter →
   compensation), an invalid one (``422``) and a client retry with the same
   ``Idempotency-Key`` (answered without publishing twice);
3. shows a progress bar while the transactions finish (polling the journal's
   ``GET /transactions/{id}``), then a summary table (completed / cancelled /
   dead-lettered, throughput, p50/p99 latency) and one transaction's causation tree (``choreograph trace``);
4. stops the system (SIGTERM, then SIGKILL after a grace period).

Run it with ``python -m examples.drone_delivery.demo`` (``--help`` for options). The
system's logs go to ``var/drone_delivery_demo/dev.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from choreograph.transports import open_transport

APP = "examples.drone_delivery.app:app"
FINAL = ("completed", "failed", "compensated")
DEMO_FAULTS = {"drone-scheduler": {"fail_rate": 0.25}}
PLACES = [
    "Harbour",
    "Old Town",
    "Station",
    "Campus",
    "Airport",
    "Market",
    "Hospital",
    "Stadium",
    "Docks",
    "Mill",
]

console = Console(width=None if Console().is_terminal else 120)


def _port_to_ask(preferred: int) -> int:
    """``preferred`` if it is free now, else 0: ``choreograph dev`` then binds a free port itself
    and names it in its ready line (no window for another process to take a port picked here)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


def requests_batch(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` ordinary requests plus the ones that exercise the failure paths."""
    rng = random.Random(seed)

    def request(kind: str, weight: float) -> dict[str, Any]:
        n = uuid.UUID(int=rng.getrandbits(128)).hex[:8]
        pickup, dropoff = rng.sample(PLACES, 2)
        return {
            "delivery_id": f"dlv-{kind}-{n}",
            "package_id": f"pkg-{n}",
            "weight_kg": weight,
            "pickup": pickup,
            "dropoff": dropoff,
            "owner": "demo",
        }

    batch = [request("std", round(rng.uniform(0.5, 9.5), 1)) for _ in range(count)]
    batch += [request("heavy", 16.0) for _ in range(5)]  # three heavy drones for five: two give up
    batch += [request("huge", 45.0) for _ in range(3)]  # no drone carries 45 kg: rejected
    rng.shuffle(batch)
    return batch


class System:
    """``choreograph dev`` in a child process, its output in ``dev.log``."""

    def __init__(self, data_dir: Path, port: int, faults: str) -> None:
        self.data_dir = data_dir
        self.port = port
        self.broker = f"sqlite:///{data_dir / 'bus.db'}"
        # where `choreograph dev` puts it: CHOREOGRAPH_JOURNAL (passed on to dev), else the data dir
        self.journal = os.environ.get("CHOREOGRAPH_JOURNAL") or f"sqlite:///{data_dir / 'journal.db'}"
        self.log_path = data_dir / "dev.log"
        env = {**os.environ, "CHOREOGRAPH_FAULTS": faults, "PYTHONUNBUFFERED": "1"}
        argv = [
            sys.executable,
            "-m",
            "choreograph",
            "dev",
            APP,
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ]
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 40.0) -> None:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(f"choreograph dev exited with {self.proc.returncode}; see {self.log_path}")
            log = self.log_path.read_bytes()
            if b"ready:" in log:
                served = re.search(rb"ready:.*gateway http://127\.0\.0\.1:(\d+)", log)
                if served is None:
                    raise RuntimeError(f"choreograph dev named no gateway port; see {self.log_path}")
                self.port = int(served.group(1))  # the one asked for, or the free one dev bound for 0
                return
            time.sleep(0.1)
        raise RuntimeError(f"the system was not ready after {timeout:g}s; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def send(client: httpx.AsyncClient, batch: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """POST every request (each with its own Idempotency-Key); returns delivery id → correlation id, and notes."""
    notes: list[str] = []
    keys = {body["delivery_id"]: str(uuid.uuid4()) for body in batch}

    async def post(body: dict[str, Any], key: str) -> httpx.Response:
        return await client.post("/deliveries", json=body, headers={"Idempotency-Key": key})

    responses = await asyncio.gather(*(post(body, keys[body["delivery_id"]]) for body in batch))
    accepted = {}
    for body, response in zip(batch, responses, strict=True):
        if response.status_code != 202:
            raise RuntimeError(f"POST /deliveries answered {response.status_code}: {response.text}")
        accepted[body["delivery_id"]] = response.json()["correlation_id"]
    # A client retry with the same key: the first answer again, nothing published twice.
    again = await post(batch[0], keys[batch[0]["delivery_id"]])
    same = again.json().get("correlation_id") == accepted[batch[0]["delivery_id"]]
    notes.append(
        f"retry with the same Idempotency-Key → {again.status_code}, same transaction: {same}, "
        f"Idempotent-Replayed: {again.headers.get('Idempotent-Replayed')}"
    )
    bad = await client.post("/deliveries", json={**batch[0], "weight_kg": -1, "dropoff": ""})
    errors = ", ".join(e.get("path", "?") for e in bad.json().get("errors", []))
    notes.append(f"invalid request → {bad.status_code} ({errors})")
    return accepted, notes


async def watch(client: httpx.AsyncClient, cids: list[str], wait_s: float) -> dict[str, dict[str, Any]]:
    """Poll ``GET /transactions/{id}`` until every transaction is final (or ``wait_s`` passed), with a progress bar."""
    done: dict[str, dict[str, Any]] = {}
    limit = asyncio.Semaphore(16)

    async def poll(cid: str) -> None:
        async with limit:
            response = await client.get(f"/transactions/{cid}")
        if response.status_code == 200 and response.json()["status"] in FINAL:
            done[cid] = response.json()

    columns = (
        TextColumn("[bold]transactions"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    give_up = time.monotonic() + wait_s
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=len(cids))
        while len(done) < len(cids) and time.monotonic() < give_up:
            await asyncio.gather(*(poll(cid) for cid in cids if cid not in done))
            counts = {s: sum(1 for tx in done.values() if tx["status"] == s) for s in FINAL}
            progress.update(
                task, completed=len(done), description=" ".join(f"{s} {n}" for s, n in counts.items() if n)
            )
            await asyncio.sleep(0.25)
    return done


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _latency_ms(tx: dict[str, Any]) -> float:
    terminal = [e for e in tx.get("timeline", []) if e["kind"] in ("completed", "failed")]
    return float(terminal[0]["offset_ms"]) if terminal else float("nan")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


async def dead_letters(broker: str) -> list[dict[str, Any]]:
    async with open_transport(broker) as bus:
        return [dict(letter.record) for letter in await bus.dead_letters(None, 1000)]


def retries(log_path: Path) -> dict[str, int]:
    """Attempts that failed and were retried, per service (the worker logs each one)."""
    counts: dict[str, int] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if "retrying in" in line and " | " in line:
            service = line.split(" | ", 1)[0].strip()
            counts[service] = counts.get(service, 0) + 1
    return counts


def summary(
    done: dict[str, dict[str, Any]],
    pending: int,
    letters: list[dict[str, Any]],
    sent_at: float,
    retried: dict[str, int],
) -> Table:
    completed = [tx for tx in done.values() if tx["status"] == "completed"]
    cancelled = [tx for tx in done.values() if tx["status"] in ("failed", "compensated")]
    ends = [
        _epoch(e["time"])
        for tx in done.values()
        for e in tx["timeline"]
        if e["kind"] in ("completed", "failed")
    ]
    elapsed = (max(ends) - sent_at) if ends else float("nan")
    reasons: dict[str, int] = {}
    for record in letters:
        key = f"{record.get('group')}: {record.get('reason')}"
        reasons[key] = reasons.get(key, 0) + 1
    table = Table(title="Drone Delivery: summary", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("completed (DeliveryScheduled)", str(len(completed)))
    table.add_row("cancelled (compensated by Package)", str(len(cancelled)))
    table.add_row(
        "dead-lettered", f"{len(letters)}  " + ", ".join(f"{k} ×{n}" for k, n in sorted(reasons.items()))
    )
    retried_detail = ", ".join(f"{k} ×{n}" for k, n in sorted(retried.items()))
    table.add_row("attempts retried", f"{sum(retried.values())}  {retried_detail}")
    if pending:
        table.add_row("[red]not finished", f"[red]{pending}")
    table.add_row(
        "throughput", f"{len(done) / elapsed:.1f} transactions/s over {elapsed:.2f}s" if ends else "-"
    )
    for label, group in (("completed", completed), ("cancelled", cancelled)):
        latencies = sorted(_latency_ms(tx) for tx in group)
        if latencies:
            table.add_row(
                f"latency of {label} p50 / p99",
                f"{_percentile(latencies, 50):.0f} ms / {_percentile(latencies, 99):.0f} ms",
            )
    return table


def _most_eventful(done: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A compensated transaction whose failed step was also retried (retry, dead letter and
    compensation in one), else any compensated one, else any."""

    def score(tx: dict[str, Any]) -> tuple[int, int]:
        attempts = max(((e.get("record") or {}).get("attempts") or 0 for e in tx["timeline"]), default=0)
        return (tx["status"] == "compensated", min(attempts, 2))

    return max(done.values(), key=score, default=None)


def trace(system: System, correlation_id: str) -> None:
    """``choreograph trace``: the transaction's causation tree, from the journal."""
    # copyable: without --journal, trace reads ./var/journal.db, not the demo's journal
    console.print(f"choreograph trace {correlation_id} --journal {system.journal}", style="bold", markup=False,
                  highlight=False, soft_wrap=True)
    env = {**os.environ, "COLUMNS": str(console.width)}
    argv = [sys.executable, "-m", "choreograph", "trace", correlation_id, "--journal", system.journal]
    subprocess.run(argv, env=env, check=False, timeout=30)


async def drive(system: System, count: int, seed: int, wait_s: float) -> int:
    batch = requests_batch(count, seed)
    async with httpx.AsyncClient(base_url=system.url, timeout=10.0) as client:
        console.print(f"sending {len(batch)} delivery requests to {system.url}/deliveries")
        sent_at = time.time()
        accepted, notes = await send(client, batch)
        for note in notes:
            console.print(f"  {note}")
        done = await watch(client, list(accepted.values()), wait_s)
    letters = await dead_letters(system.broker)
    console.print(summary(done, len(accepted) - len(done), letters, sent_at, retries(system.log_path)))
    eventful = _most_eventful(done)
    if eventful is not None:
        trace(system, eventful["correlation_id"])
    console.print(f"[dim]logs: {system.log_path}", soft_wrap=True)
    console.print(f"[dim]dead letters: choreograph dlq list --broker {system.broker}", soft_wrap=True)  # copyable
    return 0 if len(done) == len(accepted) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--requests", type=int, default=50, help="ordinary requests (plus 8 that fail on purpose)"
    )
    parser.add_argument("--port", type=int, default=8000, help="gateway port (another if busy)")
    parser.add_argument("--data-dir", type=Path, default=Path("var/drone_delivery_demo"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds to wait for every transaction")
    parser.add_argument(
        "--faults",
        default=os.environ.get("CHOREOGRAPH_FAULTS") or json.dumps(DEMO_FAULTS),
        help="fault injection (JSON or a file), default: %(default)s",
    )
    args = parser.parse_args()
    shutil.rmtree(args.data_dir, ignore_errors=True)  # a fresh bus and fresh stores every run
    args.data_dir.mkdir(parents=True)
    port = _port_to_ask(args.port)
    console.rule("[bold]Drone Delivery demo")
    console.print(f"starting the system: choreograph dev {APP} (faults: {args.faults})")
    system = System(args.data_dir, port, args.faults)
    code = 1
    try:
        system.wait_ready()
        console.print(f"system ready (logs in {system.log_path})")
        code = asyncio.run(drive(system, args.requests, args.seed, args.timeout))
    except KeyboardInterrupt:
        console.print("interrupted")
    except Exception as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
    finally:
        with contextlib.suppress(Exception):
            exit_code = system.stop()
            console.print(f"system stopped (choreograph dev exited with {exit_code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
