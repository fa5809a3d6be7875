"""Fixes from gpsd through gpsd-py3, guarded.

gpsd-py3 keeps one module-global socket with no timeout and raises a different
exception for each way of having no fix. Here it runs on a worker thread, every call
has a deadline (a timer shuts the socket down, which unblocks the read), a broken
connection is reopened with backoff, and every fault ends up as "no fix" in status.
"""

from __future__ import annotations

import contextlib
import importlib
import json
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
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _capture(self) -> None:
        gpsd = self._gpsd = importlib.import_module("gpsd")
        self._guarded(gpsd.connect, self.config.host, self.config.port)
        self._set(State.DEGRADED, f"connected to {self.describe()}, waiting for a fix")
        last_time = ""
        last_new = time.monotonic()
        while not self._stop.wait(self.config.poll_interval):
            try:
                response, tpv = self._guarded(_poll, gpsd)
            except (UserWarning, IndexError, KeyError, gpsd.NoFixError) as exc:
                # gpsd answered but has no device or no fix yet: degraded, not down.
                self._set(State.DEGRADED, f"no fix ({exc or type(exc).__name__})")
                continue
            if response.mode < 2 or not _has_position(tpv):
                # gpsd-py3 reports 0,0 when a 2D/3D TPV has no lat/lon: that is no fix.
                self._set(State.DEGRADED, "no fix (receiver has no position)")
                continue
            if response.time and response.time == last_time:
                if time.monotonic() - last_new > self.config.timeout:
                    self._set(State.DEGRADED, "no new fix: receiver silent")
                continue
            last_time, last_new = response.time, time.monotonic()
            self._deliver(_fix(response, tpv))
            self._set(State.OK, f"{response.mode}D fix")

    def _close(self) -> None:
        gpsd = self._gpsd
        sock = getattr(gpsd, "gpsd_socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
            gpsd.gpsd_socket = None


def _has_position(tpv: dict[str, Any]) -> bool:
    lat, lon = tpv.get("lat"), tpv.get("lon")
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lat, lon)) \
        and -90 <= lat <= 90 and -180 <= lon <= 180  # type: ignore[operator]


def _optional(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _poll(gpsd: Any) -> tuple[Any, dict[str, Any]]:
    """gpsd-py3's get_current(), keeping the raw TPV: gpsd-py3 reads `alt`, which gpsd
    3.20+ replaced with altMSL/altHAE, and drops eph/epv."""
    gpsd.gpsd_stream.write("?POLL;\n")
    gpsd.gpsd_stream.flush()
    raw = gpsd.gpsd_stream.readline()
    if not raw:
        raise ConnectionError("gpsd closed the connection")
    packet = json.loads(raw)
    if packet.get("class") != "POLL":
        raise ValueError(f"unexpected gpsd message {packet.get('class')!r}")
    response = gpsd.GpsResponse.from_json(packet)
    tpv = packet["tpv"][-1] if packet.get("tpv") else {}
    return response, tpv if isinstance(tpv, dict) else {}


def _fix(r: Any, tpv: dict[str, Any]) -> Fix:
    error = r.error or {}
    alt = _optional(tpv.get("altMSL", tpv.get("alt"))) if r.mode >= 3 else None
    return Fix(
        capture_ns=clock.now_ns(), time=str(r.time or ""), lat=float(r.lat), lon=float(r.lon),
        mode=int(r.mode), alt=alt,
        speed=_optional(r.hspeed), heading=_optional(r.track),
        climb=_optional(r.climb) if r.mode >= 3 else None,
        epx=_optional(error.get("x")) or None, epy=_optional(error.get("y")) or None,
        epv=_optional(tpv.get("epv")) or None, eps=_optional(error.get("s")) or None,
        satellites_used=int(r.sats_valid) if r.sats_valid else None)
