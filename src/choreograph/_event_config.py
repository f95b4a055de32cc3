"""Event model configs that would change values on the wire, refused when the class is defined.

pydantic can be told to write floats, bytes and dates in ways the same model does not read
back as the value sent (``ser_json_inf_nan``, ``ser_json_bytes``/``val_json_bytes``,
``ser_json_temporal``). An event class configured so is a :class:`ConfigurationError` where it
is defined, not a value changed between producer and consumer (see :func:`refuse_lossy_config`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from choreograph.errors import ConfigurationError

if TYPE_CHECKING:
    from choreograph.events import Event

#: Core schema types that may serialise a value as ``null``: a float (inf, nan), a field of any
#: type (``Any``, ``dict[str, Any]``: a float at run time), and plain or wrap validators whose
#: inner type is unknown here.
_NULL_WRITERS = frozenset({"float", "any", "function-plain", "function-wrap"})


def refuse_lossy_config(cls: type[Event]) -> None:
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


def may_write_null_for_a_value(schema: Any) -> bool:
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
