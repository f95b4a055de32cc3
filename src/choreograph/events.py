"""Typed events: a pydantic model bound to a CloudEvents ``type`` and a schema version.

>>> class PackageCreated(Event, type="drone.package.created", version=1):
...     package_id: str
...     weight_kg: float
>>> PackageCreated.event_type()
'drone.package.created'

The model is the payload (the CloudEvent ``data``); the envelope attributes (id,
correlation, causation, ...) live on the :class:`~choreograph.Envelope` and reach a
handler through its context.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable
from datetime import datetime, time, timedelta
from typing import Any, ClassVar

import orjson
import pydantic
import pydantic_core

from choreograph._envelope import string_problem
from choreograph.errors import ConfigurationError, EmitError

_REGISTRY: dict[str, type[Event]] = {}


class Event(pydantic.BaseModel):
    """Base class of every event payload. Subclass with ``type=`` (and optionally ``version=``).

    Unknown fields are rejected (``extra="forbid"``) so a producer's typo is a clear
    validation error at the consumer instead of silently ignored data.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    __event_type__: ClassVar[str] = ""
    __event_version__: ClassVar[int] = 1
    __schema_uri__: ClassVar[str] = ""
    #: What the emitters check in this model's values beyond its JSON's nulls (see :func:`check_wire`):
    #: ``()`` nothing, a tuple of field names the int fields to compare against the 64-bit range,
    #: ``None`` whatever :func:`check_wire` finds the model may need. Set once its schema is built.
    __wire_checks__: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, *, type: str | None = None, version: int = 1, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__wire_checks__ = None  # not its parent's: the full check until its own schema is built
        if type is None:
            if not cls.__event_type__:
                raise ConfigurationError(
                    f"{cls.__qualname__}: an Event subclass needs a type, e.g. "
                    f"class {cls.__name__}(Event, type=\"shop.order.placed\")"
                )
            # inherits its parent's type (e.g. a model with extra helpers), or set it in its body
            cls.__schema_uri__ = f"urn:choreograph:schema:{cls.__event_type__}:v{cls.__event_version__}"
            return
        problem = event_type_problem(type)
        if problem is not None:
            raise ConfigurationError(f"{cls.__qualname__}: type {type!r} {problem}")
        if version < 1:
            raise ConfigurationError(f"{cls.__qualname__}: version must be >= 1")
        cls.__event_type__ = type
        cls.__event_version__ = version
        cls.__schema_uri__ = f"urn:choreograph:schema:{type}:v{version}"
        existing = _REGISTRY.get(type)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            # Re-importing the same module (tests, reloads) re-defines the class: allowed.
            raise ConfigurationError(
                f"{cls.__qualname__}: event type {type!r} is already bound to {existing.__module__}.{existing.__qualname__}"
            )
        _REGISTRY[type] = cls

    @classmethod
    def __pydantic_on_complete__(cls) -> None:  # pydantic >= 2.12: once its schema is built, rebuilt too
        super().__pydantic_on_complete__()
        if cls.__event_type__:  # not Event itself
            _refuse_lossy_config(cls)
            _plan_wire_checks(cls)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__pydantic_complete__ and cls.__event_type__:  # older pydantic: not if it waits for a forward reference
            _refuse_lossy_config(cls)
            _plan_wire_checks(cls)

    @classmethod
    def event_type(cls) -> str:
        """The CloudEvents ``type`` of this event."""
        return cls.__event_type__

    @classmethod
    def schema_uri(cls) -> str:
        """The CloudEvents ``dataschema`` of this event (a URN naming type and version)."""
        return cls.__schema_uri__


def event_type_problem(type_name: str) -> str | None:
    """Why ``type_name`` cannot be an event type, or ``None`` if it can.

    The one rule for Event subclasses and for whatever else names a type by hand (the
    ``choreograph publish`` command), so both refuse the same names. ``choreograph.*`` is
    the runtime's own: a ``choreograph.failed`` published by anyone else would reach
    ``on_failure`` handlers as a failure record the runtime never wrote.

    >>> event_type_problem("choreograph.failed")
    "is reserved (choreograph.* types are the runtime's own events)"
    """
    if not type_name:
        return "is empty"
    if type_name.startswith("choreograph."):
        return "is reserved (choreograph.* types are the runtime's own events)"
    return string_problem(type_name)  # a control character, a surrogate, a Unicode noncharacter


def event_class(type_name: str) -> type[Event] | None:
    """The Event subclass bound to ``type_name`` in this process, if any."""
    return _REGISTRY.get(type_name)


def registered_types() -> dict[str, type[Event]]:
    """Every event type defined in this process (a copy)."""
    return dict(_REGISTRY)


