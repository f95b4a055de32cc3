"""Drone Scheduler: assigns a drone from its fleet to each package.

Invariants, held by its own database in the handler's transaction:

* a drone carries one delivery at a time (``drones.delivery_id`` is UNIQUE);
* a delivery gets at most one drone (``assignments.delivery_id`` is the key), so a
  second request for the same delivery (a new event: a client retry, a replay)
  answers with the drone it already has instead of taking a second one. A redelivery
  of the *same* event after a crash does not even run: its inbox record committed
  with the assignment;
* a delivery whose drone was released (it was cancelled) gets none again: a late
  ``PackageCreated`` of a second request is a ``Reject``, not the released drone,
  which another delivery may have taken meanwhile.

No drone free for the weight → ``Retry`` (a drone may come back); heavier than any
drone of the fleet → ``Reject`` (permanent). Either rolls the transaction back. When
it gives up, the runtime's failure event lets Package compensate. The fleet is
``$DRONE_FLEET`` (``COUNTxMAX_KG`` groups, default ``200x5,40x10,3x20``), seeded by
the first transaction that finds no drone.
"""

from __future__ import annotations

import os
import time

from choreograph import Context, Reject, Retry, RetryPolicy, Service
from choreograph.faults import Faults
from choreograph.runtime.outbox import Transaction
from examples.drone_delivery._store import Schema, database_url
from examples.drone_delivery.events import DeliveryCancelled, DroneAssigned, PackageCreated

DEFAULT_FLEET = "200x5,40x10,3x20"

scheduler = Service(
    "drone-scheduler",
    retry=RetryPolicy(max_attempts=5, base=0.1, max_interval=1.0),
    timeout=5.0,
    database=database_url("drone-scheduler"),
)
faults = Faults.for_service(scheduler.name)


def parse_fleet(spec: str) -> list[tuple[str, float]]:
    """``"2x5,1x20"`` → ``[("d05-001", 5.0), ("d05-002", 5.0), ("d20-001", 20.0)]``."""
    drones: list[tuple[str, float]] = []
    for group in filter(None, (part.strip() for part in spec.split(","))):
        count, _, payload = group.partition("x")
        kg = float(payload)
        drones.extend((f"d{kg:02.0f}-{n:03d}", kg) for n in range(1, int(count) + 1))
    return drones


async def _seed(tx: Transaction) -> None:
    await tx.executemany(
        "INSERT INTO drones (drone_id, max_payload_kg) VALUES ($1, $2)",
        parse_fleet(os.environ.get("DRONE_FLEET") or DEFAULT_FLEET),
    )


schema = Schema(
    """
    CREATE TABLE IF NOT EXISTS drones (
        drone_id TEXT PRIMARY KEY,
        max_payload_kg REAL NOT NULL,
        delivery_id TEXT UNIQUE            -- NULL while the drone is free
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS assignments (
        delivery_id TEXT PRIMARY KEY,
        drone_id TEXT NOT NULL REFERENCES drones(drone_id),
        assigned_at REAL NOT NULL,
        released_at REAL
    )
    """,
    seed=_seed,
    probe="drones",
)


class NoDroneFree(Exception):
    pass


async def assign(tx: Transaction, package: PackageCreated) -> str:
    """The drone of ``package``'s delivery: the one it already has, else the lightest free one that can carry it."""
    await schema.ensure(tx)
    existing = await tx.fetchone(
        "SELECT drone_id, released_at FROM assignments WHERE delivery_id = $1", package.delivery_id
    )
    if existing is not None:
        if existing["released_at"] is not None:  # its drone may fly another delivery by now
            raise Reject(
                f"delivery {package.delivery_id} was cancelled; its drone {existing['drone_id']} was released"
            )
        return str(existing["drone_id"])
    largest = await tx.fetchval("SELECT MAX(max_payload_kg) FROM drones") or 0.0
    if package.weight_kg > largest:
        raise Reject(
            f"package {package.package_id} weighs {package.weight_kg:g} kg; the largest drone carries {largest:g} kg"
        )
    drone_id = await tx.fetchval(
        "SELECT drone_id FROM drones WHERE delivery_id IS NULL AND max_payload_kg >= $1"
        " ORDER BY max_payload_kg, drone_id LIMIT 1",
        package.weight_kg,
    )
    if drone_id is None:
        raise NoDroneFree(f"no drone free for {package.weight_kg:g} kg")
    await tx.execute("UPDATE drones SET delivery_id = $1 WHERE drone_id = $2", package.delivery_id, drone_id)
    await tx.execute(
        "INSERT INTO assignments VALUES ($1, $2, $3, NULL)", package.delivery_id, drone_id, time.time()
    )
    return str(drone_id)


@scheduler.on(PackageCreated)
async def assign_drone(package: PackageCreated, ctx: Context) -> DroneAssigned:
    """Assign the lightest free drone that can carry the package (the same one on a repeat)."""
    async with faults.step(ctx):
        try:
            async with ctx.transaction() as tx:
                drone_id = await assign(tx, package)
        except NoDroneFree as exc:  # the block rolled back: nothing taken
            raise Retry(str(exc), after=0.3) from None
    ctx.logger.info("drone %s assigned to delivery %s", drone_id, package.delivery_id)
    return DroneAssigned(
        delivery_id=package.delivery_id,
        package_id=package.package_id,
        drone_id=drone_id,
        pickup=package.pickup,
        dropoff=package.dropoff,
    )


@scheduler.on(DeliveryCancelled)
async def release_drone(cancelled: DeliveryCancelled, ctx: Context) -> None:
    """A cancelled delivery gives its drone back to the fleet (if it had one)."""
    async with ctx.transaction() as tx:
        await schema.ensure(tx)
        drone_id = await tx.fetchval(
            "SELECT drone_id FROM drones WHERE delivery_id = $1", cancelled.delivery_id
        )
        await tx.execute("UPDATE drones SET delivery_id = NULL WHERE delivery_id = $1", cancelled.delivery_id)
        await tx.execute(
            "UPDATE assignments SET released_at = $1 WHERE delivery_id = $2 AND released_at IS NULL",
            time.time(),
            cancelled.delivery_id,
        )
    if drone_id is None:
        ctx.logger.info("delivery %s cancelled: no drone to release", cancelled.delivery_id)
    else:
        ctx.logger.info("delivery %s cancelled: drone %s released", cancelled.delivery_id, drone_id)
