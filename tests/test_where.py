"""``where=``: a CESQL filter narrows a handler to matching events; the others are acked unhandled.

On the in-memory bus in virtual time (a database service on the real clock, as the outbox needs).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from choreograph import (
    ConfigurationError,
    Context,
    Envelope,
    Event,
    Failure,
    Publisher,
    RetryPolicy,
    Service,
    Worker,
)
from choreograph.asyncapi import asyncapi_document
from choreograph.flow import build
from choreograph.runtime.outbox import transaction
from choreograph.runtime.records import to_message
from choreograph.testing import MemoryTransport, VirtualClock, settled


class Placed(Event, type="test.where.placed"):
    order_id: str


class Charged(Event, type="test.where.charged"):
    order_id: str


@pytest.fixture
def bus() -> MemoryTransport:
    return MemoryTransport(clock=VirtualClock())


async def publish_raw(bus: MemoryTransport, order_id: str, **attributes: object) -> None:
    """Publish a Placed event with exactly these envelope attributes (extensions included)."""
    known = {k: v for k, v in attributes.items() if k in Envelope.__struct_fields__}
    extensions = {k: v for k, v in attributes.items() if k not in Envelope.__struct_fields__}
    envelope = Envelope(id=f"id-{order_id}", source="/test", type=Placed.event_type(),
                        data={"order_id": order_id}, extensions=extensions, **known)  # type: ignore[arg-type]
    await bus.publish([to_message(envelope)])


async def test_only_matching_events_run_the_handler_and_only_they_emit(bus: MemoryTransport) -> None:
    calls: list[str] = []
    payment, sink = Service("payment"), Service("sink")
    charged: list[str] = []

    @payment.on(Placed, where="subject = 'eu'")
    async def charge(order: Placed) -> Charged:
        calls.append(order.order_id)
        return Charged(order_id=order.order_id)

    @sink.on(Charged)
    async def record(event: Charged) -> None:
        charged.append(event.order_id)

    async with Worker([payment, sink], bus) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Placed(order_id="eu-1"), subject="eu")
        await publisher.publish(Placed(order_id="us-1"), subject="us")
        await publisher.publish(Placed(order_id="none-1"))  # no subject: no match, not an error
        await settled(bus)
        stats = worker.stats("payment")
    assert calls == ["eu-1"]
    assert charged == ["eu-1"]
    assert (stats.handled, stats.filtered, stats.retried, stats.dead_lettered) == (1, 2, 0, 0)
    assert bus.pending() == (0, None)


async def test_a_non_matching_event_is_acked_once_never_retried_nor_dead_lettered(bus: MemoryTransport) -> None:
    """The handler fails every time: the matching event is retried and dead-lettered, the other is not."""
    svc = Service("flaky", retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False))
    attempts: list[str] = []

    @svc.on(Placed, where="subject = 'eu'")
    async def handle(order: Placed) -> None:
        attempts.append(order.order_id)
        raise RuntimeError("down")

    async with Worker([svc], bus) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Placed(order_id="eu-1"), subject="eu", ids=["eu-1"])
        await publisher.publish(Placed(order_id="us-1"), subject="us", ids=["us-1"])
        await settled(bus)
        await publisher.publish(Placed(order_id="us-1"), subject="us", ids=["us-1"])  # redelivered by a producer
        await settled(bus)
        stats = worker.stats("flaky")
    assert attempts == ["eu-1"] * 3
    assert [letter.record["envelope"]["id"] for letter in await bus.dead_letters("flaky")] == ["eu-1"]
    assert (stats.retried, stats.dead_lettered) == (2, 1)
    assert (stats.filtered, stats.duplicates) == (2, 0)  # not recorded: the copy is filtered again


async def test_filters_read_extensions_hops_and_correlationid(bus: MemoryTransport) -> None:
    seen: dict[str, list[str]] = {"region": [], "hops": [], "correlation": []}
    by_region, by_hops, by_correlation = Service("region"), Service("hops"), Service("correlation")

    @by_region.on(Placed, where="region = 'eu'")
    async def on_region(order: Placed) -> None:
        seen["region"].append(order.order_id)

    @by_hops.on(Placed, where="hops < 3")
    async def on_hops(order: Placed) -> None:
        seen["hops"].append(order.order_id)

    @by_correlation.on(Placed, where="correlationid LIKE 'tx-eu-%'")
    async def on_correlation(order: Placed) -> None:
        seen["correlation"].append(order.order_id)

    async with Worker([by_region, by_hops, by_correlation], bus):
        await publish_raw(bus, "a", region="eu", hops=0, correlationid="tx-eu-1")
        await publish_raw(bus, "b", region="us", hops=5, correlationid="tx-us-1")
        await publish_raw(bus, "c", hops=2)
        await settled(bus)
    assert {name: sorted(ids) for name, ids in seen.items()} == {
        "region": ["a"], "hops": ["a", "c"], "correlation": ["a"],
    }


async def test_a_skipped_event_is_logged_at_debug_with_the_reason(
    bus: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    svc = Service("logged")

    @svc.on(Placed, where="region = 'eu'")
    async def handle(order: Placed) -> None: ...

    caplog.set_level(logging.DEBUG, logger="choreograph.service")
    async with Worker([svc], bus):
        await publish_raw(bus, "a")
        await settled(bus)
    [record] = [r for r in caplog.records if r.name == "choreograph.service"]
    assert record.getMessage() == (
        f"{handle.__qualname__}: event id-a does not match where=\"region = 'eu'\" "
        "(missingAttribute: the event has no attribute 'region' (column 1)); acked unhandled"
    )


async def test_a_handler_taking_the_context_still_receives_it(bus: MemoryTransport) -> None:
    svc = Service("ctx")
    subjects: list[str | None] = []

    @svc.on(Placed, where="EXISTS subject")
    async def handle(order: Placed, ctx: Context) -> None:
        subjects.append(ctx.envelope.subject)

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="a"), subject="s-1")
        await Publisher(bus).publish(Placed(order_id="b"))
        await settled(bus)
    assert subjects == ["s-1"]


async def test_on_failure_filters_on_the_attributes_of_the_event_that_failed(bus: MemoryTransport) -> None:
    poison = Service("poison", retry=RetryPolicy(max_attempts=1))
    compensations = Service("compensations")
    compensated: list[str] = []

    @poison.on(Placed)
    async def fail(order: Placed) -> None:
        raise RuntimeError("no")

    @compensations.on_failure(Placed, where="subject = 'eu'")
    async def undo(failure: Failure) -> None:
        assert failure.event is not None
        compensated.append(failure.event.order_id)

    async with Worker([poison, compensations], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="eu-1"), subject="eu")
        await Publisher(bus).publish(Placed(order_id="us-1"), subject="us")
        await settled(bus)
        stats = worker.stats("compensations")
    assert compensated == ["eu-1"]
    assert (stats.handled, stats.filtered, stats.retried, stats.dead_lettered) == (1, 1, 0, 0)


async def test_a_database_service_acks_a_non_matching_event_without_state_or_outputs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'where.db'}"
    async with transaction(Service("setup", database=url)) as tx:
        await tx.execute("CREATE TABLE orders (id text PRIMARY KEY)")
    bus = MemoryTransport()
    svc, sink = Service("stateful", database=url), Service("sink")
    charged: list[str] = []

    @svc.on(Placed, where="subject = 'eu'")
    async def store(order: Placed, ctx: Context) -> Charged:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES ($1)", order.order_id)
        return Charged(order_id=order.order_id)

    @sink.on(Charged)
    async def record(event: Charged) -> None:
        charged.append(event.order_id)

    async with Worker([svc, sink], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="eu-1"), subject="eu")
        await Publisher(bus).publish(Placed(order_id="us-1"), subject="us")
        for _ in range(2000):  # the outbox relay publishes Charged after the commit
            await settled(bus)
            if charged and (await worker.outbox.lag("stateful")).pending == 0:
                break
            await asyncio.sleep(0.005)
        await settled(bus)
        stats = worker.stats("stateful")
    async with transaction(Service("setup", database=url)) as tx:
        rows = [row["id"] for row in await tx.fetch("SELECT id FROM orders")]
    assert rows == ["eu-1"]
    assert charged == ["eu-1"]
    assert (stats.handled, stats.filtered, stats.dead_lettered) == (1, 1, 0)


# -- registration ------------------------------------------------------------------------


async def charge(order: Placed) -> None: ...


def test_a_bad_expression_is_a_configuration_error_naming_the_handler_and_the_column() -> None:
    svc = Service("payment")
    with pytest.raises(ConfigurationError) as caught:
        svc.on(Placed, where="subject = 'eu' AND (hops > 2")(charge)
    assert str(caught.value) == (
        "Service 'payment', handler charge: where= is not a valid CESQL filter: "
        "expected ')' to close the '(' at column 20, found the end of the expression, at column 29\n"
        "    subject = 'eu' AND (hops > 2\n"
        "                                ^"
    )
    assert svc.handlers == {}


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("FOO(subject)", "where= is not a valid CESQL filter: unknown function FOO"),
        ("LENGTH(subject, 2) > 1", "where= is not a valid CESQL filter: LENGTH takes 1 argument, not 2"),
        ("hops + 1", "where='hops + 1' is an Integer expression; a filter must be a condition (a Boolean)"),
        ("", "where= is not a valid CESQL filter: empty expression"),
        (42, "where= takes a CESQL expression (a str), got int"),
    ],
)
def test_filters_that_can_never_work_are_refused_at_registration(where: object, message: str) -> None:
    svc = Service("svc")

    async def handle(order: Placed) -> None: ...

    with pytest.raises(ConfigurationError, match="^Service 'svc', handler .*handle: ") as caught:
        svc.on(Placed, where=where)(handle)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_a_second_handler_of_the_same_type_is_refused_even_with_another_filter() -> None:
    svc = Service("svc")

    @svc.on(Placed, where="subject = 'eu'")
    async def eu(order: Placed) -> None: ...

    with pytest.raises(ConfigurationError, match="it does not allow a second handler"):
        @svc.on(Placed, where="subject = 'us'")
        async def us(order: Placed) -> None: ...


def test_the_decorated_function_and_its_declared_emits_are_kept() -> None:
    svc = Service("payment")

    async def plain(order: Placed) -> Charged:
        return Charged(order_id=order.order_id)

    async def filtered(order: Placed) -> Charged:
        return Charged(order_id=order.order_id)

    assert svc.on(Placed)(plain) is plain
    assert svc.handlers[Placed.event_type()].func is plain  # no wrapper, no cost, without where=
    other = Service("other")
    assert other.on(Placed, where="subject = 'eu'")(filtered) is filtered  # callable as written
    handler = other.handlers[Placed.event_type()]
    assert handler.emits == frozenset({Charged})
    assert handler.name == filtered.__qualname__
    assert handler.where is not None and handler.where.source == "subject = 'eu'"
    assert handler.func is filtered and not handler.takes_context  # not wrapped: the worker applies the filter
    assert handler.accepts is not None


def test_the_flow_graph_and_asyncapi_show_the_filter() -> None:
    svc = Service("payment")

    @svc.on(Placed, where="subject = 'eu'")
    async def charge(order: Placed) -> Charged:
        return Charged(order_id=order.order_id)

    [step] = build(svc).steps
    assert step.where == "subject = 'eu'"
    operations = asyncapi_document(svc)["operations"]
    receive = next(op for op in operations.values() if op["action"] == "receive")
    assert receive["summary"].endswith("receives test.where.placed where subject = 'eu'")


async def test_an_event_filtered_out_is_acked_whatever_its_payload(bus: MemoryTransport) -> None:
    """The filter runs before the payload is validated: a US event this EU handler cannot
    parse is not its business, so it is acked, not dead-lettered as invalid_payload."""
    svc = Service("eu-only")
    seen: list[str] = []

    @svc.on(Placed, where="subject = 'eu'")
    async def handle(order: Placed) -> None:
        seen.append(order.order_id)

    def raw(event_id: str, subject: str, data: object) -> Envelope:
        return Envelope(id=event_id, source="/test", type=Placed.event_type(), subject=subject,
                        data=data)  # type: ignore[arg-type]

    async with Worker([svc], bus) as worker:
        await bus.publish([to_message(raw("us-bad", "us", {"order": 7})),   # no order_id: invalid
                           to_message(raw("eu-bad", "eu", {"order": 7})),
                           to_message(raw("eu-ok", "eu", {"order_id": "eu-ok"}))])
        await settled(bus)
        stats = worker.stats("eu-only")
    assert seen == ["eu-ok"]
    assert [letter.record["envelope"]["id"] for letter in await bus.dead_letters("eu-only")] == ["eu-bad"]
    assert (stats.handled, stats.filtered, stats.dead_lettered) == (1, 1, 1)


async def test_an_attribute_no_filter_can_read_is_filtered_out_not_stuck(bus: MemoryTransport) -> None:
    # A 5,000-digit subject once made the integer cast raise out of the filter: the delivery
    # was never settled and came back after every lease.
    svc = Service("numbers")

    @svc.on(Placed, where="subject = 5")
    async def handle(order: Placed) -> None:
        raise AssertionError("must not run")

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="x"), subject="9" * 5000)
        await settled(bus)
        stats = worker.stats("numbers")
    assert (stats.filtered, stats.dead_lettered) == (1, 0)
    assert bus.pending() == (0, None)
