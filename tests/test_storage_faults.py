"""Storage failure is a state, not an exception (issue 12): a storage that fills during
an incident, and one that is read-only from the start. Real mounts (tmpfs, read-only
bind), a real mosquitto and a real WHIP server; every mount is undone even on failure."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clipcheck
from conftest import Daemon, wait_for
from mqttbroker import Broker, Subscriber
from test_faults import call_section, stop_whip
from whipserver import WhipServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "broker").mkdir()
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def whip() -> Iterator[WhipServer]:
    w = WhipServer()
    yield w
    stop_whip(w)


def _config(tmp_path: Path, state: Path, broker: Broker, whip: WhipServer,
            **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    config: dict[str, dict[str, Any]] = {
        "storage": {"dir": str(state)},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                 "status_interval": 1.0, "keepalive": 5},
        "call": call_section(tmp_path, whip, "whip"),
        "ice": {"interfaces": ["127.0.0.1"]},
        "incident": {"cancel_grace_seconds": 0, "cooldown_seconds": 0},
        "log": {"level": "info"},
    }
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    return config


def _trigger(d: Daemon) -> tuple[str, float]:
    start = time.monotonic()
    reply = d.trigger()
    took = time.monotonic() - start
    assert took < 1.0, took
    return str(reply["incident"]), took


def _final(desk: Subscriber, incident: str, timeout: float = 40) -> dict[str, Any]:
    return desk.wait_json("/incident", lambda m: m["id"] == incident and m["event"] in (
        "evidence_saved", "evidence_failed"), timeout, f"{incident} saved or failed")


def _fill(path: Path) -> None:
    """Fill the file system that holds `path` to the last byte."""
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        for size in (1 << 16, 1 << 12, 1):  # the last few bytes too
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def test_storage_fills_mid_incident_then_returns(tmp_path: Path, daemon: Any,
                                                 broker: Broker, whip: WhipServer,
                                                 mounts: list[Path]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _mount("-t", "tmpfs", "-o", "size=30m", "tmpfs", str(state))
    mounts.append(state)
    desk = Subscriber(broker.port, "dashsos/+/incident")
    try:
        d: Daemon = daemon(_config(tmp_path, state, broker, whip,
                                   incident={"post_seconds": 4}))
        d.wait_buffered(3)
        first, t1 = _trigger(d)
        desk.wait_json("/incident", lambda m: m["id"] == first and m["event"] == "triggered")
        ballast = state / "ballast"
        _fill(ballast)  # fills during the incident's post window
        wait_for(lambda: d.status()["storage"]["state"] == "full", 10, "storage full",
                 step=0.1)
        end1 = _final(desk, first)
        assert end1["event"] == "evidence_saved" or end1["details"].get("reason"), end1

        second, t2 = _trigger(d)  # while full
        assert second != first
        desk.wait_json("/incident", lambda m: m["id"] == second and m["event"] == "triggered")
        status = d.status()
        assert status["storage"]["state"] == "full", status["storage"]
        end2 = _final(desk, second)
        assert end2["event"] == "evidence_failed" and "full" in end2["details"]["reason"], end2

        ballast.unlink()  # space returns
        wait_for(lambda: d.status()["storage"]["state"] == "ok", 10, "storage ok again",
                 step=0.2)
        d.wait_buffered(3)
        third, t3 = _trigger(d)
        assert third not in (first, second)
        desk.wait_json("/incident", lambda m: m["id"] == third and m["event"] == "triggered")
        assert _final(desk, third)["event"] == "evidence_saved"
        facts = clipcheck.check_clip(d.incident_dir(third) / "clip.mp4")
        assert facts.duration >= 3 + 4 - 1.5, facts
        # The messages kept in memory while full reached the outbox and the broker.
        events = [(m["id"], m["event"]) for m in desk.json("/incident")]
        for incident in (first, second, third):
            mine = [e for i, e in events if i == incident]
            assert mine[0] == "triggered", (incident, mine)
        logs = d.logs()
        transitions = [line for line in logs.splitlines() if "diskstate: storage" in line]
        assert len(transitions) <= 4, transitions  # once per change, not every second
        print(f"trigger replies: {t1 * 1000:.0f} {t2 * 1000:.0f} {t3 * 1000:.0f} ms")
        assert d.stop() == 0
    finally:
        desk.close()


def test_read_only_storage_at_start_still_calls_and_publishes(
        tmp_path: Path, daemon: Any, broker: Broker, whip: WhipServer,
        mounts: list[Path]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _mount("--bind", str(state), str(state))
    mounts.append(state)
    _mount("-o", "remount,bind,ro", str(state))
    desk = Subscriber(broker.port, "dashsos/+/incident")
    try:
        d: Daemon = daemon(_config(tmp_path, state, broker, whip,
                                   incident={"post_seconds": 3}))
        assert d.status()["storage"]["state"] == "read-only"
        d.wait_buffered(2)
        incident, took = _trigger(d)
        desk.wait_json("/incident", lambda m: m["id"] == incident and m["event"] == "triggered")
        wait_for(lambda: any(s.video_frames > 10 for s in list(whip.sessions.values())), 15,
                 "the dispatcher to see video")
        end = _final(desk, incident)
        assert end["event"] == "evidence_failed" and "read-only" in end["details"]["reason"]
        assert d.stop() == 0
    finally:
        desk.close()
