"""The JoinStore contract, for every implementation: atomic completion, first arrival wins, timeouts.

PostgreSQL runs in a private schema per test (skipped when unreachable, failed under CI).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from choreograph.errors import ConfigurationError
from choreograph.stores.joins_base import Arrival, JoinKey, JoinStore, join_store_beside, open_join_store
from choreograph.stores.joins_memory import MemoryJoinStore
from choreograph.stores.joins_postgres import PostgresJoinStore
from choreograph.stores.joins_sqlite import SQLiteJoinStore
from tests.stores._databases import backend_url

KEY = JoinKey("shipping", "ship", "tx-1")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JoinStore]:
    async with backend_url(request.param, tmp_path, "joins.db") as url:
        store = open_join_store(url)
        await store.open()
        yield store
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database several stores (replicas) open at once."""
    async with backend_url(request.param, tmp_path, "joins.db") as url:
        yield url


def arrival(event_id: str) -> Arrival:
    return Arrival(event_id, f'{{"id": "{event_id}"}}'.encode())


async def arrive(store: JoinStore, slot: int, event_id: str, *, key: JoinKey = KEY, now: float = 100.0,
                 deadline: float | None = None) -> str | None:
    state = await store.arrive(key, slot, arrival(event_id), slots=2, now=now, deadline=deadline)
    return state.fired_by


async def test_the_first_arrival_creates_the_instance_with_its_deadline(store: JoinStore) -> None:
    state = await store.arrive(KEY, 1, arrival("b"), slots=2, now=100.0, deadline=130.0)
    assert (state.created_by, state.created_at, state.deadline) == ("b", 100.0, 130.0)
    assert state.arrivals == {1: arrival("b")}
    assert state.fired_by is None and not state.timed_out and not state.complete


async def test_the_arrival_that_fills_the_last_slot_completes_the_join_and_keeps_completing_it(
    store: JoinStore,
) -> None:
    assert await arrive(store, 0, "a") is None
    assert await arrive(store, 1, "b") == "b"
    assert await arrive(store, 1, "b") == "b"  # redelivered: same answer
    assert await arrive(store, 0, "a") == "b"
    state = await store.get(KEY)
    assert state is not None and state.complete and state.arrivals == {0: arrival("a"), 1: arrival("b")}


@pytest.mark.parametrize("correlation", ["tx-1\x00", "tx-" + secrets.token_hex(2000)], ids=["nul", "long"])
async def test_any_correlation_id_keys_its_own_instance(store: JoinStore, correlation: str) -> None:
    """JSON allows U+0000 in a correlation id and PostgreSQL text does not; nor does a PostgreSQL
    index entry take 3 kB: every arrival of such a transaction failed, and its join never fired."""
    key, near = JoinKey("shipping", "ship", correlation), JoinKey("shipping", "ship", correlation[:-1])
    assert await arrive(store, 0, "a", key=key) is None
    assert await arrive(store, 0, "a-near", key=near) is None
    assert await arrive(store, 1, "b", key=key) == "b"
    state = await store.get(key)
    assert state is not None and state.arrivals == {0: arrival("a"), 1: arrival("b")}
    timed_out = await store.time_out(near)
    assert timed_out is not None and timed_out.timed_out and timed_out.arrivals == {0: arrival("a-near")}
    assert await store.expire(1_000.0) == 2


async def test_arrival_ids_holding_u0000_are_kept_and_read_back_as_they_arrived(store: JoinStore) -> None:
    """JSON allows U+0000 in an event id and PostgreSQL text does not: the arrival (its id is also
    the instance's created_by and fired_by) failed, so the join never fired. The ids must read back
    as they arrived: the runtime tells the arrival that fired the join by comparing them."""
    assert await arrive(store, 0, "a\x00") is None
    assert await arrive(store, 1, "b\x00") == "b\x00"
    state = await store.get(KEY)
    assert state is not None and state.arrivals == {0: arrival("a\x00"), 1: arrival("b\x00")}
    assert (state.created_by, state.fired_by) == ("a\x00", "b\x00")
    other = JoinKey("shipping", "ship", "tx-2")
    assert await arrive(store, 0, "c\x00", key=other) is None
    timed_out = await store.time_out(other)
    assert timed_out is not None and timed_out.created_by == "c\x00" and timed_out.arrivals == {0: arrival("c\x00")}


