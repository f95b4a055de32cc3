"""The shop saga end to end, in one process and virtual time: every outcome, every compensation.

Each order runs through the real services, each writing its own SQLite database in a
temporary directory through ``ctx.transaction()`` (its outputs leave through the outbox
relay), on the memory bus, with the journal watching; the assertions are about money,
stock and how each order ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import examples.shop.orders
import pydantic
import pytest
from examples.shop.app import app
from examples.shop.events import (
    OrderCancelled,
    OrderPlaced,
    OrderRejected,
    OrderShipped,
    PaymentRefunded,
    ShipmentDispatched,
    StockReleased,
)
from examples.shop.inventory import STOCK
from examples.shop.payment import BALANCES

from choreograph import Publisher, Service, Worker
from choreograph._envelope import decode
from choreograph.faults import Faults, FaultSpec
from choreograph.journal import Journal
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports.base import Message


class SpyBus(MemoryTransport):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.published: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.published.extend(messages)
        await super().publish(messages)

    def data(self, type_: str, order_id: str) -> list[dict[str, object]]:
        found = [decode(m.body).data for m in self.published if m.type == type_]
        return [d for d in found if d.get("order_id") == order_id]


class Shop:
    def __init__(self, bus: SpyBus, clock: VirtualClock, journal: Journal, data: Path) -> None:
        self.bus, self.clock, self.journal, self.data = bus, clock, journal, data
        self.worker: Worker | None = None

    async def drained(self, timeout: float = 20.0) -> None:
        """Nothing left on the bus and no outbox row unsent (the relays publish after each commit)."""
        worker = self.worker
        assert worker is not None
        give_up = asyncio.get_running_loop().time() + timeout
        while True:
            await settled(self.bus, timeout=timeout)
            before = _progress(worker)
            lags = [await worker.outbox.lag(name) for name in worker.outbox.relays]
            if all(lag.pending == 0 for lag in lags) and self.bus.pending() == (0, None) and _progress(worker) == before:
                return
            if asyncio.get_running_loop().time() > give_up:
                raise TimeoutError(f"not drained after {timeout}s: {lags}")
            await asyncio.sleep(0.005)

    async def order(self, order_id: str, customer: str, sku: str, qty: int, amount: int) -> str:
        [env] = await Publisher(self.bus, source="/test").publish(
            OrderPlaced(order_id=order_id, customer=customer, sku=sku, qty=qty, amount=amount),
            deadline=timedelta(minutes=5),
        )
        await self.drained()
        return env.id

    def query(self, db: str, sql: str, *args: object) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(self.data / f"{db}.db")
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def balance(self, customer: str) -> int:
        return int(self.query("payment", "SELECT balance FROM balances WHERE customer = ?", customer)[0][0])

    def stock(self, sku: str) -> int:
        return int(self.query("inventory", "SELECT available FROM stock WHERE sku = ?", sku)[0][0])

    def ends(self, order_id: str) -> list[str]:
        """The terminal events published for an order."""
        return [
            t.__name__
            for t in (OrderShipped, OrderCancelled)
            for _ in self.bus.data(t.event_type(), order_id)
        ]

    def count(self, cls: type, order_id: str) -> int:
        return len(self.bus.data(cls.event_type(), order_id))  # type: ignore[attr-defined]

    async def status(self, correlation_id: str) -> str:
        tx = await self.journal.transaction(correlation_id)
        assert tx is not None
        return tx.status


def _progress(worker: Worker) -> tuple[object, ...]:
    return (*dataclasses.astuple(worker.stats()), *(r.published for r in worker.outbox.relays.values()))


@pytest.fixture
async def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Shop]:
    for service in app.services:  # fresh databases per test (the URLs were fixed at import)
        monkeypatch.setattr(service, "database", f"sqlite:///{tmp_path / service.name}.db")
    monkeypatch.delenv("CHOREOGRAPH_FAULTS", raising=False)
    clock = VirtualClock()
    bus = SpyBus(clock)
    async with Journal.from_app(app, "memory://", transport=bus, scan_interval=3600) as journal:
        yield Shop(bus, clock, journal, tmp_path)


async def run(shop: Shop, services: Sequence[Service] = app.services) -> Worker:
    worker = Worker(services, shop.bus)
    await worker.start()
    shop.worker = worker
    return worker


async def run_without(shop: Shop, down: str) -> Worker:
    """Every service but ``down``, whose group is made first: what it would get waits for it."""
    await (await run(shop, [s for s in app.services if s.name == down])).stop()
    return await run(shop, [s for s in app.services if s.name != down])


async def time_out(shop: Shop, cid: str, worker: Worker) -> None:
    """The order of transaction ``cid`` passes its deadline: the journal times it out (the only one
    to), what that sets off runs, and ``worker`` stops."""
    shop.clock.advance(5 * 60 + 1)
    assert await shop.journal.check_deadlines() == [cid]
    await shop.drained()
    await worker.stop()


async def test_an_order_paid_for_and_in_stock_ships(shop: Shop) -> None:
    worker = await run(shop)
    cid = await shop.order("o-1", "alice", "widget", 2, 15_00)
    await worker.stop()
    assert shop.ends("o-1") == ["OrderShipped"]
    assert shop.balance("alice") == BALANCES["alice"] - 15_00
    assert shop.stock("widget") == STOCK["widget"] - 2
    assert shop.query("shipping", "SELECT order_id, sku, qty FROM shipments") == [("o-1", "widget", 2)]
    assert shop.count(PaymentRefunded, "o-1") == shop.count(StockReleased, "o-1") == 0
    assert shop.query("orders", "SELECT order_id, status FROM orders") == [("o-1", "shipped")]
    assert await shop.status(cid) == "completed"


async def test_an_order_the_orders_service_gives_up_recording_is_not_completed(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order is complete when the orders service recorded it, not when shipping dispatched
    it: the journal called an order completed whose row the orders service never wrote
    (``OrderShipped`` was shipping's output, the orders table a step after it)."""
    monkeypatch.setattr(examples.shop.orders, "faults", Faults("orders", FaultSpec(fail_rate=1.0)))
    worker = await run(shop)
    cid = await shop.order("o-7", "alice", "widget", 1, 10_00)
    await worker.stop()
    [letter] = await shop.bus.dead_letters("orders")
    assert letter.record["reason"] == "max_attempts"
    assert shop.query("orders", "SELECT name FROM sqlite_master WHERE name = 'orders'") == []  # no row written
    assert shop.ends("o-7") == []
    assert await shop.status(cid) == "failed"  # a failure nobody compensates: replay the dead letter


