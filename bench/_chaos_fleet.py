"""The chaos harness's processes: one ``choreograph run`` per service replica, killed and restarted.

Each replica is a real worker process (``python -m choreograph run APP --service NAME``)
with its own process group, so the harness can SIGKILL exactly one of them, the way a
crashed host or an OOM kill would. A killed replica is started again at once (what a
process manager does), with its fault seed changed so the restarted process does not
replay the faults of the one that died.

Every output line of every replica is written to ``<logs>/<name>.log`` and counted:
retries and their causes (injected transient faults, handler timeouts), injected
hangs, dead-lettering, and anything at ERROR that is not a dead letter. A worker bug
(``internal error handling``) is counted separately: the harness treats it as a
violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import IO

READY = "choreograph running"
"""What ``choreograph run`` prints once its worker is consuming."""
STOP_TIMEOUT = 30.0
"""Seconds between SIGTERM and SIGKILL when the fleet stops (drain + settle of each worker)."""
MAX_SAMPLES = 20


@dataclasses.dataclass
class LogCounts:
    """What the replicas' logs say happened (summed over every process lifetime)."""

    retries: int = 0
    transient_faults: int = 0  # InjectedFault before the step: retried or, after the last attempt, dead-lettered
    reruns: int = 0  # InjectedFault after the step succeeded (duplicate_rate): the step runs again
    timeouts: int = 0  # HandlerTimeout (an injected hang ran past the handler's timeout)
    hangs: int = 0  # injected hangs started
    dead_lettered: int = 0
    compensation_lines: int = 0  # "released ...", "refunded ...", "order ... cancelled"
    internal_errors: int = 0
    other_errors: int = 0
    samples: list[str] = dataclasses.field(default_factory=list)

    def count(self, line: str) -> None:
        if "retrying in" in line:
            self.retries += 1
        elif "dead-lettering" in line:
            self.dead_lettered += 1
        elif "injected hang of" in line:
            self.hangs += 1
        elif "internal error handling" in line:
            self.internal_errors += 1
            self._sample(line)
        elif " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
            self.other_errors += 1
            self._sample(line)
        if "injected duplicate delivery" in line:
            self.reruns += 1
        elif "InjectedFault" in line:
            self.transient_faults += 1
        if "HandlerTimeout" in line:
            self.timeouts += 1
        if ": released " in line or ": refunded " in line or " cancelled: " in line:
            self.compensation_lines += 1

    def _sample(self, line: str) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(line[:300])


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """One replica: ``name`` (``payment.2``), its service and the command that runs it."""

    name: str
    service: str
    argv: list[str]


@dataclasses.dataclass
class _Replica:
    spec: ReplicaSpec
    proc: asyncio.subprocess.Process | None = None
    lifetime: int = 0
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    stopped: bool = False  # stopped by the harness: neither killed nor restarted any more
    started_at: float = 0.0  # time.monotonic() when its current process was started


EnvFor = Callable[[ReplicaSpec, int], Mapping[str, str]]
"""The environment of a replica's ``lifetime``-th process (0 first, 1 after the first restart...)."""
BrokerDown = Callable[[float, float], bool]
"""Whether the broker was down at some time between two ``time.monotonic()`` readings."""
STARTUP_RETRY_S = 1.0
"""The pause before a replica that exited at start-up while the broker was down is started again."""


