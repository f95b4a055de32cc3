"""``choreograph dev``: the whole system on one machine, one process per service.

    choreograph dev examples.drone_delivery.app:app

starts, each in its own process with colour-prefixed logs:

* every service of the App (``python -m choreograph run MODULE:ATTR --service NAME``,
  ``--scale NAME=N`` for replicas that compete in the service's group);
* the HTTP ingestion gateway (``choreograph gateway``), if the app has one:
  ``--gateway MODULE:ATTR``, else by convention ``MODULE:gateway`` or ``gateway`` in the
  App module's package (a :class:`~choreograph.gateway.Gateway` or any ASGI app);
* the journal (``choreograph journal``), which observes every event and answers the
  gateway's ``/transactions`` (``--no-journal`` to skip);
* push ambassadors (``--push push.toml``: ``choreograph push --config``) and any other
  process (``--proc NAME=COMMAND``), e.g. a Node.js service behind an ambassador;
  ``--only SERVICE`` runs a subset of the App's services (the rest live elsewhere).

The bus defaults to ``sqlite:///<data dir>/bus.db`` with the data dir ``./var/<app name>``;
children get ``CHOREOGRAPH_BROKER`` and ``CHOREOGRAPH_DATA_DIR`` (where services keep
their own state). Before any process starts, every service's consumer group is
registered on the bus, so nothing the gateway accepts early is missed by a service
that is still booting. A crashed process is restarted; Ctrl-C or SIGTERM stops
everything cleanly (SIGTERM, ``--stop-timeout`` seconds, then SIGKILL).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import socket
import sys
from pathlib import Path

import typer

from choreograph._redact import redact
from choreograph._sqlite import why_not_made
from choreograph.cli._common import (
    BROKER_ENV,
    LogFormatOption,
    address,
    console,
    env_url,
    given_broker,
    kind_of,
    load_object,
    run_async,
    seconds,
)
from choreograph.cli._supervisor import ProcSpec, Supervisor
from choreograph.errors import ConfigurationError
from choreograph.faults import load_faults
from choreograph.logs import configure_logging
from choreograph.service import App
from choreograph.transports import open_transport

DATA_ENV = "CHOREOGRAPH_DATA_DIR"
JOURNAL_ENV = "CHOREOGRAPH_JOURNAL"
READY_LINE = "ready:"
"""The supervisor prints ``dev | ready: ...`` once every process is up (scripts wait for it)."""


def _python_m(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _find_gateway(target: str) -> str | None:
    """``MODULE:gateway``, else ``PACKAGE.gateway:gateway`` beside the App's module, if either exists."""
    module_name = target.partition(":")[0]
    module = importlib.import_module(module_name)
    if hasattr(module, "gateway"):
        return f"{module_name}:gateway"
    package = module_name.rpartition(".")[0] if not hasattr(module, "__path__") else module_name
    candidate = f"{package}.gateway" if package else "gateway"
    if importlib.util.find_spec(candidate) is None:
        return None
    return f"{candidate}:gateway"


def _gateway_spec(spec: str, host: str, port: int, fds: tuple[int, ...] = ()) -> ProcSpec:
    """The gateway process, serving on the listening sockets ``fds`` (bound to ``host:port`` here)."""
    from choreograph.cli._gateway import gateway_object
    from choreograph.gateway import Gateway

    # fail here, with one clear line, rather than in a child once every other process has started
    obj = gateway_object(spec)
    argv = _python_m("choreograph", "gateway", spec, "--host", host, "--port", str(port))
    for fd in fds:
        argv += ["--fd", str(fd)]
    if not isinstance(obj, Gateway):  # a plain ASGI app cannot be instrumented: do not ask (--otel is inherited)
        argv.append("--no-otel")
    return ProcSpec("gateway", argv, ready="Uvicorn running on", fds=fds)


def _journal_spec(target: str, url: str, store: str) -> ProcSpec:
    """The journal observer (``choreograph journal``), recording to ``store``."""
    argv = _python_m("choreograph", "journal", target, "--broker", url, "--store", store)
    return ProcSpec("journal", argv, ready="journal running")


def _scales(values: list[str], app: App) -> dict[str, int]:
    scales: dict[str, int] = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ConfigurationError(f"--scale {value!r}: expected SERVICE=N with N >= 1")
        app.service(name)  # raises for an unknown service
        scales[name] = int(count)
    return scales


Group = tuple[str, "list[str] | None"]


def _service_specs(
    target: str, app: App, url: str, only: list[str], replicas: dict[str, int], log_level: str
) -> tuple[list[ProcSpec], list[Group]]:
    for name in only:
        app.service(name)  # raises for an unknown service
    specs: list[ProcSpec] = []
    groups: list[Group] = []
    for service in app.services:
        if only and service.name not in only:
            continue
        groups.append((service.group, sorted(service.subscriptions)))
        argv = _python_m(
            "choreograph", "run", target, "--service", service.name, "--broker", url, "--log-level", log_level
        )
        count = replicas.get(service.name, 1)
        for n in range(1, count + 1):
            name = service.name if count == 1 else f"{service.name}.{n}"
            specs.append(ProcSpec(name, argv, ready="running"))
    return specs, groups


