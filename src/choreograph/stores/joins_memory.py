"""Join instances in process memory (tests, ``memory://`` runs).

Every method runs without awaiting, so on one event loop each call is atomic: two
arrivals handled concurrently cannot both complete a join.
"""

from __future__ import annotations

import dataclasses

from choreograph.stores.joins_base import Arrival, JoinKey, JoinState, JoinStore


@dataclasses.dataclass(slots=True)
class _Instance:
    slots: int
    created_by: str
    created_at: float
    deadline: float | None
    arrivals: dict[int, Arrival] = dataclasses.field(default_factory=dict)
    fired_by: str | None = None
    timed_out: bool = False

    def state(self) -> JoinState:
        return JoinState(self.slots, dict(self.arrivals), self.created_by, self.created_at, self.deadline,
                         self.fired_by, self.timed_out)


class MemoryJoinStore(JoinStore):
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._instances: dict[JoinKey, _Instance] = {}

    async def arrive(
        self, key: JoinKey, slot: int, arrival: Arrival, *, slots: int, now: float, deadline: float | None
    ) -> JoinState:
        instance = self._instances.get(key)
        if instance is None:
            instance = self._instances[key] = _Instance(slots, arrival.event_id, now, deadline)
        if not instance.timed_out and instance.fired_by is None:
            instance.arrivals.setdefault(slot, arrival)
            if len(instance.arrivals) == instance.slots:
                instance.fired_by = arrival.event_id
        return instance.state()

    async def get(self, key: JoinKey) -> JoinState | None:
        instance = self._instances.get(key)
        return None if instance is None else instance.state()

    async def time_out(self, key: JoinKey) -> JoinState | None:
        instance = self._instances.get(key)
        if instance is None:
            return None
        if instance.fired_by is None:
            instance.timed_out = True
        return instance.state()

    async def expire(self, older_than: float) -> int:
        old = [key for key, instance in self._instances.items() if instance.created_at < older_than
               and (instance.deadline is None or instance.deadline < older_than)]
        for key in old:
            del self._instances[key]
        return len(old)
