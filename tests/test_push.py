"""Push delivery to HTTP subscribers: signing, the outcome table, Retry-After, the handshake, the
receiver helper, and the Node.js subscriber of examples/polyglot — all over real loopback HTTP.

The bus is the in-memory transport on a virtual clock: HTTP happens in real time, backoffs
and Retry-After waits are fast-forwarded by ``settled()`` and asserted exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import os
import re
import shutil
import signal
import sys
import zlib
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from choreograph import (
    FAILED,
    Envelope,
    Event,
    Failure,
    Publisher,
    Reject,
    Retry,
    RetryPolicy,
    Service,
    Worker,
    derive_id,
)
from choreograph import decode as decode_envelope
from choreograph._envelope import rfc3339
from choreograph._push_config import load_config
from choreograph.errors import ConfigurationError, MalformedEnvelope, StoreError
from choreograph.push import (
    Problem,
    PushAmbassador,
    PushSubscription,
    SignatureError,
    classify,
    decode_http,
    generate_secret,
    read_event,
    receiver,
    retry_after,
    sign,
    signature_headers,
    verify,
)
from choreograph.stores.base import ErrorInfo
from choreograph.stores.memory import MemoryStore
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports import open_transport
from choreograph.transports.base import Message
from tests._push_support import HANG, Scripted, serve
from tests._tripping import trip_decode

SECRET = generate_secret()
ORIGIN = "tests.choreograph.local"
GROUP = "pushed"


class Assigned(Event, type="test.push.assigned"):
    delivery_id: str


class Scheduled(Event, type="test.push.scheduled"):
    delivery_id: str
    slot: int = 0


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def bus(clock: VirtualClock) -> MemoryTransport:
    return MemoryTransport(clock=clock)


def subscription(url: str, **overrides: Any) -> PushSubscription:
    options: dict[str, Any] = {
        "retry": RetryPolicy(max_attempts=3, base=1.0, jitter=False), "timeout": 5.0, "secret": SECRET,
    }
    options.update(overrides)
    return PushSubscription(GROUP, [Assigned.event_type()], url, **options)


@contextlib.asynccontextmanager
async def pushing(bus: MemoryTransport, *subs: PushSubscription, **options: Any) -> AsyncIterator[PushAmbassador]:
    async with PushAmbassador(list(subs), bus, origin=ORIGIN, **options) as ambassador:
        yield ambassador


async def watch(bus: MemoryTransport, group: str, types: list[str]) -> None:
    """Register an observer group (no consumer, so ``settled`` ignores its backlog)."""
    await (await bus.subscribe(group, types)).close()


async def watched(bus: MemoryTransport, group: str, types: list[str]) -> list[Envelope]:
    sub = await bus.subscribe(group, types)
    deliveries = await sub.fetch(1000, timeout=0)
    await sub.ack_many(deliveries)
    await sub.close()
    return [decode_envelope(d.message.body) for d in deliveries]


async def publish(bus: MemoryTransport, *ids: str) -> list[Envelope]:
    events = [Assigned(delivery_id=f"d-{i}") for i in ids]
    return await Publisher(bus).publish(*events, ids=list(ids))


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (real time) until ``condition()`` holds."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - state spread over HTTP and the bus: no single event
            await asyncio.sleep(0.005)


# -- signing -----------------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    """The published Standard Webhooks vector is reproduced exactly (any SW library verifies us)."""
    signature = sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                     b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_accepts_a_signed_request_and_any_secret_of_a_rotation() -> None:
    """A request signed by one of several secrets verifies against any list containing it."""
    old, new = generate_secret(), generate_secret()
    headers = signature_headers([old, new], "evt-1", b"{}", timestamp=1_700_000_000)
    verify(headers, b"{}", new, now=1_700_000_010)
    verify(headers, b"{}", [generate_secret(), old], now=1_700_000_010)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, b: (h, b + b" "), "no signature matches"),
        (lambda h, b: ({**h, "webhook-id": "evt-2"}, b), "no signature matches"),
        (lambda h, b: ({**h, "webhook-signature": "v1," + "A" * 44}, b), "no signature matches"),
        (lambda h, b: ({**h, "webhook-signature": "v2,abc"}, b), "no v1 signature"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), "header is missing"),
        (lambda h, b: ({**h, "webhook-timestamp": "soon"}, b), "expected Unix seconds"),
        # int() refuses over 4300 digits (ValueError): the receiver answered 500 before checking anything
        (lambda h, b: ({**h, "webhook-timestamp": "9" * 5000}, b), "expected Unix seconds"),
    ],
    ids=["altered-body", "other-id", "forged-signature", "unknown-version", "unsigned", "bad-timestamp",
         "5000-digit-timestamp"],
)
def test_verify_rejects_a_forged_request(change: Any, message: str) -> None:
    """Any change to the body, id or signature fails verification with a message naming the check."""
    body = b'{"delivery_id":"d-1"}'
    headers, body = change(signature_headers(SECRET, "evt-1", body, timestamp=1_700_000_000), body)
    with pytest.raises(SignatureError, match=message):
        verify(headers, body, SECRET, now=1_700_000_000)


def test_verify_rejects_a_request_outside_the_tolerance() -> None:
    """A signature older (a replay) or newer than the tolerance is refused, even if it matches."""
    headers = signature_headers(SECRET, "evt-1", b"{}", timestamp=1_700_000_000)
    verify(headers, b"{}", SECRET, now=1_700_000_300, tolerance=300)
    with pytest.raises(SignatureError, match="older than the 300s tolerance"):
        verify(headers, b"{}", SECRET, now=1_700_000_301, tolerance=300)
    with pytest.raises(SignatureError, match="in the future"):
        verify(headers, b"{}", SECRET, now=1_699_999_000, tolerance=300)


@pytest.mark.parametrize("secret", ["nope", "whsec_" + "A" * 28, "whsec_" + "A" * 88],
                         ids=["3-bytes", "21-bytes", "66-bytes"])
def test_a_secret_whose_key_is_not_24_to_64_bytes_is_a_configuration_error(secret: str) -> None:
    """``--secret nope`` is base64 for 3 bytes: it was taken, and every push signed with it."""
    with pytest.raises(ConfigurationError, match="Standard Webhooks keys are 24 to 64"):
        subscription("http://127.0.0.1:9/", secret=secret)
    subscription("http://127.0.0.1:9/", secret="whsec_" + "A" * 32)  # 24 bytes: fine


def test_a_secret_that_is_not_whsec_base64_is_a_configuration_error() -> None:
    """A subscription with a malformed secret fails when it is declared, not at the first push."""
    with pytest.raises(ConfigurationError, match="whsec_"):
        subscription("http://127.0.0.1:9/", secret="whsec_not base64!")


# -- the outcome table ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, "done"), (202, "done"), (204, "done"), (400, "permanent"), (413, "permanent"), (415, "permanent"),
     (422, "permanent"), (401, "permanent"), (410, "permanent"), (302, "permanent"), (404, "transient"),
     (408, "transient"), (409, "transient"), (429, "transient"), (500, "transient"), (503, "transient")],
)
def test_status_codes_map_to_the_design_outcome_table(status: int, verdict: str) -> None:
    """2xx done; 400/413/415/422 (and other 3xx/4xx) permanent; 404/408/409/429/5xx transient."""
    assert classify(status) == verdict


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After is delta-seconds or an HTTP date; a past date is 0, garbage is ignored."""
    now = 1_767_225_600.0
    assert retry_after("7", now) == 7.0
    assert retry_after(email.utils.formatdate(now + 20, usegmt=True), now) == 20.0
    assert retry_after(email.utils.formatdate(now - 20, usegmt=True), now) == 0.0
    assert retry_after("soon", now) is None
    assert retry_after("-3", now) is None
    assert retry_after(None, now) is None


def test_retry_after_reads_only_what_rfc_9110_writes() -> None:
    """delay-seconds are ASCII digits: what float() reads besides is unreadable (the backoff applies),
    not 10 s for ``1_0``; a four-digit year is the one written (0030 is long past: 0), not 2030."""
    now = 1_750_000_000.0  # June 2025
    assert retry_after("10", now) == 10.0
    assert retry_after(" 2.5 ", now) == 2.5
    for junk in ("1_0", "1e3", "+5", "\u0661\u0660", "infinity", "nan", "0x10"):
        assert retry_after(junk, now) is None, junk
    assert retry_after("Wed, 06 Nov 0030 08:49:37 GMT", now) == 0.0
    assert retry_after("Mon, 06 Nov 0000 08:49:37 GMT", now) == 0.0
    assert retry_after("Wed Nov  6 08:49:37 0030", now) == 0.0
    assert retry_after("Wed, 06 Nov 2030 08:49:37 GMT", now) == pytest.approx(1920185377.0 - now)
    assert retry_after("Wednesday, 06-Nov-30 08:49:37 GMT", now) == pytest.approx(1920185377.0 - now)


# -- the ambassador over real HTTP --------------------------------------------------------------


async def test_an_event_is_posted_in_binary_mode_signed_and_acked(bus: MemoryTransport) -> None:
    """The receiver gets ce- headers, the data as a JSON body and a valid signature keyed by the event id."""
    hook = Scripted(204)
    async with hook.running() as url, pushing(bus, subscription(url)) as ambassador:
        [sent] = await publish(bus, "e-1")
        await settled(bus)
    [request] = hook.requests
    assert request.headers["ce-type"] == "test.push.assigned"
    assert request.headers["ce-id"] == "e-1"
    assert request.headers["ce-correlationid"] == "e-1"
    assert request.headers["content-type"] == "application/json"
    assert orjson.loads(request.body) == {"delivery_id": "d-e-1"}
    assert request.headers["webhook-id"] == "e-1"
    verify(request.headers, request.body, SECRET)
    assert decode_http(request.headers, request.body).to_dict() == {**sent.to_dict(), "data": {"delivery_id": "d-e-1"}}
    assert ambassador.stats().delivered == 1
    assert await bus.dead_letters() == []


async def test_structured_mode_posts_the_envelope_as_it_is_on_the_bus(bus: MemoryTransport) -> None:
    """In structured mode the body is the CloudEvents JSON itself."""
    hook = Scripted(200)
    async with hook.running() as url, pushing(bus, subscription(url, mode="structured")):
        [sent] = await publish(bus, "e-1")
        await settled(bus)
    [request] = hook.requests
    assert request.headers["content-type"].startswith("application/cloudevents+json")
    assert decode_envelope(request.body).id == sent.id
    verify(request.headers, request.body, SECRET)


async def test_500_then_200_is_retried_after_the_backoff_and_delivered_once(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    """A 500 is retried with the policy's backoff; the retry carries the same webhook-id; one delivery counts."""
    hook = Scripted(500, 200)
    async with hook.running() as url, pushing(bus, subscription(url)) as ambassador:
        await publish(bus, "e-1")
        await until(lambda: hook.posts == 1 and bus.pending()[0] == 0)
        assert bus.pending()[1] == clock.monotonic() + 1.0  # base=1.0, no jitter: attempt 1 waits 1 s
        await settled(bus)
    assert [r.headers["webhook-id"] for r in hook.requests] == ["e-1", "e-1"]
    stats = ambassador.stats()
    assert (stats.delivered, stats.retried, stats.dead_lettered) == (1, 1, 0)
    assert await bus.dead_letters() == []


@pytest.mark.parametrize("status", [400, 413, 415, 422])
async def test_a_permanent_status_is_dead_lettered_at_once_with_a_failure_event(
    bus: MemoryTransport, status: int
) -> None:
    """No retry: the record says rejected, the status and the URL, and choreograph.failed is published."""
    hook = Scripted((status, {}, b"delivery_id is unknown"))
    await watch(bus, "observer", [FAILED])
    async with hook.running() as url, pushing(bus, subscription(url)):
        [sent] = await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 1
    [letter] = await bus.dead_letters(GROUP)
    record = letter.record
    assert (record["reason"], record["status"], record["attempts"], record["url"]) == ("rejected", status, 1, url)
    assert f"answered {status}" in record["last_error"]["message"]
    assert "delivery_id is unknown" in record["last_error"]["message"]
    assert record["envelope"]["id"] == "e-1"
    [failed] = await watched(bus, "observer", [FAILED])
    assert failed.data["type"] == Assigned.event_type()
    assert failed.data["record"]["status"] == status
    assert (failed.correlationid, failed.causationid) == (sent.correlationid, sent.id)


@pytest.mark.parametrize("charset", ["base64", "undefined"])
async def test_an_error_answer_whose_charset_is_no_text_encoding_is_still_read_for_its_excerpt(
    bus: MemoryTransport, charset: str
) -> None:
    """httpx takes any codec ``codecs.lookup`` finds as the answer's encoding (``base64``,
    ``zlib_codec``...), and decoding the excerpt with it raised LookupError: a 400 was an
    internal error, retried (the event pushed again) before a dead letter ``internal_error``
    without its status. The excerpt falls back to UTF-8; the 400 is dead-lettered at once."""
    hook = Scripted((400, {"content-type": f"text/plain; charset={charset}"}, b"delivery_id is unknown"))
    async with hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 1
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["status"], letter.record["attempts"]) == ("rejected", 400, 1)
    assert "answered 400 Bad Request: delivery_id is unknown" in letter.record["last_error"]["message"]


