"""Joins of workers whose inbox is on PostgreSQL: kept in the same schema, shared by replicas.

A private schema per test; skipped when PostgreSQL is unreachable, failed under CI.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from choreograph import Publisher, Worker
from choreograph.stores import _pg
from choreograph.stores.joins_base import Arrival, JoinKey
from choreograph.stores.joins_database import DatabaseJoins
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


async def test_a_join_arrival_in_a_service_database_racing_the_expiry_of_its_instance_creates_it_again(
    url: str,
) -> None:
    """Another handler's transaction expires the instance (created over RETENTION ago) after this
    arrival's INSERT found it and before it is locked: the arrival creates it again (was: AssertionError)."""
    key = JoinKey("shipping", "ship", "tx-old")
    store = PostgresJoinStore(url)
    await store.open()
    await store.arrive(key, 0, Arrival("a", b"{}"), slots=2, now=0.0, deadline=None)  # 7+ days old
    config = _pg.parse_url(url)
    settings = _pg.server_settings(config)
    mine = await asyncpg.connect(config.dsn, server_settings=settings)
    other = await asyncpg.connect(config.dsn, server_settings=settings)
    try:
        class Tx:
            backend = "postgresql"
            raced = False

            async def execute(self, sql: str, *args: Any) -> int:
                status = await mine.execute(sql, *args)
                if sql.startswith("INSERT INTO choreograph_join_instances") and not self.raced:
                    self.raced = True  # the expiry commits between our INSERT and our lock
                    await other.execute("DELETE FROM choreograph_join_instances WHERE created_at < 1")
                return _pg.rowcount(status)

            async def fetch(self, sql: str, *args: Any) -> list[Any]:
                return list(await mine.fetch(sql, *args))

            async def fetchone(self, sql: str, *args: Any) -> Any:
                return await mine.fetchrow(sql, *args)

            async def fetchval(self, sql: str, *args: Any) -> Any:
                return await mine.fetchval(sql, *args)

        tx = Tx()

        @contextlib.asynccontextmanager
        async def transaction() -> AsyncIterator[Any]:
            yield tx

        async with mine.transaction():
            state = await DatabaseJoins(transaction, url).arrive(
                key, 1, Arrival("b", b"{}"), slots=2, now=8 * 86400.0, deadline=None)
        assert tx.raced
        assert (state.created_by, sorted(state.arrivals), state.fired_by) == ("b", [1], None)
    finally:
        await mine.close()
        await other.close()
        await store.close()
