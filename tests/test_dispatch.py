"""The reference dispatcher, in-process on 127.0.0.1, called by aiortc stand-ins for a car
and for an operator's browser (tests/fakecar.py). ICE is confined to loopback on both
sides; remote candidates outside it are dropped by the desk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from conftest import free_port, hold_recordings
from dashsos.config import Config, from_dict
from dashsos.dispatch import api
from dashsos.dispatch.muxer import Mp4Writer
from dashsos.dispatch.sdp import filter_candidates
from dashsos.dispatch.server import serve
from dashsos.dispatch.talkback import TalkbackTrack
from fakecar import FakeCar, FakeConsole

CAR_TOKEN, OTHER_CAR_TOKEN, OPERATOR_TOKEN = "car-secret-1", "car-secret-2", "op-secret"
CAR = {"Authorization": f"Bearer {CAR_TOKEN}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
SDP = {"Content-Type": "application/sdp"}
CALL_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


class Desk:
    """`serve()` running on a free loopback port, with its client session."""

    def __init__(self, root: Path, session: aiohttp.ClientSession, config: Config) -> None:
        self.root = root
        self.session = session
        self.config = config
        self.base = f"http://127.0.0.1:{config.dispatch.port}"
        self.recordings = Path(config.dispatch.recordings_dir)

    async def calls(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.base}/api/calls", headers=OPERATOR) as r:
            assert r.status == 200
            calls: list[dict[str, Any]] = (await r.json())["calls"]
            return calls

    async def call(self, call_id: str) -> dict[str, Any]:
        return next(c for c in await self.calls() if c["id"] == call_id)

    async def wait_call(self, call_id: str, what: str, check: Any, timeout: float = 10) -> \
            dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            call = await self.call(call_id)
            if check(call):
                return call
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {call}")


def desk_config(root: Path, **dispatch: Any) -> Config:
    (root / "cars").write_text(f"# token vehicle\n{CAR_TOKEN} car-7\n{OTHER_CAR_TOKEN} car-8\n")
    (root / "operators").write_text(f"{OPERATOR_TOKEN} Alice Example\n")
    return from_dict({
        "dispatch": {"listen": "127.0.0.1", "port": free_port(),
                     "car_tokens_file": str(root / "cars"),
                     "console_tokens_file": str(root / "operators"),
                     "recordings_dir": str(root / "recordings"), **dispatch},
        "ice": {"interfaces": ["127.0.0.1"]},
    })


@contextlib.asynccontextmanager
async def running_desk(root: Path, *, tls: ssl.SSLContext | None = None,
                       **dispatch: Any) -> AsyncIterator[Desk]:
    config = desk_config(root, **dispatch)
    server = asyncio.ensure_future(serve(config))
    connector = aiohttp.TCPConnector(ssl=tls) if tls else None
    async with aiohttp.ClientSession(connector=connector) as session:
        desk = Desk(root, session, config)
        if tls:
            desk.base = desk.base.replace("http:", "https:")
        for _ in range(100):
            try:
                async with session.options(f"{desk.base}/whip") as r:
                    if r.status == 204:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
        try:
            yield desk
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server


async def wait(event: asyncio.Event, what: str, timeout: float = 10) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def until(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Events:
    """The console event stream, read in the background."""

    def __init__(self, desk: Desk) -> None:
        self.desk = desk
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.comments: list[str] = []
        self.task = asyncio.ensure_future(self._read())
        self.open = asyncio.Event()

    async def _read(self) -> None:
        async with self.desk.session.get(f"{self.desk.base}/api/events",
                                         headers=OPERATOR) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            self.open.set()
            event = ""
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: "):
                    self.events.append((event, json.loads(line[len("data: "):])))

    def of(self, kind: str, call_id: str) -> list[dict[str, Any]]:
        return [d for e, d in self.events if e == kind and (d.get("id") == call_id
                                                            or d.get("call") == call_id)]


def ffprobe(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_streams",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True)
    streams: list[dict[str, Any]] = json.loads(out.stdout)["streams"]
    return streams


def section(sdp: str, kind: str) -> str:
    """One media section of an SDP."""
    match = re.search(rf"^m={kind} .*?(?=^m=|\Z)", sdp, re.S | re.M)
    assert match, f"no {kind} section in\n{sdp}"
    return match.group(0)


def first_codec(media: str) -> str:
    """The preferred codec of a media section: its first payload type's rtpmap."""
    payload = media.split("\r\n", 1)[0].split()[3]
    match = re.search(rf"^a=rtpmap:{payload} (\S+)", media, re.M)
    assert match, media
    return match.group(1)


