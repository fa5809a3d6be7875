"""A car and a WHIP server on a real network path: two private network namespaces
(198.51.100.1 car, 198.51.100.2 desk, IPv6 off) joined by tests/netrelay.py, a
userspace netem (delay, loss, outages: this machine's kernel has no sch_netem) between
a TUN device in each, and a real tc tbf qdisc on each device for the bandwidth cap.
Used by the coverage-gap tests and `scripts/bench call --netem`. Needs root and
iproute2; everything it creates (namespaces, processes) is removed by close(), which
callers run in a finally.

The desk is either the WHIP server (tests/whipserver.py, one session per endpoint), which
writes what it received to a JSON file, or the reference dispatcher (`dashsos dispatch`,
its own calls watched through its console API by a thread that lives in the desk
namespace), each in the desk namespace as its own process; the car is
`dashsos run` in the car namespace, driven over its control socket (a path on the shared
file system works across network namespaces). Both read CLOCK_MONOTONIC, so times from
the test, the car and the server compare directly.
"""

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
import urllib.request
from itertools import count
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
CAR_IP, DESK_IP = "198.51.100.1", "198.51.100.2"
DESK_PORT = 8080
TOKEN = "car-token"
CONSOLE_TOKEN = "operator-token"
DESKS = ("whip", "dispatcher")
# 300 ms round trip, 5 % loss, 1 Mb/s each way: a poor mobile link.
MOBILE = {"delay_ms": 150, "loss": 0.05, "rate": "1mbit"}


def car_token(n: int) -> str:
    return TOKEN if n == 1 else f"{TOKEN}-{n}"


