"""Idempotency keys of the gateway: a retried request returns the first answer and publishes nothing new.

Semantics follow the IETF ``Idempotency-Key`` header draft (draft-ietf-httpapi-idempotency-key-header):

* first use of a key: the request proceeds; the key is *claimed* (pending) with the
  correlation id the request will publish under;
* same key, same payload, first request done: the same ``202`` and correlation id, no
  publish (``Idempotent-Replayed: true``);
* same key, different payload: ``409`` (the key was reused for another request; the
  draft suggests 422, but the payload is valid and conflicts with server state);
* same key while the first request is still in flight: ``409``, retry later.

A failed publish *releases* the key but keeps its correlation id, so the client's retry
publishes under the same event id: if the failed publish did reach the broker after all,
every inbox drops the second copy and the transaction still starts exactly once. A claim
whose holder died (no answer within ``lease`` seconds) is taken over the same way. Keys
are forgotten ``ttl`` seconds after first use (24 h by default).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from choreograph._redact import redact
from choreograph._schemes import scheme_of
from choreograph._sqlite import connect_wal
from choreograph.errors import ConfigurationError, StoreError
from choreograph.stores.sqlite import sqlite_store_path

T = TypeVar("T")

ClaimOutcome = Literal["new", "replay", "mismatch", "in_flight"]


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """What to do with a request carrying a key; ``correlation_id`` is the one to publish under or to repeat."""

    outcome: ClaimOutcome
    correlation_id: str


class IdempotencyStore(abc.ABC):
    """Where the gateway keeps its idempotency keys."""

    url: str

    async def open(self) -> None:  # noqa: B027
        """Connect and create tables. Idempotent."""

    async def close(self) -> None:  # noqa: B027
        """Release connections."""

    @abc.abstractmethod
    async def claim(
        self, scope: str, key: str, fingerprint: str, correlation_id: str, now: float, *, lease: float, ttl: float
    ) -> Claim:
        """Atomically claim ``key`` in ``scope`` for a request whose payload hashes to ``fingerprint``."""

    @abc.abstractmethod
    async def complete(self, scope: str, key: str) -> None:
        """The request published: later uses of the key replay its answer."""

    @abc.abstractmethod
    async def release(self, scope: str, key: str) -> None:
        """The request failed before publishing for sure: a retry may claim the key (same correlation id)."""


def _decide(
    row: tuple[str, str, str, float] | None, fingerprint: str, correlation_id: str, now: float
) -> tuple[Claim, bool]:
    """(claim, whether to (re)write the row as pending) from the stored (fingerprint, cid, state, leased_until)."""
    if row is None:
        return Claim("new", correlation_id), True
    stored_fp, stored_cid, state, leased_until = row
    if stored_fp != fingerprint:
        return Claim("mismatch", stored_cid), False
    if state == "done":
        return Claim("replay", stored_cid), False
    if state == "pending" and leased_until > now:
        return Claim("in_flight", stored_cid), False
    return Claim("new", stored_cid), True  # released, or its holder died: take it over


class MemoryIdempotencyStore(IdempotencyStore):
    """Keys in process memory: retries are safe only as long as this process lives."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        # In the order keys were first claimed (a rewrite keeps a key's place and age), so
        # the oldest come first: the sweep reads those past the ttl and the first that is not.
        # Reading every key at each claim cost a busy gateway a day of keys per request.
        self._rows: dict[tuple[str, str], tuple[str, str, str, float, float]] = {}

    async def claim(
        self, scope: str, key: str, fingerprint: str, correlation_id: str, now: float, *, lease: float, ttl: float
    ) -> Claim:
        horizon = now - ttl
        rows = self._rows
        while rows:
            oldest = next(iter(rows))
            if not rows[oldest][4] < horizon:
                break
            del rows[oldest]
        row = rows.get((scope, key))
        if row is not None and row[4] < horizon:  # behind a younger key (the clock went back): expired all the same
            del rows[(scope, key)]
            row = None
        claim, write = _decide(row[:4] if row else None, fingerprint, correlation_id, now)
        if write:
            created = row[4] if row else now
            rows[(scope, key)] = (fingerprint, claim.correlation_id, "pending", now + lease, created)
        return claim

    async def complete(self, scope: str, key: str) -> None:
        row = self._rows.get((scope, key))
        if row is not None:
            self._rows[(scope, key)] = (row[0], row[1], "done", 0.0, row[4])

    async def release(self, scope: str, key: str) -> None:
        row = self._rows.get((scope, key))
        if row is not None and row[2] == "pending":
            self._rows[(scope, key)] = (row[0], row[1], "released", 0.0, row[4])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, correlation_id TEXT NOT NULL,
    state TEXT NOT NULL, leased_until REAL NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_age ON idempotency_keys (created_at);
"""


class SQLiteIdempotencyStore(IdempotencyStore):
    """Keys in a SQLite file (WAL): durable across gateway restarts, shared by gateways on one host."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = sqlite_store_path(url, "idempotency store URL")
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_expiry = 0.0

    async def open(self) -> None:
        if self._db is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="choreograph-idempotency")

        def connect() -> sqlite3.Connection:
            return connect_wal(self.path, schema=_SCHEMA)

        try:
            self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        except sqlite3.Error as exc:
            raise StoreError(f"idempotency store {self.url}: {exc}") from exc

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if self._db is not None and executor is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(executor, db.close)
        if executor is not None:
            executor.shutdown(wait=False)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        await self.open()
        assert self._executor is not None

        def call() -> T:
            if self._db is None:
                raise StoreError(f"idempotency store {self.url} is closed")
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"idempotency store {self.url}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def claim(
        self, scope: str, key: str, fingerprint: str, correlation_id: str, now: float, *, lease: float, ttl: float
    ) -> Claim:
        expire = now - self._last_expiry > 60.0
        if expire:
            self._last_expiry = now

        def write(db: sqlite3.Connection) -> Claim:
            db.execute("BEGIN IMMEDIATE")
            try:
                if expire:
                    db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (now - ttl,))
                row = db.execute(
                    "SELECT fingerprint, correlation_id, state, leased_until, created_at FROM idempotency_keys "
                    "WHERE scope=? AND key=?", (scope, key),
                ).fetchone()
                if row is not None and row[4] < now - ttl:
                    row = None  # expired but not yet swept
                claim, rewrite = _decide(tuple(row[:4]) if row else None, fingerprint, correlation_id, now)
                if rewrite:
                    db.execute(
                        "INSERT OR REPLACE INTO idempotency_keys VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                        (scope, key, fingerprint, claim.correlation_id, now + lease, row[4] if row else now),
                    )
                db.execute("COMMIT")
                return claim
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(write)

    async def complete(self, scope: str, key: str) -> None:
        await self._run(lambda db: db.execute(
            "UPDATE idempotency_keys SET state='done', leased_until=0 WHERE scope=? AND key=?", (scope, key)
        ))

    async def release(self, scope: str, key: str) -> None:
        await self._run(lambda db: db.execute(
            "UPDATE idempotency_keys SET state='released', leased_until=0 WHERE scope=? AND key=? AND state='pending'",
            (scope, key),
        ))


def open_idempotency_store(url: str) -> IdempotencyStore:
    """``memory://`` or ``sqlite:///path.db``."""
    scheme = scheme_of(url, "idempotency URL")
    if scheme == "memory":
        return MemoryIdempotencyStore(url)
    if scheme == "sqlite":
        return SQLiteIdempotencyStore(url)
    raise ConfigurationError(f"idempotency URL {redact(url)!r}: expected memory:// or sqlite:///path.db")
