"""The call: press to first decoded frame at the dispatcher (aiortc), through a local
coturn with relay-only policy, and in the Chromium console; CPU of the car during a call
against buffering alone.

The car is `dashsos run` in its own process, triggered over its control socket. Both
processes read CLOCK_MONOTONIC (and the page's clock is mapped to wall time), so a press
in one and a frame in another compare directly. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test harness's servers: one copy of each

from browser import StunServer, browser, console_login  # noqa: E402
from dispatcher import CAR_TOKEN, CONSOLE_TOKEN, Dispatcher  # noqa: E402
from turn import TurnServer  # noqa: E402
from whipserver import WhipServer  # noqa: E402

TARGETS = {"aiortc_p50_s": 0.5, "chromium_p50_s": 1.0, "turn_p50_s": 1.5, "cpu_ratio": 1.3}


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Car:
    def __init__(self, tmp: Path, endpoint: str, token: str, **sections: dict[str, Any]) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "token").write_text(token + "\n")
        config: dict[str, dict[str, Any]] = {
            "storage": {"dir": str(tmp / "state")},
            "control": {"socket": str(tmp / "control.sock")},
            "buffer": {"pre_seconds": 10},
            "incident": {"post_seconds": 1, "cancel_grace_seconds": 60, "cooldown_seconds": 0},
            "video": {"backend": "test"}, "audio": {"backend": "test"},
            "gps": {"backend": "simulated"}, "button": {"backend": "none"},
            "call": {"endpoints": [endpoint], "token_file": str(tmp / "token"),
                     "speaker": "none"},
            "ice": {"interfaces": ["127.0.0.1"]},
            "log": {"level": "warning"},
        }
        for section, keys in sections.items():
            config.setdefault(section, {}).update(keys)
        from conftest import toml

        (tmp / "car.toml").write_text(toml(config))
        self.socket = tmp / "control.sock"
        self.log = open(tmp / "car.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dashsos", "--config", str(tmp / "car.toml"), "run"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda: self.socket.exists(), 20)
        self.wait(lambda: self.status()["buffer"]["seconds"] > 3, 30)

    @staticmethod
    def wait(predicate: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise TimeoutError("bench: timed out")

    def request(self, cmd: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
        return reply

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.request("status")["status"]
        return status

    def idle(self) -> None:
        self.wait(lambda: self.status()["state"] in ("idle", "cooldown"), 30)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.log.close()


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_s": round(statistics.median(ordered), 3),
            "p90_s": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "max_s": round(ordered[-1], 3)}


def press_to_aiortc(tmp: Path, presses: int, relay: bool) -> dict[str, float]:
    whip = WhipServer(token=CAR_TOKEN)
    turn = TurnServer(tmp / "turn") if relay else None
    ice: dict[str, Any] = {"interfaces": ["127.0.0.1"]}
    if turn is not None:
        (tmp / "turn.password").write_text(turn.password)
        ice.update(turn_urls=[turn.url], turn_username=turn.user, relay_only=True,
                   turn_password_file=str(tmp / "turn.password"))
    car = Car(tmp / ("car-turn" if relay else "car"), whip.url, CAR_TOKEN, ice=ice)
    samples = []
    try:
        for _ in range(presses):
            before = set(whip.sessions)
            pressed = time.monotonic()
            car.request("trigger")
            session = car.wait(lambda seen=before: next(
                (s for k, s in whip.sessions.items() if k not in seen and s.first_frame_at),
                None), 20)
            samples.append(session.first_frame_at - pressed)
            car.request("cancel")  # hangs up; the incident ends after its post window
            car.idle()
    finally:
        car.stop()
        whip.stop()
        if turn is not None:
            turn.stop()
    return _stats(samples)


def press_to_chromium(tmp: Path, presses: int) -> dict[str, float]:
    samples = []
    with StunServer() as stun:
        desk = Dispatcher(tmp / "desk", stun_url=stun.url)
        car = Car(tmp / "car-console", desk.whip, CAR_TOKEN)
        try:
            with browser(tmp / "browser") as b:
                console_login(b, desk.url, CONSOLE_TOKEN)
                for _ in range(presses):
                    b.open(f"{desk.url}/")  # the session cookie keeps the operator in
                    time.sleep(1.0)  # the console is open and waiting, as at a desk
                    pressed = time.time()
                    car.request("trigger")
                    stats = car.wait(lambda: (s := b.eval_async("window.dashsos.stats()"))
                                     ["firstFrameAt"] is not None and s, 30)
                    origin = b.eval("return performance.timeOrigin")
                    samples.append((origin + stats["firstFrameAt"]) / 1000 - pressed)
                    call = desk.connected()
                    if call:
                        desk.api(f"/api/calls/{call['id']}/hangup", method="POST")
                    car.idle()
        finally:
            car.stop()
            desk.stop()
    return _stats(samples)


def _cpu_phases(car: Car, seconds: float, connected: bool) -> tuple[float, float]:
    """CPU share while buffering, then during an incident (and its call, if any). With a
    call, a re-dial or a drop inside the window fails the bench: it would measure
    connecting, not talking."""
    time.sleep(2)
    start = _cpu(car.process.pid)
    time.sleep(seconds)
    buffering = (_cpu(car.process.pid) - start) / seconds
    car.request("trigger")
    if connected:
        car.wait(lambda: car.status()["links"]["call"]["call_state"] == "connected", 20)
    time.sleep(2)
    attempts = car.status()["links"]["call"]["attempts"]
    start = _cpu(car.process.pid)
    time.sleep(seconds)
    used = (_cpu(car.process.pid) - start) / seconds
    call = car.status()["links"]["call"]
    if connected and (call["attempts"] != attempts or call["call_state"] != "connected"):
        sys.exit(f"bench: the call re-dialed or dropped in the window (attempts {attempts} -> "
                 f"{call['attempts']}, {call['call_state']})")
    return buffering, used


def cpu_during_call(tmp: Path, seconds: float) -> dict[str, float]:
    """The same car three ways: buffering; an incident with no call (the clip being
    written); an incident with the call to the reference dispatcher up (Opus both ways,
    telemetry). The call's own cost is the difference."""
    desk = Dispatcher(tmp / "desk-cpu")
    hd = {"width": 1280, "height": 720}
    try:
        quiet = Car(tmp / "car-nocall", desk.whip, CAR_TOKEN, call={"enabled": False},
                    incident={"post_seconds": 3600}, video=hd)
        try:
            buffering, incident = _cpu_phases(quiet, seconds, connected=False)
        finally:
            quiet.stop()
        car = Car(tmp / "car-cpu", desk.whip, CAR_TOKEN, incident={"post_seconds": 3600},
                  video=hd)
        try:
            buffering_2, calling = _cpu_phases(car, seconds, connected=True)
        finally:
            car.stop()
    finally:
        desk.stop()
    base = (buffering + buffering_2) / 2
    return {"buffering_pct": round(100 * base, 1), "incident_pct": round(100 * incident, 1),
            "call_pct": round(100 * calling, 1), "ratio": round(calling / base, 2),
            "call_over_incident": round(calling / incident, 2)}