def available() -> str | None:
    """Why the namespace tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    return None


_PATHS = count()  # NetPaths made by this process


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, timeout=10, text=True)
    if done.returncode != 0:  # with what the command said, which check=True hides
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")


class CallWatch:
    """The reference dispatcher's calls, polled every 50 ms through its console API from
    a thread inside the desk namespace, in the shape tests/whipserver.py writes: per call
    `deleted` (over: saving or ended), `state`, `end_reason` and `video_times` (the
    poll's CLOCK_MONOTONIC time, once per frame the desk counted as decoded since the poll
    before: 50 ms resolution)."""

    def __init__(self, ns: str, url: str) -> None:
        self.url = url
        self._calls: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.answering = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ns,), daemon=True)
        self._thread.start()

    def _run(self, ns: str) -> None:
        from netrelay import enter

        enter(f"/var/run/netns/{ns}")
        while not self._stop.wait(0.05):
            request = urllib.request.Request(
                self.url + "/api/calls", headers={"Authorization": f"Bearer {CONSOLE_TOKEN}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    calls = json.loads(response.read())["calls"]
            except (OSError, ValueError, KeyError):
                continue
            now = time.monotonic()
            self.answering.set()
            with self._lock:
                for call in calls:
                    seen = self._calls.setdefault(call["id"], {"id": call["id"],
                                                               "video_times": []})
                    frames = call.get("received", {}).get("video", {}).get("frames", 0)
                    new = frames - seen.get("frames", 0)
                    seen["video_times"].extend([now] * max(new, 0))
                    seen.update(frames=frames, deleted=call["state"] in ("saving", "ended"),
                                end_reason=call["end_reason"], state=call["state"])

    def sessions(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(c, video_times=list(c["video_times"])) for c in self._calls.values()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class NetPath:
    def __init__(self, workdir: Path, *, single: bool = True, desk: str = "whip",
                 audio: bool = False) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        # Unique per process (a counter, fixed width: the time in ms once gave two paths
        # of one test the same names) and across processes (the pid); interface names
        # must stay within 15 characters.
        tag = f"{os.getpid() % 100000:05d}{next(_PATHS) % 1000:03d}"
        self.car_ns, self.desk_ns = f"dsc{tag}", f"dsd{tag}"
        self.car_if, self.desk_if = f"vc{tag}", f"vd{tag}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self.impairment: dict[str, Any] = {}
        self.control = workdir / "path.json"
        self.stats_path = workdir / "whip-stats.json"
        self.socket = workdir / "control.sock"
        self.desk = desk
        self.watch: CallWatch | None = None
        # With `audio`, the WHIP server keeps what it decodes (tests/speech.py reads it).
        self.audio_dir = workdir / "heard" if audio else None
        try:
            self._setup()
            if self.audio_dir:
                self.audio_dir.mkdir()
            if desk == "none":  # the caller starts its own (tests/janus.py)
                pass
            elif desk == "whip":
                self.server = self._spawn(self.desk_ns, "whip.log", [
                    sys.executable, str(TESTS / "whipserver.py"), "--host", DESK_IP,
                    "--port", str(DESK_PORT), "--stats", str(self.stats_path),
                    *(["--single"] if single else []),
                    *(["--audio", str(self.audio_dir)] if self.audio_dir else [])])
                self._wait(lambda: self.stats_path.exists(), 20, "the WHIP server")
            else:
                self.server = self._start_dispatcher()
        except BaseException:
            self.close()
            raise

    def _start_dispatcher(self, cars: int = 1, **settings: Any) -> subprocess.Popen[bytes]:
        """`dashsos dispatch` in the desk namespace for `cars` cars (car-N calls with
        car_token(N)); `settings` go to [dispatch]."""
        from conftest import toml

        (self.workdir / "cars").write_text("".join(
            f"{car_token(n)} car-{n}\n" for n in range(1, cars + 1)))
        (self.workdir / "consoles").write_text(f"{CONSOLE_TOKEN} alice\n")
        (self.workdir / "dispatch.toml").write_text(toml({
            "dispatch": {"listen": DESK_IP, "port": DESK_PORT,
                         "car_tokens_file": str(self.workdir / "cars"),
                         "console_tokens_file": str(self.workdir / "consoles"),
                         "recordings_dir": str(self.workdir / "recordings"), **settings},
            "ice": {"interfaces": [self.desk_if]}, "log": {"level": "info"}}))
        process = self._spawn(self.desk_ns, "dispatch.log", [
            sys.executable, "-m", "dashsos", "--config", str(self.workdir / "dispatch.toml"),
            "dispatch"])
        self.watch = CallWatch(self.desk_ns, f"http://{DESK_IP}:{DESK_PORT}")
        self._wait(lambda: self.watch and self.watch.answering.is_set()
                   or process.poll() is not None, 20, "the dispatcher")
        if process.poll() is not None:
            raise RuntimeError((self.workdir / "dispatch.log").read_text())
        return process

    @property
    def endpoint(self) -> str:
        return f"http://{DESK_IP}:{DESK_PORT}/whip"

    def _setup(self) -> None:
        for ns in (self.car_ns, self.desk_ns):
            _run("ip", "netns", "add", ns)
            _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            _run("ip", "netns", "exec", ns, "sysctl", "-qw",
                 "net.ipv6.conf.default.disable_ipv6=1")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        self._write_control({})
        handle = open(self.workdir / "relay.log", "wb")  # noqa: SIM115
        self._logs.append(handle)
        self.processes.append(subprocess.Popen(
            [sys.executable, str(TESTS / "netrelay.py"), self.car_ns, self.car_if,
             self.desk_ns, self.desk_if, str(self.control)], stdout=handle,
            stderr=subprocess.STDOUT, start_new_session=True))
        self._wait(lambda: b"ready" in (self.workdir / "relay.log").read_bytes()
                   or self.processes[-1].poll() is not None, 10, "the relay")
        for ns, dev, ip in ((self.car_ns, self.car_if, CAR_IP),
                            (self.desk_ns, self.desk_if, DESK_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")

    def _write_control(self, settings: dict[str, Any]) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings))
        os.replace(tmp, self.control)

    def _spawn(self, ns: str, log: str, command: list[str]) -> subprocess.Popen[bytes]:
        handle = open(self.workdir / log, "wb")  # noqa: SIM115
        self._logs.append(handle)
        process = subprocess.Popen(["ip", "netns", "exec", ns, *command], stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                       p for p in (os.environ.get("PYTHONPATH"), str(TESTS))
                                       if p)})
        self.processes.append(process)
        return process

    @staticmethod
    def _wait(predicate: Any, timeout: float, what: str, step: float = 0.05) -> Any:
        from conftest import wait_for

        return wait_for(predicate, timeout, what, step)

    # --- the car ---

    def start_car(self, config: dict[str, dict[str, Any]]) -> None:
        from conftest import toml

        (self.workdir / "token").write_text(TOKEN + "\n")
        base: dict[str, dict[str, Any]] = {
            "storage": {"dir": str(self.workdir / "state")},
            "control": {"socket": str(self.socket)},
            "buffer": {"pre_seconds": 3},
            "incident": {"post_seconds": 300, "cancel_grace_seconds": 300},
            "video": {"backend": "test", "width": 320, "height": 240, "fps": 30,
                      "bitrate": 400_000},
            "audio": {"backend": "test"}, "gps": {"backend": "simulated"},
            "button": {"backend": "none"},
            # The reference dispatcher's own mode is `call` (two-way audio, telemetry).
            "call": {"endpoints": [self.endpoint], "token_file": str(self.workdir / "token"),
                     "mode": "whip" if self.desk == "whip" else "call", "speaker": "none",
                     "connect_timeout": 5.0},
            "ice": {"interfaces": [self.car_if]},
            "log": {"level": "info"},
        }
        for section, keys in config.items():
            base.setdefault(section, {}).update(keys)
        (self.workdir / "car.toml").write_text(toml(base))
        self.car = self._spawn(self.car_ns, "car.log", [
            sys.executable, "-m", "dashsos", "--config", str(self.workdir / "car.toml"), "run"])
        self._wait(lambda: self.socket.exists() or self.car.poll() is not None, 20,
                   "the car's control socket")
        if self.car.poll() is not None:
            raise RuntimeError((self.workdir / "car.log").read_text())

    def request(self, cmd: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.socket))
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
        return reply

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.request("status")["status"]
        return status

    # --- the path ---

    def impair(self, settings: dict[str, Any]) -> None:
        """Delay and loss in each direction (the relay), a rate cap (tc tbf on each TUN
        device); {} removes all."""
        self.impairment = dict(settings)
        for ns, dev in ((self.car_ns, self.car_if), (self.desk_ns, self.desk_if)):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev,
                            "root"], capture_output=True, timeout=10)
            if settings.get("rate"):
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                     "tbf", "rate", settings["rate"], "burst", "32kbit", "latency", "400ms")
        self._relay()

    def _relay(self, **now: Any) -> None:
        """Tell the relay the impairment (the rate is tc's, not the relay's) and `now`."""
        self._write_control({**{k: v for k, v in self.impairment.items() if k != "rate"},
                             **now})

    def block_udp(self, blocked: bool) -> None:
        """TCP still carries (signalling works) but no UDP does (ICE cannot)."""
        self.impairment["block_udp"] = blocked
        self._relay()

    def outage(self, down: bool) -> float:
        """The path drops every packet (a coverage gap) or carries again; returns when."""
        before = time.monotonic()
        self._relay(down=down)
        time.sleep(0.1)  # the relay reads its settings every 50 ms
        # A gap starts once surely in force; a return counts from its earliest moment.
        return time.monotonic() if down else before

    def link(self, up: bool, address: str = CAR_IP) -> float:
        """The car's interface goes down (losing its address) or comes back with one,
        as wwan0 does."""
        if up:
            _run("ip", "-n", self.car_ns, "link", "set", self.car_if, "up")
            _run("ip", "-n", self.car_ns, "addr", "replace", f"{address}/24", "dev",
                 self.car_if)
        else:
            _run("ip", "-n", self.car_ns, "addr", "flush", "dev", self.car_if)
            _run("ip", "-n", self.car_ns, "link", "set", self.car_if, "down")
        return time.monotonic()

    # --- what the desk received ---

    def sessions(self) -> list[dict[str, Any]]:
        if self.watch is not None:
            return self.watch.sessions()
        try:
            data: list[dict[str, Any]] = json.loads(self.stats_path.read_text())["sessions"]
        except (OSError, ValueError, KeyError):
            return []
        return data

    def frames_after(self, at: float) -> float | None:
        """When the first video frame decoded at the desk after `at` arrived."""
        times = [t for s in self.sessions() for t in s["video_times"] if t > at]
        return min(times) if times else None

    def on_air_after(self, at: float, timeout: float) -> float:
        """Seconds from `at` to video flowing again (5 frames decoded after it)."""
        def flowing() -> float | None:
            times = sorted(t for s in self.sessions() for t in s["video_times"] if t > at)
            return times[0] - at if len(times) >= 5 else None

        result: float = self._wait(flowing, timeout, "video at the desk", step=0.1)
        return result

    def live(self) -> list[dict[str, Any]]:
        return [s for s in self.sessions() if not s["deleted"]]

    def leaked(self) -> int:
        """Sessions the car left behind for the server to deal with: POSTs the one-session
        WHIP server refused because an earlier session still held the endpoint, or calls
        the dispatcher ended only because the car called again."""
        if self.watch is not None:
            from dashsos.dispatch.record import REPLACED

            return sum(1 for s in self.sessions() if s.get("end_reason") == REPLACED)
        try:
            refusals: int = json.loads(self.stats_path.read_text())["refusals"]
        except (OSError, ValueError, KeyError):
            return 0
        return refusals

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait(5)
        for handle in self._logs:
            handle.close()
        for ns in (self.car_ns, self.desk_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def freezes(times: list[float], expected_fps: float = 30.0) -> dict[str, float]:
    """Video continuity at the desk: frames decoded, total and longest freeze (a gap
    between decoded frames longer than 3 frame intervals and 100 ms counts from the first
    frame interval on)."""
    times = sorted(times)
    limit = max(3 / expected_fps, 0.1)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    frozen = [g - 1 / expected_fps for g in gaps if g > limit]
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {"frames": len(times), "seconds": round(span, 1),
            "fps": round((len(times) - 1) / span, 1) if span else 0.0,
            "freeze_s": round(sum(frozen), 2), "freezes": len(frozen),
            "longest_freeze_s": round(max(frozen, default=0.0), 2)}


def playout(sessions: list[dict[str, Any]], after: float, delay: float = 0.5) -> dict[str, float]:
    """What a player with a fixed `delay` jitter buffer shows: each frame is due at its
    media time (pts) + delay after the first; one that arrives late freezes the picture
    until it comes, and playback continues from there (the buffer refills by rebasing)."""
    frozen, count, longest = 0.0, 0, 0.0
    for session in sessions:
        frames = [(t, p) for t, p in zip(session["video_times"], session["video_pts"],
                                         strict=False) if t > after]
        if not frames:
            continue
        base = frames[0][0] + delay - frames[0][1]
        for arrived, pts in frames[1:]:
            due = base + pts
            if arrived > due:
                late = arrived - due
                frozen += late
                count += 1
                longest = max(longest, late)
                base += late
    return {"delay_s": delay, "freeze_s": round(frozen, 2), "freezes": count,
            "longest_freeze_s": round(longest, 2)}
