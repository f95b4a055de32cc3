"""The transactional path (state + inbox + outbox in one commit, relay publishes) vs the plain path.

    python bench/outbox.py [--events N] [--lone M] [--database sqlite|postgres|both] [--rounds R] [--loop uvloop|asyncio]

One process, one SQLite bus file per run. Each run has a step service and a sink;
the step's storage is SQLite or PostgreSQL (``--database``), the same for both paths:

* ``plain_<db>``: the step returns its output; the worker publishes it, records the
  input in an inbox store on <db>, then acks (at-least-once + idempotent, no state);
  the sink's inbox is on <db> too, in both paths;
* ``tx_<db>``: the step inserts a row into its own database on <db> inside
  ``ctx.transaction()`` and returns its output, which goes out through the outbox
  relay (effectively-once);
* ``floor_postgres``: the plain path whose step also runs the tx path's database work
  on bare asyncpg, in two round trips per event (see ``BareTransactions``): a bound on
  what the tx path can reach on this machine, whatever its implementation;
* ``state_<db>``: the plain path whose step also writes the tx path's state row, in
  autocommit (a bare asyncpg pool, ``AutocommitState``; a WAL connection on a thread of
  its own, ``AutocommitSQLite``): the same business work as the tx path without its
  guarantee - the service that "changes its own state and then publishes" and can lose
  one of the two in a crash.

The tx path does strictly more work (a state write and an outbox row). Figures:
``events_per_s`` (N inputs published up front, until the sink saw all N outputs),
``p50_ms_loaded`` (publish-to-sink latency during that run) and ``p50_ms_lone`` (one
event at a time through the idle system: the relay wake-up path). ``ratio`` is
tx/plain throughput on the same database (medians over ``--rounds`` interleaved
runs); the target is >= 0.7. ``floor_postgres`` and ``state_<db>`` have their ratio to
``plain_<db>`` too, and ``tx_<db>`` its ratio to ``state_<db>`` (``ratio_to_state``).
Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _gc  # noqa: E402
from choreograph import Context, Event, Publisher, Service, Worker  # noqa: E402
from choreograph.runtime.outbox import transaction  # noqa: E402
from choreograph.stores.base import InboxStore  # noqa: E402
from choreograph.stores.postgres import PostgresStore  # noqa: E402
from choreograph.stores.sqlite import SQLiteStore  # noqa: E402
from choreograph.transports import open_transport  # noqa: E402


class BenchIn(Event, type="bench.outbox.in"):
    n: int
    t0: float


class BenchOut(Event, type="bench.outbox.out"):
    n: int
    t0: float


class Sink:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.expected = 0
        self.done = asyncio.Event()

    def expect(self, count: int) -> None:
        self.latencies = []
        self.expected = count
        self.done.clear()

    def service(self) -> Service:
        svc = Service("sink")

        @svc.on(BenchOut)
        async def record(out: BenchOut) -> None:
            self.latencies.append(time.time() - out.t0)
            if len(self.latencies) >= self.expected:
                self.done.set()

        return svc


class BareTransactions:
    """``floor_postgres``: the tx path's database work on bare asyncpg, nothing else.

    Per event one transaction on its own pooled connection (``pool_max`` of the URL, as
    the service database's pool): the state insert, then one simple query with the inbox
    record, an outbox row (the output's body) and ``COMMIT; BEGIN`` - every connection is
    kept begun, so a transaction is two round trips, the fewest the tx path can need (it
    sends ``BEGIN`` ahead only under load). The output is published by the worker as on
    the plain path; nobody reads the rows back (no relay). So this path costs the plain
    path plus the database work no outbox implementation can avoid: the tx path's
    throughput can at best approach it.
    """

    def __init__(self, url: str) -> None:
        from choreograph.stores._pg import parse_url

        self.config = parse_url(url)
        self.idle: asyncio.Queue[Any] = asyncio.Queue()
        self.conns: list[Any] = []

    async def open(self) -> None:
        import asyncpg

        for i in range(self.config.pool_max):
            conn = await asyncpg.connect(self.config.dsn, server_settings={"search_path": self.config.schema})
            if i == 0:  # committed before any connection begins (a BEGIN in the same string would hold it)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS floor_inbox (grp text, event_id text, at float8, PRIMARY KEY (grp, event_id));"
                    "CREATE TABLE IF NOT EXISTS floor_outbox (seq bigserial PRIMARY KEY, event_id text, body bytea)"
                )
            await conn.execute("BEGIN")
            self.conns.append(conn)
            self.idle.put_nowait(conn)

    async def close(self) -> None:
        for conn in self.conns:
            await conn.close()

    async def run(self, event_id: str, n: int, t0: float, body: bytes) -> None:
        conn = await self.idle.get()
        try:
            await conn.execute("INSERT INTO items (n, t0) VALUES ($1, $2)", n, t0)
            await conn.execute(
                f"INSERT INTO floor_inbox VALUES ('step', '{event_id}', {time.time()!r});"
                f"INSERT INTO floor_outbox (event_id, body) VALUES ('{event_id}', '\\x{body.hex()}'::bytea);"
                "COMMIT; BEGIN"
            )
        finally:
            self.idle.put_nowait(conn)


class AutocommitState:
    """``state_postgres``: the tx path's state row, written in autocommit; no inbox or outbox row."""

    def __init__(self, url: str) -> None:
        from choreograph.stores._pg import parse_url

        self.config = parse_url(url)
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(self.config.dsn, min_size=self.config.pool_max,
                                              max_size=self.config.pool_max,
                                              server_settings={"search_path": self.config.schema})

    async def close(self) -> None:
        await self.pool.close()

    async def run(self, event_id: str, n: int, t0: float, body: bytes) -> None:
        await self.pool.execute("INSERT INTO items (n, t0) VALUES ($1, $2)", n, t0)


class AutocommitSQLite:
    """``state_sqlite``: the tx path's state row, one autocommit INSERT per event on a thread
    of its own (WAL, ``synchronous=NORMAL`` as the service database); no inbox or outbox row."""

    def __init__(self, url: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.path = url.removeprefix("sqlite:///")
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.conn: Any = None

    async def open(self) -> None:
        from choreograph._sqlite import connect_wal

        loop = asyncio.get_running_loop()
        self.conn = await loop.run_in_executor(self.executor, lambda: connect_wal(self.path))

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, self.conn.close)
        self.executor.shutdown()

    async def run(self, event_id: str, n: int, t0: float, body: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self.conn.execute, "INSERT INTO items (n, t0) VALUES (?, ?)", (n, t0)
        )


def step_service(mode: str, database: str | None, bare: BareTransactions | AutocommitState | AutocommitSQLite | None = None) -> Service:
    if mode.startswith(("floor", "state")):
        assert bare is not None
        svc = Service("step")

        @svc.on(BenchIn)
        async def floor(event: BenchIn, ctx: Context) -> BenchOut:
            out = BenchOut(n=event.n, t0=event.t0)
            await bare.run(ctx.event_id, event.n, event.t0, out.model_dump_json().encode())
            return out

        return svc
    if mode.startswith("plain"):
        svc = Service("step")

        @svc.on(BenchIn)
        async def plain(event: BenchIn) -> BenchOut:
            return BenchOut(n=event.n, t0=event.t0)

        return svc
    svc = Service("step", database=database)

    @svc.on(BenchIn)
    async def tx(event: BenchIn, ctx: Context) -> BenchOut:
        async with ctx.transaction() as t:
            await t.execute("INSERT INTO items (n, t0) VALUES ($1, $2)", event.n, event.t0)
        return BenchOut(n=event.n, t0=event.t0)

    return svc


def p50_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2) if values else float("nan")


async def run(mode: str, tmp: Path, database: str | None, events: int, lone: int, concurrency: int) -> dict[str, Any]:
    # The worker's inbox (the sink's, and the plain step's) on the same kind of database in both
    # paths: a SQLite file, or the PostgreSQL schema the tx step keeps its state in.
    inbox: InboxStore = SQLiteStore(f"sqlite:///{tmp / f'inbox-{mode}.db'}")
    bare: BareTransactions | AutocommitState | AutocommitSQLite | None = None
    if database is not None:
        async with transaction(Service("setup", database=database)) as t:
            await t.execute("CREATE TABLE IF NOT EXISTS items (n integer, t0 double precision)")
    if mode == "state_sqlite" and database is not None:
        bare = AutocommitSQLite(database)
        await bare.open()
        database = None
    if mode.endswith("_postgres") and database is not None:
        inbox = PostgresStore(database)
        if mode in ("floor_postgres", "state_postgres"):
            bare = BareTransactions(database) if mode == "floor_postgres" else AutocommitState(database)
            await bare.open()
        if mode != "tx_postgres":
            database = None
    try:
        return await _measure(mode, tmp, database, inbox, bare, events, lone, concurrency)
    finally:
        if bare is not None:
            await bare.close()


async def _measure(mode: str, tmp: Path, database: str | None, inbox: InboxStore,
                   bare: BareTransactions | AutocommitState | AutocommitSQLite | None,
                   events: int, lone: int, concurrency: int) -> dict[str, Any]:
    bus = open_transport(f"sqlite:///{tmp / f'bus-{mode}.db'}")
    sink = Sink()
    step = step_service(mode, database, bare)
    async with bus, Worker([step, sink.service()], bus, store=inbox,
                           concurrency=concurrency) as worker:
        publisher = Publisher(bus)
        # warm up (connections, pages, JIT-free but caches)
        sink.expect(50)
        await publisher.publish(*(BenchIn(n=-i, t0=time.time()) for i in range(50)))
        await asyncio.wait_for(sink.done.wait(), 60)

        sink.expect(events)
        started = time.perf_counter()
        for first in range(0, events, 500):
            now = time.time()
            await publisher.publish(*(BenchIn(n=n, t0=now) for n in range(first, min(events, first + 500))))
        await asyncio.wait_for(sink.done.wait(), 600)
        elapsed = time.perf_counter() - started
        loaded = sink.latencies

        lone_latencies = []
        for n in range(lone):
            sink.expect(1)
            await publisher.publish(BenchIn(n=events + n, t0=time.time()))
            await asyncio.wait_for(sink.done.wait(), 60)
            lone_latencies.extend(sink.latencies)
        stats = worker.stats("step")
    return {
        "events_per_s": round(events / elapsed),
        "p50_ms_loaded": p50_ms(loaded),
        "p50_ms_lone": p50_ms(lone_latencies),
        "handled": stats.handled,
    }


async def drop_schema(url: str) -> None:
    import asyncpg

    from choreograph.stores._pg import parse_url

    config = parse_url(url)
    conn = await asyncpg.connect(config.dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{config.schema}" CASCADE')
    finally:
        await conn.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--lone", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    _gc.add_option(parser)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each path, interleaved; medians reported")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop (uvloop, as `choreograph run` uses when installed)")
    return parser.parse_args()


async def main(args: argparse.Namespace, loop_name: str) -> None:
    gc_report = _gc.choose(args.gc)
    backends = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    paths = [path for b in backends for path in (f"plain_{b}", f"tx_{b}", *(("floor_postgres",) if b == "postgres" else ()), f"state_{b}")]
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits every path alike
        for path in paths:
            with tempfile.TemporaryDirectory(prefix="choreograph-bench-outbox-") as tmp_:
                tmp = Path(tmp_)
                database = None
                if path in ("tx_sqlite", "state_sqlite"):
                    database = f"sqlite:///{tmp / 'state.db'}"
                elif path.endswith("_postgres"):
                    sep = "&" if "?" in args.postgres else "?"
                    database = f"{args.postgres}{sep}schema=bench_outbox_{uuid.uuid4().hex[:8]}"
                try:
                    runs[path].append(await run(path, tmp, database, args.events, args.lone, args.concurrency))
                finally:
                    if database is not None and database.startswith("postgres"):
                        await drop_schema(database)
    result: dict[str, Any] = {"events": args.events, "concurrency": args.concurrency, "bus": "sqlite",
                              "rounds": args.rounds, "loop": loop_name, **gc_report}
    for path in paths:
        figures = {key: statistics.median(r[key] for r in runs[path])
                   for key in ("events_per_s", "p50_ms_loaded", "p50_ms_lone")}
        figures["events_per_s_each"] = [r["events_per_s"] for r in runs[path]]
        result[path] = figures
    for backend in backends:
        tx, plain = result[f"tx_{backend}"], result[f"plain_{backend}"]
        tx["ratio"] = round(tx["events_per_s"] / plain["events_per_s"], 2)
    for backend in backends:
        plain, state = result[f"plain_{backend}"], result[f"state_{backend}"]
        for path in ("floor_postgres", f"state_{backend}"):
            if path in result:
                result[path]["ratio"] = round(result[path]["events_per_s"] / plain["events_per_s"], 2)
        tx = result[f"tx_{backend}"]
        tx["ratio_to_state"] = round(tx["events_per_s"] / state["events_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    options = parse_args()
    if options.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            options.loop = "asyncio"
        else:
            uvloop.run(main(options, "uvloop"))
    if options.loop == "asyncio":
        asyncio.run(main(options, "asyncio"))
