"""Deferrals on NATS: the ``<prefix>_DEFER`` stream, so that ``defer`` keeps the attempt.

JetStream counts a consumer's deliveries of a message itself (``num_delivered``), and that
count is the attempt a delivery reports; a NAK - the only way to have a message delivered
again later - adds one. ``Delivery.defer`` must not spend an attempt, so before its NAK it
writes how many of the group's deliveries of the message so far were deferrals, and a
redelivery reports ``num_delivered - deferrals``::

    stream P_DEFER   P.df.<group>.<seq>   {"deferrals": d, "delivered": n, "events": t}: of
                                          the group's first n deliveries of stream message
                                          <seq>, d were deferred (the n-th last); t is when
                                          the events stream was created
                     one message per subject (a deferral replaces the last), max age
                     MAX_AGE, the bus's replicas

* **The common path pays nothing.** A first delivery has nothing to look up; only a
  redelivery (``num_delivered > 1``: retries, lease expiries, deferrals) reads its entry,
  and only a delivery whose count it found deletes it when settled.
* **A count, not an increment.** A delivery knows its ``num_delivered`` and the deferrals it
  read, so a deferral writes their sum plus one: no read-modify-write, and a second call (the
  first one's NAK failed) writes the same entry again.
* **Written before the NAK, and confirmed** (the stream's PubAck: by a quorum of its
  replicas), so the redelivery finds it whichever process of the group gets it. It is read
  from the stream's leader (``STREAM.MSG.GET``; a direct get may be answered by a follower
  that has not caught up). A write that fails is logged and the NAK sent anyway: the
  attempt counts, the message is not held up. A read that fails reports ``num_delivered``.
* **Stale entries do not apply.** An entry applies to a delivery after its n-th only, of
  the events stream it was written for: one left by an events stream deleted and created
  again (its sequences start over; its creation time differs) is ignored.
* **Deleted when settled** (ack, dead letter; in the background, best effort). What is left
  behind - a process killed in between, a copy settled by a holder whose lease had run out,
  a message of an unbound type skipped - goes after ``MAX_AGE``; a message settled more than
  ``MAX_AGE`` after its last deferral counts its deferrals again.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from choreograph.policy import MAX_RETRY_DELAY
from choreograph.transports import _nats_codec as codec
from choreograph.transports._nats_client import JetStream

#: How long an entry is kept after its deferral: past any retry's wait (``MAX_RETRY_DELAY``).
MAX_AGE = 2 * MAX_RETRY_DELAY + 2 * 24 * 3600.0  # 30 days
#: "no message found" (``STREAM.MSG.GET``): the message was never deferred.
ERR_NO_MESSAGE = 10037

_SECOND = 1_000_000_000  # JetStream durations are nanoseconds


class Deferrals:
    """The deferral counts of the bus with ``prefix``."""

    def __init__(self, js: JetStream, prefix: str, events_created: str) -> None:
        self._js = js
        self._base = f"{prefix}.df"
        self._events = events_created  # the creation time of the events stream (its incarnation)
        self.name = f"{prefix}_DEFER"

    @staticmethod
    def config(prefix: str, replicas: int) -> dict[str, Any]:
        return {
            "name": f"{prefix}_DEFER",
            "subjects": [f"{prefix}.df.>"],
            "retention": "limits",
            "max_msgs_per_subject": 1,
            "max_age": int(MAX_AGE) * _SECOND,
            "discard": "old",
            "storage": "file",
            "num_replicas": replicas,
        }

    def _subject(self, consumer: str, sequence: int) -> str:
        return f"{self._base}.{consumer}.{sequence}"

    async def write(self, consumer: str, sequence: int, deferrals: int, delivered: int) -> None:
        """Of ``consumer``'s first ``delivered`` deliveries of ``sequence``, ``deferrals`` were
        deferred; returns once the stream has it (raises :class:`TransportError` if not)."""
        data = json.dumps({"deferrals": deferrals, "delivered": delivered, "events": self._events}).encode()
        await self._js.publish([(self._subject(consumer, sequence), data, None)])

    async def count(self, consumer: str, sequence: int, delivered: int) -> int:
        """How many of ``consumer``'s ``delivered`` deliveries of ``sequence`` were deferrals
        (0: none written, or an entry that cannot be this message's); raises
        :class:`TransportError` if the stream cannot be read."""
        try:
            response = await self._js.api(
                "read a deferral count", f"STREAM.MSG.GET.{self.name}", {"last_by_subj": self._subject(consumer, sequence)}
            )
        except codec.JetStreamError as exc:
            if exc.err_code == ERR_NO_MESSAGE:
                return 0
            raise
        entry = json.loads(base64.b64decode(response["message"]["data"]))
        deferrals, at = int(entry["deferrals"]), int(entry["delivered"])
        if entry.get("events") != self._events:
            return 0  # a message of an events stream deleted since
        # Written at the at-th delivery, so only a later one may use it; and at most every one
        # of those was deferred (an attempt never drops below 1).
        return deferrals if at < delivered and 0 <= deferrals <= at else 0

    async def forget(self, consumer: str, sequence: int) -> None:
        """Delete the entry of ``sequence`` (settled for good)."""
        await self._js.api(
            "delete a deferral count", f"STREAM.PURGE.{self.name}", {"filter": self._subject(consumer, sequence)}
        )
