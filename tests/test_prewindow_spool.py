"""The pre-window is durable fast (issue 12): at the trigger the buffered packets go to an
append-only spool with one fsync; a car killed 25, 100 and 250 ms after the trigger was
answered, with a 30 s pre-window, plays at least 29 s of it after the restart.

Twice: SIGKILL alone on the normal file system (the page cache survives: the spool is
written and turned into a clip by recovery in time), and SIGKILL followed by a power cut
of powercutfs (only what was fsynced, file data and directory entries, survives: the
fsyncs are the right ones and come in time). The trigger is answered once the spool is
durable: on powercutfs that takes 12-70 ms, so a kill 25 ms after an answer that did not
wait lost the pre-window about every other run."""

from __future__ import annotations

import re
import time
from contextlib import ExitStack
from pathlib import Path

import clipcheck
from conftest import wait_for
from powercutfs import PowerCutFS
from test_faults import Car, car_config, record_of

DELAYS_MS = (25, 100, 250)
PRE_S = 30


def test_killed_just_after_a_trigger_keeps_the_pre_window(tmp_path: Path) -> None:
    killed_and_restarted(tmp_path, {})


def test_power_cut_just_after_a_trigger_keeps_the_pre_window(tmp_path: Path) -> None:
    with ExitStack() as mounts:
        disks = {delay: mounts.enter_context(PowerCutFS(tmp_path / f"disk{delay}"))
                 for delay in DELAYS_MS}
        killed_and_restarted(tmp_path, disks)


def killed_and_restarted(tmp_path: Path, disks: dict[int, PowerCutFS]) -> None:
    """Each car is killed `delay` ms after its trigger was answered, its disk (if it has
    one) cut with it; after the restart its clip must hold the pre-window."""
    cars = []
    for delay in DELAYS_MS:
        work = tmp_path / f"car{delay}"
        work.mkdir()
        disk = disks.get(delay)
        state = (disk.mount_point if disk else work) / "state"
        config = car_config(work, state, buffer={"pre_seconds": PRE_S},
                            incident={"post_seconds": 10, "cancel_grace_seconds": 0})
        car = Car(work, config, "run0")
        cars.append((delay, work, state, config, car))
    for _, _, _, _, car in cars:
        car.up()

    def buffered(car: Car) -> bool:
        sources = car.status()["sources"]
        return all(sources[s].get("buffered_seconds", 0) >= PRE_S + 0.5
                   for s in ("video", "audio"))

    results = {}
    for delay, work, state, config, car in cars:
        wait_for(lambda car=car: buffered(car), 90, f"{PRE_S} s buffered", step=0.5)
        incident = car.request("trigger")["incident"]
        answered = time.monotonic()
        time.sleep(max(0.0, answered + delay / 1000 - time.monotonic()))
        killed_ms = (time.monotonic() - answered) * 1000  # the signal goes now
        car.kill()
        if (disk := disks.get(delay)) is not None:
            disk.cut()  # the power goes with the car
            disk.mount()
        spooled = re.search(r"pre-window spooled \((\d+) packets, (\d+) bytes\) in (\d+) ms",
                            car.logs())
        again = Car(work, config, "run1")
        again.up()
        record = record_of(state, incident)
        assert record is not None and record["status"] == "recovered", record
        facts = clipcheck.check_clip(state / "incidents" / incident / "clip.mp4")
        again.stop()
        results[delay] = (round(killed_ms), facts.duration,
                          spooled.group(3) if spooled else "not logged", record["recovery"])
        print(f"killed {killed_ms:.0f} ms after the trigger: clip {facts.duration:.1f} s; "
              f"spool durable in {results[delay][2]} ms; {record['recovery']}")
    for delay, (_, duration, _, notes) in results.items():
        assert duration >= PRE_S - 1, (delay, duration, notes)
