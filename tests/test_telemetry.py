"""Telemetry: a span per handler attempt in one trace per transaction, Prometheus counters, and nothing when off."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from choreograph import App, Context, Event, Publisher, Reject, RetryPolicy, Service, Worker, decode
from choreograph._envelope import Envelope
from choreograph.gateway import Gateway, Route
from choreograph.journal import Journal
from choreograph.runtime.outbox import transaction
from choreograph.runtime.records import to_message
from choreograph.sagas import timed_out
from choreograph.stores.state import open_database
from choreograph.telemetry import Metrics, Telemetry, transaction_ids
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports.base import Message
from tests._procs import stop
from tests._waiting import until

ROOT = Path(__file__).resolve().parents[1]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Placed(Event, type="test.telemetry.placed"):
    order_id: str


class Charged(Event, type="test.telemetry.charged"):
    order_id: str


class Shipped(Event, type="test.telemetry.shipped"):
    order_id: str


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def telemetry(exporter: InMemorySpanExporter, registry: CollectorRegistry) -> Telemetry:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(tracer_provider=provider, registry=registry)


@pytest.fixture
def bus() -> MemoryTransport:
    return MemoryTransport(clock=VirtualClock())


def three_hops() -> tuple[list[Service], list[Envelope]]:
    """payment -> shipping -> notify; notify records the envelopes it receives."""
    payment, shipping, notify = Service("payment"), Service("shipping"), Service("notify")
    received: list[Envelope] = []

    @payment.on(Placed)
    async def charge(order: Placed) -> Charged:
        return Charged(order_id=order.order_id)

    @shipping.on(Charged)
    async def ship(charged: Charged) -> Shipped:
        return Shipped(order_id=charged.order_id)

    @notify.on(Shipped)
    async def tell(shipped: Shipped, ctx: Context) -> None:
        received.append(ctx.envelope)

    return [payment, shipping, notify], received


def consumer_spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans() if span.kind is SpanKind.CONSUMER}


def names_span(traceparent: str | None, span: ReadableSpan) -> bool:
    """Whether a W3C ``traceparent`` names ``span`` (version-trace-span-flags; the flags may vary)."""
    assert traceparent is not None and span.context is not None
    version, trace_id, span_id, flags = traceparent.split("-")
    return (version, trace_id, span_id) == ("00", f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_a_three_hop_chain_is_one_trace_with_each_hop_the_child_of_the_one_before(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry
) -> None:
    services, received = three_hops()
    async with Worker(services, bus, telemetry=telemetry):
        [placed] = await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
    spans = consumer_spans(exporter)
    assert set(spans) == {"payment handle test.telemetry.placed", "shipping handle test.telemetry.charged",
                          "notify handle test.telemetry.shipped"}
    pay = spans["payment handle test.telemetry.placed"]
    ship = spans["shipping handle test.telemetry.charged"]
    tell = spans["notify handle test.telemetry.shipped"]
    assert pay.context is not None and ship.context is not None and tell.context is not None
    assert len({pay.context.trace_id, ship.context.trace_id, tell.context.trace_id}) == 1
    # Published without telemetry: the trace is the one named by the transaction's correlation id.
    assert pay.parent is not None and pay.parent.is_remote
    assert (pay.parent.trace_id, pay.parent.span_id) == transaction_ids(placed.id)
    assert pay.context.trace_id == uuid.UUID(placed.id).int
    assert ship.parent is not None and ship.parent.span_id == pay.context.span_id
    assert tell.parent is not None and tell.parent.span_id == ship.context.span_id
    [shipped] = received
    assert names_span(shipped.traceparent, ship)
    attributes = dict(pay.attributes or {})
    assert str(attributes.pop("choreograph.handler")).endswith("charge")
    assert attributes == {
        "messaging.system": "memory",
        "messaging.operation.type": "process",
        "messaging.operation.name": "handle",
        "messaging.destination.name": "test.telemetry.placed",
        "messaging.message.id": placed.id,
        "messaging.message.conversation_id": placed.id,
        "messaging.consumer.group.name": "payment",
        "choreograph.correlation_id": placed.id,
        "choreograph.service": "payment",
        "choreograph.attempt": 1,
    }
    assert all(span.status.status_code is StatusCode.UNSET for span in spans.values())


async def test_the_first_hop_continues_the_traceparent_it_arrives_with(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry
) -> None:
    services, _ = three_hops()
    envelope = Envelope(id="e-1", source="/test", type=Placed.event_type(), data={"order_id": "o-1"},
                        traceparent=TRACEPARENT)
    async with Worker(services, bus, telemetry=telemetry):
        await bus.publish([to_message(envelope)])
        await settled(bus)
    pay = consumer_spans(exporter)["payment handle test.telemetry.placed"]
    assert pay.parent is not None and pay.parent.is_remote
    assert (pay.parent.trace_id, pay.parent.span_id) == (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7)


async def test_a_publisher_with_telemetry_starts_the_trace_with_a_producer_span(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry, registry: CollectorRegistry
) -> None:
    services, _ = three_hops()
    async with Worker(services, bus, telemetry=telemetry):
        [placed] = await Publisher(bus, telemetry=telemetry).publish(Placed(order_id="o-1"))
        await settled(bus)
    [producer] = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.PRODUCER]
    pay = consumer_spans(exporter)["payment handle test.telemetry.placed"]
    assert producer.name == "publish test.telemetry.placed" and producer.parent is None
    assert producer.context is not None and pay.parent is not None
    assert pay.parent.span_id == producer.context.span_id
    assert names_span(placed.traceparent, producer)
    assert sample(registry, "choreograph_events_published_total", event_type="test.telemetry.placed") == 1


async def test_a_publisher_inside_a_span_publishes_as_its_child(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry
) -> None:
    assert telemetry.tracer is not None
    with telemetry.tracer.start_as_current_span("checkout") as outer:
        await Publisher(bus, telemetry=telemetry).publish(Placed(order_id="o-1"))
    [producer] = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.PRODUCER]
    assert producer.parent is not None and producer.parent.span_id == outer.get_span_context().span_id


async def test_a_transaction_with_telemetry_publishes_under_a_producer_span_as_a_publisher_does(
    tmp_path: Path, exporter: InMemorySpanExporter, telemetry: Telemetry, registry: CollectorRegistry
) -> None:
    """``transaction(service)`` outside a handler wrote its events to the outbox with no
    ``traceparent`` and no span, whatever span was current (an HTTP request's): where
    ``Publisher(telemetry=)`` starts the trace, the transaction's first hop was in a trace of
    its own, derived from the correlation id. Given ``telemetry=``, each event committed gets a
    PRODUCER span, a child of the current span, and the row the relay sends names it; a block
    that rolls back makes none."""
    assert telemetry.tracer is not None
    package = Service("package", database=f"sqlite:///{tmp_path}/package.db")
    with pytest.raises(RuntimeError):
        async with transaction(package, telemetry=telemetry) as tx:
            tx.publish(Placed(order_id="rolled-back"))
            raise RuntimeError("abort")
    with telemetry.tracer.start_as_current_span("checkout") as outer:
        async with transaction(package, telemetry=telemetry) as tx:
            placed = tx.publish(Placed(order_id="o-1"))
    sent: list[Envelope] = []

    async def relay(messages: list[Message]) -> None:
        sent.extend(decode(message.body) for message in messages)

    async with open_database(package.database) as db:
        await db.relay_pass("package", "test", 10, relay)
    [producer] = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.PRODUCER]
    assert producer.name == "publish test.telemetry.placed"
    assert producer.parent is not None and producer.parent.span_id == outer.get_span_context().span_id
    assert [envelope.id for envelope in sent] == [placed.id]
    assert names_span(placed.traceparent, producer) and names_span(sent[0].traceparent, producer)
    assert sample(registry, "choreograph_events_published_total", event_type="test.telemetry.placed") == 1


async def test_a_failed_attempt_then_a_success_are_two_spans_the_first_with_error_status(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry, registry: CollectorRegistry
) -> None:
    svc = Service("flaky", retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False))

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("gateway timed out")

    async with Worker([svc], bus, telemetry=telemetry):
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
    first, second = sorted(exporter.get_finished_spans(), key=lambda span: span.start_time or 0)
    assert (first.attributes or {})["choreograph.attempt"] == 1
    assert (second.attributes or {})["choreograph.attempt"] == 2
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "RuntimeError: gateway timed out"
    assert [event.name for event in first.events] == ["exception"]
    assert (first.events[0].attributes or {})["exception.message"] == "gateway timed out"
    assert (first.attributes or {})["choreograph.retry_after"] == 1.0
    assert second.status.status_code is StatusCode.UNSET
    assert first.context is not None and second.context is not None
    assert first.context.trace_id == second.context.trace_id  # retries stay in the transaction's trace
    assert first.parent == second.parent  # ... as siblings
    labels = {"service": "flaky", "event_type": "test.telemetry.placed"}
    assert sample(registry, "choreograph_events_retried_total", **labels) == 1
    assert sample(registry, "choreograph_events_handled_total", **labels) == 1
    assert sample(registry, "choreograph_handler_duration_seconds_count", **labels) == 2
    assert sample(registry, "choreograph_handlers_in_flight", service="flaky") == 0


async def test_a_dead_lettered_event_counts_by_reason_and_its_failure_event_stays_in_the_trace(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry, registry: CollectorRegistry
) -> None:
    svc = Service("strict")
    watcher = Service("watch")
    failures: list[Envelope] = []

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        raise Reject("amount must be positive")

    @watcher.on_failure(Placed)
    async def compensate(failure: object, ctx: Context) -> None:
        failures.append(ctx.envelope)

    async with Worker([svc, watcher], bus, telemetry=telemetry):
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
    assert sample(registry, "choreograph_events_dead_lettered_total", service="strict",
                  event_type="test.telemetry.placed", reason="rejected") == 1
    spans = consumer_spans(exporter)
    rejected = spans["strict handle test.telemetry.placed"]
    assert rejected.status.status_code is StatusCode.ERROR
    assert (rejected.attributes or {})["choreograph.dead_letter_reason"] == "rejected"
    compensation = spans["watch handle choreograph.failed"]
    assert rejected.context is not None and compensation.parent is not None
    assert compensation.parent.span_id == rejected.context.span_id
    [failure] = failures
    assert names_span(failure.traceparent, rejected)


async def test_a_compensation_of_a_timeout_stays_in_the_transaction_s_trace(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry
) -> None:
    """The journal's ``choreograph.timedout`` continues the trace of the transaction's last event:
    it carried no ``traceparent``, so the compensation it triggers (and what that emits) landed
    in the trace derived from the correlation id, not in the publisher's."""
    inventory = Service("inventory")

    @inventory.on(Placed)
    async def reserve(order: Placed) -> Charged:
        return Charged(order_id=order.order_id)

    @inventory.compensate(Charged, on=[timed_out()])
    async def release(charged: Charged, cause: object) -> Shipped:
        return Shipped(order_id=charged.order_id)

    app = App("timed", [inventory], ingress=[Placed], terminal={Shipped: "failed"})
    async with Journal.from_app(app, "memory://", transport=bus, scan_interval=3600) as journal:
        async with Worker([inventory], bus, telemetry=telemetry):
            [placed] = await Publisher(bus, telemetry=telemetry).publish(
                Placed(order_id="o-1"), deadline=timedelta(seconds=30))
            await settled(bus)
            bus.clock.advance(31)
            assert await journal.check_deadlines() == [placed.id]
            await settled(bus)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    published, compensated = spans["publish test.telemetry.placed"], spans["inventory handle choreograph.timedout"]
    assert published.context is not None and compensated.context is not None
    assert compensated.context.trace_id == published.context.trace_id
    # a child of the span that emitted the last event recorded (Charged: reserve's), as its causation says
    reserved = spans["inventory handle test.telemetry.placed"].context
    assert compensated.parent is not None and reserved is not None
    assert compensated.parent.span_id == reserved.span_id


async def test_a_duplicate_skipped_by_the_inbox_counts_and_runs_no_span(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry, registry: CollectorRegistry
) -> None:
    svc = Service("dedupe")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        return None

    async with Worker([svc], bus, telemetry=telemetry) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Placed(order_id="a"), ids=["same"])
        await settled(bus)
        await publisher.publish(Placed(order_id="a"), ids=["same"])
        await settled(bus)
    assert worker.stats("dedupe").duplicates == 1
    assert sample(registry, "choreograph_events_duplicates_total", service="dedupe",
                  event_type="test.telemetry.placed") == 1
    assert sample(registry, "choreograph_events_handled_total", service="dedupe",
                  event_type="test.telemetry.placed") == 1
    assert len(exporter.get_finished_spans()) == 1


