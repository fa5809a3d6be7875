"""The Pi's path: what the car itself costs when the camera encodes.

On a Pi the camera's hardware encoder hands the daemon finished H.264; the daemon's own
per-packet work (bus, ring buffer, clip writer, call track, MQTT, GPS) is the whole
cost. This bench feeds `dashsos run` a pre-encoded H.264 Constrained Baseline file
(made once with Debian's ffmpeg CLI, 1 s GOP) through the ffmpeg backend, which copies
it (no decode, no encode) at the pace of its timestamps, like a camera. Audio is the
test tone, GPS simulated, MQTT goes to a local mosquitto.

Per run and resolution, two cars (each `dashsos run` in its own process):
  car A, calls off: buffering, then an incident (clip written), then the clip-ready time;
  car B, calling the reference dispatcher (`dashsos dispatch`, call mode, audio both
  ways): the incident with the call up. A re-dial during the window fails the run.
CPU comes from /proc/<pid>/stat (user+sys, all threads) over each window; RSS is the
process's VmHWM (peak resident set) at the end of the window.

  python scripts/bench_pi.py [--runs N] [--seconds S] [--sizes 720,1080] [--profile]
  (or: scripts/bench pi ...)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench_buffer import REPO, Run, proc_cpu, query_status

sys.path.insert(0, str(REPO / "tests"))  # the test harness's servers: one copy of each

from conftest import toml  # noqa: E402
from dashsos.media.audio import CHUNK_SECONDS  # noqa: E402
from dispatcher import CAR_TOKEN, Dispatcher  # noqa: E402
from mqttbroker import Broker  # noqa: E402

FPS = 30
SIZES = {720: (1280, 720, 2_000_000), 1080: (1920, 1080, 4_000_000)}
FILE_SECONDS = 240  # longer than any car's life in a run: the source never reaches its end
PRE_SECONDS = 10
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dashsos-bench"
TARGETS = {"buffering_pct": 3.0, "call_ratio": 2.0, "rss_mb": 100.0, "clip_ready_s": 0.3}
PACKETS_PER_S = FPS + 1 / CHUNK_SECONDS  # video frames + audio chunks the daemon handles


def clip_file(height: int) -> Path:
    """The camera's output, made once: H.264 Constrained Baseline, 30 fps, 1 s GOP, MP4."""
    width, _, bitrate = SIZES[height]
    path = CACHE / f"copy-{height}p{FPS}-{bitrate // 1000}k-{FILE_SECONDS}s.mp4"
    if path.exists():
        return path
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        sys.exit("bench: ffmpeg not found on PATH (apt install ffmpeg)")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.mp4")
    print(f"making {path.name} with {ffmpeg} (once)", file=sys.stderr)
    subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={FPS}",
                    "-t", str(FILE_SECONDS), "-c:v", "libx264", "-preset", "veryfast",
                    "-tune", "zerolatency", "-profile:v", "baseline", "-pix_fmt", "yuv420p",
                    "-b:v", str(bitrate), "-maxrate", str(bitrate), "-bufsize", str(bitrate),
                    "-g", str(FPS), "-keyint_min", str(FPS), "-sc_threshold", "0",
                    "-movflags", "+faststart", str(partial)], check=True)
    partial.rename(path)
    return path


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process has had so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmHWM for {pid}")


