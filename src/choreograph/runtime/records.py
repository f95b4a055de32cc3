"""Building what the runtime writes: output envelopes, failure events, dead-letter records,
and the settle rules the worker and the push ambassador share."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Literal

import orjson

from choreograph._envelope import (
    DEFAULT_CONTENT_TYPE,
    SPECVERSION,
    Envelope,
    attribute_problem,
    derive_id,
    derive_id_with,
    encode,
    now_rfc3339,
    rfc3339,
    string_problem,
)
from choreograph._event_wire import I64_MIN, U64_MAX, by_alias, check_published, check_wire
from choreograph.events import Event, event_json
from choreograph.stores.base import ErrorInfo
from choreograph.transports.base import Message

if TYPE_CHECKING:
    from choreograph.policy import RetryPolicy

DeadLetterReason = Literal[
    "max_attempts", "max_age", "rejected", "invalid_payload", "malformed", "loop_detected", "internal_error",
    "unhandled",
]


def original_envelope(body: bytes) -> Any:
    """The original envelope for a record: the JSON object if it parses, else the text."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace")


def internal_error_retry(policy: RetryPolicy, attempt: int, rng: random.Random) -> float | None:
    """After an internal error (preparing a delivery raised where nothing should, so there
    is no failure history to age): seconds before the next attempt under ``policy``, or
    ``None`` once its attempts are spent - then dead-letter ``internal_error``, so that a
    message that always trips it is not redelivered for ever."""
    return policy.backoff(attempt, rng) if attempt < policy.max_attempts else None


#: An event of a type the consumer that received it does not handle reached its group:
#: another version, running beside it during a rolling deploy, bound the group to that type
#: (a group's binding only widens, see :class:`~choreograph.transports.Transport`). It goes
#: back for a replica that handles it, after 1 s, 2 s, ... up to 30 s between tries, for
#: HANDOVER_ATTEMPTS deliveries (about ten minutes); then it is dead-lettered ``unhandled``.
#: The worker (``_Runner._unsubscribed``) and the push ambassador both follow this rule.
HANDOVER_ATTEMPTS = 25
HANDOVER_MAX_DELAY = 30.0


def handover_delay(attempt: int) -> float | None:
    """Seconds before the ``attempt``-th delivery of a type its consumer does not handle comes
    back, or ``None`` once HANDOVER_ATTEMPTS deliveries are spent: then dead-letter it
    ``unhandled`` (no failure event, no inbox mark)."""
    return min(HANDOVER_MAX_DELAY, 2.0 ** (attempt - 1)) if attempt < HANDOVER_ATTEMPTS else None


def handover_warning(group: str, event_type: str, consumer: str) -> str:
    """The warning logged once per type when ``consumer`` (``"this version of 'svc'"``, ...)
    first hands an event of ``event_type`` back."""
    return (f"group {group} is bound to {event_type}, which {consumer} does not handle: handing such events "
            f"back for a replica that does (a rolling deploy?); after {HANDOVER_ATTEMPTS} deliveries they are "
            f"dead-lettered 'unhandled'. If no version handles it any more: "
            f"choreograph groups unbind {group} {event_type}")


def unhandled_error(group: str, event_type: str, attempts: int, consumer: str, types: Collection[str]) -> ErrorInfo:
    """The last error of an ``unhandled`` dead letter: nobody in ``group`` took it in ``attempts`` deliveries."""
    return ErrorInfo("Unhandled", f"no replica of group {group!r} handled type {event_type!r} in {attempts} "
                                  f"deliveries; {consumer} subscribes to {sorted(types)}")


def to_message(envelope: Envelope) -> Message:
    return Message(envelope.id, envelope.type, encode(envelope))


def output_envelope(
    event: Event,
    *,
    cause: Envelope,
    service: str,
    handler: str,
    index: int | str,
    source: str,
    subject: str | None = None,
    time: float | None = None,
) -> Envelope:
    """The envelope of output ``index`` of ``handler`` caused by ``cause``: same correlation,
    causation = the input, hops + 1, and an id derived from (input, service, handler, index).
    ``time``: when it was emitted (epoch seconds on the worker's clock; by default the current time)."""
    cls = type(event)
    return Envelope(
        id=derive_id(cause.id, service, handler, index),
        source=source,
        type=cls.event_type(),
        data=orjson.Fragment(event_json(event)),
        time=now_rfc3339() if time is None else rfc3339(time),
        subject=subject,
        dataschema=cls.schema_uri(),
        correlationid=cause.correlationid or cause.id,
        causationid=cause.id,
        traceparent=cause.traceparent,
        tracestate=cause.tracestate,
        hops=cause.hops + 1,
        partitionkey=cause.partitionkey,
        deadline=cause.deadline,
    )


