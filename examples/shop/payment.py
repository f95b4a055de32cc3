"""Payment: charges the customer's balance, and refunds it when the order cannot complete.

The refund is declared next to the charge it undoes::

    @payment.compensate(PaymentCaptured, on=[OutOfStock, failed(PaymentCaptured), failed(OrderPlaced)])

It runs once per order, only if the charge happened, whichever comes first: inventory
saying it has no stock, shipping giving up on (or timing out waiting with) the
captured payment, or inventory giving up on the order. Not on the order's deadline
(``timed_out()``): the journal announces it whether or not the parcel left (the orders
service down after the dispatch, or a dispatch committed as the deadline passed), and only
shipping knows; it refuses to ship past the deadline, a shipping failure that refunds.

Both steps change ``payment``'s own database through ``ctx.transaction()``: the balance,
the payment row, the inbox record of the event and the event emitted commit together.
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
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
)

payment = Service("payment", timeout=TIMEOUT, retry=RETRY, database=database_url("payment"))
faults = Faults.for_service(payment.name)

BALANCES = {"alice": 100_00, "bob": 20_00, "carol": 1_000_00}
"""Opening balances (cents) of the demo customers."""


async def _seed(tx: Transaction) -> None:
    await tx.executemany("INSERT INTO balances VALUES ($1, $2) ON CONFLICT (customer) DO NOTHING", BALANCES.items())


schema = Schema(
    "CREATE TABLE IF NOT EXISTS balances (customer TEXT PRIMARY KEY, balance BIGINT NOT NULL)",
    """
    CREATE TABLE IF NOT EXISTS payments (
        order_id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount BIGINT NOT NULL,
        status TEXT NOT NULL,          -- captured | declined | refunded
        reason TEXT
    )
    """,
    PLACED_ORDERS,
    seed=_seed,
    probe="balances",
)


async def charge(tx: Transaction, order: OrderPlaced, correlation_id: str) -> Row | str:
    """Charge once per order id; the payment row (a repeat returns the first decision), or why
    the order is refused (its id was first placed with another body).

    The payment row is inserted first, so a concurrent charge of the same order (another
    event for it, on PostgreSQL) waits for this one and then finds its row; the balance
    is taken by one conditional ``UPDATE``, so two orders never spend the same money.
    """
    await schema.ensure(tx)
    refused = await check_same_order(tx, order, correlation_id, "payments")
    if refused is not None:
        return refused
    first = await tx.execute(
        "INSERT INTO payments VALUES ($1, $2, $3, 'pending', NULL) ON CONFLICT (order_id) DO NOTHING",
        order.order_id, order.customer, order.amount,
    )
    if first:
        taken = await tx.execute(
            "UPDATE balances SET balance = balance - $1 WHERE customer = $2 AND balance >= $1",
            order.amount, order.customer,
        )
        reason = None
        if not taken:
            balance = await tx.fetchval("SELECT balance FROM balances WHERE customer = $1", order.customer)
            reason = "unknown customer" if balance is None else f"balance {balance} < {order.amount}"
        await tx.execute("UPDATE payments SET status = $1, reason = $2 WHERE order_id = $3",
                         "captured" if taken else "declined", reason, order.order_id)
    row = await tx.fetchone("SELECT * FROM payments WHERE order_id = $1", order.order_id)
    assert row is not None
    return row


@payment.on(OrderPlaced)
async def capture(order: OrderPlaced, ctx: Context) -> PaymentCaptured | PaymentDeclined | OrderRejected:
    async with faults.step(ctx), ctx.transaction() as tx:
        row = await charge(tx, order, ctx.correlation_id)
    if isinstance(row, str):
        return OrderRejected(order_id=order.order_id, reason=row)
    if row["status"] == "declined":
        return PaymentDeclined(order_id=order.order_id, reason=row["reason"])
    if row["status"] == "refunded":  # a repeat of an order already undone: it must not ship now
        return PaymentDeclined(order_id=order.order_id, reason=f"order {order.order_id} was refunded: {row['reason']}")
    return PaymentCaptured(order_id=order.order_id, customer=row["customer"], amount=row["amount"])


@payment.compensate(PaymentCaptured, on=[OutOfStock, failed(PaymentCaptured), failed(OrderPlaced)])
async def refund(
    captured: PaymentCaptured, cause: OutOfStock | Failure, ctx: Context
) -> PaymentRefunded | None:
    reason = describe(cause)
    async with faults.step(ctx), ctx.transaction() as tx:
        await schema.ensure(tx)
        if not await placed_by(tx, captured.order_id, ctx.correlation_id):
            ctx.logger.warning("order %s placed again: its charge is another transaction's, not refunded (%s)",
                               captured.order_id, reason)
            return None
        refunded = await tx.execute(
            "UPDATE payments SET status = 'refunded', reason = $1 WHERE order_id = $2 AND status = 'captured'",
            reason, captured.order_id,
        )
        if refunded:  # only the first refund of an order moves money back
            await tx.execute("UPDATE balances SET balance = balance + $1 WHERE customer = $2",
                             captured.amount, captured.customer)
    ctx.logger.warning("refunded %s to %s: %s", captured.amount, captured.customer, reason)
    return PaymentRefunded(order_id=captured.order_id, amount=captured.amount, reason=reason)
