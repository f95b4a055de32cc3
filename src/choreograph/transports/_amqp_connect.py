"""What the RabbitMQ transport checks of its URL before aio-pika reads it, and what it asks
the broker when a connection is refused.

aio-pika and aiormq take a URL's query as a mapping and pick the names they know: a typo
would be ignored without a word, and some values they misread (a number that is not one
read as 0). :func:`check_client_params` and :func:`check_client_values` refuse those with a
:class:`~choreograph.errors.ConfigurationError` naming the parameter. When the broker
refuses to open a connection, aiormq drops the reply that says why; :func:`open_refusal`
connects once more to learn it. :func:`server_major` reads the broker's major version.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import aio_pika
import aio_pika.abc
import aiormq
import pamqp.commands
import pamqp.frame
from aiormq.auth import AuthMechanism
from aiormq.connection import FrameReceiver
from pamqp.base import Frame
from pamqp.frame import FrameTypes

from choreograph.errors import ConfigurationError
from choreograph.transports import did_you_mean

OUR_PARAMS = ("lease", "prefix", "queue_type")
#: What aiormq 7 reads from a URL's query (``aiormq.Connection.__init__`` and
#: ``_credentials_class``: ``url.query.get(...)``); a test checks aiormq's source still
#: reads no other. aio-pika's own are its connection class's PARAMETERS.
AIORMQ_PARAMS = (
    "auth", "cadata", "cafile", "capath", "certfile", "heartbeat", "keyfile", "name", "no_verify_ssl", "timeout",
)
QUEUE_TYPES = ("quorum", "classic")


def check_client_params(names: set[str]) -> None:
    """Refuse query parameters neither aio-pika nor aiormq reads: both take the URL's query
    as a mapping and pick the names they know, so a typo (``?prefx=shop``, or aio-pika's
    documented but unread ``ca_certs``) would be ignored without a word."""
    client = {parameter.name for parameter in aio_pika.RobustConnection.PARAMETERS} | set(AIORMQ_PARAMS)
    unknown = sorted(names - client)
    if unknown:
        known = [*OUR_PARAMS, *sorted(client)]
        hints = [did_you_mean(name, known) for name in unknown]
        raise ConfigurationError(
            f"amqp URL: unknown parameter(s) {', '.join(hints)}; choreograph's are {', '.join(OUR_PARAMS)};"
            f" aio-pika's are {', '.join(sorted(client))}"
        )


#: The values aio-pika and aiormq would misread without a word: their parsers turn what is
#: not a number into 0 (``?timeout=30s`` read as 0; ``?heartbeat=x`` or one of 65535 or
#: more: heartbeats off; ``?reconnect_interval=1e3``: reconnect in a tight loop), and aiormq
#: verifies TLS certificates only for ``no_verify_ssl=0`` (``?no_verify_ssl=false`` turned
#: verification off). Each is checked as a plain decimal (what those parsers read).
_CLIENT_VALUES: dict[str, tuple[str, str]] = {
    "timeout": (r"\d+", "a whole number of seconds"),
    "heartbeat": (r"\d{1,5}", "a whole number of seconds below 65535"),
    "interleave": (r"\d+", "a whole number"),
    "reconnect_interval": (r"\d+(\.\d*)?", "a number of seconds (digits, optionally a decimal point)"),
    "happy_eyeballs_delay": (r"\d+(\.\d*)?", "a number of seconds (digits, optionally a decimal point)"),
    "no_verify_ssl": (r"[01]", "0 (verify certificates) or 1 (do not)"),
    "fail_fast": (r"(?i:true|yes|y|enabled?|on|1|false|no|n|disabled?|off|0)", "true or false"),
    # aiormq looks the mechanism up only in the broker's answer: anything else was an
    # AuthenticationError at connect ("[Errno PLAIN AMQPLAIN] ['PLAIN', 'EXTERNAL']") naming no parameter
    "auth": (f"(?i:{'|'.join(m.name for m in AuthMechanism)})", " or ".join(m.name.lower() for m in AuthMechanism)),
}


def check_client_values(query: list[tuple[str, str]]) -> None:
    """Refuse a value of aio-pika's or aiormq's parameters that they would misread (see
    :data:`_CLIENT_VALUES`), naming the parameter."""
    for name, value in query:
        pattern, wanted = _CLIENT_VALUES.get(name, ("", ""))
        if not pattern:
            continue
        if not re.fullmatch(pattern, value) or (name == "heartbeat" and int(value) >= 65535):
            raise ConfigurationError(f"amqp URL: {name}={value!r} is not {wanted}")


class _Refused(Exception):
    """The broker's Connection.Close during the handshake: (reply code, reply text)."""


class _RefusalProbe(aiormq.Connection):
    """An aiormq connection whose handshake reports the broker's Connection.Close as it is.

    When the broker refuses Connection.Open (a vhost that does not exist, or that the user
    may not use), aiormq 7 raises ``InvalidFrameError: Expected one of
    ['Connection.OpenOk'], got <Connection.Close object at 0x...>``, dropping the reply
    code and text that say which. This subclass raises them instead; it is only used to
    connect a second time, after such a failure, to learn the reason."""

    @staticmethod
    async def _rpc(
        request: Frame,
        writer: asyncio.StreamWriter,
        frame_receiver: FrameReceiver,
        wait_response: bool = True,
    ) -> FrameTypes | None:
        writer.write(pamqp.frame.marshal(request, 0))
        await writer.drain()
        if not wait_response:
            return None
        _, _, frame = await frame_receiver.get_frame()
        if isinstance(frame, pamqp.commands.Connection.Close):
            raise _Refused(frame.reply_code, frame.reply_text)
        return frame


async def open_refusal(url: str, timeout: float) -> str | None:
    """Why the broker refuses to open a connection to ``url``: the vhost and the broker's
    reply (``vhost 'shop': 530 NOT_ALLOWED - vhost shop not found``), or None if a second
    attempt does not tell (it fails otherwise, or succeeds)."""
    probe = _RefusalProbe(url)
    try:
        await asyncio.wait_for(probe.connect(), timeout)
    except _Refused as refused:
        code, text = refused.args
        return f"the broker refused to open vhost {probe.vhost!r}: {code} {text}"
    except Exception:
        return None
    with contextlib.suppress(Exception):
        await probe.close()
    return None


def server_major(connection: aio_pika.abc.AbstractRobustConnection) -> int:
    """RabbitMQ's major version (3 if it cannot be told): quorum-queue defaults differ in 4."""
    underlay = getattr(connection, "transport", None)
    properties = getattr(getattr(underlay, "connection", None), "server_properties", None) or {}
    version = properties.get("version", b"3")
    text = version.decode() if isinstance(version, bytes) else str(version)
    try:
        return int(text.split(".")[0])
    except ValueError:
        return 3
