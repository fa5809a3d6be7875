"""No test leaves a process behind (issue 9): a pytest session of its own, with this
conftest as a plugin, whose first test starts a process, never stops it and fails; the
process is gone before the second test, while the session's PulseAudio lives on. What a
session fixture leaves running is gone when the session ends. Each is named in the
summary."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import conftest
from conftest import SESSION_MARK, TEST_MARK, Daemon, reap
from mqttbroker import Broker
from test_faults import Car, car_config

INNER = '''
import json
import os
import subprocess
from pathlib import Path

import pytest

OUT = Path(os.environ["LEFTOVER_OUT"])


def pulseaudio_pid(pulse):
    """The session's PulseAudio: the process listening on its socket."""
    sock = pulse["PULSE_SERVER"].removeprefix("unix:")
    for entry in Path("/proc").iterdir():
        try:
            if sock in (entry / "cmdline").read_bytes().decode(errors="replace"):
                return int(entry.name)
        except (OSError, ValueError):
            pass
    raise AssertionError("no PulseAudio")


def alive(pid):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def session_leak():
    process = subprocess.Popen(["sleep", "601"], start_new_session=True)
    (OUT / "session_leak").write_text(str(process.pid))
    yield  # and never stopped


def test_leaks_and_fails(pulse, session_leak):
    (OUT / "pulseaudio").write_text(str(pulseaudio_pid(pulse)))
    leak = subprocess.Popen(["sleep", "600"], start_new_session=True)
    (OUT / "test_leak").write_text(str(leak.pid))
    assert False, "fails on purpose"


def test_after_it(pulse, session_leak):
    assert pulseaudio_pid(pulse) == int((OUT / "pulseaudio").read_text())
    assert not alive(int((OUT / "test_leak").read_text())), "the test's leak lives on"
    assert alive(int((OUT / "session_leak").read_text())), "a session fixture's died"
'''


def _environ(pid: int) -> bytes:
    return (Path("/proc") / str(pid) / "environ").read_bytes()


def _pulseaudio_pid(pulse: dict[str, str]) -> int:
    sock = pulse["PULSE_SERVER"].removeprefix("unix:")
    for entry in Path("/proc").iterdir():
        try:
            if sock in (entry / "cmdline").read_bytes().decode(errors="replace"):
                return int(entry.name)
        except (OSError, ValueError):
            pass
    raise AssertionError("no PulseAudio")


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] \
            != "Z"
    except OSError:
        return False


def test_leftover_processes_are_killed_and_named(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    out = tmp_path / "out"
    out.mkdir()
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "LEFTOVER_OUT": str(out),
           "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH"))
                                         if p)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'inner-tmp'}", "-q", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    report = result.stdout
    assert "1 failed, 1 passed" in report, report + result.stderr
    assert "fails on purpose" in report
    test_leak, session_leak = (int((out / name).read_text())
                               for name in ("test_leak", "session_leak"))
    assert not _alive(test_leak) and not _alive(session_leak)
    assert "2 processes left behind, killed" in report, report
    assert f"test_inner.py::test_leaks_and_fails: pid {test_leak}: sleep 600" in report, report
    assert f"session end: pid {session_leak}: sleep 601" in report, report
    assert reap(os.environ["DASHSOS_TEST_ID"].split()[-1]) == {}  # nothing left for us


def test_daemons_brokers_and_the_fault_suites_cars_carry_the_marks(
        daemon: Callable[..., Daemon], pulse: dict[str, str], tmp_path: Path) -> None:
    session = conftest._SESSION_TOKEN.encode()
    test = os.environ[TEST_MARK].split()[-1].encode()
    assert session in os.environ[SESSION_MARK].encode()
    d = daemon()
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    car = Car(tmp_path, car_config(tmp_path, tmp_path / "state"), "car")
    processes: dict[str, Any] = {"daemon": d.process, "broker": broker.process,
                                 "car": car.process}
    try:
        car.up()
        for name, process in processes.items():
            environ = _environ(process.pid)
            assert session in environ and test in environ, name
        environ = _environ(_pulseaudio_pid(pulse))  # a session fixture's: not this test's
        assert session in environ and test not in environ
    finally:
        car.process.kill()
        car.process.wait()
        broker.stop()
