"""Real receivers' logs from gpsd's regression suite, replayed through gpsfake into
dashsos's gpsd client, compared with gpsd's own expected output (tests/data/gpsd)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, listening, wait_for
from dashsos import clock
from dashsos.config import GpsConfig
from dashsos.evidence import sidecars
from dashsos.location.fix import Fix
from dashsos.location.gpsd_source import EpochAssembler, GpsdSource
from dashsos.location.track import Track
from dashsos.msd import Vehicle, build_msd

DATA = Path(__file__).parent / "data" / "gpsd"
EXPECTED: dict[str, list[list[Any]]] = {
    k: v for k, v in json.loads((DATA / "expected.json").read_text()).items()
    if not k.startswith("_")}
FIELDS = ("mode", "lat", "lon", "alt", "heading", "magnetic_heading", "speed", "climb")
# Seconds between sentences: the Trimble's two sentences an epoch at its own 10 Hz (a pass
# of its log in 12 s); the 1 Hz logs at 10 sentences a second.
CYCLE = {"nmea-rtk.log": 0.05}


@pytest.fixture(autouse=True)
def _own_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process GpsdSource feeds GPS time to the daemon's clock: these logs' times (2022,
    # 2034) must not become the wall time of later tests in this process.
    monkeypatch.setenv("DASHSOS_CLOCK_SYNC", "yes")
    monkeypatch.setattr(clock, "CLOCK", clock.Clock())


class Replay:
    """gpsfake replaying one log (in a loop), `cycle` seconds between sentences.

    Once in about 20 full suite runs here, dashsos's client got nothing at all for 60 s
    from the replay of the short Garmin log. A replay must first show a TPV to a plain
    socket, so a gpsfake that never decodes its log (the harness; started again, at most
    ATTEMPTS times) is told apart from a client that misses what gpsd sends (the test)."""

    PROBE_S = 15.0
    ATTEMPTS = 3

    def __init__(self, log: Path, workdir: Path, cycle: float = 0.1) -> None:
        self.output = open(workdir / f"{log.name}.gpsfake", "ab")  # noqa: SIM115
        for attempt in range(1, self.ATTEMPTS + 1):
            self.port = free_port()
            self.process = subprocess.Popen(
                ["gpsfake", "-q", "-c", str(cycle), "-P", str(self.port), str(log)],
                stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True)
            wait_for(lambda: listening(self.port), 10, "gpsfake's gpsd")
            if self._reports_a_fix():
                return
            print(f"gpsfake for {log.name}: no TPV in {self.PROBE_S:g} s (attempt {attempt})")
            self._kill()
        raise AssertionError(f"gpsfake never replayed {log.name}")

    def _reports_a_fix(self) -> bool:
        deadline = time.monotonic() + self.PROBE_S
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
            sock.sendall(b'?WATCH={"enable":true,"json":true};\n')
            while time.monotonic() < deadline:
                try:
                    if b'"class":"TPV"' in sock.recv(65536):
                        return True
                except TimeoutError:
                    pass
        return False

    def _kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # gpsfake spins on SIGTERM
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def stop(self) -> None:
        self._kill()
        self.output.close()


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[Any]:
    started: list[Replay] = []

    def start(name: str) -> Replay:
        r = Replay(DATA / name, tmp_path, CYCLE.get(name, 0.1))
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def time_of_day(fix: Fix) -> str:
    # Dates differ between gpsd versions (1024-week roll of pre-2019 logs): compare the
    # receiver's time of day, with its fraction of a second when it has one (a 10 Hz
    # receiver's 13:28:19.7; 13:28:20.000 is 13:28:20, as in expected.json).
    match = re.search(r"T(\d\d:\d\d:\d\d(?:\.\d*[1-9])?)", fix.time)
    assert match, fix.time
    return match.group(1)


def collect(port: int, wanted: set[str], seconds: float = 60) -> list[Fix]:
    """Fixes from GpsdSource until each wanted time of day came twice (a second pass of
    the looping log: the first pass starts wherever gpsd caught the log)."""
    fixes: list[Fix] = []
    done = threading.Event()
    seen: Counter[str] = Counter()

    def deliver(fix: Fix) -> None:
        fixes.append(fix)
        seen[time_of_day(fix)] += 1  # counted as they come: 10 Hz would make a rescan slow
        if all(seen[t] >= 2 for t in wanted):
            done.set()

    source = GpsdSource(GpsConfig(backend="gpsd", port=port, timeout=2.0))
    source.start(deliver)
    try:
        assert done.wait(seconds), [(time_of_day(f), f.speed) for f in fixes]
    finally:
        source.stop()
    return list(fixes)


def as_row(fix: Fix) -> list[Any]:
    return [time_of_day(fix), fix.mode, fix.lat, fix.lon, fix.alt, fix.heading,
            fix.magnetic_heading, fix.speed, fix.climb]


def check(row: list[Any], expected: list[Any]) -> None:
    assert row[:2] == expected[:2], (row, expected)
    for name, got, want in zip(FIELDS[1:], row[2:], expected[2:], strict=True):
        if want is None:
            assert got is None, (name, row, expected)
        else:
            assert got is not None, (name, row, expected)
            assert abs(got - want) < (1e-8 if name in ("lat", "lon") else 1e-3), \
                (name, row, expected)


@pytest.mark.parametrize("log", sorted(EXPECTED))
def test_every_epoch_matches_gpsds_expected_output(replay: Any, log: str) -> None:
    """Every fix delivered for a receiver time is gpsd's last (whole) TPV of that time:
    no half-assembled epoch (GGA-first: gpsd's position-difference speed, no course;
    RMC-first: 2D without altitude), no absent field turned into 0."""
    expected = {row[0]: row for row in EXPECTED[log]}
    fixes = collect(replay(log).port, set(expected))
    times = [time_of_day(f) for f in fixes]
    # The first pass starts wherever gpsd caught the log (climb needs a previous epoch):
    # compare from the log's second pass on, where the replay matches gpsd's own test.
    wrap = next(i for i in range(1, len(times)) if times[i] <= times[i - 1])
    compared = 0
    for fix, t in zip(fixes[wrap:], times[wrap:], strict=True):
        if t in expected:
            check(as_row(fix), expected[t])
            compared += 1
    assert compared >= len(expected)
    # One fix per receiver time in each pass of the log: no partial epoch went out first.
    for t in expected:
        assert times.count(t) in (2, 3), (t, times)


def test_msd_and_gpx_from_a_moving_receiver(replay: Any) -> None:
    """Garmin 15x, RMC-first, western hemisphere, 9 km/h: the MSD's position, magnetic
    direction and N1/N2, and every GPX point, against gpsd's expected output."""
    log = "garmin15x.log"
    expected = {row[0]: row for row in EXPECTED[log]}
    fixes = collect(replay(log).port, set(expected))
    # The looping log has epochs before gpsd's expected output starts: end the track on
    # the last pass's final expected epoch, so it and the two before it are all checked.
    final = max(expected)
    end = max(i for i, f in enumerate(fixes) if time_of_day(f) == final)
    track = Track(900)
    for fix in fixes[:end + 1]:
        track.add(fix)
    last = fixes[end]
    want = expected[time_of_day(last)]
    msd = build_msd(message_id=1, automatic=False, test_call=False, vehicle=Vehicle(),
                    triggered_ns=last.capture_ns, position=last, previous=track.previous(2))
    s = msd["msdStructure"]
    assert s["vehicleLocation"] == {"positionLatitude": round(want[2] * 3_600_000),
                                    "positionLongitude": round(want[3] * 3_600_000)}
    # magtrack (EN 15722: from magnetic north) in 2-degree steps, half up.
    assert s["vehicleDirection"] == int(want[6] / 2 + 0.5)
    before = [expected[time_of_day(f)] for f in track.previous(2)]
    n1 = s["recentVehicleLocationN1"]
    assert n1 == {"latitudeDelta": round((round(before[0][2] * 3_600_000)
                                          - round(want[2] * 3_600_000)) / 100),
                  "longitudeDelta": round((round(before[0][3] * 3_600_000)
                                           - round(want[3] * 3_600_000)) / 100)}
    assert "recentVehicleLocationN2" in s
    gpx = sidecars.gpx([f for f in fixes if time_of_day(f) in expected], "t")
    points = re.findall(r'<trkpt lat="([^"]+)" lon="([^"]+)"><ele>([^<]+)</ele>'
                        r'<time>([^<]+)</time>', gpx)
    assert points
    for lat, lon, ele, stamp in points:
        row = expected[stamp[11:19]]
        assert abs(float(lat) - row[2]) < 1e-7 and abs(float(lon) - row[3]) < 1e-7
        assert abs(float(ele) - row[4]) < 0.051
        assert stamp.startswith("2022-10-18T")  # the receiver's time, not the Pi's