def _push_specs(configs: list[Path], url: str) -> tuple[list[ProcSpec], list[Group]]:
    """A ``choreograph push`` ambassador per config file (its groups are registered up front too)."""
    from choreograph._push_config import load_config

    specs: list[ProcSpec] = []
    groups: list[Group] = []
    for n, path in enumerate(configs, start=1):
        config = load_config(path)  # a bad file fails here, in one line
        groups.extend((sub.group, sorted(sub.types)) for sub in config.subscriptions)
        name = "push" if len(configs) == 1 else f"push.{n}"
        argv = _python_m("choreograph", "push", "--config", str(path), "--broker", url)
        specs.append(ProcSpec(name, argv, ready="push running on"))
    return specs, groups


def _metrics_ports(specs: list[ProcSpec], first: int) -> dict[str, int]:
    """Give each service process, push ambassador and the gateway ``--metrics-port``, counting up from ``first``.

    ``first`` 0 gives each of them 0, as ``run --metrics-port 0`` means: any free port (each
    process prints the one it took).
    """
    ports: dict[str, int] = {}
    instrumented = (["choreograph", "run"], ["choreograph", "gateway"], ["choreograph", "push"])
    for spec in specs:
        if spec.argv[2:4] in instrumented and "--no-otel" not in spec.argv:
            number = first + len(ports) if first else 0
            if number > 65535:
                raise ConfigurationError(f"--metrics-port {first}: not enough ports above it for every process")
            spec.argv = [*spec.argv, "--metrics-port", str(number)]
            ports[spec.name] = number
    return ports


def _extra_specs(procs: list[str]) -> list[ProcSpec]:
    """``NAME=COMMAND`` processes (a Procfile line each): a Node.js service, a mock, a tunnel..."""
    specs = []
    for value in procs:
        name, sep, command = value.partition("=")
        name = name.strip()
        if not sep or not name or not command.strip() or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigurationError(f'--proc {value!r}: expected NAME=COMMAND, e.g. node="node server.mjs"')
        try:
            argv = shlex.split(command)
        except ValueError as exc:  # "No closing quotation", "No escaped character"
            raise ConfigurationError(f"--proc {value!r}: cannot split COMMAND as a shell would: {exc}") from None
        if not argv or not argv[0]:  # --proc 'x=""': no program to run
            raise ConfigurationError(f"--proc {value!r}: COMMAND names no program")
        specs.append(ProcSpec(name, argv))
    return specs


async def prepare(url: str, groups: list[Group], *, journal_store: str | None) -> None:
    """Create every consumer group and the journal store before any process starts.

    A group registered up front keeps what is published before its consumer is up;
    creating the journal's database here spares the journal and the gateway a race
    on creating the same SQLite file.
    """
    groups = list(groups)
    if journal_store is not None:
        from choreograph.journal import JOURNAL_GROUP, open_journal_store

        groups.append((JOURNAL_GROUP, None))
        store = open_journal_store(journal_store)
        await store.open()
        await store.close()
    async with open_transport(url) as bus:
        for group, types in groups:
            subscription = await bus.subscribe(group, types)
            await subscription.close()


DataDirOption = typer.Option(None, "--data-dir", help="State of the services (default ./var/<app>)")
ScaleOption = typer.Option(None, "--scale", help="SERVICE=N replicas (repeatable)")
OnlyOption = typer.Option(None, "--only", help="Run only these services of the App (repeatable)")
PushOption = typer.Option(None, "--push", help="Start `choreograph push --config FILE` (repeatable)")
ProcOption = typer.Option(None, "--proc", help='Also run NAME=COMMAND, e.g. node="node app.mjs" (repeatable)')


