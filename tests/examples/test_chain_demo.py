"""The chain demo (examples/chain/demo.py): three worker processes on one SQLite bus."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from examples.chain import OrderPlaced
from examples.chain.demo import register

from choreograph import Publisher
from choreograph.transports import open_transport

ROOT = Path(__file__).resolve().parents[2]


async def test_the_demo_registers_the_groups_so_orders_published_before_the_workers_start_wait_for_them(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    await register(url)
    async with open_transport(url) as bus:
        await Publisher(bus, source="/test").publish(OrderPlaced(order_id="o-1", amount=10))
        subscription = await bus.subscribe("payment", [OrderPlaced.event_type()])
        deliveries = await subscription.fetch(10, timeout=5.0)
        assert [d.message.type for d in deliveries] == [OrderPlaced.event_type()]
        await subscription.close()


def test_the_demo_ships_every_valid_order_dead_letters_the_bad_one_and_exits_0(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.chain.demo", "--orders", "20", "--dir", str(tmp_path / "demo")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CHAIN_FAILURE_RATE": "0"},  # at 0.2, 3% of runs dead-letter an order after 4 attempts
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = next(line for line in done.stdout.splitlines() if line.startswith("│ 20"))
    assert [cell.strip() for cell in summary.strip("│").split("│")][:3] == ["20", "19", "1"]
