"""What ``choreograph watch`` draws: the view of one snapshot, redrawn or streamed.

Imported by :func:`choreograph.cli._watch.watch` when it runs, so the other commands do
not pay for Rich's live display, the flow graph and the snapshot model. What is shown is
built by :mod:`choreograph._watch_model`; this module only draws it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import datetime

import orjson
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from choreograph._journal_store import JournalStore
from choreograph._watch_model import ATTENTION, EdgeTraffic, Snapshot, TransactionRow, read_snapshot
from choreograph.cli._common import console, err_console, load_services, printable
from choreograph.cli._trace import _STATUS_STYLE
from choreograph.errors import StoreError
from choreograph.flow import FlowGraph, build

_KIND_STYLE = {"completed": "green", "failed": "red", "failure": "bold red", "timedout": "magenta"}
_ALERT = "bold white on red"


def _duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 m 20 s``, ``10 m``, ``2 h 05 m``, ``3 d 04 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            rest = whole % size // sub_size
            return f"{whole // size} {unit}" + (f" {rest:02d} {sub}" if rest else "")
    return f"{whole} s"


def _rate(per_second: float) -> str:
    """Events per second with the digits that matter: ``0``, ``0.017``, ``2.5``, ``1,250``."""
    if per_second == 0:
        return "0"
    if per_second < 1:
        return f"{per_second:.3f}"
    return f"{per_second:.1f}" if per_second < 100 else f"{per_second:,.0f}"


def _header(snap: Snapshot, error: str | None) -> Text:
    text = Text()
    text.append("choreograph watch", style="bold")
    if snap.app:
        text.append(f"  {printable(snap.app)}", style="bold cyan")
    text.append(f"  journal {printable(snap.journal)}", style="dim")
    text.append(f"  {datetime.fromtimestamp(snap.now).strftime('%H:%M:%S')}", style="dim")
    text.append(f"  window {_duration(snap.window)}", style="dim")
    if error:
        text.append(f"\n{error} (showing the last good view)", style=_ALERT)
    text.append(f"\n{snap.total} transactions:")
    for status, count in snap.statuses.items():
        alert = count and status in ATTENTION
        text.append("  ")
        text.append(f"{status} {count}", style=_ALERT if alert else _STATUS_STYLE.get(status, ""))
    return text


def _note(edge: EdgeTraffic) -> Text:
    if edge.kind == "failure":
        return Text(f"gave up on {printable(edge.failed_type or '?')}", style="bold red")
    if edge.kind == "timedout":
        return Text("timed out", style="magenta")
    if edge.idle:
        return Text("no traffic", style="dim")
    if edge.declared is False:
        return Text("not in the graph", style="yellow")
    if edge.terminal:
        return Text(f"terminal: {edge.terminal}", style=_KIND_STYLE[edge.terminal])
    return Text("")


def _edges(snap: Snapshot) -> Table:
    table = Table(title=f"flow: {snap.events_in_window} events in the last {_duration(snap.window)}", title_justify="left")
    table.add_column("service", no_wrap=True)
    table.add_column("event type", no_wrap=True)
    table.add_column("events", justify="right")
    table.add_column("per s", justify="right")
    table.add_column("last", justify="right")
    table.add_column("")
    for edge in snap.edges:
        row_style = "dim" if edge.idle else ""
        service = Text(printable(edge.service), style="blue") if edge.service else Text("(ingress)", style="italic")
        kind_style = _KIND_STYLE.get(edge.kind) or (_KIND_STYLE[edge.terminal] if edge.terminal else "")
        # recorded on the journal's clock, read on this host's: one ahead is not "-0.4 s ago"
        last = f"{_duration(max(0.0, snap.now - edge.last_at))} ago" if edge.last_at is not None else ""
        table.add_row(
            service, Text("→ " + printable(edge.type), style=kind_style), str(edge.count), _rate(edge.rate), last,
            _note(edge), style=row_style,
        )
    if not snap.edges:
        table.add_row(Text("nothing recorded in the window", style="dim"), "", "", "", "", "")
    return table


def _transactions(title: str, rows: list[TransactionRow], *, alert: bool = False) -> Table:
    table = Table(title=title, title_justify="left", border_style="red" if alert else "")
    table.add_column("correlation id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("age", justify="right")
    table.add_column("last event", no_wrap=True)
    table.add_column("by", no_wrap=True)
    table.add_column("quiet for", justify="right")
    table.add_column("events", justify="right")
    table.add_column("failures", justify="right")
    for row in rows:
        status = Text(row.status, style=_ALERT if row.attention else _STATUS_STYLE.get(row.status, ""))
        last = Text(printable(row.last_type or ""), style=_KIND_STYLE.get(row.last_kind or "", ""))
        table.add_row(
            Text(printable(row.correlation_id)), status, _duration(row.age), last,
            Text(printable(row.last_service or ""), style="blue"),
            _duration(row.idle_for), str(row.event_count), Text(str(row.failures), style="red" if row.failures else ""),
        )
    return table


def render(snap: Snapshot, error: str | None = None) -> RenderableType:
    """The whole view of one snapshot (``error``: why it is not fresh)."""
    parts: list[RenderableType] = [_header(snap, error), _edges(snap)]
    if snap.attention:
        parts.append(_transactions(f"stuck or failed ({len(snap.attention)} newest)", snap.attention, alert=True))
    parts.append(_transactions(f"newest transactions ({len(snap.newest)})", snap.newest))
    return Group(*parts)


def graph_of(target: str) -> FlowGraph:
    services, app = load_services(target)
    return build(app if app is not None else services, name=None if app is not None else target.partition(":")[2])


class Watcher:
    """One store, read every interval, each snapshot shown the chosen way."""

    def __init__(self, store: JournalStore, graph: FlowGraph | None, window: float, limit: int, json: bool) -> None:
        self.store, self.graph, self.window, self.limit, self.json = store, graph, window, limit, json

    async def read(self) -> Snapshot:
        return await read_snapshot(self.store, now=time.time(), window=self.window, graph=self.graph, limit=self.limit)

    def print_json(self, snap: Snapshot, *, indent: bool) -> None:
        option = orjson.OPT_INDENT_2 if indent else 0
        sys.stdout.write(orjson.dumps(snap.to_dict(), option=option).decode() + "\n")
        sys.stdout.flush()

    async def once(self) -> None:
        snap = await self.read()
        if self.json:
            self.print_json(snap, indent=True)
        else:
            console.print(render(snap), highlight=False)

    async def run(self, interval: float) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        snap = await self.read()  # a journal that cannot be read at all is an error, not a view
        if self.json or not console.is_terminal:
            await self._stream(snap, stop, interval)
            return
        with Live(render(snap), console=console, screen=True, auto_refresh=False) as live:
            while not await _stopped(stop, interval):
                error = None
                try:
                    snap = await self.read()
                except StoreError as exc:  # the store restarts, the network blips: keep watching
                    error = str(exc)
                live.update(render(snap, error), refresh=True)

    async def _stream(self, snap: Snapshot, stop: asyncio.Event, interval: float) -> None:
        while True:
            if self.json:
                self.print_json(snap, indent=False)
            else:
                console.print(render(snap), highlight=False)
                console.print()
            while True:
                if await _stopped(stop, interval):
                    return
                try:
                    snap = await self.read()
                    break
                except StoreError as exc:
                    # a Text: the error is not Rich markup ("/data/[prod]/journal.db" lost "[prod]"; a
                    # "[/x]" in it raised MarkupError and ended the watch)
                    err_console.print(Text.assemble(("journal unreadable:", "yellow"), f" {exc}"), highlight=False)


async def _stopped(stop: asyncio.Event, interval: float) -> bool:
    """Wait ``interval`` seconds; whether ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), interval)
    except TimeoutError:
        return False
    return True
