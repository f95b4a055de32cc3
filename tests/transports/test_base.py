"""The settling verbs of :class:`Delivery`, on a delivery whose broker calls the test controls.

Every transport's deliveries run these verbs; each broker's own tests check the
same clauses against its real broker with one failed write (``_second_call``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from choreograph.errors import TransportError
from choreograph.transports.base import Delivery, Message
from tests.transports._second_call import VERBS, call


class Scripted(Delivery):
    """Records each broker call; the first ``failures`` raise, and each waits for ``gate``."""

    __slots__ = ("calls", "failures", "gate")

    def __init__(self, failures: int = 0) -> None:
        super().__init__(Message("m1", "t", b"{}"), 1, "g")
        self.calls: list[str] = []
        self.failures = failures
        self.gate = asyncio.Event()
        self.gate.set()

    async def _broker(self, verb: str) -> None:
        self.calls.append(verb)
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise TransportError("the broker went away")

    async def _ack(self) -> None:
        await self._broker("ack")

    async def _retry(self, after: float) -> None:
        await self._broker("retry")

    async def _defer(self, after: float) -> None:
        await self._broker("defer")

    async def _dead_letter(self, record: Mapping[str, Any]) -> None:
        await self._broker("dead_letter")


@pytest.mark.parametrize("verb", VERBS)
async def test_a_verb_whose_broker_call_raised_leaves_the_delivery_unsettled_for_a_second_call(verb: str) -> None:
    delivery = Scripted(failures=1)
    with pytest.raises(TransportError):
        await call(delivery, verb)
    assert not delivery.settled
    await call(delivery, verb)
    assert delivery.settled and delivery.calls == [verb, verb]


async def test_a_verb_called_while_another_is_at_work_is_a_no_op() -> None:
    delivery = Scripted()
    delivery.gate.clear()
    acking = asyncio.ensure_future(delivery.ack())
    while not delivery.calls:
        await asyncio.sleep(0)
    await delivery.retry(0)
    await delivery.dead_letter({"reason": "rejected"})
    await delivery.ack()
    delivery.gate.set()
    await acking
    assert delivery.settled and delivery.calls == ["ack"]


async def test_a_cancelled_verb_leaves_the_delivery_unsettled() -> None:
    """Cancelled mid-call, the broker may or may not have the settlement: a later verb must
    still be able to settle it (transports make that second call safe)."""
    delivery = Scripted()
    delivery.gate.clear()
    retrying = asyncio.ensure_future(delivery.retry(5.0))
    while not delivery.calls:
        await asyncio.sleep(0)
    retrying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await retrying
    assert not delivery.settled
    delivery.gate.set()
    await delivery.ack()
    assert delivery.settled and delivery.calls == ["retry", "ack"]