class Car:
    """`dashsos run` on the copy-mode camera, driven over its control socket."""

    def __init__(self, tmp: Path, height: int, mqtt_port: int, **sections: dict[str, Any]) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        width, _, bitrate = SIZES[height]
        config: dict[str, dict[str, Any]] = {
            "storage": {"dir": str(tmp / "state")},
            "control": {"socket": str(tmp / "control.sock")},
            "buffer": {"pre_seconds": PRE_SECONDS},
            "incident": {"post_seconds": 3600, "cancel_grace_seconds": 0,
                         "cooldown_seconds": 0},
            "video": {"backend": "ffmpeg", "input": str(clip_file(height)), "width": width,
                      "height": height, "fps": FPS, "bitrate": bitrate},
            "audio": {"backend": "test"}, "gps": {"backend": "simulated"},
            "button": {"backend": "none"},
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": mqtt_port},
            "call": {"enabled": False},
            "log": {"level": "warning"},
        }
        for section, keys in sections.items():
            config.setdefault(section, {}).update(keys)
        (tmp / "car.toml").write_text(toml(config))
        self.socket = tmp / "control.sock"
        self.run = Run([sys.executable, "-m", "dashsos", "--config", str(tmp / "car.toml"),
                        "run"], tmp / "car.log", dict(os.environ))
        self.pid = self.run.proc.pid
        self.wait(self.socket.exists, 30, "the control socket")
        self.wait(lambda: self.status()["buffer"]["seconds"] >= PRE_SECONDS - 0.5,
                  PRE_SECONDS + 30, "a full buffer")
        video = self.status()["sources"]["video"]
        if not video["detail"].startswith("copying H.264"):
            self.stop()
            sys.exit(f"bench: the camera is not in copy mode: {video}")

    def wait(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        self.stop()
        sys.exit(f"bench: timed out waiting for {what}; log: {self.tmp / 'car.log'}")

    def request(self, cmd: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.socket))
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
        return reply

    def status(self) -> dict[str, Any]:
        return query_status(self.socket)

    def window(self, seconds: float) -> dict[str, float]:
        """CPU share of a core and per-packet cost over the next `seconds`; peak RSS."""
        start_cpu, start = proc_cpu(self.pid), time.monotonic()
        time.sleep(seconds)
        end_cpu, end = proc_cpu(self.pid), time.monotonic()
        if start_cpu is None or end_cpu is None:
            self.stop()
            sys.exit(f"bench: the car died; log: {self.tmp / 'car.log'}")
        cpu, wall = end_cpu - start_cpu, end - start
        return {"cpu_pct": round(100 * cpu / wall, 2),
                "us_per_packet": round(1e6 * cpu / (wall * PACKETS_PER_S), 1),
                "rss_mb": peak_rss_mb(self.pid)}

    def stop(self) -> dict[str, Any]:
        if self.run.proc.returncode is not None:
            return {}
        return self.run.finish("dashsos run", stop=True)


def _iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def clip_ready(car: Car, incident: str) -> float:
    """Post window end (incident.json's window.to) to incident.json saying `saved`."""
    record_path = car.tmp / "state" / "incidents" / incident / "incident.json"

    def saved() -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("status") in ("saved", "failed") else None

    record = car.wait(saved, 60, "the incident to be saved")
    if record["status"] != "saved":
        sys.exit(f"bench: incident {incident} failed: {record.get('clip_error')}")
    return round(record_path.stat().st_mtime - _iso_seconds(record["window"]["to"]), 3)


def quiet_car(tmp: Path, height: int, mqtt_port: int, seconds: float) -> dict[str, Any]:
    """Buffering, then an incident without a call, then the clip-ready time."""
    post = seconds + 2.0
    car = Car(tmp, height, mqtt_port, incident={"post_seconds": post})
    try:
        buffering = car.window(seconds)
        reply = car.request("trigger")
        if not reply.get("ok"):
            car.stop()
            sys.exit(f"bench: trigger refused: {reply}")
        time.sleep(1.0)  # the clip writer has taken the pre-trigger buffer
        incident = car.window(seconds)
        ready = clip_ready(car, reply["incident"])
    finally:
        car.stop()
    return {"buffering": buffering, "incident": incident, "clip_ready_s": ready}


