"""The runtime kernel: the worker loop, output/failure records, publishing from outside handlers."""

from choreograph.runtime.publisher import Publisher
from choreograph.runtime.worker import DEFAULT_MAX_HOPS, HandlerTimeout, Stats, Worker

__all__ = ["DEFAULT_MAX_HOPS", "HandlerTimeout", "Publisher", "Stats", "Worker"]
