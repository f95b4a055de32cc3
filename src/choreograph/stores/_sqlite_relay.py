"""Relay claims and cross-process wake-ups of a SQLite service database.

A relay of one process cannot learn two things from its own event loop; this module
answers both with the operating system.

**Is the claim holder alive?** The holder of a service's relay claim keeps an
exclusive ``flock`` on a file beside the database, ``<db>-relay-<service>.lock``,
for as long as it holds the claim; a relay must hold the lock to take or keep the
claim. The kernel drops the lock the moment the holder's process dies (SIGKILL, OOM,
a crash), and never while it lives — however slow or stalled it is. So a standby
takes over from a dead holder at once instead of waiting out ``relay_lease``, and
never from a live one (two relays publishing at once would break commit order).

Why a file lock rather than a pid in the claim row: a pid says nothing across
containers that share a hostname but not a pid namespace, and even with the
namespace and the start time added it is a guess about another process; the lock is
the kernel's own record of it. It covers exactly the processes that can share a
SQLite database in WAL mode (one host, one kernel, the database's directory shared),
including containers on one host with the directory mounted in each. ``flock`` locks
belong to an open file description, so two relays in one process exclude each other
too, and the descriptors are closed in a forked child (which would otherwise keep a
dead parent's lock). Never delete a lock file while the service runs.

The lease row stays: relays renew it as before, and a relay that does not take the
lock (an older version during a rolling upgrade, or a platform without ``flock``:
Windows, or a lock file that cannot be opened) still waits for a lease to lapse. The
claim row says which kind of owner holds it (``owner`` ends in :data:`LOCKED`); only
a locked owner is displaced by whoever holds its lock, since holding the lock proves
that owner gone.

**Did another process commit outbox rows?** A commit in this process wakes its relay
directly. Commits by other processes are noticed by a watcher thread reading
``PRAGMA data_version`` (a counter in shared memory, no I/O) while a relay holding a
claim waits, and ``max(seq)`` of the outbox when it moved; the same thread tries the
lock of each waiting standby, so a standby wakes as soon as the holder dies. It
checks every 10 ms, slowing to every 100 ms after a few quiet seconds or while this
process itself keeps committing outbox rows (its relays then pass often anyway, and a
pass reads every unsent row), and sleeps while no relay waits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Callable
from urllib.parse import quote

log = logging.getLogger("choreograph.outbox")

LOCKED = "+flock"
"""Suffix of the ``owner`` of a claim row whose holder holds the claim's lock."""

LOCKING = sys.platform != "win32"

if sys.platform != "win32":
    import fcntl

_FAST = 0.01  # seconds between watcher checks while things happen
_SLOW = 0.1  # ...after a few quiet seconds

_LOCKS: weakref.WeakSet[RelayLock] = weakref.WeakSet()


def lock_path(database: str, service: str) -> str:
    """The lock file of ``service``'s relay claim, beside the database file (symlinks resolved)."""
    return f"{os.path.realpath(database)}-relay-{quote(service, safe='')}.lock"


