"""Service databases: one transaction for state, inbox record and outbox; relay claims; lag.

Every test runs on SQLite and on PostgreSQL (``database_url``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from choreograph.errors import ConfigurationError, StoreError
from choreograph.stores.state import StateStore, open_database
from choreograph.transports.base import Message
from tests.stores._databases import database_url, postgres_database_url, sqlite_url  # noqa: F401 - fixtures

SERVICE = "svc"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[StateStore]:  # noqa: F811
    async with open_database(database_url) as store:
        tx = await store.begin()
        await tx.execute("CREATE TABLE items (id text PRIMARY KEY, n integer)", ())
        await tx.commit(inbox=None, service=SERVICE, messages=[])
        yield store


def msg(n: int | str) -> Message:
    return Message(f"m{n}", "test.state.item", b'{"n": %s}' % str(n).encode())


async def commit(db: StateStore, *messages: Message, inbox: tuple[str, str] | None = None, item: str = "") -> bool:
    tx = await db.begin()
    try:
        if item:
            await tx.execute("INSERT INTO items (id, n) VALUES ($1, $2)", (item, 1))
        return await tx.commit(inbox=inbox, service=SERVICE, messages=messages)
    finally:
        await tx.rollback()


async def items(db: StateStore) -> list[str]:
    tx = await db.begin()
    try:
        return [row["id"] for row in await tx.fetch("SELECT id FROM items ORDER BY id", ())]
    finally:
        await tx.rollback()


class Recorder:
    """A relay publish callback that records what it sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def __call__(self, messages: list[Message]) -> None:
        self.sent.extend(m.id for m in messages)


async def test_commit_writes_state_inbox_record_and_outbox_rows_together(db: StateStore) -> None:
    assert await commit(db, msg(1), msg(2), inbox=("g", "e1"), item="a")
    assert await items(db) == ["a"]
    assert await db.seen("g", ["e1"]) == {"e1"}
    assert (await db.outbox_lag(SERVICE)).pending == 2


async def test_rollback_leaves_no_state_no_inbox_record_and_no_outbox_row(db: StateStore) -> None:
    tx = await db.begin()
    await tx.execute("INSERT INTO items (id, n) VALUES ($1, $2)", ("a", 1))
    await tx.rollback()
    assert await items(db) == []
    assert await db.seen("g", ["e1"]) == set()
    assert (await db.outbox_lag(SERVICE)).pending == 0


async def test_a_second_commit_of_the_same_event_returns_false_and_undoes_its_state(db: StateStore) -> None:
    assert await commit(db, msg(1), inbox=("g", "e1"), item="a")
    assert not await commit(db, msg(2), inbox=("g", "e1"), item="b")
    assert await items(db) == ["a"]
    assert (await db.outbox_lag(SERVICE)).pending == 1


async def test_a_commit_forgets_the_failure_history_of_its_event(db: StateStore) -> None:
    from choreograph.stores.base import ErrorInfo

    await db.record_failure("g", "e1", ErrorInfo("E", "first"), 1.0)
    assert await commit(db, inbox=("g", "e1"))
    assert await db.record_failure("g", "e1", ErrorInfo("E", "later"), 2.0) == (ErrorInfo("E", "later"), 2.0)


async def test_placeholders_are_dollar_numbers_and_rows_index_by_name_and_position(db: StateStore) -> None:
    tx = await db.begin()
    try:
        assert await tx.execute("INSERT INTO items (id, n) VALUES ($1, $2)", ("a", 5)) == 1
        await tx.executemany("INSERT INTO items (id, n) VALUES ($1, $2)", [("b", 6), ("c", 7)])
        assert await tx.execute("UPDATE items SET n = n + $1 WHERE n >= $2 AND n <= $2 + 1", (10, 6)) == 2
        row = await tx.fetchone("SELECT id, n FROM items WHERE id = $1", ("b",))
        assert (row["id"], row[1], dict(row)) == ("b", 16, {"id": "b", "n": 16})
        assert await tx.fetchone("SELECT id FROM items WHERE id = $1", ("zz",)) is None
        rows = await tx.fetch("SELECT id FROM items WHERE n > $1 ORDER BY id", (10,))
        assert [r[0] for r in rows] == ["b", "c"]
    finally:
        await tx.rollback()