async def test_arrival_ids_holding_ufffe_read_back_as_they_arrived(store: JoinStore) -> None:
    """PostgreSQL stores U+0000 as U+FFFE: a genuine U+FFFE read back as U+0000, so the runtime
    no longer recognised the arrival that fired the join as its own."""
    assert await arrive(store, 0, "a\ufffe") is None
    assert await arrive(store, 1, "b\uffff\ufffe") == "b\uffff\ufffe"
    state = await store.get(KEY)
    assert state is not None and state.arrivals == {0: arrival("a\ufffe"), 1: arrival("b\uffff\ufffe")}
    assert (state.created_by, state.fired_by) == ("a\ufffe", "b\uffff\ufffe")


async def test_a_slot_keeps_its_first_arrival(store: JoinStore) -> None:
    await arrive(store, 0, "a1")
    assert await arrive(store, 0, "a2") is None
    assert await arrive(store, 1, "b") == "b"
    state = await store.get(KEY)
    assert state is not None and state.arrivals[0].event_id == "a1"


async def test_instances_are_separate_per_group_join_and_correlation(store: JoinStore) -> None:
    await arrive(store, 0, "a")
    for other in (JoinKey("other", "ship", "tx-1"), JoinKey("shipping", "other", "tx-1"),
                  JoinKey("shipping", "ship", "tx-2")):
        assert await arrive(store, 1, "b", key=other) is None
    assert await store.get(JoinKey("shipping", "ship", "tx-3")) is None


async def test_a_timed_out_instance_never_fires(store: JoinStore) -> None:
    await arrive(store, 0, "a")
    state = await store.time_out(KEY)
    assert state is not None and state.timed_out
    assert await arrive(store, 1, "b") is None
    state = await store.get(KEY)
    assert state is not None and state.arrivals == {0: arrival("a")} and state.timed_out


async def test_timing_out_a_fired_instance_changes_nothing(store: JoinStore) -> None:
    await arrive(store, 0, "a")
    await arrive(store, 1, "b")
    state = await store.time_out(KEY)
    assert state is not None and state.fired_by == "b" and not state.timed_out
    assert await store.time_out(JoinKey("shipping", "ship", "nope")) is None


async def test_expire_drops_instances_created_before_a_time(store: JoinStore) -> None:
    await arrive(store, 0, "a", now=100.0)
    await arrive(store, 0, "a", key=JoinKey("shipping", "ship", "tx-new"), now=200.0)
    assert await store.expire(150.0) == 1
    assert await store.get(KEY) is None
    assert await store.get(JoinKey("shipping", "ship", "tx-new")) is not None


async def test_two_stores_on_one_database_complete_each_join_exactly_once_across_races(shared_url: str) -> None:
    left, right = open_join_store(shared_url), open_join_store(shared_url)
    await asyncio.gather(left.open(), right.open())
    try:
        for n in range(30):
            key = JoinKey("g", "j", f"tx-{n}")
            states = await asyncio.gather(
                left.arrive(key, 0, arrival(f"a{n}"), slots=3, now=1.0, deadline=None),
                right.arrive(key, 1, arrival(f"b{n}"), slots=3, now=1.0, deadline=None),
                left.arrive(key, 2, arrival(f"c{n}"), slots=3, now=1.0, deadline=None),
                right.arrive(key, 2, arrival(f"c{n}"), slots=3, now=1.0, deadline=None),  # redelivered elsewhere
            )
            fired = {s.fired_by for s in states} - {None}
            assert len(fired) == 1
            state = await right.get(key)
            assert state is not None and state.complete and state.fired_by in fired
    finally:
        await left.close()
        await right.close()