async def test_a_permanent_status_after_a_transient_one_keeps_the_first_failure_in_its_record(
    bus: MemoryTransport,
) -> None:
    """As in the worker: rejected at once, but the record's first error and time are the 503's."""
    hook = Scripted(503, (422, {}, b"unknown delivery"))
    async with hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 2
    [letter] = await bus.dead_letters(GROUP)
    record = letter.record
    assert (record["reason"], record["attempts"], record["status"]) == ("rejected", 2, 422)
    assert "answered 503" in record["first_error"]["message"]
    assert "answered 422" in record["last_error"]["message"]
    assert record["last_attempt_at"] - record["first_attempt_at"] == 1.0  # base=1.0, no jitter


@pytest.mark.parametrize("status", [404, 408, 409, 429, 502, 503])
async def test_a_transient_status_is_retried(bus: MemoryTransport, status: int) -> None:
    """404/408/409/429/5xx are retried, and the event arrives once the receiver recovers."""
    hook = Scripted(status, 204)
    async with hook.running() as url, pushing(bus, subscription(url)) as ambassador:
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 2
    assert ambassador.stats().delivered == 1


async def test_a_receiver_that_never_answers_times_out_and_is_retried(bus: MemoryTransport) -> None:
    """A hung request is abandoned after the subscription's timeout and counted as a failed attempt."""
    hook = Scripted(HANG, 204)
    async with hook.running() as url, pushing(bus, subscription(url, timeout=0.3)) as ambassador:
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 2
    stats = ambassador.stats()
    assert (stats.delivered, stats.retried) == (1, 1)


async def test_a_copy_put_back_while_its_push_is_in_flight_keeps_its_retries(clock: VirtualClock) -> None:
    """The lease of a hung push runs out: its copy is put back while the push is in flight,
    again and again. Put back, not tried: when the push fails at last, the copy's 500 is
    retried as the policy says (it came back with an attempt per put-back: dead-lettered)."""
    bus = MemoryTransport("memory://?lease=2", clock=clock)
    hook = Scripted(HANG, 500, 204)
    async with hook.running() as url, pushing(bus, subscription(url, timeout=1.0)) as ambassador:
        await publish(bus, "e-1")
        await until(lambda: hook.posts == 1)
        clock.advance(2.0)  # the lease of the hung push runs out: its copy is handed out again
        await settled(bus)  # the copy is put back until the push times out (real time), then runs
    assert hook.posts == 3
    assert await bus.dead_letters() == []
    assert ambassador.stats().delivered == 1


@pytest.mark.parametrize("handshake", [True, False], ids=["handshake", "no-handshake"])
async def test_a_redirect_is_not_followed_even_by_a_client_that_follows_them(
    bus: MemoryTransport, handshake: bool
) -> None:
    """A 3xx is permanent (the outcome table), and the handshake grants the URL that answered it.
    The ``client`` given to the ambassador (for TLS or proxies) decided instead: one made with
    ``follow_redirects=True`` followed a 307 from the handshake to another URL, whose grant then
    counted for the first, and re-sent the signed POST there. Neither request follows a redirect:
    the event is dead-lettered ``rejected`` with the 307, and the other URL gets nothing."""
    elsewhere: list[str] = []

    async def hook(request: Request) -> Response:
        return Response(status_code=307, headers={"location": "/elsewhere"})

    async def other(request: Request) -> Response:
        elsewhere.append(request.method)
        return Response(status_code=200 if request.method == "OPTIONS" else 204,
                        headers={"WebHook-Allowed-Origin": "*"})

    app = Starlette(routes=[Route("/hook", hook, methods=["POST", "OPTIONS"]),
                            Route("/elsewhere", other, methods=["POST", "OPTIONS"])])
    async with serve(app) as base, httpx.AsyncClient(follow_redirects=True) as client:
        async with PushAmbassador([subscription(base + "/hook", handshake=handshake)], bus, origin=ORIGIN,
                                  client=client):
            await publish(bus, "e-1")
            await settled(bus)
    assert elsewhere == []
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["status"], letter.record["attempts"]) == ("rejected", 307, 1)


async def test_a_copy_that_cannot_be_put_back_does_not_stop_the_fetch_loop(
    clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy of an event whose push is in flight is put back (``defer``) from the fetch loop
    itself: a broker failing that one call raised out of the loop, which ended silently - the
    ambassador ran on and pushed nothing more. The copy is left to its lease, the loop goes on."""
    from choreograph.transports.memory import MemoryDelivery

    bus = MemoryTransport("memory://?lease=2", clock=clock)
    real_defer = MemoryDelivery._defer
    failures = [StoreError("broker unreachable for a moment")]

    async def flaky_defer(self: MemoryDelivery, after: float) -> None:
        if failures:
            raise failures.pop()
        await real_defer(self, after)

    monkeypatch.setattr(MemoryDelivery, "_defer", flaky_defer)
    hook = Scripted(HANG, 204)
    async with hook.running() as url, pushing(bus, subscription(url, timeout=1.0)) as ambassador:
        await publish(bus, "e-1")
        await until(lambda: hook.posts == 1)
        clock.advance(2.0)  # the hung push's lease runs out: its copy is handed out, and defer fails
        await until(lambda: not failures)
        await publish(bus, "e-2")
        await until(lambda: "e-2" in {r.headers["webhook-id"] for r in hook.requests})
        assert [runner.tasks[0].done() for runner in ambassador.runners] == [False]
        await until(lambda: bus.pending()[0] == 1)  # only the copy left in flight
        clock.advance(2.0)  # ...until its lease runs out: handed out again, and settled
        await settled(bus)
    assert sorted({r.headers["webhook-id"] for r in hook.requests}) == ["e-1", "e-2"]


async def test_an_unreachable_receiver_is_retried_then_given_up(bus: MemoryTransport) -> None:
    """Connection refused is transient; after max attempts the record names the connection error."""
    async with serve(Scripted().app) as base:
        url = base + "/hook"  # the server is gone once this block exits: its port refuses connections
    async with pushing(bus, subscription(url, handshake=False)):
        await publish(bus, "e-1")
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["attempts"], letter.record["status"]) == ("max_attempts", 3, None)
    assert letter.record["last_error"]["type"] == "ConnectError"


@pytest.mark.parametrize(
    ("header", "max_retry_after", "expected"),
    [("7", 300.0, 7.0), ("date+20", 300.0, 20.0), ("3600", 60.0, 60.0)],
    ids=["seconds", "http-date", "capped"],
)
async def test_retry_after_is_honoured_up_to_the_cap(
    bus: MemoryTransport, clock: VirtualClock, header: str, max_retry_after: float, expected: float
) -> None:
    """A 503's Retry-After (seconds or date) sets the retry delay instead of the backoff, capped."""
    if header == "date+20":
        header = email.utils.formatdate(clock.time() + 20, usegmt=True)
    hook = Scripted((503, {"Retry-After": header}, b""), 204)
    async with hook.running() as url, pushing(bus, subscription(url, max_retry_after=max_retry_after)):
        await publish(bus, "e-1")
        await until(lambda: hook.posts == 1 and bus.pending()[0] == 0)
        assert bus.pending()[1] == clock.monotonic() + expected
        await settled(bus)
    assert hook.posts == 2


async def test_a_retry_after_date_is_read_against_the_time_of_the_answer(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    """A slow receiver answered after 8 s "retry at <now + 5 s>": the date was read against the
    time the request was sent, and the retry waited 13 s instead of 5."""

    async def slow(request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=200, headers={"WebHook-Allowed-Origin": "*"})
        clock.advance(8.0)  # the receiver takes 8 s to answer (on the test's clock)
        return Response(status_code=503, headers={"Retry-After": email.utils.formatdate(clock.time() + 5, usegmt=True)})

    app = Starlette(routes=[Route("/hook", slow, methods=["POST", "OPTIONS"])])
    async with serve(app) as base, pushing(bus, subscription(base + "/hook", timeout=30.0)) as ambassador:
        await publish(bus, "e-1")
        await until(lambda: ambassador.stats().retried == 1 and bus.pending()[0] == 0)
        assert bus.pending()[1] == clock.monotonic() + 5


async def test_a_retry_after_that_reaches_past_max_age_gives_up_at_once(bus: MemoryTransport) -> None:
    """As in the worker: no retry can honour both the Retry-After and max_age, so none is made."""
    hook = Scripted((503, {"Retry-After": "120"}, b""), 204)
    retry = RetryPolicy(max_attempts=5, base=1.0, max_age=60.0, jitter=False)
    async with hook.running() as url, pushing(bus, subscription(url, retry=retry)) as ambassador:
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 1
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["attempts"], letter.record["status"]) == ("max_age", 1, 503)
    assert ambassador.stats().retried == 0


async def test_giving_up_dead_letters_the_full_record_and_compensations_run(bus: MemoryTransport) -> None:
    """After max attempts: record with first/last error and times, and an on_failure handler elsewhere fires."""
    compensated: list[Failure] = []
    billing = Service("billing")

    @billing.on_failure(Assigned)
    async def refund(failure: Failure) -> None:
        compensated.append(failure)

    hook = Scripted((503, {}, b"down for maintenance"))
    async with Worker([billing], bus), hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 3
    [letter] = await bus.dead_letters(GROUP)
    record = letter.record
    assert (record["reason"], record["attempts"], record["status"]) == ("max_attempts", 3, 503)
    assert record["service"] == record["group"] == GROUP
    assert record["first_error"]["type"] == record["last_error"]["type"] == "HTTPStatusError"
    assert record["first_attempt_at"] < record["last_attempt_at"]
    [failure] = compensated
    assert failure.event == Assigned(delivery_id="d-e-1")
    assert (failure.reason, failure.record["status"]) == ("max_attempts", 503)


def scheduled_response(body: dict[str, Any], **headers: str) -> tuple[int, dict[str, str], bytes]:
    return 200, {"ce-specversion": "1.0", "ce-id": "receiver-chosen", "ce-source": "/node/delivery",
                 "ce-type": "test.push.scheduled", "content-type": "application/json", **headers}, orjson.dumps(body)


async def test_a_cloudevent_in_the_answer_is_published_with_a_deterministic_id(bus: MemoryTransport) -> None:
    """The receiver's output gets derive_id(input, group, "push", 0), the input's correlation, causation and hops+1."""
    hook = Scripted(scheduled_response({"delivery_id": "d-e-1", "slot": 4}))
    await watch(bus, "observer", [Scheduled.event_type()])
    async with hook.running() as url, pushing(bus, subscription(url, emits=[Scheduled.event_type()])) as ambassador:
        [sent] = await publish(bus, "e-1")
        await settled(bus)
    [output] = await watched(bus, "observer", [Scheduled.event_type()])
    assert output.id == derive_id("e-1", GROUP, "push", 0)
    assert (output.correlationid, output.causationid, output.hops) == (sent.correlationid, "e-1", sent.hops + 1)
    assert (output.source, output.data) == ("/node/delivery", {"delivery_id": "d-e-1", "slot": 4})
    assert Scheduled.model_validate(output.data) == Scheduled(delivery_id="d-e-1", slot=4)
    assert ambassador.stats().published == 1


async def test_a_binary_mode_answer_without_data_is_an_output_too(bus: MemoryTransport) -> None:
    """A CloudEvent with no data travels in binary mode as ce- headers and an empty body: it is
    published like any answer, not dropped while its input is acked."""
    headers = {"ce-specversion": "1.0", "ce-id": "r-1", "ce-source": "/node", "ce-type": "test.push.noted"}
    hook = Scripted((200, headers, b""))
    await watch(bus, "observer", ["test.push.noted"])
    async with hook.running() as url, pushing(bus, subscription(url)) as ambassador:
        await publish(bus, "e-1")
        await settled(bus)
    [output] = await watched(bus, "observer", ["test.push.noted"])
    assert (output.id, output.causationid, output.data) == (derive_id("e-1", GROUP, "push", 0), "e-1", None)
    assert ambassador.stats().published == 1


async def test_an_answer_with_ce_headers_but_no_specversion_is_rejected_not_ignored(bus: MemoryTransport) -> None:
    """A subscriber that meant to answer an event but left out ce-specversion learns why from the dead
    letter; its output is not silently dropped."""
    headers = {"ce-id": "r-1", "ce-source": "/node", "ce-type": "test.push.noted", "content-type": "application/json"}
    hook = Scripted((200, headers, b"{}"))
    async with hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1")
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert letter.record["reason"] == "rejected"
    assert "ce-specversion" in letter.record["last_error"]["message"]


async def test_an_answer_of_an_undeclared_type_is_rejected(bus: MemoryTransport) -> None:
    """A receiver answering with a type its subscription does not emit has the input dead-lettered."""
    hook = Scripted(scheduled_response({"delivery_id": "d-e-1"}))
    async with hook.running() as url, pushing(bus, subscription(url, emits=["test.push.other"])):
        await publish(bus, "e-1")
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert letter.record["reason"] == "rejected"
    assert "'test.push.scheduled'" in letter.record["last_error"]["message"]


@pytest.mark.parametrize(("header", "value", "shown"), [
    ("ce-subject", "a%0Ab", "subject 'a\\nb'"),
    ("ce-source", "/node%C2%85", "source '/node\\x85'"),
    ("ce-region", "eu%EF%BF%BE", "region 'eu\\ufffe'"),
])
async def test_an_answer_whose_attribute_a_cloudevents_string_cannot_hold_is_rejected(
    bus: MemoryTransport, header: str, value: str, shown: str
) -> None:
    """An event in a subscriber's answer goes onto the bus as the ambassador's output: an attribute
    it sets itself holding a control character or a noncharacter is refused (the input
    dead-lettered, naming it), as a handler's own subject would be."""
    headers = {"ce-specversion": "1.0", "ce-id": "r-1", "ce-source": "/node", "ce-type": "test.push.noted",
               "content-type": "application/json", header: value}
    hook = Scripted((200, headers, b"{}"))
    async with hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1")
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert letter.record["reason"] == "rejected"
    assert shown in letter.record["last_error"]["message"]
    assert "CloudEvents String must not" in letter.record["last_error"]["message"]


@pytest.mark.parametrize("datacontenttype", ["text/plain\nx-injected: 1", "text/pl\u00e4in"])
async def test_an_answer_whose_datacontenttype_no_content_type_can_hold_is_rejected(
    bus: MemoryTransport, datacontenttype: str
) -> None:
    """An event in a structured answer carrying a ``datacontenttype`` no HTTP Content-Type can hold
    went onto the bus as the ambassador's output, where every binary-mode subscription it reached
    had to dead-letter it. It is refused where it enters, as its other attributes are."""
    event = {"specversion": "1.0", "id": "r-1", "source": "/node", "type": "test.push.noted",
             "datacontenttype": datacontenttype, "data": "noted"}
    hook = Scripted((200, {"content-type": "application/cloudevents+json"}, orjson.dumps(event)))
    await watch(bus, "observer", ["test.push.noted"])
    async with hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1")
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert letter.record["reason"] == "rejected"
    assert "datacontenttype" in letter.record["last_error"]["message"]
    assert "cannot be an HTTP Content-Type" in letter.record["last_error"]["message"]
    assert await watched(bus, "observer", ["test.push.noted"]) == []


async def test_an_answer_whose_charset_is_no_text_encoding_is_rejected_not_pushed_again(bus: MemoryTransport) -> None:
    """``charset=base64`` (or ``rot13``, ``zlib``...) names a Python codec that is no text encoding:
    ``codecs.lookup`` finds it, ``bytes.decode`` raises LookupError. Reading the answer raised it
    past the runner's checks: an internal error, so the event was pushed again at every retry and
    dead-lettered ``internal_error``. It is an invalid CloudEvent in the answer, rejected at once."""
    headers = {"ce-specversion": "1.0", "ce-id": "r-1", "ce-source": "/node", "ce-type": "test.push.noted",
               "content-type": "text/plain; charset=base64"}
    hook = Scripted((200, headers, b"aGk="))
    async with hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 1
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["attempts"]) == ("rejected", 1)
    assert "unknown charset 'base64'" in letter.record["last_error"]["message"]


