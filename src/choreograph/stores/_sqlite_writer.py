"""The one writer of a SQLite service database in a process: a turn, inline statements, group commit.

SQLite has a single writer per file, so a process gives its writers one *turn* at a
time (an asyncio lock, FIFO) on one connection. Three choices make that fast:

* **Inline statements.** A unit of work holds the turn from its first statement to
  its end; hopping to a thread for each statement costs a GIL hand-off that a busy
  event loop delays (up to the interpreter's switch interval), which measured ~1 ms
  per transaction. Inline, an insert takes microseconds. What could block goes to the
  connection's thread instead: waiting for another *process* to release the write
  lock (``busy_timeout=0`` inline, then a blocking ``BEGIN IMMEDIATE`` off the loop)
  and commits that fsync (``synchronous=FULL``). The connection never checkpoints
  (``wal_autocheckpoint=0``); the store does that off the loop. Keep statements short.
* **Group commit.** Each unit runs inside a ``SAVEPOINT`` of one open SQLite
  transaction (``BEGIN IMMEDIATE``), so rolling a unit back undoes only its own work.
  When a unit ends, a flusher task queues for the turn behind whoever waits and then
  commits for all the units before it: at once when idle, many together when busy. A
  unit's ``commit`` returns only once that real ``COMMIT`` happened, so nothing is
  acked before it is durable; if the ``COMMIT`` fails, every unit in it fails (and
  its event is retried).
* **Every write of the process goes through here** (the store's own inbox, relay and
  housekeeping writes too), so writers queue fairly instead of meeting in SQLite's
  busy handler, which sleeps.

Replicas in other processes compete for the file lock as usual; under sustained load
one process can keep it for long stretches, so many replicas of a busy service
belong on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from choreograph._clock import waits_on_others
from choreograph._sqlite import begin_immediate
from choreograph.errors import StoreError

T = TypeVar("T")

_SAVEPOINT = "choreograph_unit"


@dataclasses.dataclass(slots=True)
class Batch:
    """The open SQLite transaction: units that ended well, waiting for one ``COMMIT``.

    ``durable`` is resolved by the commit (or its failure); units wait for it through
    :meth:`wait_durable`, each on a future of its own.
    """

    durable: asyncio.Future[None]
    woken: set[str] = dataclasses.field(default_factory=set)  # services whose outbox got rows
    waiters: list[asyncio.Future[None]] = dataclasses.field(default_factory=list)

    @classmethod
    def open(cls) -> Batch:
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = cls(durable)
        durable.add_done_callback(batch._resolved)
        return batch

    async def wait_durable(self) -> None:
        """Until the batch's ``COMMIT`` happened; raises if it failed.

        Cancelling the caller cancels only its own wait, never ``durable``, which every
        unit of the batch waits for (what ``asyncio.shield`` does, without its two
        callbacks per caller: this runs once per handler).
        """
        durable = self.durable
        if durable.done():
            return durable.result()
        waiter: asyncio.Future[None] = durable.get_loop().create_future()
        self.waiters.append(waiter)
        tell = waits_on_others.get()
        if tell is None:
            await waiter
            return
        tell(True)  # the commit may wait for another unit of the batch still holding the turn
        try:
            await waiter
        finally:
            tell(False)

    def _resolved(self, durable: asyncio.Future[None]) -> None:
        waiters, self.waiters = self.waiters, []
        if durable.cancelled():  # it held only an undone unit: nobody can be waiting
            for waiter in waiters:
                waiter.cancel()
            return
        error = durable.exception()  # retrieved: a failed commit is reported to the waiting units
        for waiter in waiters:
            if not waiter.done():  # not cancelled meanwhile
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)


def is_busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


async def uncancellable(future: asyncio.Future[T]) -> T:
    """Await work on a connection's thread; if cancelled, still let it finish before re-raising
    (the connection must be idle before the turn passes on)."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


