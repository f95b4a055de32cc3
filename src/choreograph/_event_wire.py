"""What JSON cannot carry of an event, checked where it is emitted (and named where it is refused).

An event's JSON must read back, through its own model, as the value sent: a float ``inf`` or
``nan`` written as ``null`` (:func:`check_published`), an integer outside the 64-bit range or a
UTC offset with seconds (:func:`check_wire`) would reach consumers changed or not at all, so
emitting one is an :class:`EmitError`; :func:`not_carried` names such values in a refusal.
"""

from __future__ import annotations

import enum
import math
import re
import typing
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import pydantic
import pydantic_core

from choreograph._event_config import may_write_null_for_a_value
from choreograph.errors import EmitError

if TYPE_CHECKING:
    from choreograph.events import Event

#: Per event class: whether its data is written by its fields' aliases (see :func:`by_alias`).
_BY_ALIAS: dict[type, bool] = {}


def by_alias(cls: type[pydantic.BaseModel]) -> bool:
    """Whether ``cls``'s data goes on the wire by its fields' aliases (``by_alias=True``) or
    by their names: by alias, unless a key so written is one its consumers do not read (a
    ``serialization_alias`` with no matching ``validation_alias``, an ``alias_generator``
    that generates only serialization aliases) while every name is read. Consumers read the
    data through the model's validator, nested models' too, so the keys must be the ones it
    takes: written by alias, a field aliased only for serialization was refused by every
    consumer (``Field required``), as a field aliased both ways was when written by name."""
    found = _BY_ALIAS.get(cls)
    if found is None:
        aliases_read, names_read = _keys_read(cls, set())
        found = _BY_ALIAS[cls] = aliases_read or not names_read
    return found


def _keys_read(model: type[pydantic.BaseModel], seen: set[type]) -> tuple[bool, bool]:
    """(every key written by alias is read, every key written by name is read) for ``model``
    and the models its fields hold."""
    if model in seen:
        return True, True
    seen.add(model)
    config = model.model_config
    read_names = bool(config.get("validate_by_name") or config.get("populate_by_name"))
    read_aliases = config.get("validate_by_alias", True) is not False
    aliases_ok = names_ok = True
    for name, field in model.__pydantic_fields__.items():
        for inner in _models_in(field.annotation):
            inner_aliases, inner_names = _keys_read(inner, seen)
            aliases_ok, names_ok = aliases_ok and inner_aliases, names_ok and inner_names
        if field.exclude is True:
            continue
        read: set[str] = {name} if read_names else set()
        if read_aliases:
            if field.validation_alias is None:
                read.add(field.alias or name)
            else:
                read |= alias_keys(field.validation_alias)
        aliases_ok = aliases_ok and (field.serialization_alias or field.alias or name) in read
        names_ok = names_ok and name in read
    return aliases_ok, names_ok


def alias_keys(alias: str | pydantic.AliasPath | pydantic.AliasChoices) -> set[str]:
    """The top-level keys a validation alias reads a value from as it is (a one-step path)."""
    if isinstance(alias, str):
        return {alias}
    if isinstance(alias, pydantic.AliasPath):
        return {alias.path[0]} if len(alias.path) == 1 and isinstance(alias.path[0], str) else set()
    return set().union(*(alias_keys(choice) for choice in alias.choices))


