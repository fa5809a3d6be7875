"""Fixes from gpsd's streamed JSON reports, one whole epoch at a time.

Why our own client, not gpsd-py3 nor gpsd's `gps` module: gpsd-py3 only polls (`?POLL`
answers while gpsd is still assembling the epoch) and fills absent fields with 0, so a
receiver without a course read as "heading north". gpsd's own `gps` module streams
honestly but comes from Debian's python3-gps for the system Python only (the PyPI `gps`
is unrelated and old). gpsd's protocol is JSON lines (`?WATCH={"enable":true,"json":true}`,
documented in gpsd_json(5)); reading it takes a socket and json.loads, and keeps every
field as gpsd sent it: absent stays unknown.

Epochs: gpsd sends a TPV whenever a sentence adds to the fix; after it has learnt some
receivers' cycle it sends one at the cycle's end, but with others (and always at first)
several TPVs for one receiver time follow each other, each more complete (a SiRF's GGA
brings the position and gpsd's own position-difference speed, its RMC the receiver's
speed and course). We hold the last TPV of a time and deliver it when
- a TPV of another receiver time arrives (the held epoch is surely whole; the fields it
  has are added to what this receiver's whole epoch carries), or
- it already carries every field learnt so (no waiting in the steady state), or
- gpsd has been quiet for `epoch_settle` seconds (the last epoch before an outage).
A TPV without a receiver time cannot be placed on the receiver's clock: not delivered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import socket
import time
from typing import Any

from dashsos import clock
from dashsos.config import GpsConfig
from dashsos.health import State
from dashsos.location.fix import Fix, parse_time_ns
from dashsos.media.source import Source

WATCH = b'?WATCH={"enable":true,"json":true};\n'
MAX_LINE = 1 << 16
# The TPV fields whose presence tells a whole epoch from a part of one.
EPOCH_FIELDS = frozenset({"lat", "lon", "altMSL", "alt", "speed", "track", "climb", "epx",
                          "epy", "epv", "eps"})  # a SKY with 100 satellites is about 10 kB


class GpsdSource(Source[Fix]):
    kind = "gps"

    def __init__(self, config: GpsConfig) -> None:
        super().__init__("gpsd")
        self.config = config
        self._sock: socket.socket | None = None

    def describe(self) -> str:
        return f"gpsd at {self.config.host}:{self.config.port}"

    def _capture(self) -> None:
        sock = self._sock = socket.create_connection(
            (self.config.host, self.config.port), timeout=self.config.timeout)
        sock.sendall(WATCH)
        self._set(State.DEGRADED, f"connected to {self.describe()}, waiting for a fix")
        epochs = EpochAssembler()
        buffer = b""
        last_fix = time.monotonic()
        settle = self.config.epoch_settle
        while not self._stop.is_set():
            # Short reads so a finished epoch is delivered `settle` after gpsd went quiet.
            sock.settimeout(settle if epochs.pending else min(settle, 0.5))
            try:
                chunk = sock.recv(8192)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                raise ConnectionError("gpsd closed the connection")
            now = time.monotonic()
            if chunk:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_LINE:
                    buffer = b""  # garbage without newlines: drop it, keep the connection
                for line in lines:
                    for fix in epochs.feed(line, clock.now_ns()):
                        self._emit(fix)
                        last_fix = now
            elif epochs.pending:
                held = epochs.flush()
                if held is not None:
                    self._emit(held)
                    last_fix = now
            if epochs.no_fix:
                self._set(State.DEGRADED, "no fix (receiver reports none)")
            elif now - last_fix > self.config.timeout:
                self._set(State.DEGRADED, "no new fix: receiver silent")

    def _emit(self, fix: Fix) -> None:
        if fix.receiver_ns is not None:
            # A live receiver's UTC time: the daemon's trusted time when NTP is absent.
            clock.observe_gps(fix.receiver_ns, fix.capture_ns)
        self._deliver(fix)
        self._set(State.OK, f"{fix.mode}D fix")

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


class EpochAssembler:
    """gpsd's JSON lines in, whole-epoch fixes out (see the module's docstring)."""

    def __init__(self) -> None:
        self._held: Fix | None = None
        self.no_fix = False  # the last TPV said mode 0/1 or had no position
        self._used: int | None = None  # satellites used, from gpsd's last SKY
        self._delivered = ""  # receiver time of the last fix handed out
        self._held_fields: frozenset[str] = frozenset()
        self._whole: frozenset[str] | None = None  # fields of a whole epoch, once learnt

    @property
    def pending(self) -> bool:
        return self._held is not None

    def feed(self, line: bytes, received_ns: int) -> list[Fix]:
        try:
            report = json.loads(line)
        except ValueError:
            return []
        if not isinstance(report, dict):
            return []
        if report.get("class") == "SKY" and "uSat" in report:
            used = _number(report.get("uSat"))
            self._used = int(used) if used is not None else None
        if report.get("class") != "TPV":
            return []
        fix = tpv_to_fix(report, received_ns)
        out: list[Fix] = []
        if fix is None:
            mode = _number(report.get("mode"))
            self.no_fix = mode is None or mode < 2 or _number(report.get("lat")) is None
            if self.no_fix:  # the receiver lost its fix: the epoch held so far is whole
                return self._release()
            return []  # a fix without receiver time (gpsd's first reports): not placeable
        self.no_fix = False
        if self._used is not None:
            fix = dataclasses.replace(fix, satellites_used=self._used)
        fields = frozenset(report) & EPOCH_FIELDS
        if self._held is not None and self._held.time != fix.time:
            # The held epoch ended: it was whole. Learn the union, so that one poorer epoch
            # (a 2D fix, a fix without course) cannot teach us to release partial ones.
            self._whole = (self._whole or frozenset()) | self._held_fields
            out = self._release()
        if fix.time == self._delivered:
            # gpsd added to an epoch after we took it as whole (settle too short for this
            # link): one fix per receiver time, the first stays.
            return out
        self._held, self._held_fields = fix, fields  # a later TPV of a time is fuller
        if self._whole is not None and fields >= self._whole:
            out += self._release()
        return out

    def flush(self) -> Fix | None:
        released = self._release()
        return released[0] if released else None

    def _release(self) -> list[Fix]:
        held, self._held = self._held, None
        if held is None:
            return []
        self._delivered = held.time
        return [held]


def _number(value: Any) -> float | None:
    """A JSON number as float; anything else (absent, null, text, NaN) is unknown."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def tpv_to_fix(tpv: dict[str, Any], received_ns: int) -> Fix | None:
    """A gpsd TPV as a Fix; None without a 2D/3D position or a receiver time.
    Absent fields stay None: gpsd leaves out what the receiver did not report."""
    mode = _number(tpv.get("mode"))
    lat, lon = _number(tpv.get("lat")), _number(tpv.get("lon"))
    stamp = tpv.get("time")
    if mode is None or mode < 2 or lat is None or lon is None or not isinstance(stamp, str):
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    receiver_ns = parse_time_ns(stamp)
    if receiver_ns is None:
        return None
    three_d = mode >= 3
    # gpsd 3.20+ sends altMSL/altHAE; older ones `alt` (MSL). A 2D fix has no altitude.
    alt = _number(tpv.get("altMSL", tpv.get("alt"))) if three_d else None
    return Fix(
        capture_ns=received_ns, time=stamp, receiver_ns=receiver_ns, lat=lat, lon=lon,
        mode=int(mode), alt=alt, speed=_number(tpv.get("speed")),
        heading=_number(tpv.get("track")), magnetic_heading=_number(tpv.get("magtrack")),
        climb=_number(tpv.get("climb")) if three_d else None,
        epx=_number(tpv.get("epx")),
        epy=_number(tpv.get("epy")), epv=_number(tpv.get("epv")) if three_d else None,
        eps=_number(tpv.get("eps")), epd=_number(tpv.get("epd")))
