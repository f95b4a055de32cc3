"""How choreograph lays itself out on RabbitMQ: names, queue arguments, headers, retry buckets.

Everything a bus creates is named from its ``prefix`` (``?prefix=`` in the URL, default
``choreograph``), so several independent buses can share one server and a bus can be
found (and deleted) from its prefix alone::

    <prefix>.events               durable topic exchange; routing key = event type
    <prefix>.group.<group>        a group's queue, bound to its types (``#`` for all)
    <prefix>.retry.<group>.<ms>   delayed retries: TTL <ms>, then dead-lettered back to the group
    <prefix>.dlq.<group>          the group's dead letters
    <prefix>.registry             one small message per group (its types): how groups are listed
    <prefix>.throwaway.<uuid>     created and deleted at once after declaring quorum queues,
                                  so a hard kill of the broker does not lose them (see amqp.py)

The attempt number travels in the ``x-choreograph-attempt`` header; quorum queues add
``x-delivery-count`` when a message comes back after a consumer died, and the two add up.
A dead letter's body is its record as one line of JSON, a newline, then the original
body byte for byte (a record of any size fits; headers are limited by the frame size).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions
import orjson
import pamqp.exceptions

from choreograph.errors import ChoreographError, ConfigurationError, TransportError
from choreograph.transports.base import DeadLetter, Message

Raw = aio_pika.abc.AbstractIncomingMessage

ATTEMPT_HEADER = "x-choreograph-attempt"
DEAD_AT_HEADER = "x-choreograph-dead-at"
CONTENT_TYPE = "application/cloudevents+json"
DEAD_LETTER_CONTENT_TYPE = "application/x-choreograph-dead-letter"

#: Retry delays are rounded *up* to one of these (milliseconds): ``retry(after)`` is
#: never early, at most 25% late, and a group never has more than ~90 retry queues
#: however its backoff is jittered.
RETRY_BUCKETS_MS: tuple[int, ...] = tuple(
    sorted({math.ceil(10 * 1.25**k) for k in range(200) if 10 * 1.25**k <= 2**31 - 1})
)
#: A retry queue lives this long past its TTL once nobody declares it (``x-expires``);
#: a process re-declares a queue it publishes to at least every ``RETRY_REDECLARE_S``.
RETRY_EXPIRES_EXTRA_MS = 600_000
RETRY_REDECLARE_S = 300.0

_MAX_NAME = 255

#: The characters AMQP 0-9-1 allows in a queue name (pamqp refuses the others with a bare
#: ``ValueError``: "Invalid value for queue").
_QUEUE_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]*")


class Names:
    """The broker-side names of one bus (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        if not prefix or any(c.isspace() for c in prefix):
            raise ConfigurationError(f"amqp URL: prefix={prefix!r} must be non-empty without spaces")
        if not _QUEUE_NAME.fullmatch(prefix):
            # It starts every exchange and queue name: ?prefix=shop* failed the connect with
            # pamqp's bare ValueError ("Invalid value for exchange"), naming neither.
            odd = "".join(sorted({c for c in prefix if not _QUEUE_NAME.fullmatch(c)}))
            raise ConfigurationError(
                f"amqp URL: prefix={prefix!r} has characters RabbitMQ does not take in a name ({odd!r});"
                " it may use ASCII letters, digits and - _ . : @ # , / +"
            )
        self.prefix = prefix
        self.exchange = f"{prefix}.events"
        self.registry = f"{prefix}.registry"

    def group(self, group: str) -> str:
        return self._checked(f"{self.prefix}.group.{group}")

    def dlq(self, group: str) -> str:
        return self._checked(f"{self.prefix}.dlq.{group}")

    def retry(self, group: str, delay_ms: int) -> str:
        return self._checked(f"{self.prefix}.retry.{group}.{delay_ms}")

    def throwaway(self, unique: str) -> str:
        """A queue created and deleted at once (see ``AmqpTransport._settle_declares``)."""
        return self._checked(f"{self.prefix}.throwaway.{unique}")

    @staticmethod
    def _checked(name: str) -> str:
        if len(name.encode()) > _MAX_NAME:
            raise ConfigurationError(f"amqp: queue name {name[:60]!r}... is longer than 255 bytes")
        if not _QUEUE_NAME.fullmatch(name):
            # A group named "billing*" or "façade" failed each subscribe, listing and replay with
            # pamqp's ValueError traceback (which names neither the queue nor the character).
            odd = "".join(sorted({c for c in name if not _QUEUE_NAME.fullmatch(c)}))
            raise ConfigurationError(
                f"amqp: queue name {name[:60]!r} has characters RabbitMQ does not take in one ({odd!r});"
                " a group (and the prefix) may use ASCII letters, digits, spaces and - _ . : @ # , / +"
            )
        return name


def retry_bucket_ms(after: float) -> int:
    """The retry queue delay for ``after`` seconds: 0 (no delay) or the smallest bucket >= after."""
    if after <= 0:
        return 0
    wanted = math.ceil(after * 1000)
    for bucket in RETRY_BUCKETS_MS:
        if bucket >= wanted:
            return bucket
    return RETRY_BUCKETS_MS[-1]  # ~24.8 days: the longest TTL RabbitMQ accepts here


def check_binding_type(event_type: str) -> None:
    """Event types become topic binding keys, where a ``*`` or ``#`` word is a wildcard."""
    if not event_type or len(event_type.encode()) > _MAX_NAME:
        raise ConfigurationError(f"amqp: event type {event_type[:60]!r} must be 1..255 bytes")
    if any(word in ("*", "#") for word in event_type.split(".")):
        raise ConfigurationError(
            f"amqp: event type {event_type!r} has a '*' or '#' word, which RabbitMQ reads as a wildcard"
        )


def queue_arguments(queue_type: str, server_major: int, **extra: Any) -> dict[str, Any]:
    """Arguments of a durable queue of ``queue_type``.

    RabbitMQ 4 gives quorum queues a default delivery limit of 20, after which a message
    that keeps coming back is dropped: choreograph owns retries and never drops silently,
    so the limit is switched off there (on 3.x ``-1`` would mean "drop at once").
    """
    args: dict[str, Any] = {"x-queue-type": queue_type}
    if queue_type == "quorum" and server_major >= 4:
        args["x-delivery-limit"] = -1
    args.update(extra)
    return args


def retry_queue_arguments(queue_type: str, server_major: int, delay_ms: int, target: str) -> dict[str, Any]:
    """A holding queue: messages expire after ``delay_ms`` into ``target`` (via the default exchange)."""
    extra: dict[str, Any] = {
        "x-message-ttl": delay_ms,
        "x-expires": delay_ms + RETRY_EXPIRES_EXTRA_MS,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": target,
    }
    if queue_type == "quorum":
        # quorum queues can dead-letter at-least-once (with publisher-confirm-like
        # guarantees inside the broker); it requires reject-publish overflow.
        extra["x-dead-letter-strategy"] = "at-least-once"
        extra["x-overflow"] = "reject-publish"
    return queue_arguments(queue_type, server_major, **extra)


def attempt_of(headers: Mapping[str, Any] | None, redelivered: bool) -> int:
    """The attempt number of a received message.

    ``x-choreograph-attempt`` (set when choreograph re-publishes a message for a retry,
    a lease expiry or a close) plus the returns the broker counted since (a consumer
    died holding it): quorum queues count them in ``x-delivery-count`` (RabbitMQ 4 also
    in ``x-acquired-count``); classic queues only flag ``redelivered``, which counts as
    one however many times it happened.
    """
    headers = headers or {}
    base = _int(headers.get(ATTEMPT_HEADER), 1)
    returns = max(
        _int(headers.get("x-delivery-count"), 0),
        _int(headers.get("x-acquired-count"), 0),
        1 if redelivered else 0,
    )
    return max(1, base) + returns


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, (bytes, str)):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def outgoing(
    body: bytes,
    message_id: str,
    message_type: str,
    *,
    attempt: int = 1,
    content_type: str = CONTENT_TYPE,
    headers: Mapping[str, Any] | None = None,
) -> aio_pika.Message:
    """A persistent AMQP message carrying one encoded event (and its attempt, when > 1)."""
    all_headers: dict[str, Any] = dict(headers or {})
    if attempt != 1:
        all_headers[ATTEMPT_HEADER] = attempt
    return aio_pika.Message(
        body,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id or None,
        type=message_type,
        content_type=content_type,
        headers=all_headers or None,
    )


