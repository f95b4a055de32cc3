"""The SQL behind :mod:`choreograph.transports.sqlite`: schema and synchronous operations.

Everything here runs on the transport's single SQLite thread, inside a write transaction
the caller opened (``BEGIN IMMEDIATE``), except :func:`open_connection` and the read-only
dead-letter queries. Keeping the SQL apart from the asyncio plumbing keeps both short.

Schema (fan-out on write)::

    messages      seq (never reused) | id | type | body | published_at
    groups        name | types (JSON list, NULL = every type)
    deliveries    grp | seq | attempt | available_at        one row per (group, message)
    dead_letters  n | grp | id | type | body | record (JSON) | dead_at     one row per (group, id)
    meta          groups_version (bumped when a group changes: publishers reload their cache)

A delivery row is *available* when ``available_at <= now``. Claiming it adds 1 to
``attempt`` and moves ``available_at`` to the lease deadline, so an expired lease makes
the row available again with no sweeper; ``retry(after)`` moves ``available_at`` to
``now + after``, and ``defer(after)`` too, taking back the 1 its claim added. The pair (seq, attempt) identifies one claim: a consumer whose lease
expired and was re-claimed elsewhere cannot settle the newer claim. ``seq`` uses
AUTOINCREMENT so a garbage-collected message's number is never handed out again.
Times are wall-clock seconds: several processes must agree on them.

The schema evolves on open, in the same transaction, by idempotent statements: a file
from before the unique ``(grp, id)`` index on ``dead_letters`` (it kept one row per
failed copy of a message published twice) has its older duplicates deleted, the latest
row (highest ``n``) kept, and then gets the index - only while the index does not exist.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from choreograph._sqlite import begin_immediate, connect_wal
from choreograph.transports.base import DeadLetter, Message, matches

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    published_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, types TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    available_at REAL NOT NULL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (grp, available_at);
CREATE INDEX IF NOT EXISTS deliveries_seq ON deliveries (seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    grp TEXT NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    record TEXT NOT NULL,
    dead_at REAL NOT NULL
);
DELETE FROM dead_letters
WHERE NOT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'dead_letters_one_per_id')
  AND n NOT IN (SELECT max(n) FROM dead_letters GROUP BY grp, id);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_one_per_id ON dead_letters (grp, id);
DROP INDEX IF EXISTS dead_letters_grp;
INSERT OR IGNORE INTO meta (key, value) VALUES ('groups_version', 0);
"""

#: Most host parameters bound in one ``IN (...)`` list.
_CHUNK = 500

Groups = dict[str, frozenset[str] | None]
Claimed = list[tuple[int, int, Message]]  # (seq, attempt, message), in seq order


