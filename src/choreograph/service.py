"""Services own one business step: they declare what they consume and what they emit.

>>> payments = Service("payment")
>>> @payments.on(OrderPlaced, retry=RetryPolicy(max_attempts=3))   # doctest: +SKIP
... async def capture(order: OrderPlaced) -> PaymentCaptured | PaymentDeclined:
...     ...

A handler receives the typed event (and, if it takes a second parameter, the
:class:`~choreograph.context.Context`) and returns ``None``, one event, or a list of
events. The return annotation (or ``emits=``) declares the event types it may emit:
that declaration is both a runtime check and what the flow graph is drawn from.

``@service.on_failure(X)`` subscribes to the runtime's ``choreograph.failed`` events
for events of type ``X``: the way to wire a compensation with no orchestrator.

``where="<CESQL>"`` on either narrows a handler to the events whose CloudEvents
attributes match (CESQL: :mod:`choreograph.cesql`); the others are acked unhandled.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

from choreograph import cesql
from choreograph._envelope import Envelope, attribute_problem, id_suffix
from choreograph._where import compile_where, matcher
from choreograph.errors import ConfigurationError
from choreograph.events import Event, is_event_class
from choreograph.policy import DEFAULT_RETRY, RetryPolicy

if typing.TYPE_CHECKING:
    from choreograph.joins import JoinRunner, Route

FAILED = "choreograph.failed"
"""The type of the failure event the runtime publishes when it gives up on an event."""

HandlerKind = Literal["event", "failure"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """What an ``on_failure`` handler receives: the event that failed and why.

    ``event`` is the original event parsed into its class (``None`` if it could not
    be); ``envelope`` is the original envelope untouched; ``record`` the dead-letter
    record (reason, attempts, first and last error, ...).
    """

    event: Event | None
    envelope: Envelope
    record: dict[str, Any]

    @property
    def reason(self) -> str:
        return str(self.record.get("reason", ""))


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    """One registered handler: what it consumes, emits, and how it is retried."""

    service: str
    name: str
    kind: HandlerKind
    consumes: type[Event]
    func: Callable[..., Awaitable[Any]]
    emits: frozenset[type[Event]]
    retry: RetryPolicy
    timeout: float
    takes_context: bool
    join: JoinRunner | None = None  # joins and compensations: the worker calls join.run(...), not func
    where: cesql.Expression | None = None  # its CESQL filter, as written (for the flow graph)
    accepts: Callable[[Envelope], bool] | None = None  # the filter as the worker applies it (see _where)
    #: ``id_suffix(service, name, 0)``: what derives the id of its first output from the input's
    id_suffix0: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id_suffix0", id_suffix(self.service, self.name, 0))

    def id_suffix(self, index: int) -> bytes:
        """``id_suffix(service, name, index)``: see :func:`~choreograph._envelope.derive_id_with`."""
        return self.id_suffix0 if index == 0 else id_suffix(self.service, self.name, index)

    @property
    def subscription(self) -> str:
        """The CloudEvents type this handler's service must subscribe to."""
        return FAILED if self.kind == "failure" else self.consumes.event_type()

    def may_emit(self, event_type: str) -> bool:
        return any(cls.event_type() == event_type for cls in self.emits)


def _event_classes(annotation: Any) -> Iterable[type[Event]]:
    """Event classes named in a return annotation: ``A``, ``A | B``, ``list[A]``, ``Optional[A]``..."""
    if annotation is None or annotation is type(None):
        return
    if isinstance(annotation, type) and issubclass(annotation, Event):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) or origin in (list, tuple, typing.Sequence, Iterable) or (
        origin is not None and getattr(origin, "__module__", "") == "collections.abc"
    ):
        for arg in typing.get_args(annotation):
            if arg is not Ellipsis:
                yield from _event_classes(arg)
        return
    raise ConfigurationError(f"return annotation {annotation!r}: expected Event subclasses, a union or a list of them")


