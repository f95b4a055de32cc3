"""PostgreSQL plumbing shared by every choreograph store: URLs, pools, migrations, errors.

Every store on PostgreSQL (inbox, service state and outbox, journal, ...) goes through
here so they agree on three things:

* **URLs.** ``postgresql://user:pass@host:port/db?schema=NAME&pool_min=1&pool_max=10``.
  ``schema`` (default ``public``) is where choreograph's tables live; it is created on
  first use and becomes the connection's ``search_path`` (then ``public``), so your own
  unqualified tables in a service database land there too. Other query parameters
  (``sslmode``, ...) go to asyncpg unchanged.
* **Migrations.** Each component (``"inbox"``, ``"outbox"``, ``"journal"``...) owns an
  ordered list of SQL steps; :func:`migrate` applies the missing ones once, under an
  advisory lock (several processes may start at once), and records them in
  ``choreograph_migrations(component, version)``. Steps are append-only: never edit a
  released step, add the next one.
* **Errors.** :func:`translate` turns asyncpg and socket errors into
  :class:`~choreograph.errors.StoreError` at the boundary.

>>> config = parse_url("postgresql://postgres@127.0.0.1/test?schema=shop")   # doctest: +SKIP
>>> pool = await create_pool(config)                                          # doctest: +SKIP
>>> await migrate(pool, config, "journal", ["CREATE TABLE choreograph_journal (...)"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from choreograph._redact import redact
from choreograph._schemes import query_params
from choreograph.errors import ConfigurationError, StoreError, TransactionConflict

try:
    import asyncpg
except ImportError:  # pragma: no cover - reported by open_store / open_database as a ConfigurationError
    asyncpg = None

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_OWN_PARAMS = ("schema", "pool_min", "pool_max")


@dataclasses.dataclass(frozen=True, slots=True)
class PgConfig:
    """A parsed ``postgresql://`` URL: what asyncpg gets, and choreograph's own options."""

    url: str  # as given (for messages)
    dsn: str  # without choreograph's own query parameters
    schema: str
    pool_min: int
    pool_max: int
    options: dict[str, str]  # every query parameter, ours included (stores may read their own)


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (schema and table names built from configuration)."""
    return '"' + name.replace('"', '""') + '"'


def parse_url(url: str) -> PgConfig:
    """Split choreograph's parameters (``schema``, ``pool_min``, ``pool_max``) from the DSN."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"PostgreSQL URL {redact(url)!r}: expected postgresql://")
    for host in parts.netloc.rpartition("@")[2].split(","):  # asyncpg takes host1:5432,host2:5433
        try:
            _ = urlsplit(f"//{host}").port  # reading it is the check: asyncpg's int() raised a bare ValueError
        except ValueError:  # the URL is not quoted: a '/', '?' or '#' in the password is read as the port
            raise ConfigurationError(
                "PostgreSQL URL: the port is not a number from 0 to 65535 "
                "(in a password, write '/' as %2F, '?' as %3F and '#' as %23)"
            ) from None
    params = query_params(url, "PostgreSQL URL")  # a repeated one: asyncpg and we may read different values
    schema = params.get("schema", "public")
    if not _IDENT.match(schema):
        raise ConfigurationError(f"PostgreSQL URL {redact(url)!r}: schema must be a plain identifier (letters, digits, _)")
    try:
        pool_min = int(params.get("pool_min", "1"))
        pool_max = int(params.get("pool_max", "10"))
    except ValueError:
        raise ConfigurationError(f"PostgreSQL URL {redact(url)!r}: pool_min and pool_max must be integers") from None
    if not 0 <= pool_min <= pool_max or pool_max < 1:
        raise ConfigurationError(f"PostgreSQL URL {redact(url)!r}: need 0 <= pool_min <= pool_max and pool_max >= 1")
    rest = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _OWN_PARAMS]
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
    return PgConfig(url=url, dsn=dsn, schema=schema, pool_min=pool_min, pool_max=pool_max, options=params)


def _require_asyncpg() -> Any:
    if asyncpg is None:
        raise ConfigurationError("PostgreSQL stores need asyncpg: pip install 'choreograph[postgres]'")
    return asyncpg


#: SQLSTATEs of a transaction aborted for a concurrent one (serialization failure, deadlock):
#: raised as :class:`~choreograph.errors.TransactionConflict`, which may succeed if run again.
CONFLICTS = frozenset({"40001", "40P01"})


@contextlib.contextmanager
def translate(what: str) -> Iterator[None]:
    """Re-raise driver and network errors as :class:`StoreError` naming ``what`` failed
    (:class:`TransactionConflict` for the SQLSTATEs in :data:`CONFLICTS`)."""
    try:
        yield
    except StoreError:
        raise
    except (TimeoutError, OSError) as exc:
        raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if asyncpg is not None and isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
            if getattr(exc, "sqlstate", None) in CONFLICTS:
                raise TransactionConflict(f"{what}: {type(exc).__name__} (SQLSTATE {exc.sqlstate}): {exc}") from exc
            raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise


