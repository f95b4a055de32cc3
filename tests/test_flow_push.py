"""Push subscriptions in the flow graph: a node per subscription, its filters on the edges in,
and lint counting HTTP subscribers as consumers (and producers of what they declare)."""

from __future__ import annotations

import json
from typing import Any

import pydot
import pytest

from choreograph import App, Event, Failure, Service
from choreograph.errors import ConfigurationError
from choreograph.flow import Finding, FlowGraph, PushNode, build, lint
from choreograph.push import PushSubscription


class Placed(Event, type="test.hooked.placed"):
    order: str


class Paid(Event, type="test.hooked.paid"):
    order: str


class Shipped(Event, type="test.hooked.shipped"):
    order: str


class Receipt(Event, type="test.hooked.receipt"):
    order: str


def shop(*, receipt: bool = True) -> App:
    """Payment emits Paid (and a Receipt nobody in Python consumes); shipping ends the transaction."""
    payment, shipping = Service("payment"), Service("shipping")

    if receipt:
        @payment.on(Placed)
        async def charge(order: Placed) -> Paid | Receipt: ...
    else:
        @payment.on(Placed)
        async def charge_only(order: Placed) -> Paid: ...

    @payment.on_failure(Paid)
    async def refund(failure: Failure) -> None: ...

    @shipping.on(Paid)
    async def ship(paid: Paid) -> Shipped: ...

    return App("shop", [payment, shipping], ingress=[Placed], terminal={Shipped: "completed"})


def mailer(**options: Any) -> PushSubscription:
    return PushSubscription("mailer", [Receipt.event_type()], "https://user:pw@mail.example:8443/hook?token=t",
                            **options)


def codes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.severity, f.code) for f in findings]


def problems(target: App | FlowGraph) -> list[Finding]:
    """The findings but ``compensation-can-fail`` (payment's refund can give up: an info about every flow here)."""
    return [f for f in lint(target) if f.code != "compensation-can-fail"]


def test_a_push_subscription_is_a_node_that_consumes_its_types() -> None:
    """Kind ``push``, named after its group, labelled with the URL's host (no credentials, no query)."""
    graph = build(shop(), push=[mailer()])
    assert graph.push == {
        "mailer": PushNode("mailer", "https://mail.example:8443/hook", ("test.hooked.receipt",), None, (), None)
    }
    assert graph.push["mailer"].host == "mail.example:8443"
    [edge] = [e for e in graph.edges if e.target == "push:mailer"]
    assert (edge.source, edge.kind, edge.handlers, edge.filter) == ("event:test.hooked.receipt", "consumes",
                                                                   ("push",), None)
    assert graph.services == ["payment", "shipping"]


def test_a_token_in_a_webhook_url_s_path_is_masked_in_every_drawing() -> None:
    """Slack's and Discord's webhook URLs carry their secret in the path, not the query."""
    secret = "xoxbSECRETtoken0123456789"
    slack = PushSubscription("slack", [Receipt.event_type()], f"https://hooks.slack.com/services/T01/B02/{secret}")
    graph = build(shop(), push=[slack])
    assert graph.push["slack"].url == "https://hooks.slack.com/services/T01/B02/***"
    for text in (graph.to_json(), graph.to_mermaid(), graph.to_dot()):
        assert secret not in text


def test_what_a_push_subscriber_declares_it_emits_is_drawn_and_new_types_become_nodes() -> None:
    """``emits`` are emits edges from the push node; a type only it touches is still an event node."""
    sub = PushSubscription("ledger", [Paid.event_type()], "http://ledger:80/", emits=["test.hooked.booked"])
    graph = build(shop(), push=[sub])
    assert {(e.source, e.target, e.kind) for e in graph.edges if "push:" in e.source + e.target} == {
        ("event:test.hooked.paid", "push:ledger", "consumes"),
        ("push:ledger", "event:test.hooked.booked", "emits"),
    }
    assert graph.events["test.hooked.booked"].name is None


