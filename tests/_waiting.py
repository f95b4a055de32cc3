"""Waiting in tests for a condition that other tasks make true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], within: float = 10.0, step: float = 0.01) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds (a ceiling for a
    stuck test, not a speed assertion)."""
    for _ in range(max(1, int(within / step))):
        if condition():
            return
        await asyncio.sleep(step)
    raise AssertionError("condition never held")
