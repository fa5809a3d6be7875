"""The dispatcher's voice, played through the car's speaker (never in covert mode).

Frames from the remote audio track are resampled to 48 kHz mono and written to a
PortAudio output stream by a thread, so a slow sound device never blocks the loop.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import queue
import threading
from typing import Any

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from dashsos.health import Health, State

log = logging.getLogger(__name__)
RATE = 48000


class Speaker:
    def __init__(self, device: str) -> None:
        self.health = Health("pyaudio")
        self._device = device
        self._frames: queue.Queue[bytes | None] = queue.Queue(50)
        self._thread: threading.Thread | None = None
        self.samples_played = 0

    async def play(self, track: MediaStreamTrack) -> None:
        """Play until the track ends."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        self._thread = threading.Thread(target=self._write, name="speaker", daemon=True)
        self._thread.start()
        try:
            while True:
                frame = await track.recv()
                for out in resampler.resample(frame):  # type: ignore[arg-type]
                    try:
                        self._frames.put_nowait(bytes(out.planes[0])[: out.samples * 2])
                    except queue.Full:
                        pass  # the device is stuck: drop rather than grow
        except (MediaStreamError, asyncio.CancelledError):
            pass
        finally:
            self._frames.put(None)

    def _write(self) -> None:
        try:
            pyaudio = importlib.import_module("pyaudio")
            pa = pyaudio.PyAudio()
        except Exception as exc:  # no PortAudio: the call goes on without the speaker
            self.health.set(State.DOWN, f"{type(exc).__name__}: {exc}")
            log.warning("speaker unavailable: %s", exc)
            return
        stream: Any = None
        try:
            index = None
            if self._device.isdigit():
                index = int(self._device)
            elif self._device:
                for i in range(pa.get_device_count()):
                    info = pa.get_device_info_by_index(i)
                    if self._device in str(info.get("name")) and info.get("maxOutputChannels"):
                        index = i
                        break
            stream = pa.open(format=pyaudio.paInt16, channels=1, rate=RATE, output=True,
                             output_device_index=index, frames_per_buffer=960)
            self.health.set(State.OK, "playing the dispatcher")
            while (data := self._frames.get()) is not None:
                stream.write(data)
                self.samples_played += len(data) // 2
        except Exception as exc:  # a vanished device: the call goes on without it
            self.health.set(State.DOWN, f"{type(exc).__name__}: {exc}")
            log.warning("speaker failed: %s", exc)
        finally:
            if stream is not None:
                try:
                    stream.stop_stream()
                    stream.close()
                except Exception:
                    pass
            pa.terminate()
