"""Processes opening one new SQLite file at the same moment all succeed (no 'database is locked')."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from choreograph._sqlite import connect_wal

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
