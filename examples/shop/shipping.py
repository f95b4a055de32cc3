"""Shipping: ships an order once it is both paid for and reserved (a join), in either order.

    @shipping.on_all(PaymentCaptured, StockReserved, within=SHIPPING_WAIT)

If only one of the two arrives within ``SHIPPING_WAIT`` seconds (the other branch said
no, or is stuck), the join announces a ``join_timeout`` failure of the one that came, so
its service compensates. If shipping itself gives up (couriers refuse ``oversize-*``
items), the failure of *both* arrivals is announced: payment refunds, inventory releases.
An order past its deadline is not shipped either (a ``Reject``, so payment refunds,
inventory releases and orders cancels, as on any shipping failure): shipping owns the
deadline. The journal's ``choreograph.timedout`` undoes nothing in the shop: it can come
after the dispatch (the orders service down, so the order had no terminal event yet, or a
dispatch committed as the deadline passed), and a refund then gave the money back for a
parcel sent. What shipping never ships is undone by this refusal or by its join's timeout
(a late arrival included), once shipping runs.

The shipment row, the join's record of the arrival that completed it, the inbox
record and ``ShipmentDispatched`` commit in one transaction of shipping's database
(``docs/sagas.md``: joins in a service database).
"""

from __future__ import annotations

import os
import uuid

from choreograph import Context, Reject, Service
from choreograph.faults import Faults
from choreograph.sagas import deadline_of
from examples.shop._policy import RETRY, TIMEOUT
from examples.shop._store import Schema, database_url
from examples.shop.events import PaymentCaptured, ShipmentDispatched, StockReserved

SHIPPING_WAIT = float(os.environ.get("SHOP_SHIPPING_WAIT") or 60.0)
"""Seconds the join waits, from the first of its two events, for the other (``$SHOP_SHIPPING_WAIT``:
the chaos harness shortens it to make join timeouts happen)."""

shipping = Service("shipping", timeout=TIMEOUT, retry=RETRY, database=database_url("shipping"))
faults = Faults.for_service(shipping.name)

schema = Schema(
    """
    CREATE TABLE IF NOT EXISTS shipments (
        order_id TEXT PRIMARY KEY, shipment_id TEXT NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL,
        customer TEXT NOT NULL, amount BIGINT NOT NULL
    )
    """,
)


@shipping.on_all(PaymentCaptured, StockReserved, within=SHIPPING_WAIT)
async def ship(paid: PaymentCaptured, reserved: StockReserved, ctx: Context) -> ShipmentDispatched:
    if reserved.sku.startswith("oversize-"):
        raise Reject(f"no courier takes {reserved.sku}")
    deadline = deadline_of(ctx.envelope)
    if deadline is not None and ctx.clock.time() >= deadline.timestamp():
        # this refusal is what undoes it: payment refunds, inventory releases, orders cancels
        raise Reject(f"order {paid.order_id} passed its deadline {ctx.envelope.deadline}: not shipped")
    shipment_id = f"shp-{uuid.uuid5(uuid.NAMESPACE_URL, paid.order_id).hex[:12]}"
    async with faults.step(ctx), ctx.transaction() as tx:
        await schema.ensure(tx)
        await tx.execute(
            "INSERT INTO shipments VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
            paid.order_id, shipment_id, reserved.sku, reserved.qty, paid.customer, paid.amount,
        )
        shipment_id = str(await tx.fetchval("SELECT shipment_id FROM shipments WHERE order_id = $1", paid.order_id))
    ctx.logger.info("order %s shipped as %s", paid.order_id, shipment_id)
    return ShipmentDispatched(order_id=paid.order_id, shipment_id=shipment_id)