def format_validation_error(exc: pydantic.ValidationError) -> str:
    """One line per bad field, naming its path and the reason: ``$.items[0].qty: Input should be > 0``."""
    lines = []
    for error in exc.errors(include_url=False):
        path = "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
        lines.append(f"{path}: {error['msg']}")
    return f"{exc.title}: " + "; ".join(lines)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("items", 0, "qty")`` -> ``$.items[0].qty``."""
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def event_json(event: Event) -> bytes:
    """``event`` serialised to JSON, the CloudEvent ``data`` it is published with; :class:`EmitError`
    if consumers could not read it back (see :func:`check_published` and :func:`check_wire`)."""
    data = event.__pydantic_serializer__.to_json(event)
    # Cheap: only data that holds a null can have lost a value to it. find(), not ``in``: on
    # bytes ``in`` first tries the operand as an integer, raising and clearing a TypeError.
    if data.find(b"null") != -1:
        check_published(event, data)
    checks = type(event).__wire_checks__
    if checks or checks is None:
        check_wire(event, data)
    return data


#: Per event class: whether its JSON may hold a ``null`` that was a value (see below).
_LOSSY: dict[type, bool] = {}
#: Core schema types that may serialise a value as ``null``: a float (inf, nan), a field of any
#: type (``Any``, ``dict[str, Any]``: a float at run time), and plain or wrap validators whose
#: inner type is unknown here.
_NULL_WRITERS = frozenset({"float", "any", "function-plain", "function-wrap"})


def _refuse_lossy_config(cls: type[Event]) -> None:
    """:class:`ConfigurationError` if ``cls`` or a model in it is configured to write values its
    consumers (the same model) would read back changed:

    - ``ser_json_inf_nan`` other than ``"null"``: ``"constants"`` writes ``Infinity`` and ``NaN``,
      which are not JSON (no consumer can read the envelope); ``"strings"`` writes ``"Infinity"``,
      which a consumer reads as a ``str`` where the field also takes one (``Any``, ``float | str``)
      and refuses in strict mode;
    - ``ser_json_bytes`` other than ``val_json_bytes``: bytes written as base64 are read back as
      their base64 text, UTF-8 text read as base64 is decoded to other bytes;
    - ``ser_json_temporal`` other than ``"iso8601"`` (pydantic >= 2.12): datetimes, dates, times
      and durations written as numbers; a naive datetime or time is read back as UTC, an aware
      one loses its offset, and with ``"milliseconds"`` a time is refused (over 86,399).

    Each only where the config is the one such a value (a float, bytes, a date or time) is
    written or read by (:func:`_writes_by_config`): a shared base config on a nested model
    without one is harmless.
    """
    schema = cls.__pydantic_core_schema__
    definitions: dict[Any, Any] = {}
    if schema.get("type") == "definitions":
        definitions = {part.get("ref"): part for part in schema["definitions"] if isinstance(part, dict)}
    stack: list[tuple[Any, Any]] = [(schema, None)]  # a part and the part holding it
    while stack:
        node, parent = stack.pop()
        if isinstance(node, dict):
            holder = parent if isinstance(parent, dict) and parent.get("config") is node else None

            def writes(kind: Callable[[dict[str, Any]], bool], holder: Any = holder) -> bool:
                return holder is None or _writes_by_config(holder, holder.get("cls") is cls, definitions, kind)

            problem = _config_problem(node, writes)
            if problem is not None:
                owner = node.get("title")
                which = "its config" if owner in (None, cls.__name__) else f"{owner}, a model in it,"
                if _REGISTRY.get(cls.__event_type__) is cls:  # bound by __init_subclass__: a refused class is not
                    del _REGISTRY[cls.__event_type__]
                raise ConfigurationError(f"{cls.__qualname__}: {which} {problem}")
            stack.extend((value, node) for value in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((value, parent) for value in node)


#: What pydantic writes (or reads) by a config's ``ser_json_temporal``, ``ser_json_inf_nan`` and
#: ``ser_json_bytes``/``val_json_bytes``, of the owner's (the model, dataclass or TypedDict whose
#: config it is) typed fields: a core schema part of these types ...
_TEMPORAL = frozenset({"datetime", "date", "time", "timedelta"})


def _temporal_part(node: dict[str, Any]) -> bool:
    return node.get("type") in _TEMPORAL


def _float_part(node: dict[str, Any]) -> bool:  # a Decimal or complex is written as a string either way
    return node.get("type") == "float"


def _bytes_part(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "bytes" or (kind == "literal" and any(isinstance(v, bytes) for v in node.get("expected", ())))


#: ... and values whose type is known only at run time, written by the config of the model
#: serialised (the event's), wherever they sit: an ``Any`` holding a datetime, a serializer
#: function returning one, an extra field.
_INFERRED = frozenset({"any", "function-plain", "function-wrap", "is-instance"})


def _writes_by_config(
    owner: dict[str, Any], is_event: bool, definitions: dict[Any, Any], typed: Callable[[dict[str, Any]], bool]
) -> bool:
    """Whether ``owner``, a core schema part with a ``config`` (model, dataclass, TypedDict), may
    write a value of a kind ``typed`` recognises (a datetime, a float, bytes) by that config: such
    a part among its own (not those of a model in it, which has a config of its own) or a part of
    unknown type. The event's config (``is_event``) also writes the parts of unknown type of
    every model in it (pydantic infers them by the config of the model serialised); a nested
    model's is counted for its own ones too, in case a pydantic version infers by the nearest
    config."""
    if owner["config"].get("extra_fields_behavior") == "allow":  # extra values: typed at run time
        return True
    stack: list[tuple[Any, bool]] = [(owner, True)]  # a part, and whether it is the owner's own
    seen: set[tuple[int, bool]] = set()
    while stack:
        node, own = stack.pop()
        if isinstance(node, dict):
            if (id(node), own) in seen:
                continue
            seen.add((id(node), own))
            if node is not owner and isinstance(node.get("config"), dict):  # another model: its own config
                if not is_event:
                    continue
                own = False
            kind = node.get("type")
            if isinstance(kind, str) and ((own and typed(node)) or kind in _INFERRED):
                return True
            if node.get("extra_fields_behavior") == "allow":  # extra values: typed at run time
                return True
            if kind == "definition-ref" and node.get("schema_ref") in definitions:
                stack.append((definitions[node["schema_ref"]], own))
            stack.extend((value, own) for key, value in node.items() if node is not owner or key != "config")
        elif isinstance(node, (list, tuple)):
            stack.extend((value, own) for value in node)
    return False


def _config_problem(node: dict[str, Any], writes: Callable[[Callable[[dict[str, Any]], bool]], bool]) -> str | None:
    """What makes ``node``, a model's config in its core schema (or any other part of it), lossy:
    a setting counts only if ``writes`` says the config writes (or reads) a value it changes
    (see :func:`_writes_by_config`)."""
    mode = node.get("ser_json_inf_nan")  # a config's, or (a field of that name) a schema
    if isinstance(mode, str) and mode != "null" and writes(_float_part):
        return (f"sets ser_json_inf_nan={mode!r}, which consumers cannot read back as the value sent "
                f"({_INF_NAN_MODES.get(mode, 'not JSON')}); leave the default: an event holding inf or nan "
                f"is then refused where it is emitted")
    unit = node.get("ser_json_temporal")  # pydantic >= 2.12
    if isinstance(unit, str) and unit != "iso8601" and writes(_temporal_part):
        return (f"sets ser_json_temporal={unit!r}, which consumers cannot read back as the value sent "
                f"(a naive datetime or time is read back as UTC, a UTC offset is lost"
                f"{', a time is refused: its milliseconds exceed 86,399' if unit == 'milliseconds' else ''}); "
                f"leave the default, 'iso8601'")
    written, read = node.get("ser_json_bytes", "utf8"), node.get("val_json_bytes", "utf8")
    if isinstance(written, str) and isinstance(read, str) and written != read and writes(_bytes_part):
        return (f"writes bytes as {written} (ser_json_bytes) but reads them as {read} (val_json_bytes): "
                f"consumers would read other bytes than were sent; set both to the same encoding")
    return None


_INF_NAN_MODES = {
    "constants": "Infinity and NaN are not JSON: no consumer could read the event",
    "strings": '"Infinity" and "NaN" are strings: read as a str where a field takes one, refused in strict mode',
}


def _may_write_null_for_a_value(schema: Any) -> bool:
    """Whether a pydantic core ``schema`` has a part :data:`_NULL_WRITERS` names: for models with
    none, a ``null`` in the data is an optional field's ``None`` and is not read back."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")  # a schema's kind, or (a model field named "type") a schema
            if isinstance(kind, str) and kind in _NULL_WRITERS:
                return True
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


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
        lossy = _LOSSY[cls] = _may_write_null_for_a_value(cls.__pydantic_core_schema__)
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
        sent: Any = event.__pydantic_serializer__.to_python(event)
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


def _plan_wire_checks(cls: type[Event]) -> None:
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
        for loc, value in _leaves(event.__pydantic_serializer__.to_python(event, mode="json")):
            if type(value) is int and not I64_MIN <= value <= U64_MAX:
                reasons.setdefault(field_path(loc), f"{value} {_NOT_AN_INT}{_as_float(value)}")
    if offsets and _OFFSET_AT_END.search(data) is not None:
        for loc, value in _leaves(event.__pydantic_serializer__.to_python(event)):
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
        sent: Any = event.__pydantic_serializer__.to_python(event)
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