def test_the_filters_are_on_the_edge_in_mermaid_dot_and_json() -> None:
    sub = mailer(filters=[{"prefix": {"subject": "eu-"}}], where="hops < 5")
    graph = build(shop(), push=[sub])
    text = "subject starts with 'eu-' and hops < 5"
    [edge] = [e for e in graph.edges if e.target == "push:mailer"]
    assert edge.filter == edge.label == text

    mermaid = graph.to_mermaid().splitlines()
    assert '    push_mailer{{"mailer<br/>mail.example:8443"}}:::push' in mermaid
    assert "    evt_test_hooked_receipt -->|\"subject starts with 'eu-' and hops #lt; 5\"| push_mailer" in mermaid
    assert any(line.startswith("    classDef push ") for line in mermaid)

    doc = json.loads(graph.to_json())
    [node] = [n for n in doc["nodes"] if n["kind"] == "push"]
    assert node == {
        "id": "push:mailer", "kind": "push", "label": "mailer", "host": "mail.example:8443",
        "url": "https://mail.example:8443/hook", "types": ["test.hooked.receipt"], "emits": None,
        "filters": [{"prefix": {"subject": "eu-"}}, {"sql": "hops < 5"}], "filter": text,
    }
    [json_edge] = [e for e in doc["edges"] if e["target"] == "push:mailer"]
    assert json_edge["filter"] == text
    assert [s["role"] for s in doc["steps"] if s["service"] == "mailer"] == ["push"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot 4 on pyparsing 3.3
def test_dot_draws_the_push_node_and_its_labelled_edge() -> None:
    graph = build(shop(), push=[mailer(where="subject = 'eu'")])
    [dot] = pydot.graph_from_dot_data(graph.to_dot())
    [node] = dot.get_node('"push:mailer"')
    assert node.get_shape() == "hexagon" and node.get_label() == '"mailer\\nmail.example:8443"'
    [edge] = [e for e in dot.get_edges() if e.get_destination() == '"push:mailer"']
    assert edge.get_label() == "\"subject = 'eu'\""


def test_a_flow_without_push_subscriptions_draws_as_before() -> None:
    """No push class, no edge labels, no push nodes: committed drawings stay byte-identical."""
    mermaid = build(shop()).to_mermaid()
    assert "push" not in mermaid and "-->|" not in mermaid
    assert build(shop()).push == {}


def test_lint_counts_a_push_subscriber_as_a_consumer() -> None:
    """The Receipt nobody in Python consumes is a dead end, until its HTTP subscriber is given."""
    [finding] = problems(shop())
    assert (finding.code, finding.subjects) == ("unconsumed", ("test.hooked.receipt", "payment"))
    assert "unconsumed" not in [f.code for f in lint(build(shop(), push=[mailer()]))]
    filtered = mailer(where="subject = 'never'")  # filters are not judged: a consumer is a consumer
    assert "unconsumed" not in [f.code for f in lint(build(shop(), push=[filtered]))]


def test_a_push_subscriber_waiting_for_an_event_nobody_emits_is_unproduced() -> None:
    [finding] = problems(build(shop(receipt=False), push=[mailer()]))
    assert (finding.severity, finding.code, finding.subjects) == ("error", "unproduced", ("test.hooked.receipt",
                                                                                          "mailer"))
    assert "push mailer" in finding.message and "that subscriber never receives anything" in finding.message


def test_a_push_subscriber_can_give_up_like_any_consumer() -> None:
    """The ambassador publishes choreograph.failed when it gives up: what payment did is then uncompensated."""
    sub = PushSubscription("ledger", [Receipt.event_type()], "http://ledger:80/")
    [finding] = problems(build(shop(), push=[sub]))
    assert (finding.severity, finding.code, finding.subjects) == ("warning", "uncompensated-failure",
                                                                  ("test.hooked.receipt", "payment"))
    assert finding.message.startswith("if push ledger gives up on test.hooked.receipt, nobody compensates")


def test_a_push_subscriber_can_start_and_end_a_transaction() -> None:
    """An ingress event consumed only over HTTP, answered with the terminal event, terminates."""
    app = App("hooks", [], ingress=[Placed], terminal={Shipped: "completed"})
    assert ("error", "cannot-terminate") not in codes(lint(app))  # nothing starts a transaction
    sub = PushSubscription("warehouse", [Placed.event_type()], "http://wh:80/", emits=[Paid.event_type()])
    assert ("error", "cannot-terminate") in codes(lint(build(app, push=[sub])))
    sub = PushSubscription("warehouse", [Placed.event_type()], "http://wh:80/", emits=[Shipped.event_type()])
    assert lint(build(app, push=[sub])) == []


def test_a_push_subscription_in_a_service_group_is_an_error() -> None:
    """The ambassador and the service would compete for one group's events."""
    sub = PushSubscription("shipping", [Receipt.event_type()], "http://x:80/")
    findings = lint(build(shop(), push=[sub]))
    [shared] = [f for f in findings if f.code == "shared-group"]
    assert (shared.severity, shared.subjects) == ("error", ("shipping",))
    assert build(shop(), push=[sub]).to_mermaid().count('("shipping")') == 1  # two nodes, two ids


def test_the_same_push_group_twice_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'mailer' is given twice"):
        build(shop(), push=[mailer(), mailer()])