async def test_an_order_id_placed_again_with_another_body_is_rejected_and_leaves_the_first_order_as_it_was(
    shop: Shop,
) -> None:
    """``order_id`` is the order's idempotency key: the same body again is the same order
    (answered as before), another body under it is refused by payment and by inventory, each
    naming the fields. Payment and inventory answered the first order's decision, so an order
    for another amount was reported shipped; had only payment refused, inventory's release
    (on payment giving up) would have put the first order's shipped units back on the shelf.
    The refusal (``OrderRejected``) ends the refused transaction ``failed``: as a ``Reject`` it
    stayed running, then stuck (the cancellation it triggered did not stand)."""
    worker = await run(shop)
    await shop.order("o-10", "alice", "widget", 1, 10_00)
    again = await shop.order("o-10", "alice", "widget", 1, 10_00)  # a new event, the same body
    assert shop.ends("o-10") == ["OrderShipped", "OrderShipped"]
    other = await shop.order("o-10", "alice", "widget", 1, 99_00)
    await worker.stop()
    assert await shop.status(again) == "completed"
    assert await shop.status(other) == "failed"
    assert shop.ends("o-10") == ["OrderShipped", "OrderShipped"]
    refusals = [decode(m.body) for m in shop.bus.published if m.type == OrderRejected.event_type()]
    assert sorted(env.source for env in refusals) == ["/choreograph/inventory", "/choreograph/payment"]
    for env in refusals:
        assert env.correlationid == other
        message = str(env.data["reason"])
        assert "order_id 'o-10'" in message and "amount 9900 (first order: 1000)" in message, message
    assert await shop.bus.dead_letters("payment") == await shop.bus.dead_letters("inventory") == []
    assert shop.balance("alice") == BALANCES["alice"] - 10_00
    assert shop.stock("widget") == STOCK["widget"] - 1
    assert shop.count(PaymentRefunded, "o-10") == shop.count(StockReleased, "o-10") == 0
    assert shop.query("orders", "SELECT status FROM orders WHERE order_id = 'o-10'") == [("shipped",)]


