"""A camera that freezes mid-incident (issue 9): no error, no frames. The daemon lives on
(the watchdog keeps being pinged), the call to the dispatcher stays up with the car's
audio flowing, the camera is restarted alone and comes back, and the evidence verifies."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import av
import numpy as np

import clipcheck
from conftest import TONE_HZ, Daemon, feed_camera, wait_for
from dashsos.evidence.signing import verify
from dispatcher import CAR_TOKEN, Dispatcher
from test_service import WATCHDOG_USEC, FakeSystemd

FREEZE_S = 8.0  # past the stall bound, and four times a 2 s watchdog
PING_S = WATCHDOG_USEC / 2e6  # pinged at half the watchdog's period
POLL_S = 0.25


@dataclass
class Watch:
    """What the test saw of the car and the desk, a few times a second, during the freeze."""

    # (seconds since the freeze, state, detail, restarts) of the camera, each look
    video: list[tuple[float, str, str, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def look(self, car: Daemon, dispatcher: Dispatcher, incident: str, call_id: str,
             frozen: float) -> None:
        if car.process.poll() is not None:
            self.problems.append(f"the daemon exited {car.process.returncode}")
            return
        status = car.status()
        video = status["sources"]["video"]
        self.video.append((time.monotonic() - frozen, video["state"], video["detail"],
                           video.get("restarts", 0)))
        if status["state"] != "active" or (status["incident"] or {}).get("id") != incident:
            self.problems.append(f"incident: {status['state']} {status['incident']}")
        call = status["links"]["call"]
        if call["call_state"] != "connected":
            self.problems.append(f"car's call: {call}")
        calls = dispatcher.calls()
        if [(c["id"], c["state"]) for c in calls] != [(call_id, "connected")]:
            self.problems.append(f"desk's calls: {[(c['id'], c['state']) for c in calls]}")


def _car(tmp_path: Path, endpoint: str, fifo: Path) -> dict[str, Any]:
    token = tmp_path / "call.token"
    token.write_text(CAR_TOKEN + "\n")
    return {
        "vehicle": {"vin": "WVWZZZ1JZXW000001"},
        "call": {"endpoints": [endpoint], "token_file": str(token), "speaker": "none",
                 "redial_max_seconds": 1.0},
        "ice": {"interfaces": ["127.0.0.1"]},
        "video": {"backend": "ffmpeg", "input": str(fifo), "input_format": "h264"},
        "audio": {"backend": "test", "tone_hz": float(TONE_HZ)},
        "buffer": {"pre_seconds": 3},
        "incident": {"post_seconds": 3, "cancel_grace_seconds": 2},
    }


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _desk_audio(media: Path) -> tuple[np.ndarray[Any, Any], int, list[float]]:
    """The desk's recorded audio: mono float samples from its first frame, the sample
    rate, and each decoded frame's time."""
    with av.open(str(media)) as container:
        stream = container.streams.audio[0]
        rate = int(stream.sample_rate)
        mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks, times = [], []
        for frame in container.decode(stream):
            times.append(float(frame.time or 0.0))
            chunks += [f.to_ndarray().reshape(-1) for f in mono.resample(frame)]
    return np.concatenate(chunks).astype(np.float64), rate, times


