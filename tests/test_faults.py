"""choreograph.faults: faults configured per service, injected around one step."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from choreograph import Context, Event, Publisher, Reject, RetryPolicy, Service, Worker
from choreograph.errors import ConfigurationError
from choreograph.faults import FAULTS_ENV, RESTARTS_ENV, Faults, FaultSpec, InjectedFault, load_faults
from choreograph.testing import MemoryTransport, VirtualClock, settled
from choreograph.transports import open_transport


@dataclasses.dataclass
class Ctx:
    attempt: int = 1


def test_inline_json_configures_each_service_by_name() -> None:
    faults = load_faults('{"scheduler": {"fail_rate": 0.2, "fail_first": 2}, "*": {"hang": 1}}')
    assert faults["scheduler"] == FaultSpec(fail_rate=0.2, fail_first=2)
    assert faults["*"].hang == 1.0


def test_a_toml_file_path_is_read(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "faults.toml")
    with open(path, "w") as f:
        f.write('[package]\nreject_rate = 1.0\n\n["drone-scheduler"]\ncrash_after = 3\n')
    faults = load_faults(path)
    assert faults["package"].reject_rate == 1.0
    assert faults["drone-scheduler"].crash_after == 3


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('{"svc": {"fail_rat": 0.1}}', "unknown setting"),
        ('{"svc": {"fail_rate": 2}}', "between 0 and 1"),
        ('{"svc": {"fail_first": "x"}}', "expected a number"),
        ("{not json", "not valid JSON"),
        ("/no/such/file.toml", "neither inline JSON nor an existing file"),
    ],
)
def test_bad_configuration_names_the_problem(source: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_faults(source)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('{"svc": {"fail_rate": 2}}', "CHOREOGRAPH_FAULTS: faults['svc']: fail_rate must be between 0 and 1, got 2.0"),
        ('{"svc": {"hang": -1}}', "CHOREOGRAPH_FAULTS: faults['svc']: hang must be >= 0, got -1.0"),
        ('{"svc": {"fail_first": 1.5}}', "CHOREOGRAPH_FAULTS: faults['svc'].fail_first: expected a whole number, got 1.5"),
        ('{"svc": {"fail_rat": 0.1}}', "CHOREOGRAPH_FAULTS: faults['svc']: unknown setting(s) ['fail_rat']; known: "
         "['crash_after', 'crash_times', 'duplicate_rate', 'fail_first', 'fail_rate', 'hang', 'hang_rate', "
         "'reject_rate', 'seed']"),
        ('[{"svc": {}}]', "CHOREOGRAPH_FAULTS: expected an object keyed by service name, got list"),
    ],
)
def test_every_error_names_the_variable_the_service_and_the_setting(source: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_faults(source)
    assert str(raised.value) == message


@pytest.mark.parametrize("source", ['{"svc": {"hang": NaN}}', "[svc]\nhang = nan\n"])
def test_a_nan_hang_is_refused_naming_the_setting(source: str, tmp_path: Path) -> None:
    """JSON as Python reads it, and TOML, have NaN: it passed the range check of hang, and the
    step then slept for NaN seconds."""
    if not source.startswith("{"):
        path = tmp_path / "faults.toml"
        path.write_text(source)
        source = str(path)
    with pytest.raises(ConfigurationError) as raised:
        load_faults(source)
    assert str(raised.value).endswith("faults['svc']: hang must be >= 0, got nan")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hang": "1"}, "faults: hang must be a number, got '1'"),
        ({"fail_rate": None}, "faults: fail_rate must be a number, got None"),
        ({"fail_first": True}, "faults: fail_first must be a whole number, got True"),
        ({"crash_after": 1.5}, "faults: crash_after must be a whole number, got 1.5"),
        ({"seed": "x"}, "faults: seed must be a whole number, got 'x'"),
        ({"hang": float("nan")}, "faults: hang must be >= 0, got nan"),
    ],
)
def test_a_fault_spec_built_in_code_names_the_bad_setting(settings: dict[str, object], message: str) -> None:
    """A FaultSpec made in code (not through load_faults) with a bad value: a comparison with a
    string raised a bare TypeError naming no setting; a float crash_after, a bool fail_first or
    a string seed were taken as they were."""
    with pytest.raises(ConfigurationError) as raised:
        FaultSpec(**settings)  # type: ignore[arg-type]
    assert str(raised.value) == message


def test_an_error_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_text("[svc]\nreject_rate = 3\n")
    with pytest.raises(ConfigurationError) as raised:
        load_faults(str(path))
    assert str(raised.value) == f"CHOREOGRAPH_FAULTS: {path}: faults['svc']: reject_rate must be between 0 and 1, got 3.0"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigurationError) as raised:
        load_faults(str(path))  # a UnicodeDecodeError escaped
    assert str(raised.value).startswith(f"CHOREOGRAPH_FAULTS: {path}: 'utf-8' codec can't decode")


async def test_fail_first_fails_the_first_attempts_only() -> None:
    faults = Faults("svc", FaultSpec(fail_first=2))
    for attempt in (1, 2):
        with pytest.raises(InjectedFault):
            async with faults.step(Ctx(attempt)):
                pass
    async with faults.step(Ctx(3)):
        pass


async def test_fail_rate_fails_about_that_fraction_of_attempts() -> None:
    faults = Faults("svc", FaultSpec(fail_rate=0.3, seed=7))
    failures = 0
    for _ in range(1000):
        try:
            await faults.before(Ctx())
        except InjectedFault:
            failures += 1
    assert 230 < failures < 370


async def test_reject_rate_rejects_permanently() -> None:
    with pytest.raises(Reject):
        await Faults("svc", FaultSpec(reject_rate=1.0)).before(Ctx())


async def test_a_step_that_fails_does_not_count_towards_a_crash() -> None:
    faults = Faults("svc", FaultSpec(crash_after=1))
    with pytest.raises(ValueError):
        async with faults.step(Ctx()):
            raise ValueError("business error")
    assert faults.completed == 0


def test_crash_after_kills_the_process_after_the_nth_completed_step() -> None:
    script = (
        "import asyncio, dataclasses\n"
        "from choreograph.faults import Faults\n"
        "@dataclasses.dataclass\n"
        "class C:\n attempt: int = 1\n"
        "async def main():\n"
        " f = Faults.for_service('svc')\n"
        " for n in range(5):\n"
        "  async with f.step(C()):\n"
        "   print('step', n, flush=True)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, FAULTS_ENV: '{"svc": {"crash_after": 2}}'}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == -9
    assert done.stdout.split("\n")[:2] == ["step 0", "step 1"] and "step 2" not in done.stdout


def test_crash_times_spares_a_process_restarted_that_many_times() -> None:
    script = (
        "import asyncio, dataclasses\n"
        "from choreograph.faults import Faults\n"
        "@dataclasses.dataclass\n"
        "class C:\n attempt: int = 1\n"
        "async def main():\n"
        " f = Faults.for_service('svc')\n"
        " for n in range(3):\n"
        "  async with f.step(C()):\n"
        "   pass\n"
        " print('survived', flush=True)\n"
        "asyncio.run(main())\n"
    )
    faults = '{"svc": {"crash_after": 1, "crash_times": 2}}'
    outcomes = []
    for restarts in ("0", "1", "2"):
        env = {**os.environ, FAULTS_ENV: faults, RESTARTS_ENV: restarts}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
        )
        outcomes.append(done.returncode)
    assert outcomes == [-9, -9, 0]


async def test_for_service_reads_the_environment_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    faults = Faults.for_service("svc")
    monkeypatch.setenv(FAULTS_ENV, '{"*": {"fail_first": 1}}')
    with pytest.raises(InjectedFault):
        await faults.before(Ctx())


async def test_duplicate_rate_fails_attempts_after_their_step_succeeded() -> None:
    faults = Faults("svc", FaultSpec(duplicate_rate=1.0))
    ran = []
    with pytest.raises(InjectedFault, match="duplicate"):
        async with faults.step(Ctx()):
            ran.append("step")
    assert ran == ["step"] and faults.completed == 1


class DupAsked(Event, type="test.faults.dup.asked"):
    n: int


_TRANSACTIONAL_WORKER = """
import asyncio, sys
from choreograph import Context, Event, Publisher, Service, Worker
from choreograph.faults import Faults
from choreograph.transports import open_transport

