"""Orders: keeps each order's outcome and ends every order, with ``OrderShipped`` or ``OrderCancelled``.

Both terminal events are published by this service, each committed with the order's row:
the journal calls an order completed (or failed) only once the orders table says so. An
order whose ``ShipmentDispatched`` this service gives up on has no row and no terminal
event: the journal shows it ``failed`` (a runtime failure nobody compensates: the parcel
is gone and the money taken, there is nothing to undo), with the dead letter to replay.

Cancelling is a compensation of the order itself: it joins ``OrderPlaced`` with the
first sign that the order cannot complete (a business "no", a service giving up: shipping
refusing an order past its deadline among them), so an order is cancelled exactly once
however many of those arrive. Not on the journal's ``choreograph.timedout``: it may come
after the dispatch (this service down meanwhile), and the order shipped would be recorded
cancelled. The
outcome row, the inbox record and ``OrderCancelled`` commit together (``ctx.transaction()``).
"""

from __future__ import annotations

from choreograph import Context, Event, Failure, Service
from choreograph.faults import Faults
from choreograph.runtime.outbox import Transaction
from choreograph.sagas import failed
from examples.shop._causes import describe
from examples.shop._policy import RETRY, TIMEOUT
from examples.shop._store import Schema, database_url
from examples.shop.events import (
    OrderCancelled,
    OrderPlaced,
    OrderShipped,
    OutOfStock,
    PaymentCaptured,
    PaymentDeclined,
    ShipmentDispatched,
    StockReserved,
)

orders = Service("orders", timeout=TIMEOUT, retry=RETRY, database=database_url("orders"))
faults = Faults.for_service(orders.name)

schema = Schema(
    """
    CREATE TABLE IF NOT EXISTS orders (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,          -- shipped | cancelled
        detail TEXT NOT NULL
    )
    """,
)


async def record(tx: Transaction, order_id: str, status: str, detail: str) -> bool:
    """Record how an order ended; the first outcome stands. Whether it is ``status``: only
    then does the handler publish the terminal event, so an order has one, the row's."""
    await schema.ensure(tx)
    await tx.execute("INSERT INTO orders VALUES ($1, $2, $3) ON CONFLICT (order_id) DO NOTHING",
                     order_id, status, detail)
    return await tx.fetchval("SELECT status FROM orders WHERE order_id = $1", order_id) == status


@orders.on(ShipmentDispatched)
async def shipped(shipment: ShipmentDispatched, ctx: Context) -> OrderShipped | None:
    async with faults.step(ctx), ctx.transaction() as tx:
        stands = await record(tx, shipment.order_id, "shipped", shipment.shipment_id)
    if not stands:  # cancelled first, by another transaction of this order id
        ctx.logger.warning("order %s dispatched as %s after it was cancelled", shipment.order_id, shipment.shipment_id)
        return None
    return OrderShipped(order_id=shipment.order_id, shipment_id=shipment.shipment_id)


@orders.compensate(
    OrderPlaced,
    on=[
        PaymentDeclined,
        OutOfStock,
        failed(OrderPlaced),
        failed(PaymentCaptured),
        failed(StockReserved),
    ],
)
async def cancel(order: OrderPlaced, cause: Event | Failure, ctx: Context) -> OrderCancelled | None:
    reason = describe(cause)
    async with faults.step(ctx), ctx.transaction() as tx:
        stands = await record(tx, order.order_id, "cancelled", reason)
    if not stands:  # shipped first: the order ended, and OrderShipped said so
        ctx.logger.warning("order %s not cancelled, it shipped: %s", order.order_id, reason)
        return None
    ctx.logger.warning("order %s cancelled: %s", order.order_id, reason)
    return OrderCancelled(order_id=order.order_id, reason=reason)
