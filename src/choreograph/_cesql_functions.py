"""CESQL values, casts and built-in functions (see :mod:`choreograph.cesql` for the semantics).

Casts take the value, the error list and the position of the expression being evaluated:
a failed cast appends a *cast* error and returns the zero value of the target type.
Implementations of functions receive their arguments already cast to the parameter types.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from choreograph._cesql_parser import INT_MAX, INT_MIN, Value

Type = Literal["Boolean", "Integer", "String"]
ZERO: dict[Type | None, Value] = {"Boolean": False, "Integer": 0, "String": "", None: False}
_INTEGER = re.compile(r"[+-]?[0-9]+")


class ErrorKind(enum.StrEnum):
    """The CESQL error types (their values are the TCK's names)."""

    PARSE = "parse"
    MATH = "math"
    CAST = "cast"
    MISSING_ATTRIBUTE = "missingAttribute"
    MISSING_FUNCTION = "missingFunction"
    FUNCTION_EVALUATION = "functionEvaluation"
    GENERIC = "generic"


@dataclass(frozen=True, slots=True)
class EvaluationError:
    """An error met while evaluating: its kind, what happened, and where (0-based offset)."""

    kind: ErrorKind
    message: str
    position: int

    def __str__(self) -> str:
        return f"{self.kind}: {self.message} (column {self.position + 1})"


# -- casts -----------------------------------------------------------------------------


def show(value: Value) -> str:
    if type(value) is bool:
        return "TRUE" if value else "FALSE"
    return repr(value)


def type_name(value: Value) -> Type:
    return "Boolean" if type(value) is bool else "Integer" if type(value) is int else "String"


def cast_error(errors: list[EvaluationError], pos: int, value: Value, target: str) -> None:
    errors.append(EvaluationError(ErrorKind.CAST, f"cannot cast {show(value)} to {target}", pos))


def to_integer(value: Value, errors: list[EvaluationError], pos: int) -> int:
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, int):
        return value
    # A 32-bit integer has at most 10 digits after its sign and leading zeros; only those go
    # to int(), which refuses strings of more than 4,300 digits (leading zeros included).
    if _INTEGER.fullmatch(value):
        digits = value.lstrip("+-").lstrip("0") or "0"
        if len(digits) <= 10 and INT_MIN <= (number := int(digits) * (-1 if value[0] == "-" else 1)) <= INT_MAX:
            return number
    cast_error(errors, pos, value, "Integer")
    return 0


