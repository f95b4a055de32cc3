"""Effectively-once handlers: a service with a database commits state, inbox record and outputs together.

In-process, on the memory bus with the real clock; every test runs against a SQLite
file and a PostgreSQL schema (``database_url``). Crashes with real processes are in
``test_outbox_crash.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from choreograph import ConfigurationError, Context, Event, Publisher, RetryPolicy, Service, Worker, derive_id
from choreograph.errors import EmitError
from choreograph.runtime.outbox import Outboxes, transaction
from choreograph.runtime.records import first_envelope, to_message
from choreograph.stores.state import open_database
from choreograph.testing import MemoryTransport, settled
from choreograph.transports.base import Message
from tests.stores._databases import database_url, postgres_database_url  # noqa: F401 - fixtures


class Requested(Event, type="test.outbox.requested"):
    pid: str


class Created(Event, type="test.outbox.created"):
    pid: str


class Noted(Event, type="test.outbox.noted"):
    pid: str


class RecordingBus(MemoryTransport):
    """The memory bus, remembering the order in which ids were published."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.published.extend(messages)
        await super().publish(messages)

    def ids_of(self, event: type[Event]) -> list[str]:
        return [m.id for m in self.published if m.type == event.event_type()]


async def prepare(url: str) -> None:
    async with transaction(Service("setup", database=url)) as tx:
        await tx.execute("CREATE TABLE packages (pid text PRIMARY KEY)")


async def packages(url: str) -> list[str]:
    async with transaction(Service("setup", database=url)) as tx:
        return [row["pid"] for row in await tx.fetch("SELECT pid FROM packages ORDER BY pid")]


async def drained(worker: Worker, bus: MemoryTransport) -> None:
    """The bus is settled and no service with a database has unsent outbox rows."""
    for _ in range(2000):
        await settled(bus)
        lags = [await worker.outbox.lag(name) for name in worker.outbox.relays]
        if all(lag.pending == 0 for lag in lags):
            await settled(bus)
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("the outbox did not drain")


def package_service(url: str, **kwargs: object) -> Service:
    svc = Service("package", database=url, **kwargs)  # type: ignore[arg-type]

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
        return Created(pid=req.pid)

    return svc


async def test_a_transactional_handler_commits_state_and_its_output_goes_out_through_the_outbox(
    database_url: str,  # noqa: F811
) -> None:
    await prepare(database_url)
    bus = RecordingBus()
    package = package_service(database_url)
    async with Worker([package], bus) as worker:
        [req] = await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
        relay = worker.outbox.relays["package"]
        assert await worker.outbox.stores["package"].seen("package", [req.id]) == {req.id}
    assert relay.published == 1
    assert await packages(database_url) == ["p1"]
    assert bus.ids_of(Created) == [derive_id(req.id, "package", package.handlers[Requested.event_type()].name, 0)]
    assert worker.stats("package").handled == 1


async def test_a_redelivered_event_whose_inbox_record_exists_is_acked_without_running(
    database_url: str,  # noqa: F811
) -> None:
    await prepare(database_url)
    bus = RecordingBus()
    async with Worker([package_service(database_url)], bus) as worker:
        publisher = Publisher(bus)
        await publisher.publish(Requested(pid="p1"), ids=["same"])
        await drained(worker, bus)
        await publisher.publish(Requested(pid="p1"), ids=["same"])
        await drained(worker, bus)
    assert worker.stats("package").duplicates == 1
    assert worker.stats("package").handled == 1
    assert len(bus.ids_of(Created)) == 1


@pytest.mark.parametrize("odd_id", ["p1\x00", "p1-" + secrets.token_hex(2000)], ids=["nul", "long"])
async def test_an_event_with_an_unusual_id_commits_once_and_its_copy_is_a_duplicate(
    database_url: str, odd_id: str,  # noqa: F811
) -> None:
    """JSON lets an id hold U+0000, which PostgreSQL text cannot: its inbox lookup failed and the
    worker released the event, and the events fetched with it, to look them up again, for ever.
    An id of 4 kB did not fit a PostgreSQL index entry: every commit failed, so the event was
    dead-lettered, its state never written."""
    await prepare(database_url)
    bus = RecordingBus()
    async with Worker([package_service(database_url)], bus) as worker:
        publisher = Publisher(bus)
        # as another producer sends it (a Publisher refuses an id a CloudEvents String cannot hold)
        odd = to_message(first_envelope(Requested(pid="p1"), source="/other", id=odd_id))
        await bus.publish([odd])
        await publisher.publish(Requested(pid="p2"))
        await asyncio.wait_for(drained(worker, bus), 10)
        await bus.publish([odd])
        await asyncio.wait_for(drained(worker, bus), 10)
    assert await packages(database_url) == ["p1", "p2"]
    assert worker.stats("package").handled == 2
    assert worker.stats("package").duplicates == 1
    assert len(bus.ids_of(Created)) == 2


