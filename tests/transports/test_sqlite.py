"""SQLite transport specifics: real OS processes on one file, kill -9, URLs, housekeeping.

The contract itself is asserted by tests/conformance (which runs on sqlite too).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from choreograph.errors import ConfigurationError, TransportError
from choreograph.transports import Message, open_transport
from choreograph.transports._sqlite_consumer import SQLiteDelivery, SQLiteSubscription
from choreograph.transports.sqlite import SQLiteTransport
from tests._waiting import until
from tests.transports import _second_call as second_call

WORKER = str(Path(__file__).with_name("_sqlite_worker.py"))
ROOT = str(Path(__file__).parents[2])
TYPE = "test.work"  # the worker's type
WAIT = 30.0


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "bus.db")


def url_of(path: str, **params: object) -> str:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[str]]]:
    """Start worker processes; any still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def start(started: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, WORKER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    started.append(process)
    return process


async def readline(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), WAIT)
    if not line:
        assert process.stderr is not None
        raise AssertionError(f"worker exited: {process.wait()} {process.stderr.read()}")
    return line.strip()


@pytest.fixture
async def bus(path: str) -> AsyncIterator[SQLiteTransport]:
    async with SQLiteTransport(url_of(path, lease=2)) as transport:
        yield transport


# -- several processes on one file --------------------------------------------------------


@pytest.mark.slow
async def test_two_processes_compete_on_one_file_without_duplicates(
    path: str, bus: SQLiteTransport, spawn: list[subprocess.Popen[str]]
) -> None:
    workers = [start(spawn, url_of(path), "consume") for _ in range(2)]
    for worker in workers:
        assert await readline(worker) == "ready"
    total = 3000
    for first in range(0, total, 100):
        await bus.publish([Message(f"m{n}", TYPE, b"x") for n in range(first, first + 100)])
    results = [json.loads(await readline(worker)) for worker in workers]

    processed = [mid for result in results for mid in result]
    assert sorted(processed) == sorted(f"m{n}" for n in range(total))  # none lost, none twice
    assert all(results), "both processes took part"


@pytest.mark.slow
async def test_deliveries_of_a_killed_process_go_to_another_after_the_lease(
    path: str, bus: SQLiteTransport, spawn: list[subprocess.Popen[str]]
) -> None:
    survivor = await bus.subscribe("workers", [TYPE])
    await bus.publish([Message(f"m{n}", TYPE, b"x") for n in range(5)])
    victim = start(spawn, url_of(path, lease=1), "hold", "3")
    held = json.loads(await readline(victim))
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()

    got = []
    while len(got) < 5:
        batch = await survivor.fetch(5, timeout=WAIT)
        assert batch, f"only {len(got)} of 5 delivered"
        got.extend(batch)
    attempts = {d.message.id: d.attempt for d in got}
    assert sorted(attempts) == [f"m{n}" for n in range(5)]
    assert {mid: attempts[mid] for mid in held} == {mid: 2 for mid in held}
    assert all(attempts[mid] == 1 for mid in attempts if mid not in held)


@pytest.mark.slow
async def test_the_file_keeps_pending_messages_after_every_process_exits(
    path: str, spawn: list[subprocess.Popen[str]]
) -> None:
    publisher = start(spawn, url_of(path), "publish", "20")
    assert await asyncio.to_thread(publisher.wait, WAIT) == 0

    async with SQLiteTransport(url_of(path)) as reopened:
        subscription = await reopened.subscribe("g", [TYPE])
        got = await subscription.fetch(100, timeout=WAIT)
    assert [(d.message.id, d.message.body, d.attempt) for d in got] == [
        (f"m{n}", b"%d" % n, 1) for n in range(20)
    ]


# -- URLs and configuration -----------------------------------------------------------------


def test_three_slashes_are_relative_and_four_are_absolute() -> None:
    assert SQLiteTransport("sqlite:///var/bus.db")._config.path == "var/bus.db"
    assert SQLiteTransport("sqlite:////srv/bus.db")._config.path == "/srv/bus.db"


