"""Filters of a push subscription, in the CloudEvents Subscriptions API's filter language.

A subscription's ``filters`` is a list of filter objects, each ``{dialect: value}``, all of
which must hold for an event to be delivered (an empty list: every event). The dialects
are the spec's (§3.2.4.1)::

    {"exact":  {"type": "drone.drone.assigned", "subject": "eu"}}  # every value equal (case-sensitive)
    {"prefix": {"type": "drone."}}                                 # every value starts with it
    {"suffix": {"type": ".assigned"}}                              # every value ends with it
    {"all": [filter, ...]}    {"any": [filter, ...]}    {"not": filter}
    {"sql": "hops < 10 AND subject LIKE 'eu-%'"}                   # CESQL v1 (choreograph.cesql)

They read the event's context attributes and extensions (``type``, ``subject``,
``correlationid``, ``hops``...). A missing attribute does not match (``not`` then
turns that into a match, as the spec's inversion says); a non-string attribute is
compared by its CloudEvents string form (``hops`` 3 is ``"3"``, a Boolean is
``"true"``/``"false"``). A ``sql`` filter passes only on the Boolean ``true`` with no
evaluation error.

:func:`compile_filters` checks everything the spec requires and refuses what could
never match (an unknown dialect, several dialects in one object, an empty attribute
name or value, a name that is not a CloudEvents attribute name, an empty ``all``/``any``,
CESQL that does not parse or is not a condition), raising :class:`FilterError` with
the path of the mistake (``filters[0].exact.type``). What it returns is one predicate,
built once of closures: evaluating an event reads only the attributes the filters name.

*Decision:* one dialect per filter object. The spec's OpenAPI lets an ``sql`` object
carry other keys (``additionalProperties: true``), but its prose encodes a filter as
``{"dialect": ...}``, and a second key would be a dialect silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from choreograph import cesql
from choreograph._envelope import Envelope
from choreograph.errors import ConfigurationError

__all__ = ["DIALECTS", "FilterError", "Filters", "compile_filters", "envelope_attributes"]

DIALECTS = ("all", "any", "exact", "not", "prefix", "sql", "suffix")

#: CloudEvents attribute names: lower-case ASCII letters and digits (core spec, "Attribute Naming").
_NAME = re.compile(r"^[a-z0-9]+$")
#: Envelope fields read as attributes; any other name is looked up in ``extensions``.
_FIELDS = frozenset(Envelope.__struct_fields__) - {"data", "extensions"}
#: CESQL text that needs brackets when combined with other filters in a rendering.
_CONNECTIVE = re.compile(r"\b(AND|OR|XOR)\b", re.IGNORECASE)

_Test = Callable[[Mapping[str, Any]], bool]

#: The most ``all``/``any``/``not`` objects a filter may nest inside one another. Checking,
#: copying and evaluating a filter recurse once or more per level: deeper, a Python
#: ``RecursionError`` escaped from :func:`compile_filters` instead of a :class:`FilterError`.
MAX_NESTING = 64


class FilterError(ConfigurationError):
    """A filter the spec does not allow, or one that could never match: ``path`` says where
    (``filters[1].all[0].exact``), ``reason`` what is wrong."""

    def __init__(self, path: str, reason: str, owner: str | None = None) -> None:
        super().__init__(f"{owner}: {path}: {reason}" if owner else f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class _Compiled:
    test: _Test
    text: str
    level: int  # 0 a single test, 1 an AND chain, 2 an OR chain, 3 CESQL (bracket when combined)
    references: frozenset[str]


class Filters:
    """A subscription's filters compiled to one predicate.

    >>> f = compile_filters([{"prefix": {"type": "drone."}}, {"sql": "hops < 10"}])
    >>> f.matches({"type": "drone.drone.assigned", "hops": 2})
    True
    >>> f.text
    "type starts with 'drone.' and hops < 10"

    ``source`` is the list of filter objects as given (spec JSON shape), ``text`` a short
    human rendering (for the flow graph), ``references`` the attribute names read.
    """

    __slots__ = ("_test", "references", "source", "text")

    def __init__(self, source: list[dict[str, Any]], compiled: _Compiled) -> None:
        self.source = source
        self._test = compiled.test
        self.text = compiled.text
        self.references = compiled.references

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        """Whether an event with these attributes (lower-case names to values) passes every filter."""
        return self._test(attributes)

    def matches_envelope(self, envelope: Envelope) -> bool:
        """:meth:`matches` on an envelope's context attributes and extensions."""
        return self._test(envelope_attributes(envelope, self.references))

    def __repr__(self) -> str:
        return f"Filters({self.text!r})"


