"""Passwords out of URLs before a URL reaches an error message, a log line or a status line.

Broker and store URLs carry credentials (``amqp://user:pass@host``, ``redis://:pass@host``,
``postgresql://user:pass@host/db?password=pass``, a NATS token as ``nats://token@host``), and
so do push subscribers' URLs (``https://hooks.example/in?token=...``, ``?access_token=``,
``?api_key=``, ``?code=``, ``?sig=``, ``https://KEY@hooks.example/in``).
Messages name the URL so the reader knows which server is meant; :func:`redact` keeps
everything that says which (scheme, user, host, port, path, other parameters) and puts
``***`` where the secret was. It works on a bare URL and on a message that contains
URLs, so a driver's error text quoting the URL is cleaned too.

>>> redact("amqp://shop:hunter2@mq:5672/prod")
'amqp://shop:***@mq:5672/prod'
"""

from __future__ import annotations

import re

MASK = "***"

#: ``scheme://user:password@``: the password runs to the last ``@`` of the authority,
#: as ``urllib.parse.urlsplit`` reads it (a password with an unescaped ``@`` stays hidden).
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*)://(?P<user>[^\s/?#@:'\"]*)(?::(?P<password>[^\s/?#'\"]*))?@"
)
#: A secret given as a query parameter: libpq and asyncpg read ``?password=``; a webhook URL
#: carries its credential as ``?token=``, ``?access_token=`` (RFC 6750 §2.3), ``?api_key=``,
#: ``?key=``, ``?code=`` (Azure Functions), ``?sig=`` (a shared access signature), ...
_PASSWORD_PARAM = re.compile(
    r"(?P<key>[?&](?:password|passwd|pass|pwd|token|access_token|auth_token|api_key|apikey|api-key|key|secret"
    r"|client_secret|sig|signature|code)=)[^&#\s'\"]*",
    re.IGNORECASE,
)
#: Schemes whose user part alone is a secret: nats-py sends ``nats://TOKEN@host`` as a token,
#: and an HTTP URL's user info is only ever credentials (``https://API_KEY@hooks.example/in``
#: is Basic authentication with the key as the user).
_TOKEN_SCHEMES = frozenset({"nats", "tls", "http", "https"})


def _userinfo(match: re.Match[str]) -> str:
    scheme, user, password = match["scheme"], match["user"], match["password"]
    if password is not None:
        return f"{scheme}://{user}:{MASK}@"
    if user and scheme.lower() in _TOKEN_SCHEMES:
        return f"{scheme}://{MASK}@"
    return match[0]


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    Applied wherever a broker, store, journal or subscriber URL goes into an exception,
    a log line or a CLI status line; the URL itself (for connecting) is never changed.
    """
    return _PASSWORD_PARAM.sub(lambda m: m["key"] + MASK, _USERINFO.sub(_userinfo, text))
