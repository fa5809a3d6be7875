"""Carries out the incident machine's call effects: Dial is one round through the
endpoints in order, HangUp ends the call. Every session a server created (a 201) is
DELETEd when it ends, however it ends; a DELETE that fails is kept and retried with
backoff (in the background, and before every POST) until it succeeds or the server
says 404, so servers that allow one session per endpoint accept the next call. What
happens (calling, call_failed, connected, ended, a round that reached nobody) is
reported back to the machine, which decides whether and when to dial again.
The telemetry data channel carries the incident message (with the MSD) first, then
fixes at 1 Hz and every incident event.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dashsos import clock
from dashsos.call.ice import confine_host_addresses, usable_configuration
from dashsos.call.session import CallSession
from dashsos.call.signalling import IceServer, SignallingError, WhipClient, origin
from dashsos.call.talkback import Speaker
from dashsos.call.tracks import MicrophoneTrack, PassthroughVideoTrack
from dashsos.config import CallConfig, IceConfig
from dashsos.effects import Dial, Effect, HangUp, Publish
from dashsos.health import Health, State
from dashsos.incident import Incident
from dashsos.incident import message as incident_message
from dashsos.location.fix import Fix
from dashsos.media.bus import PacketBus

log = logging.getLogger(__name__)

# A hang-up (WHIP DELETE) gets this long when the car shuts down: evidence comes first.
SHUTDOWN_HANGUP_S = 2.0
DELETE_RETRY_FIRST_S = 0.25  # a failed DELETE is retried after this, doubling...
DELETE_RETRY_MAX_S = 0.5  # ...up to this: a kept DELETE notices a returning link


class CallEvents(Protocol):
    """What the dialer reports (the incident machine implements it)."""

    def call_progress(self, incident: Incident, event: str,
                      details: dict[str, Any]) -> None: ...
    def call_connected(self, incident: Incident, details: dict[str, Any], *,
                       holds: bool) -> None: ...
    def call_round_failed(self, incident: Incident) -> None: ...
    def call_reachable(self, incident: Incident) -> None: ...
    def call_ended(self, incident: Incident, details: dict[str, Any], *,
                   by_dispatcher: bool) -> None: ...


def ssl_context(config: CallConfig) -> ssl.SSLContext | bool:
    if not config.verify_tls:
        log.error("call.verify_tls = false: the dispatcher's certificate is NOT checked; "
                  "anyone on the path can take the call")
        return False
    return ssl.create_default_context(cafile=config.ca_file or None)


class Dialer:
    def __init__(self, config: CallConfig, ice: IceConfig, bus: PacketBus, events: CallEvents,
                 *, has_video: bool, has_audio: bool, request_keyframe: Callable[[], None],
                 last_fix: Callable[[], Fix | None],
                 speaker: Callable[[], Speaker] | None) -> None:
        self.config = config
        self.health = Health("whip" if config.mode == "whip" else "call")
        self.health.set(State.OK, "idle")
        self._ice = ice
        self._bus = bus
        self._events = events
        self._has_video = has_video
        self._has_audio = has_audio
        self._request_keyframe = request_keyframe
        self._last_fix = last_fix
        self._new_speaker = speaker
        self.speaker: Speaker | None = None  # the last call's, for status
        token = Path(config.token_file).read_text().strip() if config.token_file else ""
        self._client = WhipClient(token, timeout=config.connect_timeout,
                                  ssl_context=ssl_context(config),
                                  redirect_origins=config.redirect_origins)
        self.session: CallSession | None = None  # connected
        self._connecting: CallSession | None = None
        self._offered: dict[str, tuple[IceServer, ...]] = {}  # Link ice-servers per endpoint
        # Sessions the server may still hold: Location -> (next try, current backoff).
        self.pending_deletes: dict[str, tuple[float, float]] = {}
        self._delete_lock = asyncio.Lock()
        self._retrier: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: Incident | None = None  # a Dial that came while a call was ending
        self._incident: Incident | None = None
        self._last_fix_sent = 0.0
        self.attempts = 0
        self.state = "idle"
        confine_host_addresses(ice.interfaces)

    # --- the incident machine's effects ---

    def handle(self, effect: Effect) -> None:
        match effect:
            case Dial(incident):
                self._pending = incident
                if self._task is None or self._task.done():
                    self._next_round()
            case HangUp(incident, reason):
                if self._pending is incident:
                    self._pending = None
                if incident is self._incident:
                    self.stop_soon(reason)
            case Publish(incident, event, details) if incident is not None \
                    and incident is self._incident and self.session is not None:
                if self.session.mode == "call":
                    self.session.send({"type": "phase", "event": event,
                                       "phase": str(incident.phase), "incident": incident.id,
                                       "details": details})

    def _next_round(self, _done: object = None) -> None:
        """Start the waiting Dial, if any, once the previous call has finished ending."""
        if self._pending is None or (self._task is not None and not self._task.done()):
            return
        incident, self._pending = self._pending, None
        self._incident = incident
        self._task = asyncio.get_running_loop().create_task(self._round(incident))
        self._task.add_done_callback(self._next_round)

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
        """Hang up, giving the dispatcher's DELETE a short bound: the car is stopping."""
        self._pending = None
        self.stop_soon("the car is shutting down")
        if self._task is not None:
            await asyncio.wait([self._task], timeout=SHUTDOWN_HANGUP_S + 1)
        if self.pending_deletes:
            await asyncio.wait([asyncio.ensure_future(self._retry_deletes(due_only=False))],
                               timeout=SHUTDOWN_HANGUP_S)
        if self._retrier is not None:
            self._retrier.cancel()
        await self._client.close()

    def describe(self) -> dict[str, Any]:
        session = self.session
        described = {**self.health.as_dict(), "call_state": self.state,
                     "attempts": self.attempts,
                     "endpoint": session.endpoint if session else None,
                     "endpoints": list(self.config.endpoints), "mode": self.config.mode,
                     "pending_deletes": len(self.pending_deletes)}
        if session is not None and session.rejected:
            described["refused_media"] = list(session.rejected)
        return described

    # --- sessions the server may still hold ---

    async def _close(self, session: CallSession, reason: str, *, hang_up: bool = True) -> None:
        failed = await session.close(reason, hang_up=hang_up)
        if failed is not None:
            self._keep_delete(failed)

    async def _close_bounded(self, session: CallSession, reason: str, *,
                             hang_up: bool = True) -> None:
        """`_close` within the hang-up bound. A DELETE still under way then is kept too, so
        the next POST frees the endpoint first (one-session servers refuse it otherwise)."""
        closing = asyncio.ensure_future(self._close(session, reason, hang_up=hang_up))
        done, _ = await asyncio.wait([closing], timeout=SHUTDOWN_HANGUP_S)
        if not done and hang_up and session.answer is not None:
            self._keep_delete(session.answer.location)

    def _keep_delete(self, location: str) -> None:
        self.pending_deletes[location] = (time.monotonic() + DELETE_RETRY_FIRST_S,
                                          DELETE_RETRY_FIRST_S)
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry_in_background())

    async def _retry_in_background(self) -> None:
        while self.pending_deletes:
            due = min(at for at, _ in self.pending_deletes.values())
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            before = len(self.pending_deletes)
            await self._retry_deletes(due_only=True)
            incident = self._incident
            if len(self.pending_deletes) < before and incident is not None and (
                    self._task is None or self._task.done()):
                # The server answers again: the machine may re-dial without waiting.
                self._events.call_reachable(incident)

    async def _retry_deletes(self, *, due_only: bool,
                             origin_of: str | None = None) -> str | None:
        """One try of each kept DELETE (those due, or all, or those on the origin of
        `origin_of`); success or 404 forgets it. Returns why a server on that origin
        could not be reached, if it could not."""
        unreachable = None
        async with self._delete_lock:
            now = time.monotonic()
            for location, (at, backoff) in list(self.pending_deletes.items()):
                if due_only and at > now:
                    continue
                if origin_of is not None and origin(location) != origin(origin_of):
                    continue
                try:
                    await self._client.hang_up(location, probe=True)
                except SignallingError as exc:
                    nobody = exc.kind in ("unreachable", "timeout")
                    if nobody:
                        unreachable = str(exc)
                    # A probe that reached nobody probed for its whole burst: on at once.
                    backoff = 0.0 if nobody else \
                        min(max(backoff * 2, DELETE_RETRY_FIRST_S), DELETE_RETRY_MAX_S)
                    self.pending_deletes[location] = (time.monotonic() + backoff, backoff)
                    log.info("DELETE %s still failing (next try in %g s): %s", location,
                             backoff, exc)
                else:
                    self.pending_deletes.pop(location, None)
                    log.warning("DELETE %s done on a retry", location)
        return unreachable

    # --- dialing ---

    async def _round(self, incident: Incident) -> None:
        """Each endpoint in order until one connects; the call then lasts until it ends."""
        try:
            for endpoint in self.config.endpoints:
                # Free the endpoint before asking it again; if its server cannot even be
                # reached, neither can it take a call: on to the next.
                unreachable = await self._retry_deletes(due_only=False, origin_of=endpoint)
                if unreachable is not None:
                    self.attempts += 1
                    self.health.set(State.DEGRADED, unreachable)
                    self._events.call_progress(incident, "call_failed", {
                        "endpoint": endpoint, "reason": unreachable, "kind": "unreachable"})
                    continue
                if await self._attempt(incident, endpoint):
                    return
            self.state = "idle"
            self._events.call_round_failed(incident)
        except Exception:  # never leave the machine waiting for a report that won't come
            log.exception("call to the dispatcher failed")
            session = self.session
            if session is not None:
                session.ended_by_dispatcher = False
                await self._close_bounded(session, "internal error")
                self._ended(incident, session)
            else:
                self._events.call_round_failed(incident)
        except asyncio.CancelledError:
            session = self.session or self._connecting
            if session is not None:
                await self._close_bounded(session, "the car hung up")
                if session is self.session:
                    self._ended(incident, session)
            raise
        finally:
            self.session = None
            self._connecting = None
            self.state = "idle"
            if self.health.detail.startswith("connected"):  # never "connected" when idle
                self.health.set(State.OK, "idle; the call was hung up")

    async def _attempt(self, incident: Incident, endpoint: str) -> bool:
        """One endpoint: True if it connected (and the call is over now)."""
        self.attempts += 1
        self.state = "calling"
        self._events.call_progress(incident, "calling", {"endpoint": endpoint,
                                                         "attempt": self.attempts})
        video = PassthroughVideoTrack(self._request_keyframe) if self._has_video else None
        audio = MicrophoneTrack() if self._has_audio else None
        self.speaker = self._new_speaker() if self._new_speaker else None
        rtc = await usable_configuration(self._ice, self._offered.get(endpoint, ()))
        session = CallSession(endpoint, self._client, rtc,
                              mode=self.config.mode, video=video, audio=audio,
                              speaker=self.speaker, on_message=self._dispatcher_said,
                              request_keyframe=self._request_keyframe)
        unsubscribe = [self._bus.subscribe(t.feed) for t in (video, audio) if t is not None]
        self._connecting = session
        try:
            started = time.monotonic()
            try:
                await session.connect(self.config.connect_timeout)
            except Exception as exc:  # SignallingError, and whatever aiortc or sockets raise
                signalling = isinstance(exc, SignallingError)
                reason = str(exc) if signalling else f"{endpoint}: {type(exc).__name__}: {exc}"
                kind = exc.kind if isinstance(exc, SignallingError) else "error"
                self.health.set(State.DEGRADED, reason)
                log.warning("call to %s failed (%s): %s", endpoint, kind, reason)
                details: dict[str, Any] = {"endpoint": endpoint, "reason": reason, "kind": kind}
                if isinstance(exc, SignallingError) and exc.status is not None:
                    details["status"] = exc.status
                self._events.call_progress(incident, "call_failed", details)
                # After a 201 the server holds a session: DELETE it (close knows).
                await self._close(session, reason)
                return False
            finally:
                if session.answer is not None and session.answer.ice_servers:
                    self._offered[endpoint] = session.answer.ice_servers
            self._connecting = None
            self.session = session
            self.state = "connected"
            setup_ms = round((time.monotonic() - started) * 1000)
            refused = f" ({'+'.join(session.carried)} only: the server refused " \
                      f"{', '.join(session.rejected)})" if session.rejected else ""
            self.health.set(State.OK, f"connected to {endpoint}{refused}")
            log.warning("call connected to %s in %d ms%s", endpoint, setup_ms, refused)
            # A dispatcher on the line keeps the incident open until it hangs up; a WHIP
            # ingest server has no say and the incident's own window applies.
            connected: dict[str, Any] = {"endpoint": endpoint, "setup_ms": setup_ms}
            if session.rejected:
                connected["refused_media"] = list(session.rejected)
            self._events.call_connected(incident, connected, holds=session.mode == "call")
            if session.mode == "call" and await session.channel_ready():
                fix = self._last_fix()
                session.send({"type": "msd", "incident": incident_message(
                    incident, "msd", {}, fix.as_dict() if fix else None)})
            await session.ended.wait()
            # A DELETE over a dead link must not delay the re-dial: bounded, and kept.
            await self._close_bounded(session, session.end_reason,
                                      hang_up=not session.ended_by_dispatcher)
            self.session = None
            self._ended(incident, session)
            return True
        finally:
            for undo in unsubscribe:
                undo()

    def _ended(self, incident: Incident, session: CallSession) -> None:
        self.state = "idle"
        seconds = time.monotonic() - session.connected_at if session.connected_at else 0.0
        log.warning("call to %s ended: %s", session.endpoint, session.end_reason)
        if session.ended_by_dispatcher or session.end_reason == "the car hung up":
            self.health.set(State.OK, f"idle; last call ended: {session.end_reason}")
        else:
            self.health.set(State.DEGRADED, f"call lost: {session.end_reason}")
        self._events.call_ended(incident, {"endpoint": session.endpoint,
                                           "reason": session.end_reason,
                                           "seconds": round(seconds, 1)},
                                by_dispatcher=session.ended_by_dispatcher)

    def _dispatcher_said(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "position_request":
            fix = self._last_fix()
            if self.session is not None:
                self.session.send({"type": "fix", "fix": fix.as_dict() if fix else None,
                                   "requested": True, "time": clock.iso(clock.now_ns()),
                                   "clock_source": clock.source()})
        elif kind == "hangup":
            log.warning("the dispatcher hung up")
