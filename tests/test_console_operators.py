"""Operators at the desk, in real headless Chromium (issue "The desk at scale"): login
through the form, a call ringing in two consoles, operator A taking it, operator B seeing
it taken (the ringing stops) and watching but not hanging up, A hanging up, the recording
and the car's verified evidence played in the page, and the audit log of it all.

The desk runs in this process (aiohttp), the car is FakeCar (aiortc, H.264), both on
127.0.0.1; the two browsers are driven from threads. Screenshots go to the test's tmp dir
and to artifacts/ (as test_console_browser.py's do); their paths are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from browser import Browser, BrowserError, StunServer, chromium_available, console_login
from conftest import REPO, free_port, hold_recordings
from dashsos.config import from_dict
from dashsos.dispatch.desk import DESK, Desk
from dashsos.dispatch.fleet import check_incident
from dashsos.dispatch.server import make_app
from dashsos.evidence.signing import DeviceKey, write_manifest
from dashsos.evidence.upload import Uploader
from fakecar import FakeCar

pytestmark = pytest.mark.skipif(not chromium_available(),
                                reason="needs chromium and chromedriver")

CAR_TOKEN, ALICE, BOB = "car-token-ops", "alice-token-ops", "bob-token-ops"
INCIDENT = "20250101T120000Z-abcdef"  # FakeCar's MSD names this incident
ARTIFACT_DIRS = [REPO / "artifacts", REPO / "tests" / "artifacts"]


@contextlib.asynccontextmanager
async def desk_app(root: Path, stun_url: str) -> AsyncIterator[str]:
    async with desk_and_app(root, stun_url) as (base, _):
        yield base


@contextlib.asynccontextmanager
async def desk_and_app(root: Path, stun_url: str) -> AsyncIterator[tuple[str, Desk]]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cars").write_text(f"{CAR_TOKEN} car-1\n")
    (root / "operators").write_text(f"{ALICE} alice\n{BOB} bob\n")
    config = from_dict({
        "dispatch": {"listen": "127.0.0.1", "car_tokens_file": str(root / "cars"),
                     "console_tokens_file": str(root / "operators"),
                     "recordings_dir": str(root / "recordings")},
        "ice": {"interfaces": ["127.0.0.1"], "stun_urls": [stun_url]},
    })
    app = make_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", app[DESK]
    finally:
        await runner.cleanup()


async def js(b: Browser, script: str, *args: Any) -> Any:
    return await asyncio.to_thread(b.eval, script, *args)


async def js_async(b: Browser, expression: str) -> Any:
    return await asyncio.to_thread(b.eval_async, expression)


async def until(probe: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    """Await `probe()` (a coroutine) until it gives something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.1)


def status_of(method: str, path: str, body: Any = None) -> str:
    """A page-side fetch (with the page's session cookie): its status and text."""
    return (f"fetch({json.dumps(path)}, {{method: {json.dumps(method)}, credentials: "
            f"'same-origin', headers: {{'Content-Type': 'application/json'}}, body: "
            f"{json.dumps(json.dumps(body)) if body is not None else 'undefined'}}})"
            ".then(async (r) => ({status: r.status, text: await r.text()}))")


async def shot(b: Browser, tmp_path: Path, name: str) -> list[Path]:
    paths = [await asyncio.to_thread(b.screenshot, tmp_path / name)]
    for folder in ARTIFACT_DIRS:
        if folder.is_dir():
            shutil.copyfile(paths[0], folder / name)
            paths.append(folder / name)
    for path in paths:
        print(f"screenshot: {path}")
    return paths


async def media_plays(b: Browser, getter: str, what: str) -> dict[str, Any]:
    """The <video> (window.dashsos.<getter>()) has data (readyState >= 2) and its time
    advances while it plays."""
    await js_async(b, f"(() => {{ const v = {getter}; v.muted = true; return v.play(); }})()")
    first = await until(lambda: js(b, f"const s = window.dashsos.{what}(); "
                                      "return s.readyState >= 2 && s.currentTime > 0 && s"),
                        f"{what} playing", 20)
    await asyncio.sleep(1.0)
    later = await js(b, f"return window.dashsos.{what}()")
    assert later["error"] is None and later["readyState"] >= 2, later
    assert later["currentTime"] > first["currentTime"] + 0.3, (first, later)
    assert later["width"] > 0, later  # pictures, not only sound
    return later


