"""The flow graph is derived from handlers: nodes, edges, renderings, and the lint rules."""

from __future__ import annotations

import json

import pydot
import pytest

from choreograph import App, Event, Failure, Service
from choreograph.errors import ConfigurationError
from choreograph.flow import Edge, Finding, FlowGraph, build, lint
from choreograph.sagas import TIMEDOUT, TimedOut, failed, timed_out


class Placed(Event, type="test.flow.placed"):
    order: str


class Captured(Event, type="test.flow.captured"):
    order: str


class Declined(Event, type="test.flow.declined"):
    order: str


class Reserved(Event, type="test.flow.reserved"):
    order: str


class Released(Event, type="test.flow.released"):
    order: str


class Shipped(Event, type="test.flow.shipped"):
    order: str


class Refunded(Event, type="test.flow.refunded"):
    order: str


class Cancelled(Event, type="test.flow.cancelled"):
    order: str


class Audit(Event, type="test.flow.audit"):
    order: str


def shop() -> App:
    """A small saga: payment and inventory in parallel, shipping joins them, undo on failure."""
    payment, inventory, shipping = Service("payment"), Service("inventory"), Service("shipping")

    @payment.on(Placed)
    async def charge(order: Placed) -> Captured | Declined: ...

    @payment.on_failure(Captured)
    async def refund(failure: Failure) -> Refunded: ...

    @inventory.on(Placed)
    async def reserve(order: Placed) -> Reserved: ...

    @inventory.compensate(Reserved, on=[Declined, failed(Reserved), timed_out()])
    async def release(reserved: Reserved, cause: object) -> Released: ...

    @shipping.on_all(Captured, Reserved, within=60)
    async def ship(paid: Captured, reserved: Reserved) -> Shipped: ...

    return App(
        "shop",
        [payment, inventory, shipping],
        ingress=[Placed],
        terminal={Shipped: "completed", Declined: "failed", Refunded: "failed", Released: "failed"},
    )


def edges(graph: FlowGraph, kind: str | None = None) -> set[tuple[str, str]]:
    return {(e.source, e.target) for e in graph.edges if kind is None or e.kind == kind}


def codes(graph: FlowGraph | App | list[Service]) -> list[tuple[str, str]]:
    return [(f.severity, f.code) for f in lint(graph)]


def problems(graph: FlowGraph | App | list[Service]) -> list[Finding]:
    """The findings but ``compensation-can-fail``: an info about every compensation, whatever the flow."""
    return [f for f in lint(graph) if f.code != "compensation-can-fail"]


# --- the graph ------------------------------------------------------------------------------------


def test_nodes_are_the_services_and_every_event_type_they_touch() -> None:
    graph = build(shop())
    assert graph.services == ["payment", "inventory", "shipping"]
    assert set(graph.events) == {
        Placed.event_type(),
        Captured.event_type(),
        Declined.event_type(),
        Reserved.event_type(),
        Released.event_type(),
        Shipped.event_type(),
        Refunded.event_type(),
        TIMEDOUT,
    }


def test_consumes_and_emits_edges_follow_handlers_and_their_return_annotations() -> None:
    graph = build(shop())
    assert ("event:test.flow.placed", "service:payment") in edges(graph, "consumes")
    assert ("event:test.flow.placed", "service:inventory") in edges(graph, "consumes")
    assert {
        ("service:payment", "event:test.flow.captured"),
        ("service:payment", "event:test.flow.declined"),
    } <= edges(graph, "emits")


def test_emits_given_as_a_keyword_is_drawn_like_an_annotation() -> None:
    svc = Service("audit")

    @svc.on(Placed, emits=[Audit])
    async def note(order: Placed):  # no return annotation: emits= declares the output
        return Audit(order=order.order)

    assert edges(build([svc]), "emits") == {("service:audit", "event:test.flow.audit")}


def test_emits_must_cover_what_the_return_annotation_names() -> None:
    svc = Service("audit")
    with pytest.raises(ConfigurationError, match=r"names Captured, which emits= does not list"):
        @svc.on(Placed, emits=[Audit])
        async def note(order: Placed) -> Captured | None:  # returning a Captured would fail every attempt
            return None

    # emits= may add what the handler publishes, and may name a subclass of an annotated base
    @svc.on(Placed, emits=[Captured, Audit])
    async def both(order: Placed) -> Captured:
        return Captured(order=order.order)

    broad = Service("broad")

    @broad.on(Placed, emits=[Audit])
    async def note_all(order: Placed) -> Event | None:
        return None

    assert edges(build([svc, broad]), "emits") == {("service:audit", "event:test.flow.captured"),
                                                   ("service:audit", "event:test.flow.audit"),
                                                   ("service:broad", "event:test.flow.audit")}


