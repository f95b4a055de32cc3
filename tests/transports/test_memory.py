"""The memory transport: behaviour specific to it (the contract itself is in tests/conformance)."""

from __future__ import annotations

import pytest

from choreograph.errors import ConfigurationError
from choreograph.testing import MemoryTransport, VirtualClock
from choreograph.transports import Message


async def test_dead_letters_of_one_instant_on_a_virtual_clock_are_listed_in_the_order_they_died() -> None:
    """Listed by ``dead_at`` alone, letters of the same virtual instant came by group, then by the
    first time their id died: a letter dead again after a replay was listed as the oldest."""
    bus = MemoryTransport(clock=VirtualClock(start=0.0))
    first, second = await bus.subscribe("first", ["t"]), await bus.subscribe("second", ["t"])
    await bus.publish([Message("m1", "t", b"1"), Message("m2", "t", b"2")])
    for delivery in await second.fetch(2, timeout=0):
        await delivery.dead_letter({"reason": "rejected"})
    (one, two) = await first.fetch(2, timeout=0)
    await one.dead_letter({"reason": "rejected"})
    assert [(x.group, x.message.id) for x in await bus.dead_letters()] == [("second", "m1"), ("second", "m2"),
                                                                            ("first", "m1")]
    assert await bus.replay("second", ["m1"]) == 1
    (again,) = await second.fetch(1, timeout=0)
    await again.dead_letter({"reason": "again"})
    await two.dead_letter({"reason": "rejected"})
    assert [(x.group, x.message.id) for x in await bus.dead_letters()] == [
        ("second", "m2"), ("first", "m1"), ("second", "m1"), ("first", "m2")
    ]
    assert [x.message.id for x in await bus.dead_letters("second", limit=1)] == ["m2"]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("memory://?leese=5", "unknown parameter(s) leese (did you mean lease?); memory:// takes lease"),
        ("memory://orders?lease=5&prefix=x", "unknown parameter(s) prefix; memory:// takes lease"),
        ("memory://?bogus=", "unknown parameter(s) bogus;"),
    ],
)
def test_an_unknown_url_parameter_is_refused_naming_it(url: str, needle: str) -> None:
    """It was ignored: ``?leese=5`` ran on the default lease of 30 s without a word."""
    with pytest.raises(ConfigurationError) as raised:
        MemoryTransport(url)
    assert needle in str(raised.value)


def test_the_lease_is_its_only_url_parameter() -> None:
    assert MemoryTransport("memory://orders?lease=5").lease == 5.0