async def test_an_event_already_in_the_inbox_is_not_posted_again(bus: MemoryTransport) -> None:
    """A redelivered id (same event published twice) is acked from the inbox without a second POST."""
    hook = Scripted(204)
    async with hook.running() as url, pushing(bus, subscription(url)) as ambassador:
        await publish(bus, "e-1")
        await settled(bus)
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 1
    assert ambassador.stats().duplicates == 1


async def test_a_copy_failed_while_another_ambassador_delivered_it_forgets_its_failure_history(
    bus: MemoryTransport,
) -> None:
    """Two copies of one event (published twice) pushed by two ambassadors of the group: the first
    answered 503 after the second had been delivered and marked, so its failure history was
    recorded after the mark that forgets it. Its retry, acked as a duplicate, left that history
    for good (a later copy of the id, once the inbox expired its mark, started from that stale
    first failure). The retry of a copy is marked again, which forgets it, as the worker does."""
    store = MemoryStore()
    posts = 0

    async def hook(request: Request) -> Response:
        nonlocal posts
        posts += 1
        if posts == 1:  # the first copy's answer comes after the other copy was delivered
            while not await store.seen(GROUP, ["e-1"]):  # noqa: ASYNC110 - the other ambassador's mark
                await asyncio.sleep(0.005)
            return Response(status_code=503)
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serve(app) as base:
        sub = subscription(base + "/hook", handshake=False, timeout=60.0)
        async with pushing(bus, sub, store=store, concurrency=1), pushing(bus, sub, store=store, concurrency=1):
            await publish(bus, "e-1")
            await until(lambda: posts == 1)
            await publish(bus, "e-1")  # a second copy, taken by the other ambassador (the first is busy)
            await settled(bus)
    assert posts == 2
    later = (ErrorInfo("E", "later"), 99.0)
    assert await store.record_failure(GROUP, "e-1", *later) == later  # no stale first failure


async def test_an_inbox_down_before_the_post_puts_the_event_off_without_spending_its_retries(
    bus: MemoryTransport,
) -> None:
    """The inbox cannot say whether the event was pushed, for six seconds: it is put off once a
    second, no request made. Not an attempt: the receiver's 500 afterwards is retried as the
    policy says (three attempts), where an attempt per second of the outage dead-lettered it."""
    down = 6

    class Down(MemoryStore):
        async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
            nonlocal down
            if down:
                down -= 1
                raise StoreError("inbox unreachable")
            return await super().seen(group, event_ids)

    hook = Scripted(500, 204)
    async with hook.running() as url, pushing(bus, subscription(url), store=Down()) as ambassador:
        await publish(bus, "e-1")
        await settled(bus)
    assert down == 0 and hook.posts == 2
    assert await bus.dead_letters() == []
    assert ambassador.stats().delivered == 1


