"""Simulated devices, like gpiozero's MockFactory: a test pattern camera, a tone, a
receiver driving a loop, a speaker that counts what it is given and a gpiozero mock
button. Every one reports itself as simulated. Tests build a daemon with these and no
device strings in the config: `App(config, devices=MockDevices())`.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Any

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from dashsos.call.talkback import Speaker
from dashsos.config import AudioConfig, ButtonConfig, VideoConfig
from dashsos.feedback.indicator import Indicator
from dashsos.health import State
from dashsos.location.fix import Fix
from dashsos.location.simulated import SimulatedGps
from dashsos.media.audio import ToneAudioSource
from dashsos.media.ffmpeg_video import FFmpegVideoSource
from dashsos.media.source import AudioSource, Source, VideoSource
from dashsos.triggers.button import ButtonEvents, PanicButton


class MockSpeaker(Speaker):
    """Takes the dispatcher's audio and counts it; plays nothing."""

    def __init__(self) -> None:
        super().__init__("mock")
        self.health.backend = "mock"

    async def play(self, track: MediaStreamTrack) -> None:
        self.health.set(State.SIMULATED, "counting the dispatcher's audio")
        try:
            while True:
                frame = await track.recv()
                self.samples_played += int(getattr(frame, "samples", 0))
        except (MediaStreamError, asyncio.CancelledError):
            pass


class MockDevices:
    """Defaults small enough for tests: 320x240 at 30 fps, a 1 kHz tone."""

    def __init__(self, *, video: VideoConfig | None = None, audio: AudioConfig | None = None,
                 button: ButtonConfig | None = None, camera: bool = True,
                 microphone: bool = True, gps: bool = True, speaker: bool = True,
                 indicator: bool = True, indicator_pin: str = "GPIO27") -> None:
        self.video_config = video or VideoConfig(backend="test", width=320, height=240,
                                                 fps=30, bitrate=400_000)
        self.audio_config = audio or AudioConfig(backend="test")
        self.button_config = button or ButtonConfig(backend="mock", long_press_seconds=0.5)
        self._has = {"camera": camera, "microphone": microphone, "gps": gps,
                     "speaker": speaker, "indicator": indicator}
        self.indicator_pin = indicator_pin
        self.pin_factory: Any = None  # gpiozero's MockFactory once the button is built
        self.speakers: list[MockSpeaker] = []

    def camera(self) -> VideoSource | None:
        return FFmpegVideoSource(self.video_config, test_pattern=True) \
            if self._has["camera"] else None

    def microphone(self) -> AudioSource | None:
        return ToneAudioSource(self.audio_config) if self._has["microphone"] else None

    def gps(self) -> Source[Fix] | None:
        return SimulatedGps() if self._has["gps"] else None

    def speaker(self) -> Callable[[], Speaker] | None:
        if not self._has["speaker"]:
            return None

        def new() -> Speaker:
            speaker = MockSpeaker()
            self.speakers.append(speaker)
            return speaker

        return new

    def _pins(self) -> Any:
        if self.pin_factory is None:
            self.pin_factory = importlib.import_module("gpiozero.pins.mock").MockFactory()
        return self.pin_factory

    def button(self, loop: asyncio.AbstractEventLoop,
               events: ButtonEvents) -> PanicButton | None:
        return PanicButton(self.button_config, loop, events, pin_factory=self._pins())

    def indicator(self) -> Indicator | None:
        """A LED on the same MockFactory as the button: `pin_factory.pin(27).states` is
        its history of (timestamp, state)."""
        if not self._has["indicator"]:
            return None
        return Indicator(self.indicator_pin, pin_factory=self._pins())
