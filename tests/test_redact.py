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


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example/in?access_token=s3cret", "https://hooks.example/in?access_token=***"),
        ("https://hooks.example/in?region=eu&api_key=s3cret", "https://hooks.example/in?region=eu&api_key=***"),
        ("https://hooks.example/in?apikey=s3cret", "https://hooks.example/in?apikey=***"),
        ("https://hooks.example/in?key=s3cret&v=2", "https://hooks.example/in?key=***&v=2"),
        ("https://fn.azurewebsites.net/api/hook?code=s3cret", "https://fn.azurewebsites.net/api/hook?code=***"),
        ("https://acct.example/q?sv=2022&sig=s3cret", "https://acct.example/q?sv=2022&sig=***"),
        ("https://hooks.example/in?secret=s3cret", "https://hooks.example/in?secret=***"),
        ("https://s3cret@hooks.example/in", "https://***@hooks.example/in"),
        ("http://s3cret@127.0.0.1:8090/in", "http://***@127.0.0.1:8090/in"),
    ],
    ids=["access_token", "api_key", "apikey", "key", "azure-code", "sas-sig", "secret", "https-user-only",
         "http-user-only"],
)
def test_a_webhook_credential_in_the_query_or_the_user_is_masked(url: str, shown: str) -> None:
    """A subscriber's URL carries its credential where the receiving service reads it: a query
    parameter (RFC 6750's access_token, API keys, Azure's code, a shared access signature) or
    the user info alone (Basic authentication with a key as the user)."""
    assert redact(url) == shown
    assert redact(f"POST {url} answered 401") == f"POST {shown} answered 401"


@pytest.mark.parametrize("url", ["https://hooks.example/in?monkey=1&keys=2&sslkey=/k", "amqp://shop@mq/prod"])
def test_parameters_that_only_end_like_a_secret_and_a_broker_user_are_kept(url: str) -> None:
    assert redact(url) == url
