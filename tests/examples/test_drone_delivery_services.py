"""The Drone Delivery services in one process on the in-memory bus (fast; the end-to-end tests use real processes)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from examples.drone_delivery import delivery, package, scheduler
from examples.drone_delivery.app import app
from examples.drone_delivery.events import (
    DeliveryCancelled,
    DeliveryRequested,
    DeliveryScheduled,
    PackageCreated,
)
from examples.drone_delivery.scheduler import _assign, parse_fleet

from choreograph import Publisher, Service, Worker
from choreograph.faults import Faults, FaultSpec
from choreograph.testing import MemoryTransport, VirtualClock, settled


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CHOREOGRAPH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DRONE_FLEET", "2x5,1x20")
    monkeypatch.delenv("CHOREOGRAPH_FAULTS", raising=False)
    yield tmp_path
    for module in (package, scheduler, delivery):
        module.store.close()


ENDED: dict[str, str] = {}
watcher = Service("test-watcher")


@watcher.on(DeliveryScheduled)
async def scheduled(event: DeliveryScheduled) -> None:
    ENDED[event.delivery_id] = DeliveryScheduled.event_type()


@watcher.on(DeliveryCancelled)
async def cancelled(event: DeliveryCancelled) -> None:
    ENDED[event.delivery_id] = DeliveryCancelled.event_type()


@pytest.fixture
async def bus() -> AsyncIterator[MemoryTransport]:
    transport = MemoryTransport(clock=VirtualClock())
    async with Worker([*app.services, watcher], transport):
        yield transport


async def outcomes(bus: MemoryTransport, *requests: DeliveryRequested) -> dict[str, str]:
    """Publish ``requests``; return delivery id → the type of the terminal event it reached."""
    ENDED.clear()
    await Publisher(bus).publish(*requests)
    await settled(bus, timeout=20)
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
    bus: MemoryTransport, data_dir: Path
) -> None:
    assert await outcomes(bus, request("light", 3), request("heavy", 15)) == {
        "light": "drone.delivery.scheduled",
        "heavy": "drone.delivery.scheduled",
    }
    rows = sqlite3.connect(data_dir / "drone-scheduler.db").execute(
        "SELECT delivery_id, drone_id FROM assignments"
    )
    assert dict(rows.fetchall()) == {"light": "d05-001", "heavy": "d20-001"}


async def test_no_drone_free_after_the_retries_dead_letters_and_cancels_the_package(
    bus: MemoryTransport, data_dir: Path
) -> None:
    result = await outcomes(bus, request("first", 15))
    assert result == {"first": "drone.delivery.scheduled"}
    assert await outcomes(bus, request("second", 15)) == {"second": "drone.delivery.cancelled"}
    db = sqlite3.connect(data_dir / "package.db")
    assert db.execute("SELECT status FROM packages WHERE delivery_id = 'second'").fetchone() == ("cancelled",)
    (letter,) = await bus.dead_letters("drone-scheduler")
    assert letter.record["reason"] == "max_attempts"


async def test_assigning_the_same_delivery_again_answers_the_drone_it_already_has(data_dir: Path) -> None:
    created = PackageCreated(delivery_id="d1", package_id="p1", weight_kg=2, pickup="a", dropoff="b")
    first = await scheduler.store.run(lambda conn: _assign(conn, created))
    again = await scheduler.store.run(lambda conn: _assign(conn, created))
    other = await scheduler.store.run(
        lambda conn: _assign(conn, created.model_copy(update={"delivery_id": "d2"}))
    )
    assert first == again != other


async def test_when_delivery_gives_up_the_package_is_cancelled_and_its_drone_freed(
    bus: MemoryTransport, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "faults", Faults("delivery", FaultSpec(fail_rate=1.0)))

    assert await outcomes(bus, request("doomed", 2)) == {"doomed": "drone.delivery.cancelled"}

    drones = sqlite3.connect(data_dir / "drone-scheduler.db")
    assert drones.execute("SELECT COUNT(*) FROM drones WHERE delivery_id IS NOT NULL").fetchone() == (0,)
    assert drones.execute(
        "SELECT released_at IS NOT NULL FROM assignments WHERE delivery_id = 'doomed'"
    ).fetchone() == (1,)
    (letter,) = await bus.dead_letters("delivery")
    assert letter.record["reason"] == "max_attempts"


def test_the_flow_lints_clean_and_failures_of_both_steps_after_package_are_compensated() -> None:
    from choreograph.flow import build, lint

    assert lint(app) == []
    compensations = {(e.source, e.target, e.handlers) for e in build(app).edges if e.kind == "compensates"}
    assert compensations == {
        ("event:drone.package.created", "service:package", ("cancel_unassigned",)),
        ("event:drone.drone.assigned", "service:package", ("cancel_unscheduled",)),
    }
