"""Passwords out of URLs before a URL reaches an error message, a log line or a status line.

Broker and store URLs carry credentials (``amqp://user:pass@host``, ``redis://:pass@host``,
``postgresql://user:pass@host/db?password=pass``, a NATS token as ``nats://token@host``), and
so do push subscribers' URLs (``https://hooks.example/in?token=...``, ``?access_token=``,
``?api_key=``, ``?code=``, ``?sig=``, ``https://KEY@hooks.example/in``), some in their path
(``https://hooks.slack.com/services/T…/B…/SECRET``, ``https://discord.com/api/webhooks/ID/TOKEN``;
only an HTTP or WebSocket URL's path is read for one).
Messages name the URL so the reader knows which server is meant; :func:`redact` keeps
everything that says which (scheme, user, host, port, the path's ordinary segments, other
parameters) and puts ``***`` where the secret was. It works on a bare URL and on a message that contains
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


#: A URL's authority (after the user info) and its path, up to the query or fragment.
_PATH = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#'\"]*)(?P<path>/[^\s?#'\"]*)")
#: What a token in a path is made of (base64url, hex, a Telegram ``bot<id>:<token>``...).
_TOKEN = re.compile(r"[A-Za-z0-9._~:=-]{20,}")
_HEX = re.compile(r"[0-9a-fA-F]{32,}")
_LONG_SEGMENT = re.compile(r"[^/]{20}")
#: Webhook hosts whose path carries the secret whatever it looks like: Slack's last segment
#: (``/services/T…/B…/SECRET``), Discord's after ``webhooks/ID/``.
_SLACK_HOSTS = frozenset({"hooks.slack.com"})
_DISCORD_HOSTS = frozenset({"discord.com", "discordapp.com", "ptb.discord.com", "canary.discord.com"})
#: Schemes whose path may carry a secret (a webhook's). A broker's or store's path never does: it is
#: a file (``sqlite:///var/lib/OrderService2Inbox.db``), a database, a vhost or a Redis db, and
#: says which one an error is about.
_PATH_SECRET_SCHEMES = frozenset({"http", "https", "ws", "wss"})


def _looks_secret(segment: str) -> bool:
    """Whether a path segment is a token rather than a name: 20 characters or more of a token's
    alphabet with upper and lower case letters and digits mixed (a slug, a word, an upper or lower
    case UUID are not), or 32 hex digits or more."""
    if len(segment) < 20:
        return False
    if _HEX.fullmatch(segment) is not None:
        return True
    return (_TOKEN.fullmatch(segment) is not None and not segment.islower() and not segment.isupper()
            and any(c.isdigit() for c in segment))


def _path(match: re.Match[str]) -> str:
    head, path = match["head"], match["path"]
    if head.partition("://")[0].lower() not in _PATH_SECRET_SCHEMES:
        return match[0]
    host = head.partition("://")[2].rpartition("@")[2].partition(":")[0].lower()
    segments = path.split("/")
    secret = -1  # the index of the segment a known host keeps its secret in
    if host in _SLACK_HOSTS and len(segments) > 3:
        secret = len(segments) - 1 if segments[-1] else len(segments) - 2
    elif host in _DISCORD_HOSTS and "webhooks" in segments:
        secret = segments.index("webhooks") + 2
    elif _LONG_SEGMENT.search(path) is None:  # the common case: no segment long enough for a token
        return match[0]
    masked = [MASK if (index == secret and segment) or _looks_secret(segment) else segment
              for index, segment in enumerate(segments)]
    return head + "/".join(masked)


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``: in its user info, its
    query, or its path (a segment that looks like a token, or where a known webhook host keeps
    its secret; ``/orders/123`` and other names are kept).

    Applied wherever a broker, store, journal or subscriber URL goes into an exception,
    a log line or a CLI status line; the URL itself (for connecting) is never changed.
    """
    text = _PATH.sub(_path, _USERINFO.sub(_userinfo, text))
    return _PASSWORD_PARAM.sub(lambda m: m["key"] + MASK, text)
