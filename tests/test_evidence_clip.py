"""A trigger turns the buffer into evidence: clip, GPS sidecars, record (issue 2, items 2-4).

Real parts: gpsd fed by gpsfake, the microphone through pyaudio from a PulseAudio null
sink carrying a tone, the test pattern encoded by libx264; every clip checked by ffprobe.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any

import clipcheck
import nmea
from conftest import TONE_HZ, GpsFake, wait_for

PRE, POST, KFI = 3.0, 3.0, 1.0
GPX = "{http://www.topografix.com/GPX/1/1}"


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def test_trigger_saves_clip_with_tone_and_track(daemon: Any, own_gpsfake: GpsFake,
                                                pulse: dict[str, str]) -> None:
    gpsfake = own_gpsfake  # its own: gpsd shared across tests has replayed fixes out of order
    d = daemon({"audio": {"backend": "pyaudio"},
                "gps": {"backend": "gpsd", "port": gpsfake.port, "poll_interval": 0.2},
                "buffer": {"pre_seconds": PRE}, "incident": {"post_seconds": POST}},
               env=pulse)
    wait_for(lambda: d.source("gps")["state"] == "ok", 30, "a GPS fix")
    d.wait_buffered(PRE + 1)
    status = d.status()
    assert status["sources"]["video"]["state"] == "simulated"  # the test pattern says so
    assert status["sources"]["audio"]["state"] == "ok"
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660  # not world-accessible
    reply = d.trigger()
    record = d.wait_saved(reply["incident"])
    directory = d.incident_dir(reply["incident"])
    # The record says saved just before the manifest is signed.
    wait_for(lambda: (directory / "manifest.sig").exists(), 5, "the signature")
    assert sorted(p.name for p in directory.iterdir()) == \
        ["clip.mp4", "incident.json", "manifest.json", "manifest.sig", "track.gpx", "track.vtt"]

    # The clip (item 4).
    clip = directory / "clip.mp4"
    facts = clipcheck.check_clip(clip)
    assert abs(facts.duration - (PRE + POST)) <= KFI + 0.1, facts
    assert facts.audio_start is not None
    assert abs(facts.audio_start - facts.video_start) <= 0.1, facts
    assert clipcheck.keyframe_interval(clip) <= KFI + 0.04

    # The microphone's tone is in it (item 3).
    peak, level = clipcheck.audio_tone(clip)
    assert abs(peak - TONE_HZ) < 15, peak
    assert level > -40, level

    # The GPX holds the log's positions at the log's times (item 2).
    points = ET.parse(directory / "track.gpx").getroot().iter(f"{GPX}trkpt")
    track = [(float(p.attrib["lat"]), float(p.attrib["lon"]), p.find(f"{GPX}time").text)
             for p in points]  # type: ignore[union-attr]
    assert len(track) >= PRE + POST - 2, track
    indices = [gpsfake.index_of(str(t)) for _, _, t in track]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    for (lat, lon, _), index in zip(track, indices, strict=True):
        want = nmea.position(index)
        assert abs(lat - want[0]) < 1e-6 and abs(lon - want[1]) < 1e-6, (lat, lon, index)

    # The VTT shows each of those positions at the moment in the clip it was received:
    # cue time + clip start - fix time is the same (gpsfake's lag) for every cue.
    cues = clipcheck.vtt_cues((directory / "track.vtt").read_text())
    assert len(cues) >= PRE + POST - 2
    clip_start = _time(record["clip"]["start"])
    offsets = []
    for start, end, text in cues:
        assert 0 <= start < end <= facts.duration + 0.05
        position, fix_time = text.splitlines()
        lat_text, rest = position.split(",", 1)
        lat, lon = float(lat_text), float(rest.split()[0])
        want = nmea.position(gpsfake.index_of(fix_time))
        assert abs(lat - want[0]) < 1e-5 and abs(lon - want[1]) < 1e-5
        if start > 0:  # the first cue may be a fix from before the clip, shown from 0
            offsets.append((clip_start - _time(fix_time)).total_seconds() + start)
    assert max(offsets) - min(offsets) < 0.6, offsets

    # The record.
    assert record["trigger"]["kind"] == "local"
    assert record["first_position"]["mode"] >= 2
    assert record["sources"]["audio"]["backend"] == "pyaudio"
    json.dumps(record)


def test_saved_incident_is_signed_and_verifies(daemon: Any, tmp_path: Path) -> None:
    """Every saved incident carries a manifest signed by the device key; `dashsos verify`
    says OK, and says what differs after any change (issue 6)."""
    d = daemon({"buffer": {"pre_seconds": 2}, "incident": {"post_seconds": 2}})
    d.wait_buffered(2, streams=("video",))
    key = d.state / "device.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    fingerprint = d.status()["evidence"]["key_fingerprint"]
    retention = d.status()["storage"]["retention"]  # status says what the quota did
    assert retention["pruned"] == [] and retention["limit_bytes"] > 0
    reply = d.trigger()
    d.wait_saved(reply["incident"])
    directory = d.incident_dir(reply["incident"])
    wait_for(lambda: (directory / "manifest.sig").exists(), 5, "the signature")

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dashsos", "verify", str(directory),
                               *extra], capture_output=True, text=True)

    ok = verify("--trust", fingerprint)
    assert ok.returncode == 0 and fingerprint in ok.stdout, ok.stderr
    clip = directory / "clip.mp4"
    data = bytearray(clip.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of evidence changed
    clip.write_bytes(bytes(data))
    bad = verify()
    assert bad.returncode == 1 and "clip.mp4: content differs" in bad.stderr
