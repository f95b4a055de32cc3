"""How a group lives on NATS: its durable consumer on the events stream, written and read back.

A group ``G`` is the consumer named ``name_token(G)`` (see ``_nats_codec``). What the
server keeps of it, for ``prefix=P``:

* **nats-server >= 2.10** (multi-subject filters): ``filter_subjects`` are
  ``P.ev.<type tokens>.*`` per type (``P.ev.>`` for every type) plus ``P.rp.<consumer>.>``
  (the group's replays); the description is ``choreograph group G``. Types unbound whose
  events the group still holds (see ``_nats_routing``) stay in the filter, and their lines
  are the metadata ``choreograph.removed``: ``{"b": 1042}``. The metadata
  ``choreograph.lineage`` names the write and those it was computed from (see :func:`lineage`).
* **Before 2.10** a consumer has no filter and takes the whole stream; its description
  keeps the types for every subscription to read: ``choreograph group types: ["a", "b"]``
  (``null``: every type). Types unbound whose events the group still holds stay in the
  list, their lines and the lineage in an object closing it:
  ``["a", "b", {"choreograph.removed": {"b": 1042}, "choreograph.lineage": "9f3c01ab,..."}]``
  (a wildcard group's ``null`` has no lineage).

Reading a group back (``NatsTransport.groups``) starts from a consumer whose description
starts with ``choreograph group `` - choreograph wrote it; any other consumer on the
stream is someone else's. Its name: the description's, when it maps to the consumer's
name; else the consumer's name unescaped. A group whose escaped name is past 120
characters has a cut and hashed consumer name that cannot be unescaped, and before 2.10
its description holds the types, not the name: such a group cannot be named
(:func:`group_name` returns ``None``). A consumer made by a choreograph that did not
record its types where this server lets us read them (before 2.10, descriptions once
held only the name) has :data:`UNRECORDED` types.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any

from choreograph.transports import _nats_codec as codec
from choreograph.transports._nats_routing import Binding

#: Every description choreograph writes on a group's consumer starts with it.
MARKER = "choreograph group "
#: Servers before 2.10 (no consumer filters): a group's types live in its consumer's description.
TYPES_NOTE = "choreograph group types: "
MAX_DESCRIPTION = 4096  # bytes: nats-server's limit
#: Where the lines of the types unbound from a group are kept (see ``_nats_routing``).
REMOVED_KEY = "choreograph.removed"
#: Where the stamps of a consumer's last writes are kept, newest first (see :func:`lineage`).
LINEAGE_KEY = "choreograph.lineage"
#: How many stamps a lineage keeps (~9 bytes each): more writes than this between two checks
#: of a subscription (a loop of single-type unbinds, a subscription away for a while) make
#: a later write look like a race to it, and it binds its types again.
LINEAGE = 64
_SECOND = 1_000_000_000  # JetStream durations are nanoseconds


class _Unrecorded(enum.Enum):
    TYPES = "types not recorded"


#: The types of a consumer whose types were not recorded where this server lets us read them.
UNRECORDED = _Unrecorded.TYPES


def config(
    *,
    prefix: str,
    lease: float,
    multi_filter: bool,
    group: str,
    consumer: str,
    binding: Binding,
    lineage: Sequence[str] = (),
) -> dict[str, Any]:
    """The consumer config of ``group`` (consumer ``consumer``) with ``binding``, written by
    the write ``lineage[0]``, computed from a config written by ``lineage[1]``, and so on."""
    types, removed = binding.held, dict(sorted(binding.removed.items()))
    stamps = ",".join(lineage[:LINEAGE])
    result: dict[str, Any] = {
        "durable_name": consumer,
        "name": consumer,
        "deliver_policy": "new",
        "ack_policy": "explicit",
        "ack_wait": ack_wait(lease),
        "max_deliver": -1,
        # Unlimited: the server's default of 1,000 unacked messages stalls a group whose
        # deliveries wait on purpose (join deadline timers, long retries), as chaos runs showed.
        "max_ack_pending": -1,
        "replay_policy": "instant",
    }
    if multi_filter:  # the filter says which types; readable back (bound_types)
        # The whole name when it fits (groups() reads it back); cut, the consumer's name tells it.
        result["description"] = _cut(MARKER + group, MAX_DESCRIPTION)
        subjects = (
            [f"{prefix}.ev.>"]
            if types is None
            else sorted({f"{prefix}.ev.{codec.type_tokens(t)}.*" for t in types})
        )
        result["filter_subjects"] = [*subjects, f"{prefix}.rp.{consumer}.>"]
        metadata = {REMOVED_KEY: json.dumps(removed, ensure_ascii=False)} if removed else {}
        if stamps:
            metadata[LINEAGE_KEY] = stamps
        if metadata:
            result["metadata"] = metadata
    else:  # no filter: the description keeps the types for every subscription to read
        # Past the server's limit for a description: the lineage goes first (a write not told
        # apart from a race costs less than the types), then the list - the group takes every
        # type (its consumers ignore those they do not handle) rather than miss one.
        result["description"] = TYPES_NOTE + "null"
        for kept in (stamps, ""):
            listed: list[Any] | None = None if types is None else sorted(types)
            closing = ({REMOVED_KEY: removed} if removed else {}) | ({LINEAGE_KEY: kept} if kept else {})
            if listed is not None and closing:
                listed.append(closing)
            note = TYPES_NOTE + json.dumps(listed, ensure_ascii=False)
            if len(note.encode()) <= MAX_DESCRIPTION:
                result["description"] = note
                break
    return result


LONGEST_LEASE = 2**63 // _SECOND  # whole seconds, so int(lease * _SECOND) stays below 2**63
"""The longest lease (seconds) JetStream takes as an ``ack_wait``: an int64 of nanoseconds, about 292 years."""


def ack_wait(lease: float) -> int:
    """A consumer's ``ack_wait`` (nanoseconds) for ``lease`` seconds."""
    return int(lease * _SECOND)


