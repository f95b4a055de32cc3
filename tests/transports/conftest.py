"""Fixtures shared by the transport-specific tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._brokers import require_broker
from tests._nats_server import NatsServer


@pytest.fixture(params=["shared", "private"])
def server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A NATS server: the shared one (whatever version it is) and a private current nats-server."""
    if request.param == "shared":
        yield require_broker("nats")
    else:
        private = NatsServer.start_new()
        yield private.url
        private.destroy()
