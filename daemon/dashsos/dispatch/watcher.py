"""One console watching one call: the car's video and audio out, the operator's mic in.

The car's H.264 and Opus go out as the car encoded them (aiortc packetizes them again,
nothing is decoded or encoded): a watcher costs the desk little more than the packets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from dashsos.config import IceConfig
from dashsos.dispatch import peer
from dashsos.dispatch.car import CarCall

log = logging.getLogger(__name__)


class Watcher:
    def __init__(self, watcher_id: str, call: CarCall, operator: str, ice: IceConfig,
                 on_close: Callable[[Watcher], None]) -> None:
        self.id = watcher_id
        self.call = call
        self.operator = operator
        self.mic = False  # the console sends a microphone
        self.mic_frames = 0
        self._on_close = on_close
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._feeds: list[MediaStreamTrack] = []
        self.pc = peer.new_peer(ice)
        video = call.subscribe("video")
        if video is not None:
            self._feeds.append(video)
            peer.prefer(self.pc.addTransceiver(video, direction="sendonly"), "video/H264")
        audio = call.subscribe("audio")
        if audio is not None:
            self._feeds.append(audio)
            peer.prefer(self.pc.addTransceiver(audio, direction="sendrecv"), "audio/opus")
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

    async def answer(self, offer: str, allowed: tuple[str, ...]) -> str:
        return await peer.answer(self.pc, offer, allowed)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        for feed in self._feeds:
            feed.stop()  # unsubscribes from the call's feed
        await self.pc.close()
        self._on_close(self)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio":
            return
        self.mic = True
        if self.call.talker is None:
            self.call.talker = self.id  # the first console with a microphone talks
        task = asyncio.ensure_future(self._drain(track))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, track: MediaStreamTrack) -> None:
        # Read the mic even when another console has the floor: aiortc queues unread
        # frames without limit.
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.mic_frames += 1
            if self.call.talker == self.id and isinstance(frame, AudioFrame):
                self.call.talkback.push(frame)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.debug("watcher %s: connection %s", self.id, state)
        if state in ("failed", "closed") and not self._closed:
            task = asyncio.ensure_future(self.close())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
