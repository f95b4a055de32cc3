"""What an HTTP answer means for a pushed event, and the per-URL handshake cache.

The outcome table (DESIGN.md §5) lives in :func:`classify`:

======================================  ==========================================
2xx                                     done (a CloudEvent in the body is an output)
400, 413, 415, 422                      permanent: dead-letter at once
404, 408, 409, 429, 5xx                 transient: retry by the policy
timeouts, connection errors             transient
any other status (3xx, 401, 403, 410…)  permanent: a redirect or an auth refusal will
                                        not fix itself; the dead letter is replayable
======================================  ==========================================
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import re
from collections.abc import Mapping
from datetime import UTC
from typing import Literal

import httpx

from choreograph._clock import Clock
from choreograph._redact import redact
from choreograph._webhook import ALLOWED_ORIGIN, REQUEST_ORIGIN

Verdict = Literal["done", "permanent", "transient"]

PERMANENT = frozenset({400, 413, 415, 422})
TRANSIENT = frozenset({404, 408, 409, 429})
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")
#: The year of an IMF-fixdate or asctime date (not a part of the time, hh:mm:ss).
_FOUR_DIGIT_YEAR = re.compile(r"(?<![0-9:])[0-9]{4}(?![0-9:])")


def classify(status: int) -> Verdict:
    """The outcome of a delivery answered with ``status``."""
    if 200 <= status < 300:
        return "done"
    if status in TRANSIENT or 500 <= status < 600:
        return "transient"
    return "permanent"


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    ``now`` is wall-clock epoch seconds. Returns ``None`` for an absent or unreadable
    header (the policy's backoff applies then); a date in the past means 0. Seconds are
    ASCII digits (RFC 9110 delay-seconds; a decimal fraction is tolerated): what Python's
    ``float()`` reads besides (``1_0``, ``1e3``, ``+5``, other scripts' digits) is unreadable.
    A four-digit year is the year written: ``0030`` is long past, not 2030.
    """
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.match(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    year = _FOUR_DIGIT_YEAR.search(value)
    if year is not None and int(year.group()) < 100:  # email.utils reads it as 19xx/20xx (a two-digit year)
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


class RedactedUrls(logging.Filter):
    """Masks the secrets of URLs in a logger's records: httpx logs every request with its URL
    whole (``HTTP Request: POST https://hook:pw@host/in?token=... "HTTP/1.1 204"``, at INFO, so
    ``choreograph push --log-level debug`` and any app logging at INFO print it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is left for the handler to report
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


REDACTED_URLS = RedactedUrls()
"""The one instance: ``addFilter`` adds it to a logger once, however many ambassadors are made."""


NO_HANDSHAKE = frozenset({405, 501})
"""What a server that does not implement ``OPTIONS`` answers the handshake: 405 Method Not
Allowed, or 501 Not Implemented (Python's ``http.server``, some proxies). A refusal, not a
failure: asking again would get the same answer, so the event is dead-lettered at once."""


class HandshakeRefused(Exception):
    """The receiver answered the handshake without granting our origin (permanent)."""

    def __init__(self, url: str, status: int, allowed: str | None, origin: str) -> None:
        if allowed is None:
            why = f"answered {status} without a WebHook-Allowed-Origin header"
            if status in NO_HANDSHAKE:
                why += (" (it does not implement the CloudEvents webhook handshake; skip it with"
                        " --no-handshake, handshake = false in a push config, or handshake=False)")
        else:
            why = f"allows origin {allowed!r}, not {origin!r}"
        super().__init__(f"OPTIONS {redact(url)}: the receiver refused delivery: {why}")
        self.status = status


class HandshakeFailed(Exception):
    """The handshake could not complete for a transient reason (retry later)."""

    def __init__(self, url: str, status: int, after: float | None) -> None:
        super().__init__(f"OPTIONS {redact(url)}: handshake answered {status}")
        self.status = status
        self.after = after


_Key = tuple[str, tuple[tuple[str, str], ...]]
"""A grant's key: the URL and the headers the handshake carried (names lowercased, sorted)."""


class Handshakes:
    """Which URLs granted delivery (CloudEvents webhook abuse protection, §4.1).

    One ``OPTIONS`` per URL (and headers) at a time, however many deliveries wait for it (they share its
    answer, a failure or a refusal too); a grant is cached for ``ttl`` seconds, then asked
    again, so a receiver can revoke it. Refusals and failures are not cached: a delivery that
    comes later asks again, and one refused is dead-lettered with the refusal (replay it once
    the receiver is fixed).

    The handshake carries the subscription's ``headers`` (an ``Authorization`` the receiver
    checks on every request, OPTIONS included, as the webhook spec allows), and a grant is
    kept per URL and headers: two subscriptions to one URL with different credentials each
    ask for their own.
    """

    def __init__(self, client: httpx.AsyncClient, origin: str, clock: Clock, ttl: float = 3600.0) -> None:
        self.client = client
        self.origin = origin
        self.clock = clock
        self.ttl = ttl
        self.granted: dict[_Key, float] = {}
        self.asked = 0
        self._asking: dict[_Key, asyncio.Task[None]] = {}  # the handshake in flight, per key

    async def ensure(self, url: str, answer_within: float, headers: Mapping[str, str] | None = None) -> None:
        """Return once ``url`` has granted delivery; raise :class:`HandshakeRefused` or
        :class:`HandshakeFailed`, or the ``httpx`` error of an unreachable receiver.
        ``headers`` go with the ``OPTIONS`` (the subscription's own).

        The deliveries that arrive while a handshake is in flight share its answer, its failure
        included: they waited on a lock before, and each one then asked again in turn, so a
        receiver that never answered the ``OPTIONS`` held the n-th delivery n timeouts."""
        headers = dict(headers or {})
        key = (url, tuple(sorted((name.lower(), value) for name, value in headers.items())))
        if self.granted.get(key, -math.inf) > self.clock.monotonic():
            return
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.create_task(self._ask(key, url, answer_within, headers),
                                         name=f"choreograph-push-handshake-{redact(url)}")
            self._asking[key] = asking
            asking.add_done_callback(lambda task: self._asked(key, task))
        # shielded: a delivery cancelled (released at shutdown) does not cancel the others' handshake
        await asyncio.shield(asking)

    def _asked(self, key: _Key, task: asyncio.Task[None]) -> None:
        if self._asking.get(key) is task:
            del self._asking[key]
        if not task.cancelled():
            task.exception()  # retrieved: every delivery that waited for it has it (or was cancelled)

    async def cancel(self) -> None:
        """Cancel the handshakes still in flight and wait for them to end (the ambassador is
        stopping, its client about to close: nobody waits for them any more)."""
        tasks = list(self._asking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _ask(self, key: _Key, url: str, answer_within: float, headers: dict[str, str]) -> None:
        """One ``OPTIONS`` to ``url``: a grant cached under ``key``, or the refusal or failure raised."""
        self.asked += 1
        async with asyncio.timeout(answer_within), self.client.stream(
            "OPTIONS", url, headers={**headers, REQUEST_ORIGIN: self.origin}, timeout=answer_within,
            follow_redirects=False,  # a grant is the answer of ``url`` itself, not of where it points
        ) as response:
            pass  # the answer is its status and headers; a body, however large, is not read
        allowed = response.headers.get(ALLOWED_ORIGIN)
        if response.is_success and allowed is not None and allowed.strip() in (self.origin, "*"):
            self.granted[key] = self.clock.monotonic() + self.ttl
            return
        # A 5xx (or 404, 408, 409, 429) is the receiver failing to answer, not answering no:
        # a WebHook-Allowed-Origin it carries (a proxy's or a middleware's) refuses nothing.
        # 501 is the exception: the server does not implement OPTIONS, and never will.
        if classify(response.status_code) == "transient" and response.status_code not in NO_HANDSHAKE:
            raise HandshakeFailed(url, response.status_code,
                                  retry_after(response.headers.get("retry-after"), self.clock.time()))
        raise HandshakeRefused(url, response.status_code, allowed, self.origin)
