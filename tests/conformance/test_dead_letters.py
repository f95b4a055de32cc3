"""Dead letters: kept per group with their record and original body; listed, shown, replayed, purged."""

from __future__ import annotations

import asyncio
import time

from choreograph.transports import Delivery, Subscription, Transport
from tests.conformance._support import TYPE_A, collect, ids, message, quiet
from tests.conformance.conftest import Buses

RECORD = {
    "reason": "rejected",
    "attempts": 3,
    "service": "billing",
    "last_error": {"type": "ValueError", "message": "card declined — ünïcode"},
    "nested": [1, 2.5, None, True],
}


async def _dead_letter(
    subscription: Subscription, count: int, record: dict[str, object] = RECORD
) -> list[Delivery]:
    got = await collect(subscription, count)
    for delivery in got:
        await delivery.dead_letter({**record, "id": delivery.message.id})
    return got


async def test_a_dead_letter_keeps_its_record_and_the_original_message(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    body = b"\x00original body, not json\xff"
    await bus.publish([message(1, body=body)])
    before = time.time()
    await _dead_letter(subscription, 1)
    (letter,) = await bus.dead_letters("g")
    assert letter.group == "g"
    assert (letter.message.id, letter.message.type, letter.message.body) == ("m1", TYPE_A, body)
    assert dict(letter.record) == {**RECORD, "id": "m1"}
    assert before - 60 <= letter.dead_at <= time.time() + 60  # wall-clock seconds since the epoch


async def test_a_dead_lettered_message_is_not_delivered_again(buses: Buses) -> None:
    bus = await buses.open(buses.url(lease=1.0))
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    await _dead_letter(subscription, 1)
    assert await quiet(subscription, 2.5) == []


async def test_dead_letters_are_kept_per_group(bus: Transport) -> None:
    failing = await bus.subscribe("failing", [TYPE_A])
    fine = await bus.subscribe("fine", [TYPE_A])
    await bus.publish([message(1)])
    await _dead_letter(failing, 1)
    await (await collect(fine, 1))[0].ack()
    assert [letter.message.id for letter in await bus.dead_letters("failing")] == ["m1"]
    assert await bus.dead_letters("fine") == []
    assert [(letter.group, letter.message.id) for letter in await bus.dead_letters()] == [("failing", "m1")]


async def test_dead_letters_are_listed_oldest_first_up_to_a_limit(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(3)])
    for delivery in sorted(await collect(subscription, 3), key=lambda d: d.message.id, reverse=True):
        await delivery.dead_letter(RECORD)
    assert [letter.message.id for letter in await bus.dead_letters("g")] == ["m2", "m1", "m0"]
    assert [letter.message.id for letter in await bus.dead_letters("g", limit=2)] == ["m2", "m1"]


async def test_a_listing_limited_to_none_is_empty(bus: Transport) -> None:
    """Redis asked XRANGE for a count of 0 and failed ("count must be a positive integer")."""
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    await (await collect(subscription, 1))[0].dead_letter(RECORD)
    assert await bus.dead_letters("g", limit=0) == []
    assert await bus.dead_letters(limit=0) == []


async def test_a_listing_limited_below_zero_is_empty(bus: Transport) -> None:
    """A negative limit was a slice from the end on memory:// and amqp:// (every letter but
    the newest) and no limit on sqlite://; Redis and NATS listed none."""
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(2)])
    for delivery in await collect(subscription, 2):
        await delivery.dead_letter(RECORD)
    assert await bus.dead_letters("g", limit=-1) == []
    assert await bus.dead_letters(limit=-1) == []


async def test_one_dead_letter_can_be_shown_by_message_id(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1), message(2)])
    await _dead_letter(subscription, 2)
    letter = await bus.dead_letter("g", "m2")
    assert letter is not None
    assert (letter.group, letter.message.id, letter.record["id"]) == ("g", "m2", "m2")
    assert await bus.dead_letter("g", "no-such-id") is None
    assert await bus.dead_letter("other-group", "m2") is None


