"""A source looks after itself (issue 9): a capture that stops delivering without an error
is restarted alone, within bounds, and its health says so. Here against small sources
whose faults the test controls; the real devices are in test_source_faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import av.error
import pytest

from conftest import wait_for
from dashsos.config import VideoConfig
from dashsos.health import State
from dashsos.media import source as source_module
from dashsos.media.ffmpeg_video import FFmpegVideoSource
from dashsos.media.source import (
    MAX_ABANDONED,
    STALL_S,
    STOP_BOUND_S,
    WATCH_S,
    Interrupted,
    Source,
    Stalled,
)

SLACK_S = 1.0  # thread scheduling on a busy 2-core machine


class Ticker(Source[int]):
    """Delivers a number every 20 ms until told to freeze; a frozen one can also be made
    to ignore being halted (a capture that hangs where nothing can interrupt it)."""

    kind = "ticker"
    stall_seconds = STALL_S

    def __init__(self) -> None:
        super().__init__("ticker")
        self.frozen = threading.Event()
        self.deaf = threading.Event()  # while frozen, ignore the halt
        self.opened: list[int] = []  # each attempt's device, by number
        self.closed: list[int] = []

    def _capture(self) -> None:
        self._held.device = len(self.opened)
        self.opened.append(self._held.device)
        halt = self._halt
        n = 0
        while not halt.wait(0.02):
            while self.frozen.is_set() and (self.deaf.is_set() or not halt.is_set()):
                time.sleep(0.01)
            if halt.is_set():
                return
            self._deliver(n)
            self._set(State.OK, "ticking")
            n += 1

    def _close(self) -> None:
        self.closed.append(self._held.device)


@pytest.fixture
def ticker() -> Iterator[tuple[Ticker, list[int]]]:
    t = Ticker()
    got: list[int] = []
    t.start(got.append)
    yield t, got
    t.frozen.clear()
    t.deaf.clear()
    t.stop()


def test_a_frozen_capture_is_restarted_and_reports_it(
        ticker: tuple[Ticker, list[int]]) -> None:
    t, got = ticker
    wait_for(lambda: t.health.state == "ok" and len(got) > 10, 5, "ticks")
    t.frozen.set()
    frozen = time.monotonic()
    wait_for(lambda: t.health.detail.startswith("stalled"), STALL_S + SLACK_S + 1,
             "the stall to show")
    noticed = time.monotonic() - frozen
    assert STALL_S - 0.1 <= noticed <= STALL_S + WATCH_S + SLACK_S, noticed
    assert t.health.state == "degraded"
    assert t.health.detail == "stalled: no data for 3 s; restarting", t.health.detail
    assert t.restarts == 1 and t.health.as_dict()["restarts"] == 1
    wait_for(lambda: len(t.opened) == 2, STOP_BOUND_S + SLACK_S, "a fresh capture")
    assert t.closed == [0]  # the device was released before it was opened again
    # Still frozen: it keeps trying, once per stall, and says for how long it has been.
    wait_for(lambda: t.restarts == 2, STALL_S + 2 * SLACK_S, "a second restart")
    assert t.health.detail.startswith("stalled: no data for ")
    assert t.abandoned == 0
    t.frozen.clear()
    wait_for(lambda: t.health.state == "ok", STALL_S + SLACK_S, "ticks again")
    count = len(got)
    wait_for(lambda: len(got) > count + 10, 2, "ticks to keep coming")
    assert t.restarts == 2


def test_a_capture_that_will_not_end_is_left_behind(
        ticker: tuple[Ticker, list[int]]) -> None:
    t, got = ticker
    wait_for(lambda: len(got) > 10, 5, "ticks")
    t.deaf.set()
    t.frozen.set()
    wait_for(lambda: t.restarts == 1, STALL_S + SLACK_S + 1, "the stall")
    stalled = time.monotonic()
    wait_for(lambda: t.abandoned == 1, STOP_BOUND_S + SLACK_S, "the capture left behind")
    assert time.monotonic() - stalled >= STOP_BOUND_S - 0.1
    assert [th.name for th in threading.enumerate()].count("ticker-abandoned") == 1
    wait_for(lambda: len(t.opened) == 2, 2 * SLACK_S, "a fresh capture anyway")
    assert t.closed == []  # the hung one has not got to close yet
    t.deaf.clear()  # the hung one returns now: it closes its own device, not the fresh one
    t.frozen.clear()
    wait_for(lambda: t.health.state == "ok", 2 * SLACK_S, "ticks again")
    wait_for(lambda: t.closed == [0], 1, "the one left behind to close its own")
    assert t.opened == [0, 1] and t.abandoned == 1 and t.restarts == 1
    count = len(got)
    wait_for(lambda: len(got) > count + 10, 2, "ticks to keep coming")


def test_captures_left_behind_are_bounded(ticker: tuple[Ticker, list[int]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    t, got = ticker
    monkeypatch.setattr(source_module, "STOP_BOUND_S", 0.3)
    wait_for(lambda: len(got) > 10, 5, "ticks")
    t.deaf.set()
    t.frozen.set()
    # Every fresh capture hangs too: MAX_ABANDONED are left behind, then no more.
    wait_for(lambda: t.abandoned == MAX_ABANDONED, MAX_ABANDONED * (STALL_S + 2), "hangs")
    wait_for(lambda: t.health.state == "down", 2, "status to say captures hang")
    assert "hang" in t.health.detail, t.health.detail
    time.sleep(STALL_S + 1)
    assert t.abandoned == MAX_ABANDONED and len(t.opened) == MAX_ABANDONED
    t.deaf.clear()
    t.frozen.clear()
    wait_for(lambda: t.health.state == "ok", 5, "ticks again once they ended")


def test_stop_is_bounded_even_while_a_capture_hangs(
        ticker: tuple[Ticker, list[int]]) -> None:
    t, got = ticker
    wait_for(lambda: len(got) > 10, 5, "ticks")
    t.deaf.set()
    t.frozen.set()
    started = time.monotonic()
    t.stop()
    assert time.monotonic() - started < STOP_BOUND_S + 1.5


class Silent(Source[int]):
    """A source that is not watched (a GPS without a fix delivers nothing, rightly)."""

    kind = "silent"

    def __init__(self) -> None:
        super().__init__("silent")
        self.opened = 0

    def _capture(self) -> None:
        self.opened += 1
        self._set(State.DEGRADED, "no fix")
        self._stop.wait()


def test_unwatched_sources_are_not_restarted() -> None:
    s = Silent()
    s.start(lambda item: None)
    try:
        time.sleep(STALL_S + 1)
        assert s.opened == 1 and s.restarts == 0 and s.health.detail == "no fix"
    finally:
        s.stop()


# --- the PyAV input loop: every way a read can end ---


class FakeContainer:
    """container.demux() that raises the given errors, then yields packets."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script

    def demux(self, stream: Any) -> Iterator[Any]:
        while self.script:
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            yield step