@pytest.mark.timeout(60)  # a ceiling for a stuck test, not a speed assertion
async def test_an_inbox_that_cannot_record_a_push_is_retried_after_backoffs_in_virtual_time(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    """The POST succeeded; marking it in the inbox fails 8 times. The backoffs (0.05 s doubling
    up to 5 s: 11.35 s, more than settled()'s real timeout) pass on the virtual clock, and the
    event is acked once, posted once."""
    failures = 8

    class Down(MemoryStore):
        async def mark(self, group: str, event_ids: Collection[str]) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise StoreError("inbox unavailable")
            await super().mark(group, event_ids)

    hook = Scripted(204)
    async with hook.running() as url, pushing(bus, subscription(url), store=Down()) as ambassador:
        start = clock.monotonic()
        await publish(bus, "e-1")
        await settled(bus)
        elapsed = clock.monotonic() - start
    assert failures == 0 and hook.posts == 1
    assert ambassador.stats().delivered == 1
    assert elapsed == pytest.approx(sum(min(0.05 * 2**n, 5.0) for n in range(8)))


async def test_stop_releases_a_push_still_in_flight(bus: MemoryTransport) -> None:
    """On stop, a push that outlives the drain timeout is given back to the group, not lost."""
    from prometheus_client import CollectorRegistry

    from choreograph.telemetry import Telemetry

    registry = CollectorRegistry()
    hook = Scripted(HANG)
    async with hook.running() as url:
        ambassador = PushAmbassador([subscription(url)], bus, origin=ORIGIN, drain_timeout=0.05,
                                    telemetry=Telemetry(traces=False, registry=registry))
        async with ambassador:
            await publish(bus, "e-1")
            await until(lambda: hook.posts == 1)
            assert registry.get_sample_value("choreograph_pushes_in_flight", {"subscription": GROUP}) == 1
        assert ambassador.stats().released == 1
    labels = {"subscription": GROUP, "event_type": Assigned.event_type(), "outcome": "released"}
    assert registry.get_sample_value("choreograph_push_deliveries_total", labels) == 1
    assert registry.get_sample_value("choreograph_pushes_in_flight", {"subscription": GROUP}) == 0
    sub = await bus.subscribe(GROUP, [Assigned.event_type()])
    [again] = await sub.fetch(1, timeout=0)
    assert again.message.id == "e-1"
    await sub.close()


async def test_the_leases_of_pushes_a_drain_waits_for_are_still_extended(
    clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() cancelled the touch loop before draining: a push still waiting for its answer (a
    ``drain_timeout`` of ``inf``, a slow receiver) outlived its lease, and another ambassador of
    the group pushed the event again meanwhile. Its lease is extended until it has settled."""
    from choreograph.transports.memory import MemoryDelivery

    touches = 0
    touch = MemoryDelivery.touch

    async def counted(self: MemoryDelivery) -> None:
        nonlocal touches
        touches += 1
        await touch(self)

    monkeypatch.setattr(MemoryDelivery, "touch", counted)
    bus = MemoryTransport("memory://?lease=0.3", clock=clock)  # touched every 0.1 s (real time)
    hook = Scripted(HANG, 204)
    async with hook.running() as url:
        ambassador = PushAmbassador([subscription(url, timeout=60.0)], bus, origin=ORIGIN, drain_timeout=math.inf)
        await ambassador.start()
        await publish(bus, "e-1")
        await until(lambda: hook.posts == 1)
        stopping = asyncio.create_task(ambassador.stop())
        await until(lambda: ambassador.runners[0].stopping)
        before = touches
        await until(lambda: touches >= before + 3)  # the drain has gone on touching it
        assert not stopping.done()
        hook.release.set()
        await stopping
    assert ambassador.stats().delivered == 1
    assert bus.pending()[0] == 0


async def test_a_push_answered_before_the_drain_runs_out_is_settled_not_released_to_be_pushed_again(
    bus: MemoryTransport,
) -> None:
    """The drain ran out while a push answered 204 was still being settled (its inbox mark slow):
    the task was cancelled with the outcome known, and the event released to the group, so the
    next ambassador pushed it again although the receiver had it. An outcome already known is
    settled (within a bounded grace) rather than thrown away; nothing is pushed twice."""

    class SlowMark(MemoryStore):
        async def mark(self, group: str, ids: list[str]) -> None:
            await asyncio.sleep(0.3)  # real time: past the drain timeout below
            await super().mark(group, ids)

    store = SlowMark()
    hook = Scripted(204)
    async with hook.running() as url:
        ambassador = PushAmbassador([subscription(url)], bus, origin=ORIGIN, drain_timeout=0.05, store=store)
        async with ambassador:
            await publish(bus, "e-1")
            await until(lambda: hook.posts == 1)
        stats = ambassador.stats()
        assert (stats.delivered, stats.released) == (1, 0)
        async with pushing(bus, subscription(url), store=store):
            await settled(bus)
    assert hook.posts == 1
    assert bus.pending()[0] == 0


async def test_a_push_answered_during_the_drain_is_settled_through_a_store_blip_not_pushed_again(
    bus: MemoryTransport,
) -> None:
    """A push answered 204 while the ambassador stopped, whose inbox mark failed once (a store
    or broker blip): its settlement gave up at that first failure ("its lease will redeliver
    it"), and the next ambassador pushed the event again. It is tried again within the grace
    the worker's settle task has."""

    class Blip(MemoryStore):
        failed = False

        async def mark(self, group: str, ids: list[str]) -> None:
            if not self.failed:
                self.failed = True
                raise StoreError("the inbox is restarting")
            await super().mark(group, ids)

    store = Blip()
    hook = Scripted(HANG, 204)
    async with hook.running() as url:
        ambassador = PushAmbassador([subscription(url, timeout=60.0)], bus, origin=ORIGIN, store=store)
        await ambassador.start()
        await publish(bus, "e-1")
        await until(lambda: hook.posts == 1)
        stopping = asyncio.create_task(ambassador.stop())
        await until(lambda: ambassador.runners[0].stopping)
        hook.release.set()
        await stopping
        assert store.failed
        assert ambassador.stats().delivered == 1
    assert await store.seen(GROUP, ["e-1"]) == {"e-1"}
    sub = await bus.subscribe(GROUP, [Assigned.event_type()])
    assert bus.pending() == (0, None)  # acked, not left in flight until its lease runs out
    await sub.close()
    assert hook.posts == 1


async def test_a_start_that_fails_stops_the_subscriptions_it_had_started(bus: MemoryTransport) -> None:
    """The second subscription could not subscribe (a broker refusing it): ``start()`` raised, but
    the first one's fetch loop ran on unowned, pushing its group's events from an ambassador
    that had failed to start and that nothing would stop (``async with`` does not call
    ``__aexit__`` when ``__aenter__`` raises). Those started are stopped, then the error raised."""

    class Refusing(MemoryTransport):
        async def subscribe(self, group: str, types: list[str]) -> Any:
            if group == "second":
                raise StoreError("the broker refuses group 'second'")
            return await super().subscribe(group, types)

    refusing = Refusing(clock=bus.clock)
    hook = Scripted(204)
    async with hook.running() as url:
        ambassador = PushAmbassador([subscription(url), PushSubscription("second", ["test.other"], url)], refusing,
                                    origin=ORIGIN)
        with pytest.raises(StoreError, match="refuses group 'second'"):
            async with ambassador:
                pass
        await Publisher(refusing).publish(Assigned(delivery_id="d-1"), ids=["e-1"])
        await asyncio.sleep(0.5)  # real time: a fetch loop left running would have pushed it by now
        assert hook.posts == 0
        assert ambassador.client.is_closed
        assert all(task.done() for runner in ambassador.runners for task in runner.tasks)


async def test_requests_in_flight_are_bounded_by_concurrency(bus: MemoryTransport) -> None:
    """With concurrency=2, a receiver holding every request never sees more than two at once."""
    gate = asyncio.Event()
    in_flight = peak = posts = 0

    async def hold(request: Request) -> Response:
        nonlocal in_flight, peak, posts
        posts += 1
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1
        return Response(status_code=204)

    app = Starlette(routes=[Route("/", hold, methods=["POST"])])
    async with serve(app) as base, pushing(bus, subscription(base + "/", handshake=False), concurrency=2):
        try:
            await publish(bus, *(f"e-{i}" for i in range(5)))
            await until(lambda: posts >= 2)
            await asyncio.sleep(0.2)  # room for a third request, were the bound broken
            assert (posts, peak) == (2, 2)
        finally:
            gate.set()
        await settled(bus)
    assert (posts, peak) == (5, 2)


async def test_a_malformed_envelope_on_the_bus_is_dead_lettered_without_a_post(bus: MemoryTransport) -> None:
    """Bytes that are not a CloudEvent are dead-lettered as malformed; nothing is sent, no failure event."""
    hook = Scripted(204)
    await watch(bus, "observer", [FAILED])
    async with hook.running() as url, pushing(bus, subscription(url)):
        await bus.publish([Message("bad-1", Assigned.event_type(), b"{not json")])
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["envelope"]) == ("malformed", "{not json")
    assert hook.posts == 0
    assert await watched(bus, "observer", [FAILED]) == []


async def test_an_internal_error_before_the_post_is_retried_then_dead_lettered_not_looped(
    bus: MemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message that trips a bug below the push (here: decoding raises RuntimeError) counts attempts
    under the subscription's policy and ends as a dead letter internal_error; nothing is posted."""
    import choreograph._push_runner as runner

    trip_decode(monkeypatch, runner)
    hook = Scripted(204)
    async with hook.running() as url, pushing(bus, subscription(url)):
        await bus.publish([Message("trip-1", Assigned.event_type(), b'{"trip": true}')])
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert (letter.record["reason"], letter.record["attempts"]) == ("internal_error", 3)
    assert letter.record["last_error"]["type"] == "RuntimeError"
    assert hook.posts == 0


@pytest.mark.parametrize(
    ("datacontenttype", "data", "problem"),
    [
        ("text/plain; charset=é", "hi", "cannot be an HTTP Content-Type"),
        ("text/plain\r\nx-injected: 1", "hi", "cannot be an HTTP Content-Type"),
        ("text/plain; charset=no-such-charset", "hi", "unknown charset 'no-such-charset'"),
        ("text/plain; charset=ascii", "café", "not encodable in ascii"),
        ("text/plain; charset=undefined", "hi", "not encodable in undefined"),  # a UnicodeError, its base class
        # JSON data goes as UTF-8 bytes: under this header a receiver read "cafÃ©" (or refuses it)
        ("application/json; charset=latin-1", "café", "charset 'latin-1': JSON is UTF-8"),
    ],
    ids=["non-ascii", "newline", "unknown-charset", "unencodable", "undefined-codec", "json-not-utf8"],
)
async def test_an_event_binary_mode_cannot_carry_is_dead_lettered_at_once_naming_it(
    bus: MemoryTransport, datacontenttype: str, data: str, problem: str
) -> None:
    """An outside producer's ``datacontenttype`` beyond printable ASCII (or holding a line break)
    went raw into the Content-Type header, which httpx refuses to send; one whose charset is
    unknown, or cannot encode the data, raised encoding the body. Each failed as an internal error
    on every attempt and was retried by the policy before it was dead-lettered ``internal_error``,
    its cause hidden. Nothing can fix it by waiting: it is dead-lettered ``rejected`` at once,
    naming the attribute, with no request made; a structured-mode subscriber still gets it. JSON
    data under a charset other than UTF-8 was sent as UTF-8 bytes under it (a receiver read
    ``"cafÃ©"``, or refused it): rejected alike."""
    hook = Scripted(204)
    await watch(bus, "observer", [FAILED])
    body = orjson.dumps({"specversion": "1.0", "id": "ct-1", "source": "/outside", "type": Assigned.event_type(),
                         "datacontenttype": datacontenttype, "data": data})
    async with hook.running() as url, pushing(bus, subscription(url)) as ambassador:
        await bus.publish([Message("ct-1", Assigned.event_type(), body)])
        await settled(bus)
    assert hook.posts == 0
    [letter] = await bus.dead_letters(GROUP)
    record = letter.record
    assert (record["reason"], record["attempts"], record["status"]) == ("rejected", 1, None)
    assert record["last_error"]["type"] == "MalformedEnvelope"
    assert record["last_error"]["message"].startswith("datacontenttype: ")
    assert problem in record["last_error"]["message"]
    assert ambassador.stats().retried == 0
    [failed] = await watched(bus, "observer", [FAILED])
    assert failed.causationid == "ct-1"
    hook = Scripted(204)
    async with hook.running() as url, pushing(bus, subscription(url, mode="structured")) as ambassador:
        await bus.publish([Message("ct-2", Assigned.event_type(), body.replace(b'"ct-1"', b'"ct-2"'))])
        await settled(bus)
    assert hook.posts == 1
    assert decode_envelope(hook.requests[0].body).datacontenttype == datacontenttype
    assert ambassador.stats().delivered == 1


# -- the handshake --------------------------------------------------------------------------


async def test_the_handshake_is_asked_once_before_the_first_delivery(bus: MemoryTransport) -> None:
    """One OPTIONS with our origin precedes the POSTs to a URL, however many events follow."""
    hook = Scripted(204)
    async with hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1", "e-2", "e-3")
        await settled(bus)
    [options] = hook.options
    assert options.headers["webhook-request-origin"] == ORIGIN
    assert hook.posts == 3


async def test_the_handshake_carries_the_subscriptions_headers(bus: MemoryTransport) -> None:
    """A receiver that checks its Authorization on every request (OPTIONS included, as the webhook
    spec allows) answered the handshake 401: it carried only our origin, not the subscription's
    headers, and every event was dead-lettered ``rejected`` although the POST would have passed."""
    options: list[dict[str, str]] = []
    posts = 0

    async def guarded(request: Request) -> Response:
        nonlocal posts
        if request.headers.get("authorization") != "Bearer s3cret":
            return Response(status_code=401)
        if request.method == "OPTIONS":
            options.append(dict(request.headers))
            return Response(status_code=200, headers={"WebHook-Allowed-Origin": ORIGIN})
        posts += 1
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", guarded, methods=["POST", "OPTIONS"])])
    async with serve(app) as base, pushing(bus, subscription(base + "/hook", headers={"Authorization": "Bearer s3cret"})):
        await publish(bus, "e-1", "e-2")
        await settled(bus)
    assert await bus.dead_letters(GROUP) == []
    assert posts == 2
    [asked] = options
    assert asked["webhook-request-origin"] == ORIGIN
    assert asked["user-agent"].startswith("choreograph-push/")


async def test_a_handshake_that_never_answers_costs_the_deliveries_waiting_for_it_one_timeout(
    bus: MemoryTransport,
) -> None:
    """The deliveries waiting for a handshake queued on a lock, and each asked again in turn when
    the one before it timed out: with a receiver that never answered the OPTIONS, the n-th
    delivery waited n timeouts and the receiver got n handshakes. They share the one in flight."""
    answer = asyncio.Event()
    options = posts = 0

    async def hook(request: Request) -> Response:
        nonlocal options, posts
        if request.method == "OPTIONS":
            options += 1
            await answer.wait()
            return Response(status_code=200, headers={"WebHook-Allowed-Origin": ORIGIN})
        posts += 1
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST", "OPTIONS"])])
    try:
        async with serve(app) as base, pushing(bus, subscription(base + "/hook", timeout=0.3)) as ambassador:
            await publish(bus, "e-1", "e-2", "e-3", "e-4")
            await until(lambda: ambassador.stats().retried == 4)
            assert (options, posts) == (1, 0)
            answer.set()
            await settled(bus)
            assert ambassador.stats().delivered == 4
    finally:
        answer.set()
    assert (options, posts) == (2, 4)


async def test_stop_ends_a_handshake_its_released_deliveries_waited_for(bus: MemoryTransport) -> None:
    """The handshake in flight is shared (shielded from a delivery's cancellation): once the drain
    has released the deliveries, stop() ends it, rather than leave it running past the
    ambassador, its client closed under it."""
    answer = asyncio.Event()

    async def hook(request: Request) -> Response:
        await answer.wait()
        return Response(status_code=200, headers={"WebHook-Allowed-Origin": "*"})

    app = Starlette(routes=[Route("/hook", hook, methods=["POST", "OPTIONS"])])
    async with serve(app) as base:
        try:
            ambassador = PushAmbassador([subscription(base + "/hook", timeout=60.0)], bus, origin=ORIGIN,
                                        drain_timeout=0.05)
            async with ambassador:
                await publish(bus, "e-1")
                await until(lambda: ambassador.handshakes.asked == 1)
                [asking] = ambassador.handshakes._asking.values()
            assert asking.done()
            assert ambassador.stats().released == 1
        finally:
            answer.set()


async def test_a_grant_is_kept_per_url_and_headers() -> None:
    """Two subscriptions to one URL with different credentials each ask for their own grant."""
    from choreograph._push_http import Handshakes

    asked: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("authorization"))
        return httpx.Response(200, headers={"WebHook-Allowed-Origin": "*"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        handshakes = Handshakes(client, ORIGIN, VirtualClock())
        for token in ("a", "b", "a", "b"):
            await handshakes.ensure("http://receiver.example/hook", 5.0, {"Authorization": token})
        await handshakes.ensure("http://receiver.example/hook", 5.0, {"authorization": "a"})
    assert asked == ["a", "b"]


@pytest.mark.parametrize("allowed", [None, "someone-else.example"], ids=["no-handshake-support", "other-origin"])
async def test_a_receiver_that_does_not_grant_the_handshake_gets_no_delivery(
    bus: MemoryTransport, allowed: str | None
) -> None:
    """Without WebHook-Allowed-Origin for us, nothing is POSTed: the event is dead-lettered, replayable."""
    hook = Scripted(204, allowed=allowed)
    async with hook.running() as url, pushing(bus, subscription(url)):
        await publish(bus, "e-1")
        await settled(bus)
    assert hook.posts == 0
    [letter] = await bus.dead_letters(GROUP)
    assert letter.record["reason"] == "rejected"
    assert letter.record["last_error"]["type"] == "HandshakeRefused"
    assert "refused delivery" in letter.record["last_error"]["message"]


@pytest.mark.parametrize("allowed", ["*", ORIGIN, "someone-else.example"], ids=["any", "ours", "other"])
async def test_a_handshake_answered_503_is_retried_even_with_an_allowed_origin(clock: VirtualClock, allowed: str) -> None:
    """A 5xx is the receiver failing, not refusing: a WebHook-Allowed-Origin on it (a proxy's, a
    middleware's) does not make it a permanent refusal (dead-lettered), and it grants nothing."""
    from choreograph._push_http import HandshakeFailed, Handshakes

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"WebHook-Allowed-Origin": allowed, "Retry-After": "5"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        handshakes = Handshakes(client, ORIGIN, clock)
        with pytest.raises(HandshakeFailed) as caught:
            await handshakes.ensure("http://receiver.example/hook", 5.0)
    assert (caught.value.status, caught.value.after) == (503, 5.0)
    assert handshakes.granted == {}


@pytest.mark.parametrize("status", [405, 501])
async def test_a_receiver_without_options_refuses_the_handshake_and_says_how_to_skip_it(
    clock: VirtualClock, status: int
) -> None:
    """405 and 501 (Python's http.server answers OPTIONS 501) mean the receiver does not implement
    the handshake: a refusal (dead-lettered at once), not a failure retried to max_attempts, and
    the message names the ways to skip it."""
    from choreograph._push_http import HandshakeRefused, Handshakes

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(HandshakeRefused) as caught:
            await Handshakes(client, ORIGIN, clock).ensure("http://receiver.example/hook", 5.0)
    message = str(caught.value)
    assert f"answered {status} without a WebHook-Allowed-Origin header" in message
    assert "--no-handshake" in message and "handshake = false" in message


@pytest.mark.parametrize("origin", ["bus.example.com ", "b\u00fcs.example.com", "bus\nexample"])
async def test_an_origin_no_handshake_can_send_is_a_configuration_error(bus: MemoryTransport, origin: str) -> None:
    """The origin goes into every handshake's ``WebHook-Request-Origin``: one with whitespace at an
    end (h11 refuses it) or beyond ASCII (httpx does) failed each handshake, every event retried
    to its dead letter. It is refused where the ambassador is made, unless nothing handshakes."""
    with pytest.raises(ConfigurationError, match=r"push ambassador: origin .*: the value must"):
        PushAmbassador([subscription("http://127.0.0.1:9/hook")], bus, origin=origin)
    await PushAmbassador([subscription("http://127.0.0.1:9/hook", handshake=False)], bus, origin=origin).client.aclose()


async def test_handshake_false_posts_without_asking(bus: MemoryTransport) -> None:
    """A subscription with handshake=False skips OPTIONS (for receivers that do not implement it)."""
    hook = Scripted(204, allowed=None)
    async with hook.running() as url, pushing(bus, subscription(url, handshake=False)):
        await publish(bus, "e-1")
        await settled(bus)
    assert (len(hook.options), hook.posts) == (0, 1)


# -- the Python receiver helper ---------------------------------------------------------------


async def test_a_python_subscriber_in_ten_lines(bus: MemoryTransport) -> None:
    """receiver() + the ambassador: typed input, verified signature, typed output published on the bus."""

    async def schedule(assigned: Assigned) -> Scheduled:
        return Scheduled(delivery_id=assigned.delivery_id, slot=7)

    app = receiver(schedule, event=Assigned, secret=SECRET)

    await watch(bus, "observer", [Scheduled.event_type()])
    async with serve(app) as base, pushing(bus, subscription(base + "/", emits=[Scheduled.event_type()])):
        await publish(bus, "e-1")
        await settled(bus)
    [output] = await watched(bus, "observer", [Scheduled.event_type()])
    assert Scheduled.model_validate(output.data) == Scheduled(delivery_id="d-e-1", slot=7)
    assert output.causationid == "e-1"


async def test_an_event_id_beyond_ascii_is_pushed_signed_its_webhook_id_percent_encoded(bus: MemoryTransport) -> None:
    """An id of an outside producer's (``commande-é``) went raw into ``webhook-id``, a header value
    httpx refuses to send (UnicodeEncodeError): the push failed as an internal error on every
    attempt. The header carries it percent-encoded as UTF-8, and signed as sent, so it verifies."""
    received: list[Envelope] = []

    async def handle(envelope: Envelope) -> None:
        received.append(envelope)

    sent = signature_headers(SECRET, "commande-é", b"{}", timestamp=1)
    assert sent["webhook-id"] == "commande-%C3%A9"
    verify(sent, b"{}", SECRET, now=1)
    async with serve(receiver(handle, secret=SECRET)) as base, pushing(bus, subscription(base + "/")):
        await publish(bus, "commande-é")
        await settled(bus)
    assert [envelope.id for envelope in received] == ["commande-é"]
    assert await bus.dead_letters(GROUP) == []


async def test_an_event_id_with_a_space_at_either_end_is_pushed_signed(bus: MemoryTransport) -> None:
    """An outside producer's id ``" e-1 "`` went into ``webhook-id`` as it is: h11 refuses a header
    value with whitespace at either end (and a server would strip it, so the signature could not
    verify), so every attempt failed as a connection error until max_attempts. Those spaces are
    percent-encoded as the other characters a header cannot carry as they are; the id verifies."""
    received: list[Envelope] = []

    async def handle(envelope: Envelope) -> None:
        received.append(envelope)

    sent = signature_headers(SECRET, " e 1 ", b"{}", timestamp=1)
    assert sent["webhook-id"] == "%20e 1%20"
    verify(sent, b"{}", SECRET, now=1)
    async with serve(receiver(handle, secret=SECRET)) as base, pushing(bus, subscription(base + "/")):
        await publish(bus, " e 1 ")
        await settled(bus)
    assert [envelope.id for envelope in received] == [" e 1 "]
    assert await bus.dead_letters(GROUP) == []


async def test_a_trace_context_beyond_ascii_is_pushed_without_the_w3c_headers(bus: MemoryTransport) -> None:
    """An outside producer's ``traceparent`` holding a non-ASCII character went raw into the W3C
    ``traceparent`` header, which httpx refuses to send: every push of it failed as an internal
    error. It is no W3C trace context: left out of those headers, the event is delivered (binary
    mode still carries it in ``ce-traceparent``, percent-encoded)."""
    received: list[Envelope] = []

    async def handle(envelope: Envelope) -> None:
        received.append(envelope)

    body = orjson.dumps({"specversion": "1.0", "id": "t-1", "source": "/outside", "type": Assigned.event_type(),
                         "traceparent": "00-é", "tracestate": "k=v", "data": {"delivery_id": "d-1"}})
    for mode in ("binary", "structured"):
        async with serve(receiver(handle)) as base, pushing(bus, subscription(base + "/", secret=None, mode=mode)):
            await bus.publish([Message(f"t-{mode}", Assigned.event_type(), body.replace(b'"t-1"', f'"t-{mode}"'.encode()))])
            await settled(bus)
    assert [(e.id, e.traceparent) for e in received] == [("t-binary", "00-é"), ("t-structured", "00-é")]
    assert await bus.dead_letters(GROUP) == []


async def test_a_trace_context_that_is_not_w3c_s_is_pushed_without_the_w3c_headers(bus: MemoryTransport) -> None:
    """An outside producer's oversized ``traceparent`` (or a malformed one) went as it was into
    the W3C header: a receiver behind a header limit (nginx answers 400 for a header over 8 KiB)
    turned a structured-mode push away and it was dead-lettered, for a header no receiver reads
    (W3C: over 512 characters, or malformed, is no trace context). Only a valid traceparent, with
    a tracestate of at most 512 characters, goes into the W3C headers; the event carries them as
    they are."""
    sent: dict[str, tuple[str | None, str | None]] = {}

    async def limited(scope: Any, receive: Any, send: Any) -> None:  # a server with nginx's 8 KiB header limit
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        if scope["method"] == "OPTIONS":  # the handshake
            await send({"type": "http.response.start", "status": 200, "headers": [(b"webhook-allowed-origin", b"*")]})
            await send({"type": "http.response.body", "body": b""})
            return
        sent[orjson.loads(body)["id"]] = (headers.get("traceparent"), headers.get("tracestate"))
        status = 400 if any(len(value) > 8192 for value in headers.values()) else 204
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    cases = {
        "oversized": (valid + "-" + "a" * 9000, "k=v"),
        "malformed": ("00-t-p-01", "k=v"),
        "zero-trace-id": ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", "k=v"),
        "long-tracestate": (valid, "k=" + "v" * 600),
        "valid": (valid, "k=v"),
    }
    async with serve(limited) as base, pushing(bus, subscription(base + "/", secret=None, mode="structured")):
        for event_id, (traceparent, tracestate) in cases.items():
            body = orjson.dumps({"specversion": "1.0", "id": event_id, "source": "/outside",
                                 "type": Assigned.event_type(), "traceparent": traceparent,
                                 "tracestate": tracestate, "data": {"delivery_id": "d-1"}})
            await bus.publish([Message(event_id, Assigned.event_type(), body)])
        await settled(bus)
    assert await bus.dead_letters(GROUP) == []
    assert sent == {"oversized": (None, None), "malformed": (None, None), "zero-trace-id": (None, None),
                    "long-tracestate": (valid, None), "valid": (valid, "k=v")}


@pytest.mark.parametrize(("traceparent", "tracestate"), [(" 00-t-p-01", "k=v"), ("00-t-p-01", "k=v ")])
async def test_a_trace_context_with_a_space_at_either_end_is_pushed(
    bus: MemoryTransport, traceparent: str, tracestate: str
) -> None:
    """A ``traceparent`` or ``tracestate`` beginning or ending with a space passed the printable
    ASCII check and went into the W3C header, whose value h11 refuses with whitespace at either
    end: every attempt failed as a connection error until max_attempts. Such a value is left out
    of those headers as one beyond ASCII is; binary mode still carries it, percent-encoded."""
    received: list[Envelope] = []

    async def handle(envelope: Envelope) -> None:
        received.append(envelope)

    body = orjson.dumps({"specversion": "1.0", "id": "t-1", "source": "/outside", "type": Assigned.event_type(),
                         "traceparent": traceparent, "tracestate": tracestate, "data": {"delivery_id": "d-1"}})
    async with serve(receiver(handle)) as base, pushing(bus, subscription(base + "/", secret=None)):
        await bus.publish([Message("t-1", Assigned.event_type(), body)])
        await settled(bus)
    assert [(e.id, e.traceparent, e.tracestate) for e in received] == [("t-1", traceparent, tracestate)]
    assert await bus.dead_letters(GROUP) == []


async def test_the_receiver_refuses_a_forged_signature_with_401() -> None:
    """A request signed with another secret, or not at all, never reaches the handler."""
    calls: list[Envelope] = []

    async def handle(event: Envelope) -> None:
        calls.append(event)

    headers = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "/s", "ce-type": "t",
               "content-type": "application/json"}
    body = b'{"delivery_id": "d-1"}'
    async with serve(receiver(handle, secret=SECRET)) as base, httpx.AsyncClient() as client:
        forged = await client.post(base, content=body, headers={**headers, **signature_headers(generate_secret(), "e-1", body)})
        unsigned = await client.post(base, content=body, headers=headers)
        genuine = await client.post(base, content=body, headers={**headers, **signature_headers(SECRET, "e-1", body)})
    assert (forged.status_code, unsigned.status_code, genuine.status_code) == (401, 401, 204)
    assert "no signature matches" in forged.json()["error"]
    assert len(calls) == 1


async def test_the_receiver_answers_outcomes_with_the_statuses_the_ambassador_understands() -> None:
    """Reject → 422, Retry(after) → 503 + Retry-After, a crash → 500, a bad payload → 422, junk → 400."""

    async def handle(assigned: Assigned) -> None:
        if assigned.delivery_id == "reject":
            raise Reject("no such delivery")
        if assigned.delivery_id == "later":
            raise Retry("busy", after=2.5)
        raise RuntimeError("boom")

    def event(data: Any) -> tuple[dict[str, str], bytes]:
        return ({"ce-specversion": "1.0", "ce-id": "e", "ce-source": "/s", "ce-type": Assigned.event_type(),
                 "content-type": "application/json"}, orjson.dumps(data))

    async with serve(receiver(handle, event=Assigned)) as base, httpx.AsyncClient(base_url=base) as client:
        answers = {
            name: await client.post("/", headers=headers, content=body)
            for name, (headers, body) in {
                "reject": event({"delivery_id": "reject"}),
                "later": event({"delivery_id": "later"}),
                "crash": event({"delivery_id": "x"}),
                "invalid": event({"delivery_id": 5}),
                "junk": ({"content-type": "text/plain"}, b"hello"),
            }.items()
        }
        handshake = await client.options("/", headers={"WebHook-Request-Origin": ORIGIN})
    statuses = {name: response.status_code for name, response in answers.items()}
    assert statuses == {"reject": 422, "later": 503, "crash": 500, "invalid": 422, "junk": 400}
    assert answers["later"].headers["retry-after"] == "3"
    assert "$.delivery_id" in answers["invalid"].json()["error"]
    assert handshake.headers["webhook-allowed-origin"] == ORIGIN


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("not a secret!", "receiver: secret: webhook secret: expected 'whsec_' followed by base64"),
        ("whsec_", "receiver: secret: webhook secret: the key is empty"),
        ([SECRET, "whsec_%%"], "receiver: secret[1]: webhook secret: expected 'whsec_' followed by base64"),
        ([], "receiver: secret is an empty list"),
    ],
)
def test_a_receiver_secret_no_signature_can_be_checked_with_is_refused_where_it_is_made(
    secret: str | list[str], message: str
) -> None:
    """The key was read only when a delivery was verified: every delivery answered 500, which the
    ambassador retries until it dead-letters the event (an empty list: every delivery 401)."""

    async def handle(envelope: Envelope) -> None: ...

    with pytest.raises(ConfigurationError, match=re.escape(message)):
        receiver(handle, secret=secret)


BINARY = [("ce-specversion", "1.0"), ("ce-id", "e-1"), ("ce-source", "/s"), ("ce-type", Assigned.event_type()),
          ("content-type", "application/json")]


async def _receiver_and_read_event(headers: Any, body: bytes) -> tuple[httpx.Response, list[Envelope], Any]:
    """POST ``body`` to ``receiver()`` and to an endpoint of our own calling ``read_event()``:
    the receiver's response, the events its handler got, and what ``read_event()`` returned
    or raised (a MalformedEnvelope or a Problem)."""
    calls: list[Envelope] = []

    async def handle(event: Envelope) -> None:
        calls.append(event)

    read: list[Any] = []

    async def endpoint(request: Request) -> Response:
        try:
            read.append(await read_event(request))
        except (MalformedEnvelope, Problem) as exc:
            read.append(exc)
        return Response(status_code=204)

    own = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
    async with serve(receiver(handle)) as base, serve(own) as own_base, httpx.AsyncClient() as client:
        response = await client.post(base, headers=headers, content=body)
        await client.post(own_base, headers=headers, content=body)
    [outcome] = read
    return response, calls, outcome


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ([*BINARY, ("ce-subject", "drone-1"), ("ce-subject", "drone-2")], b'{"delivery_id": "d-1"}',
         "ce-subject: given more than once"),
        ([*BINARY, ("ce-subject", "caf\u00e9".encode())], b'{"delivery_id": "d-1"}',
         "ce-subject: characters beyond ASCII must be percent-encoded as UTF-8"),
        ([*BINARY, ("ce-subject", "drone%0A1")], b'{"delivery_id": "d-1"}',
         "ce-subject: contains a control character (U+000A at index 5)"),
        ([*BINARY, ("ce-subject", "drone\t1")], b'{"delivery_id": "d-1"}',
         "ce-subject: contains a control character (U+0009 at index 5)"),
        ([*BINARY, ("ce-tenant", "t%C2%85")], b'{"delivery_id": "d-1"}',
         "ce-tenant: contains a control character (U+0085 at index 1)"),
        ([*BINARY, ("ce-subject", "a%EF%BF%BFb")], b'{"delivery_id": "d-1"}',
         "ce-subject: contains a Unicode noncharacter (U+FFFF at index 1)"),
        ([*BINARY, ("ce-subject", '"drone 1')], b'{"delivery_id": "d-1"}',
         "ce-subject: a double-quoted string is not closed"),
        (BINARY, b'{"delivery_id": "d-1", "delivery_id": "d-2"}',
         "data: $.delivery_id: the key is given twice in one object"),
        ([("content-type", "application/cloudevents+json")],
         b'{"specversion": "1.0", "id": "e-1", "id": "e-2", "source": "/s", "type": "test.push.assigned"}',
         "$.id: the key is given twice in one object"),
        ([("content-type", "application/cloudevents+json")],
         b'{"specversion": "1.0", "id": "e-1", "source": "/s", "type": "test.push.assigned", '
         b'"data": {"delivery_id": "d-1", "delivery_id": "d-2"}}',
         "$.data.delivery_id: the key is given twice in one object"),
        ([*[h for h in BINARY if h[0] != "content-type"], ("content-type", "text/plain; charset=base64")], b"aGk=",
         "datacontenttype: unknown charset 'base64'"),  # a codec, no text encoding: was a 500
        ([*[h for h in BINARY if h[0] != "content-type"], ("content-type", "text/plain; charset=undefined")], b"hi",
         "data: body is not valid undefined"),  # a UnicodeError, not UnicodeDecodeError: was a 500
    ],
    ids=["ce-header-twice", "raw-utf8-header", "encoded-control", "raw-tab", "c1-control", "noncharacter", "open-quote",
         "data-key-twice", "attribute-key-twice", "structured-data-key-twice", "codec-no-text-encoding",
         "codec-raising-unicode-error"],
)
async def test_the_receiver_refuses_what_it_would_misread_with_400_naming_it(
    headers: list[tuple[str, str | bytes]], body: bytes, expected: str
) -> None:
    """As the gateway does: a ce- header given twice (one value was kept), raw UTF-8 in one (read as
    Latin-1: "cafÃ©"), a control character in one (raw or percent-encoded: no CloudEvents String
    holds one; the handler got it), a JSON key given twice (one value dropped) are a 400 naming
    the header or key; the handler is not called. read_event() raises MalformedEnvelope for them
    alike."""
    response, calls, error = await _receiver_and_read_event(headers, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(expected), response.json()["error"]
    assert calls == []
    assert isinstance(error, MalformedEnvelope) and str(error).startswith(expected)


@pytest.mark.parametrize("charset", ["latin-1", "utf-16"])
@pytest.mark.parametrize("structured", [False, True], ids=["binary", "structured"])
async def test_the_receiver_refuses_json_in_another_charset_than_utf8_with_415(structured: bool, charset: str) -> None:
    """JSON is UTF-8 (RFC 8259 8.1). A body sent as ``application/json; charset=latin-1`` was read
    as UTF-8: the Latin-1 bytes of ``"Ã©"`` reached the handler as ``"é"``, UTF-16 was a 400 "not
    valid JSON". It is a 415 naming the header and the charset, the handler not called;
    read_event() raises the same Problem."""
    data = '{"delivery_id": "\u00c3\u00a9"}'
    if structured:
        headers = [("content-type", f"application/cloudevents+json; charset={charset}")]
        body = ('{"specversion": "1.0", "id": "e-1", "source": "/s", "type": "test.push.assigned", '
                f'"data": {data}}}').encode(charset)
    else:
        headers = [*[h for h in BINARY if h[0] != "content-type"], ("content-type", f"application/json; charset={charset}")]
        body = data.encode(charset)
    response, calls, error = await _receiver_and_read_event(headers, body)
    expected = f"Content-Type: charset {charset!r}: JSON is UTF-8"
    assert response.status_code == 415, response.text
    assert response.json()["error"].startswith(expected), response.json()["error"]
    assert calls == []
    assert isinstance(error, Problem) and error.status == 415 and error.detail.startswith(expected)


@pytest.mark.parametrize(
    "types", [("text/plain", "application/json"), ("application/json", "text/plain")], ids=["json-last", "json-first"]
)
async def test_the_receiver_refuses_a_content_type_given_twice_with_400_naming_it(types: tuple[str, str]) -> None:
    """A Content-Type given twice was read as the first by the receiver's checks and as the last
    by the decoding: ``text/plain`` then ``application/json`` skipped the duplicate-key check and
    handed the handler JSON with one of two values dropped; the other order handed it the JSON
    body as a string. Which type is meant is undefined: a 400 naming the header, as the gateway
    answers, the handler not called; read_event() raises MalformedEnvelope alike."""
    headers = [*[h for h in BINARY if h[0] != "content-type"], *(("content-type", t) for t in types)]
    body = b'{"delivery_id": "d-1", "delivery_id": "d-2"}'
    response, calls, error = await _receiver_and_read_event(headers, body)
    expected = "Content-Type: given more than once"
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(expected), response.json()["error"]
    assert calls == []
    assert isinstance(error, MalformedEnvelope) and str(error).startswith(expected)


async def test_the_receiver_still_takes_percent_encoded_utf8_and_distinct_keys() -> None:
    """What the binding sends (UTF-8 percent-encoded, each key once) is read as before."""
    calls: list[Envelope] = []

    async def handle(event: Envelope) -> None:
        calls.append(event)

    async with serve(receiver(handle)) as base, httpx.AsyncClient() as client:
        response = await client.post(base, headers=[*BINARY, ("ce-subject", "caf%C3%A9")],
                                     content=b'{"delivery_id": "d-1", "nested": {"delivery_id": "d-2"}}')
    assert response.status_code == 204, response.text
    [event] = calls
    assert (event.subject, event.data) == ("caf\u00e9", {"delivery_id": "d-1", "nested": {"delivery_id": "d-2"}})


async def test_the_receiver_reads_a_double_quoted_ce_header_as_its_content() -> None:
    """The binding (3.1.3.2) has a receiver unescape double-quoted strings, then percent-decode:
    older senders quote a value with spaces rather than percent-encode them. The quotes were
    kept as part of the value."""
    calls: list[Envelope] = []

    async def handle(event: Envelope) -> None:
        calls.append(event)

    async with serve(receiver(handle)) as base, httpx.AsyncClient() as client:
        response = await client.post(base, headers=[*BINARY, ("ce-subject", '"drone \\"7\\" caf%C3%A9"')],
                                     content=b'{"delivery_id": "d-1"}')
    assert response.status_code == 204, response.text
    [event] = calls
    assert event.subject == 'drone "7" caf\u00e9'


class Estimated(Event, type="test.push.estimated"):
    delivery_id: str
    eta: float
    margin: float | None = None


@pytest.mark.parametrize("eta", [float("inf"), float("nan")])
async def test_the_receiver_answers_500_for_an_event_json_cannot_carry_not_200_with_null(eta: float) -> None:
    """A float inf or nan would go back as null, which every consumer of the output refuses:
    a 500 naming the field, as for any other handler bug; a legit None still goes back."""

    async def handle(assigned: Assigned) -> Estimated:
        return Estimated(delivery_id=assigned.delivery_id, eta=eta if assigned.delivery_id == "bad" else 1.5)

    def event(delivery_id: str) -> tuple[dict[str, str], bytes]:
        return ({"ce-specversion": "1.0", "ce-id": delivery_id, "ce-source": "/s", "ce-type": Assigned.event_type(),
                 "content-type": "application/json"}, orjson.dumps({"delivery_id": delivery_id}))

    async with serve(receiver(handle, event=Assigned)) as base, httpx.AsyncClient(base_url=base) as client:
        bad = await client.post("/", headers=event("bad")[0], content=event("bad")[1])
        good = await client.post("/", headers=event("good")[0], content=event("good")[1])
    assert bad.status_code == 500
    assert bad.json()["error"] == (
        f"EmitError: 'test.push.estimated' cannot be published: $.eta: {eta!r} cannot be carried by JSON; "
        "it would be published as null, which consumers refuse"
    )
    assert good.status_code == 200
    assert orjson.loads(good.content) == {"delivery_id": "good", "eta": 1.5, "margin": None}


async def test_the_receiver_answers_500_for_an_inf_in_an_optional_field_not_200_with_null() -> None:
    """``margin: float | None``: the null inf is written as reads back as None, a changed value."""

    async def handle(assigned: Assigned) -> Estimated:
        return Estimated(delivery_id=assigned.delivery_id, eta=1.5, margin=float("-inf"))

    headers = {"ce-specversion": "1.0", "ce-id": "m", "ce-source": "/s", "ce-type": Assigned.event_type(),
               "content-type": "application/json"}
    async with serve(receiver(handle, event=Assigned)) as base, httpx.AsyncClient(base_url=base) as client:
        answer = await client.post("/", headers=headers, content=orjson.dumps({"delivery_id": "m"}))
    assert answer.status_code == 500
    assert answer.json()["error"] == (
        "EmitError: 'test.push.estimated' cannot be published: $.margin: -inf cannot be carried by JSON; "
        "it would be published as null, which consumers read as None"
    )


def test_push_subscription_validates_its_configuration() -> None:
    """Bad URLs, modes, empty types and timeouts are configuration errors naming the subscription."""
    with pytest.raises(ConfigurationError, match="not an http"):
        PushSubscription("g", ["t"], "ftp://x/")
    with pytest.raises(ConfigurationError, match="mode"):
        PushSubscription("g", ["t"], "http://x/", mode="batch")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="types"):
        PushSubscription("g", [], "http://x/")
    with pytest.raises(ConfigurationError, match="timeout"):
        PushSubscription("g", "t", "http://x/", timeout=0)
    assert PushSubscription("g", "t", "http://x/").types == frozenset({"t"})