async def test_a_timeout_racing_the_last_arrival_either_fires_or_times_out_never_both(shared_url: str) -> None:
    left, right = open_join_store(shared_url), open_join_store(shared_url)
    await asyncio.gather(left.open(), right.open())
    try:
        for n in range(30):
            key = JoinKey("g", "j", f"tx-{n}")
            await left.arrive(key, 0, arrival(f"a{n}"), slots=2, now=1.0, deadline=2.0)
            await asyncio.gather(left.time_out(key), right.arrive(key, 1, arrival(f"b{n}"), slots=2, now=3.0,
                                                                  deadline=2.0))
            state = await left.get(key)
            assert state is not None and (state.fired_by is None) == state.timed_out
    finally:
        await left.close()
        await right.close()


def test_join_store_urls_pick_the_implementation() -> None:
    assert isinstance(open_join_store("memory://"), MemoryJoinStore)
    assert isinstance(open_join_store("sqlite:///var/x.db"), SQLiteJoinStore)
    assert isinstance(open_join_store("postgresql://u@h/db"), PostgresJoinStore)
    assert isinstance(open_join_store("postgres://u@h/db?schema=s"), PostgresJoinStore)
    with pytest.raises(ConfigurationError, match="unknown scheme"):
        open_join_store("mongodb://x")


def test_a_worker_keeps_its_joins_beside_its_inbox() -> None:
    assert isinstance(join_store_beside("memory://"), MemoryJoinStore)
    assert isinstance(join_store_beside("sqlite:///var/x.db"), SQLiteJoinStore)
    beside = join_store_beside("postgresql://u@h/db?schema=shipping")
    assert isinstance(beside, PostgresJoinStore) and beside.config.schema == "shipping"


async def test_sqlite_get_reads_the_instance_and_its_arrivals_in_one_snapshot(tmp_path: Path) -> None:
    """Another process's arrival committed between ``get``'s two reads is not half seen: the
    instance as it was (one arrival, not fired), never two arrivals of an unfired instance."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'joins.db'}"
    store, other = SQLiteJoinStore(url), SQLiteJoinStore(url)
    await store.open()
    await other.open()
    try:
        await arrive(store, 0, "a")
        db = store._db
        assert db is not None
        other_db = other._db
        assert other_db is not None

        class Racing:
            """The store's connection, with the other replica completing the join after the first read."""

            def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
                cursor = db.execute(sql, *args)
                if sql.startswith("SELECT slots, created_by"):
                    cursor = _Prefetched(cursor.fetchone())
                    other_db.execute("BEGIN IMMEDIATE")
                    other_db.execute("INSERT INTO join_arrivals VALUES ('shipping', 'ship', 'tx-1', 1, 'b', x'7b7d')")
                    other_db.execute("UPDATE join_instances SET fired_by='b'")
                    other_db.execute("COMMIT")
                return cursor  # type: ignore[return-value]

        store._db = Racing()  # type: ignore[assignment]
        state = await store.get(KEY)
        store._db = db
        assert state is not None
        assert (state.fired_by, sorted(state.arrivals)) == (None, [0])  # one snapshot: before the race
        state = await store.get(KEY)
        assert state is not None and (state.fired_by, sorted(state.arrivals)) == ("b", [0, 1])
    finally:
        await store.close()
        await other.close()


class _Prefetched:
    def __init__(self, row: object) -> None:
        self.row = row

    def fetchone(self) -> object:
        return self.row


async def test_expire_keeps_an_instance_until_its_deadline_has_passed_too(store: JoinStore) -> None:
    """A join whose ``within=`` is longer than the retention: its timer must still find it to announce
    the timeout (dropped, the timer found nothing, and the arrived steps were never compensated)."""
    await arrive(store, 0, "a", now=100.0, deadline=1000.0)
    assert await store.expire(500.0) == 0
    state = await store.time_out(KEY)
    assert state is not None and state.timed_out and sorted(state.arrivals) == [0]
    assert await store.expire(1001.0) == 1
    assert await store.get(KEY) is None
