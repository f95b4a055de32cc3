"""Checking a flow before it runs (``choreograph lint``).

Rules, and why each has its severity:

* ``unproduced`` (error): a handler waits for an event type no service emits and the App
  does not list as ingress. It can never run: a missing producer or a typo'd type.
* ``cycle`` (error): an event can cause itself. Choreography has no one to stop it; the
  runtime's hops guard dead-letters it eventually (``loop_detected``), after the damage.
  Loops through a join or a compensation are not cycles: each runs at most once per
  transaction, so such a loop (a reassignment after a failed step) goes round once.
* ``cannot-terminate`` (error): from an ingress event no terminal event is reachable,
  on any path (business outcomes, failures and compensations, timeouts included), so
  the journal can never see such a transaction end. ``no-terminal`` when the App
  declares no terminal event at all. Only ingress events that *start* transactions
  (some ordinary handler consumes them) are checked; an ingress event a join or a
  compensation waits for (a customer's cancellation, a courier's scan) *joins* a
  running transaction, so it is taken as available in every transaction. Also when an
  ordinary handler consumes it too (an audit log, a notification): it is then checked as a
  starter only if every join and compensation waiting for it can fire in the transaction it
  starts (if one cannot, it comes into a transaction that has the rest).
* ``unconsumed`` (warning): an event type is emitted (or is ingress) but nobody
  consumes it and it is not terminal: a dead end in the flow, or a consumer that lives
  elsewhere (another language behind a push subscription: give its config with
  ``--push`` and it counts as a consumer; its filters are not taken into account).
* ``unproduced-terminal`` (warning): a terminal event that no service (nor push subscriber)
  emits and that is not ingress: no transaction can end with it, so the journal never marks
  one ``completed`` (or ``failed``) that way. A class renamed, or the wrong one named in
  ``App(terminal=...)``; ``cannot-terminate`` says so only when no terminal event at all is
  reachable. A warning: a subscriber left out of ``--push`` may emit it.
* ``shared-group`` (error): a push subscription delivers as the consumer group of a
  service: the two would compete for the group's events, each getting some of them.
* ``uncompensated-failure`` (warning): a handler can give up on an event that a service
  emitted (so an upstream step already happened) and nobody handles that failure
  (``on_failure`` or ``compensate(..., on=[failed(X)])``). An ``on_failure`` handler with a
  ``where=`` handles only the failures it matches, so it silences the finding only next to
  one without (the message names the filters). Skipped for terminal events
  (the transaction has already ended) and for events only from outside (nothing upstream
  to undo). A warning, because some steps need no undo (a notification, a read).
* ``compensation-can-fail`` (info): a compensation (an ``on_failure`` handler, a
  ``compensate(...)``, a handler of ``choreograph.timedout``) is retried like any handler
  and can give up too (its retries spent, or ``Reject``). Then what it undoes stays half
  undone and nothing in the flow takes over: nobody compensates a compensation (the
  journal marks a transaction whose compensation gave up ``compensation_failed``, for a
  person to fix the cause and replay the dead letter). One finding per compensation, info
  and not a warning: every compensation can give up and no change to the flow removes
  that, so it says what to watch for (``choreograph transactions --status
  compensation_failed``, ``choreograph watch``) rather than what to fix.

Push subscriptions are steps like handlers (role ``push``): each consumes its types, may
emit what its ``emits`` declares, and can give up (the ambassador publishes
``choreograph.failed``), so every rule sees them.

Built from bare services instead of an App, ingress and terminal events are unknown:
only ``cycle``, ``shared-group``, ``uncompensated-failure`` and ``compensation-can-fail``
run, and an ``info`` finding says so.
"""

from __future__ import annotations

from collections.abc import Iterable

from choreograph.flow import Finding, FlowGraph, Step, Via
from choreograph.sagas import TIMEDOUT

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def lint(graph: FlowGraph) -> list[Finding]:
    findings: list[Finding] = []
    if graph.app:
        findings += _unproduced(graph)
        findings += _unconsumed(graph)
        findings += _unproduced_terminal(graph)
        findings += _cannot_terminate(graph)
    else:
        findings.append(
            Finding(
                "no-app",
                "info",
                "built from services, not an App: ingress and terminal events are unknown, "
                "so unproduced, unconsumed and termination checks were skipped",
            )
        )
    findings += _cycles(graph)
    findings += _shared_groups(graph)
    findings += _uncompensated(graph)
    findings += _compensations_can_fail(graph)
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.code, f.subjects))


def _names(steps: list[Step]) -> str:
    return ", ".join(sorted({f"push {s.service}" if s.role == "push" else f"{s.service}.{s.handler}" for s in steps}))


def _shared_groups(graph: FlowGraph) -> list[Finding]:
    return [
        Finding(
            "shared-group",
            "error",
            f"push subscription {name!r} delivers as the consumer group of service {name!r}: the ambassador and "
            f"the service would compete for its events, each getting only some; give the subscription its own group",
            (name,),
        )
        for name in sorted(set(graph.push) & set(graph.services))
    ]


