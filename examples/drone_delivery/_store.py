"""Where the Drone Delivery services keep their state, and the tables they create on first use.

Each service declares its own database (``Service("package", database=database_url("package"))``)
and changes it only through ``ctx.transaction()``: the rows it writes, the inbox
record of the event it handles and the events it emits commit together when the
handler returns (see ``docs/stores.md``).

The URL is fixed when the service module is imported, from ``$CHOREOGRAPH_DATA_DIR``
(``choreograph dev`` sets it for every process it starts; default
``./var/drone_delivery``), and the worker opens the database when it starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from examples._schema import Schema

DATA_ENV = "CHOREOGRAPH_DATA_DIR"


def data_dir() -> Path:
    """Where the services keep their state: ``$CHOREOGRAPH_DATA_DIR`` or ``./var/drone_delivery``."""
    return Path(os.environ.get(DATA_ENV) or "./var/drone_delivery")


def database_url(service: str) -> str:
    """``sqlite:///<data dir>/<service>.db``: the database of ``service``."""
    return f"sqlite:///{data_dir() / f'{service}.db'}"


__all__ = ["DATA_ENV", "Schema", "data_dir", "database_url"]
