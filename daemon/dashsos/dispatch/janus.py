"""A client for Janus's HTTP API (the REST transport, path /janus) and its VideoRoom
plugin: what the desk needs to forward a car's WHIP offer into a room that records it.

One JanusSession is one Janus session with one VideoRoom handle, so one publisher (one
car's call). Requests go as POSTs; Janus answers the asynchronous ones (join, configure,
leave) with an "ack" and sends the result later, so a background task long-polls the
session and hands each event to the request whose transaction it carries. Events that
answer no request (webrtcup, media, hangup, other publishers) go to `events`.
Every Janus error, core or plugin, is raised as JanusError with Janus's code and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

VIDEOROOM = "janus.plugin.videoroom"
KEEPALIVE_S = 25.0  # Janus ends a session after session_timeout (60 s) without activity
REPLY_TIMEOUT_S = 10.0  # an answer takes Janus milliseconds; past this it is not coming
POLL_TIMEOUT_S = 60.0  # Janus returns an empty long poll ("keepalive") after 30 s
EVENTS_KEPT = 256  # unread events beyond this are dropped, the oldest first

# The VideoRoom's error codes the desk acts on (janus_videoroom.c).
NO_SUCH_ROOM = 426
ROOM_EXISTS = 427

Room = int | str  # integers unless the plugin is configured with string_ids = true
Json = dict[str, Any]


class JanusError(RuntimeError):
    def __init__(self, code: int, reason: str, request: str) -> None:
        super().__init__(f"Janus error {code} on {request}: {reason}")
        self.code = code
        self.reason = reason


def _check(reply: Json, request: str) -> Json:
    """`reply` if it reports no error; the core's and the plugin's errors raise."""
    if reply.get("janus") == "error":
        error = reply.get("error", {})
        raise JanusError(int(error.get("code", 0)), str(error.get("reason", "")), request)
    data: Json = reply.get("plugindata", {}).get("data", {})
    if "error_code" in data:
        raise JanusError(int(data["error_code"]), str(data.get("error", "")), request)
    return reply


class JanusSession:
    def __init__(self, url: str, http: aiohttp.ClientSession | None = None) -> None:
        self.url = url.rstrip("/")  # e.g. http://127.0.0.1:8088/janus
        self._http = http
        self._own_http = http is None
        self.session_id: int | None = None
        self.handle_id: int | None = None
        self.publisher_id: int | str | None = None
        self.events: asyncio.Queue[Json] = asyncio.Queue(EVENTS_KEPT)
        self.webrtcup = asyncio.Event()  # ICE and DTLS are up with the publisher
        self._waiting: dict[str, asyncio.Future[Json]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> JanusSession:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the session, attach the VideoRoom and start polling and keepalives."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self.session_id = (await self._post(self.url, {"janus": "create"}))["data"]["id"]
        self._tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._keepalive())]
        reply = await self._post(self._session_url, {"janus": "attach", "plugin": VIDEOROOM})
        self.handle_id = reply["data"]["id"]

    @property
    def _session_url(self) -> str:
        return f"{self.url}/{self.session_id}"

    @property
    def _handle_url(self) -> str:
        return f"{self._session_url}/{self.handle_id}"

    async def _post(self, url: str, message: Json) -> Json:
        assert self._http is not None, "start() first"
        message = {**message, "transaction": secrets.token_hex(8)}
        timeout = aiohttp.ClientTimeout(total=REPLY_TIMEOUT_S)
        async with self._http.post(url, json=message, timeout=timeout) as response:
            reply: Json = await response.json(content_type=None)
        return _check(reply, str(message.get("body", {}).get("request", message["janus"])))

    # --- plugin requests ---

    async def request(self, body: Json) -> Json:
        """A synchronous VideoRoom request (create, exists, listparticipants...): its data."""
        reply = await self._post(self._handle_url, {"janus": "message", "body": body})
        data: Json = reply["plugindata"]["data"]
        return data

    async def _request_async(self, body: Json, jsep: Json | None = None) -> Json:
        """An asynchronous VideoRoom request: the event that answers it (data and jsep)."""
        assert self._http is not None, "start() first"
        transaction = secrets.token_hex(8)
        message: Json = {"janus": "message", "transaction": transaction, "body": body}
        if jsep is not None:
            message["jsep"] = jsep
        # Waiting before posting: the event may come back on the poll before the ack.
        future = self._waiting[transaction] = asyncio.get_running_loop().create_future()
        try:
            timeout = aiohttp.ClientTimeout(total=REPLY_TIMEOUT_S)
            async with self._http.post(self._handle_url, json=message,
                                       timeout=timeout) as response:
                _check(await response.json(content_type=None), body["request"])
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                return _check(await future, body["request"])
        finally:
            self._waiting.pop(transaction, None)

    async def ensure_room(self, room: Room, rec_dir: Path | str, description: str = "",
                          publishers: int = 1) -> None:
        """Create a recorded H.264/Opus room unless it exists."""
        try:
            await self.request({
                "request": "create", "room": room, "description": description or str(room),
                "is_private": False, "publishers": publishers, "videocodec": "h264",
                "audiocodec": "opus", "record": True, "rec_dir": str(rec_dir)})
        except JanusError as exc:
            if exc.code != ROOM_EXISTS:
                raise

    async def publish(self, room: Room, display: str, offer_sdp: str,
                      recording: str | None = None) -> str:
        """Join `room` as a publisher with a complete (non-trickled) offer; the answer.

        `recording` names the files under the room's rec_dir: Janus writes one .mjr per
        stream as <recording>-<kind>-<m-line index>.mjr (see recording_files)."""
        body: Json = {"request": "joinandconfigure", "ptype": "publisher", "room": room,
                      "display": display}
        if recording is not None:
            body.update(record=True, filename=recording)
        event = await self._request_async(
            body, {"type": "offer", "sdp": offer_sdp, "trickle": False})
        self.publisher_id = event["plugindata"]["data"].get("id")
        answer: str = event.get("jsep", {}).get("sdp", "")
        if not answer:
            raise JanusError(0, "the joined event carried no SDP answer", "joinandconfigure")
        return answer

    async def subscribe(self, room: Room, feed: int | str) -> str:
        """Join `room` as a subscriber to the publisher `feed`: Janus's offer (Janus offers
        to subscribers; `start_subscription` gives it the answer)."""
        event = await self._request_async({"request": "join", "ptype": "subscriber",
                                           "room": room, "streams": [{"feed": feed}]})
        offer: str = event.get("jsep", {}).get("sdp", "")
        if not offer:
            raise JanusError(0, "the attached event carried no SDP offer", "join")
        return offer

    async def start_subscription(self, answer_sdp: str) -> None:
        """The subscriber's complete (non-trickled) answer: media starts flowing."""
        await self._request_async({"request": "start"},
                                  {"type": "answer", "sdp": answer_sdp, "trickle": False})

    async def destroy_room(self, room: Room) -> None:
        """Remove the room (its recordings stay); one that is gone already is fine."""
        try:
            await self.request({"request": "destroy", "room": room})
        except JanusError as exc:
            if exc.code != NO_SUCH_ROOM:
                raise

    async def destroy_session(self, session_id: int) -> None:
        """Destroy another session (one a stopped desk left); gone already is fine."""
        try:
            await self._post(f"{self.url}/{session_id}", {"janus": "destroy"})
        except JanusError as exc:
            log.info("janus: session %s: %s", session_id, exc)

    async def participants(self, room: Room) -> list[Json]:
        """Who is in `room`; "publisher" turns true once the PeerConnection is up."""
        data = await self.request({"request": "listparticipants", "room": room})
        return list(data["participants"])

    async def leave(self) -> None:
        """Unpublish and leave the room. Janus 1.1.2 closes the recording's files only
        when the handle goes (close() detaches it)."""
        if self.publisher_id is not None:
            self.publisher_id = None
            await self._request_async({"request": "leave"})

    async def close(self) -> None:
        """Hang up: leave, detach, destroy the session. Safe to call more than once; the
        teardown goes on past errors (the session may be gone already). When it returns,
        Janus has closed the recording's files (it does so before answering the detach)."""
        try:
            await self._quietly(self.leave)  # answered on the long poll: stop that after
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._tasks = []
            try:
                await self._quietly(self._detach)
                await self._quietly(self._destroy)
            finally:
                if self._own_http and self._http is not None:
                    await self._http.close()
                    self._http = None

    @staticmethod
    async def _quietly(step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except (JanusError, aiohttp.ClientError, TimeoutError) as exc:
            log.info("janus: %s", exc)

    async def _detach(self) -> None:
        if self.handle_id is not None:
            handle, self.handle_id = self._handle_url, None
            await self._post(handle, {"janus": "detach"})

    async def _destroy(self) -> None:
        if self.session_id is not None:
            session, self.session_id = self._session_url, None
            await self._post(session, {"janus": "destroy"})

    # --- background ---

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            try:
                await self._post(self._session_url, {"janus": "keepalive"})
            except (JanusError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("janus keepalive: %s", exc)

    async def _poll(self) -> None:
        assert self._http is not None
        timeout = aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)
        while True:
            try:
                async with self._http.get(f"{self._session_url}?maxev=10",
                                          timeout=timeout) as response:
                    events = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("janus long poll: %s", exc)
                await asyncio.sleep(1)  # Janus restarting or the link down: try again
                continue
            for event in events if isinstance(events, list) else [events]:
                if event.get("janus") == "error":
                    # 458 and the like: the session is gone and no request will be answered.
                    log.warning("janus long poll: %s", event.get("error"))
                    for future in self._waiting.values():
                        if not future.done():
                            future.set_result(event)
                    return
                self._dispatch(event)

    def _dispatch(self, event: Json) -> None:
        kind = event.get("janus")
        if kind == "keepalive":
            return
        future = self._waiting.get(str(event.get("transaction")))
        if future is not None and kind == "event" and not future.done():
            future.set_result(event)
            return
        if kind == "webrtcup":
            self.webrtcup.set()
        if self.events.full():
            self.events.get_nowait()
        self.events.put_nowait(event)


def recording_files(rec_dir: Path, recording: str) -> dict[str, Path]:
    """The .mjr files Janus wrote for `recording` (publish's argument), by kind."""
    return {path.name[len(recording) + 1:].split("-")[0]: path
            for path in sorted(rec_dir.glob(f"{recording}-*.mjr"))}



async def end_left_session(url: str, session_id: int, room: Room) -> None:
    """A session and room a desk left in Janus when it stopped (the car still publishing
    into them, unseen): destroy the session, which hangs up the car (so it dials again)
    and closes the recording's files, then the room. Gone already is fine."""
    async with JanusSession(url) as janus:
        await janus.destroy_session(session_id)
        await janus.destroy_room(room)
