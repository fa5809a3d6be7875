"""The ffmpeg backend: copies suitable H.264 (Annex-B out, whatever the container), encodes
anything else once, and paces files like a camera."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from dashsos.config import VideoConfig
from dashsos.media import h264
from dashsos.media.ffmpeg_video import FFmpegVideoSource
from dashsos.media.packet import Packet


def _make_file(path: Path, profile: str) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=30", "-t", "3", "-c:v", "libx264",
                    "-preset", "medium", "-profile:v", profile, "-g", "30", "-pix_fmt",
                    "yuv420p", str(path)], check=True)
    return path


def _capture(config: VideoConfig, seconds: float) -> tuple[list[Packet], FFmpegVideoSource]:
    source = FFmpegVideoSource(config)
    packets: list[Packet] = []
    lock = threading.Lock()

    def deliver(p: Packet) -> None:
        with lock:
            packets.append(p)

    source.start(deliver)
    time.sleep(seconds)
    source.stop()
    return packets, source


@pytest.mark.parametrize(("profile", "copied"), [("baseline", True), ("high", False)])
def test_file_input_copied_or_encoded(tmp_path: Path, profile: str, copied: bool) -> None:
    path = _make_file(tmp_path / f"{profile}.mp4", profile)
    config = VideoConfig(backend="ffmpeg", input=str(path), width=320, height=240,
                         bitrate=300_000, preset="ultrafast")
    packets, source = _capture(config, 1.5)
    # Paced like a camera: 1.5 s of a 30 fps file gives about 45 frames, not all 90.
    assert 30 <= len(packets) <= 60, len(packets)
    keys = [p for p in packets if p.keyframe]
    assert keys and packets[0].keyframe
    for p in keys:
        assert p.data.startswith(b"\x00\x00\x00\x01") or p.data.startswith(b"\x00\x00\x01")
        assert h264.has_parameter_sets(p.data)  # MP4 keeps them aside; we put them back
        assert h264.profile(p.data) is not None
        assert h264.profile(p.data)[0] == h264.PROFILE_BASELINE  # type: ignore[index]
    assert ("copying" in source.health.detail) == copied, source.health.detail


def test_missing_input_is_down_with_reason(tmp_path: Path) -> None:
    config = VideoConfig(backend="ffmpeg", input=str(tmp_path / "nothing.mp4"))
    packets, source = _capture(config, 0.5)
    assert not packets
    assert source.health.state == "down"
    assert "No such file" in source.health.detail or "nothing.mp4" in source.health.detail
