"""The worker's contract, on the in-memory transport in virtual time."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, time, timedelta, timezone
from typing import Any

import orjson
import pytest
from pydantic import AliasGenerator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from choreograph import (
    FAILED,
    Context,
    Envelope,
    Event,
    Failure,
    Publisher,
    Reject,
    Retry,
    RetryPolicy,
    Service,
    Worker,
    current_context,
    decode,
)
from choreograph.errors import ConfigurationError, EmitError
from choreograph.runtime.records import HANDOVER_ATTEMPTS, first_envelope, to_message
from choreograph.runtime.worker import _EAGER_TASKS, _Runner, never_suspends
from choreograph.stores.memory import MemoryStore
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports.base import Message
from choreograph.transports.memory import MemoryDelivery
from tests._tripping import trip_decode
from tests._waiting import until


class Placed(Event, type="test.worker.placed"):
    order_id: str
    amount: int = 1


class Charged(Event, type="test.worker.charged"):
    order_id: str


class Shipped(Event, type="test.worker.shipped"):
    order_id: str


class Refunded(Event, type="test.worker.refunded"):
    order_id: str


@pytest.fixture(autouse=True, params=["inline", "tasks"])
def handler_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs twice: handlers that cannot suspend run inline in the fetch loop
    (the default), then with every handler in a task of its own (as with telemetry on)."""
    if request.param == "tasks":
        monkeypatch.setattr(_Runner, "INLINE", False)
    return str(request.param)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def bus(clock: VirtualClock) -> MemoryTransport:
    return MemoryTransport(clock=clock)


class Recorder(Service):
    """A service that records what it receives, for assertions."""

    def __init__(self, name: str, *types: type[Event]) -> None:
        super().__init__(name)
        self.received: list[tuple[str, dict, Context]] = []
        for cls in types:
            async def record(event: Event, ctx: Context) -> None:
                self.received.append((ctx.envelope.type, event.model_dump(), ctx))
            self.on(cls)(record)


def chain() -> tuple[Service, Service]:
    payment = Service("payment")
    shipping = Service("shipping")

    @payment.on(Placed)
    async def charge(order: Placed) -> Charged:
        return Charged(order_id=order.order_id)

    @shipping.on(Charged)
    async def ship(charged: Charged) -> Shipped:
        return Shipped(order_id=charged.order_id)

    return payment, shipping


async def test_events_flow_through_a_chain_with_correlation_causation_and_hops(bus: MemoryTransport) -> None:
    payment, shipping = chain()
    sink = Recorder("sink", Shipped)
    async with Worker([payment, shipping, sink], bus):
        [first] = await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
    [(type_, data, ctx)] = sink.received
    assert (type_, data) == ("test.worker.shipped", {"order_id": "o-1"})
    assert ctx.correlation_id == first.id
    assert ctx.envelope.hops == 2
    assert ctx.causation_id is not None and ctx.causation_id != first.id


class Tagged(Event, type="test.worker.tagged"):
    model_config = ConfigDict(frozen=True)  # (Event's own config, as a subclass may restate it)
    order_id: str = Field(alias="orderId")
    lines: list[Line] = Field(default_factory=list, alias="orderLines")


class Line(BaseModel):
    sku: str = Field(alias="SKU")


Tagged.model_rebuild()


async def test_an_event_with_aliased_fields_is_published_by_its_aliases_and_read_back(bus: MemoryTransport) -> None:
    """pydantic reads a field by its alias and wrote it by its name: every consumer of an
    event with an aliased field - from the publisher, a handler's output or ``ctx.publish``
    - dead-lettered it ``invalid_payload`` (``orderId: Field required``). It goes on the wire
    by its aliases, nested models' too, the form its consumers (and its AsyncAPI schema) read."""
    relay, sink = Service("relay"), Recorder("sink", Tagged)
    published: list[Message] = []
    publish = bus.publish

    async def spy(messages: Sequence[Message]) -> None:
        published.extend(messages)
        await publish(messages)

    bus.publish = spy  # type: ignore[method-assign]

    @relay.on(Placed)
    async def tag(placed: Placed, ctx: Context) -> Tagged:
        ctx.publish(Tagged.model_validate({"orderId": placed.order_id + "-extra"}))
        return Tagged.model_validate({"orderId": placed.order_id, "orderLines": [{"SKU": "a"}]})

    async with Worker([relay, sink], bus):
        await Publisher(bus).publish(Tagged.model_validate({"orderId": "direct"}))
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
    assert not await bus.dead_letters()
    received = sorted((data["order_id"], [line["sku"] for line in data["lines"]]) for _, data, _ in sink.received)
    assert received == [("direct", []), ("o-1", ["a"]), ("o-1-extra", [])]
    data = [orjson.loads(m.body)["data"] for m in published if m.type == Tagged.event_type()]
    assert {"orderId": "o-1", "orderLines": [{"SKU": "a"}]} in data


class Shown(Event, type="test.worker.shown"):
    order_id: str = Field(serialization_alias="orderId")  # read by name: aliased for output only
    note: Note


class Note(BaseModel):
    model_config = ConfigDict(alias_generator=AliasGenerator(serialization_alias=to_camel))
    note_text: str


Shown.model_rebuild()


async def test_an_event_aliased_only_for_serialization_is_published_by_the_names_it_is_read_by(
    bus: MemoryTransport,
) -> None:
    """A ``serialization_alias`` (or an alias generator's) is not a key the model reads: written
    by alias, as c0c26a6 wrote every event, its consumers dead-lettered it ``invalid_payload``
    (``order_id: Field required``). Such a model goes on the wire by its fields' names."""
    relay, sink = Service("relay"), Recorder("sink", Shown)

    @relay.on(Placed)
    async def show(placed: Placed, ctx: Context) -> Shown:
        return Shown(order_id=placed.order_id, note=Note(note_text="hi"))

    async with Worker([relay, sink], bus):
        await Publisher(bus).publish(Shown(order_id="direct", note=Note(note_text="ho")))
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
    assert not await bus.dead_letters()
    assert sorted((data["order_id"], data["note"]["note_text"]) for _, data, _ in sink.received) == [
        ("direct", "ho"), ("o-1", "hi"),
    ]


async def test_output_ids_are_deterministic_across_reruns(clock: VirtualClock) -> None:
    ids = []
    for _ in range(2):
        bus = MemoryTransport(clock=clock)
        payment, _ = chain()
        sink = Recorder("sink", Charged)
        async with Worker([payment, sink], bus):
            await Publisher(bus).publish(Placed(order_id="o-1"), ids=["fixed-input-id"])
            await settled(bus)
        ids.append(sink.received[0][2].event_id)
    assert ids[0] == ids[1]


async def test_a_duplicate_event_runs_the_handler_once(bus: MemoryTransport) -> None:
    calls = []
    svc = Service("dedupe")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        calls.append(order.order_id)

    async with Worker([svc], bus) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Placed(order_id="a"), ids=["same"])
        await settled(bus)
        await publisher.publish(Placed(order_id="a"), ids=["same"])
        await settled(bus)
    assert calls == ["a"]
    assert worker.stats("dedupe").duplicates == 1


async def test_retries_follow_the_backoff_policy_in_virtual_time(bus: MemoryTransport, clock: VirtualClock) -> None:
    times: list[float] = []
    svc = Service("flaky", retry=RetryPolicy(max_attempts=4, base=1.0, jitter=False))

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        times.append(clock.monotonic())
        if ctx.attempt < 4:
            raise RuntimeError("transient")

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
    assert gaps == [1.0, 2.0, 4.0]
    assert worker.stats().retried == 3
    assert worker.stats().dead_lettered == 0


@pytest.mark.timeout(60)  # a ceiling for a stuck test, not a speed assertion
async def test_settled_jumps_straight_to_a_retry_days_away(bus: MemoryTransport, clock: VirtualClock) -> None:
    """settled() jumped to the earliest sleeper of the clock, which is the next 0.25 s poll of
    the worker's fetch: a retry a day away took 345,600 jumps and settled() timed out."""
    times: list[float] = []
    svc = Service("patient")

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        times.append(clock.monotonic())
        if ctx.attempt < 3:
            raise Retry(after=86_400.0 * ctx.attempt)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus, timeout=5.0)
    assert [b - a for a, b in zip(times, times[1:], strict=False)] == [86_400.0, 172_800.0]
    assert worker.stats().handled == 1


async def test_a_named_bus_opened_on_a_clock_of_its_own_is_not_an_earlier_tests_bus() -> None:
    """A named bus lives until nothing refers to it, and a stopped worker's reference cycles keep
    it until the garbage collector runs: the next test's ``MemoryTransport("memory://shop",
    clock=VirtualClock())`` got the earlier test's bus, its dead letters and its clock (the
    clock passed in was ignored, so settled() moved the other one)."""
    svc = Service("named-bus")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        if order.order_id == "bad":
            raise Reject("bad order")

    earlier = MemoryTransport("memory://h11-shop", clock=VirtualClock())  # an earlier test's, not yet collected
    async with Worker([svc], earlier):
        await Publisher(earlier).publish(Placed(order_id="bad"))
        await settled(earlier)
    assert len(await earlier.dead_letters()) == 1
    assert MemoryTransport("memory://h11-shop").bus is earlier.bus  # reopened (no clock named): the same bus
    assert MemoryTransport("memory://h11-shop", clock=earlier.clock).bus is earlier.bus

    clock = VirtualClock(start=0.0)
    bus = MemoryTransport("memory://h11-shop", clock=clock)
    assert bus.clock is clock
    assert await bus.dead_letters() == []
    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="good"))
        await settled(bus)
    assert worker.stats().handled == 1 and await bus.dead_letters() == []


async def test_a_named_bus_in_use_cannot_be_opened_on_another_clock() -> None:
    bus = MemoryTransport("memory://h11-busy", clock=VirtualClock())
    sub = await bus.subscribe("g", ["t"])
    try:
        with pytest.raises(ConfigurationError, match=r"memory://h11-busy: this bus is in use on another clock"):
            MemoryTransport("memory://h11-busy", clock=VirtualClock())
    finally:
        await sub.close()


async def test_a_fetch_waiting_for_a_retry_wakes_when_it_is_due_although_the_clock_jumped_before_its_timer_was_set() -> None:
    """The memory fetch waits for the next due retry on a timer of the transport's clock, set by
    a task that starts a loop turn later. A VirtualClock jump in that turn (``settled()`` jumps
    from another task) pushed the timer back by the jump: the retry came late by it - the
    occasional 4.25 s gap of the backoff test above."""
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    sub = await bus.subscribe("g", ["t"])
    await bus.publish([Message("m1", "t", b"{}")])
    [delivery] = await sub.fetch(1)
    start = clock.monotonic()
    await delivery.retry(4.0)  # due at start + 4
    fetch = asyncio.ensure_future(sub.fetch(1, timeout=10.0))
    await asyncio.sleep(0)  # the fetch runs to its wait; its timer's task has not run yet
    clock.advance(1.0)
    for _ in range(5):
        await asyncio.sleep(0)
    clock.advance(3.0)  # now start + 4: the retry is due
    for _ in range(20):
        await asyncio.sleep(0)
    try:
        assert fetch.done(), "the fetch still waits for a timer pushed back by the jump"
        assert [d.message.id for d in fetch.result()] == ["m1"]
        assert clock.monotonic() == start + 4.0
    finally:
        fetch.cancel()
        await bus.close()


@pytest.mark.parametrize("after", [-1.0, float("nan"), float("inf"), 14 * 24 * 3600.0 + 1, 1e20])
def test_retry_refuses_an_after_that_is_not_a_finite_number_of_seconds(after: float) -> None:
    """inf parked the event for ever; nan compared as neither late nor early; beyond 14 days
    RabbitMQ's retry queues would bring it back sooner and 1e20 s overflowed a NATS NAK delay."""
    with pytest.raises(ValueError, match=r"after: must be a finite number of seconds >= 0, at most 1209600"):
        Retry("later", after=after)
    assert Retry("later", after=14 * 24 * 3600.0).after == 14 * 24 * 3600.0  # the limit itself is fine


@pytest.mark.parametrize(("field", "value"), [
    ("base", float("nan")), ("base", float("inf")), ("base", -1.0),
    ("max_interval", float("nan")), ("max_interval", float("inf")), ("max_interval", 14 * 24 * 3600.0 + 1),
    ("max_age", float("nan")), ("max_age", float("inf")), ("max_age", 0.0),
])  # fmt: skip
def test_a_retry_policy_refuses_delays_no_transport_can_hold_naming_the_field(field: str, value: float) -> None:
    """An infinite max_interval made an infinite backoff: parked for ever on memory:// and
    SQLite, and an OverflowError encoding the NATS NAK delay; nan passed the old checks."""
    with pytest.raises(ValueError, match=rf"^{field}: must be"):
        RetryPolicy(**{field: value})


def test_the_backoff_of_a_late_attempt_is_the_max_interval_not_an_overflow() -> None:
    """2.0 ** 1024 raises OverflowError: from attempt 1025 on, a policy allowing that many
    attempts (bounded by max_age instead) could not say how long to wait."""
    policy = RetryPolicy(max_attempts=1_000_000, base=0.2, max_interval=30.0, max_age=86400.0, jitter=False)
    assert [policy.backoff(n) for n in (1, 2, 1024, 1025, 1026, 10_000, 1_000_000)] == [0.2, 0.4] + [30.0] * 5
    assert 0.0 <= RetryPolicy(max_attempts=5000, max_interval=30.0).backoff(5000) <= 30.0  # with jitter


async def test_an_event_failing_past_a_thousand_attempts_is_still_retried_then_dead_lettered(
    clock: VirtualClock,
) -> None:
    bus = MemoryTransport(clock=clock)
    svc = Service("persistent", retry=RetryPolicy(max_attempts=1030, base=0.0, max_interval=0.0, jitter=False))

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        raise RuntimeError("down")

    async with Worker([svc], bus, ack_delay=0) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus, timeout=60)
    [letter] = await bus.dead_letters("persistent")
    assert letter.record["reason"] == "max_attempts" and letter.record["attempts"] == 1030
    assert worker.stats("persistent").retried == 1029


async def test_retry_after_overrides_the_backoff(bus: MemoryTransport, clock: VirtualClock) -> None:
    times: list[float] = []
    svc = Service("later")

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        times.append(clock.monotonic())
        if ctx.attempt == 1:
            raise Retry("busy", after=7.5)

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert round(times[1] - times[0], 6) == 7.5


