"""Inventory: reserves stock for an order, and releases it when the order cannot complete.

    @inventory.compensate(StockReserved, on=[PaymentDeclined, failed(StockReserved), failed(OrderPlaced)])

Payment and inventory run in parallel, so a decline can arrive before the stock is
even reserved: the release then runs as soon as the reservation exists.

A repeat of an order (the same body again) is answered with the first decision; a released
reservation is answered ``OutOfStock``, as payment declines a refunded payment: the order was
undone, and none of its units are held for the repeat to ship.

Both steps change ``inventory``'s own database through ``ctx.transaction()``: the stock,
the reservation, the inbox record of the event and the event emitted commit together.
"""

from __future__ import annotations

from choreograph import Context, Failure, Service
from choreograph.faults import Faults
from choreograph.runtime.outbox import Transaction
from choreograph.sagas import failed
from choreograph.stores.state import Row
from examples.shop._causes import describe
from examples.shop._policy import RETRY, TIMEOUT
from examples.shop._store import PLACED_ORDERS, Schema, check_same_order, database_url, placed_by
from examples.shop.events import (
    OrderPlaced,
    OrderRejected,
    OutOfStock,
    PaymentDeclined,
    StockReleased,
    StockReserved,
)

inventory = Service("inventory", timeout=TIMEOUT, retry=RETRY, database=database_url("inventory"))
faults = Faults.for_service(inventory.name)

STOCK = {"widget": 100, "gadget": 3, "oversize-sofa": 5}
"""Opening stock of the demo catalogue (couriers refuse ``oversize-*``: see shipping)."""


async def _seed(tx: Transaction) -> None:
    await tx.executemany("INSERT INTO stock VALUES ($1, $2) ON CONFLICT (sku) DO NOTHING", STOCK.items())


schema = Schema(
    "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, available BIGINT NOT NULL)",
    """
    CREATE TABLE IF NOT EXISTS reservations (
        order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL,
        status TEXT NOT NULL,          -- reserved | out_of_stock | released
        available BIGINT NOT NULL      -- what was available when asked
    )
    """,
    PLACED_ORDERS,
    seed=_seed,
    probe="stock",
)


async def take(tx: Transaction, order: OrderPlaced, correlation_id: str) -> Row | str:
    """Reserve once per order id; the reservation row (a repeat returns the first decision), or
    why the order is refused (its id was first placed with another body).

    The reservation row is inserted first, so a concurrent reservation for the same
    order waits for this one; the stock is taken by one conditional ``UPDATE``, so two
    orders never take the same units.
    """
    await schema.ensure(tx)
    refused = await check_same_order(tx, order, correlation_id, "reservations")
    if refused is not None:
        return refused
    available = int(await tx.fetchval("SELECT available FROM stock WHERE sku = $1", order.sku) or 0)
    first = await tx.execute(
        "INSERT INTO reservations VALUES ($1, $2, $3, 'pending', $4) ON CONFLICT (order_id) DO NOTHING",
        order.order_id, order.sku, order.qty, available,
    )
    if first:
        taken = await tx.execute(
            "UPDATE stock SET available = available - $1 WHERE sku = $2 AND available >= $1", order.qty, order.sku
        )
        await tx.execute("UPDATE reservations SET status = $1 WHERE order_id = $2",
                         "reserved" if taken else "out_of_stock", order.order_id)
    row = await tx.fetchone("SELECT * FROM reservations WHERE order_id = $1", order.order_id)
    assert row is not None
    return row


@inventory.on(OrderPlaced)
async def reserve(order: OrderPlaced, ctx: Context) -> StockReserved | OutOfStock | OrderRejected:
    async with faults.step(ctx), ctx.transaction() as tx:
        row = await take(tx, order, ctx.correlation_id)
    if isinstance(row, str):
        return OrderRejected(order_id=order.order_id, reason=row)
    if row["status"] == "out_of_stock":
        return OutOfStock(order_id=order.order_id, sku=row["sku"], requested=row["qty"], available=row["available"])
    if row["status"] == "released":  # a repeat of an order already undone: none of its units are held, it must not ship
        return OutOfStock(order_id=order.order_id, sku=row["sku"], requested=row["qty"], available=0)
    return StockReserved(order_id=order.order_id, sku=row["sku"], qty=row["qty"])


@inventory.compensate(
    StockReserved, on=[PaymentDeclined, failed(StockReserved), failed(OrderPlaced)]
)
async def release(
    reserved: StockReserved, cause: PaymentDeclined | Failure, ctx: Context
) -> StockReleased | None:
    async with faults.step(ctx), ctx.transaction() as tx:
        await schema.ensure(tx)
        if not await placed_by(tx, reserved.order_id, ctx.correlation_id):
            ctx.logger.warning("order %s placed again: its reservation is another transaction's, not released (%s)",
                               reserved.order_id, describe(cause))
            return None
        released = await tx.execute(
            "UPDATE reservations SET status = 'released' WHERE order_id = $1 AND status = 'reserved'",
            reserved.order_id,
        )
        if released:  # only the first release of an order puts the units back
            await tx.execute("UPDATE stock SET available = available + $1 WHERE sku = $2", reserved.qty, reserved.sku)
    reason = describe(cause)
    ctx.logger.warning("released %d x %s: %s", reserved.qty, reserved.sku, reason)
    return StockReleased(order_id=reserved.order_id, sku=reserved.sku, qty=reserved.qty, reason=reason)