async def test_an_event_another_consumer_committed_while_the_handler_ran_is_a_duplicate_its_outputs_dropped(
    database_url: str,  # noqa: F811
) -> None:
    """The inbox record appears between the fetch's lookup and the handler's commit (another
    replica handled a copy meanwhile): the commit returns False, the handler's state is undone,
    its output is neither published nor queued, and the delivery is acked as a duplicate."""
    await prepare(database_url)
    bus = RecordingBus()
    running, other_consumer_done = asyncio.Event(), asyncio.Event()
    svc = Service("package", database=database_url)

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        running.set()
        await other_consumer_done.wait()
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        [req] = await Publisher(bus).publish(Requested(pid="p1"))
        await running.wait()  # its delivery was looked up in the inbox: not processed yet
        await worker.outbox.stores["package"].mark("package", [req.id])  # the other replica's commit
        other_consumer_done.set()
        await drained(worker, bus)
        stats = worker.stats("package")
    assert (stats.duplicates, stats.handled) == (1, 0)
    assert bus.ids_of(Created) == []
    assert await packages(database_url) == []


async def test_an_exception_after_the_block_rolls_back_state_and_outputs(database_url: str) -> None:  # noqa: F811
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url, retry=RetryPolicy(base=0.01, jitter=False))

    @svc.on(Requested, emits=[Created, Noted])
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            tx.publish(Noted(pid=req.pid))
        if ctx.attempt == 1:
            raise RuntimeError("after the block")
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
    assert worker.stats("package").retried == 1
    assert await packages(database_url) == ["p1"]
    assert (len(bus.ids_of(Noted)), len(bus.ids_of(Created))) == (1, 1)


async def test_a_cancelled_error_the_handler_raises_itself_is_a_failed_attempt_and_rolls_back(
    database_url: str,  # noqa: F811
) -> None:
    """Not a shutdown (nobody cancelled the task): rolled back, retried by the policy, then dead-lettered
    - where it used to be released and redelivered at once, in a tight loop."""
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url, retry=RetryPolicy(max_attempts=2, base=0.01, jitter=False))
    attempts: list[int] = []

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        attempts.append(ctx.attempt)
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            raise asyncio.CancelledError

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await asyncio.wait_for(drained(worker, bus), 30)
        stats = worker.stats("package")
    assert attempts == [1, 2]
    assert (stats.retried, stats.dead_lettered, stats.released) == (1, 1, 0)
    assert await packages(database_url) == []
    [letter] = await bus.dead_letters("package")
    assert letter.record["last_error"]["type"] == "CancelledError"


async def test_an_exception_inside_the_block_rolls_back_and_the_handler_may_carry_on(
    database_url: str,  # noqa: F811
) -> None:
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url)

    @svc.on(Requested, emits=[Created, Noted])
    async def create(req: Requested, ctx: Context) -> Created:
        ctx.publish(Noted(pid="before"))  # not the transaction's: it stays
        try:
            async with ctx.transaction() as tx:
                await tx.execute("INSERT INTO packages (pid) VALUES ($1)", "discarded")
                tx.publish(Noted(pid="discarded"))  # sent only if the transaction commits: it does not
                raise LookupError("changed my mind")
        except LookupError:
            pass
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        [req] = await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
        assert await worker.outbox.stores["package"].seen("package", [req.id]) == {req.id}
    assert await packages(database_url) == []
    assert len(bus.ids_of(Created)) == 1  # still through the outbox, with the inbox record
    assert [m.body for m in bus.published if m.type == Noted.event_type() and b"discarded" in m.body] == []
    assert len(bus.ids_of(Noted)) == 1