async def test_an_order_id_placed_again_with_another_body_while_the_first_is_under_way_cancels_nothing(
    shop: Shop,
) -> None:
    """The refusal of another body was a ``Reject``: its ``failed(OrderPlaced)`` triggered the
    orders service's cancellation, keyed by order id, which recorded the first order cancelled
    while it waited for shipping. Shipping then dispatched it, charged and reserved, and orders,
    finding it cancelled, published no ``OrderShipped``: the first order never ended (running,
    then stuck) and the orders table said cancelled for a parcel sent."""
    worker = await run_without(shop, "shipping")  # shipping is behind
    first = await shop.order("o-15", "alice", "widget", 1, 10_00)
    other = await shop.order("o-15", "alice", "widget", 2, 10_00)
    await worker.stop()
    worker = await run(shop)
    await shop.drained()
    await worker.stop()
    assert shop.count(ShipmentDispatched, "o-15") == 1
    assert shop.query("orders", "SELECT status FROM orders WHERE order_id = 'o-15'") == [("shipped",)]
    assert shop.ends("o-15") == ["OrderShipped"]
    assert await shop.status(first) == "completed"
    assert await shop.status(other) == "failed"
    assert shop.balance("alice") == BALANCES["alice"] - 10_00 and shop.stock("widget") == STOCK["widget"] - 1
    assert shop.count(PaymentRefunded, "o-15") == shop.count(StockReleased, "o-15") == 0


async def test_a_repeat_of_a_shipped_order_that_times_out_refunds_and_releases_nothing(shop: Shop) -> None:
    """An order placed again with the same body (a client's retry) is a second transaction that
    payment and inventory answer with their first decision. When that one failed (here: shipping
    was down past its deadline, and refused it when back), the refund and the release, keyed by order id, undid the first
    order's charge and reservation: the money went back and the units onto the shelf for an
    order already shipped. Only the transaction that charged and reserved undoes them."""
    worker = await run(shop)
    await shop.order("o-11", "alice", "widget", 1, 10_00)
    await worker.stop()
    assert shop.ends("o-11") == ["OrderShipped"]
    worker = await run(shop, [s for s in app.services if s.name != "shipping"])  # shipping is down
    again = await shop.order("o-11", "alice", "widget", 1, 10_00)
    await time_out(shop, again, worker)
    worker = await run(shop)  # back, shipping refuses the repeat past its deadline: a shipping failure
    await shop.drained()
    await worker.stop()
    assert shop.count(ShipmentDispatched, "o-11") == 1
    assert shop.balance("alice") == BALANCES["alice"] - 10_00
    assert shop.stock("widget") == STOCK["widget"] - 1
    assert shop.query("payment", "SELECT status FROM payments WHERE order_id = 'o-11'") == [("captured",)]
    assert shop.query("inventory", "SELECT status FROM reservations WHERE order_id = 'o-11'") == [("reserved",)]
    assert shop.count(PaymentRefunded, "o-11") == shop.count(StockReleased, "o-11") == 0
    assert shop.ends("o-11") == ["OrderShipped"]


async def test_an_order_placed_before_the_upgrade_is_not_claimed_by_a_later_body(shop: Shop) -> None:
    """Payment and inventory databases created by the previous version have orders but no
    ``placed_orders``. An order id of theirs placed again with another body recorded that body
    and its transaction as the order's first: the client's retry of the real order (the body
    that was charged and reserved) was then refused as a conflict with a body nobody paid for,
    and the later transaction owned the first one's charge and reservation."""
    worker = await run(shop)
    await shop.order("o-12", "alice", "widget", 1, 10_00)
    await worker.stop()
    for db in ("payment", "inventory"):  # as the previous version left them
        conn = sqlite3.connect(shop.data / f"{db}.db")
        conn.execute("DROP TABLE placed_orders")
        conn.commit()
        conn.close()
    worker = await run(shop)
    await shop.order("o-12", "alice", "widget", 1, 99_00)  # answered as before the upgrade
    retry = await shop.order("o-12", "alice", "widget", 1, 10_00)
    await worker.stop()
    assert await shop.status(retry) == "completed"
    for service in ("payment", "inventory"):
        assert await shop.bus.dead_letters(service) == []
        assert shop.query(service, "SELECT * FROM placed_orders") == []
    assert shop.balance("alice") == BALANCES["alice"] - 10_00
    assert shop.stock("widget") == STOCK["widget"] - 1


async def test_a_declined_payment_releases_the_reserved_stock_and_cancels_the_order(shop: Shop) -> None:
    worker = await run(shop)
    cid = await shop.order("o-2", "bob", "widget", 1, 50_00)
    await worker.stop()
    assert shop.ends("o-2") == ["OrderCancelled"]
    assert shop.balance("bob") == BALANCES["bob"]
    assert shop.stock("widget") == STOCK["widget"]
    assert shop.count(StockReleased, "o-2") == 1 and shop.count(PaymentRefunded, "o-2") == 0
    assert await shop.status(cid) == "compensated"


