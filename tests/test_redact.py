"""Passwords never reach a message: ``redact`` masks them and keeps the rest of the URL."""

from __future__ import annotations

import pytest

from choreograph._redact import redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://shop:s3cret@mq:5672/prod", "amqp://shop:***@mq:5672/prod"),
        ("redis://:s3cret@cache:6379/0?prefix=x", "redis://:***@cache:6379/0?prefix=x"),
        ("nats://shop:s3cret@n1:4222,n2:4222", "nats://shop:***@n1:4222,n2:4222"),
        ("postgresql://app:s3cret@db/orders?schema=s", "postgresql://app:***@db/orders?schema=s"),
        ("postgresql://app@db/orders?password=s3cret&schema=s", "postgresql://app@db/orders?password=***&schema=s"),
        ("postgresql://app:s3@cret@db/orders", "postgresql://app:***@db/orders"),
        ("https://hook:s3cret@example.com/in", "https://hook:***@example.com/in"),
    ],
)
def test_the_password_is_masked_and_user_host_port_path_are_kept(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_a_nats_token_given_as_the_user_is_masked() -> None:
    assert redact("nats://s3cret@n1:4222") == "nats://***@n1:4222"


@pytest.mark.parametrize(
    "url",
    ["memory://", "sqlite:///./var/bus.db", "redis://cache:6379/0", "postgresql://app@db/orders",
     "http://example.com/a?x=a@b"],
)
def test_a_url_without_a_password_is_unchanged(url: str) -> None:
    assert redact(url) == url


def test_every_url_in_a_message_is_masked() -> None:
    message = "connect to 'amqp://u:s3cret@h1/' failed, then redis://:other@h2:6379/0 too"
    assert redact(message) == "connect to 'amqp://u:***@h1/' failed, then redis://:***@h2:6379/0 too"
