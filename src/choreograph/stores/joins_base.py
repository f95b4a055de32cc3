"""The join store interface: which events of a join have arrived, per correlation id.

A join (``@service.on_all(A, B)``, and every compensation, which is a join of "my
step happened" with "something went wrong") waits for several events of one
transaction that arrive in any order, possibly in different processes. Its state
must outlive the process that saw the first arrival, so it lives in a store, not in
memory; the store decides atomically which arrival *completes* the join, which is
what makes a join fire exactly once however the arrivals race or are redelivered.

One join instance is keyed by ``(group, join, correlation)``. The interface is five
async methods on plain data so a PostgreSQL implementation is a small file.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from urllib.parse import urlsplit

from choreograph._redact import redact
from choreograph._schemes import instantiate
from choreograph.errors import ConfigurationError

log = logging.getLogger("choreograph.stores")


@dataclasses.dataclass(frozen=True, slots=True)
class JoinKey:
    """One join instance: a join of a service's group, for one transaction."""

    group: str
    join: str
    correlation: str


@dataclasses.dataclass(frozen=True, slots=True)
class Arrival:
    """One stored arrival: the event id and its encoded envelope (CloudEvents JSON)."""

    event_id: str
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class JoinState:
    """What a join instance knows after an operation.

    ``created_by`` is the id of the arrival that created the instance (it starts the
    deadline timer); ``fired_by`` the id of the arrival that completed it (it runs the
    handler, and runs it again if it is redelivered); ``timed_out`` is set once the
    deadline passed before completion, after which the instance never fires.
    """

    slots: int
    arrivals: dict[int, Arrival]
    created_by: str
    created_at: float
    deadline: float | None
    fired_by: str | None
    timed_out: bool

    @property
    def complete(self) -> bool:
        return len(self.arrivals) == self.slots


class JoinStore(abc.ABC):
    """Durable join instances (memory, SQLite, PostgreSQL)."""

    url: str

    async def open(self) -> None:  # noqa: B027 - nothing to open for in-memory stores
        """Connect and create tables if needed. Idempotent."""

    async def close(self) -> None:  # noqa: B027
        """Release connections."""

    @abc.abstractmethod
    async def arrive(
        self, key: JoinKey, slot: int, arrival: Arrival, *, slots: int, now: float, deadline: float | None
    ) -> JoinState:
        """Record ``arrival`` in ``slot`` (0-based, of ``slots``) atomically, and return the state.

        Creates the instance if needed (``now`` and ``deadline``, epoch seconds, are
        kept only on creation). A slot keeps its first arrival; later ones are not
        stored. If this call fills the last empty slot of an instance that has neither
        fired nor timed out, ``fired_by`` becomes ``arrival.event_id``. Calling again
        with the same arrival returns the same answer (idempotent).
        """

    @abc.abstractmethod
    async def get(self, key: JoinKey) -> JoinState | None:
        """The state of one instance, or ``None``."""

    @abc.abstractmethod
    async def time_out(self, key: JoinKey) -> JoinState | None:
        """Mark the instance timed out unless it has fired; return its state (``None``: no instance)."""

    @abc.abstractmethod
    async def expire(self, older_than: float) -> int:
        """Drop instances created before ``older_than`` (epoch seconds) whose deadline, if any, also
        passed before it (a pending timer must find its instance); returns how many."""


_SCHEMES = {
    "memory": ("choreograph.stores.joins_memory", "MemoryJoinStore"),
    "sqlite": ("choreograph.stores.joins_sqlite", "SQLiteJoinStore"),
    "postgresql": ("choreograph.stores.joins_postgres", "PostgresJoinStore"),
    "postgres": ("choreograph.stores.joins_postgres", "PostgresJoinStore"),
}


def open_join_store(url: str) -> JoinStore:
    """A join store for ``url`` (not yet opened). It may share a file or database with the inbox."""
    store: JoinStore = instantiate(url, _SCHEMES, "join store URL")
    return store


def join_store_beside(inbox_url: str) -> JoinStore:
    """A worker's default join store: in its inbox's database (same SQLite file or PostgreSQL schema), else in memory.

    Join arrivals are as much the service's state as its inbox, so they live and die
    with it: a worker given ``sqlite:///var/shipping.db`` (or ``postgresql://...?schema=shipping``)
    for its inbox keeps its joins there too and finds them again after a restart.
    """
    scheme = urlsplit(inbox_url).scheme if "://" in inbox_url else ""
    if scheme in _SCHEMES and scheme != "memory":
        try:
            return open_join_store(inbox_url)
        except ConfigurationError:  # a URL the join store rejects
            log.warning("no join store for %s; joins and compensations are kept in memory", redact(inbox_url))
    from choreograph.stores.joins_memory import MemoryJoinStore

    return MemoryJoinStore()
