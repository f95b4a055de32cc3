"""How hard the shop's services try before they give up on an event.

Every handler of the shop (steps and compensations) gets ten attempts, with
exponential backoff from 0.1 s doubling to a 2 s cap, full jitter. A transient failure
rate ``p`` exhausts them with probability ``p**10`` per event: 1e-10 at 10 %, 1e-7 at
20 %, so the chaos harness (``bench/chaos.py``) never sees a give-up caused by
transient faults alone, and a give-up there is a finding. Two more things use up
attempts: a delivery whose process was killed comes back with the next attempt number,
and so does a copy of an event that arrived while another copy was being handled.
A business "no" (``Reject``) is never retried.

Compensations must not give up (a refund that gives up leaves the money taken), which is
why the same generous policy covers them.
"""

from __future__ import annotations

from choreograph import RetryPolicy

RETRY = RetryPolicy(max_attempts=10, base=0.1, max_interval=2.0)
"""The retry policy of every shop service."""

TIMEOUT = 5.0
"""Seconds a shop handler may run before its attempt counts as failed."""