async def test_a_bad_statement_is_a_store_error(db: StateStore) -> None:
    tx = await db.begin()
    try:
        with pytest.raises(StoreError):
            await tx.execute("INSERT INTO no_such_table VALUES ($1)", (1,))
    finally:
        await tx.rollback()


async def test_a_string_of_several_statements_is_refused_and_commits_nothing(db: StateStore) -> None:
    # PostgreSQL's simple protocol (asyncpg's execute without arguments) would run all of
    # them: the COMMIT would end the transaction before its inbox record and outbox rows.
    tx = await db.begin()
    try:
        await tx.execute("INSERT INTO items (id, n) VALUES ('a', 1)", ())
        with pytest.raises(StoreError, match="multiple commands|one statement"):
            await tx.execute("INSERT INTO items (id, n) VALUES ('b', 2); COMMIT", ())
    finally:
        await tx.rollback()
    assert await items(db) == []


async def test_a_statement_without_arguments_returns_its_row_count(db: StateStore) -> None:
    tx = await db.begin()
    try:
        assert await tx.execute("INSERT INTO items (id, n) VALUES ('a', 1), ('b', 2)", ()) == 2
        assert await tx.execute("UPDATE items SET n = n + 1", ()) == 2
        assert await tx.execute("DELETE FROM items WHERE id = 'zz'", ()) == 0
    finally:
        await tx.rollback()


async def test_postgres_statements_without_arguments_go_through_a_prepared_statement_without_asyncpgs_internals(
    postgres_database_url: str,  # noqa: F811
) -> None:
    from choreograph.stores._state_postgres import _one_statement

    class Public:  # a connection with asyncpg's public API only
        def __init__(self, conn: object) -> None:
            self.prepare = conn.prepare  # type: ignore[attr-defined]

    async with open_database(postgres_database_url) as store:
        tx = await store.begin()
        try:
            await tx.execute("CREATE TEMP TABLE scratch (n integer)", ())
            conn = tx.conn  # type: ignore[attr-defined]
            assert await _one_statement(Public(conn), "INSERT INTO scratch VALUES (1), (2)") == "INSERT 0 2"
            with pytest.raises(Exception, match="multiple commands"):
                await _one_statement(Public(conn), "INSERT INTO scratch VALUES (3); COMMIT")
        finally:
            await tx.rollback()


async def test_a_finished_transaction_cannot_be_used(db: StateStore) -> None:
    tx = await db.begin()
    await tx.commit(inbox=None, service=SERVICE, messages=[])
    with pytest.raises(StoreError, match="finished"):
        await tx.execute("SELECT 1", ())


async def test_the_relay_publishes_in_commit_order_and_marks_rows_sent(db: StateStore) -> None:
    for n in range(0, 6, 2):
        await commit(db, msg(n), msg(n + 1))
    publish = Recorder()
    assert await db.relay_pass(SERVICE, "me", 4, publish) == 4
    assert await db.relay_pass(SERVICE, "me", 4, publish) == 2
    assert await db.relay_pass(SERVICE, "me", 4, publish) == 0
    assert publish.sent == [f"m{n}" for n in range(6)]
    assert (await db.outbox_lag(SERVICE)).pending == 0


async def test_the_relay_only_sends_rows_of_its_service(db: StateStore) -> None:
    tx = await db.begin()
    await tx.commit(inbox=None, service="another", messages=[msg(1)])
    publish = Recorder()
    assert await db.relay_pass(SERVICE, "me", 10, publish) == 0
    assert (await db.outbox_lag("another")).pending == 1


async def test_a_failed_publish_marks_nothing_and_the_rows_go_again_with_the_same_ids(db: StateStore) -> None:
    await commit(db, msg(1), msg(2))

    async def broken(messages: list[Message]) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        await db.relay_pass(SERVICE, "me", 10, broken)
    publish = Recorder()
    assert await db.relay_pass(SERVICE, "me", 10, publish) == 2
    assert publish.sent == ["m1", "m2"]


async def test_while_one_relay_publishes_another_on_the_same_database_gets_no_claim(database_url: str) -> None:  # noqa: F811
    async with open_database(database_url) as first:
        second = type(first)(database_url)  # a separate store: its own connections, like another process
        async with second:
            await commit(first, msg(1))
            seen_by_second: list[int | None] = []

            async def publish(messages: list[Message]) -> None:
                seen_by_second.append(await second.relay_pass(SERVICE, "second", 10, Recorder()))

            assert await first.relay_pass(SERVICE, "first", 10, publish) == 1
            assert seen_by_second == [None]


