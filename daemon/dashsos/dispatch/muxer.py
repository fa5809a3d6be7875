"""The desk's recording of a call's media: the car's H.264 and Opus as they arrived,
muxed into fragmented MP4 without decoding or encoding anything.

The file starts at the first video keyframe (an MP4 declares its H.264 parameter sets up
front; a call without video starts with its first audio); a fragment ends at every
keyframe and at least once a second, so a crash of the desk loses about a second.
Each stream's timestamps are the car's RTP timestamps, placed on the file's time line by
the arrival of the stream's first frame. A live call is muxed on its own thread as it
arrives (CopyMuxer); a Janus call, once it ended, in one go (Mp4Writer).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from dashsos.dispatch.encoded import EncodedFrame
from dashsos.media import h264

log = logging.getLogger(__name__)

MP4_OPTIONS = {"movflags": "empty_moov+default_base_moof+frag_keyframe",
               "frag_duration": "1000000", "flush_packets": "1"}
VIDEO_WAIT_S = 3.0  # audio this long without a video keyframe: record audio alone
REANCHOR_S = 10.0  # a stream's timestamps this far from its arrival times are re-anchored
MAX_BACKLOG = 6000  # frames queued for the thread (about a minute): beyond, the disk stalls
CLOSE_TIMEOUT_S = 30.0  # the backlog's worst case on a slow card, with room to spare


class CopyMuxer:
    """An `Mp4Writer` on its own thread, fed from the event loop as frames arrive."""

    def __init__(self, path: Path, kinds: list[str],
                 on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.error: str | None = None
        self._on_error = on_error  # told at once, from whichever thread noticed
        self._writer = Mp4Writer(path, kinds)
        self._queue: queue.Queue[EncodedFrame | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"mux-{path.parent.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def frames(self) -> dict[str, int]:
        """Frames written so far, per kind."""
        return self._writer.frames

    def put(self, frame: EncodedFrame) -> None:
        """From the event loop: queue one frame for the file."""
        if self.error is not None:
            return
        if self._queue.qsize() >= MAX_BACKLOG:
            self._failed(f"the recording fell {MAX_BACKLOG} frames behind (disk too slow)")
            return
        self._queue.put(frame)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued and finish the file (blocks: call it off the loop)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive() and self.error is None:
            # The file is still being written: whoever reads it now must be told.
            self._failed(f"{self.path.name} still being written after {timeout:g} s")

    def _run(self) -> None:
        try:
            while (frame := self._queue.get()) is not None:
                self._writer.take(frame)
            self._writer.finish()
        except Exception as exc:  # reported with the call; the call goes on
            if not isinstance(exc, OSError):  # not the disk: a bug, with its traceback
                log.exception("%s", self.path)
            self._failed(f"cannot write {self.path}: {type(exc).__name__}: {exc}")

    def _failed(self, error: str) -> None:
        self.error = error
        log.error("%s: %s", self.path.parent.name, error)
        if self._on_error is not None:
            self._on_error(error)


class Mp4Writer:
    """The file itself: frames in arrival order, written by one thread (blocking)."""

    def __init__(self, path: Path, kinds: list[str]) -> None:
        self.path = path
        self.kinds = kinds  # what the call carries: "video", "audio"
        self.frames = {kind: 0 for kind in kinds}  # written, per kind
        self.skipped = 0  # frames with nothing in them
        self._pending: list[EncodedFrame] = []
        self._container: Any = None
        self._streams: dict[str, Any] = {}
        self._origin: float | None = None  # arrival time of the file's first frame
        self._first: dict[str, tuple[float, int]] = {}  # kind: (its first arrival, ts)
        self._last_pts: dict[str, int] = {}

    def take(self, frame: EncodedFrame) -> None:
        if self._container is not None:
            self._write(frame)
            return
        self._pending.append(frame)
        keyframe = next((f for f in self._pending if f.kind == "video" and f.keyframe), None)
        waited = self._pending[-1].arrival - self._pending[0].arrival
        if keyframe is not None or "video" not in self.kinds or waited > VIDEO_WAIT_S:
            if keyframe is None and "video" in self.kinds:
                log.warning("%s: no video keyframe in %g s: recording audio alone",
                            self.path, VIDEO_WAIT_S)
            self._open(keyframe)
            pending, self._pending = self._pending, []
            for early in pending:
                self._write(early)

    def _open(self, keyframe: EncodedFrame | None) -> None:
        self._container = av.open(str(self.path), "w", format="mp4", options=MP4_OPTIONS)
        if keyframe is not None:
            width, height = _dimensions(keyframe.data)
            stream = self._container.add_stream("h264")
            stream.width, stream.height = width, height
            stream.time_base = Fraction(1, keyframe.clock_rate)
            # Annex-B SPS/PPS as extradata: the muxer builds avcC from it and converts
            # every frame to length-prefixed NAL units itself (no re-encoding).
            stream.codec_context.extradata = h264.parameter_sets(keyframe.data)
            self._streams["video"] = stream
            self._origin = keyframe.arrival
        if "audio" in self.kinds:
            stream = self._container.add_stream("libopus", rate=48000, layout="stereo")
            stream.time_base = Fraction(1, 48000)
            self._streams["audio"] = stream
        if self._origin is None and self._pending:
            self._origin = self._pending[0].arrival

    def _write(self, frame: EncodedFrame) -> None:
        if not frame.data or frame.kind == "video" and not any(h264.nal_units(frame.data)):
            # Nothing a sample can hold (a frame the car's network cut to pieces): muxed,
            # it is a 0-byte sample, and FFmpeg's demuxer then rejects the whole file.
            self.skipped += 1
            return
        stream = self._streams.get(frame.kind)
        assert self._origin is not None
        if stream is None or frame.arrival < self._origin:
            return  # before the first picture: the file starts there
        if frame.kind not in self._first:
            if frame.kind == "video" and not frame.keyframe:
                return
            self._first[frame.kind] = (frame.arrival, frame.timestamp)
        arrival, first_ts = self._first[frame.kind]
        pts = round((arrival - self._origin) * frame.clock_rate) + frame.timestamp - first_ts
        # A sender's clock that jumps (restarted, or wrong) must not move a stream far
        # from when its frames arrived: re-anchor it there.
        expected = round((frame.arrival - self._origin) * frame.clock_rate)
        if abs(pts - expected) > REANCHOR_S * frame.clock_rate:
            log.warning("%s: %s timestamps jumped %.1f s from arrival time; re-anchored",
                        self.path, frame.kind, (pts - expected) / frame.clock_rate)
            self._first[frame.kind] = (frame.arrival, frame.timestamp)
            pts = expected
        pts = max(pts, self._last_pts.get(frame.kind, -1) + 1)
        packet = av.Packet(frame.data)
        packet.pts = packet.dts = pts
        packet.time_base = stream.time_base
        packet.is_keyframe = frame.keyframe
        packet.stream = stream
        self._container.mux(packet)
        self._last_pts[frame.kind] = pts
        self.frames[frame.kind] += 1

    def finish(self) -> None:
        """Write what waits for a keyframe (none came: the audio alone) and close."""
        if self._container is None and self._pending:
            self._open(None)
            pending, self._pending = self._pending, []
            for early in pending:
                self._write(early)
        if self._container is not None:
            self._container.close()
            self._container = None


def _dimensions(keyframe: bytes) -> tuple[int, int]:
    """Width and height from the keyframe's SPS, by decoding that one picture."""
    decoder = av.CodecContext.create("h264", "r")
    frames = list(decoder.decode(av.Packet(keyframe)))
    frames += list(decoder.decode(None))
    if not frames:
        raise ValueError("the first keyframe does not decode: no picture size")
    return frames[0].width, frames[0].height
