"""A position fix, stamped on dashsos's clock like every packet."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from dashsos import clock


@dataclass(frozen=True, slots=True)
class Fix:
    capture_ns: int  # when dashsos received it (monotonic clock)
    time: str  # the receiver's UTC time, ISO 8601, as gpsd reported it ("" if none)
    lat: float
    lon: float
    mode: int  # 2 = 2D, 3 = 3D
    alt: float | None = None  # metres
    speed: float | None = None  # metres per second
    heading: float | None = None  # course over ground, degrees from true north
    climb: float | None = None
    epx: float | None = None  # 95% error estimates, metres (speed: m/s)
    epy: float | None = None
    epv: float | None = None
    eps: float | None = None
    satellites_used: int | None = None
    receiver_ns: int | None = None  # `time` as ns since 1970 (None: no receiver time)
    magnetic_heading: float | None = None  # course from magnetic north (gpsd's magtrack)
    epd: float | None = None  # 95% error of the course, degrees

    @property
    def trustworthy(self) -> bool:
        """A 3D fix whose horizontal error (when reported) is under 50 m."""
        errors = [e for e in (self.epx, self.epy) if e is not None]
        return self.mode >= 3 and all(e < 50 for e in errors)

    def as_dict(self) -> dict[str, Any]:
        """Known fields, plus `unknown`: the fields the receiver did not report (absent is
        unknown, never 0)."""
        fields = asdict(self)
        data = {k: v for k, v in fields.items()
                if v is not None and k not in ("capture_ns", "receiver_ns")}
        data["unknown"] = sorted(k for k in REPORTED if fields[k] is None)
        data["received"] = clock.iso(self.capture_ns)
        return data


# Fields a receiver may or may not report; status and MQTT list the missing ones.
REPORTED = ("alt", "speed", "heading", "climb", "epx", "epy", "epv", "eps")


def parse_time_ns(stamp: str) -> int | None:
    """gpsd's ISO 8601 UTC time ("2024-05-01T12:00:00.200Z") as ns since 1970."""
    try:
        t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        return None
    # Whole seconds and microseconds separately: a float would lose the sub-ms part.
    seconds = int(t.timestamp() // 1)
    return seconds * 1_000_000_000 + t.microsecond * 1000