async def test_an_event_filtered_out_by_where_counts_and_runs_no_span(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry, registry: CollectorRegistry
) -> None:
    svc = Service("eu-only")

    @svc.on(Placed, where="subject = 'eu'")
    async def handle(order: Placed) -> None:
        return None

    async with Worker([svc], bus, telemetry=telemetry) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Placed(order_id="a"), subject="eu")
        await publisher.publish(Placed(order_id="b"), subject="us")
        await publisher.publish(Placed(order_id="c"), subject="us")
        await settled(bus)
    assert worker.stats("eu-only").filtered == 2
    assert sample(registry, "choreograph_events_filtered_total", service="eu-only",
                  event_type="test.telemetry.placed") == 2
    assert sample(registry, "choreograph_events_handled_total", service="eu-only",
                  event_type="test.telemetry.placed") == 1
    assert len(exporter.get_finished_spans()) == 1


async def test_an_event_of_a_type_this_version_does_not_subscribe_to_counts_as_handed_back(
    bus: MemoryTransport, telemetry: Telemetry, registry: CollectorRegistry
) -> None:
    svc = Service("payments")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        return None

    class Refund(Event, type="test.telemetry.refund"):
        order_id: str

    async with Worker([svc], bus, telemetry=telemetry) as worker:
        await (await bus.subscribe("payments", [Refund.event_type()])).close()  # a newer version's binding
        await Publisher(bus).publish(Refund(order_id="a"))
        await until(lambda: worker.stats("payments").handed_back == 1)
    assert sample(registry, "choreograph_events_handed_back_total", service="payments",
                  event_type="test.telemetry.refund") == 1


