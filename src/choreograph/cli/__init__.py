"""The ``choreograph`` command line. Each subcommand group lives in its own module.

Errors in the user's input (a bad URL, an unknown module or event type) print one
clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import sys

import pydantic
import typer

from choreograph.cli import _dlq, _publish, _run
from choreograph.cli._common import console_error
from choreograph.errors import ChoreographError
from choreograph.events import format_validation_error

app = typer.Typer(
    name="choreograph",
    help="Run, inspect and poke choreographed services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(_run.run)
app.command("publish")(_publish.publish)
app.add_typer(_dlq.app, name="dlq")


def _register_optional() -> None:
    """Subcommands of the edges (HTTP, journal, graph, dev) register themselves if present."""
    import importlib

    for name in ("_graph", "_trace", "_watch", "_push", "_dev", "_gateway", "_chaos"):
        try:
            module = importlib.import_module(f"choreograph.cli.{name}")
        except ImportError as exc:
            if exc.name and exc.name.startswith("choreograph.cli."):
                continue
            raise
        module.register(app)


_register_optional()


def main() -> None:
    try:
        app()
    except ChoreographError as exc:
        console_error(str(exc))
        sys.exit(2)
    except pydantic.ValidationError as exc:
        console_error(format_validation_error(exc))
        sys.exit(2)
