"""What every capture device looks like to the rest of dashsos.

Like gpiozero's pin factories: the code above never knows whether it got a Pi camera,
a USB camera, a test pattern or a tone; it gets packets and a Health.

Each source also looks after itself (issue 9). A device can freeze without an error: a
picamera2 encoder that hangs, an IP camera whose stream stops, a microphone whose
callback is no longer called. A source that is recording yet has delivered nothing for
STALL_S says so in its health, ends that capture and opens the device again, alone: the
call, the other sources and the daemon's watchdog carry on.

Threads: one supervisor per source runs the retry loop and starts each attempt (open,
capture, close) on a capture thread of its own. It is a separate thread rather than
timeouts inside the capture because a capture can hang where no timeout of ours runs
(inside picamera2's stop, a PortAudio close, a blocking device read), and only another
thread can then give up on it and start afresh.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from dashsos.health import Health, State
from dashsos.media.packet import AudioFormat, Packet, VideoFormat

T = TypeVar("T")

# A vanished device is looked for this often at most: back within 5 s of its return.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 2.0
# Recording, yet nothing delivered for this long: the device is stalled and restarted.
STALL_S = 3.0
# A capture told to end (stall or stop) gets this long to return and release its device;
# after that its thread is abandoned (a daemon thread) and a fresh capture starts.
STOP_BOUND_S = 2.0
# How often the supervisor looks; a stall is noticed within STALL_S plus this.
WATCH_S = 0.25
# Abandoned captures still hanging, each holding a thread and maybe a device: past this
# many, wait for one to end instead of leaking another.
MAX_ABANDONED = 2


class Interrupted(Exception):
    """Raised by capture code whose attempt was told to end (the source stops or stalled)."""


class Stalled(Exception):
    """Raised by capture code that noticed a stall itself (a read that timed out)."""


@dataclass
class SourceHealth(Health):
    """A source's Health, with how often it was restarted for stalling (status shows it)."""

    restarts: int = 0

    def as_dict(self) -> dict[str, object]:
        return {**super().as_dict(), "restarts": self.restarts}


class _Attempt:
    """One open-capture-close of the device, run on a capture thread of its own."""

    def __init__(self) -> None:
        self.halt = threading.Event()  # set: end now (the source stops, or it stalled)
        self.done = threading.Event()  # set by the capture thread once _close() returned
        self.started = time.monotonic()
        self.thread: threading.Thread | None = None
        self.stalled = False  # reported once, by whoever noticed first
        self.abandoned = False  # given up on: it must not report when it returns


