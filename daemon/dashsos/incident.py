"""The incident state machine: the one place that decides what happens.

    idle --trigger--> triggered --grace over--> active (held, e.g. a call) --release--> ending
                          |                         \\--------- not held -----------> ending
                          +--cancel (within grace)--> ending, marked cancelled
    ending --post window over--> saved (or failed) --> cooldown --> idle

- A trigger opens an incident; the clip holds `pre_seconds` before it and `post_seconds`
  after the last trigger (or after the last hold is released, if later).
- A trigger while an incident is open extends it; a real trigger makes a test incident
  real, and a trigger after a cancel un-cancels it.
- A cancel is accepted only within `grace_seconds` of the first trigger. A cancelled
  incident still saves its evidence: a cancel may be coerced. Every cancel, accepted or
  refused, is reported.
- After an incident, automatic triggers are ignored for `cooldown_seconds`; a person's
  trigger always opens one.

Side effects live behind the Evidence port and the listeners (MQTT, status, the call):
the machine only decides, so it reads in one sitting and tests without devices.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from dashsos import clock
from dashsos.clock import NS

log = logging.getLogger(__name__)


class Phase(enum.StrEnum):
    TRIGGERED = "triggered"  # inside the cancel grace window
    ACTIVE = "active"  # confirmed and held open (a call is up)
    ENDING = "ending"  # the post window: still recording
    SAVED = "saved"
    FAILED = "failed"  # finishing failed: what was written stays as .partial

    @property
    def open(self) -> bool:
        return self in (Phase.TRIGGERED, Phase.ACTIVE, Phase.ENDING)


@dataclass(frozen=True)
class Trigger:
    kind: str  # what fired: panic_button, local, mqtt, gps_crash
    source: str  # who or what, e.g. "control socket uid 1000"
    at_ns: int
    automatic: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "time": clock.iso(self.at_ns),
                "automatic": self.automatic}


@dataclass
class Incident:
    id: str
    trigger: Trigger
    start_ns: int  # the earliest moment the clip may reach back to
    end_ns: int
    phase: Phase = Phase.TRIGGERED
    triggers: list[Trigger] = field(default_factory=list)
    test: bool = False
    covert: bool = False
    cancelled: Trigger | None = None
    holds: set[str] = field(default_factory=set)
    msd: dict[str, Any] | None = None  # set by whoever builds it when the incident opens

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "phase": str(self.phase), "trigger": self.trigger.as_dict(),
                "triggers": [t.as_dict() for t in self.triggers], "test": self.test,
                "covert": self.covert, "cancelled": self.cancelled.as_dict()
                if self.cancelled else None, "ends": clock.iso(self.end_ns)}


def message(incident: Incident | None, event: str, details: dict[str, Any],
            position: dict[str, Any] | None) -> dict[str, Any]:
    """An incident event as the fleet and the dispatcher receive it."""
    out: dict[str, Any] = {
        "id": incident.id if incident else None,
        "event": event,
        "phase": str(incident.phase) if incident else None,
        "time": clock.iso(clock.now_ns()),
        "trigger": incident.trigger.as_dict() if incident else None,
        "test": incident.test if incident else False,
        "covert": incident.covert if incident else False,
        "position": position,
        "details": details,
    }
    if incident is not None and incident.msd is not None:
        out["msd"] = incident.msd
    return out


class Evidence(Protocol):
    def open(self, incident: Incident) -> None: ...
    def extend(self, incident: Incident) -> None: ...
    async def close(self, incident: Incident) -> bool: ...


# (incident or None, event name, details): triggered, extended, active, ending, cancelled,
# cancel_refused, ignored, evidence_saved, evidence_failed
Listener = Callable[[Incident | None, str, dict[str, Any]], None]


def new_id(at_ns: int) -> str:
    stamp = datetime.fromtimestamp(clock.to_wall_ns(at_ns) / NS, tz=UTC)
    return f"{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class IncidentMachine:
    def __init__(self, evidence: Evidence, *, pre_seconds: float, post_seconds: float,
                 grace_seconds: float = 10.0, cooldown_seconds: float = 0.0,
                 covert: bool = False) -> None:
        self._evidence = evidence
        self._pre_ns = int(pre_seconds * NS)
        self._post_ns = int(post_seconds * NS)
        self._grace_ns = int(grace_seconds * NS)
        self._cooldown_ns = int(cooldown_seconds * NS)
        self.covert = covert
        self.current: Incident | None = None
        self.last: Incident | None = None
        self.cooldown_until_ns = 0
        self.listeners: list[Listener] = []
        self._grace_timer: asyncio.TimerHandle | None = None
        self._end_timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def state(self) -> str:
        if self.current is not None:
            return str(self.current.phase)
        if clock.now_ns() < self.cooldown_until_ns:
            return "cooldown"
        return "idle"

    # --- inputs ---

    def trigger(self, kind: str, source: str, *, automatic: bool = False,
                test: bool = False) -> tuple[Incident | None, str]:
        """Open an incident or extend the open one. Returns it and "opened", "extended"
        or "ignored" (an automatic trigger during cooldown)."""
        now = clock.now_ns()
        trig = Trigger(kind, source, now, automatic)
        incident = self.current
        if incident is not None:
            incident.triggers.append(trig)
            details: dict[str, Any] = {"trigger": trig.as_dict()}
            if incident.test and not test:
                incident.test = False  # a real alarm during a test is real
                details["no_longer_test"] = True
            if incident.cancelled is not None:
                incident.cancelled = None  # pressed again after a cancel: it is real
                details["uncancelled"] = True
            incident.end_ns = max(incident.end_ns, now + self._post_ns)
            log.warning("incident %s extended by %s (%s)", incident.id, kind, source)
            self._emit(incident, "extended", details)  # the fleet first: it is waiting
            self._evidence.extend(incident)
            self._arm_end(incident)
            return incident, "extended"
        if automatic and now < self.cooldown_until_ns:
            log.info("automatic trigger %s ignored: cooldown", kind)
            self._emit(None, "ignored", {"trigger": trig.as_dict(), "reason": "cooldown"})
            return None, "ignored"
        incident = Incident(new_id(now), trig, now - self._pre_ns, now + self._post_ns,
                            triggers=[trig], test=test, covert=self.covert)
        self.current = incident
        log.warning("incident %s opened by %s (%s)%s", incident.id, kind, source,
                    " [test]" if test else "")
        self._emit(incident, "triggered", {"trigger": trig.as_dict()})
        self._evidence.open(incident)
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(self._grace_ns / NS, self._grace_over, incident)
        self._arm_end(incident)
        return incident, "opened"

    def cancel(self, source: str) -> tuple[bool, str]:
        """Cancel the open incident if still inside the grace window."""
        now = clock.now_ns()
        incident = self.current
        trig = Trigger("cancel", source, now)
        if incident is None:
            reason = "no open incident"
        elif incident.cancelled is not None:
            reason = "already cancelled"
        elif now - incident.trigger.at_ns > self._grace_ns:
            reason = f"grace window of {self._grace_ns / NS:g} s is over"
        else:
            incident.cancelled = trig
            if self._grace_timer:
                self._grace_timer.cancel()
            incident.phase = Phase.ENDING
            self._evidence.extend(incident)  # the record says so at once
            log.warning("incident %s cancelled by %s", incident.id, source)
            self._emit(incident, "cancelled", {"by": trig.as_dict()})
            return True, "cancelled"
        log.warning("cancel by %s refused: %s", source, reason)
        self._emit(incident, "cancel_refused", {"by": trig.as_dict(), "reason": reason})
        return False, reason

    def hold(self, name: str) -> None:
        """Keep the open incident going while `name` (a call) needs it."""
        incident = self.current
        if incident is not None and incident.cancelled is None:
            incident.holds.add(name)
            if incident.phase == Phase.ENDING:
                self._set_phase(incident, Phase.ACTIVE)

    def release(self, name: str) -> None:
        incident = self.current
        if incident is None or name not in incident.holds:
            return
        incident.holds.discard(name)
        if not incident.holds:
            incident.end_ns = max(incident.end_ns, clock.now_ns() + self._post_ns)
            self._evidence.extend(incident)
            self._arm_end(incident)
            if incident.phase == Phase.ACTIVE:
                self._set_phase(incident, Phase.ENDING)

    # --- timers ---

    def _grace_over(self, incident: Incident) -> None:
        if incident is self.current and incident.phase == Phase.TRIGGERED:
            self._set_phase(incident, Phase.ACTIVE if incident.holds else Phase.ENDING)

    def _arm_end(self, incident: Incident) -> None:
        if self._end_timer:
            self._end_timer.cancel()
        delay = max(0.0, (incident.end_ns - clock.now_ns()) / NS)
        self._end_timer = asyncio.get_running_loop().call_later(delay, self._end, incident)

    def _end(self, incident: Incident) -> None:
        if incident is not self.current:
            return
        if incident.holds and incident.cancelled is None:
            return  # release() re-arms the end
        task = asyncio.get_running_loop().create_task(self._close(incident))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, incident: Incident) -> None:
        if self._grace_timer:
            self._grace_timer.cancel()
        self.current = None
        self.last = incident
        self.cooldown_until_ns = clock.now_ns() + self._cooldown_ns
        ok = await self._evidence.close(incident)
        incident.phase = Phase.SAVED if ok else Phase.FAILED
        log.warning("incident %s %s", incident.id, incident.phase)
        self._emit(incident, "evidence_saved" if ok else "evidence_failed", {})

    async def shutdown(self) -> None:
        """Finish the open incident now (SIGTERM): a short clip beats a lost one."""
        for timer in (self._grace_timer, self._end_timer):
            if timer:
                timer.cancel()
        incident = self.current
        if incident is not None:
            incident.end_ns = min(incident.end_ns, clock.now_ns())
            self._evidence.extend(incident)
            await self._close(incident)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # --- outputs ---

    def _set_phase(self, incident: Incident, phase: Phase) -> None:
        incident.phase = phase
        self._emit(incident, str(phase), {})

    def _emit(self, incident: Incident | None, event: str, details: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(incident, event, details)
            except Exception:  # a failing consumer (MQTT, status) must not stop the decision
                log.exception("incident listener %r failed on %s", listener, event)
