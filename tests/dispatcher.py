"""`dashsos dispatch` as a subprocess for the end-to-end tests, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port, listening, toml, wait_for

CAR_TOKEN = "car-token-e2e"
CONSOLE_TOKEN = "operator-token-e2e"


def car_token(n: int) -> str:
    return CAR_TOKEN if n == 1 else f"{CAR_TOKEN}-{n}"


class Dispatcher:
    def __init__(self, workdir: Path, *, stun_url: str | None = None, cars: int = 1,
                 dispatch: dict[str, Any] | None = None) -> None:
        """`cars`: how many cars may call; car-1 has CAR_TOKEN, car-N car_token(N);
        `dispatch`: more of the [dispatch] section."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        (workdir / "cars").write_text("".join(f"{car_token(n)} car-{n}\n"
                                              for n in range(1, cars + 1)))
        (workdir / "consoles").write_text(f"{CONSOLE_TOKEN} alice\n")
        self.recordings = workdir / "recordings"
        config: dict[str, dict[str, Any]] = {
            "dispatch": {"listen": "127.0.0.1", "port": self.port,
                         "car_tokens_file": str(workdir / "cars"),
                         "console_tokens_file": str(workdir / "consoles"),
                         "recordings_dir": str(self.recordings), **(dispatch or {})},
            "ice": {"interfaces": ["127.0.0.1"], **({"stun_urls": [stun_url]}
                                                   if stun_url else {})},
            "log": {"level": "info"},
        }
        self.config = workdir / "dispatch.toml"
        self.config.write_text(toml(config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.whip = f"{self.url}/whip"
        self.log = workdir / "dispatch.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dashsos", "--config", str(self.config), "dispatch"],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        wait_for(self._listening, 20, "the dispatcher to listen")

    def _listening(self) -> bool:
        return listening(self.port)

    def api(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, data=body,
            headers={"Authorization": f"Bearer {CONSOLE_TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def calls(self) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = self.api("/api/calls")["calls"]
        return calls

    def connected(self) -> dict[str, Any] | None:
        return next((c for c in self.calls() if c["state"] == "connected"), None)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
