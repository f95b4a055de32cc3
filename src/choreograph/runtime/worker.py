"""The worker: pulls deliveries, runs handlers, publishes outputs, then settles.

Per service (one consumer group) a worker runs three tasks:

* the **fetch loop** pulls as many deliveries as there are free handler slots
  (``concurrency``), drops those the inbox has already seen, decodes and validates
  each, and starts a task per delivery (eagerly on Python 3.12+);
* each **handler task** runs the handler under its timeout and turns the result into
  an *outcome* (done with outputs / retry after / dead-letter);
* the **settler** takes every outcome that accumulated while it was busy and settles
  them together: one ``publish`` for all outputs, one inbox commit, one batched ack.
  An idle worker settles a lone event at once; a busy one amortises round trips
  over whatever piled up (group commit). Outputs are always durable before the
  input is acked, so a crash anywhere re-runs the handler, which republishes the
  same deterministic ids, and downstream inboxes drop the duplicates. It runs two
  stages deep: batch N+1 publishes while batch N is marked and acked;
* the **finisher** does that marking and acking, ``ack_delay`` (5 ms by default) after
  the outputs are published: whatever is published within that window is marked in one
  inbox commit and acked in one call, and the next service, which can act on the outputs
  as soon as they are published, competes less with this one's bookkeeping on a shared
  host (measured with all hops on one 2-core host: see the README).

Shutdown (``stop()``) stops fetching, lets in-flight handlers finish within
``drain_timeout``, releases the rest back to the broker, settles what finished and
closes the subscription: nothing is lost. Those last steps get ``STOP_GRACE`` seconds,
so a worker whose broker is unreachable still exits; what it could not settle is
redelivered after the lease, and the inbox makes the re-run harmless downstream.

The runner of one service is ``_runner``'s, with its three mixins: what a delivery comes to
(``_verdicts``), the settle loop, lane and finisher (``_settling``), and the leases and
timeouts (``_timing``); the values they pass along are ``_outcomes``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from choreograph._clock import SYSTEM_CLOCK, Clock
from choreograph.errors import ConfigurationError
from choreograph.runtime._coroutines import never_suspends as never_suspends  # for tests
from choreograph.runtime._outcomes import Stats
from choreograph.runtime._runner import _EAGER_TASKS as _EAGER_TASKS  # for tests
from choreograph.runtime._runner import IN_FLIGHT_DEFER as IN_FLIGHT_DEFER  # for tests and bench
from choreograph.runtime._runner import _Runner
from choreograph.runtime._timing import HandlerTimeout
from choreograph.runtime.outbox import Outboxes
from choreograph.service import Service
from choreograph.stores.base import InboxStore
from choreograph.stores.joins_base import JoinStore, join_store_beside
from choreograph.stores.memory import MemoryStore
from choreograph.stores.state import StateStore
from choreograph.transports.base import Transport

if TYPE_CHECKING:
    from choreograph.telemetry import Telemetry

__all__ = [
    "DEFAULT_ACK_DELAY",
    "DEFAULT_MAX_HOPS",
    "DEFAULT_RETENTION",
    "HandlerTimeout",
    "Stats",
    "Worker",
]

log = logging.getLogger("choreograph.worker")

DEFAULT_MAX_HOPS = 64
#: How long the inbox remembers a processed event id (and joins keep their arrivals):
#: a duplicate arriving later than this runs again. Seven days by default.
DEFAULT_RETENTION = 7 * 86400.0
#: Seconds from publishing a batch's outputs to marking and acking its inputs (see the
#: finisher above). Only what is already durable waits; ``stop()`` does not.
DEFAULT_ACK_DELAY = 0.005


class Worker:
    """Runs one or more services against a transport until stopped.

    >>> async with Worker([payments], open_transport("sqlite:///var/bus.db")) as worker:  # doctest: +SKIP
    ...     await worker.wait()

    ``concurrency`` bounds the handlers running at once per service. The inbox store
    defaults to an in-memory one; give a durable store (``SQLiteStore``) for
    deduplication across restarts. ``joins`` keeps the arrivals of joins and
    compensations; by default they live in the inbox's database (the same SQLite file;
    in memory for an in-memory inbox), so they survive restarts when the inbox does.

    ``telemetry`` (a :class:`~choreograph.telemetry.Telemetry`) adds a span per handler
    attempt and Prometheus metrics. Without it the worker runs the uninstrumented path:
    the choice is made here, once, not per event.
    """

    def __init__(
        self,
        services: Sequence[Service],
        transport: Transport,
        *,
        store: InboxStore | None = None,
        joins: JoinStore | None = None,
        concurrency: int = 64,
        clock: Clock | None = None,
        max_hops: int = DEFAULT_MAX_HOPS,
        drain_timeout: float = 10.0,
        poll_interval: float = 0.25,
        ack_delay: float = DEFAULT_ACK_DELAY,
        rng: Any = None,
        retention: float | None = DEFAULT_RETENTION,
        telemetry: Telemetry | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency: must be >= 1")
        if not 0 <= ack_delay <= 1:
            raise ValueError("ack_delay: must be between 0 and 1 second")
        if not drain_timeout >= 0:  # NaN too
            raise ValueError(f"drain_timeout: must be >= 0 seconds, got {drain_timeout!r}")
        self.services = list(services)
        names = [s.name for s in self.services]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            # A service's name is its consumer group: two runners of one group in one worker split
            # its events, each handing back (then dead-lettering) the types only the other handles.
            raise ConfigurationError(
                f"services: {twice} given more than once; a service's name is its consumer group, "
                "so give each service once and each its own name (run replicas as more workers)"
            )
        self.transport = transport
        self.store = store or MemoryStore()
        self.joins = joins or join_store_beside(self.store.url)
        self._owns_joins = joins is None
        self.concurrency = concurrency
        self.clock = clock or getattr(transport, "clock", None) or SYSTEM_CLOCK
        self.max_hops = max_hops
        self.drain_timeout = drain_timeout
        self.poll_interval = poll_interval
        self.ack_delay = ack_delay
        self.rng = rng
        self.retention = retention
        self._housekeeping: asyncio.Task[None] | None = None
        self.outbox = Outboxes(self.services, transport)  # service databases and their outbox relays
        self.telemetry = telemetry
        runner: type[_Runner] = _Runner
        if telemetry is not None:
            from choreograph.runtime._instrumented import InstrumentedRunner

            runner = InstrumentedRunner
        self.runners = [runner(self, service) for service in self.services]
        self._stopped = asyncio.Event()
        self._release_now = False  # release_in_flight() was called: stop() drains nothing more
        self._started = False
        self._running = False  # start() went through: stop() has runners, joins and relays to stop
        # start() and stop() one at a time: a stop() during a start waits for it, then undoes all
        # of it (it used to stop runners not started yet, and the start went on after it)
        self._lifecycle = asyncio.Lock()
        self._store_opened = False  # start() opened the inbox store (stop() closes a counted one)

    def stats(self, service: str | None = None) -> Stats:
        """Counters of one service (or the sum over all)."""
        runners = [r for r in self.runners if service is None or r.service.name == service]
        total = Stats()
        for runner in runners:
            for field in dataclasses.fields(Stats):
                setattr(total, field.name, getattr(total, field.name) + getattr(runner.stats, field.name))
        return total

    async def start(self) -> None:
        async with self._lifecycle:
            if self._started or self._stopped.is_set():  # once; and a stopped worker stays stopped
                return
            self._started = True
            await self._start()

    async def _start(self) -> None:
        await self.transport.connect()
        await self.store.open()
        self._store_opened = True
        started: list[_Runner] = []
        joins_opened = False
        try:
            await self.outbox.start()
            await self.joins.open()
            joins_opened = True
            for runner in self.runners:
                await runner.start()
                started.append(runner)
            if self.retention is not None:  # undone too: a start cancelled here left the runners running
                await self._expire_pass()  # at start, before any delivery; then every retention / 10
                self._housekeeping = asyncio.create_task(self._expire_loop(self.retention), name="choreograph-expire")
        except BaseException:
            # No stop() follows a failed start (``async with``): undo what did start, or the
            # runners before the failed one kept fetching and handling, and the relays kept
            # their databases open (and on SQLite the claim's lock, barring any other process).
            try:
                await asyncio.gather(*(runner.stop(0.0) for runner in started), return_exceptions=True)
                if joins_opened and self._owns_joins:  # as stop() does; its database connection too
                    await self.joins.close()
                await self.outbox.stop()
            except Exception as exc:
                log.warning("could not undo a failed start cleanly: %s", exc)
            finally:
                await self._give_back_store()
            raise
        self._running = True
        log.debug("worker started: %s; concurrency %d, ack delay %g s", ", ".join(s.name for s in self.services),
                  self.concurrency, self.ack_delay)

    async def expire(self) -> int:
        """Forget inbox entries and join instances older than ``retention``; returns how many."""
        if self.retention is None:
            return 0
        older_than = self.clock.time() - self.retention
        stores = {id(r.store): r.store for r in self.runners} | {id(self.store): self.store}
        dropped = 0
        for store in stores.values():
            dropped += await store.expire(older_than)
        return dropped + await self.joins.expire(older_than)

    async def _expire_pass(self) -> None:
        try:
            dropped = await self.expire()
            if dropped:
                log.info("expired %d inbox entries and join instances older than %.0fs", dropped, self.retention)
        except Exception as exc:  # housekeeping must never stop the worker
            log.warning("expiring old inbox entries failed: %s", exc)

    async def _expire_loop(self, retention: float) -> None:
        while True:
            await asyncio.sleep(min(retention / 10, 3600.0))
            await self._expire_pass()

    async def wait(self) -> None:
        """Until ``stop()`` is called."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Drain or release in-flight work, settle it, and close the subscriptions.

        Called during ``start()``, it waits for the start to finish (or fail), then stops what it
        started; called before ``start()``, or again, it does nothing more (and a later
        ``start()`` does not start the worker)."""
        async with self._lifecycle:
            if self._stopped.is_set():
                return
            if self._running:
                await self._stop()
            self._stopped.set()

    async def _stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        try:
            await asyncio.gather(*(self._stop_runner(runner) for runner in self.runners))
            if self._owns_joins:
                await self.joins.close()
            await self.outbox.stop()
        finally:
            await self._give_back_store()

    async def _give_back_store(self) -> None:
        if self._store_opened and isinstance(self.store, StateStore):
            self._store_opened = False
            # A service database given as the inbox counts its opens (the worker's relays and
            # the caller's share it): the worker gives back the one it took in start(), or
            # the caller's close() left its connection pool open for good.
            await self.store.close()

    async def _stop_runner(self, runner: _Runner) -> None:
        # the drain time is read as the runner starts stopping: a release_in_flight() before it
        # means none, one after it cancels what the runner drains (see release_in_flight)
        await runner.stop(0.0 if self._release_now else self.drain_timeout)

    def release_in_flight(self) -> None:
        """Cut a drain short (a second Ctrl-C): the handlers still running are cancelled and their
        events released to the broker at once, as when ``drain_timeout`` runs out (the interrupted
        attempt counts); ``stop()`` then settles what had finished and returns. Called before
        ``stop()``, it makes that stop drain nothing."""
        self._release_now = True
        for runner in self.runners:
            if runner.stopping:
                for task in list(runner.active):
                    task.cancel()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