class Asked(Event, type="test.faults.asked"):
    n: int

class Done(Event, type="test.faults.done"):
    n: int

svc = Service("svc", database=sys.argv[1])
faults = Faults.for_service("svc")

@svc.on(Asked)
async def handle(asked: Asked, ctx: Context) -> Done:
    async with faults.step(ctx), ctx.transaction() as tx:
        await tx.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")
        await tx.execute("INSERT INTO t VALUES ($1)", asked.n)
    return Done(n=asked.n)

async def main():
    async with open_transport(sys.argv[2]) as bus, Worker([svc], bus):
        await Publisher(bus).publish(Asked(n=1))
        await asyncio.sleep(30)

asyncio.run(main())
"""


async def test_crash_after_in_a_transactional_step_kills_after_the_commit_before_the_relay_publishes(
    tmp_path: Path,
) -> None:
    database, bus_url = tmp_path / "svc.db", f"sqlite:///{tmp_path / 'bus.db'}"
    async with open_transport(bus_url) as bus:
        await (await bus.subscribe("probe", ["test.faults.done"])).close()  # the group keeps what comes
        env = {**os.environ, FAULTS_ENV: '{"svc": {"crash_after": 1}}'}
        env.pop(RESTARTS_ENV, None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _TRANSACTIONAL_WORKER, f"sqlite:///{database}", bus_url, env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == -9, stderr.decode()

        db = sqlite3.connect(database)
        assert db.execute("SELECT n FROM t").fetchall() == [(1,)]
        assert db.execute("SELECT count(*) FROM choreograph_inbox WHERE grp = 'svc'").fetchone() == (1,)
        assert db.execute("SELECT type, sent_at FROM choreograph_outbox").fetchall() == [("test.faults.done", None)]
        db.close()
        probe = await bus.subscribe("probe", ["test.faults.done"])
        try:
            assert await probe.fetch(10, timeout=0.5) == []
        finally:
            await probe.close()


async def test_duplicate_rate_in_a_transactional_step_rolls_the_step_back_with_the_attempt(
    tmp_path: Path,
) -> None:
    svc = Service("svc", database=f"sqlite:///{tmp_path / 'svc.db'}", retry=RetryPolicy(base=0.01, jitter=False))
    duplicating, healthy = Faults("svc", FaultSpec(duplicate_rate=1.0)), Faults("svc")

    @svc.on(DupAsked)
    async def handle(asked: DupAsked, ctx: Context) -> None:
        async with (duplicating if ctx.attempt == 1 else healthy).step(ctx), ctx.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")
            await tx.execute("INSERT INTO t VALUES ($1)", asked.n)  # a second insert of n would fail

    bus = MemoryTransport()
    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(DupAsked(n=1))
        await settled(bus)
    assert (worker.stats("svc").retried, worker.stats("svc").handled) == (1, 1)
    assert sqlite3.connect(tmp_path / "svc.db").execute("SELECT n FROM t").fetchall() == [(1,)]
    assert duplicating.completed == 0 and healthy.completed == 1


class HangAsked(Event, type="test.faults.hang.asked"):
    n: int


async def _one_hang_asked(svc: Service) -> tuple[VirtualClock, MemoryTransport, Worker]:
    """Publish one HangAsked to ``svc``'s worker on a VirtualClock at 0 and wait until all settled."""
    clock = VirtualClock(start=0.0)
    bus = MemoryTransport(clock=clock)
    async with Worker([svc], bus) as worker:
        await Publisher(bus).publish(HangAsked(n=1))
        await asyncio.wait_for(settled(bus), 30)
    return clock, bus, worker


