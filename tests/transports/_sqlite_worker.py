"""A consumer or publisher in its own OS process, driven by tests/transports/test_sqlite.py.

python _sqlite_worker.py URL consume   # print "ready", consume group "workers" until idle 2 s,
                                       # print the processed ids as one JSON list
python _sqlite_worker.py URL hold N    # fetch N deliveries, print their ids, then hang
python _sqlite_worker.py URL publish N # subscribe group "g", publish N messages, exit
"""

from __future__ import annotations

import asyncio
import json
import sys

from choreograph.transports.base import Message
from choreograph.transports.sqlite import SQLiteTransport

TYPE = "test.work"


async def consume(url: str) -> None:
    async with SQLiteTransport(url) as bus:
        subscription = await bus.subscribe("workers", [TYPE])
        print("ready", flush=True)
        processed: list[str] = []
        started = False
        while True:
            batch = await subscription.fetch(16, timeout=2.0 if started else 60.0)
            if not batch:
                break
            started = True
            processed.extend(d.message.id for d in batch)
            await subscription.ack_many(batch)
        print(json.dumps(processed), flush=True)


async def hold(url: str, count: int) -> None:
    bus = SQLiteTransport(url)
    await bus.connect()
    subscription = await bus.subscribe("workers", [TYPE])
    held = []
    while len(held) < count:
        held.extend(await subscription.fetch(count - len(held)))
    print(json.dumps([d.message.id for d in held]), flush=True)
    await asyncio.sleep(3600)


async def publish(url: str, count: int) -> None:
    async with SQLiteTransport(url) as bus:
        await bus.subscribe("g", [TYPE])
        await bus.publish([Message(f"m{n}", TYPE, b"%d" % n) for n in range(count)])


if __name__ == "__main__":
    url, mode, *rest = sys.argv[1:]
    if mode == "consume":
        asyncio.run(consume(url))
    elif mode == "hold":
        asyncio.run(hold(url, int(rest[0])))
    else:
        asyncio.run(publish(url, int(rest[0])))
