"""Testing tools that ship with choreograph: run a whole system in one process, in virtual time.

A scenario states a business case and checks its outcome, compensations included:

>>> async with Scenario(app) as s:                                           # doctest: +SKIP
...     await s.given(OrderPlaced(order_id="o-1", customer="bob", sku="widget", qty=1, amount=50_00))
...     s.expect(PaymentDeclined, StockReserved, OrderCancelled)
...     s.expect_compensated(StockReserved)                 # inventory released the stock
...     s.expect_not(OrderShipped)

A failed expectation lists what was emitted, in order, and the dead letters. Below it,
the parts it is made of, for tests that drive a worker themselves:

>>> clock = VirtualClock()
>>> bus = MemoryTransport(clock=clock)
>>> async with Worker([payments, shipping], bus) as worker:        # doctest: +SKIP
...     await Publisher(bus).publish(OrderPlaced(order_id="o-1", amount=30))
...     await settled(bus)          # every event handled; retries fast-forwarded
...     assert worker.stats().dead_lettered == 0

:class:`VirtualClock` never sleeps for real: ``settled()`` jumps it straight to the
next due retry or lease expiry once nothing else can run, so a test of a 30-second
backoff takes microseconds and asserts exact times. The runtime's own backoffs (its
store or broker failed) wait on the same clock, and ``settled()`` counts them as pending
work: a test of an outage neither waits it out nor sees ``settled()`` return before the
worker tried again. Handler timeouts and injected hangs (:mod:`choreograph.faults`) run on
it too: a hang of ten minutes past a 5 s timeout times out at once, 5 s later on the clock.
The clock jumps while events are in flight only once every running handler waits on it.
"""

from __future__ import annotations

from choreograph._scenario import Scenario
from choreograph._scenario_log import Emitted
from choreograph._virtual_time import VirtualClock, settled
from choreograph.transports.memory import MemoryTransport

__all__ = ["Emitted", "MemoryTransport", "Scenario", "VirtualClock", "settled"]