def _models_in(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """The pydantic models in a field's annotation (``list[Line]``, ``Line | None``, ...)."""
    found, stack = [], [annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, pydantic.BaseModel):
            found.append(item)
        else:
            stack.extend(typing.get_args(item))
    return found


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("items", 0, "qty")`` -> ``$.items[0].qty``."""
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


#: Per event class: whether its JSON may hold a ``null`` that was a value (see below).
_LOSSY: dict[type, bool] = {}


def check_published(event: Event, data: bytes) -> None:
    """Raise :class:`EmitError` if ``data``, ``event`` serialised to JSON, does not read back
    as a valid instance of its own model the way a consumer reads it off the bus (orjson,
    then the model's validator): pydantic writes a float ``inf`` or ``nan`` as ``null``, which
    every consumer of a ``float`` field dead-letters ``invalid_payload``, the value lost; or,
    in a field that takes ``None`` (``float | None``, ``Any``), reads as ``None``, the value
    silently changed (found where the read-back differs from ``event``).

    The message names the event type, each field's path and why:
    ``'shop.price.quoted' cannot be published: $.value: inf cannot be carried by JSON; it
    would be published as null, which consumers refuse`` (``..., which consumers read as
    None`` for the second kind). The emitters call it only for data holding ``null`` (a bytes
    search), so that an event without one costs nothing more.
    """
    cls = type(event)
    lossy = _LOSSY.get(cls)
    if lossy is None:
        lossy = _LOSSY[cls] = may_write_null_for_a_value(cls.__pydantic_core_schema__)
    if not lossy:  # an optional field's None, not a lost value: no need to read it back
        return
    try:
        wire = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EmitError(f"{cls.__event_type__!r} cannot be published: its data is not valid JSON ({exc})") from None
    try:
        read = cls.__pydantic_validator__.validate_python(wire)
    except pydantic.ValidationError as exc:
        reasons = not_carried(event, wire, exc)  # one per path (a union's members each fail at the same one)
    else:
        # Valid, but an inf or nan in a field that takes None (``float | None``, ``Any``) reads
        # back as None: the value changed. Equal, it did not (the common case: a legit None);
        # unequal for another reason (an ``Any`` tuple read as a list), the search below is empty.
        if read.__dict__ == event.__dict__:
            return
        reasons = {}
    try:  # the values as the handler set them (python mode keeps inf and nan), keyed as in the JSON
        sent: Any = event.__pydantic_serializer__.to_python(event, by_alias=by_alias(type(event)))
    except Exception:  # noqa: BLE001 - only to say which value it was
        sent = _MISSING
    if sent is not _MISSING:
        for loc, value in _non_finite(sent):
            reasons.setdefault(field_path(loc), f"{value!r} {_READ_AS_NONE}")
    if reasons:
        summary = "; ".join(f"{path}: {reason}" for path, reason in list(reasons.items())[:5])
        more = f" (and {len(reasons) - 5} more)" if len(reasons) > 5 else ""
        raise EmitError(f"{cls.__event_type__!r} cannot be published: {summary}{more}")


_READ_AS_NONE = "cannot be carried by JSON; it would be published as null, which consumers read as None"


def _non_finite(sent: Any) -> list[tuple[tuple[int | str, ...], float]]:
    """Where ``sent``, an event's python-mode dump, holds a float inf or nan, and the value."""
    found: list[tuple[tuple[int | str, ...], float]] = []
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), sent)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                found.append((loc, value))
        elif isinstance(value, dict):
            stack.extend(((*loc, key if isinstance(key, str) else str(key)), item) for key, item in value.items())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(((*loc, index), item) for index, item in enumerate(value))
    found.reverse()
    return found


#: The integers orjson, which consumers read ``data`` with, reads as integers: it reads any other as a float.
I64_MIN = -(2**63)
U64_MAX = 2**64 - 1
#: Core schema types whose JSON may hold an integer: an int, and those whose value is unknown here.
_INT_WRITERS = frozenset({"int", "any", "function-plain", "function-wrap", "is-instance"})
#: Core schema types whose JSON may hold a datetime or time with a UTC offset.
_OFFSET_WRITERS = frozenset({"datetime", "time", "any", "function-plain", "function-wrap", "is-instance"})
#: Per event class: whether its JSON may hold an integer, and a datetime or time with an offset.
_WIRE_RISKS: dict[type, tuple[bool, bool]] = {}
#: Every integer outside the 64-bit range has 19 digits or more (-2**63 - 1 has 19).
_DIGITS_AS_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19
#: A JSON string ending in a UTC offset other than Z, as pydantic writes a datetime's or time's.
_OFFSET_AT_END = re.compile(rb'[+-][0-9]{2}:[0-9]{2}"')


