"""The garbage-collector setting every process of a benchmark runs with (``--gc``).

``tuned`` (the default) is what ``choreograph run`` does on its own: freeze what startup
allocated and raise the young-generation threshold (``choreograph.runtime.gc_tuning``).
``python`` keeps CPython's defaults. Either way *every* process of the run gets the same
setting - the floor, the raw-client and FastStream chains as well as choreograph - so a
ratio compares the code, not the collector settings. The choice travels to child
processes in ``CHOREOGRAPH_GC_THRESHOLD``, which ``choreograph run`` reads too.
"""

from __future__ import annotations

import argparse
import gc
import os
from typing import Any

from choreograph.runtime.gc_tuning import DEFAULT_GC_THRESHOLD, tune_gc

ENV = "CHOREOGRAPH_GC_THRESHOLD"


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gc",
        choices=["tuned", "python"],
        default="tuned",
        help="collector settings of every process in the run (default: tuned, as `choreograph run`)",
    )


def choose(choice: str) -> dict[str, Any]:
    """Set ``choice`` for this process and its children; what to report."""
    os.environ[ENV] = str(DEFAULT_GC_THRESHOLD if choice == "tuned" else 0)
    apply()
    return {"gc": choice, "gc_threshold": list(gc.get_threshold())}


def apply() -> None:
    """In a benchmark's child process: take the setting the parent chose."""
    tune_gc(int(os.environ.get(ENV, "0")))
