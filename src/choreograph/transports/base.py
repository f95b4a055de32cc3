"""The transport contract: the one seam between choreograph and a message broker.

A transport moves opaque :class:`Message` bodies (encoded CloudEvents) between
*groups*. Its guarantees, asserted for every implementation by ``tests/conformance``:

* ``publish(messages)`` returns only once the broker durably holds every message.
* ``subscribe(group, types)`` durably registers ``group`` for ``types`` (``None``: every
  type) and returns a :class:`Subscription`. Every group receives every matching
  message published after it was first registered (fan-out across groups); the
  consumers of one group compete (each delivery goes to one of them).
* A :class:`Delivery` carries the message, its ``attempt`` (1 on first delivery; the
  count lives in the broker, not in a process) and three verbs: ``ack()``,
  ``retry(after)`` (deliver again, attempt + 1, no sooner than ``after`` seconds) and
  ``dead_letter(record)``. The first verb called settles the delivery; later calls
  are no-ops.
* A delivery not settled within the lease (``lease`` seconds; ``touch()`` extends it)
  is redelivered to a consumer of the group with attempt + 1: a killed process loses
  nothing.
* Dead letters are kept per group with their record and can be listed, shown,
  replayed to their group (attempt back to 1) and purged.

Transports never retry on their own beyond lease expiry: the runtime owns retries.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any, NamedTuple

#: Default ack deadline in seconds; override per URL with ``?lease=SECONDS``.
DEFAULT_LEASE = 30.0


class Message(NamedTuple):
    """One encoded event on the bus: its id (for dedupe), type (for routing) and body.

    A named tuple rather than a dataclass: one is made for every event sent or received.
    """

    id: str
    type: str
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a group gave up on, with the failure record the runtime attached."""

    group: str
    message: Message
    record: Mapping[str, Any]
    dead_at: float  # wall-clock seconds since the epoch


class Delivery(abc.ABC):
    """One message handed to one consumer of ``group``, awaiting settlement."""

    __slots__ = ("message", "attempt", "group", "settled")

    def __init__(self, message: Message, attempt: int, group: str) -> None:
        self.message = message
        self.attempt = attempt
        self.group = group
        self.settled = False

    async def ack(self) -> None:
        """Done: never deliver this message to this group again."""
        if not self.settled:
            self.settled = True
            await self._ack()

    async def retry(self, after: float = 0.0) -> None:
        """Deliver again to the group (attempt + 1), no sooner than ``after`` seconds."""
        if not self.settled:
            self.settled = True
            await self._retry(max(0.0, after))

    async def dead_letter(self, record: Mapping[str, Any]) -> None:
        """Stop delivering; keep the message and ``record`` in the group's dead letters."""
        if not self.settled:
            self.settled = True
            await self._dead_letter(record)

    async def touch(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Extend the lease (a long-running handler is still working on it)."""

    @abc.abstractmethod
    async def _ack(self) -> None: ...

    @abc.abstractmethod
    async def _retry(self, after: float) -> None: ...

    @abc.abstractmethod
    async def _dead_letter(self, record: Mapping[str, Any]) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.group}:{self.message.type}:{self.message.id} attempt={self.attempt}>"


class Subscription(abc.ABC):
    """A consumer's handle on a group. Iterate it, or ``fetch`` batches."""

    group: str

    @abc.abstractmethod
    async def fetch(self, max_messages: int, timeout: float | None = None) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, returned as soon as at least one is available.

        Returns ``[]`` once ``timeout`` seconds pass with nothing to deliver (``None``:
        wait indefinitely). Never waits to fill a batch. Cancel-safe: a cancelled fetch
        delivers nothing and loses nothing (what it had claimed returns to the group).
        """

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack several deliveries; transports override this to batch the round trips."""
        for delivery in deliveries:
            await delivery.ack()

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop consuming. Unsettled deliveries are redelivered (at once or at lease expiry)."""

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        while True:
            for delivery in await self.fetch(64):
                yield delivery


class Transport(abc.ABC):
    """A connection to a broker. Use as ``async with open_transport(url) as bus: ...``."""

    url: str
    lease: float = DEFAULT_LEASE

    async def connect(self) -> None:  # noqa: B027 - nothing to do for in-process transports
        """Open connections and create broker-side structures. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close connections; unsettled deliveries return to their groups."""

    @abc.abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None:
        """Durably publish ``messages`` (in order); returns once the broker holds them all."""

    @abc.abstractmethod
    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        """Register ``group`` for ``types`` (``None``: all types) and consume from it."""

    # -- dead letters -------------------------------------------------------------------

    @abc.abstractmethod
    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters of ``group`` (``None``: every group), oldest first."""

    async def dead_letter(self, group: str, message_id: str) -> DeadLetter | None:
        """One dead letter, or ``None``."""
        for letter in await self.dead_letters(group, limit=1_000_000):
            if letter.message.id == message_id:
                return letter
        return None

    @abc.abstractmethod
    async def replay(self, group: str, message_ids: Collection[str] | None = None) -> int:
        """Deliver dead letters (``None``: all of the group) to ``group`` again, attempt 1."""

    @abc.abstractmethod
    async def purge(self, group: str, message_ids: Collection[str] | None = None) -> int:
        """Delete dead letters (``None``: all of the group); returns how many."""

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def matches(types: frozenset[str] | None, message_type: str) -> bool:
    """Whether a group bound to ``types`` (``None`` = wildcard) receives ``message_type``."""
    return types is None or message_type in types
