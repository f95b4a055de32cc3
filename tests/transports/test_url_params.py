"""Broker URL query parameters given twice are refused on every transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from choreograph.errors import ConfigurationError
from choreograph.transports import open_transport


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("redis://127.0.0.1:6379/0?db=1&db=2", "db"),  # redis-py reads the first
        ("rediss://127.0.0.1:6379?prefix=a&prefix=b", "prefix"),
        ("unix:///tmp/r.sock?db=1&lease=5&db=2", "db"),
        ("redis://127.0.0.1:6379/0?socket_timeout=nan&socket_timeout=5", "socket_timeout"),
        ("amqp://guest:guest@127.0.0.1:5672/?heartbeat=x&heartbeat=10", "heartbeat"),  # aiormq reads the first
        ("amqps://guest:guest@127.0.0.1:5671/?prefix=a&prefix=b", "prefix"),
        ("nats://127.0.0.1:4222?prefix=a&prefix=b", "prefix"),
        ("nats://127.0.0.1:4222?lease=5&lease=10", "lease"),
        ("memory://?lease=5&lease=10", "lease"),
    ],
)
def test_a_parameter_given_twice_is_refused_naming_it(url: str, name: str) -> None:
    """choreograph read the last value of its own parameters, redis-py and aiormq the first of
    theirs: which one counted depended on the parameter."""
    with pytest.raises(ConfigurationError, match=f"parameter '{name}' is given more than once") as caught:
        open_transport(url)
    assert "guest" not in str(caught.value)


def test_a_sqlite_parameter_given_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="parameter 'lease' is given more than once"):
        open_transport(f"sqlite:///{tmp_path}/bus.db?lease=5&lease=10")


def test_a_parameter_given_once_each_is_taken() -> None:
    open_transport("redis://127.0.0.1:6379/0?db=1&prefix=a&lease=5")
    open_transport("nats://127.0.0.1:4222?prefix=a&lease=5&replicas=1")
