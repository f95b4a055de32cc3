"""The in-memory transport's own behaviour beyond the conformance suite."""

from __future__ import annotations

import tracemalloc

import orjson

from choreograph.transports.base import Message
from choreograph.transports.memory import MemoryTransport


async def test_a_queued_message_holds_about_its_own_size_not_orjsons_buffer() -> None:
    # orjson 3.12+ returns small bytes in a 4 KiB allocation; a bus holding a backlog of
    # such bodies would keep ~4 KiB per event. The bus stores a right-sized copy.
    bus = MemoryTransport()
    subscription = await bus.subscribe("g", ["t"])

    def body(i: int) -> bytes:
        return orjson.dumps({"specversion": "1.0", "id": f"id-{i}", "type": "t", "data": {"n": i}})

    assert len(body(999)) < 100
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await bus.publish([Message(f"id-{i}", "t", body(i)) for i in range(1000)])  # only the bus holds them
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / 1000 < 1024, f"{held / 1000:.0f} bytes per queued message"
    [first] = await subscription.fetch(1)
    assert orjson.loads(first.message.body)["id"] == "id-0"
    await subscription.close()
