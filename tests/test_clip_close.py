"""The clip closes as soon as every stream has passed the window's end, and nothing of the
window is lost by closing then (not after a fixed grace)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import clipcheck
from dashsos.clock import NS
from dashsos.evidence.clip import ClipWriter
from dashsos.media.packet import AudioFormat, Packet, VideoFormat

RATE = 48_000
CHUNK = 960  # 20 ms


def chunk(index: int) -> Packet:
    return Packet("audio", "pcm_s16le", bytes(2 * CHUNK), index * CHUNK, Fraction(1, RATE),
                  NS + index * CHUNK * NS // RATE, CHUNK * NS // RATE, True)


def test_audio_clip_closed_at_the_first_chunk_past_the_end_holds_the_whole_window(
        tmp_path: Path) -> None:
    end_ns = NS + NS  # one second of audio
    writer = ClipWriter(tmp_path / "clip.mp4", None, AudioFormat(RATE), end_ns)
    index = 0
    while not writer.passed_end():
        assert index <= 60, "passed_end never became true"
        writer.put(chunk(index))
        index += 1
    # The chunk that started at the end itself is still inside the window.
    assert chunk(index - 1).capture_ns > end_ns >= chunk(index - 2).capture_ns
    writer.finish()
    assert writer.join(10) and writer.error is None
    streams = clipcheck.ffprobe(tmp_path / "clip.mp4", "-show_streams")["streams"]
    assert [s["codec_type"] for s in streams] == ["audio"]
    duration = float(streams[0]["duration"])
    assert abs(duration - 1.02) < 0.03, duration  # 0 .. the end, its last chunk whole


def test_a_stream_that_stopped_keeps_the_clip_waiting(tmp_path: Path) -> None:
    # Video was expected but sends nothing: only the grace bound can close this clip.
    writer = ClipWriter(tmp_path / "clip.mp4", VideoFormat(640, 480, 30), AudioFormat(RATE),
                        NS + NS // 2)
    for index in range(40):
        writer.put(chunk(index))
    assert not writer.passed_end()
    writer.finish()
    writer.join(10)