async def test_replay_delivers_to_that_group_only_with_a_fresh_attempt_count(bus: Transport) -> None:
    failing = await bus.subscribe("failing", [TYPE_A])
    fine = await bus.subscribe("fine", [TYPE_A])
    await bus.publish([message(1, body=b"same bytes")])
    await (await collect(fine, 1))[0].ack()
    (delivery,) = await collect(failing, 1)
    await delivery.retry(0)
    (delivery,) = await collect(failing, 1)
    assert delivery.attempt == 2
    await delivery.dead_letter(RECORD)

    assert await bus.replay("failing") == 1
    (replayed,) = await collect(failing, 1)
    assert (replayed.message.id, replayed.message.body, replayed.attempt) == ("m1", b"same bytes", 1)
    assert await bus.dead_letters("failing") == []
    assert await quiet(fine, 0.5) == []


async def test_replay_can_pick_message_ids(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(3)])
    await _dead_letter(subscription, 3)
    assert await bus.replay("g", ["m1"]) == 1
    assert ids(await collect(subscription, 1)) == ["m1"]
    assert sorted(letter.message.id for letter in await bus.dead_letters("g")) == ["m0", "m2"]
    assert await bus.replay("g", ["no-such-id"]) == 0


async def test_purge_deletes_dead_letters_for_good(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(3)])
    await _dead_letter(subscription, 3)
    assert await bus.purge("g", ["m1"]) == 1
    assert sorted(letter.message.id for letter in await bus.dead_letters("g")) == ["m0", "m2"]
    assert await bus.purge("g") == 2
    assert await bus.dead_letters("g") == []
    assert await bus.replay("g") == 0
    assert await quiet(subscription, 0.5) == []


async def test_purge_and_replay_leave_other_groups_alone(bus: Transport) -> None:
    first = await bus.subscribe("first", [TYPE_A])
    second = await bus.subscribe("second", [TYPE_A])
    await bus.publish([message(1)])
    await _dead_letter(first, 1)
    await _dead_letter(second, 1)
    assert await bus.purge("first") == 1
    assert [letter.group for letter in await bus.dead_letters()] == ["second"]
    assert await bus.replay("first") == 0
    assert await quiet(second, 0.3) == []


async def test_an_id_given_twice_is_replayed_and_counted_once(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    await _dead_letter(subscription, 1)
    assert await bus.replay("g", ["m1", "m1"]) == 1
    assert ids(await collect(subscription, 2, within=1.5)) == ["m1"]


async def test_an_id_given_twice_is_purged_and_counted_once(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    await _dead_letter(subscription, 1)
    assert await bus.purge("g", ["m1", "m1"]) == 1
    assert await bus.dead_letters("g") == []


async def test_two_replays_at_once_count_each_letter_once_between_them(buses: Buses) -> None:
    """Two admins replaying the same group at once: the letters are delivered once each, and the
    two counts add up to them (NATS counted every letter it had read, in each replay)."""
    url = buses.url()
    bus, first, second = await buses.open(url), await buses.open(url), await buses.open(url)
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(3)])
    await _dead_letter(subscription, 3)
    counts = await asyncio.gather(first.replay("g"), second.replay("g"))
    assert sum(counts) == 3, counts
    assert sorted(ids(await collect(subscription, 6, within=1.5))) == ["m0", "m1", "m2"]
    await bus.publish([message(n) for n in range(3, 6)])
    await _dead_letter(subscription, 3)
    picked = ["m3", "m4", "m5"]
    counts = await asyncio.gather(first.replay("g", picked), second.replay("g", picked))
    assert sum(counts) == 3, counts


async def test_replay_of_picked_ids_delivers_the_oldest_dead_letter_first(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(3)])
    for delivery in await collect(subscription, 3):
        await delivery.dead_letter(RECORD)
        await asyncio.sleep(0.01)  # dead_at apart, for the transports that order by it
    order = [letter.message.id for letter in await bus.dead_letters("g")]
    assert await bus.replay("g", list(reversed(order))) == 3
    assert ids(await collect(subscription, 3)) == order