class RelayLock:
    """An exclusive ``flock`` on one claim's lock file; thread-safe.

    ``enforced`` is ``False`` where no lock can be taken (no ``flock``, or the file
    cannot be opened): :meth:`acquire` then always succeeds and only the lease decides.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.enforced = LOCKING
        self.held = False
        self._fd: int | None = None
        self._mutex = threading.Lock()
        _LOCKS.add(self)

    def acquire(self) -> bool:
        """Take the lock if it is free (never waits); ``True`` if this object holds it."""
        with self._mutex:
            if not self.held:
                self.held = self._lock()
            return self.held

    def probe(self) -> bool:
        """Whether the lock is free: taken and given back at once (``False`` where none is enforced)."""
        with self._mutex:
            if self.held or not self._lock() or not self.enforced or self._fd is None:
                return False
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            return True

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases it)."""
        with self._mutex:
            fd, self._fd, self.held = self._fd, None, False
            if fd is not None:
                os.close(fd)

    def _lock(self) -> bool:
        if not self.enforced or sys.platform == "win32":
            return True
        if self._fd is None:
            try:  # read-only is enough for flock, so the file may belong to another user
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                log.warning("cannot open the relay lock %s (%s): the claim falls back to its lease", self.path, exc)
                self.enforced = False
                return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _forget_in_child(self) -> None:
        """After ``fork``: close the child's copy only. Unlocking would release the parent's lock
        (one open file description); closing drops the child's reference, so the lock goes
        when the parent dies."""
        fd, self._fd, self.held = self._fd, None, False
        self._mutex = threading.Lock()
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _after_fork_in_child() -> None:
    for lock in list(_LOCKS):
        lock._forget_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class OutboxWatcher:
    """A thread that wakes waiting relays for what happens in other processes.

    The store tells it, on the event loop, which services have a relay waiting and
    whether that relay holds the claim (:meth:`watch`); it calls ``wake(service)`` on
    the loop when another process committed outbox rows (for a holder) or the claim's
    lock came free (for a standby).
    """

    def __init__(self, database: str, wake: Callable[[str], None]) -> None:
        self.database = database
        self._wake = wake
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wanted = threading.Event()
        self._closed = False
        self._watching: dict[str, bool] = {}  # service -> its waiting relay holds the claim (replaced, never mutated)
        self._probes: dict[str, RelayLock] = {}  # used by the thread only
        #: Service -> ``time.monotonic()`` of this process's last commit of its outbox rows (set
        #: by the store). While they keep coming, the service's relay here passes often anyway
        #: and every pass reads all its unsent rows, other processes' included: the thread then
        #: leaves that service alone (each check takes the GIL from a busy event loop).
        self.committed_at: dict[str, float] = {}

    def watch(self, watching: dict[str, bool]) -> None:
        """Watch for these services from now on (``{}``: none; the thread then sleeps)."""
        self._watching = watching
        if not watching:
            self._wanted.clear()
            return
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="choreograph-outbox-watch", daemon=True)
            self._thread.start()
        self._wanted.set()

    async def close(self) -> None:
        self._closed = True
        self._wanted.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 5.0)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        db: sqlite3.Connection | None = None
        version = seq = -1  # last seen data_version and max(seq) of the outbox
        told: dict[str, int] = {}  # service -> the max(seq) its holder was last woken for
        quiet_since = time.monotonic()
        try:
            while True:
                self._wanted.wait()
                if self._closed:
                    return
                woken: set[str] = set()
                watching = self._watching
                started = time.monotonic()
                committed = self.committed_at
                idle = [service for service, holder in watching.items()
                        if holder and started - committed.get(service, 0.0) >= _SLOW]
                if idle:
                    if db is None:
                        db = sqlite3.connect(self.database, timeout=5.0, isolation_level=None, check_same_thread=False)
                    now_version = db.execute("PRAGMA data_version").fetchone()[0]
                    if now_version != version:  # some other connection committed: rows added?
                        version = now_version
                        seq = db.execute("SELECT coalesce(max(seq), 0) FROM choreograph_outbox").fetchone()[0]
                    for service in idle:
                        if told.get(service) != seq:  # (a purge may lower it; seq is never reused)
                            told[service] = seq
                            woken.add(service)
                standby = LOCKING and not all(watching.values())
                if standby:
                    for service, holder in watching.items():
                        if not holder and self._probe(service).probe():
                            woken.add(service)
                now = time.monotonic()
                if woken:
                    quiet_since = now
                    for service in woken:
                        loop.call_soon_threadsafe(self._wake, service)
                if idle or standby:
                    time.sleep(min(_SLOW, _FAST * 2 ** min(4, int(now - quiet_since))))
                else:  # every holder's service is committing here: its passes see the rest
                    time.sleep(_SLOW)
        except (sqlite3.Error, OSError, RuntimeError) as exc:  # RuntimeError: the loop closed under us
            log.warning("outbox watcher of %s stopped (%s): relays poll instead", self.database, exc)
        finally:
            if db is not None:
                db.close()
            for probe in self._probes.values():
                probe.release()

    def _probe(self, service: str) -> RelayLock:
        probe = self._probes.get(service)
        if probe is None:
            probe = self._probes[service] = RelayLock(lock_path(self.database, service))
        return probe
