"""Orders: keeps each order's outcome and ends a failed order with ``OrderCancelled``.

Cancelling is a compensation of the order itself: it joins ``OrderPlaced`` with the
first sign that the order cannot complete (a business "no", a service giving up, the
deadline), so an order is cancelled exactly once however many of those arrive.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from choreograph import Context, Event, Failure, Service
from choreograph.faults import Faults
from choreograph.sagas import TimedOut, failed, timed_out
from examples.shop._causes import describe
from examples.shop._policy import RETRY, TIMEOUT
from examples.shop._store import Store
from examples.shop.events import (
    OrderCancelled,
    OrderPlaced,
    OrderShipped,
    OutOfStock,
    PaymentCaptured,
    PaymentDeclined,
    StockReserved,
)

orders = Service("orders", timeout=TIMEOUT, retry=RETRY)
faults = Faults.for_service(orders.name)

store = Store(
    "orders",
    """
    CREATE TABLE IF NOT EXISTS orders (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,          -- shipped | cancelled
        detail TEXT NOT NULL
    );
    """,
)


def _record(order_id: str, status: str, detail: str) -> Callable[[sqlite3.Connection], None]:
    def tx(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR IGNORE INTO orders VALUES (?, ?, ?)", (order_id, status, detail))

    return tx


@orders.on(OrderShipped)
async def shipped(order: OrderShipped, ctx: Context) -> None:
    async with faults.step(ctx):
        await store.run(_record(order.order_id, "shipped", order.shipment_id))


@orders.compensate(
    OrderPlaced,
    on=[
        PaymentDeclined,
        OutOfStock,
        failed(OrderPlaced),
        failed(PaymentCaptured),
        failed(StockReserved),
        timed_out(),
    ],
)
async def cancel(order: OrderPlaced, cause: Event | Failure | TimedOut, ctx: Context) -> OrderCancelled:
    reason = describe(cause)
    async with faults.step(ctx):
        await store.run(_record(order.order_id, "cancelled", reason))
    ctx.logger.warning("order %s cancelled: %s", order.order_id, reason)
    return OrderCancelled(order_id=order.order_id, reason=reason)
