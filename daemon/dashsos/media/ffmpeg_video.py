"""Video through PyAV: any FFmpeg input (V4L2 camera, RTSP camera, file) or a test pattern.

Suitable H.264 input (Baseline, as many IP cameras send) is copied; anything else is
decoded and encoded once with libx264. The `test` backend is FFmpeg's lavfi testsrc2
with the wall clock drawn on it, paced to real time, and reported as simulated.

A stalled input must not hold the capture thread (issue 9); how each kind is interrupted:
- network inputs (RTSP, HTTP, TCP/UDP): PyAV's timeout, STALL_S, for the open and each
  read. FFmpeg's network protocols wait in short polls and ask PyAV's interrupt
  callback between them.
- a FIFO: FFmpeg's file protocol blocks in read(2), where that callback is never asked
  (measured with av 18: a stopped writer held a read for as long as it was stopped). So
  dashsos reads the FIFO itself, with poll(2), and gives up when the capture is halted.
- V4L2: opened non-blocking, so a camera that sends no frame cannot hold the thread in
  VIDIOC_DQBUF; "no frame yet" is waited out in short sleeps while not halted.
"""

from __future__ import annotations

import os
import select
import stat
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import av.error

from dashsos import clock
from dashsos.clock import NS
from dashsos.config import VideoConfig
from dashsos.health import State
from dashsos.media import h264
from dashsos.media.encoder import H264Encoder
from dashsos.media.overlay import ClockOverlay
from dashsos.media.packet import Packet, VideoFormat
from dashsos.media.source import STALL_S, Interrupted, Stalled, VideoSource

_COPYABLE_PROFILES = {"Baseline", "Constrained Baseline"}
POLL_MS = 250  # a halted FIFO read returns within this
NO_FRAME_YET_S = 0.01  # a non-blocking device with no frame: look again after this


class FFmpegVideoSource(VideoSource):
    def __init__(self, config: VideoConfig, *, test_pattern: bool = False) -> None:
        super().__init__("test" if test_pattern else "ffmpeg")
        self.config = config
        self.format = VideoFormat(config.width, config.height, config.fps)
        self._test = test_pattern
        self._encoder: H264Encoder | None = None  # the running attempt's, for keyframes
        self._overlay = ClockOverlay(config.height) if test_pattern else None
        self._keyframe_wanted = False
        # A FIFO's read end held for the source's lifetime: a writer that outlives one of
        # our restarts must not die of EPIPE in the moment no reader is open.
        self._fifo_keeper: int | None = None

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
        if c.input.startswith("/dev/video") or c.input_format == "v4l2":
            options.setdefault("video_size", f"{c.width}x{c.height}")
            options.setdefault("framerate", str(c.fps))
            options.setdefault("fflags", "+nonblock")  # see _packets
        target: Any = c.input
        if _is_fifo(c.input):
            with self._lock:
                if self._fifo_keeper is None:
                    self._fifo_keeper = os.open(c.input, os.O_RDONLY | os.O_NONBLOCK)
            target = self._held.pipe = _PipeReader(c.input, self._halt)
        try:
            # Each wait on a network input (connecting, reading the stream's parameters,
            # each read) gives up after STALL_S by itself: a stalled camera's capture
            # ends before the supervisor would have to abandon it.
            return av.open(target, format=c.input_format or None, options=options,
                           timeout=STALL_S)
        except av.error.ExitError as exc:
            raise Stalled(f"no answer from {c.input} within {STALL_S:g} s") from exc

    def _paced(self) -> bool:
        """Files and generators run as fast as the CPU allows; pace them like a camera."""
        if self._test or self.config.input_format == "lavfi":
            return True
        path = self.config.input
        return os.path.isfile(path)

    def _capture(self) -> None:
        self._held.container = container = self._open()
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
        encoder = H264Encoder(c.width, c.height, c.fps, c.bitrate, c.keyframe_interval,
                              c.preset)
        if not self._halt.is_set():  # one left behind must not take over keyframe requests
            self._encoder = encoder
        pacer = _Pacer() if self._paced() else None
        period = 1.0 / c.fps
        frames = (f for p in self._packets(container, stream) for f in p.decode())
        for n, frame in enumerate(frames):
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
        for packet in self._packets(container, stream):
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

    def _packets(self, container: Any, stream: Any) -> Iterator[Any]:
        """The input's packets until it ends or the capture is halted."""
        halt = self._halt
        while True:
            try:
                for packet in container.demux(stream):
                    if halt.is_set():
                        raise Interrupted
                    yield packet
                return
            except av.error.BlockingIOError:  # a non-blocking device (V4L2): no frame yet
                if halt.wait(NO_FRAME_YET_S):
                    raise Interrupted from None
            except av.error.ExitError as exc:  # PyAV's read timeout: nothing for STALL_S
                if halt.is_set():
                    raise Interrupted from None
                raise Stalled(f"no data for {STALL_S:g} s") from exc

    def _close(self) -> None:
        held = self._held
        container, pipe = getattr(held, "container", None), getattr(held, "pipe", None)
        held.container = held.pipe = None
        if container is not None:
            try:
                container.close()
            except Exception:  # closing a vanished device may fail; it is gone either way
                pass
        if pipe is not None:
            pipe.close()

    def stop(self) -> None:
        super().stop()
        with self._lock:
            keeper, self._fifo_keeper = self._fifo_keeper, None
        if keeper is not None:
            os.close(keeper)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


class _PipeReader:
    """A FIFO as a file object for PyAV: each read waits in poll(2), a slice at a time, and
    raises Interrupted once the capture is halted, so a stopped writer cannot hold it.
    Opened non-blocking, it never hangs in open(2) waiting for a writer either."""

    def __init__(self, path: str, halt: threading.Event) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._halt = halt

    def read(self, size: int) -> bytes:
        while not self._halt.is_set():
            if self._poll.poll(POLL_MS):  # data, or the writer went away (POLLHUP)
                try:
                    return os.read(self._fd, size)  # b"" once the writer is gone: the end
                except BlockingIOError:
                    continue
        raise Interrupted("capture halted")

    def close(self) -> None:
        os.close(self._fd)


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