async def test_a_service_with_a_database_emits_through_its_outbox_under_the_handler_span(
    tmp_path: Path, exporter: InMemorySpanExporter, telemetry: Telemetry, registry: CollectorRegistry
) -> None:
    bus = MemoryTransport()
    payment = Service("payment", database=f"sqlite:///{tmp_path}/payment.db")
    shipped: list[Envelope] = []
    sink = Service("sink")

    @payment.on(Placed)
    async def charge(order: Placed, ctx: Context) -> Charged:
        async with ctx.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS charges (id TEXT PRIMARY KEY)")
            await tx.execute("INSERT INTO charges VALUES ($1)", order.order_id)
        return Charged(order_id=order.order_id)

    @sink.on(Charged)
    async def record(charged: Charged, ctx: Context) -> None:
        shipped.append(ctx.envelope)

    async with Worker([payment, sink], bus, telemetry=telemetry):
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
        for _ in range(6000):  # the relay publishes after the commit, on its own task (up to 30 s)
            if shipped:
                break
            await asyncio.sleep(0.005)
            await settled(bus)
    spans = consumer_spans(exporter)
    pay, rec = spans["payment handle test.telemetry.placed"], spans["sink handle test.telemetry.charged"]
    assert pay.context is not None and rec.parent is not None and rec.parent.span_id == pay.context.span_id
    assert sample(registry, "choreograph_events_handled_total", service="payment",
                  event_type="test.telemetry.placed") == 1
    assert sample(registry, "choreograph_outbox_pending", service="payment") is not None


