"""The Drone Delivery services in one process on the in-memory bus (fast; the end-to-end tests use real processes).

Each service writes its own SQLite database in ``tmp_path`` through ``ctx.transaction()``;
its outputs leave through the outbox relay. The clock is real: retries here take about
a second, and ``settled()`` in virtual time can stall on a retry that falls due while
no consumer is looking (a consumer's timer registered after a jump lands late).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from examples.drone_delivery import delivery, scheduler
from examples.drone_delivery.app import app
from examples.drone_delivery.events import (
    DeliveryCancelled,
    DeliveryRequested,
    DeliveryScheduled,
    PackageCreated,
)
from examples.drone_delivery.scheduler import assign, parse_fleet

from choreograph import Publisher, Reject, Service, Worker
from choreograph.faults import Faults, FaultSpec
from choreograph.runtime.outbox import transaction
from choreograph.testing import MemoryTransport, settled


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fresh databases per test (the services resolved their URLs when imported)."""
    for service in app.services:
        monkeypatch.setattr(service, "database", f"sqlite:///{tmp_path / service.name}.db")
    monkeypatch.setenv("DRONE_FLEET", "2x5,1x20")
    monkeypatch.delenv("CHOREOGRAPH_FAULTS", raising=False)
    return tmp_path


ENDED: dict[str, str] = {}
watcher = Service("test-watcher")


@watcher.on(DeliveryScheduled)
async def scheduled(event: DeliveryScheduled) -> None:
    ENDED[event.delivery_id] = DeliveryScheduled.event_type()


@watcher.on(DeliveryCancelled)
async def cancelled(event: DeliveryCancelled) -> None:
    ENDED[event.delivery_id] = DeliveryCancelled.event_type()


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    async with Worker([*app.services, watcher], MemoryTransport()) as running:
        yield running


@pytest.fixture
def bus(worker: Worker) -> MemoryTransport:
    assert isinstance(worker.transport, MemoryTransport)
    return worker.transport


def _progress(worker: Worker) -> tuple[object, ...]:
    return (*dataclasses.astuple(worker.stats()), *(r.published for r in worker.outbox.relays.values()))


async def drained(worker: Worker, timeout: float = 20.0) -> None:
    """Nothing left on the bus and no outbox row unsent (the relays publish after each commit).

    The outbox lags are read off the loop, while handlers and relays carry on: the
    answer counts only if nothing moved meanwhile.
    """
    bus = worker.transport
    assert isinstance(bus, MemoryTransport)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        await settled(bus, timeout=timeout)
        before = _progress(worker)
        lags = [await worker.outbox.lag(name) for name in worker.outbox.relays]
        if all(lag.pending == 0 for lag in lags) and bus.pending() == (0, None) and _progress(worker) == before:
            return
        if loop.time() > give_up:
            raise TimeoutError(f"not drained after {timeout}s: {lags}")
        await asyncio.sleep(0.005)


async def outcomes(worker: Worker, *requests: DeliveryRequested) -> dict[str, str]:
    """Publish ``requests``; return delivery id → the type of the terminal event it reached."""
    ENDED.clear()
    await Publisher(worker.transport).publish(*requests)
    await drained(worker)
    return dict(ENDED)


def request(delivery_id: str, weight_kg: float) -> DeliveryRequested:
    return DeliveryRequested(
        delivery_id=delivery_id,
        package_id=f"p-{delivery_id}",
        weight_kg=weight_kg,
        pickup="Harbour",
        dropoff="Campus",
    )


def test_the_fleet_spec_lists_count_times_payload() -> None:
    assert parse_fleet("2x5,1x20") == [("d05-001", 5.0), ("d05-002", 5.0), ("d20-001", 20.0)]


async def test_each_delivery_gets_the_lightest_drone_that_can_carry_it(
    worker: Worker, data_dir: Path
) -> None:
    assert await outcomes(worker, request("light", 3), request("heavy", 15)) == {
        "light": "drone.delivery.scheduled",
        "heavy": "drone.delivery.scheduled",
    }
    rows = sqlite3.connect(data_dir / "drone-scheduler.db").execute(
        "SELECT delivery_id, drone_id FROM assignments"
    )
    assert dict(rows.fetchall()) == {"light": "d05-001", "heavy": "d20-001"}


