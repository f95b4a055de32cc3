"""SIGKILL at every point of a transactional handler, on real processes, SQLite and PostgreSQL.

A worker process (``_outbox_worker.py``) runs the ``package`` service over a SQLite bus
file; its database is a SQLite file or a PostgreSQL schema. The first worker kills
itself at one point; a second one finishes the work. Afterwards state and published
events must agree: one package row and one counter increment per request (the effect
applied once), exactly one distinct ``Created`` id per package (no event without its
state, no state without its event, never two ids for one output).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from choreograph import Publisher, Service, derive_id
from choreograph.runtime.outbox import transaction
from choreograph.stores.state import open_database
from choreograph.transports import open_transport
from choreograph.transports.base import Subscription, Transport
from tests import _procs
from tests.runtime._outbox_worker import Created, Requested
from tests.stores._databases import database_url  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 6


class System:
    """One bus file, one service database, worker processes and an ``audit`` group watching outputs."""

    def __init__(self, tmp: Path, database: str, bus: Transport, audit: Subscription) -> None:
        self.tmp = tmp
        self.database = database
        self.bus_url = bus.url
        self.bus = bus
        self.audit = audit
        self.received: list[tuple[str, dict]] = []  # (id, data) in delivery order
        self.procs: list[subprocess.Popen[str]] = []
        self.started: list[subprocess.Popen[str]] = []  # those that printed "ready"

    def start(self, *, crash: str | None = None, concurrency: int = 1) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CHOREOGRAPH_TEST_CRASH_ONCE": str(self.tmp / "crashed")}
        env.pop("CHOREOGRAPH_TEST_CRASH", None)
        if crash:
            env["CHOREOGRAPH_TEST_CRASH"] = crash
        log = self.tmp / f"worker-{len(self.procs)}.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.runtime._outbox_worker", self.bus_url, self.database, str(concurrency)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[str]) -> str:
        return (self.tmp / f"worker-{self.procs.index(proc)}.log").read_text()

    async def exited(self, proc: subprocess.Popen[str], within: float = 60.0) -> int:
        for _ in range(int(within / 0.05)):
            if proc.poll() is not None:
                return proc.returncode
            await asyncio.sleep(0.05)
        raise TimeoutError(f"worker did not exit: {proc.args}")

    async def ready(self, proc: subprocess.Popen[str]) -> bool:
        """Until the worker printed ``ready`` (``False`` if it ended first)."""
        while proc not in self.started:
            line = await asyncio.to_thread(proc.stdout.readline) if proc.stdout else ""
            if not line:
                return False
            if line.strip() == "ready":
                self.started.append(proc)
        return True

    async def stop(self, proc: subprocess.Popen[str]) -> dict:
        """SIGTERM, wait, and return the stats the worker printed."""
        for _ in range(600):  # a worker still starting up has no SIGTERM handler yet
            if proc in self.started:
                break
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() == "ready" or not line:
                break
        out, _ = await asyncio.to_thread(_procs.stop, proc, 60.0)  # printed after SIGTERM: still in the pipe
        assert proc.returncode == 0, self.log(proc)
        return json.loads(out.strip().splitlines()[-1])

    async def collect(self, until_distinct: int, within: float = 60.0) -> None:
        """Read the audit group until ``until_distinct`` distinct outputs arrived."""
        for _ in range(int(within / 0.25)):
            if len({pid for _, pid in self.outputs()}) >= until_distinct:
                return
            await self.drain(0.25)
        raise TimeoutError(f"only {self.outputs()} arrived")

    async def drain(self, wait: float) -> None:
        batch = await self.audit.fetch(100, timeout=wait)
        while batch:
            self.received.extend((d.message.id, orjson.loads(d.message.body)["data"]) for d in batch)
            await self.audit.ack_many(batch)
            batch = await self.audit.fetch(100, timeout=0.2)

    async def settled_group(self, group: str, within: float = 60.0) -> None:
        """Until ``group`` has nothing left to settle on the bus (read from the bus file itself:
        the test needs to know the killed worker's delivery came back and was settled)."""
        path = self.bus_url.removeprefix("sqlite:///").split("?")[0]
        for _ in range(int(within / 0.1)):
            db = sqlite3.connect(path, timeout=30)
            try:
                left = db.execute("SELECT count(*) FROM deliveries WHERE grp = ?", (group,)).fetchone()[0]
            finally:
                db.close()
            if left == 0:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{group} still has {left} deliveries")

    def outputs(self) -> list[tuple[str, str]]:
        return [(event_id, data["pid"]) for event_id, data in self.received]

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
async def system(tmp_path: Path, database_url: str) -> AsyncIterator[System]:  # noqa: F811
    async with running_system(tmp_path, database_url) as system:
        yield system


@contextlib.asynccontextmanager
async def running_system(tmp_path: Path, database: str) -> AsyncIterator[System]:
    setup = Service("package", database=database)
    async with transaction(setup) as tx:
        await tx.execute("CREATE TABLE packages (pid text PRIMARY KEY)")
        await tx.execute("CREATE TABLE counter (n integer NOT NULL)")
        await tx.execute("INSERT INTO counter (n) VALUES (0)")
    bus = open_transport(f"sqlite:///{tmp_path / 'bus.db'}?lease=1")
    async with bus:
        await (await bus.subscribe("package", [Requested.event_type()])).close()  # register before publishing
        audit = await bus.subscribe("audit", [Created.event_type()])
        system = System(tmp_path, database, bus, audit)
        try:
            yield system
        finally:
            system.kill_all()
            await audit.close()


async def state(database: str) -> tuple[list[str], int, int]:
    """(package ids, counter, unsent outbox rows) in the service database."""
    async with transaction(Service("package", database=database)) as tx:
        pids = [r["pid"] for r in await tx.fetch("SELECT pid FROM packages ORDER BY pid")]
        counter = await tx.fetchval("SELECT n FROM counter")
    async with open_database(database) as db:
        pending = (await db.outbox_lag("package")).pending
    return pids, counter, pending


@pytest.mark.parametrize("point", ["handler", "commit", "publish"])
async def test_a_sigkill_at_any_point_leaves_state_and_published_events_in_agreement(
    system: System, point: str
) -> None:
    requests = await Publisher(system.bus).publish(
        *(Requested(pid=f"p{n}") for n in range(REQUESTS)), ids=[f"req-{n}" for n in range(REQUESTS)]
    )
    victim = system.start(crash=point)
    assert await system.exited(victim) == -signal.SIGKILL, system.log(victim)

    survivor = system.start()
    await system.collect(until_distinct=REQUESTS)
    await system.settled_group("package")
    for _ in range(200):
        pids, counter, pending = await state(system.database)
        if pending == 0:
            break
        await asyncio.sleep(0.05)
    stats = await system.stop(survivor)
    await system.drain(0.5)

    expected = [f"p{n}" for n in range(REQUESTS)]
    assert pids == expected, "every request's state exists, once"
    assert counter == REQUESTS, "every handler's effect was applied once"
    assert pending == 0
    ids_by_pid: dict[str, set[str]] = defaultdict(set)
    for event_id, pid in system.outputs():
        ids_by_pid[pid].add(event_id)
    assert sorted(ids_by_pid) == expected, "every state has its event and every event its state"
    assert all(len(ids) == 1 for ids in ids_by_pid.values()), "never two ids for one output"
    handler = "package_service.<locals>.create"
    assert {next(iter(ids_by_pid[f"p{n}"])) for n in range(REQUESTS)} == {
        derive_id(req.id, "package", handler, 0) for req in requests
    }
    copies = len(system.outputs()) - REQUESTS
    if point == "handler":
        assert (stats["handled"], stats["duplicates"], copies) == (REQUESTS, 0, 0)
    elif point == "commit":  # the committed event came back: its inbox record acked it unrun
        assert (stats["handled"], stats["duplicates"], copies) == (REQUESTS - 1, 1, 0)
    else:  # published, not marked: sent again with the same id (downstream inboxes drop it).
        # The victim may have committed a few more events while its relay was publishing.
        assert stats["handled"] <= REQUESTS - 1 and copies >= 1


async def test_two_replicas_one_killed_publish_each_output_once_per_id_in_commit_order(system: System) -> None:
    count = 40
    await Publisher(system.bus).publish(*(Requested(pid=f"q{n:02}") for n in range(count)))
    first, second = system.start(concurrency=4), system.start(concurrency=4)
    await system.collect(until_distinct=count // 4)
    first.kill()
    await system.exited(first)
    await system.collect(until_distinct=count)
    await system.settled_group("package")
    await system.stop(second)
    await system.drain(0.5)

    await assert_each_applied_once_and_published_in_commit_order(system, system.database, count)


async def assert_each_applied_once_and_published_in_commit_order(system: System, database: str, count: int) -> None:
    """Every request's state once, no outbox row left, one output id per request, first seen in commit order."""
    pids, counter, pending = await state(database)
    assert (len(pids), counter, pending) == (count, count, 0)
    ids_by_pid: dict[str, set[str]] = defaultdict(set)
    for event_id, pid in system.outputs():
        ids_by_pid[pid].add(event_id)
    assert len(ids_by_pid) == count and all(len(ids) == 1 for ids in ids_by_pid.values())
    # Commit order is the order of the counter: the first time each output was seen follows it.
    first_seen: list[int] = []
    for _, data in system.received:
        if data["n"] not in first_seen:
            first_seen.append(data["n"])
    assert first_seen == sorted(first_seen), "outputs first arrive in commit order"


async def test_the_standby_replica_takes_the_relay_of_a_killed_holder_at_once_and_keeps_commit_order(
    tmp_path: Path,
) -> None:
    """SQLite, with a relay lease of an hour: waiting for it would time the test out."""
    database = f"sqlite:///{tmp_path / 'package.db'}?relay_lease=3600"
    count = 40
    async with running_system(tmp_path, database) as system:
        holder = system.start(crash="publish", concurrency=4)  # dies once its relay published, before marking
        await holding_the_claim(database, holder)
        standby = system.start(concurrency=4)
        assert await system.ready(standby)
        await Publisher(system.bus).publish(*(Requested(pid=f"r{n:02}") for n in range(count)))
        assert await system.exited(holder) == -signal.SIGKILL, system.log(holder)
        await system.collect(until_distinct=count)
        await system.settled_group("package")
        await holding_the_claim(database, standby)
        await system.stop(standby)
        await system.drain(0.5)

        await assert_each_applied_once_and_published_in_commit_order(system, database, count)


async def holding_the_claim(database: str, proc: subprocess.Popen[str], within: float = 60.0) -> None:
    """Until the relay claim row of ``package`` names ``proc`` (owner ``host:pid:...``)."""
    path = database.removeprefix("sqlite:///").split("?")[0]
    for _ in range(int(within / 0.05)):
        db = sqlite3.connect(path, timeout=30)
        try:
            row = db.execute("SELECT owner FROM choreograph_relay WHERE service = 'package'").fetchone()
        except sqlite3.OperationalError:  # the table is not there yet
            row = None
        finally:
            db.close()
        if row is not None and f":{proc.pid}:" in row[0]:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the relay claim of package is not held by pid {proc.pid}")