def bound_types(
    config: Mapping[str, Any], prefix: str, *, multi_filter: bool
) -> frozenset[str] | None | _Unrecorded:
    """The types a consumer with ``config`` is bound to (``None``: every type), or
    :data:`UNRECORDED`."""
    read = binding(config, prefix, multi_filter=multi_filter)
    return read if read is UNRECORDED else read.types


def binding(config: Mapping[str, Any], prefix: str, *, multi_filter: bool) -> Binding | _Unrecorded:
    """The binding a consumer with ``config`` keeps, or :data:`UNRECORDED`."""
    event = f"{prefix}.ev."
    single = config.get("filter_subject")
    filters = config.get("filter_subjects") or ([single] if single else [])
    if multi_filter and filters:
        types: set[str] = set()
        for subject in filters:
            if subject == event + ">":
                return Binding(None)
            if subject.startswith(event) and subject.endswith(".*"):
                types.add(codec.type_from_tokens(subject[len(event) : -2]))
        removed: Any = None
        with contextlib.suppress(ValueError):
            removed = json.loads((config.get("metadata") or {}).get(REMOVED_KEY) or "null")
        return _with_lines(types, removed)
    description = str(config.get("description") or "")
    if description.startswith(TYPES_NOTE):
        with contextlib.suppress(ValueError, TypeError):
            listed = json.loads(description[len(TYPES_NOTE) :])
            if listed is None:
                return Binding(None)
            lines = [item[REMOVED_KEY] for item in listed if isinstance(item, dict) and REMOVED_KEY in item]
            named = {str(item) for item in listed if not isinstance(item, dict)}
            return _with_lines(named, lines[-1] if lines else None)
    return UNRECORDED


def lineage(config: Mapping[str, Any], *, multi_filter: bool) -> tuple[str, ...]:
    """The stamps of the write of a consumer with ``config`` and of those it was computed
    from, newest first (empty if not recorded: an older choreograph wrote it).

    JetStream has no compare-and-set for a consumer's config: a write computed from a read
    older than another write undoes that write. Whether the config now descends from a
    given write - was computed, directly or through later writes, from a read that saw it -
    is whether its lineage holds that write's stamp (see ``_nats_routing``).
    """
    stamps: Any = None
    if multi_filter:
        stamps = (config.get("metadata") or {}).get(LINEAGE_KEY)
    else:
        description = str(config.get("description") or "")
        if description.startswith(TYPES_NOTE):
            with contextlib.suppress(ValueError, TypeError):
                listed = json.loads(description[len(TYPES_NOTE) :])
                closing = [item for item in listed or () if isinstance(item, dict) and LINEAGE_KEY in item]
                stamps = closing[-1][LINEAGE_KEY] if closing else None
    return tuple(stamps.split(",")) if isinstance(stamps, str) and stamps else ()


def _with_lines(held: set[str], lines: Any) -> Binding:
    """The binding of a consumer taking the types ``held``, some of them removed at ``lines``
    (``{type: stream sequence}`` as read back; anything else there is ignored)."""
    removed = (
        {t: line for t, line in lines.items() if t in held and isinstance(line, int)}
        if isinstance(lines, dict)
        else {}
    )
    return Binding(frozenset(held - removed.keys()), removed)


def is_group(config: Mapping[str, Any]) -> bool:
    """Whether a consumer with ``config`` is a group choreograph registered."""
    return str(config.get("description") or "").startswith(MARKER)


def group_name(consumer: str, config: Mapping[str, Any]) -> str | None:
    """The name of the group whose consumer is ``consumer`` (with ``config``), or ``None``
    if it cannot be told (cut and hashed, and not in the description)."""
    description = str(config.get("description") or "")
    # name_token is injective: a name that maps to the consumer's is the group's (also when
    # a group is named like a types note, or the description was cut).
    if description.startswith(MARKER) and codec.name_token(named := description[len(MARKER) :]) == consumer:
        return named
    with contextlib.suppress(ValueError):  # bad escapes or UTF-8: not a name_token
        unescaped = codec.from_name_token(consumer)
        if codec.name_token(unescaped) == consumer:  # also refuses a cut and hashed name
            return unescaped
    return None


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (whole characters)."""
    return text.encode()[:limit].decode(errors="ignore")