def output_message(event: Event, cause: Envelope, id_suffix: bytes, source: str, subject: str | None = None,
                   time: float | None = None) -> Message:
    """``to_message(output_envelope(event, cause=cause, service=S, handler=H, index=I, source=source,
    subject=subject, time=time))`` without the intermediate envelope: the same bytes, given
    ``id_suffix = _envelope.id_suffix(S, H, I)``.

    This is the worker's hot path (once per emitted event), hence the dict written out by hand
    and the arguments by position. Raises :class:`~choreograph.EmitError` for an event whose
    JSON does not read back as a valid instance of its model (a float inf or nan, published as
    null: see :func:`~choreograph._event_wire.check_published`), or holds an integer outside the 64-bit
    range or a UTC offset with seconds (:func:`~choreograph._event_wire.check_wire`).

    Nothing here is checked against the CloudEvents String rules (:func:`~choreograph._envelope.string_problem`),
    and it need not be: the id is a derived UUID, the type and dataschema were checked when the Event class
    was defined, ``source`` when the Service was made, a ``subject`` by ``Context.publish``. What the output
    inherits from ``cause`` (correlation and causation ids, trace context, partition key, deadline) is
    carried as is: the producer's, not ours to change or refuse, as decode does not.
    """
    cls = type(event)
    try:
        event_type, dataschema, checks, aliases = _EMITTED[cls]
    except KeyError:
        event_type, dataschema, checks, aliases = _emitted(cls)
    event_id = derive_id_with(cause.id, id_suffix)
    out: dict[str, Any] = {
        "specversion": SPECVERSION, "id": event_id, "source": source, "type": event_type,
        "time": now_rfc3339() if time is None else rfc3339(time),
    }
    if subject is not None:
        out["subject"] = subject
    out["datacontenttype"] = DEFAULT_CONTENT_TYPE
    out["dataschema"] = dataschema
    out["correlationid"] = cause.correlationid or cause.id
    out["causationid"] = cause.id
    if cause.traceparent is not None:
        out["traceparent"] = cause.traceparent
    if cause.tracestate is not None:
        out["tracestate"] = cause.tracestate
    if cause.partitionkey is not None:
        out["partitionkey"] = cause.partitionkey
    if cause.deadline is not None:
        out["deadline"] = cause.deadline
    out["hops"] = cause.hops + 1
    data = event.__pydantic_serializer__.to_json(event, by_alias=aliases)
    if data.find(b"null") != -1:  # event_json's check, inline: a float inf or nan would be published as null
        check_published(event, data)
    if checks:  # and check_wire's, its common case in place: top-level int fields in the 64-bit range
        values = event.__dict__
        try:
            for name in checks:
                if not I64_MIN <= (values[name] or 0) <= U64_MAX:  # or 0: an int | None field's None
                    check_wire(event, data)
        except (TypeError, KeyError):  # not an int, or not set (model_construct): check_wire looks
            check_wire(event, data)
    elif checks is None:
        check_wire(event, data)
    out["data"] = orjson.Fragment(data)
    return _new_message(Message, (event_id, event_type, orjson.dumps(out)))


_new_message = tuple.__new__  # Message is a named tuple: built without its Python-level __new__

#: Per event class, what the emitters read of it for every event: its type, its dataschema (a
#: class may override ``schema_uri()``) and its ``__wire_checks__``. Reading them off the class
#: each time cost more than the checks (a pydantic model class's attributes go through its
#: metaclass's ``__getattr__`` hook: about 1,000 instructions each, 2,400 for ``schema_uri()``).
_EMITTED: dict[type[Event], tuple[str, str, tuple[str, ...] | None, bool]] = {}


def _emitted(cls: type[Event]) -> tuple[str, str, tuple[str, ...] | None, bool]:
    found = _EMITTED[cls] = (cls.__event_type__, cls.schema_uri(), cls.__wire_checks__, by_alias(cls))
    return found


