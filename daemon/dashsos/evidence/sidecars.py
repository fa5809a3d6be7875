"""The clip's GPS track as GPX 1.1 (for maps) and WebVTT (so players show the position).

Times written are the receiver's, never the Pi's clock: a point without a receiver time
has no <time>. A VTT cue is placed on the media clock (when the fix arrived) and ends at
the next fix or when its fix goes stale: through an outage no position is shown.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from dashsos.clock import NS
from dashsos.location.fix import Fix

# A fix older than this is not "where the car is": a 1 Hz receiver's next fix is due in
# 1 s; two missed fixes mean an outage.
STALE_NS = 2 * NS + NS // 2


def gpx(fixes: list[Fix], name: str) -> str:
    points = []
    for f in fixes:
        parts = [f'<trkpt lat="{f.lat:.7f}" lon="{f.lon:.7f}">']
        if f.alt is not None:
            parts.append(f"<ele>{f.alt:.1f}</ele>")
        if f.time:
            parts.append(f"<time>{escape(f.time)}</time>")
        parts.append(f"<fix>{'3d' if f.mode >= 3 else '2d'}</fix>")
        if f.satellites_used is not None:
            parts.append(f"<sat>{f.satellites_used}</sat>")
        parts.append("</trkpt>")
        points.append("      " + "".join(parts))
    return "\n".join([
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<gpx version="1.1" creator="dashsos" xmlns="http://www.topografix.com/GPX/1/1">',
        f"  <metadata><name>{escape(name)}</name></metadata>",
        f"  <trk><name>{escape(name)}</name><trkseg>",
        *points,
        "  </trkseg></trk>",
        "</gpx>",
        "",
    ])


def _timestamp(ns: int) -> str:
    ms = max(0, ns) // 1_000_000
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def cue_text(f: Fix) -> str:
    text = f"{f.lat:.6f}, {f.lon:.6f}"
    if f.speed is not None:
        text += f"  {f.speed * 3.6:.0f} km/h"
    if f.heading is not None:
        text += f"  {f.heading:.0f}\u00b0"
    return text + (f"\n{f.time}" if f.time else "")


def vtt(fixes: list[Fix], clip_start_ns: int, clip_end_ns: int) -> str:
    """One cue per fix, from its capture time to the next fix (at most STALE_NS),
    relative to the clip start."""
    lines = ["WEBVTT", ""]
    shown = [f for f in fixes if f.capture_ns < clip_end_ns]
    for i, f in enumerate(shown):
        start = max(0, f.capture_ns - clip_start_ns)
        end_ns = shown[i + 1].capture_ns if i + 1 < len(shown) else clip_end_ns
        end = min(end_ns, clip_end_ns, f.capture_ns + STALE_NS) - clip_start_ns
        if end <= start:
            continue
        lines += [f"{_timestamp(start)} --> {_timestamp(end)}", cue_text(f), ""]
    return "\n".join(lines)


