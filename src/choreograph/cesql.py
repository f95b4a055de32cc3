"""CloudEvents SQL (CESQL v1): filters on the context attributes of an event, compiled once.

>>> expr = compile("subject LIKE 'eu-%' AND INT(hops) < 3")
>>> expr.matches({"subject": "eu-west", "hops": 1})
True
>>> expr.evaluate({"hops": 1})  # no subject: the zero value and an error  # doctest: +ELLIPSIS
(False, [EvaluationError(kind=<ErrorKind.MISSING_ATTRIBUTE: 'missingAttribute'>, ...)])

:func:`compile` parses the text (raising :class:`CESQLParseError` with the column and the
reason) and turns the tree into nested closures, so evaluating an event costs a few
function calls and no parsing. The attributes are a mapping from lower-case names
(``id``, ``source``, ``type``, ``subject``, extensions...) to ``str``, ``int`` or
``bool``; other values are read as their ``str()``.

Semantics (the spec's, in complete-evaluation mode; the official TCK passes in full):

* Types are Boolean, Integer (32-bit) and String, with zero values ``false``, ``0``, ``''``.
* An operand of the wrong type is cast: String→Integer (an optional sign and ASCII
  digits), String→Boolean (``true``/``false`` in any case), Boolean→Integer (1/0),
  Integer and Boolean→String. ``=``, ``!=`` and ``IN`` cast the left operand (``IN``: the
  set items) to the type of the other side. A cast that fails records a *cast* error and
  yields the zero value of the target type. Integer→Boolean is explicit only
  (``BOOL(10)``): ``NOT 10`` is a cast error, as the TCK's "Invalid int cast" requires.
* An operator or function whose operand recorded an error (a missing attribute, a division
  by zero...) does not compute: it yields the zero value of its result type and the
  errors travel up. So ``1 / missing`` is ``0`` with one *missingAttribute* error, and
  ``true AND (1 != 1 / 0)`` is ``false``.
* ``AND`` and ``OR`` short-circuit. ``/`` and ``%`` truncate toward zero; dividing by zero
  yields ``0`` and a *math* error; a result outside 32 bits is clamped with a *math* error.
* A function called with an unknown name or arity yields ``false`` and a
  *missingFunction* error (``compile(..., strict=True)`` refuses it instead).
* As a filter (:meth:`Expression.matches`) only ``true`` with no error passes: the Boolean,
  or, for an untyped expression (a bare attribute), a String CESQL casts to it (``"true"``).

Precedence and literal syntax: see :mod:`choreograph._cesql_parser`; note that ``AND``,
``OR`` and ``XOR`` share one level and group from the right, as in the CESQL grammar.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from choreograph import _cesql_parser as syntax
from choreograph._cesql_functions import (
    CASTS,
    FUNCTIONS,
    TYPED_CASTS,
    ZERO,
    ErrorKind,
    EvaluationError,
    Type,
    by_zero,
    clamp,
    divide,
    to_boolean,
    to_integer,
    to_string,
    type_name,
    unknown_function,
)
from choreograph._cesql_parser import INT_MAX, INT_MIN, CESQLParseError, Value

__all__ = ["CESQLParseError", "ErrorKind", "EvaluationError", "Expression", "Type", "Value", "compile"]

_Fn = Callable[[Mapping[str, Any], list[EvaluationError]], Value]
_LOGIC = frozenset({"AND", "OR", "XOR"})


class Expression:
    """A compiled CESQL expression. ``type`` is its result type when known before evaluation
    (``None`` for a bare attribute); ``references`` the attribute names it reads."""

    __slots__ = ("_fn", "references", "source", "type")

    def __init__(self, source: str, fn: _Fn, type_: Type | None, references: frozenset[str]) -> None:
        self.source = source
        self._fn = fn
        self.type = type_
        self.references = references

    def evaluate(self, attributes: Mapping[str, Any]) -> tuple[Value, list[EvaluationError]]:
        """The value of the expression for these attributes, and the errors met (empty if none)."""
        errors: list[EvaluationError] = []
        value = self._fn(attributes, errors)
        return value, errors

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        """Whether an event with these attributes passes the filter: ``true`` and no error.

        Never raises: a filter decides on events from the outside world, so anything the
        evaluation trips over (an attribute value no CESQL type can hold, ...) is a
        "no match", as evaluation errors are, rather than an event that can never settle.
        """
        errors: list[EvaluationError] = []
        try:
            value = self._fn(attributes, errors)
        except Exception:
            return False
        if isinstance(value, str) and self.type is None:
            # An untyped expression (a bare attribute: ``where="urgent"``) is cast to Boolean as
            # CESQL casts a String: "true"/"false" in any case; anything else is no match.
            value = value.lower() == "true"
        return value is True and not errors

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def compile(expression: str, *, strict: bool = False) -> Expression:
    """Parse and compile ``expression``; raise :class:`CESQLParseError` if it is not CESQL.

    With ``strict=True`` a call of an unknown function (name or number of arguments) is
    refused here too, instead of evaluating to ``false`` with a *missingFunction* error.
    """
    tree = syntax.parse(expression)
    references: set[str] = set()
    fn, type_ = _Compiler(expression, strict, references).node(tree)
    return Expression(expression, fn, type_, frozenset(references))


# -- compiling a tree to closures ------------------------------------------------------


class _Compiler:
    def __init__(self, source: str, strict: bool, references: set[str]) -> None:
        self.source = source
        self.strict = strict
        self.references = references

    def node(self, node: syntax.Node) -> tuple[_Fn, Type | None]:
        if isinstance(node, syntax.Literal):
            value = node.value
            return (lambda attrs, errors: value), type_name(value)
        if isinstance(node, syntax.Attribute):
            self.references.add(node.name)
            return _attribute(node.name, node.pos), None
        if isinstance(node, syntax.Exists):
            self.references.add(node.name)
            name = node.name
            return (lambda attrs, errors: attrs.get(name) is not None), "Boolean"
        if isinstance(node, syntax.Unary):
            return self.unary(node)
        if isinstance(node, syntax.Binary):
            return self.binary(node)
        if isinstance(node, syntax.Like):
            return self.like(node), "Boolean"
        if isinstance(node, syntax.In):
            return self.in_(node), "Boolean"
        return self.call(node)

    def unary(self, node: syntax.Unary) -> tuple[_Fn, Type]:
        operand, _ = self.node(node.operand)
        pos = node.pos
        if node.op == "NOT":
            def not_(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
                count = len(errors)
                value = operand(attrs, errors)
                return False if len(errors) != count else not to_boolean(value, errors, pos)
            return not_, "Boolean"

        def negate(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
            count = len(errors)
            value = operand(attrs, errors)
            return 0 if len(errors) != count else clamp(-to_integer(value, errors, pos), errors, pos)
        return negate, "Integer"

    def binary(self, node: syntax.Binary) -> tuple[_Fn, Type]:
        if node.op in _LOGIC and isinstance(node.right, syntax.Binary) and node.right.op in _LOGIC:
            return self.chain(node), "Boolean"
        left, _ = self.node(node.left)
        right, _ = self.node(node.right)
        op, pos = node.op, node.pos
        if op in ("AND", "OR"):
            stop = op == "OR"  # the left value that decides: OR stops on true, AND on false

            def logic(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
                count = len(errors)
                value = left(attrs, errors)
                if len(errors) != count:
                    return False
                if to_boolean(value, errors, pos) is stop:
                    return stop
                count = len(errors)
                value = right(attrs, errors)
                return False if len(errors) != count else to_boolean(value, errors, pos)
            return logic, "Boolean"
        if op == "XOR":
            def xor(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
                count = len(errors)
                x, y = left(attrs, errors), right(attrs, errors)
                if len(errors) != count:
                    return False
                return to_boolean(x, errors, pos) is not to_boolean(y, errors, pos)
            return xor, "Boolean"
        if op in ("=", "!=", "<>"):
            equal = op == "="

            def equality(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
                count = len(errors)
                x, y = left(attrs, errors), right(attrs, errors)
                if len(errors) != count:
                    return False
                if type(x) is not type(y):
                    x = CASTS[type(y)](x, errors, pos)
                return (x == y) is equal
            return equality, "Boolean"
        if op in ("<", "<=", ">", ">="):
            compare = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}[op]
            return _integers(left, right, pos, False, compare), "Boolean"
        arithmetic: Callable[[int, int], int | None] = {  # None: division by zero
            "+": operator.add,
            "-": operator.sub,
            "*": operator.mul,
            "/": lambda x, y: divide(x, y) if y else None,
            "%": lambda x, y: x - y * divide(x, y) if y else None,
        }[op]

        def checked(x: int, y: int, errors: list[EvaluationError]) -> Value:
            result = arithmetic(x, y)
            return by_zero(errors, pos) if result is None else clamp(result, errors, pos)
        return _integers(left, right, pos, 0, checked, errors_arg=True), "Integer"

    def chain(self, node: syntax.Binary) -> _Fn:
        """``a AND b OR c XOR d ...`` (grouped from the right: ``a AND (b OR (c XOR d))``) as one loop,
        with the semantics of the nested operators above, so a long chain costs no recursion:
        forward over the left operands while none decides the result (an error, or the value
        that stops AND/OR), then back from the innermost level to the outermost."""
        levels: list[tuple[bool | None, int, _Fn]] = []  # (OR: True, AND: False, XOR: None), pos, left
        current: syntax.Node = node
        while isinstance(current, syntax.Binary) and current.op in _LOGIC:
            stop = None if current.op == "XOR" else current.op == "OR"
            levels.append((stop, current.pos, self.node(current.left)[0]))
            current = current.right
        last, _ = self.node(current)

        def chain(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
            pending: list[tuple[bool | None, int, Value, int]] = []  # levels waiting for their right value
            value: Value
            for stop, pos, left in levels:
                count = len(errors)
                x = left(attrs, errors)
                if stop is None:  # XOR: both sides, then any error since `count` makes it false
                    pending.append((None, pos, x, count))
                    continue
                if len(errors) != count:
                    value = False
                    break
                if to_boolean(x, errors, pos) is stop:
                    value = stop
                    break
                pending.append((stop, pos, x, len(errors)))  # AND/OR: an error on the right makes it false
            else:
                value = last(attrs, errors)
            for stop, pos, x, count in reversed(pending):
                if len(errors) != count:
                    value = False
                elif stop is None:
                    value = to_boolean(x, errors, pos) is not to_boolean(value, errors, pos)
                else:
                    value = to_boolean(value, errors, pos)
            return value
        return chain

    def like(self, node: syntax.Like) -> _Fn:
        operand, _ = self.node(node.operand)
        test = _like_matcher(node.pattern)
        negated = node.negated

        def like(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
            count = len(errors)
            value = operand(attrs, errors)
            if len(errors) != count:
                return False
            return test(value if type(value) is str else to_string(value)) is not negated
        return like

    def in_(self, node: syntax.In) -> _Fn:
        operand, _ = self.node(node.operand)
        items = [self.node(item)[0] for item in node.items]
        negated, pos = node.negated, node.pos
        literals = [item.value for item in node.items if isinstance(item, syntax.Literal)]
        kinds = {type(value) for value in literals}
        # all items literals of one type: membership in a precomputed set for that type
        fast_type = kinds.pop() if len(literals) == len(items) and len(kinds) == 1 else None
        fast_set = frozenset(literals)

        def in_(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
            count = len(errors)
            value = operand(attrs, errors)
            if type(value) is fast_type and len(errors) == count:
                return (value in fast_set) is not negated
            values = [item(attrs, errors) for item in items]
            if len(errors) != count:
                return False
            cast = CASTS[type(value)]
            # every item is cast (a list, not any()'s short circuit): a set has no order, so an
            # item's cast error is recorded whether or not an equal item comes before it
            cast_values = [v if type(v) is type(value) else cast(v, errors, pos) for v in values]
            return (value in cast_values) is not negated
        return in_

    def call(self, node: syntax.Call) -> tuple[_Fn, Type | None]:
        args = [self.node(arg)[0] for arg in node.args]
        pos = node.pos
        function = next((f for f in FUNCTIONS.get(node.name, ()) if f.accepts(len(args))), None)
        if function is None:
            message = unknown_function(node.name, len(args))
            if self.strict:
                raise CESQLParseError(self.source, pos, message)
            return _missing_function(message, pos), None
        variadic = function.variadic if function.variadic is not False else None
        types: Sequence[Type | None] = [*function.params, *[variadic] * (len(args) - len(function.params))]
        casts = [TYPED_CASTS[t] if t is not None else None for t in types]
        impl, zero = function.impl, ZERO[function.returns]

        def call(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
            count = len(errors)
            values = [arg(attrs, errors) for arg in args]
            if len(errors) != count:
                return zero
            values = [v if c is None else c(v, errors, pos) for v, c in zip(values, casts, strict=True)]
            return impl(values, errors, pos)
        return call, function.returns


def _attribute(name: str, pos: int) -> _Fn:
    def attribute(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
        value: Any = attrs.get(name)
        kind = type(value)
        if kind is str or kind is bool or (kind is int and INT_MIN <= value <= INT_MAX):
            return value  # type: ignore[no-any-return]
        if value is None:
            errors.append(EvaluationError(ErrorKind.MISSING_ATTRIBUTE, f"the event has no attribute {name!r}", pos))
            return False
        return str(value)
    return attribute


def _integers(left: _Fn, right: _Fn, pos: int, zero: Value, op: Callable[..., Value], *,
              errors_arg: bool = False) -> _Fn:
    """An operator on two Integers: ``op(x, y)`` (``op(x, y, errors)`` if ``errors_arg``)."""
    def integers(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
        count = len(errors)
        x, y = left(attrs, errors), right(attrs, errors)
        if len(errors) != count:
            return zero
        if type(x) is not int:
            x = to_integer(x, errors, pos)
        if type(y) is not int:
            y = to_integer(y, errors, pos)
        return op(x, y, errors) if errors_arg else op(x, y)
    return integers


def _missing_function(message: str, pos: int) -> _Fn:
    def missing(attrs: Mapping[str, Any], errors: list[EvaluationError]) -> Value:
        errors.append(EvaluationError(ErrorKind.MISSING_FUNCTION, message, pos))
        return False
    return missing


def _like_matcher(pattern: str) -> Callable[[str], bool]:
    """``%`` is any run of characters, ``_`` one character, ``\\%`` and ``\\_`` themselves.
    Patterns that are an exact string, a prefix or a suffix skip the regular expression; one
    with several ``%`` is matched segment by segment (see :class:`_Segment`), not as a
    regular expression, whose backtracking took O(n^k) steps on a value that does not match
    (``%a%a%a%b``: about 1 s for 400 characters, 16 s for 800)."""
    parts: list[str] = []  # regex pieces
    literal: list[str] = []  # the pattern as plain text, while it has no wildcard
    wildcards: list[int] = []  # positions of '%' in `literal` terms; '_' disables the shortcuts
    segments: list[list[str | None]] = [[]]  # the characters between '%'s (None: '_')
    simple = True
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "%_":
            parts.append(re.escape(pattern[i + 1]))
            literal.append(pattern[i + 1])
            segments[-1].append(pattern[i + 1])
            i += 2
            continue
        if ch == "%":
            parts.append(".*")
            wildcards.append(len(literal))
            segments.append([])
        elif ch == "_":
            parts.append(".")
            simple = False
            segments[-1].append(None)
        else:
            parts.append(re.escape(ch))
            literal.append(ch)
            segments[-1].append(ch)
        i += 1
    text = "".join(literal)
    if simple and not wildcards:
        return text.__eq__
    if simple and wildcards == [len(literal)]:
        return functools.partial(_starts, prefix=text)
    if simple and wildcards == [0]:
        return functools.partial(_ends, suffix=text)
    if len(wildcards) >= 2:
        return functools.partial(_like_segments, segments=tuple(_Segment(chars) for chars in segments))
    regex = re.compile("".join(parts), re.DOTALL)  # at most one '.*': linear backtracking
    return lambda value: regex.fullmatch(value) is not None


class _Segment:
    """The part of a LIKE pattern between two ``%``: a fixed number of characters, ``_`` any one."""

    __slots__ = ("regex", "size", "text")

    def __init__(self, chars: list[str | None]) -> None:
        self.size = len(chars)
        self.text = "".join(c for c in chars if c is not None)
        self.regex = (
            None if None not in chars
            else re.compile("".join("." if c is None else re.escape(c) for c in chars), re.DOTALL)
        )

    def at(self, value: str, start: int) -> bool:
        """Whether the segment matches ``value`` at ``start``."""
        return value.startswith(self.text, start) if self.regex is None else self.regex.match(value, start) is not None

    def search(self, value: str, start: int, end: int) -> int:
        """Where the leftmost match within ``value[start:end]`` ends, or -1."""
        if self.regex is None:
            found = value.find(self.text, start, end)
            return -1 if found < 0 else found + self.size
        match = self.regex.search(value, start, end)
        return -1 if match is None else match.end()


def _like_segments(value: str, segments: tuple[_Segment, ...]) -> bool:
    """``first % middle... % last``: the first segment at the start, the last at the end, each
    middle one at its leftmost place after the one before (segments are of fixed length, so the
    leftmost place leaves the most room for the rest): O(len(value) x len(pattern))."""
    first, *middle, last = segments
    tail = len(value) - last.size
    if tail < first.size or not first.at(value, 0) or not last.at(value, tail):
        return False
    position = first.size
    for segment in middle:
        if segment.size:
            position = segment.search(value, position, tail)
            if position < 0:
                return False
    return True


def _starts(value: str, prefix: str) -> bool:
    return value.startswith(prefix)


def _ends(value: str, suffix: str) -> bool:
    return value.endswith(suffix)
