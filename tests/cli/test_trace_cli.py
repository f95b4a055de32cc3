"""``choreograph journal``, ``trace``, ``transactions`` and ``gateway`` as a user runs them (real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from examples.chain import OrderPlaced

from choreograph import Publisher
from choreograph.transports import open_transport

ROOT = Path(__file__).resolve().parents[2]


def env(*paths: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, paths)])}


def cli(*args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "choreograph", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env(*([extra_path] if extra_path else [])))


class Background:
    """A CLI process whose stderr is read on a thread until a ready line appears."""

    def __init__(self, args: list[str], ready: str, extra_path: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "choreograph", *args], cwd=ROOT, env=env(*([extra_path] if extra_path else [])),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self.reader.start()

    def _read(self, ready: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if ready in line:
                self.ready.set()

    def wait_ready(self) -> None:
        assert self.ready.wait(60), "".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def background() -> Iterator[list[Background]]:
    started: list[Background] = []
    yield started
    for proc in started:
        proc.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_journal_records_what_is_published_and_trace_shows_it(tmp_path: Path, background: list[Background]) -> None:
    bus, store = f"sqlite:///{tmp_path}/bus.db", f"sqlite:///{tmp_path}/journal.db"
    journal = Background(["journal", "examples.chain:app", "--broker", bus, "--store", store], "journal running")
    background.append(journal)
    journal.wait_ready()

    async def publish() -> str:
        async with open_transport(bus) as transport:
            [envelope] = await Publisher(transport, source="/gateway").publish(OrderPlaced(order_id="o-1", amount=3))
        return envelope.id

    cid = asyncio.run(publish())
    for _ in range(600):  # the journal records within a few polls
        result = cli("trace", cid, "--journal", store, "--json")
        if result.returncode == 0:
            break
        time.sleep(0.05)
    assert result.returncode == 0, result.stderr
    tx = json.loads(result.stdout)
    assert tx["status"] == "running"
    assert [(e["type"], e["service"]) for e in tx["timeline"]] == [("chain.order.placed", "gateway")]
    assert journal.stop() == 0

    tree = cli("trace", cid, "--journal", store)
    assert tree.returncode == 0
    assert cid in tree.stdout and "chain.order.placed" in tree.stdout and "+0.0 ms" in tree.stdout
    listed = cli("transactions", "--journal", store, "--status", "running", "--json")
    assert [t["correlation_id"] for t in json.loads(listed.stdout)] == [cid]


def test_a_transaction_whose_compensation_gave_up_is_shown_and_filtered_as_such(tmp_path: Path) -> None:
    from choreograph.journal import Journal
    from tests.test_journal import Cancelled, delivery_app, rolled_back_halfway

    store = f"sqlite:///{tmp_path}/journal.db"

    async def record() -> None:
        journal = Journal.from_app(delivery_app(), store)
        try:
            await journal.record(rolled_back_halfway("tx-half", Cancelled(order="o")))
        finally:
            await journal.close()

    asyncio.run(record())
    listed = cli("transactions", "--journal", store, "--status", "compensation_failed", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(t["correlation_id"], t["status"]) for t in json.loads(listed.stdout)] == [("tx-half", "compensation_failed")]
    assert json.loads(cli("transactions", "--journal", store, "--status", "compensated", "--json").stdout) == []
    tree = cli("trace", "tx-half", "--journal", store)
    assert tree.returncode == 0 and "compensation_failed" in tree.stdout


def test_trace_json_carries_each_events_trace_context(tmp_path: Path) -> None:
    """The journal stores each event's ``traceparent``/``tracestate`` (the timeout carries them):
    ``trace --json`` left them out, so a script could not link a transaction to its trace."""
    import msgspec

    from choreograph.journal import Journal
    from choreograph.runtime.records import first_envelope
    from tests.test_journal import Requested, delivery_app

    store = f"sqlite:///{tmp_path}/journal.db"
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    root = first_envelope(Requested(order="o"), source="/gateway", id="tx-traced", traceparent=traceparent)
    root = msgspec.structs.replace(root, tracestate="vendor=abc")
    untraced = first_envelope(Requested(order="o"), source="/gateway", id="tx-traced-2", correlation_id="tx-traced")

    async def record() -> None:
        journal = Journal.from_app(delivery_app(), store)
        try:
            await journal.record([root, untraced])
        finally:
            await journal.close()

    asyncio.run(record())
    result = cli("trace", "tx-traced", "--journal", store, "--json")
    assert result.returncode == 0, result.stderr
    timeline = json.loads(result.stdout)["timeline"]
    assert [(e["traceparent"], e["tracestate"]) for e in timeline] == [(traceparent, "vendor=abc"), (None, None)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["trace", "nope", "--journal", "memory://"], "no transaction 'nope'"),
        (["trace", "x", "--journal", "mongodb://x"], "unknown scheme 'mongodb'"),
        (["transactions", "--journal", "memory://", "--status", "lost"], "--status 'lost'"),
        (["gateway", "examples.chain:app"], "not a Gateway"),
        (["gateway", "examples.chain:OrderPlaced"], "is the Event class OrderPlaced, not a Gateway or an ASGI app"),
        (["journal", "examples.chain:OrderPlaced", "--broker", "memory://", "--store", "memory://"], "not an App"),
    ],
)
def test_bad_input_prints_one_clear_line_and_exits_2(args: list[str], needle: str) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in " ".join(result.stderr.split())


def test_choreograph_gateway_serves_a_gateway_object(tmp_path: Path, background: list[Background]) -> None:
    (tmp_path / "gwmod.py").write_text(textwrap.dedent(f"""
        from choreograph.gateway import Gateway, Route
        from examples.chain import OrderPlaced
        gateway = Gateway([Route("POST", "/orders", OrderPlaced)], broker="sqlite:///{tmp_path}/bus.db",
                          journal="sqlite:///{tmp_path}/journal.db")
    """))
    port = free_port()
    server = Background(["gateway", "gwmod:gateway", "--port", str(port)], "Uvicorn running on", tmp_path)
    background.append(server)
    server.wait_ready()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        accepted = client.post("/orders", json={"order_id": "o-1", "amount": 3})
        health = client.get("/healthz")
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["location"] == f"/transactions/{accepted.json()['correlation_id']}"
    assert health.json() == {"status": "ok"}
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    server.cleanup()
    assert "Application shutdown complete" in "".join(server.lines)


def recorded_journal(path: Path) -> None:
    """A journal file written by the current code, holding transaction ``tx-ro``."""
    from choreograph.journal import Journal
    from choreograph.runtime.records import first_envelope

    async def write() -> None:
        journal = Journal(f"sqlite:///{path}")
        try:
            await journal.record([first_envelope(OrderPlaced(order_id="o-ro", amount=1), source="/gateway", id="tx-ro")])
        finally:
            await journal.close()

    asyncio.run(write())


def test_transactions_reads_a_journal_in_a_folder_the_user_can_only_read(tmp_path: Path) -> None:
    """(Root ignores file modes: run as root, this test cannot tell a read-only open from another.)"""
    folder = tmp_path / "prod"
    folder.mkdir()
    recorded_journal(folder / "journal.db")
    (folder / "journal.db").chmod(0o444)
    folder.chmod(0o555)
    try:
        done = cli("transactions", "--journal", f"sqlite:///{folder / 'journal.db'}")
    finally:
        folder.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert "tx-ro" in done.stdout


def test_trace_refuses_an_older_journal_it_would_have_to_migrate_without_writing_it(tmp_path: Path) -> None:
    import contextlib
    import sqlite3

    path = tmp_path / "old.db"
    recorded_journal(path)
    with contextlib.closing(sqlite3.connect(path)) as db:  # as a journal before the counting rule left it
        db.execute("PRAGMA user_version = 0")
        db.commit()
    done = cli("trace", "tx-ro", "--journal", f"sqlite:///{path}")
    assert done.returncode != 0
    assert str(path) in done.stderr and "choreograph journal" in done.stderr and "migrate" in done.stderr
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (0,)


@pytest.mark.parametrize("command", [["trace", "tx-1"], ["transactions"], ["watch", "--once"]])
def test_an_empty_or_foreign_file_read_as_a_journal_is_named_as_such_not_as_an_older_journal(
    tmp_path: Path, command: list[str]
) -> None:
    """An empty file or another program's SQLite database was "written by an older choreograph",
    sent to the journal to be migrated: which would have made it a journal."""
    import contextlib
    import sqlite3

    empty = tmp_path / "empty.db"
    empty.touch()
    foreign = tmp_path / "foreign.db"
    with contextlib.closing(sqlite3.connect(foreign)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
        db.commit()
    for path, reason in ((empty, "an empty file, not a journal"), (foreign, "not a choreograph journal")):
        done = cli(*command, "--journal", f"sqlite:///{path}")
        assert done.returncode == 2, done.stderr
        assert reason in done.stderr and str(path) in done.stderr, done.stderr
        assert "older" not in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert empty.stat().st_size == 0  # nothing written
    with contextlib.closing(sqlite3.connect(foreign)) as db:
        assert [row[0] for row in db.execute("SELECT name FROM sqlite_master")] == ["invoices"]


def test_watch_with_a_limit_beyond_sqlites_integers_shows_every_transaction(tmp_path: Path) -> None:
    """--limit 99999999999999999999 overflowed SQLite's integers: a traceback."""
    recorded_journal(tmp_path / "journal.db")
    done = cli("watch", "--once", "--json", "--limit", "9" * 20, "--journal", f"sqlite:///{tmp_path / 'journal.db'}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["transactions"] == 1


@pytest.fixture
def read_only_volume(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A folder, and the same folder mounted read-only at another path: a read-only volume (as a
    container mounts one), whose writer works through the other. Needs root to mount."""
    writable, read_only = tmp_path / "rw", tmp_path / "ro"
    writable.mkdir()
    read_only.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(writable), str(read_only)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only volume needs root")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True, capture_output=True)
        yield writable, read_only
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


def test_transactions_reads_a_journal_on_a_read_only_volume(read_only_volume: tuple[Path, Path]) -> None:
    """There a WAL file's -shm cannot be made either, but SQLite says "unable to open database file"
    rather than "readonly": the fall-back to immutable=1 was not taken, and the command failed."""
    writable, read_only = read_only_volume
    recorded_journal(writable / "journal.db")
    done = cli("transactions", "--journal", f"sqlite:///{read_only / 'journal.db'}")
    assert done.returncode == 0, done.stderr
    assert "tx-ro" in done.stdout
    assert sorted(p.name for p in writable.iterdir()) == ["journal.db"]


def test_a_long_lived_reader_of_a_read_only_volume_sees_what_the_journal_records_later(
    read_only_volume: tuple[Path, Path],
) -> None:
    """An immutable=1 connection is a snapshot (SQLite takes the file to never change): the gateway
    and watch, reading on, kept showing the journal as it was at their first query."""
    from choreograph.journal import Journal, open_journal_store
    from choreograph.runtime.records import first_envelope

    writable, read_only = read_only_volume
    recorded_journal(writable / "journal.db")

    async def go() -> list[str]:
        reader = Journal(open_journal_store(f"sqlite:///{read_only / 'journal.db'}", read_only=True))
        writer = Journal(f"sqlite:///{writable / 'journal.db'}")
        try:
            assert [tx.correlation_id for tx in await reader.transactions()] == ["tx-ro"]
            await writer.record([first_envelope(OrderPlaced(order_id="o-2", amount=2), source="/gateway", id="tx-2")])
            return sorted(tx.correlation_id for tx in await reader.transactions())
        finally:
            await writer.close()
            await reader.close()

    assert asyncio.run(go()) == ["tx-2", "tx-ro"]


def test_trace_of_an_id_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A byte the terminal's encoding could not decode reached SQLite: a UnicodeEncodeError traceback."""
    recorded_journal(tmp_path / "journal.db")
    done = cli("trace", "tx-\udcff", "--journal", f"sqlite:///{tmp_path / 'journal.db'}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ID 'tx-\\udcff': not UTF-8 text"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
