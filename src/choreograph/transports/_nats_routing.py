"""What a group's consumer still holds of the types unbound from it: :class:`Binding`.

JetStream delivers nothing outside a consumer's filter, so narrowing the filter at the
unbind would drop what the group held of the removed types: deliveries not yet settled,
and events published before the unbind but not yet delivered. The contract keeps them
(the runtime hands them back, then dead-letters them as unhandled). So ``unbind`` keeps a
removed type's subject in the filter and records the stream sequence it read just before
narrowing - the type's *line* - and every subscription of the group

* delivers an event of the type at or below the line as any other;
* acks and skips one above it: it was published after the unbind;
* every :data:`REMOVAL_CHECK` seconds reads the consumer (:func:`settled`): once nothing at
  or below a line is unsettled, the type's subject leaves the filter and its line the record.

A subscribe that binds the type again (widening) drops its line. The lines are kept with
the consumer (see ``_nats_consumers``), so every process sees them; a subscription running
in another process than the unbind learns of it at its next check, and until then takes
the events of the removed type as before (the runtime hands them back if it does not
handle them; they come back and are skipped). ``unbind`` narrows at once what nothing is
held of (:meth:`Binding.without`): a type with no event left in the stream, or every line
when the consumer's ack floor passed it or the consumer holds nothing at all - so a group
with no running subscription (nobody to check) need not keep the type.

An unsettled event *above* a line does not hold it (the ack floor passes the line without
it): one a subscription took before it learned of the unbind and handed back, or one it
NAKed back on close. From 2.10 JetStream redelivers such a message after the filter
narrowed (a message a consumer sent is its own until settled; the stream keeps it while
another group holds it, interest retention drops it otherwise), and before 2.10 the filter
never narrows: either way it comes back of a type neither bound nor removed, and the
subscription reads the group's types again before it skips it (``_nats_pull``). A
subscribe binding the type again before it comes back has it delivered.

**Racing writes.** A consumer's config has no compare-and-set: every writer (subscribe,
unbind, a subscription's narrowing) reads it, changes it and writes it whole, so a write
computed from a read that another write then overtook undoes that other write - a
narrowing landing over a subscribe that bound its type again unbinds it, one landing over
an unbind binds its types again. ``subscribe`` reads once more after writing (and writes
again if its types are gone), which leaves a racing write landing after that read. So
every write stamps the config with a *lineage* (``_nats_consumers.lineage``): a stamp of
its own, then those of the writes it was computed from. A subscription keeps the stamp its
subscribe found its types bound under and follows the lineage at each check; a check that
finds types it asked for dropped by a config not descended from what it saw last - a write
computed from an older read - binds them again, with a warning. An unbind made after the
subscribe descends from it: it stands. What is left:

* events of the dropped types published between the overwrite and the repair (up to
  :data:`REMOVAL_CHECK`) may not reach the group, though its subscribe had returned;
* a subscription for every type (a wildcard group has nothing else to check) checks for
  :data:`BIND_CONFIRM` seconds after its subscribe wrote the consumer, not after; before
  2.10 its description (``types: null``) keeps no lineage, so it repairs nothing; nor does
  a closed subscription: the group stays as the racing write left it until it subscribes
  again;
* an unbind undone by a write that overtook it is not repaired: the types stay bound
  (their events handed back, then dead-lettered - nothing lost), which ``groups()`` shows
  (the unbind's return value, read right after its write, may not);
* more than ``LINEAGE`` (64) writes between two checks, one by a choreograph without
  lineages, or (before 2.10) a description with no room for the lineage beside the types,
  break the chain: a later unbind of the subscription's types is then taken for a race
  and undone.

Closing it fully needs a compare-and-set JetStream does not offer for a consumer's config
(a lock kept in a stream through per-subject expected sequences would be one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from choreograph.transports.base import narrowed, widened

#: Seconds between a subscription's reads of its group's consumer: to learn of an unbind
#: made elsewhere, and to narrow the filter once what the group held is settled.
REMOVAL_CHECK = 1.0
#: Seconds a wildcard group's subscription checks its consumer after its subscribe wrote it
#: (a list group's checks while it runs): to bind every type again if a racing write undid it.
BIND_CONFIRM = 10.0


@dataclasses.dataclass(frozen=True)
class Binding:
    """A group's binding as its consumer keeps it: ``types`` (``None``: every type), and the
    types unbound from it whose events up to a stream sequence (their line) it still holds."""

    types: frozenset[str] | None
    removed: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def widened(self, wanted: frozenset[str] | None) -> Binding:
        """Subscribed for ``wanted`` too: a removed type bound again is no longer removed."""
        types = widened(self.types, wanted)
        if types is None:
            return Binding(None)
        return Binding(types, {t: line for t, line in self.removed.items() if t not in types})

    def unbound(self, group: str, types: Collection[str], line: int) -> Binding:
        """``types`` unbound, at stream sequence ``line``; a wildcard group is a
        ``ConfigurationError`` (see :func:`~choreograph.transports.base.narrowed`)."""
        bound = narrowed(group, self.types, types)
        assert self.types is not None  # narrowed refuses a wildcard group
        return Binding(bound, {**self.removed, **dict.fromkeys(self.types - bound, line)})

    def without(self, types: Collection[str]) -> Binding:
        """Without the lines of ``types``: nothing at or below them is held any more, so their
        subjects leave the filter now."""
        kept = {t: line for t, line in self.removed.items() if t not in types}
        return self if len(kept) == len(self.removed) else Binding(self.types, kept)

    @property
    def held(self) -> frozenset[str] | None:
        """The types the consumer takes: bound or still held (``None``: every type)."""
        return None if self.types is None else self.types | self.removed.keys()


def settled(binding: Binding, info: Mapping[str, Any]) -> Binding:
    """``binding`` without the lines under which nothing is unsettled any more, read from
    the consumer's ``info``: its ack floor passed the line, or it has nothing pending at all
    (the ack floor stays below a line no later event of the consumer's reached)."""
    if not binding.removed:
        return binding
    floor = int((info.get("ack_floor") or {}).get("stream_seq") or 0)
    idle = not info.get("num_ack_pending") and not info.get("num_pending")
    return binding.without([t for t, line in binding.removed.items() if idle or floor >= line])
