"""The service database's connection pool on PostgreSQL: hand-off, and ``BEGIN`` sent ahead.

The other PostgreSQL stores use asyncpg's pool (:func:`choreograph.stores._pg.create_pool`).
A service database runs a transaction per handler, so it pays for each round trip and
each pool turn; :class:`HandoffPool` saves one of the first and most of the second.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

from choreograph._redact import redact
from choreograph.errors import StoreError
from choreograph.stores._pg import PgConfig, connect


@contextlib.contextmanager
def closed_if_interrupted(conn: Any) -> Iterator[None]:
    """Close ``conn`` at once if the statement run inside is cancelled.

    asyncpg then still has a cancel request in flight and refuses the next statement
    ("another operation is cancelling"); a fresh connection is cheaper than waiting.
    """
    try:
        yield
    except asyncio.CancelledError:
        conn.terminate()
        raise


@dataclasses.dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Any]  # the connection handed over, or None: "a slot came free, open one"
    transaction: bool


class HandoffPool:
    """Connections handed from one user straight to the next, first come first served.

    The service database's pool (the other stores use asyncpg's). What it adds, to
    save work per transaction on a busy worker:

    * **``BEGIN`` sent ahead.** A transaction that commits while the waiter its
      connection will reach wants a transaction (:meth:`begin_ahead`) ends its commit
      with ``BEGIN`` and hands the connection over already inside a transaction
      (``conn.is_in_transaction()``): one round trip less per transaction under load.
      The ``BEGIN`` runs after that waiter asked, so ``now()`` still falls between its
      request and its first statement, as with a ``BEGIN`` of its own. A begun
      connection that nobody takes is rolled back.
    * **Cheap turns.** Acquire and release are a list pop or one future; no timers.

    Waiters are served in arrival order, so the relay and inbox lookups get their turn
    among a stream of transactions. A connection found closed on release is dropped and
    its slot passed to the next waiter, who opens a new one.
    """

    def __init__(self, config: PgConfig, settings: dict[str, str] | None = None, size: int | None = None) -> None:
        self.config = config
        self.settings = settings or {}
        self.size = config.pool_max if size is None else size
        self._idle: list[Any] = []
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._count = 0  # connections open or being opened
        self._ahead = 0  # connections promised to be handed over begun (begin_ahead)
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Open ``config.pool_min`` connections ahead (the others are opened on demand)."""
        while self._count < min(self.config.pool_min, self.size):
            self._idle.append(await self._open())

    async def acquire(self, *, transaction: bool = False) -> Any:
        """A connection; already in a transaction only if ``transaction`` (see the class docstring)."""
        if self._closed:
            raise StoreError(f"database {redact(self.config.url)} is not open")
        waiters = self._waiters
        while waiters and waiters[0].future.done():  # given up (cancelled): they must not hold the line
            waiters.popleft()
        if not waiters:  # then nobody is owed the idle connections or a free slot
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._drop(conn)  # the server closed it while idle
            if self._count < self.size:
                return await self._open()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), transaction)
        waiters.append(waiter)
        try:
            conn = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():  # handed over as we were cancelled
                self._pass_on(waiter.future.result())
            raise
        if conn is None:  # a slot came free
            return await self._open(reserved=True)
        return conn

    def begin_ahead(self) -> bool:
        """Whether a transaction about to commit should end with ``BEGIN`` for the next user.

        True when the waiter its connection will reach (counting the connections already
        promised begun to the waiters before it) wants a transaction. A ``True`` is a
        promise: pass ``ahead=True`` to :meth:`release` for that connection.
        """
        skip = self._ahead
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            if skip == 0:
                if waiter.transaction:
                    self._ahead += 1
                    return True
                return False
            skip -= 1
        return False

    async def release(self, conn: Any, *, ahead: bool = False, begun: bool = False) -> None:
        """Give ``conn`` back: to the first waiter, else to the idle list.

        ``ahead``: :meth:`begin_ahead` said yes for this connection. ``begun``: its open
        transaction was begun for the next user (a commit ending with ``BEGIN``); it
        goes over as it is only to a waiter that wants a transaction. Any other open
        transaction is rolled back first.
        """
        if ahead:
            self._ahead -= 1
        try:
            while not (self._closed or conn.is_closed()):
                if conn.is_in_transaction() and not (begun and self._next_wants_transaction()):
                    with closed_if_interrupted(conn):
                        try:
                            await conn.execute("ROLLBACK")
                        except Exception:
                            conn.terminate()
                    continue
                if self._hand_over(conn):
                    return
                self._idle.append(conn)
                return
        except BaseException:
            self._drop(conn)
            raise
        self._drop(conn)

    async def close(self) -> None:
        """Close the idle connections, and the others as they come back; fail the waiters."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(StoreError(f"database {redact(self.config.url)} was closed"))
        idle, self._idle = self._idle, []
        for conn in idle:
            self._drop(conn)
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- one-statement helpers (an autocommit statement on a pooled connection) -----------

    @contextlib.asynccontextmanager
    async def _statement(self) -> AsyncIterator[Any]:
        """A pooled connection for one statement: closed if interrupted, released after."""
        conn = await self.acquire()
        try:
            with closed_if_interrupted(conn):
                yield conn
        finally:
            await self.release(conn)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self._statement() as conn:
            return str(await conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self._statement() as conn:
            return list(await conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        async with self._statement() as conn:
            return await conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    # -- internals ------------------------------------------------------------------------

    async def _open(self, *, reserved: bool = False) -> Any:
        if not reserved:
            self._count += 1
        try:
            conn = await connect(self.config, self.settings)
        except BaseException:
            self._count -= 1
            self._pass_slot()
            raise
        if self._closed:
            self._drop(conn)
            raise StoreError(f"database {redact(self.config.url)} was closed")
        return conn

    def _next_wants_transaction(self) -> bool:
        for waiter in self._waiters:
            if not waiter.future.done():
                return waiter.transaction
        return False

    def _hand_over(self, conn: Any) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(conn)
                return True
        return False

    def _pass_on(self, conn: Any) -> None:
        """A connection (or slot) handed to a waiter that was cancelled before it could take it."""
        if conn is None:
            self._count -= 1
            self._pass_slot()
        else:
            self._in_background(self.release(conn, begun=True))

    def _drop(self, conn: Any) -> None:
        """Forget ``conn`` (closing it if still open) and pass its slot on."""
        self._count -= 1
        if not conn.is_closed():
            self._in_background(_close_quietly(conn))
        self._pass_slot()

    def _in_background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _pass_slot(self) -> None:
        if self._closed:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                self._count += 1  # reserved for that waiter
                waiter.future.set_result(None)
                return


async def _close_quietly(conn: Any) -> None:
    try:
        await conn.close(timeout=2)
    except Exception:
        conn.terminate()