def signed_incident(incidents: Path, clip: Path) -> Path:
    """The car's saved incident with the call's own pictures as its clip, signed."""
    folder = incidents / INCIDENT
    folder.mkdir(parents=True)
    shutil.copyfile(clip, folder / "clip.mp4")
    (folder / "track.gpx").write_text("<gpx></gpx>\n")
    (folder / "track.vtt").write_bytes(b"")
    (folder / "incident.json").write_text(json.dumps({"id": INCIDENT, "status": "saved",
                                                      "vehicle_id": "car-1"}))
    write_manifest(folder, DeviceKey.generate(), {"vehicle_id": "car-1",
                                                  "incident": INCIDENT})
    return folder


def test_operators_login_ring_take_watch_and_play_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    numbers: dict[str, float] = {}
    # The recording is held back at the hang-up, so the console shows the call saving.
    saved = hold_recordings(monkeypatch)

    async def run() -> None:
        with StunServer() as stun:
            async with desk_app(tmp_path / "desk", stun.url) as base, \
                    contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as http:
                a = await asyncio.to_thread(Browser, tmp_path / "alice", fake_audio_hz=880)
                stack.push_async_callback(asyncio.to_thread, a.close)
                b = await asyncio.to_thread(Browser, tmp_path / "bob", fake_audio_hz=440)
                stack.push_async_callback(asyncio.to_thread, b.close)
                await scenario(base, a, b, http)

    async def scenario(base: str, a: Browser, b: Browser, http: aiohttp.ClientSession) -> None:
        # --- login: nothing works without a session; a wrong token is refused ---
        await asyncio.to_thread(a.open, f"{base}/")
        refused = await js_async(a, status_of("GET", "/api/calls"))
        assert refused["status"] == 401, refused
        with pytest.raises(BrowserError, match="Unknown operator token"):
            await asyncio.to_thread(console_login, a, base, "not-a-token", 5)
        for path in ("/api/calls", "/api/events", "/api/audit", "/api/evidence"):
            async with http.get(f"{base}{path}") as r:
                assert r.status == 401, path
        await asyncio.to_thread(console_login, a, base, ALICE)
        await asyncio.to_thread(console_login, b, base, BOB)
        for browser, name in ((a, "alice"), (b, "bob")):
            assert await js(browser, "return window.dashsos.me()") == name
            assert await js(browser, "return document.getElementById('me').textContent") == name
            await until(lambda browser=browser: js(
                browser, "return document.getElementById('link').textContent === 'online'"),
                "the console's event stream")
            assert (await js(browser, "return window.dashsos.ringing()"))["ringing"] is False
        cookies = await asyncio.to_thread(a.driver.get_cookies)
        session = next(c for c in cookies if c["name"] == "dashsos_session")
        assert session["httpOnly"] is True and session.get("sameSite") == "Strict"
        assert ALICE not in session["value"]
        assert ALICE not in await js(a, "return location.href + document.cookie")

        # --- a call arrives: it rings in both consoles, audibly, with a flashing title ---
        car = FakeCar(mode="call")
        try:
            offered = time.monotonic()
            r = await car.post_offer(http, f"{base}/whip", CAR_TOKEN)
            assert r.status == 201, await r.text()
            call_id = r.headers["Location"].rsplit("/", 1)[1]
            for browser in (a, b):
                ringing = await until(lambda browser=browser: js(
                    browser, "const r = window.dashsos.ringing(); "
                    "return r.ringing && r.items.some((i) => i.id === arguments[0]) && r",
                    call_id), "the call ringing")
                assert ringing["audio"] == "running", ringing  # the Web Audio alert plays
            numbers["offer_to_ringing_s"] = round(time.monotonic() - offered, 3)
            titles = set()
            for _ in range(12):
                titles.add(await js(b, "return document.title"))
                await asyncio.sleep(0.15)
            assert len(titles) == 2 and "dashsos dispatch" in titles, titles  # flashing
            assert any("car-1" in t for t in titles), titles
            rung = await js(b, "return window.dashsos.ringing()")
            assert rung["beeps"] >= 1 and rung["titleFlips"] >= 2, rung
            await shot(b, tmp_path, "operators-ringing.png")

            # --- A takes it (the banner's Take button); B sees it taken; ringing stops ---
            taken_at = time.monotonic()
            await js(a, "document.getElementById('ring-take').click()")
            await until(lambda: js(b, "return !window.dashsos.ringing().ringing"),
                        "the ringing to stop in B's console", 10)
            numbers["take_to_ringing_stopped_in_other_console_s"] = round(
                time.monotonic() - taken_at, 3)
            assert not (await js(a, "return window.dashsos.ringing()"))["ringing"]
            assert await js(b, "return document.title") == "dashsos dispatch"
            item = await until(lambda: js(
                b, "const e = document.querySelector(`#calls li[data-id='${arguments[0]}']`);"
                "return e && e.innerText.includes('taken by alice') && e.innerText", call_id),
                "'taken by alice' in B's list")
            assert "taken by alice" in item
            assert "taken by you" in await js(a, "return document.getElementById('owner')"
                                                 ".textContent")
            # B: Hang up and Talk are disabled in the page, and the desk says no anyway.
            assert await js(b, "return document.getElementById('hangup').disabled") is True
            hangup = await js_async(b, status_of("POST", f"/api/calls/{call_id}/hangup"))
            assert hangup["status"] == 403 and "alice" in hangup["text"], hangup
            again = await js_async(b, status_of("POST", f"/api/calls/{call_id}/take"))
            assert again["status"] == 409 and "taken by alice" in again["text"], again
            # ... but B watches: the car's video plays in B's console.
            for browser in (b, a):
                await until(lambda browser=browser: js_async(
                    browser, "window.dashsos.stats().then((s) => s.framesDecoded > 10)"),
                    "the call's video in the console", 30)
            await shot(b, tmp_path, "operators-taken.png")

            # --- A hangs up: the call is saving its recording, then it has ended ---
            await js(a, "document.getElementById('hangup').click()")
            await asyncio.wait_for(car.got_hangup.wait(), 10)
            for browser in (a, b):
                await until(lambda browser=browser: js(
                    browser, "return document.getElementById('media-note').textContent === "
                    "'Saving the recording…' && document.getElementById('state').textContent"),
                    "'Saving the recording…' in the console")
            assert await js(a, "return document.getElementById('state').textContent") == \
                "saving: operator hung up"
            assert await js(a, "return document.getElementById('hangup').disabled") is True
            item = await js(a, "return document.querySelector(`#calls li[data-id="
                               "'${arguments[0]}'] .badge`).textContent", call_id)
            assert item == "saving", item
            playing = await js_async(a, status_of("GET", f"/api/calls/{call_id}/media"))
            assert playing["status"] == 409 and "being saved" in playing["text"], playing
            await shot(a, tmp_path, "operators-saving.png")
            saved.set()
            await until(lambda: js(a, "return window.dashsos.calls().find((c) => c.id === "
                                      "arguments[0]).state === 'ended'", call_id),
                        "the call ended in A's console")
        finally:
            saved.set()
            await car.close()

        # --- history: the desk's recording (whole: the call has ended) plays in the page ---
        media = tmp_path / "desk" / "recordings" / call_id / "media.mp4"
        assert media.stat().st_size > 10_000
        await js_async(a, f"window.dashsos.select({json.dumps(call_id)})")
        src = await until(lambda: js(a, "return window.dashsos.recording().src"),
                          "the recording in the call's video element")
        assert src.endswith(f"/api/calls/{call_id}/media"), src
        played = await media_plays(a, "document.getElementById('video')", "recording")
        numbers["recording_seconds_played"] = round(played["currentTime"], 2)
        await shot(a, tmp_path, "operators-playback.png")

        # --- the car's evidence, uploaded and verified, plays too, its verdict shown ---
        car_dir = tmp_path / "car" / "incidents"
        signed_incident(car_dir, media)
        uploader = Uploader(car_dir, f"{base}/evidence", CAR_TOKEN, ssl=False)
        assert await uploader.upload_once() == [INCIDENT]
        button = "#evidence button.play[data-file='clip.mp4']"
        await until(lambda: js(a, "return !!document.querySelector(arguments[0])", button),
                    "the evidence's Play button")
        await js(a, "document.querySelector(arguments[0]).click()", button)
        await media_plays(a, "document.getElementById('player-video')", "player")
        verdict = await js(a, "return document.getElementById('player-verdict').textContent")
        assert verdict == "VERIFIED", verdict
        await shot(a, tmp_path, "operators-evidence.png")

        # --- the audit log: every action, in order, in the file and from the API ---
        audit = await js_async(a, "fetch('/api/audit').then((r) => r.json())")
        entries = audit["audit"]
        on_disk = [json.loads(line) for line in
                   (tmp_path / "desk" / "recordings" / "audit.jsonl").read_text().splitlines()]
        assert on_disk == entries
        steps = [(e["action"], e["operator"]) for e in entries
                 if e["action"] in ("login_failed", "login", "take", "take_refused",
                                    "hangup", "playback")]
        assert steps == [("login_failed", None), ("login", "alice"), ("login", "bob"),
                         ("take", "alice"), ("take_refused", "bob"), ("hangup", "alice"),
                         ("playback", "alice"), ("playback", "alice")], steps
        watched = {e["operator"] for e in entries if e["action"] == "watch"}
        assert watched == {"alice", "bob"}, entries
        take = next(e for e in entries if e["action"] == "take")
        assert take["call"] == call_id and take["address"] == "127.0.0.1"
        assert [e.get("what") for e in entries if e["action"] == "playback"] == \
            ["recording", "evidence"]
        assert all(ALICE not in json.dumps(e) and BOB not in json.dumps(e) for e in entries)

        # --- logout: B's session is gone at the desk ---
        await js(b, "document.getElementById('logout').click()")
        await until(lambda: js(b, "return !document.getElementById('login').hidden"),
                    "B's login form again")
        gone = await js_async(b, status_of("GET", "/api/calls"))
        assert gone["status"] == 401, gone

        # No CSP violation and no script error; only the refusals asked for above (and
        # the console's DELETE of a watcher the desk closed with the call: 404).
        for browser in (a, b):
            log = await asyncio.to_thread(browser.console_log)
            problems = [m for m in log if m["level"] == "SEVERE" and not (
                "Failed to load resource" in m["message"]
                and (any(f"status of {code}" in m["message"] for code in (401, 403, 409))
                     or ("/api/watchers/" in m["message"] and "status of 404" in m["message"])))]
            assert not problems, problems

    asyncio.run(run())
    print(f"operators: {json.dumps(numbers)}")
    for folder in ARTIFACT_DIRS:
        if folder.is_dir():
            (folder / "operators.json").write_text(json.dumps(numbers, indent=2) + "\n")


