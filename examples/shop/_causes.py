"""How a compensation says why it ran: one line from whatever triggered it."""

from __future__ import annotations

from choreograph import Event, Failure
from choreograph.sagas import TimedOut


def describe(cause: Event | Failure) -> str:
    if isinstance(cause, Failure):
        error = cause.record.get("last_error") or {}
        who = cause.record.get("service", "?")
        return f"{who} gave up on {cause.envelope.type} ({cause.reason}): {error.get('message', '')}".strip()
    if isinstance(cause, TimedOut):
        return f"the order passed its deadline {cause.deadline}"
    return f"{type(cause).__name__}: {cause.model_dump_json()}"