def dev(
    target: str = typer.Argument(..., metavar="MODULE:APP", help="MODULE:ATTR naming an App"),
    broker: str | None = typer.Option(
        None, "--broker", "-b", help="Broker URL (default: sqlite in the data dir)"
    ),
    data_dir: Path | None = DataDirOption,
    gateway: str | None = typer.Option(None, "--gateway", help="MODULE:ATTR of the ingestion gateway"),
    no_gateway: bool = typer.Option(False, "--no-gateway", help="Do not start the HTTP gateway"),
    journal: bool = typer.Option(True, "--journal/--no-journal", help="Start the journal observer"),
    host: str = typer.Option("127.0.0.1", "--host", help="Gateway interface"),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Gateway port (0: any free one)"),
    scale: list[str] = ScaleOption,
    only: list[str] = OnlyOption,
    push: list[Path] = PushOption,
    proc: list[str] = ProcOption,
    restart: bool = typer.Option(True, "--restart/--no-restart", help="Restart a process that dies"),
    stop_timeout: float = typer.Option(
        10.0, "--stop-timeout", callback=seconds(forever=True),
        help="Seconds between SIGTERM and SIGKILL on stop (inf: no SIGKILL)",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="Log level of the services"),
    log_format: str = LogFormatOption,
    otel: bool = typer.Option(
        False, "--otel", envvar="CHOREOGRAPH_OTEL",
        help="Trace the services and the gateway with OpenTelemetry (the children get CHOREOGRAPH_OTEL=1)",
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=0, max=65535,
        help="Serve Prometheus metrics from each service process, push ambassador and the gateway, on ports "
        "from this one up (0: each on any free port, printed in its log as `metrics on`)",
    ),
) -> None:
    """Run every service of an App (plus gateway and journal) as separate processes, with restarts."""
    configure_logging(log_level, log_format)  # checks both; --log-level debug: a failing import's traceback too
    load_faults()  # every service inherits CHOREOGRAPH_FAULTS: refuse a malformed one before any starts
    given_broker(broker)
    journal_env = env_url(JOURNAL_ENV, "a journal store URL")  # set empty: refused before anything is made
    app = load_object(target)
    if not isinstance(app, App):
        raise ConfigurationError(f"{target!r} is {kind_of(app)}; choreograph dev needs an App")
    directory = data_dir or Path("var") / app.name
    for char, starts in (("#", "a URL fragment"), ("?", "the URL's query")):  # the bus, journal and stores
        if char in str(directory):  # in it are opened by sqlite:// URLs ('?': blamed on the broker URL)
            raise ConfigurationError(f"--data-dir {str(directory)!r}: a sqlite:// URL cannot name a path with "
                                     f"{char!r} (it starts {starts}): pick a folder without one")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"--data-dir {str(directory)!r}: cannot create it: {why_not_made(directory, exc)}") from None
    url = broker or f"sqlite:///{directory / 'bus.db'}"

    specs, groups = _service_specs(target, app, url, only or [], _scales(scale or [], app), log_level)
    push_specs, push_groups = _push_specs(push or [], url)
    specs += push_specs + _extra_specs(proc or [])
    journal_store = journal_env or f"sqlite:///{directory / 'journal.db'}"
    if journal:
        specs.append(_journal_spec(target, url, journal_store))
    gateway_target = None if no_gateway else (gateway or _find_gateway(target))
    listening: list[socket.socket] = []
    if gateway_target is not None:
        from choreograph.cli._gateway import listen

        # Bound here, once, and inherited by every lifetime of the gateway process: a port taken
        # or a host not ours is one line now, --port 0 names the port really served on (no moment
        # between choosing it and serving on it for another process to take it), a restart keeps it.
        listening = listen(host, port)
        port = listening[0].getsockname()[1]
        specs.append(_gateway_spec(gateway_target, host, port, tuple(sock.fileno() for sock in listening)))
    try:
        metrics = _metrics_ports(specs, metrics_port) if metrics_port is not None else {}
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ConfigurationError(
                f"two processes share a name: {sorted(n for n in names if names.count(n) > 1)}"
            )

        env = dict(os.environ)
        env.update(
            {BROKER_ENV: url, DATA_ENV: str(directory), JOURNAL_ENV: journal_store, "PYTHONUNBUFFERED": "1"}
        )
        env["CHOREOGRAPH_LOG_FORMAT"] = log_format.lower()
        if otel:
            env["CHOREOGRAPH_OTEL"] = "1"
        env.pop("CHOREOGRAPH_METRICS_PORT", None)  # one port per process, given on each command line
        if console.is_terminal:
            env.setdefault("FORCE_COLOR", "1")
        # Children write to a pipe, where Rich would wrap at 80 columns; the prefix takes the rest.
        env.setdefault("COLUMNS", str(max(80, console.width - 20) if console.is_terminal else 200))
        run_async(prepare(url, groups + push_groups, journal_store=journal_store if journal else None))

        supervisor: Supervisor

        def ready() -> None:
            where = f"; gateway http://{address(host, port)}" if gateway_target else ""
            supervisor.say(f"{READY_LINE} {len(specs)} processes on {redact(url)}{where}", "bold green")
            if metrics and not metrics_port:
                supervisor.say(f"metrics (/metrics on 127.0.0.1): {', '.join(metrics)} each on a free port "
                               "(its `metrics on` line)", "green")
            elif metrics:
                listing = ", ".join(f"{name} :{number}" for name, number in metrics.items())
                supervisor.say(f"metrics (/metrics on 127.0.0.1): {listing}", "green")

        async def main() -> int:
            nonlocal supervisor
            supervisor = Supervisor(
                specs, env=env, console=console, stop_timeout=stop_timeout, restart=restart, on_ready=ready
            )
            return await supervisor.run()

        code = run_async(main())
        if code:
            raise typer.Exit(code)
    finally:
        for sock in listening:
            sock.close()


def register(app: typer.Typer) -> None:
    app.command("dev")(dev)