@pytest.mark.parametrize("cap", [math.nan, math.inf, 15 * 24 * 3600.0, -1.0])
def test_max_retry_after_is_a_cap_a_transport_can_hold(cap: float) -> None:
    """``nan`` passed the ``< 0`` check and capped nothing (``min(after, nan)`` is ``after``), and
    a cap past 14 days let a receiver's ``Retry-After`` ask for a wait ``Retry(after=)`` and
    ``max_interval`` refuse: longer than a transport is known to hold a delayed event."""
    with pytest.raises(ConfigurationError, match=r"max_retry_after must be between 0 and 1209600 seconds"):
        PushSubscription("g", "t", "http://x/", max_retry_after=cap)
    assert PushSubscription("g", "t", "http://x/", max_retry_after=14 * 24 * 3600.0).max_retry_after == 1209600.0


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"Content-Type": "application/json"}, "'Content-Type'"),
        ({"CE-Type": "x"}, "'CE-Type'"),
        ({"Webhook-Signature": "v1,x"}, "'Webhook-Signature'"),
        ({"Content-Length": "10"}, "'Content-Length'"),
        ({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, "'traceparent'"),
        ({"X-Tenant": "a\r\nX-Injected: 1"}, "'X-Tenant'"),
        ({"X Tenant": "a"}, "'X Tenant'"),
        # h11 refuses whitespace at either end of a value (a transient error, every delivery retried
        # until dead-lettered), httpx a character beyond ASCII (an internal error, the same end)
        ({"Authorization": "Bearer t "}, "'Authorization': the value must not begin or end with whitespace"),
        ({"Authorization": " Bearer t"}, "'Authorization': the value must not begin or end with whitespace"),
        ({"X-Tenant": "caf\u00e9"}, "'X-Tenant': the value must be printable ASCII"),
    ],
)
def test_a_header_the_ambassador_sets_itself_or_cannot_send_is_a_configuration_error(
    headers: dict[str, str], named: str
) -> None:
    """Subscription headers were merged case-sensitively into the request: ``Content-Type`` went
    out beside the binding's ``content-type`` (the receiver read the first and dead-lettered a
    structured event as not a CloudEvent), ``Content-Length`` made a request servers refuse, and
    an unsendable value failed every delivery as a transient error, retried until the policy
    gave up. Each is refused where the subscription is made, naming the header."""
    with pytest.raises(ConfigurationError, match=re.escape(named)):
        PushSubscription("g", "t", "http://x/", headers=headers)
    assert PushSubscription("g", "t", "http://x/", headers={"Authorization": "Bearer t"}).headers


