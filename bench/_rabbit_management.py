"""RabbitMQ's management HTTP API, for what AMQP 0-9-1 does not tell: every message a queue holds.

A passive ``queue.declare`` gives a queue's *ready* messages only. The API's ``messages``
also counts those a consumer holds unacknowledged and, on a quorum queue with at-least-once
dead lettering, those held in dead-letter transit (``messages_dlx``: taken from the queue,
not yet confirmed by the target; after a node restart RabbitMQ 3.10 may hold one there for
``dead_letter_worker_publisher_confirm_timeout``, 180 s by default). The API's figures are
sampled: a quorum queue reports at its tick (``quorum_tick_interval``) and the API collects
every ``collect_statistics_interval``, so a figure may be that old; a queue that has not
reported yet has none (``None``)::

    api = ManagementApi("http://guest:guest@127.0.0.1:15672/api", vhost="/")
    held = await api.queues()        # {"P.orders": QueueCount(messages=3, ready=1, dlx=0), ...}
    await api.close()
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx


@dataclasses.dataclass(frozen=True)
class QueueCount:
    """A queue's figures; ``None`` where the queue has not reported them yet."""

    messages: int | None  # ready + unacknowledged + in dead-letter transit
    ready: int | None
    dlx: int | None


def vhost_of(amqp_url: str) -> str:
    """The virtual host an ``amqp://`` URL names (its path; ``/`` when it has none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class ManagementApi:
    """``api_url``: the API's base URL (``http://user:pass@host:15672/api``)."""

    def __init__(self, api_url: str, *, vhost: str) -> None:
        parts = urlsplit(api_url)
        auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        netloc = parts.hostname or "127.0.0.1"
        base = urlunsplit(parts._replace(netloc=f"{netloc}:{parts.port}" if parts.port else netloc))
        self._client = httpx.AsyncClient(base_url=base.rstrip("/"), auth=auth, timeout=10.0)
        self.vhost = vhost

    async def queues(self) -> dict[str, QueueCount]:
        """Every queue of the vhost, in one request."""
        reply = await self._client.get(
            f"/queues/{quote(self.vhost, safe='')}",
            params={"columns": "name,messages,messages_ready,messages_dlx"},
        )
        reply.raise_for_status()
        rows: list[dict[str, Any]] = reply.json()
        return {row["name"]: QueueCount(row.get("messages"), row.get("messages_ready"), row.get("messages_dlx"))
                for row in rows}

    async def close(self) -> None:
        await self._client.aclose()
