"""Webhook signatures in the Standard Webhooks format, and the CloudEvents abuse-protection handshake.

**Signing** (https://www.standardwebhooks.com): every push request carries

* ``webhook-id``: the event id (beyond printable ASCII percent-encoded, :func:`wire_id`); the
  same on every retry, so it is the receiver's idempotency key;
* ``webhook-timestamp``: Unix seconds of *this* attempt (a replayed old request fails
  the tolerance check);
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``,
  space-separated when several secrets sign at once (rotation).

Secrets are ``whsec_<base64 key>``; the bare base64 key is accepted too, as the
reference libraries do. Any Standard Webhooks library (Svix, standardwebhooks for
Python, Node, Go, ...) verifies what choreograph sends; :func:`verify` is the
Python side, and ``examples/polyglot`` shows it in 20 lines of Node.js.

**Handshake** (CloudEvents "HTTP 1.1 Web Hooks for Event Delivery", §4): before the
first delivery to a URL the sender asks ``OPTIONS`` with ``WebHook-Request-Origin``;
the receiver grants delivery by answering ``WebHook-Allowed-Origin`` with that origin
or ``*``. It stops choreograph from being pointed at a URL that never agreed to
receive events.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from choreograph.errors import ChoreographError, ConfigurationError

SECRET_PREFIX = "whsec_"
#: Standard Webhooks: "secret keys SHOULD be between 24 bytes and 64 bytes" (a sender's own
#: secrets are held to it; a receiver verifies with whatever its sender chose).
MIN_KEY_BYTES, MAX_KEY_BYTES = 24, 64
DEFAULT_TOLERANCE = 300.0

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"

REQUEST_ORIGIN = "webhook-request-origin"
ALLOWED_ORIGIN = "webhook-allowed-origin"
REQUEST_RATE = "webhook-request-rate"
ALLOWED_RATE = "webhook-allowed-rate"


class SignatureError(ChoreographError):
    """A webhook request whose signature is missing, malformed, forged, or outside the time tolerance.

    A receiver answers 401 to it; the message says which check failed (never the
    expected signature).
    """


def generate_secret() -> str:
    """A fresh secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret; raises :class:`ConfigurationError` if it is not one."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(
            "webhook secret: expected 'whsec_' followed by base64 (generate one with "
            "choreograph.push.generate_secret())"
        ) from None
    if not key:
        raise ConfigurationError("webhook secret: the key is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of ``body`` sent as ``msg_id`` at ``timestamp``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


#: What a header value carries as it is: printable ASCII and space.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F))


def wire_id(msg_id: str) -> str:
    """``msg_id`` as the ``webhook-id`` header carries it, and the signature signs it: as it is,
    but for characters beyond printable ASCII, percent-encoded as UTF-8 (as the CloudEvents binding
    sends a ``ce-`` header). A header value is ASCII: httpx refused to send an id holding an ``é``,
    so an event with one (an outside producer's id) could never be pushed to a signed subscriber.
    A receiver verifies with the header as received, so any Standard Webhooks library checks it.
    A space at either end is percent-encoded too: a header value does not begin or end with one
    (RFC 9110 5.5; h11 refused to send it, and a server strips it, so the signature failed)."""
    wire = msg_id if msg_id.isascii() and msg_id.isprintable() else quote(msg_id, safe=_HEADER_SAFE)
    core = wire.strip(" ")
    if core == wire:
        return wire
    start = wire.index(core) if core else len(wire)
    return "%20" * start + core + "%20" * (len(wire) - start - len(core))


def signature_headers(
    secrets_: str | Sequence[str], msg_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for one request (one signature per secret); ``msg_id``
    is sent, and signed, as :func:`wire_id` writes it."""
    ts = int(time.time()) if timestamp is None else timestamp
    msg_id = wire_id(msg_id)
    keys = [secrets_] if isinstance(secrets_, str) else list(secrets_)
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: " ".join(sign(secret, msg_id, ts, body) for secret in keys),
    }


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: str | Sequence[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Check a request's Standard Webhooks signature; raise :class:`SignatureError` if it fails.

    ``secret`` may be several secrets (during a rotation any one of them may match).
    ``tolerance`` bounds the distance in seconds between ``webhook-timestamp`` and now,
    both ways, which is what defeats a replay of a captured request.

    >>> verify(request.headers, await request.body(), os.environ["WEBHOOK_SECRET"])  # doctest: +SKIP
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    missing = [name for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER) if not lowered.get(name)]
    if missing:
        raise SignatureError(f"{missing[0]}: header is missing (the request is not signed)")
    msg_id, raw_ts, header = lowered[ID_HEADER], lowered[TIMESTAMP_HEADER].strip(), lowered[SIGNATURE_HEADER]
    # at most 20 digits (any Unix time in seconds): int() refuses more than 4300 (ValueError)
    if not raw_ts.isascii() or not raw_ts.isdigit() or len(raw_ts) > 20:
        raise SignatureError(f"{TIMESTAMP_HEADER}: expected Unix seconds, got {raw_ts[:40]!r}")
    timestamp = int(raw_ts)
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise SignatureError(
            f"{TIMESTAMP_HEADER}: signed {current - timestamp:.0f}s ago, older than the {tolerance:.0f}s tolerance"
        )
    if timestamp > current + tolerance:
        raise SignatureError(
            f"{TIMESTAMP_HEADER}: {timestamp - current:.0f}s in the future, beyond the {tolerance:.0f}s tolerance"
        )
    offered = [part.partition(",")[2] for part in header.split() if part.startswith("v1,")]
    if not offered:
        raise SignatureError(f"{SIGNATURE_HEADER}: no v1 signature in the header")
    keys = [secret] if isinstance(secret, str) else list(secret)
    for key in keys:
        expected = sign(key, msg_id, timestamp, body).partition(",")[2]
        if any(hmac.compare_digest(expected.encode(), candidate.encode()) for candidate in offered):
            return
    raise SignatureError(f"{SIGNATURE_HEADER}: no signature matches (wrong secret, or the body was altered)")