# -- the polyglot proof: the Node.js Delivery service of examples/polyglot -----------------------

NODE_SERVICE = Path(__file__).resolve().parent.parent / "examples" / "polyglot" / "delivery_service.mjs"


@contextlib.asynccontextmanager
async def node_service(tmp_path: Path, **env: str) -> AsyncIterator[tuple[str, Path]]:
    """Run the Node.js service on a free port; yields its URL and its JSON store file."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is not installed (the polyglot example needs Node.js >= 20.15)")
        pytest.skip("node is not installed; install Node.js >= 20.15 to run the polyglot example")
    store = tmp_path / "deliveries.json"
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_SERVICE), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PORT": "0", "WEBHOOK_SECRET": SECRET, "STORE_PATH": str(store), **env},
    )
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+/)", first)
    output = [first]

    async def drain() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            output.append(line.decode())

    drainer = asyncio.create_task(drain())
    try:
        assert match, f"the node service did not start: {first!r}"
        yield match.group(1), store
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        await drainer
    assert proc.returncode == 0, "".join(output)


def drone_events() -> Any:
    return pytest.importorskip("examples.drone_delivery.events")


def node_subscription(url: str) -> PushSubscription:
    return PushSubscription("delivery-node", ["drone.drone.assigned"], url, secret=SECRET,
                            emits=["drone.delivery.scheduled"], retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False))


def assigned_event(events: Any, delivery_id: str, drone_id: str = "d05-001") -> Event:
    return events.DroneAssigned(delivery_id=delivery_id, package_id=f"p-{delivery_id}", drone_id=drone_id,
                                pickup="Pier 39", dropoff="Ferry Building")  # type: ignore[no-any-return]


def python_etas(pickup: str, dropoff: str) -> tuple[int, int]:
    """The ETA stand-in of examples/drone_delivery/delivery.py, which the Node service mirrors."""
    to_pickup = 60 + zlib.crc32(pickup.encode()) % 540
    return to_pickup, to_pickup + 60 * (1 + zlib.crc32(f"{pickup}|{dropoff}".encode()) % 20)


async def test_the_node_service_schedules_a_delivery_through_the_ambassador(
    bus: MemoryTransport, tmp_path: Path
) -> None:
    """Node verifies, stores once per delivery id and answers drone.delivery.scheduled, which lands on the bus."""
    events = drone_events()
    await watch(bus, "observer", ["drone.delivery.scheduled"])
    async with node_service(tmp_path) as (url, store), pushing(bus, node_subscription(url)) as ambassador:
        [first] = await Publisher(bus).publish(assigned_event(events, "del-1"), ids=["a-1"])
        await settled(bus)
        # Re-assigned (another event, another drone): the schedule already made is the answer.
        await Publisher(bus).publish(assigned_event(events, "del-1", drone_id="d05-002"), ids=["a-2"])
        await settled(bus)
    outputs = await watched(bus, "observer", ["drone.delivery.scheduled"])
    assert [o.id for o in outputs] == [derive_id("a-1", "delivery-node", "push", 0),
                                       derive_id("a-2", "delivery-node", "push", 0)]
    scheduled = [events.DeliveryScheduled.model_validate(o.data) for o in outputs]  # the Python contract holds
    pickup_eta, dropoff_eta = python_etas("Pier 39", "Ferry Building")
    assert scheduled[0] == scheduled[1] == events.DeliveryScheduled(
        delivery_id="del-1", package_id="p-del-1", drone_id="d05-001", pickup_eta_s=pickup_eta,
        dropoff_eta_s=dropoff_eta)
    assert (outputs[0].source, outputs[0].causationid, outputs[0].correlationid) == (
        "/drone/delivery-node", "a-1", first.correlationid)
    assert list(orjson.loads(store.read_bytes())["deliveries"]) == ["del-1"]
    assert ambassador.stats().delivered == 2


async def test_the_node_service_answering_503_is_retried_after_its_retry_after(
    bus: MemoryTransport, clock: VirtualClock, tmp_path: Path
) -> None:
    """A 503 with Retry-After: 1 from Node delays the retry by exactly 1 s; the second attempt succeeds."""
    events = drone_events()
    async with node_service(tmp_path, FAIL_FIRST="1") as (url, _), pushing(bus, node_subscription(url)) as ambassador:
        await Publisher(bus).publish(assigned_event(events, "del-2"), ids=["a-1"])
        await until(lambda: ambassador.stats().retried == 1 and bus.pending()[0] == 0)
        assert bus.pending()[1] == clock.monotonic() + 1.0
        await settled(bus)
    stats = ambassador.stats()
    assert (stats.delivered, stats.retried, stats.dead_lettered) == (1, 1, 0)


async def test_the_node_service_refuses_what_it_cannot_take(bus: MemoryTransport, tmp_path: Path) -> None:
    """Node answers 401 to a forged signature, 415 to non-JSON, 400 to a non-CloudEvent, 422 to a missing id."""
    body = b'{"package_id": "p-1"}'
    headers = {"ce-specversion": "1.0", "ce-id": "a-9", "ce-source": "/t", "ce-type": "drone.drone.assigned",
               "content-type": "application/json"}
    async with node_service(tmp_path) as (url, _), httpx.AsyncClient() as client:
        forged = await client.post(url, content=body, headers={**headers, **signature_headers(generate_secret(), "a-9", body)})
        text = await client.post(url, content=b"hi", headers={**headers, "content-type": "text/plain",
                                                              **signature_headers(SECRET, "a-9", b"hi")})
        bare = await client.post(url, content=body, headers={"content-type": "application/json",
                                                             **signature_headers(SECRET, "a-9", body)})
        handshake = await client.options(url, headers={"WebHook-Request-Origin": ORIGIN})
        # Through the ambassador, the 422 becomes a dead letter with its status.
        async with pushing(bus, node_subscription(url)):
            await bus.publish([Message("a-9", "drone.drone.assigned", orjson.dumps(
                {"specversion": "1.0", "id": "a-9", "source": "/t", "type": "drone.drone.assigned",
                 "data": {"package_id": "p-1"}}))])
            await settled(bus)
    assert (forged.status_code, text.status_code, bare.status_code) == (401, 415, 400)
    assert handshake.headers["webhook-allowed-origin"] == ORIGIN
    [letter] = await bus.dead_letters("delivery-node")
    assert (letter.record["reason"], letter.record["status"]) == ("rejected", 422)
    assert "delivery_id is missing" in letter.record["last_error"]["message"]


# -- configuration files and the CLI -------------------------------------------------------------

CONFIG_TOML = """
broker = "memory://"
origin = "bus.example"