# --- SDP candidate filtering ---

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n"
    "a=candidate:1 1 udp 2113937151 127.0.0.1 50000 typ host\r\n"
    "a=candidate:2 1 udp 2113937151 192.0.2.10 50001 typ host\r\n"
    "a=candidate:3 1 udp 2113937151 2001:db8::1 50002 typ host\r\n"
    "a=candidate:4 1 udp 2113937151 0c9f-uuid.local 50003 typ host\r\n"
    "a=end-of-candidates\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\n"
    "a=candidate:1 1 udp 2113937151 127.0.0.1 50004 typ host\r\n"
    "a=candidate:5 1 udp 1677729535 198.51.100.7 3478 typ srflx raddr 0.0.0.0 rport 0\r\n"
)


# Well formed, but with no codec aiortc has: refused by setRemoteDescription itself.
G722_ONLY = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 9\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n"
    "a=rtcp-mux\r\na=rtpmap:9 G722/8000\r\na=ice-ufrag:abcd\r\n"
    "a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n"
)


def candidates(sdp: str) -> list[str]:
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]


def test_filter_candidates_keeps_only_allowed_addresses() -> None:
    out = filter_candidates(OFFER, ("127.0.0.1",))
    assert candidates(out) == ["127.0.0.1", "127.0.0.1"]
    assert out.count("a=end-of-candidates") == 1  # kept where it was, none added
    assert "\r\n" in out and "\n" not in out.replace("\r\n", "")
    assert candidates(filter_candidates(OFFER, ("198.51.100.0/24", "2001:db8::/32"))) == \
        ["2001:db8::1", "198.51.100.7"]


def test_filter_candidates_without_interfaces_changes_nothing() -> None:
    assert filter_candidates(OFFER, ()) == OFFER


def test_filter_candidates_marks_every_section_complete() -> None:
    out = filter_candidates(OFFER, ("127.0.0.1",), complete=True)
    assert out.count("a=end-of-candidates") == 2
    assert section(out, "video").rstrip().endswith("a=end-of-candidates")


# --- talk-back track ---


def test_talkback_sends_silence_then_operator_audio_in_one_format() -> None:
    async def run() -> None:
        track = TalkbackTrack()
        first = await track.recv()
        mono = av.AudioFrame.from_ndarray(np.full((1, 160), 8000, np.int16), format="s16",
                                          layout="mono")
        mono.sample_rate = 8000
        for _ in range(6):
            track.push(mono)  # PCMU-rate audio from a browser: resampled, not refused
        frames = [await track.recv() for _ in range(4)]
        started = time.monotonic()
        for _ in range(10):
            await track.recv()
        paced = time.monotonic() - started
        track.stop()
        assert not np.any(first.to_ndarray())
        for frame in [first, *frames]:
            assert (frame.format.name, frame.layout.name, frame.sample_rate) == \
                ("s16", "stereo", 48000)
        assert track.forwarded >= 3 and np.any(frames[1].to_ndarray())
        stamps = [first.pts or 0] + [f.pts or 0 for f in frames]
        assert stamps == sorted(set(stamps))  # no jump back when the source changes
        assert 0.12 < paced < 0.5  # real time (10 x 20 ms or so), not as fast as asked

    asyncio.run(run())


# --- calls ---


