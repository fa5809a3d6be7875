"""A failing source leaves the others recording and shows in status (issue 2, item 7); a
frozen one is restarted alone (issue 9)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clipcheck
from conftest import GpsFake, feed_camera, wait_for
from dashsos.config import AudioConfig, VideoConfig
from dashsos.media.audio import PyAudioMicrophone
from dashsos.media.ffmpeg_video import FFmpegVideoSource
from dashsos.media.packet import Packet
from dashsos.media.picamera2_video import Picamera2VideoSource
from dashsos.media.source import MAX_ABANDONED, RETRY_MAX_S, STALL_S, STOP_BOUND_S, Source


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


# --- a device that freezes: no error, no data (issue 9) ---

NOTICE_S = STALL_S + 1.5  # stall bound, the supervisor's look, and status polling


def test_frozen_camera_is_restarted_alone(daemon: Any, tmp_path: Path) -> None:
    """The camera freezes (its feeder SIGSTOPped): video says stalled and restarting within
    about 4 s and keeps retrying while audio and GPS record on; when the camera thaws,
    video is ok again and the restarts are counted."""
    fifo = tmp_path / "camera.h264"
    os.mkfifo(fifo)
    camera = feed_camera(fifo)
    try:
        d = daemon({"video": {"backend": "ffmpeg", "input": str(fifo), "input_format": "h264"},
                    "gps": {"backend": "simulated"}})
        wait_for(lambda: d.source("video")["state"] == "ok", 20, "the camera")
        d.wait_buffered(2)
        assert d.source("video")["restarts"] == 0

        os.killpg(camera.pid, signal.SIGSTOP)  # frozen: no error, no frames
        frozen = time.monotonic()
        video = wait_for(lambda: _stalled(d), NOTICE_S + 2, "video to say it stalled")
        noticed = time.monotonic() - frozen
        assert noticed < NOTICE_S, noticed
        assert video["state"] == "degraded", video
        assert _recording(d, "audio") and _recording(d, "gps")
        _growing(d, "audio")
        wait_for(lambda: d.source("video")["restarts"] >= 2, 2 * NOTICE_S,
                 "it to keep restarting while frozen")
        assert d.source("video")["detail"].startswith("stalled")

        os.killpg(camera.pid, signal.SIGCONT)  # the camera thaws
        wait_for(lambda: d.source("video")["state"] == "ok", 10, "video ok again")
        _growing(d, "video")
        assert d.source("video")["restarts"] >= 2
        assert camera.poll() is None  # restarts never broke the camera's pipe
        assert d.process.poll() is None
    finally:
        os.killpg(camera.pid, signal.SIGKILL)
        camera.wait()


def _stalled(d: Any) -> dict[str, Any] | None:
    video: dict[str, Any] = d.source("video")
    ok = video["detail"].startswith("stalled") and video.get("restarts", 0) >= 1
    return video if ok else None


class TcpCamera:
    """An IP camera on 127.0.0.1: raw H.264 over TCP at its own pace, from the start for
    each connection. `frozen` holds every connection open and sends nothing."""

    SECONDS = 20

    def __init__(self, workdir: Path) -> None:
        clip = workdir / "ipcam.h264"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                        "testsrc2=size=320x240:rate=30", "-t", str(self.SECONDS), "-c:v",
                        "libx264", "-preset", "ultrafast", "-profile:v", "baseline", "-g", "30",
                        "-f", "h264", "-y", str(clip)], check=True)
        self.data = clip.read_bytes()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.frozen = threading.Event()
        self.connections = 0
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        step = 0.02
        chunk = max(1, int(len(self.data) / self.SECONDS * step))
        with conn:
            for offset in range(0, len(self.data), chunk):
                while self.frozen.is_set() and not self._closed.is_set():
                    time.sleep(0.01)
                if self._closed.is_set():
                    return
                try:
                    conn.sendall(self.data[offset:offset + chunk])
                except OSError:
                    return  # the source hung up
                time.sleep(step)

    def close(self) -> None:
        self._closed.set()
        self.server.close()


@pytest.fixture
def tcp_camera(tmp_path: Path) -> Iterator[TcpCamera]:
    camera = TcpCamera(tmp_path)
    yield camera
    camera.close()


def _collect(source: Source[Packet]) -> list[Packet]:
    packets: list[Packet] = []
    lock = threading.Lock()

    def deliver(p: Packet) -> None:
        with lock:
            packets.append(p)

    source.start(deliver)
    return packets


def test_frozen_ip_camera_is_interrupted_by_the_read_timeout(tcp_camera: TcpCamera) -> None:
    """A network input's reads end by PyAV's own timeout: nothing is left behind."""
    source = FFmpegVideoSource(VideoConfig(
        backend="ffmpeg", input=f"tcp://127.0.0.1:{tcp_camera.port}", input_format="h264",
        width=320, height=240))
    packets = _collect(source)
    try:
        wait_for(lambda: source.health.state == "ok" and len(packets) > 30, 15, "video")
        assert "copying" in source.health.detail
        tcp_camera.frozen.set()
        frozen = time.monotonic()
        wait_for(lambda: source.health.detail.startswith("stalled"), NOTICE_S, "the stall")
        assert time.monotonic() - frozen < NOTICE_S
        assert source.health.detail.endswith("; restarting"), source.health.detail
        # Still frozen: reconnects get no answer and end by themselves, within STALL_S.
        wait_for(lambda: source.restarts >= 2 and tcp_camera.connections >= 2,
                 2 * NOTICE_S, "a reconnect to time out")
        assert source.abandoned == 0
        tcp_camera.frozen.clear()
        count = len(packets)
        wait_for(lambda: source.health.state == "ok" and len(packets) > count + 30, 10,
                 "video again")
        assert source.abandoned == 0
    finally:
        tcp_camera.frozen.clear()
        source.stop()


# --- the Pi camera (through the picamera2 stand-in): a hung encoder, a hung stop() ---

STANDINS = Path(__file__).resolve().parent / "standins"


@pytest.fixture
def picamera2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(STANDINS))
    for name in [m for m in sys.modules if m.startswith("picamera2")]:
        monkeypatch.delitem(sys.modules, name)
    import picamera2 as standin

    standin.recordings.clear()
    standin.events.clear()
    yield standin
    standin.faults.clear()  # lets hung threads end
    for name in [m for m in sys.modules if m.startswith("picamera2")]:
        del sys.modules[name]


def _pi_camera() -> Picamera2VideoSource:
    return Picamera2VideoSource(VideoConfig(backend="picamera2", width=320, height=240,
                                            fps=30, bitrate=500_000))


def test_pi_camera_with_a_hung_encoder_is_restarted(picamera2: Any) -> None:
    source = _pi_camera()
    packets = _collect(source)
    try:
        wait_for(lambda: source.health.state == "ok" and len(packets) > 30, 10, "video")
        picamera2.faults.encoder_hangs.set()
        hung = time.monotonic()
        wait_for(lambda: source.health.detail.startswith("stalled"), NOTICE_S, "the stall")
        assert time.monotonic() - hung < NOTICE_S
        assert source.health.state == "degraded" and source.restarts == 1
        # The hung camera is stopped and closed, then a new one opened, within the bound.
        wait_for(lambda: picamera2.events.count("open") == 2, STOP_BOUND_S + 1,
                 "a fresh camera")
        assert picamera2.events[:6] == ["open", "start_recording", "stop", "stop", "close",
                                        "open"], picamera2.events
        picamera2.faults.encoder_hangs.clear()
        count = len(packets)
        wait_for(lambda: source.health.state == "ok" and len(packets) > count + 30, 10,
                 "video again")
        assert source.restarts == 1 and source.abandoned == 0
        assert packets[count].keyframe  # the fresh camera starts with a keyframe
    finally:
        source.stop()


def test_pi_camera_whose_stop_hangs_is_left_behind_and_reopened(picamera2: Any) -> None:
    source = _pi_camera()
    packets = _collect(source)
    try:
        wait_for(lambda: source.health.state == "ok" and len(packets) > 30, 10, "video")
        picamera2.faults.encoder_hangs.set()
        picamera2.faults.stop_hangs.set()
        wait_for(lambda: source.restarts == 1, NOTICE_S, "the stall")
        stalled = time.monotonic()
        assert source.health.detail.startswith("stalled: no data for 3 s; restarting")
        # stop() hangs: after the bound the capture is left behind and a fresh one opens
        # the camera, which the hung one still holds (as libcamera would say).
        wait_for(lambda: source.abandoned == 1, STOP_BOUND_S + 1, "the hung stop left")
        assert time.monotonic() - stalled < STOP_BOUND_S + 1
        wait_for(lambda: "busy" in picamera2.events, 2, "a fresh attempt")
        wait_for(lambda: source.health.state == "down", 2, "status to say why")
        assert "Camera __init__ sequence did not complete" in source.health.detail
        picamera2.faults.clear()  # the stop returns at last and the camera is released
        count = len(packets)
        wait_for(lambda: source.health.state == "ok" and len(packets) > count + 30,
                 RETRY_MAX_S + 5, "video again")
        assert source.restarts == 1 and source.abandoned == 1
        assert picamera2.events.count("close") == 1  # the hung one closed its own camera
    finally:
        source.stop()


# --- the microphone: PortAudio from a sound server that freezes ---


@pytest.fixture
def frozen_pulse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A PulseAudio of this test's own with a tone at its default source, for this
    process's PortAudio; yields its pid, to SIGSTOP."""
    root = tmp_path / "pulse"
    (root / "run").mkdir(parents=True)
    (root / "home").mkdir()
    sock = root / "native"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(root / "run"), "HOME": str(root / "home")}
    process = subprocess.Popen(
        ["pulseaudio", "--exit-idle-time=-1", "--system=false", "-n", "--daemonize=no",
         "--disallow-exit", "--use-pid-file=false",
         "-L", f"module-native-protocol-unix auth-anonymous=1 socket={sock}",
         "-L", "module-null-sink sink_name=vsink",
         "-L", "module-sine-source source_name=tone frequency=1000",
         "-L", "module-loopback source=tone sink=vsink", "-L", "module-always-sink"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = {"PULSE_SERVER": f"unix:{sock}"}
    try:
        wait_for(lambda: subprocess.run(
            ["pactl", "set-default-source", "vsink.monitor"], env={**env, **client},
            capture_output=True).returncode == 0, 10, "PulseAudio to answer")
        monkeypatch.setenv("PULSE_SERVER", client["PULSE_SERVER"])
        yield process.pid
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait()


def test_microphone_of_a_frozen_sound_server_restarts_within_bounds(frozen_pulse: int) -> None:
    """The sound server freezes: the microphone says stalled; PortAudio's close then waits
    on the frozen server, so captures are left behind, but never more than MAX_ABANDONED;
    when the server thaws the microphone is ok again and stop() is quick."""
    source = PyAudioMicrophone(AudioConfig(backend="pyaudio"))
    packets = _collect(source)
    try:
        wait_for(lambda: source.health.state == "ok" and len(packets) > 20, 15, "audio")
        os.kill(frozen_pulse, signal.SIGSTOP)
        frozen = time.monotonic()
        wait_for(lambda: source.health.detail.startswith("stalled"), NOTICE_S, "the stall")
        assert time.monotonic() - frozen < NOTICE_S
        assert source.restarts == 1
        wait_for(lambda: source.abandoned >= 1, STOP_BOUND_S + 1.5, "a hung close left")
        wait_for(lambda: "captures hang" in source.health.detail,
                 MAX_ABANDONED * (STALL_S + STOP_BOUND_S + 1.5), "status to say so")
        time.sleep(STALL_S + 1)
        assert source.abandoned == MAX_ABANDONED  # bounded: no more threads, no more devices
        hung = [t for t in threading.enumerate() if t.name == "audio-abandoned"]
        assert len(hung) <= MAX_ABANDONED
        os.kill(frozen_pulse, signal.SIGCONT)
        count = len(packets)
        wait_for(lambda: source.health.state == "ok" and len(packets) > count + 20,
                 RETRY_MAX_S + 5, "audio again")
        # Those left behind returned once the server thawed, and closed their own streams
        # (an unclosed PortAudio stream deadlocks in its finalizer once the server is gone).
        wait_for(lambda: not [t for t in threading.enumerate() if t.name == "audio-abandoned"],
                 5, "the captures left behind to end")
    finally:
        os.kill(frozen_pulse, signal.SIGCONT)
        started = time.monotonic()
        source.stop()
        assert time.monotonic() - started < STOP_BOUND_S + 1.5
