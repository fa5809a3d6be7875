"""Keeps a call up while an incident is open: endpoints in order, re-dial with backoff.

Listens to the incident machine: a trigger starts dialing; the incident's end or a
cancel hangs up. While connected the call holds the incident open; the telemetry data
channel carries the incident message (with the MSD) first, then fixes at 1 Hz and every
phase change. Call phases (calling, connected, ended with a reason) go to the listener,
which passes them to MQTT and status.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dashsos import clock
from dashsos.call.ice import confine_host_addresses, usable_configuration
from dashsos.call.session import CallSession
from dashsos.call.signalling import SignallingError, WhipClient
from dashsos.call.talkback import Speaker
from dashsos.call.tracks import MicrophoneTrack, PassthroughVideoTrack
from dashsos.config import CallConfig, IceConfig
from dashsos.health import Health, State
from dashsos.incident import Incident, IncidentMachine
from dashsos.incident import message as incident_message
from dashsos.location.fix import Fix
from dashsos.media.bus import PacketBus

log = logging.getLogger(__name__)

CallListener = Callable[[Incident, str, dict[str, Any]], None]


def ssl_context(config: CallConfig) -> ssl.SSLContext | bool:
    if not config.verify_tls:
        log.error("call.verify_tls = false: the dispatcher's certificate is NOT checked; "
                  "anyone on the path can take the call")
        return False
    return ssl.create_default_context(cafile=config.ca_file or None)


class Dialer:
    def __init__(self, config: CallConfig, ice: IceConfig, bus: PacketBus,
                 machine: IncidentMachine, *, has_video: bool, has_audio: bool,
                 request_keyframe: Callable[[], None], last_fix: Callable[[], Fix | None],
                 covert: bool) -> None:
        self.config = config
        self.health = Health("whip" if config.mode == "whip" else "call")
        self.health.set(State.OK, "idle")
        self._ice = ice
        self._bus = bus
        self._machine = machine
        self._has_video = has_video
        self._has_audio = has_audio
        self._request_keyframe = request_keyframe
        self._last_fix = last_fix
        self._covert = covert
        token = Path(config.token_file).read_text().strip() if config.token_file else ""
        self._client = WhipClient(token, timeout=config.connect_timeout,
                                  ssl_context=ssl_context(config))
        self.listeners: list[CallListener] = []
        self.session: CallSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._incident: Incident | None = None
        self._last_fix_sent = 0.0
        self.attempts = 0
        self.state = "idle"
        confine_host_addresses(ice.interfaces)

    # --- the incident machine's listener ---

    def on_incident(self, incident: Incident | None, event: str, details: dict[str, Any]) -> None:
        if incident is None:
            return
        if event == "triggered" and self.config.enabled and self.config.endpoints:
            self._incident = incident
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._dial(incident))
        elif event in ("cancelled", "evidence_saved", "evidence_failed") \
                and incident is self._incident:  # not a previous incident finishing late
            self.stop_soon("incident cancelled" if event == "cancelled" else "incident ended")
        if self.session is not None and self.session.mode == "call":
            self.session.send({"type": "phase", "event": event, "phase": str(incident.phase),
                               "incident": incident.id, "details": details})

    def on_fix(self, fix: Fix) -> None:
        now = time.monotonic()
        due = self.session is not None and now - self._last_fix_sent >= 0.95
        if due and self.session is not None and self.session.send({"type": "fix",
                                                                   "fix": fix.as_dict()}):
            self._last_fix_sent = now

    def stop_soon(self, reason: str) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel(reason)

    async def shutdown(self) -> None:
        self.stop_soon("shutting down")
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        session = self.session
        return {**self.health.as_dict(), "call_state": self.state, "attempts": self.attempts,
                "endpoint": session.endpoint if session else None,
                "endpoints": list(self.config.endpoints), "mode": self.config.mode}

    # --- dialing ---

    def _emit(self, incident: Incident, event: str, details: dict[str, Any]) -> None:
        self.state = event if event in ("calling", "connected") else "idle"
        for listener in list(self.listeners):
            try:
                listener(incident, event, details)
            except Exception:  # reporting must not stop the call
                log.exception("call listener failed on %s", event)

    async def _dial(self, incident: Incident) -> None:
        backoff = 0.5
        try:
            while True:
                for endpoint in self.config.endpoints:
                    result = await self._attempt(incident, endpoint)
                    if result == "dispatcher_hung_up":
                        return  # the dispatcher decided: do not call back
                    if result == "connected_then_lost":
                        backoff = 0.5  # it worked a moment ago: try again at once
                        break
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.redial_max_seconds)
        except asyncio.CancelledError:
            session = self.session
            if session is not None:
                await session.close("the car hung up")
                self._after_call(incident, session)
            raise
        finally:
            self.session = None
            self.state = "idle"

    async def _attempt(self, incident: Incident, endpoint: str) -> str:
        self.attempts += 1
        self._emit(incident, "calling", {"endpoint": endpoint, "attempt": self.attempts})
        video = PassthroughVideoTrack(self._request_keyframe) if self._has_video else None
        audio = MicrophoneTrack() if self._has_audio else None
        speaker = None if self._covert or self.config.speaker == "none" \
            else Speaker(self.config.speaker)
        rtc = await usable_configuration(self._ice)
        session = CallSession(endpoint, self._client, rtc,
                              mode=self.config.mode, video=video, audio=audio, speaker=speaker,
                              on_message=self._dispatcher_said,
                              request_keyframe=self._request_keyframe)
        unsubscribe = [self._bus.subscribe(t.feed) for t in (video, audio) if t is not None]
        try:
            started = time.monotonic()
            try:
                await session.connect(self.config.connect_timeout)
            except SignallingError as exc:
                self.health.set(State.DEGRADED, str(exc))
                log.warning("call to %s failed (%s): %s", endpoint, exc.kind, exc)
                self._emit(incident, "call_failed", {"endpoint": endpoint, "reason": str(exc),
                                                     "kind": exc.kind})
                await session.close(str(exc), hang_up=False)
                return "failed"
            self.session = session
            self.health.set(State.OK, f"connected to {endpoint}")
            log.warning("call connected to %s in %.0f ms", endpoint,
                        (time.monotonic() - started) * 1000)
            self._emit(incident, "connected", {"endpoint": endpoint,
                                               "setup_ms": round((time.monotonic() - started)
                                                                 * 1000)})
            if session.mode == "call":
                # A dispatcher on the line keeps the incident open until it hangs up; a
                # WHIP ingest server has no say and the incident's own window applies.
                self._machine.hold("call")
            if session.mode == "call" and await session.channel_ready():
                fix = self._last_fix()
                session.send({"type": "msd", "incident": incident_message(
                    incident, "msd", {}, fix.as_dict() if fix else None)})
            await session.ended.wait()
            await session.close(session.end_reason, hang_up=not session.ended_by_dispatcher)
            self._after_call(incident, session)
            self.session = None
            if session.ended_by_dispatcher:
                return "dispatcher_hung_up"
            self.health.set(State.DEGRADED, f"call lost: {session.end_reason}; re-dialing")
            return "connected_then_lost"
        finally:
            for undo in unsubscribe:
                undo()

    def _after_call(self, incident: Incident, session: CallSession) -> None:
        self._machine.release("call")
        seconds = time.monotonic() - session.connected_at if session.connected_at else 0.0
        log.warning("call to %s ended: %s", session.endpoint, session.end_reason)
        self._emit(incident, "ended", {"endpoint": session.endpoint,
                                       "reason": session.end_reason,
                                       "seconds": round(seconds, 1)})
        if not session.ended_by_dispatcher:
            return
        self.health.set(State.OK, f"ended: {session.end_reason}")

    def _dispatcher_said(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "position_request":
            fix = self._last_fix()
            if self.session is not None:
                self.session.send({"type": "fix", "fix": fix.as_dict() if fix else None,
                                   "requested": True, "time": clock.iso(clock.now_ns())})
        elif kind == "hangup":
            log.warning("the dispatcher hung up")
