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

from typing import Any, ClassVar, TypeGuard

import pydantic

from choreograph._envelope import string_problem
from choreograph._event_config import refuse_lossy_config
from choreograph._event_wire import by_alias, check_published, check_wire, field_path, plan_wire_checks
from choreograph.errors import ConfigurationError

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
            _complete(cls)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__pydantic_complete__ and cls.__event_type__:  # older pydantic: not if it waits for a forward reference
            _complete(cls)

    @classmethod
    def event_type(cls) -> str:
        """The CloudEvents ``type`` of this event."""
        return cls.__event_type__

    @classmethod
    def schema_uri(cls) -> str:
        """The CloudEvents ``dataschema`` of this event (a URN naming type and version)."""
        return cls.__schema_uri__


def is_event_class(value: object) -> TypeGuard[type[Event]]:
    """Whether ``value`` is an Event subclass, which has a type: not ``Event`` itself, which names
    none (a handler of it would be drawn consuming a nameless type and never run; one declaring it,
    emitting nothing, and every event it returned would be refused)."""
    return isinstance(value, type) and issubclass(value, Event) and bool(value.__event_type__)


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
        lines.append(f"{field_path(error['loc'])}: {error['msg']}")
    return f"{exc.title}: " + "; ".join(lines)


def event_json(event: Event) -> bytes:
    """``event`` serialised to JSON, the CloudEvent ``data`` it is published with; :class:`EmitError`
    if consumers could not read it back (see :func:`check_published` and :func:`check_wire`)."""
    data = event.__pydantic_serializer__.to_json(event, by_alias=by_alias(type(event)))
    # Cheap: only data that holds a null can have lost a value to it. find(), not ``in``: on
    # bytes ``in`` first tries the operand as an integer, raising and clearing a TypeError.
    if data.find(b"null") != -1:
        check_published(event, data)
    checks = type(event).__wire_checks__
    if checks or checks is None:
        check_wire(event, data)
    return data


def _complete(cls: type[Event]) -> None:
    """Once ``cls``'s schema is built: refuse a config that changes values on the wire (unbinding
    its type, bound by ``__init_subclass__``: a refused class is not), and plan its wire checks."""
    try:
        refuse_lossy_config(cls)
    except ConfigurationError:
        if _REGISTRY.get(cls.__event_type__) is cls:
            del _REGISTRY[cls.__event_type__]
        raise
    plan_wire_checks(cls)
