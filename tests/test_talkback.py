"""Talk-back never blocks the event loop (issue 9): with the speaker's thread dead and its
queue full, play() still returns at once when the dispatcher's track ends. And a working
speaker plays the dispatcher into PulseAudio's null sink."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Callable, Coroutine
from fractions import Fraction
from typing import Any, TypeVar

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from conftest import record_sink, wait_for
from dashsos.call import talkback
from dashsos.call.talkback import Speaker
from dashsos.health import State

T = TypeVar("T")
SAMPLES = 960  # 20 ms at 48 kHz
MAX_LAG_S = 0.1


class ToneTrack(MediaStreamTrack):
    """The dispatcher's voice as aiortc hands it over: 20 ms s16 mono frames, then the end."""

    kind = "audio"

    def __init__(self, frames: int, interval: float, hz: float = 440.0) -> None:
        super().__init__()
        self.frames, self.interval, self.hz = frames, interval, hz
        self.sent = 0
        self.ended_at = 0.0

    async def recv(self) -> av.AudioFrame:
        if self.sent >= self.frames:
            self.ended_at = time.monotonic()
            raise MediaStreamError
        await asyncio.sleep(self.interval)
        t = (np.arange(SAMPLES) + self.sent * SAMPLES) / 48000
        pcm = (np.sin(2 * np.pi * self.hz * t) * 8000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self.sent * SAMPLES
        frame.time_base = Fraction(1, 48000)
        self.sent += 1
        return frame


async def _worst_lag(stop: asyncio.Event) -> float:
    """The longest the loop was late to wake a 5 ms sleeper."""
    worst = 0.0
    while not stop.is_set():
        start = time.monotonic()
        await asyncio.sleep(0.005)
        worst = max(worst, time.monotonic() - start - 0.005)
    return worst


async def _play(speaker: Speaker, track: ToneTrack) -> tuple[float, float]:
    """Play the track; (seconds from its end to play() returning, worst loop lag)."""
    stop = asyncio.Event()
    ticker = asyncio.create_task(_worst_lag(stop))
    await speaker.play(track)
    returned = time.monotonic()
    await asyncio.sleep(0.05)  # the ticker sees the time right after, too
    stop.set()
    return returned - track.ended_at, await ticker


def _run_bounded(main: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
    """asyncio.run in a thread of its own, so a frozen event loop fails the test instead
    of hanging it."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(main())
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the event loop froze"
    if "error" in result:
        raise result["error"]
    value: T = result["value"]
    return value


def _no_pyaudio(monkeypatch: pytest.MonkeyPatch) -> None:
    def import_module(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(talkback, "importlib", types.SimpleNamespace(import_module=import_module))


@pytest.mark.parametrize("broken", ["no pyaudio", "no such device"])
def test_dead_speaker_never_blocks_the_loop(broken: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if broken == "no pyaudio":
        _no_pyaudio(monkeypatch)
    speaker = Speaker("no-such-device-here")
    track = ToneTrack(frames=150, interval=0.004)  # 3 queues full, faster than real time

    after_end, lag = _run_bounded(lambda: _play(speaker, track))
    assert track.sent == 150  # consumed to the end: the call's liveness sees media
    assert after_end < 0.1, f"play() returned {after_end * 1000:.0f} ms after the track ended"
    assert lag < MAX_LAG_S, f"the event loop was {lag * 1000:.0f} ms late"
    assert speaker.health.state == State.DOWN
    expected = "ImportError" if broken == "no pyaudio" else "no output device matching"
    assert expected in speaker.health.detail, speaker.health.detail
    assert speaker.samples_played == 0
    speaker.close()
    speaker.close()  # idempotent


def test_close_stops_a_playing_speaker_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_pyaudio(monkeypatch)

    async def main() -> float:
        speaker = Speaker("")
        task = asyncio.create_task(speaker.play(ToneTrack(frames=10_000, interval=0.02)))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        speaker.close()
        speaker.close()
        took = time.monotonic() - start
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass  # what the call session does when the call ends
        return took

    assert _run_bounded(main) < 0.01


def test_speaker_plays_the_dispatcher_into_pulseaudio(pulse: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # PortAudio reaches PulseAudio through ALSA's "pulse" device; PULSE_SINK picks the
    # car's speaker, the conftest's null sink named "speaker".
    for key, value in {**pulse, "PULSE_SINK": "speaker"}.items():
        monkeypatch.setenv(key, value)
    speaker = Speaker("pulse")
    # 4 s in real time: PortAudio's ALSA "pulse" device stalls for about 1.9 s on its
    # third write here, so the speaker sounds only after that.
    track = ToneTrack(frames=200, interval=0.02, hz=440.0)

    async def main() -> tuple[tuple[float, float], bytes, str]:
        played = asyncio.create_task(_play(speaker, track))
        for _ in range(70):
            if speaker.samples_played >= 10 * SAMPLES:
                break
            await asyncio.sleep(0.05)
        during = f"{speaker.health.state}: {speaker.health.detail}"
        pcm = await asyncio.to_thread(record_sink, pulse, "speaker", 1.0)
        return await played, pcm, during

    (after_end, lag), pcm, during = _run_bounded(main)
    assert during == "ok: playing the dispatcher"
    assert after_end < 0.1 and lag < MAX_LAG_S, (after_end, lag)
    wait_for(lambda: not speaker.writing, 5, "the queued audio to play out")
    assert speaker.health.state == State.OK and speaker.health.detail == "idle"
    assert speaker.samples_played >= 100 * SAMPLES, speaker.samples_played / SAMPLES
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    assert len(samples) > 24000, len(samples)
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = float(np.argmax(spectrum)) * 48000 / len(samples)
    assert abs(peak_hz - 440) < 10, peak_hz
    assert np.sqrt(np.mean(samples**2)) > 1000
    speaker.close()
