"""The journal store interface, its in-memory implementation, and URL dispatch.

A store persists :class:`~choreograph._journal_model.JournalEntry` rows and one
:class:`~choreograph._journal_model.TransactionSummary` per correlation id. It decides
nothing: :func:`fold_entries` (pure) turns new entries into updated summaries, and every
implementation calls it inside one transaction so concurrent journals cannot lose an
update. A PostgreSQL store implements the same methods (``SELECT ... FOR UPDATE``
around :func:`fold_entries`).

=============================  ======================================================
``memory://``                  in-process (tests)
``sqlite:///var/journal.db``   a SQLite file (WAL): one journal writer, many readers
``postgresql://...``           PostgreSQL (``choreograph._journal_postgres``)
=============================  ======================================================
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
from collections.abc import Collection, Mapping, Sequence

from choreograph._journal_model import STATUSES, EntryKind, JournalEntry, Status, TransactionSummary
from choreograph._schemes import instantiate


def fold_entries(
    existing: Mapping[str, TransactionSummary],
    entries: Sequence[JournalEntry],
    stuck_after: float,
    recovered: Sequence[JournalEntry] = (),
) -> dict[str, TransactionSummary]:
    """The summaries of every transaction touched by ``entries`` (all new event ids), updated.

    ``existing`` holds the current summaries of (at least) those transactions; it is not modified.
    ``recovered``: the compensations that gave up whose output this batch completes
    (:func:`recoveries`), accounted for once every entry is folded.
    """
    changed: dict[str, TransactionSummary] = {}
    for entry in entries:
        cid = entry.correlation_id
        summary = changed.get(cid)
        if summary is None and cid in existing:
            summary = changed[cid] = _copy(existing[cid])
        if summary is None:
            changed[cid] = TransactionSummary.first(entry, stuck_after)
        else:
            summary.fold(entry)
    for failure in recovered:  # its transaction was touched: the failure or its output is in the batch
        changed[failure.correlation_id].recover(failure)
    return changed


def recoveries(
    fresh: Sequence[JournalEntry], recorded: Collection[str], earlier: Sequence[JournalEntry]
) -> list[JournalEntry]:
    """The compensations that gave up and ran after all (:attr:`JournalEntry.recovery_id`) that the
    new entries ``fresh`` complete, each counted by whichever of the pair is recorded second.

    ``recorded``: those of the fresh give-ups' recovery ids that the store holds (recorded before,
    or in this batch). ``earlier``: the compensation failures recorded before, in the transactions
    ``fresh`` touches that still count one (the store reads them only for those: rare).
    """
    fresh_ids = {entry.event_id for entry in fresh}
    found = [entry for entry in fresh if (rid := entry.recovery_id) is not None and (rid in fresh_ids or rid in recorded)]
    waiting = {
        rid: entry for entry in earlier if entry.event_id not in fresh_ids and (rid := entry.recovery_id) is not None
    }
    found += [waiting[entry.event_id] for entry in fresh if entry.event_id in waiting]
    return found


def _copy(summary: TransactionSummary) -> TransactionSummary:
    return dataclasses.replace(summary)


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeCount:
    """Entries of one ``(service, type, kind, failed_type)`` recorded in a window, and the newest one's time."""

    service: str
    type: str
    kind: EntryKind
    failed_type: str | None
    count: int
    last_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class Activity:
    """What :meth:`JournalStore.activity` answers: recent traffic per edge, and transactions by status."""

    edges: list[EdgeCount]
    statuses: dict[Status, int]


def count_statuses(base: Mapping[str, int], stuck: int) -> dict[Status, int]:
    """Every status's count from counts per persisted ``base_status`` and the running ones past their deadline."""
    counts: dict[Status, int] = {status: base.get(status, 0) for status in STATUSES}
    counts["running"] -= stuck
    counts["stuck"] = stuck
    return counts


def matches_status(summary: TransactionSummary, status: Status | None, now: float) -> bool:
    return status is None or summary.status(now) == status


