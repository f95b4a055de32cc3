"""Redis Streams transport: ``redis://host:6379/0?lease=30&prefix=choreograph&maxlen=0``.

Other query parameters go to redis-py (``client_name``, ``socket_keepalive``, ``ssl_ca_certs``
on ``rediss://``, ...); one it would not take is a :class:`ConfigurationError` at once.

Design, and why:

* **One stream per group.** ``publish`` routes each message to the stream of every group
  bound to its type (``P:s:<group>``, ``P`` = ``prefix``). The alternative, one stream
  per type read by consumer groups, shares storage across groups but needs a wildcard
  group to discover new type streams and to exist on each before its first message, and
  ties every group's retention to the slowest one. Per-group streams make fan-out plain,
  let each group delete what it acked, and give ``maxlen`` a per-group meaning. The price
  is one copy of a message per matching group.
* **Routing is server-side and atomic.** The group registry (``P:groups``, group -> types)
  is read by the publish Lua script itself, so a group registered before a publish
  receives it, with no client cache to go stale. A batch is one script: one round trip,
  all or nothing. Registering widens a group's types in one script (never narrows);
  ``unbind`` narrows them in another, leaving the group's stream as it is.
* **Attempts live in Redis.** An entry carries the attempt of its first delivery; the
  pending list's delivery count adds lease expiries (``XAUTOCLAIM`` increments it,
  ``touch`` = ``XCLAIM ... JUSTID`` does not). Retry (``defer``: the entry carries the
  attempt it had, not the next) and dead-letter move the entry and
  ``XACK`` + ``XDEL`` it in one script that first checks this consumer still holds it, so
  a verb that arrives after the lease expired is a no-op. ``ack`` skips the check
  (``XACK`` + ``XDEL`` in one script, one round trip for ``ack_many``): a late ack
  ends a message whose handler did succeed, which at-least-once allows.
* **The lease is each process's own.** Nothing of it is kept in Redis: a fetch claims
  (``XAUTOCLAIM``) the group's entries pending longer than *its* transport's lease, and a
  changed ``?lease=`` applies as each process restarts with it. While replicas run with
  different leases (a rolling change), one on a short lease claims the entries of one on a
  lease more than three times longer that it has not touched for the short lease (it
  touches every third of its own): its handler runs twice. Lengthen the lease freely,
  shorten it much once the old replicas are gone.
* **Closing hands over at once.** ``Subscription.close`` re-claims its unsettled entries
  with a huge idle time (``XCLAIM ... IDLE``), so the next consumer's ``XAUTOCLAIM`` takes
  them (attempt + 1) without waiting out the lease; ``Transport.close`` forgets its
  consumer name when it holds nothing, and ``subscribe`` forgets idle names that hold
  nothing (left by crashed processes), so the consumer list stays bounded. Entries a read
  was handed but never got to (a fetch cancelled while its ``XREADGROUP`` was served) were
  no one's to claim until the lease expired: the subscription's next fetch hands them out
  first, and its ``close`` puts them back on the stream, as the attempt they were read for
  (no handler saw them; ``ADOPT`` in ``_redis_lua``).
* **No daemon.** Consumers do the housekeeping in ``fetch``: one script moves due retries
  (``P:d:<group>``, a sorted set scored by server time) back into the stream, reclaims
  lease-expired entries and reads fresh ones. It runs when due - every
  ``SWEEP_EVERY`` (100 ms) while messages flow, after a read that waited in vain, when a
  known retry falls due; every other ``fetch`` is one blocking ``XREADGROUP``, which
  returns at once when entries are there (one round trip per fetch, as a hand-written
  consumer makes). A read blocks for at most :data:`POLL` seconds at a time, so retries
  become due, leases are noticed and task cancellation / ``close()`` stay prompt (a long
  blocking read in redis-py can hold up cancellation).
* **Memory is bounded by the backlog.** Settling deletes the entry (``XDEL``), so a
  stream holds only unsettled messages; nothing is ever trimmed unread. ``maxlen=N``
  makes ``publish`` fail with :class:`TransportError` rather than grow a group's backlog
  (stream + delayed) past ``N``: back-pressure, never silent loss (``XADD MAXLEN`` would
  drop unacked events). Dead letters (``P:dl:<group>``) stay until purged.
* **Durability** is Redis's: ``publish`` returns on the server's reply; run Redis with
  ``appendonly yes`` to keep the bus across a restart. Connection errors are retried with
  backoff; ``fetch`` keeps waiting through an outage (until its timeout) and resumes.

All keys of a bus share the prefix: standalone Redis (or one cluster slot) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import socket
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url, to_bool
from redis.asyncio.connection import Connection as RedisConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from choreograph._redact import redact
from choreograph.errors import ConfigurationError, TransportClosed, TransportError
from choreograph.transports import _redis_lua as lua
from choreograph.transports import did_you_mean, lease_from_url, refuse_repeated, refuse_unreadable
from choreograph.transports._redis_consumer import POLL, RedisDelivery, RedisSubscription, _disconnect, _str
from choreograph.transports._redis_tls import first_ping_over_tls
from choreograph.transports.base import DeadLetter, Message, Subscription, Transport, narrowed, no_such_group

_hiredis_pack: Callable[..., bytes] | None
try:
    import hiredis

    _hiredis_pack = getattr(hiredis, "pack_command", None)
except ImportError:  # no hiredis (or one older than 2.1): redis-py packs commands itself
    _hiredis_pack = None

__all__ = ["RedisDelivery", "RedisSubscription", "RedisTransport"]

_OUR_PARAMS = ("lease", "prefix", "maxlen", "protocol")  # protocol: pinned to RESP2
_CHUNK = 100
_SWITCH_WORDS = ("TRUE", "FALSE", "1", "0", "YES", "NO", "ON", "OFF", "T", "F", "Y", "N")
"""What a redis-py switch in a URL may say (case-insensitive); redis-py reads its own false words
(``0 F FALSE N NO OFF``) as false and anything else as true."""
_LEAST: dict[str, tuple[float, bool]] = {
    "socket_timeout": (0, True), "socket_connect_timeout": (0, True), "socket_read_size": (0, True),
    "health_check_interval": (0, False), "max_connections": (0, False), "db": (0, False),
}
"""redis-py's numeric URL parameters it takes without a range check: (bound, whether exclusive)."""
_MAX_LEASE = 2**63 // 1000 - 1
"""The longest ``?lease=`` (seconds): Redis keeps idle times in an int64 of milliseconds."""
_MIN_LEASE = 0.001
"""The shortest ``?lease=`` (seconds): Redis keeps idle times in milliseconds."""


