"""``choreograph watch``: the snapshot of traffic per edge and transactions by status, read from the journal store.

A small delivery flow runs on the memory bus in virtual time with the journal recording
into each store (memory, SQLite, PostgreSQL in a private schema: skipped when unreachable,
failed under CI); the snapshot is read back from the store. The CLI runs as a real process
against a SQLite journal file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console

from choreograph import FAILED, App, Event, Failure, Publisher, Reject, Service, Worker
from choreograph._journal_model import JournalEntry, TransactionSummary
from choreograph._journal_store import Activity, EdgeCount, JournalStore, open_journal_store
from choreograph._watch_model import EdgeTraffic, Snapshot, build_snapshot, read_snapshot
from choreograph.cli._watch_view import render
from choreograph.errors import ConfigurationError
from choreograph.flow import build
from choreograph.journal import Journal
from choreograph.testing import MemoryTransport, VirtualClock, settled
from tests._procs import stop
from tests.stores._databases import backend_url
from tests.test_journal import Cancelled, Charged, Declined, Delivered, Requested, charge, rolled_back_halfway

ROOT = Path(__file__).resolve().parents[1]


class Rerouted(Event, type="test.watch.rerouted"):
    order: str


def watch_app() -> App:
    """payment charges, declines, stalls or rejects; drone delivers or crashes (refunded); drone never reroutes."""
    payment, drone = Service("payment"), Service("drone")

    payment.on(Requested)(charge)

    @drone.on(Charged)
    async def fly(charged: Charged) -> Delivered | Rerouted:
        if charged.mode == "crash":
            raise Reject("drone lost")
        return Delivered(order=charged.order)

    @payment.on_failure(Charged)
    async def refund(failure: Failure) -> Cancelled:
        return Cancelled(order="refunded")

    return App(
        "watched",
        [payment, drone],
        ingress=[Requested],
        terminal={Delivered: "completed", Cancelled: "failed", Declined: "failed"},
    )


app = watch_app()  # for the CLI: `choreograph watch tests.test_watch:app`

MODES = ("ok", "ok", "decline", "crash", "stall", "nobody")
REQUESTED, CHARGED, DELIVERED = Requested.event_type(), Charged.event_type(), Delivered.event_type()


async def run_modes(store: str | JournalStore, clock: VirtualClock, modes: tuple[str, ...] = MODES) -> dict[str, str]:
    """Run one request per mode through the app with the journal recording; their correlation ids by mode
    (the last one of a repeated mode)."""
    bus = MemoryTransport(clock=clock)
    flow = watch_app()
    ids: dict[str, str] = {}
    async with Journal.from_app(flow, store, transport=bus, stuck_after=60, scan_interval=3600):
        async with Worker(flow.services, bus):
            for n, mode in enumerate(modes):
                [env] = await Publisher(bus, source="/gateway").publish(Requested(order=f"o-{n}", mode=mode))
                ids[mode] = env.id
                clock.advance(0.001)  # one after the other, as the newest-first order reads them
            await settled(bus)
    if isinstance(store, JournalStore):
        await store.open()  # the journal closed the store it was given when it stopped
    return ids


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JournalStore]:
    async with backend_url(request.param, tmp_path, "journal.db") as url:
        opened = open_journal_store(url)
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def counts(snap: Snapshot) -> dict[tuple[str | None, str, str | None], int]:
    return {(e.service, e.type, e.failed_type): e.count for e in snap.edges}


def edge(snap: Snapshot, service: str | None, type_: str) -> EdgeTraffic:
    [found] = [e for e in snap.edges if e.service == service and e.type == type_]
    return found


# -- the store's activity query ---------------------------------------------------------


def entry(event_id: str, cid: str, type_: str, service: str, recorded_at: float, **extra: object) -> JournalEntry:
    return JournalEntry(
        event_id=event_id, correlation_id=cid, type=type_, source=f"/choreograph/{service}", service=service,
        kind=extra.pop("kind", "event"),  # type: ignore[arg-type]
        at=recorded_at, recorded_at=recorded_at, **extra,  # type: ignore[arg-type]
    )


async def test_activity_counts_entries_recorded_since_a_time_and_transactions_by_status(store: JournalStore) -> None:
    await store.record([
        entry("a1", "a", "t.start", "s1", 100.0),
        entry("a2", "a", "t.done", "s2", 110.0, kind="completed"),
        entry("b1", "b", "t.start", "s1", 120.0, deadline=130.0),
        entry("c1", "c", FAILED, "s2", 125.0, kind="failure", failed_type="t.start", compensable=False),
    ], stuck_after=1000)

    late = await store.activity(since=110.0, now=200.0)  # the boundary entry counts
    assert sorted((e.service, e.type, e.kind, e.failed_type, e.count, e.last_at) for e in late.edges) == [
        ("s1", "t.start", "event", None, 1, 120.0),
        ("s2", FAILED, "failure", "t.start", 1, 125.0),
        ("s2", "t.done", "completed", None, 1, 110.0),
    ]
    assert late.statuses == {"running": 0, "completed": 1, "failed": 1, "compensated": 0, "compensation_failed": 0, "stuck": 1}

    early = await store.activity(since=0.0, now=125.0)
    assert {(e.service, e.type): (e.count, e.last_at) for e in early.edges}[("s1", "t.start")] == (2, 120.0)
    assert early.statuses["running"] == 1 and early.statuses["stuck"] == 0
    assert (await store.activity(since=126.0, now=125.0)).edges == []


async def test_activity_of_an_empty_journal_counts_zero_of_every_status(store: JournalStore) -> None:
    found = await store.activity(since=0.0, now=0.0)
    assert found.edges == []
    assert found.statuses == {"running": 0, "completed": 0, "failed": 0, "compensated": 0, "compensation_failed": 0, "stuck": 0}


# -- the snapshot -----------------------------------------------------------------------


async def test_the_snapshot_counts_each_service_to_event_type_edge_in_the_window(
    store: JournalStore, clock: VirtualClock
) -> None:
    await run_modes(store, clock)
    snap = await read_snapshot(store, now=clock.time(), window=60, graph=build(watch_app()))
    assert counts(snap) == {
        ("gateway", REQUESTED, None): 6,
        ("payment", CHARGED, None): 3,
        ("payment", Declined.event_type(), None): 1,
        ("payment", FAILED, REQUESTED): 1,
        ("payment", Cancelled.event_type(), None): 1,
        ("drone", DELIVERED, None): 2,
        ("drone", FAILED, CHARGED): 1,
        ("drone", Rerouted.event_type(), None): 0,
    }
    assert edge(snap, "drone", DELIVERED).rate == pytest.approx(2 / 60)
    assert edge(snap, "drone", DELIVERED).last_at is not None
    assert snap.events_in_window == 15 and snap.app == "watched"


async def test_graph_edges_without_traffic_are_idle_and_terminal_types_are_marked(
    store: JournalStore, clock: VirtualClock
) -> None:
    await run_modes(store, clock, modes=("ok",))
    snap = await read_snapshot(store, now=clock.time(), window=60, graph=build(watch_app()))
    assert sorted((e.service, e.type) for e in snap.edges if e.idle) == [
        ("drone", Rerouted.event_type()), ("payment", Cancelled.event_type()), ("payment", Declined.event_type()),
    ]
    assert edge(snap, "drone", DELIVERED).terminal == "completed"
    assert edge(snap, "payment", Declined.event_type()).terminal == "failed"
    assert edge(snap, "payment", CHARGED).terminal is None
    assert all(e.declared for e in snap.edges)


async def test_traffic_the_graph_does_not_draw_is_flagged_and_runtime_events_are_not_judged(
    store: JournalStore, clock: VirtualClock
) -> None:
    await run_modes(store, clock, modes=("crash",))
    bus = MemoryTransport(clock=clock)
    async with Journal.from_app(watch_app(), store, transport=bus, scan_interval=3600):
        await Publisher(bus, source="/choreograph/drone").publish(Declined(order="x"))
        await settled(bus)
    await store.open()
    snap = await read_snapshot(store, now=clock.time(), window=60, graph=build(watch_app()))
    assert edge(snap, "drone", Declined.event_type()).declared is False
    assert edge(snap, "drone", FAILED).declared is None
    assert edge(snap, "gateway", REQUESTED).declared is True  # ingress: any source may publish it


def test_a_service_publishing_under_a_source_of_its_own_is_matched_to_its_graph_edges() -> None:
    """The journal names a publisher after its CloudEvents source (``Service(source=...)``): traffic
    from ``urn:shop:payment`` is payment's, not "not in the graph" beside payment's edges shown idle."""
    payment, drone = Service("payment", source="urn:shop:payment"), Service("drone", source="/fleet/drone")

    @payment.on(Requested)
    async def take(request: Requested) -> Charged | Declined: ...

    @drone.on(Charged)
    async def fly(charged: Charged) -> Delivered: ...

    graph = build(App("sourced", [payment, drone], ingress=[Requested], terminal={Delivered: "completed"}))
    now = 1000.0
    activity = Activity(
        edges=[EdgeCount("urn:shop:payment", CHARGED, "event", None, 3, now),
               EdgeCount("fleet/drone", DELIVERED, "completed", None, 2, now),
               EdgeCount("fleet/drone", FAILED, "failure", CHARGED, 1, now)],
        statuses={"completed": 2},
    )
    summary = TransactionSummary(correlation_id="tx", first_seen=now, last_seen=now, started_at=now, deadline=now + 60)
    last = {"tx": entry("e", "tx", DELIVERED, "drone", now)}
    last["tx"] = dataclasses.replace(last["tx"], service="fleet/drone")
    snap = build_snapshot(activity, [summary], [], last, journal="memory://", now=now, window=60, graph=graph)
    assert counts(snap) == {
        (None, REQUESTED, None): 0, ("payment", CHARGED, None): 3, ("payment", Declined.event_type(), None): 0,
        ("drone", DELIVERED, None): 2, ("drone", FAILED, CHARGED): 1,
    }
    assert edge(snap, "payment", CHARGED).declared is True and edge(snap, "drone", DELIVERED).declared is True
    assert [e.type for e in snap.edges if e.idle] == [REQUESTED, Declined.event_type()]
    assert snap.newest[0].last_service == "drone"


async def test_an_ingress_type_nobody_published_in_the_window_is_listed_as_idle(
    store: JournalStore, clock: VirtualClock
) -> None:
    await run_modes(store, clock, modes=("ok",))
    clock.advance(120)
    snap = await read_snapshot(store, now=clock.time(), window=60, graph=build(watch_app()))
    assert edge(snap, None, REQUESTED).idle
    assert snap.events_in_window == 0
    assert snap.statuses["completed"] == 1  # statuses count every transaction, not only the window's


async def test_only_entries_inside_the_window_are_counted(store: JournalStore, clock: VirtualClock) -> None:
    await run_modes(store, clock, modes=("ok", "ok"))
    clock.advance(120)
    await run_modes(store, clock, modes=("ok",))
    snap = await read_snapshot(store, now=clock.time(), window=60, graph=build(watch_app()))
    assert edge(snap, "gateway", REQUESTED).count == 1
    assert edge(snap, "gateway", REQUESTED).rate == pytest.approx(1 / 60)
    wide = await read_snapshot(store, now=clock.time(), window=600)
    assert edge(wide, "gateway", REQUESTED).count == 3


async def test_transactions_are_counted_by_status_and_the_newest_listed_with_their_last_event(
    store: JournalStore, clock: VirtualClock
) -> None:
    ids = await run_modes(store, clock)
    snap = await read_snapshot(store, now=clock.time(), window=60, limit=3)
    assert snap.statuses == {"running": 1, "completed": 2, "failed": 2, "compensated": 1, "compensation_failed": 0, "stuck": 0}
    assert snap.total == 6 and len(snap.newest) == 3
    rows = {row.correlation_id: row for row in (await read_snapshot(store, now=clock.time(), window=60)).newest}
    crash = rows[ids["crash"]]
    assert (crash.status, crash.last_type, crash.last_service, crash.failures) == (
        "compensated", Cancelled.event_type(), "payment", 1,
    )
    assert (rows[ids["stall"]].status, rows[ids["stall"]].last_type) == ("running", REQUESTED)


async def test_a_long_transaction_is_shown_by_its_last_entry_without_reading_its_timeline(
    store: JournalStore, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refresh read the whole timeline of every listed transaction to show its last event:
    a courier's transaction of 100,000 scans took half a second of SQLite per refresh, and as
    much memory, for one row. The stores read the last entry alone."""
    now = clock.time()
    for start in range(0, 3000, 1000):
        await store.record(
            [entry(f"scan-{i}", "long", "test.watch.scanned", "courier", now + i) for i in range(start, start + 1000)],
            stuck_after=60,
        )
    await store.record([entry("other-1", "other", REQUESTED, "gateway", now)], stuck_after=60)
    assert (await store.last_entry("long")) == (await store.timeline("long"))[-1]
    assert await store.last_entry("nobody") is None

    async def no_timeline(correlation_id: str) -> list[JournalEntry]:
        raise AssertionError(f"the whole timeline of {correlation_id} was read")

    monkeypatch.setattr(store, "timeline", no_timeline)
    snap = await read_snapshot(store, now=now + 3000, window=60)
    rows = {row.correlation_id: row for row in snap.newest}
    assert (rows["long"].last_type, rows["long"].event_count) == ("test.watch.scanned", 3000)
    assert rows["other"].last_type == REQUESTED


