"""The 3-hop chain of bench/brokers.py on FastStream, written the way its docs show.

Each hop is a subscriber whose return value a ``@broker.publisher`` sends on; FastStream
acks the input after the handler (and so after the publish) returns. The broker-side
choices match the other runs: a JetStream stream with durable consumers (NATS), a
stream per hop read by a consumer group (Redis), durable quorum queues on a topic
exchange with publisher confirms (RabbitMQ). Handlers take and return ``dict`` (FastStream
decodes and encodes the JSON) and build the same next CloudEvent as the raw chain.
Concurrency: ``max_workers`` where FastStream offers it (NATS), the prefetch (RabbitMQ);
per-message logging is off, as in the other runs. Fed with ``broker.publish``, 500
events at a time concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from bench._raw_chain import PUBLISH_BATCH, WINDOW
from bench.chain_app import Sink
from choreograph._envelope import now_rfc3339


def _next(event: dict[str, Any], hop: int) -> dict[str, Any]:
    return {**event, "id": str(uuid.uuid4()), "time": now_rfc3339(), "type": f"bench.hop{hop}",
            "source": f"/bench/hop{hop}", "causationid": event["id"], "hops": event["hops"] + 1}  # fmt: skip


def _first(n: int) -> dict[str, Any]:
    event_id = f"fs-{n}"
    return {"specversion": "1.0", "id": event_id, "source": "/bench", "type": "bench.hop0", "time": now_rfc3339(),
            "datacontenttype": "application/json", "correlationid": event_id, "hops": 0,
            "data": {"n": n, "t0": time.time()}}  # fmt: skip


def _nats(url: str, prefix: str, sink: Sink) -> Any:
    from faststream.nats import DeliverPolicy, JStream, NatsBroker
    from nats.js.api import RetentionPolicy

    broker = NatsBroker(url, logger=None, log_level=logging.DEBUG)
    stream = JStream(f"{prefix}_RAW", subjects=[f"{prefix}.raw.>"], retention=RetentionPolicy.INTEREST)

    def hop(n: int) -> None:
        @broker.subscriber(f"{prefix}.raw.bench.hop{n - 1}", stream=stream, durable=f"fs-hop{n}",
                           deliver_policy=DeliverPolicy.NEW, max_workers=WINDOW)  # fmt: skip
        @broker.publisher(f"{prefix}.raw.bench.hop{n}", stream=stream)
        async def handle(event: dict[str, Any]) -> dict[str, Any]:
            return _next(event, n)

    hop(1)
    hop(2)

    @broker.subscriber(f"{prefix}.raw.bench.hop2", stream=stream, durable="fs-hop3",
                       deliver_policy=DeliverPolicy.NEW, max_workers=WINDOW)  # fmt: skip
    async def last(event: dict[str, Any]) -> None:
        sink.record(event["data"]["t0"])

    return broker, lambda event: broker.publish(event, f"{prefix}.raw.bench.hop0", stream=stream.name)


def _redis(url: str, prefix: str, sink: Sink) -> Any:
    from faststream.redis import RedisBroker, StreamSub

    broker = RedisBroker(url, logger=None, log_level=logging.DEBUG, max_connections=PUBLISH_BATCH + 4 * WINDOW)

    def sub(n: int) -> StreamSub:
        return StreamSub(f"{prefix}:raw:hop{n - 1}", group=f"hop{n}", consumer="c1", max_records=WINDOW)

    def hop(n: int) -> None:
        @broker.subscriber(stream=sub(n))
        @broker.publisher(stream=f"{prefix}:raw:hop{n}")
        async def handle(event: dict[str, Any]) -> dict[str, Any]:
            return _next(event, n)

    hop(1)
    hop(2)

    @broker.subscriber(stream=sub(3))
    async def last(event: dict[str, Any]) -> None:
        sink.record(event["data"]["t0"])

    return broker, lambda event: broker.publish(event, stream=f"{prefix}:raw:hop0")


def _rabbit(url: str, prefix: str, sink: Sink) -> Any:
    from faststream.rabbit import Channel, ExchangeType, QueueType, RabbitBroker, RabbitExchange, RabbitQueue

    broker = RabbitBroker(url, logger=None, log_level=logging.DEBUG, default_channel=Channel(prefetch_count=WINDOW))
    exchange = RabbitExchange(f"{prefix}.raw", type=ExchangeType.TOPIC, durable=True)

    def queue(n: int) -> RabbitQueue:
        return RabbitQueue(f"{prefix}.raw.hop{n}", durable=True, queue_type=QueueType.QUORUM,
                           routing_key=f"bench.hop{n - 1}")  # fmt: skip

    def hop(n: int) -> None:
        @broker.subscriber(queue(n), exchange)
        @broker.publisher(exchange=exchange, routing_key=f"bench.hop{n}", persist=True)
        async def handle(event: dict[str, Any]) -> dict[str, Any]:
            return _next(event, n)

    hop(1)
    hop(2)

    @broker.subscriber(queue(3), exchange)
    async def last(event: dict[str, Any]) -> None:
        sink.record(event["data"]["t0"])

    return broker, lambda event: broker.publish(event, exchange=exchange, routing_key="bench.hop0", persist=True)


BUILDERS = {"nats": _nats, "redis": _redis, "amqp": _rabbit}


async def one_process(broker_name: str, url: str, prefix: str, n: int) -> tuple[Sink, float]:
    """Run the chain until ``n`` events reached the sink; (sink, seconds since feeding began)."""
    from bench._raw_chain import CLIENTS

    sink = Sink()
    sink.reset(n, None)
    if broker_name == "redis":  # groups must exist before the first event (FastStream creates them at start, too)
        raw = CLIENTS["redis"](url, prefix)
        await raw.connect()
        await raw.setup()
        await raw.close()
    broker, publish = BUILDERS[broker_name](url, prefix, sink)
    await broker.start()
    try:
        start = time.perf_counter()
        for first in range(0, n, PUBLISH_BATCH):
            await asyncio.gather(*(publish(_first(i)) for i in range(first, min(n, first + PUBLISH_BATCH))))
        while len(sink.latencies) < n:
            await asyncio.sleep(0.005)
        return sink, time.perf_counter() - start
    finally:
        await broker.stop()
