"""Service databases for tests: a SQLite file, or a private schema in the local PostgreSQL.

``database_url`` is parametrised over both backends; the PostgreSQL one skips (or fails
under CI) when the server is unreachable, and drops its schema afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
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


def sqlite_url(tmp_path: Path, name: str = "state.db", **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"sqlite:///{tmp_path / name}" + (f"?{query}" if query else "")


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh service database URL on each backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path, relay_lease="1")
        return
    schema = fresh_schema()
    url = postgres_url(schema)
    try:
        yield url
    finally:
        await drop_schema(url, schema)


@pytest.fixture
async def postgres_database_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL service database URL (for behaviour only PostgreSQL has)."""
    schema = fresh_schema()
    url = postgres_url(schema)
    try:
        yield url
    finally:
        await drop_schema(url, schema)
