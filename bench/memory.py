"""Memory: what a worker holds, whether it leaks, and whether a backlog makes it grow.

Each figure comes from a fresh child process (RSS from ``/proc/self/status``: ``VmRSS`` now,
``VmHWM`` the peak), run side by side with its baseline in the same run:

* ``import``: resident size after importing choreograph (pydantic, orjson, the runtime),
  against a bare interpreter that imports only orjson.
* ``floor`` vs ``memory``: the 3-hop chain of bench/chain.py (N events) as the plain-asyncio
  floor and on choreograph's memory:// transport; ``peak_growth_mb`` is the peak over the
  process's size just before the run. The floor keeps up with its publisher, memory://
  does not (a backlog builds), so these peaks are not per-event figures: ``queued`` is.
* ``queued``: N events held unconsumed, in the floor's asyncio.Queue of JSON bodies and on
  a memory:// bus: resident bytes per queued event, and the ratio.
* ``soak``: one memory:// worker (inbox in a SQLite file, as ``choreograph run`` keeps it:
  an in-memory inbox holds each processed id for the retention period by design) kept
  running for ``--rounds`` rounds of N/4 events each;
  after every round (and a ``gc.collect()``) the live Python objects and RSS are counted.
  A leak shows as objects or bytes growing round after round; the figures are the growth
  per round (least squares) over the second half, after warm-up. Baseline: the same loop
  over the floor.
* ``sqlite_backlog``: a worker (the three hops, concurrency 64) started on a sqlite:// bus
  that already holds B events, sampled every 20 ms until it drained them, for a small and
  a 10x larger B. A worker that takes only what it can work on grows the same for both.

    python bench/memory.py                   # the README's figures (about a minute)
    python bench/memory.py --events 2000 --rounds 4 --backlog 500   # a smoke run

Prints JSON. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def _status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Make ``VmHWM`` start again from the current size (Linux >= 4.0; ignored where refused)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _mb(value: float) -> float:
    return round(value / MB, 2)


# -- children: each prints one JSON object on stdout -----------------------------------------


def child_import(what: str) -> dict[str, Any]:
    import orjson  # noqa: F401

    if what == "choreograph":
        import choreograph  # noqa: F401
        import choreograph.runtime.worker  # noqa: F401
        import choreograph.transports.memory  # noqa: F401
        import choreograph.transports.sqlite  # noqa: F401
    gc.collect()
    return {"rss_mb": _mb(_status("VmRSS"))}


def _prepare_chain() -> None:
    sys.path.insert(0, str(ROOT))
    import bench.chain  # noqa: F401  (imports choreograph too: both runs start from the same modules)


def child_run(what: str, n: int) -> dict[str, Any]:
    _prepare_chain()
    import orjson

    from bench.chain import floor, memory_run

    gc.collect()
    start = _status("VmRSS")
    _reset_peak()
    if what == "floor":
        figures = asyncio.run(floor(n, orjson.dumps, orjson.loads))
    else:
        figures = asyncio.run(memory_run(n, 256))
    peak = max(_status("VmHWM"), start)
    gc.collect()
    return {"start_mb": _mb(start), "peak_mb": _mb(peak), "peak_growth_mb": _mb(peak - start),
            "after_mb": _mb(_status("VmRSS")), "events_per_s": figures["events_per_s"]}


async def _queued(what: str, n: int) -> None:
    """Hold ``n`` events queued and unconsumed, as each path would: the floor's asyncio.Queue
    of JSON bodies, or a memory:// bus with one group that nobody consumes yet."""
    import orjson

    from bench.chain_app import Hop0
    from choreograph import Publisher
    from choreograph.transports.memory import MemoryTransport

    held: list[Any] = []
    if what == "floor":
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(orjson.dumps({"specversion": "1.0", "id": str(i), "source": "/bench", "type": "bench.hop0",
                                           "time": "2026-01-01T00:00:00Z", "correlationid": str(i), "hops": 0,
                                           "data": {"n": i, "t0": time.time()}}))
        held.append(queue)
    else:
        bus = MemoryTransport()
        held.append(await bus.subscribe("hop1", ["bench.hop0"]))
        publisher = Publisher(bus, source="/bench")
        for first in range(0, n, 500):
            await publisher.publish(*(Hop0(n=i, t0=time.time()) for i in range(first, min(n, first + 500))))
        held.append(bus)
    gc.collect()
    _HELD.extend(held)


_HELD: list[Any] = []


def child_queued(what: str, n: int) -> dict[str, Any]:
    _prepare_chain()
    gc.collect()
    start = _status("VmRSS")
    asyncio.run(_queued(what, n))
    grown = _status("VmRSS") - start
    return {"queued": n, "rss_growth_mb": _mb(grown), "bytes_per_queued_event": round(grown / n)}


async def _soak_floor(rounds: int, n: int, sample: Any) -> None:
    import orjson

    from bench.chain import floor

    for _ in range(rounds):
        await floor(n, orjson.dumps, orjson.loads)
        sample()


async def _soak_memory(rounds: int, n: int, sample: Any) -> None:
    from bench.chain_app import SINK, Hop0, hop1, hop2, hop3
    from choreograph import Publisher, Worker
    from choreograph.stores.sqlite import SQLiteStore
    from choreograph.transports.memory import MemoryTransport

    bus = MemoryTransport()
    with tempfile.TemporaryDirectory(prefix="choreograph-bench-memory-") as tmp:
        # The inbox on disk, as `choreograph run` keeps it: an in-memory inbox holds every
        # processed id for the retention period (7 days) by design, which is not a leak.
        store = SQLiteStore(f"sqlite:///{tmp}/inbox.db")
        async with Worker([hop1, hop2, hop3], bus, store=store, concurrency=256):
            await _rounds(publisher=Publisher(bus, source="/bench"), sink=SINK, event=Hop0, rounds=rounds, n=n,
                          sample=sample)
        await store.close()


