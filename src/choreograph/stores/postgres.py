"""The inbox on PostgreSQL (asyncpg): processed ids and failure history per consumer group.

``postgresql://user@host:5432/db?schema=choreograph`` — every replica of every
service may share one database; tables live in ``schema`` (see
:mod:`choreograph.stores._pg` for the URL and migrations, ``docs/stores.md`` for the
schema). A service database on PostgreSQL (``Service(database="postgresql://...")``)
reuses these tables, so its inbox records commit in the same transaction as its state.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from typing import Any

import orjson

from choreograph._clock import stamp_time
from choreograph._redact import redact
from choreograph.errors import StoreError
from choreograph.stores import _pg
from choreograph.stores.base import ErrorInfo, InboxStore

INBOX_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS choreograph_inbox (
        grp text NOT NULL,
        event_id text NOT NULL,
        processed_at double precision NOT NULL,
        PRIMARY KEY (grp, event_id)
    );
    CREATE INDEX IF NOT EXISTS choreograph_inbox_age ON choreograph_inbox (processed_at);
    CREATE TABLE IF NOT EXISTS choreograph_failures (
        grp text NOT NULL,
        event_id text NOT NULL,
        first_error jsonb NOT NULL,
        first_at double precision NOT NULL,
        PRIMARY KEY (grp, event_id)
    );
    """,
]

#: Record an event as processed (forgetting its failures); affects 0 rows if it already was.
MARK_ONE = """
WITH forgotten AS (DELETE FROM choreograph_failures WHERE grp = $1 AND event_id = $2)
INSERT INTO choreograph_inbox (grp, event_id, processed_at) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING
"""

#: What an event id's U+0000 is stored as: PostgreSQL text cannot hold U+0000, and JSON (so an
#: envelope's ``id``) can. U+FFFE is a noncharacter, which a CloudEvents id may not contain either.
NUL_STAND_IN = "\ufffe"
#: Escapes a genuine U+FFFE (and itself) in stored text, so that :func:`text_in` is reversible:
#: U+FFFE was stored as it was, so it read back as U+0000, and ``"a\x00"`` and ``"a\ufffe"``
#: were one inbox key (the second event was dropped as a duplicate of the first).
ESCAPE = "\uffff"
_TEXT_IN = str.maketrans({"\x00": NUL_STAND_IN, NUL_STAND_IN: ESCAPE + NUL_STAND_IN, ESCAPE: ESCAPE + ESCAPE})
_TEXT_OUT = re.compile("\uffff([\ufffe\uffff])|\ufffe")


def text_in(value: str) -> str:
    """``value`` as PostgreSQL text stores it: U+0000 as :data:`NUL_STAND_IN`, a genuine U+FFFE
    or U+FFFF escaped by :data:`ESCAPE`. Text without those three is stored unchanged, and
    text with U+0000 only as before the escape existed (rows already written still match)."""
    if "\x00" in value or NUL_STAND_IN in value or ESCAPE in value:
        return value.translate(_TEXT_IN)
    return value


def _unescape(match: re.Match[str]) -> str:
    return match.group(1) or "\x00"


def text_out(stored: str) -> str:
    """Stored text as it was (the inverse of :func:`text_in`). A U+FFFF not followed by U+FFFE
    or U+FFFF is kept as it is: a row written before the escape existed."""
    if ESCAPE in stored:
        return _TEXT_OUT.sub(_unescape, stored)
    return stored.replace(NUL_STAND_IN, "\x00") if NUL_STAND_IN in stored else stored
#: Ids longer than this (UTF-8 bytes) are stored as a digest: a btree index entry holds at most
#: 2,704 bytes (the group is in the key too), and an id that does not fit can be looked up but
#: never inserted.
MAX_ID_BYTES = 2000
_LONG_PREFIX = NUL_STAND_IN + "sha256:"


def stored_id(event_id: str) -> str:
    """``event_id`` as the inbox stores it: unchanged unless it holds U+0000, U+FFFE or U+FFFF
    (see :func:`text_in`) or is longer than :data:`MAX_ID_BYTES` (then ``U+FFFE sha256:<hex>``,
    as is an id beginning with ``U+0000 sha256:``, which would otherwise be stored as a digest).

    Without this, one id holding U+0000 failed the inbox lookup of its whole batch (the worker
    released the batch to look it up again: the same batch, for ever), and one too long to
    index failed every mark of its batch (the worker retried that mark, and acked nothing, for ever).
    """
    if len(event_id) > MAX_ID_BYTES // 4:  # else short enough whatever its characters
        raw = event_id.encode("utf-8", "surrogatepass")
        if len(raw) > MAX_ID_BYTES:
            return _LONG_PREFIX + hashlib.sha256(raw).hexdigest()
    stored = text_in(event_id)
    if stored.startswith(_LONG_PREFIX):
        # an id "\x00sha256:<hex>" would be stored as a long id's digest is, and taken for that
        # id (the later of the two dropped as a duplicate): it is keyed by its own digest too
        return _LONG_PREFIX + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()
    return stored


