"""A verb whose broker call failed does the work when called again: the check each broker's tests share.

The worker retries a settle step that raised (``_Runner._retrying``), calling the verb
again. The delivery must still be unsettled by then: if the failed call left it settled,
the second call does nothing and the message comes back only when its lease runs out - a
retry a lease late, an ack undone, a dead letter never stored.

Each transport's test makes the transport's own write fail once (the real broker does
everything else) and hands the delivery to :func:`check_a_second_call_does_the_work`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from choreograph.transports.base import Delivery, Subscription, Transport

VERBS = ("ack", "retry", "defer", "dead_letter")
RECORD = {"reason": "rejected", "error": "the second call stored it"}

#: retry, defer: longer than the check waits, so a copy that comes back was retried, not expired.
RETRY_LEASE = 60.0
#: ack, dead_letter: the check waits past it; what was not settled would be back by then.
SHORT_LEASE = 1.0
WAIT = 15.0  # a ceiling for a loaded machine, never a speed assertion


def lease_for(verb: str) -> float:
    return RETRY_LEASE if verb in ("retry", "defer") else SHORT_LEASE


async def call(delivery: Delivery, verb: str) -> None:
    if verb == "ack":
        await delivery.ack()
    elif verb == "retry":
        await delivery.retry(0)
    elif verb == "defer":
        await delivery.defer(0)
    else:
        await delivery.dead_letter(RECORD)


async def check_a_second_call_does_the_work(
    transport: Transport,
    subscription: Subscription,
    delivery: Delivery,
    verb: str,
    raises: type[BaseException] | tuple[type[BaseException], ...],
    held: Callable[[], bool] | None = None,
) -> None:
    """``verb`` on ``delivery`` fails once (the caller broke the next write), then succeeds:

    * ``retry``: the message is back with the next attempt well inside its lease;
    * ``defer``: the same, with the attempt it had;
    * ``ack``: it is not back after the lease;
    * ``dead_letter``: the dead letter is stored, and it is not back after the lease.

    ``held``, where given, says the subscription still holds the delivery after the failed
    call (what its ``close()`` hands on at once, rather than leaving it to the lease).
    """
    with pytest.raises(raises):
        await call(delivery, verb)
    assert not delivery.settled  # the broker did not take it: a second call must do the work
    if held is not None:
        assert held(), "the failed call dropped the delivery from its subscription's books"
    await call(delivery, verb)  # what the worker's settle retry does
    assert delivery.settled
    if verb in ("retry", "defer"):
        again = await _first(subscription, WAIT)
        assert again is not None, f"not back within {WAIT}s (lease {RETRY_LEASE}s): the second {verb} did nothing"
        assert (again.message, again.attempt) == (delivery.message, delivery.attempt + (verb == "retry"))
        await again.ack()
        return
    await asyncio.sleep(SHORT_LEASE * 1.5)  # past the lease: an unsettled message would be back
    assert await subscription.fetch(10, timeout=SHORT_LEASE) == []
    if verb == "dead_letter":
        (letter,) = await transport.dead_letters(subscription.group)
        assert letter.message == delivery.message
        assert letter.record["error"] == RECORD["error"]


async def _first(subscription: Subscription, within: float) -> Delivery | None:
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if got := await subscription.fetch(1, timeout=left):
            return got[0]
    return None

