"""The health a source reports: what status shows for camera, microphone and GPS."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dashsos import clock


class State(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"
    SIMULATED = "simulated"  # working, but not real hardware: never silent about it


@dataclass
class Health:
    backend: str
    state: State = State.DOWN
    detail: str = "starting"
    since_ns: int = field(default_factory=clock.now_ns)

    def set(self, state: State, detail: str) -> bool:
        """Record a new state; True when it changed (so callers log only transitions)."""
        changed = state != self.state or detail != self.detail
        if state != self.state:
            self.since_ns = clock.now_ns()
        self.state, self.detail = state, detail
        return changed

    @property
    def recording(self) -> bool:
        return self.state in (State.OK, State.DEGRADED, State.SIMULATED)

    def as_dict(self) -> dict[str, object]:
        return {"backend": self.backend, "state": str(self.state), "detail": self.detail,
                "since": clock.iso(self.since_ns)}
