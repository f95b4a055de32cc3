"""The shop app manifest: which services exist, where an order starts and how it ends.

``choreograph dev examples.shop.app:app`` runs every service in its own process.

A failed order ends on three branches, each declared terminal ``failed``: the order's
``OrderCancelled``, and the compensations' ``PaymentRefunded`` and ``StockReleased``, which
nothing consumes (a refund or a release is the last step of its branch). All three are
``failed``, so the journal's status is the same whichever it records first (``compensated``
after a failure or a timeout, ``failed`` after a business "no"). Every trigger of the refund
and the release also triggers the cancellation, so ending the transaction at the first of
them holds back no ``choreograph.timedout`` that a compensation waits for; a compensation
that gives up still marks the order ``compensation_failed``.

An ``OrderPlaced`` whose ``order_id`` was first placed with another body ends ``failed`` with
payment's and inventory's ``OrderRejected``: nothing consumes it, so the order of that id, another
transaction's, is neither cancelled nor undone.
"""

from __future__ import annotations

from choreograph import App
from examples.shop.events import (
    OrderCancelled,
    OrderPlaced,
    OrderRejected,
    OrderShipped,
    PaymentRefunded,
    StockReleased,
)
from examples.shop.inventory import inventory
from examples.shop.orders import orders
from examples.shop.payment import payment
from examples.shop.shipping import shipping

__all__ = ["app"]

app = App(
    "shop",
    [orders, payment, inventory, shipping],
    ingress=[OrderPlaced],
    terminal={
        OrderShipped: "completed",
        OrderCancelled: "failed",
        OrderRejected: "failed",  # an order id placed again with another body: this transaction only
        PaymentRefunded: "failed",  # the ends of the compensation path
        StockReleased: "failed",
    },
)
