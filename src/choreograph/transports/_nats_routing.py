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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from choreograph.transports.base import narrowed, widened

#: Seconds between a subscription's reads of its group's consumer: to learn of an unbind
#: made elsewhere, and to narrow the filter once what the group held is settled.
REMOVAL_CHECK = 1.0


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