async def test_telemetry_off_records_no_span_and_passes_the_traceparent_through_unchanged(
    bus: MemoryTransport, global_exporter: InMemorySpanExporter
) -> None:
    services, received = three_hops()
    envelope = Envelope(id="e-1", source="/test", type=Placed.event_type(), data={"order_id": "o-1"},
                        traceparent=TRACEPARENT, tracestate="k=v")
    async with Worker(services, bus) as worker:
        await bus.publish([to_message(envelope)])
        [published] = await Publisher(bus).publish(Placed(order_id="o-2"))
        await settled(bus)
    assert worker.stats().handled == 6
    assert global_exporter.get_finished_spans() == ()
    assert published.traceparent is None  # as before telemetry existed: a publisher sets none
    by_correlation = {env.correlationid: env for env in received}
    assert by_correlation["e-1"].traceparent == TRACEPARENT and by_correlation["e-1"].tracestate == "k=v"
    assert by_correlation[published.id].traceparent is None


async def test_telemetry_without_a_provider_uses_the_global_one(
    bus: MemoryTransport, global_exporter: InMemorySpanExporter, registry: CollectorRegistry
) -> None:
    services, _ = three_hops()
    async with Worker(services, bus, telemetry=Telemetry(registry=registry)):
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
    assert len(consumer_spans(global_exporter)) == 3


