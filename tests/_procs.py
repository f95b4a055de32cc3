"""Helpers for tests that run choreograph's CLI as real processes."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import IO


def lines_until(stream: IO[str], wanted: Callable[[str], bool], timeout: float = 60.0,
                seen: list[str] | None = None) -> str | None:
    """The first line of ``stream`` that ``wanted`` accepts, read on a thread (never hangs the
    test: ``None`` after ``timeout`` or at the end of the stream); every line read so far is
    appended to ``seen``."""
    found: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            if seen is not None:
                seen.append(line)
            if wanted(line):
                found.put(line)
                return
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        return found.get(timeout=timeout)
    except queue.Empty:
        return None


def stop(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[str, str]:
    """SIGTERM ``proc`` (a graceful stop), SIGKILL it if it has not exited within ``timeout``;
    what it still wrote to stdout and stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out or "", err or ""
