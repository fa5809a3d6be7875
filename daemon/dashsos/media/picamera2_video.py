"""The Raspberry Pi camera through picamera2, whose hardware encoder makes the H.264.

picamera2 exists only on a Pi, so it is imported when this backend starts. Its encoder
thread calls `outputframe()` on our Output; we stamp each frame on dashsos's clock and
hand it on. Contract-tested off the Pi with a stand-in module of the same signatures.
"""

from __future__ import annotations

import importlib
from fractions import Fraction
from typing import Any

from dashsos import clock
from dashsos.clock import NS
from dashsos.config import VideoConfig
from dashsos.health import State
from dashsos.media import h264
from dashsos.media.packet import Packet, VideoFormat
from dashsos.media.source import VideoSource

_MICROSECONDS = Fraction(1, 1_000_000)


def available() -> bool:
    """True when picamera2 imports and sees a camera."""
    try:
        picamera2 = importlib.import_module("picamera2")
        return bool(picamera2.Picamera2.global_camera_info())
    except Exception:  # ImportError off a Pi, or libcamera failing: not available
        return False


class Picamera2VideoSource(VideoSource):
    def __init__(self, config: VideoConfig) -> None:
        super().__init__("picamera2")
        self.config = config
        self.format = VideoFormat(config.width, config.height, config.fps)
        self._encoder: Any = None  # the running attempt's, for keyframe requests

    def describe(self) -> str:
        return "Raspberry Pi camera (picamera2, hardware H.264)"

    def request_keyframe(self) -> None:
        encoder = self._encoder
        if encoder is not None and hasattr(encoder, "force_key_frame"):
            encoder.force_key_frame()

    def _capture(self) -> None:
        picamera2 = importlib.import_module("picamera2")
        encoders = importlib.import_module("picamera2.encoders")
        outputs = importlib.import_module("picamera2.outputs")
        c = self.config
        source = self
        halt = self._halt

        class PacketOutput(outputs.Output):  # type: ignore[misc, name-defined]
            """Receives the encoder's frames on picamera2's encoder thread."""

            first_timestamp_us: int | None = None  # this camera's, for packet timestamps

            def outputframe(self, frame: bytes, keyframe: bool = True,
                            timestamp: int | None = None, packet: Any = None,
                            audio: bool = False) -> None:
                # A halted attempt's camera (closing, or left behind) delivers nothing.
                if not audio and not halt.is_set():
                    source._on_frame(self, bytes(frame), timestamp)

        self._held.camera = camera = picamera2.Picamera2()
        camera.configure(camera.create_video_configuration(
            main={"size": (c.width, c.height), "format": "YUV420"},
            controls={"FrameRate": c.fps}))
        # repeat: SPS/PPS before every keyframe; iperiod: frames between keyframes.
        encoder = encoders.H264Encoder(
            bitrate=c.bitrate, repeat=True, iperiod=max(1, round(c.fps * c.keyframe_interval)),
            profile="baseline")
        output = PacketOutput()
        camera.start_recording(encoder, output)
        if not halt.is_set():  # one left behind must not take over keyframe requests
            self._encoder = encoder
        self.log.info("picamera2: recording %dx%d@%d", c.width, c.height, c.fps)
        # picamera2 runs its own threads; wait here until halted (stop, or a stall the
        # supervisor noticed: an encoder that hangs delivers nothing and raises nothing).
        while not halt.wait(1.0):
            if self.health.state == State.DOWN and output.first_timestamp_us is not None:
                raise RuntimeError(self.health.detail)

    def _on_frame(self, output: Any, frame: bytes, timestamp_us: int | None) -> None:
        capture_ns = clock.now_ns()
        if timestamp_us is None:
            timestamp_us = capture_ns // 1000
        if output.first_timestamp_us is None:
            output.first_timestamp_us = timestamp_us
        keyframe = h264.is_keyframe(frame)  # the bitstream is the truth a clip relies on
        self._deliver(Packet("video", "h264", frame, timestamp_us - output.first_timestamp_us,
                             _MICROSECONDS, capture_ns, NS // self.config.fps, keyframe))
        self._set(State.OK, "hardware H.264")

    def _close(self) -> None:
        camera = getattr(self._held, "camera", None)
        self._held.camera = None
        if camera is None:
            return
        # Joins picamera2's encoder thread: no frame arrives after this. A camera that
        # fails to stop is still closed, so that it can be opened again. If stopping
        # hangs, this attempt is abandoned and a new Picamera2 is opened meanwhile.
        for step in (camera.stop_recording, camera.close):
            try:
                step()
            except Exception as exc:  # a camera that vanished fails to stop; it is gone
                self.log.debug("picamera2: %s failed: %s", step.__name__, exc)
