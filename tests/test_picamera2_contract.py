"""The picamera2 adapter against a stand-in with picamera2's signatures (no Pi here)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import clipcheck
from dashsos.clock import NS
from dashsos.config import VideoConfig
from dashsos.evidence.clip import ClipWriter
from dashsos.media import h264, picamera2_video
from dashsos.media.packet import Packet
from dashsos.media.picamera2_video import Picamera2VideoSource

STANDINS = Path(__file__).resolve().parent / "standins"


@pytest.fixture
def picamera2(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.syspath_prepend(str(STANDINS))
    for name in [m for m in sys.modules if m.startswith("picamera2")]:
        monkeypatch.delitem(sys.modules, name)
    import picamera2 as standin

    standin.recordings.clear()
    yield standin
    for name in [m for m in sys.modules if m.startswith("picamera2")]:
        del sys.modules[name]


def test_adapter_delivers_stamped_h264_and_forces_keyframes(picamera2: object,
                                                           tmp_path: Path) -> None:
    assert picamera2_video.available()
    config = VideoConfig(backend="picamera2", width=320, height=240, fps=30, bitrate=500_000)
    source = Picamera2VideoSource(config)
    packets: list[Packet] = []
    lock = threading.Lock()

    def deliver(p: Packet) -> None:
        with lock:
            packets.append(p)

    source.start(deliver)
    try:
        time.sleep(1.6)
        with lock:
            before = len(packets)
        source.request_keyframe()
        time.sleep(0.6)
    finally:
        source.stop()

    recording = picamera2.recordings[0]  # type: ignore[attr-defined]
    assert recording["config"]["main"]["size"] == (320, 240)
    assert recording["config"]["controls"]["FrameRate"] == 30
    encoder = recording["encoder"]
    assert (encoder.bitrate, encoder.repeat, encoder.iperiod) == (500_000, True, 30)
    assert encoder.profile == "baseline" and encoder.forced

    assert len(packets) > 50
    assert all(p.stream == "video" and p.codec == "h264" for p in packets)
    assert packets[0].keyframe and h264.has_parameter_sets(packets[0].data)
    keys = [i for i, p in enumerate(packets) if p.keyframe]
    assert keys[:2] == [0, 30], keys  # iperiod honoured
    assert any(before <= i <= before + 3 for i in keys), (before, keys)  # the forced one
    pairs = list(zip(packets, packets[1:], strict=False))
    assert all(b.pts > a.pts for a, b in pairs), [p.pts for p in packets]
    assert all(b.capture_ns >= a.capture_ns for a, b in pairs)
    assert source.health.state == "ok"

    # What the Pi camera delivers makes a valid clip as it is.
    writer = ClipWriter(tmp_path / "clip.mp4", source.format, None, packets[-1].capture_ns)
    for p in packets:
        writer.put(p)
    writer.finish()
    assert writer.join(10) and writer.error is None
    facts = clipcheck.check_clip(tmp_path / "clip.mp4", audio=False)
    span = (packets[-1].end_ns - packets[0].capture_ns) / NS
    assert abs(facts.duration - span) < 0.1


def test_unavailable_off_the_pi() -> None:
    # No picamera2 on this Debian machine: `auto` must not pick it.
    assert "picamera2" not in sys.modules
    assert not picamera2_video.available()
