"""Benchmark: a 3-hop chain (publisher → hop1 → hop2 → hop3) on memory:// and sqlite://.

Prints one JSON document with, for each run, events/s end to end and p50/p99
end-to-end latency (publish → hop3 handled), plus the *floor*: a plain asyncio
pipeline doing the same JSON decode + encode per hop with no framework at all,
measured in the same run so the ratio is fair on a shared machine. The floor gives each
output a new id (uuid4) and time, as any valid CloudEvent needs, and nothing else: no
validation, no dedupe, no durability, one asyncio queue per hop.

* ``codec``: the floor's pipeline doing choreograph's own per-event work and nothing else -
  decode and check the envelope, validate the payload into the handler's model, call the
  handler, build and encode its output envelope (derived id, time) - with no runtime: no
  inbox, no leases, no settling, no acks. What the typed events alone cost against the
  floor; ``memory`` against ``codec`` is what the at-least-once runtime costs.
* ``memory``: the three services in one process on the in-memory transport.
* ``sqlite``: each hop its own ``choreograph run`` process on one bus file
  (WAL, synchronous=NORMAL: a returned commit survives a process crash).
* ``sqlite_paced``: end-to-end latency at a light load (``--rate`` events/s).

    python bench/chain.py --n 20000            # the README's figures
    python bench/chain.py --n 2000 --quick     # a smoke run
    python bench/chain.py --gc python          # CPython's collector settings in every process

Every process runs with the collector settings of ``choreograph run`` unless ``--gc python``
(bench/_gc.py): the floor too, so the ratio compares code, not settings. The floor and
memory:// runs are repeated ``--rounds`` times (default 3), interleaved: each figure is the
median run, each ratio the median of the ratios within a round (every round's is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _gc  # noqa: E402
from bench.chain_app import SINK, Hop0, hop1, hop2, hop3  # noqa: E402
from choreograph import Publisher, Worker  # noqa: E402
from choreograph._envelope import decode, new_id, now_rfc3339  # noqa: E402
from choreograph.runtime.records import first_envelope, output_message, to_message  # noqa: E402
from choreograph.transports import open_transport  # noqa: E402
from choreograph.transports.base import Message  # noqa: E402
from choreograph.transports.memory import MemoryTransport  # noqa: E402


def summarize(latencies: list[float], elapsed: float) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "events": len(ordered),
        "events_per_s": round(len(ordered) / elapsed, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "seconds": round(elapsed, 2),
    }


# -- the floor: plain asyncio, same JSON work per hop ---------------------------------------


async def floor(n: int, dumps: Any, loads: Any) -> dict[str, Any]:
    queues: list[asyncio.Queue[bytes]] = [asyncio.Queue() for _ in range(3)]
    latencies: list[float] = []
    done = asyncio.Event()

    async def stage(i: int) -> None:
        inbox = queues[i]
        outbox = queues[i + 1] if i < 2 else None
        while True:
            event = loads(await inbox.get())
            data = event["data"]
            if outbox is None:
                latencies.append(time.time() - data["t0"])
                if len(latencies) == n:
                    done.set()
                continue
            # A valid next CloudEvent needs a new id and time: the floor pays for those too.
            out = {**event, "id": str(uuid.uuid4()), "time": now_rfc3339(), "type": f"bench.hop{i + 1}",
                   "causationid": event["id"], "hops": event["hops"] + 1,
                   "data": {"n": data["n"], "t0": data["t0"]}}
            outbox.put_nowait(dumps(out))

    tasks = [asyncio.create_task(stage(i)) for i in range(3)]
    start = time.perf_counter()
    for i in range(n):
        queues[0].put_nowait(dumps({"specversion": "1.0", "id": str(i), "source": "/bench", "type": "bench.hop0",
                                    "time": "2026-01-01T00:00:00Z", "correlationid": str(i), "hops": 0,
                                    "data": {"n": i, "t0": time.time()}}))
        if i % 500 == 0:
            await asyncio.sleep(0)
    await done.wait()
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    return summarize(latencies, elapsed)


# -- the floor with choreograph's codec: its per-event work, no runtime ---------------------


async def codec_floor(n: int) -> dict[str, Any]:
    """The floor's pipeline (a queue per hop, a task per hop) doing what choreograph's worker does
    for every event before and after the handler, by the same functions - and nothing else."""
    queues: list[asyncio.Queue[Message]] = [asyncio.Queue() for _ in range(3)]
    SINK.reset(n, None)

    async def stage(i: int) -> None:
        (handler,) = (hop1, hop2, hop3)[i].all_handlers()
        source = (hop1, hop2, hop3)[i].source
        validate = handler.consumes.__pydantic_validator__.validate_python
        inbox = queues[i]
        outbox = queues[i + 1] if i < 2 else None
        while True:
            envelope = decode((await inbox.get()).body)
            coro = handler.func(validate(envelope.data))
            try:
                coro.send(None)
            except StopIteration as done:
                result = done.value
            else:
                raise RuntimeError(f"{handler.name} suspended")
            if outbox is not None:
                outbox.put_nowait(output_message(result, envelope, handler.id_suffix0, source))

    tasks = [asyncio.create_task(stage(i)) for i in range(3)]
    start = time.perf_counter()
    for i in range(n):
        queues[0].put_nowait(to_message(first_envelope(Hop0(n=i, t0=time.time()), source="/bench", id=new_id())))
        if i % 500 == 0:
            await asyncio.sleep(0)
    while len(SINK.latencies) < n:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    return summarize(SINK.latencies, elapsed)


# -- choreograph in one process on memory:// -------------------------------------------------


async def memory_run(n: int, concurrency: int) -> dict[str, Any]:
    bus = MemoryTransport()
    SINK.reset(n, None)
    async with Worker([hop1, hop2, hop3], bus, concurrency=concurrency):
        publisher = Publisher(bus, source="/bench")
        start = time.perf_counter()
        for first in range(0, n, 500):
            await publisher.publish(*(Hop0(n=i, t0=time.time()) for i in range(first, min(n, first + 500))))
            await asyncio.sleep(0)
        while len(SINK.latencies) < n:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
    return summarize(SINK.latencies, elapsed)


# -- choreograph with a process per hop on sqlite:// -----------------------------------------


def start_hops(url: str, tmp: Path, n: int, out: Path, concurrency: int,
               stages: Path | None = None, inbox: str = "sqlite") -> list[subprocess.Popen[bytes]]:
    """The three hops as ``choreograph run`` processes; with ``stages``, each stamps its steps
    into that folder (bench/_stages/sitecustomize.py). Each has its own SQLite inbox file, or
    with ``inbox="memory"`` an in-process one (bench/brokers.py ``--inbox memory``)."""
    procs = []
    # The caller's PYTHONPATH stays in front of ROOT: a baseline run from a worktree's src
    # (``PYTHONPATH=/tmp/base/src``) must run the hops on that code, not on the installed one.
    path = os.pathsep.join(filter(None, (str(ROOT / "bench" / "_stages") if stages is not None else None,
                                         os.environ.get("PYTHONPATH"), str(ROOT))))
    for name in ("hop1", "hop2", "hop3"):
        store = "memory://" if inbox == "memory" else f"sqlite:///{tmp}/{name}-inbox.db"
        env = {**os.environ, "BENCH_N": str(n), "BENCH_OUT": str(out), "PYTHONPATH": path}
        if stages is not None:
            env["CHOREOGRAPH_BENCH_STAGES"] = str(stages)
        log = (tmp / f"{name}.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "choreograph", "run", f"bench.chain_app:{name}", "--broker", url,
             "--concurrency", str(concurrency), "--store", store, "--log-level", "WARNING"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        ))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until all three groups are registered
        if all("running" in (tmp / f"{name}.log").read_text() for name in ("hop1", "hop2", "hop3")):
            return procs
        time.sleep(0.05)
    raise RuntimeError("hop processes did not start")


def stop_hops(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def publish_all(url: str, n: int, rate: float | None) -> float:
    async with open_transport(url) as bus:
        publisher = Publisher(bus, source="/bench")
        start = time.perf_counter()
        if rate is None:
            for first in range(0, n, 500):
                await publisher.publish(*(Hop0(n=i, t0=time.time()) for i in range(first, min(n, first + 500))))
        else:
            for i in range(n):
                await publisher.publish(Hop0(n=i, t0=time.time()))
                await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
        return start


def hops_run(url: str, tmp: Path, n: int, concurrency: int,
             publish: Callable[[], Coroutine[Any, Any, Any]]) -> dict[str, Any]:
    """The three hops as ``choreograph run`` processes on ``url`` while ``publish()`` feeds
    them, until hop3 has seen ``n`` events; its figures from the first publish."""
    out = tmp / "result.json"
    procs = start_hops(url, tmp, n, out, concurrency)
    try:
        start_wall = time.time()
        asyncio.run(publish())
        deadline = time.monotonic() + max(120, n / 200)
        while not out.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the chain did not finish; see {tmp}/*.log")
            time.sleep(0.02)
        result = orjson.loads(out.read_bytes())
    finally:
        stop_hops(procs)
    return summarize(result["latencies"], result["last"] - start_wall)


def sqlite_run(n: int, concurrency: int, rate: float | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="choreograph-bench-") as tmpdir:
        tmp = Path(tmpdir)
        url = f"sqlite:///{tmp}/bus.db"
        return hops_run(url, tmp, n, concurrency, lambda: publish_all(url, n, rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="events per run (default 20000)")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s for the paced latency run")
    parser.add_argument("--paced-n", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="skip the paced run")
    parser.add_argument("--only", choices=["floor", "codec", "memory", "sqlite"], action="append")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the floor and memory:// runs")
    _gc.add_option(parser)
    args = parser.parse_args()
    if args.rounds < 1 or args.rounds % 2 == 0:
        parser.error("--rounds: must be odd (the median is then one round's figure)")
    only = set(args.only or ["floor", "codec", "memory", "sqlite"])
    try:
        import uvloop

        run = uvloop.run
        loop_name = "uvloop"
    except ImportError:
        run = asyncio.run
        loop_name = "asyncio"

    report: dict[str, Any] = {
        "bench": "chain", "hops": 3, "n": args.n, "loop": loop_name, "python": platform.python_version(),
        "cpus": os.cpu_count(), "sqlite_synchronous": "NORMAL", **_gc.choose(args.gc),
    }
    # The floor and memory:// runs are short (a second or two each) and this VM's speed drifts:
    # run them --rounds times, interleaved; each figure is its median run, each ratio the
    # median of the ratios within a round.
    sides: dict[str, Callable[[], dict[str, Any]]] = {}
    if "floor" in only:
        sides["floor_orjson"] = lambda: run(floor(args.n, orjson.dumps, orjson.loads))
        sides["floor_stdlib_json"] = lambda: run(floor(args.n, lambda o: json.dumps(o).encode(), json.loads))
    if "codec" in only:
        sides["codec"] = lambda: run(codec_floor(args.n))
    if "memory" in only:
        sides["memory"] = lambda: run(memory_run(args.n, args.concurrency))
    rounds: list[dict[str, dict[str, Any]]] = [{side: go() for side, go in sides.items()} for _ in range(args.rounds)]
    for side in sides:
        each = [r[side] for r in rounds]
        report[side] = {**sorted(each, key=lambda r: r["events_per_s"])[(len(each) - 1) // 2],
                        "events_per_s_each": [r["events_per_s"] for r in each]}
    if "sqlite" in only:
        report["sqlite"] = sqlite_run(args.n, args.concurrency)
        if not args.quick:
            report["sqlite_paced"] = {"rate": args.rate, **sqlite_run(args.paced_n, args.concurrency, args.rate)}
    pairs = [("memory", "floor_orjson"), ("memory", "floor_stdlib_json"), ("codec", "floor_orjson"), ("memory", "codec")]
    for side, base in pairs:
        if side in sides and base in sides:
            ratios = [round(r[side]["events_per_s"] / r[base]["events_per_s"], 3) for r in rounds]
            report[f"{side}_vs_{base}"] = round(statistics.median(ratios), 3)
            report[f"{side}_vs_{base}_each"] = ratios
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