def server_settings(config: PgConfig) -> dict[str, str]:
    """Session settings every choreograph connection gets (the schema first on the search path)."""
    return {"search_path": f"{quote_ident(config.schema)}, public", "application_name": "choreograph"}


async def connect(config: PgConfig, settings: dict[str, str] | None = None) -> Any:
    """One dedicated connection (LISTEN, long-lived locks), with the pool's session settings."""
    pg = _require_asyncpg()
    with translate(f"connecting to {redact(config.url)}"):
        return await pg.connect(config.dsn, server_settings={**server_settings(config), **(settings or {})})


async def create_pool(config: PgConfig, settings: dict[str, str] | None = None) -> Any:
    """An asyncpg pool whose connections use ``config.schema`` first (plus session ``settings``)."""
    pg = _require_asyncpg()
    with translate(f"connecting to {redact(config.url)}"):
        return await pg.create_pool(
            config.dsn, min_size=config.pool_min, max_size=config.pool_max,
            server_settings={**server_settings(config), **(settings or {})}, reset=_keep_session,
        )


async def _keep_session(conn: Any) -> None:
    """Pool release without asyncpg's default reset query (``RESET ALL``, ``UNLISTEN *``...).

    asyncpg still rolls back an open transaction and drops listeners first; choreograph
    never leaves session state on pooled connections (LISTEN uses a dedicated one), so
    the extra round trip per transaction buys nothing. Use ``SET LOCAL``, not ``SET``,
    in your own transactions.
    """


_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS choreograph_migrations (
    component text NOT NULL,
    version integer NOT NULL,
    applied_at double precision NOT NULL,
    PRIMARY KEY (component, version)
)
"""


async def migrate(pool: Any, config: PgConfig, component: str, steps: Sequence[str]) -> int:
    """Apply the steps of ``component`` not yet recorded in ``config.schema``; returns how many ran.

    Step ``i`` (0-based) is version ``i + 1``. All pending steps run in one transaction
    under a transaction-scoped advisory lock keyed by the schema, so concurrent
    starters wait for each other and nobody sees a half-built schema.
    """
    with translate(f"migrating {component} in {redact(config.url)}"):
        async with pool.acquire() as conn:
            return await migrate_connection(conn, config, component, steps)


async def migrate_connection(conn: Any, config: PgConfig, component: str, steps: Sequence[str]) -> int:
    """:func:`migrate` on one connection (not in a transaction) rather than a pool."""
    with translate(f"migrating {component} in {redact(config.url)}"):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"choreograph-migrate:{config.schema}")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(config.schema)}")
            await conn.execute(f"SET LOCAL search_path TO {quote_ident(config.schema)}, public")
            await conn.execute(_MIGRATIONS)
            done = await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM choreograph_migrations WHERE component = $1", component
            )
            for version, step in enumerate(steps, start=1):
                if version <= done:
                    continue
                await conn.execute(step)
                await conn.execute(
                    "INSERT INTO choreograph_migrations (component, version, applied_at) VALUES ($1, $2, $3)",
                    component, version, time.time(),
                )
            return max(0, len(steps) - int(done))


def rowcount(status: str) -> int:
    """Rows affected from an asyncpg command status (``"INSERT 0 3"`` -> 3, ``"CREATE TABLE"`` -> 0)."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PooledStore:
    """The pool lifecycle shared by the PostgreSQL stores: open (pool + migrations), close, access.

    Subclasses set ``WHAT`` (for messages), ``COMPONENT`` and ``MIGRATIONS``, and list this
    class before their store interface so its ``open``/``close`` are the ones used.
    """

    WHAT: str = "store"
    COMPONENT: str = ""
    MIGRATIONS: Any = ()

    def __init__(self, url: str) -> None:
        self.url = url
        self.config = parse_url(url)
        self._pool: Any = None

    #: How many times :meth:`close` was called: an open during which it changed closes its pool.
    _closes = 0

    async def open(self) -> None:
        if self._pool is not None:
            return
        closes = self._closes
        pool = await create_pool(self.config)
        try:
            await migrate(pool, self.config, self.COMPONENT, self.MIGRATIONS)
            self._refuse_if_closed_since(closes)
        except BaseException:
            await pool.close()
            raise
        if self._pool is not None:  # another open finished meanwhile: its pool is the one kept
            await pool.close()
            return
        self._pool = pool

    def _refuse_if_closed_since(self, closes: int) -> None:
        """Raise :class:`StoreError` if :meth:`close` ran since it counted ``closes``: it found no
        pool to close, and nobody else would close the one the open was making."""
        if self._closes != closes:
            raise StoreError(f"{self.WHAT} {redact(self.url)} was closed while it was opening")

    async def close(self) -> None:
        self._closes += 1
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with translate(f"closing {self.WHAT} {redact(self.url)}"):
                await pool.close()

    def _open_pool(self) -> Any:
        if self._pool is None:
            raise StoreError(f"{self.WHAT} {redact(self.url)} is not open")
        return self._pool