def _registers(how: str) -> None:
    svc = Service("s")
    if how == "on":
        svc.on(Event)(_consume)
    elif how == "on_failure":
        svc.on_failure(Event)(_consume)
    elif how == "annotation":
        @svc.on(Placed)
        async def broad(order: Placed) -> Event: ...
    elif how == "emits":
        svc.on(Placed, emits=[Event])(_consume)
    elif how == "on_all":
        @svc.on_all(Placed, Event)
        async def both(order: Placed, event: Event) -> None: ...
    elif how == "compensate":
        @svc.compensate(Event, on=[Placed])
        async def undo(step: Event, cause: Placed) -> None: ...
    elif how == "failed":
        @svc.compensate(Captured, on=[failed(Event)])
        async def refund(step: Captured, cause: Failure) -> None: ...
    elif how == "route":
        from choreograph.gateway import Route

        Route("POST", "/events", Event)
    else:
        @svc.on(Placed)
        async def ship(order: Placed) -> Shipped: ...
        build(App("a", [svc], ingress=[Event] if how == "ingress" else [Placed], terminal={
            Event if how == "terminal" else Shipped: "completed"}))


async def _consume(event: Event) -> None: ...


@pytest.mark.parametrize("how", ["on", "on_failure", "annotation", "emits", "on_all", "compensate", "failed",
                                 "ingress", "terminal", "route"])
def test_event_itself_names_no_type_and_is_refused_where_an_event_class_is_expected(how: str) -> None:
    """``Event`` has no type: ``on(Event)`` was drawn as a nameless event node that lint called
    unproduced (" is consumed by ..."), and a handler annotated ``-> Event`` (or ``emits=[Event]``)
    was drawn emitting nothing while the worker dead-lettered every event it returned ("declares
    ['']"). Refused when registered, as any other class that is no event type."""
    with pytest.raises(ConfigurationError, match="Event subclass|Event itself"):
        _registers(how)


def test_a_broad_event_annotation_is_fine_beside_emits() -> None:
    svc = Service("s")

    @svc.on(Placed, emits=[Audit])
    async def note(order: Placed) -> Event | None: ...

    assert edges(build([svc]), "emits") == {("service:s", "event:test.flow.audit")}


def test_emits_must_cover_what_the_return_annotation_names_beside_event_itself() -> None:
    """A broad ``Event`` in the annotation does not switch off the check of the classes it
    names beside it (71e59d7's refusal of ``Event`` was swallowed as an unreadable annotation)."""
    svc = Service("s")
    with pytest.raises(ConfigurationError, match=r"names Captured, which emits= does not list"):
        @svc.on(Placed, emits=[Audit])
        async def note(order: Placed) -> Captured | Event | None: ...  # a Captured returned would fail

    with pytest.raises(ConfigurationError, match=r"names Event, which emits= does not list"):
        @svc.on(Placed, emits=[])
        async def silent(order: Placed) -> Event: ...  # every event returned would fail


def test_an_on_failure_handler_is_a_compensates_edge_from_the_failed_type() -> None:
    [edge] = [e for e in build(shop()).edges if e.kind == "compensates" and e.target == "service:payment"]
    assert (edge.source, edge.trigger, edge.label, edge.handlers) == (
        "event:test.flow.captured",
        "failure",
        "failed",
        ("shop.<locals>.refund",),
    )


def test_a_compensation_is_drawn_from_its_triggers_not_from_the_step_it_remembers() -> None:
    graph = build(shop())
    into_inventory = {(e.source, e.trigger) for e in graph.edges if e.target == "service:inventory"}
    assert into_inventory == {
        ("event:test.flow.placed", None),  # reserve
        ("event:test.flow.declined", "event"),
        ("event:test.flow.reserved", "failure"),
        (f"event:{TIMEDOUT}", "timeout"),
    }
    assert ("service:inventory", "event:test.flow.released") in edges(graph, "emits")


def test_a_plain_subscription_to_timedout_is_a_compensation_too() -> None:
    svc = Service("janitor")

    @svc.on(TimedOut)
    async def cleanup(event: TimedOut) -> None: ...

    [edge] = build([svc]).edges
    assert (edge.source, edge.kind, edge.trigger) == (f"event:{TIMEDOUT}", "compensates", "timeout")
    assert build([svc]).events[TIMEDOUT].runtime


