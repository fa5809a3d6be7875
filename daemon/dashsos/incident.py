"""The incident state machine: the one place that decides what happens.

First form: a trigger opens an incident, which records `pre_seconds` before it and
`post_seconds` after the last trigger; a trigger while one is open extends it.
Everything with side effects (clip, files) is behind the Evidence port, so the
decisions here read in one sitting and test without devices.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from dashsos import clock
from dashsos.clock import NS

log = logging.getLogger(__name__)


class Phase(enum.StrEnum):
    RECORDING = "recording"  # pre-buffer written, post window running
    SAVING = "saving"  # post window over, files being finished
    SAVED = "saved"
    FAILED = "failed"  # finishing failed: what was written stays as .partial


@dataclass(frozen=True)
class Trigger:
    kind: str  # what fired: panic_button, local, mqtt, gps
    source: str  # who or what, e.g. "control socket uid 1000"
    at_ns: int

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "source": self.source, "time": clock.iso(self.at_ns)}


@dataclass
class Incident:
    id: str
    trigger: Trigger
    start_ns: int  # the earliest moment the clip may reach back to
    end_ns: int
    phase: Phase = Phase.RECORDING
    triggers: list[Trigger] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "phase": str(self.phase), "trigger": self.trigger.as_dict(),
                "triggers": [t.as_dict() for t in self.triggers],
                "ends": clock.iso(self.end_ns)}


class Evidence(Protocol):
    def open(self, incident: Incident) -> None: ...
    def extend(self, incident: Incident) -> None: ...
    async def close(self, incident: Incident) -> bool: ...


def new_id(at_ns: int) -> str:
    stamp = datetime.fromtimestamp(clock.to_wall_ns(at_ns) / NS, tz=UTC)
    return f"{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class IncidentMachine:
    def __init__(self, evidence: Evidence, pre_seconds: float, post_seconds: float) -> None:
        self._evidence = evidence
        self._pre_ns = int(pre_seconds * NS)
        self._post_ns = int(post_seconds * NS)
        self.current: Incident | None = None
        self.last: Incident | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def trigger(self, kind: str, source: str) -> tuple[Incident, bool]:
        """Open an incident, or extend the open one. Returns it and whether it is new."""
        now = clock.now_ns()
        trig = Trigger(kind, source, now)
        incident = self.current
        if incident is not None and incident.phase == Phase.RECORDING:
            incident.triggers.append(trig)
            incident.end_ns = max(incident.end_ns, now + self._post_ns)
            self._evidence.extend(incident)
            self._schedule(incident)
            log.warning("incident %s extended by %s (%s) to %s", incident.id, kind, source,
                        clock.iso(incident.end_ns))
            return incident, False
        incident = Incident(new_id(now), trig, now - self._pre_ns, now + self._post_ns,
                            triggers=[trig])
        self.current = incident
        log.warning("incident %s opened by %s (%s)", incident.id, kind, source)
        self._evidence.open(incident)
        self._schedule(incident)
        return incident, True

    def _schedule(self, incident: Incident) -> None:
        if self._timer:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, (incident.end_ns - clock.now_ns()) / NS)
        self._timer = loop.call_later(delay, self._post_window_over, incident)

    def _post_window_over(self, incident: Incident) -> None:
        task = asyncio.get_running_loop().create_task(self._close(incident))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, incident: Incident) -> None:
        incident.phase = Phase.SAVING
        self.current = None
        self.last = incident
        ok = await self._evidence.close(incident)
        incident.phase = Phase.SAVED if ok else Phase.FAILED
        log.warning("incident %s %s", incident.id, incident.phase)

    async def shutdown(self) -> None:
        """Finish the open incident now (SIGTERM): a short clip beats a lost one."""
        if self._timer:
            self._timer.cancel()
        incident = self.current
        if incident is not None and incident.phase == Phase.RECORDING:
            incident.end_ns = min(incident.end_ns, clock.now_ns())
            self._evidence.extend(incident)
            await self._close(incident)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
