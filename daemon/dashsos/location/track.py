"""Track history: recent fixes in order, bounded by time."""

from __future__ import annotations

from collections import deque

from dashsos import clock
from dashsos.clock import NS
from dashsos.location.fix import Fix


class Track:
    def __init__(self, seconds: float) -> None:
        self._span_ns = int(seconds * NS)
        self._fixes: deque[Fix] = deque()

    def add(self, fix: Fix) -> None:
        self._fixes.append(fix)
        while self._fixes and self._fixes[0].capture_ns < fix.capture_ns - self._span_ns:
            self._fixes.popleft()

    @property
    def last(self) -> Fix | None:
        return self._fixes[-1] if self._fixes else None

    def since(self, capture_ns: int) -> list[Fix]:
        return [f for f in self._fixes if f.capture_ns >= capture_ns]

    def previous(self, count: int, spacing_s: float = 1.0) -> list[Fix]:
        """Up to `count` fixes before the last one, newest first, each at least `spacing_s`
        before the one after it (the MSD wants two): at 5 or 10 Hz the fixes just before
        are centimetres away and would show no direction of travel."""
        later = self.last
        picked: list[Fix] = []
        for fix in reversed(list(self._fixes)[:-1]):
            if later is None or len(picked) == count:
                break
            if _seconds_between(fix, later) >= spacing_s:
                picked.append(fix)
                later = fix
        return picked

    def last_known(self) -> dict[str, object] | None:
        """The last position and its age, which status reports when there is no fix."""
        fix = self.last
        if fix is None:
            return None
        return {**fix.as_dict(), "age_seconds": round((clock.now_ns() - fix.capture_ns) / NS, 1)}


def _seconds_between(earlier: Fix, later: Fix) -> float:
    """On the receiver's clock when both fixes have its time, else on receipt."""
    if earlier.receiver_ns is not None and later.receiver_ns is not None:
        return (later.receiver_ns - earlier.receiver_ns) / NS
    return (later.capture_ns - earlier.capture_ns) / NS
