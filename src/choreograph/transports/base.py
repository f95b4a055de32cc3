"""The transport contract: the one seam between choreograph and a message broker.

A transport moves opaque :class:`Message` bodies (encoded CloudEvents) between
*groups*. Its guarantees, asserted for every implementation by ``tests/conformance``:

* ``publish(messages)`` returns only once the broker durably holds every message.
* ``subscribe(group, types)`` durably registers ``group`` for ``types`` (``None``: every
  type) and returns a :class:`Subscription`. Every group receives every matching
  message published after it was first registered (fan-out across groups); the
  consumers of one group compete (each delivery goes to one of them).
* Subscribing a registered group again *widens* its binding to the union of the old
  types and the new (``None`` absorbs the rest); it never narrows it. A group is bound
  to every type any of its consumers ever asked for, and ``groups()`` reports that
  union. Why: during a rolling deploy old and new replicas of a service share the group
  and subscribe in no particular order; had the last subscribe won, an old replica
  restarting late would unbind the types only the new version handles, and their
  events would stop reaching the group - for good, not only during the deploy. A type
  nobody handles any more stays bound: its events still reach the group, whose
  consumers settle them (the runtime hands an event of a type its version does not
  subscribe to back for another replica, then dead-letters it ``unhandled``).
* ``unbind(group, types)`` is the one way to narrow a binding: an operator removes the
  types no version of the service handles any more (``choreograph groups unbind``).
  Only routing changes: events published afterwards of those types no longer reach the
  group; those it already holds stay and are settled as any other (the runtime hands
  them back, then dead-letters them as unhandled; NATS, whose consumer delivers nothing
  outside its filter, keeps the removed types in it until the group holds none of them:
  see ``NatsTransport.unbind``). A consumer that subscribes for a removed type later binds
  it again (widening), so unbind once no replica asks for it.
* A :class:`Delivery` carries the message, its ``attempt`` (1 on first delivery; the
  count lives in the broker, not in a process) and three verbs: ``ack()``,
  ``retry(after)`` (deliver again, attempt + 1, no sooner than ``after`` seconds) and
  ``dead_letter(record)``; and ``defer(after)``, a retry that is not a failed attempt (the
  attempt stays as it was: see :meth:`Delivery.defer`). The first verb that returns settles the delivery; later
  calls, and calls made while one is at work, are no-ops. A verb that raises (the
  broker did not take it) leaves the delivery unsettled: calling a verb again does
  the work - the runtime retries a failed settle step - at worst delivering the message
  once more, never losing it. A failure no second call could mend (the broker already
  took the message back, as RabbitMQ does when the channel that delivered it closes)
  is not raised: the verb returns, and the message comes back as the broker redelivers it.
* Once its subscription (or its transport) is closed, a delivery's verbs and ``touch()``
  raise :class:`TransportClosed` and leave it unsettled, on every transport: ``close()``
  has handed it back to the group (or its lease will), and nothing settles it any more.
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

from choreograph.errors import ConfigurationError, TransportClosed

#: Default ack deadline in seconds; override per URL with ``?lease=SECONDS``.
DEFAULT_LEASE = 30.0

#: The most messages one ``fetch`` may ask for on every transport: RabbitMQ's prefetch count is
#: 16 bits. A worker fetches up to its concurrency, so the CLI's ``--concurrency`` (and a push
#: config's ``concurrency``) stops here; more was taken, then every fetch failed, retried for ever.
MAX_FETCH = 65535

#: The longest ``retry``/``defer`` delay passed to a transport (100 years: "never", within
#: every broker's integers). Longer ones (``inf``) are cut to it: NATS sent a NAK delay
#: past 2^63 ns, which the server read as none (redelivered at once), and Redis, NATS and
#: RabbitMQ failed on ``inf`` with an ``OverflowError``.
LONGEST_DELAY = 100 * 365.25 * 86_400.0


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
    """One message handed to one consumer of ``group``, awaiting settlement.

    ``settled`` is set while a verb is at work, so that a second verb called meanwhile is
    a no-op, and stays set once the verb returned. If the verb raises it is cleared
    again: the broker call failed and the delivery is not settled, so the next call (the
    runtime's retry of its settle step) does the work. Left set, that call did nothing and
    a failed retry or dead letter came back only when the lease ran out.

    Transports implement ``_ack``, ``_retry`` and ``_dead_letter``, and must make a second
    call after one that raised safe: done once, or at worst the message delivered once
    more (the runtime's inbox drops a processed copy), never lost. A failure no second
    call can mend - the broker has already taken the message back and redelivers it on
    its own - must not raise, or the runtime would retry it for ever: the verb returns
    and the delivery counts as settled.

    A verb (or ``touch``) on a delivery whose subscription or transport was closed raises
    :class:`TransportClosed` (:func:`closed_delivery`) and leaves it unsettled, on every
    transport. Why not a silent return: Redis and RabbitMQ hand what a closing subscription
    held back to the group at once, so such an ack, retry or dead letter did nothing while
    its caller took it as done (a dead letter's record lost, a retry's delay ignored);
    SQLite, NATS and the in-memory bus still settled it, if no consumer had it yet. One
    answer everywhere, and the one callers already handle: the runtime and the journal
    leave the deliveries to come back, as for any call on a closed transport.

    >>> await delivery.retry(5.0)  # doctest: +SKIP
    >>> delivery.settled           # doctest: +SKIP
    True
    """

    __slots__ = ("message", "attempt", "group", "settled")

    def __init__(self, message: Message, attempt: int, group: str) -> None:
        self.message = message
        self.attempt = attempt
        self.group = group
        self.settled = False

    # The three verbs are written out (no shared wrapper): they run once per message.

    async def ack(self) -> None:
        """Done: never deliver this message to this group again."""
        if self.settled:
            return
        # A second verb called while this one is at work returns at once: it does not wait for
        # this call or report its outcome (the runtime never settles a delivery concurrently).
        self.settled = True
        try:
            await self._ack()
        except BaseException:
            self.settled = False  # not settled: calling a verb again does the work
            raise

    async def retry(self, after: float = 0.0) -> None:
        """Deliver again to the group (attempt + 1), no sooner than ``after`` seconds."""
        if self.settled:
            return
        self.settled = True
        try:
            await self._retry(min(max(0.0, after), LONGEST_DELAY))  # nan: 0
        except BaseException:
            self.settled = False
            raise

    async def defer(self, after: float = 0.0) -> None:
        """Deliver again to the group no sooner than ``after`` seconds, the attempt unchanged.

        For a delivery that was not tried, only put off: a join's deadline timer not due
        yet, a copy of an event whose other copy is being handled. A retry counted an
        attempt per deferral, and the handler's real failures then got fewer retries than
        its policy allows (a timer re-deferred for hours was dead-lettered on its first).
        Settles as ``retry`` does. A broker that counts deliveries itself keeps the attempt
        by counting the deferrals beside it (NATS: JetStream's delivery count, less the
        deferrals recorded in the ``_DEFER`` stream, ``_nats_deferrals``); only where that
        record cannot be written or read back does a deferral count as an attempt.
        """
        if self.settled:
            return
        self.settled = True
        try:
            await self._defer(min(max(0.0, after), LONGEST_DELAY))
        except BaseException:
            self.settled = False
            raise

    async def dead_letter(self, record: Mapping[str, Any]) -> None:
        """Stop delivering; keep the message and ``record`` in the group's dead letters."""
        if self.settled:
            return
        self.settled = True
        try:
            await self._dead_letter(record)
        except BaseException:
            self.settled = False
            raise

    async def touch(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Extend the lease (a long-running handler is still working on it).

        A no-op once settled, and while a verb is at work. A failed touch is harmless
        (the lease runs out as it would have); callers log it and carry on. Once the
        subscription is closed it raises :class:`TransportClosed`, as the verbs do.
        """

    @abc.abstractmethod
    async def _ack(self) -> None: ...

    @abc.abstractmethod
    async def _retry(self, after: float) -> None: ...

    @abc.abstractmethod
    async def _dead_letter(self, record: Mapping[str, Any]) -> None: ...

    async def _defer(self, after: float) -> None:
        """``defer``'s work: a retry where the broker keeps the count (override to keep the attempt)."""
        await self._retry(after)

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

        ``max_messages`` below 1 raises ``ValueError`` (:func:`bad_batch`) before anything
        is read, on every transport: a batch of none cannot deliver anything, so the fetch
        could only return ``[]`` at once (an ``async for`` over it spins) or wait out its
        timeout for a message it may not take - the in-memory transport did both.
        """

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack several deliveries; transports override this to batch the round trips.

        As ``ack()``: a delivery is settled once its ack went through; if this raises, those
        not acked stay unsettled and a second call acks them.
        """
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
        """Register ``group`` for ``types`` (``None``: all types) and consume from it.

        A group registered before is bound to the union of its old types and ``types``
        afterwards (never fewer: see the module docstring). Every delivery of the group
        may come to this subscription, also of types another consumer asked for.
        """

    async def unbind(self, group: str, types: Collection[str]) -> frozenset[str] | None:
        """Remove ``types`` from the binding of registered ``group``; returns the binding after.

        Removing a type the group is not bound to changes nothing. Raises
        :class:`ConfigurationError` for a group never registered, and for a wildcard group
        (bound to every type: there is no list to remove a type from). Events the group
        already holds stay; only what is published afterwards is routed differently.

        >>> await bus.unbind("billing", ["order.cancelled"])  # doctest: +SKIP
        frozenset({'order.placed'})
        """
        raise ConfigurationError(f"{type(self).__name__} cannot unbind types from a group")

    async def ping(self) -> None:
        """Return once the broker answered a round trip; raise :class:`TransportError` (or
        :class:`TransportClosed`) if it cannot now. What a readiness probe asks (the
        gateway's ``/readyz``); cheap, but not free: not for every message."""
        await self.groups()

    async def groups(self) -> Mapping[str, frozenset[str] | None] | None:
        """Every group registered on this bus and the types it is bound to (``None``: every
        type) - the union of what its subscribes asked for; ``None`` if this broker cannot
        tell. Not on any hot path: ``choreograph publish`` uses it to warn that nobody would
        receive an event."""
        return None

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


def closed_delivery(delivery: Delivery, what: str) -> TransportClosed:
    """The error of a verb or ``touch`` on ``delivery`` once its subscription (or transport)
    was closed: ``what`` is the transport, as its other errors name it."""
    return TransportClosed(
        f"{what}: the subscription of group {delivery.group!r} is closed: message {delivery.message.id!r} "
        "was not settled (it goes back to the group)"
    )


def bad_batch(max_messages: int) -> ValueError:
    """The error of ``Subscription.fetch`` for a batch size below 1 (see there why)."""
    return ValueError(f"max_messages: must be at least 1 (a batch of none delivers nothing), got {max_messages!r}")


def matches(types: frozenset[str] | None, message_type: str) -> bool:
    """Whether a group bound to ``types`` (``None`` = wildcard) receives ``message_type``."""
    return types is None or message_type in types


def widened(bound: frozenset[str] | None, types: frozenset[str] | None) -> frozenset[str] | None:
    """The binding of a group bound to ``bound`` once it subscribes for ``types``: the union
    (``None``, every type, absorbs the rest). See :class:`Transport` for why never narrower."""
    if bound is None or types is None:
        return None
    return bound | types


def narrowed(group: str, bound: frozenset[str] | None, types: Collection[str]) -> frozenset[str]:
    """The binding of ``group``, bound to ``bound``, once ``types`` are unbound from it;
    :class:`ConfigurationError` if it is a wildcard group (every type: none can be removed)."""
    if bound is None:
        raise ConfigurationError(
            f"group {group!r} is bound to every type (a wildcard group): it cannot be unbound from some"
        )
    return bound - frozenset(types)


def no_such_group(group: str) -> ConfigurationError:
    """The error of ``unbind`` for a group this bus never registered."""
    return ConfigurationError(f"no group {group!r} on this bus (choreograph groups list shows them)")