def test_a_join_consumes_every_joined_type_and_its_runtime_plumbing_is_not_drawn() -> None:
    graph = build(shop())
    into_shipping = {(e.source, e.kind) for e in graph.edges if e.target == "service:shipping"}
    assert into_shipping == {
        ("event:test.flow.captured", "consumes"),
        ("event:test.flow.reserved", "consumes"),
    }
    assert not [
        t for t in graph.events if t.startswith("choreograph.") and t != TIMEDOUT
    ]  # no deadline, no failed


def test_the_app_marks_ingress_and_terminal_events() -> None:
    events = build(shop()).events
    assert events["test.flow.placed"].ingress and events["test.flow.placed"].terminal is None
    assert events["test.flow.shipped"].terminal == "completed"
    assert events["test.flow.declined"].terminal == "failed"
    assert events["test.flow.placed"].name == "Placed"


def test_a_list_of_services_builds_a_graph_that_knows_no_ingress_or_terminal() -> None:
    graph = build(shop().services)
    assert not graph.app
    assert not any(node.ingress or node.terminal for node in graph.events.values())


def test_a_list_naming_a_service_twice_is_refused_as_an_app_and_a_worker_refuse_it() -> None:
    payment, *others = shop().services
    twin = Service("payment")

    @twin.on(Refunded)
    async def note(event: Refunded) -> None: ...

    for services in ([payment, *others, payment], [payment, *others, twin]):
        with pytest.raises(ConfigurationError, match=r"\['payment'\] given more than once"):
            build(services)


def test_edges_merge_handlers_that_draw_the_same_line() -> None:
    svc = Service("multi")

    @svc.on(Placed)
    async def a(order: Placed) -> Audit: ...

    @svc.on(Captured)
    async def b(order: Captured) -> Audit: ...

    [emit] = [e for e in build([svc]).edges if e.kind == "emits"]
    assert emit == Edge(
        "service:multi",
        "event:test.flow.audit",
        "emits",
        (
            "test_edges_merge_handlers_that_draw_the_same_line.<locals>.a",
            "test_edges_merge_handlers_that_draw_the_same_line.<locals>.b",
        ),
    )


def test_a_handlers_where_filter_is_on_its_edge_in_mermaid_dot_and_json() -> None:
    """``where=`` narrows what a handler takes, as a push subscription's filters do: drawn on the
    edge in (an on_failure handler's too), and kept in the JSON steps."""
    eu, audit = Service("eu"), Service("audit")

    @eu.on(Placed, where="subject LIKE 'eu-%'")
    async def take(order: Placed) -> Captured: ...

    @eu.on_failure(Captured, where="subject = 'eu-1'")
    async def undo(failure: Failure) -> Refunded: ...

    @audit.on(Placed)
    async def note(order: Placed) -> Audit: ...

    graph = build([eu, audit])
    into = {(e.source, e.target): e for e in graph.edges if e.kind != "emits"}
    assert into[("event:test.flow.placed", "service:eu")].filter == "subject LIKE 'eu-%'"
    assert into[("event:test.flow.captured", "service:eu")].label == "failed: subject = 'eu-1'"
    assert into[("event:test.flow.placed", "service:audit")].filter is None
    assert all(e.filter is None for e in graph.edges if e.kind == "emits")
    assert '    evt_test_flow_placed -->|"subject LIKE \'eu-%\'"| svc_eu' in graph.to_mermaid().splitlines()
    assert '"event:test.flow.placed" -> "service:eu" [label="subject LIKE \'eu-%\'"];' in graph.to_dot()
    doc = graph.to_dict()
    [json_edge] = [e for e in doc["edges"] if (e["source"], e["target"]) == ("event:test.flow.placed", "service:eu")]
    assert json_edge["filter"] == "subject LIKE 'eu-%'"
    wheres = {(s["service"], s["trigger"], s["via"]): s["where"] for s in doc["steps"]}
    assert wheres[("eu", "test.flow.captured", "failure")] == "subject = 'eu-1'"
    assert wheres[("eu", "test.flow.placed", "event")] == "subject LIKE 'eu-%'"
    assert wheres[("audit", "test.flow.placed", "event")] is None


# --- renderings -----------------------------------------------------------------------------------


