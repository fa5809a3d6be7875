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
from aiortc import RTCSessionDescription  # noqa: E402

from dashsos.dispatch.encoded import tap  # noqa: E402
from dispatcher import CONSOLE_TOKEN, Dispatcher, car_token  # noqa: E402
from fakecar import EncodedLoop, FakeCar, new_peer  # noqa: E402
from janus import JanusPath  # noqa: E402
from janus import available as janus_available  # noqa: E402
from netns import CONSOLE_TOKEN as NETNS_CONSOLE_TOKEN  # noqa: E402
from netns import DESK_IP, DESK_PORT  # noqa: E402
from netns import car_token as netns_car_token  # noqa: E402

TARGETS = {"embedded_calls": 4, "janus_calls": 20, "fps": 29.0, "janus_desk_cpu": 0.20}
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


class Console:
    """An operator's console watching one call, as the page does (through the desk, or
    through Janus), counting the whole video frames it receives without decoding them:
    the bench measures delivery, not a Python decoder."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.pc = new_peer(addresses)
        self.frames = 0
        self.pc.on("track", self._track)

    def _track(self, track: Any) -> None:
        if track.kind == "video":
            tap(self.pc, track).subscribe(self._count)

    def _count(self, frame: Any) -> None:
        self.frames += 1

    async def watch(self, session: aiohttp.ClientSession, desk: Desk, call: dict[str, Any]) \
            -> None:
        auth = {"Authorization": f"Bearer {desk.console_token}"}
        base = f"{desk.url}/api/calls/{call['id']}"
        if call.get("media") == "janus":  # Janus offers, the console answers
            async with session.post(f"{base}/subscribe", headers=auth) as response:
                offer, location = await response.text(), response.headers["Location"]
            await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            async with session.patch(desk.url + location, data=self.pc.localDescription.sdp,
                                     headers={**auth, "Content-Type": "application/sdp"}):
                pass
            return
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with session.post(f"{base}/watch", data=self.pc.localDescription.sdp,
                                headers={**auth, "Content-Type": "application/sdp"}) as response:
            answer = await response.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))


class Desk:
    """Where the cars call and how the bench sees the desk: its URL, tokens, processes."""

    def __init__(self, url: str, console_token: str, token: Any, recordings: Path,
                 pids: dict[str, int], addresses: tuple[str, ...]) -> None:
        self.url, self.console_token, self.token = url, console_token, token
        self.recordings, self.pids, self.addresses = recordings, pids, addresses

    async def calls(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with session.get(f"{self.url}/api/calls", headers={
                "Authorization": f"Bearer {self.console_token}"}) as response:
            calls: list[dict[str, Any]] = (await response.json())["calls"]
        return calls


async def _calls(desk: Desk, cars: int, consoles: int, seconds: float, video: list[bytes],
                 audio: list[bytes]) -> dict[str, Any]:
    fleet = [FakeCar(mode="whip", addresses=desk.addresses,
                     media=(EncodedLoop("video", video, 1 / FPS, 90000),
                            EncodedLoop("audio", audio, 0.02, 48000)))
             for _ in range(cars)]
    async with aiohttp.ClientSession() as session:
        for n, car in enumerate(fleet, 1):
            response = await car.post_offer(session, f"{desk.url}/whip", desk.token(n))
            if response.status != 201:
                raise RuntimeError(f"car {n}: {response.status} {await response.text()}")
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in fleet)), 30)
        calls = await desk.calls(session)
        watching = [Console(desk.addresses) for _ in range(consoles)]
        for n, console in enumerate(watching):  # one call each, round the calls
            await console.watch(session, desk, calls[n % len(calls)])
        await asyncio.sleep(3)  # past the first keyframes and the desk's start-up
        calls = await desk.calls(session)
        before = {c["id"]: c["received"].get("video", {}).get("frames", 0) for c in calls}
        shown = [c.frames for c in watching]
        cpu0 = {name: _cpu_seconds(pid) for name, pid in desk.pids.items()}
        own0, t0 = time.process_time(), time.monotonic()
        rss = dict.fromkeys(desk.pids, 0.0)
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(0.5)
            rss = {name: max(rss[name], _rss_mb(pid)) for name, pid in desk.pids.items()}
        elapsed = time.monotonic() - t0
        cpu = {name: (_cpu_seconds(pid) - cpu0[name]) / elapsed
               for name, pid in desk.pids.items()}
        own_cpu = (time.process_time() - own0) / elapsed
        delivered = [(c.frames - f) / elapsed for c, f in zip(watching, shown, strict=True)]
        for console in watching:
            await console.pc.close()
        calls = await desk.calls(session)
        live = [c for c in calls if c["state"] == "connected"]
        received = [(c["received"].get("video", {}).get("frames", 0) - before.get(c["id"], 0))
                    / elapsed for c in live if c.get("received")]
        for n, car in enumerate(fleet, 1):
            async with session.delete(desk.url + car.location, headers={
                    "Authorization": f"Bearer {desk.token(n)}"}):
                pass
        for car in fleet:
            await car.close()
        ids = [c["id"] for c in live]
        deadline = time.monotonic() + 60
        # Ended, not saving: media.mp4 is finished.
        while time.monotonic() < deadline and any(
                c["state"] != "ended" for c in await desk.calls(session) if c["id"] in ids):
            await asyncio.sleep(0.2)
        problems = {c["id"]: c.get("recording_error") or c["state"]
                    for c in await desk.calls(session) if c["id"] in ids
                    and (c.get("recording_error") or c["state"] != "ended")}
    recorded = [_recorded_fps(desk.recordings / i / "media.mp4") for i in ids]
    return {"cars": cars, "connected": len(live), "cpu": cpu, "rss_mb": rss,
            "cars_cpu": own_cpu, "fps_received_min": min(received) if received else None,
            "consoles": consoles, "fps_delivered_min": min(delivered) if delivered else None,
            "fps_recorded_min": min(recorded, default=0.0),
            "recordings": sum(1 for f in recorded if f > 0), "problems": problems}


def _embedded(folder: Path, cars: int, consoles: int, seconds: float, video: list[bytes],
              audio: list[bytes]) -> dict[str, Any]:
    dispatcher = Dispatcher(folder / "embedded", cars=cars)
    try:
        assert dispatcher.process is not None
        desk = Desk(dispatcher.url, CONSOLE_TOKEN, car_token, dispatcher.recordings,
                    {"desk": dispatcher.process.pid}, ("127.0.0.1",))
        return asyncio.run(_calls(desk, cars, consoles, seconds, video, audio))
    finally:
        dispatcher.stop()


def _janus(folder: Path, cars: int, consoles: int, seconds: float, video: list[bytes],
           audio: list[bytes]) -> dict[str, Any]:
    """The same cars in a network namespace of their own (Janus never uses loopback),
    calling the dispatcher with `dispatch.media = "janus"` in the desk's namespace."""
    path = JanusPath(folder / "janus", desk=True, cars=cars)
    try:
        desk = Desk(f"http://{DESK_IP}:{DESK_PORT}", NETNS_CONSOLE_TOKEN, netns_car_token,
                    path.workdir / "recordings",
                    {"desk": path.server.pid, "janus": path.janus.pid}, ())
        result: dict[str, Any] = path.in_car(
            lambda: _calls(desk, cars, consoles, seconds, video, audio), timeout=seconds + 180)
        return result
    finally:
        path.close()


