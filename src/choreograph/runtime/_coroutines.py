"""What the runner reads off a handler's coroutine: whether it can suspend at all
(:func:`never_suspends`, read off its bytecode once per code object), and how a task takes
over one that did after all (:class:`_Resumed`). A handler that cannot suspend runs inline
in the fetch loop, without a task of its own (``_Runner._inline``).
"""

from __future__ import annotations

import dis
import types
from collections.abc import Coroutine, Generator
from typing import Any

#: Opcodes at which a coroutine's own frame can suspend: ``await``, ``async for``, ``async with``.
_SUSPENDING = frozenset({"YIELD_VALUE", "SEND", "GET_AWAITABLE", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT",
                         "END_ASYNC_FOR"})
#: id(code) -> (code, whether it can suspend); the code is kept so that its id is never reused.
_CODE_SUSPENDS: dict[int, tuple[types.CodeType, bool]] = {}


def _suspends(code: types.CodeType) -> bool:
    known = _CODE_SUSPENDS.get(id(code))
    if known is None:
        known = _CODE_SUSPENDS[id(code)] = (code, any(i.opname in _SUSPENDING for i in dis.get_instructions(code)))
    return known[1]


def never_suspends(coro: object) -> bool:
    """Whether ``coro`` is a coroutine of an ``async def`` whose body has no ``await``,
    ``async for`` or ``async with`` (read off the bytecode it runs): it runs to its end in
    one step. Only its own frame can suspend it, and this one has nowhere to; what it
    calls can be anything. The coroutine is judged, not the function: a decorator's
    wrapper (also one that reports the original's ``__code__``, as wrapt's do) is what
    runs, and a compiled coroutine (Cython) has no bytecode to read, so it answers ``False``.
    """
    return type(coro) is types.CoroutineType and not _suspends(coro.cr_code)


class _Resumed:
    """The rest of a coroutine that already took its first step and yielded ``first``:
    awaited in a task, it hands the task what the coroutine yields and passes back what
    the task sends or throws."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                thrown: BaseException | None = exc
            else:
                thrown = None
            try:
                value = coro.send(sent) if thrown is None else coro.throw(thrown)
            except StopIteration as done:
                return done.value
