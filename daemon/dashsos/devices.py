"""Chooses each device's backend from config; `auto` picks real hardware when present.

`auto` never falls back to a simulated device: a car without a camera records without
video and says so, rather than recording a test pattern as evidence.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from dashsos.config import Config
from dashsos.location.fix import Fix
from dashsos.location.gpsd_source import GpsdSource
from dashsos.location.simulated import SimulatedGps
from dashsos.media import picamera2_video
from dashsos.media.audio import PyAudioMicrophone, ToneAudioSource
from dashsos.media.ffmpeg_video import FFmpegVideoSource
from dashsos.media.source import AudioSource, Source, VideoSource

log = logging.getLogger(__name__)


def video_source(config: Config) -> VideoSource | None:
    v = config.video
    backend = v.backend
    if backend == "auto":
        if picamera2_video.available():
            backend = "picamera2"
        elif os.path.exists("/dev/video0"):
            from dataclasses import replace
            v = replace(v, input=v.input or "/dev/video0", input_format=v.input_format or "v4l2")
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


def audio_source(config: Config) -> AudioSource | None:
    backend = config.audio.backend
    if backend == "auto":
        backend = "pyaudio" if importlib.util.find_spec("pyaudio") else "none"
        if backend == "none":
            log.warning("audio: auto found no PortAudio bindings (pip install pyaudio)")
    if backend == "pyaudio":
        return PyAudioMicrophone(config.audio)
    if backend == "test":
        return ToneAudioSource(config.audio)
    return None


def gps_source(config: Config) -> Source[Fix] | None:
    backend = config.gps.backend
    if backend in ("auto", "gpsd"):
        return GpsdSource(config.gps)
    if backend == "simulated":
        return SimulatedGps()
    return None