async def test_a_hang_on_a_virtual_clock_times_out_in_virtual_time_and_is_dead_lettered() -> None:
    """A hang of 600 s past a 5 s timeout, on a VirtualClock: each attempt times out when the
    clock passes 5 s (the hang slept for real, 600 s an attempt), and the event is dead-lettered
    after its attempts; the clock, not the wall, shows the time spent."""
    svc = Service("svc", retry=RetryPolicy(max_attempts=3, base=1.0, jitter=False))
    faults = Faults("svc", FaultSpec(hang=600))

    @svc.on(HangAsked, timeout=5.0)
    async def handle(asked: HangAsked, ctx: Context) -> None:
        async with faults.step(ctx):
            pass

    clock, bus, worker = await _one_hang_asked(svc)
    [letter] = await bus.dead_letters("svc")
    assert letter.record["reason"] == "max_attempts" and letter.record["attempts"] == 3
    assert letter.record["last_error"]["type"] == "HandlerTimeout"
    assert (worker.stats("svc").retried, worker.stats("svc").handled) == (2, 0)
    assert faults.completed == 0
    assert clock.monotonic() == pytest.approx(3 * 5.0 + 1.0 + 2.0)  # three timeouts and two backoffs


async def test_a_hang_shorter_than_the_timeout_but_longer_than_the_lease_passes_in_virtual_time() -> None:
    """The worker keeps the lease of the hanging delivery on the same clock: the event is
    handled once, not handed out again when the clock passes its lease (30 s)."""
    svc = Service("svc")
    faults = Faults("svc", FaultSpec(hang=45))
    runs: list[int] = []

    @svc.on(HangAsked, timeout=60.0)
    async def handle(asked: HangAsked, ctx: Context) -> None:
        runs.append(ctx.attempt)
        async with faults.step(ctx):
            pass

    clock, bus, worker = await _one_hang_asked(svc)
    assert runs == [1] and faults.completed == 1
    assert (worker.stats("svc").handled, worker.stats("svc").retried, worker.stats("svc").deferred) == (1, 0, 0)
    assert clock.monotonic() == pytest.approx(45.0)