async def test_outbox_lag_counts_unsent_rows_and_the_age_of_the_oldest(db: StateStore) -> None:
    assert (await db.outbox_lag(SERVICE)).pending == 0
    assert (await db.outbox_lag(SERVICE)).oldest_age == 0.0
    await commit(db, msg(1), msg(2))
    await asyncio.sleep(0.01)
    lag = await db.outbox_lag(SERVICE)
    assert lag.pending == 2 and lag.oldest_age > 0


async def test_purge_deletes_only_rows_sent_before_the_cutoff(db: StateStore) -> None:
    await commit(db, msg(1))
    await db.relay_pass(SERVICE, "me", 10, Recorder())
    await commit(db, msg(2))
    assert await db.purge_sent(time.time() - 3600) == 0
    assert await db.purge_sent(time.time() + 1) == 1
    assert (await db.outbox_lag(SERVICE)).pending == 1


async def test_open_database_shares_one_store_per_url_within_a_loop(database_url: str) -> None:  # noqa: F811
    a = open_database(database_url)
    assert open_database(database_url) is a
    async with a:
        async with open_database(database_url) as b:
            assert b is a
        assert await a.seen("g", []) == set()  # still open: the outer user holds it
    assert open_database(database_url) is not a  # the last close forgets it


async def test_a_commit_with_outbox_rows_wakes_a_waiting_relay(db: StateStore) -> None:
    waiting = asyncio.create_task(db.wait_outbox(SERVICE, 3600))
    await asyncio.sleep(0)
    await commit(db, msg(1))
    await asyncio.wait_for(waiting, 10)


def test_unknown_database_schemes_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="database URL"):
        open_database("redis://localhost")


@pytest.mark.parametrize(
    ("query", "named"),
    [("synchronus=FULL", "unknown parameter(s) synchronus"), ("relay_lease=nan", "relay_lease"),
     ("relay_lease=inf", "relay_lease"), ("relay_lease=0", "relay_lease")],
)
def test_a_sqlite_service_database_url_names_what_it_cannot_take(tmp_path: Path, query: str, named: str) -> None:
    """A misspelt parameter is refused rather than ignored (it ran with the default), and a lease
    that never ends or never compares (``inf``, ``nan``) is refused like one that is over at once."""
    with pytest.raises(ConfigurationError, match=re.escape(named)):
        open_database(f"sqlite:///{tmp_path / 'state.db'}?{query}")


def test_a_sqlite_service_database_needs_a_file() -> None:
    with pytest.raises(ConfigurationError, match="file"):
        open_database("sqlite:///:memory:")


async def test_a_sqlite_relay_that_stops_passing_keeps_its_claim_past_its_lease_while_its_process_lives(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path, relay_lease="0.2")
    async with open_database(url) as db:
        await commit(db, msg(1))
        assert await db.relay_pass(SERVICE, "stalled", 10, Recorder()) == 1
        await commit(db, msg(2))
        await asyncio.sleep(0.3)  # the lease lapsed; the lock says the holder lives
        assert await db.relay_pass(SERVICE, "standby", 10, Recorder()) is None
        publish = Recorder()
        assert await db.relay_pass(SERVICE, "stalled", 10, publish) == 1  # renews its lease and carries on
        assert publish.sent == ["m2"]


async def test_a_sqlite_standby_takes_over_at_once_when_the_holders_lock_is_gone(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path, relay_lease="3600")
    async with open_database(url) as db:
        holder = type(db)(url)  # its own connections and lock, like another process
        async with holder:
            await commit(db, msg(1))
            assert await holder.relay_pass(SERVICE, "holder", 10, Recorder()) == 1
            await commit(db, msg(2))
            assert await db.relay_pass(SERVICE, "standby", 10, Recorder()) is None
        # Closed without releasing the claim: the lease row still runs for an hour, but its lock is free.
        publish = Recorder()
        assert await db.relay_pass(SERVICE, "standby", 10, publish) == 1
        assert publish.sent == ["m2"]


