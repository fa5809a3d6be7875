"""A press through the whole path, in process with mock devices (issue 9): the mock
button, the incident machine, the call to the reference dispatcher, the evidence."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import wait_for
from dashsos.call.talkback import Speaker
from dashsos.devices.mock import MockDevices
from dispatcher import Dispatcher
from inprocess import REDIAL_BOUND_S, RunningApp, apps, call_section, calls_connected


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[..., RunningApp]]:
    with apps(tmp_path) as start:
        yield start


def test_coerced_cancel_then_press_calls_again(tmp_path: Path, dispatcher: Dispatcher,
                                               start_app: Callable[..., RunningApp]) -> None:
    car = start_app(MockDevices(), call=call_section(tmp_path, dispatcher))
    car.press()
    first = wait_for(dispatcher.connected, 15, "the dispatcher to answer the press")
    car.press(0.8)  # the cancel gesture, forced by an attacker: the call goes down
    wait_for(lambda: not calls_connected(dispatcher), 10, "the car to hang up")
    status = car.request("status")["status"]
    assert status["incident"]["cancelled"] is not None
    pressed = time.monotonic()
    car.press()  # the driver presses again
    second = wait_for(lambda: next((c for c in calls_connected(dispatcher)
                                    if c["id"] != first["id"]), None),
                      15, "a new call after the re-press", step=0.02)
    took = time.monotonic() - pressed
    print(f"re-press to the dispatcher's connected call: {took:.2f} s")
    assert took < REDIAL_BOUND_S + 1.0, took  # dialed at once, not after a backoff
    incident = status["incident"]["id"]
    assert second and car.request("status")["status"]["incident"]["cancelled"] is None
    record = car.record(incident)
    assert record is not None and record["cancelled"] is None
    assert [t["kind"] for t in record["triggers"]] == ["panic_button", "panic_button"]


def test_long_press_on_a_test_incident_leaves_it_a_test(
        tmp_path: Path, start_app: Callable[..., RunningApp]) -> None:
    car = start_app(MockDevices(), incident={"post_seconds": 1, "cancel_grace_seconds": 5})
    reply = car.request("test")  # an installer checks the car
    car.press(0.8)  # and cancels it with the long press
    record = wait_for(lambda: (r := car.record(reply["incident"])) and
                      r["status"] in ("saved", "failed") and r, 20, "the test incident saved")
    assert record["status"] == "saved"
    assert record["test"] is True and record["cancelled"] is not None
    assert record["msd"]["msdStructure"]["control"]["testCall"] is True
    assert [t["kind"] for t in record["triggers"]] == ["local"]  # the hold extended nothing


def test_dead_speaker_at_call_end_never_freezes_the_loop(
        tmp_path: Path, dispatcher: Dispatcher, start_app: Callable[..., RunningApp],
        monkeypatch: pytest.MonkeyPatch) -> None:
    class DeadSpeakerDevices(MockDevices):
        """A real pyaudio speaker whose device does not exist: its thread dies at once."""

        def speaker(self) -> Callable[[], Speaker] | None:
            return lambda: Speaker("no such sound device")

    monkeypatch.setenv("PULSE_SERVER", "unix:/nonexistent")  # no sound server at all
    car = start_app(DeadSpeakerDevices(), call=call_section(tmp_path, dispatcher))
    car.press()
    call = wait_for(dispatcher.connected, 15, "the dispatcher to answer")
    time.sleep(2)  # far more than 50 frames of the dispatcher's audio
    latencies: list[float] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            started = time.monotonic()
            car.request("status")
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        dispatcher.api(f"/api/calls/{call['id']}/hangup", method="POST")
        wait_for(lambda: car.request("status")["status"]["links"]["call"]["call_state"]
                 == "idle", 10, "the car to see the hang-up")
        time.sleep(1.0)
    finally:
        stop.set()
        asker.join(10)
    print(f"status during the call's end: {len(latencies)} answers, "
          f"slowest {max(latencies) * 1000:.1f} ms")
    assert len(latencies) > 20 and max(latencies) < 0.1, max(latencies)
    speaker = car.request("status")["status"]["sources"]["speaker"]
    assert speaker["state"] == "down", speaker
