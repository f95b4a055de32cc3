"""A service's own database: its state, its inbox and its outbox, committed together.

``Service("package", database="sqlite:///var/pkg.db")`` (or ``postgresql://...``) gives
the service a database in which one transaction holds three things: the service's
own rows, the inbox record of the event being handled, and every event it emits
(the outbox). Commit writes all three or none; a relay in the worker then publishes
outbox rows in commit order (:mod:`choreograph.runtime.outbox`).

SQL placeholders are PostgreSQL's ``$1, $2, ...`` on **both** backends (SQLite reads
``$1`` as a named parameter, so nothing is rewritten)::

    await tx.execute("INSERT INTO packages (id, weight) VALUES ($1, $2)", pid, weight)
    row = await tx.fetchone("SELECT weight FROM packages WHERE id = $1", pid)
    row["weight"], row[0]                      # rows index by name and by position

Rows are ``sqlite3.Row`` or ``asyncpg.Record``: both support ``row["col"]``,
``row[0]`` and ``dict(row)``. Driver errors surface as
:class:`~choreograph.errors.StoreError` (the driver's exception is its ``__cause__``).

This module is the storage half: :class:`Transaction` (what user code sees),
:class:`TxConnection` (what a backend implements) and :class:`StateStore` (inbox,
outbox, relay claims, wake-ups). One store object is shared per URL within an event
loop (:func:`open_database`) so a worker's relay wakes the moment application code
in the same process commits.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import importlib
import re
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from choreograph._redact import redact
from choreograph._schemes import scheme_of
from choreograph.errors import ConfigurationError
from choreograph.stores.base import InboxStore
from choreograph.transports.base import Message

if TYPE_CHECKING:
    from choreograph._envelope import Envelope
    from choreograph.events import Event

Row = Any
"""A result row: ``sqlite3.Row`` or ``asyncpg.Record`` (``row["col"]``, ``row[0]``, ``dict(row)``)."""

PublishSink = Callable[["Event", "str | None"], "Envelope | None"]
RelayPublish = Callable[[list[Message]], Awaitable[None]]


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxLag:
    """How far a service's relay is behind: unsent rows and the age of the oldest (seconds)."""

    pending: int
    oldest_age: float


class TxConnection(abc.ABC):
    """A backend's open transaction: SQL on one connection, then commit with inbox and outbox.

    The store serialises or pools connections; a ``TxConnection`` is used by one task
    and ends with exactly one ``commit`` or ``rollback`` (``rollback`` after either is a no-op).
    """

    async def connect(self) -> None:  # noqa: B027 - a backend whose begin() takes it all needs nothing
        """Take the connection now rather than at the first statement (PostgreSQL: from the
        pool; SQLite: the file's write lock, which another process may hold).

        A handler's unit calls it while it times its wait for the database, which does not
        count against the handler's timeout.
        """

    @abc.abstractmethod
    async def execute(self, sql: str, args: Sequence[Any]) -> int: ...

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None: ...

    @abc.abstractmethod
    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Row]: ...

    @abc.abstractmethod
    async def fetchone(self, sql: str, args: Sequence[Any]) -> Row | None: ...

    @abc.abstractmethod
    async def commit(
        self,
        *,
        inbox: tuple[str, str] | None,
        service: str,
        messages: Sequence[Message],
        forget_failures: bool = True,
    ) -> bool:
        """Write the inbox record (group, event id) and the outbox rows, then commit.

        Returns ``False`` (and rolls back) when the inbox already holds the record:
        another consumer committed this event first, so this run's effects must vanish.
        ``forget_failures=False`` skips deleting the event's failure history (only for a
        caller that knows no copy of the event ever failed: a first attempt does not know it).
        """

    @abc.abstractmethod
    async def rollback(self) -> None: ...


#: Statements that would end or split choreograph's transaction under the user's feet (after
#: any leading whitespace and comments, which both databases skip: they hid the statement).
_CONTROL = re.compile(
    r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
    r"(BEGIN|COMMIT|ROLLBACK|END|ABORT|SAVEPOINT|RELEASE|START\s+TRANSACTION|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE | re.DOTALL,
)


