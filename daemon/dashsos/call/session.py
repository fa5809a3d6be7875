"""One call to one dispatcher endpoint: the aiortc peer and its signalling.

aiortc has no ICE restart, so a call that breaks is closed and the dialer makes a new
one. Liveness in `call` mode comes from the dispatcher's audio (it always sends, silence
until an operator talks); in `whip` mode from the server's RTCP receiver reports (about
one a second). ICE consent alone would take 30-40 s to notice a dead far end. When the
far end goes silent, a TCP probe of its server tells a dead far end (the server answers
or refuses: re-dial) from a path that is down (nothing answers: the session is kept, and
media resumes on it in a round trip when the path returns; a new one takes several).

Once the server has answered 201, the session exists there: close() DELETEs it whatever
went wrong after that, and returns the Location when the DELETE could not be done, so
the dialer can keep trying.
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

SILENCE_TIMEOUT_S = 3.0  # no media (or RTCP) from the far end this long: is it dead?
# It is if its server's host answers (and, when the path was down until then, media does
# not come back within an RTCP interval of its return, this long)...
RESUME_GRACE_S = 1.5
# ...but a host that cannot be reached means the path is down: the session is kept this
# long for media to resume on it when the path returns (ICE consent gives up at ~30 s).
STALL_MAX_S = 20.0
OFFER_GRACE_S = 2.0  # a hang-up during the POST waits this long to learn what to DELETE


def whip_offer(sdp: str) -> str:
    """RFC 9725 4.2: the offer says rtcp-mux-only (aiortc muxes anyway)."""
    lines = sdp.split("\r\n")
    out: list[str] = []
    for line in lines:
        out.append(line)
        if line == "a=rtcp-mux":
            out.append("a=rtcp-mux-only")
    return "\r\n".join(out)


def _sections(sdp: str) -> tuple[str, list[str]]:
    head, *media = sdp.split("\r\nm=")
    return head, ["m=" + m for m in media]


def accepted_answer(answer: str, offer: str) -> tuple[str, list[str]]:
    """An answer aiortc can use when the server rejected m-lines (port 0, often without
    ICE or DTLS attributes, which aiortc refuses): each rejected section becomes our own
    offer's section, inactive, on the accepted sections' (bundled) transport. Returns the
    SDP and the kinds rejected."""
    head, media = _sections(answer)
    _, offered = _sections(offer)
    rejected = [i for i, m in enumerate(media) if m.split(" ", 2)[1:2] == ["0"]]
    accepted = [m for i, m in enumerate(media) if i not in rejected]
    if not rejected or not accepted or len(offered) != len(media):
        return answer, [media[i].split(" ")[0][2:] for i in rejected]
    transport = [line for line in accepted[0].split("\r\n")
                 if line.startswith(("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:",
                                     "a=setup:"))]
    kinds = []
    for i in rejected:
        kinds.append(media[i].split(" ")[0][2:])
        lines = [line for line in offered[i].split("\r\n") if line and not line.startswith(
            ("a=ice-", "a=fingerprint:", "a=setup:", "a=candidate:", "a=end-of-candidates",
             "a=sendonly", "a=sendrecv", "a=recvonly", "a=inactive", "a=ssrc",
             "a=msid", "a=rtcp-mux-only"))]
        lines.insert(2, "a=inactive")
        media[i] = "\r\n".join(lines + transport)
    return "\r\n".join([head, *media]), kinds


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
        self._offering: asyncio.Future[Answer] | None = None
        self.rejected: list[str] = []  # kinds of media the far end refused (port 0)
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
        # The POST runs on even if this call is cancelled: close() needs its Location.
        posted = time.monotonic()
        self._offering = asyncio.ensure_future(
            self._client.offer(self.endpoint, whip_offer(pc.localDescription.sdp)))
        self._answer = await asyncio.shield(self._offering)
        answered = time.monotonic()
        sdp, self.rejected = accepted_answer(self._answer.sdp, pc.localDescription.sdp)
        if self.rejected and len(self.rejected) == len(pc.getTransceivers()):
            raise SignallingError("rejected", f"{self.endpoint}: the answer rejects every "
                                              f"stream ({', '.join(self.rejected)})")
        if self.rejected:
            log.warning("%s refused %s; the call carries the rest", self.endpoint,
                        ", ".join(self.rejected))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
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
        log.info("%s: answered %d ms after the POST, media path (ICE, DTLS) %d ms later",
                 self.endpoint, (answered - posted) * 1000,
                 (self.connected_at - answered) * 1000)
        self.last_media = time.monotonic()
        if self.mode == "whip":
            self._tasks.append(asyncio.create_task(self._watch_reports()))
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

    @property
    def answer(self) -> Answer | None:
        return self._answer

    @property
    def carried(self) -> list[str]:
        """The kinds of media the far end accepted."""
        return [t.kind for t in self._pc.getTransceivers() if t.kind not in self.rejected]

    async def close(self, reason: str, *, hang_up: bool = True) -> str | None:
        """End the call; DELETE the server's session if there is one. Returns its
        Location if the DELETE failed (the server still holds it), else None."""
        self._end(reason)
        for task in self._tasks:
            task.cancel()
        if self._speaker is not None:
            self._speaker.close()
        offering = self._offering
        if self._answer is None and offering is not None:
            if not offering.done():
                await asyncio.wait([offering], timeout=OFFER_GRACE_S)
            if offering.done() and not offering.cancelled() and offering.exception() is None:
                self._answer = offering.result()
            elif not offering.done():
                offering.cancel()  # no answer yet: there is nothing we could DELETE
        failed = None
        if hang_up and self._answer is not None:
            try:
                await self._client.hang_up(self._answer.location)
            except SignallingError as exc:
                log.warning("hang-up at %s failed, kept for a retry: %s", self.endpoint, exc)
                failed = self._answer.location
            except Exception as exc:  # any other fault: the server may still hold it
                log.warning("hang-up at %s failed, kept for a retry: %s: %s", self.endpoint,
                            type(exc).__name__, exc)
                failed = self._answer.location
        try:
            await self._pc.close()
        except Exception as exc:  # aiortc trips over some answers it half accepted
            log.info("closing the peer for %s: %s: %s", self.endpoint, type(exc).__name__, exc)
        return failed

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

    async def _watch_reports(self) -> None:
        """whip mode: the server's RTCP receiver reports about what we send."""
        seen: dict[str, Any] = {}
        senders = [t.sender for t in self._pc.getTransceivers()
                   if t.sender is not None and t.sender.track is not None
                   and t.kind not in self.rejected]
        while not self.ended.is_set():
            for sender in senders:
                with contextlib.suppress(Exception):
                    for stats in (await sender.getStats()).values():
                        if stats.type == "remote-inbound-rtp" and \
                                seen.get(stats.id) != stats.timestamp:
                            seen[stats.id] = stats.timestamp
                            self.last_media = time.monotonic()
            await asyncio.sleep(0.25)

    async def _watch_liveness(self) -> None:
        while not self.ended.is_set():
            await asyncio.sleep(0.5)
            if time.monotonic() - self.last_media > SILENCE_TIMEOUT_S:
                reason = await self._silent()
                if reason is not None:
                    self._end(reason)

    async def _silent(self) -> str | None:
        """The far end went silent: dead (its server's host answers, media does not
        resume), or the path is down (nothing answers: keep the session, as the same
        session resumes in a round trip when the path returns, a new one takes several).
        Returns why the call is over, None when media resumed."""
        what = "RTCP reports" if self.mode == "whip" else "media"
        since = self.last_media
        stalled = time.monotonic()
        path_was_down = False
        while not self.ended.is_set() and self.last_media == since:
            left = STALL_MAX_S - (time.monotonic() - stalled)
            if left <= 0:
                return f"no {what} from the far end for {time.monotonic() - since:.0f} s " \
                       "(the path did not return)"
            answer = await self._client.reachable(self.endpoint, min(left, 1.0))
            if answer == "refused":
                return f"no {what} from the far end for {time.monotonic() - since:.0f} s, " \
                       "and its server refuses connections"
            if answer == "accepted":
                # The path just came back: media follows within an RTCP interval.
                resume_by = time.monotonic() + (RESUME_GRACE_S if path_was_down else 0.0)
                while self.last_media == since and time.monotonic() < resume_by:
                    await asyncio.sleep(0.05)
                if self.last_media == since:
                    return f"no {what} from the far end for " \
                           f"{time.monotonic() - since:.0f} s, though its server answers"
            path_was_down = True
        if time.monotonic() - stalled > 0.5:
            log.warning("%s: the same session resumed after %.1f s without %s",
                        self.endpoint, time.monotonic() - since, what)
        return None

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
