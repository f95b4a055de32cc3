"""The transport conformance suite: one set of tests, run against every transport.

A transport joins the suite with one module ``tests/conformance/brokers/<name>.py``::

    NAME: str                                      # the test id, e.g. "nats"
    def url(unique: str, *, lease: float) -> str   # a fresh, isolated bus; ``unique`` goes into
                                                   # its stream/key/queue/file names
    def require() -> None                          # tests._brokers.require_broker(...) for network
                                                   # brokers (skip or, under CI=true, fail);
                                                   # a no-op for embedded ones
    async def cleanup(url: str) -> None            # delete what the bus created

and optionally::

    ORDERED: bool = True                           # False: no publish-order clause
    DEDUPES_PUBLISHED_IDS: bool = False            # True: an id published twice is stored once
    async def restart(url: str) -> None            # stop and start the broker behind ``url``
                                                   # keeping its data (see test_restart.py)

Every module found there (``pkgutil``) parametrises the ``broker`` fixture, so each test
below runs once per transport, with the module's ``NAME`` as its id (``-k sqlite``).
Tests get buses through :class:`Buses` (``buses.url(lease=...)``, ``buses.open(url)``),
which closes every transport and cleans every bus up afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import types
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from choreograph.transports import Transport, open_transport
from tests.conformance import brokers as _brokers_package

#: Lease used when a test does not exercise lease expiry: long enough never to expire by itself.
LONG_LEASE = 60.0


def _discover() -> list[types.ModuleType]:
    found = []
    for info in sorted(pkgutil.iter_modules(_brokers_package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        name = f"{_brokers_package.__name__}.{info.name}"
        try:
            found.append(importlib.import_module(name))
        except Exception as exc:  # a broken broker module fails its own tests, not the suite
            found.append(_broken(info.name, exc))
    return found


def _broken(name: str, exc: Exception) -> types.ModuleType:
    module = types.ModuleType(name)
    message = f"tests/conformance/brokers/{name}.py does not import: {exc!r}"

    def require() -> None:
        pytest.fail(message)

    module.NAME = name  # type: ignore[attr-defined]
    module.require = require  # type: ignore[attr-defined]
    return module


BROKERS = _discover()


class Buses:
    """Fresh buses on one broker, and the transports opened on them, all cleaned up at the end."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self._urls: list[str] = []
        self._transports: list[Transport] = []

    def url(self, *, lease: float = LONG_LEASE) -> str:
        """The URL of a new, empty, isolated bus."""
        url: str = self.broker.url(f"conf-{uuid.uuid4().hex[:12]}", lease=lease)
        self._urls.append(url)
        return url

    async def open(self, url: str | None = None) -> Transport:
        """A connected transport on ``url`` (default: a new bus); several may share one URL."""
        transport = open_transport(url if url is not None else self.url())
        await transport.connect()
        self._transports.append(transport)
        return transport

    async def aclose(self) -> None:
        for transport in reversed(self._transports):
            with contextlib.suppress(Exception):
                await transport.close()
        for url in self._urls:
            await self.broker.cleanup(url)


@pytest.fixture(params=BROKERS, ids=[module.NAME for module in BROKERS])
def broker(request: pytest.FixtureRequest) -> Any:
    """The broker module under test (skips or fails when its broker is unreachable)."""
    request.param.require()
    return request.param


@pytest.fixture
async def buses(broker: Any) -> AsyncIterator[Buses]:
    pool = Buses(broker)
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
def bus_url(buses: Buses) -> str:
    """A fresh bus with a lease that never expires during a test."""
    return buses.url()


@pytest.fixture
async def bus(buses: Buses, bus_url: str) -> Transport:
    """A connected transport on ``bus_url``."""
    return await buses.open(bus_url)
