"""Clocks. The runtime and the in-memory transport read time only through a :class:`Clock`,
so tests can swap in :class:`choreograph.testing.VirtualClock` and fast-forward backoffs."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for delays and leases)."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (for records shown to people)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