def _tone(samples: np.ndarray[Any, Any], rate: int) -> tuple[float, float]:
    """(dominant frequency in Hz, RMS level in dBFS)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    peak = float(np.argmax(spectrum) * rate / len(samples))
    rms = float(np.sqrt(np.mean(samples ** 2)))
    return peak, 20 * float(np.log10(max(rms, 1e-12)))


def test_frozen_camera_mid_call_is_restarted_alone(daemon: Any, dispatcher: Dispatcher,
                                                   tmp_path: Path) -> None:
    systemd = FakeSystemd(tmp_path / "notify.sock")
    fifo = tmp_path / "camera.h264"
    os.mkfifo(fifo)
    camera = feed_camera(fifo)
    try:
        car: Daemon = daemon(_car(tmp_path, dispatcher.whip, fifo),
                             env={"NOTIFY_SOCKET": str(systemd.path),
                                  "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        wait_for(lambda: systemd.times("READY=1"), 20, "READY=1")
        ready = systemd.times("READY=1")[0]
        wait_for(lambda: car.source("video")["state"] == "ok", 20, "the camera")
        car.wait_buffered(3)
        incident = car.trigger()["incident"]
        call = wait_for(dispatcher.connected, 15, "the dispatcher to answer")
        wait_for(lambda: car.status()["links"]["call"]["call_state"] == "connected", 5,
                 "the car to see the call up")
        time.sleep(2)  # the call carries video and audio before the freeze

        watch = Watch()
        os.killpg(camera.pid, signal.SIGSTOP)  # the camera freezes: no error, no frames
        frozen, frozen_wall = time.monotonic(), time.time()
        while time.monotonic() - frozen < FREEZE_S:
            watch.look(car, dispatcher, incident, call["id"], frozen)
            time.sleep(POLL_S)
        os.killpg(camera.pid, signal.SIGCONT)
        thawed, thawed_wall = time.monotonic(), time.time()
        while time.monotonic() - thawed < 10 and watch.video[-1][1] != "ok":
            watch.look(car, dispatcher, incident, call["id"], frozen)
            time.sleep(POLL_S)
        time.sleep(2)  # video on the call again for a while
        watch.look(car, dispatcher, incident, call["id"], frozen)

        assert watch.problems == [], watch.problems  # alive, one incident, one call, up
        # The camera: stalled and restarting within about 4 s, then ok again, restarted.
        stalled = [v for v in watch.video if v[2].startswith("stalled")]
        assert stalled, watch.video
        assert stalled[0][0] < 4.5 and stalled[0][1] == "degraded", watch.video
        assert any(v[1] == "ok" for v in watch.video if v[0] > stalled[-1][0]), watch.video
        assert watch.video[-1][1] == "ok" and watch.video[-1][3] >= 1, watch.video[-1]
        # The watchdog: pinged at its cadence from READY, through the freeze, until now.
        pings = systemd.times("WATCHDOG=1", since=ready)
        gaps = [round(b - a, 2) for a, b in zip(pings, pings[1:], strict=False)]
        assert pings[-1] > thawed and all(0.8 * PING_S <= g <= 1.3 * PING_S for g in gaps), \
            gaps
        assert sum(frozen <= t <= thawed for t in pings) >= FREEZE_S / PING_S - 2, gaps

        # The operator hangs up; the car's evidence, then the desk's copy, are checked.
        dispatcher.api(f"/api/calls/{call['id']}/hangup", method="POST")
        car.wait_saved(incident, timeout=30)
        directory = car.incident_dir(incident)
        wait_for(lambda: (directory / "manifest.sig").exists(), 5, "the signature")
        result = verify(directory)
        assert result.ok, result.problems
        facts = clipcheck.check_clip(directory / "clip.mp4")
        assert facts.duration > FREEZE_S
        assert car.process.poll() is None
        assert car.stop(signal.SIGTERM) == 0

        # Ended (not saving): media.mp4 is finished.
        ended = wait_for(lambda: (c := next(c for c in dispatcher.calls()
                                            if c["id"] == call["id"]))["state"] == "ended"
                         and c, 30, "the desk to end the call and save its recording")
        _check_desk_audio(dispatcher, call["id"], _seconds(ended["connected"]), frozen_wall,
                          thawed_wall)
    finally:
        os.killpg(camera.pid, signal.SIGKILL)
        camera.wait()
        systemd.close()


def _check_desk_audio(dispatcher: Dispatcher, call_id: str, connected_wall: float,
                      frozen_wall: float, thawed_wall: float) -> None:
    """The car's tone reached the desk all through the freeze, without a gap."""
    media = dispatcher.recordings / call_id / "media.mp4"
    failed = [line for line in dispatcher.log.read_text(errors="replace").splitlines()
              if "finishing media.mp4 failed" in line]
    assert not failed, f"the desk's recorder failed, {media} is unfinished: {failed}"
    samples, rate, times = _desk_audio(media)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) < 0.5, max(gaps)
    # The recording starts at about the call's first picture, soon after it connected:
    # the freeze, trimmed at both ends for that uncertainty, lies well inside it.
    start = frozen_wall - connected_wall + 1.5
    end = thawed_wall - connected_wall - 1.5
    assert len(samples) / rate > end + 1.5, (len(samples) / rate, end)
    peak, level = _tone(samples[int(start * rate):int(end * rate)], rate)
    assert abs(peak - TONE_HZ) < 20 and level > -40, (peak, level)
