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

Push subscriptions (``build(app, push=[...])``, ``choreograph graph --push push.toml``)
are nodes too: an HTTP subscriber consumes its types (the edge carries its filters) and
emits what its ``emits`` declares, so lint counts it like a service.

The graph is built from :class:`Step` records, one per handler and trigger, because
a service is too coarse for reasoning: a service that consumes A (emitting B) and C
(emitting D) must not make D look reachable from A. Handlers the runtime installs for
itself (join deadline timers, join failure fan-out) are left out, and so are the
``choreograph.*`` events they emit: they are plumbing, not business flow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from choreograph._redact import redact
from choreograph.errors import ConfigurationError
from choreograph.events import Event, is_event_class
from choreograph.joins import JoinSpec, own_handler
from choreograph.sagas import TIMEDOUT
from choreograph.service import App, Handler, Service

if TYPE_CHECKING:
    from choreograph.push import PushSubscription

__all__ = ["Edge", "EventNode", "FlowGraph", "Finding", "PushNode", "Step", "build", "lint"]

Via = Literal["event", "failure", "timeout", "step"]
"""How a step is triggered: an event of the type, the runtime's failure of an event of the
type, the journal's ``choreograph.timedout``, or (``step``) a compensation remembering the
step it may have to undo."""

Role = Literal["handler", "join", "compensation", "push"]
"""``push``: a push subscription delivering the trigger to an HTTP subscriber (``service`` is its group)."""
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
    where: str | None = None  # the handler's CESQL filter (a push subscription's filters): only matching events

    @property
    def can_give_up(self) -> bool:
        """Whether its giving up is a failure of ``trigger`` for the flow to compensate (every business
        handler's is). A compensation gives up too, but nothing compensates a compensation: lint
        says so apart (``compensation-can-fail``) rather than as a failure route."""
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
class PushNode:
    """A push subscription in the flow: an HTTP subscriber behind the push ambassador.

    ``url`` is the subscriber's URL without user info, query or fragment, and with a secret
    in its path masked as :func:`~choreograph._redact.redact` does (a Slack or Discord webhook's
    token): places a token may hide, and a drawing is often committed; ``emits`` is what it may answer with
    (``None``: undeclared, so nothing is drawn); ``filters`` the subscription's filter
    objects (spec JSON shape, ``where`` included as an ``sql`` one) and ``filter`` their
    one-line text.
    """

    name: str
    url: str
    types: tuple[str, ...]
    emits: tuple[str, ...] | None = None
    filters: tuple[dict[str, Any], ...] = ()
    filter: str | None = None

    @property
    def host(self) -> str:
        """Where it is delivered (``host:port`` of the URL): its label in drawings."""
        return urlsplit(self.url).netloc


@dataclasses.dataclass(frozen=True, slots=True)
class Edge:
    """A drawn edge. ``trigger`` says why a ``compensates`` edge fires: ``failure``, ``timeout``
    or ``event`` (a compensation triggered by a business event). ``filter``: what narrows the
    events an edge in delivers: the handler's ``where=`` (an ``on_failure`` handler's filters
    the failed event), or the filters of the push subscription it delivers to."""

    source: str
    target: str
    kind: EdgeKind
    handlers: tuple[str, ...]
    trigger: Literal["event", "failure", "timeout"] | None = None
    filter: str | None = None

    @property
    def label(self) -> str:
        kind = {"failure": "failed", "timeout": "timed out", "event": "compensate", None: ""}[self.trigger]
        if self.filter is None:
            return kind
        return f"{kind}: {self.filter}" if kind else self.filter


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


def push_id(name: str) -> str:
    return f"push:{name}"


def step_node(step: Step) -> str:
    """The node a step belongs to: its service, or its push subscription."""
    return push_id(step.service) if step.role == "push" else service_id(step.service)


