"""Choosing an implementation by URL scheme (stores, journal, join stores).

Each kind keeps a table ``scheme -> (module, class)``; the module is imported only when
its scheme is used, so an unused backend's client library need not be installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from choreograph._redact import redact
from choreograph.errors import ConfigurationError


def instantiate(url: str, schemes: Mapping[str, tuple[str, str]], what: str) -> Any:
    """``Class(url)`` for the scheme of ``url``; a clear ``ConfigurationError`` naming ``what`` otherwise."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in schemes:
        raise ConfigurationError(
            f"{what} {redact(url)!r}: unknown scheme {scheme!r}; expected one of "
            + ", ".join(f"{s}://" for s in sorted(schemes))
        )
    module_name, class_name = schemes[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{what} {redact(url)!r}: {scheme}:// needs {exc.name}") from exc
    return getattr(module, class_name)(url)
