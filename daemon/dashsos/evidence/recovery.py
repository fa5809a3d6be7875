"""Startup recovery: incidents left open by a power cut are finalized from what is
playable and marked `recovered`.

A fragmented MP4 cut mid-write ends in a partial box. Keeping whole top-level boxes up to
the last complete moof+mdat pair leaves a file every player reads to its last fragment.
A pre-window spool (spool.py) left beside it means the cut came before the clip writer
was done with the buffered seconds: when the trimmed clip holds less than the spool, the
clip is rebuilt from the spool and the trimmed one kept aside (`clip.mp4.after-cut`).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from dashsos import clock
from dashsos.evidence import spool
from dashsos.evidence.files import commit, fsync_dir, write_json

log = logging.getLogger(__name__)


def playable_length(path: Path) -> int:
    """Bytes of `path` that form whole boxes, ending after the last complete fragment;
    0 when there is no complete fragment (a header alone holds no evidence)."""
    size = path.stat().st_size
    keep = 0
    fragments = 0
    pending_moof = False
    with open(path, "rb") as f:
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            header = f.read(16)
            box_size, box_type = struct.unpack(">I4s", header[:8])
            if box_size == 1 and len(header) == 16:
                box_size = struct.unpack(">Q", header[8:16])[0]
            elif box_size == 0:
                box_size = size - offset  # "to the end of the file": only if complete
            if box_size < 8 or offset + box_size > size:
                break  # the partial box the power cut left
            offset += box_size
            if box_type == b"moof":
                pending_moof = True
            elif box_type == b"mdat":
                pending_moof = False
                keep = offset
                fragments += 1
            elif not pending_moof:
                keep = offset  # ftyp, moov, sidx, mfra...
    return keep if fragments else 0


def _seconds(clip: Path) -> float:
    import av

    try:
        with av.open(str(clip)) as container:
            return float(container.duration or 0) / 1_000_000
    except (OSError, av.FFmpegError):
        return 0.0


def _from_spool(directory: Path, partial: Path) -> list[str]:
    """A clip from the pre-window spool when the cut clip holds less."""
    spooled = directory / spool.NAME
    try:
        _, _, _, packets = spool.read(spooled)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"pre-window spool unreadable: {exc}"]
    if not packets:
        return ["pre-window spool empty"]
    span = (packets[-1].end_ns - packets[0].capture_ns) / 1e9
    kept = 0.0
    if partial.exists() and (keep := playable_length(partial)):
        with open(partial, "rb+") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
        kept = _seconds(partial)
        if kept >= span - 0.5:
            spooled.unlink()
            return []  # the clip has it all: trimmed as usual below
    rebuilt = directory / "clip.mp4"
    error = spool.rebuild(spooled, rebuilt)
    if error is not None:
        return [f"pre-window spool could not be rebuilt: {error}"]
    if partial.exists():
        os.replace(partial, directory / "clip.mp4.after-cut")
    spooled.unlink()
    fsync_dir(directory)
    return [f"clip rebuilt from the pre-window spool ({span:.1f} s; the cut clip held "
            f"{kept:.1f} s)"]


def recover(incidents: Path) -> list[dict[str, Any]]:
    """Finalize every incident a power cut left open; returns their records."""
    recovered: list[dict[str, Any]] = []
    if not incidents.is_dir():
        return recovered
    for directory in sorted(p for p in incidents.iterdir() if p.is_dir()
                            and not p.name.startswith(".")):
        record_path = directory / "incident.json"
        partial = directory / "clip.mp4.partial"
        try:
            record: dict[str, Any] = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {"id": directory.name}
        if record.get("status") in ("saved", "failed", "recovered"):
            continue
        notes = []
        if (directory / spool.NAME).exists():
            notes += _from_spool(directory, partial)
        if partial.exists():
            keep = playable_length(partial)
            if keep:
                with open(partial, "rb+") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
                commit(partial, directory / "clip.mp4")
                notes.append(f"clip trimmed to its last complete fragment ({keep} bytes)")
            else:  # cut before its first fragment: kept aside, not called a clip
                os.replace(partial, directory / "clip.mp4.empty")
                notes.append("clip cut before its first fragment: no video to keep")
        for name in ("track.gpx", "track.vtt"):
            if not (directory / name).exists():
                notes.append(f"{name} missing (written at the end)")
        record.update({"status": "recovered", "recovered_at": clock.iso(clock.now_ns()),
                       "recovery": notes})
        write_json(record_path, record)
        log.warning("incident %s recovered after an interruption: %s", directory.name,
                    "; ".join(notes) or "nothing to fix")
        recovered.append(record)
    return recovered
