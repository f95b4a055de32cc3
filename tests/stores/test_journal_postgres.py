"""The journal store on PostgreSQL: what only a shared database has (replicas racing, the schema).

The journal's behaviour on PostgreSQL is specified by ``tests/test_journal.py``, which runs
every scenario on this store too.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest

from choreograph._journal_model import FAILED, TIMEDOUT, JournalEntry
from choreograph._journal_postgres import JOURNAL_MIGRATIONS, PostgresJournalStore
from choreograph.journal import open_journal_store
from choreograph.stores._pg import parse_url
from tests.stores._databases import fresh_postgres_url


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_postgres_url() as url:
        yield url


@pytest.fixture
async def stores(url: str) -> AsyncIterator[tuple[PostgresJournalStore, PostgresJournalStore]]:
    left, right = PostgresJournalStore(url), PostgresJournalStore(url)
    await asyncio.gather(left.open(), right.open())  # migrations race too
    try:
        yield left, right
    finally:
        await left.close()
        await right.close()


def entry(event_id: str, cid: str, *, kind: str = "event", at: float = 100.0) -> JournalEntry:
    return JournalEntry(
        event_id=event_id, correlation_id=cid, type="t.x", source="/s", service="s",
        kind=kind,  # type: ignore[arg-type]
        at=at, recorded_at=at,
    )


def test_postgresql_urls_open_the_postgresql_journal_store() -> None:
    assert isinstance(open_journal_store("postgresql://u@h/db"), PostgresJournalStore)
    assert isinstance(open_journal_store("postgres://u@h/db?schema=j"), PostgresJournalStore)


async def test_two_replicas_recording_one_transaction_at_once_lose_no_entry(
    stores: tuple[PostgresJournalStore, PostgresJournalStore],
) -> None:
    left, right = stores
    cids = [f"tx-{n}" for n in range(20)]
    for round_ in range(5):
        batches = [
            (store, [entry(f"{round_}-{name}-{cid}-{i}", cid) for cid in cids for i in range(3)])
            for store, name in ((left, "l"), (right, "r"))
        ]
        batches.append((right, [entry(f"{round_}-l-{cid}-0", cid) for cid in reversed(cids)]))  # redeliveries
        await asyncio.gather(*(store.record(batch, stuck_after=60) for store, batch in batches))
    for cid in cids:
        summary = await left.summary(cid)
        assert summary is not None and summary.event_count == 30
        assert len(await right.timeline(cid)) == 30


async def test_the_first_terminal_event_decides_whichever_replica_records_it(
    stores: tuple[PostgresJournalStore, PostgresJournalStore],
) -> None:
    left, right = stores
    await left.record([entry("a", "tx")], stuck_after=60)
    await asyncio.gather(
        left.record([entry("done", "tx", kind="completed")], stuck_after=60),
        right.record([entry("oops", "tx", kind="failed")], stuck_after=60),
    )
    summary = await right.summary("tx")
    assert summary is not None and summary.event_count == 3
    assert summary.base_status in ("completed", "failed") and summary.terminal_kind == summary.base_status


async def test_marking_timed_out_while_recording_keeps_both(
    stores: tuple[PostgresJournalStore, PostgresJournalStore],
) -> None:
    left, right = stores
    cids = [f"tx-{n}" for n in range(20)]
    await left.record([entry(f"start-{cid}", cid) for cid in cids], stuck_after=0)
    await asyncio.gather(
        left.mark_timed_out(cids),
        right.record([entry(f"more-{cid}", cid) for cid in cids], stuck_after=0),
    )
    for cid in cids:
        summary = await left.summary(cid)
        assert summary is not None and summary.timed_out and summary.event_count == 2
    assert await right.due(now=1e12, limit=100) == []


async def test_stuck_is_derived_from_the_stored_base_status_and_deadline(url: str) -> None:
    store = PostgresJournalStore(url)
    await store.open()
    try:
        await store.record([entry("a", "tx")], stuck_after=60)  # recorded at 100: deadline 160
    finally:
        await store.close()
    config = parse_url(url)
    conn = await asyncpg.connect(config.dsn)
    try:
        row = await conn.fetchrow(
            f'SELECT base_status, deadline FROM "{config.schema}".choreograph_journal_transactions '
            "WHERE correlation_id = $1",
            "tx",
        )
    finally:
        await conn.close()
    assert row is not None and (row["base_status"], row["deadline"]) == ("running", 160.0)
    reader = open_journal_store(url)
    await reader.open()
    try:
        assert [s.correlation_id for s in await reader.summaries(status="running", now=159.0, limit=10)] == ["tx"]
        assert [s.correlation_id for s in await reader.summaries(status="stuck", now=160.0, limit=10)] == ["tx"]
        assert [s.correlation_id for s in await reader.due(now=160.0, limit=10)] == ["tx"]
    finally:
        await reader.close()


async def test_ids_and_text_postgresql_cannot_hold_as_they_are_are_recorded_not_failing_the_batch(
    stores: tuple[PostgresJournalStore, PostgresJournalStore],
) -> None:
    """U+0000 (JSON has it, PostgreSQL text and jsonb do not) anywhere in an event, or an id past
    a btree entry's 2,704 bytes, failed the whole batch: the journal returned it and fetched it
    again, for ever, recording nothing more of the events fetched with it."""
    import secrets

    from choreograph._journal_model import JournalEntry

    store, _ = stores
    long_cid, long_id = secrets.token_hex(2000), secrets.token_hex(2000)
    entries = [
        JournalEntry(
            event_id="a\x00", correlation_id="tx\x00", type="t.\x00", source="/s\x00", service="s\x00",
            kind="failure", at=100.0, recorded_at=100.0, causation_id="c\x00", time="\x00",
            failed_type="f\x00", compensable=False, record={"last_error": {"type": "E", "message": "bad \x00 byte"}, "k\x00": 1},
        ),
        JournalEntry(event_id=long_id, correlation_id=long_cid, type="t.x", source="/s", service="s",
                     kind="event", at=100.0, recorded_at=100.0),
        JournalEntry(event_id="child", correlation_id=long_cid, type="t.y", source="/s", service="s",
                     kind="completed", at=101.0, recorded_at=101.0, causation_id=long_id),
        entry("plain", "tx-plain"),
    ]
    await store.record(entries, stuck_after=60)

    [failure] = await store.timeline("tx\x00")
    assert failure == entries[0]
    summary = await store.summary("tx\x00")
    assert summary is not None and summary.correlation_id == "tx\x00" and summary.uncompensated == 1

    root, child = await store.timeline(long_cid)
    assert root.correlation_id == child.correlation_id == long_cid
    assert child.causation_id == root.event_id  # the causation tree still links them
    summary = await store.summary(long_cid)
    assert summary is not None and summary.correlation_id == long_cid and summary.base_status == "completed"
    listed = {s.correlation_id for s in await store.summaries(status=None, now=200.0, limit=10)}
    assert listed == {"tx\x00", long_cid, "tx-plain"}
    assert await store.summary("tx-plain") is not None


async def test_text_holding_ufffe_reads_back_as_it_was_and_keys_apart_from_u0000(
    stores: tuple[PostgresJournalStore, PostgresJournalStore],
) -> None:
    """U+0000 is stored as U+FFFE: a genuine U+FFFE read back as U+0000, and a correlation id
    holding one shared the transaction of the one holding U+0000 in its place."""
    store, _ = stores
    odd = JournalEntry(
        event_id="a\ufffe", correlation_id="tx\ufffe", type="t.\ufffe", source="/s\uffff", service="s\ufffe",
        kind="failure", at=100.0, recorded_at=100.0, causation_id="c\uffff\ufffe", time="\ufffe",
        failed_type="f\ufffe", compensable=False, record={"m": "bad \ufffe\x00\uffff", "k\ufffe": 1},
    )
    nul = dataclasses.replace(odd, event_id="a\x00", correlation_id="tx\x00", record=None)
    await store.record([odd, nul], stuck_after=60)
    assert await store.timeline("tx\ufffe") == [odd]
    assert await store.timeline("tx\x00") == [nul]


class JournalBeforeCompensationFailed(PostgresJournalStore):
    """The journal's schema before the step that added ``compensation_failures`` and trace contexts."""

    MIGRATIONS = JOURNAL_MIGRATIONS[:3]


