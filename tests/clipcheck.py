"""What every clip must satisfy, checked with ffprobe (the tool a court's expert would use)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from dashsos.media import h264


def ffprobe(path: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(["ffprobe", "-v", "error", "-of", "json", *args, str(path)],
                         capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(out.stdout)
    return data


@dataclass
class ClipFacts:
    duration: float
    video_start: float
    audio_start: float | None
    first_video_keyframe: bool
    video_frames: int
    codecs: list[str]


def check_clip(path: Path, *, audio: bool = True) -> ClipFacts:
    """Asserts the structure every clip needs; returns the measured facts."""
    info = ffprobe(path, "-show_streams", "-show_format")
    codecs = [s["codec_type"] for s in info["streams"]]
    assert codecs.count("video") == 1, codecs
    assert codecs.count("audio") == (1 if audio else 0), codecs
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    assert video["codec_name"] == "h264"
    assert video["profile"] == "Constrained Baseline", video["profile"]
    packets = ffprobe(path, "-show_packets", "-show_entries",
                      "packet=stream_index,pts_time,dts_time,flags")["packets"]
    by_stream: dict[int, list[dict[str, Any]]] = {}
    for p in packets:
        by_stream.setdefault(p["stream_index"], []).append(p)
    for index, stream_packets in by_stream.items():
        dts = [float(p["dts_time"]) for p in stream_packets]
        assert all(b > a for a, b in zip(dts, dts[1:], strict=False)), \
            f"stream {index}: timestamps not monotonic"
    vpackets = by_stream[video["index"]]
    first_key = vpackets[0]["flags"].startswith("K")
    assert first_key, "first video frame is not a keyframe"
    # Decoding must succeed from the first frame to the last.
    decode = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"],
                            capture_output=True, text=True)
    assert decode.returncode == 0, decode.stderr
    audio_start = None
    if audio:
        a = next(s for s in info["streams"] if s["codec_type"] == "audio")
        audio_start = float(a["start_time"])
    return ClipFacts(float(info["format"]["duration"]), float(video["start_time"]),
                     audio_start, first_key, len(vpackets), codecs)


def keyframe_interval(path: Path) -> float:
    packets = ffprobe(path, "-select_streams", "v", "-show_entries",
                      "packet=pts_time,flags")["packets"]
    keys = [float(p["pts_time"]) for p in packets if p["flags"].startswith("K")]
    return max(b - a for a, b in zip(keys, keys[1:], strict=False))


def audio_tone(path: Path) -> tuple[float, float]:
    """(dominant frequency in Hz, RMS level in dBFS) of the clip's audio."""
    with av.open(str(path)) as container:
        chunks = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
        rate = container.streams.audio[0].sample_rate
    samples = np.concatenate(chunks).astype(np.float64)
    samples = samples[rate // 2:]  # skip the encoder's start-up
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    peak = float(np.argmax(spectrum) * rate / len(samples))
    rms = float(np.sqrt(np.mean(samples ** 2)))
    return peak, 20 * np.log10(max(rms, 1e-12))


def vtt_cues(text: str) -> list[tuple[float, float, str]]:
    def seconds(stamp: str) -> float:
        h, m, s = stamp.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    cues = []
    for block in text.strip().split("\n\n")[1:]:
        lines = block.splitlines()
        match = re.match(r"(\S+) --> (\S+)", lines[0])
        assert match, block
        cues.append((seconds(match[1]), seconds(match[2]), "\n".join(lines[1:])))
    return cues


def packets(path: Path, kind: str = "video") -> list[bytes]:
    """The packets of a file's first `kind` stream, as stored (an MP4's H.264 pictures
    length-prefixed: h264.annexb turns them into Annex-B)."""
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(**{kind: 0}) if p.size]


def is_slice(nal_type: int) -> bool:
    return nal_type in (1, h264.NAL_IDR)


def picture_hash(access_unit: bytes, keep: Callable[[int], bool] = is_slice) -> str | None:
    """A hash of an Annex-B access unit's NAL units of the types `keep` admits (None if it
    has none). By default its slices only: what a packetizer may drop or add around them,
    delimiters and SEI, is left out, so the same picture hashes the same in the car's clip
    and in a recording made of it."""
    kept = b"".join(n for n in h264.nal_units(access_unit) if keep(h264.nal_type(n)))
    return hashlib.sha256(kept).hexdigest() if kept else None


def frame_hashes(path: Path) -> list[str]:
    """picture_hash of each H.264 picture of an MP4 (those with a slice)."""
    return [h for p in packets(path) if (h := picture_hash(h264.annexb(p)))]
