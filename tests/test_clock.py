"""The time model: steps of the system clock are followed, logged and recorded; GPS time
is trusted when the system clock is not synchronised."""

from __future__ import annotations

import logging

import pytest

from dashsos import clock
from dashsos.clock import NS

YEARS = 6 * 365 * 86400 * NS  # how far behind a Pi can boot (fake-hwclock of an old image)
REAL = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z, what GPS says it is (at monotonic 0)


class Wall:
    """An injectable system clock: wall minus monotonic, as a test sets it."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self) -> int:
        return self.offset


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Wall:
    w = Wall(REAL - YEARS)
    monkeypatch.setattr(clock, "_system_offset_ns", w)
    monkeypatch.setenv("DASHSOS_CLOCK_SYNC", "no")
    monkeypatch.setattr(clock, "CLOCK", clock.Clock())
    return w


def test_unsynchronised_clock_says_so(wall: Wall) -> None:
    assert clock.source() == "unsynchronised"
    assert clock.to_wall_ns(0) == REAL - YEARS  # nothing better known yet


def test_gps_time_is_trusted_when_the_clock_is_not_synchronised(wall: Wall) -> None:
    at = clock.now_ns()
    clock.observe_gps(REAL + at, at)  # a fix valid at `at`, received at `at`
    assert clock.source() == "gps"
    assert clock.to_wall_ns(at) == REAL + at
    record = clock.record(clock.now_ns())  # a trigger after the fix
    assert record["source_at_trigger"] == "gps"
    assert record["pi_minus_gps_seconds_at_trigger"] == pytest.approx(-YEARS / NS)


def test_gps_close_to_the_clock_keeps_the_clock(wall: Wall) -> None:
    wall.offset = REAL + NS // 2  # half a second off: within GPS's own delivery delay
    at = clock.now_ns()
    clock.observe_gps(REAL + at, at)
    assert clock.source() == "gps"
    assert clock.to_wall_ns(at) == REAL + NS // 2 + at


def test_a_step_is_followed_logged_and_recorded(wall: Wall, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    trigger = clock.now_ns()
    before = clock.iso(trigger)
    assert before.startswith("2020-")
    wall.offset = REAL  # NTP steps the clock forward by years
    monkeypatch.setenv("DASHSOS_CLOCK_SYNC", "yes")
    with caplog.at_level(logging.WARNING, logger="dashsos.clock"):
        after = clock.iso(trigger)  # the same moment, re-stated on the new mapping
    assert after.startswith("2026-01-01T")
    assert any("stepped by" in r.getMessage() for r in caplog.records)
    clock.CLOCK._synced_checked -= 2 * NS  # the kernel is asked again at most once a second
    record = clock.record(trigger)
    assert record["source"] == "ntp" and record["source_at_trigger"] == "unsynchronised"
    assert [round(s["seconds"]) for s in record["steps"]] == [YEARS // NS]
    assert record["steps"][0]["at"].startswith("2026-")


def test_a_small_slew_is_not_a_step(wall: Wall) -> None:
    wall.offset += NS // 2
    clock.CLOCK.check()
    assert not clock.CLOCK.steps


def test_kernel_is_asked_without_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHSOS_CLOCK_SYNC", raising=False)
    assert clock.kernel_synchronised() in (True, False, None)


def test_gps_mapping_outlives_a_gps_outage(wall: Wall) -> None:
    at = clock.now_ns() - 60 * NS  # the last fix, a minute ago
    clock.observe_gps(REAL + at, at)
    assert clock.source() == "gps"  # wall times still come from GPS, via monotonic time
    assert clock.to_wall_ns(at + 60 * NS) == REAL + at + 60 * NS


def test_a_stale_gps_time_no_longer_vouches_for_a_right_clock(wall: Wall) -> None:
    wall.offset = REAL
    at = clock.now_ns() - 60 * NS
    clock.observe_gps(REAL + at, at)
    assert clock.source() == "unsynchronised"
