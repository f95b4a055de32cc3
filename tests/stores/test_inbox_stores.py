"""The inbox contract on every store: memory, SQLite, PostgreSQL and both service databases.

An inbox must take any event id an envelope can carry. JSON (and so CloudEvents) lets an
id contain U+0000, which PostgreSQL text cannot hold: its inbox refused the lookup of a
whole batch holding such an id, and the worker released the batch to look it up again a
second later, with the same result - the event and every other event fetched with it
never ran. And a PostgreSQL index entry holds at most 2,704 bytes: an id of 10 kB could
be looked up but never marked, so the worker's finisher retried that mark for ever and
acked nothing more. The other stores took both ids like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
LONG_ID = secrets.token_hex(5000)  # 10 kB that do not compress


async def test_an_id_with_a_nul_character_is_marked_and_found_like_any_other(inbox: InboxStore) -> None:
    near = ["order-1", "order-1copy", "order-1\ufffdcopy", "order-1\\x00copy"]
    assert await inbox.seen("g", [NUL_ID, *near]) == set()
    await inbox.mark("g", [NUL_ID])
    assert await inbox.seen("g", [NUL_ID, *near]) == {NUL_ID}
    assert await inbox.seen("other", [NUL_ID]) == set()
    await inbox.mark("g", [NUL_ID, "order-2\x00"])  # marked again, with another
    assert await inbox.seen("g", [NUL_ID, "order-2\x00", *near]) == {NUL_ID, "order-2\x00"}


ESCAPED_IDS = ["a\x00", "a\ufffe", "a\uffff", "a\uffff\ufffe", "a\uffff\x00", "a\ufffe\uffff", "a\x00\ufffe"]


async def test_ids_differing_only_in_u0000_ufffe_or_uffff_are_different_ids(inbox: InboxStore) -> None:
    """PostgreSQL stores U+0000 as U+FFFE: a genuine U+FFFE was stored as it was, so ``a\\x00``
    and ``a\\ufffe`` were one key and the second event was dropped as a duplicate."""
    await inbox.mark("g", ["a\x00"])
    assert await inbox.seen("g", ESCAPED_IDS) == {"a\x00"}
    await inbox.mark("g", ["a\ufffe"])
    assert await inbox.seen("g", ESCAPED_IDS) == {"a\x00", "a\ufffe"}
    await inbox.mark("g", ESCAPED_IDS)
    assert await inbox.seen("g", ESCAPED_IDS) == set(ESCAPED_IDS)


async def test_a_failure_holding_ufffe_and_uffff_reads_back_as_it_was(inbox: InboxStore) -> None:
    first = ErrorInfo("Value\ufffeError", "sku 'a\ufffeb\x00c\uffff'", "Traceback ... '\uffff\ufffe'")
    assert await inbox.record_failure("g", "a\ufffe", first, 10.0) == (first, 10.0)
    assert await inbox.record_failure("g", "a\x00", ErrorInfo("E", "other"), 11.0) == (ErrorInfo("E", "other"), 11.0)
    assert await inbox.record_failure("g", "a\ufffe", ErrorInfo("E", "later"), 12.0) == (first, 10.0)


async def test_a_very_long_id_is_marked_and_found_like_any_other(inbox: InboxStore) -> None:
    near = [LONG_ID[:-1], LONG_ID[:-1] + ("0" if LONG_ID[-1] != "0" else "1"), LONG_ID + "\x00"]
    assert await inbox.seen("g", [LONG_ID, *near]) == set()
    await inbox.mark("g", [LONG_ID, "short"])
    assert await inbox.seen("g", [LONG_ID, "short", *near]) == {LONG_ID, "short"}
    await inbox.mark("g", [near[-1]])
    assert await inbox.seen("g", [LONG_ID, *near]) == {LONG_ID, near[-1]}


async def test_an_id_spelling_a_long_ids_digest_is_not_taken_for_that_id(inbox: InboxStore) -> None:
    """PostgreSQL keys a long id by ``U+FFFE sha256:<hex>`` and stores U+0000 as U+FFFE: the id
    ``U+0000 sha256:<hex of the long id>`` had the long id's key, so one dropped the other."""
    import hashlib

    spelled = "\x00sha256:" + hashlib.sha256(LONG_ID.encode()).hexdigest()
    await inbox.mark("g", [LONG_ID])
    assert await inbox.seen("g", [spelled]) == set()
    await inbox.mark("g", [spelled])
    assert await inbox.seen("g", [LONG_ID, spelled]) == {LONG_ID, spelled}
    await inbox.mark("h", [spelled])
    assert await inbox.seen("h", [LONG_ID]) == set()


