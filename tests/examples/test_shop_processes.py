"""The shop as real processes (``choreograph dev`` on a SQLite bus, the journal a process of its own)."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from examples.shop.app import app
from examples.shop.events import OrderPlaced

from choreograph import Publisher
from choreograph.cli._dev import prepare
from choreograph.transports import open_transport
from tests.examples._system import DevSystem

SHOP = "examples.shop.app:app"


def rows(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a SQLite file another process writes; none while it or the table is not there yet."""
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def wait_until(what: str, found: Callable[[], bool], timeout: float = 60.0) -> None:
    give_up = time.monotonic() + timeout
    while not found():
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def test_an_order_shipped_while_the_orders_service_is_down_is_not_refunded_when_the_journal_times_it_out(
    tmp_path: Path,
) -> None:
    """Payment, inventory and shipping run, the orders service does not: the order is dispatched
    but has no terminal event, and the journal (``--stuck-after 1``: an order placed without a
    deadline, as ``choreograph publish`` does, times out after it) announces ``choreograph.timedout``.
    Payment refunded it and inventory released its units, for a parcel sent; once the orders
    service ran, it recorded the order shipped, paid for by nobody."""
    data_dir = tmp_path / "shop"
    bus = f"sqlite:///{data_dir / 'bus.db'}?lease=2"
    journal_store = f"sqlite:///{data_dir / 'journal.db'}"
    journal = f"journal={sys.executable} -m choreograph journal {SHOP} --broker {bus} --store {journal_store} --stuck-after 1"
    data_dir.mkdir(parents=True)
    groups = [(service.group, sorted(service.subscriptions)) for service in app.services]
    asyncio.run(prepare(bus, groups, journal_store=journal_store))  # the orders group keeps what it misses

    async def place() -> str:
        async with open_transport(bus) as transport:
            [env] = await Publisher(transport, source="/test").publish(
                OrderPlaced(order_id="o-p1", customer="alice", sku="widget", qty=1, amount=10_00)
            )
            return env.id

    def pending(group: str) -> int:
        return int(rows(data_dir / "bus.db", "SELECT count(*) FROM deliveries WHERE grp = ?", group)[0][0])

    def summary() -> tuple[Any, ...] | None:
        found = rows(data_dir / "journal.db",
                     "SELECT timed_out, terminal_kind FROM journal_transactions WHERE correlation_id = ?", cid)
        return found[0] if found else None

    dev = DevSystem(data_dir, app=SHOP, args=["--no-gateway", "--no-journal", "--proc", journal,
                                              "--only", "payment", "--only", "inventory", "--only", "shipping"])
    try:
        dev.start()
        cid = asyncio.run(place())
        wait_until("shipping dispatched the order",
                   lambda: rows(data_dir / "shipping.db", "SELECT order_id FROM shipments") == [("o-p1",)])
        wait_until("the journal timed the order out", lambda: (summary() or (0,))[0] == 1)
        wait_until("payment and inventory handled everything",
                   lambda: pending("payment") == pending("inventory") == 0)
    finally:
        assert dev.stop() == 0, dev.log
    assert rows(data_dir / "payment.db", "SELECT status FROM payments WHERE order_id = 'o-p1'") == [("captured",)]
    assert rows(data_dir / "inventory.db", "SELECT status FROM reservations WHERE order_id = 'o-p1'") == [("reserved",)]
    assert rows(data_dir / "payment.db", "SELECT balance FROM balances WHERE customer = 'alice'") == [(100_00 - 10_00,)]

    dev = DevSystem(data_dir, app=SHOP, args=["--no-gateway", "--no-journal", "--proc", journal])
    try:
        dev.start()
        wait_until("the orders service recorded the order",
                   lambda: rows(data_dir / "orders.db", "SELECT status FROM orders WHERE order_id = 'o-p1'") != [])
        wait_until("the journal saw its end", lambda: (summary() or (0, None))[1] is not None)
        wait_until("payment handled everything", lambda: pending("payment") == 0)
    finally:
        assert dev.stop() == 0, dev.log
    assert rows(data_dir / "orders.db", "SELECT status FROM orders WHERE order_id = 'o-p1'") == [("shipped",)]
    assert summary() == (1, "completed")
    assert rows(data_dir / "payment.db", "SELECT status FROM payments WHERE order_id = 'o-p1'") == [("captured",)]
