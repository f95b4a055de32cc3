"""Package: records the package of a delivery, and cancels it when the delivery cannot happen.

The compensation is wired with ``on_failure``: when the Drone Scheduler gives up on
``PackageCreated`` (no drone free after its retries, or a permanent rejection), or the
Delivery service gives up on ``DroneAssigned``, the runtime publishes a failure event
and this service cancels the package. Nobody orchestrates it.
"""

from __future__ import annotations

import time

from choreograph import Context, Failure, Reject, Service
from choreograph.faults import Faults
from choreograph.stores.state import Row
from examples.drone_delivery._store import Schema, database_url
from examples.drone_delivery.events import (
    DeliveryCancelled,
    DeliveryRequested,
    DroneAssigned,
    PackageCreated,
)

package = Service("package", timeout=5.0, database=database_url("package"))
faults = Faults.for_service(package.name)

schema = Schema(
    """
    CREATE TABLE IF NOT EXISTS packages (
        delivery_id TEXT PRIMARY KEY,
        package_id TEXT NOT NULL,
        weight_kg REAL NOT NULL,
        pickup TEXT NOT NULL,
        dropoff TEXT NOT NULL,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,            -- created | cancelled
        reason TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
    # The transaction (correlation id) whose request created each package: only its failures
    # cancel it. A table of its own, so a packages table from before it needs no migration.
    """
    CREATE TABLE IF NOT EXISTS package_creators (
        delivery_id TEXT PRIMARY KEY,
        correlation_id TEXT NOT NULL
    )
    """,
)


_REQUEST_FIELDS = ("package_id", "weight_kg", "pickup", "dropoff", "owner")
"""What a request for a delivery id says, compared with the row its first request wrote."""


def _conflicts(request: DeliveryRequested, row: Row) -> list[str]:
    """``field: 'sent' (first request: 'stored')`` for each field ``request`` changes."""
    return [
        f"{field} {getattr(request, field)!r} (first request: {row[field]!r})"
        for field in _REQUEST_FIELDS
        if getattr(request, field) != row[field]
    ]


@package.on(DeliveryRequested)
async def create_package(request: DeliveryRequested, ctx: Context) -> PackageCreated | DeliveryCancelled:
    """Upsert the package keyed by delivery id (a repeat request changes nothing).

    ``delivery_id`` is the delivery's idempotency key: the same body again (a client
    retry, a replay) is answered as the first was, but another body under a delivery id
    already taken is a ``Reject`` naming the fields that differ (dead-lettered; the
    journal shows the transaction failed with that reason). Answering it with the first
    package told its client that a drone flies a package, a weight, a route it never sent.

    The row, the inbox record of the request and the event returned commit together
    when this returns; the outbox relay publishes the event afterwards.
    """
    now = time.time()
    async with faults.step(ctx), ctx.transaction() as tx:
        await schema.ensure(tx)
        created = await tx.execute(
            "INSERT INTO packages VALUES ($1, $2, $3, $4, $5, $6, 'created', NULL, $7, $7)"
            " ON CONFLICT (delivery_id) DO NOTHING",
            request.delivery_id,
            request.package_id,
            request.weight_kg,
            request.pickup,
            request.dropoff,
            request.owner,
            now,
        )
        if created:
            await tx.execute(
                "INSERT INTO package_creators VALUES ($1, $2)", request.delivery_id, ctx.correlation_id
            )
        (row,) = await tx.fetch("SELECT * FROM packages WHERE delivery_id = $1", request.delivery_id)
        conflicts = _conflicts(request, row)
        if conflicts:  # rolls back: nothing written, the first delivery untouched
            raise Reject(
                f"delivery_id {request.delivery_id!r} was first requested with another body (409 conflict): "
                f"{'; '.join(conflicts)}; send the same body again, or use a new delivery_id"
            )
    if row["status"] == "cancelled":  # asked again for a delivery already cancelled: say so again
        return DeliveryCancelled(
            delivery_id=row["delivery_id"], package_id=row["package_id"], reason=row["reason"]
        )
    ctx.logger.info("package %s created for delivery %s", row["package_id"], row["delivery_id"])
    return PackageCreated(
        delivery_id=row["delivery_id"],
        package_id=row["package_id"],
        weight_kg=row["weight_kg"],
        pickup=row["pickup"],
        dropoff=row["dropoff"],
    )


async def _cancel(
    delivery_id: str, package_id: str, failure: Failure, ctx: Context
) -> DeliveryCancelled | None:
    """Cancel the package if the transaction that failed is the one that created it.

    A second request for a delivery (a client retry without an ``Idempotency-Key``, a
    replayed dead letter) is another transaction over the same package: when a step gives
    up on it, the delivery the first one scheduled still stands, and cancelling it (the
    scheduler then frees its drone) left a drone flying a delivery the fleet counted free.
    Such a failure cancels nothing; it answers ``DeliveryCancelled`` only when the package
    was cancelled already (that is how its transaction ended), else nothing, and the
    journal shows that transaction failed, with its dead letter.
    """
    error = failure.record.get("last_error") or {}
    reason = (
        f"{failure.record.get('service', '?')} gave up ({failure.reason}): {error.get('message', '')}".strip()
    )
    async with faults.step(ctx), ctx.transaction() as tx:
        await schema.ensure(tx)
        creator = await tx.fetchval(
            "SELECT correlation_id FROM package_creators WHERE delivery_id = $1", delivery_id
        )
        if creator is None or creator == ctx.correlation_id:  # None: created before creators were kept
            await tx.execute(
                "UPDATE packages SET status = 'cancelled', reason = $1, updated_at = $2"
                " WHERE delivery_id = $3 AND status != 'cancelled'",
                reason,
                time.time(),
                delivery_id,
            )
        status, stored = (
            await tx.fetchone("SELECT status, reason FROM packages WHERE delivery_id = $1", delivery_id)
            or (None, None)
        )
    if status == "created":  # another transaction's delivery, which this failure does not undo
        ctx.logger.warning("delivery %s not cancelled: %s failed on a repeat request (%s)",
                           delivery_id, ctx.correlation_id, reason)
        return None
    stored_reason = str(stored) if stored else reason  # the first cancellation's reason stands
    ctx.logger.warning("delivery %s cancelled: %s", delivery_id, stored_reason)
    return DeliveryCancelled(delivery_id=delivery_id, package_id=package_id, reason=stored_reason)


def _ids(failure: Failure) -> tuple[str, str]:
    if failure.event is not None:
        return failure.event.delivery_id, failure.event.package_id  # type: ignore[attr-defined]
    data = failure.envelope.data if isinstance(failure.envelope.data, dict) else {}
    return str(data.get("delivery_id", "")), str(data.get("package_id", ""))


@package.on_failure(PackageCreated)
async def cancel_unassigned(failure: Failure, ctx: Context) -> DeliveryCancelled | None:
    """No drone could be assigned: cancel the package (the compensation of create_package)."""
    return await _cancel(*_ids(failure), failure, ctx)


@package.on_failure(DroneAssigned)
async def cancel_unscheduled(failure: Failure, ctx: Context) -> DeliveryCancelled | None:
    """The delivery could not be scheduled: cancel the package (the scheduler then frees the drone)."""
    return await _cancel(*_ids(failure), failure, ctx)