async def test_an_order_out_of_stock_refunds_the_payment_and_cancels_the_order(shop: Shop) -> None:
    worker = await run(shop)
    cid = await shop.order("o-3", "alice", "gadget", 5, 30_00)
    await worker.stop()
    assert shop.ends("o-3") == ["OrderCancelled"]
    assert shop.balance("alice") == BALANCES["alice"]
    assert shop.stock("gadget") == STOCK["gadget"]
    assert shop.count(PaymentRefunded, "o-3") == 1 and shop.count(StockReleased, "o-3") == 0
    assert await shop.status(cid) == "compensated"


async def test_a_declined_order_out_of_stock_is_cancelled_once_with_nothing_to_undo(shop: Shop) -> None:
    worker = await run(shop)
    cid = await shop.order("o-4", "bob", "gadget", 5, 50_00)
    await worker.stop()
    assert shop.ends("o-4") == ["OrderCancelled"]
    assert shop.count(PaymentRefunded, "o-4") == shop.count(StockReleased, "o-4") == 0
    assert await shop.status(cid) == "failed"


async def test_a_shipping_failure_refunds_releases_and_cancels(shop: Shop) -> None:
    worker = await run(shop)
    cid = await shop.order("o-5", "alice", "oversize-sofa", 1, 80_00)
    await worker.stop()
    assert shop.ends("o-5") == ["OrderCancelled"]
    assert shop.balance("alice") == BALANCES["alice"]
    assert shop.stock("oversize-sofa") == STOCK["oversize-sofa"]
    assert shop.count(PaymentRefunded, "o-5") == shop.count(StockReleased, "o-5") == 1
    [letter] = await shop.bus.dead_letters("shipping")
    assert letter.record["reason"] == "rejected"
    assert await shop.status(cid) == "compensated"


async def test_an_amount_the_payments_table_cannot_hold_is_refused_at_the_edge_and_the_largest_declined(
    shop: Shop,
) -> None:
    """``amount`` had no upper bound: 2**63 cents passed validation, then every attempt to
    charge it failed binding a 64-bit integer, and after ten the order was cancelled with a
    dead letter saying ``OverflowError``. It is refused where it comes in, naming the field."""
    with pytest.raises(pydantic.ValidationError) as refused:
        OrderPlaced(order_id="o-big", customer="carol", sku="widget", qty=1, amount=2**63)
    assert [error["loc"] for error in refused.value.errors()] == [("amount",)]
    worker = await run(shop)
    await shop.order("o-max", "carol", "widget", 1, 2**63 - 1)
    await worker.stop()
    assert shop.ends("o-max") == ["OrderCancelled"]
    assert await shop.bus.dead_letters("payment") == []
    assert shop.balance("carol") == BALANCES["carol"] and shop.stock("widget") == STOCK["widget"]


@pytest.mark.parametrize("field", ["order_id", "customer", "sku"])
def test_a_nul_character_in_an_order_is_refused_at_the_edge_naming_the_field(field: str) -> None:
    """PostgreSQL's text cannot hold U+0000 (``invalid byte sequence for encoding "UTF8": 0x00``):
    with ``SHOP_DATABASE_<SERVICE>`` on PostgreSQL, an order carrying one failed every attempt of
    payment and inventory, then of the orders service's cancellation (a compensation that cannot
    run: ``compensation_failed``). It is refused where it comes in, as ``choreograph publish
    --schema`` and the gateway validate it."""
    body = {"order_id": "o-nul", "customer": "alice", "sku": "widget", "qty": 1, "amount": 100}
    with pytest.raises(pydantic.ValidationError) as refused:
        OrderPlaced(**{**body, field: body[field] + "\x00"})  # type: ignore[arg-type]
    [error] = refused.value.errors()
    assert error["loc"] == (field,) and "NUL" in error["msg"]


