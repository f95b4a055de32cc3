"""The in-memory transport in the conformance suite: transports opened on one name share a bus."""

from __future__ import annotations

NAME = "memory"


def require() -> None:
    """Nothing to reach: the bus lives in this process."""


def url(unique: str, *, lease: float) -> str:
    return f"memory://{unique}?lease={lease!r}"


async def cleanup(url: str) -> None:
    """Nothing to delete: a named bus goes away with its last transport object."""
