"""The push loop of one subscription: fetch from the group, POST, turn the answer into a settlement.

Per delivery: decode → hand it back if the subscription does not deliver its type →
ack at once if the subscription's filters do not match it → skip if the group's inbox has
seen it → handshake (once per URL) → POST in the subscription's content mode, signed → an
*outcome*:

* done: the answer's CloudEvents (if any) become output events with deterministic ids;
  they are published *before* the input is acked, as in the worker;
* retry: after the answer's ``Retry-After`` (capped) or the policy's backoff;
* dead: the dead-letter record of :mod:`choreograph.runtime.records` (plus the HTTP
  ``status`` and the redacted ``url``), and a ``choreograph.failed`` event so compensations run.

The subscriber's URL is written (log lines, errors, records) only through ``redact``, and
every line about an event carries its ids as ``extra=`` (:meth:`PushRunner._event_fields`).

An event of a type the subscription does not list reaches its group when another
subscription of the group - another ambassador's configuration, during a rolling change -
bound it (a group's binding only widens). Acking it would lose it for the ambassadors that
deliver it, so it is handed back under the worker's rule (``records.HANDOVER_ATTEMPTS``,
then a dead letter ``unhandled``). A ``choreograph.failed`` it does not list is acked as
``ignored``, as the worker acks a failure it has no handler for.

The worker's handler runner is not reused as is because its unit of work is a Python
handler; what is reused is everything it is built from: the retry policy, the inbox
store's failure history, the record and failure-event builders, and the transport's
settle verbs. Settling is per delivery rather than batched: a push is bounded by the
receiver's latency, not by broker round trips.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx

from choreograph._clock import SystemClock, backoff, stamp_clock
from choreograph._envelope import Envelope, decode
from choreograph._http_binding import to_http
from choreograph._push_answer import HANDLER, Answer, AnswerTooLarge, answered_events, read_answer
from choreograph._push_http import HandshakeFailed, HandshakeRefused, classify, retry_after
from choreograph._redact import redact
from choreograph._webhook import signature_headers
from choreograph.errors import EmitError, MalformedEnvelope
from choreograph.logs import event_fields
from choreograph.runtime._runner import STOP_GRACE
from choreograph.runtime.records import (
    DeadLetterReason,
    dead_letter_record,
    failure_envelope,
    handover_delay,
    handover_warning,
    internal_error_retry,
    original_envelope,
    to_message,
    unhandled_error,
)
from choreograph.service import FAILED
from choreograph.stores.base import ErrorInfo
from choreograph.transports.base import Delivery, Message, Subscription

if TYPE_CHECKING:
    from choreograph.push import PushAmbassador, PushSubscription
    from choreograph.telemetry import Metrics

log = logging.getLogger("choreograph.push")

USER_AGENT = "choreograph-push/0.1"


@dataclasses.dataclass
class PushStats:
    """Counters of one subscription's pushes (for tests, reports and metrics). ``filtered``:
    events acked without a request because the subscription's filters did not match.
    ``handed_back``: deliveries of a type the subscription does not list, left for an
    ambassador of the group that delivers it. ``ignored``: failure events it does not list."""

    delivered: int = 0
    published: int = 0
    duplicates: int = 0
    ignored: int = 0
    handed_back: int = 0
    filtered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    deferred: int = 0  # put back unpushed for a moment: the inbox could not be asked


@dataclasses.dataclass(slots=True)
class _Done:
    outputs: list[Message]
    mark: bool


@dataclasses.dataclass(slots=True)
class _Again:
    after: float
    deferred: bool = False  # put off, not tried (the inbox could not tell): ``defer``, attempt kept


@dataclasses.dataclass(slots=True)
class _Dead:
    record: dict[str, Any]
    failure: Message | None


_Outcome = _Done | _Again | _Dead


class PushRunner:
    """Consumes ``subscription.group`` and pushes each event to ``subscription.url``."""

    def __init__(self, ambassador: PushAmbassador, subscription: PushSubscription) -> None:
        self.amb = ambassador
        self.sub = subscription
        self.group = subscription.group
        self.source = f"/choreograph/push/{subscription.group}"
        self.stats = PushStats()
        telemetry = ambassador.telemetry
        self.metrics: Metrics | None = telemetry.metrics if telemetry is not None else None
        self.consumer: Subscription | None = None
        self.active: dict[asyncio.Task[None], Delivery] = {}
        self.active_ids: set[str] = set()
        self.slot_free = asyncio.Event()
        self.stopping = False
        self.fetching = False
        self.tasks: list[asyncio.Task[None]] = []
        # outcomes being settled (a push cancelled meanwhile), and the delivery of each
        self.settling: dict[asyncio.Task[None], Delivery] = {}
        self.handed_back_types: set[str] = set()  # types _unsubscribed has warned about

    def _count(self, outcome: str, event_type: str) -> None:
        """One attempt's outcome in the stats and, with telemetry, the metrics."""
        field = {"duplicate": "duplicates"}.get(outcome, outcome)
        setattr(self.stats, field, getattr(self.stats, field) + 1)
        if self.metrics is not None:
            self.metrics.push_outcomes.labels(self.group, event_type, outcome).inc()

    async def start(self) -> None:
        self.consumer = await self.amb.transport.subscribe(self.group, sorted(self.sub.types))
        # on a test's clock its inbox store dates what it records on it (see _clock.stamp_clock)
        context = contextvars.copy_context()
        if type(self.amb.clock) is not SystemClock:
            context.run(stamp_clock.set, self.amb.clock)
        self.tasks = [
            asyncio.create_task(self._fetch_loop(), name=f"choreograph-push-fetch-{self.group}", context=context),
            asyncio.create_task(self._touch_loop(), name=f"choreograph-push-touch-{self.group}", context=context),
        ]

    # -- fetching ---------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self.consumer is not None
        while not self.stopping:
            free = self.amb.concurrency - len(self.active)
            if free <= 0:
                self.slot_free.clear()
                await self.slot_free.wait()
                continue
            self.fetching = True
            try:
                batch = await self.consumer.fetch(free, timeout=self.amb.poll_interval)
            except asyncio.CancelledError:
                if self.stopping:
                    break  # stop() interrupts an idle fetch; fetch is cancel-safe
                raise
            except Exception as exc:  # broker down: back off, the client reconnects
                if self.stopping:
                    break
                log.warning("fetch failed for %s: %s; retrying", self.group, exc)
                await backoff(self.amb.clock, 0.5)
                continue
            finally:
                self.fetching = False
            for delivery in batch:
                if delivery.message.id in self.active_ids:
                    # Its lease expired while the push is still in flight: come back later,
                    # the inbox then tells whether the push in flight succeeded. Deferred, not
                    # retried: this copy was not tried (an attempt per put-back spent its retries).
                    try:
                        await delivery.defer(1.0)
                    except Exception as exc:  # out of the loop, it ended it: nothing fetched again
                        log.warning("could not put back %r (its push is in flight): %s; it returns after "
                                    "its lease", delivery, exc)
                    continue
                self.active_ids.add(delivery.message.id)
                task = asyncio.create_task(self._push(delivery))
                self.active[task] = delivery
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        delivery = self.active.pop(task, None)
        if delivery is not None:
            self.active_ids.discard(delivery.message.id)
        self.slot_free.set()
        if not task.cancelled() and task.exception() is not None:  # a bug in us: the lease redelivers it
            log.error("internal error pushing %r", delivery, exc_info=task.exception())

    def _settled(self, task: asyncio.Task[None]) -> None:
        self.settling.pop(task, None)

    async def _touch_loop(self) -> None:
        """Extend the leases of the pushes in flight and of the outcomes being settled, every
        third of a lease, until :meth:`stop` has drained them: a push that outlives its lease
        during the drain (``drain_timeout`` of ``inf``, a slow receiver) was pushed again by
        another ambassador of the group while the first one still waited for its answer."""
        interval = max(0.05, self.amb.transport.lease / 3)
        while True:
            await asyncio.sleep(interval)
            # a push being settled is in both (its task waits for its settlement): touched once
            held = {id(delivery): delivery for delivery in [*self.active.values(), *self.settling.values()]}
            for delivery in held.values():
                try:
                    await delivery.touch()
                except Exception as exc:
                    log.warning("could not extend the lease of %r: %s", delivery, exc)

    # -- one delivery -----------------------------------------------------------------

    async def _push(self, delivery: Delivery) -> None:
        metrics = self.metrics
        if metrics is not None:
            metrics.push_in_flight.labels(self.group).inc()
        try:
            try:
                try:
                    outcome = await self._attempt(delivery)
                except Exception as exc:  # a bug below the push (not the endpoint's answer)
                    outcome = self._internal_error(delivery, exc)
            except asyncio.CancelledError:
                # Shutdown ran out of drain time: give the delivery back at once.
                self._count("released", delivery.message.type)
                await asyncio.shield(delivery.retry(0.0))
                raise
            # The outcome is known (the receiver may have the event): settled even when the drain
            # runs out now - released instead, the event was pushed again by the next ambassador.
            # stop() gives what is still settling STOP_GRACE, then leaves it to the lease.
            settling = asyncio.create_task(self._settle(delivery, outcome))
            self.settling[settling] = delivery
            settling.add_done_callback(self._settled)
            await asyncio.shield(settling)
        finally:
            if metrics is not None:
                metrics.push_in_flight.labels(self.group).dec()

    async def _attempt(self, delivery: Delivery) -> _Outcome:
        amb, sub = self.amb, self.sub
        now = amb.clock.time()
        body = delivery.message.body
        try:
            envelope = decode(body)
        except MalformedEnvelope as exc:
            error = ErrorInfo.from_exception(exc, limit=0)
            return self._dead(delivery, None, "malformed", error, now, publish_failure=False)
        if envelope.hops > amb.max_hops:
            error = ErrorInfo("LoopDetected", f"hops={envelope.hops} exceeds the limit of {amb.max_hops}")
            return self._dead(delivery, envelope, "loop_detected", error, now, publish_failure=False)
        if envelope.type not in sub.types:
            if envelope.type == FAILED:
                self._count("ignored", envelope.type)
                return _Done([], mark=False)
            return self._unsubscribed(delivery, envelope, now)
        if sub.filter is not None and not sub.filter.matches_envelope(envelope):
            # Acked, not marked: the same id redelivered is filtered the same way, no inbox needed.
            self._count("filtered", envelope.type)
            log.debug("%s: event %s does not match the filters (%s); acked without a request",
                      self.group, envelope.id, sub.filter.text, extra=self._event_fields(envelope, delivery.attempt))
            return _Done([], mark=False)
        try:
            if await amb.store.seen(self.group, [envelope.id]):
                self._count("duplicate", envelope.type)
                # A retry is marked again, which forgets its copy's failure history: another copy
                # (another ambassador's) was delivered and marked while this one failed (as the worker)
                return _Done([], mark=delivery.attempt > 1)
        except Exception as exc:
            log.error("inbox unavailable for %s: %s; retrying %s later", self.group, exc, envelope.id,
                      extra=self._event_fields(envelope, delivery.attempt))
            self._count("deferred", envelope.type)
            return _Again(1.0, deferred=True)  # nothing was sent: an attempt per second of the outage spent its retries

        try:
            headers, payload = to_http(envelope, sub.mode, body)
        except MalformedEnvelope as exc:
            # What binary mode cannot carry (a datacontenttype no Content-Type header can hold, a
            # charset that cannot encode the data): no retry sends it, nothing to ask the receiver.
            return await self._rejected(delivery, envelope, ErrorInfo.from_exception(exc, limit=0), now, status=None)
        try:
            response = await self._request(envelope, headers, payload)
        except HandshakeRefused as exc:
            return await self._rejected(delivery, envelope, ErrorInfo("HandshakeRefused", str(exc)), now,
                                        status=exc.status)
        except HandshakeFailed as exc:
            return await self._failed(delivery, envelope, ErrorInfo("HandshakeFailed", str(exc)), now,
                                      status=exc.status, after=exc.after)
        except AnswerTooLarge as exc:
            error = ErrorInfo("AnswerTooLarge", f"POST {redact(sub.url)} answered {exc.status} with {exc}")
            return await self._failed(delivery, envelope, error, now, status=exc.status, after=None)
        except (TimeoutError, httpx.TimeoutException):
            error = ErrorInfo("Timeout", f"{redact(sub.url)}: no answer within {sub.timeout}s")
            return await self._failed(delivery, envelope, error, now, status=None, after=None)
        except httpx.HTTPError as exc:  # its text may quote the URL (an HTTPStatusError's does): redacted too
            error = ErrorInfo(type(exc).__qualname__, f"{redact(sub.url)}: {redact(str(exc) or type(exc).__name__)}")
            return await self._failed(delivery, envelope, error, now, status=None, after=None)

        status = response.status
        verdict = classify(status)
        if verdict == "done":
            try:
                outputs = answered_events(envelope, response, self.group, self.sub.emits, self.amb.clock)
            except (MalformedEnvelope, EmitError) as exc:
                error = ErrorInfo("InvalidResponse", f"POST {redact(sub.url)} answered {status} with {exc}")
                return await self._rejected(delivery, envelope, error, now, status=status)
            self._count("delivered", envelope.type)
            self.stats.published += len(outputs)
            return _Done(outputs, mark=True)
        excerpt = response.excerpt()
        message = f"POST {redact(sub.url)} answered {status} {response.reason}" + (f": {excerpt}" if excerpt else "")
        error = ErrorInfo("HTTPStatusError", message)
        if verdict == "permanent":
            return await self._rejected(delivery, envelope, error, now, status=status)
        # A date is read against the time of the answer, not of the request: a slow receiver's
        # "in 5 s" was waited the time it took to answer on top
        after = retry_after(response.headers.get("retry-after"), amb.clock.time())
        return await self._failed(delivery, envelope, error, now, status=status, after=after)

    async def _post(self, envelope: Envelope, headers: dict[str, str], payload: bytes) -> Answer:
        sub, client = self.sub, self.amb.client
        headers = {**sub.headers, **headers, "user-agent": USER_AGENT}
        if sub.secret:
            headers.update(signature_headers(sub.secret, envelope.id, payload))
        request = client.build_request("POST", sub.url, content=payload, headers=headers, timeout=sub.timeout)
        async with asyncio.timeout(sub.timeout):  # a bound on the whole exchange, not per read
            # never followed, whatever the client given does: a 3xx is permanent (the outcome table),
            # and the signed body and the subscription's headers go to the URL configured, no other
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                content = await read_answer(response, sub.max_response_body)
            finally:
                await response.aclose()
        return Answer(response.status_code, response.reason_phrase, response.headers, content,
                       response.encoding or "utf-8")

    async def _request(self, envelope: Envelope, headers: dict[str, str], payload: bytes) -> Answer:
        """Handshake (once per URL) and POST; timed when metrics are on."""
        sub, metrics = self.sub, self.metrics
        started = time.perf_counter()
        try:
            if sub.handshake:
                # with the subscription's headers, as the POST: a receiver checking an
                # Authorization on every request refused the handshake without it
                await self.amb.handshakes.ensure(sub.url, sub.timeout, {**sub.headers, "user-agent": USER_AGENT})
            return await self._post(envelope, headers, payload)
        finally:
            if metrics is not None:
                metrics.push_duration.labels(self.group).observe(time.perf_counter() - started)

    def _unsubscribed(self, delivery: Delivery, envelope: Envelope, now: float) -> _Outcome:
        """``delivery`` is of a type this subscription does not list: the group is bound to it
        because another subscription of the group did. Hand it back for an ambassador that
        delivers it; after ``HANDOVER_ATTEMPTS`` deliveries, dead-letter it ``unhandled``
        (no failure event, no inbox mark), as the worker does."""
        after = handover_delay(delivery.attempt)
        consumer = f"push subscription {self.group!r} (to {redact(self.sub.url)})"
        if after is not None:
            if envelope.type not in self.handed_back_types:
                self.handed_back_types.add(envelope.type)
                log.warning("%s", handover_warning(self.group, envelope.type, consumer),
                            extra=self._event_fields(envelope, delivery.attempt))
            self._count("handed_back", envelope.type)
            return _Again(after)
        error = unhandled_error(self.group, envelope.type, delivery.attempt, consumer, self.sub.types)
        return self._dead(delivery, envelope, "unhandled", error, now, publish_failure=False)

    def _internal_error(self, delivery: Delivery, exc: Exception) -> _Outcome:
        """Preparing or making the push raised where nothing should: a failed attempt under the
        subscription's retry policy, then a dead letter ``internal_error`` with the original
        body - a message that always trips it is not redelivered at every lease for ever."""
        log.error("internal error pushing %r (attempt %d)", delivery, delivery.attempt, exc_info=exc,
                  extra=self._delivery_fields(delivery))
        after = internal_error_retry(self.sub.retry, delivery.attempt, self.amb.rng)
        if after is not None:
            self._count("retried", delivery.message.type)
            return _Again(after)
        return self._dead(delivery, None, "internal_error", ErrorInfo.from_exception(exc), self.amb.clock.time(),
                          publish_failure=False)

    async def _rejected(
        self, delivery: Delivery, envelope: Envelope, error: ErrorInfo, now: float, *, status: int | None,
    ) -> _Dead:
        """Dead-letter ``rejected`` at once; after failed attempts its record keeps the first one's
        error and time (on a first attempt there is none to look up)."""
        first = None
        if delivery.attempt > 1:
            try:
                first = await self.amb.store.record_failure(self.group, envelope.id, error, now)
            except Exception as exc:  # the record loses its first error, the delivery is not lost
                log.warning("inbox unavailable for %s: %s", self.group, exc,
                            extra=self._event_fields(envelope, delivery.attempt))
        return self._dead(delivery, envelope, "rejected", error, now, status=status, first=first)

    async def _failed(
        self, delivery: Delivery, envelope: Envelope, error: ErrorInfo, now: float, *,
        status: int | None, after: float | None,
    ) -> _Outcome:
        sub = self.sub
        try:
            first = await self.amb.store.record_failure(self.group, envelope.id, error, now)
        except Exception as exc:  # the record loses its first error, the delivery is not lost
            log.warning("inbox unavailable for %s: %s", self.group, exc,
                        extra=self._event_fields(envelope, delivery.attempt))
            first = (error, now)
        if after is not None:
            after = min(after, sub.max_retry_after)
        give_up = sub.retry.give_up(delivery.attempt, age=now - first[1], not_before=after)
        if give_up is not None:
            return self._dead(delivery, envelope, give_up, error, now, status=status, first=first)
        if after is not None:
            wait = after
        else:
            wait = sub.retry.backoff(delivery.attempt, self.amb.rng)
        self._count("retried", envelope.type)
        log.warning("push of %s to %s failed (attempt %d), retrying in %.2fs: %s",
                    envelope.id, redact(sub.url), delivery.attempt, wait, error.message,
                    extra=self._event_fields(envelope, delivery.attempt))
        return _Again(wait)

    def _dead(
        self, delivery: Delivery, envelope: Envelope | None, reason: DeadLetterReason, error: ErrorInfo,
        now: float, *, status: int | None = None, first: tuple[ErrorInfo, float] | None = None,
        publish_failure: bool = True,
    ) -> _Dead:
        first_error, first_at = first or (error, now)
        record = dead_letter_record(
            reason=reason, service=self.group, handler=HANDLER, group=self.group, attempts=delivery.attempt,
            first_error=first_error, last_error=error, first_attempt_at=first_at, last_attempt_at=now,
            envelope=original_envelope(delivery.message.body),
        )
        record["url"] = redact(self.sub.url)  # the record travels: choreograph.failed, the journal, trace
        record["status"] = status
        failure = None
        if envelope is not None and publish_failure:
            failure = to_message(failure_envelope(envelope, record, service=self.group, handler=HANDLER,
                                                  source=self.source,
                                                  time=None if type(self.amb.clock) is SystemClock else now))
        self._count("dead_lettered", envelope.type if envelope is not None else "")
        log.error("dead-lettering %s in %s: %s after %d attempt(s): %s",
                  delivery.message.id, self.group, reason, delivery.attempt, error.message,
                  extra=None if envelope is None else self._event_fields(envelope, delivery.attempt))
        return _Dead(record, failure)

    def _delivery_fields(self, delivery: Delivery) -> dict[str, Any]:
        """:meth:`_event_fields` of a delivery whose body may not decode (then its id and type only)."""
        try:
            return self._event_fields(decode(delivery.message.body), delivery.attempt)
        except Exception:  # noqa: BLE001 - a log line's fields must not fail the settlement
            return {"service": self.group, "handler": HANDLER, "group": self.group, "event_id": delivery.message.id,
                    "event_type": delivery.message.type, "attempt": delivery.attempt}

    def _event_fields(self, envelope: Envelope, attempt: int) -> dict[str, Any]:
        """The pushed event's log fields, as the worker's lines about an event carry them
        (:mod:`choreograph.logs`): no handler context is current in the ambassador, so they are
        given with ``extra=``. ``service`` is the group (as in the dead-letter record)."""
        return {**event_fields(envelope, self.group, HANDLER, attempt), "group": self.group}

    # -- settling ---------------------------------------------------------------------

    async def _settle(self, delivery: Delivery, outcome: _Outcome) -> None:
        """Apply ``outcome`` until it succeeds. While stopping, for up to ``STOP_GRACE`` after its
        first failure, as the worker's settle task (a broker blip during the drain left a push
        answered 2xx unsettled at its first failure, and another ambassador pushed it again after
        its lease); then it is left to the lease. Those waits are in real time: nothing moves a
        test's clock while the ambassador stops."""
        delay = 0.05
        loop = asyncio.get_running_loop()
        give_up_by: float | None = None
        while True:
            try:
                await self._apply(delivery, outcome)
                return
            except Exception as exc:  # broker or store down: keep the outcome, try again
                if self.stopping:
                    give_up_by = give_up_by or loop.time() + STOP_GRACE
                    if loop.time() + delay > give_up_by:
                        log.error("settling %r failed during shutdown (%s); its lease will redeliver it",
                                  delivery, exc)
                        return
                    log.error("settling %r failed: %s; retrying", delivery, exc)
                    await asyncio.sleep(delay)
                else:
                    log.error("settling %r failed: %s; retrying", delivery, exc)
                    await backoff(self.amb.clock, delay)
                delay = min(delay * 2, 5.0)

    async def _apply(self, delivery: Delivery, outcome: _Outcome) -> None:
        transport, store = self.amb.transport, self.amb.store
        message_id = delivery.message.id
        if isinstance(outcome, _Done):
            if outcome.outputs:
                await transport.publish(outcome.outputs)  # outputs durable before the ack
            if outcome.mark:
                await store.mark(self.group, [message_id])
            await delivery.ack()
        elif isinstance(outcome, _Again):
            if outcome.deferred:
                await delivery.defer(outcome.after)
            else:
                await delivery.retry(outcome.after)
        else:
            if outcome.failure is not None:
                await transport.publish([outcome.failure])
            await store.clear_failures(self.group, [message_id])
            await delivery.dead_letter(outcome.record)

    # -- stopping ---------------------------------------------------------------------

    async def stop(self, drain_timeout: float) -> None:
        self.stopping = True
        self.slot_free.set()
        if not self.tasks:  # never started (the ambassador's start failed before it)
            if self.consumer is not None:
                await self.consumer.close()
            return
        fetch, touch = self.tasks
        if self.fetching:
            fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        try:
            if self.active:  # their leases still touched: another ambassador must not push them meanwhile
                _, pending = await asyncio.wait(list(self.active), timeout=drain_timeout)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
            if self.settling:  # pushes cancelled while their outcome was settled: bounded, as the worker's
                _, unsettled = await asyncio.wait(list(self.settling), timeout=STOP_GRACE)
                if unsettled:
                    log.warning("%s: outcomes still unsettled %.0fs after the drain (broker unreachable?); "
                                "their deliveries return after the lease", self.group, STOP_GRACE)
                    for task in unsettled:
                        task.cancel()
                    await asyncio.wait(unsettled)
        finally:  # touched until every push in hand has settled (or been released)
            touch.cancel()
            await asyncio.gather(touch, return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.close()
