"""A failing source leaves the others recording and shows in status (issue 2, item 7)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import clipcheck
from conftest import GpsFake, feed_camera, wait_for


def _recording(d: Any, name: str) -> bool:
    return bool(d.source(name)["state"] in ("ok", "simulated"))


def _growing(d: Any, name: str, seconds: float = 1.5) -> None:
    """The source's data keeps arriving: its newest packet keeps getting newer."""
    before = d.status()["sources"][name]
    wait_for(lambda: d.status()["sources"][name]["buffered_bytes"] != before["buffered_bytes"],
             seconds + 3, f"{name} to keep recording")


def test_camera_vanishes_others_keep_recording(daemon: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "camera.h264"
    os.mkfifo(fifo)
    camera = feed_camera(fifo)
    try:
        d = daemon({"video": {"backend": "ffmpeg", "input": str(fifo), "input_format": "h264"},
                    "gps": {"backend": "simulated"}})
        wait_for(lambda: d.source("video")["state"] == "ok", 20, "the camera")
        assert "copying" in d.source("video")["detail"]  # Baseline H.264 is not re-encoded
        d.wait_buffered(2)

        os.killpg(camera.pid, signal.SIGKILL)  # the camera vanishes
        camera.wait()
        wait_for(lambda: d.source("video")["state"] in ("down", "degraded"), 10,
                 "status to show the camera down")
        assert _recording(d, "audio") and _recording(d, "gps")
        _growing(d, "audio")

        reply = d.trigger()  # an incident still saves what there is
        record = d.wait_saved(reply["incident"])
        assert record["sources"]["video"]["state"] in ("down", "degraded")
        facts = clipcheck.check_clip(d.incident_dir(reply["incident"]) / "clip.mp4")
        assert facts.video_frames > 0  # the buffered seconds before the camera died

        camera = feed_camera(fifo)  # it comes back
        wait_for(lambda: d.source("video")["state"] == "ok", 20, "the camera to return")
    finally:
        os.killpg(camera.pid, signal.SIGKILL)
        camera.wait()


def test_gpsd_stops_others_keep_recording(daemon: Any, own_gpsfake: GpsFake) -> None:
    d = daemon({"gps": {"backend": "gpsd", "port": own_gpsfake.port, "timeout": 1.0,
                        "poll_interval": 0.2}})
    wait_for(lambda: d.source("gps")["state"] == "ok", 30, "a GPS fix")
    d.wait_buffered(1)
    own_gpsfake.stop()  # gpsd and its feed are gone
    gps = wait_for(lambda: (g := d.source("gps"))["state"] == "down" and g, 15,
                   "status to show gpsd down")
    assert gps["last_known"]["lat"] > 48  # the last known position, with its age
    assert gps["last_known"]["age_seconds"] >= 0
    assert _recording(d, "video") and _recording(d, "audio")
    _growing(d, "video")


def test_no_microphone_video_keeps_recording(daemon: Any, tmp_path: Path) -> None:
    # PortAudio's default device goes through ALSA to a PulseAudio that is not there.
    d = daemon({"audio": {"backend": "pyaudio"}},
               env={"PULSE_SERVER": f"unix:{tmp_path}/no-such-pulse"})
    audio = wait_for(lambda: (a := d.source("audio"))["state"] == "down" and a, 15,
                     "status to show the microphone down")
    assert audio["detail"]
    d.wait_buffered(2, streams=("video",))
    assert _recording(d, "video") and _recording(d, "gps")
    reply = d.trigger()
    d.wait_saved(reply["incident"])
    clipcheck.check_clip(d.incident_dir(reply["incident"]) / "clip.mp4", audio=False)


def test_sigterm_during_incident_finalizes_clip(daemon: Any) -> None:
    d = daemon({"incident": {"post_seconds": 60}})
    d.wait_buffered(3)
    reply = d.trigger()
    wait_for(lambda: d.status()["state"] in ("triggered", "ending"), 5, "the incident to record")
    assert d.stop(signal.SIGTERM) == 0
    directory = d.incident_dir(reply["incident"])
    clipcheck.check_clip(directory / "clip.mp4")
    assert '"status": "saved"' in (directory / "incident.json").read_text()
