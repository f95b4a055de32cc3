"""The collector settings of a worker process (choreograph.runtime.gc_tuning, ``run --gc-threshold``).

Each test runs in a process of its own: freezing is process-wide and would outlive the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests._procs import lines_until, stop

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _python(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=60, env=ENV)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_tune_gc_freezes_what_exists_raises_the_threshold_and_still_collects_cycles() -> None:
    found = _python("""
        import gc, json, weakref
        from choreograph.runtime.gc_tuning import tune_gc

        class Node:
            pass

        before = gc.get_threshold()
        frozen = tune_gc(5000)
        node = Node(); node.me = node  # a cycle made after tuning: garbage once dropped
        alive = weakref.ref(node)
        del node
        kept = [[] for _ in range(20000)]  # net container allocations past the threshold
        print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                          "counted": gc.get_freeze_count(), "collected": alive() is None}))
    """)
    assert found["after"] == [5000, *found["before"][1:]]
    assert found["frozen"] == found["counted"] > 10_000  # the imported modules, at least
    assert found["collected"]  # cycles are still collected, only less often


def test_tune_gc_zero_leaves_pythons_settings() -> None:
    found = _python("""
        import gc, json
        from choreograph.runtime.gc_tuning import tune_gc

        before, frozen = gc.get_threshold(), gc.get_freeze_count()  # 3.12 starts with some frozen
        print(json.dumps({"returned": tune_gc(0), "before": before, "after": gc.get_threshold(),
                          "frozen": gc.get_freeze_count() - frozen}))
    """)
    assert found == {"returned": 0, "before": found["before"], "after": found["before"], "frozen": 0}


def _run_worker(*options: str) -> str:
    """stderr of ``choreograph run`` on memory:// from start to a SIGTERM once it said it runs
    (or 60 s went by: a worker that never says so fails the test, it does not hang it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "choreograph", "run", "examples.chain:app", "--broker", "memory://",
         "--log-level", "DEBUG", *options], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=ENV,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        lines_until(proc.stderr, lambda line: "running " in line, seen=lines)
    finally:
        _, rest = stop(proc)
    return "".join(lines) + rest


def test_choreograph_run_tunes_the_collector_once_the_worker_runs() -> None:
    log = _run_worker("--gc-threshold", "12345")
    assert "young-generation threshold 12345" in log, log
    default = _run_worker()
    assert "young-generation threshold 20000" in default, default


def test_choreograph_run_gc_threshold_zero_keeps_pythons_settings() -> None:
    log = _run_worker("--gc-threshold", "0")
    assert "running " in log and "young-generation threshold" not in log, log
