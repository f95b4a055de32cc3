"""The smallest choreography: three services in a chain, each its own process.

    ingest ──OrderPlaced──▶ payment ──PaymentCaptured──▶ shipping ──OrderShipped──▶ notify

Run one service per terminal (or let ``python -m examples.chain.demo`` do it)::

    choreograph run examples.chain:payment --broker sqlite:///./var/bus.db
    choreograph run examples.chain:shipping --broker sqlite:///./var/bus.db
    choreograph run examples.chain:notify --broker sqlite:///./var/bus.db
    choreograph publish chain.order.placed --data '{"order_id": "o-1", "amount": 30}' \
        --schema examples.chain:OrderPlaced --broker sqlite:///./var/bus.db
"""

from __future__ import annotations

import os
import random

from choreograph import App, Context, Event, Reject, RetryPolicy, Service


class OrderPlaced(Event, type="chain.order.placed"):
    order_id: str
    amount: int


class PaymentCaptured(Event, type="chain.payment.captured"):
    order_id: str
    amount: int


class OrderShipped(Event, type="chain.order.shipped"):
    order_id: str


#: Fault injection for the demo: the fraction of payment attempts that fail transiently.
FAILURE_RATE = float(os.environ.get("CHAIN_FAILURE_RATE", "0"))

payment = Service("payment", retry=RetryPolicy(max_attempts=4, base=0.05))
shipping = Service("shipping")
notify = Service("notify")


@payment.on(OrderPlaced)
async def capture(order: OrderPlaced, ctx: Context) -> PaymentCaptured:
    if order.amount <= 0:
        raise Reject(f"amount must be positive, got {order.amount}")
    if random.random() < FAILURE_RATE:
        raise RuntimeError("payment gateway timed out (injected)")
    return PaymentCaptured(order_id=order.order_id, amount=order.amount)


@shipping.on(PaymentCaptured)
async def ship(payment: PaymentCaptured) -> OrderShipped:
    return OrderShipped(order_id=payment.order_id)


@notify.on(OrderShipped)
async def tell_customer(shipped: OrderShipped, ctx: Context) -> None:
    ctx.logger.info("order %s shipped", shipped.order_id)


app = App("chain", [payment, shipping, notify], ingress=[OrderPlaced], terminal={OrderShipped: "completed"})
service = app  # `choreograph run examples.chain:service` runs all three in one process
