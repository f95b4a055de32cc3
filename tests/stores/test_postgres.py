"""The inbox on PostgreSQL, and the connection/migration helper every PostgreSQL store shares."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from choreograph.errors import ConfigurationError, StoreError
from choreograph.stores import open_store
from choreograph.stores._pg import create_pool, migrate, parse_url
from choreograph.stores.base import ErrorInfo
from choreograph.stores.postgres import PostgresStore
from tests.stores._databases import fresh_postgres_url


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_postgres_url() as url:
        yield url


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def test_open_store_dispatches_postgresql_urls() -> None:
    assert isinstance(open_store("postgresql://u@h/db"), PostgresStore)
    assert isinstance(open_store("postgres://u@h/db"), PostgresStore)


def test_url_parameters_of_choreograph_are_kept_out_of_the_dsn() -> None:
    config = parse_url("postgresql://u:p@h:5/db?schema=shop&pool_max=3&sslmode=disable")
    assert (config.schema, config.pool_min, config.pool_max) == ("shop", 1, 3)
    assert config.dsn == "postgresql://u:p@h:5/db?sslmode=disable"


@pytest.mark.parametrize("url", [
    "postgresql://h/db?schema=bad-name", "postgresql://h/db?pool_max=0", "postgresql://h/db?pool_min=x",
    "mysql://h/db",
])
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_url(url)


async def test_the_inbox_reports_only_marked_ids_per_group(store: PostgresStore) -> None:
    await store.mark("g", ["a", "b"])
    await store.mark("g", ["a"])  # marking twice is harmless
    assert await store.seen("g", ["a", "b", "c"]) == {"a", "b"}
    assert await store.seen("other", ["a"]) == set()
    assert await store.seen("g", []) == set()


async def test_the_first_failure_is_kept_until_marked_or_cleared(store: PostgresStore) -> None:
    first = await store.record_failure("g", "e", ErrorInfo("E", "first"), 10.0)
    again = await store.record_failure("g", "e", ErrorInfo("E", "second"), 20.0)
    assert first == again == (ErrorInfo("E", "first"), 10.0)
    await store.mark("g", ["e"])
    assert await store.record_failure("g", "e", ErrorInfo("E", "third"), 30.0) == (ErrorInfo("E", "third"), 30.0)
    await store.clear_failures("g", ["e"])
    assert await store.record_failure("g", "e", ErrorInfo("E", "fourth"), 40.0) == (ErrorInfo("E", "fourth"), 40.0)


async def test_expire_drops_old_inbox_entries(store: PostgresStore) -> None:
    await store.mark("g", ["a"])
    assert await store.expire(0.0) == 0
    assert await store.expire(float("inf")) == 1
    assert await store.seen("g", ["a"]) == set()


async def test_tables_live_in_the_schema_of_the_url(store: PostgresStore, url: str) -> None:
    conn = await asyncpg.connect(parse_url(url).dsn)
    try:
        tables = {r[0] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", parse_url(url).schema
        )}
    finally:
        await conn.close()
    assert {"choreograph_inbox", "choreograph_failures", "choreograph_migrations"} <= tables


async def test_migrations_run_once_and_a_new_step_is_applied_on_the_next_open(url: str) -> None:
    config = parse_url(url)
    pool = await create_pool(config)
    try:
        steps = ["CREATE TABLE t1 (a int)"]
        assert await migrate(pool, config, "demo", steps) == 1
        assert await migrate(pool, config, "demo", steps) == 0
        assert await migrate(pool, config, "demo", [*steps, "CREATE TABLE t2 (b int)"]) == 1
        assert await pool.fetchval("SELECT count(*) FROM choreograph_migrations WHERE component = 'demo'") == 2
    finally:
        await pool.close()


async def test_an_unreachable_server_is_a_store_error() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(StoreError):
        await store.open()


async def test_using_a_closed_store_is_a_store_error(url: str) -> None:
    store = PostgresStore(url)
    with pytest.raises(StoreError, match="not open"):
        await store.seen("g", ["a"])


async def pooled_store(kind: str, url: str) -> Any:
    """A PostgreSQL store of ``kind`` on ``url``, not open: ``inbox``, ``journal``, ``journal
    read-only`` (on a journal made first: it opens only one that is there) or ``joins``."""
    from choreograph._journal_postgres import PostgresJournalStore
    from choreograph.stores.joins_postgres import PostgresJoinStore

    if kind == "inbox":
        return PostgresStore(url)
    if kind == "joins":
        return PostgresJoinStore(url)
    store = PostgresJournalStore(url)
    if kind == "journal read-only":
        await store.open()
        await store.close()
        store.read_only = True
    return store


@pytest.mark.parametrize("kind", ["inbox", "journal", "journal read-only", "joins"])
async def test_an_open_that_finishes_after_close_closes_its_pool(
    url: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close()`` while an open was under way found no pool to close; the open then installed
    its pool on the store the caller had closed, its connections open, nobody left to close it."""
    import asyncio

    from choreograph.stores import _pg

    store = await pooled_store(kind, url)
    created, go_on = asyncio.Event(), asyncio.Event()
    pools: list[asyncpg.Pool] = []

    async def held_create_pool(*args: object, **kwargs: object) -> asyncpg.Pool:
        pool = await create_pool(*args, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        created.set()
        await go_on.wait()  # close() runs here, while the open is under way
        return pool

    monkeypatch.setattr(_pg, "create_pool", held_create_pool)
    opening = asyncio.ensure_future(store.open())
    try:
        await asyncio.wait_for(created.wait(), 15)
        await store.close()
        go_on.set()
        with pytest.raises(StoreError, match="closed while it was opening"):
            await opening
        [pool] = pools
        assert pool.is_closing()
        assert (store.pool if isinstance(store, PostgresStore) else store._pool) is None
    finally:
        go_on.set()
        await asyncio.gather(opening, return_exceptions=True)
        for pool in pools:
            await pool.close()


@pytest.mark.parametrize("kind", ["inbox", "journal", "journal read-only", "joins"])
async def test_two_opens_at_once_keep_one_pool_and_close_the_other(
    url: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both found no pool and made one; the later replaced the earlier, which ``close()`` never
    closed (its connections open until the process ended)."""
    import asyncio

    from choreograph.stores import _pg

    store = await pooled_store(kind, url)
    both_created, go_on = asyncio.Event(), asyncio.Event()
    pools: list[asyncpg.Pool] = []

    async def held_create_pool(*args: object, **kwargs: object) -> asyncpg.Pool:
        pool = await create_pool(*args, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        if len(pools) == 2:
            both_created.set()
        await go_on.wait()  # both opens are under way
        return pool

    monkeypatch.setattr(_pg, "create_pool", held_create_pool)
    opens = [asyncio.ensure_future(store.open()) for _ in range(2)]
    try:
        await asyncio.wait_for(both_created.wait(), 15)
        go_on.set()
        await asyncio.gather(*opens)
        await store.close()
        assert [pool.is_closing() for pool in pools] == [True, True]
    finally:
        go_on.set()
        await asyncio.gather(*opens, return_exceptions=True)
        for pool in pools:
            await pool.close()


def test_stored_text_escaping_is_reversible_and_keeps_what_older_versions_wrote() -> None:
    from choreograph.stores.postgres import text_in, text_out

    for value in ["", "plain", "a\x00b", "\ufffe", "\uffff", "\uffff\ufffe", "\x00\ufffe\uffff\x00", "\ufffe\ufffe"]:
        stored = text_in(value)
        assert "\x00" not in stored and text_out(stored) == value
    assert len({text_in(v) for v in ["a\x00", "a\ufffe", "a\uffff", "a\uffff\ufffe", "a\uffff\x00"]}) == 5
    assert text_in("a\x00b") == "a\ufffeb"  # as before: inbox records of such ids still match
    assert text_out("a\ufffeb") == "a\x00b" and text_out("a\uffffb") == "a\uffffb"  # rows written before