@pytest.mark.parametrize("header", [TRACEPARENT, None])
async def test_the_gateway_publishes_under_a_producer_span_continuing_the_requests_traceparent(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry, header: str | None
) -> None:
    gateway = Gateway([Route("POST", "/orders", Placed)], broker=bus, telemetry=telemetry)
    probe = await bus.subscribe("probe", None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.asgi()), base_url="http://gw") as client:
        response = await client.post("/orders", json={"order_id": "o-1"},
                                     headers={"traceparent": header} if header else {})
    assert response.status_code == 202
    [producer] = exporter.get_finished_spans()
    assert producer.kind is SpanKind.PRODUCER and producer.name == "publish test.telemetry.placed"
    if header is None:
        assert producer.parent is None
    else:
        assert producer.parent is not None and producer.parent.is_remote
        assert (producer.parent.trace_id, producer.parent.span_id) == (0x4BF92F3577B34DA6A3CE929D0E0E4736,
                                                                       0x00F067AA0BA902B7)
    [delivery] = await probe.fetch(1, timeout=0)
    assert names_span(decode(delivery.message.body).traceparent, producer)


async def test_the_gateway_reads_repeated_trace_headers_as_w3c_trace_context_says(
    bus: MemoryTransport, exporter: InMemorySpanExporter, telemetry: Telemetry
) -> None:
    """Two ``tracestate`` headers are one list (only the first was kept); two ``traceparent``
    headers are invalid, so a new trace (the first was continued)."""
    gateway = Gateway([Route("POST", "/orders", Placed)], broker=bus, telemetry=telemetry)
    probe = await bus.subscribe("probe", None)
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.asgi()), base_url="http://gw") as client:
        states = await client.post("/orders", json={"order_id": "o-1"}, headers=httpx.Headers(
            [("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2,c=3")]))
        parents = await client.post("/orders", json={"order_id": "o-2"}, headers=httpx.Headers(
            [("traceparent", TRACEPARENT), ("traceparent", other)]))
    assert states.status_code == parents.status_code == 202
    combined, restarted = [decode(delivery.message.body) for delivery in await probe.fetch(2, timeout=0)]
    assert combined.traceparent is not None and combined.traceparent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert combined.tracestate == "a=1,b=2,c=3"
    first, second = sorted(exporter.get_finished_spans(), key=lambda span: span.start_time or 0)
    assert second.parent is None and second.context is not None
    assert second.context.trace_id not in (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x11111111111111111111111111111111)
    assert names_span(restarted.traceparent, second)