def test_mermaid_draws_services_rounded_events_as_stadiums_and_compensations_dashed_red() -> None:
    graph = build(shop())
    text = graph.to_mermaid()
    lines = text.splitlines()
    assert lines[1] == "flowchart LR"
    assert '    svc_payment("payment"):::service' in lines
    assert '    evt_test_flow_placed(["test.flow.placed"]):::ingress' in lines
    assert '    evt_test_flow_shipped(["test.flow.shipped"]):::completed' in lines
    links = [line.strip() for line in lines if "-->" in line or "-.->" in line]
    assert len(links) == len(graph.edges)
    dashed = [i for i, line in enumerate(links) if "-.->" in line]
    assert '    evt_test_flow_captured -.->|"failed"| svc_payment' in lines
    [style] = [line for line in lines if line.strip().startswith("linkStyle")]
    assert style.split()[1] == ",".join(map(str, dashed)) and "stroke:#c62828" in style
    assert dashed == [i for i, e in enumerate(graph.edges) if e.kind == "compensates"]


class Quoted(Event, type='test.flow.odd"name'):
    pass


class Hashed(Event, type="test_flow_odd#name"):
    pass


def test_mermaid_ids_stay_unique_and_labels_escaped() -> None:
    """``test.flow.odd"name`` and ``test_flow_odd#name`` sanitise to the same id."""
    svc = Service("x")

    @svc.on(Quoted)
    async def a(event: Quoted) -> Hashed: ...

    text = build([svc]).to_mermaid()
    assert '(["test.flow.odd#quot;name"])' in text and '(["test_flow_odd#35;name"])' in text
    ids = [line.split("(")[0].strip() for line in text.splitlines() if ":::" in line]
    assert len(ids) == len(set(ids)) == 3


class Ticked(Event, type="`test.flow.ticked`"):
    pass


def test_a_backticked_label_is_not_read_as_mermaid_markdown() -> None:
    # "`...`" in quotes is a Mermaid markdown string: the backticks would vanish and `*`, `_`
    # in the name would be read as emphasis
    svc = Service("ticks")

    @svc.on(Ticked)
    async def a(event: Ticked) -> None: ...

    text = build([svc]).to_mermaid()
    assert '(["#96;test.flow.ticked#96;"])' in text and "`" not in text


PYDOT_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot 4 on pyparsing 3.3


@PYDOT_WARNINGS
def test_dot_parses_and_has_every_node_and_edge_with_compensations_dashed_red() -> None:
    graph = build(shop())
    [dot] = pydot.graph_from_dot_data(graph.to_dot())
    names = {n.get_name().strip('"') for n in dot.get_nodes()} - {"node", "edge"}
    assert names == {f"service:{s}" for s in graph.services} | {f"event:{t}" for t in graph.events}
    drawn = {
        (e.get_source().strip('"'), e.get_destination().strip('"'), e.get_style()) for e in dot.get_edges()
    }
    assert drawn == {(e.source, e.target, "dashed" if e.kind == "compensates" else None) for e in graph.edges}
    assert all(e.get_color() == '"#c62828"' for e in dot.get_edges() if e.get_style() == "dashed")


@PYDOT_WARNINGS
def test_dot_escapes_quotes_in_names() -> None:
    graph = build([Service("plain")], name='say "hi"')
    [dot] = pydot.graph_from_dot_data(graph.to_dot())
    assert dot.get_name() == '"say \\"hi\\""'


def multi_line_flow() -> FlowGraph:
    """An App name and ``where=`` filters written over several lines (``\\n``, ``\\r\\n``, ``\\r``)."""
    eu = Service("eu")

    @eu.on(Placed, where="subject LIKE 'eu-%'\r\n  AND hops < 5")
    async def take(order: Placed) -> Captured: ...

    @eu.on_failure(Captured, where="subject = 'eu-1'\nOR subject = 'eu-2'\rOR subject = 'eu-3'")
    async def undo(failure: Failure) -> Refunded: ...

    return build([eu], name="shop\r\neu")


def test_mermaid_keeps_line_breaks_of_names_and_filters_out_of_its_lines() -> None:
    """A raw line break would end the ``%%`` comment or an edge label mid-way: it is drawn as ``<br/>``."""
    text = multi_line_flow().to_mermaid()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[:2] == ["%% choreograph flow: shop<br/>eu", "flowchart LR"]
    assert all(line.startswith("    ") for line in lines[2:])
    assert "    evt_test_flow_placed -->|\"subject LIKE 'eu-%'<br/>  AND hops #lt; 5\"| svc_eu" in lines
    assert (
        "    evt_test_flow_captured -.->|\"failed: subject = 'eu-1'<br/>OR subject = 'eu-2'<br/>OR subject = 'eu-3'\"| svc_eu"
        in lines
    )


