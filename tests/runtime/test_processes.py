"""At-least-once + idempotency on real OS processes over the embedded SQLite bus.

Each worker is a ``python -m choreograph run`` process; kill -9 is the test tool.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from choreograph import Publisher
from choreograph.transports import open_transport
from tests._procs import stop
from tests.runtime import _procapp
from tests.runtime._procapp import Job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


class System:
    """Worker processes of tests.runtime._procapp sharing one bus file and one effects file."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bus = f"sqlite:///{tmp}/bus.db?lease=1.5"
        self.db = str(tmp / "effects.db")
        _procapp.setup(self.db)
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, service: str, *, store: str | None = None) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{service}-{len(self.procs)}.log"
        env = {**os.environ, "PROCAPP_DB": self.db, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "choreograph", "run", f"tests.runtime._procapp:{service}",
               "--broker", self.bus, "--concurrency", "16", "--drain-timeout", "5",
               "--store", store or f"sqlite:///{self.tmp}/{service}-inbox.db"]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        wait_for(lambda: "running" in log.read_text(), 30, f"{service} did not start: {log.read_text()}")
        return proc

    def query(self, sql: str) -> list[tuple]:
        db = sqlite3.connect(self.db, timeout=30)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def publish(self, *jobs: Job, ids: list[str] | None = None) -> None:
        async def go() -> None:
            async with open_transport(self.bus) as bus:
                await Publisher(bus).publish(*jobs, ids=ids)

        asyncio.run(go())

    def dead_letters(self, group: str) -> list:
        async def go() -> list:
            async with open_transport(self.bus) as bus:
                return await bus.dead_letters(group)

        return asyncio.run(go())

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float, message: str = "timed out") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(message() if callable(message) else message)


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    sys_ = System(tmp_path)
    yield sys_
    sys_.stop_all()


def sink_count(system: System) -> int:
    return system.query("SELECT count(*) FROM sink")[0][0]


def test_a_worker_killed_mid_handler_loses_nothing_and_the_effect_shows_once(system: System) -> None:
    victim = system.start("work")
    system.start("sink")
    system.publish(Job(n=1, hold=30.0))
    wait_for(lambda: system.query("SELECT count(*) FROM runs WHERE n=1")[0][0] == 1, 20, "job 1 never started")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    system.start("work")  # another worker of the group picks it up after the lease
    system.publish(*(Job(n=n) for n in range(2, 52)))
    wait_for(lambda: sink_count(system) == 51, 60, lambda: f"sink has {sink_count(system)} of 51")
    runs = system.query("SELECT attempt FROM runs WHERE n=1 ORDER BY attempt")
    assert [a for (a,) in runs] == [1, 2]  # ran twice: redelivered after the kill
    assert system.query("SELECT count(*) FROM effects")[0][0] == 51
    assert system.query("SELECT max(handled) FROM sink")[0][0] == 1  # next event handled once


def test_the_same_event_published_twice_has_one_effect(system: System) -> None:
    system.start("work")
    system.start("sink")
    system.publish(Job(n=7), ids=["dup-7"])
    system.publish(Job(n=7), ids=["dup-7"])
    system.publish(Job(n=8))
    wait_for(lambda: sink_count(system) == 2, 30)
    time.sleep(0.5)
    assert system.query("SELECT count(*) FROM runs WHERE n=7")[0][0] == 1
    assert system.query("SELECT handled FROM sink WHERE n=7") == [(1,)]


def test_a_poison_event_is_dead_lettered_while_others_keep_flowing(system: System) -> None:
    system.start("work")
    system.start("sink")
    system.publish(Job(n=0, poison=True), *(Job(n=n) for n in range(1, 41)))
    wait_for(lambda: sink_count(system) == 40, 60)
    wait_for(lambda: len(system.dead_letters("work")) == 1, 30, "poison job not dead-lettered")
    [letter] = system.dead_letters("work")
    assert letter.record["reason"] == "max_attempts"
    assert letter.record["attempts"] == 3
    assert letter.record["last_error"]["message"] == "poison job 0"
    assert system.query("SELECT count(*) FROM runs WHERE n=0")[0][0] == 3


def test_pending_events_survive_every_process_exiting(system: System) -> None:
    for proc in (system.start("work"), system.start("sink")):  # register both groups, then exit
        stop(proc, 30)
        assert proc.returncode == 0
    system.publish(*(Job(n=n) for n in range(50)))  # nobody is running: only the file holds them
    system.start("work")
    wait_for(lambda: system.query("SELECT count(*) FROM effects")[0][0] == 50, 60)
    system.stop_all()  # JobDone events now wait in the file for the sink group
    system.publish(*(Job(n=n) for n in range(50, 100)))
    system.start("work")
    system.start("sink")
    wait_for(lambda: sink_count(system) == 100, 60, lambda: f"sink has {sink_count(system)} of 100")
    assert system.query("SELECT count(*) FROM effects")[0][0] == 100


def test_sigterm_under_load_drains_and_loses_nothing(system: System) -> None:
    a = system.start("work")
    system.start("work")
    system.start("sink")
    total = 2000
    system.publish(*(Job(n=n) for n in range(total)))
    wait_for(lambda: sink_count(system) > 200, 60, "no progress")
    stop(a, 30)
    assert a.returncode == 0
    wait_for(lambda: sink_count(system) == total, 120, lambda: f"sink has {sink_count(system)} of {total}")
    assert system.query("SELECT count(*) FROM effects")[0][0] == total
    assert system.query("SELECT max(handled) FROM sink")[0][0] == 1
