"""Where a hop's time goes: stage timestamps in a ``choreograph run`` process (bench only).

``bench/brokers.py --stages`` starts the hop processes with this folder first on
``PYTHONPATH`` and ``CHOREOGRAPH_BENCH_STAGES`` set to a folder; Python imports this module
at start-up, and it wraps the runtime's steps to stamp ``time.perf_counter_ns()`` into a
list, written to ``<folder>/stages-<pid>.json`` at exit. :func:`stage_medians` reads them:
per hop process, the median of every step over the events it handled, in microseconds.

The steps of one event (``recv`` on NATS, whose parser hands messages over directly, and on
RabbitMQ, whose client calls the subscription back; not on Redis, read by ``fetch`` itself):

``recv``    the client hands the message to the subscription
``fetched`` ``fetch`` returns it to the worker's fetch loop
``seen0``   the inbox lookup starts; ``seen1`` it returned
``prep0``   decoding and validating start; ``prep1`` the handler's call is ready
``out0``    the handler returned, its output is encoded; ``out1`` encoded
``pub0``    the transport's ``publish`` is called; ``pub1`` it returned (the broker confirmed)

Each wrapper costs about a microsecond, so the figures are a little above an untraced
run's; they say where the time goes, not what it is without them.
"""

from __future__ import annotations

import os

_FOLDER = os.environ.get("CHOREOGRAPH_BENCH_STAGES")


def _install(folder: str) -> None:
    import atexit
    import functools
    import inspect
    import json
    import time
    from typing import Any

    from choreograph.runtime import _runner, _verdicts
    from choreograph.stores.base import InboxStore
    from choreograph.transports import _amqp_consumer, _nats_pull, _redis_consumer, amqp, nats, redis

    stamp = time.perf_counter_ns
    stamps: list[tuple[str, int]] = []
    add = stamps.append

    def around(cls: Any, name: str, before: str | None, after: str | None, *, empty: bool = True) -> None:
        """Stamp ``before`` and ``after`` around ``cls.name`` (``after`` not for an empty
        result unless ``empty``: a fetch that returned nothing)."""
        original = getattr(cls, name)

        @functools.wraps(original)
        def sync(*args: Any) -> Any:
            if before:
                add((before, stamp()))
            result = original(*args)
            if after:
                add((after, stamp()))
            return result

        @functools.wraps(original)
        async def coro(*args: Any, **kwargs: Any) -> Any:
            if before:
                add((before, stamp()))
            result = await original(*args, **kwargs)
            if after and (empty or result):
                add((after, stamp()))
            return result

        setattr(cls, name, coro if inspect.iscoroutinefunction(original) else sync)

    original_reply = _nats_pull.NatsSubscription._reply

    def reply(self: Any, msg: Any) -> None:
        if msg.reply.startswith("$JS.ACK."):
            add(("recv", stamp()))
        original_reply(self, msg)

    _nats_pull.NatsSubscription._reply = reply  # type: ignore[method-assign]
    original_on_message = _amqp_consumer.AmqpSubscription._on_message

    async def on_message(self: Any, raw: Any) -> None:
        add(("recv", stamp()))
        await original_on_message(self, raw)

    _amqp_consumer.AmqpSubscription._on_message = on_message  # type: ignore[method-assign]
    for cls in (
        _nats_pull.NatsSubscription,
        _redis_consumer.RedisSubscription,
        _amqp_consumer.AmqpSubscription,
    ):
        around(cls, "fetch", None, "fetched", empty=False)
    for store in _subclasses(InboxStore):
        if "seen" in vars(store):
            around(store, "seen", "seen0", "seen1")
    around(_runner._Runner, "_prepare", "prep0", "prep1")
    for module in (_runner, _verdicts):  # where the runner calls it: inline handlers, and the rest
        around(module, "output_message", "out0", "out1")
    for transport in (nats.NatsTransport, redis.RedisTransport, amqp.AmqpTransport):
        around(transport, "publish", "pub0", "pub1")

    def dump() -> None:
        with open(os.path.join(folder, f"stages-{os.getpid()}.json"), "w") as f:
            json.dump(stamps, f)

    atexit.register(dump)


def _subclasses(cls: type) -> list[type]:
    import choreograph.stores.memory  # noqa: F401 - every inbox store, imported
    import choreograph.stores.postgres  # noqa: F401
    import choreograph.stores.sqlite  # noqa: F401

    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


STEPS = ("recv", "fetched", "seen0", "seen1", "prep0", "prep1", "out0", "out1", "pub0", "pub1")


def stage_medians(folder: str) -> list[dict[str, float]]:
    """Per hop process that published (hop1, hop2), the median microseconds of every step."""
    import glob
    import itertools
    import json
    import statistics

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "stages-*.json"))):
        with open(path) as f:
            stamps = json.load(f)
        events: list[dict[str, int]] = []
        start = "recv" if any(step == "recv" for step, _ in stamps) else "fetched"
        for step, t in stamps:
            if step == start:
                events.append({step: t})
            elif events and step not in events[-1]:
                events[-1][step] = t
        if not any("pub0" in e for e in events):
            continue  # the last hop publishes nothing
        steps = [s for s in STEPS if any(s in e for e in events)]
        medians = {}
        for a, b in itertools.pairwise(steps):
            spans = [(e[b] - e[a]) / 1000 for e in events if a in e and b in e]
            if spans:
                medians[f"{a}->{b}"] = round(statistics.median(spans), 1)
        whole = [(e["pub0"] - e[steps[0]]) / 1000 for e in events if "pub0" in e]
        medians[f"{steps[0]}->pub0"] = round(statistics.median(whole), 1)
        out.append(medians)
    return out


if _FOLDER:
    _install(_FOLDER)
