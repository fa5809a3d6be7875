"""Press to MQTT: a panic-button press (gpiozero MockFactory) that opens a new incident,
to that incident's `triggered` message at a subscriber, over a real mosquitto, next to the
floor measured in the same run: the mosquitto_pub to mosquitto_sub round trip on the same
broker. Both are received by the same mosquitto_sub, so only the sending side differs.

Every press opens a new incident (a press during an open one would only extend it, a
cheaper path): the post window is the shortest allowed (1 s) and the next press waits for
the previous incident's `evidence_saved`. The daemon runs in this process (so the bench can
drive the mock pin), with its usual load: 720p30 test video, test audio, simulated GPS,
evidence written for every incident.

  python scripts/bench_press.py [--presses N] [--json]   (or: scripts/bench press)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from dashsos import config as config_module
from dashsos import log
from dashsos.app import App
from dashsos.devices.mock import MockDevices

TARGET_P50_MS, TARGET_P99_MS = 20.0, 50.0
POST_SECONDS = 1.0  # the shortest the config allows: a quick turn-around between presses
MEASURED = "press that opens a new incident -> `triggered` at a subscriber"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: mosquitto did not listen on {port}")


class Receiver:
    """mosquitto_sub, its lines stamped as they arrive."""

    def __init__(self, port: int, topic: str) -> None:
        self.process = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", "1"],
            stdout=subprocess.PIPE, bufsize=0)
        self.lines: queue.Queue[tuple[float, bytes]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.5)  # subscribed

    def _read(self) -> None:
        assert self.process.stdout is not None
        stream: IO[bytes] = self.process.stdout
        for line in iter(stream.readline, b""):
            self.lines.put((time.monotonic(), line))

    def next(self, *containing: bytes, timeout: float = 5.0) -> tuple[float, bytes]:
        """The next line containing all of `containing` (or any line), and when it came."""
        while True:
            at, line = self.lines.get(timeout=timeout)
            if all(c in line for c in containing):
                return at, line

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def _stats(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)

    def rank(q: float) -> float:  # nearest rank: with 40 samples p99 is the maximum
        return round(ms[max(0, math.ceil(q * len(ms)) - 1)], 2)

    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p90_ms": rank(0.90),
            "p99_ms": rank(0.99), "max_ms": round(ms[-1], 2)}


def floor(port: int, count: int) -> dict[str, float]:
    receiver = Receiver(port, "bench/floor")
    pub = subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t",
                            "bench/floor", "-q", "1", "-l"], stdin=subprocess.PIPE, bufsize=0)
    assert pub.stdin is not None
    samples = []
    try:
        for i in range(count + 5):
            start = time.monotonic()
            pub.stdin.write(f"{i}\n".encode())
            got, _ = receiver.next()
            if i >= 5:  # the first few warm the connection
                samples.append(got - start)
            time.sleep(0.02)
    finally:
        pub.stdin.close()
        pub.wait(5)
        receiver.close()
    return _stats(samples)


def presses(port: int, tmp: Path, count: int) -> dict[str, Any]:
    cfg = config_module.from_dict({
        "vehicle": {"id": "bench"},
        "storage": {"dir": str(tmp / "state")},
        "control": {"socket": str(tmp / "control.sock")},
        "buffer": {"pre_seconds": 10},
        "incident": {"post_seconds": POST_SECONDS, "cancel_grace_seconds": 0,
                     "cooldown_seconds": 0},
        "video": {"backend": "test"}, "audio": {"backend": "test"},
        "gps": {"backend": "simulated"},
        "button": {"backend": "mock", "pin": "GPIO17", "bounce_seconds": 0.01,
                   "long_press_seconds": 30},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port},
        "log": {"level": "error"},
    }, source="bench")
    log.setup(cfg.log.level)  # as `dashsos run` does: errors only, not every incident
    devices = MockDevices(video=cfg.video, audio=cfg.audio, button=cfg.button)
    app = App(cfg, devices)
    receiver = Receiver(port, "dashsos/bench/incident")
    results: dict[str, Any] = {}

    def drive() -> None:
        for _ in range(200):
            link = getattr(app, "link", None)
            if link is not None and link.connected and devices.pin_factory is not None:
                break
            time.sleep(0.05)
        assert devices.pin_factory is not None
        time.sleep(3)  # buffers fill, as in a car that has been driving
        pin = devices.pin_factory.pin(17)
        samples = []
        for _ in range(count):
            start = time.monotonic()
            pin.drive_low()  # pressed (pull-up)
            at, line = receiver.next(b'"event":"triggered"')
            samples.append(at - start)
            incident = json.loads(line)["id"].encode()
            time.sleep(0.03)
            pin.drive_high()
            # Saved and signed before the next press, so that one opens a new incident.
            receiver.next(b'"event":"evidence_saved"', incident, timeout=60)
            time.sleep(0.1)
        results.update(_stats(samples))

    async def main() -> None:
        running = asyncio.create_task(app.run())
        try:
            await asyncio.to_thread(drive)
        finally:
            app.stop()
            await running

    try:
        asyncio.run(main())
    finally:
        receiver.close()
    return results


def run(count: int = 40) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dashsos-bench-press-") as name:
        tmp = Path(name)
        port = _free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))
        broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            _wait_port(port)
            floor_stats = floor(port, count)
            press_stats = presses(port, tmp, count)
        finally:
            broker.terminate()
            broker.wait(5)
    return {"presses": press_stats, "floor": floor_stats,
            "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS}}


def show(result: dict[str, Any]) -> None:
    p, f = result["presses"], result["floor"]
    print(f"press to MQTT: {p['n']} presses, each opening a new incident "
          f"(post window {POST_SECONDS:g} s), over a local mosquitto (QoS 1)")
    print(f"measured: {MEASURED}")
    rows = ((f"gpiozero {MEASURED}", p), ("floor: mosquitto_pub -> mosquitto_sub", f))
    width = max(len(label) for label, _ in rows) + 2
    keys = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
    print(f"{'what':<{width}}" + "".join(f"{k[:-3] + ' ms':>9}" for k in keys))
    for label, row in rows:
        print(f"{label:<{width}}" + "".join(f"{row[k]:>9.2f}" for k in keys))
    print(f"targets: p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms (informational)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=40, help="presses (default 40)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    numbers = run(args.presses)
    if args.json:
        print(json.dumps(numbers, indent=2))
    else:
        show(numbers)