def calling_car(tmp: Path, height: int, mqtt_port: int, desk: Dispatcher, seconds: float,
                profile: Path | None) -> dict[str, Any]:
    """An incident with the call to the dispatcher up; a re-dial fails the run."""
    (tmp / "token").parent.mkdir(parents=True, exist_ok=True)
    (tmp / "token").write_text(CAR_TOKEN + "\n")
    car = Car(tmp, height, mqtt_port,
              call={"enabled": True, "endpoints": [desk.whip], "token_file": str(tmp / "token"),
                    "mode": "call", "speaker": "none"},
              ice={"interfaces": ["127.0.0.1"]})
    try:
        car.request("trigger")
        car.wait(lambda: car.status()["links"]["call"]["call_state"] == "connected", 30,
                 "the call to connect")
        time.sleep(2.0)  # past the call's start (keyframe, first RTCP)
        attempts = car.status()["links"]["call"]["attempts"]
        call = car.window(seconds)
        after = car.status()["links"]["call"]
        if after["attempts"] != attempts or after["call_state"] != "connected":
            car.stop()
            sys.exit(f"bench: the call re-dialed or dropped during the window "
                     f"(attempts {attempts} -> {after['attempts']}, {after['call_state']}); "
                     f"log: {tmp / 'car.log'}")
        call["attempts"] = attempts
        if profile is not None:  # after the measured window: py-spy slows what it samples
            record_profile(car.pid, seconds, profile)
    finally:
        car.stop()
    return call


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        sys.exit("bench: py-spy not found (pip install py-spy into the bench venv)")
    return found


def record_profile(pid: int, seconds: float, out: Path) -> None:
    subprocess.run([py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--rate", "500", "--gil", "--format", "raw",
                    "--output", str(out)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


# Frames on (nearly) every stack say nothing about where the time goes.
FRAMEWORK = ("(dashsos/__main__.py", "(threading.py", "(<frozen runpy>", "(asyncio/runners.py",
             "(asyncio/base_events.py", "(asyncio/events.py", "(dashsos/cli.py",
             "(dashsos/media/source.py")


def top_costs(raw: Path, count: int = 10) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks, sampled only while a thread held the GIL (--gil:
    Python work, not sleeps) -> the functions with the most samples.

    `self`: samples where the function itself was running; `total`: samples where it was
    anywhere on the stack (once per sample), the framework's frames left out."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        # [0] names the thread; "function (file:line)" -> "function (file)": one row each
        frames = [f.rsplit(":", 1)[0] + ")" for f in stack.split(";")[1:] if f]
        if not frames or not n.isdigit():
            continue
        samples += int(n)
        own[frames[-1]] = own.get(frames[-1], 0) + int(n)
        for frame in set(frames):
            if not any(part in frame for part in FRAMEWORK):
                total[frame] = total.get(frame, 0) + int(n)

    def ranked(table: dict[str, int]) -> list[dict[str, Any]]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:count]
        return [{"function": f, "samples": n, "pct": round(100 * n / max(1, samples), 1)}
                for f, n in best]

    return {"samples": samples, "self": ranked(own), "total": ranked(total)}


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": round(statistics.median(values), 2),
            "max": max(values)}


