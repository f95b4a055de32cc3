"""What a push receiver answered: its status and headers, the part of its body that is
used (never more than the subscription allows held), and the CloudEvents it carries as
output events of the pushed one (:func:`answered_events`: derived ids, the cause's
correlation, reserved and undeclared types refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import httpx
import msgspec

from choreograph._clock import Clock, SystemClock
from choreograph._envelope import Envelope, derive_id, now_rfc3339, rfc3339, string_problem
from choreograph._http_binding import content_type_problem, decode_http_batch, is_cloudevent
from choreograph._push_http import classify
from choreograph.errors import EmitError, MalformedEnvelope
from choreograph.runtime.records import to_message
from choreograph.service import FAILED
from choreograph.transports.base import Message

HANDLER = "push"
"""The handler name in records and derived ids: outputs are ``derive_id(input, group, "push", i)``."""
EXCERPT = 500
EXCERPT_BYTES = 4 * EXCERPT  # enough for EXCERPT characters of UTF-8


class AnswerTooLarge(Exception):
    """A 2xx answer carrying CloudEvents is larger than the subscription's ``max_response_body``."""

    def __init__(self, status: int, limit: int, declared: int | None) -> None:
        self.status = status
        self.limit = limit
        size = f" ({declared} bytes declared)" if declared is not None else ""
        super().__init__(f"a body over the subscription's max_response_body of {limit} bytes{size}")


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """What the receiver answered: status and headers, and as much of the body as is used."""

    status: int
    reason: str
    headers: httpx.Headers
    content: bytes
    encoding: str

    def excerpt(self) -> str:
        try:
            text = self.content.decode(self.encoding, errors="replace")
        except (LookupError, UnicodeError):  # a codec httpx took for a charset: no text encoding (base64...),
            # or one failing whatever ``errors`` says (undefined)
            text = self.content.decode("utf-8", errors="replace")
        text = text.strip().replace("\n", " ")
        return text if len(text) <= EXCERPT else text[:EXCERPT] + "…"


async def read_answer(response: httpx.Response, max_body: int) -> bytes:
    """The part of the answer's body that is used, never more than ``max_body`` bytes held.

    A 2xx answer carrying CloudEvents is read whole, or refused with :class:`AnswerTooLarge`
    (before reading, if its Content-Length says so); a 2xx without events is not read at
    all; any other status is read up to an excerpt for the dead-letter record.
    """
    if classify(response.status_code) != "done":
        limit, strict = EXCERPT_BYTES, False
    elif is_cloudevent(response.headers):
        limit, strict = max_body, True
    else:
        return b""
    declared = response.headers.get("content-length", "").strip()
    if strict and declared.isdigit() and int(declared) > limit:
        raise AnswerTooLarge(response.status_code, limit, int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            if strict:
                raise AnswerTooLarge(response.status_code, limit, None)
            chunks.append(chunk[: limit - (size - len(chunk))])
            break
        chunks.append(chunk)
    return b"".join(chunks)


def answered_events(
    cause: Envelope, response: Answer, group: str, emits: Collection[str] | None, clock: Clock
) -> list[Message]:
    """The CloudEvents in a 2xx answer, as output events of ``cause`` with derived ids (``group``'s,
    handler :data:`HANDLER`); stamped on ``clock`` (a test's clock's time, not the wall's) unless
    they say their time; of the types in ``emits`` only, when it is given.

    Whether the answer carries any is read from its headers, not from its body: an event
    without data in binary mode is ``ce-`` headers and an empty body."""
    if not is_cloudevent(response.headers):
        return []
    try:
        answered = decode_http_batch(response.headers, response.content)
    except MalformedEnvelope as exc:
        raise MalformedEnvelope(f"an invalid CloudEvent: {exc}") from None
    stamp = now_rfc3339() if type(clock) is SystemClock else rfc3339(clock.time())
    messages = []
    for index, event in enumerate(answered):
        if event.type.startswith("choreograph.") or event.type == FAILED:
            raise EmitError(f"an event of the reserved type {event.type!r}")
        if emits is not None and event.type not in emits:
            raise EmitError(f"an event of type {event.type!r}; the subscription emits {sorted(emits)}")
        # What the answer sets itself goes onto the bus as ours: held to CloudEvents' String
        # type as choreograph's own attributes are (what the output inherits from the cause is not).
        for name, value in (("source", event.source), ("type", event.type), ("subject", event.subject),
                            ("dataschema", event.dataschema), ("partitionkey", event.partitionkey),
                            *event.extensions.items()):
            problem = string_problem(value) if isinstance(value, str) else None
            if problem is not None:
                raise EmitError(f"an event whose {name} {value!r} {problem}")
        # ...and its datacontenttype to what a binary-mode push can send on (an RFC 2046 media
        # type); published, it was dead-lettered by every binary-mode subscription it reached.
        if event.datacontenttype is not None:
            problem = content_type_problem(event.datacontenttype)
            if problem is not None:
                raise EmitError(f"an event whose datacontenttype {event.datacontenttype!r} {problem}")
        output = msgspec.structs.replace(
            event,
            id=derive_id(cause.id, group, HANDLER, index),
            time=event.time or stamp,
            correlationid=cause.correlationid or cause.id,
            causationid=cause.id,
            traceparent=cause.traceparent,
            tracestate=cause.tracestate,
            hops=cause.hops + 1,
            partitionkey=event.partitionkey or cause.partitionkey,
            deadline=cause.deadline,
        )
        messages.append(to_message(output))
    return messages
