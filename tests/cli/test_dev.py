"""``choreograph dev``'s process supervisor: prefixed logs, restarts, a clean stop that escalates to SIGKILL."""

from __future__ import annotations

import asyncio
import io
import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from examples.drone_delivery.app import app as drone_app
from rich.console import Console

from choreograph.cli._dev import _scales
from choreograph.cli._supervisor import ProcSpec, Supervisor
from choreograph.errors import ConfigurationError


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SLEEPER = "import time; print('up', flush=True); time.sleep(600)"


def supervisor(*specs: ProcSpec, **options: object) -> tuple[Supervisor, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    return Supervisor(list(specs), env=dict(os.environ), console=console, **options), out  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], within: float = 20.0) -> None:
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {within}s")


async def test_every_line_is_prefixed_with_its_process_name_and_ready_is_announced_once_all_are_up() -> None:
    ready: list[bool] = []
    sup, out = supervisor(
        ProcSpec("alpha", child(SLEEPER), ready="up"),
        ProcSpec("beta-service", child(SLEEPER), ready="up"),
        on_ready=lambda: ready.append(True),
    )
    run = asyncio.create_task(sup.run())
    await until(lambda: bool(ready))
    sup.stop()
    assert await run == 0
    lines = out.getvalue().splitlines()
    assert "alpha        | up" in lines and "beta-service | up" in lines
    assert "alpha        | alpha stopped" not in lines  # the supervisor speaks as "dev"
    assert "dev          | alpha stopped" in lines and "dev          | beta-service stopped" in lines
    assert ready == [True]


async def test_a_process_that_dies_is_restarted_and_told_how_many_times() -> None:
    code = (
        "import os, sys, time\n"
        "n = int(os.environ['CHOREOGRAPH_RESTARTS'])\n"
        "print('life', n, flush=True)\n"
        "sys.exit(3) if n < 2 else time.sleep(600)\n"
    )
    sup, out = supervisor(ProcSpec("flaky", child(code), ready="life"))
    run = asyncio.create_task(sup.run())
    await until(lambda: "flaky | life 2" in out.getvalue())
    sup.stop()
    assert await run == 0
    text = out.getvalue()
    assert text.count("flaky exited with status 3; restarting") == 2
    assert "flaky | life 0" in text and "flaky | life 1" in text


async def test_stop_sends_sigterm_then_sigkills_a_process_that_ignores_it() -> None:
    stubborn = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    polite = SLEEPER
    sup, out = supervisor(
        ProcSpec("stubborn", child(stubborn), ready="up"),
        ProcSpec("polite", child(polite), ready="up"),
        stop_timeout=0.5,
    )
    run = asyncio.create_task(sup.run())
    await until(lambda: out.getvalue().count("| up") == 2)
    sup.stop()
    assert await run == 0
    text = out.getvalue()
    assert "stubborn still running after 0.5s: SIGKILL" in text
    assert "stubborn exited with signal SIGKILL" in text
    assert "polite stopped" in text
    assert all(c.proc is not None and c.proc.returncode is not None for c in sup.children)


async def test_an_infinite_stop_timeout_waits_for_a_slow_stop_and_never_sigkills() -> None:
    """``dev --stop-timeout inf``: a process draining long after SIGTERM is waited for."""
    slow = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.0), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    sup, out = supervisor(ProcSpec("slow", child(slow), ready="up"), stop_timeout=math.inf)
    run = asyncio.create_task(sup.run())
    await until(lambda: "| up" in out.getvalue())
    sup.stop()
    assert await run == 0
    assert "dev  | slow stopped" in out.getvalue() and "SIGKILL" not in out.getvalue(), out.getvalue()


async def test_a_process_failing_before_it_is_ready_stops_everything_instead_of_looping() -> None:
    sup, out = supervisor(
        ProcSpec("broken", child("import sys; print('bad config', flush=True); sys.exit(2)"), ready="up"),
        ProcSpec("fine", child(SLEEPER), ready="up"),
    )
    assert await asyncio.wait_for(sup.run(), 30) == 1
    assert "broken exited with status 2 before it was ready; stopping" in out.getvalue()
    assert "restarting" not in out.getvalue()


def test_scale_names_a_service_and_a_count() -> None:
    assert _scales(["drone-scheduler=3"], drone_app) == {"drone-scheduler": 3}
    with pytest.raises(ConfigurationError, match="SERVICE=N"):
        _scales(["drone-scheduler"], drone_app)
    with pytest.raises(ConfigurationError, match="no service 'nope'"):
        _scales(["nope=2"], drone_app)


def test_choreograph_dev_refuses_a_target_that_is_not_an_app(tmp_path: os.PathLike[str]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "choreograph",
            "dev",
            "examples.drone_delivery.scheduler:scheduler",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "is a Service; choreograph dev needs an App" in " ".join(done.stderr.split())


async def test_a_repeated_sigterm_waits_for_the_stop_but_a_second_ctrl_c_kills_at_once() -> None:
    slow_exit = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.5), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    for force, expected in ((False, "slow stopped"), (True, "slow exited with signal SIGKILL")):
        sup, out = supervisor(ProcSpec("slow", child(slow_exit), ready="up"))
        run = asyncio.create_task(sup.run())
        await until(lambda out=out: "slow | up" in out.getvalue())
        sup.stop(force_if_repeated=force)
        await until(lambda out=out: "SIGTERM to every process" in out.getvalue())
        sup.stop(force_if_repeated=force)
        assert await run == 0
        assert expected in out.getvalue()


async def plain_asgi(scope: object, receive: object, send: object) -> None:
    """A gateway that is not a choreograph Gateway (any ASGI app)."""


def test_a_plain_asgi_gateway_is_never_asked_for_telemetry() -> None:
    # --otel is inherited through CHOREOGRAPH_OTEL, and a plain ASGI app cannot take it: dev
    # passes --no-otel and gives it no metrics port, so it starts instead of failing late.
    from choreograph.cli._dev import _gateway_spec, _metrics_ports

    plain = _gateway_spec("tests.cli.test_dev:plain_asgi", "127.0.0.1", 8000)
    real = _gateway_spec("examples.drone_delivery.gateway:gateway", "127.0.0.1", 8001)
    assert "--no-otel" in plain.argv and "--no-otel" not in real.argv
    assert _metrics_ports([plain, real], 9000) == {"gateway": 9000} and "--metrics-port" not in plain.argv


def test_metrics_port_0_gives_every_instrumented_process_port_0_any_free_one() -> None:
    from choreograph.cli._dev import _gateway_spec, _metrics_ports

    service = ProcSpec("payment", [sys.executable, "-m", "choreograph", "run", "examples.chain:app"])
    gateway = _gateway_spec("examples.drone_delivery.gateway:gateway", "127.0.0.1", 8001)
    assert _metrics_ports([service, gateway], 0) == {"payment": 0, "gateway": 0}  # not 0, 1, ...
    assert service.argv[-2:] == gateway.argv[-2:] == ["--metrics-port", "0"]