class RedisTransport(Transport):
    """Redis Streams. ``async with RedisTransport("redis://localhost:6379/0?prefix=shop") as bus: ...``"""

    def __init__(self, url: str) -> None:
        self.url = url
        refuse_unreadable(url)
        refuse_repeated(url)
        self.lease = lease_from_url(url)
        if self.lease > _MAX_LEASE:  # the first fetch failed: "Invalid min-idle-time argument for XAUTOCLAIM"
            raise ConfigurationError(
                f"broker URL: lease={self.lease!r} is over {_MAX_LEASE} s, the longest idle time Redis counts"
                " (2^63 - 1 ms)"
            )
        if self.lease < _MIN_LEASE:
            # Redis counts a pending entry's idle time in whole milliseconds (XAUTOCLAIM's
            # min-idle-time): a lease under 0.5 ms was rounded to 0, and every fetch claimed
            # every delivery still being handled, so each ran again at once.
            raise ConfigurationError(
                f"broker URL: lease={self.lease!r} is under 1 ms, the resolution Redis counts idle time in"
            )
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = dict((k, v) for k, v in query if k in _OUR_PARAMS)
        self.prefix = ours.get("prefix", "choreograph")
        if not self.prefix:  # it fell back to the default: another bus's keys, if one is meant to be apart
            raise ConfigurationError("broker URL: prefix is empty (leave it out for the default, choreograph)")
        try:
            self.maxlen = int(ours.get("maxlen", "0"))  # an empty one meant unbounded
        except ValueError:
            raise ConfigurationError(f"broker URL: maxlen={ours['maxlen']!r} is not an integer") from None
        if self.maxlen < 0:
            raise ConfigurationError("broker URL: maxlen must be >= 0 (0: unbounded)")
        for k, v in query:
            if k == "protocol" and v != "2":  # it was dropped: RESP2 whatever the URL asked for
                raise ConfigurationError(f"broker URL: protocol={v!r}: the transport speaks RESP2 only (protocol=2)")
        rest = [(k, v) for k, v in query if k not in _OUR_PARAMS]
        self._client_url = _without_our_params(parts, rest)
        _check_redis_py_params(self._client_url, rest)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._line: Any = None  # the connection scripts run on when it is free (see _script)
        self._line_busy = False
        self._subscriptions: set[RedisSubscription] = set()
        self._adopting: dict[str, asyncio.Event] = {}  # group -> set when its _adopt has its reply
        self._groups: set[str] = set()
        self._closed = False
        self._inflight = 0
        self._drained = asyncio.Event()

    def _keys(self, group: str) -> tuple[str, str, str]:
        """(stream, delayed set, dead-letter stream) of ``group``."""
        return f"{self.prefix}:s:{group}", f"{self.prefix}:d:{group}", f"{self.prefix}:dl:{group}"

    def _letter_index(self, group: str) -> str:
        """The hash of ``group``'s dead letters by message id (one letter per id)."""
        return f"{self.prefix}:dlx:{group}"

    @property
    def _registry(self) -> str:
        return f"{self.prefix}:groups"

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise TransportError("redis transport is not connected: use `async with` or call connect()")
        return self._client

    @contextlib.contextmanager
    def _using(self, *, closing: bool = False) -> Iterator[None]:
        """Count an operation in flight, so ``close`` lets it finish before closing the pool
        (a connection redis-py reopens for a retry after the pool closed would leak).

        ``closing``: the operation may still run once ``close`` began, while the client is
        open - a fetch under way handing on what its read brought (``close`` waits for it)."""
        if self._closed and not (closing and self._client is not None):
            raise TransportClosed("redis transport is closed")
        self._inflight += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._drained.set()

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[str | bytes | int]) -> Any:
        """Run script ``name``: on the transport's own connection when it is free, else (or
        when that cannot: see :meth:`_on_line`) through the client, as redis-py runs it."""
        line = self._line
        if line is not None and not self._line_busy:
            self._line_busy = True
            try:
                return await self._on_line(line, name, keys, args)
            except _OffLine:
                pass
            finally:
                self._line_busy = False
        return await self._scripts[name](keys=keys, args=args, client=self._redis)

    async def _on_line(self, conn: Any, name: str, keys: Sequence[str], args: Sequence[str | bytes | int]) -> Any:
        """``EVALSHA`` on ``conn``, written and read directly: the client's pool checkout and
        release, retry wrapper and metrics hooks ran before every publish and ack reached the
        socket, on the path of every event at a light load.

        What the client's way does better is left to it (:class:`_OffLine`): a script the
        server does not hold (``NOSCRIPT``: the client loads it) and a connection error (the
        client retries with backoff; this connection is closed, and reconnects on its next
        use). A script's own error is raised as the client would; a call that ends otherwise
        (cancelled) closes the connection, whose reply may be half read."""
        try:
            await conn.send_command("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)
            return await conn.read_response()
        except NoScriptError:
            raise _OffLine from None
        except ResponseError:
            raise
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await _disconnect(conn, nowait=True)
            raise _OffLine from None
        except BaseException:
            await _disconnect(conn, nowait=True)
            raise

    @contextlib.contextmanager
    def _errors(self, what: str, *, closing: bool = False) -> Iterator[None]:
        """Translate redis-py errors into choreograph's at the boundary."""
        try:
            with self._using(closing=closing):
                yield
        except RedisError as exc:
            if self._closed:
                raise TransportClosed("redis transport is closed") from exc
            raise TransportError(f"redis {what} failed: {exc}") from exc

    async def connect(self) -> None:
        if self._closed:
            raise TransportClosed("redis transport is closed")
        if self._client is not None:
            return
        client = aioredis.Redis.from_url(
            self._client_url,
            socket_timeout=max(10.0, 2 * POLL),
            socket_connect_timeout=5.0,
            protocol=2,
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=4),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        _fast_connections(client)
        # Fetches read the raw XREADGROUP reply: redis-py's parser would build a field dict
        # per entry that the deliveries do not need.
        client.set_response_callback("XREADGROUP", _raw_reply)
        self._scripts = {
            name: client.register_script(getattr(lua, name.upper()))
            for name in ("register", "unbind", "publish", "sweep", "ack", "settle", "hold", "adopt", "forget", "dead", "index", "letter")
        }
        parts = urlsplit(self._client_url)
        with self._errors("connect"):
            try:
                if parts.scheme == "rediss":  # a plain Redis port would hold the handshake: told apart
                    await first_ping_over_tls(client.ping(), parts.hostname or "localhost", parts.port or 6379,
                                              redact(self.url))
                else:
                    await client.ping()
            except BaseException:
                await client.aclose()
                raise
        if self._closed:  # close() ran meanwhile and found no client: nobody else would close this one
            await client.aclose()
            raise TransportClosed("redis transport is closed")
        if self._client is not None:  # another connect finished meanwhile: its client is the one kept
            await client.aclose()
            return
        self._client = client
        self._line = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]  # connects on first use

    async def close(self) -> None:
        if self._closed:
            return
        for sub in list(self._subscriptions):
            await sub.close()
        client = self._client
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                for group in self._groups:
                    await self._scripts["forget"](
                        keys=[self._keys(group)[0]], args=[group, self.consumer], client=client
                    )
        self._closed = True
        if self._inflight:  # fetches notice within one POLL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=POLL + 5.0)
        self._client = None
        line, self._line = self._line, None
        if line is not None:
            await _disconnect(line)
        if client is not None:
            await client.aclose()

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            with self._using():  # still refuse a closed transport
                return
        args: list[str | bytes | int] = [self.prefix, self.maxlen]
        for message in messages:
            args += [message.id, message.type, message.body]
        with self._errors("publish"):
            try:
                await self._script("publish", [self._registry], args)
            except ResponseError as exc:
                if "BACKLOG" in str(exc):
                    raise TransportError(f"redis publish refused: {exc} (the URL's maxlen)") from None
                raise

    async def subscribe(self, group: str, types: Collection[str] | None) -> Subscription:
        if not group:
            raise ConfigurationError("subscribe: group must be a non-empty string")
        types_json = orjson.dumps(None if types is None else sorted(set(types)))
        await self._register(group, types_json)
        sub = RedisSubscription(self, group, types_json)
        self._subscriptions.add(sub)
        self._groups.add(group)
        return sub

    async def _register(self, group: str, types_json: bytes) -> None:
        with self._errors("subscribe"):
            await self._script(
                "register",
                [self._registry, self._keys(group)[0]],
                [group, types_json, round(self.lease * 1000)],
            )

    async def unbind(self, group: str, types: Collection[str]) -> frozenset[str] | None:
        with self._errors("unbind"):
            after = await self._script("unbind", [self._registry], [group, orjson.dumps(sorted(set(types)))])
        if after is None:
            raise no_such_group(group)
        bound = orjson.loads(after)
        return narrowed(group, None if bound is None else frozenset(map(str, bound)), ())

    async def ping(self) -> None:
        with self._errors("ping"):
            await self._redis.ping()

    async def groups(self) -> dict[str, frozenset[str] | None]:
        with self._errors("groups"):
            registry: Any = await self._redis.hgetall(self._registry)
        out: dict[str, frozenset[str] | None] = {}
        for name, types in registry.items():
            bound = orjson.loads(types)
            out[_str(name)] = None if bound is None else frozenset(map(str, bound))
        return out

    # -- dead letters ------------------------------------------------------------------

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:  # XRANGE refuses a count of 0 ("must be a positive integer")
            return []
        with self._errors("dead_letters"):
            names: Any = [group] if group is not None else await self._redis.hkeys(self._registry)
            groups = sorted(_str(name) for name in names)
            for name in groups:
                await self._script("index", [self._keys(name)[2], self._letter_index(name)], [])
            pipe = self._redis.pipeline(transaction=False)
            for name in groups:
                pipe.xrange(self._keys(name)[2], count=limit)
            replies: list[Any] = await pipe.execute()
        letters = [
            _dead_letter(name, fields)
            for name, entries in zip(groups, replies, strict=True)
            for _, fields in entries
        ]
        letters.sort(key=lambda letter: letter.dead_at)
        return letters[:limit]

    async def dead_letter(self, group: str, message_id: str) -> DeadLetter | None:
        # By the index (one letter per id), not a walk of the dead-letter stream: ``dlq show``
        # of one letter in a large queue took a round trip per hundred letters before it.
        with self._errors("dead_letter"):
            flat: Any = await self._script("letter", [self._keys(group)[2], self._letter_index(group)], [message_id])
        if not flat:
            return None
        return _dead_letter(group, {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)})

    async def replay(self, group: str, message_ids: Collection[str] | None = None) -> int:
        return await self._dead("replay", group, message_ids)

    async def purge(self, group: str, message_ids: Collection[str] | None = None) -> int:
        return await self._dead("purge", group, message_ids)

    async def _dead(self, verb: str, group: str, message_ids: Collection[str] | None) -> int:
        if message_ids is not None and not message_ids:
            return 0
        stream, _, dead = self._keys(group)
        ids = [] if message_ids is None else list(message_ids)
        total, start, last = 0, "-", ""
        with self._errors(verb):
            while start:  # up to the newest dead letter when the first chunk ran (see DEAD)
                count, after, end = await self._script(
                    "dead", [dead, stream, self._letter_index(group)], [verb, group, start, last, _CHUNK, *ids]
                )
                total, start, last = total + int(count), _str(after), _str(end)
        return total


