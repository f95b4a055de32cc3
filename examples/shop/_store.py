"""Each shop service's own SQLite database, used from async handlers without blocking the loop.

A store is opened on first use at ``$CHOREOGRAPH_DATA_DIR/<name>.db`` (default
``./var/shop``); every call is one ``BEGIN IMMEDIATE`` transaction on the store's own
thread, so a read-check-write ("is there enough stock? reserve it") is atomic even with
several replicas of a service on one file. Handlers keep their effects idempotent by
keying rows on the order id.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DATA_ENV = "CHOREOGRAPH_DATA_DIR"
_OPEN: list[Store] = []


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or "./var/shop")


class Store:
    """A service's database, created with ``schema`` and ``seed`` on first use."""

    def __init__(self, name: str, schema: str, seed: Callable[[sqlite3.Connection], None] | None = None) -> None:
        self.name = name
        self.schema = schema
        self.seed = seed
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            path = data_dir() / f"{self.name}.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            conn.executescript(self.schema)
            self._conn = conn
            if self.seed is not None:
                self._transaction(self.seed)
        conn = self._conn
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
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"shop-{self.name}")
            _OPEN.append(self)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._transaction, fn)

    def close(self) -> None:
        """Close the connection (the next call reopens it, under the current data dir)."""
        if self._executor is not None:
            self._executor.submit(self._close).result()
            self._executor.shutdown()
            self._executor = None

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def close_all() -> None:
    """Close every store opened in this process (tests switch data dirs between runs)."""
    while _OPEN:
        _OPEN.pop().close()
