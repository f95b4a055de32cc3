"""A one-minute demo of the core: three worker processes on the embedded SQLite bus.

Starts ``payment``, ``shipping`` and ``notify`` as separate ``choreograph run``
processes, publishes a batch of orders (20% of payment attempts fail transiently and
are retried; one order has an invalid amount and is dead-lettered), waits until every
order is shipped or dead, prints a summary and the dead letters, and stops.

    python -m examples.chain.demo [--orders 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import examples.chain
from choreograph import Publisher, Service, Worker
from choreograph.transports import open_transport
from examples.chain import OrderPlaced, OrderShipped

console = Console()


async def register(url: str) -> None:
    """Create the three services' consumer groups before anything is published.

    A group receives what is published after it exists, and the worker processes take a
    moment to start (longer on a loaded machine): registered here, every order waits in
    its group for them instead of going nowhere.
    """
    async with open_transport(url) as bus:
        for name in ("payment", "shipping", "notify"):
            service = getattr(examples.chain, name)
            subscription = await bus.subscribe(service.group, sorted(service.subscriptions))
            await subscription.close()


async def drive(url: str, orders: int) -> bool:
    """Publish the orders and wait (a minute at most) until each is shipped or dead-lettered."""
    shipped: set[str] = set()
    watcher = Service("demo-watcher")

    @watcher.on(OrderShipped)
    async def seen(event: OrderShipped) -> None:
        shipped.add(event.order_id)

    async with open_transport(url) as bus, Worker([watcher], bus):
        publisher = Publisher(bus, source="/demo")
        start = time.perf_counter()
        batch = [OrderPlaced(order_id=f"o-{i}", amount=10 + i % 90) for i in range(orders - 1)]
        batch.append(OrderPlaced(order_id="o-bad", amount=0))  # rejected: dead-lettered at once
        await publisher.publish(*batch)
        with Progress(console=console) as progress:
            task = progress.add_task("orders shipped", total=orders - 1)
            deadline = time.monotonic() + 60
            dead = 0
            while len(shipped) + dead < orders and time.monotonic() < deadline:
                progress.update(task, completed=len(shipped))
                await asyncio.sleep(0.1)
                dead = len(await bus.dead_letters())
            progress.update(task, completed=len(shipped))
        elapsed = time.perf_counter() - start
        letters = await bus.dead_letters()

    summary = Table(title="chain demo")
    summary.add_column("orders")
    summary.add_column("shipped")
    summary.add_column("dead-lettered")
    summary.add_column("seconds")
    summary.add_row(str(orders), str(len(shipped)), str(len(letters)), f"{elapsed:.2f}")
    console.print(summary)
    dead = Table(title="dead letters (choreograph dlq list)")
    for column in ("group", "type", "reason", "attempts", "last error"):
        dead.add_column(column)
    for letter in letters:
        error = letter.record.get("last_error") or {}
        dead.add_row(
            letter.group,
            letter.message.type,
            letter.record["reason"],
            str(letter.record["attempts"]),
            f"{error.get('type')}: {error.get('message')}",
        )
    console.print(dead)
    finished = len(shipped) + len(letters) >= orders
    if not finished:
        console.print(
            f"[bold red]not finished after a minute:[/] {orders - len(shipped) - len(letters)} orders are "
            f"neither shipped nor dead-lettered; the worker processes' errors are above "
            f"(try: choreograph dlq list --broker {url})"
        )
    return finished


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--dir", default="var/chain-demo")
    args = parser.parse_args()
    root = Path(args.dir)
    if root.exists():
        for file in root.rglob("*"):
            if file.is_file():
                file.unlink()
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root}/bus.db"
    asyncio.run(register(url))
    env = {"CHAIN_FAILURE_RATE": "0.2", **os.environ}  # the environment may set another rate
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "choreograph",
                "run",
                f"examples.chain:{name}",
                "--broker",
                url,
                "--log-level",
                "ERROR",
            ],
            env=env,
        )
        for name in ("payment", "shipping", "notify")
    ]
    try:
        finished = asyncio.run(drive(url, args.orders))
        console.print(f"\nTry: [bold]choreograph dlq list --broker {url}[/]", soft_wrap=True)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
    if not finished:
        sys.exit(1)


if __name__ == "__main__":
    main()
