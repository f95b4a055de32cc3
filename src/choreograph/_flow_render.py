"""Drawing a :class:`~choreograph.flow.FlowGraph`: Mermaid, Graphviz DOT and JSON.

All three are deterministic (same code, same bytes) so a rendered flow can be committed
next to the code and reviewed as a diff.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from choreograph.flow import Edge, FlowGraph, event_id, push_id, service_id

COMPENSATION_COLOUR = "#c62828"

#: Mermaid classes: services, events, and what the App says about an event.
_MERMAID_CLASSES = {
    "service": "fill:#e8f0fe,stroke:#3b5998,color:#111",
    "event": "fill:#f5f5f5,stroke:#888,color:#111",
    "ingress": "fill:#e6f4ea,stroke:#2e7d32,color:#111",
    "completed": "fill:#e3f2fd,stroke:#1565c0,stroke-width:2px,color:#111",
    "failed": "fill:#fdecea,stroke:#c62828,stroke-width:2px,color:#111",
    "runtime": "fill:#fff8e1,stroke:#b8860b,stroke-dasharray:3 3,color:#111",
}
#: Declared only when there are push subscribers (a flow without any draws as it always did).
_MERMAID_PUSH_CLASS = "fill:#f3e5f5,stroke:#6a1b9a,color:#111"


def event_class(graph: FlowGraph, type_: str) -> str:
    """The style class of an event node: ``ingress``, ``completed``, ``failed``, ``runtime`` or ``event``."""
    node = graph.events[type_]
    if node.terminal:
        return node.terminal
    if node.ingress:
        return "ingress"
    return "runtime" if node.runtime else "event"


def to_dict(graph: FlowGraph) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [
        {"id": service_id(name), "kind": "service", "label": name} for name in graph.services
    ]
    nodes += [
        {
            "id": event_id(node.type),
            "kind": "event",
            "label": node.type,
            "class": node.name,
            "ingress": node.ingress,
            "terminal": node.terminal,
            "runtime": node.runtime,
        }
        for node in graph.events.values()
    ]
    nodes += [
        {
            "id": push_id(node.name),
            "kind": "push",
            "label": node.name,
            "host": node.host,
            "url": node.url,
            "types": list(node.types),
            "emits": None if node.emits is None else list(node.emits),
            "filters": list(node.filters),
            "filter": node.filter,
        }
        for node in graph.push.values()
    ]
    edges = [
        {
            "source": e.source,
            "target": e.target,
            "kind": e.kind,
            "trigger": e.trigger,
            "handlers": list(e.handlers),
            "filter": e.filter,
        }
        for e in graph.edges
    ]
    steps = [
        {
            "service": s.service,
            "handler": s.handler,
            "trigger": s.trigger,
            "via": s.via,
            "role": s.role,
            "emits": list(s.emits),
            "requires": [[list(route) for route in group] for group in s.requires],
            "where": s.where,
        }
        for s in graph.steps
    ]
    return {"name": graph.name, "app": graph.app, "nodes": nodes, "edges": edges, "steps": steps}


def to_json(graph: FlowGraph) -> str:
    return orjson.dumps(to_dict(graph), option=orjson.OPT_INDENT_2).decode()


# --- Mermaid --------------------------------------------------------------------------------------


def _mermaid_ids(graph: FlowGraph) -> dict[str, str]:
    """Readable, unique Mermaid node ids (``svc_payment``, ``evt_shop_order_placed``)."""
    ids: dict[str, str] = {}
    used: set[str] = set()
    keys = [(service_id(n), "svc_" + n) for n in graph.services] + [
        (event_id(t), "evt_" + t) for t in graph.events
    ] + [(push_id(n), "push_" + n) for n in graph.push]
    for key, raw in keys:
        base = re.sub(r"[^A-Za-z0-9_]", "_", raw)
        candidate, n = base, 2
        while candidate in used:
            candidate, n = f"{base}_{n}", n + 1
        used.add(candidate)
        ids[key] = candidate
    return ids


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _mermaid_text(text: str) -> str:
    """Text for a quoted Mermaid label (or the ``%%`` comment): a line break (an App name, a
    multi-line ``where=``) is a ``<br/>``, since a raw one would end the line mid-label. A
    backtick is an entity too: ``"`...`"`` is a Mermaid markdown string."""
    escaped = (text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
               .replace("`", "#96;"))
    return _LINE_BREAK.sub("<br/>", escaped)


def to_mermaid(graph: FlowGraph) -> str:
    """``flowchart LR``: services as rounded boxes, events as stadiums, push subscribers as
    hexagons (name and host; their filters on the edges in), compensations dashed red."""
    ids = _mermaid_ids(graph)
    lines = [f"%% choreograph flow: {_mermaid_text(graph.name)}", "flowchart LR"]
    lines += [f"    classDef {name} {style}" for name, style in _MERMAID_CLASSES.items()]
    if graph.push:
        lines.append(f"    classDef push {_MERMAID_PUSH_CLASS}")
    lines += [f'    {ids[service_id(n)]}("{_mermaid_text(n)}"):::service' for n in graph.services]
    lines += [
        f'    {ids[event_id(t)]}(["{_mermaid_text(t)}"]):::{event_class(graph, t)}' for t in graph.events
    ]
    lines += [
        f'    {ids[push_id(n)]}{{{{"{_mermaid_text(n)}<br/>{_mermaid_text(node.host)}"}}}}:::push'
        for n, node in graph.push.items()
    ]
    red: list[int] = []
    for index, edge in enumerate(graph.edges):
        source, target = ids[edge.source], ids[edge.target]
        if edge.kind == "compensates":
            lines.append(f'    {source} -.->|"{_mermaid_text(edge.label)}"| {target}')
            red.append(index)
        elif edge.label:
            lines.append(f'    {source} -->|"{_mermaid_text(edge.label)}"| {target}')
        else:
            lines.append(f"    {source} --> {target}")
    if red:
        lines.append(
            f"    linkStyle {','.join(map(str, red))} stroke:{COMPENSATION_COLOUR},color:{COMPENSATION_COLOUR}"
        )
    return "\n".join(lines) + "\n"


# --- DOT ------------------------------------------------------------------------------------------

_DOT_FILL = {
    "event": "#f5f5f5",
    "ingress": "#e6f4ea",
    "completed": "#e3f2fd",
    "failed": "#fdecea",
    "runtime": "#fff8e1",
}


def _dot(text: str) -> str:
    """A quoted DOT ID; every line break (``\\r\\n`` and ``\\r`` too) is DOT's ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _LINE_BREAK.sub(r"\\n", escaped) + '"'


