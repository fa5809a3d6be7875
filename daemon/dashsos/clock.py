"""One time model for the whole daemon.

- Monotonic nanoseconds order everything (packets, fixes, incidents): they never jump,
  so clip, track and call agree with each other.
- Wall time is a mapping from monotonic time that follows the system clock's steps: a
  Raspberry Pi has no real-time clock, boots with fake-hwclock's last time (or 1970) and
  is stepped later by NTP or gpsd. Every conversion measures the mapping again, so a
  time written after a step is right even if it happened before it; steps are detected
  (the system clock moved against the monotonic one by more than STEP_NS), logged and
  kept, so a record written later re-states its times and says that the clock moved.
- The kernel says whether the system clock is synchronised (adjtimex: STA_UNSYNC and
  maxerror; what timedated's NTPSynchronized reports). If it is not, GPS time is the
  trusted source: a fix carries the receiver's UTC time, and when the Pi's clock is off
  it by GPS_TRUST_NS or more, wall times are taken from GPS instead.
- `source()` names which clock the times came from: `ntp` (the synchronised system
  clock, whatever synchronised it), `gps`, or `unsynchronised`. `record(at_ns)` is what
  an incident writes: the source and the Pi-minus-GPS offset in effect at its trigger,
  the steps seen since.

GPS time from gpsd is the epoch's time, received some 0.1 to 1 s later (the receiver's
serial output, gpsd, the epoch assembly): GPS-derived wall times are good to about 1 s.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

NS = 1_000_000_000
STEP_NS = NS  # a jump of the system clock against the monotonic clock beyond this is a step
GPS_TRUST_NS = 2 * NS  # an unsynchronised clock this far from GPS time is corrected by it
GPS_FRESH_NS = 10 * NS  # a GPS time observation older than this no longer vouches
SYNC_CHECK_NS = NS  # how often the kernel is asked about synchronisation
MAX_ERROR_US = 500_000  # adjtimex maxerror (µs) beyond which the clock is not trusted

log = logging.getLogger(__name__)


def now_ns() -> int:
    return time.monotonic_ns()


class _FakeClock:
    """DASHSOS_FAKE_CLOCK=<file.json>: {"offset_seconds": N, "synchronised": bool}, read
    again whenever the file changes. A test (or bench) moves the daemon's idea of the
    system clock and its sync state with it, as a Pi booting years off and stepped later
    would, without moving the host's clock (libfaketime cannot leave CLOCK_MONOTONIC
    alone without breaking Python's sleeps)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = -1
        self.offset_ns = 0
        self.synchronised: bool | None = None

    def refresh(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self._mtime:
                return
            with open(self.path) as f:
                data = json.load(f)
            self._mtime = mtime
        except (OSError, ValueError):
            return
        self.offset_ns = round(float(data.get("offset_seconds", 0)) * NS)
        sync = data.get("synchronised")
        self.synchronised = sync if isinstance(sync, bool) else None


_FAKE = _FakeClock(os.environ["DASHSOS_FAKE_CLOCK"]) \
    if os.environ.get("DASHSOS_FAKE_CLOCK") else None


def _system_offset_ns() -> int:
    """System (wall) clock minus monotonic clock, now."""
    if _FAKE is not None:
        _FAKE.refresh()
        return time.time_ns() + _FAKE.offset_ns - time.monotonic_ns()
    return time.time_ns() - time.monotonic_ns()


class _Timex(ctypes.Structure):
    # The head of struct timex (linux/timex.h); the tail is padding we never read.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long),
                ("freq", ctypes.c_long), ("maxerror", ctypes.c_long),
                ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("_rest", ctypes.c_byte * 256)]


STA_UNSYNC = 0x0040
TIME_ERROR = 5


def kernel_synchronised() -> bool | None:
    """Is the system clock synchronised (NTP, chrony, timesyncd, or gpsd via chrony)?
    None when the kernel cannot be asked. DASHSOS_CLOCK_SYNC=yes|no or DASHSOS_FAKE_CLOCK
    override it (tests and benches, where the host's own state is not the car's)."""
    override = os.environ.get("DASHSOS_CLOCK_SYNC")
    if override in ("yes", "no"):
        return override == "yes"
    if _FAKE is not None:
        _FAKE.refresh()
        return _FAKE.synchronised
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = _Timex()  # modes 0: read only
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR and not timex.status & STA_UNSYNC \
        and timex.maxerror < MAX_ERROR_US


@dataclass(frozen=True)
class Step:
    at_mono_ns: int
    seconds: float  # how far the system clock jumped (positive: forward)
    source_after: str


@dataclass(frozen=True)
class _State:
    since_mono_ns: int
    source: str
    gps_offset_ns: int | None  # Pi's system clock minus GPS time (None: no GPS time)