def test_call_recorded_watched_and_hung_up_by_operator(tmp_path: Path) -> None:
    async def run() -> dict[str, float]:
        async with running_desk(tmp_path) as desk:
            events = Events(desk)
            await wait(events.open, "the event stream")
            car = FakeCar(mode="call", fix_interval=0.2)
            posted = time.monotonic()
            r = await car.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
            answer = await r.text()
            answered = time.monotonic()
            assert r.status == 201, answer
            assert r.headers["Content-Type"].startswith("application/sdp")
            call_id = r.headers["Location"].removeprefix("/whip/calls/")
            assert CALL_ID.match(call_id), r.headers["Location"]
            assert first_codec(section(answer, "video")) == "H264/90000"
            assert "packetization-mode=1" in section(answer, "video")
            assert "a=sendrecv" in section(answer, "audio")
            assert "a=recvonly" in section(answer, "video")
            assert "m=application" in answer
            assert set(candidates(answer)) == {"127.0.0.1"}

            await wait(car.connected, "the car's connection")
            connected = time.monotonic()
            call = await desk.wait_call(call_id, "connected, MSD and 3 fixes", lambda c: (
                c["state"] == "connected" and c["msd"] and len(c["trail"]) >= 3))
            assert call["vehicle_id"] == "car-7" and call["mode"] == "call"
            assert call["msd"]["trigger"]["kind"] == "panic_button"
            assert call["last_fix"] == call["trail"][-1] and call["recording"]
            await until(lambda: events.of("fix", call_id), "an SSE fix event")
            states = [c["state"] for c in events.of("call", call_id)]
            assert "ringing" in states and "connected" in states, states

            # An operator's console watches: the car's video arrives, its mic reaches the car.
            console = FakeConsole(mic_hz=1000)
            watch_posted = time.monotonic()
            r = await console.post_offer(desk.session, f"{desk.base}/api/calls/{call_id}/watch",
                                         OPERATOR_TOKEN)
            assert r.status == 201, await r.text()
            watcher = r.headers["Location"].removeprefix("/api/watchers/")
            assert r.headers["Location"].startswith("/api/watchers/w-")
            await until(lambda: "video" in console.meters and console.meters["video"].frames,
                        "video at the console")
            first_frame = console.meters["video"].first_at or 0.0
            async with desk.session.post(f"{desk.base}/api/calls/{call_id}/talk",
                                         json={"watcher": watcher}, headers=OPERATOR) as r:
                assert r.status == 200 and (await r.json())["talker"] == watcher
            await until(lambda: "audio" in car.meters and car.meters["audio"].level() > 0.1,
                        "the operator's voice in the car")
            await until(lambda: "audio" in console.meters and console.meters["audio"].level()
                        > 0.1, "the cabin audio at the console")

            async with desk.session.post(f"{desk.base}/api/calls/{call_id}/position",
                                         headers=OPERATOR) as r:
                assert r.status == 200
            await wait(car.got_position_request, "the position request in the car")

            async with desk.session.post(f"{desk.base}/api/calls/{call_id}/hangup",
                                         headers=OPERATOR) as r:
                assert r.status == 200
                assert (await r.json())["end_reason"] == "operator hung up"
            await wait(car.got_hangup, "the hangup message in the car")
            await wait(car.closed, "the car's connection to close")
            await wait(console.closed, "the console's connection to close")
            call = await desk.call(call_id)
            assert (call["state"], call["end_reason"]) == ("ended", "operator hung up")
            async with desk.session.delete(f"{desk.base}/api/watchers/{watcher}",
                                           headers=OPERATOR) as r:
                assert r.status == 404  # closed with the call
            async with desk.session.post(f"{desk.base}/api/calls/{call_id}/hangup",
                                         headers=OPERATOR) as r:
                assert r.status == 409
            await until(lambda: any(c["state"] == "ended" for c in events.of("call", call_id)),
                        "the SSE event of the end")
            await car.close()
            await console.close()
            events.task.cancel()

            folder = desk.recordings / call_id
            record = json.loads((folder / "call.json").read_text())
            assert record["vehicle_id"] == "car-7" and record["end_reason"] == "operator hung up"
            assert record["connected"] and record["ended"] and record["msd"]["id"]
            assert record["last_position"]["lat"] > 52
            lines = [json.loads(line) for line in
                     (folder / "telemetry.jsonl").read_text().splitlines()]
            assert lines[0]["message"]["type"] == "msd" and lines[0]["received"]
            assert sum(1 for line in lines if line["message"]["type"] == "fix") >= 3
            streams = {s["codec_type"]: s for s in ffprobe(folder / "media.mp4")}
            assert streams["video"]["codec_name"] == "h264"
            assert int(streams["video"]["nb_read_frames"]) > 10
            assert (streams["video"]["width"], streams["video"]["height"]) == (320, 240)
            assert "audio" in streams
            return {"answer": answered - posted, "connected": connected - posted,
                    "first frame at console": first_frame - watch_posted}

    timings = asyncio.run(run())
    print("measured (s):", {k: round(v, 3) for k, v in timings.items()})