def _dot_edge(edge: Edge) -> str:
    attrs = ""
    if edge.kind == "compensates":
        attrs = (
            f' [style=dashed, color="{COMPENSATION_COLOUR}", fontcolor="{COMPENSATION_COLOUR}", '
            f"label={_dot(edge.label)}]"
        )
    elif edge.label:
        attrs = f" [label={_dot(edge.label)}]"
    return f"  {_dot(edge.source)} -> {_dot(edge.target)}{attrs};"


def to_dot(graph: FlowGraph) -> str:
    """Graphviz: services as rounded boxes, events as ovals, push subscribers as hexagons,
    compensations dashed red."""
    lines = [
        f"digraph {_dot(graph.name)} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    lines += [
        f'  {_dot(service_id(n))} [label={_dot(n)}, shape=box, style="rounded,filled", fillcolor="#e8f0fe"];'
        for n in graph.services
    ]
    for t in graph.events:
        kind = event_class(graph, t)
        style = (
            '"filled,bold"'
            if kind in ("completed", "failed")
            else '"filled,dashed"'
            if kind == "runtime"
            else "filled"
        )
        lines.append(
            f'  {_dot(event_id(t))} [label={_dot(t)}, shape=oval, style={style}, fillcolor="{_DOT_FILL[kind]}"];'
        )
    lines += [
        f"  {_dot(push_id(n))} [label={_dot(n + chr(10) + node.host)}, shape=hexagon, style=filled, "
        'fillcolor="#f3e5f5"];'
        for n, node in graph.push.items()
    ]
    lines += [_dot_edge(edge) for edge in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"