async def test_a_transaction_whose_compensation_gave_up_is_singled_out(store: JournalStore, clock: VirtualClock) -> None:
    """Nothing will finish its rollback: it needs a person as much as a failed one (it read
    ``compensated`` before, and was not flagged)."""
    ids = await run_modes(store, clock)
    journal = Journal.from_app(watch_app(), store, clock=clock)
    await journal.record(rolled_back_halfway("tx-half", Cancelled(order="o")))
    clock.advance(61)
    snap = await read_snapshot(store, now=clock.time(), window=60)
    assert snap.statuses["compensation_failed"] == 1 and snap.statuses["compensated"] == 1
    assert [(row.status, row.correlation_id) for row in snap.attention] == [
        ("stuck", ids["stall"]), ("compensation_failed", "tx-half"), ("failed", ids["nobody"]),
        ("failed", ids["decline"]),
    ]


async def test_stuck_and_failed_transactions_are_singled_out(store: JournalStore, clock: VirtualClock) -> None:
    ids = await run_modes(store, clock)
    snap = await read_snapshot(store, now=clock.time(), window=60)
    assert {row.correlation_id for row in snap.attention} == {ids["decline"], ids["nobody"]}
    nobody = next(row for row in snap.attention if row.correlation_id == ids["nobody"])
    assert (nobody.last_type, nobody.last_service, nobody.last_kind) == (FAILED, "payment", "failure")

    clock.advance(61)  # past stuck_after: the stalled transaction is stuck now
    snap = await read_snapshot(store, now=clock.time(), window=60)
    assert snap.statuses["stuck"] == 1 and snap.statuses["running"] == 0
    assert [row.status for row in snap.attention] == ["stuck", "failed", "failed"]  # stuck ones first
    stuck = snap.attention[0]
    assert (stuck.correlation_id, stuck.last_type, stuck.last_service) == (ids["stall"], REQUESTED, "gateway")
    assert stuck.idle_for == pytest.approx(61, abs=1)
    few = await read_snapshot(store, now=clock.time(), window=60, limit=1)
    assert [row.correlation_id for row in few.attention] == [ids["stall"]]


