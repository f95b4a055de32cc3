"""Waiting at start-up for a broker or database that cannot be reached yet: ``--connect-timeout``.

A worker started beside its broker (docker compose, a Kubernetes pod, a broker restarting)
often comes up first. Once running, it rides out an outage (fetches back off); at start-up
``run``, ``push`` and ``journal`` wait too, trying again 0.5 s, 1 s, 2 s, 4 s, then every 5 s
for up to ``--connect-timeout`` seconds, one warning line per failed try. Then the last
error is the command's one error line, as it was without waiting.

Only what can get better is tried again (:func:`unreachable`): nothing answered (refused,
reset, timed out, a host name that does not resolve yet) or the server said it is starting
(Redis loading its data, PostgreSQL starting up), or its Unix socket is not there yet. A bad
URL, refused credentials or a TLS certificate that does not verify fail at the first try. The gateway needs none of this: it
serves anyway, answering 503 until its broker answers (see ``/readyz``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable

import typer

from choreograph._redact import redact
from choreograph.cli._common import seconds
from choreograph.errors import StoreError, TransportError

log = logging.getLogger("choreograph.cli")

CONNECT_TIMEOUT_ENV = "CHOREOGRAPH_CONNECT_TIMEOUT"

#: Long enough for a broker container started at the same time to come up (NATS and Redis take
#: a second or two, RabbitMQ and PostgreSQL 5-20 s), short enough that a wrong host name or a
#: broker that is not coming is reported within a Kubernetes start-up probe's or a person's patience.
DEFAULT_CONNECT_TIMEOUT = 30.0

FIRST_DELAY = 0.5
MAX_DELAY = 5.0

ConnectTimeoutOption = typer.Option(
    DEFAULT_CONNECT_TIMEOUT, "--connect-timeout", envvar=CONNECT_TIMEOUT_ENV, callback=seconds(forever=True),
    help="Seconds to keep trying, at start-up, a broker or database that cannot be reached (0.5 s doubling "
    "to 5 s between tries; 0: one try; inf: until it answers). Bad URLs and refused logins fail at once",
)

#: Errors a server answers with while it starts: (module, class), looked up only if the client is imported.
_STARTING = (("redis.exceptions", "BusyLoadingError"), ("asyncpg.exceptions", "CannotConnectNowError"))


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (a :class:`TransportError` or :class:`StoreError`) says only that the server
    could not be reached yet: trying again later may succeed.

    The transports and stores chain the client's error, and the client the socket's: the
    innermost error decides. A socket's error there (refused, reset, timed out, no route, a
    name that does not resolve: in compose or Kubernetes a service's name may not resolve
    until it runs) is reachability, but not a TLS failure nor a file's error; so is a server
    saying it is still starting. Anything else (refused credentials, a protocol error, a bad
    vhost, a SQLite file that cannot be written) is not.
    """
    if not isinstance(exc, (TransportError, StoreError)):
        return False
    chain = _chain(exc)
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return False
    starting = tuple(cls for module, name in _STARTING
                     if isinstance(cls := getattr(sys.modules.get(module), name, None), type))
    return _not_answering(chain[-1]) or any(isinstance(e, starting) for e in chain)


#: What a socket says when nothing answered at the address (yet); not a file's errors (EACCES, ENOSPC).
_NOT_ANSWERING = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN,
})


def _not_answering(exc: BaseException) -> bool:
    if isinstance(exc, socket.gaierror):
        return True
    if not isinstance(exc, OSError) or type(exc).__module__ != "builtins":
        # a client's own error says what the server answered, whatever it derives from: aiormq's
        # are ConnectionErrors, a refused login (ProbableAuthenticationError) among them
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    # errno None: asyncio's one error for every address of a host that failed ("Multiple exceptions: ...")
    if exc.errno in _NOT_ANSWERING or (exc.errno is None and type(exc) is OSError):
        return True
    # a Unix socket not there yet (PostgreSQL's in a shared directory, a Cloud SQL proxy sidecar's):
    # connect(2) names no file, where a file's own error (open, mkdir) does
    return exc.errno == errno.ENOENT and exc.filename is None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first, as a traceback shows them (and never in a loop).

    Without the :class:`asyncio.CancelledError` that ends the chain of every timeout a client
    takes from ``asyncio.wait_for`` or ``asyncio.timeout`` (``TimeoutError`` is raised from it):
    that is how the timeout was made, not what went wrong."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and not isinstance(current, asyncio.CancelledError):
        chain.append(current)
        current = current.__cause__ if current.__cause__ is not None else (
            None if current.__suppress_context__ else current.__context__)
    return chain


class Patience:
    """The start-up deadline shared by what a command connects to, from ``--connect-timeout``.

        patience = Patience(connect_timeout)
        await patience.connect(transport.connect, f"the broker {redact(url)}")
        await patience.connect(inbox.open, f"the inbox {redact(store_url)}")
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = asyncio.get_running_loop().time() + timeout

    async def connect(self, connect: Callable[[], Awaitable[None]], what: str) -> None:
        """``connect()``, tried again while it fails with an :func:`unreachable` error and the
        deadline has not passed; the last error is raised. Cancel it to stop waiting.

        A try under way when the deadline passes is not cut short (its error is the one the
        user should see, not a timeout of ours): each client bounds its own (NATS 2 s, Redis
        5 s per connection attempt)."""
        loop = asyncio.get_running_loop()
        delay = FIRST_DELAY
        while True:
            try:
                await connect()
                return
            except (TransportError, StoreError) as exc:
                left = self.deadline - loop.time()
                if left <= 0 or not unreachable(exc):
                    raise
                wait = min(delay, left)
                until = "until it answers" if math.isinf(left) else f"giving up in {left:.1f}s"
                log.warning("%s", redact(f"cannot reach {what} ({exc}); trying again in {wait:.1f}s, {until} "
                                         f"(--connect-timeout {self.timeout:g})"))
            await asyncio.sleep(wait)
            delay = min(delay * 2, MAX_DELAY)


async def unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` is set first (SIGTERM or Ctrl-C while waiting for a broker):
    then ``work`` is cancelled and the answer is False."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # its error, if it failed
    return True