def open_connection(path: str, *, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, schema in place.

    Its folder is created; one that cannot be raises :class:`~choreograph.errors.ConfigurationError`.
    """
    conn = connect_wal(path, timeout=busy_timeout, synchronous=synchronous)
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA busy_timeout=0")  # writers wait in begin_immediate, reads never wait in WAL
    begin_immediate(conn, busy_timeout)
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        conn.close()
        raise
    return conn


def groups_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'groups_version'").fetchone()
    return int(row[0]) if row else 0


def load_groups(conn: sqlite3.Connection) -> Groups:
    return {
        name: None if types is None else frozenset(json.loads(types))
        for name, types in conn.execute("SELECT name, types FROM groups")
    }


def register_group(conn: sqlite3.Connection, group: str, types: frozenset[str] | None) -> None:
    """Bind ``group`` to ``types``, widening an existing binding (never narrowing it).

    Widening, because replicas of one service may briefly run different versions during a
    deploy: the union never stops routing a type that some replica still handles.
    """
    row = conn.execute("SELECT types FROM groups WHERE name = ?", (group,)).fetchone()
    if row is not None:
        if row[0] is None:
            return
        if types is not None:
            old = frozenset(json.loads(row[0]))
            if types <= old:
                return
            types = old | types
    encoded = None if types is None else json.dumps(sorted(types))
    conn.execute("INSERT OR REPLACE INTO groups (name, types) VALUES (?, ?)", (group, encoded))
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'groups_version'")


def unbind_group(conn: sqlite3.Connection, group: str, types: frozenset[str]) -> tuple[bool, frozenset[str] | None]:
    """Remove ``types`` from the binding of ``group``: (whether the group exists, its binding
    after; a wildcard stays one). Its deliveries stay: only messages published afterwards
    are routed by the new binding. Raises nothing: it shares a transaction with others."""
    row = conn.execute("SELECT types FROM groups WHERE name = ?", (group,)).fetchone()
    if row is None:
        return False, None
    if row[0] is None:
        return True, None
    old = frozenset(json.loads(row[0]))
    if not old & types:
        return True, old
    bound = old - types
    conn.execute("UPDATE groups SET types = ? WHERE name = ?", (json.dumps(sorted(bound)), group))
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'groups_version'")
    return True, bound


def publish(conn: sqlite3.Connection, messages: Sequence[Message], groups: Groups, now: float) -> int:
    """Store each message once plus one delivery per matching group; returns deliveries made.

    A message no group matches is not stored: no current group can ever receive it.
    """
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    seq = int(row[0]) if row else 0
    stored: list[tuple[int, str, str, bytes, float]] = []
    deliveries: list[tuple[str, int, float]] = []
    targets: dict[str, list[str]] = {}
    for message in messages:
        names = targets.get(message.type)
        if names is None:
            names = targets[message.type] = [g for g, types in groups.items() if matches(types, message.type)]
        if not names:
            continue
        seq += 1
        stored.append((seq, message.id, message.type, message.body, now))
        deliveries.extend((name, seq, now) for name in names)
    conn.executemany(
        "INSERT INTO messages (seq, id, type, body, published_at) VALUES (?, ?, ?, ?, ?)", stored
    )
    conn.executemany(
        "INSERT INTO deliveries (grp, seq, attempt, available_at) VALUES (?, ?, 0, ?)", deliveries
    )
    return len(deliveries)


_CLAIM = """
UPDATE deliveries SET attempt = attempt + 1, available_at = :until
WHERE grp = :grp AND seq IN (
    SELECT seq FROM deliveries WHERE grp = :grp AND available_at <= :now
    ORDER BY available_at, seq LIMIT :limit
)
RETURNING seq, attempt
"""


def claim(conn: sqlite3.Connection, group: str, limit: int, now: float, until: float) -> Claimed:
    """Lease up to ``limit`` available deliveries of ``group`` until ``until``."""
    claimed = conn.execute(_CLAIM, {"grp": group, "now": now, "until": until, "limit": limit}).fetchall()
    if not claimed:
        return []
    attempts = dict(claimed)
    seqs = sorted(attempts)
    out: Claimed = []
    for start in range(0, len(seqs), _CHUNK):
        chunk = seqs[start : start + _CHUNK]
        rows = conn.execute(
            f"SELECT seq, id, type, body FROM messages WHERE seq IN ({','.join('?' * len(chunk))}) ORDER BY seq",
            chunk,
        )
        out.extend((seq, attempts[seq], Message(id, type_, bytes(body))) for seq, id, type_, body in rows)
    return out


def next_due(conn: sqlite3.Connection, group: str) -> float | None:
    """When the group's earliest delivery becomes available (a retry, a lease), or ``None``."""
    row = conn.execute("SELECT min(available_at) FROM deliveries WHERE grp = ?", (group,)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def _collect(conn: sqlite3.Connection, seqs: Iterable[int]) -> None:
    """Delete the messages among ``seqs`` that no group still has to deliver."""
    conn.executemany(  # plain ? (Python 3.12 deprecates numbered ?1 with a sequence; 3.14 refuses it)
        "DELETE FROM messages WHERE seq = ? AND NOT EXISTS (SELECT 1 FROM deliveries WHERE seq = ?)",
        [(seq, seq) for seq in set(seqs)],
    )


def ack(conn: sqlite3.Connection, group: str, claims: Sequence[tuple[int, int]]) -> None:
    """Delete the (seq, attempt) claims of ``group`` and collect their messages."""
    conn.executemany(
        "DELETE FROM deliveries WHERE grp = ? AND seq = ? AND attempt = ?",
        [(group, seq, attempt) for seq, attempt in claims],
    )
    _collect(conn, (seq for seq, _ in claims))


def postpone(conn: sqlite3.Connection, group: str, claims: Sequence[tuple[int, int]], when: float) -> None:
    """Make claims available again at ``when``: retry(after), touch() and release share this."""
    conn.executemany(
        "UPDATE deliveries SET available_at = ? WHERE grp = ? AND seq = ? AND attempt = ?",
        [(when, group, seq, attempt) for seq, attempt in claims],
    )


def defer(conn: sqlite3.Connection, group: str, claims: Sequence[tuple[int, int]], when: float) -> None:
    """Make claims available again at ``when`` with the attempt they had before (``defer``):
    the next claim counts the attempt this one counted. A consumer holding the claim before
    (its lease ran out) matches the row again meanwhile: its verbs settle the message, as
    they would have before its lease ran out - that copy is the one that was handled."""
    conn.executemany(
        "UPDATE deliveries SET available_at = ?, attempt = attempt - 1 WHERE grp = ? AND seq = ? AND attempt = ?",
        [(when, group, seq, attempt) for seq, attempt in claims],
    )


def unclaim(conn: sqlite3.Connection, group: str, claims: Sequence[tuple[int, int]], now: float) -> None:
    """Undo claims no consumer ever saw (a cancelled fetch): available now, attempt as before."""
    conn.executemany(
        "UPDATE deliveries SET available_at = ?, attempt = attempt - 1 WHERE grp = ? AND seq = ? AND attempt = ?",
        [(now, group, seq, attempt) for seq, attempt in claims],
    )


def dead_letter(
    conn: sqlite3.Connection, group: str, seq: int, attempt: int, record: Mapping[str, Any], now: float
) -> None:
    """Move one claim to the group's dead letters, copying the message body.

    One letter per (group, id): an older letter of the same id (another copy of a message
    published twice) is replaced, so the latest record wins and is listed as the newest.
    """
    gone = conn.execute(
        "DELETE FROM deliveries WHERE grp = ? AND seq = ? AND attempt = ? RETURNING seq",
        (group, seq, attempt),
    ).fetchone()
    if gone is None:  # our lease expired and another consumer holds it now
        return
    conn.execute(
        "DELETE FROM dead_letters WHERE grp = ? AND id = (SELECT id FROM messages WHERE seq = ?)", (group, seq)
    )
    conn.execute(
        "INSERT INTO dead_letters (grp, id, type, body, record, dead_at) "
        "SELECT ?, id, type, body, ?, ? FROM messages WHERE seq = ?",
        (group, json.dumps(record, default=str), now, seq),
    )
    _collect(conn, (seq,))


def _letter_filter(group: str | None, message_ids: Collection[str] | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if group is not None:
        clauses.append("grp = ?")
        params.append(group)
    if message_ids is not None:
        ids = list(message_ids)
        clauses.append("id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(ids))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def list_dead_letters(
    conn: sqlite3.Connection, group: str | None, limit: int, message_ids: Collection[str] | None = None
) -> list[DeadLetter]:
    where, params = _letter_filter(group, message_ids)
    rows = conn.execute(
        f"SELECT grp, id, type, body, record, dead_at FROM dead_letters{where} ORDER BY n LIMIT ?",
        [*params, limit],
    )
    return [
        DeadLetter(grp, Message(id, type_, bytes(body)), json.loads(record), float(dead_at))
        for grp, id, type_, body, record, dead_at in rows
    ]


def replay(conn: sqlite3.Connection, group: str, message_ids: Collection[str] | None, now: float) -> int:
    """Re-enqueue dead letters of ``group`` (to that group only) with a fresh attempt count."""
    where, params = _letter_filter(group, message_ids)
    letters = conn.execute(f"DELETE FROM dead_letters{where} RETURNING n, id, type, body", params).fetchall()
    letters.sort()
    for _, id, type_, body in letters:
        seq = conn.execute(
            "INSERT INTO messages (id, type, body, published_at) VALUES (?, ?, ?, ?) RETURNING seq",
            (id, type_, body, now),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO deliveries (grp, seq, attempt, available_at) VALUES (?, ?, 0, ?)", (group, seq, now)
        )
    return len(letters)


def purge(conn: sqlite3.Connection, group: str, message_ids: Collection[str] | None) -> int:
    where, params = _letter_filter(group, message_ids)
    return conn.execute(f"DELETE FROM dead_letters{where}", params).rowcount
