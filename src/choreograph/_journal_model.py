"""What the journal keeps: one entry per event, one summary per transaction, and how a status is derived.

This module is pure data and pure functions, shared by every journal store (memory,
SQLite, PostgreSQL): a store persists entries and summaries, it never decides a status.

Statuses (``Status``), for the events of one correlation id:

* ``compensation_failed`` -- a compensation gave up: it was retried to exhaustion (or
  rejected) and dead-lettered, and the runtime announced it with a ``choreograph.failed``
  event (see :attr:`JournalEntry.compensation_failure` for how the journal tells one). The
  rollback did not finish and nothing will finish it: some step stays half undone and needs
  a person (replay the dead letter, or repair by hand). It takes precedence over every other
  status, terminal events included (a ``failed`` or even a ``completed`` end does not undo
  what the compensation left behind). Final: no deadline, no ``choreograph.timedout``. The
  compensations are the flow's: ``on_failure`` handlers, ``compensate(...)`` handlers and
  handlers of ``choreograph.timedout``; an ordinary handler that undoes something and gives
  up is a failure like any other.
  *Until the compensation runs after all*: a give-up whose handler's first output on the same
  event is recorded (its id, :attr:`JournalEntry.recovery_id`, is derived from that event, the
  service and the handler: no other handler or event makes it) no longer counts. That is what
  replaying the dead letter once the cause is fixed does; the give-up stays in the timeline and
  among the failures, and nothing else about it counts any more: neither
  ``compensation_failed`` nor, for a give-up nobody compensates, ``failed``. A compensation
  that emits nothing leaves nothing on the bus to tell its replay by: its transaction stays
  ``compensation_failed``.
* ``completed``   -- a terminal ``completed`` event was recorded.
* ``compensated`` -- a terminal ``failed`` event was recorded, and the transaction also
  contains a runtime failure (``choreograph.failed``) or a ``choreograph.timedout``:
  something broke and the services rolled back to a declared failed end.
* ``failed``      -- a terminal ``failed`` event with no runtime failure or timeout in the
  transaction (a business "no", e.g. payment declined), *or* no terminal event yet but a
  runtime failure of an event type that no service compensates (no ``on_failure``
  handler): nothing will ever end it.
* ``stuck``       -- none of the above and the deadline has passed (the envelope's
  ``deadline`` extension, else ``stuck_after`` seconds after the journal first saw the
  transaction). Not final: a late terminal event still moves it on.
* ``running``     -- none of the above.

Apart from ``compensation_failed``, the first terminal event recorded decides between
completed and failed/compensated;
later terminal events are kept in the timeline but do not change the status. The
definitions do not depend on the order in which the journal receives events (a failure
recorded after the terminal event still makes it ``compensated``, a compensation's failure
recorded after it ``compensation_failed``, the replayed compensation's output recorded before
its give-up still clears it), because brokers do not order events across services.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from typing import Any, Literal

Status = Literal["running", "completed", "failed", "compensated", "compensation_failed", "stuck"]
STATUSES: tuple[Status, ...] = ("running", "completed", "failed", "compensated", "compensation_failed", "stuck")

JOURNAL_GROUP = "choreograph.journal"
"""The journal's consumer group (wildcard: every type)."""
DEFAULT_STUCK_AFTER = 300.0
"""Seconds from first sight to ``stuck`` for a transaction without a deadline."""
DEFAULT_JOURNAL = "sqlite:///./var/journal.db"
"""The journal store of a journal (and of ``choreograph trace``) that is not given one.
These constants live here, beside the model, so the command line reads them without
importing the journal itself."""

BaseStatus = Literal["running", "completed", "failed", "compensated", "compensation_failed"]
"""What a store persists; ``stuck`` is ``running`` past the deadline, derived at query time."""

FAILED = "choreograph.failed"
"""The runtime's failure event type (:data:`choreograph.service.FAILED`, repeated here so the
command line reads the model without importing the services). A failure whose failed type is
this one is a compensation (an ``on_failure`` handler) that gave up."""
TIMEDOUT = "choreograph.timedout"
"""The type of the event the journal publishes when a transaction passes its deadline. A
failure whose failed type is this one is a handler of the timeout (a compensation) that gave up."""
COMPENSATION_MARK = "compensation"
"""The key a worker sets to ``true`` in the record of a compensation that gave up
(:func:`choreograph.sagas.is_rollback`): what tells the journal a ``compensate(...)`` handler
gave up when the event it gave up on was its own step or a business trigger."""

