"""Opening SQLite files shared by several processes.

Every SQLite store and the SQLite transport open their files here. Switching a new file
to WAL needs an exclusive lock that SQLite may refuse at once (``database is locked``,
without waiting on the busy timeout) when another process opens the same new file at
that moment — two services starting together, a journal and a gateway. Those first
steps are retried until ``timeout``; after them the busy timeout does the waiting.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def connect_wal(path: str, *, timeout: float = 30.0, synchronous: str = "NORMAL", schema: str | None = None) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with ``schema`` (a script) applied."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            if schema:
                db.executescript(schema)
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            message = str(exc)
            if ("locked" not in message and "busy" not in message) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def begin_immediate(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """``BEGIN IMMEDIATE``, waiting up to ``busy_timeout`` seconds for another process's write lock.

    The connection's own busy timeout is 0 and the waiting happens here, in steps of 0.1 ms
    growing to 1 ms: SQLite's busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between
    tries, so with several processes writing one bus a writer often slept well past the
    moment the lock came free (a process-per-hop chain on one bus lost about a fifth of its
    throughput that way). Nothing has happened before the lock is taken, so retrying is always safe.
    """
    delay = 0.0001
    give_up = 0.0
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            message = str(exc)
            if "locked" not in message and "busy" not in message:
                raise
            now = time.monotonic()
            if not give_up:
                give_up = now + busy_timeout
            elif now > give_up:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.001)
