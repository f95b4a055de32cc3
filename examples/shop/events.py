"""The events of an order (the contract between the shop's services)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from choreograph import Event

MAX_AMOUNT = 2**63 - 1
"""The largest amount (cents) the payments table holds (``BIGINT``; SQLite's INTEGER): a larger
one failed every attempt to charge it, and the order ended cancelled with a dead letter."""


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL (U+0000): PostgreSQL text cannot store it")
    return value


Text = Annotated[str, AfterValidator(_no_nul), Field(min_length=1, max_length=100)]
"""A name the services store as ``TEXT``, on SQLite or PostgreSQL: without NUL, which PostgreSQL
refuses (every attempt failed, the cancellation's too, and the order ended ``compensation_failed``)."""


class OrderPlaced(Event, type="shop.order.placed"):
    """Ingress: a customer ordered ``qty`` of ``sku`` for ``amount`` (in cents)."""

    order_id: Text
    customer: Text
    sku: Text
    qty: int = Field(gt=0, le=1000)
    amount: int = Field(gt=0, le=MAX_AMOUNT)


class PaymentCaptured(Event, type="shop.payment.captured"):
    order_id: str
    customer: str
    amount: int


class PaymentDeclined(Event, type="shop.payment.declined"):
    order_id: str
    reason: str


class PaymentRefunded(Event, type="shop.payment.refunded"):
    """Compensation of PaymentCaptured; terminal (failed): it ends its branch of a failed order."""

    order_id: str
    amount: int
    reason: str


class StockReserved(Event, type="shop.stock.reserved"):
    order_id: str
    sku: str
    qty: int


class OutOfStock(Event, type="shop.stock.out_of_stock"):
    order_id: str
    sku: str
    requested: int
    available: int


class StockReleased(Event, type="shop.stock.released"):
    """Compensation of StockReserved; terminal (failed): it ends its branch of a failed order."""

    order_id: str
    sku: str
    qty: int
    reason: str


class ShipmentDispatched(Event, type="shop.shipment.dispatched"):
    """Shipping sent the parcel; the order is not complete until the orders service recorded it."""

    order_id: str
    shipment_id: str


class OrderShipped(Event, type="shop.order.shipped"):
    """Terminal (completed): the orders service recorded the order shipped (the row and this
    event commit together), so the journal never calls an order completed that the orders
    table does not have."""

    order_id: str
    shipment_id: str


class OrderCancelled(Event, type="shop.order.cancelled"):
    """Terminal (failed)."""

    order_id: str
    reason: str


class OrderRejected(Event, type="shop.order.rejected"):
    """Terminal (failed): payment or inventory refused this ``OrderPlaced``, whose ``order_id`` was
    first placed with another body (``reason`` names the fields that differ). It ends this
    transaction only: the order of that id is another transaction's, and nothing consumes this
    event, so nothing of that order is cancelled or undone."""

    order_id: str
    reason: str
