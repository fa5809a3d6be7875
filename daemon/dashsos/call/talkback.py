"""The dispatcher's voice, played through the car's speaker (never in covert mode).

Frames from the remote audio track are resampled to 48 kHz mono and written to a
PortAudio output stream by a thread, so a slow sound device never blocks the loop. Nothing
here waits on that thread: a full queue drops its oldest frame, and once the thread has
died (no PortAudio, device gone) the track is still consumed but nothing is queued.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
from typing import Any

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from dashsos.health import Health, State
from dashsos.media import portaudio

log = logging.getLogger(__name__)
RATE = 48000
QUEUED_FRAMES = 50  # about a second of 20 ms frames: late speech is worse than lost speech


class Speaker:
    """Plays remote tracks; `play()` and `close()` are called on the event loop only."""

    def __init__(self, device: str) -> None:
        self.health = Health("pyaudio")
        self.health.set(State.OK, "idle")
        self.samples_played = 0
        self._device = device
        self._frames: queue.Queue[bytes | None] = queue.Queue(QUEUED_FRAMES)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def writing(self) -> bool:
        """Whether a writer thread is alive to take frames."""
        return self._thread is not None and self._thread.is_alive()

    async def play(self, track: MediaStreamTrack) -> None:
        """Play until the track ends. Returns as soon as it does: what is queued plays out
        on the thread."""
        if not self._stop.is_set():
            self._frames = queue.Queue(QUEUED_FRAMES)  # a fresh one per track
            self._thread = threading.Thread(target=self._write, args=(self._frames,),
                                            name="speaker", daemon=True)
            self._thread.start()
        frames = self._frames
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        try:
            while True:
                frame = await track.recv()  # consumed even when unplayable: the call goes on
                if not self.writing:
                    continue
                for out in resampler.resample(frame):  # type: ignore[arg-type]
                    _offer(frames, bytes(out.planes[0])[: out.samples * 2])
        except MediaStreamError:
            pass  # the dispatcher's track ended
        finally:
            _offer(frames, None)

    def close(self) -> None:
        """Stop playing now, dropping what is queued. Never waits for the thread."""
        if self._stop.is_set():
            return
        self._stop.set()
        _offer(self._frames, None)  # wakes a thread waiting for a frame

    def _write(self, frames: queue.Queue[bytes | None]) -> None:
        pa: Any = None
        stream: Any = None
        try:
            pyaudio = importlib.import_module("pyaudio")
            pa = pyaudio.PyAudio()
            stream = pa.open(format=pyaudio.paInt16, channels=1, rate=RATE, output=True,
                             output_device_index=portaudio.device_index(
                                 pa, self._device, output=True),
                             frames_per_buffer=960)
            self.health.set(State.OK, "playing the dispatcher")
            while (data := frames.get()) is not None and not self._stop.is_set():
                stream.write(data)
                self.samples_played += len(data) // 2
            self.health.set(State.OK, "idle")
        except Exception as exc:  # no PortAudio or a vanished device: the call goes on
            self.health.set(State.DOWN, f"{type(exc).__name__}: {exc}")
            log.warning("speaker unavailable, the call goes on without it: %s", exc)
        finally:
            if stream is not None:
                try:
                    stream.stop_stream()
                    stream.close()
                except Exception:
                    pass  # a vanished device fails to close; it is gone anyway
            if pa is not None:
                pa.terminate()


def _offer(frames: queue.Queue[bytes | None], item: bytes | None) -> None:
    """Queue without ever blocking: a full queue drops its oldest frame. The loop is the
    only producer, so the slot freed is still free when put_nowait runs."""
    while True:
        try:
            frames.put_nowait(item)
            return
        except queue.Full:
            try:
                frames.get_nowait()
            except queue.Empty:
                pass  # the thread took one meanwhile
