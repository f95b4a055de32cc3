"""``choreograph gateway``: what it says when it cannot listen."""

from __future__ import annotations

import socket

from tests.cli.test_core_cli import cli


def test_gateway_on_a_port_in_use_is_one_line_naming_the_port_and_the_reason_and_exits_2() -> None:
    """uvicorn logged it between its startup and shutdown lines and exited 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("gateway", "examples.drone_delivery.gateway:gateway", "--port", str(port))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: --port: cannot listen on 127.0.0.1:{port}: Address already in use\n"
