"""Joins of a service with a database: arrivals commit in the handler's transaction, on SQLite and PostgreSQL.

The service here ships an order once it is paid and reserved, writing a shipment row
through ``ctx.transaction()``. The worker is created the way a process creates it,
without a join store of its own: a restart is a new ``Worker`` on the same bus and
the same service database. Real clock, memory bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from choreograph import FAILED, Context, Event, Publisher, Reject, RetryPolicy, Service, Worker
from choreograph._envelope import new_id
from choreograph.runtime.outbox import transaction
from choreograph.runtime.records import first_envelope, to_message
from choreograph.testing import MemoryTransport
from choreograph.transports.base import Message
from tests.stores._databases import database_url  # noqa: F401 - fixture


class Paid(Event, type="test.dbjoins.paid"):
    order: str


class Reserved(Event, type="test.dbjoins.reserved"):
    order: str
    sku: str = "sku-1"


class Shipped(Event, type="test.dbjoins.shipped"):
    order: str


class Boom(Exception):
    pass


class SpyBus(MemoryTransport):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[Message] = []

    async def publish(self, messages: list[Message]) -> None:  # type: ignore[override]
        self.published.extend(messages)
        await super().publish(messages)

    def ids(self, type_: str) -> set[str]:
        return {m.id for m in self.published if m.type == type_}


def shipping(database: str, *, die_first: bool = False, swallow: bool = False, reject: bool = False,
             within: float | None = None) -> Service:
    svc = Service("shipping", database=database, retry=RetryPolicy(max_attempts=5, base=0.01, jitter=False))
    svc.calls = 0  # type: ignore[attr-defined]

    @svc.on_all(Paid, Reserved, within=within)
    async def ship(paid: Paid, reserved: Reserved, ctx: Context) -> Shipped:
        if reject:
            raise Reject("no courier")
        async with ctx.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS shipments (order_id TEXT PRIMARY KEY, n INTEGER)")
            await tx.execute("INSERT INTO shipments VALUES ($1, 1) ON CONFLICT (order_id) "
                             "DO UPDATE SET n = shipments.n + 1", paid.order)
        svc.calls += 1  # type: ignore[attr-defined]
        if die_first and svc.calls == 1:  # type: ignore[attr-defined]
            await asyncio.Event().wait()  # the process dies here: join complete, transaction not committed
        if swallow:
            try:
                async with ctx.transaction() as tx:
                    raise Boom("a statement fails; the handler carries on without it")
            except Boom:
                pass
        return Shipped(order=paid.order)

    return svc


async def drained(worker: Worker, bus: MemoryTransport, timeout: float = 20.0) -> None:
    """Nothing pending on the bus and no outbox row unsent, twice in a row."""
    give_up = asyncio.get_running_loop().time() + timeout
    quiet = 0
    while quiet < 3:
        lags = [await worker.outbox.lag(name) for name in worker.outbox.relays]
        idle = bus.pending() == (0, None) and all(lag.pending == 0 for lag in lags)
        quiet = quiet + 1 if idle else 0
        if asyncio.get_running_loop().time() > give_up:
            raise TimeoutError(f"not drained: {bus.pending()} {lags}")
        await asyncio.sleep(0.05)


async def shipments(database: str) -> dict[str, int]:
    async with transaction(Service("reader", database=database)) as tx:
        if tx.backend == "sqlite":
            exists = await tx.fetchval("SELECT 1 FROM sqlite_master WHERE name = 'shipments'")
        else:
            exists = await tx.fetchval("SELECT to_regclass('shipments')")
        rows = await tx.fetch("SELECT order_id, n FROM shipments") if exists else []
    return {row[0]: row[1] for row in rows}


@pytest.fixture
def bus() -> SpyBus:
    return SpyBus()


@pytest.fixture
def database(database_url: str) -> str:  # noqa: F811 - the fixture imported above
    return database_url


async def test_a_join_keeps_its_first_arrival_across_a_restart_of_a_worker_without_a_join_store(
    bus: SpyBus, database: str
) -> None:
    svc = shipping(database)
    async with Worker([svc], bus) as first:
        await Publisher(bus).publish(Paid(order="o-1"), correlation_id="c-1")
        await drained(first, bus)
    async with Worker([svc], bus) as second:  # a restarted process: nothing in memory
        await Publisher(bus).publish(Reserved(order="o-1"), correlation_id="c-1")
        await drained(second, bus)
    assert await shipments(database) == {"o-1": 1}
    assert len(bus.ids(Shipped.event_type())) == 1


async def publish_as_another_producer(
    bus: MemoryTransport, *events: Event, correlation_id: str, ids: list[str] | None = None
) -> None:
    """Publish ``events`` as another producer may: a Publisher refuses an id or correlation id
    holding what a CloudEvents String must not (U+0000), which a worker still handles."""
    envelopes = [first_envelope(event, source="/other", id=ids[i] if ids else new_id()) for i, event in enumerate(events)]
    for envelope in envelopes:
        envelope.correlationid = correlation_id
    await bus.publish([to_message(envelope) for envelope in envelopes])


async def test_a_join_of_a_transaction_with_a_long_or_odd_correlation_id_fires_once(bus: SpyBus, database: str) -> None:
    """PostgreSQL text holds no U+0000 and its index entries no 3 kB: each arrival of such a
    transaction failed, was dead-lettered, and the join never fired."""
    svc = shipping(database)
    odd = {"o-nul": "c\x00nul", "o-long": "c-" + secrets.token_hex(2000)}
    async with Worker([svc], bus) as worker:
        for order, correlation in odd.items():
            await publish_as_another_producer(bus, Paid(order=order), Reserved(order=order), correlation_id=correlation)
        await drained(worker, bus)
        assert worker.stats("shipping").dead_lettered == 0
    assert await shipments(database) == dict.fromkeys(odd, 1)
    assert len(bus.ids(Shipped.event_type())) == 2


async def test_a_join_of_events_whose_ids_hold_u0000_fires_once(bus: SpyBus, database: str) -> None:
    """PostgreSQL text holds no U+0000: each arrival of such an event failed in the service's
    database (the arrival's id is stored), was dead-lettered, and the join never fired."""
    svc = shipping(database)
    async with Worker([svc], bus) as worker:
        await publish_as_another_producer(bus, Paid(order="o-nul"), Reserved(order="o-nul"), correlation_id="c-nul",
                                          ids=["paid\x00", "reserved\x00"])
        await drained(worker, bus)
        assert worker.stats("shipping").dead_lettered == 0
    assert await shipments(database) == {"o-nul": 1}
    assert len(bus.ids(Shipped.event_type())) == 1


async def test_a_run_that_dies_after_completing_the_join_runs_again_after_a_restart_and_ships_once(
    bus: SpyBus, database: str
) -> None:
    """The crash point of the brief: the join is complete, its function's transaction not committed."""
    svc = shipping(database, die_first=True)
    async with Worker([svc], bus, drain_timeout=0.1):  # stopping cancels the stuck run, as a kill would
        await Publisher(bus).publish(Paid(order="o-1"), Reserved(order="o-1"), correlation_id="c-1")
        for _ in range(500):  # until the join's function is running
            if svc.calls:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        assert svc.calls == 1  # type: ignore[attr-defined]
    async with Worker([svc], bus) as second:
        await drained(second, bus)
    assert await shipments(database) == {"o-1": 1}  # the failed attempt's row rolled back
    assert len(bus.ids(Shipped.event_type())) == 1


async def test_many_joins_completed_by_concurrent_arrivals_in_two_workers_each_ship_once(
    bus: SpyBus, database: str
) -> None:
    svc = shipping(database)
    orders = [f"o-{n}" for n in range(20)]
    async with Worker([svc], bus, concurrency=8) as one, Worker([svc], bus, concurrency=8):
        publisher = Publisher(bus)
        await asyncio.gather(*(publisher.publish(Paid(order=o), correlation_id=o) for o in orders),
                             *(publisher.publish(Reserved(order=o), correlation_id=o) for o in orders))
        await drained(one, bus)
        await asyncio.sleep(0.2)
        await drained(one, bus)
    assert await shipments(database) == dict.fromkeys(orders, 1)
    assert len(bus.ids(Shipped.event_type())) == len(orders)


async def test_a_join_function_that_swallows_a_rolled_back_block_still_completes_the_join(
    bus: SpyBus, database: str
) -> None:
    """The rollback took the arrival with it; the join records it again, so its deadline finds it fired."""
    svc = shipping(database, swallow=True, within=0.5)
    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Paid(order="o-1"), Reserved(order="o-1"), correlation_id="c-1")
        await drained(worker, bus)
        await asyncio.sleep(0.6)  # past the deadline: the timer must find the join fired
        await drained(worker, bus)
    assert len(bus.ids(Shipped.event_type())) == 1
    assert [m for m in bus.published if m.type == FAILED] == []
    assert await shipments(database) == {}  # the rolled-back block's row is gone