def envelope_attributes(envelope: Envelope, names: frozenset[str] | set[str]) -> dict[str, Any]:
    """The named attributes of ``envelope`` (``None`` for an absent one)."""
    return {
        name: getattr(envelope, name) if name in _FIELDS else envelope.extensions.get(name) for name in names
    }


def compile_filters(filters: Sequence[Any] | None = None, where: str | None = None) -> Filters | None:
    """Check and compile ``filters`` (a list of filter objects) and ``where`` (one CESQL
    expression, the same as a trailing ``{"sql": where}``); ``None`` when there is nothing
    to filter. Raises :class:`FilterError` naming the path of the first mistake."""
    items: list[Any]
    if filters is None:
        items = []
    elif isinstance(filters, Sequence) and not isinstance(filters, str | bytes):
        items = list(filters)
    else:
        raise FilterError("filters", f"expected a list of filter objects, got {type(filters).__name__}")
    parts = [_compile(item, f"filters[{i}]") for i, item in enumerate(items)]
    source = [_plain(item) for item in items]
    if where is not None:
        parts.append(_sql(where, "where"))
        source.append({"sql": where})
    if not parts:
        return None
    return Filters(source, parts[0] if len(parts) == 1 else _all(parts))


def _plain(value: Any) -> Any:
    """A JSON-ready copy (TOML and YAML hand over their own mapping types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _compile(item: Any, path: str, depth: int = 0) -> _Compiled:
    if depth > MAX_NESTING:
        raise FilterError(path, f"all/any/not nested more than {MAX_NESTING} levels deep")
    if not isinstance(item, Mapping):
        raise FilterError(path, f"expected a filter object {{dialect: ...}}, got {type(item).__name__}")
    if len(item) != 1:
        if not item:
            raise FilterError(path, f"an empty filter object; give one dialect of {', '.join(DIALECTS)}")
        raise FilterError(path, f"one dialect per filter object, got {len(item)} ({', '.join(map(str, item))}); "
                                "put each in its own object (the list is ANDed) or use 'all'/'any'")
    [(dialect, value)] = item.items()
    where = f"{path}.{dialect}"
    if dialect in ("exact", "prefix", "suffix"):
        return _attribute_filter(dialect, value, where)
    if dialect in ("all", "any"):
        if not isinstance(value, Sequence) or isinstance(value, str | bytes | Mapping):
            raise FilterError(where, f"expected a list of filter objects, got {type(value).__name__}")
        if not value:
            raise FilterError(where, "list at least one filter")
        children = [_compile(child, f"{where}[{i}]", depth + 1) for i, child in enumerate(value)]
        return _all(children) if dialect == "all" else _any(children)
    if dialect == "not":
        if not isinstance(value, Mapping):
            raise FilterError(where, f"expected one filter object, got {type(value).__name__}")
        return _not(_compile(value, where, depth + 1))
    if dialect == "sql":
        return _sql(value, where)
    raise FilterError(path, f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")


def _string(value: Any) -> str | None:
    """An attribute's CloudEvents string form; ``None`` when it is absent."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_COMPARE: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda actual, wanted: actual == wanted,
    "prefix": lambda actual, wanted: actual.startswith(wanted),
    "suffix": lambda actual, wanted: actual.endswith(wanted),
}


