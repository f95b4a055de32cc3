"""The JetStream requests choreograph makes over one nats-py connection.

Only the core client of nats-py is used; the few JetStream requests are spoken directly
(JSON on ``$JS.API.*``), which keeps every timeout, batch and error under our control:

* :meth:`JetStream.api` - a JetStream API call; an error answer raises :class:`JetStreamError`.
* :meth:`JetStream.publish` - write a batch of messages back to back, each with its own
  reply subject on one shared inbox, then wait for all of their PubAcks together: a
  batch costs one round trip, not one per message.
* :meth:`JetStream.direct_get` - read one stored message (dead letters).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from choreograph.errors import TransportClosed, TransportError
from choreograph.transports import _nats_codec as codec

#: How long publish waits for the broker's acknowledgements (seconds).
PUBLISH_TIMEOUT = 10.0
#: How long a JetStream API call waits for its answer (seconds).
API_TIMEOUT = 5.0

#: One message to publish: subject, body, headers (only dedupe keys; dropped if they do not fit).
Item = tuple[str, bytes, Mapping[str, str]]


class JetStream:
    """JetStream requests on the connection ``nc`` (call :meth:`start` once)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._puback_prefix = nc.new_inbox() + "."
        self._pubacks: dict[str, asyncio.Future[None]] = {}
        self._tokens = itertools.count()

    async def start(self) -> None:
        with codec.translated("subscribe to publish acknowledgements"):
            await self.nc.subscribe(self._puback_prefix + "*", cb=self._on_puback)

    def cancel(self) -> None:
        """Release publishers waiting for acknowledgements (the connection is going away)."""
        for future in self._pubacks.values():
            future.cancel()

    def _open(self) -> Client:
        if self.nc.is_closed:
            raise TransportClosed("nats: transport is closed")
        return self.nc

    async def api(
        self, action: str, subject: str, request: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Call ``$JS.API.<subject>``; raise :class:`JetStreamError` if it answers an error."""
        nc = self._open()
        payload = b"" if request is None else json.dumps(request).encode()
        with codec.translated(action):
            try:
                reply = await nc.request(f"$JS.API.{subject}", payload, timeout=API_TIMEOUT)
            except nats.errors.NoRespondersError:
                raise TransportError(f"nats: {action}: JetStream is not enabled (nats-server -js)") from None
        response: dict[str, Any] = json.loads(reply.data)
        error = response.get("error")
        if error:
            code, err_code = error.get("code", 0), error.get("err_code", 0)
            raise codec.JetStreamError(action, code, err_code, error.get("description", ""))
        return response

    async def direct_get(self, stream: str, request: Mapping[str, Any]) -> Msg | None:
        """One message of ``stream`` (``Nats-Sequence``/``Nats-Subject`` headers); None if none."""
        nc = self._open()
        with codec.translated(f"read from {stream}"):
            reply = await nc.request(
                f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), timeout=API_TIMEOUT
            )
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status:
            raise TransportError(f"nats: read from {stream}: {status} {headers.get('Description', '')}")
        return reply

    async def publish(self, items: Sequence[Item]) -> None:
        """Publish every item in order, then wait for all of their PubAcks."""
        if not items:
            return
        nc = self._open()
        loop = asyncio.get_running_loop()
        waiting: list[tuple[str, asyncio.Future[None]]] = []
        try:
            with codec.translated("publish"):
                for subject, body, headers in items:
                    if len(body) > nc.max_payload:
                        raise TransportError(
                            f"nats: a body of {len(body)} bytes exceeds the server's max_payload ({nc.max_payload})"
                        )
                    if len(body) + codec.header_size(headers) > nc.max_payload:
                        headers = {}  # a dedupe key is not worth refusing the message for
                    token = str(next(self._tokens))
                    future: asyncio.Future[None] = loop.create_future()
                    self._pubacks[token] = future
                    waiting.append((token, future))
                    await nc.publish(
                        subject, body, reply=self._puback_prefix + token, headers=dict(headers) or None
                    )
            done, pending = await asyncio.wait([future for _, future in waiting], timeout=PUBLISH_TIMEOUT)
            if any(future.cancelled() for future in done):
                raise TransportClosed("nats: the transport was closed while publishing")
            errors = [exc for future in done if (exc := future.exception()) is not None]
            if errors:
                raise errors[0]
            if pending:
                raise TransportError(
                    f"nats: publish: {len(pending)} of {len(items)} message(s) not confirmed within {PUBLISH_TIMEOUT} s"
                )
        finally:
            for token, future in waiting:
                self._pubacks.pop(token, None)
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # mark retrieved: no "never retrieved" noise

    async def _on_puback(self, msg: Msg) -> None:
        future = self._pubacks.get(msg.subject[len(self._puback_prefix) :])
        if future is None or future.done():
            return
        if (msg.headers or {}).get("Status") == "503":
            future.set_exception(
                TransportError("nats: publish: no stream takes this subject (was it deleted?)")
            )
            return
        try:
            error = json.loads(msg.data).get("error")
        except ValueError:
            error = {"description": f"unreadable acknowledgement {msg.data[:100]!r}"}
        if error:
            future.set_exception(TransportError(f"nats: publish rejected: {error.get('description', error)}"))
        else:
            future.set_result(None)
