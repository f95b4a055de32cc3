"""The chaos harness on RabbitMQ: what a group holds, counted by passive declares or the management API.

See ``bench/_chaos_brokers.py`` for the other brokers and why RabbitMQ is counted once
every consumer has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from bench._chaos_brokers import Bus, Groups
from bench._chaos_bus import TIMER_SLACK, Observer
from bench._rabbit_management import ManagementApi, QueueCount, vhost_of
from choreograph.runtime.worker import IN_FLIGHT_DEFER
from choreograph.transports.base import Transport

WORKER_HAND_BACK_S = max(IN_FLIGHT_DEFER, 1.0)
"""The worker's own delayed hand-backs wait this long: a copy arriving while another is handled
(``IN_FLIGHT_DEFER``), a batch whose inbox could not be read (1 s)."""


class AmqpBus(Bus):
    """RabbitMQ (layout: ``choreograph.transports._amqp_wire``). Counts by passive declares on a
    connection of its own: nothing is consumed, nothing changes.

    ``longest_retry``: the longest backoff of the services' retry policies (seconds); a holding
    queue with a longer delay holds only deferred join timers.

    ``management_url``: the node's management API (``http://user:pass@host:port/api``). With it
    every queue's ``messages`` is counted (ready, unacknowledged and in dead-letter transit) in
    one request per poll instead of the passive declares; its figures may be ``management_lag``
    seconds old, so the final count waits that long after the consumers stopped."""

    sees_unacked = False
    how = ("counted after every consumer stopped: ready in the group's queue and its retry queues; "
           "timers waiting in longer holding queues are scheduled")

    def __init__(self, url: str, transport: Transport, *, longest_retry: float, management_url: str | None = None,
                 management_lag: float = 3.0) -> None:
        super().__init__(url, transport)
        from choreograph.transports._amqp_wire import RETRY_BUCKETS_MS, retry_bucket_ms
        from choreograph.transports.amqp import AmqpTransport

        assert isinstance(transport, AmqpTransport)
        self.amqp = transport
        self.longest_retry_ms = retry_bucket_ms(max(longest_retry, WORKER_HAND_BACK_S))
        # A delay is rounded up to the next bucket: a timer leaves its holding queue at most this
        # share of its wait after it fell due.
        buckets = RETRY_BUCKETS_MS
        self.late_fraction = max(b / a for a, b in zip(buckets, buckets[1:], strict=False)) - 1
        self._connection: Any = None
        self._connecting = asyncio.Lock()
        self.management = (ManagementApi(management_url, vhost=vhost_of(transport._client_url))
                           if management_url else None)
        self.management_lag = management_lag
        self.unreported: list[str] = []  # queues the management API has no figures for yet, at the last poll
        if self.management is not None:
            self.how = ("counted after every consumer stopped, by the management API: every message (ready, "
                        "unacknowledged, in dead-letter transit) in the group's queue and its retry queues; "
                        "timers waiting in longer holding queues are scheduled")

    async def start(self) -> None:
        import aiormq

        self._connection = await aiormq.connect(self.amqp._client_url)

    async def _open_connection(self) -> Any:
        """The counting connection, opened again if the broker closed it (a broker restart)."""
        import aiormq

        async with self._connecting:
            if self._connection is None or self._connection.is_closed:
                self._connection = await aiormq.connect(self.amqp._client_url)
            return self._connection

    async def _held(self, group: str) -> tuple[int, int]:
        """(ready in the group's queue and in the holding queues of retries, waiting in the
        longer holding queues). A queue that does not exist holds nothing (the refusal closes
        the channel, so a new one follows)."""
        import aiormq.exceptions

        from choreograph.transports._amqp_wire import RETRY_BUCKETS_MS

        names = self.amqp.names
        queues = [(names.group(group), 0), *((names.retry(group, ms), ms) for ms in RETRY_BUCKETS_MS)]
        connection = await self._open_connection()
        channel = await connection.channel()
        ready = waiting = 0
        try:
            for queue, delay_ms in queues:
                try:
                    declared = await channel.queue_declare(queue, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    channel = await connection.channel()
                    continue
                count = int(declared.message_count or 0)
                if delay_ms > self.longest_retry_ms:
                    waiting += count
                else:
                    ready += count
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return ready, waiting

    def _held_in(self, counts: Mapping[str, QueueCount], group: str) -> tuple[int, int, int, int]:
        """As ``_held``, from the management API's figures: (held in the group's queue and the
        holding queues of retries, waiting in the longer holding queues, of them in dead-letter
        transit, queues without figures). Every queue's ``messages``; a queue that does not exist holds nothing, one that
        has not reported its figures yet counts one (unknown is not empty)."""
        from choreograph.transports._amqp_wire import RETRY_BUCKETS_MS

        names = self.amqp.names
        held = waiting = transit = unreported = 0
        for queue, delay_ms in [(names.group(group), 0), *((names.retry(group, ms), ms) for ms in RETRY_BUCKETS_MS)]:
            count = counts.get(queue)
            if count is None:
                continue
            if count.messages is None:
                self.unreported.append(queue)
                held, unreported = held + 1, unreported + 1
                continue
            transit += count.dlx or 0
            if delay_ms > self.longest_retry_ms:
                waiting += count.messages
            else:
                held += count.messages
        return held, waiting, transit, unreported

    def timers_allowed(self, observer: Observer, as_of: float, now: float) -> int:
        """Timers a timer-taking group may hold outside the long holding queues, as scheduled:
        those that left them since ``as_of`` (their consumers stopped then: nobody takes them)
        or were just deferred into a short one (due within the longest retry), copies included.
        A timer leaves its holding queue up to ``late_fraction`` of its wait after its due time."""
        late = self.late_fraction * observer.longest_timer_wait()
        return observer.timers_due_between(as_of - TIMER_SLACK - late, now + self.longest_retry_ms / 1000)

    async def backlog(self, groups: Groups, observer: Observer,
                      as_of: float | None = None) -> dict[str, int] | None:
        transit, unreported = dict.fromkeys(groups, 0), dict.fromkeys(groups, 0)
        if self.management is None:
            held = await asyncio.gather(*(self._held(group) for group in groups))
        else:
            counts = await self.management.queues()
            self.unreported = []
            held = []
            for group in groups:
                in_queues, waiting, transit[group], unreported[group] = self._held_in(counts, group)
                held.append((in_queues, waiting))
        now = time.time()
        allowed = self.timers_allowed(observer, as_of or now, now)
        pending = {}
        self.detail = {}
        what = "ready" if self.management is None else "held"
        for (group, takes_timers), (ready, waiting) in zip(groups.items(), held, strict=True):
            pending[group] = max(0, ready - allowed) if takes_timers else ready
            if pending[group]:
                self.detail[group] = f"{ready} {what}" + (
                    f" ({transit[group]} in dead-letter transit)" if transit[group] else "") + (
                    f" ({unreported[group]} queues without figures yet, 1 each)" if unreported[group] else "") + (
                    f", {allowed} timers may be among them, {waiting} timers waiting" if takes_timers else "")
        return pending

    async def final_backlog(self, groups: Groups, observer: Observer, as_of: float) -> dict[str, int] | None:
        """Every consumer has stopped, so the broker has returned what they held: the counts are
        all that is left. Taken when two polls half a second apart agree (a retry leaving its
        holding queue for the group's queue is ready in neither for an instant). By the management
        API: first ``management_lag`` seconds, so that its figures are of after the stop, and the
        polls are that far apart, every queue reporting."""
        pause = 0.5
        if self.management is not None:
            await asyncio.sleep(self.management_lag)
            pause = self.management_lag
        last: dict[str, int] | None = None
        for _ in range(20):
            pending = await self.backlog(groups, observer, as_of) or {}
            if pending == last and not self.unreported:
                break
            last = pending
            await asyncio.sleep(pause)
        return last

    async def close(self, *, keep: bool) -> None:
        if self.management is not None:
            await self.management.close()
        if self._connection is None:
            return
        try:
            if not keep:
                await self._delete()
        finally:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _delete(self) -> None:
        """Delete every queue and the exchange of this bus (its groups are read from its registry)."""
        from bench._broker_env import remove_choreograph_bus

        await remove_choreograph_bus("amqp", self.url)
