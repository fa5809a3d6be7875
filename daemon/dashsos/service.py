"""Telling systemd the truth: READY, WATCHDOG (while the daemon itself lives), STATUS, STOPPING.

sd_notify is one datagram to $NOTIFY_SOCKET ('@' means the abstract namespace); no
library is needed. The watchdog pings at half of WATCHDOG_USEC while the daemon itself
lives: its event loop runs (the pings come from it) and its evidence writer makes
progress. A stalled device is not the daemon: the device restarts on its own and the
call, the other devices and the recording go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and mine else 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def _send(self, message: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:  # systemd gone (shutdown): nothing to tell
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping: finishing the open incident")


READY_TIMEOUT_S = 15.0  # READY=1 by then even if a source is still down: say so in STATUS


async def supervise(notifier: Notifier, *, summary: Callable[[], str],
                    ready: Callable[[], bool], stuck: Callable[[], list[str]]) -> None:
    """READY once the sources are up (or after READY_TIMEOUT_S, degraded); then STATUS on
    change and WATCHDOG while nothing of the daemon's own is stuck."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not ready() and loop.time() - started < READY_TIMEOUT_S:
        await asyncio.sleep(0.2)
    notifier.ready(summary())
    log.info("ready: %s", summary())
    interval = notifier.watchdog_seconds / 2 if notifier.watchdog_seconds else 1.0
    last_ping = 0.0
    was_stuck: list[str] = []
    while True:
        notifier.status(summary())
        now_stuck = stuck()
        if now_stuck and now_stuck != was_stuck:
            log.error("not pinging the watchdog: evidence writer stuck for %s",
                      ", ".join(now_stuck))
        was_stuck = now_stuck
        if not now_stuck and loop.time() - last_ping >= interval - 0.05:
            notifier.watchdog()
            last_ping = loop.time()
        await asyncio.sleep(min(interval, 0.5))
