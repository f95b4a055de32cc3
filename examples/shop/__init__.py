"""The online shop: a saga with parallel branches, a join and compensations, no orchestrator.

::

                  ┌─▶ payment ──PaymentCaptured | PaymentDeclined──┐
    OrderPlaced ──┤                                               ├─▶ shipping (joins Captured + Reserved) ──ShipmentDispatched─▶ orders ──OrderShipped (completed)
                  └─▶ inventory ──StockReserved | OutOfStock──────┘

    orders ends every order: it records the outcome and publishes the terminal event in one transaction

    compensations (each once per order, only if its step happened, in any order):
      payment   refunds on OutOfStock, a shipping failure, or inventory giving up
      inventory releases on PaymentDeclined, a shipping failure, or payment giving up
      orders    cancels (OrderCancelled: failed) on any "no" or any give-up

    the deadline is shipping's: it does not ship an order past it (a shipping failure), and
    what it never ships is undone by that refusal or its join's timeout; nothing is undone on
    the journal's ``choreograph.timedout``, which could come after the parcel left

Each service declares its own database (``Service(name, database=...)``: SQLite under
``$CHOREOGRAPH_DATA_DIR``, default ``./var/shop``, or ``$SHOP_DATABASE_<SERVICE>``, e.g.
PostgreSQL) and changes it only through ``ctx.transaction()``: balances and payments,
stock and reservations, shipments, orders, each committed with the inbox record of the
event and the events emitted (the outbox); joins and compensations record their
arrivals in the same transaction.
Demo data: customers alice (100.00), bob (20.00), carol (1000.00); skus widget (100),
gadget (3), oversize-sofa (5, which no courier takes: a shipping failure). Run::

    choreograph dev examples.shop.app:app
    choreograph publish shop.order.placed --schema examples.shop.events:OrderPlaced \\
        --data '{"order_id": "o-1", "customer": "alice", "sku": "widget", "qty": 2, "amount": 1500}'
"""
