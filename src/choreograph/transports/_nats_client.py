"""The JetStream requests choreograph makes over one nats-py connection.

Only the core client of nats-py is used; the few JetStream requests are spoken directly
(JSON on ``$JS.API.*``), which keeps every timeout, batch and error under our control:

* :meth:`JetStream.api` - a JetStream API call; an error answer raises :class:`JetStreamError`.
* :meth:`JetStream.publish` - write a batch of messages back to back, all with one reply
  subject of the batch's own on a shared inbox, then wait for all of their PubAcks
  together: a batch costs one round trip, not one per message (and one future, not one
  per message).
* :meth:`JetStream.direct_get` - read one stored message (dead letters).
* :func:`send_commands` - hand the client already encoded ``PUB``/``HPUB`` commands.

**Bulk writes.** nats-py's ``publish`` encodes and queues one message per call (subject
checks, a header block built key by key, a flusher kick each time), which was a tenth of
a busy worker's CPU. Publishing a batch and acking a batch therefore encode the whole
batch as one bytes object of protocol commands (``PUB <subject> <reply> <size>`` /
``HPUB ...``; subjects and header values are ours and safe: see ``_nats_codec``) and give
it to the client's write queue with the same checks ``publish`` makes (closed, draining,
the reconnect buffer's limit). That uses two internals of nats-py's ``Client``
(``_send_command`` and ``_flush_pending``, present since 2.0); :func:`bulk_supported`
checks for them, and without them every message goes through ``publish`` as before.
When that queue is empty (and the socket keeps up) the commands are written to the socket
at once instead: the flusher task's wake-up was a loop turn on the path of every output
and pull request at a light load (:func:`send_commands`).

**Direct delivery.** For its own inboxes (pull replies, PubAcks) choreograph takes
messages straight from the protocol parser (:class:`DirectClient`): a light :class:`Raw`
message handed to a plain function, instead of nats-py's ``Msg``, its header parsing, its
per-subscription queue and task and an awaited callback per message - a loop iteration
less on the path of every delivery and every PubAck. Other subscriptions, and clients
whose ``_process_msg`` has another shape, take nats-py's own path.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.transport import TcpTransport

from choreograph.errors import TransportClosed, TransportError
from choreograph.transports import _nats_codec as codec

#: How long publish waits for the broker's acknowledgements (seconds).
PUBLISH_TIMEOUT = 10.0
#: How long a JetStream API call waits for its answer (seconds).
API_TIMEOUT = 5.0

#: One message to publish: subject, body, headers (only dedupe keys; dropped if they do not fit),
#: as a mapping or already encoded as a header block (:func:`header_block`).
Item = tuple[str, bytes, Mapping[str, str] | bytes | None]

_HEADER_LINE = b"NATS/1.0\r\n"


def bulk_supported(nc: Client) -> bool:
    """Whether ``nc`` has the write-queue internals :func:`send_commands` uses."""
    return all(hasattr(nc, name) for name in ("_send_command", "_flush_pending", "_flush_queue",
                                               "_pending_data_size", "_max_pending_size"))


def header_block(headers: Mapping[str, str]) -> bytes:
    """The ``NATS/1.0`` header block of ``headers`` (keys and values without CR/LF)."""
    if len(headers) == 1:  # the usual: a dedupe key
        ((key, value),) = headers.items()
        return b"NATS/1.0\r\n%s: %s\r\n\r\n" % (key.encode(), value.encode())
    return _HEADER_LINE + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items()) + b"\r\n"


def pub_command(subject: bytes, reply: bytes, body: bytes, headers: bytes | None = None) -> bytes:
    """One ``PUB`` (or, with a header block, ``HPUB``) command with its payload."""
    if headers is None:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(body), body)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject, reply, len(headers), len(headers) + len(body), headers, body)


async def send_commands(nc: Client, commands: bytes, messages: int) -> None:
    """Queue ``commands`` (``messages`` encoded ``PUB``/``HPUB`` commands) for the server,
    with the checks and the flusher kick of ``Client.publish``."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if not nc.is_connected and (nc._max_pending_size <= 0
                                or len(commands) + nc._pending_data_size > nc._max_pending_size):
        raise nats.errors.OutboundBufferLimitError  # reconnecting with a full (or no) buffer
    stats = nc.stats
    stats["out_msgs"] += messages
    stats["out_bytes"] += len(commands)
    if _write_now(nc, commands):
        return
    await nc._send_command(commands)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def _write_now(nc: Client, commands: bytes) -> bool:
    """Write ``commands`` to the socket at once, if nothing is queued before them: connected over
    plain TCP (or TLS on it), the client's write queue empty and the socket's send buffer too.

    Otherwise the client's flusher task writes them, a loop turn later (its queue kick, the
    task's wake-up): on the path of every output and every pull request at a light load. In
    order all the same: the flusher writes its queue whole, and this writes only when that
    queue is empty; a socket that is not keeping up leaves the writing, and its waits, to it.
    """
    if nc._pending_data_size or not nc.is_connected:
        return False
    transport = nc._transport
    if type(transport) is not TcpTransport:
        return False
    writer = transport._io_writer
    if writer is None or writer.transport.is_closing() or writer.transport.get_write_buffer_size():
        return False
    writer.write(commands)
    return True