EntryKind = Literal["event", "completed", "failed", "failure", "timedout"]
"""``event`` an ordinary event; ``completed``/``failed`` a terminal event of that kind;
``failure`` a ``choreograph.failed`` event; ``timedout`` a ``choreograph.timedout`` event."""


def parse_time(value: str | None) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp (``z`` for ``Z`` too), or ``None`` if absent, unparseable, or outside
    what :func:`format_time` can write back (``0001-01-01T00:00:00+01:00`` is in year 0 in UTC:
    as a deadline it would stop every ``choreograph.timedout`` of the scan that met it)."""
    if not value:
        return None
    if value[-1] == "z":  # RFC 3339's lowercase UTC designator, which fromisoformat refuses (3.11)
        value = value[:-1] + "Z"
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        epoch = parsed.timestamp()
        datetime.fromtimestamp(epoch, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return epoch


def service_of(source: str) -> str:
    """A readable service name from a CloudEvents source (``/choreograph/payment`` -> ``payment``):
    what the journal records as the service of an event."""
    if source.startswith("/choreograph/"):
        return source[len("/choreograph/"):] or source
    if source.startswith("/") and len(source) > 1:
        return source[1:]
    return source


def format_time(epoch: float) -> str:
    """RFC 3339 UTC text of epoch seconds (microsecond precision, ``Z`` suffix)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True, slots=True)
class JournalEntry:
    """One recorded event of a transaction (a line of its timeline).

    ``at`` is the event's own time (its envelope ``time``; the recording time if it has
    none); ``recorded_at`` is when the journal recorded it, on the journal's clock.
    ``attempt`` is the handler attempt that produced it when known (for a failure: the
    attempts made before giving up). ``compensable`` says, for a failure, whether some
    service compensates failures of ``failed_type``. ``record`` is a failure's
    dead-letter record (without the original envelope, which is its own entry).
    ``traceparent``/``tracestate`` are the event's W3C trace context, if it carried one.
    """

    event_id: str
    correlation_id: str
    type: str
    source: str
    service: str
    kind: EntryKind
    at: float
    recorded_at: float
    causation_id: str | None = None
    time: str | None = None
    attempt: int | None = None
    deadline: float | None = None
    failed_type: str | None = None
    compensable: bool = True
    record: dict[str, Any] | None = None
    traceparent: str | None = None
    tracestate: str | None = None

    @property
    def compensation_failure(self) -> bool:
        """Whether this is a compensation that gave up: a failure whose record is marked
        ``compensation`` (the worker marks every compensation's), or of a ``choreograph.failed``
        or ``choreograph.timedout`` event (only compensations handle those; this also tells
        failures announced by a worker from before the mark, or by a push subscriber).

        The failed type alone cannot tell a ``compensate(...)`` handler: it gives up on
        whichever event completed its join, its own step or a business trigger as often as a
        failure or a timeout, depending on the order they arrived in.
        """
        if self.kind != "failure":
            return False
        return self.failed_type in (FAILED, TIMEDOUT) or (self.record or {}).get(COMPENSATION_MARK) is True

    @property
    def recovery_id(self) -> str | None:
        """For a compensation that gave up: the id its handler's first output on the same event
        has (``derive_id(event, service, handler, 0)``, as the worker derives it), which only a
        successful run of that handler on that event publishes, so seeing it means the
        compensation ran after all (its dead letter replayed). ``None`` for any other entry, and
        for a give-up whose record names no handler."""
        if not self.compensation_failure or self.causation_id is None:
            return None
        record = self.record or {}
        service, handler = record.get("service"), record.get("handler")
        if not (isinstance(service, str) and isinstance(handler, str)):
            return None
        from choreograph._envelope import derive_id  # msgspec and orjson: not for every reader of the model

        return derive_id(self.causation_id, service, handler, 0)

    @property
    def outcome(self) -> str:
        """A short word for the timeline: ``ok``, ``completed``, ``failed``, ``timed out``, ``gave up: REASON``."""
        if self.kind == "failure":
            reason = (self.record or {}).get("reason") or "unknown"
            return f"gave up: {reason}"
        if self.kind == "timedout":
            return "timed out"
        if self.kind in ("completed", "failed"):
            return self.kind
        return "ok"

    @property
    def error(self) -> str | None:
        """``Type: message`` of a failure's last error."""
        last = (self.record or {}).get("last_error")
        if isinstance(last, dict):
            return f"{last.get('type', '')}: {last.get('message', '')}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "service": self.service,
            "source": self.source,
            "causation_id": self.causation_id,
            "time": self.time or format_time(self.at),
            "recorded_at": format_time(self.recorded_at),
            "attempt": self.attempt,
            "kind": self.kind,
            "outcome": self.outcome,
            "error": self.error,
            "failed_type": self.failed_type,
            "record": self.record,
            "traceparent": self.traceparent,
            "tracestate": self.tracestate,
        }


