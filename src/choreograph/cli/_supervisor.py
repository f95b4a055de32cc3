"""A small process supervisor for ``choreograph dev`` (what foreman or honcho do for a Procfile).

It starts every process, prefixes each output line with the process name in its own
colour, restarts a process that dies (with a backoff, so a crash loop does not spin),
and stops everything on request: SIGTERM to each process group, a grace period, then
SIGKILL for whatever is left. Each child runs in its own process group, so a Ctrl-C in
the terminal reaches only the supervisor, which then stops the children exactly once
(uvicorn, for one, treats a second signal as "exit now, skip the drain"). A child
learns how many times it was restarted from ``CHOREOGRAPH_RESTARTS`` (fault injection
uses it to crash only the first lifetimes of a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import time
from collections.abc import Callable, Mapping

from rich.console import Console
from rich.text import Text

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta")

#: A process that exits sooner than this after starting, without ever being ready, is
#: broken (a typo, a port in use): restarting it would only loop.
_FATAL_WITHIN = 3.0
_BACKOFF_START, _BACKOFF_MAX, _HEALTHY_AFTER = 0.25, 5.0, 10.0


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


@dataclasses.dataclass
class ProcSpec:
    """One process to supervise. ``ready`` is a substring of the log line that says it is up;
    ``fds`` are file descriptors it inherits, the same numbers in every lifetime (a listening
    socket: see ``_gateway.listen``)."""

    name: str
    argv: list[str]
    ready: str | None = None
    restart: bool = True
    fds: tuple[int, ...] = ()


@dataclasses.dataclass
class _Child:
    spec: ProcSpec
    colour: str
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    restarts: int = 0


class Supervisor:
    """Runs ``specs`` until :meth:`stop` (or a signal); see the module docstring."""

    def __init__(
        self,
        specs: list[ProcSpec],
        *,
        env: Mapping[str, str],
        console: Console,
        stop_timeout: float = 10.0,
        restart: bool = True,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.env = dict(env)
        self.console = console
        self.stop_timeout = stop_timeout
        self.restart = restart
        self.on_ready = on_ready
        width = max([len(spec.name) for spec in specs] + [3])
        self.width = width
        self.children = [_Child(spec, COLOURS[i % len(COLOURS)]) for i, spec in enumerate(specs)]
        self.stopping = asyncio.Event()
        self.failed: str | None = None
        self._all_ready = False

    # -- output -----------------------------------------------------------------------

    def say(self, message: str, style: str = "bold") -> None:
        """A line from the supervisor itself."""
        self.console.print(Text.assemble((f"{'dev':<{self.width}} | ", style), message), soft_wrap=True)

    def _line(self, child: _Child, line: str) -> None:
        text = Text(f"{child.spec.name:<{self.width}} | ", style=child.colour)
        text.append_text(Text.from_ansi(line))
        self.console.print(text, soft_wrap=True)

    async def _pump(self, child: _Child, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the buffer: print what we have
                raw = await proc.stdout.read(1 << 16)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self._line(child, line)
            if not child.ready and child.spec.ready is not None and child.spec.ready in line:
                child.ready = True
                self._check_ready()

    def _check_ready(self) -> None:
        if not self._all_ready and all(c.ready for c in self.children):
            self._all_ready = True
            if self.on_ready is not None:
                self.on_ready()

    # -- lifecycle --------------------------------------------------------------------

    async def _spawn(self, child: _Child) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *child.spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**self.env, "CHOREOGRAPH_RESTARTS": str(child.restarts)},
            start_new_session=True,
            pass_fds=child.spec.fds,
            limit=1 << 20,
        )
        child.proc, child.started_at = proc, time.monotonic()
        if child.spec.ready is None:
            child.ready = True
        self.say(f"started {child.spec.name} (pid {proc.pid})", child.colour)
        return proc

    async def _supervise(self, child: _Child) -> None:
        backoff = _BACKOFF_START
        while not self.stopping.is_set():
            proc = await self._spawn(child)
            pump = asyncio.create_task(self._pump(child, proc))
            code = await proc.wait()
            await pump
            if self.stopping.is_set():
                return
            ran = time.monotonic() - child.started_at
            how = _how(code)
            if not child.ready and ran < _FATAL_WITHIN and code > 0:
                self.say(f"{child.spec.name} exited with {how} before it was ready; stopping", "bold red")
                self.failed = child.spec.name
                self.stopping.set()
                return
            if not (self.restart and child.spec.restart):
                self.say(f"{child.spec.name} exited with {how}; not restarting", "bold red")
                continue_running = any(
                    c.proc is not None and c.proc.returncode is None for c in self.children
                )
                if not continue_running:
                    self.stopping.set()
                return
            backoff = _BACKOFF_START if ran > _HEALTHY_AFTER else backoff
            child.restarts += 1
            self.say(f"{child.spec.name} exited with {how}; restarting in {backoff:.2f}s", "bold yellow")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _signal_all(self, sig: signal.Signals) -> None:
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

    async def _terminate(self) -> None:
        """SIGTERM every child, wait up to ``stop_timeout``, then SIGKILL the rest."""
        self._signal_all(signal.SIGTERM)
        live = [c.proc.wait() for c in self.children if c.proc is not None and c.proc.returncode is None]
        if not live:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*live), self.stop_timeout)
        except TimeoutError:
            names = [c.spec.name for c in self.children if c.proc is not None and c.proc.returncode is None]
            self.say(f"{', '.join(names)} still running after {self.stop_timeout:g}s: SIGKILL", "bold red")
            self._signal_all(signal.SIGKILL)
            await asyncio.gather(*(c.proc.wait() for c in self.children if c.proc is not None))

    def stop(self, *, force_if_repeated: bool = False) -> None:
        """Ask for a clean stop. A repeated request with ``force_if_repeated`` (a second
        Ctrl-C) kills at once; a repeated SIGTERM (process managers and ``timeout`` signal
        a whole process group) only waits for the stop already under way."""
        if self.stopping.is_set() and force_if_repeated:
            self.say("second interrupt: SIGKILL", "bold red")
            self._signal_all(signal.SIGKILL)
        self.stopping.set()

    async def run(self) -> int:
        """Supervise until stopped; returns 0 after a clean stop, 1 if a process could not start."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for sig in signals:
            loop.add_signal_handler(sig, functools.partial(self.stop, force_if_repeated=sig == signal.SIGINT))
        tasks = [asyncio.create_task(self._supervise(child)) for child in self.children]
        try:
            await self.stopping.wait()
            self.say("stopping: SIGTERM to every process", "bold")
            await self._terminate()
            await asyncio.gather(*tasks)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            self._signal_all(signal.SIGKILL)  # only if something above failed
        for child in self.children:
            if child.proc is not None:
                code = child.proc.returncode
                how = "stopped" if code in (0, -signal.SIGTERM) else f"exited with {_how(code)}"
                self.say(f"{child.spec.name} {how}", child.colour)
        return 1 if self.failed else 0
