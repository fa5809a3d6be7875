"""Real services for the tests, started once per session on loopback: gpsd fed by gpsfake,
PulseAudio with a null sink carrying a tone. And a way to run the daemon itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

# Imported before any thread starts: hypothesis's pytest plugin would import it at the end
# of a session otherwise, which CPython 3.11 has failed to compile after aiortc ran.
import hypothesis  # noqa: F401
import pytest

import nmea
from dashsos.triggers import control_socket

if TYPE_CHECKING:
    from dispatcher import Dispatcher

REPO = Path(__file__).resolve().parent.parent
TONE_HZ = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Does something accept TCP connections on 127.0.0.1:port?"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


TCP_LISTEN = "0A"  # /proc/net/tcp's state of a listening socket


class InetSocket(NamedTuple):
    proto: str  # tcp, tcp6, udp or udp6
    port: int  # the local port
    state: str  # /proc/net's hex state (TCP_LISTEN; "07" for an unconnected UDP socket)


def inet_sockets(pid: int) -> list[InetSocket]:
    """The TCP and UDP sockets process `pid` holds: its open fds matched by inode against
    the tables of its network namespace (/proc/<pid>/net/*), which list every process's."""
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in mine:
                found.append(InetSocket(proto, int(fields[1].rsplit(":", 1)[1], 16), fields[3]))
    return found


def feed_camera(fifo: Path) -> subprocess.Popen[bytes]:
    """An H.264 'camera' writing Constrained Baseline into a pipe, like an IP camera. Its
    own process group, so a test can SIGKILL or SIGSTOP it as a whole."""
    return subprocess.Popen(
        ["ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30",
         "-c:v", "libx264", "-preset", "ultrafast", "-profile:v", "baseline", "-g", "30",
         "-bsf:v", "dump_extra", "-f", "h264", "-y", str(fifo)],
        stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def hold_recordings(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every call's recording back at its close (the call stays `saving`) until the
    returned event is set (or 30 s)."""
    from dashsos.dispatch.muxer import CopyMuxer

    release = threading.Event()
    close = CopyMuxer.close

    def held_close(self: CopyMuxer, timeout: float = 30.0) -> None:
        release.wait(30)
        close(self, timeout)

    monkeypatch.setattr(CopyMuxer, "close", held_close)
    return release


def toml(config: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    return "".join(f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in keys.items())
                   for section, keys in config.items())


# --- no test leaves a process behind ---
#
# Every process the tests start inherits marks through its environment: the session's,
# and while a test runs, that test's. After each test whatever still carries the test's
# mark is SIGKILLed, and at the end of the session whatever carries the session's. A mark
# is appended, not replaced, so a pytest run inside a test keeps its parent's marks.

SESSION_MARK, TEST_MARK = "DASHSOS_TEST_SESSION", "DASHSOS_TEST_ID"
LeftOver = tuple[str, int, str]  # the test (or "session end"), pid, command line
_reaped: list[LeftOver] = []


def _add_mark(name: str, token: str) -> None:
    os.environ[name] = f"{os.environ.get(name, '')} {token}".strip()


_SESSION_TOKEN = uuid.uuid4().hex
_add_mark(SESSION_MARK, _SESSION_TOKEN)  # on import: before any fixture starts anything


def _processes() -> dict[int, tuple[int, bytes, str]]:
    """Every live process: pid -> (parent pid, environment, command line). Zombies, and
    processes that vanish or may not be read meanwhile, are left out."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue  # gone, or not ours to read
        found[int(entry.name)] = (int(fields[1]), environ, cmdline)
    return found


def _carrying(token: str) -> dict[int, str]:
    """pid -> command line of the processes whose environment holds `token`, and of their
    descendants (Chromium's children overwrite their environment with their title).
    Never this process or its ancestors."""
    procs = _processes()
    spared, pid = set(), os.getpid()
    while pid > 1 and pid in procs:  # this pytest and its ancestors
        spared.add(pid)
        pid = procs[pid][0]
    marked = {pid for pid, (_, environ, _) in procs.items()
              if token.encode() in environ} - spared
    while children := {pid for pid, (ppid, _, _) in procs.items()
                       if ppid in marked} - marked - spared:
        marked |= children
    return {pid: procs[pid][2] for pid in marked}


def descendants(pid: int) -> set[int]:
    """The live processes below `pid`: its children, theirs, and so on."""
    procs, found = _processes(), {pid}
    while children := {p for p, (ppid, _, _) in procs.items() if ppid in found} - found:
        found |= children
    return found - {pid}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def reap(token: str, timeout: float = 5.0) -> dict[int, str]:
    """SIGKILL every process carrying `token` and wait until they are gone (or zombies,
    left to their parents). Returns what was killed."""
    killed: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while (found := _carrying(token)) and time.monotonic() < deadline:
        # Looked at again after the kill: one may have forked while we looked.
        for pid, cmdline in found.items():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.setdefault(pid, cmdline)
            except (ProcessLookupError, PermissionError):
                pass  # gone meanwhile, or not ours
        while any(_alive(pid) for pid in found) and time.monotonic() < deadline:
            time.sleep(0.01)
    return killed


@pytest.fixture(autouse=True)
def reap_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Marks what this test starts, and kills what it left running. It depends on no other
    fixture, and fixtures of wider scope are set up first, so processes of session and
    module fixtures never carry a test's mark."""
    previous = os.environ.get(TEST_MARK)
    token = uuid.uuid4().hex
    _add_mark(TEST_MARK, token)
    try:
        yield
    finally:
        if previous is None:
            del os.environ[TEST_MARK]
        else:
            os.environ[TEST_MARK] = previous
        _reaped.extend((request.node.nodeid, pid, cmd) for pid, cmd in reap(token).items())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _reaped.extend(("session end", pid, cmd) for pid, cmd in reap(_SESSION_TOKEN).items())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _reaped:
        return
    terminalreporter.write_sep("=", f"{len(_reaped)} processes left behind, killed",
                               yellow=True)
    for where, pid, cmdline in _reaped:
        terminalreporter.write_line(f"{where}: pid {pid}: {cmdline[:200]}")


# --- gpsd through gpsfake ---


class GpsFake:
    """gpsfake replaying a generated log: one fix a second, in real time."""

    def __init__(self, workdir: Path, seconds: int = 1800) -> None:
        start = datetime.now(UTC).replace(microsecond=0)
        text, self.first_fix = nmea.log(start, seconds)
        self.log = workdir / "track.nmea"
        self.log.write_text(text)
        self.port = free_port()
        self.output = open(workdir / "gpsfake.log", "wb")  # noqa: SIM115
        # Three sentences per epoch, a third of a second apart: one fix a second.
        # Own process group: gpsfake must be SIGKILLed as a group (it spins on SIGTERM).
        self.process = subprocess.Popen(
            ["gpsfake", "-q", "-c", "0.333", "-P", str(self.port), str(self.log)],
            stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._listening, 10, "gpsfake's gpsd to listen")

    def _listening(self) -> bool:
        return listening(self.port)

    def index_of(self, iso_time: str) -> int:
        """Which fix of the log a gpsd timestamp is."""
        t = datetime.fromisoformat(iso_time.replace("Z", "+00:00"))
        return round((t - self.first_fix).total_seconds())

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.output.close()


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run the tests through scripts/test")


@pytest.fixture(scope="session")
def gpsfake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpsFake]:
    _require("gpsfake", "gpsd")
    fake = GpsFake(tmp_path_factory.mktemp("gpsfake"))
    yield fake
    fake.stop()


@pytest.fixture
def own_gpsfake(tmp_path: Path) -> Iterator[GpsFake]:
    """A gpsfake of this test's own, for tests that kill it."""
    _require("gpsfake", "gpsd")
    fake = GpsFake(tmp_path, seconds=300)
    yield fake
    fake.stop()


@pytest.fixture
def dispatcher(tmp_path: Path) -> Iterator[Dispatcher]:
    """The reference dispatcher, `dashsos dispatch`, on a loopback port of its own."""
    from dispatcher import Dispatcher  # here: dispatcher.py imports this module

    desk = Dispatcher(tmp_path / "dispatcher")
    yield desk
    desk.stop()


# --- PulseAudio with a null sink fed by a tone ---


@pytest.fixture(scope="session")
def pulse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for a client of a private PulseAudio whose default source is the
    monitor of a null sink into which a sine of TONE_HZ is looped."""
    _require("pulseaudio", "pactl")
    root = tmp_path_factory.mktemp("pulse")
    (root / "run").mkdir()
    (root / "home").mkdir()
    sock = root / "native"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(root / "run"), "HOME": str(root / "home")}
    log = open(root / "pulseaudio.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        ["pulseaudio", "--exit-idle-time=-1", "--system=false", "-n", "--daemonize=no",
         "--disallow-exit", "-L", f"module-native-protocol-unix auth-anonymous=1 socket={sock}",
         "-L", "module-null-sink sink_name=vsink",
         "-L", f"module-sine-source source_name=tone frequency={TONE_HZ}",
         "-L", "module-loopback source=tone sink=vsink",
         "-L", "module-null-sink sink_name=speaker",  # the car's speaker, for talk-back
         "-L", "module-always-sink"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = {"PULSE_SERVER": f"unix:{sock}"}
    wait_for(lambda: sock.exists(), 10, "PulseAudio's socket")
    subprocess.run(["pactl", "set-default-source", "vsink.monitor"], env={**env, **client},
                   check=True)
    yield client
    process.kill()
    process.wait()
    log.close()


# --- the daemon ---


class DaemonClient:
    """What a test reads from a running `dashsos run`: its log and its control socket."""

    socket: Path
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, cmd: str) -> dict[str, Any]:
        return control_socket.request(self.socket, {"cmd": cmd})

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.request("status")["status"]
        return status

    def source(self, name: str) -> dict[str, Any]:
        source: dict[str, Any] = self.status()["sources"][name]
        return source


class Daemon(DaemonClient):
    """`dashsos run` in a subprocess with its own config, state and socket."""

    def __init__(self, workdir: Path, config: dict[str, dict[str, Any]],
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        self.socket = workdir / "control.sock"
        base: dict[str, dict[str, Any]] = {
            "storage": {"dir": str(self.state)},
            "control": {"socket": str(self.socket)},
            "buffer": {"pre_seconds": 3},
            "incident": {"post_seconds": 3},
            "video": {"backend": "test", "width": 320, "height": 240, "fps": 30,
                      "bitrate": 400_000},
            "audio": {"backend": "test"},
            "gps": {"backend": "simulated"},
            "log": {"level": "debug"},
        }
        for section, keys in config.items():
            base.setdefault(section, {}).update(keys)
        self.config = base
        self.state = Path(base["storage"]["dir"])  # a restarted car passes its old one
        self.config_path = workdir / "dashsos.toml"
        self.config_path.write_text(toml(base))
        self.log_path = workdir / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dashsos", "--config", str(self.config_path), "run"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        wait_for(lambda: self.socket.exists() or self.process.poll() is not None, 20,
                 "the control socket")
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.logs()}")


    def wait_buffered(self, seconds: float, streams: tuple[str, ...] = ("video", "audio"),
                      timeout: float = 30) -> None:
        def full() -> bool:
            sources = self.status()["sources"]
            return all(sources[s].get("buffered_seconds", 0) >= seconds for s in streams)

        wait_for(full, timeout, f"{seconds} s buffered in {streams}", step=0.25)

    def trigger(self) -> dict[str, Any]:
        reply = self.request("trigger")
        assert reply["ok"], reply
        return reply

    def wait_saved(self, incident: str, timeout: float = 60) -> dict[str, Any]:
        record = self.state / "incidents" / incident / "incident.json"

        def saved() -> dict[str, Any] | None:
            if record.exists():
                data: dict[str, Any] = json.loads(record.read_text())
                if data["status"] in ("saved", "failed"):
                    return data
            return None

        data: dict[str, Any] = wait_for(saved, timeout, f"incident {incident} saved", step=0.25)
        assert data["status"] == "saved", (data, self.logs())
        return data

    def incident_dir(self, incident: str) -> Path:
        return self.state / "incidents" / incident

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: dict[str, dict[str, Any]] | None = None,
              env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(tmp_path / f"daemon{len(started)}", config or {}, env)
        started.append(d)
        return d

    (tmp_path / "daemon0").mkdir()
    for i in range(1, 4):
        (tmp_path / f"daemon{i}").mkdir()
    yield start
    for d in started:
        d.stop(signal.SIGKILL)


def record_sink(client_env: dict[str, str], sink: str, seconds: float) -> bytes:
    """What a PulseAudio sink played for `seconds`: 48 kHz mono s16le from its monitor."""
    process = subprocess.Popen(
        ["parec", "-d", f"{sink}.monitor", "--raw", "--format=s16le", "--rate=48000",
         "--channels=1", "--latency-msec=50"],
        stdout=subprocess.PIPE, env={**os.environ, **client_env})
    time.sleep(seconds)
    process.terminate()
    data, _ = process.communicate(timeout=10)
    return data