def test_url_parameters_set_lease_and_synchronous() -> None:
    transport = open_transport("sqlite:///bus.db?lease=2.5&synchronous=full")
    assert isinstance(transport, SQLiteTransport)
    assert transport.lease == 2.5
    assert transport._config.synchronous == "FULL"
    assert SQLiteTransport("sqlite:///bus.db")._config.synchronous == "NORMAL"


def test_the_lease_defaults_to_the_documented_thirty_seconds() -> None:
    """The module docstring promises ``lease`` 30 s when the URL does not say: deployments rely
    on it (a handler running longer than the lease without touches runs twice)."""
    assert SQLiteTransport("sqlite:///bus.db").lease == 30.0
    documented = " ".join((sys.modules[SQLiteTransport.__module__].__doc__ or "").split())
    assert "``lease`` (ack deadline in seconds, default 30)" in documented


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite://host/bus.db",
        "sqlite:///:memory:",
        "sqlite:///bus.db?lease=0",
        "sqlite:///bus.db?lease=soon",
        "sqlite:///bus.db?synchronous=SOMETIMES",
        "sqlite:///bus.db?leese=3",
    ],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        SQLiteTransport(url)


async def test_the_file_is_in_wal_mode_with_the_asked_synchronous_level(path: str) -> None:
    async with SQLiteTransport(url_of(path, synchronous="FULL")) as bus:
        assert bus._conn is not None
        assert bus._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert bus._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_the_directory_of_the_file_is_created(tmp_path: Path) -> None:
    async with SQLiteTransport(f"sqlite:///{tmp_path}/var/deep/bus.db"):
        pass
    assert (tmp_path / "var" / "deep" / "bus.db").exists()


# -- housekeeping -----------------------------------------------------------------------------