async def test_no_drone_free_after_the_retries_dead_letters_and_cancels_the_package(
    worker: Worker, bus: MemoryTransport, data_dir: Path
) -> None:
    result = await outcomes(worker, request("first", 15))
    assert result == {"first": "drone.delivery.scheduled"}
    assert await outcomes(worker, request("second", 15)) == {"second": "drone.delivery.cancelled"}
    db = sqlite3.connect(data_dir / "package.db")
    assert db.execute("SELECT status FROM packages WHERE delivery_id = 'second'").fetchone() == ("cancelled",)
    (letter,) = await bus.dead_letters("drone-scheduler")
    assert letter.record["reason"] == "max_attempts"


async def test_assigning_the_same_delivery_again_answers_the_drone_it_already_has(data_dir: Path) -> None:
    created = PackageCreated(delivery_id="d1", package_id="p1", weight_kg=2, pickup="a", dropoff="b")

    async def assigned(package_created: PackageCreated) -> str:
        async with transaction(scheduler.scheduler) as tx:
            return await assign(tx, package_created)

    first = await assigned(created)
    again = await assigned(created)
    other = await assigned(created.model_copy(update={"delivery_id": "d2"}))
    assert first == again != other


async def test_a_late_package_of_a_cancelled_delivery_does_not_take_back_the_drone_it_released(
    data_dir: Path,
) -> None:
    """A second request for a delivery (a client retry under a new correlation id) whose
    ``PackageCreated`` reaches the scheduler after the delivery was cancelled and its drone
    released: answering "the drone it already has" flew a drone now another delivery's."""
    created = PackageCreated(delivery_id="d1", package_id="p1", weight_kg=2, pickup="a", dropoff="b")

    async with transaction(scheduler.scheduler) as tx:
        taken = await assign(tx, created)
    async with transaction(scheduler.scheduler) as tx:  # what release_drone does on DeliveryCancelled
        await tx.execute("UPDATE drones SET delivery_id = NULL WHERE delivery_id = 'd1'")
        await tx.execute("UPDATE assignments SET released_at = 1 WHERE delivery_id = 'd1'")
    async with transaction(scheduler.scheduler) as tx:
        assert await assign(tx, created.model_copy(update={"delivery_id": "d2"})) == taken  # free: reused
    with pytest.raises(Reject, match="d1 was cancelled"):
        async with transaction(scheduler.scheduler) as tx:
            await assign(tx, created)
    drones = sqlite3.connect(data_dir / "drone-scheduler.db")
    assert drones.execute("SELECT delivery_id FROM drones WHERE drone_id = ?", (taken,)).fetchone() == ("d2",)


async def test_a_delivery_that_reaches_its_end_leaves_every_step_in_its_service_database_with_its_inbox_record(
    worker: Worker, data_dir: Path
) -> None:
    assert await outcomes(worker, request("one", 3)) == {"one": "drone.delivery.scheduled"}
    for service, table in (("package", "packages"), ("drone-scheduler", "assignments"), ("delivery", "deliveries")):
        db = sqlite3.connect(data_dir / f"{service}.db")
        assert db.execute(f"SELECT delivery_id FROM {table}").fetchall() == [("one",)], service
        assert db.execute("SELECT count(*) FROM choreograph_inbox WHERE grp = ?", (service,)).fetchone() == (1,)
        assert db.execute("SELECT count(*) FROM choreograph_outbox WHERE sent_at IS NULL").fetchone() == (0,)


async def test_a_first_transaction_that_rejects_leaves_no_tables_behind_and_the_next_one_creates_them(
    worker: Worker, data_dir: Path
) -> None:
    assert await outcomes(worker, request("huge", 45)) == {"huge": "drone.delivery.cancelled"}
    assert await outcomes(worker, request("light", 3)) == {"light": "drone.delivery.scheduled"}
    drones = sqlite3.connect(data_dir / "drone-scheduler.db")
    assert drones.execute("SELECT COUNT(*) FROM drones").fetchone() == (3,)  # seeded once
    assert drones.execute("SELECT delivery_id FROM assignments").fetchall() == [("light",)]


