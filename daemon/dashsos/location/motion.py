"""A sudden stop seen by GPS: the automatic trigger until an accelerometer is supported.

A heuristic: GPS speed at 1 Hz cannot see an impact, only its result. It fires when a
trustworthy 3D fix shows the car at `min_speed` or more and, within `within_seconds`,
at `stop_speed` or less: a deceleration no normal braking reaches from that speed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from dashsos.clock import NS
from dashsos.config import AutoTriggerConfig
from dashsos.location.fix import Fix

KMH = 1 / 3.6


class SuddenStopDetector:
    def __init__(self, config: AutoTriggerConfig) -> None:
        self._min = config.min_speed_kmh * KMH
        self._stop = config.stop_speed_kmh * KMH
        self._window_ns = int(config.within_seconds * NS)
        self._recent: deque[Fix] = deque()

    def feed(self, fix: Fix) -> str | None:
        """Returns a description when this fix completes a sudden stop."""
        if not fix.trustworthy or fix.speed is None:
            self._recent.clear()  # no judgement across an untrusted gap
            return None
        while self._recent and self._recent[0].capture_ns < fix.capture_ns - self._window_ns:
            self._recent.popleft()
        fast = [f for f in self._recent if f.speed is not None and f.speed >= self._min]
        self._recent.append(fix)
        if fix.speed <= self._stop and fast:
            before = fast[0]
            self._recent.clear()  # one trigger per stop
            seconds = (fix.capture_ns - before.capture_ns) / NS
            assert before.speed is not None
            return (f"{before.speed / KMH:.0f} km/h to {fix.speed / KMH:.0f} km/h "
                    f"in {seconds:.1f} s")
        return None

    def triggering(self, trigger: Callable[[str], object]) -> Callable[[Fix], None]:
        """A fix subscriber that calls `trigger(description)` when a stop completes."""
        def on_fix(fix: Fix) -> None:
            stop = self.feed(fix)
            if stop:
                trigger(stop)

        return on_fix
