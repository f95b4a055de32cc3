"""A password in a broker, store, journal or subscriber URL never reaches stderr; the rest of the URL does."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from tests._brokers import require_broker
from tests._procs import lines_until, stop
from tests.cli.test_core_cli import ROOT, cli

SECRET = "s3cretPW"


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["transactions", "--journal", f"postgresql://u:{SECRET}@127.0.0.1:1/db"], "postgresql://u:***@127.0.0.1:1/db"),
        (["trace", "c-1", "--journal", f"postgresql://u:{SECRET}@127.0.0.1:1/db"], "postgresql://u:***@127.0.0.1:1/db"),
        (["transactions", "--journal", f"mysql://u:{SECRET}@127.0.0.1:1/db"], "mysql://u:***@127.0.0.1:1/db"),
        (["run", "examples.chain:payment", "--broker", "memory://", "--store", f"postgresql://u:{SECRET}@127.0.0.1:1/db",
          "--connect-timeout", "0"], "postgresql://u:***@127.0.0.1:1/db"),
        (["run", "examples.chain:payment", "--broker", "memory://", "--store", f"mysql://u:{SECRET}@h/db"],
         "mysql://u:***@h/db"),
        (["run", "examples.chain:payment", "--broker", "memory://", "--connect-timeout", "0",
          "--store", f"postgresql://u:{SECRET}@127.0.0.1:1/db?schema=no-such"], "postgresql://u:***@127.0.0.1:1/db"),
        (["journal", "examples.chain:app", "--broker", "memory://", "--store", f"postgresql://u:{SECRET}@127.0.0.1:1/db",
          "--connect-timeout", "0"], "postgresql://u:***@127.0.0.1:1/db"),
        (["dlq", "list", "--broker", f"bogus://u:{SECRET}@h"], "bogus://u:***@h"),
        (["dlq", "list", "--broker", f"nats://u:{SECRET}@127.0.0.1:1"], "nats://u:***@127.0.0.1:1"),
        (["dlq", "list", "--broker", f"nats://u:{SECRET}@h?bad=1"], "nats://u:***@h?bad=1"),
        (["dlq", "list", "--broker", f"redis://:{SECRET}@127.0.0.1:1/0"], "127.0.0.1:1"),
        (["dlq", "list", "--broker", f"amqp://u:{SECRET}@127.0.0.1:1/"], "127.0.0.1:1"),
    ],
    ids=["transactions-unreachable", "trace-unreachable", "journal-unknown-scheme", "run-store-unreachable",
         "run-store-unknown-scheme", "run-store-bad-schema", "journal-store-unreachable", "broker-unknown-scheme",
         "nats-unreachable", "nats-bad-parameter", "redis-unreachable", "amqp-unreachable"],
)
def test_an_error_names_the_url_without_its_password(args: list[str], shown: str) -> None:
    result = cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert shown in result.stderr


def _running(args: list[str], ready: str) -> tuple[str, str]:
    """Start the command, wait for its status line, stop it; everything it wrote."""
    proc = subprocess.Popen([sys.executable, "-m", "choreograph", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[str] = []
    try:
        line = lines_until(proc.stderr, lambda text: ready in text or "error" in text, seen=seen)  # type: ignore[arg-type]
    finally:
        out, err = stop(proc)
    assert line is not None and ready in line, "".join(seen) + err
    return out, "".join(seen) + err


def test_the_running_status_line_of_run_names_the_broker_without_its_password() -> None:
    base = require_broker("nats").removeprefix("nats://")
    url = f"nats://u:{SECRET}@{base}?prefix=redact{uuid.uuid4().hex[:8]}"
    out, err = _running(["run", "examples.chain:payment", "--broker", url, "--store", "memory://"], "running")
    assert SECRET not in out + err
    assert f"nats://u:***@{base}" in err


async def test_the_journal_status_line_names_its_store_without_the_password() -> None:
    from tests.stores._databases import drop_schema, fresh_schema, postgres_url

    schema = fresh_schema()
    url = postgres_url(schema)
    with_password = url.replace("://postgres@", f"://postgres:{SECRET}@")  # trust auth: the password is ignored
    assert SECRET in with_password
    try:
        out, err = _running(["journal", "examples.chain:app", "--broker", "memory://", "--store", with_password],
                            "recording to")
    finally:
        await drop_schema(url, schema)
    assert SECRET not in out + err
    assert "postgresql://postgres:***@" in err


def test_the_push_status_line_names_the_subscriber_without_its_password() -> None:
    hook = f"http://hook:{SECRET}@127.0.0.1:1/in"
    out, err = _running(["push", "--broker", "memory://", "--group", "g", "--type", "t", "--url", hook,
                         "--no-handshake"], "running")
    assert SECRET not in out + err
    assert "http://hook:***@127.0.0.1:1/in" in err


async def test_watch_names_its_journal_without_the_password() -> None:
    """Its header and its --json "journal" showed the URL as given, password and all."""
    from choreograph.journal import Journal
    from tests.stores._databases import drop_schema, fresh_schema, postgres_url

    schema = fresh_schema()
    url = postgres_url(schema)
    with_password = url.replace("://postgres@", f"://postgres:{SECRET}@")  # trust auth: the password is ignored
    assert SECRET in with_password
    journal = Journal(url)
    try:
        await journal.open()  # a journal to watch (watch only reads)
        await journal.close()
        shown = [cli("watch", "--once", "--journal", with_password, *json) for json in ([], ["--json"])]
    finally:
        await drop_schema(url, schema)
    for done in shown:
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr
        assert "postgresql://postgres:***@" in done.stdout
