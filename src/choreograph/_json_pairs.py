"""What orjson reads differently from what a JSON document says: a key given twice in one
object (orjson keeps the last value, silently) and an integer beyond the 64 bits an event
carries (orjson reads it as a float). The stdlib parser, with every object kept as its
pairs and every integer as written, tells them; the gateway, the receiver and
``choreograph publish`` refuse what it finds rather than publish something else than sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, Literal


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, a key given twice kept twice."""


class _Int(str):
    """A JSON integer as it was written (not converted: ``int()`` refuses over 4,300 digits)."""


def _ignore(_: str) -> None:
    return None


def fits_64_bits(number: str) -> bool:
    """Whether the JSON integer ``number`` is in the 64-bit range (-2**63 to 2**64-1) an event carries."""
    digits = number.lstrip("-")
    return len(digits) < 19 or (len(digits) <= 20 and -(2**63) <= int(number) <= 2**64 - 1)


def first_misread(body: bytes | str, *, ints: bool) -> tuple[str, Literal["duplicate_key", "big_int"]] | None:
    """The path (``$.items[0].qty``) and kind of the first value of ``body`` orjson reads otherwise
    than written: a key given twice, or (with ``ints``) an integer beyond 64 bits; ``None`` if
    none. ``body`` is JSON orjson has read; nested deeper than the stdlib parser goes, orjson's
    reading stands."""
    try:
        root = json.loads(body, object_pairs_hook=_Pairs, parse_int=_Int if ints else _ignore, parse_float=_ignore)
    except (ValueError, RecursionError):
        return None
    for path, value in _walk(root):
        if isinstance(value, _Pairs):
            seen: set[str] = set()
            for key, _ in value:
                if key in seen:
                    return f"{path}.{key}", "duplicate_key"
                seen.add(key)
        elif isinstance(value, _Int) and not fits_64_bits(value):
            return path, "big_int"
    return None


def _walk(root: Any) -> Iterator[tuple[str, Any]]:
    """Every value of ``root`` (read with :class:`_Pairs` objects) and its path, in document order."""
    stack: list[tuple[str, Any]] = [("$", root)]
    while stack:
        path, value = stack.pop()
        yield path, value
        if isinstance(value, _Pairs):
            stack.extend((f"{path}.{key}", item) for key, item in reversed(value))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in reversed(list(enumerate(value))))


class _Number(str):
    """A JSON number as it was written."""


def first_infinite(body: bytes | str) -> tuple[str, bool] | None:
    """The path of the first number of ``body`` beyond a 64-bit float's range (``1e400``, an
    integer of over 308 digits) and whether it is written as an integer; ``None`` if none.
    orjson refuses such a document outright ("number is infinity when parsed as double"),
    which is valid JSON (RFC 8259 leaves a number's range to the reader); the stdlib parser
    tells which value it was. Nested deeper than that parser goes: ``None``."""
    try:
        root = json.loads(body, object_pairs_hook=_Pairs, parse_int=_Int, parse_float=_Number)
    except (ValueError, RecursionError):
        return None
    for path, value in _walk(root):
        if isinstance(value, (_Int, _Number)) and math.isinf(float(value)):
            return path, isinstance(value, _Int)
    return None
