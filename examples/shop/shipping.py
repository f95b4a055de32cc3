"""Shipping: ships an order once it is both paid for and reserved (a join), in either order.

    @shipping.on_all(PaymentCaptured, StockReserved, within=SHIPPING_WAIT)

If only one of the two arrives within ``SHIPPING_WAIT`` seconds (the other branch said
no, or is stuck), the join announces a ``join_timeout`` failure of the one that came, so
its service compensates. If shipping itself gives up (couriers refuse ``oversize-*``
items), the failure of *both* arrivals is announced: payment refunds, inventory releases.
"""

from __future__ import annotations

import os
import sqlite3
import uuid

from choreograph import Context, Reject, Service
from choreograph.faults import Faults
from examples.shop._policy import RETRY, TIMEOUT
from examples.shop._store import Store
from examples.shop.events import OrderShipped, PaymentCaptured, StockReserved

SHIPPING_WAIT = float(os.environ.get("SHOP_SHIPPING_WAIT") or 60.0)
"""Seconds the join waits, from the first of its two events, for the other (``$SHOP_SHIPPING_WAIT``:
the chaos harness shortens it to make join timeouts happen)."""

shipping = Service("shipping", timeout=TIMEOUT, retry=RETRY)
faults = Faults.for_service(shipping.name)

store = Store(
    "shipping",
    """
    CREATE TABLE IF NOT EXISTS shipments (
        order_id TEXT PRIMARY KEY, shipment_id TEXT NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL,
        customer TEXT NOT NULL, amount INTEGER NOT NULL
    );
    """,
)


def _book(conn: sqlite3.Connection, paid: PaymentCaptured, reserved: StockReserved) -> str:
    shipment_id = f"shp-{uuid.uuid5(uuid.NAMESPACE_URL, paid.order_id).hex[:12]}"
    conn.execute("INSERT OR IGNORE INTO shipments VALUES (?, ?, ?, ?, ?, ?)",
                 (paid.order_id, shipment_id, reserved.sku, reserved.qty, paid.customer, paid.amount))
    row = conn.execute("SELECT shipment_id FROM shipments WHERE order_id = ?", (paid.order_id,)).fetchone()
    return str(row[0])


@shipping.on_all(PaymentCaptured, StockReserved, within=SHIPPING_WAIT)
async def ship(paid: PaymentCaptured, reserved: StockReserved, ctx: Context) -> OrderShipped:
    if reserved.sku.startswith("oversize-"):
        raise Reject(f"no courier takes {reserved.sku}")
    async with faults.step(ctx):
        shipment_id = await store.run(lambda conn: _book(conn, paid, reserved))
    ctx.logger.info("order %s shipped as %s", paid.order_id, shipment_id)
    return OrderShipped(order_id=paid.order_id, shipment_id=shipment_id)
