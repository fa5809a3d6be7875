"""One car's call carried by Janus (`dispatch.media = "janus"`): the desk authenticates
the car and signals; a Janus VideoRoom takes the car's media, and records it as it came.

The car's WHIP offer becomes a publisher in a room of its own, created for the call with
Janus recording on (`rec_dir` is the call's folder: Janus must be able to write there,
so the recordings dir lies outside Janus's `protected_folders`). When the call ends the
desk leaves and destroys the room, then turns Janus's .mjr files into the call's
media.mp4 the way the embedded desk writes it: janus-pp-rec depacketizes (no
transcoding) and dispatch/muxer.py muxes the car's H.264 and Opus frames, with the
parameter sets of the car's own first keyframe. The .mjr files stay, as Janus wrote them.

A car in `call` mode (talk-back, telemetry channel) is answered by the embedded desk
only: a VideoRoom publisher's answer is receive-only and its data goes to subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import av

from dashsos.dispatch import peer, record
from dashsos.dispatch.encoded import EncodedFrame
from dashsos.dispatch.events import EventHub
from dashsos.dispatch.janus import JanusError, JanusSession, recording_files
from dashsos.dispatch.muxer import Mp4Writer
from dashsos.dispatch.record import CallRecord
from dashsos.dispatch.recording import MEDIA, Recording
from dashsos.dispatch.sdp import filter_candidates
from dashsos.media import h264

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0  # as the embedded desk: a car that never connects is let go
RECORDING = "car"  # Janus's files: car-audio-0.mjr, car-video-1.mjr
CONVERT_TIMEOUT_S = 600.0


class MediaServerError(RuntimeError):
    """Janus could not take the call (unreachable, or it refused); the text says why."""


class JanusCall:
    def __init__(self, rec: CallRecord, recording: Recording, janus_url: str, hub: EventHub,
                 on_end: Callable[[JanusCall], None]) -> None:
        self.record = rec
        self.recording = recording  # call.json and telemetry.jsonl; Janus has the media
        self.janus_url = janus_url
        self.hub = hub
        self._on_end = on_end
        self.janus = JanusSession(janus_url)
        self.room = secrets.randbelow(2**52) + 1
        self.ended = asyncio.Event()
        self.talker: str | None = None  # no talk-back through a VideoRoom publisher
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def id(self) -> str:
        return self.record.id

    def subscribe(self, kind: str) -> None:
        return None  # consoles watch through Janus, not through the desk

    def send(self, message: dict[str, Any]) -> bool:
        return False  # no telemetry channel in whip mode

    async def answer(self, offer: str, allowed: tuple[str, ...]) -> str:
        """Publish the car's offer into a new recorded room; Janus's answer."""
        offer = filter_candidates(offer, allowed, complete=True)
        try:
            await self.janus.start()
            await self.janus.ensure_room(self.room, self.recording.folder,
                                         f"{self.record.vehicle_id} {self.id}")
            self.record.janus = {"url": self.janus_url, "session": self.janus.session_id,
                                 "room": self.room}
            answer = await self.janus.publish(self.room, self.record.vehicle_id, offer,
                                              recording=RECORDING)
        except JanusError as exc:
            raise peer.OfferError(f"the media server refused the offer: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            raise MediaServerError(f"the media server ({self.janus_url}) cannot take the "
                                   f"call: {type(exc).__name__}: {exc}") from exc
        self._spawn(self._events())
        self._spawn(self._connect_deadline())
        self._changed()
        return answer

    async def abort(self) -> None:
        self.record.end(record.OFFER_REFUSED)
        self.ended.set()
        await self._leave()
        await self.recording.close(self.record)

    async def hangup(self) -> None:
        await self.close(record.OPERATOR_HUNG_UP)

    async def close(self, reason: str) -> None:
        """End the call: `saving` while Janus's recording becomes media.mp4, then `ended`."""
        if not self.record.end(reason):
            await self.ended.wait()
            return
        log.info("call %s (%s) ended: %s; saving its recording", self.id,
                 self.record.vehicle_id, reason)
        self._changed()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self._leave()  # Janus closes its .mjr files on the way
        error = await asyncio.to_thread(make_media, self.recording.folder,
                                        self.record.connected is not None)
        self.record.recording_error = self.record.recording_error or error
        await self.recording.close(self.record)
        log.info("call %s: recording saved", self.id)
        self.hub.publish("call", self.record.as_json())
        self.ended.set()
        self._on_end(self)

    async def _leave(self) -> None:
        if self.janus.handle_id is not None:
            try:
                await self.janus.destroy_room(self.room)
            except (JanusError, aiohttp.ClientError, TimeoutError) as exc:
                log.info("call %s: destroying room %s: %s", self.id, self.room, exc)
        await self.janus.close()

    async def _events(self) -> None:
        """Janus's word on the publisher: up (webrtcup), gone (hangup)."""
        while True:
            event = await self.janus.events.get()
            kind = event.get("janus")
            if kind == "webrtcup" and self.record.state == record.RINGING:
                self.record.state, self.record.connected = record.CONNECTED, record.now_iso()
                log.info("call %s (%s) connected through Janus", self.id,
                         self.record.vehicle_id)
                self._changed()
            elif kind == "hangup":
                self._spawn(self.close(record.CONNECTION_FAILED
                                       if self.record.state == record.CONNECTED
                                       else record.NEVER_CONNECTED))
                return

    async def _connect_deadline(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT)
        if self.record.state == record.RINGING:
            await self.close(record.NEVER_CONNECTED)

    def _changed(self) -> None:
        self.recording.save(self.record)
        self.hub.publish("call", self.record.as_json())

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def make_media(folder: Path, connected: bool) -> str | None:
    """media.mp4 from Janus's recording in `folder`; why not, if it could not be (a call
    that never connected has nothing to record). Blocks."""
    try:
        if remux(folder) is None and connected:
            # Janus says nothing over its API when it cannot record (its log does).
            return (f"Janus recorded nothing into {folder} (writable by Janus? outside its "
                    "general.protected_folders?)")
    except (OSError, subprocess.SubprocessError, ValueError, av.FFmpegError) as exc:
        log.error("%s: Janus's recording could not be made into %s: %s", folder.name, MEDIA,
                  exc)
        return f"Janus's recording not made into {MEDIA}: {exc}"
    return None