async def test_the_gateway_without_telemetry_sets_no_traceparent(bus: MemoryTransport) -> None:
    gateway = Gateway([Route("POST", "/orders", Placed)], broker=bus)
    probe = await bus.subscribe("probe", None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.asgi()), base_url="http://gw") as client:
        response = await client.post("/orders", json={"order_id": "o-1"}, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 202
    [delivery] = await probe.fetch(1, timeout=0)
    assert decode(delivery.message.body).traceparent is None


@pytest.fixture
def global_exporter() -> Iterator[InMemorySpanExporter]:
    """An exporter on OpenTelemetry's global provider (set once per process: the API allows no reset)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # the processor stays on the provider, exporting nowhere


def test_every_metric_is_in_the_module_s_table_with_its_labels(registry: CollectorRegistry) -> None:
    """The table is the metrics' reference: names and labels are what dashboards query."""
    import choreograph.telemetry as module

    lines = (module.__doc__ or "").splitlines()
    rule = next(line for line in lines if line.startswith("====="))
    name_end = rule.index(" ")
    labels_start = rule.index("=", name_end)
    labels_end = rule.index(" ", labels_start)
    table: dict[str, str] = {}
    name = ""
    for line in lines[lines.index(rule) + 1:]:
        if line == rule:
            break
        if line[:name_end].strip():
            name = line[:name_end].strip().strip("`")
            table[name] = ""
        table[name] += " " + line[labels_start:labels_end]
    documented = {name: [label.strip() for label in labels.split(",") if label.strip()]
                  for name, labels in table.items()}
    registered = {
        metric._name + ("_total" if metric._type == "counter" else ""): list(metric._labelnames)
        for metric in vars(Metrics.on(registry)).values() if metric is not registry
    }
    assert documented == registered


def test_a_transaction_id_that_is_not_a_uuid_is_hashed_to_a_trace_id() -> None:
    trace_id, span_id = transaction_ids("order-42")
    assert transaction_ids("order-42") == (trace_id, span_id)
    assert 0 < trace_id < 2**128 and 0 < span_id < 2**64
    assert transaction_ids("order-43")[0] != trace_id


def _metrics_url_of(proc: subprocess.Popen[str], ready: str) -> str:
    """The ``/metrics`` URL a CLI process prints, read from its stderr up to its ``ready`` line."""
    assert proc.stderr is not None
    metrics_url = None
    for line in proc.stderr:
        if "metrics on " in line:
            metrics_url = line.split("metrics on ", 1)[1].strip()
        if ready in line:
            break
    assert metrics_url is not None and metrics_url.endswith("/metrics")
    return metrics_url


def _publish_order(url: str) -> None:
    published = subprocess.run(
        [sys.executable, "-m", "choreograph", "publish", "chain.order.placed", "--data",
         '{"order_id": "o-9", "amount": 5}', "--schema", "examples.chain", "--broker", url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert published.returncode == 0, published.stderr


def _scrape_until(metrics_url: str, wanted: str) -> str:
    """``/metrics`` once it shows ``wanted`` (or after a minute, for the assertion to report)."""
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
        if wanted in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_choreograph_run_serves_metrics_and_exports_one_trace_per_transaction(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "chain"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "choreograph", "run", "examples.chain:app", "--broker", url, "--otel",
         "--metrics-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        metrics_url = _metrics_url_of(proc, "running ")
        _publish_order(url)
        wanted = 'choreograph_events_handled_total{event_type="chain.order.shipped",service="notify"} 1.0'
        text = _scrape_until(metrics_url, wanted)
        assert wanted in text
        assert 'choreograph_events_handled_total{event_type="chain.order.placed",service="payment"} 1.0' in text
        assert "choreograph_handler_duration_seconds_bucket" in text
        assert 'choreograph_handlers_in_flight{service="payment"} 0.0' in text
    finally:
        out, err = stop(proc)
    assert proc.returncode == 0, err
    spans = _json_objects(out)
    names = {span["name"] for span in spans}
    assert names == {"payment handle chain.order.placed", "shipping handle chain.payment.captured",
                     "notify handle chain.order.shipped"}
    assert len({span["context"]["trace_id"] for span in spans}) == 1
    assert {span["resource"]["attributes"]["service.name"] for span in spans} == {"chain"}


def _json_objects(text: str) -> list[dict[str, object]]:
    """The JSON objects printed one after another (the console exporter's indented output)."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while (at := _skip_space(text, at)) < len(text):
        obj, at = decoder.raw_decode(text, at)
        objects.append(obj)
    return objects


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at



def test_choreograph_run_names_an_unknown_traces_exporter_and_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "choreograph", "run", "examples.chain:app", "--broker", "memory://", "--otel"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OTEL_TRACES_EXPORTER": "zipkin"},
    )
    assert done.returncode == 2
    assert "OTEL_TRACES_EXPORTER='zipkin': expected otlp, console or none" in done.stderr


def test_choreograph_push_serves_push_metrics(tmp_path: Path) -> None:
    """``choreograph push --metrics-port``: a delivered push is counted and timed on /metrics."""
    import http.server
    import threading

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's naming
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"sqlite:///{tmp_path}/bus.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "choreograph", "push", "--broker", url, "--group", "hook", "--type",
         "chain.order.placed", "--url", f"http://127.0.0.1:{receiver.server_port}/", "--no-handshake",
         "--metrics-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        metrics_url = _metrics_url_of(proc, "push running on")
        _publish_order(url)
        wanted = ('choreograph_push_deliveries_total{event_type="chain.order.placed",outcome="delivered",'
                  'subscription="hook"} 1.0')
        text = _scrape_until(metrics_url, wanted)
        assert wanted in text
        assert 'choreograph_push_request_duration_seconds_count{subscription="hook"} 1.0' in text
        # The delivery is counted while it settles, before the push leaves the in-flight gauge:
        # a scrape in between sees 1.0. It must come back to 0.
        idle = 'choreograph_pushes_in_flight{subscription="hook"} 0.0'
        assert idle in _scrape_until(metrics_url, idle)
    finally:
        stop(proc)
        receiver.shutdown()
        receiver.server_close()
    assert proc.returncode == 0
