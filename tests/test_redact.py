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


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T000/B000/XXXXXXXX", "https://hooks.slack.com/services/T000/B000/***"),
        ("https://hooks.slack.com/services/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",
         "https://hooks.slack.com/services/T0123ABCD/B0123ABCD/***"),
        ("https://discord.com/api/webhooks/123456789012345678/s3cret", "https://discord.com/api/webhooks/123456789012345678/***"),
        ("https://discordapp.com/api/webhooks/1234/s3cret?wait=true", "https://discordapp.com/api/webhooks/1234/***?wait=true"),
        ("https://hooks.example/in/Zx8Qk2LmNp4Rt6Vw9Yb1Cd3F", "https://hooks.example/in/***"),
        ("https://api.telegram.org/bot123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11/sendMessage",
         "https://api.telegram.org/***/sendMessage"),
        ("https://acme.webhook.office.com/IncomingWebhook/0123456789abcdef0123456789abcdef/x",
         "https://acme.webhook.office.com/IncomingWebhook/***/x"),
    ],
    ids=["slack", "slack-real-shape", "discord", "discordapp-query", "mixed-case-token", "telegram", "hex-key"],
)
def test_a_webhook_secret_in_the_path_is_masked(url: str, shown: str) -> None:
    """Slack and Discord carry a webhook's secret as a path segment, whatever it looks like; any
    other segment of 20 characters or more that mixes upper and lower case letters and digits, or
    of 32 hex digits or more, is taken for a token."""
    assert redact(url) == shown
    assert redact(f"POST {url} answered 401") == f"POST {shown} answered 401"


@pytest.mark.parametrize(
    "url",
    ["https://shop.example/orders/123", "https://shop.example/api/v1/orders/3f2b1a0e-3c59-4d8e-9a41-2f4c6d8b7e10/items",
     "https://shop.example/API/V1/ORDERS/3F2B1A0E-3C59-4D8E-9A41-2F4C6D8B7E10",
     "https://blog.example/posts/my-very-long-article-title-2024", "https://hooks.example/IncomingWebhookForOrders",
     "https://hooks.slack.com/services/", "https://discord.com/api/webhooks/", "sqlite:///./var/bus.db"],
)
def test_ordinary_path_segments_are_kept_where_a_secret_beside_them_is_masked(url: str) -> None:
    """Names, numbers, slugs and UUIDs say which resource is meant; they are not credentials."""
    hook = "https://hooks.slack.com/services/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"
    assert redact(f"{url} failed, then {hook}") == f"{url} failed, then https://hooks.slack.com/services/T0123ABCD/B0123ABCD/***"


@pytest.mark.parametrize(
    "url",
    ["sqlite:///var/lib/choreograph/OrderService2Inbox.sqlite3", "postgresql://app:***@db/OrdersProduction2024db",
     "amqp://shop:***@mq:5672/ShopVhost2024Production", "sqlite:///srv/0123456789abcdef0123456789abcdef/bus.db"],
    ids=["sqlite-file", "postgres-database", "amqp-vhost", "sqlite-hex-directory"],
)
def test_a_broker_or_store_url_keeps_its_path_which_names_a_file_or_database_not_a_secret(url: str) -> None:
    """Only a webhook (HTTP) URL carries a secret in its path: a broker's or store's names what
    an error is about."""
    assert redact(f"cannot open {url}: disk full") == f"cannot open {url}: disk full"