@PYDOT_WARNINGS
def test_dot_writes_every_line_break_as_an_escaped_newline() -> None:
    text = multi_line_flow().to_dot()
    assert "\r" not in text
    assert text.splitlines()[0] == 'digraph "shop\\neu" {'
    [dot] = pydot.graph_from_dot_data(text)
    labels = {e.get_label() for e in dot.get_edges()}
    assert '"subject LIKE \'eu-%\'\\n  AND hops < 5"' in labels
    assert '"failed: subject = \'eu-1\'\\nOR subject = \'eu-2\'\\nOR subject = \'eu-3\'"' in labels


def test_json_lists_nodes_edges_and_steps() -> None:
    graph = build(shop())
    doc = json.loads(graph.to_json())
    assert doc == graph.to_dict()
    assert {n["id"] for n in doc["nodes"]} == {f"service:{s}" for s in graph.services} | {
        f"event:{t}" for t in graph.events
    }
    assert len(doc["edges"]) == len(graph.edges)
    placed = next(n for n in doc["nodes"] if n["id"] == "event:test.flow.placed")
    assert placed == {
        "id": "event:test.flow.placed",
        "kind": "event",
        "label": "test.flow.placed",
        "class": "Placed",
        "ingress": True,
        "terminal": None,
        "runtime": False,
    }
    release = [s for s in doc["steps"] if s["handler"].endswith("release")]
    assert {(s["trigger"], s["via"]) for s in release} == {
        ("test.flow.reserved", "step"),
        ("test.flow.declined", "event"),
        ("test.flow.reserved", "failure"),
        (TIMEDOUT, "timeout"),
    }


def test_renderings_are_deterministic() -> None:
    first, second = build(shop()), build(shop())
    assert (first.to_mermaid(), first.to_dot(), first.to_json()) == (
        second.to_mermaid(),
        second.to_dot(),
        second.to_json(),
    )


# --- lint -----------------------------------------------------------------------------------------


def test_a_complete_saga_lints_clean() -> None:
    assert problems(shop()) == []


def test_the_chain_example_has_only_an_uncompensated_failure_warning() -> None:
    from examples.chain import app

    [finding] = lint(app)
    assert (finding.severity, finding.code, finding.subjects) == (
        "warning",
        "uncompensated-failure",
        ("chain.payment.captured", "payment"),
    )
    assert "shipping" in finding.message and "on_failure(PaymentCaptured)" in finding.message


def test_a_consumed_event_nobody_emits_is_an_error_unless_it_is_ingress() -> None:
    svc = Service("orphan")

    @svc.on(Placed)
    async def handle(order: Placed) -> Shipped: ...

    assert ("error", "unproduced") in codes(App("a", [svc], terminal={Shipped: "completed"}))
    assert codes(App("a", [svc], ingress=[Placed], terminal={Shipped: "completed"})) == []
    [finding] = lint(App("a", [svc], terminal={Shipped: "completed"}))
    assert finding.subjects == ("test.flow.placed", "orphan") and "orphan" in finding.message


def test_an_emitted_event_nobody_consumes_is_a_warning_unless_it_is_terminal() -> None:
    svc = Service("talker")

    @svc.on(Placed)
    async def handle(order: Placed) -> Shipped | Audit: ...

    findings = lint(App("a", [svc], ingress=[Placed], terminal={Shipped: "completed"}))
    assert [(f.severity, f.code, f.subjects) for f in findings] == [
        ("warning", "unconsumed", ("test.flow.audit", "talker"))
    ]
    assert lint(App("a", [svc], ingress=[Placed], terminal={Shipped: "completed", Audit: "completed"})) == []


def test_an_ingress_event_with_no_consumer_is_a_warning() -> None:
    svc = Service("s")

    @svc.on(Placed)
    async def handle(order: Placed) -> Shipped: ...

    app = App("a", [svc], ingress=[Placed, Cancelled], terminal={Shipped: "completed", Cancelled: "failed"})
    assert ("warning", "unconsumed") not in codes(app)  # a terminal ingress is fine
    app = App("a", [svc], ingress=[Placed, Audit], terminal={Shipped: "completed"})
    assert ("warning", "unconsumed") in codes(app)


def test_a_cycle_is_an_error_that_shows_the_loop() -> None:
    ping, pong = Service("ping"), Service("pong")

    @ping.on(Placed)
    async def a(event: Placed) -> Captured | Shipped: ...

    @pong.on(Captured)
    async def b(event: Captured) -> Placed: ...

    [finding] = [
        f
        for f in lint(App("a", [ping, pong], ingress=[Placed], terminal={Shipped: "completed"}))
        if f.code == "cycle"
    ]
    assert finding.severity == "error"
    assert finding.subjects == ("test.flow.captured", "test.flow.placed")
    assert "test.flow.captured → [pong] → test.flow.placed → [ping] → test.flow.captured" in finding.message


