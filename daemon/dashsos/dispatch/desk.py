"""The dispatch desk: every call, live and past, and every console watching one."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from dashsos.config import Config
from dashsos.dispatch import peer, record
from dashsos.dispatch.audit import AuditLog
from dashsos.dispatch.auth import TokenFile
from dashsos.dispatch.car import CarCall
from dashsos.dispatch.events import EventHub
from dashsos.dispatch.fleet import Fleet
from dashsos.dispatch.janus import JanusError, end_left_session
from dashsos.dispatch.janus_call import JanusCall, MediaServerError, make_media
from dashsos.dispatch.janus_watcher import JanusWatcher
from dashsos.dispatch.record import CallRecord
from dashsos.dispatch.recording import MEDIA, Recording, load_past, save_record
from dashsos.dispatch.sdp import allowed_networks
from dashsos.dispatch.sessions import FailLimit, Sessions
from dashsos.dispatch.watcher import Watcher

log = logging.getLogger(__name__)

# A desk has a few operators; each console watching costs packetizing and encryption.
WATCHERS_PER_CALL = 8
JANUS_DOWN_S = 30.0  # a Janus instance that could not take a call is tried last this long
LEFT_SESSION_TIMEOUT_S = 5.0  # ending a Janus session left behind: Janus answers in ms


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    """The request does not fit the call's state; the text says why."""


