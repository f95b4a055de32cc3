"""The shop app manifest: which services exist, where an order starts and how it ends.

``choreograph dev examples.shop.app:app`` runs every service in its own process.
"""

from __future__ import annotations

from choreograph import App
from examples.shop.events import OrderCancelled, OrderPlaced, OrderShipped
from examples.shop.inventory import inventory
from examples.shop.orders import orders
from examples.shop.payment import payment
from examples.shop.shipping import shipping

__all__ = ["app"]

app = App(
    "shop",
    [orders, payment, inventory, shipping],
    ingress=[OrderPlaced],
    terminal={OrderShipped: "completed", OrderCancelled: "failed"},
)
