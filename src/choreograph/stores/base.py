"""The inbox store interface: which events a group has processed, and how its attempts failed.

The inbox makes handling idempotent: an event id recorded for a group is acked
without running the handler again. The failure history (first error and time) lives
here rather than in process memory so a dead-letter record is complete even when
attempts ran in different processes.
"""

from __future__ import annotations

import abc
import dataclasses
import traceback
from collections.abc import Collection
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception as a dead-letter record keeps it: type, message, short traceback."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException, *, limit: int = 6) -> ErrorInfo:
        """Never raises, and gives text that encodes as UTF-8: this builds the record that
        settles a failed delivery, so an exception whose ``__str__`` raises, returns a
        non-string or holds lone surrogates must not leave the delivery unsettled."""
        name = _clean(type(exc).__qualname__)
        message = _text(str, exc) or _text(repr, exc) or f"<{name}: unprintable>"
        tb = _text(lambda e: "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=limit)), exc)
        return cls(type=name, message=message, traceback=tb[-4000:])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ErrorInfo:
        return cls(type=str(data.get("type", "")), message=str(data.get("message", "")),
                   traceback=str(data.get("traceback", "")))


def _text(render: Any, exc: BaseException) -> str:
    try:
        text = render(exc)
    except Exception:  # noqa: BLE001 - a broken __str__/__repr__ is the exception's problem, not ours
        return ""
    return _clean(text) if isinstance(text, str) else ""


def _clean(text: str) -> str:
    """``text`` without lone surrogates (they cannot be encoded as UTF-8 JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")
    return text


class InboxStore(abc.ABC):
    """Processed ids and failure history per consumer group."""

    url: str

    async def open(self) -> None:  # noqa: B027 - nothing to open for in-memory stores
        """Connect and create tables if needed. Idempotent."""

    async def close(self) -> None:  # noqa: B027
        """Release connections."""

    @abc.abstractmethod
    async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
        """The subset of ``event_ids`` already processed by ``group``."""

    @abc.abstractmethod
    async def mark(self, group: str, event_ids: Collection[str]) -> None:
        """Record ``event_ids`` as processed by ``group`` (and forget their failure history)."""

    @abc.abstractmethod
    async def record_failure(self, group: str, event_id: str, error: ErrorInfo, at: float) -> tuple[ErrorInfo, float]:
        """Note a failed attempt; return the *first* failure's error and time for this event."""

    @abc.abstractmethod
    async def clear_failures(self, group: str, event_ids: Collection[str]) -> None:
        """Forget the failure history of ``event_ids`` (after a dead letter: a replay starts afresh)."""

    @abc.abstractmethod
    async def expire(self, older_than: float) -> int:
        """Drop inbox entries recorded before ``older_than`` (epoch seconds); returns how many."""
