"""One clock for every packet and fix: monotonic nanoseconds, mapped once to wall time.

Monotonic time never jumps when NTP or GPS sets the wall clock, so clip, track and call
agree with each other; the mapping is taken once at start so all files agree too.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

NS = 1_000_000_000


def now_ns() -> int:
    return time.monotonic_ns()


_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def to_wall_ns(mono_ns: int) -> int:
    return mono_ns + _WALL_OFFSET_NS


def to_datetime(mono_ns: int) -> datetime:
    return datetime.fromtimestamp(to_wall_ns(mono_ns) / NS, tz=UTC)


def iso(mono_ns: int) -> str:
    """ISO 8601 UTC with milliseconds, as evidence files write time."""
    return to_datetime(mono_ns).isoformat(timespec="milliseconds").replace("+00:00", "Z")