def _packets(script: list[Any], halt: threading.Event | None = None) -> list[Any]:
    source = FFmpegVideoSource(VideoConfig(backend="ffmpeg", input="/dev/null"))
    if halt is not None:
        source._local.halt = halt
    return list(source._packets(FakeContainer(script), None))


def test_nonblocking_device_with_no_frame_yet_is_waited_out() -> None:
    eagain = av.error.BlockingIOError(11, "Resource temporarily unavailable")
    assert _packets([1, eagain, eagain, 2, 3]) == [1, 2, 3]


def test_nonblocking_device_wait_ends_when_halted() -> None:
    halt = threading.Event()
    halt.set()
    eagain = av.error.BlockingIOError(11, "Resource temporarily unavailable")
    with pytest.raises(Interrupted):
        _packets([1, eagain, 2], halt)


def test_read_timeout_is_a_stall() -> None:
    timeout = av.error.ExitError(0x54495845, "Immediate exit requested")  # AVERROR_EXIT
    with pytest.raises(Stalled):
        _packets([1, timeout], threading.Event())


def test_simulated_microphone_plays_a_wav_file_in_a_loop(tmp_path: Any) -> None:
    import wave

    import numpy as np

    from dashsos.config import AudioConfig
    from dashsos.media.audio import ToneAudioSource

    # Stereo at 24 kHz: mixed down and resampled to the capture's 48 kHz mono.
    left = (np.arange(2400) % 100 * 100).astype("<i2")  # 0.1 s of a sawtooth
    with wave.open(str(tmp_path / "sound.wav"), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(24000)
        wav.writeframes(np.stack([left, left], axis=1).tobytes())
    mic = ToneAudioSource(AudioConfig(backend="test", test_sound=str(tmp_path / "sound.wav")))
    got: list[Any] = []
    mic.start(got.append)
    try:
        wait_for(lambda: len(got) >= 12, 5, "0.24 s of audio")
    finally:
        mic.stop()
    assert mic.health.state == State.SIMULATED and "sound.wav in a loop" in mic.health.detail
    pcm = np.frombuffer(b"".join(p.data for p in got[:12]), "<i2")
    assert len(pcm) == 12 * 960  # 20 ms chunks at 48 kHz
    period = len(pcm[:4800])  # the 0.1 s file, twice as many samples, then again
    assert np.array_equal(pcm[:period], pcm[period:2 * period])
    assert abs(int(pcm[2]) - int(left[1])) <= 1  # every other sample is the file's own

    (tmp_path / "eight.wav").write_bytes(b"")
    with wave.open(str(tmp_path / "eight.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(8000)
        wav.writeframes(bytes(800))
    bad = ToneAudioSource(AudioConfig(backend="test", test_sound=str(tmp_path / "eight.wav")))
    bad.start(got.append)
    try:
        # Each attempt fails the same way (and is tried again): it says why every time.
        wait_for(lambda: bad.health.state == "down"
                 and "8-bit samples; 16-bit PCM needed" in bad.health.detail, 5,
                 "the source to say why")
    finally:
        bad.stop()