def _unproduced(graph: FlowGraph) -> list[Finding]:
    out = []
    for type_, node in graph.events.items():
        if node.runtime or node.ingress or graph.producers(type_):
            continue
        waiting = [s for s in graph.steps if s.trigger == type_]
        if waiting:
            out.append(
                Finding(
                    "unproduced",
                    "error",
                    f"{type_} is consumed by {_names(waiting)} but no service emits it and the App does not "
                    f"list it as ingress: {_never(waiting)}",
                    (type_, *sorted({s.service for s in waiting})),
                )
            )
    return out


def _never(steps: list[Step]) -> str:
    if all(s.role == "push" for s in steps):
        return "that subscriber never receives anything"
    return "that handler can never run"


def _unconsumed(graph: FlowGraph) -> list[Finding]:
    out = []
    for type_, node in graph.events.items():
        if node.runtime or node.terminal or graph.consumers(type_):
            continue
        producers = graph.producers(type_)
        if node.ingress:
            message = f"ingress event {type_} has no consumer: a transaction it starts goes nowhere"
        elif producers:
            message = (
                f"{type_} is emitted by {_names(producers)} but nobody consumes it and it is not terminal: "
                f"add a consumer or declare it in App(terminal=...)"
            )
        else:
            continue
        out.append(
            Finding("unconsumed", "warning", message, (type_, *sorted({s.service for s in producers})))
        )
    return out


def _unproduced_terminal(graph: FlowGraph) -> list[Finding]:
    """A terminal event nothing emits: a typo'd or renamed class in ``App(terminal=...)``."""
    return [
        Finding(
            "unproduced-terminal",
            "warning",
            f"terminal event {type_} ({node.terminal}) is emitted by no service and the App does not list it as "
            f"ingress: no transaction ends {node.terminal} with it (a class renamed, or the wrong one in "
            f"App(terminal=...)?)",
            (type_,),
        )
        for type_, node in graph.events.items()
        if node.terminal and not node.ingress and not node.runtime and not graph.producers(type_)
    ]


def starts_transactions(graph: FlowGraph, type_: str) -> bool:
    """Whether an ingress event starts a transaction: an ordinary handler or a push subscriber
    (not a join or a compensation) consumes it."""
    return any(s.trigger == type_ and s.via == "event" and s.role in ("handler", "push") for s in graph.steps)


def reachable(graph: FlowGraph, start: str, *, joining: Iterable[str] = ()) -> set[tuple[str, Via]]:
    """Everything that can happen in a transaction started by ``start``: events, failures, timeouts.

    A step fires once every one of its join slots can be filled; a step that can give up
    makes the failure of its trigger possible. A timeout is always possible (any
    transaction with a deadline can pass it). ``joining`` events come from outside into
    any running transaction.
    """
    seen: set[tuple[str, Via]] = {(start, "event"), (TIMEDOUT, "timeout")}
    seen |= {(t, "event") for t in joining}
    changed = True
    while changed:
        changed = False
        for step in graph.steps:
            if not all(any(route in seen for route in group) for group in step.requires):
                continue
            new: set[tuple[str, Via]] = {(t, "event") for t in step.emits}
            if step.can_give_up:
                new.add((step.trigger, "failure"))
            if not new <= seen:
                seen |= new
                changed = True
    return seen


def _cannot_terminate(graph: FlowGraph) -> list[Finding]:
    terminal = {t for t, node in graph.events.items() if node.terminal}
    if not terminal:
        return [
            Finding(
                "no-terminal",
                "error",
                "the App declares no terminal events (App(terminal={Event: 'completed' | 'failed'})): "
                "no transaction can ever be seen to end",
            )
        ]
    out = []
    starters = [t for t, node in graph.events.items() if node.ingress and starts_transactions(graph, t)]
    joining = [t for t, node in graph.events.items()
               if node.ingress and (t not in starters or _awaited(graph, t))]
    for type_ in starters:
        seen = reachable(graph, type_, joining=joining)
        happened = {t for t, via in seen if via == "event"}
        if not happened & terminal and not _joins_another(graph, type_, seen):
            out.append(
                Finding(
                    "cannot-terminate",
                    "error",
                    f"a transaction started by {type_} can never reach a terminal event "
                    f"({', '.join(sorted(terminal))}); it reaches only {', '.join(sorted(happened))}",
                    (type_,),
                )
            )
    return out


def _awaited(graph: FlowGraph, type_: str) -> bool:
    """Whether a join or a compensation waits for ``type_`` (beside what else it needs from the
    transaction): then an event of that type comes into a running transaction."""
    return any(s.trigger == type_ and s.via in ("event", "step") and s.role in ("join", "compensation")
               for s in graph.steps)


def _joins_another(graph: FlowGraph, type_: str, seen: set[tuple[str, Via]]) -> bool:
    """Whether ``type_`` (an ingress event some ordinary handler consumes: an audit log, a
    notification) is awaited by a join or compensation that the transaction it would start never
    fills (``seen``): then it joins the transaction that has the rest, not starting one of its own."""
    return any(
        s.trigger == type_ and s.via in ("event", "step") and s.role in ("join", "compensation")
        and not all(any(route in seen for route in group) for group in s.requires)
        for s in graph.steps
    )