async def test_published_and_returned_outputs_all_go_through_the_outbox_in_order_with_derived_ids(
    database_url: str,  # noqa: F811
) -> None:
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url)

    @svc.on(Requested, emits=[Created, Noted])
    async def create(req: Requested, ctx: Context) -> Created:
        ctx.publish(Noted(pid="before"))
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            tx.publish(Noted(pid="inside"))
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        [req] = await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
    handler = svc.handlers[Requested.event_type()].name
    outputs = [m for m in bus.published if m.type != Requested.event_type()]
    assert [m.id for m in outputs] == [derive_id(req.id, "package", handler, i) for i in range(3)]
    assert [m.type for m in outputs] == [Noted.event_type(), Noted.event_type(), Created.event_type()]


async def test_an_undeclared_output_rolls_back_the_state_and_dead_letters(database_url: str) -> None:  # noqa: F811
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url)

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            tx.publish(Noted(pid=req.pid))  # not declared
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
    assert worker.stats("package").dead_lettered == 1
    assert await packages(database_url) == []
    assert bus.ids_of(Noted) == bus.ids_of(Created) == []


class Measured(Event, type="test.outbox.measured"):
    pid: str
    weight: float


async def test_an_output_json_cannot_carry_rolls_back_the_state_and_is_rejected_naming_the_field(
    database_url: str,  # noqa: F811
) -> None:
    """A float nan would be published as null, which consumers refuse: nothing commits, nothing goes out."""
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url)

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Measured:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            tx.publish(Measured(pid=req.pid, weight=1.0))
        return Measured(pid=req.pid, weight=float("nan"))

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
    [letter] = await bus.dead_letters("package")
    assert (letter.record["reason"], letter.record["last_error"]["type"]) == ("rejected", "EmitError")
    assert "$.weight: nan cannot be carried by JSON" in letter.record["last_error"]["message"]
    assert await packages(database_url) == []
    assert bus.ids_of(Measured) == []


async def test_a_transaction_publishing_an_event_json_cannot_carry_raises_and_commits_nothing(
    database_url: str,  # noqa: F811
) -> None:
    await prepare(database_url)
    with pytest.raises(EmitError, match=r"'test.outbox.measured' cannot be published: \$.weight: inf cannot be"):
        async with transaction(Service("package", database=database_url)) as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", "p1")
            tx.publish(Measured(pid="p1", weight=float("inf")))
    assert await packages(database_url) == []


async def test_a_handler_that_times_out_inside_its_transaction_leaves_no_trace(database_url: str) -> None:  # noqa: F811
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url, retry=RetryPolicy(base=0.01, jitter=False))

    @svc.on(Requested, timeout=0.2)
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", f"{req.pid}-{ctx.attempt}")
            if ctx.attempt == 1:
                await asyncio.sleep(60)
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
    assert worker.stats("package").retried == 1
    assert await packages(database_url) == ["p1-2"]
    assert len(bus.ids_of(Created)) == 1


async def test_a_handler_that_returns_after_its_timeout_cancelled_it_commits_nothing(database_url: str) -> None:  # noqa: F811
    """It caught the watchdog's cancellation inside its transaction and returned: a timed-out
    attempt all the same, its state rolled back and its output never published."""
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url, retry=RetryPolicy(base=0.01, jitter=False))

    @svc.on(Requested, timeout=0.2)
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", f"{req.pid}-{ctx.attempt}")
            if ctx.attempt == 1:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    pass
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
    assert worker.stats("package").retried == 1
    assert await packages(database_url) == ["p1-2"]
    assert len(bus.ids_of(Created)) == 1


async def test_a_handler_without_a_transaction_takes_the_plain_path_with_the_services_inbox(
    database_url: str,  # noqa: F811
) -> None:
    bus = RecordingBus()
    svc = Service("package", database=database_url)

    @svc.on(Requested)
    async def create(req: Requested) -> Created:
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        [req] = await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
        assert await worker.outbox.stores["package"].seen("package", [req.id]) == {req.id}
        relay = worker.outbox.relays["package"]
    assert relay.published == 0
    assert len(bus.ids_of(Created)) == 1


async def test_many_concurrent_handlers_each_apply_their_effect_once(database_url: str) -> None:  # noqa: F811
    await prepare(database_url)
    bus = RecordingBus()
    async with Worker([package_service(database_url)], bus, concurrency=16) as worker:
        await Publisher(bus).publish(*(Requested(pid=f"p{n:03}") for n in range(60)))
        await drained(worker, bus)
    assert await packages(database_url) == [f"p{n:03}" for n in range(60)]
    created = bus.ids_of(Created)
    assert len(created) == len(set(created)) == 60


