"""Push delivery to HTTP subscribers: signing, the outcome table, Retry-After, the handshake, the
receiver helper, and the Node.js subscriber of examples/polyglot — all over real loopback HTTP.

The bus is the in-memory transport on a virtual clock: HTTP happens in real time, backoffs
and Retry-After waits are fast-forwarded by ``settled()`` and asserted exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

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
from choreograph.errors import ConfigurationError
from choreograph.push import (
    PushAmbassador,
    PushSubscription,
    SignatureError,
    classify,
    decode_http,
    generate_secret,
    receiver,
    retry_after,
    sign,
    signature_headers,
    verify,
)
from choreograph.testing import MemoryTransport, VirtualClock, settled
from tests._push_support import HANG, Scripted, serve

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
    ],
    ids=["altered-body", "other-id", "forged-signature", "unknown-version", "unsigned", "bad-timestamp"],
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


async def test_an_answer_of_an_undeclared_type_is_rejected(bus: MemoryTransport) -> None:
    """A receiver answering with a type its subscription does not emit has the input dead-lettered."""
    hook = Scripted(scheduled_response({"delivery_id": "d-e-1"}))
    async with hook.running() as url, pushing(bus, subscription(url, emits=["test.push.other"])):
        await publish(bus, "e-1")
        await settled(bus)
    [letter] = await bus.dead_letters(GROUP)
    assert letter.record["reason"] == "rejected"
    assert "'test.push.scheduled'" in letter.record["last_error"]["message"]


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


async def test_stop_releases_a_push_still_in_flight(bus: MemoryTransport) -> None:
    """On stop, a push that outlives the drain timeout is given back to the group, not lost."""
    hook = Scripted(HANG)
    async with hook.running() as url:
        ambassador = PushAmbassador([subscription(url)], bus, origin=ORIGIN, drain_timeout=0.05)
        async with ambassador:
            await publish(bus, "e-1")
            await until(lambda: hook.posts == 1)
        assert ambassador.stats().released == 1
    sub = await bus.subscribe(GROUP, [Assigned.event_type()])
    [again] = await sub.fetch(1, timeout=0)
    assert again.message.id == "e-1"
    await sub.close()


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