def _count(path: str, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def test_a_message_is_deleted_once_every_group_has_settled_it(path: str, bus: SQLiteTransport) -> None:
    first, second = await bus.subscribe("first", [TYPE]), await bus.subscribe("second", [TYPE])
    await bus.publish([Message("m1", TYPE, b"x")])
    await (await first.fetch(1))[0].ack()
    assert _count(path, "messages") == 1
    await (await second.fetch(1))[0].dead_letter({"reason": "rejected"})
    assert (_count(path, "messages"), _count(path, "deliveries")) == (0, 0)
    assert _count(path, "dead_letters") == 1


async def test_a_file_from_before_one_letter_per_id_keeps_the_latest_letter_of_each_id(path: str) -> None:
    """Such a file kept a row per failed copy of a message published twice; opening it
    deletes the older rows and adds the unique (grp, id) index."""
    async with SQLiteTransport(url_of(path)) as transport:
        subscription = await transport.subscribe("g", [TYPE])
        await transport.publish([Message("m1", TYPE, b"x"), Message("m2", TYPE, b"y")])
        for delivery in await subscription.fetch(2):
            await delivery.dead_letter({"reason": "first"})
    with sqlite3.connect(path) as conn:  # back to the old schema, and a second copy's letter
        conn.execute("DROP INDEX IF EXISTS dead_letters_one_per_id")
        conn.execute("CREATE INDEX IF NOT EXISTS dead_letters_grp ON dead_letters (grp, id)")
        conn.execute(
            "INSERT INTO dead_letters (grp, id, type, body, record, dead_at) "
            "SELECT grp, id, type, body, ?, dead_at + 1 FROM dead_letters WHERE id = 'm1'",
            (json.dumps({"reason": "second"}),),
        )
    async with SQLiteTransport(url_of(path)) as transport:
        letters = await transport.dead_letters("g")
        assert sorted((letter.message.id, letter.record["reason"]) for letter in letters) == [
            ("m1", "second"),
            ("m2", "first"),
        ]
        assert await transport.replay("g", ["m1"]) == 1
    with sqlite3.connect(path) as conn:
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "dead_letters_one_per_id" in indexes and "dead_letters_grp" not in indexes


async def test_a_message_no_group_wants_is_not_stored(path: str, bus: SQLiteTransport) -> None:
    await bus.subscribe("g", ["some.other.type"])
    await bus.publish([Message("m1", TYPE, b"x")])
    assert _count(path, "messages") == 0


def remove_database(path: str | Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_bus_file_removed_or_replaced_under_an_open_transport_fails_its_writes_and_ping(
    path: str, bus: SQLiteTransport, how: str
) -> None:
    """SQLite goes on committing to a deleted file: a publish "succeeded" into a file no process
    will open again (the gateway answered 202 for an event that was gone). Now it fails, loudly."""
    await bus.subscribe("g", [TYPE])
    await bus.publish([Message("m1", TYPE, b"x")])
    remove_database(path)
    if how == "replaced":
        async with SQLiteTransport(url_of(path)) as other:
            await other.subscribe("g", [TYPE])
    with pytest.raises(TransportError, match="database file"):
        await bus.publish([Message("m2", TYPE, b"x")])
    with pytest.raises(TransportError, match="database file"):
        await bus.ping()
    if how == "replaced":
        assert _count(path, "messages") == 0


async def test_a_group_subscribed_again_keeps_its_earlier_types(bus: SQLiteTransport) -> None:
    """Replicas of different versions may subscribe one group: a binding widens, never narrows."""
    await bus.subscribe("g", ["a"])
    subscription = await bus.subscribe("g", ["b"])
    await bus.publish([Message("m1", "a", b""), Message("m2", "b", b"")])
    assert [d.message.id for d in await subscription.fetch(10, timeout=WAIT)] == ["m1", "m2"]


async def test_a_cancelled_fetch_neither_loses_a_message_nor_counts_an_attempt(bus: SQLiteTransport) -> None:
    """A fetch cancelled while its claim is in flight puts the claimed rows back untouched."""
    subscription = await bus.subscribe("g", [TYPE])
    await bus.publish([Message("m1", TYPE, b"x")])
    cancelled = asyncio.ensure_future(subscription.fetch(10))
    await asyncio.sleep(0)  # the claim is queued for the next transaction
    cancelled.cancel()
    got = await subscription.fetch(10, timeout=WAIT)
    assert cancelled.cancelled()
    assert [(d.message.id, d.attempt) for d in got] == [("m1", 1)]


async def test_a_publish_in_this_process_wakes_a_waiting_fetch_without_polling(bus: SQLiteTransport) -> None:
    subscription = await bus.subscribe("g", [TYPE])
    waiting = asyncio.ensure_future(subscription.fetch(10, timeout=WAIT))
    await asyncio.sleep(0.05)
    changes = bus._changes
    await bus.publish([Message("m1", TYPE, b"x")])
    assert bus._changes > changes
    assert [d.message.id for d in await waiting] == ["m1"]


async def test_a_writer_waits_for_another_process_holding_the_lock_then_gives_up_after_busy_timeout(
    tmp_path: Path,
) -> None:
    import threading

    from choreograph.errors import TransportError
    from choreograph.transports.base import Message
    from choreograph.transports.sqlite import SQLiteTransport

    path = tmp_path / "bus.db"
    holding, release = threading.Event(), threading.Event()

    def hold(seconds: float) -> None:  # another process's writer holding the file's write lock
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        holding.set()
        release.wait(seconds)
        other.execute("COMMIT")
        other.close()

    async with SQLiteTransport(f"sqlite:///{path}?busy_timeout=5") as bus:
        sub = await bus.subscribe("g", ["t"])
        holder = threading.Thread(target=hold, args=(10,))
        holder.start()
        await asyncio.to_thread(holding.wait, 10)
        publishing = asyncio.create_task(bus.publish([Message("m1", "t", b"{}")]))
        await asyncio.sleep(0.3)
        assert not publishing.done()  # waiting for the lock, not failed
        release.set()
        await asyncio.wait_for(publishing, 10)
        holder.join()
        [delivery] = await sub.fetch(10, timeout=5)
        assert delivery.message.id == "m1"
        await delivery.ack()

    holding.clear()
    release.clear()
    async with SQLiteTransport(f"sqlite:///{path}?busy_timeout=0.2") as bus:
        holder = threading.Thread(target=hold, args=(10,))
        holder.start()
        await asyncio.to_thread(holding.wait, 10)
        try:
            with pytest.raises(TransportError, match="locked"):
                await bus.publish([Message("m2", "t", b"{}")])
        finally:
            release.set()
            holder.join()


def _fail_the_next_write(bus: SQLiteTransport, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The transport's next write raises (a disk error); later ones go through. Returns the
    list that counts the writes."""
    real = bus._submit
    writes: list[int] = []

    def failing_once(fn: Any, **options: Any) -> asyncio.Future[Any]:
        writes.append(1)
        if len(writes) == 1:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(sqlite3.OperationalError("disk I/O error"))
            return failed
        return real(fn, **options)

    monkeypatch.setattr(bus, "_submit", failing_once)
    return writes


async def test_an_ack_batch_whose_write_failed_is_acked_by_the_retry(
    path: str, bus: SQLiteTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker retries a settle step that raised: the deliveries of an ack whose write failed
    must still be unsettled (and held) then, or the retry acks nothing and they come back."""
    sub = await bus.subscribe("g", [TYPE])
    await bus.publish([Message(f"m{n}", TYPE, b"{}") for n in range(5)])
    got = await sub.fetch(5, timeout=5)
    assert len(got) == 5
    writes = _fail_the_next_write(bus, monkeypatch)
    with pytest.raises(sqlite3.OperationalError):
        await sub.ack_many(got)
    assert not any(d.settled for d in got)
    await sub.ack_many(got)  # what the worker's settle retry does
    assert len(writes) == 2 and all(d.settled for d in got)
    monkeypatch.undo()
    await asyncio.sleep(2.5)  # past the lease (2 s): an unacked message would be back
    assert await sub.fetch(10, timeout=0.5) == []
    assert _count(path, "messages") == 0


@pytest.mark.parametrize("verb", second_call.VERBS)
async def test_a_verb_whose_write_failed_is_done_by_a_second_call(
    path: str, verb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ack, retry and dead_letter leave the delivery unsettled (and held) when their write
    fails, so the worker's settle retry writes it: a retry back at once, an ack that stays, a
    dead letter stored - not the message back at the end of its lease."""
    async with SQLiteTransport(url_of(path, lease=second_call.lease_for(verb))) as bus:
        sub = await bus.subscribe("g", [TYPE])
        await bus.publish([Message("m1", TYPE, b"{}")])
        (delivery,) = await sub.fetch(1, timeout=5)
        _fail_the_next_write(bus, monkeypatch)
        assert isinstance(sub, SQLiteSubscription) and isinstance(delivery, SQLiteDelivery)
        await second_call.check_a_second_call_does_the_work(
            bus, sub, delivery, verb, sqlite3.OperationalError,
            held=lambda: sub._held.get(delivery._seq) is delivery,
        )


async def test_a_writer_cancelled_before_its_first_step_fails_its_writes_and_the_next_write_works(
    path: str,
) -> None:
    """A writer task cancelled before it ever ran (so its ``finally`` never ran either) must
    not leave its queued writes waiting for good, every later write behind it, and close()
    spinning on it."""
    from choreograph.errors import TransportClosed, TransportError

    bus = SQLiteTransport(url_of(path))
    await bus.connect()
    await bus.subscribe("g", [TYPE])
    publishing = asyncio.create_task(bus.publish([Message("m-1", TYPE, b"{}")]))
    while bus._flusher is None:
        await asyncio.sleep(0)
    bus._flusher.cancel()  # scheduled, not started: its first step gets the cancellation
    with pytest.raises(TransportError) as raised:
        await asyncio.wait_for(publishing, WAIT)
    assert not isinstance(raised.value, TransportClosed)
    await asyncio.wait_for(bus.publish([Message("m-2", TYPE, b"{}")]), WAIT)
    sub = await bus.subscribe("g", [TYPE])
    assert [d.message.id for d in await sub.fetch(10, timeout=1.0)] == ["m-2"]
    queued = bus._submit(lambda conn, now: None)
    assert bus._flusher is not None
    bus._flusher.cancel()
    await asyncio.wait_for(bus.close(), WAIT)
    with pytest.raises(TransportError):  # failed, not left waiting
        queued.result()


@pytest.mark.parametrize("write", ["commits", "fails"])
async def test_a_retry_whose_caller_is_cancelled_is_held_again_only_if_its_write_fails(
    path: str, write: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller of a retry cancelled while its write is queued: the write goes ahead. If it
    commits, the delivery is not held again - close() would hand it back at once, before its
    delay; if it fails, it is held, so close() gives it back."""
    async with SQLiteTransport(url_of(path, lease=30)) as bus:
        sub = await bus.subscribe("g", [TYPE])
        await bus.publish([Message("m1", TYPE, b"{}")])
        (delivery,) = await sub.fetch(1, timeout=5)
        assert isinstance(sub, SQLiteSubscription) and isinstance(delivery, SQLiteDelivery)
        if write == "fails":

            def failing(ops_: Any) -> Any:
                raise sqlite3.OperationalError("disk I/O error")

            monkeypatch.setattr(bus, "_transact", failing)
        retrying = asyncio.create_task(delivery.retry(30.0))
        await asyncio.sleep(0)  # its write is queued
        assert bus._flusher is not None
        retrying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await retrying
        while bus._flusher is not None:  # the write ran
            await asyncio.sleep(0.01)
        assert (sub._held.get(delivery._seq) is delivery) == (write == "fails")
        monkeypatch.undo()
        await sub.close()
        other = await bus.subscribe("g", [TYPE])
        back = await other.fetch(1, timeout=0.5)
        assert [d.message.id for d in back] == (["m1"] if write == "fails" else [])


def _fail_the_next_transaction_slowly(bus: SQLiteTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next group commit runs 0.2 s, then fails (the file was locked); later ones go through."""
    real, calls = bus._transact, []

    def transact(ops_: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.2)
            raise sqlite3.OperationalError("database is locked")
        return real(ops_)

    monkeypatch.setattr(bus, "_transact", transact)


async def _cancel_a_retry_while_its_write_runs(delivery: SQLiteDelivery) -> None:
    retrying = asyncio.create_task(delivery.retry(30.0))
    await asyncio.sleep(0.05)  # its write is running (for 0.2 s)
    retrying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await retrying


async def test_a_cancelled_retry_whose_write_fails_after_a_second_retry_was_made_does_not_undo_it(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker retries a settle step whose caller was cancelled: the first write failing
    afterwards must not hold the delivery again over the second one, which committed -
    close() would hand it back at once, before the retry's delay."""
    async with SQLiteTransport(url_of(path, lease=30)) as bus:
        sub = await bus.subscribe("g", [TYPE])
        await bus.publish([Message("m1", TYPE, b"{}")])
        (delivery,) = await sub.fetch(1, timeout=5)
        assert isinstance(sub, SQLiteSubscription) and isinstance(delivery, SQLiteDelivery)
        _fail_the_next_transaction_slowly(bus, monkeypatch)
        await _cancel_a_retry_while_its_write_runs(delivery)
        await delivery.retry(30.0)  # queued behind the failing write; commits in the next one
        assert delivery.settled and delivery._seq not in sub._held
        await sub.close()
        other = await bus.subscribe("g", [TYPE])
        assert await other.fetch(1, timeout=0.5) == []


async def test_a_cancelled_retry_whose_write_fails_after_close_goes_back_to_the_group_at_once(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() hands on only what it holds: a delivery whose cancelled retry was still being
    written is not among them, so when that write fails it goes back itself - not at the end
    of its lease."""
    async with SQLiteTransport(url_of(path, lease=30)) as bus:
        sub = await bus.subscribe("g", [TYPE])
        await bus.publish([Message("m1", TYPE, b"{}")])
        (delivery,) = await sub.fetch(1, timeout=5)
        assert isinstance(delivery, SQLiteDelivery)
        _fail_the_next_transaction_slowly(bus, monkeypatch)
        await _cancel_a_retry_while_its_write_runs(delivery)
        await sub.close()  # holds nothing now
        other = await bus.subscribe("g", [TYPE])
        back = await other.fetch(1, timeout=5)
        assert [(d.message.id, d.attempt) for d in back] == [("m1", 2)]


async def test_close_fails_the_writes_of_a_writer_that_was_cancelled_before_its_first_step(path: str) -> None:
    """close() finds the writer task done without its finally (before its done callback ran:
    here, without it) and neither spins on it nor leaves its writes waiting."""
    from choreograph.errors import TransportClosed

    bus = SQLiteTransport(url_of(path))
    await bus.connect()
    queued = bus._submit(lambda conn, now: None)
    flusher = bus._flusher
    assert flusher is not None
    flusher.remove_done_callback(bus._flusher_ended)
    flusher.cancel()
    await asyncio.sleep(0)  # the writer ends, cancelled
    assert flusher.done() and bus._flusher is flusher
    await asyncio.wait_for(bus.close(), WAIT)
    with pytest.raises(TransportClosed):
        queued.result()


async def test_a_write_interrupted_while_the_transport_is_open_is_not_reported_as_closed(path: str) -> None:
    """The writer task cancelled under an open transport: its waiters get a TransportError the
    worker retries, not TransportClosed (on which it gives up for good), and the next write works."""
    from choreograph.errors import TransportClosed, TransportError

    async with SQLiteTransport(url_of(path)) as bus:
        await bus.subscribe("g", [TYPE])
        publishing = asyncio.create_task(bus.publish([Message("m-1", TYPE, b"{}")]))
        while bus._flusher is None:
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the writer is in its executor call now
        bus._flusher.cancel()
        with pytest.raises(TransportError) as raised:
            await publishing
        assert not isinstance(raised.value, TransportClosed)
        await bus.publish([Message("m-2", TYPE, b"{}")])
        sub = await bus.subscribe("g", [TYPE])
        ids = {d.message.id for d in await sub.fetch(10, timeout=1.0)}
        assert "m-2" in ids  # m-1 may be there too: the interrupted commit can still land


async def test_close_finishes_when_a_subscriptions_release_fails_and_its_deliveries_come_back_later(
    path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """close() used to raise the failed release and stop there, leaving the connection and
    its threads open; now it logs, closes the rest, and the lease brings the delivery back."""
    bus = SQLiteTransport(url_of(path, lease=0.5))
    await bus.connect()
    sub = await bus.subscribe("g", [TYPE])
    await bus.publish([Message("m-1", TYPE, b"{}")])
    assert [d.message.id for d in await sub.fetch(10, timeout=WAIT)] == ["m-1"]
    _fail_the_next_write(bus, monkeypatch)  # the release of m-1
    await asyncio.wait_for(bus.close(), WAIT)
    assert bus._conn is None and bus._closed
    assert "returns after the lease" in caplog.text or "return after the lease" in caplog.text
    async with SQLiteTransport(url_of(path, lease=0.5)) as again:
        later = await (await again.subscribe("g", [TYPE])).fetch(10, timeout=5.0)
        assert [d.message.id for d in later] == ["m-1"]


async def test_an_idle_poller_slows_down_yet_still_wakes_a_fetch_for_another_process_commit(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polled every 2 ms for ever, an idle worker spent 3-4% of a core. After a quiet spell the
    poller doubles its pause up to the cap; a commit by another connection (another process)
    still wakes the waiting fetch, and the poller is fast again from there."""
    from choreograph.transports import sqlite as module

    pauses: list[float] = []

    class Clock:  # the module's ``time``, recording the poller's pauses
        monotonic = staticmethod(time.monotonic)
        time = staticmethod(time.time)

        @staticmethod
        def sleep(seconds: float) -> None:
            pauses.append(seconds)
            time.sleep(seconds)

    monkeypatch.setattr(module, "time", Clock)
    monkeypatch.setattr(module, "_POLL_QUIET", 0.05)
    async with SQLiteTransport(url_of(path)) as consumer, SQLiteTransport(url_of(path)) as producer:
        subscription = await consumer.subscribe("g", [TYPE])
        waiting = asyncio.ensure_future(subscription.fetch(10, timeout=WAIT))
        for _ in range(500):
            if module._POLL_IDLE_MAX in pauses:
                break
            await asyncio.sleep(0.01)
        assert pauses[0] == module._POLL_INTERVAL and module._POLL_IDLE_MAX in pauses
        slow = [p for p in pauses if p > module._POLL_INTERVAL]
        assert slow == sorted(slow)  # doubling up to the cap
        seen = len(pauses)
        await producer.publish([Message("m1", TYPE, b"x")])
        assert [d.message.id for d in await waiting] == ["m1"]
        # Noticed: back to polling fast. The poller records that pause after it woke the fetch,
        # from its own thread, which a loaded machine may not run for a while: wait for it.
        await until(lambda: module._POLL_INTERVAL in pauses[seen:])


@pytest.mark.parametrize("verb", ["ack", "retry", "dead_letter"])
async def test_a_late_ack_retry_or_dead_letter_leaves_the_redelivery_alone(path: str, verb: str) -> None:
    """The first consumer's lease ran out and the message went to a second one: a verb the
    first still sends neither settles the redelivery, delays it nor dead-letters it (the row is
    matched by its attempt, not only by its sequence)."""
    url = url_of(path, lease=0.3)
    async with SQLiteTransport(url) as a, SQLiteTransport(url) as b, SQLiteTransport(url) as c:
        first, second, third = [await bus.subscribe("g", [TYPE]) for bus in (a, b, c)]
        await a.publish([Message("m1", TYPE, b"x")])
        (late,) = await first.fetch(1, timeout=WAIT)
        (held,) = await second.fetch(1, timeout=WAIT)  # after the first one's lease
        assert (late.attempt, held.attempt) == (1, 2)
        if verb == "ack":
            await late.ack()
        elif verb == "retry":
            await late.retry(60.0)
        else:
            await late.dead_letter({"reason": "late"})
        assert await a.dead_letters("g") == []
        (again,) = await third.fetch(1, timeout=WAIT)  # the second one's lease ran out as usual
        assert again.attempt == 3


async def test_touching_a_settled_delivery_neither_brings_it_back_nor_fails(path: str) -> None:
    """A touch that comes after the delivery was settled (the worker's touch loop races its
    settle step) does nothing: it neither cuts a retry's delay short to the lease, nor fails
    once the transport is closed."""
    async with SQLiteTransport(url_of(path, lease=0.3)) as bus:
        subscription = await bus.subscribe("g", [TYPE])
        await bus.publish([Message("m1", TYPE, b"x"), Message("m2", TYPE, b"y")])
        retried, acked = await subscription.fetch(2, timeout=WAIT)
        await retried.retry(60.0)
        await acked.ack()
        await retried.touch()
        await acked.touch()
        assert await subscription.fetch(10, timeout=1.0) == []  # three leases: the retry still waits
    await retried.touch()
    await acked.touch()
