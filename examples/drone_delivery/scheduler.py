"""Drone Scheduler: assigns a drone from its fleet to each package.

Invariants, held by its own store in one transaction per assignment:

* a drone carries one delivery at a time (``drones.delivery_id`` is UNIQUE);
* a delivery gets at most one drone (``assignments.delivery_id`` is the key), so a
  redelivery (after a crash, a lost ack, a replay) answers with the drone it already
  has instead of taking a second one.

No drone free for the weight → ``Retry`` (a drone may come back); heavier than any
drone of the fleet → ``Reject`` (permanent). When it gives up, the runtime's failure
event lets Package compensate. The fleet is ``$DRONE_FLEET`` (``COUNTxMAX_KG`` groups,
default ``200x5,40x10,3x20``), seeded when the store is first created.
"""

from __future__ import annotations

import os
import sqlite3
import time

from choreograph import Context, Reject, Retry, RetryPolicy, Service
from choreograph.faults import Faults
from examples.drone_delivery._store import Store
from examples.drone_delivery.events import DeliveryCancelled, DroneAssigned, PackageCreated

DEFAULT_FLEET = "200x5,40x10,3x20"

scheduler = Service(
    "drone-scheduler",
    retry=RetryPolicy(max_attempts=5, base=0.1, max_interval=1.0),
    timeout=5.0,
)
faults = Faults.for_service(scheduler.name)


def parse_fleet(spec: str) -> list[tuple[str, float]]:
    """``"2x5,1x20"`` → ``[("d05-001", 5.0), ("d05-002", 5.0), ("d20-001", 20.0)]``."""
    drones = []
    for group in filter(None, (part.strip() for part in spec.split(","))):
        count, _, payload = group.partition("x")
        kg = float(payload)
        drones.extend((f"d{kg:02.0f}-{n:03d}", kg) for n in range(1, int(count) + 1))
    return drones


def _seed(conn: sqlite3.Connection) -> None:
    if conn.execute("SELECT COUNT(*) FROM drones").fetchone()[0] == 0:
        conn.executemany(
            "INSERT INTO drones (drone_id, max_payload_kg) VALUES (?, ?)",
            parse_fleet(os.environ.get("DRONE_FLEET") or DEFAULT_FLEET),
        )


store = Store(
    "drone-scheduler",
    """
    CREATE TABLE IF NOT EXISTS drones (
        drone_id TEXT PRIMARY KEY,
        max_payload_kg REAL NOT NULL,
        delivery_id TEXT UNIQUE            -- NULL while the drone is free
    );
    CREATE TABLE IF NOT EXISTS assignments (
        delivery_id TEXT PRIMARY KEY,
        drone_id TEXT NOT NULL REFERENCES drones(drone_id),
        assigned_at REAL NOT NULL,
        released_at REAL
    )
    """,
    seed=_seed,
)


class NoDroneFree(Exception):
    pass


def _assign(conn: sqlite3.Connection, package: PackageCreated) -> str:
    existing = conn.execute(
        "SELECT drone_id FROM assignments WHERE delivery_id = ?", (package.delivery_id,)
    ).fetchone()
    if existing is not None:
        return str(existing[0])
    largest = conn.execute("SELECT MAX(max_payload_kg) FROM drones").fetchone()[0] or 0.0
    if package.weight_kg > largest:
        raise Reject(
            f"package {package.package_id} weighs {package.weight_kg:g} kg; the largest drone carries {largest:g} kg"
        )
    row = conn.execute(
        "SELECT drone_id FROM drones WHERE delivery_id IS NULL AND max_payload_kg >= ? "
        "ORDER BY max_payload_kg, drone_id LIMIT 1",
        (package.weight_kg,),
    ).fetchone()
    if row is None:
        raise NoDroneFree(f"no drone free for {package.weight_kg:g} kg")
    drone_id = str(row[0])
    conn.execute("UPDATE drones SET delivery_id = ? WHERE drone_id = ?", (package.delivery_id, drone_id))
    conn.execute(
        "INSERT INTO assignments VALUES (?, ?, ?, NULL)", (package.delivery_id, drone_id, time.time())
    )
    return drone_id


@scheduler.on(PackageCreated)
async def assign_drone(package: PackageCreated, ctx: Context) -> DroneAssigned:
    """Assign the lightest free drone that can carry the package (the same one on a redelivery)."""
    async with faults.step(ctx):
        try:
            drone_id = await store.run(lambda conn: _assign(conn, package))
        except NoDroneFree as exc:
            raise Retry(str(exc), after=0.3) from None
    ctx.logger.info("drone %s assigned to delivery %s", drone_id, package.delivery_id)
    return DroneAssigned(
        delivery_id=package.delivery_id,
        package_id=package.package_id,
        drone_id=drone_id,
        pickup=package.pickup,
        dropoff=package.dropoff,
    )


def _release(conn: sqlite3.Connection, delivery_id: str) -> str | None:
    row = conn.execute("SELECT drone_id FROM drones WHERE delivery_id = ?", (delivery_id,)).fetchone()
    conn.execute("UPDATE drones SET delivery_id = NULL WHERE delivery_id = ?", (delivery_id,))
    conn.execute(
        "UPDATE assignments SET released_at = ? WHERE delivery_id = ? AND released_at IS NULL",
        (time.time(), delivery_id),
    )
    return None if row is None else str(row[0])


@scheduler.on(DeliveryCancelled)
async def release_drone(cancelled: DeliveryCancelled, ctx: Context) -> None:
    """A cancelled delivery gives its drone back to the fleet (if it had one)."""
    drone_id = await store.run(lambda conn: _release(conn, cancelled.delivery_id))
    if drone_id is None:
        ctx.logger.info("delivery %s cancelled: no drone to release", cancelled.delivery_id)
    else:
        ctx.logger.info("delivery %s cancelled: drone %s released", cancelled.delivery_id, drone_id)
