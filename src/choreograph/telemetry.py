"""Telemetry: an OpenTelemetry span per handler attempt, Prometheus metrics per service and event type.

Off unless asked for. A worker built without ``telemetry=`` runs the plain handler path:
the instrumented one is chosen once, when the worker is built, never tested per event.

>>> telemetry = Telemetry()                                   # doctest: +SKIP
>>> async with Worker([payment], bus, telemetry=telemetry):   # doctest: +SKIP
...     await Publisher(bus, telemetry=telemetry).publish(OrderPlaced(order_id="o-1"))

**Traces** go to the ``tracer_provider`` given, else to OpenTelemetry's global one: set up the
SDK as for any instrumented library (``choreograph run --otel`` does it from ``OTEL_*``).

* Each handler attempt is a CONSUMER span ``<service> handle <event type>``. Its parent is the
  W3C ``traceparent`` carried in the incoming envelope (CloudEvents' distributed-tracing
  extension).
* An event that arrives without one (published by something uninstrumented) is treated as
  if its publish had been a span of the trace *named by its correlation id*: the trace id is
  the correlation id's 128 bits (a UUID as it is, any other text hashed), and the parent span
  id is derived from it too. So every attempt and every hop of that transaction lands in one
  trace, whose id you can compute from the correlation id; the parent span itself is never
  recorded (trace viewers show the first hop under a missing root).
* The events a handler emits (and the ``choreograph.failed`` event when it gives up) carry a
  ``traceparent`` naming that span, so one business transaction is one trace, hop by hop.
* A failed attempt's span has status ERROR and the exception recorded; retries are sibling
  spans under the same parent, each with its ``choreograph.attempt``.
* Publishing from outside a handler (:class:`~choreograph.runtime.publisher.Publisher`, the
  HTTP gateway, :func:`~choreograph.runtime.outbox.transaction` around its commit) opens a
  PRODUCER span ``publish <event type>``: a child of the current span if there is one (the
  gateway: of the request's ``traceparent`` header), else a new trace.

Span attributes follow OpenTelemetry's messaging conventions where they fit:
``messaging.system`` (the broker: ``rabbitmq``, ``nats``, ``redis``, ``sqlite``, ``memory``),
``messaging.operation.type`` (``process`` / ``send``), ``messaging.destination.name`` (the event
type), ``messaging.message.id`` (the event id), ``messaging.message.conversation_id`` and
``choreograph.correlation_id`` (the transaction), ``messaging.consumer.group.name`` (the
service's group), ``choreograph.handler`` and ``choreograph.attempt``.

**Metrics** (prometheus-client; registered once per registry, by default the global one that
``prometheus_client.start_http_server`` serves):

=============================================  ===========================  ==============================
``choreograph_events_handled_total``           service, event_type          handler attempts that succeeded
``choreograph_events_retried_total``           service, event_type          failed attempts to be retried
``choreograph_events_dead_lettered_total``     service, event_type, reason  events given up on
``choreograph_events_duplicates_total``        service, event_type          deliveries the inbox had seen
``choreograph_events_filtered_total``          service, event_type          acked unhandled: ``where=`` did
                                                                            not match
``choreograph_events_handed_back_total``       service, event_type          of a type this version does not
                                                                            subscribe to: handed back for one
                                                                            that does (a rolling deploy)
``choreograph_handler_duration_seconds``       service, event_type          histogram of handler attempts
``choreograph_handlers_in_flight``             service                      handlers running now
``choreograph_outbox_pending``                 service                      outbox rows not yet published
``choreograph_outbox_oldest_age_seconds``      service                      age of the oldest of those
``choreograph_events_published_total``         event_type                   published by a Publisher
``choreograph_push_deliveries_total``          subscription, event_type,    push attempts by outcome
                                               outcome
``choreograph_push_request_duration_seconds``  subscription                 histogram of push requests
``choreograph_pushes_in_flight``               subscription                 pushes in flight now
=============================================  ===========================  ==============================

A push ambassador (``choreograph push --metrics-port``) reports the ``push`` metrics: the
``outcome`` of an attempt is ``delivered`` (2xx), ``retried``, ``dead_lettered``, ``duplicate``
(the inbox had it), ``filtered`` (its filters did not match), ``handed_back`` (a type it does
not deliver, which another subscription bound the group to: left for an ambassador that
delivers it, then dead-lettered ``unhandled``), ``ignored`` (a ``choreograph.failed`` it does
not deliver), ``deferred`` (put back for a second: the inbox could not be asked) or ``released``
(given back unfinished at shutdown); the request duration covers the handshake, the POST and
its answer.

Both need the ``telemetry`` extra (``pip install 'choreograph[telemetry]'``); this module
imports them only when a :class:`Telemetry` is built.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import os
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from choreograph.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.context import Context as TraceContext
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from prometheus_client import CollectorRegistry

    from choreograph._envelope import Envelope

__all__ = [
    "DURATION_BUCKETS",
    "Metrics",
    "Telemetry",
    "Tracing",
    "configure_tracing",
    "messaging_system",
    "serve_metrics",
    "transaction_ids",
]

INSTALL_HINT = "pip install 'choreograph[telemetry]'"

#: Buckets of ``choreograph_handler_duration_seconds``: in-process handlers take well under a
#: millisecond, handlers that call out take up to their timeout.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: OpenTelemetry's well-known ``messaging.system`` values for the transports that have one.
_SYSTEMS = {"amqp": "rabbitmq", "amqps": "rabbitmq", "rediss": "redis", "unix": "redis"}


def messaging_system(url: str) -> str:
    """``messaging.system`` of a transport URL: the broker (``amqp://`` is ``rabbitmq``), else the scheme."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    return _SYSTEMS.get(scheme, scheme or "choreograph")


class Metrics:
    """choreograph's Prometheus metrics in one registry (see the module docstring for the list).

    Use :meth:`on` rather than the constructor: a registry refuses a metric name twice, and
    several workers (or tests) in one process share the metrics of their registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        try:
            from prometheus_client import Counter, Gauge, Histogram
        except ImportError:
            raise ConfigurationError(f"telemetry metrics need prometheus-client: {INSTALL_HINT}") from None
        per_type = ["service", "event_type"]
        self.registry = registry
        self.handled = Counter("choreograph_events_handled", "Handler attempts that succeeded",
                               per_type, registry=registry)
        self.retried = Counter("choreograph_events_retried", "Failed handler attempts that will be retried",
                               per_type, registry=registry)
        self.dead_lettered = Counter("choreograph_events_dead_lettered", "Events dead-lettered, by reason",
                                     [*per_type, "reason"], registry=registry)
        self.duplicates = Counter("choreograph_events_duplicates", "Deliveries skipped: already processed",
                                  per_type, registry=registry)
        self.filtered = Counter("choreograph_events_filtered", "Deliveries acked unhandled: where= did not match",
                                per_type, registry=registry)
        self.handed_back = Counter("choreograph_events_handed_back",
                                   "Deliveries of a type this version does not subscribe to, left for one that does",
                                   per_type, registry=registry)
        self.duration = Histogram("choreograph_handler_duration_seconds", "Duration of handler attempts",
                                  per_type, buckets=DURATION_BUCKETS, registry=registry)
        self.in_flight = Gauge("choreograph_handlers_in_flight", "Handler attempts running now",
                               ["service"], registry=registry)
        self.outbox_pending = Gauge("choreograph_outbox_pending", "Outbox rows committed but not yet published",
                                    ["service"], registry=registry)
        self.outbox_oldest_age = Gauge("choreograph_outbox_oldest_age_seconds",
                                       "Age of the oldest unpublished outbox row", ["service"], registry=registry)
        self.published = Counter("choreograph_events_published", "Events published from outside handlers",
                                 ["event_type"], registry=registry)
        self.push_outcomes = Counter("choreograph_push_deliveries", "Push attempts by outcome",
                                     ["subscription", "event_type", "outcome"], registry=registry)
        self.push_duration = Histogram("choreograph_push_request_duration_seconds", "Duration of push requests",
                                       ["subscription"], buckets=DURATION_BUCKETS, registry=registry)
        self.push_in_flight = Gauge("choreograph_pushes_in_flight", "Pushes in flight", ["subscription"],
                                    registry=registry)

    @classmethod
    def on(cls, registry: CollectorRegistry | None = None) -> Metrics:
        """The metrics registered in ``registry`` (default: prometheus_client's global one), made once."""
        if registry is None:
            try:
                from prometheus_client import REGISTRY
            except ImportError:
                raise ConfigurationError(f"telemetry metrics need prometheus-client: {INSTALL_HINT}") from None
            registry = REGISTRY
        metrics = _METRICS.get(registry)
        if metrics is None:
            metrics = _METRICS[registry] = cls(registry)
        return metrics


_METRICS: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()


class Telemetry:
    """What a worker, a publisher or a gateway reports: traces, metrics, or both.

    >>> telemetry = Telemetry(tracer_provider=provider, registry=registry)   # doctest: +SKIP
    >>> Worker([payment], bus, telemetry=telemetry)                           # doctest: +SKIP

    ``tracer_provider`` defaults to OpenTelemetry's global provider (looked up when a span
    starts, so one set up later still counts); ``registry`` to prometheus_client's global
    registry. ``traces=False`` or ``metrics=False`` leaves that half out.
    """

    def __init__(
        self,
        *,
        traces: bool = True,
        metrics: bool = True,
        tracer_provider: TracerProvider | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.tracing: Tracing | None = Tracing(tracer_provider) if traces else None
        self.metrics: Metrics | None = Metrics.on(registry) if metrics else None

    def __repr__(self) -> str:
        return f"Telemetry(traces={self.tracing is not None}, metrics={self.metrics is not None})"

    @property
    def tracer(self) -> Tracer | None:
        """The OpenTelemetry tracer spans are made with (``None`` without traces)."""
        return self.tracing.tracer if self.tracing is not None else None

    @contextlib.contextmanager
    def producing(self, envelopes: Sequence[Envelope], *, system: str) -> Iterator[None]:
        """Around publishing ``envelopes`` from outside a handler: PRODUCER spans, then the count.

        Each envelope without a ``traceparent`` gets one naming its span (a child of the
        current span, else the root of a new trace).
        """
        spans = self.tracing.producer_spans(envelopes, system=system) if self.tracing is not None else []
        try:
            yield
        except Exception as exc:
            for span in spans:
                Tracing.failed(span, exc)
            raise
        finally:
            for span in spans:
                span.end()
        if self.metrics is not None:
            for envelope in envelopes:
                self.metrics.published.labels(envelope.type).inc()

    def incoming(self, headers: Mapping[str, str]) -> contextlib.AbstractContextManager[None]:
        """Publish under an HTTP request's ``traceparent`` (see :meth:`Tracing.incoming`)."""
        return self.tracing.incoming(headers) if self.tracing is not None else contextlib.nullcontext()


def _messaging_attributes(envelope: Envelope, system: str, operation: str, name: str) -> dict[str, Any]:
    """The OpenTelemetry messaging attributes every span of an event carries."""
    correlation_id = envelope.correlationid or envelope.id
    return {
        "messaging.system": system,
        "messaging.operation.type": operation,
        "messaging.operation.name": name,
        "messaging.destination.name": envelope.type,
        "messaging.message.id": envelope.id,
        "messaging.message.conversation_id": correlation_id,
        "choreograph.correlation_id": correlation_id,
    }


class Tracing:
    """The traces half of :class:`Telemetry`: making spans and reading and writing ``traceparent``.

    Imports OpenTelemetry once, when built, and keeps what the per-attempt path uses at hand.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        try:
            from opentelemetry import context, trace
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise ConfigurationError(f"telemetry traces need opentelemetry-api: {INSTALL_HINT}") from None
        from choreograph import __version__

        self.tracer: Tracer = trace.get_tracer("choreograph", __version__, tracer_provider=tracer_provider)
        self._trace = trace
        self._context = context
        self._propagator = TraceContextTextMapPropagator()
        self._sampled = trace.TraceFlags(trace.TraceFlags.SAMPLED)

    # -- consuming (the worker) ---------------------------------------------------------

    def consumer_span(
        self, envelope: Envelope, *, service: str, group: str, handler: str, attempt: int, system: str
    ) -> Span:
        """The (started) CONSUMER span of one handler attempt, child of the envelope's ``traceparent``."""
        return self.tracer.start_span(
            f"{service} handle {envelope.type}",
            context=self.parent_of(envelope),
            kind=self._trace.SpanKind.CONSUMER,
            attributes={
                **_messaging_attributes(envelope, system, "process", "handle"),
                "messaging.consumer.group.name": group,
                "choreograph.service": service,
                "choreograph.handler": handler,
                "choreograph.attempt": attempt,
            },
            record_exception=False,
            set_status_on_exception=False,
        )

    def parent_of(self, envelope: Envelope) -> TraceContext:
        """The parent of a handler span: the envelope's ``traceparent``, else its transaction's derived one."""
        trace = self._trace
        if envelope.traceparent is not None:
            context = self._extract(envelope.traceparent, envelope.tracestate)
            if trace.get_current_span(context).get_span_context().is_valid:
                return context
        trace_id, span_id = transaction_ids(envelope.correlationid or envelope.id)
        parent = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=self._sampled)
        derived: TraceContext = trace.set_span_in_context(trace.NonRecordingSpan(parent), self._context.Context())
        return derived

    def use(self, span: Span) -> contextlib.AbstractContextManager[Span]:
        """Make ``span`` current while a handler runs (its own spans become children); end it on exit."""
        return self._trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False)

    @staticmethod
    def traced(envelope: Envelope, span: Span) -> Envelope:
        """``envelope`` with ``span`` as its trace parent: what the handler's outputs inherit.

        Unchanged if ``span`` carries no valid context (no SDK configured: nothing to name).
        """
        context = span.get_span_context()
        if not context.is_valid:
            return envelope
        out = copy.copy(envelope)
        out.traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        out.tracestate = context.trace_state.to_header() if context.trace_state else None
        return out

    @staticmethod
    def failed(span: Span, exc: BaseException) -> None:
        """Mark ``span`` as a failed attempt: status ERROR, the exception recorded."""
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(exc)
        span.set_attribute("error.type", f"{type(exc).__module__}.{type(exc).__qualname__}")
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    # -- producing (publisher, gateway) -------------------------------------------------

    def producer_spans(self, envelopes: Sequence[Envelope], *, system: str) -> list[Span]:
        """Started PRODUCER spans for the envelopes without a ``traceparent``, which then name them."""
        spans = []
        for envelope in envelopes:
            if envelope.traceparent is not None:
                continue
            span = self.tracer.start_span(
                f"publish {envelope.type}",
                kind=self._trace.SpanKind.PRODUCER,
                attributes=_messaging_attributes(envelope, system, "send", "publish"),
                record_exception=False,
                set_status_on_exception=False,
            )
            spans.append(span)
            named = self.traced(envelope, span)
            envelope.traceparent, envelope.tracestate = named.traceparent, named.tracestate
        return spans

    @contextlib.contextmanager
    def incoming(self, headers: Mapping[str, str]) -> Iterator[None]:
        """Make an HTTP request's ``traceparent`` the current trace context, unless a span is current.

        The gateway publishes under this, so its PRODUCER spans continue the caller's trace.
        An ASGI tracing middleware that already opened a server span takes precedence.

        A header given more than once (``headers`` with a ``getlist``, as Starlette's) is read
        as W3C Trace Context says: ``tracestate`` headers are one list, combined with ``,``;
        ``traceparent`` twice is invalid (ambiguous), so a new trace.
        """
        if self._trace.get_current_span().get_span_context().is_valid:
            yield
            return
        getlist = getattr(headers, "getlist", None)
        if getlist is None:
            traceparent, tracestate = headers.get("traceparent"), headers.get("tracestate")
        else:
            parents, states = list(getlist("traceparent")), list(getlist("tracestate"))
            traceparent = parents[0] if len(parents) == 1 else None
            tracestate = ",".join(states) if states else None
        token = self._context.attach(self._extract(traceparent, tracestate))
        try:
            yield
        finally:
            self._context.detach(token)

    def _extract(self, traceparent: str | None, tracestate: str | None) -> TraceContext:
        """The trace context named by W3C headers; an empty one (so a new trace) if absent or invalid."""
        empty = self._context.Context()
        if traceparent is None:
            return empty
        carrier = {"traceparent": traceparent}
        if tracestate is not None:
            carrier["tracestate"] = tracestate
        return self._propagator.extract(carrier, context=empty)


def transaction_ids(correlation_id: str) -> tuple[int, int]:
    """The trace id and root span id of a transaction that entered the bus without a ``traceparent``.

    The trace id is the correlation id itself when it is a UUID (as choreograph's ids are),
    else the first 128 bits of its SHA-256; the span id is the next 64 bits of that hash.
    """
    digest = hashlib.sha256(correlation_id.encode()).digest()
    try:
        trace_id = uuid.UUID(correlation_id).int
    except ValueError:
        trace_id = int.from_bytes(digest[:16], "big")
    return trace_id or 1, int.from_bytes(digest[16:24], "big") or 1


def configure_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> SDKTracerProvider | None:
    """Set up the OpenTelemetry SDK as the global tracer provider, from the standard ``OTEL_*`` variables.

    What ``choreograph run --otel`` calls. Returns the provider (shut it down to flush), or
    ``None`` when there is nothing to set up: ``OTEL_SDK_DISABLED=true``, or a provider is
    already installed (``opentelemetry-instrument``, or the app's own code), which is kept.

    ``OTEL_SERVICE_NAME`` (default ``service_name``) names the resource; ``OTEL_TRACES_EXPORTER``
    picks the exporter: ``otlp`` (the default; needs ``opentelemetry-exporter-otlp``, configured
    by its own ``OTEL_EXPORTER_OTLP_*`` variables), ``console`` (JSON lines on stdout) or ``none``.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        raise ConfigurationError(f"--otel needs opentelemetry-sdk: {INSTALL_HINT}") from None
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name}))
    exporters = [name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if name.strip()]
    for name in exporters:
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(env)))
        elif name != "none":
            raise ConfigurationError(f"OTEL_TRACES_EXPORTER={name!r}: expected otlp, console or none")
    trace.set_tracer_provider(provider)
    return provider


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    kind = "grpc" if protocol == "grpc" else "http"
    try:
        module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{kind}.trace_exporter")
    except ImportError:
        raise ConfigurationError(
            "OTEL_TRACES_EXPORTER=otlp (the default) needs an OTLP exporter: pip install opentelemetry-exporter-otlp, "
            "or set OTEL_TRACES_EXPORTER=console or none"
        ) from None
    return module.OTLPSpanExporter()


def serve_metrics(port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> int:
    """Serve ``/metrics`` of ``registry`` (default: the global one) on a daemon thread; returns the port.

    ``port=0`` picks a free port (the one returned). What ``choreograph run --metrics-port`` calls.
    """
    try:
        from prometheus_client import REGISTRY, start_http_server
    except ImportError:
        raise ConfigurationError(f"--metrics-port needs prometheus-client: {INSTALL_HINT}") from None
    server, _ = start_http_server(port, addr=host, registry=registry or REGISTRY)
    return int(server.server_port)
