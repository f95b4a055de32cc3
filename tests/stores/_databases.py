"""Service databases for tests: a SQLite file, or a private schema in the local PostgreSQL.

``database_url`` is parametrised over both backends; the PostgreSQL one skips (or fails
under CI) when the server is unreachable, and drops its schema afterwards. ``fresh_postgres_url`` and
``backend_url`` give the same databases to fixtures that build their own store on them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests._brokers import require_broker


def postgres_url(schema: str) -> str:
    """The test PostgreSQL URL with ``schema`` as choreograph's schema."""
    base = require_broker("postgres")
    return f"{base}{'&' if urlsplit(base).query else '?'}schema={schema}"


def fresh_schema() -> str:
    return f"cg_test_{uuid.uuid4().hex[:12]}"


async def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    from choreograph.stores._pg import parse_url

    conn = await asyncpg.connect(parse_url(url).dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_postgres_url() -> AsyncIterator[str]:
    """The test PostgreSQL URL on a fresh schema, dropped on leaving."""
    schema = fresh_schema()
    url = postgres_url(schema)
    try:
        yield url
    finally:
        await drop_schema(url, schema)


@asynccontextmanager
async def backend_url(kind: str, tmp_path: Path, name: str) -> AsyncIterator[str]:
    """A fresh database URL of ``kind`` (``memory``, ``sqlite`` as ``tmp_path / name``, or ``postgres``)."""
    if kind == "postgres":
        async with fresh_postgres_url() as url:
            yield url
    else:
        yield "memory://" if kind == "memory" else f"sqlite:///{tmp_path / name}"


def sqlite_url(tmp_path: Path, name: str = "state.db", **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"sqlite:///{tmp_path / name}" + (f"?{query}" if query else "")


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh service database URL on each backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path, relay_lease="1")
        return
    async with fresh_postgres_url() as url:
        yield url


@pytest.fixture
async def postgres_database_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL service database URL (for behaviour only PostgreSQL has)."""
    async with fresh_postgres_url() as url:
        yield url
