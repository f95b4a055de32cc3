"""The 3-hop chain measured by bench/chain.py: publisher → hop1 → hop2 → hop3 (sink).

hop3 records end-to-end latency (now - the publish time carried in the payload) and,
once it has seen ``BENCH_N`` events, writes its figures to ``BENCH_OUT`` (JSON).
"""

from __future__ import annotations

import os
import time

import orjson

from choreograph import App, Event, Service


class Hop0(Event, type="bench.hop0"):
    n: int
    t0: float


class Hop1(Event, type="bench.hop1"):
    n: int
    t0: float


class Hop2(Event, type="bench.hop2"):
    n: int
    t0: float


hop1 = Service("hop1")
hop2 = Service("hop2")
hop3 = Service("hop3")


class Sink:
    def __init__(self) -> None:
        self.reset(int(os.environ.get("BENCH_N", "0")), os.environ.get("BENCH_OUT"))

    def reset(self, expected: int, out: str | None) -> None:
        self.expected = expected
        self.out = out
        self.latencies: list[float] = []
        self.first = 0.0
        self.last = 0.0

    def record(self, t0: float) -> None:
        now = time.time()
        if not self.latencies:
            self.first = now
        self.latencies.append(now - t0)
        self.last = now
        if self.out and len(self.latencies) == self.expected:
            with open(self.out + ".tmp", "wb") as f:
                f.write(orjson.dumps({"latencies": self.latencies, "first": self.first, "last": self.last}))
            os.replace(self.out + ".tmp", self.out)


SINK = Sink()


@hop1.on(Hop0)
async def one(e: Hop0) -> Hop1:
    return Hop1(n=e.n, t0=e.t0)


@hop2.on(Hop1)
async def two(e: Hop1) -> Hop2:
    return Hop2(n=e.n, t0=e.t0)


@hop3.on(Hop2)
async def three(e: Hop2) -> None:
    SINK.record(e.t0)


app = App("bench-chain", [hop1, hop2, hop3], ingress=[Hop0])