def copy_of(raw: Raw, attempt: int) -> aio_pika.Message:
    """``raw`` as a fresh message carrying ``attempt`` (broker-added ``x-`` headers dropped)."""
    headers = {k: v for k, v in (raw.headers or {}).items() if not k.startswith("x-")}
    return outgoing(
        raw.body,
        raw.message_id or "",
        raw.type or "",
        attempt=attempt,
        content_type=raw.content_type or "application/octet-stream",
        headers=headers,
    )


def dead_letter_message(record: Mapping[str, Any], raw: Raw) -> aio_pika.Message:
    """A dead letter: the record as one line of JSON, a newline, then the original body untouched."""
    try:
        head = orjson.dumps(dict(record), default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # e.g. a cycle or an integer wider than 64 bits: keep it readable
        head = orjson.dumps({"record": repr(record)})
    return outgoing(
        head + b"\n" + raw.body,
        letter_id(raw.message_id, raw.body),  # never none: aiormq would mint a random one
        raw.type or "",
        content_type=DEAD_LETTER_CONTENT_TYPE,
        headers={DEAD_AT_HEADER: int(time.time() * 1000)},  # ms: float headers travel as 32-bit
    )


def _split_dead_letter(raw: Raw) -> tuple[Any, bytes]:
    """The record and the original body of a dead letter stored by :func:`dead_letter_message`."""
    head, _, body = raw.body.partition(b"\n")
    try:
        return orjson.loads(head), body
    except orjson.JSONDecodeError:
        return {"reason": "unreadable dead-letter record"}, raw.body


def letter_id(message_id: str | None, body: bytes) -> str:
    """The id a dead letter is listed, shown, replayed and purged by: its ``message_id``, or,
    for a message published without one (by an outside publisher), the CloudEvents ``id``
    of its body if that is a JSON object with a non-empty string ``id``, else
    ``sha256:<hex>`` of the body - the same on every read, distinct per body."""
    if message_id:
        return message_id
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("id"), str) and document["id"]:
        return str(document["id"])
    return "sha256:" + hashlib.sha256(body).hexdigest()


