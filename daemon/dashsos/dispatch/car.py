"""One call from a car: the aiortc answerer, its recording, its telemetry, its talk-back.

The car offers; the desk answers at once. Transceivers are made before the offer is
applied so that aiortc picks H.264 for video and sends talk-back audio on the car's
sendrecv audio section. What the car sends is never decoded: its frames, as received,
go to the recording and to the consoles that watch (see encoded.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from aiortc import RTCDataChannel
from aiortc.mediastreams import MediaStreamTrack

from dashsos.config import IceConfig
from dashsos.dispatch import encoded, peer, record
from dashsos.dispatch.encoded import Feed, PacketTrack
from dashsos.dispatch.events import EventHub
from dashsos.dispatch.record import CallRecord
from dashsos.dispatch.recording import Recording
from dashsos.dispatch.talkback import TalkbackTrack

log = logging.getLogger(__name__)

TELEMETRY_LABEL = "telemetry"
# ICE gives up well before this on its own; this ends calls whose car vanished mid-setup.
CONNECT_TIMEOUT = 30.0
# How long a hung-up car gets to close the connection itself after {"type": "hangup"}
# (closing first could drop the message before it is sent).
HANGUP_GRACE = 1.0


class CarCall:
    def __init__(self, rec: CallRecord, recording: Recording, ice: IceConfig, hub: EventHub,
                 on_end: Callable[[CarCall], None]) -> None:
        self.record = rec
        self.recording = recording
        self.hub = hub
        self._on_end = on_end
        self.feeds: dict[str, Feed] = {}
        self.talkback = TalkbackTrack()
        self.talker: str | None = None  # the watcher whose microphone the car hears
        self.channel: RTCDataChannel | None = None
        self.ended = asyncio.Event()
        # Why the connection is about to close, if we know before aiortc tells us.
        self._closing_reason = record.CONNECTION_CLOSED
        self._tasks: set[asyncio.Task[None]] = set()
        self.pc = peer.new_peer(ice)
        audio = self.pc.addTransceiver(self.talkback, direction="sendrecv")
        peer.prefer(audio, "audio/opus")
        video = self.pc.addTransceiver("video", direction="recvonly")
        peer.prefer(video, "video/H264")
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    @property
    def id(self) -> str:
        return self.record.id

    async def answer(self, offer: str, allowed: tuple[str, ...]) -> str:
        """Answer the car's offer; recording starts with the tracks it announces."""
        answer = await peer.answer(self.pc, offer, allowed)
        await self.recording.start(self._recording_failed)
        self._spawn(self._connect_deadline())
        self._changed()
        return answer

    def subscribe(self, kind: str) -> PacketTrack | None:
        """A console's copy of what the car sends of `kind`, as the car encoded it; a new
        video copy asks the car for a keyframe so that it starts at once."""
        feed = self.feeds.get(kind)
        if feed is None:
            return None
        if kind == "video":
            encoded.request_keyframe(self.pc)
        return PacketTrack(feed)

    def send(self, message: dict[str, Any]) -> bool:
        """Send a message to the car on the telemetry channel; False if there is none."""
        if self.channel is None or self.channel.readyState != "open":
            return False
        self.channel.send(json.dumps(message, separators=(",", ":")))
        return True

    async def hangup(self) -> None:
        """The operator ends the call: tell the car, give it a moment, then close."""
        if not self.record.active:
            return
        self._closing_reason = record.OPERATOR_HUNG_UP
        if self.send({"type": "hangup"}):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), HANGUP_GRACE)
        await self.close(record.OPERATOR_HUNG_UP)

    async def abort(self) -> None:
        """The offer could not be answered: undo everything, quietly."""
        self.record.end(record.OFFER_REFUSED)
        self.ended.set()  # first: the "closed" event of pc.close() must not wait for us
        self.talkback.stop()
        await self.pc.close()
        await self.recording.close(self.record)

    async def close(self, reason: str) -> None:
        """End the call (the first reason given is the one kept): it is `saving` until its
        files are finished, then `ended`. Returns then, however often it is called."""
        if not self.record.end(reason):
            await self.ended.wait()
            return
        log.info("call %s (%s) ended: %s; saving its recording", self.id,
                 self.record.vehicle_id, reason)
        self._changed()
        self.talkback.stop()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self.pc.close()
        await self.recording.close(self.record)
        log.info("call %s: recording saved", self.id)
        self.hub.publish("call", self.record.as_json())
        self.ended.set()
        self._on_end(self)

    # --- aiortc events ---

    def _on_track(self, track: MediaStreamTrack) -> None:
        log.info("call %s: %s track from the car", self.id, track.kind)
        feed = encoded.tap(self.pc, track)
        self.feeds[track.kind] = feed
        self.recording.add_feed(feed)
        # Counted, so the console tells a call whose media stopped from a live one.
        feed.subscribe(lambda frame: self.record.count_frame(frame.kind))

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != TELEMETRY_LABEL:
            log.warning("call %s: data channel %r ignored", self.id, channel.label)
            return
        self.channel = channel
        channel.on("message", self._on_message)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.debug("call %s: connection %s", self.id, state)
        if state == "connected" and self.record.state == record.RINGING:
            self.record.state, self.record.connected = record.CONNECTED, record.now_iso()
            log.info("call %s (%s) connected", self.id, self.record.vehicle_id)
            self._changed()
        elif state == "failed":
            hanging_up = self._closing_reason == record.OPERATOR_HUNG_UP
            self._spawn(self.close(record.OPERATOR_HUNG_UP if hanging_up
                                   else record.CONNECTION_FAILED))
        elif state == "closed":
            self._spawn(self.close(self._closing_reason))

    def _on_message(self, data: str | bytes) -> None:
        try:
            message: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            message = None
        if not isinstance(message, dict):
            text = data if isinstance(data, str) else data.decode("utf-8", "replace")
            self.recording.telemetry(text)
            log.warning("call %s: telemetry that is not a JSON object: %.80r", self.id, text)
            return
        self.recording.telemetry(message)
        kind = message.get("type")
        if kind == "msd" and isinstance(message.get("incident"), dict):
            self.record.msd = message["incident"]
            self._changed()
        elif kind == "fix" and isinstance(message.get("fix"), dict):
            self.record.add_fix(message["fix"])
            self.recording.save(self.record)
            self.hub.publish("fix", {"call": self.id, "fix": message["fix"]})
        elif kind == "phase":
            msd = self.record.msd
            if msd is not None and message.get("incident") in (None, msd.get("id")):
                msd.update({k: message[k] for k in ("event", "phase") if k in message})
                if message.get("event") == "duress":  # sticky: the desk must not miss it
                    details = message.get("details")
                    by = details.get("by") if isinstance(details, dict) else None
                    msd["duress"] = by if isinstance(by, dict) else {"kind": "duress"}
            self._changed()

    # --- helpers ---

    def _recording_failed(self, error: str) -> None:
        """The desk's copy stopped (full disk, ...): the consoles must know at once."""
        if self.record.recording_error is None:
            self.record.recording_error = error
            self._changed()

    def _changed(self) -> None:
        self.recording.save(self.record)
        self.hub.publish("call", self.record.as_json())

    async def _connect_deadline(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT)
        if self.record.state == record.RINGING:
            await self.close(record.NEVER_CONNECTED)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
