"""Inventory: reserves stock for an order, and releases it when the order cannot complete.

    @inventory.compensate(StockReserved, on=[PaymentDeclined, failed(StockReserved), failed(OrderPlaced), timed_out()])

Payment and inventory run in parallel, so a decline can arrive before the stock is
even reserved: the release then runs as soon as the reservation exists.
"""

from __future__ import annotations

import sqlite3

from choreograph import Context, Failure, Service
from choreograph.faults import Faults
from choreograph.sagas import TimedOut, failed, timed_out
from examples.shop._causes import describe
from examples.shop._policy import RETRY, TIMEOUT
from examples.shop._store import Store
from examples.shop.events import OrderPlaced, OutOfStock, PaymentDeclined, StockReleased, StockReserved

inventory = Service("inventory", timeout=TIMEOUT, retry=RETRY)
faults = Faults.for_service(inventory.name)

STOCK = {"widget": 100, "gadget": 3, "oversize-sofa": 5}
"""Opening stock of the demo catalogue (couriers refuse ``oversize-*``: see shipping)."""


def _seed(conn: sqlite3.Connection) -> None:
    conn.executemany("INSERT OR IGNORE INTO stock VALUES (?, ?)", STOCK.items())


store = Store(
    "inventory",
    """
    CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS reservations (
        order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL,
        status TEXT NOT NULL,          -- reserved | out_of_stock | released
        available INTEGER NOT NULL     -- what was available when asked
    );
    """,
    _seed,
)


def _reserve(conn: sqlite3.Connection, order: OrderPlaced) -> sqlite3.Row:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM reservations WHERE order_id = ?", (order.order_id,)).fetchone()
    if row is None:
        found = conn.execute("SELECT available FROM stock WHERE sku = ?", (order.sku,)).fetchone()
        available = 0 if found is None else int(found[0])
        status = "reserved" if available >= order.qty else "out_of_stock"
        if status == "reserved":
            conn.execute("UPDATE stock SET available = available - ? WHERE sku = ?", (order.qty, order.sku))
        conn.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?)",
                     (order.order_id, order.sku, order.qty, status, available))
        row = conn.execute("SELECT * FROM reservations WHERE order_id = ?", (order.order_id,)).fetchone()
        assert row is not None
    return row


@inventory.on(OrderPlaced)
async def reserve(order: OrderPlaced, ctx: Context) -> StockReserved | OutOfStock:
    async with faults.step(ctx):
        row = await store.run(lambda conn: _reserve(conn, order))
    if row["status"] == "out_of_stock":
        return OutOfStock(order_id=order.order_id, sku=order.sku, requested=order.qty, available=row["available"])
    return StockReserved(order_id=order.order_id, sku=order.sku, qty=order.qty)


def _release(conn: sqlite3.Connection, reserved: StockReserved) -> None:
    released = conn.execute(
        "UPDATE reservations SET status = 'released' WHERE order_id = ? AND status = 'reserved'",
        (reserved.order_id,),
    ).rowcount
    if released:
        conn.execute("UPDATE stock SET available = available + ? WHERE sku = ?", (reserved.qty, reserved.sku))


@inventory.compensate(
    StockReserved, on=[PaymentDeclined, failed(StockReserved), failed(OrderPlaced), timed_out()]
)
async def release(
    reserved: StockReserved, cause: PaymentDeclined | Failure | TimedOut, ctx: Context
) -> StockReleased:
    async with faults.step(ctx):
        await store.run(lambda conn: _release(conn, reserved))
    reason = describe(cause)
    ctx.logger.warning("released %d x %s: %s", reserved.qty, reserved.sku, reason)
    return StockReleased(order_id=reserved.order_id, sku=reserved.sku, qty=reserved.qty, reason=reason)