class Fleet:
    """Runs the replicas; :meth:`kill_one` SIGKILLs a random ready one and starts it again."""

    def __init__(self, specs: list[ReplicaSpec], *, env_for: EnvFor, logs: Path, rng: random.Random,
                 cwd: Path, say: Callable[[str], None], broker_down: BrokerDown | None = None) -> None:
        self.replicas = [_Replica(spec) for spec in specs]
        self.env_for = env_for
        self.logs = logs
        self.rng = rng
        self.cwd = cwd
        self.say = say
        self.counts = LogCounts()
        self.kills: list[dict[str, object]] = []
        self.unexpected_exits: list[str] = []
        # ``choreograph run`` exits when it cannot reach its broker at start-up within its
        # --connect-timeout (a process manager starts it again): with the broker restarted
        # under it, such exits are expected.
        self.broker_down = broker_down
        self.startup_exits: list[str] = []
        self._files: dict[str, IO[str]] = {}
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 120.0) -> None:
        """Start every replica and wait until each says it is consuming."""
        self._open_logs()
        for replica in self.replicas:
            await self._spawn(replica)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(r.ready.wait() for r in self.replicas))
        except TimeoutError:
            late = [r.spec.name for r in self.replicas if not r.ready.is_set()]
            raise RuntimeError(f"replicas not ready after {timeout:g}s: {late}; see {self.logs}") from None

    def _open_logs(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for replica in self.replicas:
            self._files[replica.spec.name] = open(self.logs / f"{replica.spec.name}.log", "a")  # noqa: SIM115

    async def _spawn(self, replica: _Replica) -> None:
        replica.ready = asyncio.Event()
        replica.started_at = time.monotonic()
        env = {**os.environ, **self.env_for(replica.spec, replica.lifetime)}
        replica.proc = await asyncio.create_subprocess_exec(
            *replica.spec.argv, cwd=self.cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            limit=1 << 20,
        )
        replica.reader = asyncio.create_task(self._read(replica, replica.proc))
        self._watchers.append(asyncio.create_task(self._watch(replica, replica.proc)))

    async def _read(self, replica: _Replica, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        out = self._files[replica.spec.name]
        out.write(f"--- {replica.spec.name} lifetime {replica.lifetime} pid {proc.pid} ---\n")
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the buffer
                raw = await proc.stdout.read(1 << 16)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            out.write(line + "\n")
            self.counts.count(line)
            if READY in line:
                replica.ready.set()

    async def _watch(self, replica: _Replica, proc: asyncio.subprocess.Process) -> None:
        """A replica that dies on its own (not killed by us, not stopping) is reported and restarted;
        one that never got going while the broker was down is counted apart and restarted after a pause."""
        code = await proc.wait()
        if replica.stopped or proc is not replica.proc or code == -signal.SIGKILL and self._killed(proc.pid):
            return
        if (self.broker_down is not None and not replica.ready.is_set()
                and self.broker_down(replica.started_at, time.monotonic())):
            self.startup_exits.append(f"{replica.spec.name} (pid {proc.pid}) exited with {code}")
            await asyncio.sleep(STARTUP_RETRY_S)
            if not replica.stopped and proc is replica.proc:
                replica.lifetime += 1
                await self._spawn(replica)
            return
        self.unexpected_exits.append(f"{replica.spec.name} (pid {proc.pid}) exited with {code}")
        self.say(f"{replica.spec.name} exited on its own with {code}; restarting")
        replica.lifetime += 1
        await self._spawn(replica)

    def _killed(self, pid: int) -> bool:
        return any(kill["pid"] == pid for kill in self.kills)

    async def kill_one(self) -> str | None:
        """SIGKILL one random ready replica, then start it again (without waiting for it)."""
        ready = [r for r in self.replicas
                 if r.ready.is_set() and not r.stopped and r.proc is not None and r.proc.returncode is None]
        if not ready:
            return None
        replica = self.rng.choice(ready)
        proc = replica.proc
        assert proc is not None
        self.kills.append({"replica": replica.spec.name, "pid": proc.pid, "at": time.time()})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if replica.reader is not None:
            await replica.reader
        replica.lifetime += 1
        await self._spawn(replica)
        return replica.spec.name

    async def kill_every(self, seconds: float, until: asyncio.Event) -> None:
        """Kill a random replica every ``seconds`` until ``until`` is set."""
        while not until.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), seconds)
                return
            name = await self.kill_one()
            if name is not None:
                self.say(f"SIGKILL {name} (kill {len(self.kills)}); restarted")

    async def stop(self, services: Collection[str] | None = None) -> None:
        """SIGTERM every replica (they drain and settle), SIGKILL what is left after STOP_TIMEOUT.

        ``services``: only the replicas of those (the others go on; a later ``stop()`` stops them)."""
        if self._stopping:
            return
        chosen = [r for r in self.replicas if not r.stopped and (services is None or r.spec.service in services)]
        for replica in chosen:
            replica.stopped = True
        await self._terminate([r.proc for r in chosen if r.proc is not None and r.proc.returncode is None])
        if services is None:
            await self._finish()

    async def _terminate(self, live: list[asyncio.subprocess.Process]) -> None:
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.gather(*(proc.wait() for proc in live))
        except TimeoutError:
            for proc in live:
                if proc.returncode is None:
                    self.unexpected_exits.append(f"pid {proc.pid} ignored SIGTERM for {STOP_TIMEOUT:g}s")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.gather(*(proc.wait() for proc in live))

    async def _finish(self) -> None:
        self._stopping = True
        await asyncio.gather(*(r.reader for r in self.replicas if r.reader is not None), return_exceptions=True)
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for out in self._files.values():
            out.close()


def python_m(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]
