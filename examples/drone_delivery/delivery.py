"""Delivery: schedules the flight of an assigned drone (the transaction's last step)."""

from __future__ import annotations

import time
import zlib

from choreograph import Context, Service
from choreograph.faults import Faults
from examples.drone_delivery._store import Schema, database_url
from examples.drone_delivery.events import DeliveryScheduled, DroneAssigned

delivery = Service("delivery", timeout=5.0, database=database_url("delivery"))
faults = Faults.for_service(delivery.name)

schema = Schema(
    """
    CREATE TABLE IF NOT EXISTS deliveries (
        delivery_id TEXT PRIMARY KEY,
        package_id TEXT NOT NULL,
        drone_id TEXT NOT NULL,
        pickup TEXT NOT NULL,
        dropoff TEXT NOT NULL,
        pickup_eta_s INTEGER NOT NULL,
        dropoff_eta_s INTEGER NOT NULL,
        scheduled_at REAL NOT NULL
    )
    """,
)


def _etas(pickup: str, dropoff: str) -> tuple[int, int]:
    """A stand-in for route planning: deterministic, so a re-run schedules the same times."""
    to_pickup = 60 + zlib.crc32(pickup.encode()) % 540
    flight = 60 * (1 + zlib.crc32(f"{pickup}|{dropoff}".encode()) % 20)
    return to_pickup, to_pickup + flight


@delivery.on(DroneAssigned)
async def schedule_delivery(assigned: DroneAssigned, ctx: Context) -> DeliveryScheduled:
    """Schedule once per delivery id; a repeat reads back the schedule already made."""
    pickup_eta, dropoff_eta = _etas(assigned.pickup, assigned.dropoff)
    async with faults.step(ctx), ctx.transaction() as tx:
        await schema.ensure(tx)
        await tx.execute(
            "INSERT INTO deliveries VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (delivery_id) DO NOTHING",
            assigned.delivery_id,
            assigned.package_id,
            assigned.drone_id,
            assigned.pickup,
            assigned.dropoff,
            pickup_eta,
            dropoff_eta,
            time.time(),
        )
        (row,) = await tx.fetch("SELECT * FROM deliveries WHERE delivery_id = $1", assigned.delivery_id)
    return DeliveryScheduled(
        delivery_id=row["delivery_id"],
        package_id=row["package_id"],
        drone_id=row["drone_id"],
        pickup_eta_s=row["pickup_eta_s"],
        dropoff_eta_s=row["dropoff_eta_s"],
    )
