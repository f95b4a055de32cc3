"""The shop under chaos: its data, its orders, and the invariants read from its services' own stores.

Data. Besides the demo data (alice, bob, carol; widget, gadget, oversize-sofa) the
harness seeds customers and SKUs that make every outcome of the saga occur in a
predictable share of the orders:

* ``chaos-rich-NN`` can pay anything, ``chaos-widget-N`` never runs out: an order of
  both **must ship** (nothing may cancel it but a give-up or a join timeout, which the
  retry policy rules out at the harness's settings);
* ``chaos-poor-N`` (50.00 each) are soon declined: the stock reserved for them is released;
* ``chaos-nobody`` is unknown to payment: declined;
* ``chaos-scarce`` (20 units) runs out: the payment taken is refunded;
* ``chaos-nowhere`` is unknown to inventory: out of stock;
* ``oversize-sofa`` is refused by every courier: shipping gives up (a dead letter the
  policy allows), payment refunds and inventory releases.

Invariants, checked once every order is terminal and the bus is idle:

* every order is shipped or cancelled, and the orders that must ship did;
* an order is shipped exactly when shipping has a shipment for it;
* money: captured minus refunded equals the value of the shipped orders, order by order,
  and every balance is its opening balance minus what was captured from it (>= 0);
* stock: reserved minus released equals the quantity shipped, per SKU, and every
  SKU's stock is its opening stock minus what is held (>= 0);
* on the bus, no order has two different events of one kind (charged, reserved,
  refunded, released, shipped or cancelled twice), and exactly one terminal event;
* dead letters only where the policy says: shipping rejecting an ``oversize-*`` order.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from choreograph.transports.base import DeadLetter

RICH = [f"chaos-rich-{n:02d}" for n in range(20)]
POOR = [f"chaos-poor-{n}" for n in range(5)]
NOBODY = "chaos-nobody"
WIDGETS = [f"chaos-widget-{n}" for n in range(5)]
SCARCE = "chaos-scarce"
NOWHERE = "chaos-nowhere"
OVERSIZE = "oversize-sofa"

BALANCES = {**dict.fromkeys(RICH, 10**12), **dict.fromkeys(POOR, 50_00)}
STOCK = {**dict.fromkeys(WIDGETS, 10**9), SCARCE: 20}

ONCE = (
    "shop.order.placed", "shop.payment.captured", "shop.payment.declined", "shop.payment.refunded",
    "shop.stock.reserved", "shop.stock.out_of_stock", "shop.stock.released",
    "shop.shipment.dispatched", "shop.order.shipped", "shop.order.cancelled",
)
"""Event types of which an order may have at most one (distinct id) on the bus."""
TERMINAL = ("shop.order.shipped", "shop.order.cancelled")
SERVICES = ("orders", "payment", "inventory", "shipping")
"""The shop's services, each with its database ``<data dir>/<service>.db``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    customer: str
    sku: str
    qty: int
    amount: int

    @property
    def must_ship(self) -> bool:
        return self.customer in RICH and self.sku in WIDGETS

    def data(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_orders(count: int, rng: random.Random) -> list[Order]:
    """``count`` orders, about 70 % of which must ship; the rest exercise every way to fail."""
    orders = []
    for n in range(count):
        roll = rng.random()
        customer = NOBODY if roll < 0.04 else rng.choice(POOR) if roll < 0.12 else rng.choice(RICH)
        roll = rng.random()
        sku = (OVERSIZE if roll < 0.03 else NOWHERE if roll < 0.05 else SCARCE if roll < 0.13
               else rng.choice(WIDGETS))
        orders.append(Order(f"o-{n:05d}", customer, sku, rng.randint(1, 3), rng.randint(1, 50) * 100))
    return orders


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


# -- the stores ----------------------------------------------------------------------------


def seed(data_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Create the four services' tables as they would, with the demo and the harness's data; return the openings.

    Each service keeps its state in its own database, ``<data_dir>/<service>.db`` (the
    replicas get ``CHOREOGRAPH_DATA_DIR``); the tables are the services' own
    (``schema.statements``), created here so the opening balances and stock are known
    before the first order.
    """
    from examples.shop import inventory, orders, payment, shipping

    data_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, tuple[str, dict[str, int]]] = {
        "payment": ("INSERT INTO balances VALUES (?, ?)", {**payment.BALANCES, **BALANCES}),
        "inventory": ("INSERT INTO stock VALUES (?, ?)", {**inventory.STOCK, **STOCK}),
    }
    schemas = {orders.orders.name: orders.schema, payment.payment.name: payment.schema,
               inventory.inventory.name: inventory.schema, shipping.shipping.name: shipping.schema}
    for name, schema in schemas.items():
        conn = sqlite3.connect(data_dir / f"{name}.db", isolation_level=None, timeout=30.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in schema.statements:
                conn.execute(statement)
            if name in rows:
                sql, values = rows[name]
                conn.executemany(sql, values.items())
            conn.execute("COMMIT")
        finally:
            conn.close()
    with Stores(data_dir) as stores:
        return (dict(stores.rows("payment", "SELECT customer, balance FROM balances")),
                dict(stores.rows("inventory", "SELECT sku, available FROM stock")))


class Stores:
    """Read-only access to the services' own databases."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._conns: dict[str, sqlite3.Connection] = {}

    def __enter__(self) -> Stores:
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self._conns.values():
            conn.close()

    def rows(self, db: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
        if db not in self._conns:
            self._conns[db] = sqlite3.connect(f"file:{self.data_dir / db}.db?mode=ro", uri=True, timeout=30.0,
                                             check_same_thread=False)
        return self._conns[db].execute(sql, args).fetchall()

    def unsent(self) -> dict[str, int]:
        """Outbox rows each service committed and its relay has not yet published."""
        return {db: int(self.rows(db, "SELECT count(*) FROM choreograph_outbox WHERE sent_at IS NULL")[0][0])
                for db in SERVICES}

    def ended(self) -> int:
        """How many orders the orders service has recorded as shipped or cancelled."""
        return int(self.rows("orders", "SELECT count(*) FROM orders")[0][0])

    def outcomes(self) -> dict[str, int]:
        return dict(self.rows("orders", "SELECT status, count(*) FROM orders GROUP BY status"))

    def compensations(self) -> dict[str, int]:
        return {
            "refunds": int(self.rows("payment", "SELECT count(*) FROM payments WHERE status = 'refunded'")[0][0]),
            "releases": int(self.rows("inventory",
                                      "SELECT count(*) FROM reservations WHERE status = 'released'")[0][0]),
            "cancellations": int(self.rows("orders", "SELECT count(*) FROM orders WHERE status = 'cancelled'")[0][0]),
        }


# -- the invariants ------------------------------------------------------------------------


def _few(items: Iterable[Any], limit: int = 5) -> str:
    items = sorted(items, key=str)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(map(str, items[:limit])) + more


def check_stores(stores: Stores, orders: list[Order], balances: dict[str, int], stock: dict[str, int], *,
                 join_timeouts: bool = False) -> list[Check]:
    """The invariants on the services' stores; ``join_timeouts``: a join timeout may cancel any order."""
    ids = {o.order_id for o in orders}
    status = dict(stores.rows("orders", "SELECT order_id, status FROM orders"))
    shipments = {oid: (sku, qty, amount) for oid, sku, qty, amount in
                 stores.rows("shipping", "SELECT order_id, sku, qty, amount FROM shipments")}
    payments = stores.rows("payment", "SELECT order_id, customer, amount, status FROM payments")
    reservations = stores.rows("inventory", "SELECT order_id, sku, qty, status FROM reservations")
    checks = []

    missing = ids - set(status)
    unknown = set(status) - ids
    bad = {oid for oid, s in status.items() if s not in ("shipped", "cancelled")}
    checks.append(Check("every order shipped or cancelled", not (missing or unknown or bad),
                        f"not terminal: {_few(missing)}; unknown: {_few(unknown)}; bad status: {_few(bad)}"
                        if missing or unknown or bad else f"{len(ids)} orders"))
    details = stores.rows("orders", "SELECT order_id, detail FROM orders WHERE status = 'cancelled'")
    why = {oid: detail for oid, detail in details}
    lost = [o.order_id for o in orders if o.must_ship and o.order_id in why
            and not (join_timeouts and "join_timeout" in why[o.order_id])]
    checks.append(Check("orders that can ship shipped", not lost,
                        "; ".join(f"{oid}: {why.get(oid, '')[:160]}" for oid in lost[:3]) + _more(lost, 3)
                        if lost else f"{sum(o.must_ship for o in orders)} orders"))
    shipped = {oid for oid, s in status.items() if s == "shipped"}
    checks.append(Check("shipped exactly when shipping has a shipment", shipped == set(shipments),
                        f"shipped without shipment: {_few(shipped - set(shipments))}; "
                        f"shipment of an order not shipped: {_few(set(shipments) - shipped)}"
                        if shipped != set(shipments) else f"{len(shipped)} shipments"))

    taken = sum(a for _, _, a, s in payments if s in ("captured", "refunded"))
    refunded = sum(a for _, _, a, s in payments if s == "refunded")
    value = sum(amount for _, _, amount in shipments.values())
    held = {oid for oid, _, _, s in payments if s == "captured"}
    money = f"captured {taken} - refunded {refunded} = {taken - refunded}, value shipped {value}"
    checks.append(Check("money: captured - refunded = value shipped", taken - refunded == value and held == shipped,
                        money if held == shipped else f"{money}; charged and not shipped: {_few(held - shipped)}; "
                        f"shipped and not charged: {_few(shipped - held)}"))
    spent: collections.Counter[str] = collections.Counter()
    for _, customer, amount, s in payments:
        if s == "captured":
            spent[customer] += amount
    now = dict(stores.rows("payment", "SELECT customer, balance FROM balances"))
    wrong = {c for c in balances if now.get(c) != balances[c] - spent[c] or now.get(c, 0) < 0}
    checks.append(Check("balances: opening - captured, never negative", not wrong,
                        "; ".join(f"{c}: {now.get(c)} != {balances[c]} - {spent[c]}" for c in sorted(wrong)[:5])
                        or f"{len(balances)} customers"))

    reserved: collections.Counter[str] = collections.Counter()
    released: collections.Counter[str] = collections.Counter()
    holding: collections.Counter[str] = collections.Counter()
    for _, sku, qty, s in reservations:
        if s in ("reserved", "released"):
            reserved[sku] += qty
        if s == "released":
            released[sku] += qty
        if s == "reserved":
            holding[sku] += qty
    sent: collections.Counter[str] = collections.Counter()
    for sku, qty, _ in shipments.values():
        sent[sku] += qty
    skus = set(reserved) | set(sent)
    off = {sku for sku in skus if reserved[sku] - released[sku] != sent[sku]}
    kept = {oid for oid, _, _, s in reservations if s == "reserved"}
    units = (f"reserved {sum(reserved.values())} - released {sum(released.values())} = "
             f"{sum(reserved.values()) - sum(released.values())}, shipped {sum(sent.values())}")
    checks.append(Check("stock: reserved - released = quantity shipped", not off and kept == shipped,
                        units if not off and kept == shipped else
                        "; ".join(f"{sku}: {reserved[sku]} - {released[sku]} != {sent[sku]}" for sku in sorted(off))
                        + f"; reserved and not shipped: {_few(kept - shipped)}; shipped and not reserved: "
                        f"{_few(shipped - kept)}"))
    left = dict(stores.rows("inventory", "SELECT sku, available FROM stock"))
    wrong = {s for s in stock if left.get(s) != stock[s] - holding[s] or left.get(s, 0) < 0}
    checks.append(Check("stock: opening - held, never negative", not wrong,
                        "; ".join(f"{s}: {left.get(s)} != {stock[s]} - {holding[s]}" for s in sorted(wrong)[:5])
                        or f"{len(stock)} skus"))
    # Each order's OrderPlaced reaches payment and inventory, which each record a decision for it
    # whatever the outcome (captured/declined, reserved/out_of_stock). A lost OrderPlaced can hide
    # behind a cancellation (a decline, a join timeout), so the orders table alone does not show it.
    undecided = {name: sorted(ids - {row[0] for row in rows})
                 for name, rows in (("payment", payments), ("inventory", reservations))}
    checks.append(Check("payment and inventory each decided every order", not any(undecided.values()),
                        "; ".join(f"no {name} decision for {_few(set(oids))}" for name, oids in undecided.items()
                                  if oids) or f"{len(ids)} orders each"))
    return checks


def _more(items: list[Any], shown: int) -> str:
    return f" (+{len(items) - shown} more)" if len(items) > shown else ""


def check_bus(orders: list[Order], ids: dict[str, dict[str, set[str]]],
              status: dict[str, str]) -> list[Check]:
    """What the observer saw: one event of each kind per order at most, one terminal, matching the store."""
    twice = {f"{oid} {kind} x{len(ids[oid][kind])}" for oid in ids for kind in ONCE if len(ids[oid][kind]) > 1}
    ends = {o.order_id: [k for k in TERMINAL for _ in ids.get(o.order_id, {}).get(k, ())] for o in orders}
    not_one = {oid for oid, found in ends.items() if len(found) != 1}
    disagree = {oid for oid, found in ends.items() if len(found) == 1
                and found[0].rpartition(".")[2] != status.get(oid)}
    return [
        Check("no order charged, reserved, refunded, released, shipped or cancelled twice", not twice,
              _few(twice) or "one event per kind per order on the bus"),
        Check("exactly one terminal event per order, as recorded", not (not_one or disagree),
              f"not one: {_few(not_one)}; event and store disagree: {_few(disagree)}"
              if not_one or disagree else f"{len(ends)} orders"),
    ]


def allowed(letter: DeadLetter, orders: dict[str, Order]) -> bool:
    """The policy: the only dead letter is shipping refusing an oversize item (``Reject``)."""
    try:
        data = orjson.loads(letter.message.body).get("data") or {}
    except orjson.JSONDecodeError:
        return False
    order = orders.get(str(data.get("order_id")))
    return (letter.group == "shipping" and letter.record.get("reason") == "rejected"
            and order is not None and order.sku.startswith("oversize-"))


def check_dead_letters(letters: list[DeadLetter], orders: list[Order]) -> tuple[Check, dict[str, int]]:
    by_id = {o.order_id: o for o in orders}
    reasons = collections.Counter(f"{dl.group}:{dl.record.get('reason')}" for dl in letters)
    unexpected = [dl for dl in letters if not allowed(dl, by_id)]
    detail = "; ".join(
        f"{dl.group} {dl.message.type} {dl.record.get('reason')}: "
        f"{str((dl.record.get('last_error') or {}).get('message', ''))[:120]}" for dl in unexpected[:5]
    ) + _more(unexpected, 5)
    return (Check("dead letters only where the policy says (shipping rejects oversize-*)", not unexpected,
                  detail or f"{len(letters)} dead letters, all allowed"), dict(reasons))