class SQLiteWriter:
    """The writing connection of one store, shared by its units of work one turn at a time."""

    def __init__(
        self, url: str, synchronous: str, on_commit: Callable[[set[str]], None], *, busy_timeout: float = 30.0
    ) -> None:
        self.url = url
        self.synchronous = synchronous
        self.on_commit = on_commit
        self.busy_timeout = busy_timeout
        self.db: sqlite3.Connection | None = None
        self.executor: ThreadPoolExecutor | None = None
        self._turn = asyncio.Lock()
        self._batch: Batch | None = None
        self._savepoint = False  # whether the unit holding the turn opened a savepoint
        self._flusher: asyncio.Task[None] | None = None

    def attach(self, db: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=0")  # never block the event loop on a lock
        db.execute("PRAGMA wal_autocheckpoint=0")  # nor on a checkpoint
        self.db, self.executor = db, executor

    async def detach(self) -> None:
        """Commit what is pending; afterwards the connection may be closed."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._batch is not None:
            async with self._turn:
                await self._commit_batch()
        self.db = None

    def error(self, exc: BaseException) -> StoreError:
        return StoreError(f"database {self.url}: {type(exc).__name__}: {exc}")

    @property
    def batch(self) -> Batch | None:
        """The open SQLite transaction's batch (``None`` between transactions, or once one was aborted)."""
        return self._batch

    def connection(self) -> sqlite3.Connection:
        if self.db is None:
            raise StoreError(f"database {self.url} is not open")
        return self.db

    # -- the turn -----------------------------------------------------------------------

    async def acquire(self) -> None:
        tell = waits_on_others.get()
        if tell is None:
            await self._turn.acquire()
            return
        tell(True)  # another may hold the turn, or be next in line (on a test's clock: see _clock.waits_on_others)
        try:
            await self._turn.acquire()
        finally:
            tell(False)

    async def release(self) -> None:
        """End a turn, leaving the commit to a flusher queued behind whoever waits now.

        The flusher runs once the tasks already runnable had their turn, so an idle
        store commits at once and a busy one commits many units together.
        """
        if self._batch is not None and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush(), name="choreograph-sqlite-commit")
        self._turn.release()

    async def _flush(self) -> None:
        await self._turn.acquire()
        try:
            if self._batch is not None:
                await self._commit_batch()
        finally:
            self._turn.release()

    # -- units --------------------------------------------------------------------------

    async def enter(self) -> Batch:
        """Inside the turn: join the open transaction under a savepoint, or begin one (needing none)."""
        db = self.connection()
        if self._batch is None:
            await self._begin_immediate(db)
            self._batch = Batch.open()
            self._savepoint = False  # alone in the transaction: undoing it is a plain ROLLBACK
        else:
            self.run(lambda d: d.execute(f"SAVEPOINT {_SAVEPOINT}"))
            self._savepoint = True
        return self._batch

    def leave(self, *, keep: bool) -> None:
        """End this unit's savepoint: keep its work in the batch, or undo it.

        If undoing fails the unit's work cannot be told apart from the batch's, so the
        whole batch is rolled back and fails (its units' events are retried).
        """
        db = self.connection()
        if not db.in_transaction:  # the whole transaction already ended (and its batch failed)
            return
        if keep:
            if self._savepoint:
                self.run(lambda d: d.execute(f"RELEASE {_SAVEPOINT}"))
            return
        if not self._savepoint:
            batch, self._batch = self._batch, None
            if batch is not None:
                batch.durable.cancel()  # it held only this unit: nobody waits for it
            self.run(lambda d: d.execute("ROLLBACK"))
            return
        try:
            db.execute(f"ROLLBACK TO {_SAVEPOINT}")
            db.execute(f"RELEASE {_SAVEPOINT}")
        except sqlite3.Error as exc:
            self._abort(exc)
            raise self.error(exc) from exc

    def _abort(self, exc: BaseException) -> None:
        db = self.connection()
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        batch, self._batch = self._batch, None
        if batch is not None and not batch.durable.done():
            batch.durable.set_exception(self.error(exc))

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A statement of the current unit, inline. An error that ended the whole SQLite
        transaction (SQLite does that on I/O errors, a full disk...) fails the batch."""
        db = self.connection()
        try:
            return fn(db)
        except sqlite3.Error as exc:
            raise self.failed(exc) from exc

    def failed(self, exc: sqlite3.Error) -> StoreError:
        """What a statement of the current unit that raised ``exc`` raises (see :meth:`run`)."""
        db = self.db
        if self._batch is not None and db is not None and not db.in_transaction:
            self._abort(exc)
        return self.error(exc)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One unit of the store's own: ``fn`` inside the turn, durable when this returns."""
        await self.acquire()
        try:
            batch = await self.enter()
            try:
                result = self.run(fn)
            except BaseException:
                self.leave(keep=False)
                raise
            self.leave(keep=True)
        finally:
            await self.release()
        await batch.wait_durable()
        return result

    # -- SQLite transactions ------------------------------------------------------------

    async def _begin_immediate(self, db: sqlite3.Connection) -> None:
        """Take SQLite's write lock: at once if free, else wait for it on the connection's thread."""
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.Error as exc:
            if not is_busy(exc):
                raise self.error(exc) from exc

        def wait_for_lock() -> None:  # in short steps: SQLite's busy handler sleeps up to 25 ms a try
            begin_immediate(db, self.busy_timeout)

        try:
            await uncancellable(self._off_loop(wait_for_lock))
        except asyncio.CancelledError:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _off_loop(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        if self.executor is None:
            raise StoreError(f"database {self.url} is not open")

        def call() -> T:
            try:
                return fn()
            except sqlite3.Error as exc:
                raise self.error(exc) from exc

        return asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def _commit_batch(self) -> None:
        """``COMMIT`` the open transaction (turn held) and tell its units."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        db = self.connection()
        try:
            if self.synchronous == "NORMAL":  # WAL + NORMAL: a commit appends to the WAL, no fsync
                db.execute("COMMIT")
            else:
                await uncancellable(self._off_loop(lambda: db.execute("COMMIT")))
        except BaseException as exc:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if not batch.durable.done():
                batch.durable.set_exception(self.error(exc) if isinstance(exc, Exception) else
                                            StoreError(f"database {self.url}: commit interrupted"))
            if not isinstance(exc, Exception):
                raise
            return
        batch.durable.set_result(None)
        self.on_commit(batch.woken)