def _without_our_params(parts: SplitResult, rest: list[tuple[str, str]]) -> str:
    """The URL for redis-py: ``parts`` with only ``rest`` in its query.

    ``urlunsplit`` writes a URL with no host as ``unix:/tmp/r.sock``, which recent redis-py
    refuses (its scheme must be followed by ``//``), so the ``//`` is kept."""
    url = urlunsplit(parts._replace(query=urlencode(rest)))
    if not parts.netloc and not url.startswith(f"{parts.scheme}://"):
        url = f"{parts.scheme}://{url[len(parts.scheme) + 1:]}"
    return url


def _check_redis_py_params(client_url: str, params: list[tuple[str, str]]) -> None:
    """Refuse, now, the query parameters redis-py would not take.

    redis-py turns every query parameter into a keyword argument of the connection class
    the scheme selects, known or not: a typo surfaced as a ``TypeError`` traceback at the
    first connection (``?bogus=1``), and a value it cannot parse (``?db=two``) as a
    ``ValueError``. Both are the URL's fault, so both are a :class:`ConfigurationError`
    when the transport is made, like the other transports' unknown parameters. So is a
    switch (``socket_keepalive``, ``retry_on_timeout``, ...) that is neither true nor false:
    redis-py reads every value but a few false words as true (``?socket_keepalive=maybe``)."""
    names = {name for name, _ in params}
    for name, value in params:
        if URL_QUERY_ARGUMENT_PARSERS.get(name) is to_bool and value.upper() not in _SWITCH_WORDS:
            raise ConfigurationError(
                f"broker URL: {name}={value!r} is not true or false"
                f" ({', '.join(word.lower() for word in _SWITCH_WORDS)})"
            )
        if not value:  # redis-py drops it: ?socket_timeout= meant no timeout, ?db= the path's
            raise ConfigurationError(f"broker URL: {name} is empty (leave it out for redis-py's default)")
        least = _LEAST.get(name)
        if least is not None and not _at_least(value, *least):
            # nan was a ValueError traceback at the first connect; 0 or less a timeout or a reply
            # naming something else ("Connection closed by server", "unknown subcommand 'SETINFO'")
            raise ConfigurationError(f"broker URL: {name}={value!r} must be {'>' if least[1] else '>='} {least[0]}")
    try:
        options = parse_url(client_url)
    except ValueError as exc:
        raise ConfigurationError(f"broker URL: {exc}") from None
    parts = urlsplit(client_url)
    path = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and path and "db" not in options:
        # redis-py ignores a path that is not a number: redis://host/1O used database 0,
        # sharing the bus of another (or of nothing meant to be one).
        raise ConfigurationError(f"broker URL: database {path!r} (the URL's path) is not a number")
    if "decode_responses" in options:
        # The transport reads replies as bytes (its field names are bytes keys): decoded to
        # str, every delivery came with an empty type and body and its entry id as message
        # id, and dead letters were empty. redis-py keeps the value a string, so even
        # ?decode_responses=false turned decoding on.
        raise ConfigurationError("broker URL: decode_responses is not supported (the transport reads bytes)")
    connection_class = options.get("connection_class", RedisConnection)
    accepted = _redis_py_params(connection_class)
    unknown = sorted(names - accepted)
    if unknown:
        known = [*_OUR_PARAMS, *sorted(accepted)]
        raise ConfigurationError(
            f"broker URL: unknown parameter(s) {', '.join(did_you_mean(name, known) for name in unknown)};"
            f" choreograph's are {', '.join(_OUR_PARAMS)}, the others must be keyword arguments"
            f" of redis-py's {connection_class.__name__}"
        )