class Raw:
    """A message as the parser read it, duck-typed like nats-py's ``Msg`` where choreograph
    reads one (headers parsed on first use)."""

    __slots__ = ("subject", "reply", "data", "_raw_headers", "_headers", "_client", "arrived")

    #: (``arrived``: set by the pull subscription for the messages it buffers, whose lease runs
    #: from it - see ``NatsDelivery``; not here, where every PubAck and API reply would pay for it)

    def __init__(self, client: Client, subject: str, reply: str, data: bytes, headers: bytes | None) -> None:
        self._client = client
        self.subject = subject
        self.reply = reply
        self.data = data
        self._raw_headers = headers
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        if self._headers is None and self._raw_headers:
            self._headers = parse_headers(self._raw_headers)
        return self._headers

    @property
    def metadata(self) -> Any:
        """JetStream metadata of the ack subject, parsed by nats-py (a rare fallback)."""
        return Msg(_client=self._client, subject=self.subject, reply=self.reply, data=self.data,
                   headers=self.headers).metadata


_MSG_ID_BLOCK = b"NATS/1.0\r\nNats-Msg-Id: "


def parse_headers(raw: bytes) -> dict[str, str]:
    """A ``NATS/1.0`` header block as nats-py reads it: an inline status becomes ``Status``
    (and ``Description``), then one entry per ``Name: value`` line."""
    start = len(_MSG_ID_BLOCK)
    if raw.startswith(_MSG_ID_BLOCK) and raw.find(b"\r\n", start) == len(raw) - 4:  # the usual: the dedupe id alone
        return {"Nats-Msg-Id": raw[start:-4].decode("utf-8", errors="replace").strip()}
    lines = raw.decode("utf-8", errors="replace").split("\r\n")
    headers: dict[str, str] = {}
    status = lines[0][len("NATS/1.0"):].strip()
    if status:
        code, _, description = status.partition(" ")
        if code.isdigit():
            headers["Status"] = code
        if description:
            headers["Description"] = description
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        name = name.strip()
        if colon and name:
            headers[name] = value.strip()
    return headers


#: Whether nats-py's ``Client._process_msg`` has the shape :class:`DirectClient` overrides.
DIRECT_SUPPORTED = list(inspect.signature(Client._process_msg).parameters) == [
    "self", "sid", "subject", "reply", "data", "headers"
]


