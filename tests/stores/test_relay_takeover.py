"""Relay claims across real processes: a live holder keeps its claim, a killed one loses it at once.

A child process (``_relay_holder.py``) takes the claim of a service and hangs in the
middle of publishing. While it lives, no relay of the test process gets the claim,
even after its lease ran out (SQLite); once it is SIGKILLed, a standby takes over
without waiting for the lease (SQLite: a lease of an hour; the test would time out)
and publishes the rows the dead holder never marked sent, in commit order, with
their ids.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from choreograph.stores.state import StateStore, open_database
from choreograph.transports.base import Message
from tests.stores._databases import fresh_postgres_url, sqlite_url

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "svc"


def msg(n: int) -> Message:
    return Message(f"m{n}", "test.takeover.item", b'{"n": %d}' % n)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def __call__(self, messages: list[Message]) -> None:
        self.sent.extend(m.id for m in messages)


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(backend, URL template taking the SQLite relay lease as ``{lease}``)."""
    if request.param == "sqlite":
        yield "sqlite", sqlite_url(tmp_path) + "?relay_lease={lease}"
        return
    async with fresh_postgres_url() as url:
        yield "postgresql", url


async def committed(db: StateStore, *messages: Message) -> None:
    tx = await db.begin()
    try:
        await tx.commit(inbox=None, service=SERVICE, messages=messages)
    finally:
        await tx.rollback()


def spawn_holder(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.stores._relay_holder", url, SERVICE],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )


async def start_holder(url: str) -> subprocess.Popen[str]:
    """A child holding the claim mid-publish, once it says so."""
    proc = spawn_holder(url)
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    assert line.split() == ["publishing", "m1", "m2"], line
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


async def take_over(db: StateStore, poll: float) -> Recorder:
    """Pass as a standby relay does (wait for rows or the claim, pass again) until a pass publishes."""
    publish = Recorder()
    while not await db.relay_pass(SERVICE, "standby", 100, publish):
        await db.wait_outbox(SERVICE, poll)
    return publish


async def test_a_live_claim_holder_hanging_mid_publish_is_never_displaced(database: tuple[str, str]) -> None:
    backend, template = database
    url = template.format(lease="0.2")
    async with open_database(url) as db:
        await committed(db, msg(1), msg(2))
        holder = await start_holder(url)
        try:
            await asyncio.sleep(0.5)  # on SQLite its lease ran out meanwhile: its lock says it lives
            for _ in range(5):
                assert await db.relay_pass(SERVICE, "standby", 100, Recorder()) is None
                await asyncio.sleep(0.1)
            assert holder.poll() is None
        finally:
            kill(holder)
        publish = await asyncio.wait_for(take_over(db, 0.1), 60)
        assert publish.sent == ["m1", "m2"]


async def test_a_killed_claim_holder_is_replaced_at_once_and_its_unmarked_rows_go_out_again_in_order(
    database: tuple[str, str],
) -> None:
    backend, template = database
    url = template.format(lease="3600")  # SQLite: taking over by the lease would time the test out
    async with open_database(url) as db:
        await committed(db, msg(1), msg(2))
        holder = await start_holder(url)
        try:
            await committed(db, msg(3))
            assert await db.relay_pass(SERVICE, "standby", 100, Recorder()) is None
            await db.wait_outbox(SERVICE, 0.01)  # takes the wake-up of its own commit
            # SQLite: the standby's wait ends when the holder's lock comes free (no poll needed);
            # PostgreSQL: nobody notifies it, the relay's poll finds the claim row unlocked.
            waiting = asyncio.create_task(db.wait_outbox(SERVICE, 3600 if backend == "sqlite" else 0.5))
            await asyncio.sleep(0.2)
            assert backend != "sqlite" or not waiting.done(), "the holder lives"
            kill(holder)
            await asyncio.wait_for(waiting, 60)
        finally:
            kill(holder)
        publish = await asyncio.wait_for(take_over(db, 0.5), 60)
        assert publish.sent == ["m1", "m2", "m3"]