async def test_a_schema_migrated_before_compensation_failed_is_migrated_and_shows_it(url: str) -> None:
    """Summaries stored before: a transaction whose compensation gave up (a failure of a
    ``choreograph.failed`` event) was stored ``compensated``; after the migration it reads, and
    is listed as, ``compensation_failed``, and new entries keep their trace context."""
    old = JournalBeforeCompensationFailed(url)
    await old.open()
    try:
        pool = old._open_pool()
        for cid, failed_types in (("tx-old", ["t.x", FAILED]), ("tx-intact", ["t.x"])):
            for n, failed_type in enumerate(failed_types):
                await pool.execute(
                    "INSERT INTO choreograph_journal_events (event_id, correlation_id, type, source, service, kind, "
                    "at, recorded_at, failed_type, compensable) VALUES ($1, $2, $3, '/s', 's', 'failure', 100, 100, "
                    "$4, false)",
                    f"{cid}-{n}", cid, FAILED, failed_type,
                )
            await pool.execute(
                "INSERT INTO choreograph_journal_transactions (correlation_id, base_status, first_seen, last_seen, "
                "started_at, deadline, deadline_explicit, event_count, terminal_type, terminal_kind, failures, "
                "uncompensated, timed_out) VALUES ($1, 'compensated', 100, 100, 100, 160, false, $2, 't.end', "
                "'failed', $2, $2 - 1, false)",
                cid, len(failed_types),
            )
    finally:
        await old.close()
    store = PostgresJournalStore(url)
    await store.open()
    try:
        summary = await store.summary("tx-old")
        assert summary is not None and summary.compensation_failures == 1
        assert summary.status(200.0) == "compensation_failed"
        listed = await store.summaries(status="compensation_failed", now=200.0, limit=10)
        assert [s.correlation_id for s in listed] == ["tx-old"]
        assert [s.correlation_id for s in await store.summaries(status="compensated", now=200.0, limit=10)] == [
            "tx-intact"
        ]
        assert (await store.activity(since=0.0, now=200.0)).statuses["compensation_failed"] == 1
        traced = dataclasses.replace(entry("late", "tx-intact", at=150.0), traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        await store.record([traced], stuck_after=60)
        assert (await store.timeline("tx-intact"))[-1] == traced
    finally:
        await store.close()


class JournalBeforeTheCompensationMark(PostgresJournalStore):
    """The journal's schema before the step that counts compensation failures by the current rule."""

    MIGRATIONS = JOURNAL_MIGRATIONS[:4]


async def test_a_schema_counted_by_the_previous_rule_is_counted_again(url: str) -> None:
    """A timeout handler's give-up and a compensation's marked give-up (on a business event) were
    stored ``compensated``: only failures of ``choreograph.failed`` counted. They read, and are
    listed as, ``compensation_failed``; an unmarked failure of a step stays a failure."""
    old = JournalBeforeTheCompensationMark(url)
    await old.open()
    try:
        pool = old._open_pool()
        for cid, failed_type, record in (("tx-timeout", TIMEDOUT, None), ("tx-step", "t.x", '{"compensation": true}'),
                                         ("tx-intact", "t.x", '{"reason": "rejected"}')):
            await pool.execute(
                "INSERT INTO choreograph_journal_events (event_id, correlation_id, type, source, service, kind, "
                "at, recorded_at, failed_type, compensable, record) VALUES ($1, $2, $3, '/s', 's', 'failure', 100, "
                "100, $4, false, $5::jsonb)",
                f"{cid}-0", cid, FAILED, failed_type, record,
            )
            await pool.execute(
                "INSERT INTO choreograph_journal_transactions (correlation_id, base_status, first_seen, last_seen, "
                "started_at, deadline, deadline_explicit, event_count, terminal_type, terminal_kind, failures, "
                "uncompensated, timed_out) VALUES ($1, 'compensated', 100, 100, 100, 160, false, 1, 't.end', "
                "'failed', 1, 0, false)",
                cid,
            )
    finally:
        await old.close()
    store = PostgresJournalStore(url)
    await store.open()
    try:
        listed = await store.summaries(status="compensation_failed", now=200.0, limit=10)
        assert sorted(s.correlation_id for s in listed) == ["tx-step", "tx-timeout"]
        assert all(s.compensation_failures == 1 for s in listed)
        intact = await store.summary("tx-intact")
        assert intact is not None and intact.status(200.0) == "compensated" and intact.compensation_failures == 0
    finally:
        await store.close()


async def test_a_read_only_journal_store_creates_and_migrates_nothing(url: str) -> None:
    """trace, transactions, watch and the gateway open the journal read-only: a mistyped ?schema=
    became a new, empty journal (listing no transactions), and an older one was migrated."""
    from choreograph.errors import StoreError

    schema = parse_url(url).schema
    reader = open_journal_store(url, read_only=True)
    with pytest.raises(StoreError, match=f"no journal in schema '{schema}'"):
        await reader.open()
    conn = await asyncpg.connect(parse_url(url).dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 0
        writer = PostgresJournalStore(url)
        await writer.open()
        await writer.record([entry("e-1", "tx-ro")], stuck_after=60)
        await writer.close()
        reader = open_journal_store(url, read_only=True)
        await reader.open()
        try:
            assert (await reader.summary("tx-ro")) is not None
        finally:
            await reader.close()
        last = len(JOURNAL_MIGRATIONS)
        await conn.execute(f'DELETE FROM "{schema}".choreograph_migrations WHERE component = $1 AND version = $2',
                           "journal", last)
        reader = open_journal_store(url, read_only=True)
        with pytest.raises(StoreError, match="written by an older choreograph"):
            await reader.open()
        assert await conn.fetchval(
            f'SELECT max(version) FROM "{schema}".choreograph_migrations WHERE component = $1', "journal"
        ) == last - 1
    finally:
        await conn.close()