def test_whip_mode_call_replaced_by_redial_and_hung_up_by_car(tmp_path: Path) -> None:
    async def run() -> None:
        async with running_desk(tmp_path) as desk:
            first = FakeCar(mode="whip")
            r = await first.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
            answer = await r.text()
            assert r.status == 201, answer
            assert "m=application" not in answer
            assert "a=recvonly" in section(answer, "audio")
            first_id = r.headers["Location"].removeprefix("/whip/calls/")
            await wait(first.connected, "the whip-mode connection")
            call = await desk.wait_call(first_id, "connected", lambda c: c["state"] ==
                                        "connected")
            assert call["mode"] == "whip" and call["msd"] is None
            async with desk.session.post(f"{desk.base}/api/calls/{first_id}/position",
                                         headers=OPERATOR) as r:
                assert r.status == 409  # no telemetry channel in whip mode

            # The car re-dials: the new call replaces the old one.
            car = FakeCar(mode="whip")
            r = await car.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
            assert r.status == 201
            location = r.headers["Location"]
            call_id = location.removeprefix("/whip/calls/")
            old = await desk.wait_call(first_id, "the old call ended", lambda c: c["state"]
                                       == "ended")
            assert old["end_reason"] == "replaced by a new call from the car"
            await wait(first.closed, "the replaced call to close")
            await wait(car.connected, "the new connection")
            await desk.wait_call(call_id, "connected", lambda c: c["state"] == "connected")
            await asyncio.sleep(1.0)  # some video on disk

            url = f"{desk.base}{location}"
            async with desk.session.delete(url) as r:
                assert r.status == 401
            async with desk.session.delete(url, headers={"Authorization":
                                                         f"Bearer {OTHER_CAR_TOKEN}"}) as r:
                assert r.status == 404  # another car's call is not found
            async with desk.session.delete(url, headers=CAR) as r:
                assert r.status == 200
            call = await desk.call(call_id)
            assert (call["state"], call["end_reason"]) == ("ended", "car hung up")
            async with desk.session.delete(url, headers=CAR) as r:
                assert r.status == 404
            calls = await desk.calls()
            assert [c["id"] for c in calls] == [call_id, first_id]  # newest first
            await car.close()
            await first.close()
            streams = {s["codec_type"]: s for s in ffprobe(desk.recordings / call_id /
                                                           "media.mp4")}
            assert int(streams["video"]["nb_read_frames"]) > 10

    asyncio.run(run())


