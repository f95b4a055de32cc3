"""Each command's usage line names its arguments in the words of the README's CLI table."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from choreograph.cli import app


def usage(*path: str) -> str:
    """The usage line's arguments of ``choreograph PATH...`` (``--help`` prints them after ``[OPTIONS]``).

    Typed loosely: Typer 0.29 builds its commands on its own copy of click, 0.28 on click."""
    command: Any = typer.main.get_command(app)
    ctx = command.context_class(command, info_name="choreograph")
    for name in path:
        command = command.get_command(ctx, name)
        assert command is not None, name
        ctx = command.context_class(command, info_name=name, parent=ctx)
    return " ".join(piece for piece in command.collect_usage_pieces(ctx) if piece != "[OPTIONS]")


@pytest.mark.parametrize(
    ("path", "names"),
    [
        (["run"], ["MODULE:ATTR"]),
        (["publish"], ["TYPE"]),
        (["dlq", "show"], ["ID"]),
        (["dlq", "replay"], ["ID"]),
        (["dlq", "purge"], ["ID"]),
        (["groups", "unbind"], ["GROUP", "TYPE"]),
        (["dev"], ["MODULE:APP"]),
        (["gateway"], ["MODULE:GATEWAY"]),
        (["journal"], ["MODULE:APP"]),
        (["trace"], ["ID"]),
        (["watch"], ["MODULE:ATTR"]),
        (["graph"], ["MODULE:ATTR"]),
        (["lint"], ["MODULE:ATTR"]),
        (["asyncapi"], ["MODULE:ATTR"]),
        (["chaos"], ["MODULE:APP"]),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_the_usage_line_names_the_arguments_as_the_readme_does(path: list[str], names: list[str]) -> None:
    """Not the Python parameter (``{target}``, ``{message_id}``), which is all Typer shows without a metavar."""
    pieces = usage(*path)
    # Typer 0.29 wraps a required argument in braces, an optional one in brackets, and adds "..." to a
    # list; 0.28 prints the metavar as given
    assert [piece.strip("{}[].") for piece in pieces.split()] == names, pieces
