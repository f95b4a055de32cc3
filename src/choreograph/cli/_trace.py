"""``choreograph trace``, ``transactions`` and ``journal``: follow transactions through the journal.

* ``choreograph journal APP --broker URL --store URL`` runs the journal (a passive
  observer of every event) until SIGTERM or Ctrl-C;
* ``choreograph trace CORRELATION_ID`` prints one transaction as a causation tree with
  the time of every event since the first (``--json`` for scripts);
* ``choreograph transactions --status stuck`` lists transactions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import typer
from rich.text import Text

from choreograph._journal_model import (
    DEFAULT_JOURNAL,
    DEFAULT_STUCK_AFTER,
    STATUSES,
    JournalEntry,
    Status,
    Transaction,
)
from choreograph._redact import redact
from choreograph.cli._common import (
    BrokerOption,
    LogFormatOption,
    broker_url,
    console,
    env_url,
    given_url,
    kind_of,
    load_object,
    printable,
    run_async,
    seconds,
)
from choreograph.cli._connect import ConnectTimeoutOption, Patience, unless_stopped
from choreograph.errors import ConfigurationError
from choreograph.logs import announce, configure_logging
from choreograph.service import App, Service

if TYPE_CHECKING:
    from rich.tree import Tree

    from choreograph.journal import Journal

JOURNAL_ENV = "CHOREOGRAPH_JOURNAL"
READY = "journal running"
"""Printed (stderr) once the journal consumes: ``choreograph dev`` waits for it."""

_STATUS_STYLE = {
    "running": "cyan", "completed": "green", "failed": "red", "compensated": "yellow",
    "compensation_failed": "bold red", "stuck": "magenta",
}
_KIND_STYLE = {"completed": "green", "failed": "red", "failure": "bold red", "timedout": "magenta", "event": ""}


def journal_url(value: str | None, option: str = "--journal") -> str:
    """The journal store's URL: ``option`` (``--journal``; ``journal --store``), else
    ``CHOREOGRAPH_JOURNAL``, else the default. Either given empty is refused, naming it."""
    what = "a journal store URL"
    return given_url(value, option, what) or env_url(JOURNAL_ENV, what) or DEFAULT_JOURNAL


def existing_journal_url(value: str | None) -> str:
    """:func:`journal_url` for commands that only read the journal: a SQLite journal file that
    does not exist is an error (a mistyped path), not a new empty journal created there."""
    url = journal_url(value)
    if url.startswith("sqlite:"):
        from choreograph.stores.sqlite import sqlite_path

        path = sqlite_path(url)
        if path != ":memory:" and not Path(path).exists():
            raise ConfigurationError(
                f"no journal at {path} (from {redact(url)}): start `choreograph journal` or `choreograph dev`, "
                f"or point --journal / {JOURNAL_ENV} at its file"
            )
    return url


JournalOption = typer.Option(
    None, "--journal", "-j", help=f"Journal store URL (env {JOURNAL_ENV}; default {DEFAULT_JOURNAL})", show_default=False
)


async def _query(url: str, fn: Any) -> Any:
    from choreograph.journal import Journal, open_journal_store

    journal = Journal(open_journal_store(url, read_only=True))
    try:
        return await fn(journal)
    finally:
        await journal.close()


def _dump(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- trace ------------------------------------------------------------------------------


def _label(entry: JournalEntry, start: float) -> Text:
    offset = (entry.at - start) * 1000
    label = Text(f"+{offset:,.1f} ms ", style="dim")
    label.append(printable(entry.type), style=_KIND_STYLE.get(entry.kind, "") or "bold")
    if entry.kind == "failure" and entry.failed_type:
        label.append(f" of {printable(entry.failed_type)}", style="red")
    label.append(f"  {printable(entry.service)}", style="blue")
    if entry.attempt is not None:
        label.append(f"  attempt {entry.attempt}", style="dim")
    label.append(f"  {printable(entry.outcome)}", style=_KIND_STYLE.get(entry.kind, "") or "green")
    if entry.error:
        label.append(f"  {printable(entry.error)}", style="red")
    return label


def causation_tree(tx: Transaction) -> Tree:
    """The timeline as a tree: each event under the event that caused it (orphans at the top)."""
    from rich.tree import Tree

    style = _STATUS_STYLE.get(tx.status, "")
    timeline = tx.timeline or []
    start = tx.summary.started_at
    span = (max((e.at for e in timeline), default=start) - start) * 1000
    title = Text("transaction ", style="bold")
    title.append(printable(tx.correlation_id), style="bold")
    title.append("  ")
    title.append(tx.status, style=f"bold {style}")
    title.append(f"  {len(timeline)} events over {span:,.1f} ms", style="dim")
    tree = Tree(title)
    ids = {e.event_id for e in timeline}
    children: dict[str | None, list[JournalEntry]] = {}
    for entry in timeline:
        parent = entry.causation_id if entry.causation_id in ids and entry.causation_id != entry.event_id else None
        children.setdefault(parent, []).append(entry)

    # Depth first without recursion: a causation chain of ~1,000 hops (a loop of events, with the
    # workers' max_hops raised) was a RecursionError.
    seen: set[str] = set()
    strays = iter(timeline)
    stack: list[tuple[Tree, JournalEntry]] = [(tree, entry) for entry in reversed(children.get(None, []))]
    while True:
        while stack:
            node, entry = stack.pop()
            if entry.event_id in seen:  # a causation cycle leads back to an event drawn already
                continue
            seen.add(entry.event_id)
            branch = node.add(_label(entry, start))
            stack.extend((branch, child) for child in reversed(children.get(entry.event_id, [])))
        # Events in a causation cycle (A caused by B, B by A: causation ids come from whoever
        # published) are nobody's descendant: at the top, from the first recorded, not left out.
        stray = next((entry for entry in strays if entry.event_id not in seen), None)
        if stray is None:
            return tree
        stack.append((tree, stray))


def trace(
    correlation_id: str = typer.Argument(
        ..., metavar="ID", help="The transaction's correlation id (the gateway's answer)"
    ),
    journal: str | None = JournalOption,
    json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Show one transaction: status and causation tree with timings."""
    url = existing_journal_url(journal)
    try:
        correlation_id.encode()
    except UnicodeEncodeError:  # a byte the terminal's encoding could not decode: SQLite's UnicodeEncodeError
        raise ConfigurationError(
            f"ID {correlation_id!r}: not UTF-8 text (bytes your terminal's encoding could not decode); "
            "no transaction has such an id"
        ) from None
    tx: Transaction | None = run_async(_query(url, lambda j: j.transaction(correlation_id)))
    if tx is None:
        raise ConfigurationError(f"no transaction {correlation_id!r} in the journal {redact(url)}")
    if json:
        _dump(tx.to_dict())
        return
    console.print(causation_tree(tx))