def run(runs: int = 1, seconds: float = 10.0, sizes: tuple[int, ...] = (720, 1080),
        profile: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {"runs": runs, "seconds": seconds, "pre_seconds": PRE_SECONDS,
                               "cores": len(os.sched_getaffinity(0)),
                               "load_before": os.getloadavg()[0], "sizes": {},
                               "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="dashsos-bench-pi-") as name:
        tmp = Path(name)
        for height in sizes:
            clip_file(height)
        (tmp / "broker").mkdir()
        broker = Broker(tmp / "broker")
        desk = Dispatcher(tmp / "desk")
        try:
            for height in sizes:
                samples: list[dict[str, Any]] = []
                for i in range(runs):
                    quiet = quiet_car(tmp / f"{height}-{i}-a", height, broker.port, seconds)
                    out = tmp / f"{height}.raw" if profile and i == runs - 1 else None
                    call = calling_car(tmp / f"{height}-{i}-b", height, broker.port, desk,
                                       seconds, out)
                    samples.append({**quiet, "call": call})
                    if out is not None:
                        results.setdefault("profile", {})[f"{height}p"] = top_costs(out)
                results["sizes"][f"{height}p"] = summarize(samples)
        finally:
            desk.stop()
            broker.stop()
    results["load_after"] = os.getloadavg()[0]
    return results


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": samples}
    for phase in ("buffering", "incident", "call"):
        out[phase] = {k: _spread([s[phase][k] for s in samples])
                      for k in ("cpu_pct", "us_per_packet", "rss_mb")}
    out["incident_ratio"] = _spread([round(s["incident"]["cpu_pct"] / s["buffering"]["cpu_pct"],
                                           2) for s in samples])
    out["call_ratio"] = _spread([round(s["call"]["cpu_pct"] / s["buffering"]["cpu_pct"], 2)
                                 for s in samples])
    out["clip_ready_s"] = _spread([s["clip_ready_s"] for s in samples])
    return out


MEASURES = (
    ("buffering", "CPU % of one core of `dashsos run`, user+sys, all threads (/proc/<pid>/"
     "stat), over the window, with the pre-trigger buffer full and no incident"),
    ("incident", "the same during an incident without a call: the clip being written, "
     "MQTT at 1 Hz location"),
    ("call", "the same during an incident with the call to `dashsos dispatch` connected "
     "(video pass-through, Opus both ways, telemetry); fails on a re-dial"),
    ("us/packet", "daemon CPU time in the window / packets handled "
     f"({FPS} video frames + {1 / CHUNK_SECONDS:g} audio chunks a second)"),
    ("peak RSS", "VmHWM of the daemon at the end of the window (MB)"),
    ("clip ready", "post window end (incident.json window.to) -> incident.json written "
     "with status saved (its mtime), in seconds"),
)


def show(result: dict[str, Any]) -> None:
    n = result["runs"]
    print(f"bench pi: copy-mode H.264 from a file (as the Pi's hardware encoder gives it), "
          f"tone audio, simulated GPS, MQTT; {result['seconds']:g} s windows, "
          f"{result['pre_seconds']:g} s buffer, {n} run(s), {result['cores']} cores, "
          f"load {result['load_before']:.1f} before / {result['load_after']:.1f} after")
    cells = "min/med/max" if n > 1 else "value"
    print(f"{'size':<7}{'phase':<11}{'CPU %core ' + cells:>24}{'us/packet':>22}"
          f"{'peak RSS MB':>22}{'x buffering':>20}")

    def fmt(s: dict[str, float], spec: str) -> str:
        if n == 1:
            return format(s["median"], spec)
        return "/".join(format(s[k], spec) for k in ("min", "median", "max"))

    for size, r in result["sizes"].items():
        for phase in ("buffering", "incident", "call"):
            ratio = {"incident": r["incident_ratio"], "call": r["call_ratio"]}.get(phase)
            print(f"{size:<7}{phase:<11}{fmt(r[phase]['cpu_pct'], '.2f'):>24}"
                  f"{fmt(r[phase]['us_per_packet'], '.0f'):>22}"
                  f"{fmt(r[phase]['rss_mb'], '.1f'):>22}"
                  f"{fmt(ratio, '.2f') + 'x' if ratio else '':>20}")
        print(f"{size:<7}{'clip ready':<11}{fmt(r['clip_ready_s'], '.3f') + ' s':>24}")
    t = result["targets"]
    print(f"targets: buffering <= {t['buffering_pct']:g}% of a core, call <= "
          f"{t['call_ratio']:g}x buffering, RSS < {t['rss_mb']:g} MB, clip ready < "
          f"{t['clip_ready_s']:g} s (informational)")
    print("what each figure measures:")
    for name, what in MEASURES:
        print(f"  {name}: {what}")
    for size, prof in result.get("profile", {}).items():
        print(f"\npy-spy profile of the call window, {size}: {prof['samples']} samples "
              "holding the GIL; top functions by their own samples:")
        for row in prof["self"]:
            print(f"  {row['pct']:5.1f}%  {row['function']}")
        print("  top by inclusive samples (the function and what it calls):")
        for row in prof["total"]:
            print(f"  {row['pct']:5.1f}%  {row['function']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs per size (default 1)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of each measured window (default 10, at most 60)")
    parser.add_argument("--sizes", default="720,1080", help="heights: 720, 1080 or both")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the call window of the last run (needs py-spy)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if not set(sizes) <= set(SIZES) or not 3 <= args.seconds <= 60 or args.runs < 1:
        parser.error("--sizes from 720,1080; --seconds 3..60; --runs >= 1")
    if args.profile:
        py_spy()
    result = run(args.runs, args.seconds, sizes, args.profile)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