async def test_an_order_past_its_deadline_is_undone_when_shipping_refuses_it(shop: Shop) -> None:
    """Shipping was down while the deadline passed. The journal's ``choreograph.timedout``
    undoes nothing (only shipping knows whether the parcel left); back, shipping finds the join
    complete and refuses the order past its deadline, which refunds, releases and cancels it,
    once each. (Before it checked the deadline it dispatched it anyway: a parcel out for an
    order whose money had gone back on the timeout.)"""
    worker = await run_without(shop, "shipping")
    cid = await shop.order("o-9", "alice", "widget", 1, 10_00)
    await time_out(shop, cid, worker)
    assert shop.balance("alice") == BALANCES["alice"] - 10_00 and shop.stock("widget") == STOCK["widget"] - 1
    assert shop.ends("o-9") == []
    worker = await run(shop)
    await shop.drained()
    await worker.stop()
    assert shop.count(ShipmentDispatched, "o-9") == 0
    [letter] = await shop.bus.dead_letters("shipping")
    assert letter.record["reason"] == "rejected"
    assert shop.ends("o-9") == ["OrderCancelled"]
    assert shop.balance("alice") == BALANCES["alice"] and shop.stock("widget") == STOCK["widget"]
    assert shop.count(PaymentRefunded, "o-9") == shop.count(StockReleased, "o-9") == 1
    assert await shop.status(cid) == "compensated"


async def test_an_order_dispatched_before_its_deadline_is_not_refunded_when_orders_records_it_late(
    shop: Shop,
) -> None:
    """Shipping dispatched the order; the orders service, down, had not recorded it (no terminal
    event yet) when the deadline passed. The journal's ``choreograph.timedout`` refunded the
    payment and released the stock of the parcel sent (and, had orders heard it first, cancelled
    the order); back, orders recorded it shipped. Shipping owns the deadline: the timeout undoes
    nothing, and the order is shipped, paid for and its units taken."""
    worker = await run_without(shop, "orders")
    cid = await shop.order("o-14", "alice", "widget", 1, 10_00)
    assert shop.count(ShipmentDispatched, "o-14") == 1
    await time_out(shop, cid, worker)
    worker = await run(shop)
    await shop.drained()
    await worker.stop()
    assert shop.count(PaymentRefunded, "o-14") == shop.count(StockReleased, "o-14") == 0
    assert shop.balance("alice") == BALANCES["alice"] - 10_00 and shop.stock("widget") == STOCK["widget"] - 1
    assert shop.query("payment", "SELECT status FROM payments WHERE order_id = 'o-14'") == [("captured",)]
    assert shop.query("orders", "SELECT status FROM orders WHERE order_id = 'o-14'") == [("shipped",)]
    assert shop.ends("o-14") == ["OrderShipped"]
    assert await shop.status(cid) == "completed"


async def test_an_order_has_one_terminal_event_the_one_its_row_says_when_orders_hears_both_ends(shop: Shop) -> None:
    """The orders service was down while the order was dispatched and its deadline passed:
    back, it finds both ``ShipmentDispatched`` and a cancellation. The first outcome stands
    in its table; each handler published its terminal event all the same (two ends, one
    of them contradicting the row)."""
    worker = await run_without(shop, "orders")
    cid = await shop.order("o-8", "alice", "widget", 1, 10_00)
    await time_out(shop, cid, worker)
    assert shop.ends("o-8") == []  # orders is down: nothing ended the order yet
    worker = await run(shop)
    await shop.drained()
    await worker.stop()
    [(status,)] = shop.query("orders", "SELECT status FROM orders WHERE order_id = ?", "o-8")
    assert shop.ends("o-8") == [{"shipped": "OrderShipped", "cancelled": "OrderCancelled"}[str(status)]]