async def test_when_delivery_gives_up_the_package_is_cancelled_and_its_drone_freed(
    worker: Worker, bus: MemoryTransport, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "faults", Faults("delivery", FaultSpec(fail_rate=1.0)))

    assert await outcomes(worker, request("doomed", 2)) == {"doomed": "drone.delivery.cancelled"}

    drones = sqlite3.connect(data_dir / "drone-scheduler.db")
    assert drones.execute("SELECT COUNT(*) FROM drones WHERE delivery_id IS NOT NULL").fetchone() == (0,)
    assert drones.execute(
        "SELECT released_at IS NOT NULL FROM assignments WHERE delivery_id = 'doomed'"
    ).fetchone() == (1,)
    (letter,) = await bus.dead_letters("delivery")
    assert letter.record["reason"] == "max_attempts"


def test_the_flow_lints_clean_and_failures_of_both_steps_after_package_are_compensated() -> None:
    from choreograph.flow import build, lint

    assert [f.code for f in lint(app)] == ["compensation-can-fail"] * 2  # infos: any compensation can give up
    compensations = {(e.source, e.target, e.handlers) for e in build(app).edges if e.kind == "compensates"}
    assert compensations == {
        ("event:drone.package.created", "service:package", ("cancel_unassigned",)),
        ("event:drone.drone.assigned", "service:package", ("cancel_unscheduled",)),
    }


async def test_a_delivery_id_reused_with_another_body_is_rejected_naming_the_fields_and_changes_nothing(
    worker: Worker, bus: MemoryTransport, data_dir: Path
) -> None:
    """``delivery_id`` is the delivery's idempotency key: the same body again is the same
    delivery (answered as before), another body under it is a conflict. Answering the first
    package to a request for another one told its client a drone flies a package it never saw."""
    first = request("d1", 2)
    assert await outcomes(worker, first) == {"d1": "drone.delivery.scheduled"}
    assert await outcomes(worker, first) == {"d1": "drone.delivery.scheduled"}  # a new event, the same body

    other = DeliveryRequested(delivery_id="d1", package_id="p-other", weight_kg=15, pickup="Harbour", dropoff="Mill")
    assert await outcomes(worker, other) == {}

    (letter,) = await bus.dead_letters("package")
    assert letter.record["reason"] == "rejected"
    message = letter.record["last_error"]["message"]
    assert "delivery_id 'd1'" in message
    for field in ("package_id", "weight_kg", "dropoff"):
        assert field in message, message
    assert "pickup" not in message  # the same as the first request's
    packages = sqlite3.connect(data_dir / "package.db")
    assert packages.execute("SELECT package_id, weight_kg, dropoff FROM packages").fetchall() == [
        ("p-d1", 2.0, "Campus")
    ]
    drones = sqlite3.connect(data_dir / "drone-scheduler.db")
    assert drones.execute("SELECT delivery_id, drone_id FROM assignments").fetchall() == [("d1", "d05-001")]


async def test_a_repeat_request_the_delivery_service_gives_up_on_does_not_cancel_the_delivery_already_scheduled(
    worker: Worker, bus: MemoryTransport, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client retry without an ``Idempotency-Key`` is a second transaction for the same
    delivery. When a step gave up on it, Package cancelled the delivery by its id: the first
    transaction's package, already scheduled, turned cancelled, and the scheduler freed its
    drone for another delivery while ``deliveries`` still had that drone flying this one."""
    first = request("d1", 2)
    assert await outcomes(worker, first) == {"d1": "drone.delivery.scheduled"}
    monkeypatch.setattr(delivery, "faults", Faults("delivery", FaultSpec(fail_rate=1.0)))

    assert await outcomes(worker, first) == {}  # the repeat fails; nothing to undo, nothing ends it

    (letter,) = await bus.dead_letters("delivery")
    assert letter.record["reason"] == "max_attempts"
    packages = sqlite3.connect(data_dir / "package.db")
    assert packages.execute("SELECT status FROM packages WHERE delivery_id = 'd1'").fetchall() == [("created",)]
    drones = sqlite3.connect(data_dir / "drone-scheduler.db")
    assert drones.execute("SELECT delivery_id FROM drones WHERE delivery_id IS NOT NULL").fetchall() == [("d1",)]
    assert drones.execute("SELECT released_at FROM assignments WHERE delivery_id = 'd1'").fetchall() == [(None,)]
