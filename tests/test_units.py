"""The small parts on their own: H.264 parsing, ring buffer, incident machine, sidecars."""

from __future__ import annotations

from fractions import Fraction

import pytest

from dashsos import clock
from dashsos.clock import NS
from dashsos.evidence import sidecars
from dashsos.location.fix import Fix
from dashsos.media import h264
from dashsos.media.encoder import H264Encoder
from dashsos.media.packet import Packet
from dashsos.media.ringbuffer import RingBuffer


def _packet(t: float, key: bool, size: int = 1000) -> Packet:
    return Packet("video", "h264", bytes(size), int(t * 30), Fraction(1, 30), int(t * NS),
                  NS // 30, key)


def _encode(frames: int, fps: int = 30, keyframe_at: int | None = None) -> list[Packet]:
    import av

    encoder = H264Encoder(160, 120, fps, 200_000, 1.0, "ultrafast")
    source = av.open(f"testsrc2=size=160x120:rate={fps}", format="lavfi")
    out: list[Packet] = []
    for i, frame in enumerate(source.decode(video=0)):
        if i == frames:
            break
        if i == keyframe_at:
            encoder.request_keyframe()
        out += encoder.encode(frame, i * NS // fps)
    source.close()
    return out


def test_encoder_output_fits_webrtc_and_clips() -> None:
    packets = _encode(75, keyframe_at=45)
    keys = [i for i, p in enumerate(packets) if p.keyframe]
    assert keys == [0, 30, 45], keys  # every second, and at once on request
    for i in keys:
        assert h264.has_parameter_sets(packets[i].data)  # SPS/PPS on every keyframe
        assert h264.profile(packets[i].data) == (h264.PROFILE_BASELINE, True)
        assert packets[i].data.startswith(b"\x00\x00\x00\x01")  # Annex-B
    assert all(h264.is_keyframe(p.data) == p.keyframe for p in packets)


def test_nal_parsing() -> None:
    data = b"\x00\x00\x00\x01\x67\x42\xc0\x1e\x00\x00\x01\x68\xce\x00\x00\x01\x65\x88\x84"
    assert [h264.nal_type(n) for n in h264.nal_units(data)] == [7, 8, 5]
    assert h264.parameter_sets(data) == b"\x00\x00\x00\x01\x67\x42\xc0\x1e\x00\x00\x00\x01\x68\xce"
    assert h264.profile(data) == (66, True)
    assert not h264.is_keyframe(b"\x00\x00\x01\x41\x9a")


def test_ring_buffer_keeps_time_and_starts_on_keyframe() -> None:
    buffer = RingBuffer(seconds=3, max_bytes=10**9, keyframe_interval=1)
    for i in range(30 * 10):  # 10 s at 30 fps, a keyframe each second
        buffer.push(_packet(i / 30, i % 30 == 0))
    assert 3 <= buffer.seconds <= 4.6
    snap = buffer.snapshot(int(7.5 * NS))
    assert snap[0].keyframe and snap[0].capture_ns == 7 * NS  # keyframe at or before 7.5 s
    assert snap[-1].capture_ns == int(299 / 30 * NS)
    assert buffer.snapshot(0)[0].keyframe  # older than kept: from the oldest keyframe


def test_ring_buffer_bounded_by_bytes() -> None:
    buffer = RingBuffer(seconds=30, max_bytes=50_000, keyframe_interval=1)
    for i in range(300):
        buffer.push(_packet(i / 30, i % 30 == 0, size=1000))
    assert buffer.bytes <= 50_000
    assert buffer.dropped_for_bytes > 0
    assert buffer.snapshot(0)[0].keyframe


def _fix(t: float, lat: float) -> Fix:
    return Fix(int(t * NS), f"2026-01-01T00:00:{int(t):02d}.000Z", lat, 11.0, 3, alt=500.0,
               speed=10.0, heading=90.0)


def test_sidecars() -> None:
    fixes = [_fix(t, 48 + t / 1000) for t in (1.0, 2.0, 3.0)]
    gpx = sidecars.gpx(fixes, "x&y")
    assert gpx.count("<trkpt") == 3 and "x&amp;y" in gpx and 'lat="48.0010000"' in gpx
    vtt = sidecars.vtt(fixes, clip_start_ns=int(1.5 * NS), clip_end_ns=4 * NS)
    assert vtt.startswith("WEBVTT\n")
    assert "00:00:00.000 --> 00:00:00.500\n48.001000, 11.000000  36 km/h  90\u00b0" in vtt
    assert "00:00:01.500 --> 00:00:02.500" in vtt


@pytest.mark.parametrize(("ns", "text"), [(0, "00:00:00.000"), (3_723_456_000_000,
                                                                  "01:02:03.456")])
def test_vtt_timestamps(ns: int, text: str) -> None:
    assert sidecars._timestamp(ns) == text


def test_clock_maps_to_wall_time() -> None:
    import time

    assert abs(clock.to_wall_ns(clock.now_ns()) - time.time_ns()) < 50_000_000


def test_journal_log_lines_carry_priority(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from dashsos import log

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    try:
        log.setup("info")
        logging.getLogger("dashsos.test").warning("camera down\nsecond line")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err == "<4>dashsos.test: camera down\n<4>second line\n"


def test_sudden_stop_detector() -> None:
    from dashsos.config import AutoTriggerConfig
    from dashsos.location.motion import SuddenStopDetector

    detector = SuddenStopDetector(AutoTriggerConfig(gps_crash=True, min_speed_kmh=40,
                                                    stop_speed_kmh=5, within_seconds=2))

    def fix(t: float, kmh: float, mode: int = 3) -> Fix:
        # Receiver time decides; the receipt time (capture_ns) is deliberately unrelated.
        return Fix(0, "", 48.0, 11.0, mode, speed=kmh / 3.6, epx=5, epy=5,
                   receiver_ns=int((1e9 + t) * NS))

    # Braking from 50 to 0 over 5 s is driving, not a crash.
    assert not any(detector.feed(fix(t, 50 - 10 * t)) for t in range(6))
    # 60 km/h to standstill within a second is, once the next fix confirms it.
    assert detector.feed(fix(10, 60)) is None
    assert detector.feed(fix(11, 60)) is None
    assert detector.feed(fix(12, 0)) is None
    stop = detector.feed(fix(13, 0))
    assert stop is not None and "60 km/h to 0 km/h" in stop
    assert detector.feed(fix(14, 0)) is None  # one trigger per stop
    # An untrusted (2D) fix in between breaks the chain.
    detector.feed(fix(20, 70))
    detector.feed(fix(21, 30, mode=2))
    assert detector.feed(fix(22, 0)) is None
    assert detector.feed(fix(23, 0)) is None
