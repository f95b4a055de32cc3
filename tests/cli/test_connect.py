"""``--connect-timeout``: run, push and journal wait at start-up for a broker (or database) not up yet.

The brokers are private servers on free loopback ports, started by the test after the command
(never the shared ones); a "dead port" is a free port nothing listens on.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from choreograph._redact import redact
from choreograph.cli._connect import CONNECT_TIMEOUT_ENV, unreachable
from choreograph.errors import ConfigurationError, StoreError, TransportError
from choreograph.transports import open_transport
from tests._brokers import require_broker
from tests._nats_server import NatsServer, free_port, require_binary
from tests._private_brokers import missing
from tests._procs import lines_until, stop
from tests.cli.test_core_cli import ROOT, cli
from tests.conformance.brokers.redis import _PrivateServer


def caused_by(cause: BaseException, error: type[Exception] = TransportError) -> Exception:
    """``error``, raised from ``cause`` as the transports and stores raise it."""
    try:
        raise error("connect failed") from cause
    except Exception as exc:
        return exc


def _redis_errors() -> tuple[Exception, Exception]:
    import redis.exceptions

    return redis.exceptions.BusyLoadingError("LOADING"), redis.exceptions.AuthenticationError("WRONGPASS")


def _nats_login_refused() -> Exception:
    import nats.errors

    return nats.errors.AuthorizationError()


def _amqp_login_refused() -> Exception:
    import aiormq.exceptions

    return aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")  # a ConnectionError


def _postgres_starting() -> Exception:
    import asyncpg

    return asyncpg.CannotConnectNowError("the database system is starting up")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: caused_by(ConnectionRefusedError(111, "Connection refused")), True),
        (lambda: caused_by(TimeoutError()), True),
        (lambda: caused_by(socket.gaierror(-2, "Name or service not known")), True),  # a service name not yet
        (lambda: caused_by(OSError("Multiple exceptions: [Errno 111] ..., [Errno 99] ...")), True),  # each address
        (lambda: caused_by(OSError(errno.EHOSTUNREACH, "No route to host")), True),
        (lambda: caused_by(ConnectionRefusedError(111, "Connection refused"), StoreError), True),
        (lambda: caused_by(_redis_errors()[0]), True),  # Redis loading its data
        (lambda: caused_by(_postgres_starting(), StoreError), True),
        (lambda: caused_by(_redis_errors()[1]), False),
        (lambda: caused_by(_nats_login_refused()), False),
        (lambda: caused_by(_amqp_login_refused()), False),
        (lambda: caused_by(ssl.SSLCertVerificationError(1, "certificate verify failed")), False),
        (lambda: caused_by(PermissionError(errno.EACCES, "Permission denied")), False),  # a file, not a server
        (lambda: TransportError("amqp: connect: the broker refused the login of user 'guest'"), False),
        (lambda: ConfigurationError("broker URL 'kafka://x': unknown scheme 'kafka'"), False),
        (lambda: caused_by(ConnectionRefusedError(), ConfigurationError), False),
    ],
    ids=["refused", "timed-out", "name-not-resolved", "every-address-failed", "no-route", "store-refused",
         "redis-loading", "postgres-starting", "redis-login-refused", "nats-login-refused", "amqp-login-refused", "tls-certificate",
         "permission-denied", "no-cause", "bad-url", "configuration"],
)
def test_only_a_server_not_reached_or_still_starting_is_worth_trying_again(
    error: Callable[[], Exception], expected: bool
) -> None:
    assert unreachable(error()) is expected


def _timed_out(wrap: Callable[[TimeoutError], Exception] | None = None) -> Exception:
    """A real ``asyncio.wait_for`` timeout (raised from its CancelledError), as a client meets it
    connecting to a host that does not answer yet; ``wrap`` translates it as the client does."""

    async def connect() -> None:
        try:
            await asyncio.wait_for(asyncio.sleep(1), 0.001)
        except TimeoutError as exc:
            if wrap is None:
                raise
            raise wrap(exc)  # noqa: B904 - the implicit context, as redis-py raises it

    try:
        try:
            asyncio.run(connect())
        except Exception as exc:
            raise TransportError("connect failed") from exc
    except TransportError as exc:
        return exc
    raise AssertionError("no timeout")


def _redis_timed_out(exc: TimeoutError) -> Exception:
    import redis.exceptions

    return redis.exceptions.TimeoutError("Timeout connecting to server")


@pytest.mark.parametrize("wrap", [None, _redis_timed_out], ids=["asyncio", "redis"])
def test_a_connect_that_timed_out_in_asyncio_is_worth_trying_again(
    wrap: Callable[[TimeoutError], Exception] | None,
) -> None:
    assert unreachable(_timed_out(wrap)) is True


async def _error_of(open_: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]],
                    success: str) -> BaseException:
    """The TransportError or StoreError ``open_()`` raises (``close()`` after it either way);
    ``success`` is the assertion message should it open after all."""
    try:
        await open_()
    except (TransportError, StoreError) as exc:
        return exc
    finally:
        await close()
    raise AssertionError(success)


@pytest.mark.slow
def test_a_nats_server_that_does_not_answer_yet_is_tried_again() -> None:
    with socket.socket() as silent:  # accepts the connection, never says INFO (a server busy starting)
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        transport = open_transport(f"nats://127.0.0.1:{silent.getsockname()[1]}")
        error = asyncio.run(_error_of(transport.connect, transport.close, "connected to a silent server"))
    assert "TimeoutError" in str(error) and unreachable(error) is True


def test_a_unix_socket_not_there_yet_is_worth_trying_again_a_missing_file_is_not(tmp_path: Path) -> None:
    """PostgreSQL in a shared socket directory, or a Cloud SQL proxy sidecar, creates its socket
    when it listens: until then connecting is ENOENT naming no file, where a file's own is named."""
    from choreograph.stores import open_store

    store = open_store(f"postgresql://app@/orders?host={tmp_path}")
    error = asyncio.run(_error_of(store.open, store.close, "opened a store on a socket that does not exist"))
    assert unreachable(error) is True
    try:
        (tmp_path / "missing" / "inbox.db").open()
    except FileNotFoundError as exc:
        assert unreachable(caused_by(exc, StoreError)) is False


