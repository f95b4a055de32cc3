"""A group's binding on its JetStream consumer, as the NATS transport keeps it: :class:`GroupBindings`.

A group is bound to its event types by its durable consumer's filter (its config before
2.10, see ``_nats_consumers``); the types it no longer wants but still holds events of
keep their lines there (see ``_nats_routing``). Every change is a read of the consumer,
a new binding computed from it and a write of the whole config, stamped with a lineage:

* ``subscribe`` registers: creates the consumer, or widens its types, and sets its
  ``ack_wait`` to the transport's lease (``_register``);
* ``unbind`` narrows: the removed types keep the stream's last sequence as their line;
* a subscription's periodic check (``_checker``) drops the lines nothing is held under
  any more, and binds again what a racing write dropped;
* ``groups()`` reads every group's binding back from the events stream's consumers.

The lease (``ack_wait``) is the one of the URL the group was last subscribed with: a
subscribe whose lease differs from the consumer's rewrites it; every other write (an
unbind, a narrowing, a check binding types again) keeps the consumer's. So during a rolling
change of ``?lease=`` the replicas started last set it, and the old ones still running (or
``choreograph groups unbind`` with a URL without ``?lease=``) do not set it back - unless
one of them subscribes again. A replica on another lease than the consumer's touches what it
holds every third of its own lease: one still on a lease more than three times the new one
touches too rarely, and a handler of its running past the new lease is redelivered to
another replica (the inbox makes the re-run harmless downstream, but it runs). Lengthening
the lease is safe while old replicas run; shortening it much is, once they are gone.

The connection, publishing and the subscriptions themselves are ``nats.py``'s and
``_nats_pull``'s; this is only what is written on, and read from, a group's consumer.
"""

from __future__ import annotations

import abc
import enum
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from choreograph.errors import TransportError
from choreograph.transports import _nats_codec as codec
from choreograph.transports import _nats_consumers as consumers
from choreograph.transports._nats_client import JetStream
from choreograph.transports._nats_routing import Binding, settled
from choreograph.transports.base import narrowed, no_such_group, widened

if TYPE_CHECKING:
    from choreograph.transports._nats_pull import NatsSubscription

__all__ = ["GroupBindings"]

log = logging.getLogger("choreograph.transports.nats")  # the transport's: one logger for the user to tune

_REGISTER_ROUNDS = 5  # read-widen-write rounds before subscribe gives up on a consumer that keeps changing


class _Missing(enum.Enum):
    CONSUMER = "no consumer"


_NO_CONSUMER = _Missing.CONSUMER
_UNKNOWN_TYPES = Binding(frozenset())  # made by an older choreograph: only the new types are known


