"""A minimal WHIP server (RFC 9725) for tests: answers with aiortc, counts media, records
what the client sent, and can be told to fail in the ways real servers fail.

`single=True` behaves like common WHIP front ends: one publisher per endpoint, a second
POST is answered 403 "Endpoint ID already in use" until the first session is DELETEd.
`kill_sessions()` makes every session go silent at once, without a DTLS close (as a
killed server or a dropped link would)."""

from __future__ import annotations

import asyncio
import re
import secrets
import struct
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from conftest import free_port
from dashsos.call.ice import confine_host_addresses


@dataclass
class Session:
    pc: RTCPeerConnection
    offer: str
    headers: dict[str, str]
    video_frames: int = 0
    audio_frames: int = 0
    first_frame_at: float | None = None
    deleted: bool = False
    messages: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)
    video_times: list[float] = field(default_factory=list)  # monotonic, each decoded frame
    video_pts: list[float] = field(default_factory=list)  # its media time, seconds
    audio_times: list[float] = field(default_factory=list)
    key: str = ""


class WhipServer:
    """Runs in a thread with its own event loop; `failure` selects a misbehaviour."""

    def __init__(self, token: str = "car-token", *, single: bool = False,
                 host: str = "127.0.0.1", port: int | None = None,
                 tls: Any = None, audio_dir: Path | None = None) -> None:
        confine_host_addresses((host,))
        self.tls = tls  # an ssl.SSLContext: the endpoint is https
        # Decoded audio goes to <audio_dir>/<session>.pcm as records of
        # (pts: int64 at 48 kHz, samples: uint32, mono int16 samples), and the Opus
        # packets as they arrived to <session>.rtp, for what the desk heard to be
        # compared with what the car's microphone took (tests/speech.py).
        self.audio_dir = audio_dir
        self.token = token
        self.single = single
        self.host = host
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}/whip"
        # "500", "malformed", "html", "no-location", "hang", "bad-sdp", "ice-timeout"
        # (a 201 whose answer leads nowhere), "reject-video" (video m-line port 0),
        # "slow" (the 201 comes after 2 s)
        self.failure: str | None = None
        self.delete_failure: int | None = None  # DELETE answers this status while set
        self.redirect_to: str | None = None  # POST /redirect answers 307 to it
        self.ice_links: list[str] = []  # Link headers for the 201
        self.refusals = 0  # 403s for a busy endpoint
        self.sessions: dict[str, Session] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self._start())

    def call(self, coro: Any, timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/whip", self._post)
        app.router.add_post("/redirect", self._redirect)
        app.router.add_delete("/whip/{id}", self._delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls).start()

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("POST", dict(request.headers)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        if request.content_type != "application/sdp":
            return web.Response(status=415)
        if self.failure == "500":
            return web.Response(status=500, text="broken")
        if self.failure == "hang":
            await asyncio.sleep(60)
        if self.single and self.live():
            self.refusals += 1
            return web.Response(status=403, text="Endpoint ID already in use")
        offer = await request.text()
        if self.failure == "slow":
            await asyncio.sleep(1)
        if self.failure == "malformed":
            return web.Response(status=201, content_type="application/sdp",
                                headers={"Location": "/whip/x"}, text="v=0\r\nthis is not sdp")
        if self.failure == "bad-sdp":  # SDP-shaped, but no ICE credentials
            return web.Response(status=201, content_type="application/sdp",
                                headers={"Location": "/whip/x"},
                                text="v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                                     "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n"
                                     "a=rtpmap:111 opus/48000/2\r\n")
        if self.failure == "html":
            return web.Response(status=201, content_type="text/html", text="<html></html>",
                                headers={"Location": "/whip/x"})
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session = Session(pc, offer, dict(request.headers))

        @pc.on("track")
        def on_track(track: Any) -> None:
            asyncio.ensure_future(self._count(session, track))
            if track.kind == "audio" and self.audio_dir is not None:
                self._tap_wire(session, next(t.receiver for t in pc.getTransceivers()
                                             if t.receiver.track is track))

        @pc.on("datachannel")
        def on_channel(channel: Any) -> None:
            channel.on("message", session.messages.append)

        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        session_id = session.key = secrets.token_hex(4)
        self.sessions[session_id] = session
        headers = {} if self.failure == "no-location" else {"Location": f"/whip/{session_id}"}
        answer = pc.localDescription.sdp
        if self.failure == "ice-timeout":  # no candidates, no path: ICE never connects
            answer = "\r\n".join(line for line in answer.split("\r\n")
                                 if not line.startswith("a=candidate"))
        if self.failure == "reject-video":
            answer = reject_video(answer)
        response = web.Response(status=201, content_type="application/sdp", headers=headers,
                                text=answer)
        for link in self.ice_links:
            response.headers.add("Link", link)
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        self.requests.append(("POST /redirect", dict(request.headers)))
        return web.Response(status=307, headers={"Location": self.redirect_to or "/whip"})

    def live(self) -> list[Session]:
        """Sessions the server still holds (not DELETEd)."""
        return [s for s in self.sessions.values() if not s.deleted]

    def kill_sessions(self) -> None:
        """Every session goes silent: no RTCP, no ICE consent answers, no DTLS close."""
        def kill() -> None:
            for session in self.live():
                for transceiver in session.pc.getTransceivers():
                    ice = transceiver.receiver.transport.transport
                    for protocol in getattr(ice._connection, "_protocols", []):
                        if protocol.transport is not None:
                            protocol.transport.close()
        self._loop.call_soon_threadsafe(kill)

    async def _count(self, session: Session, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if track.kind == "video":
                    session.video_frames += 1
                    session.video_times.append(now)
                    session.video_pts.append(float(frame.pts * frame.time_base)
                                             if frame.pts is not None else 0.0)
                    session.first_frame_at = session.first_frame_at or now
                else:
                    session.audio_frames += 1
                    session.audio_times.append(now)
                    if self.audio_dir is not None and frame.pts is not None:
                        self._keep_audio(session, frame)
        except MediaStreamError:
            pass

    def _tap_wire(self, session: Session, receiver: Any) -> None:
        """Every Opus packet as it arrives, before aiortc's jitter buffer (which drops
        the frames around a loss): <audio_dir>/<session>.rtp holds records of
        (RTP timestamp: uint32, length: uint32, payload)."""
        original = receiver._handle_rtp_packet

        async def tapped(packet: Any, arrival_time_ms: int) -> None:
            assert self.audio_dir is not None
            with open(self.audio_dir / f"{session.key}.rtp", "ab") as out:
                out.write(struct.pack("<II", packet.timestamp, len(packet.payload))
                          + packet.payload)
            await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = tapped

    def _keep_audio(self, session: Session, frame: Any) -> None:
        channels = len(frame.layout.channels)
        mono = frame.to_ndarray().reshape(-1, channels).mean(axis=1).astype("<i2")
        assert self.audio_dir is not None
        with open(self.audio_dir / f"{session.key}.pcm", "ab") as out:
            out.write(struct.pack("<qI", frame.pts, len(mono)) + mono.tobytes())

    async def _delete(self, request: web.Request) -> web.Response:
        self.requests.append(("DELETE", dict(request.headers)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        if self.delete_failure is not None:
            return web.Response(status=self.delete_failure, text="try later")
        session = self.sessions.get(request.match_info["id"])
        if session is None or session.deleted:
            return web.Response(status=404)
        session.deleted = True
        await session.pc.close()
        return web.Response(status=200)

    def stop(self) -> None:
        async def stop() -> None:
            for session in self.sessions.values():
                await session.pc.close()
            if self._runner:
                await self._runner.cleanup()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self.call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)


def reject_video(answer: str) -> str:
    """The answer of a room without H.264 (Janus-like): video m-line port 0, no ICE or
    DTLS attributes, out of the BUNDLE group."""
    head, *media = answer.split("\r\nm=")
    out = []
    for section in media:
        if section.startswith("video"):
            mid = next((line for line in section.split("\r\n")
                        if line.startswith("a=mid:")), "a=mid:1")
            end = "\r\n" if section.endswith("\r\n") else ""
            section = f"video 0 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\n{mid}\r\n" \
                      f"a=inactive{end}"
            head = re.sub(r"(a=group:BUNDLE[^\r\n]*?) " + re.escape(mid[6:]) + r"\b",
                          r"\1", head)
        out.append(section)
    return "\r\nm=".join([head, *out])


def snapshot(server: WhipServer) -> dict[str, Any]:
    return {"refusals": server.refusals, "sessions": [
        {"id": key, "created_at": s.created_at, "deleted": s.deleted,
         "video_frames": s.video_frames, "audio_frames": s.audio_frames,
         "video_times": list(s.video_times), "video_pts": list(s.video_pts),
         "audio_times": list(s.audio_times)}
        for key, s in list(server.sessions.items())]}


def main() -> None:
    """Run as its own process (in a network namespace): stats go to a JSON file."""
    import argparse
    import json
    import os
    import signal

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--stats", required=True)
    parser.add_argument("--audio", help="a folder for the decoded audio of each session")
    args = parser.parse_args()
    server = WhipServer(single=args.single, host=args.host, port=args.port,
                        audio_dir=Path(args.audio) if args.audio else None)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    stats = Path(args.stats)
    while not stopping.wait(0.2):
        data = server.call(_snapshot_async(server))
        tmp = stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, stats)
    server.stop()


async def _snapshot_async(server: WhipServer) -> dict[str, Any]:
    data = snapshot(server)  # taken on the server's loop: no list changes under it
    for entry in data["sessions"]:
        session = server.sessions[entry["id"]]
        if session.deleted:
            entry["rtp"] = session_rtp.get(entry["id"], {})
            continue
        rtp: dict[str, dict[str, int]] = {}
        for receiver in session.pc.getReceivers():
            try:
                stats = await receiver.getStats()
            except Exception:  # a receiver that never started
                continue
            for item in stats.values():
                if item.type == "inbound-rtp":
                    rtp[item.kind] = {"received": item.packetsReceived,
                                      "lost": item.packetsLost}
        session_rtp[entry["id"]] = entry["rtp"] = rtp
    return data


session_rtp: dict[str, dict[str, dict[str, int]]] = {}  # the last counts of each session


if __name__ == "__main__":
    main()
