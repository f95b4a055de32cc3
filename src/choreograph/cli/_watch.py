"""``choreograph watch``: the flow's traffic and its transactions, live, from the journal store.

It reads only the journal store (``--journal``, as ``trace`` and ``transactions`` do),
never the bus, so it creates no consumer group and any number can run beside a live
system. ``MODULE:ATTR`` (optional, as ``graph`` takes) adds the flow graph: edges that
saw no traffic, traffic the graph does not draw, terminal types. On a terminal the view
is redrawn every ``--interval`` seconds until Ctrl-C; piped, one view is printed per
interval; ``--once`` prints one and exits; ``--json`` prints snapshots as JSON (indented
with ``--once``, else one line per interval). What is shown is built by
:mod:`choreograph._watch_model` and drawn by :mod:`choreograph.cli._watch_view`, both
imported only when the command runs.
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from choreograph.cli._common import run_async
from choreograph.cli._trace import JournalOption, existing_journal_url
from choreograph.errors import ConfigurationError


def _positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} {value:g}: expected a positive number of seconds")
    return value


def watch(
    target: Annotated[
        str | None,
        typer.Argument(metavar="MODULE:ATTR", help="The App (or Services) whose flow graph to lay over the traffic"),
    ] = None,
    journal: str | None = JournalOption,
    interval: Annotated[float, typer.Option("--interval", "-i", help="Seconds between refreshes")] = 1.0,
    window: Annotated[float, typer.Option("--window", "-w", help="Count edge traffic over the last S seconds")] = 60.0,
    limit: Annotated[int, typer.Option("--limit", help="Transactions listed (newest; stuck or failed)")] = 10,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit")] = False,
    json: Annotated[bool, typer.Option("--json", help="Snapshots as JSON (one line each unless --once)")] = False,
) -> None:
    """Watch the flow live: traffic per edge, transactions by status, stuck and failed ones first."""
    _positive("--interval", interval)
    _positive("--window", window)
    if limit < 1:
        raise ConfigurationError(f"--limit {limit}: expected at least 1")
    limit = min(limit, 2**62)  # more is "all", and overflowed SQLite's integers (a traceback)
    from choreograph._journal_store import open_journal_store
    from choreograph.cli._watch_view import Watcher, graph_of

    graph = graph_of(target) if target else None
    store = open_journal_store(existing_journal_url(journal), read_only=True)
    watcher = Watcher(store, graph, window, limit, json)

    async def main() -> None:
        await store.open()
        try:
            await (watcher.once() if once else watcher.run(interval))
        finally:
            await store.close()

    run_async(main())


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)
