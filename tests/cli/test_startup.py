"""A command imports what it uses: no other command's modules, no other broker's client.

Each test runs the command in a fresh interpreter (``choreograph.cli.main``, as the
``choreograph`` script does) and reads which modules it had imported by the end. What is
asserted is absence, not time: start-up time is measured by ``bench/cli_startup.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from importlib.metadata import version
from pathlib import Path

from choreograph.transports import Message, open_transport
from tests._brokers import require_broker
from tests.conformance.brokers import redis as redis_broker

ROOT = Path(__file__).resolve().parents[2]

#: What runs the command and writes the names of every module imported by its end to MODULES_FILE.
_RUN = """
import json, os, sys
sys.argv = ["choreograph", *json.loads(os.environ["ARGV"])]
from choreograph.cli import main
try:
    main()
finally:
    with open(os.environ["MODULES_FILE"], "w") as out:
        json.dump(sorted(sys.modules), out)
"""

#: Other commands' modules: the push ambassador (and its HTTP client), the flow graph, the
#: journal, the gateway (Starlette), watch's live view.
OTHER_COMMANDS = {
    "choreograph.push", "choreograph._push_config", "httpx", "choreograph.flow", "choreograph.asyncapi",
    "choreograph.journal", "choreograph._journal_store", "choreograph.gateway", "starlette",
    "choreograph.cli._watch_view", "choreograph._watch_model",
}
#: Every broker's client library, and the transports that import them.
BROKER_CLIENTS = {
    "nats", "redis", "aio_pika", "aiormq", "asyncpg",
    "choreograph.transports.nats", "choreograph.transports.redis", "choreograph.transports.amqp",
}
#: What only help pages and usage errors are drawn with: Typer's Rich formatting (Markdown, panels).
#: (Rich before 15 imports its panels with ``rich.console``, which every table needs.)
HELP_RENDERING = {"typer.rich_utils", "markdown_it", "rich.markdown"} | (
    {"rich.panel"} if int(version("rich").split(".")[0]) >= 15 else set()
)


def imported_by(tmp_path: Path, *args: str) -> set[str]:
    """The modules imported by ``choreograph ARGS`` run to its end, which must succeed."""
    modules_file = tmp_path / f"modules-{uuid.uuid4().hex}.json"
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "CHOREOGRAPH_BROKER")}
    env.update({"ARGV": json.dumps(list(args)), "MODULES_FILE": str(modules_file), "PYTHONPATH": str(ROOT)})
    result = subprocess.run([sys.executable, "-c", _RUN], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return set(json.loads(modules_file.read_text()))


def test_the_help_imports_no_command_module_no_broker_client_and_no_transport(tmp_path: Path) -> None:
    modules = imported_by(tmp_path, "--help")
    assert "typer.rich_utils" in modules  # the help is drawn, with Rich
    assert modules & (OTHER_COMMANDS | BROKER_CLIENTS | {"choreograph.transports.sqlite"}) == set()


def test_a_commands_help_imports_no_other_command_module(tmp_path: Path) -> None:
    modules = imported_by(tmp_path, "publish", "--help")
    assert modules & (OTHER_COMMANDS | BROKER_CLIENTS | {"choreograph.transports.sqlite"}) == set()


def test_publish_to_sqlite_imports_the_sqlite_transport_only_and_no_help_rendering(tmp_path: Path) -> None:
    modules = imported_by(tmp_path, "publish", "shop.order.placed", "--data", '{"n": 1}',
                          "--broker", f"sqlite:///{tmp_path}/bus.db")
    assert "choreograph.transports.sqlite" in modules
    assert modules & (OTHER_COMMANDS | BROKER_CLIENTS | HELP_RENDERING) == set()


def test_dlq_list_imports_neither_other_commands_nor_help_rendering(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    imported_by(tmp_path, "publish", "shop.order.placed", "--broker", url)  # creates the bus
    modules = imported_by(tmp_path, "dlq", "list", "--broker", url)
    assert "rich.table" in modules  # the dead letters are a table
    assert modules & (OTHER_COMMANDS | BROKER_CLIENTS | HELP_RENDERING) == set()


def test_a_usage_error_still_reads_one_line_though_typer_formats_it_lazily(tmp_path: Path) -> None:
    """The one-line format replaces Typer's only once an error is on its way: it must be in place by then."""
    result = subprocess.run([sys.executable, "-m", "choreograph", "publish"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert (result.returncode, result.stderr) == (
        2, "error: Missing argument 'TYPE'. (see python -m choreograph publish --help)\n"
    )


def test_dlq_list_on_redis_imports_the_redis_client_and_no_other_broker_or_the_sqlite_transport(
    tmp_path: Path,
) -> None:
    url = f"{require_broker('redis')}?prefix=choreograph-test-{uuid.uuid4().hex[:12]}"

    async def dead_letter_one() -> None:
        async with open_transport(url) as bus:
            subscription = await bus.subscribe("payment", ["shop.order.placed"])
            await bus.publish([Message(str(uuid.uuid4()), "shop.order.placed", b"{}")])
            (delivery,) = await subscription.fetch(1, timeout=5)
            await delivery.dead_letter({"reason": "rejected"})
            await subscription.close()

    try:
        asyncio.run(dead_letter_one())
        modules = imported_by(tmp_path, "dlq", "list", "--broker", url)
        assert "redis" in modules
        others = BROKER_CLIENTS - {"redis", "choreograph.transports.redis"} | {"choreograph.transports.sqlite"}
        assert modules & (OTHER_COMMANDS | others | HELP_RENDERING) == set()
    finally:
        asyncio.run(redis_broker.cleanup(url))