def test_no_course_and_too_slow_is_direction_unknown(replay: Any) -> None:
    """MediaTek, nearly still: course 0.00 at 0.02 m/s means nothing; the MSD says 255
    and the MQTT/status JSON keeps the receiver's fields, lists none as 0 by invention."""
    log = "mtk-3301.log"
    expected = {row[0]: row for row in EXPECTED[log]}
    fixes = collect(replay(log).port, set(expected))
    fix = fixes[-1]
    msd = build_msd(message_id=1, automatic=False, test_call=False, vehicle=Vehicle(),
                    triggered_ns=fix.capture_ns, position=fix, previous=[])
    assert msd["msdStructure"]["vehicleDirection"] == 255
    assert msd["decoded"]["direction_degrees"] is None
    # gpsd's mid-epoch speed from position differences (1.7 to 4.5 m/s) never came out.
    # (The 2D fixes before it have no speed at all: unknown, not 0.)
    assert all(f.speed is None or f.speed < 0.2 for f in fixes), [f.speed for f in fixes]
    assert all(f.speed is not None for f in fixes if f.mode == 3)
    # Its 2D fixes carry no speed and no course at all (gpsd leaves the keys out): a real
    # receiver's absent course, unknown here, 255 in an MSD.
    two_d = [f for f in fixes if f.mode == 2]
    assert two_d and all(f.heading is None and f.magnetic_heading is None
                         and f.speed is None and f.alt is None for f in two_d)
    assert build_msd(message_id=1, automatic=False, test_call=False, vehicle=Vehicle(),
                     triggered_ns=0, position=two_d[0], previous=[])[
        "msdStructure"]["vehicleDirection"] == 255