async def _rounds(*, publisher: Any, sink: Any, event: Any, rounds: int, n: int, sample: Any) -> None:
    for _ in range(rounds):
        sink.reset(n, None)
        for first in range(0, n, 500):
            await publisher.publish(*(event(n=i, t0=time.time()) for i in range(first, min(n, first + 500))))
            await asyncio.sleep(0)
        while len(sink.latencies) < n:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # let the last settle batch finish
        sample()


def _slope(values: list[int]) -> float:
    """Least-squares growth per round (a few objects come and go with what is in flight)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sum((x - mean_x) ** 2 for x in range(n))


def child_soak(what: str, rounds: int, n: int) -> dict[str, Any]:
    _prepare_chain()
    rss: list[int] = []
    objects: list[int] = []

    def sample() -> None:
        gc.collect()
        rss.append(_status("VmRSS"))
        objects.append(len(gc.get_objects()))

    asyncio.run((_soak_floor if what == "floor" else _soak_memory)(rounds, n, sample))
    half = rounds // 2
    per_round_objects = _slope(objects[half:])
    per_round_bytes = _slope(rss[half:])
    return {
        "rss_mb_per_round": [_mb(v) for v in rss],
        "objects_per_round": objects,
        "object_growth_per_round": round(per_round_objects, 1),
        # A leak of even one object per event would read >= 1 here; in-flight leftovers are noise.
        "object_growth_per_event": round(per_round_objects / n, 3),
        "rss_growth_bytes_per_event": round(per_round_bytes / n, 2),
    }


async def _backlog(url: str, backlog: int) -> dict[str, Any]:
    from bench.chain_app import SINK, Hop0, hop1, hop2, hop3
    from choreograph import Publisher, Worker
    from choreograph.stores.sqlite import SQLiteStore
    from choreograph.transports import open_transport

    async with open_transport(url) as bus:
        for service in (hop1, hop2, hop3):  # register the groups, so the backlog waits for them
            subscription = await bus.subscribe(service.group, sorted(service.subscriptions))
            await subscription.close()
        publisher = Publisher(bus, source="/bench")
        for first in range(0, backlog, 500):
            await publisher.publish(*(Hop0(n=i, t0=time.time()) for i in range(first, min(backlog, first + 500))))
    SINK.reset(backlog, None)
    store = SQLiteStore(url.replace("bus.db", "inbox.db"))  # as `choreograph run` keeps it
    gc.collect()
    start = _status("VmRSS")
    _reset_peak()
    peak = start
    async with open_transport(url) as bus, Worker([hop1, hop2, hop3], bus, store=store, concurrency=64):
        began = time.perf_counter()
        while len(SINK.latencies) < backlog:
            peak = max(peak, _status("VmRSS"))
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - began
    peak = max(peak, _status("VmHWM"))
    await store.close()
    return {"backlog": backlog, "start_mb": _mb(start), "peak_mb": _mb(peak), "peak_growth_mb": _mb(peak - start),
            "events_per_s": round(backlog / elapsed)}


def child_backlog(backlog: int) -> dict[str, Any]:
    _prepare_chain()
    with tempfile.TemporaryDirectory(prefix="choreograph-bench-memory-") as tmp:
        return asyncio.run(_backlog(f"sqlite:///{tmp}/bus.db", backlog))


# -- the parent --------------------------------------------------------------------------------


def run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bench/memory.py child {args} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="events per floor/memory run and per soak round")
    parser.add_argument("--rounds", type=int, default=10, help="soak rounds")
    parser.add_argument("--backlog", type=int, default=2000, help="the small backlog (the large one is 10x)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "import":
            out = child_import(rest[0])
        elif what == "run":
            out = child_run(rest[0], int(rest[1]))
        elif what == "queued":
            out = child_queued(rest[0], int(rest[1]))
        elif what == "soak":
            out = child_soak(rest[0], int(rest[1]), int(rest[2]))
        else:
            out = child_backlog(int(rest[0]))
        print(json.dumps(out))
        return

    n, rounds = args.events, args.rounds
    soak_n = max(100, n // 4)
    report: dict[str, Any] = {"python": platform.python_version(), "events": n, "pid": os.getpid()}
    report["import"] = {"orjson_only": run_child("import", "bare"), "choreograph": run_child("import", "choreograph")}
    floor = run_child("run", "floor", str(n))
    memory = run_child("run", "memory", str(n))
    report["floor"], report["memory"] = floor, memory
    queued_floor, queued_memory = run_child("queued", "floor", str(n)), run_child("queued", "memory", str(n))
    report["queued"] = {"floor": queued_floor, "memory": queued_memory,
                        "memory_vs_floor": round(queued_memory["bytes_per_queued_event"]
                                                 / max(1, queued_floor["bytes_per_queued_event"]), 2)}
    report["soak"] = {"events_per_round": soak_n, "rounds": rounds,
                      "floor": run_child("soak", "floor", str(rounds), str(soak_n)),
                      "memory": run_child("soak", "memory", str(rounds), str(soak_n))}
    small, large = args.backlog, args.backlog * 10
    report["sqlite_backlog"] = {"small": run_child("backlog", str(small)), "large": run_child("backlog", str(large))}
    report["sqlite_backlog"]["large_vs_small_peak_growth_mb"] = round(
        report["sqlite_backlog"]["large"]["peak_growth_mb"] - report["sqlite_backlog"]["small"]["peak_growth_mb"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