def _at_least(value: str, bound: float, exclusive: bool) -> bool:
    """Whether ``value`` reads as a number above ``bound`` (or equal, unless ``exclusive``); a
    value that is no number at all passes, for redis-py's own parser to refuse by name."""
    try:
        number = float(value)
    except ValueError:
        return True
    return number > bound if exclusive else number >= bound  # nan: neither


def _redis_py_params(connection_class: type) -> frozenset[str]:
    """What redis-py takes from a URL's query without a ``TypeError``, read from redis-py
    itself so it follows its versions: the keyword arguments of ``ConnectionPool`` (which
    hands the rest on) and of ``connection_class``'s ``__init__`` and those of its bases,
    up to the first that does not hand on ``**kwargs``. Its URL_QUERY_ARGUMENT_PARSERS
    are not all in: a parser only converts a value, and ``timeout`` (or an ``ssl_*`` on
    ``redis://``) still fails the connection class."""
    names = _keyword_names(aioredis.ConnectionPool.__init__)[0]
    for klass in connection_class.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        named, hands_on = _keyword_names(init)
        names |= named
        if not hands_on:
            break
    return frozenset(names)


def _keyword_names(function: Callable[..., Any]) -> tuple[set[str], bool]:
    """(names ``function`` takes as keywords, whether it also takes ``**kwargs``)."""
    parameters = list(inspect.signature(function).parameters.values())[1:]  # not self
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in parameters)


