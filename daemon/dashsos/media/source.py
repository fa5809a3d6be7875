"""What every capture device looks like to the rest of dashsos.

Like gpiozero's pin factories: the code above never knows whether it got a Pi camera,
a USB camera, a test pattern or a tone; it gets packets and a Health.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

from dashsos.health import Health, State
from dashsos.media.packet import AudioFormat, Packet, VideoFormat

T = TypeVar("T")

# A vanished device is looked for this often at most: back within 5 s of its return.
RETRY_MAX_S = 2.0


class Source(ABC, Generic[T]):
    """A capture device run by a thread of its own (or by its library's thread)."""

    kind = "source"

    def __init__(self, backend: str) -> None:
        self.health = Health(backend)
        self.log = logging.getLogger(f"dashsos.{self.kind}")
        self._deliver: Callable[[T], None] = lambda item: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def simulated(self) -> bool:
        return False

    def describe(self) -> str:
        return self.health.backend

    def start(self, deliver: Callable[[T], None]) -> None:
        self._deliver = deliver
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_forever, name=self.kind, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        # The capture thread closes its own device: closing it from here races the decoder.
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=3)

    def _run_forever(self) -> None:
        """Capture until stopped; a failure marks the source down and retries with backoff."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._capture()
                if not self._stop.is_set():
                    self._set(State.DOWN, "input ended")
            except Exception as exc:  # any device fault: report, keep the rest recording
                self._set(State.DOWN, f"{type(exc).__name__}: {exc}")
            finally:
                self._close()
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, RETRY_MAX_S)
            self.log.info("%s: retrying", self.health.backend)

    def _set(self, state: State, detail: str) -> None:
        if state in (State.OK,) and self.simulated:
            state = State.SIMULATED
        if self.health.set(state, detail):
            level = logging.WARNING if state == State.DOWN else logging.INFO
            self.log.log(level, "%s %s: %s", self.health.backend, state, detail)

    @abstractmethod
    def _capture(self) -> None:
        """Open the device and deliver packets until it fails, ends or stop is set."""

    def _close(self) -> None:
        """Release the device; runs on the capture thread after each attempt."""


class VideoSource(Source[Packet]):
    kind = "video"
    format: VideoFormat

    @abstractmethod
    def request_keyframe(self) -> None:
        """Make the next frame a keyframe (a call starting needs one now)."""


class AudioSource(Source[Packet]):
    kind = "audio"
    format: AudioFormat
