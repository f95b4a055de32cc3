"""Redis Streams for the conformance suite: each test gets its own key prefix on the shared server."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests._brokers import broker_url, require_broker

NAME = "redis"


def require() -> None:
    require_broker("redis")


def url(unique: str, *, lease: float) -> str:
    """A fresh, isolated bus on the shared server: every key starts with a prefix holding ``unique``."""
    parts = urlsplit(broker_url("redis"))
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("lease", "prefix")]
    query += [("lease", repr(lease)), ("prefix", f"choreograph-test-{unique}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def cleanup(url: str) -> None:
    """Delete every key of the bus at ``url``."""
    import redis.asyncio as aioredis

    from choreograph.transports.redis import RedisTransport

    transport = RedisTransport(url)  # parses the URL: the client URL without our parameters, the prefix
    client = aioredis.Redis.from_url(transport._client_url)
    try:
        keys = [key async for key in client.scan_iter(match=_glob_escape(transport.prefix) + ":*", count=500)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