class JournalStore(abc.ABC):
    """Where the journal keeps entries and transaction summaries."""

    url: str

    async def open(self) -> None:  # noqa: B027 - nothing to open in memory
        """Connect and create tables if needed. Idempotent."""

    async def close(self) -> None:  # noqa: B027
        """Release connections."""

    @abc.abstractmethod
    async def record(self, entries: Sequence[JournalEntry], *, stuck_after: float) -> list[TransactionSummary]:
        """Store the entries whose event id is new and fold them into their summaries, atomically.

        ``stuck_after`` sets the default deadline of a transaction seen for the first time.
        Returns the summaries that changed (known event ids change nothing).
        """

    @abc.abstractmethod
    async def summary(self, correlation_id: str) -> TransactionSummary | None:
        """One transaction's summary, or ``None`` if the journal never saw it."""

    @abc.abstractmethod
    async def timeline(self, correlation_id: str) -> list[JournalEntry]:
        """Its entries in the order the journal recorded them.

        Not by event time: event times come from many hosts' clocks, while the journal
        usually records a cause before its effects (an effect is published after its cause).
        """

    async def snapshot(self, correlation_id: str) -> tuple[TransactionSummary, list[JournalEntry]] | None:
        """Its summary and :meth:`timeline` as of one moment, or ``None`` if the journal never saw it.

        What :meth:`Journal.transaction <choreograph.journal.Journal.transaction>` answers. Read
        as two queries, an entry the journal recorded between them (``trace`` and the gateway read
        while it writes) gave a summary and a timeline that disagree: a ``running`` transaction of
        one event over a timeline of two ending in its terminal event. The SQLite and PostgreSQL
        stores read both in one database transaction; this default reads one after the other,
        which is one moment for a store that answers without waiting (memory)."""
        summary = await self.summary(correlation_id)
        if summary is None:
            return None
        return summary, await self.timeline(correlation_id)

    async def last_entry(self, correlation_id: str) -> JournalEntry | None:
        """Its last recorded entry (the last of :meth:`timeline`), or ``None``.

        What ``choreograph watch`` shows of each listed transaction at every refresh: the
        stores read that one entry, not a timeline of thousands (this default reads it all)."""
        timeline = await self.timeline(correlation_id)
        return timeline[-1] if timeline else None

    @abc.abstractmethod
    async def summaries(self, *, status: Status | None, now: float, limit: int) -> list[TransactionSummary]:
        """Transactions with ``status`` at time ``now`` (``None``: any), most recently started first."""

    @abc.abstractmethod
    async def activity(self, *, since: float, now: float) -> Activity:
        """Entries recorded at or after ``since`` (journal clock) counted per service, type, kind
        and failed type, and every transaction counted by its status at ``now``.

        What ``choreograph watch`` polls every second or so: the entries are found through an
        index on ``recorded_at``, so the cost follows the traffic in the window, not the
        journal's history (about 1 ms for 1,000 entries; 60,000 take 150 ms in SQLite, 33 ms
        in PostgreSQL); the statuses are one count over the summaries (50,000: 7 ms, 17 ms).
        """

    @abc.abstractmethod
    async def due(self, now: float, limit: int) -> list[TransactionSummary]:
        """Running transactions past their deadline at ``now`` whose timeout was not yet announced."""

    @abc.abstractmethod
    async def mark_timed_out(self, correlation_ids: Collection[str]) -> None:
        """Record that ``choreograph.timedout`` was published for these transactions."""