async def test_a_join_function_that_gives_up_announces_both_arrivals_as_failed(bus: SpyBus, database: str) -> None:
    """Its rollback also took the completing arrival: the fan-out records it, then announces the other."""
    svc = shipping(database, reject=True)
    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Paid(order="o-1"), Reserved(order="o-1"), correlation_id="c-1")
        await drained(worker, bus)
    failed = {m.id: m for m in bus.published if m.type == FAILED}
    announced = {type_ for type_ in (Paid.event_type(), Reserved.event_type())
                 if any(f'"type":"{type_}"'.encode() in m.body for m in failed.values())}
    assert announced == {Paid.event_type(), Reserved.event_type()}
    assert bus.ids(Shipped.event_type()) == set()


def test_the_join_tables_live_in_the_service_database(tmp_path: Path) -> None:
    async def run() -> None:
        bus = SpyBus()
        svc = shipping(f"sqlite:///{tmp_path / 'shipping.db'}")
        async with Worker([svc], bus) as worker:
            await Publisher(bus).publish(Paid(order="o-1"), Reserved(order="o-1"), correlation_id="c-1")
            await drained(worker, bus)

    asyncio.run(run())
    db = sqlite3.connect(tmp_path / "shipping.db")
    (fired_by,) = db.execute("SELECT fired_by FROM choreograph_join_instances WHERE correlation = 'c-1'").fetchone()
    inbox = {row[0] for row in db.execute("SELECT event_id FROM choreograph_inbox")}
    assert fired_by in inbox  # the completing arrival committed with the inbox record of its event


