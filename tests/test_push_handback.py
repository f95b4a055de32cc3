"""Push: an event of a type the subscription does not deliver, in a group another subscription
(or version) bound to that type, is handed back as the worker does, never acked and lost.

The bus is the in-memory transport on a virtual clock: the hand-back delays are fast-forwarded
by ``settled()``; the receivers are real loopback HTTP servers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest

from choreograph import FAILED, Envelope, Event, Publisher, RetryPolicy
from choreograph import decode as decode_envelope
from choreograph.push import PushAmbassador, PushSubscription, generate_secret
from choreograph.runtime.records import HANDOVER_ATTEMPTS, to_message
from choreograph.stores.memory import MemoryStore
from choreograph.testing import MemoryTransport, VirtualClock, settled
from tests._push_support import Scripted
from tests._waiting import until

SECRET = generate_secret()
ORIGIN = "tests.choreograph.local"


class Assigned(Event, type="test.handback.assigned"):
    delivery_id: str


class Rerouted(Event, type="test.handback.rerouted"):
    delivery_id: str


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def bus(clock: VirtualClock) -> MemoryTransport:
    return MemoryTransport(clock=clock)


def subscription(group: str, types: Collection[str], url: str) -> PushSubscription:
    return PushSubscription(group, list(types), url, secret=SECRET,
                            retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False))


@contextlib.asynccontextmanager
async def pushing(bus: MemoryTransport, *subs: PushSubscription, **options: Any) -> AsyncIterator[PushAmbassador]:
    async with PushAmbassador(list(subs), bus, origin=ORIGIN, **options) as ambassador:
        yield ambassador


async def widen(bus: MemoryTransport, group: str, types: list[str]) -> None:
    """Bind ``group`` to ``types`` too, as another version subscribing would (no consumer stays)."""
    await (await bus.subscribe(group, types)).close()


async def watched(bus: MemoryTransport, group: str, types: list[str]) -> list[Envelope]:
    sub = await bus.subscribe(group, types)
    deliveries = await sub.fetch(1000, timeout=0)
    await sub.ack_many(deliveries)
    await sub.close()
    return [decode_envelope(d.message.body) for d in deliveries]


async def test_an_event_of_a_type_the_subscription_does_not_deliver_is_handed_back_then_dead_lettered(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    """Not acked - that would lose it for the replicas that deliver it - and not POSTed, but
    handed back after 1 s, 2 s, ... for HANDOVER_ATTEMPTS deliveries, then dead-lettered
    ``unhandled`` with its record, no inbox mark and no failure event."""
    group = "handback-dead"
    store = MemoryStore()
    hook = Scripted(204)
    await (await bus.subscribe("handback-observer", [FAILED])).close()
    async with hook.running() as url, pushing(bus, subscription(group, [Assigned.event_type()], url),
                                              store=store) as ambassador:
        await widen(bus, group, [Rerouted.event_type()])  # the other version's binding
        assigned, rerouted = await Publisher(bus).publish(Assigned(delivery_id="a"), Rerouted(delivery_id="r"))
        await until(lambda: hook.posts == 1 and bus.pending()[0] == 0)
        assert bus.pending()[1] == clock.monotonic() + 1.0  # the first hand-back waits 1 s
        await settled(bus)
        stats = ambassador.stats()
    assert [r.headers["webhook-id"] for r in hook.requests] == [assigned.id]
    assert (stats.delivered, stats.handed_back, stats.dead_lettered, stats.ignored) == (
        1, HANDOVER_ATTEMPTS - 1, 1, 0)
    [letter] = await bus.dead_letters(group)
    record = letter.record
    assert (letter.message.id, record["reason"], record["attempts"]) == (rerouted.id, "unhandled", HANDOVER_ATTEMPTS)
    assert (record["url"], record["status"], record["envelope"]["id"]) == (url, None, rerouted.id)
    assert record["last_error"]["type"] == "Unhandled"
    assert Rerouted.event_type() in record["last_error"]["message"]
    assert not await store.seen(group, [rerouted.id])
    assert await watched(bus, "handback-observer", [FAILED]) == []


async def test_in_a_rolling_deploy_the_version_that_delivers_a_new_type_gets_every_event_of_it(
    bus: MemoryTransport,
) -> None:
    """Old and new ambassadors of one group side by side; only the new one delivers Rerouted.
    The old one, first to get the events, gives them back; every one reaches the new receiver."""
    group = "handback-rolling"
    old_hook, new_hook = Scripted(204), Scripted(204)
    async with old_hook.running() as old_url, new_hook.running() as new_url:
        old = subscription(group, [Assigned.event_type()], old_url)
        new = subscription(group, [Assigned.event_type(), Rerouted.event_type()], new_url)
        async with pushing(bus, old) as old_amb:
            await widen(bus, group, sorted(new.types))  # the new version's first replica, since gone
            sent = await Publisher(bus).publish(*(Rerouted(delivery_id=str(i)) for i in range(6)))
            await until(lambda: old_amb.stats().handed_back == 6 and bus.pending()[0] == 0)
            async with pushing(bus, new) as new_amb:
                await settled(bus)
    assert sorted(r.headers["webhook-id"] for r in new_hook.requests) == sorted(e.id for e in sent)
    assert old_hook.posts == 0
    assert (old_amb.stats().dead_lettered, new_amb.stats().dead_lettered) == (0, 0)
    assert await bus.dead_letters(group) == []


async def test_a_failure_event_the_subscription_does_not_deliver_is_still_acked_as_ignored(
    bus: MemoryTransport,
) -> None:
    """The group is bound to choreograph.failed as a whole (a Python service of that name has a
    failure handler): a failure the subscription does not list is acked and counted ``ignored``,
    as the worker acks a failure it has no handler for - not handed back."""
    group = "handback-failed"
    hook = Scripted(204)
    failure = Envelope(id="f-1", source="/tests", type=FAILED,
                       data={"type": Assigned.event_type(), "envelope": {}, "record": {}})
    async with hook.running() as url, pushing(bus, subscription(group, [Assigned.event_type()], url)) as ambassador:
        await widen(bus, group, [FAILED])
        await bus.publish([to_message(failure)])
        await settled(bus)
    stats = ambassador.stats()
    assert (stats.ignored, stats.handed_back, stats.dead_lettered, hook.posts) == (1, 0, 0, 0)
    assert await bus.dead_letters(group) == []


async def test_hand_backs_are_counted_as_an_outcome_and_warned_about_once_per_type(
    bus: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """Each hand-back is the push outcome ``handed_back`` (and the give-up ``dead_lettered``);
    the log warns once per type, naming the group, the type and how to unbind it."""
    from prometheus_client import CollectorRegistry

    from choreograph.telemetry import Telemetry

    group = "handback-metrics"
    registry = CollectorRegistry()
    hook = Scripted(204)
    caplog.set_level(logging.WARNING, logger="choreograph.push")
    async with hook.running() as url, pushing(bus, subscription(group, [Assigned.event_type()], url),
                                              telemetry=Telemetry(traces=False, registry=registry)):
        await widen(bus, group, [Rerouted.event_type()])
        await Publisher(bus).publish(Rerouted(delivery_id="1"), Rerouted(delivery_id="2"))
        await settled(bus)

    def pushed(outcome: str) -> float | None:
        labels = {"subscription": group, "event_type": Rerouted.event_type(), "outcome": outcome}
        return registry.get_sample_value("choreograph_push_deliveries_total", labels)

    assert pushed("handed_back") == 2 * (HANDOVER_ATTEMPTS - 1)
    assert pushed("dead_lettered") == 2
    assert pushed("ignored") is None
    warnings = [r.getMessage() for r in caplog.records if "is bound to" in r.getMessage()]
    assert len(warnings) == 1
    assert f"choreograph groups unbind {group} {Rerouted.event_type()}" in warnings[0]
