"""Drone Delivery end to end: real processes (``choreograph dev``), real HTTP, a SQLite bus in tmp_path.

Each service runs in its own process; the test talks to the ingestion gateway and the
journal over HTTP, and checks the services' own stores for the invariants that matter
(a drone is never assigned twice, a delivery is scheduled once).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.examples._system import DevSystem, alive, delivery, free_port

pytestmark = pytest.mark.slow

SystemFactory = Callable[..., DevSystem]


@pytest.fixture
def system(tmp_path: Path) -> Iterator[SystemFactory]:
    """Start ``choreograph dev`` for the app (with faults / fleet as asked); stopped after the test."""
    started: list[DevSystem] = []

    def start(**options: Any) -> DevSystem:
        dev = DevSystem(tmp_path / f"system{len(started)}", **options)
        started.append(dev)
        return dev.start()

    yield start
    for dev in started:
        dev.stop()


def types_of(tx: dict[str, Any]) -> list[str]:
    return [entry["type"] for entry in tx["timeline"]]


def assert_no_drone_assigned_twice(dev: DevSystem) -> None:
    assignments = dev.query(
        "drone-scheduler", "SELECT delivery_id, drone_id FROM assignments WHERE released_at IS NULL"
    )
    drones = [drone for _, drone in assignments]
    assert len(drones) == len(set(drones)), f"a drone holds two deliveries: {sorted(drones)}"
    holders = dev.query(
        "drone-scheduler", "SELECT drone_id, delivery_id FROM drones WHERE delivery_id IS NOT NULL"
    )
    assert sorted(holders) == sorted((drone, delivery_id) for delivery_id, drone in assignments)


def test_a_delivery_request_reaches_delivery_scheduled(system: SystemFactory) -> None:
    dev = system()
    body = delivery(weight_kg=3.5)
    response = dev.request(body)
    assert response.status_code == 202
    assert response.headers["Location"] == f"/transactions/{response.json()['correlation_id']}"

    tx = dev.wait_final(response.json()["correlation_id"])

    assert tx["status"] == "completed"
    assert types_of(tx) == [
        "drone.delivery.requested",
        "drone.package.created",
        "drone.drone.assigned",
        "drone.delivery.scheduled",
    ]
    assert [e["service"] for e in tx["timeline"][1:]] == ["package", "drone-scheduler", "delivery"]
    (drone,) = dev.query(
        "drone-scheduler", "SELECT drone_id FROM assignments WHERE delivery_id = ?", body["delivery_id"]
    )
    scheduled = dev.query(
        "delivery", "SELECT package_id, drone_id FROM deliveries WHERE delivery_id = ?", body["delivery_id"]
    )
    assert scheduled == [(body["package_id"], drone[0])]
    assert dev.query("package", "SELECT status FROM packages WHERE delivery_id = ?", body["delivery_id"]) == [
        ("created",)
    ]


def test_an_invalid_request_is_refused_with_the_bad_fields_named(system: SystemFactory) -> None:
    dev = system()
    response = dev.request(delivery(weight_kg=-1, pickup=""))
    assert response.status_code == 422
    assert {error["path"] for error in response.json()["errors"]} == {"$.weight_kg", "$.pickup"}


@pytest.mark.parametrize(
    ("case", "faults", "weight", "reason"),
    [
        ("too heavy for any drone", None, 45.0, "rejected"),
        ("assignment always failing", {"drone-scheduler": {"fail_rate": 1.0}}, 2.0, "max_attempts"),
    ],
)
def test_when_drone_assignment_gives_up_the_package_is_cancelled_and_the_journal_says_compensated(
    system: SystemFactory, case: str, faults: dict[str, Any] | None, weight: float, reason: str
) -> None:
    dev = system(faults=faults)
    body = delivery(weight_kg=weight)

    tx = dev.wait_final(dev.submit(body))

    assert tx["status"] == "compensated", case
    assert types_of(tx) == [
        "drone.delivery.requested",
        "drone.package.created",
        "choreograph.failed",
        "drone.delivery.cancelled",
    ]
    failure = tx["timeline"][2]
    assert (failure["service"], failure["record"]["reason"]) == ("drone-scheduler", reason)
    assert dev.query("package", "SELECT status FROM packages WHERE delivery_id = ?", body["delivery_id"]) == [
        ("cancelled",)
    ]
    # The scheduler reacts to the cancellation too (it would free a drone, had it taken one).
    dev.wait_for_line(
        rf"^drone-scheduler\s+\|.*delivery {body['delivery_id']} cancelled: no drone to release"
    )
    assigned = dev.query(
        "drone-scheduler", "SELECT * FROM assignments WHERE delivery_id = ?", body["delivery_id"]
    )
    assert assigned == []
    letters = dev.dead_letters("drone-scheduler")
    assert [(r["reason"], r["envelope"]["data"]["delivery_id"]) for r in letters] == [
        (reason, body["delivery_id"])
    ]


def test_a_scheduler_killed_with_sigkill_mid_run_loses_nothing_and_assigns_no_drone_twice(
    system: SystemFactory,
) -> None:
    # Each assignment takes 0.3 s, so several are in flight when the process is killed.
    dev = system(faults={"drone-scheduler": {"hang": 0.3}})
    bodies = [delivery(weight_kg=1.0 + n % 8) for n in range(16)]
    cids = []
    for n, body in enumerate(bodies):
        cids.append(dev.submit(body))
        if n == 7:
            dev.wait_for_line(r"^drone-scheduler\s+\|.*drone \S+ assigned", count=3)
            os.kill(dev.pids()["drone-scheduler"], signal.SIGKILL)
        time.sleep(0.05)

    finals = [dev.wait_final(cid) for cid in cids]

    dev.wait_for_line(r"drone-scheduler exited with signal SIGKILL; restarting")
    assert [tx["status"] for tx in finals] == ["completed"] * len(bodies)
    for tx in finals:  # one output per step, whatever was re-run
        assert types_of(tx).count("drone.drone.assigned") == 1
        assert types_of(tx).count("drone.delivery.scheduled") == 1
    assignments = dict(dev.query("drone-scheduler", "SELECT delivery_id, drone_id FROM assignments"))
    assert sorted(assignments) == sorted(b["delivery_id"] for b in bodies)
    assert len(set(assignments.values())) == len(bodies)
    assert_no_drone_assigned_twice(dev)
    scheduled = dict(dev.query("delivery", "SELECT delivery_id, drone_id FROM deliveries"))
    assert scheduled == assignments


def test_a_scheduler_crashing_after_its_commit_but_before_publishing_reuses_the_drone_it_took(
    system: SystemFactory,
) -> None:
    # crash_after: the process SIGKILLs itself right after the handler's commit of its 3rd
    # assignment (the row, the inbox record and DroneAssigned in the outbox), before the
    # relay publishes DroneAssigned and before the input is acked. The restarted scheduler
    # acks the redelivered input from its inbox and its relay publishes what was committed.
    dev = system(faults={"drone-scheduler": {"crash_after": 3}})
    bodies = [delivery(weight_kg=2.0) for _ in range(5)]
    cids = [dev.submit(body) for body in bodies]

    finals = [dev.wait_final(cid, timeout=45) for cid in cids]

    assert "drone-scheduler exited with signal SIGKILL" in dev.log
    assert [tx["status"] for tx in finals] == ["completed"] * len(bodies)
    for tx in finals:  # no state without its event, no event twice
        assert types_of(tx).count("drone.drone.assigned") == 1
    assignments = dict(dev.query("drone-scheduler", "SELECT delivery_id, drone_id FROM assignments"))
    assert len(assignments) == len(set(assignments.values())) == len(bodies)
    assert_no_drone_assigned_twice(dev)
    assert dict(dev.query("delivery", "SELECT delivery_id, drone_id FROM deliveries")) == assignments


def test_the_same_idempotency_key_twice_creates_one_delivery(system: SystemFactory) -> None:
    dev = system()
    body = delivery()
    first = dev.request(body, key="client-key-1")
    again = dev.request(body, key="client-key-1")
    assert first.status_code == again.status_code == 202
    assert again.json()["correlation_id"] == first.json()["correlation_id"]
    assert again.headers.get("Idempotent-Replayed") == "true"

    tx = dev.wait_final(first.json()["correlation_id"])

    assert tx["status"] == "completed"
    listed = dev.http.get("/transactions", params={"limit": 100}).json()["transactions"]
    assert [t["correlation_id"] for t in listed] == [first.json()["correlation_id"]]
    assert types_of(tx).count("drone.delivery.requested") == 1
    assert len(dev.query("delivery", "SELECT * FROM deliveries")) == 1
    assert len(dev.query("drone-scheduler", "SELECT * FROM assignments")) == 1


def test_choreograph_dev_starts_every_process_and_stops_them_all_cleanly(system: SystemFactory) -> None:
    dev = system()
    pids = dev.pids()
    assert sorted(pids) == ["delivery", "drone-scheduler", "gateway", "journal", "package"]
    assert len(set(pids.values())) == 5
    assert dev.http.get("/healthz").status_code == 200

    assert dev.stop() == 0

    assert not [name for name, pid in pids.items() if alive(pid)]
    for name in pids:
        assert f"{name} stopped" in dev.log
    assert "SIGKILL" not in dev.log


def _node_version() -> tuple[int, ...] | None:
    node = shutil.which("node")
    if node is None:
        return None
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return tuple(int(part) for part in out.lstrip("v").split(".")[:3])


def test_choreograph_dev_runs_a_nodejs_delivery_service_behind_the_push_ambassador(
    system: SystemFactory, tmp_path: Path
) -> None:
    version = _node_version()
    if version is None or version < (20, 15):
        if os.environ.get("CI") == "true":
            pytest.fail(f"Node.js >= 20.15 is required in CI (found {version})")
        pytest.skip("Node.js >= 20.15 not installed (apt-get install nodejs)")
    from choreograph.push import generate_secret

    secret, node_port = generate_secret(), free_port()
    dev = system(
        args=[
            "--only",
            "package",
            "--only",
            "drone-scheduler",
            "--push",
            "examples/polyglot/push.toml",
            "--proc",
            "delivery-node=node examples/polyglot/delivery_service.mjs",
        ],
        env={
            "WEBHOOK_SECRET": secret,
            "DELIVERY_WEBHOOK_SECRET": secret,
            "PORT": str(node_port),
            "DELIVERY_NODE_URL": f"http://127.0.0.1:{node_port}/",
            "STORE_PATH": str(tmp_path / "node.json"),
            "FAIL_FIRST": "1",  # Node answers 503 to every first attempt: the ambassador retries
        },
    )
    assert sorted(dev.pids()) == ["delivery-node", "drone-scheduler", "gateway", "journal", "package", "push"]

    tx = dev.wait_final(dev.submit(delivery(weight_kg=4.0)))

    assert tx["status"] == "completed"
    assert types_of(tx)[-1] == "drone.delivery.scheduled"
    assert "answered 503" in dev.log  # the retry happened
    assert not os.path.exists(dev.data_dir / "delivery.db")  # the Python Delivery service never ran


def _free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(50):
        first = free_port()
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise AssertionError(f"no run of {count} free ports")


def test_choreograph_dev_otel_and_metrics_reach_every_service_and_the_gateway(system: SystemFactory) -> None:
    first = _free_port_run(8)
    dev = system(args=["--otel", "--metrics-port", str(first)], env={"OTEL_TRACES_EXPORTER": "console"})
    [listing] = dev.wait_for_line(r"metrics \(/metrics on 127\.0\.0\.1\): ")
    ports = dict(re.findall(r"(\S+) :(\d+)", listing.split("): ", 1)[1]))
    assert set(ports) == {"package", "drone-scheduler", "delivery", "gateway"}, listing
    tx = dev.wait_final(dev.submit(delivery()))
    assert tx["status"] == "completed", tx

    def scrape(name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[name]}/metrics", timeout=10) as response:
            return str(response.read().decode())

    assert re.search(r'choreograph_events_published_total\{event_type="drone\.delivery\.requested"\S*\} 1\.0',
                     scrape("gateway")), scrape("gateway")
    assert 'choreograph_events_handled_total{event_type="drone.drone.assigned",service="delivery"} 1.0' in scrape(
        "delivery")
    # Console-exported spans, one trace: the gateway's PRODUCER span and a handler span per hop.
    dev.wait_for_line(r'"name": "publish drone\.delivery\.requested"')
    dev.wait_for_line(r'"name": "delivery handle drone\.drone\.assigned"')
    trace_ids = set(re.findall(r'"trace_id": "(0x[0-9a-f]{32})"', dev.log))
    assert len(trace_ids) == 1, trace_ids