async def test_giving_up_dead_letters_with_a_full_record_and_publishes_a_failure_event(
    bus: MemoryTransport,
) -> None:
    svc = Service("poison", retry=RetryPolicy(max_attempts=3, base=0.1, jitter=False))

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        raise ValueError(f"boom {ctx.attempt}")

    failures = Recorder("watch", )
    seen: list[Failure] = []

    @failures.on_failure(Placed)
    async def compensate(failure: Failure) -> None:
        seen.append(failure)

    async with Worker([svc, failures], bus):
        [env] = await Publisher(bus).publish(Placed(order_id="p-1"))
        await settled(bus)
    [letter] = await bus.dead_letters("poison")
    record = letter.record
    assert record["reason"] == "max_attempts"
    assert record["attempts"] == 3
    assert record["service"] == "poison" and record["group"] == "poison"
    assert record["handler"].endswith("handle")
    assert record["first_error"]["message"] == "boom 1"
    assert record["last_error"]["message"] == "boom 3"
    assert record["first_error"]["type"] == "ValueError"
    assert "Traceback" in record["last_error"]["traceback"]
    assert record["first_attempt_at"] < record["last_attempt_at"]
    assert record["envelope"]["id"] == env.id
    assert decode(letter.message.body).id == env.id  # original body untouched
    [failure] = seen
    assert failure.event == Placed(order_id="p-1")
    assert failure.envelope.id == env.id
    assert failure.reason == "max_attempts"


async def test_reject_dead_letters_at_once(bus: MemoryTransport) -> None:
    attempts = []
    svc = Service("strict")

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise Reject("amount must be positive")

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="a", amount=-1))
        await settled(bus)
    [letter] = await bus.dead_letters("strict")
    assert attempts == [1]
    assert letter.record["reason"] == "rejected"
    assert letter.record["last_error"]["message"] == "amount must be positive"


async def test_an_invalid_payload_is_dead_lettered_naming_the_field(bus: MemoryTransport) -> None:
    svc = Service("typed")
    calls = []

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        calls.append(order)

    body = orjson.dumps({"specversion": "1.0", "id": "x1", "source": "/t", "type": Placed.event_type(),
                         "data": {"order_id": "a", "amount": "lots"}})
    async with Worker([svc], bus):
        await bus.publish([Message("x1", Placed.event_type(), body)])
        await settled(bus)
    [letter] = await bus.dead_letters("typed")
    assert calls == []
    assert letter.record["reason"] == "invalid_payload"
    assert "amount" in letter.record["last_error"]["message"]


async def test_a_malformed_envelope_is_dead_lettered_and_the_worker_keeps_going(bus: MemoryTransport) -> None:
    sink = Recorder("sink", Placed)
    async with Worker([sink], bus):
        await bus.publish([Message("bad", Placed.event_type(), b"{not json")])
        await bus.publish([Message("bad2", Placed.event_type(), b'{"specversion": "1.0", "id": "bad2"}')])
        await Publisher(bus).publish(Placed(order_id="good"))
        await settled(bus)
    letters = {letter.message.id: letter.record for letter in await bus.dead_letters("sink")}
    assert letters["bad"]["reason"] == "malformed"
    assert letters["bad"]["envelope"] == "{not json"
    assert "source" in letters["bad2"]["last_error"]["message"]
    assert [data for _, data, _ in sink.received] == [{"order_id": "good", "amount": 1}]


async def test_an_internal_error_preparing_a_delivery_is_retried_then_dead_lettered_not_looped(
    bus: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message that trips a bug below the handler (here: decoding raises RuntimeError) counts
    attempts under the service's policy and ends as a dead letter; others keep flowing."""
    import choreograph.runtime._verdicts as verdicts_module  # where the runner decodes

    trip_decode(monkeypatch, verdicts_module)
    svc = Service("buggy", retry=RetryPolicy(max_attempts=3, base=0.1, jitter=False))
    handled: list[str] = []

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        handled.append(order.order_id)

    async with Worker([svc], bus) as worker:
        [tripping] = await Publisher(bus).publish(Placed(order_id="trip"))
        await Publisher(bus).publish(Placed(order_id="fine"))
        await settled(bus)
        stats = worker.stats("buggy")
    assert handled == ["fine"]
    [letter] = await bus.dead_letters("buggy")
    assert letter.message.id == tripping.id
    assert letter.record["reason"] == "internal_error" and letter.record["attempts"] == 3
    assert letter.record["last_error"]["type"] == "RuntimeError"
    assert letter.record["envelope"]["id"] == tripping.id  # the original, for replay once fixed
    assert (stats.retried, stats.dead_lettered, stats.handled) == (2, 1, 1)


class Opaque(Event, type="test.worker.opaque"):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: Any


async def test_an_output_that_cannot_be_encoded_is_dead_lettered_at_once_not_redelivered(bus: MemoryTransport) -> None:
    """The same every run, so no retry: rejected with a message naming the handler and the cause."""
    svc = Service("opaque")
    runs: list[str] = []

    @svc.on(Placed)
    async def handle(order: Placed) -> Opaque:
        runs.append(order.order_id)
        return Opaque(thing=object())  # pydantic cannot serialise it

    async with Worker([svc], bus) as worker:
        [env] = await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
        stats = worker.stats("opaque")
    assert runs == ["o-1"]
    [letter] = await bus.dead_letters("opaque")
    assert letter.message.id == env.id and letter.record["reason"] == "rejected"
    assert letter.record["last_error"]["type"] == "EmitError"
    assert "handle emitted an event that cannot be encoded as JSON" in letter.record["last_error"]["message"]
    assert (stats.dead_lettered, stats.handled) == (1, 0)


class Quoted(Event, type="test.worker.quoted"):
    order_id: str
    price: float
    discount: float | None = None
    history: list[float] = []


_NOT_JSON = "cannot be carried by JSON; it would be published as null, which consumers refuse"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
async def test_an_output_with_a_float_json_cannot_carry_is_rejected_naming_the_field_not_published_as_null(
    bus: MemoryTransport, value: float
) -> None:
    """pydantic writes inf and nan as null, which every consumer dead-letters ``invalid_payload``,
    one hop from the cause: the emitter dead-letters the input ``rejected`` at once instead."""
    svc = Service("quoting")
    sink = Recorder("quote-sink", Quoted)
    runs: list[str] = []

    @svc.on(Placed)
    async def quote(order: Placed) -> Quoted:
        runs.append(order.order_id)
        return Quoted(order_id=order.order_id, price=value)

    async with Worker([svc, sink], bus) as worker:
        [env] = await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
        stats = worker.stats("quoting")
    assert runs == ["o-1"] and sink.received == []
    [letter] = await bus.dead_letters("quoting")
    assert letter.message.id == env.id and letter.record["reason"] == "rejected" and letter.record["attempts"] == 1
    assert letter.record["envelope"] == orjson.loads(to_message(env).body)
    assert letter.record["last_error"]["type"] == "EmitError"
    assert letter.record["last_error"]["message"].startswith(
        f"'test.worker.quoted' cannot be published: $.price: {value!r} {_NOT_JSON}")
    assert (stats.dead_lettered, stats.handled) == (1, 0)
    assert await bus.dead_letters("quote-sink") == []


async def test_a_published_event_json_cannot_carry_rejects_the_input_and_publishes_none_of_its_outputs(
    bus: MemoryTransport,
) -> None:
    """ctx.publish() too, deep in a list: nothing of the handler's output reaches the bus."""
    svc = Service("quoting-many")
    sink = Recorder("many-sink", Quoted, Charged)

    @svc.on(Placed, emits=[Quoted, Charged])
    async def quote(order: Placed, ctx: Context) -> Charged:
        ctx.publish(Quoted(order_id=order.order_id, price=2.0))
        ctx.publish(Quoted(order_id=order.order_id, price=3.0, history=[1.0, float("nan")]))
        return Charged(order_id=order.order_id)

    async with Worker([svc, sink], bus):
        await Publisher(bus).publish(Placed(order_id="o-2"))
        await settled(bus)
    assert sink.received == [] and await bus.dead_letters("many-sink") == []
    [letter] = await bus.dead_letters("quoting-many")
    assert letter.record["reason"] == "rejected"
    assert f"$.history[1]: nan {_NOT_JSON}" in letter.record["last_error"]["message"]


async def test_an_output_with_a_none_optional_field_is_published_as_null(bus: MemoryTransport) -> None:
    """A null that reads back as the same value is no loss: published as before."""
    svc = Service("quoting-fine")
    sink = Recorder("fine-sink", Quoted)

    @svc.on(Placed)
    async def quote(order: Placed) -> Quoted:
        return Quoted(order_id=order.order_id, price=2.5, discount=None)

    async with Worker([svc, sink], bus):
        await Publisher(bus).publish(Placed(order_id="o-3"))
        await settled(bus)
    assert [data for _, data, _ in sink.received] == [
        {"order_id": "o-3", "price": 2.5, "discount": None, "history": []}]
    assert await bus.dead_letters("quoting-fine") == []


_READ_AS_NONE = "cannot be carried by JSON; it would be published as null, which consumers read as None"


class Reading(BaseModel):
    value: float | None = None


class Surveyed(Event, type="test.worker.surveyed"):
    site: str
    best: float | None = None
    readings: list[Reading] = []
    by_sensor: dict[str, float | None] = {}
    either: int | float | None = None
    extra: dict[str, Any] = {}


@pytest.mark.parametrize(("fields", "path", "value"), [
    ({"best": float("inf")}, "$.best", float("inf")),
    ({"readings": [Reading(value=1.0), Reading(value=float("nan"))]}, "$.readings[1].value", float("nan")),
    ({"by_sensor": {"s1": 2.0, "s2": float("-inf")}}, "$.by_sensor.s2", float("-inf")),
    ({"either": float("inf")}, "$.either", float("inf")),
    ({"extra": {"note": "x", "peak": float("nan")}}, "$.extra.peak", float("nan")),
])
async def test_an_output_with_inf_or_nan_where_null_is_valid_is_rejected_not_read_back_as_none(
    bus: MemoryTransport, fields: dict[str, Any], path: str, value: float
) -> None:
    """In a field that takes None (``float | None``, nested, in a list, a dict, a union, ``Any``)
    the null pydantic writes for inf or nan reads back valid: the consumer got None, the value
    silently changed. Refused like a non-optional float's, naming the field."""
    svc = Service("surveying")
    sink = Recorder("survey-sink", Surveyed)

    @svc.on(Placed)
    async def survey(order: Placed) -> Surveyed:
        return Surveyed(site=order.order_id, **fields)

    async with Worker([svc, sink], bus) as worker:
        [env] = await Publisher(bus).publish(Placed(order_id="o-4"))
        await settled(bus)
        stats = worker.stats("surveying")
    assert sink.received == [] and await bus.dead_letters("survey-sink") == []
    [letter] = await bus.dead_letters("surveying")
    assert letter.message.id == env.id and letter.record["reason"] == "rejected" and letter.record["attempts"] == 1
    assert letter.record["last_error"]["type"] == "EmitError"
    assert letter.record["last_error"]["message"].startswith(
        f"'test.worker.surveyed' cannot be published: {path}: {value!r} {_READ_AS_NONE} [event=")
    assert (stats.dead_lettered, stats.handled) == (1, 0)


async def test_the_publisher_refuses_an_inf_in_an_optional_field_and_publishes_its_none(bus: MemoryTransport) -> None:
    sink = Recorder("optional-sink", Quoted)
    async with Worker([sink], bus):
        with pytest.raises(EmitError) as raised:
            await Publisher(bus).publish(Quoted(order_id="bad", price=1.0, discount=float("inf")))
        await Publisher(bus).publish(Quoted(order_id="fine", price=1.0, discount=None))
        await settled(bus)
    assert str(raised.value) == f"'test.worker.quoted' cannot be published: $.discount: inf {_READ_AS_NONE}"
    assert [(data["order_id"], data["discount"]) for _, data, _ in sink.received] == [("fine", None)]


async def test_the_publisher_refuses_an_event_json_cannot_carry_before_publishing_any(bus: MemoryTransport) -> None:
    sink = Recorder("publisher-sink", Quoted)
    async with Worker([sink], bus):
        with pytest.raises(EmitError) as raised:
            await Publisher(bus).publish(Quoted(order_id="ok", price=1.0),
                                         Quoted(order_id="bad", price=float("inf")))
        await Publisher(bus).publish(Quoted(order_id="fine", price=1.0, discount=None))
        await settled(bus)
    assert str(raised.value) == f"'test.worker.quoted' cannot be published: $.price: inf {_NOT_JSON}"
    assert [data["order_id"] for _, data, _ in sink.received] == ["fine"]
    assert await bus.dead_letters("publisher-sink") == []


class Counted(Event, type="test.worker.counted"):
    order_id: str
    count: int
    spare: int | None = None


class Tallied(Event, type="test.worker.tallied"):
    order_id: str
    counts: list[int] = []
    extra: dict[str, Any] = {}


_AS_FLOAT = "cannot be carried by JSON; consumers read an integer outside the 64-bit range as a float"


@pytest.mark.parametrize(("fields", "path", "value"), [
    ({"count": 2**64}, "$.count", 2**64),
    ({"count": -(2**63) - 1}, "$.count", -(2**63) - 1),
    ({"count": 1, "spare": 10**30}, "$.spare", 10**30),
])
async def test_an_output_with_an_int_outside_the_64_bit_range_is_rejected_naming_the_field(
    bus: MemoryTransport, fields: dict[str, Any], path: str, value: int
) -> None:
    """orjson, which consumers read data with, reads a larger integer as a float, which an ``int``
    field refuses: dead-lettered ``invalid_payload`` one hop on. Refused where it is emitted."""
    svc = Service("counting")
    sink = Recorder("count-sink", Counted)

    @svc.on(Placed)
    async def count(order: Placed) -> Counted:
        return Counted(order_id=order.order_id, **fields)

    async with Worker([svc, sink], bus) as worker:
        [env] = await Publisher(bus).publish(Placed(order_id="o-5"))
        await settled(bus)
        stats = worker.stats("counting")
    assert sink.received == [] and await bus.dead_letters("count-sink") == []
    [letter] = await bus.dead_letters("counting")
    assert letter.message.id == env.id and letter.record["reason"] == "rejected" and letter.record["attempts"] == 1
    assert letter.record["last_error"]["type"] == "EmitError"
    assert letter.record["last_error"]["message"].startswith(
        f"'test.worker.counted' cannot be published: {path}: {value} {_AS_FLOAT} ({float(value)!r})")
    assert (stats.dead_lettered, stats.handled) == (1, 0)


async def test_an_output_with_a_big_int_deep_in_a_list_or_an_any_field_is_rejected(bus: MemoryTransport) -> None:
    """In an ``Any`` field the consumer keeps the float: the value silently rounded. Refused too."""
    svc = Service("tallying")
    sink = Recorder("tally-sink", Tallied)

    @svc.on(Placed, emits=[Tallied])
    async def tally(order: Placed, ctx: Context) -> None:
        ctx.publish(Tallied(order_id=order.order_id, counts=[1, 2**64 - 1]))  # the largest orjson reads
        ctx.publish(Tallied(order_id=order.order_id, counts=[1, 2], extra={"n": [2**70 + 1]}))

    async with Worker([svc, sink], bus):
        await Publisher(bus).publish(Placed(order_id="o-6"))
        await settled(bus)
    assert sink.received == []
    [letter] = await bus.dead_letters("tallying")
    assert letter.record["reason"] == "rejected"
    assert f"$.extra.n[0]: {2**70 + 1} {_AS_FLOAT}" in letter.record["last_error"]["message"]


async def test_the_publisher_refuses_an_int_outside_the_64_bit_range_and_publishes_the_extremes(
    bus: MemoryTransport,
) -> None:
    sink = Recorder("extreme-sink", Counted)
    async with Worker([sink], bus):
        with pytest.raises(EmitError) as raised:
            await Publisher(bus).publish(Counted(order_id="bad", count=2**64))
        await Publisher(bus).publish(Counted(order_id="max", count=2**64 - 1),
                                     Counted(order_id="min", count=-(2**63), spare=None))
        await settled(bus)
    assert str(raised.value) == (f"'test.worker.counted' cannot be published: $.count: {2**64} {_AS_FLOAT} "
                                 f"({float(2**64)!r})")
    assert [(data["order_id"], data["count"]) for _, data, _ in sink.received] == [
        ("max", 2**64 - 1), ("min", -(2**63))]
    assert await bus.dead_letters("extreme-sink") == []


class Scheduled(Event, type="test.worker.scheduled"):
    order_id: str
    at: datetime
    opens: time | None = None


_SECONDS_OFFSET = timezone(timedelta(hours=5, minutes=30, seconds=15))
_CUT_OFFSET = ("has a UTC offset with seconds, which RFC 3339 cannot carry; it would be published with the "
               "offset cut to hours and minutes, another time")


@pytest.mark.parametrize(("fields", "path", "shown"), [
    ({"at": datetime(2026, 1, 1, 12, tzinfo=_SECONDS_OFFSET)}, "$.at", "2026-01-01T12:00:00+05:30:15"),
    ({"at": datetime(2026, 1, 1, 12, tzinfo=timezone(-timedelta(minutes=1, microseconds=5)))}, "$.at",
     "2026-01-01T12:00:00-00:01:00.000005"),
    ({"at": datetime(2026, 1, 1, tzinfo=UTC), "opens": time(9, tzinfo=_SECONDS_OFFSET)}, "$.opens",
     "09:00:00+05:30:15"),
])
async def test_an_output_with_a_utc_offset_holding_seconds_is_rejected_naming_the_field(
    bus: MemoryTransport, fields: dict[str, Any], path: str, shown: str
) -> None:
    """pydantic writes +05:30:15 as +05:30 (RFC 3339 offsets have no seconds): the consumer
    would read another instant, silently. Refused where it is emitted."""
    svc = Service("scheduling")
    sink = Recorder("schedule-sink", Scheduled)

    @svc.on(Placed)
    async def schedule(order: Placed) -> Scheduled:
        return Scheduled(order_id=order.order_id, **fields)

    async with Worker([svc, sink], bus):
        await Publisher(bus).publish(Placed(order_id="o-7"))
        await settled(bus)
    assert sink.received == []
    [letter] = await bus.dead_letters("scheduling")
    assert letter.record["reason"] == "rejected" and letter.record["last_error"]["type"] == "EmitError"
    assert letter.record["last_error"]["message"].startswith(
        f"'test.worker.scheduled' cannot be published: {path}: {shown} {_CUT_OFFSET}")


async def test_the_publisher_refuses_an_offset_with_seconds_and_publishes_whole_minutes(bus: MemoryTransport) -> None:
    sink = Recorder("offset-sink", Scheduled)
    fine = [datetime(2026, 1, 1, 12, tzinfo=UTC), datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=-5,
                                                                                                         minutes=-30)))]
    async with Worker([sink], bus):
        with pytest.raises(EmitError) as raised:
            await Publisher(bus).publish(Scheduled(order_id="bad", at=datetime(2026, 1, 1, tzinfo=_SECONDS_OFFSET)))
        await Publisher(bus).publish(*(Scheduled(order_id="fine", at=at) for at in fine))
        await settled(bus)
    assert str(raised.value).startswith(
        f"'test.worker.scheduled' cannot be published: $.at: 2026-01-01T00:00:00+05:30:15 {_CUT_OFFSET}")
    assert [(data["at"], data["at"].utcoffset()) for _, data, _ in sink.received] == [
        (at, at.utcoffset()) for at in fine]


