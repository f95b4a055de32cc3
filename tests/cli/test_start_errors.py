"""What ``run`` and ``dev`` refuse as they start: one line naming the option and the reason, exit 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests._procs import lines_until, stop
from tests.cli.test_core_cli import ROOT, cli


def refused(*args: str, cwd: Path = ROOT) -> str:
    """The one line of stderr of a command that must refuse its input with exit 2."""
    result = cli(*args, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_run_with_a_metrics_port_already_taken_names_the_option_the_address_and_the_reason() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = refused("run", "examples.chain:payment", "--broker", "memory://", "--metrics-port", str(port))
    assert line.startswith(f"error: --metrics-port {port}: cannot serve metrics on 127.0.0.1:{port}: "), line
    assert "in use" in line


def test_run_with_a_metrics_host_that_does_not_resolve_names_the_host_option() -> None:
    line = refused("run", "examples.chain:payment", "--broker", "memory://", "--metrics-port", "0",
                   "--metrics-host", "no-such-host.invalid")
    assert line.startswith("error: --metrics-host 'no-such-host.invalid': cannot serve metrics on "
                           "no-such-host.invalid:0: "), line


def test_run_on_a_sqlite_bus_whose_folder_is_a_file_names_the_file_and_the_folder(tmp_path: Path) -> None:
    (tmp_path / "var").write_text("")
    line = refused("run", "examples.chain:payment", "--broker", f"sqlite:///{tmp_path}/var/bus.db")
    assert line == (f"error: SQLite database '{tmp_path}/var/bus.db': cannot create its folder '{tmp_path}/var': "
                    f"'{tmp_path}/var' is a file, not a folder\n")


@pytest.mark.parametrize(
    ("source", "raised"),
    [
        ("import os\n\nraise ValueError('no PAYMENT_URL set')\n",
         "ValueError: no PAYMENT_URL set (at app_module.py:3)"),
        ("import json\n\nSETTINGS = json.loads('{oops')\n",  # the line of the app, not of the json package
         "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1) "
         "(at app_module.py:3)"),
        ("def handler(:\n    pass\n", "SyntaxError: invalid syntax (at app_module.py:1)"),
        ("import app_dependency_not_installed\n",  # a missing dependency, not a missing module
         "ModuleNotFoundError: No module named 'app_dependency_not_installed' (at app_module.py:1)"),
        ("import app\n", "ModuleNotFoundError: No module named 'app' (at app_module.py:1)"),
    ],
    ids=["raises", "raises-in-a-library", "syntax-error", "missing-dependency", "dependency-named-like-its-prefix"],
)
def test_run_of_a_module_that_fails_to_import_is_one_line_naming_the_exception_and_its_line(
    tmp_path: Path, source: str, raised: str
) -> None:
    (tmp_path / "app_module.py").write_text(source)
    line = refused("run", "app_module:app", "--broker", "memory://", cwd=tmp_path)
    assert line == f"error: 'app_module': importing it raised {raised}\n"


@pytest.mark.parametrize(
    "command",
    [
        ["run", "app_module:app", "--broker", "memory://"],
        ["journal", "app_module:app", "--broker", "memory://", "--store", "memory://"],
        ["gateway", "app_module:gateway", "--port", "0"],
        ["dev", "app_module:app", "--data-dir", "var"],
    ],
    ids=lambda command: command[0],
)
def test_with_log_level_debug_a_module_that_fails_to_import_shows_its_traceback_then_the_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "app_module.py").write_text("import app_settings\n")
    (tmp_path / "app_settings.py").write_text("def url():\n    raise ValueError('no PAYMENT_URL set')\n\nURL = url()\n")
    result = cli(*command, "--log-level", "debug", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback (most recent call last):" in result.stderr, result.stderr
    assert 'app_settings.py", line 4, in <module>' in result.stderr  # the frames between the module and the raise
    assert 'app_settings.py", line 2, in url' in result.stderr
    assert result.stderr.endswith(
        "error: 'app_module': importing it raised ValueError: no PAYMENT_URL set (at app_settings.py:2)\n"
    ), result.stderr


@pytest.mark.parametrize(
    ("faults", "bad_part"),
    [
        ('{"payment": {"fail_rate": 2}}', "faults['payment']: fail_rate must be between 0 and 1, got 2.0"),
        ('{"payment": {"fail_rat": 0.5}}', "faults['payment']: unknown setting(s) ['fail_rat']"),
        ("{oops", "not valid JSON"),
    ],
)
def test_run_refuses_a_malformed_choreograph_faults_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, faults: str, bad_part: str
) -> None:
    """Handlers read the variable on their first step: without the check the worker started, then every
    step of a faulty service failed on the configuration and was retried into the dead letters."""
    monkeypatch.setenv("CHOREOGRAPH_FAULTS", faults)
    line = refused("run", "examples.chain:payment", "--broker", "memory://")
    assert line.startswith(f"error: CHOREOGRAPH_FAULTS: {bad_part}"), line


def test_dev_refuses_a_malformed_choreograph_faults_before_any_process_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHOREOGRAPH_FAULTS", '{"*": {"crash_after": -1}}')
    line = dev_refused(tmp_path / "var")
    assert line == "error: CHOREOGRAPH_FAULTS: faults['*']: crash_after must be >= 0, got -1\n"
    assert not (tmp_path / "var").exists()  # not even the bus was created


def test_dev_with_a_data_dir_under_a_file_names_the_option_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "var").write_text("")
    assert dev_refused(tmp_path / "var" / "shop") == (
        f"error: --data-dir '{tmp_path}/var/shop': cannot create it: '{tmp_path}/var' is a file, not a folder\n"
    )


def test_dev_refuses_an_unknown_log_level_before_any_process_starts(tmp_path: Path) -> None:
    """Each process refused it as it started, and dev stopped them all (exit 1)."""
    assert dev_refused(tmp_path / "var", "--log-level", "loud") == (
        "error: --log-level 'loud': expected DEBUG, INFO, WARNING, ERROR or CRITICAL\n"
    )


def dev(data_dir: Path, *options: str, gateway: bool = False) -> subprocess.Popen[str]:
    """``choreograph dev examples.chain:app`` (no gateway unless ``gateway``: give ``--gateway``); stop it
    with :func:`stop`, which stops its processes too (killing it alone would leave them running)."""
    return subprocess.Popen(
        [sys.executable, "-m", "choreograph", "dev", "examples.chain:app", "--data-dir", str(data_dir),
         *([] if gateway else ["--no-gateway"]), *options], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "1000"},
    )


def dev_refused(data_dir: Path, *options: str, gateway: bool = False) -> str:
    """The one line of stderr of a ``dev`` that must refuse its input with exit 2 before starting anything."""
    proc = dev(data_dir, *options, gateway=gateway)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _, err = stop(proc)
        pytest.fail(f"dev started: {err}")
    assert proc.returncode == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(("option", "variable"), [(["--secret", ""], None), (["--secret", " "], None), ([], "")])
def test_push_refuses_an_empty_secret_rather_than_delivering_unsigned(
    monkeypatch: pytest.MonkeyPatch, option: list[str], variable: str | None
) -> None:
    """``--secret "$SECRET"`` of an unset variable (or CHOREOGRAPH_PUSH_SECRET set empty) delivered
    unsigned, without a word; a config file's empty secret was already refused."""
    if variable is not None:
        monkeypatch.setenv("CHOREOGRAPH_PUSH_SECRET", variable)
    line = refused(*PUSH, *option)
    name = "--secret" if option else "CHOREOGRAPH_PUSH_SECRET"
    assert line == (f"error: {name} {(option[1] if option else variable)!r}: empty; give the whsec_... signing secret, "
                    "or leave it out to deliver unsigned\n"), line


