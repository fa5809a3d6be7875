"""A minimal WHIP server (RFC 9725) for tests: answers with aiortc, counts media, records
what the client sent, and can be told to fail in the ways real servers fail."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
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


class WhipServer:
    """Runs in a thread with its own event loop; `failure` selects a misbehaviour."""

    def __init__(self, token: str = "car-token") -> None:
        confine_host_addresses(("127.0.0.1",))
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/whip"
        self.failure: str | None = None  # "500", "malformed", "html", "no-location", "hang"
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
        app.router.add_delete("/whip/{id}", self._delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

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
        offer = await request.text()
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

        @pc.on("datachannel")
        def on_channel(channel: Any) -> None:
            channel.on("message", session.messages.append)

        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        session_id = secrets.token_hex(4)
        self.sessions[session_id] = session
        headers = {} if self.failure == "no-location" else {"Location": f"/whip/{session_id}"}
        return web.Response(status=201, content_type="application/sdp", headers=headers,
                            text=pc.localDescription.sdp)

    async def _count(self, session: Session, track: Any) -> None:
        try:
            while True:
                await track.recv()
                if track.kind == "video":
                    session.video_frames += 1
                    session.first_frame_at = session.first_frame_at or time.monotonic()
                else:
                    session.audio_frames += 1
        except MediaStreamError:
            pass

    async def _delete(self, request: web.Request) -> web.Response:
        self.requests.append(("DELETE", dict(request.headers)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        session = self.sessions.get(request.match_info["id"])
        if session is None:
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

        self.call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
