"""`dashsos run` in the test's own process on a thread, built with mock devices, for
tests that drive the mock button and LED pins directly."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import wait_for
from dashsos import config
from dashsos.app import App
from dashsos.devices.mock import MockDevices
from dashsos.triggers import control_socket
from dispatcher import CAR_TOKEN, Dispatcher

REDIAL_BOUND_S = 2.0  # call.redial_max_seconds below: the longest a re-dial may wait


class RunningApp:
    """`dashsos run` on a thread of its own, built with mock devices."""

    def __init__(self, tmp_path: Path, devices: MockDevices, **sections: dict[str, Any]) -> None:
        self.state = tmp_path / "state"
        self.socket = tmp_path / "control.sock"
        raw: dict[str, dict[str, Any]] = {
            "storage": {"dir": str(self.state)}, "control": {"socket": str(self.socket)},
            "buffer": {"pre_seconds": 2},
            "incident": {"post_seconds": 2, "cancel_grace_seconds": 5},
            "ice": {"interfaces": ["127.0.0.1"]}}
        for section, keys in sections.items():
            raw.setdefault(section, {}).update(keys)
        self.app = App(config.from_dict(raw), devices=devices)
        self.devices = devices
        self.loop = asyncio.new_event_loop()
        self.result: list[int] = []
        self.thread = threading.Thread(target=self._run, name="app", daemon=True)
        self.thread.start()
        wait_for(lambda: self.socket.exists() and devices.pin_factory is not None, 20,
                 "the daemon to listen")

    def _run(self) -> None:
        self.result.append(self.loop.run_until_complete(self.app.run()))

    def request(self, cmd: str) -> dict[str, Any]:
        return control_socket.request(self.socket, {"cmd": cmd})

    def press(self, seconds: float = 0.1) -> None:
        pin = self.devices.pin_factory.pin(17)
        pin.drive_low()
        time.sleep(seconds)
        pin.drive_high()

    def record(self, incident: str) -> dict[str, Any] | None:
        path = self.state / "incidents" / incident / "incident.json"
        return json.loads(path.read_text()) if path.exists() else None

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.app.stop)
            self.thread.join(30)
        assert not self.thread.is_alive(), "the daemon did not stop"


@contextmanager
def apps(tmp_path: Path, **defaults: dict[str, Any]) -> Iterator[Callable[..., RunningApp]]:
    """Starts cars (RunningApp) on demand; stops every one at the end."""
    started: list[RunningApp] = []

    def start(devices: MockDevices, **sections: dict[str, Any]) -> RunningApp:
        app = RunningApp(tmp_path / f"car{len(started)}", devices, **{**defaults, **sections})
        started.append(app)
        return app

    try:
        yield start
    finally:
        for app in started:
            app.stop()


def call_section(tmp_path: Path, dispatcher: Dispatcher) -> dict[str, Any]:
    token = tmp_path / "call.token"
    token.write_text(CAR_TOKEN + "\n")
    return {"endpoints": [dispatcher.whip], "token_file": str(token),
            "redial_max_seconds": REDIAL_BOUND_S}


def calls_connected(dispatcher: Dispatcher) -> list[dict[str, Any]]:
    return [c for c in dispatcher.calls() if c["state"] == "connected"]