def remux(folder: Path) -> Path | None:
    """Janus's .mjr files in `folder` as media.mp4 (none: None). Blocks."""
    files = recording_files(folder, RECORDING)
    if not files:
        log.warning("%s: Janus recorded nothing", folder)
        return None
    if shutil.which("janus-pp-rec") is None:
        raise OSError("janus-pp-rec is missing (Debian: janus-tools)")
    frames: list[EncodedFrame] = []
    for kind, mjr in files.items():
        converted = folder / f".{kind}{'.mp4' if kind == 'video' else '.opus'}"
        subprocess.run(["janus-pp-rec", str(mjr), str(converted)], check=True,
                       capture_output=True, timeout=CONVERT_TIMEOUT_S)
        try:
            frames += _frames(kind, converted)
        finally:
            converted.unlink(missing_ok=True)
    write_media(folder / MEDIA, frames)
    return folder / MEDIA


def write_media(path: Path, frames: list[EncodedFrame]) -> None:
    """A whole call's frames as one MP4. Blocks."""
    # Written in this thread, at the disk's pace: the whole call is at hand, so no queue
    # to a writer thread (whose backlog bound is for live calls) and no time limit.
    frames = sorted(frames, key=lambda f: f.arrival)
    writer = Mp4Writer(path, sorted({f.kind for f in frames}, reverse=True))
    for frame in frames:
        writer.take(frame)
    writer.finish()


def _frames(kind: str, path: Path) -> list[EncodedFrame]:
    """The depacketized frames janus-pp-rec wrote, as the embedded desk receives them
    (H.264 back to Annex B: its MP4 header holds parameter sets of Janus's own making)."""
    rate = 90000 if kind == "video" else 48000
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0] if kind == "video" else container.streams.audio[0]
        for packet in container.demux(stream):
            if packet.pts is None or not packet.size:
                continue
            seconds = float(packet.pts * packet.time_base)
            data = h264.annexb(bytes(packet)) if kind == "video" else bytes(packet)
            keyframe = kind == "audio" or h264.is_keyframe(data)
            frames.append(EncodedFrame(kind, data, round(seconds * rate), rate, seconds,
                                       keyframe))
    return frames