def _statement(sql: str) -> str:
    """``sql``, unless it is transaction control: the transaction is choreograph's (state,
    inbox and outbox commit together; on SQLite several handlers' units share one commit)."""
    if _CONTROL.match(sql):
        raise ConfigurationError(
            f"tx.execute({sql.strip()[:40]!r}): transaction control is choreograph's - the block commits "
            "with the inbox record and the outbox when the handler returns, and rolls back if it raises"
        )
    return sql


class Transaction:
    """What ``async with ctx.transaction() as tx`` (or ``transaction(service)``) gives you.

    >>> async with ctx.transaction() as tx:                               # doctest: +SKIP
    ...     await tx.execute("UPDATE stock SET n = n - $1 WHERE sku = $2", qty, sku)
    ...     tx.publish(StockReserved(sku=sku, qty=qty))

    ``publish`` puts the event in the outbox of this transaction: it is sent only if
    the transaction commits, and then by the relay, in commit order.
    """

    __slots__ = ("_conn", "_publish", "backend")

    def __init__(self, conn: TxConnection, backend: str, publish: PublishSink) -> None:
        self._conn = conn
        self._publish = publish
        self.backend = backend  # "sqlite" or "postgresql": for the rare dialect difference

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; returns the number of rows it changed."""
        return await self._conn.execute(_statement(sql), args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter tuple."""
        await self._conn.executemany(_statement(sql), list(rows))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Every row of a query."""
        return await self._conn.fetch(_statement(sql), args)

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        """The first row of a query, or ``None``."""
        return await self._conn.fetchone(_statement(sql), args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or ``None``."""
        row = await self._conn.fetchone(_statement(sql), args)
        return None if row is None else row[0]

    def publish(self, event: Event, *, subject: str | None = None) -> Envelope | None:
        """Emit ``event`` if (and when) this transaction commits.

        Inside a handler this is ``ctx.publish``, except that the event is dropped if the
        transaction rolls back: the id is derived from the input and the type must be
        declared in ``emits``; returns ``None``. Outside a handler it
        returns the envelope (its id is fixed now and stored with the row).
        """
        return self._publish(event, subject)


