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
    handshake = true
    headers = { Authorization = "Bearer ..." }
    filters = [{ prefix = { subject = "eu-" } }]   # CloudEvents Subscriptions API filters, ANDed
    where = "hops < 10"                     # CESQL; the same as one more { sql = "..." } filter

The same keys in YAML (``subscriptions:`` a list of mappings). ``${NAME}`` (or
``${NAME:-default}``) in any string is replaced from the environment, so one file
serves every deployment. Every error names the file and the key path, e.g.
``push.toml: subscriptions[1].tyeps: unknown key``.
"""

from __future__ import annotations

import dataclasses
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

_TOP = {"broker", "store", "origin", "concurrency", "drain_timeout", "subscriptions"}
_SUBSCRIPTION = {
    "group", "types", "url", "mode", "secret", "secret_env", "timeout", "max_attempts", "retry",
    "max_retry_after", "handshake", "emits", "headers", "filters", "where",
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
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read ({exc.strerror})") from None
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
            raise ConfigurationError(f"{path}: invalid YAML ({exc})") from None
    raise ConfigurationError(f"{path}: expected a .toml, .yaml or .yml file")


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
        return {key: _expand(item, f"{where}.{key}") for key, item in value.items()}
    return value


def _check_keys(data: Any, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"{where}: expected a table/mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
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
        retry_options = dict(_check_keys(item["retry"], _RETRY, f"{where}.retry"))
        try:
            retry = RetryPolicy(**retry_options)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}.retry: {exc}") from None
    if "max_attempts" in item:
        try:
            retry = dataclasses.replace(retry, max_attempts=int(item["max_attempts"]))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}.max_attempts: {exc}") from None
    if "secret" in item and "secret_env" in item:
        raise ConfigurationError(f"{where}: give secret or secret_env, not both")
    secret = item.get("secret")
    if "secret_env" in item:
        secret = os.environ.get(str(item["secret_env"]))
        if not secret:
            raise ConfigurationError(f"{where}.secret_env: environment variable {item['secret_env']!r} is not set")
    options = {key: item[key] for key in ("mode", "timeout", "max_retry_after", "handshake", "emits", "headers")
               if key in item}
    try:
        return PushSubscription(str(item["group"]), item["types"], str(item["url"]), retry=retry,
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
    data = _check_keys(_expand(data, path.name), _TOP, str(path.name))
    items = data.get("subscriptions")
    if not isinstance(items, list) or not items:
        raise ConfigurationError(f"{path.name}: subscriptions: list at least one subscription")
    subscriptions = [subscription_from_mapping(item, f"{path.name}: subscriptions[{i}]")
                     for i, item in enumerate(items)]
    return PushConfig(
        subscriptions=subscriptions,
        broker=data.get("broker"),
        store=data.get("store"),
        origin=data.get("origin"),
        concurrency=data.get("concurrency"),
        drain_timeout=data.get("drain_timeout"),
    )
