"""Operator login, sessions, the failed-login limit, taking calls and incidents, and the
audit log, against the desk in this process (no browser: test_console_operators.py has
the console in Chromium)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from conftest import free_port
from dashsos.config import from_dict
from dashsos.dispatch import owners, peer, sessions
from dashsos.dispatch.desk import DESK, Conflict, Desk, NotFound
from dashsos.dispatch.errors import http_error
from dashsos.dispatch.fleet import check_incident
from dashsos.dispatch.janus_call import MediaServerError
from dashsos.dispatch.server import make_app
from dashsos.dispatch.sessions import FailLimit, Sessions
from fakecar import FakeCar

CAR_TOKEN, ALICE, BOB = "car-unit", "alice-unit", "bob-unit"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_expire_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(sessions.time, "monotonic", clock)
    table = Sessions(idle=60)
    one = table.open("alice", ALICE, "127.0.0.1")
    assert len(one.id) >= 40 and ALICE not in one.id
    clock.now += 59
    assert table.get(one.id) is one  # ... and its idle clock starts again
    clock.now += 59
    assert table.get(one.id) is one
    clock.now += 61
    assert table.get(one.id) is None and len(table) == 0
    two = table.open("alice", ALICE, "127.0.0.1")
    assert table.close(two.id) is two and table.get(two.id) is None
    assert table.get("") is None and table.get("made-up") is None


def test_failed_logins_are_limited_per_address(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(sessions.time, "monotonic", clock)
    limit = FailLimit(burst=5, rate=1.0)
    for _ in range(5):
        assert limit.allowed("10.0.0.1")
        limit.failed("10.0.0.1")
    assert not limit.allowed("10.0.0.1") and limit.retry_after("10.0.0.1") == 1.0
    assert limit.allowed("10.0.0.2")  # per address
    clock.now += 1.0
    assert limit.allowed("10.0.0.1")  # one more a second
    limit.failed("10.0.0.1")
    assert not limit.allowed("10.0.0.1")


def test_one_mapping_of_the_desks_errors_to_http() -> None:
    for exc, status in ((NotFound("no call x"), 404), (owners.NotOwner("only alice"), 403),
                        (owners.Taken("call x", "alice"), 409), (Conflict("ended"), 409),
                        (MediaServerError("Janus is down"), 503),
                        (peer.OfferError("no ICE"), 400), (ValueError("odd"), 400)):
        error = http_error(exc)
        assert (error.status, error.text) == (status, f"{exc}\n"), exc


@asynccontextmanager
async def desk_app(root: Path) -> AsyncIterator[tuple[str, Desk]]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cars").write_text(f"{CAR_TOKEN} car-1\n")
    (root / "operators").write_text(f"{ALICE} alice\n{BOB} bob\n")
    config = from_dict({"dispatch": {"car_tokens_file": str(root / "cars"),
                                     "console_tokens_file": str(root / "operators"),
                                     "recordings_dir": str(root / "recordings")},
                        "ice": {"interfaces": ["127.0.0.1"]}})
    app = make_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", app[DESK]
    finally:
        await runner.cleanup()


def jar() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def log_in(session: aiohttp.ClientSession, base: str, token: str) -> None:
    async with session.post(f"{base}/login", json={"token": token}) as r:
        assert r.status == 200, await r.text()


def test_login_sessions_and_the_limit(tmp_path: Path) -> None:
    async def run() -> None:
        async with desk_app(tmp_path) as (base, desk), jar() as a, jar() as b:
            async with a.post(f"{base}/login", json={"token": ALICE}) as r:
                assert r.status == 200 and await r.json() == {"operator": "alice"}
                cookie = r.headers["Set-Cookie"]
                for part in ("dashsos_session=", "HttpOnly", "SameSite=Strict", "Path=/"):
                    assert part in cookie, cookie
                assert "Secure" not in cookie  # plain HTTP here (test_dispatch: HTTPS)
                assert ALICE not in cookie
            async with a.get(f"{base}/api/me") as r:
                assert await r.json() == {"operator": "alice"}
            # A made-up session id is nobody.
            async with aiohttp.ClientSession(cookies={"dashsos_session": "x" * 43}) as c, \
                    c.get(f"{base}/api/calls") as r:
                assert r.status == 401
            # Five wrong guesses, then the address waits (429, Retry-After), even with the
            # right token: a guesser learns nothing from the sixth.
            for _ in range(5):
                async with b.post(f"{base}/login", data={"token": "guess"}) as r:
                    assert r.status == 401
            async with b.post(f"{base}/login", json={"token": BOB}) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
            await asyncio.sleep(1.1)
            await log_in(b, base, BOB)
            # Revoking a token ends its sessions at the next request.
            (tmp_path / "operators").write_text(f"{BOB} bob\n")
            async with a.get(f"{base}/api/calls") as r:
                assert r.status == 401
            async with b.get(f"{base}/api/calls") as r:
                assert r.status == 200
            async with b.post(f"{base}/logout") as r:
                assert await r.json() == {"logged_out": True}
            assert len(desk.sessions) == 0
            actions = [(e["action"], e["operator"]) for e in desk.audit.recent()]
            assert actions == [("login", "alice")] + [("login_failed", None)] * 5 + [
                ("login", "bob"), ("logout", "bob")], actions

    asyncio.run(run())


def test_take_talk_hang_up_and_incidents(tmp_path: Path) -> None:
    async def run() -> None:
        async with desk_app(tmp_path) as (base, desk), jar() as a, jar() as b, \
                aiohttp.ClientSession() as http:
            await log_in(a, base, ALICE)
            await log_in(b, base, BOB)
            car = FakeCar(mode="call")
            try:
                r = await car.post_offer(http, f"{base}/whip", CAR_TOKEN)
                call_id = r.headers["Location"].rsplit("/", 1)[1]
                async with a.post(f"{base}/api/calls/{call_id}/take") as r:
                    assert r.status == 200
                    taken = await r.json()
                    assert taken["owner"] == "alice" and taken["taken"]
                # On record at once: a desk that stops now still knows who had it.
                record = tmp_path / "recordings" / call_id / "call.json"
                for _ in range(40):
                    if record.exists() and json.loads(record.read_text()).get("owner") == \
                            "alice":
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("call.json names no owner")
                async with a.post(f"{base}/api/calls/{call_id}/take") as r:
                    assert r.status == 200  # again by the owner: no change
                async with b.post(f"{base}/api/calls/{call_id}/take") as r:
                    assert r.status == 409 and "taken by alice" in await r.text()
                for what in ("hangup", "talk"):
                    async with b.post(f"{base}/api/calls/{call_id}/{what}",
                                      json={"watcher": None}) as r:
                        assert r.status == 403 and "alice" in await r.text(), what
                async with b.post(f"{base}/api/calls/{call_id}/position") as r:
                    # Anyone may ask where the car is (409: its channel is not open yet).
                    assert r.status in (200, 409)
                    asked = [("position", "bob", call_id)] if r.status == 200 else []
                async with a.get(f"{base}/api/calls") as r:
                    assert (await r.json())["calls"][0]["owner"] == "alice"
                async with a.post(f"{base}/api/calls/{call_id}/hangup") as r:
                    assert r.status == 200
                    hung_up = await r.json()
                    assert (hung_up["owner"], hung_up["state"]) == ("alice", "ended")
                async with a.post(f"{base}/api/calls/{call_id}/take") as r:
                    assert r.status == 409 and "ended" in await r.text()
            finally:
                await car.close()
            # The call's record keeps its owner (call.json, written before the call ended).
            saved = json.loads((tmp_path / "recordings" / call_id / "call.json").read_text())
            assert (saved["state"], saved["owner"]) == ("ended", "alice")

            # An incident from the fleet with no call: taken by its id.
            message, dropped = check_incident({"id": "20260101T000000Z-000001",
                                               "event": "triggered", "phase": "triggered",
                                               "time": "2026-01-01T00:00:00.000Z"})
            desk.fleet._incident("car-1", message, dropped, "mqtt")
            path = f"{base}/api/incidents/20260101T000000Z-000001/take"
            async with b.post(path, json={"vehicle_id": "car-1"}) as r:
                assert r.status == 200 and (await r.json())["owner"] == "bob"
            async with a.post(path) as r:
                assert r.status == 409 and "taken by bob" in await r.text()
            async with a.post(f"{base}/api/incidents/nope/take") as r:
                assert r.status == 404
            async with a.get(f"{base}/api/incidents") as r:
                incident = next(i for i in (await r.json())["incidents"]
                                if i["id"] == "20260101T000000Z-000001")
                assert incident["owner"] == "bob"
            # The audit log: the file and the API agree, one line per action.
            async with a.get(f"{base}/api/audit?limit=1000") as r:
                entries = (await r.json())["audit"]
            lines = (tmp_path / "recordings" / "audit.jsonl").read_text().splitlines()
            assert [json.loads(line) for line in lines] == entries
            steps = [(e["action"], e["operator"], e["call"] or e["incident"])
                     for e in entries if e["action"] != "login"]
            assert steps == [("take", "alice", call_id), ("take", "alice", call_id),
                             ("take_refused", "bob", call_id), *asked,
                             ("hangup", "alice", call_id),
                             ("take_refused", "alice", call_id),
                             ("take", "bob", "20260101T000000Z-000001"),
                             ("take_refused", "alice", "20260101T000000Z-000001"),
                             ("take_refused", "alice", "nope")], steps
            for entry in entries:
                assert set(entry) >= {"time", "operator", "action", "call", "incident",
                                      "address"}
                assert time.strptime(entry["time"][:19], "%Y-%m-%dT%H:%M:%S")

    asyncio.run(run())


def test_history_media_needs_an_operator_and_serves_ranges(tmp_path: Path) -> None:
    async def run() -> None:
        folder = tmp_path / "recordings" / "20260101T000000Z-abcdef"
        folder.mkdir(parents=True)
        (folder / "call.json").write_text(json.dumps({
            "id": folder.name, "vehicle_id": "car-1", "state": "ended"}))
        (folder / "media.mp4").write_bytes(bytes(range(256)) * 40)
        async with desk_app(tmp_path) as (base, _), jar() as a:
            url = f"{base}/api/calls/{folder.name}/media"
            async with a.get(url) as r:
                assert r.status == 401
            await log_in(a, base, ALICE)
            async with a.get(url, headers={"Range": "bytes=256-511"}) as r:
                assert r.status == 206 and r.content_type == "video/mp4"
                assert await r.read() == bytes(range(256))
            async with a.get(url) as r:
                assert r.status == 200 and len(await r.read()) == 256 * 40
            for bad in ("/api/calls/nope/media", "/api/evidence/car-1/x/..%2Fcall.json",
                        "/api/evidence/car-1/nope/clip.mp4"):
                async with a.get(f"{base}{bad}") as r:
                    assert r.status == 404, bad
            async with a.get(f"{base}/api/audit") as r:
                playbacks = [e for e in (await r.json())["audit"] if e["action"] == "playback"]
            assert len(playbacks) == 1 and playbacks[0]["call"] == folder.name  # once

    asyncio.run(run())


def test_event_stream_ends_with_its_session(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from dashsos.dispatch import api
    monkeypatch.setattr(api, "HEARTBEAT", 0.1)

    async def run() -> None:
        async with desk_app(tmp_path) as (base, _), jar() as a:
            await log_in(a, base, ALICE)
            async with a.get(f"{base}/api/events") as stream:
                assert stream.status == 200
                await stream.content.readuntil(b": heartbeat\n\n")
                # Logged out elsewhere (another tab): the open stream ends at its next beat.
                cookie = {"dashsos_session": a.cookie_jar.filter_cookies(
                    URL(base))["dashsos_session"].value}
                async with aiohttp.ClientSession(cookies=cookie) as other, \
                        other.post(f"{base}/logout") as r:
                    assert (await r.json())["logged_out"] is True
                rest = await asyncio.wait_for(stream.content.read(), 5)
                assert rest.count(b": heartbeat") <= 1

    asyncio.run(run())
