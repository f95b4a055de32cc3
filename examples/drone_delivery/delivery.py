"""Delivery: schedules the flight of an assigned drone (the transaction's last step)."""

from __future__ import annotations

import sqlite3
import time
import zlib

from choreograph import Context, Service
from choreograph.faults import Faults
from examples.drone_delivery._store import Store
from examples.drone_delivery.events import DeliveryScheduled, DroneAssigned

delivery = Service("delivery", timeout=5.0)
faults = Faults.for_service(delivery.name)

store = Store(
    "delivery",
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


def _schedule(conn: sqlite3.Connection, assigned: DroneAssigned) -> sqlite3.Row:
    pickup_eta, dropoff_eta = _etas(assigned.pickup, assigned.dropoff)
    conn.execute(
        "INSERT INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(delivery_id) DO NOTHING",
        (
            assigned.delivery_id,
            assigned.package_id,
            assigned.drone_id,
            assigned.pickup,
            assigned.dropoff,
            pickup_eta,
            dropoff_eta,
            time.time(),
        ),
    )
    row: sqlite3.Row = conn.execute(
        "SELECT * FROM deliveries WHERE delivery_id = ?", (assigned.delivery_id,)
    ).fetchone()
    return row


@delivery.on(DroneAssigned)
async def schedule_delivery(assigned: DroneAssigned, ctx: Context) -> DeliveryScheduled:
    """Schedule once per delivery id; a redelivery reads back the schedule already made."""
    async with faults.step(ctx):
        row = await store.run(lambda conn: _schedule(conn, assigned))
    return DeliveryScheduled(
        delivery_id=row["delivery_id"],
        package_id=row["package_id"],
        drone_id=row["drone_id"],
        pickup_eta_s=row["pickup_eta_s"],
        dropoff_eta_s=row["dropoff_eta_s"],
    )
