"""Size limits at both ends of a push: the ambassador reads at most ``max_response_body`` bytes of an
answer it needs, and ``receiver()`` reads at most ``max_body`` bytes of a request, streamed or not.

Over real loopback HTTP; the bus is the in-memory transport on a virtual clock (see test_push).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from choreograph._push_config import load_config
from choreograph.errors import ConfigurationError
from choreograph.push import PushSubscription
from choreograph.testing import MemoryTransport, VirtualClock, settled
from tests._push_support import Scripted, serve
from tests.test_push import (
    GROUP,
    MINIMAL_TOML,
    Scheduled,
    publish,
    pushing,
    scheduled_response,
    subscription,
    watch,
    watched,
)

LIMIT = 1024


@pytest.fixture
def bus() -> MemoryTransport:
    return MemoryTransport(clock=VirtualClock())


def big_answer(size: int) -> tuple[int, dict[str, str], bytes]:
    """A 200 carrying a CloudEvent whose body is about ``size`` bytes."""
    return scheduled_response({"delivery_id": "d-e-1", "padding": "x" * size})


class Streaming:
    """A receiver answering every POST with a chunked (no Content-Length) CloudEvent of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.posts = 0
        self.app = Starlette(routes=[Route("/hook", self._endpoint, methods=["POST"])])

    async def _endpoint(self, request: Request) -> Response:
        await request.body()
        self.posts += 1
        status, headers, body = big_answer(self.size)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 256):
                yield body[start:start + 256]

        return StreamingResponse(chunks(), status_code=status, headers=headers)


# -- the ambassador reading answers ------------------------------------------------------------


def test_a_subscription_reads_answers_up_to_one_mebibyte_unless_told() -> None:
    from choreograph.push import MAX_RESPONSE_BODY

    assert MAX_RESPONSE_BODY == 1 << 20
    assert PushSubscription("g", ["t"], "http://x/").max_response_body == MAX_RESPONSE_BODY
    assert PushSubscription("g", ["t"], "http://x/", max_response_body=10).max_response_body == 10


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "10"])
def test_a_max_response_body_that_is_not_a_positive_whole_number_is_refused(limit: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_response_body"):
        PushSubscription("g", ["t"], "http://x/", max_response_body=limit)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_answer_over_the_limit_is_a_failed_attempt_then_a_dead_letter_naming_the_limit(
    bus: MemoryTransport, chunked: bool
) -> None:
    """Not truncated, not acked, nothing published: retried by the policy, then dead-lettered
    with an error naming max_response_body and its value."""
    hook: Any = Streaming(4 * LIMIT) if chunked else Scripted(big_answer(4 * LIMIT))
    await watch(bus, "observer", [Scheduled.event_type()])
    async with serve(hook.app) as base:
        sub = subscription(base + "/hook", handshake=False, max_response_body=LIMIT)
        async with pushing(bus, sub) as ambassador:
            await publish(bus, "e-1")
            await settled(bus)
    assert hook.posts == 3
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["status"]) == ("max_attempts", 200)
    error = letter.record["last_error"]
    assert error["type"] == "AnswerTooLarge"
    assert f"max_response_body of {LIMIT} bytes" in error["message"]
    assert await watched(bus, "observer", [Scheduled.event_type()]) == []
    assert (ambassador.stats().delivered, ambassador.stats().published) == (0, 0)


async def test_an_answer_within_the_limit_is_published(bus: MemoryTransport) -> None:
    hook = Scripted(big_answer(LIMIT // 2))
    await watch(bus, "observer", [Scheduled.event_type()])
    async with hook.running() as url, pushing(bus, subscription(url, max_response_body=LIMIT)):
        await publish(bus, "e-1")
        await settled(bus)
    [output] = await watched(bus, "observer", [Scheduled.event_type()])
    assert output.data["delivery_id"] == "d-e-1"


async def test_a_large_answer_that_is_not_a_cloudevent_is_not_read_and_the_push_is_done(
    bus: MemoryTransport,
) -> None:
    """Only an answer carrying events is read; a 2xx page of text is acknowledged, whatever its size."""
    hook = Scripted((200, {"content-type": "text/plain"}, b"ok " * LIMIT))
    async with hook.running() as url, pushing(bus, subscription(url, max_response_body=LIMIT)) as ambassador:
        await publish(bus, "e-1")
        await settled(bus)
    assert ambassador.stats().delivered == 1
    assert await bus.dead_letters() == []


async def test_a_large_error_answer_keeps_its_verdict_and_an_excerpt(bus: MemoryTransport) -> None:
    """A 400 with a huge body is rejected at once as any 400 is, quoting the start of the body."""
    hook = Scripted((400, {"content-type": "text/plain"}, b"bad order " + b"x" * (4 * LIMIT)))
    async with hook.running() as url, pushing(bus, subscription(url, max_response_body=LIMIT)):
        await publish(bus, "e-1")
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["status"]) == ("rejected", 400)
    assert "answered 400 Bad Request: bad order xxx" in letter.record["last_error"]["message"]


def test_a_config_file_sets_max_response_body(tmp_path: Path) -> None:
    path = tmp_path / "push.toml"
    path.write_text(MINIMAL_TOML + 'max_response_body = "2048"\n')
    [sub] = load_config(path).subscriptions
    assert sub.max_response_body == 2048


def test_a_config_file_max_response_body_of_the_wrong_type_is_refused_naming_its_key(tmp_path: Path) -> None:
    path = tmp_path / "push.toml"
    path.write_text(MINIMAL_TOML + "max_response_body = 0\n")
    with pytest.raises(ConfigurationError) as info:
        load_config(path)
    assert str(info.value) == "push.toml: subscriptions[0].max_response_body: expected a whole number >= 1, got 0"