async def set_lease(db: StateStore, owner: str, until: float) -> None:
    tx = await db.begin()
    await tx.execute("UPDATE choreograph_relay SET owner = $1, lease_until = $2", (owner, until))
    await tx.commit(inbox=None, service=SERVICE, messages=[])


async def test_a_sqlite_claim_of_an_owner_without_the_lock_is_taken_only_when_its_lease_lapses(
    tmp_path: Path,
) -> None:
    """An older relay (or one without flock) holds no lock: only its lease says it is alive."""
    async with open_database(sqlite_url(tmp_path)) as db:
        await commit(db, msg(1))
        await db.relay_pass(SERVICE, "me", 10, Recorder())  # creates the claim row, then gives it to "old"
        await db.release_relay(SERVICE, "me")
        # Its lease is set rather than waited out: one that ran out while a loaded machine got
        # to the pass below would be taken, and one long enough to be safe would be waited for.
        await set_lease(db, "old", time.time() + 3600)
        await commit(db, msg(2))
        assert await db.relay_pass(SERVICE, "standby", 10, Recorder()) is None
        await set_lease(db, "old", time.time() - 1)  # it stopped renewing: the lease lapsed
        publish = Recorder()
        assert await db.relay_pass(SERVICE, "standby", 10, publish) == 1
        assert publish.sent == ["m2"]


