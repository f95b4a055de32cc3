"""Choosing an implementation by URL scheme (stores, journal, join stores).

Each kind keeps a table ``scheme -> (module, class)``; the module is imported only when
its scheme is used, so an unused backend's client library need not be installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from choreograph._redact import redact
from choreograph.errors import ConfigurationError


def scheme_of(url: str, what: str) -> str:
    """The scheme of ``url`` (``""`` without ``://``). A URL ``urlsplit`` cannot read (an unclosed
    ``[``, a bracketed host that is no IP address) is a :class:`ConfigurationError` naming ``what``
    (``broker URL``), not a ``ValueError`` with a traceback; past this check the URL splits.

        >>> scheme_of("redis://[::1", "broker URL")
        Traceback (most recent call last):
        ...
        choreograph.errors.ConfigurationError: broker URL 'redis://[::1': Invalid IPv6 URL
    """
    if "://" not in url:
        return ""
    try:
        return urlsplit(url).scheme
    except ValueError as exc:
        raise ConfigurationError(f"{what} {redact(url)!r}: {exc}") from None


def query_params(url: str, what: str) -> dict[str, str]:
    """The query parameters of ``url``; one given twice (``?schema=a&schema=b``) is a
    :class:`ConfigurationError` naming it (``dict(parse_qsl(...))`` silently kept the last value,
    while a client library reading the rest of the URL may keep the first). No value is quoted
    (it may be a secret).
    """
    params: dict[str, str] = {}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name in params:
            raise ConfigurationError(f"{what} {redact(url)!r}: parameter {name!r} is given more than once; give it once")
        params[name] = value
    return params


def instantiate(url: str, schemes: Mapping[str, tuple[str, str]], what: str) -> Any:
    """``Class(url)`` for the scheme of ``url``; a clear ``ConfigurationError`` naming ``what`` otherwise."""
    scheme = scheme_of(url, what)
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
