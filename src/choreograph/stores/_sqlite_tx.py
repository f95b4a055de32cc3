"""A user transaction on a SQLite service database: one unit of work of the store's writer.

Statements run inline (see :mod:`choreograph.stores._sqlite_writer`); placeholders are
``$1, $2`` (SQLite named parameters ``1``, ``2``). The commit writes the inbox record
and the outbox rows, releases the unit's savepoint and returns once the group's
``COMMIT`` happened.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from choreograph._clock import stamp_time
from choreograph.errors import StoreError
from choreograph.stores._sqlite_writer import Batch, SQLiteWriter
from choreograph.stores.state import Row, TxConnection
from choreograph.transports.base import Message

T = TypeVar("T")

_INSERT_INBOX = "INSERT OR IGNORE INTO choreograph_inbox VALUES (?, ?, ?)"
_INSERT_OUTBOX = "INSERT INTO choreograph_outbox (service, event_id, type, body, created_at) VALUES (?, ?, ?, ?, ?)"


def _params(args: Sequence[Any]) -> dict[str, Any]:
    """``$1, $2`` are SQLite named parameters called ``1``, ``2``."""
    return {str(i): value for i, value in enumerate(args, start=1)}


class SQLiteTx(TxConnection):
    """One user transaction: a unit of the writer, from its first statement to commit or rollback."""

    __slots__ = ("writer", "batch", "left", "done")

    def __init__(self, writer: SQLiteWriter) -> None:
        self.writer = writer
        self.batch: Batch | None = None
        self.left = False
        self.done = False

    async def _db(self) -> sqlite3.Connection:
        """The writer's connection, inside this unit (joining the open SQLite transaction first).

        Raises once SQLite ended the transaction under this unit (an I/O error, a trigger's
        ``RAISE(ROLLBACK)``...): its work is gone, and a statement now would run in
        autocommit, outside any unit — the rest of the handler must fail, not half-commit.
        """
        if self.done:
            raise StoreError(f"database {self.writer.url}: the transaction is already finished")
        if self.batch is None:
            self.batch = await self.writer.enter()
        elif self.batch is not self.writer.batch:  # the unit holds the turn: only an abort ends its batch
            raise StoreError(f"database {self.writer.url}: SQLite rolled this transaction back; "
                             "its statements so far are undone")
        return self.writer.connection()

    async def connect(self) -> None:
        """Join the open SQLite transaction now: ``BEGIN IMMEDIATE`` may wait for another
        process's write lock, and a handler's unit keeps that wait out of its timeout."""
        await self._db()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        await self._db()
        return self.writer.run(fn)

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        batch = self.batch
        db = self.writer.db if batch is not None and batch is self.writer.batch and not self.done else None
        if db is None:
            db = await self._db()
        try:  # inline rather than through writer.run: the one statement most handlers run
            return max(0, db.execute(sql, _params(args) if args else ()).rowcount)
        except sqlite3.Error as exc:
            raise self.writer.failed(exc) from exc

    async def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        await self._run(lambda db: db.executemany(sql, [_params(r) for r in rows]))

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Row]:
        return await self._run(lambda db: db.execute(sql, _params(args)).fetchall())

    async def fetchone(self, sql: str, args: Sequence[Any]) -> Row | None:
        def first(db: sqlite3.Connection) -> Row | None:
            cursor = db.execute(sql, _params(args))
            try:
                return cursor.fetchone()
            finally:
                cursor.close()  # finish the statement (an UPDATE ... RETURNING must not stay open)

        return await self._run(first)

    async def commit(
        self,
        *,
        inbox: tuple[str, str] | None,
        service: str,
        messages: Sequence[Message],
        forget_failures: bool = True,
    ) -> bool:
        now = time.time()
        try:
            db = await self._db()
            fresh = True
            try:
                if inbox is not None:  # dated on the worker's clock, as Worker.expire reads it
                    if db.execute(_INSERT_INBOX, (*inbox, stamp_time())).rowcount == 0:
                        fresh = False  # another consumer committed this event first
                    elif forget_failures:
                        db.execute("DELETE FROM choreograph_failures WHERE grp=? AND event_id=?", inbox)
                if fresh and messages:
                    if len(messages) == 1:
                        m = messages[0]
                        db.execute(_INSERT_OUTBOX, (service, m.id, m.type, m.body, now))
                    else:
                        db.executemany(_INSERT_OUTBOX, [(service, m.id, m.type, m.body, now) for m in messages])
            except sqlite3.Error as exc:
                raise self.writer.failed(exc) from exc
            self._leave(keep=fresh)
            if fresh and messages and self.batch is not None:
                self.batch.woken.add(service)
        except BaseException:
            self._leave(keep=False)
            raise
        finally:
            await self._finish()
        if fresh and self.batch is not None:
            # Acked only once the real COMMIT happened. A cancelled unit must not cancel the
            # future every unit of the batch waits on, and must not wait for a commit that
            # may never come (a flusher cancelled at shutdown): wait_durable sees to both.
            await self.batch.wait_durable()
        return fresh

    async def rollback(self) -> None:
        if self.done:
            return
        try:
            self._leave(keep=False)
        finally:
            await self._finish()

    def _leave(self, *, keep: bool) -> None:
        if self.batch is not None and not self.left:
            self.left = True
            self.writer.leave(keep=keep)

    async def _finish(self) -> None:
        if not self.done:
            self.done = True
            await self.writer.release()
