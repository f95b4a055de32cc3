"""``choreograph gateway``: what it says when it cannot listen."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests._procs import lines_until, stop
from tests.cli.test_core_cli import ROOT, cli


def test_gateway_on_a_port_in_use_is_one_line_naming_the_port_and_the_reason_and_exits_2() -> None:
    """uvicorn logged it between its startup and shutdown lines and exited 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("gateway", "examples.drone_delivery.gateway:gateway", "--port", str(port))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: --port: cannot listen on 127.0.0.1:{port}: Address already in use\n"



@pytest.mark.parametrize("host", ["", " "])
def test_gateway_with_an_empty_host_is_refused_rather_than_served_on_every_interface(host: str) -> None:
    """getaddrinfo("") binds 0.0.0.0 and ::: a script passing --host "$HOST" unset served to the network."""
    result = cli("gateway", "examples.drone_delivery.gateway:gateway", "--port", "0", "--host", host, timeout=20)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith(f"error: --host {host!r}: empty; give an interface"), result.stderr


def test_gateway_with_an_unknown_log_level_is_one_line_naming_the_option_and_exits_2() -> None:
    """uvicorn's KeyError: 'loud', with a traceback, once the port was bound."""
    result = cli("gateway", "examples.drone_delivery.gateway:gateway", "--port", "0", "--log-level", "LOUD")
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr == "error: --log-level 'LOUD': expected critical, error, warning, info, debug or trace\n"


@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("192.0.2.1", "192.0.2.1"),  # TEST-NET-1: never an address of this machine
        ("fe80::1", "[fe80::1]"),  # link-local without a scope: EINVAL, which blamed --port
        ("no-such-host.invalid", "no-such-host.invalid"),
    ],
)
def test_gateway_on_an_address_this_machine_cannot_listen_on_is_one_line_naming_the_host_and_exits_2(
    host: str, shown: str
) -> None:
    result = cli("gateway", "examples.drone_delivery.gateway:gateway", "--host", host, "--port", "8765")
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith(f"error: --host: cannot listen on {shown}:8765: "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

def dev_gateway(data_dir: Path, *options: str) -> subprocess.Popen[str]:
    """``choreograph dev`` of the drone delivery app, with its gateway (no journal)."""
    return subprocess.Popen(
        [sys.executable, "-m", "choreograph", "dev", "examples.drone_delivery.app:app", "--data-dir", str(data_dir),
         "--no-journal", *options], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "1000"},
    )


def test_dev_port_0_announces_the_port_the_gateway_listens_on(tmp_path: Path) -> None:
    """It announced `gateway http://127.0.0.1:0`."""
    proc = dev_gateway(tmp_path / "var", "--port", "0")
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        ready = lines_until(proc.stdout, lambda line: "ready:" in line, seen=lines)
    finally:
        out, err = stop(proc)
    assert ready is not None, "".join(lines) + out + err
    announced = int(ready.rsplit("gateway http://127.0.0.1:", 1)[1])
    assert f"Uvicorn running on http://127.0.0.1:{announced} " in "".join(lines)
    assert announced != 0


def _port_option(pid: int) -> int:
    """The ``--port`` on the command line of process ``pid`` (read from /proc once it has exec'd)."""
    for _ in range(100):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--port" in argv:
            return int(argv[argv.index(b"--port") + 1])
        time.sleep(0.01)
    raise AssertionError(f"no --port in {argv}")


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads the gateway's command line from /proc")
def test_dev_port_0_holds_the_port_it_names_so_no_other_process_can_take_it_before_the_gateway_serves(
    tmp_path: Path,
) -> None:
    """dev found a free port, let it go and named it to the gateway, which bound it only once its app
    had started: a process taking the port in between left the gateway unable to listen."""
    proc = dev_gateway(tmp_path / "var", "--port", "0")
    assert proc.stdout is not None
    lines: list[str] = []
    with socket.socket() as other:
        try:
            started = lines_until(proc.stdout, lambda line: "started gateway (pid" in line, seen=lines)
            assert started is not None, "".join(lines)
            port = _port_option(int(started.rsplit("(pid ", 1)[1].split(")")[0]))
            with pytest.raises(OSError) as refused:
                other.bind(("127.0.0.1", port))
                other.listen()
            assert refused.value.errno == errno.EADDRINUSE
            ready = lines_until(proc.stdout, lambda line: "ready:" in line, seen=lines)
            assert ready is not None, "".join(lines)
            assert ready.rstrip().endswith(f"; gateway http://127.0.0.1:{port}"), ready
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10, trust_env=False).status_code == 200
        finally:
            out, err = stop(proc)
    assert proc.returncode == 0, "".join(lines) + out + err


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_dev_on_an_ipv6_host_announces_the_gateway_url_with_the_host_in_brackets(tmp_path: Path) -> None:
    """It announced `gateway http://::1:PORT`, a URL no client can use."""
    proc = dev_gateway(tmp_path / "var", "--host", "::1", "--port", "0")
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        ready = lines_until(proc.stdout, lambda line: "ready:" in line, seen=lines)
        assert ready is not None, "".join(lines)
        url = ready.rsplit("; gateway ", 1)[1].strip()
        assert url.startswith("http://[::1]:"), ready
        assert httpx.get(f"{url}/healthz", timeout=10, trust_env=False).status_code == 200
    finally:
        out, err = stop(proc)
    assert proc.returncode == 0, "".join(lines) + out + err


def test_dev_with_the_gateway_port_in_use_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = dev_gateway(tmp_path / "var", "--port", str(port))
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            out, err = stop(proc)
            pytest.fail(f"dev started: {out}{err}")
    assert (proc.returncode, out) == (2, "")
    assert err == f"error: --port: cannot listen on 127.0.0.1:{port}: Address already in use\n"