def test_absent_fields_stay_unknown() -> None:
    """A receiver without course, speed or climb (gpsd leaves the keys out)."""
    epochs = EpochAssembler()
    lines = [
        {"class": "TPV", "mode": 3, "time": "2025-01-01T00:00:00.000Z", "lat": 1.5,
         "lon": -2.5, "altMSL": 10.0},
        {"class": "TPV", "mode": 3, "time": "2025-01-01T00:00:01.000Z", "lat": 1.5,
         "lon": -2.5},
    ]
    out: list[Fix] = []
    for line in lines:
        out += epochs.feed(json.dumps(line).encode(), 0)
    held = epochs.flush()
    assert held is not None
    out.append(held)
    assert [f.time[-12:-5] for f in out] == ["0:00:00", "0:00:01"]
    first = out[0]
    assert (first.speed, first.heading, first.magnetic_heading, first.climb) == \
        (None, None, None, None)
    data = first.as_dict()
    assert "heading" not in data and "speed" not in data
    assert {"speed", "heading", "climb", "epx"} <= set(data["unknown"])
    assert out[1].alt is None and "alt" in out[1].as_dict()["unknown"]


def test_a_later_tpv_of_the_same_time_replaces_the_earlier() -> None:
    epochs = EpochAssembler()
    base = {"class": "TPV", "mode": 3, "time": "2025-01-01T00:00:00.000Z", "lat": 1.0,
            "lon": 2.0}
    assert epochs.feed(json.dumps({**base, "speed": 4.5}).encode(), 0) == []
    assert epochs.feed(json.dumps({**base, "speed": 0.02, "track": 0.0}).encode(), 0) == []
    out = epochs.feed(json.dumps({**base, "time": "2025-01-01T00:00:01.000Z"}).encode(), 0)
    assert [f.speed for f in out] == [0.02]
    # Learnt: a whole epoch has speed and track; the next one carrying them goes at once.
    out = epochs.feed(json.dumps({**base, "time": "2025-01-01T00:00:01.000Z", "speed": 1.0,
                                  "track": 10.0}).encode(), 0)
    assert [f.speed for f in out] == [1.0]
    # A lost fix ends the epoch held so far.
    assert epochs.feed(json.dumps({**base, "time": "2025-01-01T00:00:02.000Z"}).encode(),
                       0) == []
    out = epochs.feed(b'{"class":"TPV","mode":1,"time":"2025-01-01T00:00:03.000Z"}', 0)
    assert [f.time for f in out] == ["2025-01-01T00:00:02.000Z"]
    assert epochs.no_fix


