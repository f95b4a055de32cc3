"""A plain ``pip install choreograph`` (no extras): the commands that need no extra work, and
one that needs a missing extra says which, in one line.

The extras' modules are hidden from the command (an import hook refuses every top-level
module of a distribution that only an extra of ``pyproject.toml`` installs), which is what
an environment without them looks like. ``graph``, ``lint`` and ``dev`` read push configs;
they gave a traceback while the HTTP client was an extra.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_HIDE = """
import importlib.abc, sys
HIDDEN = set(sys.argv[1].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
sys.argv = ["choreograph", *sys.argv[2:]]
from choreograph.cli import main
main()
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def extras_only_modules() -> list[str]:
    """Top-level modules of the distributions that only the runtime extras install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    extras = {
        _name(r)
        for extra, requirements in project["optional-dependencies"].items()
        if extra not in ("dev", "bench", "all")
        for r in requirements
    }
    modules = importlib.metadata.packages_distributions()
    hidden = {
        module
        for module, distributions in modules.items()
        if {_name(d) for d in distributions} & (extras - base)
    }
    assert {"nats", "redis", "aio_pika", "asyncpg", "uvloop"} <= hidden  # the hook hides what it must
    return sorted(hidden)


def base_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _HIDE, ",".join(extras_only_modules()), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ("graph", "examples.shop.app:app", "--format", "dot"),
        ("graph", "examples.drone_delivery.app:app", "--format", "mermaid"),
        ("lint", "examples.shop.app:app"),
        ("asyncapi", "examples.drone_delivery.app:app"),
        ("push", "--help"),
    ],
)
def test_commands_without_an_extra_run_on_a_plain_install(args: tuple[str, ...]) -> None:
    result = base_cli(*args)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr  # lint exits 1 on warnings
    assert result.stdout


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("run", "examples.chain:payment", "--broker", "nats://127.0.0.1:1"), "nats"),
        (("run", "examples.chain:payment", "--broker", "redis://127.0.0.1:1/0"), "redis"),
        (("run", "examples.chain:payment", "--broker", "amqp://guest:guest@127.0.0.1:1/"), "amqp"),
        (("run", "examples.chain:payment", "--broker", "memory://", "--otel"), "telemetry"),
    ],
)
def test_a_command_needing_a_missing_extra_names_it_in_one_line(args: tuple[str, ...], extra: str) -> None:
    result = base_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert f"pip install 'choreograph[{extra}]'" in result.stderr
