"""The consumer side of :mod:`choreograph.transports.sqlite`: subscriptions and deliveries.

A delivery is identified in the file by (group, seq, attempt): every settlement verb
names that claim, so a consumer whose lease expired and was re-claimed elsewhere cannot
settle the newer claim. Writes go through the transport's group commit.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from choreograph.errors import TransportClosed
from choreograph.transports import _sqlite_ops as ops
from choreograph.transports.base import Delivery, Message, Subscription, bad_batch, closed_delivery

if TYPE_CHECKING:
    from choreograph.transports.sqlite import SQLiteTransport

_MAX_IDLE_WAIT = 1.0  # an idle fetch re-checks at least this often, whatever the poller says

#: A settling write: ``(connection, now, [(seq, attempt), ...])``.
_ClaimsOp = Callable[[sqlite3.Connection, float, list[tuple[int, int]]], None]
#: ``ops.postpone`` (a retry: the next claim counts an attempt) or ``ops.defer`` (it does not).
_PostponeOp = Callable[[sqlite3.Connection, str, Sequence[tuple[int, int]], float], None]


class SQLiteDelivery(Delivery):
    __slots__ = ("_subscription", "_seq")

    def __init__(self, message: Message, attempt: int, subscription: SQLiteSubscription, seq: int) -> None:
        super().__init__(message, attempt, subscription.group)
        self._subscription = subscription
        self._seq = seq

    async def _ack(self) -> None:
        await self._subscription._ack([self])

    async def _retry(self, after: float) -> None:
        await self._subscription._postpone([self], after)

    async def _defer(self, after: float) -> None:
        await self._subscription._postpone([self], after, op=ops.defer)

    async def _dead_letter(self, record: Mapping[str, Any]) -> None:
        await self._subscription._dead_letter(self, dict(record))

    async def touch(self) -> None:
        if not self.settled:
            await self._subscription._touch(self)


class SQLiteSubscription(Subscription):
    def __init__(self, transport: SQLiteTransport, group: str) -> None:
        self.group = group
        self._transport = transport
        self._held: dict[int, SQLiteDelivery] = {}  # seq -> unsettled delivery
        self._closed = False

    def _check_open(self) -> None:
        if self._closed or self._transport._closed:
            raise TransportClosed(f"{self._transport.url}: subscription {self.group!r} is closed")

    def _check_settle(self, delivery: SQLiteDelivery) -> None:
        """A verb after the subscription closed: refused, as on every transport (see
        base.Delivery). It used to settle the claim if no consumer had taken it since close()
        made it available again, and to do nothing, as if it had, once one had."""
        if self._closed or self._transport._closed:
            raise closed_delivery(delivery, self._transport.url)

    async def fetch(self, max_messages: int, timeout: float | None = None) -> list[Delivery]:  # noqa: ASYNC109
        if max_messages < 1:
            raise bad_batch(max_messages)
        transport, clock = self._transport, self._transport._clock
        deadline = None if timeout is None else clock.monotonic() + max(0.0, timeout)
        group, lease = self.group, transport.lease

        def claim(conn: sqlite3.Connection, now: float) -> tuple[ops.Claimed, float | None]:
            claimed = ops.claim(conn, group, max_messages, now, now + lease)
            return claimed, (None if claimed else ops.next_due(conn, group))

        while True:
            self._check_open()
            seen = transport._changes
            claimed, due = await transport._write(claim, abandon=self._unclaim)
            if claimed:
                return self._deliveries(claimed)
            wait = _MAX_IDLE_WAIT
            if deadline is not None:
                left = deadline - clock.monotonic()
                if left <= 0:
                    return []
                wait = min(wait, left)
            if due is not None:
                wait = min(wait, max(0.001, due - clock.time() + 0.001))
            await transport._wait_change(seen, wait)

    def _deliveries(self, claimed: ops.Claimed) -> list[Delivery]:
        out: list[Delivery] = []
        for seq, attempt, message in claimed:
            delivery = SQLiteDelivery(message, attempt, self, seq)
            self._held[seq] = delivery
            out.append(delivery)
        return out

    def _unclaim(self, result: tuple[ops.Claimed, float | None]) -> None:
        """A cancelled fetch claimed rows after all: put them back as if never handed out."""
        claims = [(seq, attempt) for seq, attempt, _ in result[0]]
        if claims:
            group = self.group
            self._transport._submit_detached(
                lambda conn, now: ops.unclaim(conn, group, claims, now), wakes=True
            )

    def _release(self, deliveries: Sequence[SQLiteDelivery]) -> list[tuple[int, int]]:
        for delivery in deliveries:
            self._held.pop(delivery._seq, None)
        return [(d._seq, d.attempt) for d in deliveries]

    async def _settle(
        self, deliveries: Sequence[SQLiteDelivery], op: _ClaimsOp, *, wakes: bool = False
    ) -> None:
        """Write ``op`` for the claims of ``deliveries``, which stop being held once it committed.

        If the write fails they are still held: a second call settles them (every op names
        its (seq, attempt) claims, so a claim that did commit, or moved on to another
        consumer meanwhile, is left alone), and ``close()`` gives them back.

        A caller cancelled while the write is queued or running does not stop it: the
        deliveries are held again only if it then fails (held at once, a retry that did
        commit would be handed on again by ``close()``, before its delay) - and not when a
        later call settled them meanwhile, nor after ``close()``, which has handed on what
        it held: then they go back to the group at once, as ``close()`` would have done.
        """
        if deliveries:
            self._check_settle(deliveries[0])
        claims = self._release(deliveries)
        written = self._transport._submit(lambda conn, now: op(conn, now, claims), wakes=wakes)
        try:
            await asyncio.shield(written)
        except asyncio.CancelledError:
            written.add_done_callback(functools.partial(self._hold_unless_written, deliveries))
            raise
        except BaseException:
            self._hold(deliveries)
            raise

    def _hold(self, deliveries: Sequence[SQLiteDelivery]) -> None:
        for delivery in deliveries:
            self._held.setdefault(delivery._seq, delivery)

    def _hold_unless_written(
        self, deliveries: Sequence[SQLiteDelivery], written: asyncio.Future[Any]
    ) -> None:
        if not (written.cancelled() or written.exception() is not None):
            return
        unsettled = [d for d in deliveries if not d.settled]  # settled: a later call wrote it
        if not self._closed:
            self._hold(unsettled)
        elif unsettled and not self._transport._closed:
            claims, group = [(d._seq, d.attempt) for d in unsettled], self.group
            self._transport._submit_detached(
                lambda conn, now: ops.postpone(conn, group, claims, now), wakes=True
            )

    async def _ack(self, deliveries: Sequence[SQLiteDelivery]) -> None:
        group = self.group
        await self._settle(deliveries, lambda conn, now, claims: ops.ack(conn, group, claims))

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        mine: list[SQLiteDelivery] = []
        for delivery in deliveries:
            if isinstance(delivery, SQLiteDelivery) and delivery._subscription is self:
                if not delivery.settled:
                    mine.append(delivery)
            else:
                await delivery.ack()
        if mine:
            await self._ack(mine)  # settled only once acked: the worker retries a failed settle step
            for delivery in mine:
                delivery.settled = True

    async def _postpone(
        self, deliveries: Sequence[SQLiteDelivery], after: float, op: _PostponeOp = ops.postpone
    ) -> None:
        group = self.group
        await self._settle(
            deliveries,
            lambda conn, now, claims: op(conn, group, claims, now + after),
            wakes=after <= 0,
        )

    async def _touch(self, delivery: SQLiteDelivery) -> None:
        self._check_settle(delivery)
        claims, group, lease = [(delivery._seq, delivery.attempt)], self.group, self._transport.lease
        await self._transport._write(lambda conn, now: ops.postpone(conn, group, claims, now + lease))

    async def _dead_letter(self, delivery: SQLiteDelivery, record: dict[str, Any]) -> None:
        group = self.group
        await self._settle(
            [delivery], lambda conn, now, claims: ops.dead_letter(conn, group, *claims[0], record, now)
        )

    async def close(self) -> None:
        """Stop consuming; unsettled deliveries go back to the group at once (attempt + 1)."""
        if self._closed:
            return
        self._closed = True
        self._transport._subscriptions.discard(self)
        held = list(self._held.values())
        if held and not self._transport._closed:
            claims, group = self._release(held), self.group
            await self._transport._write(lambda conn, now: ops.postpone(conn, group, claims, now), wakes=True)
        self._transport._bump()  # a fetch waiting on this subscription notices the close
