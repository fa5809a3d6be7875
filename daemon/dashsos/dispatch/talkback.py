"""The audio the desk sends to the car: an operator's voice, silence until one talks.

The track paces itself on the monotonic clock and restamps whatever it forwards, so
switching from one operator's microphone to another, or to silence, never makes a jump
the car's decoder would have to guess about. Every frame leaves as s16 stereo 48 kHz
(what aiortc's Opus decoder produces): aiortc's encoder sets its resampler up from the
first frame and refuses any other format afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import time

import av
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from av import AudioFrame

SAMPLE_RATE = 48000
LAYOUT = "stereo"
FRAME_SAMPLES = 960  # 20 ms, Opus's usual packet
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
# Frames waiting to be sent; beyond this the oldest go, so a stalled car never hears
# an operator with growing delay.
BACKLOG = 5


def silence(samples: int = FRAME_SAMPLES) -> AudioFrame:
    frame = AudioFrame(format="s16", layout=LAYOUT, samples=samples)
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    frame.sample_rate = SAMPLE_RATE
    frame.time_base = TIME_BASE
    return frame


class SilenceTrack(AudioStreamTrack):
    """Silent 20 ms frames, s16 stereo 48 kHz, paced in real time."""

    def __init__(self) -> None:
        super().__init__()
        self._began: float | None = None
        self._pts = 0

    async def _pace(self, samples: int) -> int:
        """Wait until the frame after one of `samples` is due; return its pts."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._began is None:
            self._began = time.monotonic()
        else:
            self._pts += samples
            await asyncio.sleep(self._began + self._pts / SAMPLE_RATE - time.monotonic())
        return self._pts

    async def recv(self) -> AudioFrame:
        frame = silence()
        frame.pts = await self._pace(FRAME_SAMPLES)
        return frame


class TalkbackTrack(SilenceTrack):
    """Forwards the frames pushed by the operator who has the floor; silence between."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: collections.deque[AudioFrame] = collections.deque(maxlen=BACKLOG)
        self._resamplers: dict[tuple[str, str, int], av.AudioResampler] = {}
        self._last_samples = FRAME_SAMPLES
        self.forwarded = 0  # frames of operator audio sent on

    def push(self, frame: AudioFrame) -> None:
        """Queue one frame of an operator's microphone."""
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key == ("s16", LAYOUT, SAMPLE_RATE):
            self._queue.append(frame)
            return
        if key not in self._resamplers:
            self._resamplers[key] = av.AudioResampler(format="s16", layout=LAYOUT,
                                                      rate=SAMPLE_RATE)
        self._queue.extend(f for f in self._resamplers[key].resample(frame) if f.samples)

    async def recv(self) -> AudioFrame:
        # The previous frame's length decides when this one is due.
        pts = await self._pace(self._last_samples)
        if self._queue:
            frame = self._queue.popleft()
            self.forwarded += 1
        else:
            frame = silence()
        frame.pts = pts
        frame.time_base = TIME_BASE
        self._last_samples = frame.samples
        return frame