class Cancelled(Event, type="test.dbjoins.cancelled"):
    order: str


class Refunded(Event, type="test.dbjoins.refunded"):
    order: str


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    give_up = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > give_up:
            raise TimeoutError(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def test_a_join_function_waiting_before_its_transaction_does_not_stop_other_joins_of_the_service(
    bus: SpyBus, database: str
) -> None:
    """The completing arrival is recorded after the function, so slow work before its block holds no lock.

    Recorded first (on SQLite: the writer turn of the whole file) it would stall every
    other handler of the service until the function returned: here, for ever.
    """
    gate, blocked = asyncio.Event(), asyncio.Event()
    svc = Service("shipping", database=database)
    runs: list[str] = []

    @svc.on_all(Paid, Reserved)
    async def ship(paid: Paid, reserved: Reserved, ctx: Context) -> Shipped:
        if paid.order == "o-slow":
            blocked.set()
            await gate.wait()  # a slow call, before the transaction
        async with ctx.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS shipments (order_id TEXT PRIMARY KEY)")
            await tx.execute("INSERT INTO shipments VALUES ($1)", paid.order)
        runs.append(paid.order)
        return Shipped(order=paid.order)

    async with Worker([svc], bus) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Paid(order="o-slow"), correlation_id="c-slow")
        await until(lambda: bus.pending() == (0, None), "the first arrival handled")
        await publisher.publish(Reserved(order="o-slow"), correlation_id="c-slow")
        await asyncio.wait_for(blocked.wait(), 20)
        await publisher.publish(Paid(order="o-fast"), Reserved(order="o-fast"), correlation_id="c-fast")
        await until(lambda: "o-fast" in runs and len(bus.ids(Shipped.event_type())) == 1,
                    "the other join shipped while the first one's function waited")
        gate.set()
        await drained(worker, bus)
    assert runs == ["o-fast", "o-slow"]
    assert len(bus.ids(Shipped.event_type())) == 2


async def test_a_compensation_whose_trigger_raced_another_while_it_ran_is_rolled_back_and_not_run_again(
    bus: SpyBus, database: str
) -> None:
    """Two triggers both complete the compensation and run (neither holds the join while its
    function runs); the one that records its arrival second finds the compensation fired by
    the other: its run rolls back, and its retry does nothing."""
    gate, blocked = asyncio.Event(), asyncio.Event()
    svc = Service("payment", database=database, retry=RetryPolicy(max_attempts=5, base=0.01, jitter=False))
    runs: list[str] = []

    @svc.compensate(Paid, on=[Cancelled, Reserved])
    async def refund(paid: Paid, cause: Cancelled | Reserved, ctx: Context) -> Refunded:
        if isinstance(cause, Cancelled) and not gate.is_set():
            blocked.set()
            await gate.wait()
        async with ctx.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS refunds (order_id TEXT, cause TEXT)")
            await tx.execute("INSERT INTO refunds VALUES ($1, $2)", paid.order, type(cause).__name__)
        runs.append(type(cause).__name__)
        return Refunded(order=paid.order)

    async with Worker([svc], bus) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Paid(order="o-1"), correlation_id="c-1")
        await until(lambda: bus.pending() == (0, None), "the step recorded")
        await publisher.publish(Cancelled(order="o-1"), correlation_id="c-1")
        await asyncio.wait_for(blocked.wait(), 20)
        await publisher.publish(Reserved(order="o-1"), correlation_id="c-1")
        await until(lambda: len(bus.ids(Refunded.event_type())) == 1, "the second trigger refunded")
        gate.set()
        await drained(worker, bus)
        await asyncio.sleep(0.1)
        await drained(worker, bus)
    async with transaction(Service("reader", database=database)) as tx:
        rows = [tuple(row) for row in await tx.fetch("SELECT order_id, cause FROM refunds")]
    assert rows == [("o-1", "Reserved")]  # the first trigger's run, which raced, left nothing
    assert runs[0] == "Reserved"
    assert len(bus.ids(Refunded.event_type())) == 1


