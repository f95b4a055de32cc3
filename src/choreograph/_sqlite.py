"""Opening SQLite files shared by several processes.

Every SQLite store and the SQLite transport open their files here. Switching a new file
to WAL needs an exclusive lock that SQLite may refuse at once (``database is locked``,
without waiting on the busy timeout) when another process opens the same new file at
that moment — two services starting together, a journal and a gateway. Those first
steps are retried until ``timeout``; after them the busy timeout does the waiting.

A file's folder is created with it (:func:`make_folder`): a folder that cannot be is the
user's path, so it is a :class:`~choreograph.errors.ConfigurationError` naming the file,
the folder and why, not an ``OSError`` from deep inside a store.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from choreograph.errors import ConfigurationError


def make_folder(path: str) -> None:
    """Create the folder of the SQLite file ``path`` (and its parents) unless it exists.

    Raises :class:`ConfigurationError` naming ``path`` and the reason when it cannot be
    created: a component of it is a file (``/etc/hostname/bus.db``), permission denied...
    """
    if path == ":memory:":
        return
    if os.path.isdir(path):  # SQLite says "unable to open database file", or "disk I/O error"
        raise ConfigurationError(f"SQLite database {path!r}: a folder, not a database file")
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"SQLite database {path!r}: cannot create its folder {str(folder)!r}: {why_not_made(folder, exc)}"
        ) from None


def why_not_made(folder: Path, exc: OSError) -> str:
    """Why ``folder.mkdir(parents=True)`` raised ``exc``, for an error message: the file standing
    where a folder must be (``'/etc/hostname' is a file, not a folder``), else the OS's reason."""
    blocker = next((p for p in (*reversed(folder.parents), folder) if p.exists() and not p.is_dir()), None)
    return f"{str(blocker)!r} is a file, not a folder" if blocker is not None else exc.strerror or str(exc)


def connect_wal(path: str, *, timeout: float = 30.0, synchronous: str = "NORMAL", schema: str | None = None) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with ``schema`` (a script) applied, its folder created.

    A folder that cannot be created raises :class:`ConfigurationError` (see :func:`make_folder`).
    """
    make_folder(path)
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
