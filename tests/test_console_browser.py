"""The dispatcher's console in real headless Chromium: the car's video plays, the MSD and
the trail are shown, and the operator's (fake) microphone is heard at the car's speaker,
a PulseAudio null sink (issue 4, item 2). Saves a screenshot to artifacts/."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from browser import StunServer, browser, console_login
from conftest import REPO, Daemon, record_sink, wait_for
from dispatcher import CAR_TOKEN, CONSOLE_TOKEN, Dispatcher

ARTIFACTS = REPO / "artifacts"
OPERATOR_HZ = 880.0


def _peak(pcm: bytes) -> tuple[float, float]:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    rms = float(np.sqrt(np.mean(samples ** 2))) if len(samples) else 0.0
    return float(np.argmax(spectrum) * 48000 / len(samples)), rms


def test_console_plays_video_shows_msd_and_talks_back(daemon: Any, pulse: dict[str, str],
                                                      tmp_path: Path) -> None:
    with StunServer() as stun:
        desk = Dispatcher(tmp_path / "dispatcher", stun_url=stun.url)
        token = tmp_path / "call.token"
        token.write_text(CAR_TOKEN + "\n")
        try:
            car: Daemon = daemon(
                {"vehicle": {"vin": "WVWZZZ1JZXW000001"},
                 "video": {"width": 640, "height": 360},
                 "call": {"endpoints": [desk.whip], "token_file": str(token)},
                 "ice": {"interfaces": ["127.0.0.1"]},
                 "incident": {"post_seconds": 5},
                 "prompts": {"enabled": False}},  # only the operator's voice is measured
                env={**pulse, "PULSE_SINK": "speaker"})  # the car's speaker
            car.wait_buffered(2)
            pressed = time.monotonic()
            car.trigger()
            wait_for(desk.connected, 15, "the call at the desk")
            with browser(tmp_path / "browser", fake_audio_hz=OPERATOR_HZ) as b:
                opened = time.monotonic()
                console_login(b, desk.url, CONSOLE_TOKEN)
                stats = wait_for(lambda: (s := b.eval_async("window.dashsos.stats()"))
                                 ["framesDecoded"] > 0 and s, 30, "video in the console")
                first_frame = time.monotonic()
                wait_for(lambda: b.eval_async("window.dashsos.stats()")["trailLength"] >= 2,
                         15, "the position trail")
                page = b.eval("return document.body.innerText")
                assert "WVWZZZ1JZXW000001" in page or "WVW" in page, page[:2000]
                assert "local" in page  # the trigger kind
                stats = b.eval_async("window.dashsos.stats()")
                assert stats["msd"]["msd"]["msdStructure"]["control"]["testCall"] is False
                # The operator talks (Chromium's fake microphone plays 880 Hz) ...
                time.sleep(2)
                pcm = record_sink(pulse, "speaker", 3.0)
                peak, rms = _peak(pcm)
                assert rms > 300 and abs(peak - OPERATOR_HZ) < 15, (peak, rms)
                ARTIFACTS.mkdir(exist_ok=True)
                b.screenshot(ARTIFACTS / "console.png")
                (ARTIFACTS / "console.json").write_text(json.dumps({
                    "press_to_desk_connected_s": None,
                    "console_open_to_first_frame_s": round(first_frame - opened, 3),
                    "press_to_console_first_frame_s": round(first_frame - pressed, 3),
                    "speaker_peak_hz": round(peak, 1), "speaker_rms": round(rms, 1),
                    "frames_decoded": stats["framesDecoded"]}, indent=2))
            assert (ARTIFACTS / "console.png").stat().st_size > 10_000
            assert car.status()["links"]["call"]["call_state"] == "connected"
        finally:
            desk.stop()


def test_console_shows_duress_while_video_and_audio_go_on(daemon: Any, tmp_path: Path) -> None:
    """Issue 13: a cancel with the duress PIN answers "cancelled" in the car, and the desk
    sees DURESS while the car's video and audio keep coming."""
    from dashsos.triggers import control_socket

    with StunServer() as stun:
        desk = Dispatcher(tmp_path / "dispatcher", stun_url=stun.url)
        token = tmp_path / "call.token"
        token.write_text(CAR_TOKEN + "\n")
        try:
            car: Daemon = daemon(
                {"call": {"endpoints": [desk.whip], "token_file": str(token)},
                 "ice": {"interfaces": ["127.0.0.1"]},
                 "prompts": {"enabled": False},
                 "incident": {"post_seconds": 5, "cancel_grace_seconds": 60,
                              "duress_pin": "2468"}})
            car.wait_buffered(2)
            car.trigger()
            wait_for(desk.connected, 15, "the call at the desk")
            with browser(tmp_path / "browser") as b:
                console_login(b, desk.url, CONSOLE_TOKEN)
                wait_for(lambda: b.eval_async("window.dashsos.stats()")["framesDecoded"] > 0,
                         30, "video in the console")
                assert b.eval("return document.getElementById('duress').hidden") is True
                reply = control_socket.request(car.socket, {"cmd": "cancel", "pin": "2468"})
                assert reply == {"ok": True, "result": "cancelled"}  # what a cancel answers
                wait_for(lambda: b.eval("return !document.getElementById('duress').hidden"),
                         15, "DURESS in the console")
                page = b.eval("return document.body.innerText")
                assert "DURESS" in page
                before = b.eval_async("window.dashsos.stats()")
                time.sleep(2.0)
                after = b.eval_async("window.dashsos.stats()")
                assert after["framesDecoded"] > before["framesDecoded"] + 20, (before, after)
                assert after["audioPackets"] > before["audioPackets"] + 20, (before, after)
                ARTIFACTS.mkdir(exist_ok=True)
                b.screenshot(ARTIFACTS / "console-duress.png")
            status = car.status()
            assert status["incident"]["duress"] is not None
            assert status["incident"]["cancelled"] is None
            assert status["links"]["call"]["call_state"] == "connected"
        finally:
            desk.stop()
