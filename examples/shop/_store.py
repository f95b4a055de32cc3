"""Where the shop's services keep their state, and the tables they create on first use.

Each service declares its own database (``Service("payment", database=database_url("payment"))``)
and changes it only through ``ctx.transaction()``: the rows it writes, the inbox record
of the event it handles and the events it emits commit together when the handler
returns (``docs/stores.md``). Joins and compensations record their arrivals in the same
database and the same transaction (``docs/sagas.md``).

The URL is fixed when the service module is imported: ``$SHOP_DATABASE_<SERVICE>``
(e.g. ``SHOP_DATABASE_PAYMENT=postgresql://.../test?schema=payment``) if set, else
``sqlite:///<data dir>/<service>.db`` with the data dir ``$CHOREOGRAPH_DATA_DIR``
(``choreograph dev`` sets it for every process it starts; default ``./var/shop``).
The SQL is portable: it runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from choreograph.runtime.outbox import Transaction
from examples._schema import Schema
from examples.shop.events import OrderPlaced

DATA_ENV = "CHOREOGRAPH_DATA_DIR"
DATABASE_ENV = "SHOP_DATABASE_{}"


def data_dir() -> Path:
    """Where the services keep their state: ``$CHOREOGRAPH_DATA_DIR`` or ``./var/shop``."""
    return Path(os.environ.get(DATA_ENV) or "./var/shop")


def database_url(service: str) -> str:
    """The database of ``service``: ``$SHOP_DATABASE_<SERVICE>``, else ``sqlite:///<data dir>/<service>.db``."""
    return os.environ.get(DATABASE_ENV.format(service.upper())) or f"sqlite:///{data_dir() / f'{service}.db'}"


PLACED_ORDERS = """
    CREATE TABLE IF NOT EXISTS placed_orders (
        order_id TEXT PRIMARY KEY, body TEXT NOT NULL,
        correlation_id TEXT NOT NULL   -- the transaction whose step made this service's decision
    )
"""
"""The body each order id was first placed with, and by which transaction (in the schema of
payment and of inventory)."""


async def check_same_order(tx: Transaction, order: OrderPlaced, correlation_id: str, decisions: str) -> str | None:
    """Why an ``order_id`` placed again with another body is refused, naming the fields that
    differ; ``None`` for the order's first body (or the same body again).

    The order id is the order's idempotency key: the same body again (a client's retry, a
    replay) is the same order, and payment and inventory answer it with their first decision.
    Another body under it was answered the same way, so an order for another amount, sku or
    quantity ended "shipped" without being charged or reserved. Both services keep the whole
    body, not just the fields they use: if only the one whose fields differ refused, the other's
    compensation (on that refusal) would undo the first order's charge or reservation, which
    the second order's answer shares. Call it in the step's transaction, before the decision
    is written, and answer a refusal with ``OrderRejected`` (nothing is written). Not a
    ``Reject``: its ``failed(OrderPlaced)`` triggers the orders service's cancellation, keyed by
    order id, which recorded the first order cancelled while it was under way (its shipment
    then went unrecorded and its transaction never ended), and the refused transaction, whose
    cancellation did not stand, never ended either.

    ``decisions``: the service's table of decisions by order id (``payments``, ``reservations``).
    An order decided there before ``placed_orders`` existed (a database from the previous
    version) gets no row here: its first body and transaction are unknown, and recording a later
    one's made a retry of the real order a conflict, and that later transaction its owner
    (:func:`placed_by`). Such an order is answered, and undone, as before.
    """
    body = order.model_dump_json()
    await tx.execute(
        "INSERT INTO placed_orders SELECT $1, $2, $3"
        f" WHERE NOT EXISTS (SELECT 1 FROM {decisions} WHERE order_id = $1) ON CONFLICT (order_id) DO NOTHING",
        order.order_id, body, correlation_id,
    )
    first = await tx.fetchval("SELECT body FROM placed_orders WHERE order_id = $1", order.order_id)
    if first is None or str(first) == body:  # None: decided before placed_orders existed
        return None
    first = str(first)
    stored, sent = json.loads(first), json.loads(body)
    differ = "; ".join(
        f"{field} {sent.get(field)!r} (first order: {stored.get(field)!r})"
        for field in sent
        if sent.get(field) != stored.get(field)
    )
    return (
        f"order_id {order.order_id!r} was first placed with another body (409 conflict): {differ}; "
        "place the same body again, or use a new order_id"
    )


async def placed_by(tx: Transaction, order_id: str, correlation_id: str) -> bool:
    """Whether transaction ``correlation_id`` made this service's decision on ``order_id``: only
    then may its compensation undo it.

    An order placed again with the same body is a second transaction that payment and inventory
    answer with their first decision, so its own ``PaymentCaptured`` and ``StockReserved`` join
    its compensations. When that transaction failed (a deadline passed, shipping gave up),
    the refund and the release, keyed by order id, undid the first transaction's charge and
    reservation, perhaps of an order already shipped. An order with no row here (placed before
    the table existed) is undone as before.
    """
    first = await tx.fetchval("SELECT correlation_id FROM placed_orders WHERE order_id = $1", order_id)
    return first is None or first == correlation_id


__all__ = ["DATA_ENV", "PLACED_ORDERS", "Schema", "check_same_order", "data_dir", "database_url", "placed_by"]
