"""What the worker passes along for a delivery: its handler call (:class:`_Call`), its
outcome (:class:`_Done`, :class:`_Again`, :class:`_Dead`), and a service's counters
(:class:`Stats`).

Plain values: the runner (``_runner``) makes them, its verdicts (``_verdicts``) decide
which, and the settle loop (``_settling``) publishes, marks, acks, retries or dead-letters
them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from typing import Any

import msgspec

from choreograph._envelope import Envelope
from choreograph.context import Context
from choreograph.runtime.outbox import HandlerUnit
from choreograph.service import Handler
from choreograph.transports.base import Delivery, Message


class _Done(msgspec.Struct):
    delivery: Delivery
    messages: list[Message]
    mark: bool  # record in the inbox (False for events this service ignores)


class _Again(msgspec.Struct):
    delivery: Delivery
    after: float
    #: put off, not tried (a timer not due, a copy of an event in hand): ``defer``, attempt kept
    deferred: bool = False


class _Dead(msgspec.Struct):
    delivery: Delivery
    record: dict[str, Any]
    failure: Message | None


_Outcome = _Done | _Again | _Dead


class _Call(msgspec.Struct):
    """One handler run: what it handles and the coroutine that runs it."""

    delivery: Delivery
    envelope: Envelope
    handler: Handler
    ctx: Context
    unit: HandlerUnit | None
    now: float  # clock time when handling began (records)
    coro: Coroutine[Any, Any, Any]
    started: float = 0.0  # loop time when its task began (timeout): set by _start for a task only
    #: on a test's clock (a VirtualClock): the clock's time its timeout runs from, once it ran
    #: (its waits for the database excluded): what a rerun in place starts from (see _guarded)
    clock_started: float | None = None
    outcome: _Outcome | None = None  # a success, left by _run for its task to settle (see _handle)


@dataclasses.dataclass
class Stats:
    """Counters of one service's worker (for tests, reports and metrics)."""

    handled: int = 0
    duplicates: int = 0
    deferred: int = 0
    ignored: int = 0
    handed_back: int = 0  # of a type this version does not subscribe to: left for a replica that does
    filtered: int = 0  # acked unhandled: the handler's where= did not match
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0


Stats.__module__ = "choreograph.runtime.worker"  # public there (and in choreograph.runtime)