class _OffLine(Exception):
    """A script call the transport's own connection leaves to the client (see ``_on_line``)."""


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


_FAST_CLASSES: dict[tuple[type, Any], type] = {}


def _fast_connections(client: aioredis.Redis) -> None:
    """Have the client's connections write small commands at once (:func:`_write_at_once`)
    and pack commands with hiredis (one C call a command).

    redis-py's asyncio connection packs in Python, growing a buffer argument by
    argument: for a publish script call (three arguments a message) and the ack and read
    commands that was the transport's largest cost per message. The bytes on the wire are
    the same (hiredis formats ints and floats as ``repr`` does, as redis-py's encoder);
    only UTF-8 with strict errors is packed this way (the encoder's default)."""
    pool = client.connection_pool
    base = pool.connection_class
    kwargs = pool.connection_kwargs
    encoding = str(kwargs.get("encoding", "utf-8")).lower().replace("_", "-")
    pack = _hiredis_pack
    if encoding not in ("utf-8", "utf8") or kwargs.get("encoding_errors", "strict") != "strict":
        pack = None
    fast = _FAST_CLASSES.get((base, pack))
    if fast is None:
        methods: dict[str, Any] = {"send_packed_command": _write_at_once(base)}
        if pack is not None:
            methods["pack_command"] = _hiredis_packer(base, pack)
        fast = _FAST_CLASSES[(base, pack)] = type(base.__name__, (base,), methods)
    pool.connection_class = fast


