"""Stores: the runtime's own durable state (inbox of processed ids, failure history).

Selected by URL like transports: ``memory://``, ``sqlite:///path.db``, ``postgresql://...``.
"""

from __future__ import annotations

from choreograph._schemes import instantiate
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
    store: InboxStore = instantiate(url, _SCHEMES, "store URL")
    return store