async def test_settled_does_not_jump_the_clock_over_a_handler_at_work_while_another_hangs() -> None:
    """settled() jumps a virtual clock while only a hang holds events in flight; it jumped while
    another handler still worked for real, which then saw 5 s pass in 10 ms and timed out."""
    hanging, working = Service("hanging", retry=RetryPolicy(max_attempts=1)), Service("working")
    faults = Faults("hanging", FaultSpec(hang=600))
    seen: list[float] = []

    @hanging.on(HangAsked, timeout=5.0)
    async def hang(asked: HangAsked, ctx: Context) -> None:
        async with faults.step(ctx):
            pass

    @working.on(HangAsked, timeout=1.0)
    async def work(asked: HangAsked, ctx: Context) -> None:
        started = ctx.clock.monotonic()
        await asyncio.sleep(0.02)  # real work
        seen.append(ctx.clock.monotonic() - started)

    clock = VirtualClock(start=0.0)
    bus = MemoryTransport(clock=clock)
    async with Worker([hanging, working], bus) as worker:
        await Publisher(bus).publish(HangAsked(n=1))
        await asyncio.wait_for(settled(bus), 30)
    assert seen == [0.0]
    assert (worker.stats("working").handled, worker.stats("working").retried) == (1, 0)  # not timed out
    assert worker.stats("hanging").dead_lettered == 1
    assert clock.monotonic() == 5.0
