"""The embedded default bus: one SQLite file shared by the processes of one host.

>>> bus = SQLiteTransport("sqlite:///var/bus.db?lease=30")   # doctest: +SKIP
>>> async with bus:                                          # doctest: +SKIP
...     await bus.publish([Message("1", "order.placed", b"{}")])

URL: ``sqlite:///relative/bus.db`` (relative to the working directory) or
``sqlite:////absolute/bus.db`` (SQLAlchemy's convention). Query parameters:
``lease`` (ack deadline in seconds, default 30), ``synchronous`` (``NORMAL``, the default,
``FULL`` or ``EXTRA``) and ``busy_timeout`` (seconds a writer waits for the file lock, default 10).

Durability: the file is in WAL mode. With ``synchronous=NORMAL``, a publish or settlement
that returned survives a crash or ``kill -9`` of any process; an OS crash or power loss
may lose the last transactions committed before it, never corrupting the file. With
``synchronous=FULL`` every commit is fsynced and survives power loss too, at a cost in
throughput. Ordering: the deliveries of one group are handed out in publish order for a
single publisher (first deliveries; retries and redeliveries come when they are due).

Why it is fast and never blocks the event loop:

* every SQLite call runs on one dedicated thread per transport;
* *group commit*: the writes of concurrent tasks (publish, claim, ack, retry, ...) that
  queue up while a transaction runs share the next transaction;
* fan-out on write: ``publish`` stores a message once plus one delivery row per
  matching group, a whole batch in one transaction; ``fetch`` claims up to ``max``
  rows in one ``UPDATE ... RETURNING``; ``ack_many`` is one transaction;
* wake-up: a local commit wakes local fetchers at once; commits by other processes are
  noticed by a poller thread reading ``PRAGMA data_version`` (a counter, no I/O) every
  2 ms, only while some fetch waits, and less often (up to every 50 ms) once no other
  process has committed for a second; retries and leases wake a fetch when they fall due.

Leases and retry times are wall-clock seconds in the file, the one time base several
processes share (a wall clock stepped back by some seconds delays redeliveries that much).
The SQL lives in :mod:`~choreograph.transports._sqlite_ops`, the consumer side in
:mod:`~choreograph.transports._sqlite_consumer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from choreograph._clock import SYSTEM_CLOCK, Clock
from choreograph._redact import redact
from choreograph._sqlite import begin_immediate
from choreograph.errors import ConfigurationError, TransportClosed, TransportError
from choreograph.transports import _sqlite_ops as ops
from choreograph.transports import did_you_mean, refuse_repeated
from choreograph.transports._sqlite_consumer import SQLiteSubscription
from choreograph.transports.base import DeadLetter, Message, Subscription, Transport, narrowed, no_such_group

__all__ = ["SQLiteTransport"]

log = logging.getLogger("choreograph.transports.sqlite")

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection, float], Any]

_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_POLL_INTERVAL = 0.002
#: After this long without a commit by another process the poller slows down, doubling its
#: interval up to ``_POLL_IDLE_MAX``: an idle worker polled 500 times a second (3-4% of a
#: core each); now ~20. The first event after a quiet second waits that much longer.
_POLL_QUIET = 1.0
_POLL_IDLE_MAX = 0.05


@dataclasses.dataclass(frozen=True, slots=True)
class _Config:
    path: str
    lease: float
    synchronous: str
    busy_timeout: float


#: Why a ``#`` in a sqlite URL is refused: everything after it is a URL fragment, so the file
#: opened would be another one (``sqlite:////srv/proj#2/bus.db`` opened ``/srv/proj``).
_FRAGMENT = "a '#' in a URL starts a fragment, which cut the file's path to {path!r}; a sqlite:// path cannot contain '#'"


def _parse_url(url: str) -> _Config:
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"broker URL {redact(url)!r}: expected sqlite://")
    if parts.netloc or not parts.path[1:]:
        raise ConfigurationError(
            f"broker URL {redact(url)!r}: expected sqlite:///relative/bus.db or sqlite:////absolute/bus.db"
        )
    path = parts.path[1:]
    if "#" in url:
        raise ConfigurationError(f"broker URL {redact(url)!r}: {_FRAGMENT.format(path=path)}")
    refuse_repeated(url)  # the last one was read
    if path == ":memory:":
        raise ConfigurationError(f"broker URL {redact(url)!r}: an in-memory database is not shared; use memory://")
    # Blank values kept: ?lease= meant the default and ?synchronus= (a typo) passed unnoticed.
    query = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    known = ("lease", "synchronous", "busy_timeout")
    unknown = set(query) - set(known)
    if unknown:
        raise ConfigurationError(
            f"broker URL {redact(url)!r}: unknown parameter(s) "
            f"{', '.join(did_you_mean(name, known) for name in sorted(unknown))}; sqlite:// takes {', '.join(known)}"
        )
    synchronous = query.get("synchronous", "NORMAL").upper()
    if synchronous not in _SYNCHRONOUS:
        raise ConfigurationError(f"broker URL {redact(url)!r}: synchronous must be one of {', '.join(_SYNCHRONOUS)}")
    seconds: dict[str, float] = {}
    for key, default in (("lease", 30.0), ("busy_timeout", 10.0)):
        try:
            seconds[key] = float(query.get(key, default))
        except ValueError:
            raise ConfigurationError(f"broker URL {redact(url)!r}: {key} must be a number of seconds") from None
        if not 0 < seconds[key] < math.inf:  # nan: a NOT NULL constraint failed at the first fetch
            raise ConfigurationError(f"broker URL {redact(url)!r}: {key} must be > 0 seconds (and finite)")
    return _Config(path, seconds["lease"], synchronous, seconds["busy_timeout"])


@dataclasses.dataclass(slots=True)
class _Pending:
    op: _Op
    future: asyncio.Future[Any]
    wakes: bool  # makes deliveries available: wake local fetchers after the commit
    abandon: Callable[[Any], None] | None  # undo a result nobody waits for any more


class SQLiteTransport(Transport):
    """The SQLite bus (see the module docstring for the URL, guarantees and design)."""

    def __init__(self, url: str, *, clock: Clock = SYSTEM_CLOCK) -> None:
        config = _parse_url(url)
        self.url = url
        self.lease = config.lease
        self._config = config
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._connect_lock = asyncio.Lock()
        # group commit
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        # fan-out cache, touched only on the SQLite thread
        self._groups: ops.Groups = {}
        self._groups_version = -1
        # wake-ups
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changes = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._idle_fetches = 0
        self._poll_wanted = threading.Event()
        self._poller: threading.Thread | None = None
        self._subscriptions: set[SQLiteSubscription] = set()
        self._file: tuple[str, int, int] | None = None  # (absolute path, st_dev, st_ino) opened

    @property
    def path(self) -> str:
        """The database file, as the URL names it (relative paths: to the working directory).

        ``connect()`` creates a missing file; commands that only look at a bus check this
        first, so that a mistyped path is an error rather than a new, empty bus.
        """
        return self._config.path

    # -- lifecycle --------------------------------------------------------------------------

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._closed:
                raise TransportClosed(f"{self.url}: transport is closed")
            if self._conn is not None:
                return
            self._loop = asyncio.get_running_loop()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-sqlite")
            config = self._config

            def open_file() -> tuple[sqlite3.Connection, tuple[str, int, int]]:
                conn = ops.open_connection(config.path, synchronous=config.synchronous, busy_timeout=config.busy_timeout)
                try:  # the file checked before each commit and read (_check_file)
                    opened = os.stat(config.path)
                    return conn, (os.path.abspath(config.path), opened.st_dev, opened.st_ino)
                except OSError:
                    conn.close()
                    raise

            try:
                self._conn, file = await self._loop.run_in_executor(self._executor, open_file)
                poll_conn = await self._loop.run_in_executor(
                    self._executor,
                    lambda: sqlite3.connect(config.path, isolation_level=None, check_same_thread=False),
                )
            except (sqlite3.Error, OSError) as exc:
                self._executor.shutdown(wait=False)
                raise TransportError(f"{self.url}: cannot open the database: {exc}") from exc
            except ConfigurationError:  # its folder cannot be created
                self._executor.shutdown(wait=False)
                raise
            self._file = file
            self._poller = threading.Thread(
                target=self._poll, args=(poll_conn,), name="choreograph-sqlite-poll", daemon=True
            )
            self._poller.start()

    async def close(self) -> None:
        if self._closed:
            return
        for subscription in list(self._subscriptions):
            try:
                await subscription.close()
            except Exception as exc:  # its release write failed: its claims expire instead
                log.warning("%s: closing a subscription of %s: %s; its deliveries return after the lease",
                            self.url, subscription.group, exc)
        self._closed = True
        while (flusher := self._flusher) is not None:
            if flusher.done():  # cancelled before its first step (see _flusher_ended)
                self._flusher_ended(flusher)
                continue
            with contextlib.suppress(BaseException):  # its waiters got the error already
                await asyncio.shield(flusher)
        self._bump()  # waiting fetches see the transport closed
        if self._poller is not None:
            self._poll_wanted.set()
            await asyncio.to_thread(self._poller.join)
        if self._executor is not None:
            conn = self._conn
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
            self._executor.shutdown(wait=True)
        self._conn = None

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"{self.url}: transport is closed")

    async def _ensure(self) -> None:
        self._check_open()
        if self._conn is None:
            await self.connect()

    # -- the contract ---------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        await self._ensure()
        if not messages:
            return
        for message in messages:
            if not isinstance(message.body, bytes):
                raise TypeError(
                    f"message {message.id}: body must be bytes, not {type(message.body).__name__}"
                )
        batch = list(messages)
        await self._write(lambda conn, now: self._publish_op(conn, batch, now), wakes=True)

    def _publish_op(self, conn: sqlite3.Connection, messages: list[Message], now: float) -> int:
        version = ops.groups_version(conn)
        if version != self._groups_version:
            self._groups = ops.load_groups(conn)
            self._groups_version = version
        return ops.publish(conn, messages, self._groups, now)

    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        await self._ensure()
        bound = None if types is None else frozenset(types)
        await self._write(lambda conn, now: ops.register_group(conn, group, bound))
        subscription = SQLiteSubscription(self, group)
        self._subscriptions.add(subscription)
        return subscription

    async def unbind(self, group: str, types: Collection[str]) -> frozenset[str] | None:
        await self._ensure()
        removed = frozenset(types)
        # The op raises nothing (it shares its transaction with other writes): errors here.
        exists, bound = await self._write(lambda conn, now: ops.unbind_group(conn, group, removed))
        if not exists:
            raise no_such_group(group)
        return narrowed(group, bound, removed)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall())

    async def groups(self) -> dict[str, frozenset[str] | None]:
        return await self._read(ops.load_groups)

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:  # SQLite reads a negative LIMIT as none
            return []
        return await self._read(lambda conn: ops.list_dead_letters(conn, group, limit))

    async def dead_letter(self, group: str, message_id: str) -> DeadLetter | None:
        letters = await self._read(lambda conn: ops.list_dead_letters(conn, group, 1, [message_id]))
        return letters[0] if letters else None

    async def replay(self, group: str, message_ids: Collection[str] | None = None) -> int:
        await self._ensure()
        ids = None if message_ids is None else list(message_ids)
        count: int = await self._write(lambda conn, now: ops.replay(conn, group, ids, now), wakes=True)
        return count

    async def purge(self, group: str, message_ids: Collection[str] | None = None) -> int:
        await self._ensure()
        ids = None if message_ids is None else list(message_ids)
        count: int = await self._write(lambda conn, now: ops.purge(conn, group, ids))
        return count

    # -- running SQL on the SQLite thread ---------------------------------------------------

    def _check_file(self) -> None:
        """Raise :class:`TransportError` if the path no longer names the file this transport has open.

        SQLite goes on reading and committing to a file that was deleted (or replaced by
        another) under it: every publish would succeed into a file no other process opens
        any more, and be lost. Checked before every commit and read (one ``stat``).
        """
        if self._file is None:
            return
        path, dev, ino = self._file
        try:
            now = os.stat(path)
        except OSError as exc:
            raise TransportError(f"{self.url}: the database file is gone ({exc.strerror}); nothing was written") from None
        if (now.st_dev, now.st_ino) != (dev, ino):
            raise TransportError(
                f"{self.url}: the database file was replaced since it was opened; nothing was written "
                "(restart to use the new file)"
            )

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        await self._ensure()
        conn, executor = self._conn, self._executor
        assert conn is not None and executor is not None

        def checked(conn: sqlite3.Connection) -> T:
            self._check_file()
            return fn(conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(executor, checked, conn)
        except sqlite3.Error as exc:
            raise TransportError(f"{self.url}: {exc}") from exc

    async def _write(
        self, op: _Op, *, wakes: bool = False, abandon: Callable[[Any], None] | None = None
    ) -> Any:
        """Run ``op`` in the next write transaction, shared with the other queued writes."""
        future = self._submit(op, wakes=wakes, abandon=abandon)
        return await future

    def _submit(
        self, op: _Op, *, wakes: bool = False, abandon: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._flusher is not None and self._flusher.done():
            self._flusher_ended(self._flusher)
        self._queue.append(_Pending(op, future, wakes, abandon))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
            self._flusher.add_done_callback(self._flusher_ended)
        return future

    def _flusher_ended(self, flusher: asyncio.Task[None]) -> None:
        """A flusher cancelled before its first step ran none of its body, ``finally``
        included: fail the writes it left queued (their callers may try again) and let the
        next write start another, instead of leaving them all waiting for good."""
        if self._flusher is not flusher:  # it ended through its finally, as it should
            return
        self._flusher = None
        queued, self._queue = self._queue, []
        error = TransportClosed if self._closed else TransportError
        for pending in queued:
            if not pending.future.done():
                pending.future.set_exception(error(f"{self.url}: write interrupted"))

    def _submit_detached(self, op: _Op, *, wakes: bool = False) -> None:
        """Queue a write nobody awaits (releasing abandoned claims); its failure is dropped:
        the lease expires and the rows come back anyway."""
        future = self._submit(op, wakes=wakes)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Pending] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                assert self._executor is not None
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._transact, [p.op for p in batch]
                    )
                except Exception as exc:
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(self._translate(exc))
                    batch = []
                    continue
                for pending, result in zip(batch, results, strict=True):
                    if pending.future.done():  # the waiter was cancelled
                        if pending.abandon is not None:
                            pending.abandon(result)
                    else:
                        pending.future.set_result(result)
                if any(pending.wakes for pending in batch):
                    self._bump()
                batch = []
        except BaseException:
            for pending in [*batch, *self._queue]:
                if not pending.future.done():
                    # Closed only if close() is why; a flusher cancelled otherwise leaves the
                    # transport usable, and the caller may try again.
                    error = TransportClosed if self._closed else TransportError
                    pending.future.set_exception(error(f"{self.url}: write interrupted"))
            self._queue = []
            raise
        finally:
            self._flusher = None

    def _transact(self, ops_: list[_Op]) -> list[Any]:
        conn = self._conn
        assert conn is not None
        begin_immediate(conn, self._config.busy_timeout)
        try:
            self._check_file()
            now = self._clock.time()
            results = [op(conn, now) for op in ops_]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, sqlite3.Error):
            error = TransportError(f"{self.url}: {exc}")
            error.__cause__ = exc
            return error
        return exc

    # -- wake-ups ------------------------------------------------------------------------------

    def _bump(self) -> None:
        """Something may have become available: wake every waiting fetch (on the loop)."""
        self._changes += 1
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_change(self, seen: int, seconds: float) -> None:
        if self._changes != seen or seconds <= 0 or self._closed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        self._idle_fetches += 1
        if self._idle_fetches == 1:
            self._poll_wanted.set()
        try:
            await asyncio.wait([waiter], timeout=seconds)
        finally:
            self._waiters.discard(waiter)
            self._idle_fetches -= 1
            if self._idle_fetches == 0 and not self._closed:
                self._poll_wanted.clear()

    def _poll(self, conn: sqlite3.Connection) -> None:
        """Poller thread: notice commits by other connections while some fetch waits."""
        loop = self._loop
        assert loop is not None
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            changed, interval = time.monotonic(), _POLL_INTERVAL
            while True:
                if not self._poll_wanted.is_set():
                    self._poll_wanted.wait()  # until a fetch waits: it was busy, so poll fast again
                    changed, interval = time.monotonic(), _POLL_INTERVAL
                if self._closed:
                    return
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    last = version
                    loop.call_soon_threadsafe(self._bump)
                    changed, interval = time.monotonic(), _POLL_INTERVAL
                elif interval < _POLL_IDLE_MAX and time.monotonic() - changed > _POLL_QUIET:
                    interval = min(_POLL_IDLE_MAX, interval * 2)
                time.sleep(interval)
        except (sqlite3.Error, RuntimeError):  # RuntimeError: the loop closed under us
            return
        finally:
            conn.close()