def test_a_call_is_ended_only_once_its_recording_is_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From its end until media.mp4, telemetry.jsonl and call.json are finished a call is
    `saving` (its muxer held back here): no operator acts on it and its media is not
    served. Then it is `ended`, and its recording whole."""
    release = hold_recordings(monkeypatch)

    async def run() -> None:
        async with running_desk(tmp_path) as desk:
            events = Events(desk)
            await wait(events.open, "the event stream")
            car = FakeCar(mode="call", fix_interval=0.2)
            try:
                r = await car.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
                assert r.status == 201
                call_id = r.headers["Location"].removeprefix("/whip/calls/")
                calls = f"{desk.base}/api/calls/{call_id}"
                await desk.wait_call(call_id, "connected with a fix", lambda c: (
                    c["state"] == "connected" and c["trail"]))
                await asyncio.sleep(1.0)  # some video for the file

                async def hang_up() -> tuple[int, dict[str, Any]]:
                    async with desk.session.post(f"{calls}/hangup", headers=OPERATOR) as r:
                        return r.status, await r.json()

                hangup = asyncio.ensure_future(hang_up())
                call = await desk.wait_call(call_id, "the end", lambda c: c["state"] !=
                                            "connected")
                assert (call["state"], call["end_reason"]) == ("saving", "operator hung up")
                assert call["ended"]  # when the call ended; its files are not finished yet
                await until(lambda: any(c["state"] == "saving"
                                        for c in events.of("call", call_id)),
                            "the SSE event of saving")
                folder = desk.recordings / call_id
                await until(lambda: json.loads((folder / "call.json").read_text())["state"]
                            == "saving", "call.json saying saving")
                async with desk.session.get(f"{calls}/media", headers=OPERATOR) as r:
                    assert r.status == 409
                    assert "being saved" in await r.text()
                for action in ("take", "hangup", "talk", "position"):
                    async with desk.session.post(f"{calls}/{action}", json={"watcher": None},
                                                 headers=OPERATOR) as r:
                        assert r.status == 409, action
                        assert "ended" in await r.text(), action
                async with desk.session.post(f"{calls}/watch", data="v=0\r\n",
                                             headers={**OPERATOR, **SDP}) as r:
                    assert r.status == 409
                await asyncio.sleep(0.5)
                assert (await desk.call(call_id))["state"] == "saving"
                assert not hangup.done()  # the hang-up answers once the call has ended
            finally:
                release.set()
                await car.close()
            status, ended = await asyncio.wait_for(hangup, 20)
            assert status == 200
            assert (ended["state"], ended["end_reason"]) == ("ended", "operator hung up")
            # Ended: every file is finished, call.json (written last) says so too.
            assert (await desk.call(call_id))["state"] == "ended"
            record = json.loads((folder / "call.json").read_text())
            assert (record["state"], record["end_reason"]) == ("ended", "operator hung up")
            assert record["ended"] == call["ended"]
            lines = (folder / "telemetry.jsonl").read_text().splitlines()
            assert json.loads(lines[0])["message"]["type"] == "msd"
            async with desk.session.get(f"{calls}/media", headers=OPERATOR) as r:
                assert r.status == 200
                (tmp_path / "served.mp4").write_bytes(await r.read())
            streams = {s["codec_type"]: s for s in ffprobe(tmp_path / "served.mp4")}
            assert int(streams["video"]["nb_read_frames"]) > 10 and "audio" in streams
            await until(lambda: any(c["state"] == "ended" for c in events.of("call", call_id)),
                        "the SSE event of the end")
            states = [c["state"] for c in events.of("call", call_id)]
            assert states.index("saving") < states.index("ended"), states
            events.task.cancel()

    asyncio.run(run())


def test_a_recording_that_fails_is_reported_with_the_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills mid-call: the call goes on, and once it ended its record (API,
    call.json) says its recording failed and why, instead of passing the file off as whole."""
    write = Mp4Writer._write
    written = [0]

    def filling_disk(self: Mp4Writer, frame: Any) -> None:
        written[0] += 1
        if written[0] > 40:
            raise OSError(28, "No space left on device")
        write(self, frame)

    monkeypatch.setattr(Mp4Writer, "_write", filling_disk)

    async def run() -> None:
        async with running_desk(tmp_path) as desk:
            car = FakeCar(mode="call", fix_interval=0.2)
            try:
                r = await car.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
                assert r.status == 201
                call_id = r.headers["Location"].removeprefix("/whip/calls/")
                await desk.wait_call(call_id, "connected", lambda c: c["state"] == "connected")
                await until(lambda: written[0] > 40, "the disk to fill", timeout=10)
                # The consoles know at once; the call goes on.
                call = await desk.wait_call(call_id, "the failure reported", lambda c: bool(
                    c["recording_error"]))
                assert call["state"] == "connected", call
                assert "No space left on device" in call["recording_error"], call
                await asyncio.sleep(1.0)
                assert (await desk.call(call_id))["state"] == "connected"
                async with desk.session.post(f"{desk.base}/api/calls/{call_id}/hangup",
                                             headers=OPERATOR) as r:
                    assert r.status == 200
            finally:
                await car.close()
            call = await desk.call(call_id)
            assert call["state"] == "ended"
            assert "No space left on device" in call["recording_error"], call
            record = json.loads((desk.recordings / call_id / "call.json").read_text())
            assert record["recording_error"] == call["recording_error"]

    asyncio.run(run())


