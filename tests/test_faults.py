"""choreograph.faults: faults configured per service, injected around one step."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from choreograph import Reject
from choreograph.errors import ConfigurationError
from choreograph.faults import FAULTS_ENV, RESTARTS_ENV, Faults, FaultSpec, InjectedFault, load_faults


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
