"""Stopping ``choreograph run``: a second Ctrl-C cuts the drain short, and nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests._procs import lines_until, stop
from tests.cli.test_core_cli import ROOT, cli

APP = (
    "import asyncio\n"
    "from choreograph import Event, Service\n\n"
    "class Slow(Event, type='h2.slow.requested'):\n"
    "    n: int\n\n"
    "slow = Service('slow-h2')\n\n"
    "@slow.on(Slow, timeout=900)\n"
    "async def take_time(event: Slow, ctx) -> None:\n"
    "    ctx.logger.info('handler started, attempt %d', ctx.attempt)\n"
    "    await asyncio.sleep(600)\n"
)


def start(tmp_path: Path, bus: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "choreograph", "run", "slow_h2:slow", "--broker", bus, *options],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_second_ctrl_c_releases_in_flight_work_instead_of_waiting_for_the_drain(tmp_path: Path) -> None:
    """With a long handler (here ``--drain-timeout inf``) the first Ctrl-C waits for it; a second one
    was ignored, as was SIGTERM, so only SIGKILL stopped the worker. It now releases the event to the
    broker at once, as a drain that runs out of time does: nothing is dead-lettered, the next worker
    handles it (its second attempt: the interrupted one counts)."""
    (tmp_path / "slow_h2.py").write_text(APP)
    bus = f"sqlite:///{tmp_path}/bus.db"
    proc = start(tmp_path, bus, "--drain-timeout", "inf")
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        assert lines_until(proc.stdout, lambda line: "running slow-h2" in line, seen=lines), lines
        published = cli("publish", "h2.slow.requested", "--data", '{"n": 1}', "--broker", bus, cwd=tmp_path)
        assert published.returncode == 0, published.stderr
        assert lines_until(proc.stdout, lambda line: "handler started" in line, seen=lines), lines
        proc.send_signal(signal.SIGINT)
        assert lines_until(proc.stdout, lambda line: "draining in-flight work" in line, seen=lines), lines
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    finally:
        out, _ = stop(proc, timeout=5)
    output = "".join(lines) + out
    assert proc.returncode == 0 and "Traceback" not in output, output
    assert "releasing in-flight work now" in output, output

    assert json.loads(cli("dlq", "list", "--json", "--broker", bus).stdout) == []
    again = start(tmp_path, bus, "--drain-timeout", "0")
    assert again.stdout is not None
    seen: list[str] = []
    try:
        assert lines_until(again.stdout, lambda line: "handler started, attempt 2" in line, seen=seen), seen
    finally:
        stop(again)
