"""The scenario helper (``choreograph.testing.Scenario``): given events, expect events, compensations
and dead letters; on the shop example (services with their own SQLite databases) and on small
services built inline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from examples.shop.app import app
from examples.shop.events import (
    OrderCancelled,
    OrderPlaced,
    OrderShipped,
    OutOfStock,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    StockReleased,
    StockReserved,
)
from examples.shop.inventory import inventory
from examples.shop.orders import orders
from examples.shop.payment import BALANCES, payment
from examples.shop.shipping import SHIPPING_WAIT, shipping

import choreograph.testing
from choreograph import (
    ConfigurationError,
    Context,
    Event,
    Reject,
    RetryPolicy,
    Service,
    TimedOut,
    failed,
    timed_out,
)
from choreograph.faults import Faults, FaultSpec
from choreograph.testing import Scenario, VirtualClock
from tests.stores._databases import fresh_postgres_url


@pytest.fixture(autouse=True)
def _no_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHOREOGRAPH_FAULTS", raising=False)


def order(customer: str = "alice", sku: str = "widget", qty: int = 1, amount: int = 15_00) -> OrderPlaced:
    return OrderPlaced(order_id="o-1", customer=customer, sku=sku, qty=qty, amount=amount)


def balance(s: Scenario, customer: str) -> int:
    path = s.database_url("payment").removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT balance FROM balances WHERE customer = ?", (customer,)).fetchone()[0])


# -- the shop ------------------------------------------------------------------------------


async def test_an_order_paid_for_and_in_stock_ships_with_nothing_undone() -> None:
    async with Scenario(app) as s:
        await s.given(order(amount=15_00))
        s.expect(PaymentCaptured, StockReserved, OrderShipped)
        s.expect(OrderPlaced, PaymentCaptured, OrderShipped, ordered=True)
        s.expect_not(OrderCancelled, PaymentRefunded, StockReleased)
        s.expect_not_compensated()
        s.expect_no_dead_letters()
        [shipped] = s.events(OrderShipped)
        assert shipped.order_id == "o-1" and shipped.shipment_id.startswith("shp-")
        assert await s.status() == "completed"
        assert balance(s, "alice") == BALANCES["alice"] - 15_00  # the service's own database, changed for real


async def test_a_declined_payment_releases_the_reserved_stock_and_cancels_the_order() -> None:
    async with Scenario(app) as s:
        await s.given(order(customer="bob", amount=50_00))
        s.expect(PaymentDeclined, StockReserved, StockReleased, OrderCancelled)
        s.expect(OrderPlaced, PaymentDeclined, OrderCancelled, ordered=True)
        s.expect_compensated(StockReserved, OrderPlaced)
        s.expect_not_compensated(PaymentCaptured)
        s.expect_not(OrderShipped, PaymentCaptured, PaymentRefunded)
        [declined] = s.events(PaymentDeclined)
        assert declined.reason == "balance 2000 < 5000"
        assert await s.status() == "compensated"


async def test_a_shipping_failure_is_dead_lettered_and_both_branches_are_undone() -> None:
    async with Scenario(app) as s:
        await s.given(order(sku="oversize-sofa", amount=80_00))
        # the join's completing arrival (either of the two) is the one dead-lettered
        letter = s.expect_dead_letter(reason="rejected", service="shipping")
        assert letter.record["last_error"]["message"] == "no courier takes oversize-sofa"
        assert letter.message.type in (PaymentCaptured.event_type(), StockReserved.event_type())
        s.expect(failed(StockReserved), failed(PaymentCaptured), PaymentRefunded, StockReleased, OrderCancelled)
        s.expect_compensated(PaymentCaptured, StockReserved, OrderPlaced)
        assert balance(s, "alice") == BALANCES["alice"]


async def test_each_given_starts_the_transactions_the_expectations_look_at() -> None:
    async with Scenario(app) as s:
        await s.given(order(customer="bob", amount=50_00))
        s.expect(OrderCancelled)
        await s.given(OrderPlaced(order_id="o-2", customer="carol", sku="gadget", qty=5, amount=10_00))
        s.expect(OutOfStock, PaymentRefunded, OrderCancelled)
        s.expect_not(PaymentDeclined)  # o-1's decline is in another transaction
        assert [e.order_id for e in s.events(OrderCancelled)] == ["o-2"]


async def test_an_order_past_its_deadline_is_timed_out_when_the_clock_is_advanced_past_it() -> None:
    async with Scenario([orders, payment, inventory]) as s:  # shipping is down: nobody joins
        await s.given(order(), deadline=timedelta(minutes=5))
        s.expect(PaymentCaptured, StockReserved)
        s.expect_not(timed_out())  # given() never jumps the clock just to reach a deadline
        await s.advance(5 * 60 + 1)
        s.expect(TimedOut)
        # the shop's deadline is shipping's (it may have dispatched): the timeout undoes nothing
        s.expect_not(PaymentRefunded, StockReleased, OrderCancelled)
        [timeout] = [e for e in s.emitted if e.type == TimedOut.event_type()]
        assert timeout.at == pytest.approx(300.0)  # announced at the deadline, not at the end of the advance
        assert timeout.service is None and timeout.envelope.source == s.journal.source


async def test_a_join_times_out_when_the_clock_is_advanced_past_its_window() -> None:
    async with Scenario([orders, payment, shipping]) as s:  # inventory never answers
        await s.given(order(), within=SHIPPING_WAIT - 1)
        s.expect(PaymentCaptured)
        s.expect_not(failed(PaymentCaptured), PaymentRefunded)
        await s.advance(1)
        s.expect(failed(PaymentCaptured), PaymentRefunded, OrderCancelled)
        s.expect_compensated(PaymentCaptured)
        [timeout] = [e for e in s.emitted if e.envelope.data.get("record", {}).get("reason") == "join_timeout"]
        assert timeout.at == pytest.approx(SHIPPING_WAIT) and timeout.service == "shipping"


# -- failed expectations say why -----------------------------------------------------------


async def test_a_wrong_expectation_lists_what_was_emitted_in_order_and_the_dead_letters() -> None:
    async with Scenario(app) as s:
        [placed] = await s.given(order(customer="bob", amount=50_00))
        with pytest.raises(AssertionError) as failure:
            s.expect(PaymentDeclined, OrderShipped)
    message = str(failure.value)
    headline, listing = message.split("\n\n", 1)
    assert headline == "expected PaymentDeclined, OrderShipped; not emitted: OrderShipped"
    assert listing.startswith(f"emitted in transaction {placed.id[-8:]}, in publish order")
    lines = listing.splitlines()
    assert "OrderPlaced" in lines[1] and "given" in lines[1] and f"id {placed.id[-8:]}" in lines[1]
    [declined] = [line for line in lines if "PaymentDeclined" in line and "payment.capture" in line]
    assert f"<- {placed.id[-8:]} OrderPlaced" in declined
    shown = re.findall(r" id (\S+)", listing)  # time-ordered ids share their first characters
    assert len(shown) > 3 and len(set(shown)) == len(shown)
    assert any("StockReleased" in line and "inventory.release (undoes StockReserved)" in line for line in lines)
    assert any("failed(StockReserved): join_timeout" in line and f"+{SHIPPING_WAIT:.3f}s" in line for line in lines)
    assert lines[-1] == "dead letters: none"


async def test_each_kind_of_expectation_fails_with_its_own_headline_and_the_listing() -> None:
    async with Scenario(app) as s:
        await s.given(order(sku="oversize-sofa", amount=80_00))
        failures = []
        for expectation in (
            lambda: s.expect_not(PaymentCaptured),
            lambda: s.expect(OrderCancelled, PaymentCaptured, ordered=True),
            lambda: s.expect(StockReleased, StockReleased),
            lambda: s.expect_compensated(OrderShipped),
            lambda: s.expect_not_compensated(),
            lambda: s.expect_dead_letter(OrderPlaced),
            lambda: s.expect_dead_letter(reason="max_attempts", service="shipping"),
            lambda: s.expect_no_dead_letters(),
        ):
            with pytest.raises(AssertionError) as failure:
                expectation()
            failures.append(str(failure.value).split("\n\n", 1))
    headlines = [headline for headline, _ in failures]
    assert headlines[0].startswith("expected no PaymentCaptured; emitted: PaymentCaptured (id ")
    assert headlines[1:6] == [
        "expected, in this order: OrderCancelled, PaymentCaptured; found OrderCancelled in that order, "
        "then no PaymentCaptured",
        "expected StockReleased, StockReleased; not emitted: StockReleased",
        "expected the compensation of OrderShipped; not compensated: OrderShipped",
        headlines[4],  # checked below: the order of concurrent compensations varies
        "expected a dead letter of OrderPlaced",
    ]
    assert headlines[4].startswith("expected no compensation; compensated: ")
    assert "StockReserved by inventory.release" in headlines[4]
    assert headlines[6:] == ["expected a dead letter by shipping for 'max_attempts'",
                             "expected no dead letters; found 1"]
    for _, listing in failures:
        assert re.search(r"\n  shipping: (StockReserved|PaymentCaptured) id \w{8}, rejected after 1 attempt\(s\) "
                         r"in shipping.ship: Reject: no courier takes oversize-sofa$", listing)


async def test_expectations_before_anything_was_given_are_a_mistake() -> None:
    async with Scenario(app) as s:
        with pytest.raises(RuntimeError, match="given"):
            s.expect(OrderPlaced)


async def test_driving_a_scenario_outside_its_async_with_block_is_a_mistake() -> None:
    """``advance()`` before the block moved the clock with nothing running, in silence; after it,
    ``advance()`` and ``given()`` raised the cancelled recorder's ``CancelledError``. What the
    last run saw stays there to look at."""
    s = Scenario(app)
    with pytest.raises(RuntimeError, match="async with"):
        await s.advance(5)
    assert s.clock.monotonic() == 1_000_000.0
    async with s:
        await s.given(order())
    with pytest.raises(RuntimeError, match="has ended"):
        await asyncio.wait_for(s.advance(5), 5.0)
    with pytest.raises(RuntimeError, match="has ended"):
        await asyncio.wait_for(s.given(order()), 5.0)
    s.expect(PaymentCaptured)


async def test_an_expectation_naming_no_event_is_a_mistake() -> None:
    """``expect()`` and ``expect_not()`` with nothing named passed whatever happened: an
    assertion that cannot fail (``expect_not()`` read as "nothing was emitted", and was not)."""
    async with Scenario(app) as s:
        await s.given(order())
        with pytest.raises(TypeError, match="name the events"):
            s.expect()
        with pytest.raises(TypeError, match="name the events"):
            s.expect(ordered=True)
        with pytest.raises(TypeError, match="name the events"):
            s.expect_not()


# -- services built inline -----------------------------------------------------------------


class Ping(Event, type="test.scenario.ping"):
    n: int


class Pong(Event, type="test.scenario.pong"):
    n: int


async def test_retries_are_fast_forwarded_and_a_give_up_is_dead_lettered_with_its_record() -> None:
    flaky = Service("flaky", retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False))

    @flaky.on(Ping)
    async def answer(ping: Ping) -> Pong:
        raise ConnectionError(f"upstream down for {ping.n}")

    async with Scenario([flaky]) as s:
        await s.given(Ping(n=1))
        letter = s.expect_dead_letter(Ping, reason="max_attempts", service="flaky")
        assert letter.record["attempts"] == 3
        assert letter.record["last_error"]["message"] == "upstream down for 1"
        s.expect(failed(Ping))
        s.expect_not(Pong)
        assert s.emitted[-1].at == 3.0  # backoffs of 1 s and 2 s, in virtual time
        assert s.emitted[-1].handler == "answer"


def _hanging_once() -> Service:
    """Service "slow": its first attempt at a Ping hangs 600 s past its 5 s timeout (a fault),
    the retry 1 s later answers Pong."""
    hanging = Faults("slow", FaultSpec(hang=600))
    slow = Service("slow", retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False), timeout=5.0)

    @slow.on(Ping)
    async def answer(ping: Ping, ctx: Context) -> Pong:
        async with (hanging if ctx.attempt == 1 else Faults("slow")).step(ctx):
            return Pong(n=ping.n)

    return slow


async def test_a_hang_past_the_timeout_is_cut_short_in_virtual_time() -> None:
    """An injected hang of 10 minutes past a 5 s timeout: the attempt times out at 5 s on the
    scenario's clock (the hang was slept in real time, the timeout measured on it), and the
    retry after 1 s answers."""
    slow = _hanging_once()

    async with Scenario([slow]) as s:
        await s.given(Ping(n=1))
        s.expect(Pong)
        s.expect_no_dead_letters()
        assert s.emitted[-1].at == pytest.approx(6.0)  # timed out at 5 s, retried 1 s later


async def test_within_ends_while_a_handler_still_hangs_and_advance_goes_on_from_there() -> None:
    """``within=3`` with a handler hanging in virtual time: the scenario returns at 3 s with
    the attempt still running (it waited for the hang to end, past the scenario's real timeout);
    ``advance()`` then sees it time out at 5 s and the retry answer at 6 s."""
    slow = _hanging_once()

    async with Scenario([slow], clock=VirtualClock(start=0.0), timeout=3.0) as s:
        await s.given(Ping(n=1), within=3.0)
        s.expect_not(Pong)
        assert s.clock.monotonic() == pytest.approx(3.0)
        await s.advance(10.0)
        s.expect(Pong)
        assert s.emitted[-1].at == pytest.approx(6.0)
        assert s.clock.monotonic() == pytest.approx(13.0)


class Pang(Event, type="test.scenario.pang"):
    n: int


@pytest.mark.parametrize("database", [False, True])
async def test_the_clock_does_not_jump_over_a_handler_at_work_while_another_hangs(
    database: bool, tmp_path: Path
) -> None:
    """One handler hangs in virtual time, another works for real (10 ms): the clock, which
    jumps while only the hang holds events in flight, waits for the worker first. It jumped
    at once: the worker's output was stamped at the end of the jump (+5.000s, +0.250s), as if
    its work had taken that long (and a handler with a short timeout timed out on it)."""
    slow = _hanging_once()
    worker = Service("worker", database=f"sqlite:///{tmp_path / 'worker.db'}" if database else None)

    @worker.on(Ping)
    async def work(ping: Ping, ctx: Context) -> Pang:
        if database:
            async with ctx.transaction() as tx:
                await tx.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
                await tx.execute("INSERT INTO t VALUES ($1)", ping.n)
        await asyncio.sleep(0.01)
        return Pang(n=ping.n)

    async with Scenario([slow, worker], clock=VirtualClock(start=0.0), data_dir=tmp_path) as s:
        await s.given(Ping(n=1))
        s.expect(Pang, Pong)
        assert [(e.type, e.at) for e in s.emitted if e.service] == [
            (Pang.event_type(), 0.0), (Pong.event_type(), 6.0)]


async def test_a_handler_counts_as_work_from_the_moment_the_fetch_loop_hands_it_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetch loop stops counting as busy once it started the batch's handlers; their tasks
    (on 3.11) take their first step a loop turn later. A jump decided in between - here forced,
    as the scenario makes it when its check falls there (seen once under load) - went over the
    worker's handler while the other one hung: its output was stamped at +5.000s, not at 0."""
    from choreograph.runtime._runner import _Runner

    slow = _hanging_once()
    worker = Service("worker", database=f"sqlite:///{tmp_path / 'worker.db'}")

    @worker.on(Ping)
    async def work(ping: Ping, ctx: Context) -> Pang:
        await asyncio.sleep(0.01)
        return Pang(n=ping.n)

    clock = VirtualClock(start=0.0)
    busy = _Runner._busy

    def busy_then_jump_if_idle(runner: _Runner, running: bool) -> None:
        busy(runner, running)
        due = clock.next_due()
        if not running and clock.backoff_due() is not None and not clock.busy() and due is not None:
            clock.advance(due - clock.monotonic())  # what the scenario does when it finds the clock idle

    monkeypatch.setattr(_Runner, "_busy", busy_then_jump_if_idle)
    async with Scenario([slow, worker], clock=clock, data_dir=tmp_path) as s:
        await s.given(Ping(n=1))
        s.expect(Pang, Pong)
        assert [(e.type, e.at) for e in s.emitted if e.service] == [
            (Pang.event_type(), 0.0), (Pong.event_type(), 6.0)]


class _Declined(Event, type="test.scenario.declined"):
    n: int


async def test_a_compensation_that_gave_up_is_not_a_compensation_that_ran() -> None:
    """The failure event the runtime published when the compensation gave up was attributed
    to it as "undoes Pong", so expect_compensated(Pong) passed though nothing was undone."""
    shop = Service("shop", retry=RetryPolicy(max_attempts=2, base=1.0, jitter=False))

    @shop.on(Ping)
    async def reserve(ping: Ping) -> Pong:
        return Pong(n=ping.n)

    @shop.compensate(Pong, on=[_Declined])
    async def release(pong: Pong, declined: _Declined) -> Ping:
        raise ConnectionError("stock database down")

    bank = Service("bank")

    @bank.on(Ping)
    async def decline(ping: Ping) -> _Declined:
        return _Declined(n=ping.n)

    async with Scenario([shop, bank]) as s:
        await s.given(Ping(n=1))
        s.expect_dead_letter(_Declined, reason="max_attempts", service="shop")
        with pytest.raises(AssertionError) as failure:
            s.expect_compensated(Pong)
        with pytest.raises(AssertionError) as attempted:
            s.expect_not_compensated(Pong)  # it ran, and gave up: not "no compensation" either
    assert str(failure.value).split("\n\n")[0] == (
        "expected the compensation of Pong; not compensated: Pong "
        "(its compensation shop.release gave up: max_attempts)"
    )
    assert str(attempted.value).split("\n\n")[0] == (
        "expected no compensation of Pong; compensated: Pong by shop.release (gave up: max_attempts)"
    )


async def test_a_rejected_event_is_dead_lettered_at_once() -> None:
    strict = Service("strict")

    @strict.on(Ping)
    async def answer(ping: Ping) -> Pong:
        raise Reject("no pings on Sundays")

    async with Scenario([strict], clock=VirtualClock(start=0.0)) as s:
        await s.given(Ping(n=1))
        letter = s.expect_dead_letter(Ping, reason="rejected")
        assert letter.record["service"] == "strict" and letter.record["attempts"] == 1
        assert s.clock.monotonic() == 0.0  # nothing waited, nothing moved


async def test_a_scenario_that_does_not_settle_says_what_it_saw() -> None:
    release = asyncio.Event()
    stuck = Service("stuck")

    @stuck.on(Ping)
    async def answer(ping: Ping) -> Pong:
        await release.wait()
        return Pong(n=ping.n)

    @stuck.on(Pong)
    async def refuse(pong: Pong) -> None:
        raise Reject("no pongs here")

    async with Scenario([stuck], timeout=1.0) as s:  # the rejection takes a few loop turns of it
        with pytest.raises(TimeoutError) as failure:
            await s.given(Ping(n=7), Pong(n=8), correlation_id="c-1")
        release.set()
    assert "1 events ready or in flight" in str(failure.value)
    assert "Ping" in str(failure.value) and "given" in str(failure.value)
    # what was dead-lettered meanwhile is listed (it said "dead letters: none")
    assert re.search(r"dead letters:\n  stuck: Pong id \w{8}, rejected after 1 attempt\(s\) in stuck.refuse: "
                     r"Reject: no pongs here$", str(failure.value))


async def test_the_services_passed_in_are_not_changed_and_the_temporary_databases_are_removed() -> None:
    before = {service.name: service.database for service in app.services}
    async with Scenario(app) as s:
        await s.given(order())
        data_dir = s.data_dir
        assert data_dir is not None and (data_dir / "payment.db").exists()
        assert s.database_url("payment") == f"sqlite:///{data_dir.resolve() / 'payment.db'}"
    assert {service.name: service.database for service in app.services} == before
    assert not data_dir.exists()


async def test_a_data_dir_given_keeps_the_databases(tmp_path: Path) -> None:
    async with Scenario(app, data_dir=tmp_path) as s:
        await s.given(order())
    databases = sorted(name for name in os.listdir(tmp_path) if name.endswith(".db"))
    assert databases == ["inventory.db", "orders.db", "payment.db", "shipping.db"]


@pytest.fixture
async def postgres() -> AsyncIterator[str]:
    async with fresh_postgres_url() as url:
        yield url


async def test_databases_puts_a_service_on_the_database_named(postgres: str) -> None:
    async with Scenario(app, databases={"payment": postgres}) as s:
        await s.given(order())
        s.expect(PaymentCaptured, StockReserved, OrderShipped)
        assert s.database_url("payment") == postgres
        assert s.database_url("inventory").startswith("sqlite:///")


def test_databases_may_only_name_services_with_a_database() -> None:
    with pytest.raises(ConfigurationError, match=r"databases= names \['nobody'\]"):
        Scenario(app, databases={"nobody": "sqlite:///x.db"})


def test_the_testing_module_exports_its_tools() -> None:
    assert choreograph.testing.__all__ == ["Emitted", "MemoryTransport", "Scenario", "VirtualClock", "settled"]


class _Pinged(Event, type="test.scenario.pinged"):
    n: int


class _Ponged(Event, type="test.scenario.ponged"):
    n: int


@pytest.mark.timeout(60)  # a ceiling for a stuck test, not a speed assertion
async def test_a_scenario_moves_the_clock_over_the_backoffs_of_an_inbox_that_fails_for_a_while() -> None:
    """Marking the handled event fails 8 times: the worker holds it in flight and backs off
    (11.35 s in all, more than the scenario's real timeout) on the scenario's clock."""
    from collections.abc import Collection

    from choreograph.errors import StoreError
    from choreograph.stores.memory import MemoryStore

    class DownForAWhile(MemoryStore):
        failures = 8

        async def mark(self, group: str, event_ids: Collection[str]) -> None:
            if group == "pinger" and self.failures:
                self.failures -= 1
                raise StoreError("inbox unavailable")
            await super().mark(group, event_ids)

    pinger = Service("pinger")

    @pinger.on(_Pinged)
    async def pong(ping: _Pinged) -> _Ponged:
        return _Ponged(n=ping.n)

    store = DownForAWhile()
    s = Scenario([pinger])
    s.worker.store = store  # the inbox of services without a database
    async with s:
        start = s.clock.monotonic()
        await s.given(_Pinged(n=1))
        s.expect(_Ponged)
        assert [p.n for p in s.events(_Ponged)] == [1]
        assert s.clock.monotonic() - start == pytest.approx(sum(min(0.05 * 2**n, 5.0) for n in range(8)))
    assert store.failures == 0 and s.worker.stats("pinger").handled == 1
