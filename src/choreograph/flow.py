"""The flow graph: what choreography hides, derived from the code.

Every handler declares what it consumes and what it may emit (return annotation or
``emits=``), so the flow of an :class:`~choreograph.App` can be drawn and checked
without running it::

    >>> graph = build(app)                                   # doctest: +SKIP
    >>> print(graph.to_mermaid())                            # doctest: +SKIP
    >>> [f.message for f in lint(graph)]                     # doctest: +SKIP

Nodes are services and event types. Edges are ``consumes`` (event type → service),
``emits`` (service → event type) and ``compensates`` (event type → service: a
failure handler for that type, a compensation triggered by it, or a subscription to
``choreograph.timedout``).

The graph is built from :class:`Step` records, one per handler and trigger, because
a service is too coarse for reasoning: a service that consumes A (emitting B) and C
(emitting D) must not make D look reachable from A. Handlers the runtime installs for
itself (join deadline timers, join failure fan-out) are left out, and so are the
``choreograph.*`` events they emit: they are plumbing, not business flow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

from choreograph.events import Event
from choreograph.joins import JoinSpec
from choreograph.sagas import TIMEDOUT
from choreograph.service import App, Handler, Service

__all__ = ["Edge", "EventNode", "FlowGraph", "Finding", "Step", "build", "lint"]

Via = Literal["event", "failure", "timeout", "step"]
"""How a step is triggered: an event of the type, the runtime's failure of an event of the
type, the journal's ``choreograph.timedout``, or (``step``) a compensation remembering the
step it may have to undo."""

Role = Literal["handler", "join", "compensation"]
EdgeKind = Literal["consumes", "emits", "compensates"]

RUNTIME_PREFIX = "choreograph."


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One handler of one service, for one trigger.

    ``requires`` is what must have happened in the transaction for the handler to run:
    one group per join slot, each satisfied by any one of its ``(type, via)`` routes
    (an ordinary handler has one group of one route: its own trigger).
    """

    service: str
    handler: str
    trigger: str
    via: Via
    role: Role
    emits: tuple[str, ...]
    requires: tuple[tuple[tuple[str, Via], ...], ...]
    where: str | None = None  # the handler's CESQL filter: it runs only for matching events

    @property
    def can_give_up(self) -> bool:
        """Whether the runtime may announce ``failed(trigger)`` for it (every business handler can)."""
        return self.via == "event" and self.role != "compensation"


@dataclasses.dataclass(frozen=True, slots=True)
class EventNode:
    """An event type in the flow, with what the App says about it."""

    type: str
    name: str | None  # the Event class name, if known in this process
    ingress: bool = False
    terminal: Literal["completed", "failed"] | None = None

    @property
    def runtime(self) -> bool:
        """Published by choreograph itself (``choreograph.timedout``), not by a service."""
        return self.type.startswith(RUNTIME_PREFIX)


@dataclasses.dataclass(frozen=True, slots=True)
class Edge:
    """A drawn edge. ``trigger`` says why a ``compensates`` edge fires: ``failure``, ``timeout``
    or ``event`` (a compensation triggered by a business event)."""

    source: str
    target: str
    kind: EdgeKind
    handlers: tuple[str, ...]
    trigger: Literal["event", "failure", "timeout"] | None = None

    @property
    def label(self) -> str:
        return {"failure": "failed", "timeout": "timed out", "event": "compensate", None: ""}[self.trigger]


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One lint result. ``subjects`` names the event types and services involved."""

    code: str
    severity: Literal["error", "warning", "info"]
    message: str
    subjects: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "subjects": list(self.subjects),
        }


def service_id(name: str) -> str:
    return f"service:{name}"


def event_id(type_: str) -> str:
    return f"event:{type_}"


@dataclasses.dataclass(slots=True)
class FlowGraph:
    """The flow of a set of services. ``app`` is ``False`` when built from a bare list of
    services: then nothing is known about ingress and terminal events."""

    name: str
    services: list[str]
    events: dict[str, EventNode]
    steps: list[Step]
    classes: dict[str, type[Event]]
    app: bool = True

    @property
    def edges(self) -> list[Edge]:
        """The drawn edges, merged per (source, target, kind, trigger), in a stable order."""
        merged: dict[tuple[str, str, EdgeKind, str | None], list[str]] = {}
        for step in self.steps:
            svc = service_id(step.service)
            if step.via != "step":
                kind: EdgeKind = (
                    "consumes" if step.via == "event" and step.role != "compensation" else "compensates"
                )
                trigger = None if kind == "consumes" else ("event" if step.via == "event" else step.via)
                merged.setdefault((event_id(step.trigger), svc, kind, trigger), []).append(step.handler)
            for out in step.emits:
                merged.setdefault((svc, event_id(out), "emits", None), []).append(step.handler)
        return [
            Edge(source, target, kind, tuple(dict.fromkeys(handlers)), trigger)  # type: ignore[arg-type]
            for (source, target, kind, trigger), handlers in merged.items()
        ]

    def consumers(self, type_: str) -> list[Step]:
        """Steps that receive events of ``type_`` (as trigger, join slot or remembered step)."""
        return [s for s in self.steps if s.trigger == type_ and s.via in ("event", "step", "timeout")]

    def producers(self, type_: str) -> list[Step]:
        return [s for s in self.steps if type_ in s.emits]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: nodes, edges and the steps they come from."""
        from choreograph._flow_render import to_dict

        return to_dict(self)

    def to_json(self) -> str:
        from choreograph._flow_render import to_json

        return to_json(self)

    def to_mermaid(self) -> str:
        from choreograph._flow_render import to_mermaid

        return to_mermaid(self)

    def to_dot(self) -> str:
        from choreograph._flow_render import to_dot

        return to_dot(self)