def test_a_redial_is_answered_while_the_replaced_call_is_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finishing the replaced call's files may take long (a slow disk; through Janus, a
    Janus that hangs costs its timeouts): the car's new call is answered at once."""
    release = hold_recordings(monkeypatch)

    async def run() -> None:
        async with running_desk(tmp_path) as desk:
            first, again = FakeCar(mode="whip"), FakeCar(mode="whip")
            try:
                r = await first.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
                first_id = r.headers["Location"].removeprefix("/whip/calls/")
                await desk.wait_call(first_id, "connected", lambda c: c["state"] ==
                                     "connected")
                await asyncio.sleep(0.5)
                started = time.monotonic()
                r = await again.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
                answered = time.monotonic() - started
                assert r.status == 201 and answered < 3, (r.status, answered)
                call_id = r.headers["Location"].removeprefix("/whip/calls/")
                await desk.wait_call(call_id, "the new call connected",
                                     lambda c: c["state"] == "connected")
                old = await desk.call(first_id)  # its recording still held back
                assert (old["state"], old["end_reason"]) == (
                    "saving", "replaced by a new call from the car"), old
                release.set()
                await desk.wait_call(first_id, "the old call saved",
                                     lambda c: c["state"] == "ended")
            finally:
                release.set()
                await first.close()
                await again.close()

    asyncio.run(run())


