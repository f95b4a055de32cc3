"""``choreograph graph``, ``lint`` and ``asyncapi`` as a user types them.

The apps below are loaded by the CLI as ``tests.cli.test_graph_cli:NAME``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pydot
import pytest
from examples.chain import app as chain
from typer.testing import CliRunner

from choreograph import App, Event, Service
from choreograph._push_config import load_config
from choreograph.asyncapi import asyncapi_document
from choreograph.cli import app as cli_app
from choreograph.flow import build

ROOT = Path(__file__).resolve().parents[2]
HERE = "tests.cli.test_graph_cli"


class Asked(Event, type="test.cli.graph.asked"):
    question: str


class Answered(Event, type="test.cli.graph.answered"):
    answer: str


class Echoed(Event, type="test.cli.graph.echoed"):
    text: str


oracle = Service("oracle")


@oracle.on(Asked)
async def answer(asked: Asked) -> Answered | Echoed: ...


parrot = Service("parrot")


@parrot.on(Echoed)
async def repeat(echoed: Echoed) -> Asked: ...


clean = App("clean", [oracle], ingress=[Asked], terminal={Answered: "completed", Echoed: "completed"})
looping = App("looping", [oracle, parrot], ingress=[Asked], terminal={Answered: "completed"})
warned = App("warned", [oracle], ingress=[Asked], terminal={Answered: "completed"})  # Echoed goes nowhere
services = [oracle, parrot]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli_app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """A real ``python -m choreograph`` process: exit statuses as a shell sees them."""
    return subprocess.run(
        [sys.executable, "-m", "choreograph", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )


# --- graph ----------------------------------------------------------------------------------------


def test_graph_prints_mermaid_by_default() -> None:
    code, out, _ = run("graph", "examples.chain:app")
    assert code == 0
    assert out == build(chain).to_mermaid()
    assert out.splitlines()[:2] == ["%% choreograph flow: chain", "flowchart LR"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot 4 on pyparsing 3.3
def test_graph_prints_dot_that_graphviz_can_read() -> None:
    code, out, _ = run("graph", "examples.chain:app", "--format", "dot")
    assert code == 0 and out == build(chain).to_dot()
    [dot] = pydot.graph_from_dot_data(out)
    assert len(dot.get_edges()) == len(build(chain).edges)


def test_graph_writes_json_to_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "flow.json"
    code, out, err = run("graph", "examples.chain:app", "-f", "json", "--output", str(target))
    assert (code, out) == (0, "")
    assert "wrote" in err and str(target) in " ".join(err.split())
    assert json.loads(target.read_text()) == build(chain).to_dict()


def test_graph_of_a_list_of_services_is_named_after_the_attribute() -> None:
    code, out, _ = run("graph", f"{HERE}:services", "-f", "json")
    doc = json.loads(out)
    assert (code, doc["name"], doc["app"]) == (0, "services", False)


def test_an_unknown_format_is_a_usage_error() -> None:
    code, _, err = run("graph", "examples.chain:app", "--format", "png")
    assert code == 2 and "png" in err


# --- lint -----------------------------------------------------------------------------------------


def test_lint_of_a_clean_app_says_so_and_exits_0() -> None:
    code, out, _ = run("lint", f"{HERE}:clean")
    assert code == 0
    assert "clean: no problems found (1 services, 3 event types)" in out


def test_lint_warnings_alone_exit_0_and_are_printed_with_their_code() -> None:
    code, out, _ = run("lint", f"{HERE}:warned")
    assert code == 0
    assert "warning" in out and "unconsumed" in out and "test.cli.graph.echoed" in out
    assert "0 errors, 1 warning" in out


def test_lint_errors_exit_1() -> None:
    code, out, _ = run("lint", f"{HERE}:looping")
    assert code == 1
    assert "error" in out and "cycle" in out
    assert "1 error" in out


def test_lint_output_keeps_brackets_in_messages() -> None:
    """Rich markup must not eat ``[parrot]`` or ``on=[failed(...)]`` from a finding."""
    code, out, _ = run("lint", "examples.chain:app")
    assert code == 0
    assert "on=[failed(PaymentCaptured)]" in "".join(out.split())
    code, out, _ = run("lint", f"{HERE}:looping")
    assert "[parrot]" in out


@pytest.mark.parametrize(
    ("target", "status", "errors"), [("clean", 0, 0), ("warned", 0, 0), ("looping", 1, 1)]
)
def test_lint_json_reports_findings_and_counts(target: str, status: int, errors: int) -> None:
    code, out, _ = run("lint", f"{HERE}:{target}", "--json")
    doc = json.loads(out)
    assert (code, doc["name"], doc["errors"]) == (status, target, errors)
    assert doc["warnings"] == sum(f["severity"] == "warning" for f in doc["findings"])
    assert all(set(f) == {"code", "severity", "message", "subjects"} for f in doc["findings"])


def test_lint_exit_status_reaches_the_shell() -> None:
    assert cli("lint", f"{HERE}:looping").returncode == 1
    assert cli("lint", f"{HERE}:warned").returncode == 0


# --- push subscriptions (--push CONFIG) ---------------------------------------------------------

ECHO_HOOK = """
[[subscriptions]]
group = "echo-hook"
types = ["test.cli.graph.echoed"]
url = "https://hooks.example/echo"
secret_env = "TEST_GRAPH_UNSET_SECRET"   # graph and lint read no credentials: it need not be set
where = "subject LIKE 'eu-%'"
"""


def push_config(tmp_path: Path, text: str = ECHO_HOOK, name: str = "push.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_graph_json_has_the_push_node_and_its_filtered_edge(tmp_path: Path) -> None:
    code, out, _ = run("graph", f"{HERE}:warned", "-f", "json", "--push", push_config(tmp_path))
    assert code == 0
    doc = json.loads(out)
    [node] = [n for n in doc["nodes"] if n["kind"] == "push"]
    assert (node["id"], node["label"], node["host"]) == ("push:echo-hook", "echo-hook", "hooks.example")
    assert node["filters"] == [{"sql": "subject LIKE 'eu-%'"}]
    [edge] = [e for e in doc["edges"] if e["target"] == "push:echo-hook"]
    assert (edge["source"], edge["kind"], edge["filter"]) == (
        "event:test.cli.graph.echoed", "consumes", "subject LIKE 'eu-%'"
    )


def test_graph_mermaid_draws_every_push_config_given(tmp_path: Path) -> None:
    """``--push`` repeats; each subscription is a node labelled with its host."""
    audit = push_config(tmp_path, (
        "subscriptions:\n  - group: audit\n    types: [test.cli.graph.asked]\n    url: http://10.0.0.9:9000/in\n"
    ), "audit.yaml")
    code, out, _ = run("graph", f"{HERE}:warned", "--push", push_config(tmp_path), "--push", audit)
    assert code == 0
    assert '    push_echo_hook{{"echo-hook<br/>hooks.example"}}:::push' in out.splitlines()
    assert '    push_audit{{"audit<br/>10.0.0.9:9000"}}:::push' in out.splitlines()
    assert "    evt_test_cli_graph_asked --> push_audit" in out.splitlines()
    assert '    evt_test_cli_graph_echoed -->|"subject LIKE \'eu-%\'"| push_echo_hook' in out.splitlines()


def test_lint_counts_push_subscribers_as_consumers(tmp_path: Path) -> None:
    """Echoed goes nowhere in Python; with its HTTP subscriber given it is no longer a dead end."""
    code, out, _ = run("lint", f"{HERE}:warned", "--json")
    assert [f["code"] for f in json.loads(out)["findings"]] == ["unconsumed"]
    code, out, _ = run("lint", f"{HERE}:warned", "--json", "--push", push_config(tmp_path))
    assert code == 0
    assert "unconsumed" not in [f["code"] for f in json.loads(out)["findings"]]
    code, out, _ = run("lint", f"{HERE}:clean", "--push", push_config(tmp_path))
    assert "(1 services, 3 event types, 1 push subscription)" in " ".join(out.split())


def test_the_polyglot_push_config_joins_the_drone_delivery_graph_without_its_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """examples/polyglot/push.toml needs DELIVERY_WEBHOOK_SECRET to push, not to be drawn."""
    monkeypatch.delenv("DELIVERY_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("DELIVERY_NODE_URL", raising=False)
    config = str(ROOT / "examples" / "polyglot" / "push.toml")
    code, out, _ = run("graph", "examples.drone_delivery.app:app", "--push", config)
    assert code == 0
    lines = out.splitlines()
    assert "    evt_drone_drone_assigned --> push_delivery_node" in lines
    assert "    push_delivery_node --> evt_drone_delivery_scheduled" in lines
    code, out, _ = run("lint", "examples.drone_delivery.app:app", "--push", config)
    assert code == 0 and "no problems found" in out


def test_a_bad_push_config_names_the_file_and_key_and_exits_2(tmp_path: Path) -> None:
    config = push_config(tmp_path, ECHO_HOOK.replace('where = "', 'filters = [{ prefx = { type = "x" } }]\n#'))
    result = cli("graph", f"{HERE}:warned", "--push", config)
    assert result.returncode == 2, result.stderr
    assert "push.toml: subscriptions[0].filters[0]: unknown dialect 'prefx'" in " ".join(result.stderr.split())


# --- asyncapi -------------------------------------------------------------------------------------


def test_asyncapi_prints_the_document() -> None:
    code, out, _ = run("asyncapi", "examples.chain:app")
    assert code == 0
    assert json.loads(out) == asyncapi_document(chain)


def test_asyncapi_writes_a_file_with_title_and_version(tmp_path: Path) -> None:
    target = tmp_path / "asyncapi.json"
    code, _, _ = run(
        "asyncapi", f"{HERE}:clean", "-o", str(target), "--title", "Oracle", "--version", "0.3.0"
    )
    doc = json.loads(target.read_text())
    assert code == 0
    assert (doc["asyncapi"], doc["info"]["title"], doc["info"]["version"]) == ("3.0.0", "Oracle", "0.3.0")


ASYNCAPI_SCHEMA = Path("/work/shared/conformance/asyncapi-spec-json-schemas/schemas/3.0.0-without-$id.json")


@pytest.mark.skipif(not ASYNCAPI_SCHEMA.exists(), reason=f"conformance data missing: {ASYNCAPI_SCHEMA}")
def test_asyncapi_takes_push_configs_and_documents_each_subscriber_as_a_receiver(tmp_path: Path) -> None:
    """``graph`` and ``lint`` counted a push subscriber as a consumer, ``asyncapi`` had no ``--push``:
    a type only an HTTP subscriber receives was documented as received by nobody."""
    import jsonschema

    hook = push_config(tmp_path, ECHO_HOOK + 'emits = ["test.cli.graph.asked"]\n')
    code, out, _ = run("asyncapi", f"{HERE}:warned", "--push", hook)
    assert code == 0
    doc = json.loads(out)
    assert doc == asyncapi_document(build(warned, push=load_config(Path(hook), credentials=False).subscriptions))
    assert "Received by: echo-hook." in doc["channels"]["test.cli.graph.echoed"]["description"]
    received = doc["operations"]["echo-hook.receive.test.cli.graph.echoed"]
    assert received["action"] == "receive" and received["tags"] == [{"name": "echo-hook"}]
    assert received["summary"] == (
        "push subscriber echo-hook receives test.cli.graph.echoed over HTTP (hooks.example) where subject LIKE 'eu-%'"
    )
    assert doc["operations"]["echo-hook.send.test.cli.graph.asked"]["action"] == "send"
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    assert [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)] == []


class Billed(Event, type="test.cli.graph.billed"):
    cents: int = pydantic.Field(lt=10**20)  # a bound beyond 64 bits, in the event's JSON Schema


biller = Service("biller")


@biller.on(Billed)
async def bill(billed: Billed) -> None: ...


billing = App("billing", [biller], ingress=[Billed])


def test_asyncapi_of_an_event_whose_schema_holds_an_integer_beyond_64_bits() -> None:
    """orjson cannot write one: a TypeError traceback instead of the document."""
    code, out, _ = run("asyncapi", f"{HERE}:billing")
    assert code == 0
    assert json.loads(out) == json.loads(json.dumps(asyncapi_document(billing)))
    assert "100000000000000000000" in out


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["graph", "no_such_module:app"], "no module named 'no_such_module'"),
        (["lint", "examples.chain:nope"], "has no attribute 'nope'"),
        (["asyncapi", "examples.chain"], "expected MODULE:ATTRIBUTE"),
        (["lint", "examples.chain:FAILURE_RATE"], "not a Service, a list of Services or an App"),
    ],
)
def test_a_bad_target_prints_one_clear_line_and_exits_2(args: list[str], needle: str) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in " ".join(result.stderr.split())


class Unschemed:
    """Checked with isinstance only: no JSON Schema."""


class Gauged(Event, type="test.cli.graph.gauged"):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True, frozen=True)
    gauge: Unschemed


gauges = Service("gauges")


@gauges.on(Gauged)
async def measure(gauged: Gauged) -> None: ...


unschemed = App("unschemed", [gauges], ingress=[Gauged])


def test_asyncapi_of_a_payload_without_a_json_schema_names_the_event_and_field_and_exits_2() -> None:
    result = cli("asyncapi", f"{HERE}:unschemed")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: test.cli.graph.gauged (tests.cli.test_graph_cli.Gauged): its payload has no JSON Schema at " \
           "$.gauge" in " ".join(result.stderr.split())


def test_the_file_written_is_named_as_it_is_not_as_emoji_codes(tmp_path: Path) -> None:
    target = tmp_path / "flow:ok:.md"
    result = cli("graph", "examples.chain:app", "-o", str(target))
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"wrote {target}\n"


def test_an_output_file_under_a_file_names_that_file_not_file_exists(tmp_path: Path) -> None:
    """mkdir's "File exists" (exist_ok is for folders) read as if the output file were there already."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = cli("graph", "examples.chain:app", "-o", str(blocker / "sub" / "out.md"))
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {blocker / 'sub' / 'out.md'}: cannot write ({str(blocker)!r} is a file, not a folder)\n"


@pytest.mark.parametrize("command", ["graph", "asyncapi"])
def test_an_output_file_that_cannot_be_written_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    """-o under a path that is a file (or unwritable) names the file and why, without a traceback."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = cli(command, "examples.chain:app", "-o", str(blocker / "out.json"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: {blocker / 'out.json'}: cannot write (" in " ".join(result.stderr.split())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device every write to fails)")
@pytest.mark.parametrize("command", ["graph", "lint", "asyncapi"])
def test_a_stdout_that_cannot_be_written_is_one_line_and_exit_2(command: str) -> None:
    """``> /dev/full`` (a full disk): the reason in one line on stderr, no traceback, no "Exception ignored"."""
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "choreograph", command, "examples.chain:app"], cwd=ROOT,
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                                env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: cannot write the output: No space left on device"]
