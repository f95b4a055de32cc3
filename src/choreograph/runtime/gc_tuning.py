"""Cyclic garbage collector settings for a long-lived worker process.

A worker allocates a few dozen container objects per event (envelope, payload models,
context, task, outcome) that almost all die by reference counting within the event.
With CPython's default collector settings (a young-generation collection every 700 net
allocations) the collector still walks every in-flight event's objects again and again,
promotes them, and every so often walks the whole heap - including the hundreds of
thousands of objects of the imported libraries, which never become garbage. On the
memory:// chain with a backlog that was about a third of the run time
(``bench/chain.py --gc python`` against the default).

:func:`tune_gc` moves what exists now (modules, the app, connections) into the
collector's permanent generation (``gc.freeze()``), where it is never walked, and makes
the young generation larger, so that an event's objects are usually freed by reference
counting before a collection sees them. Cycles are still collected; only less often.
``choreograph run`` calls it just before its worker starts (``--gc-threshold``), once the
app is loaded - so that nothing in flight is frozen;
call it yourself when you embed a :class:`~choreograph.runtime.Worker` in your own
long-lived process and the process is yours to tune.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("choreograph.gc")
#: Young-generation threshold ``tune_gc`` sets by default (CPython's default is 700).
DEFAULT_GC_THRESHOLD = 20_000


def tune_gc(threshold: int = DEFAULT_GC_THRESHOLD) -> int:
    """Freeze the objects that exist now and set the young-generation threshold.

    Returns how many objects were frozen. ``threshold`` 0 (or less) changes nothing
    and returns 0: Python's own settings stay.
    """
    if threshold <= 0:
        return 0
    gc.collect()  # what is garbage now is freed rather than frozen
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
    frozen = gc.get_freeze_count()
    log.debug("gc: froze %d objects; young-generation threshold %d", frozen, threshold)
    return frozen
