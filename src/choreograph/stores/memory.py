"""An in-process inbox store (tests, ``memory://`` runs)."""

from __future__ import annotations

from collections.abc import Collection

from choreograph._clock import stamp_time
from choreograph.stores.base import ErrorInfo, InboxStore


class MemoryStore(InboxStore):
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._seen: dict[tuple[str, str], float] = {}
        self._failures: dict[tuple[str, str], tuple[ErrorInfo, float]] = {}

    async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
        return {i for i in event_ids if (group, i) in self._seen}

    async def mark(self, group: str, event_ids: Collection[str]) -> None:
        now = stamp_time()  # on the worker's clock, as Worker.expire reads it
        seen, failures = self._seen, self._failures
        for event_id in event_ids:
            seen.setdefault((group, event_id), now)  # the first mark counts, as in the durable stores
            if failures:
                failures.pop((group, event_id), None)

    async def record_failure(self, group: str, event_id: str, error: ErrorInfo, at: float) -> tuple[ErrorInfo, float]:
        return self._failures.setdefault((group, event_id), (error, at))

    async def clear_failures(self, group: str, event_ids: Collection[str]) -> None:
        for event_id in event_ids:
            self._failures.pop((group, event_id), None)

    async def expire(self, older_than: float) -> int:
        old = [key for key, at in self._seen.items() if at < older_than]
        for key in old:
            del self._seen[key]
        return len(old)
