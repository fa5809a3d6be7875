"""H.264 encoding with libx264 through PyAV, shaped for WebRTC and for clips.

Constrained Baseline, Annex-B, SPS/PPS repeated on every keyframe (no global header),
a keyframe at least every `keyframe_interval` and one on request. aiortc ignores the
dispatcher's keyframe requests for pre-encoded video, so the encoder must do this itself.
"""

from __future__ import annotations

import threading
from fractions import Fraction
from typing import Any

import av
import av.video.frame

from dashsos.clock import NS
from dashsos.media.packet import Packet

_I = av.video.frame.PictureType.I
_AUTO = av.video.frame.PictureType.NONE


class H264Encoder:
    def __init__(self, width: int, height: int, fps: int, bitrate: int,
                 keyframe_interval: float, preset: str = "veryfast") -> None:
        gop = max(1, round(fps * keyframe_interval))
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base = Fraction(1, fps)
        ctx.framerate = Fraction(fps, 1)
        ctx.bit_rate = bitrate
        ctx.gop_size = gop
        ctx.options = {
            "preset": preset,
            "tune": "zerolatency",  # no lookahead: a frame out per frame in, for the call
            "profile": "baseline",  # x264's baseline is Constrained Baseline
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:repeat-headers=1"
                           f":forced-idr=1:vbv-maxrate={bitrate // 1000}"
                           f":vbv-bufsize={bitrate // 1000}",
        }
        self._ctx = ctx
        self._duration_ns = NS // fps
        self._frame_index = 0
        self._capture_by_pts: dict[int, int] = {}
        self._keyframe_wanted = threading.Event()

    def request_keyframe(self) -> None:
        self._keyframe_wanted.set()

    def encode(self, frame: av.VideoFrame, capture_ns: int) -> list[Packet]:
        if frame.format.name != "yuv420p" or frame.width != self._ctx.width \
                or frame.height != self._ctx.height:
            frame = frame.reformat(self._ctx.width, self._ctx.height, "yuv420p")
        frame.pts = self._frame_index
        frame.time_base = self._ctx.time_base
        # Decoders mark every raw frame I; only a request may force one.
        forced = self._keyframe_wanted.is_set()
        if forced:
            self._keyframe_wanted.clear()
        frame.pict_type = _I if forced else _AUTO
        self._capture_by_pts[self._frame_index] = capture_ns
        self._frame_index += 1
        return self._packets(self._ctx.encode(frame))

    def flush(self) -> list[Packet]:
        return self._packets(self._ctx.encode(None))

    def _packets(self, encoded: list[av.Packet[Any]]) -> list[Packet]:
        out = []
        for p in encoded:
            pts = int(p.pts) if p.pts is not None else self._frame_index - 1
            capture_ns = self._capture_by_pts.pop(pts, None)
            if capture_ns is None:
                continue
            out.append(Packet("video", "h264", bytes(p), pts, self._ctx.time_base, capture_ns,
                              self._duration_ns, bool(p.is_keyframe)))
        return out
