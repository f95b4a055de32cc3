"""``make demo`` (examples/drone_delivery/demo.py): what it prints works when copied."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.examples._system import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_trace_command_the_demo_prints_finds_the_transaction_when_copied(tmp_path: Path) -> None:
    """It printed `choreograph trace ID`, which looks in ./var/journal.db, not the demo's journal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CHOREOGRAPH_JOURNAL", None)
    demo = subprocess.run(
        [sys.executable, "-m", "examples.drone_delivery.demo", "--requests", "3", "--data-dir", str(tmp_path / "demo"),
         "--port", str(free_port())],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env,
    )
    hint = next((line for line in demo.stdout.splitlines() if line.startswith("choreograph trace ")), None)
    assert hint is not None, demo.stdout + demo.stderr
    argv = shlex.split(hint)
    copied = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env=env)
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout.startswith(f"transaction {argv[2]} ")


def test_with_its_port_taken_the_demo_runs_on_the_port_dev_binds_for_it(tmp_path: Path) -> None:
    """The demo asks `choreograph dev` for port 0 and reads the port dev bound from its ready line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CHOREOGRAPH_JOURNAL", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = subprocess.run(
            [sys.executable, "-m", "examples.drone_delivery.demo", "--requests", "3", "--data-dir",
             str(tmp_path / "demo"), "--port", str(port)],
            cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env,
        )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "system ready" in demo.stdout
    ready = next(line for line in (tmp_path / "demo" / "dev.log").read_text().splitlines() if "ready:" in line)
    assert "gateway http://127.0.0.1:" in ready and f":{port};" not in ready and not ready.endswith(f":{port}")
