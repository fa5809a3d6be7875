"""The daemon on a Pi that booted years off, stepped mid-run by GPS or NTP: incident ids,
incident.json times, the MSD timestamp, the GPX and the reference desk's records of the
call are right (or re-stated), the step is logged and the record names its clock source.
The daemon's system clock is moved with DASHSOS_FAKE_CLOCK (see dashsos.clock): the
host's clock stays as it is."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import GpsFake, wait_for
from dispatcher import CAR_TOKEN, Dispatcher

YEARS_S = 6 * 365 * 86400  # a Pi image's fake-hwclock time, six years old


def fake_clock(path: Path, offset_s: float, synchronised: bool) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset_seconds": offset_s, "synchronised": synchronised}))
    tmp.replace(path)


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def near_now(stamp: str, seconds: float = 30) -> bool:
    return abs((parse(stamp) - datetime.now(UTC)).total_seconds()) < seconds


def id_time(incident: str) -> datetime:
    return datetime.strptime(incident.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def test_gps_time_when_the_clock_is_years_behind_then_stepped(
        daemon: Any, own_gpsfake: GpsFake, tmp_path: Path) -> None:
    fake = tmp_path / "clock.json"
    fake_clock(fake, -YEARS_S, synchronised=False)
    car = daemon({"gps": {"backend": "gpsd", "port": own_gpsfake.port},
                  "incident": {"post_seconds": 4}}, env={"DASHSOS_FAKE_CLOCK": str(fake)})
    wait_for(lambda: car.status()["clock_source"] == "gps", 30, "GPS time", step=0.25)
    status = car.status()
    assert near_now(status["time"]), status["time"]  # GPS time, not the Pi's
    car.wait_buffered(1)
    incident = car.trigger()["incident"]
    assert abs((id_time(incident) - datetime.now(UTC)).total_seconds()) < 30, incident
    # chrony, fed by gpsd, steps the system clock to GPS time mid-incident.
    fake_clock(fake, 0, synchronised=False)
    record = car.wait_saved(incident)
    clock = record["clock"]
    assert clock["source_at_trigger"] == "gps"
    assert abs(clock["pi_minus_gps_seconds_at_trigger"] + YEARS_S) < 30, clock
    assert [round(s["seconds"] / 86400) for s in clock["steps"]] == [YEARS_S // 86400]
    assert near_now(record["trigger"]["time"]) and near_now(record["window"]["from"])
    assert near_now(record["clip"]["start"]) and near_now(record["clip"]["end"])
    msd_time = record["msd"]["decoded"]["time"]
    assert near_now(msd_time), msd_time
    assert abs(record["msd"]["msdStructure"]["timestamp"]
               - datetime.now(UTC).timestamp()) < 30
    gpx = (car.incident_dir(incident) / "track.gpx").read_text()
    times = re.findall(r"<time>([^<]+)</time>", gpx)
    assert times and all(near_now(t, 60) for t in times), times[:3]
    assert "system clock stepped by" in car.logs()


def test_ntp_step_restates_times_written_before_it(daemon: Any, tmp_path: Path) -> None:
    fake = tmp_path / "clock.json"
    fake_clock(fake, -YEARS_S, synchronised=False)
    car = daemon({"gps": {"backend": "none"}, "incident": {"post_seconds": 4}},
                 env={"DASHSOS_FAKE_CLOCK": str(fake)})
    assert car.status()["clock_source"] == "unsynchronised"
    car.wait_buffered(1)
    incident = car.trigger()["incident"]
    first = json.loads(wait_for(
        lambda: (p := car.incident_dir(incident) / "incident.json").exists() and
        p.read_text(), 20, "the first incident.json"))
    # Nothing better known at the trigger: the Pi's clock, and the record says so.
    assert id_time(incident).year == datetime.now(UTC).year - 6
    assert first["clock"]["source_at_trigger"] == "unsynchronised"
    # NTP steps the clock and reports it synchronised.
    fake_clock(fake, 0, synchronised=True)
    record = car.wait_saved(incident)
    clock = record["clock"]
    assert clock["source"] == "ntp" and clock["source_at_trigger"] == "unsynchronised"
    assert [round(s["seconds"] / 86400) for s in clock["steps"]] == [YEARS_S // 86400]
    # Re-stated on the stepped clock: the trigger and the clip are where they were.
    assert near_now(record["trigger"]["time"]) and near_now(record["clip"]["start"])
    assert "system clock stepped by" in car.logs()
    wait_for(lambda: car.status()["clock_source"] == "ntp", 5, "ntp")


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)$")


def stamps(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every ISO 8601 time in a JSON value, with where it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from stamps(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from stamps(item, f"{path}[{i}]")
    elif isinstance(value, str) and ISO.match(value):
        yield path, value


def test_the_desk_records_gps_time_from_a_car_years_behind(
        daemon: Any, own_gpsfake: GpsFake, tmp_path: Path) -> None:
    """A car whose clock is six years behind calls the reference dispatcher on GPS time,
    then is stepped mid-call: everything of the car's that the desk keeps (the incident
    message in call.json, the fixes and position in telemetry.jsonl) is on GPS time, names
    the car's clock source, and nothing carries the car's wrong clock."""
    fake = tmp_path / "clock.json"
    fake_clock(fake, -YEARS_S, synchronised=False)
    desk = Dispatcher(tmp_path / "dispatcher")
    try:
        token = tmp_path / "call.token"
        token.write_text(CAR_TOKEN + "\n")
        car = daemon({"gps": {"backend": "gpsd", "port": own_gpsfake.port},
                      "call": {"endpoints": [desk.whip], "token_file": str(token),
                               "speaker": "none", "redial_max_seconds": 1.0},
                      "ice": {"interfaces": ["127.0.0.1"]},
                      "incident": {"post_seconds": 4}}, env={"DASHSOS_FAKE_CLOCK": str(fake)})
        wait_for(lambda: car.status()["clock_source"] == "gps", 30, "GPS time", step=0.25)
        car.wait_buffered(1)
        incident = car.trigger()["incident"]
        call = wait_for(lambda: (c := desk.connected()) and c["msd"] and len(c["trail"]) >= 2
                        and c, 20, "the MSD and fixes at the desk")
        # chrony steps the Pi's clock to GPS time mid-call; the desk asks where the car is.
        fake_clock(fake, 0, synchronised=False)
        desk.api(f"/api/calls/{call['id']}/position", method="POST")
        folder = desk.recordings / call["id"]
        wait_for(lambda: '"requested":true' in (folder / "telemetry.jsonl").read_text(), 10,
                 "the car's answer to the position request")
        time.sleep(2)  # fixes after the step
        desk.api(f"/api/calls/{call['id']}/hangup", method="POST")
        car.wait_saved(incident, timeout=30)
        wait_for(lambda: next(c for c in desk.calls() if c["id"] == call["id"])["state"]
                 == "ended", 10, "the call to end, its files finished")
    finally:
        desk.stop()
    record = json.loads((folder / "call.json").read_text())
    telemetry = [json.loads(line) for line in
                 (folder / "telemetry.jsonl").read_text().splitlines()]
    message = record["msd"]
    assert message["id"] == incident
    assert abs((id_time(message["id"]) - datetime.now(UTC)).total_seconds()) < 60
    assert message["clock_source"] == "gps"  # the car names where its times came from
    assert abs(message["msd"]["msdStructure"]["timestamp"]
               - datetime.now(UTC).timestamp()) < 60
    kinds = [line["message"].get("type") for line in telemetry]
    assert kinds[0] == "msd" and kinds.count("fix") >= 3, kinds
    answer = next(line["message"] for line in telemetry if line["message"].get("requested"))
    assert answer["clock_source"] == "gps" and near_now(answer["time"], 60)
    # Every time the desk keeps, the car's (trigger, message, MSD, fixes' receiver and
    # arrival times) and its own (started, received), is today's, none six years ago.
    found = list(stamps(record)) + [s for line in telemetry for s in stamps(line)]
    paths = {p for p, _ in found}
    assert {".msd.time", ".msd.trigger.time", ".msd.msd.decoded.time",
            ".msd.position.time", ".msd.position.received"} <= paths, paths
    assert any(p.endswith(".fix.received") for p in paths), paths
    wrong = [(p, s) for p, s in found if not near_now(s, 120)]
    assert not wrong, wrong
