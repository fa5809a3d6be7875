"""The console's street map in real headless Chromium: Leaflet as `scripts/test` fetched it
from the npm registry, tiles from a local tile server (tests/tiles.py), every car at its
last MQTT position (offline cars greyed, cars without a fix absent), every open incident
marked, moves and closes followed live. A screenshot lands in artifacts/console-map.png."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from browser import browser, chromium_available, console_login
from conftest import wait_for
from dashsos.config import ConfigError, from_dict
from dashsos.dispatch.streetmap import library_installed, tile_origin
from dispatcher import CONSOLE_TOKEN
from mqttbroker import Broker
from test_desk_fleet import FleetDesk, _publish
from tiles import TileServer

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"
needs_chromium = pytest.mark.skipif(not chromium_available(),
                                    reason="needs chromium and chromedriver")

CARS = {"car-1": (52.5200, 13.4050), "car-2": (52.5300, 13.4500), "car-3": (52.5100, 13.3800)}
INCIDENT = "20261204T050000Z-a1b2c3"


def tile_of(lat: float, lon: float, zoom: int) -> tuple[int, int, int]:
    """The slippy-map tile holding a point (OpenStreetMap's numbering, as Leaflet's)."""
    n = 2 ** zoom
    x = int((lon + 180) / 360 * n)
    y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)
    return zoom, x, y


def test_tile_url_is_checked_and_becomes_the_one_image_origin() -> None:
    good = {"map_tiles": "https://{s}.tile.openstreetmap.org/{z}/{x}/{y}.png",
            "map_attribution": "© OpenStreetMap contributors"}
    assert from_dict({"dispatch": good}).dispatch.map_tiles == good["map_tiles"]
    assert tile_origin(good["map_tiles"]) == "https://*.tile.openstreetmap.org"
    assert tile_origin("http://127.0.0.1:8123/{z}/{x}/{y}.png") == "http://127.0.0.1:8123"
    assert tile_origin("") is None
    for bad, why in [("ftp://tiles.example/{z}/{x}/{y}.png", "not an http"),
                     ("https://tiles.example/{z}/{x}.png", "lacks {y}"),
                     ("https://user@evil.example/{z}/{x}/{y}", "plain host"),
                     ("https://tiles.example/{z}/{x}/{y}.png; script-src *", "semicolon"),
                     ("https://tiles.example/{z}/{x}/{y}.png' *", "quote")]:
        with pytest.raises(ConfigError, match=why):
            from_dict({"dispatch": {**good, "map_tiles": bad}})
    with pytest.raises(ConfigError, match="map_attribution"):
        from_dict({"dispatch": {"map_tiles": good["map_tiles"]}})


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_desk_serves_leaflet_and_the_map_settings(tmp_path: Path) -> None:
    assert library_installed(), "scripts/test fetches Leaflet (scripts/lib/setup.sh)"
    with TileServer() as tiles:
        desk = FleetDesk(tmp_path / "dispatcher", 1, dispatch={
            "map_tiles": tiles.template, "map_attribution": "test tiles"})
        try:
            status, _, body = _get(f"{desk.url}/api/map")
            assert status == 401, "the map's settings are an operator's"
            status, _, body = _get(f"{desk.url}/api/map", CONSOLE_TOKEN)
            assert status == 200
            assert json.loads(body) == {"tiles": tiles.template, "attribution": "test tiles",
                                        "library": True}
            status, headers, body = _get(f"{desk.url}/vendor/leaflet/leaflet.js")
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            assert b"Leaflet 1.9.4" in body[:400]
            for name in ("leaflet.css", "images/layers.png"):
                assert _get(f"{desk.url}/vendor/leaflet/{name}")[0] == 200, name
            for name in ("../streetmap.py", "..%2F..%2Fapi.py", "package.json", "LICENSE"):
                assert _get(f"{desk.url}/vendor/leaflet/{name}")[0] == 404, name
            _, headers, _ = _get(f"{desk.url}/")
            policy = headers["Content-Security-Policy"]
            assert f"img-src 'self' data: http://127.0.0.1:{tiles.port};" in policy, policy
            assert "script-src" not in policy and "default-src 'self'" in policy
        finally:
            desk.stop()


def _map(b: Any) -> dict[str, Any]:
    state: dict[str, Any] = b.eval("return window.dashsos.map()")
    return state


def _at(markers: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    return next((m for m in markers if m["key"] == key), None)


@needs_chromium
def test_map_shows_every_car_and_open_incident(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    tiles = TileServer()
    desk = FleetDesk(tmp_path / "dispatcher", broker.port, cars=4, dispatch={
        "map_tiles": tiles.template, "map_attribution": "test tiles"})
    try:
        wait_for(lambda: desk.link()["state"] == "ok", 10, "the desk on the broker")
        fixes = [(f"dashsos/{car}/location",
                  json.dumps({"lat": lat, "lon": lon, "epx": 4.0, "mode": 3,
                              "time": "2026-12-04T05:00:00.000Z"}))
                 for car, (lat, lon) in CARS.items()]
        incident = {"id": INCIDENT, "event": "triggered", "phase": "triggered",
                    "time": "2026-12-04T05:00:01.000Z",
                    "position": {"lat": 52.5205, "lon": 13.4060, "epx": 3.0}}
        _publish(broker.port, [*fixes, ("dashsos/car-3/availability", "offline"),
                               ("dashsos/car-4/availability", "online"),  # no fix: not drawn
                               ("dashsos/car-1/incident", json.dumps(incident))])
        wait_for(lambda: len(desk.api("/api/vehicles")["vehicles"]) == 4, 10,
                 "four vehicles at the desk")
        with browser(tmp_path / "browser") as b:
            console_login(b, desk.url, CONSOLE_TOKEN)
            state = wait_for(lambda: (s := _map(b))["ready"] and len(s["cars"]) == 3
                             and len(s["alarms"]) == 1 and s, 15, "three cars and an alarm")
            assert state["library"] and state["note"] == ""
            width, height = state["size"]["x"], state["size"]["y"]
            assert width > 300 and height > 200, state["size"]
            for car, (lat, lon) in CARS.items():
                marker = _at(state["cars"], car)
                assert marker is not None, (car, state["cars"])
                assert (marker["lat"], marker["lon"]) == (lat, lon)
                assert 0 <= marker["x"] <= width and 0 <= marker["y"] <= height, marker
            one, two = _at(state["cars"], "car-1"), _at(state["cars"], "car-2")
            assert one and two and two["x"] > one["x"] and two["y"] < one["y"]  # north is up
            alarm = _at(state["alarms"], f"car-1/{INCIDENT}")
            assert alarm and (alarm["lat"], alarm["lon"]) == (52.5205, 13.4060)
            # Offline is drawn grey; the markers are real SVG in the page, not just state.
            fills = b.eval("return [...document.querySelectorAll('#streetmap path.car-marker')]"
                           ".map(p => [p.dataset.vehicle, p.getAttribute('fill')])")
            assert dict(fills) == {"car-1": "#3b5bdb", "car-2": "#3b5bdb", "car-3": "#9aa1ac"}
            assert b.eval("return document.querySelectorAll("
                          "'#streetmap path.alarm-marker').length") == 1
            # Tiles from the configured server, the ones under the cars among them.
            loaded = wait_for(lambda: len(t := _map(b)["tiles"]) >= 4 and t, 15, "tiles shown")
            assert all(src.startswith(f"http://127.0.0.1:{tiles.port}/") for src in loaded)

            def under_car_1() -> bool:
                zoom = math.floor(_map(b)["zoom"] + 0.5)  # Leaflet's tile zoom (JS rounding)
                return tile_of(*CARS["car-1"], zoom) in tiles.requests

            wait_for(under_car_1, 10, f"the tile under car-1 fetched ({tiles.requests})")
            assert "test tiles" in b.eval("return document.querySelector("
                                          "'.leaflet-control-attribution').textContent")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = b.screenshot(ARTIFACTS / "console-map.png")
            assert shot.stat().st_size > 10_000
            # A car moves: its marker follows from MQTT; the map is not rebuilt.
            _publish(broker.port, [("dashsos/car-2/location", json.dumps(
                {"lat": 52.5250, "lon": 13.4300, "time": "2026-12-04T05:00:10.000Z"}))])
            acked = time.monotonic()  # the broker has it (QoS 1)
            wait_for(lambda: (m := _at(_map(b)["cars"], "car-2")) and m["lat"] == 52.5250,
                     5, "car-2 moved on the map", step=0.02)
            print(f"\nMQTT location on the broker -> marker moved in the console: "
                  f"{(time.monotonic() - acked) * 1000:.0f} ms (polled every 20 ms)")
            # The incident closes: its alarm goes; the car stays.
            _publish(broker.port, [("dashsos/car-1/incident", json.dumps(
                {**incident, "event": "saved", "phase": "saved",
                 "time": "2026-12-04T05:01:00.000Z"}))])
            wait_for(lambda: _map(b)["alarms"] == [], 5, "the closed incident off the map")
            assert len(_map(b)["cars"]) == 3
            problems = [m for m in b.console_log() if m["level"] == "SEVERE"]
            assert not problems, problems  # no CSP violation, no script error
    finally:
        desk.stop()
        tiles.close()
        broker.stop()


@needs_chromium
def test_map_without_tiles_places_cars_and_fetches_nothing(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    desk = FleetDesk(tmp_path / "dispatcher", broker.port)
    try:
        wait_for(lambda: desk.link()["state"] == "ok", 10, "the desk on the broker")
        _publish(broker.port, [("dashsos/car-1/location",
                                json.dumps({"lat": 48.8566, "lon": 2.3522}))])
        with browser(tmp_path / "browser") as b:
            console_login(b, desk.url, CONSOLE_TOKEN)
            state = wait_for(lambda: (s := _map(b))["ready"] and s["cars"] and s, 15,
                             "the car on the map")
            assert (state["cars"][0]["lat"], state["cars"][0]["lon"]) == (48.8566, 2.3522)
            assert "No tile server configured" in state["note"]
            assert state["tiles"] == [] and b.eval(
                "return document.querySelectorAll('#streetmap img').length") == 0
            problems = [m for m in b.console_log() if m["level"] == "SEVERE"]
            assert not problems, problems
    finally:
        desk.stop()
        broker.stop()