def test_an_event_that_causes_itself_is_a_cycle() -> None:
    svc = Service("echo")

    @svc.on(Placed)
    async def again(event: Placed) -> Placed | Shipped: ...

    [finding] = [f for f in lint([svc]) if f.code == "cycle"]
    assert "test.flow.placed → [echo] → test.flow.placed" in finding.message


def test_a_loop_through_a_compensation_or_a_join_ends_after_one_round_and_is_no_cycle() -> None:
    """A join or a compensation runs at most once per transaction: a drone reassigned after its
    assignment failed, or a re-quote after a join, goes round once, never until loop_detected."""
    scheduler, delivery, quotes = Service("scheduler"), Service("delivery"), Service("quotes")

    @scheduler.on(Placed)
    async def assign(order: Placed) -> Reserved: ...

    @scheduler.compensate(Reserved, on=[failed(Reserved)])
    async def unassign(reserved: Reserved, cause: object) -> Released: ...

    @scheduler.on(Released)
    async def reassign(released: Released) -> Reserved: ...

    @delivery.on(Reserved)
    async def fly(reserved: Reserved) -> Captured: ...

    @quotes.on_all(Captured, Reserved)
    async def quote(paid: Captured, reserved: Reserved) -> Shipped | Audit: ...

    @quotes.on(Audit)
    async def requote(audit: Audit) -> Captured: ...

    app = App("a", [scheduler, delivery, quotes], ingress=[Placed], terminal={Shipped: "completed"})
    assert [f for f in lint(app) if f.code == "cycle"] == []

    @scheduler.on(Captured)  # an ordinary handler closes a loop that does repeat
    async def again(paid: Captured) -> Released: ...

    [finding] = [f for f in lint(app) if f.code == "cycle"]
    assert "[delivery]" in finding.message and "[scheduler]" in finding.message


def test_a_transaction_that_can_never_reach_a_terminal_event_is_an_error() -> None:
    svc = Service("s")

    @svc.on(Placed)
    async def handle(order: Placed) -> Captured: ...

    @svc.on(Captured)
    async def more(event: Captured) -> None: ...

    findings = lint(App("a", [svc], ingress=[Placed], terminal={Shipped: "completed"}))
    [finding] = [f for f in findings if f.code == "cannot-terminate"]
    assert finding.severity == "error" and finding.subjects == ("test.flow.placed",)
    assert "test.flow.shipped" in finding.message


def test_a_terminal_event_reached_only_through_a_compensation_still_terminates() -> None:
    work, undo = Service("work"), Service("undo")

    @work.on(Placed)
    async def handle(order: Placed) -> Captured: ...

    @work.on(Captured)
    async def finish(event: Captured) -> None: ...

    @undo.on_failure(Captured)
    async def cancel(failure: Failure) -> Cancelled: ...

    app = App("a", [work, undo], ingress=[Placed], terminal={Cancelled: "failed"})
    assert "cannot-terminate" not in [f.code for f in lint(app)]


def test_a_join_waiting_for_an_event_that_never_comes_cannot_terminate() -> None:
    a, b = Service("a"), Service("b")

    @a.on(Placed)
    async def start(order: Placed) -> Captured: ...

    @b.on_all(Captured, Reserved)
    async def join(paid: Captured, reserved: Reserved) -> Shipped: ...

    app = App("x", [a, b], ingress=[Placed, Reserved], terminal={Shipped: "completed"})
    # Reserved comes from outside and joins the transaction Placed started
    assert [f.code for f in lint(app)] == ["uncompensated-failure"]
    app = App("x", [a, b], ingress=[Placed], terminal={Shipped: "completed"})
    assert {"cannot-terminate", "unproduced"} <= {f.code for f in lint(app)}


