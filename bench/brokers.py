"""Benchmark: the 3-hop chain of bench/chain.py on NATS JetStream, Redis Streams and RabbitMQ.

For each broker, in one run (so that the ratios are fair on a shared machine):

* ``one_process``: publisher and all three hops in this process -
  choreograph (a ``Worker`` on the transport, in-memory inbox), the same chain written
  directly on the client library (``raw``: see bench/_raw_chain.py for its ack
  discipline) and on FastStream (bench/_faststream_chain.py).
* ``process_per_hop``: each hop its own process - ``choreograph run`` (SQLite inbox, its
  default; ``--inbox memory`` for what that inbox costs) and the raw hop - fed from this process.
* ``paced``: process per hop at a light load (``--rate`` events/s): end-to-end latency.

Figures: events/s from the first publish to the last event reaching hop3, p50/p99
end-to-end latency (publish → hop3), and choreograph's ratio to raw and to FastStream.
The process-per-hop runs also give ``cpu_us_per_event`` (Linux): the CPU (user + system)
the three hop processes, the broker's server and this process (the publisher) spent from
the first publish to the last event, divided by the events - on two cores the
throughput ratio follows the ratio of these sums.
Every comparison runs ``--rounds`` times (default 3), its sides interleaved; a ratio is the
median over rounds of the ratio within a round (every round's is printed too), a side's
figures those of its median run.
Every run gets its own stream/key/queue prefix and deletes what it created.

    python bench/brokers.py --n 20000             # the documented figures
    python bench/brokers.py --n 2000 --quick      # a smoke run (no paced, no FastStream)
    python bench/brokers.py --only nats --n 5000 --no-faststream
    python bench/brokers.py --paced-only --rounds 5 --ack-delay 0   # latency, marks and acks at once
    python bench/brokers.py --paced-only --rounds 1 --stages        # where a hop's time goes
    python bench/brokers.py --paced-only --inbox memory             # the path without the SQLite inbox

Every process (choreograph's, the raw client's, FastStream's) runs with the collector
settings of ``choreograph run`` unless ``--gc python`` (bench/_gc.py).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _broker_env as env  # noqa: E402
from bench import _faststream_chain, _gc, _raw_chain  # noqa: E402
from bench._stages.sitecustomize import stage_medians  # noqa: E402
from bench.chain import start_hops, stop_hops, summarize  # noqa: E402
from bench.chain_app import SINK, Hop0, hop1, hop2, hop3  # noqa: E402
from choreograph import Publisher, Worker  # noqa: E402
from choreograph.runtime.worker import DEFAULT_ACK_DELAY  # noqa: E402
from choreograph.transports import open_transport  # noqa: E402

BROKERS = ("nats", "redis", "amqp")


def _prefix(broker: str, kind: str) -> str:
    return f"bench-{broker}-{kind}-{uuid.uuid4().hex[:8]}"


# -- choreograph -----------------------------------------------------------------------------


def _ack_delay() -> float:
    """choreograph's ack_delay in this run: ``--ack-delay`` puts it in the environment, where the
    hop processes (``choreograph run``) read it too."""
    return float(os.environ.get("CHOREOGRAPH_ACK_DELAY", DEFAULT_ACK_DELAY))


async def choreograph_publish(url: str, n: int, rate: float | None) -> float:
    """Publish ``n`` Hop0 events (batches of 500, or paced); the wall time of the first publish."""
    async with open_transport(url) as bus:
        publisher = Publisher(bus, source="/bench")
        start_wall, start = time.time(), time.perf_counter()
        if rate is None:
            for first in range(0, n, 500):
                await publisher.publish(*(Hop0(n=i, t0=time.time()) for i in range(first, min(n, first + 500))))
        else:
            for i in range(n):
                await publisher.publish(Hop0(n=i, t0=time.time()))
                await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
        return start_wall


async def choreograph_one(broker: str, base: str, n: int, concurrency: int) -> dict[str, Any]:
    url = env.choreograph_url(base, _prefix(broker, "ch1"))
    SINK.reset(n, None)
    try:
        async with open_transport(url) as bus, Worker([hop1, hop2, hop3], bus, concurrency=concurrency,
                                                      ack_delay=_ack_delay()):
            publisher = Publisher(bus, source="/bench")
            start = time.perf_counter()
            for first in range(0, n, 500):
                await publisher.publish(*(Hop0(n=i, t0=time.time()) for i in range(first, min(n, first + 500))))
            while len(SINK.latencies) < n:
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - start
        return summarize(SINK.latencies, elapsed)
    finally:
        await env.remove_choreograph_bus(broker, url)


def choreograph_procs(broker: str, base: str, n: int, concurrency: int, rate: float | None, loop: Runner,
                      stages: bool = False, inbox: str = "sqlite") -> dict:
    url = env.choreograph_url(base, _prefix(broker, "chp"))
    try:
        with tempfile.TemporaryDirectory(prefix="choreograph-bench-") as tmpdir:
            tmp = Path(tmpdir)
            out = tmp / "result.json"
            procs = start_hops(url, tmp, n, out, concurrency, stages=tmp if stages else None, inbox=inbox)
            try:
                meter = CpuMeter(broker, procs)
                start_wall = loop(choreograph_publish(url, n, rate))
                result = _wait_for_result(out, n, tmp)
                cpu = meter.per_event(n)
            finally:
                stop_hops(procs)
            steps = {"stages_us": stage_medians(str(tmp))} if stages else {}
        return {**summarize(result["latencies"], result["last"] - start_wall), "cpu_us_per_event": cpu, **steps}
    finally:
        loop(env.remove_choreograph_bus(broker, url))


# -- raw client ------------------------------------------------------------------------------


async def raw_one(broker: str, base: str, n: int) -> dict[str, Any]:
    sink, elapsed = await _raw_chain.one_process(broker, base, _prefix(broker, "raw1"), n)
    return summarize(sink.latencies, elapsed)


def raw_procs(broker: str, base: str, n: int, rate: float | None, loop: Runner) -> dict[str, Any]:
    prefix = _prefix(broker, "rawp")
    loop(_raw_chain.setup(broker, base, prefix))
    try:
        with tempfile.TemporaryDirectory(prefix="choreograph-bench-raw-") as tmpdir:
            tmp = Path(tmpdir)
            out = tmp / "result.json"
            procs = []
            for hop in (1, 2, 3):
                log = (tmp / f"raw-hop{hop}.log").open("wb")
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench._raw_chain", broker, base, prefix, str(hop), str(n), str(out)],
                    cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(ROOT))))}, stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            try:
                _wait_running([tmp / f"raw-hop{hop}.log" for hop in (1, 2, 3)])
                meter = CpuMeter(broker, procs)
                start_wall = loop(_raw_feed(broker, base, prefix, n, rate))
                result = _wait_for_result(out, n, tmp)
                cpu = meter.per_event(n)
            finally:
                stop_hops(procs)
        return {**summarize(result["latencies"], result["last"] - start_wall), "cpu_us_per_event": cpu}
    finally:
        loop(_raw_chain.teardown(broker, base, prefix))


async def _raw_feed(broker: str, base: str, prefix: str, n: int, rate: float | None) -> float:
    raw = _raw_chain.CLIENTS[broker](base, prefix)
    await raw.connect()
    try:
        start_wall = time.time()
        await _raw_chain.publish_events(raw, n, rate)
        return start_wall
    finally:
        await raw.close()


# -- FastStream ------------------------------------------------------------------------------


async def faststream_one(broker: str, base: str, n: int) -> dict[str, Any]:
    prefix = _prefix(broker, "fs1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "a push consumer with durable can't scale": one process here
            sink, elapsed = await _faststream_chain.one_process(broker, base, prefix, n)
        return summarize(sink.latencies, elapsed)
    finally:
        await _raw_chain.teardown(broker, base, prefix)


# -- CPU per event ---------------------------------------------------------------------------

#: The broker servers' pids, set by main() (a private nats-server's own; else by process name).
SERVER_PIDS: dict[str, list[int]] = {}
_SERVER_NAMES = {"nats": "nats-server", "redis": "redis-server", "amqp": "beam.smp"}


def _cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds the processes ``pids`` have used (Linux ``/proc``; else None)."""
    total = 0.0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