def _route_via(type_: str, failure: bool) -> Via:
    if failure:
        return "failure"
    return "timeout" if type_ == TIMEDOUT else "event"


def _step_of(handler: Handler) -> Step | None:
    """The step of one registered handler, or ``None`` for the runtime's own handlers."""
    emits = tuple(sorted({c.event_type() for c in handler.emits} - {""}))
    emits = tuple(t for t in emits if not t.startswith(RUNTIME_PREFIX))
    trigger = handler.consumes.event_type()
    failure = handler.kind == "failure"
    if handler.join is None:
        via = _route_via(trigger, failure)
        where = handler.where.source if handler.where is not None else None
        return Step(handler.service, handler.name, trigger, via, "handler", emits, (((trigger, via),),), where)
    spec = handler.join
    if not isinstance(spec, JoinSpec):
        return None  # deadline timers, failure fan-out: runtime plumbing
    requires = tuple(
        tuple((route.cls.event_type(), _route_via(route.cls.event_type(), route.failure)) for route in routes)
        for routes in spec.slots
    )
    via = _route_via(trigger, failure)
    if spec.kind == "compensation":
        step_type = spec.slots[0][0].cls.event_type()
        if trigger == step_type and not failure:
            via = "step"
        return Step(handler.service, handler.name, trigger, via, "compensation", emits, requires)
    return Step(handler.service, handler.name, trigger, via, "join", emits, requires)


def build(target: App | Service | Iterable[Service], *, name: str | None = None) -> FlowGraph:
    """The flow graph of an App (or of a list of services: then ingress and terminal are unknown)."""
    if isinstance(target, App):
        services, app = list(target.services), target
    elif isinstance(target, Service):
        services, app = [target], None
    else:
        services, app = list(target), None
    steps = [step for svc in services for h in svc.all_handlers() if (step := _step_of(h)) is not None]
    classes: dict[str, type[Event]] = {}
    for svc in services:
        for h in svc.all_handlers():
            if h.join is None or isinstance(h.join, JoinSpec):
                for cls in (h.consumes, *h.emits):
                    classes.setdefault(cls.event_type(), cls)
    ingress = {cls.event_type(): cls for cls in app.ingress} if app else {}
    terminal = {cls.event_type(): kind for cls, kind in app.terminal.items()} if app else {}
    if app:
        classes.update(ingress)
        classes.update({cls.event_type(): cls for cls in app.terminal})
    types_ = {s.trigger for s in steps} | {t for s in steps for t in s.emits} | set(ingress) | set(terminal)
    events = {
        t: EventNode(t, classes[t].__name__ if t in classes else None, t in ingress, terminal.get(t))
        for t in sorted(types_)
    }
    return FlowGraph(
        name=name or (app.name if app else "services"),
        services=[s.name for s in services],
        events=events,
        steps=steps,
        classes={t: c for t, c in sorted(classes.items()) if t in events},
        app=app is not None,
    )


def lint(graph: FlowGraph | App | Iterable[Service]) -> list[Finding]:
    """Check a flow: see :mod:`choreograph._flow_lint` for the rules."""
    from choreograph._flow_lint import lint as run

    return run(graph if isinstance(graph, FlowGraph) else build(graph))
