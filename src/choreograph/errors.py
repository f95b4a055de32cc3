"""The exceptions choreograph raises, and the two a handler raises to steer its outcome.

::

    ChoreographError                 base of everything below
    ├── Retry(after=None)            handler: "try again later" (transient; counts an attempt)
    ├── Reject(reason)               handler: "this can never succeed" (dead-letter at once)
    ├── ConfigurationError           you: a bad URL, an unknown module, a duplicate handler
    ├── EmitError                    you: a handler emitted an event type it did not declare, or an
    │                                event its JSON cannot carry (a float inf or nan)
    ├── MalformedEnvelope            the bus: bytes that are not a valid CloudEvent
    ├── TransportError               the broker broke (client-library errors translated here)
    │   └── TransportClosed          you closed it, then used it
    └── StoreError                   the inbox / outbox / journal database broke

Errors carry context where they have it (``event_id``, ``service``, ``handler``,
``attempt``) so a log line or a dead-letter record says exactly what failed.
Any other exception raised by a handler is treated as transient, like ``Retry``.
"""

from __future__ import annotations

from choreograph.policy import MAX_RETRY_DELAY


class ChoreographError(Exception):
    """Base class of every choreograph exception."""

    def __init__(
        self,
        message: str = "",
        *,
        event_id: str | None = None,
        service: str | None = None,
        handler: str | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.event_id = event_id
        self.service = service
        self.handler = handler
        self.attempt = attempt

    def __str__(self) -> str:
        context = [
            f"{name}={value}"
            for name, value in (
                ("event", self.event_id),
                ("service", self.service),
                ("handler", self.handler),
                ("attempt", self.attempt),
            )
            if value is not None
        ]
        return f"{self.message} [{', '.join(context)}]" if context else self.message


class Retry(ChoreographError):
    """Raise from a handler to retry the event, optionally no sooner than ``after`` seconds.

    >>> raise Retry("inventory service busy", after=2.0)  # doctest: +SKIP
    """

    def __init__(self, message: str = "retry requested", *, after: float | None = None) -> None:
        super().__init__(message)
        if after is not None and not (0 <= after <= MAX_RETRY_DELAY):  # refuses nan and inf as well
            raise ValueError(
                f"after: must be a finite number of seconds >= 0, at most {MAX_RETRY_DELAY:.0f} (14 days), got {after!r}"
            )
        self.after = after


class Reject(ChoreographError):
    """Raise from a handler when the event can never succeed: it is dead-lettered at once."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigurationError(ChoreographError):
    """Misuse: the program or its configuration is wrong (not the data, not the broker)."""


class EmitError(ChoreographError):
    """A handler returned or published an event type it did not declare in ``emits``, or an
    event whose JSON does not read back as a valid instance of its model (a float ``inf`` or
    ``nan``, which JSON would carry as ``null``); :class:`~choreograph.Publisher` raises it
    too, before publishing anything."""


class MalformedEnvelope(ChoreographError):
    """Bytes on the bus that are not a valid CloudEvent; the message names the attribute."""


class TransportError(ChoreographError):
    """The broker failed (connection lost, publish not confirmed, ...)."""


class TransportClosed(TransportError):
    """The transport was closed and then used."""


class StoreError(ChoreographError):
    """A store (inbox, outbox, journal) failed."""


class TransactionConflict(StoreError):
    """PostgreSQL aborted a transaction for conflicting with a concurrent one: a serialization
    failure (SQLSTATE ``40001``) or a deadlock (``40P01``). Running it again may succeed.

    A handler whose transaction (``ctx.transaction()``) raises it is run again at once, in the
    same attempt, up to 3 times after pauses of 5-60 ms; only then is it a failed attempt
    under the handler's retry policy.
    """