async def test_publishing_from_outside_a_handler_is_atomic_with_the_state_change(
    database_url: str,  # noqa: F811
) -> None:
    await prepare(database_url)
    bus = RecordingBus()
    package = Service("package", database=database_url)
    async with Worker([package], bus) as worker:
        with pytest.raises(RuntimeError):
            async with transaction(package) as tx:
                await tx.execute("INSERT INTO packages (pid) VALUES ($1)", "rolled-back")
                tx.publish(Requested(pid="rolled-back"))
                raise RuntimeError("abort")
        async with transaction(package, correlation_id="order-7") as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", "p1")
            envelope = tx.publish(Requested(pid="p1"))
        await drained(worker, bus)
    assert envelope is not None and envelope.correlationid == "order-7"
    assert bus.ids_of(Requested) == [envelope.id]
    assert await packages(database_url) == ["p1"]


async def test_the_relay_publishes_in_commit_order(database_url: str) -> None:  # noqa: F811
    bus = RecordingBus()
    package = Service("package", database=database_url)
    expected = []
    async with Worker([package], bus) as worker:
        for n in range(30):
            async with transaction(package) as tx:
                expected += [tx.publish(Requested(pid=f"{n}a")), tx.publish(Requested(pid=f"{n}b"))]
        await drained(worker, bus)
    assert bus.ids_of(Requested) == [e.id for e in expected if e is not None]


async def test_rows_committed_while_no_worker_runs_are_sent_when_one_starts(database_url: str) -> None:  # noqa: F811
    bus = RecordingBus()
    package = Service("package", database=database_url)
    async with transaction(package) as tx:
        envelope = tx.publish(Requested(pid="p1"))
    async with open_database(database_url) as db:
        assert (await db.outbox_lag("package")).pending == 1
    async with Worker([package], bus) as worker:
        await drained(worker, bus)
        assert (await worker.outbox.lag("package")).pending == 0
    assert envelope is not None and bus.ids_of(Requested) == [envelope.id]


async def test_ctx_transaction_in_a_service_without_a_database_is_a_configuration_error() -> None:
    from choreograph import Envelope

    ctx = Context(Envelope(id="1", source="/t", type="t"), "plain", "h", 1)
    with pytest.raises(ConfigurationError, match="has no database"):
        ctx.transaction()


async def test_ctx_transaction_without_a_database_dead_letters_at_once_rather_than_retrying() -> None:
    bus = RecordingBus()
    svc = Service("plain", retry=RetryPolicy(max_attempts=5, base=0.01, jitter=False))
    attempts: list[int] = []

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        async with ctx.transaction():
            pass

    async with Worker([svc], bus):
        await Publisher(bus).publish(Requested(pid="p1"))
        await settled(bus)
    assert attempts == [1]
    [letter] = await bus.dead_letters("plain")
    assert letter.record["reason"] == "rejected" and "has no database" in letter.record["last_error"]["message"]


@pytest.mark.parametrize("statement", [
    "COMMIT", "  rollback", "BEGIN IMMEDIATE", "savepoint s1", "END",
    # a leading comment hid the statement from the check, and the database ran it
    "/* end it */ COMMIT", "-- done\nCOMMIT", " /* a */ -- b\n /* c\n d */ rollback",
])
async def test_transaction_control_inside_the_block_is_refused_and_nothing_commits(
    database_url: str, statement: str  # noqa: F811
) -> None:
    """On SQLite several handlers' units share one commit: a raw COMMIT or ROLLBACK would act on theirs."""
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url)

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            await tx.execute(statement)
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
    assert await packages(database_url) == []
    assert bus.ids_of(Created) == []
    [letter] = await bus.dead_letters("package")
    assert letter.record["reason"] == "rejected" and "transaction control" in letter.record["last_error"]["message"]


async def _slow_one_and_three_queued_behind_it(url: str) -> None:
    """A handler holds its transaction 3 s past its 1 s timeout while three more, 0.25 s of work
    each, queue behind it for the database: only the slow one times out (dead-lettered)."""
    bus = RecordingBus()
    svc = Service("package", database=url, retry=RetryPolicy(max_attempts=1), timeout=1.0)

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> None:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            await asyncio.sleep(3 if req.pid == "slow" else 0.25)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="slow"), *(Requested(pid=p) for p in ("a", "b", "c")))
        await asyncio.wait_for(drained(worker, bus), 30)
        stats = worker.stats("package")
    assert await packages(url) == ["a", "b", "c"]
    [letter] = await bus.dead_letters("package")
    assert letter.record["last_error"]["type"] == "HandlerTimeout"
    assert (stats.handled, stats.dead_lettered) == (3, 1)


