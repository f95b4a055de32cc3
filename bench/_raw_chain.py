"""The 3-hop chain of bench/brokers.py written directly on each broker's client library.

The baseline choreograph is measured against: the same CloudEvents JSON per hop (decode,
new id and time, encode, as the floor of bench/chain.py does) and the same ack
discipline - a hop takes what is ready (up to a batch), publishes all its outputs and
waits for the broker to confirm them, *then* acks the inputs in one go: at-least-once,
nothing lost if a hop dies. No dedupe, no validation, no retries, no dead letters.

* NATS (nats-py): one stream, a durable *push* consumer per hop with explicit acks and
  ``max_ack_pending`` as the window (lower latency than nats-py's pull ``fetch``, which
  waits for a full batch); outputs via ``publish_async``, then the acks.
* Redis (redis-py asyncio + hiredis): a stream per hop, one consumer group each;
  ``XREADGROUP COUNT BLOCK``, the outputs in one pipeline, then ``XACK`` + ``XDEL``.
* RabbitMQ (aio-pika): a topic exchange and one durable quorum queue per hop, a
  consumer with a prefetch window, outputs on a publisher-confirms channel, then one
  ``multiple`` ack.

``python -m bench._raw_chain BROKER URL PREFIX HOP N OUT`` runs one hop as a process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from bench import _gc
from bench.chain_app import Sink
from choreograph._envelope import now_rfc3339

WINDOW = 256  # messages in flight per hop (choreograph's concurrency in the same run)
PUBLISH_BATCH = 500


def first_event(n: int) -> tuple[str, bytes]:
    """Event ``n`` entering the chain: (id, CloudEvents JSON)."""
    event_id = f"raw-{n}"
    body = {"specversion": "1.0", "id": event_id, "source": "/bench", "type": "bench.hop0",
            "time": now_rfc3339(), "datacontenttype": "application/json", "correlationid": event_id,
            "hops": 0, "data": {"n": n, "t0": time.time()}}  # fmt: skip
    return event_id, orjson.dumps(body)


def next_event(body: bytes, hop: int) -> tuple[str, bytes]:
    """What hop ``hop`` emits for ``body``: a new CloudEvent (id, time) caused by it."""
    event = orjson.loads(body)
    event_id = str(uuid.uuid4())
    out = {**event, "id": event_id, "time": now_rfc3339(), "type": f"bench.hop{hop}",
           "source": f"/bench/hop{hop}", "causationid": event["id"], "hops": event["hops"] + 1,
           "data": event["data"]}  # fmt: skip
    return event_id, orjson.dumps(out)


def t0_of(body: bytes) -> float:
    return float(orjson.loads(body)["data"]["t0"])


# -- NATS ------------------------------------------------------------------------------------


class RawNats:
    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.stream = f"{prefix}_RAW"
        self.nc: Any = None
        self.js: Any = None

    def subject(self, hop: int) -> str:
        return f"{self.prefix}.raw.bench.hop{hop}"

    async def connect(self) -> None:
        import nats

        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()

    async def setup(self) -> None:
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        await self.js.add_stream(StreamConfig(name=self.stream, subjects=[f"{self.prefix}.raw.>"],
                                              retention=RetentionPolicy.INTEREST, storage=StorageType.FILE))  # fmt: skip

    async def close(self) -> None:
        await self.nc.close()

    async def teardown(self) -> None:
        await self.js.delete_stream(self.stream)

    async def publish(self, items: list[tuple[str, bytes]], hop: int) -> None:
        subject = self.subject(hop)
        futures = [await self.js.publish_async(subject, body) for _, body in items]
        await asyncio.gather(*futures)

    async def run_hop(self, hop: int, sink: Sink | None, ready: Callable[[], None]) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def received(msg: Any) -> None:
            queue.put_nowait(msg)

        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=WINDOW, ack_wait=30,
                                deliver_policy=DeliverPolicy.NEW)  # fmt: skip
        await self.js.subscribe(self.subject(hop - 1), durable=f"hop{hop}", stream=self.stream, cb=received,
                                manual_ack=True, config=config, pending_msgs_limit=-1)  # fmt: skip
        ready()
        while True:
            batch = [await queue.get()]
            while len(batch) < WINDOW and not queue.empty():
                batch.append(queue.get_nowait())
            if sink is None:
                await self.publish([next_event(m.data, hop) for m in batch], hop)
            else:
                for m in batch:
                    sink.record(t0_of(m.data))
            for m in batch:
                await self.nc.publish(m.reply, b"+ACK")


# -- Redis -----------------------------------------------------------------------------------


class RawRedis:
    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.client: Any = None
        self.stopping = False  # hops end by this flag: redis-py can hang cancelling a blocking read

    def key(self, hop: int) -> str:
        return f"{self.prefix}:raw:hop{hop}"

    async def connect(self) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(self.url)

    async def setup(self) -> None:
        for hop in (1, 2, 3):
            await self.client.xgroup_create(self.key(hop - 1), f"hop{hop}", id="$", mkstream=True)

    async def close(self) -> None:
        await self.client.aclose()

    async def teardown(self) -> None:
        keys = [key async for key in self.client.scan_iter(match=f"{self.prefix}:*", count=500)]
        if keys:
            await self.client.delete(*keys)

    async def publish(self, items: list[tuple[str, bytes]], hop: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        key = self.key(hop)
        for _, body in items:
            pipe.xadd(key, {"body": body})
        await pipe.execute()

    async def run_hop(self, hop: int, sink: Sink | None, ready: Callable[[], None]) -> None:
        key, group, consumer = self.key(hop - 1), f"hop{hop}", f"c-{os.getpid()}"
        ready()
        while not self.stopping:
            reply = await self.client.xreadgroup(group, consumer, {key: ">"}, count=WINDOW, block=250)
            if not reply:
                continue
            entries = reply[0][1]
            if sink is None:
                await self.publish([next_event(fields[b"body"], hop) for _, fields in entries], hop)
            else:
                for _, fields in entries:
                    sink.record(t0_of(fields[b"body"]))
            ids = [entry for entry, _ in entries]
            pipe = self.client.pipeline(transaction=False)
            pipe.xack(key, group, *ids)
            pipe.xdel(key, *ids)
            await pipe.execute()


# -- RabbitMQ --------------------------------------------------------------------------------


class RawAmqp:
    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.connection: Any = None
        self.channel: Any = None
        self.exchange: Any = None

    def queue(self, hop: int) -> str:
        return f"{self.prefix}.raw.hop{hop}"

    async def connect(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = await self.channel.declare_exchange(f"{self.prefix}.raw", aio_pika.ExchangeType.TOPIC,
                                                            durable=True)  # fmt: skip

    async def setup(self) -> None:
        for hop in (1, 2, 3):
            queue = await self.channel.declare_queue(self.queue(hop), durable=True,
                                                     arguments={"x-queue-type": "quorum"})  # fmt: skip
            await queue.bind(self.exchange, routing_key=f"bench.hop{hop - 1}")

    async def close(self) -> None:
        await self.connection.close()

    async def teardown(self) -> None:
        for hop in (1, 2, 3):
            await self.channel.queue_delete(self.queue(hop))
        await self.channel.exchange_delete(f"{self.prefix}.raw")

    async def publish(self, items: list[tuple[str, bytes]], hop: int) -> None:
        import aio_pika

        key = f"bench.hop{hop}"
        await asyncio.gather(*(
            self.exchange.publish(aio_pika.Message(body, message_id=event_id, content_type="application/json",
                                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=key)
            for event_id, body in items
        ))  # fmt: skip

    async def run_hop(self, hop: int, sink: Sink | None, ready: Callable[[], None]) -> None:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=WINDOW)
        queue = await channel.declare_queue(self.queue(hop), durable=True, arguments={"x-queue-type": "quorum"})
        buffer: asyncio.Queue[Any] = asyncio.Queue()

        async def received(message: Any) -> None:
            buffer.put_nowait(message)

        await queue.consume(received)
        ready()
        while True:
            batch = [await buffer.get()]
            await asyncio.sleep(0)  # let a burst already read off the socket land
            while len(batch) < WINDOW and not buffer.empty():
                batch.append(buffer.get_nowait())
            if sink is None:
                await self.publish([next_event(m.body, hop) for m in batch], hop)
            else:
                for m in batch:
                    sink.record(t0_of(m.body))
            await batch[-1].ack(multiple=True)  # one loop, FIFO: every earlier tag is in this batch


Raw = RawNats | RawRedis | RawAmqp
CLIENTS: dict[str, Callable[[str, str], Raw]] = {"nats": RawNats, "redis": RawRedis, "amqp": RawAmqp}


async def publish_events(raw: Raw, n: int, rate: float | None) -> None:
    """Feed ``n`` events into the chain: batches of 500, or one at a time at ``rate``/s."""
    if rate is None:
        for first in range(0, n, PUBLISH_BATCH):
            await raw.publish([first_event(i) for i in range(first, min(n, first + PUBLISH_BATCH))], 0)
        return
    start = time.perf_counter()
    for i in range(n):
        await raw.publish([first_event(i)], 0)
        await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))


async def one_process(broker: str, url: str, prefix: str, n: int) -> tuple[Sink, float]:
    """Every hop and the publisher in this process, until all ``n`` events reached the sink:
    (the sink, seconds from the first publish)."""
    raw = CLIENTS[broker](url, prefix)
    await raw.connect()
    sink = Sink()
    sink.reset(n, None)
    tasks: list[asyncio.Task[None]] = []
    try:
        await raw.setup()
        for hop in (1, 2, 3):
            started = asyncio.Event()
            tasks.append(asyncio.create_task(raw.run_hop(hop, sink if hop == 3 else None, started.set)))
            await started.wait()
        start = time.perf_counter()
        await publish_events(raw, n, None)
        while len(sink.latencies) < n:
            await asyncio.sleep(0.005)
        return sink, time.perf_counter() - start
    finally:
        await _stop(raw, tasks)
        await raw.teardown()
        await raw.close()


async def _stop(raw: Raw, tasks: list[asyncio.Task[None]]) -> None:
    if isinstance(raw, RawRedis):
        raw.stopping = True
        await asyncio.wait(tasks, timeout=2.0)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=2.0)


async def hop_process(broker: str, url: str, prefix: str, hop: int, n: int, out: str) -> None:
    """One hop as a process (bench/brokers.py starts three): runs until SIGTERM."""
    raw = CLIENTS[broker](url, prefix)
    await raw.connect()
    sink = None
    if hop == 3:
        sink = Sink()
        sink.reset(n, out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(raw.run_hop(hop, sink, lambda: print("running", flush=True)))
    await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    await _stop(raw, [task])
    await raw.close()


async def setup(broker: str, url: str, prefix: str) -> None:
    raw = CLIENTS[broker](url, prefix)
    await raw.connect()
    try:
        await raw.setup()
    finally:
        await raw.close()


async def teardown(broker: str, url: str, prefix: str) -> None:
    raw = CLIENTS[broker](url, prefix)
    await raw.connect()
    try:
        await raw.teardown()
    finally:
        await raw.close()


def _loop_run(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    broker_name, broker_url, bus_prefix, hop_number, total, out_path = sys.argv[1:7]
    _gc.apply()  # the parent's --gc
    _loop_run(hop_process(broker_name, broker_url, bus_prefix, int(hop_number), int(total), out_path))
