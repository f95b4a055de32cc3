"""The SQLite transport in the conformance suite: each bus is its own file in a temp directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from urllib.parse import urlsplit

NAME = "sqlite"

_ROOT = os.path.join(tempfile.gettempdir(), "choreograph-conformance")


def require() -> None:
    """Nothing to reach: the broker is the file."""


def url(unique: str, *, lease: float) -> str:
    # sqlite:/// + an absolute path = four slashes (SQLAlchemy's convention)
    return f"sqlite:///{os.path.join(_ROOT, unique + '.db')}?lease={lease!r}"


async def cleanup(url: str) -> None:
    """Delete the database file and its WAL companions."""
    path = urlsplit(url).path[1:]
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)