class Clock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset = _system_offset_ns()
        self._synced: bool | None = kernel_synchronised()
        self._synced_checked = now_ns()
        self._gps_offset: int | None = None  # GPS time minus monotonic
        self._gps_seen = -GPS_FRESH_NS * 2
        self.steps: deque[Step] = deque(maxlen=100)
        self._history: deque[_State] = deque(maxlen=1000)
        self._history.append(_State(now_ns(), self._source_locked(now_ns()), None))

    # --- observations ---

    def check(self) -> None:
        """Measure the system mapping again; log and keep a step."""
        offset = _system_offset_ns()
        now = now_ns()
        with self._lock:
            jump = offset - self._offset
            self._offset = offset
            if now - self._synced_checked >= SYNC_CHECK_NS:
                self._synced = kernel_synchronised()
                self._synced_checked = now
            source = self._source_locked(now)
            if abs(jump) > STEP_NS:
                self.steps.append(Step(now, jump / NS, source))
            self._note_locked(now, source)
        if abs(jump) > STEP_NS:
            log.warning("system clock stepped by %+.3f s; wall times now from %s (times "
                        "written before the step are re-stated in incident records)",
                        jump / NS, source)

    def observe_gps(self, receiver_ns: int, capture_ns: int) -> None:
        """A fix's receiver UTC time and the monotonic time it arrived."""
        self.check()
        with self._lock:
            self._gps_offset = receiver_ns - capture_ns
            self._gps_seen = capture_ns
            now = now_ns()  # the history stays in order even if the fix came late
            self._note_locked(now, self._source_locked(now))

    def _source_locked(self, now: int) -> str:
        if self._synced:
            return "ntp"
        if self._gps_offset is None:
            return "unsynchronised"
        # GPS vouches for the clock while its time is fresh; once wall times are taken
        # from GPS (the clock was off), they stay so through an outage: monotonic time
        # carries the mapping on.
        pi_minus_gps = self._pi_minus_gps_locked()
        if now - self._gps_seen < GPS_FRESH_NS or \
                (pi_minus_gps is not None and abs(pi_minus_gps) >= GPS_TRUST_NS):
            return "gps"
        return "unsynchronised"

    def _pi_minus_gps_locked(self) -> int | None:
        return None if self._gps_offset is None else self._offset - self._gps_offset

    def _note_locked(self, now: int, source: str) -> None:
        gps = self._pi_minus_gps_locked()
        last = self._history[-1]
        moved = (gps is None) != (last.gps_offset_ns is None) or (
            gps is not None and last.gps_offset_ns is not None
            and abs(gps - last.gps_offset_ns) > NS // 10)
        if source != last.source or moved:
            self._history.append(_State(now, source, gps))

    # --- conversions ---

    def to_wall_ns(self, mono_ns: int) -> int:
        self.check()
        with self._lock:
            pi_minus_gps = self._pi_minus_gps_locked()
            if self._synced or pi_minus_gps is None or abs(pi_minus_gps) < GPS_TRUST_NS:
                return mono_ns + self._offset
            # The Pi's clock is off and unsynchronised: GPS time it is (even for an older
            # monotonic time: the mapping, not the moment, was wrong).
            assert self._gps_offset is not None
            return mono_ns + self._gps_offset

    def source(self) -> str:
        self.check()
        with self._lock:
            return self._source_locked(now_ns())

    def state_at(self, mono_ns: int) -> _State:
        with self._lock:
            before = [s for s in self._history if s.since_mono_ns <= mono_ns]
            return before[-1] if before else self._history[0]

    def record(self, at_ns: int) -> dict[str, Any]:
        """What evidence says about its times: the source and the Pi-minus-GPS offset at
        `at_ns` (the trigger), the source now, and every step since the daemon started,
        with its time re-stated on today's mapping."""
        self.check()
        state = self.state_at(at_ns)
        return {
            "source": self.source(),
            "source_at_trigger": state.source,
            "pi_minus_gps_seconds_at_trigger": None if state.gps_offset_ns is None
            else round(state.gps_offset_ns / NS, 3),
            "steps": [{"at": iso(s.at_mono_ns), "seconds": round(s.seconds, 3),
                       "source_after": s.source_after} for s in list(self.steps)],
        }


CLOCK = Clock()


def to_wall_ns(mono_ns: int) -> int:
    return CLOCK.to_wall_ns(mono_ns)


def to_datetime(mono_ns: int) -> datetime:
    return datetime.fromtimestamp(to_wall_ns(mono_ns) / NS, tz=UTC)


def iso(mono_ns: int) -> str:
    """ISO 8601 UTC with milliseconds, as evidence files write time."""
    return to_datetime(mono_ns).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def source() -> str:
    return CLOCK.source()


def record(at_ns: int) -> dict[str, Any]:
    return CLOCK.record(at_ns)


def observe_gps(receiver_ns: int, capture_ns: int) -> None:
    CLOCK.observe_gps(receiver_ns, capture_ns)