@dataclasses.dataclass(slots=True)
class TransactionSummary:
    """The running totals of one transaction, updated by :meth:`fold` as entries arrive."""

    correlation_id: str
    first_seen: float
    last_seen: float
    started_at: float
    deadline: float
    deadline_explicit: bool = False
    root_type: str | None = None
    event_count: int = 0
    terminal_type: str | None = None
    terminal_kind: Literal["completed", "failed"] | None = None
    failures: int = 0
    uncompensated: int = 0
    timed_out: bool = False
    compensation_failures: int = 0

    @classmethod
    def first(cls, entry: JournalEntry, stuck_after: float) -> TransactionSummary:
        summary = cls(
            correlation_id=entry.correlation_id,
            first_seen=entry.recorded_at,
            last_seen=entry.recorded_at,
            started_at=entry.at,
            deadline=entry.recorded_at + stuck_after,
        )
        summary.fold(entry)
        return summary

    def fold(self, entry: JournalEntry) -> None:
        """Account for one new entry (never called twice for the same event id)."""
        self.event_count += 1
        self.last_seen = max(self.last_seen, entry.recorded_at)
        if self.root_type is None or (
            entry.causation_id is None and (entry.event_id == entry.correlation_id or entry.at < self.started_at)
        ):
            # The event that started it: no cause, and its id is the correlation id or it is the
            # earliest yet (an uncaused event published into a running transaction, e.g. a
            # courier's scan, is not its start); until it is recorded, the first seen.
            self.root_type = entry.type
        self.started_at = min(self.started_at, entry.at)
        if entry.deadline is not None:
            self.deadline = min(self.deadline, entry.deadline) if self.deadline_explicit else entry.deadline
            self.deadline_explicit = True
        if entry.kind in ("completed", "failed") and self.terminal_kind is None:
            self.terminal_kind = entry.kind
            self.terminal_type = entry.type
        elif entry.kind == "failure":
            self.failures += 1
            if not entry.compensable:
                self.uncompensated += 1
            if entry.compensation_failure:
                self.compensation_failures += 1
        elif entry.kind == "timedout":
            self.timed_out = True

    def recover(self, failure: JournalEntry) -> None:
        """Account for the recorded output of a compensation that gave up (``failure``, folded
        already): it ran after all, so its give-up no longer leaves the transaction
        ``compensation_failed``, nor ``failed`` as a failure nobody compensates. It stays a failure
        (:attr:`failures`): something broke. Called once per give-up, by whichever of the two
        entries is recorded second."""
        self.compensation_failures = max(0, self.compensation_failures - 1)
        if not failure.compensable:
            self.uncompensated = max(0, self.uncompensated - 1)

    @property
    def base_status(self) -> BaseStatus:
        """The status without the clock (what stores persist and filter on)."""
        if self.compensation_failures:
            return "compensation_failed"
        if self.terminal_kind == "completed":
            return "completed"
        if self.terminal_kind == "failed":
            return "compensated" if self.failures or self.timed_out else "failed"
        if self.uncompensated:
            return "failed"
        return "running"

    def status(self, now: float) -> Status:
        """The status at epoch time ``now`` (``stuck`` once a running transaction passes its deadline)."""
        base = self.base_status
        if base == "running" and now >= self.deadline:
            return "stuck"
        return base

    def to_dict(self, status: Status) -> dict[str, Any]:
        return {
            "correlation_id": self.correlation_id,
            "status": status,
            "root_type": self.root_type,
            "started_at": format_time(self.started_at),
            "first_seen": format_time(self.first_seen),
            "last_seen": format_time(self.last_seen),
            "deadline": format_time(self.deadline) if math.isfinite(self.deadline) else None,
            "terminal_type": self.terminal_type,
            "event_count": self.event_count,
            "failures": self.failures,
            "compensation_failures": self.compensation_failures,
            "timed_out": self.timed_out,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Transaction:
    """A transaction as queried: its status at query time and its ordered timeline (``None`` in listings)."""

    summary: TransactionSummary
    status: Status
    timeline: list[JournalEntry] | None

    @property
    def correlation_id(self) -> str:
        return self.summary.correlation_id

    def to_dict(self) -> dict[str, Any]:
        out = self.summary.to_dict(self.status)
        if self.timeline is None:
            return out
        start = self.summary.started_at
        out["timeline"] = [
            {**entry.to_dict(), "offset_ms": round((entry.at - start) * 1000, 3)} for entry in self.timeline
        ]
        return out