async def test_a_failure_whose_message_and_traceback_hold_a_nul_character_is_kept_as_it_was(inbox: InboxStore) -> None:
    # A handler's error message may quote the payload: PostgreSQL jsonb cannot hold U+0000.
    first = ErrorInfo("Value\x00Error", "no sku 'a\x00b'", "Traceback ... 'a\x00b'")
    assert await inbox.record_failure("g", "e", first, 10.0) == (first, 10.0)
    assert await inbox.record_failure("g", "e", ErrorInfo("E", "later"), 11.0) == (first, 10.0)


@pytest.mark.parametrize("event_id", [NUL_ID, LONG_ID], ids=["nul", "long"])
async def test_the_failure_history_of_an_unusual_id_is_kept_and_forgotten(inbox: InboxStore, event_id: str) -> None:
    NUL_ID = event_id  # noqa: N806 - the body reads as in the test above
    first, later = ErrorInfo("RuntimeError", "first"), ErrorInfo("RuntimeError", "later")
    assert await inbox.record_failure("g", NUL_ID, first, 10.0) == (first, 10.0)
    assert await inbox.record_failure("g", NUL_ID, later, 11.0) == (first, 10.0)
    await inbox.clear_failures("g", [NUL_ID])
    assert await inbox.record_failure("g", NUL_ID, later, 12.0) == (later, 12.0)
    await inbox.mark("g", [NUL_ID])  # forgets it too
    assert await inbox.record_failure("g", NUL_ID, first, 13.0) == (first, 13.0)


class Placed(Event, type="test.inbox_stores.placed"):
    order_id: str


@pytest.mark.parametrize("event_id", [NUL_ID, LONG_ID], ids=["nul", "long"])
async def test_an_event_with_an_unusual_id_is_handled_once_and_holds_nothing_up(inbox: InboxStore, event_id: str) -> None:
    bus = MemoryTransport()
    sink = Service("sink")
    handled: list[str] = []

    @sink.on(Placed)
    async def record(placed: Placed) -> None:
        handled.append(placed.order_id)

    odd = to_message(first_envelope(Placed(order_id="odd"), source="test", id=event_id))
    async with Worker([sink], bus, store=inbox) as worker:
        await bus.publish([odd])
        await Publisher(bus).publish(Placed(order_id="plain"))
        await until(lambda: sorted(handled) == ["odd", "plain"], within=5.0)
        await until(lambda: worker.stats().handled == 2 and bus.pending()[0] == 0, within=5.0)
        await bus.publish([odd])  # a copy: found in the inbox, not run again
        await until(lambda: worker.stats().duplicates == 1, within=5.0)
    assert sorted(handled) == ["odd", "plain"]
    assert await inbox.seen("sink", [event_id]) == {event_id}


async def test_expiry_counts_from_an_ids_first_mark(inbox: InboxStore) -> None:
    """The durable stores keep an id's first mark (``INSERT OR IGNORE``, ``ON CONFLICT DO NOTHING``);
    the memory store moved it to the latest, so an id marked again outlived its retention there."""
    await inbox.mark("g", ["old", "again"])
    await asyncio.sleep(0.02)
    cutoff = time.time()
    await asyncio.sleep(0.02)
    await inbox.mark("g", ["new", "again"])
    assert await inbox.expire(cutoff) == 2
    assert await inbox.seen("g", ["old", "again", "new"]) == {"new"}


@pytest.mark.parametrize("kind", ["sqlite-database", "postgres-database"])
async def test_a_service_database_given_as_the_inbox_is_closed_by_its_callers_close(kind: str, tmp_path: Path) -> None:
    """A service database counts its opens: the worker took one in start() and never gave it back,
    so the caller's close() left the database open (on PostgreSQL a pooled connection for good)."""
    async with contextlib.AsyncExitStack() as stack:
        if kind.startswith("postgres"):
            url = await stack.enter_async_context(fresh_postgres_url())
        else:
            url = sqlite_url(tmp_path)
        database = open_database(url)
        await database.open()
        async with Worker([Service("quiet")], MemoryTransport(), store=database):
            assert await database.seen("quiet", ["x"]) == set()
        await database.close()
        with pytest.raises(Exception, match="not open|closed"):
            await database.seen("quiet", ["x"])


async def test_a_worker_that_fails_to_start_gives_back_its_open_of_a_service_database(tmp_path: Path) -> None:
    """No ``stop()`` follows a start that raised (``async with`` never entered): the open the worker
    took of a service database given as its inbox must be given back there, or the caller's
    close() leaves the database open."""

    class Refusing(MemoryTransport):
        async def subscribe(self, group: str, types: Any) -> Any:
            raise RuntimeError("broker refused the subscription")

    database = open_database(sqlite_url(tmp_path))
    await database.open()
    with pytest.raises(RuntimeError, match="refused"):
        async with Worker([Service("quiet")], Refusing(), store=database):
            pass
    await database.close()
    with pytest.raises(Exception, match="not open|closed"):
        await database.seen("quiet", ["x"])
