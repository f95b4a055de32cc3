"""A 3-hop chain for the broker multi-process tests: ``Order`` → hop1 → hop2 → hop3.

Every handler run is recorded in the SQLite file named by ``CHAINAPP_DB`` so a test
can tell a re-run from a redelivery the inbox absorbed:

* ``runs``    one row per handler run (hop, n, event id, pid, attempt);
* ``effects`` the idempotent effect of each hop: one row per (hop, n), upserted, with
  ``applied`` counting how often the upsert came (more than 1 = an event processed twice).

``Order.hold`` makes hop1's first attempt sleep that long once it has recorded its run,
so a test can stop or kill a process while handlers are in flight; a redelivery
(attempt 2) goes straight through.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

from choreograph import Context, Event, Service


class Order(Event, type="test.chain.order"):
    n: int
    hold: float = 0.0


class Packed(Event, type="test.chain.packed"):
    n: int


class Shipped(Event, type="test.chain.shipped"):
    n: int


def setup(path: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS runs (hop TEXT, n INTEGER, event_id TEXT, pid INTEGER, attempt INTEGER)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS effects (hop TEXT, n INTEGER, event_id TEXT, applied INTEGER,"
        " PRIMARY KEY (hop, n))"
    )
    db.close()


_connection: sqlite3.Connection | None = None


def _db() -> sqlite3.Connection:
    global _connection
    if _connection is None:
        _connection = sqlite3.connect(os.environ["CHAINAPP_DB"], timeout=30, isolation_level=None)
        _connection.execute("PRAGMA synchronous=OFF")  # a test file: speed over crash safety
    return _connection


async def _step(hop: str, n: int, ctx: Context, hold: float = 0.0) -> None:
    db = _db()
    db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", (hop, n, ctx.event_id, os.getpid(), ctx.attempt))
    if hold and ctx.attempt == 1:
        await asyncio.sleep(hold)
    db.execute(
        "INSERT INTO effects VALUES (?, ?, ?, 1) ON CONFLICT(hop, n) DO UPDATE SET applied = applied + 1",
        (hop, n, ctx.event_id),
    )


hop1 = Service("hop1")
hop2 = Service("hop2")
hop3 = Service("hop3")


@hop1.on(Order, timeout=120)
async def pack(order: Order, ctx: Context) -> Packed:
    await _step("hop1", order.n, ctx, order.hold)
    return Packed(n=order.n)


@hop2.on(Packed, timeout=120)
async def ship(packed: Packed, ctx: Context) -> Shipped:
    await _step("hop2", packed.n, ctx)
    return Shipped(n=packed.n)


@hop3.on(Shipped, timeout=120)
async def deliver(shipped: Shipped, ctx: Context) -> None:
    await _step("hop3", shipped.n, ctx)