class GroupBindings:
    """What :class:`~choreograph.transports.nats.NatsTransport` writes on, and reads from,
    a group's consumer: registering, unbinding, narrowing, and listing the groups.

    A mixin of the transport (its connection, prefix and lease are the transport's):
    ``unbind`` and ``groups`` are the transport's contract methods, the rest the
    transport's ``subscribe`` and its subscriptions call.
    """

    prefix: str
    lease: float
    events_stream: str
    _multi_filter: bool  # nats-server >= 2.10: the consumer's filter says the types
    _subscriptions: set[NatsSubscription]  # this process's: told at once of an unbind

    @abc.abstractmethod
    def _jetstream(self) -> JetStream:
        """The connection's JetStream, or a :class:`TransportError` if there is none."""

    async def _register(
        self, js: JetStream, group: str, consumer: str, wanted: frozenset[str] | None, *, set_lease: bool = True
    ) -> tuple[Binding, str | None, bool]:
        """Create the group's consumer, or widen the types it is bound to, and (``set_lease``)
        make its ``ack_wait`` the transport's lease; returns its binding, the stamp of the write
        the read that found it so was of (``None``: not recorded), and whether it wrote the
        consumer. Without ``set_lease`` an existing consumer keeps its ``ack_wait``.

        Read, widen, write, then read again: JetStream has no compare-and-set for a consumer's
        config, so a write of the same group racing this one (another process's subscribe,
        unbind or narrowing) may land over ours; the second read sees that and writes the union
        again. A racing write landing after that second read is the subscription's to repair:
        it does not descend from the stamp returned (see ``_checker`` and ``_nats_routing``).

        The lease is set once: a second read finding another ``ack_wait`` is a racing subscribe
        with another lease (a rolling change of it), whose write then stands - last writer wins.
        """
        wrote = False
        lease = consumers.ack_wait(self.lease)
        for _ in range(_REGISTER_ROUNDS):
            info = await self._read_info(js, consumer)
            current = None if info is _NO_CONSUMER else self._binding_of(info)
            lineage = () if info is _NO_CONSUMER else self._lineage_of(info)
            kept = None if info is _NO_CONSUMER else self._ack_wait_of(info)
            ack_wait = lease if set_lease or kept is None else kept
            bound = Binding(wanted) if current is None else current.widened(wanted)
            if bound == current and ack_wait == kept:
                return bound, lineage[0] if lineage else None, wrote
            what = f"register group {group!r}"
            await self._write_consumer(js, what, group, consumer, bound, lineage, ack_wait=ack_wait)
            wrote, set_lease = True, False
        raise TransportError(f"nats: register group {group!r}: its consumer kept changing under us")

    async def _write_consumer(
        self,
        js: JetStream,
        what: str,
        group: str,
        consumer: str,
        bound: Binding,
        base: Sequence[str],
        *,
        ack_wait: int | None = None,
    ) -> str:
        """Create or update the group's consumer to keep ``bound``, computed from a read of a
        config with lineage ``base``, with ``ack_wait`` (nanoseconds; ``None``: the transport's
        lease); returns the stamp of this write (see
        :func:`~choreograph.transports._nats_consumers.lineage`)."""
        stamp = secrets.token_hex(4)
        config = self._consumer_config(group, consumer, bound, (stamp, *base))
        if ack_wait is not None:
            config["ack_wait"] = ack_wait
        request = {"stream_name": self.events_stream, "config": config}
        await js.api(what, f"CONSUMER.CREATE.{self.events_stream}.{consumer}", request)
        return stamp

    async def unbind(self, group: str, types: Collection[str]) -> frozenset[str] | None:
        """Narrow the group's binding: the types its subscriptions deliver from now on.

        Read, narrow, write, read again; what the second read says is returned (a subscribe
        racing this one may have widened the group again meanwhile).

        What the group holds of the removed types stays: JetStream delivers nothing outside
        a consumer's filter, so the filter keeps them, and the consumer records the stream's
        last sequence, read before writing, as their line (see ``_nats_routing``): events
        above it are skipped, and the filter narrows once nothing under it is unsettled.
        That is known at once for a type with no event left in the stream, and for every line
        when the consumer, read after the line was taken, has acked past it or holds nothing:
        those narrow now (a group with no running subscription would never narrow them).
        This process's subscriptions of the group know at once, others at their next check.
        """
        js = self._jetstream()
        consumer = codec.name_token(group)
        current = await self._read_binding(js, consumer)
        if current is _NO_CONSUMER:
            raise no_such_group(group)
        if narrowed(group, current.types, types) == current.types:  # a wildcard group: raises
            return current.types
        line, empty = await self._line(js, current.unbound(group, types, 0).removed)
        # Read again after the line: what the consumer holds at or below it - and the config
        # this write is computed from, the latest there is.
        info = await self._read_info(js, consumer)
        if info is _NO_CONSUMER:
            raise no_such_group(group)
        current = self._binding_of(info)
        bound = settled(current.unbound(group, types, line).without(empty), info)
        if bound != current:
            what = f"unbind types from group {group!r}"
            await self._write_consumer(
                js, what, group, consumer, bound, self._lineage_of(info), ack_wait=self._ack_wait_of(info)
            )
        after = await self._read_binding(js, consumer)
        if after is _NO_CONSUMER:
            raise no_such_group(group)
        for subscription in self._subscriptions:
            if subscription.group == group:
                subscription.rebind(after)
        return after.types

    async def _line(self, js: JetStream, types: Collection[str]) -> tuple[int, frozenset[str]]:
        """The events stream's last sequence - the line of types unbound now - and those of
        ``types`` (at least one) with no event in the stream at all: no group holds any."""
        line: int | None = None
        empty: set[str] = set()
        for event_type in sorted(types):
            subject = f"{self.prefix}.ev.{codec.type_tokens(event_type)}.*"
            stream = await js.api(
                f"read stream {self.events_stream}", f"STREAM.INFO.{self.events_stream}", {"subjects_filter": subject}
            )
            state = stream.get("state") or {}
            if line is None:  # the first answer: its count and the line are one snapshot
                line = int(state.get("last_seq") or 0)
            if not state.get("subjects") and not stream.get("total"):
                empty.add(event_type)
        assert line is not None, "no types"
        return line, frozenset(empty)

    async def groups(self) -> dict[str, frozenset[str] | None] | None:
        """The groups read back from the events stream's consumers (see ``_nats_consumers``).

        ``None`` (cannot tell) if one of them is a group that cannot be named: its name was
        cut and hashed and, before nats-server 2.10, nothing else on the server records it.
        Leaving it out instead would make ``choreograph dlq`` refuse that group as unknown.
        A group registered by a choreograph that kept its types only in its subscriptions
        (before 2.10) is reported bound to every type: its consumer takes every event.
        """
        js = self._jetstream()
        found: dict[str, frozenset[str] | None] = {}
        offset = 0
        while True:  # the server answers a page at a time (256 consumers)
            page = await js.api("list groups", f"CONSUMER.LIST.{self.events_stream}", {"offset": offset})
            infos: list[dict[str, Any]] = page.get("consumers") or []
            for info in infos:
                config = info.get("config", {})
                if not consumers.is_group(config):
                    continue  # not choreograph's
                name = str(info.get("name", ""))
                group = consumers.group_name(name, config)
                if group is None:
                    log.warning("nats: consumer %r of %s is a group whose name was cut and hashed, and this "
                                "server records it nowhere else: cannot list the groups", name, self.events_stream)
                    return None
                types = consumers.bound_types(config, self.prefix, multi_filter=self._multi_filter)
                found[group] = None if types is consumers.UNRECORDED else types
            offset += len(infos)
            if not infos or offset >= int(page.get("total", 0)):
                return found

    def _checker(
        self, js: JetStream, group: str, consumer: str, wanted: frozenset[str] | None, mark: str | None
    ) -> Callable[[], Awaitable[Binding]]:
        """The check a subscription for ``wanted`` makes of its group's consumer every
        ``REMOVAL_CHECK`` seconds (see ``_nats_routing``); ``mark`` is the stamp of the write
        its subscribe found its types bound in (``_register``)."""

        async def check() -> Binding:
            """The group's binding now, once the lines under which nothing is unsettled any
            more are dropped - and their types from the filter. If it dropped ``wanted`` types
            and does not descend from ``mark`` (a racing write computed from an older read: an
            unbind since would descend from it), they are bound again first. Every type if the
            consumer does not record its types (an older choreograph rewrote it): the
            subscriptions then skip nothing, as ``groups()`` says. A :class:`TransportError` if
            the consumer is gone."""
            nonlocal mark
            info = await self._read_info(js, consumer)
            if info is _NO_CONSUMER:
                raise TransportError(f"nats: the consumer of group {group!r} no longer exists")
            current = consumers.binding(info.get("config", {}), self.prefix, multi_filter=self._multi_filter)
            if current is consumers.UNRECORDED:
                return Binding(None)
            lineage = self._lineage_of(info)
            if mark is not None and mark not in lineage and widened(current.types, wanted) != current.types:
                log.warning("nats: a racing write of the consumer of group %r dropped types a subscription "
                            "asked for (their events published meanwhile may not have reached it); "
                            "binding them again", group)
                bound, mark, _ = await self._register(js, group, consumer, wanted, set_lease=False)
                return bound
            mark = lineage[0] if lineage else None
            after = settled(current, info)
            if after != current:
                what = f"narrow group {group!r}"
                kept = self._ack_wait_of(info)
                mark = await self._write_consumer(js, what, group, consumer, after, lineage, ack_wait=kept)
            return after

        return check

    async def _read_binding(self, js: JetStream, consumer: str) -> Binding | _Missing:
        """The consumer's binding, or ``_NO_CONSUMER``; ``_UNKNOWN_TYPES`` for one made by a
        choreograph that did not record its types where this server lets us read them."""
        info = await self._read_info(js, consumer)
        return info if info is _NO_CONSUMER else self._binding_of(info)

    async def _read_info(self, js: JetStream, consumer: str) -> dict[str, Any] | _Missing:
        try:
            info: dict[str, Any] = await js.api(
                f"read group {consumer!r}", f"CONSUMER.INFO.{self.events_stream}.{consumer}"
            )
        except codec.JetStreamError as exc:
            if exc.err_code != codec.ERR_CONSUMER_NOT_FOUND:
                raise
            return _NO_CONSUMER
        return info

    def _binding_of(self, info: Mapping[str, Any]) -> Binding:
        read = consumers.binding(info.get("config", {}), self.prefix, multi_filter=self._multi_filter)
        return _UNKNOWN_TYPES if read is consumers.UNRECORDED else read

    def _lineage_of(self, info: Mapping[str, Any]) -> tuple[str, ...]:
        return consumers.lineage(info.get("config", {}), multi_filter=self._multi_filter)

    @staticmethod
    def _ack_wait_of(info: Mapping[str, Any]) -> int | None:
        """The consumer's ``ack_wait`` (nanoseconds), ``None`` if the server did not say."""
        ack_wait = info.get("config", {}).get("ack_wait")
        return ack_wait if isinstance(ack_wait, int) and ack_wait > 0 else None

    def _consumer_config(
        self, group: str, consumer: str, binding: Binding, lineage: Sequence[str] = ()
    ) -> dict[str, Any]:
        return consumers.config(
            prefix=self.prefix, lease=self.lease, multi_filter=self._multi_filter,
            group=group, consumer=consumer, binding=binding, lineage=lineage,
        )

