"""Opening SQLite files: processes opening one new file at the same moment all succeed (no
'database is locked'); a folder that cannot be created is a ConfigurationError naming it."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from choreograph._journal_store import open_journal_store
from choreograph._sqlite import connect_wal
from choreograph.errors import ConfigurationError
from choreograph.stores import open_store
from choreograph.stores.joins_base import open_join_store
from choreograph.stores.state import open_database
from choreograph.transports import open_transport

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY); CREATE INDEX IF NOT EXISTS t_k ON t (k);"


def _open(path: str, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:  # type: ignore[name-defined]
    barrier.wait()
    try:
        db = connect_wal(path, timeout=20, schema=SCHEMA)
        db.execute("INSERT OR IGNORE INTO t VALUES ('x')")
        db.close()
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts
        results.put(repr(exc))


def test_many_processes_opening_a_new_file_together_all_get_a_wal_connection(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    outcomes: list[str] = []
    for round_ in range(10):
        path = str(tmp_path / f"new-{round_}.db")
        barrier = ctx.Barrier(6)
        results = ctx.Queue()
        procs = [ctx.Process(target=_open, args=(path, barrier, results)) for _ in range(6)]
        for proc in procs:
            proc.start()
        outcomes += [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        results.close()
        results.join_thread()
    assert outcomes == ["ok"] * 60  # without the retry about 1 in 20 opens fails here


@pytest.mark.parametrize(
    "opener",
    [open_transport, open_store, open_database, open_join_store, open_journal_store],
    ids=["transport", "inbox-store", "service-database", "join-store", "journal-store"],
)
@pytest.mark.parametrize("below", ["bus.db", "deeper/bus.db"])
async def test_a_file_where_the_folder_should_be_is_a_configuration_error_naming_both(
    tmp_path: Path, opener: Callable[[str], Any], below: str
) -> None:
    (tmp_path / "data").write_text("not a folder")
    path = tmp_path / "data" / below
    opened = opener(f"sqlite:///{path}")
    try:
        with pytest.raises(ConfigurationError) as raised:
            await (opened.connect() if hasattr(opened, "connect") else opened.open())
    finally:
        with contextlib.suppress(Exception):
            await opened.close()
    assert str(raised.value) == (
        f"SQLite database {str(path)!r}: cannot create its folder {str(path.parent)!r}: "
        f"{str(tmp_path / 'data')!r} is a file, not a folder"
    )


def test_a_folder_the_os_refuses_to_create_is_a_configuration_error_with_the_os_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:  # what a read-only parent does (tests run as root)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    path = tmp_path / "locked" / "bus.db"
    with pytest.raises(ConfigurationError) as raised:
        connect_wal(str(path))
    assert str(raised.value) == (
        f"SQLite database {str(path)!r}: cannot create its folder {str(path.parent)!r}: Permission denied"
    )
