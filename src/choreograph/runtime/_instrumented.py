"""The worker's instrumented path: a span and metrics around each handler attempt.

A :class:`~choreograph.runtime.worker.Worker` built with ``telemetry=`` runs its services
with :class:`InstrumentedRunner`; without, with the plain runner, so the uninstrumented
hot path carries no "is telemetry on?" checks. Each override here does what the runner
does, then reports it (what is reported: :mod:`choreograph.telemetry`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from choreograph._envelope import Envelope
from choreograph.joins import Defer
from choreograph.runtime._outcomes import _Again, _Call, _Dead, _Done, _Outcome
from choreograph.runtime._runner import _Runner
from choreograph.runtime.records import DeadLetterReason
from choreograph.service import Handler, Service
from choreograph.stores.base import ErrorInfo
from choreograph.telemetry import Metrics, Tracing, messaging_system
from choreograph.transports.base import Delivery, Message

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from prometheus_client import Counter, Histogram

    from choreograph.runtime.worker import Worker

log = logging.getLogger("choreograph.telemetry")

#: Seconds between two reads of a service's outbox backlog (``choreograph_outbox_*`` gauges).
OUTBOX_LAG_INTERVAL = 5.0


@dataclasses.dataclass(slots=True)
class _TypeMetrics:
    """The labelled children of one (service, event type), looked up once."""

    handled: Counter
    retried: Counter
    duplicates: Counter
    duration: Histogram


class InstrumentedRunner(_Runner):
    """The worker loop of one service, reporting spans and metrics."""

    INLINE = False  # every attempt runs in _attempt, which opens its span

    def __init__(self, worker: Worker, service: Service) -> None:
        super().__init__(worker, service)
        telemetry = worker.telemetry
        assert telemetry is not None
        self.tracing: Tracing | None = telemetry.tracing
        self.metrics: Metrics | None = telemetry.metrics
        self.system = messaging_system(getattr(worker.transport, "url", ""))
        self.spans: dict[Delivery, Span] = {}  # the span of each attempt running now
        self.by_type: dict[str, _TypeMetrics] = {}
        self.in_flight = self.metrics.in_flight.labels(service.name) if self.metrics is not None else None
        self.lag_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        if self.metrics is not None and self.has_database:
            self.lag_task = asyncio.create_task(self._lag_loop(self.metrics), name=f"choreograph-lag-{self.group}")

    async def stop(self, drain_timeout: float) -> None:
        if self.lag_task is not None:
            self.lag_task.cancel()
            await asyncio.gather(self.lag_task, return_exceptions=True)
        await super().stop(drain_timeout)

    async def _lag_loop(self, metrics: Metrics) -> None:
        name = self.service.name
        pending, oldest = metrics.outbox_pending.labels(name), metrics.outbox_oldest_age.labels(name)
        while True:
            try:
                lag = await self.worker.outbox.lag(name)
            except Exception as exc:  # the database is down: the relay says so; keep the last figures
                log.debug("could not read the outbox backlog of %s: %s", name, exc)
            else:
                pending.set(lag.pending)
                oldest.set(lag.oldest_age)
            await asyncio.sleep(OUTBOX_LAG_INTERVAL)

    def _of(self, event_type: str) -> _TypeMetrics:
        found = self.by_type.get(event_type)
        if found is None:
            metrics = self.metrics
            assert metrics is not None
            labels = (self.service.name, event_type)
            found = self.by_type[event_type] = _TypeMetrics(
                metrics.handled.labels(*labels), metrics.retried.labels(*labels),
                metrics.duplicates.labels(*labels), metrics.duration.labels(*labels),
            )
        return found

    # -- the attempt --------------------------------------------------------------------

    async def _run(self, call: _Call) -> None:
        await self._attempt(call, super()._run)

    async def _transactional(self, call: _Call) -> None:
        await self._attempt(call, super()._transactional)

    async def _attempt(self, call: _Call, run: Callable[[_Call], Coroutine[Any, Any, None]]) -> None:
        """Run the attempt inside its span (current while the handler runs), timed and counted in flight."""
        in_flight = self.in_flight
        if in_flight is not None:
            in_flight.inc()
            started = time.perf_counter()
        try:
            tracing = self.tracing
            if tracing is None:
                await run(call)
                return
            delivery = call.delivery
            span = tracing.consumer_span(
                call.envelope, service=self.service.name, group=self.group, handler=call.handler.name,
                attempt=delivery.attempt, system=self.system,
            )
            # What the handler emits, and the failure event if it gives up, are children of this span.
            call.envelope = Tracing.traced(call.envelope, span)
            self.spans[delivery] = span
            try:
                with tracing.use(span):
                    await run(call)
            finally:
                del self.spans[delivery]
        finally:
            if in_flight is not None:
                in_flight.dec()
                self._of(call.envelope.type).duration.observe(time.perf_counter() - started)

    # -- outcomes -----------------------------------------------------------------------

    def _returned(self, call: _Call, result: Any) -> _Outcome:
        outcome = super()._returned(call, result)
        if self.metrics is not None and type(outcome) is _Done:
            self._of(call.envelope.type).handled.inc()
        return outcome

    def _committed(self, call: _Call, messages: list[Message], mark: bool) -> _Done:
        outcome = super()._committed(call, messages, mark)
        if self.metrics is not None:
            self._of(call.envelope.type).handled.inc()
        return outcome

    def _filtered(self, delivery: Delivery) -> _Done:
        outcome = super()._filtered(delivery)
        if self.metrics is not None:
            self.metrics.filtered.labels(self.service.name, delivery.message.type).inc()
        return outcome

    def _unsubscribed(self, delivery: Delivery, envelope: Envelope, now: float) -> _Outcome:
        outcome = super()._unsubscribed(delivery, envelope, now)
        if self.metrics is not None and isinstance(outcome, _Again):
            self.metrics.handed_back.labels(self.service.name, envelope.type).inc()
        return outcome

    def _duplicate(self, delivery: Delivery) -> _Done:
        outcome = super()._duplicate(delivery)
        if self.metrics is not None:
            self._of(delivery.message.type).duplicates.inc()
        return outcome

    def _raised(self, call: _Call, exc: BaseException) -> _Outcome | None:
        span = self.spans.get(call.delivery)
        if span is not None and not isinstance(exc, Defer):  # a join timer not yet due is no failure
            Tracing.failed(span, exc)
        return super()._raised(call, exc)

    async def _failed(self, call: _Call, exc: BaseException) -> _Outcome:
        outcome = await super()._failed(call, exc)
        if isinstance(outcome, _Again):
            if self.metrics is not None:
                self._of(call.envelope.type).retried.inc()
            span = self.spans.get(call.delivery)
            if span is not None:
                span.set_attribute("choreograph.retry_after", outcome.after)
        return outcome

    def _dead(
        self,
        delivery: Delivery,
        envelope: Envelope | None,
        reason: DeadLetterReason,
        handler: Handler | None,
        error: ErrorInfo,
        now: float,
        raw: Any = None,
        *,
        first: tuple[ErrorInfo, float] | None = None,
        publish_failure: bool = True,
    ) -> _Dead:
        outcome = super()._dead(delivery, envelope, reason, handler, error, now, raw,
                                first=first, publish_failure=publish_failure)
        if self.metrics is not None:
            event_type = envelope.type if envelope is not None else delivery.message.type
            self.metrics.dead_lettered.labels(self.service.name, event_type, reason).inc()
        span = self.spans.get(delivery)
        if span is not None:
            span.set_attribute("choreograph.dead_letter_reason", reason)
        return outcome
