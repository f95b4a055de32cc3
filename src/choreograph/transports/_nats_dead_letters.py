"""Dead letters on NATS: the ``<prefix>_DLQ`` stream.

Each dead letter is two messages, one per subject (the stream keeps one message per
subject, so dead-lettering an id again replaces it)::

    P.dlb.<group>.<id>   the original body, byte for byte
    P.dlr.<group>.<id>   the record: JSON with group, id, type, record, dead_at

A record longer than the server's ``max_payload`` (it holds the original envelope, say)
is cut in parts: the first in ``P.dlr...`` with a ``Choreograph-Parts`` header, the others
in ``P.dlb.<group>.<id>.<n>`` (written before it, and removed with the letter).

(``<id>`` is the id's token; past ``MAX_LETTER_ID`` characters it is cut and hashed, see
``_nats_codec.letter_id_tokens``: the record keeps the id.) Two messages rather than one
with the record in headers, because a body may already use
the whole of the server's ``max_payload``. The body is written first: a letter exists
once its record does, and listing walks the records (oldest first, by stream sequence).

Replay republishes the body to ``P.rp.<group>.<type>.<id>`` on the events stream - a
subject only that group's consumer filters on (an id too long for it travels in a
``Choreograph-Id`` header: ``P.rp.<group>.<type>.~h``), as a new stream message (attempt 1) -
then purges both messages up to the sequences it read (a newer dead letter of the
same id, from a consumer that failed the replay again meanwhile, stays), and claims the
letter on ``P.dlb._claims`` (one replay of several at once counts it, see ``replay``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import Collection, Mapping
from typing import Any

from choreograph.errors import TransportError
from choreograph.transports import _nats_codec as codec
from choreograph.transports._nats_client import Item, JetStream, header_block
from choreograph.transports.base import DeadLetter, Message

#: On a record too long for one message (``store``): ``<parts> <stamp>``; the further parts
#: are ``P.dlb.<group>.<id>.<n>``, each with the stamp in ``_H_PART``.
_H_PARTS = "Choreograph-Parts"
_H_PART = "Choreograph-Part"


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    """A dead letter and the stream sequences of its record and body messages."""

    letter: DeadLetter
    record_subject: str
    record_sequence: int
    body_sequence: int
    parts: bool = False  # its record is split (see ``store``)


class DeadLetterStream:
    """The dead letters of the bus with ``prefix``; events go back via ``events_stream``."""

    def __init__(self, js: JetStream, prefix: str, events_stream: str, *, exists: bool = True) -> None:
        self._js = js
        # False: a bus opened without creating anything (connect(create=False)) whose
        # dead-letter stream is not on the server; it holds no dead letters.
        self._exists = exists
        self._prefix = prefix
        self._events_stream = events_stream
        self.name = f"{prefix}_DLQ"

    @staticmethod
    def config(prefix: str, replicas: int) -> dict[str, Any]:
        return {
            "name": f"{prefix}_DLQ",
            "subjects": [f"{prefix}.dlr.>", f"{prefix}.dlb.>"],
            "retention": "limits",
            "max_msgs_per_subject": 1,
            "allow_direct": True,
            "storage": "file",
            "num_replicas": replicas,
        }

    def _subject(self, kind: str, group: str, message_id: str | None = None) -> str:
        """``P.dlr.<group>.<id>`` (record) / ``P.dlb...`` (body); ``None`` id: all of the group."""
        return self._subjects(kind, group, message_id)[0]

    def _subjects(self, kind: str, group: str, message_id: str | None) -> list[str]:
        """The subjects a dead letter of ``message_id`` is kept under: the one it is stored
        under now, then (an id so long it is hashed) the one an earlier choreograph used."""
        tails = (">",) if message_id is None else codec.letter_id_tokens(message_id)
        return [f"{self._prefix}.{kind}.{codec.name_token(group)}.{tail}" for tail in tails]

    async def store(self, group: str, message: Message, record: Mapping[str, Any]) -> None:
        document = {
            "group": group,
            "id": message.id,
            "type": message.type,
            "record": record,
            "dead_at": time.time(),
        }
        body_subject, record_subject = self._subject("dlb", group, message.id), self._subject("dlr", group, message.id)
        data = json.dumps(document, default=str).encode()
        items: list[Item] = [(body_subject, message.body, {})]
        room = self._js.nc.max_payload
        if len(data) <= room:
            items.append((record_subject, data, {}))
        else:  # in parts, each under max_payload: the record holds the original envelope
            stamp = secrets.token_hex(8)
            part_header = header_block({_H_PART: stamp})
            head_room = room - len(header_block({_H_PARTS: f"{len(data)} {stamp}"}))  # count < len(data)
            head, rest = data[:head_room], data[head_room:]
            step = room - len(part_header)
            parts = [rest[i : i + step] for i in range(0, len(rest), step)]
            items += [(f"{body_subject}.{k}", part, part_header) for k, part in enumerate(parts, 1)]
            items.append((record_subject, head, header_block({_H_PARTS: f"{len(parts) + 1} {stamp}"})))
        await self._js.publish(items)

    async def _entry(self, record_sequence: int, subject: str, data: bytes, headers: Mapping[str, str]) -> _Entry | None:
        """The letter whose record is this message, with its body; None if the body is gone
        (or a part of the record: replaced by a newer dead letter of the id meanwhile)."""
        body_subject = subject.replace(".dlr.", ".dlb.", 1)
        body = await self._js.direct_get(self.name, {"last_by_subj": body_subject})
        if body is None:
            return None
        count, _, stamp = str(headers.get(_H_PARTS, "")).partition(" ")
        if count:
            chunks = [data]
            for k in range(1, int(count)):
                part = await self._js.direct_get(self.name, {"last_by_subj": f"{body_subject}.{k}"})
                if part is None or (part.headers or {}).get(_H_PART) != stamp:
                    return None
                chunks.append(part.data)
            data = b"".join(chunks)
        document = json.loads(data)
        letter = DeadLetter(
            group=document["group"],
            message=Message(id=document["id"], type=document["type"], body=body.data),
            record=document["record"],
            dead_at=document["dead_at"],
        )
        return _Entry(letter, subject, record_sequence, int((body.headers or {})["Nats-Sequence"]), bool(count))

    async def _scan(self, group: str | None, limit: int) -> list[_Entry]:
        subject = f"{self._prefix}.dlr.>" if group is None else self._subject("dlr", group)
        records: list[tuple[int, str, bytes, Mapping[str, str]]] = []
        sequence = 1
        while len(records) < limit:
            found = await self._js.direct_get(self.name, {"seq": sequence, "next_by_subj": subject})
            if found is None:
                break
            headers = found.headers or {}
            sequence = int(headers["Nats-Sequence"])
            records.append((sequence, headers["Nats-Subject"], found.data, headers))
            sequence += 1
        entries = await asyncio.gather(*(self._entry(*record) for record in records))
        return [entry for entry in entries if entry is not None]

    async def _lookup(self, group: str, message_ids: Collection[str]) -> list[_Entry]:
        entries: list[_Entry] = []
        for message_id in dict.fromkeys(message_ids):  # an id given twice: one entry (replay counted it twice)
            for subject in self._subjects("dlr", group, message_id):
                found = await self._js.direct_get(self.name, {"last_by_subj": subject})
                if found is not None:
                    headers = found.headers or {}
                    entry = await self._entry(int(headers["Nats-Sequence"]), subject, found.data, headers)
                    if entry is not None:
                        entries.append(entry)
                        break
        return sorted(entries, key=lambda entry: entry.record_sequence)

    async def letters(self, group: str | None, limit: int) -> list[DeadLetter]:
        if not self._exists:
            return []
        return [entry.letter for entry in await self._scan(group, limit)]

    async def show(self, group: str, message_id: str) -> DeadLetter | None:
        if not self._exists:
            return None
        entries = await self._lookup(group, [message_id])
        return entries[0].letter if entries else None

    async def replay(self, group: str, message_ids: Collection[str] | None) -> int:
        """Republish, then delete. The replay's ``Nats-Msg-Id`` derives from the record's
        sequence, so a replay interrupted between the two steps and run again is stored once.

        Returns how many letters it replayed: each letter it read and deleted (or found deleted,
        or replaced by a newer dead letter of its id: a consumer failed the replayed message
        again meanwhile) counts once, in the replay that first *claims* it - a message with a
        ``Nats-Msg-Id`` derived from the record's sequence on :attr:`claims`, which the stream
        stores once. Two replays at once (two admins) both read and republish the same letters,
        the stream stores each republish once, and the counts add up to the letters, even when a
        consumer fails a replayed message again while they run (deleting the record, or finding
        it replaced, could not tell the two replays apart: both counted it). A run again after
        one interrupted between republishing and deleting, within the stream's duplicate
        window, stores nothing (duplicates) but deletes and claims the leftovers: it counts
        those, whose replay the interrupted run never reported. (A claim outside the duplicate
        window, two minutes, is stored again: two replays of one letter that long apart each
        count it.)"""
        if not self._exists:
            return 0
        entries = (
            await self._scan(group, 2**62) if message_ids is None else await self._lookup(group, message_ids)
        )
        if not entries:
            return 0
        # The events stream keeps a message only while some consumer wants it: without the
        # group's consumer a replay would vanish along with the deleted dead letter.
        consumer = codec.name_token(group)
        await self._js.api(f"find group {group!r}", f"CONSUMER.INFO.{self._events_stream}.{consumer}")
        base = f"{self._prefix}.rp.{consumer}"
        await self._js.publish([self._replay_item(base, entry) for entry in entries])
        # Purged by subject up to the sequence read, not deleted by sequence: a consumer may
        # have dead-lettered the replayed message again meanwhile, which replaced the copy
        # read (one message per subject). Deleting that sequence then failed, and the replay
        # stopped half-way with an error though it had republished everything; purging up
        # to it keeps the new dead letter and succeeds whether or not the old copy is left.
        replayed = 0  # letters this call claimed
        for entry in entries:
            body_subject = entry.record_subject.replace(".dlr.", ".dlb.", 1)
            done = [(entry.record_subject, entry.record_sequence + 1), (body_subject, entry.body_sequence + 1)]
            if entry.parts:  # published before their record
                done.append((body_subject + ".>", entry.record_sequence))
            for subject, below in done:
                await self._js.api(
                    "delete a replayed dead letter", f"STREAM.PURGE.{self.name}", {"filter": subject, "seq": below}
                )
            replayed += await self._js.publish([self._claim_item(entry)])
        # The stream keeps the claims' ids (its duplicate window) without their messages.
        await self._js.api("delete replay claims", f"STREAM.PURGE.{self.name}", {"filter": self.claims})
        return replayed

    @property
    def claims(self) -> str:
        """``P.dlb._claims``: where a replay claims the letters it counts (three tokens, so no
        letter's subject; purged at the end of each replay, at most one message between)."""
        return f"{self._prefix}.dlb._claims"

    def _claim_item(self, entry: _Entry) -> Item:
        """The claim of the replayed ``entry``: stored once per record (its ``Nats-Msg-Id``),
        so of several replays that read the letter exactly one counts it."""
        return self.claims, b"", {codec.H_MSG_ID: f"claim-{self.name}-{entry.record_sequence}"}

    def _replay_item(self, base: str, entry: _Entry) -> Item:
        """The replay of ``entry``: to ``<base>.<type>.<id>``, with a dedupe key of its own -
        or, an id too long for a subject, to ``<base>.<type>.~h`` with the id in a header
        (:data:`~choreograph.transports._nats_codec.H_ID`) that must fit beside the body."""
        message = entry.letter.message
        dedupe = {codec.H_MSG_ID: f"replay-{self.name}-{entry.record_sequence}"}
        subject = f"{base}.{codec.type_tokens(message.type)}.{codec.name_token(message.id, hash_long=False)}"
        if len(subject) <= codec.MAX_SUBJECT:
            return subject, message.body, dedupe
        headers = {codec.H_ID: codec.name_token(message.id, hash_long=False), **dedupe}
        room = self._js.nc.max_payload
        if len(message.body) + codec.header_size(headers) > room:
            del headers[codec.H_MSG_ID]  # the dedupe key may go, the id may not
            if len(message.body) + codec.header_size(headers) > room:
                raise TransportError(
                    f"nats: replay of {message.id[:60]!r}...: its id and body do not fit the server's max_payload"
                )
        return codec.message_subject(base, message.type), message.body, header_block(headers)

    async def purge(self, group: str, message_ids: Collection[str] | None) -> int:
        if not self._exists:
            return 0
        targets: list[str | None] = [None] if message_ids is None else list(message_ids)
        purged = 0
        for target in targets:
            for kind in ("dlr", "dlb"):  # records first: a body without its record is invisible
                subjects = self._subjects(kind, group, target)
                if kind == "dlb" and target is not None:  # and the further parts of a long record
                    subjects += [subject + ".>" for subject in subjects]
                for subject in subjects:
                    response = await self._js.api(
                        "purge dead letters", f"STREAM.PURGE.{self.name}", {"filter": subject}
                    )
                    if kind == "dlr":
                        purged += int(response.get("purged", 0))
        return purged
