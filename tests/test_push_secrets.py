"""Secrets of a push subscription stay out of what others read: a token or password in the
subscriber's URL is masked in log lines, dead letters and the ``choreograph.failed`` event
(and so the journal and ``choreograph trace``), also where httpx quotes the URL; and the
ambassador's lines about an event name it as the worker's do (ids, type, group).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import httpx
import pytest

from choreograph import FAILED, Event, Publisher, RetryPolicy
from choreograph._push_config import load_config
from choreograph.errors import ConfigurationError, StoreError
from choreograph.logs import JsonFormatter
from choreograph.push import PushAmbassador, PushSubscription, generate_secret
from choreograph.stores.memory import MemoryStore
from choreograph.testing import MemoryTransport, VirtualClock, settled
from tests._push_support import Scripted

GROUP = "hooked"
TOKEN = "tok-S3CRET"
PASSWORD = "pw-S3CRET"


class Placed(Event, type="test.secrets.placed"):
    order_id: str


def secret_url(url: str) -> tuple[str, str]:
    """``url`` (``http://127.0.0.1:PORT/hook``) with a password and a token in it; and as shown."""
    host = url.removeprefix("http://")
    return (f"http://hook:{PASSWORD}@{host}?token={TOKEN}&region=eu",
            f"http://hook:***@{host}?token=***&region=eu")


def subscription(url: str, **overrides: Any) -> PushSubscription:
    options: dict[str, Any] = {"retry": RetryPolicy(max_attempts=2, base=1.0, jitter=False), "timeout": 5.0,
                               "secret": generate_secret()}
    options.update(overrides)
    return PushSubscription(GROUP, [Placed.event_type()], url, **options)


@pytest.fixture
def bus() -> MemoryTransport:
    return MemoryTransport(clock=VirtualClock())


def leaked(text: str) -> bool:
    return TOKEN in text or PASSWORD in text


async def test_a_token_in_the_url_reaches_no_log_line_dead_letter_or_failure_event(
    bus: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 retried then given up: the retry line, the dead-letter line, the record's ``url``
    and the ``choreograph.failed`` event (what the journal keeps and trace shows) name the
    subscriber with its password and token masked; the rest of the URL is kept."""
    caplog.set_level(logging.DEBUG, logger="choreograph.push")
    hook = Scripted((503, {}, b"down"))
    await (await bus.subscribe("observer", [FAILED])).close()
    async with hook.running() as base:
        url, shown = secret_url(base)
        async with PushAmbassador([subscription(url)], bus, origin="tests.local"):
            await Publisher(bus).publish(Placed(order_id="o-1"), ids=["e-1"])
            await settled(bus)
    assert hook.posts == 2
    [letter] = await bus.dead_letters(GROUP)
    assert letter.record["url"] == shown
    assert not leaked(repr(letter.record))
    failed = await bus.subscribe("observer", [FAILED])
    [delivery] = await failed.fetch(10, timeout=0)
    await failed.close()
    assert not leaked(delivery.message.body.decode())
    assert shown.encode() in delivery.message.body
    lines = [record.getMessage() for record in caplog.records]
    assert any("retrying in" in line and shown in line for line in lines), lines
    assert not [line for line in lines if leaked(line)]


async def test_an_httpx_error_quoting_the_url_is_recorded_without_its_secrets(
    bus: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx's own errors may quote the URL whole (an HTTPStatusError does: here raised by an
    event hook of the client the ambassador was given): the record and the log keep the
    error's text with the URL's secrets masked."""
    caplog.set_level(logging.WARNING, logger="choreograph.push")

    async def raise_for_status(response: httpx.Response) -> None:
        response.raise_for_status()

    hook = Scripted(503)
    async with hook.running() as base, httpx.AsyncClient(event_hooks={"response": [raise_for_status]}) as client:
        url, shown = secret_url(base)
        async with PushAmbassador([subscription(url, handshake=False)], bus, client=client):
            await Publisher(bus).publish(Placed(order_id="o-1"), ids=["e-1"])
            await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    error = letter.record["last_error"]
    assert error["type"] == "HTTPStatusError"
    assert f"for url '{shown}'" in error["message"]
    assert not leaked(repr(letter.record))
    assert not [r.getMessage() for r in caplog.records if leaked(r.getMessage())]


async def test_push_log_lines_about_an_event_carry_its_ids(
    bus: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry and dead-letter lines carry the event's id, type, correlation and causation,
    the attempt and the group, as every runtime line about an event does (JSON logs show them)."""
    caplog.set_level(logging.WARNING, logger="choreograph.push")
    hook = Scripted(503)
    async with hook.running() as url, PushAmbassador([subscription(url)], bus, origin="tests.local"):
        [sent] = await Publisher(bus).publish(Placed(order_id="o-1"), ids=["e-1"], correlation_id="order-o-1")
        await settled(bus)
    retry = next(r for r in caplog.records if "retrying in" in r.getMessage())
    dead = next(r for r in caplog.records if "dead-lettering" in r.getMessage())
    for record, attempt in ((retry, 1), (dead, 2)):
        fields = {key: getattr(record, key, "missing") for key in (
            "event_id", "event_type", "correlation_id", "causation_id", "service", "handler", "group", "attempt")}
        assert fields == {
            "event_id": "e-1", "event_type": Placed.event_type(), "correlation_id": "order-o-1",
            "causation_id": sent.causationid, "service": GROUP, "handler": "push", "group": GROUP, "attempt": attempt,
        }
    assert '"correlation_id":"order-o-1"' in JsonFormatter().format(dead)


def test_a_header_value_of_the_wrong_type_is_refused_without_showing_it(tmp_path: Path) -> None:
    """A header is usually a credential: a value that is not a string (an API key written as
    a TOML number) is refused naming its key and its type, not its value."""
    (tmp_path / "push.toml").write_text(
        '[[subscriptions]]\ngroup = "g"\ntypes = ["a.b"]\nurl = "https://hooks.example/in"\n'
        "headers = { X-Api-Key = 918273645546372819 }\n"
    )
    with pytest.raises(ConfigurationError) as caught:
        load_config(tmp_path / "push.toml")
    assert "918273645546372819" not in str(caught.value)
    assert "headers.X-Api-Key: expected a string, got int" in str(caught.value)


@pytest.mark.parametrize(("value", "shown"), [("918273645546372819", "got int"), ("[918273645546372819]", "got a list holding int")])
def test_a_secret_of_the_wrong_type_is_refused_without_showing_it(tmp_path: Path, value: str, shown: str) -> None:
    """A ``secret`` that is not a whsec_ string or a list of them is a clear error naming the
    key and the type (it was an AttributeError traceback), never the value."""
    (tmp_path / "push.toml").write_text(
        '[[subscriptions]]\ngroup = "g"\ntypes = ["a.b"]\nurl = "https://hooks.example/in"\n'
        f"secret = {value}\n"
    )
    with pytest.raises(ConfigurationError) as caught:
        load_config(tmp_path / "push.toml")
    assert "918273645546372819" not in str(caught.value)
    assert f"subscriptions[0].secret: expected a whsec_ string or a list of them (rotation), {shown}" in str(caught.value)


async def test_httpx_request_lines_name_the_subscriber_without_its_secrets(
    bus: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx logs every request with its URL whole, at INFO (shown by ``choreograph push
    --log-level debug``, and by any app logging at INFO): an ambassador masks it there too."""
    caplog.set_level(logging.DEBUG)
    hook = Scripted(204)
    async with hook.running() as base:
        url, shown = secret_url(base)
        async with PushAmbassador([subscription(url)], bus, origin="tests.local") as ambassador:
            await Publisher(bus).publish(Placed(order_id="o-1"), ids=["e-1"])
            await settled(bus)
    assert ambassador.stats().delivered == 1
    requests = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any(line.startswith(f"HTTP Request: POST {shown} ") for line in requests), requests
    assert any(line.startswith(f"HTTP Request: OPTIONS {shown} ") for line in requests), requests
    assert not [r.getMessage() for r in caplog.records if leaked(r.getMessage())]


async def test_an_unreachable_receiver_is_recorded_as_its_masked_url_then_the_error(bus: MemoryTransport) -> None:
    """The record reads ``URL: error``: masking the token that ends the URL keeps the separator."""
    async with Scripted().running() as base:
        url = base.replace("http://", f"http://hook:{PASSWORD}@") + f"?token={TOKEN}"
    shown = base.replace("http://", "http://hook:***@") + "?token=***"
    async with PushAmbassador([subscription(url, handshake=False)], bus):
        await Publisher(bus).publish(Placed(order_id="o-1"), ids=["e-1"])
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    error = letter.record["last_error"]
    assert error["type"] == "ConnectError"
    assert error["message"].startswith(f"{shown}: "), error["message"]
    assert not leaked(repr(letter.record))


class Other(Event, type="test.secrets.other"):
    order_id: str


@pytest.mark.parametrize(
    ("case", "line"),
    [("filtered", "does not match the filters"), ("inbox-down", "; retrying e-1 later"),
     ("record-down", "inbox unavailable for hooked: inbox unreachable"), ("handed-back", "is bound to"),
     ("internal-error", "internal error pushing")],
)
async def test_the_other_push_lines_about_an_event_carry_its_ids_too(
    bus: MemoryTransport, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, case: str, line: str
) -> None:
    """An event filtered out, put off because the inbox cannot say whether it was pushed, whose
    failed attempt the inbox cannot record, handed back (its type is another subscription's),
    or tripping a bug below the push: each line about it names its id, type, transaction and group."""
    import choreograph._push_runner as runner

    caplog.set_level(logging.DEBUG, logger="choreograph.push")
    options: dict[str, Any] = {"where": "hops > 1000"} if case == "filtered" else {}
    seen_down, record_down = int(case == "inbox-down"), int(case == "record-down")

    class Down(MemoryStore):
        async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
            nonlocal seen_down
            if seen_down:
                seen_down -= 1
                raise StoreError("inbox unreachable")
            return await super().seen(group, event_ids)

        async def record_failure(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal record_down
            if record_down:
                record_down -= 1
                raise StoreError("inbox unreachable")
            return await super().record_failure(*args, **kwargs)

    if case == "internal-error":
        def broken(*args: Any, **kwargs: Any) -> dict[str, str]:
            raise RuntimeError("a bug below the push")

        monkeypatch.setattr(runner, "signature_headers", broken)
    event: Event = Placed(order_id="o-1")
    if case == "handed-back":
        event = Other(order_id="o-1")
        await (await bus.subscribe(GROUP, [Other.event_type()])).close()  # another version's binding
    hook = Scripted(503 if case == "record-down" else 204, 204)
    async with hook.running() as url, PushAmbassador([subscription(url, **options)], bus, store=Down()):
        await Publisher(bus).publish(event, ids=["e-1"], correlation_id="order-o-1")
        await settled(bus)
    record = next(r for r in caplog.records if line in r.getMessage())
    fields = {key: getattr(record, key, "missing") for key in (
        "event_id", "event_type", "correlation_id", "service", "handler", "group", "attempt")}
    assert fields == {"event_id": "e-1", "event_type": event.event_type(), "correlation_id": "order-o-1",
                      "service": GROUP, "handler": "push", "group": GROUP, "attempt": 1}


def test_invalid_yaml_is_refused_naming_the_place_without_quoting_the_lines(tmp_path: Path) -> None:
    """PyYAML's error quotes the lines around a mistake, here a literal Authorization header:
    the refusal says what and where (line, column), as TOML's does, not the text."""
    pytest.importorskip("yaml")
    (tmp_path / "push.yaml").write_text(
        "subscriptions:\n  - group: g\n    types: [a.b]\n    url: https://hooks.example/in\n"
        f"    headers: {{Authorization: Bearer {TOKEN}: x}}\n"
    )
    with pytest.raises(ConfigurationError) as caught:
        load_config(tmp_path / "push.yaml")
    assert str(caught.value).endswith("push.yaml: invalid YAML (line 5, column 47: expected ',' or '}', but got ':')")
    assert TOKEN not in str(caught.value)


def test_a_subscription_s_repr_shows_neither_its_secret_nor_its_headers() -> None:
    from choreograph.push import PushSubscription, generate_secret

    SECRET = generate_secret()  # noqa: N806
    sub = PushSubscription("hooks", ["shop.order.placed"], "http://127.0.0.1:1/in", secret=SECRET,
                           headers={"Authorization": "Bearer t0k3n"})
    shown = repr(sub)
    assert "hooks" in shown
    assert SECRET.removeprefix("whsec_") not in shown and "t0k3n" not in shown