def test_refusals(tmp_path: Path) -> None:
    async def run() -> None:
        async with running_desk(tmp_path) as desk:
            s, whip = desk.session, f"{desk.base}/whip"
            offer = "v=0\r\n"
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": CAR_TOKEN}):
                async with s.post(whip, data=offer, headers={**SDP, **headers}) as r:
                    assert r.status == 401
                    assert r.headers["WWW-Authenticate"] == "Bearer"
            async with s.post(whip, data=offer, headers={**CAR, "Content-Type":
                                                         "application/json"}) as r:
                assert r.status == 415
            async with s.post(whip, data="this is not SDP", headers={**CAR, **SDP}) as r:
                assert r.status == 400
                assert "no audio or video" in await r.text()
            no_ice = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n" \
                     "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n" \
                     "a=rtpmap:111 opus/48000/2\r\n"
            async with s.post(whip, data=no_ice, headers={**CAR, **SDP}) as r:
                assert r.status == 400
                assert "ICE" in await r.text()
            async with s.post(whip, data=G722_ONLY, headers={**CAR, **SDP}) as r:
                assert r.status == 400
                assert "cannot answer" in await r.text()
            async with s.post(whip, data="v=0\r\n" + "a=x\r\n" * 20000,
                              headers={**CAR, **SDP}) as r:
                assert r.status == 413
            async with s.options(whip) as r:
                assert r.status == 204 and r.headers["Accept-Post"] == "application/sdp"
                assert "Access-Control-Allow-Origin" not in r.headers
            async with s.get(whip, headers=CAR) as r:
                assert r.status == 405
            async with s.patch(f"{whip}/calls/x", headers=CAR) as r:
                assert r.status == 405  # no trickle
            async with s.delete(f"{whip}/calls/20250101T000000Z-000000", headers=CAR) as r:
                assert r.status == 404
            assert not list(desk.recordings.iterdir())  # refused offers leave nothing
            with (tmp_path / "cars").open("a") as cars:
                cars.write("new-car-token car-9\n")  # read again on change: no restart
            async with s.post(whip, data=offer, headers={**SDP, "Authorization":
                                                         "Bearer new-car-token"}) as r:
                assert r.status == 400

            # The console: a token as a header, or a session cookie from POST /login (the
            # token never in a URL). The page and its code are public; the API is not.
            for path in ("/api/calls", "/api/events", "/api/audit", "/api/evidence"):
                async with s.get(f"{desk.base}{path}") as r:
                    assert r.status == 401, path
            async with s.get(f"{desk.base}/?token={OPERATOR_TOKEN}") as r:
                assert r.status == 200 and "Set-Cookie" not in r.headers  # no longer a login
            async with s.post(f"{desk.base}/login", json={"token": "wrong"}) as r:
                assert r.status == 401 and "Set-Cookie" not in r.headers
            async with s.get(f"{desk.base}/api/me") as r:
                assert await r.json() == {"operator": None}
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as jar:
                async with jar.post(f"{desk.base}/login", data={"token": OPERATOR_TOKEN},
                                    allow_redirects=False) as r:
                    assert r.status == 303 and r.headers["Location"] == "/"
                    cookie = r.headers["Set-Cookie"]
                    assert "dashsos_session=" in cookie and "HttpOnly" in cookie
                    assert "SameSite=Strict" in cookie and OPERATOR_TOKEN not in cookie
                async with jar.get(f"{desk.base}/") as r:
                    page = await r.text()
                    assert r.status == 200 and "<video" in page
                    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
                for path, kind in (("/console.js", "text/javascript"),
                                   ("/console.css", "text/css")):
                    async with jar.get(f"{desk.base}{path}") as r:
                        assert r.status == 200 and r.content_type == kind
                async with jar.get(f"{desk.base}/api/calls") as r:
                    assert r.status == 200 and await r.json() == {"calls": []}
                async with jar.post(f"{desk.base}/logout") as r:
                    assert r.status == 200
                async with jar.get(f"{desk.base}/api/calls") as r:
                    assert r.status == 401  # the session is gone at the desk, not only here
            for path in ("watch", "hangup", "position"):
                async with s.post(f"{desk.base}/api/calls/nope/{path}", data="v=0\r\n",
                                  headers={**OPERATOR, **SDP}) as r:
                    assert r.status == 404, path
            async with s.delete(f"{desk.base}/api/watchers/nope", headers=OPERATOR) as r:
                assert r.status == 404

    asyncio.run(run())


def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    trust = ssl.create_default_context(cafile=str(cert))

    async def run() -> None:
        async with running_desk(tmp_path, tls=trust, tls_cert=str(cert),
                                tls_key=str(key)) as desk:
            assert desk.base.startswith("https://")
            async with desk.session.post(f"{desk.base}/login", json={"token": OPERATOR_TOKEN},
                                         allow_redirects=False) as r:
                assert r.status == 200 and "Secure" in r.headers["Set-Cookie"]
            car = FakeCar(mode="whip")
            r = await car.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
            assert r.status == 201
            await wait(car.connected, "a call over HTTPS signalling")
            await car.close()

    asyncio.run(run())


def test_stopping_the_desk_ends_and_keeps_open_calls(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "HEARTBEAT", 0.1)

    async def run() -> tuple[str, Events, FakeCar]:
        async with running_desk(tmp_path) as desk:
            events = Events(desk)
            await until(lambda: ": heartbeat" in events.comments, "an SSE heartbeat")
            car = FakeCar(mode="call")
            r = await car.post_offer(desk.session, f"{desk.base}/whip", CAR_TOKEN)
            assert r.status == 201
            call_id = r.headers["Location"].removeprefix("/whip/calls/")
            await desk.wait_call(call_id, "the first fix", lambda c: c["trail"])
            await asyncio.sleep(0.5)
        # The desk has stopped: its event stream ended, the car was let go.
        await wait(car.closed, "the car's connection to close")
        await asyncio.wait_for(events.task, 5)
        await car.close()
        return call_id, events, car

    call_id, events, car = asyncio.run(run())
    folder = tmp_path / "recordings" / call_id
    record = json.loads((folder / "call.json").read_text())
    assert (record["state"], record["end_reason"]) == ("ended", "dispatcher stopped")
    assert record["last_position"]
    streams = {s["codec_type"]: s for s in ffprobe(folder / "media.mp4")}
    assert int(streams["video"]["nb_read_frames"]) > 0


