"""Structured logs: JSON lines carrying the handled event's ids, from ctx.logger and the runtime."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import use_span

from choreograph import Context, Event, Publisher, RetryPolicy, Service, Worker
from choreograph.logs import ContextFilter, JsonFormatter
from choreograph.runtime.records import first_envelope, to_message
from choreograph.testing import MemoryTransport, VirtualClock, settled
from tests._procs import lines_until, stop

ROOT = Path(__file__).resolve().parents[1]

Records = Callable[[], list[dict[str, Any]]]


class Ordered(Event, type="test.logs.ordered"):
    order_id: str
    amount: int


@pytest.fixture
def records() -> Iterator[Records]:
    """Every record logged during the test, formatted by JsonFormatter and parsed back."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_handler_and_runtime_records_carry_the_event_ids_and_the_callers_extra(records: Records) -> None:
    bus = MemoryTransport(clock=VirtualClock())
    svc = Service("payment", retry=RetryPolicy(max_attempts=2, base=1.0, jitter=False))

    @svc.on(Ordered)
    async def charge(order: Ordered, ctx: Context) -> None:
        ctx.logger.info("charging", extra={"amount": order.amount})
        logging.getLogger("app.billing").info("a plain logging call")
        if ctx.attempt == 1:
            raise RuntimeError("card service down")

    async with Worker([svc], bus):
        [envelope] = await Publisher(bus).publish(Ordered(order_id="o-1", amount=30))
        await settled(bus)
    ids = {"service": "payment", "handler": charge.__qualname__, "event_id": envelope.id,
           "event_type": "test.logs.ordered", "correlation_id": envelope.correlationid}
    charging = [r for r in records() if r["message"] == "charging"]
    assert [r["attempt"] for r in charging] == [1, 2]
    for record in charging:
        assert record["amount"] == 30  # the call's extra= is kept (the stock LoggerAdapter drops it)
        assert record["logger"] == "choreograph.handler" and record["level"] == "INFO"
        assert {k: record[k] for k in ids} == ids
        assert record["time"].endswith("Z")
    plain = [r for r in records() if r["logger"] == "app.billing"]
    assert len(plain) == 2 and all({k: r[k] for k in ids} == ids for r in plain)  # from the context, not ctx.logger
    [retrying] = [r for r in records() if r["logger"] == "choreograph.worker" and "retrying" in r["message"]]
    assert retrying["level"] == "WARNING" and {k: retrying[k] for k in ids} == ids and retrying["attempt"] == 1


def test_a_record_logged_under_a_span_carries_its_trace_and_span_ids(records: Records) -> None:
    span = TracerProvider().get_tracer("test").start_span("work")
    with use_span(span, end_on_exit=True):
        logging.getLogger("app").warning("inside")
    logging.getLogger("app").warning("outside")
    inside, outside = records()
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}" and inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in outside and "correlation_id" not in outside


def test_values_json_cannot_hold_and_exceptions_are_written_not_lost(records: Records) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("app").exception("failed", extra={"when": object(), "path": Path("/x")})
    [record] = records()
    assert record["level"] == "ERROR" and record["path"] == "PosixPath('/x')"
    assert record["when"].startswith("<object object")
    assert "ValueError: boom" in record["exception"]


def test_choreograph_run_log_format_json_writes_json_lines(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "choreograph", "run", "examples.chain:app", "--broker", url, "--log-format", "json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        assert lines_until(proc.stderr, lambda line: "running " in line, seen=lines) is not None
        # amount missing: dead-lettered as invalid_payload, which the worker logs as an error
        published = subprocess.run(
            [sys.executable, "-m", "choreograph", "publish", "chain.order.placed", "--data", '{"order_id": "o-1"}',
             "--broker", url], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
        )
        assert published.returncode == 0, published.stderr
        line = lines_until(proc.stderr, lambda line: line.startswith("{") and "dead-lettering" in line, seen=lines)
        found = None if line is None else json.loads(line)
    finally:
        lines += stop(proc)[1].splitlines()
    assert found is not None
    assert found["level"] == "ERROR" and found["logger"] == "choreograph.worker"
    assert "invalid_payload" in found["message"]
    # Nothing but JSON lines on stderr, the status lines included (they were Rich text, wrapped).
    records = [json.loads(line) for line in lines if line.strip()]
    messages = [r["message"] for r in records if r["logger"] == "choreograph.cli"]
    assert messages[0].startswith("choreograph running payment+shipping+notify on ")
    assert messages[-1] == ("choreograph stopping payment+shipping+notify: draining in-flight work "
                            "(up to 10s; Ctrl-C again releases it now)")


def test_an_unknown_log_format_is_one_clear_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "choreograph", "run", "examples.chain:app", "--broker", "memory://", "--log-format",
         "xml"], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert "Invalid value for '--log-format'" in result.stderr
    assert "expected text or json, got 'xml'" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


async def test_an_extra_key_that_names_a_record_attribute_is_renamed_not_a_failed_handler(records: Records) -> None:
    bus = MemoryTransport(clock=VirtualClock())
    svc = Service("files")
    done: list[str] = []

    @svc.on(Ordered)
    async def store(order: Ordered, ctx: Context) -> None:
        ctx.logger.info("stored", extra={"filename": "/tmp/o-1.pdf", "attempt": 99, "size": 10})
        done.append(order.order_id)

    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(Ordered(order_id="o-1", amount=1))
        await settled(bus)
        stats = worker.stats("files")
    assert done == ["o-1"] and (stats.handled, stats.retried) == (1, 0)
    [stored] = [r for r in records() if r["message"] == "stored"]
    assert stored["extra_filename"] == "/tmp/o-1.pdf" and stored["size"] == 10
    assert "filename" not in stored  # a record attribute of its own, not written as a field
    assert stored["attempt"] == 1  # the handler's fields win


