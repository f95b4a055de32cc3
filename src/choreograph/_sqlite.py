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
