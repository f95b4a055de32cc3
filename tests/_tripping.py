"""A stand-in for a bug below a handler: ``decode`` that raises for chosen bodies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def trip_decode(monkeypatch: pytest.MonkeyPatch, module: Any, marker: bytes = b"trip") -> None:
    """Make ``module.decode`` raise ``RuntimeError`` for every body that contains ``marker``
    (the real decode for the rest), for the length of the test."""
    real: Callable[[bytes | str], Any] = module.decode

    def decode_or_trip(body: bytes | str) -> Any:
        if marker in (body if isinstance(body, bytes) else body.encode()):
            raise RuntimeError("a bug below the handler")
        return real(body)

    monkeypatch.setattr(module, "decode", decode_or_trip)
