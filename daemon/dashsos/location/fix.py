"""A position fix, stamped on dashsos's clock like every packet."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    heading: float | None = None  # degrees from true north
    climb: float | None = None
    epx: float | None = None  # 95% error estimates, metres (speed: m/s)
    epy: float | None = None
    epv: float | None = None
    eps: float | None = None
    satellites_used: int | None = None

    @property
    def trustworthy(self) -> bool:
        """A 3D fix whose horizontal error (when reported) is under 50 m."""
        errors = [e for e in (self.epx, self.epy) if e is not None]
        return self.mode >= 3 and all(e < 50 for e in errors)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "capture_ns"}
        data["received"] = clock.iso(self.capture_ns)
        return data
