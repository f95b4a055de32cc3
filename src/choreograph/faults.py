"""Fault injection for demos and tests: make a service fail, hang or crash on purpose.

Faults are configured per service, outside the code, so the same build can be run
healthy or hostile::

    CHOREOGRAPH_FAULTS='{"drone-scheduler": {"fail_rate": 0.2, "fail_first": 2}}'
    CHOREOGRAPH_FAULTS=./faults.toml        # a TOML or JSON file with the same shape

A handler wraps its step in the service's faults::

    faults = Faults.for_service("drone-scheduler")

    @scheduler.on(PackageCreated)
    async def assign(package: PackageCreated, ctx: Context) -> DroneAssigned:
        async with faults.step(ctx), ctx.transaction() as tx:
            drone = await assign(tx, package)        # the state change
        return DroneAssigned(...)

Before the step: ``fail_first`` fails attempts 1..N (the attempt number travels with
the delivery, so this holds across processes), ``fail_rate`` fails a fraction of
attempts (both transient: :class:`InjectedFault`), ``reject_rate`` rejects a fraction
permanently (:class:`~choreograph.Reject`), ``hang`` sleeps that many seconds (set it
above the handler's timeout to exercise timeouts) on the handler's clock (``ctx.clock``:
under a test's :class:`~choreograph.testing.VirtualClock` it passes in virtual time, and
the timeout, measured on the same clock, cuts it short there). After the step succeeded:
``duplicate_rate`` fails a fraction of those attempts anyway (:class:`InjectedFault`),
so the event is delivered again and the step runs a second time on the state it
already changed: a duplicate delivery that idempotency must absorb and the inbox
cannot filter (the first run was never recorded as done); ``crash_after`` kills the
process with SIGKILL once it has completed that many steps, i.e. after the state change
was committed but before the outputs were published and the input acked: the worst
moment, and the one idempotency must survive.

``crash_times`` (default 1; 0 for every time) limits the crashes to the first process
lifetimes, counted by ``CHOREOGRAPH_RESTARTS`` (``choreograph dev`` sets it when it
restarts a process): a restarted process that crashed again on the same redelivered
batch before publishing anything would never make progress.

A step that used the service database (``ctx.transaction()`` inside the step) only
commits when the handler returns, so there ``crash_after`` waits for that commit and
kills the process right after it, before the outbox relay has published the outputs
and before the input is acked: the window the transactional outbox closes (the
redelivered input finds its inbox record, the restarted relay publishes the rows).
``duplicate_rate`` fails such a step before its commit, so the state change is rolled
back with it and the next attempt starts from scratch.

The ``"*"`` key applies to every service without an entry of its own. The
configuration is read when :meth:`Faults.for_service` is first used in a process;
``choreograph run`` and ``choreograph dev`` parse it as they start and refuse a malformed
one (exit 2) before any service runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import tomllib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from choreograph._clock import SYSTEM_CLOCK, backoff
from choreograph.errors import ConfigurationError, Reject

__all__ = ["FAULTS_ENV", "RESTARTS_ENV", "FaultSpec", "Faults", "InjectedFault", "load_faults"]

FAULTS_ENV = "CHOREOGRAPH_FAULTS"
RESTARTS_ENV = "CHOREOGRAPH_RESTARTS"
"""How many times a supervisor (``choreograph dev``) restarted this process; read by ``crash_times``."""

log = logging.getLogger("choreograph.faults")


class InjectedFault(RuntimeError):
    """A transient failure injected on purpose (the runtime retries it like any other)."""


class _HasAttempt(Protocol):
    @property
    def attempt(self) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class FaultSpec:
    """The faults of one service. All zero (the default) means healthy."""

    fail_rate: float = 0.0
    fail_first: int = 0
    reject_rate: float = 0.0
    hang: float = 0.0
    hang_rate: float = 1.0
    duplicate_rate: float = 0.0
    crash_after: int = 0
    crash_times: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        # Types first (a FaultSpec built in code skips from_dict's checks): a comparison with a
        # string raised a TypeError naming no setting, and a NaN passed every range check.
        for name in (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int if name in _WHOLE else (int, float)):
                kind = "a whole number" if name in _WHOLE else "a number"
                raise ConfigurationError(f"faults: {name} must be {kind}, got {value!r}")
        for name in ("fail_rate", "reject_rate", "hang_rate", "duplicate_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(f"faults: {name} must be between 0 and 1, got {value!r}")
        for name in ("fail_first", "crash_after", "crash_times", "hang"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ConfigurationError(f"faults: {name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def healthy(self) -> bool:
        return not (self.fail_rate or self.fail_first or self.reject_rate or self.hang or self.crash_after
                    or self.duplicate_rate)

    @classmethod
    def from_dict(cls, service: str, data: Any) -> FaultSpec:
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"faults[{service!r}]: expected a table of settings, got {type(data).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(
                f"faults[{service!r}]: unknown setting(s) {unknown}; known: {sorted(known)}"
            )
        values = {key: _number(service, key, value) for key, value in data.items()}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigurationError(f"faults[{service!r}]: {exc}") from None
        except ConfigurationError as exc:  # out of range (__post_init__): say which service
            raise ConfigurationError(f"faults[{service!r}]: {str(exc).removeprefix('faults: ')}") from None


_WHOLE = ("fail_first", "crash_after", "crash_times", "seed")


def _number(service: str, key: str, value: Any) -> Any:
    if key == "seed" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"faults[{service!r}].{key}: expected a number, got {value!r}")
    if key in _WHOLE:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigurationError(f"faults[{service!r}].{key}: expected a whole number, got {value!r}")
        return int(value)
    return float(value)


def load_faults(source: str | None = None) -> dict[str, FaultSpec]:
    """Parse a fault configuration: inline JSON, or the path of a ``.toml`` / ``.json`` file.

    ``source`` defaults to the ``CHOREOGRAPH_FAULTS`` environment variable; empty
    means no faults. Every error is a :class:`ConfigurationError` naming the variable,
    the file if it is one, and the bad part (``faults['svc']: fail_rate must be between
    0 and 1``). ``choreograph run`` and ``dev`` call this as they start, so a mistake
    stops them there rather than failing every step of the handlers that read it.
    """
    text = os.environ.get(FAULTS_ENV, "") if source is None else source
    text = text.strip()
    if not text:
        return {}
    where = FAULTS_ENV
    if text.startswith(("{", "[")):  # inline JSON (an array is refused below, as not an object)
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{FAULTS_ENV}: not valid JSON ({exc})") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise ConfigurationError(f"{FAULTS_ENV}: {text!r} is neither inline JSON nor an existing file")
        where = f"{FAULTS_ENV}: {text}"
        try:
            raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        except OSError as exc:
            raise ConfigurationError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{where}: expected an object keyed by service name, got {type(raw).__name__}")
    try:
        return {str(name): FaultSpec.from_dict(str(name), spec) for name, spec in raw.items()}
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


class Faults:
    """The faults one service injects into its steps (see the module docstring)."""

    def __init__(self, service: str, spec: FaultSpec | None = None) -> None:
        self.service = service
        self.spec = spec or FaultSpec()
        self.rng = random.Random(self.spec.seed)
        self.completed = 0

    def __repr__(self) -> str:
        return f"<Faults {self.service!r} {self.spec}>"

    @classmethod
    def for_service(cls, service: str, source: str | None = None) -> Faults:
        """The faults configured for ``service`` (by ``CHOREOGRAPH_FAULTS`` unless ``source`` is given).

        The configuration is read lazily, on the first step, so importing a module that
        builds its ``Faults`` at import time does not freeze the environment early.
        """
        return _LazyFaults(service, source)

    async def before(self, ctx: _HasAttempt) -> None:
        """Inject the faults that happen before the step: fail, reject, hang."""
        spec = self.spec
        if spec.fail_first and ctx.attempt <= spec.fail_first:
            raise InjectedFault(
                f"{self.service}: injected failure of attempt {ctx.attempt} (fail_first={spec.fail_first})"
            )
        if spec.fail_rate and self.rng.random() < spec.fail_rate:
            raise InjectedFault(f"{self.service}: injected transient failure (fail_rate={spec.fail_rate})")
        if spec.reject_rate and self.rng.random() < spec.reject_rate:
            raise Reject(f"{self.service}: injected permanent rejection (reject_rate={spec.reject_rate})")
        if spec.hang and self.rng.random() < spec.hang_rate:
            log.warning("%s: injected hang of %.1fs", self.service, spec.hang)
            # On the handler's clock (ctx.clock): a test's VirtualClock passes it at once, and its
            # timeout, measured on the same clock, cuts it short. Waited as a backoff: work still
            # under way, which settled() neither returns during nor waits out in real time.
            await backoff(getattr(ctx, "clock", SYSTEM_CLOCK), spec.hang)

    def after(self) -> None:
        """Count a completed step; SIGKILL this process once ``crash_after`` steps completed;
        fail ``duplicate_rate`` of the completed steps so that they are delivered again."""
        self._count()
        self._duplicate()

    def _count(self) -> None:
        self.completed += 1
        spec = self.spec
        if spec.crash_after and self.completed >= spec.crash_after and self._crashes_this_life():
            log.critical("%s: injected crash (SIGKILL) after %d step(s)", self.service, self.completed)
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _duplicate(self) -> None:
        spec = self.spec
        if spec.duplicate_rate and self.rng.random() < spec.duplicate_rate:
            raise InjectedFault(
                f"{self.service}: injected duplicate delivery: the step succeeded, the attempt fails "
                f"(duplicate_rate={spec.duplicate_rate})"
            )

    def _crashes_this_life(self) -> bool:
        if not self.spec.crash_times:
            return True
        try:
            restarts = int(os.environ.get(RESTARTS_ENV, "0"))
        except ValueError:
            restarts = 0
        return restarts < self.spec.crash_times

    @contextlib.asynccontextmanager
    async def step(self, ctx: _HasAttempt) -> AsyncIterator[None]:
        """Wrap one step: faults before it, a possible crash right after it succeeded
        (after the handler's commit if the step used ``ctx.transaction()``)."""
        await self.before(ctx)
        yield
        unit = getattr(ctx, "_unit", None)  # a handler's unit of work (choreograph.runtime.outbox)
        if unit is not None and unit.used:
            self._duplicate()  # before the commit: rolls the step back with the attempt
            unit.after_commit(self._count)
        else:
            self.after()


class _LazyFaults(Faults):
    """A :class:`Faults` that reads its configuration on first use."""

    def __init__(self, service: str, source: str | None) -> None:
        super().__init__(service)
        self._source = source
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            configured = load_faults(self._source)
            spec = configured.get(self.service) or configured.get("*") or FaultSpec()
            self.spec = spec
            self.rng = random.Random(spec.seed)
            self._loaded = True
            if not spec.healthy:
                log.warning("%s: fault injection enabled: %s", self.service, spec)

    async def before(self, ctx: _HasAttempt) -> None:
        self._load()
        await super().before(ctx)

    def after(self) -> None:
        self._load()
        super().after()
