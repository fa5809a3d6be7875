"""The rolling pre-trigger memory of one stream: bounded by time and by bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

from dashsos.clock import NS
from dashsos.config import BufferConfig
from dashsos.media.packet import Packet


class RingBuffer:
    """Keeps `seconds` of packets plus the keyframe that starts them.

    Time bounds what a clip can reach back to; bytes bound memory whatever the bit rate
    does. The oldest packets go first; a snapshot always starts on a keyframe so the
    clip decodes from its first frame.
    """

    def __init__(self, seconds: float, max_bytes: int, keyframe_interval: float = 1.0) -> None:
        # One extra GOP so that a snapshot `seconds` back still finds its keyframe.
        self._span_ns = int((seconds + keyframe_interval + 0.5) * NS)
        self._max_bytes = max_bytes
        self._packets: deque[Packet] = deque()
        self.bytes = 0
        self.dropped_for_bytes = 0

    def push(self, packet: Packet) -> None:
        self._packets.append(packet)
        self.bytes += len(packet.data)
        horizon = packet.capture_ns - self._span_ns
        while self._packets and self._packets[0].capture_ns < horizon:
            self._pop()
        while self.bytes > self._max_bytes and len(self._packets) > 1:
            self._pop()
            self.dropped_for_bytes += 1
        # Never start on a frame that cannot be decoded.
        while self._packets and not self._packets[0].keyframe:
            self._pop()

    def _pop(self) -> None:
        self.bytes -= len(self._packets.popleft().data)

    def snapshot(self, since_ns: int) -> list[Packet]:
        """Packets from the last keyframe at or before `since_ns` (or the first one) on."""
        packets = list(self._packets)
        start = 0
        for i, p in enumerate(packets):
            if p.capture_ns > since_ns:
                break
            if p.keyframe:
                start = i
        return packets[start:]

    @property
    def seconds(self) -> float:
        if not self._packets:
            return 0.0
        return (self._packets[-1].end_ns - self._packets[0].capture_ns) / NS

    def __len__(self) -> int:
        return len(self._packets)

    def clear(self) -> None:
        self._packets.clear()
        self.bytes = 0


VIDEO_SHARE = 0.9  # of buffer.max_bytes; audio gets the rest


def buffers_for(config: BufferConfig, keyframe_interval: float,
                streams: Collection[str]) -> dict[str, RingBuffer]:
    """One buffer per media stream the car has, sharing the configured byte budget."""
    buffers: dict[str, RingBuffer] = {}
    if "video" in streams:
        buffers["video"] = RingBuffer(config.pre_seconds, int(config.max_bytes * VIDEO_SHARE),
                                      keyframe_interval)
    if "audio" in streams:
        buffers["audio"] = RingBuffer(config.pre_seconds,
                                      int(config.max_bytes * (1 - VIDEO_SHARE)))
    return buffers
