"""Microphone audio: PortAudio through pyaudio, or a simulated tone or recording.

Audio travels as 20 ms chunks of mono 16-bit PCM stamped on dashsos's clock; clips
encode it to AAC when they are written, the call to Opus. PCM keeps the idle cost at
nothing: 30 s of buffer is 2.9 MB.
"""

from __future__ import annotations

import importlib
import time
import wave
from fractions import Fraction
from typing import Any

import numpy as np

from dashsos import clock
from dashsos.clock import NS
from dashsos.config import AudioConfig
from dashsos.health import State
from dashsos.media import portaudio
from dashsos.media.packet import AudioFormat, Packet
from dashsos.media.source import STALL_S, AudioSource

CHUNK_SECONDS = 0.02


def pcm_packet(pcm: bytes, sample_rate: int, sample_index: int, capture_ns: int) -> Packet:
    samples = len(pcm) // 2
    return Packet("audio", "pcm_s16le", pcm, sample_index, Fraction(1, sample_rate),
                  capture_ns, samples * NS // sample_rate, True)


def read_wav(path: str, rate: int) -> np.ndarray[Any, np.dtype[np.int16]]:
    """A 16-bit PCM WAV file as mono samples at `rate` (linear resampling: for test
    sounds, not for evidence)."""
    with wave.open(path, "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * wav.getsampwidth()}-bit samples; 16-bit PCM needed")
        channels, source_rate = wav.getnchannels(), wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    mono = samples.reshape(-1, channels).mean(axis=1)
    if not len(mono):
        raise ValueError(f"{path}: no samples")
    if source_rate != rate:
        at = np.arange(int(len(mono) * rate / source_rate)) * source_rate / rate
        mono = np.interp(at, np.arange(len(mono)), mono)
    return np.asarray(mono.round(), dtype=np.int16)


class ToneAudioSource(AudioSource):
    """A sine tone, or a WAV file in a loop, paced by the clock: the simulated
    microphone."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__("test")
        self.format = AudioFormat(config.sample_rate)
        self._hz = config.tone_hz
        self._sound = config.test_sound

    @property
    def simulated(self) -> bool:
        return True

    def describe(self) -> str:
        what = f"{self._sound} in a loop" if self._sound else f"{self._hz:g} Hz tone"
        return f"{what} (simulated)"

    def _samples(self, start: int, count: int,
                 sound: np.ndarray[Any, np.dtype[np.int16]] | None) -> bytes:
        at = np.arange(start, start + count)
        if sound is not None:
            return sound[at % len(sound)].astype("<i2").tobytes()
        t = at / self.format.sample_rate
        return (np.sin(2 * np.pi * self._hz * t) * 8000).astype("<i2").tobytes()

    def _capture(self) -> None:
        rate = self.format.sample_rate
        sound = read_wav(self._sound, rate) if self._sound else None
        chunk = int(rate * CHUNK_SECONDS)
        started = time.monotonic()
        n = 0
        halt = self._halt
        self._set(State.OK, self.describe())
        while not halt.is_set():
            delay = started + (n + 1) * CHUNK_SECONDS - time.monotonic()
            if delay > 0 and halt.wait(delay):
                return
            captured = clock.now_ns() - int(CHUNK_SECONDS * NS)
            self._deliver(pcm_packet(self._samples(n * chunk, chunk, sound), rate, n * chunk,
                                     captured))
            n += 1


class PyAudioMicrophone(AudioSource):
    """A PortAudio input in callback mode; PortAudio's thread hands chunks over."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__("pyaudio")
        self.format = AudioFormat(config.sample_rate)
        self._device = config.device

    def describe(self) -> str:
        return f"PortAudio input {self._device or 'default'}"

    def _capture(self) -> None:
        pyaudio = importlib.import_module("pyaudio")
        rate = self.format.sample_rate
        chunk = int(rate * CHUNK_SECONDS)
        halt = self._halt
        held = self._held
        held.pa = pa = pyaudio.PyAudio()
        if halt.is_set():  # halted while PortAudio was starting (it can hang): no more
            return
        samples = 0
        heard = False

        def on_audio(in_data: bytes | None, frame_count: int, time_info: Any,
                     status: int) -> tuple[None, int]:
            nonlocal heard, samples
            if halt.is_set():  # a stream being closed, or left behind by a restart
                return None, pyaudio.paAbort
            now = clock.now_ns()
            if in_data:
                self._deliver(pcm_packet(in_data, rate, samples,
                                         now - frame_count * NS // rate))
                samples += frame_count
                if not heard:  # ok once sound arrives, not when the stream opens
                    heard = True
                    self._set(State.OK, f"{self.describe()} at {rate} Hz")
            return None, pyaudio.paContinue

        # No microphone raises OSError -9996 here: the source is down, video goes on.
        held.stream = stream = pa.open(
            format=pyaudio.paInt16, channels=1, rate=rate, input=True,
            frames_per_buffer=chunk,
            input_device_index=portaudio.device_index(pa, self._device, output=False),
            stream_callback=on_audio)
        stream.start_stream()
        opened = time.monotonic()
        # A callback that stops being called is a stall: the supervisor notices and halts.
        # One that never starts is not recording yet, so it is ended here.
        while not halt.wait(0.5):
            if not stream.is_active():
                raise OSError("audio stream stopped")
            if not heard and time.monotonic() - opened > STALL_S:
                raise OSError(f"no audio for {STALL_S:g} s after opening")

    def _close(self) -> None:
        held = self._held
        stream, pa = getattr(held, "stream", None), getattr(held, "pa", None)
        held.stream = held.pa = None
        for action in ((lambda: stream.stop_stream()) if stream else None,
                       (lambda: stream.close()) if stream else None,
                       (lambda: pa.terminate()) if pa else None):
            if action:
                try:
                    action()
                except Exception:  # a vanished device fails to close; it is gone anyway
                    pass


