"""The examples' table helper: a service's tables and seed, applied in its own transaction.

Shared by the Drone Delivery and shop examples (copy it into your own service if you like).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from choreograph.runtime.outbox import Transaction


class Schema:
    """A service's tables (``CREATE ... IF NOT EXISTS``) and an optional seed, applied in its transaction.

    ``await schema.ensure(tx)`` at the start of each transaction: once the tables exist
    the statements are no-ops (microseconds on SQLite). It runs in the handler's own
    transaction rather than once per process because a first transaction that rolls
    back (a ``Reject``, a ``Retry``) takes its DDL with it, and the next one must create
    the tables again. ``seed(tx)`` runs while ``probe`` (a table) is empty.
    """

    def __init__(
        self,
        *statements: str,
        seed: Callable[[Transaction], Awaitable[None]] | None = None,
        probe: str | None = None,
    ) -> None:
        if seed is not None and probe is None:
            raise ValueError("a seed needs the table that shows whether it ran (probe=)")
        self.statements = statements
        self.seed = seed
        self.probe = probe

    async def ensure(self, tx: Transaction) -> None:
        for statement in self.statements:
            await tx.execute(statement)
        if self.seed is not None and await tx.fetchval(f"SELECT 1 FROM {self.probe} LIMIT 1") is None:
            await self.seed(tx)
