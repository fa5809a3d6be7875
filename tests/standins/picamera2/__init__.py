"""A stand-in for picamera2 with the signatures of picamera2 0.3.x, for contract tests.

It cannot be the real thing (libcamera needs a Pi), so it does what the real one does
at the boundary dashsos uses: `start_recording(encoder, output)` makes the encoder call
`output.outputframe(frame, keyframe, timestamp)` from a thread of its own, with real
H.264 (libx264 here, the V4L2 hardware encoder on a Pi), a keyframe every `iperiod`
frames, SPS/PPS repeated when `repeat` is set, and `force_key_frame()` honoured.

Like libcamera, a camera is held from `Picamera2()` until `close()`: opening it again
meanwhile fails as picamera2 does. `faults` lets a test make the encoder hang (it stops
delivering, with no error) and make `stop()` hang; `events` records the calls made.
"""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from typing import Any

import av
import av.video.frame

from picamera2.encoders import H264Encoder
from picamera2.outputs import Output

recordings: list[dict[str, Any]] = []  # what the code under test asked for
events: list[str] = []  # open, busy, start_recording, stop, close: in the order called
HANG_POLL_S = 0.01


class Faults:
    """What every camera, current and new, does wrong while a switch is set."""

    def __init__(self) -> None:
        self.encoder_hangs = threading.Event()  # no frame comes out, and no error
        self.stop_hangs = threading.Event()  # stop() (so stop_recording, close) blocks

    def clear(self) -> None:
        self.encoder_hangs.clear()
        self.stop_hangs.clear()


faults = Faults()
_held: set[int] = set()  # camera numbers an open Picamera2 holds
_held_lock = threading.Lock()


class Picamera2:
    def __init__(self, camera_num: int = 0) -> None:
        with _held_lock:
            if camera_num in _held:  # libcamera: "Failed to acquire camera: Device or
                events.append("busy")  # resource busy", which picamera2 wraps so
                raise RuntimeError("Camera __init__ sequence did not complete.")
            _held.add(camera_num)
        events.append("open")
        self.camera_idx = camera_num
        self.is_open = True
        self.started = False
        self.config: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        return [{"Model": "imx708", "Location": 2, "Rotation": 180, "Id": "standin", "Num": 0}]

    def create_video_configuration(self, main: dict[str, Any] | None = None,
                                   lores: dict[str, Any] | None = None, raw: Any = None,
                                   transform: Any = None, colour_space: Any = None,
                                   buffer_count: int = 6, controls: dict[str, Any] | None = None,
                                   display: str = "main", encode: str = "main",
                                   queue: bool = True, sensor: Any = None,
                                   use_case: str = "video") -> dict[str, Any]:
        return {"main": {"size": (640, 480), "format": "XBGR8888", **(main or {})},
                "controls": {"FrameRate": 30, **(controls or {})}, "encode": encode}

    def configure(self, camera_config: Any = None) -> None:
        self.config = camera_config

    def start_recording(self, encoder: H264Encoder, output: Output, pts: Any = None,
                        config: Any = None, quality: Any = None, name: str = "main") -> None:
        assert self.config is not None, "configure() first"
        recordings.append({"config": self.config, "encoder": encoder})
        events.append("start_recording")
        output.start()
        self.started = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._encode, args=(encoder, output),
                                        daemon=True)
        self._thread.start()

    def _encode(self, encoder: H264Encoder, output: Output) -> None:
        assert self.config is not None
        width, height = self.config["main"]["size"]
        fps = int(self.config["controls"]["FrameRate"])
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base = Fraction(1, fps)
        ctx.bit_rate = encoder.bitrate or 1_000_000
        gop = encoder.iperiod or 60
        ctx.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
                       "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"
                                      f":repeat-headers={int(encoder.repeat)}:forced-idr=1"}
        source = av.open(f"testsrc2=size={width}x{height}:rate={fps}", format="lavfi")
        due = time.monotonic()
        for n, frame in enumerate(source.decode(video=0)):
            while faults.encoder_hangs.is_set() and not self._stop.is_set():
                time.sleep(HANG_POLL_S)  # hung: nothing out, nothing raised
                due = time.monotonic()
            if self._stop.is_set():
                break
            time.sleep(max(0.0, due - time.monotonic()))
            due += 1 / fps
            frame.pts = n
            frame.pict_type = (av.video.frame.PictureType.I if encoder._take_key_frame()
                               else av.video.frame.PictureType.NONE)
            for packet in ctx.encode(frame):
                timestamp_us = int(time.monotonic() * 1_000_000)  # the sensor's timestamp
                output.outputframe(bytes(packet), bool(packet.is_keyframe), timestamp_us)
        source.close()

    def stop(self) -> None:
        """Stop the camera (not the encoder)."""
        events.append("stop")
        if self.started:
            while faults.stop_hangs.is_set():
                time.sleep(HANG_POLL_S)
        self.started = False

    def stop_recording(self) -> None:
        self.stop()
        self._stop.set()  # stop_encoder(): join the encoder's thread
        if self._thread:
            self._thread.join(timeout=10)

    def close(self) -> None:
        if not self.is_open:
            return
        self.stop()
        events.append("close")
        self.is_open = False
        with _held_lock:
            _held.discard(self.camera_idx)
