"""Video through PyAV: any FFmpeg input (V4L2 camera, RTSP camera, file) or a test pattern.

Suitable H.264 input (Baseline, as many IP cameras send) is copied; anything else is
decoded and encoded once with libx264. The `test` backend is FFmpeg's lavfi testsrc2
with the wall clock drawn on it, paced to real time, and reported as simulated.
"""

from __future__ import annotations

import os
import time
from fractions import Fraction
from typing import Any

import av

from dashsos import clock
from dashsos.clock import NS
from dashsos.config import VideoConfig
from dashsos.health import State
from dashsos.media import h264
from dashsos.media.encoder import H264Encoder
from dashsos.media.overlay import ClockOverlay
from dashsos.media.packet import Packet, VideoFormat
from dashsos.media.source import VideoSource

_COPYABLE_PROFILES = {"Baseline", "Constrained Baseline"}


class FFmpegVideoSource(VideoSource):
    def __init__(self, config: VideoConfig, *, test_pattern: bool = False) -> None:
        super().__init__("test" if test_pattern else "ffmpeg")
        self.config = config
        self.format = VideoFormat(config.width, config.height, config.fps)
        self._test = test_pattern
        self._container: Any = None
        self._encoder: H264Encoder | None = None
        self._overlay = ClockOverlay(config.height) if test_pattern else None
        self._keyframe_wanted = False

    @property
    def simulated(self) -> bool:
        return self._test

    def describe(self) -> str:
        return "lavfi testsrc2 (simulated)" if self._test else self.config.input

    def request_keyframe(self) -> None:
        self._keyframe_wanted = True
        if self._encoder:
            self._encoder.request_keyframe()

    def _open(self) -> Any:
        c = self.config
        if self._test:
            spec = f"testsrc2=size={c.width}x{c.height}:rate={c.fps}"
            return av.open(spec, format="lavfi")
        options = dict(c.input_options)
        if c.input.startswith("/dev/video"):
            options.setdefault("video_size", f"{c.width}x{c.height}")
            options.setdefault("framerate", str(c.fps))
        return av.open(c.input, format=c.input_format or None, options=options, timeout=5.0)

    def _paced(self) -> bool:
        """Files and generators run as fast as the CPU allows; pace them like a camera."""
        if self._test or self.config.input_format == "lavfi":
            return True
        path = self.config.input
        return os.path.isfile(path)

    def _capture(self) -> None:
        self._container = container = self._open()
        stream = container.streams.video[0]
        copy = (not self._test and self.config.transcode == "auto"
                and stream.codec_context.name == "h264"
                and stream.codec_context.profile in _COPYABLE_PROFILES)
        self.log.info("%s: opened %s (%s %s), %s", self.health.backend, self.describe(),
                      stream.codec_context.name, stream.codec_context.profile or "",
                      "copying H.264" if copy else "encoding with libx264")
        if copy:
            self._copy(container, stream)
        else:
            self._transcode(container, stream)

    def _transcode(self, container: Any, stream: Any) -> None:
        c = self.config
        self._encoder = encoder = H264Encoder(c.width, c.height, c.fps, c.bitrate,
                                              c.keyframe_interval, c.preset)
        pacer = _Pacer() if self._paced() else None
        period = 1.0 / c.fps
        for n, frame in enumerate(container.decode(stream)):
            if self._stop.is_set():
                return
            if pacer:
                pacer.wait(frame.time if frame.time is not None else n * period)
            capture_ns = clock.now_ns()
            if self._overlay is not None:
                if frame.format.name != "yuv420p":
                    frame = frame.reformat(format="yuv420p")
                self._overlay.draw(frame, clock.to_datetime(capture_ns).strftime(
                    "%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC")
            for packet in encoder.encode(frame, capture_ns):
                self._set(State.OK, f"{c.width}x{c.height}@{c.fps} H.264")
                self._deliver(packet)

    def _copy(self, container: Any, stream: Any) -> None:
        fps = int(stream.average_rate or self.config.fps)
        duration_ns = NS // max(1, fps)
        parameter_sets = b""
        to_annexb = None
        extradata = stream.codec_context.extradata or b""
        if extradata[:1] == b"\x01":  # avcC (MP4/MKV): convert to Annex-B
            to_annexb = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", stream)
        pacer = _Pacer() if self._paced() else None
        for packet in container.demux(stream):
            if self._stop.is_set():
                return
            if pacer and packet.pts is not None and packet.time_base:
                pacer.wait(float(packet.pts * packet.time_base))
            for p in to_annexb.filter(packet) if to_annexb else [packet]:
                data = bytes(p)
                if not data:
                    continue
                keyframe = h264.is_keyframe(data)
                if keyframe:
                    if h264.has_parameter_sets(data):
                        parameter_sets = h264.parameter_sets(data)
                    elif parameter_sets:
                        data = parameter_sets + data  # every keyframe must start a stream
                self._deliver(Packet("video", "h264", data, int(p.pts or 0),
                                     Fraction(p.time_base or Fraction(1, 90000)),
                                     clock.now_ns(), duration_ns, keyframe))
                self._set(State.OK, f"copying H.264 from {self.config.input}")

    def _close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # closing a vanished device may fail; it is gone either way
                pass


class _Pacer:
    """Releases media at the pace its timestamps say, like a camera would."""

    def __init__(self) -> None:
        self._origin: float | None = None

    def wait(self, media_seconds: float) -> None:
        now = time.monotonic()
        if self._origin is None:
            self._origin = now - media_seconds
        delay = self._origin + media_seconds - now
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:  # fell far behind (suspend, overload, a jump): do not burst
            self._origin = now - media_seconds
