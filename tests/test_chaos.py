"""The chaos harness (bench/chaos.py) in CI: the shop keeps every invariant under faults, on every broker.

Each run places 500 orders through the shop's services, each service two real
processes, while 10 % of handler attempts fail, some hang past their timeout, a random
process is SIGKILLed every two seconds (at least three times) and 5 % of events are
delivered twice. The harness exits 0 only if every invariant holds (see
bench/_chaos_shop.py); the JSON report shows the chaos actually happened. ``choreograph chaos``
forwards to the same harness. Its "no event left pending" counts what each broker holds
(bench/_chaos_brokers.py); the tests below the runs show those counts see what they must. A
short run with ``--restart-broker`` SIGKILLs and restarts a private redis-server under the shop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import pytest
from bench._chaos_amqp import AmqpBus
from bench._chaos_brokers import RedisBus
from bench._chaos_bus import Observer

from choreograph.joins import DEADLINE
from choreograph.transports._amqp_wire import retry_bucket_ms
from choreograph.transports.amqp import AmqpTransport
from choreograph.transports.base import Delivery, Message, Transport
from choreograph.transports.redis import RedisTransport
from tests._brokers import require_broker
from tests._rabbitmq_server import require_binary
from tests.conformance.brokers import amqp as amqp_bus
from tests.conformance.brokers import nats as nats_bus
from tests.conformance.brokers import redis as redis_bus

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = [
    "--orders", "500", "--rate", "50", "--fault-rate", "0.1", "--hang-rate", "0.005", "--duplicate-rate", "0.05",
    "--kill-every", "2", "--min-kills", "3", "--seed", "7", "--timeout", "120", "--settle-timeout", "60",
]


def chaos(*args: str) -> dict[str, Any]:
    """Run the harness; fail with its failed invariants and the tail of its log unless it exits 0."""
    done = subprocess.run(
        [sys.executable, "bench/chaos.py", "--json", *CI_RUN, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    report: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    failed = [check for check in report.get("invariants", []) if not check["ok"]]
    assert done.returncode == 0, f"exit {done.returncode}; violated: {failed}\n{done.stderr[-3000:]}"
    return report


def assert_the_chaos_happened(report: dict[str, Any]) -> None:
    assert report["ok"] and len(report["invariants"]) >= 12 and all(c["ok"] for c in report["invariants"])
    faults = report["faults"]
    assert faults["kills"] >= 3
    assert faults["transient"] > 0 and faults["duplicates"] > 0
    assert report["retries"] >= faults["transient"]
    outcomes = report["outcomes"]
    assert outcomes["shipped"] + outcomes["cancelled"] == report["orders"] == 500
    assert outcomes["shipped"] >= outcomes["must_ship"] > 0 and outcomes["cancelled"] > 0
    compensations = report["compensations"]
    assert compensations["refunds"] > 0 and compensations["releases"] > 0 and compensations["cancellations"] > 0
    assert set(report["dead_letters"]["by_group_reason"]) <= {"shipping:rejected"}



#: The groups whose pending deliveries the harness counts: the shop's services and its observer.
SHOP_GROUPS = {"orders", "payment", "inventory", "shipping", "chaos-observer"}


def chaos_on(url: str, cleanup: Callable[[str], Awaitable[None]]) -> dict[str, Any]:
    """The CI run on the broker bus at ``url``, checked; ``cleanup`` deletes the bus afterwards
    (the harness deletes what it made; this covers a crash)."""
    try:
        report = chaos("--broker", url)
        assert_the_chaos_happened(report)
        return report
    finally:
        asyncio.run(cleanup(url))

@pytest.mark.slow
def test_the_shop_keeps_its_invariants_under_chaos_on_sqlite() -> None:
    assert_the_chaos_happened(chaos("--broker", "sqlite"))


@pytest.mark.slow
def test_the_shop_keeps_its_invariants_under_chaos_on_nats() -> None:
    require_broker("nats")
    chaos_on(nats_bus.url(f"chaos-{uuid.uuid4().hex[:8]}", lease=10.0), nats_bus.cleanup)


def shared_redis_url(unique: str, *, lease: float) -> str:
    """A bus with its own key prefix on the shared Redis (the conformance suite's ``redis.url`` would
    start a private server with an fsync per write: not the deployment a chaos run stands for)."""
    parts = urlsplit(require_broker("redis"))
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("lease", "prefix")]
    query += [("lease", repr(lease)), ("prefix", f"choreograph-test-{unique}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.mark.slow
def test_the_shop_keeps_its_invariants_under_chaos_on_redis() -> None:
    report = chaos_on(shared_redis_url(f"chaos-{uuid.uuid4().hex[:8]}", lease=10.0), redis_bus.cleanup)
    assert set(report["pending"]) == SHOP_GROUPS


@pytest.mark.slow
def test_the_shop_keeps_its_invariants_under_chaos_on_amqp() -> None:
    require_broker("amqp")
    report = chaos_on(amqp_bus.url(f"chaos-{uuid.uuid4().hex[:8]}", lease=10.0), amqp_bus.cleanup)
    assert set(report["pending"]) == SHOP_GROUPS


@pytest.mark.slow
def test_the_shop_keeps_its_invariants_while_its_private_redis_is_sigkilled_and_restarted() -> None:
    """The --restart-broker mode, kept short for CI (about 9 s): Redis restarts fastest. Longer
    runs on NATS, Redis and RabbitMQ are in docs/chaos.md."""
    report = chaos("--broker", "redis", "--restart-broker", "1", "--min-restarts", "2", "--orders", "100",
                   "--rate", "0", "--kill-every", "0", "--min-kills", "0", "--hang-rate", "0")
    assert report["ok"] and report["broker"] == "redis" and report["private_server"]
    assert report["faults"]["broker_restarts"] >= 2 and report["faults"]["transient"] > 0
    assert report["outcomes"]["shipped"] + report["outcomes"]["cancelled"] == 100


def timer(due: float) -> Message:
    """A join deadline timer as the bus carries it (only ``data.due`` matters to the backlog)."""
    return Message(uuid.uuid4().hex, DEADLINE, orjson.dumps({"type": DEADLINE, "data": {"due": due}}))


def events(n: int) -> list[Message]:
    return [Message(uuid.uuid4().hex, "chaos.test", b"{}") for _ in range(n)]


def observer_of(transport: Transport, timers: dict[str, float] | None = None) -> Observer:
    """An observer (not consuming) that knows of ``timers`` (id -> due), seen now."""
    observer = Observer(transport, lambda m: transport.publish([m]), duplicate_rate=0.0, rng=random.Random(0))
    observer.timers = dict(timers or {})
    observer.timer_seen = dict.fromkeys(observer.timers, time.time())
    return observer


async def test_the_redis_backlog_counts_unacked_undelivered_and_delayed_but_not_a_timer_not_yet_due() -> None:
    url = shared_redis_url(f"backlog-{uuid.uuid4().hex[:8]}", lease=30.0)
    transport = RedisTransport(url)
    await transport.connect()
    bus = RedisBus(url, transport)
    await bus.start()
    observer = observer_of(transport)
    try:
        sub = await transport.subscribe("g", ["chaos.test", DEADLINE])
        await transport.publish([*events(3), timer(time.time() + 60), timer(time.time() - 60)])
        assert await bus.backlog({"g": True}, observer) == {"g": 4}  # undelivered; one due in 60 s: scheduled
        got = await sub.fetch(10, timeout=2.0)
        assert len(got) == 5
        assert await bus.backlog({"g": True}, observer) == {"g": 4}  # delivered, not acknowledged
        first, second, *_ = [d for d in got if d.message.type == "chaos.test"]
        timers = [d for d in got if d.message.type == DEADLINE]
        not_due = next(d for d in timers if orjson.loads(d.message.body)["data"]["due"] > time.time())
        await first.retry(30.0)
        await not_due.retry(60.0)
        await second.ack()
        assert await bus.backlog({"g": True}, observer) == {"g": 3}  # delayed, unacked, the overdue timer
        await sub.ack_many([d for d in got if not d.settled])
        assert await bus.backlog({"g": True}, observer) == {"g": 1}  # the delayed retry
        assert "2 delayed, 1 of them timers not yet due" in bus.detail["g"]
    finally:
        await transport.close()
        await bus.close(keep=False)
    async with RedisTransport(url) as reader:
        assert await reader.groups() == {}  # close deleted the bus's keys


async def test_the_rabbitmq_backlog_counts_ready_and_retrying_and_what_consumers_held_once_stopped() -> None:
    require_broker("amqp")
    url = amqp_bus.url(f"backlog-{uuid.uuid4().hex[:8]}", lease=30.0)
    transport = AmqpTransport(url)
    await transport.connect()
    bus = AmqpBus(url, transport, longest_retry=30.0)  # the retries below stay in their queues meanwhile
    await bus.start()
    nobody = observer_of(transport)
    try:
        sub = await transport.subscribe("g", ["chaos.test"])
        await transport.publish(events(4))
        assert await bus.backlog({"g": False}, nobody) == {"g": 4}
        got: list[Delivery] = []
        while len(got) < 4:
            got += await sub.fetch(4 - len(got), timeout=5.0)
        assert await bus.backlog({"g": False}, nobody) == {"g": 0}  # held by a consumer: not seen over AMQP
        await got[0].retry(10.0)  # into a holding queue of retries
        await got[1].retry(60.0)  # longer than any retry of the policy: where only join timers wait
        await got[2].ack()
        await sub.close()  # the consumer stops: the broker has got[3] back
        assert await bus.final_backlog({"g": False}, nobody, time.time()) == {"g": 2}
        assert await bus.backlog({"g": True}, nobody) == {"g": 2}
        assert bus.detail["g"].endswith("1 timers waiting")
        due_now = observer_of(transport, {"t1": time.time(), "t2": time.time() + 0.5})
        assert await bus.backlog({"g": True}, due_now) == {"g": 0}  # two timers falling due may be those
        due_later = observer_of(transport, {"t1": time.time() + 50, "t2": time.time() + 50})
        assert await bus.backlog({"g": True}, due_later) == {"g": 2}  # not timers: those are not due for long
    finally:
        await transport.close()
        await bus.close(keep=False)
    async with AmqpTransport(url) as reader:
        assert await reader.groups() == {}  # close deleted the bus's queues


@pytest.mark.slow
async def test_the_rabbitmq_backlog_counts_a_retry_held_in_dead_letter_transit_by_the_management_api() -> None:
    """A retry copy RabbitMQ holds between its holding queue and the group (at-least-once dead
    lettering, here because the target exchange does not exist; after a node restart, until
    ``dead_letter_worker_publisher_confirm_timeout``) is neither ready nor unacknowledged: a
    passive declare misses it, the management API's ``messages`` counts it."""
    import aiormq

    from tests._private_brokers import Rabbit

    require_binary()
    server = await asyncio.to_thread(Rabbit, management=True)
    try:
        url = server.url(30.0, "backlog")
        async with AmqpTransport(url) as transport:
            await (await transport.subscribe("g", ["chaos.test"])).close()
            retry_queue = transport.names.retry("g", retry_bucket_ms(1.0))
            connection = await aiormq.connect(server.node.url)
            channel = await connection.channel()
            await channel.queue_declare(retry_queue, durable=True, arguments={
                "x-queue-type": "quorum", "x-overflow": "reject-publish", "x-message-ttl": 100,
                "x-dead-letter-strategy": "at-least-once", "x-dead-letter-exchange": "chaos-nowhere"})
            await channel.basic_publish(b"{}", routing_key=retry_queue)
            await asyncio.sleep(0.5)  # expired, and held: its target exchange does not exist
            await connection.close()
            nobody = observer_of(transport)
            by_declares = AmqpBus(url, transport, longest_retry=30.0)
            by_api = AmqpBus(url, transport, longest_retry=30.0, management_url=server.management_url)
            await by_declares.start()
            try:
                assert await by_declares.final_backlog({"g": False}, nobody, time.time()) == {"g": 0}
                assert await by_api.final_backlog({"g": False}, nobody, time.time()) == {"g": 1}
                assert by_api.detail["g"] == "1 held (1 in dead-letter transit)"
            finally:
                await by_declares.close(keep=True)
                await by_api.close(keep=True)
    finally:
        await asyncio.to_thread(server.destroy)


