"""A clip cut short by SIGKILL mid-incident plays up to its last fragment (issue 2, item 5)."""

from __future__ import annotations

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
