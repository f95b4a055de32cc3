"""The SQLite inbox: small lookups and marks on the loop's thread, the rest (and any wait) on its own."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from choreograph._clock import stamp_clock
from choreograph.stores import sqlite as sqlite_store
from choreograph.stores.sqlite import SQLiteStore
from choreograph.testing import VirtualClock


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    inbox = SQLiteStore(f"sqlite:///{tmp_path / 'inbox.db'}")
    await inbox.open()
    yield inbox
    await inbox.close()


async def test_a_mark_waits_for_another_process_holding_the_write_lock_and_is_durable(
    store: SQLiteStore, tmp_path: Path
) -> None:
    holding, release, released = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:  # another process's writer: the inline attempt is refused, the thread waits
        other = sqlite3.connect(tmp_path / "inbox.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO inbox VALUES ('g', 'theirs', 0)")
        holding.set()
        release.wait(10)
        released.set()
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    await asyncio.to_thread(holding.wait, 10)
    marking = asyncio.create_task(store.mark("g", ["mine"]))
    await asyncio.sleep(0.2)
    assert not marking.done()  # waiting on the store's thread, not failed, not blocking the loop
    release.set()
    await asyncio.wait_for(marking, 10)
    holder.join()
    assert released.is_set()
    assert await store.seen("g", ["mine", "theirs", "other"]) == {"mine", "theirs"}
    fresh = sqlite3.connect(tmp_path / "inbox.db")
    assert fresh.execute("SELECT count(*) FROM inbox WHERE event_id='mine'").fetchone() == (1,)
    fresh.close()


async def test_batches_larger_than_the_inline_limit_go_through_the_thread(store: SQLiteStore) -> None:
    ids = [f"e-{n}" for n in range(sqlite_store.INLINE_MAX * 4)]
    await store.mark("g", ids[::2])
    assert await store.seen("g", ids) == set(ids[::2])
    assert await store.seen("g", ids[:3]) == {"e-0", "e-2"}


async def test_a_single_id_is_looked_up_by_its_group_and_id(store: SQLiteStore) -> None:
    await store.mark("g", ["e-1"])
    await store.mark("h", ["e-2"])
    assert await store.seen("g", ["e-1"]) == {"e-1"}
    assert await store.seen("g", ["e-2"]) == set()  # marked in another group
    assert await store.seen("h", ["e-1"]) == set()
    assert await store.seen("g", ["e-1x"]) == set()


async def test_inline_marks_are_checkpointed_into_the_database_file_by_the_stores_thread(
    store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inline connection never checkpoints itself; every CHECKPOINT_EVERY marks the thread does."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 10)
    for n in range(10):  # one commit each, as under a light load
        await store.mark("g", [f"e-{n}"])
    # ?immutable=1 reads the database file alone, not the WAL: it sees only checkpointed rows.
    file_only = f"file:{tmp_path / 'inbox.db'}?immutable=1"
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 30
    while True:
        try:
            with contextlib.closing(sqlite3.connect(file_only, uri=True)) as db:
                if db.execute("SELECT count(*) FROM inbox").fetchone() == (10,):
                    break
        except sqlite3.OperationalError:  # the schema itself is still only in the WAL
            pass
        assert loop.time() < give_up, "the marks never reached the database file"
        await asyncio.sleep(0.01)
    assert len(await store.seen("g", [f"e-{n}" for n in range(10)])) == 10


async def test_marking_an_event_forgets_its_failure_history_and_only_its_own(store: SQLiteStore) -> None:
    from choreograph.stores.base import ErrorInfo

    first = ErrorInfo("Boom", "first")
    assert await store.record_failure("g", "a", first, 10.0) == (first, 10.0)
    assert await store.record_failure("g", "b", first, 11.0) == (first, 11.0)
    await store.mark("g", ["a", "c"])  # a failed before, c did not
    later = ErrorInfo("Boom", "later")
    assert await store.record_failure("g", "a", later, 20.0) == (later, 20.0)  # a's history restarted
    assert await store.record_failure("g", "b", later, 21.0) == (first, 11.0)  # b's kept


async def test_expire_forgets_the_ids_marked_before_the_cutoff_counted_from_their_first_mark(store: SQLiteStore) -> None:
    clock = VirtualClock(start=0.0, epoch=100.0)
    token = stamp_clock.set(clock)  # the store dates its marks on the worker's clock
    try:
        await store.mark("g", ["old", "again"])
        clock.advance(100.0)
        await store.mark("g", ["new", "again"])  # marked twice: its first mark is what counts
    finally:
        stamp_clock.reset(token)
    assert await store.expire(150.0) == 2
    assert await store.seen("g", ["old", "again", "new"]) == {"new"}


async def test_clearing_failures_starts_the_next_history_afresh(store: SQLiteStore) -> None:
    from choreograph.stores.base import ErrorInfo

    first = ErrorInfo("RuntimeError", "first run")
    assert await store.record_failure("g", "e1", first, 10.0) == (first, 10.0)
    assert await store.record_failure("g", "e1", ErrorInfo("RuntimeError", "again"), 11.0) == (first, 10.0)
    await store.clear_failures("g", ["e1"])
    replayed = ErrorInfo("RuntimeError", "after the replay")
    assert await store.record_failure("g", "e1", replayed, 50.0) == (replayed, 50.0)
