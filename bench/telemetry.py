"""What telemetry costs: instructions per event of the memory:// chain with it off and on, by callgrind.

Runs bench/chain.py's 3-hop memory:// chain (publisher -> hop1 -> hop2 -> hop3) for N events
under ``valgrind --tool=callgrind`` once per mode, subtracts a run that does everything but
the chain (the same imports, the same Telemetry built), and prints JSON: instructions per
event for each mode and each one's overhead over ``off``.

* ``off``: ``Worker(...)`` without ``telemetry=`` (the default);
* ``metrics``: ``Telemetry(traces=False)``: Prometheus counters and histograms only;
* ``traces``: ``Telemetry(metrics=False)``: a span per handler attempt, recorded by the
  OpenTelemetry SDK and handed to a BatchSpanProcessor whose exporter drops them (what an
  exporter then does with them, e.g. OTLP encoding, is not counted);
* ``both``: traces and metrics.

    python bench/telemetry.py --n 2000

The Publisher publishes without telemetry in every mode, so the figures are the worker's.
For the cost of telemetry *off* against a tree without it, use bench/instructions.py on both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.instructions import callgrind_instructions  # noqa: E402

MODES = ("off", "metrics", "traces", "both")


def _telemetry(mode: str) -> Any:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from prometheus_client import CollectorRegistry

    from choreograph.telemetry import Telemetry

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    telemetry = Telemetry(traces=mode in ("traces", "both"), metrics=mode in ("metrics", "both"),
                          tracer_provider=provider, registry=CollectorRegistry())
    return (telemetry if mode in ("metrics", "traces", "both") else None), provider


async def _chain(n: int, telemetry: Any) -> None:
    from bench.chain_app import SINK, Hop0, hop1, hop2, hop3
    from choreograph import Publisher, Worker
    from choreograph.transports.memory import MemoryTransport

    bus = MemoryTransport()
    SINK.reset(n, None)
    async with Worker([hop1, hop2, hop3], bus, concurrency=256, telemetry=telemetry):
        publisher = Publisher(bus, source="/bench")
        for first in range(0, n, 500):
            await publisher.publish(*(Hop0(n=i, t0=0.0) for i in range(first, min(n, first + 500))))
            await asyncio.sleep(0)
        while len(SINK.latencies) < n:
            await asyncio.sleep(0.005)


def _child(mode: str, n: int) -> None:
    telemetry, provider = _telemetry(mode if mode != "none" else "both")
    if mode != "none":
        asyncio.run(_chain(n, telemetry))
    provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="events per run (default 2000)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--child", choices=["none", *MODES], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.n)
        return
    modes = [m for m in args.modes.split(",") if m]
    base = callgrind_instructions(__file__, "none", args.n)
    per_event = {mode: (callgrind_instructions(__file__, mode, args.n) - base) / args.n for mode in modes}
    result: dict[str, Any] = {
        "bench": "telemetry", "hops": 3, "n": args.n, "python": platform.python_version(),
        "instructions_per_event": {mode: round(v) for mode, v in per_event.items()},
    }
    if "off" in per_event:
        result["overhead_vs_off"] = {
            mode: f"{(v / per_event['off'] - 1) * 100:+.1f}%" for mode, v in per_event.items() if mode != "off"
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