async def test_without_a_graph_the_snapshot_shows_what_the_journal_saw(store: JournalStore, clock: VirtualClock) -> None:
    await run_modes(store, clock, modes=("ok", "decline"))
    snap = await read_snapshot(store, now=clock.time(), window=60)
    assert not any(e.idle for e in snap.edges)
    assert all(e.declared is None for e in snap.edges)
    assert {e.type: e.terminal for e in snap.edges if e.terminal} == {
        DELIVERED: "completed", Declined.event_type(): "failed",
    }
    assert snap.app is None


async def test_a_snapshot_needs_a_positive_window(store: JournalStore) -> None:
    with pytest.raises(ConfigurationError, match="window"):
        await read_snapshot(store, now=0.0, window=0)


# -- the CLI ----------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "choreograph", "watch", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )


@pytest.fixture
async def journal_file(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A SQLite journal of :data:`MODES`, recorded two minutes ago (real time): the stalled one is stuck now."""
    url = f"sqlite:///{tmp_path}/journal.db"
    ids = await run_modes(url, VirtualClock(epoch=time.time() - 120))
    return url, ids


def test_watch_once_json_prints_the_snapshot(journal_file: tuple[str, dict[str, str]]) -> None:
    url, ids = journal_file
    result = cli("tests.test_watch:app", "--journal", url, "--once", "--json", "--window", "3600")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["app"] == "watched" and snap["window_s"] == 3600
    assert snap["statuses"] == {"running": 0, "completed": 2, "failed": 2, "compensated": 1, "compensation_failed": 0, "stuck": 1}
    edges = {(e["service"], e["type"], e["failed_type"]): e for e in snap["edges"]}
    assert edges[("gateway", REQUESTED, None)]["count"] == 6
    assert edges[("gateway", REQUESTED, None)]["rate"] == pytest.approx(6 / 3600)
    assert edges[("drone", FAILED, CHARGED)]["kind"] == "failure"
    assert edges[("drone", Rerouted.event_type(), None)]["idle"] is True
    assert edges[("drone", DELIVERED, None)]["terminal"] == "completed"
    assert {row["correlation_id"]: row["status"] for row in snap["attention"]} == {
        ids["stall"]: "stuck", ids["decline"]: "failed", ids["nobody"]: "failed",
    }
    assert len(snap["newest"]) == 6


def test_watch_once_draws_the_tables(journal_file: tuple[str, dict[str, str]]) -> None:
    url, ids = journal_file
    result = cli("tests.test_watch:app", "--journal", url, "--once", "--window", "3600")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "stuck 1" in out and "completed 2" in out
    assert f"gave up on {CHARGED}" in out and "no traffic" in out and "terminal: completed" in out
    assert ids["stall"] in out


def test_watch_without_an_app_shows_what_the_journal_saw(journal_file: tuple[str, dict[str, str]]) -> None:
    url, _ = journal_file
    result = cli("--journal", url, "--once", "--json", "--window", "3600")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["app"] is None
    assert not any(e["idle"] for e in snap["edges"])
    assert sum(e["count"] for e in snap["edges"]) == snap["events_in_window"] == 15


def test_watch_streams_one_json_line_per_interval_until_sigterm(journal_file: tuple[str, dict[str, str]]) -> None:
    url, _ = journal_file
    proc = subprocess.Popen(
        [sys.executable, "-m", "choreograph", "watch", "--journal", url, "--json", "--interval", "0.05"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        _, err = stop(proc, 30)
    assert proc.returncode == 0, err
    snaps = [json.loads(line) for line in lines]
    assert [s["transactions"] for s in snaps] == [6, 6, 6]
    assert snaps[0]["at"] <= snaps[1]["at"] <= snaps[2]["at"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--journal", "mongodb://x", "--once"], "unknown scheme 'mongodb'"),
        (["--journal", "memory://", "--interval", "0"], "--interval 0: expected a positive number of seconds"),
        (["--journal", "memory://", "--interval", "-1", "--once"], "--interval -1"),
        (["--journal", "memory://", "--window", "0", "--once"], "--window 0"),
        (["--journal", "memory://", "--limit", "0", "--once"], "--limit 0"),
        (["tests.test_watch:nothing", "--journal", "memory://", "--once"], "has no attribute 'nothing'"),
        (["tests.test_watch:Requested", "--journal", "memory://", "--once"], "not a Service"),
    ],
)
def test_bad_input_prints_one_clear_line_and_exits_2(args: list[str], needle: str) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["watch", "--once"], ["transactions"], ["trace", "some-id"]])
def test_a_mistyped_sqlite_journal_path_is_an_error_and_nothing_is_created(
    command: list[str], tmp_path: Path
) -> None:
    missing = tmp_path / "typo" / "journal.db"
    result = subprocess.run(
        [sys.executable, "-m", "choreograph", *command, "--journal", f"sqlite:///{missing}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert f"no journal at {missing}" in " ".join(result.stderr.split())
    assert not missing.parent.exists()


ODD_IDS, ODD_TYPE = ("[order-42]", "tx[/x]"), "test.watch.[odd]"


@pytest.fixture
async def odd_journal(tmp_path: Path) -> str:
    """A SQLite journal of two transactions whose ids (and type) Rich would read as markup."""
    url = f"sqlite:///{tmp_path}/journal.db"
    seeded = open_journal_store(url)
    await seeded.open()
    try:
        now = time.time()
        await seeded.record([entry(f"e-{n}", cid, ODD_TYPE, "gateway", now - n) for n, cid in enumerate(ODD_IDS)],
                            stuck_after=600)
    finally:
        await seeded.close()
    return url


def test_correlation_ids_and_types_with_brackets_are_shown_as_they_are(odd_journal: str) -> None:
    """Ids and types are any text (``choreograph publish --correlation-id``, a CloudEvent received
    over HTTP): ``watch`` and ``transactions`` print them verbatim, not as Rich markup (which ate
    ``[order-42]`` and raised on ``[/x]``, ending the command)."""
    watched = cli("--journal", odd_journal, "--once", "--window", "3600")
    listed = subprocess.run(
        [sys.executable, "-m", "choreograph", "transactions", "--journal", odd_journal], cwd=ROOT,
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )
    for result in (watched, listed):
        assert result.returncode == 0, result.stderr
        assert all(cid in result.stdout for cid in ODD_IDS), result.stdout
    assert ODD_TYPE in listed.stdout


async def test_a_journal_error_while_streaming_is_printed_as_it_is_not_as_rich_markup(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """"/data/[prod]/journal.db" lost its "[prod]", and a "[/x]" raised MarkupError, ending the watch."""
    from choreograph._journal_store import MemoryJournalStore
    from choreograph.cli._watch_view import Watcher
    from choreograph.errors import StoreError

    watcher = Watcher(MemoryJournalStore(), None, 60.0, 10, True)
    first = await watcher.read()
    stop = asyncio.Event()

    async def failing() -> None:
        stop.set()
        raise StoreError("journal store /data/[prod]/journal.db: disk I/O error [/x]")

    monkeypatch.setattr(watcher, "read", failing)
    await watcher._stream(first, stop, 0.01)
    assert "journal unreadable: journal store /data/[prod]/journal.db: disk I/O error [/x]" in capsys.readouterr().err


CONTROL_CID, CONTROL_TYPE, CONTROL_SERVICE = "tx\x1b[2J\x1b]0;owned\x07\n-1", "test.watch.odd\x1b[31m", "svc\x9bx"


@pytest.fixture
async def control_journal(tmp_path: Path) -> str:
    """A SQLite journal of one transaction whose id, type and service hold control characters."""
    url = f"sqlite:///{tmp_path}/journal.db"
    seeded = open_journal_store(url)
    await seeded.open()
    try:
        await seeded.record([entry("e-1", CONTROL_CID, CONTROL_TYPE, CONTROL_SERVICE, time.time())], stuck_after=600)
    finally:
        await seeded.close()
    return url


def test_control_characters_off_the_bus_are_shown_escaped_not_sent_to_the_terminal(control_journal: str) -> None:
    """A producer's event is decoded whatever its ids hold, control characters included; ``watch``,
    ``transactions`` and ``trace`` wrote them to the terminal as they were, which obeys them (an
    escape sequence clears the screen, retitles the window; a newline made one id look like two
    rows). They are shown as escapes (``\\x1b``); ``--json`` carries them as they are."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "choreograph", *args, "--journal", control_journal], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=env)

    outputs = [run("watch", "--once", "--window", "3600"), run("transactions"), run("trace", CONTROL_CID)]
    for result in outputs:
        assert result.returncode == 0, result.stderr
        shown = result.stdout
        assert not any(char in shown for char in "\x1b\x07\x9b"), repr(shown)
        assert r"tx\x1b[2J\x1b]0;owned\x07\n-1" in shown, shown
        assert r"test.watch.odd\x1b[31m" in shown, shown
    assert r"svc\x9bx" in outputs[0].stdout and r"svc\x9bx" in outputs[2].stdout
    assert json.loads(run("trace", CONTROL_CID, "--json").stdout)["correlation_id"] == CONTROL_CID


def test_an_edge_last_seen_on_a_clock_ahead_of_the_watchers_is_not_shown_in_the_future() -> None:
    """The journal stamps ``recorded_at`` on its host's clock and ``watch`` reads it on another's: an
    edge's last event read "-0.4 s ago" (and "-12 s ago" past ten seconds) when the journal's clock
    ran ahead, where the transactions beside it, clamped, read "0.0 s"."""
    now = 1000.0
    activity = Activity(edges=[EdgeCount("payment", CHARGED, "event", None, 3, now + 0.4),
                               EdgeCount("drone", DELIVERED, "event", None, 1, now + 12)], statuses={"running": 1})
    snap = build_snapshot(activity, [], [], {}, journal="memory://", now=now, window=60)
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(render(snap))
    assert "-0.4 s ago" not in out.getvalue() and "-12 s ago" not in out.getvalue()
    assert out.getvalue().count("0.0 s ago") == 2, out.getvalue()