def test_an_incident_without_a_call_rings_until_taken(tmp_path: Path) -> None:
    """An open incident from the fleet (MQTT) with no call rings too; B takes it with its
    Take button and A's console stops ringing and shows who has it."""

    async def run() -> None:
        with StunServer() as stun:
            async with desk_and_app(tmp_path / "desk", stun.url) as (base, desk), \
                    contextlib.AsyncExitStack() as stack:
                a = await asyncio.to_thread(Browser, tmp_path / "alice", fake_audio_hz=None)
                stack.push_async_callback(asyncio.to_thread, a.close)
                b = await asyncio.to_thread(Browser, tmp_path / "bob", fake_audio_hz=None)
                stack.push_async_callback(asyncio.to_thread, b.close)
                await asyncio.to_thread(console_login, a, base, ALICE)
                await asyncio.to_thread(console_login, b, base, BOB)
                for browser in (a, b):
                    await until(lambda browser=browser: js(
                        browser, "return document.getElementById('link').textContent "
                        "=== 'online'"), "the console's event stream")
                # As the fleet's MQTT client delivers it (test_console_fleet.py runs a
                # real broker and car; here only the ringing is looked at).
                message, dropped = check_incident({
                    "id": "20260101T000000Z-000042", "event": "triggered",
                    "phase": "triggered", "time": "2026-01-01T00:00:00.000Z"})
                desk.fleet._incident("car-1", message, dropped, "mqtt")
                for browser in (a, b):
                    await until(lambda browser=browser: js(
                        browser, "const r = window.dashsos.ringing(); return r.ringing && "
                        "r.items[0].kind === 'incident' && r.audio === 'running'"),
                        "the incident ringing")
                selector = "#incidents li[data-incident='20260101T000000Z-000042']"
                await js(b, "document.querySelector(arguments[0] + ' button.take').click()",
                         selector)
                await until(lambda: js(a, "return !window.dashsos.ringing().ringing"),
                            "the ringing to stop in A's console", 10)
                text = await until(lambda: js(
                    a, "const e = document.querySelector(arguments[0]); "
                    "return e && e.innerText.includes('taken by bob') && e.innerText",
                    selector), "'taken by bob' in A's console")
                assert "NO CALL" in text
                assert not (await js(b, "return window.dashsos.ringing()"))["ringing"]
                entries = desk.audit.recent()
                assert [(e["action"], e["operator"], e["incident"]) for e in entries
                        if e["action"] == "take"] == [
                            ("take", "bob", "20260101T000000Z-000042")]

    asyncio.run(run())
