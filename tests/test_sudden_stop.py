"""The GPS sudden-stop trigger on simulated drives at 1 Hz and 5 Hz: every hard stop
triggers once, ten minutes of ordinary driving with dropouts, jitter and 2D fixes
trigger nothing. Fed straight to the detector (receiver time, so no real minutes pass);
tests/test_gpsd_drive.py replays a drive through gpsfake and gpsd."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest

from dashsos.clock import NS
from dashsos.config import AutoTriggerConfig
from dashsos.location.fix import Fix
from dashsos.location.motion import SuddenStopDetector

T0 = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z: receiver time of the drive's start
Profile = Callable[[float], float]  # seconds -> km/h


def detector() -> SuddenStopDetector:
    return SuddenStopDetector(AutoTriggerConfig(gps_crash=True))  # the documented defaults


def fix(t: float, kmh: float, mode: int = 3, received_jitter: float = 0.0) -> Fix:
    return Fix(capture_ns=int((t + received_jitter) * NS), time="", lat=48.0, lon=11.0,
               mode=mode, speed=kmh / 3.6, epx=5.0, epy=5.0, receiver_ns=T0 + round(t * NS))


def samples(hz: int, seconds: float, phase: float = 0.0) -> Iterator[float]:
    n = int(seconds * hz)
    for i in range(n):
        yield i / hz + phase


def braking(v0: float, start: float, duration: float) -> Profile:
    """Cruise at v0, then brake linearly to 0 over `duration` seconds."""
    def speed(t: float) -> float:
        if t < start:
            return v0
        return max(0.0, v0 * (1 - (t - start) / duration))
    return speed


def run(d: SuddenStopDetector, fixes: list[Fix]) -> list[str]:
    return [stop for f in fixes if (stop := d.feed(f))]


@pytest.mark.parametrize("hz", [1, 5])
@pytest.mark.parametrize(("v0", "duration"), [
    (45, 2.0), (50, 1.5), (60, 1.0), (80, 2.0), (108, 0.5), (108, 2.0), (130, 1.0)])
def test_every_hard_stop_triggers_once(hz: int, v0: float, duration: float) -> None:
    # At every phase of the receiver's cycle relative to the braking.
    for phase in [i / 10 for i in range(10)]:
        profile = braking(v0, 10 + phase / hz, duration)
        fixes = [fix(t, profile(t)) for t in samples(hz, 20)]
        stops = run(detector(), fixes)
        assert len(stops) == 1, (hz, v0, duration, phase, stops)


@pytest.mark.parametrize("hz", [1, 5])
def test_hard_stop_with_receipt_jitter_and_bursts(hz: int) -> None:
    """Fixes arrive late and in bursts; only receiver time matters."""
    rnd = random.Random(3)
    profile = braking(45, 10.3, 2.0)
    fixes = [fix(t, profile(t), received_jitter=rnd.uniform(0, 1.5)) for t in samples(hz, 20)]
    assert len(run(detector(), fixes)) == 1


@pytest.mark.parametrize("hz", [1, 5])
def test_normal_braking_is_not_a_stop(hz: int) -> None:
    for v0, duration in [(50, 5.0), (60, 6.0), (120, 12.0), (45, 4.0)]:
        profile = braking(v0, 10, duration)
        assert run(detector(), [fix(t, profile(t)) for t in samples(hz, 30)]) == [], \
            (v0, duration)


def ordinary_drive(hz: int, seconds: int, seed: int) -> list[Fix]:
    """Town and highway driving with every kind of bad reception but no crash:
    comfortable stops (about 2.5 m/s2), speed jitter, single-epoch losses, tunnels (the
    first fix after them reads 0 km/h), 2D fixes reading 0, untrusted fixes, one-fix
    glitches to 0, repeated epochs."""
    rnd = random.Random(seed)
    out: list[Fix] = []
    t, v = 0.0, 0.0
    dt = 1 / hz
    target, hold = 50.0, 0.0
    outage_until = -1.0
    while t < seconds:
        if hold <= 0:  # a new leg: a traffic light, a town street or the highway
            target = rnd.choice([0.0, 30.0, 50.0, 60.0, 100.0, 120.0])
            hold = rnd.uniform(10, 60)
        hold -= dt
        step = (2.5 if target < v else 2.0) * 3.6 * dt  # km/h per sample
        v = max(0.0, min(target, v + step) if target > v else max(target, v - step))
        t += dt
        if t < outage_until:
            continue  # no fix at all
        measured = max(0.0, v + rnd.gauss(0, 1.5))
        r = rnd.random()
        if r < 0.01 * 5 / hz:  # a tunnel or a car park: 5 to 40 s without a fix
            outage_until = t + rnd.uniform(5, 40)
            out.append(fix(outage_until + dt, 0.0))  # first fix after it reads 0
            t = outage_until + dt
            continue
        if r < 0.05:
            continue  # one epoch lost
        if r < 0.08:
            out.append(fix(t, 0.0, mode=2))  # 2D, speed 0
            continue
        if r < 0.09:
            bad = fix(t, 0.0)
            out.append(Fix(**{**_fields(bad), "epx": 80.0}))  # untrusted position
            continue
        if r < 0.095:
            out.append(fix(t, 0.0))  # a single glitch to 0 km/h
            continue
        if r < 0.10 and out:
            out.append(out[-1])  # gpsd repeated the epoch
            continue
        out.append(fix(t, measured))
    return out


def _fields(f: Fix) -> dict[str, object]:
    return {name: getattr(f, name) for name in f.__dataclass_fields__}


@pytest.mark.parametrize("hz", [1, 5])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ten_minutes_of_driving_trigger_nothing(hz: int, seed: int) -> None:
    fixes = ordinary_drive(hz, 600, seed)
    assert fixes[-1].receiver_ns is not None
    assert (fixes[-1].receiver_ns - T0) / NS >= 590
    assert run(detector(), fixes) == []


@pytest.mark.parametrize("hz", [1, 5])
def test_the_same_drive_with_a_crash_triggers_once(hz: int) -> None:
    fixes = ordinary_drive(hz, 300, 1)
    end = (fixes[-1].receiver_ns - T0) / NS  # type: ignore[operator]
    crash = braking(90, end + 5, 1.0)
    fixes += [fix(end + 1 + t, crash(end + 1 + t)) for t in samples(hz, 20)]
    stops = run(detector(), fixes)
    assert len(stops) == 1 and "90 km/h" in stops[0], stops


def test_first_fix_after_a_loss_does_not_complete_a_stop() -> None:
    d = detector()
    assert run(d, [fix(t, 60) for t in samples(5, 5)]) == []
    assert d.feed(fix(5.2, 0.0)) is None  # 2 epochs lost at 5 Hz: a dropout, not a stop
    assert d.feed(fix(5.4, 0.0)) is None


def test_lower_mode_breaks_the_chain() -> None:
    d = detector()
    assert run(d, [fix(0, 70), fix(1, 70), fix(2, 0, mode=2), fix(3, 0), fix(4, 0)]) == []


def test_stop_needs_confirmation() -> None:
    d = detector()
    assert run(d, [fix(0, 60), fix(1, 60), fix(2, 0), fix(3, 60), fix(4, 60)]) == []
    stops = run(d, [fix(5, 60), fix(6, 0), fix(7, 0)])
    assert stops == ["60 km/h to 0 km/h in 1.0 s (receiver time)"]
    assert run(d, [fix(8, 0), fix(9, 3), fix(10, 0)]) == []  # one trigger per stop
