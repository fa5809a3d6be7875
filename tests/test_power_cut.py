"""A clip cut short by SIGKILL mid-incident plays up to its last fragment (issue 2, item 5)."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import clipcheck

PRE = 3.0


def test_sigkill_mid_incident_leaves_playable_clip(daemon: Any) -> None:
    d = daemon({"buffer": {"pre_seconds": PRE}, "incident": {"post_seconds": 60}})
    d.wait_buffered(PRE + 1)
    reply = d.trigger()
    recorded_after_trigger = 4.0
    time.sleep(recorded_after_trigger)
    d.stop(signal.SIGKILL)

    directory = d.incident_dir(reply["incident"])
    partial = directory / "clip.mp4.partial"
    assert partial.exists() and not (directory / "clip.mp4").exists()
    facts = clipcheck.check_clip(partial)
    # Everything up to the last complete fragment (one keyframe interval) is there.
    assert facts.duration >= PRE + recorded_after_trigger - 1.5, facts
    assert abs((facts.audio_start or 0) - facts.video_start) <= 0.1
    # The record written at the trigger is there too, saying the incident was open.
    assert '"status": "recording"' in (directory / "incident.json").read_text()


def test_restart_recovers_the_cut_incident(daemon: Any) -> None:
    """The next start finalizes what the power cut left: clip trimmed to whole fragments,
    renamed, the record marked recovered, the track so far kept."""
    d = daemon({"buffer": {"pre_seconds": PRE}, "incident": {"post_seconds": 60}})
    d.wait_buffered(PRE + 1)
    reply = d.trigger()
    time.sleep(6)  # past the first periodic write of the GPS track
    d.stop(signal.SIGKILL)
    directory = d.incident_dir(reply["incident"])
    before = (directory / "clip.mp4.partial").stat().st_size
    with open(directory / "clip.mp4.partial", "ab") as f:
        f.write(b"\x00\x00\x10\x00moof" + b"\x00" * 100)  # a fragment cut mid-write
    again = daemon({"storage": {"dir": str(d.state)}})
    record = json.loads((directory / "incident.json").read_text())
    assert record["status"] == "recovered" and record["recovery"]
    assert not (directory / "clip.mp4.partial").exists()
    clip = directory / "clip.mp4"
    assert clip.stat().st_size == before  # the junk fragment is gone, nothing else
    facts = clipcheck.check_clip(clip)
    assert facts.duration >= PRE + 6 - 1.5
    assert "<trkpt" in (directory / "track.gpx").read_text()
    again.stop()
