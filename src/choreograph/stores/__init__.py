"""Stores: the runtime's own durable state (inbox of processed ids, failure history).

Selected by URL like transports: ``memory://``, ``sqlite:///path.db`` (PostgreSQL:
``postgresql://...`` once that store lands).
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from choreograph.errors import ConfigurationError
from choreograph.stores.base import ErrorInfo, InboxStore

__all__ = ["ErrorInfo", "InboxStore", "open_store"]

_SCHEMES = {
    "memory": ("choreograph.stores.memory", "MemoryStore"),
    "sqlite": ("choreograph.stores.sqlite", "SQLiteStore"),
    "postgresql": ("choreograph.stores.postgres", "PostgresStore"),
    "postgres": ("choreograph.stores.postgres", "PostgresStore"),
}


def open_store(url: str) -> InboxStore:
    """An inbox store for ``url`` (not yet opened: call ``await store.open()``)."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"store URL {url!r}: unknown scheme {scheme!r}; expected one of "
            + ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        )
    module_name, class_name = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"store URL {url!r}: {scheme}:// needs {exc.name}") from exc
    store: InboxStore = getattr(module, class_name)(url)
    return store