class _Custom(BaseException):
    pass


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (asyncio.CancelledError(), "CancelledError"),  # raised by the handler, not a cancel(): no tight loop
        (SystemExit(3), "SystemExit"),  # a handler does not end the worker
        (_Custom(), "_Custom"),
        (GeneratorExit(), "GeneratorExit"),
        (_Unprintable(), "_Unprintable"),  # a record is still written
        (ValueError("bad \ud800 text"), "ValueError"),  # and it encodes as JSON
    ],
)
async def test_whatever_a_handler_raises_is_a_failed_attempt_then_a_dead_letter(
    bus: MemoryTransport, raised: BaseException, kind: str
) -> None:
    svc = Service("odd", retry=RetryPolicy(max_attempts=3, base=0.1, jitter=False))
    attempts: list[int] = []
    watched: list[Failure] = []

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise raised

    watch = Service("odd-watch")

    @watch.on_failure(Placed)
    async def seen(failure: Failure) -> None:
        watched.append(failure)

    async with Worker([svc, watch], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await asyncio.wait_for(settled(bus), 10)
        stats = worker.stats("odd")
    assert attempts == [1, 2, 3]
    [letter] = await bus.dead_letters("odd")
    assert letter.record["reason"] == "max_attempts" and letter.record["last_error"]["type"] == kind
    assert letter.record["last_error"]["message"]  # something readable, even for _Unprintable
    assert (stats.retried, stats.dead_lettered, stats.released) == (2, 1, 0)
    [failure] = watched  # the failure event went out too (its record encoded as JSON)
    assert failure.reason == "max_attempts"


@pytest.mark.parametrize("reason", [None, object(), "\udc80"])
async def test_a_reject_with_a_reason_that_is_not_clean_text_still_dead_letters_at_once(
    bus: MemoryTransport, reason: object
) -> None:
    svc = Service("picky")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        raise Reject(reason)  # type: ignore[arg-type]

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await asyncio.wait_for(settled(bus), 10)
    [letter] = await bus.dead_letters("picky")
    assert letter.record["reason"] == "rejected" and letter.record["attempts"] == 1
    orjson.dumps(letter.record)  # clean text


async def test_a_hung_handler_times_out_and_counts_as_an_attempt(bus: MemoryTransport) -> None:
    svc = Service("slow", retry=RetryPolicy(max_attempts=2, base=0.01, jitter=False))

    @svc.on(Placed, timeout=0.05)
    async def handle(order: Placed) -> None:
        await asyncio.sleep(3600)

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    [letter] = await bus.dead_letters("slow")
    assert letter.record["attempts"] == 2
    assert letter.record["last_error"]["type"] == "HandlerTimeout"


async def test_hops_above_the_limit_are_dead_lettered_as_a_loop(bus: MemoryTransport) -> None:
    class Ping(Event, type="test.worker.ping"):
        n: int

    svc = Service("looper")

    @svc.on(Ping)
    async def bounce(ping: Ping) -> Ping:
        return Ping(n=ping.n + 1)

    failures: list[Failure] = []
    watch = Service("watch")

    @watch.on_failure(Ping)
    async def seen(failure: Failure) -> None:
        failures.append(failure)

    async with Worker([svc, watch], bus, max_hops=10):
        await Publisher(bus).publish(Ping(n=0))
        await settled(bus)
    [letter] = await bus.dead_letters("looper")
    assert letter.record["reason"] == "loop_detected" and letter.record["handler"] is None
    assert decode(letter.message.body).hops == 11
    assert failures == []  # a loop publishes no failure event: a compensation could loop again


class _EqualOnlyToItself(type):
    def __eq__(cls, other: object) -> bool:  # and so no __hash__: instances' type is unhashable
        return cls is other


class _NotAnEvent(metaclass=_EqualOnlyToItself):
    pass


async def test_a_handler_returning_a_non_event_of_an_unhashable_type_is_rejected_not_retried(bus: MemoryTransport) -> None:
    """What it returned is checked to be an Event before its type is looked up among those it
    declares: the lookup hashes the type, and a TypeError there read as a bug of ours (retried)."""
    svc = Service("odd")

    @svc.on(Placed)
    async def handle(order: Placed) -> Placed:
        return _NotAnEvent()  # type: ignore[return-value]

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="o-1"))
        await settled(bus)
        stats = worker.stats("odd")
    [letter] = await bus.dead_letters("odd")
    assert (letter.record["reason"], letter.record["last_error"]["type"]) == ("rejected", "EmitError")
    assert (stats.retried, stats.dead_lettered) == (0, 1)


async def test_emitting_an_undeclared_type_is_an_error_that_names_it(bus: MemoryTransport) -> None:
    svc = Service("sloppy")

    @svc.on(Placed)
    async def handle(order: Placed) -> Charged:
        return Shipped(order_id=order.order_id)  # type: ignore[return-value]

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    [letter] = await bus.dead_letters("sloppy")
    assert letter.record["reason"] == "rejected"
    assert "test.worker.shipped" in letter.record["last_error"]["message"]
    assert letter.record["last_error"]["type"] == "EmitError"


async def test_ctx_publish_emits_extra_events_and_the_context_is_ambient(bus: MemoryTransport) -> None:
    svc = Service("multi")
    ambient = []

    @svc.on(Placed, emits=[Charged, Shipped])
    async def handle(order: Placed, ctx: Context) -> list[Event]:
        ctx.publish(Charged(order_id=order.order_id))
        ambient.append(current_context() is ctx)
        return [Shipped(order_id=order.order_id)]

    sink = Recorder("sink", Charged, Shipped)
    async with Worker([svc, sink], bus):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert sorted(t for t, _, _ in sink.received) == ["test.worker.charged", "test.worker.shipped"]
    assert ambient == [True]
    assert current_context() is None


async def test_a_handler_that_publishes_and_returns_a_single_event_emits_both(bus: MemoryTransport) -> None:
    """The returned event alone is the common case with a shortcut of its own (inline, no
    ``await``); what the handler published with ``ctx.publish`` must not be lost by it."""
    svc = Service("both")

    @svc.on(Placed, emits=[Charged, Shipped])
    async def handle(order: Placed, ctx: Context) -> Shipped:
        ctx.publish(Charged(order_id=order.order_id))
        return Shipped(order_id=order.order_id)

    sink = Recorder("sink", Charged, Shipped)
    async with Worker([svc, sink], bus):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert sorted((t, data["order_id"]) for t, data, _ in sink.received) == [
        ("test.worker.charged", "a"), ("test.worker.shipped", "a")]
    assert len({ctx.event_id for _, _, ctx in sink.received}) == 2


async def test_failure_handlers_only_see_failures_of_their_type(bus: MemoryTransport) -> None:
    bad = Service("bad", retry=RetryPolicy(max_attempts=1))

    @bad.on(Charged)
    async def fail(charged: Charged) -> None:
        raise Reject("no")

    watcher = Service("watcher")
    got = []

    @watcher.on_failure(Placed)
    async def on_placed_failure(failure: Failure) -> None:
        got.append(failure)

    async with Worker([bad, watcher], bus) as worker:
        await Publisher(bus).publish(Charged(order_id="c"))
        await settled(bus)
    assert got == []
    assert worker.stats("watcher").ignored == 1
    assert "choreograph.failed" in watcher.subscriptions and FAILED == "choreograph.failed"


async def test_a_failure_event_whose_record_is_not_an_object_is_an_invalid_payload(bus: MemoryTransport) -> None:
    watcher = Service("watcher")
    got: list[Failure] = []

    @watcher.on_failure(Placed)
    async def on_placed_failure(failure: Failure) -> None:
        got.append(failure)

    original = orjson.loads(to_message(first_envelope(Placed(order_id="p"), source="/t", id="p-1")).body)
    odd = Envelope(id="f-1", source="/t", type=FAILED, data={"type": Placed.event_type(), "envelope": original,
                                                             "record": ["not", "an", "object"]})
    async with Worker([watcher], bus) as worker:
        await bus.publish([to_message(odd)])
        await settled(bus)
    assert got == [] and worker.stats("watcher").retried == 0
    [letter] = await bus.dead_letters("watcher")
    assert letter.record["reason"] == "invalid_payload" and letter.record["attempts"] == 1
    assert "data.record: expected an object, got list" in letter.record["last_error"]["message"]


@pytest.mark.parametrize(
    ("publish", "says"),
    [
        (lambda ctx: ctx.publish({"order_id": "x"}), "publish() takes an Event, got dict"),
        (lambda ctx: ctx.publish(Charged(order_id="x"), subject=""), "expected a non-empty string, got ''"),
        (lambda ctx: ctx.publish(Charged(order_id="x"), subject=7), "expected a non-empty string, got 7"),
        (lambda ctx: ctx.publish(Charged(order_id="x"), subject="a\nb"),
         "publish(subject=...): 'a\\nb' contains a control character (U+000A at index 1)"),
        (lambda ctx: ctx.publish(Charged(order_id="x"), subject="x\x85"), "a control character (U+0085 at index 1)"),
        (lambda ctx: ctx.publish(Charged(order_id="x"), subject="\ud800"), "a surrogate code point (U+D800"),
        (lambda ctx: ctx.publish(Charged(order_id="x"), subject="k\ufffe"), "a Unicode noncharacter (U+FFFE"),
    ],
)
async def test_a_publish_that_cannot_be_right_is_rejected_at_once_naming_why(
    bus: MemoryTransport, publish: Any, says: str
) -> None:
    svc = Service("sloppy-publisher")

    @svc.on(Placed, emits=[Charged])
    async def handle(order: Placed, ctx: Context) -> None:
        publish(ctx)

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="o"))
        await settled(bus)
    [letter] = await bus.dead_letters("sloppy-publisher")
    assert letter.record["reason"] == "rejected" and says in letter.record["last_error"]["message"]


