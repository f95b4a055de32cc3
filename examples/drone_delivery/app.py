"""The Drone Delivery app manifest: which services exist, where a transaction starts and ends.

``choreograph dev examples.drone_delivery.app:app`` runs it (each service its own
process, plus the ingestion gateway of :mod:`examples.drone_delivery.gateway`).
"""

from __future__ import annotations

from choreograph import App
from examples.drone_delivery.delivery import delivery
from examples.drone_delivery.events import (
    DeliveryCancelled,
    DeliveryRequested,
    DeliveryScheduled,
    DroneAssigned,
    PackageCreated,
)
from examples.drone_delivery.package import package
from examples.drone_delivery.scheduler import scheduler

__all__ = [
    "DeliveryCancelled",
    "DeliveryRequested",
    "DeliveryScheduled",
    "DroneAssigned",
    "PackageCreated",
    "app",
]

app = App(
    "drone_delivery",
    [package, scheduler, delivery],
    ingress=[DeliveryRequested],
    terminal={DeliveryScheduled: "completed", DeliveryCancelled: "failed"},
)