def test_past_calls_are_loaded_and_an_interrupted_one_is_closed(tmp_path: Path) -> None:
    # One stopped mid-call, one while its recording was being saved.
    saving = tmp_path / "recordings" / "20250101T110000Z-d4e5f6"
    saving.mkdir(parents=True)
    (saving / "call.json").write_text(json.dumps({
        "id": saving.name, "vehicle_id": "car-8", "mode": "whip", "state": "saving",
        "started": "2025-01-01T11:00:00.000Z", "connected": "2025-01-01T11:00:00.100Z",
        "ended": "2025-01-01T11:05:00.000Z", "end_reason": "car hung up",
        "media": "janus"}))  # and Janus's .mjr files gone with the disk that held them
    folder = tmp_path / "recordings" / "20250101T120000Z-a1b2c3"
    folder.mkdir(parents=True)
    (folder / "call.json").write_text(json.dumps({
        "id": folder.name, "vehicle_id": "car-7", "mode": "call", "state": "connected",
        "started": "2025-01-01T12:00:00.000Z", "connected": "2025-01-01T12:00:00.100Z",
        "ended": None, "end_reason": None, "msd": {"id": "x"}, "recording": str(folder),
        "last_position": {"lat": 52.0, "lon": 13.0}}))
    fixes = [{"received": "t", "message": {"type": "fix", "fix": {"lat": 52 + i / 1000,
                                                                   "lon": 13.0}}}
             for i in range(3)]
    (folder / "telemetry.jsonl").write_text(
        "\n".join(json.dumps(f) for f in fixes) + '\n{"received": "t", "mess')

    async def run() -> list[dict[str, Any]]:
        async with running_desk(tmp_path) as desk:
            return await desk.calls()

    calls = asyncio.run(run())
    assert [c["id"] for c in calls] == [folder.name, saving.name]
    call = calls[0]
    assert (call["state"], call["end_reason"]) == ("ended",
                                                  "dispatcher restarted during the call")
    assert [f["lat"] for f in call["trail"]] == [52.0, 52.001, 52.002]
    saved = json.loads((folder / "call.json").read_text())
    assert saved["state"] == "ended" and saved["ended"]
    assert (calls[1]["state"], calls[1]["ended"], calls[1]["end_reason"]) == (
        "ended", "2025-01-01T11:05:00.000Z",
        "car hung up; dispatcher restarted while saving the recording")
    assert "Janus recorded nothing" in calls[1]["recording_error"], calls[1]
    assert call["recording_error"] is None  # an embedded call's media.mp4 is as it was
    assert json.loads((saving / "call.json").read_text())["state"] == "ended"


def test_frames_received_are_counted_and_kept_in_call_json() -> None:
    from dashsos.dispatch.record import CallRecord

    rec = CallRecord(id="20261203T000000Z-abcdef", vehicle_id="car-1", mode="call")
    assert rec.as_json()["received"] == {}
    for _ in range(3):
        rec.count_frame("video")
    rec.count_frame("audio")
    received = rec.as_json()["received"]
    assert received["video"]["frames"] == 3 and received["audio"]["frames"] == 1
    assert received["video"]["last"] >= rec.started and received["video"]["last"].endswith("Z")
    saved = json.loads(json.dumps(rec.as_file()))
    saved["received"]["audio"] = {"frames": "x"}  # a damaged entry is dropped, not fatal
    loaded = CallRecord.from_file(saved, [])
    assert loaded.as_json()["received"] == {"video": received["video"]}
