"""The incident state machine: the one place that decides what happens.

    idle --trigger--> triggered --grace over--> active (held by a call) --release--> ending
                          |                         \\--------- not held -----------> ending
                          +--cancel (within grace)--> ending, marked cancelled
    ending --post window over--> saved (or failed) --> cooldown --> idle

- A trigger opens an incident and dials; the clip holds `pre_seconds` before it and
  `post_seconds` after the last trigger (or after the call ends, if later).
- A trigger while an incident is open extends it; a real trigger makes a test incident
  real, and a trigger after a cancel un-cancels it and dials again at once (a cancel
  may be coerced). A person's press re-dials whenever no call is up.
- The button: with no incident open, the press itself opens one (no waiting for the
  release). With one open, a release before the hold time is a press (extend) and the
  hold time is a cancel; a long press never extends or promotes anything.
- A cancel is accepted only within `grace_seconds` of the first trigger. A cancelled
  incident still saves its evidence. Every cancel, accepted or refused, is reported.
- Calls: a round of failed endpoints re-dials after 0.5 s doubling to
  `redial_max_seconds`; a call lost after connecting re-dials at once; the dispatcher
  hanging up is final (until someone presses again).
- After an incident, automatic triggers are ignored for `cooldown_seconds`; a person's
  trigger always opens one.
- What the car shows and says (never in covert mode): the indicator pattern and the
  prompts are effects of these transitions: opened -> slow blink + "calling" (or double
  blink + "no connection" with no dispatcher configured), connected -> steady +
  "connected", a round that reached no one -> double blink + "no connection" (once),
  a call lost -> slow blink, cancelled -> fast blink + "cancelled" until the incident
  closes, closed -> idle (off, heartbeat, or the fault pattern while a device is down).
- Duress: a cancel with the duress PIN, or (when `duress_press_seconds` is set) a press
  within that many seconds after a cancel, looks in the car exactly like a cancel (the
  same light, the same prompt, at the same moments; the call's audio to the car muted),
  but keeps the incident, the call and the evidence going and publishes `duress`.

Decisions only: every consequence is an effect (effects.py) that the recorder, the
dialer and the fleet reporter carry out and report back on. Tested without devices.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dashsos import clock
from dashsos.clock import NS
from dashsos.effects import (
    CloseEvidence,
    Dial,
    Effect,
    EffectHandler,
    HangUp,
    Indicate,
    MuteSpeaker,
    OpenEvidence,
    Prompt,
    Publish,
    ReportLocation,
    UpdateEvidence,
)

if TYPE_CHECKING:
    from dashsos.config import Config

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


OPEN_END_NS = 2**62  # an end not known yet (far beyond any clock this car will read)


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
    duress: Trigger | None = None  # a coerced cancel: the car looks cancelled, nothing stops
    holds: set[str] = field(default_factory=set)
    msd: dict[str, Any] | None = None  # set by whoever builds it when the incident opens

    def recording_end_ns(self) -> int:
        """How far the clip records: to `end_ns`, or with no end yet while something
        holds the incident open (a dispatcher on the line): the end comes on release."""
        return OPEN_END_NS if self.holds else self.end_ns

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "phase": str(self.phase), "trigger": self.trigger.as_dict(),
                "triggers": [t.as_dict() for t in self.triggers], "test": self.test,
                "covert": self.covert, "cancelled": self.cancelled.as_dict()
                if self.cancelled else None,
                "duress": self.duress.as_dict() if self.duress else None,
                "ends": clock.iso(self.end_ns)}


def message(incident: Incident | None, event: str, details: dict[str, Any],
            position: dict[str, Any] | None) -> dict[str, Any]:
    """An incident event as the fleet and the dispatcher receive it."""
    out: dict[str, Any] = {
        "id": incident.id if incident else None,
        "event": event,
        "phase": str(incident.phase) if incident else None,
        "time": clock.iso(clock.now_ns()),
        # Which clock this message's times are on (ntp, gps or unsynchronised): a Pi that
        # booted years off tells the fleet and the desk what its times are worth.
        "clock_source": clock.source(),
        "trigger": incident.trigger.as_dict() if incident else None,
        "test": incident.test if incident else False,
        "covert": incident.covert if incident else False,
        "duress": incident.duress.as_dict() if incident and incident.duress else None,
        "position": position,
        "details": details,
    }
    if incident is not None and incident.msd is not None:
        out["msd"] = incident.msd
    return out


@dataclass(frozen=True)
class Policy:
    """The incident rules from config (see config.py for each setting's meaning)."""

    pre_seconds: float
    post_seconds: float
    grace_seconds: float = 10.0
    cooldown_seconds: float = 0.0
    covert: bool = False
    call: bool = False  # endpoints configured and calling enabled
    redial_max_seconds: float = 2.0
    duress_press_seconds: float = 0.0  # a press this soon after a cancel is duress; 0: off
    duress_pin: str = ""  # a cancel carrying this PIN is duress; empty: off
    heartbeat: bool = False  # idle indicator: a faint heartbeat instead of off


    @classmethod
    def from_config(cls, c: Config) -> Policy:
        return cls(pre_seconds=c.buffer.pre_seconds, post_seconds=c.incident.post_seconds,
                   grace_seconds=c.incident.cancel_grace_seconds,
                   cooldown_seconds=c.incident.cooldown_seconds, covert=c.incident.covert,
                   call=c.call.enabled and bool(c.call.endpoints),
                   redial_max_seconds=c.call.redial_max_seconds,
                   duress_press_seconds=c.incident.duress_press_seconds,
                   duress_pin=c.incident.duress_pin, heartbeat=c.indicator.heartbeat)


REDIAL_FIRST_S = 0.5  # after a round of failed endpoints; doubles up to redial_max_seconds

MsdBuilder = Callable[[Incident, int], dict[str, Any] | None]
Streams = Callable[[], tuple[str, ...]]


def new_id(at_ns: int) -> str:
    stamp = datetime.fromtimestamp(clock.to_wall_ns(at_ns) / NS, tz=UTC)
    return f"{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class IncidentMachine:
    """Inputs are methods (a trigger, the button's edges, a cancel, what the call and the
    evidence report); outputs are effects handed to every handler in order."""

    def __init__(self, policy: Policy, *, streams: Streams = lambda: (),
                 msd: MsdBuilder = lambda incident, message_id: None) -> None:
        self.policy = policy
        self._pre_ns = int(policy.pre_seconds * NS)
        self._post_ns = int(policy.post_seconds * NS)
        self._grace_ns = int(policy.grace_seconds * NS)
        self._cooldown_ns = int(policy.cooldown_seconds * NS)
        self.covert = policy.covert
        self._streams = streams
        self._msd = msd
        self.handlers: list[EffectHandler] = []
        self.current: Incident | None = None
        self.last: Incident | None = None
        self.cooldown_until_ns = 0
        self.call_state = "idle"  # idle, dialing, connected: of the current incident
        self._press: str | None = None  # the button: "opened" an incident, or "pending"
        self._grace_timer: asyncio.TimerHandle | None = None
        self._end_timer: asyncio.TimerHandle | None = None
        self._redial_timer: asyncio.TimerHandle | None = None
        self._redial_s = REDIAL_FIRST_S
        self._closing: dict[str, asyncio.Future[bool]] = {}
        self.stopping = False
        # What the car shows: the machine decides it, feedback/ draws and says it.
        self.indicator = "off"
        self.device_fault = False
        self._told_no_connection: str | None = None  # incident id: said once
        self._car_idle_timer: asyncio.TimerHandle | None = None

    @property
    def state(self) -> str:
        if self.current is not None:
            return str(self.current.phase)
        if clock.now_ns() < self.cooldown_until_ns:
            return "cooldown"
        return "idle"

    # --- inputs: triggers, the button, cancel ---

    def trigger(self, kind: str, source: str, *, automatic: bool = False,
                test: bool = False) -> tuple[Incident | None, str]:
        """Open an incident or extend the open one. Returns it and "opened", "extended"
        or "ignored" (an automatic trigger during cooldown)."""
        now = clock.now_ns()
        trig = Trigger(kind, source, now, automatic)
        if self.stopping:  # the evidence is being finished: nothing new can be recorded
            log.warning("trigger %s (%s) ignored: shutting down", kind, source)
            self._emit(Publish(None, "ignored", {"trigger": trig.as_dict(),
                                                 "reason": "shutting down"}))
            return None, "ignored"
        if self.current is not None:
            return self._extend(self.current, trig, test), "extended"
        if automatic and now < self.cooldown_until_ns:
            log.info("automatic trigger %s ignored: cooldown", kind)
            self._emit(Publish(None, "ignored", {"trigger": trig.as_dict(),
                                                 "reason": "cooldown"}))
            return None, "ignored"
        incident = Incident(new_id(now), trig, now - self._pre_ns, now + self._post_ns,
                            triggers=[trig], test=test, covert=self.covert)
        self.current = incident
        self.call_state = "idle"
        self._redial_s = REDIAL_FIRST_S
        log.warning("incident %s opened by %s (%s)%s", incident.id, kind, source,
                    " [test]" if test else "")
        incident.msd = self._build_msd(incident, 1)
        self._emit(Publish(incident, "triggered", {"trigger": trig.as_dict()}))  # the fleet first
        self._emit(OpenEvidence(incident, self._streams()))
        self._dial(incident)
        self._emit(ReportLocation(1.0))
        self._cancel_timer("_car_idle_timer")  # a duress's pretend ending is over
        if test:
            self._show(incident, None, "test")
        if self.policy.call:
            self._show(incident, "slow_blink", "calling")
        else:
            self._show(incident, "double_blink", "no_connection")
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(self._grace_ns / NS, self._grace_over, incident)
        self._arm_end(incident)
        return incident, "opened"

    def _extend(self, incident: Incident, trig: Trigger, test: bool) -> Incident:
        incident.triggers.append(trig)
        details: dict[str, Any] = {"trigger": trig.as_dict()}
        if incident.test and not test:
            incident.test = False  # a real alarm during a test is real
            details["no_longer_test"] = True
            incident.msd = self._build_msd(incident, 2)
        uncancelled = incident.cancelled is not None
        duress = False
        car_end_ns = incident.end_ns  # when the cancelled incident would have closed
        if uncancelled:
            assert incident.cancelled is not None
            duress = (self.policy.duress_press_seconds > 0 and trig.kind == "panic_button"
                      and trig.at_ns - incident.cancelled.at_ns
                      <= self.policy.duress_press_seconds * NS)
            incident.cancelled = None  # pressed again after a cancel: it is real
            details["uncancelled"] = True
        incident.end_ns = max(incident.end_ns, trig.at_ns + self._post_ns)
        log.warning("incident %s extended by %s (%s)", incident.id, trig.kind, trig.source)
        self._emit(Publish(incident, "extended", details))
        if duress:
            # The car keeps showing the cancel; the desk and the fleet hear the truth.
            self._duress(incident, Trigger("duress", f"{trig.source}: press after cancel",
                                           trig.at_ns), car_end_ns)
        self._emit(UpdateEvidence(incident))
        if uncancelled and not duress:
            self._cancel_timer("_car_idle_timer")
            self._show(incident, "slow_blink" if self.policy.call else "double_blink",
                       "calling" if self.policy.call else None)
        if uncancelled or not trig.automatic:
            self._dial(incident)  # a person asking again gets a call now, whatever came before
        self._arm_end(incident)
        return incident

    def button_pressed(self, source: str) -> None:
        """The button went down. With no incident open this is a panic press: open one at
        once. Otherwise wait for the release (a press) or the hold time (a cancel)."""
        if self.current is None:
            self.trigger("panic_button", source)
            self._press = "opened"
        else:
            self._press = "pending"

    def button_released(self, source: str) -> None:
        press, self._press = self._press, None
        if press == "pending":
            self.trigger("panic_button", source)

    def button_held(self, source: str) -> None:
        """Held for the long-press time: a cancel, unless this press opened the incident
        (someone holding the panic button down is still asking for help)."""
        press, self._press = self._press, None
        if press == "pending":
            self.cancel(f"{source} long press")

    def cancel(self, source: str, pin: str | None = None) -> tuple[bool, str]:
        """Cancel the open incident if still inside the grace window. With the duress PIN
        the answer and the car are those of a cancel, and nothing is cancelled."""
        now = clock.now_ns()
        incident = self.current
        trig = Trigger("cancel", source, now)
        if (incident is not None and pin and self.policy.duress_pin
                and pin == self.policy.duress_pin):
            return self._duress_cancel(incident, trig)
        if incident is None:
            reason = "no open incident"
        elif incident.cancelled is not None or incident.duress is not None:
            # After a duress cancel the car believes it is cancelled: a second cancel gets
            # the answer a real one would, and changes nothing.
            reason = "already cancelled"
        elif now - incident.trigger.at_ns > self._grace_ns:
            reason = f"grace window of {self._grace_ns / NS:g} s is over"
        else:
            incident.cancelled = trig
            # With the duress gesture on, every cancel stays open long enough for it (so a
            # cancel looks the same whether the gesture follows or not).
            incident.end_ns = max(incident.end_ns,
                                  now + int(self.policy.duress_press_seconds * NS))
            self._cancel_timer("_grace_timer")
            self._cancel_timer("_redial_timer")
            incident.holds.clear()
            incident.phase = Phase.ENDING
            log.warning("incident %s cancelled by %s", incident.id, source)
            self._emit(UpdateEvidence(incident))  # the record says so at once
            self._emit(Publish(incident, "cancelled", {"by": trig.as_dict()}))
            self._hang_up(incident, "incident cancelled")
            self._show(incident, "fast_blink", "cancelled")
            self._arm_end(incident)
            return True, "cancelled"
        log.warning("cancel by %s refused: %s", source, reason)
        self._emit(Publish(incident, "cancel_refused", {"by": trig.as_dict(), "reason": reason}))
        return False, reason

    def _duress_cancel(self, incident: Incident, trig: Trigger) -> tuple[bool, str]:
        """A cancel with the duress PIN: answered and shown as the cancel (or the refusal)
        it would have been; the incident goes on."""
        if incident.duress is not None and incident.cancelled is None:
            log.warning("incident %s: duress PIN again (%s)", incident.id, trig.source)
            return False, "already cancelled"  # as a second real cancel would answer
        if incident.cancelled is not None:  # the real cancel came first: undo it, quietly
            ok, reason = False, "already cancelled"
            car_end_ns = incident.end_ns
            incident.cancelled = None
            self._duress(incident, Trigger("duress", f"{trig.source}: duress PIN after a "
                                           "cancel", trig.at_ns), car_end_ns)
            self._emit(UpdateEvidence(incident))
            self._dial(incident)
            return ok, reason
        if trig.at_ns - incident.trigger.at_ns > self._grace_ns:
            ok, reason = False, f"grace window of {self._grace_ns / NS:g} s is over"
        else:
            ok, reason = True, "cancelled"
        if ok:
            incident.end_ns = max(incident.end_ns,  # as a real cancel would
                                  trig.at_ns + int(self.policy.duress_press_seconds * NS))
            self._show(incident, "fast_blink", "cancelled")
        self._duress(incident, Trigger("duress", f"{trig.source}: duress PIN", trig.at_ns),
                     incident.end_ns if ok else None)
        self._emit(UpdateEvidence(incident))
        return ok, reason

    def _duress(self, incident: Incident, trig: Trigger, car_end_ns: int | None) -> None:
        """From now on the car shows nothing new: at the moment a cancelled incident would
        have closed it goes idle. The call's audio to the car is muted."""
        first = incident.duress is None
        incident.duress = trig
        log.warning("incident %s: DURESS (%s)", incident.id, trig.source)
        self._emit(Publish(incident, "duress", {"by": trig.as_dict()}))
        if first:
            self._emit(MuteSpeaker(True))
        if car_end_ns is not None and first:
            self._cancel_timer("_car_idle_timer")
            delay = max(0.0, (car_end_ns - clock.now_ns()) / NS)
            self._car_idle_timer = asyncio.get_running_loop().call_later(
                delay, self._show_idle)

    def refresh_indicator(self) -> None:
        """At start: the idle pattern (off, heartbeat or fault) once the light exists."""
        if self.current is None and self._car_idle_timer is None:
            self._show_idle()

    def set_device_fault(self, faulty: bool) -> None:
        """A device is down (or back): the idle indicator shows the fault pattern."""
        if faulty != self.device_fault:
            self.device_fault = faulty
            if self.current is None and self._car_idle_timer is None:
                self._show_idle()

    # --- inputs: what the call reports ---

    def _reported(self, incident: Incident) -> bool:
        """A report about the open incident (not a late one about a finished incident)."""
        return incident is self.current

    def call_progress(self, incident: Incident, event: str, details: dict[str, Any]) -> None:
        """calling, call_failed (one endpoint): for the fleet and status."""
        if self._reported(incident):
            self._emit(Publish(incident, event, details))

    def call_connected(self, incident: Incident, details: dict[str, Any], *,
                       holds: bool) -> None:
        if not self._reported(incident) or incident.cancelled is not None:
            return
        self.call_state = "connected"
        self._redial_s = REDIAL_FIRST_S
        self._emit(Publish(incident, "connected", details))
        if incident.duress is not None:  # a new call's desk hears it too
            self._emit(Publish(incident, "duress", {"by": incident.duress.as_dict()}))
        self._show(incident, "steady", "connected")
        if holds:  # a dispatcher on the line keeps the incident open until it hangs up
            incident.holds.add("call")
            self._emit(UpdateEvidence(incident))  # the clip records on, however long
            if incident.phase == Phase.ENDING:
                self._set_phase(incident, Phase.ACTIVE)

    def call_round_failed(self, incident: Incident) -> None:
        """No endpoint answered: try again after a backoff while the incident is open."""
        if not self._reported(incident):
            return
        self.call_state = "idle"
        if incident.cancelled is None:
            said = self._told_no_connection == incident.id
            self._told_no_connection = incident.id
            self._show(incident, "double_blink", None if said else "no_connection")
            self._schedule_redial(incident, self._redial_s)
            self._redial_s = min(self._redial_s * 2, self.policy.redial_max_seconds)

    def call_reachable(self, incident: Incident) -> None:
        """A server that could not be reached answers again (the link is back): a re-dial
        waiting out its backoff goes now, and the backoff starts over."""
        if not self._reported(incident) or incident.cancelled is not None:
            return
        if self.call_state == "idle" and self._redial_timer is not None:
            self._redial_s = REDIAL_FIRST_S
            self._dial(incident)

    def call_ended(self, incident: Incident, details: dict[str, Any], *,
                   by_dispatcher: bool) -> None:
        if not self._reported(incident) and incident is not self.last:
            return
        was = self.call_state if incident is self.current else "idle"
        if was == "connected":  # not "dialing": a new Dial may already be waiting its turn
            self.call_state = "idle"
        self._emit(Publish(incident, "ended", details))
        if "call" in incident.holds:
            incident.holds.discard("call")
            self._released(incident)
        if by_dispatcher or not self._reported(incident) or incident.cancelled is not None:
            return  # the dispatcher decided, or the incident no longer wants a call
        if was == "connected":
            self._show(incident, "slow_blink", None)
            self._schedule_redial(incident, 0.0)  # it worked a moment ago: at once

    # --- timers ---

    def _grace_over(self, incident: Incident) -> None:
        if incident is self.current and incident.phase == Phase.TRIGGERED:
            self._set_phase(incident, Phase.ACTIVE if incident.holds else Phase.ENDING)

    def _released(self, incident: Incident) -> None:
        if incident is not self.current or incident.holds:
            return
        incident.end_ns = max(incident.end_ns, clock.now_ns() + self._post_ns)
        self._emit(UpdateEvidence(incident))
        self._arm_end(incident)
        if incident.phase == Phase.ACTIVE:
            self._set_phase(incident, Phase.ENDING)

    def _arm_end(self, incident: Incident) -> None:
        self._cancel_timer("_end_timer")
        delay = max(0.0, (incident.end_ns - clock.now_ns()) / NS)
        self._end_timer = asyncio.get_running_loop().call_later(delay, self._end, incident)

    def _end(self, incident: Incident) -> None:
        if incident is not self.current or incident.holds:
            return  # the last release re-arms the end
        self._close(incident)

    def _close(self, incident: Incident) -> None:
        for name in ("_grace_timer", "_end_timer", "_redial_timer"):
            self._cancel_timer(name)
        self.current = None
        self.last = incident
        self.cooldown_until_ns = clock.now_ns() + self._cooldown_ns
        if self.call_state != "idle":
            self._hang_up(incident, "incident ended")
        if incident.duress is None or self._car_idle_timer is None:
            self._show_idle()  # no pretend ending pending: the car goes idle now
        if incident.duress is not None:
            self._emit(MuteSpeaker(False))
        self._emit(ReportLocation(None))
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._closing[incident.id] = done

        def closed(ok: bool, reason: str) -> None:
            incident.phase = Phase.SAVED if ok else Phase.FAILED
            log.warning("incident %s %s%s", incident.id, incident.phase,
                        f": {reason}" if reason else "")
            self._emit(Publish(incident, "evidence_saved" if ok else "evidence_failed",
                               {"reason": reason} if reason else {}))
            self._closing.pop(incident.id, None)
            if not done.done():
                done.set_result(ok)

        self._emit(CloseEvidence(incident, closed))

    def _schedule_redial(self, incident: Incident, delay: float) -> None:
        self._cancel_timer("_redial_timer")
        self._redial_timer = asyncio.get_running_loop().call_later(
            delay, lambda: self._dial(incident) if self._reported(incident) else None)

    def _cancel_timer(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    async def shutdown(self, timeout: float = 15.0) -> None:
        """Finish the open incident now (SIGTERM): a short clip beats a lost one."""
        self.stopping = True
        incident = self.current
        if incident is not None:
            incident.end_ns = min(incident.end_ns, clock.now_ns())
            incident.holds.clear()
            self._emit(UpdateEvidence(incident))
            self._close(incident)
        pending = list(self._closing.values())
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for unfinished in self._closing:  # TimeoutStopSec is near: recovery finishes them
            log.error("incident %s not finished at shutdown; recovered at the next start",
                      unfinished)

    # --- outputs ---

    def _build_msd(self, incident: Incident, message_id: int) -> dict[str, Any] | None:
        try:
            return self._msd(incident, message_id)
        except Exception:  # an incident without an MSD still calls, records and reports
            log.exception("incident %s: no MSD", incident.id)
            return None

    def _dial(self, incident: Incident) -> None:
        self._cancel_timer("_redial_timer")
        if self.policy.call and not self.stopping and self.call_state == "idle" \
                and incident.cancelled is None:
            self.call_state = "dialing"
            self._emit(Dial(incident))

    def _hang_up(self, incident: Incident, reason: str) -> None:
        self._cancel_timer("_redial_timer")
        if self.call_state != "idle":
            self.call_state = "idle"
            self._emit(HangUp(incident, reason))

    def _show(self, incident: Incident | None, pattern: str | None,
              prompt: str | None) -> None:
        """The car's light and voice: never in covert mode, never after a duress cancel."""
        if self.covert or (incident is not None and (incident.covert
                                                     or incident.duress is not None)):
            return
        if pattern is not None and pattern != self.indicator:
            self.indicator = pattern
            self._emit(Indicate(pattern))
        if prompt is not None:
            self._emit(Prompt(prompt))

    def _show_idle(self) -> None:
        self._car_idle_timer = None
        pattern = ("fault" if self.device_fault else
                   "heartbeat" if self.policy.heartbeat else "off")
        if not self.covert and pattern != self.indicator:
            self.indicator = pattern
            self._emit(Indicate(pattern))

    def _set_phase(self, incident: Incident, phase: Phase) -> None:
        incident.phase = phase
        self._emit(Publish(incident, str(phase), {}))

    def _emit(self, effect: Effect) -> None:
        for handler in list(self.handlers):
            try:
                handler(effect)
            except Exception:  # a failing handler (MQTT, disk) must not stop the decision
                log.exception("effect handler %r failed on %r", handler, type(effect).__name__)
