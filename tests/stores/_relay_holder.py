"""A process that takes a service's relay claim and hangs in the middle of publishing.

    python -m tests.stores._relay_holder DATABASE_URL SERVICE

Prints ``publishing <ids>`` once its relay pass is publishing, then waits forever with
the claim held (SQLite: the claim's lock and lease; PostgreSQL: the claim row locked in
the pass's transaction). The test kills it with SIGKILL or leaves it hanging.
"""

from __future__ import annotations

import asyncio
import sys

from choreograph.stores.state import open_database
from choreograph.transports.base import Message


async def main(url: str, service: str) -> None:
    async with open_database(url) as db:

        async def publish(messages: list[Message]) -> None:
            print("publishing", " ".join(m.id for m in messages), flush=True)
            await asyncio.Event().wait()

        await db.relay_pass(service, "hanging-holder", 100, publish)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
