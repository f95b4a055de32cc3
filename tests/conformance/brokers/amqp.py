"""RabbitMQ for the conformance suite: each test gets its own name prefix on the shared server."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests._brokers import broker_url, require_broker

NAME = "amqp"


def require() -> None:
    require_broker("amqp")


def url(unique: str, *, lease: float) -> str:
    """A fresh, isolated bus on the shared server: every exchange and queue name starts with ``unique``."""
    parts = urlsplit(broker_url("amqp"))
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("lease", "prefix")]
    query += [("lease", repr(lease)), ("prefix", f"choreograph-test-{unique}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def cleanup(url: str) -> None:
    """Delete every exchange and queue of the bus at ``url`` (groups are listed by its registry)."""
    import aio_pika

    from choreograph.transports._amqp_wire import RETRY_BUCKETS_MS
    from choreograph.transports.amqp import AmqpTransport

    transport = AmqpTransport(url)
    names = transport.names
    try:
        groups = list(await transport.groups())
    finally:
        await transport.close()
    connection = await aio_pika.connect(transport._client_url)
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