def first_envelope(
    event: Event,
    *,
    source: str,
    id: str,
    correlation_id: str | None = None,
    subject: str | None = None,
    deadline: str | None = None,
    traceparent: str | None = None,
    time: float | None = None,
) -> Envelope:
    """The envelope of an event published from outside a handler (ingress), stamped ``time``
    (epoch seconds; by default the current time); :class:`~choreograph.EmitError`
    for an event whose JSON would not read back as valid (see :func:`~choreograph.events.event_json`),
    :class:`ValueError` naming the attribute for a ``correlation_id``, ``subject``, ``deadline`` or
    ``traceparent`` that is not a string or holds what a CloudEvents String must not
    (:func:`~choreograph._envelope.string_problem`). ``source`` and ``id`` are the caller's to check,
    once: ``Publisher``, ``Service`` and ``Gateway`` check their source when they are made; an id is
    :func:`~choreograph._envelope.new_id`'s (hex), a gateway's ``ce-id`` (checked against a pattern),
    or one of ``Publisher.publish``'s ``ids`` (checked there): a bare new id, the common case, costs
    nothing here."""
    if correlation_id is not None or subject is not None or deadline is not None or traceparent is not None:
        for name, value in (("correlation_id", correlation_id), ("subject", subject), ("deadline", deadline),
                            ("traceparent", traceparent)):
            if value is not None and (type(value) is not str or string_problem(value) is not None):
                raise ValueError(attribute_problem(name, value))
    cls = type(event)
    try:
        event_type, dataschema, checks, aliases = _EMITTED[cls]
    except KeyError:
        event_type, dataschema, checks, aliases = _emitted(cls)
    data = event.__pydantic_serializer__.to_json(event, by_alias=aliases)
    if data.find(b"null") != -1:  # event_json's checks, inline (once per event published from outside)
        check_published(event, data)
    if checks:  # as in output_message
        values = event.__dict__
        try:
            for name in checks:
                if not I64_MIN <= (values[name] or 0) <= U64_MAX:
                    check_wire(event, data)
        except (TypeError, KeyError):
            check_wire(event, data)
    elif checks is None:
        check_wire(event, data)
    return Envelope(
        id=id,
        source=source,
        type=event_type,
        data=orjson.Fragment(data),
        time=now_rfc3339() if time is None else rfc3339(time),
        subject=subject,
        dataschema=dataschema,
        correlationid=correlation_id or id,
        traceparent=traceparent,
        deadline=deadline,
    )


def dead_letter_record(
    *,
    reason: DeadLetterReason,
    service: str,
    handler: str | None,
    group: str,
    attempts: int,
    first_error: ErrorInfo | None,
    last_error: ErrorInfo | None,
    first_attempt_at: float | None,
    last_attempt_at: float,
    envelope: Any,
    compensation: bool = False,
) -> dict[str, Any]:
    """The record kept with a dead letter (DESIGN.md §5). ``envelope`` is the original, untouched.

    ``compensation``: the handler that gave up is a compensation
    (:func:`~choreograph.sagas.is_rollback`); the record then says ``"compensation": true``,
    which the journal reads to mark the transaction ``compensation_failed``."""
    mark = {"compensation": True} if compensation else {}
    return {
        "reason": reason,
        "service": service,
        "handler": handler,
        "group": group,
        "attempts": attempts,
        "first_error": first_error.to_dict() if first_error else None,
        "last_error": last_error.to_dict() if last_error else None,
        "first_attempt_at": first_attempt_at if first_attempt_at is not None else last_attempt_at,
        "last_attempt_at": last_attempt_at,
        **mark,
        "envelope": envelope,
    }


def failure_envelope(cause: Envelope, record: dict[str, Any], *, service: str, handler: str, source: str,
                     time: float | None = None) -> Envelope:
    """The ``choreograph.failed`` event announcing that ``service`` gave up on ``cause``, stamped
    ``time`` (epoch seconds; by default the current time).

    Its subject and ``failedtype`` are ``cause``'s type, and its correlation, trace context,
    partition key and deadline ``cause``'s: inherited, carried as is (see :func:`output_message`)."""
    from choreograph.service import FAILED

    return Envelope(
        id=derive_id(cause.id, service, handler, "failed"),
        source=source,
        type=FAILED,
        data={"type": cause.type, "envelope": record["envelope"], "record": {k: v for k, v in record.items() if k != "envelope"}},
        time=now_rfc3339() if time is None else rfc3339(time),
        subject=cause.type,
        correlationid=cause.correlationid or cause.id,
        causationid=cause.id,
        traceparent=cause.traceparent,
        tracestate=cause.tracestate,
        hops=cause.hops + 1,
        partitionkey=cause.partitionkey,
        deadline=cause.deadline,
        extensions={"failedtype": cause.type},
    )
