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

    def previous(self, count: int) -> list[Fix]:
        """The `count` fixes before the last one, newest first (the MSD wants two)."""
        return list(self._fixes)[-1 - count:-1][::-1]

    def last_known(self) -> dict[str, object] | None:
        """The last position and its age, which status reports when there is no fix."""
        fix = self.last
        if fix is None:
            return None
        return {**fix.as_dict(), "age_seconds": round((clock.now_ns() - fix.capture_ns) / NS, 1)}
