"""Fixes from gpsd through gpsd-py3, guarded.

gpsd-py3 keeps one module-global socket with no timeout and raises a different
exception for each way of having no fix. Here it runs on a worker thread, every call
has a deadline (a timer shuts the socket down, which unblocks the read), a broken
connection is reopened with backoff, and every fault ends up as "no fix" in status.
"""

from __future__ import annotations

import importlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from dashsos import clock
from dashsos.config import GpsConfig
from dashsos.health import State
from dashsos.location.fix import Fix
from dashsos.media.source import Source

R = TypeVar("R")


class GpsdSource(Source[Fix]):
    kind = "gps"

    def __init__(self, config: GpsConfig) -> None:
        super().__init__("gpsd")
        self.config = config
        self._gpsd: Any = None

    def describe(self) -> str:
        return f"gpsd at {self.config.host}:{self.config.port}"

    def _guarded(self, call: Callable[..., R], *args: Any) -> R:
        timer = threading.Timer(self.config.timeout, self._abort)
        timer.daemon = True
        timer.start()
        try:
            return call(*args)
        finally:
            timer.cancel()

    def _abort(self) -> None:
        sock = getattr(self._gpsd, "gpsd_socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _capture(self) -> None:
        gpsd = self._gpsd = importlib.import_module("gpsd")
        self._guarded(gpsd.connect, self.config.host, self.config.port)
        self._set(State.DEGRADED, f"connected to {self.describe()}, waiting for a fix")
        last_time = ""
        last_new = time.monotonic()
        while not self._stop.wait(self.config.poll_interval):
            try:
                response = self._guarded(gpsd.get_current)
            except (UserWarning, IndexError, KeyError, gpsd.NoFixError) as exc:
                # gpsd answered but has no device or no fix yet: degraded, not down.
                self._set(State.DEGRADED, f"no fix ({exc or type(exc).__name__})")
                continue
            if response.mode < 2:
                self._set(State.DEGRADED, "no fix (receiver has no position)")
                continue
            if response.time and response.time == last_time:
                if time.monotonic() - last_new > self.config.timeout:
                    self._set(State.DEGRADED, "no new fix: receiver silent")
                continue
            last_time, last_new = response.time, time.monotonic()
            self._deliver(_fix(response))
            self._set(State.OK, f"{response.mode}D fix")

    def _close(self) -> None:
        gpsd = self._gpsd
        sock = getattr(gpsd, "gpsd_socket", None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
            gpsd.gpsd_socket = None


def _optional(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _fix(r: Any) -> Fix:
    error = r.error or {}
    return Fix(
        capture_ns=clock.now_ns(), time=str(r.time or ""), lat=float(r.lat), lon=float(r.lon),
        mode=int(r.mode), alt=_optional(r.alt) if r.mode >= 3 else None,
        speed=_optional(r.hspeed), heading=_optional(r.track),
        climb=_optional(r.climb) if r.mode >= 3 else None,
        epx=_optional(error.get("x")) or None, epy=_optional(error.get("y")) or None,
        epv=_optional(error.get("v")) or None, eps=_optional(error.get("s")) or None,
        satellites_used=int(r.sats_valid) if r.sats_valid else None)
