"""What ``choreograph watch`` shows: the flow's live traffic and its transactions, from the journal store.

:func:`read_snapshot` asks the store three things (:meth:`~choreograph._journal_store.JournalStore.activity`,
the newest and the stuck or failed transactions, and the last entry of each shown) and
:func:`build_snapshot` -- pure, no I/O, no clock -- turns the answers into a :class:`Snapshot`.
The CLI only renders snapshots, so everything a user sees is testable without a terminal::

    >>> store = open_journal_store("sqlite:///./var/journal.db")          # doctest: +SKIP
    >>> await store.open()                                                # doctest: +SKIP
    >>> snap = await read_snapshot(store, now=time.time(), window=60, graph=build(app))  # doctest: +SKIP
    >>> [(e.service, e.type, e.count) for e in snap.edges]                # doctest: +SKIP

An edge is a service publishing an event type (the journal's ``service`` of an entry: the
envelope's source, or for ``choreograph.failed`` the service that gave up; with a flow graph,
a service publishing under a source of its own, ``Service(source=...)``, by its name). With a flow
graph the snapshot also lists the graph's ``emits`` edges and ingress types that saw no
traffic in the window (``idle``), and flags traffic the graph does not draw
(``declared=False``). Reading only the journal store, it never touches the bus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from choreograph._journal_model import (
    STATUSES,
    EntryKind,
    JournalEntry,
    Status,
    TransactionSummary,
    format_time,
    service_of,
)
from choreograph._journal_store import Activity, JournalStore
from choreograph._redact import redact
from choreograph.errors import ConfigurationError
from choreograph.flow import RUNTIME_PREFIX, FlowGraph

__all__ = ["ATTENTION", "EdgeTraffic", "Snapshot", "TransactionRow", "build_snapshot", "read_snapshot"]

ATTENTION: tuple[Status, ...] = ("stuck", "compensation_failed", "failed")
"""Statuses that need a person: nothing will end these transactions by itself (a
``compensation_failed`` one has a step left half undone), in the order they are listed."""

Terminal = Literal["completed", "failed"]


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeTraffic:
    """A service publishing an event type, and how much it did in the window.

    ``service`` is ``None`` for an ingress type nobody published in the window (anyone
    outside the flow may). ``declared`` is ``True`` when the flow graph draws the edge
    (or the type is ingress), ``False`` for traffic it does not draw, ``None`` without a
    graph or for choreograph's own events (``choreograph.failed``, ``choreograph.timedout``).
    """

    service: str | None
    type: str
    kind: EntryKind
    count: int
    rate: float
    last_at: float | None
    terminal: Terminal | None = None
    failed_type: str | None = None
    declared: bool | None = None

    @property
    def idle(self) -> bool:
        """An edge of the flow graph that saw no traffic in the window."""
        return self.count == 0 and bool(self.declared)

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "type": self.type,
            "kind": self.kind,
            "count": self.count,
            "rate": self.rate,
            "last_at": format_time(self.last_at) if self.last_at is not None else None,
            "terminal": self.terminal,
            "failed_type": self.failed_type,
            "declared": self.declared,
            "idle": self.idle,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class TransactionRow:
    """One transaction as the watch lists it: status at the snapshot's time, and its last recorded event."""

    correlation_id: str
    status: Status
    root_type: str | None
    age: float  # seconds since the journal first saw it
    idle_for: float  # seconds since the journal last recorded one of its events
    event_count: int
    failures: int
    last_type: str | None
    last_service: str | None
    last_kind: EntryKind | None

    @property
    def attention(self) -> bool:
        return self.status in ATTENTION

    def to_dict(self) -> dict[str, Any]:
        return {
            "correlation_id": self.correlation_id,
            "status": self.status,
            "root_type": self.root_type,
            "age_s": round(self.age, 3),
            "idle_s": round(self.idle_for, 3),
            "event_count": self.event_count,
            "failures": self.failures,
            "last_type": self.last_type,
            "last_service": self.last_service,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one refresh of ``choreograph watch`` shows.

    ``statuses`` counts every transaction the journal knows (all five statuses, zeros
    included); ``edges`` counts only entries recorded in the last ``window`` seconds;
    ``newest`` are the most recently started transactions, ``attention`` the stuck ones
    then the failed ones, each most recently started first.
    """

    journal: str
    app: str | None
    now: float
    window: float
    statuses: dict[Status, int]
    edges: list[EdgeTraffic]
    newest: list[TransactionRow]
    attention: list[TransactionRow]

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def events_in_window(self) -> int:
        return sum(edge.count for edge in self.edges)

    def to_dict(self) -> dict[str, Any]:
        return {
            "journal": self.journal,
            "app": self.app,
            "at": format_time(self.now),
            "window_s": self.window,
            "transactions": self.total,
            "statuses": dict(self.statuses),
            "events_in_window": self.events_in_window,
            "edges": [edge.to_dict() for edge in self.edges],
            "newest": [row.to_dict() for row in self.newest],
            "attention": [row.to_dict() for row in self.attention],
        }


def _declared(graph: FlowGraph | None, emits: set[tuple[str, str]], service: str, type_: str) -> bool | None:
    if graph is None or type_.startswith(RUNTIME_PREFIX):
        return None
    node = graph.events.get(type_)
    return (node is not None and node.ingress) or (service, type_) in emits


def _terminal(graph: FlowGraph | None, type_: str, kind: EntryKind) -> Terminal | None:
    node = graph.events.get(type_) if graph is not None else None
    if node is not None:
        return node.terminal
    return kind if kind in ("completed", "failed") else None


def _service_names(graph: FlowGraph | None) -> dict[str, str]:
    """The graph's name of each service the journal knows by another: the journal names a publisher
    after its CloudEvents source, which ``Service(source=...)`` may set to anything."""
    if graph is None:
        return {}
    return {service_of(source): name for name, source in graph.sources.items() if service_of(source) != name}


def _row(
    summary: TransactionSummary, now: float, last: JournalEntry | None, names: Mapping[str, str]
) -> TransactionRow:
    return TransactionRow(
        correlation_id=summary.correlation_id,
        status=summary.status(now),
        root_type=summary.root_type,
        age=max(0.0, now - summary.first_seen),  # the journal's clock, as idle_for and deadlines
        idle_for=max(0.0, now - summary.last_seen),
        event_count=summary.event_count,
        failures=summary.failures,
        last_type=last.type if last else None,
        last_service=names.get(last.service, last.service) if last else None,
        last_kind=last.kind if last else None,
    )


def build_snapshot(
    activity: Activity,
    newest: Sequence[TransactionSummary],
    attention: Sequence[TransactionSummary],
    last: Mapping[str, JournalEntry],
    *,
    journal: str,
    now: float,
    window: float,
    graph: FlowGraph | None = None,
) -> Snapshot:
    """The snapshot from what the store answered (pure: same answers, same snapshot).

    ``last`` maps correlation ids to their last recorded entry; ``attention`` may hold
    transactions of any status: the stuck ones are kept first, then the failed ones, each
    newest first.
    """
    emits = {
        (edge.source.removeprefix("service:"), edge.target.removeprefix("event:"))
        for edge in (graph.edges if graph is not None else [])
        if edge.kind == "emits"
    }
    names = _service_names(graph)
    edges: dict[tuple[str | None, str, str | None], EdgeTraffic] = {}
    for count in activity.edges:
        service = names.get(count.service, count.service)
        key = (service, count.type, count.failed_type)
        seen = edges.get(key)  # the same edge under another kind: the journal's terminal map changed
        total, last_at = count.count, count.last_at
        if seen is not None:
            total, last_at = total + seen.count, max(last_at, seen.last_at or last_at)
        edges[key] = EdgeTraffic(
            service=service, type=count.type, kind=count.kind, count=total, rate=total / window,
            last_at=last_at, terminal=_terminal(graph, count.type, count.kind), failed_type=count.failed_type,
            declared=_declared(graph, emits, service, count.type),
        )
    if graph is not None:
        busy = {(service, type_) for service, type_, _ in edges}
        for service, type_ in sorted(emits - busy):
            edges[(service, type_, None)] = EdgeTraffic(
                service=service, type=type_, kind="event", count=0, rate=0.0, last_at=None,
                terminal=_terminal(graph, type_, "event"), declared=True,
            )
        published = {k[1] for k in edges if k[0] is not None}
        for node in graph.events.values():
            if node.ingress and node.type not in published:
                edges[(None, node.type, None)] = EdgeTraffic(
                    service=None, type=node.type, kind="event", count=0, rate=0.0, last_at=None,
                    terminal=node.terminal, declared=True,
                )
    ordered = sorted(edges.values(), key=lambda e: (e.service is not None, e.service or "", e.type, e.failed_type or ""))
    return Snapshot(
        journal=journal,
        app=graph.name if graph is not None else None,
        now=now,
        window=window,
        statuses={status: activity.statuses.get(status, 0) for status in STATUSES},
        edges=ordered,
        newest=[_row(s, now, last.get(s.correlation_id), names) for s in newest],
        attention=_attention([_row(s, now, last.get(s.correlation_id), names) for s in _newest_first(attention)]),
    )


def _attention(rows: list[TransactionRow]) -> list[TransactionRow]:
    """Stuck ones first (someone may still end them), then those whose compensation gave up, then
    failed, each newest first."""
    return sorted((row for row in rows if row.attention), key=lambda row: ATTENTION.index(row.status))


def _newest_first(summaries: Sequence[TransactionSummary]) -> list[TransactionSummary]:
    unique = {s.correlation_id: s for s in summaries}
    return sorted(unique.values(), key=lambda s: (s.started_at, s.first_seen), reverse=True)


async def read_snapshot(
    store: JournalStore, *, now: float, window: float, graph: FlowGraph | None = None, limit: int = 10
) -> Snapshot:
    """Ask an opened journal store what :func:`build_snapshot` needs, at epoch time ``now``.

    ``window`` (seconds, > 0) is how far back edges are counted; ``limit`` caps both
    transaction lists. Costs one :meth:`~JournalStore.activity` call, up to three listings
    and one :meth:`~JournalStore.last_entry` per listed transaction.
    """
    if window <= 0 or limit < 1:
        raise ConfigurationError("read_snapshot: window must be > 0 seconds and limit >= 1")
    activity = await store.activity(since=now - window, now=now)
    newest = await store.summaries(status=None, now=now, limit=limit)
    flagged: list[TransactionSummary] = []
    for status in ATTENTION:  # stuck ones first, the others in the room left
        room = limit - len(flagged)
        if room and activity.statuses.get(status, 0):
            flagged.extend(await store.summaries(status=status, now=now, limit=room))
    last: dict[str, JournalEntry] = {}
    for summary in [*newest, *flagged]:
        cid = summary.correlation_id
        if cid not in last:
            found = await store.last_entry(cid)  # not its timeline: a long one was read whole every refresh
            if found is not None:
                last[cid] = found
    return build_snapshot(
        activity, newest, flagged, last, journal=redact(store.url), now=now, window=window, graph=graph
    )
