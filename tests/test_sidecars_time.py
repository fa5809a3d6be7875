"""GPX and VTT carry the receiver's time only; a VTT cue ends when its fix goes stale."""

from __future__ import annotations

from dashsos.clock import NS
from dashsos.evidence import sidecars
from dashsos.location.fix import Fix


def fix(t: float, stamp: str) -> Fix:
    return Fix(int(t * NS), stamp, 48.0, 11.0, 3, speed=10.0, heading=90.0)


def test_gpx_never_falls_back_to_the_pis_clock() -> None:
    gpx = sidecars.gpx([fix(1, "2026-01-01T00:00:01.000Z"), fix(2, "")], "x")
    assert gpx.count("<trkpt") == 2
    assert gpx.count("<time>") == 1 and "<time>2026-01-01T00:00:01.000Z</time>" in gpx


def test_vtt_cue_ends_when_its_fix_goes_stale() -> None:
    # A fix at 1 s, then an outage until 10 s: the first cue ends at 3.5 s, not 10 s.
    vtt = sidecars.vtt([fix(1, "2026-01-01T00:00:01.000Z"), fix(10, "")],
                       clip_start_ns=0, clip_end_ns=12 * NS)
    assert "00:00:01.000 --> 00:00:03.500\n48.000000, 11.000000  36 km/h  90\u00b0\n" \
        "2026-01-01T00:00:01.000Z" in vtt
    assert vtt.endswith("00:00:10.000 --> 00:00:12.000\n48.000000, 11.000000  36 km/h  90\u00b0\n")
