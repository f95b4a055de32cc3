"""The SQLite inbox: small lookups and marks on the loop's thread, the rest (and any wait) on its own."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from choreograph.stores import sqlite as sqlite_store
from choreograph.stores.sqlite import SQLiteStore


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


async def test_inline_marks_checkpoint_the_wal_so_it_does_not_grow_without_bound(
    store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 10)
    for n in range(400):  # one commit each, as under a light load
        await store.mark("g", [f"e-{n}"])
        if n % 10 == 0:
            await asyncio.sleep(0.005)  # let the store's thread run the checkpoint
    wal = tmp_path / "inbox.db-wal"
    # Without checkpoints the WAL holds every commit (over 400 pages); with them it is reused.
    assert wal.stat().st_size < 100 * 4096
    assert len(await store.seen("g", [f"e-{n}" for n in range(400)])) == 400