async def test_waiting_for_the_database_does_not_count_against_the_handler_timeout(
    database_url: str,  # noqa: F811
) -> None:
    """One handler holds its transaction past its timeout; the handlers queued behind it for the
    SQLite writer (or a connection) are not timed out by that wait - they used to be, all of them.
    Each still has its whole timeout for the work it does once it holds the connection: it works
    a while in its transaction (quick ones committed before the watchdog's next tick)."""
    await prepare(database_url)
    await _slow_one_and_three_queued_behind_it(database_url)


def test_a_service_rejects_an_unknown_database_scheme() -> None:
    with pytest.raises(ConfigurationError, match="database URL"):
        Service("package", database="mysql://localhost/db")


async def test_transaction_of_its_own_service_inside_a_handler_is_refused(database_url: str) -> None:  # noqa: F811
    bus = RecordingBus()
    svc = Service("package", database=database_url, retry=RetryPolicy(max_attempts=1))
    errors: list[BaseException] = []

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> None:
        try:
            async with transaction(svc):
                pass
        except ConfigurationError as exc:
            errors.append(exc)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await drained(worker, bus)
    assert [str(e) for e in errors] == ["inside a handler of 'package', use ctx.transaction()"]


async def test_waiting_for_a_pooled_postgresql_connection_does_not_count_against_the_handler_timeout(
    postgres_database_url: str,  # noqa: F811
) -> None:
    """On PostgreSQL the wait is for a pooled connection, taken at the first statement: with one
    connection in the pool, the handlers queued behind a slow one are not timed out by that wait."""
    url = f"{postgres_database_url}&pool_max=1"
    await prepare(url)
    await _slow_one_and_three_queued_behind_it(url)


async def test_waiting_for_another_process_s_sqlite_write_lock_does_not_count_against_the_handler_timeout(
    tmp_path: Path,
) -> None:
    """Another process (here: another connection) holds the file's write lock longer than the
    handler's timeout; the handler waits for it as for this process's writer turn, untimed."""
    url = f"sqlite:///{tmp_path / 'package.db'}"
    await prepare(url)
    bus = RecordingBus()
    svc = package_service(url, retry=RetryPolicy(max_attempts=1), timeout=0.5)
    other = sqlite3.connect(tmp_path / "package.db", isolation_level=None, check_same_thread=False)
    try:
        async with Worker([svc], bus) as worker:
            other.execute("BEGIN IMMEDIATE")
            await Publisher(bus).publish(Requested(pid="a"))
            await asyncio.sleep(1.5)
            other.execute("COMMIT")
            await asyncio.wait_for(drained(worker, bus), 30)
    finally:
        other.close()
    assert await packages(url) == ["a"]
    assert await bus.dead_letters("package") == []


async def test_a_worker_whose_start_fails_stops_the_relays_and_databases_it_had_started(
    database_url: str,  # noqa: F811
) -> None:
    """A service's subscription refused after the outbox started: the failed start leaves no relay
    running (on SQLite it kept the claim's lock, so no other process could take the relay over)."""

    class RefusingBus(RecordingBus):
        async def subscribe(self, group: str, types: object) -> object:  # type: ignore[override]
            if group == "broken":
                raise ConnectionError("refused")
            return await super().subscribe(group, types)  # type: ignore[arg-type]

    await prepare(database_url)
    broken = Service("broken")

    @broken.on(Requested)
    async def ignore(req: Requested) -> None:
        pass

    worker = Worker([package_service(database_url), broken], RefusingBus())
    with pytest.raises(ConnectionError):
        await worker.start()
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("choreograph-")] == []
    assert worker.outbox.stores == {}


