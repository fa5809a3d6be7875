"""The pre-window, durable fast: at the trigger the buffered packets are written as they
are (already encoded: no muxing, no AAC) to `prewindow.spool` with one fsync, before the
clip writer starts muxing them. A power cut before the clip holds them leaves the spool;
recovery turns it into a playable clip (`rebuild`).

Format: a JSON header line (formats, the incident's end), then per packet a fixed header
(stream, keyframe, capture_ns, duration_ns, length) and the bytes. A cut mid-write leaves
a short last record, which reading ignores.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from dashsos.evidence.files import fsync_dir
from dashsos.media.packet import AudioFormat, Packet, VideoFormat

NAME = "prewindow.spool"
_RECORD = struct.Struct(">BBqqI")
_STREAMS = ("video", "audio")
_CODECS = {"video": "h264", "audio": "pcm_s16le"}


def write(path: Path, video: VideoFormat | None, audio: AudioFormat | None, end_ns: int,
          packets: Iterable[Packet]) -> int:
    """Write and fsync the spool (and its name); its size in bytes."""
    header: dict[str, Any] = {
        "video": None if video is None else {"width": video.width, "height": video.height,
                                             "fps": video.fps},
        "audio": None if audio is None else {"sample_rate": audio.sample_rate,
                                             "channels": audio.channels},
        "end_ns": end_ns}
    chunks = [json.dumps(header).encode() + b"\n"]
    for p in packets:
        chunks.append(_RECORD.pack(_STREAMS.index(p.stream), int(p.keyframe), p.capture_ns,
                                   p.duration_ns, len(p.data)))
        chunks.append(bytes(p.data))
    data = b"".join(chunks)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return len(data)


def read(path: Path) -> tuple[VideoFormat | None, AudioFormat | None, int, list[Packet]]:
    with open(path, "rb") as f:
        header = json.loads(f.readline())
        body = f.read()
    video = VideoFormat(**header["video"]) if header.get("video") else None
    audio = AudioFormat(**header["audio"]) if header.get("audio") else None
    return video, audio, int(header["end_ns"]), list(_packets(body))


def _packets(body: bytes) -> Iterator[Packet]:
    offset = 0
    while offset + _RECORD.size <= len(body):
        stream, key, capture_ns, duration_ns, length = _RECORD.unpack_from(body, offset)
        offset += _RECORD.size
        if offset + length > len(body) or stream >= len(_STREAMS):
            return  # the record a cut left short
        name = _STREAMS[stream]
        yield Packet(name, _CODECS[name], body[offset:offset + length], 0,
                     Fraction(1, 90000), capture_ns, duration_ns, bool(key))
        offset += length


def rebuild(path: Path, clip: Path, timeout: float = 120.0) -> str | None:
    """Mux a spool into `clip` (a finished, playable file); an error, or None."""
    from dashsos.evidence.clip import ClipWriter  # clip imports this module

    video, audio, end_ns, packets = read(path)
    if not packets:
        return "the spool holds no packet"
    writer = ClipWriter(clip, video, audio, max(end_ns, packets[-1].end_ns), spool=False)
    for packet in packets:
        writer.put(packet)
    writer.finish()
    if not writer.join(timeout):
        return "rebuilding from the spool timed out"
    return writer.error
