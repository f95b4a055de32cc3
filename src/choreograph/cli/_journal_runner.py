"""The journal as a process of its own: ``python -m choreograph.cli._journal_runner APP --broker URL --store URL``.

``choreograph dev`` starts it when the installation has no ``choreograph journal``
command: it observes every event on the bus (its own wildcard group) and records
it in the journal store the gateway's ``/transactions`` reads, until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from choreograph.cli._common import err_console, load_object, run_async
from choreograph.errors import ConfigurationError
from choreograph.journal import Journal
from choreograph.service import App

READY = "journal running"


async def serve(app: App, broker: str, store: str, stuck_after: float) -> None:
    journal = Journal.from_app(app, store, transport=broker, stuck_after=stuck_after)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await journal.start()
    err_console.print(
        f"[green]choreograph[/] {READY} on {broker}, recording to {store} (pid {os.getpid()})",
        highlight=False,
    )
    await stop.wait()
    await journal.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="choreograph-journal", description=__doc__)
    parser.add_argument("target", help="MODULE:ATTR of the App (its terminal events and compensations)")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--store", required=True, help="journal store URL, e.g. sqlite:///var/app/journal.db")
    parser.add_argument("--stuck-after", type=float, default=300.0)
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load_object(args.target)
    if not isinstance(app, App):
        raise ConfigurationError(f"{args.target!r} is not an App")
    run_async(serve(app, args.broker, args.store, args.stuck_after))


if __name__ == "__main__":
    main()
