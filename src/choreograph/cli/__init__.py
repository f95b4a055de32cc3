"""The ``choreograph`` command line. Each subcommand group lives in its own module.

Errors in the user's input (a bad URL, an unknown module or event type) print one
clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import pydantic
import typer
from typer.core import TyperGroup

from choreograph.cli import _dlq, _groups, _publish, _run
from choreograph.cli._common import console_error
from choreograph.errors import ChoreographError
from choreograph.events import format_validation_error
from choreograph.logs import quiet_client_loggers


class _Group(TyperGroup):
    """The root command: its usage errors are printed in one line (:func:`_usage_error`).

    Typer prints a usage error with ``typer.rich_utils.rich_format_error``, looked up once the
    error has been raised. Replacing it then, as the error passes the root command, rather
    than at import keeps ``typer.rich_utils`` (Rich's Markdown, panels, Pygments' lexers:
    a hundred modules, about 0.1 s) out of every command that prints no help and no error.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except typer.TyperException:  # a usage error of the root command (or no command: the help)
            _one_line_usage_errors()
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.TyperException:  # a usage error of a subcommand, or one a command raised
            _one_line_usage_errors()
            raise


app = typer.Typer(
    name="choreograph",
    cls=_Group,
    help="Run, inspect and poke choreographed services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(_run.run)
app.command("publish")(_publish.publish)
app.add_typer(_dlq.app, name="dlq")
app.add_typer(_groups.app, name="groups")


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


def _usage_error(error: Exception) -> None:
    """A usage error (a missing option, a value out of range) as one line: ``error: ...``
    and where the help is, instead of Typer's boxed panel with the usage above it."""
    if type(error).__name__ == "NoArgsIsHelpError":  # the help was printed: nothing to add
        return
    format_message = getattr(error, "format_message", None)
    message = format_message() if callable(format_message) else str(error)
    ctx = getattr(error, "ctx", None)
    where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    console_error(" ".join(message.split()) + where)


def _one_line_usage_errors() -> None:
    """Typer prints a usage error through ``typer.rich_utils.rich_format_error``, looked up
    when the error happens: replacing it keeps Rich help pages and makes the errors one line.
    A Typer without that function keeps its own format. Called by :class:`_Group` as an
    error goes by."""
    try:
        from typer import rich_utils
    except ImportError:
        return
    if hasattr(rich_utils, "rich_format_error"):
        setattr(rich_utils, "rich_format_error", _usage_error)  # noqa: B010 - typed for ClickException only


#: What writing to a full disk, a failing device or a closed pipe raises: the output is lost, not the command.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EPIPE})


def _abandon_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still buffered does
    not fail again at exit ("Exception ignored ... OSError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout: nothing is flushed to one either
        pass


def main() -> None:
    quiet_client_loggers()  # a refused connection is choreograph's one error line (--log-level debug: theirs too)
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # a full disk is reported here, in one line, not at interpreter exit
    except OSError as exc:
        if exc.filename is not None or exc.errno not in _OUTPUT_ERRNOS:
            raise
        _abandon_stdout()
        if exc.errno == errno.EPIPE:  # `choreograph ... | head`: the reader has all it wanted
            sys.exit(1)
        console_error(f"cannot write the output: {exc.strerror}")
        sys.exit(2)
    except ChoreographError as exc:
        console_error(str(exc))
        sys.exit(2)
    except pydantic.ValidationError as exc:
        console_error(format_validation_error(exc))
        sys.exit(2)