def _cycles(graph: FlowGraph) -> list[Finding]:
    """One finding per strongly connected set of event types (an event that can cause itself).

    Joins and compensations are left out: each runs at most once per transaction (per
    correlation id), so a loop through one goes round once and ends; it cannot repeat.
    """
    successors: dict[str, dict[str, str]] = {}  # type -> {next type: service}
    for step in graph.steps:
        if step.role in ("join", "compensation"):
            continue
        for group in step.requires:
            for source, via in group:
                if via == "timeout":
                    continue
                for target in step.emits:
                    successors.setdefault(source, {}).setdefault(target, step.service)
    out = []
    for component in _strongly_connected(successors):
        start = min(component)
        path = _cycle_through(start, component, successors)
        if path is None:
            continue
        hops = [start]
        for prev, nxt in zip(path, path[1:], strict=False):
            hops += [f"[{successors[prev][nxt]}]", nxt]
        out.append(
            Finding(
                "cycle",
                "error",
                f"cycle: {' → '.join(hops)}: an event can cause itself (the worker's hops guard stops it "
                f"only after max_hops hops, as loop_detected)",
                tuple(sorted(component)),
            )
        )
    return out


def _strongly_connected(successors: dict[str, dict[str, str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit on long chains)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    nodes = sorted(set(successors) | {t for nexts in successors.values() for t in nexts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(successors.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in successors.get(node, {}):
                    components.append(component)
    return components


def _cycle_through(
    start: str, component: set[str], successors: dict[str, dict[str, str]]
) -> list[str] | None:
    """A shortest path start → ... → start inside ``component`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(successors.get(node, {})):
                if nxt not in component:
                    continue
                if nxt == start:
                    back = [node]
                    while back[-1] != start:
                        back.append(parents[back[-1]])
                    return [*reversed(back), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return None


def _uncompensated(graph: FlowGraph) -> list[Finding]:
    out = []
    for type_, node in graph.events.items():
        if node.terminal or not graph.producers(type_):
            continue
        giving_up = [s for s in graph.steps if s.trigger == type_ and s.can_give_up]
        handlers = [s for s in graph.steps if s.trigger == type_ and s.via == "failure"]
        if not giving_up or any(s.where is None for s in handlers):
            continue
        emitters = sorted({s.service for s in graph.producers(type_)})
        if handlers:
            # every handler of the failure has a where=: a failure none of them matches reaches nobody
            filtered = "; ".join(sorted({f"{_names([s])} where={s.where!r}" for s in handlers}))
            message = (
                f"if {_names(giving_up)} gives up on {type_}, what {', '.join(emitters)} already did is "
                f"compensated only when the failed event matches a filter ({filtered}): a failure none "
                f"matches reaches nobody; add an @service.on_failure({node.name or type_}) without where= "
                f"or @service.compensate(..., on=[failed({node.name or type_})])"
            )
        else:
            message = (
                f"if {_names(giving_up)} gives up on {type_}, nobody compensates what "
                f"{', '.join(emitters)} already did: add @service.on_failure({node.name or type_}) "
                f"or @service.compensate(..., on=[failed({node.name or type_})])"
            )
        out.append(Finding("uncompensated-failure", "warning", message, (type_, *emitters)))
    return out


def _is_compensation(step: Step) -> bool:
    """Whether a step undoes something: a ``compensate(...)`` (any of its routes), an ``on_failure``
    handler or a handler of ``choreograph.timedout`` (what the graph draws as ``compensates``)."""
    return step.role == "compensation" or (step.role in ("handler", "push") and step.via in ("failure", "timeout"))


def _compensations_can_fail(graph: FlowGraph) -> list[Finding]:
    """One ``info`` per compensation: it can give up too, and nothing compensates a compensation."""
    compensations: dict[tuple[str, str], list[Step]] = {}
    for step in graph.steps:
        if _is_compensation(step):
            compensations.setdefault((step.service, step.handler), []).append(step)
    out = []
    for steps in compensations.values():
        triggers = sorted({_trigger(s) for s in steps if s.via != "step"})
        types_ = sorted({s.trigger for s in steps if s.via != "step"})
        out.append(
            Finding(
                "compensation-can-fail",
                "info",
                f"if {_names(steps)} (on {', '.join(triggers)}) gives up (retries spent, or Reject), what it "
                f"undoes stays half undone and nothing in the flow takes over: nobody compensates a "
                f"compensation. The journal marks the transaction compensation_failed. A person fixes the cause and replays the dead letter "
                f"(choreograph dlq replay)",
                (*types_, steps[0].service),
            )
        )
    return out


def _trigger(step: Step) -> str:
    if step.via == "failure":
        return f"failed({step.trigger})"
    return "timed out" if step.via == "timeout" else step.trigger
