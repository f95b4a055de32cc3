"""The Ingestion gateway of Drone Delivery: ``POST /deliveries`` → ``DeliveryRequested`` on the bus.

Serve it with ``choreograph gateway examples.drone_delivery.gateway:gateway``
(``choreograph dev`` does). It validates the body against :class:`DeliveryRequested` (a bad field is a
``422`` naming its path), publishes the event (its id is the transaction's correlation
id) and answers ``202`` with the ``status_url`` of the transaction in the journal
(``GET /transactions/{correlation_id}``). An ``Idempotency-Key`` header makes a client
retry safe: the same key and body answer the first request's correlation id without
publishing again.

Configuration from the environment (``choreograph dev`` sets it): ``CHOREOGRAPH_BROKER``
(default ``sqlite:///<data dir>/bus.db``), ``CHOREOGRAPH_JOURNAL`` (default
``sqlite:///<data dir>/journal.db``); keys are kept in ``<data dir>/gateway.db``.
"""

from __future__ import annotations

import os

from choreograph.gateway import Gateway, Route
from examples.drone_delivery._store import data_dir
from examples.drone_delivery.events import DeliveryRequested

DEADLINE_S = 120.0
"""A delivery request not scheduled or cancelled by then is ``stuck`` in the journal."""


def _url(env: str, filename: str) -> str:
    return os.environ.get(env) or f"sqlite:///{data_dir() / filename}"


gateway = Gateway(
    routes=[
        Route(
            "POST",
            "/deliveries",
            DeliveryRequested,
            name="request_delivery",
            deadline=DEADLINE_S,
            summary="Request a drone delivery of a package",
        ),
    ],
    broker=_url("CHOREOGRAPH_BROKER", "bus.db"),
    journal=_url("CHOREOGRAPH_JOURNAL", "journal.db"),
    idempotency=f"sqlite:///{data_dir() / 'gateway.db'}",
    title="Drone Delivery ingestion",
)