def _error_in(error: ErrorInfo) -> str:
    """``error`` as ``first_error`` stores it: jsonb cannot hold U+0000 either, and an error
    message may quote a payload, so its U+0000 is stored as :data:`NUL_STAND_IN` (a failure
    holding one failed to record on every attempt, and the worker released the delivery to
    come back after its lease each time, its retry policy never applied)."""
    return orjson.dumps({k: text_in(v) for k, v in error.to_dict().items()}).decode()


def _error_out(stored: str) -> ErrorInfo:
    """A stored ``first_error`` as it was recorded (the inverse of :func:`_error_in`)."""
    data = orjson.loads(stored)
    return ErrorInfo.from_dict({k: text_out(v) if isinstance(v, str) else v for k, v in data.items()})


class PostgresStore(InboxStore):
    """:class:`InboxStore` on PostgreSQL; open with ``await store.open()`` (creates tables once)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.config = _pg.parse_url(url)
        self.pool: Any = None

    def _migrations(self) -> list[tuple[str, list[str]]]:
        """(component, steps) to apply on open; subclasses add their own."""
        return [("inbox", INBOX_MIGRATIONS)]

    def _session_settings(self) -> dict[str, str]:
        """Session settings of the pool's connections; subclasses may add some."""
        return {}

    def _pool(self) -> Any:
        if self.pool is None:
            raise StoreError(f"store {redact(self.url)} is not open")
        return self.pool

    #: How many times :meth:`close` was called: an open during which it changed closes its pool.
    _closes = 0

    async def open(self) -> None:
        if self.pool is not None:
            return
        closes = self._closes
        pool = await _pg.create_pool(self.config, self._session_settings())
        try:
            for component, steps in self._migrations():
                await _pg.migrate(pool, self.config, component, steps)
            if self._closes != closes:  # close() ran meanwhile and found no pool: nobody else would close this one
                raise StoreError(f"store {redact(self.url)} was closed while it was opening")
        except BaseException:
            await pool.close()
            raise
        if self.pool is not None:  # another open finished meanwhile: its pool is the one kept
            await pool.close()
            return
        self.pool = pool

    async def close(self) -> None:
        self._closes += 1
        if self.pool is not None:
            pool, self.pool = self.pool, None
            with _pg.translate(f"closing {redact(self.url)}"):
                await pool.close()

    async def seen(self, group: str, event_ids: Collection[str]) -> set[str]:
        ids = list(event_ids)
        if not ids:
            return set()
        keys = [stored_id(i) for i in ids]
        with _pg.translate(f"inbox {redact(self.url)}"):
            rows = await self._pool().fetch(
                "SELECT event_id FROM choreograph_inbox WHERE grp = $1 AND event_id = ANY($2::text[])", group, keys
            )
        found = {row[0] for row in rows}
        if keys == ids:
            return found
        return {i for i, key in zip(ids, keys, strict=True) if key in found}

    async def mark(self, group: str, event_ids: Collection[str]) -> None:
        ids = [stored_id(i) for i in event_ids]
        if not ids:
            return
        with _pg.translate(f"inbox {redact(self.url)}"):
            await self._pool().execute(
                """
                WITH forgotten AS (
                    DELETE FROM choreograph_failures WHERE grp = $1 AND event_id = ANY($2::text[])
                )
                INSERT INTO choreograph_inbox (grp, event_id, processed_at)
                SELECT $1, id, $3 FROM unnest($2::text[]) AS id
                ON CONFLICT DO NOTHING
                """,
                group, ids, stamp_time(),  # on the worker's clock, as Worker.expire reads it
            )

    async def record_failure(self, group: str, event_id: str, error: ErrorInfo, at: float) -> tuple[ErrorInfo, float]:
        pool = self._pool()
        event_id = stored_id(event_id)
        with _pg.translate(f"inbox {redact(self.url)}"):
            await pool.execute(
                "INSERT INTO choreograph_failures (grp, event_id, first_error, first_at) VALUES ($1, $2, $3::jsonb, $4)"
                " ON CONFLICT DO NOTHING",
                group, event_id, _error_in(error), at,
            )
            row = await pool.fetchrow(
                "SELECT first_error::text, first_at FROM choreograph_failures WHERE grp = $1 AND event_id = $2",
                group, event_id,
            )
        if row is None:  # cleared concurrently (the event was just marked or dead-lettered)
            return error, at
        return _error_out(row[0]), float(row[1])

    async def clear_failures(self, group: str, event_ids: Collection[str]) -> None:
        ids = [stored_id(i) for i in event_ids]
        if ids:
            with _pg.translate(f"inbox {redact(self.url)}"):
                await self._pool().execute(
                    "DELETE FROM choreograph_failures WHERE grp = $1 AND event_id = ANY($2::text[])", group, ids
                )

    async def expire(self, older_than: float) -> int:
        with _pg.translate(f"inbox {redact(self.url)}"):
            status = await self._pool().execute("DELETE FROM choreograph_inbox WHERE processed_at < $1", older_than)
        return _pg.rowcount(status)