# -- transactions -----------------------------------------------------------------------


def transactions(
    status: str | None = typer.Option(None, "--status", "-s", help=f"One of {', '.join(STATUSES)}"),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000),
    journal: str | None = JournalOption,
    json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """List transactions, most recent first."""
    if status is not None and status not in STATUSES:
        raise ConfigurationError(f"--status {status!r}: expected one of {', '.join(STATUSES)}")
    wanted: Status | None = next((s for s in STATUSES if s == status), None)
    found: list[Transaction] = run_async(_query(existing_journal_url(journal), lambda j: j.transactions(wanted, limit)))
    if json:
        _dump([tx.to_dict() for tx in found])
        return
    from rich.table import Table

    table = Table(title=f"transactions ({len(found)})")
    table.add_column("correlation id", no_wrap=True)
    for column in ("status", "started by", "events", "failures", "terminal", "started at"):
        table.add_column(column)
    for tx in found:
        s = tx.summary
        table.add_row(
            Text(printable(s.correlation_id)), Text(tx.status, style=_STATUS_STYLE.get(tx.status, "")),
            Text(printable(s.root_type or "")), str(s.event_count), str(s.failures),
            Text(printable(s.terminal_type or "")), tx.to_dict()["started_at"],
        )
    console.print(table)


# -- journal ----------------------------------------------------------------------------


def _journal_for(target: str, store: str, broker: str, stuck_after: float) -> Journal:
    from choreograph.journal import Journal

    obj = load_object(target)
    if isinstance(obj, App):
        return Journal.from_app(obj, store, transport=broker, stuck_after=stuck_after)
    services = [obj] if isinstance(obj, Service) else obj
    if not (isinstance(services, (list, tuple)) and all(isinstance(s, Service) for s in services)):
        raise ConfigurationError(f"{target!r} is {kind_of(obj)}, not an App, a Service or a list of Services")
    from choreograph.joins import compensated_failures

    compensated = compensated_failures(services)
    return Journal(store, transport=broker, compensated=compensated, stuck_after=stuck_after)


def run_journal(
    target: str = typer.Argument(
        ..., metavar="MODULE:APP", help="MODULE:ATTR of the App (its terminal events and compensations)"
    ),
    broker: str | None = BrokerOption,
    store: str | None = typer.Option(None, "--store", help=f"Journal store URL (env {JOURNAL_ENV}; default {DEFAULT_JOURNAL})"),
    stuck_after: float = typer.Option(
        DEFAULT_STUCK_AFTER, "--stuck-after", callback=seconds(positive=True, forever=True),
        help="Seconds before a transaction without deadline is stuck (inf: never)",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR"),
    log_format: str = LogFormatOption,
    connect_timeout: float = ConnectTimeoutOption,
) -> None:
    """Run the journal: record every event by correlation id and announce stuck transactions."""
    configure_logging(log_level, log_format)
    url, store_url = broker_url(broker), journal_url(store, "--store")
    journal = _journal_for(target, store_url, url, stuck_after)

    async def connect() -> None:
        """The store, then the broker, as :meth:`Journal.start` opens them, each tried again while
        it cannot be reached (``--connect-timeout``)."""
        transport = journal.transport
        assert transport is not None  # given: the broker URL
        patience = Patience(connect_timeout)
        await patience.connect(journal.open, f"the journal store {redact(store_url)}")
        await patience.connect(transport.connect, f"the broker {redact(url)}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if not await unless_stopped(connect(), stop):
            announce("journal stopped while waiting to connect", colour="yellow")
            await journal.stop()
            return
        await journal.start()
        announce(f"{READY} on {redact(url)}, recording to {redact(store_url)} (pid {os.getpid()})")
        await stop.wait()
        await journal.stop()

    run_async(main())


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
    app.command("transactions")(transactions)
    app.command("journal")(run_journal)
