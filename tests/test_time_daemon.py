"""The daemon on a Pi that booted years off, stepped mid-run by GPS or NTP: incident ids,
incident.json times, the MSD timestamp and the GPX are right (or re-stated), the step is
logged and the record names its clock source. The daemon's system clock is moved with
DASHSOS_FAKE_CLOCK (see dashsos.clock): the host's clock stays as it is."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import GpsFake, wait_for

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