class Desk:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = Path(config.dispatch.recordings_dir)
        self.cars = TokenFile(config.dispatch.car_tokens_file, "car")
        self.operators = TokenFile(config.dispatch.console_tokens_file, "console")
        self.hub = EventHub()
        # Remote candidates outside these are dropped (see sdp.py); empty keeps all.
        self.allowed = allowed_networks(config.ice.interfaces)
        self.live: dict[str, CarCall | JanusCall] = {}  # ringing, connected or saving
        self.past: dict[str, CallRecord] = {}
        self.watchers: dict[str, Watcher | JanusWatcher] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.fleet = Fleet(config.mqtt, self.hub, self.known_vehicle, self.call_for)
        self.hub.taps.append(self._tap)
        self.sessions = Sessions()
        self.fail_limit = FailLimit()
        self.audit = AuditLog(self.root)
        # (vehicle id, incident id) -> {"owner", "taken"}: the fleet's incidents carry no
        # owner of their own (fleet.py is the MQTT side), so the desk keeps it here.
        self.incident_owners: dict[tuple[str, str], dict[str, str]] = {}
        self._janus_failed: dict[str, float] = {}  # Janus URL: when it could not take a call

    async def load(self) -> None:
        """Past calls from disk; a call open (or saving) when the desk last stopped is
        ended now: through Janus, its session there ended (the car dials again, and is
        seen) and its media.mp4 made if it was not."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.audit.load()
        for rec in load_past(self.root):
            on = rec.active  # stopped mid-call, not while saving (that left Janus already)
            if rec.interrupted():
                folder = self.root / rec.id
                if rec.media == "janus" and not (folder / MEDIA).exists():
                    if on:
                        await self._end_left_session(rec)
                    log.info("%s: making %s from Janus's recording", rec.id, MEDIA)
                    rec.recording_error = await asyncio.to_thread(
                        make_media, folder, rec.connected is not None)
                save_record(folder, rec)
            self.past[rec.id] = rec
        log.info("%d past calls in %s", len(self.past), self.root)

    async def _end_left_session(self, rec: CallRecord) -> None:
        left = rec.janus or {}
        url, session, room = left.get("url"), left.get("session"), left.get("room")
        if not (isinstance(url, str) and isinstance(session, int) and room):
            return
        try:
            async with asyncio.timeout(LEFT_SESSION_TIMEOUT_S):
                await end_left_session(url, session, room)
            log.info("%s: its Janus session %s and room %s ended", rec.id, session, room)
        except (JanusError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Janus gone too: its session, and with it the car's, ends by itself.
            log.warning("%s: cannot end its Janus session at %s: %s", rec.id, url, exc)

    # --- calls ---

    async def open_call(self, vehicle_id: str, offer: str) -> tuple[CarCall | JanusCall, str]:
        """Answer a car's offer: the call and the SDP answer. Raises peer.OfferError."""
        description = peer.check_offer(offer)
        mode = "call" if peer.has_data_channel(description) else "whip"
        for old in [c for c in self.live.values()
                    if c.record.vehicle_id == vehicle_id and c.record.active]:
            # A car has one emergency at a time; a new offer means it re-dialled. The old
            # call ends now; its files are finished meanwhile (through a Janus that hangs,
            # that takes its timeouts): the car's new call must not wait for them.
            self._spawn(old.close(record.REPLACED))
        if self.config.dispatch.media == "janus" and mode == "whip":
            return await self._open_janus_call(vehicle_id, offer)
        # Talk-back and telemetry (`call` mode) need the embedded media plane.
        return await self._answer(vehicle_id, mode, offer, self._car_call)

    async def _open_janus_call(self, vehicle_id: str, offer: str) -> tuple[JanusCall, str]:
        """Into the Janus instance carrying the fewest calls; one that cannot take it (down,
        unreachable) is passed over for the next, and for JANUS_DOWN_S after that."""
        urls = self._janus_urls()
        for url in urls:
            try:
                call, answer = await self._answer(vehicle_id, "whip", offer,
                                                  functools.partial(self._janus_call, url))
            except MediaServerError as exc:
                self._janus_failed[url] = time.monotonic()
                if url == urls[-1]:
                    raise
                log.warning("%s; trying the next Janus instance", exc)
                continue
            self._janus_failed.pop(url, None)
            assert isinstance(call, JanusCall)
            return call, answer
        raise MediaServerError("no Janus instance configured")  # config.py requires one

    def _car_call(self, rec: CallRecord, recording: Recording) -> CarCall:
        return CarCall(rec, recording, self.config.ice, self.hub, self._ended)

    def _janus_call(self, url: str, rec: CallRecord, recording: Recording) -> JanusCall:
        return JanusCall(rec, recording, url, self.hub, self._ended)

    async def _answer(self, vehicle_id: str, mode: str, offer: str,
                      make: Callable[[CallRecord, Recording], CarCall | JanusCall],
                      ) -> tuple[CarCall | JanusCall, str]:
        rec = CallRecord(id=record.new_call_id(), vehicle_id=vehicle_id, mode=mode)
        folder = self.root / rec.id
        rec.recording = str(folder)
        call = make(rec, Recording(folder))
        rec.media = "janus" if isinstance(call, JanusCall) else "embedded"
        self.live[rec.id] = call
        try:
            answer = await call.answer(offer, self.allowed)
        except (peer.OfferError, MediaServerError):
            self.live.pop(rec.id, None)
            await call.abort()
            # Nothing was received: keep no folder for an offer that never became a call.
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("call %s from %s (%s mode, %s)", rec.id, vehicle_id, mode, rec.media)
        return call, answer

    def _janus_urls(self) -> list[str]:
        """The Janus instances to try, best first: those that did not fail in the last
        JANUS_DOWN_S, then by fewest live calls (calls spread over them)."""
        load = {url: 0 for url in self.config.dispatch.janus_urls}
        for call in self.live.values():
            if isinstance(call, JanusCall) and call.janus_url in load:
                load[call.janus_url] += 1
        now = time.monotonic()

        def down(url: str) -> bool:
            return now - self._janus_failed.get(url, -JANUS_DOWN_S) < JANUS_DOWN_S

        return sorted(load, key=lambda url: (down(url), load[url]))

    def _ended(self, call: CarCall | JanusCall) -> None:
        self.live.pop(call.id, None)
        self.past = {call.id: call.record, **self.past}
        for watcher in [w for w in self.watchers.values() if w.call is call]:
            self._spawn_close(watcher)

    def live_call(self, call_id: str) -> CarCall | JanusCall:
        """The call, ringing or connected: one that is over is no longer acted on."""
        call = self.live.get(call_id)
        if call is None:
            if call_id in self.past:
                raise Conflict(f"call {call_id} has ended")
            raise NotFound(f"no call {call_id}")
        if call.record.state == record.SAVING:
            raise Conflict(f"call {call_id} has ended (its recording is being saved)")
        return call

    def car_call(self, call_id: str, vehicle_id: str) -> CarCall | JanusCall:
        """A live call of this car; another car's call is not found, not forbidden."""
        call = self.live.get(call_id)
        if call is None or call.record.vehicle_id != vehicle_id:
            raise NotFound(f"no call {call_id}")
        return call

    def calls(self) -> list[dict[str, Any]]:
        """Live calls (newest first), then past ones (newest first)."""
        live = sorted(self.live.values(), key=lambda c: c.record.started, reverse=True)
        return ([c.record.as_json() for c in live]
                + [r.as_json() for r in sorted(self.past.values(), key=lambda r: r.started,
                                               reverse=True)])

    # --- the fleet's incidents (MQTT), matched to calls by incident id ---

    def known_vehicle(self, vehicle_id: str) -> bool:
        """In car_tokens_file (TokenFile re-reads it when it changes)."""
        return vehicle_id in self.cars._tokens().values()

    def call_for(self, vehicle_id: str, incident_id: str) -> dict[str, Any] | None:
        """The newest call of this car whose MSD names the incident, in short."""
        matches = [c.record for c in self.live.values()] + list(self.past.values())
        matches = [r for r in matches if r.vehicle_id == vehicle_id and r.msd is not None
                   and r.msd.get("id") == incident_id]
        if not matches:
            return None
        rec = max(matches, key=lambda r: (r.active, r.started))
        return {"id": rec.id, "state": rec.state, "started": rec.started,
                "connected": rec.connected, "ended": rec.ended, "end_reason": rec.end_reason}

    def _tap(self, event: str, data: dict[str, Any]) -> None:
        if event == "call":
            self.fleet.call_changed(str(data.get("vehicle_id", "")), data.get("msd"))
        elif event == "incident":
            # Every incident event, whoever sends it, says who owns the incident.
            data.update(self.incident_owner(str(data.get("vehicle_id", "")),
                                            str(data.get("id", ""))))

    def incident_owner(self, vehicle_id: str, incident_id: str) -> dict[str, str | None]:
        taken = self.incident_owners.get((vehicle_id, incident_id), {})
        return {"owner": taken.get("owner"), "taken": taken.get("taken")}

    # --- consoles ---

    def _room_for_a_watcher(self, call: CarCall | JanusCall) -> None:
        if sum(1 for w in self.watchers.values() if w.call is call) >= WATCHERS_PER_CALL:
            raise Conflict(f"call {call.id} already has {WATCHERS_PER_CALL} watchers")

    async def watch(self, call_id: str, operator: str, offer: str) -> tuple[Watcher, str]:
        call = self.live_call(call_id)
        if not isinstance(call, CarCall):
            raise Conflict(f"call {call_id} is carried by Janus: subscribe to it "
                           f"(POST /api/calls/{call_id}/subscribe)")
        self._room_for_a_watcher(call)
        peer.check_offer(offer)
        watcher = Watcher(f"w-{secrets.token_hex(6)}", call, operator, self.config.ice,
                          self._unwatched)
        self.watchers[watcher.id] = watcher
        try:
            answer = await watcher.answer(offer, self.allowed)
        except peer.OfferError:
            await watcher.close()
            raise
        if call.talker == watcher.id and call.record.owner not in (None, operator):
            call.talker = None  # the car hears its owner only, never a console watching
        log.info("%s watches call %s (watcher %s)", operator, call_id, watcher.id)
        return watcher, answer

    async def subscribe(self, call_id: str, operator: str) -> tuple[JanusWatcher, str]:
        """A console's subscription to a call carried by Janus: Janus's offer."""
        call = self.live_call(call_id)
        if not isinstance(call, JanusCall):
            raise Conflict(f"call {call_id} is carried by this desk: watch it "
                           f"(POST /api/calls/{call_id}/watch with an offer)")
        self._room_for_a_watcher(call)
        watcher = JanusWatcher(f"w-{secrets.token_hex(6)}", call, operator, self._unwatched)
        self.watchers[watcher.id] = watcher
        try:
            offer = await watcher.offer()
        except (peer.OfferError, MediaServerError):
            await watcher.close()
            raise
        log.info("%s subscribes to call %s through Janus (watcher %s)", operator, call_id,
                 watcher.id)
        return watcher, offer

    async def subscribed(self, watcher_id: str, answer: str) -> None:
        watcher = self.watchers.get(watcher_id)
        if not isinstance(watcher, JanusWatcher):
            raise NotFound(f"no subscription {watcher_id}")
        await watcher.answer(answer)

    def talk(self, call_id: str, watcher_id: str | None) -> None:
        """Give the car's speaker to `watcher_id` (None: to nobody)."""
        call = self.live_call(call_id)
        if watcher_id is not None:
            watcher = self.watchers.get(watcher_id)
            if watcher is None or watcher.call is not call:
                raise NotFound(f"no watcher {watcher_id} on call {call_id}")
        call.talker = watcher_id

    async def unwatch(self, watcher_id: str) -> None:
        watcher = self.watchers.get(watcher_id)
        if watcher is None:
            raise NotFound(f"no watcher {watcher_id}")
        await watcher.close()

    def _unwatched(self, watcher: Watcher | JanusWatcher) -> None:
        self.watchers.pop(watcher.id, None)
        call = watcher.call
        if call.talker == watcher.id:
            # Back to the default: the earliest remaining console with a microphone.
            call.talker = next((w.id for w in self.watchers.values()
                                if w.call is call and w.mic
                                and call.record.owner in (None, w.operator)), None)

    def _spawn_close(self, watcher: Watcher | JanusWatcher) -> None:
        # Called from a call's end, which must not wait for every browser to go.
        self._spawn(watcher.close())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # --- lifetime ---

    async def close(self) -> None:
        """End every call (their files are finished) and every console stream."""
        self.fleet.stop()
        for watcher in list(self.watchers.values()):
            await watcher.close()
        for call in list(self.live.values()):
            await call.close(record.DESK_STOPPED)
        self.hub.close()


DESK = web.AppKey("desk", Desk)
