"""Speech through the call, and how intelligible it is at the desk.

The car's simulated microphone plays `speech_wav()` (Harvard sentences, IEEE 1969,
spoken by espeak-ng) in a loop. The WHIP server keeps two things: what aiortc decoded
(`heard()`; its jitter buffer drops the frames around a lost packet, so it hears far
less than arrived), and every Opus packet as it arrived (`arrived()`: decoded and placed
by RTP timestamp, a lost packet 20 ms of silence: a desk without loss concealment).
`intelligibility()` lines each stretch of it up with the sentences and scores it with
STOI (Taal et al. 2011, via pystoi): 1.0 is the sentences as spoken, and word
intelligibility for listeners falls steeply below about 0.6-0.7.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

RATE = 48000
# Harvard sentences, list 1 (public domain, IEEE Recommended Practice for Speech Quality
# Measurements, 1969): phonetically balanced, the usual material for intelligibility.
SENTENCES = ("The birch canoe slid on the smooth planks. "
             "Glue the sheet to the dark blue background. "
             "It's easy to tell the depth of a well. "
             "These days a chicken leg is a rare dish. "
             "Rice is often served in round bowls.")
SEGMENT_S = 5.0  # each stretch is lined up on its own: one shift cannot spoil the rest


def speech_wav(path: Path) -> Path:
    """The sentences as a 16-bit mono WAV file (espeak-ng, 22.05 kHz)."""
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), SENTENCES], check=True,
                   capture_output=True, timeout=60)
    return path


def heard(audio_dir: Path) -> list[np.ndarray[Any, np.dtype[np.float64]]]:
    """What the desk decoded, one timeline per session (48 kHz mono, silence where
    nothing arrived)."""
    timelines = []
    for file in sorted(audio_dir.glob("*.pcm")):
        data = file.read_bytes()
        frames: list[tuple[int, np.ndarray[Any, np.dtype[np.int16]]]] = []
        at = 0
        while at + 12 <= len(data):
            pts, count = struct.unpack_from("<qI", data, at)
            at += 12
            frames.append((pts, np.frombuffer(data, "<i2", count, at)))
            at += 2 * count
        if not frames:
            continue
        start = min(p for p, _ in frames)
        end = max(p + len(s) for p, s in frames)
        line = np.zeros(end - start)
        for pts, samples in frames:
            line[pts - start:pts - start + len(samples)] = samples
        timelines.append(line)
    return timelines


def arrived(audio_dir: Path) -> list[np.ndarray[Any, np.dtype[np.float64]]]:
    """Every Opus packet that reached the desk, decoded and placed by RTP timestamp, one
    timeline per session (silence for a lost packet): what a desk with a jitter buffer
    but no loss concealment plays."""
    import av

    timelines = []
    for file in sorted(audio_dir.glob("*.rtp")):
        data, at = file.read_bytes(), 0
        packets: dict[int, bytes] = {}
        last = None
        unwrapped = 0
        while at + 8 <= len(data):
            timestamp, length = struct.unpack_from("<II", data, at)
            at += 8
            if last is not None:  # 32-bit RTP timestamps wrap
                unwrapped += (timestamp - last + 2**31) % 2**32 - 2**31
            last = timestamp
            packets.setdefault(unwrapped, data[at:at + length])
            at += length
        if not packets:
            continue
        decoder = av.CodecContext.create("libopus", "r")
        decoder.sample_rate, decoder.layout = RATE, "mono"
        start = min(packets)
        pieces = []
        for stamp in sorted(packets):
            for frame in decoder.decode(av.Packet(packets[stamp])):
                pieces.append((stamp - start, frame.to_ndarray().reshape(-1)))
        line = np.zeros(max(s + len(p) for s, p in pieces))
        for offset, samples in pieces:
            line[offset:offset + len(samples)] = samples
        timelines.append(line)
    return timelines


def _align(segment: np.ndarray[Any, Any], reference: np.ndarray[Any, Any]) -> int:
    """Where in the (looping) reference `segment` starts, by cross-correlation."""
    looped = np.concatenate([reference, reference[: len(segment)]])
    size = 1 << int(np.ceil(np.log2(len(looped) + len(segment))))
    correlation = np.fft.irfft(np.fft.rfft(looped, size) *
                               np.conj(np.fft.rfft(segment, size)), size)
    return int(np.argmax(correlation[: len(reference)]))


def intelligibility(reference: np.ndarray[Any, Any],
                    timelines: list[np.ndarray[Any, Any]]) -> dict[str, float]:
    """STOI of every whole SEGMENT_S stretch the desk heard against the same stretch of
    the looping reference: the mean, the worst, and how many stretches."""
    from pystoi import stoi

    reference = reference.astype(np.float64)
    step = int(SEGMENT_S * RATE)
    scores = []
    for line in timelines:
        for start in range(0, len(line) - step + 1, step):
            segment = line[start:start + step]
            if not segment.any():
                scores.append(0.0)  # a stretch with nothing at all: nothing understood
                continue
            offset = _align(segment, reference)
            clean = np.tile(reference, 3)[offset:offset + step]
            scores.append(float(stoi(clean, segment, RATE)))
    return {"stoi_mean": round(float(np.mean(scores)), 3) if scores else 0.0,
            "stoi_worst": round(min(scores), 3) if scores else 0.0,
            "segments": len(scores)}


def codec_only(reference: np.ndarray[Any, np.dtype[np.int16]]) -> np.ndarray[Any, Any]:
    """The reference through the car's Opus encoder and a decoder, nothing lost: the
    ceiling the network can only lower."""
    import av

    from dashsos.call.tracks import opus_encoder

    encoder = opus_encoder(RATE)
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = RATE, "mono"
    frame = av.AudioFrame(format="s16", layout="mono", samples=len(reference))
    frame.planes[0].update(reference.astype("<i2").tobytes())
    frame.sample_rate = RATE
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE,
                                  frame_size=encoder.frame_size)
    out = []
    for whole in [*resampler.resample(frame), *resampler.resample(None)]:
        for packet in encoder.encode(whole):
            for decoded in decoder.decode(packet):
                out.append(decoded.to_ndarray().reshape(-1))
    return np.concatenate(out).astype(np.float64)