def run(presses: int = 10, seconds: float = 10.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dashsos-bench-call-") as name:
        tmp = Path(name)
        return {"aiortc": press_to_aiortc(tmp, presses, relay=False),
                "turn": press_to_aiortc(tmp, presses, relay=True),
                "chromium": press_to_chromium(tmp, max(3, presses // 2)),
                "cpu": cpu_during_call(tmp, seconds), "targets": TARGETS}


def show(result: dict[str, Any]) -> None:
    print("the call: press to first decoded frame (seconds), loopback")
    print(f"{'where':<46}{'n':>4}{'p50':>8}{'p90':>8}{'max':>8}{'target p50':>12}")
    for key, label, target in (("aiortc", "dispatcher (aiortc), direct", "aiortc_p50_s"),
                               ("turn", "dispatcher (aiortc), coturn relay-only",
                                "turn_p50_s"),
                               ("chromium", "Chromium console (via the desk)",
                                "chromium_p50_s")):
        r = result[key]
        print(f"{label:<46}{r['n']:>4}{r['p50_s']:>8.3f}{r['p90_s']:>8.3f}{r['max_s']:>8.3f}"
              f"{TARGETS[target]:>12.1f}")
    cpu = result["cpu"]
    print(f"car CPU, 720p30, % of a core: buffering {cpu['buffering_pct']:.1f}; incident "
          f"without a call (clip written) {cpu['incident_pct']:.1f}; incident with the call "
          f"{cpu['call_pct']:.1f}")
    print(f"  call / buffering {cpu['ratio']:.2f}x (target <= {TARGETS['cpu_ratio']}); "
          f"call / incident without call {cpu['call_over_incident']:.2f}x")


def _audio(times: list[float]) -> dict[str, float]:
    """Opus at the desk: 20 ms frames decoded; what share of the span arrived."""
    times = sorted(times)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"frames": len(times),
            "received_pct": round(100 * min(1.0, len(times) * 0.02 / span), 1) if span else 0.0,
            "longest_gap_s": round(max(gaps, default=0.0), 2)}


def netem(seconds: float = 30.0, outages: tuple[float, ...] = (10.0,)) -> dict[str, Any]:
    """A car and a one-session-per-endpoint WHIP server in two network namespaces, over a
    mobile link (300 ms RTT, 5 % loss, 1 Mb/s): press to first frame, what the desk
    decodes for `seconds` (video continuity; the intelligibility (STOI) of speech played
    into the car's microphone, as heard at the desk), then each outage and how long
    after the path's return the video is decoded again; sessions left at the server
    after the incident."""
    import speech
    from dashsos.media.audio import read_wav
    from netns import MOBILE, NetPath, freezes, playout

    with tempfile.TemporaryDirectory(prefix="dashsos-bench-netem-") as name:
        wav = speech.speech_wav(Path(name) / "speech.wav")
        reference = read_wav(str(wav), speech.RATE)
        path = NetPath(Path(name) / "net", audio=True)
        try:
            path.impair(MOBILE)
            path.start_car({"audio": {"backend": "test", "test_sound": str(wav)}})
            pressed = time.monotonic()
            path.request("trigger")
            first = path.on_air_after(pressed, 60)
            start = time.monotonic()
            time.sleep(seconds)
            sessions = path.sessions()
            video = freezes([t for s in sessions for t in s["video_times"] if t > start])
            buffered = playout(sessions, start, 0.5)
            audio = _audio([t for s in sessions for t in s["audio_times"] if t > start])
            rtp = [s.get("rtp", {}).get("audio", {}) for s in sessions]
            received = sum(r.get("received", 0) for r in rtp)
            lost = sum(r.get("lost", 0) for r in rtp)
            audio["rtp_received_pct"] = round(100 * received / (received + lost), 1) \
                if received + lost else 0.0
            assert path.audio_dir is not None
            audio["speech"] = speech.intelligibility(reference, speech.arrived(path.audio_dir))
            audio["speech_aiortc"] = speech.intelligibility(reference,
                                                            speech.heard(path.audio_dir))
            audio["speech_codec_only"] = speech.intelligibility(
                reference, [speech.codec_only(reference)])
            gaps = []
            for outage in outages:
                path.outage(True)
                time.sleep(outage)
                up = path.outage(False)
                gaps.append({"outage_s": outage,
                             "back_on_air_s": round(path.on_air_after(up, 120), 2)})
                time.sleep(5)
            refusals = path.leaked()  # 403s: an earlier session still held the endpoint
            path.request("cancel")
            path._wait(lambda: not path.live(), 30, "the last DELETE")
            return {"press_to_first_frame_s": round(first, 2), "video": video,
                    "playout": buffered,
                    "audio": audio, "outages": gaps, "sessions": len(path.sessions()),
                    "leaked_sessions": len(path.live()), "refusals_403": refusals,
                    "link": "300 ms RTT, 5 % loss each way, 1 Mb/s each way"}
        finally:
            path.close()


def show_netem(result: dict[str, Any]) -> None:
    video, audio = result["video"], result["audio"]
    print(f"the call over a mobile link ({result['link']}), whip mode, 320x240 30 fps "
          "400 kb/s")
    print(f"  press to first decoded frame: {result['press_to_first_frame_s']:.2f} s")
    print(f"  video decoded at the desk over {video['seconds']:.0f} s: {video['frames']} "
          f"frames ({video['fps']:.1f} fps); frozen {video['freeze_s']:.2f} s in "
          f"{video['freezes']} freezes, longest {video['longest_freeze_s']:.2f} s")
    play = result["playout"]
    print(f"  a player with a {play['delay_s']:g} s jitter buffer: frozen "
          f"{play['freeze_s']:.2f} s in {play['freezes']} freezes, longest "
          f"{play['longest_freeze_s']:.2f} s")
    print(f"  audio: {audio['rtp_received_pct']:.1f} % of Opus packets arrive (20 ms "
          f"each); the aiortc desk, without loss concealment, decoded "
          f"{audio['received_pct']:.1f} % of frames, longest gap "
          f"{audio['longest_gap_s']:.2f} s")
    said, codec, aio = audio["speech"], audio["speech_codec_only"], audio["speech_aiortc"]
    print(f"  speech intelligibility (STOI, 5 s stretches, mean / worst): the Opus codec "
          f"alone {codec['stoi_mean']:.3f}; every packet that arrived, losses silent "
          f"{said['stoi_mean']:.3f} / {said['stoi_worst']:.3f}; as aiortc's receiver "
          f"decoded it {aio['stoi_mean']:.3f} / {aio['stoi_worst']:.3f}")
    for gap in result["outages"]:
        print(f"  outage {gap['outage_s']:g} s: video again {gap['back_on_air_s']:.2f} s "
              "after the path's return")
    print(f"  sessions created {result['sessions']}, 403 refusals {result['refusals_403']}, "
          f"left at the server after the incident {result['leaked_sessions']}")