async def test_what_an_output_inherits_is_carried_as_is_even_where_a_new_value_would_be_refused(
    bus: MemoryTransport,
) -> None:
    # Another producer's event, with characters a CloudEvents String must not hold: decoded and
    # handled as it is; its outputs carry the correlation id, partition key and trace state
    # they inherit unchanged (not ours to change), while the subject the handler sets is checked.
    svc = Service("inheritor")

    @svc.on(Placed, emits=[Charged])
    async def handle(order: Placed, ctx: Context) -> Charged:
        ctx.publish(Charged(order_id="published"), subject="fine")
        return Charged(order_id=order.order_id)

    sink = Service("inherited-sink")
    seen: list[Envelope] = []

    @sink.on(Charged)
    async def record(charged: Charged, ctx: Context) -> None:
        seen.append(ctx.envelope)

    odd = Envelope(id="in\x01put", source="/other\x7fproducer", type=Placed.event_type(), data={"order_id": "o"},
                   correlationid="corr\nid", partitionkey="key\ufffe", tracestate="vendor=\x00")
    async with Worker([svc, sink], bus):
        await bus.publish([to_message(odd)])
        await settled(bus)
    outputs = sorted(seen, key=lambda e: e.subject or "")
    assert [e.subject for e in outputs] == [None, "fine"]
    assert {(e.correlationid, e.causationid, e.partitionkey, e.tracestate) for e in outputs} == {
        ("corr\nid", "in\x01put", "key\ufffe", "vendor=\x00")
    }
    assert await bus.dead_letters("inheritor") == []


async def test_publish_after_the_handler_returned_raises_instead_of_losing_the_event(bus: MemoryTransport) -> None:
    svc = Service("late")
    contexts: list[Context] = []

    @svc.on(Placed, emits=[Charged])
    async def handle(order: Placed, ctx: Context) -> None:
        contexts.append(ctx)

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="o"))
        await settled(bus)
    with pytest.raises(EmitError, match="after the handler returned"):
        contexts[0].publish(Charged(order_id="o"))


async def test_max_age_gives_up_even_with_attempts_left(bus: MemoryTransport) -> None:
    svc = Service("aged", retry=RetryPolicy(max_attempts=100, base=10.0, max_age=25.0, jitter=False))

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        raise RuntimeError("down")

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    [letter] = await bus.dead_letters("aged")
    assert letter.record["reason"] == "max_age"
    assert letter.record["attempts"] == 3  # t=0, 10, 30 (>= 25 s after the first failure)


async def test_a_retry_after_that_reaches_past_max_age_gives_up_at_once(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    """Retry(after=) may ask for up to 14 days: the event waited all that time past its
    max_age for one more attempt (which could even succeed), and its failure event - what
    compensations run on - came that late. No attempt can be both after ``after`` and within
    max_age: it gives up now. A Retry(after=) within max_age is honoured."""
    svc = Service("patient", retry=RetryPolicy(max_attempts=10, max_age=60.0, jitter=False))
    times: list[float] = []

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        times.append(clock.monotonic())
        raise Retry("busy", after=30.0 if ctx.attempt == 1 else 300.0)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert [t - times[0] for t in times] == [0.0, 30.0]  # not a third attempt at 330 s
    [letter] = await bus.dead_letters("patient")
    assert letter.record["reason"] == "max_age" and letter.record["attempts"] == 2
    assert letter.record["last_attempt_at"] - letter.record["first_attempt_at"] == 30.0
    assert worker.stats("patient").retried == 1


async def test_stop_releases_in_flight_work_after_the_drain_timeout(bus: MemoryTransport) -> None:
    started = asyncio.Event()
    svc = Service("stuck")

    @svc.on(Placed, timeout=3600)
    async def handle(order: Placed) -> None:
        started.set()
        await asyncio.sleep(3600)

    worker = Worker([svc], bus, drain_timeout=0.05)
    await worker.start()
    await Publisher(bus).publish(Placed(order_id="a"))
    await started.wait()
    await worker.stop()
    assert worker.stats().released == 1
    # the event is back in the group, ready for the next consumer
    sub = await bus.subscribe("stuck", [Placed.event_type()])
    [delivery] = await sub.fetch(10, timeout=0)
    assert delivery.attempt == 2


async def test_a_copy_redelivered_while_its_handler_runs_is_deferred_not_acked(
    clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def lost(self: MemoryDelivery) -> None:
        """A touch the broker never saw: the lease runs out (the worker touches on the virtual clock)."""

    monkeypatch.setattr(MemoryDelivery, "touch", lost)
    bus = MemoryTransport("memory://?lease=5", clock=clock)
    release = asyncio.Event()
    attempts: list[int] = []
    svc = Service("slowpoke", retry=RetryPolicy(max_attempts=5, base=0.5, jitter=False))

    @svc.on(Placed, timeout=3600)
    async def handle(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await release.wait()
            raise RuntimeError("failed after its lease ran out")

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        while not attempts or clock.next_due() is None:  # the handler runs and the fetch loop waits
            await asyncio.sleep(0)
        clock.advance(6)  # the lease expires: the broker hands the same message out again
        for _ in range(50):
            await asyncio.sleep(0)
        assert worker.stats().deferred >= 1
        release.set()  # the first attempt fails late; the event must not have been settled by the copy
        await settled(bus)
    assert attempts[0] == 1 and len(attempts) == 2
    assert worker.stats().handled == 1
    assert await bus.dead_letters("slowpoke") == []


async def test_stop_returns_when_the_last_handler_finishes_during_the_drain(bus: MemoryTransport) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    svc = Service("finisher")
    done = []

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        started.set()
        await release.wait()
        done.append(order.order_id)

    worker = Worker([svc], bus, drain_timeout=30)
    await worker.start()
    await Publisher(bus).publish(Placed(order_id="a"))
    await started.wait()
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)
    release.set()  # its outcome and stop()'s wake-up reach the settler together
    await asyncio.wait_for(stopping, timeout=2)
    assert done == ["a"]
    assert bus.pending() == (0, None)  # acked, not released


async def test_the_inbox_forgets_processed_ids_after_the_retention_period() -> None:
    from choreograph.stores.memory import MemoryStore

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    store = MemoryStore()
    calls = []
    svc = Service("forgetful")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        calls.append(order.order_id)

    async with Worker([svc], bus, store=store, retention=3600) as worker:
        await Publisher(bus).publish(Placed(order_id="a"), ids=["same"])
        await settled(bus)
        clock.advance(3601)
        assert await worker.expire() == 1  # marked on the clock, older than its now - 1 h
        await Publisher(bus).publish(Placed(order_id="a"), ids=["same"])
        await settled(bus)
    assert calls == ["a", "a"]


async def test_a_starting_worker_forgets_the_inbox_entries_older_than_the_retention_at_once() -> None:
    """The first expiry pass runs at start, before any delivery (the next one only after a tenth
    of the retention): an event processed longer ago than that runs again."""
    clock = VirtualClock(epoch=4_000_000_000.0)  # wall time far beyond the real mark below
    bus = MemoryTransport(clock=clock)
    store = MemoryStore()
    await store.mark("forgetful", ["same"])  # by an earlier run, at real time: older than virtual now - 1 h
    calls = []
    svc = Service("forgetful")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        calls.append(order.order_id)

    async with Worker([svc], bus, store=store, retention=3600):
        await Publisher(bus).publish(Placed(order_id="a"), ids=["same"])
        await settled(bus)
    assert calls == ["a"]


async def test_without_retention_the_inbox_keeps_everything() -> None:
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    svc = Service("keeper")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        pass

    async with Worker([svc], bus, retention=None) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
        clock.advance(10**7)
        assert await worker.expire() == 0


async def test_task_bound_asyncio_tools_in_handlers_act_on_the_handler_not_the_worker() -> None:
    """asyncio.timeout and TaskGroup cancel "the current task": it must be the handler's own."""
    bus = MemoryTransport()  # real time: asyncio.timeout runs on the loop's clock
    svc = Service("bounded", retry=RetryPolicy(max_attempts=2, base=0.01, jitter=False))
    attempts: list[str] = []
    grouped: list[str] = []
    never = asyncio.Event()

    @svc.on(Placed, timeout=30)
    async def handle(order: Placed) -> Charged:
        if order.order_id.startswith("slow"):
            attempts.append(order.order_id)
            async with asyncio.timeout(0.05):  # expires: cancels this handler only
                await never.wait()
        async with asyncio.TaskGroup() as group:  # a child failing cancels this handler only
            group.create_task(asyncio.sleep(0))
        grouped.append(order.order_id)
        return Charged(order_id=order.order_id)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="slow-1"), Placed(order_id="a"))
        await settled(bus)
        await Publisher(bus).publish(Placed(order_id="b"))  # the worker still fetches
        await settled(bus)
    assert attempts == ["slow-1", "slow-1"]  # TimeoutError is a failed attempt, retried, then dead
    assert sorted(grouped) == ["a", "b"]
    assert worker.stats().dead_lettered == 1 and worker.stats().handled == 2
    [letter] = await bus.dead_letters("bounded")
    assert letter.record["last_error"]["type"] == "TimeoutError"