@dataclasses.dataclass(slots=True)
class FlowGraph:
    """The flow of a set of services (and push subscriptions). ``app`` is ``False`` when built
    from a bare list of services: then nothing is known about ingress and terminal events."""

    name: str
    services: list[str]
    events: dict[str, EventNode]
    steps: list[Step]
    classes: dict[str, type[Event]]
    app: bool = True
    push: dict[str, PushNode] = dataclasses.field(default_factory=dict)
    #: each service's CloudEvents source (``Service(source=...)``): what the journal names it after
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def edges(self) -> list[Edge]:
        """The drawn edges, merged per (source, target, kind, trigger), in a stable order.

        An edge in carries the filter of what it feeds (a handler's ``where=``, a push
        subscription's filters) when every step merged into it has that one filter."""
        merged: dict[tuple[str, str, EdgeKind, str | None], list[str]] = {}
        filters: dict[tuple[str, str, EdgeKind, str | None], set[str | None]] = {}
        for step in self.steps:
            svc = step_node(step)
            if step.via != "step":
                kind: EdgeKind = (
                    "consumes" if step.via == "event" and step.role != "compensation" else "compensates"
                )
                trigger = None if kind == "consumes" else ("event" if step.via == "event" else step.via)
                key = (event_id(step.trigger), svc, kind, trigger)
                merged.setdefault(key, []).append(step.handler)
                filters.setdefault(key, set()).add(step.where)
            for out in step.emits:
                merged.setdefault((svc, event_id(out), "emits", None), []).append(step.handler)
        return [
            Edge(source, target, kind, tuple(dict.fromkeys(handlers)), trigger,  # type: ignore[arg-type]
                 _one(filters.get((source, target, kind, trigger), set())))
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


def _one(filters: set[str | None]) -> str | None:
    """The filter of an edge: the one its steps share (none if one of them takes everything)."""
    return next(iter(filters)) if len(filters) == 1 else None


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
    if handler.join is not None and (own := own_handler(handler)) is not None:
        return _step_of(own)  # the service's own handler, run by the runtime's (see joins.own_handler)
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


def _push_node(subscription: PushSubscription) -> PushNode:
    compiled = subscription.filter
    emits = None if subscription.emits is None else tuple(sorted(subscription.emits))
    parts = urlsplit(subscription.url)
    url = redact(urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", "")))
    return PushNode(
        subscription.group, url, tuple(sorted(subscription.types)), emits,
        tuple(compiled.source) if compiled is not None else (), compiled.text if compiled is not None else None,
    )


def _push_steps(node: PushNode) -> list[Step]:
    """One step per type a push subscription delivers: it consumes the type and may emit its ``emits``
    (and, like any consumer, give up on it: the ambassador publishes ``choreograph.failed``)."""
    emits = tuple(t for t in node.emits or () if not t.startswith(RUNTIME_PREFIX))
    return [
        Step(node.name, "push", type_, via, "push", emits, (((type_, via),),), node.filter)
        for type_ in node.types
        for via in [_route_via(type_, False)]
    ]


def build(
    target: App | Service | Iterable[Service],
    *,
    name: str | None = None,
    push: Iterable[PushSubscription] = (),
) -> FlowGraph:
    """The flow graph of an App (or of a list of services: then ingress and terminal are unknown),
    with the HTTP subscribers of ``push`` subscriptions (e.g. ``load_config(path).subscriptions``)."""
    if isinstance(target, App):
        services, app = list(target.services), target
    elif isinstance(target, Service):
        services, app = [target], None
    else:
        services, app = list(target), None
        names = [s.name for s in services]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            # as App and Worker refuse them: drawn twice, one node would be left without its edges
            raise ConfigurationError(
                f"services: {twice} given more than once; a service's name is its consumer group, "
                "so give each service once and each its own name"
            )
    steps = [step for svc in services for h in svc.all_handlers() if (step := _step_of(h)) is not None]
    pushed: dict[str, PushNode] = {}
    for subscription in push:
        if subscription.group in pushed:
            raise ConfigurationError(
                f"push subscription {subscription.group!r} is given twice: two ambassadors delivering as one "
                "consumer group would share its events"
            )
        pushed[subscription.group] = _push_node(subscription)
        steps += _push_steps(pushed[subscription.group])
    classes: dict[str, type[Event]] = {}
    for svc in services:
        for h in svc.all_handlers():
            if own_handler(h) is not None or isinstance(h.join, JoinSpec):
                for cls in (h.consumes, *h.emits):
                    classes.setdefault(cls.event_type(), cls)
    ingress, terminal = _manifest(app) if app else ({}, {})
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
        push=pushed,
        sources={s.name: s.source for s in services},
    )


def _manifest(app: App) -> tuple[dict[str, type[Event]], dict[str, Literal["completed", "failed"]]]:
    """The App's ingress and terminal event types, checked as the journal checks its terminal ones: a
    kind that is neither ``completed`` nor ``failed`` would be drawn and linted as an end the journal
    refuses, and an entry that is not an Event class has no type to draw."""
    def event_type(entry: Any, where: str) -> str:
        if not is_event_class(entry):
            raise ConfigurationError(f"App {app.name!r}: {where}: expected an Event subclass, got {entry!r}")
        return entry.event_type()

    ingress = {event_type(cls, f"ingress[{index}]"): cls for index, cls in enumerate(app.ingress)}
    terminal: dict[str, Literal["completed", "failed"]] = {}
    for cls, kind in app.terminal.items():
        type_ = event_type(cls, "terminal")
        if kind not in ("completed", "failed"):
            raise ConfigurationError(
                f"App {app.name!r}: terminal[{cls.__name__}]: must be 'completed' or 'failed', not {kind!r}"
            )
        terminal[type_] = kind
    return ingress, terminal


def lint(graph: FlowGraph | App | Iterable[Service]) -> list[Finding]:
    """Check a flow: see :mod:`choreograph._flow_lint` for the rules."""
    from choreograph._flow_lint import lint as run

    return run(graph if isinstance(graph, FlowGraph) else build(graph))
