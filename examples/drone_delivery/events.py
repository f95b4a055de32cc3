"""The events of the Drone Delivery transaction (the contract between its services)."""

from __future__ import annotations

from pydantic import Field

from choreograph import Event

MAX_WEIGHT_KG = 1000.0
"""What ingestion accepts at all; whether a drone can carry it is the scheduler's call."""


class DeliveryRequested(Event, type="drone.delivery.requested"):
    """A client asked for a package to be flown from ``pickup`` to ``dropoff``."""

    delivery_id: str = Field(min_length=1, max_length=100)
    package_id: str = Field(min_length=1, max_length=100)
    weight_kg: float = Field(gt=0, le=MAX_WEIGHT_KG)
    pickup: str = Field(min_length=1, max_length=200)
    dropoff: str = Field(min_length=1, max_length=200)
    owner: str = Field(default="anonymous", max_length=100)


class PackageCreated(Event, type="drone.package.created"):
    delivery_id: str
    package_id: str
    weight_kg: float
    pickup: str
    dropoff: str


class DroneAssigned(Event, type="drone.drone.assigned"):
    delivery_id: str
    package_id: str
    drone_id: str
    pickup: str
    dropoff: str


class DeliveryScheduled(Event, type="drone.delivery.scheduled"):
    """Terminal (completed): the delivery has a drone and a pickup time."""

    delivery_id: str
    package_id: str
    drone_id: str
    pickup_eta_s: int
    dropoff_eta_s: int


class DeliveryCancelled(Event, type="drone.delivery.cancelled"):
    """Terminal (failed): no drone could take the package; the package was cancelled."""

    delivery_id: str
    package_id: str
    reason: str
