"""Pulling from a JetStream consumer: :class:`NatsSubscription` and :class:`NatsDelivery`.

The pull protocol is spoken directly (``$JS.API.CONSUMER.MSG.NEXT``) rather than through
nats-py's ``fetch``, because the contract wants something ``fetch`` does not do: return
as soon as *one* message is available, yet hand over a whole batch when a backlog exists.
Each :meth:`NatsSubscription.fetch` therefore

1. asks for up to ``max_messages`` with ``no_wait`` - one round trip returns the backlog
   (or a ``404``/``408`` status when there is less than a batch);
2. if that returned nothing, parks one *single-message* pull request that expires with
   the caller's timeout (chunked to :data:`LONG_POLL`): a lone message published to an
   idle group is delivered the moment the server has it, and because that request asks
   for one message it is spent once satisfied - no request outlives the fetch to hoard
   messages a competing consumer could take.

Step 1 is skipped when the server has just told us there is nothing to take: the last
message it sent said no others were pending for the consumer (the ack subject carries
that count) and was a first delivery, or the last request ended empty. An idle group
then costs one request per message instead of an extra round trip (and its ``404``)
before each park - which sat on the path of every event at a light load.

Replies arrive on a per-subscription inbox; each request gets its own reply subject
(``<inbox>.<n>``) so the terminating status of an old request can never end a newer one.
Messages that arrive after a fetch gave up (a late reply) are buffered for the next
fetch, or NAKed for prompt redelivery on close. After a reconnect every outstanding
request is presumed lost and re-issued at once.

A redelivered message (JetStream's ``num_delivered`` > 1) has its deferrals looked up
before the fetch hands it out, so that its attempt does not count them (see
``_nats_deferrals``); a first delivery is handed out as it came.

Every :data:`~choreograph.transports._nats_routing.REMOVAL_CHECK` seconds a subscription
reads its group's binding again: for the types unbound from it, and to bind its own again
if a racing write dropped them (see ``_nats_routing``; a wildcard group's subscription only
for a while after its subscribe wrote the consumer). A read that fails is logged at debug;
:data:`WARN_AFTER` failures in a row (the consumer deleted, a permission taken away) once at
warning, and the first read that works again at info.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Literal

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsInbox

from choreograph.errors import TransportClosed, TransportError
from choreograph.transports import _nats_codec as codec
from choreograph.transports._nats_client import DirectClient, Raw, bulk_supported, send_commands
from choreograph.transports._nats_deferrals import Deferrals
from choreograph.transports._nats_routing import REMOVAL_CHECK, Binding
from choreograph.transports.base import Delivery, Message, Subscription, bad_batch, closed_delivery

log = logging.getLogger("choreograph.transports.nats")

#: What ``_delivery`` says of an event of a type the group may have been widened to since.
_UNBOUND: Final = "unbound"

#: Longest a single parked pull request lives before it is renewed (seconds).
LONG_POLL = 10.0
#: How long to wait for the server to answer a ``no_wait`` pull before asking again.
_NO_WAIT_GUARD = 2.0
#: Extra time allowed past a parked request's expiry for its ``408`` to arrive.
_GRACE = 1.0
#: Shortest wait worth parking a pull request for (seconds).
_MIN_PARK = 0.002

#: Failed reads of the group's binding in a row after which the subscription says so (warning).
WARN_AFTER = 3

#: 409 statuses that end a pull for good; every other 409 (leadership change, server
#: shutdown, too many waiting pulls, ...) is transient: pull again.
_FATAL_CONFLICTS = ("consumer deleted", "push based")

StoreDeadLetter = Callable[[str, Message, Mapping[str, Any]], Awaitable[None]]


class NatsDelivery(Delivery):
    """A JetStream message; its verbs are the JetStream acks on its reply subject.

    A verb whose write failed can simply be sent again: the reply subject stays valid
    across reconnects, and a dead letter is stored under its group and id (storing it
    twice keeps one). When the first write did reach the server after all, the second
    acts on the message's current delivery - JetStream settles by stream sequence - so a
    second NAK can hand out once more a copy already redelivered: a duplicate, never a
    loss. No failure here is permanent but a closed transport.

    ``attempt`` is JetStream's delivery count less the deferrals among those deliveries
    (``_deferrals``, looked up for a redelivery: see ``_nats_deferrals``).

    A dead letter after the lease ran out (``_until``: the lease as this client last knew it
    to start, when the message arrived or was touched) is dropped: JetStream may have
    handed the message to another consumer meanwhile, and its TERM would settle that copy -
    by stream sequence - after a dead letter was stored for an event the copy may well have
    processed. The server hands the message out again (or has), as it would any delivery
    whose lease ran out; the other transports ignore such a late verb the same way.
    """

    __slots__ = ("_subscription", "_reply", "_msg", "_deferrals", "_until")

    def __init__(
        self, message: Message, attempt: int, group: str, subscription: NatsSubscription, msg: Msg | Raw
    ):
        # Delivery.__init__ written out: one of these is made for every message received
        self.message = message
        self.attempt = attempt
        self.group = group
        self.settled = False
        self._subscription = subscription
        self._msg = msg
        self._reply = msg.reply
        self._deferrals = 0
        # from its arrival, not from now: it may have waited in the buffer (a reply that came
        # after its fetch gave up waits for the next fetch), its lease on the server running
        self._until = msg.arrived + subscription._lease  # type: ignore[union-attr]  # set by _reply

    async def _ack(self) -> None:
        self._subscription._check_settle(self)
        await self._subscription._reply_to(self._reply, b"+ACK", confirm=False)
        if self._deferrals:
            self._subscription._forget(self)

    async def _retry(self, after: float) -> None:
        self._subscription._check_settle(self)
        # No backoff is configured on the consumer, so the NAK delay is the only delay.
        payload = b"-NAK" if after <= 0 else b'-NAK {"delay": %d}' % int(after * 1_000_000_000)
        await self._subscription._reply_to(self._reply, payload)

    async def _defer(self, after: float) -> None:
        # The count first, then the NAK: the redelivery must find it. Without it the NAK is a
        # retry (attempt + 1) rather than a message held back.
        subscription = self._subscription
        subscription._check_settle(self)
        delivered, sequence, _ = _ack_of(self._msg)
        try:
            await subscription._deferrals.write(subscription._consumer, sequence, self._deferrals + 1, delivered)
        except TransportClosed:
            raise
        except TransportError as exc:
            log.warning("nats: could not record the deferral of %r in group %r (%s): it comes back as a "
                        "retry, attempt %d", self.message.id, self.group, exc, self.attempt + 1)
        await self._retry(after)

    async def _dead_letter(self, record: Mapping[str, Any]) -> None:
        self._subscription._check_settle(self)
        if time.monotonic() > self._until:
            log.warning("nats: not dead-lettering %r of group %r: its lease ran out before (%.1fs), so the "
                        "server hands it out again", self.message.id, self.group, self._subscription._lease)
            return
        # Store first, then TERM: a crash in between redelivers, and the runtime dead-letters
        # it again, replacing the stored copy (one dead letter per group and message id).
        await self._subscription._store_dead_letter(self.group, self.message, record)
        await self._subscription._reply_to(self._reply, b"+TERM")
        if self._deferrals:
            self._subscription._forget(self)

    async def touch(self) -> None:
        """Reset the lease (JetStream "work in progress")."""
        if not self.settled:
            self._subscription._check_settle(self)
            until = time.monotonic() + self._subscription._lease
            await self._subscription._reply_to(self._reply, b"+WPI")
            self._until = until


class NatsSubscription(Subscription):
    """One consumer's handle on a group's durable pull consumer.

    Concurrent ``fetch`` calls on one subscription are served one after the other; open
    several subscriptions for parallel pulls.
    """

    def __init__(
        self,
        nc: Client,
        *,
        group: str,
        stream: str,
        consumer: str,
        event_prefix: str,
        replay_prefix: str,
        binding: Binding,
        store_dead_letter: StoreDeadLetter,
        deferrals: Deferrals,
        on_close: Callable[[NatsSubscription], None],
        read_binding: Callable[[], Awaitable[Binding]] | None = None,
        watch_until: float | None = None,
        lease: float = math.inf,
    ) -> None:
        self.group = group
        self._lease = lease  # the consumer's ack wait as this transport set it (see NatsDelivery)
        self._nc = nc
        self._stream = stream
        self._consumer = consumer
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._next_subject_b = self._next_subject.encode()
        self._event_prefix = event_prefix  # "<prefix>.ev."
        self._replay_prefix = replay_prefix  # "<prefix>.rp.<group token>."
        self._types = binding.types
        # Types unbound from the group whose events it still holds up to a stream sequence
        # (their line); later ones are skipped. Mostly empty: then nothing is looked up.
        self._removed = binding.removed
        # Reads the group's binding as the server keeps it now (see ``_watch``). A message of a
        # type we do not know is bound waits in ``_parked`` until it is read again (see
        # ``_look_again``), and is skipped only if the group is not bound to it then either:
        # another replica may have widened the group since we read it; before 2.10 the consumer
        # takes every type; and from 2.10 a message the consumer sent before its filter narrowed
        # still comes back to it (handed back, or its lease run out) once its type's line is
        # dropped - an event published after the unbind, to be skipped (see ``_nats_routing``).
        self._read_binding = read_binding
        self._watch_until = watch_until  # loop time the checks stop at (None: while open)
        self._watcher: asyncio.Future[None] | None = None
        self._parked: list[Msg | Raw] = []
        self._looking = False
        self._store_dead_letter = store_dead_letter
        self._deferrals = deferrals
        self._redelivered: list[NatsDelivery] = []  # of the last _take: their deferrals to look up
        self._on_close = on_close
        self._inbox_prefix = nc.new_inbox() + "."
        self._inbox_prefix_b = self._inbox_prefix.encode()
        self._bulk = bulk_supported(nc)  # acks as one write of encoded commands
        self._inbox: NatsInbox | None = None
        self._buffer: collections.deque[Msg | Raw] = collections.deque()
        self._statuses: dict[str, tuple[int, str]] = {}
        self._requests = 0
        #: Whether the server may hold messages for us beyond what it sent (see the module doc).
        self._more = True
        self._epoch = 0  # bumped on reconnect: every outstanding pull request is presumed lost
        self._waiter: asyncio.Future[bool] | None = None
        self._fetching = asyncio.Lock()
        self._background: set[asyncio.Future[None]] = set()
        self._closed = False

    async def start(self) -> None:
        with codec.translated("subscribe"):
            self._inbox = await self._nc.subscribe(self._inbox_prefix + "*", cb=self._on_reply)
        if isinstance(self._nc, DirectClient):
            self._nc.route(self._inbox, self._reply)  # straight from the parser (see _nats_client)
        if self._read_binding is not None:
            self._watcher = asyncio.ensure_future(self._watch())

    def rebind(self, binding: Binding) -> None:
        """The group's binding as read from the server (by this subscription or an unbind)."""
        self._types, self._removed = binding.types, binding.removed

    async def _watch(self) -> None:
        """Read the group's binding every ``REMOVAL_CHECK`` seconds (until ``watch_until``): to
        learn of an unbind made by another process, to narrow the consumer once what it held
        is settled, and to bind its types again if a racing write dropped them (see
        ``_nats_routing``). A failing read keeps the binding last read; the failures are said
        once they persist (see the module doc)."""
        assert self._read_binding is not None
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closed and not self._nc.is_closed:
            if self._watch_until is not None and loop.time() >= self._watch_until:
                return
            await asyncio.sleep(REMOVAL_CHECK)
            if self._closed or not self._nc.is_connected:
                continue  # the connection says so itself (disconnected, reconnected)
            try:
                binding = await self._read_binding()
            except Exception as exc:  # noqa: BLE001 - it is read again at the next check
                failures += 1
                if failures == WARN_AFTER:
                    log.warning("nats: cannot read the consumer of group %r (%d checks in a row): %s; its "
                                "subscription keeps the binding it last read", self.group, failures, exc)
                else:
                    log.debug("nats: reading the binding of group %r: %s", self.group, exc)
                continue
            if failures >= WARN_AFTER:
                log.info("nats: the consumer of group %r can be read again", self.group)
            failures = 0
            self.rebind(binding)

    # -- receiving ----------------------------------------------------------------------

    async def _on_reply(self, msg: Msg) -> None:
        self._reply(msg)

    def _reply(self, msg: Msg | Raw) -> None:
        if msg.reply.startswith("$JS.ACK."):
            # its lease runs from here (see NatsDelivery); nats-py's Msg, a dataclass without
            # slots, takes the attribute as Raw's slot does
            msg.arrived = time.monotonic()  # type: ignore[union-attr]
            self._buffer.append(msg)
        else:
            status = (msg.headers or {}).get("Status", "")
            if status == "100":  # idle heartbeat / flow control: not an answer
                return
            description = str((msg.headers or {}).get("Description", ""))
            token = msg.subject[len(self._inbox_prefix) :]
            self._statuses[token] = (int(status) if status.isdigit() else 0, description)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    def reconnected(self) -> None:
        """The connection came back: outstanding pull requests died with the old one."""
        self._epoch += 1
        self._more = True
        self._wake()

    async def _wait(self, until: float | None) -> bool:
        """Sleep until something arrives or loop time ``until``; False on timeout.

        A bare timer on the waiter rather than ``asyncio.timeout_at``: this runs for every
        pull, and the context manager costs several times as much.
        """
        loop = asyncio.get_running_loop()
        if until is not None and until <= loop.time():
            return False
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = None if until is None else loop.call_at(until, _expire, waiter)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _round(self, request: bytes, enough: int, guard: float, deadline: float | None) -> None:
        """Send one pull request; return once ``enough`` messages are buffered, the server
        ends the request, the caller's ``deadline`` passes, the connection is replaced or
        the subscription closes. A request the server never answers by ``guard`` makes
        us ask whether the consumer still exists (JetStream ignores pulls for a deleted one).
        """
        self._requests += 1
        token = str(self._requests)
        self._statuses.clear()
        epoch = self._epoch
        with codec.translated("pull"):
            if self._bulk:
                command = b"PUB %s %s%s %d\r\n%s\r\n" % (self._next_subject_b, self._inbox_prefix_b, token.encode(),
                                                          len(request), request)
                await send_commands(self._nc, command, 1)
            else:
                await self._nc.publish(self._next_subject, request, reply=self._inbox_prefix + token)
        until = _earliest(deadline, guard)
        while len(self._buffer) < enough and token not in self._statuses:
            if epoch != self._epoch or self._closed:
                return
            if not await self._wait(until):
                if not self._buffer and until == guard and self._nc.is_connected:
                    await self._check_consumer_exists()
                return
        await self._check_status(self._statuses.pop(token, None))

    # -- the contract -------------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float | None = None) -> list[Delivery]:  # noqa: ASYNC109
        if max_messages < 1:
            raise bad_batch(max_messages)
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(0.0, timeout)
        async with self._fetching:
            while not self._closed:
                if batch := self._take(max_messages):
                    return await self._hand_out(batch) if self._redelivered else batch
                if self._nc.is_closed:
                    raise TransportClosed("nats: transport is closed")
                if not self._nc.is_connected:
                    # Requests sent now would only queue up; wait for the reconnect instead.
                    epoch = self._epoch
                    while epoch == self._epoch and not self._closed:
                        if not await self._wait(deadline):
                            return []
                    continue
                remaining = LONG_POLL if deadline is None else min(LONG_POLL, deadline - loop.time())
                if self._more or remaining < _MIN_PARK:
                    # 1. Whatever is ready now, up to a whole batch, in one round trip (waited
                    #    for even past the deadline, so that fetch(n, timeout=0) sees the backlog).
                    self._more = False  # until a message says otherwise
                    request = b'{"batch":%d,"no_wait":true}' % max_messages
                    await self._round(request, max_messages, loop.time() + _NO_WAIT_GUARD, None)
                    if batch := self._take(max_messages):
                        return await self._hand_out(batch) if self._redelivered else batch
                    remaining = LONG_POLL if deadline is None else min(LONG_POLL, deadline - loop.time())
                    if remaining < _MIN_PARK:
                        return []
                # 2. Nothing ready: park a request for one message until the deadline.
                request = b'{"batch":1,"expires":%d}' % int(remaining * 1_000_000_000)
                await self._round(request, 1, loop.time() + remaining + _GRACE, deadline)
                if batch := self._take(max_messages):
                    return await self._hand_out(batch) if self._redelivered else batch
                if deadline is not None and loop.time() >= deadline:
                    return []
        return []

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack all of ``deliveries``: plain ack publishes, written out by the client's flusher.

        Not waited for (no PING/PONG): a JetStream ack is unconfirmed anyway, the caller's
        outputs are already durable, and an ack lost with the process only redelivers the
        message after its lease (the inbox drops the copy). Waiting cost a round trip per
        settled batch on the worker's settle path. The acks go out as one write of encoded
        commands when the client allows it (see ``_nats_client``).
        """
        with codec.translated("ack"):
            commands: list[bytes] = []
            batch: list[NatsDelivery] = []
            for delivery in deliveries:
                if not delivery.settled:
                    if not isinstance(delivery, NatsDelivery):
                        await delivery.ack()
                        continue
                    delivery._subscription._check_settle(delivery)
                    if self._bulk:
                        commands.append(b"PUB %s 4\r\n+ACK\r\n" % delivery._reply.encode())
                        batch.append(delivery)
                    else:
                        await self._nc.publish(delivery._reply, b"+ACK")
                        delivery.settled = True
                        if delivery._deferrals:
                            self._forget(delivery)
            if commands:
                # Settled once written: if the write fails, a retry of this call acks them all.
                await send_commands(self._nc, b"".join(commands), len(commands))
                for delivery in batch:
                    delivery.settled = True
                    if delivery._deferrals:
                        self._forget(delivery)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._on_close(self)
        if self._watcher is not None:
            self._watcher.cancel()
        with codec.translated("close subscription"):
            if self._inbox is not None and isinstance(self._nc, DirectClient):
                self._nc.unroute(self._inbox)
            if self._inbox is not None and not self._nc.is_closed:
                await self._inbox.unsubscribe()
            # Messages that reached us after their fetch gave up: hand them back now
            # rather than at lease expiry.
            self._buffer.extend(self._parked)
            self._parked.clear()
            if self._buffer and self._nc.is_connected:
                while self._buffer:
                    await self._nc.publish(self._buffer.popleft().reply, b"-NAK")
                await self._nc.flush()
            self._buffer.clear()

    # -- helpers ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"nats: subscription of group {self.group!r} is closed")
        if self._nc.is_closed:
            raise TransportClosed("nats: transport is closed")

    def _check_settle(self, delivery: NatsDelivery) -> None:
        """A verb after the subscription closed: refused, as on every transport (see
        base.Delivery), though the connection, shared by the transport's subscriptions,
        could still send it and the server settle it. Sent, it settled the delivery here
        while Redis and RabbitMQ, whose close hands deliveries on, dropped such a verb."""
        if self._closed or self._nc.is_closed:
            raise closed_delivery(delivery, "nats")

    def _take(self, max_messages: int) -> list[Delivery]:
        """Deliveries from the buffer. No await in here: a cancelled fetch loses nothing."""
        out: list[Delivery] = []
        skipped: list[str] = []
        while self._buffer and len(out) < max_messages:
            msg = self._buffer.popleft()
            delivery = self._delivery(msg)
            if isinstance(delivery, NatsDelivery):
                out.append(delivery)
                if delivery.attempt > 1:  # a redelivery: some of those may have been deferrals
                    self._redelivered.append(delivery)
            elif delivery == _UNBOUND:
                self._parked.append(msg)
            else:
                # Not for this subscriber (a server without multi-subject consumer filters
                # delivers the whole stream, other groups' replays included): settle it.
                skipped.append(msg.reply)
        if skipped:
            self._in_background(self._ack_skipped(skipped))
        if self._parked and not self._looking:
            self._looking = True
            self._in_background(self._look_again())
        return out

    async def _hand_out(self, batch: list[Delivery]) -> list[Delivery]:
        """``batch`` as ``_take`` made it, the attempts of its redeliveries less their
        deferrals. Cancelled meanwhile, it goes back to the buffer: nothing is lost."""
        redelivered, self._redelivered = self._redelivered, []
        try:
            counts = await asyncio.gather(*(self._deferrals_of(delivery) for delivery in redelivered))
        except BaseException:
            self._buffer.extendleft(reversed([d._msg for d in batch if isinstance(d, NatsDelivery)]))
            raise
        failed = 0
        for delivery, deferrals in zip(redelivered, counts, strict=True):
            if deferrals is None:
                failed += 1
            elif deferrals:
                delivery._deferrals = deferrals
                delivery.attempt -= deferrals
        if failed:
            log.warning("nats: could not read the deferrals of %d redelivered message(s) of group %r: "
                        "their attempts count them", failed, self.group)
        return batch

    async def _deferrals_of(self, delivery: NatsDelivery) -> int | None:
        """The deferrals among the deliveries of ``delivery``'s message; None if unreadable."""
        delivered, sequence, _ = _ack_of(delivery._msg)
        try:
            return await self._deferrals.count(self._consumer, sequence, delivered)
        except (TransportError, ValueError, KeyError, TypeError) as exc:
            log.debug("nats: reading the deferrals of %r in group %r: %s", delivery.message.id, self.group, exc)
            return None

    def _forget(self, delivery: NatsDelivery) -> None:
        """Delete the deferral count of ``delivery``'s message, settled for good (in the background)."""
        self._in_background(self._forget_now(_ack_of(delivery._msg)[1]))

    async def _forget_now(self, sequence: int) -> None:
        try:
            await self._deferrals.forget(self._consumer, sequence)
        except Exception as exc:  # noqa: BLE001 - left behind, it goes with the stream's max age
            log.debug("nats: deleting the deferral count of message %d of group %r: %s", sequence, self.group, exc)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _look_again(self) -> None:
        """Read the group's types again for the parked messages: those the group is bound to
        go back to the buffer, the others are skipped. A message parked while a read is on
        its way waits for the next one, which starts after it arrived - so it sees any
        widening made before the message was published."""
        assert self._read_binding is not None
        try:
            while self._parked and not self._closed:
                parked, self._parked = self._parked, []
                try:
                    self.rebind(await self._read_binding())
                except Exception as exc:  # noqa: BLE001 - unsettled, they come back after the lease
                    log.warning("nats: reading the types of group %r: %s", self.group, exc)
                    return
                unbound = [self._delivery(msg) == _UNBOUND for msg in parked]
                back = [msg for msg, no in zip(parked, unbound, strict=True) if not no]
                skipped = [msg.reply for msg, no in zip(parked, unbound, strict=True) if no]
                self._buffer.extend(back)
                if skipped:
                    await self._ack_skipped(skipped)
                if back:
                    self._wake()
        finally:
            self._looking = False

    async def _ack_skipped(self, replies: list[str]) -> None:
        try:
            for reply in replies:
                await self._nc.publish(reply, b"+ACK")
        except Exception as exc:  # noqa: BLE001 - unacked, it just comes back after the lease
            log.debug("nats: acking skipped messages: %s", exc)

    def _delivery(self, msg: Msg | Raw) -> NatsDelivery | Literal["unbound"] | None:
        """The delivery of ``msg``; None to skip it (another group's replay, a type this
        group is not bound to, or one unbound from it published after the unbind);
        ``_UNBOUND`` for a type not bound as far as we know, when the group's types can be
        read again (``_read_binding``). Whatever the filter let through: a consumer whose
        filter narrowed still redelivers what it had sent of the types it left."""
        subject = msg.subject
        ack: tuple[int, int, int] | None = None
        if subject.startswith(self._event_prefix):
            parsed = codec.split_subject(subject[len(self._event_prefix) :], msg.headers)
            if parsed is not None:
                if self._removed and parsed[0] in self._removed:  # an empty map costs one test
                    ack = _ack_of(msg)
                    if ack[1] > self._removed[parsed[0]]:
                        return None  # published after its type was unbound
                elif self._types is not None and parsed[0] not in self._types:
                    return _UNBOUND if self._read_binding is not None else None
        elif subject.startswith(self._replay_prefix):
            parsed = codec.split_subject(subject[len(self._replay_prefix) :], msg.headers)
        else:  # another group's replay (servers without multi-subject filters)
            return None
        if ack is None:
            ack = codec.ack_metadata(msg.reply)
            if ack is None:
                metadata = msg.metadata
                ack = (metadata.num_delivered, metadata.sequence.stream, metadata.num_pending)
        # More to fetch: messages not yet sent, or (a redelivery) perhaps more coming due.
        self._more = ack[2] > 0 or ack[0] > 1
        if parsed is None:  # not published by choreograph: let the runtime dead-letter it
            parsed = (subject, f"nats-{self._stream}-{ack[1]}")
        event_type, message_id = parsed
        message = Message(id=message_id, type=event_type, body=msg.data)
        return NatsDelivery(message, ack[0], self.group, self, msg)

    async def _reply_to(self, reply: str, payload: bytes, *, confirm: bool = True) -> None:
        """Send a settlement; with ``confirm``, wait until the server has read it (a round
        trip: for NAKs, TERMs and WPIs, whose timing matters; acks need not wait)."""
        with codec.translated("settle a delivery"):
            await self._nc.publish(reply, payload)
            if confirm:
                await self._nc.flush()

    async def _check_status(self, status: tuple[int, str] | None) -> None:
        """Raise for a pull-request status that means the consumer cannot be pulled from."""
        if status is None:
            return
        code, description = status
        if code in (404, 408):
            return
        self._more = True
        if code == 409 and not any(reason in description.lower() for reason in _FATAL_CONFLICTS):
            await asyncio.sleep(0.05)
            return
        if code == 503:  # no responders: JetStream not ready yet (restarting) or consumer gone
            await self._check_consumer_exists()
            await asyncio.sleep(0.2)
            return
        raise TransportError(f"nats: pull from group {self.group!r} failed: {code} {description}")

    async def _check_consumer_exists(self) -> None:
        """Raise if the server says the group's consumer (or stream) no longer exists."""
        try:
            reply = await self._nc.request(
                f"$JS.API.CONSUMER.INFO.{self._stream}.{self._consumer}", b"", timeout=1.0
            )
            error = json.loads(reply.data).get("error")
        except (TimeoutError, nats.errors.Error, ValueError):
            return  # cannot tell (JetStream still starting): keep trying
        if error and error.get("err_code") in (codec.ERR_CONSUMER_NOT_FOUND, codec.ERR_STREAM_NOT_FOUND):
            raise TransportError(
                f"nats: the consumer of group {self.group!r} no longer exists: {error.get('description')}"
            )


def _ack_of(msg: Msg | Raw) -> tuple[int, int, int]:
    """The delivery count, stream sequence and pending count of ``msg``."""
    ack = codec.ack_metadata(msg.reply)
    if ack is None:
        metadata = msg.metadata
        ack = (metadata.num_delivered, metadata.sequence.stream, metadata.num_pending)
    return ack


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)
