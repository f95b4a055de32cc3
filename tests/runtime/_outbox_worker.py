"""A worker process for the outbox crash tests (tests/runtime/test_outbox_crash.py).

    python -m tests.runtime._outbox_worker BUS_URL DATABASE_URL CONCURRENCY

Runs the ``package`` service: each ``Requested`` inserts a package row and bumps a
counter in one transaction, and returns ``Created`` (through the outbox). Prints
``ready``; on SIGTERM stops cleanly and prints its stats as JSON.

Crash hook (test-only): ``CHOREOGRAPH_TEST_CRASH`` names the point at which the
process SIGKILLs itself, once (``CHOREOGRAPH_TEST_CRASH_ONCE`` is a marker file):

* ``handler``: inside the transaction, after the writes, before the commit;
* ``commit``: right after the commit, before the relay could publish or the delivery be acked;
* ``publish``: right after the relay's publish returned, before the rows are marked sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from choreograph import Context, Event, RetryPolicy, Service, Worker
from choreograph.runtime.outbox import HandlerUnit
from choreograph.transports import open_transport
from choreograph.transports.base import Message


class Requested(Event, type="test.crash.requested"):
    pid: str


class Created(Event, type="test.crash.created"):
    pid: str
    n: int


def crash(point: str) -> None:
    if os.environ.get("CHOREOGRAPH_TEST_CRASH") != point:
        return
    marker = os.environ["CHOREOGRAPH_TEST_CRASH_ONCE"]
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(point)
    os.kill(os.getpid(), signal.SIGKILL)


def package_service(database: str) -> Service:
    package = Service("package", database=database, retry=RetryPolicy(base=0.05, jitter=False))

    @package.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            n = await tx.fetchval("UPDATE counter SET n = n + 1 RETURNING n")
            crash("handler")
        return Created(pid=req.pid, n=n)

    return package


def install_crash_hooks(bus: Any) -> None:
    commit = HandlerUnit.commit

    async def commit_then_maybe_crash(self: HandlerUnit, *args: Any, **kwargs: Any) -> bool:
        result = await commit(self, *args, **kwargs)
        crash("commit")
        return result

    HandlerUnit.commit = commit_then_maybe_crash  # type: ignore[method-assign]
    publish = bus.publish

    async def publish_then_maybe_crash(messages: Sequence[Message]) -> None:
        await publish(messages)
        if any(m.type == Created.event_type() for m in messages):
            crash("publish")

    bus.publish = publish_then_maybe_crash


async def main(bus_url: str, database: str, concurrency: int) -> None:
    bus = open_transport(bus_url)
    install_crash_hooks(bus)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Worker([package_service(database)], bus, concurrency=concurrency, poll_interval=0.05) as worker:
        print("ready", flush=True)
        await stop.wait()
        relay = worker.outbox.relays["package"]
    await bus.close()
    stats = worker.stats("package")
    print(json.dumps({"handled": stats.handled, "duplicates": stats.duplicates, "published": relay.published}),
          flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
