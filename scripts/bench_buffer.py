"""Buffering: `dashsos run` buffering 720p30 test video against Debian's ffmpeg CLI.

Both run one after the other for the same wall time, each paced to real time, and are
measured the same way: CPU (user+sys) and peak RSS from os.wait4's rusage of the child.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARMUP = 3.0  # seconds of startup before the steady-state CPU sample starts
TARGET_CPU_RATIO = 1.15
TARGET_RSS_MB = 150.0

CONFIG = """\
[storage]
dir = "{tmp}/state"
[control]
socket = "{tmp}/control.sock"
[buffer]
pre_seconds = 30
[video]
backend = "test"
width = 1280
height = 720
fps = 30
bitrate = 2000000
keyframe_interval = 1.0
preset = "veryfast"
[audio]
backend = "test"
[gps]
backend = "simulated"
[log]
level = "warning"
"""


def proc_cpu(pid: int) -> float | None:
    """CPU seconds so far (all threads), or None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run:
    """One child process, started now; reaped with wait4 so its rusage is exact."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log  # a file, not a pipe: a chatty child must never block on a full pipe
        self.started = time.monotonic()
        with log.open("wb") as err:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        self.steady: tuple[float, float] | None = None  # (monotonic, cpu s) after warm-up

    def sample_after(self, seconds: float) -> None:
        time.sleep(max(0.0, self.started + seconds - time.monotonic()))
        cpu = proc_cpu(self.proc.pid)
        if cpu is not None:
            self.steady = (time.monotonic(), cpu)

    def finish(self, what: str, stop: bool) -> dict[str, Any]:
        # The steady-state window ends here, before shutdown work (or ffmpeg's last flush).
        end_cpu, end_t = proc_cpu(self.proc.pid), time.monotonic()
        if stop:  # not Popen.send_signal: it polls, and so reaps the child before wait4
            os.kill(self.proc.pid, signal.SIGTERM)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not reap
        wall = time.monotonic() - self.started
        if self.proc.returncode != 0:
            stderr = self.log.read_text(errors="replace").strip()
            sys.exit(f"bench: {what} exited with {self.proc.returncode}:\n{stderr}")
        cpu = usage.ru_utime + usage.ru_stime
        steady = None
        if self.steady and end_cpu is not None and end_t > self.steady[0]:
            steady = 100 * (end_cpu - self.steady[1]) / (end_t - self.steady[0])
        return {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                "cpu_pct_core": round(100 * cpu / wall, 1),
                "steady_pct_core": None if steady is None else round(steady, 1),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss is KiB on Linux


def query_status(sock_path: Path) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        sock.sendall(b'{"cmd": "status"}\n')
        reply = json.loads(sock.makefile("rb").readline())
    if not reply.get("ok"):
        raise RuntimeError(f"status failed: {reply.get('error')}")
    status: dict[str, Any] = reply["status"]
    return status


def bench_dashsos(tmp: Path, seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = tmp / "dashsos.toml"
    cfg.write_text(CONFIG.format(tmp=tmp))
    env = dict(os.environ)
    if importlib.util.find_spec("dashsos") is None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "daemon"),
                                                          env.get("PYTHONPATH")]))
    run = Run([sys.executable, "-m", "dashsos", "--config", str(cfg), "run"],
              tmp / "dashsos.log", env)
    sock = tmp / "control.sock"
    run.sample_after(WARMUP)
    if not sock.exists():  # not poll(): it would reap the child before wait4 can
        run.finish("dashsos run", stop=True)  # exits with its stderr if it crashed
        sys.exit(f"bench: dashsos run did not open {sock} within {WARMUP:g} s")
    # Near the end, so the buffer holds (almost) the whole run.
    time.sleep(max(0.0, run.started + seconds - 0.5 - time.monotonic()))
    try:
        status = query_status(sock)
    except (OSError, ValueError, RuntimeError) as exc:
        run.finish("dashsos run", stop=True)  # exits with its stderr if it crashed
        sys.exit(f"bench: cannot read status from {sock}: {exc}")
    time.sleep(max(0.0, run.started + seconds - time.monotonic()))
    return run.finish("dashsos run", stop=True), status["buffer"]


def bench_ffmpeg(ffmpeg: str, tmp: Path, seconds: float) -> dict[str, Any]:
    # Same encoder settings as dashsos's H264Encoder; -re paces the generator to real time.
    argv = [ffmpeg, "-hide_banner", "-loglevel", "error", "-re",
            "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30", "-t", str(seconds),
            "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency",
            "-profile:v", "baseline", "-b:v", "2M", "-maxrate", "2M", "-bufsize", "2M",
            "-g", "30", "-keyint_min", "30", "-sc_threshold", "0", "-pix_fmt", "yuv420p",
            "-f", "segment", "-segment_time", "1", "-segment_format", "mp4",
            "-reset_timestamps", "1", str(tmp / "seg%05d.mp4")]
    run = Run(argv, tmp / "ffmpeg.log")
    run.sample_after(WARMUP)
    # End the steady window just before -t runs out; ffmpeg then exits by itself.
    time.sleep(max(0.0, run.started + seconds - 0.5 - time.monotonic()))
    return run.finish("ffmpeg", stop=False)


COLUMNS = (("CPU s", "cpu_s", 8), ("CPU %core", "cpu_pct_core", 11),
           ("steady %", "steady_pct_core", 10), ("peak RSS MB", "peak_rss_mb", 13))


def show(result: dict[str, Any]) -> None:
    def line(name: str, row: dict[str, Any], fmt: str, unit: str = "") -> None:
        cells = ("-" if row[k] is None else format(row[k], fmt) + unit for _, k, _ in COLUMNS)
        print(f"{name:<50}" + "".join(f"{c:>{w}}" for c, (_, _, w) in zip(cells, COLUMNS,
                                                                          strict=True)))

    print(f"dashsos bench: 720p30 H.264 2 Mb/s, {result['seconds']:g} s, "
          f"{result['cores']} cores")
    print(f"{'what':<50}" + "".join(f"{title:>{w}}" for title, _, w in COLUMNS))
    line("dashsos run (video+audio+GPS buffered)", result["dashsos"], ".1f")
    line("ffmpeg CLI (video only, libx264, segmented MP4)", result["ffmpeg"], ".1f")
    line("ratio dashsos / ffmpeg", result["ratio"], ".2f", "x")
    buf = result["buffered"]
    print(f"buffered: {buf['seconds']:.1f} s, {buf['bytes'] / 1e6:.1f} MB")
    print(f"targets: CPU ratio <= {TARGET_CPU_RATIO}, RSS <= {TARGET_RSS_MB:g} MB "
          "(informational)")
    print(f"notes: totals include startup (Python imports for dashsos); 'steady %' is CPU\n"
          f"  from {WARMUP:g} s to 0.5 s before the end. ffmpeg encodes video only (no audio,\n"
          "  no GPS) into 1 s MP4 segment files; dashsos keeps the last 30 s in memory.")


def run(seconds: float) -> dict[str, Any]:
    ffmpeg_cli = shutil.which("ffmpeg")
    if ffmpeg_cli is None:  # checked first, not after a whole daemon run
        sys.exit("bench: ffmpeg not found on PATH (apt install ffmpeg)")
    with tempfile.TemporaryDirectory(prefix="dashsos-bench-") as name:
        tmp = Path(name)
        # Sequential, so the two never compete for the cores.
        daemon, buffer = bench_dashsos(tmp, seconds)
        ffmpeg = bench_ffmpeg(ffmpeg_cli, tmp, seconds)
    keys = ("cpu_s", "cpu_pct_core", "steady_pct_core", "peak_rss_mb")
    return {
        "seconds": seconds, "cores": len(os.sched_getaffinity(0)),
        "dashsos": daemon, "ffmpeg": ffmpeg,
        "ratio": {k: round(daemon[k] / ffmpeg[k], 2) if daemon[k] and ffmpeg[k] else None
                  for k in keys},
        "buffered": {"seconds": round(buffer["seconds"], 2), "bytes": buffer["bytes"]},
        "targets": {"cpu_ratio_max": TARGET_CPU_RATIO, "rss_mb_max": TARGET_RSS_MB},
    }