[[subscriptions]]
group = "delivery-node"
types = ["drone.drone.assigned"]
url = "http://127.0.0.1:8090/"
emits = ["drone.delivery.scheduled"]
secret_env = "TEST_PUSH_SECRET"
max_retry_after = 30

[subscriptions.retry]
max_attempts = 7
base = 0.5

[[subscriptions]]
group = "audit"
types = "shop.order.placed"
url = "https://audit.example/hook"
mode = "structured"
handshake = false
max_attempts = 2
headers = { Authorization = "Bearer t" }
"""

CONFIG_YAML = """
subscriptions:
  - group: delivery-node
    types: [drone.drone.assigned]
    url: http://127.0.0.1:8090/
    secret_env: TEST_PUSH_SECRET
    timeout: 2.5
"""


def test_a_toml_config_lists_several_subscriptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of a TOML file reaches its subscription; secrets come from the environment."""
    monkeypatch.setenv("TEST_PUSH_SECRET", SECRET)
    path = tmp_path / "push.toml"
    path.write_text(CONFIG_TOML)
    config = load_config(path)
    first, second = config.subscriptions
    assert (config.broker, config.origin) == ("memory://", "bus.example")
    assert (first.group, first.types, first.secret, first.emits) == (
        "delivery-node", frozenset({"drone.drone.assigned"}), SECRET, frozenset({"drone.delivery.scheduled"}))
    assert (first.retry.max_attempts, first.retry.base, first.max_retry_after) == (7, 0.5, 30)
    assert (second.mode, second.handshake, second.retry.max_attempts, second.secret) == ("structured", False, 2, None)
    assert second.headers == {"Authorization": "Bearer t"}


def test_a_yaml_config_is_read_the_same_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """YAML files use the same keys."""
    monkeypatch.setenv("TEST_PUSH_SECRET", SECRET)
    path = tmp_path / "push.yaml"
    path.write_text(CONFIG_YAML)
    [sub] = load_config(path).subscriptions
    assert (sub.group, sub.timeout, sub.secret) == ("delivery-node", 2.5, SECRET)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CONFIG_YAML.replace("timeout", "timout"), "subscriptions[0].timout: unknown key"),
        (CONFIG_YAML.replace("    url: http://127.0.0.1:8090/\n", ""), "subscriptions[0].url: required key is missing"),
        (CONFIG_YAML.replace("TEST_PUSH_SECRET", "TEST_PUSH_UNSET"),
         "push.yaml: subscriptions[0].secret_env: environment variable 'TEST_PUSH_UNSET' is not set"),
        (CONFIG_YAML.replace("secret_env: TEST_PUSH_SECRET", 'secret: "${TEST_PUSH_UNSET}"'),  # was "push.yaml.subscriptions"
         "push.yaml: subscriptions[0].secret: environment variable 'TEST_PUSH_UNSET' is not set"),
        (CONFIG_YAML.replace("http://127.0.0.1:8090/", "127.0.0.1:8090"), "is not an http(s) URL"),
        ("subscriptions: []\n", "list at least one subscription"),
        ("subscriptions: 5\n", "subscriptions: expected a list of subscriptions ([[subscriptions]] tables), got 5"),
    ],
    ids=["typo", "missing-url", "unset-secret", "unset-variable", "bad-url", "empty", "not-a-list"],
)
def test_config_errors_name_the_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    """A mistake in the file is a ConfigurationError saying where."""
    monkeypatch.setenv("TEST_PUSH_SECRET", SECRET)
    path = tmp_path / "push.yaml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=re.escape(message)) as info:
        load_config(path)
    assert "push.yaml" in str(info.value)


MINIMAL_TOML = '[[subscriptions]]\ngroup = "g"\ntypes = ["a.b"]\nurl = "http://127.0.0.1:8090/"\n'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('timeout = "ten"', "subscriptions[0].timeout: expected a number of seconds, got 'ten'"),
        ("timeout = true", "subscriptions[0].timeout: expected a number of seconds, got true"),
        ('max_retry_after = "x"', "subscriptions[0].max_retry_after: expected a number of seconds, got 'x'"),
        ('handshake = "no"', "subscriptions[0].handshake: expected true or false, got 'no'"),
        ("headers = { X-Api-Key = 1 }", "subscriptions[0].headers.X-Api-Key: expected a string, got int"),
        ("headers = [1]", "subscriptions[0].headers: expected a table/mapping, got list"),
        ("emits = [1]", "subscriptions[0].emits[0]: expected an event type (a string), got 1"),
        ("types = [1]", "subscriptions[0].types[0]: expected an event type (a string), got 1"),
        ("max_attempts = 2.5", "subscriptions[0].max_attempts: expected a whole number, got 2.5"),
        # the retry table was given to RetryPolicy as it was read: "no" a true jitter, 2.5 attempts,
        # and a quoted number an error naming no key ("'<' not supported between 'str' and 'int'")
        ("group = true", "subscriptions[0].group: expected a group name (a string), got true"),  # was group "True"
        ("group = 42", "subscriptions[0].group: expected a group name (a string), got 42"),
        ('retry = { jitter = "no" }', "subscriptions[0].retry.jitter: expected true or false, got 'no'"),
        ("retry = { max_attempts = 2.5 }", "subscriptions[0].retry.max_attempts: expected a whole number, got 2.5"),
        ('retry = { base = "x" }', "subscriptions[0].retry.base: expected a number of seconds, got 'x'"),
        ('retry = { max_age = "soon" }', "subscriptions[0].retry.max_age: expected a number of seconds, got 'soon'"),
    ],
    ids=["timeout-str", "timeout-bool", "max-retry-after", "handshake-str", "header-int", "headers-list",
         "emits-int", "types-int", "max-attempts-float", "group-bool", "group-int", "retry-jitter-str", "retry-attempts-float", "retry-base-str",
         "retry-max-age-str"],
)
def test_a_subscription_value_of_the_wrong_type_is_refused_naming_its_key(
    tmp_path: Path, line: str, message: str
) -> None:
    """TOML and YAML values are typed: a quoted number, or "no" for a boolean, is a mistake to name,
    not a value to misread ("no" is a true string) or to fail on later, at every push."""
    path = tmp_path / "push.toml"
    key = line.split(" = ")[0]
    kept = [kept for kept in MINIMAL_TOML.splitlines() if not kept.startswith(key + " =")]
    path.write_text("\n".join([*kept, line]) + "\n")
    with pytest.raises(ConfigurationError) as info:
        load_config(path)
    assert str(info.value) == f"push.toml: {message}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('concurrency = "eight"', "concurrency: expected a whole number >= 1 and <= 65535, got 'eight'"),
        ("concurrency = 0", "concurrency: expected a whole number >= 1 and <= 65535, got 0"),
        # more than a fetch can ask for (RabbitMQ's prefetch is 16 bits): every fetch failed, for ever
        ("concurrency = 65536", "concurrency: expected a whole number >= 1 and <= 65535, got 65536"),
        ('drain_timeout = "x"', "drain_timeout: expected a number of seconds, or inf (no limit), got 'x'"),
        ("drain_timeout = nan", "drain_timeout: expected a number of seconds, or inf (no limit), got nan"),
        ("drain_timeout = -1", "drain_timeout: expected a number of seconds, or inf (no limit), got -1"),
        ("broker = 5", "broker: expected a URL (a string), got 5"),
        ("store = 5", "store: expected a URL (a string), got 5"),
        ("origin = 5", "origin: expected a string, got 5"),
    ],
    ids=["concurrency-str", "concurrency-zero", "concurrency-huge", "drain-timeout", "drain-timeout-nan", "drain-timeout-negative",
         "broker", "store", "origin"],
)
def test_a_top_level_value_of_the_wrong_type_is_refused_naming_its_key(tmp_path: Path, line: str, message: str) -> None:
    """The ambassador's own options are checked when the file is read, not when they are first used
    (a traceback at start, or a concurrency of 0 silently read as the default)."""
    path = tmp_path / "push.toml"
    path.write_text(line + "\n" + MINIMAL_TOML)
    with pytest.raises(ConfigurationError) as info:
        load_config(path)
    assert str(info.value) == f"push.toml: {message}"


