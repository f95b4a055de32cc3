"""How choreograph names things on NATS, and how NATS failures become choreograph errors.

Group names, message ids and event types are arbitrary strings, but JetStream consumer
names and subject tokens are not (no ``.``, ``*``, ``>``, whitespace). Every mapping here
is injective, so two different groups can never share a consumer and two different
types can never share a subject. Plain names - the overwhelming majority - map to
themselves, which keeps the broker readable with ``nats`` CLI tools.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from urllib.parse import quote, unquote

import nats.errors

from choreograph.errors import TransportClosed, TransportError

# Headers choreograph writes. Values always pass through header_value() first.
H_MSG_ID = "Nats-Msg-Id"  # JetStream dedupe key; on an event it is also the message id
H_ID = "Choreograph-Id"  # message id when Nats-Msg-Id is something else (replays, dead letters)
H_TYPE = "Choreograph-Type"  # event type when the subject does not carry it (replays, dead letters)
H_GROUP = "Choreograph-Group"
H_RECORD = "Choreograph-Record"  # the dead-letter record, compact ASCII JSON
H_DEAD_AT = "Choreograph-Dead-At"

_NAME_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_TYPE_TOKEN = re.compile(r"[A-Za-z0-9_:-]+")
_HEADER_PLAIN = re.compile(r"[A-Za-z0-9._:/@+=~-]*")
_MAX_NAME = 120


def name_token(value: str) -> str:
    """``value`` as one subject token that is also a valid stream/consumer name.

    ``[A-Za-z0-9_-]`` pass through; any other character becomes ``~XX`` per UTF-8 byte
    (``~`` itself included), so the mapping is injective. Very long results are cut
    and suffixed with ``~~`` + a SHA-256 digest (``~~`` never occurs in the escaped
    form, so hashed names cannot collide with unhashed ones). Not ``%``: nats-server
    2.9 mangles deliveries of consumers whose name contains ``%``.
    """
    if _NAME_CHARS.fullmatch(value):
        escaped = value
    elif not value:
        return "~"
    else:
        escaped = "".join(
            char if _NAME_CHARS.fullmatch(char) else "".join(f"~{byte:02X}" for byte in char.encode())
            for char in value
        )
    if len(escaped) <= _MAX_NAME:
        return escaped
    return escaped[:60] + "~~" + hashlib.sha256(value.encode()).hexdigest()


def type_tokens(event_type: str) -> str:
    """``event_type`` as subject tokens: its dotted parts as they are when every part is
    plain (``shop.order.placed``), otherwise one ``~``-prefixed hex token."""
    if all(_TYPE_TOKEN.fullmatch(part) for part in event_type.split(".")):
        return event_type
    return "~" + event_type.encode().hex()


def type_from_tokens(tokens: str) -> str:
    """Inverse of :func:`type_tokens`."""
    if tokens.startswith("~"):
        return bytes.fromhex(tokens[1:]).decode()
    return tokens


def header_value(value: str) -> str:
    """``value`` made safe for a NATS header (one line, no surrounding blanks); reversible."""
    return value if _HEADER_PLAIN.fullmatch(value) else quote(value, safe="")


def from_header(value: str) -> str:
    """Inverse of :func:`header_value`."""
    return unquote(value) if "%" in value else value


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Re-raise nats-py failures inside the block as :class:`TransportError` naming ``action``."""
    try:
        yield
    except TransportError:
        raise
    except nats.errors.ConnectionClosedError as exc:
        raise TransportClosed(f"nats: {action}: the connection is closed") from exc
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise TransportError(f"nats: {action} failed: {detail}") from exc


class JetStreamError(TransportError):
    """The JetStream API answered with an error (``code``: HTTP-like, ``err_code``: JetStream's)."""

    def __init__(self, action: str, code: int, err_code: int, description: str) -> None:
        super().__init__(f"nats: {action}: {description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code


# JetStream err_codes choreograph branches on.
ERR_STREAM_NAME_IN_USE = 10058
ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
ERR_NO_MESSAGE_FOUND = 10037
