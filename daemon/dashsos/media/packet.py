"""The one type every captured media unit travels as."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True, slots=True)
class Packet:
    """An encoded video access unit or a chunk of PCM audio.

    `pts` counts `time_base` units as the encoder numbered them; `capture_ns` is when it
    was captured, on dashsos.clock's monotonic clock: clips and calls align on that.
    """

    stream: str  # "video" or "audio"
    codec: str  # "h264" (Annex-B) or "pcm_s16le" (mono)
    data: bytes
    pts: int
    time_base: Fraction
    capture_ns: int
    duration_ns: int
    keyframe: bool

    @property
    def end_ns(self) -> int:
        return self.capture_ns + self.duration_ns


@dataclass(frozen=True, slots=True)
class VideoFormat:
    width: int
    height: int
    fps: int


@dataclass(frozen=True, slots=True)
class AudioFormat:
    sample_rate: int
    channels: int = 1