def dead_letter_id(raw: Raw) -> str:
    """The id of the dead letter in ``raw`` (see :func:`letter_id`)."""
    return letter_id(raw.message_id, _split_dead_letter(raw)[1])


def read_dead_letter(group: str, raw: Raw) -> DeadLetter:
    """The :class:`DeadLetter` stored in ``raw`` by :func:`dead_letter_message`."""
    record, body = _split_dead_letter(raw)
    dead_at_ms = (raw.headers or {}).get(DEAD_AT_HEADER)
    if isinstance(dead_at_ms, int) and not isinstance(dead_at_ms, bool):
        dead_at = dead_at_ms / 1000
    else:
        dead_at = raw.timestamp.timestamp() if raw.timestamp is not None else 0.0
    message = Message(letter_id(raw.message_id, body), raw.type or "", body)
    return DeadLetter(group, message, record if isinstance(record, dict) else {"record": record}, dead_at)


#: What the client libraries raise when the broker or the connection fails.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    pamqp.exceptions.PAMQPException,
    ConnectionError,
    OSError,  # includes TimeoutError
)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Re-raise aio-pika / aiormq / socket errors as :class:`TransportError` naming ``what``."""
    try:
        yield
    except ChoreographError:
        raise
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TransportError(
            f"amqp: {what}: the broker refused ({exc}); an existing queue may have been declared"
            " with other arguments (e.g. classic vs quorum: check ?queue_type=)"
        ) from exc
    except CLIENT_ERRORS as exc:
        raise TransportError(f"amqp: {what}: {type(exc).__name__}: {exc}") from exc