def run(cars: int = 4, seconds: float = 20.0, consoles: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dashsos-bench-desk-") as tmp:
        folder = Path(tmp)
        video, audio = camera_stream(folder), cabin_audio()
        result: dict[str, Any] = {"seconds": seconds, "cars": cars, "consoles": consoles,
                                  "targets": TARGETS}
        result["embedded"] = _embedded(folder, cars, consoles, seconds, video, audio)
        why = janus_available()
        result["janus"] = _janus(folder, cars, consoles, seconds, video, audio) \
            if why is None \
            else {"skipped": why}
    return result


def show(result: dict[str, Any]) -> None:
    print(f"desk: {result['cars']} cars at once, each 720p30 H.264 (2 Mb/s) and Opus, "
          f"{result['consoles']} consoles watching (one call each), {result['seconds']:g} s "
          "measured")
    print(f"{'desk mode':<26} {'calls':>5} {'desk CPU':>9} {'per call':>9} {'RSS MB':>7} "
          f"{'Janus CPU':>9} {'Janus MB':>8} {'fps recv':>8} {'fps rec':>8} {'fps shown':>9} "
          f"{'cars CPU':>8}")
    for key, label in (("embedded", "embedded (aiortc, copy)"), ("janus", "janus (VideoRoom)")):
        r = result.get(key, {})
        if "skipped" in r:
            print(f"{label:<26} skipped: {r['skipped']}")
            continue
        cpu, rss = r["cpu"], r["rss_mb"]
        janus_cpu = f"{cpu['janus']:.0%}" if "janus" in cpu else "-"
        janus_mb = f"{rss['janus']:.0f}" if "janus" in rss else "-"
        received = f"{r['fps_received_min']:.1f}" if r["fps_received_min"] is not None \
            else "-"
        delivered = f"{r['fps_delivered_min']:.1f}" if r["fps_delivered_min"] is not None \
            else "-"
        print(f"{label:<26} {r['connected']:>2}/{r['cars']:<2} {cpu['desk']:>8.0%} "
              f"{cpu['desk'] / r['cars']:>8.1%} {rss['desk']:>7.0f} {janus_cpu:>9} "
              f"{janus_mb:>8} {received:>8} {r['fps_recorded_min']:>8.1f} {delivered:>9} "
              f"{r['cars_cpu']:>7.0%}")
        for call_id, problem in r.get("problems", {}).items():  # why a recording is short
            print(f"  {call_id}: {problem}")
    print(f"targets: embedded >= {TARGETS['embedded_calls']} calls, Janus >= "
          f"{TARGETS['janus_calls']} calls, each at >= {TARGETS['fps']:g} fps recorded, "
          f"the desk under {TARGETS['janus_desk_cpu']:.0%} of a core with Janus; fps: the "
          "worst call (received: counted by the embedded desk; Janus's own count is not "
          "read; shown: whole frames a console received); CPU is a share of one core")