def declared_emits(func: Callable[..., Any], emits: Iterable[type[Event]] | None) -> frozenset[type[Event]]:
    """The event classes ``func`` may emit: ``emits=`` if given, else its return annotation.

    ``emits=`` replaces the annotation, so it must cover every event class the annotation
    names (it may add more: the events the handler publishes with ``ctx.publish``). A
    handler annotated ``-> Shipped`` with ``emits=[Delayed]`` would fail every attempt
    that returns a ``Shipped``, and the flow would not show it: refused here instead. An
    annotation that cannot be resolved, or names no Event class, is not checked.
    """
    if emits is not None:
        classes = frozenset(emits)
        for cls in classes:
            if not is_event_class(cls):
                raise ConfigurationError(f"{func.__qualname__}: emits= must list Event subclasses, got {cls!r}")
        try:
            # Event itself may be named here (e.g. ``-> Event | None``): emits= names the types,
            # and the annotation's classes must still be covered by it
            annotated = _annotated_classes(func)
        except Exception:  # noqa: BLE001 - emits= is there for annotations we cannot read
            return classes
        missing = sorted(
            cls.__qualname__ for cls in annotated if not any(issubclass(listed, cls) for listed in classes)
        )
        if missing:
            raise ConfigurationError(
                f"{func.__qualname__}: its return annotation names {', '.join(missing)}, which emits= does not list; "
                "emits= replaces the annotation, so list every event the handler may return or publish"
            )
        return classes
    try:
        return _annotated_emits(func)
    except ConfigurationError:
        raise
    except Exception as exc:  # unresolvable forward references
        raise ConfigurationError(
            f"{func.__qualname__}: cannot resolve its return annotation ({exc}); pass emits=[...] instead"
        ) from exc


def _annotated_classes(func: Callable[..., Any]) -> frozenset[type[Event]]:
    """The Event classes ``func``'s return annotation names (none without one), ``Event`` itself included."""
    closure = dict(zip(func.__code__.co_freevars, (c.cell_contents for c in func.__closure__ or ()), strict=False))
    hints = typing.get_type_hints(func, localns=closure)
    if "return" not in hints:
        return frozenset()
    # `async def f() -> X` annotates X (the awaited value), which is what we want.
    return frozenset(_event_classes(hints["return"]))


def _annotated_emits(func: Callable[..., Any]) -> frozenset[type[Event]]:
    """The event classes ``func``'s return annotation names (none without one); Event itself refused."""
    classes = _annotated_classes(func)
    if Event in classes:
        raise ConfigurationError(
            f"{func.__qualname__}: its return annotation names Event itself, which has no type: it declares no "
            "event, and every one returned would be refused; name the Event subclasses it returns, or list "
            "them in emits=[...]"
        )
    return classes


