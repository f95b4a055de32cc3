"""choreograph: microservices that run business transactions by choreography.

The package is layered, kernel below and friendly layer above:

* ``_envelope`` (CloudEvents), ``transports`` (the seam to brokers), ``stores``
  (inbox) and ``runtime`` (the worker loop) form the kernel: plain data and async
  functions, no knowledge of your services.
* ``events``, ``service``, ``context`` and ``policy`` are the API you write
  services with; ``testing`` runs them in one process in virtual time.
* The edges (``cli``) sit outside and only use the layers below.

>>> class OrderPlaced(Event, type="shop.order.placed"):
...     order_id: str
"""

from choreograph._envelope import Envelope, decode, derive_id, encode
from choreograph.context import Context, current_context
from choreograph.errors import (
    ChoreographError,
    ConfigurationError,
    EmitError,
    MalformedEnvelope,
    Reject,
    Retry,
    StoreError,
    TransactionConflict,
    TransportClosed,
    TransportError,
)
from choreograph.events import Event
from choreograph.policy import RetryPolicy
from choreograph.runtime import Publisher, Worker
from choreograph.runtime.outbox import transaction
from choreograph.sagas import TimedOut, failed, timed_out
from choreograph.service import FAILED, App, Failure, Service
from choreograph.stores import open_store
from choreograph.transports import open_transport

__all__ = [
    "FAILED",
    "App",
    "ChoreographError",
    "ConfigurationError",
    "Context",
    "EmitError",
    "Envelope",
    "Event",
    "Failure",
    "MalformedEnvelope",
    "Publisher",
    "Reject",
    "Retry",
    "RetryPolicy",
    "Service",
    "StoreError",
    "TimedOut",
    "TransactionConflict",
    "TransportClosed",
    "TransportError",
    "Worker",
    "current_context",
    "decode",
    "derive_id",
    "encode",
    "failed",
    "open_store",
    "open_transport",
    "timed_out",
    "transaction",
]
__version__ = "0.1.0"
