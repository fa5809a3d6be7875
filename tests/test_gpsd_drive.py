"""Drives at 1 Hz and 5 Hz replayed by gpsfake (faster than real time: only the
receiver's time counts) through gpsd and dashsos's client into the sudden-stop detector:
every hard stop triggers once, 45 km/h to 0 in 2 s included; lost epochs, a tunnel and 2D
fixes in between trigger nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import nmea
from conftest import free_port, listening, wait_for
from dashsos import clock
from dashsos.config import AutoTriggerConfig, GpsConfig
from dashsos.location.fix import Fix
from dashsos.location.gpsd_source import GpsdSource
from dashsos.location.motion import SuddenStopDetector


@pytest.fixture(autouse=True)
def _own_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process GpsdSource feeds GPS time to the daemon's clock: these logs' times (2022,
    # 2034) must not become the wall time of later tests in this process.
    monkeypatch.setenv("DASHSOS_CLOCK_SYNC", "yes")
    monkeypatch.setattr(clock, "CLOCK", clock.Clock())


def profile(hz: int) -> tuple[list[tuple[float, int]], int]:
    """(km/h, mode) per epoch and how many stops it holds."""
    s: list[tuple[float, int]] = []

    def hold(kmh: float, seconds: float, mode: int = 3) -> None:
        s.extend([(kmh, mode)] * round(seconds * hz))

    def ramp(a: float, b: float, seconds: float) -> None:
        n = round(seconds * hz)
        s.extend([(a + (b - a) * (i + 1) / n, 3) for i in range(n)])

    hold(30, 30)  # gpsfake starts feeding at the first connection: a lead-in to lose
    hold(45, 5)
    ramp(45, 0, 2.0)  # the README's "45 km/h to 0 within 2 s"
    hold(0, 4)
    ramp(0, 60, 8)
    hold(60, 3)
    hold(0, 1, mode=1)  # a lost second: the first fix after it must not count
    hold(60, 2)
    hold(0, 1, mode=2)  # 2D fixes reading 0 km/h
    hold(60, 3)
    hold(0, 6, mode=1)  # a tunnel
    hold(0, 1 / hz)  # its first fix reads 0
    ramp(0, 108, 10)
    hold(108, 3)
    ramp(108, 0, 1.0)  # a crash
    hold(0, 4)
    ramp(0, 50, 6)
    ramp(50, 0, 6)  # ordinary braking
    hold(0, 3)
    return s, 2


@pytest.mark.parametrize("hz", [1, 5])
def test_replayed_drive_triggers_on_every_hard_stop_only(tmp_path: Path, hz: int) -> None:
    speeds, stops_expected = profile(hz)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    log = tmp_path / "drive.nmea"
    log.write_text(nmea.drive(start, hz, speeds))
    port = free_port()
    with open(tmp_path / "gpsfake.log", "wb") as output:
        fake = subprocess.Popen(["gpsfake", "-q", "-c", "0.01", "-P", str(port), str(log)],
                                stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
    detector = SuddenStopDetector(AutoTriggerConfig(gps_crash=True))
    stops: list[str] = []
    fixes: list[Fix] = []
    last_time = (start + timedelta(seconds=5 + (len(speeds) - 1) / hz)).strftime("%H:%M:%S")
    done = threading.Event()

    def deliver(fix: Fix) -> None:
        fixes.append(fix)
        stop = detector.feed(fix)
        if stop:
            stops.append(stop)
        if last_time in fix.time:
            done.set()

    source = GpsdSource(GpsConfig(backend="gpsd", port=port, timeout=2.0))
    try:
        wait_for(lambda: listening(port), 10, "gpsfake's gpsd")
        source.start(deliver)
        assert done.wait(120), (len(fixes), fixes[-1:] if fixes else None)
    finally:
        source.stop()
        try:
            os.killpg(fake.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        fake.wait()
    # Whole epochs in order, one per receiver time (the first pass of the log only).
    times = [f.receiver_ns for f in fixes]
    assert times == sorted(set(times))
    assert len(stops) == stops_expected, stops
    assert stops[0].startswith("45 km/h") and stops[1].startswith("108 km/h"), stops
