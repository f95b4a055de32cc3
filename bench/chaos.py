"""Chaos harness: N orders through the shop while its processes fail, hang, die and see double.

    python bench/chaos.py                                    # 500 orders on sqlite, 10 % faults
    python bench/chaos.py --broker nats --kill-every 2       # on the NATS server at 127.0.0.1:4222
    python bench/chaos.py --orders 5000 --fault-rate 0.2 --kill-every 3 --json   # docs/chaos.md
    python bench/chaos.py --broker redis --restart-broker 4 --min-restarts 3    # a private redis-server, killed

It runs every service of ``examples/shop`` as real ``choreograph run`` processes
(``--replicas`` of each, competing in the service's group, each service with its own
SQLite state under a fresh temporary directory) on the chosen bus, and meanwhile:

* **transient faults**: each handler attempt fails with probability ``--fault-rate``
  (``CHOREOGRAPH_FAULTS`` ``fail_rate``; the runtime retries it);
* **hangs**: with probability ``--hang-rate`` an attempt sleeps past the handler's
  timeout (``hang``; the attempt times out and is retried);
* **kills**: every ``--kill-every`` seconds a random replica gets SIGKILL (mid-handler,
  mid-commit, wherever it is) and is started again at once;
* **duplicates**: ``--duplicate-rate`` of all events on the bus are delivered a second
  time, same id and body (see ``bench/_chaos_bus.py``);
* **broker restarts** (``--restart-broker``): the bus is on a private server the harness
  starts on a free loopback port (``nats-server``, ``redis-server`` with its AOF fsynced per
  write, or a RabbitMQ node with the management API; ``tests/_private_brokers.py``, never
  the shared server), SIGKILLed and started again (same port and data) every N seconds.

Orders are published at ``--rate`` per second. The harness then waits until the orders
service has recorded every order as shipped or cancelled, stops the kills, waits until
no group has an event pending, and checks the invariants of ``bench/_chaos_shop.py``
from the services' own stores, the bus's dead letters, and what an observer group saw
on the bus. It prints a report (``--json``: one JSON document on stdout) and exits 1 on
any violation, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.shop._policy import RETRY, TIMEOUT  # noqa: E402
from examples.shop.app import app  # noqa: E402
from examples.shop.events import OrderPlaced  # noqa: E402
from tests._private_brokers import KINDS, PrivateBroker, Rabbit, missing  # noqa: E402

import choreograph  # noqa: E402
from bench._chaos_brokers import Bus, Groups, bus_for  # noqa: E402
from bench._chaos_bus import OBSERVER_GROUP, Observer  # noqa: E402
from bench._chaos_fleet import Fleet, ReplicaSpec, python_m  # noqa: E402
from bench._chaos_shop import (  # noqa: E402
    SERVICES,
    Check,
    Order,
    Stores,
    check_bus,
    check_dead_letters,
    check_stores,
    make_orders,
    seed,
)
from choreograph import Publisher  # noqa: E402
from choreograph.joins import DEADLINE  # noqa: E402
from choreograph.transports import open_transport  # noqa: E402

TARGET = "examples.shop.app:app"
UNSEEN_QUIET_S = TIMEOUT + 2.0
"""Seconds of quiet the settle asks for where what consumers hold unacknowledged cannot be
counted (RabbitMQ): longer than a handler may run, so whatever a consumer held when the quiet
began has since been settled, or retried into a holding queue (which is counted)."""
NATS_DEFAULT = "nats://127.0.0.1:4222"
BROKER_UP_SLACK_S = 2.0
"""Seconds after a restarted broker accepts connections during which it still counts as down."""
PUBLISH_RETRY_S = 120.0
"""How long a batch of orders is published again (same ids) before the run gives up: longer than
a broker restart takes (a RabbitMQ node needs 5-10 s)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/chaos.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--broker", default="sqlite", help="sqlite (a fresh bus file), nats (CHOREOGRAPH_NATS_URL or "
        f"{NATS_DEFAULT}) or a broker URL (nats, redis, amqp); a broker gets a unique prefix unless the URL "
        "has one")
    add("--orders", type=int, default=500, help="orders to place")
    add("--rate", type=float, default=100.0, help="orders published per second; 0: all at once")
    add("--fault-rate", type=float, default=0.1, help="share of handler attempts that fail transiently")
    add("--hang-rate", type=float, default=0.005, help=f"share of attempts that hang past the {TIMEOUT:g}s timeout")
    add("--kill-every", type=float, default=3.0, help="SIGKILL a random replica every N seconds; 0: never")
    add("--min-kills", type=int, default=0, help="keep the chaos going until at least this many kills")
    add("--restart-broker", type=float, default=0.0, metavar="SECONDS", help="run the bus on a private server "
        "started on a free port (--broker nats, redis or amqp), SIGKILL it and start it again every SECONDS; 0: "
        "never (the shared brokers are never restarted)")
    add("--min-restarts", type=int, default=0, help="keep the chaos going until at least this many broker restarts")
    add("--duplicate-rate", type=float, default=0.05, help="share of events delivered twice, and of "
        "succeeded steps failed anyway so that they run again")
    add("--replicas", type=int, default=2, help="processes per service")
    add("--concurrency", type=int, default=32, help="handlers at once per process")
    add("--lease", type=float, default=10.0, help="ack deadline of the bus (seconds): a killed process's "
        "work comes back after it")
    add("--join-window", type=float, default=None, help="seconds shipping waits for the second of payment "
        "and stock (unset: the shop's 60); shorter makes join timeouts, which may then cancel any order")
    add("--relay-lease", type=float, default=0.0, help="the service databases' relay_lease in seconds (0: the "
        "library's default, 10). A standby relay takes over from a killed claim holder at once whatever the "
        "lease (the holder's file lock dies with it); the lease matters only for owners without the lock")
    add("--seed", type=int, default=1, help="seeds the orders, the faults, the kills and the duplicates")
    add("--timeout", type=float, default=300.0, help="seconds to wait for every order to end, after the last")
    add("--settle-timeout", type=float, default=90.0, help="seconds to wait for the bus to be idle after that")
    add("--keep", action="store_true", help="keep the work directory (stores, bus, logs) and what the bus made "
        "on a broker (NATS streams, Redis keys, RabbitMQ queues)")
    add("--json", action="store_true", help="print the report as one JSON document on stdout")
    opts = parser.parse_args(argv)
    for name in ("fault_rate", "hang_rate", "duplicate_rate"):
        if not 0.0 <= getattr(opts, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if opts.orders < 1 or opts.replicas < 1 or opts.concurrency < 1 or opts.lease <= 0:
        parser.error("--orders, --replicas, --concurrency and --lease must be positive")
    if opts.min_kills and not opts.kill_every:
        parser.error("--min-kills needs --kill-every")
    if opts.restart_broker < 0 or opts.min_restarts and not opts.restart_broker:
        parser.error("--restart-broker must be positive, and --min-restarts needs it")
    if opts.restart_broker and opts.broker not in KINDS:
        parser.error(f"--restart-broker starts a server of its own: --broker must be one of {sorted(KINDS)}, "
                     f"not {opts.broker!r}")
    if opts.restart_broker and (how := missing(opts.broker)):
        parser.error(f"--restart-broker --broker {opts.broker}: {how}")
    if not opts.restart_broker and (problem := broker_problem(opts.broker)):
        parser.error(problem)  # exit 2 before anything is made: a SystemExit from the run was status 1, "FAIL"
    return opts


BUS_SCHEMES = ("sqlite", "nats", "redis", "amqp", "amqps")


def broker_problem(choice: str) -> str | None:
    """Why ``--broker`` cannot be run on, or None."""
    if choice in ("sqlite", "nats") or urlsplit(choice).scheme in BUS_SCHEMES:
        return None
    return f"--broker {choice!r}: expected sqlite, nats or a broker URL"


def broker_url(choice: str, workdir: Path, lease: float) -> str:
    if choice == "sqlite":
        return f"sqlite:///{workdir / 'bus.db'}?lease={lease:g}"
    if choice == "nats":
        choice = os.environ.get("CHOREOGRAPH_NATS_URL", NATS_DEFAULT)
    parts = urlsplit(choice)
    if (problem := broker_problem(choice)) is not None:
        raise SystemExit(f"bench/chaos.py: {problem}")
    query = dict(parse_qsl(parts.query))
    query.setdefault("lease", f"{lease:g}")
    if parts.scheme != "sqlite":
        query.setdefault("prefix", f"chaos-{uuid.uuid4().hex[:10]}")
    return urlunsplit(parts._replace(query=urlencode(query)))


def code_stamp() -> str:
    """A digest of the code under test (choreograph and the shop: paths, sizes, mtimes).

    A killed replica is restarted on the code as it is *then*: if the stamp changed
    during a run (an edit in the working tree), its result says little about either version.
    """
    digest = hashlib.sha1()
    for root in (Path(choreograph.__file__).parent, ROOT / "examples" / "shop"):
        for path in sorted(root.rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def fault_config(opts: argparse.Namespace, seed: int) -> str:
    spec: dict[str, Any] = {"fail_rate": opts.fault_rate, "duplicate_rate": opts.duplicate_rate, "seed": seed}
    if opts.hang_rate:
        spec.update(hang=TIMEOUT + 1.0, hang_rate=opts.hang_rate)
    return json.dumps({"*": spec})


class Harness:
    """One chaos run (see the module docstring)."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.workdir = Path(tempfile.mkdtemp(prefix="choreograph-chaos-"))
        self.data_dir = self.workdir / "shop"
        self.server: PrivateBroker | None = None  # the private broker of --restart-broker, once started
        self.url = "" if opts.restart_broker else broker_url(opts.broker, self.workdir, opts.lease)
        self.restarts: list[float] = []  # seconds each broker restart took (kill to accepting again)
        self.outages: list[tuple[float, float]] = []  # (killed, accepting again) per restart, time.monotonic()
        self.orders: list[Order] = make_orders(opts.orders, random.Random(opts.seed))
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        self.published = 0
        self.code = code_stamp()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def replicas(self) -> list[ReplicaSpec]:
        specs = []
        for service in app.services:
            argv = python_m("choreograph", "run", TARGET, "--service", service.name, "--broker", self.url,
                            "--store", f"sqlite:///{self.workdir / 'inbox' / service.name}.db",
                            "--log-level", "WARNING", "--concurrency", str(self.opts.concurrency),
                            "--drain-timeout", "5")
            for n in range(1, self.opts.replicas + 1):
                specs.append(ReplicaSpec(f"{service.name}.{n}", service.name, argv))
        return specs

    def env_for(self, spec: ReplicaSpec, lifetime: int) -> dict[str, str]:
        fault_seed = random.Random(f"{self.opts.seed}/{spec.name}/{lifetime}").randrange(2**31)
        return {
            "CHOREOGRAPH_DATA_DIR": str(self.data_dir),
            "CHOREOGRAPH_FAULTS": fault_config(self.opts, fault_seed),
            "CHOREOGRAPH_RESTARTS": str(lifetime),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "300",
            **({"SHOP_SHIPPING_WAIT": str(self.opts.join_window)} if self.opts.join_window else {}),
            **({f"SHOP_DATABASE_{name.upper()}": f"sqlite:///{self.data_dir / name}.db?relay_lease={lease:g}"
                for name in SERVICES} if (lease := self.opts.relay_lease) else {}),
        }

    async def publish(self, publisher: Publisher) -> None:
        rate, run = self.opts.rate, uuid.uuid4().hex
        batch = max(1, int(rate / 20)) if rate else 100
        start = time.monotonic()
        for first in range(0, len(self.orders), batch):
            chunk = self.orders[first : first + batch]
            events = [OrderPlaced(**order.data()) for order in chunk]
            ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run}/{order.order_id}")) for order in chunk]
            give_up = time.monotonic() + PUBLISH_RETRY_S
            while True:  # same ids again: a publish that failed late is deduped downstream
                try:
                    await publisher.publish(*events, ids=ids)
                    break
                except Exception as exc:
                    if time.monotonic() > give_up:
                        raise
                    self.say(f"publish failed ({exc}); retrying")
                    await asyncio.sleep(0.5)
            self.published += len(chunk)
            if rate:
                await asyncio.sleep(max(0.0, start + self.published / rate - time.monotonic()))

    async def wait_ended(self, stores: Stores, fleet: Fleet, timeout_after_publish: float,
                         publishing: asyncio.Task[None], restarting: asyncio.Task[None] | None) -> bool:
        last = 0.0
        deadline: float | None = None
        while True:
            ended = await asyncio.to_thread(stores.ended)
            if restarting is not None and restarting.done():
                restarting.result()  # a broker that did not come back ends the run
            if publishing.done():
                publishing.result()
                deadline = deadline or time.monotonic() + timeout_after_publish
            if (ended >= len(self.orders) and publishing.done() and len(fleet.kills) >= self.opts.min_kills
                    and len(self.restarts) >= self.opts.min_restarts):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            if time.monotonic() - last >= 5.0:
                last = time.monotonic()
                outcomes = await asyncio.to_thread(stores.outcomes)
                self.say(f"published {self.published}/{len(self.orders)}, ended {ended} {outcomes}, "
                         f"kills {len(fleet.kills)}, broker restarts {len(self.restarts)}, "
                         f"retries {fleet.counts.retries}")
            await asyncio.sleep(0.5)

    async def start_server(self) -> None:
        """Start the private broker of ``--restart-broker`` (a RabbitMQ node with its management
        API, which counts what AMQP cannot) and put the bus on it."""
        kind = self.opts.broker
        self.server = await asyncio.to_thread(lambda: Rabbit(management=True) if kind == "amqp" else KINDS[kind]())
        self.url = self.server.url(self.opts.lease, "chaos")

    async def restart_every(self, seconds: float, until: asyncio.Event) -> None:
        """SIGKILL the private broker and start it again (same port, same data) every ``seconds``
        until ``until`` is set. Everything connected to it rides the restart out or fails the run."""
        server = self.server
        assert server is not None
        while not until.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), seconds)
                return
            began = time.monotonic()
            self.outages.append((began, float("inf")))
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            self.outages[-1] = (began, time.monotonic())
            self.restarts.append(round(time.monotonic() - began, 2))
            self.say(f"broker SIGKILLed and started again (restart {len(self.restarts)}, "
                     f"{self.restarts[-1]:.1f}s until it accepted connections)")

    def broker_down(self, start: float, end: float) -> bool:
        """Whether a broker restart overlapped ``start``-``end`` (``BROKER_UP_SLACK_S`` after the
        broker accepted connections again counts: a client may still be reconnecting)."""
        return any(killed <= end and start <= up + BROKER_UP_SLACK_S for killed, up in self.outages)

    @staticmethod
    def groups() -> Groups:
        """Every group on the bus, and whether it takes join deadline timers."""
        return {s.group: DEADLINE in s.subscriptions for s in app.services} | {OBSERVER_GROUP: False}

    async def settle(self, bus: Bus, observer: Observer, stores: Stores, timeout: float,
                     as_of: float | None = None) -> tuple[dict[str, int] | None, dict[str, int]]:
        """Wait until no group has an event pending (join timers not yet due aside) and every service's
        outbox is sent; the last backlog (``None``: not readable on this broker) and unsent rows.

        Three polls in a row, a second apart, must say so. Where the bus cannot count what consumers
        hold unacknowledged (RabbitMQ), the quiet must also have lasted ``UNSEEN_QUIET_S`` with no
        new event seen by the observer. ``as_of``: when the timer-taking services were stopped."""
        groups = self.groups()
        deadline = time.monotonic() + timeout
        quiet, shown, seen, quiet_since = 0, time.monotonic(), -1, time.monotonic()
        backlog: dict[str, int] | None = None
        unsent: dict[str, int] = {}
        while time.monotonic() < deadline:
            await observer.copies_done()
            backlog = await bus.backlog(groups, observer, as_of)
            unsent = await asyncio.to_thread(stores.unsent)
            idle = not any((backlog or {}).values()) and not any(unsent.values())
            if not bus.sees_unacked:
                idle, seen = idle and observer.observed == seen, observer.observed
            quiet, quiet_since = (quiet + 1, quiet_since) if idle else (0, time.monotonic())
            if quiet >= 3 and (bus.sees_unacked or time.monotonic() - quiet_since >= UNSEEN_QUIET_S):
                return backlog, unsent
            if not quiet and time.monotonic() - shown >= 5.0:
                shown = time.monotonic()
                waiting = {g: n for g, n in (backlog or {}).items() if n} | {
                    f"{s} outbox": n for s, n in unsent.items() if n}
                self.say(f"waiting for the bus to be idle: pending {waiting} {bus.detail or ''}")
            await asyncio.sleep(1.0)
        return backlog, unsent

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        if opts.restart_broker:
            await self.start_server()
        try:
            return await self._run()
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.destroy)

    async def _run(self) -> dict[str, Any]:
        opts = self.opts
        self.say(f"work dir {self.workdir}; bus {self.url}" + (" (private server)" if self.server else ""))
        balances, stock = seed(self.data_dir)
        transport = open_transport(self.url)
        await transport.connect()
        management = self.server.management_url if isinstance(self.server, Rabbit) else None
        bus = bus_for(self.url, transport, longest_retry=RETRY.max_interval, management_url=management)
        await bus.start()
        observer = Observer(transport, bus.republish, duplicate_rate=opts.duplicate_rate,
                            rng=random.Random(f"{opts.seed}/duplicates"))
        for service in app.services:  # every group exists before the first order
            await (await transport.subscribe(service.group, sorted(service.subscriptions))).close()
        await observer.register()
        observer.start()
        fleet = Fleet(self.replicas(), env_for=self.env_for, logs=self.workdir / "logs",
                      rng=random.Random(f"{opts.seed}/kills"), cwd=ROOT, say=self.say,
                      broker_down=self.broker_down if opts.restart_broker else None)
        checks: list[Check] = []
        try:
            await fleet.start()
            self.say(f"{len(fleet.replicas)} processes ready; placing {len(self.orders)} orders")
            self.marks["start"] = time.monotonic()
            calm = asyncio.Event()
            killing = asyncio.create_task(fleet.kill_every(opts.kill_every, calm)) if opts.kill_every else None
            restarting = (asyncio.create_task(self.restart_every(opts.restart_broker, calm))
                          if opts.restart_broker else None)
            publishing = asyncio.create_task(self.publish(Publisher(transport, source="/chaos")))
            with Stores(self.data_dir) as stores:
                ended = await self.wait_ended(stores, fleet, opts.timeout, publishing, restarting)
                self.marks["ended"] = time.monotonic()
                calm.set()
                if killing is not None:
                    await killing
                if restarting is not None:
                    await restarting
                self.say("every order ended" if ended else f"orders still open after {opts.timeout:g}s")
                backlog, unsent = await self.settle(bus, observer, stores, opts.settle_timeout)
                stopped_at = time.time()
                if not bus.sees_unacked:
                    # What is left is counted once the consumers have stopped. First those that take
                    # join timers: a timer falling due may publish (a join timing out announces its
                    # arrivals' failures), and nothing the others have not handled may be left when
                    # they stop in turn.
                    await fleet.stop([s.name for s in app.services if DEADLINE in s.subscriptions])
                    backlog, unsent = await self.settle(bus, observer, stores, opts.settle_timeout, stopped_at)
                self.marks["settled"] = time.monotonic()
                await observer.stop()
                letters = await transport.dead_letters(None, limit=1_000_000)
                await fleet.stop()
                final = await bus.final_backlog(self.groups(), observer, stopped_at)
                backlog = backlog if final is None else final
                self.say("stopped; checking invariants")
                status = dict(stores.rows("orders", "SELECT order_id, status FROM orders"))
                checks += check_stores(stores, self.orders, balances, stock,
                                       join_timeouts=self.opts.join_window is not None)
                checks += check_bus(self.orders, observer.ids, status)
                letters_check, reasons = check_dead_letters(letters, self.orders)
                checks.append(letters_check)
                checks += self.runtime_checks(backlog, unsent, fleet, bus)
                return self.report(stores, fleet, observer, checks, reasons, len(letters), backlog, unsent)
        finally:
            await fleet.stop()  # no-op once stopped
            await observer.stop()
            await transport.close()
            await bus.close(keep=opts.keep)
            if not opts.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def open_orders(self, stores: Stores, observer: Observer, limit: int = 20) -> dict[str, list[str]]:
        """For orders that did not end: which events the observer saw for each (where the saga stopped)."""
        ended = {row[0] for row in stores.rows("orders", "SELECT order_id FROM orders")}
        open_ = [o.order_id for o in self.orders if o.order_id not in ended][:limit]
        return {oid: sorted(f"{kind} x{len(ids)}" for kind, ids in observer.ids.get(oid, {}).items())
                for oid in open_}

    def runtime_checks(self, backlog: dict[str, int] | None, unsent: dict[str, int], fleet: Fleet,
                       bus: Bus) -> list[Check]:
        if backlog is None:
            pending = Check("no event left pending", True, f"not checked on {urlsplit(self.url).scheme}")
        else:
            stuck = {group: n for group, n in backlog.items() if n}
            what = {group: bus.detail.get(group, "") for group in stuck}
            idle = f"{len(backlog)} groups idle ({bus.how})"
            pending = Check("no event left pending", not stuck, f"pending: {stuck} ({what})" if stuck else idle)
        counts = fleet.counts
        left = {service: n for service, n in unsent.items() if n}
        return [
            pending,
            Check("every committed event published (service outboxes empty)", not left and len(unsent) == 4,
                  f"unsent outbox rows: {left}" if left else f"{len(unsent)} service databases"),
            Check("no internal error in the workers", counts.internal_errors == 0,
                  "; ".join(s for s in counts.samples if "internal error" in s)[:500] or "none"),
            Check("no process died unless killed", not fleet.unexpected_exits,
                  "; ".join(fleet.unexpected_exits[:5]) or f"{len(fleet.kills)} kills, all restarted" + (
                      f"; {len(fleet.startup_exits)} processes exited at start-up while the broker was down, "
                      "restarted" if fleet.startup_exits else "")),
        ]

    def report(self, stores: Stores, fleet: Fleet, observer: Observer, checks: list[Check],
               reasons: dict[str, int], letters: int, backlog: dict[str, int] | None,
               unsent: dict[str, int]) -> dict[str, Any]:
        opts, counts, marks = self.opts, fleet.counts, self.marks
        outcomes = stores.outcomes()
        compensations = stores.compensations()
        to_end = marks["ended"] - marks["start"]
        return {
            "ok": all(c.ok for c in checks),
            "broker": urlsplit(self.url).scheme,
            "private_server": self.server is not None,
            "orders": len(self.orders),
            "settings": {
                "fault_rate": opts.fault_rate, "hang_rate": opts.hang_rate, "kill_every_s": opts.kill_every,
                "duplicate_rate": opts.duplicate_rate, "replicas": opts.replicas, "rate": opts.rate,
                "lease_s": opts.lease, "concurrency": opts.concurrency, "seed": opts.seed,
                "processes": len(fleet.replicas), "join_window_s": opts.join_window, "min_kills": opts.min_kills,
                "relay_lease_s": opts.relay_lease, "restart_broker_s": opts.restart_broker,
                "min_restarts": opts.min_restarts,
            },
            "outcomes": {"shipped": outcomes.get("shipped", 0), "cancelled": outcomes.get("cancelled", 0),
                         "must_ship": sum(o.must_ship for o in self.orders)},
            "faults": {
                "transient": counts.transient_faults, "hangs": counts.hangs,
                "handler_timeouts": counts.timeouts, "kills": len(fleet.kills),
                "duplicates": observer.duplicated + counts.reruns,
                "duplicate_copies": observer.duplicated, "duplicate_reruns": counts.reruns,
                "broker_restarts": len(self.restarts), "broker_restart_s": self.restarts,
                "startup_exits_broker_down": len(fleet.startup_exits),
            },
            "retries": counts.retries,
            "dead_letters": {"total": letters, "by_group_reason": reasons},
            "compensations": {**compensations, "total": sum(compensations.values())},
            "events": {"distinct": len(observer.seen), "deliveries_to_observer": observer.observed,
                       "observer_fetch_failures": observer.failures},
            "pending": backlog,
            "outbox_unsent": unsent,
            "invariants": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
            "errors": {"internal": counts.internal_errors, "other": counts.other_errors,
                       "samples": counts.samples[:10], "unexpected_exits": fleet.unexpected_exits},
            "duration_s": {
                "total": round(time.monotonic() - self.t0, 1),
                "orders_to_end": round(to_end, 1),
                "settle": round(marks["settled"] - marks["ended"], 1),
            },
            "orders_per_s": round(len(self.orders) / to_end, 1) if to_end else None,
            "order_latency_s": observer.latencies(),
            "open_orders": self.open_orders(stores, observer),
            "code_changed_during_run": code_stamp() != self.code,
            "workdir": str(self.workdir) if opts.keep else None,
        }


def print_report(report: dict[str, Any]) -> None:
    f, o, d = report["faults"], report["outcomes"], report["duration_s"]
    lines = [
        f"chaos on {report['broker']}{' (a private server)' if report['private_server'] else ''}: "
        f"{report['orders']} orders -> shipped {o['shipped']}, "
        f"cancelled {o['cancelled']} in {d['orders_to_end']}s ({report['orders_per_s']} orders/s; "
        f"placed to ended {report['order_latency_s']})",
        f"faults: {f['transient']} transient, {f['hangs']} hangs ({f['handler_timeouts']} timeouts), "
        f"{f['kills']} kills, {f['duplicates']} duplicates ({f['duplicate_copies']} copies on the bus, "
        f"{f['duplicate_reruns']} steps run again), {f['broker_restarts']} broker restarts; "
        f"retries {report['retries']}",
        f"compensations: {report['compensations']}; dead letters: {report['dead_letters']}",
    ]
    for check in report["invariants"]:
        lines.append(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['name']}: {check['detail']}")
    if report["open_orders"]:
        lines.append(f"open orders (events seen on the bus): {report['open_orders']}")
    if report["code_changed_during_run"]:
        lines.append("WARNING: the code under test changed during the run (restarted processes ran the new code)")
    lines.append("PASS: every invariant holds" if report["ok"] else "FAIL: invariant violated")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    harness = Harness(opts)
    report = asyncio.run(harness.run())
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
