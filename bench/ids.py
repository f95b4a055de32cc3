"""Random against time-ordered event ids: what the inbox pays for each.

Since 2026-12-03 ``new_id()`` makes UUIDv7s and an output of a UUIDv7 input keeps its time
(``derive_id``), so an inbox records ids in about key order. An input with any other id
(a UUIDv4 from a foreign publisher, or from an older choreograph) still derives UUID5
outputs: the *random* side below is how every id behaved before.

* ``inbox``: the SQLite inbox store alone - ``--retained`` ids recorded first, then
  ``--n`` more recorded ``--batch`` at a time (``mark``, then ``seen`` of the same ids);
  CPU µs per id, random (UUIDv4) against ordered (``new_id``) ids.
* ``chain``: the 3-hop chain of bench/chain.py with a process per hop (``choreograph
  run``, SQLite inbox) on ``--broker`` (default a SQLite bus file), its first events
  published with random or with ordered ids - every hop's inbox then records ids of that
  kind. Events/s; the two sides interleaved for ``--rounds`` rounds, medians reported.

    python bench/ids.py                                   # both, SQLite bus
    python bench/ids.py --only chain --broker redis://127.0.0.1:6379/0 --rounds 5

Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _gc  # noqa: E402
from bench.chain import hops_run  # noqa: E402
from bench.chain_app import Hop0  # noqa: E402
from choreograph import Publisher  # noqa: E402
from choreograph._envelope import new_id  # noqa: E402
from choreograph.stores.sqlite import SQLiteStore  # noqa: E402
from choreograph.transports import open_transport  # noqa: E402

SIDES = {"random": lambda: str(uuid.uuid4()), "ordered": new_id}


async def inbox_run(side: str, retained: int, n: int, batch: int) -> dict[str, float]:
    make = SIDES[side]
    with tempfile.TemporaryDirectory(prefix="choreograph-bench-ids-") as tmp:
        store = SQLiteStore(f"sqlite:///{tmp}/inbox.db")
        await store.open()
        try:
            for first in range(0, retained, 5000):
                await store.mark("g", [make() for _ in range(min(5000, retained - first))])
            ids = [make() for _ in range(n)]
            started = time.process_time()
            for first in range(0, n, batch):
                await store.mark("g", ids[first:first + batch])
            marked = time.process_time()
            for first in range(0, n, batch):
                await store.seen("g", ids[first:first + batch])
            looked_up = time.process_time()
        finally:
            await store.close()
    return {
        "mark_us_per_id": round((marked - started) / n * 1e6, 2),
        "seen_us_per_id": round((looked_up - marked) / n * 1e6, 2),
    }


async def publish(url: str, n: int, side: str) -> None:
    make = SIDES[side]
    async with open_transport(url) as bus:
        publisher = Publisher(bus, source="/bench")
        for first in range(0, n, 500):
            events = [Hop0(n=i, t0=time.time()) for i in range(first, min(n, first + 500))]
            await publisher.publish(*events, ids=[make() for _ in events])


def chain_run(broker: str | None, side: str, n: int, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="choreograph-bench-ids-") as tmpdir:
        tmp = Path(tmpdir)
        if broker is None:
            url = f"sqlite:///{tmp}/bus.db"
            return hops_run(url, tmp, n, concurrency, lambda: publish(url, n, side))
        url = broker + ("&" if "?" in broker else "?") + f"prefix=bench-ids-{uuid.uuid4().hex[:8]}"  # a bus of its own
        try:
            return hops_run(url, tmp, n, concurrency, lambda: publish(url, n, side))
        finally:
            from bench import _broker_env

            scheme = url.split(":", 1)[0]
            asyncio.run(_broker_env.remove_choreograph_bus(scheme if scheme in ("nats", "redis") else "amqp", url))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["inbox", "chain"])
    parser.add_argument("--retained", type=int, default=200_000, help="ids already in the inbox (inbox run)")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=50, help="ids per mark / seen call (inbox run)")
    parser.add_argument("--broker", help="the chain's bus (default: a SQLite file); e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    _gc.add_option(parser)
    args = parser.parse_args()
    report: dict[str, Any] = {"bench": "ids", **_gc.choose(args.gc)}
    if args.only in (None, "inbox"):
        runs = {side: [asyncio.run(inbox_run(side, args.retained, args.n, args.batch)) for _ in range(args.rounds)]
                for side in SIDES}
        report["inbox"] = {"retained": args.retained, "n": args.n, "batch": args.batch, **{
            side: {key: statistics.median(r[key] for r in each) for key in each[0]} for side, each in runs.items()
        }}
    if args.only in (None, "chain"):
        chain: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits both alike
            for side in SIDES:
                chain[side].append(chain_run(args.broker, side, args.n, args.concurrency)["events_per_s"])
        report["chain"] = {"broker": args.broker or "sqlite", "n": args.n, **{
            side: {"events_per_s": statistics.median(each), "events_per_s_each": each} for side, each in chain.items()
        }}
        report["chain"]["ordered_vs_random"] = round(
            report["chain"]["ordered"]["events_per_s"] / report["chain"]["random"]["events_per_s"], 2
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