def test_an_amqp_server_that_does_not_answer_yet_is_tried_again_not_waited_for_for_ever() -> None:
    """aio-pika sets no limit on a connect: one to a server that accepts but never sends
    Connection.Start held ``run --connect-timeout`` (and a signal's cancel) for ever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        transport = open_transport(f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/")
        transport.connect_timeout = 0.5  # type: ignore[attr-defined]  # AmqpTransport's
        errors: list[BaseException] = []

        async def connect() -> None:
            try:
                await transport.connect()
            except TransportError as exc:
                errors.append(exc)
            finally:
                await transport.close()

        # in a thread of its own: without a limit the connect never returns, nor does its loop close
        threading.Thread(target=asyncio.run, args=(connect(),), daemon=True).start()
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.05)
    assert errors, "connect() still waiting after 10 s"
    assert unreachable(errors[0]) is True


class Unstarted:
    """A private ``kind`` server on a free port, not started until :meth:`start`."""

    def __init__(self, kind: str) -> None:
        if how := missing(kind):
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(how)
            pytest.skip(how)
        self.redis: _PrivateServer | None = None
        self.nats: NatsServer | None = None
        if kind == "redis":
            self.redis = _PrivateServer()
            self.url = f"{self.redis.url}?prefix=connect-test"
        else:
            self.nats = NatsServer(require_binary(), free_port(), tempfile.mkdtemp(prefix="choreograph-nats-"))
            self.url = f"{self.nats.url}?prefix=connect-test"

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
        elif self.nats is not None:
            self.nats.start()

    def destroy(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        elif self.nats is not None:
            self.nats.destroy()


@pytest.fixture(params=["nats", "redis"])
def unstarted(request: pytest.FixtureRequest) -> Iterator[Unstarted]:
    server = Unstarted(request.param)
    yield server
    server.destroy()


def started(*args: str) -> subprocess.Popen[str]:
    """``choreograph ARGS`` running, its stderr and stdout as one text stream."""
    return subprocess.Popen([sys.executable, "-m", "choreograph", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_run_started_before_its_broker_waits_for_it_then_handles_what_is_published(unstarted: Unstarted) -> None:
    proc = started("run", "examples.chain:notify", "--broker", unstarted.url, "--store", "memory://",
                   "--connect-timeout", "60")
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        waiting = lines_until(proc.stdout, lambda line: "cannot reach the broker" in line, seen=seen)
        assert waiting is not None, "".join(seen)
        assert f"cannot reach the broker {unstarted.url.split('?')[0]}" in waiting and "trying again in" in waiting
        time.sleep(2)
        unstarted.start()
        assert lines_until(proc.stdout, lambda line: "running notify" in line, seen=seen), "".join(seen)
        published = cli("publish", "chain.order.shipped", "--data", '{"order_id": "o-late"}', "--broker", unstarted.url)
        assert published.returncode == 0, published.stderr
        assert lines_until(proc.stdout, lambda line: "order o-late shipped" in line, seen=seen), "".join(seen)
    finally:
        out, _ = stop(proc)
    assert proc.returncode == 0 and "Traceback" not in "".join(seen) + out, "".join(seen) + out


RUN = ("run", "examples.chain:payment", "--store", "memory://")
PUSH = ("push", "--store", "memory://", "--group", "g", "--type", "t", "--url", "http://127.0.0.1:1/", "--no-handshake")
JOURNAL = ("journal", "examples.chain:app", "--store", "memory://")


@pytest.mark.parametrize(
    ("command", "broker", "what", "error", "timeout"),
    [
        # redis-py's own try takes about a second (it retries a refused connection 4 times)
        (RUN, "redis://127.0.0.1:{port}/0", "the broker redis://127.0.0.1:{port}/0", "error: redis connect failed: ",
         3),
        (RUN, "nats://u:s3cretPW@127.0.0.1:{port}", "the broker nats://u:***@127.0.0.1:{port}",
         "error: nats: connect to nats://u:***@127.0.0.1:{port} failed: [Errno 111]", 1),
        (PUSH, "nats://127.0.0.1:{port}", "the broker nats://127.0.0.1:{port}",
         "error: nats: connect to nats://127.0.0.1:{port} failed: [Errno 111]", 1),
        (JOURNAL, "nats://127.0.0.1:{port}", "the broker nats://127.0.0.1:{port}",
         "error: nats: connect to nats://127.0.0.1:{port} failed: [Errno 111]", 1),
        (("run", "examples.chain:payment", "--store", "postgresql://u:s3cretPW@127.0.0.1:{port}/db"), "memory://",
         "the inbox store postgresql://u:***@127.0.0.1:{port}/db",
         "error: connecting to postgresql://u:***@127.0.0.1:{port}/db: ConnectionRefusedError", 1),
    ],
    ids=["run-redis", "run-nats", "push", "journal", "run-postgres-inbox"],
)
def test_after_the_connect_timeout_it_exits_with_the_one_error_line_having_said_when_it_tries_again(
    command: tuple[str, ...], broker: str, what: str, error: str, timeout: int
) -> None:
    port = free_port()
    began = time.monotonic()
    result = cli(*(arg.format(port=port) for arg in command), "--broker", broker.format(port=port),
                 "--connect-timeout", str(timeout))
    elapsed = time.monotonic() - began
    assert result.returncode == 2, result.stderr
    *warnings, last = result.stderr.splitlines()
    assert last.startswith(error.format(port=port)), result.stderr
    assert warnings and all(f"cannot reach {what.format(port=port)} (" in line and "; trying again in " in line
                            and f"(--connect-timeout {timeout})" in line for line in warnings), result.stderr
    assert "s3cretPW" not in result.stderr and "Traceback" not in result.stderr
    assert timeout <= elapsed < timeout + 20, elapsed


@pytest.mark.parametrize(
    ("broker", "error"),
    [
        ("kafka://127.0.0.1:9092", "error: broker URL 'kafka://127.0.0.1:9092': unknown scheme 'kafka'"),
        ("redis://127.0.0.1:{port}/0?bogus=1", "error: broker URL"),
    ],
    ids=["unknown-scheme", "unknown-parameter"],
)
def test_a_bad_broker_url_is_refused_at_once_whatever_the_connect_timeout(broker: str, error: str) -> None:
    began = time.monotonic()
    result = cli("run", "examples.chain:payment", "--broker", broker.format(port=free_port()),
                 "--connect-timeout", "60")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(error) and "cannot reach" not in result.stderr, result.stderr
    assert time.monotonic() - began < 20  # not the minute it was given


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not on PATH")
def test_a_refused_login_is_not_tried_again(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "right"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _listens(port):
            assert time.monotonic() < deadline, "the private redis-server did not start"
            time.sleep(0.05)
        began = time.monotonic()
        result = cli("run", "examples.chain:payment", "--store", "memory://",
                     "--broker", f"redis://:wrong@127.0.0.1:{port}/0", "--connect-timeout", "60")
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: redis connect failed: ") and "cannot reach" not in result.stderr
    assert time.monotonic() - began < 20


def test_tls_spoken_to_a_plain_redis_port_fails_at_once_naming_the_url_and_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain Redis holds a TLS handshake unanswered, which read as a slow server: with the
    default --connect-timeout the command tried twice and gave up after about 55 s with "Timeout
    connecting to server". The port answers plain-text Redis, so it is refused at the first try."""
    monkeypatch.delenv(CONNECT_TIMEOUT_ENV, raising=False)  # the default patience, 30 s
    plain = require_broker("redis")
    url = "rediss" + plain[plain.index("://"):]
    began = time.monotonic()
    result = cli("run", "examples.chain:payment", "--store", "memory://", "--broker", url)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: redis connect failed: {redact(url)} did not complete a TLS handshake, "
                                    "but the port answers plain-text Redis: it is not a TLS port; use redis://")
    assert "cannot reach" not in result.stderr
    assert time.monotonic() - began < 15  # the interpreter's start-up, then about a second


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_while_waiting_for_the_broker_stops_at_once_and_cleanly(sig: signal.Signals) -> None:
    proc = started("run", "examples.chain:payment", "--store", "memory://",
                   "--broker", f"nats://127.0.0.1:{free_port()}")  # the default: 30 s of patience
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        assert lines_until(proc.stdout, lambda line: "cannot reach the broker" in line, seen=seen), "".join(seen)
        proc.send_signal(sig)
        began = time.monotonic()
        out, _ = proc.communicate(timeout=10)
        assert time.monotonic() - began < 5
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 0, "".join(seen) + out
    assert "stopping payment: stopped while waiting to connect" in out and "Traceback" not in out, "".join(seen) + out