async def test_a_join_under_a_virtual_clock_keeps_its_arrivals_when_old_instances_are_dropped(tmp_path: Path) -> None:
    """Join instances in a service database are dropped by the worker's clock, the one that dates
    them: by the wall clock, every instance a virtual clock dated (2026-01-01) was over 7 days old,
    and the hourly pass dropped the first arrival of a join that then never fired."""
    from choreograph.stores import joins_database
    from choreograph.testing import VirtualClock, settled

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    database = f"sqlite:///{tmp_path / 'shipping.db'}"
    svc = shipping(database)
    async with Worker([svc], bus, clock=clock):
        await Publisher(bus).publish(Paid(order="o-1"), correlation_id="c-1")
        await settled(bus)
        clock.advance(2 * 3600.0)
        joins_database._prepared(database).expired_at -= 2 * 3600.0  # an hour since the last pass, on any clock
        await Publisher(bus).publish(Reserved(order="o-1"), correlation_id="c-1")
        await settled(bus)
    assert await shipments(database) == {"o-1": 1}


async def test_old_join_instances_in_a_service_database_are_kept_until_their_deadline_has_passed(
    database: str,
) -> None:
    from choreograph.stores.joins_base import Arrival, JoinKey
    from choreograph.stores.joins_database import DatabaseJoins, prepare
    from choreograph.stores.state import open_database

    svc = Service("shipping", database=database)
    await prepare(open_database(database))
    key = JoinKey("shipping", "ship", "c-1")

    async def in_transaction(call: Callable[[DatabaseJoins], Any]) -> Any:
        async with transaction(svc) as tx:
            @contextlib.asynccontextmanager
            async def same() -> AsyncIterator[Any]:
                yield tx

            return await call(DatabaseJoins(same, database))

    await in_transaction(lambda j: j.arrive(key, 0, Arrival("a", b"{}"), slots=2, now=100.0, deadline=1000.0))
    assert await in_transaction(lambda j: j.expire(500.0)) == 0
    state = await in_transaction(lambda j: j.time_out(key))
    assert state is not None and state.timed_out and sorted(state.arrivals) == [0]
    assert await in_transaction(lambda j: j.expire(1001.0)) == 1
    assert await in_transaction(lambda j: j.get(key)) is None


async def test_the_hours_pass_over_old_join_instances_stands_when_it_ran_in_a_rolled_back_run(database: str) -> None:
    """The hourly expiry runs in the transaction of a join's handler run. The run that completes
    a join rolls its first record back before the function runs (and a run that fails rolls back
    everything): the pass went with it, yet it counted as done, so old instances stayed for
    another hour - for good if the hour's first run was always such a one."""
    from choreograph.stores import joins_database
    from choreograph.testing import VirtualClock, settled

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    svc = shipping(database)

    async def instances() -> list[str]:
        async with transaction(Service("reader", database=database)) as tx:
            return sorted(row[0] for row in await tx.fetch("SELECT correlation FROM choreograph_join_instances"))

    async with Worker([svc], bus, clock=clock):
        await Publisher(bus).publish(Paid(order="old"), correlation_id="old")  # never completed
        await settled(bus)
        clock.advance(joins_database.RETENTION - 3600.0)
        await Publisher(bus).publish(Paid(order="o-1"), correlation_id="c-1")  # a pass: nothing old enough yet
        await settled(bus)
        assert await instances() == ["c-1", "old"]
        clock.advance(2 * 3600.0)
        await Publisher(bus).publish(Reserved(order="o-1"), correlation_id="c-1")  # the hour's first run
        await settled(bus)
        assert await shipments(database) == {"o-1": 1}
        await Publisher(bus).publish(Paid(order="o-2"), correlation_id="c-2")  # the same hour: no pass
        await settled(bus)
        assert await instances() == ["c-1", "c-2"]