class StateStore(InboxStore):
    """A service database: an :class:`InboxStore` plus transactions, outbox and relay claims.

    ``open()``/``close()`` are reference-counted: the worker and application code in one
    process share the store (see :func:`open_database`); the last ``close()`` disconnects.
    """

    backend: ClassVar[str]

    def __init__(self, url: str) -> None:
        self.url = url
        self._refs = 0
        self._open_lock = asyncio.Lock()
        # Wake-ups: a count per service, and the count each waiting relay last saw (so every relay
        # of a service on this store sees every commit, not just the first one to wake).
        self._wakes: dict[str, int] = {}
        self._wakers: dict[str, asyncio.Event] = {}  # service -> set (and replaced) at its next wake-up
        self._seen_wakes: dict[tuple[str, str | None], int] = {}
        self._relays_here: dict[str, int] = {}  # service -> relays of this process running on this store

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        async with self._open_lock:
            if self._refs == 0:
                await self._connect()
                _remember(self)
            self._refs += 1

    async def close(self) -> None:
        async with self._open_lock:
            if self._refs == 0:
                return
            self._refs -= 1
            if self._refs == 0:
                await self._disconnect()
                _forget(self)

    async def __aenter__(self) -> StateStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Connect and apply migrations."""

    @abc.abstractmethod
    async def _disconnect(self) -> None: ...

    # -- transactions -----------------------------------------------------------------

    @abc.abstractmethod
    async def begin(self) -> TxConnection:
        """Start a transaction (on SQLite: wait for this process's turn at the writer)."""

    # -- outbox -----------------------------------------------------------------------

    @abc.abstractmethod
    async def relay_pass(self, service: str, owner: str, limit: int, publish: RelayPublish) -> int | None:
        """Publish up to ``limit`` unsent outbox rows of ``service`` in commit order, then mark them sent.

        Only one relay per service publishes at a time (``owner`` names this one);
        returns ``None`` when another relay holds the claim, else how many rows were
        sent. If ``publish`` raises, nothing is marked and the rows go out again later
        with the same ids.
        """

    async def release_relay(self, service: str, owner: str) -> None:  # noqa: B027 - PostgreSQL needs nothing
        """Give up ``owner``'s claim on ``service`` at once (graceful stop: a standby takes over).

        Every relay calls it when it stops, also one that did not hold the claim.
        """

    @abc.abstractmethod
    async def outbox_lag(self, service: str) -> OutboxLag: ...

    @abc.abstractmethod
    async def purge_sent(self, older_than: float) -> int:
        """Delete outbox rows sent before ``older_than`` (epoch seconds); returns how many."""

    async def wait_outbox(self, service: str, within: float, owner: str | None = None) -> None:
        """Until a commit in this process wrote outbox rows for ``service`` (or ``within`` seconds).

        A commit since ``owner``'s last wait ends it at once. Each relay (``owner``) keeps its
        own count of what it saw: two relays of one service in this process used to share one
        wake-up, which the first to wake cleared, and the other (maybe the claim holder, busy in
        a pass at the time) then slept a whole poll interval with rows waiting.
        """
        key = (service, owner)
        if self._wakes.get(service, 0) == self._seen_wakes.get(key, 0):
            waker = self._wakers.get(service)
            if waker is None:
                waker = self._wakers[service] = asyncio.Event()
            try:
                await asyncio.wait_for(waker.wait(), within)
            except TimeoutError:
                pass
        self._seen_wakes[key] = self._wakes.get(service, 0)

    def wake(self, service: str) -> None:
        """Tell the relays of ``service`` (if any run in this process) that rows were committed."""
        self._wakes[service] = self._wakes.get(service, 0) + 1
        waker = self._wakers.pop(service, None)
        if waker is not None:
            waker.set()

    def waited_services(self) -> set[str]:
        """The services whose relays wait, or waited, on this store."""
        return {service for service, _ in self._seen_wakes} | set(self._wakers)

    def forget_waiter(self, service: str, owner: str | None) -> None:
        """``owner``'s relay of ``service`` stopped: drop the count it saw."""
        self._seen_wakes.pop((service, owner), None)

    def relay_started(self, service: str) -> None:
        """A relay of ``service`` runs in this process on this store (commits may rely on :meth:`wake`)."""
        self._relays_here[service] = self._relays_here.get(service, 0) + 1

    def relay_stopped(self, service: str) -> None:
        count = self._relays_here.get(service, 0) - 1
        if count > 0:
            self._relays_here[service] = count
        else:
            self._relays_here.pop(service, None)

    def relay_here(self, service: str) -> bool:
        """Whether a relay of ``service`` runs in this process on this store."""
        return service in self._relays_here


_SCHEMES = {
    "sqlite": ("choreograph.stores._state_sqlite", "SQLiteStateStore"),
    "postgresql": ("choreograph.stores._state_postgres", "PostgresStateStore"),
    "postgres": ("choreograph.stores._state_postgres", "PostgresStateStore"),
}

_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, StateStore]] = (
    weakref.WeakKeyDictionary()
)


def check_database_url(url: str) -> str:
    """``url`` if it names a supported service database, else :class:`ConfigurationError`."""
    scheme = scheme_of(url, "database URL")
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"database URL {redact(url)!r}: expected sqlite:///path or postgresql://user@host/db"
        )
    return url


def open_database(url: str) -> StateStore:
    """The service database at ``url`` (not yet open: ``async with open_database(url) as db``).

    Within a running event loop the same object is returned for the same URL until its
    last user closes it, so the worker and your application code share connections,
    the SQLite writer turn and relay wake-ups. Outside a loop a private instance is made.
    """
    check_database_url(url)
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        existing = _SHARED.get(loop, {}).get(url)
        if existing is not None:
            return existing
    module_name, class_name = _SCHEMES[urlsplit(url).scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"database URL {redact(url)!r}: needs {exc.name}") from exc
    store: StateStore = getattr(module, class_name)(url)
    if loop is not None:
        _SHARED.setdefault(loop, {})[url] = store
    return store


def _remember(store: StateStore) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - open() always runs in a loop
        return
    _SHARED.setdefault(loop, {}).setdefault(store.url, store)


def _forget(store: StateStore) -> None:
    for stores in _SHARED.values():
        if stores.get(store.url) is store:
            del stores[store.url]
