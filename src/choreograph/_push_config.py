"""Push subscriptions from a TOML or YAML file, for ``choreograph push --config``.

::

    broker = "sqlite:///./var/bus.db"      # optional; --broker and $CHOREOGRAPH_BROKER win
    origin = "bus.example.com"             # optional; announced in the handshake

    [[subscriptions]]
    group = "delivery-node"
    types = ["drone.drone.assigned"]
    url = "http://127.0.0.1:8090/"
    emits = ["drone.delivery.scheduled"]
    secret_env = "DELIVERY_WEBHOOK_SECRET"  # or secret = "whsec_..." (keep files secret-free)
    mode = "binary"                         # or "structured"
    timeout = 10
    max_attempts = 5                        # or a [subscriptions.retry] table
    max_retry_after = 300
    max_response_body = 1048576             # bytes of an answer read at most (default 1 MiB)
    handshake = true
    headers = { Authorization = "Bearer ..." }   # on every request, the handshake too
    filters = [{ prefix = { subject = "eu-" } }]   # CloudEvents Subscriptions API filters, ANDed
    where = "hops < 10"                     # CESQL; the same as one more { sql = "..." } filter

The same keys in YAML (``subscriptions:`` a list of mappings). ``${NAME}`` (or
``${NAME:-default}``) in any string is replaced from the environment, so one file
serves every deployment. Every error names the file and the key path, e.g.
``push.toml: subscriptions[1].tyeps: unknown key``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from choreograph._push_filters import FilterError
from choreograph.errors import ConfigurationError
from choreograph.policy import DEFAULT_RETRY, RetryPolicy
from choreograph.push import PushSubscription
from choreograph.transports.base import MAX_FETCH

_TOP = {"broker", "store", "origin", "concurrency", "drain_timeout", "subscriptions"}
_SUBSCRIPTION = {
    "group", "types", "url", "mode", "secret", "secret_env", "timeout", "max_attempts", "retry",
    "max_retry_after", "handshake", "emits", "headers", "filters", "where", "max_response_body",
}
#: What drawing or checking a flow does not need: credentials (``load_config(credentials=False)``).
_CREDENTIALS = ("secret", "secret_env", "headers")
_RETRY = {field.name for field in dataclasses.fields(RetryPolicy)}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclasses.dataclass
class PushConfig:
    """What a config file says: subscriptions, and optionally the broker, store and ambassador options."""

    subscriptions: list[PushSubscription]
    broker: str | None = None
    store: str | None = None
    origin: str | None = None
    concurrency: int | None = None
    drain_timeout: float | None = None


def _read(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: cannot read (not UTF-8: byte {exc.start})") from None
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: invalid TOML ({exc})") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigurationError(f"{path}: YAML needs PyYAML (pip install pyyaml), or use TOML") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path}: invalid YAML ({_yaml_problem(exc)})") from None
    raise ConfigurationError(f"{path}: expected a .toml, .yaml or .yml file")


def _yaml_problem(exc: Exception) -> str:
    """What is wrong and where, as TOML's errors say it: PyYAML's own text quotes the lines
    around the mistake, and those may hold a secret or a header (a token, an ``Authorization``)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return type(exc).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _expand(value: Any, where: str) -> Any:
    """``${NAME}`` / ``${NAME:-default}`` in every string, from the environment."""
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is None:
                if default is None:
                    raise ConfigurationError(f"{where}: environment variable {name!r} is not set")
                return default
            return found

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, list):
        return [_expand(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {key: _expand(item, f"{where}{key}" if where.endswith(": ") else f"{where}.{key}")
                for key, item in value.items()}
    return value


# -- typed values ---------------------------------------------------------------------------
# TOML and YAML values are typed, but ``${NAME}`` always yields a string: a number or a boolean
# may be spelt as a string ("10", "false"); anything else of the wrong type is refused here,
# naming its key, rather than misread ("no" is a true string) or failing at the first push.


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (str, int, float)) else type(value).__name__


def _number(value: Any, where: str, *, minimum: float = 0.0, forever: bool = False) -> float:
    """Seconds: a finite number >= ``minimum`` (``PushSubscription`` refines the bounds), or
    with ``forever`` also ``inf``: no limit (as the CLI's options of the same name take)."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value.strip())
    if number is None or not (math.isfinite(number) or (forever and number == math.inf)) or number < minimum:
        bound = f" >= {minimum:g}" if minimum else ""
        unlimited = ", or inf (no limit)" if forever else ""
        raise ConfigurationError(f"{where}: expected a number of seconds{bound}{unlimited}, got {_shown(value)}")
    return number


def _whole(value: Any, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bound = f" >= {minimum}" if minimum is not None else ""
        bound += f"{' and' if bound else ''} <= {maximum}" if maximum is not None else ""
        raise ConfigurationError(f"{where}: expected a whole number{bound}, got {_shown(value)}")
    return number


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigurationError(f"{where}: expected true or false, got {_shown(value)}")


def _text(value: Any, where: str, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{where}: expected {what}, got {_shown(value)}")
    return value


def _broker(value: Any, where: str) -> str:
    """A broker URL; empty or blank is refused here, naming the key (``--broker`` would be named
    downstream, an option nobody typed), as ``${BROKER}`` left empty would be the default bus."""
    return _url(value, where, "a broker URL")


def _store(value: Any, where: str) -> str:
    """The inbox store's URL; empty or blank is refused, as for ``broker`` (it was the default store)."""
    return _url(value, where, "a store URL")


def _url(value: Any, where: str, what: str) -> str:
    url = _text(value, where, "a URL (a string)")
    if not url.strip():
        raise ConfigurationError(f"{where}: empty; give {what}, or leave the key out")
    return url


def _types(value: Any, where: str) -> list[str]:
    """An event type or a list of them."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigurationError(f"{where}: expected a list of event types, got {_shown(value)}")
    return [_text(item, f"{where}[{i}]", "an event type (a string)") for i, item in enumerate(value)]


def _headers(value: Any, where: str) -> dict[str, str]:
    headers = _check_keys(value, None, where)
    for name, item in headers.items():
        if not isinstance(item, str):  # a header is usually a credential: its type is named, never its value
            raise ConfigurationError(f"{where}.{name}: expected a string, got {type(item).__name__}")
    return {str(name): item for name, item in headers.items()}


def _retry_option(key: str, value: Any, where: str) -> Any:
    """A value of the ``retry`` table, typed as the subscription's own are (``RetryPolicy`` took
    them as read: ``jitter = "no"`` a true jitter, a quoted number an error naming no key)."""
    if key == "max_attempts":
        return _whole(value, where)
    if key == "jitter":
        return _boolean(value, where)
    if key == "max_age" and value is None:  # YAML's null: no limit, as RetryPolicy's None
        return None
    return _number(value, where)


def _check_keys(data: Any, allowed: set[str] | None, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"{where}: expected a table/mapping, got {type(data).__name__}")
    for key in data:
        if allowed is not None and key not in allowed:
            raise ConfigurationError(f"{where}.{key}: unknown key; expected one of {', '.join(sorted(allowed))}")
    return data


def subscription_from_mapping(data: Any, where: str = "subscription") -> PushSubscription:
    """One :class:`PushSubscription` from its mapping (``where`` prefixes error messages)."""
    item = _check_keys(data, _SUBSCRIPTION, where)
    for key in ("group", "types", "url"):
        if key not in item:
            raise ConfigurationError(f"{where}.{key}: required key is missing")
    retry = DEFAULT_RETRY
    if "retry" in item:
        retry_options = {key: _retry_option(key, value, f"{where}.retry.{key}")
                         for key, value in _check_keys(item["retry"], _RETRY, f"{where}.retry").items()}
        try:
            retry = RetryPolicy(**retry_options)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}.retry: {exc}") from None
    if "max_attempts" in item:
        try:
            retry = dataclasses.replace(retry, max_attempts=_whole(item["max_attempts"], f"{where}.max_attempts"))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}.max_attempts: {exc}") from None
    if "secret" in item and "secret_env" in item:
        raise ConfigurationError(f"{where}: give secret or secret_env, not both")
    secret = item.get("secret")
    if secret is not None and not (isinstance(secret, str) or (
            isinstance(secret, list) and secret and all(isinstance(one, str) for one in secret))):
        shown = type(secret).__name__ if not isinstance(secret, list) else "a list holding " + ", ".join(
            sorted({type(one).__name__ for one in secret}) or ["nothing"])
        # the type, never the value: it is a credential
        raise ConfigurationError(f"{where}.secret: expected a whsec_ string or a list of them (rotation), got {shown}")
    if "secret_env" in item:
        secret = os.environ.get(str(item["secret_env"]))
        if not secret:
            raise ConfigurationError(f"{where}.secret_env: environment variable {item['secret_env']!r} is not set")
    options: dict[str, Any] = {}
    if "mode" in item:
        options["mode"] = item["mode"]
    for key in ("timeout", "max_retry_after"):
        if key in item:
            options[key] = _number(item[key], f"{where}.{key}")
    if "max_response_body" in item:
        options["max_response_body"] = _whole(item["max_response_body"], f"{where}.max_response_body", minimum=1)
    if "handshake" in item:
        options["handshake"] = _boolean(item["handshake"], f"{where}.handshake")
    if "emits" in item:
        options["emits"] = _types(item["emits"], f"{where}.emits")
    if "headers" in item:
        options["headers"] = _headers(item["headers"], f"{where}.headers")
    types = _types(item["types"], f"{where}.types")
    # read as a string, not made one: ``group = true`` was the group "True", ``group = 42`` "42"
    group = _text(item["group"], f"{where}.group", "a group name (a string)")
    try:
        return PushSubscription(group, types, str(item["url"]), retry=retry,
                                secret=secret, filters=item.get("filters", ()), where=item.get("where"), **options)
    except FilterError as exc:
        raise ConfigurationError(f"{where}.{exc.path}: {exc.reason}") from None
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc.message}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


def load_config(path: str | Path, *, credentials: bool = True) -> PushConfig:
    """Read and validate a push configuration file.

    ``credentials=False`` (for ``choreograph graph --push`` and ``lint --push``) leaves out
    ``secret``, ``secret_env`` and ``headers`` before anything is read from the environment:
    drawing a flow needs no secrets, so a file whose secrets are not set here still loads.
    """
    path = Path(path)
    data = _read(path) or {}
    if not credentials and isinstance(data, Mapping) and isinstance(data.get("subscriptions"), list):
        data = {**data, "subscriptions": [
            {k: v for k, v in item.items() if k not in _CREDENTIALS} if isinstance(item, Mapping) else item
            for item in data["subscriptions"]
        ]}
    data = _check_keys(_expand(data, f"{path.name}: "), _TOP, str(path.name))  # "push.toml: subscriptions[0].secret"
    items = data.get("subscriptions")
    if items is not None and not isinstance(items, list):  # `subscriptions = 5`: not "list at least one"
        raise ConfigurationError(
            f"{path.name}: subscriptions: expected a list of subscriptions ([[subscriptions]] tables), "
            f"got {_shown(items)}"
        )
    if not items:
        raise ConfigurationError(f"{path.name}: subscriptions: list at least one subscription")
    subscriptions = [subscription_from_mapping(item, f"{path.name}: subscriptions[{i}]")
                     for i, item in enumerate(items)]
    def optional(key: str, read: Any) -> Any:
        return None if data.get(key) is None else read(data[key], f"{path.name}: {key}")

    return PushConfig(
        subscriptions=subscriptions,
        broker=optional("broker", _broker),
        store=optional("store", _store),
        origin=optional("origin", _text),
        concurrency=optional("concurrency", lambda v, w: _whole(v, w, minimum=1, maximum=MAX_FETCH)),
        drain_timeout=optional("drain_timeout", lambda v, w: _number(v, w, forever=True)),
    )
