"""The car's tracks: the camera's own H.264 packets and the microphone's PCM as Opus, fed
from the packet bus. Video is never encoded again: aiortc packetizes the av.Packet it is given."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from dashsos.clock import NS
from dashsos.media.packet import Packet

VIDEO_TIME_BASE = Fraction(1, 90000)
QUEUE_PACKETS = 120  # about 4 s of video: beyond that the link is gone, drop the oldest
OPUS_BITRATE = 32_000  # mono speech: clear at this rate (Opus's wideband voice range)


class _BusTrack(MediaStreamTrack):
    """A track whose media arrives as dashsos Packets from the bus."""

    stream = ""

    def __init__(self) -> None:
        super().__init__()
        self._queue: asyncio.Queue[Packet] = asyncio.Queue(QUEUE_PACKETS)
        self.dropped = 0

    def feed(self, packet: Packet) -> None:
        """Bus subscriber (runs on the loop)."""
        if packet.stream != self.stream or self.readyState != "live":
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(packet)

    async def _next(self) -> Packet:
        if self.readyState != "live":
            raise MediaStreamError
        return await self._queue.get()

    def _keep_latest(self, keep: Callable[[list[Packet]], int]) -> None:
        """Drop what queued up while the call was connecting (aiortc asks for the first
        packet only once the media path is up): sent at once, seconds of it would
        burst into a slow link and put the call that far behind for good. `keep`
        returns the index of the first packet to keep."""
        queued: list[Packet] = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
        start = keep(queued)
        self.dropped += start
        for packet in queued[start:]:
            self._queue.put_nowait(packet)


class PassthroughVideoTrack(_BusTrack):
    kind = "video"
    stream = "video"

    def __init__(self, request_keyframe: Callable[[], None]) -> None:
        super().__init__()
        self._request_keyframe = request_keyframe
        self._start_ns: int | None = None
        self._last_pts = -1
        self.packets = 0

    async def recv(self) -> av.Packet[Any]:
        if self._start_ns is None:
            self._request_keyframe()  # the dispatcher can decode from the first frame
            # From the newest queued keyframe on (none: wait for the one requested).
            self._keep_latest(lambda queued: next(
                (i for i in range(len(queued) - 1, -1, -1) if queued[i].keyframe),
                len(queued)))
        while True:
            packet = await self._next()
            if self._start_ns is None:
                if not packet.keyframe:
                    continue
                self._start_ns = packet.capture_ns
            if self._queue.qsize() > 30 and not packet.keyframe:
                continue  # a second behind: skip to the next keyframe to catch up
            break
        pts = max(self._last_pts + 1, (packet.capture_ns - self._start_ns) * 90000 // NS)
        self._last_pts = pts
        out = av.Packet(packet.data)
        out.pts = out.dts = pts
        out.time_base = VIDEO_TIME_BASE
        out.is_keyframe = packet.keyframe
        self.packets += 1
        return out


class MicrophoneTrack(_BusTrack):
    """The microphone as Opus packets, encoded here rather than by aiortc: mono voice at
    OPUS_BITRATE instead of aiortc's 96 kb/s stereo (a third of the audio's share of a
    mobile link), and no per-sample Python loop (aiortc computes an audio level in pure
    Python for every raw frame it encodes; pre-encoded packets skip that)."""

    kind = "audio"
    stream = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._encoder: Any = None
        self._resampler: Any = None
        self._ready: list[av.Packet[Any]] = []
        self._samples = 0  # samples sent: the packets' timestamps

    async def recv(self) -> av.Packet[Any]:
        if self._encoder is None:
            self._keep_latest(lambda queued: max(0, len(queued) - 2))  # start live
        while not self._ready:
            self._encode(await self._next())
        return self._ready.pop(0)

    def _encode(self, packet: Packet) -> None:
        rate = packet.time_base.denominator
        if self._encoder is None or self._encoder.sample_rate != rate:
            self._encoder = opus_encoder(rate)
            # Opus takes whole frames (20 ms); the microphone's chunks may differ.
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate,
                                                frame_size=self._encoder.frame_size)
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(packet.data) // 2)
        frame.planes[0].update(packet.data)
        frame.sample_rate = rate
        for whole in self._resampler.resample(frame):
            for encoded in self._encoder.encode(whole):
                # Own timestamps: the encoder's start negative (its look-ahead).
                encoded.pts = encoded.dts = self._samples
                encoded.time_base = Fraction(1, rate)
                self._samples += self._encoder.frame_size
                self._ready.append(encoded)


def opus_encoder(rate: int) -> Any:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = rate
    encoder.format = "s16"
    encoder.layout = "mono"
    encoder.bit_rate = OPUS_BITRATE
    encoder.time_base = Fraction(1, rate)
    encoder.options = {"application": "voip"}
    encoder.open()
    return encoder
