"""One call to one dispatcher endpoint: the aiortc peer and its signalling.

aiortc has no ICE restart, so a call that breaks is closed and the dialer makes a new
one. Liveness in `call` mode comes from the dispatcher's audio (it always sends, silence
until an operator talks): ICE consent would take 30 s to notice a dead dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from dashsos.call.signalling import Answer, SignallingError, WhipClient
from dashsos.call.talkback import Speaker
from dashsos.call.tracks import MicrophoneTrack, PassthroughVideoTrack

log = logging.getLogger(__name__)

SILENCE_TIMEOUT_S = 3.0  # no media from the dispatcher this long: the call is dead


def _prefer(transceiver: Any, kind: str, mime_type: str) -> None:
    codecs = RTCRtpSender.getCapabilities(kind).codecs
    preferred = [c for c in codecs if c.mimeType.lower() == mime_type.lower()]
    # rtx keeps retransmissions of the preferred codec working
    preferred += [c for c in codecs if c.mimeType.lower().endswith("/rtx")]
    transceiver.setCodecPreferences(preferred)


class CallSession:
    def __init__(self, endpoint: str, client: WhipClient, rtc: RTCConfiguration, *, mode: str,
                 video: PassthroughVideoTrack | None, audio: MicrophoneTrack | None,
                 speaker: Speaker | None, on_message: Callable[[dict[str, Any]], None],
                 request_keyframe: Callable[[], None]) -> None:
        self.endpoint = endpoint
        self.mode = mode
        self._client = client
        self._pc = RTCPeerConnection(rtc)
        self._video = video
        self._audio = audio
        self._speaker = speaker
        self._on_message = on_message
        self._request_keyframe = request_keyframe
        self._channel: RTCDataChannel | None = None
        self._answer: Answer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.ended_by_dispatcher = False
        self.last_media = time.monotonic()
        self.connected_at: float | None = None

    @property
    def channel_open(self) -> bool:
        return self._channel is not None and self._channel.readyState == "open"

    async def connect(self, timeout: float) -> None:
        """Offer, get the answer, wait for the media path. Raises SignallingError."""
        pc = self._pc
        pc.on("connectionstatechange", self._state_changed)
        pc.on("track", self._remote_track)
        if self._audio is not None:
            audio = pc.addTransceiver(self._audio, direction="sendonly" if self.mode == "whip"
                                      else "sendrecv")
            _prefer(audio, "audio", "audio/opus")
        if self._video is not None:
            video = pc.addTransceiver(self._video, direction="sendonly")
            _prefer(video, "video", "video/H264")
            # aiortc ignores keyframe requests for pre-encoded video; ask the camera.
            video.sender._send_keyframe = self._request_keyframe  # type: ignore[method-assign]
        if self.mode == "call":
            self._channel = pc.createDataChannel("telemetry")
            self._channel.on("message", self._message)
        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate
        self._answer = await self._client.offer(self.endpoint, pc.localDescription.sdp)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(self._answer.sdp, "answer"))
        except Exception as exc:  # aiortc raises many kinds for SDP it cannot use
            raise SignallingError("malformed", f"{self.endpoint}: unusable SDP answer: "
                                               f"{exc or type(exc).__name__}") from exc
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError as exc:
            raise SignallingError("timeout", f"{self.endpoint}: answered, but no media path "
                                             f"within {timeout:g} s (ICE)") from exc
        if self.ended.is_set():
            raise SignallingError("rejected", f"{self.endpoint}: {self.end_reason}")
        self.connected_at = time.monotonic()
        self.last_media = time.monotonic()
        if self.mode == "call":
            self._tasks.append(asyncio.create_task(self._watch_liveness()))

    def send(self, message: dict[str, Any]) -> bool:
        if not self.channel_open:
            return False
        assert self._channel is not None
        self._channel.send(json.dumps(message, separators=(",", ":")))
        return True

    async def channel_ready(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.channel_open and time.monotonic() < deadline and not self.ended.is_set():
            await asyncio.sleep(0.02)
        return self.channel_open

    async def close(self, reason: str, *, hang_up: bool = True) -> None:
        self._end(reason)
        for task in self._tasks:
            task.cancel()
        if self._speaker is not None:
            self._speaker.close()
        if hang_up and self._answer is not None:
            try:
                await self._client.hang_up(self._answer.location)
            except (TimeoutError, SignallingError, OSError) as exc:
                log.info("hang-up at %s: %s", self.endpoint, exc)
            except Exception as exc:  # the peer is going away regardless
                log.info("hang-up at %s failed: %s", self.endpoint, exc)
        try:
            await self._pc.close()
        except Exception as exc:  # aiortc trips over some answers it half accepted
            log.info("closing the peer for %s: %s: %s", self.endpoint, type(exc).__name__, exc)

    # --- events ---

    def _end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    async def _state_changed(self) -> None:
        state = self._pc.connectionState
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            self._end(f"connection {state}")
            self._connected.set()

    def _remote_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._tasks.append(asyncio.create_task(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        """The dispatcher's voice: played (unless covert) and proof the call is alive."""
        speaker = self._speaker
        if speaker is not None:
            relay = _Tap(track, self)
            await speaker.play(relay)
            return
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                await track.recv()
                self.last_media = time.monotonic()

    async def _watch_liveness(self) -> None:
        while not self.ended.is_set():
            await asyncio.sleep(0.5)
            if time.monotonic() - self.last_media > SILENCE_TIMEOUT_S:
                self._end(f"no media from the dispatcher for {SILENCE_TIMEOUT_S:g} s")

    def _message(self, data: str | bytes) -> None:
        try:
            message = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            log.warning("dispatcher sent a malformed telemetry message")
            return
        if not isinstance(message, dict):
            return
        if message.get("type") == "hangup":
            self.ended_by_dispatcher = True
            self._end("the dispatcher hung up")
        self._on_message(message)


class _Tap(MediaStreamTrack):
    """Passes the dispatcher's audio to the speaker, noting that media arrives."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, session: CallSession) -> None:
        super().__init__()
        self._source = source
        self._session = session

    async def recv(self) -> Any:
        frame = await self._source.recv()
        self._session.last_media = time.monotonic()
        return frame
