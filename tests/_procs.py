"""Helpers for tests that run choreograph's CLI as real processes."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import IO, Any, AnyStr


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


def stop(proc: subprocess.Popen[AnyStr], timeout: float = 60.0) -> tuple[AnyStr, AnyStr]:
    """SIGTERM ``proc`` (a graceful stop), SIGKILL it if it has not exited within ``timeout``;
    what it still wrote to stdout and stderr.

    The exit code is then ``proc.returncode`` (``-9`` if it had to be killed). The output is
    ``str`` for a text-mode ``Popen`` and ``bytes`` otherwise; a stream that is not a pipe (a
    log file, DEVNULL, stderr sent to stdout) gives an empty one. Only what is still in the
    pipe is returned: lines a reader of ``proc.stdout`` or ``proc.stderr`` (``readline``,
    :func:`lines_until`) already took, or read ahead into the stream's buffer, are not."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    empty: Any = "" if proc.text_mode else b""
    return (empty if out is None else out), (empty if err is None else err)