def plan_wire_checks(cls: type[Event]) -> None:
    """Set ``cls.__wire_checks__`` and its :data:`_WIRE_RISKS` from its core schema: ``()`` if no
    part of it can write an integer or an offset; the names of its top-level ``int`` fields
    (``int | None`` and defaults too) if they are the only such parts, which the emitters
    compare with the 64-bit range in place (cheaper than any search of the JSON); else ``None``.

    A model that holds itself (a tree: ``children: list[Node]``) writes its int fields at depth
    too, through a reference to the one schema whose top level is compared in place: ``None``."""
    schema = cls.__pydantic_core_schema__
    model = schema
    top_ref = None  # the reference that stands for the model at the top (not a part holding it)
    if model.get("type") == "definitions":  # a model with a recursive or shared part
        top_ref = model["schema"]
        model = model["schema"]
        if model.get("type") == "definition-ref":
            model = next((part for part in schema["definitions"] if part.get("ref") == model["schema_ref"]), {})
    fields: list[str] = []
    compared: set[int] = set()  # the schemas of those fields, left out of the search below
    if model.get("type") == "model" and model["schema"].get("type") == "model-fields":
        for name, field in model["schema"]["fields"].items():
            inner = field["schema"]
            while inner.get("type") in ("default", "nullable") and "serialization" not in inner:
                inner = inner["schema"]
            if inner.get("type") == "int" and "serialization" not in inner:
                fields.append(name)
                compared.add(id(inner))
    ints = offsets = False
    refs: set[Any] = set()  # the definitions some part refers to
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if id(node) in compared:
                continue
            kind = node.get("type")  # a schema's kind, or (a model field named "type") a schema
            if isinstance(kind, str):
                ints = ints or kind in _INT_WRITERS or (kind in ("literal", "enum") and _holds_a_wide_int(node))
                offsets = offsets or kind in _OFFSET_WRITERS
                if kind == "definition-ref" and node is not top_ref:
                    refs.add(node.get("schema_ref"))
            if node.get("extra_fields_behavior") == "allow":  # extra values are written by their type at run time
                ints = offsets = True
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    if fields and model.get("ref") in refs:  # it holds itself: its int fields are searched for
        ints = True
    _WIRE_RISKS[cls] = (ints or bool(fields), offsets)
    cls.__wire_checks__ = tuple(fields) if fields and not ints and not offsets else (
        None if fields or ints or offsets else ())


def _holds_a_wide_int(node: dict[str, Any]) -> bool:
    """Whether ``node``, a ``literal`` or ``enum`` core schema, has an integer value outside the
    64-bit range (``Literal[2**64]``, an ``IntEnum`` member): written as it is, as an ``int``
    field's value is, so searched for as one. Not every ``literal`` and ``enum``: most hold
    none, and their models keep the cheaper checks."""
    values = node.get("expected", ()) if node.get("type") == "literal" else node.get("members", ())
    if not isinstance(values, (list, tuple)):  # a model field named "expected" or "members"
        return False
    for value in values:
        value = value.value if isinstance(value, enum.Enum) else value  # Literal[Size.HUGE]
        if isinstance(value, int) and not isinstance(value, bool) and not I64_MIN <= value <= U64_MAX:
            return True
    return False


def check_wire(event: Event, data: bytes) -> None:
    """Raise :class:`EmitError` if ``data``, ``event`` serialised to JSON, holds a value that
    consumers would read back as another, or not at all:

    - an integer outside the 64-bit range (-2**63 to 2**64-1): orjson, which consumers read
      data with, reads it as a float, which an ``int`` field refuses (``invalid_payload``, one
      hop later) and an ``Any`` field keeps, rounded;
    - a datetime or time whose UTC offset has seconds (historic zones, +05:30:15): RFC 3339
      offsets have hours and minutes only, so pydantic writes ``+05:30``, another instant.

    Its message is :func:`check_published`'s, naming each field:
    ``'shop.ledger.posted' cannot be published: $.total: 18446744073709551616 cannot be carried
    by JSON; consumers read an integer outside the 64-bit range as a float (1.8446744073709552e+19)``.

    The emitters call it only when the model's schema may hold either (``__wire_checks__``). When
    all it may hold are top-level int fields, their values are compared with the range in place
    (``output_message`` and ``first_envelope`` do that themselves, calling only on a value out of
    range); else a search of ``data`` comes first (a run of 19 digits; an offset at the end of a
    string), and only what it finds is looked for in the values.
    """
    cls = type(event)
    checks = cls.__wire_checks__
    if checks:  # top-level int fields only: compared in place
        values = event.__dict__
        try:
            if all(I64_MIN <= (values[name] or 0) <= U64_MAX for name in checks):  # or 0: an int | None's None
                return
        except (TypeError, KeyError):  # not an int, or not set (model_construct): search below
            pass
    ints, offsets = _WIRE_RISKS.get(cls, (True, True))
    reasons: dict[str, str] = {}
    if ints and data.translate(_DIGITS_AS_ZEROS).find(_NINETEEN_DIGITS) != -1:
        for loc, value in _leaves(event.__pydantic_serializer__.to_python(event, mode="json", by_alias=by_alias(cls))):
            if type(value) is int and not I64_MIN <= value <= U64_MAX:
                reasons.setdefault(field_path(loc), f"{value} {_NOT_AN_INT}{_as_float(value)}")
    if offsets and _OFFSET_AT_END.search(data) is not None:
        for loc, value in _leaves(event.__pydantic_serializer__.to_python(event, by_alias=by_alias(type(event)))):
            if isinstance(value, (datetime, time)):
                problem = _offset_problem(value)
                if problem is not None and _written_cut(value, data):
                    reasons.setdefault(field_path(loc), problem)
    if reasons:
        summary = "; ".join(f"{path}: {reason}" for path, reason in list(reasons.items())[:5])
        more = f" (and {len(reasons) - 5} more)" if len(reasons) > 5 else ""
        raise EmitError(f"{cls.__event_type__!r} cannot be published: {summary}{more}")


