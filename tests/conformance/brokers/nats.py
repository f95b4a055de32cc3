"""NATS JetStream for the conformance suite: each bus is its own prefix (own streams) on the shared server."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests._brokers import broker_url, require_broker

NAME = "nats"
#: JetStream stores a message id published again within the duplicate window once.
DEDUPES_PUBLISHED_IDS = True


def require() -> None:
    require_broker("nats")


def url(unique: str, *, lease: float) -> str:
    """A fresh, isolated bus on the shared server: streams ``<prefix>_EVENTS``/``_DLQ``/``_DEFER`` with ``unique`` in the prefix."""
    parts = urlsplit(broker_url("nats"))
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("lease", "prefix")]
    query += [("lease", repr(lease)), ("prefix", f"choreograph-test-{unique}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def cleanup(url: str) -> None:
    """Delete the bus's streams (their consumers go with them)."""
    import nats

    from choreograph.transports.nats import NatsTransport

    transport = NatsTransport(url)  # parses the URL: the servers, the stream names
    client = await nats.connect(transport._servers, max_reconnect_attempts=1, connect_timeout=2)
    try:
        for stream in transport.streams:
            reply = await client.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=5)
            error = json.loads(reply.data).get("error")
            if error and error.get("err_code") != 10059:  # 10059: no such stream (never connected)
                raise RuntimeError(f"deleting NATS stream {stream}: {error}")
    finally:
        await client.close()