class Source(ABC, Generic[T]):
    """A capture device run by threads of its own (or by its library's thread).

    `restarts` counts how many times the source was restarted because it stalled
    (recording, yet nothing delivered for `stall_seconds`); failures and the retries after
    them are not counted. `abandoned` counts captures that did not end within
    STOP_BOUND_S of being told to and were left behind.
    """

    kind = "source"
    # None: deliveries are not watched (a GPS without a fix legitimately delivers nothing).
    stall_seconds: float | None = None

    def __init__(self, backend: str) -> None:
        self.health = SourceHealth(backend)
        self.log = logging.getLogger(f"dashsos.{self.kind}")
        self.abandoned = 0
        self._sink: Callable[[T], None] = lambda item: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # the supervisor
        self._attempt: _Attempt | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # the capture thread's own attempt
        # What the running attempt opened (device, stream, container): per capture thread,
        # so that an attempt left behind, when it returns at last, closes its own.
        self._held = threading.local()
        self._stuck: list[threading.Thread] = []  # abandoned capture threads
        # When the last item was delivered (monotonic): written on the capture thread,
        # read by the supervisor; one float store per item.
        self._last_delivery = 0.0

    @property
    def restarts(self) -> int:
        return self.health.restarts

    @property
    def simulated(self) -> bool:
        return False

    def describe(self) -> str:
        return self.health.backend

    def start(self, deliver: Callable[[T], None]) -> None:
        self._sink = deliver
        self._stop.clear()
        self._thread = threading.Thread(target=self._supervise, name=f"{self.kind}-supervisor",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Never blocks for long: a capture that will not end is left behind."""
        # The capture thread closes its own device: closing it from here races the decoder.
        with self._lock:
            self._stop.set()
            attempt = self._attempt
        if attempt is not None:
            attempt.halt.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_BOUND_S + 1)

    @property
    def _halt(self) -> threading.Event:
        """Set when the running capture must end (stop or stall): capture code waits on it
        and checks it. On the capture thread it is that attempt's own event, so a capture
        that was abandoned still sees its own."""
        halt = getattr(self._local, "halt", None)
        return halt if isinstance(halt, threading.Event) else self._stop

    def _deliver(self, item: T) -> None:
        """Hand an item on, noting when; every capture path delivers through here."""
        self._last_delivery = time.monotonic()
        self._sink(item)

    # --- the supervisor ---

    def _supervise(self) -> None:
        """The retry loop: each attempt on a capture thread, watched; backoff between."""
        backoff = RETRY_MIN_S
        while self._room_for_another():
            attempt = _Attempt()
            with self._lock:
                if self._stop.is_set():
                    return
                self._attempt = attempt
            attempt.thread = threading.Thread(target=self._run, args=(attempt,),
                                              name=self.kind, daemon=True)
            attempt.thread.start()
            self._watch(attempt)
            if self._stop.is_set():
                return
            if attempt.stalled or self._last_delivery > attempt.started:
                backoff = RETRY_MIN_S  # it was working: open it again soon
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, RETRY_MAX_S)
            self.log.info("%s: retrying", self.health.backend)

    def _watch(self, attempt: _Attempt) -> None:
        """Until the attempt ends; a stall or a stop ends it, within STOP_BOUND_S."""
        while not attempt.done.wait(WATCH_S):
            if self._stop.is_set():
                attempt.halt.set()
                break
            idle = self._idle(attempt)
            if idle is not None:
                self._stalled(attempt, idle)
                break
        if not attempt.done.wait(STOP_BOUND_S):
            self._abandon(attempt)

    def _idle(self, attempt: _Attempt) -> float | None:
        """Seconds without data, when that makes this attempt stalled; else None."""
        if self.stall_seconds is None or not self.health.recording or attempt.halt.is_set():
            return None
        idle = time.monotonic() - max(self._last_delivery, attempt.started)
        return idle if idle >= self.stall_seconds else None

    def _stalled(self, attempt: _Attempt, idle: float) -> None:
        """Report the stall once per attempt and tell the capture to end."""
        with self._lock:
            if attempt.stalled or attempt.abandoned:
                return
            attempt.stalled = True
            self.health.restarts += 1
        attempt.halt.set()
        if self._last_delivery:
            idle = time.monotonic() - self._last_delivery  # the whole stall, across restarts
        first = not self.health.detail.startswith("stalled")
        self.health.set(State.DEGRADED, f"stalled: no data for {idle:.0f} s; restarting")
        # Once per stall, not once per restart of it: a camera may stay frozen for hours.
        self.log.log(logging.WARNING if first else logging.DEBUG,
                     "%s stalled: no data for %.0f s; restarting it (restart %d)",
                     self.health.backend, idle, self.health.restarts)

    def _abandon(self, attempt: _Attempt) -> None:
        with self._lock:
            if attempt.done.is_set():
                return
            attempt.abandoned = True
            self.abandoned += 1
        thread = attempt.thread
        if thread is not None:
            thread.name = f"{self.kind}-abandoned"  # shows in a thread dump
            self._stuck.append(thread)
        if not self._stop.is_set():
            self.log.warning("%s: capture did not end within %g s; left it behind and "
                             "starting a fresh one", self.health.backend, STOP_BOUND_S)

    def _room_for_another(self) -> bool:
        """False when stopped; waits while MAX_ABANDONED captures still hang."""
        while not self._stop.is_set():
            self._stuck = [t for t in self._stuck if t.is_alive()]
            if len(self._stuck) < MAX_ABANDONED:
                return True
            self._set(State.DOWN, f"{len(self._stuck)} captures hang; waiting for one to end")
            self._stop.wait(RETRY_MAX_S)
        return False

    # --- the capture thread ---

    def _run(self, attempt: _Attempt) -> None:
        self._local.halt = attempt.halt
        try:
            self._capture()
            if not attempt.halt.is_set():
                self._report(attempt, "input ended")
        except Stalled as exc:  # the capture noticed first (a read timed out)
            if attempt.halt.is_set():
                pass
            elif self.health.recording:
                self._stalled(attempt, self.stall_seconds or STALL_S)
            else:  # it never got going: that is down, not stalled
                self._report(attempt, str(exc))
        except Exception as exc:  # any device fault: report, keep the rest recording
            if not attempt.halt.is_set() and not isinstance(exc, Interrupted):
                self._report(attempt, f"{type(exc).__name__}: {exc}")
        finally:
            try:
                self._close()  # also when abandoned: it releases only what it opened
            except Exception:  # _close should not raise; never let it kill the thread
                self.log.exception("%s: closing failed", self.health.backend)
            attempt.done.set()

    def _report(self, attempt: _Attempt, detail: str) -> None:
        if not attempt.abandoned:
            self._set(State.DOWN, detail)

    def _set(self, state: State, detail: str) -> None:
        if state in (State.OK,) and self.simulated:
            state = State.SIMULATED
        if self.health.set(state, detail):
            level = logging.WARNING if state == State.DOWN else logging.INFO
            self.log.log(level, "%s %s: %s", self.health.backend, state, detail)

    @abstractmethod
    def _capture(self) -> None:
        """Open the device and deliver until it fails, ends or `_halt` is set. Runs on the
        capture thread; may raise Interrupted once halted, or Stalled."""

    def _close(self) -> None:
        """Release the device; runs on the capture thread after each attempt, also after
        one that was abandoned (when it returns at last). Keep what an attempt opens in
        `self._held`, which is per capture thread, so that it never closes what a newer
        attempt opened; publish on `self` only what other threads need, once not halted."""


class VideoSource(Source[Packet]):
    kind = "video"
    format: VideoFormat
    stall_seconds = STALL_S

    @abstractmethod
    def request_keyframe(self) -> None:
        """Make the next frame a keyframe (a call starting needs one now)."""


class AudioSource(Source[Packet]):
    kind = "audio"
    format: AudioFormat
    stall_seconds = STALL_S