def server_pids(broker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/comm") as f:
                if entry.isdigit() and f.read().strip() == _SERVER_NAMES[broker]:
                    found.append(int(entry))
        except OSError:
            continue
    return found


class CpuMeter:
    """CPU of the hop processes, the broker's server and this process, from now to ``per_event``."""

    def __init__(self, broker: str, procs: list[subprocess.Popen[bytes]]) -> None:
        self.groups = {"hops": [p.pid for p in procs], "server": SERVER_PIDS.get(broker, [])}
        self.before = {name: _cpu_seconds(pids) for name, pids in self.groups.items()}
        self.own = os.times()

    def per_event(self, n: int) -> dict[str, float] | None:
        own = os.times()
        out = {"publisher": (own.user + own.system - self.own.user - self.own.system) / n * 1e6}
        for name, pids in self.groups.items():
            now, before = _cpu_seconds(pids), self.before[name]
            if now is None or before is None or not pids:
                return None
            out[name] = (now - before) / n * 1e6
        out["total"] = sum(out.values())
        return {name: round(value, 1) for name, value in out.items()}


# -- plumbing --------------------------------------------------------------------------------

Runner = Callable[[Awaitable[Any]], Any]


def _wait_running(logs: list[Path], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(log.exists() and "running" in log.read_text() for log in logs):
        if time.monotonic() > deadline:
            raise RuntimeError("hop processes did not start: " + " | ".join(log.read_text()[-500:] for log in logs))
        time.sleep(0.05)


def _wait_for_result(out: Path, n: int, tmp: Path) -> dict[str, Any]:
    deadline = time.monotonic() + max(120, n / 200)
    while not out.exists():
        if time.monotonic() > deadline:
            logs = " | ".join(p.read_text()[-800:] for p in sorted(tmp.glob("*.log")))
            raise RuntimeError(f"the chain did not finish: {logs}")
        time.sleep(0.02)
    result: dict[str, Any] = orjson.loads(out.read_bytes())
    return result


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def _paired(rounds: int, sides: dict[str, Callable[[], dict[str, Any]]], ratios: dict[str, str]) -> dict[str, Any]:
    """Run every side once per round, interleaved, so that a noisy neighbour hits them alike.

    Per side: the run with the median of the first key of ``ratios`` (and that key's value in
    every round). Per key and per other side, ``<name>_vs_<other>``: the median over rounds of
    choreograph's figure divided by the other side's *in the same round* (and every round's).
    """
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, run in sides.items():
            runs[side].append(run())
    first = next(iter(ratios))
    out: dict[str, Any] = {}
    for side, each in runs.items():
        middle = sorted(each, key=lambda r: r[first])[(len(each) - 1) // 2]
        out[side] = {**middle, f"{first}_each": [r[first] for r in each]}
    for key, name in ratios.items():
        for other in sides:
            if other != "choreograph":
                each_ratio = [_ratio(c[key], o[key]) for c, o in zip(runs["choreograph"], runs[other], strict=True)]
                if any(math.isnan(r) for r in each_ratio):
                    raise RuntimeError(f"{key}: a run of {other} measured 0: {runs[other]}")
                out[f"{name}_vs_{other}"] = round(statistics.median(each_ratio), 3)
                out[f"{name}_vs_{other}_each"] = each_ratio
    return out


def bench_broker(broker: str, base: str, args: argparse.Namespace, loop: Runner) -> dict[str, Any]:
    n = args.amqp_n if broker == "amqp" and args.amqp_n else args.n
    rounds = args.rounds
    sides: dict[str, Callable[[], dict[str, Any]]] = {
        "raw": lambda: loop(raw_one(broker, base, n)),
        "choreograph": lambda: loop(choreograph_one(broker, base, n, args.concurrency)),
    }
    if not args.quick and not args.no_faststream:
        sides["faststream"] = lambda: loop(faststream_one(broker, base, n))
    throughput = {"events_per_s": "choreograph"}
    report: dict[str, Any] = {"n": n, "rounds": rounds}
    if not args.paced_only:
        report["one_process"] = _paired(rounds, sides, throughput)
        report["process_per_hop"] = _paired(rounds, {
            "raw": lambda: raw_procs(broker, base, n, None, loop),
            "choreograph": lambda: choreograph_procs(broker, base, n, args.concurrency, None, loop, inbox=args.inbox),
        }, throughput)
    if not args.quick:
        report["paced"] = {"rate": args.rate, **_paired(rounds, {
            "raw": lambda: raw_procs(broker, base, args.paced_n, args.rate, loop),
            "choreograph": lambda: choreograph_procs(broker, base, args.paced_n, args.concurrency, args.rate, loop,
                                                     stages=args.stages, inbox=args.inbox),
        }, {"p50_ms": "p50", "p99_ms": "p99"})}
    return report


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured figure and whether it is met."""
    out: dict[str, Any] = {}
    for broker in BROKERS:
        r = report.get(broker)
        if not isinstance(r, dict):
            continue
        floor = 0.7 if broker == "amqp" else 0.8
        checks = {
            f"{mode} >= {floor}x raw": r[mode]["choreograph_vs_raw"]
            for mode in ("one_process", "process_per_hop") if mode in r
        }
        met = {k: v >= floor for k, v in checks.items()}
        if "paced" in r:
            checks["paced p50 <= 1.2x raw"] = r["paced"]["p50_vs_raw"]
            checks["paced p99 <= 2x raw"] = r["paced"]["p99_vs_raw"]
            met["paced p50 <= 1.2x raw"] = r["paced"]["p50_vs_raw"] <= 1.2
            met["paced p99 <= 2x raw"] = r["paced"]["p99_vs_raw"] <= 2.0
        if broker != "amqp" and "choreograph_vs_faststream" in r.get("one_process", {}):
            checks[">= 5x FastStream"] = r["one_process"]["choreograph_vs_faststream"]
            met[">= 5x FastStream"] = r["one_process"]["choreograph_vs_faststream"] >= 5.0
        out[broker] = {name: {"measured": checks[name], "met": met[name]} for name in checks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="events per throughput run (default 20000)")
    parser.add_argument("--amqp-n", type=int, default=0, help="events per RabbitMQ run (default: --n)")
    parser.add_argument("--concurrency", type=int, default=_raw_chain.WINDOW)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s for the paced latency runs")
    parser.add_argument("--paced-n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every comparison, interleaved; medians reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="skip the paced and FastStream runs")
    parser.add_argument("--paced-only", action="store_true", help="only the paced latency runs")
    parser.add_argument("--ack-delay", type=float, default=None,
                        help=f"choreograph's ack_delay in seconds (default {DEFAULT_ACK_DELAY}: the runtime's)")
    parser.add_argument("--no-faststream", action="store_true", help="skip the FastStream runs")
    parser.add_argument("--stages", action="store_true",
                        help="paced runs: where a hop's time goes (median microseconds per step of hop1 and"
                             " hop2, bench/_stages/sitecustomize.py); the stamps add ~1 us per step")
    parser.add_argument("--inbox", choices=("sqlite", "memory"), default="sqlite",
                        help="the hop processes' inbox store (default sqlite, choreograph run's); memory shows"
                             " what the durable inbox costs on the path - not a setting to deploy")
    parser.add_argument("--only", choices=BROKERS, action="append")
    _gc.add_option(parser)
    parser.add_argument("--nats-url", help="use this NATS server (>= 2.10) instead of a private one")
    args = parser.parse_args()
    if args.rounds < 1 or args.rounds % 2 == 0:
        parser.error("--rounds: must be odd (the median is then one round's figure)")
    if args.quick and args.paced_only:
        parser.error("--paced-only: --quick skips the paced runs")
    if args.ack_delay is not None:
        os.environ["CHOREOGRAPH_ACK_DELAY"] = str(args.ack_delay)  # this process and the hop processes
    if args.paced_only:
        args.no_faststream = True
    if not args.quick and not args.no_faststream:
        try:
            import faststream  # noqa: F401
        except ImportError:
            parser.error("FastStream is not installed: `make bench-setup` (the bench extra), or --no-faststream")
    try:
        import uvloop

        def loop(coro: Awaitable[Any]) -> Any:
            return uvloop.run(coro)  # type: ignore[arg-type]

        loop_name = "uvloop"
    except ImportError:

        def loop(coro: Awaitable[Any]) -> Any:
            return asyncio.run(coro)  # type: ignore[arg-type]

        loop_name = "asyncio"

    private = None if args.nats_url or (args.only and "nats" not in args.only) else env.PrivateNats()
    nats_url = args.nats_url or (private.url if private else None)
    report: dict[str, Any] = {
        "bench": "brokers", "hops": 3, "concurrency": args.concurrency, "loop": loop_name,
        "python": platform.python_version(), "cpus": os.cpu_count(), "servers": {},
        "load_average_before": [round(x, 2) for x in os.getloadavg()], **_gc.choose(args.gc),
        "ack_delay": _ack_delay(), "inbox": args.inbox,
    }  # fmt: skip
    try:
        for broker in args.only or BROKERS:
            base = env.base_url(broker, nats_url)
            report["servers"][broker] = loop(env.server_version(broker, base))
            SERVER_PIDS[broker] = [private.proc.pid] if broker == "nats" and private else server_pids(broker)
            report[broker] = bench_broker(broker, base, args, loop)
    finally:
        if private is not None:
            private.stop()
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews it
    report["targets"] = targets(report)
    print(env.dump(report))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