async def _package_and_audit_on_one_file(tmp_path: Path) -> tuple[str, RecordingBus, Service, Service]:
    """Two services sharing one prepared SQLite file: ``package`` (one attempt, 2 s timeout) and ``audit``."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    await prepare(url)
    svc = Service("package", database=url, retry=RetryPolicy(max_attempts=1), timeout=2.0)
    return url, RecordingBus(), svc, Service("audit", database=url)


async def test_transaction_of_another_service_on_the_same_sqlite_file_inside_the_handler_s_block_is_refused(
    tmp_path: Path,
) -> None:
    """Two services share a SQLite file; inside its own open transaction a handler asks for the
    other's: that would wait for the writer turn its own transaction holds, until its timeout."""
    url, bus, svc, audit = await _package_and_audit_on_one_file(tmp_path)
    errors: list[BaseException] = []

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> None:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            try:
                async with transaction(audit):
                    pass
            except ConfigurationError as exc:
                errors.append(exc)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await asyncio.wait_for(drained(worker, bus), 10)
    assert [str(e) for e in errors] == [
        "inside a handler of 'package', transaction('audit') would wait for the SQLite writer "
        "its own transaction holds; use ctx.transaction()"
    ]
    assert await packages(url) == ["p1"]


async def test_stopping_closes_every_database_when_one_fails_to_close(tmp_path: Path) -> None:
    services = [Service(name, database=f"sqlite:///{tmp_path / name}.db") for name in ("a", "b", "c")]
    outboxes = Outboxes(services, MemoryTransport())
    await outboxes.start()
    closed: list[str] = []

    def recording(name: str, close: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def close_and_record() -> None:
            await close()
            closed.append(name)
            if name == "a":
                raise OSError("disk gone")
        return close_and_record

    for name, store in outboxes.stores.items():
        store.close = recording(name, store.close)  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk gone"):
        await outboxes.stop()
    assert closed == ["a", "b", "c"]  # b and c were left open, and the dicts kept all three
    assert outboxes.stores == {} and outboxes.relays == {}


def _conflicting_service(url: str, conflicts: int, errcode: str, runs: list[int], **kwargs: object) -> Service:
    """A handler whose transaction PostgreSQL aborts with ``errcode`` on its first ``conflicts`` runs."""
    svc = Service("package", database=url, **kwargs)  # type: ignore[arg-type]

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        runs.append(ctx.attempt)
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            if len(runs) <= conflicts:  # as a concurrent transaction would make PostgreSQL do
                await tx.execute(f"DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '{errcode}'; END $$")
        return Created(pid=req.pid)

    return svc


@pytest.mark.parametrize("errcode", ["serialization_failure", "deadlock_detected"])
async def test_a_postgresql_transaction_conflict_reruns_the_handler_in_place_without_spending_an_attempt(
    postgres_database_url: str, errcode: str,  # noqa: F811
) -> None:
    """A serialization failure (40001) or deadlock (40P01) says nothing about the event: it was
    a failed attempt, so a service with max_attempts=1 dead-lettered an event a rerun commits."""
    url = postgres_database_url
    await prepare(url)
    bus = RecordingBus()
    runs: list[int] = []
    svc = _conflicting_service(url, 2, errcode, runs, retry=RetryPolicy(max_attempts=1))
    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await asyncio.wait_for(drained(worker, bus), 30)
        stats = worker.stats("package")
    assert runs == [1, 1, 1]
    assert (stats.handled, stats.retried, stats.dead_lettered) == (1, 0, 0)
    assert await packages(url) == ["p1"]
    assert len(bus.ids_of(Created)) == 1


async def test_a_postgresql_transaction_that_keeps_conflicting_is_a_failed_attempt_named_as_a_conflict(
    postgres_database_url: str,  # noqa: F811
) -> None:
    from choreograph.runtime._runner import CONFLICT_RERUNS

    url = postgres_database_url
    await prepare(url)
    bus = RecordingBus()
    runs: list[int] = []
    svc = _conflicting_service(url, 1000, "serialization_failure", runs,
                               retry=RetryPolicy(max_attempts=2, base=0.01, jitter=False))
    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await asyncio.wait_for(drained(worker, bus), 30)
        stats = worker.stats("package")
    assert runs == [1] * (1 + CONFLICT_RERUNS) + [2] * (1 + CONFLICT_RERUNS)
    assert (stats.handled, stats.retried, stats.dead_lettered) == (0, 1, 1)
    assert await packages(url) == []
    [letter] = await bus.dead_letters("package")
    assert letter.record["last_error"]["type"] == "TransactionConflict"
    assert "SQLSTATE 40001" in letter.record["last_error"]["message"]


async def test_concurrent_serializable_handlers_that_conflict_both_commit_without_a_retry(
    postgres_database_url: str,  # noqa: F811
) -> None:
    """Write skew under SERIALIZABLE: PostgreSQL aborts one of two handlers that both read what
    the other writes (at a statement or at its commit); its rerun sees the other's row."""
    url = postgres_database_url
    await prepare(url)
    bus = RecordingBus()
    svc = Service("package", database=url, retry=RetryPolicy(max_attempts=1))
    read = [0]
    both_read = asyncio.Event()
    counts: dict[str, int] = {}

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            counts[req.pid] = await tx.fetchval("SELECT count(*) FROM packages")
            read[0] += 1
            if read[0] >= 2:
                both_read.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(both_read.wait(), 2)
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
        return Created(pid=req.pid)

    async with Worker([svc], bus, concurrency=4) as worker:
        await Publisher(bus).publish(Requested(pid="p1"), Requested(pid="p2"))
        await asyncio.wait_for(drained(worker, bus), 30)
        stats = worker.stats("package")
    assert read[0] == 3  # one of them ran again
    assert sorted(counts.values()) == [0, 1]  # and its rerun saw the other's row
    assert (stats.handled, stats.retried, stats.dead_lettered) == (2, 0, 0)
    assert await packages(url) == ["p1", "p2"]


async def test_a_handler_units_block_is_refused_once_the_handler_returned(database_url: str) -> None:  # noqa: F811
    from choreograph.runtime.outbox import HandlerUnit

    envelope = first_envelope(Requested(pid="p1"), source="/test", id="e1")
    ctx = Context(envelope, "package", "create", 1)
    ctx._sealed = True  # as the runner leaves it when the handler returned
    async with open_database(database_url) as store:
        unit = HandlerUnit(store, ctx)
        try:
            with pytest.raises(ConfigurationError, match="after the handler returned"):
                async with unit.block():
                    pass
        finally:
            await unit.rollback()  # (without the refusal: the transaction it began)
        tx = await store.begin()  # the SQLite writer turn is free
        await tx.rollback()


async def test_ctx_transaction_from_a_task_left_running_after_the_handler_returned_is_refused(
    database_url: str,  # noqa: F811
) -> None:
    """Its block began a transaction nobody would end: on SQLite it held the writer turn, and
    every later handler waited for it for ever; on PostgreSQL it kept a pooled connection."""
    await prepare(database_url)
    bus = RecordingBus()
    svc = Service("package", database=database_url)
    late: list[asyncio.Task[None]] = []
    refused: list[BaseException] = []
    returned = asyncio.Event()  # set once the handler returned and committed (a sleep of 0.1 s
    # was not always enough under load: the late block then ran inside the handler's own)

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        async def afterwards() -> None:
            await returned.wait()
            try:
                async with ctx.transaction() as tx:
                    await tx.execute("INSERT INTO packages (pid) VALUES ($1)", f"late-{req.pid}")
            except ConfigurationError as exc:
                refused.append(exc)

        if req.pid == "p1":
            late.append(asyncio.create_task(afterwards()))
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await asyncio.wait_for(drained(worker, bus), 10)
        returned.set()
        await asyncio.wait_for(asyncio.gather(*late), 10)
        await Publisher(bus).publish(Requested(pid="p2"))
        await asyncio.wait_for(drained(worker, bus), 10)
    assert len(refused) == 1 and "after the handler returned" in str(refused[0])
    assert await packages(database_url) == ["p1", "p2"]


async def test_a_transaction_inside_another_on_the_same_sqlite_file_is_refused_not_left_waiting(
    tmp_path: Path,
) -> None:
    """The inner one waited for the writer turn the outer one holds: for ever."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    await prepare(url)
    package, audit = Service("package", database=url), Service("audit", database=url)

    async def inner() -> None:
        async with transaction(audit):
            pass

    ended = asyncio.Event()

    async def after_the_block() -> None:
        await ended.wait()
        await inner()

    async with transaction(package) as tx:
        await tx.execute("INSERT INTO packages (pid) VALUES ($1)", "p1")
        with pytest.raises(ConfigurationError, match="inside another transaction"):
            await asyncio.wait_for(inner(), 5)  # a task of its own on 3.11, which the block awaits
        with pytest.raises(ConfigurationError, match="inside another transaction"):
            await inner()
        later = asyncio.create_task(after_the_block())  # created inside the block, runs after it
    ended.set()
    await asyncio.wait_for(later, 5)
    assert await packages(url) == ["p1"]


async def test_a_handlers_ctx_transaction_inside_its_transaction_of_another_service_on_the_same_file_is_refused(
    tmp_path: Path,
) -> None:
    """The handler's block waited for the writer turn its own transaction(audit) held - for ever,
    as waiting for the database does not count against the handler's timeout."""
    url, bus, svc, audit = await _package_and_audit_on_one_file(tmp_path)
    errors: list[BaseException] = []

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> None:
        async with transaction(audit) as outer:
            await outer.execute("INSERT INTO packages (pid) VALUES ($1)", f"audit-{req.pid}")
            try:
                async with ctx.transaction():
                    pass
            except ConfigurationError as exc:
                errors.append(exc)
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await asyncio.wait_for(drained(worker, bus), 10)
    assert len(errors) == 1 and "inside transaction() on the same SQLite file" in str(errors[0])
    assert await packages(url) == ["audit-p1", "p1"]


async def test_ctx_transaction_in_another_task_while_the_handlers_block_is_in_use_is_refused_on_postgres(
    postgres_database_url: str,  # noqa: F811
) -> None:
    """Both tasks ran statements on the one asyncpg connection: one failed ("another operation
    is in progress") and its block's rollback closed the connection under the other ("connection
    was closed in the middle of operation"), failing the handler's attempt - every attempt. A task
    that enters once no other task is in a block still shares the handler's transaction."""
    url = postgres_database_url
    await prepare(url)
    bus = RecordingBus()
    svc = Service("package", database=url, retry=RetryPolicy(max_attempts=2))
    errors: list[BaseException] = []

    async def side(ctx: Context, pid: str) -> None:
        try:
            async with ctx.transaction() as tx:
                await tx.execute("INSERT INTO packages (pid) VALUES ($1)", f"side-{pid}")
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is what the test checks
            errors.append(exc)

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO packages (pid) VALUES ($1)", req.pid)
            if req.pid == "p1":  # the task's block and the handler's statement at once
                await asyncio.gather(side(ctx, req.pid), tx.execute("INSERT INTO packages (pid) VALUES ($1)", "x-p1"))
        if req.pid == "p2":  # one at a time: allowed, and committed with the handler's
            await asyncio.create_task(side(ctx, req.pid))
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"), Requested(pid="p2"))
        await asyncio.wait_for(drained(worker, bus), 20)
        stats = worker.stats("package")
    assert len(errors) == 1 and isinstance(errors[0], ConfigurationError), errors
    assert "ctx.transaction() in another task" in str(errors[0])
    assert (stats.handled, stats.retried, stats.dead_lettered) == (2, 0, 0)
    assert await packages(url) == ["p1", "p2", "side-p2", "x-p1"]


async def test_a_handler_returning_while_its_task_is_inside_ctx_transaction_is_refused(
    database_url: str,  # noqa: F811
) -> None:
    """The worker committed the half of the task's block done by then (``side-p1``, on SQLite and
    PostgreSQL; the rest failed there: "the transaction is already finished"), and on PostgreSQL a statement of the task in flight at the commit failed every
    attempt ("connection was closed in the middle of operation"). Now the attempt is the
    program's error, saying so, and nothing of it commits."""
    url = database_url
    await prepare(url)
    bus = RecordingBus()
    svc = Service("package", database=url, retry=RetryPolicy(max_attempts=2))
    inside = asyncio.Event()
    leave = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    @svc.on(Requested)
    async def create(req: Requested, ctx: Context) -> Created:
        async def side() -> None:
            async with ctx.transaction() as tx:
                await tx.execute("INSERT INTO packages (pid) VALUES ($1)", f"side-{req.pid}")
                inside.set()
                await leave.wait()
                await tx.execute("INSERT INTO packages (pid) VALUES ($1)", f"later-{req.pid}")

        tasks.append(asyncio.create_task(side()))
        await inside.wait()
        return Created(pid=req.pid)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Requested(pid="p1"))
        await asyncio.wait_for(drained(worker, bus), 20)
        stats = worker.stats("package")
        leave.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert (stats.handled, stats.retried, stats.dead_lettered) == (0, 0, 1)
    [letter] = await bus.dead_letters("package")
    assert letter.record["last_error"]["type"] == "ConfigurationError"
    assert "still inside ctx.transaction()" in letter.record["last_error"]["message"]
    assert await packages(url) == []
