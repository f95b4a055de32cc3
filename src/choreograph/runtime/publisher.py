"""Publishing from outside a handler: an HTTP endpoint, a script, a test.

Every event published here starts a transaction (its own id is the correlation id)
unless ``correlation_id`` is given. With ``telemetry=`` each event also gets a PRODUCER
span and a ``traceparent`` naming it (see :mod:`choreograph.telemetry`); without, the
envelope carries no ``traceparent``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from choreograph._clock import SYSTEM_CLOCK, SystemClock
from choreograph._envelope import Envelope, attribute_problem, new_id
from choreograph.events import Event
from choreograph.runtime.records import first_envelope, to_message
from choreograph.transports.base import Transport

if TYPE_CHECKING:
    from choreograph.telemetry import Telemetry


class Publisher:
    """Publishes typed events on a transport.

    >>> envelopes = await Publisher(bus).publish(OrderPlaced(order_id="o-1", amount=30))  # doctest: +SKIP
    """

    def __init__(
        self, transport: Transport, *, source: str = "/choreograph/publisher", telemetry: Telemetry | None = None
    ) -> None:
        problem = attribute_problem("source", source)
        if problem is not None:  # every event published here carries it: refused here, once
            raise ValueError(problem)
        self.transport = transport
        self.source = source
        self.telemetry = telemetry

    async def publish(
        self,
        *events: Event,
        correlation_id: str | None = None,
        subject: str | None = None,
        deadline: str | float | timedelta | datetime | None = None,
        ids: list[str] | None = None,
    ) -> list[Envelope]:
        """Durably publish ``events`` in one batch; returns their envelopes.

        ``deadline`` (RFC 3339 text, an aware datetime, or a timedelta / seconds from
        now on the transport's clock) travels with the transaction: see :mod:`choreograph.sagas`.
        A ``correlation_id``, ``subject`` or id in ``ids`` that holds what a
        CloudEvents String must not (a control character, a surrogate, a Unicode
        noncharacter), or an empty ``correlation_id`` or ``subject``, raises
        :class:`ValueError` naming it, before anything is published.
        """
        # Empty is refused too: a CloudEvents subject that is present must not be empty, and an
        # empty correlation_id (an unset variable) would start a new transaction without a word.
        if correlation_id == "":
            raise ValueError("correlation_id: '' is empty; pass None to start a new transaction")
        if subject == "":
            raise ValueError("subject: '' is empty; a CloudEvents subject must be non-empty (pass None for none)")
        if ids is not None:
            if len(ids) != len(events):
                raise ValueError("ids: must have one id per event")
            for event_id in ids:  # first_envelope checks the other attributes; a new id needs no check
                problem = attribute_problem("id", event_id)
                if problem is not None:
                    raise ValueError(problem)
        clock = getattr(self.transport, "clock", None) or SYSTEM_CLOCK
        # stamped on the transport's clock: a test's VirtualClock's time, not the wall's (None: now)
        stamp = None if type(clock) is SystemClock else clock.time()
        if deadline is not None:  # text too: a deadline no journal can read is refused here, not stored
            from choreograph.sagas import deadline_text

            deadline = deadline_text(deadline, now=clock.time())
        envelopes = [
            first_envelope(
                event, source=self.source, id=ids[i] if ids else new_id(), correlation_id=correlation_id,
                subject=subject, deadline=deadline, time=stamp,
            )
            for i, event in enumerate(events)
        ]
        await self.publish_envelopes(envelopes)
        return envelopes

    async def publish_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Durably publish ``envelopes`` built by the caller (as :meth:`publish` builds them, then
        changed: the gateway sets a client's CloudEvents attributes), traced and counted alike."""
        if self.telemetry is None:
            await self.transport.publish([to_message(env) for env in envelopes])
            return
        from choreograph.telemetry import messaging_system

        with self.telemetry.producing(envelopes, system=messaging_system(getattr(self.transport, "url", ""))):
            await self.transport.publish([to_message(env) for env in envelopes])
