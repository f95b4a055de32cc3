"""Consuming one group's queue on RabbitMQ: deliveries, client-side leases, batched acks.

RabbitMQ pushes messages to a consumer (up to the prefetch) and keeps every unacked
one until the consumer acks it or its channel closes; it has no per-message ack
deadline. So the lease is kept here, in the consuming process:

* A delivery handed out by :meth:`AmqpSubscription.fetch` that is not settled within
  ``lease`` seconds (``touch()`` restarts the clock) is re-published to the group's
  queue with attempt + 1 and the original is acked: another consumer gets it, and a
  late ``ack()`` from the slow handler is a no-op.
* A message the broker pushed (prefetch) that nobody fetches within ``lease`` seconds
  is handed back the same way with its attempt unchanged, so a consumer that stops
  fetching does not sit on messages other consumers could take.
* A process that dies or loses its connection returns its unacked messages to the
  queue at once (the broker does it when the socket closes or heartbeats stop); quorum
  queues count that return in ``x-delivery-count``, so the attempt is still right.
* A process whose event loop hangs while its socket stays open keeps its messages
  until heartbeats fail (the negotiated heartbeat, 60 s by default) or RabbitMQ's
  ``consumer_timeout`` (30 min by default) closes the channel.

Retries and dead letters are "publish a copy (confirmed), then ack the original": a
crash in between duplicates the message, never loses it.

A delivery tag dies with its channel: once the channel a message arrived on has closed,
the broker has taken the message back and redelivers it (attempt + 1 on quorum queues),
and no ack, nack or copy can settle it any more. Every verb on such a delivery returns
without raising and without publishing a copy (the runtime would otherwise retry it for
ever): the message comes back as the broker redelivers it - a retry sooner than asked, a
dead letter decided again on its next attempt, an ack's copy dropped by the inbox. The
only failure a verb raises is a copy that could not be published: the original is then
still held, and a second call publishes it again - and TransportClosed once the
subscription is closed, as on every transport (``close()`` has requeued what it held).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aio_pika.abc
import aiormq.abc
import aiormq.exceptions

from choreograph.errors import TransportClosed, TransportError
from choreograph.transports._amqp_wire import (
    CLIENT_ERRORS,
    Raw,
    attempt_of,
    copy_of,
    dead_letter_message,
    translated,
)
from choreograph.transports.base import Delivery, Message, Subscription, bad_batch, closed_delivery

if TYPE_CHECKING:
    from choreograph.transports.amqp import AmqpTransport


log = logging.getLogger("choreograph.transports.amqp")

_QUIESCE_S = 0.05  # a quiet spell this long means nothing more is on its way
_QUIESCE_ROUNDS = 20  # ...but stop waiting after a second of steady traffic


def live_channel(raw: Raw) -> aiormq.abc.AbstractChannel | None:
    """The channel ``raw`` arrived on, or ``None`` if it has closed (the broker took it back)."""
    try:
        return raw.channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return None


class AmqpDelivery(Delivery):
    __slots__ = ("raw", "_sub", "_timer")

    def __init__(self, sub: AmqpSubscription, raw: Raw, message: Message, attempt: int) -> None:
        super().__init__(message, attempt, sub.group)
        self.raw = raw
        self._sub = sub
        self._timer: asyncio.TimerHandle | None = None

    def _arm(self, lease: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(lease, self._sub._expire, self)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def touch(self) -> None:
        """Restart the lease clock (kept in this process: RabbitMQ has no ack deadline)."""
        if not self.settled:
            self._sub._check_settle(self)
            self._arm(self._sub.lease)

    async def _ack(self) -> None:
        await self._sub._ack_raws([self])  # raises only once closed: nothing to retry (see the module doc)

    async def _retry(self, after: float) -> None:
        await self._sub._settle_by_copy(self, copy_of(self.raw, self.attempt + 1), after)

    async def _defer(self, after: float) -> None:
        await self._sub._settle_by_copy(self, copy_of(self.raw, self.attempt), after)

    async def _dead_letter(self, record: Mapping[str, Any]) -> None:
        await self._sub._settle_by_copy(self, dead_letter_message(record, self.raw), None)


class AmqpSubscription(Subscription):
    """A consumer on ``<prefix>.group.<group>``, on its own channel (its own prefetch)."""

    def __init__(
        self,
        transport: AmqpTransport,
        group: str,
        channel: aio_pika.abc.AbstractChannel,
        queue: aio_pika.abc.AbstractQueue,
    ) -> None:
        self.group = group
        self.transport = transport
        self.lease = transport.lease
        self._channel = channel
        self._queue = queue
        self._buffer: asyncio.Queue[Raw | None] = asyncio.Queue()
        # What a cancelled fetch had taken from the buffer, in order: handed out before the buffer.
        self._returned: collections.deque[Raw] = collections.deque()
        self._consumer_tags: list[str] = []
        self._prefetch = 0  # summed over the consumers
        self._consume_lock = asyncio.Lock()
        self._unacked: dict[aiormq.abc.AbstractChannel, set[int]] = {}  # received, not yet acked
        self._acking: set[asyncio.Future[int]] = set()  # ack sends in flight, shielded from their caller
        self._parked: dict[int, asyncio.TimerHandle] = {}  # id(raw) of those buffered: their lease
        self._out: set[AmqpDelivery] = set()  # handed out, not settled
        self._tasks: set[asyncio.Task[None]] = set()
        self._received = 0
        self._closed = False

    # -- receiving ------------------------------------------------------------------------

    async def _on_message(self, raw: Raw) -> None:
        self._received += 1
        channel = live_channel(raw)
        if channel is None or raw.delivery_tag is None:
            return
        self._unacked.setdefault(channel, set()).add(raw.delivery_tag)
        loop = asyncio.get_running_loop()
        self._parked[id(raw)] = loop.call_later(self.lease, self._unpark, raw)
        self._buffer.put_nowait(raw)

    async def _ensure_consuming(self, max_messages: int) -> None:
        """Consume with a prefetch of the largest batch asked for so far.

        A consumer's prefetch is fixed when it starts (quorum queues have no channel-wide
        prefetch), and cancelling a consumer strands a message the queue dispatched to it
        at that instant until the channel closes. So a larger batch adds a consumer on
        this channel for the difference instead of restarting the first one. (After a
        reconnect aio-pika restores them all with the last prefetch: more, never less.)
        """
        if max_messages <= self._prefetch:
            return
        async with self._consume_lock:
            extra = max_messages - self._prefetch
            if extra <= 0:
                return
            with translated(f"consume {self._queue.name}"):
                await self._channel.set_qos(prefetch_count=extra)
                self._consumer_tags.append(await self._queue.consume(self._on_message, no_ack=False))
            self._prefetch = max_messages

    def _hand_out(self, raw: Raw) -> AmqpDelivery | None:
        if live_channel(raw) is None:  # from a connection that died: the broker requeued it
            self._unacked = {ch: tags for ch, tags in self._unacked.items() if not ch.is_closed}
            return None
        message = Message(raw.message_id or "", raw.type or raw.routing_key or "", raw.body)
        delivery = AmqpDelivery(self, raw, message, attempt_of(raw.headers, bool(raw.redelivered)))
        delivery._arm(self.lease)
        self._out.add(delivery)
        return delivery

    async def fetch(self, max_messages: int, timeout: float | None = None) -> list[Delivery]:  # noqa: ASYNC109
        if max_messages < 1:
            raise bad_batch(max_messages)
        self._check_open()
        await self._ensure_consuming(max_messages)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        out: list[Delivery] = []
        turns = 3
        while True:
            self._take_ready(out, max_messages)
            if out:
                try:
                    await self._top_up(out, max_messages, turns)
                except asyncio.CancelledError:
                    self._hand_back(out)  # cancel-safe: the caller never saw them
                    raise
                return out
            self._check_open()
            if deadline is not None and deadline <= loop.time():
                return []
            try:
                # Not asyncio.wait_for: on 3.11 it runs the get in a task of its own, a task
                # and a loop turn more between the delivery and this fetch returning it.
                async with asyncio.timeout_at(deadline):
                    raw = await self._buffer.get()
            except TimeoutError:
                return []  # a delivery that came as the timer fired stays in the buffer
            self._take(raw, out)
            # Woken from idle: a burst's other deliveries show up within a turn, if at all (a
            # lone event at a light load should not wait three turns for company).
            turns = 1

    async def _top_up(self, out: list[Delivery], max_messages: int, turns: int = 3) -> None:
        """Add what the client already read off the socket but has not queued yet.

        Each delivery reaches the buffer a couple of event-loop turns after its frames
        arrive, so a burst the broker pushed together lands over several turns. Give
        it those turns (never a timed wait) while they keep bringing messages: ``turns``
        at first (fewer after an idle wait, see :meth:`fetch`), three once they do.
        """
        while len(out) < max_messages:
            before = self._received
            for _ in range(turns):
                await asyncio.sleep(0)
            self._take_ready(out, max_messages)
            if self._received == before:
                return
            turns = 3

    def _take_ready(self, out: list[Delivery], max_messages: int) -> None:
        """Hand out what is ready, up to ``max_messages`` in ``out``: first what a cancelled
        fetch gave back, then the buffer."""
        returned, buffer = self._returned, self._buffer
        while len(out) < max_messages and (returned or not buffer.empty()):
            self._take(returned.popleft() if returned else buffer.get_nowait(), out)

    def _hand_back(self, out: Sequence[Delivery]) -> None:
        """Undo handing out ``out`` (a fetch cancelled before it returned them): their leases
        end, they are parked again with their attempt unchanged, ahead of the buffer."""
        loop = asyncio.get_running_loop()
        raws = []
        for delivery in out:
            assert isinstance(delivery, AmqpDelivery)
            delivery.settled = True  # void: the raw is handed out again as a new delivery
            self._forget(delivery)
            raws.append(delivery.raw)
            self._parked[id(delivery.raw)] = loop.call_later(self.lease, self._unpark, delivery.raw)
        self._returned.extendleft(reversed(raws))

    def _take(self, raw: Raw | None, out: list[Delivery]) -> None:
        if raw is None:  # closing: wake the next waiter too
            self._buffer.put_nowait(None)
            self._check_open()
            return
        parked = self._parked.pop(id(raw), None)
        if parked is None:
            return  # its lease ran out in the buffer: already handed back to the group
        parked.cancel()
        delivery = self._hand_out(raw)
        if delivery is not None:
            out.append(delivery)

    def _check_open(self) -> None:
        if self._closed or self.transport.closed:
            raise TransportClosed(f"amqp: subscription of group {self.group!r} is closed")

    def _check_settle(self, delivery: AmqpDelivery) -> None:
        """A verb after the subscription closed: refused, as on every transport (see
        base.Delivery). close() has requeued a copy (attempt + 1) and acked the original:
        nothing is left here to settle."""
        if self._closed or self.transport.closed:
            raise closed_delivery(delivery, "amqp")

    # -- settling -------------------------------------------------------------------------

    def _forget(self, delivery: AmqpDelivery) -> None:
        delivery._disarm()
        self._out.discard(delivery)

    def _holds(self, raw: Raw) -> bool:
        """Whether ``raw`` is still ours to settle: its channel is open and it is not acked yet."""
        channel = live_channel(raw)
        return channel is not None and raw.delivery_tag in self._unacked.get(channel, ())

    def _untrack(self, raw: Raw) -> None:
        channel = live_channel(raw)
        if channel is not None and raw.delivery_tag is not None:
            self._unacked.get(channel, set()).discard(raw.delivery_tag)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack a batch: one ``multiple`` ack when it is everything outstanding up to its last tag."""
        mine: list[AmqpDelivery] = []
        for delivery in deliveries:
            if delivery.settled:
                continue
            if not isinstance(delivery, AmqpDelivery) or delivery._sub is not self:
                await delivery.ack()
                continue
            mine.append(delivery)
        if mine:
            await self._ack_raws(mine)
            for delivery in mine:
                delivery.settled = True

    async def _ack_raws(self, deliveries: Sequence[AmqpDelivery]) -> None:
        if deliveries:
            self._check_settle(deliveries[0])
        for delivery in deliveries:
            self._forget(delivery)
        await self._ack([d.raw for d in deliveries], f"ack in group {self.group!r}")

    async def _ack(self, raws: Sequence[Raw], what: str) -> None:
        """Ack ``raws`` on the channels they arrived on. Does not raise: see the module doc.

        A tag leaves ``_unacked`` before its ack goes out and is never acked twice (acking
        an unknown tag is a channel error: the broker would close the channel and take
        back every other message on it). Once ``basic_ack`` got past its closed-channel
        check the frame is queued for the socket, so an error after that means the
        connection is going: the broker returns the message, as for a closed channel.
        """
        by_channel: dict[aiormq.abc.AbstractChannel, list[int]] = {}
        lost = 0
        for raw in raws:
            channel = live_channel(raw)
            if channel is None or raw.delivery_tag is None:
                lost += 1
            elif raw.delivery_tag in self._unacked.get(channel, ()):
                by_channel.setdefault(channel, []).append(raw.delivery_tag)
            # else: acked (or given back) already - by an earlier call that raised, say
        acks: list[tuple[aiormq.abc.AbstractChannel, int, bool, list[int]]] = []
        for channel, tags in by_channel.items():
            tags.sort()
            outstanding = self._unacked[channel]
            last = tags[-1]
            multiple = len(tags) > 1 and {t for t in outstanding if t <= last} == set(tags)
            outstanding.difference_update(tags)
            acks.append((channel, last, multiple, tags))
        if acks:
            # The tags are no longer tracked: their acks must go out even if the caller is
            # cancelled now (a cancelled gather sent none; the message sat unacked on its
            # channel, holding a prefetch slot, until the channel closed).
            sending = asyncio.ensure_future(self._send_acks(acks))
            self._acking.add(sending)
            sending.add_done_callback(self._acking.discard)
            lost += await asyncio.shield(sending)
        if lost:
            log.warning(
                "amqp: %s: the channel that received %d message(s) closed before the ack;"
                " the broker redelivers them", what, lost,
            )  # fmt: skip

    @staticmethod
    async def _send_acks(acks: Sequence[tuple[aiormq.abc.AbstractChannel, int, bool, list[int]]]) -> int:
        """Send ``(channel, last, multiple, tags)`` acks; returns how many tags were lost."""
        lost = 0
        for channel, last, multiple, tags in acks:
            try:
                if multiple:
                    await channel.basic_ack(last, multiple=True)
                else:
                    await asyncio.gather(*(channel.basic_ack(tag, wait=False) for tag in tags))
            except CLIENT_ERRORS:
                lost += len(tags)
        return lost

    async def _settle_by_copy(
        self, delivery: AmqpDelivery, copy: aio_pika.Message, retry_after: float | None
    ) -> None:
        """Retry (``retry_after`` seconds) or dead-letter (``None``): publish ``copy`` to the
        retry queue or the dead-letter queue (confirmed), then ack the original.

        Nothing is published for a message whose channel is gone (the broker already has
        it back). If the copy cannot be published, the original stays held - leased, and
        returned by ``close()`` - and TransportError is raised: a second call publishes
        again (a copy that reached the broker without its confirm is then there twice).
        """
        self._check_settle(delivery)
        loop = asyncio.get_running_loop()
        due = loop.time() + self.lease if delivery._timer is None else delivery._timer.when()
        self._forget(delivery)  # close() and the lease timer leave it alone meanwhile
        verb, raw = ("dead letter" if retry_after is None else "retry"), delivery.raw
        try:
            if self._holds(raw):
                if retry_after is None:
                    queue = self.transport.names.dlq(self.group)
                else:
                    queue = await self.transport._retry_queue(self.group, retry_after)
                await self.transport._send(queue, [copy])
        except BaseException:
            if not self._closed:  # still ours: close() returns it, and its lease runs on
                self._out.add(delivery)
                delivery._arm(max(0.0, due - loop.time()))
            raise
        await self._ack([raw], f"{verb} in group {self.group!r}")

    async def _forward(
        self, items: Sequence[tuple[Raw, int]], queue: str, letters: Sequence[aio_pika.Message] | None = None
    ) -> None:
        """Publish copies (``attempt``) or ``letters`` to ``queue`` (confirmed), then ack the originals.

        If the copies cannot be published the originals are returned to the queue (or the
        broker returns them itself when their channel is gone) and TransportError is raised.
        """
        raws = [raw for raw, _ in items]
        copies = list(letters) if letters is not None else [copy_of(raw, attempt) for raw, attempt in items]
        try:
            await self.transport._send(queue, copies)
        except TransportError:
            await self._give_back(raws)
            raise
        await self._ack(raws, f"ack after forwarding to {queue}")

    async def _give_back(self, raws: Sequence[Raw]) -> None:
        """Return ``raws`` to the queue (nack, requeue) after a failed lease-expiry hand-back."""
        for raw in raws:
            channel, tag = live_channel(raw), raw.delivery_tag
            if channel is not None and tag is not None and tag in self._unacked.get(channel, ()):
                try:
                    await channel.basic_nack(tag, requeue=True)
                except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError):
                    pass  # the channel is going away: the broker requeues them itself
                self._untrack(raw)

    def _expire(self, delivery: AmqpDelivery) -> None:
        """Lease over: hand the message to the group again (attempt + 1) - unless its channel
        closed, when the broker already has it back and redelivers it itself."""
        if delivery.settled or self._closed:
            return
        delivery.settled = True
        self._forget(delivery)
        if live_channel(delivery.raw) is None:
            return  # its channel closed: the broker took it back and redelivers it (no copy too)
        task = asyncio.get_running_loop().create_task(
            self._requeue_quietly([(delivery.raw, delivery.attempt + 1)])
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unpark(self, raw: Raw) -> None:
        """A message sat in the buffer for a whole lease (nobody fetched): give it back, same attempt."""
        if self._closed or self._parked.pop(id(raw), None) is None or live_channel(raw) is None:
            return
        item = (raw, attempt_of(raw.headers, bool(raw.redelivered)))
        task = asyncio.get_running_loop().create_task(self._requeue_quietly([item]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _requeue_quietly(self, items: Sequence[tuple[Raw, int]]) -> None:
        try:
            await self._forward(items, self.transport.names.group(self.group))
        except TransportError:
            pass  # nothing lost: the originals went back to the queue

    # -- closing --------------------------------------------------------------------------

    async def _quiesce(self) -> None:
        """Wait until deliveries stop arriving for a moment (bounded), before cancelling.

        A quorum queue that dispatched a message to this consumer just as the cancel
        reaches the broker keeps it checked out to the cancelled consumer and returns it,
        counted as a failed delivery, when the channel closes. Letting in-flight
        deliveries land first means they are handed back with their attempt unchanged;
        only one dispatched inside the cancel's own round trip can still be counted.
        """
        for _ in range(_QUIESCE_ROUNDS):
            seen = self._received
            await asyncio.sleep(_QUIESCE_S)
            if self._received == seen:
                return

    async def close(self) -> None:
        """Stop consuming; return what this consumer holds to the group, attempts exact.

        Messages received but never handed out go back with their attempt unchanged;
        deliveries handed out and not settled go back with attempt + 1.
        """
        if self._closed:
            return
        self._closed = True
        self._buffer.put_nowait(None)
        if self._consumer_tags and not self._channel.is_closed:
            await self._quiesce()
            try:
                with translated("cancel consumer"):
                    for tag in self._consumer_tags:
                        await self._queue.cancel(tag)
            except TransportError:
                pass
        for _ in range(3):  # let callbacks of deliveries that beat the cancel-ok reach the buffer
            await asyncio.sleep(0)
        if self._acking:  # acks a cancelled caller left going: out before the channel closes
            await asyncio.wait(list(self._acking), timeout=5.0)
        items: list[tuple[Raw, int]] = []
        while self._returned or not self._buffer.empty():
            raw = self._returned.popleft() if self._returned else self._buffer.get_nowait()
            parked = None if raw is None else self._parked.pop(id(raw), None)
            if raw is not None and parked is not None:
                parked.cancel()
                if live_channel(raw) is not None:
                    items.append((raw, attempt_of(raw.headers, bool(raw.redelivered))))
        for delivery in list(self._out):  # left unsettled: a verb on one raises (_check_settle)
            self._forget(delivery)
            if live_channel(delivery.raw) is not None:
                items.append((delivery.raw, delivery.attempt + 1))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if items:
            await self._requeue_quietly(items)
        try:
            with translated("close channel"):
                await self._channel.close()
        except TransportError:
            pass