async def test_a_sqlite_claim_holder_waiting_for_rows_wakes_when_another_process_commits(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with open_database(url) as holder:
        other = type(holder)(url)  # another process's store: its commits cannot wake the holder directly
        async with other:
            assert await holder.relay_pass(SERVICE, "holder", 10, Recorder()) == 0
            await holder.wait_outbox(SERVICE, 0.2)  # the watcher's first look may wake it once
            waiting = asyncio.create_task(holder.wait_outbox(SERVICE, 3600))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await commit(other, msg(1))
            await asyncio.wait_for(waiting, 30)
            publish = Recorder()
            assert await holder.relay_pass(SERVICE, "holder", 10, publish) == 1
            assert publish.sent == ["m1"]


async def test_a_sqlite_standby_waiting_for_rows_wakes_when_the_claim_comes_free(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path, relay_lease="3600")
    async with open_database(url) as standby:
        holder = type(standby)(url)
        async with holder:
            assert await holder.relay_pass(SERVICE, "holder", 10, Recorder()) == 0
            assert await standby.relay_pass(SERVICE, "standby", 10, Recorder()) is None
            waiting = asyncio.create_task(standby.wait_outbox(SERVICE, 3600))
            await asyncio.sleep(0.05)
            assert not waiting.done()
        await asyncio.wait_for(waiting, 30)  # the holder's store closed: its lock went with it
        assert await standby.relay_pass(SERVICE, "standby", 10, Recorder()) == 0


async def test_a_row_committed_after_every_row_was_sent_and_purged_is_still_published(db: StateStore) -> None:
    """SQLite reuses the seq of purged rows: the holder must not skip a seq it published before."""
    await commit(db, msg(1))
    await commit(db, msg(2))
    assert await db.relay_pass(SERVICE, "me", 10, Recorder()) == 2
    assert await db.relay_pass(SERVICE, "me", 10, Recorder()) == 0
    assert await db.purge_sent(time.time() + 1) == 2
    await commit(db, msg(3))
    publish = Recorder()
    assert await db.relay_pass(SERVICE, "me", 10, publish) == 1
    assert publish.sent == ["m3"]


async def test_rows_committed_after_a_purge_of_what_a_busy_relay_published_go_out_in_commit_order(
    db: StateStore,
) -> None:
    """SQLite gave a new row the seq after the largest left: after a purge of every row the
    relay read past the seqs it had published and sent a later row before earlier ones."""
    await commit(db, msg(1), msg(2))
    assert await db.relay_pass(SERVICE, "me", 10, Recorder()) == 2  # no idle pass after it
    purged = 0
    for _ in range(100):  # the rows' mark overlaps the next pass
        purged += await db.purge_sent(time.time() + 1)
        if purged == 2:
            break
        await asyncio.sleep(0.01)
    assert purged == 2
    await commit(db, msg(3), msg(4), msg(5))
    publish = Recorder()
    while await db.relay_pass(SERVICE, "me", 10, publish):
        pass
    assert publish.sent == ["m3", "m4", "m5"]


async def test_a_sqlite_outbox_of_the_first_schema_keeps_its_rows_and_seqs_when_migrated(tmp_path: Path) -> None:
    import sqlite3

    from choreograph.stores._state_sqlite import MIGRATIONS

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE choreograph_migrations (component TEXT NOT NULL, version INTEGER NOT NULL,"
                " applied_at REAL NOT NULL, PRIMARY KEY (component, version))")
    for statement in MIGRATIONS[0]:
        old.execute(statement)
    old.execute("INSERT INTO choreograph_migrations VALUES ('state', 1, 0)")
    old.execute("INSERT INTO choreograph_outbox VALUES (7, ?, 'm7', 't', x'7b7d', 0, NULL)", (SERVICE,))
    old.commit()
    old.close()
    async with open_database(f"sqlite:///{path}") as db:
        await commit(db, msg(8))
        publish = Recorder()
        assert await db.relay_pass(SERVICE, "me", 10, publish) == 2
        assert publish.sent == ["m7", "m8"]
    check = sqlite3.connect(path)
    try:
        assert [row[0] for row in check.execute("SELECT seq FROM choreograph_outbox ORDER BY seq")] == [7, 8]
        assert check.execute("SELECT seq FROM sqlite_sequence WHERE name='choreograph_outbox'").fetchone() == (8,)
    finally:
        check.close()


async def test_a_released_sqlite_claim_passes_to_a_standby_at_once(tmp_path: Path) -> None:
    async with open_database(sqlite_url(tmp_path)) as db:
        assert await db.relay_pass(SERVICE, "first", 10, Recorder()) == 0
        assert await db.relay_pass(SERVICE, "second", 10, Recorder()) is None
        await db.release_relay(SERVICE, "first")
        assert await db.relay_pass(SERVICE, "second", 10, Recorder()) == 0


async def test_postgres_concurrent_commits_of_one_event_keep_exactly_one(postgres_database_url: str) -> None:  # noqa: F811
    async with open_database(postgres_database_url) as db:
        tx = await db.begin()
        await tx.execute("CREATE TABLE items (id text PRIMARY KEY, n integer)", ())
        await tx.commit(inbox=None, service=SERVICE, messages=[])
        results = await asyncio.gather(*(commit(db, msg(i), inbox=("g", "same"), item=f"i{i}") for i in range(4)))
        assert sorted(results) == [False, False, False, True]
        assert len(await items(db)) == 1
        assert (await db.outbox_lag(SERVICE)).pending == 1


async def test_postgres_notifies_a_relay_listening_from_another_store(postgres_database_url: str) -> None:  # noqa: F811
    url = postgres_database_url
    async with open_database(url) as writer:
        listener = type(writer)(url)
        async with listener:
            await listener._listen()
            waiting = asyncio.create_task(listener.wait_outbox(SERVICE, 3600))
            await asyncio.sleep(0.05)
            await commit(writer, msg(1))
            await asyncio.wait_for(waiting, 10)


async def test_postgres_a_failed_pass_keeps_the_notify_owed_for_rows_committed_without_one(
    postgres_database_url: str,  # noqa: F811
) -> None:
    """A commit made while this process runs a relay sends no NOTIFY; this relay's pass, finding
    another process's relay in a pass, sends it instead. A pass that failed before that (the
    database busy) forgot it had one to send: the other relay found the rows only by polling."""
    import asyncpg

    from choreograph.stores._pg import parse_url

    url = postgres_database_url
    config = parse_url(url)
    async with open_database(url) as db:
        assert await db.relay_pass(SERVICE, "me", 10, Recorder()) == 0  # creates the claim row
        other = await asyncpg.connect(config.dsn, server_settings={"search_path": config.schema})
        listener = await asyncpg.connect(config.dsn)  # not in a transaction: it hears at once
        heard: asyncio.Queue[str] = asyncio.Queue()
        try:
            await listener.add_listener(db.channel, lambda *args: heard.put_nowait(args[-1]))
            holder = other.transaction()
            await holder.start()
            await other.execute("SELECT 1 FROM choreograph_relay WHERE service = $1 FOR UPDATE", SERVICE)
            db.relay_started(SERVICE)
            try:
                await commit(db, msg(1))  # quiet: this process runs a relay
                pool = db._pool()  # type: ignore[attr-defined]  # the PostgreSQL store's pool
                acquire = pool.acquire

                async def busy(**kwargs: object) -> object:
                    pool.acquire = acquire
                    raise StoreError("database busy")

                pool.acquire = busy
                with pytest.raises(StoreError, match="busy"):
                    await db.relay_pass(SERVICE, "me", 10, Recorder())
                assert await db.relay_pass(SERVICE, "me", 10, Recorder()) is None  # the other one holds it
                assert await asyncio.wait_for(heard.get(), 10) == SERVICE
            finally:
                db.relay_stopped(SERVICE)
                await holder.rollback()
        finally:
            await other.close()
            await listener.close()


async def test_outbox_rows_keep_ids_types_and_bodies_byte_for_byte(db: StateStore) -> None:
    odd = Message("it's \"odd\" \\ ünï", "a'type", bytes(range(256)))
    assert await commit(db, odd, inbox=("gr'oup", "ev'ent"))
    sent: list[Message] = []

    async def publish(messages: list[Message]) -> None:
        sent.extend(messages)

    assert await db.relay_pass(SERVICE, "me", 10, publish) == 1
    assert sent == [odd]
    assert await db.seen("gr'oup", ["ev'ent"]) == {"ev'ent"}


async def test_outbox_rows_whose_id_and_type_hold_nul_are_stored_and_relayed_as_they_were(db: StateStore) -> None:
    nul = Message("m\x001", "test.state\x00item", b"{}")  # PostgreSQL text cannot hold U+0000
    assert await commit(db, nul, inbox=("g", "e\x001"))
    sent: list[Message] = []

    async def publish(messages: list[Message]) -> None:
        sent.extend(messages)

    assert await db.relay_pass(SERVICE, "me", 10, publish) == 1
    assert sent == [nul]
    assert await db.seen("g", ["e\x001"]) == {"e\x001"}


async def test_outbox_rows_whose_id_and_type_hold_ufffe_are_relayed_as_they_were(db: StateStore) -> None:
    """PostgreSQL stores U+0000 as U+FFFE: a genuine U+FFFE was published as U+0000 (another id)."""
    odd = [Message("m\ufffe1", "test.state\ufffeitem", b"{}"), Message("m\uffff\ufffe2", "t\uffff", b"{}"),
           Message("m\x00\ufffe3", "t\x00\uffff\x00", b"{}")]
    assert await commit(db, *odd, inbox=("g", "e\ufffe1"))
    sent: list[Message] = []

    async def publish(messages: list[Message]) -> None:
        sent.extend(messages)

    assert await db.relay_pass(SERVICE, "me", 10, publish) == 3
    assert sent == odd
    assert await db.seen("g", ["e\ufffe1", "e\x001"]) == {"e\ufffe1"}


async def test_two_relays_of_a_service_in_one_process_each_see_every_wake_up(db: StateStore) -> None:
    # The claim holder is busy publishing when a commit wakes the standby; once done, the holder
    # must not sleep its poll interval: the wake-up was its too.
    from choreograph.runtime.outbox import OutboxRelay

    gate = asyncio.Event()
    publishing = asyncio.Event()

    class Gated(Recorder):
        async def __call__(self, messages: list[Message]) -> None:
            if not self.sent:
                publishing.set()
                await gate.wait()
            await super().__call__(messages)

    class Bus:
        def __init__(self) -> None:
            self.publish = Gated()

    bus = Bus()
    holder = OutboxRelay(db, SERVICE, bus, poll_interval=3600, owner="holder")  # type: ignore[arg-type]
    standby = OutboxRelay(db, SERVICE, bus, poll_interval=3600, owner="standby")  # type: ignore[arg-type]
    await commit(db, msg(1))
    await holder.start()
    try:
        await asyncio.wait_for(publishing.wait(), 10)  # the holder's pass, stuck in publish
        await standby.start()
        await asyncio.sleep(0.2)  # the standby's first pass finds the claim taken; it waits
        await commit(db, msg(2))  # wakes the standby (no claim: it waits again), and the holder
        await asyncio.sleep(0.2)
        gate.set()
        for _ in range(100):
            if bus.publish.sent == ["m1", "m2"]:
                break
            await asyncio.sleep(0.05)
        assert bus.publish.sent == ["m1", "m2"]
    finally:
        gate.set()
        await standby.stop()
        await holder.stop()
