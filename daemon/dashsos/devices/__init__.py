"""The car's devices behind one factory, chosen once, like gpiozero's pin factories.

`ConfigDevices` builds what the config names (`auto` picks real hardware when present);
`dashsos.devices.mock.MockDevices` builds simulated ones for tests and demos. The code
above never knows which it got. `auto` never falls back to a simulated device: a car
without a camera records without video and says so, rather than recording a test
pattern as evidence.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from dashsos.call.talkback import Speaker
from dashsos.config import Config
from dashsos.feedback.indicator import Indicator
from dashsos.location.fix import Fix
from dashsos.location.gpsd_source import GpsdSource
from dashsos.location.simulated import SimulatedGps
from dashsos.media import picamera2_video
from dashsos.media.audio import PyAudioMicrophone, ToneAudioSource
from dashsos.media.ffmpeg_video import FFmpegVideoSource
from dashsos.media.source import AudioSource, Source, VideoSource
from dashsos.triggers import button
from dashsos.triggers.button import ButtonEvents, PanicButton

log = logging.getLogger(__name__)


class DeviceFactory(Protocol):
    """Each method builds one device, or None when the car has none."""

    def camera(self) -> VideoSource | None: ...
    def microphone(self) -> AudioSource | None: ...
    def gps(self) -> Source[Fix] | None: ...
    def speaker(self) -> Callable[[], Speaker] | None: ...  # a new player per call
    def button(self, loop: asyncio.AbstractEventLoop,
               events: ButtonEvents) -> PanicButton | None: ...
    def indicator(self) -> Indicator | None: ...


class ConfigDevices:
    def __init__(self, config: Config) -> None:
        self.config = config

    def camera(self) -> VideoSource | None:
        v = self.config.video
        backend = v.backend
        if backend == "auto":
            if picamera2_video.available():
                backend = "picamera2"
            elif os.path.exists("/dev/video0"):
                v = replace(v, input=v.input or "/dev/video0",
                            input_format=v.input_format or "v4l2")
                backend = "ffmpeg"
            else:
                log.warning("video: auto found no camera (no picamera2, no /dev/video0)")
                return None
            log.info("video: auto picked %s", backend)
        if backend == "picamera2":
            return picamera2_video.Picamera2VideoSource(v)
        if backend == "ffmpeg":
            return FFmpegVideoSource(v)
        if backend == "test":
            return FFmpegVideoSource(v, test_pattern=True)
        return None

    def microphone(self) -> AudioSource | None:
        backend = self.config.audio.backend
        if backend == "auto":
            backend = "pyaudio" if importlib.util.find_spec("pyaudio") else "none"
            if backend == "none":
                log.warning("audio: auto found no PortAudio bindings (pip install pyaudio)")
        if backend == "pyaudio":
            return PyAudioMicrophone(self.config.audio)
        if backend == "test":
            return ToneAudioSource(self.config.audio)
        return None

    def gps(self) -> Source[Fix] | None:
        backend = self.config.gps.backend
        if backend in ("auto", "gpsd"):
            return GpsdSource(self.config.gps)
        if backend == "simulated":
            return SimulatedGps()
        return None

    def speaker(self) -> Callable[[], Speaker] | None:
        device = self.config.call.speaker
        if device == "none":
            return None
        return lambda: Speaker(device)

    def button(self, loop: asyncio.AbstractEventLoop,
               events: ButtonEvents) -> PanicButton | None:
        return button.make(self.config.button, loop, events)

    def indicator(self) -> Indicator | None:
        c = self.config.indicator
        if c.backend == "none":
            return None
        factory = None
        if c.backend == "mock":
            factory = importlib.import_module("gpiozero.pins.mock").MockFactory()
        try:
            return Indicator(c.pin, active_high=c.active_high, pin_factory=factory)
        except Exception as exc:  # no GPIO here: the car works without its light
            log.warning("indicator: %s on %s unavailable: %s", c.backend, c.pin, exc)
            return None