_NOT_AN_INT = "cannot be carried by JSON; consumers read an integer outside the 64-bit range as a float"


def _as_float(value: int) -> str:
    try:
        return f" ({float(value)!r})"
    except OverflowError:  # past a double: not read at all
        return " (this one is past any float: consumers cannot read the event)"


def _offset_problem(value: datetime | time) -> str | None:
    try:
        offset = value.utcoffset()
    except Exception:  # noqa: BLE001 - a tzinfo that cannot say (a zone, for a time): written without one
        return None
    if offset is None or not offset % timedelta(minutes=1):
        return None
    return (f"{value.isoformat()} has a UTC offset with seconds, which RFC 3339 cannot carry; it would be "
            f"published with the offset cut to hours and minutes, another time: convert it first "
            f"(e.g. .astimezone(UTC))")


def _written_cut(value: datetime | time, data: bytes) -> bool:
    """Whether ``data`` holds ``value`` as pydantic writes it, its offset cut: not if the model's
    own JSON serializer wrote it otherwise (``when_used="json"``, converted to UTC, say), which
    the Python dump the values are read from does not show."""
    try:
        written = pydantic_core.to_json(value)
    except (pydantic_core.PydanticSerializationError, ValueError):  # a tzinfo that cannot say: look no further
        return True
    return data.find(written) != -1


def _leaves(sent: Any) -> list[tuple[tuple[int | str, ...], Any]]:
    """Every value in ``sent``, an event's dump, with its path; a dict's keys that are not
    strings too (a datetime key is written as text), at the path of their value."""
    found: list[tuple[tuple[int | str, ...], Any]] = []
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), sent)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                at = (*loc, key if isinstance(key, str) else str(key))
                if not isinstance(key, str):
                    found.append((at, key))
                stack.append((at, item))
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(((*loc, index), item) for index, item in enumerate(value))
        else:
            found.append((loc, value))
    found.reverse()
    return found


def not_carried(event: Event, wire: Any, exc: pydantic.ValidationError) -> dict[str, str]:
    """Per JSON path (``$.readings[0][1]``), why ``wire``, ``event`` as published, failed to read
    back as its model (``exc``): the value sent and what it became. The path is the one in the
    JSON: a union member's tag or a validator's name in an error's ``loc`` is left out, and a
    path that several union members fail at is given once. What :func:`check_published` and
    the gateway (a 422 per field) say."""
    try:  # the values as the handler set them (python mode keeps inf and nan), keyed as in the JSON
        sent: Any = event.__pydantic_serializer__.to_python(event, by_alias=by_alias(type(event)))
    except Exception:  # noqa: BLE001 - only to say which value it was
        sent = _MISSING
    reasons: dict[str, str] = {}
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc, published, original = _located(wire, sent, tuple(error["loc"]))
        path = field_path(loc)
        if path not in reasons:
            reasons[path] = _not_carried(original, published, str(error["msg"]))
    return reasons


_MISSING: Any = object()


def _located(wire: Any, sent: Any, loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], Any, Any]:
    """A validation error's ``loc`` without the parts that are not keys or indexes in the JSON
    (a union member's tag, ``function-after[...]``), and the published and sent values there."""
    path: list[int | str] = []
    for part in loc:
        if isinstance(wire, dict) and part in wire:
            wire = wire[part]
        elif isinstance(wire, list) and isinstance(part, int) and -len(wire) <= part < len(wire):
            wire = wire[part]
        else:
            continue
        path.append(part)
        if sent is not _MISSING:
            try:
                sent = sent[part]
            except Exception:  # noqa: BLE001 - a set, a model python mode kept: the value is unknown
                sent = _MISSING
    return tuple(path), wire, sent


def _not_carried(sent: Any, published: Any, msg: str) -> str:
    if isinstance(sent, float) and not math.isfinite(sent):
        return f"{sent!r} cannot be carried by JSON; it would be published as null, which consumers refuse"
    return (f"it would be published as {orjson.dumps(published).decode()}, "
            f"which consumers refuse: {msg}")
