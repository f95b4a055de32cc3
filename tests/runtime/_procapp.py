"""A two-step app for the multi-process tests: ``work`` (with an idempotent effect) then ``sink``.

Both services record into the SQLite file named by ``PROCAPP_DB``:
``effects`` (one row per job, upserted: the idempotent effect), ``runs`` (every handler
run, to see re-runs) and ``sink`` (a counter per job: how many times its JobDone was
*handled*, which the inbox must keep at one).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

from choreograph import Context, Event, RetryPolicy, Service


class Job(Event, type="test.proc.job"):
    n: int
    poison: bool = False
    hold: float = 0.0  # seconds the handler sleeps after starting (to be killed mid-handler)


class JobDone(Event, type="test.proc.done"):
    n: int


def _db() -> sqlite3.Connection:
    db = sqlite3.connect(os.environ["PROCAPP_DB"], timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    return db


def setup(path: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS effects (n INTEGER PRIMARY KEY, event_id TEXT)")
    db.execute("CREATE TABLE IF NOT EXISTS runs (n INTEGER, pid INTEGER, attempt INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS sink (n INTEGER PRIMARY KEY, handled INTEGER, event_id TEXT)")
    db.close()


work = Service("work", retry=RetryPolicy(max_attempts=3, base=0.05, jitter=False))
sink = Service("sink")


@work.on(Job, timeout=60)
async def do_work(job: Job, ctx: Context) -> JobDone:
    db = _db()
    db.execute("INSERT INTO runs VALUES (?, ?, ?)", (job.n, os.getpid(), ctx.attempt))
    if job.hold and ctx.attempt == 1:
        await asyncio.sleep(job.hold)
    if job.poison:
        db.close()
        raise RuntimeError(f"poison job {job.n}")
    db.execute("INSERT INTO effects VALUES (?, ?) ON CONFLICT(n) DO NOTHING", (job.n, ctx.event_id))
    db.close()
    return JobDone(n=job.n)


@sink.on(JobDone)
async def collect(done: JobDone, ctx: Context) -> None:
    db = _db()
    db.execute(
        "INSERT INTO sink VALUES (?, 1, ?) ON CONFLICT(n) DO UPDATE SET handled = handled + 1",
        (done.n, ctx.event_id),
    )
    db.close()
