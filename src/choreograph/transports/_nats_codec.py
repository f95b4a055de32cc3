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
from collections.abc import Iterator, Mapping

import nats.errors

from choreograph.errors import TransportClosed, TransportError

#: JetStream dedupe key, set to the message id when it fits under max_payload.
H_MSG_ID = "Nats-Msg-Id"
#: The id of a replayed dead letter too long for its subject (its ``Nats-Msg-Id`` is the
#: replay's own dedupe key): read before ``Nats-Msg-Id`` for the ``~h`` form.
H_ID = "Choreograph-Id"
#: Last subject token of an event whose id travels in its ``Nats-Msg-Id`` header. Never
#: the output of :func:`name_token` (which writes ``~`` only before two hex digits, or alone).
ID_IN_HEADER = "~h"
#: The longest subject choreograph writes (nats-server's control line is 4 KiB).
MAX_SUBJECT = 2048
#: The longest id token a dead letter's subjects carry; a longer one is cut and hashed.
MAX_LETTER_ID = 1024

_NAME_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_TYPE_TOKEN = re.compile(r"[A-Za-z0-9_:-]+")
_MAX_NAME = 120


def name_token(value: str, *, hash_long: bool = True) -> str:
    """``value`` as one subject token that is also a valid stream/consumer name.

    ``[A-Za-z0-9_-]`` pass through; any other character becomes ``~XX`` per UTF-8 byte
    (``~`` itself included), so the mapping is injective and :func:`from_name_token`
    reverses it. With ``hash_long``, results past 120 characters are cut and suffixed
    with ``~~`` + a SHA-256 digest (``~~`` never occurs in the escaped form, so hashed
    names cannot collide with unhashed ones) - for consumer names, never read back.
    Not ``%``: nats-server 2.9 mangles deliveries of consumers whose name has a ``%``.
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
    if not hash_long or len(escaped) <= _MAX_NAME:
        return escaped
    return escaped[:60] + "~~" + hashlib.sha256(value.encode()).hexdigest()


def letter_id_tokens(message_id: str) -> tuple[str, ...]:
    """The id token of a dead letter's subjects: :func:`name_token` unhashed, but cut and
    hashed (as a long consumer name is) past :data:`MAX_LETTER_ID` characters - an id of any
    length then makes a subject the server takes (past its 4 KiB control line it drops the
    connection). A dead letter keeps its id in its record, so its subject need not give it
    back. A hashed id is followed by its unhashed token when that is short enough to have
    been stored unhashed by an earlier choreograph: a lookup tries both."""
    token = name_token(message_id, hash_long=False)
    if len(token) <= MAX_LETTER_ID:
        return (token,)
    hashed = token[:60] + "~~" + hashlib.sha256(message_id.encode()).hexdigest()
    return (hashed, token) if len(token) <= MAX_SUBJECT * 2 - 200 else (hashed,)


def from_name_token(token: str) -> str:
    """Inverse of :func:`name_token` (unhashed)."""
    if "~" not in token:
        return token
    if token == "~":
        return ""
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "~":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode()


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


def message_subject(base: str, event_type: str, message_id: str | None = None) -> str:
    """``<base>.<type tokens>.<id token>``, or ``<base>.<type tokens>.~h`` when ``message_id``
    is ``None`` (the id then travels in the ``Nats-Msg-Id`` header).

    The header form is the usual one: a stream with a distinct subject per message makes
    the server track every subject, which costs it several times the CPU per message. The
    id goes into the subject only when a body is so large that the header would push it
    past ``max_payload``.
    """
    tail = ID_IN_HEADER if message_id is None else name_token(message_id, hash_long=False)
    subject = f"{base}.{type_tokens(event_type)}.{tail}"
    if len(subject) > MAX_SUBJECT:
        raise TransportError(
            f"nats: event type and id too long for a subject ({len(subject)} > {MAX_SUBJECT} chars)"
        )
    return subject


def header_size(headers: Mapping[str, str]) -> int:
    """Bytes ``headers`` add to a message (``NATS/1.0`` line, ``k: v`` lines, blank line)."""
    return sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12 if headers else 0


def split_subject(tail: str, headers: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(type, id)`` from the part of a subject after its base (and, for the ``~h`` form,
    the message's headers); None if it is not ours."""
    tokens, _, id_token = tail.rpartition(".")
    if not tokens:
        return None
    if id_token == ID_IN_HEADER:
        id_token = (headers or {}).get(H_ID) or (headers or {}).get(H_MSG_ID, "")
        if not id_token:
            return None
    try:
        return type_from_tokens(tokens), from_name_token(id_token)
    except ValueError:  # bad hex / UTF-8: not written by choreograph
        return None


def ack_metadata(reply: str) -> tuple[int, int, int] | None:
    """``(delivery count, stream sequence, pending)`` from a JetStream ack subject, or None.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`` or, with a
    domain and account hash, ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>...``.
    ``pending`` is how many messages the consumer had yet to deliver when it sent this one.
    (nats-py's ``Msg.metadata`` parses the same and builds objects and a datetime we do not need.)
    """
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[4]), int(tokens[5]), int(tokens[8])
        if len(tokens) >= 11:
            return int(tokens[6]), int(tokens[7]), int(tokens[10])
    except ValueError:
        pass
    return None


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