class Service:
    """A named service: one consumer group on the bus, a set of handlers.

    ``retry`` and ``timeout`` are the defaults for its handlers; each ``on()`` can
    override them. ``database`` (``sqlite:///var/pkg.db`` or ``postgresql://...``) gives
    the service its own state store: ``ctx.transaction()`` then commits state, inbox
    record and emitted events atomically (see :mod:`choreograph.runtime.outbox`).
    """

    def __init__(
        self,
        name: str,
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: float = 30.0,
        source: str | None = None,
        database: str | None = None,
    ) -> None:
        if not _NAME.match(name):
            raise ConfigurationError(
                f"Service name {name!r}: use 1-100 letters, digits, '_', '-', '.', starting with a letter or digit"
            )
        if not timeout > 0:  # nan too: a nan timeout would never fire
            raise ConfigurationError(f"Service {name!r}: timeout must be > 0 seconds, got {timeout!r}")
        self.name = name
        self.retry = retry
        self.timeout = timeout
        self.source = source or f"/choreograph/{name}"
        problem = attribute_problem("source", self.source)
        if problem is not None:  # every event the service emits carries it: refused here, once
            raise ConfigurationError(f"Service {name!r}: {problem}")
        if database is not None:
            from choreograph.stores.state import check_database_url

            check_database_url(database)
        self.database = database
        self.handlers: dict[str, Handler] = {}  # consumed event type -> handler
        self.failure_handlers: dict[str, Handler] = {}  # failed event type -> handler

    def __repr__(self) -> str:
        return f"<Service {self.name!r} consumes={sorted(self.subscriptions)}>"

    @property
    def group(self) -> str:
        """The consumer group on the bus: the service name (replicas compete within it)."""
        return self.name

    @property
    def subscriptions(self) -> frozenset[str]:
        types_ = set(self.handlers)
        if self.failure_handlers:
            types_.add(FAILED)
        return frozenset(types_)

    def all_handlers(self) -> list[Handler]:
        return [*self.handlers.values(), *self.failure_handlers.values()]

    def on(
        self,
        event: type[Event],
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        emits: Iterable[type[Event]] | None = None,
        where: str | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register the decorated async function as this service's handler of ``event``.

        ``where`` is a CESQL filter on the event's CloudEvents attributes (``subject``,
        ``source``, ``hops``, ``correlationid``, any extension...), compiled here: an event
        that does not match is acked without running the handler (not retried, not
        dead-lettered), before its payload is validated.

        >>> @eu.on(OrderPlaced, where="subject LIKE 'eu-%' AND hops < 5")   # doctest: +SKIP
        """
        return self._register("event", event, retry, timeout, emits, where)

    def on_failure(
        self,
        event: type[Event],
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        emits: Iterable[type[Event]] | None = None,
        where: str | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register a handler of the runtime's failure events for events of type ``event``.

        It receives a :class:`Failure`: the way to compensate a step whose successor
        gave up, even when that successor cannot announce its own failure. ``where``
        filters as in :meth:`on`, on the attributes of the event that failed
        (``Failure.envelope``), so one expression means the same thing in both.
        """
        return self._register("failure", event, retry, timeout, emits, where)

    def on_all(
        self,
        *events: type[Event] | Route,
        within: float | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        emits: Iterable[type[Event]] | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register a join: run once per correlation id when all of ``events`` have arrived.

        The function takes the events in this order (then, optionally, the context).
        ``within=seconds`` (from the first arrival) announces a ``join_timeout``
        failure of each arrived event if the rest do not come. See :mod:`choreograph.joins`.
        """
        from choreograph.joins import as_route, install

        slots = [[as_route(event, self.name)] for event in events]
        if len(slots) < 2:
            raise ConfigurationError(f"Service {self.name!r}: on_all() joins two or more events; use on() for one")

        def decorator(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            install(self, func, slots, kind="join", within=within, retry=retry, timeout=timeout, emits=emits)
            return func

        return decorator

    def compensate(
        self,
        step: type[Event],
        *,
        on: Iterable[type[Event] | Route],
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        emits: Iterable[type[Event]] | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register the undo of ``step`` (an event this service emits), run when one of ``on`` happens.

        ``on`` lists business events (``PaymentDeclined``), runtime failures
        (``failed(StockReserved)``) and ``timed_out()``. The function receives the
        step event and the trigger. See :mod:`choreograph.sagas`.
        """
        from choreograph.sagas import install_compensation

        def decorator(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            install_compensation(self, func, step, on, retry=retry, timeout=timeout, emits=emits)
            return func

        return decorator

    def _register(
        self,
        kind: HandlerKind,
        event: type[Event],
        retry: RetryPolicy | None,
        timeout: float | None,
        emits: Iterable[type[Event]] | None,
        where: str | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        if not is_event_class(event):
            raise ConfigurationError(f"Service {self.name!r}: on({event!r}): expected an Event subclass")
        if timeout is not None and not timeout > 0:  # nan too
            raise ConfigurationError(f"Service {self.name!r}: timeout must be > 0 seconds, got {timeout!r}")

        def decorator(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            if not inspect.iscoroutinefunction(func):
                raise ConfigurationError(f"{func.__qualname__}: handlers must be `async def` functions")
            params = [
                p for p in inspect.signature(func).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            if not 1 <= len(params) <= 2:
                raise ConfigurationError(f"{func.__qualname__}: a handler takes (event) or (event, ctx)")
            table = self.handlers if kind == "event" else self.failure_handlers
            key = event.event_type()
            adopt = None
            if kind == "failure" and key in table:
                from choreograph.joins import adopter

                adopt = adopter(table[key])  # the fan-out of failed(X) joins runs it (choreograph.failed)
            if key in table and adopt is None:
                raise ConfigurationError(
                    f"Service {self.name!r} already has {'an event' if kind == 'event' else 'a failure'} handler for {key!r} "
                    f"({table[key].name}); use another Service for a second step "
                    "(where= filters a handler's events, it does not allow a second handler)"
                )
            expression = None if where is None else compile_where(where, self.name, func)
            handler = Handler(
                service=self.name,
                name=func.__qualname__,
                kind=kind,
                consumes=event,
                func=func,
                emits=declared_emits(func, emits),
                retry=retry or self.retry,
                timeout=timeout or self.timeout,
                takes_context=len(params) == 2,
                where=expression,
                accepts=None if expression is None else matcher(expression, func.__qualname__),
            )
            table[key] = handler if adopt is None else adopt(handler)
            return func

        return decorator


class App:
    """A manifest of services, for tooling (run, dev, graph, lint). It never routes events.

    ``terminal`` maps event types that end a transaction to ``"completed"`` or ``"failed"``.
    """

    def __init__(
        self,
        name: str,
        services: Iterable[Service],
        *,
        ingress: Iterable[type[Event]] = (),
        terminal: dict[type[Event], Literal["completed", "failed"]] | None = None,
    ) -> None:
        self.name = name
        self.services = list(services)
        names = [s.name for s in self.services]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ConfigurationError(f"App {name!r}: duplicate service names {sorted(duplicates)}")
        self.ingress = list(ingress)
        self.terminal = dict(terminal or {})

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise ConfigurationError(f"App {self.name!r} has no service {name!r}; it has {[s.name for s in self.services]}")
