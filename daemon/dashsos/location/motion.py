"""A sudden stop seen by GPS: the automatic trigger until an accelerometer is supported.

A heuristic: GPS speed cannot see an impact, only its result. It fires when the car was
at `min_speed_kmh` or more and, within `within_seconds` of receiver time, at
`stop_speed_kmh` or less, and stays there for `confirm_fixes` fixes in a row.
A receiver samples: a drop that really took `within_seconds` is seen over up to one
cycle more, so one cycle of slack is allowed (at 1 Hz, a drop taking up to 3 s with the
default 2 s can trigger; one taking 2 s or less always does).

Everything is judged on the receiver's time (when the fix was valid), never on when it
arrived: gpsd and the network add jitter, a 5 Hz receiver delivers in bursts.
Hysteresis, so that bad reception is not a crash:
- only trustworthy 3D fixes with a known speed count; a 2D fix, an untrusted one, a lost
  epoch (a gap over 1.5 receiver cycles, or over `max_gap_seconds`) or time running
  backwards forgets everything before it: no judgement across an outage, so the first fix after a
  loss (often 0 km/h before the receiver has a velocity) cannot complete a stop;
- the stop must be confirmed by `confirm_fixes` consecutive fixes at or below the stop
  speed (one glitch reading 0 is not a stop);
- one trigger per stop: after it, the car must reach `min_speed_kmh` again.
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
        self._window_ns = round(config.within_seconds * NS)
        self._max_gap_ns = round(config.max_gap_seconds * NS)
        self._confirm = config.confirm_fixes
        self._recent: deque[Fix] = deque()  # continuous trustworthy fixes, receiver time
        self._stopped: list[Fix] = []  # consecutive fixes at or below the stop speed
        self._fired = False  # a stop was reported; wait for min speed again
        self._gaps: deque[int] = deque(maxlen=20)  # receiver-time gaps, across resets
        self._last_t: int | None = None

    def reset(self) -> None:
        self._recent.clear()
        self._stopped.clear()

    def feed(self, fix: Fix) -> str | None:
        """Returns a description when this fix completes a sudden stop."""
        t = fix.receiver_ns
        if t is None or fix.speed is None or fix.mode < 3 or not fix.trustworthy:
            self.reset()  # no judgement across an untrusted fix
            return None
        if self._last_t is not None and t > self._last_t:
            self._gaps.append(t - self._last_t)
        if self._recent:
            last = self._recent[-1].receiver_ns
            assert last is not None
            # A lost epoch (a gap over 1.5 cycles), a dropout, a repeated or backwards time.
            if t <= last or t - last > min(self._max_gap_ns, self._cycle_ns() * 3 // 2):
                self.reset()
        self._last_t = t
        self._recent.append(fix)
        # Keep what a stop can still start from: the window before the first stopped fix,
        # which is at most `confirm` gaps back.
        horizon = t - self._window_ns - (self._confirm + 1) * self._max_gap_ns
        while (self._recent[0].receiver_ns or 0) < horizon:
            self._recent.popleft()
        if fix.speed >= self._min:
            self._fired = False
        if fix.speed > self._stop:
            self._stopped.clear()
            return None
        self._stopped.append(fix)
        if self._fired or len(self._stopped) < self._confirm:
            return None
        first_stop = self._stopped[0]
        assert first_stop.receiver_ns is not None
        # The true drop lies between the fixes: the last fast fix can be up to one cycle
        # before the car fell below min speed, the first stopped one up to a cycle after
        # it reached the stop speed. One cycle of slack keeps "45 to 0 in 2 s" a stop at
        # 1 Hz; it also means a drop of up to window + one cycle can trigger.
        allowed = self._window_ns + self._cycle_ns()
        fast = [f for f in self._recent
                if f.speed is not None and f.speed >= self._min
                and f.receiver_ns is not None
                and 0 < first_stop.receiver_ns - f.receiver_ns <= allowed]
        if not fast:
            return None
        # The speed the car came from (the latest fix at it: the drop as it was seen).
        before = max(fast, key=lambda f: (f.speed or 0.0, f.receiver_ns or 0))
        assert before.speed is not None and before.receiver_ns is not None
        self._fired = True
        self._stopped.clear()
        seconds = (first_stop.receiver_ns - before.receiver_ns) / NS
        assert first_stop.speed is not None
        return (f"{before.speed / KMH:.0f} km/h to {first_stop.speed / KMH:.0f} km/h "
                f"in {seconds:.1f} s (receiver time)")

    def _cycle_ns(self) -> int:
        """The receiver's cycle: the shortest recent gap between fixes (max_gap until
        there are two)."""
        return min(self._gaps) if self._gaps else self._max_gap_ns

    def triggering(self, trigger: Callable[[str], object]) -> Callable[[Fix], None]:
        """A fix subscriber that calls `trigger(description)` when a stop completes."""
        def on_fix(fix: Fix) -> None:
            stop = self.feed(fix)
            if stop:
                trigger(stop)

        return on_fix