def test_values_orjson_cannot_write_keep_the_record(records: Records) -> None:
    logging.getLogger("app").warning("totals", extra={"cents": 2**64, "by": {("eu", 1): 3}, "n": 5})
    [record] = records()
    assert record["message"] == "totals" and record["n"] == 5
    assert record["cents"] == str(2**64) and record["by"] == "{('eu', 1): 3}"


def test_an_envelope_or_context_in_extra_is_written_as_an_object_of_its_fields(records: Records) -> None:
    envelope = first_envelope(Ordered(order_id="o-1", amount=30), source="/shop", id="e-1")
    ctx = Context(envelope, "payment", "charge", 2)
    logging.getLogger("app").info("got", extra={"envelope": envelope, "ctx": ctx})
    [record] = records()
    assert record["envelope"]["id"] == "e-1" and record["envelope"]["data"] == {"order_id": "o-1", "amount": 30}
    assert record["ctx"]["envelope"] == record["envelope"] and record["ctx"]["attempt"] == 2
    assert "_sealed" not in record["ctx"] and "_unit" not in record["ctx"]  # private, as for a dataclass


def test_a_value_orjson_cannot_write_beside_one_it_writes_by_repr_keeps_the_record(records: Records) -> None:
    """The second try (each value on its own) writes what the first wrote: reprs, objects, int keys."""
    envelope = first_envelope(Ordered(order_id="o-1", amount=30), source="/shop", id="e-1")
    logging.getLogger("app").info("got", extra={"cents": 2**64, "path": Path("/x"), "by": {1: 2}, "envelope": envelope})
    [record] = records()
    assert record["cents"] == str(2**64) and record["path"] == "PosixPath('/x')" and record["by"] == {"1": 2}
    assert record["envelope"]["id"] == "e-1"


@pytest.mark.parametrize("command", [["dev", "examples.drone_delivery.app:app"], ["run", "examples.chain:app"]])
def test_a_log_format_from_the_environment_is_refused_naming_the_variable(tmp_path: Path, command: list[str]) -> None:
    """Set through CHOREOGRAPH_LOG_FORMAT, a bad value names the variable, as every other option's does."""
    result = subprocess.run(
        [sys.executable, "-m", "choreograph", *command, "--data-dir" if command[0] == "dev" else "--broker",
         str(tmp_path) if command[0] == "dev" else "memory://"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CHOREOGRAPH_LOG_FORMAT": "xml"},
    )
    assert result.returncode == 2
    assert ("Invalid value for '--log-format' (env var: 'CHOREOGRAPH_LOG_FORMAT'): expected text or json, got 'xml'"
            in " ".join(result.stderr.split()))


async def test_a_broker_blocking_the_amqp_connection_is_logged_while_the_clients_are_quiet(records: Records) -> None:
    """A RabbitMQ resource alarm (disk, memory) blocks every publisher: only aiormq sees it
    (no public hook), so its two lines pass the CLI's quieting; its other lines do not."""
    import aiormq
    from pamqp import commands as spec

    from choreograph.logs import quiet_client_loggers, unquiet_client_loggers

    connection = aiormq.Connection("amqp://guest:guest@127.0.0.1:5672/")
    quiet_client_loggers()
    try:
        await connection._Connection__handle_connection_blocked(spec.Connection.Blocked(reason="low on disk"))  # type: ignore[attr-defined]
        await connection._Connection__handle_connection_unblocked(spec.Connection.Unblocked())  # type: ignore[attr-defined]
        logging.getLogger("aiormq.connection").error("error when creating transport: %r", OSError("refused"))
    finally:
        unquiet_client_loggers()
    lines = [(r["level"], r["logger"], r["message"]) for r in records()]
    assert [(level, logger) for level, logger, _ in lines] == [("WARNING", "aiormq.connection")] * 2
    assert "was blocked by: 'low on disk'" in lines[0][2] and "was unblocked" in lines[1][2]


async def test_dead_letters_decided_before_the_handler_runs_carry_the_event_ids(records: Records) -> None:
    """A loop stopped by the hops guard, or a payload its model refuses, is dead-lettered before any
    handler context exists: the runtime's line must still name the event and its transaction."""
    bus = MemoryTransport(clock=VirtualClock())
    svc = Service("payment")

    @svc.on(Ordered)
    async def charge(order: Ordered) -> None: ...

    looping = first_envelope(Ordered(order_id="o-1", amount=1), source="/test", id="e-loop", correlation_id="tx-loop")
    looping.hops = 99
    invalid = first_envelope(Ordered(order_id="o-2", amount=2), source="/test", id="e-bad", correlation_id="tx-bad")
    invalid.data = {"order_id": "o-2", "amount": "not a number"}
    async with Worker([svc], bus, max_hops=10):
        await bus.publish([to_message(looping), to_message(invalid)])
        await settled(bus)
    dead = {r["event_id"]: r for r in records() if r["message"].startswith("dead-lettering")}
    assert set(dead) == {"e-loop", "e-bad"}
    assert dead["e-loop"]["correlation_id"] == "tx-loop" and dead["e-bad"]["correlation_id"] == "tx-bad"
    for record in dead.values():
        assert record["service"] == "payment" and record["event_type"] == "test.logs.ordered"
    assert dead["e-bad"]["handler"] == charge.__qualname__