class DirectClient(Client):
    """nats-py's client, with a direct path from the parser to choreograph's own inboxes."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Callable[[Raw], None]] = {}

    def route(self, subscription: Any, handler: Callable[[Raw], None]) -> bool:
        """Hand ``subscription``'s messages to ``handler`` (which must not raise or block) from
        now on; ``False`` if this nats-py cannot (its callback then receives them)."""
        if not DIRECT_SUPPORTED:
            return False
        self._direct[subscription._id] = handler
        return True

    def unroute(self, subscription: Any) -> None:
        self._direct.pop(subscription._id, None)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        # (``headers`` is None for a message without any, whatever nats-py's annotation says)
        handler = self._direct.get(sid)
        if handler is None or sid not in self._subs:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            handler(Raw(self, subject.decode(), reply.decode(), data, headers or None))
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the connection's read loop
            await self._error_cb(exc)


class _Batch:
    """The PubAcks one :meth:`JetStream.publish` call still waits for."""

    __slots__ = ("left", "error", "done", "duplicates")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.left = count
        self.error: BaseException | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.duplicates = 0  # PubAcks saying the stream had the message already (its Nats-Msg-Id)

    def confirm(self, error: BaseException | None, *, duplicate: bool = False) -> None:
        if self.done.done():
            return
        if error is not None and self.error is None:
            self.error = error
        self.duplicates += duplicate
        self.left -= 1
        if self.left <= 0:
            self.done.set_result(None)

    def abort(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


class JetStream:
    """JetStream requests on the connection ``nc`` (call :meth:`start` once)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._puback_prefix = nc.new_inbox() + "."
        self._pubacks: dict[str, _Batch] = {}  # reply token -> the batch published with it
        self._tokens = itertools.count()
        self.bulk = bulk_supported(nc)  # encode batches ourselves (see the module doc)

    async def start(self) -> None:
        with codec.translated("subscribe to publish acknowledgements"):
            sub = await self.nc.subscribe(self._puback_prefix + "*", cb=self._on_puback)
        if isinstance(self.nc, DirectClient):
            self.nc.route(sub, self._puback)

    def cancel(self) -> None:
        """Release publishers waiting for acknowledgements (the connection is going away)."""
        for batch in set(self._pubacks.values()):
            batch.abort(TransportClosed("nats: the transport was closed while publishing"))

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

    async def publish(self, items: Sequence[Item]) -> int:
        """Publish every item in order, then wait for all of their PubAcks; return how many the
        stream stored (not those it already had under their ``Nats-Msg-Id``: duplicates)."""
        if not items:
            return 0
        nc = self._open()
        batch = _Batch(len(items), asyncio.get_running_loop())
        token = str(next(self._tokens))
        reply = self._puback_prefix + token
        self._pubacks[token] = batch
        try:
            with codec.translated("publish"):
                room = nc.max_payload
                for _, body, _ in items:
                    if len(body) > room:
                        raise TransportError(
                            f"nats: a body of {len(body)} bytes exceeds the server's max_payload ({room})"
                        )
                if self.bulk:
                    reply_b = reply.encode()
                    commands = []
                    for subject, body, headers in items:
                        if isinstance(headers, bytes):
                            block: bytes | None = headers
                        else:
                            block = header_block(headers) if headers else None
                        if block is not None and len(body) + len(block) > room:
                            block = None  # a dedupe key is not worth refusing the message for
                        commands.append(pub_command(subject.encode(), reply_b, body, block))
                    await send_commands(nc, b"".join(commands), len(commands))
                else:
                    for subject, body, headers in items:
                        if isinstance(headers, bytes):
                            headers = parse_headers(headers)
                        if headers and len(body) + codec.header_size(headers) > room:
                            headers = None
                        await nc.publish(subject, body, reply=reply, headers=dict(headers) if headers else None)
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await batch.done
            except TimeoutError:
                raise TransportError(
                    f"nats: publish: {batch.left} of {len(items)} message(s) not confirmed within {PUBLISH_TIMEOUT} s"
                ) from None
            if batch.error is not None:
                raise batch.error
            return len(items) - batch.duplicates
        finally:
            self._pubacks.pop(token, None)
            if batch.done.done() and not batch.done.cancelled():
                batch.done.exception()  # mark retrieved: no "never retrieved" noise
            else:
                batch.done.cancel()

    async def _on_puback(self, msg: Msg) -> None:
        self._puback(msg)

    def _puback(self, msg: Msg | Raw) -> None:
        batch = self._pubacks.get(msg.subject[len(self._puback_prefix) :])  # one reply subject per batch
        if batch is None:
            return
        data = msg.data
        if b'"error"' not in data and data.startswith(b"{"):  # the usual {"stream":...,"seq":...}
            batch.confirm(None, duplicate=b'"duplicate"' in data)
            return
        if (msg.headers or {}).get("Status") == "503":
            batch.confirm(TransportError("nats: publish: no stream answered (deleted, or electing a leader?)"))
            return
        try:
            error = json.loads(data).get("error")
        except ValueError:
            error = {"description": f"unreadable acknowledgement {data[:100]!r}"}
        if error:
            batch.confirm(TransportError(f"nats: publish rejected: {error.get('description', error)}"))
        else:
            batch.confirm(None)
