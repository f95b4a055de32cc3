"""The inbox contract on every store: memory, SQLite, PostgreSQL and both service databases.

An inbox must take any event id an envelope can carry. JSON (and so CloudEvents) lets an
id contain U+0000, which PostgreSQL text cannot hold: its inbox refused the lookup of a
whole batch holding such an id, and the worker released the batch to look it up again a
second later, with the same result - the event and every other event fetched with it
never ran (the other stores took the id like any other).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from choreograph import Event, Publisher, Service, Worker
from choreograph.runtime.records import first_envelope, to_message
from choreograph.stores import open_store
from choreograph.stores.base import ErrorInfo, InboxStore
from choreograph.stores.state import open_database
from choreograph.testing import MemoryTransport
from tests._waiting import until
from tests.stores._databases import fresh_postgres_url, sqlite_url

KINDS = ["memory", "sqlite", "postgres", "sqlite-database", "postgres-database"]


@pytest.fixture(params=KINDS)
async def inbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[InboxStore]:
    kind: str = request.param
    if kind.startswith("postgres"):
        async with fresh_postgres_url() as url:
            store = open_database(url) if kind.endswith("database") else open_store(url)
            await store.open()
            try:
                yield store
            finally:
                await store.close()
        return
    if kind == "memory":
        store = open_store("memory://")
    elif kind == "sqlite":
        store = open_store(f"sqlite:///{tmp_path / 'inbox.db'}")
    else:
        store = open_database(sqlite_url(tmp_path))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


NUL_ID = "order-1\x00copy"


async def test_an_id_with_a_nul_character_is_marked_and_found_like_any_other(inbox: InboxStore) -> None:
    near = ["order-1", "order-1copy", "order-1\ufffdcopy", "order-1\\x00copy"]
    assert await inbox.seen("g", [NUL_ID, *near]) == set()
    await inbox.mark("g", [NUL_ID])
    assert await inbox.seen("g", [NUL_ID, *near]) == {NUL_ID}
    assert await inbox.seen("other", [NUL_ID]) == set()
    await inbox.mark("g", [NUL_ID, "order-2\x00"])  # marked again, with another
    assert await inbox.seen("g", [NUL_ID, "order-2\x00", *near]) == {NUL_ID, "order-2\x00"}


async def test_the_failure_history_of_an_id_with_a_nul_character_is_kept_and_forgotten(inbox: InboxStore) -> None:
    first, later = ErrorInfo("RuntimeError", "first"), ErrorInfo("RuntimeError", "later")
    assert await inbox.record_failure("g", NUL_ID, first, 10.0) == (first, 10.0)
    assert await inbox.record_failure("g", NUL_ID, later, 11.0) == (first, 10.0)
    await inbox.clear_failures("g", [NUL_ID])
    assert await inbox.record_failure("g", NUL_ID, later, 12.0) == (later, 12.0)
    await inbox.mark("g", [NUL_ID])  # forgets it too
    assert await inbox.record_failure("g", NUL_ID, first, 13.0) == (first, 13.0)


class Placed(Event, type="test.inbox_stores.placed"):
    order_id: str


async def test_an_event_whose_id_has_a_nul_character_does_not_hold_up_its_batch(inbox: InboxStore) -> None:
    bus = MemoryTransport()
    sink = Service("sink")
    handled: list[str] = []

    @sink.on(Placed)
    async def record(placed: Placed) -> None:
        handled.append(placed.order_id)

    odd = to_message(first_envelope(Placed(order_id="odd"), source="test", id=NUL_ID))
    async with Worker([sink], bus, store=inbox):
        await bus.publish([odd])
        await Publisher(bus).publish(Placed(order_id="plain"))
        await until(lambda: sorted(handled) == ["odd", "plain"], within=5.0)
        await bus.publish([odd])  # a copy: found in the inbox, not run again
        await asyncio.sleep(0.3)
    assert sorted(handled) == ["odd", "plain"]
    assert await inbox.seen("sink", [NUL_ID]) == {NUL_ID}
