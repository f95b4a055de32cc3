"""Instructions per event of the memory:// chain and of the plain-asyncio floor, by callgrind.

Wall-clock figures on a shared 2-core machine move by ±20% or more with whatever else runs;
instruction counts do not (valgrind counts the same for the same binary and input). This
runs bench/chain.py's floor (orjson), its codec-only pipeline and its memory:// run under
``valgrind --tool=callgrind`` for N events each, subtracts a run that only imports the same
modules, and prints JSON: instructions per event (3 hops) for each and their ratios, the same
ratios the issue asks of events/s (floor cost / choreograph cost). About a minute per 1,000 events.

    python bench/instructions.py --n 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(what: str, n: int) -> None:
    sys.path.insert(0, str(ROOT))
    import orjson

    from bench import _gc
    from bench.chain import codec_floor, floor, memory_run

    _gc.apply()  # the parent's --gc, in every child (the import-only baseline too), after the imports

    if what == "floor":
        asyncio.run(floor(n, orjson.dumps, orjson.loads))
    elif what == "codec":
        asyncio.run(codec_floor(n))
    elif what == "memory":
        asyncio.run(memory_run(n, 256))


def callgrind_instructions(script: str, child: str, n: int) -> int:
    """Instructions callgrind counts for ``python script --child child --n n`` (bench/telemetry.py uses it too)."""
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, script,
         "--child", child, "--n", str(n)],
        capture_output=True, text=True, check=True,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no callgrind total for {child}: {out.stderr[-500:]}")
    return int(found.group(1))


def instructions(what: str, n: int) -> int:
    return callgrind_instructions(__file__, what, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="events per run (default 2000)")
    parser.add_argument("--child", choices=["none", "floor", "codec", "memory"], help=argparse.SUPPRESS)
    sys.path.insert(0, str(ROOT))
    from bench import _gc

    _gc.add_option(parser)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.n)
        return
    gc_report = _gc.choose(args.gc)
    base = instructions("none", args.n)
    floor = (instructions("floor", args.n) - base) / args.n
    codec = (instructions("codec", args.n) - base) / args.n
    memory = (instructions("memory", args.n) - base) / args.n
    print(json.dumps({
        "bench": "instructions", "hops": 3, "n": args.n, "python": platform.python_version(), "loop": "asyncio",
        **gc_report,
        "floor_orjson_instructions_per_event": round(floor),
        "codec_instructions_per_event": round(codec),
        "memory_instructions_per_event": round(memory),
        "memory_vs_floor_orjson": round(floor / memory, 3),
        "codec_vs_floor_orjson": round(floor / codec, 3),
        "memory_vs_codec": round(codec / memory, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