def test_restart_broker_runs_only_on_a_private_nats_redis_or_rabbitmq_server() -> None:
    done = subprocess.run([sys.executable, "bench/chaos.py", "--restart-broker", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--restart-broker starts a server of its own: --broker must be one of ['amqp', 'nats', 'redis']" in (
        done.stderr)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "choreograph", "chaos", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_choreograph_chaos_hands_the_options_after_app_to_the_harness() -> None:
    done = cli("examples.shop.app:app", "--orders", "0")
    assert done.returncode == 2 and "bench/chaos.py: error: --orders" in done.stderr


def test_choreograph_chaos_without_app_runs_the_shop_with_the_options_given_first() -> None:
    done = cli("--orders", "0")
    assert done.returncode == 2 and "bench/chaos.py: error: --orders" in done.stderr


def test_choreograph_chaos_refuses_a_broker_it_cannot_run_on_as_a_usage_error() -> None:
    """Exit status 1 is the harness's "an invariant was violated": a mistyped --broker ended
    with it (a SystemExit from the run, after its work directory was made)."""
    done = cli("--broker", "nope", "--orders", "1")
    assert done.returncode == 2, done
    assert "bench/chaos.py: error: --broker 'nope': expected sqlite, nats or a broker URL" in done.stderr


def test_choreograph_chaos_names_the_apps_it_has_a_scenario_for() -> None:
    done = cli("examples.drone_delivery.app:app")
    assert done.returncode == 2 and "no chaos scenario" in done.stderr and "examples.shop.app:app" in done.stderr


def test_choreograph_chaos_says_why_the_harness_failed_to_import(tmp_path: Path) -> None:
    """A checkout whose harness is there but cannot be imported (``pip install choreograph``
    without the dev extra: no pytest) gets the import error, not "bench/chaos.py not found"."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "chaos.py").write_text("import a_dependency_not_installed\n")
    done = subprocess.run([sys.executable, "-m", "choreograph", "chaos", "--orders", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "not found" not in done.stderr
    assert "bench/chaos.py failed to import" in done.stderr
    assert "No module named 'a_dependency_not_installed'" in done.stderr


def test_choreograph_chaos_outside_a_checkout_says_the_harness_is_not_there(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "choreograph", "chaos", "--orders", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "bench/chaos.py not found; run it from a source checkout" in done.stderr


def test_an_order_that_payment_or_inventory_never_decided_is_a_violation(tmp_path: Path) -> None:
    """An OrderPlaced lost for inventory hides behind a cancellation (here payment declined it,
    so nothing was reserved to release): the orders table alone looks fine, the new invariant
    names the order. Found on RabbitMQ with the broker SIGKILLed mid-run (docs/chaos.md, 15)."""
    from bench._chaos_shop import Order, Stores, check_stores, seed

    balances, stock = seed(tmp_path)

    def write(db: str, sql: str, args: tuple[Any, ...]) -> None:
        with contextlib.closing(sqlite3.connect(tmp_path / f"{db}.db")) as conn, conn:
            conn.execute(sql, args)

    orders = [Order("o-1", "chaos-nobody", "chaos-widget-0", 1, 100),
              Order("o-2", "chaos-nobody", "chaos-widget-0", 1, 100)]
    with Stores(tmp_path) as stores:
        for order in orders:
            write("orders", "INSERT INTO orders VALUES (?, 'cancelled', 'PaymentDeclined')", (order.order_id,))
            write("payment", "INSERT INTO payments VALUES (?, ?, ?, 'declined', 'unknown customer')",
                         (order.order_id, order.customer, order.amount))
        write("inventory", "INSERT INTO reservations VALUES ('o-1', 'chaos-widget-0', 1, 'released', 9)", ())

        def decided() -> Any:
            (check,) = [c for c in check_stores(stores, orders, balances, stock) if "decided" in c.name]
            return check

        assert not decided().ok and decided().detail == "no inventory decision for o-2"
        write("inventory", "INSERT INTO reservations VALUES ('o-2', 'chaos-widget-0', 1, 'released', 9)", ())
        assert decided().ok