def test_an_ingress_event_a_join_awaits_still_joins_when_an_ordinary_handler_consumes_it_too() -> None:
    """Reserved comes from outside into the transaction Placed started; an audit log of it must not
    make it a transaction of its own that never ends, nor take it away from Placed's."""
    a, b, audit = Service("a"), Service("b"), Service("audit")

    @a.on(Placed)
    async def start(order: Placed) -> Captured: ...

    @b.on_all(Captured, Reserved)
    async def join(paid: Captured, reserved: Reserved) -> Shipped: ...

    @audit.on(Reserved)
    async def log(reserved: Reserved) -> None: ...

    app = App("x", [a, b, audit], ingress=[Placed, Reserved], terminal={Shipped: "completed"})
    assert [f.code for f in lint(app)] == ["uncompensated-failure"]

    # but an ingress event whose join fires in the transaction it starts is still checked as a starter
    c, d = Service("c"), Service("d")

    @c.on(Placed)
    async def begin(order: Placed) -> Captured: ...

    @d.on_all(Placed, Captured)
    async def both(order: Placed, paid: Captured) -> Audit: ...

    findings = lint(App("y", [c, d], ingress=[Placed], terminal={Shipped: "completed"}))
    assert [f.subjects for f in findings if f.code == "cannot-terminate"] == [("test.flow.placed",)]


def test_a_terminal_event_nothing_emits_is_a_warning_even_when_another_one_is_reached() -> None:
    """The App names a class nobody emits as its completion (renamed, or the wrong one): orders can
    still end cancelled, so it is no ``cannot-terminate``, but none can ever end completed."""
    svc, notify = Service("s"), Service("notify")

    @svc.on(Placed)
    async def handle(order: Placed) -> Captured | Cancelled: ...

    @notify.on(Captured)
    async def tell(event: Captured) -> None: ...

    app = App("a", [svc, notify], ingress=[Placed], terminal={Shipped: "completed", Cancelled: "failed"})
    [finding] = [f for f in lint(app) if f.code == "unproduced-terminal"]
    assert finding.severity == "warning" and finding.subjects == ("test.flow.shipped",)
    assert "completed" in finding.message
    # emitted by someone, or coming from outside, it is fine
    app = App("a", [svc, notify], ingress=[Placed], terminal={Captured: "completed", Cancelled: "failed"})
    assert "unproduced-terminal" not in [f.code for f in lint(app)]
    app = App("a", [svc, notify], ingress=[Placed, Shipped], terminal={Shipped: "completed", Cancelled: "failed"})
    assert "unproduced-terminal" not in [f.code for f in lint(app)]


def test_an_app_without_terminal_events_is_an_error() -> None:
    svc = Service("s")

    @svc.on(Placed)
    async def handle(order: Placed) -> None: ...

    assert codes(App("a", [svc], ingress=[Placed])) == [("error", "no-terminal")]


def _pay_and_ship() -> tuple[Service, Service]:
    """pay charges a Placed order (Captured), ship sends what was captured (Shipped)."""
    pay, ship = Service("pay"), Service("ship")

    @pay.on(Placed)
    async def charge(order: Placed) -> Captured: ...

    @ship.on(Captured)
    async def send(event: Captured) -> Shipped: ...

    return pay, ship


def test_a_failure_nobody_compensates_is_a_warning_and_on_failure_or_compensate_silences_it() -> None:
    services = _pay_and_ship
    pay, ship = services()
    app = App("a", [pay, ship], ingress=[Placed], terminal={Shipped: "completed"})
    assert codes(app) == [("warning", "uncompensated-failure")]  # Placed is ingress: nothing upstream

    pay, ship = services()

    @pay.on_failure(Captured)
    async def refund(failure: Failure) -> Refunded: ...

    assert (
        problems(App("a", [pay, ship], ingress=[Placed], terminal={Shipped: "completed", Refunded: "failed"}))
        == []
    )

    pay, ship = services()

    @pay.compensate(Captured, on=[failed(Captured)])
    async def undo(paid: Captured, failure: Failure) -> Refunded: ...

    assert (
        problems(App("a", [pay, ship], ingress=[Placed], terminal={Shipped: "completed", Refunded: "failed"}))
        == []
    )


def test_an_on_failure_handler_with_where_compensates_only_some_failures_so_the_warning_stays() -> None:
    def services() -> tuple[Service, Service]:
        pay, ship = _pay_and_ship()

        @pay.on_failure(Captured, where="subject LIKE 'eu-%'")
        async def refund(failure: Failure) -> Refunded: ...

        return pay, ship

    terminal = {Shipped: "completed", Refunded: "failed"}
    pay, ship = services()
    [finding] = problems(App("a", [pay, ship], ingress=[Placed], terminal=terminal))
    assert (finding.severity, finding.code, finding.subjects) == (
        "warning",
        "uncompensated-failure",
        ("test.flow.captured", "pay"),
    )
    assert "subject LIKE 'eu-%'" in finding.message and "without where=" in finding.message

    pay, ship = services()
    audit = Service("audit")

    @audit.on_failure(Captured)
    async def record(failure: Failure) -> None: ...

    assert problems(App("a", [pay, ship, audit], ingress=[Placed], terminal=terminal)) == []


