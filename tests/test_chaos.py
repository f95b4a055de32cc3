"""The chaos harness (bench/chaos.py) in CI: the shop keeps every invariant under faults, on SQLite and NATS.

Each run places 500 orders through the shop's services, each service two real
processes, while 10 % of handler attempts fail, some hang past their timeout, a random
process is SIGKILLed every two seconds (at least three times) and 5 % of events are
delivered twice. The harness exits 0 only if every invariant holds (see
bench/_chaos_shop.py); the JSON report shows the chaos actually happened. ``choreograph chaos``
forwards to the same harness.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests._brokers import require_broker
from tests.conformance.brokers import nats as nats_bus

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


@pytest.mark.slow
def test_the_shop_keeps_its_invariants_under_chaos_on_sqlite() -> None:
    assert_the_chaos_happened(chaos("--broker", "sqlite"))


@pytest.mark.slow
def test_the_shop_keeps_its_invariants_under_chaos_on_nats() -> None:
    require_broker("nats")
    url = nats_bus.url(f"chaos-{uuid.uuid4().hex[:8]}", lease=10.0)
    try:
        assert_the_chaos_happened(chaos("--broker", url))
    finally:
        import asyncio

        asyncio.run(nats_bus.cleanup(url))  # the harness deletes its streams; this covers a crash


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "choreograph", "chaos", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_choreograph_chaos_hands_the_options_after_app_to_the_harness() -> None:
    done = cli("examples.shop.app:app", "--orders", "0")
    assert done.returncode == 2 and "bench/chaos.py: error: --orders" in done.stderr


def test_choreograph_chaos_without_app_runs_the_shop_with_the_options_given_first() -> None:
    done = cli("--orders", "0")
    assert done.returncode == 2 and "bench/chaos.py: error: --orders" in done.stderr


def test_choreograph_chaos_names_the_apps_it_has_a_scenario_for() -> None:
    done = cli("examples.drone_delivery.app:app")
    assert done.returncode == 2 and "no chaos scenario" in done.stderr and "examples.shop.app:app" in done.stderr
