"""``choreograph graph``, ``choreograph lint`` and ``choreograph asyncapi``: the flow, seen from the code.

All three load ``MODULE:ATTR`` (an App, a Service or a list of Services) and never touch
a broker. Renderings go to stdout as plain text (never through Rich, whose markup would
eat ``[...]`` in event types) or to ``--output FILE``. All three also take ``--push CONFIG``
(repeatable): the push subscriptions of ``choreograph push --config`` files join the flow as
consumers (read without their secrets: none need to be set); in the AsyncAPI document each
receives its types and sends what it declares it emits.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.markup import escape

from choreograph.cli._common import console, err_console, load_services
from choreograph.errors import ConfigurationError

if TYPE_CHECKING:
    from choreograph.flow import FlowGraph

Target = Annotated[
    str,
    typer.Argument(
        metavar="MODULE:ATTR", help="An App, a Service or a list of Services, e.g. examples.chain:app"
    ),
]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="Write to FILE instead of stdout")]
PushConfigs = Annotated[
    list[Path] | None,
    typer.Option(
        "--push", "-p", metavar="CONFIG",
        help="A `choreograph push --config` file (TOML/YAML): its subscriptions join the flow (repeatable)",
    ),
]
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


class Format(enum.StrEnum):
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


def _graph_of(target: str, push: list[Path] | None = None) -> FlowGraph:
    # Imported here, as in every command module: a command pays only for what it uses
    # (the push config reads its subscriptions with the push ambassador's own types).
    from choreograph._push_config import load_config
    from choreograph.flow import build

    services, app = load_services(target)
    subscriptions = [sub for path in push or () for sub in load_config(path, credentials=False).subscriptions]
    return build(
        app if app is not None else services,
        name=None if app is not None else target.partition(":")[2],
        push=subscriptions,
    )


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    from choreograph._sqlite import why_not_made

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # "File exists" for -o /etc/hostname/flow.md: that one is a file, not a folder
        raise ConfigurationError(f"{output}: cannot write ({why_not_made(output.parent, exc)})") from None
    try:
        output.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{output}: cannot write ({exc.strerror or exc})") from None
    err_console.print(f"wrote {escape(str(output))}", highlight=False, emoji=False)  # "flow:ok:.md" as it is


def graph(
    target: Target,
    format: Annotated[Format, typer.Option("--format", "-f", help="mermaid, dot or json")] = Format.mermaid,
    output: Output = None,
    push: PushConfigs = None,
) -> None:
    """Draw the flow: services, event types, and the consumes/emits/compensates edges between them."""
    flow = _graph_of(target, push)
    text = {Format.mermaid: flow.to_mermaid, Format.dot: flow.to_dot, Format.json: flow.to_json}[format]()
    _emit(text, output)


def lint_command(
    target: Target,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON")] = False,
    push: PushConfigs = None,
) -> None:
    """Check the flow: dead ends, missing producers, cycles, uncompensated failures, endless transactions.

    Exits with status 1 when there is at least one error (warnings alone exit 0).
    """
    from choreograph.flow import lint

    flow = _graph_of(target, push)
    findings = lint(flow)
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    if as_json:
        doc = {
            "name": flow.name,
            "errors": errors,
            "warnings": warnings,
            "findings": [f.to_dict() for f in findings],
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        if findings:
            from rich.table import Table
            from rich.text import Text

            table = Table.grid(padding=(0, 1))
            table.add_column(no_wrap=True)
            table.add_column(no_wrap=True)
            table.add_column(overflow="fold")
            for f in findings:
                table.add_row(
                    Text(f.severity, style=_SEVERITY_STYLE[f.severity]),
                    Text(f.code, style="bold"),
                    Text(f.message),
                )
            console.print(table, highlight=False)
        size = f"{len(flow.services)} services, {len(flow.events)} event types"
        if flow.push:
            size += f", {len(flow.push)} push subscription{'s' * (len(flow.push) != 1)}"
        if errors or warnings:
            mark = "[bold red]✗[/]" if errors else "[yellow]![/]"
            counts = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
            console.print(f"{mark} {escape(flow.name)}: {counts} ({size})", highlight=False)
        else:
            console.print(f"[green]✓[/] {escape(flow.name)}: no problems found ({size})", highlight=False)
    if errors:
        raise typer.Exit(1)


def asyncapi(
    target: Target,
    output: Output = None,
    version: Annotated[str, typer.Option("--version", help="info.version of the document")] = "1.0.0",
    title: Annotated[str | None, typer.Option("--title", help="info.title (default: the App's name)")] = None,
    push: PushConfigs = None,
) -> None:
    """Write one AsyncAPI 3.0 document (JSON) for the app: a channel per event type, operations per
    service and per push subscriber (--push)."""
    from choreograph.asyncapi import asyncapi_document

    doc = asyncapi_document(_graph_of(target, push), version=version, title=title)
    try:
        text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    except TypeError:  # an integer beyond 64 bits in an event's schema (Field(lt=10**20)): orjson has none
        import json

        text = json.dumps(doc, indent=2, ensure_ascii=False)
    _emit(text, output)


def register(app: typer.Typer) -> None:
    app.command("graph")(graph)
    app.command("lint")(lint_command)
    app.command("asyncapi")(asyncapi)
