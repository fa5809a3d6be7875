"""The car's media as the car encoded it: nothing is decoded or encoded again at the desk.

aiortc reassembles each received frame (H.264 access unit, Opus packet) in its jitter
buffer and hands it to a decoder thread through a queue the receiver creates. The desk
puts its own queue in that place before the receiver starts, so every reassembled frame
comes to a `Feed` instead: the recording muxes it as it is, the consoles' senders
packetize it again (aiortc sends av.Packets without encoding), and the call counts it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from dashsos.media import h264

log = logging.getLogger(__name__)

# The name aiortc (1.16) gives the receiver's queue to its decoder thread.
_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"
_DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"
CONSOLE_QUEUE = 90  # frames a console's sender may fall behind (3 s of video); then drop


@dataclass(frozen=True)
class EncodedFrame:
    kind: str
    data: bytes
    timestamp: int  # in the codec's clock, counted from the stream's first frame
    clock_rate: int
    arrival: float  # time.monotonic() when it was whole
    keyframe: bool  # video: an IDR picture (a decoder can start here); audio: always


class Feed:
    """One kind of media from one car, fanned out to whoever subscribed."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._subscribers: list[Callable[[EncodedFrame], None]] = []
        self.codec = ""  # mime type of what arrives, once something has

    def subscribe(self, receive: Callable[[EncodedFrame], None]) -> Callable[[], None]:
        self._subscribers.append(receive)
        return lambda: self._subscribers.remove(receive) if receive in self._subscribers \
            else None

    def push(self, frame: EncodedFrame) -> None:
        for receive in list(self._subscribers):
            receive(frame)


class _Bypass(queue.Queue[Any]):
    """Takes the decoder thread's place: frames go to the feed (put runs on the event
    loop, in the receiver's RTP handler); only the end-of-stream None reaches the idle
    thread, which then ends as aiortc expects."""

    def __init__(self, feed: Feed) -> None:
        super().__init__()
        self._feed = feed
        self._last: int | None = None  # the last timestamp, modulo 2**32
        self._unwrapped = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            super().put(None)
            return
        codec, frame = item  # frame: aiortc's JitterFrame, its data already bytes
        self._feed.codec = codec.mimeType
        keyframe = self._feed.kind == "audio" or h264.is_keyframe(frame.data)
        self._feed.push(EncodedFrame(self._feed.kind, frame.data,
                                     self._unwrap(frame.timestamp), codec.clockRate,
                                     time.monotonic(), keyframe))

    def _unwrap(self, timestamp: int) -> int:
        """aiortc's mapper takes any step back (a late frame) for a wrap of the 32-bit RTP
        clock and adds 2**32 to every timestamp after it (13 hours of audio: an MP4
        muxer asserts and aborts the process). A step is the signed 32-bit difference."""
        timestamp &= 0xFFFFFFFF
        if self._last is not None:
            self._unwrapped += ((timestamp - self._last + 2**31) & 0xFFFFFFFF) - 2**31
        self._last = timestamp
        return self._unwrapped


def tap(pc: RTCPeerConnection, track: MediaStreamTrack) -> Feed:
    """The feed of `track`'s frames, as received. Call it from the "track" event: the
    receiver has not started its decoder thread yet."""
    receiver = next(t.receiver for t in pc.getTransceivers() if t.receiver.track is track)
    if not hasattr(receiver, _DECODER_QUEUE) or getattr(receiver, _DECODER_THREAD) is not None:
        raise RuntimeError("this aiortc does not let the desk take frames before decoding "
                           "(dashsos needs aiortc 1.16)")
    feed = Feed(track.kind)
    setattr(receiver, _DECODER_QUEUE, _Bypass(feed))
    return feed


def request_keyframe(pc: RTCPeerConnection, kind: str = "video") -> None:
    """Ask the car for a keyframe (RTCP PLI): a console that starts watching needs one."""
    for transceiver in pc.getTransceivers():
        receiver: RTCRtpReceiver = transceiver.receiver
        if transceiver.kind != kind:
            continue
        for source in receiver.getSynchronizationSources():
            asyncio.ensure_future(receiver._send_rtcp_pli(source.source))


class PacketTrack(MediaStreamTrack):
    """A console's copy of one feed: av.Packets aiortc sends without encoding. Video
    starts at a keyframe; a console that falls behind loses the oldest frames (and
    video waits for the next keyframe), never the call."""

    def __init__(self, feed: Feed) -> None:
        super().__init__()
        self.kind = feed.kind
        self._pending: deque[EncodedFrame] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._started = False
        self._unsubscribe = feed.subscribe(self._receive)

    def _receive(self, frame: EncodedFrame) -> None:
        if not self._started and not frame.keyframe:
            return
        self._started = True
        self._pending.append(frame)
        if len(self._pending) > CONSOLE_QUEUE:
            self._pending.clear()
            self._started = False  # resume at a keyframe: a partial GOP would not decode
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> av.Packet[Any]:
        while not self._pending:
            if self.readyState != "live":
                raise MediaStreamError
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        frame = self._pending.popleft()
        packet = av.Packet(frame.data)
        packet.pts = frame.timestamp
        packet.time_base = Fraction(1, frame.clock_rate)
        return packet

    def stop(self) -> None:
        self._unsubscribe()
        super().stop()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