async def test_money_and_stock_are_conserved_and_every_order_ends_once(shop: Shop) -> None:
    worker = await run(shop)
    customers = ["alice", "bob", "carol", "nobody"]
    skus = ["widget", "gadget", "oversize-sofa", "unknown"]
    orders = [
        (f"m-{n}", customers[n % 4], skus[(n // 4) % 4], 1 + n % 3, 5_00 + 7_00 * (n % 5)) for n in range(48)
    ]
    publisher = Publisher(shop.bus)
    for order_id, customer, sku, qty, amount in orders:
        await publisher.publish(
            OrderPlaced(order_id=order_id, customer=customer, sku=sku, qty=qty, amount=amount)
        )
    await shop.drained()
    await worker.stop()
    ends = [shop.ends(order_id) for order_id, *_ in orders]
    assert all(len(end) == 1 for end in ends)
    assert ends.count(["OrderShipped"]) >= 5 and ends.count(["OrderCancelled"]) >= 5  # both outcomes occur
    captured = shop.query(
        "payment", "SELECT coalesce(sum(amount), 0) FROM payments WHERE status = 'captured'"
    )
    balances = shop.query("payment", "SELECT sum(balance) FROM balances")
    assert int(balances[0][0]) + int(captured[0][0]) == sum(BALANCES.values())  # type: ignore[call-overload]
    shipped = dict(shop.query("shipping", "SELECT sku, sum(qty) FROM shipments GROUP BY sku"))
    for sku, opening in STOCK.items():
        assert shop.stock(sku) + int(shipped.get(sku, 0)) == opening  # type: ignore[call-overload]
    assert shop.query("payment", "SELECT count(*) FROM payments WHERE status = 'captured'")[0][0] == len(
        shop.query("shipping", "SELECT * FROM shipments")
    )


def test_the_shop_lints_with_its_compensations_ending_the_failed_path() -> None:
    """The refund and the stock release were ``unconsumed`` (neither consumed nor terminal);
    they end the compensation path, as ``OrderCancelled`` does. What remains: one warning, that
    nothing undoes a dispatched shipment if orders gives up recording it (the order is then
    ``failed`` in the journal, for a person to replay the dead letter), and infos: any
    compensation can give up."""
    from choreograph.flow import lint

    findings = lint(app)
    assert [(f.severity, f.code) for f in findings] == [
        ("warning", "uncompensated-failure"), *[("info", "compensation-can-fail")] * 3
    ]
    assert "orders.shipped gives up on shop.shipment.dispatched" in findings[0].message
    assert app.terminal[PaymentRefunded] == app.terminal[StockReleased] == app.terminal[OrderCancelled] == "failed"


async def test_a_repeat_of_an_order_already_refunded_is_declined_not_shipped_for_free(shop: Shop) -> None:
    """Payment answered a repeat of an order with its first decision, and answered a refunded
    payment as captured: the client's retry of an order the deadline had refunded, released and
    cancelled was dispatched (a parcel out, nothing charged, no stock taken) and the retry's
    transaction never ended (orders had the order cancelled). A refunded payment is declined."""
    worker = await run_without(shop, "shipping")
    first = await shop.order("o-13", "alice", "widget", 1, 10_00)
    await time_out(shop, first, worker)
    worker = await run(shop)
    await shop.drained()
    again = await shop.order("o-13", "alice", "widget", 1, 10_00)  # the client's retry
    await worker.stop()
    assert shop.count(ShipmentDispatched, "o-13") == 0
    assert shop.ends("o-13") == ["OrderCancelled", "OrderCancelled"]
    assert await shop.status(again) == "failed"  # declined and out of stock: a business "no", nothing to undo
    assert shop.balance("alice") == BALANCES["alice"] and shop.stock("widget") == STOCK["widget"]
    assert shop.count(PaymentRefunded, "o-13") == shop.count(StockReleased, "o-13") == 1


async def test_a_repeat_of_an_order_whose_stock_was_released_is_out_of_stock_not_shipped(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inventory answered a repeat of an order with its first decision, and answered a released
    reservation as reserved: payment gave up on the first order (its stock released, the order
    cancelled), the client's retry was charged and answered ``StockReserved`` from the released row,
    and dispatched - a parcel out whose units were back on the shelf, and a retry whose
    transaction never ended (orders had the order cancelled, so no ``OrderShipped``). A released
    reservation is out of stock, as payment declines a refunded payment."""
    import examples.shop.payment

    working = examples.shop.payment.faults
    monkeypatch.setattr(examples.shop.payment, "faults", Faults("payment", FaultSpec(fail_rate=1.0)))
    worker = await run(shop)
    first = await shop.order("o-16", "alice", "widget", 1, 10_00)
    assert shop.ends("o-16") == ["OrderCancelled"] and shop.count(StockReleased, "o-16") == 1
    monkeypatch.setattr(examples.shop.payment, "faults", working)  # payment recovers
    again = await shop.order("o-16", "alice", "widget", 1, 10_00)  # the client's retry
    await worker.stop()
    assert shop.count(ShipmentDispatched, "o-16") == 0
    assert shop.ends("o-16") == ["OrderCancelled", "OrderCancelled"]
    assert await shop.status(first) == "compensated"
    assert await shop.status(again) == "compensated"  # the refund of its charge ends it too
    assert shop.balance("alice") == BALANCES["alice"] and shop.stock("widget") == STOCK["widget"]
    assert shop.query("payment", "SELECT status FROM payments WHERE order_id = 'o-16'") == [("refunded",)]
    assert shop.query("inventory", "SELECT status FROM reservations WHERE order_id = 'o-16'") == [("released",)]
