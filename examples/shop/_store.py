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
from pathlib import Path

from examples._schema import Schema

DATA_ENV = "CHOREOGRAPH_DATA_DIR"
DATABASE_ENV = "SHOP_DATABASE_{}"


def data_dir() -> Path:
    """Where the services keep their state: ``$CHOREOGRAPH_DATA_DIR`` or ``./var/shop``."""
    return Path(os.environ.get(DATA_ENV) or "./var/shop")


def database_url(service: str) -> str:
    """The database of ``service``: ``$SHOP_DATABASE_<SERVICE>``, else ``sqlite:///<data dir>/<service>.db``."""
    return os.environ.get(DATABASE_ENV.format(service.upper())) or f"sqlite:///{data_dir() / f'{service}.db'}"


__all__ = ["DATA_ENV", "Schema", "data_dir", "database_url"]
