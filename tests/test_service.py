"""systemd's side of the daemon: READY, watchdog pings that follow the daemon's own
liveness, STATUS a person understands (issue 5, item 2). A stalled camera is restarted
alone and shown in STATUS; it does not stop the pings (issue 9)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from conftest import Daemon, feed_camera, wait_for

WATCHDOG_USEC = 2_000_000


class FakeSystemd:
    """A NOTIFY_SOCKET listener recording each datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, field: str, since: float = 0.0) -> list[float]:
        return [t for t, m in self.messages if field in m.splitlines() and t >= since]

    def statuses(self) -> list[str]:
        return [line[7:] for _, m in self.messages for line in m.splitlines()
                if line.startswith("STATUS=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)  # before closing the socket it reads
        self.sock.close()


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]


def test_ready_watchdog_and_status_while_a_camera_stalls(daemon: Any, tmp_path: Path) -> None:
    systemd = FakeSystemd(tmp_path / "notify.sock")
    fifo = tmp_path / "camera.h264"
    os.mkfifo(fifo)
    camera = feed_camera(fifo)
    try:
        d: Daemon = daemon(
            {"video": {"backend": "ffmpeg", "input": str(fifo), "input_format": "h264"}},
            env={"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        wait_for(lambda: systemd.times("READY=1"), 20, "READY=1")
        ready = systemd.times("READY=1")[0]
        ready_status = systemd.statuses()[0]
        assert "video ok" in ready_status and "audio simulated" in ready_status, ready_status
        time.sleep(4.2)
        gaps = _gaps(systemd.times("WATCHDOG=1"))
        assert len(gaps) >= 3 and all(0.8 <= g <= 1.3 for g in gaps), gaps  # half of 2 s

        os.killpg(camera.pid, signal.SIGSTOP)  # the camera freezes: no error, no frames
        frozen = time.monotonic()
        wait_for(lambda: any("stalled" in s for s in systemd.statuses()), 10,
                 "STATUS to say the video stalled")
        stalled_at = time.monotonic()
        assert stalled_at - frozen < 6
        assert any("video degraded" in s for s in systemd.statuses())
        # Frozen for longer than the watchdog: systemd would have killed a daemon that
        # stopped pinging. The loop is alive, so the pings go on, and the camera restarts.
        time.sleep(WATCHDOG_USEC / 1e6 + 2.5)
        during = systemd.times("WATCHDOG=1", since=frozen)
        assert len(during) >= 4, _gaps(during)
        assert d.source("video")["restarts"] >= 1
        assert any("restarting" in s for s in systemd.statuses())

        os.killpg(camera.pid, signal.SIGCONT)  # it recovers
        wait_for(lambda: "video ok" in systemd.statuses()[-1], 10, "STATUS to recover")
        time.sleep(1.5)
        # Pings at half the watchdog's period from READY on, through the freeze.
        gaps = _gaps(systemd.times("WATCHDOG=1", since=ready))
        assert all(0.8 <= g <= 1.3 for g in gaps), gaps
        assert d.process.poll() is None
        assert d.stop(signal.SIGTERM) == 0
        wait_for(lambda: systemd.times("STOPPING=1"), 2, "STOPPING=1")
    finally:
        os.killpg(camera.pid, signal.SIGKILL)
        camera.wait()
        systemd.close()