#: Largest command :func:`_write_at_once` writes itself: below asyncio's default high-water mark
#: (64 KiB), so that a write into an empty send buffer never leaves one that ``drain()`` waits on.
_AT_ONCE_MAX = 32 * 1024


def _write_at_once(base: type[Any]) -> Callable[..., Any]:
    """redis-py's ``send_packed_command``, writing a small command at once.

    redis-py times every write with ``asyncio.wait_for`` when a socket timeout is set (this
    transport sets one), which on Python 3.11 wraps the write in a task of its own: the
    command reaches the socket a loop turn later, on the path of every publish and every
    read. A command of up to :data:`_AT_ONCE_MAX` bytes on a connected socket whose send
    buffer is empty (and no health check due) is written here instead, in the caller's step:
    it cannot block, so there is nothing to time. Anything else goes redis-py's way; a
    write that fails shows as the connection's error on the reply's read, as it would have
    after redis-py's ``drain()``."""
    slow = base.send_packed_command

    async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        writer = self._writer
        if (
            writer is None
            or self._reader is None
            or (check_health and self.health_check_interval)
            or writer.transport.is_closing()
            or writer.transport.get_write_buffer_size()
        ):
            return await slow(self, command, check_health)  # type: ignore[no-any-return]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        if sum(map(len, command)) > _AT_ONCE_MAX:
            return await slow(self, command, check_health)  # type: ignore[no-any-return]
        writer.writelines(command)
        return None

    return send_packed_command


def _hiredis_packer(base: type[Any], pack: Callable[..., bytes]) -> Callable[..., list[bytes]]:
    slow = base.pack_command

    def pack_command(self: Any, *args: Any) -> list[bytes]:
        # As redis-py: a command name with spaces ("CONFIG GET") is split into its words.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [pack(args)]
        except TypeError:  # an argument hiredis does not take: redis-py packs or refuses it
            return slow(self, *args)  # type: ignore[no-any-return]

    return pack_command


def _dead_letter(group: str, fields: Mapping[bytes, bytes]) -> DeadLetter:
    message = Message(
        id=_str(fields.get(b"id", b"")), type=_str(fields.get(b"type", b"")), body=fields.get(b"body", b"")
    )
    record = orjson.loads(fields.get(b"record", b"{}"))
    return DeadLetter(
        group=group, message=message, record=record, dead_at=float(fields.get(b"dead_at", b"0"))
    )
