"""Payment: charges the customer's balance, and refunds it when the order cannot complete.

The refund is declared next to the charge it undoes::

    @payment.compensate(PaymentCaptured, on=[OutOfStock, failed(PaymentCaptured), failed(OrderPlaced), timed_out()])

It runs once per order, only if the charge happened, whichever comes first: inventory
saying it has no stock, shipping giving up on (or timing out waiting with) the
captured payment, inventory giving up on the order, or the order's deadline passing.
"""

from __future__ import annotations

import sqlite3

from choreograph import Context, Failure, Service
from choreograph.faults import Faults
from choreograph.sagas import TimedOut, failed, timed_out
from examples.shop._causes import describe
from examples.shop._policy import RETRY, TIMEOUT
from examples.shop._store import Store
from examples.shop.events import (
    OrderPlaced,
    OutOfStock,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
)

payment = Service("payment", timeout=TIMEOUT, retry=RETRY)
faults = Faults.for_service(payment.name)

BALANCES = {"alice": 100_00, "bob": 20_00, "carol": 1_000_00}
"""Opening balances (cents) of the demo customers."""


def _seed(conn: sqlite3.Connection) -> None:
    conn.executemany("INSERT OR IGNORE INTO balances VALUES (?, ?)", BALANCES.items())


store = Store(
    "payment",
    """
    CREATE TABLE IF NOT EXISTS balances (customer TEXT PRIMARY KEY, balance INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS payments (
        order_id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount INTEGER NOT NULL,
        status TEXT NOT NULL,          -- captured | declined | refunded
        reason TEXT
    );
    """,
    _seed,
)


def _capture(conn: sqlite3.Connection, order: OrderPlaced) -> sqlite3.Row:
    """Charge once per order id: a repeat returns the first decision."""
    row: sqlite3.Row | None = conn.execute("SELECT * FROM payments WHERE order_id = ?", (order.order_id,)).fetchone()
    if row is None:
        balance = conn.execute("SELECT balance FROM balances WHERE customer = ?", (order.customer,)).fetchone()
        if balance is None or balance[0] < order.amount:
            reason = "unknown customer" if balance is None else f"balance {balance[0]} < {order.amount}"
            conn.execute("INSERT INTO payments VALUES (?, ?, ?, 'declined', ?)",
                         (order.order_id, order.customer, order.amount, reason))
        else:
            conn.execute("UPDATE balances SET balance = balance - ? WHERE customer = ?", (order.amount, order.customer))
            conn.execute("INSERT INTO payments VALUES (?, ?, ?, 'captured', NULL)",
                         (order.order_id, order.customer, order.amount))
        row = conn.execute("SELECT * FROM payments WHERE order_id = ?", (order.order_id,)).fetchone()
        assert row is not None
    return row


@payment.on(OrderPlaced)
async def capture(order: OrderPlaced, ctx: Context) -> PaymentCaptured | PaymentDeclined:
    async with faults.step(ctx):
        row = await store.run(lambda conn: _capture(conn, order))
    if row["status"] == "declined":
        return PaymentDeclined(order_id=order.order_id, reason=row["reason"])
    return PaymentCaptured(order_id=order.order_id, customer=row["customer"], amount=row["amount"])


def _refund(conn: sqlite3.Connection, captured: PaymentCaptured) -> None:
    refunded = conn.execute(
        "UPDATE payments SET status = 'refunded' WHERE order_id = ? AND status = 'captured'", (captured.order_id,)
    ).rowcount
    if refunded:  # only the first run moves money back
        conn.execute("UPDATE balances SET balance = balance + ? WHERE customer = ?",
                     (captured.amount, captured.customer))


@payment.compensate(PaymentCaptured, on=[OutOfStock, failed(PaymentCaptured), failed(OrderPlaced), timed_out()])
async def refund(
    captured: PaymentCaptured, cause: OutOfStock | Failure | TimedOut, ctx: Context
) -> PaymentRefunded:
    async with faults.step(ctx):
        await store.run(lambda conn: _refund(conn, captured))
    reason = describe(cause)
    ctx.logger.warning("refunded %s to %s: %s", captured.amount, captured.customer, reason)
    return PaymentRefunded(order_id=captured.order_id, amount=captured.amount, reason=reason)