@pytest.mark.parametrize("value", ["inf", '"inf"'])
def test_a_drain_timeout_of_inf_in_the_config_means_no_limit_as_the_option_does(tmp_path: Path, value: str) -> None:
    path = tmp_path / "push.toml"
    path.write_text(f"drain_timeout = {value}\n" + MINIMAL_TOML)
    assert load_config(path).drain_timeout == float("inf")


def test_a_drain_timeout_of_0_in_the_config_is_no_wait_not_the_default(tmp_path: Path) -> None:
    """``choreograph push`` takes the option, then the file, then 10 s: a 0 in the file read
    as "unset" gave pushes in flight 10 s at stop instead of handing them back at once."""
    from choreograph.cli._push import DEFAULT_DRAIN_TIMEOUT, first_given

    path = tmp_path / "push.toml"
    path.write_text("drain_timeout = 0\n" + MINIMAL_TOML)
    config = load_config(path)
    assert first_given(None, config.drain_timeout, DEFAULT_DRAIN_TIMEOUT) == 0.0
    assert first_given(2.5, config.drain_timeout, DEFAULT_DRAIN_TIMEOUT) == 2.5
    path.write_text(MINIMAL_TOML)
    assert first_given(None, load_config(path).drain_timeout, DEFAULT_DRAIN_TIMEOUT) == 10.0


def test_numbers_and_booleans_may_be_strings_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``${NAME}`` always yields a string, so "2.5", "3" and "false" read as the numbers and booleans they spell."""
    monkeypatch.setenv("TEST_PUSH_TIMEOUT", "2.5")
    path = tmp_path / "push.toml"
    path.write_text('concurrency = "4"\ndrain_timeout = "7"\n' + MINIMAL_TOML + 'timeout = "${TEST_PUSH_TIMEOUT}"\n'
                    'max_attempts = "3"\nhandshake = "false"\nmax_retry_after = "60"\n')
    config = load_config(path)
    [sub] = config.subscriptions
    assert (sub.timeout, sub.retry.max_attempts, sub.handshake, sub.max_retry_after) == (2.5, 3, False, 60.0)
    assert (config.concurrency, config.drain_timeout) == (4, 7.0)


def test_the_retry_table_reads_numbers_and_booleans_from_the_environment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_attempts = "${N}"`` was read, ``retry = { max_attempts = "${N}" }`` refused with
    "'<' not supported between instances of 'str' and 'int'" (naming no key), and a
    ``jitter = "${JITTER}"`` of "false" kept as the string, a true jitter."""
    monkeypatch.setenv("TEST_PUSH_ATTEMPTS", "3")
    path = tmp_path / "push.toml"
    path.write_text(MINIMAL_TOML + 'retry = { max_attempts = "${TEST_PUSH_ATTEMPTS}", base = "0.5", '
                    'max_interval = "10", max_age = "60", jitter = "false" }\n')
    [sub] = load_config(path).subscriptions
    assert sub.retry == RetryPolicy(max_attempts=3, base=0.5, max_interval=10.0, max_age=60.0, jitter=False)


def test_a_config_file_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path) -> None:
    """A file saved in another encoding is a configuration error naming the file, not a traceback."""
    path = tmp_path / "push.toml"
    path.write_bytes(MINIMAL_TOML.replace('"g"', '"gr\xfcn"').encode("latin-1"))
    with pytest.raises(ConfigurationError, match=r"push.toml: cannot read \(not UTF-8"):
        load_config(path)


async def test_the_cli_pushes_from_a_sqlite_bus_until_sigterm(tmp_path: Path) -> None:
    """`choreograph push` delivers a published event, then exits 0 on SIGTERM after draining."""
    bus_url = f"sqlite:///{tmp_path / 'bus.db'}"
    hook = Scripted(204)
    async with hook.running() as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "choreograph", "push", "--broker", bus_url, "--group", GROUP,
            "--type", Assigned.event_type(), "--url", url, "--origin", ORIGIN, "--timeout", "5",
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            env={**os.environ, "CHOREOGRAPH_PUSH_SECRET": SECRET},
        )
        assert proc.stderr is not None
        lines: list[str] = []
        async with asyncio.timeout(30):
            while not any("running on" in line for line in lines):
                line = (await proc.stderr.readline()).decode()
                assert line, "".join(lines)
                lines.append(line)
        async with open_transport(bus_url) as bus:
            await Publisher(bus).publish(Assigned(delivery_id="d-1"), ids=["cli-1"])
        await until(lambda: hook.posts == 1, seconds=30)
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await proc.wait() == 0, rest.decode()
    [request] = hook.requests
    assert request.headers["ce-id"] == "cli-1"
    verify(request.headers, request.body, SECRET)
    assert hook.options[0].headers["webhook-request-origin"] == ORIGIN


async def test_a_second_ctrl_c_releases_the_pushes_a_drain_waits_for(tmp_path: Path) -> None:
    """`choreograph push --drain-timeout inf` with a push that hangs: the first Ctrl-C waits for
    it, a second one (it was ignored, so only SIGKILL stopped the process) releases it to the
    group at once and the process exits 0; the event is there for the next consumer."""
    bus_url = f"sqlite:///{tmp_path / 'bus.db'}"
    hook = Scripted(HANG)
    async with hook.running() as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "choreograph", "push", "--broker", bus_url, "--group", GROUP,
            "--type", Assigned.event_type(), "--url", url, "--origin", ORIGIN, "--timeout", "600",
            "--drain-timeout", "inf", stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            env={**os.environ, "CHOREOGRAPH_PUSH_SECRET": SECRET},
        )
        assert proc.stderr is not None
        lines: list[str] = []

        async def read_until(text: str) -> None:
            async with asyncio.timeout(30):
                while not any(text in line for line in lines):
                    line = (await proc.stderr.readline()).decode()  # type: ignore[union-attr]
                    assert line, "".join(lines)
                    lines.append(line)

        await read_until("running on")
        async with open_transport(bus_url) as bus:
            await Publisher(bus).publish(Assigned(delivery_id="d-1"), ids=["cli-hang"])
        await until(lambda: hook.posts == 1, seconds=30)
        proc.send_signal(signal.SIGINT)
        await read_until("draining pushes in flight")
        proc.send_signal(signal.SIGINT)
        try:
            rest = await asyncio.wait_for(proc.stderr.read(), 20)
            code = await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            # only now: Popen.kill() polls first, reaping an exited child under asyncio's
            # watcher, which then reports 255 ("Unknown child process")
            proc.kill()
            raise
        assert code == 0, "".join(lines) + rest.decode()
    assert "releasing pushes in flight now" in "".join(lines) + rest.decode()
    async with open_transport(bus_url) as bus:
        sub = await bus.subscribe(GROUP, [Assigned.event_type()])
        [again] = await sub.fetch(1, timeout=5)
        assert again.message.id == "cli-hang"
        await sub.close()


def test_config_strings_read_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """${NAME} comes from the environment, ${NAME:-default} falls back; examples/polyglot/push.toml loads."""
    monkeypatch.setenv("DELIVERY_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("DELIVERY_NODE_URL", "http://10.0.0.5:8090/")
    monkeypatch.delenv("PUSH_ORIGIN", raising=False)
    config = load_config(NODE_SERVICE.parent / "push.toml")
    [sub] = config.subscriptions
    assert (sub.url, sub.secret, config.origin) == ("http://10.0.0.5:8090/", SECRET, "choreograph.local")
    assert sub.emits == frozenset({"drone.delivery.scheduled"})
    monkeypatch.delenv("DELIVERY_WEBHOOK_SECRET")
    with pytest.raises(ConfigurationError, match=r"subscriptions\[0\]\.secret: environment variable"):
        load_config(NODE_SERVICE.parent / "push.toml")


# -- metrics -----------------------------------------------------------------------------------


async def test_push_metrics_count_attempts_by_outcome_and_time_the_requests(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    """With telemetry, each attempt's outcome is counted per subscription and event type, each
    request is timed, and nothing stays in flight; the stats say the same."""
    from prometheus_client import CollectorRegistry

    from choreograph.telemetry import Telemetry

    registry = CollectorRegistry()
    telemetry = Telemetry(traces=False, registry=registry)
    hook = Scripted(500, 200, 200)
    async with hook.running() as url, pushing(
        bus, subscription(url, where="id <> 'skip'"), telemetry=telemetry
    ) as ambassador:
        await publish(bus, "e-1", "e-2", "skip")
        await settled(bus)
        await Publisher(bus).publish(Assigned(delivery_id="d-e-1"), ids=["e-1"])  # the same id again
        await settled(bus)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    counted = {"subscription": GROUP, "event_type": Assigned.event_type()}
    assert value("choreograph_push_deliveries_total", **counted, outcome="delivered") == 2
    assert value("choreograph_push_deliveries_total", **counted, outcome="retried") == 1
    assert value("choreograph_push_deliveries_total", **counted, outcome="filtered") == 1
    assert value("choreograph_push_deliveries_total", **counted, outcome="duplicate") == 1
    assert value("choreograph_push_deliveries_total", **counted, outcome="dead_lettered") is None
    assert value("choreograph_push_request_duration_seconds_count", subscription=GROUP) == hook.posts == 3
    assert value("choreograph_pushes_in_flight", subscription=GROUP) == 0
    stats = ambassador.stats()
    assert (stats.delivered, stats.retried, stats.filtered, stats.duplicates) == (2, 1, 1, 1)


async def test_the_ambassadors_outputs_and_failure_events_are_stamped_on_the_virtual_clock(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    """Under a VirtualClock an answer's output and a ``choreograph.failed`` get the clock's time,
    as the dead-letter record's attempt times do (they were stamped with wall time)."""
    hook = Scripted(scheduled_response({"delivery_id": "d-e-1", "slot": 4}), (400, {}, b"no"))
    await watch(bus, "observer", [Scheduled.event_type(), FAILED])
    async with hook.running() as url, pushing(bus, subscription(url, emits=[Scheduled.event_type()])):
        await publish(bus, "e-1")
        await settled(bus)
        await publish(bus, "e-2")
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    output, failed = await watched(bus, "observer", [Scheduled.event_type(), FAILED])
    assert output.time == rfc3339(clock.time())
    assert failed.time == rfc3339(letter.record["last_attempt_at"]) == rfc3339(clock.time())


class _GatedSubscribe(MemoryTransport):
    def __init__(self, clock: Any) -> None:
        super().__init__(clock=clock)
        self.subscribing, self.gate = asyncio.Event(), asyncio.Event()
        self.subscriptions = 0

    async def subscribe(self, group: str, types: list[str]) -> Any:
        self.subscriptions += 1
        self.subscribing.set()
        await self.gate.wait()
        return await super().subscribe(group, types)


async def test_a_stop_while_the_ambassador_subscribes_leaves_nothing_running(bus: MemoryTransport) -> None:
    """stop() while start() was subscribing found the runner with no subscription and no tasks yet,
    closed the client and returned; the start then went on and the runner fetched (and pushed,
    through a closed client) after stop(), with nothing left to stop it. stop() now waits for the
    start, then stops what it started."""
    gated = _GatedSubscribe(bus.clock)
    ambassador = PushAmbassador([subscription("http://127.0.0.1:9/hook")], gated, origin=ORIGIN)
    starting = asyncio.create_task(ambassador.start())
    await gated.subscribing.wait()
    stopping = asyncio.create_task(ambassador.stop())
    await asyncio.sleep(0)  # one turn: stop() runs up to its first suspension, inside the start
    gated.gate.set()
    await starting
    await stopping
    assert ambassador.client.is_closed
    assert all(task.done() for runner in ambassador.runners for task in runner.tasks)


async def test_a_second_stop_returns_once_the_ambassador_has_stopped(bus: MemoryTransport) -> None:
    """Two stop() at once: the second returned at once, while the first still drained the pushes
    in flight and had not closed the client, so its caller went on with an ambassador still
    pushing."""
    gated = _GatedSubscribe(bus.clock)
    gated.gate.set()
    ambassador = PushAmbassador([subscription("http://127.0.0.1:9/hook")], gated, origin=ORIGIN)
    await ambassador.start()
    runner = ambassador.runners[0]
    holding = asyncio.Event()
    held = asyncio.create_task(holding.wait())  # a push in flight: the first stop() drains it
    runner.active[held] = None  # type: ignore[assignment]  # the drain waits on the task alone
    first = asyncio.create_task(ambassador.stop())
    await asyncio.sleep(0)  # one turn: the first stop() is draining
    stopped_when_second_returned: list[bool] = []

    async def stop_again() -> None:
        await ambassador.stop()
        stopped_when_second_returned.append(ambassador.client.is_closed)

    second = asyncio.create_task(stop_again())
    await asyncio.sleep(0)
    holding.set()
    await asyncio.gather(first, second)
    assert stopped_when_second_returned == [True]
