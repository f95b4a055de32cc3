"""Each service's own SQLite database, used from async handlers without blocking the loop.

One connection per store, used by one dedicated thread; every call is one
transaction (``BEGIN IMMEDIATE``), so a read-check-write (e.g. "pick a free drone and
assign it") is atomic even with several replicas of a service on the same file.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DATA_ENV = "CHOREOGRAPH_DATA_DIR"


def data_dir() -> Path:
    """Where the services keep their state: ``$CHOREOGRAPH_DATA_DIR`` or ``./var/drone_delivery``."""
    return Path(os.environ.get(DATA_ENV) or "./var/drone_delivery")


class Store:
    """A service's database at ``<data dir>/<name>.db``, created with ``schema`` on first use."""

    def __init__(
        self, name: str, schema: str, *, seed: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        self.name = name
        self.schema = schema
        self.seed = seed
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def path(self) -> Path:
        return data_dir() / f"{self.name}.db"

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.row_factory = sqlite3.Row
            for attempt in range(100):
                # Replicas may create the file at the same moment; switching it to WAL can
                # then fail at once with "database is locked" (no busy wait): try again.
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == 99:
                        raise
                    time.sleep(0.05)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(None, (s.strip() for s in self.schema.split(";"))):
                    conn.execute(statement)
                if self.seed is not None:
                    self.seed(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._conn = conn
        return self._conn

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._open()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in one transaction on the store's thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"store-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._transaction, fn)

    def close(self) -> None:
        """Close the connection (the next call reopens it, possibly at a new data dir)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Synchronous read for tests and tools (another connection; never blocks writers)."""
        conn = sqlite3.connect(self.path, timeout=30.0)
        conn.row_factory = sqlite3.Row
        try:
            return fn(conn)
        finally:
            conn.close()
