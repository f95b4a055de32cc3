"""The SQLite service database's writer: inline statements, one turn at a time, group commit."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from choreograph.errors import StoreError
from choreograph.stores.state import StateStore, open_database
from choreograph.transports.base import Message
from tests.stores._databases import sqlite_url


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[StateStore]:
    async with open_database(sqlite_url(tmp_path)) as store:
        tx = await store.begin()
        await tx.execute("CREATE TABLE items (id text PRIMARY KEY)", ())
        await tx.commit(inbox=None, service="svc", messages=[])
        yield store


async def items(db: StateStore) -> list[str]:
    tx = await db.begin()
    try:
        return [r[0] for r in await tx.fetch("SELECT id FROM items ORDER BY id", ())]
    finally:
        await tx.rollback()


async def test_concurrent_transactions_commit_together_and_a_rolled_back_one_leaves_no_trace(
    db: StateStore,
) -> None:
    commits: list[int] = []
    writer = db.writer  # type: ignore[attr-defined]
    original = writer._commit_batch

    async def counting() -> None:
        commits.append(1)
        await original()

    writer._commit_batch = counting

    async def unit(name: str, *, keep: bool, bad: bool = False) -> None:
        tx = await db.begin()
        try:
            await tx.execute("INSERT INTO items (id) VALUES ($1)", (name,))
            if bad:
                with pytest.raises(StoreError):
                    await tx.execute("INSERT INTO items (id) VALUES ($1)", (name,))  # duplicate key
            if keep:
                assert await tx.commit(inbox=("g", name), service="svc", messages=[Message(name, "t", b"{}")])
        finally:
            await tx.rollback()

    await asyncio.gather(
        *(unit(f"k{n}", keep=True) for n in range(10)),
        unit("dropped", keep=False),
        unit("failed-statement", keep=True, bad=True),
    )
    assert await items(db) == sorted([*(f"k{n}" for n in range(10)), "failed-statement"])
    assert len(commits) < 11, "several transactions shared one COMMIT"
    assert (await db.outbox_lag("svc")).pending == 11


async def test_waiting_for_another_processs_write_lock_does_not_block_the_event_loop(
    db: StateStore, tmp_path: Path
) -> None:
    locked, release = threading.Event(), threading.Event()

    def other_process() -> None:  # another connection holding SQLite's write lock
        conn = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(30)
        conn.execute("ROLLBACK")
        conn.close()

    holder = threading.Thread(target=other_process)
    holder.start()
    try:
        await asyncio.get_running_loop().run_in_executor(None, locked.wait, 30)
        writing = asyncio.create_task(db.mark("g", ["e1"]))
        ticks = 0
        for _ in range(5):  # the loop keeps running while the write waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 5 and not writing.done()
        release.set()
        await asyncio.wait_for(writing, 30)
        assert await db.seen("g", ["e1"]) == {"e1"}
    finally:
        release.set()
        holder.join()


async def test_a_unit_cancelled_while_it_waits_for_the_commit_does_not_fail_the_others(
    db: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The units of a batch share one future for the COMMIT: cancelling one waiter must
    # neither cancel that future (the others would fail and their events be retried) nor
    # keep the cancelled one waiting for a commit that may never come (a flusher cancelled
    # at shutdown): it gets its CancelledError at once.
    writer = db.writer  # type: ignore[attr-defined]
    committing = asyncio.Event()
    go = asyncio.Event()
    original = writer._commit_batch

    async def slow_commit() -> None:
        committing.set()
        await go.wait()
        await original()

    monkeypatch.setattr(writer, "_commit_batch", slow_commit)

    async def unit(name: str) -> bool:
        tx = await db.begin()
        try:
            await tx.execute("INSERT INTO items (id) VALUES ($1)", (name,))
            return await tx.commit(inbox=("g", name), service="svc", messages=[])
        finally:
            await tx.rollback()

    first = asyncio.create_task(unit("a"))
    second = asyncio.create_task(unit("b"))
    await committing.wait()  # both units left their savepoints; the flusher holds the COMMIT
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(first, 30)  # not held until the commit is decided
    go.set()
    assert await second is True
    monkeypatch.setattr(writer, "_commit_batch", original)
    assert await items(db) == ["a", "b"]  # the cancelled unit's work was in the batch, which committed


async def test_after_sqlite_rolls_the_transaction_back_the_unit_cannot_go_on_in_autocommit(db: StateStore) -> None:
    # A trigger's RAISE(ROLLBACK) ends the whole SQLite transaction. A handler that catches
    # the error and carries on must not have its later statements, inbox record and outbox
    # rows written one by one in autocommit (state lost, event marked processed).
    tx = await db.begin()
    await tx.execute("CREATE TABLE audit (id text)", ())
    await tx.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON audit BEGIN SELECT RAISE(ROLLBACK, 'refused'); END", ()
    )
    assert await tx.commit(inbox=None, service="svc", messages=[])

    tx = await db.begin()
    try:
        await tx.execute("INSERT INTO items (id) VALUES ($1)", ("a",))
        with pytest.raises(StoreError, match="refused"):
            await tx.execute("INSERT INTO audit (id) VALUES ($1)", ("a",))
        with pytest.raises(StoreError, match="rolled this transaction back"):
            await tx.execute("INSERT INTO items (id) VALUES ($1)", ("b",))
        with pytest.raises(StoreError, match="rolled this transaction back"):
            await tx.commit(inbox=("g", "a"), service="svc", messages=[Message("a", "t", b"{}")])
    finally:
        await tx.rollback()
    assert await items(db) == []
    check = await db.begin()
    try:
        assert await check.fetch("SELECT * FROM choreograph_inbox", ()) == []
        assert await check.fetch("SELECT * FROM choreograph_outbox", ()) == []
    finally:
        await check.rollback()
