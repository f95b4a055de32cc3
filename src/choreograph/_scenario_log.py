"""What a scenario saw on the bus: every event once, who emitted it, and the listing a failed
expectation shows.

Attribution needs no hook in the runtime. An event's ``source`` names its service, and a
service has one handler per event type (and one per failed type), so the type of the
event's cause (its ``causationid``) names the handler that emitted it. That handler is a
compensation when it belongs to a ``@service.compensate`` join, whose first slot is the
step it undoes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from choreograph._envelope import Envelope, decode
from choreograph.errors import MalformedEnvelope
from choreograph.events import Event
from choreograph.joins import JoinDeadline, JoinSpec, Route
from choreograph.sagas import TimedOut, is_compensation
from choreograph.service import FAILED, Handler, Service
from choreograph.transports.base import DeadLetter

#: What an expectation names: an event class, or ``failed(X)`` / ``timed_out()`` from :mod:`choreograph.sagas`.
Expected = type[Event] | Route


@dataclasses.dataclass(frozen=True, slots=True)
class Emitted:
    """One event published during a scenario, in publish order.

    ``at`` is virtual seconds since the scenario began. ``service`` and ``handler`` name
    what emitted it (for a runtime failure event: the handler that gave up); both are
    ``None`` for an event given by the test or published by the journal. ``undoes`` is
    the step a compensation undid, for the events a compensation emitted (not for the
    failure event of a compensation that gave up: it undid nothing).
    """

    envelope: Envelope
    at: float
    service: str | None = None
    handler: str | None = None
    undoes: type[Event] | None = None

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlationid or self.envelope.id


def failed_type(envelope: Envelope) -> str | None:
    """The type of the event a ``choreograph.failed`` envelope announces."""
    data = envelope.data if isinstance(envelope.data, dict) else {}
    found = data.get("type") or envelope.extensions.get("failedtype")
    return found if isinstance(found, str) else None


def failure_record(envelope: Envelope) -> dict[str, Any]:
    data = envelope.data if isinstance(envelope.data, dict) else {}
    record = data.get("record")
    return record if isinstance(record, dict) else {}


def matches(expected: Expected, envelope: Envelope) -> bool:
    """Whether ``envelope`` is an event ``expected`` names."""
    if isinstance(expected, Route):
        if expected.failure:
            return envelope.type == FAILED and failed_type(envelope) == expected.cls.event_type()
        expected = expected.cls
    return envelope.type == expected.event_type()


def missing(expected: Sequence[Expected], envelopes: Sequence[Envelope]) -> list[Expected]:
    """What of ``expected`` has no event of its own among ``envelopes`` (a name listed twice needs two)."""
    pool = list(envelopes)
    absent = []
    for wanted in expected:
        hit = next((i for i, envelope in enumerate(pool) if matches(wanted, envelope)), None)
        if hit is None:
            absent.append(wanted)
        else:
            del pool[hit]
    return absent


def found_in_order(expected: Sequence[Expected], envelopes: Sequence[Envelope]) -> int:
    """How many of ``expected``, from the first, occur among ``envelopes`` in that order."""
    found = 0
    for envelope in envelopes:
        if found < len(expected) and matches(expected[found], envelope):
            found += 1
    return found


def name_of(expected: Expected) -> str:
    return str(expected) if isinstance(expected, Route) else expected.__name__


def names(expected: Sequence[Expected]) -> str:
    return ", ".join(name_of(e) for e in expected)


def correlation_of(letter: DeadLetter) -> str | None:
    """The transaction of a dead letter (``None`` for a message that is not a CloudEvent)."""
    try:
        envelope = decode(letter.message.body)
    except MalformedEnvelope:
        return None
    return envelope.correlationid or envelope.id


def short(event_id: str | None) -> str:
    """The last 8 characters: in a time-ordered id (see ``new_id``) the first ones are the
    time, shared by every event of a transaction."""
    return (event_id or "-")[-8:]


def _handler_name(handler: Handler) -> str:
    return handler.name.rsplit("<locals>.", 1)[-1]  # a handler defined in a function: its own name


class EventLog:
    """Every event a scenario saw (each id once, as inboxes see them), attributed to its emitter."""

    def __init__(self, services: Sequence[Service], *, given_source: str, journal_source: str) -> None:
        self.services = {service.source: service for service in services}
        self.given_source = given_source
        self.journal_source = journal_source
        self.emitted: list[Emitted] = []
        self.by_id: dict[str, Emitted] = {}
        self.correlation_ids: dict[str, None] = {}  # every transaction seen, in order
        #: The failure events of compensations that gave up (event id -> the step they did not undo).
        self.gave_up: dict[str, type[Event]] = {}
        self.classes: dict[str, type[Event]] = {TimedOut.event_type(): TimedOut,
                                                JoinDeadline.event_type(): JoinDeadline}
        for service in services:
            for handler in service.all_handlers():
                self.learn([handler.consumes, *handler.emits])

    def learn(self, classes: Iterable[type[Event]]) -> None:
        """Name events of these classes by class in listings."""
        for cls in classes:
            if cls.event_type() != FAILED:
                self.classes.setdefault(cls.event_type(), cls)

    def add(self, envelope: Envelope, at: float) -> bool:
        """Record ``envelope`` seen ``at`` seconds in; ``False`` for an id seen before (a redelivery or republish)."""
        if envelope.id in self.by_id:
            return False
        service, handler = self._emitter(envelope)
        undoes = None
        if handler is not None and is_compensation(handler):
            assert isinstance(handler.join, JoinSpec)
            step = handler.join.slots[0][0].cls
            if envelope.type == FAILED:  # the runtime's, as the compensation gave up: nothing undone
                self.gave_up[envelope.id] = step
            else:
                undoes = step
        emitted = Emitted(envelope, at, service.name if service else None,
                          _handler_name(handler) if handler else None, undoes)
        self.emitted.append(emitted)
        self.by_id[envelope.id] = emitted
        self.correlation_ids[emitted.correlation_id] = None
        return True

    def _emitter(self, envelope: Envelope) -> tuple[Service | None, Handler | None]:
        service = self.services.get(envelope.source)
        cause = self.by_id.get(envelope.causationid) if envelope.causationid else None
        if service is None or cause is None:
            return service, None
        if cause.type == FAILED:
            return service, service.failure_handlers.get(failed_type(cause.envelope) or "")
        return service, service.handlers.get(cause.type)

    def of(self, scope: Collection[str]) -> list[Emitted]:
        """The events of the transactions in ``scope`` (correlation ids), in publish order."""
        return [e for e in self.emitted if e.correlation_id in scope]

    # -- the listing ----------------------------------------------------------------------

    def label(self, envelope: Envelope) -> str:
        """``StockReserved``, or ``failed(StockReserved): join_timeout`` for a failure event."""
        if envelope.type == FAILED:
            what = failed_type(envelope)
            reason = failure_record(envelope).get("reason")
            return f"failed({self._type_name(what)})" + (f": {reason}" if reason else "")
        return self._type_name(envelope.type)

    def _type_name(self, event_type: str | None) -> str:
        cls = self.classes.get(event_type or "")
        return cls.__name__ if cls is not None else str(event_type)

    def _by(self, emitted: Emitted) -> str:
        source = emitted.envelope.source
        if source == self.given_source:
            return "given"
        if source == self.journal_source:
            return "journal"
        if emitted.service is None:
            return source
        by = emitted.service if emitted.handler is None else f"{emitted.service}.{emitted.handler}"
        return by + (f" (undoes {emitted.undoes.__name__})" if emitted.undoes else "")

    def lines(self, shown: Sequence[Emitted]) -> list[str]:
        """One aligned line per event: time, event, who emitted it, id, and its cause."""
        rows = [(f"+{e.at:.3f}s", self.label(e.envelope), self._by(e)) for e in shown]
        widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
        out = []
        for (at, label, by), emitted in zip(rows, shown, strict=True):
            env = emitted.envelope
            text = f"  {at:>{widths[0]}}  {label:<{widths[1]}}  {by:<{widths[2]}}  id {short(env.id)}"
            if env.causationid:
                cause = self.by_id.get(env.causationid)
                text += f"  <- {short(env.causationid)}" + (f" {self.label(cause.envelope)}" if cause else "")
            out.append(text)
        return out

    def letter_line(self, letter: DeadLetter) -> str:
        record = letter.record
        error = record.get("last_error") or {}
        try:
            what = self.label(decode(letter.message.body))
        except MalformedEnvelope:
            what = letter.message.type or "(malformed)"
        handler = record.get("handler")
        where = f" in {record.get('service')}.{str(handler).rsplit('<locals>.', 1)[-1]}" if handler else ""
        cause = f": {error.get('type')}: {error.get('message')}" if error else ""
        return (f"  {letter.group}: {what} id {short(letter.message.id)}, {record.get('reason')} after "
                f"{record.get('attempts')} attempt(s){where}{cause}")

    def listing(self, scope: Collection[str], letters: Sequence[DeadLetter]) -> str:
        """What was emitted in the transactions of ``scope``, in order, and their dead letters."""
        shown = self.of(scope)
        ids = ", ".join(short(cid) for cid in scope)
        lines = [f"emitted in transaction {ids}, in publish order (time, event, by, id, cause):"]
        lines.extend(self.lines(shown))
        if not shown:
            lines.append("  nothing")
        others = len(self.emitted) - len(shown)
        if others:
            lines.append(f"  ({others} more in other transactions, not shown)")
        lines.append("dead letters:" if letters else "dead letters: none")
        lines.extend(self.letter_line(letter) for letter in letters)
        return "\n".join(lines)
