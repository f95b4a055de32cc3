"""Small helpers shared by the conformance tests."""

from __future__ import annotations

import asyncio
import time

from choreograph.transports import Delivery, Message, Subscription, Transport

#: How long a test waits for something that must happen. Generous on purpose: it is a
#: ceiling for a loaded CI machine, never a speed assertion (speed lives in bench/).
WAIT = 15.0

TYPE_A = "conformance.a"
TYPE_B = "conformance.b"


def message(n: int | str, type: str = TYPE_A, body: bytes | None = None) -> Message:
    """Message ``m<n>`` of ``type`` with a recognisable body."""
    return Message(id=f"m{n}", type=type, body=f"body-{n}".encode() if body is None else body)


async def collect(subscription: Subscription, count: int, *, within: float = WAIT) -> list[Delivery]:
    """Fetch until ``count`` deliveries arrived or ``within`` seconds passed (then fewer)."""
    out: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        out.extend(await subscription.fetch(count - len(out), timeout=left))
    return out


async def quiet(subscription: Subscription, seconds: float) -> list[Delivery]:
    """Whatever the subscription delivers in the next ``seconds`` (expected: nothing)."""
    return await subscription.fetch(100, timeout=seconds)


def ids(deliveries: list[Delivery]) -> list[str]:
    return [delivery.message.id for delivery in deliveries]


async def settle_all(deliveries: list[Delivery]) -> None:
    await asyncio.gather(*(delivery.ack() for delivery in deliveries))


async def bound(transport: Transport, group: str) -> frozenset[str] | None:
    """The types ``groups()`` says ``group`` is bound to (``None``: every type), read over
    ``transport`` - another connection than the subscriber's: what the bus keeps."""
    listed = await transport.groups()
    assert listed is not None, "every transport lists its groups"
    return listed[group]
