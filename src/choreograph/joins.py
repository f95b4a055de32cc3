"""Joins: run a handler once per transaction when *all* of several events have arrived.

>>> @shipping.on_all(PaymentCaptured, StockReserved, within=60)     # doctest: +SKIP
... async def ship(paid: PaymentCaptured, reserved: StockReserved) -> OrderShipped:
...     ...

How it works, and why:

* A join registers an ordinary handler for each of its event types (so a service
  still has one handler per event type). Each arrival is recorded in the worker's
  :class:`~choreograph.stores.joins_base.JoinStore` under ``(service, join,
  correlation id)``; the store decides atomically which arrival *completes* the
  join, and only that delivery runs the function, with every event as an argument
  in declared order (plus the context if the function takes one more parameter).
  Arrival order does not matter; a duplicate (same id, or a second event of a type
  already stored) never fires it again; a redelivery of the completing event after a
  crash or a failed attempt runs it again, with the same deterministic output ids.
  A service with a database keeps its joins *there*, and records each arrival in
  the handler's own transaction (:mod:`choreograph.stores.joins_database`): the
  arrival, the function's state changes, the inbox record and the outputs commit
  together or not at all. There the completing arrival is recorded again *after* the
  function ran (the first record is rolled back before it runs, so the function holds
  no lock), and the run is retried if the join changed meanwhile.
* ``within=seconds`` starts a deadline at the first arrival. The timer is an
  event on the bus (``choreograph.join.deadline``) that the first arrival emits to
  its own service and that the worker redelivers until it is due (:class:`Defer`):
  it is as durable as any event, survives restarts, and a virtual clock
  fast-forwards it. If the join has not fired by then it never will, and one
  ``choreograph.failed`` event per arrived event is published with the record
  reason ``join_timeout`` (``missing`` / ``arrived`` name the types), so each
  upstream step's ``failed(X)`` compensation sees its own event. (Not for the arrival of
  a ``failed(X)`` slot, here and below: it is the runtime's failure of ``X``, announced
  already; announced again, it would be a compensation's give-up where none gave up.)
* When the join's handler gives up, the runtime announces the failure of the
  completing event; the join adds the same announcement for each other arrival
  (one extra hop), again so every upstream step can compensate from its own data.
  If a ``failed(X)`` arrival completed it, that announcement is the failure of a
  ``choreograph.failed`` event: one failure handler of that type per service
  (:class:`_FailureFanOuts`) hands it to the join it names.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import orjson
import pydantic

from choreograph._envelope import Envelope, decode, encode, from_dict
from choreograph.errors import ConfigurationError, Retry
from choreograph.events import Event, is_event_class
from choreograph.policy import RetryPolicy
from choreograph.service import FAILED, Failure, Handler, Service, declared_emits
from choreograph.stores import joins_database
from choreograph.stores.joins_base import Arrival, JoinKey, JoinState, JoinStore

if TYPE_CHECKING:
    from choreograph._clock import Clock
    from choreograph.context import Context

DEADLINE = "choreograph.join.deadline"
"""The type of the timer event a join with ``within=`` sends to its own service."""

MAX_DEFER = 3600.0
"""Longest single redelivery delay of a timer; a later deadline is re-deferred (brokers cap delays)."""

JoinKind = Literal["join", "compensation"]


class Defer(Exception):
    """Raised by a runtime-owned handler whose event is not due yet: deliver it again in ``after`` s.

    Not a failure, nor an attempt: the worker settles it with ``Delivery.defer(after)``
    (the attempt unchanged) without recording an error or consulting the retry policy. A
    retry counted an attempt per hop, and a timer re-deferred for hours was dead-lettered
    ``max_attempts`` on the first failure of its time-out. (NATS counts the hops all the
    same: its attempt is JetStream's delivery count.)
    """

    def __init__(self, after: float) -> None:
        super().__init__(f"not due for {after:.3f}s")
        self.after = max(0.0, after)


class JoinDeadline(Event):
    """The timer of one join instance: due at ``due`` (epoch seconds)."""

    __event_type__: ClassVar[str] = DEADLINE
    service: str
    join: str
    correlation_id: str
    due: float


class Failed(Event):
    """A ``choreograph.failed`` event emitted by a handler (join timeouts, join failure fan-out).

    Same shape as the runtime's own failure events: the failed event's type, its
    original envelope, and a record (``reason``, ``service``, ``handler``, ...).
    """

    __event_type__: ClassVar[str] = FAILED
    type: str
    envelope: dict[str, Any]
    record: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """What fills a slot of a join: events of ``cls``, or (``failure``) the runtime's failure of one."""

    cls: type[Event]
    failure: bool = False

    @property
    def key(self) -> str:
        return f"{FAILED}:{self.cls.event_type()}" if self.failure else self.cls.event_type()

    def __str__(self) -> str:
        return f"failed({self.cls.__name__})" if self.failure else self.cls.__name__


def as_route(value: type[Event] | Route, service: str) -> Route:
    """An Event class or a :class:`Route` (``failed(X)``) as a route; anything else is a mistake."""
    if isinstance(value, Route):
        return value
    if is_event_class(value):
        return Route(value)
    raise ConfigurationError(f"Service {service!r}: expected an Event subclass or failed(...), got {value!r}")


def route_key(envelope: Envelope) -> str:
    """The route an envelope arrives on: its type, or ``choreograph.failed:<failed type>``."""
    if envelope.type == FAILED and isinstance(envelope.data, dict):
        return f"{FAILED}:{envelope.data.get('type')}"
    return envelope.type


class JoinRunner(Protocol):
    """What the worker calls instead of ``handler.func`` for joins and their helpers."""

    async def run(self, argument: Any, ctx: Context, store: JoinStore, clock: Clock) -> Any: ...


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JoinSpec:
    """One join of a service: its slots (each filled by any one of its routes) and its function."""

    def __init__(
        self,
        service: str,
        name: str,
        slots: Sequence[Sequence[Route]],
        func: Callable[..., Awaitable[Any]],
        *,
        takes_context: bool,
        within: float | None,
        kind: JoinKind,
    ) -> None:
        self.service = service
        self.name = name
        self.slots = [tuple(routes) for routes in slots]
        self.func = func
        self.takes_context = takes_context
        self.within = within
        self.kind = kind
        self._slot_of = {route.key: index for index, routes in enumerate(self.slots) for route in routes}
        self._route_of = {route.key: route for routes in self.slots for route in routes}

    def __repr__(self) -> str:
        slots = ", ".join(" | ".join(map(str, routes)) for routes in self.slots)
        return f"<{self.kind} {self.service}.{self.name} on all of ({slots})>"

    def key(self, correlation_id: str) -> JoinKey:
        return JoinKey(self.service, self.name, correlation_id)

    async def run(self, argument: Any, ctx: Context, store: JoinStore, clock: Clock) -> Any:
        envelope = ctx.envelope
        now = clock.time()
        store = await store_for(ctx, store, clock)
        key, slot = self.key(ctx.correlation_id), self._slot_of[route_key(envelope)]
        arrival = Arrival(envelope.id, encode(envelope))
        deadline = None if self.within is None else now + self.within
        state = await store.arrive(key, slot, arrival, slots=len(self.slots), now=now, deadline=deadline)
        if state.timed_out and state.fired_by != envelope.id:
            # Arrived after the deadline: the join never fires now, so this arrival's step must be
            # undone too. The timer announced the arrivals it saw; announce this one (a redelivered
            # early arrival is announced again: compensations run once per transaction anyway).
            return self.late_failure(orjson.loads(encode(envelope)), state, now)
        if state.fired_by != envelope.id:
            if state.created_by == envelope.id and state.deadline is not None and not state.timed_out:
                ctx.publish(JoinDeadline(service=self.service, join=self.name,
                                         correlation_id=ctx.correlation_id, due=state.deadline))
            return None
        args: list[Any] = [self._argument(state.arrivals[index]) for index in range(len(self.slots))]
        if self.takes_context:
            args.append(ctx)
        if not isinstance(store, joins_database.DatabaseJoins):
            return await self.func(*args)
        # In a service database: give up the lock this arrival's record holds (on SQLite the writer
        # turn of the whole file) while the function runs, then record it again in the transaction
        # of the function's own statements; if the join changed meanwhile, retry the run.
        await store.undo()
        result = await self.func(*args)
        again = await store.arrive(key, slot, arrival, slots=len(self.slots), now=now, deadline=deadline)
        if again.fired_by != envelope.id or _ids(again) != _ids(state):
            raise Retry(f"{self.name}: the join changed while its function ran (fired by {again.fired_by}, "
                        f"timed out: {again.timed_out}); its run is rolled back and tried again")
        return result

    def _argument(self, arrival: Arrival) -> Any:
        envelope = decode(arrival.body)
        route = self._route_of[route_key(envelope)]
        if not route.failure:
            return route.cls.model_validate(envelope.data)
        original = from_dict(envelope.data.get("envelope"))
        try:
            event: Event | None = route.cls.model_validate(original.data)
        except pydantic.ValidationError:
            event = None
        return Failure(event=event, envelope=original, record=dict(envelope.data.get("record") or {}))

    def late_failure(self, arrived: dict[str, Any], state: JoinState, now: float) -> list[Failed]:
        """The failure of an event that reached this join after its deadline had passed (none for
        the arrival of a ``failed(X)`` slot: it is the runtime's failure of ``X``, announced already)."""
        if arrived["type"] == FAILED:
            return []
        deadline = rfc3339(state.deadline) if state.deadline is not None else None
        record = {
            "reason": "join_timeout",
            "service": self.service,
            "handler": self.name,
            "group": self.service,
            "attempts": 0,
            "first_error": None,
            "last_error": {"type": "JoinTimeout", "traceback": "",
                           "message": f"{self.name}: {arrived['type']} arrived after the deadline {deadline}"},
            "first_attempt_at": now,
            "last_attempt_at": now,
            "deadline": deadline,
            "late": True,
        }
        return [Failed(type=arrived["type"], envelope=arrived, record=record)]

    def timeout_failures(self, state: JoinState, now: float) -> list[Failed]:
        """One failure event per arrived event of a join whose deadline passed.

        Not for the arrival of a ``failed(X)`` slot: it is the runtime's failure of ``X``, announced
        already (to ``X``'s step among others); announced again it was the failure of a
        ``choreograph.failed`` event, which says a compensation gave up (the journal's
        ``compensation_failed``, ``on_failure`` handlers of that type) where nothing did.
        """
        arrived = [orjson.loads(state.arrivals[i].body) for i in sorted(state.arrivals)]
        missing = [str(r) for i, routes in enumerate(self.slots) if i not in state.arrivals for r in routes]
        deadline = rfc3339(state.deadline) if state.deadline is not None else None
        record = {
            "reason": "join_timeout",
            "service": self.service,
            "handler": self.name,
            "group": self.service,
            "attempts": 0,
            "first_error": None,
            "last_error": {"type": "JoinTimeout", "traceback": "",
                           "message": f"{self.name}: still missing {missing} at the deadline {deadline}"},
            "first_attempt_at": state.created_at,
            "last_attempt_at": now,
            "deadline": deadline,
            "arrived": [env["type"] for env in arrived],
            "missing": missing,
        }
        return [Failed(type=env["type"], envelope=env, record=record) for env in arrived if env["type"] != FAILED]


class _Timers:
    """The handler of a service's join deadline timers (one per service, for all its joins)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.specs: dict[str, JoinSpec] = {}

    async def run(self, argument: Any, ctx: Context, store: JoinStore, clock: Clock) -> Any:
        timer: JoinDeadline = argument
        spec = self.specs.get(timer.join)
        if timer.service != self.service or spec is None:
            return None  # another service's timer (they share the type), or a join since removed
        remaining = timer.due - clock.time()
        if remaining > 0:
            raise Defer(min(remaining, MAX_DEFER))
        store = await store_for(ctx, store, clock)
        state = await store.time_out(spec.key(timer.correlation_id))
        if state is None or not state.timed_out:
            return None
        return spec.timeout_failures(state, clock.time())


class _FanOut:
    """Announces a given-up join's failure for every arrival, not just the one that completed it
    (but a ``failed(X)`` slot's: see :meth:`JoinSpec.timeout_failures`)."""

    def __init__(self, spec: JoinSpec) -> None:
        self.spec = spec

    async def run(self, argument: Any, ctx: Context, store: JoinStore, clock: Clock) -> Any:
        failure: Failure = argument
        record = failure.record
        spec = self.spec
        if record.get("service") != spec.service or record.get("handler") != spec.name:
            return None
        store = await store_for(ctx, store, clock)
        key, failed_id = spec.key(ctx.correlation_id), failure.envelope.id
        state = await store.get(key)
        if state is None:
            return None
        slot = spec._slot_of.get(route_key(failure.envelope))  # a failed(X) arrival: its route, not its type
        if (state.fired_by is None and not state.timed_out and slot is not None and slot not in state.arrivals
                and len(state.arrivals) == state.slots - 1):
            # In a service database the completing arrival was rolled back with the function that
            # gave up: record it now (it did complete the join), so nothing else fires it.
            arrival = Arrival(failed_id, encode(failure.envelope))
            state = await store.arrive(key, slot, arrival, slots=state.slots, now=clock.time(), deadline=None)
        if state.fired_by != failed_id:
            return None  # not the runtime's announcement for the completing arrival
        return [
            Failed(type=env["type"], envelope=env, record=record)
            for env in (orjson.loads(state.arrivals[i].body) for i in sorted(state.arrivals))
            if env["id"] != failed_id and env["type"] != FAILED
        ]


class _FailureFanOuts:
    """The fan-outs of a service's joins completed by one of their ``failed(X)`` slots (one per service).

    The runtime announces such a join's give-up as the failure of a ``choreograph.failed``
    event, which reaches the service's failure handler of that type, not of ``X``: this one
    handler, shared by every join of the service, hands it to the join the record names.
    If the service has its own ``on_failure`` handler of ``choreograph.failed`` (``handler``),
    it runs here too, on every such failure (its ``where=`` applied here, not before the
    fan-out), after the fan-out of a join's: one handler per event type, two jobs.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.fan_outs: dict[str, _FanOut] = {}
        self.handler = handler

    async def run(self, argument: Any, ctx: Context, store: JoinStore, clock: Clock) -> Any:
        failure: Failure = argument
        fan_out = self.fan_outs.get(str(failure.record.get("handler")))
        fanned: Any = None
        if failure.record.get("service") == ctx.service and fan_out is not None:
            fanned = await fan_out.run(argument, ctx, store, clock)
        own = self.handler
        if own is None or (own.accepts is not None and not own.accepts(failure.envelope)):
            return fanned
        result = await (own.func(failure, ctx) if own.takes_context else own.func(failure))
        if not fanned:
            return result  # as it returned it (the worker checks it)
        if result is None:
            return fanned
        return [*fanned, *(result if isinstance(result, (list, tuple)) else [result])]


def own_handler(handler: Handler) -> Handler | None:
    """The handler a user registered that ``handler`` is or carries; ``None`` for the runtime's own.

    A plain handler is its own; a join's or compensation's is ``None`` (see its
    :class:`JoinSpec`); the failure fan-out of a service's joins carries the service's own
    ``on_failure`` handler of ``choreograph.failed``, if it has one (:class:`_FailureFanOuts`).
    """
    if handler.join is None:
        return handler
    if isinstance(handler.join, _FailureFanOuts):
        return handler.join.handler
    return None


def compensated_failures(services: Iterable[Service]) -> set[str]:
    """The event types whose runtime failures some handler of ``services`` takes up: an
    ``on_failure`` handler, a ``failed(X)`` slot of a join or a compensation (what lint's
    ``uncompensated-failure`` counts). Not the runtime's fan-out of a join's give-up, registered
    under each slot's type (and ``choreograph.failed``): it only passes that give-up on to the
    other arrivals, and ignores every other failure of the type."""
    return {
        failed_type
        for service in services
        for failed_type, handler in service.failure_handlers.items()
        if own_handler(handler) is not None or isinstance(handler.join, JoinSpec)
    }


def with_failure_fan_outs(handler: Handler, fan_outs: _FailureFanOuts) -> Handler:
    """``handler`` (a service's own ``on_failure`` handler of ``choreograph.failed``) run by ``fan_outs``."""
    fan_outs.handler = handler
    return dataclasses.replace(handler, emits=handler.emits | {Failed}, accepts=None, join=fan_outs)


def adopter(registered: Handler) -> Callable[[Handler], Handler] | None:
    """How ``on_failure`` registers its handler where ``registered`` is: run by the failure fan-out
    of the service's joins if ``registered`` is that fan-out and runs no handler of the user's yet;
    ``None`` (a handler of that type already) otherwise."""
    fan_outs = registered.join
    if not isinstance(fan_outs, _FailureFanOuts) or fan_outs.handler is not None:
        return None
    return lambda handler: with_failure_fan_outs(handler, fan_outs)


def _ids(state: JoinState) -> dict[int, str]:
    return {slot: arrival.event_id for slot, arrival in state.arrivals.items()}


async def store_for(ctx: Context, store: JoinStore, clock: Clock) -> JoinStore:
    """Where a handler run records its joins: its service database if it has one, else the worker's store.

    In a service database the arrival commits with the handler's state, inbox record and
    outputs (:mod:`choreograph.stores.joins_database`): all or nothing. Old instances are
    dropped there by ``clock``, the worker's, which dates them (a virtual clock's instances
    are not weeks old by the wall clock).
    """
    unit = ctx._unit
    if unit is None:
        return store
    await joins_database.prepare(unit.store)
    joins = joins_database.DatabaseJoins(ctx.transaction, unit.store.url, undo=unit.rollback)
    await joins_database.expire_now(joins, unit.store.url, clock.time(), unit.when_ended)
    return joins


def _positional(func: Callable[..., Any]) -> int:
    return len([
        p for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ])


def install(
    service: Service,
    func: Callable[..., Awaitable[Any]],
    slots: Sequence[Sequence[Route]],
    *,
    kind: JoinKind,
    within: float | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    emits: Iterable[type[Event]] | None = None,
) -> JoinSpec:
    """Register ``func`` as a join of ``service`` over ``slots``; check everything first, then insert."""
    where = f"Service {service.name!r}: {func.__qualname__}"
    if not inspect.iscoroutinefunction(func):
        raise ConfigurationError(f"{func.__qualname__}: handlers must be `async def` functions")
    count = _positional(func)
    if count not in (len(slots), len(slots) + 1):
        raise ConfigurationError(
            f"{where} takes {count} positional parameters; expected one per joined slot "
            f"({len(slots)}), optionally followed by ctx"
        )
    if within is not None and not (within > 0 and math.isfinite(within)):  # nan, inf: a deadline JSON cannot carry
        raise ConfigurationError(f"{where}: within= must be a finite number of seconds > 0, got {within!r}")
    if timeout is not None and not timeout > 0:
        raise ConfigurationError(f"{where}: timeout must be > 0 seconds, got {timeout!r}")
    spec = JoinSpec(service.name, func.__qualname__, slots, func, takes_context=count == len(slots) + 1,
                    within=within, kind=kind)
    declared = set(declared_emits(func, emits))
    if within is not None:
        declared.update((JoinDeadline, Failed))  # the timer, and late arrivals announced as failed

    def handler(route: Route, name: str, runner: JoinRunner, outputs: Iterable[type[Event]]) -> Handler:
        return Handler(service=service.name, name=name, kind="failure" if route.failure else "event",
                       consumes=route.cls, func=func, emits=frozenset(outputs), retry=retry or service.retry,
                       timeout=timeout or service.timeout, takes_context=True, join=runner)

    new: list[tuple[dict[str, Handler], str, Handler]] = []
    for routes in slots:
        for route in routes:
            table = service.failure_handlers if route.failure else service.handlers
            new.append((table, route.cls.event_type(), handler(route, spec.name, spec, declared)))
    fan_outs = service.failure_handlers.get(FAILED)
    own_failed: Handler | None = None  # the service's own on_failure handler of choreograph.failed
    failure_slot = kind == "join" and any(route.failure for routes in slots for route in routes)
    if kind == "join":
        for routes in slots:
            for route in routes:
                if not route.failure:
                    fan = handler(Route(route.cls, failure=True), f"{spec.name}.failed", _FanOut(spec), [Failed])
                    new.append((service.failure_handlers, route.cls.event_type(), fan))
        if failure_slot and fan_outs is not None and fan_outs.join is None:
            own_failed, fan_outs = fan_outs, None  # it runs inside the fan-out's handler, not beside it
        if failure_slot and (fan_outs is None or not isinstance(fan_outs.join, _FailureFanOuts)):
            # completed by a failure arrival, the join's give-up is a failure of choreograph.failed
            fan_outs = handler(Route(Failed, failure=True), "join.failed", _FailureFanOuts(), [Failed])
            if own_failed is None:
                new.append((service.failure_handlers, FAILED, fan_outs))
    timers = service.handlers.get(DEADLINE)
    if within is not None and timers is None:
        timers = handler(Route(JoinDeadline), "join-deadline", _Timers(service.name), [Failed])
        new.append((service.handlers, DEADLINE, timers))

    seen: set[tuple[int, str]] = set()
    for table, key, _entry in new:
        kind_name = "failure" if table is service.failure_handlers else "event"
        if key in table or (id(table), key) in seen:
            holder = table[key].name if key in table else "another slot of this join"
            raise ConfigurationError(
                f"{where}: {service.name!r} already has a {kind_name} handler for {key!r} ({holder}); "
                "a service has one handler per event type: use another Service for this step"
            )
        seen.add((id(table), key))
    if any(s.name == spec.name for s in joins_of(service)):
        raise ConfigurationError(f"{where}: a join named {spec.name!r} already exists in this service")
    for table, key, entry in new:
        table[key] = entry
    if within is not None:
        assert timers is not None and isinstance(timers.join, _Timers)
        timers.join.specs[spec.name] = spec
    if failure_slot:
        assert fan_outs is not None and isinstance(fan_outs.join, _FailureFanOuts)
        fan_outs.join.fan_outs[spec.name] = _FanOut(spec)
        if own_failed is not None:
            service.failure_handlers[FAILED] = with_failure_fan_outs(own_failed, fan_outs.join)
    return spec


def joins_of(service: Service) -> list[JoinSpec]:
    """The joins and compensations of ``service`` (for tooling: graph, lint, docs)."""
    found: dict[str, JoinSpec] = {}
    for handler in service.all_handlers():
        if isinstance(handler.join, JoinSpec):
            found.setdefault(handler.join.name, handler.join)
    return list(found.values())
