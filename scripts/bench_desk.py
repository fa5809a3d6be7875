"""The desk at scale: N cars calling one desk at once, each sending 720p30 H.264 (a 2 Mb/s
camera stream in copy mode) and Opus, for a measured window; then every car hangs up.

Per desk mode: the desk process's CPU (share of one core, in all and per call) and peak
RSS while the calls run, the frames per second the desk received of each call (its
console API counts them), and the frames per second in each call's recording (counted
by ffprobe in media.mp4 after the hang-up). The cars are aiortc peers in this process
sending pre-encoded frames, so they cost little; their CPU is printed too. Everything
stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test harness's stand-ins: one copy of each

import aiohttp  # noqa: E402
import av  # noqa: E402
import numpy as np  # noqa: E402

from dispatcher import Dispatcher, car_token  # noqa: E402
from fakecar import EncodedLoop, FakeCar  # noqa: E402

TARGETS = {"embedded_calls": 4, "fps": 29.0}
WIDTH, HEIGHT, FPS = 1280, 720, 30


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def camera_stream(folder: Path) -> list[bytes]:
    """4 s of 720p30 H.264 as a Pi camera gives it (baseline, a keyframe a second,
    2 Mb/s), made by ffmpeg's CLI; one access unit per frame, from a keyframe on."""
    path = folder / "camera.h264"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS}", "-t", "4",
                    "-c:v", "libx264", "-profile:v", "baseline", "-preset", "veryfast",
                    "-g", str(FPS), "-b:v", "2M", "-maxrate", "2M", "-bufsize", "1M",
                    "-pix_fmt", "yuv420p", str(path)], check=True, timeout=120)
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(video=0) if p.size]


def cabin_audio() -> list[bytes]:
    """1 s of a 440 Hz tone as Opus packets of 20 ms."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "s16"
    packets: list[bytes] = []
    for i in range(50):
        t = (np.arange(960) + i * 960) / 48000
        mono = (np.sin(2 * np.pi * 440 * t) * 6000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate, frame.pts = 48000, i * 960
        packets += [bytes(p) for p in encoder.encode(frame)]
    return packets


def _recorded_fps(media: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-count_packets",
                          "-show_entries", "stream=nb_read_packets:format=duration", "-of",
                          "json", str(media)], capture_output=True, text=True, timeout=60)
    data = json.loads(out.stdout or "{}")
    streams, duration = data.get("streams", []), float(data.get("format", {})
                                                         .get("duration", 0) or 0)
    return int(streams[0]["nb_read_packets"]) / duration if streams and duration else 0.0


async def _calls(desk: Dispatcher, cars: int, seconds: float, video: list[bytes],
                 audio: list[bytes]) -> dict[str, Any]:
    pid = desk.process.pid if desk.process else 0
    fleet = [FakeCar(mode="whip", media=(EncodedLoop("video", video, 1 / FPS, 90000),
                                         EncodedLoop("audio", audio, 0.02, 48000)))
             for _ in range(cars)]
    async with aiohttp.ClientSession() as session:
        for n, car in enumerate(fleet, 1):
            response = await car.post_offer(session, desk.whip, car_token(n))
            if response.status != 201:
                raise RuntimeError(f"car {n}: {response.status} {await response.text()}")
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in fleet)), 30)
        await asyncio.sleep(3)  # past the first keyframes and the desk's start-up
        calls = await asyncio.to_thread(desk.calls)
        before = {c["id"]: c["received"].get("video", {}).get("frames", 0) for c in calls}
        cpu0, own0, t0 = _cpu_seconds(pid), time.process_time(), time.monotonic()
        rss = 0.0
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(0.5)
            rss = max(rss, _rss_mb(pid))
        elapsed = time.monotonic() - t0
        desk_cpu, own_cpu = _cpu_seconds(pid) - cpu0, time.process_time() - own0
        calls = await asyncio.to_thread(desk.calls)
        received = [(c["received"].get("video", {}).get("frames", 0) - before.get(c["id"], 0))
                    / elapsed for c in calls if c["state"] == "connected"]
        for n, car in enumerate(fleet, 1):
            async with session.delete(desk.url + car.location,
                                      headers={"Authorization": f"Bearer {car_token(n)}"}):
                pass
    for car in fleet:
        await car.close()
    ids = [c["id"] for c in calls if c["state"] == "connected"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
            c["state"] != "ended" for c in desk.calls() if c["id"] in ids):
        await asyncio.sleep(0.2)
    recorded = [_recorded_fps(desk.recordings / i / "media.mp4") for i in ids]
    return {"cars": cars, "connected": len(received),
            "desk_cpu": desk_cpu / elapsed, "desk_cpu_per_call": desk_cpu / elapsed / cars,
            "desk_rss_mb": rss, "cars_cpu": own_cpu / elapsed,
            "fps_received_min": min(received, default=0.0),
            "fps_recorded_min": min(recorded, default=0.0),
            "recordings": sum(1 for f in recorded if f > 0)}


def run(cars: int = 4, seconds: float = 20.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dashsos-bench-desk-") as tmp:
        folder = Path(tmp)
        video, audio = camera_stream(folder), cabin_audio()
        desk = Dispatcher(folder / "embedded", cars=cars)
        try:
            embedded = asyncio.run(_calls(desk, cars, seconds, video, audio))
        finally:
            desk.stop()
    return {"seconds": seconds, "embedded": embedded, "targets": TARGETS}


def show(result: dict[str, Any]) -> None:
    print(f"desk: {result['embedded']['cars']} cars at once, each 720p30 H.264 (2 Mb/s) and "
          f"Opus, {result['seconds']:g} s measured")
    print(f"{'desk mode':<26} {'calls':>5} {'desk CPU':>9} {'per call':>9} {'RSS MB':>7} "
          f"{'fps recv':>9} {'fps rec':>8} {'cars CPU':>9}")
    for key, label in (("embedded", "embedded (aiortc, copy)"),):
        r = result.get(key)
        if r is None:
            continue
        print(f"{label:<26} {r['connected']:>2}/{r['cars']:<2} {r['desk_cpu']:>8.0%} "
              f"{r['desk_cpu_per_call']:>8.1%} {r['desk_rss_mb']:>7.0f} "
              f"{r['fps_received_min']:>9.1f} {r['fps_recorded_min']:>8.1f} "
              f"{r['cars_cpu']:>8.0%}")
    print(f"targets: embedded >= {TARGETS['embedded_calls']} calls at >= {TARGETS['fps']:g} fps "
          "received and recorded (fps columns: the worst call); CPU is a share of one core")
