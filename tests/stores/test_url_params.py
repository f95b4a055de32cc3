"""Store URL query parameters given twice are refused, naming the parameter (as broker URLs are); a
SQLite store that reads none refuses any."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from choreograph._gateway_idempotency import open_idempotency_store
from choreograph._journal_store import open_journal_store
from choreograph.errors import ConfigurationError
from choreograph.stores import open_store
from choreograph.stores.joins_base import open_join_store
from choreograph.stores.state import open_database

PG = "postgresql://postgres:s3cret@127.0.0.1:5432/test"


@pytest.mark.parametrize("opener", [open_database, open_store, open_journal_store, open_join_store])
@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("schema=a&schema=b", "schema"),  # the tables of one schema, checked; of another, used
        ("pool_max=5&pool_min=1&pool_max=1", "pool_max"),
        ("sslmode=require&sslmode=disable", "sslmode"),  # asyncpg's own: it may read the other one
        ("password=x&password=y", "password"),
    ],
)
def test_a_postgres_parameter_given_twice_is_refused_naming_it(
    opener: Callable[[str], Any], query: str, name: str
) -> None:
    """``dict(parse_qsl(...))`` kept the last value without a word."""
    with pytest.raises(ConfigurationError, match=f"parameter '{name}' is given more than once") as caught:
        opener(f"{PG}?{query}")
    for secret in ("s3cret", "password=x", "password=y"):
        assert secret not in str(caught.value)


@pytest.mark.parametrize(
    ("query", "name"),
    [("synchronous=FULL&synchronous=NORMAL", "synchronous"), ("relay_lease=5&relay_lease=0.1", "relay_lease")],
)
def test_a_sqlite_database_parameter_given_twice_is_refused_naming_it(tmp_path: Path, query: str, name: str) -> None:
    """``synchronous=FULL&synchronous=NORMAL`` ran with NORMAL's durability."""
    with pytest.raises(ConfigurationError, match=f"parameter '{name}' is given more than once"):
        open_database(f"sqlite:///{tmp_path}/svc.db?{query}")


def test_parameters_given_once_each_are_taken(tmp_path: Path) -> None:
    store = open_database(f"sqlite:///{tmp_path}/svc.db?synchronous=FULL&relay_lease=5")
    assert (store.synchronous, store.relay_lease) == ("FULL", 5.0)  # type: ignore[attr-defined]
    assert open_database(f"{PG}?schema=a&pool_max=3&sslmode=disable").config.schema == "a"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("opener", "what"),
    [
        (open_store, "inbox"),
        (open_journal_store, "journal"),
        (open_join_store, "join"),
        (open_idempotency_store, "idempotency"),
    ],
)
@pytest.mark.parametrize(
    ("query", "names"),
    [("synchronous=FULL", "synchronous"), ("schema=a&schema=b", "schema"), ("prefx=x&lease=3", "lease, prefx")],
)
def test_a_sqlite_store_that_reads_no_parameter_refuses_one_naming_it(
    tmp_path: Path, opener: Callable[[str], Any], what: str, query: str, names: str
) -> None:
    """They were ignored without a word: an inbox given ``?synchronous=FULL`` ran with NORMAL."""
    with pytest.raises(ConfigurationError, match=f"unknown parameter\\(s\\) {names}; a sqlite:// {what} store takes none"):
        opener(f"sqlite:///{tmp_path}/{what}.db?{query}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opener", [open_database, open_store, open_journal_store, open_join_store])
@pytest.mark.parametrize("netloc", ["127.0.0.1:abc", "127.0.0.1:99999", "u:pa/ss@127.0.0.1", "a:5432,b:x"])
def test_a_postgres_port_that_is_not_a_number_is_refused_without_quoting_the_url(
    opener: Callable[[str], Any], netloc: str
) -> None:
    """asyncpg's ``int()`` of it was a ``ValueError`` with a traceback, from every command taking a store URL."""
    with pytest.raises(ConfigurationError, match="the port is not a number from 0 to 65535") as caught:
        opener(f"postgresql://{netloc}/db")
    assert "pa/ss" not in str(caught.value)


def test_postgres_hosts_with_and_without_ports_are_taken() -> None:
    config = open_database("postgresql://u@a:5432,b,[::1]:5433/db").config  # type: ignore[attr-defined]
    assert config.dsn == "postgresql://u@a:5432,b,[::1]:5433/db"