async def test_a_replayed_message_dead_lettered_again_is_one_letter_with_the_new_record(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    await _dead_letter(subscription, 1)
    assert await bus.replay("g") == 1
    assert await bus.replay("g") == 0  # replayed already: nothing left to replay
    (delivery,) = await collect(subscription, 1)
    await delivery.dead_letter({"reason": "again"})
    assert [(letter.message.id, letter.record["reason"]) for letter in await bus.dead_letters("g")] == [("m1", "again")]
    letter = await bus.dead_letter("g", "m1")
    assert letter is not None and letter.record["reason"] == "again"
    assert await quiet(subscription, 0.5) == []


async def test_a_limited_listing_is_of_the_oldest_also_after_dead_letters_were_listed_and_shown(bus: Transport) -> None:
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(n) for n in range(4)])
    for delivery in sorted(await collect(subscription, 4), key=lambda d: d.message.id):
        await delivery.dead_letter(RECORD)
        await asyncio.sleep(0.01)
    for _ in range(2):  # reading letters leaves them where they were
        assert [letter.message.id for letter in await bus.dead_letters("g", limit=1)] == ["m0"]
        assert [letter.message.id for letter in await bus.dead_letters(limit=2)] == ["m0", "m1"]
        assert await bus.dead_letter("g", "m1") is not None
    assert await bus.replay("g") == 4
    assert ids(await collect(subscription, 4)) == ["m0", "m1", "m2", "m3"]


async def test_a_dead_letter_after_the_lease_ran_out_and_the_copy_was_acked_is_dropped(buses: Buses) -> None:
    """A consumer stalled past its lease dead-letters its delivery after the group's other
    consumer got the message again and acked it: nothing is dead-lettered (the late verb is
    ignored, as a late settle is everywhere). On NATS the letter was stored and the TERM, by
    stream sequence, settled the other consumer's copy: a dead letter of a processed event."""
    bus = await buses.open(buses.url(lease=1.0))
    stalled = await bus.subscribe("g", [TYPE_A])
    rival = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1)])
    (late,) = await collect(stalled, 1)
    (copy,) = await collect(rival, 1, within=10.0)  # once the lease ran out
    assert copy.message.id == "m1"
    await copy.ack()
    await late.dead_letter(RECORD)
    assert await bus.dead_letters("g") == []
    assert await quiet(stalled, 1.5) == [] and await quiet(rival, 0.1) == []


async def test_an_id_dead_lettered_twice_in_a_group_is_one_letter_with_the_latest_record(buses: Buses) -> None:
    """At-least-once publishing may put an event on the bus twice; when both copies fail,
    the group keeps one dead letter for the id - the later record, its time - and replay
    puts one copy back. (A broker that drops a republished id, as JetStream does within
    its duplicate window, delivers one copy: it is one letter already.)"""
    bus = await buses.open()
    subscription = await bus.subscribe("g", [TYPE_A])
    await bus.publish([message(1, body=b"first")])
    await bus.publish([message(1, body=b"first")])
    copies = 1 if getattr(buses.broker, "DEDUPES_PUBLISHED_IDS", False) else 2
    got = await collect(subscription, copies)
    assert ids(got) == ["m1"] * copies
    before_last = 0.0
    for n, delivery in enumerate(got, 1):
        await asyncio.sleep(0.05)  # dead_at apart
        before_last = time.time()
        await asyncio.sleep(0.05)
        await delivery.dead_letter({"copy": n})
    (letter,) = await bus.dead_letters("g")
    assert (letter.message.id, dict(letter.record)) == ("m1", {"copy": copies})
    assert letter.dead_at >= before_last - 0.01  # the latest letter's time (ms-precise on some brokers)
    assert [letter.message.id for letter in await bus.dead_letters()] == ["m1"]
    shown = await bus.dead_letter("g", "m1")
    assert shown is not None and (dict(shown.record), shown.dead_at) == ({"copy": copies}, letter.dead_at)
    assert await bus.replay("g", ["m1"]) == 1
    assert ids(await collect(subscription, 2, within=1.5)) == ["m1"]
    assert await bus.dead_letters("g") == []
