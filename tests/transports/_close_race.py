"""``close()`` while a connect is under way: the check the NATS and RabbitMQ tests share.

``close()`` found no connection yet to close; the connect then installed the one it opened
on the closed transport, open, with nobody left to close it. The connect must close what it
opened and raise :class:`TransportClosed`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from choreograph.errors import TransportClosed
from choreograph.transports.base import Transport

WAIT = 15.0  # a ceiling for a loaded machine, never a speed assertion


async def close_during_connect(transport: Transport, opener: str, opened: list[Any]) -> None:
    """Holds ``transport.<opener>`` once it has opened its connection (appended to ``opened``, for
    the caller to check and to close), closes the transport there, then lets the connect finish:
    it must raise :class:`TransportClosed`."""
    made, go_on = asyncio.Event(), asyncio.Event()
    real_open = getattr(transport, opener)

    async def held_open() -> Any:
        connection = await real_open()
        opened.append(connection)
        made.set()
        await go_on.wait()  # close() runs here, while the connect is under way
        return connection

    setattr(transport, opener, held_open)
    connecting = asyncio.ensure_future(transport.connect())
    try:
        await asyncio.wait_for(made.wait(), WAIT)
        await transport.close()
        go_on.set()
        with pytest.raises(TransportClosed):
            await connecting
    finally:
        go_on.set()
        await asyncio.gather(connecting, return_exceptions=True)
