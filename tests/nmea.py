"""Generates NMEA logs for gpsfake: a car driving north-east, one fix per second."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import reduce

LAT0, LON0 = 48.1374, 11.5755
STEP_DEG = 0.0001  # per second: about 11 m/s north, 7 m/s east
SPEED_KNOTS = 25.0


def position(index: int) -> tuple[float, float]:
    """Where the log puts the car `index` seconds after its first fix."""
    return LAT0 + STEP_DEG * index, LON0 + STEP_DEG * index


def _sentence(body: str) -> str:
    checksum = reduce(lambda a, c: a ^ ord(c), body, 0)
    return f"${body}*{checksum:02X}\r\n"


def _coord(value: float, width: int, hemispheres: str) -> str:
    hemi = hemispheres[0] if value >= 0 else hemispheres[1]
    value = abs(value)
    degrees = int(value)
    minutes = (value - degrees) * 60
    return f"{degrees:0{width}d}{minutes:07.4f},{hemi}"


def epoch(t: datetime, index: int, fix: bool = True) -> str:
    lat, lon = position(index)
    hms = t.strftime("%H%M%S") + ".00"
    date = t.strftime("%d%m%y")
    la, lo = _coord(lat, 2, "NS"), _coord(lon, 3, "EW")
    if not fix:
        return (_sentence(f"GPRMC,{hms},V,,,,,,,{date},,,N")
                + _sentence(f"GPGGA,{hms},,,,,0,00,99.9,,M,,M,,")
                + _sentence("GPGSA,A,1,,,,,,,,,,,,,99.9,99.9,99.9"))
    return (_sentence(f"GPRMC,{hms},A,{la},{lo},{SPEED_KNOTS:.1f},45.0,{date},,,A")
            + _sentence(f"GPGGA,{hms},{la},{lo},1,08,0.9,520.0,M,47.0,M,,")
            + _sentence("GPGSA,A,3,01,02,03,04,05,06,07,08,,,,,1.5,0.9,1.2"))


def log(start: datetime, seconds: int, pad: int = 5) -> tuple[str, datetime]:
    """`pad` no-fix epochs (gpsd loses the first sentences while it detects the device),
    then `seconds` fixes. Returns the text and the time of fix index 0."""
    out = [epoch(start + timedelta(seconds=i), 0, fix=False) for i in range(pad)]
    first = start + timedelta(seconds=pad)
    out += [epoch(first + timedelta(seconds=i), i) for i in range(seconds)]
    return "".join(out), first


def drive_epoch(t: datetime, lat: float, lon: float, kmh: float, course: float,
                mode: int = 3) -> str:
    """One RMC-first epoch of a moving car at `t` (sub-second times for 5 Hz); mode 3 or
    2 (GSA says 2D, GGA without altitude), 1 for no fix."""
    hms = t.strftime("%H%M%S") + f".{t.microsecond // 10000:02d}"
    date = t.strftime("%d%m%y")
    if mode < 2:
        return (_sentence(f"GPRMC,{hms},V,,,,,,,{date},,,N")
                + _sentence(f"GPGGA,{hms},,,,,0,00,99.9,,M,,M,,")
                + _sentence("GPGSA,A,1,,,,,,,,,,,,,99.9,99.9,99.9"))
    la, lo = _coord(lat, 2, "NS"), _coord(lon, 3, "EW")
    knots = kmh / 1.852
    alt = "520.0" if mode == 3 else ""
    return (_sentence(f"GPRMC,{hms},A,{la},{lo},{knots:.2f},{course:.1f},{date},,,A")
            + _sentence(f"GPGGA,{hms},{la},{lo},1,08,0.9,{alt},M,47.0,M,,")
            + _sentence(f"GPGSA,A,{mode},01,02,03,04,05,06,07,08,,,,,1.5,0.9,1.2"))


def drive(start: datetime, hz: int, speeds: list[tuple[float, int]]) -> str:
    """A car driving north: `speeds` holds (km/h, mode) per epoch, `hz` epochs a second.
    Padded with no-fix epochs (gpsd loses the first sentences)."""
    out = [drive_epoch(start + timedelta(seconds=i / hz), 0, 0, 0, 0, mode=1)
           for i in range(5 * hz)]
    lat, lon = LAT0, LON0
    for i, (kmh, mode) in enumerate(speeds):
        t = start + timedelta(seconds=5 + i / hz)
        lat += kmh / 3.6 / hz / 111_320
        out.append(drive_epoch(t, lat, lon, kmh, 0.0, mode))
    return "".join(out)
