"""A service with a database forgets an event's failure history when any copy of it commits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from choreograph import Context, Event, Publisher, RetryPolicy, Service, Worker
from choreograph.stores._sqlite_tx import SQLiteTx
from choreograph.stores.base import ErrorInfo
from choreograph.stores.state import open_database
from choreograph.testing import MemoryTransport, settled
from tests.stores._databases import database_url, sqlite_url  # noqa: F401 - fixture


class Noted(Event, type="test.outbox_failures.noted"):
    n: int


async def test_a_duplicate_copy_committing_on_its_first_attempt_forgets_the_failures_of_the_other(
    database_url: str,  # noqa: F811
) -> None:
    svc = Service("noter", database=database_url, retry=RetryPolicy(max_attempts=5, base=2.0, jitter=False))
    calls: list[int] = []
    failed_once = asyncio.Event()

    @svc.on(Noted)
    async def note(noted: Noted, ctx: Context) -> None:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            failed_once.set()
            raise RuntimeError("first copy fails")
        async with ctx.transaction() as tx:  # commits the inbox record in the service database
            await tx.execute("SELECT 1")

    bus = MemoryTransport()
    async with Worker([svc], bus):
        publisher = Publisher(bus)
        await publisher.publish(Noted(n=1), ids=["dup-1"])
        await asyncio.wait_for(failed_once.wait(), 10)
        await publisher.publish(Noted(n=1), ids=["dup-1"])  # a second copy: its attempt 1 commits
        await settled(bus)
    assert calls == [1, 1]  # the first copy's retry found the inbox record
    async with open_database(database_url) as db:
        later = (ErrorInfo("E", "later"), 99.0)
        assert await db.record_failure("noter", "dup-1", *later) == later  # no stale first failure


async def test_a_first_attempt_commits_without_looking_for_a_failure_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The delete of the event's failure history is for retries: every first attempt paid
    # a statement for it, in the commit of every event a service with a database handles.
    forgets: list[bool] = []
    commit = SQLiteTx.commit

    async def spy(self: SQLiteTx, *args: Any, **kwargs: Any) -> bool:
        forgets.append(kwargs.get("forget_failures", True))
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(SQLiteTx, "commit", spy)
    svc = Service("noter", database=sqlite_url(tmp_path))

    @svc.on(Noted)
    async def note(noted: Noted, ctx: Context) -> None:
        async with ctx.transaction() as tx:
            await tx.execute("SELECT 1")

    bus = MemoryTransport()
    async with Worker([svc], bus):
        await Publisher(bus).publish(Noted(n=1), ids=["first-1"])
        await settled(bus)
    assert forgets == [False]
