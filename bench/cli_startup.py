"""Start-up time of the ``choreograph`` command: what each invocation pays before it does anything.

Every figure is the wall time of a fresh ``python -m choreograph ...`` process, from spawn to
exit, run side by side with two baselines in the same run:

* ``bare_python``: ``python -c pass``, the interpreter alone;
* ``import_choreograph``: ``python -c "import choreograph"``, the floor of any command (the
  package's public API: pydantic, the envelope, the runtime).

and the commands:

* ``help``: ``choreograph --help`` (Rich help formatting);
* ``publish_help``: ``choreograph publish --help``;
* ``publish``: a real ``choreograph publish`` of one event to a SQLite bus in a temporary
  directory (the bus file is created by an unmeasured first publish);
* ``dlq_list``: ``choreograph dlq list`` on that bus (a Rich table).

The cases are interleaved, ``--n`` rounds of each after one unmeasured warm-up (which also
writes the bytecode caches). For each: wall-time median and p90 in milliseconds, the median
CPU time (user + system, of the child: steadier than wall time on a busy machine), and each
command's medians over the ``import_choreograph`` floor: what the command line itself costs.

``--against CHECKOUT`` also runs the four commands from another checkout's ``src/`` (say a
``git worktree`` of the commit before a change), interleaved with these: before and after,
measured in the same minute of a machine whose speed drifts.

    python bench/cli_startup.py                          # the README's figures (about a minute)
    python bench/cli_startup.py --n 5                    # a smoke run
    git worktree add /tmp/before HEAD~3 && python bench/cli_startup.py --against /tmp/before

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CHOREOGRAPH = [PYTHON, "-m", "choreograph"]


COMMANDS = ("help", "publish_help", "publish", "dlq_list")


def cases(url: str) -> dict[str, list[str]]:
    """Name -> argv, baselines first."""
    return {
        "bare_python": [PYTHON, "-c", "pass"],
        "import_choreograph": [PYTHON, "-c", "import choreograph"],
        "help": [*CHOREOGRAPH, "--help"],
        "publish_help": [*CHOREOGRAPH, "publish", "--help"],
        "publish": [*CHOREOGRAPH, "publish", "bench.cli.poked", "--data", '{"n": 1}', "--broker", url],
        "dlq_list": [*CHOREOGRAPH, "dlq", "list", "--broker", url],
    }


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of running ``argv`` to its exit; a failing command stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr.decode(errors='replace')}")
    return elapsed, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def figures(wall: list[float], cpu: list[float]) -> dict[str, float]:
    ordered = sorted(wall)
    return {
        "median_ms": round(1000 * statistics.median(ordered), 1),
        "p90_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 1),
        "min_ms": round(1000 * ordered[0], 1),
        "cpu_median_ms": round(1000 * statistics.median(cpu), 1),
    }


def with_src(src: Path) -> dict[str, str]:
    """The environment of a child importing choreograph from ``src`` (writing to pipes)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    env.pop("CHOREOGRAPH_BROKER", None)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="measured runs of each case")
    parser.add_argument("--against", type=Path, help="another checkout whose commands run beside these")
    args = parser.parse_args()
    here = with_src(ROOT / "src")
    with tempfile.TemporaryDirectory(prefix="choreograph-bench-cli-") as tmp:
        argvs = cases(f"sqlite:///{tmp}/bus.db")
        runs = {name: (argv, here) for name, argv in argvs.items()}
        if args.against is not None:
            there = with_src(args.against.resolve() / "src")
            runs.update({f"against_{name}": (argvs[name], there) for name in COMMANDS})
        for argv, env in runs.values():  # warm-up: bytecode caches, the bus file
            timed(argv, env)
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.n):
            for name, (argv, env) in runs.items():
                elapsed, used = timed(argv, env)
                wall[name].append(elapsed)
                cpu[name].append(used)
    report: dict[str, object] = {"python": platform.python_version(), "runs": args.n}
    if args.against is not None:
        report["against"] = str(args.against)
    floor = statistics.median(wall["import_choreograph"])
    cpu_floor = statistics.median(cpu["import_choreograph"])
    for name, (argv, _) in runs.items():
        entry: dict[str, object] = {"argv": " ".join(argv[1:]).replace(tmp, "$TMP"), **figures(wall[name], cpu[name])}
        if name not in ("bare_python", "import_choreograph"):
            entry["over_import_ms"] = round(1000 * (statistics.median(wall[name]) - floor), 1)
            entry["cpu_over_import_ms"] = round(1000 * (statistics.median(cpu[name]) - cpu_floor), 1)
        report[name] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
