"""Evidence upload: the car's Uploader against the reference desk, in-process on 127.0.0.1.

The desk verifies each incident against the key pinned for the vehicle (the first verified
upload pins it), uploads resume from the desk's size, and the console lists the verdict."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from browser import browser, chromium_available, console_login
from conftest import REPO, free_port
from dashsos.config import from_dict
from dashsos.dispatch.evidence import MAX_CHUNK_BYTES, VERIFICATION
from dashsos.dispatch.server import make_app
from dashsos.evidence.signing import DeviceKey, write_manifest
from dashsos.evidence.upload import Uploader, safe_name

CAR_TOKEN, OTHER_CAR_TOKEN, OPERATOR_TOKEN = "car-secret-1", "car-secret-2", "op-secret"
CAR = {"Authorization": f"Bearer {CAR_TOKEN}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
INCIDENT = "20260501T120000Z-a1b2c3"
CLIP_BYTES = 300_000


class Desk:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.base = f"http://127.0.0.1:{port}"
        self.endpoint = f"{self.base}/evidence"
        self.recordings = root / "recordings"

    def folder(self, incident: str = INCIDENT, vehicle: str = "car-7") -> Path:
        return self.recordings / "evidence" / vehicle / incident

    def verification(self, incident: str = INCIDENT, vehicle: str = "car-7") -> Any:
        return json.loads((self.folder(incident, vehicle) / VERIFICATION).read_text())

    async def evidence(self, headers: dict[str, str] = OPERATOR) -> Any:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{self.base}/api/evidence", headers=headers) as response:
            if response.status != 200:
                return response.status
            return await response.json()


@contextlib.asynccontextmanager
async def running_desk(root: Path) -> AsyncIterator[Desk]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cars").write_text(f"{CAR_TOKEN} car-7\n{OTHER_CAR_TOKEN} car-8\n")
    (root / "operators").write_text(f"{OPERATOR_TOKEN} Alice Example\n")
    config = from_dict({
        "dispatch": {"car_tokens_file": str(root / "cars"),
                     "console_tokens_file": str(root / "operators"),
                     "recordings_dir": str(root / "recordings")},
        "ice": {"interfaces": ["127.0.0.1"]},
    })
    runner = web.AppRunner(make_app(config))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Desk(root, port)
    finally:
        await runner.cleanup()


def saved_incident(incidents: Path, key: DeviceKey, incident: str = INCIDENT,
                   vehicle: str = "car-7") -> Path:
    """An incident as the recorder leaves it: files, incident.json, signed manifest."""
    directory = incidents / incident
    directory.mkdir(parents=True)
    (directory / "clip.mp4").write_bytes(os.urandom(CLIP_BYTES))
    (directory / "track.gpx").write_text("<gpx></gpx>\n")
    (directory / "track.vtt").write_bytes(b"")  # an empty file goes too
    (directory / "incident.json").write_text(json.dumps({"id": incident, "status": "saved",
                                                         "vehicle_id": vehicle}))
    write_manifest(directory, key, {"vehicle_id": vehicle, "incident": incident})
    return directory


def uploader(car: Path, desk: Desk, token: str = CAR_TOKEN, **kw: Any) -> Uploader:
    return Uploader(car / "incidents", desk.endpoint, token, ssl=False, **kw)


def same_files(car_incident: Path, desk_incident: Path) -> None:
    names = ["manifest.json", "manifest.sig", "clip.mp4", "track.gpx", "track.vtt",
             "incident.json"]
    for name in names:
        assert (desk_incident / name).read_bytes() == (car_incident / name).read_bytes(), name


def marker(directory: Path) -> Any:
    return json.loads((directory / "upload.json").read_text())


def test_upload_verified_pinned_and_listed(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    incident = saved_incident(tmp_path / "car" / "incidents", key)
    (tmp_path / "car" / "incidents" / "20260501T110000Z-000000").mkdir()  # never signed

    async def run() -> None:
        async with running_desk(tmp_path / "desk") as desk:
            up = uploader(tmp_path / "car", desk)
            assert await up.upload_once() == [INCIDENT]
            same_files(incident, desk.folder())
            result = desk.verification()
            assert result["verified"] is True and result["problems"] == []
            assert result["pinned"] is True and result["fingerprint"] == key.fingerprint
            pins = (desk.recordings / "trusted_keys").read_text()
            assert f"car-7 {key.fingerprint}" in pins
            done = marker(incident)
            assert done["uploaded"] is True and done["verified"] is True
            assert done["desk"] == desk.endpoint and done["fingerprint"] == key.fingerprint
            assert up.state["pending"] == 0 and up.state["uploaded"] == 1
            assert up.state["last_error"] is None and up.state["last_upload"]
            assert await up.upload_once() == []  # nothing left to send

            listed = (await desk.evidence())["evidence"]
            assert len(listed) == 1
            entry = listed[0]
            assert entry["vehicle_id"] == "car-7" and entry["incident"] == INCIDENT
            assert entry["verified"] is True and entry["fingerprint"] == key.fingerprint
            assert entry["files"]["clip.mp4"] == CLIP_BYTES and entry["files"]["track.vtt"] == 0
            assert VERIFICATION not in entry["files"]
            assert await desk.evidence({}) == 401
            assert await desk.evidence(CAR) == 401  # a car is not an operator

            # Sent again (say the car lost upload.json): still verified, nothing re-pinned.
            (incident / "upload.json").unlink()
            assert await uploader(tmp_path / "car", desk).upload_once() == [INCIDENT]
            assert desk.verification()["verified"] is True
            assert desk.verification()["pinned"] is False
            assert (desk.recordings / "trusted_keys").read_text() == pins

    asyncio.run(run())


def test_resumes_from_the_desks_size(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    incidents = tmp_path / "car" / "incidents"
    first = saved_incident(incidents, key)
    second = saved_incident(incidents, key, "20260502T120000Z-d4e5f6")

    async def run() -> None:
        async with running_desk(tmp_path / "desk") as desk:
            # A desk that has part of a file already (an earlier, cut-off upload).
            desk.folder().mkdir(parents=True)
            (desk.folder() / "clip.mp4").write_bytes((first / "clip.mp4").read_bytes()[:1000])
            # The car is cut off mid-file: tiny chunks, cancelled after some have landed.
            task = asyncio.ensure_future(uploader(tmp_path / "car", desk,
                                                  chunk_bytes=4096).upload_once())
            clip = desk.folder() / "clip.mp4"
            while clip.stat().st_size < 20_000:
                await asyncio.sleep(0.001)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            cut = clip.stat().st_size
            assert 20_000 <= cut < CLIP_BYTES
            assert not (first / "upload.json").exists()
            assert not desk.folder().joinpath(VERIFICATION).exists()

            # "After a restart": a new Uploader goes on from the desk's size.
            up = uploader(tmp_path / "car", desk)
            assert await up.upload_once() == [first.name, second.name]  # oldest first
            same_files(first, desk.folder())
            same_files(second, desk.folder(second.name))
            assert desk.verification()["verified"] is True
            assert marker(first)["uploaded"] is True

            # A chunk that does not start at the desk's size: 409 and where to go on from.
            async with aiohttp.ClientSession(headers=CAR) as session:
                url = f"{desk.endpoint}/{INCIDENT}/clip.mp4"
                async with session.put(url, data=b"x", headers={
                        "Content-Range": f"bytes 5-5/{CLIP_BYTES + 1}"}) as r:
                    assert r.status == 409
                    assert r.headers["Upload-Offset"] == str(CLIP_BYTES)
                async with session.head(url) as r:
                    assert r.status == 200 and r.headers["Upload-Offset"] == str(CLIP_BYTES)
                async with session.head(f"{desk.endpoint}/{INCIDENT}/nothing.bin") as r:
                    assert r.status == 404
                # Bodies that disagree with their range, and sizes past the limits.
                for header, body, status in [
                        ("bytes 0-9/10", b"short", 400), ("bytes 9-0/10", b"", 400),
                        ("0-9/10", b"x" * 10, 400), (f"bytes 0-0/{3 << 30}", b"x", 413),
                        (f"bytes 0-{MAX_CHUNK_BYTES}/{1 << 30}", b"x", 413)]:
                    async with session.put(f"{desk.endpoint}/{INCIDENT}/new.bin", data=body,
                                           headers={"Content-Range": header}) as r:
                        assert r.status == status, header
                assert not (desk.folder() / "new.bin").exists()

    asyncio.run(run())


def test_tampered_file_is_uploaded_but_not_verified(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    incident = saved_incident(tmp_path / "car" / "incidents", key)
    clip = bytearray((incident / "clip.mp4").read_bytes())
    clip[1234] ^= 0xFF  # after signing
    (incident / "clip.mp4").write_bytes(bytes(clip))

    async def run() -> None:
        async with running_desk(tmp_path / "desk") as desk:
            up = uploader(tmp_path / "car", desk)
            assert await up.upload_once() == [INCIDENT]
            result = desk.verification()
            assert result["verified"] is False and result["pinned"] is False
            assert any(p.startswith("clip.mp4: content differs") for p in result["problems"])
            done = marker(incident)
            # The desk has the bytes: uploaded (retention may prune), but not verified.
            assert done["uploaded"] is True and done["verified"] is False
            assert any("clip.mp4" in p for p in done["problems"])
            assert not (desk.recordings / "trusted_keys").exists()  # nothing pinned
            entry = (await desk.evidence())["evidence"][0]
            assert entry["verified"] is False and entry["problems"][0].startswith("clip.mp4")

    asyncio.run(run())


def test_another_key_for_a_pinned_vehicle_is_not_verified(tmp_path: Path) -> None:
    first_key, second_key = DeviceKey.generate(), DeviceKey.generate()
    car = tmp_path / "car"
    first = saved_incident(car / "incidents", first_key)

    async def run() -> None:
        async with running_desk(tmp_path / "desk") as desk:
            assert await uploader(car, desk).upload_once() == [INCIDENT]
            assert desk.verification()["pinned"] is True
            second = saved_incident(car / "incidents", second_key, "20260502T000000Z-000002")
            assert await uploader(car, desk).upload_once() == [second.name]
            result = desk.verification(second.name)
            assert result["verified"] is False and result["fingerprint"] == \
                second_key.fingerprint
            assert result["problems"] == [f"key {second_key.fingerprint}: not among the "
                                          "trusted keys"]
            assert marker(second)["verified"] is False
            assert marker(first)["verified"] is True
            # Another vehicle's first upload, with that same key, pins it for that vehicle.
            other = tmp_path / "other"
            saved_incident(other / "incidents", second_key, vehicle="car-8")
            assert await uploader(other, desk, OTHER_CAR_TOKEN).upload_once() == [INCIDENT]
            assert desk.verification(vehicle="car-8")["verified"] is True
            pins = (desk.recordings / "trusted_keys").read_text()
            assert f"car-8 {second_key.fingerprint}" in pins
            assert f"car-7 {second_key.fingerprint}" not in pins
            listed = (await desk.evidence())["evidence"]
            assert [(e["vehicle_id"], e["incident"], e["verified"]) for e in listed] == [
                ("car-7", second.name, False), ("car-8", INCIDENT, True),
                ("car-7", INCIDENT, True)]

    asyncio.run(run())


def test_bad_token_uploads_nothing(tmp_path: Path) -> None:
    incident = saved_incident(tmp_path / "car" / "incidents", DeviceKey.generate())

    async def run() -> None:
        async with running_desk(tmp_path / "desk") as desk:
            up = uploader(tmp_path / "car", desk, token="not-a-car")
            assert await up.upload_once() == []
            assert "401" in up.state["last_error"]
            assert up.state["pending"] == 1 and up.state["uploaded"] == 0
            assert not (incident / "upload.json").exists()
            assert not (desk.recordings / "evidence").exists()
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{desk.endpoint}/{INCIDENT}/complete") as r:
                    assert r.status == 401
                async with session.post(f"{desk.endpoint}/{INCIDENT}/complete",
                                        headers=CAR) as r:
                    assert r.status == 404  # nothing received

    asyncio.run(run())


def test_path_traversal_is_refused(tmp_path: Path) -> None:
    for name in ["..", ".", "../x", "a/b", ".hidden", "", "a\0b", "x" * 129, "é", "a b",
                 "clip.mp4\n"]:
        assert not safe_name(name), name
    for name in ["clip.mp4", INCIDENT, "track.gpx", "manifest.sig", "a-b_c.d"]:
        assert safe_name(name), name

    async def run() -> None:
        async with running_desk(tmp_path / "desk") as desk, \
                aiohttp.ClientSession(headers=CAR) as session:
            for path in ["..%2Fx/clip.mp4", "%2E%2E/clip.mp4", f"{INCIDENT}/%2E%2E",
                         f"{INCIDENT}/..%2F..%2Fcars", "a%2F..%2F..%2Fb/f", ".x/clip.mp4",
                         f"{INCIDENT}/verification.json", f"{INCIDENT}/upload.json",
                         f"{INCIDENT}/clip.mp4.tmp"]:
                url = URL(f"{desk.endpoint}/{path}", encoded=True)
                for method in ("HEAD", "PUT"):
                    async with session.request(method, url, data=b"x", headers={
                            "Content-Range": "bytes 0-0/1"}) as r:
                        assert r.status == 400, (method, path, r.status)
            for incident in ["..%2Fx", "%2E%2E", ".x"]:
                url = URL(f"{desk.endpoint}/{incident}/complete", encoded=True)
                async with session.post(url) as r:
                    assert r.status == 400, incident
            assert not (desk.recordings / "evidence").exists()
            assert not (desk.recordings / "x").exists()

    asyncio.run(run())


def test_desk_down(tmp_path: Path) -> None:
    incident = saved_incident(tmp_path / "car" / "incidents", DeviceKey.generate())
    endpoint = f"http://127.0.0.1:{free_port()}/evidence"  # nothing listens there

    async def run() -> None:
        up = Uploader(tmp_path / "car" / "incidents", endpoint, CAR_TOKEN, ssl=False,
                      interval=0.05, timeout=2)
        assert await up.upload_once() == []
        assert "Cannot connect" in up.state["last_error"], up.state
        assert up.state["pending"] == 1
        assert not (incident / "upload.json").exists()
        # run() keeps going (and backs off) rather than raising; poke() is harmless.
        task = asyncio.ensure_future(up.run())
        up.poke()
        await asyncio.sleep(0.3)
        assert not task.done()
        assert up._delay() > up.interval
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_run_uploads_when_poked(tmp_path: Path) -> None:
    car = tmp_path / "car"
    (car / "incidents").mkdir(parents=True)

    async def run() -> None:
        async with running_desk(tmp_path / "desk") as desk:
            up = uploader(car, desk, interval=60)  # only a poke can make it go in time
            task = asyncio.ensure_future(up.run())
            await asyncio.sleep(0.1)
            incident = saved_incident(car / "incidents", DeviceKey.generate())
            up.poke()
            for _ in range(200):
                if up.state["uploaded"]:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert marker(incident)["verified"] is True
            assert up.state["uploaded"] == 1

    asyncio.run(run())


def test_console_shows_the_verdict() -> None:
    js = (REPO / "daemon/dashsos/dispatch/console/console.js").read_text()
    assert '"/api/evidence"' in js and '"evidence"' in js  # loaded, and live by SSE
    assert '"VERIFIED"' in js and '"NOT VERIFIED"' in js


@pytest.mark.skipif(not chromium_available(), reason="needs chromium and chromedriver")
def test_console_in_chromium(tmp_path: Path) -> None:
    good, bad = DeviceKey.generate(), DeviceKey.generate()
    car = tmp_path / "car"
    saved_incident(car / "incidents", good)
    other = saved_incident(car / "incidents", bad, "20260502T000000Z-000002")
    # A past call whose MSD names the first incident: the badge goes next to it too.
    call = tmp_path / "desk" / "recordings" / "20260501T115959Z-c0ffee"
    call.mkdir(parents=True)
    (call / "call.json").write_text(json.dumps({
        "id": call.name, "vehicle_id": "car-7", "mode": "call", "state": "ended",
        "started": "2026-05-01T11:59:59.000Z", "msd": {"id": INCIDENT}}))

    async def run() -> str:
        async with running_desk(tmp_path / "desk") as desk:
            assert await uploader(car, desk).upload_once() == [INCIDENT, other.name]

            def look() -> str:
                with browser(tmp_path / "browser", fake_audio_hz=None) as b:
                    console_login(b, desk.base, OPERATOR_TOKEN)
                    b.eval_async("""new Promise((resolve, reject) => {
                        const t0 = Date.now();
                        const check = () => document.querySelectorAll("#evidence li").length
                          === 2 ? resolve() : Date.now() - t0 > 10000 ? reject("no evidence")
                          : setTimeout(check, 50);
                        check(); })""")
                    text: str = b.eval("return document.body.innerText")
                    call_item = b.eval(f"return document.querySelector("
                                       f"'#calls li[data-id=\"{call.name}\"]').innerText")
                    assert "VERIFIED" in call_item and "NOT" not in call_item, call_item
                    return text

            return await asyncio.to_thread(look)

    text = asyncio.run(run())
    assert "Evidence received" in text
    assert "NOT VERIFIED" in text and "not among the trusted keys" in text
    assert text.count("VERIFIED") >= 3  # two in the list, one by the call
