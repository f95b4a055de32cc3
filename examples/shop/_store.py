"""Where the shop's services keep their state, and the tables they create on first use.

Each service declares its own database (``Service("payment", database=database_url("payment"))``)
and changes it only through ``ctx.transaction()``: the rows it writes, the inbox record
of the event it handles and the events it emits commit together when the handler
returns (``docs/stores.md``). Joins and compensations record their arrivals in the same
database and the same transaction (``docs/sagas.md``).

The URL is fixed when the service module is imported: ``$SHOP_DATABASE_<SERVICE>``
(e.g. ``SHOP_DATABASE_PAYMENT=postgresql://.../test?schema=payment``) if set, else
``sqlite:///<data dir>/<service>.db`` with the data dir ``$CHOREOGRAPH_DATA_DIR``
(``choreograph dev`` sets it for every process it starts; default ``./var/shop``).
The SQL is portable: it runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from choreograph.runtime.outbox import Transaction

DATA_ENV = "CHOREOGRAPH_DATA_DIR"
DATABASE_ENV = "SHOP_DATABASE_{}"


def data_dir() -> Path:
    """Where the services keep their state: ``$CHOREOGRAPH_DATA_DIR`` or ``./var/shop``."""
    return Path(os.environ.get(DATA_ENV) or "./var/shop")


def database_url(service: str) -> str:
    """The database of ``service``: ``$SHOP_DATABASE_<SERVICE>``, else ``sqlite:///<data dir>/<service>.db``."""
    return os.environ.get(DATABASE_ENV.format(service.upper())) or f"sqlite:///{data_dir() / f'{service}.db'}"


class Schema:
    """A service's tables (``CREATE ... IF NOT EXISTS``) and an optional seed, applied in its transaction.

    ``await schema.ensure(tx)`` at the start of each transaction: once the tables exist
    the statements are no-ops. It runs in the handler's own transaction rather than
    once per process because a first transaction that rolls back takes its DDL with it.
    ``seed(tx)`` runs while ``probe`` (a table) is empty.
    """

    def __init__(
        self,
        *statements: str,
        seed: Callable[[Transaction], Awaitable[None]] | None = None,
        probe: str | None = None,
    ) -> None:
        if seed is not None and probe is None:
            raise ValueError("a seed needs the table that shows whether it ran (probe=)")
        self.statements = statements
        self.seed = seed
        self.probe = probe

    async def ensure(self, tx: Transaction) -> None:
        for statement in self.statements:
            await tx.execute(statement)
        if self.seed is not None and await tx.fetchval(f"SELECT 1 FROM {self.probe} LIMIT 1") is None:
            await self.seed(tx)