def test_push_with_only_a_config_file_ignores_an_empty_secret_variable_it_never_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CHOREOGRAPH_PUSH_SECRET is ``--secret``'s, which signs only the subscription given by options:
    set empty (a compose file's ``${SECRET}`` unset), it refused a ``--config`` whose subscriptions
    never read it. The file is read, and here refused for its own mistake."""
    monkeypatch.setenv("CHOREOGRAPH_PUSH_SECRET", "")
    config = tmp_path / "push.toml"
    config.write_text('[[subscriptions]]\ngroup = "g"\ntypes = ["a.b"]\n')
    line = refused("push", "--broker", "memory://", "--store", "memory://", "--config", str(config))
    assert line == "error: push.toml: subscriptions[0].url: required key is missing\n", line


def test_dev_refuses_a_data_dir_with_a_question_mark_naming_the_option_and_creates_nothing(tmp_path: Path) -> None:
    """``?`` starts a sqlite:// URL's query: the error named the broker URL's "unknown parameter(s)
    b/bus.db", after the folder was made."""
    assert dev_refused(tmp_path / "a?b") == (
        f"error: --data-dir '{tmp_path}/a?b': a sqlite:// URL cannot name a path with '?' (it starts the URL's "
        "query): pick a folder without one\n"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("spec", "kind"),
    [("examples.chain:OrderPlaced", "the Event class OrderPlaced"), ("examples.chain:FAILURE_RATE", "a float")],
)
def test_dev_refuses_a_gateway_that_is_no_gateway_nor_asgi_app_before_any_process_starts(
    tmp_path: Path, spec: str, kind: str
) -> None:
    """It was imported, not checked: every service and the journal started, then the gateway process
    refused it, and dev stopped them all (exit 1)."""
    assert dev_refused(tmp_path / "var", "--gateway", spec, "--port", "0", gateway=True) == (
        f"error: {spec!r} is {kind}, not a Gateway or an ASGI app\n"
    )


def test_run_refuses_a_negative_drain_timeout_naming_the_option() -> None:
    line = refused("run", "examples.chain:payment", "--broker", "memory://", "--drain-timeout", "-5")
    assert line.startswith("error: Invalid value for '--drain-timeout': "), line


RUN = ("run", "examples.chain:payment", "--broker", "memory://")
PUSH = ("push", "--broker", "memory://", "--store", "memory://", "--group", "h-seconds", "--type", "a.b",
        "--url", "http://127.0.0.1:9/", "--no-handshake")
JOURNAL = ("journal", "examples.chain:app", "--broker", "memory://", "--store", "memory://")
UNTIL_INF = "a number of seconds >= 0, or inf (no limit)"


@pytest.mark.parametrize(
    ("command", "option", "value", "expected"),
    [
        (RUN, "--drain-timeout", "nan", UNTIL_INF),
        (RUN, "--drain-timeout", "-inf", UNTIL_INF),
        (RUN, "--retention", "nan", UNTIL_INF),
        (RUN, "--ack-delay", "nan", "a number of seconds >= 0 and <= 1"),
        (PUSH, "--drain-timeout", "nan", UNTIL_INF),  # was taken: a ValueError from the event loop on stop
        (PUSH, "--drain-timeout", "-1", UNTIL_INF),  # was taken: no drain at all
        (PUSH, "--timeout", "nan", "a number of seconds > 0"),  # was blamed on 'options.timeout'
        (PUSH, "--timeout", "inf", "a number of seconds > 0"),
        (PUSH, "--max-retry-after", "nan", "a number of seconds >= 0"),
        (JOURNAL, "--stuck-after", "nan", "a number of seconds > 0, or inf (no limit)"),
    ],
)
def test_an_option_taking_seconds_refuses_nan_and_what_is_out_of_its_range_naming_the_option_and_the_range(
    command: tuple[str, ...], option: str, value: str, expected: str
) -> None:
    """nan passed a range check (click's) or failed it for the wrong reason ("should be greater than
    or equal to 0"); an option without one took it, or a negative number."""
    line = refused(*command, option, value)
    assert line.startswith(f"error: Invalid value for '{option}'"), line
    assert f": expected {expected}, got {value} (see python -m choreograph {command[0]} --help)\n" in line, line


def test_dev_refuses_a_nan_stop_timeout_before_any_process_starts(tmp_path: Path) -> None:
    assert dev_refused(tmp_path / "var", "--stop-timeout", "nan") == (
        f"error: Invalid value for '--stop-timeout': expected {UNTIL_INF}, got nan (see python -m choreograph dev --help)\n"
    )
    assert not (tmp_path / "var").exists()


def test_run_takes_an_infinite_drain_timeout_and_retention_and_drains_what_is_in_flight(tmp_path: Path) -> None:
    """inf is meaningful for both: wait for in-flight handlers however long they take; never forget."""
    (tmp_path / "slow_h1.py").write_text(
        "import asyncio\n"
        "from choreograph import Event, Service\n\n"
        "class Slow(Event, type='h1.slow.requested'):\n"
        "    n: int\n\n"
        "slow = Service('slow-h1')\n\n"
        "@slow.on(Slow)\n"
        "async def take_time(event: Slow, ctx) -> None:\n"
        "    ctx.logger.info('handler started')\n"
        "    await asyncio.sleep(1.5)\n"
        "    ctx.logger.info('handler finished')\n"
    )
    bus = f"sqlite:///{tmp_path}/bus.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "choreograph", "run", "slow_h1:slow", "--broker", bus, "--drain-timeout", "inf",
         "--retention", "inf"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        assert lines_until(proc.stdout, lambda line: "running slow-h1" in line, seen=lines), lines
        published = cli("publish", "h1.slow.requested", "--data", '{"n": 1}', "--broker", bus, cwd=tmp_path)
        assert published.returncode == 0, published.stderr
        assert lines_until(proc.stdout, lambda line: "handler started" in line, seen=lines), lines
    finally:
        out, _ = stop(proc)
    assert proc.returncode == 0 and "Traceback" not in out, "".join(lines) + out
    assert "handler finished" in out, "".join(lines) + out


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_broker_option_is_refused_rather_than_taken_for_the_default_bus(
    tmp_path: Path, value: str
) -> None:
    """A script passing ``--broker "$BROKER"`` with the variable unset ran against ./var/bus.db."""
    assert refused("groups", "list", "--broker", value, cwd=tmp_path) == (
        f"error: --broker {value!r}: empty; give a broker URL, or leave the option out\n"
    )
    assert refused("run", "examples.chain:payment", "-b", value, cwd=tmp_path).startswith(f"error: --broker {value!r}")
    assert dev_refused(tmp_path / "dev", "--broker", value).startswith(f"error: --broker {value!r}")
    assert not list(tmp_path.iterdir())  # no bus was created anywhere


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_broker_option_of_push_is_refused_rather_than_taken_for_the_default_bus(
    tmp_path: Path, value: str
) -> None:
    """push read ``--broker`` as ``broker or the file's``: empty, it ran against ./var/bus.db."""
    line = refused("push", "--broker", value, "--group", "g-empty-broker", "--type", "a.b",
                   "--url", "http://127.0.0.1:9/", "--no-handshake", cwd=tmp_path)
    assert line == f"error: --broker {value!r}: empty; give a broker URL, or leave the option out\n"
    assert not list(tmp_path.iterdir())  # no bus, no store


def test_an_empty_group_or_url_option_of_push_is_refused_as_empty_not_as_missing(tmp_path: Path) -> None:
    """``--group ""`` was "--group missing (give --group, --type and --url together)": it was given."""
    assert refused("push", "--broker", "memory://", "--group", "", "--type", "a.b", "--url", "http://127.0.0.1:9/",
                   cwd=tmp_path) == "error: options: push subscription group '': use letters, digits, '_', '.', '-'\n"
    assert refused("push", "--broker", "memory://", "--group", "g", "--type", "a.b", "--url", "", cwd=tmp_path) == (
        "error: options: push subscription 'g': url '' is not an http(s) URL\n"
    )


def test_choreograph_broker_wins_over_a_push_configs_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the file's documentation says (``--broker and $CHOREOGRAPH_BROKER win``); the file's
    broker was taken first, and the variable never read."""
    (tmp_path / "push.toml").write_text(
        'broker = "memory://"\n\n[[subscriptions]]\ngroup = "g-env-broker"\ntypes = ["a.b"]\n'
        'url = "http://127.0.0.1:9/"\nhandshake = false\n'
    )
    monkeypatch.setenv("CHOREOGRAPH_BROKER", "kafka://from-the-variable")
    result = cli("push", "--config", "push.toml", cwd=tmp_path, timeout=20)  # on the file's broker it runs on
    assert result.returncode == 2, result.stderr
    assert "'kafka://from-the-variable': unknown scheme 'kafka'" in result.stderr, result.stderr


@pytest.mark.parametrize("value", ['""', '"  "', '"${CHOREOGRAPH_TEST_UNSET_BROKER:-}"'])
def test_an_empty_broker_in_a_push_config_names_the_file_and_its_key_not_the_broker_option(
    tmp_path: Path, value: str
) -> None:
    """It was `error: --broker '': empty`, an option the user never typed."""
    (tmp_path / "push.toml").write_text(
        f"broker = {value}\n\n[[subscriptions]]\ngroup = \"g-empty-broker\"\ntypes = [\"a.b\"]\n"
        "url = \"http://127.0.0.1:9/\"\nhandshake = false\n"
    )
    line = "error: push.toml: broker: empty; give a broker URL, or leave the key out\n"
    assert refused("push", "--config", "push.toml", cwd=tmp_path) == line
    assert refused("push", "--config", "push.toml", "--broker", "memory://", cwd=tmp_path) == line  # the file is wrong
    assert list(tmp_path.iterdir()) == [tmp_path / "push.toml"]  # no bus, no store


PUSH_OPTIONS = ("--group", "g-empty-store", "--type", "a.b", "--url", "http://127.0.0.1:9/", "--no-handshake")


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_store_option_is_refused_rather_than_taken_for_the_default_store(tmp_path: Path, value: str) -> None:
    """A script passing ``--store "$STORE"`` with the variable unset kept its inbox (or journal) in the default
    one: a service then ran again what its real inbox had recorded as done."""
    store = f"error: --store {value!r}: empty; give a store URL, or leave the option out\n"
    assert refused("run", "examples.chain:payment", "--broker", "memory://", "--store", value, cwd=tmp_path) == store
    assert refused("push", "--broker", "memory://", "--store", value, *PUSH_OPTIONS, cwd=tmp_path) == store
    assert refused("journal", "examples.chain:app", "--broker", "memory://", "--store", value, cwd=tmp_path) == (
        f"error: --store {value!r}: empty; give a journal store URL, or leave the option out\n"
    )
    for command in (["trace", "order-1"], ["transactions"], ["watch", "--once"]):
        assert refused(*command, "--journal", value, cwd=tmp_path) == (
            f"error: --journal {value!r}: empty; give a journal store URL, or leave the option out\n"
        ), command
    assert not list(tmp_path.iterdir())  # no store was created anywhere


@pytest.mark.parametrize("value", ['""', '"  "', '"${CHOREOGRAPH_TEST_UNSET_STORE:-}"'])
def test_an_empty_store_in_a_push_config_names_the_file_and_its_key(tmp_path: Path, value: str) -> None:
    """It was taken for no store at all: the inbox went beside the bus."""
    (tmp_path / "push.toml").write_text(
        f"store = {value}\n\n[[subscriptions]]\ngroup = \"g-empty-store\"\ntypes = [\"a.b\"]\n"
        "url = \"http://127.0.0.1:9/\"\nhandshake = false\n"
    )
    line = "error: push.toml: store: empty; give a store URL, or leave the key out\n"
    assert refused("push", "--config", "push.toml", "--broker", "memory://", cwd=tmp_path) == line
    assert refused("push", "--config", "push.toml", "--broker", "memory://", "--store", "memory://", cwd=tmp_path) == line
    assert list(tmp_path.iterdir()) == [tmp_path / "push.toml"]


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_choreograph_journal_is_refused_naming_the_variable_rather_than_taken_for_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    """``CHOREOGRAPH_JOURNAL=$JOURNAL`` with the variable unset recorded to (or read) ./var/journal.db."""
    monkeypatch.setenv("CHOREOGRAPH_JOURNAL", value)
    line = f"error: CHOREOGRAPH_JOURNAL {value!r}: empty; give a journal store URL, or unset the variable\n"
    assert refused("journal", "examples.chain:app", "--broker", "memory://", cwd=tmp_path) == line
    for command in (["trace", "order-1"], ["transactions"], ["watch", "--once"]):
        assert refused(*command, cwd=tmp_path) == line, command
    assert dev_refused(tmp_path / "var") == line
    assert not list(tmp_path.iterdir())  # not even dev's data dir
    assert cli("transactions", "--journal", "memory://", cwd=tmp_path).returncode == 0  # the option wins: not read


def test_dev_metrics_port_0_gives_each_process_a_free_port_as_run_does(tmp_path: Path) -> None:
    proc = dev(tmp_path / "var", "--no-journal", "--metrics-port", "0")
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        ready = lines_until(proc.stdout, lambda line: "metrics (/metrics on 127.0.0.1)" in line, seen=lines)
    finally:
        out, err = stop(proc)
    assert ready is not None, "".join(lines) + out + err
    ports = {line.split("|")[0].strip(): int(line.rsplit(":", 1)[1].split("/")[0])
             for line in lines if "metrics on http://127.0.0.1:" in line}
    assert sorted(ports) == ["notify", "payment", "shipping"] and 0 not in ports.values(), lines
    assert len(set(ports.values())) == 3
    assert "payment, shipping, notify each on a free port" in ready


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_choreograph_broker_is_refused_naming_the_variable_rather_than_taken_for_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    """``CHOREOGRAPH_BROKER=$BROKER`` with the variable unset published to (or read) ./var/bus.db."""
    monkeypatch.setenv("CHOREOGRAPH_BROKER", value)
    line = f"error: CHOREOGRAPH_BROKER {value!r}: empty; give a broker URL, or unset the variable\n"
    assert refused("publish", "order.placed", "--data", "{}", cwd=tmp_path) == line
    assert refused("dlq", "list", cwd=tmp_path) == line
    assert not list(tmp_path.iterdir())  # no bus was created
    assert cli("groups", "list", "--broker", "memory://", cwd=tmp_path).returncode == 0  # the option wins: not read


def test_a_folder_given_as_a_sqlite_file_is_named_as_a_folder(tmp_path: Path) -> None:
    """SQLite said "unable to open database file" (the writers) or "disk I/O error" (trace)."""
    folder = tmp_path / "var"
    folder.mkdir()
    url = f"sqlite:///{folder}"
    line = f"error: SQLite database {str(folder)!r}: a folder, not a database file\n"
    assert refused("run", "examples.chain:payment", "--broker", url) == line
    assert refused("run", "examples.chain:payment", "--broker", "memory://", "--store", url) == line
    assert refused("publish", "a.b", "--broker", url) == line
    assert refused("journal", "examples.chain:app", "--broker", "memory://", "--store", url) == line
    assert refused("trace", "tx", "--journal", url) == f"error: journal store {folder}: a folder, not a journal file\n"


@pytest.mark.parametrize(
    ("proc", "line"),
    [
        ('x="unterminated', "error: --proc 'x=\"unterminated': cannot split COMMAND as a shell would: No closing quotation\n"),
        ('x=""', "error: --proc 'x=\"\"': COMMAND names no program\n"),
    ],
    ids=["unclosed-quote", "empty-program"],
)
def test_a_proc_command_that_names_no_program_is_refused_before_anything_starts(
    tmp_path: Path, proc: str, line: str
) -> None:
    """shlex's ValueError, and uvloop's FileNotFoundError spawning "", were tracebacks."""
    assert dev_refused(tmp_path / "var", "--proc", proc) == line


def test_a_gc_threshold_beyond_what_python_takes_is_refused_before_the_bus_opens(tmp_path: Path) -> None:
    """gc.set_threshold's OverflowError, a traceback once the bus was open."""
    line = refused("run", "examples.chain:payment", "--broker", f"sqlite:///{tmp_path}/bus.db",
                   "--gc-threshold", "2147483648", cwd=tmp_path)
    assert "'--gc-threshold'" in line and "2147483647" in line, line
    assert not (tmp_path / "bus.db").exists()


def test_an_empty_metrics_host_is_refused_rather_than_served_on_every_interface(tmp_path: Path) -> None:
    """Bound as given, "" served the metrics on 0.0.0.0 and ::."""
    result = cli("run", "examples.chain:payment", "--broker", "memory://", "--store", "memory://",
                 "--metrics-port", "0", "--metrics-host", "", cwd=tmp_path, timeout=20)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --metrics-host '': empty; give an interface"), result.stderr
