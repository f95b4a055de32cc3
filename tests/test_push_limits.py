"""Size limits at both ends of a push: the ambassador reads at most ``max_response_body`` bytes of an
answer it needs, and ``receiver()`` and ``read_event()`` read at most ``max_body`` bytes of a request,
streamed or not.

Over real loopback HTTP; the bus is the in-memory transport on a virtual clock (see test_push).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from choreograph import Envelope
from choreograph._push_config import load_config
from choreograph.errors import ConfigurationError
from choreograph.push import Problem, PushSubscription, read_event, receiver
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


# -- receiver() reading requests ---------------------------------------------------------------


def _event(size: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    headers = [(b"ce-specversion", b"1.0"), (b"ce-id", b"e"), (b"ce-source", b"/s"), (b"ce-type", b"t"),
               (b"content-type", b"application/json")]
    return headers, orjson.dumps({"padding": "x" * size})


async def _post_chunked(app: Any, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes, int]:
    """POST ``body`` to the ASGI ``app`` in 256-byte chunks without a Content-Length (as a chunked
    request arrives); the status, the answer's body, and how many chunks the app asked for."""
    chunks = [body[start:start + 256] for start in range(0, len(body), 256)]
    asked = 0
    answer: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if asked > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[asked - 1], "more_body": asked < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/", "raw_path": b"/", "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return answer["status"], answer["body"], asked


async def test_the_receiver_stops_reading_a_chunked_body_at_max_body_and_answers_413() -> None:
    """A body without Content-Length is read streamed: the receiver stops at the limit rather than
    holding the whole body first, and the handler is not called."""
    calls: list[Envelope] = []

    async def handle(event: Envelope) -> None:
        calls.append(event)

    headers, body = _event(64 * LIMIT)
    status, answer, asked = await _post_chunked(receiver(handle, max_body=LIMIT), headers, body)
    assert status == 413
    assert f"{LIMIT} bytes" in orjson.loads(answer)["error"]
    assert asked <= LIMIT // 256 + 1  # not the 256 chunks of the whole body
    assert calls == []


async def test_the_receiver_accepts_a_chunked_body_within_max_body() -> None:
    calls: list[Envelope] = []

    async def handle(event: Envelope) -> None:
        calls.append(event)

    headers, body = _event(LIMIT // 2)
    status, _, _ = await _post_chunked(receiver(handle, max_body=LIMIT), headers, body)
    assert status == 204
    assert [event.data for event in calls] == [{"padding": "x" * (LIMIT // 2)}]


async def test_the_receiver_refuses_a_declared_content_length_over_max_body_with_413() -> None:
    async def handle(event: Envelope) -> None:
        raise AssertionError("not called")

    headers, body = _event(4 * LIMIT)
    async with serve(receiver(handle, max_body=LIMIT)) as base, httpx.AsyncClient() as client:
        response = await client.post(base, headers=dict((k.decode(), v.decode()) for k, v in headers), content=body)
    assert response.status_code == 413


# -- read_event() inside an endpoint -----------------------------------------------------------


def _reading(outcomes: list[Envelope | Problem]) -> Starlette:
    """An endpoint of one's own that reads the pushed event with ``read_event(max_body=LIMIT)``."""

    async def endpoint(request: Request) -> Response:
        try:
            outcomes.append(await read_event(request, max_body=LIMIT))
        except Problem as exc:
            outcomes.append(exc)
            return exc.response()
        return Response(status_code=204)

    return Starlette(routes=[Route("/", endpoint, methods=["POST"])])


def test_read_event_reads_at_most_one_mebibyte_unless_told() -> None:
    import inspect

    assert inspect.signature(read_event).parameters["max_body"].default == 1 << 20


async def test_read_event_stops_reading_a_chunked_body_over_max_body_with_a_413_naming_the_limit() -> None:
    """Streamed, as the receiver reads it: the read stops at the limit, the whole body is never held."""
    outcomes: list[Envelope | Problem] = []
    headers, body = _event(64 * LIMIT)
    status, _, asked = await _post_chunked(_reading(outcomes), headers, body)
    [refused] = outcomes
    assert isinstance(refused, Problem) and status == refused.status == 413
    assert refused.detail == f"body exceeds the limit of {LIMIT} bytes"
    assert asked <= LIMIT // 256 + 1  # not the 256 chunks of the whole body


async def test_read_event_refuses_a_declared_content_length_over_max_body_before_reading() -> None:
    outcomes: list[Envelope | Problem] = []
    headers, body = _event(4 * LIMIT)
    headers.append((b"content-length", str(len(body)).encode()))
    status, _, asked = await _post_chunked(_reading(outcomes), headers, body)
    [refused] = outcomes
    assert isinstance(refused, Problem) and status == 413
    assert refused.detail == f"body of {len(body)} bytes exceeds the limit of {LIMIT} bytes"
    assert asked == 0


async def test_read_event_accepts_a_body_of_exactly_max_body() -> None:
    outcomes: list[Envelope | Problem] = []
    headers, body = _event(LIMIT - len(orjson.dumps({"padding": ""})))
    assert len(body) == LIMIT
    status, _, _ = await _post_chunked(_reading(outcomes), headers, body)
    [event] = outcomes
    assert status == 204 and isinstance(event, Envelope)
    assert event.data == orjson.loads(body)
