"""Joins of workers whose inbox is on PostgreSQL: kept in the same schema, shared by replicas.

A private schema per test; skipped when PostgreSQL is unreachable, failed under CI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from choreograph import Publisher, Worker
from choreograph.stores.joins_postgres import PostgresJoinStore
from choreograph.stores.postgres import PostgresStore
from choreograph.testing import VirtualClock, settled
from tests.stores._databases import fresh_postgres_url
from tests.test_joins import Paid, Reserved, SpyBus, shipped, shipping


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_postgres_url() as url:
        yield url


async def test_a_worker_keeps_its_joins_in_its_postgresql_inbox_schema_across_restarts(url: str) -> None:
    bus = SpyBus(VirtualClock())
    calls: list[tuple[Paid, Reserved]] = []
    for event in (Paid(order="o"), Reserved(order="o")):  # one arrival per worker lifetime
        inbox = PostgresStore(url)
        async with Worker([shipping(calls)], bus, store=inbox) as worker:
            assert isinstance(worker.joins, PostgresJoinStore)
            assert worker.joins.config.schema == inbox.config.schema
            await Publisher(bus).publish(event, correlation_id="tx")
            await settled(bus)
        await inbox.close()
    assert len(calls) == 1


async def test_two_replicas_sharing_a_postgresql_database_ship_each_order_once(url: str) -> None:
    bus = SpyBus(VirtualClock())
    calls: list[tuple[Paid, Reserved]] = []
    inboxes = [PostgresStore(url), PostgresStore(url)]
    # concurrency=1: the memory bus hands a batch to the first free consumer; one at a time spreads it
    replicas = [Worker([shipping(calls)], bus, store=inbox, concurrency=1) for inbox in inboxes]
    async with replicas[0], replicas[1]:
        publisher = Publisher(bus)
        for n in range(20):
            await publisher.publish(Paid(order=f"o-{n}"), Reserved(order=f"o-{n}"), correlation_id=f"tx-{n}")
        await settled(bus)
    assert all(replica.stats().handled for replica in replicas)  # both took part
    for inbox in inboxes:
        await inbox.close()
    orders = sorted(str(data["order"]) for data in shipped(bus))
    assert orders == sorted(f"o-{n}" for n in range(20))
    assert len(calls) == 20
