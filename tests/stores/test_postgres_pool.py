"""The service database on PostgreSQL: its hand-off pool, BEGIN sent ahead, and relay wake-ups.

Each test takes a private schema in the local PostgreSQL (``postgres_database_url``).
"""

from __future__ import annotations

import asyncio

import pytest

from choreograph.stores._pg import parse_url
from choreograph.stores._pg_pool import HandoffPool
from choreograph.stores.state import StateStore, open_database
from choreograph.transports.base import Message
from tests.stores._databases import postgres_database_url  # noqa: F401 - fixture

SERVICE = "svc"


def one_connection(url: str) -> str:
    return f"{url}&pool_min=0&pool_max=1"


def msg(n: int) -> Message:
    return Message(f"m{n}", "test.pool.item", b"{}")


async def make_items(db: StateStore) -> None:
    tx = await db.begin()
    await tx.execute("CREATE TABLE items (id text PRIMARY KEY)", ())
    await tx.commit(inbox=None, service=SERVICE, messages=[])


async def test_a_commit_hands_its_connection_begun_to_a_waiting_transaction(postgres_database_url: str) -> None:  # noqa: F811
    async with open_database(one_connection(postgres_database_url)) as db:
        await make_items(db)
        first = await db.begin()
        await first.execute("INSERT INTO items (id) VALUES ('a')", ())
        second = await db.begin()
        waiting = asyncio.create_task(second.execute("INSERT INTO items (id) VALUES ('b')", ()))
        await asyncio.sleep(0.05)  # second waits for the only connection
        assert await first.commit(inbox=("g", "e1"), service=SERVICE, messages=[msg(1)])
        assert first.begun_next  # type: ignore[attr-defined]
        await waiting
        assert await second.commit(inbox=("g", "e2"), service=SERVICE, messages=[msg(2)])
        tx = await db.begin()
        rows = await tx.fetch("SELECT id FROM items ORDER BY id", ())
        await tx.rollback()
        assert [row["id"] for row in rows] == ["a", "b"]
        assert await db.seen("g", ["e1", "e2"]) == {"e1", "e2"}


async def test_a_statement_outside_a_transaction_never_gets_a_begun_connection(postgres_database_url: str) -> None:  # noqa: F811
    async with open_database(one_connection(postgres_database_url)) as db:
        await make_items(db)
        first = await db.begin()
        await first.execute("INSERT INTO items (id) VALUES ('a')", ())
        marking = asyncio.create_task(db.mark("g", ["e9"]))  # an inbox write waits for the connection
        await asyncio.sleep(0.05)
        assert await first.commit(inbox=("g", "e1"), service=SERVICE, messages=[])
        assert not first.begun_next  # type: ignore[attr-defined]
        await marking
        assert await db.seen("g", ["e9"]) == {"e9"}  # it committed: it did not run in an open transaction


async def test_a_waiter_that_gives_up_does_not_hold_the_line(postgres_database_url: str) -> None:  # noqa: F811
    pool = HandoffPool(parse_url(one_connection(postgres_database_url)))
    try:
        conn = await pool.acquire()
        gave_up = asyncio.create_task(pool.acquire(transaction=True))
        await asyncio.sleep(0.01)
        gave_up.cancel()
        await asyncio.gather(gave_up, return_exceptions=True)
        await pool.release(conn)
        again = await asyncio.wait_for(pool.acquire(), 10)
        assert await again.fetchval("SELECT 1") == 1
        await pool.release(again)
    finally:
        await pool.close()


async def test_a_connection_closed_in_use_is_replaced_for_the_next_waiter(postgres_database_url: str) -> None:  # noqa: F811
    pool = HandoffPool(parse_url(one_connection(postgres_database_url)))
    try:
        broken = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.01)
        broken.terminate()
        await pool.release(broken)
        fresh = await asyncio.wait_for(waiting, 10)
        assert fresh is not broken and await fresh.fetchval("SELECT 1") == 1
        await pool.release(fresh)
    finally:
        await pool.close()


async def test_a_failed_relay_pass_hands_on_its_connection_rolled_back(postgres_database_url: str) -> None:  # noqa: F811
    url = one_connection(postgres_database_url)
    async with open_database(url) as db:
        await make_items(db)
        tx = await db.begin()
        assert await tx.commit(inbox=("g", "e1"), service=SERVICE, messages=[msg(1)])
        waiter = await db.begin()
        inserted: list[asyncio.Task[int]] = []

        async def broken(messages: list[Message]) -> None:
            # a transaction queues for the relay's (only) connection, then the publish fails
            inserted.append(asyncio.create_task(waiter.execute("INSERT INTO items (id) VALUES ('x')", ())))
            await asyncio.sleep(0.05)
            raise ConnectionError("bus down")

        with pytest.raises(ConnectionError):
            await db.relay_pass(SERVICE, "me", 10, broken)
        await inserted[0]
        other = type(db)(url)  # another process, while the waiter's transaction is still open
        async with other:
            sent: list[str] = []

            async def publish(messages: list[Message]) -> None:
                sent.extend(m.id for m in messages)

            assert await other.relay_pass(SERVICE, "other", 10, publish) == 1  # the claim is free
            assert sent == ["m1"]  # and the row was not marked sent
        await waiter.rollback()


async def test_a_relay_woken_by_quiet_commits_notifies_the_relay_holding_the_claim(
    postgres_database_url: str,  # noqa: F811
) -> None:
    url = postgres_database_url
    async with open_database(url) as here:
        await make_items(here)
        here.relay_started(SERVICE)  # commits here wake the local relay and do not NOTIFY
        holder = type(here)(url)  # another process's relay
        async with holder:
            await holder._listen()  # type: ignore[attr-defined]
            woken = asyncio.Event()

            async def publish(messages: list[Message]) -> None:
                tx = await here.begin()
                assert await tx.commit(inbox=("g", "e2"), service=SERVICE, messages=[msg(2)])
                assert await here.relay_pass(SERVICE, "here", 10, publish) is None  # holder has the claim
                # the NOTIFY sent by that pass wakes the holder (no NOTIFY: TimeoutError here)
                await asyncio.wait_for(holder.wait_outbox(SERVICE, 3600), 10)
                woken.set()

            tx = await here.begin()
            assert await tx.commit(inbox=("g", "e1"), service=SERVICE, messages=[msg(1)])
            assert await holder.relay_pass(SERVICE, "holder", 10, publish) == 1
            assert woken.is_set()
            sent: list[str] = []

            async def record(messages: list[Message]) -> None:
                sent.extend(m.id for m in messages)

            assert await holder.relay_pass(SERVICE, "holder", 10, record) == 1
            assert sent == ["m2"]
        here.relay_stopped(SERVICE)
