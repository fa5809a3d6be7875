"""The desk's recording muxes the car's frames as they arrived (issue 14): the pictures in
media.mp4 are the ones sent, bit for bit; audio-only calls and a disk that fails are
handled. The whole path (a car calling the reference dispatcher) is checked against the
car's own clip in test_call_dispatch.py."""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import numpy as np

import clipcheck
from dashsos.dispatch.encoded import EncodedFrame, Feed, _Bypass
from dashsos.dispatch.janus_call import write_media
from dashsos.dispatch.muxer import MAX_BACKLOG, CopyMuxer, Mp4Writer
from dashsos.media import h264


def _h264(count: int, gop: int = 30) -> list[bytes]:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 320, 240, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.options = {"profile": "baseline", "tune": "zerolatency", "g": str(gop)}
    out = []
    for i in range(count):
        frame = av.VideoFrame.from_ndarray(
            np.full((240, 320, 3), (i * 7) % 255, dtype=np.uint8), format="rgb24")
        frame.pts = i
        out += [bytes(p) for p in encoder.encode(frame.reformat(format="yuv420p"))]
    out += [bytes(p) for p in encoder.encode(None)]
    return out


def _opus(count: int) -> list[bytes]:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "s16"
    out = []
    for i in range(count):
        samples = (np.sin(np.arange(960) * 2 * np.pi * 440 / 48000) * 8000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(samples, 2).reshape(1, -1),
                                           format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, i * 960
        out += [bytes(p) for p in encoder.encode(frame)]
    return out


def test_pictures_are_recorded_bit_for_bit(tmp_path: Path) -> None:
    video, audio = _h264(90), _opus(150)
    muxer = CopyMuxer(tmp_path / "media.mp4", ["video", "audio"])
    # Audio first, and a picture that is no keyframe: the file starts at the keyframe.
    muxer.put(EncodedFrame("audio", audio[0], 0, 48000, 100.0, True))
    muxer.put(EncodedFrame("video", video[5], 0, 90000, 100.01, False))
    for i, data in enumerate(video):
        muxer.put(EncodedFrame("video", data, i * 3000, 90000, 100.02 + i / 30,
                               h264.is_keyframe(data)))
    for i, data in enumerate(audio[1:], 1):
        muxer.put(EncodedFrame("audio", data, i * 960, 48000, 100.0 + i * 0.02, True))
    muxer.close()
    assert muxer.error is None
    assert clipcheck.frame_hashes(tmp_path / "media.mp4") == [
        clipcheck.picture_hash(v) for v in video]
    streams = {s["codec_type"]: s for s in clipcheck.ffprobe(
        tmp_path / "media.mp4", "-show_streams")["streams"]}
    assert streams["video"]["codec_name"] == "h264"
    assert (streams["video"]["width"], streams["video"]["height"]) == (320, 240)
    assert streams["audio"]["codec_name"] == "opus"
    peak, level = clipcheck.audio_tone(tmp_path / "media.mp4")
    assert abs(peak - 440) < 20 and level > -40, (peak, level)
    assert muxer.frames["video"] == 90


def test_audio_alone_when_no_keyframe_comes(tmp_path: Path) -> None:
    muxer = CopyMuxer(tmp_path / "media.mp4", ["video", "audio"])
    for i, data in enumerate(_opus(250)):  # 5 s of audio, no picture
        muxer.put(EncodedFrame("audio", data, i * 960, 48000, i * 0.02, True))
    muxer.close()
    assert muxer.error is None and muxer.frames["audio"] > 0
    streams = clipcheck.ffprobe(tmp_path / "media.mp4", "-show_streams")["streams"]
    assert [s["codec_type"] for s in streams] == ["audio"]


def test_a_recording_that_cannot_be_written_reports_why(tmp_path: Path) -> None:
    muxer = CopyMuxer(tmp_path / "gone" / "media.mp4", ["video"])
    for i, data in enumerate(_h264(10)):
        muxer.put(EncodedFrame("video", data, i * 3000, 90000, i / 30,
                               h264.is_keyframe(data)))
    muxer.close()
    assert muxer.error is not None and "gone" in muxer.error


def test_a_late_frame_is_no_wrap_of_the_rtp_clock() -> None:
    """aiortc maps a step back of the RTP timestamp to +2**32 (a 'wrap'); the desk's own
    unwrapping keeps a late frame where it was, and a real wrap too."""
    feed = Feed("audio")
    got: list[int] = []
    feed.subscribe(lambda frame: got.append(frame.timestamp))
    bypass = _Bypass(feed)
    codec = SimpleNamespace(mimeType="audio/opus", clockRate=48000)
    # As aiortc's TimestampMapper hands them: 960, then a late 0 "wraps" to 2**32...
    for mapped in (0, 960, 1920, 960 + 2**32, 2880 + 2**32, 2**32 - 960 + 2**32):
        bypass.put((codec, SimpleNamespace(data=b"x", timestamp=mapped)))
    bypass.put((codec, SimpleNamespace(data=b"x", timestamp=2**33 + 960)))  # a real wrap
    assert got == [0, 960, 1920, 960, 2880, -960, 960]
    bypass.put(None)  # the receiver stopping: its idle decoder thread gets the None
    assert bypass.get_nowait() is None


def test_timestamps_far_from_arrival_are_re_anchored(tmp_path: Path) -> None:
    """A jump of 2**32 in a stream's clock (13 hours of audio) made the MP4 muxer assert
    and abort the whole desk; now the stream is re-anchored at its arrival time."""
    video, audio = _h264(60), _opus(100)
    muxer = CopyMuxer(tmp_path / "media.mp4", ["video", "audio"])
    for i in range(60):
        jump = 2**32 if i >= 30 else 0
        muxer.put(EncodedFrame("video", video[i], i * 3000 + jump, 90000, i / 30,
                               h264.is_keyframe(video[i])))
        for k in range(i * 100 // 60, (i + 1) * 100 // 60):
            muxer.put(EncodedFrame("audio", audio[k], k * 960 + (jump if k >= 50 else 0),
                                   48000, k * 0.02, True))
    muxer.close()
    assert muxer.error is None and muxer.frames["video"] == 60
    duration = float(clipcheck.ffprobe(tmp_path / "media.mp4", "-show_format")
                     ["format"]["duration"])
    assert 1.9 < duration < 2.2, duration


def test_a_long_janus_call_is_written_whole(tmp_path: Path) -> None:
    """Janus's recording reaches the desk all at once when the call ends; 100 s of it
    (8000 frames) was cut at the live recorder's backlog bound and the call lost."""
    pictures, sounds = _h264(60), _opus(50)
    seconds = 100
    frames = [EncodedFrame("video", pictures[i % 60], i * 3000, 90000, i / 30,
                           h264.is_keyframe(pictures[i % 60])) for i in range(seconds * 30)]
    frames += [EncodedFrame("audio", sounds[k % 50], k * 960, 48000, k * 0.02, True)
               for k in range(seconds * 50)]
    assert len(frames) > MAX_BACKLOG
    write_media(tmp_path / "media.mp4", frames)
    probe = clipcheck.ffprobe(tmp_path / "media.mp4", "-show_streams", "-count_packets")
    counts = {s["codec_type"]: int(s["nb_read_packets"]) for s in probe["streams"]}
    assert counts == {"video": seconds * 30, "audio": seconds * 50}, counts


def test_a_recording_still_being_written_is_not_called_finished(tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    """The desk waits a bounded time for its writer thread; if the disk is slower than
    that, the call's recording is reported unfinished, not passed off as whole."""
    release = threading.Event()
    finish = Mp4Writer.finish
    monkeypatch.setattr(Mp4Writer, "finish", lambda self: (release.wait(), finish(self)))
    muxer = CopyMuxer(tmp_path / "media.mp4", ["audio"])
    for i, data in enumerate(_opus(10)):
        muxer.put(EncodedFrame("audio", data, i * 960, 48000, i * 0.02, True))
    muxer.close(timeout=0.5)
    assert muxer.error is not None and "still being written" in muxer.error
    release.set()


def test_a_frame_with_nothing_in_it_does_not_spoil_the_file(tmp_path: Path) -> None:
    """Under load (20 calls and 20 consoles on 2 cores) a received frame had no NAL unit:
    muxed as a 0-byte sample, FFmpeg's demuxer refused the whole media.mp4 ("error
    reading header"). Such frames are left out, and the rest of the call is readable."""
    video, audio = _h264(60), _opus(100)
    muxer = CopyMuxer(tmp_path / "media.mp4", ["video", "audio"])
    for i in range(60):
        data = video[i] if i not in (20, 40) else (b"" if i == 20 else b"\x41\x9a\x02")
        muxer.put(EncodedFrame("video", data, i * 3000, 90000, i / 30, h264.is_keyframe(data)))
        for k in range(i * 100 // 60, (i + 1) * 100 // 60):
            muxer.put(EncodedFrame("audio", audio[k], k * 960, 48000, k * 0.02, True))
    muxer.put(EncodedFrame("audio", b"", 100 * 960, 48000, 2.0, True))
    muxer.close()
    assert muxer.error is None and muxer.frames["video"] == 58
    assert clipcheck.frame_hashes(tmp_path / "media.mp4") == [
        clipcheck.picture_hash(v) for i, v in enumerate(video) if i not in (20, 40)]
