"""Throughput of the SQLite transport, printed as JSON.

    python bench/transport_sqlite.py [--events N] [--batch B] [--hops H] [--synchronous NORMAL|FULL]

* ``raw``: one process, one file: publish N messages in batches of B; then fetch them in
  batches of B and ``ack_many`` each batch (messages/s for each phase).
* ``chain``: the end-to-end figure. A producer process publishes N events; H hop processes
  each consume the previous type in their own group, publish the next type and ack; a sink
  process consumes the last type. Every process opens the same file. Reports events/s from
  the first publish to the last event reaching the sink, and the latency of a lone event
  through the idle chain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

from choreograph.transports.base import Message
from choreograph.transports.sqlite import SQLiteTransport


def _type(hop: int) -> str:
    return f"bench.step{hop}"


async def raw(url: str, events: int, batch: int) -> dict[str, float]:
    async with SQLiteTransport(url) as bus:
        subscription = await bus.subscribe("raw", None)
        body = b"x" * 300
        started = time.perf_counter()
        for first in range(0, events, batch):
            await bus.publish(
                [Message(f"r{n}", "bench.raw", body) for n in range(first, min(events, first + batch))]
            )
        published = time.perf_counter()
        received = 0
        while received < events:
            deliveries = await subscription.fetch(batch, timeout=10)
            received += len(deliveries)
            await subscription.ack_many(deliveries)
        consumed = time.perf_counter()
    return {
        "publish_per_s": round(events / (published - started)),
        "fetch_ack_per_s": round(events / (consumed - published)),
    }


def _hop(url: str, hop: int, batch: int, ready: mp.Barrier) -> None:
    async def run() -> None:
        async with SQLiteTransport(url) as bus:
            subscription = await bus.subscribe(f"hop{hop}", [_type(hop - 1)])
            ready.wait()
            while True:
                deliveries = await subscription.fetch(batch)
                await bus.publish([Message(d.message.id, _type(hop), d.message.body) for d in deliveries])
                await subscription.ack_many(deliveries)

    asyncio.run(run())


def _sink(url: str, hops: int, events: int, batch: int, ready: mp.Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    async def run() -> None:
        async with SQLiteTransport(url) as bus:
            subscription = await bus.subscribe("sink", [_type(hops)])
            ready.wait()
            # 1. latency of lone events through the idle chain
            latencies = []
            for _ in range(20):
                (delivery,) = await subscription.fetch(1)
                latencies.append(time.time() - float(delivery.message.body))
                await delivery.ack()
            out.put(("latency", latencies))
            # 2. throughput
            received = 0
            while received < events:
                deliveries = await subscription.fetch(batch)
                received += len(deliveries)
                await subscription.ack_many(deliveries)
            out.put(("done", time.time()))

    asyncio.run(run())


async def _produce(url: str, events: int, batch: int, hops: int, out: mp.Queue) -> dict[str, float]:  # type: ignore[type-arg]
    async with SQLiteTransport(url) as bus:
        for n in range(20):
            await bus.publish([Message(f"lone{n}", _type(0), str(time.time()).encode())])
            await asyncio.sleep(0.05)
        kind, latencies = await asyncio.to_thread(out.get)
        assert kind == "latency"
        body = b"x" * 300
        started = time.time()
        for first in range(0, events, batch):
            await bus.publish(
                [Message(f"e{n}", _type(0), body) for n in range(first, min(events, first + batch))]
            )
        published = time.time()
        kind, done = await asyncio.to_thread(out.get)
        assert kind == "done"
    return {
        "events_per_s": round(events / (done - started)),
        "producer_publish_per_s": round(events / (published - started)),
        "lone_event_latency_ms_median": round(statistics.median(latencies) * 1e3, 2),
        "lone_event_latency_ms_max": round(max(latencies) * 1e3, 2),
    }


def chain(url: str, events: int, batch: int, hops: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(hops + 2)
    out = ctx.Queue()
    processes = [
        ctx.Process(target=_hop, args=(url, hop, batch, ready), daemon=True) for hop in range(1, hops + 1)
    ]
    processes.append(ctx.Process(target=_sink, args=(url, hops, events, batch, ready, out), daemon=True))
    for process in processes:
        process.start()
    try:
        ready.wait()
        return asyncio.run(_produce(url, events, batch, hops, out))
    finally:
        for process in processes:
            process.kill()
            process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--synchronous", default="NORMAL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        raw_url = f"sqlite:///{os.path.join(directory, 'raw.db')}?synchronous={args.synchronous}"
        chain_url = f"sqlite:///{os.path.join(directory, 'chain.db')}?synchronous={args.synchronous}"
        result = {
            "transport": "sqlite",
            "synchronous": args.synchronous,
            "events": args.events,
            "batch": args.batch,
            "hops": args.hops,
            "cpus": os.cpu_count(),
            "raw": asyncio.run(raw(raw_url, args.events, args.batch)),
            "chain": chain(chain_url, args.events, args.batch, args.hops),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