class MemoryJournalStore(JournalStore):
    """A journal store in process memory (tests, demos); forgets everything on exit."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._entries: dict[str, tuple[int, JournalEntry]] = {}
        self._by_cid: dict[str, list[str]] = {}
        self._summaries: dict[str, TransactionSummary] = {}
        self._seq = itertools.count()

    async def record(self, entries: Sequence[JournalEntry], *, stuck_after: float) -> list[TransactionSummary]:
        fresh: list[JournalEntry] = []
        seen: set[str] = set()
        for entry in entries:
            if entry.event_id in self._entries or entry.event_id in seen:
                continue
            seen.add(entry.event_id)
            fresh.append(entry)
        rids = {rid for entry in fresh if (rid := entry.recovery_id) is not None}
        earlier = [
            self._entries[event_id][1]
            for cid in {entry.correlation_id for entry in fresh}
            if (summary := self._summaries.get(cid)) is not None and summary.compensation_failures
            for event_id in self._by_cid.get(cid, [])
            if self._entries[event_id][1].compensation_failure
        ]
        recovered = recoveries(fresh, {rid for rid in rids if rid in self._entries}, earlier)
        changed = fold_entries(self._summaries, fresh, stuck_after, recovered)
        for entry in fresh:
            self._entries[entry.event_id] = (next(self._seq), entry)
            self._by_cid.setdefault(entry.correlation_id, []).append(entry.event_id)
        self._summaries.update(changed)
        return list(changed.values())

    async def summary(self, correlation_id: str) -> TransactionSummary | None:
        found = self._summaries.get(correlation_id)
        return _copy(found) if found is not None else None

    async def timeline(self, correlation_id: str) -> list[JournalEntry]:
        rows = [self._entries[i] for i in self._by_cid.get(correlation_id, [])]
        rows.sort(key=lambda row: row[0])
        return [entry for _, entry in rows]

    async def last_entry(self, correlation_id: str) -> JournalEntry | None:
        ids = self._by_cid.get(correlation_id)
        return self._entries[ids[-1]][1] if ids else None

    async def summaries(self, *, status: Status | None, now: float, limit: int) -> list[TransactionSummary]:
        found = [_copy(s) for s in self._summaries.values() if matches_status(s, status, now)]
        found.sort(key=lambda s: (s.started_at, s.first_seen), reverse=True)
        return found[:limit]

    async def activity(self, *, since: float, now: float) -> Activity:
        edges: dict[tuple[str, str, EntryKind, str | None], tuple[int, float]] = {}
        for _, entry in self._entries.values():
            if entry.recorded_at >= since:
                key = (entry.service, entry.type, entry.kind, entry.failed_type)
                count, last = edges.get(key, (0, entry.recorded_at))
                edges[key] = (count + 1, max(last, entry.recorded_at))
        base: dict[str, int] = {}
        stuck = 0
        for summary in self._summaries.values():
            base[summary.base_status] = base.get(summary.base_status, 0) + 1
            stuck += summary.status(now) == "stuck"
        return Activity(
            edges=[EdgeCount(*key, count, last) for key, (count, last) in edges.items()],
            statuses=count_statuses(base, stuck),
        )

    async def due(self, now: float, limit: int) -> list[TransactionSummary]:
        found = [
            _copy(s) for s in self._summaries.values()
            if s.base_status == "running" and not s.timed_out and s.deadline <= now
        ]
        found.sort(key=lambda s: s.deadline)
        return found[:limit]

    async def mark_timed_out(self, correlation_ids: Collection[str]) -> None:
        for cid in correlation_ids:
            summary = self._summaries.get(cid)
            if summary is not None:
                summary.timed_out = True


_SCHEMES: dict[str, tuple[str, str]] = {
    "memory": ("choreograph._journal_store", "MemoryJournalStore"),
    "sqlite": ("choreograph._journal_sqlite", "SQLiteJournalStore"),
    "postgresql": ("choreograph._journal_postgres", "PostgresJournalStore"),
    "postgres": ("choreograph._journal_postgres", "PostgresJournalStore"),
}


def open_journal_store(url: str, *, read_only: bool = False) -> JournalStore:
    """A journal store for ``url`` (not yet opened: ``await store.open()``).

    ``read_only``: for a reader that must not write (``trace``, ``transactions``, ``watch``, the
    gateway); a SQLite file is then opened ``mode=ro``, a PostgreSQL schema only read: neither is
    created or migrated.
    """
    store: JournalStore = instantiate(url, _SCHEMES, "journal URL")
    if read_only and hasattr(store, "read_only"):  # SQLite and PostgreSQL; a memory journal is the process's own
        store.read_only = True
    return store
