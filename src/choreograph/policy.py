"""Retry policy: how often and how late a failed event is tried again.

Exponential backoff with *full jitter* (AWS architecture blog, "Exponential Backoff And
Jitter"): the n-th retry waits a uniform random time in ``[0, min(max_interval,
base * 2**(n-1))]``. Full jitter spreads a burst of failures over time instead of
retrying them in lock-step. Pass ``jitter=False`` (or a seeded ``random.Random``) for
deterministic delays in tests.

>>> policy = RetryPolicy(max_attempts=3, base=0.5, jitter=False)
>>> [policy.backoff(n) for n in (1, 2, 3)]
[0.5, 1.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Literal

GiveUp = Literal["max_attempts", "max_age"]

#: The longest retry delay (seconds): 14 days. Every transport can hold an event that long
#: and no less (RabbitMQ's longest retry queue TTL is ~19.7 days here; a NATS NAK delay is
#: int64 nanoseconds), so "no sooner than" holds everywhere. ``Retry(after=)`` and
#: ``RetryPolicy.max_interval`` refuse more.
MAX_RETRY_DELAY = 14 * 24 * 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to retry a failed attempt and when to give up.

    ``max_attempts`` counts every attempt, the first included. ``max_age`` (seconds,
    or ``None`` for no limit) is measured from the first failed attempt: once exceeded,
    the event is given up even if attempts remain - and at once when the failure asks for a
    delay reaching past it (``Retry(after=)``, see :meth:`give_up`).
    """

    max_attempts: int = 5
    base: float = 0.2
    max_interval: float = 30.0
    max_age: float | None = None
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if not (math.isfinite(self.base) and self.base >= 0):  # nan compares false with everything
            raise ValueError(f"base: must be a finite number of seconds >= 0, got {self.base!r}")
        if not 0 <= self.max_interval <= MAX_RETRY_DELAY:
            raise ValueError(f"max_interval: must be between 0 and {MAX_RETRY_DELAY:.0f} seconds (14 days), "
                             f"got {self.max_interval!r}")
        if self.max_age is not None and not (0 < self.max_age < math.inf):
            raise ValueError(f"max_age: must be a finite number of seconds > 0 or None, got {self.max_age!r}")

    def backoff(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
        # The exponent is capped: 2.0 ** 1024 raises OverflowError (a policy with max_attempts
        # past 1025 and a max_age hit it), and any doubling that large is past max_interval.
        ceiling = min(self.max_interval, self.base * (2.0 ** min(max(0, failed_attempt - 1), 1000)))
        if not self.jitter:
            return ceiling
        return rng.uniform(0.0, ceiling) if rng is not None else random.uniform(0.0, ceiling)

    def give_up(self, attempt: int, age: float, *, not_before: float | None = None) -> GiveUp | None:
        """Why to stop after ``attempt`` failed, ``age`` seconds after the first failure; else None.

        ``not_before`` is a delay the failure itself asked for (``Retry(after=)``, an HTTP
        ``Retry-After``): when it reaches past ``max_age`` no attempt can honour both, so the
        answer is ``"max_age"`` now rather than one more attempt that late.
        """
        if attempt >= self.max_attempts:
            return "max_attempts"
        if self.max_age is not None and (age >= self.max_age or (
                not_before is not None and age + not_before > self.max_age)):
            return "max_age"
        return None


DEFAULT_RETRY = RetryPolicy()