def test_through_the_daemon_gpx_msd_and_mqtt_match_gpsd(replay: Any, daemon: Any,
                                                        tmp_path: Path) -> None:
    """The Garmin 15x log through gpsfake into `dashsos run`: every GPX point, the MSD in
    incident.json (position, magnetic direction, N1) and every MQTT location message
    against gpsd's expected output."""
    from mqttbroker import Broker, Subscriber

    log = "garmin15x.log"
    expected = {row[0]: row for row in EXPECTED[log]}
    broker = Broker(tmp_path)
    subscriber = Subscriber(broker.port, "dashsos/#")
    fake = replay(log)
    try:
        # The log is from 2022: keep the daemon's wall time on the host's clock, not GPS.
        car = daemon({"gps": {"backend": "gpsd", "port": fake.port},
                      "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                               "location_interval": 1.0},
                      "incident": {"post_seconds": 6}}, env={"DASHSOS_CLOCK_SYNC": "yes"})
        wait_for(lambda: car.source("gps")["state"] == "ok", 30, "a fix", step=0.25)
        car.wait_buffered(1)
        incident = car.trigger()["incident"]
        record = car.wait_saved(incident)
        gpx = (car.incident_dir(incident) / "track.gpx").read_text()
        locations = subscriber.json("/location")
    finally:
        subscriber.close()
        broker.stop()

    points = re.findall(r'<trkpt lat="([^"]+)" lon="([^"]+)"><ele>([^<]+)</ele>'
                        r'<time>([^<]+)</time><fix>3d</fix>', gpx)
    compared = 0
    for lat, lon, ele, stamp in points:
        row = expected.get(stamp[11:19])
        if row is None:
            continue  # 11:32:58, the log's first epoch (the replay loops)
        assert abs(float(lat) - row[2]) < 1e-7 and abs(float(lon) - row[3]) < 1e-7, stamp
        assert abs(float(ele) - row[4]) < 0.051, stamp
        compared += 1
    assert compared >= 3, gpx
    assert gpx.count("<trkpt") == len(points)  # every point 3D and with receiver time

    msd = record["msd"]
    s = msd["msdStructure"]
    at = next(row for row in expected.values()
              if round(row[2] * 3_600_000) == s["vehicleLocation"]["positionLatitude"])
    assert s["vehicleLocation"]["positionLongitude"] == round(at[3] * 3_600_000)
    assert s["vehicleDirection"] == int(at[6] / 2 + 0.5)  # magtrack, 2-degree steps
    assert s["control"]["positionCanBeTrusted"]
    times = sorted(expected)
    if times.index(at[0]) > 0:
        prev = expected[times[times.index(at[0]) - 1]]
        assert s["recentVehicleLocationN1"] == {
            "latitudeDelta": round((round(prev[2] * 3_600_000) - round(at[2] * 3_600_000))
                                   / 100),
            "longitudeDelta": round((round(prev[3] * 3_600_000) - round(at[3] * 3_600_000))
                                    / 100)}

    checked = 0
    for message in locations:
        row = expected.get(message.get("time", "")[11:19])
        if row is None:
            continue
        assert (message["mode"], message["lat"], message["lon"]) == tuple(row[1:4])
        assert abs(message["alt"] - row[4]) < 1e-3
        assert abs(message["heading"] - row[5]) < 1e-3
        assert abs(message["speed"] - row[7]) < 1e-3
        assert "heading" not in message["unknown"] and "speed" not in message["unknown"]
        checked += 1
    assert checked >= 3, locations[:3]


def test_home_assistant_shows_unknown_for_a_missing_speed() -> None:
    """A 2D fix without speed (the MTK log's first fixes): the MQTT location has no
    `speed`, lists it as unknown, and HA's speed sensor renders None (its "unknown")."""
    sandbox = pytest.importorskip("jinja2.sandbox")
    from dashsos.fleet.discovery import discovery_messages

    epochs = EpochAssembler()
    line = {"class": "TPV", "mode": 2, "time": "2028-04-09T08:14:34.590Z",
            "lat": 52.21631655, "lon": 6.8849651, "altMSL": 102.907}
    epochs.feed(json.dumps(line).encode(), 0)
    fix = epochs.flush()
    assert fix is not None and fix.alt is None  # 2D: no altitude either
    payload = fix.as_dict()
    assert "speed" not in payload and {"speed", "heading", "alt"} <= set(payload["unknown"])
    configs = [json.loads(p) for t, p in discovery_messages("car-1", "dashsos/car-1", "0",
                                                          "homeassistant")
               if t.endswith("/speed/config")]
    env = sandbox.ImmutableSandboxedEnvironment()
    template = configs[0]["value_template"]
    assert env.from_string(template).render(value_json=payload) == "None"