async def test_a_batch_is_acked_only_after_its_outputs_are_published_and_the_next_batch_publishes_meanwhile() -> None:
    """Settling is two stages deep: batch 2's outputs go out while batch 1 is still being marked."""
    from collections.abc import Callable

    from choreograph.stores.memory import MemoryStore

    log: list[tuple[str, list[str]]] = []
    publish_gate, mark_gate = asyncio.Event(), asyncio.Event()

    class GatedBus(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            if any(m.type == Charged.event_type() for m in messages):  # the worker's outputs
                log.append(("publishing", sorted(orjson.loads(m.body)["data"]["order_id"] for m in messages)))
                await publish_gate.wait()
            await super().publish(messages)

    class GatedStore(MemoryStore):
        async def mark(self, group: str, event_ids: Collection[str]) -> None:
            log.append(("marking", list(event_ids)))
            await mark_gate.wait()
            await super().mark(group, event_ids)

    bus = GatedBus()
    payment = Service("payment")

    @payment.on(Placed)
    async def charge(order: Placed) -> Charged:
        return Charged(order_id=order.order_id)

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never reached; log: {log}")

    def in_flight() -> int:
        return bus.pending()[0]

    async with Worker([payment], bus, store=GatedStore()):
        [a] = await Publisher(bus).publish(Placed(order_id="a"))
        await until(lambda: log == [("publishing", ["a"])])
        assert in_flight() == 1  # outputs not out yet: no mark, no ack
        publish_gate.set()
        await until(lambda: len(log) == 2)
        assert log[1] == ("marking", [a.id]) and in_flight() == 1  # published, not acked yet
        await Publisher(bus).publish(Placed(order_id="b"))
        await until(lambda: len(log) == 3)
        assert log[2] == ("publishing", ["b"])  # while batch 1 is still being marked
        assert in_flight() == 2
        mark_gate.set()
        await settled(bus)
    # "a" was settled by its handler's task (the settle loop was idle), "b" by the settle loop,
    # which marked it only after "a" was marked
    assert [entry[0] for entry in log] == ["publishing", "marking", "publishing", "marking"]
    assert [entry for entry in log if entry[0] == "publishing"] == [("publishing", ["a"]), ("publishing", ["b"])]


async def test_a_lone_event_whose_outputs_cannot_be_published_yet_is_settled_once_they_can() -> None:
    """The lone event's task settles it (the fast lane) and retries the publish like the
    settle loop: the input stays unacked and unmarked until its output is out, then both."""

    from choreograph.errors import TransportError
    from choreograph.stores.memory import MemoryStore

    failures = 2
    runs: list[str] = []
    marked: list[str] = []
    published: list[str] = []
    acked_while_failing: list[int] = []

    class Unreachable(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            nonlocal failures
            if any(m.type == Charged.event_type() for m in messages):
                if failures:
                    failures -= 1
                    acked_while_failing.append(bus.pending()[0])
                    raise TransportError("broker unreachable")
                published.extend(m.id for m in messages)
            await super().publish(messages)

    class Recording(MemoryStore):
        async def mark(self, group: str, event_ids: Collection[str]) -> None:
            assert published, "marked before its output was published"
            marked.extend(event_ids)
            await super().mark(group, event_ids)

    bus = Unreachable()
    payment = Service("payment")

    @payment.on(Placed)
    async def charge(order: Placed) -> Charged:
        runs.append(order.order_id)
        return Charged(order_id=order.order_id)

    async with Worker([payment], bus, store=Recording()):
        [placed] = await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert runs == ["a"]  # not re-run for the failed publishes
    assert acked_while_failing == [1, 1]  # still in flight while its output could not go out
    assert len(published) == 1 and marked == [placed.id]
    assert bus.pending()[0] == 0


async def test_a_fetch_whose_inbox_and_broker_both_fail_keeps_the_worker_fetching(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inbox is down, so the batch is held and its leases touched; the touch fails too
    (broker down). The fetch loop goes on (a failed release once ended it, and the worker
    silently stopped consuming) and both events are handled once."""

    from choreograph.errors import StoreError, TransportError
    from choreograph.stores.memory import MemoryStore

    inbox_down, touch_fails = 1, 1
    runs: list[str] = []

    class DownOnce(MemoryStore):
        async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
            nonlocal inbox_down
            if inbox_down:
                inbox_down -= 1
                raise StoreError("inbox unreachable")
            return await super().seen(group, event_ids)

    touch = MemoryDelivery.touch

    async def untouchable(self: MemoryDelivery) -> None:
        nonlocal touch_fails
        if touch_fails:
            touch_fails -= 1
            raise TransportError("broker unreachable")
        await touch(self)

    monkeypatch.setattr(MemoryDelivery, "touch", untouchable)
    bus = MemoryTransport("memory://?lease=0.3")
    async with Worker([_charging(runs)], bus, store=DownOnce(), poll_interval=0.05):
        await Publisher(bus).publish(Placed(order_id="a"))
        for _ in range(300):  # the fetch loop's back-off (a third of the lease)
            if runs == ["a"] and bus.pending()[0] == 0:
                break
            await asyncio.sleep(0.02)
        await Publisher(bus).publish(Placed(order_id="b"))
        await settled(bus)
    assert inbox_down == 0 and touch_fails == 0
    assert runs == ["a", "b"]
    assert bus.pending()[0] == 0


async def test_a_transport_closed_under_the_worker_is_not_retried_for_ever_and_nothing_is_acked() -> None:
    """A closed transport never heals: settling gives up at once (it retried every few seconds
    until stop before) and leaves the input unacked and unmarked for the broker to hand on."""

    from choreograph.errors import TransportClosed
    from choreograph.stores.memory import MemoryStore

    publishes: list[int] = []
    marked: list[str] = []

    class Closing(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            if any(m.type == Charged.event_type() for m in messages):
                publishes.append(len(messages))
                raise TransportClosed("memory transport is closed")
            await super().publish(messages)

    class Recording(MemoryStore):
        async def mark(self, group: str, event_ids: Collection[str]) -> None:
            marked.extend(event_ids)
            await super().mark(group, event_ids)

    bus = Closing()
    runs: list[str] = []
    async with Worker([_charging(runs)], bus, store=Recording()):
        await Publisher(bus).publish(Placed(order_id="a"))
        for _ in range(200):
            if publishes:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # the old loop tried again after 0.05, 0.1, 0.2 s ...
        assert publishes == [1]
        assert bus.pending()[0] == 1 and not marked  # still held: the lease hands it on
    assert runs == ["a"]


async def test_a_fetch_loop_whose_transport_was_closed_under_it_stops_fetching(caplog: pytest.LogCaptureFixture) -> None:
    """A closed transport never comes back: one error, not a warning every 0.5 s until stop."""
    bus = MemoryTransport()
    async with Worker([_charging([])], bus, poll_interval=0.05):
        await bus.close()
        await asyncio.sleep(1.2)  # the old loop logged again after 0.5 and 1.0 s
    fetch_logs = [r for r in caplog.records if r.getMessage().startswith("fetch failed for payment")]
    assert len(fetch_logs) == 1 and "no longer fetching" in fetch_logs[0].getMessage()


@pytest.mark.parametrize("events", [1, 2], ids=["own-task", "settle-loop"])
async def test_a_batch_given_up_on_transport_closed_is_handled_again_when_its_lease_ends(events: int) -> None:
    """Its ids leave the in-flight set when settling gives up: a copy handed on after the lease
    runs the handler again and publishes (before, the copy was deferred as "in flight" for ever).
    One event settles in its own task (3.11); two in flight at once go through the settle loop."""
    closed_once: list[str] = []  # the task that gave up
    published: list[str] = []

    class ClosedOnce(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            outputs = [m for m in messages if m.type == Charged.event_type()]
            if outputs and not closed_once:
                task = asyncio.current_task()
                closed_once.append(task.get_name() if task is not None else "")
                raise TransportClosed("memory transport is closed")
            published.extend(orjson.loads(m.body)["data"]["order_id"] for m in outputs)
            await super().publish(messages)

    from choreograph.errors import TransportClosed

    bus = ClosedOnce("memory://?lease=0.3")
    runs: list[str] = []
    payment = Service("payment")
    names = ["a", "b"][:events]
    together = asyncio.Event()

    @payment.on(Placed)
    async def charge(order: Placed) -> Charged:
        runs.append(order.order_id)
        # The first runs: in flight together, and resumed in one loop iteration by the test,
        # so each finds the other still in hand (two timers could fire an iteration apart and
        # let the second take the lane: the test was flaky so).
        await together.wait()
        return Charged(order_id=order.order_id)

    async with Worker([payment], bus, poll_interval=0.05):
        await Publisher(bus).publish(*(Placed(order_id=name) for name in names))
        await until(lambda: len(runs) == events)
        together.set()
        await settled(bus)
    assert len(closed_once) == 1
    if events == 2:  # the first outcome found the other handler in flight: the settle loop's
        assert closed_once[0].startswith("choreograph-settle-")
    assert sorted(runs) == sorted(names * 2)  # each handled again after its lease
    assert sorted(published) == names


class _GatedOutputs(MemoryTransport):
    """Holds the worker's outputs (Charged) at a gate; says when the first one reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.reached = asyncio.Event()

    async def publish(self, messages: Sequence[Message]) -> None:
        if any(m.type == Charged.event_type() for m in messages):
            self.reached.set()
            await self.gate.wait()
        await super().publish(messages)


def _charging(runs: list[str]) -> Service:
    payment = Service("payment")

    @payment.on(Placed)
    async def charge(order: Placed) -> Charged:
        runs.append(order.order_id)
        return Charged(order_id=order.order_id)

    return payment


async def test_stopping_while_a_lone_event_is_settled_by_its_task_settles_it_within_the_grace() -> None:
    """The fast lane is settle work, not a handler: the drain timeout does not cancel it."""
    bus, runs = _GatedOutputs(), []
    worker = Worker([_charging(runs)], bus, drain_timeout=0.01)
    await worker.start()
    await asyncio.sleep(0.05)  # the settle loop is idle, waiting: the lane is open
    await Publisher(bus).publish(Placed(order_id="a"))
    await bus.reached.wait()  # the handler returned; its output is on the way
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.1)  # well past the drain timeout
    bus.gate.set()
    await stopping
    group = bus.bus.groups["payment"]  # (pending() counts only groups with a consumer)
    assert runs == ["a"] and len(group.ready) + len(group.inflight) == 0  # settled, not left for the lease
    assert worker.stats().released == 0


async def test_stopping_with_the_broker_unreachable_gives_a_lane_the_grace_not_the_drain_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from choreograph.runtime import _runner as runner_module

    monkeypatch.setattr(runner_module, "STOP_GRACE", 0.2)
    bus, runs = _GatedOutputs(), []  # the gate never opens: the broker is gone
    worker = Worker([_charging(runs)], bus, drain_timeout=3600)
    await worker.start()
    await asyncio.sleep(0.05)  # the settle loop is idle, waiting: the lane is open
    await Publisher(bus).publish(Placed(order_id="a"))
    await bus.reached.wait()
    await asyncio.wait_for(worker.stop(), 60)  # before: waited the whole hour of drain timeout
    group = bus.bus.groups["payment"]
    assert runs == ["a"] and len(group.ready) + len(group.inflight) == 1  # unsettled: back after its lease


async def test_a_lane_frees_its_slot_so_the_next_event_runs_while_it_publishes() -> None:
    """With concurrency 1 a lone event's task settling its outcome must not hold the only slot."""
    bus, runs = _GatedOutputs(), []
    async with Worker([_charging(runs)], bus, concurrency=1):
        await asyncio.sleep(0.05)  # the settle loop is idle, waiting: the lane is open
        await Publisher(bus).publish(Placed(order_id="a"))
        await bus.reached.wait()
        await Publisher(bus).publish(Placed(order_id="b"))
        for _ in range(1000):
            if runs == ["a", "b"]:
                break
            await asyncio.sleep(0.01)
        assert runs == ["a", "b"]  # "b" ran while "a"'s output was still held at the gate
        bus.gate.set()
        await settled(bus)
    assert bus.pending()[0] == 0


@pytest.fixture
def small_bound(monkeypatch: pytest.MonkeyPatch) -> int:
    """At most 8 deliveries in hand for a worker of concurrency 4 (the default floor is 1,024)."""
    from choreograph.runtime import _runner as runner_module

    monkeypatch.setattr(runner_module, "UNSETTLED_FLOOR", 0)
    monkeypatch.setattr(runner_module, "UNSETTLED_PER_SLOT", 2)
    return 8


async def test_while_outputs_cannot_be_published_the_worker_holds_a_bounded_number(small_bound: int) -> None:
    """Handlers that ran (inline or in a task) free their slot before their outcome is
    settled; deliveries in hand are bounded anyway, so a stalled publish does not let the
    fetch loop take the whole backlog (and hold leases it does not extend)."""
    bus, runs = _GatedOutputs(), []
    async with Worker([_charging(runs)], bus, concurrency=4):
        await Publisher(bus).publish(*(Placed(order_id=str(n)) for n in range(50)))
        await bus.reached.wait()
        await until(lambda: len(runs) >= small_bound)
        await asyncio.sleep(0.2)  # room for more to run, were there no bound
        group = bus.bus.groups["payment"]
        assert len(runs) == small_bound == len(group.inflight)
        assert len(group.ready) == 50 - small_bound  # the rest waits on the broker
        bus.gate.set()
        await settled(bus)
    assert sorted(runs, key=int) == [str(n) for n in range(50)]


async def test_copies_of_an_event_in_hand_count_against_the_bound_too(small_bound: int) -> None:
    """A copy of an event being settled is deferred, not handled: it has no id in hand of its
    own, but its outcome waits behind the stalled publish all the same. Outcomes waiting for
    the settle loop count; the batches it has taken (one publishing, one finishing) do not,
    so what is in hand stays under three times the bound - and no longer grows with the copies."""
    bus, runs = _GatedOutputs(), []
    async with Worker([_charging(runs)], bus, concurrency=4):
        message = to_message(first_envelope(Placed(order_id="a"), source="/test", id="evt-1"))
        other = to_message(first_envelope(Placed(order_id="b"), source="/test", id="evt-2"))
        await bus.publish([message, other])  # a batch of two: the settle loop publishes it, not a lane
        await bus.reached.wait()  # "a" and "b" are handled; their outputs are held at the gate
        await bus.publish([message] * 50)
        group = bus.bus.groups["payment"]
        await until(lambda: len(group.inflight) >= small_bound)
        await asyncio.sleep(0.2)  # room for every copy to be taken, were there no bound
        assert small_bound <= len(group.inflight) <= 3 * small_bound
        assert len(group.ready) == 52 - len(group.inflight)
        bus.gate.set()
        await settled(bus)
    assert sorted(runs) == ["a", "b"]


async def test_two_copies_of_one_event_in_a_batch_run_the_handler_once() -> None:
    """On 3.12 a handler that does not suspend finishes inside the fetch loop's pass over the
    batch (eager start); settling it there made the second copy look new."""
    bus, runs = MemoryTransport(), []
    async with Worker([_charging(runs)], bus) as worker:
        await asyncio.sleep(0.05)  # the settle loop is idle, waiting: the lane would be open
        message = to_message(first_envelope(Placed(order_id="a"), source="/test", id="evt-1"))
        await bus.publish([message, message])
        await settled(bus)
    assert runs == ["a"]
    assert worker.stats().duplicates + worker.stats().deferred >= 1


async def test_a_lone_events_outputs_are_published_by_its_own_task_not_the_settle_loop() -> None:
    """The fast lane: the handler's task settles a lone success itself (a loop iteration less
    on every hop); under a batch the settle loop publishes as before."""
    publishers: list[str] = []

    class Recording(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            if any(m.type == Charged.event_type() for m in messages):
                task = asyncio.current_task()
                publishers.append(task.get_name() if task is not None else "")
            await super().publish(messages)

    bus = Recording()
    payment = Service("payment")

    @payment.on(Placed)
    async def charge(order: Placed) -> Charged:
        await asyncio.sleep(0)  # suspends: on 3.12 too the task is past its eager first step
        return Charged(order_id=order.order_id)

    async with Worker([payment], bus):
        await asyncio.sleep(0.05)  # the settle loop is idle
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
        await Publisher(bus).publish(*(Placed(order_id=str(n)) for n in range(20)))
        await settled(bus)
    assert not publishers[0].startswith("choreograph-settle-")  # the lone event: its own task
    assert any(name.startswith("choreograph-settle-") for name in publishers[1:])  # the batch: the settle loop


# -- handlers that cannot suspend run inline ----------------------------------------------


async def _plain(event: Event) -> None:
    return None


async def _awaits(event: Event) -> None:
    await asyncio.sleep(0)


async def _async_with(event: Event) -> None:
    async with asyncio.Lock():
        pass


async def _async_for(event: Event) -> None:
    async def gen() -> Any:
        yield 1

    async for _ in gen():
        pass


async def _awaits_in_a_comprehension(event: Event) -> list[Any]:
    return [await asyncio.sleep(0) for _ in range(2)]


def _not_async(event: Event) -> None:
    return None


class _Callable:
    async def __call__(self, event: Event) -> None:
        return None


class _ReportsAnotherCode:
    """Like a wrapt proxy: reports the wrapped function's ``__code__`` but runs its own wrapper."""

    __code__ = _plain.__code__

    def __call__(self, event: Event) -> Any:
        return _awaits(event)


@pytest.mark.parametrize(("func", "inline"), [
    (_plain, True),
    (_awaits, False),
    (_async_with, False),
    (_async_for, False),
    (_awaits_in_a_comprehension, False),
    (_not_async, False),
    (_Callable(), True),  # what runs is __call__, which has no await
    (functools.partial(_plain), True),
    (_ReportsAnotherCode(), False),  # judged by the coroutine that runs, not by __code__
])
def test_only_a_coroutine_whose_code_has_no_await_counts_as_never_suspending(func: Any, inline: bool) -> None:
    coro = func(None)
    try:
        assert never_suspends(coro) is inline
    finally:
        if inspect.iscoroutine(coro):
            coro.close()


async def test_a_handler_without_await_runs_inline_and_one_that_awaits_gets_a_task(
        bus: MemoryTransport, handler_path: str) -> None:
    tasks: dict[str, list[asyncio.Task[Any] | None]] = {"plain": [], "awaits": []}
    svc = Service("paths")

    @svc.on(Placed)
    async def plain(order: Placed) -> None:
        tasks["plain"].append(asyncio.current_task())

    @svc.on(Charged)
    async def awaits(charged: Charged) -> None:
        tasks["awaits"].append(asyncio.current_task())
        await asyncio.sleep(0)

    async with Worker([svc], bus):
        publisher = Publisher(bus)
        await publisher.publish(Placed(order_id="a"), Placed(order_id="b"), Charged(order_id="a"), Charged(order_id="b"))
        await settled(bus)
    assert len(tasks["plain"]) == len(tasks["awaits"]) == 2
    assert tasks["awaits"][0] is not tasks["awaits"][1]
    fetch_loop = [t for t in tasks["plain"] if t is not None and t.get_name().startswith("choreograph-fetch-")]
    assert len(fetch_loop) == (2 if handler_path == "inline" else 0)


async def test_a_lone_inline_event_is_published_before_the_next_fetch(handler_path: str) -> None:
    """At a light load the fetch loop settles a lone inline event itself before it fetches
    again (on 3.12 also one whose task finished in its eager first step); a handler in a
    task on 3.11 leaves the publish to the settle loop, after the next fetch."""
    calls: list[str] = []

    class Recording(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            calls.extend(f"publish {m.type}" for m in messages)
            await super().publish(messages)

        async def subscribe(self, group: str, types: Any) -> Any:
            sub = await super().subscribe(group, types)
            fetch = sub.fetch

            async def recording_fetch(max_messages: int, timeout: float | None = None) -> Any:
                calls.append("fetch")
                return await fetch(max_messages, timeout)

            sub.fetch = recording_fetch  # type: ignore[method-assign]
            return sub

    bus = Recording()
    async with Worker([_charging([])], bus, poll_interval=30):
        await asyncio.sleep(0.05)  # the settle loop is idle, waiting: the lane is open
        calls.clear()
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    output = f"publish {Charged.event_type()}"
    if handler_path == "inline" or _EAGER_TASKS:  # 3.12: the task finished in its eager first step
        assert calls[:3] == [f"publish {Placed.event_type()}", output, "fetch"]
    else:
        assert calls.index("fetch") < calls.index(output)


async def test_a_handler_taken_for_inline_that_suspends_after_all_goes_on_in_a_task(
    bus: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the bytecode check ever be wrong, the started coroutine is handed to a task,
    which awaits what it awaits and settles its outcome as usual: nothing is lost or stuck."""
    import choreograph.runtime.worker as worker_module

    monkeypatch.setattr(worker_module, "never_suspends", lambda coro: True)
    svc = Service("misjudged")
    finished: list[str] = []

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> Charged | None:
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)  # a future
        if order.order_id == "reject":
            raise Reject("after two awaits")
        finished.append(order.order_id)
        return Charged(order_id=order.order_id)

    sink = Recorder("sink", Charged)
    async with Worker([svc, sink], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="a"), Placed(order_id="reject"), Placed(order_id="b"))
        await settled(bus)
        stats = worker.stats("misjudged")
    assert sorted(finished) == ["a", "b"]
    assert sorted(data["order_id"] for _, data, _ in sink.received) == ["a", "b"]
    [letter] = await bus.dead_letters("misjudged")
    assert letter.record["reason"] == "rejected"
    assert (stats.handled, stats.dead_lettered) == (2, 1)


async def test_a_failing_inline_handler_works_under_a_task_factory_that_enters_the_context_at_once(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    """3.12's eager task factory runs a task's first step inside create_task, in the task's
    context: the task recording an inline failure must be created outside that context."""
    loop = asyncio.get_running_loop()

    def entering(loop: asyncio.AbstractEventLoop, coro: Any, context: contextvars.Context | None = None) -> Any:
        context = context or contextvars.copy_context()
        context.run(lambda: None)  # raises if the context is entered already
        return asyncio.Task(coro, loop=loop, context=context)

    attempts: list[int] = []
    svc = Service("entering", retry=RetryPolicy(max_attempts=2, base=1.0, jitter=False))

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("always")

    loop.set_task_factory(entering)
    try:
        async with Worker([svc], bus, clock=clock) as worker:
            await Publisher(bus).publish(Placed(order_id="a"))
            await settled(bus)
            stats = worker.stats("entering")
    finally:
        loop.set_task_factory(None)
    assert attempts == [1, 2]
    assert (stats.retried, stats.dead_lettered) == (1, 1)


async def test_what_a_handler_sets_in_a_context_variable_stays_its_own(bus: MemoryTransport) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen = []
    svc = Service("ctxvars")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        seen.append((var.get(), current_context() is not None))
        var.set(order.order_id)

    async with Worker([svc], bus):
        await Publisher(bus).publish(Placed(order_id="a"), Placed(order_id="b"), Placed(order_id="c"))
        await settled(bus)
        assert var.get() == "unset" and current_context() is None
    assert seen == [("unset", True)] * 3


async def test_an_inline_handler_that_fails_is_retried_then_succeeds(bus: MemoryTransport, clock: VirtualClock) -> None:
    attempts = []
    svc = Service("flaky")

    @svc.on(Placed, retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False))
    async def handle(order: Placed, ctx: Context) -> Charged:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError("not yet")
        return Charged(order_id=order.order_id)

    sink = Recorder("sink", Charged)
    async with Worker([svc, sink], bus, clock=clock) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert attempts == [1, 2, 3]
    assert [data for _, data, _ in sink.received] == [{"order_id": "a"}]
    assert worker.stats("flaky").retried == 2


class _Marks(MemoryStore):
    """An inbox that records each mark call's ids."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    async def mark(self, group: str, event_ids: Collection[str]) -> None:
        self.calls.append(sorted(event_ids))
        await super().mark(group, event_ids)


class _Outputs(MemoryTransport):
    """Records every published message's type."""

    def __init__(self) -> None:
        super().__init__()
        self.types: list[str] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.types += [m.type for m in messages]
        await super().publish(messages)


class _Nothing(Event, type="test.worker.mark.nothing"):
    n: int


class _One(Event, type="test.worker.mark.one"):
    n: int


class _Several(Event, type="test.worker.mark.several"):
    n: int


class _Awaiting(Event, type="test.worker.mark.awaiting"):
    n: int


async def test_every_handled_event_is_marked_in_the_inbox_whatever_its_handler_returned() -> None:
    """Nothing, one event, a list, events published with ``ctx.publish``; with or without an
    ``await`` (inline or in a task); alone or in a batch: each handled input is recorded once."""
    svc = Service("marking")

    @svc.on(_Nothing)
    async def nothing(event: _Nothing) -> None:
        pass

    @svc.on(_One)
    async def one(event: _One) -> Charged:
        return Charged(order_id=str(event.n))

    @svc.on(_Several, emits=[Charged, Shipped])
    async def several(event: _Several, ctx: Context) -> list[Event]:
        ctx.publish(Charged(order_id=str(event.n)))
        return [Shipped(order_id=str(event.n))]

    @svc.on(_Awaiting)
    async def awaiting(event: _Awaiting) -> Charged:
        await asyncio.sleep(0)
        return Charged(order_id=str(event.n))

    kinds = (_Nothing, _One, _Several, _Awaiting)
    bus, store, published = MemoryTransport(), _Marks(), []
    async with Worker([svc], bus, store=store):
        for kind in kinds:  # one at a time: each alone in hand
            published += await Publisher(bus).publish(kind(n=0))
            await settled(bus)
        published += await Publisher(bus).publish(*(kind(n=n) for n in (1, 2) for kind in kinds))  # together
        await settled(bus)
    marked = [event_id for call in store.calls for event_id in call]
    assert sorted(marked) == sorted(envelope.id for envelope in published)


async def test_inputs_are_marked_and_acked_ack_delay_after_their_outputs_in_one_commit() -> None:
    """Outputs go out at once; marking and acking the inputs waits ``ack_delay``, and what was
    published meanwhile - here two lone events, each published by its own lane - shares one
    inbox commit and one ack. ``stop()`` does not wait out the delay."""
    bus, runs, store = _Outputs(), [], _Marks()
    worker = Worker([_charging(runs)], bus, store=store)
    worker.ack_delay = 3600.0  # past the constructor's bound: only stop() can end the wait
    await worker.start()
    await asyncio.sleep(0.05)  # the settle loop is idle: each lone event takes the lane
    await Publisher(bus).publish(Placed(order_id="a"))
    await until(lambda: runs == ["a"] and bus.types.count(Charged.event_type()) == 1)
    await Publisher(bus).publish(Placed(order_id="b"))
    await until(lambda: runs == ["a", "b"] and bus.types.count(Charged.event_type()) == 2)
    group = bus.bus.groups["payment"]
    assert runs == ["a", "b"] and len(group.inflight) == 2 and store.calls == []  # published, not yet settled
    await asyncio.wait_for(worker.stop(), 60)
    assert len(store.calls) == 1 and len(store.calls[0]) == 2
    assert bus.pending()[0] == 0


async def test_a_long_ack_delay_gives_way_to_the_bound_on_deliveries_in_hand(small_bound: int) -> None:
    """Outcomes waiting for their marks and acks are in hand: past half the bound the finisher
    settles at once rather than stall the fetch loop for the rest of the delay."""
    bus, runs = MemoryTransport(), []
    worker = Worker([_charging(runs)], bus, concurrency=4)
    worker.ack_delay = 3600.0
    async with worker:
        await Publisher(bus).publish(*(Placed(order_id=str(n)) for n in range(50)))
        await until(lambda: len(runs) == 50)
        await until(lambda: len(bus.bus.groups["payment"].inflight) < small_bound)
    assert sorted(runs, key=int) == [str(n) for n in range(50)]


def test_ack_delay_is_checked() -> None:
    with pytest.raises(ValueError, match="ack_delay"):
        Worker([_charging([])], MemoryTransport(), ack_delay=-0.001)
    with pytest.raises(ValueError, match="ack_delay"):
        Worker([_charging([])], MemoryTransport(), ack_delay=2)


@pytest.mark.parametrize("drain_timeout", [-5.0, float("nan")])
def test_drain_timeout_is_checked(drain_timeout: float) -> None:
    with pytest.raises(ValueError, match="drain_timeout: must be >= 0 seconds"):
        Worker([_charging([])], MemoryTransport(), drain_timeout=drain_timeout)


def _placed(order_id: str, event_id: str) -> Message:
    return to_message(first_envelope(Placed(order_id=order_id), source="/test", id=event_id))


async def test_copies_stay_bounded_while_the_inbox_mark_is_stalled(small_bound: int) -> None:
    """A copy has no id in hand: while the finisher is stuck marking, the settle loop must not
    hand it more (that kept the fetch loop at the bound); it took all 50 copies before."""

    class GatedMarks(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.reached = asyncio.Event(), asyncio.Event()

        async def mark(self, group: str, event_ids: Collection[str]) -> None:
            self.reached.set()
            await self.gate.wait()
            await super().mark(group, event_ids)

    bus, runs, store = MemoryTransport(), [], GatedMarks()
    async with Worker([_charging(runs)], bus, store=store, concurrency=4) as worker:
        runner = worker.runners[0]
        message = _placed("a", "evt-1")
        await bus.publish([message, _placed("b", "evt-2")])  # a batch of two: the settle loop's
        await store.reached.wait()  # published; marking "a" and "b" is held
        await bus.publish([message] * 50)  # copies of "a", deferred while "a" is in hand
        group = bus.bus.groups["payment"]
        await until(lambda: not runner.slot_free.is_set() or not group.ready)  # at the bound, or took all
        assert group.ready and len(group.inflight) <= 3 * small_bound
        store.gate.set()
        await settled(bus)
    assert sorted(runs) == ["a", "b"]


async def test_duplicates_stay_bounded_while_acks_are_stalled(small_bound: int) -> None:
    """The same with inbox duplicates (handled before, their acks lost) and a stalled ack."""

    class GatedAcks(MemoryTransport):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.reached = asyncio.Event(), asyncio.Event()

        async def subscribe(self, group: str, types: Collection[str] | None) -> Any:
            sub = await super().subscribe(group, types)
            ack_many = sub.ack_many

            async def gated(deliveries: Sequence[Any]) -> None:
                self.reached.set()
                await self.gate.wait()
                await ack_many(deliveries)

            sub.ack_many = gated  # type: ignore[method-assign]
            return sub

    bus, runs = GatedAcks(), []
    async with Worker([_charging(runs)], bus, concurrency=4) as worker:
        runner = worker.runners[0]
        messages = [_placed(str(n), f"evt-{n}") for n in range(60)]
        await worker.store.mark("payment", [m.id for m in messages])
        await bus.publish(messages[:2])
        await bus.reached.wait()
        await bus.publish(messages[2:])
        group = bus.bus.groups["payment"]
        await until(lambda: not runner.slot_free.is_set() or not group.ready)
        assert group.ready and len(group.inflight) <= 3 * small_bound
        bus.gate.set()
        await settled(bus)
    assert runs == [] and worker.stats().duplicates == 60


async def test_the_ack_delay_stays_well_inside_the_lease() -> None:
    """Inputs waiting for their marks and acks get no lease touches: a delay as long as the
    lease handed every one of them out again (the inbox made the copies harmless)."""
    bus, runs = MemoryTransport("memory://?lease=1"), []
    worker = Worker([_charging(runs)], bus)
    worker.ack_delay = 3.0  # past the constructor's bound and the lease: waits lease / 4
    async with worker:
        await Publisher(bus).publish(*(Placed(order_id=str(n)) for n in range(3)))
        await settled(bus)
    assert sorted(runs) == ["0", "1", "2"]
    assert worker.stats().duplicates == 0 and worker.stats().deferred == 0


async def test_a_copy_whose_original_settles_during_the_inbox_lookup_is_not_run_again() -> None:
    """The fetch loop looked up only ids not in hand; a copy of an event in hand whose original
    was marked and acked while the lookup awaited was then neither deferred (no longer in
    hand) nor a duplicate (not looked up): its handler ran a second time."""

    class GatedSeen(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.armed, self.gate, self.reached = False, asyncio.Event(), asyncio.Event()

        async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
            if self.armed:
                self.armed = False
                self.reached.set()
                await self.gate.wait()
            return await super().seen(group, event_ids)

    bus, runs, store = MemoryTransport(), [], GatedSeen()
    worker = Worker([_charging(runs)], bus, store=store)
    worker.ack_delay = 3600.0  # "a" stays in hand, published, until the test lets it finish
    async with worker:
        runner = worker.runners[0]
        message = _placed("a", "evt-1")
        await bus.publish([message])
        await until(lambda: runs == ["a"] and runner.unfinished == 1)
        store.armed = True
        await bus.publish([message, _placed("b", "evt-2")])  # a copy of "a", and "b" to look up
        await store.reached.wait()  # the fetch loop awaits the lookup
        runner.finish_due.set()  # meanwhile "a" is marked and acked
        await until(lambda: runner.unfinished == 0 and "evt-1" not in runner.active_ids)
        store.gate.set()
        await until(lambda: "b" in runs)
        await settled(bus)
    assert sorted(runs) == ["a", "b"]


@pytest.mark.parametrize("events", [1, 4], ids=["lane", "settle-loop"])
async def test_a_publish_that_fails_for_a_while_is_retried_and_its_log_names_the_events(
    events: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker refuses the outputs twice: the worker publishes them again after a pause,
    and each error line says which events wait (to grep for them) and when it tries again."""
    from choreograph.errors import TransportError

    refusals = 2

    class Refusing(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            nonlocal refusals
            if refusals and any(m.type == Charged.event_type() for m in messages):
                refusals -= 1
                raise TransportError("broker unreachable")
            await super().publish(messages)

    bus, runs = Refusing(), []
    charged: list[Envelope] = []
    sink = Service("sink")

    @sink.on(Charged)
    async def seen(event: Charged, ctx: Context) -> None:
        charged.append(ctx.envelope)

    async with Worker([_charging(runs), sink], bus):
        await asyncio.sleep(0.05)  # the settle loop is idle: a lone event takes the lane
        placed = await Publisher(bus).publish(*(Placed(order_id=str(i)) for i in range(events)))
        await settled(bus)
    assert sorted(runs) == [str(i) for i in range(events)] and len(charged) == events
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("settling ")]
    assert len(lines) == 2
    noun = "outcome" if events == 1 else "outcomes"
    assert lines[0].startswith(f"settling {events} {noun} (event ")
    assert all(envelope.id in lines[0] for envelope in placed[:3])
    assert lines[0].endswith("failed: broker unreachable; retrying in 0.05s")
    assert lines[1].endswith("retrying in 0.10s")
    if events > 3:
        assert f"and {events - 3} more)" in lines[0]


async def test_a_handled_event_whose_outputs_wait_for_the_broker_keeps_its_lease(clock: VirtualClock) -> None:
    """The broker refuses the outputs for four leases (a full backlog downstream): the
    handler's replica holds on to the input meanwhile, so the other replica never gets it
    and the handler runs once; the output is published once the broker takes it.
    On the clock: in real time a loaded machine that did not run the touch loop for 0.4 s
    let the lease run out, and the other replica ran the handler again."""
    from choreograph.errors import TransportError

    refusing_until = clock.monotonic() + 2.4  # four leases (a touch tick is a third of one)

    class Refusing(MemoryTransport):
        async def publish(self, messages: Sequence[Message]) -> None:
            if clock.monotonic() < refusing_until and any(m.type == Charged.event_type() for m in messages):
                raise TransportError("backlog full")
            await super().publish(messages)

    bus = Refusing("memory://?lease=0.6", clock=clock)
    runs: list[str] = []
    charged: list[str] = []
    sink = Service("sink")

    @sink.on(Charged)
    async def seen(event: Charged) -> None:
        charged.append(event.order_id)

    store = MemoryStore()  # the two replicas share their inbox, as on a real store
    async with Worker([_charging(runs)], bus, store=store), Worker([_charging(runs)], bus, store=store), \
            Worker([sink], bus):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert clock.monotonic() >= refusing_until
    assert runs == ["a"] and charged == ["a"]


class Other(Event, type="test.worker.other"):
    n: int


async def test_an_event_of_a_type_this_version_does_not_subscribe_to_is_handed_back_then_dead_lettered(
        clock: VirtualClock, bus: MemoryTransport) -> None:
    """The group is bound to a type this version of the service does not handle (another
    version subscribed it): not acked - that would lose it for the replicas that handle it -
    but handed back with a growing delay, then dead-lettered ``unhandled`` with its record,
    no inbox mark (a later version must not take it for a duplicate) and no failure event
    (nothing failed: no compensation runs)."""

    class Recording(MemoryStore):
        marked: list[str] = []

        async def mark(self, group: str, event_ids: Collection[str]) -> None:
            self.marked.extend(event_ids)
            await super().mark(group, event_ids)

    store = Recording()
    watcher = Service("watcher")
    failures: list[Failure] = []

    @watcher.on_failure(Other)
    async def on_other_failure(failure: Failure) -> None:
        failures.append(failure)

    async with Worker([_charging([]), watcher], bus, store=store, clock=clock) as worker:
        await (await bus.subscribe("payment", [Other.event_type()])).close()  # another version's binding
        placed, other = await Publisher(bus).publish(Placed(order_id="a"), Other(n=1))
        await settled(bus)
        stats = worker.stats("payment")
    assert store.marked == [placed.id]
    assert stats.handed_back == HANDOVER_ATTEMPTS - 1 and stats.ignored == 0
    [letter] = await bus.dead_letters("payment")
    assert letter.message.id == other.id and letter.record["reason"] == "unhandled"
    assert letter.record["attempts"] == HANDOVER_ATTEMPTS
    assert "test.worker.other" in letter.record["last_error"]["message"]
    assert failures == []
    # 1 + 2 + 4 + 8 + 16 s, then 30 s apart: about ten minutes before it is given up
    assert 600 <= clock.monotonic() - 1_000_000.0 <= 700


async def test_in_a_rolling_deploy_the_version_that_handles_a_new_type_gets_every_event_of_it(
        clock: VirtualClock, bus: MemoryTransport) -> None:
    """Old and new replicas of one group side by side; only the new one handles ``Other``.
    Every Other event ends in the new replica, none is lost to the old one."""
    old = _charging([])
    new = Service("payment")
    got: list[int] = []

    @new.on(Placed)
    async def charge(order: Placed) -> Charged:
        return Charged(order_id=order.order_id)

    @new.on(Other)
    async def other(event: Other) -> None:
        got.append(event.n)

    async with Worker([old], bus, clock=clock) as old_worker, Worker([new], bus, clock=clock):
        await Publisher(bus).publish(*(Other(n=i) for i in range(20)))
        await settled(bus)
        handed_back = old_worker.stats("payment").handed_back
    assert sorted(got) == list(range(20))
    assert handed_back > 0  # the old replica did get some first (competing consumers)
    assert await bus.dead_letters("payment") == []


async def test_a_replayed_dead_letter_starts_a_fresh_failure_history() -> None:
    """Dead-lettering clears the event's recorded failures: after a replay its next dead
    letter's record starts at the replay, not at the first run's first attempt."""
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    svc = Service("fragile", retry=RetryPolicy(max_attempts=2, base=1.0, jitter=False))

    @svc.on(Placed)
    async def fail(order: Placed) -> None:
        raise RuntimeError(f"down at {clock.time():.0f}")

    async with Worker([svc], bus, clock=clock):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
        [first] = await bus.dead_letters("fragile")
        clock.advance(100)
        await bus.replay("fragile")
        await settled(bus)
        [second] = await bus.dead_letters("fragile")
    assert second.record["first_attempt_at"] >= first.record["last_attempt_at"] + 100
    assert second.record["first_error"]["message"] != first.record["first_error"]["message"]


async def test_a_handlers_own_retry_policy_and_timeout_override_its_services(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    svc = Service("policies", retry=RetryPolicy(max_attempts=6, base=1.0, jitter=False), timeout=30.0)
    attempts: list[int] = []

    @svc.on(Placed, retry=RetryPolicy(max_attempts=2, base=1.0, jitter=False), timeout=5.0)
    async def handle(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("down")

    assert svc.handlers[Placed.event_type()].timeout == 5.0
    async with Worker([svc], bus, clock=clock):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert attempts == [1, 2]  # the handler's two, not the service's six
    [letter] = await bus.dead_letters("policies")
    assert letter.record["reason"] == "max_attempts" and letter.record["attempts"] == 2


async def test_the_failure_event_of_a_dead_letter_is_derived_from_the_failed_event(bus: MemoryTransport) -> None:
    """Deterministic id (a re-run after a crash publishes the same one), the failed type as its
    subject (what failure subscriptions route on), one hop more, the same transaction."""
    from choreograph._envelope import derive_id

    svc = Service("payment")

    @svc.on(Placed)
    async def refuse(order: Placed) -> None:
        raise Reject("no")

    tap = await bus.subscribe("tap", [FAILED])
    async with Worker([svc], bus):
        [placed] = await Publisher(bus).publish(Placed(order_id="a"), correlation_id="tx-1")
        [delivery] = await tap.fetch(10, timeout=5.0)
        await delivery.ack()
        await settled(bus)
    failure = decode(delivery.message.body)
    assert failure.id == derive_id(placed.id, "payment", svc.handlers[Placed.event_type()].name, "failed")
    assert (failure.type, failure.subject) == (FAILED, Placed.event_type())
    assert (failure.correlationid, failure.causationid) == ("tx-1", placed.id)
    assert failure.hops == placed.hops + 1


def test_a_nan_timeout_or_a_deadline_json_cannot_carry_is_refused_where_it_is_declared() -> None:
    """``timeout <= 0`` let nan through (a timeout that never fires), and ``within <= 0`` let nan
    and inf through: a join's deadline timer carries ``due`` in JSON, so every arrival was
    dead-lettered (EmitError). Each is a ConfigurationError naming the value when the code loads."""
    from choreograph import ConfigurationError

    nan, inf = float("nan"), float("inf")
    with pytest.raises(ConfigurationError, match="Service 'svc': timeout must be > 0 seconds, got nan"):
        Service("svc", timeout=nan)
    svc = Service("svc")
    with pytest.raises(ConfigurationError, match="Service 'svc': timeout must be > 0 seconds, got nan"):
        @svc.on(Placed, timeout=nan)
        async def handle(order: Placed) -> None: ...

    for within in (nan, inf):
        with pytest.raises(ConfigurationError, match=f"within= must be a finite number of seconds > 0, got {within}"):
            @svc.on_all(Placed, Charged, within=within)
            async def join(order: Placed, charged: Charged) -> None: ...
    with pytest.raises(ConfigurationError, match="timeout must be > 0 seconds, got nan"):
        @svc.on_all(Placed, Charged, timeout=nan)
        async def join_timeout(order: Placed, charged: Charged) -> None: ...


def test_declaring_a_service_refuses_what_could_only_fail_later() -> None:
    """A zero timeout, a second handler for one type, two services of one name in an App:
    each is a ConfigurationError naming the problem when the code is loaded."""
    from choreograph import App, ConfigurationError

    with pytest.raises(ConfigurationError, match="Service 'svc': timeout must be > 0 seconds"):
        Service("svc", timeout=0)
    svc = Service("svc")

    @svc.on(Placed)
    async def first(order: Placed) -> None: ...

    with pytest.raises(ConfigurationError, match="Service 'svc' already has an event handler for 'test.worker.placed'"):
        @svc.on(Placed)
        async def second(order: Placed) -> None: ...

    with pytest.raises(ConfigurationError, match=r"App 'shop': duplicate service names \['svc'\]"):
        App("shop", [svc, Service("svc")])


async def test_a_copy_that_arrives_while_its_original_runs_is_put_back_for_later_not_at_once() -> None:
    """Deferred by IN_FLIGHT_DEFER (virtual time, which does not move here): put back at once,
    it came straight back to the same fetch loop, a busy loop for as long as the original ran."""
    from choreograph.runtime.worker import IN_FLIGHT_DEFER

    assert IN_FLIGHT_DEFER > 0
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    gate, started = asyncio.Event(), asyncio.Event()
    svc = Service("slow")

    @svc.on(Placed)
    async def hold(order: Placed) -> None:
        started.set()
        await gate.wait()

    async with Worker([svc], bus, clock=clock) as worker:
        await Publisher(bus).publish(Placed(order_id="a"), ids=["same"])
        await started.wait()
        await Publisher(bus).publish(Placed(order_id="a"), ids=["same"])  # published twice
        await asyncio.sleep(0.3)  # real time: a copy put back at once would be fetched again and again
        deferred = worker.stats("slow").deferred
        gate.set()
        await settled(bus)
    assert deferred == 1
    assert worker.stats("slow").duplicates == 1  # once due, the inbox says it was processed


async def test_a_copy_put_back_while_its_original_runs_keeps_its_attempt_and_its_retries() -> None:
    """A copy put back (IN_FLIGHT_DEFER) for as long as its original runs has not been tried:
    when it runs at last its handler sees the attempt it was delivered with, and its failures
    get the policy's retries (put back ten times, it was dead-lettered on its first failure)."""
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    gate = asyncio.Event()
    attempts: list[int] = []
    svc = Service("slow", retry=RetryPolicy(max_attempts=3, base=0.5, jitter=False))

    @svc.on(Placed)
    async def hold(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            await gate.wait()
        if len(attempts) <= 2:
            raise RuntimeError("courier down")

    async with Worker([svc], bus, clock=clock) as worker:
        await Publisher(bus).publish(Placed(order_id="a"), ids=["same"])
        await until(lambda: bool(attempts))
        await Publisher(bus).publish(Placed(order_id="a"), ids=["same"])  # published twice
        for _ in range(10):  # the original runs on: its copy is put back again and again
            await until(lambda: clock.next_due() is not None)
            clock.advance(1.0)
            await asyncio.sleep(0.01)
        deferred = worker.stats("slow").deferred
        gate.set()  # the original fails
        await settled(bus)
    assert deferred >= 5
    assert max(attempts) <= 2, attempts  # the copy's own attempts, not one per time it was put back
    assert await bus.dead_letters("slow") == []
    assert worker.stats("slow").handled == 1


async def test_a_failure_the_inbox_cannot_record_leaves_the_event_to_run_again_after_its_lease() -> None:
    """The handler failed and the inbox refused its failure record: its task ends with the
    store's error and the lease hands the event on. Its id must leave the in-flight set then,
    or that copy was deferred as "in flight" for ever and never ran again."""
    from choreograph.errors import StoreError

    class RefusesOnce(MemoryStore):
        refused = False

        async def record_failure(self, group: str, event_id: str, error: Any, at: float) -> Any:
            if not self.refused:
                self.refused = True
                raise StoreError("inbox unreachable")
            return await super().record_failure(group, event_id, error, at)

    clock = VirtualClock()
    bus = MemoryTransport("memory://?lease=5", clock=clock)
    attempts: list[int] = []
    svc = Service("fragile")

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("down")

    store = RefusesOnce()
    async with Worker([svc], bus, store=store, clock=clock) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await until(lambda: store.refused and not worker.runners[0].active)  # the task ended with the error
        clock.advance(6)  # the lease runs out: the broker hands the event out again
        await settled(bus)
    assert store.refused and attempts == [1, 2]
    assert worker.stats("fragile").handled == 1 and worker.stats().deferred == 0


async def test_stopping_settles_every_handler_that_finishes_during_the_drain_not_only_the_first(
    bus: MemoryTransport,
) -> None:
    """Two handlers run when stop() is called and finish one after the other: the settle loop
    settles the first and must not end while the second still runs, or its outcome was never
    settled (acked) and the event came back to run again."""
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    started: list[str] = []
    svc = Service("pair")

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        started.append(order.order_id)
        await gates[order.order_id].wait()

    worker = Worker([svc], bus, drain_timeout=30)
    await worker.start()
    await Publisher(bus).publish(Placed(order_id="a"), Placed(order_id="b"))
    await until(lambda: sorted(started) == ["a", "b"])
    group = bus.bus.groups["pair"]  # (pending() counts only groups with a consumer)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)
    gates["a"].set()
    await until(lambda: len(group.ready) + len(group.inflight) == 1)  # "a" is settled, "b" still runs
    gates["b"].set()
    await asyncio.wait_for(stopping, 10)
    assert len(group.ready) + len(group.inflight) == 0  # both acked, none left for the lease
    assert worker.stats().handled == 2 and worker.stats().released == 0


@pytest.mark.parametrize("permanent", ["reject", "undeclared output"])
async def test_a_permanent_error_after_failed_attempts_keeps_the_first_failure_in_its_record(
    bus: MemoryTransport, permanent: str
) -> None:
    """Rejected at once, but not on the first attempt: the record's first error and first
    attempt time are the first failure's (they were the rejecting attempt's own)."""
    svc = Service("late-reject", retry=RetryPolicy(max_attempts=5, base=2.0, jitter=False))

    @svc.on(Placed, emits=[Charged])
    async def handle(order: Placed, ctx: Context) -> Any:
        if ctx.attempt == 1:
            raise RuntimeError("flaky")
        if permanent == "reject":
            raise Reject("never")
        return Shipped(order_id=order.order_id)  # not declared

    watcher = Service("late-reject-watch")
    failures: list[Failure] = []

    @watcher.on_failure(Placed)
    async def on_failure(failure: Failure) -> None:
        failures.append(failure)

    async with Worker([svc, watcher], bus):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    [letter] = await bus.dead_letters("late-reject")
    record = letter.record
    assert record["reason"] == "rejected" and record["attempts"] == 2
    assert record["first_error"]["type"] == "RuntimeError" and record["first_error"]["message"] == "flaky"
    assert record["last_error"]["type"] == ("Reject" if permanent == "reject" else "EmitError")
    assert record["last_attempt_at"] - record["first_attempt_at"] == 2.0
    [failure] = failures
    assert failure.record["first_error"] == record["first_error"]
    assert failure.record["first_attempt_at"] == record["first_attempt_at"]


async def test_a_handler_that_returns_after_its_timeout_cancelled_it_has_its_result_dropped(
    bus: MemoryTransport,
) -> None:
    """A handler that catches the watchdog's cancellation and returns anyway timed out all
    the same: a failed attempt, its outputs (returned or published) never published."""
    svc = Service("stubborn", retry=RetryPolicy(max_attempts=2, base=0.01, jitter=False))

    @svc.on(Placed, timeout=0.05, emits=[Charged, Shipped])
    async def handle(order: Placed, ctx: Context) -> Charged:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            ctx.publish(Shipped(order_id=order.order_id))
        return Charged(order_id=order.order_id)

    sink = Recorder("stubborn-sink", Charged, Shipped)
    async with Worker([svc, sink], bus) as worker:
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    assert sink.received == []
    assert worker.stats("stubborn").handled == 0 and worker.stats("stubborn").retried == 1
    [letter] = await bus.dead_letters("stubborn")
    assert letter.record["reason"] == "max_attempts" and letter.record["attempts"] == 2
    assert letter.record["last_error"]["type"] == "HandlerTimeout"
    assert "its result is dropped" in letter.record["last_error"]["message"]


async def test_a_drain_cut_short_while_the_inbox_looks_a_batch_up_runs_none_of_it_after_stop() -> None:
    """``release_in_flight()`` then ``stop()`` (a second Ctrl-C): stop() gave the fetch loop no
    time and returned while it still awaited the inbox lookup of a batch; the lookup answered
    later and the batch's handlers ran on a stopped worker, their outcomes never settled. The
    batch is released now, nothing runs after stop(), and the next worker gets the event."""

    class GatedSeen(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.reached = asyncio.Event(), asyncio.Event()

        async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
            self.reached.set()
            await self.gate.wait()
            return await super().seen(group, event_ids)

    bus, runs, store = MemoryTransport(), [], GatedSeen()
    worker = Worker([_charging(runs)], bus, store=store)
    await worker.start()
    await bus.publish([_placed("a", "evt-1")])
    await store.reached.wait()  # the fetch loop awaits the lookup
    worker.release_in_flight()
    await worker.stop()
    store.gate.set()
    await asyncio.sleep(0.05)
    assert runs == []
    assert all(task.done() for task in worker.runners[0].tasks)
    async with Worker([_charging(runs)], bus):
        await settled(bus)
    assert runs == ["a"]


async def test_a_rejection_after_failed_attempts_is_dead_lettered_while_the_inbox_cannot_record_it(
    bus: MemoryTransport,
) -> None:
    """A Reject on attempt 2 looks up the failure history to name the first failure; with the
    inbox down at that moment it is still dead-lettered at once (its record's first failure its
    own), not left to come back after every lease until the inbox answers."""

    class DownOnSecond(MemoryStore):
        async def record_failure(self, group: str, event_id: str, error: Any, at: float) -> Any:
            if self.calls:
                raise RuntimeError("inbox unreachable")
            self.calls += 1
            return await super().record_failure(group, event_id, error, at)

    store = DownOnSecond()
    store.calls = 0  # type: ignore[attr-defined]
    svc = Service("late-reject-down", retry=RetryPolicy(max_attempts=5, base=2.0, jitter=False))

    @svc.on(Placed)
    async def handle(order: Placed, ctx: Context) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("flaky")
        raise Reject("never")

    async with Worker([svc], bus, store=store):
        await Publisher(bus).publish(Placed(order_id="a"))
        await settled(bus)
    [letter] = await bus.dead_letters("late-reject-down")
    assert letter.record["reason"] == "rejected" and letter.record["attempts"] == 2
    assert letter.record["first_error"]["type"] == "Reject"


async def test_a_worker_whose_start_fails_closes_the_join_store_it_opened(tmp_path: Any) -> None:
    """A subscription refused after the joins were opened: the worker's own join store (in its
    SQLite inbox file) is closed again, as stop() would, not left holding its connection."""
    from choreograph.stores.joins_base import JoinKey
    from choreograph.stores.sqlite import SQLiteStore

    class Refusing(MemoryTransport):
        async def subscribe(self, group: str, types: Collection[str] | None) -> Any:
            raise ConnectionError("refused")

    worker = Worker([_charging([])], Refusing(), store=SQLiteStore(f"sqlite:///{tmp_path / 'inbox.db'}"))
    with pytest.raises(ConnectionError):
        await worker.start()
    with pytest.raises(RuntimeError, match="shutdown"):  # closed: its thread is gone with its connection
        await worker.joins.get(JoinKey("payment", "join", "tx"))


async def test_a_stopping_worker_keeps_the_leases_of_its_handlers_still_running() -> None:
    """stop() cancelled the lease touches first: a handler still running in the drain lost its
    lease, and the other replica ran the event again. Its leases are extended until it settles;
    the clock goes on through four leases, a touch tick (a third of one) at a time."""
    clock = VirtualClock(start=0.0)
    bus = MemoryTransport("memory://?lease=3", clock=clock)
    store = MemoryStore()  # the two replicas share their inbox, as on a real store
    runs: list[str] = []
    release = asyncio.Event()

    def payment() -> Service:
        svc = Service("payment")

        @svc.on(Placed)
        async def charge(order: Placed) -> None:
            runs.append(order.order_id)
            await release.wait()

        return svc

    stopping = Worker([payment()], bus, store=store, drain_timeout=math.inf)
    await stopping.start()
    try:
        await Publisher(bus).publish(Placed(order_id="a"))
        await until(lambda: runs == ["a"])
        async with Worker([payment()], bus, store=store):
            stop = asyncio.create_task(stopping.stop())
            for _ in range(12):
                clock.advance(1.0)
                for _ in range(50):
                    await asyncio.sleep(0)
            release.set()
            await stop
            await settled(bus)
    finally:
        release.set()
        await stopping.stop()
    assert runs == ["a"]


async def test_a_handler_past_its_timeout_in_a_stops_drain_times_out() -> None:
    """stop() cancelled the watchdog before the drain: a hung handler was not cut at its timeout
    but held the drain to its end (here for good), then was released. It times out, and its
    give-up is dead-lettered as at any other time."""
    bus = MemoryTransport()
    svc = Service("slow", retry=RetryPolicy(max_attempts=1))
    started = asyncio.Event()

    @svc.on(Placed, timeout=0.2)
    async def handle(order: Placed) -> None:
        started.set()
        await asyncio.Event().wait()

    worker = Worker([svc], bus, drain_timeout=math.inf)
    await worker.start()
    try:
        await Publisher(bus).publish(Placed(order_id="a"))
        await started.wait()
        await asyncio.wait_for(worker.stop(), 30.0)  # only a guard against the hang
    finally:
        worker.release_in_flight()
        await worker.stop()
    [letter] = await bus.dead_letters("slow")
    assert letter.record["last_error"]["type"] == "HandlerTimeout"


async def test_a_stop_cancelled_in_its_drain_stops_the_lease_touches_and_the_watchdog() -> None:
    """The lease touches and the watchdog go on through the drain, and were stopped only at its
    end: a stop() cancelled in the drain (a caller's timeout around it) left them running for
    good, the touches extending the leases of what was in hand for ever."""
    bus = MemoryTransport()
    svc = Service("slow")
    started = asyncio.Event()

    @svc.on(Placed)
    async def handle(order: Placed) -> None:
        started.set()
        await asyncio.Event().wait()

    worker = Worker([svc], bus, drain_timeout=math.inf)
    await worker.start()
    [runner] = worker.runners
    touch, watchdog = runner.tasks[2], runner.watchdog
    assert watchdog is not None
    try:
        await Publisher(bus).publish(Placed(order_id="a"))
        await started.wait()
        stop = asyncio.create_task(worker.stop())
        await until(lambda: runner.stopping)
        for _ in range(5):
            await asyncio.sleep(0)  # in the drain: waiting for the handler
        assert not stop.done()
        stop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stop
        for _ in range(5):
            await asyncio.sleep(0)
        assert touch.done() and watchdog.done()
    finally:
        worker.release_in_flight()
        await worker.stop()


def test_a_worker_refuses_a_service_given_twice_or_two_services_of_one_name() -> None:
    """A service's name is its consumer group: two runners of one group in one worker split its
    events, each handing back (then dead-lettering ``unhandled``) the types only the other
    handles. Accepted without a word; refused as App refuses them."""
    placed = Service("orders")

    @placed.on(Placed)
    async def take(order: Placed) -> None: ...

    shipped = Service("orders")

    @shipped.on(Shipped)
    async def ship(order: Shipped) -> None: ...

    for services in ([placed, placed], [placed, shipped]):
        with pytest.raises(ConfigurationError, match=r"services: \['orders'\] given more than once"):
            Worker(services, MemoryTransport())
    Worker([placed, _charging([])], MemoryTransport())  # distinct names: fine


def _gated_state_store(tmp_path: Any) -> tuple[Any, asyncio.Event, asyncio.Event]:
    """A service database whose open sets ``opening`` and then waits for ``gate``."""
    from choreograph.stores._state_sqlite import SQLiteStateStore

    opening, gate = asyncio.Event(), asyncio.Event()

    class Gated(SQLiteStateStore):
        async def _connect(self) -> None:
            opening.set()
            await gate.wait()
            await super()._connect()

    return Gated(f"sqlite:///{tmp_path / 'state.db'}"), opening, gate


async def test_a_stop_while_start_opens_the_inbox_store_closes_it_and_leaves_nothing_running(tmp_path: Any) -> None:
    """stop() while start() was still opening a counted inbox store (a service database): the
    worker marked it open only once open() returned, so stop() gave nothing back (and stopped
    runners that had not started), then start() went on and left the store open and the runners
    fetching. stop() now waits for the start under way and undoes all of it."""
    store, opening, gate = _gated_state_store(tmp_path)
    worker = Worker([_charging([])], MemoryTransport(), store=store, retention=None)
    starting = asyncio.create_task(worker.start())
    await opening.wait()
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)  # one turn: stop() runs up to its first suspension, inside the start
    gate.set()
    await starting
    await stopping
    assert store._refs == 0
    assert all(task.done() for runner in worker.runners for task in runner.tasks)


async def test_a_stop_before_start_stops_nothing_and_a_later_start_starts_nothing() -> None:
    """stop() before start() stopped runners that had never started (and raised); a start()
    after it then ran a worker whose wait() had already returned."""
    worker = Worker([_charging([])], MemoryTransport(), retention=None)
    await worker.stop()
    await worker.wait()
    await worker.start()
    assert all(not runner.tasks for runner in worker.runners)


async def test_a_second_start_during_a_start_returns_once_the_worker_started(tmp_path: Any) -> None:
    """Two start() at once: the second returned at once, before the first had opened the store or
    subscribed, so its caller went on with a worker not started yet (or one whose start failed)."""
    store, opening, gate = _gated_state_store(tmp_path)
    worker = Worker([_charging([])], MemoryTransport(), store=store, retention=None)
    first = asyncio.create_task(worker.start())
    await opening.wait()
    started_when_second_returned: list[bool] = []

    async def start_again() -> None:
        await worker.start()
        started_when_second_returned.append(bool(worker.runners[0].tasks))

    second = asyncio.create_task(start_again())
    gate.set()
    await first
    await second
    assert started_when_second_returned == [True]
    await worker.stop()


async def test_a_start_cancelled_in_its_first_expiry_pass_stops_the_runners_it_started() -> None:
    """start() cancelled while it expired old inbox entries (its last step, the runners already
    fetching): ``async with`` calls no ``__aexit__`` when ``__aenter__`` raises, and that step was
    outside what a failed start undoes, so the runners fetched and handled on for good."""
    expiring, gate = asyncio.Event(), asyncio.Event()

    class SlowExpiry(MemoryStore):
        async def expire(self, older_than: float) -> int:
            expiring.set()
            await gate.wait()
            return 0

    worker = Worker([_charging([])], MemoryTransport(), store=SlowExpiry())
    starting = asyncio.create_task(worker.start())
    await expiring.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert all(task.done() for runner in worker.runners for task in runner.tasks)


async def test_a_stop_after_a_failed_start_stops_nothing_and_raises_nothing() -> None:
    """``try: await worker.start() ... finally: await worker.stop()`` with the subscription refused:
    stop() stopped the runner that had never started and raised ValueError, which replaced the
    start's error."""

    class Refusing(MemoryTransport):
        async def subscribe(self, group: str, types: Collection[str] | None) -> Any:
            raise ConnectionError("refused")

    worker = Worker([_charging([])], Refusing(), retention=None)
    with pytest.raises(ConnectionError):
        try:
            await worker.start()
        finally:
            await worker.stop()
    await worker.wait()