def _attribute_filter(dialect: str, value: Any, where: str) -> _Compiled:
    if not isinstance(value, Mapping):
        raise FilterError(where, f"expected a mapping of attribute names to strings, got {type(value).__name__}")
    if not value:
        raise FilterError(where, "name at least one attribute, e.g. { type = \"...\" }")
    pairs: list[tuple[str, str]] = []
    for name, wanted in value.items():
        if not isinstance(name, str) or not name:
            raise FilterError(where, "an attribute name must not be empty")
        if not _NAME.fullmatch(name):
            raise FilterError(f"{where}.{name}", "not a CloudEvents attribute name (lower-case letters a-z "
                                                 "and digits only), so it would never match")
        if not isinstance(wanted, str):
            raise FilterError(f"{where}.{name}", f"expected a string, got {type(wanted).__name__} "
                                                 "(the spec compares strings: quote the value)")
        if not wanted:
            raise FilterError(f"{where}.{name}", "the value must not be empty")
        pairs.append((name, wanted))
    compare = _COMPARE[dialect]
    verb = {"exact": "=", "prefix": "starts with", "suffix": "ends with"}[dialect]

    if len(pairs) == 1:
        [(name, wanted)] = pairs

        def one(attributes: Mapping[str, Any]) -> bool:
            actual = _string(attributes.get(name))
            return actual is not None and compare(actual, wanted)

        test: _Test = one
    else:
        def every(attributes: Mapping[str, Any]) -> bool:
            for name, wanted in pairs:
                actual = _string(attributes.get(name))
                if actual is None or not compare(actual, wanted):
                    return False
            return True

        test = every
    text = " and ".join(f"{name} {verb} {_quote(wanted)}" for name, wanted in pairs)
    return _Compiled(test, text, 0 if len(pairs) == 1 else 1, frozenset(name for name, _ in pairs))


def _sql(expression: Any, where: str) -> _Compiled:
    if not isinstance(expression, str):
        raise FilterError(where, f"expected a CESQL expression (a string), got {type(expression).__name__}")
    try:
        compiled = cesql.compile(expression, strict=True)
    except cesql.CESQLParseError as exc:
        raise FilterError(where, f"not a valid CESQL expression: {exc}") from None
    if compiled.type not in ("Boolean", None):
        article = "an" if compiled.type == "Integer" else "a"
        raise FilterError(where, f"{expression!r} is {article} {compiled.type} expression; a filter must be a "
                                 "condition (a Boolean), e.g. \"subject = 'eu'\"")
    level = 3 if _CONNECTIVE.search(expression) else 0
    return _Compiled(compiled.matches, expression, level, compiled.references)


def _bracket(part: _Compiled, allowed: int) -> str:
    return part.text if part.level <= allowed else f"({part.text})"


def _all(parts: list[_Compiled]) -> _Compiled:
    if len(parts) == 1:
        return parts[0]
    tests = tuple(part.test for part in parts)

    def all_of(attributes: Mapping[str, Any]) -> bool:
        return all(test(attributes) for test in tests)

    text = " and ".join(_bracket(part, 1) for part in parts)
    return _Compiled(all_of, text, 1, frozenset().union(*(part.references for part in parts)))


def _any(parts: list[_Compiled]) -> _Compiled:
    if len(parts) == 1:
        return parts[0]
    tests = tuple(part.test for part in parts)

    def any_of(attributes: Mapping[str, Any]) -> bool:
        return any(test(attributes) for test in tests)

    text = " or ".join(part.text if part.level in (0, 2) else f"({part.text})" for part in parts)
    return _Compiled(any_of, text, 2, frozenset().union(*(part.references for part in parts)))


def _not(part: _Compiled) -> _Compiled:
    test = part.test

    def inverted(attributes: Mapping[str, Any]) -> bool:
        return not test(attributes)

    return _Compiled(inverted, f"not ({part.text})", 0, part.references)
