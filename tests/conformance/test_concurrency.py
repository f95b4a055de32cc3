"""Many consumers at once: every message processed exactly once when nothing fails."""

from __future__ import annotations

import asyncio
from collections import Counter

from choreograph.transports import Subscription
from tests.conformance._support import TYPE_A, WAIT, message
from tests.conformance.conftest import Buses

CONSUMERS = 100
MESSAGES = 1000


async def test_a_hundred_consumers_in_one_group_process_each_message_once(buses: Buses, bus_url: str) -> None:
    """100 competing consumers over two connections: none processed twice, none lost."""
    transports = [await buses.open(bus_url) for _ in range(2)]
    subscriptions = [await transports[n % 2].subscribe("workers", [TYPE_A]) for n in range(CONSUMERS)]
    processed: Counter[str] = Counter()
    done = asyncio.Event()

    async def consume(subscription: Subscription) -> None:
        while not done.is_set():
            for delivery in await subscription.fetch(8, timeout=0.5):
                processed[delivery.message.id] += 1
                await asyncio.sleep(0)  # the "work"
                await delivery.ack()
            if len(processed) == MESSAGES:
                done.set()

    consumers = [asyncio.ensure_future(consume(s)) for s in subscriptions]
    for start in range(0, MESSAGES, 100):
        await transports[0].publish([message(n) for n in range(start, start + 100)])
    await asyncio.wait_for(asyncio.gather(*consumers), WAIT * 4)

    assert set(processed) == {f"m{n}" for n in range(MESSAGES)}
    assert [mid for mid, count in processed.items() if count > 1] == []
