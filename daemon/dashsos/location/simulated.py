"""A simulated receiver: drives a loop at 1 Hz. Always reported as simulated."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from dashsos import clock
from dashsos.health import State
from dashsos.location.fix import Fix
from dashsos.media.source import Source

CENTRE = (52.5200, 13.4050)  # an arbitrary city centre
RADIUS_DEG = 0.003
SPEED_MPS = 11.0


class SimulatedGps(Source[Fix]):
    kind = "gps"

    def __init__(self) -> None:
        super().__init__("simulated")

    @property
    def simulated(self) -> bool:
        return True

    def describe(self) -> str:
        return "simulated receiver"

    def _capture(self) -> None:
        step = 0
        self._set(State.OK, "simulated 3D fix")
        while not self._stop.wait(1.0):
            angle = step * SPEED_MPS / (RADIUS_DEG * 111_000)
            lat = CENTRE[0] + RADIUS_DEG * math.sin(angle)
            lon = CENTRE[1] + RADIUS_DEG * math.cos(angle) / math.cos(math.radians(CENTRE[0]))
            heading = (math.degrees(-angle) % 360)
            # Its "receiver time" is the system clock: it is simulated anyway.
            wall = time.time_ns()
            now = datetime.fromtimestamp(wall / 1e9, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
            self._deliver(Fix(clock.now_ns(), now, lat, lon, 3, alt=35.0, speed=SPEED_MPS,
                              heading=heading, epx=3.0, epy=3.0, epv=5.0,
                              receiver_ns=wall // 1_000_000 * 1_000_000))
            step += 1
