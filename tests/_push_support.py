"""Real HTTP servers for the push tests: an ASGI app served by uvicorn on a free loopback port,
and a scripted receiver that answers from a list and records every request."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port>; yields its base URL (``http://127.0.0.1:PORT``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", http="h11",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclasses.dataclass
class Recorded:
    method: str
    headers: dict[str, str]
    body: bytes


HANG = "hang"
"""An answer that never comes (until the receiver is released at the end of the test)."""


class Scripted:
    """A receiver answering POSTs from ``answers`` in order (the last one repeats).

    An answer is ``(status, headers, body)``, a status alone, or :data:`HANG`. The
    handshake grants ``allowed`` (``None``: OPTIONS answers 405, as a server that does
    not know the handshake).
    """

    def __init__(self, *answers: Any, allowed: str | None = "*") -> None:
        self.answers = list(answers) or [204]
        self.allowed = allowed
        self.requests: list[Recorded] = []
        self.options: list[Recorded] = []
        self.release = asyncio.Event()
        self.app = Starlette(routes=[Route("/hook", self._endpoint, methods=["POST", "OPTIONS"])])

    @property
    def posts(self) -> int:
        return len(self.requests)

    async def _endpoint(self, request: Request) -> Response:
        recorded = Recorded(request.method, {k.lower(): v for k, v in request.headers.items()}, await request.body())
        if request.method == "OPTIONS":
            self.options.append(recorded)
            if self.allowed is None:
                return Response(status_code=405)
            return Response(status_code=200, headers={"WebHook-Allowed-Origin": self.allowed})
        self.requests.append(recorded)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if answer == HANG:
            await self.release.wait()
            return Response(status_code=204)
        if isinstance(answer, int):
            answer = (answer, {}, b"")
        status, headers, body = answer
        return Response(body, status_code=status, headers=headers)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve it; yields the hook URL."""
        async with serve(self.app) as base:
            try:
                yield base + "/hook"
            finally:
                self.release.set()
