"""The public API is a tested list: changing it is a deliberate edit here, never an accident."""

from __future__ import annotations

import types

import choreograph

#: The public API. Adding or removing a name is an API change: update this list on purpose.
EXPECTED = [
    "FAILED",
    "App",
    "ChoreographError",
    "ConfigurationError",
    "Context",
    "EmitError",
    "Envelope",
    "Event",
    "Failure",
    "MalformedEnvelope",
    "Publisher",
    "Reject",
    "Retry",
    "RetryPolicy",
    "Service",
    "StoreError",
    "TimedOut",
    "TransactionConflict",
    "TransportClosed",
    "TransportError",
    "Worker",
    "current_context",
    "decode",
    "derive_id",
    "encode",
    "failed",
    "open_store",
    "open_transport",
    "timed_out",
    "transaction",
]


def isort_key(name: str) -> tuple[int, str]:
    """ruff RUF022's isort-style order: CONSTANTS, then Classes, then functions."""
    group = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return group, name


def test_all_is_the_expected_list() -> None:
    assert choreograph.__all__ == EXPECTED


def test_all_is_sorted_without_duplicates() -> None:
    assert choreograph.__all__ == sorted(set(choreograph.__all__), key=isort_key)


def test_every_exported_name_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec("from choreograph import *", namespace)  # noqa: S102 - the star import is what is pinned
    assert sorted(n for n in namespace if n != "__builtins__") == sorted(EXPECTED)
    for name in EXPECTED:
        assert namespace[name] is getattr(choreograph, name)


def test_every_public_object_in_the_package_namespace_is_exported() -> None:
    """As httpx does: nothing public is reachable from ``choreograph`` without being in ``__all__``.
    Submodules (``choreograph.events``, ...) are namespaces, not exports, and are left out."""
    public = [
        name
        for name, value in vars(choreograph).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    ]
    assert sorted(public) == sorted(choreograph.__all__)


def test_every_exported_object_is_defined_in_choreograph_and_documented() -> None:
    for name in EXPECTED:
        obj = getattr(choreograph, name)
        if isinstance(obj, str):  # a constant such as FAILED
            continue
        assert obj.__module__.startswith("choreograph."), name
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_the_package_has_a_version() -> None:
    assert isinstance(choreograph.__version__, str) and choreograph.__version__