def to_boolean(value: Value, errors: list[EvaluationError], pos: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.lower()
        if lowered == "true":
            return True
        if lowered == "false":
            return False
    cast_error(errors, pos, value, "Boolean")
    return False


def to_string(value: Value, errors: list[EvaluationError] | None = None, pos: int = 0) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


CASTS: dict[type, Callable[[Value, list[EvaluationError], int], Value]] = {
    bool: to_boolean,
    int: to_integer,
    str: to_string,
}

TYPED_CASTS: dict[Type, Callable[[Value, list[EvaluationError], int], Value]] = {
    "Boolean": to_boolean,
    "Integer": to_integer,
    "String": to_string,
}


def clamp(result: int, errors: list[EvaluationError], pos: int) -> int:
    if INT_MIN <= result <= INT_MAX:
        return result
    errors.append(EvaluationError(ErrorKind.MATH, f"integer overflow ({result} is outside 32 bits)", pos))
    return INT_MAX if result > INT_MAX else INT_MIN


def divide(x: int, y: int) -> int:
    quotient = abs(x) // abs(y)
    return quotient if (x < 0) == (y < 0) else -quotient


# -- built-in functions ----------------------------------------------------------------

_Impl = Callable[[list[Any], list[EvaluationError], int], Value]


@dataclass(frozen=True, slots=True)
class Function:
    params: tuple[Type | None, ...]  # None: any type, no cast
    variadic: Type | None | Literal[False]  # the type of further arguments, or False
    returns: Type
    impl: _Impl

    def accepts(self, count: int) -> bool:
        return count == len(self.params) or (self.variadic is not False and count > len(self.params))


def _function_error(errors: list[EvaluationError], pos: int, message: str) -> None:
    errors.append(EvaluationError(ErrorKind.FUNCTION_EVALUATION, message, pos))


def _abs(args: list[Any], errors: list[EvaluationError], pos: int) -> Value:
    (x,) = args
    if x == INT_MIN:
        errors.append(EvaluationError(ErrorKind.MATH, f"ABS({INT_MIN}) overflows 32 bits", pos))
        return INT_MAX
    return abs(x)  # type: ignore[no-any-return]


def _left(args: list[Any], errors: list[EvaluationError], pos: int) -> Value:
    text, n = args
    if n < 0:
        _function_error(errors, pos, f"LEFT: the length must not be negative, got {n}")
        return text  # type: ignore[no-any-return]
    return text[:n]  # type: ignore[no-any-return]


def _right(args: list[Any], errors: list[EvaluationError], pos: int) -> Value:
    text, n = args
    if n < 0:
        _function_error(errors, pos, f"RIGHT: the length must not be negative, got {n}")
        return text  # type: ignore[no-any-return]
    return text[len(text) - n:] if n < len(text) else text  # type: ignore[no-any-return]


def _substring(args: list[Any], errors: list[EvaluationError], pos: int) -> Value:
    text, start = args[0], args[1]
    size = len(text)
    if start > size or start < -size:
        _function_error(errors, pos, f"SUBSTRING: position {start} is outside a string of length {size}")
        return ""
    if len(args) == 3 and args[2] < 0:
        _function_error(errors, pos, f"SUBSTRING: the length must not be negative, got {args[2]}")
        return ""
    if start == 0:
        return ""
    begin = start - 1 if start > 0 else size + start
    return text[begin:] if len(args) == 2 else text[begin:begin + args[2]]  # type: ignore[no-any-return]


def _cast_function(target: Type) -> _Impl:
    cast = TYPED_CASTS[target]

    def explicit(args: list[Any], errors: list[EvaluationError], pos: int) -> Value:
        (value,) = args
        if target == "Boolean" and type(value) is int:  # Integer→Boolean only when asked for
            return bool(value != 0)
        return cast(value, errors, pos)

    return explicit


def _is(target: Type) -> _Impl:
    cast = _cast_function(target)

    def check(args: list[Any], errors: list[EvaluationError], pos: int) -> Value:
        probe: list[EvaluationError] = []
        cast(args, probe, pos)
        return not probe

    return check


_WHITESPACE = " \t\r\n"

FUNCTIONS: dict[str, tuple[Function, ...]] = {
    "ABS": (Function(("Integer",), False, "Integer", _abs),),
    "LENGTH": (Function(("String",), False, "Integer", lambda a, e, p: len(a[0])),),
    "CONCAT": (Function((), "String", "String", lambda a, e, p: "".join(a)),),
    "CONCAT_WS": (Function(("String",), "String", "String", lambda a, e, p: a[0].join(a[1:])),),
    "LOWER": (Function(("String",), False, "String", lambda a, e, p: a[0].lower()),),
    "UPPER": (Function(("String",), False, "String", lambda a, e, p: a[0].upper()),),
    "TRIM": (Function(("String",), False, "String", lambda a, e, p: a[0].strip(_WHITESPACE)),),
    "LEFT": (Function(("String", "Integer"), False, "String", _left),),
    "RIGHT": (Function(("String", "Integer"), False, "String", _right),),
    "SUBSTRING": (
        Function(("String", "Integer"), False, "String", _substring),
        Function(("String", "Integer", "Integer"), False, "String", _substring),
    ),
    "INT": (Function((None,), False, "Integer", _cast_function("Integer")),),
    "BOOL": (Function((None,), False, "Boolean", _cast_function("Boolean")),),
    "STRING": (Function((None,), False, "String", _cast_function("String")),),
    "IS_INT": (Function((None,), False, "Boolean", _is("Integer")),),
    "IS_BOOL": (Function((None,), False, "Boolean", _is("Boolean")),),
}
"""The built-in functions by name; a name may have overloads of different arity."""



def by_zero(errors: list[EvaluationError], pos: int) -> int:
    errors.append(EvaluationError(ErrorKind.MATH, "division by zero", pos))
    return 0


def unknown_function(name: str, count: int) -> str:
    overloads = FUNCTIONS.get(name)
    if not overloads:
        return f"unknown function {name} (built-ins: {', '.join(sorted(FUNCTIONS))})"
    arities = [f"{len(f.params)} or more" if f.variadic is not False else str(len(f.params)) for f in overloads]
    takes = " or ".join(arities)
    noun = "argument" if takes == "1" else "arguments"
    return f"{name} takes {takes} {noun}, not {count}"