def test_a_failure_on_a_terminal_event_needs_no_compensation() -> None:
    pay, notify = Service("pay"), Service("notify")

    @pay.on(Placed)
    async def charge(order: Placed) -> Shipped: ...

    @notify.on(Shipped)
    async def tell(event: Shipped) -> None: ...

    assert lint(App("a", [pay, notify], ingress=[Placed], terminal={Shipped: "completed"})) == []


def test_a_compensation_can_give_up_too_and_nobody_compensates_it() -> None:
    """An on_failure handler, a compensate(...) and a handler of choreograph.timedout are retried and
    dead-lettered like any handler: one info each says so (nothing in the flow can take over)."""
    pay, stock, ship_, clock = Service("pay"), Service("stock"), Service("ship"), Service("clock")

    @pay.on(Placed)
    async def charge(order: Placed) -> Captured: ...

    @pay.on_failure(Captured)
    async def refund(failure: Failure) -> Refunded: ...

    @stock.on(Captured)
    async def reserve(paid: Captured) -> Reserved | Declined: ...

    @stock.compensate(Reserved, on=[Declined, failed(Reserved), timed_out()])
    async def release(reserved: Reserved, cause: object) -> Released: ...

    @ship_.on(Reserved)
    async def ship(reserved: Reserved) -> Shipped: ...

    @clock.on(TimedOut)
    async def expire(timeout: TimedOut) -> Cancelled: ...

    terminal = {Shipped: "completed", Refunded: "failed", Released: "failed", Cancelled: "failed",
                Declined: "failed"}
    findings = [f for f in lint(App("a", [pay, stock, ship_, clock], ingress=[Placed], terminal=terminal))
                if f.code == "compensation-can-fail"]
    assert [(f.severity, f.subjects) for f in findings] == [
        ("info", (TIMEDOUT, "clock")),
        ("info", (TIMEDOUT, "test.flow.declined", "test.flow.reserved", "stock")),
        ("info", ("test.flow.captured", "pay")),
    ]
    expire_, release_, refund_ = (f.message for f in findings)
    assert refund_.startswith("if pay.test_a_compensation_can_give_up_too_and_nobody_compensates_it.<locals>.refund "
                              "(on failed(test.flow.captured)) gives up")
    assert "nobody compensates a compensation" in refund_ and "choreograph dlq replay" in refund_
    assert "(on failed(test.flow.reserved), test.flow.declined, timed out)" in release_  # one per compensation
    assert "(on timed out)" in expire_
    for message in (refund_, release_, expire_):  # the journal's status for any compensation's give-up
        assert "The journal marks the transaction compensation_failed." in message


def test_bare_services_get_only_the_checks_that_need_no_app() -> None:
    assert codes(shop().services) == [("info", "compensation-can-fail")] * 2 + [("info", "no-app")]


@pytest.mark.parametrize("target", ["app", "graph"])
def test_lint_accepts_an_app_or_a_built_graph(target: str) -> None:
    app = shop()
    assert lint(app if target == "app" else build(app)) == lint(build(app))
    assert problems(app if target == "app" else build(app)) == []


@pytest.mark.parametrize(
    ("ingress", "terminal", "message"),
    [
        ([Placed], {Shipped: "complete"}, "App 'a': terminal[Shipped]: must be 'completed' or 'failed', not 'complete'"),
        ([Placed], {"test.flow.shipped": "completed"},
         "App 'a': terminal: expected an Event subclass, got 'test.flow.shipped'"),
        (["test.flow.placed"], {Shipped: "completed"},
         "App 'a': ingress[0]: expected an Event subclass, got 'test.flow.placed'"),
    ],
)
def test_an_app_s_ingress_and_terminal_are_checked_as_the_journal_checks_them(
    ingress: list[object], terminal: dict[object, str], message: str
) -> None:
    """A typo'd kind was drawn and linted as an end ("no problems found") the journal refuses at run
    time, and DOT failed on it with a KeyError; a type name instead of a class, an AttributeError."""
    svc = Service("s")

    @svc.on(Placed)
    async def handle(order: Placed) -> Shipped: ...

    app = App("a", [svc], ingress=ingress, terminal=terminal)  # type: ignore[arg-type]
    for check in (build, lint):
        with pytest.raises(ConfigurationError) as caught:
            check(app)
        assert str(caught.value) == message
